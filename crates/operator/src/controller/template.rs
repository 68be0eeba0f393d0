//! The `SandboxTemplate` reconciler: fetch the spec and what it references, compute the
//! build plan and status with `crate::template_build`, talk to the provider, write status.
//! Builds are followed by requeueing, never by blocking a worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::{Context, Error, apply_status, now};
use crate::template_build::{self, ConfigMapData, PlanError};
use crate::text::truncate;
use sandcastle_api::TemplateReason;
use sandcastle_api::names::TEMPLATE_FINALIZER;
use sandcastle_api::{DeletionPolicy, SandboxTemplate, SandboxTemplateStatus, TemplatePhase};
use sandcastle_e2b::client::{AliasLookup, ClientConfig, E2bClient};
use sandcastle_e2b::error::Error as ProviderError;
use sandcastle_e2b::models::BuildStatus;

/// How often a running build is looked at.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// How long a template waits for a free build slot before it asks again.
const QUEUE_INTERVAL: Duration = Duration::from_secs(10);
/// Back-off while the provider is unreachable or busy.
const UNAVAILABLE_INTERVAL: Duration = Duration::from_secs(15);

/// Which provider the spec names, as part of the spec hash: the same spec on another
/// provider is another build. Needs no credentials, so an unchanged template is settled
/// without reading its Secret.
fn provider_identity(template: &SandboxTemplate) -> String {
    match template
        .spec
        .provider
        .as_ref()
        .and_then(|provider| provider.e2b.as_ref())
    {
        Some(e2b) => format!("e2b:{}", e2b.api_url),
        None => "embedded".into(),
    }
}

/// A reason the reconcile stops short, recorded in status rather than retried blindly.
pub(super) struct Blocked {
    reason: TemplateReason,
    pub(super) message: String,
}

impl Blocked {
    fn new(reason: TemplateReason, message: impl Into<String>) -> Self {
        Blocked {
            reason,
            message: message.into(),
        }
    }

    /// The status a provider error leaves, and when to look again.
    fn from_provider(error: &ProviderError) -> (Self, Option<Duration>) {
        match error {
            ProviderError::Unauthorized { .. } => (
                Blocked::new(
                    TemplateReason::Unauthorized,
                    format!("the provider refused the API key: {error}"),
                ),
                None,
            ),
            ProviderError::RateLimited { retry_after, .. } => (
                Blocked::new(TemplateReason::ProviderUnavailable, error.to_string()),
                Some(retry_after.unwrap_or(UNAVAILABLE_INTERVAL)),
            ),
            // The provider refused what was asked (a name it does not accept, say): asking
            // again will not help until the spec changes.
            _ if !error.is_retryable() && !error.is_infrastructure() => (
                Blocked::new(
                    TemplateReason::BuildFailed,
                    format!("the provider refused the request: {error}"),
                ),
                None,
            ),
            _ => (
                Blocked::new(TemplateReason::ProviderUnavailable, error.to_string()),
                Some(UNAVAILABLE_INTERVAL),
            ),
        }
    }
}

pub async fn reconcile(template: Arc<SandboxTemplate>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = template.namespace().unwrap_or_default();
    let api: Api<SandboxTemplate> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, TEMPLATE_FINALIZER, template, |event| async {
        match event {
            Finalizer::Apply(template) => apply(&template, &ctx).await,
            Finalizer::Cleanup(template) => cleanup(&template, &ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

async fn write_status(
    ctx: &Context,
    template: &SandboxTemplate,
    mut status: SandboxTemplateStatus,
) -> Result<(), Error> {
    // The pool's loop owns its part under a field manager of its own: applied from here,
    // a copy read earlier would undo its newer writes.
    status.pool = None;
    status
        .conditions
        .retain(|condition| condition.type_ != sandcastle_api::CONDITION_POOL_READY);
    apply_status(&ctx.client, template, &status, false)
        .await
        .map(drop)
}

fn previous(template: &SandboxTemplate) -> SandboxTemplateStatus {
    template.status.clone().unwrap_or_default()
}

/// Records a stage; the status keeps IDs and log tail from before unless `change` edits them.
async fn write_stage(
    ctx: &Context,
    template: &SandboxTemplate,
    phase: TemplatePhase,
    reason: TemplateReason,
    message: &str,
    change: impl FnOnce(&mut SandboxTemplateStatus),
) -> Result<(), Error> {
    let mut status = template_build::status(
        &previous(template),
        template.metadata.generation,
        phase,
        reason,
        message,
        &now(),
    );
    change(&mut status);
    write_status(ctx, template, status).await
}

async fn write_blocked(
    ctx: &Context,
    template: &SandboxTemplate,
    blocked: &Blocked,
) -> Result<(), Error> {
    let status = previous(template);
    let unchanged = status.message.as_deref() == Some(blocked.message.as_str())
        && status.observed_generation == template.metadata.generation
        && ready_reason(&status) == Some(blocked.reason.as_str());
    if unchanged {
        return Ok(());
    }
    let phase = match blocked.reason {
        TemplateReason::DeletionBlocked => status.phase.unwrap_or(TemplatePhase::Pending),
        _ => TemplatePhase::Pending,
    };
    write_stage(
        ctx,
        template,
        phase,
        blocked.reason,
        &blocked.message,
        |_| {},
    )
    .await?;
    // One event per change of reason; a new message under the same reason (a retry's
    // error text) is status only.
    if ready_reason(&status) != Some(blocked.reason.as_str()) {
        publish_event(
            ctx,
            template,
            EventType::Warning,
            blocked.reason,
            blocked.message.clone(),
        )
        .await;
    }
    Ok(())
}

fn ready_reason(status: &SandboxTemplateStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|condition| condition.type_ == sandcastle_api::CONDITION_READY)
        .map(|condition| condition.reason.as_str())
}

async fn publish_event(
    ctx: &Context,
    template: &SandboxTemplate,
    type_: EventType,
    reason: TemplateReason,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.as_str().into(),
        note: Some(truncate(&note, 1000)),
        action: reason.as_str().into(),
        secondary: None,
    };
    if let Err(error) = super::publish_event(
        &ctx.client,
        &ctx.recorder,
        &event,
        &template.object_ref(&()),
    )
    .await
    {
        tracing::warn!(%error, %reason, "cannot publish event");
    }
}

/// The template's provider: the spec's E2B account (its API key from a Secret), else the
/// operator's default provider.
pub(super) async fn resolve_provider(
    ctx: &Context,
    template: &SandboxTemplate,
) -> Result<E2bClient, Blocked> {
    let e2b = template
        .spec
        .provider
        .as_ref()
        .and_then(|provider| provider.e2b.as_ref());
    let Some(e2b) = e2b else {
        let asks_embedded = template
            .spec
            .provider
            .as_ref()
            .is_some_and(|provider| provider.embedded.is_some());
        let (chosen, missing) = if asks_embedded {
            (
                &ctx.embedded,
                "the template asks for the embedded provider, which this operator does not \
                 run: start it with --provider embedded, or name an e2b provider",
            )
        } else {
            (
                &ctx.default_provider,
                "the template names no provider and the operator has no default one: set \
                 spec.provider.e2b, or give the operator an E2B API key (E2B_API_KEY)",
            )
        };
        return chosen.clone().ok_or_else(|| {
            Blocked::new(TemplateReason::ProviderNotConfigured, missing.to_string())
        });
    };
    let namespace = template.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let reference = &e2b.api_key_secret_ref;
    let secret = secrets.get_opt(&reference.name).await.map_err(|error| {
        Blocked::new(
            TemplateReason::ProviderUnavailable,
            format!("cannot read Secret {}: {error}", reference.name),
        )
    })?;
    let Some(secret) = secret else {
        return Err(Blocked::new(
            TemplateReason::MissingCredentials,
            format!(
                "Secret {} with the provider's API key does not exist",
                reference.name
            ),
        ));
    };
    let key = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .map(|value| String::from_utf8_lossy(&value.0).trim().to_string())
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            Blocked::new(
                TemplateReason::MissingCredentials,
                format!("Secret {} has no key {}", reference.name, reference.key),
            )
        })?;
    let mut config = ClientConfig::for_domain(&e2b.domain, key);
    config.api_url = e2b.api_url.clone();
    config.observer = Some(ctx.metrics.request_observer());
    if let Some(pattern) = &e2b.sandbox_url {
        config.sandbox_url = pattern.clone();
    }
    let client = E2bClient::new(config)
        .map_err(|error| Blocked::new(TemplateReason::ProviderUnavailable, error.to_string()))?;
    Ok(client)
}

async fn config_maps(
    ctx: &Context,
    template: &SandboxTemplate,
    names: &[String],
) -> Result<ConfigMapData, Blocked> {
    let namespace = template.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut found = ConfigMapData::new();
    for name in names {
        let config_map = api.get_opt(name).await.map_err(|error| {
            Blocked::new(
                TemplateReason::ProviderUnavailable,
                format!("cannot read ConfigMap {name}: {error}"),
            )
        })?;
        let Some(config_map) = config_map else {
            return Err(Blocked::new(
                TemplateReason::MissingConfigMap,
                format!("ConfigMap {name} does not exist"),
            ));
        };
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (key, value) in config_map.data.unwrap_or_default() {
            files.insert(key, value.into_bytes());
        }
        for (key, value) in config_map.binary_data.unwrap_or_default() {
            files.insert(key, value.0);
        }
        if files.is_empty() {
            return Err(Blocked::new(
                TemplateReason::MissingConfigMap,
                format!("ConfigMap {name} has no data to copy"),
            ));
        }
        found.insert(name.clone(), files);
    }
    Ok(found)
}

async fn apply(template: &SandboxTemplate, ctx: &Context) -> Result<Action, Error> {
    let outcome = if template.spec.existing.is_some() {
        adopt(template, ctx).await
    } else {
        build(template, ctx).await
    };
    match outcome {
        Ok(action) => Ok(action),
        Err((blocked, retry)) => {
            write_blocked(ctx, template, &blocked).await?;
            // An unreachable API server or provider heals without any change to watch.
            let retry = retry.or((blocked.reason == TemplateReason::ProviderUnavailable)
                .then_some(UNAVAILABLE_INTERVAL));
            Ok(retry.map_or_else(Action::await_change, Action::requeue))
        }
    }
}

type Outcome = Result<Action, (Blocked, Option<Duration>)>;

/// An `existing` template is checked and recorded, never built or deleted.
async fn adopt(template: &SandboxTemplate, ctx: &Context) -> Outcome {
    let Some(existing) = &template.spec.existing else {
        return Ok(Action::await_change());
    };
    let status = previous(template);
    if status.phase == Some(TemplatePhase::Ready)
        && status.observed_generation == template.metadata.generation
    {
        return Ok(Action::await_change());
    }
    let provider = resolve_provider(ctx, template)
        .await
        .map_err(|blocked| (blocked, None))?;
    let id = match provider.get_template(&existing.template_id).await {
        Ok(found) => found.template_id,
        Err(error) if error.is_not_found() => {
            match provider.lookup_alias(&existing.template_id).await {
                Ok(AliasLookup::Owned(alias)) => alias.template_id,
                Ok(AliasLookup::Missing | AliasLookup::Foreign) => {
                    return Err((
                        Blocked::new(
                            TemplateReason::TemplateNotFound,
                            format!(
                                "template {} does not exist on the provider",
                                existing.template_id
                            ),
                        ),
                        None,
                    ));
                }
                Err(error) => return Err(Blocked::from_provider(&error)),
            }
        }
        Err(error) => return Err(Blocked::from_provider(&error)),
    };
    let adopted_before =
        ready_reason(&previous(template)) == Some(TemplateReason::Adopted.as_str());
    write_stage(
        ctx,
        template,
        TemplatePhase::Ready,
        TemplateReason::Adopted,
        "the existing template is in use",
        |status| {
            status.template_id = Some(id.clone());
            status.build_id = None;
            status.spec_hash = None;
        },
    )
    .await
    .map_err(|error| {
        (
            Blocked::new(TemplateReason::ProviderUnavailable, error.to_string()),
            Some(UNAVAILABLE_INTERVAL),
        )
    })?;
    if !adopted_before {
        let note = format!("adopted template {id}");
        publish_event(
            ctx,
            template,
            EventType::Normal,
            TemplateReason::Adopted,
            note,
        )
        .await;
    }
    Ok(Action::await_change())
}

async fn build(template: &SandboxTemplate, ctx: &Context) -> Outcome {
    let Some(spec) = &template.spec.build else {
        return Ok(Action::await_change());
    };
    let maps = config_maps(ctx, template, &template_build::referenced_config_maps(spec))
        .await
        .map_err(|blocked| (blocked, None))?;
    let hash = template_build::spec_hash(spec, &provider_identity(template), &maps);
    let status = previous(template);
    let current = status.spec_hash.as_deref() == Some(hash.as_str());
    let key = object_key(template);
    match (current, status.phase) {
        (true, Some(phase @ (TemplatePhase::Ready | TemplatePhase::Failed))) => {
            ctx.builds.finish(&key);
            if status.observed_generation != template.metadata.generation {
                // A change that does not touch the build (say, the deletion policy).
                let mut status = status.clone();
                status.observed_generation = template.metadata.generation;
                write_status(ctx, template, status)
                    .await
                    .map_err(kube_failure)?;
            }
            if phase == TemplatePhase::Failed {
                return Ok(Action::await_change());
            }
            if ctx.builds.check_due(&key, ctx.verify_templates_every)
                && let Some(template_id) = &status.template_id
                && !still_on_provider(template, ctx, template_id).await?
            {
                let message = format!(
                    "template {template_id} disappeared from the provider; building it again"
                );
                publish_event(
                    ctx,
                    template,
                    EventType::Warning,
                    TemplateReason::TemplateVanished,
                    message,
                )
                .await;
                let mut status = status;
                status.spec_hash = None;
                write_status(ctx, template, status)
                    .await
                    .map_err(kube_failure)?;
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Ok(Action::requeue(ctx.verify_templates_every))
        }
        (true, Some(TemplatePhase::Building)) if status.build_id.is_some() => {
            let provider = resolve_provider(ctx, template)
                .await
                .map_err(|blocked| (blocked, None))?;
            follow(template, ctx, &provider, spec, &maps).await
        }
        _ => {
            let provider = resolve_provider(ctx, template)
                .await
                .map_err(|blocked| (blocked, None))?;
            start(template, ctx, &provider, spec, &maps, hash).await
        }
    }
}

/// Whether a Ready template still exists where it was built. Only a definite "not found"
/// counts as gone; anything else is looked at again next time.
async fn still_on_provider(
    template: &SandboxTemplate,
    ctx: &Context,
    template_id: &str,
) -> Result<bool, (Blocked, Option<Duration>)> {
    let Ok(provider) = resolve_provider(ctx, template).await else {
        return Ok(true);
    };
    match provider.get_template(template_id).await {
        Ok(_) => {
            ctx.builds.checked(&object_key(template));
            Ok(true)
        }
        Err(error) if error.is_not_found() => Ok(false),
        Err(_) => Ok(true),
    }
}

fn kube_failure(error: Error) -> (Blocked, Option<Duration>) {
    (
        Blocked::new(TemplateReason::ProviderUnavailable, error.to_string()),
        Some(UNAVAILABLE_INTERVAL),
    )
}

fn object_key(template: &SandboxTemplate) -> String {
    format!(
        "{}/{}",
        template.namespace().unwrap_or_default(),
        template.name_any()
    )
}

/// Requests a new build and records its IDs at once, then uploads and starts it.
async fn start(
    template: &SandboxTemplate,
    ctx: &Context,
    provider: &E2bClient,
    spec: &sandcastle_api::TemplateBuild,
    maps: &ConfigMapData,
    hash: String,
) -> Outcome {
    let key = object_key(template);
    if !ctx.builds.try_start(&key) {
        let message = format!(
            "waiting for a build slot ({} builds at a time)",
            ctx.builds.limit()
        );
        let queued_before =
            ready_reason(&previous(template)) == Some(TemplateReason::Queued.as_str());
        write_stage(
            ctx,
            template,
            TemplatePhase::Pending,
            TemplateReason::Queued,
            &message,
            |_| {},
        )
        .await
        .map_err(kube_failure)?;
        if !queued_before {
            publish_event(
                ctx,
                template,
                EventType::Normal,
                TemplateReason::Queued,
                message,
            )
            .await;
        }
        return Ok(Action::requeue(QUEUE_INTERVAL));
    }
    let name = template_build::template_name(
        spec,
        &template.namespace().unwrap_or_default(),
        &template.name_any(),
    );
    let plan = template_build::plan(spec, &name, maps).map_err(|error| {
        ctx.builds.finish(&key);
        match error {
            PlanError::MissingConfigMap(_) => (
                Blocked::new(TemplateReason::MissingConfigMap, error.to_string()),
                None,
            ),
            PlanError::InvalidStep { .. } => (
                Blocked::new(TemplateReason::BuildFailed, error.to_string()),
                None,
            ),
        }
    })?;
    let requested = match provider.request_build(&plan.request).await {
        Ok(requested) => requested,
        Err(error) => {
            ctx.builds.finish(&key);
            return Err(Blocked::from_provider(&error));
        }
    };
    let message = format!(
        "build {} of template {} requested",
        requested.build_id, requested.template_id
    );
    write_stage(
        ctx,
        template,
        TemplatePhase::Building,
        TemplateReason::BuildStarted,
        &message,
        |status| {
            status.template_id = Some(requested.template_id.clone());
            status.build_id = Some(requested.build_id.clone());
            status.template_name = Some(name.clone());
            status.spec_hash = Some(hash);
            status.build_started_at = Some(now());
            status.build_completed_at = None;
            status.failed_step = None;
            status.log_tail = Vec::new();
        },
    )
    .await
    .map_err(kube_failure)?;
    ctx.builds.forget_logs(&requested.build_id);
    publish_event(
        ctx,
        template,
        EventType::Normal,
        TemplateReason::BuildStarted,
        message,
    )
    .await;
    launch(provider, &requested.template_id, &requested.build_id, &plan).await?;
    Ok(Action::requeue(FOLLOW_INTERVAL))
}

/// Uploads the COPY sources the provider lacks and starts the build. Safe to repeat: a
/// present upload is skipped and only a waiting build can start.
async fn launch(
    provider: &E2bClient,
    template_id: &str,
    build_id: &str,
    plan: &template_build::BuildPlan,
) -> Result<(), (Blocked, Option<Duration>)> {
    for layer in &plan.layers {
        provider
            .upload_layer(template_id, layer)
            .await
            .map_err(|error| Blocked::from_provider(&error))?;
    }
    provider
        .start_build(template_id, build_id, &plan.start)
        .await
        .map_err(|error| match error {
            ProviderError::InvalidRequest { .. } => (
                Blocked::new(
                    TemplateReason::BuildFailed,
                    format!("the provider refused the build: {error}"),
                ),
                None,
            ),
            other => Blocked::from_provider(&other),
        })
}

/// Fails a build that ran past `timeoutSeconds`. The E2B API has no call that stops one
/// build; the provider ends it by its own limits. A changed spec builds again.
async fn write_timed_out(
    ctx: &Context,
    template: &SandboxTemplate,
    spec: &sandcastle_api::TemplateBuild,
    tail: Vec<String>,
) -> Outcome {
    let message = format!(
        "the build did not finish within {} s (spec.build.timeoutSeconds)",
        spec.timeout_seconds.unwrap_or_default()
    );
    write_stage(
        ctx,
        template,
        TemplatePhase::Failed,
        TemplateReason::BuildTimedOut,
        &message,
        |status| {
            status.log_tail = tail;
            status.build_completed_at = Some(now());
        },
    )
    .await
    .map_err(kube_failure)?;
    publish_event(
        ctx,
        template,
        EventType::Warning,
        TemplateReason::BuildTimedOut,
        message,
    )
    .await;
    Ok(Action::await_change())
}

/// Reads the build's new log entries and status, and records them.
async fn follow(
    template: &SandboxTemplate,
    ctx: &Context,
    provider: &E2bClient,
    spec: &sandcastle_api::TemplateBuild,
    maps: &ConfigMapData,
) -> Outcome {
    let status = previous(template);
    let (Some(template_id), Some(build_id)) = (status.template_id.clone(), status.build_id.clone())
    else {
        return Ok(Action::await_change());
    };
    let key = object_key(template);
    ctx.builds.resume(&key);
    // After a restart the offset is unknown: read the log from the start into a fresh tail.
    let (mut offset, mut tail) = match ctx.builds.log_offset(&build_id) {
        Some(offset) => (offset, status.log_tail.clone()),
        None => (0, Vec::new()),
    };
    let mut info;
    loop {
        info = match provider.build_status(&template_id, &build_id, offset).await {
            Ok(info) => info,
            Err(error) if error.is_not_found() => {
                // Gone from the provider (deleted behind the operator's back): build again.
                ctx.builds.finish(&key);
                let mut status = status.clone();
                status.spec_hash = None;
                write_status(ctx, template, status)
                    .await
                    .map_err(kube_failure)?;
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(error) => return Err(Blocked::from_provider(&error)),
        };
        if info.log_entries.is_empty() {
            break;
        }
        offset += info.log_entries.len();
        template_build::extend_log_tail(
            &mut tail,
            info.log_entries.iter().map(|entry| entry.message.clone()),
        );
    }
    ctx.builds.set_log_offset(&build_id, offset);
    let running = matches!(info.status, BuildStatus::Waiting | BuildStatus::Building);
    if running
        && let Some(started) = &status.build_started_at
        && template_build::timed_out(started, spec.timeout_seconds, &now())
    {
        ctx.builds.finish(&key);
        return write_timed_out(ctx, template, spec, tail).await;
    }
    match info.status {
        BuildStatus::Waiting => {
            let name = status.template_name.clone().unwrap_or_default();
            let plan = template_build::plan(spec, &name, maps).map_err(|error| {
                (
                    Blocked::new(TemplateReason::BuildFailed, error.to_string()),
                    None,
                )
            })?;
            launch(provider, &template_id, &build_id, &plan).await?;
            Ok(Action::requeue(FOLLOW_INTERVAL))
        }
        BuildStatus::Building => {
            if tail != status.log_tail {
                let message = tail.last().cloned().unwrap_or_else(|| "building".into());
                write_stage(
                    ctx,
                    template,
                    TemplatePhase::Building,
                    TemplateReason::Building,
                    &message,
                    |status| {
                        status.log_tail = tail;
                    },
                )
                .await
                .map_err(kube_failure)?;
            }
            Ok(Action::requeue(FOLLOW_INTERVAL))
        }
        BuildStatus::Ready => {
            ctx.builds.finish(&key);
            ctx.builds.checked(&key);
            let message = format!("template {template_id} built (build {build_id})");
            write_stage(
                ctx,
                template,
                TemplatePhase::Ready,
                TemplateReason::BuildSucceeded,
                &message,
                |status| {
                    status.log_tail = tail;
                    status.build_completed_at = Some(now());
                },
            )
            .await
            .map_err(kube_failure)?;
            publish_event(
                ctx,
                template,
                EventType::Normal,
                TemplateReason::BuildSucceeded,
                message,
            )
            .await;
            Ok(Action::await_change())
        }
        BuildStatus::Error => {
            ctx.builds.finish(&key);
            let reason = info.reason.as_ref();
            let step =
                template_build::failed_step(reason.and_then(|reason| reason.step.as_deref()));
            let detail = reason
                .map(|reason| reason.message.clone())
                .unwrap_or_else(|| "the build failed".into());
            let message = match step {
                Some(step) => format!("build failed at step {step}: {detail}"),
                None => format!("build failed: {detail}"),
            };
            write_stage(
                ctx,
                template,
                TemplatePhase::Failed,
                TemplateReason::BuildFailed,
                &message,
                |status| {
                    status.log_tail = tail;
                    status.failed_step = step;
                    status.build_completed_at = Some(now());
                },
            )
            .await
            .map_err(kube_failure)?;
            publish_event(
                ctx,
                template,
                EventType::Warning,
                TemplateReason::BuildFailed,
                message,
            )
            .await;
            Ok(Action::await_change())
        }
    }
}

/// Deletes the provider's template unless it is retained or adopted. A template still in
/// use keeps the finalizer, with a condition that says so.
async fn cleanup(template: &SandboxTemplate, ctx: &Context) -> Result<Action, Error> {
    ctx.builds.finish(&object_key(template));
    // Its warm sandboxes go with it (a task's claimed one stays with its task).
    if template.spec.pool.is_some() || previous(template).pool.is_some() {
        let provider = resolve_provider(ctx, template)
            .await
            .map_err(|blocked| Error::CleanupBlocked(blocked.message))?;
        super::pool::keep(ctx, template, &provider, None)
            .await
            .map_err(|error| {
                Error::CleanupBlocked(format!("cannot drain the warm pool: {error}"))
            })?;
    }
    let status = previous(template);
    let Some(template_id) = status.template_id.clone() else {
        return Ok(Action::await_change());
    };
    if template.spec.deletion_policy == DeletionPolicy::Retain || template.spec.existing.is_some() {
        return Ok(Action::await_change());
    }
    let provider = match resolve_provider(ctx, template).await {
        Ok(provider) => provider,
        Err(blocked) => {
            let blocked = Blocked::new(
                TemplateReason::DeletionBlocked,
                format!("cannot delete template {template_id}: {}", blocked.message),
            );
            write_blocked(ctx, template, &blocked).await?;
            return Err(Error::CleanupBlocked(blocked.message));
        }
    };
    match provider.delete_template(&template_id).await {
        Ok(_) => {
            publish_event(
                ctx,
                template,
                EventType::Normal,
                TemplateReason::Deleted,
                format!("template {template_id} deleted from the provider"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(error) => {
            let message = format!("cannot delete template {template_id} yet: {error}");
            write_blocked(
                ctx,
                template,
                &Blocked::new(TemplateReason::DeletionBlocked, message.clone()),
            )
            .await?;
            Err(Error::CleanupBlocked(message))
        }
    }
}
