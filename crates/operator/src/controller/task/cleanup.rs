//! What a task leaves behind: sandboxes killed on deletion and expiry, finished tasks
//! deleted after their TTL, and the orphan sweep.

use super::*;

/// Kills the task's sandbox, by ID and by its metadata (one created but not yet recorded).
/// Fails when the provider could not be asked or refused; with no provider to ask there
/// is nothing to kill.
pub(super) async fn kill_sandboxes(
    ctx: &Context,
    task: &AgentTask,
    recorded: Option<&str>,
) -> Result<(), ProviderError> {
    let provider = match template_of(ctx, task).await {
        Some(template) => crate::controller::template::resolve_provider(ctx, &template)
            .await
            .ok()
            .or_else(|| ctx.default_provider.clone()),
        None => ctx.default_provider.clone(),
    };
    let Some(provider) = provider else {
        return Ok(());
    };
    if let Some(id) = recorded {
        provider.kill_sandbox(id).await?;
    }
    let query = ListQuery {
        metadata: BTreeMap::from([(
            TASK_UID.to_string(),
            task.metadata.uid.clone().unwrap_or_default(),
        )]),
        ..ListQuery::default()
    };
    for sandbox in provider.list_sandboxes(&query).await? {
        provider.kill_sandbox(&sandbox.sandbox_id).await?;
    }
    Ok(())
}

/// Deletes a finished task once its `ttlSecondsAfterFinished` has passed.
pub(super) async fn delete_if_expired(
    task: &AgentTask,
    ctx: &Context,
    status: &AgentTaskStatus,
) -> Result<Action, Error> {
    let (Some(ttl), Some(done)) = (
        task.spec.ttl_seconds_after_finished,
        &status.completion_time,
    ) else {
        return Ok(Action::await_change());
    };
    let expires = done
        .0
        .checked_add(jiff::SignedDuration::from_secs(ttl))
        .unwrap_or(done.0);
    let left = expires - jiff::Timestamp::now();
    if left.get_seconds() > 0 {
        return Ok(Action::requeue(Duration::from_secs(
            left.get_seconds() as u64
        )));
    }
    let api: Api<AgentTask> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    api.delete(&task.name_any(), &DeleteParams::default())
        .await?;
    Ok(Action::await_change())
}

/// A deleted task takes its sandbox with it: the finalizer stays until the provider has
/// confirmed the kill, so a provider outage delays the deletion rather than leaking the
/// sandbox.
pub(super) async fn cleanup(task: &AgentTask, ctx: &Context) -> Result<Action, Error> {
    if let Some(uid) = &task.metadata.uid {
        ctx.memory.forget_deleted(uid);
    }
    if let Err(error) = kill_sandboxes(ctx, task, previous(task).sandbox_id.as_deref()).await {
        let message = format!("cannot kill the task's sandbox yet: {error}");
        publish_event(
            ctx,
            task,
            EventType::Warning,
            TaskReason::CleanupBlocked,
            message.clone(),
        )
        .await;
        return Err(Error::CleanupBlocked(message));
    }
    Ok(Action::await_change())
}

/// Kills the sandboxes this operator made whose task is gone or finished, on every
/// provider a task can have a sandbox on: the default one, the embedded one, and the
/// E2B account of each template that names its own.
pub(crate) async fn sweep_orphans(ctx: &Context) {
    for provider in sweep_providers(ctx).await {
        sweep_provider(ctx, &provider).await;
    }
}

/// The providers to sweep, each account once (by API URL and key).
async fn sweep_providers(ctx: &Context) -> Vec<E2bClient> {
    let mut providers: Vec<E2bClient> = ctx
        .default_provider
        .iter()
        .chain(ctx.embedded.iter())
        .cloned()
        .collect();
    let templates = ctx.caches.templates().await.unwrap_or_default();
    for template in templates {
        let own = template
            .spec
            .provider
            .as_ref()
            .is_some_and(|provider| provider.e2b.is_some());
        if own
            && let Ok(provider) =
                crate::controller::template::resolve_provider(ctx, &template).await
        {
            providers.push(provider);
        }
    }
    let mut seen = std::collections::HashSet::new();
    providers.retain(|provider| {
        let config = provider.config();
        seen.insert((config.api_url.clone(), config.api_key.expose().to_string()))
    });
    providers
}

async fn sweep_provider(ctx: &Context, provider: &E2bClient) {
    sweep_mcp_sandboxes(ctx, provider).await;
    let query = ListQuery {
        metadata: BTreeMap::from([(OPERATOR.to_string(), ctx.instance.clone())]),
        ..ListQuery::default()
    };
    let Ok(sandboxes) = provider.list_sandboxes(&query).await else {
        return;
    };
    for sandbox in sandboxes {
        let metadata = sandbox.metadata.clone().unwrap_or_default();
        let (Some(namespace), Some(name), Some(uid)) = (
            metadata.get(TASK_NAMESPACE),
            metadata.get(TASK_NAME),
            metadata.get(TASK_UID),
        ) else {
            continue;
        };
        if !ctx.scope.covers(namespace) {
            continue;
        }
        let tasks: Api<AgentTask> = Api::namespaced(ctx.client.clone(), namespace);
        let owner = match tasks.get_opt(name).await {
            Ok(found) => found,
            Err(_) => continue,
        };
        let owned = owner.filter(|task| task.metadata.uid.as_deref() == Some(uid.as_str()));
        let finished = owned
            .as_ref()
            .is_some_and(|task| is_terminal(task.status.as_ref().and_then(|s| s.phase)));
        if owned.is_none() || finished {
            tracing::info!(sandbox = %sandbox.sandbox_id, %namespace, %name, finished, "killing an orphaned sandbox");
            let _ = provider.kill_sandbox(&sandbox.sandbox_id).await;
        }
    }
}

/// Kills the sandboxes of MCP servers that are gone: each names the Lease its server
/// renews, and a Lease that is missing or ran out (by more than its own duration, for the
/// clocks' sake) means the server crashed without killing them. A sandbox that names no
/// Lease (a server without a cluster) is left to its own lifetime on the provider.
async fn sweep_mcp_sandboxes(ctx: &Context, provider: &E2bClient) {
    use k8s_openapi::api::coordination::v1::Lease;
    use sandcastle_api::names::{MADE_BY_MCP, SANDBOX_MADE_BY, SANDBOX_MCP_LEASE};
    let query = ListQuery {
        metadata: BTreeMap::from([(SANDBOX_MADE_BY.to_string(), MADE_BY_MCP.to_string())]),
        ..ListQuery::default()
    };
    let Ok(sandboxes) = provider.list_sandboxes(&query).await else {
        return;
    };
    for sandbox in sandboxes {
        let metadata = sandbox.metadata.clone().unwrap_or_default();
        let Some((namespace, name)) = metadata
            .get(SANDBOX_MCP_LEASE)
            .and_then(|lease| lease.split_once('/'))
        else {
            continue;
        };
        if !ctx.scope.covers(namespace) {
            continue;
        }
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), namespace);
        let lease = match leases.get_opt(name).await {
            Ok(found) => found,
            Err(_) => continue,
        };
        if mcp_server_lives(lease.as_ref(), jiff::Timestamp::now()) {
            continue;
        }
        tracing::info!(sandbox = %sandbox.sandbox_id, lease = %format!("{namespace}/{name}"), "killing a sandbox of a vanished MCP server");
        let _ = provider.kill_sandbox(&sandbox.sandbox_id).await;
    }
}

/// Whether the MCP server holding `lease` still renews it; no Lease means it is gone.
fn mcp_server_lives(
    lease: Option<&k8s_openapi::api::coordination::v1::Lease>,
    now: jiff::Timestamp,
) -> bool {
    lease.is_some_and(|lease| sandcastle_mcp::liveness::holder_lives(lease, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(renewed: Option<jiff::Timestamp>, seconds: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: renewed.map(MicroTime),
                lease_duration_seconds: seconds,
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn an_mcp_server_lives_while_its_lease_is_renewed() {
        let now: jiff::Timestamp = "2026-12-06T05:00:00Z".parse().unwrap();
        let ago = |seconds: i64| now - jiff::SignedDuration::from_secs(seconds);
        let cases = [
            ("no Lease", None, false),
            (
                "renewed just now",
                Some(lease(Some(ago(1)), Some(30))),
                true,
            ),
            (
                "late within twice its duration",
                Some(lease(Some(ago(59)), Some(30))),
                true,
            ),
            ("run out", Some(lease(Some(ago(61)), Some(30))), false),
            ("never renewed", Some(lease(None, Some(30))), false),
            ("no duration", Some(lease(Some(ago(1)), None)), false),
        ];
        for (case, lease, lives) in cases {
            assert_eq!(mcp_server_lives(lease.as_ref(), now), lives, "{case}");
        }
    }
}
