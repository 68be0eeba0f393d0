//! `sandcastle mcp` beside the operator: the official MCP Python SDK drives it over stdio
//! and streamable HTTP, a crashed server's sandboxes are swept, a stopped one leaves none,
//! and Claude Code in a task calls a tool of an MCP server given in its spec.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use sandcastle_api::TaskPhase;
use sandcastle_api::names::{MADE_BY_MCP, SANDBOX_MADE_BY, SANDBOX_MCP_LEASE};
use sandcastle_e2b::client::{E2bClient, ListQuery};
use sandcastle_e2b::models::SandboxDetail;
use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::model::{Script, ScriptedModel};
use sandcastle_testkit::operator::{Operator, wait_for};
use sandcastle_testkit::repo;
use serde_json::json;

use crate::operations::{kubeconfig_with_token, render_chart};
use crate::tasks::{claude_settings, claude_spec, create, finished, put_secret, setup, transcript};

/// How many tests the Python suite holds, parametrized ones counted once per transport.
const PYTHON_TESTS: usize = 17;

async fn mcp_sandboxes(provider: &E2bClient) -> Vec<SandboxDetail> {
    let query = ListQuery {
        metadata: [(SANDBOX_MADE_BY.to_string(), MADE_BY_MCP.to_string())].into(),
        ..ListQuery::default()
    };
    provider
        .list_sandboxes(&query)
        .await
        .expect("list sandboxes")
}

async fn mcp_leases(env: &TestEnv, ns: &str) -> Vec<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), ns);
    leases
        .list(&ListParams::default().labels("app.kubernetes.io/component=mcp-server"))
        .await
        .expect("list leases")
        .items
        .into_iter()
        .filter_map(|lease| lease.metadata.name)
        .collect()
}

fn mcp_args(operator: &Operator, ns: &str) -> Vec<String> {
    let mut args = operator.provider_args();
    args.extend(["--namespace".into(), ns.into()]);
    args
}

/// Runs the Python suite (or the tests `-k` selects) against servers started with `args`
/// and `kubeconfig`, and checks that it passed `expected` tests.
async fn run_python_suite(
    kubeconfig: &std::path::Path,
    ns: &str,
    args: &[String],
    select: Option<&str>,
    expected: usize,
) {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    let scratch = sandcastle_testkit::scratch_dir().join(format!("mcp-pytest-{ns}"));
    let mut pytest = tokio::process::Command::new(&python);
    pytest
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "anyio",
        ])
        .arg(format!("--basetemp={}", scratch.display()))
        .arg(repo().join("crates/operator/tests/mcp_clients"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SANDCASTLE_BIN", sandcastle_testkit::operator_binary())
        .env("SANDCASTLE_MCP_ARGS", serde_json::to_string(args).unwrap())
        .env("SANDCASTLE_MCP_NAMESPACE", ns)
        .env("KUBECONFIG", kubeconfig)
        .kill_on_drop(true);
    if let Some(select) = select {
        pytest.args(["-k", select]);
    }
    let output = tokio::time::timeout(Duration::from_secs(600), pytest.output())
        .await
        .expect("the MCP client suite finished within 10 minutes")
        .expect("pytest runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the MCP client suite failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("{expected} passed")),
        "expected {expected} tests to pass:\n{stdout}"
    );
}

pub async fn mcp_clients_run_code_and_tasks(env: Arc<TestEnv>) {
    // The sweep is slow here, so what the servers leave is what they failed to kill.
    let (ns, operator, _api) =
        setup(&env, "mcp", &[("SANDCASTLE_SWEEP_ORPHANS_EVERY", "3600")]).await;
    let args = mcp_args(&operator, &ns);
    run_python_suite(env.kubeconfig_path(), &ns, &args, None, PYTHON_TESTS).await;
    let left = mcp_sandboxes(&operator.provider()).await;
    assert!(
        left.is_empty(),
        "servers that stopped (stdin closed, SIGTERM) left sandboxes: {left:?}"
    );
    assert_eq!(
        mcp_leases(&env, &ns).await,
        Vec::<String>::new(),
        "their Leases went with them"
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_http_server(env: &TestEnv, operator: &Operator, ns: &str, port: u16) -> Server {
    let child = Command::new(sandcastle_testkit::operator_binary())
        .arg("mcp")
        .args(mcp_args(operator, ns))
        .args([
            "--transport",
            "http",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--lease-seconds", "3"])
        .env("KUBECONFIG", env.kubeconfig_path())
        .stdin(Stdio::null())
        .spawn()
        .expect("sandcastle mcp starts");
    Server(child)
}

async fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("http://127.0.0.1:{port}/healthz");
    while !reqwest::get(&url)
        .await
        .is_ok_and(|answer| answer.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the MCP server never answered {url}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Calls one tool over streamable HTTP with the official SDK, in the background.
async fn call_in_background(port: u16, code: &str) -> tokio::process::Child {
    wait_healthy(port).await;
    let script = format!(
        r#"
import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
async def main():
    async with streamable_http_client("http://127.0.0.1:{port}/mcp") as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            await session.initialize()
            context = (await session.call_tool("create_context", {{}})).structured_content["id"]
            await session.call_tool("run_code", {{"code": {code:?}, "context": context, "timeoutSeconds": 600}})
anyio.run(main)
"#
    );
    tokio::process::Command::new(repo().join(".venv/bin/python"))
        .args(["-c", &script])
        .kill_on_drop(true)
        .spawn()
        .expect("the client starts")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

async fn wait_for_sandboxes(provider: &E2bClient, wanted: usize) -> Vec<SandboxDetail> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = mcp_sandboxes(provider).await;
        if found.len() >= wanted {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the server made no sandbox: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn an_mcp_server_leaves_no_sandbox_behind(env: Arc<TestEnv>) {
    let (ns, operator, _api) = setup(&env, "mcp-stop", &[]).await;
    let provider = operator.provider();

    // Killed mid-call: its Lease runs out, and the operator's sweep kills the sandbox.
    let port = free_port();
    let mut server = start_http_server(&env, &operator, &ns, port);
    let mut client = call_in_background(port, "import time\ntime.sleep(600)").await;
    let made = wait_for_sandboxes(&provider, 1).await;
    let lease = made[0]
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.get(SANDBOX_MCP_LEASE))
        .cloned()
        .expect("the sandbox names its server's Lease");
    assert!(
        lease.starts_with(&format!("{ns}/sandcastle-mcp-")),
        "{lease}"
    );
    let _ = server.0.kill();
    let _ = server.0.wait();
    let killed = Instant::now();
    loop {
        let left = mcp_sandboxes(&provider).await;
        if left.is_empty() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "a crashed server's sandboxes outlived its Lease and the sweep: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "mcp: a crashed server's sandbox was swept {:?} after the crash",
        killed.elapsed()
    );
    let _ = client.kill().await;

    // Stopped cleanly mid-call: nothing is left at once, with no sweep needed.
    let port = free_port();
    let mut server = start_http_server(&env, &operator, &ns, port);
    let mut client = call_in_background(port, "import time\ntime.sleep(600)").await;
    wait_for_sandboxes(&provider, 1).await;
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = server.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        mcp_sandboxes(&provider).await.len(),
        0,
        "a stopped server left sandboxes"
    );
    assert_eq!(mcp_leases(&env, &ns).await, Vec::<String>::new());
    let _ = client.kill().await;
    drop(operator);
}

pub async fn claude_code_calls_a_tool_of_an_mcp_server_from_its_spec(env: Arc<TestEnv>) {
    let settings = claude_settings();
    let settings = settings
        .each_ref()
        .map(|(key, value)| (*key, value.as_str()));
    let (ns, operator, api) = setup(&env, "mcp-claude", &settings).await;
    let model = ScriptedModel::start(Script::CallMcpTool).await;
    let token = "mcp-bearer-9c2e41";
    let port = free_port();
    let server = Command::new(sandcastle_testkit::operator_binary())
        .arg("mcp")
        .args(mcp_args(&operator, &ns))
        .args([
            "--transport",
            "http",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--bearer-token", token, "--no-kubernetes"])
        .stdin(Stdio::null())
        .spawn()
        .map(Server)
        .expect("sandcastle mcp starts");
    put_secret(
        &env,
        &ns,
        "anthropic",
        json!({"ANTHROPIC_API_KEY": "sk-ant-mcp-1b7d"}),
    )
    .await;
    put_secret(
        &env,
        &ns,
        "mcp-auth",
        json!({"header": format!("Bearer {token}")}),
    )
    .await;
    let spec = |header: serde_json::Value| {
        claude_spec(
            &model,
            "Work out six times seven with the sandbox",
            json!({"agent": {"claudeCode": {
                "allowedTools": ["mcp__sandcastle__run_code"],
                "mcpServers": [{
                    "name": "sandcastle",
                    "url": format!("http://127.0.0.1:{port}/mcp"),
                    "headers": [header],
                }],
            }}}),
        )
    };
    create(
        &api,
        "with-mcp",
        spec(json!({"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "mcp-auth", "key": "header"}}})),
    )
    .await;
    let status = wait_for(&api, "with-mcp", "finished", finished).await;
    assert_eq!(status.phase, Some(TaskPhase::Succeeded), "{status:#?}");
    let seen: Vec<String> = model
        .requests()
        .into_iter()
        .filter_map(|request| request.body)
        .flat_map(|body| body.tool_results)
        .collect();
    assert!(
        seen.iter()
            .any(|result| result.contains("\"42\"") || result.contains("42")),
        "the model never saw run_code's answer: {seen:?}"
    );
    let stdout = transcript(&env, &ns, "with-mcp").await;
    let init = stdout
        .lines()
        .find(|line| line.contains(r#""subtype":"init""#))
        .expect("an init line");
    let init: serde_json::Value = serde_json::from_str(init).expect("JSON");
    assert_eq!(
        init["mcp_servers"],
        json!([{"name": "sandcastle", "status": "connected", "source": "dynamic"}]),
        "{init}"
    );

    // A wrong token: the CLI cannot connect, and says so in the init line.
    put_secret(
        &env,
        &ns,
        "mcp-wrong",
        json!({"header": "Bearer not-the-token"}),
    )
    .await;
    create(
        &api,
        "wrong-token",
        spec(json!({"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "mcp-wrong", "key": "header"}}})),
    )
    .await;
    wait_for(&api, "wrong-token", "finished", finished).await;
    let stdout = transcript(&env, &ns, "wrong-token").await;
    assert!(
        stdout.contains(r#""name":"sandcastle","status":"failed""#),
        "{stdout}"
    );

    // The header's value was in no status, event, log or transcript.
    let everything = [
        env.kubectl_ok(&["get", "agenttasks", "-n", &ns, "-o", "yaml"]),
        env.kubectl_ok(&["get", "events", "-n", &ns, "-o", "yaml"]),
        env.kubectl_ok(&["get", "configmaps", "-n", &ns, "-o", "yaml"]),
        operator.logs(),
        stdout,
    ];
    for (place, text) in [
        "tasks",
        "events",
        "configmaps",
        "operator log",
        "transcript",
    ]
    .iter()
    .zip(&everything)
    {
        assert!(!text.contains(token), "the MCP token is in the {place}");
        assert!(
            !text.contains("not-the-token"),
            "the wrong token is in the {place}"
        );
    }
    drop(server);
    drop(operator);
}

/// The chart's MCP Deployment, its arguments and environment as rendered, run with
/// nothing but a token of the chart's ServiceAccount for it: the task tools, the server's
/// Lease, and the task tests of the Python suite pass under its Role.
pub async fn the_mcp_servers_rbac_is_enough(env: Arc<TestEnv>) {
    let (ns, operator, _api) = setup(&env, "mcp-rbac", &[]).await;
    let rendered = render_chart(
        &ns,
        &ns,
        &[
            "--set",
            "crds.enabled=false",
            "--set",
            "mcp.enabled=true",
            "--set",
            &format!("mcp.namespace={ns}"),
        ],
    );
    let mcp_objects: Vec<serde_json::Value> = rendered
        .iter()
        .filter(|object| {
            object["metadata"]["labels"]["app.kubernetes.io/component"] == "mcp-server"
        })
        .cloned()
        .collect();
    let rbac: Vec<&serde_json::Value> = mcp_objects
        .iter()
        .filter(|object| {
            ["ServiceAccount", "Role", "RoleBinding"]
                .contains(&object["kind"].as_str().unwrap_or_default())
                && !object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with("-sweep")
        })
        .collect();
    // The ServiceAccount, and a Role and RoleBinding each for the tasks and the Lease.
    assert_eq!(rbac.len(), 5, "{rbac:#?}");
    let manifest = sandcastle_testkit::scratch_dir().join(format!("{ns}-mcp-rbac.yaml"));
    let text: String = rbac
        .iter()
        .map(|object| format!("---\n{}", serde_yaml::to_string(object).expect("YAML")))
        .collect();
    std::fs::write(&manifest, text).expect("write manifest");
    env.kubectl_ok(&["apply", "-n", &ns, "-f", &manifest.display().to_string()]);
    let account = rbac
        .iter()
        .find(|object| object["kind"] == "ServiceAccount")
        .and_then(|object| object["metadata"]["name"].as_str())
        .expect("a ServiceAccount");
    let token = env
        .kubectl_ok(&["create", "token", account, "-n", &ns, "--duration", "1h"])
        .trim()
        .to_string();
    let kubeconfig = sandcastle_testkit::scratch_dir().join(format!("{ns}-mcp-kubeconfig"));
    kubeconfig_with_token(&env, &token, &kubeconfig);
    let deployment = mcp_objects
        .iter()
        .find(|object| object["kind"] == "Deployment")
        .expect("the MCP Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    // The rendered arguments, but for the transport and address (the suite picks those)
    // and the provider (the operator's embedded server stands in for the release's).
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|arg| arg.as_str())
        .filter(|arg| {
            !["mcp", "--transport=", "--listen=", "--provider=", "--e2b-"]
                .iter()
                .any(|prefix| arg.starts_with(prefix))
        })
        .map(String::from)
        .collect();
    assert!(args.contains(&format!("--namespace={ns}")), "{args:?}");
    args.extend(operator.provider_args());
    run_python_suite(&kubeconfig, &ns, &args, Some("task"), 3).await;
    assert_eq!(mcp_leases(&env, &ns).await, Vec::<String>::new());
}

/// The MCP Inspector's CLI (`npm`, pinned) as a second client, against the HTTP server:
/// it finds no portability problem in the tool schemas (`--strict`), and a context keeps
/// state across its separate invocations.
pub async fn the_mcp_inspector_drives_the_server(env: Arc<TestEnv>) {
    let (ns, operator, _api) = setup(&env, "mcp-inspector", &[]).await;
    let cli =
        repo().join("crates/operator/tests/mcp_clients/inspector/node_modules/.bin/mcp-inspector");
    assert!(
        cli.exists(),
        "{} is missing: run scripts/setup to install the MCP Inspector",
        cli.display()
    );
    let port = free_port();
    let server = start_http_server(&env, &operator, &ns, port);
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let inspect = |args: &[&str]| {
        let output = Command::new(&cli)
            .args(["--cli", &url])
            .args(args)
            .output()
            .expect("the Inspector runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stdout, stderr)
    };
    let call = |tool: &str, arguments: &[&str]| {
        let mut args = vec!["--method", "tools/call", "--tool-name", tool];
        if !arguments.is_empty() {
            args.push("--tool-arg");
            args.extend(arguments);
        }
        let (code, stdout, stderr) = inspect(&args);
        assert_eq!(code, Some(0), "{tool} {arguments:?}: {stdout}\n{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout)
            .unwrap_or_else(|error| panic!("{tool}: {error}: {stdout}"))
    };

    let (code, stdout, stderr) = inspect(&["--method", "tools/list", "--strict"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("Warning"),
        "schema portability problems: {stderr}"
    );
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        listed["tools"].as_array().map(Vec::len),
        Some(7),
        "{listed}"
    );

    let context = call("create_context", &["language=python"]);
    let id = context["structuredContent"]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let context_arg = format!("context={id}");
    call("run_code", &["code=answer = 20", &context_arg]);
    let answer = call("run_code", &["code=answer * 2 + 2", &context_arg]);
    assert_eq!(
        answer["structuredContent"]["result"]["text"], "42",
        "{answer}"
    );
    let refused = inspect(&[
        "--method",
        "tools/call",
        "--tool-name",
        "run_code",
        "--tool-arg",
        "code=print(1)",
        "language=cobol",
    ]);
    // The Inspector exits 5 on a tool error.
    assert_eq!(refused.0, Some(5), "{refused:?}");
    assert!(refused.1.contains("unknown language"), "{refused:?}");
    drop(server);
    drop(operator);
}
