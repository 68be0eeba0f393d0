//! A scripted, Anthropic-compatible Messages endpoint for driving the real Claude Code
//! CLI in tests.
//!
//! The reply is chosen from the conversation carried by each request, never from a
//! request counter: the CLI re-sends a request whose stream it abandoned (and retries
//! the same turn with `"stream": false`), so a counter would drift while the
//! conversation does not. Body parsing is deliberately lenient because the CLI's
//! request shape changes between builds (unknown top-level keys, `role: "system"`
//! messages, `cache_control` markers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

/// What the scripted model answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Follow the script.
    Ok,
    /// Every request gets 401 `authentication_error`.
    Unauthorized,
    /// Every request gets 500 `api_error`.
    ServerError,
    /// Every turn asks for another Bash call, so only `--max-turns` ends the run.
    LoopToolCalls,
    /// Leaks a secret: reads the environment variable named `marker` through Bash,
    /// then writes a file whose name contains its value and says the value in the
    /// final text, after `pad` characters of filler (to put the value across a cut of
    /// the text), so tests can check that what leaves the agent gets redacted.
    EchoSecret { marker: String, pad: usize },
    /// Every turn answers through the CLI's `StructuredOutput` tool with an object no
    /// schema that requires a property accepts, so the CLI gives up on its retries.
    WrongStructuredOutput,
}

/// The conversation the model plays in [`Mode::Ok`].
#[derive(Clone, Copy, Debug)]
pub enum Script {
    /// Write `<cwd>/hello.py`, run it with Bash, then answer "done".
    WriteAndRun,
    /// In a git workspace: look for credentials with Bash ([`CREDENTIAL_PROBE`]), replace
    /// `<cwd>/README` with [`EDITED_README`], then answer through the CLI's
    /// `StructuredOutput` tool with [`structured_answer`] when it offers one
    /// (`--json-schema`), or with "done".
    EditRepo,
    /// Call [`MCP_TOOL`] (`run_code` of an MCP server named `sandcastle`) with
    /// [`MCP_CODE`], then answer "done".
    CallMcpTool,
}

/// The tool [`Script::CallMcpTool`] calls.
pub const MCP_TOOL: &str = "mcp__sandcastle__run_code";
/// The code it asks `run_code` to run; its answer holds 42.
pub const MCP_CODE: &str = "print(6 * 7)";

/// What [`Script::EditRepo`] runs to look for git credentials.
pub const CREDENTIAL_PROBE: &str =
    "env; cat .git/config; cat ~/.git-credentials ~/.gitconfig; git config --list --show-origin";
/// The README [`Script::EditRepo`] writes.
pub const EDITED_README: &str = "edited by the scripted model\n";

/// The object [`Script::EditRepo`] answers through `StructuredOutput`.
pub fn structured_answer() -> Value {
    json!({"summary": "README rewritten", "filesChanged": 1})
}

/// The content of `hello.py` in [`Script::WriteAndRun`].
pub const HELLO_PY: &str = "print('hello from hello.py')\n";
/// What `hello.py` prints.
pub const HELLO_OUTPUT: &str = "hello from hello.py";

/// One request as the endpoint saw it, with credentials masked.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// All headers; `x-api-key` and `authorization` values are replaced by `<redacted>`.
    pub headers: Vec<(String, String)>,
    /// `None` when the body was not JSON.
    pub body: Option<BodySummary>,
}

/// The parts of a Messages request that tests look at.
#[derive(Clone, Debug)]
pub struct BodySummary {
    pub model: Option<String>,
    pub stream: bool,
    pub tools: Vec<String>,
    /// One entry per message: its role and its block types, e.g. `user:text,tool_result`.
    pub messages: Vec<String>,
    /// The text of every tool result the request carries, as the model reads it (never
    /// redacted: what the agent's tools saw).
    pub tool_results: Vec<String>,
}

struct Shared {
    script: Script,
    mode: Mutex<Mode>,
    requests: Mutex<Vec<RequestRecord>>,
    // Only for unique message and tool-use ids; never for choosing a reply.
    ids: AtomicU64,
}

pub struct ScriptedModel {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl ScriptedModel {
    /// Serves on 127.0.0.1 on a free port until dropped.
    pub async fn start(script: Script) -> ScriptedModel {
        ScriptedModel::start_on(script, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Serves on `ip` (one pods reach, for a sandbox on a node) on a free port.
    pub async fn start_on(script: Script, ip: std::net::IpAddr) -> ScriptedModel {
        let shared = Arc::new(Shared {
            script,
            mode: Mutex::new(Mode::Ok),
            requests: Mutex::new(Vec::new()),
            ids: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind scripted model");
        let addr = listener.local_addr().expect("scripted model address");
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        ScriptedModel {
            addr,
            shared,
            server,
        }
    }

    /// The server root, which is what `ANTHROPIC_BASE_URL` must be (not `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for ScriptedModel {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = if name == "x-api-key" || name == header::AUTHORIZATION {
                "<redacted>".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.to_string(), value)
        })
        .collect();
    let bytes = to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    shared.requests.lock().unwrap().push(RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        headers,
        body: body.as_ref().map(summarize),
    });

    if method == Method::HEAD {
        return Response::new(Body::empty());
    }
    let route = path.split('?').next().unwrap_or_default();
    if method != Method::POST || route != "/v1/messages" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("no route for {method} {route}"),
        );
    }
    let Some(body) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    let mode = shared.mode.lock().unwrap().clone();
    let blocks = match mode {
        Mode::Unauthorized => {
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "scripted 401 authentication_error",
            );
        }
        Mode::ServerError => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "scripted 500 api_error",
            );
        }
        // A request without tools is a side call (title, topic); it never drives the script.
        _ if body
            .get("tools")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty) =>
        {
            vec![Block::Text("ok".into())]
        }
        Mode::Ok => match shared.script {
            Script::WriteAndRun => write_and_run(&Conversation::of(&body)),
            Script::EditRepo => edit_repo(&Conversation::of(&body), &summarize(&body).tools),
            Script::CallMcpTool => {
                if Conversation::of(&body).used(MCP_TOOL) {
                    vec![Block::Text("done".into())]
                } else {
                    vec![Block::Tool(MCP_TOOL, json!({"code": MCP_CODE}))]
                }
            }
        },
        Mode::LoopToolCalls => {
            let n = Conversation::of(&body).tool_uses.len() + 1;
            vec![Block::Tool(
                "Bash",
                json!({"command": format!("echo round {n}")}),
            )]
        }
        Mode::EchoSecret { marker, pad } => echo_secret(&Conversation::of(&body), &marker, pad),
        Mode::WrongStructuredOutput => {
            vec![Block::Tool("StructuredOutput", json!({"unexpected": true}))]
        }
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-scripted")
        .to_string();
    let id = shared.ids.fetch_add(1, Ordering::Relaxed);
    let reply = Reply { id, model, blocks };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        reply.sse()
    } else {
        reply.message()
    }
}

/// What earlier turns of the conversation contain.
struct Conversation {
    cwd: String,
    /// Names of the tools the model already asked for, in order.
    tool_uses: Vec<String>,
    /// Text of every tool result so far.
    tool_results: Vec<String>,
}

impl Conversation {
    fn of(body: &Value) -> Conversation {
        let mut strings = Vec::new();
        collect_strings(body.get("system").unwrap_or(&Value::Null), &mut strings);
        collect_strings(body.get("messages").unwrap_or(&Value::Null), &mut strings);
        // The CLI puts the environment block (with the working directory) in a
        // `role: "system"` message; look everywhere so a move does not break the script.
        let cwd = strings
            .iter()
            .flat_map(|s| s.lines())
            .find_map(|line| line.split_once("Primary working directory: "))
            .map(|(_, dir)| dir.trim().to_string())
            .unwrap_or_else(|| ".".into());
        let mut tool_uses = Vec::new();
        let mut tool_results = Vec::new();
        for block in blocks_of(body) {
            match block.get("type").and_then(Value::as_str) {
                Some("tool_use") => {
                    tool_uses.push(block["name"].as_str().unwrap_or_default().to_string())
                }
                Some("tool_result") => {
                    let mut texts = Vec::new();
                    collect_strings(block.get("content").unwrap_or(&Value::Null), &mut texts);
                    tool_results.push(texts.join("\n"));
                }
                _ => {}
            }
        }
        Conversation {
            cwd,
            tool_uses,
            tool_results,
        }
    }

    fn used(&self, tool: &str) -> bool {
        self.tool_uses.iter().any(|t| t == tool)
    }
}

fn write_and_run(conversation: &Conversation) -> Vec<Block> {
    if !conversation.used("Write") {
        vec![
            Block::Text("I'll create hello.py.".into()),
            Block::Tool(
                "Write",
                json!({"file_path": format!("{}/hello.py", conversation.cwd), "content": HELLO_PY}),
            ),
        ]
    } else if !conversation.used("Bash") {
        vec![Block::Tool(
            "Bash",
            json!({"command": "python3 hello.py", "description": "Run hello.py"}),
        )]
    } else {
        vec![Block::Text("done".into())]
    }
}

fn edit_repo(conversation: &Conversation, tools: &[String]) -> Vec<Block> {
    if !conversation.used("Bash") {
        vec![Block::Tool(
            "Bash",
            json!({"command": CREDENTIAL_PROBE, "description": "Look for credentials"}),
        )]
    } else if !conversation.used("Write") {
        vec![Block::Tool(
            "Write",
            json!({"file_path": format!("{}/README", conversation.cwd), "content": EDITED_README}),
        )]
    } else if tools.iter().any(|tool| tool == "StructuredOutput")
        && !conversation.used("StructuredOutput")
    {
        vec![Block::Tool("StructuredOutput", structured_answer())]
    } else {
        vec![Block::Text("done".into())]
    }
}

fn echo_secret(conversation: &Conversation, marker: &str, pad: usize) -> Vec<Block> {
    let prefix = format!("{marker}=");
    let secret = conversation
        .tool_results
        .iter()
        .flat_map(|r| r.lines())
        .find_map(|line| line.trim().strip_prefix(&prefix))
        .map(str::to_string);
    match secret {
        None if !conversation.used("Bash") => {
            vec![Block::Tool(
                "Bash",
                json!({"command": format!("echo {marker}=${marker}")}),
            )]
        }
        Some(secret) if !conversation.used("Write") => vec![Block::Tool(
            "Write",
            json!({"file_path": format!("{}/leak-{secret}.txt", conversation.cwd), "content": format!("{secret}\n")}),
        )],
        Some(secret) => vec![Block::Text(format!(
            "{}The secret is {secret}",
            "~".repeat(pad)
        ))],
        None => vec![Block::Text(format!("{marker} was not in the environment"))],
    }
}

/// Every content block of every message, in order.
fn blocks_of(body: &Value) -> impl Iterator<Item = &Value> {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
}

fn collect_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

fn summarize(body: &Value) -> BodySummary {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("?");
            let kinds: Vec<&str> = match m.get("content") {
                Some(Value::String(_)) => vec!["text"],
                Some(Value::Array(blocks)) => blocks
                    .iter()
                    .map(|b| b.get("type").and_then(Value::as_str).unwrap_or("?"))
                    .collect(),
                _ => Vec::new(),
            };
            format!("{role}:{}", kinds.join(","))
        })
        .collect();
    BodySummary {
        model: body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        tools: body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
            .collect(),
        messages,
        tool_results: Conversation::of(body).tool_results,
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("request-id", "req_scripted_error")
        .body(Body::from(body.to_string()))
        .unwrap()
}

enum Block {
    Text(String),
    Tool(&'static str, Value),
}

struct Reply {
    id: u64,
    model: String,
    blocks: Vec<Block>,
}

const INPUT_TOKENS: u64 = 100;
const OUTPUT_TOKENS: u64 = 20;

impl Reply {
    fn stop_reason(&self) -> &'static str {
        if self.blocks.iter().any(|b| matches!(b, Block::Tool(..))) {
            "tool_use"
        } else {
            "end_turn"
        }
    }

    fn tool_id(&self, index: usize) -> String {
        format!("toolu_scripted_{}_{index}", self.id)
    }

    fn message_id(&self) -> String {
        format!("msg_scripted_{}", self.id)
    }

    fn content(&self) -> Vec<Value> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, block)| match block {
                Block::Text(text) => json!({"type": "text", "text": text}),
                Block::Tool(name, input) => {
                    json!({"type": "tool_use", "id": self.tool_id(i), "name": name, "input": input})
                }
            })
            .collect()
    }

    /// The whole answer as one `message` body, for `"stream": false` requests.
    fn message(&self) -> Response {
        let body = json!({
            "id": self.message_id(), "type": "message", "role": "assistant", "model": self.model,
            "content": self.content(), "stop_reason": self.stop_reason(), "stop_sequence": null,
            "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        });
        self.respond("application/json", body.to_string())
    }

    /// The answer as server-sent events. It is sent in one piece: the CLI cares about
    /// the framing, not about the timing.
    fn sse(&self) -> Response {
        let mut out = String::new();
        let mut event = |name: &str, data: Value| {
            out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
        };
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.message_id(), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
        );
        event("ping", json!({"type": "ping"}));
        for (index, block) in self.blocks.iter().enumerate() {
            match block {
                Block::Text(text) => {
                    event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": {"type": "text", "text": ""}}),
                    );
                    for piece in chunks(text, 8) {
                        event(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "text_delta", "text": piece}}),
                        );
                    }
                }
                Block::Tool(name, input) => {
                    // The input must arrive as input_json_delta fragments: the CLI
                    // drops input placed in content_block_start.
                    event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": {"type": "tool_use", "id": self.tool_id(index),
                                                 "name": name, "input": {}}}),
                    );
                    for piece in chunks(&input.to_string(), 20) {
                        event(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "input_json_delta", "partial_json": piece}}),
                        );
                    }
                }
            }
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            );
        }
        event(
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                   "usage": {"output_tokens": OUTPUT_TOKENS}}),
        );
        event("message_stop", json!({"type": "message_stop"}));
        self.respond("text/event-stream", out)
    }

    fn respond(&self, content_type: &str, body: String) -> Response {
        Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header("request-id", format!("req_scripted_{}", self.id))
            .body(Body::from(body))
            .unwrap()
    }
}

/// Splits `text` into pieces of at most `size` characters (not bytes, so multi-byte
/// characters stay whole).
fn chunks(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}
