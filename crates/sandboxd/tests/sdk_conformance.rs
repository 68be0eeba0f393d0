//! The official E2B Python SDK against the embedded sandbox server: starts the server
//! in-process and runs the pytest suite in `tests/conformance` with the SDK pointed at it.
//! The suite needs the virtualenv that `scripts/setup` builds in `.venv`.

use std::path::Path;
use std::time::Duration;

use sandcastle_sandboxd::{Config, Sandboxd};

const API_KEY: &str = "e2b_sandcastle_conformance_key";
/// Generous: the suite builds a template and waits out a sandbox timeout.
const SUITE_DEADLINE: Duration = Duration::from_secs(15 * 60);

#[tokio::test(flavor = "multi_thread")]
async fn official_python_sdk_passes_the_conformance_suite() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sandcastle=info".into()),
        )
        .try_init();

    let python = sandcastle_testkit::repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup to create the virtualenv with the E2B SDK",
        python.display()
    );
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-conformance");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).expect("clear the previous run's scratch dir");
    }

    let mut config = Config::new(scratch.join("server"));
    config.api_key = Some(API_KEY.to_string());
    let server = Sandboxd::start(config)
        .await
        .expect("start the embedded sandbox server");

    let pytest = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(format!("--basetemp={}", scratch.join("pytest").display()))
        .arg("tests/conformance")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("E2B_API_URL", server.api_url())
        .env("E2B_SANDBOX_URL", server.sandbox_url())
        .env("E2B_API_KEY", API_KEY)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SUITE_DEADLINE, pytest).await;
    server.stop().await;

    let output = output
        .unwrap_or_else(|_| panic!("the SDK conformance suite ran longer than {SUITE_DEADLINE:?}"))
        .expect("run pytest from .venv");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the SDK conformance suite failed ({}); pytest's report is above",
        output.status
    );
}
