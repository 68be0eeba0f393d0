//! Sandboxes as pods on a real node (tools/node), beside kubernetes-sigs/agent-sandbox on
//! the same node, in the same run. Run with `cargo bench --bench pods` (root; after
//! `scripts/setup`). For each burst size in `SANDCASTLE_BENCH_POD_BURSTS` (10,50):
//!
//! - the sandbox server's kubernetes runtime (in this process): that many sandbox creates
//!   at once, each timed from its request to envd answering a `true` in the new pod;
//! - agent-sandbox's controller: that many SandboxClaims at once, each timed from its
//!   create being answered to its pod Ready (seen by a watch);
//! - the operator (the release binary, its provider the server above): that many
//!   AgentTasks at once, each timed from its create being answered to the task Running
//!   (its agent started in its pod).
//!
//! Both sides run the same image (`sandbox-full`, cached on the node) with the same
//! requests (10m CPU, 128 MiB), in namespaces without Pod Security enforcement. A
//! sandbox of the server is more than a pod: an init container copies envd in, a Secret
//! holds its token, a NetworkPolicy fences it, and the create returns only once envd has
//! taken the sandbox's variables. The report is a markdown table on stdout and JSON in
//! `bench-pods.json` in the target directory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use sandcastle_api::{AgentTask, TaskPhase};
use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::config::ClientConfig;
use sandcastle_e2b::models::{BuildStatus, TemplateBuildRequest, TemplateBuildStart};
use sandcastle_sandboxd::{KubeConfig, KubeSandboxd};
use sandcastle_testkit::agent_sandbox;
use sandcastle_testkit::figures::{Spread, millis};
use sandcastle_testkit::node::Node;
use sandcastle_testkit::operator::Operator;
use sandcastle_testkit::sightings::Sightings;
use serde_json::{Value, json};

const API_KEY: &str = "pods-bench";
const SANDBOXES: &str = "bench-sandboxes";
const PEER: &str = "bench-peer";
const TASKS: &str = "bench-tasks";
const TEMPLATE: &str = "small";

struct Row {
    what: String,
    burst: usize,
    spread: Spread,
    all: Duration,
}

impl Row {
    fn of(what: &str, burst: usize, samples: Vec<Duration>, all: Duration) -> Row {
        Row {
            what: what.to_string(),
            burst,
            spread: Spread::of(samples),
            all,
        }
    }

    fn json(&self) -> Value {
        json!({
            "what": self.what, "burst": self.burst,
            "p50Ms": millis(self.spread.p50), "p99Ms": millis(self.spread.p99),
            "allSeconds": self.all.as_secs_f64(),
        })
    }
}

fn bursts() -> Vec<usize> {
    std::env::var("SANDCASTLE_BENCH_POD_BURSTS")
        .unwrap_or_else(|_| "10,50".into())
        .split(',')
        .map(|part| {
            part.trim()
                .parse()
                .unwrap_or_else(|_| panic!("SANDCASTLE_BENCH_POD_BURSTS: {part:?}"))
        })
        .collect()
}

async fn namespace(client: &kube::Client, name: &str) {
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("a namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("creating a namespace");
}

/// Waits until no pod is left in `ns`, so that a burst never shares the node with the
/// end of the one before.
async fn no_pods(client: &kube::Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !pods
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .is_empty()
    {
        assert!(Instant::now() < deadline, "pods in {ns} did not go");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// `burst` sandbox creates at once, each to envd answering in its pod.
async fn server_burst(e2b: &E2bClient, client: &kube::Client, burst: usize) -> Row {
    let started = Instant::now();
    let runs = (0..burst).map(|_| async {
        let t = Instant::now();
        let sandbox = e2b
            .create_sandbox(&SandboxSpec::new(TEMPLATE, Duration::from_secs(600)))
            .await
            .expect("a sandbox");
        let output = e2b.envd(&sandbox).run("true").await.expect("envd answers");
        assert_eq!(output.exit_code, 0);
        (t.elapsed(), sandbox.sandbox_id)
    });
    let done = join_all(runs).await;
    let all = started.elapsed();
    for (_, id) in &done {
        e2b.kill_sandbox(id).await.expect("kill");
    }
    no_pods(client, SANDBOXES).await;
    Row::of(
        "Sandcastle sandbox create → envd answers in its pod",
        burst,
        done.into_iter().map(|(took, _)| took).collect(),
        all,
    )
}

/// `burst` SandboxClaims at once, each to its pod Ready.
async fn peer_burst(client: &kube::Client, burst: usize, round: usize) -> Row {
    let claims: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        PEER,
        &agent_sandbox::resource("SandboxClaim", "sandboxclaims"),
    );
    let seen = Sightings::watch(Api::<Pod>::namespaced(client.clone(), PEER), |pod: &Pod| {
        ready(pod).then_some(true)
    })
    .await;
    let names: Vec<String> = (0..burst).map(|i| format!("r{round}-{i:03}")).collect();
    let resource = agent_sandbox::resource("SandboxClaim", "sandboxclaims");
    let started = Instant::now();
    let answered = join_all(names.iter().map(|name| {
        let claim =
            agent_sandbox::object(&resource, name, json!({"warmPoolRef": {"name": "bench"}}));
        let claims = claims.clone();
        async move {
            claims
                .create(&PostParams::default(), &claim)
                .await
                .expect("a claim");
            Instant::now()
        }
    }))
    .await;
    let pods = seen
        .wait_for(burst, Duration::from_secs(300))
        .await
        .unwrap_or_else(|error| panic!("the peer's pods: {error}"));
    let ready_at = |name: &str| {
        pods.iter()
            .find(|(pod, _)| pod.starts_with(name))
            .map(|(_, (at, _))| *at)
            .unwrap_or_else(|| panic!("no Ready pod for claim {name}: {:?}", pods.keys()))
    };
    let samples: Vec<Duration> = names
        .iter()
        .zip(&answered)
        .map(|(name, at)| ready_at(name).saturating_duration_since(*at))
        .collect();
    let all = names
        .iter()
        .map(|name| ready_at(name))
        .max()
        .map_or(Duration::ZERO, |last| last - started);
    claims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("deleting the claims");
    no_pods(client, PEER).await;
    Row::of(
        &format!(
            "agent-sandbox {} SandboxClaim → its pod Ready",
            agent_sandbox::VERSION
        ),
        burst,
        samples,
        all,
    )
}

/// `burst` AgentTasks at once, each to Running (its agent started in its pod).
async fn task_burst(client: &kube::Client, burst: usize, round: usize) -> Row {
    let tasks: Api<AgentTask> = Api::namespaced(client.clone(), TASKS);
    let seen = Sightings::watch(tasks.clone(), |task: &AgentTask| {
        matches!(
            task.status.as_ref().and_then(|s| s.phase),
            Some(TaskPhase::Running | TaskPhase::Succeeded)
        )
        .then_some(true)
    })
    .await;
    let names: Vec<String> = (0..burst).map(|i| format!("r{round}-{i:03}")).collect();
    let started = Instant::now();
    let answered = join_all(names.iter().map(|name| {
        let task: AgentTask = serde_json::from_value(json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": name},
            "spec": {"templateRef": {"name": TEMPLATE},
                     "agent": {"command": {"command": ["sleep", "5"]}}},
        }))
        .expect("a task");
        let tasks = tasks.clone();
        async move {
            tasks
                .create(&PostParams::default(), &task)
                .await
                .expect("a task");
            Instant::now()
        }
    }))
    .await;
    let running = seen
        .wait_for(burst, Duration::from_secs(300))
        .await
        .unwrap_or_else(|error| panic!("tasks Running: {error}"));
    let samples: Vec<Duration> = names
        .iter()
        .zip(&answered)
        .map(|(name, at)| running[name].0.saturating_duration_since(*at))
        .collect();
    let all = names
        .iter()
        .map(|name| running[name].0)
        .max()
        .map_or(Duration::ZERO, |last| last - started);
    tasks
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("deleting the tasks");
    no_pods(client, SANDBOXES).await;
    Row::of(
        "Sandcastle AgentTask created → Running (agent started in its pod)",
        burst,
        samples,
        all,
    )
}

#[tokio::main]
async fn main() {
    let bursts = bursts();
    let mut node =
        Node::start("bench-pods").unwrap_or_else(|err| panic!("cannot start a node: {err}"));
    let client = node.client().await.expect("a client");
    let envd_image = node
        .push_operator_image(&sandcastle_testkit::operator_binary(), "bench")
        .unwrap_or_else(|err| panic!("{err}"));
    // The image the node test pushes (with the Claude Code CLI), so the two never
    // rebuild it in turn.
    node.push_sandbox_images(Some(&sandcastle_testkit::claude_native()))
        .unwrap_or_else(|err| panic!("{err}"));
    let base = format!("{}/sandbox-full:latest", node.registry());
    for ns in [SANDBOXES, PEER, TASKS] {
        namespace(&client, ns).await;
    }

    let mut config = KubeConfig::new(SANDBOXES, envd_image);
    config.base_image = base.clone();
    config.listen = node.ip();
    config.api_key = Some(API_KEY.into());
    config.cpu_request_fraction = 0.01;
    config.max_sandboxes = 500;
    let server = KubeSandboxd::start(config, client.clone())
        .await
        .expect("the sandbox server");
    let e2b = E2bClient::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        API_KEY,
    ))
    .expect("a client");
    // One CPU and the least memory, so that 50 fit on the node; settings only, so no image
    // is built.
    let request = e2b
        .request_build(&TemplateBuildRequest {
            name: Some(TEMPLATE.into()),
            cpu_count: Some(1),
            memory_mb: Some(128),
            ..TemplateBuildRequest::default()
        })
        .await
        .expect("a template");
    e2b.start_build(
        &request.template_id,
        &request.build_id,
        &TemplateBuildStart {
            from_template: Some("base".into()),
            ..TemplateBuildStart::default()
        },
    )
    .await
    .expect("a build");
    let built = e2b
        .wait_for_build(
            &request.template_id,
            &request.build_id,
            Duration::from_millis(100),
            Duration::from_secs(30),
        )
        .await
        .expect("the build ends");
    assert_eq!(built.status, BuildStatus::Ready, "{built:?}");

    let peer_dir = agent_sandbox::build().unwrap_or_else(|err| panic!("the peer: {err}"));
    agent_sandbox::install_crds(&client, &peer_dir)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let create = |kind: &str, plural: &str, name: &str, spec: Value| {
        let resource = agent_sandbox::resource(kind, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), PEER, &resource);
        let object = agent_sandbox::object(&resource, name, spec);
        async move {
            api.create(&PostParams::default(), &object)
                .await
                .expect("a peer object")
        }
    };
    let pod = json!({"spec": {"containers": [{
        "name": "sandbox", "image": base, "command": ["sleep", "infinity"],
        "resources": {"requests": {"cpu": "10m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "128Mi"}},
    }]}});
    create(
        "SandboxTemplate",
        "sandboxtemplates",
        "bench",
        json!({"podTemplate": pod}),
    )
    .await;
    // An empty pool: every claim is a cold start from the template, as a sandbox is.
    create(
        "SandboxWarmPool",
        "sandboxwarmpools",
        "bench",
        json!({"replicas": 0, "sandboxTemplateRef": {"name": "bench"}}),
    )
    .await;
    let log =
        std::fs::File::create(node.dir().join("agent-sandbox-controller.log")).expect("a log file");
    let mut peer = agent_sandbox::controller(&peer_dir, node.kubeconfig_path())
        .stdout(log.try_clone().expect("the log"))
        .stderr(log)
        .spawn()
        .expect("the peer controller");

    sandcastle_api::install(&client)
        .await
        .expect("Sandcastle's CRDs");
    let mut operator = Operator::start_args(
        node.kubeconfig_path(),
        TASKS,
        ["run", "--namespace", TASKS]
            .into_iter()
            .map(String::from)
            .collect(),
        &[
            // Every task of a burst holds a sandbox at once: the figure is the start,
            // not the queue behind the default 20.
            ("SANDCASTLE_MAX_RUNNING_TASKS", "500"),
            ("SANDCASTLE_PROVIDER", "e2b"),
            ("E2B_API_URL", &server.api_url()),
            ("E2B_SANDBOX_URL", &server.sandbox_url()),
            ("E2B_API_KEY", API_KEY),
        ],
    );
    let adopt: sandcastle_api::SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": TEMPLATE}, "spec": {"existing": {"templateId": TEMPLATE}},
    }))
    .expect("a template");
    Api::<sandcastle_api::SandboxTemplate>::namespaced(client.clone(), TASKS)
        .create(&PostParams::default(), &adopt)
        .await
        .expect("adopting the template");

    // A warm-up of each, so that first-use costs are in no figure.
    server_burst(&e2b, &client, 1).await;
    peer_burst(&client, 1, 0).await;
    task_burst(&client, 1, 0).await;

    let mut rows = Vec::new();
    for (round, &burst) in bursts.iter().enumerate() {
        let round = round + 1;
        rows.push(server_burst(&e2b, &client, burst).await);
        rows.push(peer_burst(&client, burst, round).await);
        rows.push(task_burst(&client, burst, round).await);
    }

    println!("| what | burst | p50 | p99 | all in |");
    println!("|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.2} s |",
            row.what,
            row.burst,
            millis(row.spread.p50),
            millis(row.spread.p99),
            row.all.as_secs_f64()
        );
    }
    let mut ratios = BTreeMap::new();
    for burst in &bursts {
        let of = |prefix: &str| {
            rows.iter()
                .find(|row| row.burst == *burst && row.what.starts_with(prefix))
                .expect("a row")
                .spread
        };
        let (ours, peer) = (of("Sandcastle sandbox"), of("agent-sandbox"));
        let ratio = millis(ours.p50) / millis(peer.p50);
        println!(
            "burst {burst}: Sandcastle's sandbox p50 is {ratio:.2}× agent-sandbox's claim → pod Ready p50 (p99 {:.2}×)",
            millis(ours.p99) / millis(peer.p99)
        );
        ratios.insert(burst.to_string(), ratio);
    }
    let report = json!({
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "p50RatioToPeer": ratios,
    });
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("bench-pods.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("JSON")).expect("the report");
    println!("JSON in {}", out.display());

    operator.kill();
    let _ = peer.kill();
    let _ = peer.wait();
    server.stop().await;
    drop(client);
    node.stop().unwrap_or_else(|err| panic!("{err}"));
    let report = node.check_clean();
    assert!(report.is_ok(), "the node left things behind: {report:?}");
}
