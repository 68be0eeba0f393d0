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
    AgentTask, AgentTaskStatus, CONDITION_READY, OutputFile, Progress, SandboxTemplate, TaskPhase,
    TaskResult, TemplatePhase, Usage,
};
use sandcastle_e2b::client::{E2bClient, ListQuery, SandboxSpec};
use sandcastle_e2b::envd::{FileType, ProcessSelector};
use sandcastle_e2b::envd_client::{CommandSpec, EnvdClient, ProcessStream, ProcessUpdate};
use sandcastle_e2b::error::Error as ProviderError;

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
const CONDITION_SUCCEEDED: &str = "Succeeded";
/// The reason of a task whose finalizer the apiserver refused.
const FINALIZER_REFUSED: &str = "FinalizerRefused";

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

/// Whether the last pass found the finalizer refused: its status says so.
fn was_refused(task: &AgentTask) -> bool {
    previous(task).reason.as_deref() == Some(FINALIZER_REFUSED)
}

/// The finalizer could not be added. A refusal (RBAC, an admission policy) is the
/// cluster's setup, not the task's: the task waits with the apiserver's words until the
/// deadline, and no sandbox is made for it meanwhile. Anything else is retried.
async fn finalizer_trouble(ctx: &Context, task: &AgentTask, error: Error) -> Result<Action, Error> {
    let Error::Kube(kube::Error::Api(status)) = &error else {
        return Err(error);
    };
    if !matches!(status.code, 400 | 403 | 422) {
        return Err(error);
    }
    let message = format!(
        "the apiserver refused the finalizer {FINALIZER}: {}",
        status.message
    );
    wait(ctx, task, FINALIZER_REFUSED, &message, WAIT_INTERVAL * 3).await
}

fn holds_sandbox(task: &AgentTask) -> bool {
    task.status
        .as_ref()
        .is_some_and(|status| status.sandbox_id.is_some())
}

/// Adds the finalizer and returns the task as written. The write holds only if the task
/// is still the version read, so no other finalizer is lost.
async fn add_finalizer(
    ctx: &Context,
    api: &Api<AgentTask>,
    task: &AgentTask,
) -> Result<AgentTask, Error> {
    let mut finalizers = task.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": task.resource_version()},
    });
    let written = api
        .patch(
            &task.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map_err(|error| match error {
            kube::Error::Api(status) if status.is_conflict() => Error::Stale,
            error => Error::Kube(error),
        })?;
    remember_write(ctx, task, &written.resource_version().unwrap_or_default());
    Ok(written)
}

fn previous(task: &AgentTask) -> AgentTaskStatus {
    task.status.clone().unwrap_or_default()
}

fn is_terminal(phase: Option<TaskPhase>) -> bool {
    matches!(phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
}

/// The status with phase, reason and conditions for `phase`, everything else kept.
fn staged(
    task: &AgentTask,
    phase: TaskPhase,
    reason: &str,
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
        reason,
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
            reason,
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

async fn write(ctx: &Context, task: &AgentTask, mut status: AgentTaskStatus) -> Result<(), Error> {
    crate::status::fit_task_status(&mut status);
    let made = apply_status(&ctx.client, task, &status, true).await?;
    remember_write(ctx, task, &made);
    Ok(())
}

/// Notes that the task read as `task` is now at version `made`, for `is_stale`.
fn remember_write(ctx: &Context, task: &AgentTask, made: &str) {
    let read = task.resource_version().unwrap_or_default();
    // A write that changed nothing makes no new version to wait for.
    if let Some(uid) = &task.metadata.uid
        && made != read
    {
        ctx.written
            .lock()
            .expect("written statuses")
            .entry(uid.clone())
            .or_default()
            .push(read);
    }
}

/// Whether the cached copy is older than a write this process made: a pass is woken by
/// the agent's end or by a timer as well as by the watch, and a pass on a copy a write was
/// based on would do that step again. Each write is based on the version the one before
/// made (it is refused otherwise), and the cache only moves forward, so a version that
/// no write was based on is the last write's or newer.
fn is_stale(ctx: &Context, task: &AgentTask) -> bool {
    let Some(uid) = &task.metadata.uid else {
        return false;
    };
    let mut written = ctx.written.lock().expect("written statuses");
    let Some(superseded) = written.get(uid) else {
        return false;
    };
    let version = task.resource_version().unwrap_or_default();
    if superseded.contains(&version) {
        return true;
    }
    written.remove(uid);
    false
}

/// The provider could not be reached or answered with an error: wait and look again.
async fn provider_trouble(
    ctx: &Context,
    task: &AgentTask,
    message: &str,
    again: Duration,
) -> Result<Action, Error> {
    wait(ctx, task, "ProviderUnavailable", message, again).await
}

/// Writes a waiting stage unless the status already says exactly that.
async fn wait(
    ctx: &Context,
    task: &AgentTask,
    reason: &str,
    message: &str,
    again: Duration,
) -> Result<Action, Error> {
    let status = previous(task);
    if status.reason.as_deref() != Some(reason) || status.message.as_deref() != Some(message) {
        let phase = status
            .phase
            .filter(|phase| *phase != TaskPhase::Queued)
            .unwrap_or(TaskPhase::Pending);
        write(ctx, task, staged(task, phase, reason, message, |_| {})).await?;
        // One event per change of reason; a new message under the same reason is status only.
        if status.reason.as_deref() != Some(reason) {
            let type_ = match reason {
                "TemplateNotReady" => EventType::Normal,
                _ => EventType::Warning,
            };
            publish(ctx, task, type_, reason, message.to_string()).await;
        }
    }
    Ok(Action::requeue(again))
}

/// The events of an attempt's steps, each published once. kube's `Recorder` keeps every
/// event it publishes for six minutes, to count a repeat into a series, and goes through
/// all it keeps on every publish under one lock: at 50 tasks a second these would be
/// 30,000 events. They need no series, so each goes out through a recorder of its own;
/// waits, retries, failures and cleanup trouble, which can repeat, share the operator's.
const ONCE_PER_ATTEMPT: [&str; 3] = ["SandboxCreated", "Started", "Succeeded"];

async fn publish(ctx: &Context, task: &AgentTask, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: reason.into(),
        secondary: None,
    };
    let own;
    let recorder = if ONCE_PER_ATTEMPT.contains(&reason) {
        own = Recorder::new(ctx.client.clone(), Reporter::from(FIELD_MANAGER));
        &own
    } else {
        &ctx.recorder
    };
    if let Err(error) = super::publish(&ctx.client, recorder, &event, &task.object_ref(&())).await {
        tracing::warn!(%error, reason, "cannot publish event");
    }
}

/// The agent's environment from the spec, with the Secret values it used (for redaction).
/// A missing Secret or key is named in the error, its value never.
async fn resolve_env(
    ctx: &Context,
    task: &AgentTask,
) -> Result<(BTreeMap<String, String>, Vec<String>), String> {
    let namespace = task.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut cache: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut env = BTreeMap::new();
    let mut values = Vec::new();
    for source in &task.spec.env_from {
        let name = &source.secret_ref.name;
        let secret = fetch(&secrets, &mut cache, name).await?;
        match secret {
            Some(secret) => {
                for (key, value) in secret.data.unwrap_or_default() {
                    let value = String::from_utf8_lossy(&value.0).into_owned();
                    let prefix = source.prefix.clone().unwrap_or_default();
                    values.push(value.clone());
                    env.insert(format!("{prefix}{key}"), value);
                }
            }
            None if source.secret_ref.optional => {}
            None => return Err(format!("Secret {name} does not exist")),
        }
    }
    for variable in &task.spec.env {
        if let Some(value) = &variable.value {
            env.insert(variable.name.clone(), value.clone());
            continue;
        }
        let Some(source) = &variable.value_from else {
            continue;
        };
        let selector = &source.secret_key_ref;
        let secret = fetch(&secrets, &mut cache, &selector.name).await?;
        let value = secret
            .as_ref()
            .and_then(|secret| secret.data.as_ref())
            .and_then(|data| data.get(&selector.key))
            .map(|value| String::from_utf8_lossy(&value.0).into_owned());
        match value {
            Some(value) => {
                values.push(value.clone());
                env.insert(variable.name.clone(), value);
            }
            None if selector.optional => {}
            None if secret.is_none() => {
                return Err(format!("Secret {} does not exist", selector.name));
            }
            None => {
                return Err(format!(
                    "Secret {} has no key {}",
                    selector.name, selector.key
                ));
            }
        }
    }
    Ok((env, values))
}

async fn fetch(
    secrets: &Api<Secret>,
    cache: &mut BTreeMap<String, Option<Secret>>,
    name: &str,
) -> Result<Option<Secret>, String> {
    if let Some(found) = cache.get(name) {
        return Ok(found.clone());
    }
    let found = secrets
        .get_opt(name)
        .await
        .map_err(|error| format!("cannot read Secret {name}: {error}"))?;
    cache.insert(name.to_string(), found.clone());
    Ok(found)
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
        return expire(task, ctx, &status).await;
    }
    // A glob the files list cannot use would throw the run's result away at the end.
    if let Err(error) = files::exclusions(&task.spec.outputs.exclude) {
        return fail(ctx, task, "InvalidOutputs", &error.to_string(), |_| {}).await;
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
        return fail(ctx, task, "DeadlineExceeded", &message, |_| {}).await;
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
        return wait_for_template(ctx, task, template).await;
    }
    let (env, secret_values) = match resolve_env(ctx, task).await {
        Ok(resolved) => resolved,
        Err(message) => return wait(ctx, task, "MissingSecret", &message, WAIT_INTERVAL * 2).await,
    };
    let redactor = Redactor::new(secret_values);
    let provider = match &template {
        Some(template) => super::template::resolve_provider(ctx, template)
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
            return provider_trouble(ctx, task, &message, WAIT_INTERVAL * 3).await;
        }
    };
    let Some(sandbox_id) = status.sandbox_id.clone() else {
        let Some(template_status) = ready else {
            return wait_for_template(ctx, task, template).await;
        };
        let tasks = ctx.caches.tasks().await?;
        if let Some(message) = admit(ctx, task, &tasks) {
            let status = staged(task, TaskPhase::Queued, "Queued", &message, |_| {});
            let before = previous(task);
            if before.message.as_deref() != status.message.as_deref() {
                write(ctx, task, status).await?;
            }
            if before.reason.as_deref() != Some("Queued") {
                publish(ctx, task, EventType::Normal, "Queued", message).await;
            }
            return Ok(Action::requeue(FOLLOW_INTERVAL));
        }
        return provision(task, ctx, &provider, &template_status, env, &redactor).await;
    };
    let detail = match provider.get_sandbox(&sandbox_id).await {
        Ok(detail) => detail,
        Err(error) if error.is_not_found() => {
            return sandbox_lost(task, ctx, &provider).await;
        }
        Err(error) => {
            return provider_trouble(
                ctx,
                task,
                &redactor.redact(&error.to_string()),
                WAIT_INTERVAL * 3,
            )
            .await;
        }
    };
    let envd = provider.envd(&detail);
    run(task, ctx, &provider, &envd, env, &redactor).await
}

/// Waits for the task's template, saying why it is not Ready so the task alone shows what
/// to fix.
async fn wait_for_template(
    ctx: &Context,
    task: &AgentTask,
    template: Option<SandboxTemplate>,
) -> Result<Action, Error> {
    let template_name = &task.spec.template_ref.name;
    let failed = template
        .and_then(|template| template.status)
        .filter(|status| status.phase == Some(TemplatePhase::Failed))
        .and_then(|status| {
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == CONDITION_READY)
        });
    let message = match failed {
        Some(ready) => format!(
            "waiting for SandboxTemplate {template_name} to be Ready; it failed ({}): {}",
            ready.reason,
            truncate(&ready.message, 512)
        ),
        None => format!("waiting for SandboxTemplate {template_name} to be Ready"),
    };
    wait(ctx, task, "TemplateNotReady", &message, WAIT_INTERVAL).await
}

/// Gives the task a sandbox slot, or says why it must wait. Tasks with a sandbox, or
/// with a slot from this process whose sandbox the cache does not show yet, count
/// against `--max-running-tasks`; older tasks that could start go first. Counted from the
/// cache: a pass must not cost a LIST of every task.
fn admit(
    ctx: &Context,
    task: &AgentTask,
    cached: &[Arc<DeserializeGuard<AgentTask>>],
) -> Option<String> {
    let mut admitted = ctx.admitted.lock().expect("admitted tasks");
    let all: Vec<&AgentTask> = cached
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .filter(|other| other.metadata.uid != task.metadata.uid && !is_terminal(phase(other)))
        .collect();
    let key = |other: &AgentTask| {
        (
            other
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0),
            other.metadata.name.clone(),
        )
    };
    let own_key = key(task);
    let slot_taken = |other: &AgentTask| {
        other
            .metadata
            .uid
            .as_ref()
            .is_some_and(|uid| admitted.contains(uid))
    };
    let holding = |other: &&&AgentTask| {
        let recorded = other
            .status
            .as_ref()
            .is_some_and(|status| status.sandbox_id.is_some());
        recorded || slot_taken(other)
    };
    // Every older task that could start now is ahead, whether or not it has been looked at
    // yet; those waiting for their template or a Secret are not, so they hold nobody up.
    let queued_ahead = |other: &&&AgentTask| {
        let waiting_on_input = other.status.as_ref().is_some_and(|status| {
            matches!(
                status.reason.as_deref(),
                Some("MissingSecret" | "TemplateNotReady" | "ProviderUnavailable")
            )
        });
        !holding(other)
            && !waiting_on_input
            && other.metadata.deletion_timestamp.is_none()
            && key(other) < own_key
    };
    let running = all.iter().filter(holding).count();
    let ahead = all.iter().filter(queued_ahead).count();
    if running + ahead >= ctx.max_running_tasks {
        return Some(format!(
            "waiting for a sandbox slot: {running} running, {ahead} queued ahead, at most {} at once",
            ctx.max_running_tasks
        ));
    }
    if let Some(cap) = ctx.max_running_tasks_per_namespace {
        let here = |other: &&&AgentTask| other.metadata.namespace == task.metadata.namespace;
        let running = all.iter().filter(holding).filter(here).count();
        let ahead = all.iter().filter(queued_ahead).filter(here).count();
        if running + ahead >= cap {
            return Some(format!(
                "waiting for a sandbox slot in this namespace: {running} running, {ahead} queued ahead, at most {cap} at once"
            ));
        }
    }
    admitted.insert(task.metadata.uid.clone().unwrap_or_default());
    None
}

/// Gives back the task's sandbox slot: it finished, was deleted, or has no sandbox.
fn release_slot(ctx: &Context, task: &AgentTask) {
    if let Some(uid) = &task.metadata.uid {
        ctx.admitted.lock().expect("admitted tasks").remove(uid);
    }
}

/// Whether no sandbox can exist for the task, so there is none to adopt and the
/// provider need not be asked: it was created after this process started (a whole second
/// after, as creation times are in seconds) and this process never asked for one.
fn never_asked_for_a_sandbox(ctx: &Context, task: &AgentTask) -> bool {
    let created_since_start = task
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|created| created.0 >= ctx.started + jiff::SignedDuration::from_secs(1));
    let uid = task.metadata.uid.as_deref().unwrap_or_default();
    created_since_start && !ctx.creating.lock().expect("sandbox creates").contains(uid)
}

/// Forgets what this process noted about a task that ended or is gone.
fn forget(ctx: &Context, task: &AgentTask) {
    release_slot(ctx, task);
    if let Some(uid) = &task.metadata.uid {
        ctx.creating.lock().expect("sandbox creates").remove(uid);
    }
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

/// Creates the sandbox and starts the agent in it, or adopts the sandbox an earlier pass
/// created before it could record it: never two live sandboxes for one task.
async fn provision(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    template: &sandcastle_api::SandboxTemplateStatus,
    env: BTreeMap<String, String>,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let query = ListQuery {
        metadata: BTreeMap::from([(TASK_UID.to_string(), uid.clone())]),
        ..ListQuery::default()
    };
    let existing = if never_asked_for_a_sandbox(ctx, task) {
        None
    } else {
        match provider.list_sandboxes(&query).await {
            Ok(found) => found.into_iter().next().map(|sandbox| sandbox.sandbox_id),
            Err(error) => {
                release_slot(ctx, task);
                return provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL * 3).await;
            }
        }
    };
    // An adopted sandbox was created for the attempt after the recorded ones, by a pass
    // that could not record it.
    let attempts = previous(task).attempts.unwrap_or(0) + 1;
    let record = |sandbox_id: &str| {
        let sandbox_id = sandbox_id.to_string();
        move |status: &mut AgentTaskStatus| {
            status.sandbox_id = Some(sandbox_id);
            status.template_id = template.template_id.clone();
            status.build_id = template.build_id.clone();
            status.attempts = Some(attempts);
            if status.start_time.is_none() {
                status.start_time = Some(now());
            }
        }
    };
    if let Some(sandbox_id) = existing {
        let task = match finalized(ctx, task).await {
            Ok(task) => task,
            // The next pass adopts it again.
            Err(Error::Stale) => return Err(Error::Stale),
            Err(error) => {
                let _ = provider.kill_sandbox(&sandbox_id).await;
                release_slot(ctx, task);
                return finalizer_trouble(ctx, task, error).await;
            }
        };
        // What the sandbox holds is unknown: the next pass looks before it starts anything.
        return provisioning(ctx, &task, &sandbox_id, record(&sandbox_id)).await;
    }
    // A refused finalizer must not cost a sandbox per pass: once refused, it goes first.
    let task = if was_refused(task) {
        match finalized(ctx, task).await {
            Ok(task) => task,
            Err(error) => {
                release_slot(ctx, task);
                return finalizer_trouble(ctx, task, error).await;
            }
        }
    } else {
        std::borrow::Cow::Borrowed(task)
    };
    let task = task.as_ref();
    let remaining = deadline(task)
        .map(|deadline| (deadline - jiff::Timestamp::now()).get_seconds().max(1) as u64)
        .unwrap_or(task.spec.active_deadline_seconds as u64);
    let mut spec = SandboxSpec::new(
        template.template_id.clone().unwrap_or_default(),
        Duration::from_secs(remaining) + SANDBOX_GRACE,
    );
    spec.metadata = BTreeMap::from([
        (TASK_UID.to_string(), uid.clone()),
        (
            TASK_NAMESPACE.to_string(),
            task.namespace().unwrap_or_default(),
        ),
        (TASK_NAME.to_string(), task.name_any()),
        (OPERATOR.to_string(), ctx.instance.clone()),
    ]);
    // Before the call: a create that fails may still have made the sandbox.
    ctx.creating
        .lock()
        .expect("sandbox creates")
        .insert(uid.clone());
    let asked = std::time::Instant::now();
    let (created, with_finalizer) = tokio::join!(
        async {
            let created = provider.create_sandbox(&spec).await;
            if created.is_ok() {
                ctx.metrics.sandbox_created(asked.elapsed());
            }
            created
        },
        finalized(ctx, task)
    );
    let task = match with_finalizer {
        Ok(task) => task,
        Err(error) => {
            // Without its finalizer the task could go with its sandbox left behind. A
            // create that failed but made one anyway is the orphan sweep's.
            if let Ok(sandbox) = &created {
                let _ = provider.kill_sandbox(&sandbox.sandbox_id).await;
            }
            release_slot(ctx, task);
            return finalizer_trouble(ctx, task, error).await;
        }
    };
    let task = task.as_ref();
    let sandbox = match created {
        Ok(sandbox) => sandbox,
        Err(error) if matches!(error, ProviderError::RateLimited { .. }) => {
            release_slot(ctx, task);
            let again = error.retry_after().unwrap_or(WAIT_INTERVAL * 3);
            return wait(ctx, task, "ProviderBusy", &error.to_string(), again).await;
        }
        // Waiting cannot fix a refused key or request: fail now instead of at the
        // deadline. (A template missing on the provider is rebuilt by the template
        // controller, so NotFound keeps waiting below.)
        Err(
            error @ (ProviderError::Unauthorized { .. }
            | ProviderError::Forbidden { .. }
            | ProviderError::InvalidRequest { .. }),
        ) => {
            let message = format!("the provider refused to create the sandbox: {error}");
            return fail(ctx, task, "ProviderRejected", &message, |_| {}).await;
        }
        Err(error) => {
            release_slot(ctx, task);
            return provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL * 3).await;
        }
    };
    let sandbox_id = sandbox.sandbox_id.clone();
    // A new sandbox holds nothing yet, so the agent starts in this pass and one status
    // write records both. Should the start not go through, the sandbox is recorded and
    // the next pass looks into it the careful way, as for one it adopted.
    match launch(task, ctx, &provider.envd(&sandbox), env, redactor).await {
        Ok(process) => {
            let note = format!("the agent started in sandbox {sandbox_id}");
            running(ctx, task, process, record(&sandbox_id), note).await
        }
        Err(Launch::Invalid { reason, message }) => {
            let action = fail(ctx, task, reason, &message, record(&sandbox_id)).await?;
            let _ = provider.kill_sandbox(&sandbox_id).await;
            Ok(action)
        }
        Err(Launch::Provider(_) | Launch::Kube(_)) => {
            provisioning(ctx, task, &sandbox_id, record(&sandbox_id)).await
        }
    }
}

/// The task with the finalizer on, written now if it was not.
async fn finalized<'a>(
    ctx: &Context,
    task: &'a AgentTask,
) -> Result<std::borrow::Cow<'a, AgentTask>, Error> {
    if task.finalizers().iter().any(|name| name == FINALIZER) {
        return Ok(std::borrow::Cow::Borrowed(task));
    }
    let api: Api<AgentTask> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    Ok(std::borrow::Cow::Owned(
        add_finalizer(ctx, &api, task).await?,
    ))
}

/// Records a sandbox the agent has not been started in (as far as this pass knows) and
/// looks into it again shortly.
async fn provisioning(
    ctx: &Context,
    task: &AgentTask,
    sandbox_id: &str,
    record: impl FnOnce(&mut AgentTaskStatus),
) -> Result<Action, Error> {
    let message = format!("sandbox {sandbox_id} is being prepared");
    let status = staged(
        task,
        TaskPhase::Provisioning,
        "Provisioning",
        &message,
        record,
    );
    write(ctx, task, status).await?;
    publish(ctx, task, EventType::Normal, "SandboxCreated", message).await;
    Ok(Action::requeue(Duration::from_millis(100)))
}

fn run_file(name: &str) -> String {
    format!("{RUN_DIR}/{name}")
}

/// One step with a live sandbox: follow the agent, finish from the recorder's files, or
/// start it. The agent is looked for before its exit file: the recorder writes that file
/// before it exits, so an agent not running with no exit file was killed, whereas the
/// other order could miss an exit that landed between the two reads. Any answer that is
/// not a clear one is waited out, never read as "not running" or "not started".
async fn run(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    env: BTreeMap<String, String>,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let running = match envd.list_processes().await {
        Ok(processes) => processes
            .iter()
            .any(|process| process.tag.as_deref() == Some(AGENT_TAG)),
        Err(error) => return envd_trouble(task, ctx, provider, &error, redactor).await,
    };
    if running {
        return follow(task, ctx, envd).await;
    }
    match envd.read_file(&run_file("exit")).await {
        Ok(exit) => {
            // Empty when the recorder was killed as it wrote: no exit was recorded.
            if let Some(code) = invocation::parse_exit(&String::from_utf8_lossy(&exit)) {
                return finish(task, ctx, provider, envd, code, redactor).await;
            }
        }
        Err(error) if error.is_not_found() => {}
        Err(error) => return envd_trouble(task, ctx, provider, &error, redactor).await,
    }
    match envd.exists(&run_file(STARTED_MARKER)).await {
        // Started, gone, and no exit recorded: the agent was killed from outside.
        Ok(true) => {
            retry(
                task,
                ctx,
                provider,
                "AgentLost",
                "the agent process ended without a recorded exit",
            )
            .await
        }
        Ok(false) => start(task, ctx, provider, envd, env, redactor).await,
        Err(error) => envd_trouble(task, ctx, provider, &error, redactor).await,
    }
}

/// An envd call failed: the sandbox is gone, or the provider is in trouble for now.
async fn envd_trouble(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    error: &ProviderError,
    redactor: &Redactor,
) -> Result<Action, Error> {
    if error.is_sandbox_gone() {
        return sandbox_lost(task, ctx, provider).await;
    }
    provider_trouble(
        ctx,
        task,
        &redactor.redact(&error.to_string()),
        WAIT_INTERVAL,
    )
    .await
}

fn workspace(task: &AgentTask) -> String {
    task.spec.workspace.path.trim_end_matches('/').to_string()
}

/// Prepares the workspace and starts the agent under the recorder. Safe to repeat until
/// the recorder's start marker exists: nothing here runs the agent twice.
async fn start(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    env: BTreeMap<String, String>,
    redactor: &Redactor,
) -> Result<Action, Error> {
    match launch(task, ctx, envd, env, redactor).await {
        Ok(process) => running(ctx, task, process, |_| {}, "the agent started".into()).await,
        Err(Launch::Invalid { reason, message }) => {
            fail_and_kill(ctx, task, reason, &message).await
        }
        Err(Launch::Provider(error)) => envd_trouble(task, ctx, provider, &error, redactor).await,
        Err(Launch::Kube(error)) => Err(Error::Kube(error)),
    }
}

/// Follows the agent just started to its end, and records that it runs (with what
/// `change` adds) and the `Started` event saying `note`.
async fn running(
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
        "Running",
        "the agent is running",
        change,
    );
    write(ctx, task, status).await?;
    publish(ctx, task, EventType::Normal, "Started", note).await;
    Ok(Action::requeue(FOLLOW_INTERVAL))
}

/// Why the agent was not started.
enum Launch {
    /// The spec asks for what cannot be done, in this sandbox or any other.
    Invalid {
        reason: &'static str,
        message: String,
    },
    /// The sandbox did not answer as it should; the agent may or may not have started.
    Provider(ProviderError),
    /// A ConfigMap the workspace copies could not be read.
    Kube(kube::Error),
}

/// Lays out the workspace and starts the agent under the recorder. The returned stream
/// only says when the process ends: its outcome is read from the recorder's files.
async fn launch(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    env: BTreeMap<String, String>,
    redactor: &Redactor,
) -> Result<ProcessStream, Launch> {
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
                            reason: "InvalidWorkspace",
                            message,
                        });
                    }
                }
            }
            (None, None) => Vec::new(),
        };
        files.push((format!("{workspace}/{}", file.path), content));
    }
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
                reason: "InvalidWorkspace",
                message,
            });
        }
        Err(error) => return Err(Launch::Provider(error)),
        Ok(()) => {}
    }
    let agent = agent_invocation(task, ctx);
    let mut invocation = invocation::recorded(agent, RUN_DIR);
    invocation.env.extend(env);
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
    envd.start(&spec).await.map_err(|error| match error {
        // The process cannot be started as specified (an argument list over the kernel's
        // limit, say); a new sandbox would get the same answer.
        ProviderError::Envd(error) if error.code == sandcastle_e2b::envd::Code::InvalidArgument => {
            Launch::Invalid {
                reason: "AgentFailed",
                message: format!(
                    "cannot start the agent: {}",
                    redactor.redact(&error.message)
                ),
            }
        }
        error => Launch::Provider(error),
    })
}

fn agent_invocation(task: &AgentTask, ctx: &Context) -> Invocation {
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

fn is_claude(task: &AgentTask) -> bool {
    task.spec
        .agent
        .as_ref()
        .and_then(|agent| agent.command.as_ref())
        .is_none()
}

/// Wakes the task's reconcile the moment its agent ends, so a finished agent is read at
/// once and a running one needs no frequent look. A broken stream wakes it too, after a
/// pause, to look again and follow anew.
fn follow_to_end(ctx: &Context, task: &AgentTask, mut process: ProcessStream) {
    let (Some(uid), Some(namespace)) = (task.metadata.uid.clone(), task.namespace()) else {
        return;
    };
    let Some(wake) = ctx.caches.waker(&namespace) else {
        return;
    };
    if !ctx
        .followed
        .lock()
        .expect("followed agents")
        .insert(uid.clone())
    {
        return;
    }
    let followed = ctx.followed.clone();
    let key = ObjectRef::new(&task.name_any()).within(&namespace);
    tokio::spawn(async move {
        let ended = loop {
            match process.next_update().await {
                Ok(Some(ProcessUpdate::End(_)) | None) => break true,
                Ok(Some(_)) => {}
                Err(_) => break false,
            }
        };
        followed.lock().expect("followed agents").remove(&uid);
        if !ended {
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
        let _ = wake.unbounded_send(key);
    });
}

/// Progress from the transcript so far, written at most every few seconds.
async fn follow(task: &AgentTask, ctx: &Context, envd: &EnvdClient) -> Result<Action, Error> {
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let followed = || ctx.followed.lock().expect("followed agents").contains(&uid);
    // After a restart, or a broken stream: an agent that already ended is found by the
    // next look.
    if !followed()
        && let Ok(process) = envd.connect(ProcessSelector::Tag(AGENT_TAG.into())).await
    {
        follow_to_end(ctx, task, process);
    }
    let status = previous(task);
    // Also after a passing trouble, so the status does not go on naming it.
    if status.phase != Some(TaskPhase::Running) || status.reason.as_deref() != Some("Running") {
        write(
            ctx,
            task,
            staged(
                task,
                TaskPhase::Running,
                "Running",
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
        return Ok(Action::requeue(again));
    }
    let due = status
        .progress
        .as_ref()
        .and_then(|progress| progress.updated_at.as_ref())
        .is_none_or(|at| (jiff::Timestamp::now() - at.0).get_seconds() >= PROGRESS_INTERVAL);
    if due && let Ok(transcript) = envd.read_file(&run_file("stdout")).await {
        let mut parser = StreamParser::new();
        parser.feed(&transcript);
        let seen = parser.progress();
        let turns = i64::from(seen.turns);
        let changed = status
            .progress
            .as_ref()
            .is_none_or(|progress| progress.turns != turns || progress.last_tool != seen.last_tool);
        if changed {
            let mut status = status;
            status.progress = Some(Progress {
                turns,
                last_tool: seen.last_tool.clone(),
                updated_at: Some(now()),
            });
            write(ctx, task, status).await?;
        }
    }
    Ok(Action::requeue(FOLLOW_INTERVAL))
}

fn listing_json(listing: &Listing) -> BTreeMap<String, (i64, Option<String>)> {
    listing
        .iter()
        .map(|(path, listed)| (path.clone(), (listed.size, listed.modified.clone())))
        .collect()
}

fn listing_from_json(bytes: &[u8]) -> Listing {
    serde_json::from_slice::<BTreeMap<String, (i64, Option<String>)>>(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(|(path, (size, modified))| (path, Listed { size, modified }))
        .collect()
}

/// One of the recorder's files; one it never wrote reads as empty.
async fn read_recorded(envd: &EnvdClient, name: &str) -> Result<bytes::Bytes, ProviderError> {
    match envd.read_file(&run_file(name)).await {
        Err(error) if error.is_not_found() => Ok(bytes::Bytes::new()),
        read => read,
    }
}

/// The regular files under the workspace, by path relative to it.
async fn listing(envd: &EnvdClient, workspace: &str) -> Result<Listing, ProviderError> {
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
async fn finish(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    envd: &EnvdClient,
    exit_code: i32,
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
        Err(error) => return envd_trouble(task, ctx, provider, &error, redactor).await,
    };
    let outputs = &task.spec.outputs;
    let changes = match files::exclusions(&outputs.exclude) {
        Ok(exclude) => files::changes(&before, &after, &exclude, outputs.max_files.max(0) as usize),
        Err(error) => return fail(ctx, task, "InvalidOutputs", &error.to_string(), |_| {}).await,
    };
    let mut result = TaskResult {
        exit_code: Some(exit_code),
        ..TaskResult::default()
    };
    let mut usage = None;
    let verdict = if is_claude(task) {
        let mut parser = StreamParser::new();
        parser.feed(&stdout);
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
            usage = Some(Usage {
                input_tokens: outcome.usage.input_tokens as i64,
                output_tokens: outcome.usage.output_tokens as i64,
                cache_creation_input_tokens: outcome.usage.cache_creation_input_tokens as i64,
                cache_read_input_tokens: outcome.usage.cache_read_input_tokens as i64,
                cost_usd: outcome.total_cost_usd.clone(),
            });
        }
        parser.verdict()
    } else {
        let text = String::from_utf8_lossy(&stdout);
        let text = redactor.redact(&text);
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
                // Redacted before it is cut, so no part of a secret is left at the cut.
                message: format!(
                    "the command exited with code {code}: {}",
                    truncate(
                        redactor.redact(&String::from_utf8_lossy(&stderr)).trim(),
                        512
                    )
                ),
            },
        }
    };
    let failure = match verdict {
        Verdict::Succeeded => None,
        Verdict::Failed { reason, message } => {
            let reason = match reason {
                FailureReason::MaxTurns => "MaxTurns",
                FailureReason::ApiError { .. } => "AgentApiError",
                FailureReason::AgentError => "AgentFailed",
            };
            Some((reason, redactor.redact(&message)))
        }
        // An exit code before any output line: the CLI refused its invocation (not
        // installed, root refusing bypass mode, a bad extra argument), and a new sandbox
        // would get the same answer.
        Verdict::Incomplete if exit_code != 0 && stdout.iter().all(u8::is_ascii_whitespace) => {
            let detail = redactor.redact(&String::from_utf8_lossy(&stderr));
            let message = format!(
                "the agent exited with code {} before any output: {}",
                exit_code,
                truncate(detail.trim(), 512)
            );
            Some(("AgentFailed", message))
        }
        Verdict::Incomplete => {
            let detail = redactor.redact(&String::from_utf8_lossy(&stderr));
            let message = format!(
                "the agent ended without a result: {}",
                truncate(detail.trim(), 512)
            );
            return retry(task, ctx, provider, "AgentIncomplete", &message).await;
        }
    };
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
        status.files_truncated = changes.truncated;
        status.completion_time = Some(now());
    };
    match failure {
        None => {
            let status = staged(
                task,
                TaskPhase::Succeeded,
                "Succeeded",
                "the agent finished",
                record,
            );
            write(ctx, task, status.clone()).await?;
            forget(ctx, task);
            count_finished(ctx, &status);
            let _ = kill_sandboxes(ctx, task, sandbox.as_deref()).await;
            publish(
                ctx,
                task,
                EventType::Normal,
                "Succeeded",
                "the agent finished".into(),
            )
            .await;
            Ok(Action::await_change())
        }
        Some((reason, message)) => {
            let action = fail(ctx, task, reason, &message, record).await?;
            let _ = kill_sandboxes(ctx, task, sandbox.as_deref()).await;
            Ok(action)
        }
    }
}

/// The name of the ConfigMap that keeps a task's transcript: `<task>-transcript`, or, for
/// a name too long to take the suffix (an object name has at most 253 characters), the
/// name's start, a hash of the whole name and the suffix.
pub fn transcript_name(task: &AgentTask) -> String {
    const SUFFIX: &str = "-transcript";
    let name = task.name_any();
    if name.len() + SUFFIX.len() <= 253 {
        return format!("{name}{SUFFIX}");
    }
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(name.as_bytes())[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    // Task names are ASCII, so any byte index is a character boundary.
    let start = name[..253 - SUFFIX.len() - hash.len() - 1].trim_end_matches(['-', '.']);
    format!("{start}-{hash}{SUFFIX}")
}

/// Keeps the agent's redacted output in a ConfigMap the task owns, so it is deleted with
/// the task: `stdout` (for Claude Code, the stream-json transcript) and `stderr`.
async fn save_transcript(
    ctx: &Context,
    task: &AgentTask,
    redactor: &Redactor,
    stdout: &[u8],
    stderr: &[u8],
) -> Result<(), Error> {
    let keep = |bytes: &[u8], limit: usize| {
        transcript::cap(&redactor.redact(&String::from_utf8_lossy(bytes)), limit)
    };
    let owner = task
        .controller_owner_ref(&())
        .expect("a stored task has a UID");
    let config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": transcript_name(task),
            "ownerReferences": [owner],
            // A label value holds at most 63 characters, a task name 253.
            "labels": if task.name_any().len() <= 63 {
                serde_json::json!({TRANSCRIPT_LABEL: "true", TRANSCRIPT_TASK_LABEL: task.name_any()})
            } else {
                serde_json::json!({TRANSCRIPT_LABEL: "true"})
            },
        },
        "data": {
            "stdout": keep(stdout, transcript::TRANSCRIPT_LIMIT),
            "stderr": keep(stderr, transcript::TRANSCRIPT_LIMIT / 4),
        },
    });
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    api.patch(
        &transcript_name(task),
        &kube::api::PatchParams::apply(super::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&config_map),
    )
    .await?;
    Ok(())
}

async fn fail(
    ctx: &Context,
    task: &AgentTask,
    reason: &str,
    message: &str,
    change: impl FnOnce(&mut AgentTaskStatus),
) -> Result<Action, Error> {
    let status = staged(task, TaskPhase::Failed, reason, message, |status| {
        if status.completion_time.is_none() {
            status.completion_time = Some(now());
        }
        change(status);
    });
    write(ctx, task, status.clone()).await?;
    forget(ctx, task);
    count_finished(ctx, &status);
    publish(ctx, task, EventType::Warning, reason, message.to_string()).await;
    Ok(Action::await_change())
}

/// Fails a task that holds a sandbox: the verdict first, so a crash between the two
/// never loses it; a kill that fails here is the orphan sweep's to repeat.
async fn fail_and_kill(
    ctx: &Context,
    task: &AgentTask,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    let action = fail(ctx, task, reason, message, |_| {}).await?;
    let _ = kill_sandboxes(ctx, task, previous(task).sandbox_id.as_deref()).await;
    Ok(action)
}

/// Records a task that just reached Succeeded or Failed in the metrics.
fn count_finished(ctx: &Context, status: &AgentTaskStatus) {
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
async fn retry(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    let status = previous(task);
    // The next attempt adopts any live sandbox of the task's, so the old one must be
    // gone first, or it would be taken for the new one.
    if let Some(id) = &status.sandbox_id
        && let Err(error) = provider.kill_sandbox(id).await
        && !error.is_not_found()
    {
        return provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL).await;
    }
    let attempts = status.attempts.unwrap_or(1);
    if attempts > task.spec.backoff_limit {
        let message = format!("{message} (after {attempts} attempts)");
        return fail(ctx, task, reason, &message, |status| {
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
    write(ctx, task, status).await?;
    release_slot(ctx, task);
    publish(ctx, task, EventType::Warning, reason, message.to_string()).await;
    let backoff = Duration::from_secs(2u64.saturating_pow(attempts.clamp(0, 6) as u32));
    Ok(Action::requeue(backoff))
}

async fn sandbox_lost(
    task: &AgentTask,
    ctx: &Context,
    provider: &E2bClient,
) -> Result<Action, Error> {
    retry(
        task,
        ctx,
        provider,
        "SandboxLost",
        "the sandbox disappeared",
    )
    .await
}

/// Kills the task's sandbox, by ID and by its metadata (one created but not yet recorded).
/// Fails when the provider could not be asked or refused; with no provider to ask there
/// is nothing to kill.
async fn kill_sandboxes(
    ctx: &Context,
    task: &AgentTask,
    recorded: Option<&str>,
) -> Result<(), ProviderError> {
    let provider = match template_of(ctx, task).await {
        Some(template) => super::template::resolve_provider(ctx, &template)
            .await
            .ok()
            .or_else(|| ctx.default_provider.clone()),
        None => ctx.default_provider.clone(),
    };
    let Some(provider) = provider else {
        return Ok(());
    };
    if let Some(id) = recorded {
        provider.kill_sandbox(id).await?;
    }
    let query = ListQuery {
        metadata: BTreeMap::from([(
            TASK_UID.to_string(),
            task.metadata.uid.clone().unwrap_or_default(),
        )]),
        ..ListQuery::default()
    };
    for sandbox in provider.list_sandboxes(&query).await? {
        provider.kill_sandbox(&sandbox.sandbox_id).await?;
    }
    Ok(())
}

async fn template_of(ctx: &Context, task: &AgentTask) -> Option<SandboxTemplate> {
    let namespace = task.namespace().unwrap_or_default();
    ctx.caches
        .template(&namespace, &task.spec.template_ref.name)
        .await
        .ok()
        .flatten()
}

/// Deletes a finished task once its `ttlSecondsAfterFinished` has passed.
async fn expire(
    task: &AgentTask,
    ctx: &Context,
    status: &AgentTaskStatus,
) -> Result<Action, Error> {
    let (Some(ttl), Some(done)) = (
        task.spec.ttl_seconds_after_finished,
        &status.completion_time,
    ) else {
        return Ok(Action::await_change());
    };
    let expires = done
        .0
        .checked_add(jiff::SignedDuration::from_secs(ttl))
        .unwrap_or(done.0);
    let left = expires - jiff::Timestamp::now();
    if left.get_seconds() > 0 {
        return Ok(Action::requeue(Duration::from_secs(
            left.get_seconds() as u64
        )));
    }
    let api: Api<AgentTask> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    api.delete(&task.name_any(), &DeleteParams::default())
        .await?;
    Ok(Action::await_change())
}

/// A deleted task takes its sandbox with it: the finalizer stays until the provider has
/// confirmed the kill, so a provider outage delays the deletion rather than leaking the
/// sandbox.
async fn cleanup(task: &AgentTask, ctx: &Context) -> Result<Action, Error> {
    forget(ctx, task);
    if let Some(uid) = &task.metadata.uid {
        ctx.written.lock().expect("written statuses").remove(uid);
    }
    if let Err(error) = kill_sandboxes(ctx, task, previous(task).sandbox_id.as_deref()).await {
        let message = format!("cannot kill the task's sandbox yet: {error}");
        publish(
            ctx,
            task,
            EventType::Warning,
            "CleanupBlocked",
            message.clone(),
        )
        .await;
        return Err(Error::CleanupBlocked(message));
    }
    Ok(Action::await_change())
}

/// Kills the default provider's sandboxes that this operator made for tasks that no
/// longer exist (deleted while the operator was down, or a create whose task is gone) or
/// that have finished (a crash between the verdict and the kill).
pub async fn sweep_orphans(ctx: &Context) {
    let query = ListQuery {
        metadata: BTreeMap::from([(OPERATOR.to_string(), ctx.instance.clone())]),
        ..ListQuery::default()
    };
    let Some(provider) = &ctx.default_provider else {
        return;
    };
    let Ok(sandboxes) = provider.list_sandboxes(&query).await else {
        return;
    };
    for sandbox in sandboxes {
        let metadata = sandbox.metadata.clone().unwrap_or_default();
        let (Some(namespace), Some(name), Some(uid)) = (
            metadata.get(TASK_NAMESPACE),
            metadata.get(TASK_NAME),
            metadata.get(TASK_UID),
        ) else {
            continue;
        };
        if !ctx.scope.covers(namespace) {
            continue;
        }
        let tasks: Api<AgentTask> = Api::namespaced(ctx.client.clone(), namespace);
        let owner = match tasks.get_opt(name).await {
            Ok(found) => found,
            Err(_) => continue,
        };
        let owned = owner.filter(|task| task.metadata.uid.as_deref() == Some(uid.as_str()));
        let finished = owned
            .as_ref()
            .is_some_and(|task| is_terminal(task.status.as_ref().and_then(|s| s.phase)));
        if owned.is_none() || finished {
            tracing::info!(sandbox = %sandbox.sandbox_id, %namespace, %name, finished, "killing an orphaned sandbox");
            let _ = provider.kill_sandbox(&sandbox.sandbox_id).await;
        }
    }
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
        let status = staged(&task(), TaskPhase::Running, "Running", "busy", |_| {});
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
        let done = staged(&task(), TaskPhase::Succeeded, "Succeeded", "ok", |_| {});
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
            "MaxTurns",
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
        let status = staged(&task(), TaskPhase::Pending, "Waiting", &long, |_| {});
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
