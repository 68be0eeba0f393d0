//! envd traffic for every sandbox on one listener, routed by the `E2b-Sandbox-Id` header
//! (or a `<port>-<sandboxId>.` host) to the sandbox pod's envd. Bodies stream through in
//! both directions: process output and uploads are never held whole.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

use super::KubeState;
use super::objects::{self, Liveness};
use crate::envd::{sandbox_id, sandbox_not_found};
use sandcastle_e2b::envd::ENVD_PORT;

/// How long a sandbox's address is trusted without asking the apiserver again. A pod's IP
/// never changes; what this bounds is noticing a sandbox that was killed elsewhere.
const ROUTE_TTL: Duration = Duration::from_secs(2);

/// Pod addresses by sandbox id, recently looked up.
#[derive(Default)]
pub(crate) struct Routes(Mutex<HashMap<String, (String, Instant)>>);

impl Routes {
    fn get(&self, id: &str) -> Option<String> {
        let routes = self.0.lock().expect("routes");
        routes
            .get(id)
            .filter(|(_, at)| at.elapsed() < ROUTE_TTL)
            .map(|(ip, _)| ip.clone())
    }

    fn put(&self, id: &str, ip: &str) {
        let mut routes = self.0.lock().expect("routes");
        routes.retain(|_, (_, at)| at.elapsed() < ROUTE_TTL);
        routes.insert(id.to_string(), (ip.to_string(), Instant::now()));
    }

    pub(crate) fn forget(&self, id: &str) {
        self.0.lock().expect("routes").remove(id);
    }
}

pub fn router(state: Arc<KubeState>) -> Router {
    Router::new().fallback(forward).with_state(state)
}

/// The envd address of a running sandbox.
pub(crate) async fn envd_address(state: &KubeState, id: &str) -> Option<String> {
    if let Some(ip) = state.routes.get(id) {
        return Some(ip);
    }
    let pod = state
        .pods
        .get_opt(&objects::pod_name(id))
        .await
        .ok()
        .flatten()?;
    let sandbox = objects::sandbox_of(&pod)?;
    match (sandbox.live, sandbox.ip) {
        (Liveness::Running, Some(ip)) => {
            state.routes.put(id, &ip);
            Some(ip)
        }
        _ => None,
    }
}

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::HOST,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

async fn forward(Extract(state): Extract<Arc<KubeState>>, request: Request) -> Response {
    let id = sandbox_id(request.headers()).unwrap_or_default();
    let Some(ip) = envd_address(&state, &id).await else {
        return sandbox_not_found(&id);
    };
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let url = format!("http://{ip}:{ENVD_PORT}{path}");
    let mut outbound = state.envd.request(parts.method, url);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(name) {
            outbound = outbound.header(name, value);
        }
    }
    let outbound = outbound.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    match outbound.send().await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if !HOP_BY_HOP.contains(name) {
                    response = response.header(name, value);
                }
            }
            let stream = answer.bytes_stream().map_err(std::io::Error::other);
            response
                .body(Body::from_stream(stream))
                .unwrap_or_else(|error| {
                    (
                        axum::http::StatusCode::BAD_GATEWAY,
                        format!("cannot relay envd's answer: {error}"),
                    )
                        .into_response()
                })
        }
        Err(error) => {
            // The pod may have gone since its address was cached.
            state.routes.forget(&id);
            tracing::debug!(sandbox = %id, %error, "envd unreachable");
            sandbox_not_found(&id)
        }
    }
}
