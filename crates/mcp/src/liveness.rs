//! The server's Lease: while it is renewed the server lives, and the operator's orphan
//! sweep leaves the sandboxes that name it alone. A server that crashed stops renewing it,
//! and the sweep kills what it left.
//!
//! kube-lease-manager elects leaders; this is not an election (every server holds its
//! own), so a plain Lease written by server-side apply does.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

/// How long the Lease holds unrenewed; it is renewed every third of it.
pub const LEASE_SECONDS: i32 = 30;

#[derive(Clone)]
pub struct Liveness {
    api: Api<Lease>,
    pub namespace: String,
    pub name: String,
}

impl Liveness {
    pub fn new(client: kube::Client, namespace: &str, identity: &str) -> Liveness {
        Liveness {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: format!("sandcastle-mcp-{identity}"),
        }
    }

    /// What the sandboxes carry to name this Lease.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub async fn renew(&self) -> Result<(), kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/component".to_string(),
                        "mcp-server".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.name.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(sandcastle_api::names::FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
            .map(drop)
    }

    /// Renews the Lease until the future is dropped.
    pub async fn keep(&self) {
        let mut ticks = tokio::time::interval(Duration::from_secs((LEASE_SECONDS / 3) as u64));
        loop {
            ticks.tick().await;
            if let Err(error) = self.renew().await {
                tracing::warn!(%error, lease = %self.name, "renewing the MCP server's Lease");
            }
        }
    }

    pub async fn release(&self) {
        if let Err(error) = self.api.delete(&self.name, &DeleteParams::default()).await {
            tracing::warn!(%error, lease = %self.name, "deleting the MCP server's Lease");
        }
    }
}
