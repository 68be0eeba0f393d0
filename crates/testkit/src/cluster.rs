//! One real control plane per test binary, with a namespace per test.

use std::future::Future;
use std::path::Path;

use crate::repo;
use std::pin::Pin;
use std::process::{Command, ExitCode, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::localcluster::{LocalCluster, tools_bin_dir};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};

pub struct TestEnv {
    cluster: LocalCluster,
    pub client: Client,
    namespaces: AtomicUsize,
}

/// A test that works on the control plane its binary shares.
pub type SharedTest = fn(Arc<TestEnv>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `tests` as the binary's tests on one control plane, started before the first
/// and torn down after the last even when tests fail (a custom harness: libtest's runs
/// no code after its tests). Listing the tests starts nothing.
pub fn run_shared(
    controller_manager: bool,
    tests: impl IntoIterator<Item = (&'static str, SharedTest)>,
) -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let runtime = Arc::new(tokio::runtime::Runtime::new().expect("a tokio runtime"));
    // Started on the main thread: the children die with the thread that spawned them.
    let env = if args.list {
        None
    } else {
        match runtime.block_on(TestEnv::start_with(controller_manager)) {
            Ok(env) => Some(Arc::new(env)),
            Err(err) => {
                eprintln!("cannot start the control plane: {err}");
                return ExitCode::FAILURE;
            }
        }
    };
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let runtime = runtime.clone();
            let env = env.clone();
            libtest_mimic::Trial::test(name, move || {
                runtime.block_on(test(env.expect("the control plane runs")));
                Ok(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(env);
    conclusion.exit_code()
}

impl TestEnv {
    /// Starts etcd and kube-apiserver, and kube-controller-manager's namespace and
    /// garbage-collector controllers when `controller_manager` says so, and installs the
    /// CRDs the way a user does, with `kubectl apply -f crds/`.
    pub async fn start_with(controller_manager: bool) -> Result<Self, String> {
        let work = crate::scratch_dir();
        let cluster = LocalCluster::start(&tools_bin_dir(), &work)
            .await
            .map_err(|err| err.to_string())?;
        if controller_manager {
            cluster
                .start_controller_manager(&tools_bin_dir())
                .map_err(|err| err.to_string())?;
        }
        let client = cluster.client().await.map_err(|err| err.to_string())?;
        let env = Self {
            cluster,
            client,
            namespaces: AtomicUsize::new(0),
        };
        let out = env.kubectl(&["apply", "-f", &repo().join("crds").display().to_string()]);
        if !out.status.success() {
            return Err(format!("kubectl apply -f crds/ failed: {}", stderr(&out)));
        }
        let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
        for crd in sandcastle_api::all() {
            let name = crd.name_any();
            let established =
                await_condition(crds.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .map_err(|_| format!("CRD {name} was not established in 30 s"))?
                .map_err(|err| err.to_string())?;
        }
        Ok(env)
    }

    /// Creates a fresh namespace for one test.
    pub async fn namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .expect("a namespace object");
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|err| panic!("creating namespace {name}: {err}"));
        name
    }

    /// Whether kube-controller-manager runs, with the end of its log.
    // Only the reliability suite runs it.
    pub fn controller_manager_report(&self) -> String {
        self.cluster.controller_manager_report()
    }

    /// Kills kube-apiserver, leaving etcd: an outage of the control plane.
    // Only the reliability suite stops it.
    pub fn stop_apiserver(&self) {
        self.cluster.stop_apiserver();
    }

    /// Starts kube-apiserver again as it was (same port, certificates and etcd).
    pub async fn restart_apiserver(&self) -> Result<(), String> {
        self.cluster
            .restart_apiserver()
            .await
            .map_err(|err| err.to_string())
    }

    pub fn kubeconfig_path(&self) -> &Path {
        self.cluster.kubeconfig_path()
    }

    /// Runs the real kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(tools_bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.cluster.kubeconfig_path())
            .args(args)
            .output()
            .expect("kubectl runs (scripts/setup installs it)")
    }

    /// `kubectl apply -n NS -f PATH` for a path of this repository.
    pub fn apply(&self, ns: &str, path: &str) -> String {
        self.kubectl_ok(&[
            "apply",
            "-n",
            ns,
            "-f",
            &repo().join(path).display().to_string(),
        ])
    }

    /// Runs kubectl, failing the test with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
