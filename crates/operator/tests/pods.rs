//! Sandboxes as pods on a real node: the sandbox server's kubernetes runtime, in this
//! process, making Pods of the sandbox-full image whose envd is the project's own static
//! binary, placed by an init container from the operator image. The official E2B Python
//! SDK's conformance suite runs against it (template builds with RUN and COPY steps made
//! by kaniko in Jobs) and this project's client through the same shared scenarios, then
//! the pod's shape is checked from inside:
//! no ServiceAccount token, a non-root user, and (where the node enforces NetworkPolicy)
//! neither the apiserver nor another sandbox reachable while DNS still is. Every sandbox's
//! Pod, Secret and NetworkPolicy must be gone at the end. A restart of the server loses no
//! sandbox, and a Pod deleted behind it is a sandbox gone. Then the chart installs the
//! server as a Deployment beside the operator, and the operator's work runs through it
//! (`chart_on_pods`), a task with a Secret among them taking a sandbox pod from a warm
//! pool.
//!
//! Needs root and `scripts/setup`; fails (never skips) where a node cannot start.

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sandcastle_api::names::{
    SANDBOX_OPERATOR, SANDBOX_TASK_NAME, SANDBOX_TASK_NAMESPACE, SANDBOX_TASK_UID,
};
use sandcastle_api::{AgentTask, SandboxTemplate, TaskPhase, TemplatePhase};
use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::config::ClientConfig;
use sandcastle_e2b::envd_client::EnvdClient;
use sandcastle_e2b::models::{BuildStatus, TemplateBuildRequest, TemplateBuildStart, TemplateStep};
use sandcastle_sandboxd::{BuilderConfig, KubeConfig, KubeSandboxd};
use sandcastle_testkit::git_server::{GitServer, USER as GIT_USER};
use sandcastle_testkit::model::{HELLO_PY, Script, ScriptedModel};
use sandcastle_testkit::node::Node;
use sandcastle_testkit::scenarios;
use serde_json::json;

const NS: &str = "sandboxes";
const API_KEY: &str = "pods-key";
/// Where template builds run: kaniko runs as root, which the sandboxes' restricted
/// namespace refuses.
const BUILDS: &str = "sandbox-builds";
const MANAGED: &str = "app.kubernetes.io/managed-by=sandcastle-sandboxd";

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[test]
fn sandboxes_run_as_pods_on_a_real_node() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(steps());
}

async fn steps() {
    let mut node = Node::start("pods").unwrap_or_else(|err| panic!("cannot start a node: {err}"));
    let client = node.client().await.expect("a client");
    let t = Instant::now();
    let operator_image = node
        .push_operator_image(&sandcastle_testkit::operator_binary(), "pods")
        .unwrap_or_else(|err| panic!("{err}"));
    node.push_sandbox_images(Some(&sandcastle_testkit::claude_native()))
        .unwrap_or_else(|err| panic!("{err}"));
    let builder_image = node
        .push_builder_image()
        .unwrap_or_else(|err| panic!("{err}"));
    println!("images pushed in {}", secs(t.elapsed()));
    let enforced = std::fs::read_to_string(node.dir().join("env"))
        .unwrap_or_default()
        .contains("NETWORK_POLICY=kube-router");

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
    let mut config = KubeConfig::new(NS, format!("{}/sandcastle:pods", node.registry()));
    // The builder pulls the base image too, so by the address pods reach the registry at.
    config.base_image = format!("{}/sandbox-full:latest", node.registry_pod());
    config.builder = Some(BuilderConfig {
        image: builder_image.clone(),
        repository: format!("{}/templates", node.registry_pod()),
        insecure: true,
        namespace: BUILDS.into(),
        timeout: Duration::from_secs(600),
    });
    config.listen = node.ip();
    config.api_key = Some(API_KEY.into());
    config.server_labels = [("app".to_string(), "sandboxd".to_string())].into();
    // The apiserver listens on the node's own address, outside the private ranges.
    config.denied_cidrs.push(format!("{}/32", node.ip()));
    // Two cores: sandboxes that mostly wait share them.
    config.cpu_request_fraction = 0.05;
    let server = KubeSandboxd::start(config.clone(), client.clone())
        .await
        .expect("the sandbox server");

    // --- the official SDK's suite ------------------------------------------------------
    let python = sandcastle_testkit::repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    let t = Instant::now();
    let mut pytest = tokio::process::Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg("tests/conformance")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let printed = run_sdk_suite("the Python SDK suite", &server, pytest).await;
    let conformance = sandcastle_testkit::repo().join("crates/sandboxd/tests/conformance");
    let scenarios: usize = ["scenarios.txt", "sdk_scenarios.txt"]
        .iter()
        .map(|list| {
            std::fs::read_to_string(conformance.join(list))
                .expect("the scenario lists")
                .lines()
                .filter(|line| !line.trim().is_empty())
                .count()
        })
        .sum();
    // One test per scenario, and the one that checks the lists against the tests.
    let passed = format!("{} passed", scenarios + 1);
    assert!(
        printed.contains(&passed),
        "every scenario ran and passed: wanted {passed:?}"
    );
    println!("SDK suite on pods in {}", secs(t.elapsed()));

    // The official JavaScript SDK, the same scenarios, on the same server.
    let t = Instant::now();
    let js_tmp = node.dir().join("js-suite-tmp");
    std::fs::create_dir_all(&js_tmp).expect("the JavaScript suite's temp dir");
    let mut node_suite = tokio::process::Command::new("node");
    node_suite
        .args(["--test-reporter=spec", "tests/conformance/js/sdk.test.mjs"])
        .env("TMPDIR", &js_tmp);
    let printed = run_sdk_suite("the JavaScript SDK suite", &server, node_suite).await;
    let passed = format!("pass {}", scenarios + 1);
    assert!(
        printed.contains(&passed) && printed.contains("fail 0"),
        "every scenario ran and passed in JavaScript: wanted {passed:?}"
    );
    println!("JavaScript SDK suite on pods in {}", secs(t.elapsed()));

    // --- this project's client, through the same shared scenarios ----------------------
    let target = scenarios::Target::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        API_KEY,
    ));
    let t = Instant::now();
    for name in scenarios::SHARED {
        scenarios::run(name, &target).await;
        target.kill_made().await;
    }
    println!(
        "the Rust client's {} shared scenarios on pods in {}",
        scenarios::SHARED.len(),
        secs(t.elapsed())
    );

    // --- the pod's shape, from inside --------------------------------------------------
    let e2b = E2bClient::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        API_KEY,
    ))
    .expect("a client");
    let lifetime = Duration::from_secs(300);
    let t = Instant::now();
    let first = e2b
        .create_sandbox(&SandboxSpec::new("base", lifetime))
        .await
        .expect("a sandbox");
    println!("a sandbox pod answering envd in {}", secs(t.elapsed()));
    let second = e2b
        .create_sandbox(&SandboxSpec::new("base", lifetime))
        .await
        .expect("another sandbox");
    let (a, b) = (e2b.envd(&first), e2b.envd(&second));
    let run = |envd: &EnvdClient, script: &'static str| {
        let envd = envd.clone();
        async move { envd.run(script).await.expect("a command runs") }
    };
    let id = run(
        &a,
        "id -u; test -e /var/run/secrets/kubernetes.io/serviceaccount/token && echo token",
    )
    .await;
    assert_eq!(
        id.stdout, "1000\n",
        "non-root and no ServiceAccount token: {id:?}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let token = first
        .envd_access_token
        .clone()
        .expect("a v2 sandbox has a token");
    for pod in pods
        .list(&ListParams::default().labels(MANAGED))
        .await
        .unwrap()
    {
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains(&token), "an access token is in a Pod object");
    }
    // The second sandbox listens; the first tries it, the apiserver and DNS.
    b.start(&sandcastle_e2b::envd_client::CommandSpec::shell(
        "python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1",
    ))
    .await
    .expect("a server in the second sandbox");
    let b_ip = run(&b, "hostname -i").await.stdout.trim().to_string();
    let probe = format!(
        "probe() {{ timeout 3 bash -c \"</dev/tcp/$1/$2\" 2>/dev/null && echo \"$3 open\" || echo \"$3 closed\"; }}; \
         sleep 1; probe {b_ip} 8000 sandbox; probe {} 6443 apiserver; probe 10.96.0.1 443 kubernetes; probe 169.254.169.254 80 metadata; \
         getent hosts kubernetes.default.svc.cluster.local >/dev/null && echo 'dns works' || echo 'dns fails'",
        node.ip()
    );
    let probed = a.run(&probe).await.expect("the probe runs").stdout;
    println!("from inside a sandbox (NetworkPolicy enforced: {enforced}):\n{probed}");
    assert!(probed.contains("dns works"), "{probed}");
    if enforced {
        for closed in [
            "sandbox closed",
            "apiserver closed",
            "kubernetes closed",
            "metadata closed",
        ] {
            assert!(probed.contains(closed), "{closed}: {probed}");
        }
    } else {
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
        println!(
            "no enforcing implementation on this node; the policies that would be enforced:\n{}",
            serde_json::to_string_pretty(
                &policies.list(&ListParams::default()).await.unwrap().items
            )
            .unwrap()
        );
    }

    // --- templates: an image with settings and a start command; a RUN that fails --------
    let requested = e2b
        .request_build(&TemplateBuildRequest {
            name: Some("serving".into()),
            cpu_count: Some(1),
            memory_mb: Some(256),
            ..TemplateBuildRequest::default()
        })
        .await
        .expect("a template");
    let step = |kind: &str, args: &[&str]| TemplateStep {
        kind: kind.into(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        files_hash: None,
        force: false,
    };
    e2b.start_build(
        &requested.template_id,
        &requested.build_id,
        &TemplateBuildStart {
            from_template: Some("base".into()),
            steps: vec![step("ENV", &["GREETING", "hi"]), step("WORKDIR", &["/tmp"])],
            start_cmd: Some("echo started > /tmp/started; sleep infinity".into()),
            ready_cmd: Some("test -f /tmp/started".into()),
            ..TemplateBuildStart::default()
        },
    )
    .await
    .expect("a build");
    let built = e2b
        .wait_for_build(
            &requested.template_id,
            &requested.build_id,
            Duration::from_millis(200),
            Duration::from_secs(30),
        )
        .await
        .expect("the build ends");
    assert_eq!(built.status, BuildStatus::Ready, "{built:?}");
    let serving = e2b
        .create_sandbox(&SandboxSpec::new("serving", lifetime))
        .await
        .expect("a sandbox of the template");
    let inside = e2b
        .envd(&serving)
        .run("echo $GREETING; pwd; cat started; ps -o args= | grep -c '^sleep infinity'")
        .await
        .expect("a command");
    assert_eq!(inside.stdout, "hi\n/tmp\nstarted\n1\n", "{inside:?}");
    assert!(e2b.kill_sandbox(&serving.sandbox_id).await.expect("kill"));
    let again = e2b
        .request_build(&TemplateBuildRequest {
            name: Some("serving".into()),
            ..TemplateBuildRequest::default()
        })
        .await
        .expect("another build");
    e2b.start_build(
        &again.template_id,
        &again.build_id,
        &TemplateBuildStart {
            from_template: Some("base".into()),
            steps: vec![step("ENV", &["A", "b"]), step("RUN", &["make"])],
            ..TemplateBuildStart::default()
        },
    )
    .await
    .expect("a build request");
    let failed = e2b
        .wait_for_build(
            &again.template_id,
            &again.build_id,
            Duration::from_millis(500),
            Duration::from_secs(300),
        )
        .await
        .expect("the build ends");
    assert_eq!(failed.status, BuildStatus::Error, "{failed:?}");
    assert_eq!(
        failed
            .reason
            .as_ref()
            .and_then(|reason| reason.step.as_deref()),
        Some("2"),
        "{failed:?}"
    );
    assert!(
        failed
            .log_entries
            .iter()
            .any(|entry| entry.step.as_deref() == Some("2") && entry.message.contains("make")),
        "make's own output is in the log, at its step: {:#?}",
        failed.log_entries
    );
    assert!(
        e2b.delete_template(&requested.template_id)
            .await
            .expect("delete the template")
    );

    // --- a restart loses nothing; a pod deleted behind the server is a sandbox gone ------
    let port = |url: String| -> u16 { url.rsplit(':').next().unwrap().parse().expect("a port") };
    config.api_port = port(server.api_url());
    config.envd_port = port(server.sandbox_url());
    server.stop().await;
    let server = KubeSandboxd::start(config, client.clone())
        .await
        .expect("the sandbox server, again");
    let after = run(&a, "echo still here").await;
    assert_eq!(after.stdout, "still here\n", "{after:?}");
    let detail = e2b
        .get_sandbox(&first.sandbox_id)
        .await
        .expect("the sandbox, after a restart");
    assert_eq!(detail.envd_access_token, first.envd_access_token);
    pods.delete(
        &format!("sandbox-{}", second.sandbox_id),
        &Default::default(),
    )
    .await
    .expect("delete a sandbox pod behind the server");
    let gone = e2b.get_sandbox(&second.sandbox_id).await;
    assert!(
        gone.as_ref().is_err_and(|error| error.is_not_found()),
        "a deleted pod's sandbox is not found: {gone:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match b.run("true").await {
            Err(error) if error.is_sandbox_gone() => break,
            other => assert!(
                Instant::now() < deadline,
                "envd calls to a deleted pod's sandbox end as a sandbox gone: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(e2b.kill_sandbox(&first.sandbox_id).await.expect("kill"));

    // --- nothing left ------------------------------------------------------------------
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(client.clone(), BUILDS);
    let build_pods: Api<Pod> = Api::namespaced(client.clone(), BUILDS);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = (
            pods.list(&ListParams::default().labels(MANAGED))
                .await
                .unwrap()
                .items
                .len(),
            secrets
                .list(&ListParams::default().labels(MANAGED))
                .await
                .unwrap()
                .items
                .len(),
            policies
                .list(&ListParams::default().labels(MANAGED))
                .await
                .unwrap()
                .items
                .len(),
            jobs.list(&ListParams::default()).await.unwrap().items.len(),
            build_pods
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
        );
        if left == (0, 0, 0, 0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind (pods, secrets, policies, build jobs, build pods): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.stop().await;

    chart_on_pods(&node, &client, &operator_image, &builder_image).await;

    drop(client);
    node.stop().unwrap_or_else(|err| panic!("{err}"));
    let report = node.check_clean();
    assert!(report.is_ok(), "the node left things behind: {report:?}");
}

/// Where the chart's sandbox server makes sandboxes.
const AGENTS: &str = "agents";
const RELEASE_NS: &str = "sandcastle-system";

async fn namespace(client: &kube::Client, name: &str, profile: &str) {
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": profile}},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("a namespace");
}

/// What a failed wait prints: every pod, and the release's logs.
fn diagnose(node: &Node) -> String {
    let mut out = String::new();
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        &[
            "get",
            "agenttasks,sandboxtemplates",
            "-n",
            "examples",
            "-o",
            "yaml",
        ][..],
        &["get", "leases", "-n", RELEASE_NS, "-o", "yaml"][..],
        &[
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            "app.kubernetes.io/instance=sc",
            "--tail=200",
            "--all-containers",
            "--prefix",
        ][..],
    ] {
        out.push_str(&format!("--- kubectl {}\n", args.join(" ")));
        out.push_str(&node.tool("kubectl", args).unwrap_or_else(|err| err));
    }
    out
}

async fn template_ready(
    node: &Node,
    client: &kube::Client,
    ns: &str,
    name: &str,
    within: Duration,
) {
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + within;
    loop {
        let template = templates.get(name).await.expect("reading a template");
        let status = template.status.as_ref();
        if status.and_then(|s| s.phase) == Some(TemplatePhase::Ready) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "template {ns}/{name} not Ready within {within:?}: {status:?}\n{}",
            diagnose(node)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn task_succeeds(
    node: &Node,
    client: &kube::Client,
    ns: &str,
    name: &str,
    text: &str,
) -> AgentTask {
    let tasks: Api<AgentTask> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let task = tasks.get(name).await.expect("reading a task");
        let status = task.status.clone().unwrap_or_default();
        match status.phase {
            Some(TaskPhase::Succeeded) => {
                let result = status.result.expect("a result");
                assert!(
                    result.text.contains(text),
                    "{ns}/{name}: result {:?} lacks {text:?}",
                    result.text
                );
                return task;
            }
            Some(TaskPhase::Failed) => panic!("{ns}/{name} failed: {status:?}\n{}", diagnose(node)),
            _ => assert!(
                Instant::now() < deadline,
                "{ns}/{name} did not end: {status:?}\n{}",
                diagnose(node)
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Creates the AgentTask `name` with `spec` in the examples namespace.
async fn create_task(client: &kube::Client, name: &str, spec: serde_json::Value) {
    let task: AgentTask = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap_or_else(|err| panic!("task {name}: {err}"));
    Api::<AgentTask>::namespaced(client.clone(), "examples")
        .create(&PostParams::default(), &task)
        .await
        .unwrap_or_else(|err| panic!("creating task {name}: {err}"));
}

/// Creates the Secret `name` holding `data` in the examples namespace.
async fn put_secret(client: &kube::Client, name: &str, data: serde_json::Value) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name}, "stringData": data,
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "examples")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|err| panic!("creating Secret {name}: {err}"));
}

async fn command_task(client: &kube::Client, name: &str, script: &str, deadline: i64) {
    let spec = json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["bash", "-c", script]}},
        "activeDeadlineSeconds": deadline,
    });
    create_task(client, name, spec).await;
}

/// Sets (or, with `None`, drops) the pool of the examples' `base` template.
async fn pool_size(client: &kube::Client, size: Option<u32>) {
    let pool = size.map_or(json!(null), |size| json!({"size": size}));
    Api::<SandboxTemplate>::namespaced(client.clone(), "examples")
        .patch(
            "base",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pool": pool}})),
        )
        .await
        .expect("setting the pool");
}

/// Waits until the `base` template's pool status shows `ready` idle and `claimed` taken
/// sandboxes.
async fn pool_holds(node: &Node, client: &kube::Client, ready: i32, claimed: i32) {
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), "examples");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pool = templates
            .get("base")
            .await
            .expect("the template")
            .status
            .and_then(|status| status.pool);
        if pool
            .as_ref()
            .is_some_and(|pool| pool.ready == ready && pool.claimed == claimed)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool is not {ready} ready, {claimed} claimed: {pool:?}\n{}",
            diagnose(node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits for the task to be Running and returns its sandbox's id.
async fn running_sandbox(node: &Node, client: &kube::Client, name: &str) -> String {
    let tasks: Api<AgentTask> = Api::namespaced(client.clone(), "examples");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = tasks
            .get(name)
            .await
            .expect("reading a task")
            .status
            .unwrap_or_default();
        if status.phase == Some(TaskPhase::Running)
            && let Some(id) = status.sandbox_id
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not Running: {status:?}\n{}",
            diagnose(node)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills every replica of the chart's sandbox server at once, without a grace period.
async fn kill_servers(client: &kube::Client) -> usize {
    let servers: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let selector = ListParams::default().labels("app.kubernetes.io/name=sandcastle-sandboxd");
    let pods = servers
        .list(&selector)
        .await
        .expect("the server's pods")
        .items;
    for pod in &pods {
        servers
            .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await
            .expect("killing a server replica");
    }
    pods.len()
}

/// The reasons of the Events about an object.
async fn event_reasons(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|event| event.reason)
        .collect()
}

/// Every object of a kind in the cluster, as (what, its JSON), for the Secret scan.
async fn every<K>(client: &kube::Client, kind: &str) -> Vec<(String, String)>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|err| panic!("listing every {kind}: {err}"))
        .into_iter()
        .map(|object| {
            (
                format!("{kind} {}", object.name_any()),
                serde_json::to_string(&object).unwrap(),
            )
        })
        .collect()
}

/// Waits until `list` comes back empty, or fails naming what is left.
async fn until_gone<F, Fut>(what: &str, mut list: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = list().await;
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what} left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn names<K: kube::Resource>(items: Vec<K>) -> Vec<String> {
    items
        .into_iter()
        .map(|item| item.meta().name.clone().unwrap_or_default())
        .collect()
}

/// The chart with `sandboxd.enabled`: the sandbox server as a Deployment of two replicas
/// with its own ServiceAccount and Roles, the operator's E2B provider pointed at its
/// Service, the operator's NetworkPolicy on. The examples run through it: `python` is
/// built by kaniko, `hello-command` succeeds in a sandbox pod, a task's Secret reaches
/// its process and nothing else. Uninstalling after the tasks and templates are deleted
/// leaves nothing.
async fn chart_on_pods(node: &Node, client: &kube::Client, operator_image: &str, builder: &str) {
    let helm = |args: &[&str]| {
        node.tool("helm", args)
            .unwrap_or_else(|err| panic!("{err}"))
    };
    let kubectl = |args: &[&str]| {
        node.tool("kubectl", args)
            .unwrap_or_else(|err| panic!("{err}"))
    };
    namespace(client, RELEASE_NS, "restricted").await;
    namespace(client, AGENTS, "restricted").await;
    let digest = operator_image
        .split_once('@')
        .map(|(_, digest)| digest)
        .expect("a digest");
    let chart = sandcastle_testkit::repo().join("charts/sandcastle");
    let sets = [
        format!("image.repository={}/sandcastle", node.registry()),
        format!("image.digest={digest}"),
        "operator.logFormat=text".into(),
        "networkPolicy.enabled=true".into(),
        "sandboxd.enabled=true".into(),
        format!("sandboxd.namespace={AGENTS}"),
        format!(
            "sandboxd.baseImage={}/sandbox-full:latest",
            node.registry_pod()
        ),
        format!("sandboxd.extraDenyCidrs={{{}/32}}", node.ip()),
        "sandboxd.cpuRequestPercent=5".into(),
        format!("sandboxd.builder.image={builder}"),
        format!(
            "sandboxd.builder.repository={}/templates",
            node.registry_pod()
        ),
        "sandboxd.builder.insecure=true".into(),
        format!("sandboxd.builder.namespace={BUILDS}"),
        // The sweep has something to do within the test.
        "operator.sweepOrphansEvery=10".into(),
        "mcp.enabled=true".into(),
        "mcp.namespace=examples".into(),
        "mcp.bearerTokenSecretRef.name=mcp-token".into(),
    ];
    // The MCP server's Role and tasks live in `examples`, and its token in the release's.
    namespace(client, "examples", "baseline").await;
    let mcp_token = format!("mcp-token-{}", std::process::id());
    let token_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "mcp-token"}, "stringData": {"token": mcp_token},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), RELEASE_NS)
        .create(&PostParams::default(), &token_secret)
        .await
        .expect("the MCP token's Secret");
    let mut args = vec![
        "install".to_owned(),
        "sc".into(),
        chart.display().to_string(),
        "--namespace".into(),
        RELEASE_NS.into(),
        "--wait".into(),
        "--timeout".into(),
        "180s".into(),
    ];
    for set in &sets {
        args.extend(["--set".to_owned(), set.clone()]);
    }
    // This node's DNS is CoreDNS on the host, not a kube-dns pod (as with NodeLocal
    // DNSCache): the chart's `extra` egress rules are how such clusters allow it.
    let dns = node.dir().join("dns-egress.yaml");
    std::fs::write(
        &dns,
        format!(
            "networkPolicy:\n  egress:\n    extra:\n      - to: [{{ipBlock: {{cidr: {}/32}}}}]\n        ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]\n",
            node.ip()
        ),
    )
    .expect("a values file");
    args.extend(["-f".to_owned(), dns.display().to_string()]);
    let t = Instant::now();
    helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    println!(
        "chart with the sandbox server installed and Ready in {}",
        secs(t.elapsed())
    );
    let servers = Api::<Pod>::namespaced(client.clone(), RELEASE_NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=sandcastle-sandboxd"))
        .await
        .expect("the server's pods");
    assert_eq!(servers.items.len(), 2, "two sandbox server replicas");

    // --- the examples, through the operator and the server ------------------------------
    let examples = sandcastle_testkit::repo().join("examples");
    kubectl(&[
        "apply",
        "-n",
        "examples",
        "-f",
        &examples.display().to_string(),
    ]);
    let t = Instant::now();
    template_ready(node, client, "examples", "base", Duration::from_secs(60)).await;
    task_succeeds(node, client, "examples", "hello-command", "# Notes").await;
    println!(
        "hello-command succeeded on a sandbox pod in {}",
        secs(t.elapsed())
    );
    template_ready(node, client, "examples", "python", Duration::from_secs(300)).await;
    println!(
        "python template built by kaniko, Ready after {}",
        secs(t.elapsed())
    );

    mcp_on_pods(node, client, &mcp_token).await;

    let token = format!("pod-secret-{}", std::process::id());
    put_secret(client, "creds", json!({"token": token})).await;
    let with_secret = json!({
        "templateRef": {"name": "python"},
        "agent": {"command": {"command": ["sh", "-c",
            "test \"$TOKEN\" = \"pod-secret-$EXPECTED_PID\" && echo token-arrived; python3 /home/user/tools/greet.py"]}},
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "EXPECTED_PID", "value": std::process::id().to_string()},
        ],
        "activeDeadlineSeconds": 300,
    });
    create_task(client, "with-secret", with_secret).await;
    let done = task_succeeds(node, client, "examples", "with-secret", "token-arrived").await;
    let result = done.status.and_then(|s| s.result).expect("a result").text;
    assert!(
        result.contains("hello from the template"),
        "the COPY step's file is in the built image: {result:?}"
    );

    // --- a warm pool on pods: a task with a Secret takes a warm sandbox ---------------
    let sandbox_pods: Api<Pod> = Api::namespaced(client.clone(), AGENTS);
    let before = names(
        sandbox_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    let t = Instant::now();
    pool_size(client, Some(2)).await;
    pool_holds(node, client, 2, 0).await;
    let warm: Vec<String> = names(
        sandbox_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    )
    .into_iter()
    .filter(|pod| !before.contains(pod))
    .filter_map(|pod| pod.strip_prefix("sandbox-").map(str::to_owned))
    .collect();
    assert_eq!(warm.len(), 2, "two warm sandbox pods: {warm:?}");
    println!("a pool of 2 sandbox pods warm in {}", secs(t.elapsed()));
    let from_pool = json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sh", "-c",
            "test \"$TOKEN\" = \"pod-secret-$EXPECTED_PID\" && echo warm-token-arrived"]}},
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "EXPECTED_PID", "value": std::process::id().to_string()},
        ],
        "activeDeadlineSeconds": 120,
    });
    let t = Instant::now();
    create_task(client, "from-pool", from_pool).await;
    let done = task_succeeds(node, client, "examples", "from-pool", "warm-token-arrived").await;
    let took = done.status.and_then(|s| s.sandbox_id).expect("a sandbox");
    assert!(
        warm.contains(&took),
        "the task took a warm sandbox ({took}, warm: {warm:?})"
    );
    println!(
        "a task with a Secret ran in a warm sandbox pod in {}",
        secs(t.elapsed())
    );
    // Refilled after the claim; dropping the pool kills its idle pods.
    pool_holds(node, client, 2, 0).await;
    pool_size(client, None).await;
    until_gone("the pool's idle sandbox pods", || async {
        let now = names(
            sandbox_pods
                .list(&ListParams::default())
                .await
                .unwrap()
                .items,
        );
        now.into_iter()
            .filter(|pod| !before.contains(pod))
            .collect()
    })
    .await;

    // --- egress: what a task's network allows, and Claude Code through it -------------
    let model = ScriptedModel::start_on(Script::WriteAndRun, node.ip()).await;
    let model_addr = model.base_url().trim_start_matches("http://").to_owned();
    let (host, port) = model_addr.rsplit_once(':').expect("host:port");
    let probe = format!(
        "timeout 3 bash -c '</dev/tcp/{host}/{port}' 2>/dev/null && echo model-open || echo model-closed; \
         timeout 3 bash -c '</dev/tcp/169.254.169.254/80' 2>/dev/null && echo metadata-open || echo metadata-closed"
    );
    for (name, network, expected) in [
        ("fenced", json!(null), "model-closed"),
        (
            "allowed",
            json!({"allowInternetAccess": false, "allowOut": [format!("{host}/32")]}),
            "model-open",
        ),
    ] {
        let mut spec = json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["bash", "-c", &probe]}},
            "activeDeadlineSeconds": 120,
        });
        if !network.is_null() {
            spec["network"] = network;
        }
        create_task(client, name, spec).await;
        let done = task_succeeds(node, client, "examples", name, expected).await;
        let text = done.status.and_then(|s| s.result).expect("a result").text;
        assert!(text.contains("metadata-closed"), "{name}: {text}");
        println!("{name}: {}", text.replace('\n', " "));
    }

    let key = format!("sk-ant-pods-{}", std::process::id());
    put_secret(client, "anthropic", json!({"ANTHROPIC_API_KEY": key})).await;
    let claude = json!({
        "templateRef": {"name": "base"},
        "prompt": "Create hello.py and run it",
        "env": [
            {"name": "ANTHROPIC_BASE_URL", "value": model.base_url()},
            {"name": "CLAUDE_CODE_MAX_RETRIES", "value": "0"},
        ],
        "envFrom": [{"secretRef": {"name": "anthropic"}}],
        "network": {"allowInternetAccess": false, "allowOut": [format!("{host}/32")]},
        "activeDeadlineSeconds": 300,
    });
    let t = Instant::now();
    create_task(client, "claude-on-a-pod", claude).await;
    let done = task_succeeds(node, client, "examples", "claude-on-a-pod", "done").await;
    let status = done.status.expect("a status");
    let result = status.result.expect("a result");
    assert_eq!(
        (result.num_turns, result.is_error),
        (Some(3), false),
        "{result:?}"
    );
    let files: Vec<(&str, i64)> = status
        .files
        .iter()
        .map(|file| (file.path.as_str(), file.size))
        .collect();
    assert_eq!(files, [("hello.py", HELLO_PY.len() as i64)]);
    println!(
        "Claude Code on a pod, model reached through allowOut only: {} turns in {}",
        result.num_turns.unwrap_or_default(),
        secs(t.elapsed())
    );

    // --- git on pods: a clone, and a push after the agent's leftovers are killed -------
    // The sandbox pod shares one PID namespace among its processes, so the sweep before
    // the push must kill the background process the agent leaves and spare envd.
    let server = GitServer::start_on(node.ip());
    let base = server.create("app", &[("README", b"one\n")]);
    let git_token = server.token().to_string();
    put_secret(
        client,
        "repo",
        json!({"username": GIT_USER, "password": &git_token}),
    )
    .await;
    let git = json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["bash", "-c",
            "echo two >>README; (sleep 600 &); echo pushed-from-a-pod"]}},
        "workspace": {"git": {"url": server.url("app"), "secretRef": {"name": "repo"}}},
        "outputs": {"git": {"push": {}}},
        "network": {"allowInternetAccess": false, "allowOut": [format!("{host}/32")]},
        "activeDeadlineSeconds": 300,
    });
    let t = Instant::now();
    create_task(client, "git-on-a-pod", git).await;
    let done = task_succeeds(
        node,
        client,
        "examples",
        "git-on-a-pod",
        "pushed-from-a-pod",
    )
    .await;
    let git = done
        .status
        .and_then(|status| status.git)
        .expect("status.git");
    assert!(git.pushed, "{git:?}");
    assert_eq!(git.base_commit.as_deref(), Some(base.as_str()));
    assert_eq!(server.head("app", "sandcastle/git-on-a-pod"), git.commit);
    let check = server.clone_over_http("app", "sandcastle/git-on-a-pod");
    assert_eq!(
        std::fs::read_to_string(check.join("README")).unwrap(),
        "one\ntwo\n"
    );
    println!(
        "git on a pod: cloned, the agent's leftover killed, pushed in {}",
        secs(t.elapsed())
    );

    // --- faults: the operator's tasks on pods survive what a cluster does to them ------
    let tasks: Api<AgentTask> = Api::namespaced(client.clone(), "examples");
    // Every server replica killed while a task's agent runs: the task goes on in the same
    // sandbox, since nothing of it lived in the server.
    command_task(client, "servers-killed", "sleep 6; echo survived", 300).await;
    let before = running_sandbox(node, client, "servers-killed").await;
    let killed = kill_servers(client).await;
    let done = task_succeeds(node, client, "examples", "servers-killed", "survived").await;
    let status = done.status.expect("a status");
    assert_eq!(
        (status.attempts, status.sandbox_id.as_deref()),
        (Some(1), Some(before.as_str())),
        "the same attempt in the same sandbox"
    );
    println!("{killed} server replicas killed mid-run: the task finished in its sandbox");

    // Killed again while the next task's sandbox is being made.
    let existing = names(
        sandbox_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    command_task(client, "killed-mid-create", "echo created", 300).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mid_create = loop {
        let now = names(
            sandbox_pods
                .list(&ListParams::default())
                .await
                .unwrap()
                .items,
        );
        let task = tasks.get("killed-mid-create").await.expect("a task");
        let recorded = task.status.and_then(|s| s.sandbox_id).is_some();
        if now.iter().any(|pod| !existing.contains(pod)) || recorded {
            kill_servers(client).await;
            break !recorded;
        }
        assert!(
            Instant::now() < deadline,
            "no sandbox pod for killed-mid-create"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    task_succeeds(node, client, "examples", "killed-mid-create", "created").await;
    println!(
        "servers killed {} the create: the task succeeded",
        if mid_create { "during" } else { "just after" }
    );

    // A sandbox pod deleted behind everyone: the task retries in a new sandbox.
    command_task(client, "pod-deleted", "sleep 5; echo second", 300).await;
    let lost = running_sandbox(node, client, "pod-deleted").await;
    sandbox_pods
        .delete(
            &format!("sandbox-{lost}"),
            &DeleteParams::default().grace_period(0),
        )
        .await
        .expect("deleting a sandbox pod");
    let done = task_succeeds(node, client, "examples", "pod-deleted", "second").await;
    let status = done.status.expect("a status");
    assert_eq!(status.attempts, Some(2), "{status:?}");
    assert_ne!(status.sandbox_id.as_deref(), Some(lost.as_str()));
    let reasons = event_reasons(client, "examples", "pod-deleted").await;
    assert!(reasons.iter().any(|r| r == "SandboxLost"), "{reasons:?}");

    // The deadline ends a task on pods within seconds, and its pod with it.
    command_task(client, "too-slow", "sleep 600", 8).await;
    let slow = running_sandbox(node, client, "too-slow").await;
    let ended = {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let task = tasks.get("too-slow").await.expect("a task");
            let status = task.status.clone().unwrap_or_default();
            if status.phase == Some(TaskPhase::Failed) {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "too-slow did not fail: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(
        ended.reason.as_deref(),
        Some("DeadlineExceeded"),
        "{ended:?}"
    );
    // Deleting a running task kills its sandbox before the task goes.
    command_task(client, "deleted", "sleep 600", 300).await;
    let deleted = running_sandbox(node, client, "deleted").await;
    tasks
        .delete("deleted", &DeleteParams::default())
        .await
        .expect("deleting a task");
    // A sandbox of this operator whose task does not exist (as a task deleted while the
    // operator was away leaves one): the sweep kills it. Made through the server's E2B
    // API, reached by the apiserver's service proxy, with the release's key.
    let key_secret = Api::<Secret>::namespaced(client.clone(), RELEASE_NS)
        .get("sc-sandcastle-sandboxd")
        .await
        .expect("the server's key");
    let api_key = key_secret
        .data
        .and_then(|data| data.get("api-key").cloned())
        .expect("api-key");
    let body = json!({
        "templateID": "base", "timeout": 600,
        "metadata": {
            SANDBOX_OPERATOR: "sc-sandcastle",
            SANDBOX_TASK_NAMESPACE: "examples",
            SANDBOX_TASK_NAME: "never-was",
            SANDBOX_TASK_UID: "00000000-0000-0000-0000-000000000000",
        },
    });
    let request = http::Request::post(format!(
        "/api/v1/namespaces/{RELEASE_NS}/services/http:sc-sandcastle-sandboxd:3000/proxy/sandboxes"
    ))
    .header("Content-Type", "application/json")
    .header("X-API-Key", api_key.0.as_slice())
    .body(serde_json::to_vec(&body).unwrap())
    .unwrap();
    let created: serde_json::Value = serde_json::from_str(
        &client
            .request_text(request)
            .await
            .expect("a sandbox made through the server's API"),
    )
    .expect("JSON");
    let orphan = created["sandboxID"].as_str().expect("an id").to_owned();
    let t = Instant::now();
    until_gone(
        "sandbox pods of ended, deleted and orphaned tasks",
        || async {
            let mut left = Vec::new();
            for id in [&slow, &deleted, &orphan] {
                if sandbox_pods
                    .get_opt(&format!("sandbox-{id}"))
                    .await
                    .unwrap()
                    .is_some_and(|pod| pod.metadata.deletion_timestamp.is_none())
                {
                    left.push(id.clone());
                }
            }
            left
        },
    )
    .await;
    println!(
        "deadline, deletion and orphan sweep: every sandbox pod gone {} after the orphan was made",
        secs(t.elapsed())
    );

    // The kubelet restarted while an agent runs: its pod runs on under containerd, and
    // the task finishes in it.
    command_task(
        client,
        "kubelet-restarted",
        "sleep 8; echo kubelet-back",
        300,
    )
    .await;
    let before = running_sandbox(node, client, "kubelet-restarted").await;
    node.restart("kubelet", Duration::ZERO)
        .unwrap_or_else(|err| panic!("{err}"));
    let done = task_succeeds(
        node,
        client,
        "examples",
        "kubelet-restarted",
        "kubelet-back",
    )
    .await;
    let status = done.status.expect("a status");
    assert_eq!(
        (status.attempts, status.sandbox_id.as_deref()),
        (Some(1), Some(before.as_str())),
        "the same attempt in the same sandbox across a kubelet restart"
    );
    // The apiserver gone for 10 s while an agent runs: nothing is lost.
    command_task(
        client,
        "apiserver-down",
        "sleep 20; echo apiserver-back",
        300,
    )
    .await;
    let before = running_sandbox(node, client, "apiserver-down").await;
    let t = Instant::now();
    node.restart("kube-apiserver", Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}"));
    let deadline = Instant::now() + Duration::from_secs(90);
    while client.apiserver_version().await.is_err() {
        assert!(Instant::now() < deadline, "the apiserver did not come back");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("apiserver back {} after it was stopped", secs(t.elapsed()));
    let done = task_succeeds(node, client, "examples", "apiserver-down", "apiserver-back").await;
    let status = done.status.expect("a status");
    assert_eq!(
        (status.attempts, status.sandbox_id.as_deref()),
        (Some(1), Some(before.as_str())),
        "the same attempt in the same sandbox across 10 s without an apiserver"
    );
    println!(
        "kubelet restarted and apiserver down 10 s mid-run: both tasks finished in their sandboxes"
    );

    // The Secrets' values (the git token too) reached their processes only: no Pod,
    // Event, template, server or operator log, nor the node's own logs hold them.
    let mut places = every::<Pod>(client, "pod").await;
    places.extend(every::<Event>(client, "event").await);
    places.extend(every::<ConfigMap>(client, "configmap").await);
    for selector in [
        "app.kubernetes.io/name=sandcastle-sandboxd",
        "app.kubernetes.io/name=sandcastle",
    ] {
        let logs = kubectl(&[
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            selector,
            "--tail=-1",
            "--all-containers",
            "--prefix",
        ]);
        assert!(!logs.is_empty(), "{selector} logged something");
        places.push((format!("logs of {selector}"), logs));
    }
    for entry in std::fs::read_dir(node.dir().join("logs")).expect("the node's logs") {
        let path = entry.unwrap().path();
        places.push((
            path.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned(),
        ));
    }
    let leaks: Vec<&String> = places
        .iter()
        .filter(|(_, text)| {
            text.contains(&token) || text.contains(&key) || text.contains(&git_token)
        })
        .map(|(place, _)| place)
        .collect();
    assert!(leaks.is_empty(), "the task's Secret value is in {leaks:?}");
    println!("Secret values in none of {} places scanned", places.len());

    // --- down: tasks and templates first, while the operator can finish them ------------
    if let Err(err) = node.tool(
        "kubectl",
        &[
            "delete",
            "-n",
            "examples",
            "agenttasks,sandboxtemplates",
            "--all",
            "--wait=true",
            "--timeout=120s",
        ],
    ) {
        panic!("{err}\n{}", diagnose(node));
    }
    helm(&[
        "uninstall",
        "sc",
        "--namespace",
        RELEASE_NS,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let managed = ListParams::default().labels(MANAGED);
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENTS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), AGENTS);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), AGENTS);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), AGENTS);
    let jobs: Api<Job> = Api::namespaced(client.clone(), BUILDS);
    let build_maps: Api<ConfigMap> = Api::namespaced(client.clone(), BUILDS);
    until_gone("sandbox pods, secrets, policies, template maps", || async {
        let mut left = names(pods.list(&managed).await.unwrap().items);
        left.extend(names(secrets.list(&managed).await.unwrap().items));
        left.extend(names(policies.list(&managed).await.unwrap().items));
        left.extend(
            names(
                config_maps
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items,
            )
            .into_iter()
            // The server's record of the `base` template outlives it, as a
            // StatefulSet's volumes do, so that a reinstall finds it; built templates
            // went with their SandboxTemplates.
            .filter(|name| name != "kube-root-ca.crt" && name != "template-base"),
        );
        left.extend(names(
            jobs.list(&ListParams::default()).await.unwrap().items,
        ));
        left.extend(
            names(build_maps.list(&ListParams::default()).await.unwrap().items)
                .into_iter()
                .filter(|name| name != "kube-root-ca.crt"),
        );
        left
    })
    .await;
    // Pods of the release may still be terminating when `helm uninstall --wait` returns.
    until_gone("the release's objects", || async {
        kubectl(&[
            "get",
            "-n",
            RELEASE_NS,
            "all,serviceaccounts,secrets,roles,rolebindings,networkpolicies,leases",
            "-l",
            "app.kubernetes.io/instance=sc",
            "-o",
            "name",
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    })
    .await;
    for ns in [AGENTS, BUILDS] {
        let rbac = kubectl(&["get", "-n", ns, "roles,rolebindings", "-o", "name"]);
        assert_eq!(rbac.trim(), "", "helm uninstall left RBAC in {ns}");
    }
}

/// The chart's MCP server, a pod of the release: the official Python SDK reaches it (with
/// its bearer token, and the Service's name as Host) and runs code in sandbox pods, keeps
/// a context, and runs a task with progress; deleting its pod (SIGTERM) kills the
/// sandbox pods it made.
async fn mcp_on_pods(node: &Node, client: &kube::Client, token: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let servers = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=sandcastle-mcp"))
        .await
        .expect("the MCP server's pods");
    assert_eq!(servers.items.len(), 1, "one MCP server replica");
    let server = &servers.items[0];
    let ip = server
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .expect("the MCP pod's IP");
    let sandbox_pods: Api<Pod> = Api::namespaced(client.clone(), AGENTS);
    let before = names(
        sandbox_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    let script = format!(
        r#"
import anyio, httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
async def main():
    headers = {{"Host": "sc-sandcastle-mcp.{RELEASE_NS}", "Authorization": "Bearer {token}"}}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(300)) as http:
        async with streamable_http_client("http://{ip}:8090/mcp", http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                first = await session.call_tool("run_code", {{"code": "import platform\nplatform.system()"}})
                assert first.structured_content["result"]["text"] == "'Linux'", first
                js = await session.call_tool("run_code", {{"code": "process.version.startsWith('v')", "language": "javascript"}})
                assert js.structured_content["result"]["text"] == "true", js
                context = (await session.call_tool("create_context", {{}})).structured_content["id"]
                await session.call_tool("run_code", {{"code": "kept = 21", "context": context}})
                again = await session.call_tool("run_code", {{"code": "kept * 2", "context": context}})
                assert again.structured_content["result"]["text"] == "42", again
                heard = []
                async def progress(value, total, message):
                    heard.append(message)
                task = await session.call_tool("create_task", {{"template": "base", "name": "from-mcp",
                    "command": ["sh", "-c", "echo made by mcp"]}}, progress_callback=progress)
                assert task.structured_content["phase"] == "Succeeded", task
                assert heard and heard[-1].endswith("Succeeded"), heard
                print("mcp on pods: ok")
anyio.run(main)
"#
    );
    let t = Instant::now();
    let output = tokio::process::Command::new(sandcastle_testkit::repo().join(".venv/bin/python"))
        .args(["-c", &script])
        .kill_on_drop(true)
        .output()
        .await
        .expect("the client runs");
    assert!(
        output.status.success(),
        "the MCP client against the chart's server failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        diagnose(node)
    );
    let during = names(
        sandbox_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items,
    );
    let made: Vec<&String> = during.iter().filter(|pod| !before.contains(pod)).collect();
    assert!(!made.is_empty(), "the MCP server made no sandbox pod");
    println!(
        "MCP server in the chart: run_code in both languages, a context and a task with progress in {}",
        secs(t.elapsed())
    );
    let name = server.metadata.name.clone().expect("a name");
    // The server's Lease is its pod's, so it cannot outlive the pod.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), RELEASE_NS);
    let mcp_leases = || async {
        leases
            .list(&ListParams::default().labels("app.kubernetes.io/component=mcp-server"))
            .await
            .expect("leases")
            .items
    };
    let held = mcp_leases().await;
    assert_eq!(held.len(), 1, "{held:#?}");
    let owner = held[0]
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(
        owner
            .first()
            .map(|owner| (owner.kind.as_str(), owner.uid.as_str())),
        Some(("Pod", server.metadata.uid.as_deref().unwrap_or_default())),
        "{owner:?}"
    );
    pods.delete(&name, &Default::default())
        .await
        .expect("delete the MCP pod");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = names(
            sandbox_pods
                .list(&ListParams::default())
                .await
                .unwrap()
                .items,
        );
        let left: Vec<&&String> = made.iter().filter(|pod| now.contains(**pod)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the MCP server's sandbox pods outlived it: {left:?}\n{}",
            diagnose(node)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = mcp_leases().await;
    assert!(
        gone.iter()
            .all(|lease| lease.metadata.name != held[0].metadata.name),
        "the deleted pod's Lease is left: {gone:#?}"
    );
}

/// Runs an official SDK's conformance suite from crates/sandboxd against `server`, told
/// it runs on pods; fails unless it passed, and answers what it printed.
async fn run_sdk_suite(
    what: &str,
    server: &KubeSandboxd,
    mut suite: tokio::process::Command,
) -> String {
    let run = suite
        .current_dir(sandcastle_testkit::repo().join("crates/sandboxd"))
        .env("E2B_API_URL", server.api_url())
        .env("E2B_SANDBOX_URL", server.sandbox_url())
        .env("E2B_API_KEY", API_KEY)
        .env("SANDCASTLE_RUNTIME", "kubernetes")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .unwrap_or_else(|_| panic!("{what} ends within 15 minutes"))
        .unwrap_or_else(|error| panic!("{what} runs (scripts/setup installs it): {error}"));
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{printed}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{what} failed on pods");
    printed
}
