//! The agent in its sandbox: started under the recorder, and followed to its end.

use super::*;
use sandcastle_e2b::models::SandboxState;

/// How often a task whose sandbox is paused looks whether it was resumed.
const PAUSED_POLL: Duration = Duration::from_secs(5);

pub(super) fn run_file(name: &str) -> String {
    format!("{RUN_DIR}/{name}")
}

/// One step with a live sandbox: follow the agent, finish from the recorder's files, or
/// start it. The agent is looked for before its exit file: the recorder writes that file
/// before it exits, so an agent not running with no exit file was killed, whereas the
/// other order could miss an exit that landed between the two reads. Any answer that is
/// not a clear one is waited out, never read as "not running" or "not started".
pub(super) async fn run(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    inputs: Inputs,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let running = match envd.list_processes().await {
        Ok(processes) => processes
            .iter()
            .any(|process| process.tag.as_deref() == Some(AGENT_TAG)),
        Err(error) => return write_envd_trouble(task, ctx, provider, &error, redactor).await,
    };
    if running {
        return follow(task, ctx, envd, redactor).await;
    }
    match envd.read_file(&run_file("exit")).await {
        Ok(exit) => {
            // Empty when the recorder was killed as it wrote: no exit was recorded.
            if let Some(code) = invocation::parse_exit(&String::from_utf8_lossy(&exit)) {
                let auth = inputs.git.as_ref();
                return finish(task, ctx, provider, envd, code, auth, redactor).await;
            }
        }
        Err(error) if error.is_not_found() => {}
        Err(error) => return write_envd_trouble(task, ctx, provider, &error, redactor).await,
    }
    match envd.exists(&run_file(STARTED_MARKER)).await {
        // Started, gone, and no exit recorded: the agent was killed from outside.
        Ok(true) => {
            write_retry(
                task,
                ctx,
                provider,
                TaskReason::AgentLost,
                "the agent process ended without a recorded exit",
            )
            .await
        }
        Ok(false) => start(task, ctx, provider, envd, inputs, redactor).await,
        Err(error) => write_envd_trouble(task, ctx, provider, &error, redactor).await,
    }
}

/// An envd call failed: the sandbox is gone, or the provider is in trouble for now.
pub(super) async fn write_envd_trouble(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    error: &ProviderError,
    redactor: &Redactor,
) -> Result<Action, Error> {
    if error.is_sandbox_gone() {
        if is_paused(task, provider).await {
            return write_sandbox_paused(task, ctx).await;
        }
        return write_sandbox_lost(task, ctx, provider).await;
    }
    write_provider_trouble(
        ctx,
        task,
        &redactor.redact(&error.to_string()),
        WAIT_INTERVAL,
    )
    .await
}

/// Whether the task's sandbox is paused on its provider: envd does not answer for a
/// paused sandbox, which reads like a vanished one until the API is asked.
async fn is_paused(task: &AgentTask, provider: &E2bClient) -> bool {
    let Some(id) = task
        .status
        .as_ref()
        .and_then(|status| status.sandbox_id.as_deref())
    else {
        return false;
    };
    provider
        .get_sandbox(id)
        .await
        .is_ok_and(|sandbox| sandbox.state == SandboxState::Paused)
}

/// Someone paused the task's sandbox: the task waits for it to be resumed rather than
/// throwing away the agent's work, and says so. Its deadline still counts.
async fn write_sandbox_paused(task: &AgentTask, ctx: &Context) -> Result<Action, Error> {
    let already = task
        .status
        .as_ref()
        .and_then(|status| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_READY)
        })
        .is_some_and(|ready| ready.reason == TaskReason::SandboxPaused.as_str());
    if !already {
        let message = "the sandbox was paused on its provider; the task waits for it to be resumed (activeDeadlineSeconds still counts)";
        let status = staged(
            task,
            TaskPhase::Running,
            TaskReason::SandboxPaused,
            message,
            |_| {},
        );
        write_status(ctx, task, status).await?;
        publish_event(
            ctx,
            task,
            EventType::Normal,
            TaskReason::SandboxPaused,
            message.to_string(),
        )
        .await;
    }
    Ok(Action::requeue(until_deadline(task, PAUSED_POLL)))
}

pub(super) fn workspace(task: &AgentTask) -> String {
    task.spec.workspace.path.trim_end_matches('/').to_string()
}

/// Prepares the workspace and starts the agent under the recorder. Safe to repeat until
/// the recorder's start marker exists: nothing here runs the agent twice.
pub(super) async fn start(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    inputs: Inputs,
    redactor: &Redactor,
) -> Result<Action, Error> {
    match launch(task, ctx, envd, inputs, redactor).await {
        Ok((process, base)) => {
            let record = |status: &mut AgentTaskStatus| {
                if let Some(base) = base {
                    status.git = Some(GitStatus {
                        base_commit: Some(base),
                        ..GitStatus::default()
                    });
                }
            };
            write_running(ctx, task, process, record, "the agent started".into()).await
        }
        Err(Launch::Invalid { reason, message }) => {
            write_failure_and_kill(ctx, task, reason, &message).await
        }
        Err(Launch::Provider(error)) => {
            write_envd_trouble(task, ctx, provider, &error, redactor).await
        }
        Err(Launch::Kube(error)) => Err(Error::Kube(error)),
    }
}

/// Follows the agent just started to its end, and records that it runs (with what
/// `change` adds) and the `Started` event saying `note`.
pub(super) async fn write_running(
    ctx: &Context,
    task: &AgentTask,
    process: ProcessStream,
    change: impl FnOnce(&mut AgentTaskStatus),
    note: String,
) -> Result<Action, Error> {
    follow_to_end(ctx, task, process);
    let status = staged(
        task,
        TaskPhase::Running,
        TaskReason::Running,
        "the agent is running",
        change,
    );
    write_status(ctx, task, status).await?;
    publish_event(ctx, task, EventType::Normal, TaskReason::Started, note).await;
    Ok(Action::requeue(FOLLOW_INTERVAL))
}

/// Why the agent was not started.
pub(super) enum Launch {
    /// The spec asks for what cannot be done, in this sandbox or any other.
    Invalid { reason: TaskReason, message: String },
    /// The sandbox did not answer as it should; the agent may or may not have started.
    Provider(ProviderError),
    /// A ConfigMap the workspace copies could not be read.
    Kube(kube::Error),
}

/// Lays out the workspace (the clone first, for a git workspace) and starts the agent
/// under the recorder. The returned stream only says when the process ends: its outcome
/// is read from the recorder's files. With it comes the commit the workspace was cloned
/// at.
pub(super) async fn launch(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    inputs: Inputs,
    redactor: &Redactor,
) -> Result<(ProcessStream, Option<String>), Launch> {
    let workspace = workspace(task);
    // Read before anything is written: an API error here is retried by the reconcile, a
    // missing key is the spec's fault.
    let namespace = task.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut files = Vec::with_capacity(task.spec.workspace.files.len());
    for file in &task.spec.workspace.files {
        let content = match (&file.content, &file.config_map_key_ref) {
            (Some(content), _) => content.clone().into_bytes(),
            (None, Some(selector)) => {
                let value = config_maps
                    .get_opt(&selector.name)
                    .await
                    .map_err(Launch::Kube)?
                    .and_then(|config_map| config_map.data)
                    .and_then(|mut data| data.remove(&selector.key));
                match value {
                    Some(value) => value.into_bytes(),
                    None => {
                        let message =
                            format!("ConfigMap {} has no key {}", selector.name, selector.key);
                        return Err(Launch::Invalid {
                            reason: TaskReason::InvalidWorkspace,
                            message,
                        });
                    }
                }
            }
            (None, None) => Vec::new(),
        };
        files.push((format!("{workspace}/{}", file.path), content));
    }
    let base = match &task.spec.workspace.git {
        Some(source) => match git::clone(task, envd, source, inputs.git.as_ref(), redactor).await {
            Ok(base) => Some(base),
            Err(git::GitTrouble::Failed { reason, message }) => {
                return Err(Launch::Invalid { reason, message });
            }
            Err(git::GitTrouble::Provider(error)) => return Err(Launch::Provider(error)),
        },
        None => None,
    };
    let prepared = async {
        let _ = envd.make_dir(&workspace).await?;
        for (path, content) in files {
            envd.write_file(&path, content).await?;
        }
        let before = listing(envd, &workspace).await?;
        envd.write_file(
            &run_file(BEFORE_LISTING),
            serde_json::to_vec(&listing_json(&before)).expect("listing serializes"),
        )
        .await?;
        Ok::<_, ProviderError>(())
    }
    .await;
    match prepared {
        Err(ProviderError::InvalidArgument(message)) => {
            return Err(Launch::Invalid {
                reason: TaskReason::InvalidWorkspace,
                message,
            });
        }
        Err(error) => return Err(Launch::Provider(error)),
        Ok(()) => {}
    }
    match git::snapshot(task, envd).await {
        Ok(()) => {}
        Err(git::GitTrouble::Failed { reason, message }) => {
            return Err(Launch::Invalid { reason, message });
        }
        Err(git::GitTrouble::Provider(error)) => return Err(Launch::Provider(error)),
    }
    let agent = agent_invocation(task, ctx);
    let mut invocation = invocation::recorded(agent, RUN_DIR);
    invocation.env.extend(inputs.env);
    let spec = CommandSpec {
        cmd: invocation.cmd,
        args: invocation.args,
        envs: invocation.env,
        cwd: Some(workspace),
        tag: Some(AGENT_TAG.into()),
        timeout: None,
        stdin: false,
    };
    // A failed call may still have started it; the next pass finds it running or finds
    // the start marker.
    let process = envd.start(&spec).await.map_err(|error| match error {
        // The process cannot be started as specified (an argument list over the kernel's
        // limit, say); a new sandbox would get the same answer.
        ProviderError::Envd(error) if error.code == sandcastle_e2b::envd::Code::InvalidArgument => {
            Launch::Invalid {
                reason: TaskReason::AgentFailed,
                message: format!(
                    "cannot start the agent: {}",
                    redactor.redact(&error.message)
                ),
            }
        }
        error => Launch::Provider(error),
    })?;
    Ok((process, base))
}

pub(super) fn agent_invocation(task: &AgentTask, ctx: &Context) -> Invocation {
    let prompt = task.spec.prompt.as_deref();
    match task
        .spec
        .agent
        .as_ref()
        .and_then(|agent| agent.command.as_ref())
    {
        Some(command) => invocation::command(command, prompt),
        None => {
            let defaults = serde_json::from_value(serde_json::json!({})).expect("defaults");
            let spec = task
                .spec
                .agent
                .as_ref()
                .and_then(|agent| agent.claude_code.clone())
                .unwrap_or(defaults);
            let mut invocation = invocation::claude_code(&spec, prompt.unwrap_or_default());
            invocation.cmd = ctx.claude_command.clone();
            invocation
        }
    }
}

/// Whether the task's Claude Code must answer with an object (`claudeCode.jsonSchema`).
pub(super) fn wants_structured_output(task: &AgentTask) -> bool {
    task.spec
        .agent
        .as_ref()
        .and_then(|agent| agent.claude_code.as_ref())
        .is_some_and(|claude| claude.json_schema.is_some())
}

pub(super) fn is_claude(task: &AgentTask) -> bool {
    task.spec
        .agent
        .as_ref()
        .and_then(|agent| agent.command.as_ref())
        .is_none()
}

/// Wakes the task's reconcile the moment its agent ends, so a finished agent is read at
/// once and a running one needs no frequent look. A broken stream wakes it too, after a
/// pause, to look again and follow anew.
pub(super) fn follow_to_end(ctx: &Context, task: &AgentTask, mut process: ProcessStream) {
    let (Some(uid), Some(namespace)) = (task.metadata.uid.clone(), task.namespace()) else {
        return;
    };
    let Some(wake) = ctx.caches.waker(&namespace) else {
        return;
    };
    if !ctx.memory.start_following(&uid) {
        return;
    }
    let followed = ctx.memory.following();
    let key = ObjectRef::new(&task.name_any()).within(&namespace);
    tokio::spawn(async move {
        let ended = loop {
            match process.next_update().await {
                Ok(Some(ProcessUpdate::End(_)) | None) => break true,
                Ok(Some(_)) => {}
                Err(_) => break false,
            }
        };
        TaskMemory::stop_following(&followed, &uid);
        if !ended {
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
        let _ = wake.unbounded_send(key);
    });
}

/// Progress from the transcript so far, written at most every few seconds.
pub(super) async fn follow(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let followed = || ctx.memory.is_following(&uid);
    // After a restart, or a broken stream: an agent that already ended is found by the
    // next look.
    if !followed()
        && let Ok(process) = envd.connect(ProcessSelector::Tag(AGENT_TAG.into())).await
    {
        follow_to_end(ctx, task, process);
    }
    let status = previous(task);
    // Also after a passing trouble, so the status does not go on naming it.
    if status.phase != Some(TaskPhase::Running) || status.reason != TaskReason::Running {
        write_status(
            ctx,
            task,
            staged(
                task,
                TaskPhase::Running,
                TaskReason::Running,
                "the agent is running",
                |_| {},
            ),
        )
        .await?;
        return Ok(Action::requeue(FOLLOW_INTERVAL));
    }
    if !is_claude(task) {
        let again = if followed() {
            FOLLOW_FALLBACK
        } else {
            FOLLOW_INTERVAL
        };
        return Ok(Action::requeue(until_deadline(task, again)));
    }
    let due = status
        .progress
        .as_ref()
        .and_then(|progress| progress.updated_at.as_ref())
        .is_none_or(|at| (jiff::Timestamp::now() - at.0).get_seconds() >= PROGRESS_INTERVAL);
    if due {
        // Only what the transcript gained since the last look: a long run's transcript
        // is never read again from the start.
        let sandbox = status.sandbox_id.clone().unwrap_or_default();
        let mut read = ctx.memory.take_transcript(&uid, &sandbox);
        let seen = match envd.read_file_from(&run_file("stdout"), read.offset).await {
            Ok(new) => {
                read.parser.feed(&new);
                read.offset += new.len() as u64;
                Some(shown_progress(read.parser.progress(), None, redactor))
            }
            Err(_) => None,
        };
        ctx.memory.keep_transcript(&uid, read);
        let Some(seen) = seen else {
            return Ok(Action::requeue(until_deadline(task, FOLLOW_INTERVAL)));
        };
        let changed = status.progress.as_ref().is_none_or(|progress| {
            progress.turns != seen.turns || progress.last_tool != seen.last_tool
        });
        if changed {
            let mut status = status;
            status.progress = Some(Progress {
                updated_at: Some(now()),
                ..seen
            });
            write_status(ctx, task, status).await?;
        }
    }
    Ok(Action::requeue(until_deadline(task, FOLLOW_INTERVAL)))
}

/// `again`, or sooner if the task's deadline comes first: the pass after the deadline
/// kills the agent, whatever its kind, so a deadline is never overrun by a whole interval.
pub(super) fn until_deadline(task: &AgentTask, again: Duration) -> Duration {
    let Some(deadline) = deadline(task) else {
        return again;
    };
    let left = jiff::Timestamp::now()
        .duration_until(deadline)
        .as_millis()
        .max(0) as u64;
    // A little after, so the pass finds the deadline passed rather than just ahead.
    again.min(Duration::from_millis(left + 100))
}

/// Progress as status shows it: the turns so far (`final_turns` once the agent ended,
/// which the CLI's result states), and the last tool's name, which the model chose and
/// may hold anything, redacted and cut to the schema's size.
pub(crate) fn shown_progress(
    seen: &crate::agent::stream_json::Progress,
    final_turns: Option<u32>,
    redactor: &Redactor,
) -> Progress {
    Progress {
        turns: i64::from(final_turns.unwrap_or(seen.turns)),
        last_tool: seen
            .last_tool
            .as_ref()
            .map(|tool| truncate(&redactor.redact(tool), 256)),
        updated_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_a_redacted_tool_and_the_final_turns() {
        let redactor = Redactor::new(["s3cr3t".to_string()]);
        let seen = crate::agent::stream_json::Progress {
            turns: 2,
            last_tool: Some("mcp__s3cr3t__query".into()),
            ..Default::default()
        };
        let shown = shown_progress(&seen, Some(3), &redactor);
        assert_eq!(shown.turns, 3);
        assert_eq!(shown.last_tool.as_deref(), Some("mcp__[redacted]__query"));
        let long = crate::agent::stream_json::Progress {
            turns: 1,
            last_tool: Some("x".repeat(1000)),
            ..Default::default()
        };
        let shown = shown_progress(&long, None, &redactor);
        assert_eq!(
            (shown.turns, shown.last_tool.unwrap().chars().count()),
            (1, 256)
        );
    }

    #[test]
    fn a_pass_comes_back_by_the_deadline() {
        // Ten seconds ago, to the second, as the apiserver stamps it.
        let created =
            jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 10).expect("a time");
        let mut task: AgentTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "t", "creationTimestamp": created.to_string()},
            "spec": {"templateRef": {"name": "base"}, "agent": {"command": {"command": ["sleep", "60"]}},
                     "activeDeadlineSeconds": 13},
        }))
        .expect("a task");
        let again = until_deadline(&task, Duration::from_secs(30));
        assert!(
            again <= Duration::from_millis(3100) && again >= Duration::from_millis(1900),
            "{again:?}"
        );
        task.spec.active_deadline_seconds = 3600;
        assert_eq!(
            until_deadline(&task, Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }
}
