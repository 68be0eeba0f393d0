//! The operator binary run as in production against the test control plane, with its
//! embedded sandbox server, and a client of that server to check what the operator did.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sandcastle_e2b::client::{ClientConfig, E2bClient};

const API_KEY: &str = "operator-test-key";

pub struct Operator {
    child: Child,
    root: PathBuf,
    namespace: String,
    args: Vec<String>,
    kubeconfig: PathBuf,
    settings: Vec<(String, String)>,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    api_url: String,
    sandbox_url: String,
    admin: String,
}

impl Operator {
    /// Starts `sandcastle run` for one namespace, with the embedded server's state under a
    /// directory of that namespace, and waits until the server listens.
    pub fn start(kubeconfig: &std::path::Path, namespace: &str) -> Operator {
        Operator::start_with(kubeconfig, namespace, &[])
    }

    /// Like [`Operator::start`], with extra environment (the operator's settings).
    pub fn start_with(
        kubeconfig: &std::path::Path,
        namespace: &str,
        settings: &[(&str, &str)],
    ) -> Operator {
        let root = crate::scratch_dir().join(format!("sandboxd-{namespace}"));
        let args = ["run", "--namespace", namespace, "--sandboxd-root"]
            .into_iter()
            .map(str::to_string)
            .chain([root.display().to_string()])
            .collect();
        Operator::start_args(kubeconfig, namespace, args, settings)
    }

    /// Runs the binary with exactly these arguments (a Deployment's, say); `namespace`
    /// names its embedded server's directory and its log lines in the test output.
    pub fn start_args(
        kubeconfig: &std::path::Path,
        namespace: &str,
        args: Vec<String>,
        settings: &[(&str, &str)],
    ) -> Operator {
        let root = crate::scratch_dir().join(format!("sandboxd-{namespace}"));
        let _ = std::fs::remove_dir_all(&root);
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let logs = std::sync::Arc::default();
        let (
            child,
            Started {
                api_url,
                sandbox_url,
                admin,
            },
        ) = spawn(kubeconfig, namespace, &args, &settings, &logs);
        Operator {
            child,
            root,
            namespace: namespace.to_string(),
            args,
            kubeconfig: kubeconfig.to_path_buf(),
            settings,
            logs,
            api_url,
            sandbox_url,
            admin,
        }
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let response = reqwest::get(&url)
            .await
            .expect("the admin endpoint answers");
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        response.text().await.expect("metrics text")
    }

    /// The value of one series (its name with labels exactly as exported), if exported.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.split(' ').next()?.parse().ok()
        })
    }

    /// Polls the metrics until `series` has `value`, and answers how long that took; fails
    /// when it does not within `within`. The operator counts a finished task just after
    /// writing its status, so a test that saw the status may look a moment early.
    pub async fn await_metric(&self, series: &str, value: f64, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let seen = self.metric(series).await;
            if seen == Some(value) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{series} did not become {value} within {within:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How the operator exited, if it did within `wait`.
    pub async fn exit_within(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("the operator's status") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Kills the operator at once (SIGKILL), as a node failure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A client of the operator's embedded server, to look at the provider's side.
    pub fn provider(&self) -> E2bClient {
        E2bClient::new(ClientConfig::with_urls(
            self.api_url.clone(),
            self.sandbox_url.clone(),
            API_KEY,
        ))
        .expect("client")
    }

    /// Everything the operator logged so far, stderr included.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    pub fn api_key(&self) -> &str {
        API_KEY
    }

    /// The arguments that point another `sandcastle` command (`mcp`, say) at this
    /// operator's embedded server, as an E2B provider.
    pub fn provider_args(&self) -> Vec<String> {
        [
            "--provider",
            "e2b",
            "--e2b-api-url",
            &self.api_url,
            "--e2b-sandbox-url",
            &self.sandbox_url,
            "--e2b-api-key",
            API_KEY,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Kills the operator without warning (SIGKILL) and starts it again on the same state.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, started) = spawn(
            &self.kubeconfig,
            &self.namespace,
            &self.args,
            &self.settings,
            &self.logs,
        );
        self.child = child;
        self.api_url = started.api_url;
        self.sandbox_url = started.sandbox_url;
        self.admin = started.admin;
    }
}

/// Where a started operator serves.
struct Started {
    api_url: String,
    sandbox_url: String,
    admin: String,
}

/// Starts the operator and reads its admin address and (unless another default provider
/// is configured) the embedded server's URLs from its JSON log; warnings and errors are
/// echoed to the test output.
fn spawn(
    kubeconfig: &std::path::Path,
    namespace: &str,
    args: &[String],
    settings: &[(String, String)],
    logs: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> (Child, Started) {
    let mut child = Command::new(crate::operator_binary())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("SANDCASTLE_SANDBOXD_API_KEY", API_KEY)
        .env("SANDCASTLE_LOG", "info")
        .env("SANDCASTLE_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("SANDCASTLE_VERIFY_TEMPLATES_EVERY", "2")
        .env("SANDCASTLE_SWEEP_ORPHANS_EVERY", "2")
        .envs(settings.iter().map(|(key, value)| (key, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the operator starts");
    let embedded = !settings
        .iter()
        .any(|(key, value)| key == "SANDCASTLE_PROVIDER" && value != "embedded");
    let stdout = child.stdout.take().expect("stdout");
    // A panic's message goes to stderr, outside the JSON log: kept with the log so a test
    // can look for it.
    let stderr = child.stderr.take().expect("stderr");
    let (name, kept) = (namespace.to_string(), logs.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("operator[{name}] stderr: {line}");
            kept.lock().expect("logs").push(line);
        }
    });
    let (announced, found) = mpsc::channel();
    let name = namespace.to_string();
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            kept.lock().expect("logs").push(line.clone());
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &entry["fields"];
            let text = |key: &str| fields[key].as_str().unwrap_or_default().to_string();
            if fields["message"] == "embedded sandbox server listening" {
                let _ = announced.send((text("api"), text("envd")));
            }
            if fields["message"] == "admin endpoint listening" {
                let _ = announced.send((text("address"), String::new()));
            }
            if entry["level"] == "WARN" || entry["level"] == "ERROR" {
                eprintln!("operator[{name}]: {line}");
            }
        }
    });
    let next = || {
        found
            .recv_timeout(Duration::from_secs(30))
            .expect("the operator announces its endpoints within 30 s")
    };
    let (admin, _) = next();
    let (api, envd) = if embedded { next() } else { Default::default() };
    let started = Started {
        api_url: format!("http://{api}"),
        sandbox_url: format!("http://{envd}"),
        admin,
    };
    (child, started)
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// An object [`wait_for`] can watch until its status says something.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + kube::core::object::HasStatus<Status: Clone + Default + std::fmt::Debug>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + kube::core::object::HasStatus<Status: Clone + Default + std::fmt::Debug>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static
{
}

/// Waits until the object's status satisfies `done`, and returns that status. It watches
/// the object, so it sees every state the object passes through, however briefly (a
/// finished task a short TTL deletes at once); an object deleted before it got there
/// fails the wait at once, saying so, instead of reading as an empty status until the
/// time runs out; so does one the watch does not find when it starts or restarts.
pub async fn wait_for<K>(
    api: &kube::Api<K>,
    name: &str,
    what: &str,
    done: impl Fn(&K::Status) -> bool,
) -> K::Status
where
    K: Watched,
{
    wait_for_within(api, name, what, Duration::from_secs(60), done).await
}

/// [`wait_for`], for at most `wait`.
pub async fn wait_for_within<K>(
    api: &kube::Api<K>,
    name: &str,
    what: &str,
    wait: Duration,
    done: impl Fn(&K::Status) -> bool,
) -> K::Status
where
    K: Watched,
{
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config));
    let mut last = None;
    // Whether the listing that (re)starts the watch found the object: one that lists
    // nothing means it is gone (or was never made), which no later event would say.
    let mut listed = false;
    let watched = tokio::time::timeout(wait, async {
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(object) | Event::InitApply(object)) => {
                    listed = true;
                    let status = object.status().cloned().unwrap_or_default();
                    if done(&status) {
                        return Ok(status);
                    }
                    last = Some(status);
                }
                Ok(Event::Init) => listed = false,
                Ok(Event::InitDone) if !listed => {
                    return Err(format!(
                        "{name}: does not exist (deleted before it was {what}, or never \
                         created); last seen: {last:#?}"
                    ));
                }
                Ok(Event::Delete(object)) => {
                    return Err(format!(
                        "{name}: deleted before it was {what}; last seen: {:#?}",
                        object.status()
                    ));
                }
                // The watch restarts by itself after an error; the timeout bounds it all.
                Ok(Event::InitDone) | Err(_) => {}
            }
        }
        Err(format!("{name}: the watch ended before it was {what}"))
    })
    .await;
    match watched {
        Ok(Ok(status)) => status,
        Ok(Err(failure)) => panic!("{failure}"),
        Err(_) => panic!("{name}: not {what} within {wait:?}: {last:#?}"),
    }
}
