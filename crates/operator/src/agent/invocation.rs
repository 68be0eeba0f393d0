//! The agent process: its command line and environment from the task's spec, and the
//! wrapper that records its stdout, stderr and exit code in files inside the sandbox, so
//! the outcome survives an operator restart and envd dropping output nobody listens to.

use std::collections::BTreeMap;

use sandcastle_api::{ClaudeCodeAgent, CommandAgent, McpServer, McpTransport, PermissionMode};

/// Where the recording wrapper writes, inside the sandbox.
pub const RUN_DIR: &str = "/tmp/sandcastle-run";
/// The file in [`RUN_DIR`] the recorder creates as it starts the agent.
pub const STARTED_MARKER: &str = "started";
/// The process tag the agent runs under, to find it again after a restart.
pub const AGENT_TAG: &str = "sandcastle-agent";
/// The variable the `command` agent receives the prompt in.
pub const PROMPT_VARIABLE: &str = "SANDCASTLE_PROMPT";

/// Marks the start, writes the outputs, then the exit code, with shell builtins only: each
/// extra program would cost the sandbox a process start per run. The start marker is the
/// process's own, so it exists exactly when the agent was started, whatever the start
/// call's answer said. The directory exists already (the operator writes a file in it
/// before the start). The exit code is one short write as the recorder's last act, so
/// once the recorder is gone the file holds a code, or nothing if it was killed in between.
const RECORDER: &str = r#"dir=$1; shift
: >"$dir/started"
"$@" >"$dir/stdout" 2>"$dir/stderr" </dev/null
echo "$?" >"$dir/exit""#;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Variables that keep the CLI from calling anything but the model endpoint (no probes,
/// telemetry, update checks or error reports).
const QUIET_CLI: &[(&str, &str)] = &[
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_TELEMETRY", "1"),
    ("DISABLE_AUTOUPDATER", "1"),
    ("DISABLE_ERROR_REPORTING", "1"),
];

fn permission_mode(mode: PermissionMode) -> &'static str {
    match mode {
        PermissionMode::Default => "default",
        PermissionMode::AcceptEdits => "acceptEdits",
        PermissionMode::BypassPermissions => "bypassPermissions",
        PermissionMode::DontAsk => "dontAsk",
        PermissionMode::Plan => "plan",
    }
}

/// Claude Code in headless mode. The prompt is one argument of an exec'd argv, never part
/// of a shell line. The CLI refuses bypass mode as root, so the sandbox runs it as its
/// non-root user rather than setting `IS_SANDBOX`.
pub fn claude_code(agent: &ClaudeCodeAgent, prompt: &str) -> Invocation {
    let mut args: Vec<String> = [
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        permission_mode(agent.permission_mode),
    ]
    .map(String::from)
    .to_vec();
    if let Some(model) = &agent.model {
        args.extend(["--model".into(), model.clone()]);
    }
    if !agent.allowed_tools.is_empty() {
        args.extend(["--allowedTools".into(), agent.allowed_tools.join(",")]);
    }
    if !agent.disallowed_tools.is_empty() {
        args.extend(["--disallowedTools".into(), agent.disallowed_tools.join(",")]);
    }
    if let Some(turns) = agent.max_turns {
        args.extend(["--max-turns".into(), turns.to_string()]);
    }
    if let Some(system) = &agent.append_system_prompt {
        args.extend(["--append-system-prompt".into(), system.clone()]);
    }
    if let Some(schema) = &agent.json_schema {
        args.extend([
            "--json-schema".into(),
            serde_json::Value::Object(schema.clone()).to_string(),
        ]);
    }
    if !agent.mcp_servers.is_empty() {
        args.extend([
            "--mcp-config".into(),
            mcp_config(&agent.mcp_servers).to_string(),
            "--strict-mcp-config".into(),
        ]);
    }
    args.extend(agent.extra_args.iter().cloned());
    Invocation {
        cmd: "claude".into(),
        args,
        env: QUIET_CLI
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
    }
}

/// Which list of an MCP server a value from a Secret belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum McpValue {
    Env,
    Header,
}

/// The agent's environment variable that carries a Secret's value for an MCP server: the
/// configuration on the command line names it (`${...}`, which the CLI expands), so the
/// value itself is never in an argument any process listing shows.
pub fn mcp_secret_variable(server: usize, value: McpValue, index: usize) -> String {
    let list = match value {
        McpValue::Env => "ENV",
        McpValue::Header => "HEADER",
    };
    format!("SANDCASTLE_MCP_{server}_{list}_{index}")
}

/// The `--mcp-config` document for the task's MCP servers.
pub fn mcp_config(servers: &[McpServer]) -> serde_json::Value {
    let value_of = |literal: &Option<String>, server: usize, list: McpValue, index: usize| {
        literal
            .clone()
            .unwrap_or_else(|| format!("${{{}}}", mcp_secret_variable(server, list, index)))
    };
    let mut config = serde_json::Map::new();
    for (i, server) in servers.iter().enumerate() {
        let entry = match (&server.command, &server.url) {
            (Some(command), _) => {
                let env: serde_json::Map<String, serde_json::Value> = server
                    .env
                    .iter()
                    .enumerate()
                    .map(|(j, var)| {
                        (
                            var.name.clone(),
                            value_of(&var.value, i, McpValue::Env, j).into(),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "type": "stdio",
                    "command": command.first().cloned().unwrap_or_default(),
                    "args": command.iter().skip(1).collect::<Vec<_>>(),
                    "env": env,
                })
            }
            (None, url) => {
                let headers: serde_json::Map<String, serde_json::Value> = server
                    .headers
                    .iter()
                    .enumerate()
                    .map(|(j, header)| {
                        (
                            header.name.clone(),
                            value_of(&header.value, i, McpValue::Header, j).into(),
                        )
                    })
                    .collect();
                let transport = match server.transport.unwrap_or_default() {
                    McpTransport::Http => "http",
                    McpTransport::Sse => "sse",
                };
                serde_json::json!({
                    "type": transport,
                    "url": url.clone().unwrap_or_default(),
                    "headers": headers,
                })
            }
        };
        config.insert(server.name.clone(), entry);
    }
    serde_json::json!({ "mcpServers": config })
}

/// A plain command; the prompt, if any, arrives in [`PROMPT_VARIABLE`].
pub fn command(agent: &CommandAgent, prompt: Option<&str>) -> Invocation {
    let (cmd, args) = agent
        .command
        .split_first()
        .map(|(cmd, args)| (cmd.clone(), args.to_vec()))
        .unwrap_or_default();
    Invocation {
        cmd,
        args,
        env: prompt
            .map(|prompt| BTreeMap::from([(PROMPT_VARIABLE.to_string(), prompt.to_string())]))
            .unwrap_or_default(),
    }
}

/// The invocation run under the recorder: `sh -c <recorder> <name> <dir> <cmd> <args…>`,
/// so every argument reaches the agent as given. `dir` must exist, writable by the agent's
/// user.
pub fn recorded(invocation: Invocation, dir: &str) -> Invocation {
    let mut args = vec![
        "-c".to_string(),
        RECORDER.to_string(),
        AGENT_TAG.to_string(),
        dir.to_string(),
        invocation.cmd,
    ];
    args.extend(invocation.args);
    Invocation {
        cmd: "/bin/sh".into(),
        args,
        env: invocation.env,
    }
}

/// The exit code in the recorder's exit file.
pub fn parse_exit(text: &str) -> Option<i32> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> ClaudeCodeAgent {
        serde_json::from_value(serde_json::json!({})).unwrap()
    }

    #[test]
    fn claude_code_gets_stream_json_and_the_spec_flags() {
        let mut spec = agent();
        spec.model = Some("sonnet".into());
        spec.allowed_tools = vec!["Write".into(), "Bash".into()];
        spec.max_turns = Some(7);
        spec.extra_args = vec!["--debug".into()];
        let invocation = claude_code(&spec, "fix the tests; rm -rf / $(evil)");
        assert_eq!(invocation.cmd, "claude");
        assert_eq!(
            invocation.args,
            [
                "-p",
                "fix the tests; rm -rf / $(evil)",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-mode",
                "bypassPermissions",
                "--model",
                "sonnet",
                "--allowedTools",
                "Write,Bash",
                "--max-turns",
                "7",
                "--debug",
            ]
        );
        assert_eq!(
            invocation.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"],
            "1"
        );
        assert!(!invocation.env.contains_key("IS_SANDBOX"));
    }

    #[test]
    fn mcp_servers_go_in_a_strict_config_that_names_secret_values_by_variable() {
        let servers: Vec<McpServer> = serde_json::from_value(serde_json::json!([
            {"name": "tools", "command": ["python3", "-m", "tools", "--stdio"],
             "env": [{"name": "MODE", "value": "ro"},
                     {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            {"name": "remote", "url": "https://mcp.example.com/mcp",
             "headers": [{"name": "X-Team", "value": "blue"},
                         {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth"}}}]},
            {"name": "old", "url": "http://legacy:8080/sse", "transport": "sse"}
        ]))
        .unwrap();
        let config = mcp_config(&servers);
        assert_eq!(
            config,
            serde_json::json!({"mcpServers": {
                "tools": {"type": "stdio", "command": "python3", "args": ["-m", "tools", "--stdio"],
                          "env": {"MODE": "ro", "TOKEN": "${SANDCASTLE_MCP_0_ENV_1}"}},
                "remote": {"type": "http", "url": "https://mcp.example.com/mcp",
                           "headers": {"X-Team": "blue", "Authorization": "${SANDCASTLE_MCP_1_HEADER_1}"}},
                "old": {"type": "sse", "url": "http://legacy:8080/sse", "headers": {}}
            }})
        );
        let with_servers = ClaudeCodeAgent {
            mcp_servers: servers,
            extra_args: vec!["--last".into()],
            ..agent()
        };
        let args = claude_code(&with_servers, "go").args;
        let at = args.iter().position(|arg| arg == "--mcp-config").unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args[at + 1]).unwrap(),
            config
        );
        assert_eq!(args[at + 2], "--strict-mcp-config");
        assert_eq!(args.last().unwrap(), "--last", "extra args still come last");
        let without = claude_code(&agent(), "go").args;
        assert!(!without.iter().any(|arg| arg.contains("mcp")));
    }

    #[test]
    fn the_command_agent_receives_the_prompt_in_the_environment() {
        let spec = CommandAgent {
            command: vec!["sh".into(), "-c".into(), "echo hi".into()],
        };
        let invocation = command(&spec, Some("do it"));
        assert_eq!((invocation.cmd.as_str(), invocation.args.len()), ("sh", 2));
        assert_eq!(invocation.env[PROMPT_VARIABLE], "do it");
    }

    #[test]
    fn the_recorder_keeps_outputs_and_exit_code_in_files() {
        let dir = std::env::temp_dir().join(format!("sandcastle-recorder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = CommandAgent {
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 7".into(),
            ],
        };
        let wrapped = recorded(command(&spec, None), &dir.display().to_string());
        let status = std::process::Command::new(&wrapped.cmd)
            .args(&wrapped.args)
            .status()
            .unwrap();
        assert!(status.success(), "the recorder itself succeeds");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            (read("stdout"), read("stderr")),
            ("out\n".into(), "err\n".into())
        );
        assert_eq!(parse_exit(&read("exit")), Some(7));
        assert!(dir.join(STARTED_MARKER).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
