//! Template builds that change the image. The E2B build steps become a Dockerfile and a
//! build context (the Dockerfile plus the files COPY steps uploaded); kaniko builds it in
//! a Job and pushes the image to the configured repository, and the template resolves
//! to the pushed digest. Everything here is pure: `api` creates and reads the objects.
//!
//! kaniko rather than BuildKit or buildah: it runs unprivileged in an ordinary pod (root
//! with six file capabilities, allowed by the baseline Pod Security profile), needs no
//! daemon, no user namespaces and no FUSE, and takes its context from a tarball, which a
//! ConfigMap can carry.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::objects::{MANAGED_BY, MANAGER};
use sandcastle_e2b::models::{BuildLogEntry, TemplateStep};

/// A ConfigMap holds at most 1 MiB; the context and the Dockerfile share one.
pub const MAX_CONTEXT_BYTES: usize = 1000 * 1024;
/// The largest COPY upload, which is kept in a ConfigMap of its own.
pub const MAX_UPLOAD_BYTES: usize = 1000 * 1024;
pub const BUILD_ID: &str = "e2b.sandcastle.dev/build-id";
/// The template a build object belongs to (not the templates' own label, so that no
/// listing of templates finds them).
pub const BUILD_OF: &str = "e2b.sandcastle.dev/build-of";
pub const FILES_OF: &str = "e2b.sandcastle.dev/files-of";
pub const UPLOAD_TOKEN: &str = "e2b.sandcastle.dev/upload-token";
pub const UPLOAD_KEY: &str = "files.tar.gz";
const CONTEXT_KEY: &str = "context.tar.gz";
const DOCKERFILE_KEY: &str = "Dockerfile";
pub const CONTAINER: &str = "kaniko";

/// Where and how images are built.
#[derive(Clone, Debug)]
pub struct BuilderConfig {
    /// kaniko's executor image (`tools/images/build-builder-image.sh`).
    pub image: String,
    /// Built images go to `<repository>/<template id>`: a `host[:port]/path` that the
    /// build pods push to and the nodes pull from.
    pub repository: String,
    /// The registry speaks plain HTTP.
    pub insecure: bool,
    /// The Jobs' namespace. kaniko runs as root, so it must admit the baseline profile.
    pub namespace: String,
    pub timeout: Duration,
}

/// The settings a template's sandboxes start with, which its children inherit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// A Dockerfile made of a build's steps: after `FROM`, each line with the step it came
/// from (`None` for the settings inherited from a parent template).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub from: String,
    pub lines: Vec<(String, Option<u32>)>,
    /// The uploads COPY steps take files from, each once per mode it is copied with.
    pub uploads: Vec<Upload>,
    pub settings: Settings,
}

/// An upload as a COPY step places it. A COPY's mode is given to the upload's files in
/// the context rather than by `COPY --chmod`, which would give it to directories too
/// (making a `0644` directory untraversable); the local runtime sets it on files only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub hash: String,
    pub mode: Option<u32>,
}

impl Upload {
    /// Its folder in the context.
    fn folder(&self) -> String {
        match self.mode {
            Some(mode) => format!("{}-{mode:o}", self.hash),
            None => self.hash.clone(),
        }
    }
}

impl Plan {
    pub fn dockerfile(&self) -> String {
        let mut text = format!("FROM {}\n", self.from);
        for (line, _) in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Whether the image must be built: steps that only change settings do not.
    pub fn changes_image(&self, steps: &[TemplateStep]) -> bool {
        steps
            .iter()
            .any(|step| matches!(kind(step).as_str(), "RUN" | "COPY" | "ADD"))
    }
}

fn kind(step: &TemplateStep) -> String {
    step.kind.to_ascii_uppercase()
}

/// A Dockerfile double-quoted word: no substitution, no line break.
fn quoted(text: &str) -> Result<String, String> {
    if text.contains(['\n', '\r']) {
        return Err("a line break cannot be part of this value".into());
    }
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// A bare Dockerfile word (WORKDIR, USER): no substitution, no line break.
fn bare(text: &str) -> Result<String, String> {
    if text.contains(['\n', '\r']) || text.trim().is_empty() {
        return Err(format!("{text:?} is not a usable value"));
    }
    Ok(text.replace('\\', "\\\\").replace('$', "\\$"))
}

fn env_name(name: &str) -> Result<&str, String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a variable name"))
    }
}

/// The context path of a COPY source: relative, inside the upload's folder.
fn copy_source(folder: &str, src: &str) -> Result<String, String> {
    let trimmed = src.trim_start_matches("./");
    if src.starts_with('/') || src.split('/').any(|part| part == "..") {
        return Err(format!("COPY source {src:?} must stay inside the context"));
    }
    Ok(match trimmed {
        "" | "." => format!("files/{folder}/"),
        path => format!("files/{folder}/{path}"),
    })
}

/// The Dockerfile of a build, or the step that cannot be expressed. RUN runs under
/// `/bin/bash -c`, as the local runtime runs it; a RUN naming a user switches to it for
/// the rest of the build, as there.
pub fn plan(
    from: &str,
    inherited: &Settings,
    steps: &[TemplateStep],
) -> Result<Plan, (u32, String)> {
    let mut lines = Vec::new();
    let mut settings = inherited.clone();
    for (name, value) in &inherited.env {
        let line = format!(
            "ENV {}={}",
            env_name(name).map_err(|e| (0, e))?,
            quoted(value).map_err(|e| (0, e))?
        );
        lines.push((line, None));
    }
    if let Some(workdir) = &inherited.workdir {
        lines.push((
            format!("WORKDIR {}", bare(workdir).map_err(|e| (0, e))?),
            None,
        ));
    }
    if let Some(user) = &inherited.user {
        lines.push((format!("USER {}", bare(user).map_err(|e| (0, e))?), None));
    }
    let mut uploads = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let number = index as u32 + 1;
        let at = |message: String| (number, message);
        let args = &step.args;
        let mut push = |line: String| lines.push((line, Some(number)));
        match kind(step).as_str() {
            "RUN" => {
                if let Some(user) = args.get(1).filter(|user| !user.is_empty()) {
                    push(format!("USER {}", bare(user).map_err(at)?));
                    settings.user = Some(user.clone());
                }
                let argv = ["/bin/bash", "-c", args[0].as_str()];
                push(format!(
                    "RUN {}",
                    serde_json::to_string(&argv).expect("strings")
                ));
            }
            "COPY" | "ADD" => {
                let hash = step.files_hash.clone().unwrap_or_default();
                let mut flags = String::new();
                if let Some(user) = args.get(2).filter(|user| !user.is_empty()) {
                    flags.push_str(&format!("--chown={} ", bare(user).map_err(at)?));
                }
                let mode = match args.get(3).filter(|mode| !mode.is_empty()) {
                    Some(mode) => Some(
                        u32::from_str_radix(mode, 8)
                            .map_err(|_| at(format!("invalid mode {mode:?}")))?,
                    ),
                    None => None,
                };
                let upload = Upload { hash, mode };
                let pair = [
                    copy_source(&upload.folder(), &args[0]).map_err(at)?,
                    args[1].clone(),
                ];
                push(format!(
                    "COPY {flags}{}",
                    serde_json::to_string(&pair).expect("strings")
                ));
                if !uploads.contains(&upload) {
                    uploads.push(upload);
                }
            }
            "ENV" | "ARG" => {
                let keyword = if kind(step) == "ENV" { "ENV" } else { "ARG" };
                for pair in args.chunks(2) {
                    let value = pair.get(1).cloned().unwrap_or_default();
                    push(format!(
                        "{keyword} {}={}",
                        env_name(&pair[0]).map_err(at)?,
                        quoted(&value).map_err(at)?
                    ));
                    settings.env.insert(pair[0].clone(), value);
                }
            }
            "WORKDIR" => {
                push(format!("WORKDIR {}", bare(&args[0]).map_err(at)?));
                settings.workdir = Some(match (&settings.workdir, args[0].starts_with('/')) {
                    (Some(base), false) => format!("{}/{}", base.trim_end_matches('/'), args[0]),
                    _ => args[0].clone(),
                });
            }
            "USER" => {
                push(format!("USER {}", bare(&args[0]).map_err(at)?));
                settings.user = Some(args[0].clone());
            }
            other => return Err(at(format!("unknown step type {other}"))),
        }
    }
    Ok(Plan {
        from: from.to_string(),
        lines,
        uploads,
        settings,
    })
}

/// The build context: the Dockerfile, and each upload's files under `files/<folder>/`,
/// with the mode of the COPY that takes them.
/// Entries are copied one by one so that none can land outside its folder.
pub fn context_archive(
    plan: &Plan,
    uploads: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut archive = tar::Builder::new(encoder);
    let dockerfile = plan.dockerfile();
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    archive
        .append_data(&mut header, DOCKERFILE_KEY, dockerfile.as_bytes())
        .map_err(|error| error.to_string())?;
    for placed in &plan.uploads {
        let hash = &placed.hash;
        let bytes = uploads
            .get(hash)
            .ok_or_else(|| format!("files with hash {hash} were not uploaded"))?;
        let mut upload = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
        let entries = upload.entries().map_err(|error| {
            format!("cannot read the upload (it must be a gzipped tar): {error}")
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|error| {
                format!("cannot read the upload (it must be a gzipped tar): {error}")
            })?;
            let path = entry
                .path()
                .map_err(|error| error.to_string())?
                .into_owned();
            if path.is_absolute()
                || path
                    .components()
                    .any(|part| matches!(part, std::path::Component::ParentDir))
            {
                return Err(format!(
                    "the upload holds {} outside its folder",
                    path.display()
                ));
            }
            let target = std::path::Path::new("files")
                .join(placed.folder())
                .join(&path);
            let mut header = entry.header().clone();
            let kind = header.entry_type();
            if let (Some(mode), tar::EntryType::Regular | tar::EntryType::Continuous) =
                (placed.mode, kind)
            {
                header.set_mode(mode);
            }
            match kind {
                tar::EntryType::Regular
                | tar::EntryType::Directory
                | tar::EntryType::Continuous => {
                    let mut data = Vec::new();
                    entry
                        .read_to_end(&mut data)
                        .map_err(|error| error.to_string())?;
                    archive
                        .append_data(&mut header, &target, data.as_slice())
                        .map_err(|error| error.to_string())?;
                }
                tar::EntryType::Symlink => {
                    let link = entry
                        .link_name()
                        .map_err(|error| error.to_string())?
                        .unwrap_or_default()
                        .into_owned();
                    archive
                        .append_link(&mut header, &target, &link)
                        .map_err(|error| error.to_string())?;
                }
                // Hard links and devices have no place in a template's files.
                _ => {}
            }
        }
    }
    let bytes = archive
        .into_inner()
        .and_then(|encoder| encoder.finish())
        .map_err(|error| error.to_string())?;
    if bytes.len() > MAX_CONTEXT_BYTES {
        return Err(format!(
            "the build context is {} KiB, more than the {} KiB a ConfigMap carries: build the image elsewhere and use fromImage",
            bytes.len() / 1024,
            MAX_CONTEXT_BYTES / 1024
        ));
    }
    Ok(bytes)
}

pub fn job_name(build_id: &str) -> String {
    format!("build-{build_id}")
}

pub fn upload_name(template_id: &str, hash: &str) -> String {
    format!("template-{template_id}-files-{hash}")
}

fn labels(template_id: &str, build_id: &str) -> serde_json::Value {
    json!({
        MANAGED_BY: MANAGER,
        BUILD_OF: template_id,
        BUILD_ID: build_id,
    })
}

/// The image reference a build pushes to.
pub fn destination(builder: &BuilderConfig, template_id: &str, build_id: &str) -> String {
    format!(
        "{}/{template_id}:{build_id}",
        builder.repository.trim_end_matches('/')
    )
}

/// The kaniko Job: root with only the capabilities a filesystem build needs, no
/// privilege escalation, no token, one attempt, bounded in time; the digest it pushed is
/// its termination message.
pub fn build_job(builder: &BuilderConfig, template_id: &str, build_id: &str) -> Job {
    let name = job_name(build_id);
    let mut args = vec![
        format!("--dockerfile=/workspace/{DOCKERFILE_KEY}"),
        format!("--context=tar:///workspace/{CONTEXT_KEY}"),
        format!(
            "--destination={}",
            destination(builder, template_id, build_id)
        ),
        "--digest-file=/dev/termination-log".to_string(),
        "--snapshot-mode=redo".to_string(),
        "--push-retry=2".to_string(),
        "--verbosity=info".to_string(),
        "--log-format=json".to_string(),
    ];
    if builder.insecure {
        let host = builder.repository.split('/').next().unwrap_or_default();
        args.push(format!("--insecure-registry={host}"));
        // The parent image may come from any registry the nodes trust over plain HTTP.
        args.push("--insecure-pull".to_string());
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": builder.namespace, "labels": labels(template_id, build_id)},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": builder.timeout.as_secs().max(1),
            // A safety net only: the server deletes the Job once it has read the result.
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels(template_id, build_id)},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": CONTAINER,
                        "image": builder.image,
                        "args": args,
                        "terminationMessagePolicy": "File",
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsGroup": 0,
                            "runAsNonRoot": false,
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "capabilities": {
                                "drop": ["ALL"],
                                "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID"],
                            },
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [{"name": "context", "mountPath": "/workspace", "readOnly": true}],
                    }],
                    "volumes": [{"name": "context", "configMap": {"name": name}}],
                },
            },
        },
    }))
    .expect("a well-formed Job")
}

/// The Dockerfile and context of a build, owned by its Job so that deleting the Job
/// deletes it.
pub fn context_config_map(
    builder: &BuilderConfig,
    template_id: &str,
    build_id: &str,
    plan: &Plan,
    archive: Vec<u8>,
) -> ConfigMap {
    let mut config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": job_name(build_id),
            "namespace": builder.namespace,
            "labels": labels(template_id, build_id),
        },
        "data": {DOCKERFILE_KEY: plan.dockerfile()},
    }))
    .expect("a well-formed ConfigMap");
    config_map.binary_data = Some([(CONTEXT_KEY.to_string(), ByteString(archive))].into());
    config_map
}

pub fn owner(job: &Job) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job.metadata.name.clone()?,
        uid: job.metadata.uid.clone()?,
        ..OwnerReference::default()
    })
}

/// The ConfigMap an upload waits in, then lives in: owned by its template's ConfigMap.
pub fn upload_config_map(
    template: &ConfigMap,
    template_id: &str,
    hash: &str,
    token: &str,
) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {
            "name": upload_name(template_id, hash),
            "labels": {MANAGED_BY: MANAGER, FILES_OF: template_id},
            "annotations": {UPLOAD_TOKEN: token},
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": template.metadata.name,
                "uid": template.metadata.uid,
            }],
        },
    }))
    .expect("a well-formed ConfigMap")
}

pub fn uploaded(config_map: &ConfigMap) -> Option<&[u8]> {
    config_map
        .binary_data
        .as_ref()?
        .get(UPLOAD_KEY)
        .map(|bytes| bytes.0.as_slice())
}

/// Where a build stands, read from its Job and the Job's pod.
#[derive(Debug, PartialEq)]
pub enum Progress {
    Running,
    Pushed { digest: String },
    Failed { message: String },
}

pub fn progress(job: &Job, pod: Option<&Pod>) -> Progress {
    let status = job.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|status| status.conditions.as_ref())
            .and_then(|conditions| {
                conditions
                    .iter()
                    .find(|c| c.type_ == kind && c.status == "True")
            })
    };
    let terminated = pod
        .and_then(|pod| pod.status.as_ref())
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.iter().find(|s| s.name == CONTAINER))
        .and_then(|status| status.state.as_ref())
        .and_then(|state| state.terminated.as_ref());
    if condition("Complete").is_some() || condition("SuccessCriteriaMet").is_some() {
        let digest = terminated
            .and_then(|terminated| terminated.message.as_deref())
            .map(str::trim)
            .filter(|digest| digest.starts_with("sha256:"));
        return match digest {
            Some(digest) => Progress::Pushed {
                digest: digest.to_string(),
            },
            None => Progress::Failed {
                message: "the builder finished without reporting the pushed digest".into(),
            },
        };
    }
    if let Some(failed) = condition("Failed").or_else(|| condition("FailureTarget")) {
        let message = match failed.reason.as_deref() {
            Some("DeadlineExceeded") => "the build ran out of time".to_string(),
            _ => match terminated {
                Some(terminated) => {
                    format!("the builder exited with code {}", terminated.exit_code)
                }
                None => failed
                    .message
                    .clone()
                    .unwrap_or_else(|| "the build job failed".into()),
            },
        };
        return Progress::Failed { message };
    }
    Progress::Running
}

/// kaniko's output as build log entries. kaniko announces each Dockerfile line before it
/// runs it; the commands' own output follows unprefixed. Each entry is given the step of
/// the last line announced, and the step a failure happened at is that of the last one.
pub struct LogReading {
    pub entries: Vec<BuildLogEntry>,
    pub step: Option<u32>,
    pub last_error: Option<String>,
}

/// Lines may start with the RFC 3339 time the kubelet recorded them at; others get
/// `fallback`.
pub fn read_logs(text: &str, plan_lines: &[(String, Option<u32>)], fallback: &str) -> LogReading {
    let mut next = 0;
    let mut step = None;
    let mut last_error = None;
    let mut entries = Vec::new();
    for raw in text.lines() {
        let (timestamp, raw) = match raw.split_once(' ') {
            Some((time, rest)) if time.parse::<jiff::Timestamp>().is_ok() => (time, rest),
            _ => (fallback, raw),
        };
        let (level, message) = kaniko_prefix(raw).unwrap_or(("info", raw.to_string()));
        if let Some(found) = plan_lines[next.min(plan_lines.len())..]
            .iter()
            .position(|(line, _)| *line == message)
        {
            next += found + 1;
            step = plan_lines[next - 1].1;
        }
        if level == "error" {
            last_error = Some(message.clone());
        }
        entries.push(BuildLogEntry {
            timestamp: timestamp.to_string(),
            level: level.to_string(),
            message,
            step: step.map(|step| step.to_string()),
        });
    }
    LogReading {
        entries,
        step,
        last_error,
    }
}

/// kaniko's own lines are JSON objects with `level` and `msg`; its last words on failure
/// (`error building image: …`) are plain text.
fn kaniko_prefix(line: &str) -> Option<(&'static str, String)> {
    if line.starts_with("error building image") {
        return Some(("error", line.to_string()));
    }
    #[derive(Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    let parsed: Line = serde_json::from_str(line).ok()?;
    let level = match parsed.level.as_str() {
        "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        _ => "info",
    };
    Some((level, parsed.msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &str, args: &[&str]) -> TemplateStep {
        TemplateStep {
            kind: kind.into(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            files_hash: None,
            force: false,
        }
    }

    #[test]
    fn steps_become_dockerfile_lines_that_keep_their_text_literal() {
        let mut copy = step("COPY", &["./greeting.txt", "/opt/x/", "user", "0755"]);
        copy.files_hash = Some("ab".repeat(32));
        let steps = [
            step("WORKDIR", &["/opt/x"]),
            copy,
            step("ENV", &["FLAVOUR", "va$nil\"la", "B", "c"]),
            step("RUN", &["echo \"$FLAVOUR\" > f\nls", "user"]),
        ];
        let plan = plan("reg/base@sha256:1", &Settings::default(), &steps).expect("a plan");
        let hash = "ab".repeat(32);
        assert_eq!(
            plan.dockerfile(),
            format!(
                "FROM reg/base@sha256:1\nWORKDIR /opt/x\nCOPY --chown=user [\"files/{hash}-755/greeting.txt\",\"/opt/x/\"]\nENV FLAVOUR=\"va\\$nil\\\"la\"\nENV B=\"c\"\nUSER user\nRUN [\"/bin/bash\",\"-c\",\"echo \\\"$FLAVOUR\\\" > f\\nls\"]\n"
            )
        );
        let steps_of: Vec<_> = plan.lines.iter().map(|(_, step)| *step).collect();
        assert_eq!(
            steps_of,
            [Some(1), Some(2), Some(3), Some(3), Some(4), Some(4)]
        );
        assert_eq!(
            plan.uploads,
            [Upload {
                hash,
                mode: Some(0o755)
            }]
        );
        assert_eq!(plan.settings.workdir.as_deref(), Some("/opt/x"));
        assert_eq!(plan.settings.user.as_deref(), Some("user"));
        assert_eq!(plan.settings.env["B"], "c");
        assert!(plan.changes_image(&steps));
        assert!(!plan.changes_image(&steps[2..3]));
    }

    #[test]
    fn a_parent_templates_settings_come_first_and_belong_to_no_step() {
        let inherited = Settings {
            env: [("A".to_string(), "1".to_string())].into(),
            workdir: Some("/srv".into()),
            user: Some("user".into()),
        };
        let plan = plan("img", &inherited, &[step("WORKDIR", &["app"])]).expect("a plan");
        assert_eq!(
            plan.lines,
            [
                ("ENV A=\"1\"".to_string(), None),
                ("WORKDIR /srv".to_string(), None),
                ("USER user".to_string(), None),
                ("WORKDIR app".to_string(), Some(1)),
            ]
        );
        assert_eq!(plan.settings.workdir.as_deref(), Some("/srv/app"));
    }

    #[test]
    fn steps_that_cannot_be_written_fail_at_their_number() {
        let cases = [
            (
                vec![step("ENV", &["A", "x"]), step("ENV", &["1A", "x"])],
                2,
                "variable name",
            ),
            (vec![step("WORKDIR", &["/a\nRUN evil"])], 1, "usable"),
            (vec![step("ENV", &["A", "two\nlines"])], 1, "line break"),
            (
                vec![
                    step("RUN", &["true"]),
                    step("COPY", &["../etc/passwd", "/x"]),
                ],
                2,
                "inside the context",
            ),
            (
                vec![step("COPY", &["a", "/x", "", "rwx"])],
                1,
                "invalid mode",
            ),
            (vec![step("HEALTHCHECK", &["x"])], 1, "unknown step"),
        ];
        for (steps, number, words) in cases {
            let (at, message) =
                plan("img", &Settings::default(), &steps).expect_err("a failing step");
            assert_eq!(at, number, "{message}");
            assert!(message.contains(words), "{message}");
        }
    }

    fn gzipped_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut archive = tar::Builder::new(encoder);
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the raw name so the test can hold one.
            header.as_gnu_mut().expect("gnu").name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            archive.append(&header, *data).expect("an entry");
        }
        archive.into_inner().expect("tar").finish().expect("gzip")
    }

    fn listing(archive: &[u8]) -> Vec<(String, Vec<u8>, u32)> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        archive
            .entries()
            .expect("entries")
            .map(|entry| {
                let mut entry = entry.expect("an entry");
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("data");
                let mode = entry.header().mode().expect("mode");
                (
                    entry.path().expect("path").display().to_string(),
                    data,
                    mode,
                )
            })
            .collect()
    }

    #[test]
    fn the_context_holds_the_dockerfile_and_each_upload_in_its_own_folder() {
        let hash = "cd".repeat(32);
        let mut copy = step("COPY", &["a.txt", "/a.txt"]);
        copy.files_hash = Some(hash.clone());
        let plan = plan("img", &Settings::default(), &[copy]).expect("a plan");
        let uploads = [(hash.clone(), gzipped_tar(&[("a.txt", b"hello")]))].into();
        let archive = context_archive(&plan, &uploads).expect("a context");
        let entries = listing(&archive);
        assert_eq!(entries[0].0, "Dockerfile");
        assert_eq!(String::from_utf8_lossy(&entries[0].1), plan.dockerfile());
        assert_eq!(
            entries[1],
            (format!("files/{hash}/a.txt"), b"hello".to_vec(), 0o600)
        );

        // The same files copied twice, once with a mode: a folder each, the mode on the
        // files only, so the directory stays traversable.
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        let mut file = tar::Header::new_gnu();
        file.set_mode(0o600);
        file.set_size(2);
        let mut tree = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        tree.append_data(&mut dir, "tools/", &b""[..]).expect("dir");
        tree.append_data(&mut file, "tools/x.py", &b"hi"[..])
            .expect("file");
        let tree = tree.into_inner().expect("tar").finish().expect("gzip");
        let mut plain = step("COPY", &["tools", "/opt/tools"]);
        plain.files_hash = Some(hash.clone());
        let mut moded = step("COPY", &["tools", "/home/user/tools", "", "0644"]);
        moded.files_hash = Some(hash.clone());
        let twice = super::plan("img", &Settings::default(), &[plain, moded]).expect("a plan");
        assert!(
            twice.dockerfile().contains(&format!(
                "COPY [\"files/{hash}-644/tools\",\"/home/user/tools\"]"
            )),
            "{}",
            twice.dockerfile()
        );
        let archive = context_archive(&twice, &[(hash.clone(), tree)].into()).expect("a context");
        let modes: Vec<(String, u32)> = listing(&archive)[1..]
            .iter()
            .map(|(path, _, mode)| (path.clone(), *mode))
            .collect();
        assert_eq!(
            modes,
            [
                (format!("files/{hash}/tools/"), 0o755),
                (format!("files/{hash}/tools/x.py"), 0o600),
                (format!("files/{hash}-644/tools/"), 0o755),
                (format!("files/{hash}-644/tools/x.py"), 0o644),
            ]
        );

        let escaping = [(hash.clone(), gzipped_tar(&[("../../etc/x", b"no")]))].into();
        let message = context_archive(&plan, &escaping).expect_err("refused");
        assert!(message.contains("outside its folder"), "{message}");
        let message = context_archive(&plan, &BTreeMap::new()).expect_err("refused");
        assert!(message.contains("not uploaded"), "{message}");
        let garbage = [(hash, b"not gzip".to_vec())].into();
        let message = context_archive(&plan, &garbage).expect_err("refused");
        assert!(message.contains("gzipped tar"), "{message}");
    }

    #[test]
    fn kaniko_output_is_attributed_to_the_step_whose_line_it_announced() {
        let lines = vec![
            ("ENV A=\"1\"".to_string(), Some(1)),
            ("RUN [\"/bin/bash\",\"-c\",\"make\"]".to_string(), Some(2)),
        ];
        let output = concat!(
            "2026-12-04T10:00:00.5Z {\"level\":\"info\",\"msg\":\"Retrieving image manifest img\",\"time\":\"x\"}\n",
            "{\"level\":\"info\",\"msg\":\"ENV A=\\\"1\\\"\"}\n",
            "{\"level\":\"info\",\"msg\":\"RUN [\\\"/bin/bash\\\",\\\"-c\\\",\\\"make\\\"]\"}\n",
            "make: *** No targets.  Stop.\n",
            "error building image: exit status 2\n",
        );
        let reading = read_logs(output, &lines, "t");
        let steps: Vec<_> = reading.entries.iter().map(|e| e.step.clone()).collect();
        assert_eq!(
            steps,
            [
                None,
                Some("1".into()),
                Some("2".into()),
                Some("2".into()),
                Some("2".into())
            ]
        );
        assert_eq!(reading.entries[0].timestamp, "2026-12-04T10:00:00.5Z");
        assert_eq!(reading.entries[0].message, "Retrieving image manifest img");
        assert_eq!(reading.entries[1].timestamp, "t");
        assert_eq!(reading.entries[3].message, "make: *** No targets.  Stop.");
        assert_eq!(reading.entries[4].level, "error");
        assert_eq!(reading.step, Some(2));
        assert_eq!(
            reading.last_error.as_deref(),
            Some("error building image: exit status 2")
        );
    }
}
