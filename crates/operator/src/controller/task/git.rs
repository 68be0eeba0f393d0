//! The task's repository in its sandbox: cloned before the agent starts, and the agent's
//! work committed and pushed once it succeeded. The steps and how their answers read are
//! in `agent::git`; here they are run through envd.

use super::*;
use crate::agent::git::{self, CLONED_MARKER, Committed, GIT_TAG, GitAuth, Step};
use sandcastle_api::{GitSource, GitStatus, PatchStatus};
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

/// The file (in the recorder's directory) a diff is written to.
const PATCH_FILE: &str = "git-patch";
/// The git directory (in the recorder's directory) that records a seeded workspace.
const SEED_DIR: &str = "seed.git";

/// What a delivery came to: what the status records, and why it failed if it did.
pub(super) struct Delivered {
    pub git: Option<GitStatus>,
    pub patch: Option<PatchStatus>,
    pub failure: Option<(TaskReason, String)>,
}

/// Records the workspace as seeded, for a task that keeps a patch without a repository:
/// before the agent starts, after its files are written.
pub(super) async fn snapshot(task: &AgentTask, envd: &EnvdClient) -> Result<(), GitTrouble> {
    if !task.spec.outputs.patch || task.spec.workspace.git.is_some() {
        return Ok(());
    }
    let step = git::snapshot_step(&workspace(task), &run_file(SEED_DIR));
    let output = run_step(envd, step, within(task)).await?;
    if output.success() {
        return Ok(());
    }
    Err(GitTrouble::Failed {
        reason: TaskReason::InvalidOutputs,
        message: format!(
            "outputs.patch needs git in the template's image to record the seeded workspace: {}",
            truncate(output.stderr.trim(), 512)
        ),
    })
}

/// Keeps the diff git wrote to the patch file in `<task>-patch`.
async fn save_patch(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    redactor: &Redactor,
) -> Result<PatchStatus, Interrupted> {
    let diff = envd.read_file(&run_file(PATCH_FILE)).await?;
    let diff = redactor.redact(&String::from_utf8_lossy(&diff));
    let (kept, truncated) = git::cap_patch(&diff, git::PATCH_LIMIT);
    let config_map = owned_name(task, "-patch");
    let contents = serde_json::json!({"data": {"patch": kept}});
    save_owned_config_map(ctx, task, &config_map, contents)
        .await
        .map_err(Interrupted::Kube)?;
    Ok(PatchStatus {
        config_map,
        bytes: diff.len() as i64,
        truncated,
    })
}

/// Delivers the agent's work as `outputs` asks. With `workspace.git`: commits it, keeps
/// its diff against the base commit (`outputs.patch`), and, for an agent that succeeded
/// (`push_allowed`), pushes it (`outputs.git.push`). Without: keeps its diff against the
/// seeded workspace.
pub(super) async fn deliver(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    auth: Option<&GitAuth>,
    redactor: &Redactor,
    push_allowed: bool,
) -> Result<Delivered, Interrupted> {
    let mut delivered = Delivered {
        git: None,
        patch: None,
        failure: None,
    };
    let want_patch = task.spec.outputs.patch;
    let Some(source) = task.spec.workspace.git.as_ref() else {
        if want_patch {
            let step =
                git::seeded_diff_step(&workspace(task), &run_file(SEED_DIR), &run_file(PATCH_FILE));
            match run_step(envd, step, within(task)).await {
                Ok(output) if output.success() => {
                    delivered.patch = Some(save_patch(task, ctx, envd, redactor).await?);
                }
                Ok(output) => {
                    let message = format!(
                        "the diff against the seeded workspace failed: {}",
                        truncate(redactor.redact(&output.stderr).trim(), 512)
                    );
                    delivered.failure = Some((TaskReason::InvalidOutputs, message));
                }
                Err(GitTrouble::Provider(error)) => return Err(Interrupted::Provider(error)),
                Err(GitTrouble::Failed { reason, message }) => {
                    delivered.failure = Some((reason, message));
                }
            }
        }
        return Ok(delivered);
    };
    let push = task
        .spec
        .outputs
        .git
        .as_ref()
        .and_then(|outputs| outputs.push.as_ref())
        .filter(|_| push_allowed);
    if push.is_none() && !want_patch {
        return Ok(delivered);
    }
    let mut status = GitStatus::default();
    let name = task.name_any();
    let base = String::from_utf8_lossy(&envd.read_file(&run_file(CLONED_MARKER)).await?)
        .trim()
        .to_string();
    status.base_commit = Some(base.clone());
    let workspace = workspace(task);
    let prompt = task.spec.prompt.as_deref().unwrap_or_default();
    let within = within(task);
    let patch_file = want_patch.then(|| run_file(PATCH_FILE));
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
            Some(committed) if output.success() => Some(committed),
            _ => {
                let message = format!(
                    "committing the agent's work failed: {}",
                    truncate(redactor.redact(&output.stderr).trim(), 512)
                );
                delivered.failure = Some((TaskReason::GitPushFailed, message));
                None
            }
        },
        Err(GitTrouble::Provider(error)) => return Err(Interrupted::Provider(error)),
        Err(GitTrouble::Failed { reason, message }) => {
            delivered.failure = Some((reason, message));
            None
        }
    };
    let Some(committed) = committed else {
        delivered.git = Some(status);
        return Ok(delivered);
    };
    if want_patch {
        delivered.patch = Some(save_patch(task, ctx, envd, redactor).await?);
    }
    let Committed::Commit {
        sha,
        files,
        insertions,
        deletions,
    } = committed
    else {
        // Nothing changed: nothing is pushed, and the status says so.
        delivered.git = Some(status);
        return Ok(delivered);
    };
    status.commit = Some(sha.clone());
    status.files_changed = Some(files);
    status.insertions = Some(insertions);
    status.deletions = Some(deletions);
    let Some(push) = push else {
        delivered.git = Some(status);
        return Ok(delivered);
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
                delivered.failure = Some((reason, message));
                break;
            }
        };
        if !output.success() {
            delivered.failure = Some(git::push_failure(
                &source.url,
                &branch,
                output.exit_code,
                &redactor.redact(&output.stderr),
            ));
            break;
        }
    }
    status.pushed = delivered.failure.is_none();
    delivered.git = Some(status);
    Ok(delivered)
}
