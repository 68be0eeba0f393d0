//! The pinned Claude Code CLI (`.tools/bin/claude`, installed by `scripts/setup`)
//! against the scripted Messages endpoint, judged by the stream-json parser.
//!
//! Set `SANDCASTLE_CAPTURE_CLAUDE=1` to also write each transcript into
//! `tests/fixtures/claude/`, which is how the parser's fixtures were made.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sandcastle::agent::stream_json::{FailureReason, StreamParser, Verdict};
use sandcastle_testkit::model::{
    HELLO_OUTPUT, HELLO_PY, Mode, Script, ScriptedModel, structured_answer,
};

const API_KEY: &str = "sk-ant-scripted-dummy";

fn repo() -> &'static Path {
    sandcastle_testkit::repo()
}

fn claude() -> PathBuf {
    let path = repo().join(".tools/bin/claude");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup to install the pinned Claude Code CLI",
        path.display()
    );
    path
}

/// The pinned CLI declares `node >= 22`, and setup installs it with the machine's Node
/// 20: npm runs only its postinstall there, which links the native executable the CLI
/// is. It runs with no Node at all, which is how sandboxes (with no Node) run it too.
#[test]
fn the_cli_is_a_native_executable_that_needs_no_node() {
    let path = claude().canonicalize().expect("the CLI's path");
    let head = std::fs::read(&path).expect("the CLI");
    assert_eq!(
        &head[..4],
        b"\x7fELF",
        "{} is not a native executable",
        path.display()
    );
    let out = std::process::Command::new(&path)
        .arg("--version")
        .env_clear()
        .env("PATH", "/nonexistent")
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("the CLI runs");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2.1.330 (Claude Code)"
    );
}

/// A scratch directory that is removed again when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("sandcastle-claude-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Scratch(dir)
    }

    fn work(&self) -> PathBuf {
        self.0.join("work")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

struct Run {
    stdout: String,
    code: Option<i32>,
    parser: StreamParser,
}

/// Runs the CLI headless in `scratch`, with nothing from this process's environment
/// but PATH, so the run cannot reach anything but the scripted endpoint.
async fn run_claude(
    model: &ScriptedModel,
    scratch: &Scratch,
    max_turns: u32,
    extra_env: &[(&str, &str)],
) -> Run {
    run_claude_with(model, scratch, max_turns, extra_env, &[]).await
}

/// [`run_claude`] with further arguments.
async fn run_claude_with(
    model: &ScriptedModel,
    scratch: &Scratch,
    max_turns: u32,
    extra_env: &[(&str, &str)],
    extra_args: &[&str],
) -> Run {
    let mut command = tokio::process::Command::new(claude());
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", scratch.0.join("home"))
        .env("ANTHROPIC_BASE_URL", model.base_url())
        .env("ANTHROPIC_API_KEY", API_KEY)
        // Without it the CLI probes the base URL and resolves api.anthropic.com.
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        // The default (10 retries with backoff) turns a 401 into minutes.
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        // The CLI refuses bypassPermissions as root unless told it is sandboxed.
        .env("IS_SANDBOX", "1")
        .envs(extra_env.iter().copied())
        .args([
            "-p",
            "Create hello.py and run it",
            "--output-format",
            "stream-json",
            "--verbose",
        ])
        .args([
            "--permission-mode",
            "bypassPermissions",
            "--max-turns",
            &max_turns.to_string(),
        ])
        .args(extra_args)
        .current_dir(scratch.work())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn claude");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("claude ran for over a minute")
        .expect("wait for claude");
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let mut parser = StreamParser::new();
    parser.feed(stdout.as_bytes());
    parser.finish();
    assert_eq!(
        parser.malformed_lines(),
        0,
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        stdout,
        code: out.status.code(),
        parser,
    }
}

fn capture(name: &str, transcript: &str) {
    if std::env::var_os("SANDCASTLE_CAPTURE_CLAUDE").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.jsonl")), transcript).unwrap();
    }
}

#[tokio::test]
async fn success_writes_and_runs_the_file() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    let scratch = Scratch::new("success");
    let run = run_claude(&model, &scratch, 10, &[]).await;
    capture("success", &run.stdout);
    // A killed CLI: everything up to, but not including, the result line.
    let killed: String = run
        .stdout
        .lines()
        .filter(|l| !l.contains(r#""type":"result""#))
        .map(|l| format!("{l}\n"))
        .collect();
    capture("killed", &killed);

    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.parser.verdict(), Verdict::Succeeded);
    let outcome = run.parser.outcome().unwrap();
    assert_eq!(outcome.result.as_deref(), Some("done"));
    assert_eq!(outcome.num_turns, Some(3));
    assert_eq!(outcome.permission_denials, 0);
    assert!(outcome.usage.input_tokens > 0 && outcome.usage.output_tokens > 0);
    assert!(
        outcome
            .total_cost_usd
            .as_deref()
            .is_some_and(|c| c.parse::<f64>().unwrap() > 0.0)
    );
    let progress = run.parser.progress();
    assert_eq!(progress.turns, 3);
    assert_eq!(progress.last_tool.as_deref(), Some("Bash"));
    assert_eq!(progress.session_id, outcome.session_id);
    assert_eq!(
        std::fs::read_to_string(scratch.work().join("hello.py")).unwrap(),
        HELLO_PY
    );
    assert!(run.stdout.contains(HELLO_OUTPUT), "Bash ran hello.py");
    let absolute = format!(r#""file_path":"{}/hello.py""#, scratch.work().display());
    assert!(
        run.stdout.contains(&absolute),
        "the model found the working directory in the request"
    );

    let requests = model.requests();
    assert_eq!(
        requests.len(),
        3,
        "one request per model turn, no side traffic: {requests:#?}"
    );
    for request in &requests {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/v1/messages?beta=true")
        );
        assert!(
            request.headers.iter().all(|(_, v)| !v.contains(API_KEY)),
            "the log masks credentials"
        );
        let body = request.body.as_ref().expect("JSON body");
        assert!(
            body.model.is_some() && body.stream && body.tools.iter().any(|t| t == "Write"),
            "{body:?}"
        );
    }
    let last = requests.last().unwrap().body.as_ref().unwrap();
    assert!(
        last.messages
            .iter()
            .filter(|m| m.contains("tool_result"))
            .count()
            >= 2,
        "{last:?}"
    );
}

#[tokio::test]
async fn unauthorized_is_an_api_error_with_status() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    model.set_mode(Mode::Unauthorized);
    let scratch = Scratch::new("unauthorized");
    let run = run_claude(&model, &scratch, 10, &[]).await;
    capture("unauthorized", &run.stdout);

    assert_eq!(run.code, Some(1));
    let Verdict::Failed { reason, message } = run.parser.verdict() else {
        panic!("{}", run.stdout)
    };
    assert_eq!(reason, FailureReason::ApiError { status: Some(401) });
    assert!(message.contains("scripted 401"), "{message}");
    assert_eq!(
        run.parser.progress().turns,
        0,
        "the synthetic error message is not a turn"
    );
}

#[tokio::test]
async fn server_error_is_an_api_error_with_status() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    model.set_mode(Mode::ServerError);
    let scratch = Scratch::new("server_error");
    let run = run_claude(&model, &scratch, 10, &[]).await;
    capture("server_error", &run.stdout);

    assert_eq!(run.code, Some(1));
    let Verdict::Failed { reason, message } = run.parser.verdict() else {
        panic!("{}", run.stdout)
    };
    assert_eq!(reason, FailureReason::ApiError { status: Some(500) });
    assert!(message.contains("500"), "{message}");
}

#[tokio::test]
async fn endless_tool_calls_stop_at_max_turns() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    model.set_mode(Mode::LoopToolCalls);
    let scratch = Scratch::new("max_turns");
    let run = run_claude(&model, &scratch, 2, &[]).await;
    capture("max_turns", &run.stdout);

    assert_eq!(run.code, Some(1));
    let Verdict::Failed { reason, message } = run.parser.verdict() else {
        panic!("{}", run.stdout)
    };
    assert_eq!(reason, FailureReason::MaxTurns);
    assert!(message.contains("maximum number of turns (2)"), "{message}");
    assert_eq!(run.parser.progress().turns, 2);
    assert_eq!(run.parser.progress().last_tool.as_deref(), Some("Bash"));
}

#[tokio::test]
async fn echo_secret_leaks_the_value_into_text_and_file_name() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    model.set_mode(Mode::EchoSecret {
        marker: "SANDCASTLE_TEST_SECRET".into(),
        pad: 0,
    });
    let scratch = Scratch::new("echo_secret");
    let secret = "s3cr3t-4f9a";
    let run = run_claude(&model, &scratch, 10, &[("SANDCASTLE_TEST_SECRET", secret)]).await;

    assert_eq!(run.parser.verdict(), Verdict::Succeeded, "{}", run.stdout);
    let outcome = run.parser.outcome().unwrap();
    assert_eq!(
        outcome.result.as_deref(),
        Some(format!("The secret is {secret}").as_str())
    );
    assert!(scratch.work().join(format!("leak-{secret}.txt")).exists());
}

/// The parts of the endpoint the CLI only uses when something goes wrong: the
/// non-streaming fallback after a broken stream, HEAD probes and unknown routes.
#[tokio::test]
async fn scripted_model_fallbacks() {
    let model = ScriptedModel::start(Script::WriteAndRun).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages?beta=true", model.base_url());
    let request = serde_json::json!({
        "model": "m", "stream": false, "tools": [{"name": "Write"}],
        "messages": [{"role": "system", "content": [{"type": "text", "text": " - Primary working directory: /w\n"}]}],
    });
    let reply: serde_json::Value = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["type"], "message");
    assert_eq!(reply["stop_reason"], "tool_use");
    assert_eq!(reply["content"][1]["input"]["file_path"], "/w/hello.py");

    let head = client
        .head(model.base_url() + "/api/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let missing = client
        .get(model.base_url() + "/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let error: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "not_found_error");
    assert_eq!(model.requests().len(), 3);
}

/// The way the operator runs the agent: inside an embedded sandbox as its non-root user
/// (so bypass mode needs no `IS_SANDBOX`), under the recorder, with the CLI's install
/// directory mounted read-only; the outcome is read back from the recorder's files.
#[tokio::test]
async fn runs_in_an_embedded_sandbox_as_its_user() {
    use sandcastle::agent::invocation::{RUN_DIR, claude_code, parse_exit, recorded};
    use sandcastle_e2b::client::{ClientConfig, E2bClient, SandboxSpec};
    use sandcastle_e2b::envd_client::CommandSpec;
    use sandcastle_sandboxd::{Config, Sandboxd};

    let binary = claude().canonicalize().unwrap();
    let install = binary
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
        .and_then(Path::parent)
        .expect("the CLI lives in an npm prefix")
        .to_path_buf();
    let scratch = Scratch::new("sandboxed");
    let mut config = Config::new(scratch.0.join("sandboxd"));
    config.host_paths = vec![install];
    let server = Sandboxd::start(config).await.unwrap();
    assert!(
        server.is_isolated(),
        "bubblewrap is needed (scripts/setup installs it)"
    );
    let client = E2bClient::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        "key",
    ))
    .unwrap();
    let sandbox = client
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(120)))
        .await
        .unwrap();
    let envd = client.envd(&sandbox);
    let workspace = "/home/user/workspace";
    assert!(envd.make_dir(workspace).await.unwrap());
    assert!(envd.make_dir(RUN_DIR).await.unwrap());

    let model = ScriptedModel::start(Script::WriteAndRun).await;
    let agent = serde_json::from_value(serde_json::json!({})).unwrap();
    let mut invocation = claude_code(&agent, "Create hello.py and run it");
    invocation.cmd = binary.display().to_string();
    let invocation = recorded(invocation, RUN_DIR);
    let mut spec = CommandSpec::new(invocation.cmd).cwd(workspace);
    spec.args = invocation.args;
    spec.envs = invocation.env;
    spec.envs
        .insert("ANTHROPIC_BASE_URL".into(), model.base_url());
    spec.envs.insert("ANTHROPIC_API_KEY".into(), API_KEY.into());
    spec.envs
        .insert("CLAUDE_CODE_MAX_RETRIES".into(), "0".into());
    let wrapper = envd.start(&spec).await.unwrap().wait().await.unwrap();
    assert_eq!(wrapper.exit_code, 0, "{wrapper:?}");

    let read = |name: &'static str| {
        let envd = envd.clone();
        async move { envd.read_file(&format!("{RUN_DIR}/{name}")).await.unwrap() }
    };
    let stdout = read("stdout").await;
    let stderr = String::from_utf8_lossy(&read("stderr").await).into_owned();
    assert_eq!(
        parse_exit(&String::from_utf8_lossy(&read("exit").await)),
        Some(0),
        "{stderr}"
    );
    let mut parser = StreamParser::new();
    parser.feed(&stdout);
    parser.finish();
    assert_eq!(parser.verdict(), Verdict::Succeeded, "{stderr}");
    let written = envd
        .read_file(&format!("{workspace}/hello.py"))
        .await
        .unwrap();
    assert_eq!(written, HELLO_PY.as_bytes());
    let who = envd
        .run("stat -c %U /home/user/workspace/hello.py")
        .await
        .unwrap();
    assert_eq!(
        who.stdout.trim(),
        "user",
        "the CLI ran as the sandbox's user"
    );
    server.stop().await;
}

/// With `--json-schema` the CLI offers the model its `StructuredOutput` tool, checks the
/// answer against the schema and prints it as `structured_output` on the result line;
/// a schema that is no JSON Schema is refused before anything runs.
#[tokio::test]
async fn a_json_schema_brings_the_answer_as_structured_output() {
    let model = ScriptedModel::start(Script::EditRepo).await;
    let scratch = Scratch::new("structured");
    let schema = r#"{"type":"object","properties":{"summary":{"type":"string"},"filesChanged":{"type":"integer"}},"required":["summary","filesChanged"]}"#;
    let run = run_claude_with(&model, &scratch, 10, &[], &["--json-schema", schema]).await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.parser.verdict(), Verdict::Succeeded);
    let outcome = run.parser.outcome().expect("a result line");
    let answer: serde_json::Value = serde_json::from_str(
        outcome
            .structured_output
            .as_deref()
            .expect("structured output"),
    )
    .expect("JSON");
    assert_eq!(answer, structured_answer());
    assert!(
        model
            .requests()
            .iter()
            .filter_map(|request| request.body.as_ref())
            .all(|body| body.tools.iter().any(|tool| tool == "StructuredOutput")),
        "the CLI offers the tool on every turn"
    );

    // An answer the schema never accepts: the CLI asks again, then gives up.
    model.set_mode(Mode::WrongStructuredOutput);
    let scratch = Scratch::new("structured-wrong");
    let run = run_claude_with(&model, &scratch, 20, &[], &["--json-schema", schema]).await;
    let outcome = run.parser.outcome().expect("a result line");
    assert_eq!(
        outcome.subtype, "error_max_structured_output_retries",
        "{}",
        run.stdout
    );
    assert!(outcome.structured_output.is_none());
    assert!(matches!(
        run.parser.verdict(),
        Verdict::Failed {
            reason: FailureReason::StructuredOutput,
            ..
        }
    ));

    let refused = tokio::process::Command::new(claude())
        .env_clear()
        .env("HOME", scratch.0.join("home"))
        .env("ANTHROPIC_BASE_URL", model.base_url())
        .env("ANTHROPIC_API_KEY", API_KEY)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .args(["-p", "hi", "--output-format", "stream-json", "--verbose"])
        .args(["--json-schema", r#"{"type":"nonsense"}"#])
        .output()
        .await
        .expect("the CLI runs");
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("--json-schema is not a valid JSON Schema"),
        "{said}"
    );
}
