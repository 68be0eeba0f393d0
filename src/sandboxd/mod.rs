//! The embedded E2B-compatible sandbox server ("sandboxd"): the control-plane REST API and
//! envd on two loopback listeners, running each sandbox as a local process tree isolated
//! with bubblewrap when it is installed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// How sandboxes are isolated from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Bubblewrap when `bwrap` is on PATH, else none (with a warning).
    Auto,
    /// Bubblewrap or refuse to start.
    Bubblewrap,
    /// Plain child processes; sandboxes share the host's view of the filesystem.
    None,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Holds templates, sandboxes and uploads; created if missing.
    pub root: PathBuf,
    pub listen: IpAddr,
    /// 0 picks a free port.
    pub api_port: u16,
    /// 0 picks a free port.
    pub envd_port: u16,
    /// The only accepted `X-API-Key`; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    pub isolation: Isolation,
    /// Whether sandboxes share the host network (otherwise a private, empty one).
    pub network: bool,
    pub max_sandboxes: usize,
    /// Request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// The longest sandbox lifetime a create or set-timeout may ask for.
    pub max_timeout: Duration,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Config {
            root: root.into(),
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_port: 0,
            envd_port: 0,
            api_key: None,
            isolation: Isolation::Auto,
            network: true,
            max_sandboxes: 100,
            max_body_bytes: 512 << 20,
            max_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// Faults a test can switch on; all off by default. Each counter is consumed per request.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// The next N control-plane requests answer 429 with `Retry-After`.
    pub rate_limited: u32,
    pub retry_after_secs: u32,
    /// The next N control-plane requests answer 503.
    pub unavailable: u32,
    /// Added before every request is handled.
    pub latency: Duration,
    /// The next N process streams are cut (connection dropped, no end frame) after their
    /// first output.
    pub cut_streams: u32,
    /// The next N creates make a sandbox that vanishes this long after it starts.
    pub vanish_after: Option<(u32, Duration)>,
}
