//! Figures for the operator on a real control plane (etcd + kube-apiserver from
//! `.tools/bin`), each against a baseline or target measured in the same run. Run with
//! `cargo bench --bench operator`; the sizes come from the environment:
//!
//! - `SANDCASTLE_BENCH_TASKS` (200): the throughput burst of `command: ["true"]` tasks;
//! - `SANDCASTLE_BENCH_BURSTS` (100): further bursts, comma-separated, timed for the
//!   controller overhead only;
//! - `SANDCASTLE_BENCH_FINISHED` (2000): finished tasks in the cluster for the footprint;
//! - `SANDCASTLE_BENCH_PEER` (1): 0 skips the peer controller;
//! - `SANDCASTLE_BENCH_SANDBOX_DIR` (`/dev/shm` where it exists, else the target
//!   directory): where the sandbox server keeps its sandboxes' files. A tmpfs by
//!   default because on an ext4 without a journal (this VM's disk) the inode allocator
//!   skips every inode freed in the last minutes, one by one: on disk, a sandbox's
//!   directories cost more the more sandboxes were deleted just before (a profile put it
//!   at 10–20 % of the machine during a burst, growing from run to run), which would be
//!   charged to the operator's figures.
//!
//! The full run is `SANDCASTLE_BENCH_TASKS=500 SANDCASTLE_BENCH_BURSTS=100,1000
//! SANDCASTLE_BENCH_FINISHED=10000`. The report is a markdown table on stdout and JSON in
//! `bench-operator.json` in the target directory.
//!
//! The operator is the release binary, run as `sandcastle run --provider e2b` against the
//! embedded sandbox server started in this process, behind a relay that notes when each
//! sandbox create arrives: the server's own code, out of the operator's process so that
//! the operator's memory and CPU are its own and the arrival can be timed on this clock.

mod peer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams, PostParams};
use sandcastle_api::{AgentTask, TaskPhase};
use sandcastle_e2b::client::{ClientConfig, E2bClient};
use sandcastle_sandboxd::{Config, Sandboxd};
use sandcastle_testkit::base::adopt_base;
use sandcastle_testkit::figures::{self, RoundTrips, Spread, Streaming, mib_per_second, millis};
use sandcastle_testkit::localcluster::{LocalCluster, tools_bin_dir};
use sandcastle_testkit::sightings::Sightings;
use serde_json::{Value, json};

const API_KEY: &str = "operator-bench";
/// The operator's finalizer on every task it has seen.
use sandcastle_api::names::TASK_FINALIZER as FINALIZER;
/// What the operator stamps on a sandbox to find its task again.
use sandcastle_api::names::{self, SANDBOX_TASK_UID as TASK_UID};
/// The operator's field manager, which owns a task's status.
const OPERATOR_MANAGER: &str = "sandcastle";
/// Requests the bench keeps in flight when it creates objects, like a client applying a
/// directory of manifests in parallel; the minimal writer gets the same.
const CLIENT_CONCURRENCY: usize = 32;
/// Tasks run before each timed run, so that connections, caches and the apiserver's first
/// use of a kind are not counted in it.
const WARM_UP: usize = 5;
/// Write verbs as the apiserver's `apiserver_request_total` names them.
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

struct Sizes {
    tasks: usize,
    bursts: Vec<usize>,
    finished: usize,
    peer: bool,
}

impl Sizes {
    fn from_env() -> Sizes {
        let setting = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
        let count = |name: &str, value: &str| -> usize {
            value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {value:?} is not a count"))
        };
        let tasks = count(
            "SANDCASTLE_BENCH_TASKS",
            &setting("SANDCASTLE_BENCH_TASKS", "200"),
        );
        let mut bursts: BTreeSet<usize> = setting("SANDCASTLE_BENCH_BURSTS", "100")
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| count("SANDCASTLE_BENCH_BURSTS", part))
            .filter(|&burst| burst > 0)
            .collect();
        bursts.insert(tasks);
        let finished = setting("SANDCASTLE_BENCH_FINISHED", "2000");
        Sizes {
            tasks,
            bursts: bursts.into_iter().collect(),
            finished: count("SANDCASTLE_BENCH_FINISHED", &finished),
            peer: setting("SANDCASTLE_BENCH_PEER", "1") != "0",
        }
    }
}

#[tokio::main]
async fn main() {
    let began = Instant::now();
    let sizes = Sizes::from_env();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let work = tmp.join("bench-operator");
    let cluster = LocalCluster::start(&tools_bin_dir(), &work)
        .await
        .expect("the control plane starts (scripts/setup builds it)");
    let client = cluster.client().await.expect("client");
    sandcastle_api::install(&client).await.expect("CRDs");
    let root_in = |dir: &Path| dir.join(format!("sandcastle-bench-{}", std::process::id()));
    let sandbox_dir = std::env::var("SANDCASTLE_BENCH_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let shm = PathBuf::from("/dev/shm");
            if std::fs::create_dir_all(root_in(&shm)).is_ok() {
                shm
            } else {
                tmp.clone()
            }
        });
    let sandboxd_root = root_in(&sandbox_dir);
    let provider = Provider::start(&sandboxd_root).await;
    let bench = Bench {
        cluster,
        client,
        provider,
    };
    eprintln!(
        "control plane up; sandbox isolation: {}",
        bench.provider.isolation()
    );

    let baseline = bench.baseline(sizes.tasks).await;
    let mut bursts = Vec::new();
    for &n in &sizes.bursts {
        bursts.push(bench.burst(n).await);
    }
    let footprint = bench.footprint(sizes.finished).await;
    let peer = if sizes.peer {
        peer::run(&bench.cluster, &bench.client, sizes.tasks).await
    } else {
        peer::Outcome::Skipped("SANDCASTLE_BENCH_PEER=0".into())
    };
    let direct = E2bClient::new(ClientConfig::with_urls(
        bench.provider.server.api_url(),
        bench.provider.server.sandbox_url(),
        API_KEY,
    ))
    .expect("client");
    let trips = figures::round_trips(&direct).await;
    let stream = figures::streaming(&direct).await;

    let report = Report {
        sizes: &sizes,
        isolation: bench.provider.isolation(),
        sandbox_dir: sandbox_dir.display().to_string(),
        baseline,
        bursts,
        footprint,
        peer,
        trips,
        stream,
        seconds: began.elapsed().as_secs_f64(),
    };
    print!("{}", report.markdown());
    let json_path = tmp
        .parent()
        .expect("the target directory")
        .join("bench-operator.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json()).expect("JSON"),
    )
    .expect("writing the JSON report");
    println!("\nJSON: {}", json_path.display());
    bench.provider.server.stop().await;
    drop(bench.cluster);
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&sandboxd_root);
}

struct Bench {
    cluster: LocalCluster,
    /// The user's client: creates tasks and watches them.
    client: kube::Client,
    provider: Provider,
}

/// The minimal writer's run: per task the user's create and the fewest writes any
/// correct operator makes.
struct Baseline {
    tasks: usize,
    seconds: f64,
    writes: BTreeMap<String, f64>,
    cpu: CpuUse,
}

/// One burst of tasks through the operator.
struct Burst {
    tasks: usize,
    /// From the first create sent to the last task seen Succeeded.
    seconds: f64,
    /// From the create's answer to the sandbox create arriving at the server.
    to_sandbox: Spread,
    to_sandbox_max: Duration,
    /// From the create's answer to the task seen Succeeded.
    to_succeeded: Spread,
    /// The user's create request itself.
    create_call: Spread,
    /// From the create's answer to a plain watch hearing of the task: no operator can
    /// act sooner.
    to_watch: Spread,
    /// Per task, from the plain watch hearing of it to its sandbox create arriving: the
    /// operator's own share of `to_sandbox`.
    beyond_watch: Spread,
    failed: usize,
    /// The operator's requests during the burst, per `resource[/subresource] VERB`.
    writes: BTreeMap<String, f64>,
    reads: BTreeMap<String, f64>,
    cpu: Duration,
    shares: CpuUse,
    before: Memory,
    after: Memory,
    warnings: usize,
}

/// The operator with many finished tasks in its namespace.
struct Footprint {
    tasks: usize,
    /// Creating the finished tasks (task, status, transcript ConfigMap each).
    create_seconds: f64,
    /// From the operator's admin endpoint answering to its having reconciled every task.
    sync_seconds: f64,
    /// The operator's CPU time from its start until it settled.
    cpu: Duration,
    memory: Memory,
}

/// Resident memory of a process, now and at its peak, in KiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    peak: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// User plus system CPU time of a process, all threads.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it are fixed: utime and stime
    // are the 12th and 13th after the name's `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&index| fields.get(index)?.parse::<u64>().ok())
        .sum();
    ticks_to_duration(ticks)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a constant of the running system.
    #[allow(unsafe_code)]
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// CPU time the whole machine spent on anything but idling and waiting for I/O.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal …; guest time is already in user.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(index, _)| !matches!(index, 3 | 4))
        .map(|(_, value)| value)
        .sum();
    ticks_to_duration(busy)
}

/// Where the machine's CPU went over a stretch of the benchmark: to the control plane,
/// the operator, and the rest, and how much of the machine that was.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    apiserver: Duration,
    etcd: Duration,
    operator: Duration,
    busy: Duration,
    wall: Duration,
}

struct CpuMeter {
    pids: (u32, u32),
    operator: Option<u32>,
    at: Instant,
    start: CpuUse,
}

impl CpuMeter {
    fn start(cluster: &LocalCluster, operator: Option<u32>) -> CpuMeter {
        let pids = cluster.pids();
        let start = Self::read(pids, operator);
        CpuMeter {
            pids,
            operator,
            at: Instant::now(),
            start,
        }
    }

    fn read(pids: (u32, u32), operator: Option<u32>) -> CpuUse {
        CpuUse {
            apiserver: cpu_time(pids.0),
            etcd: cpu_time(pids.1),
            operator: operator.map(cpu_time).unwrap_or_default(),
            busy: machine_busy(),
            wall: Duration::ZERO,
        }
    }

    fn stop(self) -> CpuUse {
        let now = Self::read(self.pids, self.operator);
        CpuUse {
            apiserver: now.apiserver.saturating_sub(self.start.apiserver),
            etcd: now.etcd.saturating_sub(self.start.etcd),
            operator: now.operator.saturating_sub(self.start.operator),
            busy: now.busy.saturating_sub(self.start.busy),
            wall: self.at.elapsed(),
        }
    }
}

impl CpuUse {
    /// Everything else the machine did: the benchmark's clients, the sandbox server and
    /// its sandboxes, and the kernel's work for them. Counted from the machine's busy time
    /// rather than from the benchmark process's reaped children, which miss short-lived
    /// sandbox processes (a profile of the burst put them at 2–3 ms per task beyond what
    /// the reaped-children count said).
    fn rest(&self) -> Duration {
        self.busy
            .saturating_sub(self.apiserver + self.etcd + self.operator)
    }

    /// Per task, in milliseconds: "apiserver 9.1, etcd 2.0, …; machine 85 % busy".
    fn per_task(&self, tasks: usize) -> String {
        let each = |cpu: Duration| cpu.as_secs_f64() * 1000.0 / tasks as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "CPU ms per task: apiserver {:.1}, etcd {:.1}, operator {:.1}, the rest (benchmark clients, sandbox server, sandboxes, kernel) {:.1}; machine {:.0} % busy",
            each(self.apiserver),
            each(self.etcd),
            each(self.operator),
            each(self.rest()),
            self.busy.as_secs_f64() / (self.wall.as_secs_f64() * cores) * 100.0
        )
    }

    fn json(&self, tasks: usize) -> Value {
        let each = |cpu: Duration| cpu.as_secs_f64() * 1000.0 / tasks as f64;
        json!({
            "apiserverMsPerTask": each(self.apiserver),
            "etcdMsPerTask": each(self.etcd),
            "operatorMsPerTask": each(self.operator),
            "restMsPerTask": each(self.rest()),
            "machineBusySeconds": self.busy.as_secs_f64(),
            "wallSeconds": self.wall.as_secs_f64(),
        })
    }
}

/// The embedded sandbox server behind a relay that notes when each sandbox create for a
/// task arrives (by the task UID in its metadata) and passes every request on.
struct Provider {
    server: Sandboxd,
    relay_url: String,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
}

#[derive(Clone)]
struct Relay {
    upstream: String,
    http: reqwest::Client,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Provider {
    async fn start(root: &Path) -> Provider {
        let mut config = Config::new(root);
        config.api_key = Some(API_KEY.into());
        // The operator's cap is the only limit under test.
        config.max_sandboxes = 100_000;
        let server = Sandboxd::start(config).await.expect("sandbox server");
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let relay = Relay {
            upstream: server.api_url(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            arrivals: arrivals.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay port");
        let relay_url = format!("http://{}", listener.local_addr().expect("address"));
        let app = axum::Router::new().fallback(pass_on).with_state(relay);
        // Like the server's own listeners: small answers must not wait for delayed ACKs.
        let listener = listener.tap_io(|stream| {
            let _ = stream.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Provider {
            server,
            relay_url,
            arrivals,
        }
    }

    fn isolation(&self) -> &'static str {
        if self.server.is_isolated() {
            "bubblewrap"
        } else {
            "none"
        }
    }

    fn arrival(&self, uid: &str) -> Option<Instant> {
        self.arrivals.lock().expect("arrivals").get(uid).copied()
    }
}

async fn pass_on(
    axum::extract::State(relay): axum::extract::State<Relay>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if parts.method == axum::http::Method::POST && parts.uri.path() == "/sandboxes" {
        let spec: Value = serde_json::from_slice(&body).unwrap_or_default();
        if let Some(uid) = spec["metadata"][TASK_UID].as_str() {
            relay
                .arrivals
                .lock()
                .expect("arrivals")
                .entry(uid.to_string())
                .or_insert(arrived);
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let mut headers = parts.headers;
    headers.remove(axum::http::header::HOST);
    let answer = relay
        .http
        .request(parts.method, format!("{}{path}", relay.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let mut response = axum::response::Response::default();
    match answer {
        Ok(answer) => {
            *response.status_mut() = answer.status();
            let mut headers = answer.headers().clone();
            headers.remove(axum::http::header::CONTENT_LENGTH);
            headers.remove(axum::http::header::TRANSFER_ENCODING);
            *response.headers_mut() = headers;
            *response.body_mut() = answer.bytes().await.unwrap_or_default().into();
        }
        Err(_) => *response.status_mut() = axum::http::StatusCode::BAD_GATEWAY,
    }
    response
}

/// `sandcastle run` (the release binary) for one namespace, with the relayed sandbox
/// server as its default provider.
struct Operator {
    child: Child,
    admin: String,
    warnings: Arc<AtomicUsize>,
}

impl Operator {
    async fn start(bench: &Bench, namespace: &str, max_running: usize) -> Operator {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sandcastle"));
        command
            .args(["run", "--namespace", namespace, "--provider", "e2b"])
            .args(["--max-running-tasks", &max_running.to_string()])
            .args(["--admin-address", "127.0.0.1:0"])
            .env("KUBECONFIG", bench.cluster.kubeconfig_path())
            .env("E2B_API_URL", &bench.provider.relay_url)
            .env("E2B_SANDBOX_URL", bench.provider.server.sandbox_url())
            .env("E2B_API_KEY", API_KEY)
            .env("SANDCASTLE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().expect("the operator starts");
        let stdout = child.stdout.take().expect("stdout");
        let warnings = Arc::new(AtomicUsize::new(0));
        let (announced, admin) = tokio::sync::oneshot::channel();
        let counted = warnings.clone();
        let name = namespace.to_string();
        // Reads the JSON log to the end, so the operator never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut announced = Some(announced);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "admin endpoint listening" {
                    let address = entry["fields"]["address"].as_str().unwrap_or_default();
                    if let Some(announced) = announced.take() {
                        let _ = announced.send(address.to_string());
                    }
                }
                if entry["level"] == "WARN" || entry["level"] == "ERROR" {
                    // The first few say what went wrong; the count says how often.
                    if counted.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("operator[{name}]: {line}");
                    }
                }
            }
        });
        let admin = tokio::time::timeout(Duration::from_secs(30), admin)
            .await
            .ok()
            .and_then(Result::ok)
            .expect("the operator announces its admin endpoint within 30 s");
        Operator {
            child,
            admin,
            warnings,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many AgentTask reconciles the operator finished, from its own `/metrics`.
    async fn task_reconciles(&self) -> f64 {
        let Ok(response) = reqwest::get(format!("http://{}/metrics", self.admin)).await else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter(|line| {
                line.starts_with("controller_runtime_reconcile_total{")
                    && line.contains("controller=\"agenttask\"")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the kernel kill the child when the bench dies, so an interrupted run leaves no
/// operator behind.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The apiserver's request counts, by `resource[/subresource] VERB`, from its own
/// `/metrics` (`apiserver_request_total`). Leases are left out: without leader election
/// only the apiserver itself writes them.
async fn apiserver_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a static request");
    let text = client
        .request_text(request)
        .await
        .expect("the apiserver's metrics");
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels: HashMap<&str, &str> = labels
            .split("\",")
            .filter_map(|pair| {
                let (key, value) = pair.split_once("=\"")?;
                Some((key, value.trim_end_matches('"')))
            })
            .collect();
        let label = |key: &str| labels.get(key).copied().unwrap_or_default();
        if label("resource") == "leases" {
            continue;
        }
        let resource = match label("subresource") {
            "" => label("resource").to_string(),
            sub => format!("{}/{sub}", label("resource")),
        };
        let key = format!("{resource} {}", label("verb"));
        *counts.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    counts
}

/// What was requested between two scrapes, split into writes and reads, minus the
/// bench's own writes.
fn requests_between(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    own_writes: &BTreeMap<String, f64>,
) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let (mut writes, mut reads) = (BTreeMap::new(), BTreeMap::new());
    for (key, count) in after {
        let made = count
            - before.get(key).copied().unwrap_or(0.0)
            - own_writes.get(key).copied().unwrap_or(0.0);
        if made < 0.5 {
            continue;
        }
        let verb = key.rsplit(' ').next().unwrap_or_default();
        if WRITE_VERBS.contains(&verb) {
            writes.insert(key.clone(), made);
        } else {
            reads.insert(key.clone(), made);
        }
    }
    (writes, reads)
}

fn task_object(name: &str, finalizers: &[&str]) -> AgentTask {
    serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": "AgentTask",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["true"]}},
        },
    }))
    .expect("a task")
}

/// A status as the operator writes it once it has a sandbox (`Provisioning`) or when a
/// `true` task has succeeded.
fn task_status(sandbox_id: &str, succeeded: bool) -> Value {
    let at = jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .expect("a whole second")
        .to_string();
    let (phase, message) = if succeeded {
        ("Succeeded", "the agent finished".to_string())
    } else {
        (
            "Provisioning",
            format!("sandbox {sandbox_id} is being prepared"),
        )
    };
    let condition = |type_: &str, value: bool| {
        json!({
            "type": type_, "status": if value { "True" } else { "False" },
            "reason": phase, "message": message,
            "lastTransitionTime": at, "observedGeneration": 1,
        })
    };
    let mut conditions = vec![
        condition("Ready", succeeded),
        condition("Reconciling", !succeeded),
        condition("Stalled", false),
    ];
    let mut status = json!({
        "phase": phase, "reason": phase, "message": message, "observedGeneration": 1,
        "sandboxId": sandbox_id, "templateId": "base", "attempts": 1, "startTime": at,
    });
    if succeeded {
        conditions.push(condition("Succeeded", true));
        status["completionTime"] = json!(at);
        status["result"] = json!({"isError": false, "exitCode": 0});
        status["fileCount"] = json!(0);
    }
    status["conditions"] = json!(conditions);
    status
}

async fn write_status(api: &Api<AgentTask>, name: &str, status: Value) {
    let patch = json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask", "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(OPERATOR_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .expect("status write");
}

/// A task as the user's create left it, timed on the bench's clock.
struct Created {
    name: String,
    uid: String,
    sent: Instant,
    answered: Instant,
}

/// Creates the objects with [`CLIENT_CONCURRENCY`] requests in flight, handing each to
/// `then` as soon as its create is answered.
async fn create_burst<K>(api: &Api<K>, objects: Vec<K>, then: impl Fn(&Created)) -> Vec<Created>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|object| async move {
            let name = object.meta().name.clone().unwrap_or_default();
            let sent = Instant::now();
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|error| panic!("creating {name}: {error}"));
            let answered = Instant::now();
            let uid = created.meta().uid.clone().expect("a UID");
            Created {
                name,
                uid,
                sent,
                answered,
            }
        })
        .buffer_unordered(CLIENT_CONCURRENCY)
        .inspect(then)
        .collect()
        .await
}

fn task_burst(prefix: &str, count: usize, finalizers: &[&str]) -> Vec<AgentTask> {
    (0..count)
        .map(|index| task_object(&format!("{prefix}-{index:05}"), finalizers))
        .collect()
}

/// The minimal writer's run over `tasks`: from the first create sent to the last
/// terminal status written.
async fn minimal_writes(
    user: &Api<AgentTask>,
    writer: &Api<AgentTask>,
    tasks: Vec<AgentTask>,
) -> Duration {
    let (created, queue) = futures::channel::mpsc::unbounded::<String>();
    let started = Instant::now();
    let creating = async {
        create_burst(user, tasks, |task| {
            let _ = created.unbounded_send(task.name.clone());
        })
        .await;
        created.close_channel();
    };
    let writing = queue
        .map(|name| async move {
            let finalizer = json!({"metadata": {"finalizers": [FINALIZER]}});
            writer
                .patch(&name, &PatchParams::default(), &Patch::Merge(&finalizer))
                .await
                .expect("finalizer");
            let sandbox = format!("sbx-{name}");
            write_status(writer, &name, task_status(&sandbox, false)).await;
            write_status(writer, &name, task_status(&sandbox, true)).await;
        })
        .buffer_unordered(CLIENT_CONCURRENCY)
        .collect::<Vec<()>>();
    futures::join!(creating, writing);
    started.elapsed()
}

async fn namespace(client: &kube::Client, name: &str) {
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("a namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
}

/// Tasks, once Succeeded (true) or Failed (false).
async fn finished_tasks(api: Api<AgentTask>) -> Sightings {
    Sightings::watch(api, |task: &AgentTask| {
        match task.status.as_ref().and_then(|status| status.phase) {
            Some(TaskPhase::Succeeded) => Some(true),
            Some(TaskPhase::Failed) => Some(false),
            _ => None,
        }
    })
    .await
}

impl Bench {
    /// The physical limit: one client creates the tasks the way the bursts do, a second
    /// writes, as soon as each create is answered, what any correct operator must: the
    /// finalizer (merge patch), the status that records the sandbox and the terminal
    /// status (server-side apply on `/status`), one after another, [`CLIENT_CONCURRENCY`]
    /// tasks at a time.
    async fn baseline(&self, tasks: usize) -> Baseline {
        let ns = "baseline";
        namespace(&self.client, ns).await;
        let user: Api<AgentTask> = Api::namespaced(self.client.clone(), ns);
        let writer: Api<AgentTask> =
            Api::namespaced(self.cluster.client().await.expect("a second client"), ns);
        // Connections, and the apiserver's first use of the kind, are not the burst's.
        minimal_writes(&user, &writer, task_burst("warm-up", WARM_UP, &[])).await;
        let before = apiserver_requests(&self.client).await;
        let meter = CpuMeter::start(&self.cluster, None);
        let seconds = minimal_writes(&user, &writer, task_burst("task", tasks, &[]))
            .await
            .as_secs_f64();
        let cpu = meter.stop();
        let after = apiserver_requests(&self.client).await;
        let (writes, _) = requests_between(&before, &after, &BTreeMap::new());
        eprintln!("baseline: {tasks} tasks in {seconds:.2} s");
        Baseline {
            tasks,
            seconds,
            writes,
            cpu,
        }
    }

    /// `tasks` tasks created in one burst against an operator allowed to run them all at
    /// once; every one must succeed.
    async fn burst(&self, tasks: usize) -> Burst {
        let ns = format!("burst-{tasks}");
        namespace(&self.client, &ns).await;
        let operator = Operator::start(self, &ns, tasks).await;
        adopt_base(&self.client, &ns).await;
        let api: Api<AgentTask> = Api::namespaced(self.client.clone(), &ns);
        let finishes = finished_tasks(api.clone()).await;
        // The floor of (d): when a watch that does nothing else hears of each task.
        let arrivals = Sightings::watch(api.clone(), |_: &AgentTask| Some(true)).await;
        create_burst(&api, task_burst("warm-up", WARM_UP, &[]), |_| {}).await;
        finishes
            .wait_for(WARM_UP, Duration::from_secs(60))
            .await
            .unwrap_or_else(|error| panic!("warm-up before the burst of {tasks}: {error}"));
        // The warm-up's last event follows its last status write.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let memory_before = Memory::of(operator.pid());
        let cpu_before = cpu_time(operator.pid());
        let requests_before = apiserver_requests(&self.client).await;
        let meter = CpuMeter::start(&self.cluster, Some(operator.pid()));
        let started = Instant::now();
        let created = create_burst(&api, task_burst("task", tasks, &[]), |_| {}).await;
        let limit = Duration::from_secs(120) + Duration::from_millis(500) * tasks as u32;
        let finished = finishes
            .wait_for(WARM_UP + tasks, limit)
            .await
            .unwrap_or_else(|error| panic!("burst of {tasks}: {error}"));
        let last = created
            .iter()
            .map(|task| finished[&task.name].0)
            .max()
            .expect("tasks");
        let seconds = (last - started).as_secs_f64();
        let shares = meter.stop();
        // The operator's last event follows its last status write.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu = cpu_time(operator.pid()) - cpu_before;
        let memory_after = Memory::of(operator.pid());
        let requests_after = apiserver_requests(&self.client).await;
        let own = BTreeMap::from([("agenttasks POST".to_string(), tasks as f64)]);
        let (writes, reads) = requests_between(&requests_before, &requests_after, &own);

        let mut to_sandbox = Vec::with_capacity(tasks);
        let mut to_succeeded = Vec::with_capacity(tasks);
        let mut create_call = Vec::with_capacity(tasks);
        let mut to_watch = Vec::with_capacity(tasks);
        let mut beyond_watch = Vec::with_capacity(tasks);
        let heard = arrivals.so_far();
        for task in &created {
            create_call.push(task.answered - task.sent);
            to_watch.push(heard[&task.name].0.saturating_duration_since(task.answered));
            let arrival = self
                .provider
                .arrival(&task.uid)
                .unwrap_or_else(|| panic!("no sandbox create arrived for {}", task.name));
            to_sandbox.push(arrival.saturating_duration_since(task.answered));
            beyond_watch.push(arrival.saturating_duration_since(heard[&task.name].0));
            to_succeeded.push(
                finished[&task.name]
                    .0
                    .saturating_duration_since(task.answered),
            );
        }
        let failed = created
            .iter()
            .filter(|task| !finished[&task.name].1)
            .count();
        let warnings = operator.warnings.load(Ordering::Relaxed);
        eprintln!("burst of {tasks}: {seconds:.2} s, {failed} failed, {warnings} warnings");
        Burst {
            tasks,
            seconds,
            to_sandbox_max: to_sandbox.iter().copied().max().unwrap_or_default(),
            to_sandbox: Spread::of(to_sandbox),
            to_succeeded: Spread::of(to_succeeded),
            create_call: Spread::of(create_call),
            to_watch: Spread::of(to_watch),
            beyond_watch: Spread::of(beyond_watch),
            failed,
            writes,
            reads,
            cpu,
            shares,
            before: memory_before,
            after: memory_after,
            warnings,
        }
    }

    /// `tasks` finished tasks as the operator leaves them (finalizer, Succeeded status,
    /// transcript ConfigMap owned by the task), then an operator started on them; its
    /// memory once it has reconciled each.
    async fn footprint(&self, tasks: usize) -> Footprint {
        let ns = "finished";
        namespace(&self.client, ns).await;
        let api: Api<AgentTask> = Api::namespaced(self.client.clone(), ns);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let started = Instant::now();
        let created = create_burst(&api, task_burst("task", tasks, &[FINALIZER]), |_| {}).await;
        futures::stream::iter(&created)
            .map(|task| {
                let (api, config_maps) = (api.clone(), config_maps.clone());
                async move {
                    write_status(&api, &task.name, task_status(&task.uid, true)).await;
                    let transcript = json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {
                            "name": format!("{}-transcript", task.name),
                            "labels": {names::TRANSCRIPT_TASK_LABEL: task.name, names::TRANSCRIPT_LABEL: "true"},
                            "ownerReferences": [{
                                "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
                                "name": task.name, "uid": task.uid,
                                "controller": true, "blockOwnerDeletion": true,
                            }],
                        },
                        "data": {"stdout": "", "stderr": ""},
                    });
                    config_maps
                        .create(
                            &PostParams::default(),
                            &serde_json::from_value(transcript).expect("a ConfigMap"),
                        )
                        .await
                        .expect("transcript");
                }
            })
            .buffer_unordered(CLIENT_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
        let create_seconds = started.elapsed().as_secs_f64();
        eprintln!("footprint: {tasks} finished tasks created in {create_seconds:.1} s");

        let operator = Operator::start(self, ns, 20).await;
        let started = Instant::now();
        adopt_base(&self.client, ns).await;
        let deadline =
            started + Duration::from_secs(120) + Duration::from_millis(20) * tasks as u32;
        while operator.task_reconciles().await < tasks as f64 {
            assert!(
                Instant::now() < deadline,
                "the operator did not reconcile {tasks} finished tasks"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sync_seconds = started.elapsed().as_secs_f64();
        // Settled: a second without CPU beyond a few ticks (timers, the orphan sweep).
        let mut cpu = cpu_time(operator.pid());
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = cpu_time(operator.pid());
            let quiet = now - cpu < Duration::from_millis(30);
            cpu = now;
            if quiet {
                break;
            }
        }
        let memory = Memory::of(operator.pid());
        eprintln!(
            "footprint: synced in {sync_seconds:.1} s, RSS {:.1} MiB",
            mib(memory.rss)
        );
        Footprint {
            tasks,
            create_seconds,
            sync_seconds,
            cpu,
            memory,
        }
    }
}

struct Report<'a> {
    sizes: &'a Sizes,
    isolation: &'static str,
    sandbox_dir: String,
    baseline: Baseline,
    bursts: Vec<Burst>,
    footprint: Footprint,
    peer: peer::Outcome,
    trips: RoundTrips,
    stream: Streaming,
    seconds: f64,
}

/// Per-task counts, summed over keys that `keep` accepts.
fn per_task(counts: &BTreeMap<String, f64>, tasks: usize, keep: impl Fn(&str) -> bool) -> f64 {
    counts
        .iter()
        .filter(|(key, _)| keep(key))
        .map(|(_, count)| count)
        .sum::<f64>()
        / tasks as f64
}

fn breakdown(counts: &BTreeMap<String, f64>, tasks: usize) -> String {
    counts
        .iter()
        .map(|(key, count)| format!("{key} {:.2}", count / tasks as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", millis(duration))
}

impl Report<'_> {
    fn throughput(&self) -> &Burst {
        self.bursts
            .iter()
            .find(|burst| burst.tasks == self.sizes.tasks)
            .expect("the throughput burst ran")
    }

    fn rate(tasks: usize, seconds: f64) -> f64 {
        tasks as f64 / seconds
    }

    fn ratio(&self) -> f64 {
        let burst = self.throughput();
        Self::rate(burst.tasks, burst.seconds)
            / Self::rate(self.baseline.tasks, self.baseline.seconds)
    }

    /// The ratio a/b if the operator's run cost the machine what the minimal writer's does
    /// plus the sandboxes' CPU (what the rest of the machine spent beyond its share in
    /// the minimal writer's run: the sandbox server, its sandboxes, and the benchmark's
    /// watches): the most a/b can be while the sandboxes share the cores with the control
    /// plane.
    fn ceiling(&self) -> f64 {
        let burst = self.throughput();
        let each = |cpu: Duration, tasks: usize| cpu.as_secs_f64() / tasks as f64;
        let minimal = each(self.baseline.cpu.busy, self.baseline.tasks);
        let sandboxes = (each(burst.shares.rest(), burst.tasks)
            - each(self.baseline.cpu.rest(), self.baseline.tasks))
        .max(0.0);
        minimal / (minimal + sandboxes)
    }

    fn agenttask_writes(burst: &Burst) -> f64 {
        per_task(&burst.writes, burst.tasks, |key| {
            key.starts_with("agenttasks")
        })
    }

    fn all_writes(burst: &Burst) -> f64 {
        per_task(&burst.writes, burst.tasks, |_| true)
    }

    fn cpu_per_thousand(burst: &Burst) -> f64 {
        burst.cpu.as_secs_f64() / burst.tasks as f64 * 1000.0
    }

    fn markdown(&self) -> String {
        let n = self.sizes.tasks;
        let burst = self.throughput();
        let baseline = &self.baseline;
        let mut rows = vec![
            (
                format!("(a) throughput: {n} `true` tasks in one burst, `--max-running-tasks {n}`"),
                format!(
                    "{:.2} s to all Succeeded, **{:.1} tasks/s** (create → Succeeded p50 {}, p99 {})",
                    burst.seconds,
                    Self::rate(n, burst.seconds),
                    ms(burst.to_succeeded.p50),
                    ms(burst.to_succeeded.p99)
                ),
                format!("{} failed; {}", burst.failed, burst.shares.per_task(n)),
            ),
            (
                format!("(b) minimal writer: {n} × (create, finalizer, 2 status writes)"),
                format!(
                    "{:.2} s, {:.1} tasks/s",
                    baseline.seconds,
                    Self::rate(baseline.tasks, baseline.seconds)
                ),
                format!(
                    "**a/b = {:.3}** (target ≥ 0.8); {}; a/b could be at most {:.2} on this machine were the operator free and its Events and transcripts unwritten, with the CPU of the sandboxes and the benchmark's watches alone",
                    self.ratio(),
                    baseline.cpu.per_task(baseline.tasks),
                    self.ceiling()
                ),
            ),
            (
                "(c) operator writes per task (apiserver_request_total)".into(),
                format!(
                    "**{:.2} on agenttasks**, {:.2} on all resources: {}",
                    Self::agenttask_writes(burst),
                    Self::all_writes(burst),
                    breakdown(&burst.writes, n)
                ),
                format!(
                    "target ≤ 4; minimal writer: {}",
                    breakdown(&baseline.writes, baseline.tasks)
                ),
            ),
            (
                "(c) operator reads per task".into(),
                breakdown(&burst.reads, n),
                String::new(),
            ),
        ];
        for burst in &self.bursts {
            rows.push((
                format!(
                    "(d) task created → sandbox create at the server, burst of {}",
                    burst.tasks
                ),
                format!(
                    "**p50 {}, p99 {}**, max {}; beyond a plain watch's hearing of the task p50 {}, p99 {}",
                    ms(burst.to_sandbox.p50),
                    ms(burst.to_sandbox.p99),
                    ms(burst.to_sandbox_max),
                    ms(burst.beyond_watch.p50),
                    ms(burst.beyond_watch.p99)
                ),
                format!(
                    "target p99 ≤ 50 ms at 100; the user's create call p50 {}, p99 {}; a plain watch hears of the task p50 {}, p99 {}",
                    ms(burst.create_call.p50),
                    ms(burst.create_call.p99),
                    ms(burst.to_watch.p50),
                    ms(burst.to_watch.p99)
                ),
            ));
        }
        let footprint = &self.footprint;
        rows.push((
            format!(
                "(e) operator RSS with {} finished tasks (and their transcript ConfigMaps)",
                footprint.tasks
            ),
            format!(
                "**{:.1} MiB**, peak {:.1} MiB; synced in {:.1} s using {:.2} CPU-s",
                mib(footprint.memory.rss),
                mib(footprint.memory.peak),
                footprint.sync_seconds,
                footprint.cpu.as_secs_f64()
            ),
            format!(
                "target ≤ 64 MiB; idle before a burst {:.1} MiB",
                mib(burst.before.rss)
            ),
        ));
        rows.push((
            "(e) operator CPU per 1,000 tasks".into(),
            format!(
                "**{:.2} CPU-s** ({:.2} s over the burst of {n}); RSS after it {:.1} MiB, peak {:.1} MiB",
                Self::cpu_per_thousand(burst),
                burst.cpu.as_secs_f64(),
                mib(burst.after.rss),
                mib(burst.after.peak)
            ),
            String::new(),
        ));
        rows.push((
            format!(
                "(f) embedded server: create → exec `true` → kill, {} sandboxes",
                figures::ROUND_TRIPS
            ),
            format!(
                "p50 {}, p99 {}",
                ms(self.trips.sandbox.p50),
                ms(self.trips.sandbox.p99)
            ),
            format!(
                "spawning `true`: p50 {}, p99 {}",
                ms(self.trips.spawn.p50),
                ms(self.trips.spawn.p99)
            ),
        ));
        rows.push((
            format!(
                "(f) embedded server: 256 MiB of stdout through envd, median of {} pairs",
                figures::STREAM_RUNS
            ),
            format!("{:.0} MiB/s", mib_per_second(self.stream.envd)),
            format!(
                "local pipe {:.0} MiB/s, ratio {:.2} ({:.2}–{:.2}; target ≥ 0.5)",
                mib_per_second(self.stream.pipe),
                self.stream.ratio,
                self.stream.lowest,
                self.stream.highest
            ),
        ));
        rows.push(self.peer.row(burst));
        let mut out = format!(
            "\n## Operator benchmark\n\n2 cores shared with other work (figures are noisy); sandbox isolation: {}; \
             sandbox files in {}; the bench's clients keep {CLIENT_CONCURRENCY} requests in flight; \
             whole run {:.0} s.\n\n\
             | what | figure | baseline / target |\n|---|---|---|\n",
            self.isolation, self.sandbox_dir, self.seconds
        );
        for (what, figure, baseline) in rows {
            out.push_str(&format!("| {what} | {figure} | {baseline} |\n"));
        }
        out
    }

    fn json(&self) -> Value {
        let burst = self.throughput();
        let spread =
            |spread: &Spread| json!({"p50Ms": millis(spread.p50), "p99Ms": millis(spread.p99)});
        let memory =
            |memory: &Memory| json!({"rssMiB": mib(memory.rss), "peakMiB": mib(memory.peak)});
        json!({
            "settings": {
                "tasks": self.sizes.tasks,
                "bursts": self.sizes.bursts,
                "finished": self.sizes.finished,
                "clientConcurrency": CLIENT_CONCURRENCY,
                "maxRunningTasks": "the burst's size",
                "isolation": self.isolation,
                "sandboxDir": self.sandbox_dir,
                "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
                "seconds": self.seconds,
            },
            "throughput": {
                "tasks": burst.tasks,
                "seconds": burst.seconds,
                "tasksPerSecond": Self::rate(burst.tasks, burst.seconds),
                "createToSucceeded": spread(&burst.to_succeeded),
                "failed": burst.failed,
                "cpu": burst.shares.json(burst.tasks),
            },
            "baseline": {
                "tasks": self.baseline.tasks,
                "seconds": self.baseline.seconds,
                "tasksPerSecond": Self::rate(self.baseline.tasks, self.baseline.seconds),
                "writesPerTask": self.baseline.writes.iter()
                    .map(|(key, count)| (key.clone(), json!(count / self.baseline.tasks as f64)))
                    .collect::<serde_json::Map<_, _>>(),
                "ratio": self.ratio(),
                "target": 0.8,
                "cpu": self.baseline.cpu.json(self.baseline.tasks),
                "ceilingWithSandboxCpuAlone": self.ceiling(),
            },
            "writesPerTask": {
                "agenttasks": Self::agenttask_writes(burst),
                "allResources": Self::all_writes(burst),
                "byResourceAndVerb": burst.writes.iter()
                    .map(|(key, count)| (key.clone(), json!(count / burst.tasks as f64)))
                    .collect::<serde_json::Map<_, _>>(),
                "readsByResourceAndVerb": burst.reads.iter()
                    .map(|(key, count)| (key.clone(), json!(count / burst.tasks as f64)))
                    .collect::<serde_json::Map<_, _>>(),
                "target": 4,
            },
            "controllerOverhead": self.bursts.iter().map(|burst| json!({
                "burst": burst.tasks,
                "createdToSandboxCreate": spread(&burst.to_sandbox),
                "maxMs": millis(burst.to_sandbox_max),
                "createCall": spread(&burst.create_call),
                "createdToWatchEvent": spread(&burst.to_watch),
                "watchEventToSandboxCreate": spread(&burst.beyond_watch),
                "seconds": burst.seconds,
                "operatorWarnings": burst.warnings,
                "failed": burst.failed,
            })).collect::<Vec<_>>(),
            "footprint": {
                "finishedTasks": self.footprint.tasks,
                "memory": memory(&self.footprint.memory),
                "createSeconds": self.footprint.create_seconds,
                "syncSeconds": self.footprint.sync_seconds,
                "syncCpuSeconds": self.footprint.cpu.as_secs_f64(),
                "idle": memory(&burst.before),
                "afterThroughputBurst": memory(&burst.after),
                "cpuSecondsPer1000Tasks": Self::cpu_per_thousand(burst),
                "target": {"rssMiB": 64},
            },
            "sandboxd": {
                "roundTrip": spread(&self.trips.sandbox),
                "spawnTrue": spread(&self.trips.spawn),
                "streamMiBps": mib_per_second(self.stream.envd),
                "pipeMiBps": mib_per_second(self.stream.pipe),
                "streamRatio": self.stream.ratio,
                "streamRatioLowest": self.stream.lowest,
                "streamRatioHighest": self.stream.highest,
            },
            "peer": self.peer.json(),
        })
    }
}
