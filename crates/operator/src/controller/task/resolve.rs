//! What a task needs before a sandbox: its template Ready, its Secrets read and its
//! environment built.

use super::*;
use crate::agent::invocation::McpValue;

/// Why a task's environment cannot be built yet. Names the Secret and key, never a value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnvError {
    #[error("Secret {0} does not exist")]
    MissingSecret(String),
    #[error("Secret {name} has no key {key}")]
    MissingKey { name: String, key: String },
    #[error(
        "Secret {0} of workspace.git.secretRef has no key password: it takes the kubernetes.io/basic-auth shape, a password or access token under password and, optionally, username"
    )]
    NotGitCredentials(String),
    #[error("cannot read Secret {name}: {source}")]
    Unreadable {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What a task's processes get from its Secrets: the agent its environment, the git steps
/// the repository's credentials.
pub(super) struct Inputs {
    pub env: BTreeMap<String, String>,
    pub git: Option<GitAuth>,
}

/// The task's [`Inputs`], with the Secret values they hold (for redaction).
pub(super) async fn resolve_env(
    ctx: &Context,
    task: &AgentTask,
) -> Result<(Inputs, Vec<String>), EnvError> {
    let namespace = task.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut cache: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut env = BTreeMap::new();
    let mut values = Vec::new();
    for source in &task.spec.env_from {
        let name = &source.secret_ref.name;
        let secret = fetch(&secrets, &mut cache, name).await?;
        match secret {
            Some(secret) => {
                for (key, value) in secret.data.unwrap_or_default() {
                    let value = String::from_utf8_lossy(&value.0).into_owned();
                    let prefix = source.prefix.clone().unwrap_or_default();
                    values.push(value.clone());
                    env.insert(format!("{prefix}{key}"), value);
                }
            }
            None if source.secret_ref.optional => {}
            None => return Err(EnvError::MissingSecret(name.clone())),
        }
    }
    for variable in &task.spec.env {
        if let Some(value) = &variable.value {
            env.insert(variable.name.clone(), value.clone());
            continue;
        }
        if let Some(source) = &variable.value_from
            && let Some(value) = read_key(&secrets, &mut cache, &source.secret_key_ref).await?
        {
            values.push(value.clone());
            env.insert(variable.name.clone(), value);
        }
    }
    // Values of MCP servers' env and headers from Secrets travel in variables of the
    // agent's own, which the CLI's configuration names.
    let servers = task
        .spec
        .agent
        .as_ref()
        .and_then(|agent| agent.claude_code.as_ref())
        .map(|claude| claude.mcp_servers.as_slice())
        .unwrap_or_default();
    for (i, server) in servers.iter().enumerate() {
        let sources = server
            .env
            .iter()
            .map(|var| (McpValue::Env, &var.value_from))
            .enumerate()
            .chain(
                server
                    .headers
                    .iter()
                    .map(|header| (McpValue::Header, &header.value_from))
                    .enumerate(),
            );
        for (j, (list, source)) in sources {
            if let Some(source) = source
                && let Some(value) = read_key(&secrets, &mut cache, &source.secret_key_ref).await?
            {
                values.push(value.clone());
                env.insert(invocation::mcp_secret_variable(i, list, j), value);
            }
        }
    }
    let git = match task
        .spec
        .workspace
        .git
        .as_ref()
        .and_then(|source| source.secret_ref.as_ref())
    {
        Some(reference) => {
            let secret = fetch(&secrets, &mut cache, &reference.name)
                .await?
                .ok_or_else(|| EnvError::MissingSecret(reference.name.clone()))?;
            let data = secret.data.unwrap_or_default();
            let read = |key: &str| {
                data.get(key)
                    .map(|value| String::from_utf8_lossy(&value.0).into_owned())
            };
            let password = read("password")
                .ok_or_else(|| EnvError::NotGitCredentials(reference.name.clone()))?;
            let username = read("username").unwrap_or_else(|| "git".into());
            values.push(password.clone());
            Some(GitAuth { username, password })
        }
        None => None,
    };
    Ok((Inputs { env, git }, values))
}

/// A Secret's key, `None` when the selector is optional and the key or Secret is missing.
async fn read_key(
    secrets: &Api<Secret>,
    cache: &mut BTreeMap<String, Option<Secret>>,
    selector: &sandcastle_api::SecretKeySelector,
) -> Result<Option<String>, EnvError> {
    let secret = fetch(secrets, cache, &selector.name).await?;
    let value = secret
        .as_ref()
        .and_then(|secret| secret.data.as_ref())
        .and_then(|data| data.get(&selector.key))
        .map(|value| String::from_utf8_lossy(&value.0).into_owned());
    match value {
        Some(value) => Ok(Some(value)),
        None if selector.optional => Ok(None),
        None if secret.is_none() => Err(EnvError::MissingSecret(selector.name.clone())),
        None => Err(EnvError::MissingKey {
            name: selector.name.clone(),
            key: selector.key.clone(),
        }),
    }
}

pub(super) async fn fetch(
    secrets: &Api<Secret>,
    cache: &mut BTreeMap<String, Option<Secret>>,
    name: &str,
) -> Result<Option<Secret>, EnvError> {
    if let Some(found) = cache.get(name) {
        return Ok(found.clone());
    }
    let found = secrets
        .get_opt(name)
        .await
        .map_err(|source| EnvError::Unreadable {
            name: name.to_string(),
            source,
        })?;
    cache.insert(name.to_string(), found.clone());
    Ok(found)
}

/// Waits for the task's template, saying why it is not Ready so the task alone shows what
/// to fix.
pub(super) async fn write_waiting_for_template(
    ctx: &Context,
    task: &AgentTask,
    template: Option<SandboxTemplate>,
) -> Result<Action, Error> {
    let message = template_wait_message(task, template.as_ref());
    write_waiting(
        ctx,
        task,
        TaskReason::TemplateNotReady,
        &message,
        WAIT_INTERVAL,
    )
    .await
}

/// Why the task waits for its template, in words that say what to fix: a template that
/// does not exist is named as such (the task waits for it, as a Pod waits for its
/// ConfigMap), a failed one with its reason.
pub(crate) fn template_wait_message(
    task: &AgentTask,
    template: Option<&SandboxTemplate>,
) -> String {
    let template_name = &task.spec.template_ref.name;
    let Some(template) = template else {
        let namespace = task.namespace().unwrap_or_default();
        return format!(
            "SandboxTemplate {template_name} does not exist in namespace {namespace}; waiting for it to be created"
        );
    };
    let failed = template
        .status
        .as_ref()
        .filter(|status| status.phase == Some(TemplatePhase::Failed))
        .and_then(|status| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_READY)
        });
    match failed {
        Some(ready) => format!(
            "waiting for SandboxTemplate {template_name} to be Ready; it failed ({}): {}",
            ready.reason,
            truncate(&ready.message, 512)
        ),
        None => format!("waiting for SandboxTemplate {template_name} to be Ready"),
    }
}

pub(super) async fn template_of(ctx: &Context, task: &AgentTask) -> Option<SandboxTemplate> {
    let namespace = task.namespace().unwrap_or_default();
    ctx.caches
        .template(&namespace, &task.spec.template_ref.name)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_says_whether_the_template_exists() {
        let task: AgentTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "t", "namespace": "team"},
            "spec": {"templateRef": {"name": "nope"}, "agent": {"command": {"command": ["true"]}}},
        }))
        .expect("a task");
        assert_eq!(
            template_wait_message(&task, None),
            "SandboxTemplate nope does not exist in namespace team; waiting for it to be created"
        );
        let building: SandboxTemplate = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
            "metadata": {"name": "nope", "namespace": "team"},
            "spec": {"existing": {"templateId": "base"}},
            "status": {"phase": "Building"},
        }))
        .expect("a template");
        assert_eq!(
            template_wait_message(&task, Some(&building)),
            "waiting for SandboxTemplate nope to be Ready"
        );
        let mut failed = building.clone();
        failed.status = serde_json::from_value(serde_json::json!({
            "phase": "Failed",
            "conditions": [{"type": "Ready", "status": "False", "reason": "BuildFailed",
                            "message": "step 2 failed", "lastTransitionTime": "2026-12-04T10:00:00Z"}],
        }))
        .expect("a status");
        assert_eq!(
            template_wait_message(&task, Some(&failed)),
            "waiting for SandboxTemplate nope to be Ready; it failed (BuildFailed): step 2 failed"
        );
    }
}
