//! Warm pools on the local runtime, warm against cold in the same run. Run with
//! `cargo bench --bench pools` (after `scripts/setup`). Two parts:
//!
//! - **E2B, no operator:** a burst of sandbox creates on the embedded server, each timed
//!   from its request to its answer, against the same burst of claims of warm sandboxes
//!   made beforehand (the claim a task makes: its mark renamed inside the sandbox through
//!   envd, then its lifetime set), each timed the same way;
//! - **AgentTasks:** the operator (the release binary, its embedded server) with a
//!   template whose pool holds `SANDCASTLE_BENCH_POOL` (50) sandboxes, and the adopted
//!   `base` without a pool: bursts of `SANDCASTLE_BENCH_POOL_BURSTS` (10,50,80) tasks at
//!   once, each timed from its create being answered to the task Running (its agent
//!   started). A burst larger than the pool takes what the pool has and creates the rest.
//!
//! The report is a markdown table on stdout and JSON in `bench-pools.json` in the target
//! directory.

use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use sandcastle_api::SandboxTemplate;
use sandcastle_api::names::{POOL_WARM_MARK, pool_claim_mark};
use sandcastle_e2b::client::{ClientConfig, E2bClient, SandboxSpec};
use sandcastle_sandboxd::{Config, Sandboxd};
use sandcastle_testkit::base::adopt_base;
use sandcastle_testkit::bursts::task_burst;
use sandcastle_testkit::figures::{Spread, millis};
use sandcastle_testkit::localcluster::{LocalCluster, tools_bin_dir};
use sandcastle_testkit::operator::{Operator, wait_for_within};
use serde_json::{Value, json};

const NS: &str = "bench-pools";
const WARM: &str = "warm";
const COLD: &str = "base";
const SLEEP: &[&str] = &["sleep", "3"];

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn number(name: &str, text: &str) -> usize {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {text:?} is not a number"))
}

struct Row {
    what: String,
    burst: usize,
    spread: Spread,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "what": self.what, "burst": self.burst,
            "p50Ms": millis(self.spread.p50), "p99Ms": millis(self.spread.p99),
        })
    }
}

/// Each of `burst` calls at once, timed from its start to its answer.
async fn timed<F, T>(burst: usize, call: impl Fn(usize) -> F) -> Vec<Duration>
where
    F: std::future::Future<Output = T>,
{
    join_all((0..burst).map(|n| {
        let call = call(n);
        async move {
            let asked = Instant::now();
            call.await;
            asked.elapsed()
        }
    }))
    .await
}

/// Creates against claims on the embedded server, with no operator in between.
async fn e2b_rows(burst: usize) -> Vec<Row> {
    let root = std::env::temp_dir().join(format!("sandcastle-bench-pools-{}", std::process::id()));
    let mut config = Config::new(&root);
    config.max_sandboxes = 4 * burst + 10;
    let server = Sandboxd::start(config).await.expect("the embedded server");
    let e2b = E2bClient::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        "bench",
    ))
    .expect("a client");
    let spec = SandboxSpec::new("base", Duration::from_secs(600));
    // Warm the server's own paths once, so neither side pays for the first sandbox.
    let first = e2b.create_sandbox(&spec).await.expect("a sandbox");
    e2b.kill_sandbox(&first.sandbox_id).await.expect("kill");

    let created = timed(burst, |_| async {
        e2b.create_sandbox(&spec).await.expect("a create")
    })
    .await;
    let warm = join_all((0..burst).map(|_| async {
        let sandbox = e2b.create_sandbox(&spec).await.expect("a warm sandbox");
        e2b.envd(&sandbox)
            .make_dir(POOL_WARM_MARK)
            .await
            .expect("the warm mark");
        sandbox
    }))
    .await;
    let claimed = timed(burst, |n| {
        let (e2b, sandbox) = (e2b.clone(), warm[n].clone());
        async move {
            e2b.envd(&sandbox)
                .rename(POOL_WARM_MARK, &pool_claim_mark(&format!("uid-{n}")))
                .await
                .expect("the claim holds");
            e2b.set_timeout(&sandbox.sandbox_id, Duration::from_secs(600))
                .await
                .expect("the claimed sandbox's lifetime");
        }
    })
    .await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&root);
    vec![
        Row {
            what: "E2B create answered (cold)".into(),
            burst,
            spread: Spread::of(created),
        },
        Row {
            what: "warm sandbox claimed and its lifetime set (warm)".into(),
            burst,
            spread: Spread::of(claimed),
        },
    ]
}

#[tokio::main]
async fn main() {
    let pool = number(
        "SANDCASTLE_BENCH_POOL",
        &setting("SANDCASTLE_BENCH_POOL", "50"),
    );
    let bursts: Vec<usize> = setting("SANDCASTLE_BENCH_POOL_BURSTS", "10,50,80")
        .split(',')
        .map(|part| number("SANDCASTLE_BENCH_POOL_BURSTS", part))
        .collect();
    let mut rows = e2b_rows(pool).await;

    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let work = tmp.join("bench-pools");
    let cluster = LocalCluster::start(&tools_bin_dir(), &work)
        .await
        .expect("the control plane starts (scripts/setup builds it)");
    let client = cluster.client().await.expect("a client");
    sandcastle_api::install(&client).await.expect("CRDs");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("a namespace"),
        )
        .await
        .expect("the namespace");
    let operator = Operator::start_with(
        cluster.kubeconfig_path(),
        NS,
        &[
            ("SANDCASTLE_MAX_RUNNING_TASKS", "500"),
            ("SANDCASTLE_SANDBOXD_MAX_SANDBOXES", "500"),
        ],
    );
    adopt_base(&client, NS).await;
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), NS);
    let template: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": WARM},
        "spec": {"existing": {"templateId": "base"}, "pool": {"size": pool}},
    }))
    .expect("a template");
    templates
        .create(&PostParams::default(), &template)
        .await
        .expect("the pooled template");
    let full = |status: &sandcastle_api::SandboxTemplateStatus| {
        status
            .pool
            .as_ref()
            .is_some_and(|state| state.ready as usize == pool && state.claimed == 0)
    };
    // Counted by the operator, so each row says what its tasks really took.
    let claims = || async {
        operator
            .metric(r#"sandcastle_pool_claims_total{result="warm"}"#)
            .await
            .unwrap_or(0.0) as usize
    };
    for (round, &burst) in bursts.iter().enumerate() {
        wait_for_within(
            &templates,
            WARM,
            "a full pool",
            Duration::from_secs(300),
            full,
        )
        .await;
        let before = claims().await;
        let warm = task_burst(&client, NS, WARM, SLEEP, burst, &format!("w{round}")).await;
        let taken = claims().await - before;
        let before = claims().await;
        let cold = task_burst(&client, NS, COLD, SLEEP, burst, &format!("c{round}")).await;
        let stray = claims().await - before;
        assert_eq!(
            stray, 0,
            "tasks of the template without a pool took warm sandboxes"
        );
        rows.push(Row {
            what: format!(
                "AgentTask created → Running, pool of {pool} ({taken} warm, {} cold)",
                burst - taken
            ),
            burst,
            spread: Spread::of(warm.samples),
        });
        rows.push(Row {
            what: "AgentTask created → Running, no pool (all cold)".into(),
            burst,
            spread: Spread::of(cold.samples),
        });
    }
    let claims = claims().await;

    println!("| what | burst | p50 | p99 |\n|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.1} ms | {:.1} ms |",
            row.what,
            row.burst,
            millis(row.spread.p50),
            millis(row.spread.p99)
        );
    }
    println!("\nwarm claims counted by the operator: {claims}");
    let json_path = tmp
        .parent()
        .expect("the target directory")
        .join("bench-pools.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({
            "pool": pool,
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "warmClaims": claims,
        }))
        .expect("JSON"),
    )
    .expect("writing the JSON report");
    println!("JSON: {}", json_path.display());
    drop(operator);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&work);
}
