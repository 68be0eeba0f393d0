//! The sandboxes `run_code` runs in: a bounded pool, shared by calls and contexts, made on
//! demand from one template, killed when idle and all of them when the server stops.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::envd_client::{EnvdClient, SandboxAccess};
use tokio::sync::Notify;

use crate::interpreter::install_drivers;

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub template: String,
    /// The most sandboxes alive at once.
    pub max_sandboxes: usize,
    /// How many calls and contexts share one sandbox before another is made.
    pub per_sandbox: usize,
    /// A sandbox nobody has used for this long is killed.
    pub idle_timeout: Duration,
    /// The lifetime each sandbox is given on its provider, renewed while the server
    /// lives: what bounds a sandbox's life after a crash when no sweep finds it first.
    pub lifetime: Duration,
    /// How long a call waits for room in a full pool.
    pub wait: Duration,
    /// Stamped on every sandbox, for the operator's orphan sweep.
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "all {0} sandboxes are busy and none freed up in time; retry, or raise --max-sandboxes"
    )]
    Exhausted(usize),
    #[error("creating a sandbox from template {template:?}: {source}")]
    Create {
        template: String,
        source: sandcastle_e2b::error::Error,
    },
    #[error("preparing sandbox {sandbox}: {source}")]
    Prepare {
        sandbox: String,
        source: sandcastle_e2b::error::Error,
    },
    #[error("the server is stopping")]
    Stopping,
}

struct Slot {
    /// `None` while it is being created.
    sandbox: Option<(String, EnvdClient)>,
    users: usize,
    idle_since: Instant,
    renewed: Instant,
}

struct State {
    slots: Vec<Slot>,
    stopping: bool,
}

pub struct Pool {
    client: E2bClient,
    settings: PoolSettings,
    state: Mutex<State>,
    freed: Notify,
}

/// A share of one sandbox; dropping it gives the share back.
pub struct Lease {
    pool: Arc<Pool>,
    sandbox_id: String,
    envd: EnvdClient,
}

impl Lease {
    pub fn envd(&self) -> &EnvdClient {
        &self.envd
    }

    pub fn sandbox_id(&self) -> &str {
        &self.sandbox_id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.sandbox_id);
    }
}

impl Pool {
    pub fn new(client: E2bClient, settings: PoolSettings) -> Arc<Pool> {
        Arc::new(Pool {
            client,
            settings,
            state: Mutex::new(State {
                slots: Vec::new(),
                stopping: false,
            }),
            freed: Notify::new(),
        })
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// A share of the least busy sandbox with room, of a new one if none has room and the
    /// pool may grow, or of the first to free up.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, PoolError> {
        let deadline = tokio::time::Instant::now() + self.settings.wait;
        loop {
            let freed = self.freed.notified();
            enum Next {
                Take(Box<(String, EnvdClient)>),
                Create,
                Wait,
            }
            let next = {
                let mut state = self.state.lock().expect("pool lock");
                if state.stopping {
                    return Err(PoolError::Stopping);
                }
                let best = state
                    .slots
                    .iter_mut()
                    .filter(|slot| slot.sandbox.is_some() && slot.users < self.settings.per_sandbox)
                    .min_by_key(|slot| slot.users);
                if let Some(slot) = best {
                    slot.users += 1;
                    Next::Take(Box::new(
                        slot.sandbox.clone().expect("filtered on a made sandbox"),
                    ))
                } else if state.slots.len() < self.settings.max_sandboxes {
                    let now = Instant::now();
                    state.slots.push(Slot {
                        sandbox: None,
                        users: 1,
                        idle_since: now,
                        renewed: now,
                    });
                    Next::Create
                } else {
                    Next::Wait
                }
            };
            match next {
                Next::Take(taken) => {
                    let (sandbox_id, envd) = *taken;
                    return Ok(Lease {
                        pool: self.clone(),
                        sandbox_id,
                        envd,
                    });
                }
                Next::Create => return self.create().await,
                Next::Wait => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(PoolError::Exhausted(self.settings.max_sandboxes));
                    }
                }
            }
        }
    }

    /// Makes the sandbox of the placeholder slot `acquire` pushed, and fills it in.
    async fn create(self: &Arc<Self>) -> Result<Lease, PoolError> {
        let made = self.create_sandbox().await;
        let stopping = {
            let mut state = self.state.lock().expect("pool lock");
            if state.stopping {
                true
            } else {
                let placeholder = state
                    .slots
                    .iter()
                    .position(|slot| slot.sandbox.is_none())
                    .expect("a create holds a placeholder");
                match &made {
                    Ok((sandbox_id, envd)) => {
                        state.slots[placeholder].sandbox = Some((sandbox_id.clone(), envd.clone()));
                    }
                    Err(_) => {
                        state.slots.remove(placeholder);
                    }
                }
                false
            }
        };
        match made {
            Ok((sandbox_id, _)) if stopping => {
                // The stop took the slots before this sandbox existed: it is this call's
                // to kill.
                let _ = self.client.kill_sandbox(&sandbox_id).await;
                Err(PoolError::Stopping)
            }
            Ok((sandbox_id, envd)) => Ok(Lease {
                pool: self.clone(),
                sandbox_id,
                envd,
            }),
            Err(error) => {
                self.freed.notify_waiters();
                Err(error)
            }
        }
    }

    async fn create_sandbox(&self) -> Result<(String, EnvdClient), PoolError> {
        let mut spec = SandboxSpec::new(self.settings.template.clone(), self.settings.lifetime);
        spec.metadata = self.settings.metadata.clone();
        let sandbox =
            self.client
                .create_sandbox(&spec)
                .await
                .map_err(|source| PoolError::Create {
                    template: self.settings.template.clone(),
                    source,
                })?;
        let envd = self.client.envd(SandboxAccess::from(&sandbox));
        if let Err(source) = install_drivers(&envd).await {
            let _ = self.client.kill_sandbox(&sandbox.sandbox_id).await;
            return Err(PoolError::Prepare {
                sandbox: sandbox.sandbox_id,
                source,
            });
        }
        tracing::info!(sandbox = %sandbox.sandbox_id, "made a sandbox for run_code");
        Ok((sandbox.sandbox_id, envd))
    }

    fn release(&self, sandbox_id: &str) {
        let mut state = self.state.lock().expect("pool lock");
        if let Some(slot) = state.slots.iter_mut().find(|slot| {
            slot.sandbox
                .as_ref()
                .is_some_and(|(id, _)| id == sandbox_id)
        }) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                slot.idle_since = Instant::now();
            }
        }
        drop(state);
        self.freed.notify_waiters();
    }

    /// Kills the sandboxes idle past the idle timeout, and renews the lifetime of the
    /// others once a third of it has passed.
    pub async fn tend(&self) {
        let now = Instant::now();
        let (idle, renew): (Vec<String>, Vec<String>) = {
            let mut state = self.state.lock().expect("pool lock");
            let mut idle = Vec::new();
            state.slots.retain(|slot| match &slot.sandbox {
                Some((id, _))
                    if slot.users == 0
                        && now.duration_since(slot.idle_since) >= self.settings.idle_timeout =>
                {
                    idle.push(id.clone());
                    false
                }
                _ => true,
            });
            let mut renew = Vec::new();
            for slot in &mut state.slots {
                if let Some((id, _)) = &slot.sandbox
                    && now.duration_since(slot.renewed) >= self.settings.lifetime / 3
                {
                    slot.renewed = now;
                    renew.push(id.clone());
                }
            }
            (idle, renew)
        };
        for id in idle {
            tracing::info!(sandbox = %id, "killing an idle run_code sandbox");
            let _ = self.client.kill_sandbox(&id).await;
        }
        for id in renew {
            if let Err(error) = self.client.set_timeout(&id, self.settings.lifetime).await {
                tracing::warn!(sandbox = %id, %error, "renewing a sandbox's lifetime");
            }
        }
    }

    /// Stops taking calls and kills every sandbox the pool made.
    pub async fn kill_all(&self) {
        let ids: Vec<String> = {
            let mut state = self.state.lock().expect("pool lock");
            state.stopping = true;
            state
                .slots
                .drain(..)
                .filter_map(|slot| slot.sandbox.map(|(id, _)| id))
                .collect()
        };
        self.freed.notify_waiters();
        let kills = ids.iter().map(|id| async move {
            match self.client.kill_sandbox(id).await {
                Ok(_) => tracing::info!(sandbox = %id, "killed a run_code sandbox"),
                Err(error) => tracing::warn!(sandbox = %id, %error, "killing a run_code sandbox"),
            }
        });
        futures::future::join_all(kills).await;
    }

    /// How many sandboxes the pool holds, and how many calls and contexts use them.
    pub fn occupancy(&self) -> (usize, usize) {
        let state = self.state.lock().expect("pool lock");
        (
            state.slots.len(),
            state.slots.iter().map(|slot| slot.users).sum(),
        )
    }
}
