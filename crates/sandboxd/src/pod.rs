//! envd inside a sandbox pod of the kubernetes runtime: the same envd the local runtime
//! serves, for exactly one sandbox whose filesystem is the container's own. It starts
//! knowing only its sandbox's id; the server hands it the sandbox's variables and access
//! token through `POST /init` once the pod runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::State as Extract;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sandcastle_e2b::envd::InitRequest;
use tokio::sync::watch;

use super::runtime::{self, DEFAULT_USER, Launcher};
use super::{Config, Error, SandboxRecord, State, templates};

pub struct PodEnvdConfig {
    pub listen: SocketAddr,
    /// The id the server gave the sandbox: requests naming another are refused, so a
    /// misrouted call fails rather than acting on the wrong sandbox.
    pub sandbox_id: String,
    pub max_body_bytes: usize,
}

struct Pod {
    state: Arc<State>,
    sandbox_id: String,
}

/// Serves envd until `shutdown` resolves, then kills the sandbox's processes.
pub async fn serve_pod_envd(
    config: PodEnvdConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = super::bind(config.listen.ip(), config.listen.port()).await?;
    let uid = nix::unistd::geteuid().as_raw();
    let (stop, stopping) = watch::channel(false);
    let mut server_config = Config::new(PathBuf::new());
    server_config.max_body_bytes = config.max_body_bytes;
    server_config.max_sandboxes = 1;
    let state = Arc::new(State {
        cgroups: None,
        config: server_config,
        stopping: stopping.clone(),
        api_url: String::new(),
        launcher: Launcher::Container { uid },
        #[cfg(feature = "faults")]
        faults: super::Faults::default(),
        sandboxes: Mutex::default(),
        history: Mutex::default(),
        templates: templates::Registry::empty(),
        upload_secret: super::random_token(32),
    });
    let pod = Arc::new(Pod {
        state: state.clone(),
        sandbox_id: config.sandbox_id.clone(),
    });
    let router = super::envd::router(state.clone())
        .merge(Router::new().route("/init", post(init)).with_state(pod));
    tracing::info!(listen = %config.listen, sandbox = %config.sandbox_id, uid, "envd listening");
    let server = super::serve(listener, router, stopping);
    shutdown.await;
    let _ = stop.send(true);
    let _ = server.await;
    state.kill_sandbox(&config.sandbox_id).await;
    Ok(())
}

/// The first call sets the sandbox up; a later one must present the token the first set,
/// and changes nothing: a pod's sandbox is set up once, by the server that made it.
async fn init(
    Extract(pod): Extract<Arc<Pod>>,
    headers: HeaderMap,
    Json(request): Json<InitRequest>,
) -> Response {
    if let Some(existing) = pod.state.sandbox(&pod.sandbox_id) {
        let presented = headers
            .get("x-access-token")
            .and_then(|value| value.to_str().ok());
        return match &existing.access_token {
            Some(token) if presented != Some(token.as_str()) => {
                (StatusCode::UNAUTHORIZED, "invalid access token").into_response()
            }
            _ => StatusCode::NO_CONTENT.into_response(),
        };
    }
    let default_user = match request.default_user.as_deref() {
        None => DEFAULT_USER,
        Some(name) => match runtime::user(name) {
            Some(user) => user,
            None => {
                return (StatusCode::BAD_REQUEST, format!("no user named {name:?}"))
                    .into_response();
            }
        },
    };
    let record = Arc::new(SandboxRecord {
        id: pod.sandbox_id.clone(),
        template_id: String::new(),
        alias: None,
        started_at: jiff::Timestamp::now(),
        // The server that made the pod ends it; envd itself never times it out.
        end_at: Mutex::new(jiff::Timestamp::MAX),
        metadata: Default::default(),
        env_vars: request.env_vars,
        access_token: request.access_token,
        default_user,
        default_workdir: request.default_workdir,
        cpu_count: 0,
        memory_mb: 0,
        fs: PathBuf::from("/"),
        dir: None,
        processes: Arc::new(runtime::ProcessTable::counting_oom(Some(
            runtime::OomCounter::Container(PathBuf::from("/sys/fs/cgroup")),
        ))),
        watchers: Default::default(),
        group: None,
        lifecycle: Default::default(),
        paused: Mutex::new(None),
        samples: Mutex::default(),
    });
    match pod.state.add_sandbox(record) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => StatusCode::CONFLICT.into_response(),
    }
}
