//! The scenario list shared with the official Python SDK's conformance suite, as
//! functions of this project's E2B client against any E2B-compatible server: the embedded
//! server's tests run each against a server of its own
//! (`crates/sandboxd/tests/e2b_client.rs`), the node test runs them all against the
//! kubernetes runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandcastle_e2b::client::{ClientConfig, E2bClient, ListQuery, SandboxSpec};
use sandcastle_e2b::envd::{Code, FileType, FsEventType, ProcessSelector};
use sandcastle_e2b::envd_client::{CommandSpec, EnvdClient, Output};
use sandcastle_e2b::error::Error;
use sandcastle_e2b::models::{
    BuildStatus, Sandbox, SandboxDetail, SandboxState, TemplateBuildRequest,
    TemplateBuildRequested, TemplateBuildStart, TemplateStep,
};
use sandcastle_e2b::template::{ContextFile, CopyLayer};

/// The shared scenario list, exactly as `crates/sandboxd/tests/conformance/scenarios.txt`
/// has it (same order). Each entry is a function of this module, which asserts the
/// behaviour the SDK's `test_<name>` in `tests/conformance/test_sdk.py` asserts.
pub const SHARED: &[&str] = &[
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

pub const LIFETIME: Duration = Duration::from_secs(300);
/// A well-formed sandbox ID (20 characters of [a-z0-9]) that no server has handed out.
pub const UNKNOWN_SANDBOX_ID: &str = "0nosuchsandbox000000";

/// A server the scenarios run against, through a client of it; remembers the sandboxes
/// they make so that a shared server can be left as it was found.
pub struct Target {
    pub client: E2bClient,
    /// envd's URL, for the scenario that speaks Connect itself.
    pub sandbox_url: String,
    made: Mutex<Vec<String>>,
}

impl Target {
    pub fn new(config: ClientConfig) -> Target {
        Target {
            sandbox_url: config.sandbox_url.clone(),
            client: E2bClient::new(config).expect("a client"),
            made: Mutex::default(),
        }
    }

    /// Another client of the same server, with its configuration changed by `change`.
    pub fn client_with(&self, change: impl FnOnce(&mut ClientConfig)) -> E2bClient {
        let mut config = self.client.config().clone();
        change(&mut config);
        E2bClient::new(config).expect("client")
    }

    pub async fn create(&self, spec: &SandboxSpec) -> Sandbox {
        let sandbox = self
            .client
            .create_sandbox(spec)
            .await
            .expect("create sandbox");
        self.made
            .lock()
            .expect("made")
            .push(sandbox.sandbox_id.clone());
        sandbox
    }

    pub async fn sandbox(&self) -> EnvdClient {
        let sandbox = self.create(&SandboxSpec::new("base", LIFETIME)).await;
        self.client.envd(&sandbox)
    }

    /// A sandbox and a fresh, empty directory in it (the SDK suite's `workdir` fixture).
    pub async fn sandbox_with_workdir(&self) -> (EnvdClient, String) {
        let envd = self.sandbox().await;
        let workdir = format!("/tmp/{}", unique("conformance"));
        assert!(envd.make_dir(&workdir).await.unwrap());
        (envd, workdir)
    }

    pub async fn detail(&self, sandbox_id: &str) -> SandboxDetail {
        self.client.get_sandbox(sandbox_id).await.unwrap()
    }

    /// Kills every sandbox the scenarios made that still runs.
    pub async fn kill_made(&self) {
        let made = std::mem::take(&mut *self.made.lock().expect("made"));
        for id in made {
            self.client.kill_sandbox(&id).await.expect("kill");
        }
    }
}

/// Runs the shared scenario `name` against `target`.
pub async fn run(name: &str, target: &Target) {
    match name {
        "sandbox_create" => sandbox_create(target).await,
        "command_stdout" => command_stdout(target).await,
        "command_stderr" => command_stderr(target).await,
        "command_exit_code" => command_exit_code(target).await,
        "command_env" => command_env(target).await,
        "command_cwd" => command_cwd(target).await,
        "command_failure" => command_failure(target).await,
        "command_background_connect" => command_background_connect(target).await,
        "files_write_read" => files_write_read(target).await,
        "files_list" => files_list(target).await,
        "files_exists" => files_exists(target).await,
        "files_make_dir" => files_make_dir(target).await,
        "files_remove" => files_remove(target).await,
        "files_read_missing_not_found" => files_read_missing_not_found(target).await,
        "files_watch" => files_watch(target).await,
        "sandbox_list_metadata_query" => sandbox_list_metadata_query(target).await,
        "sandbox_set_timeout" => sandbox_set_timeout(target).await,
        "sandbox_kill" => sandbox_kill(target).await,
        "sandbox_unknown_not_found" => sandbox_unknown_not_found(target).await,
        "api_key_rejected" => api_key_rejected(target).await,
        "template_build" => template_build(target).await,
        "files_watch_stream" => drop(files_watch_stream(target).await),
        other => panic!("no shared scenario {other}"),
    }
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

pub fn unique(prefix: &str) -> String {
    {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("random bytes");
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{prefix}-{hex}")
    }
}

pub fn seconds_until(timestamp: &str) -> f64 {
    let end: jiff::Timestamp = timestamp.parse().expect("RFC 3339 timestamp");
    (end - jiff::Timestamp::now())
        .total(jiff::Unit::Second)
        .expect("span in seconds")
}

/// The sandbox ends `seconds` from now, give or take clock granularity.
pub fn assert_lifetime(detail: &SandboxDetail, seconds: f64) {
    let left = seconds_until(&detail.end_at);
    assert!(
        (left - seconds).abs() < 5.0,
        "{left}s left, expected {seconds}s"
    );
}

pub fn assert_not_found<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    assert!(
        matches!(outcome, Err(Error::NotFound { .. })),
        "expected NotFound, got {outcome:?}"
    );
}

pub fn assert_unauthorized<T: std::fmt::Debug>(outcome: Result<T, Error>) {
    assert!(
        matches!(outcome, Err(Error::Unauthorized { .. })),
        "expected Unauthorized, got {outcome:?}"
    );
}

/// stdout, stderr and exit code of a finished command.
pub fn outcome(output: &Output) -> (&str, &str, i32) {
    (&output.stdout, &output.stderr, output.exit_code)
}

/// A command with environment variables and a working directory, run to completion.
pub async fn run_spec(envd: &EnvdClient, spec: CommandSpec) -> Output {
    envd.start(&spec).await.unwrap().wait().await.unwrap()
}

pub async fn sandbox_create(harness: &Target) {
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
}

pub async fn command_stdout(harness: &Target) {
    let envd = harness.sandbox().await;
    let output = envd.run("echo one; echo two").await.unwrap();
    assert_eq!(outcome(&output), ("one\ntwo\n", "", 0));
    let many = envd.run("seq 1 20000").await.unwrap();
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(many.stdout, expected);
}

pub async fn command_stderr(harness: &Target) {
    let envd = harness.sandbox().await;
    let output = envd.run("echo oops >&2").await.unwrap();
    assert_eq!(outcome(&output), ("", "oops\n", 0));
}

pub async fn command_exit_code(harness: &Target) {
    let envd = harness.sandbox().await;
    assert_eq!(envd.run("true").await.unwrap().exit_code, 0);
    let exited = envd.run("exit 7").await.unwrap();
    assert!(!exited.success());
    assert_eq!(exited.exit_code, 7);
}

pub async fn command_env(harness: &Target) {
    let envd = harness.sandbox().await;
    let spec = CommandSpec::shell("echo \"$FIRST-$SECOND\"")
        .env("FIRST", "a")
        .env("SECOND", "b c");
    assert_eq!(run_spec(&envd, spec).await.stdout, "a-b c\n");
}

pub async fn command_cwd(harness: &Target) {
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
}

pub async fn command_failure(harness: &Target) {
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
}

/// Starts `sleep 2; echo finished` (tagged when `tag` is given), checks it is listed, lets go
/// of it, then attaches again through `select` and collects what it prints from then on.
pub async fn attach_to_background(
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

pub async fn command_background_connect(harness: &Target) {
    let envd = harness.sandbox().await;
    attach_to_background(&envd, None, ProcessSelector::Pid).await;
}

pub async fn files_write_read(harness: &Target) {
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
}

pub async fn files_list(harness: &Target) {
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
}

pub async fn files_exists(harness: &Target) {
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let present = format!("{workdir}/present.txt");
    envd.write_file(&present, "x").await.unwrap();
    assert!(envd.exists(&present).await.unwrap());
    assert!(envd.exists(&workdir).await.unwrap());
    assert!(!envd.exists(&format!("{workdir}/absent.txt")).await.unwrap());
}

pub async fn files_make_dir(harness: &Target) {
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
}

pub async fn files_remove(harness: &Target) {
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
}

pub async fn files_read_missing_not_found(harness: &Target) {
    let (envd, workdir) = harness.sandbox_with_workdir().await;
    let read = envd.read_file(&format!("{workdir}/missing.txt")).await;
    assert!(read.as_ref().is_err_and(Error::is_not_found), "{read:?}");
    let list = envd.list_dir(&format!("{workdir}/missing-dir"), 1).await;
    assert!(list.as_ref().is_err_and(Error::is_not_found), "{list:?}");
}

pub fn metadata_query(pairs: &[(&str, &str)]) -> ListQuery {
    ListQuery {
        metadata: map(pairs),
        ..ListQuery::default()
    }
}

pub async fn files_watch(harness: &Target) {
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
}

/// The rest of a WatchDir stream `files_watch_stream` read from: the embedded server's
/// own test goes on to stop the server and see the stream end.
pub struct OpenStream {
    pub body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    pub decoder: sandcastle_e2b::envd::EnvelopeDecoder,
}

pub async fn files_watch_stream(harness: &Target) -> OpenStream {
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
            harness.sandbox_url
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
    let mut body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>> =
        Box::pin(response.bytes_stream());
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
    OpenStream { body, decoder }
}

pub async fn sandbox_list_metadata_query(harness: &Target) {
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
}

pub async fn sandbox_set_timeout(harness: &Target) {
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
}

pub async fn sandbox_kill(harness: &Target) {
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
}

pub async fn sandbox_unknown_not_found(harness: &Target) {
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
}

pub async fn api_key_rejected(harness: &Target) {
    let wrong =
        harness.client_with(|config| config.api_key = "sandcastle-wrong-key".to_string().into());
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
}

pub fn step(kind: &str, args: &[&str]) -> TemplateStep {
    TemplateStep {
        kind: kind.into(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        files_hash: None,
        force: false,
    }
}

/// Requests a build of `name` from `base`, uploads the layers (each is new, then present),
/// runs `steps` and waits until the build is ready.
pub async fn build_template(
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

pub async fn template_build(harness: &Target) {
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
}
