//! kubernetes-sigs/agent-sandbox, the peer the benchmarks measure Sandcastle beside: its
//! controller built from the Go module pinned in `tools/peers` (by `tools/peers/build.sh`,
//! cached) and its CRDs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

/// The release `tools/peers/go.mod` pins.
pub const VERSION: &str = "v0.5.6";
const GROUP: &str = "extensions.agents.x-k8s.io";

/// Builds the controller (or finds it cached); returns the directory holding it and the
/// release's CRDs.
pub fn build() -> Result<PathBuf, String> {
    let script = crate::repo().join("tools/peers/build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "tools/peers/build.sh failed ({}); its output is above",
            out.status
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A kind of the extensions group (SandboxTemplate, SandboxWarmPool, SandboxClaim).
pub fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1beta1", kind), plural)
}

pub fn object(resource: &ApiResource, name: &str, spec: Value) -> DynamicObject {
    let mut object = DynamicObject::new(name, resource);
    object.data = json!({"spec": spec});
    object
}

/// The peer's CRDs as its release ships them, without the conversion webhook: every
/// request here uses the storage version, and no webhook server runs.
pub async fn install_crds(client: &kube::Client, dir: &Path) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let files = std::fs::read_dir(dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    for file in files.filter_map(Result::ok) {
        if file.path().extension().is_none_or(|ext| ext != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(file.path()).map_err(|error| error.to_string())?;
        let mut crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .map_err(|error| format!("{}: {error}", file.path().display()))?;
        crd.spec.conversion = None;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("sandcastle-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|error| format!("installing CRD {name}: {error}"))?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .map_err(|_| format!("CRD {name} was not established"))?
            .map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// The controller with its extensions (SandboxClaim, SandboxWarmPool) against the cluster
/// of `kubeconfig`: no leader election, no webhook, no metrics or health listeners.
pub fn controller(dir: &Path, kubeconfig: &Path) -> Command {
    let mut command = Command::new(dir.join("agent-sandbox-controller"));
    command
        .args([
            "--extensions",
            "--leader-elect=false",
            "--enable-webhook=false",
        ])
        .args(["--manage-webhook-certs=false", "--metrics-bind-address=0"])
        .args(["--health-probe-bind-address=0", "--kubeconfig"])
        .arg(kubeconfig)
        .stdin(Stdio::null());
    command
}
