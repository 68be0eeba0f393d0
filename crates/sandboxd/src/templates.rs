//! Templates of the embedded server: prepared root directories built from steps, with build
//! records (status and log entries) like the real service's, persisted under the server root
//! so a restart keeps them and finishes builds it interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::runtime::{self, DEFAULT_USER, Launch, User};
use super::{State, random_id, random_uuid};
use sandcastle_e2b::envd::ENVD_VERSION;
use sandcastle_e2b::models::{
    BuildLogEntry, BuildStatus, BuildStatusReason, Template, TemplateBuildInfo,
    TemplateBuildRequest, TemplateBuildStart, TemplateStep,
};

pub const BASE_TEMPLATE: &str = "base";
/// Log entries kept per build; the oldest go first.
const MAX_LOG_ENTRIES: usize = 5000;
const MAX_LOG_MESSAGE: usize = 4096;
const MAX_PAGE: usize = 100;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub id: String,
    pub names: Vec<String>,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub created_at: String,
    pub updated_at: String,
    pub spawn_count: u64,
    pub last_spawned_at: Option<String>,
    pub builds: Vec<BuildRecord>,
}

/// What a built template gives the sandboxes started from it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Runtime {
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    pub status: BuildStatus,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub request: Option<TemplateBuildStart>,
    pub logs: Vec<BuildLogEntry>,
    pub reason: Option<BuildStatusReason>,
    pub runtime: Runtime,
}

/// A ready build a sandbox can start from.
pub struct Ready {
    pub template_id: String,
    pub alias: Option<String>,
    pub fs: PathBuf,
    pub runtime: Runtime,
    pub cpu_count: u32,
    pub memory_mb: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template '{0}' not found")]
    NotFound(String),
    #[error("build '{0}' not found")]
    BuildNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot delete template '{0}': it is public")]
    Public(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct Registry {
    dir: PathBuf,
    uploads: PathBuf,
    templates: Mutex<BTreeMap<String, TemplateRecord>>,
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn bare_name(reference: &str) -> &str {
    reference.split(':').next().unwrap_or(reference)
}

impl Registry {
    /// No templates and nowhere to keep any: envd inside a pod serves no template API.
    pub fn empty() -> Registry {
        Registry {
            dir: PathBuf::new(),
            uploads: PathBuf::new(),
            templates: Mutex::default(),
        }
    }

    pub fn load(root: &Path) -> std::io::Result<Registry> {
        let dir = root.join("templates");
        let uploads = root.join("uploads");
        let mut templates = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let record_path = entry?.path().join("template.json");
            if let Ok(text) = std::fs::read(&record_path) {
                match serde_json::from_slice::<TemplateRecord>(&text) {
                    Ok(record) => {
                        templates.insert(record.id.clone(), record);
                    }
                    Err(error) => {
                        tracing::warn!(path = %record_path.display(), %error, "ignoring unreadable template record")
                    }
                }
            }
        }
        if !templates.contains_key(BASE_TEMPLATE) {
            let base_fs = dir
                .join(BASE_TEMPLATE)
                .join("builds")
                .join(BASE_TEMPLATE)
                .join("fs");
            runtime::prepare_root(&base_fs)?;
            let at = now();
            let record = TemplateRecord {
                id: BASE_TEMPLATE.into(),
                names: vec![BASE_TEMPLATE.into()],
                cpu_count: 2,
                memory_mb: 1024,
                created_at: at.clone(),
                updated_at: at.clone(),
                spawn_count: 0,
                last_spawned_at: None,
                builds: vec![BuildRecord {
                    id: BASE_TEMPLATE.into(),
                    status: BuildStatus::Ready,
                    created_at: at.clone(),
                    updated_at: at.clone(),
                    finished_at: Some(at),
                    request: None,
                    logs: Vec::new(),
                    reason: None,
                    runtime: Runtime::default(),
                }],
            };
            templates.insert(record.id.clone(), record);
        }
        let registry = Registry {
            dir,
            uploads,
            templates: Mutex::new(templates),
        };
        for record in registry.templates.lock().expect("templates").values() {
            registry.persist(record)?;
        }
        Ok(registry)
    }

    fn persist(&self, record: &TemplateRecord) -> std::io::Result<()> {
        let dir = self.dir.join(&record.id);
        std::fs::create_dir_all(&dir)?;
        let temp = dir.join("template.json.tmp");
        std::fs::write(&temp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(temp, dir.join("template.json"))
    }

    fn update<T>(
        &self,
        template_id: &str,
        change: impl FnOnce(&mut TemplateRecord) -> Result<T, TemplateError>,
    ) -> Result<T, TemplateError> {
        let mut templates = self.templates.lock().expect("templates");
        let record = templates
            .get_mut(template_id)
            .ok_or_else(|| TemplateError::NotFound(template_id.to_string()))?;
        let result = change(record)?;
        record.updated_at = now();
        self.persist(record)?;
        Ok(result)
    }

    /// The template ID for an ID or a name (a `:tag` suffix is accepted and ignored).
    pub fn resolve(&self, reference: &str) -> Option<String> {
        let templates = self.templates.lock().expect("templates");
        if templates.contains_key(reference) {
            return Some(reference.to_string());
        }
        let name = bare_name(reference);
        templates
            .values()
            .find(|record| record.names.iter().any(|known| known == name))
            .map(|record| record.id.clone())
    }

    pub fn build_dir(&self, template_id: &str, build_id: &str) -> PathBuf {
        self.dir.join(template_id).join("builds").join(build_id)
    }

    pub fn upload_path(&self, template_id: &str, hash: &str) -> PathBuf {
        self.uploads
            .join(template_id)
            .join(format!("{hash}.tar.gz"))
    }

    /// The newest ready build of a template, counted as a spawn.
    pub fn ready(&self, reference: &str) -> Result<Ready, TemplateError> {
        let id = self
            .resolve(reference)
            .ok_or_else(|| TemplateError::NotFound(reference.to_string()))?;
        self.update(&id, |record| {
            let build = record
                .builds
                .iter()
                .rev()
                .find(|build| build.status == BuildStatus::Ready)
                .ok_or_else(|| {
                    TemplateError::Invalid(format!(
                        "template '{reference}' has no successful build"
                    ))
                })?
                .clone();
            record.spawn_count += 1;
            record.last_spawned_at = Some(now());
            Ok(Ready {
                template_id: record.id.clone(),
                alias: record.names.first().cloned(),
                fs: self.build_dir(&record.id, &build.id).join("fs"),
                runtime: build.runtime,
                cpu_count: record.cpu_count,
                memory_mb: record.memory_mb,
            })
        })
    }

    /// `POST /v3/templates`: a known name reuses its template and only adds a build.
    pub fn request_build(
        &self,
        request: &TemplateBuildRequest,
    ) -> Result<(TemplateRecord, String), TemplateError> {
        let (bare, cpu_count, memory_mb) = checked_build_request(request)?;
        let at = now();
        let build = BuildRecord {
            id: random_uuid(),
            status: BuildStatus::Waiting,
            created_at: at.clone(),
            updated_at: at.clone(),
            finished_at: None,
            request: None,
            logs: Vec::new(),
            reason: None,
            runtime: Runtime::default(),
        };
        let build_id = build.id.clone();
        let mut templates = self.templates.lock().expect("templates");
        let existing = templates
            .values()
            .find(|record| record.names.iter().any(|known| known == bare))
            .map(|record| record.id.clone());
        let id = existing.unwrap_or_else(|| random_id(20));
        let record = templates
            .entry(id.clone())
            .or_insert_with(|| TemplateRecord {
                id,
                names: vec![bare.to_string()],
                cpu_count,
                memory_mb,
                created_at: at.clone(),
                updated_at: at.clone(),
                spawn_count: 0,
                last_spawned_at: None,
                builds: Vec::new(),
            });
        record.cpu_count = cpu_count;
        record.memory_mb = memory_mb;
        record.updated_at = at;
        record.builds.push(build);
        self.persist(record)?;
        Ok((record.clone(), build_id))
    }

    /// `POST /v2/templates/{id}/builds/{buildID}`: checks the request, then builds in the
    /// background.
    pub fn start_build(
        &self,
        state: &Arc<State>,
        template_id: &str,
        build_id: &str,
        request: TemplateBuildStart,
    ) -> Result<(), TemplateError> {
        if request.from_template.is_some() && request.from_image.is_some() {
            return Err(TemplateError::Invalid(
                "fromImage and fromTemplate are mutually exclusive".into(),
            ));
        }
        if request.from_template.is_none() && request.from_image.is_none() {
            return Err(TemplateError::Invalid(
                "one of fromImage or fromTemplate is required".into(),
            ));
        }
        if let Some(from) = &request.from_template
            && self.resolve(from).is_none()
        {
            return Err(TemplateError::Invalid(format!(
                "template '{from}' to build from was not found"
            )));
        }
        for (index, step) in request.steps.iter().enumerate() {
            validate_step(index + 1, step)?;
            if let Some(hash) = &step.files_hash
                && !self.upload_path(template_id, hash).is_file()
            {
                return Err(TemplateError::Invalid(format!(
                    "step {}: files with hash {hash} were not uploaded",
                    index + 1
                )));
            }
        }
        self.update(template_id, |record| {
            let build = record
                .builds
                .iter_mut()
                .find(|build| build.id == build_id)
                .ok_or_else(|| TemplateError::BuildNotFound(build_id.to_string()))?;
            if build.status != BuildStatus::Waiting {
                return Err(TemplateError::Invalid(
                    "build is not in waiting state".into(),
                ));
            }
            build.status = BuildStatus::Building;
            build.updated_at = now();
            build.request = Some(request.clone());
            Ok(())
        })?;
        spawn_build(state, template_id, build_id, request);
        Ok(())
    }

    /// Builds that were running when the server stopped start over from their request.
    pub fn resume_interrupted(&self, state: &Arc<State>) {
        let interrupted: Vec<(String, String, TemplateBuildStart)> = self
            .templates
            .lock()
            .expect("templates")
            .values()
            .flat_map(|record| {
                record
                    .builds
                    .iter()
                    .filter_map(|build| match (&build.status, &build.request) {
                        (BuildStatus::Building, Some(request)) => {
                            Some((record.id.clone(), build.id.clone(), request.clone()))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (template_id, build_id, request) in interrupted {
            tracing::info!(template = %template_id, build = %build_id, "resuming interrupted build");
            spawn_build(state, &template_id, &build_id, request);
        }
    }

    pub fn build_info(
        &self,
        template_id: &str,
        build_id: &str,
        logs_offset: usize,
        limit: usize,
    ) -> Result<TemplateBuildInfo, TemplateError> {
        let templates = self.templates.lock().expect("templates");
        let record = templates
            .get(template_id)
            .ok_or_else(|| TemplateError::NotFound(template_id.to_string()))?;
        let build = record
            .builds
            .iter()
            .find(|build| build.id == build_id)
            .ok_or_else(|| TemplateError::BuildNotFound(build_id.to_string()))?;
        let limit = limit.clamp(1, MAX_PAGE);
        Ok(TemplateBuildInfo {
            template_id: record.id.clone(),
            build_id: build.id.clone(),
            status: build.status,
            logs: Vec::new(),
            log_entries: build
                .logs
                .iter()
                .skip(logs_offset)
                .take(limit)
                .cloned()
                .collect(),
            reason: build.reason.clone(),
        })
    }

    pub fn get(&self, reference: &str) -> Option<TemplateRecord> {
        let id = self.resolve(reference)?;
        self.templates.lock().expect("templates").get(&id).cloned()
    }

    pub fn list(&self) -> Vec<TemplateRecord> {
        self.templates
            .lock()
            .expect("templates")
            .values()
            .filter(|record| record.id != BASE_TEMPLATE)
            .cloned()
            .collect()
    }

    /// Removes a template with its builds and uploads. The caller checks it is unused.
    pub fn delete(&self, template_id: &str) -> Result<(), TemplateError> {
        if template_id == BASE_TEMPLATE {
            return Err(TemplateError::Public(template_id.into()));
        }
        self.templates
            .lock()
            .expect("templates")
            .remove(template_id)
            .ok_or_else(|| TemplateError::NotFound(template_id.to_string()))?;
        let _ = std::fs::remove_dir_all(self.dir.join(template_id));
        let _ = std::fs::remove_dir_all(self.uploads.join(template_id));
        Ok(())
    }

    fn log(
        &self,
        template_id: &str,
        build_id: &str,
        level: &str,
        step: Option<usize>,
        message: &str,
    ) {
        let mut message = message.to_string();
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let entry = BuildLogEntry {
            timestamp: now(),
            level: level.into(),
            message,
            step: step.map(|step| step.to_string()),
        };
        let mut templates = self.templates.lock().expect("templates");
        if let Some(build) = templates
            .get_mut(template_id)
            .and_then(|record| record.builds.iter_mut().find(|build| build.id == build_id))
        {
            if build.logs.len() >= MAX_LOG_ENTRIES {
                build.logs.remove(0);
            }
            build.logs.push(entry);
        }
    }

    fn finish(
        &self,
        template_id: &str,
        build_id: &str,
        outcome: Result<Runtime, BuildStatusReason>,
    ) {
        let _ = self.update(template_id, |record| {
            if let Some(build) = record.builds.iter_mut().find(|build| build.id == build_id) {
                let at = now();
                build.updated_at = at.clone();
                build.finished_at = Some(at);
                match outcome {
                    Ok(runtime) => {
                        build.status = BuildStatus::Ready;
                        build.runtime = runtime;
                    }
                    Err(mut reason) => {
                        reason.log_entries =
                            build.logs.iter().rev().take(20).rev().cloned().collect();
                        build.status = BuildStatus::Error;
                        build.reason = Some(reason);
                    }
                }
            }
            Ok(())
        });
    }
}

/// The name (without its tag), CPU count and memory of a `POST /v3/templates`, checked as
/// the service checks them.
pub(crate) fn checked_build_request(
    request: &TemplateBuildRequest,
) -> Result<(&str, u32, u32), TemplateError> {
    let name = request
        .name
        .as_deref()
        .or(request.alias.as_deref())
        .ok_or_else(|| TemplateError::Invalid("name is required".into()))?;
    let bare = bare_name(name);
    let valid = !bare.is_empty()
        && name.len() <= 128
        && bare
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_./".contains(c));
    if !valid {
        return Err(TemplateError::Invalid(format!(
            "invalid template name '{name}': use lowercase letters, digits, '-', '_' and '.', at most 128 characters"
        )));
    }
    if bare == BASE_TEMPLATE {
        return Err(TemplateError::Public(BASE_TEMPLATE.into()));
    }
    let cpu_count = request.cpu_count.unwrap_or(2);
    if !(cpu_count == 1 || (cpu_count.is_multiple_of(2) && (2..=32).contains(&cpu_count))) {
        return Err(TemplateError::Invalid(format!(
            "cpuCount must be 1 or an even number up to 32, got {cpu_count}"
        )));
    }
    let memory_mb = request.memory_mb.unwrap_or(1024);
    if memory_mb < 128 || !memory_mb.is_multiple_of(2) {
        return Err(TemplateError::Invalid(format!(
            "memoryMB must be even and at least 128, got {memory_mb}"
        )));
    }
    Ok((bare, cpu_count, memory_mb))
}

pub(crate) fn validate_step(number: usize, step: &TemplateStep) -> Result<(), TemplateError> {
    let invalid = |what: &str| {
        Err(TemplateError::Invalid(format!(
            "step {number} ({}): {what}",
            step.kind
        )))
    };
    match step.kind.to_ascii_uppercase().as_str() {
        "RUN" if step.args.is_empty() || step.args.len() > 2 => invalid("expects [command, user?]"),
        "COPY" | "ADD" if !(2..=4).contains(&step.args.len()) => {
            invalid("expects [src, dest, owner?, mode?]")
        }
        "COPY" | "ADD" if step.files_hash.is_none() => invalid("filesHash is required"),
        "ENV" | "ARG" if !step.args.len().is_multiple_of(2) => invalid("expects key/value pairs"),
        "WORKDIR" if step.args.len() != 1 => invalid("expects [path]"),
        "USER" if step.args.is_empty() || step.args.len() > 2 => invalid("expects [name, sudo?]"),
        "RUN" | "COPY" | "ADD" | "ENV" | "ARG" | "WORKDIR" | "USER" => Ok(()),
        _ => invalid("unknown step type"),
    }
}

fn spawn_build(state: &Arc<State>, template_id: &str, build_id: &str, request: TemplateBuildStart) {
    let state = state.clone();
    let template_id = template_id.to_string();
    let build_id = build_id.to_string();
    tokio::spawn(async move {
        let registry = &state.templates;
        let outcome = build(&state, &template_id, &build_id, &request).await;
        match &outcome {
            Ok(_) => registry.log(&template_id, &build_id, "info", None, "Build finished"),
            Err(reason) => registry.log(&template_id, &build_id, "error", None, &reason.message),
        }
        registry.finish(&template_id, &build_id, outcome);
    });
}

/// Runs the steps in a staging root copied from the base, then makes it the build's root.
async fn build(
    state: &Arc<State>,
    template_id: &str,
    build_id: &str,
    request: &TemplateBuildStart,
) -> Result<Runtime, BuildStatusReason> {
    let registry = &state.templates;
    let log = |level: &str, step: Option<usize>, message: &str| {
        registry.log(template_id, build_id, level, step, message)
    };
    let fail = |step: &str, message: String| BuildStatusReason {
        message,
        step: Some(step.to_string()),
        log_entries: Vec::new(),
    };
    let base = match (&request.from_template, &request.from_image) {
        (Some(from), _) => from.clone(),
        (None, Some(image)) => {
            log(
                "warn",
                None,
                &format!(
                    "the embedded server has no image registry: building on the base userland instead of image {image}"
                ),
            );
            BASE_TEMPLATE.to_string()
        }
        (None, None) => BASE_TEMPLATE.to_string(),
    };
    let base = registry
        .ready(&base)
        .map_err(|error| fail("base", error.to_string()))?;
    let dir = registry.build_dir(template_id, build_id);
    let staging = dir.join("fs.staging");
    let prepare = {
        let (from, staging, dir) = (base.fs.clone(), staging.clone(), dir.clone());
        move || -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&dir);
            copy_tree(&from, &staging)
        }
    };
    tokio::task::spawn_blocking(prepare)
        .await
        .map_err(|error| fail("base", error.to_string()))?
        .map_err(|error| fail("base", format!("cannot prepare the build root: {error}")))?;
    log(
        "info",
        None,
        &format!("Building from template {}", base.template_id),
    );

    let mut runtime = base.runtime.clone();
    runtime.start_cmd = request.start_cmd.clone().or(runtime.start_cmd);
    runtime.ready_cmd = request.ready_cmd.clone().or(runtime.ready_cmd);
    for (index, step) in request.steps.iter().enumerate() {
        let number = index + 1;
        log(
            "info",
            Some(number),
            &format!(
                "[{number}/{}] {} {}",
                request.steps.len(),
                step.kind.to_ascii_uppercase(),
                step.args.join(" ")
            ),
        );
        run_step(
            state,
            template_id,
            build_id,
            number,
            step,
            &staging,
            &mut runtime,
        )
        .await
        .map_err(|message| fail(&number.to_string(), message))?;
    }
    let finalize = {
        let (staging, dir) = (staging.clone(), dir.clone());
        move || std::fs::rename(&staging, dir.join("fs"))
    };
    tokio::task::spawn_blocking(finalize)
        .await
        .map_err(|error| fail("finalize", error.to_string()))?
        .map_err(|error| fail("finalize", error.to_string()))?;
    Ok(runtime)
}

fn step_user(runtime: &Runtime) -> User {
    runtime
        .user
        .as_deref()
        .and_then(runtime::user)
        .unwrap_or(runtime::ROOT)
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    state: &Arc<State>,
    template_id: &str,
    build_id: &str,
    number: usize,
    step: &TemplateStep,
    staging: &Path,
    runtime: &mut Runtime,
) -> Result<(), String> {
    let registry = &state.templates;
    let args = &step.args;
    match step.kind.to_ascii_uppercase().as_str() {
        "RUN" => {
            let user = match args.get(1) {
                Some(name) => {
                    let user = runtime::user(name).ok_or_else(|| {
                        format!(
                            "user '{name}' does not exist (the embedded server has root and user)"
                        )
                    })?;
                    runtime.user = Some(name.clone());
                    user
                }
                None => step_user(runtime),
            };
            let cwd = runtime
                .workdir
                .clone()
                .unwrap_or_else(|| user.home.to_string());
            let shell_args = vec!["-c".to_string(), args[0].clone()];
            let launch = Launch {
                fs: staging,
                user: &user,
                cwd: &cwd,
                env: runtime::process_env(&user, &runtime.env, &BTreeMap::new()),
                cmd: "/bin/bash",
                args: &shell_args,
                stdin: false,
                terminal: false,
                group: None,
            };
            let output = state
                .launcher
                .command(&launch)
                .map_err(|error| format!("cannot start the command: {error}"))?
                .output()
                .await
                .map_err(|error| format!("cannot start the command: {error}"))?;
            for (level, stream) in [("info", &output.stdout), ("info", &output.stderr)] {
                for line in String::from_utf8_lossy(stream).lines() {
                    registry.log(template_id, build_id, level, Some(number), line);
                }
            }
            if !output.status.success() {
                let end = runtime::end_event(output.status);
                return Err(format!("command failed: {}", end.status));
            }
            Ok(())
        }
        "COPY" | "ADD" => {
            let hash = step.files_hash.as_deref().unwrap_or_default();
            let archive = registry.upload_path(template_id, hash);
            let user = step_user(runtime);
            let dest = if args[1].starts_with('/') {
                args[1].clone()
            } else {
                format!(
                    "{}/{}",
                    runtime.workdir.as_deref().unwrap_or(user.home),
                    args[1]
                )
            };
            let target =
                runtime::resolve(staging, user.home, &dest).map_err(|error| error.to_string())?;
            let mode = match args.get(3).map(String::as_str) {
                None | Some("") => None,
                Some(text) => Some(
                    u32::from_str_radix(text, 8).map_err(|_| format!("invalid mode {text:?}"))?,
                ),
            };
            let src = args[0].clone();
            let into_dir = dest.ends_with('/');
            let scratch = staging.with_extension(format!("copy-{number}"));
            tokio::task::spawn_blocking(move || {
                copy_from_archive(&archive, &scratch, &src, &target, into_dir, mode)
            })
            .await
            .map_err(|error| error.to_string())?
        }
        "ENV" | "ARG" => {
            for pair in args.chunks(2) {
                runtime.env.insert(pair[0].clone(), pair[1].clone());
            }
            Ok(())
        }
        "WORKDIR" => {
            let user = step_user(runtime);
            let path = if args[0].starts_with('/') {
                args[0].clone()
            } else {
                format!(
                    "{}/{}",
                    runtime.workdir.as_deref().unwrap_or(user.home),
                    args[0]
                )
            };
            let host =
                runtime::resolve(staging, user.home, &path).map_err(|error| error.to_string())?;
            std::fs::create_dir_all(host).map_err(|error| error.to_string())?;
            runtime.workdir = Some(path);
            Ok(())
        }
        "USER" => {
            let name = &args[0];
            runtime::user(name).ok_or_else(|| {
                format!(
                    "user '{name}' cannot be created by the embedded server (it has root and user)"
                )
            })?;
            runtime.user = Some(name.clone());
            Ok(())
        }
        other => Err(format!("unknown step type {other}")),
    }
}

/// Unpacks an uploaded COPY archive and places `src` (a file, a directory, or a glob that
/// selected the archive's entries) at `target`.
fn copy_from_archive(
    archive: &Path,
    scratch: &Path,
    src: &str,
    target: &Path,
    into_dir: bool,
    mode: Option<u32>,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|error| error.to_string())?;
    let result = (|| {
        let file =
            std::fs::File::open(archive).map_err(|error| format!("cannot open upload: {error}"))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        tar.set_preserve_permissions(true);
        tar.unpack(scratch)
            .map_err(|error| format!("cannot unpack upload (it must be a gzipped tar): {error}"))?;
        let source = scratch.join(src.trim_start_matches("./").trim_end_matches('/'));
        let is_glob = src.contains(['*', '?', '[']);
        if !is_glob && source.is_file() {
            let destination = if into_dir || target.is_dir() {
                target.join(source.file_name().unwrap_or_default())
            } else {
                target.to_path_buf()
            };
            if let Some(parent) = destination.parent() {
                std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
            }
            std::fs::copy(&source, &destination).map_err(|error| error.to_string())?;
            apply_mode(&destination, mode)
        } else {
            let from = if !is_glob && source.is_dir() {
                source
            } else {
                scratch.to_path_buf()
            };
            copy_tree(&from, target).map_err(|error| error.to_string())?;
            apply_mode_tree(target, mode)
        }
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

fn apply_mode(path: &Path, mode: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match mode {
        Some(mode) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|error| error.to_string()),
        None => Ok(()),
    }
}

fn apply_mode_tree(root: &Path, mode: Option<u32>) -> Result<(), String> {
    if mode.is_none() {
        return Ok(());
    }
    for entry in std::fs::read_dir(root).map_err(|error| error.to_string())? {
        let path = entry.map_err(|error| error.to_string())?.path();
        if path.is_dir() {
            apply_mode_tree(&path, mode)?;
        } else {
            apply_mode(&path, mode)?;
        }
    }
    Ok(())
}

/// Copies a directory tree, keeping modes and symlinks (not following them).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The list and detail view of a template.
pub fn template_view(record: &TemplateRecord) -> Template {
    let last_ready = record
        .builds
        .iter()
        .rev()
        .find(|build| build.status == BuildStatus::Ready);
    let latest = record.builds.last();
    Template {
        template_id: record.id.clone(),
        build_id: last_ready.map(|build| build.id.clone()).unwrap_or_default(),
        cpu_count: record.cpu_count,
        memory_mb: record.memory_mb,
        disk_size_mb: 0,
        public: record.id == BASE_TEMPLATE,
        aliases: record.names.clone(),
        names: record.names.clone(),
        created_at: record.created_at.clone(),
        updated_at: record.updated_at.clone(),
        created_by: None,
        last_spawned_at: record.last_spawned_at.clone(),
        spawn_count: record.spawn_count,
        build_count: record.builds.len() as u64,
        envd_version: ENVD_VERSION.into(),
        build_status: latest
            .map(|build| build.status)
            .unwrap_or(BuildStatus::Waiting),
    }
}

/// The home of the user sandboxes from a template run as by default.
pub fn default_user(runtime: &Runtime) -> User {
    runtime
        .user
        .as_deref()
        .and_then(runtime::user)
        .unwrap_or(DEFAULT_USER)
}
