//! Sandboxes under gVisor: a real node on containerd 2 with gVisor's runsc as a second
//! runtime and the RuntimeClass `gvisor` (tools/node/build-gvisor.sh), and the sandbox
//! server's kubernetes runtime told to use it (`--runtime-class-name`). The sandbox's
//! kernel is gVisor's, the project's envd serves in it, the shared client scenarios pass
//! in it (template builds still run as kaniko Jobs under runc), NetworkPolicy still
//! fences it, and nothing is left at the end.
//!
//! Needs root and `scripts/setup`; fails (never skips) where a node cannot start.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::config::ClientConfig;
use sandcastle_sandboxd::{BuilderConfig, KubeConfig, KubeSandboxd};
use sandcastle_testkit::node::Node;
use sandcastle_testkit::scenarios;
use serde_json::json;

const NS: &str = "sandboxes";
const BUILDS: &str = "sandbox-builds";
const API_KEY: &str = "gvisor-key";
const MANAGED: &str = "app.kubernetes.io/managed-by=sandcastle-sandboxd";

#[test]
fn sandboxes_run_under_gvisor_on_a_real_node() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(steps());
}

async fn steps() {
    let mut node = Node::start_with_gvisor("gvisor")
        .unwrap_or_else(|err| panic!("cannot start a gVisor node: {err}"));
    let env = std::fs::read_to_string(node.dir().join("env")).expect("the node's env");
    assert!(env.contains("RUNTIME_CLASSES=gvisor"), "{env}");
    let client = node.client().await.expect("a client");
    let envd_image = node
        .push_operator_image(&sandcastle_testkit::operator_binary(), "gvisor")
        .unwrap_or_else(|err| panic!("{err}"));
    node.push_sandbox_images(Some(&sandcastle_testkit::claude_native()))
        .unwrap_or_else(|err| panic!("{err}"));
    let builder = node
        .push_builder_image()
        .unwrap_or_else(|err| panic!("{err}"));
    for (name, profile) in [(NS, "restricted"), (BUILDS, "baseline")] {
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": profile}},
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("a namespace");
    }

    let mut config = KubeConfig::new(NS, envd_image);
    config.base_image = format!("{}/sandbox-full:latest", node.registry_pod());
    config.runtime_class = Some("gvisor".into());
    config.builder = Some(BuilderConfig {
        image: builder,
        repository: format!("{}/templates", node.registry_pod()),
        insecure: true,
        namespace: BUILDS.into(),
        timeout: Duration::from_secs(600),
    });
    config.listen = node.ip();
    config.api_key = Some(API_KEY.into());
    config.server_labels = [("app".to_string(), "sandboxd".to_string())].into();
    config.denied_cidrs.push(format!("{}/32", node.ip()));
    config.cpu_request_fraction = 0.05;
    let server = KubeSandboxd::start(config, client.clone())
        .await
        .expect("the sandbox server");
    let client_config = ClientConfig::with_urls(server.api_url(), server.sandbox_url(), API_KEY);
    let e2b = E2bClient::new(client_config.clone()).expect("a client");

    // --- one sandbox, looked at from inside --------------------------------------------
    let t = Instant::now();
    let sandbox = e2b
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(300)))
        .await
        .expect("a sandbox under gVisor");
    let created = t.elapsed();
    let envd = e2b.envd(&sandbox);
    let inside = envd
        .run("dmesg | head -1; id -u; echo hi > /tmp/x && cat /tmp/x")
        .await
        .expect("envd answers");
    println!(
        "a gVisor sandbox answering envd {:.2} s after the create:\n{}",
        created.as_secs_f64(),
        inside.stdout
    );
    assert!(
        inside.stdout.contains("Starting gVisor"),
        "the sandbox's kernel is gVisor's: {inside:?}"
    );
    assert!(inside.stdout.ends_with("1000\nhi\n"), "{inside:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod = pods
        .get(&format!("sandbox-{}", sandbox.sandbox_id))
        .await
        .expect("the sandbox's pod");
    assert_eq!(
        pod.spec.and_then(|spec| spec.runtime_class_name).as_deref(),
        Some("gvisor")
    );
    let probe = format!(
        "timeout 3 bash -c '</dev/tcp/{}/6443' 2>/dev/null && echo apiserver-open || echo apiserver-closed; \
         getent hosts kubernetes.default.svc.cluster.local >/dev/null && echo dns-works || echo dns-fails",
        node.ip()
    );
    let fenced = envd.run(&probe).await.expect("the probe runs").stdout;
    assert_eq!(
        fenced, "apiserver-closed\ndns-works\n",
        "NetworkPolicy fences a gVisor sandbox too"
    );
    // Metrics come from envd reading its container's cgroup, which gVisor emulates.
    let metrics: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/sandboxes/{}/metrics",
            server.api_url(),
            sandbox.sandbox_id
        ))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("the metrics call")
        .json()
        .await
        .expect("metrics as JSON");
    println!("metrics under gVisor: {metrics}");
    let latest = &metrics[0];
    assert!(latest["memUsed"].as_u64() > Some(0), "{metrics}");
    assert!(
        latest["memTotal"].as_u64() >= latest["memUsed"].as_u64(),
        "{metrics}"
    );
    assert!(latest["cpuCount"].as_u64() >= Some(1), "{metrics}");
    assert!(e2b.kill_sandbox(&sandbox.sandbox_id).await.expect("kill"));
    // The image is on the node now: what a create costs under gVisor.
    let t = Instant::now();
    let again = e2b
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(300)))
        .await
        .expect("another sandbox");
    e2b.envd(&again).run("true").await.expect("envd answers");
    println!(
        "with the image cached: create → envd answers in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(e2b.kill_sandbox(&again.sandbox_id).await.expect("kill"));

    // --- the shared client scenarios, every sandbox under gVisor -----------------------
    let target = scenarios::Target::new(client_config);
    let t = Instant::now();
    for name in scenarios::SHARED {
        scenarios::run(name, &target).await;
        target.kill_made().await;
    }
    println!(
        "the Rust client's {} shared scenarios under gVisor in {:.1} s",
        scenarios::SHARED.len(),
        t.elapsed().as_secs_f64()
    );

    // --- nothing left ------------------------------------------------------------------
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = pods
            .list(&ListParams::default().labels(MANAGED))
            .await
            .unwrap()
            .items
            .len();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} sandbox pods left behind");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.stop().await;
    drop(client);
    node.stop().unwrap_or_else(|err| panic!("{err}"));
    let report = node.check_clean();
    assert!(report.is_ok(), "the node left things behind: {report:?}");
}
