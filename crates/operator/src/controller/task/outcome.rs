//! The end of an agent: what it did read from the recorder's files, the task's
//! result, retries and failures.

use super::*;

pub(super) fn listing_json(listing: &Listing) -> BTreeMap<String, (i64, Option<String>)> {
    listing
        .iter()
        .map(|(path, listed)| (path.clone(), (listed.size, listed.modified.clone())))
        .collect()
}

pub(super) fn listing_from_json(bytes: &[u8]) -> Listing {
    serde_json::from_slice::<BTreeMap<String, (i64, Option<String>)>>(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(|(path, (size, modified))| (path, Listed { size, modified }))
        .collect()
}

/// One of the recorder's files; one it never wrote reads as empty.
pub(super) async fn read_recorded(
    envd: &EnvdClient,
    name: &str,
) -> Result<bytes::Bytes, ProviderError> {
    match envd.read_file(&run_file(name)).await {
        Err(error) if error.is_not_found() => Ok(bytes::Bytes::new()),
        read => read,
    }
}

/// The regular files under the workspace, by path relative to it.
pub(super) async fn listing(envd: &EnvdClient, workspace: &str) -> Result<Listing, ProviderError> {
    let entries = envd.list_dir(workspace, 64).await?;
    let prefix = format!("{workspace}/");
    Ok(entries
        .into_iter()
        .filter(|entry| entry.kind == FileType::File)
        .filter_map(|entry| {
            let relative = entry.path.strip_prefix(&prefix)?.to_string();
            Some((
                relative,
                Listed {
                    size: entry.size,
                    modified: entry.modified_time,
                },
            ))
        })
        .collect())
}

/// Reads the outcome the recorder left, lists the changed files, kills the sandbox and
/// records the verdict.
pub(super) async fn finish(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    exit_code: i32,
    git_auth: Option<&GitAuth>,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let workspace = workspace(task);
    // What the recorder left, read in full or not at all: a failed read must not become an
    // empty result or an empty file list.
    let outcome = async {
        let stdout = read_recorded(envd, "stdout").await?;
        let stderr = read_recorded(envd, "stderr").await?;
        let before = listing_from_json(&read_recorded(envd, BEFORE_LISTING).await?);
        let after = listing(envd, &workspace).await?;
        Ok::<_, ProviderError>((stdout, stderr, before, after))
    }
    .await;
    let (stdout, stderr, before, after) = match outcome {
        Ok(outcome) => outcome,
        Err(error) => return write_envd_trouble(task, ctx, provider, &error, redactor).await,
    };
    let outputs = &task.spec.outputs;
    let changes = match files::exclusions(&outputs.exclude) {
        Ok(exclude) => files::changes(&before, &after, &exclude, outputs.max_files.max(0) as usize),
        Err(error) => {
            return write_failure(
                ctx,
                task,
                TaskReason::InvalidOutputs,
                &error.to_string(),
                |_| {},
            )
            .await;
        }
    };
    let Judgement {
        result,
        usage,
        progress,
        ending,
    } = judge(
        is_claude(task),
        wants_structured_output(task),
        exit_code,
        &stdout,
        &stderr,
        redactor,
    );
    let mut failure = match ending {
        Ending::Succeeded => None,
        Ending::Failed { reason, message } => Some((reason, message)),
        Ending::Retry { message } => {
            return write_retry(task, ctx, provider, TaskReason::AgentIncomplete, &message).await;
        }
    };
    // Before the push: a successful agent whose artifacts are missing did not do what was
    // asked, and its work is not pushed.
    let collected = if task.spec.outputs.artifacts.is_empty() {
        None
    } else {
        match artifacts::collect(task, ctx, envd, &after, redactor).await {
            Ok(collected) => {
                if failure.is_none()
                    && let Some(pattern) = &collected.missing
                {
                    let message = format!(
                        "outputs.artifacts pattern {pattern:?} matched no file of the workspace"
                    );
                    failure = Some((TaskReason::ArtifactNotFound, message));
                }
                Some(collected)
            }
            Err(git::Interrupted::Provider(error)) => {
                return write_envd_trouble(task, ctx, provider, &error, redactor).await;
            }
            Err(git::Interrupted::Kube(error)) => return Err(error),
        }
    };
    // Only a successful agent's work is pushed; a failed one's keeps its own reason. A
    // pass cut off here delivers again: the commit is found made, and a push of the same
    // commit changes nothing.
    let succeeded = failure.is_none();
    let delivered = match git::deliver(task, ctx, envd, git_auth, redactor, succeeded).await {
        Ok(delivered) => delivered,
        Err(git::Interrupted::Provider(error)) => {
            return write_envd_trouble(task, ctx, provider, &error, redactor).await;
        }
        Err(git::Interrupted::Kube(error)) => return Err(error),
    };
    if succeeded {
        failure = delivered.failure.clone();
    }
    // An agent that printed nothing leaves no transcript: an empty ConfigMap would cost a
    // write and an object per task and tell nobody anything.
    if !(stdout.is_empty() && stderr.is_empty()) {
        save_transcript(ctx, task, redactor, &stdout, &stderr).await?;
    }
    // The verdict is written before the sandbox is killed: the other way round, a crash in
    // between leaves a task whose sandbox is gone and whose result is lost, and the next
    // pass would run the agent again. A sandbox a crash or a failed kill leaves here is
    // the sweep's.
    let sandbox = previous(task).sandbox_id;
    let record = |status: &mut AgentTaskStatus| {
        status.result = Some(result.clone());
        status.usage = usage.clone();
        if let Some(progress) = &progress {
            status.progress = Some(Progress {
                updated_at: Some(now()),
                ..progress.clone()
            });
        }
        status.files = changes
            .files
            .iter()
            .map(|file| OutputFile {
                // Redacted before it is cut, so no part of a secret is left at the cut.
                path: files::shown_path(&redactor.redact(&file.path)),
                size: file.size,
            })
            .collect();
        status.file_count = Some(changes.count as i64);
        if let Some(git) = &delivered.git {
            status.git = Some(git.clone());
        }
        status.patch = delivered.patch.clone();
        if let Some(collected) = &collected {
            status.artifacts = collected.artifacts.clone();
            status.artifacts_config_map = collected.config_map.clone();
        }
        status.files_truncated = changes.truncated;
        status.completion_time = Some(now());
    };
    match failure {
        None => {
            let status = staged(
                task,
                TaskPhase::Succeeded,
                TaskReason::Succeeded,
                "the agent finished",
                record,
            );
            write_status(ctx, task, status.clone()).await?;
            forget(ctx, task);
            count_finished(ctx, &status);
            let _ = kill_sandboxes(ctx, task, sandbox.as_deref()).await;
            publish_event(
                ctx,
                task,
                EventType::Normal,
                TaskReason::Succeeded,
                "the agent finished".into(),
            )
            .await;
            Ok(Action::await_change())
        }
        Some((reason, message)) => {
            let action = write_failure(ctx, task, reason, &message, record).await?;
            let _ = kill_sandboxes(ctx, task, sandbox.as_deref()).await;
            Ok(action)
        }
    }
}

/// The name of the ConfigMap that keeps a task's transcript: `<task>-transcript`, or, for
/// a name too long to take the suffix (an object name has at most 253 characters), the
/// name's start, a hash of the whole name and the suffix.
pub(crate) fn transcript_name(task: &AgentTask) -> String {
    owned_name(task, "-transcript")
}

/// The name of an object a task owns: the task's name and `suffix`, or, for a name too
/// long to take it, the name's start, a hash of the whole name and the suffix.
pub(super) fn owned_name(task: &AgentTask, suffix: &str) -> String {
    let name = task.name_any();
    if name.len() + suffix.len() <= 253 {
        return format!("{name}{suffix}");
    }
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(name.as_bytes())[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    // Task names are ASCII, so any byte index is a character boundary.
    let start = name[..253 - suffix.len() - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{start}-{hash}{suffix}")
}

/// Keeps the agent's redacted output in a ConfigMap the task owns, so it is deleted with
/// the task: `stdout` (for Claude Code, the stream-json transcript) and `stderr`.
pub(super) async fn save_transcript(
    ctx: &Context,
    task: &AgentTask,
    redactor: &Redactor,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<(), Error> {
    let keep = |bytes: &[u8], limit: usize| {
        transcript::cap(&redactor.redact(&String::from_utf8_lossy(bytes)), limit)
    };
    let data = serde_json::json!({"data": {
        "stdout": keep(stdout, transcript::TRANSCRIPT_LIMIT),
        "stderr": keep(stderr, transcript::TRANSCRIPT_LIMIT / 4),
    }});
    save_owned_config_map(ctx, task, &transcript_name(task), data).await
}

/// Writes the ConfigMap `name` with `contents` (its `data` and `binaryData`), owned by
/// the task (so it goes with it) and labelled as its transcript's is.
pub(super) async fn save_owned_config_map(
    ctx: &Context,
    task: &AgentTask,
    name: &str,
    contents: serde_json::Value,
) -> Result<(), Error> {
    let owner = task
        .controller_owner_ref(&())
        .expect("a stored task has a UID");
    let mut config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "ownerReferences": [owner],
            // A label value holds at most 63 characters, a task name 253.
            "labels": if task.name_any().len() <= 63 {
                serde_json::json!({TRANSCRIPT_LABEL: "true", TRANSCRIPT_TASK_LABEL: task.name_any()})
            } else {
                serde_json::json!({TRANSCRIPT_LABEL: "true"})
            },
        },
    });
    if let (Some(object), serde_json::Value::Object(contents)) =
        (config_map.as_object_mut(), contents)
    {
        object.extend(contents);
    }
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    api.patch(
        name,
        &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&config_map),
    )
    .await?;
    Ok(())
}

pub(super) async fn write_failure(
    ctx: &Context,
    task: &AgentTask,
    reason: TaskReason,
    message: &str,
    change: impl FnOnce(&mut AgentTaskStatus),
) -> Result<Action, Error> {
    let status = staged(task, TaskPhase::Failed, reason, message, |status| {
        if status.completion_time.is_none() {
            status.completion_time = Some(now());
        }
        change(status);
    });
    write_status(ctx, task, status.clone()).await?;
    forget(ctx, task);
    count_finished(ctx, &status);
    publish_event(ctx, task, EventType::Warning, reason, message.to_string()).await;
    Ok(Action::await_change())
}

/// Fails a task that holds a sandbox: the verdict first, so a crash between the two
/// never loses it; a kill that fails here is the orphan sweep's to repeat.
pub(super) async fn write_failure_and_kill(
    ctx: &Context,
    task: &AgentTask,
    reason: TaskReason,
    message: &str,
) -> Result<Action, Error> {
    let action = write_failure(ctx, task, reason, message, |_| {}).await?;
    let _ = kill_sandboxes(ctx, task, previous(task).sandbox_id.as_deref()).await;
    Ok(action)
}

/// Records a task that just reached Succeeded or Failed in the metrics.
pub(super) fn count_finished(ctx: &Context, status: &AgentTaskStatus) {
    let took = match (&status.start_time, &status.completion_time) {
        (Some(start), Some(end)) => {
            Duration::try_from(end.0.duration_since(start.0)).unwrap_or_default()
        }
        _ => Duration::ZERO,
    };
    ctx.metrics.task_finished(
        status.phase == Some(TaskPhase::Succeeded),
        took,
        status.usage.as_ref(),
    );
}

/// An infrastructure failure: a new attempt in a new sandbox while `backoffLimit` allows,
/// the old sandbox killed first; otherwise Failed.
pub(super) async fn write_retry(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    reason: TaskReason,
    message: &str,
) -> Result<Action, Error> {
    let status = previous(task);
    // The next attempt adopts any live sandbox of the task's, so the old one must be
    // gone first, or it would be taken for the new one.
    if let Some(id) = &status.sandbox_id
        && let Err(error) = provider.kill_sandbox(id).await
        && !error.is_not_found()
    {
        return write_provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL).await;
    }
    let attempts = status.attempts.unwrap_or(1);
    if attempts > task.spec.backoff_limit {
        let message = format!("{message} (after {attempts} attempts)");
        return write_failure(ctx, task, reason, &message, |status| {
            status.sandbox_id = None
        })
        .await;
    }
    let status = staged(
        task,
        TaskPhase::Pending,
        reason,
        &format!("{message}; retrying"),
        |status| {
            status.sandbox_id = None;
            status.progress = None;
        },
    );
    write_status(ctx, task, status).await?;
    if let Some(uid) = &task.metadata.uid {
        ctx.memory.release_slot(uid);
    }
    publish_event(ctx, task, EventType::Warning, reason, message.to_string()).await;
    let backoff = Duration::from_secs(2u64.saturating_pow(attempts.clamp(0, 6) as u32));
    Ok(Action::requeue(until_deadline(task, backoff)))
}

pub(super) async fn write_sandbox_lost(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
) -> Result<Action, Error> {
    write_retry(
        task,
        ctx,
        provider,
        TaskReason::SandboxLost,
        "the sandbox disappeared",
    )
    .await
}

/// What an agent's run comes to, read from what it left: the result and usage to record,
/// and how the attempt ends.
#[derive(Debug, PartialEq)]
pub(crate) struct Judgement {
    pub(crate) result: TaskResult,
    pub(crate) usage: Option<Usage>,
    /// Claude Code's progress as it ended: the final count of turns.
    pub(crate) progress: Option<Progress>,
    pub(crate) ending: Ending,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Ending {
    Succeeded,
    Failed {
        reason: TaskReason,
        message: String,
    },
    /// No verdict, for a reason a new sandbox may not meet: another attempt.
    Retry {
        message: String,
    },
}

/// Judges a finished agent from its exit code and its recorded stdout and stderr, with
/// every text taken from them redacted (before it is cut, so no part of a secret is left
/// at a cut). Claude Code's stdout is its stream-json transcript; a command's is its
/// output, whose tail is the result.
pub(crate) fn judge(
    claude: bool,
    structured: bool,
    exit_code: i32,
    stdout: &[u8],
    stderr: &[u8],
    redactor: &Redactor,
) -> Judgement {
    let mut result = TaskResult {
        exit_code: Some(exit_code),
        ..TaskResult::default()
    };
    let mut usage = None;
    let mut progress = None;
    let stderr_tail = || {
        truncate(
            redactor.redact(&String::from_utf8_lossy(stderr)).trim(),
            512,
        )
    };
    let verdict = if claude {
        let mut parser = StreamParser::new();
        parser.feed(stdout);
        parser.finish();
        if let Some(outcome) = parser.outcome() {
            let text = redactor.redact(outcome.result.as_deref().unwrap_or_default());
            result.text = truncate(&text, RESULT_TAIL);
            result.truncated = text.chars().count() > RESULT_TAIL;
            result.is_error = outcome.is_error;
            result.subtype = Some(outcome.subtype.clone());
            result.num_turns = outcome.num_turns.map(i64::from);
            result.duration_ms = outcome.duration_ms.map(|ms| ms as i64);
            result.session_id = outcome.session_id.clone();
            result.permission_denials = Some(outcome.permission_denials as i64);
            if let Some(raw) = outcome.structured_output.as_deref() {
                let redacted = redactor.redact(raw);
                // Redacted inside its strings, the object still parses.
                result.structured_output = serde_json::from_str(&redacted)
                    .ok()
                    .filter(|_| redacted.len() <= MAX_STRUCTURED_OUTPUT_BYTES);
                result.structured_output_truncated = result.structured_output.is_none();
            }
            usage = Some(Usage {
                input_tokens: outcome.usage.input_tokens as i64,
                output_tokens: outcome.usage.output_tokens as i64,
                cache_creation_input_tokens: outcome.usage.cache_creation_input_tokens as i64,
                cache_read_input_tokens: outcome.usage.cache_read_input_tokens as i64,
                cost_usd: outcome.total_cost_usd.clone(),
            });
        }
        let final_turns = parser.outcome().and_then(|outcome| outcome.num_turns);
        progress = Some(shown_progress(parser.progress(), final_turns, redactor));
        let answered = parser
            .outcome()
            .is_some_and(|outcome| outcome.structured_output.is_some());
        match parser.verdict() {
            Verdict::Succeeded if structured && !answered => Verdict::Failed {
                reason: FailureReason::StructuredOutput,
                message: "Claude Code ended without an answer matching claudeCode.jsonSchema"
                    .into(),
            },
            verdict => verdict,
        }
    } else {
        let text = redactor.redact(&String::from_utf8_lossy(stdout));
        let chars = text.chars().count();
        result.truncated = chars > RESULT_TAIL;
        result.text = text
            .chars()
            .skip(chars.saturating_sub(RESULT_TAIL))
            .collect();
        result.is_error = exit_code != 0;
        match exit_code {
            0 => Verdict::Succeeded,
            code => Verdict::Failed {
                reason: FailureReason::AgentError,
                message: format!("the command exited with code {code}: {}", stderr_tail()),
            },
        }
    };
    let ending = match verdict {
        Verdict::Succeeded => Ending::Succeeded,
        Verdict::Failed { reason, message } => Ending::Failed {
            reason: match reason {
                FailureReason::MaxTurns => TaskReason::MaxTurns,
                FailureReason::StructuredOutput => TaskReason::StructuredOutputFailed,
                FailureReason::ApiError { .. } => TaskReason::AgentApiError,
                FailureReason::NotLoggedIn => TaskReason::MissingModelCredentials,
                FailureReason::AgentError => TaskReason::AgentFailed,
            },
            message: match reason {
                FailureReason::NotLoggedIn => format!(
                    "Claude Code has no credentials for the model. Give the task ANTHROPIC_API_KEY, or ANTHROPIC_BASE_URL with ANTHROPIC_AUTH_TOKEN for an Anthropic-compatible endpoint, or CLAUDE_CODE_USE_BEDROCK=1 / CLAUDE_CODE_USE_VERTEX=1 with that cloud's credentials, from a Secret: spec.envFrom: [{{secretRef: {{name: anthropic}}}}]. The CLI said: {}",
                    redactor.redact(&message)
                ),
                _ => redactor.redact(&message),
            },
        },
        // An exit code before any output line: the CLI refused its invocation (not
        // installed, root refusing bypass mode, a bad extra argument), and a new sandbox
        // would get the same answer.
        // The CLI checks the schema before it starts: its refusal names the flag.
        Verdict::Incomplete
            if structured
                && exit_code != 0
                && String::from_utf8_lossy(stderr).contains("--json-schema") =>
        {
            Ending::Failed {
                reason: TaskReason::InvalidJsonSchema,
                message: format!("claudeCode.jsonSchema was refused: {}", stderr_tail()),
            }
        }
        Verdict::Incomplete if exit_code != 0 && stdout.iter().all(u8::is_ascii_whitespace) => {
            Ending::Failed {
                reason: TaskReason::AgentFailed,
                message: format!(
                    "the agent exited with code {exit_code} before any output: {}",
                    stderr_tail()
                ),
            }
        }
        Verdict::Incomplete => Ending::Retry {
            message: format!("the agent ended without a result: {}", stderr_tail()),
        },
    };
    Judgement {
        result,
        usage,
        progress,
        ending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUCCESS: &[u8] = include_bytes!("../../../tests/fixtures/claude/success.jsonl");
    const UNAUTHORIZED: &[u8] = include_bytes!("../../../tests/fixtures/claude/unauthorized.jsonl");
    const MAX_TURNS: &[u8] = include_bytes!("../../../tests/fixtures/claude/max_turns.jsonl");
    const KILLED: &[u8] = include_bytes!("../../../tests/fixtures/claude/killed.jsonl");
    const NOT_LOGGED_IN: &[u8] =
        include_bytes!("../../../tests/fixtures/claude/not_logged_in.jsonl");

    fn redactor() -> Redactor {
        Redactor::new(vec!["hunter2".to_string()])
    }

    fn ending(claude: bool, exit_code: i32, stdout: &[u8], stderr: &[u8]) -> Ending {
        judge(claude, false, exit_code, stdout, stderr, &redactor()).ending
    }

    fn failed(reason: TaskReason, message: &str) -> Ending {
        Ending::Failed {
            reason,
            message: message.to_string(),
        }
    }

    #[test]
    fn endings() {
        let cases: Vec<(&str, Ending, Ending)> = vec![
            (
                "a command that exits 0 succeeded",
                ending(false, 0, b"done\n", b""),
                Ending::Succeeded,
            ),
            (
                "a command that exits non-zero failed, with its stderr redacted",
                ending(false, 3, b"", b"password hunter2 refused\n"),
                failed(
                    TaskReason::AgentFailed,
                    "the command exited with code 3: password [redacted] refused",
                ),
            ),
            (
                "Claude Code's success",
                ending(true, 0, SUCCESS, b""),
                Ending::Succeeded,
            ),
            (
                "Claude Code at its turn limit",
                match ending(true, 1, MAX_TURNS, b"") {
                    Ending::Failed { reason, .. } => failed(reason, ""),
                    other => other,
                },
                failed(TaskReason::MaxTurns, ""),
            ),
            (
                "Claude Code refused by the model's API",
                match ending(true, 1, UNAUTHORIZED, b"") {
                    Ending::Failed { reason, .. } => failed(reason, ""),
                    other => other,
                },
                failed(TaskReason::AgentApiError, ""),
            ),
            (
                "Claude Code without credentials says what to set",
                match ending(true, 1, NOT_LOGGED_IN, b"") {
                    Ending::Failed { reason, message } => {
                        assert!(
                            message.contains("ANTHROPIC_API_KEY")
                                && message.contains("ANTHROPIC_AUTH_TOKEN")
                                && message.contains("envFrom")
                                && message.contains("Not logged in"),
                            "{message}"
                        );
                        failed(reason, "")
                    }
                    other => other,
                },
                failed(TaskReason::MissingModelCredentials, ""),
            ),
            (
                "an exit code before any output is a refused invocation, not a retry",
                ending(true, 1, b"  \n", b"claude: not found\n"),
                failed(
                    TaskReason::AgentFailed,
                    "the agent exited with code 1 before any output: claude: not found",
                ),
            ),
            (
                "a transcript cut short is retried",
                ending(true, 137, KILLED, b"killed\n"),
                Ending::Retry {
                    message: "the agent ended without a result: killed".into(),
                },
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_command_result_is_the_redacted_tail_of_its_output() {
        let long = format!("hunter2{}", "x".repeat(RESULT_TAIL + 10));
        let judged = judge(false, false, 0, long.as_bytes(), b"", &redactor());
        assert!(judged.result.truncated);
        assert_eq!(judged.result.text.chars().count(), RESULT_TAIL);
        assert!(!judged.result.text.contains("hunter2"));
        assert_eq!(judged.result.exit_code, Some(0));
        assert!(judged.usage.is_none());
    }

    #[test]
    fn claude_code_results_carry_usage_and_cost_as_reported() {
        let judged = judge(true, false, 0, SUCCESS, b"", &redactor());
        let usage = judged.usage.expect("usage");
        assert!(usage.input_tokens > 0 && usage.output_tokens > 0);
        assert!(usage.cost_usd.is_some());
        assert!(judged.result.session_id.is_some());
        assert_eq!(judged.result.subtype.as_deref(), Some("success"));
        assert_eq!(judged.result.num_turns, Some(3));
        let progress = judged.progress.expect("progress");
        assert_eq!(progress.turns, 3, "the final count, as TURNS shows it");
        assert_eq!(usage.cost_usd.as_deref(), Some("0.0024"));
    }

    #[test]
    fn a_json_schema_answer_lands_redacted_or_fails_the_task() {
        let line = |extra: &str| {
            format!(
                "{{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"ok\",\"num_turns\":2{extra}}}\n"
            )
        };
        let answered = line(r#","structured_output":{"summary":"key hunter2","n":1.50}"#);
        let judged = judge(true, true, 0, answered.as_bytes(), b"", &redactor());
        assert_eq!(judged.ending, Ending::Succeeded);
        let kept = serde_json::Value::Object(judged.result.structured_output.expect("kept"));
        assert_eq!(
            kept,
            serde_json::json!({"summary": "key [redacted]", "n": 1.50})
        );

        let huge = line(&format!(
            r#","structured_output":{{"text":"{}"}}"#,
            "x".repeat(MAX_STRUCTURED_OUTPUT_BYTES)
        ));
        let judged = judge(true, true, 0, huge.as_bytes(), b"", &redactor());
        assert!(judged.result.structured_output.is_none());
        assert!(judged.result.structured_output_truncated);
        assert_eq!(judged.ending, Ending::Succeeded);

        let cases = [
            (line(""), 0, "", TaskReason::StructuredOutputFailed),
            (
                "{\"type\":\"result\",\"subtype\":\"error_max_structured_output_retries\",\"is_error\":true,\"errors\":[\"gave up\"]}\n".to_string(),
                1,
                "",
                TaskReason::StructuredOutputFailed,
            ),
            (
                String::new(),
                1,
                "Error: --json-schema is not a valid JSON Schema: data/type must be equal to one of the allowed values",
                TaskReason::InvalidJsonSchema,
            ),
        ];
        for (stdout, code, stderr, reason) in cases {
            match judge(
                true,
                true,
                code,
                stdout.as_bytes(),
                stderr.as_bytes(),
                &redactor(),
            )
            .ending
            {
                Ending::Failed { reason: got, .. } => assert_eq!(got, reason, "{stdout}{stderr}"),
                other => panic!("{stdout}{stderr}: {other:?}"),
            }
        }
        // Without a schema, the same answerless run succeeds.
        assert_eq!(ending(true, 0, line("").as_bytes(), b""), Ending::Succeeded);
    }
}
