//! The kubernetes runtime: each sandbox is a Pod, running this project's envd, in a
//! configured namespace. The server keeps nothing of its own: a sandbox's identity,
//! template, metadata and end time are on its Pod, its access token in a Secret the Pod
//! owns, and templates in ConfigMaps, so any number of replicas answer for any sandbox and
//! a restart loses nothing. envd traffic reaches the pods through the server, routed by
//! sandbox id like E2B's client proxy; envd itself checks the access token.

// Helpers return the finished error response so handlers can `?` or match on it.
#![allow(clippy::result_large_err)]

mod api;
mod build;
mod objects;
mod proxy;
mod templates;

pub use build::BuilderConfig;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Preconditions};
use tokio::sync::watch;

use super::Error;

/// How the kubernetes runtime makes sandboxes.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// Where sandbox pods, their Secrets and NetworkPolicies, and templates live.
    pub namespace: String,
    /// An image holding the static envd binary at `envd_path`: the init container of every
    /// sandbox pod copies it from there.
    pub envd_image: String,
    pub envd_path: String,
    /// The image of the `base` template.
    pub base_image: String,
    pub listen: IpAddr,
    pub api_port: u16,
    pub envd_port: u16,
    /// The only accepted `X-API-Key`; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    pub runtime_class: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    /// Kubernetes tolerations, as their JSON form.
    pub tolerations: Vec<serde_json::Value>,
    /// The labels of the server's own pods: the only ones a sandbox admits traffic from.
    pub server_labels: BTreeMap<String, String>,
    /// The server's namespace, when it is not the sandboxes'.
    pub server_namespace: Option<String>,
    /// Egress a sandbox with internet access is still denied: the cluster's networks and
    /// the cloud metadata address.
    pub denied_cidrs: Vec<String>,
    /// The share of a template's CPUs a sandbox requests; its limit is all of them. 1
    /// reserves what may be used; less lets sandboxes that mostly wait share cores.
    /// Memory is never overcommitted: its request is its limit.
    pub cpu_request_fraction: f64,
    pub max_timeout: Duration,
    pub max_sandboxes: usize,
    pub max_body_bytes: usize,
    /// How long a create waits for its pod to run and envd to answer.
    pub start_timeout: Duration,
    /// Builds with RUN or COPY steps; without a builder they fail at their first such
    /// step.
    pub builder: Option<BuilderConfig>,
}

impl KubeConfig {
    pub fn new(namespace: impl Into<String>, envd_image: impl Into<String>) -> Self {
        KubeConfig {
            namespace: namespace.into(),
            envd_image: envd_image.into(),
            envd_path: "/usr/local/bin/sandcastle-envd".into(),
            base_image: String::new(),
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_port: 0,
            envd_port: 0,
            api_key: None,
            runtime_class: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            server_labels: BTreeMap::new(),
            server_namespace: None,
            denied_cidrs: [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
            ]
            .map(String::from)
            .to_vec(),
            cpu_request_fraction: 1.0,
            max_timeout: Duration::from_secs(24 * 3600),
            max_sandboxes: 100,
            max_body_bytes: 512 << 20,
            start_timeout: Duration::from_secs(120),
            builder: None,
        }
    }
}

pub(crate) struct KubeState {
    config: KubeConfig,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    policies: Api<NetworkPolicy>,
    config_maps: Api<ConfigMap>,
    /// Talks to envd in the pods: plain HTTP on the pod network.
    envd: reqwest::Client,
    routes: proxy::Routes,
    builder: Option<BuilderApis>,
}

/// The builder's settings and the objects of its namespace.
pub(crate) struct BuilderApis {
    config: BuilderConfig,
    jobs: Api<Job>,
    pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
}

/// A running server of the kubernetes runtime.
pub struct KubeSandboxd {
    api_addr: SocketAddr,
    envd_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl KubeSandboxd {
    pub async fn start(config: KubeConfig, client: kube::Client) -> Result<KubeSandboxd, Error> {
        let namespace = config.namespace.clone();
        let envd = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http1_only()
            .build()
            .map_err(|error| Error::Kubernetes(format!("cannot build an HTTP client: {error}")))?;
        let builder = config.builder.clone().map(|builder| BuilderApis {
            jobs: Api::namespaced(client.clone(), &builder.namespace),
            pods: Api::namespaced(client.clone(), &builder.namespace),
            config_maps: Api::namespaced(client.clone(), &builder.namespace),
            config: builder,
        });
        let state = Arc::new(KubeState {
            builder,
            pods: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client.clone(), &namespace),
            policies: Api::namespaced(client.clone(), &namespace),
            config_maps: Api::namespaced(client, &namespace),
            envd,
            routes: proxy::Routes::default(),
            config,
        });
        templates::ensure_base_template(&state)
            .await
            .map_err(|error| {
                Error::Kubernetes(format!("cannot record the base template: {error}"))
            })?;
        let api_listener = super::bind(state.config.listen, state.config.api_port).await?;
        let envd_listener = super::bind(state.config.listen, state.config.envd_port).await?;
        let local = |listener: &tokio::net::TcpListener, port| {
            listener.local_addr().map_err(|source| Error::Listen {
                addr: SocketAddr::new(state.config.listen, port),
                source,
            })
        };
        let api_addr = local(&api_listener, state.config.api_port)?;
        let envd_addr = local(&envd_listener, state.config.envd_port)?;
        let (shutdown, stopped) = watch::channel(false);
        let servers = vec![
            super::serve(api_listener, api::router(state.clone()), stopped.clone()),
            super::serve(envd_listener, proxy::router(state.clone()), stopped.clone()),
            tokio::spawn(reap_expired(state.clone(), stopped)),
        ];
        tracing::info!(api = %api_addr, envd = %envd_addr, namespace = %namespace, "sandbox server (kubernetes runtime) listening");
        Ok(KubeSandboxd {
            api_addr,
            envd_addr,
            shutdown,
            servers,
        })
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    pub fn sandbox_url(&self) -> String {
        format!("http://{}", self.envd_addr)
    }

    /// Stops serving. Sandboxes stay: they belong to the cluster, not to this replica.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for server in self.servers {
            let _ = server.await;
        }
    }
}

/// Every replica deletes what has expired; a delete conditioned on the pod's uid makes a
/// second replica's attempt harmless. Every few seconds it also moves running template
/// builds on, so that they end, and their Jobs go, when no client asks.
async fn reap_expired(state: Arc<KubeState>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        ticks += 1;
        if state.builder.is_some() && ticks.is_multiple_of(5) {
            templates::advance_builds(&state).await;
        }
        let Ok(pods) = state
            .pods
            .list(&ListParams::default().labels(&objects::sandbox_selector()))
            .await
        else {
            continue;
        };
        let now = jiff::Timestamp::now();
        for pod in pods.items {
            let Some(sandbox) = objects::sandbox_of(&pod) else {
                continue;
            };
            let expired = sandbox.end_at <= now;
            let dead = matches!(sandbox.live, objects::Liveness::Gone(_))
                && pod.metadata.deletion_timestamp.is_none();
            if expired || dead {
                tracing::info!(sandbox = %sandbox.id, expired, "removing sandbox");
                delete_pod(&state, &pod).await;
            }
        }
    }
}

async fn delete_pod(state: &KubeState, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    if let Err(error) = state.pods.delete(&name, &params).await
        && !matches!(&error, kube::Error::Api(status) if status.is_not_found() || status.is_conflict())
    {
        tracing::warn!(pod = %name, %error, "cannot delete a sandbox pod");
    }
}
