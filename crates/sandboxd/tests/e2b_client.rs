//! Drives the E2B client against the embedded E2B-compatible server. Every scenario gets a
//! server of its own, so injected faults and sandbox counts never leak between scenarios.
//!
//! The first part implements the scenario list shared with the Python SDK conformance suite
//! (`tests/conformance/scenarios.txt`, implemented there by `tests/conformance/test_sdk.py`):
//! each scenario is a test of the same name asserting what the SDK test `test_<name>`
//! asserts. The second part covers client behaviour the SDK list does not reach.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandcastle_e2b::client::{AliasLookup, ClientConfig, E2bClient, ListQuery, SandboxSpec};
use sandcastle_e2b::envd::{Code, FileType, FsEventType, ProcessSelector, Signal};
use sandcastle_e2b::envd_client::{CommandSpec, EnvdClient, Output, ProcessUpdate};
use sandcastle_e2b::error::Error;
use sandcastle_e2b::models::{
    BuildStatus, Sandbox, SandboxDetail, SandboxState, TemplateBuildRequest,
    TemplateBuildRequested, TemplateBuildStart, TemplateStep,
};
use sandcastle_e2b::retry::RetryPolicy;
use sandcastle_e2b::template::{ContextFile, CopyLayer};
use sandcastle_sandboxd::{self as sandboxd, Fault, FaultPlan, Injected, RandomFaults, Sandboxd};

/// The shared scenario list, exactly as `tests/conformance/scenarios.txt` has it (same
/// order). Each entry is the name of a `#[tokio::test] async fn` in this file, which asserts
/// the behaviour the SDK's `test_<name>` in `tests/conformance/test_sdk.py` asserts.
const SCENARIOS: &[&str] = &[
    "sandbox_create",
    "command_stdout",
    "command_stderr",
    "command_exit_code",
    "command_env",
    "command_cwd",
    "command_failure",
    "command_background_connect",
    "files_write_read",
    "files_list",
    "files_exists",
    "files_make_dir",
    "files_remove",
    "files_read_missing_not_found",
    "files_watch",
    "files_watch_stream",
    "sandbox_list_metadata_query",
    "sandbox_set_timeout",
    "sandbox_kill",
    "sandbox_unknown_not_found",
    "api_key_rejected",
    "template_build",
];

/// Rust-only scenarios beyond the shared list: retries, injected faults, and client calls
/// the SDK suite does not make. Each entry is likewise a test fn of the same name.
const EXTRA_SCENARIOS: &[&str] = &[
    "sandbox_connect",
    "sandbox_list_pages",
    "command_connect_by_tag",
    "command_kill_by_signal",
    "command_missing_program_or_cwd",
    "files_relative_paths_depth_rename",
    "files_read_from_an_offset",
    "template_delete_in_use",
    "retry_rate_limited_honours_retry_after",
    "retry_service_unavailable",
    "stream_cut_is_an_error",
    "sandbox_vanishes_mid_run",
    "latency_is_added_to_every_call",
    "bad_requests_answer_like_the_service",
    "envd_refuses_a_missing_access_token",
    "paths_outside_the_sandbox_are_refused",
    "sandboxes_are_isolated",
    "history_records_every_sandbox_life",
    "random_faults_reach_both_listeners",
];

const API_KEY: &str = "sandcastle-test-key";
const LIFETIME: Duration = Duration::from_secs(300);
/// A well-formed sandbox ID (20 characters of [a-z0-9]) that no server has handed out.
const UNKNOWN_SANDBOX_ID: &str = "0nosuchsandbox000000";

struct Harness {
    server: Sandboxd,
    client: E2bClient,
    root: PathBuf,
}

impl Harness {
    async fn start() -> Harness {
        Harness::with_retry(RetryPolicy {
            max_elapsed: Duration::from_secs(30),
            ..RetryPolicy::default()
        })
        .await
    }

    async fn with_retry(retry: RetryPolicy) -> Harness {
        Harness::with(retry, |_| {}).await
    }

    /// A server whose configuration is changed by `configure`, and a client of it.
    async fn with(retry: RetryPolicy, configure: impl FnOnce(&mut sandboxd::Config)) -> Harness {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "e2b-client-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut config = sandboxd::Config::new(&root);
        config.api_key = Some(API_KEY.into());
        configure(&mut config);
        let server = Sandboxd::start(config)
            .await
            .expect("embedded server starts");
        let mut config = ClientConfig::with_urls(server.api_url(), server.sandbox_url(), API_KEY);
        config.retry = retry;
        let client = E2bClient::new(config).expect("client");
        Harness {
            server,
            client,
            root,
        }
    }

    /// Another client of the same server, with its configuration changed by `change`.
    fn client_with(&self, change: impl FnOnce(&mut ClientConfig)) -> E2bClient {
        let mut config = self.client.config().clone();
        change(&mut config);
        E2bClient::new(config).expect("client")
    }

    async fn create(&self, spec: &SandboxSpec) -> Sandbox {
        self.client
            .create_sandbox(spec)
            .await
            .expect("create sandbox")
    }

    async fn sandbox(&self) -> EnvdClient {
        let sandbox = self.create(&SandboxSpec::new("base", LIFETIME)).await;
        self.client.envd(&sandbox)
    }

    /// A sandbox and a fresh, empty directory in it (the SDK suite's `workdir` fixture).
    async fn sandbox_with_workdir(&self) -> (EnvdClient, String) {
        let envd = self.sandbox().await;
        let workdir = format!("/tmp/{}", unique("conformance"));
        assert!(envd.make_dir(&workdir).await.unwrap());
        (envd, workdir)
    }

    async fn detail(&self, sandbox_id: &str) -> SandboxDetail {
        self.client.get_sandbox(sandbox_id).await.unwrap()
    }

    async fn stop(self) {
        self.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", rand::random::<u64>() >> 16)
}

fn seconds_until(timestamp: &str) -> f64 {
    let end: jiff::Timestamp = timestamp.parse().expect("RFC 3339 timestamp");
    (end - jiff::Timestamp::now())
        .total(jiff::Unit::Second)
        .expect("span in seconds")
}

/// The sandbox ends `seconds` from now, give or take clock granularity.
fn assert_lifetime(detail: &SandboxDetail, seconds: f64) {
    let left = seconds_until(&detail.end_at);
    assert!(
        (left - seconds).abs() < 5.0,
        "{left}s left, expected {seconds}s"
    );
}

fn assert_not_found<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    assert!(
        matches!(outcome, Err(Error::NotFound { .. })),
        "expected NotFound, got {outcome:?}"
    );
}

fn assert_unauthorized<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    assert!(
        matches!(outcome, Err(Error::Unauthorized { .. })),
        "expected Unauthorized, got {outcome:?}"
    );
}

/// stdout, stderr and exit code of a finished command.
fn outcome(output: &Output) -> (&str, &str, i32) {
    (&output.stdout, &output.stderr, output.exit_code)
}

/// A command with environment variables and a working directory, run to completion.
async fn run_spec(envd: &EnvdClient, spec: CommandSpec) -> Output {
    envd.start(&spec).await.unwrap().wait().await.unwrap()
}

/// Names of the `#[tokio::test]` functions in `source`.
fn scenario_tests(source: &str) -> BTreeSet<&str> {
    source
        .split("#[tokio::test]\nasync fn ")
        .skip(1)
        .map(|rest| rest.split('(').next().unwrap())
        .collect()
}

#[test]
fn scenarios_match_the_shared_list() {
    let shared: Vec<&str> = include_str!("conformance/scenarios.txt").lines().collect();
    assert_eq!(
        SCENARIOS, shared,
        "SCENARIOS must be scenarios.txt, line by line"
    );

    let all: Vec<&str> = SCENARIOS.iter().chain(EXTRA_SCENARIOS).copied().collect();
    let distinct: BTreeSet<&str> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a scenario is listed twice");
    assert_eq!(
        scenario_tests(include_str!("e2b_client.rs")),
        distinct,
        "every listed scenario is a test fn of the same name, and every test is listed"
    );
}

// ---------------------------------------------------------------------------------------
// The shared scenario list.

#[tokio::test]
async fn sandbox_create() {
    let harness = Harness::start().await;
    let mut spec = SandboxSpec::new("base", Duration::from_secs(120));
    spec.metadata = map(&[("suite", "conformance"), ("case", &unique("create"))]);
    spec.env_vars = map(&[("GREETING", "hello from create")]);
    let sandbox = harness.create(&spec).await;
    assert!(!sandbox.sandbox_id.is_empty());

    let detail = harness.detail(&sandbox.sandbox_id).await;
    assert_eq!(detail.sandbox_id, sandbox.sandbox_id);
    assert!(!detail.template_id.is_empty());
    assert_eq!(detail.metadata, Some(spec.metadata.clone()));
    assert_eq!(detail.state, SandboxState::Running);
    assert_lifetime(&detail, 120.0);

    let envd = harness.client.envd(&sandbox);
    let output = envd.run("echo $GREETING").await.unwrap();
    assert_eq!(output.stdout, "hello from create\n");
    harness.stop().await;
}

#[tokio::test]
async fn command_stdout() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let output = envd.run("echo one; echo two").await.unwrap();
    assert_eq!(outcome(&output), ("one\ntwo\n", "", 0));
    let many = envd.run("seq 1 20000").await.unwrap();
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(many.stdout, expected);
    harness.stop().await;
}

#[tokio::test]
async fn command_stderr() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let output = envd.run("echo oops >&2").await.unwrap();
    assert_eq!(outcome(&output), ("", "oops\n", 0));
    harness.stop().await;
}

#[tokio::test]
async fn command_exit_code() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    assert_eq!(envd.run("true").await.unwrap().exit_code, 0);
    let exited = envd.run("exit 7").await.unwrap();
    assert!(!exited.success());
    assert_eq!(exited.exit_code, 7);
    harness.stop().await;
}

#[tokio::test]
async fn command_env() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let spec = CommandSpec::shell("echo \"$FIRST-$SECOND\"")
        .env("FIRST", "a")
        .env("SECOND", "b c");
    assert_eq!(run_spec(&envd, spec).await.stdout, "a-b c\n");
    harness.stop().await;
}

#[tokio::test]
async fn command_cwd() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let pwd = run_spec(&envd, CommandSpec::shell("pwd").cwd(&workdir)).await;
    assert_eq!(pwd.stdout, format!("{workdir}\n"));
    let write = CommandSpec::shell("echo here > relative.txt").cwd(&workdir);
    assert_eq!(run_spec(&envd, write).await.exit_code, 0);
    let written = envd
        .read_file(&format!("{workdir}/relative.txt"))
        .await
        .unwrap();
    assert_eq!(&written[..], b"here\n");
    harness.stop().await;
}

#[tokio::test]
async fn command_failure() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let failed = envd
        .run("echo partial; ls /definitely/missing")
        .await
        .unwrap();
    assert_eq!(failed.exit_code, 2);
    assert_eq!(failed.stdout, "partial\n");
    assert!(
        failed.stderr.contains("No such file or directory"),
        "{}",
        failed.stderr
    );
    harness.stop().await;
}

/// Starts `sleep 2; echo finished` (tagged when `tag` is given), checks it is listed, lets go
/// of it, then attaches again through `select` and collects what it prints from then on.
async fn attach_to_background(
    envd: &EnvdClient,
    tag: Option<&str>,
    select: impl FnOnce(u32) -> ProcessSelector,
) {
    let mut spec = CommandSpec::shell("sleep 2; echo finished");
    spec.tag = tag.map(str::to_owned);
    let started = envd.start(&spec).await.unwrap();
    let pid = started.pid();
    assert!(pid > 0);
    drop(started);

    let listed = envd.list_processes().await.unwrap();
    let job = listed
        .iter()
        .find(|process| process.pid == pid)
        .expect("the background job is listed");
    assert_eq!(job.tag.as_deref(), tag);

    let attached = envd.connect(select(pid)).await.unwrap();
    assert_eq!(attached.pid(), pid);
    let output = attached.wait().await.unwrap();
    assert_eq!(
        (output.stdout.as_str(), output.exit_code),
        ("finished\n", 0)
    );
}

#[tokio::test]
async fn command_background_connect() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    attach_to_background(&envd, None, ProcessSelector::Pid).await;
    harness.stop().await;
}

#[tokio::test]
async fn files_write_read() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let path = format!("{workdir}/nested/dir/hello.txt");
    let written = envd.write_file(&path, "hello world\n").await.unwrap();
    assert_eq!(written.len(), 1);
    let info = &written[0];
    assert_eq!(
        (info.path.as_str(), info.name.as_str(), info.kind.as_str()),
        (path.as_str(), "hello.txt", "file")
    );
    assert_eq!(&envd.read_file(&path).await.unwrap()[..], b"hello world\n");
    let shell = envd.run(&format!("cat {path}")).await.unwrap();
    assert_eq!(shell.stdout, "hello world\n");

    envd.write_file(&path, "replaced").await.unwrap();
    assert_eq!(&envd.read_file(&path).await.unwrap()[..], b"replaced");

    let binary: Vec<u8> = (0..=255u8).cycle().take(256 * 64).collect();
    let blob = format!("{workdir}/blob.bin");
    envd.write_file(&blob, binary.clone()).await.unwrap();
    assert_eq!(&envd.read_file(&blob).await.unwrap()[..], &binary[..]);
    harness.stop().await;
}

#[tokio::test]
async fn files_list() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    envd.write_file(&format!("{workdir}/a.txt"), "12345")
        .await
        .unwrap();
    envd.make_dir(&format!("{workdir}/sub")).await.unwrap();
    let entries: BTreeMap<String, _> = envd
        .list_dir(&workdir, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| (entry.name.clone(), entry))
        .collect();
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["a.txt", "sub"]);
    let file = &entries["a.txt"];
    assert_eq!((file.kind, file.size), (FileType::File, 5));
    assert_eq!(file.path, format!("{workdir}/a.txt"));
    assert_eq!(entries["sub"].kind, FileType::Directory);
    harness.stop().await;
}

#[tokio::test]
async fn files_exists() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let present = format!("{workdir}/present.txt");
    envd.write_file(&present, "x").await.unwrap();
    assert!(envd.exists(&present).await.unwrap());
    assert!(envd.exists(&workdir).await.unwrap());
    assert!(!envd.exists(&format!("{workdir}/absent.txt")).await.unwrap());
    harness.stop().await;
}

#[tokio::test]
async fn files_make_dir() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let path = format!("{workdir}/x/y");
    assert!(envd.make_dir(&path).await.unwrap());
    assert!(
        !envd.make_dir(&path).await.unwrap(),
        "make_dir on an existing directory reports false"
    );
    assert_eq!(envd.stat(&path).await.unwrap().kind, FileType::Directory);
    let test = envd.run(&format!("test -d {path}")).await.unwrap();
    assert_eq!(test.exit_code, 0);
    harness.stop().await;
}

#[tokio::test]
async fn files_remove() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let gone = format!("{workdir}/gone.txt");
    envd.write_file(&gone, "x").await.unwrap();
    envd.remove(&gone).await.unwrap();
    assert!(!envd.exists(&gone).await.unwrap());

    let tree = format!("{workdir}/tree");
    envd.write_file(&format!("{tree}/leaf.txt"), "x")
        .await
        .unwrap();
    envd.remove(&tree).await.unwrap();
    assert!(!envd.exists(&tree).await.unwrap());
    assert_eq!(envd.list_dir(&workdir, 1).await.unwrap(), []);
    harness.stop().await;
}

#[tokio::test]
async fn files_read_missing_not_found() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let read = envd.read_file(&format!("{workdir}/missing.txt")).await;
    assert!(read.as_ref().is_err_and(Error::is_not_found), "{read:?}");
    let list = envd.list_dir(&format!("{workdir}/missing-dir"), 1).await;
    assert!(list.as_ref().is_err_and(Error::is_not_found), "{list:?}");
    harness.stop().await;
}

fn metadata_query(pairs: &[(&str, &str)]) -> ListQuery {
    ListQuery {
        metadata: map(pairs),
        ..ListQuery::default()
    }
}

#[tokio::test]
async fn files_watch() {
    let harness = Harness::start().await;
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    envd.make_dir(&format!("{workdir}/sub")).await.unwrap();
    let watcher = envd.create_watcher(&workdir, true).await.unwrap();
    envd.write_file(&format!("{workdir}/new.txt"), "one")
        .await
        .unwrap();
    envd.run(&format!(
        "echo two >> {workdir}/new.txt; echo deep > {workdir}/sub/deep.txt; \
         mv {workdir}/new.txt {workdir}/moved.txt; chmod 600 {workdir}/moved.txt; \
         rm {workdir}/moved.txt"
    ))
    .await
    .unwrap();
    let wanted = [
        ("new.txt", FsEventType::Create),
        ("new.txt", FsEventType::Write),
        ("sub/deep.txt", FsEventType::Create),
        ("new.txt", FsEventType::Rename),
        ("moved.txt", FsEventType::Create),
        ("moved.txt", FsEventType::Chmod),
        ("moved.txt", FsEventType::Remove),
    ];
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        seen.extend(envd.watcher_events(&watcher).await.unwrap());
        let has = |(name, kind): &(&str, FsEventType)| {
            seen.iter()
                .any(|event| event.name == *name && event.kind == *kind)
        };
        if wanted.iter().all(has) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, kind) in wanted {
        assert!(
            seen.iter()
                .any(|event| event.name == name && event.kind == kind),
            "no {kind:?} of {name} in {seen:?}"
        );
    }
    envd.remove_watcher(&watcher).await.unwrap();
    let gone = envd.watcher_events(&watcher).await;
    assert!(
        matches!(&gone, Err(Error::Envd(error)) if error.code == Code::NotFound),
        "{gone:?}"
    );
    // A file is not a directory to watch, and a path outside the sandbox is refused.
    envd.write_file(&format!("{workdir}/plain.txt"), "x")
        .await
        .unwrap();
    let file = envd
        .create_watcher(&format!("{workdir}/plain.txt"), false)
        .await;
    assert!(
        matches!(&file, Err(Error::Envd(error)) if error.code == Code::InvalidArgument),
        "{file:?}"
    );
    let outside = envd.create_watcher("/proc/1", false).await;
    assert!(outside.is_err(), "{outside:?}");
    harness.stop().await;
}

#[tokio::test]
async fn files_watch_stream() {
    let harness = Harness::start().await;
    let sandbox = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    let envd = harness.client.envd(&sandbox);
    // The streaming WatchDir, spoken as a Connect server-stream: one request envelope,
    // then envelopes of start, filesystem and keepalive messages.
    let request = sandcastle_e2b::envd::message_envelope(
        &serde_json::json!({"path": "/tmp", "recursive": true}),
    );
    let response = reqwest::Client::new()
        .post(format!(
            "{}/filesystem.Filesystem/WatchDir",
            harness.server.sandbox_url()
        ))
        .header("E2b-Sandbox-Id", &sandbox.sandbox_id)
        .header(
            "X-Access-Token",
            sandbox.envd_access_token.clone().unwrap_or_default(),
        )
        .header("Content-Type", "application/connect+json")
        .header("Connect-Protocol-Version", "1")
        .header("Keepalive-Ping-Interval", "1")
        .body(request.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut decoder = sandcastle_e2b::envd::EnvelopeDecoder::new(1 << 20);
    let mut messages: Vec<serde_json::Value> = Vec::new();
    let mut next = async || -> serde_json::Value {
        loop {
            if let Some(envelope) = decoder.next_envelope().unwrap() {
                return serde_json::from_slice(&envelope.payload).unwrap();
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut body))
                    .await
                    .expect("a message within 10 s")
                    .expect("the stream goes on")
                    .unwrap();
            decoder.push(&chunk);
        }
    };
    messages.push(next().await);
    assert_eq!(messages[0], serde_json::json!({"start": {}}));
    envd.write_file("/tmp/streamed.txt", "x").await.unwrap();
    let mut event = next().await;
    for _ in 0..10 {
        if event.get("filesystem").is_some() {
            break;
        }
        event = next().await;
    }
    assert_eq!(
        event,
        serde_json::json!({"filesystem": {"name": "streamed.txt", "type": "EVENT_TYPE_CREATE"}})
    );
    // Idle, it keeps the stream alive at the interval the client asked for.
    let idle = loop {
        let message = next().await;
        if message.get("filesystem").is_none() {
            break message;
        }
    };
    assert_eq!(idle, serde_json::json!({"keepalive": {}}));
    // The server's stop ends the stream, which would not end by itself.
    let stopping = tokio::spawn(harness.stop());
    let mut ended = false;
    for _ in 0..5 {
        if decoder
            .next_envelope()
            .unwrap()
            .is_some_and(|envelope| envelope.is_end_stream())
        {
            ended = true;
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut body))
            .await
        {
            Ok(Some(Ok(chunk))) => decoder.push(&chunk),
            _ => break,
        }
    }
    assert!(ended, "the stream ends with the server");
    stopping.await.unwrap();
}

#[tokio::test]
async fn sandbox_list_metadata_query() {
    let harness = Harness::start().await;
    let suite = unique("list");
    // Characters that need URL encoding.
    let odd = "a b&c=d/é";
    let mut ids = BTreeMap::new();
    for role in [odd, "second"] {
        let mut spec = SandboxSpec::new("base", Duration::from_secs(120));
        spec.metadata = map(&[("suite", &suite), ("role", role)]);
        ids.insert(role, harness.create(&spec).await.sandbox_id);
    }

    let page = harness
        .client
        .list_sandboxes_page(&metadata_query(&[("suite", &suite)]), None)
        .await
        .unwrap();
    assert_eq!(page.next_token, None, "everything fits on one page");
    let listed: BTreeSet<&str> = page
        .sandboxes
        .iter()
        .map(|info| info.sandbox_id.as_str())
        .collect();
    assert_eq!(listed, ids.values().map(String::as_str).collect());
    assert!(
        page.sandboxes
            .iter()
            .all(|info| info.state == SandboxState::Running)
    );

    let narrowed = metadata_query(&[("suite", &suite), ("role", odd)]);
    let only = harness.client.list_sandboxes(&narrowed).await.unwrap();
    assert_eq!(only.len(), 1, "{only:?}");
    assert_eq!(only[0].sandbox_id, ids[odd]);
    assert_eq!(only[0].metadata, Some(narrowed.metadata.clone()));

    let absent = metadata_query(&[("suite", &unique("nobody"))]);
    assert_eq!(harness.client.list_sandboxes(&absent).await.unwrap(), []);
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_set_timeout() {
    let harness = Harness::start().await;
    let client = &harness.client;
    let id = harness
        .create(&SandboxSpec::new("base", Duration::from_secs(60)))
        .await
        .sandbox_id;
    for seconds in [600, 30] {
        client
            .set_timeout(&id, Duration::from_secs(seconds))
            .await
            .unwrap();
        assert_lifetime(&harness.detail(&id).await, seconds as f64);
    }

    client
        .set_timeout(&id, Duration::from_secs(1))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.get_sandbox(&id).await {
            Ok(_) => assert!(Instant::now() < deadline, "sandbox outlived its timeout"),
            Err(Error::NotFound { .. }) => break,
            Err(error) => panic!("{error:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_not_found(client.get_sandbox(&id).await);
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_kill() {
    let harness = Harness::start().await;
    let client = &harness.client;
    let sandbox = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    let envd = client.envd(&sandbox);
    assert!(client.kill_sandbox(&sandbox.sandbox_id).await.unwrap());
    assert_not_found(client.get_sandbox(&sandbox.sandbox_id).await);
    let read = envd.read_file("/etc/hostname").await;
    // The proxy's 502 for a sandbox that is gone, which the SDK reports as not running.
    assert!(
        matches!(&read, Err(error) if error.is_sandbox_gone() && !error.is_retryable()),
        "envd of a killed sandbox answered {read:?}"
    );
    assert!(
        !client.kill_sandbox(&sandbox.sandbox_id).await.unwrap(),
        "killing a killed sandbox reports false"
    );
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_unknown_not_found() {
    let harness = Harness::start().await;
    let client = &harness.client;
    assert_not_found(
        client
            .connect_sandbox(UNKNOWN_SANDBOX_ID, Duration::from_secs(60))
            .await,
    );
    assert_not_found(client.get_sandbox(UNKNOWN_SANDBOX_ID).await);
    assert_not_found(
        client
            .set_timeout(UNKNOWN_SANDBOX_ID, Duration::from_secs(30))
            .await,
    );
    assert!(!client.kill_sandbox(UNKNOWN_SANDBOX_ID).await.unwrap());
    harness.stop().await;
}

#[tokio::test]
async fn api_key_rejected() {
    let harness = Harness::start().await;
    let wrong = harness.client_with(|config| config.api_key = format!("{API_KEY}-wrong").into());
    assert_unauthorized(
        wrong
            .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(60)))
            .await,
    );
    assert_unauthorized(wrong.list_sandboxes(&ListQuery::default()).await);
    let denied = TemplateBuildRequest {
        name: Some(unique("denied")),
        ..TemplateBuildRequest::default()
    };
    assert_unauthorized(wrong.request_build(&denied).await);
    harness.stop().await;
}

fn step(kind: &str, args: &[&str]) -> TemplateStep {
    TemplateStep {
        kind: kind.into(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        files_hash: None,
        force: false,
    }
}

/// Requests a build of `name` from `base`, uploads the layers (each is new, then present),
/// runs `steps` and waits until the build is ready.
async fn build_template(
    client: &E2bClient,
    request: TemplateBuildRequest,
    layers: &[&CopyLayer],
    steps: Vec<TemplateStep>,
) -> TemplateBuildRequested {
    let requested = client.request_build(&request).await.unwrap();
    assert!(!requested.template_id.is_empty());
    assert!(!requested.build_id.is_empty());
    for layer in layers {
        assert!(
            client
                .upload_layer(&requested.template_id, layer)
                .await
                .unwrap()
        );
        assert!(
            !client
                .upload_layer(&requested.template_id, layer)
                .await
                .unwrap(),
            "the second upload finds the layer present"
        );
    }
    let start = TemplateBuildStart {
        from_template: Some("base".into()),
        steps,
        ..TemplateBuildStart::default()
    };
    client
        .start_build(&requested.template_id, &requested.build_id, &start)
        .await
        .unwrap();
    let info = client
        .wait_for_build(
            &requested.template_id,
            &requested.build_id,
            Duration::from_millis(200),
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    assert_eq!(info.status, BuildStatus::Ready, "{info:?}");
    requested
}

#[tokio::test]
async fn template_build() {
    let harness = Harness::start().await;
    let client = &harness.client;
    let root = format!("/opt/{}", unique("conformance"));
    let greeting = format!("{root}/greeting.txt");
    let layer = CopyLayer::new(
        "greeting.txt",
        &greeting,
        vec![ContextFile::new(
            "greeting.txt",
            0o644,
            "copied from the context\n",
        )],
    )
    .unwrap();
    let name = unique("conformance");
    let request = TemplateBuildRequest {
        name: Some(name.clone()),
        cpu_count: Some(2),
        memory_mb: Some(1024),
        ..TemplateBuildRequest::default()
    };
    let steps = vec![
        step("WORKDIR", &[&root]),
        layer.step(),
        step("ENV", &["BUILD_FLAVOUR", "vanilla"]),
        step(
            "RUN",
            &["echo \"$BUILD_FLAVOUR\" > flavour.txt && pwd > built-in.txt"],
        ),
    ];
    let build = build_template(client, request, &[&layer], steps).await;
    assert_eq!(build.names, [name]);

    let sandbox = harness
        .create(&SandboxSpec::new(
            &build.template_id,
            Duration::from_secs(120),
        ))
        .await;
    let detail = harness.detail(&sandbox.sandbox_id).await;
    assert_eq!(detail.template_id, build.template_id);
    let envd = client.envd(&sandbox);
    for (file, contents) in [
        ("greeting.txt", "copied from the context\n".to_string()),
        ("flavour.txt", "vanilla\n".to_string()),
        ("built-in.txt", format!("{root}\n")),
    ] {
        let read = envd.read_file(&format!("{root}/{file}")).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&read), contents, "{file}");
    }
    assert_eq!(envd.run("pwd").await.unwrap().stdout, format!("{root}\n"));
    harness.stop().await;
}

// ---------------------------------------------------------------------------------------
// Beyond the shared list.

#[tokio::test]
async fn files_read_from_an_offset() {
    let harness = Harness::start().await;
    let sandbox = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    let envd = harness.client.envd(&sandbox);
    let path = "growing.log";
    envd.write_file(path, "first line\n").await.unwrap();
    assert_eq!(
        &envd.read_file_from(path, 0).await.unwrap()[..],
        b"first line\n"
    );
    envd.run(&format!("echo second line >> {path}"))
        .await
        .unwrap();
    assert_eq!(
        &envd.read_file_from(path, 11).await.unwrap()[..],
        b"second line\n",
        "only what the file gained"
    );
    assert!(
        envd.read_file_from(path, 23).await.unwrap().is_empty(),
        "nothing new"
    );
    assert!(
        envd.read_file_from(path, 99).await.unwrap().is_empty(),
        "past the end"
    );
    // The wire: a 206 with the range, as the real envd answers.
    let response = reqwest::Client::new()
        .get(format!("{}/files", harness.server.sandbox_url()))
        .query(&[("path", path), ("username", "user")])
        .header("E2b-Sandbox-Id", &sandbox.sandbox_id)
        .header(
            "X-Access-Token",
            sandbox.envd_access_token.clone().unwrap_or_default(),
        )
        .header("Range", "bytes=6-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(
        response.headers()["content-range"].to_str().unwrap(),
        "bytes 6-22/23"
    );
    assert_eq!(&response.bytes().await.unwrap()[..], b"line\nsecond line\n");
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_connect() {
    let harness = Harness::start().await;
    let created = harness
        .create(&SandboxSpec::new("base", Duration::from_secs(60)))
        .await;
    let connected = harness
        .client
        .connect_sandbox(&created.sandbox_id, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(connected.sandbox_id, created.sandbox_id);
    let detail = harness.detail(&created.sandbox_id).await;
    assert!(
        seconds_until(&detail.end_at) > 500.0,
        "connect extends the lifetime"
    );
    let output = harness
        .client
        .envd(&connected)
        .run("echo ok")
        .await
        .unwrap();
    assert_eq!(output.stdout, "ok\n");
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_list_pages() {
    let harness = Harness::start().await;
    let run = unique("pages");
    for role in ["a", "b"] {
        let mut spec = SandboxSpec::new("base", LIFETIME);
        spec.metadata = map(&[("run", &run), ("role", role)]);
        harness.create(&spec).await;
    }
    harness.create(&SandboxSpec::new("base", LIFETIME)).await;

    let paged = ListQuery {
        limit: Some(1),
        ..metadata_query(&[("run", &run)])
    };
    let first = harness
        .client
        .list_sandboxes_page(&paged, None)
        .await
        .unwrap();
    assert_eq!(first.sandboxes.len(), 1);
    assert!(first.next_token.is_some(), "a second page exists");
    assert_eq!(
        harness.client.list_sandboxes(&paged).await.unwrap().len(),
        2
    );
    let everything = harness
        .client
        .list_sandboxes(&ListQuery::default())
        .await
        .unwrap();
    assert_eq!(everything.len(), 3);
    harness.stop().await;
}

#[tokio::test]
async fn command_connect_by_tag() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    attach_to_background(&envd, Some("background-job"), |_| {
        ProcessSelector::Tag("background-job".into())
    })
    .await;
    harness.stop().await;
}

#[tokio::test]
async fn command_kill_by_signal() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let sleeper = CommandSpec {
        args: vec!["60".into()],
        ..CommandSpec::new("/bin/sleep").tag("sleeper")
    };
    let mut stream = envd.start(&sleeper).await.unwrap();
    assert!(
        envd.send_signal(ProcessSelector::Tag("sleeper".into()), Signal::Sigkill)
            .await
            .unwrap()
    );
    let mut end = None;
    while let Some(update) = stream.next_update().await.unwrap() {
        if let ProcessUpdate::End(event) = update {
            end = Some(event);
        }
    }
    assert_eq!(end.expect("end event").exit_code, -1, "killed by a signal");
    assert!(
        !envd
            .send_signal(ProcessSelector::Pid(4_000_000), Signal::Sigterm)
            .await
            .unwrap()
    );
    harness.stop().await;
}

#[tokio::test]
async fn command_missing_program_or_cwd() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let missing = envd.run("no-such-command-anywhere").await.unwrap();
    assert_eq!(missing.exit_code, 127);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
    let bad_cwd = envd
        .start(&CommandSpec::shell("true").cwd("/does/not/exist"))
        .await;
    match bad_cwd {
        Err(Error::Envd(error)) => assert_eq!(error.code, Code::InvalidArgument),
        other => panic!("expected invalid_argument, got {other:?}"),
    }
    harness.stop().await;
}

#[tokio::test]
async fn files_relative_paths_depth_rename() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    envd.write_file("dir/sub/f.txt", "12345").await.unwrap();
    envd.write_file("/home/user/dir/top.txt", "x")
        .await
        .unwrap();

    let deep = envd.list_dir("/home/user/dir", 2).await.unwrap();
    let file = deep
        .iter()
        .find(|entry| entry.path == "/home/user/dir/sub/f.txt")
        .expect("relative paths resolve against home, and depth 2 reaches into sub");
    assert_eq!((file.kind, file.size), (FileType::File, 5));

    let moved = envd
        .rename("/home/user/dir/top.txt", "/home/user/dir/moved.txt")
        .await
        .unwrap();
    assert_eq!(moved.path, "/home/user/dir/moved.txt");
    assert!(!envd.exists("/home/user/dir/top.txt").await.unwrap());
    assert_eq!(&envd.read_file("dir/moved.txt").await.unwrap()[..], b"x");

    envd.remove("/home/user/dir").await.unwrap();
    envd.remove("/home/user/dir")
        .await
        .expect("removing a missing path is not an error");
    harness.stop().await;
}

#[tokio::test]
async fn template_delete_in_use() {
    let harness = Harness::start().await;
    let client = &harness.client;
    let name = unique("in-use");
    let request = TemplateBuildRequest {
        name: Some(name.clone()),
        ..TemplateBuildRequest::default()
    };
    let build = build_template(client, request, &[], vec![step("RUN", &["true"])]).await;
    let template_id = build.template_id;
    assert_eq!(
        client
            .get_template(&template_id)
            .await
            .unwrap()
            .build_status,
        BuildStatus::Ready
    );
    assert_eq!(
        client.lookup_alias(&name).await.unwrap(),
        AliasLookup::Owned(sandcastle_e2b::models::TemplateAlias {
            template_id: template_id.clone(),
            public: false,
        })
    );

    let sandbox = harness.create(&SandboxSpec::new(&name, LIFETIME)).await;
    let in_use = client.delete_template(&template_id).await;
    assert!(
        matches!(in_use, Err(Error::TemplateInUse { .. })),
        "{in_use:?}"
    );
    assert!(in_use.unwrap_err().is_retryable());
    assert!(client.kill_sandbox(&sandbox.sandbox_id).await.unwrap());
    assert!(client.delete_template(&template_id).await.unwrap());
    assert!(!client.delete_template(&template_id).await.unwrap());
    assert_eq!(
        client.lookup_alias(&name).await.unwrap(),
        AliasLookup::Missing
    );
    harness.stop().await;
}

#[tokio::test]
async fn retry_rate_limited_honours_retry_after() {
    let harness = Harness::start().await;
    harness.server.faults().set(FaultPlan {
        rate_limited: 2,
        retry_after_secs: 1,
        ..FaultPlan::default()
    });
    let began = Instant::now();
    let sandbox = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "two 1 s waits, took {:?}",
        began.elapsed()
    );
    assert!(!sandbox.sandbox_id.is_empty());

    let impatient = harness.client_with(|config| config.retry = RetryPolicy::none());
    harness.server.faults().set(FaultPlan {
        rate_limited: 1,
        retry_after_secs: 7,
        ..FaultPlan::default()
    });
    let refused = impatient.get_sandbox(&sandbox.sandbox_id).await;
    match refused {
        Err(error @ Error::RateLimited { .. }) => {
            assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
            assert!(error.is_retryable() && error.is_infrastructure());
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    harness.stop().await;
}

#[tokio::test]
async fn retry_service_unavailable() {
    let harness = Harness::start().await;
    harness.server.faults().set(FaultPlan {
        unavailable: 3,
        ..FaultPlan::default()
    });
    let sandbox = harness
        .client
        .create_sandbox(&SandboxSpec::new("base", LIFETIME))
        .await
        .expect("three 503s fit in the default three retries");

    harness.server.faults().set(FaultPlan {
        unavailable: 10,
        ..FaultPlan::default()
    });
    let outcome = harness.client.get_sandbox(&sandbox.sandbox_id).await;
    match outcome {
        Err(error @ Error::Unavailable { status: 503, .. }) => {
            assert!(error.is_retryable() && error.is_infrastructure());
        }
        other => panic!("expected 503 after the retries ran out, got {other:?}"),
    }
    harness.server.faults().clear();
    harness.detail(&sandbox.sandbox_id).await;
    harness.stop().await;
}

#[tokio::test]
async fn stream_cut_is_an_error() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    harness.server.faults().set(FaultPlan {
        cut_streams: 1,
        ..FaultPlan::default()
    });
    let outcome = envd.run("echo first; sleep 1; echo second").await;
    match outcome {
        Err(error @ Error::StreamInterrupted(_)) => assert!(error.is_infrastructure()),
        other => panic!("expected an interrupted stream, got {other:?}"),
    }
    let after = envd.run("echo whole").await.unwrap();
    assert_eq!(after.stdout, "whole\n");
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_vanishes_mid_run() {
    let harness = Harness::start().await;
    harness.server.faults().set(FaultPlan {
        vanish_after: Some((1, Duration::from_millis(500))),
        ..FaultPlan::default()
    });
    let envd = harness.sandbox().await;
    let outcome = envd.run("sleep 30").await;
    let error = outcome.expect_err("the command cannot finish in a vanished sandbox");
    assert!(error.is_sandbox_gone(), "{error:?}");
    let after = envd.run("true").await.expect_err("the sandbox is gone");
    assert!(after.is_sandbox_gone(), "{after:?}");
    assert_not_found(harness.client.get_sandbox(envd.sandbox_id()).await);
    harness.stop().await;
}

#[tokio::test]
async fn latency_is_added_to_every_call() {
    let harness = Harness::start().await;
    let latency = Duration::from_millis(300);
    harness.server.faults().set(FaultPlan {
        latency,
        ..FaultPlan::default()
    });
    let started = Instant::now();
    assert_not_found(harness.client.get_sandbox(UNKNOWN_SANDBOX_ID).await);
    assert!(started.elapsed() >= latency);
    harness.stop().await;
}

/// Requests the client would never send, answered with the service's codes and its
/// `{code, message}` body.
#[tokio::test]
async fn bad_requests_answer_like_the_service() {
    let harness = Harness::start().await;
    let http = reqwest::Client::new();
    let api = harness.server.api_url();
    let cases: [(&str, &str, u16, &str); 5] = [
        ("/sandboxes", "{not json", 400, ""),
        ("/sandboxes", r#"{"timeout":60}"#, 400, "templateID"),
        (
            "/sandboxes",
            r#"{"templateID":"base","timeout":999999}"#,
            400,
            "Timeout cannot be greater than",
        ),
        (
            "/sandboxes",
            r#"{"templateID":"no-such-template","timeout":60}"#,
            404,
            "not found",
        ),
        (
            "/v3/templates",
            r#"{"name":"Bad Name!"}"#,
            400,
            "invalid template name",
        ),
    ];
    for (path, body, status, message) in cases {
        let response = http
            .post(format!("{api}{path}"))
            .header("x-api-key", API_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["code"], status, "{error}");
        let text = error["message"].as_str().unwrap();
        assert!(text.contains(message), "{path} {body}: {text}");
    }
    let missing_key = http
        .get(format!("{api}/v2/sandboxes"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status().as_u16(), 401);
    harness.stop().await;
}

#[tokio::test]
async fn envd_refuses_a_missing_access_token() {
    let harness = Harness::start().await;
    let mut sandbox = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    assert!(
        sandbox.envd_access_token.is_some(),
        "sandboxes are secured by default"
    );
    sandbox.envd_access_token = None;
    let outcome = harness.client.envd(&sandbox).run("true").await;
    assert!(
        matches!(&outcome, Err(Error::Envd(error)) if error.code == Code::Unauthenticated),
        "{outcome:?}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn paths_outside_the_sandbox_are_refused() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let read = envd.read_file("/etc/shadow").await;
    assert!(read.is_err(), "{read:?}");
    for path in ["/proc/1/environ", "../../../usr/bin/env"] {
        let stat = envd.stat(path).await;
        assert!(
            matches!(&stat, Err(Error::Envd(error)) if error.code == Code::PermissionDenied),
            "{path}: {stat:?}"
        );
    }
    harness.stop().await;
}

#[tokio::test]
async fn sandboxes_are_isolated() {
    let harness = Harness::start().await;
    assert!(
        harness.server.is_isolated(),
        "bubblewrap must be installed for this suite (scripts/setup installs it)"
    );
    let first = harness.sandbox().await;
    let second = harness.sandbox().await;
    first
        .write_file("/home/user/mine.txt", b"first".to_vec())
        .await
        .unwrap();
    assert!(!second.exists("/home/user/mine.txt").await.unwrap());
    let system = first.run("touch /usr/bin/sandcastle-probe").await.unwrap();
    assert_ne!(
        system.exit_code, 0,
        "the host's system directories are read-only"
    );
    let processes = first.run("ls /proc | grep -c '^[0-9]'").await.unwrap();
    let visible: u32 = processes.stdout.trim().parse().unwrap();
    assert!(
        visible < 10,
        "a sandbox sees only its own processes, saw {visible}"
    );
    let user = first.run("id -un; echo $HOME").await.unwrap();
    assert_eq!(user.stdout, "user\n/home/user\n");
    harness.stop().await;
}

#[tokio::test]
async fn history_records_every_sandbox_life() {
    let harness = Harness::with(RetryPolicy::default(), |config| config.keep_history = true).await;
    let labelled = |name: &str| {
        let mut spec = SandboxSpec::new("base", LIFETIME);
        spec.metadata = map(&[("name", name)]);
        spec
    };
    let killed = harness.create(&labelled("killed")).await;
    harness.server.faults().set(FaultPlan {
        vanish_after: Some((1, Duration::from_millis(200))),
        ..FaultPlan::default()
    });
    let vanished = harness.create(&labelled("vanished")).await;
    let alive = harness.create(&labelled("alive")).await;
    assert!(
        harness
            .client
            .kill_sandbox(&killed.sandbox_id)
            .await
            .unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while harness
        .client
        .get_sandbox(&vanished.sandbox_id)
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "the sandbox did not vanish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = harness.server.history();
    let lives: Vec<(&str, &str, bool)> = history
        .iter()
        .map(|life| {
            (
                life.sandbox_id.as_str(),
                life.metadata["name"].as_str(),
                life.ended.is_some(),
            )
        })
        .collect();
    assert_eq!(
        lives,
        [
            (killed.sandbox_id.as_str(), "killed", true),
            (vanished.sandbox_id.as_str(), "vanished", true),
            (alive.sandbox_id.as_str(), "alive", false),
        ]
    );
    assert!(
        history
            .windows(2)
            .all(|pair| pair[0].created <= pair[1].created)
    );
    assert!(
        history
            .iter()
            .all(|life| life.ended.is_none_or(|ended| ended >= life.created))
    );
    assert_eq!(harness.server.faults().injected().vanished, 1);
    harness.stop().await;

    let forgetful = Harness::start().await;
    forgetful.create(&SandboxSpec::new("base", LIFETIME)).await;
    assert!(
        forgetful.server.history().is_empty(),
        "history is kept only when asked for"
    );
    forgetful.stop().await;
}

/// The random plan's wiring: each kind of fault reaches the requests it fits, on the
/// control plane and on envd, and is counted. (The draws themselves are unit-tested.)
#[tokio::test]
async fn random_faults_reach_both_listeners() {
    let harness = Harness::with_retry(RetryPolicy::none()).await;
    let faults = harness.server.faults();
    let always = |kind: Fault| FaultPlan {
        retry_after_secs: 3,
        random: Some(RandomFaults {
            rate: 1.0,
            seed: 1,
            kinds: vec![kind],
        }),
        ..FaultPlan::default()
    };
    let envd = harness.sandbox().await;
    let id = envd.sandbox_id().to_string();

    faults.set(always(Fault::Unavailable));
    let api = harness.client.get_sandbox(&id).await;
    assert!(
        matches!(api, Err(Error::Unavailable { status: 503, .. })),
        "{api:?}"
    );
    let rpc = envd.exists("/tmp").await;
    assert!(
        matches!(&rpc, Err(Error::Envd(error)) if error.code == Code::Unavailable && !rpc.as_ref().unwrap_err().is_sandbox_gone()),
        "{rpc:?}"
    );

    faults.set(always(Fault::RateLimited));
    let api = harness.client.get_sandbox(&id).await.expect_err("429");
    assert_eq!(api.retry_after(), Some(Duration::from_secs(3)), "{api:?}");
    let rpc = envd.exists("/tmp").await;
    assert!(
        matches!(&rpc, Err(Error::Envd(error)) if error.code == Code::ResourceExhausted),
        "{rpc:?}"
    );

    faults.set(always(Fault::Latency(Duration::from_millis(200))));
    let began = Instant::now();
    harness.client.get_sandbox(&id).await.expect("only delayed");
    assert!(envd.exists("/tmp").await.expect("only delayed"));
    assert!(began.elapsed() >= Duration::from_millis(400));

    // A cut stream hides the start from the client; the process runs all the same.
    faults.set(always(Fault::CutStream));
    assert!(
        envd.exists("/tmp").await.unwrap(),
        "a cut fits only streams"
    );
    let started = envd
        .start(&CommandSpec {
            args: vec!["30".into()],
            ..CommandSpec::new("sleep").tag("unseen")
        })
        .await;
    assert!(
        matches!(started, Err(Error::StreamInterrupted(_))),
        "{started:?}"
    );
    let running = envd.list_processes().await.unwrap();
    assert!(
        running
            .iter()
            .any(|process| process.tag.as_deref() == Some("unseen")),
        "{running:?}"
    );
    faults.set(FaultPlan {
        cut_starts: 1,
        ..FaultPlan::default()
    });
    let counted = envd
        .start(&CommandSpec {
            args: vec!["30".into()],
            ..CommandSpec::new("sleep").tag("counted")
        })
        .await;
    assert!(
        matches!(counted, Err(Error::StreamInterrupted(_))),
        "{counted:?}"
    );
    let output = envd.run("echo whole").await.expect("only one start is cut");
    assert_eq!(output.stdout, "whole\n");

    faults.set(always(Fault::Vanish(Duration::from_millis(200))));
    harness.detail(&id).await;
    let doomed = harness.create(&SandboxSpec::new("base", LIFETIME)).await;
    faults.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    while harness.client.get_sandbox(&doomed.sandbox_id).await.is_ok() {
        assert!(Instant::now() < deadline, "the sandbox did not vanish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.detail(&id).await;

    let injected = faults.injected();
    assert_eq!(
        Injected {
            requests: 0,
            ..injected
        },
        Injected {
            requests: 0,
            rate_limited: 2,
            unavailable: 2,
            delayed: 2,
            cut_streams: 2,
            vanished: 1,
        }
    );
    assert!(injected.requests > injected.total());
    harness.stop().await;
}
