//! envd of the embedded server: one listener for every sandbox, routed like E2B's proxy by
//! the `E2b-Sandbox-Id` header or a `<port>-<sandboxId>.` host name.

// Helpers return the finished error response so handlers can `?` or match on it; the
// size of `Response` costs nothing on these paths.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::runtime::{self, Launch, PathError, User};
use super::{SandboxRecord, State};
use sandcastle_e2b::envd::{
    CONTENT_TYPE_STREAM, CloseStdinRequest, Code, ConnectError, ConnectRequest, DataEvent,
    DataInput, Empty, EntryInfo, EntryResponse, EnvelopeDecoder, FileType, KeepaliveEvent,
    ListDirRequest, ListDirResponse, ListResponse, MoveRequest, PathRequest, ProcessEvent,
    ProcessEventMessage, PtySize, SendInputRequest, SendSignalRequest, Signal, StartEvent,
    StartRequest, StreamInputMessage, UpdateRequest, WatchRequest, WatcherEvents, WatcherId,
    WrittenFile, end_stream_envelope, message_envelope,
};

type Shared = Arc<State>;

/// envd's default when the client names no keepalive interval.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);
/// Request messages are small; anything bigger is a broken or hostile client.
const MAX_REQUEST_MESSAGE: usize = 4 << 20;

pub fn router(state: Shared) -> Router {
    let router = Router::new()
        .route("/health", get(health))
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/Update", post(update))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .route("/files", get(download).post(upload))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .fallback(|| async { rpc_error(ConnectError::new(Code::Unimplemented, "no such method")) })
        .layer(axum::middleware::from_fn(streamed_errors))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    #[cfg(feature = "faults")]
    let router = router.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        super::faults::inject_envd,
    ));
    router.with_state(state)
}

/// A streaming call's error goes in its end-of-stream frame with status 200, as Connect
/// has it: the JavaScript SDK's client takes a streaming call's code from the HTTP status
/// alone (a 400 became "internal"). The proxy's own plain answers (a 502 for a sandbox
/// that is not there) stay as they are, as E2B's proxy sends them.
async fn streamed_errors(request: Request, next: axum::middleware::Next) -> Response {
    let streaming = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(CONTENT_TYPE_STREAM.as_bytes()));
    let response = next.run(request).await;
    if !streaming || response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REQUEST_MESSAGE).await else {
        return parts.status.into_response();
    };
    match serde_json::from_slice::<ConnectError>(&bytes) {
        Ok(error) => stream_response(Body::from(end_stream_envelope(Some(&error)))),
        Err(_) => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// Where a process stream is cut by a fault, if it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Before the start event: the process runs, the client never hears of it.
    BeforeStart,
    /// After the first output.
    AfterFirstOutput,
}

/// envd's own metrics of its sandbox, which the kubernetes runtime's API relays.
async fn metrics(Extract(state): Extract<Shared>, headers: HeaderMap) -> Response {
    let caller = match caller(&state, &headers, None) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let sandbox = caller.sandbox;
    match tokio::task::spawn_blocking(move || super::metrics::envd_metrics(&sandbox)).await {
        Ok(Ok(metrics)) => Json(metrics).into_response(),
        Ok(Err(error)) => rpc_error(ConnectError::new(
            Code::Unavailable,
            format!("cannot read the sandbox's cgroup: {error}"),
        )),
        Err(error) => rpc_error(ConnectError::new(Code::Internal, error.to_string())),
    }
}

/// No token needed, but like the real proxy only a live sandbox answers: this is how the
/// SDK tells a dead sandbox from a network blip.
async fn health(Extract(state): Extract<Shared>, headers: HeaderMap) -> Response {
    let id = sandbox_id(&headers).unwrap_or_default();
    match state.live_sandbox(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => sandbox_not_found(&id),
    }
}

pub(crate) fn rpc_error(error: ConnectError) -> Response {
    let status =
        StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(error)).into_response()
}

/// What the E2B proxy answers when no sandbox matches: a plain JSON 502.
pub(crate) fn sandbox_not_found(id: &str) -> Response {
    let body = serde_json::json!({
        "sandboxId": id,
        "message": "The sandbox was not found",
        "code": 502,
    });
    (StatusCode::BAD_GATEWAY, Json(body)).into_response()
}

pub(crate) fn sandbox_id(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers
        .get("e2b-sandbox-id")
        .and_then(|value| value.to_str().ok())
    {
        return Some(id.to_string());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let label = host.split('.').next()?;
    let (_, id) = label.split_once('-')?;
    Some(id.to_string())
}

/// The caller: which sandbox, and as which user. Checks the access token and the user.
struct Caller {
    sandbox: Arc<SandboxRecord>,
    user: User,
}

fn caller(
    state: &State,
    headers: &HeaderMap,
    signed: Option<&SignedAccess>,
) -> Result<Caller, Response> {
    let id = sandbox_id(headers).unwrap_or_default();
    let sandbox = state
        .live_sandbox(&id)
        .ok_or_else(|| sandbox_not_found(&id))?;
    let user = match basic_user(headers) {
        Some(name) => runtime::user(&name).ok_or_else(|| {
            rpc_error(ConnectError::new(
                Code::Unauthenticated,
                format!("invalid username: '{name}'"),
            ))
        })?,
        None => match signed
            .and_then(|access| access.username.as_deref())
            .filter(|name| !name.is_empty())
        {
            Some(name) => runtime::user(name).ok_or_else(|| {
                rpc_error(ConnectError::new(
                    Code::Unauthenticated,
                    format!("invalid username: '{name}'"),
                ))
            })?,
            None => sandbox.default_user.clone(),
        },
    };
    if !state.launcher.can_act_as(&user) {
        return Err(rpc_error(ConnectError::new(
            Code::PermissionDenied,
            format!(
                "this sandbox runs without root: it cannot act as '{}'",
                user.name
            ),
        )));
    }
    if let Some(token) = &sandbox.access_token {
        let presented = headers
            .get("x-access-token")
            .and_then(|value| value.to_str().ok());
        let authorized = match (presented, signed) {
            (Some(presented), _) => presented == token,
            (None, Some(access)) => access.verify(token),
            (None, None) => false,
        };
        if !authorized {
            return Err(rpc_error(ConnectError::new(
                Code::Unauthenticated,
                "invalid access token",
            )));
        }
    }
    Ok(Caller { sandbox, user })
}

fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split(':').next().unwrap_or_default().to_string())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|error| {
        rpc_error(ConnectError::new(
            Code::InvalidArgument,
            format!("invalid request: {error}"),
        ))
    })
}

/// Reads the single request envelope of a server-streaming call.
fn parse_stream_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    let mut decoder = EnvelopeDecoder::new(MAX_REQUEST_MESSAGE);
    decoder.push(body);
    match decoder.next_envelope() {
        Ok(Some(envelope)) => parse(&envelope.payload),
        Ok(None) => Err(rpc_error(ConnectError::new(
            Code::InvalidArgument,
            "missing request message",
        ))),
        Err(error) => Err(rpc_error(ConnectError::new(
            Code::InvalidArgument,
            error.to_string(),
        ))),
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn stream_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE_STREAM)], body).into_response()
}

/// The envelope of a data event, written directly: output is the hot path, and base64 of a
/// large chunk (SIMD where the CPU has it) is all the work there is to do.
fn data_envelope(data: &DataEvent) -> Bytes {
    let (field, bytes) = match data {
        DataEvent::Stdout(bytes) => ("stdout", bytes),
        DataEvent::Stderr(bytes) => ("stderr", bytes),
        DataEvent::Pty(bytes) => ("pty", bytes),
    };
    let mut frame = Vec::with_capacity(48 + base64_simd::STANDARD.encoded_length(bytes.len()));
    frame.extend_from_slice(&[0; 5]);
    frame.extend_from_slice(b"{\"event\":{\"data\":{\"");
    frame.extend_from_slice(field.as_bytes());
    frame.extend_from_slice(b"\":\"");
    base64_simd::STANDARD.encode_append(bytes, &mut frame);
    frame.extend_from_slice(b"\"}}}");
    let length = (frame.len() - 5) as u32;
    frame[1..5].copy_from_slice(&length.to_be_bytes());
    Bytes::from(frame)
}

fn event_envelope(event: &ProcessEvent) -> Bytes {
    match event {
        ProcessEvent::Data(data) => data_envelope(data),
        other => message_envelope(&ProcessEventMessage {
            event: other.clone(),
        }),
    }
}

/// Turns a process's events into the response stream: keepalives while idle, the end
/// frame after the process's end (or with the deadline error when `deadline` ran out).
/// `state` holds the fault plan when the server is built with faults.
#[cfg_attr(not(feature = "faults"), allow(unused_variables))]
fn event_stream(
    state: &Shared,
    first: Option<ProcessEvent>,
    mut events: mpsc::Receiver<ProcessEvent>,
    keepalive: Duration,
    deadline: Option<(Duration, Arc<runtime::Process>)>,
    cut: Option<Cut>,
) -> Body {
    #[cfg(feature = "faults")]
    let cut = cut.or_else(|| state.faults.take_cut());
    #[cfg(feature = "faults")]
    let faults = state.faults.clone();
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let cut_off = |sender: mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
        #[cfg(feature = "faults")]
        faults.count(|injected| &mut injected.cut_streams);
        let _ = sender
            .send(Err(std::io::Error::new(
                ErrorKind::ConnectionReset,
                "fault injection: stream cut",
            )))
            .await;
    };
    tokio::spawn(async move {
        if cut == Some(Cut::BeforeStart) {
            cut_off(sender).await;
            return;
        }
        if let Some(first) = first
            && sender.send(Ok(event_envelope(&first))).await.is_err()
        {
            return;
        }
        let expires = deadline
            .as_ref()
            .map(|(after, _)| tokio::time::Instant::now() + *after);
        loop {
            let next = async {
                match expires {
                    Some(at) => {
                        tokio::time::timeout_at(at, tokio::time::timeout(keepalive, events.recv()))
                            .await
                    }
                    None => Ok(tokio::time::timeout(keepalive, events.recv()).await),
                }
            };
            match next.await {
                Err(_) => {
                    if let Some((_, process)) = &deadline {
                        process.signal(libc::SIGKILL);
                    }
                    let error =
                        ConnectError::new(Code::DeadlineExceeded, "context deadline exceeded");
                    let _ = sender.send(Ok(end_stream_envelope(Some(&error)))).await;
                    return;
                }
                Ok(Err(_idle)) => {
                    let keepalive = ProcessEvent::Keepalive(KeepaliveEvent {});
                    if sender.send(Ok(event_envelope(&keepalive))).await.is_err() {
                        return;
                    }
                }
                Ok(Ok(None)) => {
                    let error = ConnectError::new(Code::Unavailable, "The sandbox was not found");
                    let _ = sender.send(Ok(end_stream_envelope(Some(&error)))).await;
                    return;
                }
                Ok(Ok(Some(event))) => {
                    let is_end = matches!(event, ProcessEvent::End(_));
                    let is_data = matches!(event, ProcessEvent::Data(_));
                    if sender.send(Ok(event_envelope(&event))).await.is_err() {
                        return;
                    }
                    if cut == Some(Cut::AfterFirstOutput) && is_data {
                        cut_off(sender).await;
                        return;
                    }
                    if is_end {
                        let _ = sender.send(Ok(end_stream_envelope(None))).await;
                        return;
                    }
                }
            }
        }
    });
    Body::from_stream(tokio_stream_from(receiver))
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |context| receiver.poll_recv(context))
}

/// An envd call: the caller (sandbox, user, checked token) and the decoded request, a bare
/// JSON message for unary calls or a single envelope for server-streaming ones.
struct Call<T> {
    caller: Caller,
    request: T,
    headers: HeaderMap,
    /// Set by the fault layer.
    cut: Option<Cut>,
}

impl<T: DeserializeOwned> FromRequest<Shared> for Call<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Shared) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let caller = caller(state, &parts.headers, None)?;
        let body = axum::body::to_bytes(body, MAX_REQUEST_MESSAGE)
            .await
            .map_err(|error| {
                rpc_error(ConnectError::new(Code::InvalidArgument, error.to_string()))
            })?;
        let streaming = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(CONTENT_TYPE_STREAM.as_bytes()));
        let request = if streaming {
            parse_stream_request(&body)?
        } else if body.is_empty() {
            parse(b"{}")?
        } else {
            parse(&body)?
        };
        Ok(Call {
            caller,
            request,
            cut: parts.extensions.get::<Cut>().copied(),
            headers: parts.headers,
        })
    }
}

fn reply<T: serde::Serialize>(result: Result<T, ConnectError>) -> Response {
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => rpc_error(error),
    }
}

/// The response stream of `Start` and `Connect`: the start event, then the process's events.
fn process_stream(
    state: &Shared,
    headers: &HeaderMap,
    process: &Arc<runtime::Process>,
    events: mpsc::Receiver<ProcessEvent>,
    deadline: Option<Duration>,
    cut: Option<Cut>,
) -> Response {
    let keepalive = header_number(headers, "keepalive-ping-interval")
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
        .max(Duration::from_secs(1));
    let first = ProcessEvent::Start(StartEvent { pid: process.pid });
    let deadline = deadline.map(|after| (after, process.clone()));
    stream_response(event_stream(
        state,
        Some(first),
        events,
        keepalive,
        deadline,
        cut,
    ))
}

async fn start(Extract(state): Extract<Shared>, call: Call<StartRequest>) -> Response {
    let Call {
        caller,
        request,
        headers,
        cut: call_cut,
    } = call;
    if let Some(tag) = &request.tag
        && caller.sandbox.processes.is_tag_running(tag)
    {
        return rpc_error(ConnectError::new(
            Code::AlreadyExists,
            format!("process with tag {tag} is already running"),
        ));
    }
    let sandbox = &caller.sandbox;
    let user = &caller.user;
    let cwd = request
        .process
        .cwd
        .clone()
        .filter(|cwd| !cwd.is_empty())
        .or_else(|| sandbox.default_workdir.clone())
        .unwrap_or_else(|| user.home.to_string());
    let fs = sandbox.fs();
    match runtime::resolve(&fs, user.home, &cwd) {
        Ok(host) if host.is_dir() => {}
        _ => {
            return rpc_error(ConnectError::new(
                Code::InvalidArgument,
                format!("invalid working directory {cwd:?}: no such directory in the sandbox"),
            ));
        }
    }
    let cwd = if cwd.starts_with('/') {
        cwd
    } else {
        format!("{}/{cwd}", user.home)
    };
    let launch = Launch {
        fs: &fs,
        user,
        cwd: &cwd,
        env: runtime::process_env(user, &sandbox.env_vars, &request.process.envs),
        cmd: &request.process.cmd,
        args: &request.process.args,
        stdin: request.stdin.unwrap_or(false),
        terminal: request.pty.is_some(),
        group: sandbox.group.as_deref(),
    };
    let terminal = match &request.pty {
        Some(pty) => match terminal_size(pty.size).and_then(|(cols, rows)| {
            runtime::Terminal::open(cols, rows).map_err(|error| {
                ConnectError::new(Code::Internal, format!("cannot open a terminal: {error}"))
            })
        }) {
            Ok(terminal) => Some(terminal),
            Err(error) => return rpc_error(error),
        },
        None => None,
    };
    let spawned = state.launcher.command(&launch).and_then(|command| {
        sandbox.processes.spawn(
            command,
            terminal,
            request.process.clone(),
            request.tag.clone(),
        )
    });
    let (process, events) = match spawned {
        Ok(started) => started,
        Err(error) => {
            return rpc_error(ConnectError::new(
                Code::InvalidArgument,
                format!("cannot start process: {error}"),
            ));
        }
    };
    let deadline = header_number(&headers, "connect-timeout-ms").map(Duration::from_millis);
    process_stream(&state, &headers, &process, events, deadline, call_cut)
}

async fn connect(Extract(state): Extract<Shared>, call: Call<ConnectRequest>) -> Response {
    match call.caller.sandbox.processes.find(&call.request.process) {
        Ok(process) => {
            let events = process.subscribe();
            process_stream(&state, &call.headers, &process, events, None, call.cut)
        }
        Err(error) => rpc_error(error),
    }
}

async fn list(call: Call<Empty>) -> Response {
    reply(Ok(ListResponse {
        processes: call.caller.sandbox.processes.running(),
    }))
}

async fn send_signal(call: Call<SendSignalRequest>) -> Response {
    reply((|| {
        let process = call.caller.sandbox.processes.find(&call.request.process)?;
        if process.has_ended() {
            return Err(ConnectError::new(
                Code::NotFound,
                "process has already exited",
            ));
        }
        let signal = match call.request.signal {
            Signal::Sigkill => libc::SIGKILL,
            Signal::Sigterm => libc::SIGTERM,
            Signal::Unspecified => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    "a signal is required",
                ));
            }
        };
        process.signal(signal);
        Ok(Empty {})
    })())
}

/// The terminal size a client asked for, which must be at least one cell.
fn terminal_size(size: PtySize) -> Result<(u16, u16), ConnectError> {
    let cols = u16::try_from(size.cols).ok().filter(|cols| *cols > 0);
    let rows = u16::try_from(size.rows).ok().filter(|rows| *rows > 0);
    match (cols, rows) {
        (Some(cols), Some(rows)) => Ok((cols, rows)),
        _ => Err(ConnectError::new(
            Code::InvalidArgument,
            format!(
                "invalid pty size {}x{}: columns and rows must be between 1 and 65535",
                size.cols, size.rows
            ),
        )),
    }
}

async fn send_input(call: Call<SendInputRequest>) -> Response {
    let process = match call.caller.sandbox.processes.find(&call.request.process) {
        Ok(process) => process,
        Err(error) => return rpc_error(error),
    };
    reply(write_input(&process, call.request.input).await)
}

/// Writes to the process's stdin or terminal, whichever `input` names and the process has.
async fn write_input(process: &runtime::Process, input: DataInput) -> Result<Empty, ConnectError> {
    let mut guard = process.input().await;
    let written = match (guard.as_mut(), &input) {
        (Some(runtime::Input::Pipe(stdin)), DataInput::Stdin(bytes)) => {
            stdin.write_all(bytes).await
        }
        (Some(runtime::Input::Terminal(keyboard)), DataInput::Pty(bytes)) => {
            keyboard.write_all(bytes).await
        }
        (Some(runtime::Input::Terminal(_)), DataInput::Stdin(_)) => {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                "the process runs on a pty: send pty input",
            ));
        }
        (Some(runtime::Input::Pipe(_)), DataInput::Pty(_)) => {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                "pty not assigned to process",
            ));
        }
        (None, _) => {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                "stdin is not open for this process",
            ));
        }
    };
    written
        .map(|()| Empty {})
        .map_err(|error| ConnectError::new(Code::Internal, format!("cannot write input: {error}")))
}

async fn update(call: Call<UpdateRequest>) -> Response {
    let process = match call.caller.sandbox.processes.find(&call.request.process) {
        Ok(process) => process,
        Err(error) => return rpc_error(error),
    };
    let Some(pty) = call.request.pty else {
        return reply(Ok(Empty {}));
    };
    reply(
        async {
            let (cols, rows) = terminal_size(pty.size)?;
            match process.input().await.as_ref() {
                Some(runtime::Input::Terminal(keyboard)) => keyboard
                    .resize(pty_process::Size::new(rows, cols))
                    .map(|()| Empty {})
                    .map_err(|error| {
                        ConnectError::new(Code::Internal, format!("cannot resize the pty: {error}"))
                    }),
                _ => Err(ConnectError::new(
                    Code::FailedPrecondition,
                    "pty not assigned to process",
                )),
            }
        }
        .await,
    )
}

async fn close_stdin(call: Call<CloseStdinRequest>) -> Response {
    let process = match call.caller.sandbox.processes.find(&call.request.process) {
        Ok(process) => process,
        Err(error) => return rpc_error(error),
    };
    let mut input = process.input().await;
    reply(match input.as_ref() {
        Some(runtime::Input::Terminal(_)) => Err(ConnectError::new(
            Code::FailedPrecondition,
            "cannot close stdin of a pty: send Ctrl-D (0x04) as pty input",
        )),
        // Closing what is already closed is not an error: the outcome is the same.
        Some(runtime::Input::Pipe(_)) | None => {
            *input = None;
            Ok(Empty {})
        }
    })
}

/// `StreamInput`: a client stream of input for one process, read as it arrives, so a long
/// session's input is written as it is typed.
async fn stream_input(Extract(state): Extract<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let caller = match caller(&state, &parts.headers, None) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let mut decoder = EnvelopeDecoder::new(MAX_REQUEST_MESSAGE);
    let mut body = body.into_data_stream();
    let mut process = None;
    let outcome = loop {
        let envelope = match decoder.next_envelope() {
            Ok(Some(envelope)) => envelope,
            Ok(None) => match body.next().await {
                Some(Ok(chunk)) => {
                    decoder.push(&chunk);
                    continue;
                }
                Some(Err(error)) => {
                    break Err(ConnectError::new(Code::Canceled, error.to_string()));
                }
                None => break Ok(Empty {}),
            },
            Err(error) => break Err(ConnectError::new(Code::InvalidArgument, error.to_string())),
        };
        if envelope.is_end_stream() {
            break Ok(Empty {});
        }
        let message: StreamInputMessage = match serde_json::from_slice(&envelope.payload) {
            Ok(message) => message,
            Err(error) => {
                break Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("invalid request: {error}"),
                ));
            }
        };
        match (message, &process) {
            (StreamInputMessage::Start { process: selector }, None) => {
                match caller.sandbox.processes.find(&selector) {
                    Ok(found) => process = Some(found),
                    Err(error) => break Err(error),
                }
            }
            (StreamInputMessage::Start { .. }, Some(_)) => {
                break Err(ConnectError::new(
                    Code::InvalidArgument,
                    "the stream already named its process",
                ));
            }
            (StreamInputMessage::Data { .. }, None) => {
                break Err(ConnectError::new(
                    Code::InvalidArgument,
                    "the first message must name the process",
                ));
            }
            (StreamInputMessage::Data { input }, Some(found)) => {
                if let Err(error) = write_input(found, input).await {
                    break Err(error);
                }
            }
            (StreamInputMessage::Keepalive {}, _) => {}
        }
    };
    let body = match outcome {
        Ok(empty) => {
            let mut frames = message_envelope(&empty).to_vec();
            frames.extend_from_slice(&end_stream_envelope(None));
            frames
        }
        Err(error) => end_stream_envelope(Some(&error)).to_vec(),
    };
    stream_response(Body::from(body))
}

// ---------------------------------------------------------------------------------------
// Filesystem

fn path_error(error: PathError) -> ConnectError {
    match error {
        PathError::Outside(_) => ConnectError::new(Code::PermissionDenied, error.to_string()),
        PathError::Empty => ConnectError::new(Code::InvalidArgument, error.to_string()),
    }
}

fn io_error(path: &str, error: std::io::Error) -> ConnectError {
    match error.kind() {
        ErrorKind::NotFound => ConnectError::new(Code::NotFound, format!("path not found: {path}")),
        ErrorKind::AlreadyExists => {
            ConnectError::new(Code::AlreadyExists, format!("path already exists: {path}"))
        }
        ErrorKind::PermissionDenied => {
            ConnectError::new(Code::PermissionDenied, format!("permission denied: {path}"))
        }
        _ => ConnectError::new(Code::Internal, format!("{path}: {error}")),
    }
}

fn permissions_text(mode: u32, is_dir: bool, is_link: bool) -> String {
    let kind = if is_link {
        'l'
    } else if is_dir {
        'd'
    } else {
        '-'
    };
    let mut text = String::from(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}

fn entry_info(
    fs: &std::path::Path,
    host: &std::path::Path,
    sandbox: &SandboxRecord,
) -> std::io::Result<EntryInfo> {
    let metadata = std::fs::symlink_metadata(host)?;
    let is_link = metadata.file_type().is_symlink();
    let kind = if is_link {
        FileType::Symlink
    } else if metadata.is_dir() {
        FileType::Directory
    } else {
        FileType::File
    };
    let owner = |id: u32| match id {
        0 => "root".to_string(),
        _ => sandbox.default_user.name.to_string(),
    };
    let path = runtime::sandbox_path(fs, host);
    Ok(EntryInfo {
        name: host
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind,
        path,
        size: metadata.len() as i64,
        mode: metadata.permissions().mode() & 0o7777,
        permissions: permissions_text(metadata.permissions().mode(), metadata.is_dir(), is_link),
        owner: owner(metadata.uid()),
        group: owner(metadata.gid()),
        modified_time: metadata
            .modified()
            .ok()
            .and_then(|time| jiff::Timestamp::try_from(time).ok())
            .map(|time| time.to_string()),
        symlink_target: if is_link {
            std::fs::read_link(host)
                .ok()
                .map(|target| target.display().to_string())
        } else {
            None
        },
    })
}

fn host_path(caller: &Caller, path: &str) -> Result<std::path::PathBuf, ConnectError> {
    runtime::resolve(&caller.sandbox.fs(), caller.user.home, path).map_err(path_error)
}

fn entry_of(
    caller: &Caller,
    host: &std::path::Path,
    path: &str,
) -> Result<EntryInfo, ConnectError> {
    entry_info(&caller.sandbox.fs(), host, &caller.sandbox).map_err(|error| io_error(path, error))
}

async fn stat(
    Call {
        caller, request, ..
    }: Call<PathRequest>,
) -> Response {
    reply((|| {
        let host = host_path(&caller, &request.path)?;
        let entry = entry_of(&caller, &host, &request.path)?;
        Ok(EntryResponse { entry })
    })())
}

async fn make_dir(
    Call {
        caller, request, ..
    }: Call<PathRequest>,
) -> Response {
    reply((|| {
        let host = host_path(&caller, &request.path)?;
        if host.exists() {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("directory already exists: {}", request.path),
            ));
        }
        std::fs::create_dir_all(&host).map_err(|error| io_error(&request.path, error))?;
        let entry = entry_of(&caller, &host, &request.path)?;
        Ok(EntryResponse { entry })
    })())
}

async fn remove(
    Call {
        caller, request, ..
    }: Call<PathRequest>,
) -> Response {
    reply((|| {
        let host = host_path(&caller, &request.path)?;
        let removed = match std::fs::symlink_metadata(&host) {
            Ok(metadata) if metadata.is_dir() => std::fs::remove_dir_all(&host),
            Ok(_) => std::fs::remove_file(&host),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        };
        removed.map_err(|error| io_error(&request.path, error))?;
        Ok(Empty {})
    })())
}

async fn list_dir(
    Call {
        caller, request, ..
    }: Call<ListDirRequest>,
) -> Response {
    reply((|| {
        let host = host_path(&caller, &request.path)?;
        let metadata = std::fs::metadata(&host).map_err(|error| io_error(&request.path, error))?;
        if !metadata.is_dir() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("path is not a directory: {}", request.path),
            ));
        }
        let mut entries = Vec::new();
        walk(&caller, &host, request.depth.max(1), &mut entries)
            .map_err(|error| io_error(&request.path, error))?;
        Ok(ListDirResponse { entries })
    })())
}

/// A directory's events as a stream: `start`, then one `filesystem` message per event
/// and `keepalive` while idle, until the client goes away (which ends the watch).
async fn watch_dir(
    Extract(state): Extract<Shared>,
    Call {
        caller,
        request,
        headers,
        ..
    }: Call<WatchRequest>,
) -> Response {
    let dir = match watched_dir(&caller, &request.path) {
        Ok(dir) => dir,
        Err(error) => return rpc_error(error),
    };
    let (events, mut received) = mpsc::unbounded_channel();
    let watcher = match super::watchers::watch(&dir, request.recursive, move |event| {
        let _ = events.send(event);
    }) {
        Ok(watcher) => watcher,
        Err(error) => return rpc_error(error),
    };
    let keepalive = header_number(&headers, "keepalive-ping-interval")
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs)
        .max(Duration::from_secs(1));
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let sandbox = caller.sandbox.clone();
    tokio::spawn(async move {
        let _watcher = watcher;
        let frame = |message: WatchDirMessage| Ok(message_envelope(&message));
        if sender.send(frame(WatchDirMessage::Start {})).await.is_err() {
            return;
        }
        let mut stopping = state.stopping.clone();
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(keepalive, received.recv()) => next,
                () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                    let error = ConnectError::new(Code::Unavailable, "the server is stopping");
                    let _ = sender.send(Ok(end_stream_envelope(Some(&error)))).await;
                    return;
                }
            };
            let message = match next {
                Ok(Some(event)) => WatchDirMessage::Filesystem(Box::new(event)),
                Ok(None) => return,
                Err(_idle) if state.sandbox(&sandbox.id).is_none() => {
                    let error = ConnectError::new(Code::Unavailable, "The sandbox was not found");
                    let _ = sender.send(Ok(end_stream_envelope(Some(&error)))).await;
                    return;
                }
                Err(_idle) => WatchDirMessage::Keepalive {},
            };
            if sender.send(frame(message)).await.is_err() {
                return;
            }
        }
    });
    stream_response(Body::from_stream(tokio_stream_from(receiver)))
}

/// One message of a `WatchDir` stream.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
enum WatchDirMessage {
    Start {},
    Filesystem(Box<sandcastle_e2b::envd::FilesystemEvent>),
    Keepalive {},
}

/// The host path of a directory of the sandbox the caller may watch.
fn watched_dir(caller: &Caller, path: &str) -> Result<std::path::PathBuf, ConnectError> {
    let host = host_path(caller, path)?;
    let metadata = std::fs::metadata(&host).map_err(|error| io_error(path, error))?;
    if !metadata.is_dir() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("path {path} not a directory"),
        ));
    }
    Ok(host)
}

/// Starts a watcher on a directory of the sandbox; its events are collected until the
/// client asks (`GetWatcherEvents`), which is how the SDKs' `watch_dir` polls.
async fn create_watcher(
    Call {
        caller, request, ..
    }: Call<WatchRequest>,
) -> Response {
    reply((|| {
        let host = watched_dir(&caller, &request.path)?;
        let watcher_id = super::random_id(16);
        caller
            .sandbox
            .watchers
            .create(watcher_id.clone(), &host, request.recursive)?;
        Ok(WatcherId { watcher_id })
    })())
}

async fn get_watcher_events(
    Call {
        caller, request, ..
    }: Call<WatcherId>,
) -> Response {
    reply(
        caller
            .sandbox
            .watchers
            .take_events(&request.watcher_id)
            .map(|events| WatcherEvents { events }),
    )
}

async fn remove_watcher(
    Call {
        caller, request, ..
    }: Call<WatcherId>,
) -> Response {
    reply(
        caller
            .sandbox
            .watchers
            .remove(&request.watcher_id)
            .map(|()| Empty {}),
    )
}

fn walk(
    caller: &Caller,
    dir: &std::path::Path,
    depth: u32,
    entries: &mut Vec<EntryInfo>,
) -> std::io::Result<()> {
    let fs = caller.sandbox.fs();
    let mut children: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(|child| child.file_name());
    // The sandbox's root lies under a host directory, so a path the agent made near
    // PATH_MAX is too long here: it is left out instead of failing the whole listing.
    let too_long = |error: &std::io::Error| error.raw_os_error() == Some(libc::ENAMETOOLONG);
    for child in children {
        let path = child.path();
        match entry_info(&fs, &path, &caller.sandbox) {
            Err(error) if too_long(&error) => continue,
            info => entries.push(info?),
        }
        if depth > 1 && child.file_type()?.is_dir() {
            match walk(caller, &path, depth - 1, entries) {
                Err(error) if too_long(&error) => {}
                walked => walked?,
            }
        }
    }
    Ok(())
}

async fn move_entry(
    Call {
        caller, request, ..
    }: Call<MoveRequest>,
) -> Response {
    reply((|| {
        let source = host_path(&caller, &request.source)?;
        let destination = host_path(&caller, &request.destination)?;
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|error| io_error(&request.destination, error))?;
        }
        std::fs::rename(&source, &destination).map_err(|error| io_error(&request.source, error))?;
        let entry = entry_of(&caller, &destination, &request.destination)?;
        Ok(EntryResponse { entry })
    })())
}

// ---------------------------------------------------------------------------------------
// /files and /envs

#[derive(Deserialize)]
struct SignedAccess {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
    #[serde(skip)]
    operation: &'static str,
}

impl SignedAccess {
    /// `v1_` + unpadded base64 of SHA-256 over `path:operation:username:token[:expiry]`.
    fn verify(&self, token: &str) -> bool {
        let (Some(signature), Some(path)) = (&self.signature, &self.path) else {
            return false;
        };
        if let Some(expiry) = self.signature_expiration
            && expiry < jiff::Timestamp::now().as_second()
        {
            return false;
        }
        let username = self.username.as_deref().unwrap_or_default();
        let mut material = format!("{path}:{}:{username}:{token}", self.operation);
        if let Some(expiry) = self.signature_expiration {
            material.push_str(&format!(":{expiry}"));
        }
        let digest = Sha256::digest(material.as_bytes());
        let expected = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        );
        expected == *signature
    }
}

fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    (status, Json(body)).into_response()
}

fn files_caller(
    state: &State,
    headers: &HeaderMap,
    access: &SignedAccess,
) -> Result<Caller, Response> {
    caller(state, headers, Some(access)).map_err(|response| {
        if response.status() == StatusCode::UNAUTHORIZED {
            http_error(
                StatusCode::UNAUTHORIZED,
                "invalid access token, signature or username",
            )
        } else {
            response
        }
    })
}

async fn download(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    Query(mut access): Query<SignedAccess>,
) -> Response {
    access.operation = "read";
    let caller = match files_caller(&state, &headers, &access) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let Some(path) = access.path.clone().filter(|path| !path.is_empty()) else {
        return http_error(StatusCode::BAD_REQUEST, "path is required");
    };
    let host = match runtime::resolve(&caller.sandbox.fs(), caller.user.home, &path) {
        Ok(host) => host,
        Err(error) => return http_error(StatusCode::BAD_REQUEST, error.to_string()),
    };
    match tokio::fs::metadata(&host).await {
        Ok(metadata) if metadata.is_dir() => {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("path '{path}' is a directory"),
            );
        }
        Ok(_) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return http_error(
                StatusCode::NOT_FOUND,
                format!("path '{path}' does not exist"),
            );
        }
        Err(error) => return http_error(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
    // ServeFile answers `Range` (206 with `Content-Range`, 416 past the end) as the real
    // envd does, so a client can read only what a file gained since its last read.
    let mut request = axum::http::Request::new(());
    if let Some(range) = headers.get(header::RANGE) {
        request.headers_mut().insert(header::RANGE, range.clone());
    }
    let served =
        tower::ServiceExt::oneshot(tower_http::services::ServeFile::new(&host), request).await;
    match served {
        Ok(response) => {
            let name = host
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut response = response.map(Body::new);
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(disposition) =
                header::HeaderValue::from_str(&format!("inline; filename={name:?}"))
            {
                headers.insert(header::CONTENT_DISPOSITION, disposition);
            }
            response
        }
        Err(error) => http_error(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

/// Writes a file, creating parents and overwriting, as `username` would own it.
async fn write_file(
    host: &std::path::Path,
    body: impl futures::Stream<Item = Result<Bytes, std::io::Error>>,
) -> std::io::Result<()> {
    if let Some(parent) = host.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(host).await?;
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        file.write_all(&chunk?).await?;
    }
    file.flush().await
}

async fn upload(
    Extract(state): Extract<Shared>,
    headers: HeaderMap,
    Query(mut access): Query<SignedAccess>,
    request: Request,
) -> Response {
    access.operation = "write";
    let caller = match files_caller(&state, &headers, &access) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let fs = caller.sandbox.fs();
    let home = caller.user.home;
    let target = |path: &str| {
        runtime::resolve(&fs, home, path)
            .map_err(|error| http_error(StatusCode::BAD_REQUEST, error.to_string()))
    };
    let mut written = Vec::new();
    if let Ok(boundary) = multer::parse_boundary(&content_type) {
        let stream = request.into_body().into_data_stream();
        let mut multipart = multer::Multipart::new(stream, boundary);
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(error) => {
                    return http_error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid multipart body: {error}"),
                    );
                }
            };
            let path = match (&access.path, field.file_name()) {
                (Some(path), _) if !path.is_empty() => path.clone(),
                (_, Some(name)) => name.to_string(),
                _ => return http_error(StatusCode::BAD_REQUEST, "path is required"),
            };
            let host = match target(&path) {
                Ok(host) => host,
                Err(response) => return response,
            };
            if let Err(error) = write_file(&host, field.map_err(std::io::Error::other)).await {
                return write_error(&path, error);
            }
            written.push(written_file(&fs, &host));
        }
    } else {
        let Some(path) = access.path.clone().filter(|path| !path.is_empty()) else {
            return http_error(StatusCode::BAD_REQUEST, "path is required");
        };
        let host = match target(&path) {
            Ok(host) => host,
            Err(response) => return response,
        };
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let body = request
            .into_body()
            .into_data_stream()
            .map_err(std::io::Error::other);
        let result = if gzip {
            let reader = tokio_util::io::StreamReader::new(body);
            let decoder = async_gzip(reader);
            write_file(&host, decoder).await
        } else {
            write_file(&host, body).await
        };
        if let Err(error) = result {
            return write_error(&path, error);
        }
        written.push(written_file(&fs, &host));
    }
    Json(written).into_response()
}

fn async_gzip(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let (sender, receiver) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut decoder = flate2::read::GzDecoder::new(bridge);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match decoder.read(&mut buffer) {
                Ok(0) => return,
                Ok(read) => {
                    if sender
                        .blocking_send(Ok(Bytes::copy_from_slice(&buffer[..read])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(error) => {
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            }
        }
    });
    tokio_stream_from(receiver)
}

fn write_error(path: &str, error: std::io::Error) -> Response {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => http_error(StatusCode::INSUFFICIENT_STORAGE, "not enough disk space"),
        _ if error.kind() == ErrorKind::InvalidData || error.kind() == ErrorKind::Other => {
            http_error(
                StatusCode::BAD_REQUEST,
                format!("cannot write {path}: {error}"),
            )
        }
        _ => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write {path}: {error}"),
        ),
    }
}

fn written_file(fs: &std::path::Path, host: &std::path::Path) -> WrittenFile {
    WrittenFile {
        path: runtime::sandbox_path(fs, host),
        name: host
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file".into(),
    }
}

async fn envs(Extract(state): Extract<Shared>, headers: HeaderMap) -> Response {
    match caller(&state, &headers, None) {
        Ok(caller) => {
            Json::<BTreeMap<String, String>>(caller.sandbox.env_vars.clone()).into_response()
        }
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_is_named_by_header_or_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "49983-abc123.e2b.local".parse().unwrap());
        assert_eq!(sandbox_id(&headers).as_deref(), Some("abc123"));
        headers.insert("e2b-sandbox-id", "fromheader".parse().unwrap());
        assert_eq!(sandbox_id(&headers).as_deref(), Some("fromheader"));
    }

    #[test]
    fn basic_auth_names_the_user() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(basic_user(&headers).as_deref(), Some("root"));
    }

    #[test]
    fn data_events_written_by_hand_match_the_serde_form() {
        let event = ProcessEvent::Data(DataEvent::Stderr(b"\x00\xffbinary and text\n".to_vec()));
        let by_hand = data_envelope(match &event {
            ProcessEvent::Data(data) => data,
            _ => unreachable!(),
        });
        let by_serde = message_envelope(&ProcessEventMessage { event });
        assert_eq!(by_hand, by_serde);
    }

    #[test]
    fn signatures_follow_the_sdk_recipe() {
        let access = SignedAccess {
            path: Some("/home/user/a.txt".into()),
            username: Some("user".into()),
            signature: None,
            signature_expiration: None,
            operation: "read",
        };
        let digest = Sha256::digest(b"/home/user/a.txt:read:user:secret");
        let signature = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        );
        let signed = SignedAccess {
            signature: Some(signature),
            ..access
        };
        assert!(signed.verify("secret"));
        assert!(!signed.verify("other"));
    }

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions_text(0o644, false, false), "-rw-r--r--");
        assert_eq!(permissions_text(0o755, true, false), "drwxr-xr-x");
    }
}
