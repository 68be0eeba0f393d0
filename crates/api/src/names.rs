//! Every name the operator writes on objects it does not own the schema of: finalizers,
//! labels, annotations and the metadata it puts on sandboxes. Tests, benchmarks and the
//! orphan sweep read the same constants.

/// Holds an `AgentTask` until its sandboxes are killed and its transcript is gone.
pub const TASK_FINALIZER: &str = "sandcastle.dev/task-cleanup";
/// Holds a `SandboxTemplate` until its provider's template is deleted (or retained).
pub const TEMPLATE_FINALIZER: &str = "sandcastle.dev/template-cleanup";

/// Marks the ConfigMaps a task's run leaves (its transcript, its patch), so the
/// operator's ConfigMap watch can leave them out.
pub const TRANSCRIPT_LABEL: &str = "sandcastle.dev/transcript";
/// The task a transcript ConfigMap belongs to, by name.
pub const TRANSCRIPT_TASK_LABEL: &str = "sandcastle.dev/task";

/// Sandbox metadata: the UID of the task the sandbox runs.
pub const SANDBOX_TASK_UID: &str = "sandcastle.dev/task-uid";
/// Sandbox metadata: the namespace of that task.
pub const SANDBOX_TASK_NAMESPACE: &str = "sandcastle.dev/task-namespace";
/// Sandbox metadata: the name of that task.
pub const SANDBOX_TASK_NAME: &str = "sandcastle.dev/task-name";
/// Sandbox metadata: the operator instance that made the sandbox; its orphan sweep kills
/// only sandboxes that carry its own instance.
pub const SANDBOX_OPERATOR: &str = "sandcastle.dev/operator";

/// Sandbox metadata: what made the sandbox when it was not a task's (`mcp`: the MCP
/// server's `run_code`).
pub const SANDBOX_MADE_BY: &str = "sandcastle.dev/made-by";
/// The value of [`SANDBOX_MADE_BY`] on the MCP server's sandboxes.
pub const MADE_BY_MCP: &str = "mcp";
/// Sandbox metadata: the Lease (`namespace/name`) the MCP server that made the sandbox
/// renews while it lives; the orphan sweep kills the sandbox once the Lease is gone or
/// has run out.
pub const SANDBOX_MCP_LEASE: &str = "sandcastle.dev/mcp-lease";

/// The field manager of every write the operator makes but one (below).
pub const FIELD_MANAGER: &str = "sandcastle";

/// The field manager of a template's pool status (`status.pool` and the `PoolReady`
/// condition), written by the pool's own loop beside the template's reconcile.
pub const POOL_FIELD_MANAGER: &str = "sandcastle-pool";

/// Sandbox metadata: the uid of the `SandboxTemplate` whose warm pool made the sandbox.
pub const SANDBOX_POOL: &str = "sandcastle.dev/pool";
/// Sandbox metadata: the build a warm sandbox is of (template ID and build ID), so a
/// rebuild can tell the pool's outdated sandboxes from its fresh ones.
pub const SANDBOX_POOL_BUILD: &str = "sandcastle.dev/pool-build";
/// Inside a warm sandbox: where its claim lives. The pool makes `warm` in it when the
/// sandbox is ready to be taken, and a task takes it by renaming `warm` to
/// [`pool_claim_mark`]. `rename` is atomic in the sandbox's kernel, so of two claims only
/// one finds `warm` (the other gets "not found"), whoever and wherever they are, and it
/// needs no process in the sandbox.
pub const POOL_DIR: &str = "/tmp/.sandcastle-pool";
/// The mark of a warm sandbox nobody has taken.
pub const POOL_WARM_MARK: &str = "/tmp/.sandcastle-pool/warm";
/// The prefix of a claim's name, followed by the claimant's uid.
pub const POOL_CLAIMED_PREFIX: &str = "claimed-";

/// The mark a claim by the task (or other claimant) `uid` leaves.
pub fn pool_claim_mark(uid: &str) -> String {
    format!("{POOL_DIR}/{POOL_CLAIMED_PREFIX}{uid}")
}
