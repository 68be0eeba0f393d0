//! The Argo CD health checks of `docs/argocd/`, run in a real Lua 5.1 (the language Argo
//! CD's gopher-lua implements) against objects shaped as the operator writes them:
//! fixtures under `tests/fixtures/argocd/<kind>/`, and template statuses computed by
//! `template_build::status` for every template reason. Also checks that the fixtures are
//! faithful (the CRD types hold them exactly, template conditions are what the operator
//! computes, Claude Code results are what the parser reads from recorded transcripts),
//! that `docs/gitops.md` carries the scripts verbatim, and that its Flux expressions for
//! tasks agree with the Argo CD check.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mlua::{HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, Table, VmState};
use sandcastle::agent::stream_json::{StreamParser, Verdict};
use sandcastle::template_build;
use sandcastle_api::{AgentTask, SandboxTemplate, SandboxTemplateStatus, TemplatePhase};
use sandcastle_api::{TaskReason, TemplateReason as Reason};
use serde::Deserialize;
use serde_json::{Value, json};

/// One resource kind: its fixtures, its script and its `argocd-cm` key.
struct Kind {
    fixtures: &'static str,
    script: &'static str,
    key: &'static str,
    /// Cases the fixtures must keep covering.
    required: &'static [&'static str],
}

const TEMPLATE: Kind = Kind {
    fixtures: "crates/operator/tests/fixtures/argocd/sandboxtemplate",
    script: "docs/argocd/sandboxtemplate-health.lua",
    key: "resource.customizations.health.sandcastle.dev_SandboxTemplate",
    required: &[
        "new",
        "stale-generation",
        "queued",
        "building",
        "ready",
        "adopted",
        "missing-credentials",
        "build-failed",
        "provider-unavailable",
        "deletion-blocked",
    ],
};

const TASK: Kind = Kind {
    fixtures: "crates/operator/tests/fixtures/argocd/agenttask",
    script: "docs/argocd/agenttask-health.lua",
    key: "resource.customizations.health.sandcastle.dev_AgentTask",
    required: &[
        "new",
        "template-not-ready",
        "missing-secret",
        "queued",
        "provisioning",
        "running",
        "retrying",
        "succeeded",
        "agent-failed",
        "max-turns",
        "api-error",
        "deadline-exceeded",
        "deleting",
    ],
};

/// A fixture file: the object, the health Argo CD must show for it, and for Claude Code
/// tasks the recorded transcript their result comes from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    expected: Expected,
    #[serde(default)]
    transcript: Option<String>,
    object: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    status: String,
    /// A part of the message, so fixtures state what matters and not every word.
    message: String,
}

fn path(relative: &str) -> PathBuf {
    sandcastle_testkit::repo().join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative))
        .unwrap_or_else(|err| panic!("reading {relative}: {err}"))
}

fn fixtures(kind: &Kind) -> Vec<(String, Fixture)> {
    let mut found: Vec<(String, Fixture)> = std::fs::read_dir(path(kind.fixtures))
        .unwrap_or_else(|err| panic!("reading {}: {err}", kind.fixtures))
        .map(|entry| entry.expect("a directory entry").path())
        .map(|file| {
            let name = file
                .file_stem()
                .and_then(|stem| stem.to_str())
                .expect("a file name")
                .to_string();
            let text = std::fs::read_to_string(&file).expect("a readable fixture");
            let fixture = serde_yaml::from_str(&text)
                .unwrap_or_else(|err| panic!("{}: {err}", file.display()));
            (name, fixture)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let names: BTreeSet<&str> = found.iter().map(|(name, _)| name.as_str()).collect();
    for required in kind.required {
        assert!(
            names.contains(required),
            "{} lost its fixture {required}",
            kind.fixtures
        );
    }
    found
}

/// What a script returned, and which of its lines ran.
struct Health {
    status: String,
    message: String,
    lines: BTreeSet<usize>,
}

/// Runs a health script the way Argo CD does: the object as the global `obj`, the
/// script's return value as the verdict.
fn evaluate(name: &str, script: &str, object: &Value) -> Health {
    // Argo CD opens the base, table and package libraries and a reduced os library; the
    // string and math libraries are off unless a customization opts in. This state has
    // base and table, so a script that calls string functions fails here as it would there.
    let lua = Lua::new_with(StdLib::TABLE, LuaOptions::default()).expect("a Lua state");
    // Argo CD hands JSON null to Lua as nil and arrays as plain tables.
    let options = mlua::serde::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let obj = lua
        .to_value_with(object, options)
        .expect("the object converts");
    lua.globals().set("obj", obj).expect("obj is set");
    let lines = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = lines.clone();
    lua.set_hook(HookTriggers::EVERY_LINE, move |_lua, debug| {
        if let Some(line) = debug.current_line() {
            seen.lock().expect("lines").insert(line);
        }
        Ok(VmState::Continue)
    })
    .expect("a line hook");
    let result: Table = lua
        .load(script)
        .set_name(format!("@{name}"))
        .eval()
        .unwrap_or_else(|err| panic!("the script failed: {err}"));
    let lines = lines.lock().expect("lines").clone();
    Health {
        status: result.get("status").expect("a status"),
        message: result.get("message").expect("a message"),
        lines,
    }
}

/// The lines that decide a verdict: those setting `hs.status` or `hs.message`, and the
/// returns.
fn verdict_lines(script: &str) -> BTreeSet<usize> {
    script
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim_start();
            line.starts_with("hs.") || line == "return hs"
        })
        .map(|(index, _)| index + 1)
        .collect()
}

fn check_fixtures(kind: &Kind) {
    let script = read(kind.script);
    let mut ran = BTreeSet::new();
    let mut failures = Vec::new();
    for (name, fixture) in fixtures(kind) {
        let health = evaluate(kind.script, &script, &fixture.object);
        if health.status != fixture.expected.status
            || !health.message.contains(&fixture.expected.message)
        {
            failures.push(format!(
                "{name}: got {} {:?}, expected {} with {:?}",
                health.status, health.message, fixture.expected.status, fixture.expected.message
            ));
        }
        ran.extend(health.lines);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let missed: Vec<usize> = verdict_lines(&script).difference(&ran).copied().collect();
    assert!(
        missed.is_empty(),
        "no fixture reaches lines {missed:?} of {}",
        kind.script
    );
}

#[test]
fn every_template_fixture_gets_its_health_and_every_verdict_is_reached() {
    check_fixtures(&TEMPLATE);
}

#[test]
fn every_task_fixture_gets_its_health_and_every_verdict_is_reached() {
    check_fixtures(&TASK);
}

/// Serializing through the CRD types must give the fixture back: a misspelt or invented
/// field would be dropped, a wrong enum value refused.
#[test]
fn the_crd_types_hold_every_fixture_exactly() {
    for (kind, round_trip) in [
        (
            &TEMPLATE,
            round_trip::<SandboxTemplate> as fn(&Value) -> Value,
        ),
        (&TASK, round_trip::<AgentTask>),
    ] {
        for (name, fixture) in fixtures(kind) {
            assert_eq!(
                round_trip(&fixture.object),
                fixture.object,
                "{}/{name} is not an object the CRD types hold",
                kind.fixtures
            );
        }
    }
}

fn round_trip<K: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> Value {
    let typed: K = serde_json::from_value(object.clone()).expect("the object deserializes");
    serde_json::to_value(typed).expect("the object serializes")
}

fn template_reason(name: &str) -> Reason {
    name.parse()
        .unwrap_or_else(|_| panic!("{name} is not a template reason"))
}

/// (type, status, reason, message, observedGeneration) of each condition.
fn condition_summary(status: &Value) -> Vec<Value> {
    status["conditions"]
        .as_array()
        .map(|conditions| {
            conditions
                .iter()
                .map(|c| {
                    json!([
                        c["type"],
                        c["status"],
                        c["reason"],
                        c["message"],
                        c["observedGeneration"]
                    ])
                })
                .collect()
        })
        .unwrap_or_default()
}

fn now() -> Time {
    Time("2026-11-23T10:00:00Z".parse().expect("a timestamp"))
}

/// The hand-written template fixtures carry exactly the conditions `template_build::status`
/// computes for their phase, reason and message.
#[test]
fn template_fixtures_hold_the_conditions_the_operator_computes() {
    for (name, fixture) in fixtures(&TEMPLATE) {
        let status = &fixture.object["status"];
        let Some(ready) = status["conditions"]
            .as_array()
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Ready"))
        else {
            continue;
        };
        let phase: TemplatePhase =
            serde_json::from_value(status["phase"].clone()).expect("a phase");
        let computed = template_build::status(
            &SandboxTemplateStatus::default(),
            status["observedGeneration"].as_i64(),
            phase,
            template_reason(ready["reason"].as_str().expect("a reason")),
            status["message"].as_str().expect("a message"),
            &now(),
        );
        let computed = serde_json::to_value(computed).expect("the status serializes");
        assert_eq!(
            condition_summary(status),
            condition_summary(&computed),
            "{name}: conditions differ from what the operator computes"
        );
    }
}

/// The phases the template controller records with each reason (`write_stage` and
/// `write_blocked` in crates/operator/src/controller/template.rs), and the health each must read as.
fn template_stages(reason: Reason) -> (&'static [TemplatePhase], &'static str) {
    use TemplatePhase::*;
    match reason {
        Reason::BuildStarted | Reason::Building => (&[Building], "Progressing"),
        Reason::Queued | Reason::ProviderUnavailable => (&[Pending], "Progressing"),
        Reason::BuildSucceeded | Reason::Adopted => (&[Ready], "Healthy"),
        Reason::BuildFailed => (&[Pending, Failed], "Degraded"),
        Reason::BuildTimedOut => (&[Failed], "Degraded"),
        Reason::MissingCredentials
        | Reason::Unauthorized
        | Reason::MissingConfigMap
        | Reason::TemplateNotFound
        | Reason::ProviderNotConfigured => (&[Pending], "Degraded"),
        // Recorded during deletion, keeping whatever phase the template had.
        Reason::DeletionBlocked => (&[Pending, Building, Ready, Failed], "Progressing"),
        Reason::Deleted | Reason::TemplateVanished => {
            panic!("{reason} is an event's reason, never a condition's")
        }
    }
}

/// Every template reason, with the status the operator computes for it, reads as its
/// documented health.
#[test]
fn every_template_reason_reads_as_its_health() {
    let script = read(TEMPLATE.script);
    let base = fixtures(&TEMPLATE)
        .into_iter()
        .find(|(name, _)| name == "ready")
        .expect("the ready fixture")
        .1
        .object;
    for reason in Reason::on_conditions() {
        let (phases, expected) = template_stages(reason);
        for phase in phases {
            let message = format!("what the operator says about {}", reason.as_str());
            let status = template_build::status(
                &SandboxTemplateStatus::default(),
                Some(1),
                *phase,
                reason,
                &message,
                &now(),
            );
            let mut object = base.clone();
            object["status"] = serde_json::to_value(status).expect("the status serializes");
            if reason == Reason::DeletionBlocked {
                object["metadata"]["deletionTimestamp"] = json!("2026-11-23T11:00:00Z");
            }
            let health = evaluate(TEMPLATE.script, &script, &object);
            assert_eq!(
                health.status,
                expected,
                "{} in phase {phase:?}",
                reason.as_str()
            );
            assert!(
                health.message.contains(&message),
                "{} in phase {phase:?}: {:?} does not say {message:?}",
                reason.as_str(),
                health.message
            );
        }
    }
}

/// Task fixtures use only reasons the task controller writes, with `status.reason` equal
/// to the conditions' reason as `staged` sets it.
#[test]
fn task_fixtures_use_the_reasons_the_operator_writes() {
    let known: BTreeSet<&str> = TaskReason::ALL
        .iter()
        .map(|reason| reason.as_str())
        .collect();
    for (name, fixture) in fixtures(&TASK) {
        let status = &fixture.object["status"];
        for condition in status["conditions"].as_array().into_iter().flatten() {
            let reason = condition["reason"].as_str().expect("a reason");
            assert!(
                known.contains(reason),
                "{name}: {reason} is not a task reason"
            );
            assert_eq!(
                status["reason"].as_str(),
                Some(reason),
                "{name}: status.reason differs from the conditions' reason"
            );
        }
    }
}

/// Claude Code results in the fixtures are what the operator's parser reads from the
/// recorded transcripts of the pinned CLI, and so is the failure message.
#[test]
fn claude_fixtures_match_their_transcripts() {
    let mut checked = 0;
    for (name, fixture) in fixtures(&TASK) {
        let Some(transcript) = &fixture.transcript else {
            continue;
        };
        let mut parser = StreamParser::new();
        parser.feed(
            read(&format!(
                "crates/operator/tests/fixtures/claude/{transcript}"
            ))
            .as_bytes(),
        );
        parser.finish();
        let outcome = parser
            .outcome()
            .expect("the transcript has a result")
            .clone();
        let status = &fixture.object["status"];
        let result = &status["result"];
        assert_eq!(
            result["text"].as_str().unwrap_or_default(),
            outcome.result.as_deref().unwrap_or_default(),
            "{name}: result text"
        );
        assert_eq!(result["subtype"], json!(outcome.subtype), "{name}: subtype");
        assert_eq!(
            result["isError"],
            json!(outcome.is_error),
            "{name}: isError"
        );
        assert_eq!(result["numTurns"], json!(outcome.num_turns), "{name}");
        assert_eq!(result["durationMs"], json!(outcome.duration_ms), "{name}");
        assert_eq!(result["sessionId"], json!(outcome.session_id), "{name}");
        assert_eq!(
            result["permissionDenials"],
            json!(outcome.permission_denials),
            "{name}"
        );
        let usage = &status["usage"];
        assert_eq!(usage["costUSD"], json!(outcome.total_cost_usd), "{name}");
        assert_eq!(
            usage["inputTokens"],
            json!(outcome.usage.input_tokens),
            "{name}"
        );
        assert_eq!(
            usage["outputTokens"],
            json!(outcome.usage.output_tokens),
            "{name}"
        );
        let succeeded = status["conditions"]
            .as_array()
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "Succeeded"))
            .expect("a finished task has Succeeded");
        match parser.verdict() {
            Verdict::Succeeded => assert_eq!(succeeded["status"], "True", "{name}"),
            Verdict::Failed { message, .. } => {
                assert_eq!(succeeded["status"], "False", "{name}");
                assert_eq!(succeeded["message"], json!(message), "{name}");
            }
            Verdict::Incomplete => panic!("{name}: {transcript} has no verdict"),
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} fixtures name a transcript");
}

/// `docs/gitops.md` carries an `argocd-cm` snippet whose scripts are the files, byte for
/// byte, so what users paste is what these tests run.
#[test]
fn the_gitops_guide_carries_the_scripts_verbatim() {
    let guide = read("docs/gitops.md");
    let snippets: Vec<Value> = yaml_blocks(&guide)
        .into_iter()
        .filter_map(|block| serde_yaml::from_str::<Value>(&block).ok())
        .filter(|doc| doc["kind"] == "ConfigMap" && doc["metadata"]["name"] == "argocd-cm")
        .collect();
    assert_eq!(
        snippets.len(),
        1,
        "docs/gitops.md needs one argocd-cm snippet"
    );
    for kind in [&TEMPLATE, &TASK] {
        assert_eq!(
            snippets[0]["data"][kind.key].as_str(),
            Some(read(kind.script).as_str()),
            "the {} script in docs/gitops.md differs from {}",
            kind.key,
            kind.script
        );
    }
}

/// The contents of the ```yaml fences of a Markdown text.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some(String::new()),
            Some(block) if line.trim_start() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// The `healthCheckExprs` of `docs/gitops.md` run the way Flux runs them (after its own
/// generation check, the object's top-level fields as variables, `failed` before
/// `current`, neither meaning in progress) give each task fixture with conditions the
/// verdict of the Argo CD check.
#[test]
fn the_flux_expressions_agree_with_the_argo_cd_check() {
    let guide = read("docs/gitops.md");
    let kustomization = yaml_blocks(&guide)
        .into_iter()
        .filter_map(|block| serde_yaml::from_str::<Value>(&block).ok())
        .find(|doc| doc["kind"] == "Kustomization")
        .expect("docs/gitops.md shows a Kustomization");
    let check = &kustomization["spec"]["healthCheckExprs"][0];
    assert_eq!(check["kind"], "AgentTask");
    let program = |field: &str| {
        let source = check[field].as_str().expect("an expression");
        cel::Program::compile(source).unwrap_or_else(|err| panic!("{field}: {err:?}"))
    };
    let (failed, current) = (program("failed"), program("current"));
    let mut checked = 0;
    for (name, fixture) in fixtures(&TASK) {
        let object = &fixture.object;
        if object["status"]["conditions"].is_null() {
            continue;
        }
        let verdict = if object["status"]["observedGeneration"] != object["metadata"]["generation"]
        {
            "InProgress"
        } else {
            let mut context = cel::Context::default();
            for (key, value) in object.as_object().expect("an object") {
                context
                    .add_variable(key.as_str(), value.clone())
                    .expect("a CEL value");
            }
            let holds = |program: &cel::Program| match program.execute(&context) {
                Ok(cel::Value::Bool(value)) => value,
                other => panic!("{name}: {other:?}"),
            };
            if holds(&failed) {
                "Failed"
            } else if holds(&current) {
                "Current"
            } else {
                "InProgress"
            }
        };
        let expected = match fixture.expected.status.as_str() {
            "Healthy" => "Current",
            "Degraded" => "Failed",
            _ => "InProgress",
        };
        assert_eq!(verdict, expected, "{name}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} fixtures were checked");
}
