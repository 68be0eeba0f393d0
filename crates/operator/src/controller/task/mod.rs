//! The `AgentTask` reconciler. Each pass looks at where the task stands and takes one
//! step: wait for the template and the Secrets, create (or adopt) the sandbox, start the
//! agent under the recorder, follow it, and finish from the recorder's files. Everything
//! it needs to resume lives in the status or in the sandbox, so a restart loses nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::{Context, Error, FIELD_MANAGER, apply_status, now};
use crate::agent::files::{self, Listed, Listing};
use crate::agent::git::GitAuth;
use crate::agent::invocation::{self, AGENT_TAG, Invocation, RUN_DIR, STARTED_MARKER};
use crate::agent::redact::Redactor;
use crate::agent::stream_json::{FailureReason, StreamParser, Verdict};
use crate::agent::transcript;
use crate::text::truncate;
use sandcastle_api::conditions::{Standing, condition, triplet};
use sandcastle_api::names::{
    SANDBOX_OPERATOR as OPERATOR, SANDBOX_TASK_NAME as TASK_NAME,
    SANDBOX_TASK_NAMESPACE as TASK_NAMESPACE, SANDBOX_TASK_UID as TASK_UID,
    TASK_FINALIZER as FINALIZER, TRANSCRIPT_LABEL, TRANSCRIPT_TASK_LABEL,
};
use sandcastle_api::{
    AgentTask, AgentTaskStatus, CONDITION_READY, CONDITION_SUCCEEDED, GitStatus,
    MAX_STRUCTURED_OUTPUT_BYTES, OutputFile, Progress, SandboxTemplate, TaskPhase, TaskReason,
    TaskResult, TemplatePhase, Usage,
};
use sandcastle_e2b::client::{E2bClient, ListQuery, SandboxSpec};
use sandcastle_e2b::envd::{FileType, ProcessSelector};
use sandcastle_e2b::envd_client::{CommandSpec, EnvdClient, ProcessStream, ProcessUpdate};
use sandcastle_e2b::error::Error as ProviderError;

mod admission;
mod agent;
mod artifacts;
mod cleanup;
mod git;
mod memory;
mod outcome;
mod provision;
mod resolve;
mod status;

use admission::*;
use agent::*;
use memory::Slot;

use cleanup::*;
pub(super) use memory::TaskMemory;
use outcome::*;
use provision::*;
use resolve::*;
use status::*;

pub(super) use cleanup::sweep_orphans;

const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// How often an agent whose end will wake the task is looked at all the same.
const FOLLOW_FALLBACK: Duration = Duration::from_secs(30);
const WAIT_INTERVAL: Duration = Duration::from_secs(5);
/// The sandbox outlives the task's deadline by this much, as the provider's own dead-man
/// switch should the operator be gone.
const SANDBOX_GRACE: Duration = Duration::from_secs(120);
/// The most of the agent's stdout the command agent's result keeps.
const RESULT_TAIL: usize = 4096;
/// Progress is written at most this often.
const PROGRESS_INTERVAL: i64 = 5;
const BEFORE_LISTING: &str = "before.json";

pub async fn reconcile(task: Arc<AgentTask>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = task.namespace().unwrap_or_default();
    let api: Api<AgentTask> = Api::namespaced(ctx.client.clone(), &namespace);
    let deleting = task.meta().deletion_timestamp.is_some();
    if !deleting && is_stale(&ctx, &task) {
        return Ok(Action::await_change());
    }
    let finalized = task.finalizers().iter().any(|name| name == FINALIZER);
    // Until it asks for a sandbox a task has nothing outside the cluster to clean up, so
    // its finalizer goes on alongside the sandbox create (see `provision`) and the create
    // waits for no write. `finalizer` would add it first and end the pass.
    let task = match (deleting, finalized, holds_sandbox(&task)) {
        (false, false, false) => return settle(apply(&task, &ctx).await),
        // A status with a sandbox and no finalizer is a hand edit: put it back first.
        (false, false, true) => match add_finalizer(&ctx, &api, &task).await {
            Ok(task) => Arc::new(task),
            Err(error) => return settle(Err(error)),
        },
        _ => task,
    };
    finalizer(&api, FINALIZER, task, |event| async {
        match event {
            Finalizer::Apply(task) => settle(apply(&task, &ctx).await),
            Finalizer::Cleanup(task) => cleanup(&task, &ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

/// A pass that found its copy outdated ends there: a newer copy is on its way, and its
/// pass takes over.
fn settle(outcome: Result<Action, Error>) -> Result<Action, Error> {
    match outcome {
        Err(Error::Stale) => Ok(Action::await_change()),
        outcome => outcome,
    }
}

/// Counted from creation, like a Job's: time spent waiting for a template, a Secret or a
/// sandbox slot counts, so the deadline never moves.
fn deadline(task: &AgentTask) -> Option<jiff::Timestamp> {
    let created = task.metadata.creation_timestamp.as_ref()?.0;
    created
        .checked_add(jiff::SignedDuration::from_secs(
            task.spec.active_deadline_seconds,
        ))
        .ok()
}

async fn apply(task: &AgentTask, ctx: &Context) -> Result<Action, Error> {
    let status = previous(task);
    if is_terminal(status.phase) {
        return delete_if_expired(task, ctx, &status).await;
    }
    // A glob the files list or the artifacts cannot use would throw the run's result away
    // at the end.
    let patterns = files::exclusions(&task.spec.outputs.exclude)
        .map(drop)
        .map_err(|error| error.to_string())
        .and_then(|()| {
            crate::agent::artifacts::compile(&task.spec.outputs.artifacts)
                .map(drop)
                .map_err(|error| error.to_string())
        });
    if let Err(error) = patterns {
        return write_failure(ctx, task, TaskReason::InvalidOutputs, &error, |_| {}).await;
    }
    if let Some(deadline) = deadline(task)
        && jiff::Timestamp::now() >= deadline
    {
        // Should this kill fail, the sweep finds the sandbox of a finished task.
        let _ = kill_sandboxes(ctx, task, status.sandbox_id.as_deref()).await;
        let message = format!(
            "the task did not finish within {} s",
            task.spec.active_deadline_seconds
        );
        return write_failure(ctx, task, TaskReason::DeadlineExceeded, &message, |_| {}).await;
    }
    let namespace = task.namespace().unwrap_or_default();
    let template_name = &task.spec.template_ref.name;
    let template = ctx.caches.template(&namespace, template_name).await?;
    let ready = template.as_ref().and_then(|template| {
        let status = template.status.as_ref()?;
        (status.phase == Some(TemplatePhase::Ready)).then(|| status.clone())
    });
    // A task with a sandbox needs its template only to find the provider: a template
    // rebuilt or deleted meanwhile must not stop the agent it already runs.
    let held = status.sandbox_id.is_some();
    if ready.is_none() && !held {
        return write_waiting_for_template(ctx, task, template).await;
    }
    let (inputs, secret_values) = match resolve_env(ctx, task).await {
        Ok(resolved) => resolved,
        Err(error) => {
            return write_waiting(
                ctx,
                task,
                TaskReason::MissingSecret,
                &error.to_string(),
                WAIT_INTERVAL * 2,
            )
            .await;
        }
    };
    let redactor = Redactor::new(secret_values);
    let provider = match &template {
        Some(template) => crate::controller::template::resolve_provider(ctx, template)
            .await
            .map_err(|blocked| blocked.message),
        // Deleted under its task: a sandbox on the template's own provider is out of reach
        // (and found lost), one on the default provider is not.
        None => ctx.default_provider.clone().ok_or_else(|| {
            format!(
                "SandboxTemplate {template_name} is gone and the operator has no default provider"
            )
        }),
    };
    let provider = match provider {
        Ok(provider) => provider,
        Err(message) => {
            return write_provider_trouble(ctx, task, &message, WAIT_INTERVAL * 3).await;
        }
    };
    let Some(sandbox_id) = status.sandbox_id.clone() else {
        let Some(template_status) = ready else {
            return write_waiting_for_template(ctx, task, template).await;
        };
        let tasks = ctx.caches.tasks().await?;
        let slot = match admit(ctx, task, &tasks) {
            Ok(slot) => slot,
            Err(refusal) => return write_queued(ctx, task, refusal.to_string()).await,
        };
        return provision(
            task,
            ctx,
            slot,
            &provider,
            &template_status,
            inputs,
            &redactor,
        )
        .await;
    };
    let detail = match provider.get_sandbox(&sandbox_id).await {
        Ok(detail) => detail,
        Err(error) if error.is_not_found() => {
            return write_sandbox_lost(task, ctx, &provider).await;
        }
        Err(error) => {
            return write_provider_trouble(
                ctx,
                task,
                &redactor.redact(&error.to_string()),
                WAIT_INTERVAL * 3,
            )
            .await;
        }
    };
    let envd = provider.envd(&detail);
    run(task, ctx, &provider, &envd, inputs, &redactor).await
}

/// Over the caps: the task waits in the Queued phase, saying why.
async fn write_queued(ctx: &Context, task: &AgentTask, message: String) -> Result<Action, Error> {
    let status = staged(
        task,
        TaskPhase::Queued,
        TaskReason::Queued,
        &message,
        |_| {},
    );
    let before = previous(task);
    if before.message.as_deref() != status.message.as_deref() {
        write_status(ctx, task, status).await?;
    }
    if before.reason != TaskReason::Queued {
        publish_event(ctx, task, EventType::Normal, TaskReason::Queued, message).await;
    }
    Ok(Action::requeue(FOLLOW_INTERVAL))
}

/// What the cache keeps of a finished task: its phase and times (for the metrics and its
/// expiry) and what its cleanup needs (template and sandbox). The result, the file list,
/// the prompt, the environment and annotations such as kubectl's copy of the whole
/// manifest are read by no pass once a task has finished, and a cluster may hold
/// thousands of finished tasks. No pass writes a finished task's status, so nothing
/// dropped here is written back.
pub(super) fn slim_if_finished(task: &mut AgentTask) {
    let Some(status) = task.status.as_mut() else {
        return;
    };
    if !is_terminal(status.phase) {
        return;
    }
    task.metadata.annotations = None;
    let spec = &mut task.spec;
    spec.prompt = None;
    spec.agent = None;
    spec.env = Vec::new();
    spec.env_from = Vec::new();
    spec.workspace = Default::default();
    spec.outputs = Default::default();
    status.conditions = Vec::new();
    status.result = None;
    status.usage = None;
    status.files = Vec::new();
    status.progress = None;
    status.message = None;
    status.template_id = None;
    status.build_id = None;
}

fn phase(task: &AgentTask) -> Option<TaskPhase> {
    task.status.as_ref().and_then(|status| status.phase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> AgentTask {
        let mut task: AgentTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1",
            "kind": "AgentTask",
            "metadata": {"name": "t", "namespace": "n", "generation": 2},
            "spec": {"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}}},
        }))
        .unwrap();
        task.status = Some(AgentTaskStatus {
            sandbox_id: Some("sbx".into()),
            attempts: Some(1),
            ..AgentTaskStatus::default()
        });
        task
    }

    fn conditions(status: &AgentTaskStatus) -> Vec<(&str, &str)> {
        status
            .conditions
            .iter()
            .map(|condition| (condition.type_.as_str(), condition.status.as_str()))
            .collect()
    }

    #[test]
    fn running_reads_as_in_progress_and_keeps_the_rest() {
        let status = staged(
            &task(),
            TaskPhase::Running,
            TaskReason::Running,
            "busy",
            |_| {},
        );
        assert_eq!(
            conditions(&status),
            [
                ("Ready", "False"),
                ("Reconciling", "True"),
                ("Stalled", "False")
            ]
        );
        assert_eq!(
            (status.sandbox_id.as_deref(), status.attempts),
            (Some("sbx"), Some(1))
        );
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(status.reason.as_deref(), Some("Running"));
    }

    #[test]
    fn finished_tasks_say_whether_they_succeeded() {
        let done = staged(
            &task(),
            TaskPhase::Succeeded,
            TaskReason::Succeeded,
            "ok",
            |_| {},
        );
        assert_eq!(
            conditions(&done),
            [
                ("Ready", "True"),
                ("Reconciling", "False"),
                ("Stalled", "False"),
                ("Succeeded", "True")
            ]
        );
        let failed = staged(
            &task(),
            TaskPhase::Failed,
            TaskReason::MaxTurns,
            "too long",
            |status| status.sandbox_id = None,
        );
        assert_eq!(
            conditions(&failed),
            [
                ("Ready", "False"),
                ("Reconciling", "False"),
                ("Stalled", "True"),
                ("Succeeded", "False")
            ]
        );
        assert!(failed.sandbox_id.is_none());
    }

    #[test]
    fn messages_are_capped() {
        let long = "x".repeat(10_000);
        let status = staged(
            &task(),
            TaskPhase::Pending,
            TaskReason::TemplateNotReady,
            &long,
            |_| {},
        );
        assert_eq!(status.message.unwrap().chars().count(), 4096);
    }

    #[test]
    fn listings_round_trip_through_the_sandbox_file() {
        let listing = Listing::from([(
            "a/b.txt".to_string(),
            Listed {
                size: 3,
                modified: Some("2026-11-23T10:00:00Z".into()),
            },
        )]);
        let bytes = serde_json::to_vec(&listing_json(&listing)).unwrap();
        assert_eq!(listing_from_json(&bytes), listing);
    }
}
