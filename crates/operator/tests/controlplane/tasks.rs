//! The AgentTask controller against a real control plane, with the operator binary and
//! its embedded sandbox server running as in production, and for Claude Code the real
//! pinned CLI inside the sandbox talking to the scripted model.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sandcastle_api::{AgentTask, AgentTaskStatus, SandboxTemplate, TaskPhase};
use sandcastle_e2b::client::ListQuery;
use serde_json::json;

use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::model::{HELLO_PY, Mode, Script, ScriptedModel};
use sandcastle_testkit::operator::{Operator, wait_for};
use sandcastle_testkit::repo;

const WAIT: Duration = Duration::from_secs(60);
use sandcastle_api::names::{self, SANDBOX_TASK_UID as TASK_UID};

pub(crate) fn finished(status: &AgentTaskStatus) -> bool {
    matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
}

pub(crate) async fn create(api: &Api<AgentTask>, name: &str, spec: serde_json::Value) {
    let task: AgentTask = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a task");
    api.create(&PostParams::default(), &task)
        .await
        .expect("create task");
}

/// A namespace with the operator and an adopted `base` template.
pub(crate) async fn setup(
    env: &TestEnv,
    prefix: &str,
    settings: &[(&str, &str)],
) -> (String, Operator, Api<AgentTask>) {
    let ns = env.namespace(prefix).await;
    let operator = Operator::start_with(env.kubeconfig_path(), &ns, settings);
    sandcastle_testkit::base::adopt_base(&env.client, &ns).await;
    let tasks = Api::namespaced(env.client.clone(), &ns);
    (ns, operator, tasks)
}

async fn live_sandboxes(operator: &Operator, uid: &str) -> usize {
    let query = ListQuery {
        metadata: [(TASK_UID.to_string(), uid.to_string())].into(),
        ..ListQuery::default()
    };
    operator
        .provider()
        .list_sandboxes(&query)
        .await
        .expect("list")
        .len()
}

async fn uid(api: &Api<AgentTask>, name: &str) -> String {
    api.get(name)
        .await
        .expect("task")
        .metadata
        .uid
        .expect("uid")
}

pub(crate) async fn put_secret(env: &TestEnv, ns: &str, name: &str, data: serde_json::Value) {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data});
    secrets
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("apply Secret");
}

pub async fn a_command_task_reports_its_files_and_frees_its_sandbox(env: Arc<TestEnv>) {
    let (ns, operator, api) = setup(&env, "command", &[]).await;
    create(&api, "files", json!({
        "templateRef": {"name": "base"},
        "prompt": "make some files",
        "agent": {"command": {"command": ["sh", "-c",
            "mkdir -p out .git && echo \"$SANDCASTLE_PROMPT\" > out/prompt.txt && echo x > .git/ignored && echo data > input.txt && echo done"]}},
        "workspace": {"files": [{"path": "input.txt", "content": "original"}]},
    }))
    .await;
    let status = wait_for(&api, "files", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let files: Vec<(&str, i64)> = status
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    assert_eq!(
        files,
        [("input.txt", 5), ("out/prompt.txt", 16)],
        "changed files, .git excluded"
    );
    assert_eq!(
        (status.file_count, status.files_truncated),
        (Some(2), false)
    );
    let result = status.result.expect("result");
    assert_eq!(
        (result.exit_code, result.text.as_str(), result.is_error),
        (Some(0), "done\n", false)
    );
    assert_eq!(status.attempts, Some(1));
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert_eq!(
        live_sandboxes(&operator, &uid(&api, "files").await).await,
        0,
        "the sandbox is killed"
    );
    let series = [
        r#"sandcastle_agenttasks{phase="Succeeded"} 1"#,
        r#"sandcastle_agenttask_duration_seconds_count{outcome="succeeded"} 1"#,
        "sandcastle_sandbox_create_seconds_count 1",
        r#"sandcastle_provider_requests_total{code="201"}"#,
        r#"controller_runtime_reconcile_total{controller="agenttask",result="success"}"#,
        r#"controller_runtime_reconcile_time_seconds_count{controller="sandboxtemplate"}"#,
    ];
    // A pass is counted when it returns, a moment after the status it wrote is seen.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = operator.metrics().await;
        let missing: Vec<&str> = series
            .iter()
            .copied()
            .filter(|series| !metrics.contains(series))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no {missing:?} in\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    create(
        &api,
        "fails",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["sh", "-c", "echo broken; exit 4"]}},
            "backoffLimit": 3,
        }),
    )
    .await;
    let failed = wait_for(&api, "fails", "finished", finished).await;
    assert_eq!(failed.phase, Some(TaskPhase::Failed));
    assert_eq!(failed.reason.as_deref(), Some("AgentFailed"));
    assert_eq!(failed.result.as_ref().and_then(|r| r.exit_code), Some(4));
    assert_eq!(failed.attempts, Some(1), "an agent failure is not retried");
    let stalled = failed
        .conditions
        .iter()
        .find(|condition| condition.type_ == "Stalled")
        .map(|condition| condition.status.as_str());
    assert_eq!(
        stalled,
        Some("True"),
        "kstatus reads a failed task as failed"
    );

    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), &ns);
    let seed: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "seed"}, "data": {"notes.md": "seeded"},
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &seed)
        .await
        .expect("ConfigMap");
    for (name, key) in [("seeded", "notes.md"), ("unseeded", "absent.md")] {
        create(
            &api,
            name,
            json!({
                "templateRef": {"name": "base"},
                "agent": {"command": {"command": ["cat", "notes.md"]}},
                "workspace": {"files": [
                    {"path": "notes.md", "configMapKeyRef": {"name": "seed", "key": key}},
                ]},
            }),
        )
        .await;
    }
    let seeded = wait_for(&api, "seeded", "finished", finished).await;
    assert_eq!(
        seeded.result.map(|result| result.text),
        Some("seeded".to_string())
    );
    let unseeded = wait_for(&api, "unseeded", "finished", finished).await;
    assert_eq!(unseeded.reason.as_deref(), Some("InvalidWorkspace"));
    assert_eq!(
        unseeded.message.as_deref(),
        Some("ConfigMap seed has no key absent.md")
    );
    assert_eq!(
        live_sandboxes(&operator, &uid(&api, "unseeded").await).await,
        0,
        "the prepared sandbox is killed"
    );

    create(
        &api,
        "bad-glob",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["true"]}},
            "outputs": {"exclude": ["out/[unclosed"]},
        }),
    )
    .await;
    let bad = wait_for(&api, "bad-glob", "finished", finished).await;
    assert_eq!(bad.reason.as_deref(), Some("InvalidOutputs"), "{bad:#?}");
    assert_eq!(bad.sandbox_id, None, "refused before a sandbox was made");

    create(
        &api,
        "short-lived",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["true"]}},
            "ttlSecondsAfterFinished": 2,
        }),
    )
    .await;
    wait_for(&api, "short-lived", "finished", finished).await;
    let deadline = Instant::now() + WAIT;
    while api.get_opt("short-lived").await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "the finished task outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn a_task_waits_for_its_secret_and_never_shows_the_value(env: Arc<TestEnv>) {
    let (ns, operator, api) = setup(&env, "secret", &[]).await;
    let value = "s3cr3t-value-9d2f";
    create(&api, "needs-key", json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sh", "-c", "echo the key is $TOKEN; touch \"leak-$TOKEN.txt\""]}},
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
    }))
    .await;
    let waiting = waits_for_its_secret(&api, "needs-key", "creds").await;
    assert_eq!(
        waiting.sandbox_id, None,
        "nothing starts without the Secret"
    );
    put_secret(&env, &ns, "creds", json!({"token": value})).await;
    let status = wait_for(&api, "needs-key", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(
        status.result.as_ref().unwrap().text,
        "the key is [redacted]\n"
    );
    assert_eq!(status.files[0].path, "leak-[redacted].txt");
    let stdout = transcript(&env, &ns, "needs-key").await;
    assert_eq!(stdout, "the key is [redacted]\n");
    let everything = format!(
        "{:?} {:?} {stdout}",
        api.get("needs-key").await.unwrap(),
        events(&env, &ns).await
    );
    assert!(!everything.contains(value), "the Secret's value leaked");
    // Events follow the status they announce (the verdict is written first), so the last
    // may arrive a moment after the task reads Succeeded.
    let transitions = ["Adopted", "MissingSecret", "Started", "Succeeded"];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reasons: Vec<String> = events(&env, &ns)
            .await
            .into_iter()
            .filter_map(|event| event.split(' ').next().map(str::to_string))
            .collect();
        let missing: Vec<&str> = transitions
            .into_iter()
            .filter(|transition| !reasons.iter().any(|reason| reason == transition))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {missing:?} event among {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(operator);
}

/// Waits until the task waits in `MissingSecret` with a message that `says` something.
pub(crate) async fn waits_for_its_secret(
    api: &Api<AgentTask>,
    name: &str,
    says: &str,
) -> AgentTaskStatus {
    let waiting = wait_for(api, name, "waiting for its Secret", |status| {
        status.reason.as_deref() == Some("MissingSecret")
    })
    .await;
    let message = waiting.message.as_deref().unwrap_or_default();
    assert!(message.contains(says), "{name}: {message}");
    waiting
}

/// The agent's stdout as the task's transcript ConfigMap keeps it.
pub(crate) async fn transcript(env: &TestEnv, ns: &str, task: &str) -> String {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(env.client.clone(), ns);
    let config_map = api
        .get(&format!("{task}-transcript"))
        .await
        .expect("the transcript");
    config_map
        .data
        .unwrap_or_default()
        .remove("stdout")
        .unwrap_or_default()
}

pub(crate) async fn events(env: &TestEnv, ns: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|event| {
            format!(
                "{} {}",
                event.reason.unwrap_or_default(),
                event.note.unwrap_or_default()
            )
        })
        .collect()
}

pub async fn deadlines_and_deletion_kill_the_sandbox(env: Arc<TestEnv>) {
    let (_ns, operator, api) = setup(&env, "deadline", &[]).await;
    let sleeper = json!({"command": {"command": ["sleep", "600"]}});
    create(
        &api,
        "slow",
        json!({"templateRef": {"name": "base"}, "agent": sleeper, "activeDeadlineSeconds": 4}),
    )
    .await;
    let uid_slow = uid(&api, "slow").await;
    wait_for(&api, "slow", "running", |s| {
        s.phase == Some(TaskPhase::Running)
    })
    .await;
    assert_eq!(live_sandboxes(&operator, &uid_slow).await, 1);
    let expired = wait_for(&api, "slow", "finished", finished).await;
    assert_eq!(expired.reason.as_deref(), Some("DeadlineExceeded"));
    // Killed within a few seconds of its deadline, whatever its agent: the pass that
    // follows a running command agent comes back by the deadline.
    let created = api
        .get("slow")
        .await
        .expect("get")
        .metadata
        .creation_timestamp;
    let stalled = expired
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    let took = stalled.last_transition_time.0 - created.expect("created").0;
    assert!(
        took.total(jiff::Unit::Second).expect("seconds") <= 9.0,
        "ended {took:#} after its creation, with a 4 s deadline"
    );
    assert_eq!(
        live_sandboxes(&operator, &uid_slow).await,
        0,
        "the deadline kills the sandbox"
    );

    create(
        &api,
        "deleted",
        json!({"templateRef": {"name": "base"}, "agent": sleeper}),
    )
    .await;
    let uid_deleted = uid(&api, "deleted").await;
    wait_for(&api, "deleted", "running", |s| {
        s.phase == Some(TaskPhase::Running)
    })
    .await;
    api.delete("deleted", &DeleteParams::default())
        .await
        .expect("delete");
    let deadline = Instant::now() + WAIT;
    while api.get_opt("deleted").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the task was not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        live_sandboxes(&operator, &uid_deleted).await,
        0,
        "deletion kills the sandbox"
    );
}

/// The operator settings that run the pinned Claude Code CLI (from `scripts/setup`) in
/// the embedded server's sandboxes: its command, and its install mounted there.
pub(crate) fn claude_settings() -> [(&'static str, String); 2] {
    let binary = repo()
        .join(".tools/bin/claude")
        .canonicalize()
        .expect("run scripts/setup");
    let install = binary
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .and_then(Path::parent)
        .expect("an npm prefix")
        .display()
        .to_string();
    [
        ("SANDCASTLE_CLAUDE_COMMAND", binary.display().to_string()),
        ("SANDCASTLE_SANDBOXD_HOST_PATHS", install),
    ]
}

/// A Claude Code task on `base` that reaches the scripted `model` with the key of the
/// Secret `anthropic`, with `extra` fields added to (or replacing) the spec's.
pub(crate) fn claude_spec(
    model: &ScriptedModel,
    prompt: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = json!({
        "templateRef": {"name": "base"},
        "prompt": prompt,
        "env": [
            {"name": "ANTHROPIC_BASE_URL", "value": model.base_url()},
            {"name": "CLAUDE_CODE_MAX_RETRIES", "value": "0"},
        ],
        "envFrom": [{"secretRef": {"name": "anthropic"}}],
    });
    spec.as_object_mut()
        .expect("an object")
        .extend(extra.as_object().expect("an object").clone());
    spec
}

pub async fn claude_code_runs_for_real_against_the_scripted_model(env: Arc<TestEnv>) {
    let settings = claude_settings();
    let settings = settings
        .each_ref()
        .map(|(key, value)| (*key, value.as_str()));
    let (ns, operator, api) = setup(&env, "claude", &settings).await;
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    let key = "sk-ant-task-key-5e1c";
    put_secret(&env, &ns, "anthropic", json!({"ANTHROPIC_API_KEY": key})).await;
    let spec = |extra: serde_json::Value| claude_spec(&model, "Create hello.py and run it", extra);
    create(&api, "hello", spec(json!({}))).await;
    let status = wait_for(&api, "hello", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let result = status.result.as_ref().expect("result");
    assert_eq!(result.text, "done");
    assert_eq!((result.num_turns, result.is_error), (Some(3), false));
    assert!(result.session_id.is_some());
    // What `kubectl get` shows once the task ended: TURNS is the final count, COST the
    // decimal the CLI meant, without the digits of its float sums.
    let progress = status.progress.as_ref().expect("progress");
    assert_eq!(progress.turns, 3, "{progress:?}");
    let usage = status.usage.as_ref().expect("usage");
    assert!(usage.input_tokens > 0 && usage.cost_usd.is_some());
    let cost_text = usage.cost_usd.as_deref().unwrap_or_default();
    assert!(
        cost_text
            .split('.')
            .nth(1)
            .is_none_or(|digits| digits.len() <= 9),
        "cost {cost_text}"
    );
    // The reported tokens are counted, and the cost is summed as decimals, so exactly
    // what the task reported.
    operator
        .await_metric(
            r#"sandcastle_agent_tokens_total{kind="input"}"#,
            usage.input_tokens as f64,
            Duration::from_secs(5),
        )
        .await;
    let cost: f64 = usage.cost_usd.as_deref().unwrap().parse().unwrap();
    operator
        .await_metric(
            "sandcastle_agent_cost_usd_total",
            cost,
            Duration::from_secs(5),
        )
        .await;
    let files: Vec<(&str, i64)> = status
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    assert_eq!(files, [("hello.py", HELLO_PY.len() as i64)]);
    let stdout = transcript(&env, &ns, "hello").await;
    assert!(stdout.contains(r#""type":"result""#), "{stdout}");

    model.set_mode(Mode::Unauthorized);
    create(&api, "refused", spec(json!({}))).await;
    let refused = wait_for(&api, "refused", "finished", finished).await;
    assert_eq!(refused.phase, Some(TaskPhase::Failed));
    assert_eq!(refused.reason.as_deref(), Some("AgentApiError"));
    assert_eq!(
        refused.attempts,
        Some(1),
        "an API error is the agent's failure, not retried"
    );

    create(
        &api,
        "misinvoked",
        spec(json!({"agent": {"claudeCode": {"extraArgs": ["--no-such-option"]}}})),
    )
    .await;
    let misinvoked = wait_for(&api, "misinvoked", "finished", finished).await;
    assert_eq!(misinvoked.reason.as_deref(), Some("AgentFailed"));
    assert_eq!(
        misinvoked.attempts,
        Some(1),
        "a refused invocation is not retried"
    );
    let message = misinvoked.message.unwrap_or_default();
    assert!(message.contains("unknown option"), "{message}");

    model.set_mode(Mode::ServerError);
    create(&api, "broken", spec(json!({}))).await;
    let broken = wait_for(&api, "broken", "finished", finished).await;
    assert_eq!(broken.reason.as_deref(), Some("AgentApiError"));
    assert_eq!(broken.attempts, Some(1));

    let token = "tok-echoed-4b7a";
    put_secret(&env, &ns, "project", json!({"PROJECT_TOKEN": token})).await;
    model.set_mode(Mode::EchoSecret {
        marker: "PROJECT_TOKEN".into(),
        pad: 0,
    });
    create(
        &api,
        "leaky",
        spec(json!({"envFrom": [
            {"secretRef": {"name": "anthropic"}},
            {"secretRef": {"name": "project"}},
        ]})),
    )
    .await;
    let leaky = wait_for(&api, "leaky", "finished", finished).await;
    assert_eq!(leaky.phase, Some(TaskPhase::Succeeded), "{leaky:#?}");
    let text = &leaky.result.as_ref().expect("result").text;
    assert!(
        text.contains("[redacted]") && !text.contains(token),
        "{text}"
    );
    assert!(
        leaky
            .files
            .iter()
            .any(|file| file.path.contains("[redacted]")),
        "{:?}",
        leaky.files
    );

    model.set_mode(Mode::LoopToolCalls);
    create(
        &api,
        "endless",
        spec(json!({"agent": {"claudeCode": {"maxTurns": 2}}})),
    )
    .await;
    let endless = wait_for(&api, "endless", "finished", finished).await;
    assert_eq!(endless.reason.as_deref(), Some("MaxTurns"));

    let everything = format!(
        "{:?} {:?}",
        api.list(&ListParams::default()).await.unwrap().items,
        events(&env, &ns).await
    );
    assert!(!everything.contains(key), "the API key leaked");
    assert!(!everything.contains(token), "the echoed token leaked");
    let logs = operator.logs();
    assert!(
        logs.contains("sandbox created"),
        "the operator's logs were captured"
    );
    assert!(
        !logs.contains(key) && !logs.contains(token),
        "a secret leaked into the operator's logs"
    );
    drop(operator);
}

/// A sandbox server in the test process (it outlives any operator, as e2b.dev does) and
/// a template `name` adopting its `base` through it as an E2B provider, with the key in
/// the Secret `external`. Returns the server and its directory.
async fn external_template(
    env: &TestEnv,
    ns: &str,
    name: &str,
    configure: impl FnOnce(&mut sandcastle_sandboxd::Config),
) -> (sandcastle_sandboxd::Sandboxd, std::path::PathBuf) {
    let root = sandcastle_testkit::scratch_dir().join(format!("external-{ns}"));
    let mut config = sandcastle_sandboxd::Config::new(&root);
    config.api_key = Some("external-key".into());
    configure(&mut config);
    let external = sandcastle_sandboxd::Sandboxd::start(config)
        .await
        .expect("server");
    put_secret(env, ns, "external", json!({"E2B_API_KEY": "external-key"})).await;
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), ns);
    let template: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": name},
        "spec": {
            "provider": {"e2b": {
                "apiUrl": external.api_url(),
                "sandboxUrl": external.sandbox_url(),
                "apiKeySecretRef": {"name": "external"},
            }},
            "existing": {"templateId": "base"},
        },
    }))
    .unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .expect("template");
    (external, root)
}

/// The operator's own embedded server dies with it, so restart safety is shown with a
/// sandbox server that outlives the operator, as e2b.dev does: a standalone embedded
/// server in the test process, reached as an E2B provider.
pub async fn a_restart_reattaches_and_a_lost_sandbox_is_retried(env: Arc<TestEnv>) {
    let (ns, mut operator, api) = setup(&env, "resilience", &[]).await;
    let (external, root) = external_template(&env, &ns, "remote", |_| {}).await;
    let provider =
        sandcastle_e2b::client::E2bClient::new(sandcastle_e2b::client::ClientConfig::with_urls(
            external.api_url(),
            external.sandbox_url(),
            "external-key",
        ))
        .expect("client");
    // The verdict is written before the sandbox is killed (so a crash between the two
    // cannot lose a result), so a finished task's sandbox goes a moment after it reads
    // as finished: how many are alive once that moment is over (at most 10 s).
    let count = |uid: String| {
        let provider = provider.clone();
        async move {
            let query = ListQuery {
                metadata: [(TASK_UID.to_string(), uid)].into(),
                ..ListQuery::default()
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let alive = provider.list_sandboxes(&query).await.expect("list").len();
                if alive == 0 || std::time::Instant::now() > deadline {
                    return alive;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    create(&api, "survivor", json!({
        "templateRef": {"name": "remote"},
        "agent": {"command": {"command": ["sh", "-c", "sleep 4; echo finished > result.txt; echo ok"]}},
    }))
    .await;
    let running = wait_for(&api, "survivor", "running", |s| {
        s.phase == Some(TaskPhase::Running)
    })
    .await;
    operator.crash_and_restart();
    let status = wait_for(&api, "survivor", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(
        status.sandbox_id, running.sandbox_id,
        "the restarted operator kept the sandbox"
    );
    assert_eq!(status.attempts, Some(1));
    assert_eq!(status.files[0].path, "result.txt");
    assert_eq!(count(uid(&api, "survivor").await).await, 0);

    create(
        &api,
        "unlucky",
        json!({
            "templateRef": {"name": "remote"},
            "agent": {"command": {"command": ["sh", "-c", "sleep 3; echo ok"]}},
            "backoffLimit": 2,
        }),
    )
    .await;
    let first = wait_for(&api, "unlucky", "running", |s| {
        s.phase == Some(TaskPhase::Running)
    })
    .await;
    let lost = first.sandbox_id.clone().expect("a sandbox");
    assert!(provider.kill_sandbox(&lost).await.expect("kill"));
    let status = wait_for(&api, "unlucky", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(
        status.attempts,
        Some(2),
        "one retry after the sandbox vanished"
    );
    assert_ne!(status.sandbox_id, Some(lost));
    assert_eq!(count(uid(&api, "unlucky").await).await, 0);

    // A sandbox paused behind the operator's back is waited for, not replaced.
    create(
        &api,
        "paused",
        json!({
            "templateRef": {"name": "remote"},
            "agent": {"command": {"command": ["sh", "-c", "sleep 4; echo ok"]}},
        }),
    )
    .await;
    let running = wait_for(&api, "paused", "running", |s| {
        s.phase == Some(TaskPhase::Running)
    })
    .await;
    let sandbox = running.sandbox_id.clone().expect("a sandbox");
    assert!(provider.pause_sandbox(&sandbox).await.expect("pause"));
    let reason = |s: &AgentTaskStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.reason.clone())
    };
    let waiting = wait_for(&api, "paused", "the pause in status", |s| {
        reason(s).as_deref() == Some("SandboxPaused")
    })
    .await;
    assert_eq!(waiting.phase, Some(TaskPhase::Running));
    // Long enough for several looks at the sandbox: none of them replaces it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let still = api
        .get_status("paused")
        .await
        .expect("task")
        .status
        .expect("status");
    assert_eq!(
        reason(&still).as_deref(),
        Some("SandboxPaused"),
        "{still:#?}"
    );
    assert_eq!(still.attempts, Some(1));
    provider
        .connect_sandbox(&sandbox, Duration::from_secs(300))
        .await
        .expect("resume");
    let status = wait_for(&api, "paused", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(status.attempts, Some(1), "the same attempt went on");
    assert_eq!(status.sandbox_id, Some(sandbox));
    assert!(
        events(&env, &ns)
            .await
            .iter()
            .any(|event| event.contains("SandboxPaused")),
        "a SandboxPaused event"
    );
    assert_eq!(count(uid(&api, "paused").await).await, 0);
    external.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

pub async fn sandboxes_of_vanished_tasks_are_swept(env: Arc<TestEnv>) {
    let (ns, operator, _api) = setup(&env, "sweep", &[]).await;
    let provider = operator.provider();
    let sandbox = |instance: &str| {
        let mut spec = sandcastle_e2b::client::SandboxSpec::new("base", Duration::from_secs(300));
        spec.metadata = [
            (names::SANDBOX_OPERATOR.to_string(), instance.to_string()),
            (TASK_UID.to_string(), "uid-of-a-deleted-task".to_string()),
            (names::SANDBOX_TASK_NAMESPACE.to_string(), ns.clone()),
            (names::SANDBOX_TASK_NAME.to_string(), "ghost".to_string()),
        ]
        .into();
        spec
    };
    let orphan = provider
        .create_sandbox(&sandbox("sandcastle"))
        .await
        .expect("orphan");
    let foreign = provider
        .create_sandbox(&sandbox("another-operator"))
        .await
        .expect("foreign");
    let deadline = Instant::now() + Duration::from_secs(30);
    while provider.get_sandbox(&orphan.sandbox_id).await.is_ok() {
        assert!(Instant::now() < deadline, "the orphan was not swept");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        provider.get_sandbox(&foreign.sandbox_id).await.is_ok(),
        "another operator's sandbox is not ours to sweep"
    );

    // A template's own E2B account is swept too.
    let (external, root) = external_template(&env, &ns, "remote", |_| {}).await;
    let remote =
        sandcastle_e2b::client::E2bClient::new(sandcastle_e2b::client::ClientConfig::with_urls(
            external.api_url(),
            external.sandbox_url(),
            "external-key",
        ))
        .expect("client");
    let remote_orphan = remote
        .create_sandbox(&sandbox("sandcastle"))
        .await
        .expect("an orphan on the template's account");
    let deadline = Instant::now() + Duration::from_secs(30);
    while remote.get_sandbox(&remote_orphan.sandbox_id).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the orphan on the template's own provider was not swept"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    external.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

pub async fn the_sandbox_cap_queues_tasks_in_creation_order(env: Arc<TestEnv>) {
    let (_ns, operator, api) = setup(
        &env,
        "cap",
        &[
            ("SANDCASTLE_MAX_RUNNING_TASKS", "4"),
            ("SANDCASTLE_MAX_RUNNING_TASKS_PER_NAMESPACE", "3"),
        ],
    )
    .await;
    let names: Vec<String> = (0..20).map(|n| format!("task-{n:02}")).collect();
    for name in &names {
        create(
            &api,
            name,
            json!({
                "templateRef": {"name": "base"},
                "agent": {"command": {"command": ["sh", "-c", "sleep 1; date +%s%N"]}},
            }),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most = 0;
    loop {
        let tasks = api.list(&ListParams::default()).await.expect("list").items;
        let holding = tasks
            .iter()
            .filter(|task| {
                task.status
                    .as_ref()
                    .is_some_and(|status| status.sandbox_id.is_some() && !finished(status))
            })
            .count();
        let live = operator
            .provider()
            .list_sandboxes(&ListQuery::default())
            .await
            .expect("list sandboxes")
            .len();
        most = most.max(holding).max(live);
        assert!(
            holding <= 3 && live <= 3,
            "{holding} tasks hold sandboxes, {live} live"
        );
        if tasks
            .iter()
            .all(|task| task.status.as_ref().is_some_and(finished))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "20 tasks did not finish within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most, 3, "the cap is used");
    let mut started: Vec<(jiff::Timestamp, String)> = Vec::new();
    for name in &names {
        let status = api.get(name).await.expect("task").status.expect("status");
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "{name}: {status:#?}"
        );
        started.push((status.start_time.expect("start").0, name.clone()));
    }
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, name)| name.as_str()).collect();
    let mut expected: Vec<&str> = names.iter().map(String::as_str).collect();
    expected.sort();
    // Older tasks are admitted first; when several slots free at once, the tasks admitted
    // together may start in any order among themselves.
    for (position, name) in order.iter().enumerate() {
        let created = expected.iter().position(|n| n == name).unwrap();
        assert!(
            created.abs_diff(position) < 3,
            "{name} started {position}th: {order:?}"
        );
    }
}

/// A provider that refuses the sandbox for good (here: a lifetime beyond the account's
/// cap, as E2B's Hobby tier refuses more than an hour) fails the task at once, with the
/// provider's words, instead of at its deadline.
pub async fn a_refused_sandbox_fails_the_task_at_once(env: Arc<TestEnv>) {
    let (ns, operator, api) = setup(&env, "refused", &[]).await;
    let (external, root) = external_template(&env, &ns, "capped", |config| {
        config.max_timeout = Duration::from_secs(3600);
    })
    .await;
    create(
        &api,
        "too-long",
        json!({
            "templateRef": {"name": "capped"},
            "agent": {"command": {"command": ["true"]}},
            "activeDeadlineSeconds": 7200,
        }),
    )
    .await;
    let status = wait_for(&api, "too-long", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Failed), "{status:#?}");
    assert_eq!(status.reason.as_deref(), Some("ProviderRejected"));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("Timeout cannot be greater than 1 hours"),
        "{message}"
    );
    assert_eq!(status.sandbox_id, None);
    drop(operator);
    external.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

/// A template's warm pool: kept at its size, taken by tasks (with their Secrets, which
/// reach only the agent's process), refilled, shrunk, and gone with the template.
pub async fn warm_pools_hand_out_sandboxes_and_keep_their_size(env: Arc<TestEnv>) {
    let (ns, operator, api) = setup(&env, "pool", &[]).await;
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let template: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "warm"},
        "spec": {"existing": {"templateId": "base"}, "pool": {"size": 2}},
    }))
    .unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .expect("template");
    let provider = operator.provider();
    let pool_uid = templates
        .get("warm")
        .await
        .expect("template")
        .metadata
        .uid
        .expect("uid");
    let members = || {
        let provider = provider.clone();
        let pool_uid = pool_uid.clone();
        async move {
            let query = ListQuery {
                metadata: [(names::SANDBOX_POOL.to_string(), pool_uid)].into(),
                ..ListQuery::default()
            };
            let mut ids: Vec<String> = provider
                .list_sandboxes(&query)
                .await
                .expect("list")
                .into_iter()
                .map(|sandbox| sandbox.sandbox_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let ready = |want: i32| {
        move |status: &sandcastle_api::SandboxTemplateStatus| {
            status
                .pool
                .as_ref()
                .is_some_and(|pool| pool.ready == want && pool.creating == 0)
        }
    };
    let full = wait_for(&templates, "warm", "a full pool", ready(2)).await;
    let pool_ready = full
        .conditions
        .iter()
        .find(|condition| condition.type_ == "PoolReady")
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()));
    assert_eq!(
        pool_ready,
        Some(("True", "PoolFull", "2 of 2 warm")),
        "{full:#?}"
    );
    for condition in ["Ready", "Reconciling", "Stalled"] {
        assert!(
            full.conditions.iter().any(|c| c.type_ == condition),
            "the pool's condition leaves the template's own in place: {full:#?}"
        );
    }
    let warm = members().await;
    assert_eq!(warm.len(), 2, "{warm:?}");

    put_secret(&env, &ns, "creds", json!({"token": "warm-s3cr3t-41"})).await;
    for name in ["first", "second", "third"] {
        create(&api, name, json!({
            "templateRef": {"name": "warm"},
            "agent": {"command": {"command": ["sh", "-c",
                "test -d /tmp/.sandcastle-pool && echo warm || echo cold; echo token ${#TOKEN}"]}},
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        }))
        .await;
    }
    let mut taken = Vec::new();
    for name in ["first", "second", "third"] {
        let status = wait_for(&api, name, "finished", finished).await;
        assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
        let text = status.result.as_ref().expect("result").text.clone();
        let sandbox = status.sandbox_id.clone().expect("a sandbox");
        let from_pool = warm.contains(&sandbox);
        assert_eq!(
            text,
            format!("{}\ntoken 14\n", if from_pool { "warm" } else { "cold" }),
            "the claim marks only warm sandboxes, and the Secret reaches the agent: {status:#?}"
        );
        taken.push(sandbox);
    }
    let mut distinct = taken.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "no sandbox was taken twice: {taken:?}");
    assert_eq!(
        taken.iter().filter(|id| warm.contains(id)).count(),
        2,
        "both warm sandboxes were taken, the third task made its own: {taken:?} from {warm:?}"
    );

    // Refilled with new sandboxes; the taken ones went with their tasks.
    wait_for(&templates, "warm", "a refilled pool", ready(2)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = members().await;
        if now.len() == 2 && now.iter().all(|id| !warm.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool holds {now:?}, was {warm:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(r#"sandcastle_pool_claims_total{result="warm"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("sandcastle_warm_sandboxes 2"), "{metrics}");
    assert!(!metrics.contains("warm-s3cr3t-41"));

    // Shrunk to nothing, then gone with the template.
    templates
        .patch(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"pool": {"size": 0}}})),
        )
        .await
        .expect("shrink");
    wait_for(&templates, "warm", "an empty pool", ready(0)).await;
    assert_eq!(members().await, Vec::<String>::new());
    templates
        .patch(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"pool": {"size": 1}}})),
        )
        .await
        .expect("grow");
    wait_for(&templates, "warm", "one warm sandbox", ready(1)).await;
    templates
        .delete("warm", &Default::default())
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !members().await.is_empty() {
        assert!(Instant::now() < deadline, "the pool outlived its template");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A rebuild rolls the pool while tasks keep taking from it: a task of either build gets
/// a sandbox of the build its template named when it started, and the pool ends holding
/// only the new build.
pub async fn a_rebuild_rolls_the_warm_pool_while_tasks_claim(env: Arc<TestEnv>) {
    let (ns, operator, api) = setup(&env, "roll", &[]).await;
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let spec = |version: &str| {
        json!({
            "build": {"fromTemplate": "base", "steps": [
                {"run": format!("mkdir -p /opt/app && echo {version} > /opt/app/version")},
            ]},
            "pool": {"size": 3},
        })
    };
    let template: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "rolling"},
        "spec": spec("v1"),
    }))
    .unwrap();
    templates
        .create(&PostParams::default(), &template)
        .await
        .expect("template");
    let first = wait_for(&templates, "rolling", "a full pool of v1", |status| {
        status.pool.as_ref().is_some_and(|pool| pool.ready == 3)
    })
    .await;
    let v1 = first.build_id.clone().expect("a build");
    templates
        .patch(
            "rolling",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": spec("v2")})),
        )
        .await
        .expect("rebuild");
    // Tasks arrive all through the rebuild and the roll.
    let mut names = Vec::new();
    let rolled = |status: &sandcastle_api::SandboxTemplateStatus| {
        status.build_id.as_deref() != Some(v1.as_str())
            && status.pool.as_ref().is_some_and(|pool| {
                pool.ready == 3 && pool.outdated == 0 && pool.build_id == status.build_id
            })
    };
    let deadline = Instant::now() + WAIT;
    for index in 0.. {
        let name = format!("during-{index}");
        create(
            &api,
            &name,
            json!({
                "templateRef": {"name": "rolling"},
                "agent": {"command": {"command": ["cat", "/opt/app/version"]}},
            }),
        )
        .await;
        names.push(name);
        let status = templates
            .get_status("rolling")
            .await
            .expect("template")
            .status;
        if status.as_ref().is_some_and(rolled) && index >= 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not roll: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let after = templates
        .get_status("rolling")
        .await
        .expect("template")
        .status
        .unwrap_or_default();
    assert!(
        after
            .conditions
            .iter()
            .any(|c| c.type_ == "PoolReady" && c.status == "True" && c.reason == "PoolFull"),
        "a rolled pool is ready again: {after:#?}"
    );
    let v2 = templates
        .get_status("rolling")
        .await
        .expect("template")
        .status
        .and_then(|status| status.build_id)
        .expect("the new build");
    let mut builds = std::collections::BTreeMap::<String, usize>::new();
    for name in &names {
        let status = wait_for(&api, name, "finished", finished).await;
        assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
        let build = status.build_id.clone().expect("the task's build");
        let version = status.result.as_ref().expect("result").text.clone();
        let expected = if build == v1 { "v1\n" } else { "v2\n" };
        assert_eq!(
            version, expected,
            "{name} ran on build {build}: {status:#?}"
        );
        *builds.entry(build).or_default() += 1;
    }
    assert!(
        builds.contains_key(&v2),
        "tasks ran on the new build: {builds:?}"
    );
    // Only the new build is left in the pool.
    let uid = templates
        .get("rolling")
        .await
        .expect("template")
        .metadata
        .uid
        .expect("uid");
    let query = ListQuery {
        metadata: [(names::SANDBOX_POOL.to_string(), uid)].into(),
        ..ListQuery::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let members = operator
            .provider()
            .list_sandboxes(&query)
            .await
            .expect("list");
        let old: Vec<_> = members
            .iter()
            .filter(|sandbox| {
                sandbox
                    .metadata
                    .as_ref()
                    .and_then(|metadata| metadata.get(names::SANDBOX_POOL_BUILD))
                    .is_none_or(|build| !build.ends_with(&format!("/{v2}")))
            })
            .collect();
        if members.len() == 3 && old.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left in the pool: {members:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("tasks by build during the roll: {builds:?}");
}

/// The test kit's wait tells "gone" from "not yet": waiting on a task that no longer
/// exists (a TTL took it before the wait began) fails at once and says so, rather than
/// reading as an empty status for the whole wait.
pub async fn waiting_on_a_task_that_is_gone_fails_at_once(env: Arc<TestEnv>) {
    let ns = env.namespace("gone").await;
    let api: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    create(
        &api,
        "short-lived",
        json!({"templateRef": {"name": "base"}, "prompt": "hi"}),
    )
    .await;
    api.delete("short-lived", &DeleteParams::default())
        .await
        .expect("delete");
    let started = Instant::now();
    let waited = tokio::spawn(async move {
        wait_for(&api, "short-lived", "finished", finished).await;
    })
    .await;
    let failure = waited.expect_err("the wait fails");
    let message = failure
        .into_panic()
        .downcast::<String>()
        .map(|message| *message)
        .unwrap_or_default();
    assert!(message.contains("does not exist"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it failed only after {:?}",
        started.elapsed()
    );
}

/// A task that waits (for a Secret, for a template) fails at its deadline, not at the next
/// look of its wait, which comes 5 to 10 s apart.
pub async fn a_waiting_task_fails_at_its_deadline(env: Arc<TestEnv>) {
    let (_ns, operator, api) = setup(&env, "wait-deadline", &[]).await;
    let waits = [
        (
            "no-secret",
            json!({
                "templateRef": {"name": "base"},
                "agent": {"command": {"command": ["true"]}},
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "never", "key": "k"}}}],
                "activeDeadlineSeconds": 2,
            }),
        ),
        (
            "no-template",
            json!({
                "templateRef": {"name": "never"},
                "agent": {"command": {"command": ["true"]}},
                "activeDeadlineSeconds": 2,
            }),
        ),
    ];
    let started = Instant::now();
    for (name, spec) in &waits {
        create(&api, name, spec.clone()).await;
    }
    for (name, _) in &waits {
        let status = wait_for(&api, name, "finished", finished).await;
        assert_eq!(
            status.reason.as_deref(),
            Some("DeadlineExceeded"),
            "{name}: {status:#?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(4500),
            "{name} failed {:?} after its creation, against a deadline of 2 s",
            started.elapsed()
        );
    }
    drop(operator);
}
