//! Sandboxes as pods on a real node (tools/node), beside kubernetes-sigs/agent-sandbox on
//! the same node, in the same run. Run with `cargo bench --bench pods` (root; after
//! `scripts/setup`). For each burst size in `SANDCASTLE_BENCH_POD_BURSTS` (10,50):
//!
//! - cold, the sandbox server's kubernetes runtime (in this process): that many sandbox
//!   creates at once, each timed from its request to envd answering a `true` in the new
//!   pod; then those sandboxes, marked warm, claimed at once as a task claims one from a
//!   pool;
//! - cold, agent-sandbox's controller: that many SandboxClaims at once from an empty
//!   pool, each timed from its create being answered to its pod Ready (seen by a watch);
//! - cold, the operator (the release binary, its provider the server above): that many
//!   AgentTasks at once, each timed from its create being answered to the task Running
//!   (its agent started in its pod);
//! - warm, agent-sandbox: its SandboxWarmPool at `SANDCASTLE_BENCH_POD_POOL` (20) Ready
//!   sandboxes, then the burst's claims at once, each to the claim's Ready condition (a
//!   burst larger than the pool waits for pods started for it);
//! - warm, the operator: a template whose pool holds as many, then the burst's
//!   AgentTasks at once, each to Running (a burst larger than the pool creates the rest).
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
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use sandcastle_api::SandboxTemplate;
use sandcastle_api::names::{POOL_WARM_MARK, pool_claim_mark};
use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::config::ClientConfig;
use sandcastle_e2b::models::{BuildStatus, TemplateBuildRequest, TemplateBuildStart};
use sandcastle_sandboxd::{KubeConfig, KubeSandboxd};
use sandcastle_testkit::figures::{Spread, millis};
use sandcastle_testkit::node::Node;
use sandcastle_testkit::operator::Operator;
use sandcastle_testkit::sightings::Sightings;
use sandcastle_testkit::{agent_sandbox, bursts};
use serde_json::{Value, json};

const API_KEY: &str = "pods-bench";
const SANDBOXES: &str = "bench-sandboxes";
const PEER: &str = "bench-peer";
const TASKS: &str = "bench-tasks";
const TEMPLATE: &str = "small";
const WARM: &str = "warm";
const SLEEP: &[&str] = &["sleep", "5"];

/// Which measure a row is, for the ratios.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Create,
    Claim,
    Peer,
    WarmPeer,
    Task,
    WarmTask,
}

struct Row {
    kind: Kind,
    what: String,
    burst: usize,
    spread: Spread,
    all: Duration,
}

impl Row {
    fn of(kind: Kind, what: &str, burst: usize, samples: Vec<Duration>, all: Duration) -> Row {
        Row {
            kind,
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

/// `burst` sandbox creates at once, each to envd answering in its pod; then the same
/// sandboxes, marked warm, claimed at once as a task claims one from a pool (the mark
/// renamed inside the sandbox through envd, then its lifetime set).
async fn server_burst(e2b: &E2bClient, client: &kube::Client, burst: usize) -> Vec<Row> {
    let started = Instant::now();
    let runs = (0..burst).map(|_| async {
        let t = Instant::now();
        let sandbox = e2b
            .create_sandbox(&SandboxSpec::new(TEMPLATE, Duration::from_secs(600)))
            .await
            .expect("a sandbox");
        let output = e2b.envd(&sandbox).run("true").await.expect("envd answers");
        assert_eq!(output.exit_code, 0);
        (t.elapsed(), sandbox)
    });
    let done = join_all(runs).await;
    let all = started.elapsed();
    join_all(done.iter().map(|(_, sandbox)| async move {
        e2b.envd(sandbox)
            .make_dir(POOL_WARM_MARK)
            .await
            .expect("the warm mark")
    }))
    .await;
    let started = Instant::now();
    let claimed = join_all(done.iter().enumerate().map(|(n, (_, sandbox))| async move {
        let t = Instant::now();
        e2b.envd(sandbox)
            .rename(POOL_WARM_MARK, &pool_claim_mark(&format!("uid-{n}")))
            .await
            .expect("the claim holds");
        e2b.set_timeout(&sandbox.sandbox_id, Duration::from_secs(600))
            .await
            .expect("the claimed sandbox's lifetime");
        t.elapsed()
    }))
    .await;
    let all_claimed = started.elapsed();
    for (_, sandbox) in &done {
        e2b.kill_sandbox(&sandbox.sandbox_id).await.expect("kill");
    }
    no_pods(client, SANDBOXES).await;
    vec![
        Row::of(
            Kind::Create,
            "Sandcastle sandbox create → envd answers in its pod",
            burst,
            done.into_iter().map(|(took, _)| took).collect(),
            all,
        ),
        Row::of(
            Kind::Claim,
            "Sandcastle warm sandbox claimed (mark renamed through envd, lifetime set)",
            burst,
            claimed,
            all_claimed,
        ),
    ]
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
        Kind::Peer,
        &format!(
            "agent-sandbox {} SandboxClaim (empty pool) → its pod Ready",
            agent_sandbox::VERSION
        ),
        burst,
        samples,
        all,
    )
}

/// `burst` AgentTasks at once, each to Running (its agent started in its pod).
async fn task_burst(client: &kube::Client, burst: usize, round: usize) -> Row {
    let done =
        bursts::task_burst(client, TASKS, TEMPLATE, SLEEP, burst, &format!("r{round}")).await;
    no_pods(client, SANDBOXES).await;
    Row::of(
        Kind::Task,
        "Sandcastle AgentTask created → Running (agent started in its pod)",
        burst,
        done.samples,
        done.all,
    )
}

/// The same burst of tasks of a template whose pool holds `pool` warm sandboxes, once
/// the pool is full.
async fn warm_task_burst(
    client: &kube::Client,
    operator: &Operator,
    pool: usize,
    burst: usize,
    round: usize,
) -> Row {
    // The pool's status is written as a pass ends, so right after a burst it still shows
    // the pool from before the burst's claims: two pass intervals let the last burst's
    // tasks end and a pass that began after them write what is left.
    tokio::time::sleep(Duration::from_secs(10)).await;
    pool_full(client, pool).await;
    let claims = || async {
        operator
            .metric(r#"sandcastle_pool_claims_total{result="warm"}"#)
            .await
            .unwrap_or(0.0) as usize
    };
    let before = claims().await;
    let done = bursts::task_burst(client, TASKS, WARM, SLEEP, burst, &format!("w{round}")).await;
    let taken = claims().await - before;
    Row::of(
        Kind::WarmTask,
        &format!(
            "Sandcastle AgentTask created → Running, pool of {pool} ({taken} warm, {} cold)",
            burst - taken
        ),
        burst,
        done.samples,
        done.all,
    )
}

/// Waits until the pooled template's pool holds `pool` ready sandboxes and no claimed
/// one (the last burst's are gone).
async fn pool_full(client: &kube::Client, pool: usize) {
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), TASKS);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let template = templates.get(WARM).await.expect("the pooled template");
        let state = template.status.and_then(|status| status.pool);
        if state
            .as_ref()
            .is_some_and(|state| state.ready as usize == pool && state.claimed == 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not fill: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `burst` SandboxClaims at once from the peer's pool once it holds `pool` Ready
/// sandboxes, each timed from its create being answered to the claim's own Ready
/// condition (its pod was Ready before it was asked for).
async fn warm_peer_burst(client: &kube::Client, pool: usize, burst: usize, round: usize) -> Row {
    let pools: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        PEER,
        &agent_sandbox::resource("SandboxWarmPool", "sandboxwarmpools"),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = pools.get("bench").await.expect("the peer's pool").data["status"].clone();
        if status["readyReplicas"].as_u64() == Some(pool as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peer's pool did not fill: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resource = agent_sandbox::resource("SandboxClaim", "sandboxclaims");
    let claims: Api<DynamicObject> = Api::namespaced_with(client.clone(), PEER, &resource);
    let seen = Sightings::watch(claims.clone(), |claim: &DynamicObject| {
        claim.data["status"]["conditions"]
            .as_array()
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .then_some(true)
    })
    .await;
    let names: Vec<String> = (0..burst).map(|i| format!("w{round}-{i:03}")).collect();
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
    let ready = seen
        .wait_for(burst, Duration::from_secs(300))
        .await
        .unwrap_or_else(|error| panic!("the peer's claims Ready: {error}"));
    let samples = names
        .iter()
        .zip(&answered)
        .map(|(name, at)| ready[name].0.saturating_duration_since(*at))
        .collect();
    let all = names
        .iter()
        .map(|name| ready[name].0)
        .max()
        .map_or(Duration::ZERO, |last| last - started);
    claims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("deleting the claims");
    Row::of(
        Kind::WarmPeer,
        &format!(
            "agent-sandbox {} SandboxClaim from a warm pool of {pool} → claim Ready",
            agent_sandbox::VERSION
        ),
        burst,
        samples,
        all,
    )
}

/// Sets the peer's pool size.
async fn scale_peer_pool(client: &kube::Client, replicas: usize) {
    let pools: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        PEER,
        &agent_sandbox::resource("SandboxWarmPool", "sandboxwarmpools"),
    );
    pools
        .patch(
            "bench",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scaling the peer's pool");
}

#[tokio::main]
async fn main() {
    let bursts = bursts();
    let pool: usize = std::env::var("SANDCASTLE_BENCH_POD_POOL")
        .unwrap_or_else(|_| "20".into())
        .parse()
        .expect("SANDCASTLE_BENCH_POD_POOL: a number");
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
        rows.extend(server_burst(&e2b, &client, burst).await);
        rows.push(peer_burst(&client, burst, round).await);
        rows.push(task_burst(&client, burst, round).await);
    }

    // Warm: each side's pool filled on a node that holds nothing else of the other's.
    scale_peer_pool(&client, pool).await;
    for (round, &burst) in bursts.iter().enumerate() {
        rows.push(warm_peer_burst(&client, pool, burst, round + 1).await);
    }
    scale_peer_pool(&client, 0).await;
    no_pods(&client, PEER).await;
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), TASKS);
    let pooled: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": WARM},
        "spec": {"existing": {"templateId": TEMPLATE}, "pool": {"size": pool}},
    }))
    .expect("a template");
    templates
        .create(&PostParams::default(), &pooled)
        .await
        .expect("the pooled template");
    for (round, &burst) in bursts.iter().enumerate() {
        rows.push(warm_task_burst(&client, &operator, pool, burst, round + 1).await);
    }
    templates
        .delete(WARM, &DeleteParams::default())
        .await
        .expect("deleting the pooled template");
    no_pods(&client, SANDBOXES).await;

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
        let of = |kind: Kind| {
            rows.iter()
                .find(|row| row.burst == *burst && row.kind == kind)
                .expect("a row")
                .spread
        };
        for (ours, peer, label) in [
            (
                Kind::Create,
                Kind::Peer,
                "cold: sandbox create vs claim → pod Ready",
            ),
            (
                Kind::WarmTask,
                Kind::WarmPeer,
                "warm: AgentTask → Running vs claim → Ready",
            ),
            (
                Kind::Claim,
                Kind::WarmPeer,
                "warm: sandbox claim vs claim → Ready",
            ),
        ] {
            let (ours, peer) = (of(ours), of(peer));
            let ratio = millis(ours.p50) / millis(peer.p50);
            println!(
                "burst {burst}, {label}: Sandcastle p50 is {ratio:.2}× agent-sandbox's (p99 {:.2}×)",
                millis(ours.p99) / millis(peer.p99)
            );
            ratios.insert(format!("{burst} {label}"), ratio);
        }
    }
    let report = json!({
        "pool": pool,
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
