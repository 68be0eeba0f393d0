//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager), so that of
//! several replicas exactly one reconciles and a standby takes over when it goes away.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the lease lives and who competes for it.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// This process's name in the lease (the pod name in a cluster).
    pub identity: String,
    /// How long a lease lasts without renewal: the longest a standby waits after the
    /// leader vanished without releasing it.
    pub lease_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("leader election: the lease manager stopped before this process led")]
    Stopped,
}

/// The lease, held.
pub struct Leadership {
    state: watch::Receiver<bool>,
    manager: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

/// Waits until this process holds the lease. Renewal goes on in the background until the
/// returned leadership is released or lost.
pub async fn acquire(client: Client, election: &Election) -> Result<Leadership, Error> {
    // Renew a third of the way before expiry: two renewals can fail before the lease lapses.
    let grace = (election.lease_seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, &election.lease)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(election.lease_seconds.max(grace + 1))
        .with_grace(grace)
        .build()
        .await?;
    let (mut state, manager) = manager.watch().await;
    tracing::info!(lease = %election.lease, namespace = %election.namespace, identity = %election.identity, "waiting for the leader lease");
    if state.wait_for(|leading| *leading).await.is_err() {
        return Err(match manager.await {
            Ok(Err(error)) => error.into(),
            _ => Error::Stopped,
        });
    }
    tracing::info!(lease = %election.lease, "leading");
    Ok(Leadership { state, manager })
}

impl Leadership {
    /// Completes when the lease is lost (not renewed in time, or taken over).
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut state = self.state.clone();
        async move {
            let _ = state.wait_for(|leading| !*leading).await;
        }
    }

    /// Gives the lease up so a standby takes over at once instead of after it expires.
    pub async fn release(self) {
        drop(self.state);
        match self.manager.await {
            Ok(Ok(_)) => tracing::info!("released the leader lease"),
            Ok(Err(error)) => tracing::warn!(%error, "could not release the leader lease"),
            Err(error) => tracing::warn!(%error, "the lease manager ended abnormally"),
        }
    }
}
