//! The control-plane REST API of the kubernetes runtime: the same routes, status codes
//! and bodies as the local runtime's, answered from the cluster's objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as Extract};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::json;

use super::objects::{self, Build, Liveness, PodPlan, SandboxView, Template};
use super::{KubeState, delete_pod};
use crate::api::{
    Body400, DEFAULT_TIMEOUT_V1, DEFAULT_TIMEOUT_V2, ListQuery, Listed, authenticated, deadline,
    error, list_page, metadata_filter, not_found, timeout_within,
};
use crate::templates::{BASE_TEMPLATE, TemplateError, checked_build_request, validate_step};
use crate::{random_id, random_token, random_uuid};
use sandcastle_e2b::envd::{ENVD_PORT, ENVD_VERSION, InitRequest};
use sandcastle_e2b::models::{
    BuildLogEntry, BuildStatus, BuildStatusReason, CLIENT_ID, ConnectRequest, NewSandbox, Sandbox,
    SandboxDetail, SandboxState, TemplateAlias, TemplateBuildInfo, TemplateBuildRequest,
    TemplateBuildRequested, TemplateBuildStart, TimeoutRequest,
};

type Shared = Arc<KubeState>;

/// How long a sandbox's create waits for its template's ready command.
const READY_WAIT: Duration = Duration::from_secs(60);

pub fn router(state: Shared) -> Router {
    let authenticated = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/v3/templates", post(request_build))
        .route("/templates", get(list_templates))
        .route("/v2/templates", get(list_templates))
        .route("/templates/{id}", get(get_template).delete(delete_template))
        .route("/templates/aliases/{alias}", get(get_alias))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(build_status))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .route("/health", get(|| async { "Health check successful" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

async fn authenticate(Extract(state): Extract<Shared>, request: Request, next: Next) -> Response {
    authenticated(state.config.api_key.as_deref(), request, next).await
}

fn kube_failure(what: &str, failure: kube::Error) -> Response {
    tracing::warn!(%failure, "{what}");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what}: the cluster did not answer: {failure}"),
    )
}

// ---------------------------------------------------------------------------------------
// Sandboxes

async fn create_v1(
    Extract(state): Extract<Shared>,
    Body400(body): Body400<NewSandbox>,
) -> Response {
    let secure = body.secure.unwrap_or(false);
    create(&state, body, DEFAULT_TIMEOUT_V1, secure).await
}

async fn create_v2(
    Extract(state): Extract<Shared>,
    Body400(body): Body400<NewSandbox>,
) -> Response {
    create(&state, body, DEFAULT_TIMEOUT_V2, true).await
}

async fn create(state: &Shared, body: NewSandbox, default_timeout: i64, secure: bool) -> Response {
    match create_sandbox(state, body, default_timeout, secure).await {
        Ok(sandbox) => (StatusCode::CREATED, Json(sandbox)).into_response(),
        Err(response) => response,
    }
}

async fn create_sandbox(
    state: &Shared,
    body: NewSandbox,
    default_timeout: i64,
    secure: bool,
) -> Result<Sandbox, Response> {
    let timeout = timeout_within(
        state.config.max_timeout,
        body.timeout.filter(|t| *t != 0).unwrap_or(default_timeout),
    )?;
    if body.template_id.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "templateID is required"));
    }
    let env_vars = body.env_vars.clone().unwrap_or_default();
    if let Some(name) = env_vars.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid environment variable name {name:?}"),
        ));
    }
    let template = find_template(state, &body.template_id)
        .await?
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("template '{}' not found", body.template_id),
            )
        })?;
    let Some(image) = template.image.clone() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("template '{}' has no successful build", body.template_id),
        ));
    };
    let running = sandboxes(state).await?.len();
    if running >= state.config.max_sandboxes {
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "you have reached the maximum number of concurrent E2B sandboxes ({}). If you need more, please contact support.",
                state.config.max_sandboxes
            ),
        ));
    }
    let id = random_id(20);
    let token = secure.then(|| random_token(40));
    let metadata = body.metadata.clone().unwrap_or_default();
    let pod = objects::sandbox_pod(
        &state.config,
        &PodPlan {
            sandbox_id: &id,
            template: &template,
            image: &image,
            metadata: &metadata,
            started_at: jiff::Timestamp::now(),
            end_at: deadline(timeout),
        },
    );
    let created = state
        .pods
        .create(&PostParams::default(), &pod)
        .await
        .map_err(|failure| match failure {
            kube::Error::Api(status) if status.code == 403 || status.code == 422 => error(
                StatusCode::BAD_REQUEST,
                format!("the cluster refused the sandbox: {}", status.message),
            ),
            other => kube_failure("cannot create the sandbox pod", other),
        })?;
    let started = start(state, &created, &template, token.clone(), env_vars, &body).await;
    if let Err(response) = started {
        delete_pod(state, &created).await;
        return Err(response);
    }
    tracing::info!(sandbox = %id, template = %template.id, "sandbox created");
    Ok(Sandbox {
        sandbox_id: id,
        template_id: template.id.clone(),
        client_id: CLIENT_ID.into(),
        envd_version: ENVD_VERSION.into(),
        alias: template.aliases.first().cloned(),
        envd_access_token: token,
        traffic_access_token: None,
        domain: None,
    })
}

/// Gives the pod its Secret and NetworkPolicy, waits for it to run, and hands envd the
/// sandbox's variables and token.
async fn start(
    state: &Shared,
    pod: &Pod,
    template: &Template,
    token: Option<String>,
    mut env_vars: BTreeMap<String, String>,
    body: &NewSandbox,
) -> Result<(), Response> {
    let refused = |what: &'static str| move |failure| kube_failure(what, failure);
    if let Some(token) = &token {
        state
            .secrets
            .create(&PostParams::default(), &objects::token_secret(pod, token))
            .await
            .map_err(refused("cannot store the access token"))?;
    }
    let internet = body.allow_internet_access.unwrap_or(true);
    state
        .policies
        .create(
            &PostParams::default(),
            &objects::network_policy(&state.config, pod, internet, &[]),
        )
        .await
        .map_err(refused("cannot create the sandbox's NetworkPolicy"))?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let settled =
        kube::runtime::wait::await_condition(state.pods.clone(), &name, |pod: Option<&Pod>| {
            pod.and_then(objects::sandbox_of).is_none_or(|sandbox| {
                sandbox.live != Liveness::Pending
                    || sandbox.ip.is_some() && sandbox.live == Liveness::Running
            })
        });
    let running = tokio::time::timeout(state.config.start_timeout, settled)
        .await
        .map_err(|_| {
            error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the sandbox pod did not start within {} s",
                    state.config.start_timeout.as_secs()
                ),
            )
        })?
        .map_err(|failure| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot watch the sandbox pod: {failure}"),
            )
        })?;
    let sandbox = running.as_ref().and_then(objects::sandbox_of);
    let ip = match sandbox {
        Some(SandboxView {
            live: Liveness::Running,
            ip: Some(ip),
            ..
        }) => ip,
        Some(SandboxView {
            live: Liveness::Gone(reason),
            ..
        }) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("the sandbox pod cannot run: {reason}"),
            ));
        }
        _ => {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the sandbox pod went away as it started",
            ));
        }
    };
    let mut with_template_env = template.env.clone();
    with_template_env.append(&mut env_vars);
    let init = InitRequest {
        env_vars: with_template_env,
        access_token: token,
        default_user: template.user.clone(),
        default_workdir: template.workdir.clone(),
    };
    let url = format!("http://{ip}:{ENVD_PORT}/init");
    let until = tokio::time::Instant::now() + state.config.start_timeout;
    let token = init.access_token.clone();
    loop {
        // envd binds its port a moment after the container starts.
        match state.envd.post(&url).json(&init).send().await {
            Ok(answer) if answer.status().is_success() => break,
            Ok(answer) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("envd refused its setup: {}", answer.status()),
                ));
            }
            Err(failure) if tokio::time::Instant::now() >= until => {
                return Err(error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("envd did not answer in the sandbox pod: {failure}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    let Some(start_cmd) = &template.start_cmd else {
        return Ok(());
    };
    let sandbox_id = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(objects::SANDBOX_ID))
        .cloned()
        .unwrap_or_default();
    start_template_command(
        &ip,
        &sandbox_id,
        token,
        start_cmd,
        template.ready_cmd.as_deref(),
    )
    .await
    .map_err(|failure| error(StatusCode::INTERNAL_SERVER_ERROR, failure))
}

/// Starts the template's start command (tag `startCmd`) through the pod's envd, as any
/// client would, and waits for its ready command to succeed.
async fn start_template_command(
    ip: &str,
    sandbox_id: &str,
    token: Option<String>,
    start: &str,
    ready: Option<&str>,
) -> Result<(), String> {
    use sandcastle_e2b::client::E2bClient;
    use sandcastle_e2b::config::ClientConfig;
    use sandcastle_e2b::envd_client::{CommandSpec, SandboxAccess};
    let config = ClientConfig::with_urls(
        String::new(),
        format!("http://{ip}:{ENVD_PORT}"),
        "unused: envd needs no API key",
    );
    let client = E2bClient::new(config).map_err(|failure| failure.to_string())?;
    let envd = client.envd(SandboxAccess {
        sandbox_id: sandbox_id.to_string(),
        envd_version: ENVD_VERSION.into(),
        access_token: token.map(Into::into),
        domain: None,
    });
    let mut spec = CommandSpec::shell(start);
    spec.tag = Some("startCmd".into());
    // The stream is dropped at once: the command runs on for the sandbox's life.
    envd.start(&spec)
        .await
        .map_err(|failure| format!("cannot run the start command: {failure}"))?;
    let Some(ready) = ready else { return Ok(()) };
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        if let Ok(output) = envd.run(ready).await
            && output.exit_code == 0
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the ready command did not succeed within {} s",
                READY_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every running sandbox, newest first.
async fn sandboxes(state: &KubeState) -> Result<Vec<SandboxView>, Response> {
    let pods = state
        .pods
        .list(&ListParams::default().labels(&objects::sandbox_selector()))
        .await
        .map_err(|failure| kube_failure("cannot list sandboxes", failure))?;
    let mut running: Vec<SandboxView> = pods
        .items
        .iter()
        .filter_map(objects::sandbox_of)
        .filter(|sandbox| sandbox.live == Liveness::Running)
        .collect();
    running.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(running)
}

/// A running sandbox and its pod.
async fn sandbox(state: &KubeState, id: &str) -> Result<(SandboxView, Pod), Response> {
    let pod = state
        .pods
        .get_opt(&objects::pod_name(id))
        .await
        .map_err(|failure| kube_failure("cannot read the sandbox", failure))?
        .ok_or_else(|| not_found(id))?;
    match objects::sandbox_of(&pod) {
        Some(view) if view.live == Liveness::Running => Ok((view, pod)),
        _ => Err(not_found(id)),
    }
}

async fn token_of(state: &KubeState, id: &str) -> Result<Option<String>, Response> {
    let secret = state
        .secrets
        .get_opt(&objects::pod_name(id))
        .await
        .map_err(|failure| kube_failure("cannot read the access token", failure))?;
    Ok(secret
        .and_then(|secret| secret.data)
        .and_then(|mut data| data.remove(objects::TOKEN_KEY))
        .and_then(|bytes| String::from_utf8(bytes.0).ok()))
}

fn detail(sandbox: &SandboxView, token: Option<String>) -> SandboxDetail {
    SandboxDetail {
        sandbox_id: sandbox.id.clone(),
        template_id: sandbox.template_id.clone(),
        client_id: CLIENT_ID.into(),
        alias: sandbox.alias.clone(),
        started_at: sandbox.started_at.to_string(),
        end_at: sandbox.end_at.to_string(),
        cpu_count: sandbox.cpu_count,
        memory_mb: sandbox.memory_mb,
        disk_size_mb: 0,
        state: SandboxState::Running,
        envd_version: ENVD_VERSION.into(),
        envd_access_token: token,
        domain: None,
        metadata: Some(sandbox.metadata.clone()),
    }
}

async fn get_sandbox(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    let found = async {
        let (view, _) = sandbox(&state, &id).await?;
        let token = token_of(&state, &id).await?;
        Ok::<_, Response>(Json(detail(&view, token)).into_response())
    };
    found.await.unwrap_or_else(|response| response)
}

async fn kill(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    match sandbox(&state, &id).await {
        Ok((_, pod)) => {
            delete_pod(&state, &pod).await;
            state.routes.forget(&id);
            tracing::info!(sandbox = %id, "sandbox killed");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(response) => response,
    }
}

async fn write_end(state: &KubeState, id: &str, end: jiff::Timestamp) -> Result<(), Response> {
    let patch = json!({"metadata": {"annotations": {objects::END_AT: end.to_string()}}});
    state
        .pods
        .patch(
            &objects::pod_name(id),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|failure| kube_failure("cannot record the sandbox's end", failure))
}

async fn set_timeout(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Body400(body): Body400<TimeoutRequest>,
) -> Response {
    let outcome = async {
        let timeout = timeout_within(state.config.max_timeout, body.timeout)?;
        sandbox(&state, &id).await?;
        write_end(&state, &id, deadline(timeout)).await
    };
    match outcome.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct RefreshRequest {
    #[serde(default)]
    duration: i64,
}

async fn refresh(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Body400(body): Body400<RefreshRequest>,
) -> Response {
    if !(0..=3600).contains(&body.duration) {
        return error(
            StatusCode::BAD_REQUEST,
            "duration must be between 0 and 3600 seconds",
        );
    }
    let outcome = async {
        let (view, _) = sandbox(&state, &id).await?;
        let end = view
            .end_at
            .max(deadline(Duration::from_secs(body.duration as u64)));
        write_end(&state, &id, end).await
    };
    match outcome.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}

/// Connect only ever extends the sandbox's life, never shortens it.
async fn connect(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Body400(body): Body400<ConnectRequest>,
) -> Response {
    let outcome = async {
        let timeout = timeout_within(
            state.config.max_timeout,
            body.timeout.unwrap_or(DEFAULT_TIMEOUT_V2),
        )?;
        let (view, _) = sandbox(&state, &id).await?;
        let end = view.end_at.max(deadline(timeout));
        if end > view.end_at {
            write_end(&state, &id, end).await?;
        }
        Ok::<_, Response>(Sandbox {
            sandbox_id: view.id.clone(),
            template_id: view.template_id.clone(),
            client_id: CLIENT_ID.into(),
            envd_version: ENVD_VERSION.into(),
            alias: view.alias.clone(),
            envd_access_token: token_of(&state, &id).await?,
            traffic_access_token: None,
            domain: None,
        })
    };
    match outcome.await {
        Ok(sandbox) => Json(sandbox).into_response(),
        Err(response) => response,
    }
}

async fn list_v1(Extract(state): Extract<Shared>, Query(query): Query<ListQuery>) -> Response {
    match matching(&state, &query).await {
        Ok(found) => Json(
            found
                .iter()
                .map(|sandbox| detail(sandbox, None))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(response) => response,
    }
}

async fn list_v2(Extract(state): Extract<Shared>, Query(query): Query<ListQuery>) -> Response {
    match matching(&state, &query).await {
        Ok(found) => list_page(
            &query,
            found
                .iter()
                .map(|sandbox| Listed {
                    started_at: sandbox.started_at,
                    detail: detail(sandbox, None),
                })
                .collect(),
        ),
        Err(response) => response,
    }
}

async fn matching(state: &KubeState, query: &ListQuery) -> Result<Vec<SandboxView>, Response> {
    let filter = metadata_filter(query)?;
    Ok(sandboxes(state)
        .await?
        .into_iter()
        .filter(|sandbox| {
            filter
                .iter()
                .all(|(key, value)| sandbox.metadata.get(key) == Some(value))
        })
        .collect())
}

// ---------------------------------------------------------------------------------------
// Templates

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Records the `base` template, or points it at the configured image.
pub(crate) async fn ensure_base_template(state: &KubeState) -> Result<(), kube::Error> {
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

async fn find_template(state: &KubeState, reference: &str) -> Result<Option<Template>, Response> {
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
async fn request_build(
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

/// What a build makes of its template, or the step it fails at. Images are used as they
/// are: ENV, ARG, WORKDIR and USER steps change how sandboxes start, while steps that
/// would change the image (RUN, COPY) need an image builder this runtime does not have.
fn apply_build(
    template: &mut Template,
    parent_image: String,
    request: &TemplateBuildStart,
) -> Result<(), (u32, String)> {
    let mut env = BTreeMap::new();
    let (mut workdir, mut user) = (None, None);
    for (index, step) in request.steps.iter().enumerate() {
        let number = index as u32 + 1;
        match step.kind.to_ascii_uppercase().as_str() {
            "ENV" => {
                for pair in step.args.chunks(2) {
                    env.insert(pair[0].clone(), pair[1].clone());
                }
            }
            "ARG" => {}
            "WORKDIR" => workdir = step.args.first().cloned(),
            "USER" => user = step.args.first().cloned(),
            other => {
                return Err((
                    number,
                    format!(
                        "{other} steps change the image, and the kubernetes runtime has no image builder: build the image elsewhere and use fromImage"
                    ),
                ));
            }
        }
    }
    template.image = Some(parent_image);
    template.env = env;
    template.workdir = workdir;
    template.user = user;
    template.start_cmd = request.start_cmd.clone();
    template.ready_cmd = request.ready_cmd.clone();
    Ok(())
}

async fn start_build(
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
    let parent_image = match (&body.from_image, &body.from_template) {
        (Some(image), _) => image.clone(),
        (None, Some(parent)) => match find_template(&state, parent).await {
            Ok(Some(Template {
                image: Some(image), ..
            })) => image,
            Ok(_) => {
                return template_error(TemplateError::Invalid(format!(
                    "template '{parent}' to build from was not found"
                )));
            }
            Err(response) => return response,
        },
        (None, None) => unreachable!("checked above"),
    };
    let (existing, mut template) = match find_template_object(&state, &id).await {
        Ok(Some(found)) => found,
        Ok(None) => return template_error(TemplateError::NotFound(id)),
        Err(response) => return response,
    };
    let mut candidate = template.clone();
    let outcome = apply_build(&mut candidate, parent_image, &body);
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
    let entry = |level: &str, message: String, step: Option<u32>| BuildLogEntry {
        timestamp: now(),
        level: level.into(),
        message,
        step: step.map(|step| step.to_string()),
    };
    build.updated_at = now();
    match outcome {
        Ok(()) => {
            build.status = BuildStatus::Ready;
            build.logs.push(entry(
                "info",
                format!(
                    "Using image {}",
                    candidate.image.clone().unwrap_or_default()
                ),
                None,
            ));
            build
                .logs
                .push(entry("info", "Build finished".into(), None));
            let builds = std::mem::take(&mut template.builds);
            template = Template {
                builds,
                ..candidate
            };
        }
        Err((step, message)) => {
            let line = entry("error", message.clone(), Some(step));
            build.status = BuildStatus::Error;
            build.logs.push(line.clone());
            build.reason = Some(BuildStatusReason {
                message,
                step: Some(step.to_string()),
                log_entries: vec![line],
            });
        }
    }
    template.updated_at = now();
    match save_template(&state, Some(&existing), &template).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(failure) => kube_failure("cannot record the build", failure),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    #[serde(default)]
    logs_offset: usize,
    limit: Option<usize>,
}

async fn build_status(
    Extract(state): Extract<Shared>,
    Path((id, build_id)): Path<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let template = match find_template(&state, &id).await {
        Ok(Some(template)) => template,
        Ok(None) => return template_error(TemplateError::NotFound(id)),
        Err(response) => return response,
    };
    let Some(build) = template.builds.iter().find(|build| build.id == build_id) else {
        return template_error(TemplateError::BuildNotFound(build_id));
    };
    Json(TemplateBuildInfo {
        template_id: template.id.clone(),
        build_id: build.id.clone(),
        status: build.status,
        logs: Vec::new(),
        log_entries: build
            .logs
            .iter()
            .skip(query.logs_offset)
            .take(query.limit.unwrap_or(100).clamp(1, 100))
            .cloned()
            .collect(),
        reason: build.reason.clone(),
    })
    .into_response()
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

async fn list_templates(Extract(state): Extract<Shared>) -> Response {
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

async fn get_template(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
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

async fn get_alias(Extract(state): Extract<Shared>, Path(alias): Path<String>) -> Response {
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
async fn delete_template(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
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
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            template_error(TemplateError::NotFound(id))
        }
        Err(failure) => kube_failure("cannot delete the template", failure),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcastle_e2b::models::TemplateStep;

    fn step(kind: &str, args: &[&str]) -> TemplateStep {
        TemplateStep {
            kind: kind.into(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            files_hash: None,
            force: false,
        }
    }

    #[test]
    fn settings_steps_apply_and_image_steps_fail_at_their_number() {
        let mut template = Template::default();
        let request = TemplateBuildStart {
            from_image: Some("registry.local/base:1".into()),
            steps: vec![
                step("ENV", &["MODE", "strict", "LEVEL", "2"]),
                step("WORKDIR", &["/work"]),
                step("USER", &["root"]),
            ],
            ..TemplateBuildStart::default()
        };
        apply_build(&mut template, "registry.local/base:1".into(), &request).unwrap();
        assert_eq!(template.image.as_deref(), Some("registry.local/base:1"));
        assert_eq!(template.env["LEVEL"], "2");
        assert_eq!(template.workdir.as_deref(), Some("/work"));
        assert_eq!(template.user.as_deref(), Some("root"));

        let mut request = request;
        request.steps.push(step("RUN", &["make"]));
        let (at, message) =
            apply_build(&mut Template::default(), "x".into(), &request).unwrap_err();
        assert_eq!(at, 4);
        assert!(message.contains("RUN"), "{message}");
    }
}
