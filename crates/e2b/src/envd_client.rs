//! The data-plane client: processes and files inside one sandbox, spoken to envd over
//! Connect (JSON codec) and plain HTTP.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::config::{ClientConfig, sandbox_base_url};
use super::envd::{
    CONTENT_TYPE_STREAM, CONTENT_TYPE_UNARY, ConnectRequest, DataEvent, DataInput, ENVD_PORT,
    Empty, EndEvent, EndStream, EntryInfo, EntryResponse, EnvelopeDecoder,
    FILESYSTEM_CREATE_WATCHER, FILESYSTEM_GET_WATCHER_EVENTS, FILESYSTEM_LIST_DIR,
    FILESYSTEM_MAKE_DIR, FILESYSTEM_MOVE, FILESYSTEM_REMOVE, FILESYSTEM_REMOVE_WATCHER,
    FILESYSTEM_STAT, FilesystemEvent, ListDirRequest, ListDirResponse, ListResponse, MoveRequest,
    PROCESS_CONNECT, PROCESS_LIST, PROCESS_SEND_INPUT, PROCESS_SEND_SIGNAL, PROCESS_START,
    PathRequest, ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, SendInputRequest,
    SendSignalRequest, Signal, StartRequest, WatchRequest, WatcherEvents, WatcherId, WrittenFile,
    decode_process_event, message_envelope,
};
use super::error::{Error, envd_error};
use super::models::{Sandbox, SandboxDetail};
use super::secret::Secret;

const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
const PROTOCOL_VERSION_HEADER: &str = "connect-protocol-version";
const TIMEOUT_HEADER: &str = "connect-timeout-ms";
const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// Seconds between envd's keepalive events on an idle stream; the SDK's choice, well under
/// the proxies' idle timeouts.
const KEEPALIVE_SECS: u32 = 50;
/// envd before 0.4.0 had no default user, so one must always be named.
const FIRST_VERSION_WITH_DEFAULT_USER: (u64, u64, u64) = (0, 4, 0);
const LEGACY_DEFAULT_USER: &str = "user";
/// One process event is at most an output chunk; anything near this is not envd talking.
const MAX_ENVELOPE: usize = 16 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;

/// What it takes to reach one sandbox's envd; built from a create, connect or get answer.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxAccess {
    pub sandbox_id: String,
    pub envd_version: String,
    pub access_token: Option<Secret>,
    /// The sandbox's own domain, when it differs from the configured one.
    pub domain: Option<String>,
}

impl From<&Sandbox> for SandboxAccess {
    fn from(sandbox: &Sandbox) -> Self {
        SandboxAccess {
            sandbox_id: sandbox.sandbox_id.clone(),
            envd_version: sandbox.envd_version.clone(),
            access_token: sandbox.envd_access_token.clone().map(Secret::new),
            domain: sandbox.domain.clone(),
        }
    }
}

impl From<&SandboxDetail> for SandboxAccess {
    fn from(sandbox: &SandboxDetail) -> Self {
        SandboxAccess {
            sandbox_id: sandbox.sandbox_id.clone(),
            envd_version: sandbox.envd_version.clone(),
            access_token: sandbox.envd_access_token.clone().map(Secret::new),
            domain: sandbox.domain.clone(),
        }
    }
}

/// `Authorization` value that makes envd run calls as `user`.
pub fn basic_auth(user: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:")))
}

/// Whether an envd of this version needs the user named explicitly.
fn lacks_default_user(envd_version: &str) -> bool {
    let mut parts = envd_version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|part| part.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) => {
            (major, minor, patch) < FIRST_VERSION_WITH_DEFAULT_USER
        }
        _ => false,
    }
}

/// A process to start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    /// Relative paths resolve against the user's home; a missing directory is an error.
    pub cwd: Option<String>,
    /// A name to find the process by later, instead of its pid.
    pub tag: Option<String>,
    /// envd kills the process (SIGKILL) when this runs out; `None` lets it run for as long
    /// as the sandbox lives, which is what background work needs.
    pub timeout: Option<Duration>,
    /// Keep stdin open for [`EnvdClient::send_stdin`].
    pub stdin: bool,
}

impl CommandSpec {
    pub fn new(cmd: impl Into<String>) -> Self {
        CommandSpec {
            cmd: cmd.into(),
            ..CommandSpec::default()
        }
    }

    /// A script run by a login bash, the way the SDK runs commands.
    pub fn shell(script: impl Into<String>) -> Self {
        CommandSpec {
            args: vec!["-l".into(), "-c".into(), script.into()],
            ..CommandSpec::new("/bin/bash")
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn stdin(mut self, open: bool) -> Self {
        self.stdin = open;
        self
    }

    fn to_wire(&self) -> StartRequest {
        StartRequest {
            process: ProcessConfig {
                cmd: self.cmd.clone(),
                args: self.args.clone(),
                envs: self.envs.clone(),
                cwd: self.cwd.clone(),
            },
            pty: None,
            tag: self.tag.clone(),
            stdin: Some(self.stdin),
        }
    }
}

/// What a finished process left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// −1 when a signal killed the process.
    pub exit_code: i32,
    /// envd's description, e.g. `exit status 1` or `signal: killed`.
    pub status: String,
    pub error: Option<String>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// One event of a running process, after the start event and without keepalives.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessUpdate {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Pty(Vec<u8>),
    End(EndEvent),
}

type Body = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// The event stream of a started or connected process. Dropping it leaves the process
/// running.
pub struct ProcessStream {
    pid: u32,
    body: Body,
    decoder: EnvelopeDecoder,
    idle_timeout: Duration,
    ended: bool,
    closed: bool,
}

impl fmt::Debug for ProcessStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessStream")
            .field("pid", &self.pid)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl ProcessStream {
    /// Reads up to the start event, which names the pid.
    async fn open(body: Body, idle_timeout: Duration) -> Result<Self, Error> {
        let mut stream = ProcessStream {
            pid: 0,
            body,
            decoder: EnvelopeDecoder::new(MAX_ENVELOPE),
            idle_timeout,
            ended: false,
            closed: false,
        };
        loop {
            match stream.next_message().await? {
                Some(ProcessEvent::Start(start)) => {
                    stream.pid = start.pid;
                    return Ok(stream);
                }
                Some(ProcessEvent::Keepalive(_)) => {}
                Some(other) => {
                    return Err(Error::Protocol(format!(
                        "process stream began with {other:?} instead of a start event"
                    )));
                }
                None => {
                    return Err(Error::Protocol(
                        "process stream ended before the start event".into(),
                    ));
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next output or the end; `None` once the stream finished cleanly after the end
    /// event. A stream that stops short of that is an error.
    pub async fn next_update(&mut self) -> Result<Option<ProcessUpdate>, Error> {
        loop {
            let update = match self.next_message().await? {
                None => return Ok(None),
                Some(ProcessEvent::Start(_) | ProcessEvent::Keepalive(_)) => continue,
                Some(ProcessEvent::Data(DataEvent::Stdout(data))) => ProcessUpdate::Stdout(data),
                Some(ProcessEvent::Data(DataEvent::Stderr(data))) => ProcessUpdate::Stderr(data),
                Some(ProcessEvent::Data(DataEvent::Pty(data))) => ProcessUpdate::Pty(data),
                Some(ProcessEvent::End(end)) => {
                    self.ended = true;
                    ProcessUpdate::End(end)
                }
            };
            return Ok(Some(update));
        }
    }

    /// Collects all output until the process ends.
    pub async fn wait(mut self) -> Result<Output, Error> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut end = None;
        while let Some(update) = self.next_update().await? {
            match update {
                ProcessUpdate::Stdout(data) | ProcessUpdate::Pty(data) => stdout.extend(data),
                ProcessUpdate::Stderr(data) => stderr.extend(data),
                ProcessUpdate::End(event) => end = Some(event),
            }
        }
        let end = end.ok_or_else(|| Error::Protocol("process stream had no end event".into()))?;
        Ok(Output {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            exit_code: end.exit_code,
            status: end.status,
            error: end.error,
        })
    }

    /// The next message of the stream; `None` after a clean end-of-stream frame.
    async fn next_message(&mut self) -> Result<Option<ProcessEvent>, Error> {
        loop {
            if self.closed {
                return Ok(None);
            }
            let envelope = self
                .decoder
                .next_envelope()
                .map_err(|error| Error::Protocol(error.to_string()))?;
            if let Some(envelope) = envelope {
                if envelope.is_end_stream() {
                    self.closed = true;
                    let end: EndStream = serde_json::from_slice(&envelope.payload)
                        .map_err(|error| Error::Protocol(format!("end of stream: {error}")))?;
                    if let Some(error) = end.error {
                        return Err(Error::Envd(error));
                    }
                    if !self.ended {
                        return Err(Error::Protocol(
                            "process stream finished without an end event".into(),
                        ));
                    }
                    return Ok(None);
                }
                let event = decode_process_event(&envelope.payload)
                    .map_err(|error| Error::Protocol(format!("process event: {error}")))?;
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout(self.idle_timeout, self.body.next())
                .await
                .map_err(|_| {
                    self.closed = true;
                    Error::StreamInterrupted(format!(
                        "nothing received for {:?}",
                        self.idle_timeout
                    ))
                })?;
            match chunk {
                Some(Ok(bytes)) => self.decoder.push(&bytes),
                Some(Err(error)) => {
                    self.closed = true;
                    return Err(Error::StreamInterrupted(error.without_url().to_string()));
                }
                None => {
                    self.closed = true;
                    let detail = match self.decoder.finish() {
                        Ok(()) => "connection closed without an end-of-stream frame".to_owned(),
                        Err(error) => error.to_string(),
                    };
                    return Err(Error::StreamInterrupted(detail));
                }
            }
        }
    }
}

/// Processes and files of one sandbox; cheap to clone.
#[derive(Clone, Debug)]
pub struct EnvdClient {
    http: reqwest::Client,
    http1: reqwest::Client,
    base_url: String,
    access: SandboxAccess,
    user: Option<String>,
    request_timeout: Duration,
    upload_timeout: Duration,
    stream_idle_timeout: Duration,
}

impl EnvdClient {
    pub(crate) fn new(
        config: &ClientConfig,
        http: reqwest::Client,
        http1: reqwest::Client,
        access: SandboxAccess,
    ) -> Self {
        let domain = access.domain.as_deref().unwrap_or(&config.domain);
        let base_url = sandbox_base_url(&config.sandbox_url, ENVD_PORT, &access.sandbox_id, domain);
        let user = lacks_default_user(&access.envd_version).then(|| LEGACY_DEFAULT_USER.into());
        EnvdClient {
            http,
            http1,
            base_url,
            access,
            user,
            request_timeout: config.request_timeout,
            upload_timeout: config.upload_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
        }
    }

    /// Runs every call as this Linux user instead of envd's default one.
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    pub fn sandbox_id(&self) -> &str {
        &self.access.sandbox_id
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    // -------------------------------------------------------------------------------------
    // Processes.

    /// Starts a process and waits for its pid.
    pub async fn start(&self, spec: &CommandSpec) -> Result<ProcessStream, Error> {
        let mut request = self.streaming(PROCESS_START, &spec.to_wire());
        if let Some(timeout) = spec.timeout {
            request = request.header(TIMEOUT_HEADER, timeout.as_millis().max(1).to_string());
        }
        self.open_stream(request).await
    }

    /// Attaches to a running process. Output produced while nobody listened is gone.
    pub async fn connect(&self, process: ProcessSelector) -> Result<ProcessStream, Error> {
        let request = self.streaming(PROCESS_CONNECT, &ConnectRequest { process });
        self.open_stream(request).await
    }

    /// Runs `/bin/bash -l -c <script>` and collects its output; a non-zero exit is not an
    /// error here, it is in [`Output::exit_code`].
    pub async fn run(&self, script: &str) -> Result<Output, Error> {
        self.start(&CommandSpec::shell(script)).await?.wait().await
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, Error> {
        let response: ListResponse = self.unary(PROCESS_LIST, &Empty {}).await?;
        Ok(response.processes)
    }

    /// `false` when no such process exists (any more).
    pub async fn send_signal(
        &self,
        process: ProcessSelector,
        signal: Signal,
    ) -> Result<bool, Error> {
        let request = SendSignalRequest { process, signal };
        found(self.unary::<_, Empty>(PROCESS_SEND_SIGNAL, &request).await)
    }

    pub async fn send_stdin(&self, process: ProcessSelector, data: &[u8]) -> Result<(), Error> {
        let request = SendInputRequest {
            process,
            input: DataInput::Stdin(data.to_vec()),
        };
        self.unary::<_, Empty>(PROCESS_SEND_INPUT, &request)
            .await
            .map(drop)
    }

    // -------------------------------------------------------------------------------------
    // Filesystem.

    pub async fn stat(&self, path: &str) -> Result<EntryInfo, Error> {
        let request = PathRequest { path: path.into() };
        let response: EntryResponse = self.unary(FILESYSTEM_STAT, &request).await?;
        Ok(response.entry)
    }

    pub async fn exists(&self, path: &str) -> Result<bool, Error> {
        found(self.stat(path).await)
    }

    /// Starts watching a directory (with its subdirectories when `recursive`); the events
    /// are collected by the server until [`EnvdClient::watcher_events`] asks.
    pub async fn create_watcher(&self, path: &str, recursive: bool) -> Result<String, Error> {
        let request = WatchRequest {
            path: path.into(),
            recursive,
            include_entry: false,
            allow_network_mounts: false,
        };
        let response: WatcherId = self.unary(FILESYSTEM_CREATE_WATCHER, &request).await?;
        Ok(response.watcher_id)
    }

    /// The watcher's events since the last call.
    pub async fn watcher_events(&self, watcher_id: &str) -> Result<Vec<FilesystemEvent>, Error> {
        let request = WatcherId {
            watcher_id: watcher_id.into(),
        };
        let response: WatcherEvents = self.unary(FILESYSTEM_GET_WATCHER_EVENTS, &request).await?;
        Ok(response.events)
    }

    pub async fn remove_watcher(&self, watcher_id: &str) -> Result<(), Error> {
        let request = WatcherId {
            watcher_id: watcher_id.into(),
        };
        let _: Empty = self.unary(FILESYSTEM_REMOVE_WATCHER, &request).await?;
        Ok(())
    }

    /// Entries below `path`, down to `depth` levels (1 = the directory's own entries).
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>, Error> {
        let request = ListDirRequest {
            path: path.into(),
            depth,
        };
        let response: ListDirResponse = self.unary(FILESYSTEM_LIST_DIR, &request).await?;
        Ok(response.entries)
    }

    /// Creates a directory and its parents; `false` when it already existed.
    pub async fn make_dir(&self, path: &str) -> Result<bool, Error> {
        let request = PathRequest { path: path.into() };
        match self
            .unary::<_, EntryResponse>(FILESYSTEM_MAKE_DIR, &request)
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Envd(error)) if error.code == super::envd::Code::AlreadyExists => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Removes a file or a whole tree; a missing path is not an error.
    pub async fn remove(&self, path: &str) -> Result<(), Error> {
        let request = PathRequest { path: path.into() };
        self.unary::<_, Empty>(FILESYSTEM_REMOVE, &request)
            .await
            .map(drop)
    }

    pub async fn rename(&self, source: &str, destination: &str) -> Result<EntryInfo, Error> {
        let request = MoveRequest {
            source: source.into(),
            destination: destination.into(),
        };
        let response: EntryResponse = self.unary(FILESYSTEM_MOVE, &request).await?;
        Ok(response.entry)
    }

    /// Writes a file, creating parent directories and replacing what was there.
    pub async fn write_file(
        &self,
        path: &str,
        contents: impl Into<Bytes>,
    ) -> Result<Vec<WrittenFile>, Error> {
        let request = self
            .request(&self.http, Method::POST, "/files")
            .query(&self.file_query(path))
            .timeout(self.upload_timeout)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(ACCEPT, "application/json")
            .body(contents.into());
        let response = self.checked(request.send().await).await?;
        read_json(response).await
    }

    /// Reads a whole file.
    /// What the file holds from byte `offset` on: a `Range` request, as envd serves
    /// them, so a file that grows is read once, not again from the start each time.
    /// Empty when the file holds no more than `offset` bytes (envd's 416). A server that
    /// ignores the range sends the whole file, which is cut here.
    pub async fn read_file_from(&self, path: &str, offset: u64) -> Result<Bytes, Error> {
        if offset == 0 {
            return self.read_file(path).await;
        }
        let request = self
            .request(&self.http1, Method::GET, "/files")
            .query(&self.file_query(path))
            .header(reqwest::header::RANGE, format!("bytes={offset}-"));
        let response = request.send().await.map_err(Error::Transport)?;
        let partial = match response.status() {
            StatusCode::RANGE_NOT_SATISFIABLE => return Ok(Bytes::new()),
            StatusCode::PARTIAL_CONTENT => true,
            _ => false,
        };
        let response = if partial {
            response
        } else {
            self.checked(Ok(response)).await?
        };
        let body = response
            .bytes()
            .await
            .map_err(|error| Error::StreamInterrupted(error.without_url().to_string()))?;
        if partial {
            return Ok(body);
        }
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(body.len());
        Ok(body.slice(start..))
    }

    pub async fn read_file(&self, path: &str) -> Result<Bytes, Error> {
        let request = self
            .request(&self.http1, Method::GET, "/files")
            .query(&self.file_query(path));
        let response = self.checked(request.send().await).await?;
        response
            .bytes()
            .await
            .map_err(|error| Error::StreamInterrupted(error.without_url().to_string()))
    }

    fn file_query(&self, path: &str) -> Vec<(&'static str, String)> {
        let mut query = vec![("path", path.to_owned())];
        if let Some(user) = &self.user {
            query.push(("username", user.clone()));
        }
        query
    }

    // -------------------------------------------------------------------------------------
    // Transport.

    /// A request carrying the routing and credential headers every envd call needs.
    fn request(&self, http: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let mut request = http
            .request(method, format!("{}{path}", self.base_url))
            .header(SANDBOX_ID_HEADER, &self.access.sandbox_id)
            .header(SANDBOX_PORT_HEADER, ENVD_PORT.to_string());
        // A token or user that cannot be a header value is left off; envd then answers
        // unauthenticated, which names the problem better than a local error would.
        if let Some(token) = &self.access.access_token
            && let Ok(mut value) = HeaderValue::from_str(token.expose())
        {
            value.set_sensitive(true);
            request = request.header(ACCESS_TOKEN_HEADER, value);
        }
        if let Some(user) = &self.user
            && let Ok(mut value) = HeaderValue::from_str(&basic_auth(user))
        {
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        request
    }

    fn streaming<T: Serialize>(&self, route: &str, message: &T) -> RequestBuilder {
        self.request(&self.http, Method::POST, route)
            .header(CONTENT_TYPE, CONTENT_TYPE_STREAM)
            .header(PROTOCOL_VERSION_HEADER, "1")
            .header(KEEPALIVE_HEADER, KEEPALIVE_SECS.to_string())
            .body(message_envelope(message))
    }

    async fn open_stream(&self, request: RequestBuilder) -> Result<ProcessStream, Error> {
        let response = self.checked(request.send().await).await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !content_type.starts_with(CONTENT_TYPE_STREAM) {
            return Err(Error::Protocol(format!(
                "stream answered with content type {content_type:?}"
            )));
        }
        ProcessStream::open(Box::pin(response.bytes_stream()), self.stream_idle_timeout).await
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &str,
        message: &Req,
    ) -> Result<Resp, Error> {
        let body = serde_json::to_vec(message)
            .map_err(|error| Error::InvalidArgument(format!("request: {error}")))?;
        let request = self
            .request(&self.http, Method::POST, route)
            .timeout(self.request_timeout)
            .header(CONTENT_TYPE, CONTENT_TYPE_UNARY)
            .header(ACCEPT, CONTENT_TYPE_UNARY)
            .header(PROTOCOL_VERSION_HEADER, "1")
            .body(body);
        let response = self.checked(request.send().await).await?;
        read_json(response).await
    }

    /// Turns anything but 200 into the error envd (or the proxy in front of it) reported.
    async fn checked(&self, outcome: Result<Response, reqwest::Error>) -> Result<Response, Error> {
        let response = outcome.map_err(Error::Transport)?;
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(response);
        }
        let body = read_capped(response).await;
        let secrets: Vec<&Secret> = self.access.access_token.iter().collect();
        Err(Error::Envd(envd_error(status.as_u16(), &body, &secrets)))
    }
}

async fn read_capped(mut response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    body
}

async fn read_json<T: DeserializeOwned>(response: Response) -> Result<T, Error> {
    let body = response.bytes().await.map_err(Error::Transport)?;
    serde_json::from_slice(&body)
        .map_err(|error| Error::Protocol(format!("unexpected envd answer: {error}")))
}

/// Maps envd's not_found to `false`.
fn found<T>(outcome: Result<T, Error>) -> Result<bool, Error> {
    match outcome {
        Ok(_) => Ok(true),
        Err(error) if error.is_not_found() => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::super::envd::{
        Code, ConnectError, ProcessEventMessage, StartEvent, encode_envelope, end_stream_envelope,
    };
    use super::*;

    fn event(event: ProcessEvent) -> Bytes {
        message_envelope(&ProcessEventMessage { event })
    }

    fn body(frames: Vec<Bytes>, chunk: usize) -> Body {
        let wire: Vec<u8> = frames.concat();
        let chunks: Vec<Result<Bytes, reqwest::Error>> = wire
            .chunks(chunk)
            .map(|piece| Ok(Bytes::copy_from_slice(piece)))
            .collect();
        Box::pin(futures::stream::iter(chunks))
    }

    fn start(pid: u32) -> Bytes {
        event(ProcessEvent::Start(StartEvent { pid }))
    }

    fn stdout(text: &str) -> Bytes {
        event(ProcessEvent::Data(DataEvent::Stdout(
            text.as_bytes().to_vec(),
        )))
    }

    fn end(exit_code: i32) -> Bytes {
        event(ProcessEvent::End(EndEvent {
            exit_code,
            exited: exit_code >= 0,
            status: format!("exit status {exit_code}"),
            error: None,
        }))
    }

    async fn run(frames: Vec<Bytes>) -> Result<Output, Error> {
        let mut last = None;
        for chunk in [1, 3, 1024] {
            let stream = ProcessStream::open(body(frames.clone(), chunk), Duration::from_secs(5));
            let outcome = match stream.await {
                Ok(stream) => stream.wait().await,
                Err(error) => Err(error),
            };
            if let Some(previous) = &last {
                assert_eq!(
                    format!("{previous:?}"),
                    format!("{outcome:?}"),
                    "chunk {chunk}"
                );
            }
            last = Some(outcome);
        }
        last.unwrap()
    }

    #[tokio::test]
    async fn clean_stream_collects_output_and_exit_code() {
        let keepalive = event(ProcessEvent::Keepalive(Default::default()));
        let output = run(vec![
            start(9),
            keepalive,
            stdout("hi\n"),
            event(ProcessEvent::Data(DataEvent::Stderr(b"oops".to_vec()))),
            end(3),
            end_stream_envelope(None),
        ])
        .await
        .unwrap();
        assert_eq!(output.stdout, "hi\n");
        assert_eq!(output.stderr, "oops");
        assert_eq!(output.exit_code, 3);
        assert!(!output.success());
    }

    #[tokio::test]
    async fn missing_exit_code_means_zero() {
        let end = encode_envelope(0, br#"{"event":{"end":{"exited":true}}}"#);
        let output = run(vec![start(1), end, end_stream_envelope(None)])
            .await
            .unwrap();
        assert_eq!(output.exit_code, 0);
        assert!(output.success());
    }

    #[tokio::test]
    async fn error_in_the_end_frame_is_an_error() {
        let error = ConnectError::new(Code::DeadlineExceeded, "deadline exceeded");
        let outcome = run(vec![
            start(1),
            stdout("x"),
            end_stream_envelope(Some(&error)),
        ])
        .await;
        assert!(matches!(outcome, Err(Error::Envd(e)) if e == error));
    }

    #[tokio::test]
    async fn cut_stream_is_an_interruption() {
        let outcome = run(vec![start(1), stdout("x")]).await;
        assert!(
            matches!(outcome, Err(Error::StreamInterrupted(_))),
            "{outcome:?}"
        );
        let half = stdout("partial");
        let outcome = run(vec![start(1), half.slice(..half.len() - 2)]).await;
        assert!(
            matches!(outcome, Err(Error::StreamInterrupted(_))),
            "{outcome:?}"
        );
        assert!(outcome.unwrap_err().is_infrastructure());
    }

    #[tokio::test]
    async fn end_frame_without_end_event_is_a_protocol_error() {
        let outcome = run(vec![start(1), stdout("x"), end_stream_envelope(None)]).await;
        assert!(matches!(outcome, Err(Error::Protocol(_))), "{outcome:?}");
        let outcome = run(vec![end_stream_envelope(None)]).await;
        assert!(matches!(outcome, Err(Error::Protocol(_))), "{outcome:?}");
    }

    #[tokio::test]
    async fn idle_stream_times_out() {
        let silent: Body = Box::pin(futures::stream::pending());
        let outcome = ProcessStream::open(silent, Duration::from_millis(20)).await;
        assert!(matches!(outcome, Err(Error::StreamInterrupted(_))));
    }

    #[test]
    fn basic_auth_has_an_empty_password() {
        assert_eq!(basic_auth("user"), "Basic dXNlcjo=");
        assert_eq!(basic_auth("root"), "Basic cm9vdDo=");
    }

    #[test]
    fn old_envd_needs_a_named_user() {
        assert!(lacks_default_user("0.3.9"));
        assert!(lacks_default_user("0.1.0"));
        assert!(!lacks_default_user("0.4.0"));
        assert!(!lacks_default_user("0.6.13"));
        assert!(!lacks_default_user("1.0.0-rc1"));
        assert!(!lacks_default_user("garbage"));
    }

    #[test]
    fn start_request_matches_the_sdk_encoding() {
        let spec = CommandSpec::shell("echo hi")
            .env("A", "1")
            .cwd("/home/user")
            .tag("job-1");
        assert_eq!(
            serde_json::to_string(&spec.to_wire()).unwrap(),
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"},"cwd":"/home/user"},"tag":"job-1","stdin":false}"#
        );
    }

    #[test]
    fn access_token_stays_out_of_debug_output() {
        let sandbox = Sandbox {
            sandbox_id: "abc".into(),
            envd_version: "0.6.13".into(),
            envd_access_token: Some("tok-secret".into()),
            ..Sandbox::default()
        };
        let client = super::super::client::E2bClient::new(ClientConfig::with_urls(
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "key-secret",
        ))
        .unwrap();
        let envd = client.envd(&sandbox);
        let text = format!("{envd:?} {sandbox:?}");
        assert!(
            !text.contains("tok-secret") && !text.contains("key-secret"),
            "{text}"
        );
        assert_eq!(envd.base_url(), "http://127.0.0.1:2");
    }
}
