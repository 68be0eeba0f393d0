//! The table of manifests the apiserver must reject (`tests/admission/invalid.yaml`)
//! and the valid examples under `examples/`.

use std::path::PathBuf;

use crate::repo;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use sandcastle_api::{AgentTask, SandboxTemplate};
use serde::Deserialize;
use serde_json::{Value, json};

/// Which layer rejects a case.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// An x-kubernetes-validations (CEL) rule.
    Cel,
    /// An OpenAPI constraint (required, range, enum, pattern).
    Schema,
}

/// One manifest that must be rejected.
#[derive(Deserialize, Debug, Clone)]
pub struct InvalidCase {
    pub name: String,
    pub kind: String,
    pub check: Check,
    pub field: String,
    pub message: String,
    pub spec: Value,
    #[serde(default)]
    pub update: Option<Value>,
}

impl InvalidCase {
    /// The object to create: `spec` wrapped into a full resource.
    pub fn object(&self, name: &str) -> Value {
        resource(&self.kind, name, &self.spec)
    }

    /// The object to update to, for cases about changes after creation.
    pub fn updated_object(&self, name: &str) -> Option<Value> {
        self.update
            .as_ref()
            .map(|spec| resource(&self.kind, name, spec))
    }
}

/// Submits `case` to the apiserver as `name` in `ns`: `Ok` when it is refused with 422
/// and a message naming both its field and its problem, else what happened instead.
pub async fn rejection(
    client: &kube::Client,
    ns: &str,
    name: &str,
    case: &InvalidCase,
) -> Result<(), String> {
    let kind = match case.kind.as_str() {
        "AgentTask" => ApiResource::erase::<AgentTask>(&()),
        "SandboxTemplate" => ApiResource::erase::<SandboxTemplate>(&()),
        other => panic!("no API for kind {other}"),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind);
    let object =
        |value: Value| -> DynamicObject { serde_json::from_value(value).expect("a valid object") };
    let result = match case.updated_object(name) {
        None => api
            .create(&PostParams::default(), &object(case.object(name)))
            .await
            .map(drop),
        Some(updated) => {
            api.create(&PostParams::default(), &object(case.object(name)))
                .await
                .unwrap_or_else(|err| panic!("case {:?}: the original is valid: {err}", case.name));
            api.patch(name, &PatchParams::default(), &Patch::Merge(&updated))
                .await
                .map(drop)
        }
    };
    match result {
        Ok(()) => Err(format!("{:?} was accepted", case.name)),
        Err(kube::Error::Api(status))
            if status.code == 422
                && status.message.contains(&case.field)
                && status.message.contains(&case.message) =>
        {
            Ok(())
        }
        Err(kube::Error::Api(status)) => Err(format!(
            "{:?} ({:?} check): expected 422 with {:?} and {:?}, got {}: {}",
            case.name, case.check, case.field, case.message, status.code, status.message
        )),
        Err(other) => Err(format!("{:?}: unexpected error {other}", case.name)),
    }
}

fn resource(kind: &str, name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

pub fn invalid_cases() -> Vec<InvalidCase> {
    let path = repo().join("crates/operator/tests/admission/invalid.yaml");
    let text = std::fs::read_to_string(&path).expect("tests/admission/invalid.yaml is readable");
    serde_yaml::from_str(&text).expect("tests/admission/invalid.yaml parses")
}

/// The example manifests, each file with its YAML documents.
pub fn examples() -> Vec<(PathBuf, Vec<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .expect("examples/ is readable")
        .map(|entry| entry.expect("examples/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("example is readable");
            let docs = serde_yaml::Deserializer::from_str(&text)
                .map(|doc| Value::deserialize(doc).expect("example parses"))
                .collect();
            (path, docs)
        })
        .collect()
}
