//! How a sandbox's processes run: its users, the mapping between sandbox paths and host
//! paths, the bubblewrap command line, and the table of processes with their output fan-out.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;

use sandcastle_e2b::envd::{
    Code, ConnectError, DataEvent, EndEvent, ProcessConfig, ProcessEvent, ProcessInfo,
    ProcessSelector,
};

/// The end event's error for a process the kernel killed at the sandbox's memory limit.
pub const OOM_KILLED: &str = "out of memory: the sandbox reached its memory limit (memoryMB) and the kernel killed the process";
/// The PATH every sandbox process starts with, as envd gives it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// envd keeps an exited process's end event this long so a late `Connect` still learns it.
pub const EXIT_RETENTION: Duration = Duration::from_secs(30);
/// Events buffered per subscriber before the process's output waits for the reader.
const SUBSCRIBER_BUFFER: usize = 64;
/// The pipe buffer asked for, and the largest read: one event per read.
const PIPE_SIZE: i32 = 1 << 20;
const READ_CHUNK: usize = PIPE_SIZE as usize;
/// Host directories every sandbox sees read-only; the rest of its root is its own.
const SYSTEM_DIRS: &[&str] = &[
    "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
];
/// Paths inside a sandbox that belong to the kernel or the host, never to the sandbox.
const FOREIGN_DIRS: &[&str] = &["proc", "dev", "sys"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: &'static str,
    pub uid: u32,
    pub home: &'static str,
}

pub const ROOT: User = User {
    name: "root",
    uid: 0,
    home: "/root",
};
pub const DEFAULT_USER: User = User {
    name: "user",
    uid: 1000,
    home: "/home/user",
};

/// The two accounts every sandbox has, like E2B's templates.
pub fn user(name: &str) -> Option<User> {
    match name {
        "root" => Some(ROOT),
        "user" => Some(DEFAULT_USER),
        _ => None,
    }
}

/// The account files the sandbox sees, so `id`, `whoami` and `~` agree with the uid.
pub fn account_files() -> [(&'static str, String); 2] {
    let passwd = format!(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:{uid}:{uid}::/home/user:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        uid = DEFAULT_USER.uid
    );
    let group = format!(
        "root:x:0:\nuser:x:{gid}:\nnogroup:x:65534:\n",
        gid = DEFAULT_USER.uid
    );
    [("passwd", passwd), ("group", group)]
}

/// Creates the directories every sandbox root holds.
pub fn prepare_root(fs: &Path) -> std::io::Result<()> {
    for dir in ["home/user", "root", "tmp", "var/tmp", "opt"] {
        std::fs::create_dir_all(fs.join(dir))?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} is outside the sandbox")]
    Outside(String),
    #[error("path must not be empty")]
    Empty,
}

/// Turns a sandbox path (absolute, or relative to the user's home) into the host path under
/// the sandbox root. `..` cannot climb above the root, system directories are refused, and
/// existing symlinks must resolve inside the root.
pub fn resolve(fs: &Path, home: &str, path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    let joined = if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        Path::new(home).join(path)
    };
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in joined.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if let Some(first) = parts.first().and_then(|part| part.to_str())
        && (SYSTEM_DIRS.contains(&first) || FOREIGN_DIRS.contains(&first))
    {
        return Err(PathError::Outside(path.to_string()));
    }
    let host: PathBuf = parts
        .iter()
        .fold(fs.to_path_buf(), |acc, part| acc.join(part));
    let root = fs.canonicalize().unwrap_or_else(|_| fs.to_path_buf());
    let deepest_existing = host
        .ancestors()
        .take_while(|ancestor| ancestor.starts_with(fs))
        .find_map(|ancestor| ancestor.canonicalize().ok());
    if let Some(real) = deepest_existing
        && !real.starts_with(&root)
    {
        return Err(PathError::Outside(path.to_string()));
    }
    Ok(host)
}

/// The sandbox's view of a host path under its root.
pub fn sandbox_path(fs: &Path, host: &Path) -> String {
    match host.strip_prefix(fs) {
        Ok(relative) => format!("/{}", relative.display()),
        Err(_) => host.display().to_string(),
    }
}

/// How processes are started: inside bubblewrap, or directly on the host.
#[derive(Clone, Debug)]
pub enum Launcher {
    Bubblewrap {
        bwrap: PathBuf,
        network: bool,
        host_paths: Vec<PathBuf>,
        /// The [`account_files`], written once for every sandbox: each sandbox of its own
        /// would cost the filesystem inodes to create and delete, and they never differ.
        accounts: PathBuf,
    },
    Host,
    /// envd inside a sandbox pod: the container is the sandbox, so processes start
    /// directly in it, switching to the caller's uid when envd itself runs as root.
    Container {
        /// envd's own uid: a pod that runs as a non-root user cannot act as another.
        uid: u32,
    },
}

/// Everything needed to start one process in a sandbox.
pub struct Launch<'a> {
    pub fs: &'a Path,
    pub user: &'a User,
    pub cwd: &'a str,
    pub env: BTreeMap<String, String>,
    pub cmd: &'a str,
    pub args: &'a [String],
    pub stdin: bool,
    /// Whether the process gets a terminal. Under bubblewrap it shows as `/dev/console`
    /// (bubblewrap binds the caller's terminal there) and the sandbox keeps its own
    /// `/dev/ptmx`, so `tmux` and `script` work inside.
    pub terminal: bool,
    /// The sandbox's cgroup, which the process joins before it execs.
    pub group: Option<&'a crate::cgroup::Group>,
}

impl Launcher {
    /// Whether the sandbox is kept from the machine that serves it: by bubblewrap, or by
    /// being a container of its own.
    pub fn is_isolated(&self) -> bool {
        matches!(
            self,
            Launcher::Bubblewrap { .. } | Launcher::Container { .. }
        )
    }

    /// Whether processes and files can be handled as `user`.
    pub fn can_act_as(&self, user: &User) -> bool {
        match self {
            Launcher::Container { uid } => *uid == 0 || *uid == user.uid,
            Launcher::Bubblewrap { .. } | Launcher::Host => true,
        }
    }

    pub fn command(&self, launch: &Launch<'_>) -> std::io::Result<Command> {
        let mut command = match self {
            Launcher::Bubblewrap {
                bwrap,
                network,
                host_paths,
                accounts,
            } => {
                let mut command = Command::new(bwrap);
                command.args([
                    "--die-with-parent",
                    "--unshare-user",
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                    "--unshare-cgroup-try",
                    "--hostname",
                    "sandbox",
                ]);
                if !network {
                    command.arg("--unshare-net");
                }
                let id = launch.user.uid.to_string();
                command.args(["--uid", &id, "--gid", &id]);
                command.arg("--bind").arg(launch.fs).arg("/");
                for dir in SYSTEM_DIRS {
                    let host = Path::new("/").join(dir);
                    match std::fs::read_link(&host) {
                        // bwrap would create the link inside the bound root anyway,
                        // and fail the next time; the root keeps its own copy instead.
                        Ok(target) => {
                            let _ = std::os::unix::fs::symlink(target, launch.fs.join(dir));
                        }
                        Err(_) if host.is_dir() => {
                            command.arg("--ro-bind").arg(&host).arg(&host);
                        }
                        Err(_) => {}
                    }
                }
                for path in host_paths {
                    command.arg("--ro-bind").arg(path).arg(path);
                }
                for (name, _) in account_files() {
                    command
                        .arg("--ro-bind")
                        .arg(accounts.join(name))
                        .arg(Path::new("/etc").join(name));
                }
                command.args(["--proc", "/proc", "--dev", "/dev", "--chdir", launch.cwd]);
                command.arg("--").arg(launch.cmd).args(launch.args);
                command
            }
            Launcher::Host => {
                let mut command = Command::new(launch.cmd);
                command.args(launch.args);
                command.current_dir(host_view(launch.fs, launch.cwd));
                command
            }
            Launcher::Container { uid } => {
                let mut command = Command::new(launch.cmd);
                command.args(launch.args).current_dir(launch.cwd);
                if *uid == 0 && launch.user.uid != 0 {
                    command.uid(launch.user.uid).gid(launch.user.uid);
                }
                command
            }
        };
        command.env_clear().envs(&launch.env);
        if matches!(self, Launcher::Host) {
            command.env("HOME", host_view(launch.fs, launch.user.home));
        }
        command
            .stdin(if launch.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A terminal's process leads a session of its own (and so its own group), which
        // it cannot do once it leads a group.
        if !launch.terminal {
            command.process_group(0);
        }
        if let Some(group) = launch.group {
            join_on_start(&mut command, group.join_files()?);
        }
        Ok(command)
    }
}

/// Makes the child join the groups whose `cgroup.procs` files are given, between fork and
/// exec: joined any later, it could fork before it was counted.
#[allow(unsafe_code)]
fn join_on_start(command: &mut Command, procs: Vec<std::fs::File>) {
    use std::io::Write;
    // SAFETY: the closure runs in the forked child before exec. It only calls write(2) on
    // descriptors opened before the fork ("0" names the writer itself), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for mut file in &procs {
                file.write_all(b"0")?;
            }
            Ok(())
        });
    }
}

fn host_view(fs: &Path, sandbox: &str) -> PathBuf {
    fs.join(sandbox.trim_start_matches('/'))
}

/// The environment a process starts with, built from scratch as envd does: the basics, then
/// the sandbox-wide variables, then the request's own, which win.
pub fn process_env(
    user: &User,
    sandbox_env: &BTreeMap<String, String>,
    request_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), user.home.to_string()),
        ("USER".to_string(), user.name.to_string()),
        ("LOGNAME".to_string(), user.name.to_string()),
        ("E2B_SANDBOX".to_string(), "true".to_string()),
    ]);
    env.extend(sandbox_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// envd's view of how a process ended, in Go's words.
pub fn end_event(status: ExitStatus) -> EndEvent {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: None,
        },
        (None, signal) => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("signal: {}", signal_name(signal.unwrap_or(0))),
            error: None,
        },
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        other => format!("signal {other}"),
    }
}

/// One process and the streams attached to it.
pub struct Process {
    pub pid: u32,
    pub config: ProcessConfig,
    pub tag: Option<String>,
    state: Mutex<ProcessState>,
    /// Held across a write, so writes and resizes never interleave.
    input: tokio::sync::Mutex<Option<Input>>,
}

struct ProcessState {
    subscribers: Vec<mpsc::Sender<ProcessEvent>>,
    end: Option<EndEvent>,
}

/// Where a process's input goes.
pub enum Input {
    Pipe(ChildStdin),
    Terminal(pty_process::OwnedWritePty),
}

/// A terminal to start a process on, sized before the process starts.
pub struct Terminal {
    pty: pty_process::Pty,
    pts: pty_process::Pts,
}

impl Terminal {
    pub fn open(cols: u16, rows: u16) -> std::io::Result<Self> {
        let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
        pty.resize(pty_process::Size::new(rows, cols))
            .map_err(std::io::Error::other)?;
        Ok(Terminal { pty, pts })
    }
}

impl Process {
    /// A new stream of this process's events: its output from now on, then its end. A
    /// process that already ended yields only the end.
    pub fn subscribe(&self) -> mpsc::Receiver<ProcessEvent> {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut state = self.state.lock().expect("process state");
        match &state.end {
            Some(end) => {
                let _ = sender.try_send(ProcessEvent::End(end.clone()));
            }
            None => state.subscribers.push(sender),
        }
        receiver
    }

    pub fn has_ended(&self) -> bool {
        self.state.lock().expect("process state").end.is_some()
    }

    pub fn signal(&self, signal: i32) {
        if !self.has_ended() {
            // The process leads its own group; the group reaches everything it started.
            let _ = kill_group(self.pid, signal);
        }
    }

    /// The process's input, for as long as the guard is held; `None` once it was closed
    /// or the process ended.
    pub async fn input(&self) -> tokio::sync::MutexGuard<'_, Option<Input>> {
        self.input.lock().await
    }

    fn drop_input(&self) {
        // A writer holding the input ends it when its write fails.
        if let Ok(mut input) = self.input.try_lock() {
            *input = None;
        }
    }

    /// Sends to every subscriber, waiting on slow ones; with no subscriber the output is
    /// dropped, as envd does.
    async fn publish(&self, event: ProcessEvent) {
        let subscribers = self
            .state
            .lock()
            .expect("process state")
            .subscribers
            .clone();
        let mut gone = false;
        if let Some((last, others)) = subscribers.split_last() {
            for subscriber in others {
                gone |= subscriber.send(event.clone()).await.is_err();
            }
            gone |= last.send(event).await.is_err();
        }
        if gone {
            self.state
                .lock()
                .expect("process state")
                .subscribers
                .retain(|subscriber| !subscriber.is_closed());
        }
    }

    fn abandon(&self) {
        self.state
            .lock()
            .expect("process state")
            .subscribers
            .clear();
        self.drop_input();
    }

    fn finish(&self, end: EndEvent) {
        let subscribers = {
            let mut state = self.state.lock().expect("process state");
            state.end = Some(end.clone());
            std::mem::take(&mut state.subscribers)
        };
        self.drop_input();
        for subscriber in subscribers {
            let end = ProcessEvent::End(end.clone());
            tokio::spawn(async move {
                let _ = subscriber.send(end).await;
            });
        }
    }
}

fn kill_group(pid: u32, signal: i32) -> nix::Result<()> {
    let signal = nix::sys::signal::Signal::try_from(signal)?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal)
}

/// The cgroup whose OOM kills a sandbox's processes are counted against.
pub enum OomCounter {
    /// A local sandbox's own group.
    Group(Arc<crate::cgroup::Group>),
    /// The container envd runs in, at its cgroup mount.
    Container(PathBuf),
}

/// The processes of one sandbox, by pid, with exited ones kept for [`EXIT_RETENTION`].
#[derive(Default)]
pub struct ProcessTable {
    processes: Mutex<HashMap<u32, Arc<Process>>>,
    /// Where the kernel counts the sandbox's OOM kills: a process killed while the count
    /// rose ends with an error that says so.
    oom: Option<OomCounter>,
    /// Set when the sandbox goes away: its processes' streams then break off instead of
    /// reporting an ordinary end, as they do when a real sandbox disappears.
    stopped: std::sync::atomic::AtomicBool,
}

impl ProcessTable {
    pub fn counting_oom(oom: Option<OomCounter>) -> Self {
        ProcessTable {
            oom,
            ..ProcessTable::default()
        }
    }

    fn oom_kills(&self) -> u64 {
        let usage = match &self.oom {
            Some(OomCounter::Group(group)) => group.usage(),
            Some(OomCounter::Container(root)) => crate::cgroup::container_usage(root),
            None => return 0,
        };
        usage.map_or(0, |usage| usage.oom_kills)
    }

    pub fn find(&self, selector: &ProcessSelector) -> Result<Arc<Process>, ConnectError> {
        let processes = self.processes.lock().expect("process table");
        let found = match selector {
            ProcessSelector::Pid(pid) => processes.get(pid).cloned(),
            ProcessSelector::Tag(tag) => processes
                .values()
                .filter(|process| process.tag.as_deref() == Some(tag))
                .max_by_key(|process| !process.has_ended())
                .cloned(),
        };
        found.ok_or_else(|| {
            let what = match selector {
                ProcessSelector::Pid(pid) => format!("process with pid {pid} not found"),
                ProcessSelector::Tag(tag) => format!("process with tag {tag} not found"),
            };
            ConnectError::new(Code::NotFound, what)
        })
    }

    pub fn running(&self) -> Vec<ProcessInfo> {
        let processes = self.processes.lock().expect("process table");
        let mut running: Vec<ProcessInfo> = processes
            .values()
            .filter(|process| !process.has_ended())
            .map(|process| ProcessInfo {
                config: process.config.clone(),
                pid: process.pid,
                tag: process.tag.clone(),
            })
            .collect();
        running.sort_by_key(|info| info.pid);
        running
    }

    pub fn is_tag_running(&self, tag: &str) -> bool {
        self.processes
            .lock()
            .expect("process table")
            .values()
            .any(|process| process.tag.as_deref() == Some(tag) && !process.has_ended())
    }

    /// Starts a process, on `terminal` if given, and returns it with a subscription
    /// taken before any output exists.
    pub fn spawn(
        self: &Arc<Self>,
        mut command: Command,
        terminal: Option<Terminal>,
        config: ProcessConfig,
        tag: Option<String>,
    ) -> std::io::Result<(Arc<Process>, mpsc::Receiver<ProcessEvent>)> {
        let (mut child, screen, input) = match terminal {
            Some(Terminal { pty, pts }) => {
                let child = pty_process::Command::from(command)
                    .spawn(pts)
                    .map_err(std::io::Error::other)?;
                let (screen, keyboard) = pty.into_split();
                (child, Some(screen), Some(Input::Terminal(keyboard)))
            }
            None => {
                let mut child = command.spawn()?;
                let input = child.stdin.take().map(Input::Pipe);
                (child, None, input)
            }
        };
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("process exited before it was tracked"))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for pipe in [
            stdout.as_ref().map(AsFd::as_fd),
            stderr.as_ref().map(AsFd::as_fd),
        ]
        .into_iter()
        .flatten()
        {
            // Fewer, larger reads: each read becomes one event, one envelope and one base64
            // pass. Best effort: the kernel caps it at /proc/sys/fs/pipe-max-size.
            let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        let process = Arc::new(Process {
            pid,
            config,
            tag,
            state: Mutex::new(ProcessState {
                subscribers: Vec::new(),
                end: None,
            }),
            input: tokio::sync::Mutex::new(input),
        });
        let receiver = process.subscribe();
        self.processes
            .lock()
            .expect("process table")
            .insert(pid, process.clone());
        let table = Arc::downgrade(self);
        let running = process.clone();
        let oom_kills_before = self.oom_kills();
        tokio::spawn(async move {
            let out =
                stdout.map(|pipe| tokio::spawn(pump(pipe, running.clone(), DataEvent::Stdout)));
            let err =
                stderr.map(|pipe| tokio::spawn(pump(pipe, running.clone(), DataEvent::Stderr)));
            // The terminal reads EIO once every holder of its other end has gone.
            let tty =
                screen.map(|screen| tokio::spawn(pump(screen, running.clone(), DataEvent::Pty)));
            for reader in [out, err, tty].into_iter().flatten() {
                let _ = reader.await;
            }
            let end = match child.wait().await {
                Ok(status) => {
                    let mut end = end_event(status);
                    let oom_killed = table
                        .upgrade()
                        .is_some_and(|table| table.oom_kills() > oom_kills_before);
                    // A shell reports its killed child as 137 (128 + SIGKILL).
                    if oom_killed && (!end.exited || end.exit_code == 137) {
                        end.error = Some(OOM_KILLED.into());
                    }
                    end
                }
                Err(error) => EndEvent {
                    exit_code: -1,
                    exited: false,
                    status: "unknown".into(),
                    error: Some(error.to_string()),
                },
            };
            if table
                .upgrade()
                .is_some_and(|table| table.stopped.load(std::sync::atomic::Ordering::SeqCst))
            {
                running.abandon();
                return;
            }
            running.finish(end);
            tokio::time::sleep(EXIT_RETENTION).await;
            if let Some(table) = table.upgrade() {
                table.processes.lock().expect("process table").remove(&pid);
            }
        });
        Ok((process, receiver))
    }

    /// Lets processes start and end as usual again after [`ProcessTable::kill_all`]: a
    /// sandbox resumed from a pause that kept only its files.
    pub fn restart(&self) {
        self.stopped
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Kills every process of the sandbox.
    pub fn kill_all(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let processes: Vec<_> = self
            .processes
            .lock()
            .expect("process table")
            .values()
            .cloned()
            .collect();
        for process in processes {
            process.signal(libc::SIGKILL);
        }
    }
}

async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    process: Arc<Process>,
    wrap: fn(Vec<u8>) -> DataEvent,
) {
    loop {
        // Each read lands in its own buffer, which becomes the event without a copy.
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        match pipe.read_buf(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(_) => process.publish(ProcessEvent::Data(wrap(chunk))).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_home_and_dots_stay_inside() {
        let fs = Path::new("/nonexistent/sbx/fs");
        assert_eq!(
            resolve(fs, "/home/user", "notes.txt").unwrap(),
            fs.join("home/user/notes.txt")
        );
        assert_eq!(
            resolve(fs, "/home/user", "/../../tmp/x").unwrap(),
            fs.join("tmp/x")
        );
        assert_eq!(resolve(fs, "/home/user", "/").unwrap(), fs.to_path_buf());
    }

    #[test]
    fn system_and_kernel_paths_are_refused() {
        let fs = Path::new("/nonexistent/sbx/fs");
        for path in [
            "/etc/shadow",
            "/usr/bin/env",
            "/proc/1/environ",
            "../../../etc/passwd",
        ] {
            assert_eq!(
                resolve(fs, "/home/user", path),
                Err(PathError::Outside(path.into())),
                "{path}"
            );
        }
        assert_eq!(resolve(fs, "/home/user", ""), Err(PathError::Empty));
    }

    #[test]
    fn symlinks_pointing_out_of_the_root_are_refused() {
        let base = std::env::temp_dir().join(format!("sandcastle-resolve-{}", std::process::id()));
        let fs = base.join("fs");
        std::fs::create_dir_all(fs.join("home/user")).unwrap();
        std::os::unix::fs::symlink("/", fs.join("home/user/escape")).unwrap();
        std::os::unix::fs::symlink(".", fs.join("home/user/here")).unwrap();
        assert!(matches!(
            resolve(&fs, "/home/user", "escape/root/.bashrc"),
            Err(PathError::Outside(_))
        ));
        assert_eq!(
            resolve(&fs, "/home/user", "here/file").unwrap(),
            fs.join("home/user/here/file")
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn request_env_wins_over_sandbox_env_over_basics() {
        let sandbox = BTreeMap::from([
            ("A".to_string(), "s".to_string()),
            ("HOME".to_string(), "/x".to_string()),
        ]);
        let request = BTreeMap::from([("A".to_string(), "r".to_string())]);
        let env = process_env(&DEFAULT_USER, &sandbox, &request);
        assert_eq!(env["A"], "r");
        assert_eq!(env["HOME"], "/x");
        assert_eq!(env["USER"], "user");
        assert!(env["PATH"].contains("/usr/bin"));
    }

    #[test]
    fn exit_statuses_read_like_go() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            end_event(ExitStatus::from_raw(0)),
            EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None
            }
        );
        assert_eq!(end_event(ExitStatus::from_raw(3 << 8)).exit_code, 3);
        let killed = end_event(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!((killed.exit_code, killed.exited), (-1, false));
        assert_eq!(killed.status, "signal: killed");
    }
}
