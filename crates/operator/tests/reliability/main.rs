//! The operator under failure, on a real control plane of its own: killed at random
//! moments, facing a provider that fails a share of its requests, and racing deletions of
//! its tasks and of a whole namespace, its apiserver stopped and started again, given bad
//! input, and given secrets its agents echo everywhere they can. Each part prints one
//! figure line.
//!
//! Sandboxes live in a sandbox server inside this test process, reached by the operator as
//! its E2B provider, so they outlive the operator as e2b.dev's do, and the server's own
//! record of every sandbox's life is what "created", "two at once" and "leaked" are
//! counted from. kube-controller-manager runs beside the apiserver here (and only here)
//! so a deleted namespace is emptied and finalized as in a real cluster.
//!
//! Sizes are bounded for CI and set by the environment for longer runs:
//! `SANDCASTLE_CHAOS_TASKS` (60), `SANDCASTLE_CHAOS_KILLS` (10), `SANDCASTLE_CHAOS_SEED`,
//! `SANDCASTLE_POOL_CHAOS_TASKS` (30), `SANDCASTLE_POOL_CHAOS_KILLS` (5),
//! `SANDCASTLE_FAULT_TASKS` (20), `SANDCASTLE_FAULT_RATE` (0.3), `SANDCASTLE_FAULT_SEED`,
//! `SANDCASTLE_DELETION_TASKS` (8 per phase), `SANDCASTLE_NAMESPACE_TASKS` (20),
//! `SANDCASTLE_OUTAGE_TASKS` (8) and `SANDCASTLE_OUTAGE_SECONDS` (10).

mod bad_input;
mod deletion;
mod outage;
mod restarts;
mod secrets;
mod unreliable_provider;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, PostParams};
use sandcastle_api::{AgentTask, AgentTaskStatus, TaskPhase};
use sandcastle_e2b::client::{ClientConfig, E2bClient, ListQuery};
use sandcastle_sandboxd::{Config, SandboxLife, Sandboxd};
use sandcastle_testkit::base::adopt_base;
use sandcastle_testkit::cluster::{SharedTest, TestEnv, run_shared};
use sandcastle_testkit::operator::Operator;
use serde_json::json;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|env| Box::pin($name(env))) as SharedTest)),*]
    };
}

use bad_input::*;
use deletion::*;
use outage::*;
use restarts::*;
use secrets::*;
use unreliable_provider::*;

fn main() -> ExitCode {
    run_shared(
        true,
        tests![
            killed_operators_lose_and_duplicate_nothing,
            killed_operators_take_no_warm_sandbox_twice,
            a_failing_provider_ends_every_task_cleanly,
            tasks_deleted_mid_flight_take_their_sandboxes,
            a_refused_finalizer_leaves_no_sandbox,
            an_outage_holds_deletion_until_the_sandbox_is_killed,
            a_deleted_namespace_goes_away_with_its_sandboxes,
            an_apiserver_outage_loses_nothing,
            bad_input_is_refused_or_reported,
            secrets_never_leave_the_sandbox,
        ],
    )
}

/// A size or seed from the environment, or its CI default.
fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} does not parse")),
        Err(_) => default,
    }
}

/// One figure line, on stdout for `--nocapture` and on stderr for CI logs.
fn figure(line: String) {
    println!("{line}");
    eprintln!("{line}");
}

const API_KEY: &str = "reliability-key";
use sandcastle_api::names::SANDBOX_TASK_UID as TASK_UID;

/// A sandbox server in this process that keeps its history, reached by the operator as
/// its default E2B provider.
struct Provider {
    server: Sandboxd,
    root: PathBuf,
}

impl Provider {
    async fn start(name: &str) -> Provider {
        Provider::start_with(name, |_| {}).await
    }

    /// Like [`Provider::start`], with the server's settings changed by `configure`.
    async fn start_with(name: &str, configure: impl FnOnce(&mut Config)) -> Provider {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("provider-{name}"));
        let _ = std::fs::remove_dir_all(&root);
        let mut config = Config::new(&root);
        config.api_key = Some(API_KEY.into());
        config.keep_history = true;
        config.max_sandboxes = 200;
        configure(&mut config);
        let server = Sandboxd::start(config).await.expect("the sandbox server");
        Provider { server, root }
    }

    /// The operator's settings that make this server its default provider, under its
    /// own instance name.
    fn settings(&self, instance: &str) -> Vec<(String, String)> {
        [
            ("SANDCASTLE_PROVIDER", "e2b".to_string()),
            ("E2B_API_URL", self.server.api_url()),
            ("E2B_SANDBOX_URL", self.server.sandbox_url()),
            ("E2B_API_KEY", API_KEY.to_string()),
            ("SANDCASTLE_INSTANCE", instance.to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }

    fn client(&self) -> E2bClient {
        E2bClient::new(ClientConfig::with_urls(
            self.server.api_url(),
            self.server.sandbox_url(),
            API_KEY,
        ))
        .expect("client")
    }

    async fn live(&self) -> usize {
        self.client()
            .list_sandboxes(&ListQuery::default())
            .await
            .expect("list sandboxes")
            .len()
    }

    /// The server's record, by task UID.
    fn lives_by_task(&self) -> BTreeMap<String, Vec<SandboxLife>> {
        let mut by_task: BTreeMap<String, Vec<SandboxLife>> = BTreeMap::new();
        for life in self.server.history() {
            let uid = life.metadata.get(TASK_UID).cloned().unwrap_or_default();
            by_task.entry(uid).or_default().push(life);
        }
        by_task
    }

    /// Waits until the server has no live sandbox (the operator kills what it is done
    /// with, its sweep what it lost track of); the number still alive after `wait`.
    async fn settle(&self, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        loop {
            let live = self.live().await;
            if live == 0 || Instant::now() >= deadline {
                return live;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stop(self) {
        self.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Whether two of these lives overlapped.
fn overlapping(lives: &[SandboxLife]) -> bool {
    lives.iter().enumerate().any(|(i, a)| {
        lives[i + 1..].iter().any(|b| {
            let a_end = a.ended.unwrap_or_else(Instant::now);
            let b_end = b.ended.unwrap_or_else(Instant::now);
            a.created < b_end && b.created < a_end
        })
    })
}

/// A namespace watched by an operator of its own whose default provider is `provider`,
/// with the adopted `base` template Ready.
async fn setup(
    env: &TestEnv,
    prefix: &str,
    provider: &Provider,
    extra: &[(&str, &str)],
) -> (String, Operator, Api<AgentTask>) {
    let ns = env.namespace(prefix).await;
    let mut settings = provider.settings(prefix);
    settings.extend(
        extra
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string())),
    );
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let operator = Operator::start_with(env.kubeconfig_path(), &ns, &settings);
    adopt_base(&env.client, &ns).await;
    (
        ns.clone(),
        operator,
        Api::namespaced(env.client.clone(), &ns),
    )
}

async fn create_task(api: &Api<AgentTask>, name: &str, spec: serde_json::Value) -> AgentTask {
    let task: AgentTask = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a task");
    api.create(&PostParams::default(), &task)
        .await
        .unwrap_or_else(|err| panic!("create task {name}: {err}"))
}

fn finished(status: Option<&AgentTaskStatus>) -> bool {
    matches!(
        status.and_then(|status| status.phase),
        Some(TaskPhase::Succeeded | TaskPhase::Failed)
    )
}

/// The reasons of the namespace's Warning events about tasks, with how often each was
/// given: why attempts were retried, among others.
async fn warnings(env: &TestEnv, ns: &str) -> BTreeMap<String, usize> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), ns);
    let mut reasons = BTreeMap::new();
    for event in api
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
    {
        if event.type_.as_deref() == Some("Warning")
            && event.regarding.and_then(|object| object.kind).as_deref() == Some("AgentTask")
        {
            *reasons.entry(event.reason.unwrap_or_default()).or_default() +=
                event.deprecated_count.unwrap_or(1).max(1) as usize;
        }
    }
    reasons
}

async fn tasks(api: &Api<AgentTask>) -> Vec<AgentTask> {
    api.list(&ListParams::default())
        .await
        .expect("list tasks")
        .items
}

/// How many tasks have not reached Succeeded or Failed.
async fn open_tasks(api: &Api<AgentTask>) -> usize {
    tasks(api)
        .await
        .iter()
        .filter(|task| !finished(task.status.as_ref()))
        .count()
}

/// A command agent that sleeps, then leaves files naming its task and appends a line to
/// `runs.log`, so a second run in the same sandbox shows in that file's size.
fn identifying_task(name: &str, sleep: Duration) -> serde_json::Value {
    json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sh", "-c", format!(
            "echo run >> runs.log; sleep {:.1}; mkdir -p out; echo {name} > out/{name}.txt; echo {name} > id.txt; echo done {name}",
            sleep.as_secs_f64()
        )]}},
    })
}

/// What the agent of [`identifying_task`] reports when it ran once and finished.
fn true_outcome(name: &str) -> (String, Vec<(String, i64)>) {
    let line = name.len() as i64 + 1;
    (
        format!("done {name}\n"),
        vec![
            ("id.txt".to_string(), line),
            (format!("out/{name}.txt"), line),
            ("runs.log".to_string(), 4),
        ],
    )
}

/// How a finished task compares with the truth: `None` when it reports its true result
/// and exactly its files.
fn misreport(task: &AgentTask) -> Option<String> {
    let name = task.metadata.name.clone().unwrap_or_default();
    let status = task.status.clone().unwrap_or_default();
    let (text, files) = true_outcome(&name);
    let reported: Vec<(String, i64)> = status
        .files
        .iter()
        .map(|file| (file.path.clone(), file.size))
        .collect();
    let result = status.result.clone().unwrap_or_default();
    if status.phase == Some(TaskPhase::Succeeded)
        && result.text == text
        && result.exit_code == Some(0)
        && reported == files
    {
        None
    } else {
        Some(format!(
            "{name}: {:?}/{:?} {:?}, result {:?}, files {reported:?}",
            status.phase, status.reason, status.message, result.text
        ))
    }
}
