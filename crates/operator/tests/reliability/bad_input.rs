//! Bad input: manifests the apiserver must refuse (the table of `crates/operator/tests/admission/
//! invalid.yaml`, also run by the control-plane suite), and at run time data the operator
//! did not create: missing Secrets and keys, a broken template, a template deleted under
//! a running task, a prompt of the largest size, an agent printing invalid UTF-8 or 50 MiB,
//! 100,000 files, file names with newlines, `..` or thousands of characters, a 1 MiB
//! result, an agent that kills the recorder around it. Each task ends (or waits) with a
//! reason naming the problem, every status stays under a byte budget, and the operator
//! never panics. (A missing Secret and a missing ConfigMap key
//! are also covered in `crates/operator/tests/controlplane/tasks.rs`, with the wait ending once the
//! Secret appears.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, PostParams};
use sandcastle_api::{AgentTask, AgentTaskStatus, SandboxTemplate, TaskPhase};
use serde_json::{Value, json};

use super::{Provider, create_task, figure, setup, tasks};
use sandcastle_testkit::cases;
use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::operator::wait_for_within;

/// The bytes any task's status may take as the apiserver serves it.
const STATUS_BUDGET: usize = 64 * 1024;

type Check = Box<dyn Fn(&AgentTaskStatus) -> Result<(), String> + Send + Sync>;

/// A task built from bad input, the reason it must show, and what else must hold.
struct Case {
    name: String,
    spec: Value,
    reason: &'static str,
    check: Check,
}

fn command(script: &str) -> Value {
    json!({"templateRef": {"name": "base"}, "agent": {"command": {"command": ["sh", "-c", script]}}})
}

fn case(name: &str, spec: Value, reason: &'static str, check: Check) -> Case {
    Case {
        name: name.to_string(),
        spec,
        reason,
        check,
    }
}

fn message_names(parts: &'static [&'static str]) -> Check {
    Box::new(move |status| {
        let message = status.message.clone().unwrap_or_default();
        match parts.iter().find(|part| !message.contains(**part)) {
            None => Ok(()),
            Some(part) => Err(format!("message {message:?} lacks {part:?}")),
        }
    })
}

/// The status lists exactly these paths.
fn lists(expected: &'static [&'static str]) -> Check {
    Box::new(move |status| {
        let paths: Vec<&str> = status.files.iter().map(|file| file.path.as_str()).collect();
        (paths == expected)
            .then_some(())
            .ok_or_else(|| format!("{paths:?}"))
    })
}

/// The status counts `count` files and lists a share of them that `listed` accepts.
fn counts(count: i64, listed: impl Fn(usize) -> bool + Send + Sync + 'static) -> Check {
    Box::new(move |status| {
        (status.file_count == Some(count) && status.files_truncated && listed(status.files.len()))
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "{:?} files, {} listed",
                    status.file_count,
                    status.files.len()
                )
            })
    })
}

/// A running task whose template is deleted under it (retained on the provider) keeps its
/// sandbox and reports its true result; the template goes once nothing needs it.
async fn template_deleted_mid_task(api: &Api<AgentTask>, templates: &Api<SandboxTemplate>) {
    let name = "template-deleted";
    create_task(
        api,
        name,
        json!({"templateRef": {"name": "doomed"}, "agent": {"command": {"command": ["sh", "-c", "sleep 4; echo survived"]}}}),
    )
    .await;
    let within = Duration::from_secs(90);
    wait_for_within(api, name, "running", within, |now| {
        now.phase == Some(TaskPhase::Running)
    })
    .await;
    templates
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete the template");
    let end = wait_for_within(api, name, "ended", within, |now| {
        matches!(now.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
    })
    .await;
    assert_eq!(
        (end.reason.as_deref(), result_text(&end).trim()),
        (Some("Succeeded"), "survived"),
        "{end:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while templates.get_opt("doomed").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the deleted template stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn result_text(status: &AgentTaskStatus) -> String {
    status.result.clone().unwrap_or_default().text
}

/// A task name of the most characters a name may have.
fn longest_name() -> String {
    format!("long-{}", "n".repeat(248))
}

fn runtime_cases() -> Vec<Case> {
    // 250 digits: a directory name near the 255-byte limit of one name.
    let dir = "d=$(printf '%0250d' 0)";
    vec![
        case(
            "missing-secret",
            json!({"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}},
                "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}]}),
            "MissingSecret",
            message_names(&["Secret absent does not exist"]),
        ),
        case(
            "missing-key",
            json!({"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}},
                "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "present", "key": "token"}}}]}),
            "MissingSecret",
            message_names(&["Secret present has no key token"]),
        ),
        case(
            "missing-config-map-key",
            json!({"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}},
                "workspace": {"files": [{"path": "in.txt", "configMapKeyRef": {"name": "inputs", "key": "absent"}}]}}),
            "InvalidWorkspace",
            message_names(&["ConfigMap inputs has no key absent"]),
        ),
        case(
            "failed-template",
            json!({"templateRef": {"name": "broken"}, "agent": {"command": {"command": ["true"]}}}),
            "TemplateNotReady",
            message_names(&["SandboxTemplate broken", "failed", "BuildFailed"]),
        ),
        // What a recorder killed as it wrote its exit code leaves: an empty exit file. It
        // is no outcome (read as one, it would be a failure of the agent's own, with no
        // retry); the run was lost.
        case(
            "recorder-killed-writing-exit",
            json!({"templateRef": {"name": "base"}, "backoffLimit": 0,
                "agent": {"command": {"command": ["sh", "-c", ": >/tmp/sandcastle-run/exit; kill -9 $PPID"]}}}),
            "AgentLost",
            message_names(&["without a recorded exit"]),
        ),
        // The prompt reaches the command in one environment variable; at 196,608 bytes
        // it is over the kernel's limit for one (128 KiB), so it cannot start.
        case(
            "largest-prompt",
            json!({"templateRef": {"name": "base"}, "prompt": "€".repeat(65_536),
                "agent": {"command": {"command": ["sh", "-c", "printf %s \"$SANDCASTLE_PROMPT\" | wc -c"]}}}),
            "AgentFailed",
            message_names(&["cannot start the agent", "Argument list too long"]),
        ),
        case(
            "invalid-utf8",
            command(
                r"printf 'ok \377\376\300 end\n'; printf 'err \377\n' >&2; touch 'bad'$(printf '\377')'name'",
            ),
            "Succeeded",
            Box::new(|status| {
                let text = result_text(status);
                let named = status
                    .files
                    .iter()
                    .any(|file| file.path.starts_with("bad") && file.path.ends_with("name"));
                (text.starts_with("ok ")
                    && text.contains('\u{fffd}')
                    && text.ends_with(" end\n")
                    && named)
                    .then_some(())
                    .ok_or_else(|| format!("{text:?}, files {:?}", status.files))
            }),
        ),
        case(
            "fifty-mebibytes",
            command(r"head -c 52428800 /dev/zero | tr '\000' x; echo; echo last line"),
            "Succeeded",
            Box::new(|status| {
                let result = status.result.clone().unwrap_or_default();
                (result.truncated && result.text.ends_with("x\nlast line\n"))
                    .then_some(())
                    .ok_or_else(|| {
                        format!(
                            "truncated {}, tail {:?}",
                            result.truncated,
                            &result.text[result.text.len().saturating_sub(40)..]
                        )
                    })
            }),
        ),
        case(
            "megabyte-result",
            command(r"head -c 1048576 /dev/zero | tr '\000' r"),
            "Succeeded",
            Box::new(|status| {
                let result = status.result.clone().unwrap_or_default();
                (result.truncated && result.text == "r".repeat(4096))
                    .then_some(())
                    .ok_or_else(|| {
                        format!(
                            "truncated {}, {} bytes",
                            result.truncated,
                            result.text.len()
                        )
                    })
            }),
        ),
        case(
            "hundred-thousand-files",
            command("mkdir many && cd many && seq 100000 | xargs touch"),
            "Succeeded",
            counts(100_000, |listed| listed == 500),
        ),
        case(
            "newline-names",
            command(
                r#"touch "$(printf 'line\nbreak')" "$(printf 'tab\tname')" "$(printf 'cr\rname')""#,
            ),
            "Succeeded",
            lists(&["cr\rname", "line\nbreak", "tab\tname"]),
        ),
        case(
            "dot-dot-names",
            command("mkdir a.. && touch ... a../..b '..c' && ln -s ../../.. up && ln -s . loop"),
            "Succeeded",
            lists(&["...", "..c", "a../..b"]),
        ),
        // Beyond PATH_MAX once under the embedded server's host directory: left out of
        // the listing (FINDINGS-issue8.md), never failing it.
        case(
            "four-thousand-characters",
            command(&format!(
                "{dir}; p=.; for i in $(seq 16); do p=$p/$d; done; mkdir -p $p && touch $p/f $d.txt"
            )),
            "Succeeded",
            Box::new(|status| {
                let paths: Vec<&str> = status.files.iter().map(|file| file.path.as_str()).collect();
                (paths.len() == 1 && paths[0].ends_with(".txt"))
                    .then_some(())
                    .ok_or_else(|| format!("{paths:?}"))
            }),
        ),
        case(
            "many-long-names",
            command(&format!(
                "{dir}; mkdir -p $d/$d/$d/$d && cd $d/$d/$d/$d && for i in $(seq 300); do touch $(printf '%0200d' $i); done"
            )),
            "Succeeded",
            counts(300, |listed| listed >= 40),
        ),
        case(
            &longest_name(),
            command("echo named"),
            "Succeeded",
            Box::new(|status| {
                (result_text(status) == "named\n")
                    .then_some(())
                    .ok_or_else(|| result_text(status))
            }),
        ),
        case(
            "garbled-failure",
            command(r"printf 'cannot go on \377\n' >&2; exit 3"),
            "AgentFailed",
            message_names(&["code 3", "cannot go on \u{fffd}"]),
        ),
    ]
}

/// The size of an object's status as served, with Go's escaping of `<`, `>` and `&`.
fn served_status_size(task: &Value) -> usize {
    let json = serde_json::to_string(&task["status"]).expect("a status serializes");
    json.len()
        + 5 * json
            .chars()
            .filter(|c| matches!(c, '<' | '>' | '&'))
            .count()
}

pub async fn bad_input_is_refused_or_reported(env: Arc<TestEnv>) {
    let admission_ns = env.namespace("bad-admission").await;
    let table = cases::invalid_cases();
    let mut refused = 0;
    let mut failures = Vec::new();
    for (i, invalid) in table.iter().enumerate() {
        match cases::rejection(&env.client, &admission_ns, &format!("case-{i}"), invalid).await {
            Ok(()) => refused += 1,
            Err(failure) => failures.push(failure),
        }
    }
    assert!(failures.is_empty(), "admission:\n{}", failures.join("\n"));

    let provider = Provider::start("bad-input").await;
    let (ns, operator, api) = setup(&env, "bad-input", &provider, &[]).await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "present"}, "stringData": {"other": "x"}}),
    )
    .expect("a Secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the Secret");
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let inputs: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "inputs"}, "data": {"present": "x"}}))
            .expect("a ConfigMap");
    config_maps
        .create(&PostParams::default(), &inputs)
        .await
        .expect("create the ConfigMap");
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    for (name, spec) in [
        (
            "broken",
            json!({"build": {"fromTemplate": "base", "steps": [{"run": "echo the step breaks >&2; exit 3"}]}}),
        ),
        // Retained: deleting it must not take the provider's `base`, which others use.
        (
            "doomed",
            json!({"existing": {"templateId": "base"}, "deletionPolicy": "Retain"}),
        ),
    ] {
        let template: SandboxTemplate = serde_json::from_value(json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("a template");
        templates
            .create(&PostParams::default(), &template)
            .await
            .expect("create a template");
    }

    let runtime = runtime_cases();
    for case in &runtime {
        create_task(&api, &case.name, case.spec.clone()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let all = tasks(&api).await;
        let status_of = |name: &str| {
            all.iter()
                .find(|task| task.metadata.name.as_deref() == Some(name))
                .and_then(|task| task.status.clone())
                .unwrap_or_default()
        };
        let pending: Vec<String> = runtime
            .iter()
            .filter_map(|case| {
                let status = status_of(&case.name);
                let outcome = if status.reason.as_deref() != Some(case.reason) {
                    Err(format!("{:?}: {:?}", status.reason, status.message))
                } else {
                    (case.check)(&status)
                };
                outcome
                    .err()
                    .map(|why| format!("{}: {why}", &case.name[..case.name.len().min(30)]))
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cases without their outcome:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    template_deleted_mid_task(&api, &templates).await;

    let listed: Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "agenttasks", "-n", &ns, "-o", "json"]))
            .expect("the task list");
    let largest = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(served_status_size)
        .max()
        .unwrap_or_default();
    let transcripts = config_maps
        .list(&Default::default())
        .await
        .expect("ConfigMaps")
        .items
        .iter()
        .filter(|config_map| {
            config_map
                .metadata
                .name
                .as_deref()
                .is_some_and(|name| name.ends_with("-transcript"))
        })
        .count();
    // kube's Recorder names an Event after its object plus 17 characters, too long for
    // this task's name: its events must still be there.
    let long_name = longest_name();
    // Events follow the status they announce, so the last may arrive a moment after the
    // task reads Succeeded.
    let events: Api<Event> = Api::namespaced(env.client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|event| {
                event
                    .regarding
                    .as_ref()
                    .is_some_and(|regarding| regarding.name.as_deref() == Some(long_name.as_str()))
            })
            .filter_map(|event| event.reason)
            .collect();
        if ["Started", "Succeeded"]
            .iter()
            .all(|reason| reasons.iter().any(|seen| seen == reason))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 253-character task's events: {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = operator.logs();
    let panics = logs.matches("panicked").count();
    figure(format!(
        "bad input: {refused} manifests rejected at admission; {} runtime cases, each with its reason; largest status {largest} bytes (budget {STATUS_BUDGET}); {panics} panics",
        runtime.len() + 1
    ));
    assert!(refused >= 30, "the admission table lost cases");
    assert!(largest < STATUS_BUDGET, "a status of {largest} bytes");
    // Every case whose agent ran to a verdict and printed keeps its transcript, the
    // 253-character name's too; one that printed nothing leaves none. Only
    // `garbled-failure` printed to stderr alone.
    let printed = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|task| {
            task["metadata"]["name"] == "garbled-failure"
                || task["status"]["result"]["text"]
                    .as_str()
                    .is_some_and(|text| !text.is_empty())
        })
        .count();
    assert!(printed >= 6, "only {printed} cases printed");
    assert_eq!(transcripts, printed, "transcripts");
    assert_eq!(panics, 0, "the operator panicked:\n{logs}");
    drop(operator);
    provider.stop().await;
}
