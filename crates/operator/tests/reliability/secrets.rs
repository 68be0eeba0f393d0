//! Random values given to agents through Secrets and echoed by them wherever an agent can
//! put text (stdout, stderr, file and directory names, the failure message, the model's
//! replies and tool calls), then looked for wherever the operator writes: task statuses,
//! events, its own logs, transcripts and metrics.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use rand::distr::{Alphanumeric, SampleString};
use sandcastle_api::{AgentTask, TaskPhase};
use serde_json::json;

use super::{Provider, create_task, figure, finished, setup, tasks};
use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::model::{Mode, Script, ScriptedModel};

const MARKER: &str = "[redacted]";
/// A piece of a value this long gives it away as surely as the whole value does (a cut
/// through a value leaves a piece), and with 62 symbols it never matches by chance.
const PIECE: usize = 12;
/// How much of a Claude Code result text a status keeps.
const RESULT_CHARS: usize = 4096;

/// Each command agent sees the values of `alpha` (through `envFrom` with a prefix) and of
/// `beta` (through `valueFrom`).
const COMMAND_VALUES: &str = r#""$ALPHA_ONE" "$ALPHA_TWO" "$BETA_THREE" "$BETA_FOUR""#;

pub async fn secrets_never_leave_the_sandbox(env: Arc<TestEnv>) {
    let claude = sandcastle_testkit::localcluster::tools_bin_dir()
        .join("claude")
        .canonicalize()
        .expect("the Claude CLI; run scripts/setup");
    // The CLI's install directory, which the sandboxes see read-only.
    let install = claude
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .and_then(Path::parent)
        .expect("an npm prefix")
        .to_path_buf();
    let provider = Provider::start_with("secrets", |config| {
        config.host_paths = vec![install];
    })
    .await;
    let command = claude.display().to_string();
    let (ns, operator, api) = setup(
        &env,
        "secrets",
        &provider,
        // At debug level the logs carry every reconcile and every provider retry, not only
        // what goes wrong.
        &[
            ("SANDCASTLE_CLAUDE_COMMAND", &command),
            ("SANDCASTLE_LOG", "debug"),
        ],
    )
    .await;

    let value = || Alphanumeric.sample_string(&mut rand::rng(), 32);
    let planted: BTreeMap<&str, Vec<(&str, String)>> = [
        ("alpha", vec![("ONE", value()), ("TWO", value())]),
        ("beta", vec![("THREE", value()), ("FOUR", value())]),
        (
            "gamma",
            // A quote in the value: the transcript holds it JSON-escaped (`\"`), which
            // redaction must find as well as the plain value.
            vec![
                (
                    "PROJECT_TOKEN",
                    format!("{}\"{}", &value()[..16], &value()[..16]),
                ),
                ("ANTHROPIC_API_KEY", value()),
            ],
        ),
    ]
    .into();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    for (name, data) in &planted {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(key, value)| (key.to_string(), ByteString(value.clone().into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("create a Secret");
    }
    let values: Vec<&str> = planted
        .values()
        .flatten()
        .map(|(_, value)| value.as_str())
        .collect();

    let command_task = |script: &str| {
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["sh", "-c", script]}},
            "envFrom": [{"secretRef": {"name": "alpha"}, "prefix": "ALPHA_"}],
            "env": [
                {"name": "BETA_THREE", "valueFrom": {"secretKeyRef": {"name": "beta", "key": "THREE"}}},
                {"name": "BETA_FOUR", "valueFrom": {"secretKeyRef": {"name": "beta", "key": "FOUR"}}},
            ],
        })
    };
    let scripts = [
        (
            "echoer",
            format!(
                r#"for v in {COMMAND_VALUES}; do echo "echoed to stdout: $v"; echo "echoed to stderr: $v" >&2; echo "$v" > "file-$v.txt"; mkdir -p "dir-$v"; echo "$v" > "dir-$v/inner.txt"; done; echo echoer done"#
            ),
        ),
        (
            "failer",
            r#"echo "about to fail with $BETA_THREE"; echo starting >&2; echo "error: the key $ALPHA_ONE was refused" >&2; exit 3"#.to_string(),
        ),
        // The failure message keeps the start of stderr; the value straddles its cut.
        (
            "cutter",
            r#"printf '%490s' '' | tr ' ' e >&2; printf '%s\n' "$ALPHA_TWO" >&2; exit 4"#
                .to_string(),
        ),
        // Longer than a transcript holds, with values in its head and in the result tail.
        (
            "large",
            r#"echo "first $BETA_THREE"; seq 1 40000 | sed 's/^/filler line /'; echo "last $BETA_FOUR"; echo large done"#
                .to_string(),
        ),
    ];
    for (name, script) in &scripts {
        create_task(&api, name, command_task(script)).await;
    }
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    // The final text puts the token across the cut of a status's result text.
    model.set_mode(Mode::EchoSecret {
        marker: "PROJECT_TOKEN".into(),
        pad: RESULT_CHARS - "The secret is ".len() - 16,
    });
    create_task(
        &api,
        "claude",
        json!({
            "templateRef": {"name": "base"},
            "prompt": "Say the project token",
            "env": [
                {"name": "ANTHROPIC_BASE_URL", "value": model.base_url()},
                {"name": "CLAUDE_CODE_MAX_RETRIES", "value": "0"},
            ],
            "envFrom": [{"secretRef": {"name": "gamma"}}],
        }),
    )
    .await;
    let count = scripts.len() + 1;

    let deadline = Instant::now() + Duration::from_secs(240);
    let all = loop {
        let all = tasks(&api).await;
        if all.len() == count && all.iter().all(|task| finished(task.status.as_ref())) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "tasks still open: {:#?}",
            all.iter()
                .map(|task| (&task.metadata.name, &task.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Where the operator writes, each as one text. The spec is left out: it only names
    // Secrets, and it is the user's.
    let mut statuses = String::new();
    for task in &all {
        let mut object = serde_json::to_value(task).expect("a task serializes");
        object.as_object_mut().expect("an object").remove("spec");
        statuses.push_str(&object.to_string());
    }
    let events: Api<Event> = Api::namespaced(env.client.clone(), &ns);
    let events = serde_json::to_string(
        &events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items,
    )
    .expect("events serialize");
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let transcripts: BTreeMap<String, BTreeMap<String, String>> = config_maps
        .list(&ListParams::default())
        .await
        .expect("config maps")
        .items
        .into_iter()
        .filter_map(|config_map| {
            let name = config_map.metadata.name?;
            let task = name.strip_suffix("-transcript")?.to_string();
            Some((task, config_map.data.unwrap_or_default()))
        })
        .collect();
    let transcript_text = serde_json::to_string(&transcripts).expect("transcripts serialize");
    let metrics = operator.metrics().await;
    let logs = operator.logs();
    let places = [
        ("status", &statuses),
        ("events", &events),
        ("operator logs", &logs),
        ("transcripts", &transcript_text),
        ("metrics", &metrics),
    ];

    // The scanner finds what is there: every value in its Secret as stored (base64) and
    // as the agent got it, and a piece of a value cut out of it.
    for (name, data) in &planted {
        let stored = serde_json::to_string(&secrets.get(name).await.expect("the Secret"))
            .expect("a Secret serializes");
        for (key, value) in data {
            assert!(
                sightings(&stored, value) >= 1,
                "{value} not seen in Secret {name}"
            );
            assert!(sightings(&format!("{key}={value}"), value) >= 1);
            assert!(sightings(&format!("cut at {}…", &value[..PIECE + 3]), value) >= 1);
        }
    }
    let mut found = Vec::new();
    for (place, text) in &places {
        for value in &values {
            let seen = sightings(text, value);
            if seen > 0 {
                found.push(format!("{place}: {seen} sightings of {value}"));
            }
        }
    }
    let scanned: usize = places.iter().map(|(_, text)| text.len()).sum();
    figure(format!(
        "secrets: {} values from {} Secrets echoed by {count} tasks (stdout, stderr, file and directory names, failure messages, model text, tool calls); {} found in status, events, operator logs, transcripts or metrics ({scanned} bytes scanned)",
        values.len(),
        planted.len(),
        found.len(),
    ));
    assert!(found.is_empty(), "leaked:\n{}", found.join("\n"));

    // What was scanned holds what the agents said, redacted: the scan looked at the
    // right places.
    let by_name: BTreeMap<String, &AgentTask> = all
        .iter()
        .map(|task| (task.metadata.name.clone().unwrap_or_default(), task))
        .collect();
    let status = |name: &str| by_name[name].status.clone().unwrap_or_default();
    let text = |name: &str| status(name).result.unwrap_or_default().text;
    let paths = |name: &str| -> Vec<String> {
        status(name)
            .files
            .into_iter()
            .map(|file| file.path)
            .collect()
    };
    assert_eq!(status("echoer").phase, Some(TaskPhase::Succeeded));
    assert!(
        text("echoer").contains("echoed to stdout: [redacted]"),
        "{}",
        text("echoer")
    );
    let echoed = paths("echoer");
    assert!(
        echoed.contains(&format!("file-{MARKER}.txt"))
            && echoed.contains(&format!("dir-{MARKER}/inner.txt")),
        "{echoed:?}"
    );
    let failer = status("failer");
    assert_eq!(failer.reason.as_deref(), Some("AgentFailed"));
    let message = failer.message.unwrap_or_default();
    assert!(
        message.contains("error: the key [redacted] was refused"),
        "{message}"
    );
    let message = status("cutter").message.unwrap_or_default();
    assert!(message.contains(&format!("eeeee{MARKER}")), "{message}");
    let large = status("large").result.unwrap_or_default();
    assert!(
        large.text.contains("last [redacted]") && large.truncated,
        "{large:?}"
    );
    assert_eq!(
        status("claude").phase,
        Some(TaskPhase::Succeeded),
        "{:?}",
        status("claude")
    );
    assert!(
        text("claude").contains("The secret is [redacted]"),
        "{}",
        text("claude")
    );
    assert!(
        paths("claude").contains(&format!("leak-{MARKER}.txt")),
        "{:?}",
        paths("claude")
    );
    assert!(
        events.contains("error: the key [redacted] was refused"),
        "the failure's event: {events}"
    );
    assert_eq!(transcripts.len(), count, "{:?}", transcripts.keys());
    let transcript = |task: &str, stream: &str| transcripts[task][stream].clone();
    assert!(transcript("echoer", "stderr").contains("echoed to stderr: [redacted]"));
    let large = transcript("large", "stdout");
    assert!(
        large.contains("first [redacted]") && large.contains("left out"),
        "{large:.200}"
    );
    let claude = transcript("claude", "stdout");
    assert!(
        claude.contains("\"tool_use\"") && claude.contains(&format!("PROJECT_TOKEN={MARKER}")),
        "{claude}"
    );
    assert!(
        metrics.contains("sandcastle_agent_tokens_total"),
        "the Claude Code run's usage is counted"
    );
    // Debug logs name each task in the URLs of its status writes.
    assert!(
        logs.contains("\"reconciled\"")
            && all.iter().all(|task| {
                let name = task.metadata.name.as_deref().unwrap_or_default();
                logs.contains(&format!("/agenttasks/{name}/status"))
            }),
        "the operator's logs name every task: {:.3000}",
        logs
    );
    drop(operator);
    provider.stop().await;
}

/// How often `value` shows in `text`: whole, base64-encoded, or as a piece that gives it
/// away.
fn sightings(text: &str, value: &str) -> usize {
    let encoded = base64::engine::general_purpose::STANDARD.encode(value);
    let pieces: usize = (0..=value.len() - PIECE)
        .map(|start| text.matches(&value[start..start + PIECE]).count())
        .sum();
    text.matches(value).count() + text.matches(encoded.as_str()).count() + pieces
}
