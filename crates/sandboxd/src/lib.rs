//! The embedded E2B-compatible sandbox server ("sandboxd"): the control-plane REST API and
//! envd on two loopback listeners, running each sandbox as a local process tree isolated
//! with bubblewrap when it is installed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
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
    /// Host directories every sandbox sees read-only at the same path: agent CLIs
    /// installed outside `/usr`, for instance.
    pub host_paths: Vec<PathBuf>,
    /// Keeps every sandbox's life for [`Sandboxd::history`]. Off by default: the record
    /// grows with every sandbox a long-running server makes.
    pub keep_history: bool,
    /// The lifetime a sandbox gets when traffic resumes it (E2B's `autoResume`).
    pub default_resume_timeout: Duration,
    /// How often each sandbox's usage is sampled for the metrics API.
    pub metrics_interval: Duration,
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
            host_paths: Vec::new(),
            keep_history: false,
            default_resume_timeout: Duration::from_secs(300),
            metrics_interval: Duration::from_secs(5),
        }
    }
}

mod api;
mod cgroup;
mod envd;
#[cfg(feature = "faults")]
mod faults;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod metrics;
mod pod;
mod runtime;
mod templates;
mod watchers;

#[cfg(feature = "faults")]
pub use faults::{Fault, FaultPlan, Faults, Injected, RandomFaults};
#[cfg(feature = "kubernetes")]
pub use kubernetes::{BuilderConfig, KubeConfig, KubeSandboxd};
pub use pod::{PodEnvdConfig, serve_pod_envd};

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;

use runtime::{Launcher, ProcessTable, User};
use sandcastle_e2b::models::SandboxState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "bubblewrap (bwrap) is required by --isolation=bubblewrap but is not on PATH or cannot create namespaces here"
    )]
    BubblewrapMissing,
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Kubernetes(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running embedded server. Dropping it without [`Sandboxd::stop`] leaves the sandboxes'
/// processes to die with the process (they are started with a parent-death signal).
pub struct Sandboxd {
    api_addr: SocketAddr,
    envd_addr: SocketAddr,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Sandboxd {
    pub async fn start(config: Config) -> Result<Sandboxd, Error> {
        let bwrap = find_on_path("bwrap").filter(|bwrap| bubblewrap_works(bwrap));
        let launcher = match (config.isolation, bwrap) {
            (Isolation::None, _) => Launcher::Host,
            (_, Some(bwrap)) => Launcher::Bubblewrap {
                bwrap,
                network: config.network,
                host_paths: config.host_paths.clone(),
                accounts: config.root.join("accounts"),
            },
            (Isolation::Bubblewrap, None) => return Err(Error::BubblewrapMissing),
            (Isolation::Auto, None) => Launcher::Host,
        };
        if !launcher.is_isolated() {
            tracing::warn!(
                "sandboxes run WITHOUT isolation: bubblewrap (bwrap) is not in use, so sandbox processes see the host filesystem and network"
            );
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        for dir in ["sandboxes", "templates", "uploads", "accounts"] {
            let path = config.root.join(dir);
            std::fs::create_dir_all(&path).map_err(io(&path))?;
        }
        for (name, content) in runtime::account_files() {
            let path = config.root.join("accounts").join(name);
            std::fs::write(&path, content).map_err(io(&path))?;
        }
        // Sandboxes do not outlive the server that ran their processes.
        let sandboxes_dir = config.root.join("sandboxes");
        std::fs::remove_dir_all(&sandboxes_dir).map_err(io(&sandboxes_dir))?;
        std::fs::create_dir_all(&sandboxes_dir).map_err(io(&sandboxes_dir))?;
        let templates = templates::Registry::load(&config.root).map_err(io(&config.root))?;

        let api_listener = bind(config.listen, config.api_port).await?;
        let envd_listener = bind(config.listen, config.envd_port).await?;
        let api_addr = api_listener.local_addr().map_err(|source| Error::Listen {
            addr: SocketAddr::new(config.listen, config.api_port),
            source,
        })?;
        let envd_addr = envd_listener.local_addr().map_err(|source| Error::Listen {
            addr: SocketAddr::new(config.listen, config.envd_port),
            source,
        })?;
        let cgroups = match cgroup::Cgroups::prepare() {
            Ok(cgroups) => Some(cgroups),
            Err(reason) => {
                tracing::warn!(%reason, "sandboxes' CPU and memory limits are NOT enforced and pause with memory is refused: no cgroups");
                None
            }
        };
        let (shutdown, stopped) = watch::channel(false);
        let state = Arc::new(State {
            cgroups,
            stopping: stopped.clone(),
            api_url: format!("http://{api_addr}"),
            config,
            launcher,
            #[cfg(feature = "faults")]
            faults: Faults::default(),
            sandboxes: Mutex::new(HashMap::new()),
            history: Mutex::default(),
            templates,
            upload_secret: random_token(32),
        });
        let servers = vec![
            serve(api_listener, api::router(state.clone()), stopped.clone()),
            serve(envd_listener, envd::router(state.clone()), stopped.clone()),
            tokio::spawn(reap_expired(state.clone(), stopped.clone())),
            tokio::spawn(metrics::sample_usage(state.clone(), stopped)),
        ];
        state.templates.resume_interrupted(&state);
        tracing::info!(api = %api_addr, envd = %envd_addr, isolated = state.launcher.is_isolated(), "embedded sandbox server listening");
        Ok(Sandboxd {
            api_addr,
            envd_addr,
            state,
            shutdown,
            servers,
        })
    }

    /// The control-plane base URL (what `E2B_API_URL` points at).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The envd base URL shared by every sandbox (what `E2B_SANDBOX_URL` points at); requests
    /// name their sandbox with the `E2b-Sandbox-Id` header.
    pub fn sandbox_url(&self) -> String {
        format!("http://{}", self.envd_addr)
    }

    pub fn is_isolated(&self) -> bool {
        self.state.launcher.is_isolated()
    }

    #[cfg(feature = "faults")]
    pub fn faults(&self) -> Faults {
        self.state.faults.clone()
    }

    /// Every sandbox this server made, in the order they were made, with when each ended
    /// (killed, timed out or vanished); empty unless [`Config::keep_history`] is set. This
    /// is the server's own account, for tests that check what its clients did: how many
    /// sandboxes they made and whether two ever overlapped.
    pub fn history(&self) -> Vec<SandboxLife> {
        self.state.history.lock().expect("history").clone()
    }

    /// Stops listening and kills every sandbox.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        let ids: Vec<String> = self
            .state
            .sandboxes
            .lock()
            .expect("sandboxes")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.state.kill_sandbox(&id).await;
        }
        if let Some(cgroups) = &self.state.cgroups {
            cgroups.remove();
        }
    }
}

pub(crate) struct State {
    config: Config,
    /// Turns true when the server stops: streams that would never end by themselves
    /// (a directory watch) end then, so the graceful shutdown does not wait for them.
    stopping: watch::Receiver<bool>,
    api_url: String,
    launcher: Launcher,
    #[cfg(feature = "faults")]
    faults: Faults,
    sandboxes: Mutex<HashMap<String, Arc<SandboxRecord>>>,
    history: Mutex<Vec<SandboxLife>>,
    templates: templates::Registry,
    /// Where sandboxes' cgroups go; `None` where the server cannot make them.
    cgroups: Option<cgroup::Cgroups>,
    /// Signs the upload links handed out for COPY sources, in place of a storage bucket's
    /// presigned URLs.
    upload_secret: String,
}

/// One sandbox's life on the server: from the moment it is registered by its create to
/// the moment it is removed.
#[derive(Clone, Debug)]
pub struct SandboxLife {
    pub sandbox_id: String,
    pub metadata: BTreeMap<String, String>,
    pub created: std::time::Instant,
    /// `None` while it lives.
    pub ended: Option<std::time::Instant>,
}

/// A live sandbox: its root directory, identity and processes.
pub(crate) struct SandboxRecord {
    id: String,
    template_id: String,
    alias: Option<String>,
    started_at: jiff::Timestamp,
    end_at: Mutex<jiff::Timestamp>,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    access_token: Option<String>,
    default_user: User,
    default_workdir: Option<String>,
    cpu_count: u32,
    memory_mb: u32,
    /// The sandbox's root as the server sees it: `/` for envd inside a pod.
    fs: PathBuf,
    /// What the server made for the sandbox and removes with it; none for envd inside a
    /// pod, whose filesystem ends with its container.
    dir: Option<PathBuf>,
    processes: Arc<ProcessTable>,
    /// envd's filesystem watchers, which end with the sandbox.
    watchers: watchers::Watchers,
    /// Its CPU and memory limits, usage and freezer; `None` where the server has no
    /// cgroups to give (the limits are then not enforced) and for envd in a pod.
    group: Option<Arc<cgroup::Group>>,
    lifecycle: Lifecycle,
    paused: Mutex<Option<Pause>>,
    /// Usage samples for the metrics API, oldest first.
    samples: Mutex<std::collections::VecDeque<metrics::Sample>>,
}

/// What happens at the sandbox's timeout and to traffic while it is paused, as E2B's
/// `autoPause` and `autoResume` say.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Lifecycle {
    pub pause_on_timeout: bool,
    /// Whether that pause keeps the processes (E2B's `autoPauseMemory`).
    pub pause_keeps_memory: bool,
    pub auto_resume: bool,
}

/// How a paused sandbox was paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Its processes frozen in memory (the cgroup freezer); they go on at resume.
    Memory,
    /// Its processes killed and its files kept.
    Filesystem,
}

impl SandboxRecord {
    fn fs(&self) -> PathBuf {
        self.fs.clone()
    }

    fn state(&self) -> SandboxState {
        match *self.paused.lock().expect("paused") {
            Some(_) => SandboxState::Paused,
            None => SandboxState::Running,
        }
    }

    fn is_paused(&self) -> bool {
        self.paused.lock().expect("paused").is_some()
    }

    /// Pauses the sandbox: with `memory`, its processes are frozen; without, they are
    /// killed and only its files are kept. False if it was already paused.
    fn pause(&self, memory: bool) -> Result<bool, String> {
        let mut paused = self.paused.lock().expect("paused");
        if paused.is_some() {
            return Ok(false);
        }
        if memory {
            let group = self.group.as_ref().ok_or(
                "pausing with memory needs the cgroup freezer, which this server has not got (see its log at start); pause with memory=false keeps the files only",
            )?;
            group
                .freeze(true)
                .map_err(|error| format!("cannot freeze the sandbox: {error}"))?;
            *paused = Some(Pause::Memory);
        } else {
            self.processes.kill_all();
            *paused = Some(Pause::Filesystem);
        }
        Ok(true)
    }

    /// Resumes a paused sandbox. False if it was running.
    fn resume(&self) -> Result<bool, String> {
        let mut paused = self.paused.lock().expect("paused");
        match *paused {
            None => return Ok(false),
            Some(Pause::Memory) => {
                if let Some(group) = &self.group {
                    group
                        .freeze(false)
                        .map_err(|error| format!("cannot thaw the sandbox: {error}"))?;
                }
            }
            Some(Pause::Filesystem) => self.processes.restart(),
        }
        *paused = None;
        Ok(true)
    }
}

impl State {
    fn sandbox(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        self.sandboxes.lock().expect("sandboxes").get(id).cloned()
    }

    /// Registers a new sandbox, unless the server is at its limit of live ones.
    fn add_sandbox(&self, record: Arc<SandboxRecord>) -> Result<(), usize> {
        let mut sandboxes = self.sandboxes.lock().expect("sandboxes");
        if sandboxes.len() >= self.config.max_sandboxes {
            return Err(self.config.max_sandboxes);
        }
        if self.config.keep_history {
            self.history.lock().expect("history").push(SandboxLife {
                sandbox_id: record.id.clone(),
                metadata: record.metadata.clone(),
                created: std::time::Instant::now(),
                ended: None,
            });
        }
        sandboxes.insert(record.id.clone(), record);
        Ok(())
    }

    fn record_end(&self, id: &str) {
        if !self.config.keep_history {
            return;
        }
        let mut history = self.history.lock().expect("history");
        if let Some(life) = history.iter_mut().rev().find(|life| life.sandbox_id == id) {
            life.ended = Some(std::time::Instant::now());
        }
    }

    /// The sandbox an envd request is for: a paused one is resumed when its lifecycle
    /// says traffic resumes it, and is otherwise not there for envd.
    fn live_sandbox(&self, id: &str) -> Option<Arc<SandboxRecord>> {
        let sandbox = self.sandbox(id)?;
        if sandbox.is_paused() {
            if !sandbox.lifecycle.auto_resume {
                return None;
            }
            if let Err(failure) = sandbox.resume() {
                tracing::warn!(sandbox = id, %failure, "cannot resume the sandbox on traffic");
                return None;
            }
            let timeout = self.config.default_resume_timeout;
            *sandbox.end_at.lock().expect("end") = api::deadline(timeout);
            tracing::info!(sandbox = id, "sandbox resumed by traffic");
        }
        Some(sandbox)
    }

    /// Removes the sandbox, kills its processes and deletes its files. False if unknown.
    async fn kill_sandbox(&self, id: &str) -> bool {
        self.end_sandbox(id, || {}).await
    }

    /// [`State::kill_sandbox`], calling `removed` as the sandbox is removed: no request
    /// sees it gone before that call.
    async fn end_sandbox(&self, id: &str, removed: impl FnOnce()) -> bool {
        let removed = {
            let mut sandboxes = self.sandboxes.lock().expect("sandboxes");
            sandboxes.remove(id).inspect(|_| {
                removed();
                self.record_end(id);
            })
        };
        let Some(sandbox) = removed else {
            return false;
        };
        sandbox.processes.kill_all();
        if let Some(group) = &sandbox.group {
            group.remove().await;
        }
        if let Some(dir) = sandbox.dir.clone() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        tracing::info!(sandbox = id, "sandbox killed");
        true
    }
}

async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, Error> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
}

fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    use axum::serve::ListenerExt;
    // Output streams end each envelope with a short segment; with Nagle on it would wait
    // for the peer's delayed ACK.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            })
            .await;
    })
}

async fn reap_expired(state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let now = jiff::Timestamp::now();
        let expired: Vec<Arc<SandboxRecord>> = state
            .sandboxes
            .lock()
            .expect("sandboxes")
            .values()
            .filter(|sandbox| !sandbox.is_paused() && *sandbox.end_at.lock().expect("end") <= now)
            .cloned()
            .collect();
        for sandbox in expired {
            if sandbox.lifecycle.pause_on_timeout {
                match sandbox.pause(sandbox.lifecycle.pause_keeps_memory) {
                    Ok(_) => {
                        tracing::info!(sandbox = %sandbox.id, "sandbox timed out and was paused");
                        continue;
                    }
                    Err(failure) => {
                        tracing::warn!(sandbox = %sandbox.id, %failure, "cannot pause a timed-out sandbox; killing it");
                    }
                }
            }
            tracing::info!(sandbox = %sandbox.id, "sandbox timed out");
            state.kill_sandbox(&sandbox.id).await;
        }
    }
}

/// Hosts can forbid unprivileged user namespaces; a sandbox that cannot start is worse
/// than a warning, so bubblewrap is tried once before it is relied on.
fn bubblewrap_works(bwrap: &Path) -> bool {
    let works = std::process::Command::new(bwrap)
        .args([
            "--unshare-user",
            "--unshare-pid",
            "--ro-bind",
            "/",
            "/",
            "true",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !works {
        tracing::warn!(bwrap = %bwrap.display(), "bubblewrap is installed but cannot create namespaces here");
    }
    works
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// Lower-case alphanumerics, the alphabet of E2B's sandbox and template IDs.
fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn random_token(len: usize) -> String {
    random_id(len)
}

/// A version-4 UUID, the shape of E2B's build IDs.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
