//! Where an E2B service is and how to talk to it: what the control-plane client and the
//! envd client share, so neither needs the other for it.

use std::fmt;
use std::time::Duration;

use super::retry::RetryPolicy;
use super::secret::Secret;

pub const DEFAULT_DOMAIN: &str = "e2b.app";
/// The per-sandbox host the E2B edge routes by its leftmost label.
pub const DEFAULT_SANDBOX_URL: &str = "https://{port}-{sandboxId}.{domain}";

/// Where the service is and how to talk to it.
#[derive(Clone)]
pub struct ClientConfig {
    /// The REST API base, e.g. `https://api.e2b.app`.
    pub api_url: String,
    /// The envd base of a sandbox: a pattern with `{port}`, `{sandboxId}` and `{domain}`, or
    /// a fixed base without placeholders that routes by the `E2b-Sandbox-*` headers.
    pub sandbox_url: String,
    /// Fills `{domain}` when the sandbox does not name its own.
    pub domain: String,
    pub api_key: Secret,
    /// Bounds each unary request (control plane and envd); streams are bounded by
    /// `stream_idle_timeout` instead.
    pub request_timeout: Duration,
    /// A process stream that delivers nothing (not even a keepalive) for this long is
    /// considered cut. envd sends keepalives every 50 s when asked, as this client does.
    pub stream_idle_timeout: Duration,
    /// Upper bound for one upload: a presigned tar or a file written into a sandbox.
    pub upload_timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    /// Told the outcome of every control-plane request attempt (metrics).
    pub observer: Option<RequestObserver>,
}

/// Receives the HTTP status of each control-plane request attempt, or `None` when no
/// answer came back.
#[derive(Clone)]
pub struct RequestObserver(std::sync::Arc<dyn Fn(Option<u16>) + Send + Sync>);

impl RequestObserver {
    pub fn new(observe: impl Fn(Option<u16>) + Send + Sync + 'static) -> Self {
        RequestObserver(std::sync::Arc::new(observe))
    }

    /// Tells the observer how one attempt went.
    pub(crate) fn observe(&self, status: Option<u16>) {
        (self.0)(status)
    }
}

impl ClientConfig {
    /// The hosted service at the default domain.
    pub fn new(api_key: impl Into<Secret>) -> Self {
        ClientConfig::for_domain(DEFAULT_DOMAIN, api_key)
    }

    pub fn for_domain(domain: &str, api_key: impl Into<Secret>) -> Self {
        ClientConfig {
            api_url: format!("https://api.{domain}"),
            sandbox_url: DEFAULT_SANDBOX_URL.into(),
            domain: domain.into(),
            api_key: api_key.into(),
            request_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(120),
            upload_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            observer: None,
        }
    }

    /// A server at fixed URLs, such as the embedded one or a local envd.
    pub fn with_urls(
        api_url: impl Into<String>,
        sandbox_url: impl Into<String>,
        api_key: impl Into<Secret>,
    ) -> Self {
        ClientConfig {
            api_url: api_url.into(),
            sandbox_url: sandbox_url.into(),
            ..ClientConfig::new(api_key)
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("api_url", &self.api_url)
            .field("sandbox_url", &self.sandbox_url)
            .field("domain", &self.domain)
            .field("api_key", &self.api_key)
            .field("request_timeout", &self.request_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The envd base URL of a sandbox, from the configured pattern.
pub fn sandbox_base_url(pattern: &str, port: u16, sandbox_id: &str, domain: &str) -> String {
    pattern
        .replace("{port}", &port.to_string())
        .replace("{sandboxId}", sandbox_id)
        .replace("{domain}", domain)
        .trim_end_matches('/')
        .to_owned()
}
