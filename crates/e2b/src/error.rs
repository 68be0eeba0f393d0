//! Errors of the E2B client, classified so callers can tell a flaky or misconfigured service
//! (infrastructure) from a request the user got wrong, and what is worth retrying.

use std::time::Duration;

use super::envd::{Code, ConnectError};
use super::models::ApiError;
use super::secret::Secret;

/// Server messages are kept short: a proxy may answer with a whole HTML page.
const MAX_MESSAGE_CHARS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 401: the API key (or an envd access token) was refused.
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },
    /// 403: the resource exists but belongs to someone else, or the key may not touch it.
    #[error("forbidden: {message}")]
    Forbidden { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    /// 429, from the per-team limiter or the concurrency cap.
    #[error("rate limited{}: {message}", retry_after_suffix(*.retry_after))]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// 502, 503 or 504: the service or its edge could not serve the request right now.
    #[error("service unavailable (HTTP {status}): {message}")]
    Unavailable { status: u16, message: String },
    /// Any other 4xx: the request itself was wrong.
    #[error("invalid request (HTTP {status}): {message}")]
    InvalidRequest { status: u16, message: String },
    #[error("conflict: {message}")]
    Conflict { message: String },
    /// A template delete refused because running or paused sandboxes still use it; the
    /// service answers 400 for this, but it clears once those sandboxes are gone.
    #[error("template still in use: {message}")]
    TemplateInUse { message: String },
    /// Any other 5xx.
    #[error("server error (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    /// The request never got an HTTP answer: DNS, connect, TLS, reset, timeout.
    #[error("transport: {0}")]
    Transport(#[source] reqwest::Error),
    /// A stream ended before the protocol said it was over (cut connection, idle timeout).
    #[error("stream interrupted: {0}")]
    StreamInterrupted(String),
    /// A deadline of this client ran out (for example waiting for a build).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer answered something this client cannot make sense of.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An error from envd (or the proxy in front of it), in Connect's vocabulary.
    #[error("envd: {0}")]
    Envd(ConnectError),
    /// Rejected locally before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn retry_after_suffix(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!(" (retry after {}s)", wait.as_secs()),
        None => String::new(),
    }
}

impl Error {
    /// Whether the same call may succeed later without anything else changing.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited { .. }
            | Error::Unavailable { .. }
            | Error::TemplateInUse { .. }
            | Error::StreamInterrupted(_)
            | Error::Timeout(_) => true,
            Error::Transport(error) => !error.is_builder() && !error.is_decode(),
            _ if self.is_sandbox_gone() => false,
            Error::Envd(error) => matches!(
                error.code,
                Code::Unavailable | Code::ResourceExhausted | Code::Aborted
            ),
            Error::Server { status, .. } => *status != 501,
            Error::Unauthorized { .. }
            | Error::Forbidden { .. }
            | Error::NotFound { .. }
            | Error::InvalidRequest { .. }
            | Error::Conflict { .. }
            | Error::Protocol(_)
            | Error::InvalidArgument(_) => false,
        }
    }

    /// Whether the fault lies with the service, the network or this operator's setup (a
    /// refused API key, an incompatible server) rather than with what the user asked for.
    /// `NotFound` counts as a user-level fact: the caller knows whether the thing should
    /// still exist.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            Error::Unauthorized { .. }
            | Error::RateLimited { .. }
            | Error::Unavailable { .. }
            | Error::Server { .. }
            | Error::Transport(_)
            | Error::StreamInterrupted(_)
            | Error::Timeout(_)
            | Error::Protocol(_) => true,
            Error::Envd(error) => matches!(
                error.code,
                Code::Unauthenticated
                    | Code::ResourceExhausted
                    | Code::Unavailable
                    | Code::Canceled
                    | Code::Unknown
                    | Code::Internal
                    | Code::DataLoss
                    | Code::Unimplemented
            ),
            Error::Forbidden { .. }
            | Error::NotFound { .. }
            | Error::InvalidRequest { .. }
            | Error::Conflict { .. }
            | Error::TemplateInUse { .. }
            | Error::InvalidArgument(_) => false,
        }
    }

    /// Whether envd's proxy said the sandbox no longer exists (killed, timed out, lost):
    /// retrying cannot help, only a new sandbox can. The proxy says so with a 502 whose
    /// message is "The sandbox was not found", which the SDK reads the same way.
    pub fn is_sandbox_gone(&self) -> bool {
        matches!(self, Error::Envd(error)
            if error.code == Code::Unavailable && error.message.contains("was not found"))
    }

    /// The wait the server asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether this is a "no such sandbox/template/process/file" answer, in either plane.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::NotFound { .. } => true,
            Error::Envd(error) => error.code == Code::NotFound,
            _ => false,
        }
    }
}

/// Shortens text from a peer and removes any secret it may echo.
pub(crate) fn clean_message(text: &str, secrets: &[&Secret]) -> String {
    let mut message = text.trim().to_owned();
    for secret in secrets {
        message = secret.scrub(&message);
    }
    if message.chars().count() > MAX_MESSAGE_CHARS {
        message = message.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
    }
    message
}

/// Maps a failed control-plane answer to an [`Error`]. The body is usually the API's
/// `{"code","message"}` but may be anything a proxy or load balancer produces.
pub(crate) fn api_error(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    secrets: &[&Secret],
) -> Error {
    let raw = match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let message = clean_message(&raw, secrets);
    match status {
        400 if is_in_use_message(&message) => Error::TemplateInUse { message },
        401 => Error::Unauthorized { message },
        403 => Error::Forbidden { message },
        404 => Error::NotFound { message },
        409 => Error::Conflict { message },
        429 => Error::RateLimited {
            retry_after,
            message,
        },
        502..=504 => Error::Unavailable { status, message },
        500..=599 => Error::Server { status, message },
        _ => Error::InvalidRequest { status, message },
    }
}

/// The service words it "cannot delete template '…' because there are running (or paused)
/// sandboxes using it"; other implementations say "still in use".
fn is_in_use_message(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("sandboxes using it") || lower.contains("in use")
}

/// Maps a failed envd answer (unary RPC or `/files`) to a Connect error. envd itself sends
/// `{"code":"not_found","message":…}` for RPCs and `{"code":404,"message":…}` for `/files`;
/// the sandbox proxy in front of it sends plain JSON or text, which Connect clients classify
/// by HTTP status.
pub(crate) fn envd_error(status: u16, body: &[u8], secrets: &[&Secret]) -> ConnectError {
    #[derive(serde::Deserialize)]
    struct Loose {
        #[serde(default)]
        code: serde_json::Value,
        #[serde(default)]
        message: Option<String>,
    }
    let (code, raw) = match serde_json::from_slice::<Loose>(body) {
        Ok(loose) => {
            let code = serde_json::from_value::<Code>(loose.code)
                .unwrap_or_else(|_| Code::from_http_status(status));
            (code, loose.message.unwrap_or_default())
        }
        Err(_) => (
            Code::from_http_status(status),
            String::from_utf8_lossy(body).into_owned(),
        ),
    };
    let message = clean_message(&raw, secrets);
    let message = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        message
    };
    ConnectError::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_statuses_map_to_variants() {
        let body = br#"{"code":429,"message":"Rate limit exceeded"}"#;
        let error = api_error(429, Some(Duration::from_secs(2)), body, &[]);
        assert!(matches!(
            &error,
            Error::RateLimited { retry_after: Some(wait), message }
                if *wait == Duration::from_secs(2) && message == "Rate limit exceeded"
        ));
        assert_eq!(
            error.to_string(),
            "rate limited (retry after 2s): Rate limit exceeded"
        );
        assert!(matches!(
            api_error(404, None, b"{}", &[]),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            api_error(401, None, b"", &[]),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            api_error(503, None, b"<html>busy</html>", &[]),
            Error::Unavailable { status: 503, message } if message == "<html>busy</html>"
        ));
        assert!(matches!(
            api_error(500, None, b"", &[]),
            Error::Server { status: 500, .. }
        ));
        assert!(matches!(
            api_error(422, None, b"", &[]),
            Error::InvalidRequest { status: 422, .. }
        ));
    }

    #[test]
    fn template_in_use_is_a_distinct_retryable_user_error() {
        let body = br#"{"code":400,"message":"cannot delete template 'x' because there are paused sandboxes using it"}"#;
        let error = api_error(400, None, body, &[]);
        assert!(matches!(error, Error::TemplateInUse { .. }));
        assert!(error.is_retryable());
        assert!(!error.is_infrastructure());
        let plain = api_error(400, None, br#"{"code":400,"message":"bad name"}"#, &[]);
        assert!(matches!(plain, Error::InvalidRequest { status: 400, .. }));
        assert!(!plain.is_retryable());
    }

    #[test]
    fn classification_separates_infrastructure_from_user_errors() {
        let infra = [
            api_error(429, None, b"", &[]),
            api_error(503, None, b"", &[]),
            api_error(500, None, b"", &[]),
            api_error(401, None, b"", &[]),
            Error::StreamInterrupted("cut".into()),
            Error::Envd(ConnectError::new(
                Code::Unavailable,
                "sandbox was not found",
            )),
        ];
        for error in &infra {
            assert!(error.is_infrastructure(), "{error}");
        }
        let user = [
            api_error(400, None, b"", &[]),
            api_error(404, None, b"", &[]),
            api_error(409, None, b"", &[]),
            Error::Envd(ConnectError::new(Code::InvalidArgument, "cwd missing")),
            Error::Envd(ConnectError::new(Code::NotFound, "no such file")),
            Error::InvalidArgument("path".into()),
        ];
        for error in &user {
            assert!(!error.is_infrastructure(), "{error}");
            assert!(!error.is_retryable(), "{error}");
        }
        assert!(api_error(429, None, b"", &[]).is_retryable());
        assert!(api_error(504, None, b"", &[]).is_retryable());
        assert!(!api_error(401, None, b"", &[]).is_retryable());
        assert!(Error::Envd(ConnectError::new(Code::NotFound, "")).is_not_found());
    }

    #[test]
    fn echoed_secrets_are_scrubbed_and_long_bodies_cut() {
        let key = Secret::new("e2b_supersecret");
        let body = br#"{"code":401,"message":"Invalid API key e2b_supersecret"}"#;
        let error = api_error(401, None, body, &[&key]);
        assert_eq!(
            error.to_string(),
            "unauthorized: Invalid API key <redacted>"
        );
        let long = "x".repeat(5000);
        let error = api_error(502, None, long.as_bytes(), &[]);
        assert!(error.to_string().len() < 700);
    }

    #[test]
    fn envd_errors_parse_connect_bodies_and_fall_back_to_status() {
        let connect = envd_error(
            404,
            br#"{"code":"not_found","message":"process with pid 7 not found"}"#,
            &[],
        );
        assert_eq!(
            connect,
            ConnectError::new(Code::NotFound, "process with pid 7 not found")
        );
        let proxy = envd_error(
            502,
            br#"{"sandboxId":"abc","message":"The sandbox was not found","code":502}"#,
            &[],
        );
        assert_eq!(
            proxy,
            ConnectError::new(Code::Unavailable, "The sandbox was not found")
        );
        let gone = Error::Envd(proxy);
        assert!(gone.is_sandbox_gone() && !gone.is_retryable());
        let blip = Error::Envd(ConnectError::new(
            Code::Unavailable,
            "upstream connect error",
        ));
        assert!(!blip.is_sandbox_gone() && blip.is_retryable());
        let files = envd_error(404, br#"{"code":404,"message":"path not found"}"#, &[]);
        assert_eq!(files.code, Code::NotFound);
        let text = envd_error(429, b"too many connections", &[]);
        assert_eq!(
            text,
            ConnectError::new(Code::ResourceExhausted, "too many connections")
        );
        assert_eq!(
            envd_error(504, b"", &[]),
            ConnectError::new(Code::DeadlineExceeded, "HTTP 504")
        );
        let token = Secret::new("tok-123");
        assert_eq!(
            envd_error(
                401,
                br#"{"code":"unauthenticated","message":"bad token tok-123"}"#,
                &[&token]
            )
            .message,
            "bad token <redacted>"
        );
    }
}
