//! The chart on a real node: kubelet, containerd, CNI, kube-proxy, CoreDNS and a local
//! registry (tools/node), the operator image built from the debug binary with no daemon
//! (tools/images) and pulled from that registry. One node for the whole binary, and one
//! test running the steps in order, each on what the previous left.
//!
//! The operator's default provider is an E2B-compatible sandbox server in this process,
//! listening on the host's non-loopback address so the pods reach it.
//!
//! Needs root and `scripts/setup`; fails (never skips) where a node cannot start.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use sandcastle_api::{AgentTask, SandboxTemplate, TaskPhase, TemplatePhase};
use sandcastle_sandboxd::{Config, Sandboxd};
use sandcastle_testkit::node::Node;
use serde_json::json;

const RELEASE: &str = "sc";
const NS: &str = "sandcastle-system";
const FULLNAME: &str = "sc-sandcastle";
const LEASE_SECONDS: u64 = 15;
const API_KEY: &str = "node-key";

struct Env {
    node: Node,
    client: Client,
}

impl Env {
    fn command(&self, tool: &str, args: &[&str]) -> String {
        self.node
            .tool(tool, args)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    fn helm(&self, args: &[&str]) -> String {
        self.command("helm", args)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.command("kubectl", args)
    }

    async fn namespace(&self, name: &str, restricted: bool) {
        let mut labels = serde_json::Map::new();
        if restricted {
            labels.insert(
                "pod-security.kubernetes.io/enforce".into(),
                json!("restricted"),
            );
        }
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a namespace");
    }

    async fn operator_pods(&self) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), NS)
            .list(&ListParams::default().labels("app.kubernetes.io/instance=sc"))
            .await
            .expect("listing the operator's pods")
            .items
            .into_iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Waits for exactly two operator pods, Running, Ready through their probes, none of
    /// them in `not`; returns their names.
    async fn two_ready(&self, not: &[String], within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let pods = self.operator_pods().await;
            let ready: Vec<String> = pods
                .iter()
                .filter(|pod| {
                    let status = pod.status.as_ref();
                    status.and_then(|s| s.phase.as_deref()) == Some("Running")
                        && status
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|conditions| {
                                conditions
                                    .iter()
                                    .any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                })
                .map(|pod| pod.name_any())
                .collect();
            if pods.len() == 2 && ready.len() == 2 && ready.iter().all(|name| !not.contains(name)) {
                return ready;
            }
            assert!(
                Instant::now() < deadline,
                "two Ready operator pods (not {not:?}) in {within:?}; have {:?} ready of {:?}",
                ready,
                pods.iter().map(|pod| pod.name_any()).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn holder(&self) -> Option<String> {
        Api::<Lease>::namespaced(self.client.clone(), NS)
            .get_opt(FULLNAME)
            .await
            .expect("reading the lease")
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity)
    }

    async fn get_raw(&self, path: &str) -> String {
        let request = http::Request::get(path).body(Vec::new()).unwrap();
        self.client
            .request_text(request)
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// The `sandcastle_leader` gauge of one pod, read through the apiserver's pod proxy.
    async fn leader_metric(&self, pod: &str) -> String {
        let metrics = self
            .get_raw(&format!(
                "/api/v1/namespaces/{NS}/pods/http:{pod}:8080/proxy/metrics"
            ))
            .await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("sandcastle_leader "))
            .unwrap_or_else(|| panic!("no sandcastle_leader in {pod}'s metrics:\n{metrics}"))
            .trim()
            .to_owned()
    }

    /// Waits until exactly one of `pods` holds the lease and reports itself leader, the
    /// other standby; returns the leader.
    async fn one_leader(&self, pods: &[String]) -> String {
        let deadline = Instant::now() + Duration::from_secs(LEASE_SECONDS + 15);
        loop {
            if let Some(holder) = self.holder().await
                && pods.contains(&holder)
            {
                let mut leaders = Vec::new();
                for pod in pods {
                    if self.leader_metric(pod).await == "1" {
                        leaders.push(pod.clone());
                    }
                }
                if leaders == [holder.clone()] {
                    return holder;
                }
            }
            assert!(
                Instant::now() < deadline,
                "exactly one leader among {pods:?}; lease holder {:?}",
                self.holder().await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn command_task(&self, ns: &str, name: &str, script: &str) {
        let task: AgentTask = serde_json::from_value(json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": name},
            "spec": {
                "templateRef": {"name": "base"},
                "agent": {"command": {"command": ["sh", "-c", script]}},
                "activeDeadlineSeconds": 300,
            },
        }))
        .unwrap();
        Api::<AgentTask>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &task)
            .await
            .expect("creating a task");
    }

    /// Waits until the task's phase is one of `phases`, and returns the task.
    async fn task_in(
        &self,
        ns: &str,
        name: &str,
        phases: &[TaskPhase],
        within: Duration,
    ) -> AgentTask {
        let tasks: Api<AgentTask> = Api::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + within;
        loop {
            let task = tasks.get(name).await.expect("reading a task");
            let phase = task.status.as_ref().and_then(|s| s.phase);
            if phase.as_ref().is_some_and(|phase| phases.contains(phase)) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {ns}/{name} not in {phases:?} within {within:?}: {:?}",
                task.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the task to succeed and checks its result text.
    async fn succeeds(&self, ns: &str, name: &str, text: &str) -> AgentTask {
        let task = self
            .task_in(
                ns,
                name,
                &[TaskPhase::Succeeded, TaskPhase::Failed],
                Duration::from_secs(120),
            )
            .await;
        let status = task.status.clone().expect("a status");
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "{ns}/{name}: {status:?}"
        );
        let result = status.result.expect("a result");
        assert_eq!(result.exit_code, Some(0), "{ns}/{name}: {result:?}");
        assert!(
            result.text.contains(text),
            "{ns}/{name}: result {:?} lacks {text:?}",
            result.text
        );
        task
    }

    async fn template_ready(&self, ns: &str, name: &str) {
        let templates: Api<SandboxTemplate> = Api::namespaced(self.client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let template = templates.get(name).await.expect("reading a template");
            if template.status.as_ref().and_then(|s| s.phase) == Some(TemplatePhase::Ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "template {ns}/{name} not Ready: {:?}",
                template.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self, ns: &str, selector: &str) -> String {
        let args = [
            "logs",
            "-n",
            ns,
            "-l",
            selector,
            "--tail=40",
            "--all-containers",
        ];
        self.node.tool("kubectl", &args).unwrap_or_else(|err| err)
    }
}

/// The image built without a daemon has the runtime layout the Dockerfile declares: its
/// user, entrypoint and command as the image config states them, and the binary where the
/// Dockerfile copies it (the pods running from it prove the binary runs).
fn image_matches_the_dockerfile(reference: &str) {
    let dockerfile =
        std::fs::read_to_string(sandcastle_testkit::repo().join("Dockerfile")).expect("Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let directive = |name: &str| -> String {
        runtime
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("the Dockerfile's runtime stage has no {name}"))
            .trim()
            .to_string()
    };
    let json_list = |text: String| -> Vec<String> {
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text}: {err}"))
    };
    let copied: Vec<String> = runtime
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter_map(|line| line.split_whitespace().last())
        .map(str::to_string)
        .collect();
    // skopeo takes a name with a digest or a tag, not both.
    let (named, digest) = reference.split_once('@').expect("a digest");
    let repository = match named.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => named,
    };
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{repository}@{digest}"))
        .output()
        .expect("skopeo runs");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("an image config");
    let config = &config["config"];
    assert_eq!(config["User"], directive("USER"), "{config}");
    assert_eq!(
        serde_json::from_value::<Vec<String>>(config["Entrypoint"].clone()).unwrap(),
        json_list(directive("ENTRYPOINT")),
        "{config}"
    );
    assert_eq!(
        serde_json::from_value::<Vec<String>>(config["Cmd"].clone()).unwrap(),
        json_list(directive("CMD")),
        "{config}"
    );
    let entrypoint = &json_list(directive("ENTRYPOINT"))[0];
    assert!(
        copied.contains(entrypoint),
        "the entrypoint {entrypoint} is a copied binary: {copied:?}"
    );
    assert!(
        copied.iter().any(|path| path.ends_with("/sandcastle-envd")),
        "the image carries envd for sandbox pods: {copied:?}"
    );
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[test]
fn operator_chart_on_a_real_node() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(steps());
}

async fn steps() {
    // --- node, image, provider --------------------------------------------------------
    let node = Node::start("node").unwrap_or_else(|err| panic!("cannot start a node: {err}"));
    println!("node up in {}", secs(node.up_time));
    let client = node.client().await.expect("a client");
    let t = Instant::now();
    let reference = node
        .push_operator_image(&sandcastle_testkit::operator_binary(), "dev")
        .unwrap_or_else(|err| panic!("{err}"));
    let image_time = t.elapsed();
    let digest = reference
        .split_once('@')
        .map(|(_, digest)| digest.to_owned())
        .expect("a digest");
    println!("pushed {reference} in {}", secs(image_time));
    image_matches_the_dockerfile(&reference);

    let provider_root =
        sandcastle_testkit::scratch_dir().join(format!("node-provider-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&provider_root);
    let mut config = Config::new(&provider_root);
    config.listen = node.ip();
    config.api_key = Some(API_KEY.into());
    let provider = Sandboxd::start(config).await.expect("the sandbox server");
    let env = Env { node, client };

    // --- install into a restricted namespace ------------------------------------------
    env.namespace(NS, true).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "e2b"}, "stringData": {"api-key": API_KEY},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .expect("the API key Secret");
    let chart = sandcastle_testkit::repo()
        .join("charts/sandcastle")
        .display()
        .to_string();
    let repository = format!("image.repository={}/sandcastle", env.node.registry());
    let digest_value = format!("image.digest={digest}");
    let api_url = format!("provider.e2b.apiUrl={}", provider.api_url());
    let sandbox_url = format!("provider.e2b.sandboxUrl={}", provider.sandbox_url());
    let lease = format!("leaderElection.leaseSeconds={LEASE_SECONDS}");
    let t = Instant::now();
    env.helm(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        NS,
        "--set",
        &repository,
        "--set",
        &digest_value,
        "--set",
        &api_url,
        "--set",
        &sandbox_url,
        "--set",
        "provider.e2b.apiKeySecretRef.name=e2b",
        "--set",
        &lease,
        "--set",
        "operator.logFormat=text",
        "--wait",
        "--timeout",
        "180s",
    ]);
    let pods = env.two_ready(&[], Duration::from_secs(60)).await;
    let install_time = t.elapsed();
    println!(
        "installed; two pods Ready in {}: {pods:?}",
        secs(install_time)
    );
    for pod in env.operator_pods().await {
        let spec = pod.spec.expect("a pod spec");
        assert!(
            spec.containers[0]
                .image
                .as_deref()
                .is_some_and(|image| image.ends_with(&digest)),
            "the pod runs the pushed image"
        );
    }
    let leader = env.one_leader(&pods).await;
    println!("leader {leader}");

    // --- metrics through the Service --------------------------------------------------
    let metrics = env
        .get_raw(&format!(
            "/api/v1/namespaces/{NS}/services/http:{FULLNAME}-metrics:8080/proxy/metrics"
        ))
        .await;
    assert!(
        metrics.contains("sandcastle_leader "),
        "the Service serves the operator's metrics:\n{metrics}"
    );

    // --- a task across a handover -----------------------------------------------------
    env.namespace("work", false).await;
    sandcastle_testkit::base::adopt_base(&env.client, "work").await;
    env.command_task("work", "across-handover", "sleep 8; echo done")
        .await;
    let running = env
        .task_in(
            "work",
            "across-handover",
            &[TaskPhase::Running],
            Duration::from_secs(60),
        )
        .await;
    let sandbox = running.status.and_then(|s| s.sandbox_id);
    let t = Instant::now();
    Api::<Pod>::namespaced(env.client.clone(), NS)
        .delete(&leader, &DeleteParams::default())
        .await
        .expect("deleting the leader's pod");
    let standby = pods
        .iter()
        .find(|pod| **pod != leader)
        .expect("a standby")
        .clone();
    // The old leader releases the lease on SIGTERM; a live replica other than it (the
    // standby, or the pod replacing the deleted one, whichever asks first) must hold it
    // within the lease time, plus the standby's few seconds of polling.
    let mut released = None;
    let new_leader = loop {
        let holder = env.holder().await.unwrap_or_default();
        if holder.is_empty() {
            released.get_or_insert(t.elapsed());
        } else if holder != leader {
            break holder;
        }
        assert!(
            t.elapsed() < Duration::from_secs(LEASE_SECONDS + 3),
            "no other replica took the lease within the lease time; holder {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let handover = t.elapsed();
    println!(
        "handover from {leader} to {new_leader} ({}) in {} (lease released after {:?})",
        if new_leader == standby {
            "the standby"
        } else {
            "the replacement pod"
        },
        secs(handover),
        released.map(secs)
    );
    let done = env.succeeds("work", "across-handover", "done").await;
    let status = done.status.expect("a status");
    assert_eq!(
        status.attempts,
        Some(1),
        "the same attempt went on: {status:?}"
    );
    assert_eq!(status.sandbox_id, sandbox, "the same sandbox: {status:?}");
    let pods = env.two_ready(&[leader], Duration::from_secs(60)).await;
    env.one_leader(&pods).await;

    // --- helm upgrade rolls the pods; a task survives ---------------------------------
    env.command_task("work", "across-upgrade", "sleep 8; echo upgraded")
        .await;
    env.task_in(
        "work",
        "across-upgrade",
        &[TaskPhase::Running],
        Duration::from_secs(60),
    )
    .await;
    env.helm(&[
        "upgrade",
        RELEASE,
        &chart,
        "--namespace",
        NS,
        "--reuse-values",
        "--set",
        "operator.log=info\\,sandcastle=debug",
        "--wait",
        "--timeout",
        "180s",
    ]);
    let rolled = env.two_ready(&pods, Duration::from_secs(90)).await;
    println!("upgraded: {pods:?} -> {rolled:?}");
    env.succeeds("work", "across-upgrade", "upgraded").await;
    env.one_leader(&rolled).await;

    // --- the examples, with the operator as a pod -------------------------------------
    env.namespace("examples", false).await;
    let examples = sandcastle_testkit::repo()
        .join("examples")
        .display()
        .to_string();
    env.kubectl(&["apply", "-n", "examples", "-f", &examples]);
    env.template_ready("examples", "base").await;
    env.template_ready("examples", "python").await;
    env.succeeds("examples", "hello-command", "# Notes").await;

    // --- uninstall leaves only the kept CRDs ------------------------------------------
    env.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        NS,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let left: Vec<String> = env
            .kubectl(&[
                "get",
                "-n",
                NS,
                "all,serviceaccounts,configmaps,secrets,roles,rolebindings,poddisruptionbudgets,leases",
                "-o",
                "name",
            ])
            .lines()
            .filter(|name| {
                // Made by the cluster and by this test, not by the chart.
                ![
                    "serviceaccount/default",
                    "configmap/kube-root-ca.crt",
                    "secret/e2b",
                ]
                .contains(name)
            })
            .map(str::to_owned)
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The Lease is the release's own object, so it goes with everything else.
    assert!(left.is_empty(), "helm uninstall left {left:?}");
    let cluster_wide = env.kubectl(&[
        "get",
        "clusterroles,clusterrolebindings",
        "-l",
        "app.kubernetes.io/instance=sc",
        "-o",
        "name",
    ]);
    assert_eq!(
        cluster_wide.trim(),
        "",
        "helm uninstall left cluster objects"
    );
    let crds = env.kubectl(&["get", "crds", "-o", "name"]);
    assert!(
        crds.contains("agenttasks.sandcastle.dev")
            && crds.contains("sandboxtemplates.sandcastle.dev"),
        "the CRDs are kept: {crds}"
    );

    // --- the embedded provider in the shipped image cannot run a task ----------------
    env.namespace("embedded", true).await;
    env.helm(&[
        "install",
        "emb",
        &chart,
        "--namespace",
        "embedded",
        "--set",
        &repository,
        "--set",
        &digest_value,
        "--set",
        "provider.embedded.enabled=true",
        "--set",
        "crds.enabled=false",
        "--set",
        "watchNamespaces={embedded}",
        "--set",
        "operator.logFormat=text",
        "--wait",
        "--timeout",
        "120s",
    ]);
    sandcastle_testkit::base::adopt_base(&env.client, "embedded").await;
    env.command_task("embedded", "embedded", "echo hello").await;
    let failed = env
        .task_in(
            "embedded",
            "embedded",
            &[TaskPhase::Succeeded, TaskPhase::Failed],
            Duration::from_secs(120),
        )
        .await;
    let status = failed.status.expect("a status");
    println!(
        "embedded provider in the image: {:?} {:?} {:?}\n{}",
        status.phase,
        status.reason,
        status.message,
        env.logs("embedded", "app.kubernetes.io/instance=emb")
    );
    // The agent runs under the recorder, `/bin/sh -c …`, and the image has no shell.
    assert_eq!(
        status.phase,
        Some(TaskPhase::Failed),
        "the embedded provider in the shipped image cannot run a task (no /bin/sh)"
    );
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|message| message.contains("No such file or directory")),
        "the agent's /bin/sh is missing: {:?}",
        status.message
    );
    env.helm(&["uninstall", "emb", "--namespace", "embedded", "--wait"]);

    // --- down, and nothing left -------------------------------------------------------
    provider.stop().await;
    let Env { mut node, .. } = env;
    let t = Instant::now();
    node.stop().unwrap_or_else(|err| panic!("{err}"));
    let down_time = t.elapsed();
    let report = node.check_clean();
    assert!(report.is_ok(), "the node left things behind: {report:?}");
    println!(
        "figures: node up {}, image build+push {}, install->Ready {}, handover {}, down {}",
        secs(node.up_time),
        secs(image_time),
        secs(install_time),
        secs(handover),
        secs(down_time)
    );
}
