//! The table of manifests the apiserver must reject (`tests/admission/invalid.yaml`)
//! and the valid examples under `examples/`.

use std::path::{Path, PathBuf};

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

fn resource(kind: &str, name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn invalid_cases() -> Vec<InvalidCase> {
    let path = repo().join("tests/admission/invalid.yaml");
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
