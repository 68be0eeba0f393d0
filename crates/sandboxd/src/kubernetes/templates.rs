//! The template API of the kubernetes runtime. A template lives, whole, in a ConfigMap;
//! a build that only changes settings uses its parent's image as it is, and one with RUN
//! or COPY steps has the builder (`build`) make an image in a Job, which the build's
//! status reads as it goes.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::json;

use super::api::{kube_failure, sandboxes};
use super::build::{self, Plan, Progress, Settings};
use super::objects::{self, Build, PendingBuild, Template};
use super::{BuilderApis, KubeState};
use crate::api::{Body400, constant_time_eq, error, valid_hash};
use crate::templates::{BASE_TEMPLATE, TemplateError, checked_build_request, validate_step};
use crate::{random_id, random_token, random_uuid};
use sandcastle_e2b::envd::ENVD_VERSION;
use sandcastle_e2b::models::{
    BuildLogEntry, BuildStatus, BuildStatusReason, FileUploadLink, TemplateAlias,
    TemplateBuildInfo, TemplateBuildRequest, TemplateBuildRequested, TemplateBuildStart,
    TemplateStep,
};

type Shared = std::sync::Arc<KubeState>;

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Records the `base` template, or points it at the configured image.
pub(super) async fn ensure_base_template(state: &KubeState) -> Result<(), kube::Error> {
    let existing = state
        .config_maps
        .get_opt(&objects::template_object_name(BASE_TEMPLATE))
        .await?;
    let mut template = existing
        .as_ref()
        .and_then(objects::template_of)
        .unwrap_or_else(|| Template {
            id: BASE_TEMPLATE.into(),
            aliases: vec![BASE_TEMPLATE.into()],
            cpu_count: 2,
            memory_mb: 1024,
            created_at: now(),
            ..Template::default()
        });
    if template.image.as_deref() == Some(state.config.base_image.as_str()) {
        return Ok(());
    }
    template.image = Some(state.config.base_image.clone());
    template.updated_at = now();
    template.builds = vec![Build {
        id: random_uuid(),
        status: BuildStatus::Ready,
        reason: None,
        logs: Vec::new(),
        created_at: now(),
        updated_at: now(),
        pending: None,
    }];
    save_template(state, existing.as_ref(), &template).await
}

async fn templates(state: &KubeState) -> Result<Vec<(ConfigMap, Template)>, Response> {
    let listed = state
        .config_maps
        .list(&ListParams::default().labels(&objects::template_selector()))
        .await
        .map_err(|failure| kube_failure("cannot list templates", failure))?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|config_map| {
            let template = objects::template_of(&config_map)?;
            Some((config_map, template))
        })
        .collect())
}

/// A template by id or alias, with the ConfigMap it lives in.
async fn find_template_object(
    state: &KubeState,
    reference: &str,
) -> Result<Option<(ConfigMap, Template)>, Response> {
    let bare = reference.split(':').next().unwrap_or(reference);
    Ok(templates(state)
        .await?
        .into_iter()
        .find(|(_, template)| template.id == bare || template.aliases.iter().any(|a| a == bare)))
}

pub(super) async fn find_template(
    state: &KubeState,
    reference: &str,
) -> Result<Option<Template>, Response> {
    Ok(find_template_object(state, reference)
        .await?
        .map(|(_, template)| template))
}

/// Writes a template, replacing the ConfigMap it was read from only if nobody changed it
/// since (the apiserver checks the resourceVersion).
async fn save_template(
    state: &KubeState,
    existing: Option<&ConfigMap>,
    template: &Template,
) -> Result<(), kube::Error> {
    let mut config_map = objects::template_config_map(&state.config, template);
    match existing {
        Some(existing) => {
            config_map.metadata.resource_version = existing.metadata.resource_version.clone();
            state
                .config_maps
                .replace(
                    &objects::template_object_name(&template.id),
                    &PostParams::default(),
                    &config_map,
                )
                .await
                .map(|_| ())
        }
        None => state
            .config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .map(|_| ()),
    }
}

fn template_error(failure: TemplateError) -> Response {
    failure.into_response()
}

/// `POST /v3/templates`: a known name reuses its template and only adds a build.
pub(super) async fn request_build(
    Extract(state): Extract<Shared>,
    Body400(body): Body400<TemplateBuildRequest>,
) -> Response {
    let (bare, cpu_count, memory_mb) = match checked_build_request(&body) {
        Ok(checked) => checked,
        Err(failure) => return template_error(failure),
    };
    // Two requests for one new name may race; the apiserver lets one write win and the
    // other reads it back on its next try.
    for _ in 0..5 {
        let found = match find_template_object(&state, bare).await {
            Ok(found) => found,
            Err(response) => return response,
        };
        let (existing, mut template) = match found {
            Some((config_map, template)) => (Some(config_map), template),
            None => (
                None,
                Template {
                    id: random_id(20),
                    aliases: vec![bare.to_string()],
                    created_at: now(),
                    ..Template::default()
                },
            ),
        };
        let build_id = random_uuid();
        template.cpu_count = cpu_count;
        template.memory_mb = memory_mb;
        template.updated_at = now();
        template.builds.push(Build {
            id: build_id.clone(),
            status: BuildStatus::Waiting,
            reason: None,
            logs: Vec::new(),
            created_at: now(),
            updated_at: now(),
            pending: None,
        });
        match save_template(&state, existing.as_ref(), &template).await {
            Ok(()) => {
                return (
                    StatusCode::ACCEPTED,
                    Json(TemplateBuildRequested {
                        template_id: template.id.clone(),
                        build_id,
                        public: false,
                        names: template.aliases.clone(),
                        tags: vec!["default".into()],
                        aliases: template.aliases,
                    }),
                )
                    .into_response();
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.code == 409 => {}
            Err(failure) => return kube_failure("cannot record the template", failure),
        }
    }
    error(
        StatusCode::CONFLICT,
        "the template was changed concurrently; try again",
    )
}

/// What a build starts from: an image, and the settings its sandboxes had.
struct Parent {
    image: String,
    settings: Settings,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
}

fn settings_of(template: &Template) -> Settings {
    Settings {
        env: template.env.clone(),
        workdir: template.workdir.clone(),
        user: template.user.clone(),
    }
}

/// What a build request comes to before anything is written.
enum Decision {
    /// Settings only: the parent's image, used as it is.
    Ready(Settings),
    /// A builder Job makes the image.
    Build(Plan),
    Fail(String, String),
}

fn step_name(step: Option<u32>) -> String {
    step.filter(|step| *step > 0)
        .map_or_else(|| "base".to_string(), |step| step.to_string())
}

fn decide(state: &KubeState, parent: &Parent, steps: &[TemplateStep]) -> Decision {
    match build::plan(&parent.image, &parent.settings, steps) {
        Err((step, message)) => Decision::Fail(step_name(Some(step)), message),
        Ok(plan) if !plan.changes_image(steps) => Decision::Ready(plan.settings),
        Ok(plan) if state.builder.is_some() => Decision::Build(plan),
        Ok(_) => {
            let first = steps
                .iter()
                .position(|step| {
                    matches!(
                        step.kind.to_ascii_uppercase().as_str(),
                        "RUN" | "COPY" | "ADD"
                    )
                })
                .map(|index| index as u32 + 1);
            Decision::Fail(
                step_name(first),
                "RUN and COPY steps change the image, and this server has no image builder (--builder-image, --builder-repository): build the image elsewhere and use fromImage".into(),
            )
        }
    }
}

fn log_entry(level: &str, message: String, step: Option<String>) -> BuildLogEntry {
    BuildLogEntry {
        timestamp: now(),
        level: level.into(),
        message,
        step,
    }
}

fn fail_build(build: &mut Build, step: String, message: String) {
    let line = log_entry("error", message.clone(), Some(step.clone()));
    build.status = BuildStatus::Error;
    build.logs.push(line.clone());
    build.reason = Some(BuildStatusReason {
        message,
        step: Some(step),
        log_entries: vec![line],
    });
}

/// Old builds and long logs go, so that a template stays well inside its ConfigMap.
fn trim_history(template: &mut Template) {
    const BUILDS: usize = 20;
    const ENTRIES: usize = 300;
    const MESSAGE: usize = 1000;
    while template.builds.len() > BUILDS {
        match template
            .builds
            .iter()
            .position(|build| build.status != BuildStatus::Building)
        {
            Some(oldest) => template.builds.remove(oldest),
            None => break,
        };
    }
    for build in &mut template.builds {
        let extra = build.logs.len().saturating_sub(ENTRIES);
        build.logs.drain(..extra);
        for entry in &mut build.logs {
            if entry.message.len() > MESSAGE {
                let mut cut = MESSAGE;
                while !entry.message.is_char_boundary(cut) {
                    cut -= 1;
                }
                entry.message.truncate(cut);
                entry.message.push('…');
            }
        }
    }
}

pub(super) async fn start_build(
    Extract(state): Extract<Shared>,
    Path((id, build_id)): Path<(String, String)>,
    Body400(body): Body400<TemplateBuildStart>,
) -> Response {
    if body.from_template.is_some() == body.from_image.is_some() {
        return template_error(TemplateError::Invalid(
            "exactly one of fromImage or fromTemplate is required".into(),
        ));
    }
    for (index, step) in body.steps.iter().enumerate() {
        if let Err(failure) = validate_step(index + 1, step) {
            return template_error(failure);
        }
    }
    let parent = match (&body.from_image, &body.from_template) {
        (Some(image), _) => Parent {
            image: image.clone(),
            settings: Settings::default(),
            start_cmd: None,
            ready_cmd: None,
        },
        (None, Some(parent)) => match find_template(&state, parent).await {
            Ok(Some(template)) if template.image.is_some() => Parent {
                image: template.image.clone().unwrap_or_default(),
                settings: settings_of(&template),
                start_cmd: template.start_cmd.clone(),
                ready_cmd: template.ready_cmd.clone(),
            },
            Ok(_) => {
                return template_error(TemplateError::Invalid(format!(
                    "template '{parent}' to build from was not found"
                )));
            }
            Err(response) => return response,
        },
        (None, None) => unreachable!("checked above"),
    };
    let decision = decide(&state, &parent, &body.steps);
    let start_cmd = body.start_cmd.clone().or(parent.start_cmd.clone());
    let ready_cmd = body.ready_cmd.clone().or(parent.ready_cmd.clone());
    let (existing, mut template) = match find_template_object(&state, &id).await {
        Ok(Some(found)) => found,
        Ok(None) => return template_error(TemplateError::NotFound(id)),
        Err(response) => return response,
    };
    let Some(build) = template
        .builds
        .iter_mut()
        .find(|build| build.id == build_id)
    else {
        return template_error(TemplateError::BuildNotFound(build_id));
    };
    if build.status != BuildStatus::Waiting {
        return template_error(TemplateError::Invalid(
            "build is not in waiting state".into(),
        ));
    }
    build.updated_at = now();
    let mut launch = None;
    match decision {
        Decision::Ready(settings) => {
            build.status = BuildStatus::Ready;
            build.logs.push(log_entry(
                "info",
                format!("Using image {}", parent.image),
                None,
            ));
            build
                .logs
                .push(log_entry("info", "Build finished".into(), None));
            template.image = Some(parent.image.clone());
            template.env = settings.env;
            template.workdir = settings.workdir;
            template.user = settings.user;
            template.start_cmd = start_cmd;
            template.ready_cmd = ready_cmd;
        }
        Decision::Fail(step, message) => fail_build(build, step, message),
        Decision::Build(plan) => {
            build.status = BuildStatus::Building;
            build.logs.push(log_entry(
                "info",
                format!("Building on {} with kaniko", parent.image),
                None,
            ));
            build.pending = Some(PendingBuild {
                lines: plan.lines.clone(),
                settings: plan.settings.clone(),
                start_cmd,
                ready_cmd,
            });
            launch = Some(plan);
        }
    }
    template.updated_at = now();
    trim_history(&mut template);
    if let Err(failure) = save_template(&state, Some(&existing), &template).await {
        return kube_failure("cannot record the build", failure);
    }
    if let (Some(plan), Some(builder)) = (launch, &state.builder)
        && let Err((step, message)) =
            launch_build(builder, &state, &template.id, &build_id, &plan).await
    {
        let failed = Err((step_name(step), message));
        if let Err(response) =
            finish_build(&state, &template.id, &build_id, failed, Vec::new()).await
        {
            return response;
        }
    }
    StatusCode::ACCEPTED.into_response()
}

/// Gathers the build's uploads into its context and starts the builder Job on it. The
/// context's ConfigMap is owned by the Job, so deleting the Job deletes both.
async fn launch_build(
    builder: &BuilderApis,
    state: &KubeState,
    template_id: &str,
    build_id: &str,
    plan: &Plan,
) -> Result<(), (Option<u32>, String)> {
    let mut uploads = BTreeMap::new();
    for hash in plan.uploads.iter().map(|upload| &upload.hash) {
        if uploads.contains_key(hash) {
            continue;
        }
        let step = plan
            .lines
            .iter()
            .find(|(line, _)| line.contains(hash.as_str()))
            .and_then(|(_, step)| *step);
        let stored = state
            .config_maps
            .get_opt(&build::upload_name(template_id, hash))
            .await
            .map_err(|failure| (step, format!("cannot read the uploaded files: {failure}")))?;
        let Some(bytes) = stored.as_ref().and_then(build::uploaded) else {
            return Err((step, format!("files with hash {hash} were not uploaded")));
        };
        uploads.insert(hash.clone(), bytes.to_vec());
    }
    let archive = build::context_archive(plan, &uploads).map_err(|message| (None, message))?;
    let job = builder
        .jobs
        .create(
            &PostParams::default(),
            &build::build_job(&builder.config, template_id, build_id),
        )
        .await
        .map_err(|failure| (None, format!("cannot create the build Job: {failure}")))?;
    let mut context =
        build::context_config_map(&builder.config, template_id, build_id, plan, archive);
    context.metadata.owner_references = build::owner(&job).map(|owner| vec![owner]);
    if let Err(failure) = builder
        .config_maps
        .create(&PostParams::default(), &context)
        .await
    {
        delete_job(builder, build_id).await;
        return Err((None, format!("cannot store the build context: {failure}")));
    }
    Ok(())
}

async fn delete_job(builder: &BuilderApis, build_id: &str) {
    let params = DeleteParams::background();
    if let Err(failure) = builder
        .jobs
        .delete(&build::job_name(build_id), &params)
        .await
        && !matches!(&failure, kube::Error::Api(status) if status.is_not_found())
    {
        tracing::warn!(%failure, build = %build_id, "cannot delete a build Job");
    }
}

/// Writes a build's end (the pushed digest, or the step it failed at and why) with the
/// builder's output, then removes its Job. Whichever replica sees the end first writes
/// it; a conflicting write is read back and retried.
async fn finish_build(
    state: &KubeState,
    template_id: &str,
    build_id: &str,
    outcome: Result<String, (String, String)>,
    output: Vec<BuildLogEntry>,
) -> Result<(), Response> {
    for _ in 0..5 {
        let Some((existing, mut template)) = find_template_object(state, template_id).await? else {
            break;
        };
        let Some(build) = template
            .builds
            .iter_mut()
            .find(|build| build.id == build_id)
        else {
            break;
        };
        let Some(pending) = build.pending.take() else {
            break;
        };
        build.logs.extend(output.iter().cloned());
        build.updated_at = now();
        match &outcome {
            Ok(digest) => {
                let builder = state.builder.as_ref().map(|builder| &builder.config);
                let repository =
                    builder.map_or("", |config| config.repository.trim_end_matches('/'));
                let image = format!("{repository}/{template_id}@{digest}");
                build.status = BuildStatus::Ready;
                build
                    .logs
                    .push(log_entry("info", format!("Pushed {image}"), None));
                build
                    .logs
                    .push(log_entry("info", "Build finished".into(), None));
                template.image = Some(image);
                template.env = pending.settings.env;
                template.workdir = pending.settings.workdir;
                template.user = pending.settings.user;
                template.start_cmd = pending.start_cmd;
                template.ready_cmd = pending.ready_cmd;
            }
            Err((step, message)) => fail_build(build, step.clone(), message.clone()),
        }
        template.updated_at = now();
        trim_history(&mut template);
        match save_template(state, Some(&existing), &template).await {
            Ok(()) => break,
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(failure) => return Err(kube_failure("cannot record the build", failure)),
        }
    }
    if let Some(builder) = &state.builder {
        delete_job(builder, build_id).await;
    }
    Ok(())
}

/// Where a running build stands, from its Job.
enum Advance {
    /// Still building: the builder's output so far.
    Running(Vec<BuildLogEntry>),
    Finished,
}

/// Reads a building build's Job and its pod's output; once the Job has ended, records
/// the end.
async fn advance_build(
    state: &KubeState,
    template_id: &str,
    build: &Build,
) -> Result<Advance, Response> {
    let (Some(pending), Some(builder)) = (&build.pending, &state.builder) else {
        return Ok(Advance::Finished);
    };
    let job = builder
        .jobs
        .get_opt(&build::job_name(&build.id))
        .await
        .map_err(|failure| kube_failure("cannot read the build Job", failure))?;
    let Some(job) = job else {
        // A replica that saved the build may still be creating the Job; past a minute it
        // is gone for good.
        let stale = build
            .updated_at
            .parse::<jiff::Timestamp>()
            .is_ok_and(|at| jiff::Timestamp::now().duration_since(at).as_secs() > 60);
        if stale {
            let failed = Err(("base".to_string(), "the build's Job is gone".to_string()));
            finish_build(state, template_id, &build.id, failed, Vec::new()).await?;
            return Ok(Advance::Finished);
        }
        return Ok(Advance::Running(Vec::new()));
    };
    let pod = builder
        .pods
        .list(&ListParams::default().labels(&format!("{}={}", build::BUILD_ID, build.id)))
        .await
        .ok()
        .and_then(|pods| pods.items.into_iter().next());
    let output = match pod.as_ref().and_then(|pod| pod.metadata.name.as_deref()) {
        Some(name) => {
            let params = LogParams {
                container: Some(build::CONTAINER.into()),
                timestamps: true,
                ..LogParams::default()
            };
            builder.pods.logs(name, &params).await.unwrap_or_default()
        }
        None => String::new(),
    };
    let reading = build::read_logs(&output, &pending.lines, &now());
    let outcome = match build::progress(&job, pod.as_ref()) {
        Progress::Running => return Ok(Advance::Running(reading.entries)),
        Progress::Pushed { digest } => Ok(digest),
        Progress::Failed { message } => Err((
            step_name(reading.step),
            reading.last_error.unwrap_or(message),
        )),
    };
    finish_build(state, template_id, &build.id, outcome, reading.entries).await?;
    Ok(Advance::Finished)
}

/// Moves every running build on; the reaper calls it, so builds end and their Jobs go
/// even when no client polls.
pub(super) async fn advance_builds(state: &KubeState) {
    let Ok(all) = templates(state).await else {
        return;
    };
    for (_, template) in all {
        for build in &template.builds {
            if build.status == BuildStatus::Building {
                let _ = advance_build(state, &template.id, build).await;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StatusQuery {
    #[serde(default)]
    logs_offset: usize,
    limit: Option<usize>,
}

pub(super) async fn build_status(
    Extract(state): Extract<Shared>,
    Path((id, build_id)): Path<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let mut live = Vec::new();
    for _ in 0..2 {
        let template = match find_template(&state, &id).await {
            Ok(Some(template)) => template,
            Ok(None) => return template_error(TemplateError::NotFound(id)),
            Err(response) => return response,
        };
        let Some(build) = template.builds.iter().find(|build| build.id == build_id) else {
            return template_error(TemplateError::BuildNotFound(build_id));
        };
        if build.status == BuildStatus::Building && live.is_empty() {
            match advance_build(&state, &template.id, build).await {
                Ok(Advance::Running(output)) => live = output,
                // Read the template again: the build's end is on it now.
                Ok(Advance::Finished) => continue,
                Err(response) => return response,
            }
        }
        return Json(TemplateBuildInfo {
            template_id: template.id.clone(),
            build_id: build.id.clone(),
            status: build.status,
            logs: Vec::new(),
            log_entries: build
                .logs
                .iter()
                .chain(&live)
                .skip(query.logs_offset)
                .take(query.limit.unwrap_or(100).clamp(1, 100))
                .cloned()
                .collect(),
            reason: build.reason.clone(),
        })
        .into_response();
    }
    error(
        StatusCode::CONFLICT,
        "the build changed while it was read; try again",
    )
}

/// `GET /templates/{id}/files/{hash}`: where to upload a COPY step's files. The upload
/// waits in a ConfigMap owned by the template, with a one-time token the link carries
/// in place of a bucket's signature, so any replica can take the upload.
pub(super) async fn upload_link(
    Extract(state): Extract<Shared>,
    Path((id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (template_object, template) = match find_template_object(&state, &id).await {
        Ok(Some(found)) => found,
        Ok(None) => return template_error(TemplateError::NotFound(id)),
        Err(response) => return response,
    };
    if !valid_hash(&hash) {
        return error(
            StatusCode::BAD_REQUEST,
            "files hash must be 64 hex characters",
        );
    }
    let name = build::upload_name(&template.id, &hash);
    let mut token = None;
    for _ in 0..2 {
        let stored = match state.config_maps.get_opt(&name).await {
            Ok(stored) => stored,
            Err(failure) => return kube_failure("cannot read the upload", failure),
        };
        if let Some(stored) = stored {
            if build::uploaded(&stored).is_some() {
                let link = FileUploadLink {
                    present: true,
                    url: None,
                    headers: None,
                };
                return (StatusCode::CREATED, Json(link)).into_response();
            }
            token = stored
                .metadata
                .annotations
                .and_then(|mut annotations| annotations.remove(build::UPLOAD_TOKEN));
            break;
        }
        let fresh = random_token(32);
        let waiting = build::upload_config_map(&template_object, &template.id, &hash, &fresh);
        match state
            .config_maps
            .create(&PostParams::default(), &waiting)
            .await
        {
            Ok(_) => {
                token = Some(fresh);
                break;
            }
            // Another replica made it first: read its token.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(failure) => return kube_failure("cannot prepare the upload", failure),
        }
    }
    let Some(token) = token else {
        return error(
            StatusCode::CONFLICT,
            "the upload changed concurrently; try again",
        );
    };
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("localhost");
    let link = FileUploadLink {
        present: false,
        url: Some(format!(
            "http://{host}/uploads/{}/{hash}?token={token}",
            template.id
        )),
        headers: None,
    };
    (StatusCode::CREATED, Json(link)).into_response()
}

#[derive(Deserialize)]
pub(super) struct UploadQuery {
    token: String,
}

/// `PUT` of an upload link: the body, up to what a ConfigMap holds, into its ConfigMap.
pub(super) async fn upload(
    Extract(state): Extract<Shared>,
    Path((id, hash)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let name = build::upload_name(&id, &hash);
    let stored = match state.config_maps.get_opt(&name).await {
        Ok(stored) => stored,
        Err(failure) => return kube_failure("cannot read the upload", failure),
    };
    let expected = stored
        .and_then(|stored| stored.metadata.annotations)
        .and_then(|mut annotations| annotations.remove(build::UPLOAD_TOKEN))
        .unwrap_or_default();
    if !valid_hash(&hash)
        || expected.is_empty()
        || !constant_time_eq(query.token.as_bytes(), expected.as_bytes())
    {
        return error(StatusCode::FORBIDDEN, "invalid upload token");
    }
    let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
    else {
        return error(StatusCode::LENGTH_REQUIRED, "Content-Length is required");
    };
    if length > build::MAX_UPLOAD_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the kubernetes runtime keeps a COPY step's files in a ConfigMap, at most {} KiB; these are {} KiB: build the image elsewhere and use fromImage",
                build::MAX_UPLOAD_BYTES / 1024,
                length / 1024
            ),
        );
    }
    let bytes = match axum::body::to_bytes(body, build::MAX_UPLOAD_BYTES).await {
        Ok(bytes) => bytes,
        Err(failure) => return error(StatusCode::BAD_REQUEST, format!("upload failed: {failure}")),
    };
    let patch = ConfigMap {
        binary_data: Some([(build::UPLOAD_KEY.to_string(), ByteString(bytes.to_vec()))].into()),
        ..ConfigMap::default()
    };
    match state
        .config_maps
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(failure) => kube_failure("cannot store the upload", failure),
    }
}

fn view(template: &Template) -> sandcastle_e2b::models::Template {
    let last_ready = template
        .builds
        .iter()
        .rev()
        .find(|build| build.status == BuildStatus::Ready);
    sandcastle_e2b::models::Template {
        template_id: template.id.clone(),
        build_id: last_ready.map(|build| build.id.clone()).unwrap_or_default(),
        cpu_count: template.cpu_count,
        memory_mb: template.memory_mb,
        disk_size_mb: 0,
        public: template.id == BASE_TEMPLATE,
        aliases: template.aliases.clone(),
        names: template.aliases.clone(),
        created_at: template.created_at.clone(),
        updated_at: template.updated_at.clone(),
        created_by: None,
        last_spawned_at: None,
        spawn_count: 0,
        build_count: template.builds.len() as u64,
        envd_version: ENVD_VERSION.into(),
        build_status: template
            .builds
            .last()
            .map_or(BuildStatus::Waiting, |build| build.status),
    }
}

pub(super) async fn list_templates(Extract(state): Extract<Shared>) -> Response {
    match templates(&state).await {
        Ok(all) => Json(
            all.iter()
                .filter(|(_, template)| template.id != BASE_TEMPLATE)
                .map(|(_, template)| view(template))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(response) => response,
    }
}

pub(super) async fn get_template(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
) -> Response {
    match find_template(&state, &id).await {
        Ok(Some(template)) => {
            let mut shown = serde_json::to_value(view(&template)).expect("template serializes");
            shown["builds"] = template
                .builds
                .iter()
                .map(|build| {
                    json!({
                        "buildID": build.id,
                        "status": build.status,
                        "createdAt": build.created_at,
                        "updatedAt": build.updated_at,
                        "cpuCount": template.cpu_count,
                        "memoryMB": template.memory_mb,
                        "envdVersion": ENVD_VERSION,
                    })
                })
                .collect();
            Json(shown).into_response()
        }
        Ok(None) => template_error(TemplateError::NotFound(id)),
        Err(response) => response,
    }
}

pub(super) async fn get_alias(
    Extract(state): Extract<Shared>,
    Path(alias): Path<String>,
) -> Response {
    match find_template(&state, &alias).await {
        Ok(Some(template)) => Json(TemplateAlias {
            public: template.id == BASE_TEMPLATE,
            template_id: template.id,
        })
        .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("template alias '{alias}' not found"),
        ),
        Err(response) => response,
    }
}

/// 400 while any sandbox still runs from the template, like the real service.
pub(super) async fn delete_template(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
) -> Response {
    let template = match find_template(&state, &id).await {
        Ok(Some(template)) => template,
        Ok(None) => return template_error(TemplateError::NotFound(id)),
        Err(response) => return response,
    };
    if template.id == BASE_TEMPLATE {
        return template_error(TemplateError::Public(template.id));
    }
    let in_use = match sandboxes(&state).await {
        Ok(running) => running
            .iter()
            .filter(|sandbox| sandbox.template_id == template.id)
            .count(),
        Err(response) => return response,
    };
    if in_use > 0 {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "cannot delete template '{}' because there are {in_use} running or paused sandboxes using it",
                template.id
            ),
        );
    }
    match state
        .config_maps
        .delete(
            &objects::template_object_name(&template.id),
            &Default::default(),
        )
        .await
    {
        Ok(_) => {
            remove_build_objects(&state, &template.id).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            template_error(TemplateError::NotFound(id))
        }
        Err(failure) => kube_failure("cannot delete the template", failure),
    }
}

/// A deleted template's uploads and running builds. The garbage collector would remove
/// the uploads (the template owns them) but not Jobs in another namespace.
async fn remove_build_objects(state: &KubeState, template_id: &str) {
    let uploads = ListParams::default().labels(&format!("{}={template_id}", build::FILES_OF));
    if let Err(failure) = state
        .config_maps
        .delete_collection(&DeleteParams::default(), &uploads)
        .await
    {
        tracing::warn!(%failure, template = %template_id, "cannot delete a template's uploads");
    }
    if let Some(builder) = &state.builder {
        let jobs = ListParams::default().labels(&format!("{}={template_id}", build::BUILD_OF));
        if let Err(failure) = builder
            .jobs
            .delete_collection(&DeleteParams::background(), &jobs)
            .await
        {
            tracing::warn!(%failure, template = %template_id, "cannot delete a template's builds");
        }
    }
}
