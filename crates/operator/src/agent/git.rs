//! A task's git repository: the shell steps that clone it before the agent and commit and
//! push its work after, and how their answers read. The steps run in the sandbox through
//! envd as the sandbox's user; the credentials exist only in the environment of the clone
//! and push processes, which run while no process of the agent does (the push only after
//! every process the agent left is killed). Nothing here does I/O.

use std::collections::BTreeMap;

use sandcastle_api::{GitPush, GitSource, TaskReason};

/// The process tag of every git step, to find one still running after a restart.
pub const GIT_TAG: &str = "sandcastle-git";
/// The file (in the recorder's directory) the clone writes the base commit to, last.
pub const CLONED_MARKER: &str = "git-base";

const USERNAME: &str = "SANDCASTLE_GIT_USERNAME";
const PASSWORD: &str = "SANDCASTLE_GIT_PASSWORD";
const AUTHOR_NAME: &str = "SANDCASTLE_GIT_AUTHOR_NAME";
const AUTHOR_EMAIL: &str = "SANDCASTLE_GIT_AUTHOR_EMAIL";
const MESSAGE: &str = "SANDCASTLE_GIT_MESSAGE";

/// The exit code of the clone when the clone grew past its limit.
const TOO_LARGE: i32 = 72;
/// The exit code of the clone when the workspace directory holds files already.
const NOT_EMPTY: i32 = 71;

/// Shared by the clone and the push. The helper answers from the environment, only for
/// the repository's own scheme, host and port (`credential.<url>.helper`), so a submodule
/// elsewhere never sees the credentials; the empty `credential.helper` first drops any
/// helper the image configures. No config file outside the repository is read, so what a
/// sandbox's `~/.gitconfig` says cannot redirect a push.
const PRELUDE: &str = r#"set -u
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0 LC_ALL=C
helper='!f() { test "$1" = get && printf "username=%s\npassword=%s\n" "$SANDCASTLE_GIT_USERNAME" "$SANDCASTLE_GIT_PASSWORD"; }; f'
authed() {
  if [ -n "${SANDCASTLE_GIT_PASSWORD-}" ]; then
    git -c credential.helper= -c "credential.$scope.helper=$helper" -c core.hooksPath=/dev/null "$@"
  else
    git -c credential.helper= -c core.hooksPath=/dev/null "$@"
  fi
}
"#;

/// `$1` workspace, `$2` URL, `$3` ref (empty: the remote's default branch), `$4` depth
/// (empty: all history), `$5` 1 for submodules, `$6` the limit in KiB, `$7` the marker,
/// `$8` the credential scope. Clones beside the workspace and renames the clone into
/// place, so a clone cut off by a restart leaves no half-filled workspace; a marker that
/// exists means an earlier pass finished. The size is watched while the clone runs: once
/// past the limit, the whole process group (git and its helpers) is killed.
const CLONE: &str = r#"ws=$1 url=$2 ref=$3 depth=$4 subs=$5 max=$6 marker=$7 scope=$8
if [ -s "$marker" ]; then cat "$marker"; exit 0; fi
if [ -d "$ws" ] && [ -n "$(ls -A "$ws")" ]; then
  echo "the workspace $ws is not empty: a git workspace must not exist in the image, or be empty" >&2
  exit 71
fi
tmp="$ws.sandcastle-clone" done="$marker.exit"
rm -rf "$tmp" "$done" && mkdir -p "$(dirname "$ws")" "$(dirname "$marker")" || exit 70
fetch() {
  case $ref in
  ????????????????????????????????????????)
    git init -q "$tmp" && git -C "$tmp" remote add origin "$url" &&
      authed -C "$tmp" fetch -q --no-tags ${depth:+--depth "$depth"} origin "$ref" &&
      git -C "$tmp" -c advice.detachedHead=false checkout -q FETCH_HEAD &&
      if [ "$subs" = 1 ]; then
        authed -C "$tmp" submodule -q update --init --recursive ${depth:+--depth "$depth"}
      fi ;;
  *)
    authed -c advice.detachedHead=false clone -q ${depth:+--depth "$depth"} ${ref:+--branch "$ref"} \
      $([ "$subs" = 1 ] && echo --recurse-submodules ${depth:+--shallow-submodules}) -- "$url" "$tmp" ;;
  esac
}
(fetch; echo $? >"$done") &
while [ ! -s "$done" ]; do
  if [ "$(du -sk "$tmp" 2>/dev/null | cut -f1)" -gt "$max" ] 2>/dev/null; then
    echo "the clone grew past $max KiB" >&2
    kill -KILL 0
  fi
  sleep 0.5
done
code=$(cat "$done")
[ "$code" = 0 ] || exit "$code"
if [ "$(du -sk "$tmp" | cut -f1)" -gt "$max" ]; then
  echo "the clone grew past $max KiB" >&2
  rm -rf "$tmp"
  exit 72
fi
rmdir "$ws" 2>/dev/null
mv "$tmp" "$ws" && git -C "$ws" rev-parse HEAD >"$marker.new" && mv "$marker.new" "$marker" &&
  rm -f "$done" && cat "$marker""#;

/// `$1` workspace, `$2` base commit, `$3` where to write the diff against the base (empty:
/// nowhere). Commits everything that changed, with the repository's hooks and fsmonitor
/// off, and says `empty` or `commit <sha>` and the diff's short statistics against the
/// base. A commit the agent made itself counts as its work. Runs
/// without credentials: whatever the repository's configuration makes it run, the agent
/// could have run itself.
const COMMIT: &str = r#"set -u
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null LC_ALL=C
ws=$1 base=$2 patch=$3
cd "$ws" || exit 70
safe() { git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c commit.gpgSign=false "$@"; }
safe add -A || exit 70
if ! safe diff --cached --quiet; then
  safe -c user.name="$SANDCASTLE_GIT_AUTHOR_NAME" -c user.email="$SANDCASTLE_GIT_AUTHOR_EMAIL" \
    commit -q --no-verify -m "$SANDCASTLE_GIT_MESSAGE" || exit 70
fi
head=$(git rev-parse HEAD) || exit 70
if [ -n "$patch" ]; then safe diff "$base" "$head" >"$patch" || exit 70; fi
if [ "$head" = "$base" ]; then echo empty; exit 0; fi
echo "commit $head"
git diff --shortstat "$base" "$head""#;

/// `$1` workspace, `$2` a git directory of its own. Records the workspace as seeded, so
/// that the agent's work can be diffed against it without a repository of the task's.
const SNAPSHOT: &str = r#"set -u
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null LC_ALL=C GIT_DIR=$2 GIT_WORK_TREE=$1
[ -e "$GIT_DIR/seeded" ] && exit 0
rm -rf "$GIT_DIR" && mkdir -p "$1" && git init -q && git add -A &&
  git -c user.name=Sandcastle -c user.email=sandcastle@localhost commit -q --allow-empty --no-verify -m seeded &&
  : >"$GIT_DIR/seeded""#;

/// `$1` workspace, `$2` the git directory of [`SNAPSHOT`], `$3` where to write the diff.
const SEEDED_DIFF: &str = r#"set -u
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null LC_ALL=C GIT_DIR=$2 GIT_WORK_TREE=$1
git -c core.fsmonitor=false add -A && git -c core.fsmonitor=false diff --cached >"$3""#;

/// Kills every process of the sandbox's user but this one and its parent (envd, or the
/// runtime's own init), stopping them all first so none can fork past the kill: a
/// process the agent left behind could otherwise read the push's environment. Builtins
/// only, so the loop starts no process of its own.
const KILL_LEFTOVERS: &str = r#"for round in 1 2 3; do
  for sig in STOP KILL; do
    for d in /proc/[0-9]*; do
      pid=${d#/proc/}
      [ "$pid" = $$ ] || [ "$pid" = "$PPID" ] || [ "$pid" = 1 ] || kill -$sig "$pid" 2>/dev/null
    done
  done
done
exit 0"#;

/// `$1` workspace, `$2` URL, `$3` branch, `$4` 1 to force, `$5` the commit, `$6` the
/// credential scope. Pushes from a new bare repository that fetched only the commit, so
/// nothing the agent wrote in the workspace's `.git` (configuration, hooks, remotes)
/// takes part in the push that holds the credentials.
const PUSH: &str = r#"ws=$1 url=$2 branch=$3 force=$4 commit=$5 scope=$6
bare=$(mktemp -d) || exit 70
trap 'rm -rf "$bare"' EXIT
git init -q --bare "$bare" &&
  git --git-dir="$bare" fetch -q --no-tags --update-shallow "$ws" HEAD || exit 70
[ "$(git --git-dir="$bare" rev-parse FETCH_HEAD)" = "$commit" ] || {
  echo "the workspace's HEAD moved from $commit" >&2
  exit 70
}
spec="$commit:refs/heads/$branch"
[ "$force" = 1 ] && spec="+$spec"
authed --git-dir="$bare" push -q "$url" "$spec""#;

/// The credentials of a task's repository, from its Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitAuth {
    pub username: String,
    pub password: String,
}

/// A shell step: `sh -c <script> sh <args…>` with its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl Step {
    fn new(script: String, args: Vec<String>, env: BTreeMap<String, String>) -> Self {
        let mut all = vec!["-c".to_string(), script, "sh".to_string()];
        all.extend(args);
        Self { args: all, env }
    }
}

fn auth_env(auth: Option<&GitAuth>) -> BTreeMap<String, String> {
    auth.map(|auth| {
        BTreeMap::from([
            (USERNAME.to_string(), auth.username.clone()),
            (PASSWORD.to_string(), auth.password.clone()),
        ])
    })
    .unwrap_or_default()
}

/// What `credential.<url>.helper` is scoped to: the URL's scheme, host and port.
pub fn credential_scope(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{host}")
}

/// The clone of `source` into `workspace`, its marker at `marker`.
pub fn clone_step(
    source: &GitSource,
    workspace: &str,
    marker: &str,
    auth: Option<&GitAuth>,
) -> Step {
    let max_kib = i64::from(source.max_size_mib.max(1)) * 1024;
    Step::new(
        format!("{PRELUDE}{CLONE}"),
        vec![
            workspace.to_string(),
            source.url.clone(),
            source.git_ref.clone().unwrap_or_default(),
            source
                .depth
                .map(|depth| depth.to_string())
                .unwrap_or_default(),
            if source.submodules { "1" } else { "0" }.to_string(),
            max_kib.to_string(),
            marker.to_string(),
            credential_scope(&source.url),
        ],
        auth_env(auth),
    )
}

/// The commit of the agent's work, without credentials, and its diff at `patch` if given.
pub fn commit_step(
    push: Option<&GitPush>,
    workspace: &str,
    base: &str,
    patch: Option<&str>,
    task: &str,
    prompt: &str,
) -> Step {
    let default = GitPush::default();
    let push = push.unwrap_or(&default);
    let (name, email) = push.author.as_ref().map_or(
        ("Sandcastle".to_string(), "sandcastle@localhost".to_string()),
        |author| (author.name.clone(), author.email.clone()),
    );
    Step::new(
        COMMIT.to_string(),
        vec![
            workspace.to_string(),
            base.to_string(),
            patch.unwrap_or_default().to_string(),
        ],
        BTreeMap::from([
            (AUTHOR_NAME.to_string(), name),
            (AUTHOR_EMAIL.to_string(), email),
            (MESSAGE.to_string(), commit_message(push, task, prompt)),
        ]),
    )
}

/// The record of the seeded workspace, in `git_dir`.
pub fn snapshot_step(workspace: &str, git_dir: &str) -> Step {
    Step::new(
        SNAPSHOT.to_string(),
        vec![workspace.to_string(), git_dir.to_string()],
        BTreeMap::new(),
    )
}

/// The diff of the workspace against [`snapshot_step`]'s record, into `patch`.
pub fn seeded_diff_step(workspace: &str, git_dir: &str, patch: &str) -> Step {
    Step::new(
        SEEDED_DIFF.to_string(),
        vec![
            workspace.to_string(),
            git_dir.to_string(),
            patch.to_string(),
        ],
        BTreeMap::new(),
    )
}

/// The sweep of the agent's leftover processes that comes before a push.
pub fn kill_leftovers_step() -> Step {
    Step::new(KILL_LEFTOVERS.to_string(), Vec::new(), BTreeMap::new())
}

/// The push of `commit` to the branch `push` names.
pub fn push_step(
    source: &GitSource,
    push: &GitPush,
    workspace: &str,
    commit: &str,
    task: &str,
    auth: Option<&GitAuth>,
) -> Step {
    Step::new(
        format!("{PRELUDE}{PUSH}"),
        vec![
            workspace.to_string(),
            source.url.clone(),
            push_branch(push, task),
            if push.force { "1" } else { "0" }.to_string(),
            commit.to_string(),
            credential_scope(&source.url),
        ],
        auth_env(auth),
    )
}

/// The branch a push goes to: the spec's, or `sandcastle/<task>`.
pub fn push_branch(push: &GitPush, task: &str) -> String {
    push.branch
        .clone()
        .unwrap_or_else(|| format!("sandcastle/{task}"))
}

/// The commit message, its placeholders filled.
pub fn commit_message(push: &GitPush, task: &str, prompt: &str) -> String {
    match &push.commit_message {
        Some(message) => message.replace("{task}", task).replace("{prompt}", prompt),
        None if prompt.is_empty() => task.to_string(),
        None => format!("{task}\n\n{prompt}"),
    }
}

/// What the commit step found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The agent changed nothing: nothing to push.
    Empty,
    Commit {
        sha: String,
        files: i64,
        insertions: i64,
        deletions: i64,
    },
}

/// Reads the commit step's output; `None` when it is not what the step prints.
pub fn parse_committed(stdout: &str) -> Option<Committed> {
    let mut lines = stdout.lines().map(str::trim);
    let first = lines.next()?;
    if first == "empty" {
        return Some(Committed::Empty);
    }
    let sha = first.strip_prefix("commit ")?.to_string();
    // " 2 files changed, 3 insertions(+), 1 deletion(-)"; absent parts are zero, and the
    // line is absent altogether for a commit that changes no file (a mode change aside).
    let (mut files, mut insertions, mut deletions) = (0, 0, 0);
    for part in lines.next().unwrap_or_default().split(',') {
        let mut words = part.split_whitespace();
        let (Some(count), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(count) = count.parse::<i64>() else {
            continue;
        };
        if what.starts_with("file") {
            files = count;
        } else if what.starts_with("insertion") {
            insertions = count;
        } else if what.starts_with("deletion") {
            deletions = count;
        }
    }
    Some(Committed::Commit {
        sha,
        files,
        insertions,
        deletions,
    })
}

/// The most bytes of a diff a ConfigMap keeps.
pub const PATCH_LIMIT: usize = 512 * 1024;

/// Cuts a diff to at most `limit` bytes at a line's end; true when it was cut.
pub fn cap_patch(patch: &str, limit: usize) -> (String, bool) {
    if patch.len() <= limit {
        return (patch.to_string(), false);
    }
    // Just after a newline byte is always a character boundary.
    let cut = patch.as_bytes()[..limit]
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |end| end + 1);
    (patch[..cut].to_string(), true)
}

/// The base commit the clone printed last.
pub fn parse_base(stdout: &str) -> Option<String> {
    let line = stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())?;
    (line.len() >= 40 && line.chars().all(|c| c.is_ascii_hexdigit())).then(|| line.to_string())
}

/// Why a clone failed, from its exit code and what git said (`LC_ALL=C`): the reason and
/// a message that says what to fix. `stderr` must be redacted already.
pub fn clone_failure(source: &GitSource, exit_code: i32, stderr: &str) -> (TaskReason, String) {
    let said = last_lines(stderr);
    let url = &source.url;
    if exit_code == NOT_EMPTY {
        return (TaskReason::GitCloneFailed, said);
    }
    if exit_code == TOO_LARGE || stderr.contains("the clone grew past") {
        return (
            TaskReason::GitRepositoryTooLarge,
            format!(
                "the clone of {url} grew past workspace.git.maxSizeMiB ({} MiB)",
                source.max_size_mib
            ),
        );
    }
    if is_auth_failure(stderr) {
        let fix = if source.secret_ref.is_some() {
            "check the password or token in the Secret of workspace.git.secretRef"
        } else {
            "set workspace.git.secretRef to a Secret with a password or token (and a username)"
        };
        return (
            TaskReason::GitAuthFailed,
            format!("{url} refused the credentials: {fix} ({said})"),
        );
    }
    let unknown_ref = [
        "not found in upstream",
        "couldn't find remote ref",
        "not our ref",
        "unadvertised object",
        "no such remote ref",
    ];
    if let Some(wanted) = &source.git_ref
        && unknown_ref.iter().any(|text| stderr.contains(text))
    {
        return (
            TaskReason::GitRefNotFound,
            format!("{url} has no branch, tag or commit {wanted} ({said})"),
        );
    }
    (
        TaskReason::GitCloneFailed,
        format!("cloning {url} failed with exit code {exit_code}: {said}"),
    )
}

/// Why a push failed, as for [`clone_failure`].
pub fn push_failure(url: &str, branch: &str, exit_code: i32, stderr: &str) -> (TaskReason, String) {
    let said = last_lines(stderr);
    if is_auth_failure(stderr) {
        return (
            TaskReason::GitAuthFailed,
            format!("{url} refused the credentials for the push to {branch} ({said})"),
        );
    }
    let moved = [
        "[rejected]",
        "non-fast-forward",
        "fetch first",
        "stale info",
    ];
    if moved.iter().any(|text| stderr.contains(text)) {
        return (
            TaskReason::GitPushRejected,
            format!(
                "branch {branch} of {url} holds commits the agent's work is not based on; nothing was pushed (set outputs.git.push.force to replace it, or push to another branch)"
            ),
        );
    }
    (
        TaskReason::GitPushFailed,
        format!("pushing to {branch} of {url} failed with exit code {exit_code}: {said}"),
    )
}

fn is_auth_failure(stderr: &str) -> bool {
    [
        "Authentication failed",
        "could not read Username",
        "could not read Password",
        "terminal prompts disabled",
        "The requested URL returned error: 401",
        "The requested URL returned error: 403",
    ]
    .iter()
    .any(|text| stderr.contains(text))
}

/// The last few lines git printed, for a message: the cause is at the end.
fn last_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    crate::text::truncate(&tail, 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(git_ref: Option<&str>, secret: bool) -> GitSource {
        serde_json::from_value(serde_json::json!({
            "url": "https://git.example.com:8443/team/repo.git",
            "ref": git_ref,
            "secretRef": secret.then(|| serde_json::json!({"name": "creds"})),
        }))
        .expect("a git source")
    }

    #[test]
    fn credentials_are_scoped_to_the_repository_host() {
        assert_eq!(
            credential_scope("https://git.example.com:8443/team/repo.git"),
            "https://git.example.com:8443"
        );
        assert_eq!(credential_scope("http://127.0.0.1/x"), "http://127.0.0.1");
        let auth = GitAuth {
            username: "u".into(),
            password: "p".into(),
        };
        let step = clone_step(&source(Some("main"), true), "/w", "/m", Some(&auth));
        assert_eq!(
            step.args[3..],
            [
                "/w",
                "https://git.example.com:8443/team/repo.git",
                "main",
                "",
                "0",
                "1048576",
                "/m",
                "https://git.example.com:8443"
            ]
        );
        assert_eq!(step.env.get(PASSWORD).map(String::as_str), Some("p"));
        // The secret is in the environment only, never an argument.
        assert!(
            !step
                .args
                .iter()
                .any(|arg| arg.contains('p') && arg.len() == 1)
        );
        let without = clone_step(&source(None, false), "/w", "/m", None);
        assert!(without.env.is_empty());
        assert_eq!(without.args[5], "");
    }

    #[test]
    fn failures_name_their_cause_and_fix() {
        let cases = [
            (
                Some("main"),
                true,
                128,
                "fatal: Authentication failed for 'https://git.example.com:8443/team/repo.git/'",
                TaskReason::GitAuthFailed,
            ),
            (
                Some("main"),
                false,
                128,
                "fatal: could not read Username for 'https://git.example.com:8443': terminal prompts disabled",
                TaskReason::GitAuthFailed,
            ),
            (
                Some("nope"),
                true,
                128,
                "warning: Could not find remote branch nope to clone.\nfatal: Remote branch nope not found in upstream origin",
                TaskReason::GitRefNotFound,
            ),
            (
                Some("0123456789012345678901234567890123456789"),
                true,
                128,
                "fatal: remote error: upload-pack: not our ref 0123456789012345678901234567890123456789",
                TaskReason::GitRefNotFound,
            ),
            (
                Some("0123456789012345678901234567890123456789"),
                true,
                128,
                "fatal: couldn't find remote ref 0123456789012345678901234567890123456789",
                TaskReason::GitRefNotFound,
            ),
            (
                None,
                true,
                128,
                "fatal: unable to access 'https://git.example.com:8443/team/repo.git/': Could not resolve host: git.example.com",
                TaskReason::GitCloneFailed,
            ),
            (
                None,
                true,
                137,
                "the clone grew past 1048576 KiB",
                TaskReason::GitRepositoryTooLarge,
            ),
            (
                None,
                true,
                72,
                "the clone grew past 1048576 KiB",
                TaskReason::GitRepositoryTooLarge,
            ),
            (
                None,
                true,
                71,
                "the workspace /w is not empty",
                TaskReason::GitCloneFailed,
            ),
        ];
        for (git_ref, secret, code, stderr, reason) in cases {
            let (got, message) = clone_failure(&source(git_ref, secret), code, stderr);
            assert_eq!(got, reason, "{stderr}");
            assert!(!message.is_empty());
        }
        let (_, message) = clone_failure(
            &source(Some("main"), false),
            128,
            "terminal prompts disabled",
        );
        assert!(message.contains("set workspace.git.secretRef"), "{message}");
        let (_, message) = clone_failure(
            &source(Some("nope"), true),
            128,
            "Remote branch nope not found in upstream origin",
        );
        assert!(
            message.contains("no branch, tag or commit nope"),
            "{message}"
        );

        let pushes = [
            (
                " ! [rejected]        abc -> main (fetch first)\nerror: failed to push some refs",
                TaskReason::GitPushRejected,
            ),
            (
                " ! [rejected]        abc -> main (non-fast-forward)",
                TaskReason::GitPushRejected,
            ),
            (
                "fatal: Authentication failed for 'x'",
                TaskReason::GitAuthFailed,
            ),
            (
                "fatal: unable to access 'x': Failed to connect",
                TaskReason::GitPushFailed,
            ),
        ];
        for (stderr, reason) in pushes {
            assert_eq!(push_failure("u", "b", 1, stderr).0, reason, "{stderr}");
        }
    }

    #[test]
    fn the_commit_report_reads_as_printed() {
        assert_eq!(parse_committed("empty\n"), Some(Committed::Empty));
        let sha = "a".repeat(40);
        assert_eq!(
            parse_committed(&format!(
                "commit {sha}\n 2 files changed, 3 insertions(+), 1 deletion(-)\n"
            )),
            Some(Committed::Commit {
                sha: sha.clone(),
                files: 2,
                insertions: 3,
                deletions: 1
            })
        );
        assert_eq!(
            parse_committed(&format!("commit {sha}\n 1 file changed, 1 deletion(-)\n")),
            Some(Committed::Commit {
                sha: sha.clone(),
                files: 1,
                insertions: 0,
                deletions: 1
            })
        );
        assert_eq!(
            parse_committed(&format!("commit {sha}\n")),
            Some(Committed::Commit {
                sha,
                files: 0,
                insertions: 0,
                deletions: 0
            })
        );
        assert_eq!(parse_committed("fatal: not a git repository"), None);
        assert_eq!(
            parse_base(&format!("{}\n", "b".repeat(40))),
            Some("b".repeat(40))
        );
        assert_eq!(parse_base("oops"), None);
    }

    #[test]
    fn a_long_patch_keeps_its_start_up_to_a_line_end() {
        assert_eq!(cap_patch("a\nb\n", 10), ("a\nb\n".to_string(), false));
        assert_eq!(
            cap_patch("aaaa\nbbbb\ncccc\n", 12),
            ("aaaa\nbbbb\n".to_string(), true)
        );
        assert_eq!(cap_patch("ééé\n", 3), (String::new(), true));
    }

    #[test]
    fn branches_and_messages_follow_the_spec() {
        let mut push = GitPush::default();
        assert_eq!(push_branch(&push, "fix-it"), "sandcastle/fix-it");
        assert_eq!(
            commit_message(&push, "fix-it", "Fix the bug"),
            "fix-it\n\nFix the bug"
        );
        assert_eq!(commit_message(&push, "fix-it", ""), "fix-it");
        push.branch = Some("feature/x".into());
        push.commit_message = Some("{task}: {prompt}".into());
        assert_eq!(push_branch(&push, "fix-it"), "feature/x");
        assert_eq!(commit_message(&push, "fix-it", "do it"), "fix-it: do it");
    }
}
