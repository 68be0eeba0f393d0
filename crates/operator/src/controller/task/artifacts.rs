//! The task's artifacts: the workspace files `outputs.artifacts` chooses, hashed in the
//! sandbox and, as many as fit, kept in a ConfigMap the task owns. Which files, which fit
//! and what of them may be kept is decided in `agent::artifacts`.

use std::collections::HashSet;

use super::git::Interrupted;
use super::*;
use crate::agent::artifacts::{self, Kept};
use sandcastle_api::Artifact;

/// What the artifacts came to.
pub(super) struct Collected {
    pub artifacts: Vec<Artifact>,
    pub config_map: Option<String>,
    /// A pattern that must match and matched nothing.
    pub missing: Option<String>,
}

/// Hashes and keeps the files `outputs.artifacts` chooses from `after`, the workspace as
/// the agent left it.
pub(super) async fn collect(
    task: &AgentTask,
    ctx: &Context,
    envd: &EnvdClient,
    after: &Listing,
    redactor: &Redactor,
) -> Result<Collected, Interrupted> {
    let patterns = &task.spec.outputs.artifacts;
    // The patterns compiled when the task began; a failure here cannot happen.
    let matchers = artifacts::compile(patterns).unwrap_or_default();
    let (selected, missing) = artifacts::select(after, patterns, &matchers);
    let mut collected = Collected {
        artifacts: Vec::with_capacity(selected.len()),
        config_map: None,
        missing: missing.map(|missing| missing.0),
    };
    if selected.is_empty() {
        return Ok(collected);
    }
    let workspace = workspace(task);
    // One process hashes them all where they are: a file too large to keep is never
    // carried out of the sandbox just to be hashed.
    let mut hashing = CommandSpec::new("/bin/sh").cwd(workspace.clone());
    hashing.args = ["-c", r#"exec sha256sum -- "$@""#, "sh"]
        .map(String::from)
        .into_iter()
        .chain(selected.iter().map(|(path, _)| path.clone()))
        .collect();
    let sums = match envd.start(&hashing).await?.wait().await {
        Ok(output) if output.success() => artifacts::parse_sums(&output.stdout, selected.len()),
        _ => None,
    };
    let mut used = HashSet::new();
    let mut binary = serde_json::Map::new();
    for (index, ((path, size), fits)) in selected
        .iter()
        .zip(artifacts::fitting(&selected))
        .enumerate()
    {
        let mut artifact = Artifact {
            // Redacted before it is cut, as for `status.files`.
            path: files::cut_path(&redactor.redact(path), artifacts::MAX_ARTIFACT_NAME_BYTES),
            size: *size as i64,
            sha256: sums.as_ref().map(|sums| sums[index].clone()),
            key: None,
            redacted: false,
        };
        if fits {
            let bytes = envd.read_file(&format!("{workspace}/{path}")).await?;
            let kept = match artifacts::keep(bytes.to_vec(), redactor) {
                Kept::AsIs(bytes) => Some(bytes),
                Kept::Redacted(bytes) => {
                    artifact.redacted = true;
                    Some(bytes)
                }
                Kept::Withheld => None,
            };
            if let Some(bytes) = kept {
                let key = artifacts::key_for(path, &mut used);
                let encoded =
                    serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("bytes serialize");
                binary.insert(key.clone(), encoded);
                artifact.key = Some(key);
            }
        }
        collected.artifacts.push(artifact);
    }
    if !binary.is_empty() {
        let name = owned_name(task, "-artifacts");
        let contents = serde_json::json!({ "binaryData": binary });
        save_owned_config_map(ctx, task, &name, contents)
            .await
            .map_err(Interrupted::Kube)?;
        collected.config_map = Some(name);
    }
    Ok(collected)
}
