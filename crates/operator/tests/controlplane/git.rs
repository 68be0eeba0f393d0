//! Workspaces and outputs. Git workspaces against a real git server (`git http-backend`
//! behind lighttpd, with basic authentication), reached from inside the embedded server's
//! sandboxes: clones at a branch, a tag and a commit, the agent's work pushed and cloned
//! back, patches, every failure with its reason and without the token; structured output
//! from the real Claude Code CLI; artifacts kept with their hashes.

use std::sync::Arc;

use base64::Engine;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sandcastle_api::{AgentTask, AgentTaskStatus, TaskPhase};
use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::git_server::{GitServer, USER};
use sandcastle_testkit::model::{EDITED_README, Script, ScriptedModel, structured_answer};
use sandcastle_testkit::operator::wait_for;
use serde_json::{Value, json};

use super::tasks::{
    claude_settings, claude_spec, create, events, finished, put_secret, setup, waits_for_its_secret,
};

/// The Secret `repo` with the server's account, as `workspace.git.secretRef` takes it.
async fn put_repo_secret(env: &TestEnv, ns: &str, server: &GitServer) {
    let account = json!({"username": USER, "password": server.token()});
    put_secret(env, ns, "repo", account).await;
}

/// A command task on `base` cloning `git` into its workspace.
fn task(git: Value, script: &str) -> Value {
    json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sh", "-c", script]}},
        "workspace": {"git": git},
    })
}

async fn done(api: &Api<AgentTask>, name: &str) -> AgentTaskStatus {
    wait_for(api, name, "finished", finished).await
}

fn text(status: &AgentTaskStatus) -> String {
    status
        .result
        .as_ref()
        .map(|result| result.text.clone())
        .unwrap_or_default()
}

/// The git status, which every case here expects.
fn git_of(status: &AgentTaskStatus) -> sandcastle_api::GitStatus {
    status
        .git
        .clone()
        .unwrap_or_else(|| panic!("no status.git: {status:#?}"))
}

pub async fn a_git_workspace_is_cloned_at_a_branch_a_tag_or_a_commit(env: Arc<TestEnv>) {
    let server = GitServer::start();
    let first = server.create("app", &[("README", b"one\n")]);
    server.tag("app", "v1", &first);
    let dev = server.advance("app", "dev", &[("README", b"two\n")], "on dev");
    let main = server.advance("app", "main", &[("README", b"three\n")], "on main");
    let (ns, operator, api) = setup(&env, "git-clone", &[]).await;
    put_repo_secret(&env, &ns, &server).await;
    let source = |git_ref: Option<&str>, depth: Option<i32>| json!({"url": server.url("app"), "ref": git_ref, "depth": depth, "secretRef": {"name": "repo"}});
    let show = "cat README; git rev-parse HEAD; git rev-list --count HEAD";
    let cases = [
        ("at-branch", source(Some("dev"), None), "two", &dev, 2),
        ("at-tag", source(Some("v1"), None), "one", &first, 1),
        ("at-commit", source(Some(&first), Some(1)), "one", &first, 1),
        ("at-default", source(None, Some(1)), "three", &main, 1),
    ];
    for (name, git, _, _, _) in &cases {
        create(&api, name, task(git.clone(), show)).await;
    }
    for (name, _, readme, commit, count) in &cases {
        let status = done(&api, name).await;
        assert_eq!(
            status.phase,
            Some(TaskPhase::Succeeded),
            "{name}: {status:#?}"
        );
        assert_eq!(
            text(&status),
            format!("{readme}\n{commit}\n{count}\n"),
            "{name}"
        );
        assert_eq!(
            git_of(&status).base_commit.as_deref(),
            Some(commit.as_str()),
            "{name}"
        );
        assert!(
            !git_of(&status).pushed,
            "{name}: nothing is pushed without outputs.git"
        );
    }

    // The agent looks for the token where it could be: its environment, the repository's
    // configuration, git's credential stores, every file under its home and /tmp. What it
    // finds travels base64-encoded, which no redaction would match, so a leak would show.
    let look = "{ env; cat .git/config; cat ~/.git-credentials ~/.gitconfig 2>/dev/null; \
                grep -rs gittoken- ~ /tmp; ps -eo args 2>/dev/null; } | base64 -w0";
    create(
        &api,
        "looks-for-token",
        task(source(Some("main"), None), look),
    )
    .await;
    let status = done(&api, "looks-for-token").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let seen = base64::engine::general_purpose::STANDARD
        .decode(text(&status).trim())
        .expect("base64 from the agent");
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.contains("[remote \"origin\"]"),
        "the agent saw no .git/config: {seen}"
    );
    assert!(
        !seen.contains(server.token()),
        "the agent could read the token: {seen}"
    );
    assert!(
        !seen.contains("SANDCASTLE_GIT"),
        "the agent saw the git steps' variables"
    );
    drop(operator);
}

pub async fn the_agents_work_is_pushed_to_a_branch(env: Arc<TestEnv>) {
    let server = GitServer::start();
    let base = server.create("app", &[("README", b"one\n"), ("old.txt", b"a\nb\n")]);
    let (ns, operator, api) = setup(&env, "git-push", &[]).await;
    put_repo_secret(&env, &ns, &server).await;
    let git = json!({"url": server.url("app"), "ref": "main", "secretRef": {"name": "repo"}});
    let pushing = |script: &str, push: Value| {
        let mut spec = task(git.clone(), script);
        spec["outputs"] = json!({"git": {"push": push}});
        spec["prompt"] = json!("Improve the README");
        spec
    };
    let mut pusher = pushing(
        "echo two >>README; rm old.txt; echo new >new.txt; echo edited",
        json!({"author": {"name": "Agent Smith", "email": "smith@example.com"}}),
    );
    pusher["outputs"]["patch"] = json!(true);
    create(&api, "pusher", pusher).await;
    // A failed agent's work is kept as a patch, and never pushed.
    let mut failing = pushing("echo change >>README; exit 3", json!({}));
    failing["outputs"]["patch"] = json!(true);
    create(&api, "fails", failing).await;
    // Nothing changed: nothing to push.
    create(&api, "idle", pushing("echo looked", json!({}))).await;
    // The branch the push targets moves while the agent runs.
    create(
        &api,
        "overtaken",
        pushing("sleep 4; echo x >>README", json!({"branch": "main"})),
    )
    .await;
    wait_for(&api, "overtaken", "running", |status| {
        status.phase == Some(TaskPhase::Running)
    })
    .await;
    let moved = server.advance(
        "app",
        "main",
        &[("other.txt", b"someone else\n")],
        "meanwhile",
    );

    let status = done(&api, "pusher").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let pushed = git_of(&status);
    assert_eq!(pushed.base_commit.as_deref(), Some(base.as_str()));
    assert_eq!(pushed.branch.as_deref(), Some("sandcastle/pusher"));
    assert!(pushed.pushed, "{pushed:?}");
    let commit = pushed.commit.clone().expect("a commit");
    assert_eq!(
        server.head("app", "sandcastle/pusher").as_deref(),
        Some(commit.as_str())
    );
    assert_eq!(
        (pushed.files_changed, pushed.insertions, pushed.deletions),
        (Some(3), Some(2), Some(2)),
        "README +1, new.txt +1, old.txt -2"
    );
    let check = server.clone_over_http("app", "sandcastle/pusher");
    assert_eq!(
        std::fs::read_to_string(check.join("README")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(check.join("new.txt")).unwrap(),
        "new\n"
    );
    assert!(!check.join("old.txt").exists());
    let log =
        sandcastle_testkit::git_server::git(&check, &["log", "-1", "--format=%an <%ae>%n%P%n%B"]);
    assert_eq!(
        log,
        format!("Agent Smith <smith@example.com>\n{base}\npusher\n\nImprove the README")
    );
    assert_eq!(text(&status), "edited\n", "the agent's own result is kept");

    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let patch_of = |name: &'static str| {
        let config_maps = config_maps.clone();
        async move {
            let config_map = config_maps
                .get(&format!("{name}-patch"))
                .await
                .expect("the patch");
            config_map
                .data
                .unwrap_or_default()
                .remove("patch")
                .unwrap_or_default()
        }
    };
    let kept = status.patch.clone().expect("status.patch");
    assert_eq!(kept.config_map, "pusher-patch");
    let patch = patch_of("pusher").await;
    for line in ["+two", "-a", "-b", "+new", "--- a/old.txt", "+++ b/new.txt"] {
        assert!(patch.lines().any(|l| l == line), "no {line:?} in\n{patch}");
    }
    assert_eq!(kept.bytes, patch.len() as i64);
    assert!(!kept.truncated);

    let status = done(&api, "fails").await;
    assert_eq!(status.reason.as_deref(), Some("AgentFailed"), "{status:#?}");
    let failed = git_of(&status);
    assert!(!failed.pushed && failed.branch.is_none(), "{failed:?}");
    assert!(patch_of("fails").await.lines().any(|l| l == "+change"));
    assert_eq!(
        server.head("app", "sandcastle/fails"),
        None,
        "a failed agent's work is never pushed"
    );

    let status = done(&api, "idle").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let idle = git_of(&status);
    assert!(!idle.pushed && idle.commit.is_none(), "{idle:?}");
    assert_eq!(
        server.head("app", "sandcastle/idle"),
        None,
        "an empty change pushes nothing"
    );

    let status = done(&api, "overtaken").await;
    assert_eq!(status.phase, Some(TaskPhase::Failed), "{status:#?}");
    assert_eq!(
        status.reason.as_deref(),
        Some("GitPushRejected"),
        "{status:#?}"
    );
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("branch main"),
        "{:?}",
        status.message
    );
    let overtaken = git_of(&status);
    assert!(
        !overtaken.pushed && overtaken.commit.is_some(),
        "{overtaken:?}"
    );
    assert_eq!(
        server.head("app", "main").as_deref(),
        Some(moved.as_str()),
        "never forced"
    );
    drop(operator);
}

pub async fn git_failures_have_reasons_and_never_show_the_token(env: Arc<TestEnv>) {
    let server = GitServer::start();
    server.create("app", &[("README", b"one\n")]);
    let mut noise = vec![0u8; 3 << 20];
    getrandom::fill(&mut noise).expect("random bytes");
    server.create("big", &[("noise.bin", &noise)]);
    let (ns, operator, api) = setup(&env, "git-fail", &[]).await;
    let wrong = format!("{}-wrong", server.token());
    put_repo_secret(&env, &ns, &server).await;
    put_secret(
        &env,
        &ns,
        "wrong",
        json!({"username": USER, "password": wrong}),
    )
    .await;
    put_secret(
        &env,
        &ns,
        "ssh",
        json!({"ssh-privatekey": "not a password"}),
    )
    .await;
    let with = |url: String, extra: Value| {
        let mut git = json!({"url": url, "secretRef": {"name": "repo"}});
        for (key, value) in extra.as_object().unwrap() {
            git[key] = value.clone();
        }
        task(git, "true")
    };
    let cases = [
        (
            "wrong-token",
            with(server.url("app"), json!({"secretRef": {"name": "wrong"}})),
            "GitAuthFailed",
            "check the password or token",
        ),
        (
            "no-credentials",
            with(server.url("app"), json!({"secretRef": null})),
            "GitAuthFailed",
            "set workspace.git.secretRef",
        ),
        (
            "unknown-ref",
            with(server.url("app"), json!({"ref": "no-such-branch"})),
            "GitRefNotFound",
            "no-such-branch",
        ),
        (
            "unknown-commit",
            with(
                server.url("app"),
                json!({"ref": "0123456789abcdef0123456789abcdef01234567"}),
            ),
            "GitRefNotFound",
            "0123456789abcdef",
        ),
        (
            "unreachable",
            with("http://127.0.0.1:1/app.git".into(), json!({})),
            "GitCloneFailed",
            "127.0.0.1:1",
        ),
        (
            "too-large",
            with(server.url("big"), json!({"maxSizeMiB": 1})),
            "GitRepositoryTooLarge",
            "maxSizeMiB (1 MiB)",
        ),
    ];
    for (name, spec, _, _) in &cases {
        create(&api, name, spec.clone()).await;
    }
    create(
        &api,
        "ssh-key",
        with(server.url("app"), json!({"secretRef": {"name": "ssh"}})),
    )
    .await;
    for (name, _, reason, says) in &cases {
        let status = done(&api, name).await;
        assert_eq!(status.phase, Some(TaskPhase::Failed), "{name}: {status:#?}");
        assert_eq!(
            status.reason.as_deref(),
            Some(*reason),
            "{name}: {status:#?}"
        );
        let message = status.message.clone().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
    }
    waits_for_its_secret(&api, "ssh-key", "has no key password").await;
    // No token, right or wrong, in any status, event, transcript or operator log line.
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let everything = format!(
        "{:?} {:?} {:?} {}",
        api.list(&Default::default()).await.unwrap().items,
        events(&env, &ns).await,
        config_maps.list(&Default::default()).await.unwrap().items,
        operator.logs()
    );
    assert!(!everything.contains(server.token()), "the token leaked");
    assert!(!everything.contains(&wrong), "the wrong token leaked");
    drop(operator);
}

/// The real Claude Code CLI in a cloned workspace: the scripted model looks for the git
/// token (environment, `.git/config`, git's credential files and configuration), edits
/// the README, and the work is pushed. The token is in none of the tool results the model
/// read, which are the agent's own view and never redacted.
pub async fn claude_code_edits_a_clone_and_its_work_is_pushed(env: Arc<TestEnv>) {
    let server = GitServer::start();
    let base = server.create("app", &[("README", b"one\n")]);
    let settings = claude_settings();
    let settings = settings
        .each_ref()
        .map(|(key, value)| (*key, value.as_str()));
    let (ns, operator, api) = setup(&env, "git-claude", &settings).await;
    let model = ScriptedModel::start(Script::EditRepo).await;
    put_secret(
        &env,
        &ns,
        "anthropic",
        json!({"ANTHROPIC_API_KEY": "sk-ant-git-7f3a"}),
    )
    .await;
    put_repo_secret(&env, &ns, &server).await;
    create(
        &api,
        "claude-edits",
        claude_spec(
            &model,
            "Rewrite the README",
            json!({
                "workspace": {"git": {"url": server.url("app"), "secretRef": {"name": "repo"}}},
                "outputs": {"git": {"push": {}}},
                "agent": {"claudeCode": {"jsonSchema": {
                    "type": "object",
                    "properties": {"summary": {"type": "string"}, "filesChanged": {"type": "integer"}},
                    "required": ["summary", "filesChanged"],
                }}},
            }),
        ),
    )
    .await;
    let status = done(&api, "claude-edits").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let result = status.result.clone().expect("a result");
    assert_eq!(
        result
            .structured_output
            .clone()
            .map(serde_json::Value::Object),
        Some(structured_answer()),
        "{result:?}"
    );
    let git = git_of(&status);
    assert!(git.pushed, "{git:?}");
    assert_eq!(git.base_commit.as_deref(), Some(base.as_str()));
    let check = server.clone_over_http("app", "sandcastle/claude-edits");
    assert_eq!(
        std::fs::read_to_string(check.join("README")).unwrap(),
        EDITED_README
    );
    let seen: Vec<String> = model
        .requests()
        .into_iter()
        .filter_map(|request| request.body)
        .flat_map(|body| body.tool_results)
        .collect();
    let probe = seen
        .iter()
        .find(|result| result.contains("[remote \"origin\"]"))
        .unwrap_or_else(|| panic!("the model never saw the probe's output: {seen:?}"));
    assert!(probe.contains(&server.url("app")), "{probe}");
    for result in &seen {
        assert!(
            !result.contains(server.token()),
            "the agent read the token: {result}"
        );
    }
    drop(operator);
}

pub async fn artifacts_are_kept_with_their_hashes_and_without_secrets(env: Arc<TestEnv>) {
    use sha2::Digest;
    let (ns, operator, api) = setup(&env, "artifacts", &[]).await;
    let token = "artifact-secret-4b1d";
    put_secret(&env, &ns, "creds", json!({"token": token})).await;
    let script = "mkdir -p dist && printf tarball >dist/app.tar.gz \
                  && head -c 900000 /dev/urandom >dist/big.bin \
                  && echo \"token $TOKEN\" >report.txt \
                  && printf '\\377\\000%s' \"$TOKEN\" >secret.bin";
    create(
        &api,
        "builds",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["sh", "-c", script]}},
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
            "outputs": {"artifacts": [
                {"path": "dist/*"}, {"path": "*.txt"}, {"path": "*.bin"},
                {"path": "logs/**", "optional": true},
            ]},
        }),
    )
    .await;
    // Without a repository, the patch is against the workspace as seeded.
    create(
        &api,
        "seeded-patch",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["sh", "-c", "echo two >a.txt && echo new >b.txt"]}},
            "workspace": {"files": [{"path": "a.txt", "content": "one\n"}]},
            "outputs": {"patch": true},
        }),
    )
    .await;
    create(
        &api,
        "no-report",
        json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["true"]}},
            "outputs": {"artifacts": [{"path": "report.*"}]},
        }),
    )
    .await;
    let status = done(&api, "builds").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let shown: Vec<(&str, i64, Option<&str>, bool)> = status
        .artifacts
        .iter()
        .map(|a| (a.path.as_str(), a.size, a.key.as_deref(), a.redacted))
        .collect();
    assert_eq!(
        shown,
        [
            ("dist/app.tar.gz", 7, Some("dist_app.tar.gz"), false),
            ("dist/big.bin", 900_000, None, false),
            (
                "report.txt",
                (token.len() + 7) as i64,
                Some("report.txt"),
                true
            ),
            ("secret.bin", (token.len() + 2) as i64, None, false),
        ],
        "the large one does not fit, the binary one with the secret is withheld"
    );
    let tarball = format!("{:x}", sha2::Sha256::digest(b"tarball"));
    assert_eq!(
        status.artifacts[0].sha256.as_deref(),
        Some(tarball.as_str())
    );
    assert!(
        status
            .artifacts
            .iter()
            .all(|a| a.sha256.as_ref().is_some_and(|s| s.len() == 64))
    );
    assert_eq!(
        status.artifacts_config_map.as_deref(),
        Some("builds-artifacts")
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let kept = config_maps
        .get("builds-artifacts")
        .await
        .expect("the artifacts");
    let binary = kept.binary_data.unwrap_or_default();
    assert_eq!(binary["dist_app.tar.gz"].0, b"tarball");
    assert_eq!(binary["report.txt"].0, b"token [redacted]\n");
    assert_eq!(binary.len(), 2);

    let status = done(&api, "seeded-patch").await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    assert_eq!(
        status.patch.as_ref().map(|patch| patch.config_map.as_str()),
        Some("seeded-patch-patch")
    );
    let patch = config_maps
        .get("seeded-patch-patch")
        .await
        .expect("the patch")
        .data
        .unwrap_or_default()
        .remove("patch")
        .unwrap_or_default();
    for line in ["-one", "+two", "+++ b/b.txt", "+new"] {
        assert!(patch.lines().any(|l| l == line), "no {line:?} in\n{patch}");
    }

    let status = done(&api, "no-report").await;
    assert_eq!(
        status.reason.as_deref(),
        Some("ArtifactNotFound"),
        "{status:#?}"
    );
    assert!(status.message.unwrap_or_default().contains("report.*"));

    let everything = format!(
        "{:?} {:?}",
        api.list(&Default::default()).await.unwrap().items,
        config_maps.list(&Default::default()).await.unwrap().items
    );
    assert!(!everything.contains(token), "the Secret's value leaked");
    drop(operator);
}
