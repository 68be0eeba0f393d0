//! The official E2B SDKs against the embedded sandbox server: each test starts its own
//! server in-process and runs one SDK's suite from `tests/conformance` with the SDK
//! pointed at it. The Python suite needs the virtualenv that `scripts/setup` builds in
//! `.venv`; the JavaScript suite needs Node.js and the `e2b` package that `scripts/setup`
//! installs into `tests/conformance/js/node_modules`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandcastle_sandboxd::{Config, Sandboxd};

const API_KEY: &str = "e2b_sandcastle_conformance_key";
/// Generous: the suite builds a template and waits out a sandbox timeout.
const SUITE_DEADLINE: Duration = Duration::from_secs(15 * 60);

#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_passes_the_conformance_suite() {
    let python = sandcastle_testkit::repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup to create the virtualenv with the E2B SDK",
        python.display()
    );
    let (server, scratch) = start_server("sdk-conformance").await;

    let mut pytest = tokio::process::Command::new(&python);
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(format!("--basetemp={}", scratch.join("pytest").display()))
        .arg("tests/conformance")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_suite("the Python SDK conformance suite", server, pytest).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn official_javascript_sdk_passes_the_conformance_suite() {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(output) if output.status.success()),
        "node does not run ({node:?}): install Node.js 20 or later, then run scripts/setup"
    );
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/js/node_modules");
    assert!(
        modules.join("e2b/package.json").is_file(),
        "{} is missing or has no e2b package: run scripts/setup to install the E2B JavaScript SDK",
        modules.display()
    );
    let (server, scratch) = start_server("sdk-conformance-js").await;
    // The template-build scenario writes its file context under the OS temp dir.
    let tmp = scratch.join("tmp");
    std::fs::create_dir_all(&tmp).expect("create the JavaScript suite's temp dir");

    // The file runs directly rather than under `node --test`, which would run it in a
    // child process that kill_on_drop could not reach when the deadline passes.
    let mut node = tokio::process::Command::new("node");
    node.args(["--test-reporter=spec", "tests/conformance/js/sdk.test.mjs"])
        .env("TMPDIR", &tmp);
    run_suite("the JavaScript SDK conformance suite", server, node).await;
}

/// Starts an embedded server that only takes [`API_KEY`], with a fresh scratch dir of
/// `name` under the target's temp dir for it and the suite.
async fn start_server(name: &str) -> (Sandboxd, PathBuf) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sandcastle=info".into()),
        )
        .try_init();

    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).expect("clear the previous run's scratch dir");
    }

    let mut config = Config::new(scratch.join("server"));
    config.api_key = Some(API_KEY.to_string());
    let server = Sandboxd::start(config)
        .await
        .expect("start the embedded sandbox server");
    (server, scratch)
}

/// Runs `suite` from this crate's directory with the SDK's environment pointed at
/// `server`, stops the server, and fails with the suite's report unless it passed.
async fn run_suite(what: &str, server: Sandboxd, mut suite: tokio::process::Command) {
    let run = suite
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("E2B_API_URL", server.api_url())
        .env("E2B_SANDBOX_URL", server.sandbox_url())
        .env("E2B_API_KEY", API_KEY)
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SUITE_DEADLINE, run).await;
    server.stop().await;

    let output = output
        .unwrap_or_else(|_| panic!("{what} ran longer than {SUITE_DEADLINE:?}"))
        .unwrap_or_else(|err| panic!("could not run {what}: {err}"));
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "{what} failed ({}); its report is above",
        output.status
    );
}
