//! A real one-node Kubernetes cluster (containerd, kubelet, kube-scheduler, kube-proxy,
//! CoreDNS and a local registry beside etcd, kube-apiserver and kube-controller-manager),
//! started by `tools/node/up.sh` and torn down by `tools/node/down.sh`.
//!
//! One node per machine: its ports, the `cni0` bridge, the `kubepods` cgroups and the
//! iptables chains are machine-wide, so [`Node::start`] refuses to start beside another
//! node (or the leftovers of one), when a port it needs is taken, or when not root. It
//! never skips silently: every refusal is an error that says what to do.

use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::localcluster::tools_bin_dir;
use crate::repo;

/// TCP ports on loopback the node binds: registry, apiserver, etcd, kubelet healthz,
/// kube-proxy metrics and healthz, controller-manager, scheduler.
const LOOPBACK_PORTS: [u16; 9] = [5000, 6443, 2379, 2380, 10248, 10249, 10256, 10257, 10259];

/// A running node. Dropping it (or [`Node::stop`]) runs `down.sh`.
pub struct Node {
    dir: PathBuf,
    kubeconfig: PathBuf,
    registry: String,
    registry_pod: String,
    ip: IpAddr,
    name: String,
    running: bool,
    /// How long `up.sh` took.
    pub up_time: Duration,
}

/// Where `scripts/setup` links the node's binaries (kubelet, kube-scheduler, kube-proxy,
/// coredns, the pause image): `.tools/node`, or `$SANDCASTLE_NODE_BIN`.
pub fn node_bin_dir() -> PathBuf {
    std::env::var_os("SANDCASTLE_NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/node"))
}

fn script(path: &str) -> PathBuf {
    repo().join(path)
}

/// Runs a script and returns its stdout, or an error with its exit status and output.
fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|err| format!("{what}: cannot run: {err}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{what} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `tools/node/check-clean.sh` and returns its report: `Ok` when nothing of a node is
/// on the machine, otherwise `Err` listing each leftover (processes, listeners on the
/// node's ports, network namespaces, veths, `cni0`, iptables chains, cgroups, mounts).
pub fn check_clean(dir: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(script("tools/node/check-clean.sh"));
    if let Some(dir) = dir {
        cmd.arg(dir);
    }
    let out = cmd
        .output()
        .map_err(|err| format!("check-clean.sh: cannot run: {err}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// The errors that make starting a node impossible here, each with what to do.
fn preflight(ip: IpAddr) -> Result<(), String> {
    // The effective uid: the second field of /proc/self/status's Uid line.
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned))
        });
    if euid.as_deref() != Some("0") {
        return Err(
            "a real node needs root (containerd, kubelet, CNI, iptables, cgroups); \
             run the node tests as root"
                .into(),
        );
    }
    if let Err(report) = check_clean(None) {
        return Err(format!(
            "a node is already running on this machine, or one left things behind \
             (only one node fits on a machine; stop it with tools/node/down.sh DIR):\n{report}"
        ));
    }
    let mut taken = Vec::new();
    for port in LOOPBACK_PORTS {
        if let Err(err) = TcpListener::bind(("127.0.0.1", port)) {
            taken.push(format!("127.0.0.1:{port} (tcp: {err})"));
        }
    }
    if let Err(err) = TcpListener::bind((ip, 10250)) {
        taken.push(format!("{ip}:10250 (tcp: {err})"));
    }
    if let Err(err) = TcpListener::bind((ip, 53)) {
        taken.push(format!("{ip}:53 (tcp: {err})"));
    }
    if let Err(err) = UdpSocket::bind((ip, 53)) {
        taken.push(format!("{ip}:53 (udp: {err})"));
    }
    if !taken.is_empty() {
        return Err(format!(
            "ports the node needs are taken: {}; stop whatever holds them (`ss -ltnup`)",
            taken.join(", ")
        ));
    }
    for (dir, file) in [
        (tools_bin_dir(), "kube-apiserver"),
        (tools_bin_dir(), "kubectl"),
        (node_bin_dir(), "kubelet"),
        (node_bin_dir(), "pause.tar"),
    ] {
        if !dir.join(file).exists() {
            return Err(format!(
                "{} is missing: run scripts/setup",
                dir.join(file).display()
            ));
        }
    }
    Ok(())
}

/// Tears down the nodes that test processes which died (killed, or interrupted before
/// their `Drop` ran) left in `NAME-PID` directories under the scratch dir: up.sh's
/// processes run in sessions of their own and outlive the test. A node whose test
/// process still runs is left alone, and [`preflight`] then refuses to start another.
fn reclaim(name: &str) {
    let Ok(entries) = std::fs::read_dir(crate::scratch_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|file| file.strip_prefix(&format!("{name}-")))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let holds_node = dir.join("pids").is_dir() || dir.join("sysctl.saved").is_file();
        if !holds_node || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!(
            "tearing down the node that dead test process {pid} left in {}",
            dir.display()
        );
        if let Err(err) = run(
            Command::new(script("tools/node/down.sh")).arg(&dir),
            "tools/node/down.sh",
        ) {
            eprintln!("{err}");
        }
    }
}

/// The machine's address the node uses: eth0's IPv4 address, as `up.sh` picks it
/// (`$NODE_IP` overrides). Pods reach the host there.
pub fn host_ip() -> Result<IpAddr, String> {
    if let Ok(ip) = std::env::var("NODE_IP") {
        return ip.parse().map_err(|err| format!("NODE_IP={ip}: {err}"));
    }
    let out = run(
        Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]),
        "ip addr",
    )?;
    // eth0 first, as up.sh does; otherwise the first global address.
    let addrs: Vec<(String, String)> = out
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dev = fields.get(1)?;
            let addr = fields.get(3)?.split('/').next()?;
            Some((dev.to_string(), addr.to_string()))
        })
        .filter(|(dev, _)| dev != "cni0")
        .collect();
    let addr = addrs
        .iter()
        .find(|(dev, _)| dev == "eth0")
        .or(addrs.first())
        .map(|(_, addr)| addr.clone())
        .ok_or("no non-loopback IPv4 address on this machine; set NODE_IP")?;
    addr.parse().map_err(|err| format!("{addr}: {err}"))
}

impl Node {
    /// Starts a node with its state in a fresh directory `name` under the scratch dir and
    /// returns once it is Ready, the `default` ServiceAccount exists and DNS answers.
    pub fn start(name: &str) -> Result<Node, String> {
        Node::start_with(name, None)
    }

    /// Like [`Node::start`], on containerd 2 with gVisor's runsc as a second runtime and
    /// the RuntimeClass `gvisor` for it (`tools/node/build-gvisor.sh`, linked by
    /// `scripts/setup` as `.tools/gvisor`, or `$SANDCASTLE_GVISOR_BIN`).
    pub fn start_with_gvisor(name: &str) -> Result<Node, String> {
        let bin = std::env::var_os("SANDCASTLE_GVISOR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".tools/gvisor"));
        if !bin.join("runsc").is_file() {
            return Err(format!(
                "{} has no runsc: run scripts/setup (as root)",
                bin.display()
            ));
        }
        Node::start_with(name, Some(&bin))
    }

    fn start_with(name: &str, gvisor: Option<&Path>) -> Result<Node, String> {
        let ip = host_ip()?;
        reclaim(name);
        preflight(ip)?;
        let dir = crate::scratch_dir().join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            return Err(format!("{} exists already", dir.display()));
        }
        std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        let started = Instant::now();
        let out = run(
            Command::new(script("tools/node/up.sh"))
                .arg(&dir)
                .env("NODE_IP", ip.to_string())
                .env("CONTROLPLANE_BIN", tools_bin_dir())
                .env("NODE_BIN", node_bin_dir())
                .env("KUBECTL", tools_bin_dir().join("kubectl"))
                .envs(gvisor.map(|bin| ("NODE_GVISOR_BIN", bin))),
            "tools/node/up.sh",
        )?;
        let up_time = started.elapsed();
        let env = |key: &str| {
            out.lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
                .ok_or_else(|| format!("up.sh printed no {key}=:\n{out}"))
        };
        let node = Node {
            kubeconfig: PathBuf::from(env("KUBECONFIG")?),
            registry: env("REGISTRY")?,
            registry_pod: env("REGISTRY_POD")?,
            name: env("NODE_NAME")?,
            ip,
            dir,
            running: true,
            up_time,
        };
        Ok(node)
    }

    /// The admin kubeconfig (`system:masters`), for kubectl and helm.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The node's state directory; its logs stay in `logs/` after [`Node::stop`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client with the admin kubeconfig.
    pub async fn client(&self) -> Result<Client, String> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(|err| err.to_string())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|err| err.to_string())?;
        Client::try_from(config).map_err(|err| err.to_string())
    }

    /// Runs `helm` or `kubectl` from the tools dir against this node, with helm's state
    /// under the node's directory; returns stdout, or an error with both outputs.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let helm = self.dir.join("helm");
        let out = Command::new(tools_bin_dir().join(tool))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", helm.join("cache"))
            .env("HELM_CONFIG_HOME", helm.join("config"))
            .env("HELM_DATA_HOME", helm.join("data"))
            .output()
            .map_err(|err| format!("{tool} runs: {err}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{tool} {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The local registry's `host:port` (plain HTTP, on loopback); the node pulls from it.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The same registry at the node's address: what pods (a builder Job) reach it by,
    /// and what the node pulls from as well.
    pub fn registry_pod(&self) -> &str {
        &self.registry_pod
    }

    /// The host's (and node's) non-loopback address: pods reach servers on the host here.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The Node object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Builds the operator image from `binary` (the Dockerfile's runtime layout from
    /// Debian packages, `tools/images/build-operator-image.sh`), pushes it to the node's
    /// registry as `sandcastle:TAG` and returns the pushed reference with its digest.
    pub fn push_operator_image(&self, binary: &Path, tag: &str) -> Result<String, String> {
        let out = run(
            Command::new(script("tools/images/build-operator-image.sh"))
                .arg(binary)
                .arg(tag)
                .env("REGISTRY", &self.registry)
                .env("ENVD_BINARY", crate::envd_binary()?),
            "tools/images/build-operator-image.sh",
        )?;
        out.lines()
            .rev()
            .find(|line| line.contains("@sha256:"))
            .map(str::to_owned)
            .ok_or_else(|| format!("build-operator-image.sh printed no reference:\n{out}"))
    }

    /// Builds the template builder image (kaniko's executor,
    /// `tools/images/build-builder-image.sh`) and pushes it to the node's registry;
    /// returns the reference pods pull it by.
    pub fn push_builder_image(&self) -> Result<String, String> {
        let out = run(
            Command::new(script("tools/images/build-builder-image.sh"))
                .env("REGISTRY", &self.registry),
            "tools/images/build-builder-image.sh",
        )?;
        let pushed = out
            .lines()
            .rev()
            .find(|line| line.contains("@sha256:"))
            .ok_or_else(|| format!("build-builder-image.sh printed no reference:\n{out}"))?;
        Ok(pushed.replacen(&self.registry, &self.registry_pod, 1))
    }

    /// Builds the sandbox images (`tools/images/build-sandbox-images.sh`: sandbox-minimal
    /// and sandbox-full, cached by their package lists; sandbox-full with the Claude Code
    /// CLI in `claude` when given) and pushes them to the node's registry; returns the
    /// pushed references with their digests.
    pub fn push_sandbox_images(&self, claude: Option<&Path>) -> Result<Vec<String>, String> {
        let out = run(
            Command::new(script("tools/images/build-sandbox-images.sh"))
                .args(claude)
                .env("REGISTRY", &self.registry),
            "tools/images/build-sandbox-images.sh",
        )?;
        Ok(out
            .lines()
            .filter(|line| line.contains("@sha256:"))
            .map(str::to_owned)
            .collect())
    }

    /// Stops one of the node's processes (`kubelet`, `kube-apiserver`, …) and, after
    /// `down`, starts it again as it was started (`tools/node/restart.sh`).
    pub fn restart(&self, component: &str, down: Duration) -> Result<(), String> {
        run(
            Command::new(script("tools/node/restart.sh"))
                .arg(&self.dir)
                .arg(component)
                .arg(format!("{:.1}", down.as_secs_f64())),
            "tools/node/restart.sh",
        )
        .map(drop)
    }

    /// Stops the node (`down.sh`, which removes all it left on the machine and ends with
    /// `check-clean.sh`). The logs stay in `DIR/logs`. Idempotent.
    pub fn stop(&mut self) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        run(
            Command::new(script("tools/node/down.sh")).arg(&self.dir),
            "tools/node/down.sh",
        )
        .map(drop)
    }

    /// [`check_clean`] for this node's directory.
    pub fn check_clean(&self) -> Result<String, String> {
        check_clean(Some(&self.dir))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("stopping the node in {}: {err}", self.dir.display());
        }
    }
}
