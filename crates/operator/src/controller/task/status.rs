//! The task's status: staged for a phase and reason (pure), written, and the events
//! that go with it.

use super::*;

pub(super) fn previous(task: &AgentTask) -> AgentTaskStatus {
    task.status.clone().unwrap_or_default()
}

pub(super) fn is_terminal(phase: Option<TaskPhase>) -> bool {
    matches!(phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
}

/// The status with phase, reason and conditions for `phase`, everything else kept.
pub(super) fn staged(
    task: &AgentTask,
    phase: TaskPhase,
    reason: TaskReason,
    message: &str,
    change: impl FnOnce(&mut AgentTaskStatus),
) -> AgentTaskStatus {
    let mut status = previous(task);
    let generation = task.metadata.generation;
    let at = now();
    let message = truncate(message, 4096);
    let terminal = is_terminal(Some(phase));
    // A failed task needs a person (a new task or a fixed spec), which kstatus readers
    // (Flux, Helm's --wait) take as failed instead of waiting for their timeout.
    let standing = Standing {
        ready: phase == TaskPhase::Succeeded,
        reconciling: !terminal,
        stalled: phase == TaskPhase::Failed,
    };
    let mut conditions = triplet(
        &status.conditions,
        standing,
        reason.as_str(),
        &message,
        generation,
        &at,
    );
    if terminal {
        let succeeded = if phase == TaskPhase::Succeeded {
            "True"
        } else {
            "False"
        };
        conditions.push(condition(
            &status.conditions,
            CONDITION_SUCCEEDED,
            succeeded,
            reason.as_str(),
            &message,
            generation,
            &at,
        ));
    }
    status.conditions = conditions;
    status.phase = Some(phase);
    status.observed_generation = generation;
    status.reason = Some(reason.to_string());
    status.message = Some(message);
    change(&mut status);
    status
}

pub(super) async fn write_status(
    ctx: &Context,
    task: &AgentTask,
    mut status: AgentTaskStatus,
) -> Result<(), Error> {
    crate::status::fit_task_status(&mut status);
    let made = apply_status(&ctx.client, task, &status, true).await?;
    remember_write(ctx, task, &made);
    Ok(())
}

/// Notes that the task read as `task` is now at version `made`, for `is_stale`.
pub(super) fn remember_write(ctx: &Context, task: &AgentTask, made: &str) {
    if let Some(uid) = &task.metadata.uid {
        ctx.memory
            .note_write(uid, &task.resource_version().unwrap_or_default(), made);
    }
}

/// Whether the cached copy is older than a write this process made: a pass is woken by
/// the agent's end or by a timer as well as by the watch, and a pass on a copy a write was
/// based on would do that step again.
pub(super) fn is_stale(ctx: &Context, task: &AgentTask) -> bool {
    task.metadata.uid.as_ref().is_some_and(|uid| {
        ctx.memory
            .is_stale(uid, &task.resource_version().unwrap_or_default())
    })
}

/// The provider could not be reached or answered with an error: wait and look again.
pub(super) async fn write_provider_trouble(
    ctx: &Context,
    task: &AgentTask,
    message: &str,
    again: Duration,
) -> Result<Action, Error> {
    write_waiting(ctx, task, TaskReason::ProviderUnavailable, message, again).await
}

/// Writes a waiting stage unless the status already says exactly that.
pub(super) async fn write_waiting(
    ctx: &Context,
    task: &AgentTask,
    reason: TaskReason,
    message: &str,
    again: Duration,
) -> Result<Action, Error> {
    let status = previous(task);
    if status.reason != reason || status.message.as_deref() != Some(message) {
        let phase = status
            .phase
            .filter(|phase| *phase != TaskPhase::Queued)
            .unwrap_or(TaskPhase::Pending);
        write_status(ctx, task, staged(task, phase, reason, message, |_| {})).await?;
        // One event per change of reason; a new message under the same reason is status only.
        if status.reason != reason {
            let type_ = if reason.is_normal_wait() {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish_event(ctx, task, type_, reason, message.to_string()).await;
        }
    }
    // A waiting task still fails at its deadline, not at the next look.
    Ok(Action::requeue(until_deadline(task, again)))
}

/// The events of an attempt's steps, each published once. kube's `Recorder` keeps every
/// event it publishes for six minutes, to count a repeat into a series, and goes through
/// all it keeps on every publish under one lock: at 50 tasks a second these would be
/// 30,000 events. They need no series, so each goes out through a recorder of its own;
/// waits, retries, failures and cleanup trouble, which can repeat, share the operator's.
pub(super) async fn publish_event(
    ctx: &Context,
    task: &AgentTask,
    type_: EventType,
    reason: TaskReason,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(&note, 1000)),
        action: reason.to_string(),
        secondary: None,
    };
    let own;
    let recorder = if reason.is_once_per_attempt() {
        own = Recorder::new(ctx.client.clone(), Reporter::from(FIELD_MANAGER));
        &own
    } else {
        &ctx.recorder
    };
    if let Err(error) =
        crate::controller::publish_event(&ctx.client, recorder, &event, &task.object_ref(&())).await
    {
        tracing::warn!(%error, %reason, "cannot publish event");
    }
}
