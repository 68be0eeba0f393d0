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

/// How long the Lease holds unrenewed by default; it is renewed every third of it.
pub const LEASE_SECONDS: i32 = 30;

const LABEL_SELECTOR: &str = "app.kubernetes.io/component=mcp-server";

/// Whether the server holding `lease` still renews it: its last renewal is less than
/// twice its duration ago (the slack is for clocks). The orphan sweep judges the same way.
pub fn holder_lives(lease: &Lease, now: jiff::Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    now < renewed.0 + jiff::SignedDuration::from_secs(2 * i64::from(seconds.max(1)))
}

#[derive(Clone)]
pub struct Liveness {
    api: Api<Lease>,
    pub namespace: String,
    pub name: String,
    seconds: i32,
    /// The server's own Pod (name and UID) when it runs in one: the Lease is owned by it,
    /// so the garbage collector deletes it with the Pod even when the server could not.
    owner: Option<(String, String)>,
}

impl Liveness {
    pub fn new(client: kube::Client, namespace: &str, identity: &str, seconds: i32) -> Liveness {
        Liveness {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: format!("sandcastle-mcp-{identity}"),
            seconds: seconds.max(3),
            owner: None,
        }
    }

    /// Has the Lease owned by the server's Pod, which must be in the Lease's namespace.
    pub fn owned_by_pod(mut self, name: String, uid: String) -> Liveness {
        self.owner = Some((name, uid));
        self
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
                owner_references: self.owner.as_ref().map(|(name, uid)| {
                    vec![
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                            api_version: "v1".into(),
                            kind: "Pod".into(),
                            name: name.clone(),
                            uid: uid.clone(),
                            ..Default::default()
                        },
                    ]
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.name.clone()),
                lease_duration_seconds: Some(self.seconds),
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
        let mut ticks = tokio::time::interval(Duration::from_secs((self.seconds / 3) as u64));
        loop {
            ticks.tick().await;
            if let Err(error) = self.renew().await {
                tracing::warn!(%error, lease = %self.name, "renewing the MCP server's Lease");
            }
        }
    }

    /// Deletes the Leases of servers that stopped renewing them (crashed) longer ago than
    /// the orphan sweep waits: their sandboxes are the sweep's either way, and the Leases
    /// would otherwise stay forever.
    pub async fn delete_expired(&self) {
        let listed = self
            .api
            .list(&kube::api::ListParams::default().labels(LABEL_SELECTOR))
            .await;
        let Ok(leases) = listed else {
            return;
        };
        let now = jiff::Timestamp::now();
        for lease in leases.items {
            if holder_lives(&lease, now) {
                continue;
            }
            if let Some(name) = lease.metadata.name.as_deref() {
                tracing::info!(
                    lease = name,
                    "deleting the Lease of an MCP server that is gone"
                );
                let _ = self.api.delete(name, &DeleteParams::default()).await;
            }
        }
    }

    pub async fn release(&self) {
        if let Err(error) = self.api.delete(&self.name, &DeleteParams::default()).await {
            tracing::warn!(%error, lease = %self.name, "deleting the MCP server's Lease");
        }
    }
}
