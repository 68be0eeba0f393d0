//! Drives the E2B client against the embedded E2B-compatible server. Every scenario gets a
//! server of its own, so injected faults and sandbox counts never leak between scenarios.
//!
//! The first part implements the scenario list shared with the Python SDK conformance suite
//! (`tests/conformance/scenarios.txt`, implemented there by `tests/conformance/test_sdk.py`):
//! each scenario is a test of the same name asserting what the SDK test `test_<name>`
//! asserts. The second part covers client behaviour the SDK list does not reach.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandcastle_e2b::client::{AliasLookup, ClientConfig, ListQuery, SandboxSpec};
use sandcastle_e2b::envd::{Code, FileType, ProcessSelector, Signal};
use sandcastle_e2b::envd_client::{CommandSpec, ProcessUpdate};
use sandcastle_e2b::error::Error;
use sandcastle_e2b::models::{BuildStatus, TemplateBuildRequest};
use sandcastle_e2b::retry::RetryPolicy;
use sandcastle_sandboxd::{self as sandboxd, Fault, FaultPlan, Injected, RandomFaults, Sandboxd};
use sandcastle_testkit::scenarios::{
    self, LIFETIME, UNKNOWN_SANDBOX_ID, assert_not_found, attach_to_background, build_template,
    map, metadata_query, seconds_until, step, unique,
};

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

/// An embedded server of the scenario's own, and the scenarios' view of it (which the
/// harness derefs to: `client`, `create`, `sandbox`, …).
struct Harness {
    server: Sandboxd,
    target: scenarios::Target,
    root: PathBuf,
}

impl std::ops::Deref for Harness {
    type Target = scenarios::Target;

    fn deref(&self) -> &scenarios::Target {
        &self.target
    }
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
        Harness {
            server,
            target: scenarios::Target::new(config),
            root,
        }
    }

    /// Runs a shared scenario, then stops the server.
    async fn run(self, scenario: impl for<'a> AsyncFnOnce(&'a scenarios::Target)) {
        scenario(&self.target).await;
        self.stop().await;
    }

    async fn stop(self) {
        self.server.stop().await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
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
        scenarios::SHARED,
        shared,
        "SCENARIOS must be scenarios.txt, line by line"
    );

    let all: Vec<&str> = scenarios::SHARED
        .iter()
        .chain(EXTRA_SCENARIOS)
        .copied()
        .collect();
    let distinct: BTreeSet<&str> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a scenario is listed twice");
    assert_eq!(
        scenario_tests(include_str!("e2b_client.rs")),
        distinct,
        "every listed scenario is a test fn of the same name, and every test is listed"
    );
}

// ---------------------------------------------------------------------------------------
// The shared scenario list: each runs the test kit's scenario of the same name against a
// server of its own.

#[tokio::test]
async fn sandbox_create() {
    Harness::start().await.run(scenarios::sandbox_create).await;
}

#[tokio::test]
async fn command_stdout() {
    Harness::start().await.run(scenarios::command_stdout).await;
}

#[tokio::test]
async fn command_stderr() {
    Harness::start().await.run(scenarios::command_stderr).await;
}

#[tokio::test]
async fn command_exit_code() {
    Harness::start()
        .await
        .run(scenarios::command_exit_code)
        .await;
}

#[tokio::test]
async fn command_env() {
    Harness::start().await.run(scenarios::command_env).await;
}

#[tokio::test]
async fn command_cwd() {
    Harness::start().await.run(scenarios::command_cwd).await;
}

#[tokio::test]
async fn command_failure() {
    Harness::start().await.run(scenarios::command_failure).await;
}

#[tokio::test]
async fn command_background_connect() {
    Harness::start()
        .await
        .run(scenarios::command_background_connect)
        .await;
}

#[tokio::test]
async fn files_write_read() {
    Harness::start()
        .await
        .run(scenarios::files_write_read)
        .await;
}

#[tokio::test]
async fn files_list() {
    Harness::start().await.run(scenarios::files_list).await;
}

#[tokio::test]
async fn files_exists() {
    Harness::start().await.run(scenarios::files_exists).await;
}

#[tokio::test]
async fn files_make_dir() {
    Harness::start().await.run(scenarios::files_make_dir).await;
}

#[tokio::test]
async fn files_remove() {
    Harness::start().await.run(scenarios::files_remove).await;
}

#[tokio::test]
async fn files_read_missing_not_found() {
    Harness::start()
        .await
        .run(scenarios::files_read_missing_not_found)
        .await;
}

#[tokio::test]
async fn files_watch() {
    Harness::start().await.run(scenarios::files_watch).await;
}

#[tokio::test]
async fn sandbox_list_metadata_query() {
    Harness::start()
        .await
        .run(scenarios::sandbox_list_metadata_query)
        .await;
}

#[tokio::test]
async fn sandbox_set_timeout() {
    Harness::start()
        .await
        .run(scenarios::sandbox_set_timeout)
        .await;
}

#[tokio::test]
async fn sandbox_kill() {
    Harness::start().await.run(scenarios::sandbox_kill).await;
}

#[tokio::test]
async fn sandbox_unknown_not_found() {
    Harness::start()
        .await
        .run(scenarios::sandbox_unknown_not_found)
        .await;
}

#[tokio::test]
async fn api_key_rejected() {
    Harness::start()
        .await
        .run(scenarios::api_key_rejected)
        .await;
}

#[tokio::test]
async fn template_build() {
    Harness::start().await.run(scenarios::template_build).await;
}

#[tokio::test]
async fn files_watch_stream() {
    let harness = Harness::start().await;
    let scenarios::OpenStream {
        mut body,
        mut decoder,
    } = scenarios::files_watch_stream(&harness.target).await;
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
