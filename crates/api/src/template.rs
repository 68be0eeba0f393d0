//! `SandboxTemplate`: a sandbox image the operator builds on (or adopts from) the provider.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{LocalObjectReference, MAX_CONDITIONS};

/// The most build steps a template may declare.
pub const MAX_BUILD_STEPS: u32 = 100;
/// The most build-log lines kept in `status.logTail`.
pub const MAX_LOG_TAIL_LINES: u32 = 50;
/// The longest build-log line kept in `status.logTail`, in characters.
pub const MAX_LOG_LINE_CHARS: u32 = 1024;
/// The longest `status.message`, in characters.
pub const MAX_MESSAGE_CHARS: u32 = 4096;

/// A sandbox template: the image every sandbox of an `AgentTask` starts from.
///
/// The operator builds it on the provider (or adopts an existing one) and records the
/// provider's template ID and build ID in status as soon as the provider returns them.
// Each `printcolumn(...)` repeats the keys `type_` and `priority`, which clippy
// mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandcastle.dev",
    version = "v1alpha1",
    kind = "SandboxTemplate",
    namespaced,
    doc = "A sandbox template built on (or adopted from) a sandbox provider.",
    status = "SandboxTemplateStatus",
    shortname = "sbt",
    category = "sandcastle",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Template ID",
        type_ = "string",
        json_path = ".status.templateId"
    ),
    printcolumn(name = "Warm", type_ = "integer", json_path = ".status.pool.ready"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Build ID",
        type_ = "string",
        json_path = ".status.buildId",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.existing) != has(self.build)")
    .message("set exactly one template source: existing (adopt a template built elsewhere) or build"))]
pub struct SandboxTemplateSpec {
    /// Where the template lives. Absent means the operator's default provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderSpec>,

    /// Adopt a template that already exists on the provider. It is never built and never deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<ExistingTemplate>,

    /// Build the template on the provider from an image or another template plus steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<TemplateBuild>,

    /// What happens to a built template on the provider when this resource is deleted.
    /// Templates adopted through `existing` are never deleted, whatever this says.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Sandboxes kept created and idle on the provider, so a task takes one instead of
    /// waiting for a create. On a paid E2B account idle sandboxes cost money.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<WarmPool>,
}

/// The most sandboxes a template's warm pool may hold.
pub const MAX_POOL_SIZE: i32 = 100;

/// A warm pool of sandboxes for one template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WarmPool {
    /// How many idle sandboxes to keep. Tasks that find none create one as usual.
    #[schemars(range(min = 0, max = MAX_POOL_SIZE))]
    pub size: i32,

    /// A warm sandbox older than this is replaced by a fresh one.
    #[serde(default = "default_max_age_seconds")]
    #[schemars(range(min = 60, max = 86400))]
    pub max_age_seconds: i32,
}

fn default_max_age_seconds() -> i32 {
    3600
}

/// The warm pool as the operator last saw it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Idle sandboxes of the current build, ready to be taken.
    pub ready: i32,
    /// Sandboxes asked for in the last pass and not yet seen ready.
    pub creating: i32,
    /// Idle sandboxes of an older build, replaced as fresh ones come up: how far a roll
    /// after a rebuild has to go.
    pub outdated: i32,
    /// Pool sandboxes taken by tasks and still running.
    pub claimed: i32,
    /// The build the pool's fresh sandboxes are of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

/// A sandbox provider. Exactly one kind must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.embedded) != has(self.e2b)")
    .message("set exactly one provider: embedded or e2b"))]
pub struct ProviderSpec {
    /// The sandbox server embedded in the operator: local, isolated processes, for
    /// development and tests. Takes no settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedProvider>,

    /// An E2B-compatible service: e2b.dev, self-hosted E2B, or any service that speaks its API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2b: Option<E2bProvider>,
}

/// The embedded sandbox server. It has no settings of its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct EmbeddedProvider {}

/// Connection settings for an E2B-compatible service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct E2bProvider {
    /// Base URL of the control-plane REST API.
    #[serde(default = "default_e2b_api_url")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("apiUrl must be an http:// or https:// URL"))]
    pub api_url: String,

    /// URL of a sandbox's daemon. `{port}`, `{sandboxId}` and `{domain}` are replaced per
    /// sandbox; a URL without placeholders is one shared host that routes by the
    /// `E2b-Sandbox-Id` header. Absent means `https://{port}-{sandboxId}.{domain}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("sandboxUrl must be an http:// or https:// URL pattern"))]
    pub sandbox_url: Option<String>,

    /// The sandbox domain, substituted for `{domain}` in `sandboxUrl`.
    #[serde(default = "default_e2b_domain")]
    #[schemars(length(min = 1, max = 253))]
    pub domain: String,

    /// The Secret key holding the API key (sent as `X-API-Key`).
    pub api_key_secret_ref: ApiKeySecretRef,
}

fn default_e2b_api_url() -> String {
    "https://api.e2b.app".into()
}

fn default_e2b_domain() -> String {
    "e2b.app".into()
}

/// A Secret key holding a provider API key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ApiKeySecretRef {
    /// Name of the Secret, in the namespace of the template.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[serde(default = "default_api_key_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_api_key_key() -> String {
    "E2B_API_KEY".into()
}

/// A template that was built outside Sandcastle.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExistingTemplate {
    /// The provider's template ID or name (for example `base`).
    #[schemars(length(min = 1, max = 253))]
    pub template_id: String,
}

/// How to build a template on the provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fromImage) != has(self.fromTemplate)")
    .message("set exactly one base: fromImage or fromTemplate"))]
pub struct TemplateBuild {
    /// The template's name on the provider. Absent means `<namespace>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    )]
    pub name: Option<String>,

    /// A container image to start from, such as `python:3.12-slim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub from_image: Option<String>,

    /// A provider template (ID or name) to start from, such as `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub from_template: Option<String>,

    /// Steps applied in order on top of the base, like the instructions of a Dockerfile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_BUILD_STEPS))]
    pub steps: Vec<BuildStep>,

    /// A command started when a sandbox starts from this template (for example a server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub start_cmd: Option<String>,

    /// A command that exits 0 once the start command is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub ready_cmd: Option<String>,

    /// vCPUs of each sandbox: 1 or an even number up to 32.
    #[serde(default = "default_cpu_count")]
    #[schemars(range(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self == 1 || self % 2 == 0")
        .message("cpuCount must be 1 or an even number (2, 4, … 32)"))]
    pub cpu_count: i32,

    /// Memory of each sandbox in MiB: an even number, at least 128.
    #[serde(rename = "memoryMB", default = "default_memory_mb")]
    #[schemars(range(min = 128, max = 1048576))]
    #[x_kube(validation = Rule::new("self % 2 == 0").message("memoryMB must be an even number"))]
    pub memory_mb: i32,

    /// How long the build may take, in seconds (at most 3600). Absent means the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
}

fn default_cpu_count() -> i32 {
    2
}

fn default_memory_mb() -> i32 {
    1024
}

/// One build step. Exactly one kind must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.run) ? 1 : 0) + (has(self.env) ? 1 : 0) + (has(self.workdir) ? 1 : 0) + (has(self.user) ? 1 : 0) + (has(self.copy) ? 1 : 0) == 1"
).message("each build step must set exactly one of run, env, workdir, user or copy"))]
pub struct BuildStep {
    /// A shell command, run as the current user in the current working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub run: Option<String>,

    /// Environment variables set for later steps and for sandboxes started from the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub env: Option<BTreeMap<String, String>>,

    /// The working directory for later steps and for sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub workdir: Option<String>,

    /// The user later steps run as (created if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<StepUser>,

    /// Files copied into the template from a ConfigMap's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyStep>,
}

/// The user for later build steps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct StepUser {
    /// Name of the user.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z_][a-z0-9_-]*$"))]
    pub name: String,
    /// Whether the user may use passwordless sudo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sudo: bool,
}

/// Copies every key of a ConfigMap as a file into a directory of the template.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyStep {
    /// The ConfigMap whose keys become file names and whose values become contents.
    pub config_map_ref: LocalObjectReference,
    /// The directory the files land in.
    #[schemars(length(min = 1, max = 4096))]
    pub dest: String,
    /// Octal file mode such as `0644`. Absent keeps the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^0?[0-7]{3}$"))]
    pub mode: Option<String>,
    /// Owner of the files as `user` or `user:group`. Absent means the current build user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65))]
    pub owner: Option<String>,
}

/// What happens to a built template on the provider when the resource is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the template on the provider.
    #[default]
    Delete,
    /// Leave the template on the provider.
    Retain,
}

/// Observed state of a `SandboxTemplate`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateStatus {
    /// A one-word summary for people. Display only: read `conditions` in automation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TemplatePhase>,

    /// `Ready`, plus the kstatus pair `Reconciling` (a build is in progress) and
    /// `Stalled` (progress needs a change to the spec, a Secret or a ConfigMap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The provider's template ID, recorded as soon as the provider returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,

    /// The provider's ID of the current (or last) build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,

    /// The template's name on the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_name: Option<String>,

    /// Hash of everything that affects the build, including referenced ConfigMap data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,

    /// When the current build was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_started_at: Option<Time>,

    /// When the current build finished, successfully or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_completed_at: Option<Time>,

    /// The 1-based index of the build step that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<i32>,

    /// The last lines of the build log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_LOG_TAIL_LINES), inner(length(max = MAX_LOG_LINE_CHARS)))]
    pub log_tail: Vec<String>,

    /// A human-readable explanation of the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE_CHARS))]
    pub message: Option<String>,

    /// The warm pool, when the spec asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,
}

/// Display summary of a `SandboxTemplate`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TemplatePhase {
    /// Not yet acted on.
    Pending,
    /// A build is in progress on the provider.
    Building,
    /// The template can be used by tasks.
    Ready,
    /// The build failed or the template cannot be resolved; see conditions.
    Failed,
}
