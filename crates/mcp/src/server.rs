//! Starting and stopping the server: its sandbox pool, its Lease, its transport, and the
//! clean-up when it stops (SIGTERM, Ctrl-C, or stdin closed for stdio).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use sandcastle_api::names::{MADE_BY_MCP, SANDBOX_MADE_BY, SANDBOX_MCP_LEASE};
use sandcastle_e2b::client::E2bClient;

use crate::contexts::Runner;
use crate::liveness::Liveness;
use crate::sandboxes::{Pool, PoolSettings};
use crate::tasks::Tasks;
use crate::{SandcastleMcp, tend};

pub enum Transport {
    Stdio,
    Http {
        listen: SocketAddr,
        /// Host names (or host:port) clients may address the server by, beyond loopback.
        allowed_hosts: Vec<String>,
        /// Requests must carry `Authorization: Bearer <token>` when set.
        bearer_token: Option<String>,
    },
}

pub struct Settings {
    pub pool: PoolSettings,
    pub max_contexts: usize,
    pub context_idle_timeout: Duration,
    /// The namespace of the task tools.
    pub namespace: String,
    /// The namespace of the server's Lease: its own Pod's, so the Pod can own it.
    pub lease_namespace: String,
    /// This server's name in its Lease.
    pub identity: String,
    /// How long its Lease holds unrenewed: how soon the sweep may take the sandboxes of
    /// a server that crashed.
    pub lease_seconds: i32,
    /// The server's Pod (name, UID), which then owns the Lease.
    pub pod: Option<(String, String)>,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves until told to stop, then kills every sandbox it made and drops its Lease.
pub async fn serve(
    provider: E2bClient,
    kube: Option<kube::Client>,
    mut settings: Settings,
    transport: Transport,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let liveness = kube.clone().map(|client| {
        let liveness = Liveness::new(
            client,
            &settings.lease_namespace,
            &settings.identity,
            settings.lease_seconds,
        );
        match settings.pod.clone() {
            Some((name, uid)) => liveness.owned_by_pod(name, uid),
            None => liveness,
        }
    });
    settings
        .pool
        .metadata
        .insert(SANDBOX_MADE_BY.into(), MADE_BY_MCP.into());
    if let Some(liveness) = &liveness {
        // The Lease exists before any sandbox names it, so the sweep never sees a
        // sandbox of a live server without it.
        liveness.renew().await?;
        liveness.delete_expired().await;
        settings
            .pool
            .metadata
            .insert(SANDBOX_MCP_LEASE.into(), liveness.reference());
    }
    let pool = Pool::new(provider, settings.pool.clone());
    let runner = Arc::new(Runner::new(
        pool.clone(),
        settings.max_contexts,
        settings.context_idle_timeout,
    ));
    let tasks = kube.map(|client| Tasks::new(client, settings.namespace.clone()));
    let handler = SandcastleMcp::new(runner.clone(), tasks);
    let tending = tokio::spawn(tend(runner.clone(), Duration::from_secs(5)));
    let keeping = liveness.as_ref().map(|liveness| {
        let liveness = liveness.clone();
        tokio::spawn(async move { liveness.keep().await })
    });

    let served = match transport {
        Transport::Stdio => serve_stdio(handler, stop).await,
        Transport::Http {
            listen,
            allowed_hosts,
            bearer_token,
        } => serve_http(handler, listen, allowed_hosts, bearer_token, stop).await,
    };

    tending.abort();
    if let Some(keeping) = keeping {
        keeping.abort();
    }
    let (sandboxes, _) = pool.occupancy();
    runner.forget_all();
    pool.kill_all().await;
    if let Some(liveness) = &liveness {
        liveness.release().await;
    }
    tracing::info!(sandboxes, "stopped; killed every sandbox this server made");
    served
}

async fn serve_stdio(
    handler: SandcastleMcp,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), BoxError> {
    let service = handler.serve(rmcp::transport::stdio()).await?;
    let cancel = service.cancellation_token();
    tokio::select! {
        quit = service.waiting() => {
            tracing::info!(?quit, "the client went away");
        }
        () = stop => {
            cancel.cancel();
        }
    }
    Ok(())
}

async fn serve_http(
    handler: SandcastleMcp,
    listen: SocketAddr,
    allowed_hosts: Vec<String>,
    bearer_token: Option<String>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = cancel.child_token();
    config.allowed_hosts.extend(allowed_hosts);
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let mut router = axum::Router::new().nest_service("/mcp", service);
    if let Some(token) = bearer_token {
        let expected = format!("Bearer {token}");
        router = router.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let allowed = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .is_some_and(|value| value.as_bytes() == expected.as_bytes());
                async move {
                    if allowed {
                        next.run(request).await
                    } else {
                        axum::response::IntoResponse::into_response((
                            http::StatusCode::UNAUTHORIZED,
                            "a bearer token is required",
                        ))
                    }
                }
            },
        ));
    }
    let router = router.route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "MCP server listening (streamable HTTP at /mcp)");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stop.await;
            cancel.cancel();
        })
        .await?;
    Ok(())
}
