//! The peer beside Sandcastle: kubernetes-sigs/agent-sandbox's controller (built from its
//! Go module by `tools/peers/build.sh`) on the same control plane, given a burst of
//! SandboxClaims of the same size as Sandcastle's burst of AgentTasks. A claim's first
//! downstream action is the Sandbox the claim controller creates for it (named after the
//! claim); a task's is the sandbox create at the provider.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use sandcastle_testkit::agent_sandbox;
use sandcastle_testkit::localcluster::LocalCluster;
use sandcastle_testkit::sightings::Sightings;
use serde_json::{Value, json};

use super::{
    Burst, Memory, Spread, cpu_time, create_burst, die_with_parent, mib, millis, ms, namespace,
};

pub enum Outcome {
    Skipped(String),
    /// Why the peer could not be built or run.
    Failed(String),
    Ran(Figures),
}

pub struct Figures {
    claims: usize,
    to_sandbox: Spread,
    to_sandbox_max: Duration,
    /// From the first claim sent to the last Sandbox seen.
    seconds: f64,
    idle: Memory,
    after: Memory,
    cpu: Duration,
}

pub async fn run(cluster: &LocalCluster, client: &kube::Client, claims: usize) -> Outcome {
    let dir = match agent_sandbox::build() {
        Ok(dir) => dir,
        Err(reason) => return Outcome::Failed(reason),
    };
    match measure(cluster, client, &dir, claims).await {
        Ok(figures) => Outcome::Ran(figures),
        Err(reason) => Outcome::Failed(reason),
    }
}

async fn measure(
    cluster: &LocalCluster,
    client: &kube::Client,
    dir: &Path,
    claims: usize,
) -> Result<Figures, String> {
    agent_sandbox::install_crds(client, dir).await?;
    let ns = "peer";
    namespace(client, ns).await;
    let templates = agent_sandbox::resource("SandboxTemplate", "sandboxtemplates");
    let pools = agent_sandbox::resource("SandboxWarmPool", "sandboxwarmpools");
    let claim_resource = agent_sandbox::resource("SandboxClaim", "sandboxclaims");
    let sandboxes = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("agents.x-k8s.io", "v1beta1", "Sandbox"),
        "sandboxes",
    );
    let create = |resource: &ApiResource, object: DynamicObject| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
        async move {
            api.create(&Default::default(), &object)
                .await
                .map_err(|error| {
                    format!(
                        "creating a {}: {error}",
                        object.types.map(|t| t.kind).unwrap_or_default()
                    )
                })
        }
    };
    let pod = json!({"spec": {"containers": [{"name": "sandbox", "image": "busybox"}]}});
    create(
        &templates,
        agent_sandbox::object(&templates, "bench", json!({"podTemplate": pod})),
    )
    .await?;
    // An empty pool: every claim is a cold start from the pool's template, as a task is.
    let pool = json!({"replicas": 0, "sandboxTemplateRef": {"name": "bench"}});
    create(&pools, agent_sandbox::object(&pools, "bench", pool)).await?;

    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent-sandbox-controller.log");
    let log_file = std::fs::File::create(&log).map_err(|error| error.to_string())?;
    let mut command = agent_sandbox::controller(dir, cluster.kubeconfig_path());
    command
        .stdout(log_file.try_clone().map_err(|error| error.to_string())?)
        .stderr(log_file);
    die_with_parent(&mut command);
    let mut controller = command
        .spawn()
        .map_err(|error| format!("starting the peer: {error}"))?;
    let outcome = burst(
        client,
        ns,
        &claim_resource,
        &sandboxes,
        controller.id(),
        claims,
    )
    .await;
    let _ = controller.kill();
    let _ = controller.wait();
    outcome.map_err(|error| format!("{error} (its log: {})", log.display()))
}

async fn burst(
    client: &kube::Client,
    ns: &str,
    claim_resource: &ApiResource,
    sandbox_resource: &ApiResource,
    pid: u32,
    claims: usize,
) -> Result<Figures, String> {
    let claim_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, claim_resource);
    let sandbox_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, sandbox_resource);
    let seen = Sightings::watch(sandbox_api, |_: &DynamicObject| Some(true)).await;
    let claim = |name: &str| {
        agent_sandbox::object(
            claim_resource,
            name,
            json!({"warmPoolRef": {"name": "bench"}}),
        )
    };
    // The warm-up claim shows the controller's caches are in and its workers running, as
    // the adopted template does for Sandcastle.
    create_burst(&claim_api, vec![claim("warm-up")], |_| {}).await;
    seen.wait_for(1, Duration::from_secs(60))
        .await
        .map_err(|error| format!("the peer created no Sandbox for its warm-up claim: {error}"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Memory::of(pid);
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let objects = (0..claims)
        .map(|index| claim(&format!("claim-{index:05}")))
        .collect();
    let created = create_burst(&claim_api, objects, |_| {}).await;
    let sandboxes = seen
        .wait_for(claims + 1, Duration::from_secs(120))
        .await
        .map_err(|error| format!("the peer's Sandboxes: {error}"))?;
    let seconds = created
        .iter()
        .map(|claim| sandboxes[&claim.name].0)
        .max()
        .map_or(0.0, |last| (last - started).as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let to_sandbox: Vec<Duration> = created
        .iter()
        .map(|claim| {
            sandboxes[&claim.name]
                .0
                .saturating_duration_since(claim.answered)
        })
        .collect();
    eprintln!("peer: {claims} claims in {seconds:.2} s");
    Ok(Figures {
        claims,
        to_sandbox_max: to_sandbox.iter().copied().max().unwrap_or_default(),
        to_sandbox: Spread::of(to_sandbox),
        seconds,
        idle,
        after: Memory::of(pid),
        cpu: cpu_time(pid) - cpu_before,
    })
}

impl Outcome {
    /// The report's row: the peer's figures beside Sandcastle's from `ours`.
    pub fn row(&self, ours: &Burst) -> (String, String, String) {
        let what = format!(
            "(g) peer: agent-sandbox {} SandboxClaim controller",
            agent_sandbox::VERSION
        );
        let sandcastle = format!(
            "Sandcastle, {} tasks: created → sandbox create p50 {}, p99 {}; RSS {:.1} MiB (idle {:.1}), {:.2} CPU-s",
            ours.tasks,
            ms(ours.to_sandbox.p50),
            ms(ours.to_sandbox.p99),
            mib(ours.after.rss),
            mib(ours.before.rss),
            ours.cpu.as_secs_f64()
        );
        match self {
            Outcome::Skipped(why) => (what, format!("not run: {why}"), sandcastle),
            Outcome::Failed(why) => (what, format!("did not run: {why}"), sandcastle),
            Outcome::Ran(peer) => (
                format!("{what}, {} claims in one burst", peer.claims),
                format!(
                    "claim created → its Sandbox created p50 {}, p99 {}, all in {:.2} s; RSS {:.1} MiB (idle {:.1}), {:.2} CPU-s",
                    ms(peer.to_sandbox.p50),
                    ms(peer.to_sandbox.p99),
                    peer.seconds,
                    mib(peer.after.rss),
                    mib(peer.idle.rss),
                    peer.cpu.as_secs_f64()
                ),
                sandcastle,
            ),
        }
    }

    pub fn json(&self) -> Value {
        match self {
            Outcome::Skipped(why) => json!({"ran": false, "skipped": why}),
            Outcome::Failed(why) => json!({"ran": false, "failed": why}),
            Outcome::Ran(peer) => json!({
                "ran": true,
                "controller": format!("sigs.k8s.io/agent-sandbox {}, --extensions", agent_sandbox::VERSION),
                "claims": peer.claims,
                "createdToFirstDownstream": {
                    "p50Ms": millis(peer.to_sandbox.p50),
                    "p99Ms": millis(peer.to_sandbox.p99),
                    "maxMs": millis(peer.to_sandbox_max),
                },
                "seconds": peer.seconds,
                "rssMiB": mib(peer.after.rss),
                "peakMiB": mib(peer.after.peak),
                "idleRssMiB": mib(peer.idle.rss),
                "cpuSeconds": peer.cpu.as_secs_f64(),
            }),
        }
    }
}
