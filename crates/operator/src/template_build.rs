//! What a `SandboxTemplate` asks the provider to build, and how its status reads, free of
//! I/O: the spec hash (which decides whether a build is needed), the translation of the
//! spec into E2B build steps, the log tail, and the status for each stage.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sha2::{Digest, Sha256};

use crate::text::truncate;
use sandcastle_api::conditions::{Standing, triplet};
use sandcastle_api::{
    BuildStep, SandboxTemplateStatus, TemplateBuild, TemplatePhase, TemplateReason,
};
use sandcastle_api::{MAX_LOG_LINE_CHARS, MAX_LOG_TAIL_LINES, MAX_MESSAGE_CHARS};
use sandcastle_e2b::models::{TemplateBuildRequest, TemplateBuildStart, TemplateStep};
use sandcastle_e2b::template::{ContextFile, CopyLayer};

/// The data of the ConfigMaps that `copy` steps name, by ConfigMap name.
pub type ConfigMapData = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// The ConfigMaps `copy` steps read, in step order, without repeats.
pub fn referenced_config_maps(build: &TemplateBuild) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for step in &build.steps {
        if let Some(copy) = &step.copy
            && !names.contains(&copy.config_map_ref.name)
        {
            names.push(copy.config_map_ref.name.clone());
        }
    }
    names
}

/// A digest of everything that shapes the build: the build spec, which provider builds it,
/// and the content of every ConfigMap a `copy` step reads. Equal hashes mean the build
/// the status records is still the right one.
pub fn spec_hash(build: &TemplateBuild, provider: &str, config_maps: &ConfigMapData) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(b"sandcastle/template-build/v1");
    field(provider.as_bytes());
    field(&serde_json::to_vec(build).expect("build spec serializes"));
    for name in referenced_config_maps(build) {
        field(name.as_bytes());
        for (key, value) in config_maps.get(&name).into_iter().flatten() {
            field(key.as_bytes());
            field(value);
        }
    }
    let digest = hasher.finalize();
    digest
        .iter()
        .take(16)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The name the template gets on the provider: the spec's, else one derived from the
/// object so two namespaces never collide.
pub fn template_name(build: &TemplateBuild, namespace: &str, name: &str) -> String {
    build
        .name
        .clone()
        .unwrap_or_else(|| format!("{namespace}-{name}").to_ascii_lowercase())
}

/// Everything the provider needs for one build.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    pub request: TemplateBuildRequest,
    pub start: TemplateBuildStart,
    /// The COPY sources to upload before the build starts.
    pub layers: Vec<CopyLayer>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("ConfigMap {0} is missing")]
    MissingConfigMap(String),
    #[error("step {step}: {message}")]
    InvalidStep { step: usize, message: String },
}

/// Translates the spec into the provider's build request and steps. Each ConfigMap key of
/// a `copy` step becomes a file of that name under `dest`.
pub fn plan(
    build: &TemplateBuild,
    template_name: &str,
    config_maps: &ConfigMapData,
) -> Result<BuildPlan, PlanError> {
    let mut steps = Vec::with_capacity(build.steps.len());
    let mut layers = Vec::new();
    for (index, step) in build.steps.iter().enumerate() {
        let number = index + 1;
        let (wire, layer) = translate(number, step, config_maps)?;
        steps.push(wire);
        layers.extend(layer);
    }
    Ok(BuildPlan {
        request: TemplateBuildRequest {
            name: Some(template_name.to_string()),
            alias: None,
            tags: None,
            cpu_count: Some(build.cpu_count as u32),
            memory_mb: Some(build.memory_mb as u32),
        },
        start: TemplateBuildStart {
            from_image: build.from_image.clone(),
            from_template: build.from_template.clone(),
            force: false,
            steps,
            start_cmd: build.start_cmd.clone(),
            ready_cmd: build.ready_cmd.clone(),
        },
        layers,
    })
}

fn step(kind: &str, args: Vec<String>) -> TemplateStep {
    TemplateStep {
        kind: kind.into(),
        args,
        files_hash: None,
        force: false,
    }
}

fn translate(
    number: usize,
    spec: &BuildStep,
    config_maps: &ConfigMapData,
) -> Result<(TemplateStep, Option<CopyLayer>), PlanError> {
    let invalid = |message: String| PlanError::InvalidStep {
        step: number,
        message,
    };
    if let Some(run) = &spec.run {
        return Ok((step("RUN", vec![run.clone()]), None));
    }
    if let Some(env) = &spec.env {
        let args = env
            .iter()
            .flat_map(|(key, value)| [key.clone(), value.clone()])
            .collect();
        return Ok((step("ENV", args), None));
    }
    if let Some(workdir) = &spec.workdir {
        return Ok((step("WORKDIR", vec![workdir.clone()]), None));
    }
    if let Some(user) = &spec.user {
        let mut args = vec![user.name.clone()];
        if user.sudo {
            args.push("true".into());
        }
        return Ok((step("USER", args), None));
    }
    let Some(copy) = &spec.copy else {
        return Err(invalid("sets no instruction".into()));
    };
    let name = &copy.config_map_ref.name;
    let data = config_maps
        .get(name)
        .ok_or_else(|| PlanError::MissingConfigMap(name.clone()))?;
    let mode = match &copy.mode {
        Some(text) => u32::from_str_radix(text, 8)
            .map_err(|_| invalid(format!("mode {text:?} is not octal")))?,
        None => 0o644,
    };
    let files = data
        .iter()
        .map(|(key, value)| ContextFile::new(format!("{name}/{key}"), mode, value.clone()))
        .collect();
    let dest = format!("{}/", copy.dest.trim_end_matches('/'));
    let mut layer = CopyLayer::new(name.clone(), dest, files)
        .map_err(|error| invalid(error.to_string()))?
        .with_mode(mode);
    if let Some(owner) = &copy.owner {
        layer = layer.with_owner(owner.clone());
    }
    Ok((layer.step(), Some(layer)))
}

/// The status log tail: the newest lines, each cut to the schema's limit.
pub fn extend_log_tail(tail: &mut Vec<String>, lines: impl IntoIterator<Item = String>) {
    for line in lines {
        tail.push(truncate(&line, MAX_LOG_LINE_CHARS as usize));
    }
    let excess = tail.len().saturating_sub(MAX_LOG_TAIL_LINES as usize);
    tail.drain(..excess);
}

/// Whether a build started at `started` has run past its `timeoutSeconds` at `now`.
pub fn timed_out(started: &Time, timeout_seconds: Option<i32>, now: &Time) -> bool {
    timeout_seconds.is_some_and(|limit| {
        now.0.duration_since(started.0) > jiff::SignedDuration::from_secs(i64::from(limit))
    })
}

/// The provider's failed-step marker (a 1-based index as text, or "base"/"finalize").
pub fn failed_step(step: Option<&str>) -> Option<i32> {
    step.and_then(|step| step.parse().ok())
}

/// The status for a stage, with conditions that keep their transition times. `Ready`
/// follows the phase; `Reconciling` is true while work is under way; `Stalled` is true
/// when only a change can help.
pub fn status(
    previous: &SandboxTemplateStatus,
    generation: Option<i64>,
    phase: TemplatePhase,
    reason: TemplateReason,
    message: &str,
    now: &Time,
) -> SandboxTemplateStatus {
    let message = truncate(message, MAX_MESSAGE_CHARS as usize);
    let standing = Standing {
        ready: phase == TemplatePhase::Ready,
        reconciling: matches!(phase, TemplatePhase::Pending | TemplatePhase::Building)
            && !reason.is_stalled(),
        stalled: reason.is_stalled(),
    };
    let new_conditions = triplet(
        &previous.conditions,
        standing,
        reason.as_str(),
        &message,
        generation,
        now,
    );
    SandboxTemplateStatus {
        phase: Some(phase),
        conditions: new_conditions,
        observed_generation: generation,
        message: Some(message),
        ..previous.clone()
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(1_780_000_000 + second).expect("a time"))
    }

    #[test]
    fn a_build_times_out_only_past_its_limit() {
        assert!(
            !timed_out(&at(0), None, &at(100_000)),
            "no limit, no timeout"
        );
        assert!(!timed_out(&at(0), Some(60), &at(60)));
        assert!(timed_out(&at(0), Some(60), &at(61)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcastle_api::{
        CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED, CopyStep, LocalObjectReference,
        StepUser,
    };

    fn build(steps: Vec<BuildStep>) -> TemplateBuild {
        serde_json::from_value(serde_json::json!({"fromTemplate": "base"}))
            .map(|mut build: TemplateBuild| {
                build.steps = steps;
                build
            })
            .unwrap()
    }

    fn copy_step(config_map: &str, dest: &str) -> BuildStep {
        BuildStep {
            copy: Some(CopyStep {
                config_map_ref: LocalObjectReference {
                    name: config_map.into(),
                },
                dest: dest.into(),
                mode: Some("0755".into()),
                owner: None,
            }),
            ..empty_step()
        }
    }

    fn empty_step() -> BuildStep {
        BuildStep {
            run: None,
            env: None,
            workdir: None,
            user: None,
            copy: None,
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn hash_follows_spec_provider_and_config_map_content() {
        let spec = build(vec![copy_step("scripts", "/app")]);
        let maps = ConfigMapData::from([("scripts".to_string(), data(&[("a.sh", "echo a")]))]);
        let base = spec_hash(&spec, "embedded", &maps);
        assert_eq!(base, spec_hash(&spec, "embedded", &maps.clone()));
        assert_ne!(base, spec_hash(&spec, "e2b:https://api.e2b.app", &maps));
        let changed = ConfigMapData::from([("scripts".to_string(), data(&[("a.sh", "echo b")]))]);
        assert_ne!(base, spec_hash(&spec, "embedded", &changed));
        let unrelated = {
            let mut maps = maps.clone();
            maps.insert("other".into(), data(&[("x", "y")]));
            maps
        };
        assert_eq!(base, spec_hash(&spec, "embedded", &unrelated));
        let mut bigger = spec.clone();
        bigger.cpu_count = 4;
        assert_ne!(base, spec_hash(&bigger, "embedded", &maps));
    }

    #[test]
    fn steps_translate_to_the_wire_in_order() {
        let spec = build(vec![
            BuildStep {
                env: Some(BTreeMap::from([("A".into(), "1".into())])),
                ..empty_step()
            },
            BuildStep {
                run: Some("make".into()),
                ..empty_step()
            },
            BuildStep {
                workdir: Some("/app".into()),
                ..empty_step()
            },
            BuildStep {
                user: Some(StepUser {
                    name: "user".into(),
                    sudo: true,
                }),
                ..empty_step()
            },
            copy_step("scripts", "/app/bin"),
        ]);
        let maps = ConfigMapData::from([("scripts".to_string(), data(&[("a.sh", "echo a")]))]);
        let plan = plan(&spec, "team-tpl", &maps).unwrap();
        let kinds: Vec<(&str, Vec<&str>)> = plan
            .start
            .steps
            .iter()
            .map(|step| {
                (
                    step.kind.as_str(),
                    step.args.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("ENV", vec!["A", "1"]),
                ("RUN", vec!["make"]),
                ("WORKDIR", vec!["/app"]),
                ("USER", vec!["user", "true"]),
                ("COPY", vec!["scripts", "/app/bin/", "", "0755"]),
            ]
        );
        assert_eq!(plan.layers.len(), 1);
        assert_eq!(
            plan.start.steps[4].files_hash.as_deref(),
            Some(plan.layers[0].files_hash().as_str())
        );
        assert_eq!(plan.request.name.as_deref(), Some("team-tpl"));
        assert_eq!(plan.start.from_template.as_deref(), Some("base"));
    }

    #[test]
    fn a_missing_config_map_is_named() {
        let spec = build(vec![copy_step("absent", "/app")]);
        assert_eq!(
            plan(&spec, "t", &ConfigMapData::new()).unwrap_err(),
            PlanError::MissingConfigMap("absent".into())
        );
    }

    #[test]
    fn log_tail_keeps_the_newest_lines_cut_to_size() {
        let mut tail = Vec::new();
        extend_log_tail(&mut tail, (0..60).map(|n| format!("line {n}")));
        assert_eq!(tail.len(), MAX_LOG_TAIL_LINES as usize);
        assert_eq!(tail.first().unwrap(), "line 10");
        extend_log_tail(&mut tail, ["x".repeat(5000)]);
        assert_eq!(
            tail.last().unwrap().chars().count(),
            MAX_LOG_LINE_CHARS as usize
        );
        assert_eq!(failed_step(Some("3")), Some(3));
        assert_eq!(failed_step(Some("finalize")), None);
    }

    #[test]
    fn conditions_follow_the_stage() {
        let now = Time(jiff::Timestamp::now());
        let building = status(
            &SandboxTemplateStatus::default(),
            Some(2),
            TemplatePhase::Building,
            TemplateReason::Building,
            "step 1",
            &now,
        );
        let get = |status: &SandboxTemplateStatus, type_: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(get(&building, CONDITION_READY), "False");
        assert_eq!(get(&building, CONDITION_RECONCILING), "True");
        assert_eq!(get(&building, CONDITION_STALLED), "False");
        let failed = status(
            &building,
            Some(2),
            TemplatePhase::Failed,
            TemplateReason::BuildFailed,
            "step 3 failed",
            &now,
        );
        assert_eq!(get(&failed, CONDITION_RECONCILING), "False");
        assert_eq!(get(&failed, CONDITION_STALLED), "True");
        let missing = status(
            &SandboxTemplateStatus::default(),
            Some(1),
            TemplatePhase::Pending,
            TemplateReason::MissingCredentials,
            "Secret e2b is missing",
            &now,
        );
        assert_eq!(get(&missing, CONDITION_STALLED), "True");
        assert_eq!(get(&missing, CONDITION_RECONCILING), "False");
        let ready = status(
            &failed,
            Some(3),
            TemplatePhase::Ready,
            TemplateReason::BuildSucceeded,
            "built",
            &now,
        );
        assert_eq!(get(&ready, CONDITION_READY), "True");
        assert_eq!(ready.observed_generation, Some(3));
    }
}
