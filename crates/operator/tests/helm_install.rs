//! The chart installed with the real helm on a real control plane (etcd + kube-apiserver),
//! with its own cluster rather than the controlplane tests' one: those install the CRDs
//! with kubectl, and Helm refuses objects it does not own.
//!
//! No kubelet or scheduler runs, so the operator's pods never start; these tests cover what
//! Helm and the API server do with the chart: the objects created, the RBAC the API server
//! then enforces, CRD upgrades, and what uninstall leaves behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use sandcastle_api::SandboxTemplate;
use sandcastle_testkit::localcluster::{LocalCluster, tools_bin_dir};

const RELEASE: &str = "sc";
const NAMESPACE: &str = "sandcastle-system";
const FULLNAME: &str = "sc-sandcastle";
const CRDS: [&str; 2] = [
    "agenttasks.sandcastle.dev",
    "sandboxtemplates.sandcastle.dev",
];
const OPERATOR: &str = "system:serviceaccount:sandcastle-system:sc-sandcastle";

fn repo() -> &'static Path {
    sandcastle_testkit::repo()
}

/// A control plane and a helm that keeps its cache and config in the test's directory.
struct Env {
    cluster: LocalCluster,
    client: Client,
    dir: PathBuf,
}

impl Env {
    async fn start(name: &str) -> Env {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("helm-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let cluster = LocalCluster::start(&tools_bin_dir(), &dir)
            .await
            .unwrap_or_else(|err| panic!("starting the control plane: {err}"));
        let client = cluster.client().await.expect("a client");
        Env {
            cluster,
            client,
            dir,
        }
    }

    /// Runs helm against this control plane and returns its stdout, failing the test with
    /// its output if it fails.
    fn helm(&self, args: &[&str]) -> String {
        let helm = tools_bin_dir().join("helm");
        assert!(
            helm.is_file(),
            "{} is missing: run scripts/setup",
            helm.display()
        );
        let out = Command::new(helm)
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig_path())
            .args(args)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .output()
            .expect("helm runs");
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn chart(&self) -> String {
        repo().join("charts/sandcastle").display().to_string()
    }

    async fn crds_established(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for name in CRDS {
            let established = await_condition(crds.clone(), name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .unwrap_or_else(|_| panic!("CRD {name} was not established in 30 s"))
                .expect("watching the CRD");
        }
    }

    async fn crd(&self, name: &str) -> Option<CustomResourceDefinition> {
        Api::<CustomResourceDefinition>::all(self.client.clone())
            .get_opt(name)
            .await
            .expect("reading a CRD")
    }

    /// Whether the API server lets the operator's ServiceAccount do this.
    async fn operator_may(
        &self,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> bool {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(OPERATOR.to_owned()),
                groups: Some(vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{NAMESPACE}"),
                    "system:authenticated".to_owned(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_owned()),
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    namespace: namespace.map(str::to_owned),
                    name: name.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("a SubjectAccessReview");
        answer.status.expect("a review status").allowed
    }

    async fn create_template(&self, namespace: &str) {
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
            .expect("a namespace");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a namespace");
        let text = std::fs::read_to_string(repo().join("examples/sandboxtemplate-base.yaml"))
            .expect("the example");
        let template: SandboxTemplate = serde_yaml::from_str(&text).expect("the example parses");
        Api::<SandboxTemplate>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &template)
            .await
            .expect("creating a SandboxTemplate");
    }

    async fn template_exists(&self, namespace: &str) -> bool {
        Api::<SandboxTemplate>::namespaced(self.client.clone(), namespace)
            .get_opt("base")
            .await
            .expect("reading the SandboxTemplate")
            .is_some()
    }
}

#[tokio::test]
async fn install_creates_the_operator_with_enforced_least_privilege() {
    let env = Env::start("install").await;
    env.helm(&[
        "install",
        RELEASE,
        &env.chart(),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
    ]);
    env.crds_established().await;
    for name in CRDS {
        let crd = env.crd(name).await.expect("the CRD exists");
        assert_eq!(
            crd.annotations()
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep")
        );
        assert_eq!(
            crd.annotations()
                .get("meta.helm.sh/release-name")
                .map(String::as_str),
            Some(RELEASE),
            "the release owns {name}"
        );
    }

    let client = &env.client;
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .get(FULLNAME)
        .await
        .expect("the ServiceAccount");
    let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get(FULLNAME)
        .await
        .expect("the Deployment");
    let spec = deployment.spec.expect("a Deployment spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.expect("a pod spec");
    assert_eq!(
        pod.security_context.and_then(|s| s.run_as_user),
        Some(65532),
        "the API server kept the numeric UID"
    );
    Api::<Service>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{FULLNAME}-metrics"))
        .await
        .expect("the metrics Service");
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NAMESPACE)
        .get(FULLNAME)
        .await
        .expect("the PodDisruptionBudget");
    assert_eq!(
        pdb.spec.and_then(|s| s.min_available),
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    for name in [FULLNAME.to_owned(), format!("{FULLNAME}-crds")] {
        Api::<ClusterRole>::all(client.clone())
            .get(&name)
            .await
            .expect("a ClusterRole");
        Api::<ClusterRoleBinding>::all(client.clone())
            .get(&name)
            .await
            .expect("a ClusterRoleBinding");
    }
    let lease_role = format!("{FULLNAME}-leader-election");
    Api::<Role>::namespaced(client.clone(), NAMESPACE)
        .get(&lease_role)
        .await
        .expect("the lease Role");
    Api::<RoleBinding>::namespaced(client.clone(), NAMESPACE)
        .get(&lease_role)
        .await
        .expect("the lease RoleBinding");

    // The API server's own verdicts on the bound ServiceAccount.
    let sc = "sandcastle.dev";
    let anywhere = Some("team-x");
    for (verb, group, resource) in [
        ("watch", sc, "agenttasks"),
        ("delete", sc, "agenttasks"),
        ("patch", sc, "sandboxtemplates/status"),
        ("update", sc, "agenttasks/finalizers"),
        ("get", "", "secrets"),
        ("create", "", "configmaps"),
        ("create", "events.k8s.io", "events"),
    ] {
        assert!(
            env.operator_may(verb, group, resource, anywhere, None)
                .await,
            "the operator may not {verb} {resource}"
        );
    }
    for (verb, group, resource) in [
        ("delete", sc, "sandboxtemplates"),
        ("create", "", "secrets"),
        ("delete", "", "configmaps"),
        ("create", "", "pods"),
    ] {
        assert!(
            !env.operator_may(verb, group, resource, anywhere, None)
                .await,
            "the operator may {verb} {resource}"
        );
    }
    let crd_group = "apiextensions.k8s.io";
    let crd_resource = "customresourcedefinitions";
    assert!(
        env.operator_may("get", crd_group, crd_resource, None, Some(CRDS[0]))
            .await
    );
    assert!(
        !env.operator_may(
            "get",
            crd_group,
            crd_resource,
            None,
            Some("other.example.com")
        )
        .await
    );
    assert!(
        !env.operator_may("list", crd_group, crd_resource, None, None)
            .await
    );
    let lease = ("coordination.k8s.io", "leases");
    assert!(
        env.operator_may("create", lease.0, lease.1, Some(NAMESPACE), None)
            .await
    );
    assert!(
        env.operator_may("patch", lease.0, lease.1, Some(NAMESPACE), Some(FULLNAME))
            .await
    );
    assert!(
        !env.operator_may("create", lease.0, lease.1, Some("team-x"), None)
            .await,
        "leases only in the release namespace"
    );
    assert!(
        !env.operator_may(
            "patch",
            lease.0,
            lease.1,
            Some(NAMESPACE),
            Some("someone-else")
        )
        .await,
        "only its own lease"
    );
}

#[tokio::test]
async fn upgrade_updates_crds_and_uninstall_keeps_them_unless_told_otherwise() {
    let env = Env::start("lifecycle").await;
    let chart = env.chart();
    let install = [
        "install",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
    ];
    env.helm(&install);
    env.crds_established().await;
    env.create_template("team-a").await;

    // A chart whose AgentTask CRD gained a printer column, as a new release would bring.
    let changed = env.dir.join("chart");
    copy_dir(&repo().join("charts/sandcastle"), &changed);
    let crd_copy = changed.join("files/crds/agenttasks.sandcastle.dev.yaml");
    let original = std::fs::read_to_string(&crd_copy).expect("the chart's CRD copy");
    let column = "  - additionalPrinterColumns:\n";
    assert!(original.contains(column), "the CRD has printer columns");
    let updated = original.replacen(
        column,
        &format!("{column}    - jsonPath: .spec.prompt\n      name: Prompt\n      priority: 1\n      type: string\n"),
        1,
    );
    std::fs::write(&crd_copy, updated).expect("writing the changed CRD");
    env.helm(&[
        "upgrade",
        RELEASE,
        &changed.display().to_string(),
        "--namespace",
        NAMESPACE,
    ]);
    let columns = |crd: CustomResourceDefinition| -> Vec<String> {
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    };
    let upgraded = env
        .crd(CRDS[0])
        .await
        .expect("the CRD survives the upgrade");
    assert!(
        columns(upgraded).contains(&"Prompt".to_owned()),
        "helm upgrade updated the CRD"
    );
    assert!(env.template_exists("team-a").await);

    env.helm(&["uninstall", RELEASE, "--namespace", NAMESPACE]);
    for name in CRDS {
        assert!(env.crd(name).await.is_some(), "{name} was kept");
    }
    assert!(
        env.template_exists("team-a").await,
        "a kept CRD keeps its resources"
    );
    let gone = Api::<Deployment>::namespaced(env.client.clone(), NAMESPACE)
        .get_opt(FULLNAME)
        .await
        .expect("reading the Deployment");
    assert!(gone.is_none(), "uninstall removed the rest");
    assert!(
        Api::<ClusterRole>::all(env.client.clone())
            .get_opt(FULLNAME)
            .await
            .expect("reading the ClusterRole")
            .is_none()
    );

    // Installing the release again adopts the kept CRDs (they still name it) and brings
    // back the unchanged chart's CRD; this time the release does not keep them.
    env.helm(&[&install[..], &["--set", "crds.keep=false"]].concat());
    env.crds_established().await;
    let reinstalled = env.crd(CRDS[0]).await.expect("the CRD");
    assert!(
        !reinstalled
            .annotations()
            .contains_key("helm.sh/resource-policy")
    );
    assert!(
        !columns(reinstalled).contains(&"Prompt".to_owned()),
        "the reinstalled chart's CRD replaced the upgraded one"
    );
    assert!(env.template_exists("team-a").await);

    let mut uids = Vec::new();
    for name in CRDS {
        uids.push(env.crd(name).await.expect("the CRD").uid().expect("a uid"));
    }
    env.helm(&["uninstall", RELEASE, "--namespace", NAMESPACE]);
    // The API server deletes the CRDs' resources first, then the CRDs.
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for (name, uid) in CRDS.into_iter().zip(&uids) {
        let deleted = await_condition(crds.clone(), name, conditions::is_deleted(uid));
        tokio::time::timeout(Duration::from_secs(30), deleted)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} still exists 30 s after uninstall"))
            .expect("watching the CRD");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for entry in std::fs::read_dir(from).expect("reading a directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a file");
        }
    }
}
