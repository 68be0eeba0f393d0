//! The control-plane REST API of the embedded server, answering with the real service's
//! status codes and `{code, message}` error bodies.

// Helpers return the finished error response so handlers can `?` or match on it; the
// size of `Response` costs nothing on these paths.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State as Extract};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use futures::TryStreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::runtime::{self, Launch, OomCounter, ProcessTable};
use super::templates::{self, TemplateError, TemplateRecord};
use super::{Lifecycle, SandboxRecord, State, metrics, random_id, random_token};
use sandcastle_e2b::envd::ENVD_VERSION;
use sandcastle_e2b::models::{
    ApiError, CLIENT_ID, ConnectRequest, FileUploadLink, NewSandbox, Sandbox, SandboxDetail,
    TemplateAlias, TemplateBuildRequest, TemplateBuildRequested, TemplateBuildStart,
    TimeoutRequest,
};

/// The real service's default when a v1 create leaves `timeout` out.
pub(crate) const DEFAULT_TIMEOUT_V1: i64 = 15;
pub(crate) const DEFAULT_TIMEOUT_V2: i64 = 300;
pub(crate) const MAX_LIST_PAGE: usize = 100;
/// How long a sandbox's create waits for its template's ready command.
const READY_WAIT: Duration = Duration::from_secs(60);

type Shared = Arc<State>;

pub fn router(state: Shared) -> Router {
    let authenticated = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/sandboxes/metrics", get(batch_metrics))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/v3/templates", post(request_build))
        .route("/templates", get(list_templates))
        .route("/v2/templates", get(list_templates))
        .route("/templates/{id}", get(get_template).delete(delete_template))
        .route("/templates/aliases/{alias}", get(get_alias))
        .route("/templates/{id}/files/{hash}", get(upload_link))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(build_status))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let router = Router::new()
        .merge(authenticated)
        .route("/health", get(|| async { "Health check successful" }))
        .route("/uploads/{id}/{hash}", put(upload))
        .route(
            "/uploads/{id}/{hash}",
            delete(|| async { StatusCode::METHOD_NOT_ALLOWED }),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    #[cfg(feature = "faults")]
    let router = router.layer(middleware::from_fn_with_state(
        state.clone(),
        super::faults::inject_api,
    ));
    router.with_state(state)
}

pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ApiError {
        code: status.as_u16(),
        message: message.into(),
        error_code: None,
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for TemplateError {
    fn into_response(self) -> Response {
        let status = match &self {
            TemplateError::NotFound(_) | TemplateError::BuildNotFound(_) => StatusCode::NOT_FOUND,
            TemplateError::Invalid(_) => StatusCode::BAD_REQUEST,
            TemplateError::Public(_) => StatusCode::FORBIDDEN,
            TemplateError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

/// JSON bodies whose rejections read like the service's 400s rather than axum's text.
pub struct Body400<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body400<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body400(value)),
            Err(JsonRejection::BytesRejection(rejection)) => {
                Err(error(rejection.status(), rejection.body_text()))
            }
            Err(rejection) => Err(error(StatusCode::BAD_REQUEST, rejection.body_text())),
        }
    }
}

async fn authenticate(Extract(state): Extract<Shared>, request: Request, next: Next) -> Response {
    authenticated(state.config.api_key.as_deref(), request, next).await
}

/// Lets the request through when its `X-API-Key` is `expected` (any non-empty key when
/// the server names none); otherwise the service's 401.
pub(crate) async fn authenticated(
    expected: Option<&str>,
    request: Request,
    next: Next,
) -> Response {
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let accepted = match expected {
        Some(expected) => constant_time_eq(key.as_bytes(), expected.as_bytes()),
        None => !key.is_empty(),
    };
    if accepted {
        next.run(request).await
    } else {
        error(StatusCode::UNAUTHORIZED, "Invalid API key")
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Marks a create whose sandbox is to vanish this long after it starts.
#[derive(Clone, Copy)]
pub(crate) struct Doomed(pub(crate) Duration);

// ---------------------------------------------------------------------------------------
// Sandboxes

async fn create_v1(
    Extract(state): Extract<Shared>,
    doomed: Option<Extension<Doomed>>,
    Body400(body): Body400<NewSandbox>,
) -> Response {
    let secure = body.secure.unwrap_or(false);
    create(state, body, DEFAULT_TIMEOUT_V1, secure, doomed).await
}

/// v2 sandboxes are always secured, whatever `secure` says.
async fn create_v2(
    Extract(state): Extract<Shared>,
    doomed: Option<Extension<Doomed>>,
    Body400(body): Body400<NewSandbox>,
) -> Response {
    create(state, body, DEFAULT_TIMEOUT_V2, true, doomed).await
}

fn checked_timeout(state: &State, timeout: i64) -> Result<Duration, Response> {
    timeout_within(state.config.max_timeout, timeout)
}

pub(crate) fn timeout_within(max: Duration, timeout: i64) -> Result<Duration, Response> {
    if timeout < 0 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Timeout must not be negative",
        ));
    }
    if timeout as u64 > max.as_secs() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "Timeout cannot be greater than {} hours",
                max.as_secs() / 3600
            ),
        ));
    }
    Ok(Duration::from_secs(timeout as u64))
}

pub(crate) fn deadline(timeout: Duration) -> jiff::Timestamp {
    jiff::Timestamp::now()
        + jiff::SignedDuration::try_from(timeout).unwrap_or(jiff::SignedDuration::ZERO)
}

async fn create(
    state: Shared,
    body: NewSandbox,
    default_timeout: i64,
    secure: bool,
    doomed: Option<Extension<Doomed>>,
) -> Response {
    let vanish = doomed.map(|Extension(Doomed(after))| after);
    match create_sandbox(&state, body, default_timeout, secure, vanish).await {
        Ok(sandbox) => (StatusCode::CREATED, Json(sandbox)).into_response(),
        Err(response) => response,
    }
}

async fn create_sandbox(
    state: &Shared,
    body: NewSandbox,
    default_timeout: i64,
    secure: bool,
    vanish: Option<Duration>,
) -> Result<Sandbox, Response> {
    let timeout = checked_timeout(
        state,
        body.timeout.filter(|t| *t != 0).unwrap_or(default_timeout),
    )?;
    if body.template_id.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "templateID is required"));
    }
    if let Some(name) = body
        .env_vars
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| k.is_empty() || k.contains('='))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid environment variable name {name:?}"),
        ));
    }
    let ready = state
        .templates
        .ready(&body.template_id)
        .map_err(|failure| match failure {
            TemplateError::NotFound(_) => error(
                StatusCode::NOT_FOUND,
                format!("template '{}' not found", body.template_id),
            ),
            other => other.into_response(),
        })?;
    let id = random_id(20);
    let dir = state.config.root.join("sandboxes").join(&id);
    let group = match &state.cgroups {
        Some(cgroups) => match cgroups.create(&id, ready.cpu_count, ready.memory_mb) {
            Ok(group) => Some(Arc::new(group)),
            Err(failure) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot make the sandbox's cgroup: {failure}"),
                ));
            }
        },
        None => None,
    };
    let mut env_vars = ready.runtime.env.clone();
    env_vars.extend(body.env_vars.clone().unwrap_or_default());
    let record = Arc::new(SandboxRecord {
        id: id.clone(),
        template_id: ready.template_id.clone(),
        alias: ready.alias.clone(),
        started_at: jiff::Timestamp::now(),
        end_at: Mutex::new(deadline(timeout)),
        metadata: body.metadata.clone().unwrap_or_default(),
        env_vars,
        access_token: secure.then(|| random_token(40)),
        default_user: templates::default_user(&ready.runtime),
        default_workdir: ready.runtime.workdir.clone(),
        cpu_count: ready.cpu_count,
        memory_mb: ready.memory_mb,
        fs: dir.join("fs"),
        dir: Some(dir.clone()),
        processes: Arc::new(ProcessTable::counting_oom(
            group.clone().map(OomCounter::Group),
        )),
        watchers: Default::default(),
        group,
        lifecycle: Lifecycle {
            pause_on_timeout: body.auto_pause.unwrap_or(false),
            pause_keeps_memory: body.auto_pause_memory.unwrap_or(true),
            auto_resume: body
                .auto_resume
                .as_ref()
                .is_some_and(|resume| resume.enabled),
        },
        paused: Mutex::new(None),
        samples: Mutex::default(),
    });
    if let Err(limit) = state.add_sandbox(record.clone()) {
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "you have reached the maximum number of concurrent E2B sandboxes ({limit}). If you need more, please contact support."
            ),
        ));
    }
    let prepare = {
        let (from, dir) = (ready.fs.clone(), dir.clone());
        move || -> std::io::Result<()> { templates::copy_tree(&from, &dir.join("fs")) }
    };
    let prepared = tokio::task::spawn_blocking(prepare)
        .await
        .map_err(std::io::Error::other);
    if let Err(failure) = prepared.and_then(|result| result) {
        state.kill_sandbox(&id).await;
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot prepare the sandbox: {failure}"),
        ));
    }
    if let Some(start) = &ready.runtime.start_cmd
        && let Err(failure) =
            start_template_command(state, &record, start, ready.runtime.ready_cmd.as_deref()).await
    {
        state.kill_sandbox(&id).await;
        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, failure));
    }
    #[cfg(feature = "faults")]
    super::faults::vanish_later(state, &id, vanish);
    #[cfg(not(feature = "faults"))]
    let _ = vanish;
    tracing::info!(sandbox = %id, template = %ready.template_id, "sandbox created");
    Ok(Sandbox {
        sandbox_id: id,
        template_id: ready.template_id,
        client_id: CLIENT_ID.into(),
        envd_version: ENVD_VERSION.into(),
        alias: ready.alias,
        envd_access_token: record.access_token.clone(),
        traffic_access_token: None,
        domain: None,
    })
}

/// Starts the template's start command (tag `startCmd`) and waits for its ready command.
async fn start_template_command(
    state: &Shared,
    sandbox: &Arc<SandboxRecord>,
    start: &str,
    ready: Option<&str>,
) -> Result<(), String> {
    let run = |command: &str, tag: Option<&str>| {
        let user = &sandbox.default_user;
        let cwd = sandbox
            .default_workdir
            .clone()
            .unwrap_or_else(|| user.home.to_string());
        let args = vec!["-l".to_string(), "-c".to_string(), command.to_string()];
        let fs = sandbox.fs();
        let launch = Launch {
            fs: &fs,
            user,
            cwd: &cwd,
            env: runtime::process_env(user, &sandbox.env_vars, &BTreeMap::new()),
            cmd: "/bin/bash",
            args: &args,
            stdin: false,
            terminal: false,
            group: sandbox.group.as_deref(),
        };
        let config = sandcastle_e2b::envd::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: args.clone(),
            envs: BTreeMap::new(),
            cwd: Some(cwd.clone()),
        };
        sandbox.processes.spawn(
            state.launcher.command(&launch)?,
            None,
            config,
            tag.map(str::to_string),
        )
    };
    run(start, Some("startCmd"))
        .map_err(|failure| format!("cannot run the start command: {failure}"))?;
    let Some(ready) = ready else { return Ok(()) };
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        let (_, mut events) = run(ready, None)
            .map_err(|failure| format!("cannot run the ready command: {failure}"))?;
        while let Some(event) = events.recv().await {
            if let sandcastle_e2b::envd::ProcessEvent::End(end) = event {
                if end.exit_code == 0 && end.exited {
                    return Ok(());
                }
                break;
            }
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

fn detail(sandbox: &SandboxRecord, with_token: bool) -> SandboxDetail {
    SandboxDetail {
        sandbox_id: sandbox.id.clone(),
        template_id: sandbox.template_id.clone(),
        client_id: CLIENT_ID.into(),
        alias: sandbox.alias.clone(),
        started_at: sandbox.started_at.to_string(),
        end_at: sandbox.end_at.lock().expect("end").to_string(),
        cpu_count: sandbox.cpu_count,
        memory_mb: sandbox.memory_mb,
        disk_size_mb: 0,
        state: sandbox.state(),
        envd_version: ENVD_VERSION.into(),
        envd_access_token: if with_token {
            sandbox.access_token.clone()
        } else {
            None
        },
        domain: None,
        metadata: Some(sandbox.metadata.clone()),
    }
}

pub(crate) fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("sandbox \"{id}\" doesn't exist or you don't have access to it"),
    )
}

async fn get_sandbox(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    match state.sandbox(&id) {
        Some(sandbox) => Json(detail(&sandbox, true)).into_response(),
        None => not_found(&id),
    }
}

async fn kill(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    if state.kill_sandbox(&id).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found(&id)
    }
}

async fn set_timeout(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Body400(body): Body400<TimeoutRequest>,
) -> Response {
    let timeout = match checked_timeout(&state, body.timeout) {
        Ok(timeout) => timeout,
        Err(response) => return response,
    };
    match state.sandbox(&id) {
        Some(sandbox) => {
            *sandbox.end_at.lock().expect("end") = deadline(timeout);
            StatusCode::NO_CONTENT.into_response()
        }
        None => not_found(&id),
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
    match state.sandbox(&id) {
        Some(sandbox) => {
            let mut end = sandbox.end_at.lock().expect("end");
            *end = (*end).max(deadline(Duration::from_secs(body.duration as u64)));
            StatusCode::NO_CONTENT.into_response()
        }
        None => not_found(&id),
    }
}

/// Connect only ever extends the sandbox's life, never shortens it.
async fn connect(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Body400(body): Body400<ConnectRequest>,
) -> Response {
    let timeout = match checked_timeout(&state, body.timeout.unwrap_or(DEFAULT_TIMEOUT_V2)) {
        Ok(timeout) => timeout,
        Err(response) => return response,
    };
    let Some(sandbox) = state.sandbox(&id) else {
        return not_found(&id);
    };
    let resumed = match sandbox.resume() {
        Ok(resumed) => resumed,
        Err(failure) => return error(StatusCode::INTERNAL_SERVER_ERROR, failure),
    };
    {
        let mut end = sandbox.end_at.lock().expect("end");
        *end = if resumed {
            deadline(timeout)
        } else {
            (*end).max(deadline(timeout))
        };
    }
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(created(&sandbox))).into_response()
}

#[derive(Deserialize, Default)]
struct PauseRequest {
    memory: Option<bool>,
}

/// Pauses with the processes frozen (the default, E2B's memory snapshot) or, with
/// `memory: false`, with only the files kept. 409 when already paused.
async fn pause(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    body: Option<Json<PauseRequest>>,
) -> Response {
    let memory = body.and_then(|Json(body)| body.memory).unwrap_or(true);
    let Some(sandbox) = state.sandbox(&id) else {
        return not_found(&id);
    };
    match sandbox.pause(memory) {
        Ok(true) => {
            tracing::info!(sandbox = %id, memory, "sandbox paused");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(
            StatusCode::CONFLICT,
            format!("sandbox \"{id}\" is already paused"),
        ),
        Err(failure) => error(StatusCode::BAD_REQUEST, failure),
    }
}

#[derive(Deserialize, Default)]
struct ResumeRequest {
    timeout: Option<i64>,
}

/// The deprecated resume: 409 when the sandbox runs.
async fn resume(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    body: Option<Json<ResumeRequest>>,
) -> Response {
    let timeout = body
        .and_then(|Json(body)| body.timeout)
        .unwrap_or(DEFAULT_TIMEOUT_V2);
    let timeout = match checked_timeout(&state, timeout) {
        Ok(timeout) => timeout,
        Err(response) => return response,
    };
    let Some(sandbox) = state.sandbox(&id) else {
        return not_found(&id);
    };
    match sandbox.resume() {
        Ok(true) => {
            *sandbox.end_at.lock().expect("end") = deadline(timeout);
            (StatusCode::CREATED, Json(created(&sandbox))).into_response()
        }
        Ok(false) => error(
            StatusCode::CONFLICT,
            format!("sandbox \"{id}\" is already running"),
        ),
        Err(failure) => error(StatusCode::INTERNAL_SERVER_ERROR, failure),
    }
}

fn created(sandbox: &SandboxRecord) -> Sandbox {
    Sandbox {
        sandbox_id: sandbox.id.clone(),
        template_id: sandbox.template_id.clone(),
        client_id: CLIENT_ID.into(),
        envd_version: ENVD_VERSION.into(),
        alias: sandbox.alias.clone(),
        envd_access_token: sandbox.access_token.clone(),
        traffic_access_token: None,
        domain: None,
    }
}

#[derive(Deserialize, Default)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

async fn sandbox_metrics(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Query(query): Query<MetricsQuery>,
) -> Response {
    let Some(sandbox) = state.sandbox(&id) else {
        return not_found(&id);
    };
    let series =
        tokio::task::spawn_blocking(move || metrics::series(&sandbox, query.start, query.end))
            .await
            .unwrap_or_default();
    Json(series).into_response()
}

#[derive(Deserialize)]
pub(crate) struct BatchMetricsQuery {
    sandbox_ids: String,
}

impl BatchMetricsQuery {
    /// The sandboxes named, 1 to 100 as E2B allows.
    pub(crate) fn ids(&self) -> Result<Vec<String>, Response> {
        let ids: Vec<String> = self
            .sandbox_ids
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect();
        if ids.is_empty() || ids.len() > 100 {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "sandbox_ids must name between 1 and 100 sandboxes",
            ));
        }
        Ok(ids)
    }
}

/// The latest metric of each named sandbox that exists; unknown ones are left out.
async fn batch_metrics(
    Extract(state): Extract<Shared>,
    Query(query): Query<BatchMetricsQuery>,
) -> Response {
    let ids = match query.ids() {
        Ok(ids) => ids,
        Err(response) => return response,
    };
    let sandboxes: Vec<_> = ids.iter().filter_map(|id| state.sandbox(id)).collect();
    let latest = tokio::task::spawn_blocking(move || {
        sandboxes
            .iter()
            .filter_map(|sandbox| {
                let metric = metrics::series(sandbox, None, None).pop()?;
                Some((sandbox.id.clone(), metric))
            })
            .collect::<BTreeMap<_, _>>()
    })
    .await
    .unwrap_or_default();
    Json(serde_json::json!({ "sandboxes": latest })).into_response()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListQuery {
    pub(crate) metadata: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

pub(crate) fn metadata_filter(query: &ListQuery) -> Result<Vec<(String, String)>, Response> {
    match &query.metadata {
        None => Ok(Vec::new()),
        // The SDK percent-encodes each key and value before joining them, so after the
        // query string's own decoding each still needs one more.
        Some(encoded) => {
            let invalid = || error(StatusCode::BAD_REQUEST, "invalid metadata query");
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(encoded).map_err(|_| invalid())?;
            pairs
                .into_iter()
                .map(|(key, value)| {
                    Ok((
                        percent_decode(&key).ok_or_else(invalid)?,
                        percent_decode(&value).ok_or_else(invalid)?,
                    ))
                })
                .collect()
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

fn matching(state: &State, filter: &[(String, String)]) -> Vec<Arc<SandboxRecord>> {
    let mut found: Vec<_> = state
        .sandboxes
        .lock()
        .expect("sandboxes")
        .values()
        .filter(|sandbox| {
            filter
                .iter()
                .all(|(key, value)| sandbox.metadata.get(key) == Some(value))
        })
        .cloned()
        .collect();
    found.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    found
}

async fn list_v1(Extract(state): Extract<Shared>, Query(query): Query<ListQuery>) -> Response {
    let filter = match metadata_filter(&query) {
        Ok(filter) => filter,
        Err(response) => return response,
    };
    let listed: Vec<_> = matching(&state, &filter)
        .iter()
        .map(|sandbox| detail(sandbox, false))
        .collect();
    Json(listed).into_response()
}

async fn list_v2(Extract(state): Extract<Shared>, Query(query): Query<ListQuery>) -> Response {
    let filter = match metadata_filter(&query) {
        Ok(filter) => filter,
        Err(response) => return response,
    };
    let listed = matching(&state, &filter)
        .iter()
        .map(|sandbox| Listed {
            started_at: sandbox.started_at,
            detail: detail(sandbox, false),
        })
        .collect();
    list_page(&query, listed)
}

/// A sandbox as a v2 list shows it.
pub(crate) struct Listed {
    pub(crate) started_at: jiff::Timestamp,
    pub(crate) detail: SandboxDetail,
}

/// One page of a v2 list of sandboxes ordered newest first. Pages are cut by a cursor
/// naming the last sandbox returned, so removals between pages neither repeat nor skip
/// entries.
pub(crate) fn list_page(query: &ListQuery, all: Vec<Listed>) -> Response {
    let limit = query.limit.unwrap_or(MAX_LIST_PAGE);
    if !(1..=MAX_LIST_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_LIST_PAGE}"),
        );
    }
    let states: Vec<&str> = query
        .state
        .as_deref()
        .map(|states| {
            states
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if let Some(unknown) = states.iter().find(|s| !["running", "paused"].contains(s)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid state {unknown:?}"),
        );
    }
    let total_running = all.len();
    let selected: Vec<_> = all
        .into_iter()
        .filter(|sandbox| states.is_empty() || states.contains(&sandbox.detail.state.as_str()))
        .collect();
    let start = match &query.next_token {
        None => 0,
        Some(token) => {
            let Some((nanos, id)) = token.split_once('-') else {
                return error(StatusCode::BAD_REQUEST, "invalid nextToken");
            };
            let Ok(nanos) = nanos.parse::<i128>() else {
                return error(StatusCode::BAD_REQUEST, "invalid nextToken");
            };
            selected
                .iter()
                .position(|sandbox| {
                    let at = sandbox.started_at.as_nanosecond();
                    at < nanos || (at == nanos && sandbox.detail.sandbox_id.as_str() > id)
                })
                .unwrap_or(selected.len())
        }
    };
    let page: Vec<_> = selected.iter().skip(start).take(limit).collect();
    let mut headers = HeaderMap::new();
    headers.insert("x-total-running", HeaderValue::from(total_running));
    if start + page.len() < selected.len()
        && let Some(last) = page.last()
        && let Ok(value) = HeaderValue::from_str(&format!(
            "{}-{}",
            last.started_at.as_nanosecond(),
            last.detail.sandbox_id
        ))
    {
        headers.insert("x-next-token", value);
    }
    let listed: Vec<_> = page.iter().map(|sandbox| &sandbox.detail).collect();
    (headers, Json(listed)).into_response()
}

// ---------------------------------------------------------------------------------------
// Templates

async fn request_build(
    Extract(state): Extract<Shared>,
    Body400(body): Body400<TemplateBuildRequest>,
) -> Response {
    match state.templates.request_build(&body) {
        Ok((record, build_id)) => (
            StatusCode::ACCEPTED,
            Json(TemplateBuildRequested {
                template_id: record.id.clone(),
                build_id,
                public: false,
                names: record.names.clone(),
                tags: vec!["default".into()],
                aliases: record.names,
            }),
        )
            .into_response(),
        Err(failure) => failure.into_response(),
    }
}

fn upload_signature(state: &State, template_id: &str, hash: &str) -> String {
    let digest = Sha256::digest(format!("{}:{template_id}:{hash}", state.upload_secret));
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(crate) fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn upload_link(
    Extract(state): Extract<Shared>,
    Path((id, hash)): Path<(String, String)>,
) -> Response {
    let Some(template_id) = state.templates.resolve(&id) else {
        return TemplateError::NotFound(id).into_response();
    };
    if !valid_hash(&hash) {
        return error(
            StatusCode::BAD_REQUEST,
            "files hash must be 64 hex characters",
        );
    }
    let present = state.templates.upload_path(&template_id, &hash).is_file();
    let url = (!present).then(|| {
        format!(
            "{}/uploads/{template_id}/{hash}?signature={}",
            state.api_url,
            upload_signature(&state, &template_id, &hash)
        )
    });
    (
        StatusCode::CREATED,
        Json(FileUploadLink {
            present,
            url,
            headers: None,
        }),
    )
        .into_response()
}

#[derive(Deserialize)]
struct UploadQuery {
    signature: String,
}

/// Stands in for the storage bucket's presigned URL: a signed link, a mandatory
/// `Content-Length`, the body streamed to disk.
async fn upload(
    Extract(state): Extract<Shared>,
    Path((id, hash)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !valid_hash(&hash)
        || !constant_time_eq(
            query.signature.as_bytes(),
            upload_signature(&state, &id, &hash).as_bytes(),
        )
    {
        return error(StatusCode::FORBIDDEN, "invalid upload signature");
    }
    if !headers.contains_key("content-length") {
        return error(StatusCode::LENGTH_REQUIRED, "Content-Length is required");
    }
    let path = state.templates.upload_path(&id, &hash);
    let temp = path.with_extension(format!("part-{}", random_id(8)));
    let written = async {
        tokio::fs::create_dir_all(path.parent().expect("upload dir")).await?;
        let mut file = tokio::fs::File::create(&temp).await?;
        let mut stream = body.into_data_stream().map_err(std::io::Error::other);
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        tokio::fs::rename(&temp, &path).await
    }
    .await;
    match written {
        Ok(()) => StatusCode::OK.into_response(),
        Err(failure) => {
            let _ = tokio::fs::remove_file(&temp).await;
            error(StatusCode::BAD_REQUEST, format!("upload failed: {failure}"))
        }
    }
}

async fn start_build(
    Extract(state): Extract<Shared>,
    Path((id, build)): Path<(String, String)>,
    Body400(body): Body400<TemplateBuildStart>,
) -> Response {
    let Some(template_id) = state.templates.resolve(&id) else {
        return TemplateError::NotFound(id).into_response();
    };
    match state
        .templates
        .start_build(&state, &template_id, &build, body)
    {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(failure) => failure.into_response(),
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
    Path((id, build)): Path<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let Some(template_id) = state.templates.resolve(&id) else {
        return TemplateError::NotFound(id).into_response();
    };
    match state.templates.build_info(
        &template_id,
        &build,
        query.logs_offset,
        query.limit.unwrap_or(100),
    ) {
        Ok(info) => Json(info).into_response(),
        Err(failure) => failure.into_response(),
    }
}

async fn list_templates(Extract(state): Extract<Shared>) -> Response {
    let listed: Vec<_> = state
        .templates
        .list()
        .iter()
        .map(templates::template_view)
        .collect();
    Json(listed).into_response()
}

fn with_builds(record: &TemplateRecord) -> serde_json::Value {
    let mut view =
        serde_json::to_value(templates::template_view(record)).expect("template serializes");
    let builds: Vec<_> = record
        .builds
        .iter()
        .map(|build| {
            serde_json::json!({
                "buildID": build.id,
                "status": build.status,
                "createdAt": build.created_at,
                "updatedAt": build.updated_at,
                "finishedAt": build.finished_at,
                "cpuCount": record.cpu_count,
                "memoryMB": record.memory_mb,
                "envdVersion": ENVD_VERSION,
            })
        })
        .collect();
    view["builds"] = serde_json::Value::Array(builds);
    view
}

async fn get_template(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    match state.templates.get(&id) {
        Some(record) => Json(with_builds(&record)).into_response(),
        None => TemplateError::NotFound(id).into_response(),
    }
}

async fn get_alias(Extract(state): Extract<Shared>, Path(alias): Path<String>) -> Response {
    match state.templates.get(&alias) {
        Some(record) => Json(TemplateAlias {
            template_id: record.id.clone(),
            public: record.id == templates::BASE_TEMPLATE,
        })
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("template alias '{alias}' not found"),
        ),
    }
}

/// 400 while any sandbox still runs from the template, like the real service.
async fn delete_template(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    let Some(template_id) = state.templates.resolve(&id) else {
        return TemplateError::NotFound(id).into_response();
    };
    let in_use = state
        .sandboxes
        .lock()
        .expect("sandboxes")
        .values()
        .filter(|sandbox| sandbox.template_id == template_id)
        .count();
    if in_use > 0 {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "cannot delete template '{template_id}' because there are {in_use} running or paused sandboxes using it"
            ),
        );
    }
    match state.templates.delete(&template_id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => failure.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_comparison_needs_an_exact_match() {
        assert!(constant_time_eq(b"e2b_key", b"e2b_key"));
        assert!(!constant_time_eq(b"e2b_key", b"e2b_kez"));
        assert!(!constant_time_eq(b"e2b_key", b"e2b_ke"));
    }

    #[test]
    fn metadata_values_are_decoded_once_more_like_the_sdk_encodes_them() {
        let query = ListQuery {
            metadata: Some("role=a%20b%26c%3Dd%2F%C3%A9&suite=x".into()),
            ..ListQuery::default()
        };
        let filter = metadata_filter(&query).unwrap();
        assert_eq!(
            filter,
            vec![
                ("role".into(), "a b&c=d/é".into()),
                ("suite".into(), "x".into())
            ]
        );
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn files_hashes_are_sha256_hex() {
        assert!(valid_hash(&"a".repeat(64)));
        assert!(!valid_hash(&"g".repeat(64)));
        assert!(!valid_hash("../../etc"));
    }
}
