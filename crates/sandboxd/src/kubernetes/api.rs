//! The control-plane REST API of the kubernetes runtime: the same routes, status codes
//! and bodies as the local runtime's, answered from the cluster's objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as Extract};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::json;

use super::objects::{self, Liveness, PodPlan, SandboxView, Template};
use super::templates::{self, find_template};
use super::{KubeState, delete_pod};
use crate::api::{
    Body400, DEFAULT_TIMEOUT_V1, DEFAULT_TIMEOUT_V2, ListQuery, Listed, authenticated, deadline,
    error, list_page, metadata_filter, not_found, timeout_within,
};
use crate::{random_id, random_token};
use sandcastle_e2b::envd::{ENVD_PORT, ENVD_VERSION, InitRequest};
use sandcastle_e2b::models::{
    CLIENT_ID, ConnectRequest, NewSandbox, Sandbox, SandboxDetail, SandboxState, TimeoutRequest,
};

type Shared = Arc<KubeState>;

/// How long a sandbox's create waits for its template's ready command.
const READY_WAIT: Duration = Duration::from_secs(60);

pub fn router(state: Shared) -> Router {
    let authenticated = Router::new()
        .route("/sandboxes", post(create_v1).get(list_v1))
        .route("/v2/sandboxes", post(create_v2).get(list_v2))
        .route("/sandboxes/{id}/pause", post(refuse_pause))
        .route("/sandboxes/{id}/resume", post(refuse_pause))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/sandboxes/metrics", get(batch_metrics))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/v3/templates", post(templates::request_build))
        .route("/templates", get(templates::list_templates))
        .route("/v2/templates", get(templates::list_templates))
        .route(
            "/templates/{id}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route("/templates/aliases/{alias}", get(templates::get_alias))
        .route(
            "/v2/templates/{id}/builds/{build}",
            post(templates::start_build),
        )
        .route(
            "/templates/{id}/builds/{build}/status",
            get(templates::build_status),
        )
        .route("/templates/{id}/files/{hash}", get(templates::upload_link))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        // Upload links stand in for a bucket's presigned URLs: their token is the check.
        .route("/uploads/{id}/{hash}", put(templates::upload))
        .route("/health", get(|| async { "Health check successful" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

async fn authenticate(Extract(state): Extract<Shared>, request: Request, next: Next) -> Response {
    authenticated(state.config.api_key.as_deref(), request, next).await
}

pub(super) fn kube_failure(what: &str, failure: kube::Error) -> Response {
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
    if body.auto_pause == Some(true) {
        // Pausing at the timeout would be a kill that the client believes kept its state.
        return Err(error(
            StatusCode::NOT_IMPLEMENTED,
            "lifecycle onTimeout: pause (autoPause) is not supported by the kubernetes runtime: a pod cannot be paused with its state kept; use onTimeout: kill with a longer timeout, or the local runtime",
        ));
    }
    let env_vars = body.env_vars.clone().unwrap_or_default();
    if let Some(name) = env_vars.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid environment variable name {name:?}"),
        ));
    }
    let egress = objects::Egress::of(body.allow_internet_access, body.network.as_ref())
        .map_err(|message| error(StatusCode::BAD_REQUEST, message))?;
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
    let started = start(state, &created, &template, token.clone(), env_vars, &egress).await;
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
    egress: &objects::Egress,
) -> Result<(), Response> {
    let refused = |what: &'static str| move |failure| kube_failure(what, failure);
    if let Some(token) = &token {
        state
            .secrets
            .create(&PostParams::default(), &objects::token_secret(pod, token))
            .await
            .map_err(refused("cannot store the access token"))?;
    }
    state
        .policies
        .create(
            &PostParams::default(),
            &objects::network_policy(&state.config, pod, egress),
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
pub(super) async fn sandboxes(state: &KubeState) -> Result<Vec<SandboxView>, Response> {
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

/// A pod cannot be paused with its processes kept, and a stopped pod loses its
/// filesystem, so pause is refused rather than pretended: 501, with what to do instead.
async fn refuse_pause(Extract(state): Extract<Shared>, Path(id): Path<String>) -> Response {
    if let Err(response) = sandbox(&state, &id).await {
        return response;
    }
    error(
        StatusCode::NOT_IMPLEMENTED,
        "pause and resume are not supported by the kubernetes runtime: a pod's processes cannot be frozen into a snapshot and a stopped pod keeps no filesystem; extend the sandbox's timeout instead, or use the local runtime, which freezes processes in memory",
    )
}

/// envd's reading of the sandbox's container, now: a pod keeps no history of samples.
async fn envd_metrics(
    state: &KubeState,
    id: &str,
) -> Result<crate::metrics::EnvdMetrics, Response> {
    sandbox(state, id).await?;
    let token = token_of(state, id).await?;
    let ip = super::proxy::envd_address(state, id)
        .await
        .ok_or_else(|| not_found(id))?;
    let mut request = state
        .envd
        .get(format!("http://{ip}:{ENVD_PORT}/metrics"))
        .header("E2b-Sandbox-Id", id);
    if let Some(token) = token {
        request = request.header("X-Access-Token", token);
    }
    let unavailable = |failure: String| {
        error(
            StatusCode::BAD_GATEWAY,
            format!("cannot read the sandbox's metrics from its envd: {failure}"),
        )
    };
    let answer = request
        .send()
        .await
        .map_err(|failure| unavailable(failure.to_string()))?;
    if !answer.status().is_success() {
        return Err(unavailable(format!("envd answered {}", answer.status())));
    }
    answer
        .json()
        .await
        .map_err(|failure| unavailable(failure.to_string()))
}

#[derive(serde::Deserialize)]
struct MetricsQuery {
    end: Option<i64>,
}

async fn sandbox_metrics(
    Extract(state): Extract<Shared>,
    Path(id): Path<String>,
    Query(query): Query<MetricsQuery>,
) -> Response {
    if query
        .end
        .is_some_and(|end| end < jiff::Timestamp::now().as_second())
    {
        return Json(Vec::<crate::metrics::SandboxMetric>::new()).into_response();
    }
    match envd_metrics(&state, &id).await {
        Ok(metrics) => Json(vec![metrics.into_metric()]).into_response(),
        Err(response) => response,
    }
}

async fn batch_metrics(
    Extract(state): Extract<Shared>,
    Query(query): Query<crate::api::BatchMetricsQuery>,
) -> Response {
    let ids = match query.ids() {
        Ok(ids) => ids,
        Err(response) => return response,
    };
    let readings = futures::future::join_all(ids.iter().map(|id| envd_metrics(&state, id))).await;
    let latest: std::collections::BTreeMap<&String, crate::metrics::SandboxMetric> = ids
        .iter()
        .zip(readings)
        .filter_map(|(id, reading)| Some((id, reading.ok()?.into_metric())))
        .collect();
    Json(serde_json::json!({ "sandboxes": latest })).into_response()
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
