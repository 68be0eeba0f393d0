//! A real, local Kubernetes control plane: etcd and kube-apiserver started as child
//! processes on free 127.0.0.1 ports, for the tests and the quickstart.
//!
//! There is no container runtime here, so no kind or k3d; the binaries are built from
//! Go modules by `tools/controlplane/build.sh`. No controller-manager runs unless asked
//! for ([`LocalCluster::start_controller_manager`]), so by default garbage collection
//! and namespace finalization do not happen.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// How long etcd and kube-apiserver get to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Why the control plane could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating test credentials: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{binary} is missing from {dir}: run scripts/setup to build it")]
    MissingBinary { binary: &'static str, dir: PathBuf },
    #[error("{process} exited during start-up ({status}); last output:\n{log}")]
    Exited {
        process: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("{process} was not ready within {timeout:?}; last output:\n{log}")]
    NotReady {
        process: &'static str,
        timeout: Duration,
        log: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("building the client: {0}")]
    Client(#[from] kube::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Where the control-plane binaries are: `$SANDCASTLE_TOOLS_BIN`, else `.tools/bin` of
/// this repository (filled by `scripts/setup`).
pub fn tools_bin_dir() -> PathBuf {
    std::env::var_os("SANDCASTLE_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo().join(".tools/bin"))
}

/// A running etcd + kube-apiserver pair. Dropping it stops both and removes their data.
pub struct LocalCluster {
    /// Behind a lock so a test sharing the cluster can stop and restart it.
    apiserver: std::sync::Mutex<Child>,
    /// The apiserver's program and flags, to start it again exactly as before.
    apiserver_command: (PathBuf, Vec<String>),
    etcd: Child,
    /// Behind a lock so a cluster shared by many tests can start it and report on it.
    controller_manager: std::sync::Mutex<Option<Child>>,
    dir: PathBuf,
    kubeconfig: Kubeconfig,
    kubeconfig_path: PathBuf,
    api_url: String,
}

impl LocalCluster {
    /// Starts etcd and kube-apiserver from `bin_dir`, keeping their data and logs in a
    /// fresh directory under `work_root`, and waits until the apiserver is ready.
    pub async fn start(bin_dir: &Path, work_root: &Path) -> Result<Self, Error> {
        for binary in ["etcd", "kube-apiserver"] {
            if !bin_dir.join(binary).is_file() {
                return Err(Error::MissingBinary {
                    binary,
                    dir: bin_dir.to_owned(),
                });
            }
        }
        fs::create_dir_all(work_root).map_err(io(format!("creating {}", work_root.display())))?;
        let work_root = fs::canonicalize(work_root)
            .map_err(io(format!("resolving {}", work_root.display())))?;
        let dir = unique_dir(&work_root)?;
        let creds = Credentials::write(&dir)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd = spawn(
            Command::new(bin_dir.join("etcd")).args([
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                // Test data is disposable; fsync only makes every write slower.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ]),
            &dir.join("etcd.log"),
        )?;

        let api_port = free_port()?;
        let api_url = format!("https://127.0.0.1:{api_port}");
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            // Without it the apiserver looks for a default route, which a sandbox may lack.
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--tls-cert-file={}", creds.serving_cert.display()),
            format!("--tls-private-key-file={}", creds.serving_key.display()),
            format!("--token-auth-file={}", creds.token_file.display()),
            format!("--service-account-issuer={api_url}"),
            format!(
                "--service-account-key-file={}",
                creds.sa_public_key.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                creds.sa_key.display()
            ),
            "--authorization-mode=RBAC".into(),
            // No controller-manager runs to create ServiceAccount tokens.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
        ];
        let apiserver_program = bin_dir.join("kube-apiserver");
        let apiserver = spawn(
            Command::new(&apiserver_program).args(&apiserver_args),
            &dir.join("kube-apiserver.log"),
        );
        let apiserver = match apiserver {
            Ok(child) => child,
            Err(err) => {
                stop(&mut etcd);
                return Err(err);
            }
        };

        let kubeconfig = kubeconfig(&api_url, &creds.ca_pem, &creds.admin_token)?;
        let kubeconfig_path = dir.join("kubeconfig");
        fs::write(
            &kubeconfig_path,
            serde_yaml::to_string(&kubeconfig).expect("a kubeconfig serializes"),
        )
        .map_err(io("writing the kubeconfig"))?;

        let mut cluster = Self {
            apiserver: std::sync::Mutex::new(apiserver),
            apiserver_command: (apiserver_program, apiserver_args),
            etcd,
            controller_manager: std::sync::Mutex::default(),
            dir,
            kubeconfig,
            kubeconfig_path,
            api_url,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        if let Ok(Some(status)) = self.etcd.try_wait() {
            return Err(Error::Exited {
                process: "etcd",
                status,
                log: log_tail(&self.dir.join("etcd.log")),
            });
        }
        self.wait_apiserver_ready().await
    }

    async fn wait_apiserver_ready(&self) -> Result<(), Error> {
        let client = self.client().await?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = self.apiserver.lock().expect("apiserver").try_wait();
            if let Ok(Some(status)) = exited {
                return Err(Error::Exited {
                    process: "kube-apiserver",
                    status,
                    log: log_tail(&self.dir.join("kube-apiserver.log")),
                });
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            if client.request_text(request).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    process: "kube-apiserver",
                    timeout: START_TIMEOUT,
                    log: log_tail(&self.dir.join("kube-apiserver.log")),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The process IDs of kube-apiserver and etcd, for a benchmark to read their CPU time.
    pub fn pids(&self) -> (u32, u32) {
        (
            self.apiserver.lock().expect("apiserver").id(),
            self.etcd.id(),
        )
    }

    /// Kills kube-apiserver, as a control-plane outage would; etcd and its data stay.
    pub fn stop_apiserver(&self) {
        stop(&mut self.apiserver.lock().expect("apiserver"));
    }

    /// Starts kube-apiserver again with the flags, port, certificates and etcd it had,
    /// and waits until it is ready. Its log goes on in the same file.
    pub async fn restart_apiserver(&self) -> Result<(), Error> {
        let (program, args) = &self.apiserver_command;
        let log = self.dir.join("kube-apiserver.log");
        let out = fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating a log handle"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        let mut earlier = std::mem::replace(&mut *self.apiserver.lock().expect("apiserver"), child);
        stop(&mut earlier);
        self.wait_apiserver_ready().await
    }

    /// Starts kube-controller-manager from `bin_dir` with only the namespace and garbage
    /// collector controllers, so deleted namespaces are emptied and finalized and owned
    /// objects follow their owners. It runs until the cluster is dropped; its log is
    /// `kube-controller-manager.log` in the cluster's directory.
    pub fn start_controller_manager(&self, bin_dir: &Path) -> Result<(), Error> {
        let binary = "kube-controller-manager";
        if !bin_dir.join(binary).is_file() {
            return Err(Error::MissingBinary {
                binary,
                dir: bin_dir.to_owned(),
            });
        }
        let child = spawn(
            Command::new(bin_dir.join(binary)).args([
                format!("--kubeconfig={}", self.kubeconfig_path.display()),
                "--controllers=namespace-controller,garbage-collector-controller".into(),
                "--leader-elect=false".into(),
                // Nothing here scrapes its metrics or health.
                "--secure-port=0".into(),
            ]),
            &self.dir.join("kube-controller-manager.log"),
        )?;
        let replaced = self
            .controller_manager
            .lock()
            .expect("controller manager")
            .replace(child);
        if let Some(mut earlier) = replaced {
            stop(&mut earlier);
        }
        Ok(())
    }

    /// The end of kube-controller-manager's log, and whether it has exited, for a test
    /// to explain why a namespace did not go away.
    pub fn controller_manager_report(&self) -> String {
        let mut controller_manager = self.controller_manager.lock().expect("controller manager");
        let state = match controller_manager.as_mut().map(Child::try_wait) {
            None => "not started".to_string(),
            Some(Ok(None)) => "running".to_string(),
            Some(Ok(Some(status))) => format!("exited ({status})"),
            Some(Err(error)) => format!("unknown ({error})"),
        };
        let log = log_tail(&self.dir.join("kube-controller-manager.log"));
        format!("kube-controller-manager {state}; last output:\n{log}")
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Result<Client, Error> {
        let config =
            Config::from_custom_kubeconfig(self.kubeconfig.clone(), &KubeConfigOptions::default())
                .await?;
        Ok(Client::try_from(config)?)
    }

    /// The kubeconfig file for `kubectl --kubeconfig` and `KUBECONFIG`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The apiserver's base URL.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(controller_manager) = self
            .controller_manager
            .get_mut()
            .expect("controller manager")
        {
            stop(controller_manager);
        }
        stop(self.apiserver.get_mut().expect("apiserver"));
        stop(&mut self.etcd);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir(root: &Path) -> Result<PathBuf, Error> {
    for attempt in 0..1000 {
        let dir = root.join(format!("cluster-{}-{attempt}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(io(format!("creating {}", dir.display()))(err)),
        }
    }
    Err(io("choosing a cluster directory")(std::io::Error::other(
        "every candidate name is taken",
    )))
}

fn free_port() -> Result<u16, Error> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port();
    Ok(port)
}

fn spawn(command: &mut Command, log: &Path) -> Result<Child, Error> {
    let out = fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io("duplicating a log handle"))?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    die_with_parent(command);
    command
        .spawn()
        .map_err(io(format!("starting {:?}", command.get_program())))
}

/// Makes the kernel kill the child when the process that started it dies, so a test
/// binary killed by a timeout leaves no apiserver behind. Drop cannot cover that case.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn stop(child: &mut Child) {
    // kube-apiserver and etcd hold nothing worth a graceful shutdown here.
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = fs::File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

/// Files the apiserver needs for TLS, authentication and ServiceAccount tokens.
struct Credentials {
    ca_pem: String,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_public_key: PathBuf,
    token_file: PathBuf,
    admin_token: String,
}

impl Credentials {
    fn write(dir: &Path) -> Result<Self, Error> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sandcastle local cluster CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let serving_key = KeyPair::generate()?;
        let serving_params = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        let serving_cert = serving_params.signed_by(&serving_key, &ca)?;

        // Random, so a token left in a log of one run opens nothing in another.
        let mut token_bytes = [0u8; 24];
        getrandom::fill(&mut token_bytes).map_err(|err| {
            io("generating the admin token")(std::io::Error::other(err.to_string()))
        })?;
        let admin_token: String = token_bytes.iter().map(|b| format!("{b:02x}")).collect();

        let sa_key = KeyPair::generate()?;
        let creds = Self {
            ca_pem: ca.pem(),
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            sa_key: dir.join("service-account.key"),
            sa_public_key: dir.join("service-account.pub"),
            token_file: dir.join("tokens.csv"),
            admin_token,
        };
        let files = [
            (&creds.serving_cert, serving_cert.pem()),
            (&creds.serving_key, serving_key.serialize_pem()),
            (&creds.sa_key, sa_key.serialize_pem()),
            (&creds.sa_public_key, sa_key.public_key_pem()),
            (
                &creds.token_file,
                format!("{},admin,admin,\"system:masters\"\n", creds.admin_token),
            ),
        ];
        for (path, content) in files {
            fs::write(path, content).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(creds)
    }
}

fn kubeconfig(api_url: &str, ca_pem: &str, token: &str) -> Result<Kubeconfig, Error> {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: sandcastle-local
  cluster:
    server: {api_url}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: sandcastle-local
  context:
    cluster: sandcastle-local
    user: admin
current-context: sandcastle-local
"
    );
    Ok(Kubeconfig::from_yaml(&yaml)?)
}
