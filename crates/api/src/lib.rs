//! The custom resources Sandcastle serves: `SandboxTemplate` and `AgentTask`
//! (group `sandcastle.dev`, version `v1alpha1`).
//!
//! Every rule a user can break by editing a manifest lives in the schema or in
//! CEL, so bad input is rejected at admission with a message that names the fix;
//! the controllers only see objects the apiserver already accepted.

mod common;
pub mod conditions;
mod install;
pub mod names;
pub mod reasons;
mod task;
mod template;

pub use common::*;
pub use install::install;
pub use reasons::{PoolReason, TaskReason, TemplateReason};
pub use task::*;
pub use template::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Both CRDs, in the order of their file names under `crds/`, which is also the order
/// `sandcastle crd` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![AgentTask::crd(), SandboxTemplate::crd()]
}

/// The file under `crds/` that holds a CRD, by its `metadata.name`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    let name = crd.metadata.name.as_deref().unwrap_or_default();
    format!("{name}.yaml")
}

/// Renders CRDs as a multi-document YAML stream.
pub fn to_yaml(crds: &[CustomResourceDefinition]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(crd)?);
    }
    Ok(out)
}
