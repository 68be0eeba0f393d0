//! Types both resources share: object references and status conditions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `type` of the summary condition every Sandcastle object carries.
pub const CONDITION_READY: &str = "Ready";
/// kstatus: `True` while the operator is still working towards the desired state.
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// kstatus: `True` when the operator cannot make progress until something changes.
pub const CONDITION_STALLED: &str = "Stalled";
/// A task's verdict once it ended: `True` when it succeeded, `False` when it failed.
pub const CONDITION_SUCCEEDED: &str = "Succeeded";
/// A template's warm pool: `True` while it holds its size of idle sandboxes of the
/// current build. Absent on a template without a pool.
pub const CONDITION_POOL_READY: &str = "PoolReady";

/// The most conditions a status may hold: one per condition type Sandcastle defines,
/// with room to add types without an API change.
pub const MAX_CONDITIONS: u32 = 16;

/// The schema of a JSON object kept as written: the apiserver checks only that it is an
/// object.
pub(crate) fn free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// A reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the object, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeySelector {
    /// Name of the Secret, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// When true, a missing Secret or key leaves the variable unset instead of
    /// holding the task back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// A key of a ConfigMap in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ConfigMapKeySelector {
    /// Name of the ConfigMap, in the namespace of the referring resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}
