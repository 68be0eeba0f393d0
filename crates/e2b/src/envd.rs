//! The in-sandbox daemon protocol (envd): Connect RPC with the JSON codec. Message types
//! follow proto3's canonical JSON mapping (lowerCamelCase names, int64 as strings, bytes as
//! base64, default values left out), shared by the client and the embedded server.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The port envd listens on inside every sandbox; part of the sandbox host name.
pub const ENVD_PORT: u16 = 49983;
/// The envd version the embedded server reports; the SDK gates features on it.
pub const ENVD_VERSION: &str = "0.6.13";

pub const CONTENT_TYPE_UNARY: &str = "application/json";
pub const CONTENT_TYPE_STREAM: &str = "application/connect+json";

pub const PROCESS_START: &str = "/process.Process/Start";
pub const PROCESS_CONNECT: &str = "/process.Process/Connect";
pub const PROCESS_LIST: &str = "/process.Process/List";
pub const PROCESS_SEND_SIGNAL: &str = "/process.Process/SendSignal";
pub const PROCESS_SEND_INPUT: &str = "/process.Process/SendInput";
pub const FILESYSTEM_STAT: &str = "/filesystem.Filesystem/Stat";
pub const FILESYSTEM_LIST_DIR: &str = "/filesystem.Filesystem/ListDir";
pub const FILESYSTEM_MAKE_DIR: &str = "/filesystem.Filesystem/MakeDir";
pub const FILESYSTEM_REMOVE: &str = "/filesystem.Filesystem/Remove";
pub const FILESYSTEM_MOVE: &str = "/filesystem.Filesystem/Move";
pub const FILESYSTEM_CREATE_WATCHER: &str = "/filesystem.Filesystem/CreateWatcher";
pub const FILESYSTEM_GET_WATCHER_EVENTS: &str = "/filesystem.Filesystem/GetWatcherEvents";
pub const FILESYSTEM_REMOVE_WATCHER: &str = "/filesystem.Filesystem/RemoveWatcher";

// ---------------------------------------------------------------------------------------
// Envelope framing of streaming calls: 1 flag byte, a big-endian u32 length, the payload.

pub const FLAG_COMPRESSED: u8 = 0x01;
pub const FLAG_END_STREAM: u8 = 0x02;
const HEADER_LEN: usize = 5;

/// Frames a payload; the end-of-stream envelope carries [`FLAG_END_STREAM`].
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Serializes a message into a data envelope.
pub fn message_envelope<T: Serialize>(message: &T) -> Bytes {
    encode_envelope(
        0,
        &serde_json::to_vec(message).expect("envd messages serialize"),
    )
}

/// Serializes the end-of-stream envelope, with the error that ended the stream if any.
pub fn end_stream_envelope(error: Option<&ConnectError>) -> Bytes {
    let end = EndStream {
        error: error.cloned(),
    };
    encode_envelope(
        FLAG_END_STREAM,
        &serde_json::to_vec(&end).expect("end stream serializes"),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("envelope of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("compressed envelopes are not supported")]
    Compressed,
    #[error("stream ended inside an envelope ({0} bytes left over)")]
    Truncated(usize),
}

/// Splits a byte stream into envelopes as chunks arrive, whatever the chunk boundaries.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buffer: BytesMut,
    max_payload: usize,
}

impl EnvelopeDecoder {
    pub fn new(max_payload: usize) -> Self {
        EnvelopeDecoder {
            buffer: BytesMut::new(),
            max_payload,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete envelope, or `None` until more bytes arrive.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, FramingError> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > self.max_payload {
            return Err(FramingError::TooLarge(len, self.max_payload));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(FramingError::Compressed);
        }
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Call at end of input: bytes left over mean the peer cut the stream mid-envelope.
    pub fn finish(&self) -> Result<(), FramingError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(FramingError::Truncated(self.buffer.len()))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors.

/// Connect's error codes, with the HTTP status each maps to on unary calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a client assigns to a plain (non-Connect) HTTP error, such as a proxy's.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            501 => Code::Unimplemented,
            502..=503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

/// A Connect error: the body of a failed unary call, or the `error` of an end-of-stream frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ConnectError {
    pub code: Code,
    #[serde(default)]
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }
}

/// The JSON of the final envelope of a stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ConnectError>,
}

// ---------------------------------------------------------------------------------------
// proto3 JSON helpers.

/// `bytes` fields travel as standard base64.
pub mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// int64 fields travel as decimal strings; parsers must also take plain numbers.
pub mod int64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Number(i64),
        }
        match Wire::deserialize(deserializer)? {
            Wire::Text(text) => text.parse().map_err(serde::de::Error::custom),
            Wire::Number(number) => Ok(number),
        }
    }
}

fn is_zero_i32(value: &i32) -> bool {
    *value == 0
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

// ---------------------------------------------------------------------------------------
// process.Process

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    pub process: ProcessConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// A terminal for the process: its output then comes as `pty` data, its input goes in as
/// `pty` input, and `Update` resizes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pty {
    #[serde(default)]
    pub size: PtySize,
}

/// Zero values are left out on the wire, as proto3 JSON does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    #[serde(default)]
    pub cols: u32,
    #[serde(default)]
    pub rows: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub process: ProcessSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloseStdinRequest {
    pub process: ProcessSelector,
}

/// One message of the client stream of `StreamInput`: the process first, then its input.
/// The oneof sits in the request itself, so its member is the top-level key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamInputMessage {
    Start { process: ProcessSelector },
    Data { input: DataInput },
    Keepalive {},
}

/// Selects a process by pid or by the tag given at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessSelector {
    Pid(u32),
    Tag(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectRequest {
    pub process: ProcessSelector,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartEvent {
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataEvent {
    Stdout(#[serde(with = "base64_bytes")] Vec<u8>),
    Stderr(#[serde(with = "base64_bytes")] Vec<u8>),
    Pty(#[serde(with = "base64_bytes")] Vec<u8>),
}

/// How a process ended. `exit_code` is −1 when a signal killed it; `exited` is true only
/// for a normal exit. Zero values are left out on the wire.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub exited: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeepaliveEvent {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessEvent {
    Start(StartEvent),
    Data(DataEvent),
    End(EndEvent),
    Keepalive(KeepaliveEvent),
}

/// Each message of the `Start` and `Connect` streams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessEventMessage {
    pub event: ProcessEvent,
}

/// Parses one message of a process stream. Output events, nearly all of the bytes of a busy
/// stream, are recognised in the canonical form every envd writes and base64-decoded in
/// place; anything else goes through serde.
pub fn decode_process_event(payload: &[u8]) -> Result<ProcessEvent, serde_json::Error> {
    const PREFIX: &[u8] = b"{\"event\":{\"data\":{\"";
    const SUFFIX: &[u8] = b"\"}}}";
    if let Some(rest) = payload.strip_prefix(PREFIX)
        && let Some(rest) = rest.strip_suffix(SUFFIX)
    {
        type Field = (&'static [u8], fn(Vec<u8>) -> DataEvent);
        let fields: [Field; 3] = [
            (b"stdout\":\"", DataEvent::Stdout),
            (b"stderr\":\"", DataEvent::Stderr),
            (b"pty\":\"", DataEvent::Pty),
        ];
        for (field, wrap) in fields {
            if let Some(encoded) = rest.strip_prefix(field)
                && let Ok(bytes) = base64_simd::STANDARD.decode_to_vec(encoded)
            {
                return Ok(ProcessEvent::Data(wrap(bytes)));
            }
        }
    }
    serde_json::from_slice::<ProcessEventMessage>(payload).map(|message| message.event)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub config: ProcessConfig,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    #[serde(default)]
    pub processes: Vec<ProcessInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    #[serde(rename = "SIGNAL_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "SIGNAL_SIGTERM")]
    Sigterm,
    #[serde(rename = "SIGNAL_SIGKILL")]
    Sigkill,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendSignalRequest {
    pub process: ProcessSelector,
    pub signal: Signal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendInputRequest {
    pub process: ProcessSelector,
    pub input: DataInput,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataInput {
    Stdin(#[serde(with = "base64_bytes")] Vec<u8>),
    Pty(#[serde(with = "base64_bytes")] Vec<u8>),
}

// ---------------------------------------------------------------------------------------
// filesystem.Filesystem

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "FILE_TYPE_FILE")]
    File,
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory,
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub path: String,
    #[serde(default, with = "int64_string", skip_serializing_if = "is_zero_i64")]
    pub size: i64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub permissions: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathRequest {
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryResponse {
    pub entry: EntryInfo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListDirRequest {
    pub path: String,
    #[serde(default)]
    pub depth: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListDirResponse {
    #[serde(default)]
    pub entries: Vec<EntryInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveRequest {
    pub source: String,
    pub destination: String,
}

/// What happened to a watched path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsEventType {
    #[serde(rename = "EVENT_TYPE_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create,
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write,
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove,
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename,
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod,
}

/// A change below a watched directory; `name` is relative to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilesystemEvent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FsEventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `CreateWatcher` and `WatchDir`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_entry: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_network_mounts: bool,
}

/// `CreateWatcher`'s answer, and the request of `GetWatcherEvents` and `RemoveWatcher`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherId {
    pub watcher_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WatcherEvents {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<FilesystemEvent>,
}

/// One entry of the `POST /files` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WrittenFile {
    pub path: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_messages_read_as_proto3_json() {
        let request: WatchRequest =
            serde_json::from_str(r#"{"path":"/home/user","recursive":true}"#).unwrap();
        assert!(request.recursive && !request.include_entry);
        let events = WatcherEvents {
            events: vec![FilesystemEvent {
                name: "a/b.txt".into(),
                kind: FsEventType::Create,
                entry: None,
            }],
        };
        assert_eq!(
            serde_json::to_string(&events).unwrap(),
            r#"{"events":[{"name":"a/b.txt","type":"EVENT_TYPE_CREATE"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&WatcherEvents::default()).unwrap(),
            "{}"
        );
        assert_eq!(
            serde_json::to_string(&WatcherId {
                watcher_id: "w1".into()
            })
            .unwrap(),
            r#"{"watcherId":"w1"}"#
        );
    }

    #[test]
    fn envelopes_survive_any_chunking() {
        let first = message_envelope(&ProcessEventMessage {
            event: ProcessEvent::Start(StartEvent { pid: 7 }),
        });
        let last = end_stream_envelope(None);
        let wire: Vec<u8> = [first.as_ref(), last.as_ref()].concat();
        for chunk in 1..wire.len() {
            let mut decoder = EnvelopeDecoder::new(1 << 20);
            let mut seen = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(envelope) = decoder.next_envelope().unwrap() {
                    seen.push(envelope);
                }
            }
            decoder.finish().unwrap();
            assert_eq!(seen.len(), 2, "chunk size {chunk}");
            assert!(!seen[0].is_end_stream());
            assert!(seen[1].is_end_stream());
            assert_eq!(&seen[1].payload[..], b"{}");
        }
    }

    #[test]
    fn header_is_flags_then_big_endian_length() {
        let envelope = encode_envelope(FLAG_END_STREAM, &[b'x'; 258]);
        assert_eq!(&envelope[..5], &[0x02, 0, 0, 1, 2]);
    }

    #[test]
    fn decoder_refuses_oversized_compressed_and_truncated_input() {
        let mut decoder = EnvelopeDecoder::new(4);
        decoder.push(&encode_envelope(0, b"12345"));
        assert_eq!(decoder.next_envelope(), Err(FramingError::TooLarge(5, 4)));
        let mut decoder = EnvelopeDecoder::new(16);
        decoder.push(&encode_envelope(FLAG_COMPRESSED, b"1"));
        assert_eq!(decoder.next_envelope(), Err(FramingError::Compressed));
        let mut decoder = EnvelopeDecoder::new(16);
        decoder.push(&encode_envelope(0, b"1234")[..7]);
        assert_eq!(decoder.next_envelope(), Ok(None));
        assert_eq!(decoder.finish(), Err(FramingError::Truncated(7)));
    }

    #[test]
    fn errors_inside_a_stream_ride_the_end_frame() {
        let error = ConnectError::new(Code::DeadlineExceeded, "process timed out");
        let frame = end_stream_envelope(Some(&error));
        let mut decoder = EnvelopeDecoder::new(1024);
        decoder.push(&frame);
        let envelope = decoder.next_envelope().unwrap().unwrap();
        assert!(envelope.is_end_stream());
        let end: EndStream = serde_json::from_slice(&envelope.payload).unwrap();
        assert_eq!(end.error, Some(error));
        assert_eq!(
            std::str::from_utf8(&envelope.payload).unwrap(),
            r#"{"error":{"code":"deadline_exceeded","message":"process timed out"}}"#
        );
    }

    #[test]
    fn zero_exit_code_is_left_out_and_read_back_as_zero() {
        let clean = ProcessEventMessage {
            event: ProcessEvent::End(EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None,
            }),
        };
        let json = serde_json::to_string(&clean).unwrap();
        assert_eq!(
            json,
            r#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#
        );
        assert_eq!(
            serde_json::from_str::<ProcessEventMessage>(&json).unwrap(),
            clean
        );
        let killed: ProcessEventMessage =
            serde_json::from_str(r#"{"event":{"end":{"exitCode":-1,"status":"signal: killed"}}}"#)
                .unwrap();
        assert_eq!(
            killed.event,
            ProcessEvent::End(EndEvent {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: None
            })
        );
    }

    #[test]
    fn bytes_are_base64_and_int64_are_strings() {
        let data = ProcessEventMessage {
            event: ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let entry: EntryInfo = serde_json::from_str(
            r#"{"name":"a","type":"FILE_TYPE_FILE","path":"/a","size":"12345","mode":420}"#,
        )
        .unwrap();
        assert_eq!(entry.size, 12345);
        assert!(
            serde_json::to_string(&entry)
                .unwrap()
                .contains(r#""size":"12345""#)
        );
        let numeric: EntryInfo =
            serde_json::from_str(r#"{"name":"a","type":"FILE_TYPE_FILE","path":"/a","size":7}"#)
                .unwrap();
        assert_eq!(numeric.size, 7);
    }

    #[test]
    fn the_fast_path_agrees_with_serde() {
        let events = [
            ProcessEvent::Data(DataEvent::Stdout(b"out\x00\xff".to_vec())),
            ProcessEvent::Data(DataEvent::Stderr(Vec::new())),
            ProcessEvent::Data(DataEvent::Pty(b"p".to_vec())),
            ProcessEvent::Start(StartEvent { pid: 3 }),
            ProcessEvent::End(EndEvent::default()),
        ];
        for event in events {
            let json = serde_json::to_vec(&ProcessEventMessage {
                event: event.clone(),
            })
            .unwrap();
            assert_eq!(decode_process_event(&json).unwrap(), event);
        }
        let spaced = br#"{"event": {"data": {"stdout": "aGkK"}}}"#;
        assert_eq!(
            decode_process_event(spaced).unwrap(),
            ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec()))
        );
        assert!(decode_process_event(br#"{"event":{"data":{"stdout":"!!"}}}"#).is_err());
    }

    #[test]
    fn selectors_and_signals_use_proto_names() {
        let request = SendSignalRequest {
            process: ProcessSelector::Tag("job".into()),
            signal: Signal::Sigkill,
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"process":{"tag":"job"},"signal":"SIGNAL_SIGKILL"}"#
        );
        let by_pid: ConnectRequest = serde_json::from_str(r#"{"process":{"pid":42}}"#).unwrap();
        assert_eq!(by_pid.process, ProcessSelector::Pid(42));
    }

    #[test]
    fn plain_http_errors_map_like_the_sdk() {
        assert_eq!(Code::from_http_status(502), Code::Unavailable);
        assert_eq!(Code::from_http_status(429), Code::ResourceExhausted);
        assert_eq!(Code::from_http_status(504), Code::DeadlineExceeded);
        for code in [Code::NotFound, Code::Unauthenticated, Code::InvalidArgument] {
            assert_eq!(Code::from_http_status(code.http_status()), code);
        }
    }
}

/// `POST /init`: what the server hands envd inside a sandbox pod once the pod runs, so
/// that neither the sandbox's variables nor its access token appear in the Pod object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
}
