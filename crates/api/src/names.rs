//! Every name the operator writes on objects it does not own the schema of: finalizers,
//! labels, annotations and the metadata it puts on sandboxes. Tests, benchmarks and the
//! orphan sweep read the same constants.

/// Holds an `AgentTask` until its sandboxes are killed and its transcript is gone.
pub const TASK_FINALIZER: &str = "sandcastle.dev/task-cleanup";
/// Holds a `SandboxTemplate` until its provider's template is deleted (or retained).
pub const TEMPLATE_FINALIZER: &str = "sandcastle.dev/template-cleanup";

/// Marks a task's transcript ConfigMap, so the operator's ConfigMap watch can leave
/// transcripts out.
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

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "sandcastle";

/// Sandbox metadata: the uid of the `SandboxTemplate` whose warm pool made the sandbox.
pub const SANDBOX_POOL: &str = "sandcastle.dev/pool";
/// Sandbox metadata: the build a warm sandbox is of (template ID and build ID), so a
/// rebuild can tell the pool's outdated sandboxes from its fresh ones.
pub const SANDBOX_POOL_BUILD: &str = "sandcastle.dev/pool-build";
/// Inside a warm sandbox: the directory a task makes to take it. `mkdir` is atomic in the
/// sandbox's kernel, so of two claims only one succeeds, whoever and wherever they are.
pub const POOL_CLAIM_DIR: &str = "/tmp/.sandcastle-claim";
