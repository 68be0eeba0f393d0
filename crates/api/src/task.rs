//! `AgentTask`: one run of a coding agent in a fresh sandbox.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConfigMapKeySelector, LocalObjectReference, MAX_CONDITIONS, SecretKeySelector, free_object,
};
use super::template::MAX_MESSAGE_CHARS;

/// The longest prompt, in characters.
pub const MAX_PROMPT_CHARS: u32 = 65_536;
/// The most files `status.files` lists (also the upper bound of `outputs.maxFiles`).
pub const MAX_OUTPUT_FILES: u32 = 5_000;
/// The longest `status.result.text`, in bytes.
pub const MAX_RESULT_TEXT_BYTES: u32 = 4_096;
/// The largest `status.result.structuredOutput`, in bytes of JSON.
pub const MAX_STRUCTURED_OUTPUT_BYTES: usize = 16_384;
/// The longest path recorded in `status.files`, in characters.
pub const MAX_OUTPUT_PATH_CHARS: u32 = 4_096;
/// The most entries of each list in the spec (environment, files, tools, arguments).
pub const MAX_SPEC_LIST_ITEMS: u32 = 128;

/// A task for a coding agent: run a prompt (or a command) in a sandbox started from a
/// `SandboxTemplate`, then record the result, usage and generated files in status.
///
/// The spec cannot change after creation; deleting the task cancels it.
// Each `printcolumn(...)` repeats the keys `type_` and `priority`, which clippy
// mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandcastle.dev",
    version = "v1alpha1",
    kind = "AgentTask",
    namespaced,
    doc = "A coding-agent run in a sandbox, with its result, usage and generated files.",
    status = "AgentTaskStatus",
    shortname = "at",
    category = "sandcastle",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Template",
        type_ = "string",
        json_path = ".spec.templateRef.name"
    ),
    printcolumn(
        name = "Turns",
        type_ = "integer",
        json_path = ".status.progress.turns"
    ),
    printcolumn(name = "Cost", type_ = "string", json_path = ".status.usage.costUSD"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Sandbox ID",
        type_ = "string",
        json_path = ".status.sandboxId",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf")
        .message("the AgentTask spec is immutable: delete the task and create a new one"),
    validation = Rule::new("(has(self.agent) && has(self.agent.command)) || has(self.prompt)")
        .message("prompt is required for the claudeCode agent (the default agent)")
        .field_path(".prompt")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.outputs) || !has(self.outputs.git) || (has(self.workspace) && has(self.workspace.git))")
        .message("outputs.git pushes to the repository of workspace.git: set workspace.git too")
        .field_path(".outputs.git")
        .reason(Reason::FieldValueRequired)
)]
pub struct AgentTaskSpec {
    /// The `SandboxTemplate` (same namespace) the sandbox starts from.
    pub template_ref: LocalObjectReference,

    /// What the agent is asked to do. Required for the Claude Code agent; the `command`
    /// agent receives it in the `SANDCASTLE_PROMPT` environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PROMPT_CHARS))]
    pub prompt: Option<String>,

    /// The agent to run. Absent means `claudeCode` with its defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<Agent>,

    /// Environment variables of the agent process, literal or from Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS))]
    pub env: Vec<EnvVar>,

    /// Secrets whose every key becomes an environment variable of the agent process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub env_from: Vec<EnvFromSource>,

    /// The directory the agent works in and the files written there before it starts.
    #[serde(default)]
    pub workspace: Workspace,

    /// How long the task may take from its creation, waiting included, in seconds
    /// (1–86400).
    #[serde(default = "default_active_deadline_seconds")]
    #[schemars(range(min = 1, max = 86_400))]
    pub active_deadline_seconds: i64,

    /// How many times an infrastructure failure (provider errors, a vanished sandbox) is
    /// retried in a new sandbox. Agent failures are never retried.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: i32,

    /// Delete the task this many seconds after it finished. Absent keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Which generated files are listed in status.
    #[serde(default)]
    pub outputs: Outputs,

    /// Where the agent's sandbox may connect to. Enforced where the provider can: the
    /// kubernetes runtime by the sandbox's NetworkPolicy, E2B by its firewall; the local
    /// runtime does not restrict egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<TaskNetwork>,
}

/// The egress a task's sandbox is allowed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskNetwork {
    /// Whether the sandbox reaches the internet: addresses outside the provider's denied
    /// ranges (the kubernetes runtime denies private and link-local ones). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,

    /// Addresses the sandbox may reach whatever else is denied, such as a model endpoint or
    /// a git host inside the cluster: IPv4 or IPv6 addresses or CIDRs. Host names are
    /// refused, since a NetworkPolicy cannot name them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(
            length(min = 1, max = 64),
            regex(pattern = r"^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$")
        )
    )]
    pub allow_out: Vec<String>,
}

fn default_active_deadline_seconds() -> i64 {
    1800
}

fn default_backoff_limit() -> i32 {
    2
}

/// The agent to run. Exactly one kind must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.claudeCode) != has(self.command)")
    .message("set exactly one agent: claudeCode or command"))]
pub struct Agent {
    /// The Claude Code CLI in headless mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_code: Option<ClaudeCodeAgent>,

    /// A plain command; success is exit code 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandAgent>,
}

/// Settings of the Claude Code CLI.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeCodeAgent {
    /// The model (`--model`). Absent means the CLI's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model: Option<String>,

    /// Tools allowed without asking (`--allowedTools`), such as `Bash(git:*)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS), inner(length(min = 1, max = 1024)))]
    pub allowed_tools: Vec<String>,

    /// Tools the agent may not use (`--disallowedTools`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS), inner(length(min = 1, max = 1024)))]
    pub disallowed_tools: Vec<String>,

    /// The permission mode (`--permission-mode`).
    #[serde(default)]
    pub permission_mode: PermissionMode,

    /// The most agentic turns (`--max-turns`). Absent means the CLI's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_turns: Option<i32>,

    /// Text appended to the system prompt (`--append-system-prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65_536))]
    pub append_system_prompt: Option<String>,

    /// Further CLI arguments, appended as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS), inner(length(max = 4096)))]
    pub extra_args: Vec<String>,

    /// A JSON Schema the agent's answer must match (`--json-schema`): the CLI has the
    /// model answer with an object it validates, which lands in
    /// `status.result.structuredOutput`. A run that gives none fails with
    /// `StructuredOutputFailed`; a schema the CLI refuses, with `InvalidJsonSchema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub json_schema: Option<serde_json::Map<String, serde_json::Value>>,

    /// MCP servers the agent may use, passed with `--mcp-config` and
    /// `--strict-mcp-config` (so no other MCP configuration in the sandbox adds any). Their
    /// tools are named `mcp__<name>__<tool>`; list them in `allowedTools` where the
    /// permission mode asks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_MCP_SERVERS))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.name == s.name))")
        .message("each MCP server needs a name of its own"))]
    pub mcp_servers: Vec<McpServer>,
}

/// The most MCP servers one task gives its agent.
pub const MAX_MCP_SERVERS: u32 = 16;

/// An MCP server for the agent: a command it starts in the sandbox (stdio), or a server
/// it reaches over HTTP.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.command) != has(self.url)")
        .message("each MCP server sets exactly one of command (started in the sandbox) or url (reached over HTTP)"),
    validation = Rule::new("!has(self.headers) || has(self.url)")
        .message("headers are for an MCP server with a url"),
    validation = Rule::new("!has(self.env) || has(self.command)")
        .message("env is for an MCP server with a command"),
    validation = Rule::new("!has(self.transport) || has(self.url)")
        .message("transport is for an MCP server with a url")
)]
pub struct McpServer {
    /// The server's name, in its tools' names: letters, digits, `_` and `-`.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+$')")
        .message("an MCP server's name takes letters, digits, '_' and '-'"))]
    pub name: String,

    /// The program and its arguments, started by the agent in the sandbox (stdio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_SPEC_LIST_ITEMS), inner(length(min = 1, max = 4096)))]
    pub command: Option<Vec<String>>,

    /// The command's environment, literal or from Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS))]
    pub env: Vec<EnvVar>,

    /// The server's URL (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("an MCP server's url starts with http:// or https://"))]
    pub url: Option<String>,

    /// `http` (streamable HTTP, the default) or `sse` (the older HTTP+SSE transport).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<McpTransport>,

    /// Headers of every request to the server, literal or from Secrets (an
    /// `Authorization` token, say); values from Secrets are redacted like any other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub headers: Vec<McpHeader>,
}

/// How the agent talks to an MCP server it reaches by URL.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum McpTransport {
    #[default]
    Http,
    Sse,
}

/// A header of the requests to an MCP server. Exactly one of `value` and `valueFrom`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)")
    .message("each header must set exactly one of value or valueFrom"))]
pub struct McpHeader {
    /// The header's name.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&*+.^_|~-]+$')")
        .message("a header name takes letters, digits and !#$%&*+.^_|~-"))]
    pub name: String,

    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16_384))]
    pub value: Option<String>,

    /// A value read from a Secret when the task starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// The Claude Code permission mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PermissionMode {
    /// Ask for every tool that is not allowed (headless: such calls are denied).
    Default,
    /// Accept file edits without asking.
    AcceptEdits,
    /// Run every tool without asking; the sandbox is the boundary.
    #[default]
    BypassPermissions,
    /// Deny every tool that is not allowed, without asking.
    DontAsk,
    /// Plan only; change nothing.
    Plan,
}

/// A plain command run in the workspace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct CommandAgent {
    /// The program and its arguments; not run through a shell.
    #[schemars(length(min = 1, max = MAX_SPEC_LIST_ITEMS), inner(length(max = 65_536)))]
    pub command: Vec<String>,
}

/// An environment variable of the agent process. Exactly one of `value` and `valueFrom`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)")
    .message("each env entry must set exactly one of value or valueFrom"))]
pub struct EnvVar {
    /// The variable's name: letters, digits and `_`, not starting with a digit.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_]*$')")
        .message("env name must be a valid environment variable name: letters, digits and '_', not starting with a digit"))]
    pub name: String,

    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 131_072))]
    pub value: Option<String>,

    /// A value read from a Secret when the task starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a Secret in the task's namespace.
    pub secret_key_ref: SecretKeySelector,
}

/// A Secret whose keys all become environment variables.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromSource {
    /// The Secret, in the task's namespace.
    pub secret_ref: SecretReference,

    /// Prepended to every key to form the variable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub prefix: Option<String>,
}

/// A whole Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// When true, a missing Secret is skipped instead of holding the task back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// The agent's working directory and its input files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// Absolute path of the working directory inside the sandbox.
    #[serde(default = "default_workspace_path")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("workspace.path must be an absolute path"))]
    pub path: String,

    /// Files written into the workspace before the agent starts (after the clone, when
    /// `git` is set, so they can add to or replace the repository's files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS))]
    pub files: Vec<WorkspaceFile>,

    /// A git repository cloned into the workspace before the agent starts. The workspace
    /// directory must not exist in the template's image, or be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
}

impl Default for Workspace {
    fn default() -> Self {
        Self {
            path: default_workspace_path(),
            files: Vec::new(),
            git: None,
        }
    }
}

/// The ref rule git and Sandcastle both accept: a strict subset of `git check-ref-format`.
macro_rules! ref_rule {
    ($what:literal) => {
        Rule::new(concat!(
            "self.matches('^[A-Za-z0-9._/-]+$') && !self.startsWith('-') && !self.startsWith('.')",
            " && !self.startsWith('/') && !self.endsWith('/') && !self.endsWith('.')",
            " && !self.endsWith('.lock') && !self.contains('..') && !self.contains('//')",
            " && !self.contains('/.')"
        ))
        .message(concat!(
            $what,
            " must be a git ref name: letters, digits and . _ / -, not starting with - . or /,",
            " not ending with / . or .lock, without .. or // or a component starting with ."
        ))
    };
}

/// A repository cloned over HTTP(S) into the workspace. The credentials reach only the
/// clone and push processes, which run while no process of the agent does.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// The repository's `https://` (or `http://`) URL, without credentials.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(r"self.matches('^https?://[^/@?#\\s]+(/\\S*)?$')")
        .message("workspace.git.url must be an http:// or https:// URL without credentials in it: put them in a Secret named by secretRef"))]
    pub url: String,

    /// A branch, a tag or a full 40-character commit SHA. Absent means the remote's
    /// default branch.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = ref_rule!("workspace.git.ref"))]
    pub git_ref: Option<String>,

    /// Fetch only this many commits of history. Absent means the whole history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub depth: Option<i32>,

    /// Clone the repository's submodules too (recursively). The credentials are offered
    /// only to the repository's own host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub submodules: bool,

    /// A Secret of the `kubernetes.io/basic-auth` shape: `password` (a password or an
    /// access token) and, optionally, `username` (default `git`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,

    /// The largest the clone may grow to, in MiB (default 1024): a larger repository
    /// fails the task with `GitRepositoryTooLarge`.
    #[serde(rename = "maxSizeMiB", default = "default_git_max_size_mib")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_size_mib: i32,
}

fn default_git_max_size_mib() -> i32 {
    1024
}

fn default_workspace_path() -> String {
    "/home/user/workspace".into()
}

/// One input file. Exactly one of `content` and `configMapKeyRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.content) != has(self.configMapKeyRef)")
    .message("each workspace file must set exactly one of content or configMapKeyRef"))]
pub struct WorkspaceFile {
    /// Path relative to the workspace; may not start with `/` or contain `..`.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')")
        .message("workspace file path must be relative to the workspace and may not contain '..'"))]
    pub path: String,

    /// The file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1_048_576))]
    pub content: Option<String>,

    /// A ConfigMap key holding the file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeySelector>,
}

/// Which generated files are listed in status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Outputs {
    /// The most files listed in `status.files` (at most 5000); `status.fileCount` counts them all.
    #[serde(default = "default_max_files")]
    #[schemars(range(min = 0, max = MAX_OUTPUT_FILES))]
    pub max_files: i32,

    /// Glob patterns, relative to the workspace, of files never listed.
    #[serde(default = "default_exclude")]
    #[schemars(length(max = MAX_SPEC_LIST_ITEMS), inner(length(min = 1, max = 1024)))]
    pub exclude: Vec<String>,

    /// What to do with the repository of `workspace.git` once the agent succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitOutputs>,

    /// Keep the diff of the agent's work (`git diff`, binary files named only) in the
    /// ConfigMap `<task>-patch` the task owns, under `patch`, redacted and cut to
    /// 512 KiB: against the base commit of `workspace.git`, or, without it, against the
    /// workspace as seeded (which needs git in the template's image). Kept for a failed
    /// agent too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub patch: bool,

    /// Files of the workspace kept after the sandbox is gone, chosen by glob: their
    /// names, sizes and SHA-256 in `status.artifacts`, their contents in the ConfigMap
    /// `<task>-artifacts` (as many as fit 768 KiB, text with Secret values redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub artifacts: Vec<ArtifactPattern>,
}

/// Files to keep as artifacts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ArtifactPattern {
    /// A glob relative to the workspace: `*` within a directory, `**` across them, as in
    /// `dist/*.tar.gz` or `reports/**/*.xml`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')")
        .message("outputs.artifacts path must be relative to the workspace and may not contain '..'"))]
    pub path: String,

    /// When false (the default), a pattern that matches no file fails a successful
    /// agent's task with `ArtifactNotFound`, as a missing output fails an Argo step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

impl Default for Outputs {
    fn default() -> Self {
        Self {
            max_files: default_max_files(),
            exclude: default_exclude(),
            git: None,
            patch: false,
            artifacts: Vec::new(),
        }
    }
}

/// The repository's changes, after a successful agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitOutputs {
    /// Commit what changed and push it to a branch of the same repository, with the
    /// credentials of `workspace.git.secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<GitPush>,
}

/// How the agent's work is committed and pushed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GitPush {
    /// The branch to push to. Absent means `sandcastle/<task name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = ref_rule!("outputs.git.push.branch"))]
    pub branch: Option<String>,

    /// The commit message; `{task}` becomes the task's name and `{prompt}` its prompt.
    /// Absent means `{task}` on the first line and the prompt below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65_536))]
    pub commit_message: Option<String>,

    /// The commit's author (and committer). Absent means `Sandcastle <sandcastle@localhost>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<GitAuthor>,

    /// Replace the branch even when it holds commits the push does not (a force push).
    /// Off by default: a branch that moved fails the task with `GitPushRejected`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A commit's author.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct GitAuthor {
    /// The author's name.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^<>\n]+$"))]
    pub name: String,
    /// The author's e-mail address.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^<>\s]+@[^<>\s]+$"))]
    pub email: String,
}

fn default_max_files() -> i32 {
    500
}

fn default_exclude() -> Vec<String> {
    [".git/**", "node_modules/**", "__pycache__/**"]
        .map(String::from)
        .to_vec()
}

/// Observed state of an `AgentTask`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentTaskStatus {
    /// A one-word summary for people. Display only: read `conditions` in automation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,

    /// `Ready` and `Succeeded` (the outcome), plus the kstatus pair `Reconciling`
    /// (the task is still running) and `Stalled` (it failed or cannot start without a change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The provider's ID of the sandbox of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,

    /// The template ID the sandbox was started from (pinned at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,

    /// The template build the sandbox was started from (pinned at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,

    /// How many sandboxes were started for this task (1 plus retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,

    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the task finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// What the agent reported at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,

    /// Tokens and cost reported by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,

    /// Files created or modified under the workspace, at most `outputs.maxFiles`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_OUTPUT_FILES))]
    pub files: Vec<OutputFile>,

    /// How many files were created or modified, including those not listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_count: Option<i64>,

    /// True when `files` lists fewer files than `fileCount`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub files_truncated: bool,

    /// The agent's progress while it runs (updated at most every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// The repository of `workspace.git`: the commit cloned, and what was pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitStatus>,

    /// The diff of the agent's work, with `outputs.patch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchStatus>,

    /// The files `outputs.artifacts` chose, at most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub artifacts: Vec<Artifact>,

    /// The ConfigMap that keeps the artifacts' contents, under each one's `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub artifacts_config_map: Option<String>,

    /// A one-word reason for the current state (the reason of the deciding condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub reason: Option<String>,

    /// A human-readable explanation of the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE_CHARS))]
    pub message: Option<String>,
}

/// Display summary of an `AgentTask`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaskPhase {
    /// Accepted; waiting for its template, Secrets or first reconcile.
    Pending,
    /// Waiting for a free sandbox slot under a concurrency cap.
    Queued,
    /// The sandbox is being created and prepared.
    Provisioning,
    /// The agent is running.
    Running,
    /// The agent finished successfully.
    Succeeded,
    /// The agent or the task failed; see `reason`.
    Failed,
}

/// The agent's final report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// The result text (Claude Code's `result`, or the tail of a command's stdout),
    /// cut to 4 KiB with secret values redacted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = MAX_RESULT_TEXT_BYTES))]
    pub text: String,
    /// True when `text` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The agent's own error flag.
    #[serde(default)]
    pub is_error: bool,
    /// Claude Code's result subtype, such as `success` or `error_max_turns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub subtype: Option<String>,
    /// The agent process's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Agentic turns taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_turns: Option<i64>,
    /// Wall time the agent reported, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    /// Claude Code's session ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub session_id: Option<String>,
    /// How many tool uses were denied by the permission mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_denials: Option<i64>,
    /// The object the agent answered with under `claudeCode.jsonSchema`, redacted; absent
    /// when larger than 16 KiB of JSON (see `structuredOutputTruncated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub structured_output: Option<serde_json::Map<String, serde_json::Value>>,
    /// True when the structured output was too large to keep.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub structured_output_truncated: bool,
}

/// Token usage and cost.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Input tokens.
    #[serde(default)]
    pub input_tokens: i64,
    /// Output tokens.
    #[serde(default)]
    pub output_tokens: i64,
    /// Tokens written to the prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: i64,
    /// Tokens read from the prompt cache.
    #[serde(default)]
    pub cache_read_input_tokens: i64,
    /// Cost in US dollars as a decimal string (exact, unlike a float).
    #[serde(rename = "costUSD", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub cost_usd: Option<String>,
}

/// A file created or modified under the workspace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct OutputFile {
    /// Path relative to the workspace.
    #[schemars(length(max = MAX_OUTPUT_PATH_CHARS))]
    pub path: String,
    /// Size in bytes.
    pub size: i64,
}

/// The agent's progress while it runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Agentic turns so far (the final count once the task ends).
    #[serde(default)]
    pub turns: i64,
    /// The tool the agent used last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub last_tool: Option<String>,
    /// When progress was last recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

/// The repository of a task's workspace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitStatus {
    /// The commit the workspace was cloned at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub base_commit: Option<String>,
    /// The branch pushed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub branch: Option<String>,
    /// The commit pushed: the agent's work on top of `baseCommit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub commit: Option<String>,
    /// True once `commit` is on `branch` in the repository. False with no `commit` when
    /// the agent changed nothing, so nothing was pushed.
    #[serde(default)]
    pub pushed: bool,
    /// Files changed between `baseCommit` and `commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<i64>,
    /// Lines added between `baseCommit` and `commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insertions: Option<i64>,
    /// Lines removed between `baseCommit` and `commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletions: Option<i64>,
}

/// The diff `outputs.patch` kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PatchStatus {
    /// The ConfigMap that keeps it, under `patch`.
    #[schemars(length(max = 253))]
    pub config_map: String,
    /// Its size before any cut, in bytes.
    pub bytes: i64,
    /// True when the ConfigMap keeps only its start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A file kept as an artifact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Path relative to the workspace, cut to 200 bytes.
    #[schemars(length(max = MAX_OUTPUT_PATH_CHARS))]
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256 of the file as the agent left it, in hex; absent when the sandbox has no
    /// `sha256sum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub sha256: Option<String>,
    /// Its key in the artifacts ConfigMap's `binaryData`; absent when its contents were
    /// not kept: larger than what was left of 768 KiB, or binary content holding a Secret
    /// value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub key: Option<String>,
    /// True when Secret values were redacted from the kept text, which then differs from
    /// `sha256`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
}
