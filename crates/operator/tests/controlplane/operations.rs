//! Running the operator the way a cluster does: two replicas under leader election, and
//! the Helm chart's RBAC as the only rights it has.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use sandcastle_api::{AgentTask, SandboxTemplate, TaskPhase, TemplatePhase};
use sandcastle_e2b::client::{ClientConfig, E2bClient, ListQuery};
use serde_json::{Value, json};

use sandcastle_testkit::cluster::{TestEnv, stderr};
use sandcastle_testkit::operator::{Operator, wait_for};
use sandcastle_testkit::repo;

use sandcastle_api::names::SANDBOX_TASK_UID as TASK_UID;
const LEASE_SECONDS: u64 = 6;

async fn create<K>(api: &Api<K>, object: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).expect("a valid object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
}

/// Two replicas share a lease; the leader is killed while its task runs on a provider
/// that outlives it (a standalone sandbox server, as e2b.dev would be). The standby takes
/// the lease within its duration and finishes the task in the same sandbox.
pub async fn the_standby_takes_over_a_running_task(env: Arc<TestEnv>) {
    let ns = env.namespace("leader").await;
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("external-{ns}"));
    let mut config = sandcastle_sandboxd::Config::new(&root);
    config.api_key = Some("external-key".into());
    let external = sandcastle_sandboxd::Sandboxd::start(config)
        .await
        .expect("server");
    let provider = E2bClient::new(ClientConfig::with_urls(
        external.api_url(),
        external.sandbox_url(),
        "external-key",
    ))
    .expect("client");
    let lease_seconds = LEASE_SECONDS.to_string();
    let replica = |identity: &str| {
        Operator::start_with(
            env.kubeconfig_path(),
            &ns,
            &[
                ("SANDCASTLE_PROVIDER", "e2b"),
                ("E2B_API_URL", &external.api_url()),
                ("E2B_SANDBOX_URL", &external.sandbox_url()),
                ("E2B_API_KEY", "external-key"),
                ("SANDCASTLE_LEADER_ELECTION", "true"),
                ("SANDCASTLE_LEADER_ELECTION_NAMESPACE", &ns),
                ("SANDCASTLE_LEADER_ELECTION_LEASE_SECONDS", &lease_seconds),
                ("POD_NAME", identity),
            ],
        )
    };
    let mut first = replica("replica-a");
    first
        .await_metric("sandcastle_leader", 1.0, Duration::from_secs(30))
        .await;
    let second = replica("replica-b");

    sandcastle_testkit::base::adopt_base(&env.client, &ns).await;
    let tasks: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    create(
        &tasks,
        json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "handover"},
            "spec": {
                "templateRef": {"name": "base"},
                "agent": {"command": {"command": ["sh", "-c", "sleep 5; echo handed-over > result.txt; echo ok"]}},
            },
        }),
    )
    .await;
    let running = wait_for(&tasks, "handover", "running", |status| {
        status.phase == Some(TaskPhase::Running)
    })
    .await;
    assert_eq!(
        second.metric("sandcastle_leader").await,
        Some(0.0),
        "the standby does not lead while the first replica does"
    );
    assert!(
        !second.logs().contains("handover"),
        "the standby reconciled nothing:\n{}",
        second.logs()
    );

    first.kill();
    let takeover = second
        .await_metric(
            "sandcastle_leader",
            1.0,
            Duration::from_secs(LEASE_SECONDS * 3),
        )
        .await;
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 2),
        "the standby took {takeover:?} to lead; the lease lasts {LEASE_SECONDS} s"
    );
    let status = wait_for(&tasks, "handover", "finished", |status| {
        matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
    })
    .await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(status.sandbox_id, running.sandbox_id, "no second sandbox");
    assert_eq!(status.attempts, Some(1));
    let files: Vec<&str> = status.files.iter().map(|file| file.path.as_str()).collect();
    assert_eq!(files, ["result.txt"]);
    assert_eq!(
        status.result.as_ref().map(|result| result.text.as_str()),
        Some("ok\n")
    );
    let uid = tasks.get("handover").await.expect("task").metadata.uid;
    let query = ListQuery {
        metadata: [(TASK_UID.to_string(), uid.unwrap_or_default())].into(),
        ..ListQuery::default()
    };
    assert!(
        provider
            .list_sandboxes(&query)
            .await
            .expect("list")
            .is_empty(),
        "the sandbox is killed once the task finished"
    );
    drop(second);
    external.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}

/// A leader whose lease is taken over (here: rewritten to another holder, as a replica
/// would after a network partition) stops reconciling and exits, to come back as a standby.
pub async fn a_leader_that_loses_its_lease_stops(env: Arc<TestEnv>) {
    let ns = env.namespace("usurped").await;
    let lease_seconds = LEASE_SECONDS.to_string();
    let mut operator = Operator::start_with(
        env.kubeconfig_path(),
        &ns,
        &[
            ("SANDCASTLE_LEADER_ELECTION", "true"),
            ("SANDCASTLE_LEADER_ELECTION_NAMESPACE", &ns),
            ("SANDCASTLE_LEADER_ELECTION_LEASE_SECONDS", &lease_seconds),
            ("POD_NAME", "deposed"),
        ],
    );
    operator
        .await_metric("sandcastle_leader", 1.0, Duration::from_secs(30))
        .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &ns);
    let lease = leases.get("sandcastle").await.expect("the lease exists");
    let spec = lease.spec.expect("a lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("deposed"));
    leases
        .patch(
            "sandcastle",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {
                "holderIdentity": "usurper",
                "leaseDurationSeconds": 600,
                "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            }})),
        )
        .await
        .expect("take the lease over");
    let exit = operator
        .exit_within(Duration::from_secs(LEASE_SECONDS * 3))
        .await
        .expect("the deposed leader exits");
    assert!(!exit.success(), "{exit:?}");
    assert!(
        operator.logs().contains("lost the leader lease"),
        "{}",
        operator.logs()
    );
}

/// The objects of `helm template` for the chart with these extra arguments.
pub(crate) fn render_chart(release: &str, ns: &str, extra: &[&str]) -> Vec<Value> {
    let out =
        std::process::Command::new(sandcastle_testkit::localcluster::tools_bin_dir().join("helm"))
            .args(["template", release])
            .arg(repo().join("charts/sandcastle"))
            .args(["--namespace", ns])
            .args(extra)
            .output()
            .expect("helm runs (scripts/setup installs it)");
    assert!(out.status.success(), "helm template: {}", stderr(&out));
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .filter_map(|document| {
            let value: Value = serde::Deserialize::deserialize(document).ok()?;
            (!value.is_null()).then_some(value)
        })
        .collect()
}

/// A kubeconfig like the admin's, authenticating with `token` instead.
pub(crate) fn kubeconfig_with_token(env: &TestEnv, token: &str, path: &std::path::Path) {
    let admin = std::fs::read_to_string(env.kubeconfig_path()).expect("kubeconfig");
    let mut config: Value = serde_yaml::from_str(&admin).expect("kubeconfig YAML");
    for user in config["users"].as_array_mut().expect("users") {
        user["user"] = json!({ "token": token });
    }
    std::fs::write(path, serde_yaml::to_string(&config).expect("YAML")).expect("write kubeconfig");
}

/// The chart rendered for one watched namespace with the embedded provider; its
/// ServiceAccount and RBAC applied. The operator runs with the Deployment's own arguments
/// and environment and nothing but a token for that ServiceAccount (TokenRequest API),
/// builds a template and runs a task end to end under leader election; requests outside
/// its role are refused.
pub async fn the_charts_rbac_is_enough_and_no_more(env: Arc<TestEnv>) {
    let ns = env.namespace("rbac").await;
    let release = ns.clone();
    let rendered = render_chart(
        &release,
        &ns,
        &[
            "--set",
            "crds.enabled=false",
            "--set",
            "provider.embedded.enabled=true",
            "--set",
            &format!("watchNamespaces[0]={ns}"),
        ],
    );
    let rbac_kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let objects: Vec<Value> = rendered
        .iter()
        .filter(|object| rbac_kinds.contains(&object["kind"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    let service_account = objects
        .iter()
        .find(|object| object["kind"] == "ServiceAccount")
        .and_then(|object| object["metadata"]["name"].as_str())
        .expect("the chart has a ServiceAccount")
        .to_string();
    let container = rendered
        .iter()
        .find(|object| object["kind"] == "Deployment")
        .map(|deployment| deployment["spec"]["template"]["spec"]["containers"][0].clone())
        .expect("the chart has a Deployment");
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sandboxd-{ns}"));
    // The pod's listen address and volume, moved to what a test process may use.
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| {
            let arg = arg.as_str().expect("a string argument");
            if arg.starts_with("--admin-address=") {
                "--admin-address=127.0.0.1:0".to_string()
            } else if arg.starts_with("--sandboxd-root=") {
                format!("--sandboxd-root={}", root.display())
            } else {
                arg.to_string()
            }
        })
        .collect();
    // The downward API, done by hand.
    let pod_env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|variable| {
            let name = variable["name"].as_str().expect("a name").to_string();
            let value = match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "rbac-proof".to_string(),
                Some("metadata.namespace") => ns.clone(),
                Some(other) => panic!("unexpected field reference {other}"),
                None => variable["value"].as_str().expect("a value").to_string(),
            };
            (name, value)
        })
        .collect();
    let manifest =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}-rbac.yaml"));
    let text: String = objects
        .iter()
        .map(|object| format!("---\n{}", serde_yaml::to_string(object).expect("YAML")))
        .collect();
    std::fs::write(&manifest, text).expect("write manifest");
    env.kubectl_ok(&["apply", "-n", &ns, "-f", &manifest.display().to_string()]);
    let token = env
        .kubectl_ok(&[
            "create",
            "token",
            &service_account,
            "-n",
            &ns,
            "--duration",
            "1h",
        ])
        .trim()
        .to_string();
    let kubeconfig =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}-kubeconfig"));
    kubeconfig_with_token(&env, &token, &kubeconfig);
    let as_operator = |args: &[&str]| {
        std::process::Command::new(
            sandcastle_testkit::localcluster::tools_bin_dir().join("kubectl"),
        )
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs")
    };
    let whoami = as_operator(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!("system:serviceaccount:{ns}:{service_account}"),
        "{}",
        stderr(&whoami)
    );

    let pod_env: Vec<(&str, &str)> = pod_env
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let operator = Operator::start_args(&kubeconfig, &ns, args, &pod_env);
    env.apply(&ns, "examples/sandboxtemplate-base.yaml");
    env.apply(&ns, "examples/sandboxtemplate-python.yaml");
    env.apply(&ns, "examples/agenttask-command.yaml");
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let built = wait_for(&templates, "python", "built", |status| {
        matches!(
            status.phase,
            Some(TemplatePhase::Ready | TemplatePhase::Failed)
        )
    })
    .await;
    assert_eq!(built.phase, Some(TemplatePhase::Ready), "{built:#?}");
    assert!(built.build_id.is_some());
    let tasks: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    let done = wait_for(&tasks, "hello-command", "finished", |status| {
        matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
    })
    .await;
    assert_eq!(done.phase, Some(TaskPhase::Succeeded), "{done:#?}");
    assert!(!done.files.is_empty(), "{done:#?}");
    let events = env.kubectl_ok(&["get", "events.events.k8s.io", "-n", &ns, "-o", "json"]);
    assert!(events.contains("BuildSucceeded"), "events were recorded");
    env.kubectl_ok(&["get", "configmap", "hello-command-transcript", "-n", &ns]);
    let denied = |args: &[&str]| {
        let out = as_operator(args);
        assert!(
            !out.status.success() && stderr(&out).to_lowercase().contains("forbidden"),
            "the operator's account may {args:?}: {}",
            stderr(&out)
        );
    };
    env.kubectl_ok(&["create", "secret", "generic", "precious", "-n", &ns]);
    denied(&["delete", "secret", "precious", "-n", &ns]);
    denied(&["get", "pods", "--all-namespaces"]);
    denied(&["create", "secret", "generic", "planted", "-n", &ns]);
    denied(&[
        "patch",
        "crd",
        "agenttasks.sandcastle.dev",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"touched":"yes"}}}"#,
    ]);
    denied(&[
        "patch",
        "lease",
        "kube-scheduler",
        "-n",
        "kube-system",
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"intruder"}}"#,
    ]);
    denied(&[
        "create",
        "deployment",
        "intruder",
        "--image=intruder",
        "-n",
        &ns,
    ]);
    denied(&["get", "agenttasks", "-n", "default"]);
    denied(&["get", "secrets", "-n", "default"]);
    assert!(
        !operator.logs().to_lowercase().contains("forbidden"),
        "the operator never hit a refused request:\n{}",
        operator.logs()
    );
    drop(operator);
    let cluster_scoped: Vec<String> = objects
        .iter()
        .filter(|object| object["kind"] == "ClusterRole" || object["kind"] == "ClusterRoleBinding")
        .map(|object| {
            format!(
                "{}/{}",
                object["kind"].as_str().unwrap_or_default().to_lowercase(),
                object["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    for object in cluster_scoped {
        env.kubectl_ok(&["delete", &object]);
    }
}

/// An operator started for E2B without a key (the chart's defaults) runs, and templates
/// that rely on a provider it lacks say which and what to do.
pub async fn templates_name_the_provider_the_operator_lacks(env: Arc<TestEnv>) {
    let ns = env.namespace("unprovided").await;
    let _operator = Operator::start_with(
        env.kubeconfig_path(),
        &ns,
        &[("SANDCASTLE_PROVIDER", "e2b")],
    );
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    for (name, provider) in [
        ("implicit", json!(null)),
        ("embedded", json!({"embedded": {}})),
    ] {
        let mut spec = json!({"existing": {"templateId": "base"}});
        if !provider.is_null() {
            spec["provider"] = provider;
        }
        create(
            &templates,
            json!({
                "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
                "metadata": {"name": name}, "spec": spec,
            }),
        )
        .await;
    }
    for (name, hint) in [
        ("implicit", "E2B_API_KEY"),
        ("embedded", "--provider embedded"),
    ] {
        let status = wait_for(&templates, name, "stalled", |status| {
            status
                .conditions
                .iter()
                .any(|condition| condition.type_ == "Stalled" && condition.status == "True")
        })
        .await;
        let stalled = status
            .conditions
            .iter()
            .find(|condition| condition.type_ == "Stalled")
            .expect("Stalled");
        assert_eq!(stalled.reason, "ProviderNotConfigured", "{name}");
        assert!(
            stalled.message.contains(hint),
            "{name}: {}",
            stalled.message
        );
    }
}
