//! The task's repository in its sandbox: cloned before the agent starts, and the agent's
//! work committed and pushed once it succeeded. The steps and how their answers read are
//! in `agent::git`; here they are run through envd.

use super::*;
use crate::agent::git::{self, CLONED_MARKER, Committed, GIT_TAG, GitAuth, Step};
use sandcastle_api::{GitSource, GitStatus};
use sandcastle_e2b::envd_client::Output;

/// Why a git step did not give its answer.
pub(super) enum GitTrouble {
    /// The step answered: the task fails with this reason and message.
    Failed { reason: TaskReason, message: String },
    /// envd did not answer as it should; the sandbox is gone or in trouble.
    Provider(ProviderError),
}

impl From<ProviderError> for GitTrouble {
    fn from(error: ProviderError) -> Self {
        GitTrouble::Provider(error)
    }
}

/// Runs one step to its end as the sandbox's user, within `within`. A step of an earlier
/// pass that still runs (the operator restarted under it) is waited out first, so two
/// steps never work on the same files; each step is safe to run again after it.
async fn run_step(envd: &EnvdClient, step: Step, within: Duration) -> Result<Output, GitTrouble> {
    let running = envd
        .list_processes()
        .await?
        .iter()
        .any(|process| process.tag.as_deref() == Some(GIT_TAG));
    if running {
        let earlier = envd
            .connect(ProcessSelector::Tag(GIT_TAG.to_string()))
            .await?;
        let _ = tokio::time::timeout(within, earlier.wait()).await;
    }
    let spec = CommandSpec {
        cmd: "/bin/sh".into(),
        args: step.args,
        envs: step.env,
        cwd: Some("/".into()),
        tag: Some(GIT_TAG.into()),
        // envd kills what outlives the task's deadline.
        timeout: Some(within),
        stdin: false,
    };
    let process = envd.start(&spec).await?;
    match tokio::time::timeout(within + Duration::from_secs(5), process.wait()).await {
        Ok(output) => Ok(output?),
        Err(_) => Err(GitTrouble::Failed {
            reason: TaskReason::DeadlineExceeded,
            message: "the task's deadline passed during a git step".into(),
        }),
    }
}

/// How long a step may run: until the task's deadline.
fn within(task: &AgentTask) -> Duration {
    until_deadline(task, Duration::from_secs(24 * 3600)).max(Duration::from_secs(1))
}

/// Clones the task's repository into its workspace (or finds the clone an earlier pass
/// made), and answers the base commit.
pub(super) async fn clone(
    task: &AgentTask,
    envd: &EnvdClient,
    source: &GitSource,
    auth: Option<&GitAuth>,
    redactor: &Redactor,
) -> Result<String, GitTrouble> {
    let step = git::clone_step(source, &workspace(task), &run_file(CLONED_MARKER), auth);
    let output = run_step(envd, step, within(task)).await?;
    if output.success()
        && let Some(base) = git::parse_base(&output.stdout)
    {
        return Ok(base);
    }
    let (reason, message) =
        git::clone_failure(source, output.exit_code, &redactor.redact(&output.stderr));
    Err(GitTrouble::Failed { reason, message })
}

/// What stopped a delivery short of an answer; the next pass delivers again.
pub(super) enum Interrupted {
    Provider(ProviderError),
    Kube(Error),
}

impl From<ProviderError> for Interrupted {
    fn from(error: ProviderError) -> Self {
        Interrupted::Provider(error)
    }
}

/// The file (in the recorder's directory) the commit step writes the diff to.
const PATCH_FILE: &str = "git-patch";

/// Commits the agent's work, keeps its diff when `outputs.git.patch` asks, and, for an
/// agent that succeeded (`push_allowed`), pushes it as `outputs.git.push` says: what the
/// status records, and why the delivery failed if it did (with what the status records
/// all the same).
pub(super) async fn deliver(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    auth: Option<&GitAuth>,
    redactor: &Redactor,
    push_allowed: bool,
) -> Result<(GitStatus, Option<(TaskReason, String)>), Interrupted> {
    let mut status = GitStatus::default();
    let (Some(source), Some(outputs)) = (
        task.spec.workspace.git.as_ref(),
        task.spec.outputs.git.as_ref(),
    ) else {
        return Ok((status, None));
    };
    let push = outputs.push.as_ref().filter(|_| push_allowed);
    if push.is_none() && !outputs.patch {
        return Ok((status, None));
    }
    let failed = |status: GitStatus, reason: TaskReason, message: String| {
        Ok((status, Some((reason, message))))
    };
    let name = task.name_any();
    let base = String::from_utf8_lossy(&envd.read_file(&run_file(CLONED_MARKER)).await?)
        .trim()
        .to_string();
    status.base_commit = Some(base.clone());
    let workspace = workspace(task);
    let prompt = task.spec.prompt.as_deref().unwrap_or_default();
    let within = within(task);
    let patch_file = outputs.patch.then(|| run_file(PATCH_FILE));
    let commit = git::commit_step(
        push,
        &workspace,
        &base,
        patch_file.as_deref(),
        &name,
        prompt,
    );
    let committed = match run_step(envd, commit, within).await {
        Ok(output) => match git::parse_committed(&output.stdout) {
            Some(committed) if output.success() => committed,
            _ => {
                let message = format!(
                    "committing the agent's work failed: {}",
                    truncate(redactor.redact(&output.stderr).trim(), 512)
                );
                return failed(status, TaskReason::GitPushFailed, message);
            }
        },
        Err(GitTrouble::Provider(error)) => return Err(Interrupted::Provider(error)),
        Err(GitTrouble::Failed { reason, message }) => return failed(status, reason, message),
    };
    if let Some(file) = &patch_file {
        let diff = envd.read_file(file).await?;
        let diff = redactor.redact(&String::from_utf8_lossy(&diff));
        let (kept, truncated) = git::cap_patch(&diff, git::PATCH_LIMIT);
        let config_map = owned_name(task, "-patch");
        let contents = serde_json::json!({"data": {"patch": kept}});
        save_owned_config_map(ctx, task, &config_map, contents)
            .await
            .map_err(Interrupted::Kube)?;
        status.patch_config_map = Some(config_map);
        status.patch_bytes = Some(diff.len() as i64);
        status.patch_truncated = truncated;
    }
    let Committed::Commit {
        sha,
        files,
        insertions,
        deletions,
    } = committed
    else {
        // Nothing changed: nothing is pushed, and the status says so.
        return Ok((status, None));
    };
    status.commit = Some(sha.clone());
    status.files_changed = Some(files);
    status.insertions = Some(insertions);
    status.deletions = Some(deletions);
    let Some(push) = push else {
        return Ok((status, None));
    };
    let branch = git::push_branch(push, &name);
    status.branch = Some(branch.clone());
    for step in [
        git::kill_leftovers_step(),
        git::push_step(source, push, &workspace, &sha, &name, auth),
    ] {
        let output = match run_step(envd, step, within).await {
            Ok(output) => output,
            Err(GitTrouble::Provider(error)) => return Err(Interrupted::Provider(error)),
            Err(GitTrouble::Failed { reason, message }) => {
                return failed(status, reason, message);
            }
        };
        if !output.success() {
            let (reason, message) = git::push_failure(
                &source.url,
                &branch,
                output.exit_code,
                &redactor.redact(&output.stderr),
            );
            return failed(status, reason, message);
        }
    }
    status.pushed = true;
    Ok((status, None))
}
