//! Drives the E2B client against the embedded E2B-compatible server. Every scenario gets a
//! server of its own, so injected faults and sandbox counts never leak between scenarios.
//! The scenario names are shared with the Python SDK conformance suite through
//! `tests/conformance/scenarios.txt`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandcastle::e2b::client::{AliasLookup, ClientConfig, E2bClient, ListQuery, SandboxSpec};
use sandcastle::e2b::envd::{Code, FileType, ProcessSelector, Signal};
use sandcastle::e2b::envd_client::{CommandSpec, EnvdClient, ProcessUpdate};
use sandcastle::e2b::error::Error;
use sandcastle::e2b::models::{
    BuildStatus, TemplateBuildRequest, TemplateBuildStart, TemplateStep,
};
use sandcastle::e2b::retry::RetryPolicy;
use sandcastle::e2b::template::{ContextFile, CopyLayer};
use sandcastle::sandboxd::{self, FaultPlan, Sandboxd};

/// The scenarios this file implements, in the shared list's order.
const SCENARIOS: &[&str] = &[
    "sandbox_create_with_metadata_envs_timeout",
    "sandbox_list_by_metadata",
    "sandbox_set_timeout",
    "sandbox_connect",
    "sandbox_kill_twice",
    "command_stdout_stderr_exit_code",
    "command_env_and_cwd",
    "command_failing",
    "command_background_connect_by_tag",
    "command_kill_by_signal",
    "files_write_read",
    "files_list_exists_make_dir_remove",
    "template_build_run_env_workdir_copy",
    "retry_rate_limited_honours_retry_after",
    "retry_service_unavailable",
    "stream_cut_is_an_error",
];

const API_KEY: &str = "sandcastle-test-key";
const LIFETIME: Duration = Duration::from_secs(300);

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
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "e2b-client-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut config = sandboxd::Config::new(&root);
        config.api_key = Some(API_KEY.into());
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

    async fn sandbox(&self) -> EnvdClient {
        let sandbox = self
            .client
            .create_sandbox(&SandboxSpec::new("base", LIFETIME))
            .await
            .expect("create sandbox");
        self.client.envd(&sandbox)
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

fn unique() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn seconds_until(timestamp: &str) -> f64 {
    let end: jiff::Timestamp = timestamp.parse().expect("RFC 3339 timestamp");
    (end - jiff::Timestamp::now())
        .total(jiff::Unit::Second)
        .expect("span in seconds")
}

#[test]
fn scenarios_match_the_shared_list() {
    let shared = include_str!("conformance/scenarios.txt");
    let listed: Vec<&str> = shared
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(listed, SCENARIOS);
}

#[tokio::test]
async fn sandbox_create_with_metadata_envs_timeout() {
    let harness = Harness::start().await;
    let mut spec = SandboxSpec::new("base", Duration::from_secs(120));
    spec.metadata = map(&[("owner", "team/agent-1"), ("purpose", "test")]);
    spec.env_vars = map(&[("GREETING", "hello from create")]);
    let sandbox = harness.client.create_sandbox(&spec).await.unwrap();
    assert_eq!(sandbox.sandbox_id.len(), 20);
    assert!(
        sandbox.envd_access_token.is_some(),
        "secure sandboxes get a token"
    );

    let detail = harness
        .client
        .get_sandbox(&sandbox.sandbox_id)
        .await
        .unwrap();
    assert_eq!(detail.metadata, Some(spec.metadata.clone()));
    let left = seconds_until(&detail.end_at);
    assert!((100.0..=121.0).contains(&left), "{left}s left");

    let envd = harness.client.envd(&sandbox);
    let output = envd.run("echo \"$GREETING\"").await.unwrap();
    assert_eq!(output.stdout, "hello from create\n");
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_list_by_metadata() {
    let harness = Harness::start().await;
    let run = unique();
    for role in ["a", "b"] {
        let mut spec = SandboxSpec::new("base", LIFETIME);
        spec.metadata = map(&[("run", &run), ("role", role), ("owner", "ns/name")]);
        harness.client.create_sandbox(&spec).await.unwrap();
    }
    harness
        .client
        .create_sandbox(&SandboxSpec::new("base", LIFETIME))
        .await
        .unwrap();

    let ours = ListQuery {
        metadata: map(&[("run", &run)]),
        ..ListQuery::default()
    };
    assert_eq!(harness.client.list_sandboxes(&ours).await.unwrap().len(), 2);
    let one = ListQuery {
        metadata: map(&[("run", &run), ("role", "a"), ("owner", "ns/name")]),
        ..ListQuery::default()
    };
    let found = harness.client.list_sandboxes(&one).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0]
            .metadata
            .as_ref()
            .unwrap()
            .get("role")
            .map(String::as_str),
        Some("a")
    );

    let paged = ListQuery {
        limit: Some(1),
        ..ours.clone()
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
async fn sandbox_set_timeout() {
    let harness = Harness::start().await;
    let sandbox = harness
        .client
        .create_sandbox(&SandboxSpec::new("base", LIFETIME))
        .await
        .unwrap();
    harness
        .client
        .set_timeout(&sandbox.sandbox_id, Duration::from_secs(30))
        .await
        .unwrap();
    let detail = harness
        .client
        .get_sandbox(&sandbox.sandbox_id)
        .await
        .unwrap();
    let left = seconds_until(&detail.end_at);
    assert!(
        (20.0..=31.0).contains(&left),
        "{left}s left after shortening"
    );

    let missing = harness
        .client
        .set_timeout("doesnotexist00000000", Duration::from_secs(30))
        .await;
    assert!(
        matches!(missing, Err(Error::NotFound { .. })),
        "{missing:?}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn sandbox_connect() {
    let harness = Harness::start().await;
    let created = harness
        .client
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(60)))
        .await
        .unwrap();
    let connected = harness
        .client
        .connect_sandbox(&created.sandbox_id, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(connected.sandbox_id, created.sandbox_id);
    let detail = harness
        .client
        .get_sandbox(&created.sandbox_id)
        .await
        .unwrap();
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
async fn sandbox_kill_twice() {
    let harness = Harness::start().await;
    let sandbox = harness
        .client
        .create_sandbox(&SandboxSpec::new("base", LIFETIME))
        .await
        .unwrap();
    assert!(
        harness
            .client
            .kill_sandbox(&sandbox.sandbox_id)
            .await
            .unwrap()
    );
    assert!(
        !harness
            .client
            .kill_sandbox(&sandbox.sandbox_id)
            .await
            .unwrap()
    );
    let gone = harness.client.get_sandbox(&sandbox.sandbox_id).await;
    assert!(matches!(gone, Err(Error::NotFound { .. })), "{gone:?}");
    harness.stop().await;
}

#[tokio::test]
async fn command_stdout_stderr_exit_code() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let output = envd.run("echo out; echo err >&2; exit 3").await.unwrap();
    assert_eq!(output.stdout, "out\n");
    assert_eq!(output.stderr, "err\n");
    assert_eq!(output.exit_code, 3);
    assert!(!output.success());
    let clean = envd.run("printf 'a\\nb'").await.unwrap();
    assert_eq!((clean.stdout.as_str(), clean.exit_code), ("a\nb", 0));
    harness.stop().await;
}

#[tokio::test]
async fn command_env_and_cwd() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    assert!(envd.make_dir("/home/user/work").await.unwrap());
    let spec = CommandSpec::shell("echo \"$FOO\"; pwd")
        .env("FOO", "bar baz")
        .cwd("/home/user/work");
    let output = envd.start(&spec).await.unwrap().wait().await.unwrap();
    assert_eq!(output.stdout, "bar baz\n/home/user/work\n");
    assert_eq!(output.exit_code, 0);
    harness.stop().await;
}

#[tokio::test]
async fn command_failing() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let output = envd.run("false").await.unwrap();
    assert_eq!(output.exit_code, 1);
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
async fn command_background_connect_by_tag() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let started = envd
        .start(&CommandSpec::shell("sleep 2; echo done").tag("background-job"))
        .await
        .unwrap();
    let pid = started.pid();
    drop(started);

    let listed = envd.list_processes().await.unwrap();
    let job = listed
        .iter()
        .find(|process| process.tag.as_deref() == Some("background-job"))
        .expect("the background job is listed");
    assert_eq!(job.pid, pid);

    let attached = envd
        .connect(ProcessSelector::Tag("background-job".into()))
        .await
        .unwrap();
    assert_eq!(attached.pid(), pid);
    let output = attached.wait().await.unwrap();
    assert_eq!(output.stdout, "done\n");
    assert_eq!(output.exit_code, 0);
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
async fn files_write_read() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    let written = envd
        .write_file("/home/user/notes/a.txt", "hello file\n")
        .await
        .unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].path, "/home/user/notes/a.txt");
    assert_eq!(
        &envd.read_file("/home/user/notes/a.txt").await.unwrap()[..],
        b"hello file\n"
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    envd.write_file("relative.bin", binary.clone())
        .await
        .unwrap();
    assert_eq!(
        &envd.read_file("/home/user/relative.bin").await.unwrap()[..],
        &binary[..]
    );
    let shell = envd.run("cat /home/user/notes/a.txt").await.unwrap();
    assert_eq!(shell.stdout, "hello file\n");
    let missing = envd.read_file("/home/user/nope.txt").await;
    assert!(
        missing.as_ref().is_err_and(Error::is_not_found),
        "{missing:?}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn files_list_exists_make_dir_remove() {
    let harness = Harness::start().await;
    let envd = harness.sandbox().await;
    assert!(envd.make_dir("/home/user/dir/sub").await.unwrap());
    assert!(!envd.make_dir("/home/user/dir/sub").await.unwrap());
    envd.write_file("/home/user/dir/sub/f.txt", "12345")
        .await
        .unwrap();
    envd.write_file("/home/user/dir/top.txt", "x")
        .await
        .unwrap();

    let shallow = envd.list_dir("/home/user/dir", 1).await.unwrap();
    let mut names: Vec<&str> = shallow.iter().map(|entry| entry.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["sub", "top.txt"]);
    let deep = envd.list_dir("/home/user/dir", 2).await.unwrap();
    let file = deep
        .iter()
        .find(|entry| entry.path == "/home/user/dir/sub/f.txt")
        .expect("depth 2 reaches into sub");
    assert_eq!((file.kind, file.size), (FileType::File, 5));

    let stat = envd.stat("/home/user/dir/sub").await.unwrap();
    assert_eq!(stat.kind, FileType::Directory);
    assert!(envd.exists("/home/user/dir/top.txt").await.unwrap());
    let moved = envd
        .rename("/home/user/dir/top.txt", "/home/user/dir/moved.txt")
        .await
        .unwrap();
    assert_eq!(moved.path, "/home/user/dir/moved.txt");
    assert!(!envd.exists("/home/user/dir/top.txt").await.unwrap());

    envd.remove("/home/user/dir").await.unwrap();
    assert!(!envd.exists("/home/user/dir").await.unwrap());
    envd.remove("/home/user/dir").await.unwrap();
    let gone = envd.list_dir("/home/user/dir", 1).await;
    assert!(gone.as_ref().is_err_and(Error::is_not_found), "{gone:?}");
    harness.stop().await;
}

#[tokio::test]
async fn template_build_run_env_workdir_copy() {
    let harness = Harness::start().await;
    let client = &harness.client;
    let name = format!("sc-test-{}", unique());
    let requested = client
        .request_build(&TemplateBuildRequest {
            name: Some(name.clone()),
            ..TemplateBuildRequest::default()
        })
        .await
        .unwrap();
    assert!(!requested.template_id.is_empty());
    assert!(!requested.build_id.is_empty());

    let layer = CopyLayer::new(
        "files",
        "/app",
        vec![
            ContextFile::new(
                "files/hello.sh",
                0o755,
                "#!/bin/sh\necho \"hi from $STAGE\"\n",
            ),
            ContextFile::new("files/data.txt", 0o644, "data\n"),
        ],
    )
    .unwrap();
    assert!(
        client
            .upload_layer(&requested.template_id, &layer)
            .await
            .unwrap()
    );
    assert!(
        !client
            .upload_layer(&requested.template_id, &layer)
            .await
            .unwrap(),
        "the second upload finds the layer present"
    );

    let step = |kind: &str, args: &[&str]| TemplateStep {
        kind: kind.into(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        files_hash: None,
        force: false,
    };
    let start = TemplateBuildStart {
        from_template: Some("base".into()),
        steps: vec![
            step(
                "RUN",
                &["mkdir -p /home/user/out && echo built > /home/user/out/marker"],
            ),
            step("ENV", &["STAGE", "test"]),
            step("WORKDIR", &["/home/user/work"]),
            layer.step(),
        ],
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

    let template = client.get_template(&requested.template_id).await.unwrap();
    assert_eq!(template.build_status, BuildStatus::Ready);
    assert_eq!(
        client.lookup_alias(&name).await.unwrap(),
        AliasLookup::Owned(sandcastle::e2b::models::TemplateAlias {
            template_id: requested.template_id.clone(),
            public: false,
        })
    );

    let sandbox = client
        .create_sandbox(&SandboxSpec::new(name.clone(), LIFETIME))
        .await
        .unwrap();
    let envd = client.envd(&sandbox);
    let output = envd
        .run("cat /home/user/out/marker /app/data.txt; /app/hello.sh; pwd")
        .await
        .unwrap();
    assert_eq!(
        output.stdout, "built\ndata\nhi from test\n/home/user/work\n",
        "{output:?}"
    );

    let in_use = client.delete_template(&requested.template_id).await;
    assert!(
        matches!(in_use, Err(Error::TemplateInUse { .. })),
        "{in_use:?}"
    );
    assert!(in_use.unwrap_err().is_retryable());
    assert!(client.kill_sandbox(&sandbox.sandbox_id).await.unwrap());
    assert!(
        client
            .delete_template(&requested.template_id)
            .await
            .unwrap()
    );
    assert!(
        !client
            .delete_template(&requested.template_id)
            .await
            .unwrap()
    );
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
    let sandbox = harness
        .client
        .create_sandbox(&SandboxSpec::new("base", LIFETIME))
        .await
        .unwrap();
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "two 1 s waits, took {:?}",
        began.elapsed()
    );
    assert!(!sandbox.sandbox_id.is_empty());

    let impatient = E2bClient::new(ClientConfig {
        retry: RetryPolicy::none(),
        ..harness.client.config().clone()
    })
    .unwrap();
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
    harness
        .client
        .get_sandbox(&sandbox.sandbox_id)
        .await
        .unwrap();
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
