//! Warm pools: each template's idle sandboxes, kept at the size its spec asks on the
//! template's provider through the E2B API, and the claim by which a task takes one.
//!
//! A warm sandbox carries the pool's metadata (the template's uid and the build it is
//! of), never a task's. A task takes it by renaming [`POOL_WARM_MARK`] inside it to its
//! own [`pool_claim_mark`] through envd: `rename` is atomic in the sandbox's kernel, so
//! two claims (two workers, or two operators across a leader change) never both succeed,
//! and no process starts in the sandbox. The claim names the task, so a claimed sandbox
//! whose task never recorded it (a crash between the two) is found and killed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use kube::{Resource, ResourceExt};

use super::Context;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use sandcastle_api::conditions::condition;
use sandcastle_api::names::{
    POOL_CLAIMED_PREFIX, POOL_DIR, POOL_FIELD_MANAGER, POOL_WARM_MARK,
    SANDBOX_OPERATOR as OPERATOR, SANDBOX_POOL, SANDBOX_POOL_BUILD, pool_claim_mark,
};
use sandcastle_api::{
    AgentTask, CONDITION_POOL_READY, PoolReason, PoolStatus, SandboxTemplate,
    SandboxTemplateStatus, WarmPool,
};
use sandcastle_e2b::client::{E2bClient, ListQuery, SandboxSpec};
use sandcastle_e2b::error::Error as ProviderError;
use sandcastle_e2b::models::{Sandbox, SandboxDetail};

/// How often a template with a pool looks at it.
const POOL_INTERVAL: Duration = Duration::from_secs(5);
/// How long a pass woken by a claim waits for the claims that come with it.
const CLAIMS_TOGETHER: Duration = Duration::from_millis(100);
/// The most sandboxes one pass asks for, so a rebuild or a large pool rolls in steps.
const CREATES_PER_PASS: usize = 10;
/// How long a claimed sandbox may go unrecorded by its task before it counts as lost.
const CLAIM_GRACE: Duration = Duration::from_secs(60);
/// Beyond a warm sandbox's maximum age, its provider-side lifetime: the provider's own
/// dead-man switch should the operator be gone.
const WARM_GRACE: Duration = Duration::from_secs(120);

/// Which pool a sandbox belongs to: one per `SandboxTemplate` (two may adopt the same
/// provider template, and only one may have a pool) and per build of it.
pub(super) fn pool_key(
    namespace: &str,
    name: &str,
    status: &SandboxTemplateStatus,
) -> Option<String> {
    let template_id = status.template_id.as_deref()?;
    Some(format!(
        "{namespace}/{name}/{template_id}/{}",
        status.build_id.as_deref().unwrap_or("")
    ))
}

/// What this process knows of each pool's idle sandboxes, so a claim needs no list.
#[derive(Default)]
pub(super) struct Pools {
    known: Mutex<Known>,
    /// Woken by each claim, so a pool is refilled at once rather than at the next tick.
    taken: tokio::sync::Notify,
}

#[derive(Default)]
struct Known {
    /// Idle sandboxes by pool key, oldest first, with what envd needs to reach them.
    warm: HashMap<String, Vec<Sandbox>>,
    /// Sandboxes a claim of this process took, while they are still listed: a pass that
    /// read one as idle before the claim must not put it back.
    taken: HashSet<String>,
}

impl Pools {
    /// Sets the pool's idle sandboxes, less any a claim took meanwhile; returns how many
    /// are idle.
    fn replace(&self, key: &str, mut sandboxes: Vec<Sandbox>) -> usize {
        let mut known = self.known.lock().expect("pools");
        sandboxes.retain(|sandbox| !known.taken.contains(&sandbox.sandbox_id));
        let idle = sandboxes.len();
        known.warm.insert(key.to_string(), sandboxes);
        idle
    }

    fn knows(&self, key: &str) -> bool {
        self.known.lock().expect("pools").warm.contains_key(key)
    }

    fn forget(&self, key: &str) {
        self.known.lock().expect("pools").warm.remove(key);
    }

    /// The pool's sandboxes this process holds for idle and no claim of it has taken,
    /// with their envd tokens: a pass need not look inside them again.
    fn idle(&self, key: &str) -> HashMap<String, Option<String>> {
        let known = self.known.lock().expect("pools");
        known
            .warm
            .get(key)
            .into_iter()
            .flatten()
            .map(|sandbox| {
                (
                    sandbox.sandbox_id.clone(),
                    sandbox.envd_access_token.clone(),
                )
            })
            .collect()
    }

    /// Forgets the claims of sandboxes no longer listed: they are gone for good.
    fn prune_taken(&self, listed: &HashSet<&str>) {
        let mut known = self.known.lock().expect("pools");
        known.taken.retain(|id| listed.contains(id.as_str()));
    }

    /// Lets the next pass look at a sandbox a claim took but could not finish: it is idle
    /// again if the claim never reached it, or a claim no task holds if it did.
    fn release(&self, sandbox_id: &str) {
        self.known.lock().expect("pools").taken.remove(sandbox_id);
    }

    /// The oldest idle sandbox of the pool, taken out of the pool's list.
    fn take(&self, key: &str) -> Option<Sandbox> {
        let mut known = self.known.lock().expect("pools");
        let sandboxes = known.warm.get_mut(key)?;
        let sandbox = (!sandboxes.is_empty()).then(|| sandboxes.remove(0))?;
        known.taken.insert(sandbox.sandbox_id.clone());
        Some(sandbox)
    }
}

/// Takes a warm sandbox of the template for the task, if its pool has one: the claim is
/// made inside the sandbox before anything else, and the sandbox then lives as long as
/// a created one would. `None` sends the task to create a sandbox as usual.
pub(super) async fn claim(
    ctx: &Context,
    task: &AgentTask,
    provider: &E2bClient,
    template: &SandboxTemplateStatus,
    timeout: Duration,
) -> Option<Sandbox> {
    // A sandbox's network is fixed when it is made: such a task needs its own.
    if task.spec.network.is_some() {
        return None;
    }
    let key = pool_key(
        &task.namespace().unwrap_or_default(),
        &task.spec.template_ref.name,
        template,
    )?;
    if !ctx.pools.knows(&key) {
        return None;
    }
    let owner = task.metadata.uid.clone().unwrap_or_default();
    while let Some(sandbox) = ctx.pools.take(&key) {
        match take(provider, &sandbox, &owner).await {
            Ok(true) => {
                if let Err(error) = provider.set_timeout(&sandbox.sandbox_id, timeout).await {
                    // Claimed but its life not extended: it would end with the pool's
                    // lifetime. The pool's pass kills it as a claim its task lost.
                    tracing::warn!(sandbox = %sandbox.sandbox_id, %error, "a claimed warm sandbox's lifetime could not be set; trying another");
                    ctx.pools.release(&sandbox.sandbox_id);
                    continue;
                }
                ctx.metrics.pool_claimed(true);
                ctx.pools.taken.notify_one();
                return Some(sandbox);
            }
            // Taken by another claim, or gone: try the next one.
            Ok(false) => continue,
            Err(error) => {
                tracing::warn!(sandbox = %sandbox.sandbox_id, %error, "claiming a warm sandbox failed; trying another");
                ctx.pools.release(&sandbox.sandbox_id);
                continue;
            }
        }
    }
    ctx.metrics.pool_claimed(false);
    None
}

/// Makes the claim inside the sandbox for `owner` (a task's uid): `true` if this claim is
/// the one that holds.
async fn take(
    provider: &E2bClient,
    sandbox: impl Into<sandcastle_e2b::envd_client::SandboxAccess>,
    owner: &str,
) -> Result<bool, ProviderError> {
    match provider
        .envd(sandbox)
        .rename(POOL_WARM_MARK, &pool_claim_mark(owner))
        .await
    {
        Ok(_) => Ok(true),
        Err(error) if error.is_not_found() => Ok(false),
        Err(error) => Err(error),
    }
}

/// Marks a sandbox of the pool as ready to be taken.
async fn mark_warm(
    provider: &E2bClient,
    sandbox: impl Into<sandcastle_e2b::envd_client::SandboxAccess>,
) -> Result<(), ProviderError> {
    provider
        .envd(sandbox)
        .make_dir(POOL_WARM_MARK)
        .await
        .map(drop)
}

/// Keeps the pools for as long as the operator leads: a pass every [`POOL_INTERVAL`],
/// and one soon after any claim (claims a moment apart share it).
pub(super) async fn keep_pools_forever(ctx: &Context) {
    loop {
        keep_pools(ctx).await;
        tokio::select! {
            _ = tokio::time::sleep(POOL_INTERVAL) => {}
            _ = ctx.pools.taken.notified() => {
                tokio::time::sleep(CLAIMS_TOGETHER).await;
            }
        }
    }
}

/// Keeps the pool of every ready template that asks for one and drains those no longer
/// asked for. A loop of its own rather than the template's
/// reconcile: a pool needs a look whether or not its template changed, and a slow
/// provider then holds up no template's build.
async fn keep_pools(ctx: &Context) {
    let Ok(templates) = ctx.caches.templates().await else {
        return;
    };
    let kept = templates.iter().filter(|template| {
        let status = template.status.clone().unwrap_or_default();
        let ready = status.phase == Some(sandcastle_api::TemplatePhase::Ready);
        template.metadata.deletion_timestamp.is_none()
            && ((template.spec.pool.is_some() && ready)
                || (template.spec.pool.is_none() && status.pool.is_some()))
    });
    futures::future::join_all(kept.map(|template| keep_one(ctx, template))).await;
}

async fn keep_one(ctx: &Context, template: &SandboxTemplate) {
    let provider = match super::template::resolve_provider(ctx, template).await {
        Ok(provider) => provider,
        Err(_) => return,
    };
    let status = template.status.clone().unwrap_or_default();
    let pool = match keep(ctx, template, &provider, template.spec.pool.as_ref()).await {
        Ok(pool) => pool,
        Err(error) => {
            tracing::warn!(template = %template.name_any(), %error, "cannot keep the warm pool; trying again");
            return;
        }
    };
    let previous = status
        .conditions
        .iter()
        .find(|condition| condition.type_ == CONDITION_POOL_READY);
    let condition = match (&template.spec.pool, &pool) {
        (Some(spec), Some(pool)) => Some(pool_condition(
            &status.conditions,
            spec.size,
            pool,
            template.metadata.generation,
            &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        )),
        _ => None,
    };
    let same = |a: &Condition, b: &Condition| {
        (&a.status, &a.reason, &a.message, a.observed_generation)
            == (&b.status, &b.reason, &b.message, b.observed_generation)
    };
    let unchanged = pool == status.pool
        && match (previous, &condition) {
            (Some(previous), Some(condition)) => same(previous, condition),
            (None, None) => true,
            _ => false,
        };
    if !unchanged
        && let Err(error) = write_pool_status(ctx, template, pool.as_ref(), condition).await
    {
        tracing::warn!(template = %template.name_any(), %error, "cannot write the warm pool's status");
    }
}

/// Writes the pool's part of the template's status under a field manager of its own, so
/// that it and the template's reconcile (which owns the rest) never undo each other's
/// writes. A drained pool's fields are released, which removes them.
async fn write_pool_status(
    ctx: &Context,
    template: &SandboxTemplate,
    pool: Option<&PoolStatus>,
    condition: Option<Condition>,
) -> Result<(), kube::Error> {
    let api: kube::Api<SandboxTemplate> = kube::Api::namespaced(
        ctx.client.clone(),
        &template.namespace().unwrap_or_default(),
    );
    let status = match (pool, condition) {
        (Some(pool), Some(condition)) => {
            serde_json::json!({"pool": pool, "conditions": [condition]})
        }
        _ => serde_json::json!({}),
    };
    let patch = serde_json::json!({
        "apiVersion": SandboxTemplate::api_version(&()),
        "kind": SandboxTemplate::kind(&()),
        "status": status,
    });
    api.patch_status(
        &template.name_any(),
        &kube::api::PatchParams::apply(POOL_FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    if pool.is_none() {
        // Written by an earlier release with a merge patch, which no release of the
        // field removes.
        api.patch_status(
            &template.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"pool": null}})),
        )
        .await?;
    }
    Ok(())
}

/// The `PoolReady` condition for a pool of `size` as a pass left it.
pub(super) fn pool_condition(
    previous: &[Condition],
    size: i32,
    pool: &PoolStatus,
    generation: Option<i64>,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Condition {
    let (full, reason, message) = if pool.outdated > 0 {
        (
            false,
            PoolReason::PoolRolling,
            format!(
                "{} of {size} warm of build {}; {} of an older build still to replace",
                pool.ready,
                pool.build_id.as_deref().unwrap_or("?"),
                pool.outdated
            ),
        )
    } else if pool.ready >= size {
        (
            true,
            PoolReason::PoolFull,
            format!("{} of {size} warm", pool.ready),
        )
    } else {
        (
            false,
            PoolReason::PoolFilling,
            format!(
                "{} of {size} warm, {} being created",
                pool.ready, pool.creating
            ),
        )
    };
    condition(
        previous,
        CONDITION_POOL_READY,
        if full { "True" } else { "False" },
        reason.as_str(),
        &message,
        generation,
        now,
    )
}

/// One pool sandbox as this pass finds it.
#[derive(Debug, PartialEq)]
enum Seen {
    Idle {
        fresh: bool,
        expired: bool,
    },
    /// Taken by the task of this uid, claimed at the instant given.
    Claimed {
        owner: String,
        at: jiff::Timestamp,
    },
}

/// Keeps the template's pool at its size, replaces what is outdated, expired, dead or no
/// longer wanted, and returns the pool's status. `pool` of `None` drains it.
pub(super) async fn keep(
    ctx: &Context,
    template: &SandboxTemplate,
    provider: &E2bClient,
    pool: Option<&WarmPool>,
) -> Result<Option<PoolStatus>, ProviderError> {
    let status = template.status.clone().unwrap_or_default();
    let uid = template.metadata.uid.clone().unwrap_or_default();
    let key = pool_key(
        &template.namespace().unwrap_or_default(),
        &template.name_any(),
        &status,
    );
    let query = ListQuery {
        metadata: BTreeMap::from([
            (SANDBOX_POOL.to_string(), uid.clone()),
            (OPERATOR.to_string(), ctx.instance.clone()),
        ]),
        ..ListQuery::default()
    };
    // Read before the list, so that a claim made after it shows in the list's sandbox.
    let idle = key
        .as_ref()
        .map(|key| ctx.pools.idle(key))
        .unwrap_or_default();
    let listed = provider.list_sandboxes(&query).await?;
    ctx.pools.prune_taken(
        &listed
            .iter()
            .map(|sandbox| sandbox.sandbox_id.as_str())
            .collect(),
    );
    let max_age = pool.map(|pool| Duration::from_secs(pool.max_age_seconds.max(60) as u64));
    let now = jiff::Timestamp::now();
    let seen = futures::future::join_all(listed.iter().map(|sandbox| async {
        let (detail, marks) = match idle.get(&sandbox.sandbox_id) {
            // Idle when this process last looked and not claimed by it since: nothing
            // else claims a pool's sandbox, so its marks need no second look.
            Some(token) => {
                let mut detail = sandbox.clone();
                detail.envd_access_token = token.clone();
                (detail, Vec::new())
            }
            None => {
                let detail = provider.get_sandbox(&sandbox.sandbox_id).await.ok()?;
                let marks = match provider.envd(&detail).list_dir(POOL_DIR, 1).await {
                    Ok(marks) => marks,
                    Err(error) if error.is_not_found() => Vec::new(),
                    // Unreachable for now: left alone this pass.
                    Err(_) => return None,
                };
                let warm = POOL_WARM_MARK.rsplit('/').next().unwrap_or_default();
                if !marks.iter().any(|mark| mark.name == warm) {
                    // Made by a pass that stopped before it marked it.
                    let claimed = marks
                        .iter()
                        .any(|mark| mark.name.starts_with(POOL_CLAIMED_PREFIX));
                    if !claimed {
                        mark_warm(provider, &detail).await.ok()?;
                    }
                }
                (detail, marks)
            }
        };
        let claim = marks.iter().find_map(|mark| {
            let owner = mark.name.strip_prefix(POOL_CLAIMED_PREFIX)?;
            let at = mark
                .modified_time
                .as_deref()
                .and_then(|time| time.parse().ok())
                .unwrap_or(now);
            Some(Seen::Claimed {
                owner: owner.to_string(),
                at,
            })
        });
        let seen = match claim {
            Some(claimed) => claimed,
            None => {
                let build = detail
                    .metadata
                    .as_ref()
                    .and_then(|metadata| metadata.get(SANDBOX_POOL_BUILD));
                let started: Option<jiff::Timestamp> = detail.started_at.parse().ok();
                Seen::Idle {
                    fresh: build.is_some() && build == key.as_ref(),
                    expired: match (started, max_age) {
                        (Some(started), Some(max_age)) => {
                            now.duration_since(started).as_secs() as u64 >= max_age.as_secs()
                        }
                        _ => false,
                    },
                }
            }
        };
        Some((detail, seen))
    }))
    .await;
    let mut fresh: Vec<SandboxDetail> = Vec::new();
    // Idle ones to remove: taken by the pool itself first, so none a task has just
    // claimed is killed under it.
    let mut retired: Vec<SandboxDetail> = Vec::new();
    let mut outdated: Vec<SandboxDetail> = Vec::new();
    // Claimed ones whose task lost them.
    let mut doomed: Vec<String> = Vec::new();
    let mut claimed = 0;
    let holders = holders(ctx).await;
    for (detail, seen) in seen.into_iter().flatten() {
        match seen {
            Seen::Idle { expired: true, .. } => retired.push(detail),
            Seen::Idle { fresh: true, .. } if pool.is_some() => fresh.push(detail),
            Seen::Idle { .. } => outdated.push(detail),
            Seen::Claimed { owner, at } => {
                if claim_is_held(&holders, &owner, &detail.sandbox_id, at, now) {
                    claimed += 1;
                } else {
                    doomed.push(detail.sandbox_id);
                }
            }
        }
    }
    let size = pool.map_or(0, |pool| pool.size.max(0) as usize);
    fresh.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    // Shrunk: the oldest go first.
    while fresh.len() > size {
        retired.push(fresh.remove(0));
    }
    let wanted = size.saturating_sub(fresh.len()).min(CREATES_PER_PASS);
    let created = match (&status.template_id, pool) {
        (Some(template_id), Some(pool)) if wanted > 0 => {
            let lifetime = Duration::from_secs(pool.max_age_seconds.max(60) as u64) + WARM_GRACE;
            let mut spec = SandboxSpec::new(template_id.clone(), lifetime);
            spec.metadata = BTreeMap::from([
                (SANDBOX_POOL.to_string(), uid.clone()),
                (
                    SANDBOX_POOL_BUILD.to_string(),
                    key.clone().unwrap_or_default(),
                ),
                (OPERATOR.to_string(), ctx.instance.clone()),
            ]);
            let made = futures::future::join_all((0..wanted).map(|_| async {
                let sandbox = provider.create_sandbox(&spec).await.ok()?;
                // Unmarked it cannot be taken; the next pass marks it.
                mark_warm(provider, &sandbox).await.ok()?;
                Some(sandbox)
            }))
            .await;
            made.into_iter().flatten().collect::<Vec<_>>()
        }
        _ => Vec::new(),
    };
    // A template deleted while this pass created was drained without what it created:
    // those go now, or they would live out their lifetime. Asked of the apiserver, not
    // the cache, which may not show the deletion yet.
    let created = if !created.is_empty() && being_deleted(ctx, template).await {
        futures::future::join_all(
            created
                .iter()
                .map(|sandbox| provider.kill_sandbox(&sandbox.sandbox_id)),
        )
        .await;
        Vec::new()
    } else {
        created
    };
    // Rolled: an outdated sandbox goes as a fresh one takes its place, so a rebuild
    // replaces the pool in steps, and whatever is left goes once the fresh ones are
    // enough. Outdated ones serve no new task, so a busy pool rolls all the same.
    outdated.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    let replaced = if fresh.len() + created.len() >= size {
        outdated.len()
    } else {
        created.len().min(outdated.len())
    };
    retired.extend(outdated.drain(..replaced));
    let outdated_left = outdated.len();
    // No task has this uid: the next pass finds the claim's owner gone and kills the
    // sandbox, should this pass's kill not go through.
    let retiring = format!("retired-by-{uid}");
    let taken = futures::future::join_all(
        retired
            .iter()
            .map(|detail| take(provider, detail, &retiring)),
    )
    .await;
    doomed.extend(
        retired
            .iter()
            .zip(taken)
            .filter(|(_, taken)| matches!(taken, Ok(true)))
            .map(|(detail, _)| detail.sandbox_id.clone()),
    );
    let creating = wanted.saturating_sub(created.len());
    futures::future::join_all(doomed.iter().map(|id| provider.kill_sandbox(id))).await;
    if !doomed.is_empty() {
        tracing::info!(template = %template.name_any(), killed = doomed.len(), "warm pool: replaced or removed sandboxes");
    }
    let mut ready: Vec<Sandbox> = fresh.iter().map(access).collect();
    ready.extend(created);
    let ready_count = match (&key, pool) {
        (Some(key), Some(_)) => ctx.pools.replace(key, ready),
        (Some(key), None) => {
            ctx.pools.forget(key);
            0
        }
        _ => ready.len(),
    };
    let pool_name = format!(
        "{}/{}",
        template.namespace().unwrap_or_default(),
        template.name_any()
    );
    ctx.metrics.pool_ready(&pool_name, ready_count as i64);
    Ok(pool.map(|_| PoolStatus {
        ready: ready_count as i32,
        creating: creating as i32,
        outdated: outdated_left as i32,
        claimed,
        build_id: status.build_id.clone(),
    }))
}

/// Whether the template is gone or going, as the apiserver says now; an error says no,
/// and leaves what this pass made to the next look.
async fn being_deleted(ctx: &Context, template: &SandboxTemplate) -> bool {
    let templates: kube::Api<SandboxTemplate> = kube::Api::namespaced(
        ctx.client.clone(),
        &template.namespace().unwrap_or_default(),
    );
    match templates.get_opt(&template.name_any()).await {
        Ok(Some(now)) => now.metadata.deletion_timestamp.is_some(),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// What envd needs to reach a listed sandbox.
fn access(detail: &SandboxDetail) -> Sandbox {
    Sandbox {
        sandbox_id: detail.sandbox_id.clone(),
        template_id: detail.template_id.clone(),
        client_id: detail.client_id.clone(),
        envd_version: detail.envd_version.clone(),
        alias: detail.alias.clone(),
        envd_access_token: detail.envd_access_token.clone(),
        traffic_access_token: None,
        domain: detail.domain.clone(),
    }
}

/// The live tasks that may hold a pool sandbox: each uid with the sandbox its status
/// records, if any. `None` while the caches cannot say.
type Holders = Option<HashMap<String, Option<String>>>;

/// Reads the live tasks once per pass, from the caches: a pool with many running tasks
/// asks the apiserver nothing, and each claim is looked up rather than searched for.
async fn holders(ctx: &Context) -> Holders {
    let tasks = ctx.caches.tasks().await.ok()?;
    Some(
        tasks
            .iter()
            .filter_map(|guard| guard.0.as_ref().ok())
            .filter_map(|task| {
                let status = task.status.clone().unwrap_or_default();
                let ended = matches!(
                    status.phase,
                    Some(sandcastle_api::TaskPhase::Succeeded | sandcastle_api::TaskPhase::Failed)
                );
                let uid = task.meta().uid.clone()?;
                (!ended).then_some((uid, status.sandbox_id))
            })
            .collect(),
    )
}

/// Whether a claimed sandbox still belongs to a live task: the task of the claim's uid
/// exists, has not finished, and has recorded it (or claimed it only a moment ago).
fn claim_is_held(
    holders: &Holders,
    owner: &str,
    sandbox_id: &str,
    at: jiff::Timestamp,
    now: jiff::Timestamp,
) -> bool {
    // The caches cannot say yet: keep it until they can.
    let Some(holders) = holders else {
        return true;
    };
    let recent = now.duration_since(at).as_secs() < CLAIM_GRACE.as_secs() as i64;
    match holders.get(owner) {
        Some(recorded) => recorded.as_deref() == Some(sandbox_id) || recent,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_one_template_build() {
        let status: SandboxTemplateStatus =
            serde_json::from_value(serde_json::json!({"templateId": "t1", "buildId": "b2"}))
                .unwrap();
        assert_eq!(
            pool_key("team", "tools", &status).as_deref(),
            Some("team/tools/t1/b2")
        );
        let adopted: SandboxTemplateStatus =
            serde_json::from_value(serde_json::json!({"templateId": "base"})).unwrap();
        // Two templates adopting one provider template are two pools.
        assert_ne!(
            pool_key("team", "warm", &adopted),
            pool_key("team", "base", &adopted)
        );
        assert_eq!(
            pool_key("team", "warm", &SandboxTemplateStatus::default()),
            None
        );
    }

    /// The claim itself, against a real envd: of many claims of one sandbox at once, from
    /// as many clients (two operators across a leader change, say), exactly one holds.
    #[tokio::test(flavor = "multi_thread")]
    async fn of_concurrent_claims_exactly_one_holds() {
        let root = std::env::temp_dir().join(format!("sandcastle-claims-{}", std::process::id()));
        let server = sandcastle_sandboxd::Sandboxd::start(sandcastle_sandboxd::Config::new(&root))
            .await
            .expect("the embedded server");
        let provider = E2bClient::new(sandcastle_e2b::client::ClientConfig::with_urls(
            server.api_url(),
            server.sandbox_url(),
            "any-key",
        ))
        .expect("a client");
        let sandbox = provider
            .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(60)))
            .await
            .expect("a sandbox");
        mark_warm(&provider, &sandbox).await.expect("the warm mark");
        let claims = futures::future::join_all((0..16).map(|n| {
            let (provider, sandbox) = (provider.clone(), sandbox.clone());
            async move { take(&provider, &sandbox, &format!("uid-{n}")).await }
        }))
        .await;
        let held: Vec<usize> = claims
            .iter()
            .enumerate()
            .filter(|(_, claim)| matches!(claim, Ok(true)))
            .map(|(n, _)| n)
            .collect();
        assert!(claims.iter().all(Result::is_ok), "{claims:?}");
        assert_eq!(held.len(), 1, "claims that held: {held:?}");
        let marks: Vec<String> = provider
            .envd(&sandbox)
            .list_dir(POOL_DIR, 1)
            .await
            .expect("the claim's mark")
            .into_iter()
            .map(|mark| mark.name)
            .collect();
        assert_eq!(marks, [format!("claimed-uid-{}", held[0])]);
        server.stop().await;
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn pool_ready_says_how_full_the_pool_is_and_how_far_a_roll_is() {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        let pool = |ready, creating, outdated| PoolStatus {
            ready,
            creating,
            outdated,
            claimed: 1,
            build_id: Some("b2".into()),
        };
        for (state, size, expected) in [
            (pool(3, 0, 0), 3, ("True", "PoolFull", "3 of 3 warm")),
            (pool(0, 0, 0), 0, ("True", "PoolFull", "0 of 0 warm")),
            (
                pool(1, 2, 0),
                3,
                ("False", "PoolFilling", "1 of 3 warm, 2 being created"),
            ),
            (
                pool(2, 1, 1),
                3,
                (
                    "False",
                    "PoolRolling",
                    "2 of 3 warm of build b2; 1 of an older build still to replace",
                ),
            ),
        ] {
            let got = pool_condition(&[], size, &state, Some(4), &now);
            assert_eq!(
                (
                    got.status.as_str(),
                    got.reason.as_str(),
                    got.message.as_str()
                ),
                expected
            );
            assert_eq!(
                (got.type_.as_str(), got.observed_generation),
                ("PoolReady", Some(4))
            );
        }
    }

    #[test]
    fn a_claim_is_held_by_a_live_task_that_recorded_it_or_just_took_it() {
        let now: jiff::Timestamp = "2026-12-05T12:00:00Z".parse().unwrap();
        let long_ago: jiff::Timestamp = "2026-12-05T11:00:00Z".parse().unwrap();
        let holders: Holders = Some(HashMap::from([
            ("recorded".to_string(), Some("sbx".to_string())),
            ("elsewhere".to_string(), Some("other".to_string())),
            ("unrecorded".to_string(), None),
        ]));
        for (owner, at, held) in [
            ("recorded", long_ago, true),
            ("elsewhere", long_ago, false),
            ("elsewhere", now, true),
            ("unrecorded", now, true),
            ("unrecorded", long_ago, false),
            // Ended or deleted: not among the holders.
            ("gone", now, false),
        ] {
            assert_eq!(
                claim_is_held(&holders, owner, "sbx", at, now),
                held,
                "{owner} at {at}"
            );
        }
        assert!(claim_is_held(&None, "gone", "sbx", long_ago, now));
    }

    #[test]
    fn the_oldest_warm_sandbox_is_taken_first_once_and_not_put_back() {
        let pools = Pools::default();
        let sandbox = |id: &str| Sandbox {
            sandbox_id: id.into(),
            template_id: "t".into(),
            client_id: String::new(),
            envd_version: String::new(),
            alias: None,
            envd_access_token: None,
            traffic_access_token: None,
            domain: None,
        };
        pools.replace("t/", vec![sandbox("a"), sandbox("b")]);
        assert_eq!(pools.take("t/").map(|s| s.sandbox_id).as_deref(), Some("a"));
        assert_eq!(pools.take("t/").map(|s| s.sandbox_id).as_deref(), Some("b"));
        assert!(pools.take("t/").is_none());
        assert!(pools.take("other/").is_none());
        // A pass that read both as idle before the claims does not put them back, while
        // they are still listed; once they are gone, the ids are forgotten.
        assert_eq!(pools.replace("t/", vec![sandbox("a"), sandbox("c")]), 1);
        assert_eq!(pools.idle("t/").into_keys().collect::<Vec<_>>(), ["c"]);
        pools.prune_taken(&HashSet::from(["b", "c"]));
        assert_eq!(pools.replace("t/", vec![sandbox("a"), sandbox("b")]), 1);
        assert_eq!(pools.idle("t/").into_keys().collect::<Vec<_>>(), ["a"]);
    }
}
