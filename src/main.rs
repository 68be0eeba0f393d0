use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sandcastle::{crd, localcluster};

/// Sandcastle runs AI coding agents in sandboxes, declared as Kubernetes resources.
#[derive(Parser)]
#[command(name = "sandcastle", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run {
        /// Watch only this namespace instead of all namespaces.
        #[arg(long, env = "SANDCASTLE_NAMESPACE")]
        namespace: Option<String>,
        /// Log filter, in `RUST_LOG` syntax.
        #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
        log: String,
        #[command(flatten)]
        embedded: EmbeddedArgs,
        /// Template builds allowed to run at once; more wait in the `Queued` state.
        #[arg(long, env = "SANDCASTLE_MAX_CONCURRENT_BUILDS", default_value_t = 4)]
        max_concurrent_builds: usize,
        /// Tasks allowed to hold a sandbox at once; more wait, in creation order, as `Queued`.
        #[arg(long, env = "SANDCASTLE_MAX_RUNNING_TASKS", default_value_t = 20)]
        max_running_tasks: usize,
        /// The same cap for each namespace; none when unset.
        #[arg(long, env = "SANDCASTLE_MAX_RUNNING_TASKS_PER_NAMESPACE")]
        max_running_tasks_per_namespace: Option<usize>,
        /// Marks the sandboxes this operator creates; its orphan sweep kills only those.
        #[arg(long, env = "SANDCASTLE_INSTANCE", default_value = "sandcastle")]
        instance: String,
        /// Seconds between sweeps for sandboxes whose task no longer exists.
        #[arg(long, env = "SANDCASTLE_SWEEP_ORPHANS_EVERY", default_value_t = 300)]
        sweep_orphans_every: u64,
        /// How sandboxes invoke the Claude Code CLI: a name on their PATH or an absolute path.
        #[arg(long, env = "SANDCASTLE_CLAUDE_COMMAND", default_value = "claude")]
        claude_command: String,
        /// Seconds between checks that a Ready template still exists on its provider (one
        /// cheap call each); a vanished template is built again.
        #[arg(long, env = "SANDCASTLE_VERIFY_TEMPLATES_EVERY", default_value_t = 600)]
        verify_templates_every: u64,
    },
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start a local control plane (etcd + kube-apiserver) with the CRDs installed, and run
    /// the operator against it on the embedded sandbox server until interrupted.
    Dev {
        /// Directory holding the kube-apiserver and etcd binaries (see scripts/setup).
        #[arg(long, env = "SANDCASTLE_TOOLS_BIN", default_value_os_t = localcluster::tools_bin_dir())]
        tools_bin: PathBuf,
        /// Directory for the control plane's data, logs and kubeconfig.
        #[arg(long, default_value = "target/dev")]
        work_dir: PathBuf,
        /// Apply the manifests of this directory once the operator runs, wait for the
        /// example task `hello-command`, and print what it did.
        #[arg(long)]
        apply: Option<PathBuf>,
    },
    /// Run the embedded E2B-compatible sandbox server on its own.
    Sandboxd {
        /// Directory for templates, sandboxes and uploads.
        #[arg(long, default_value = "target/sandboxd")]
        root: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        listen: std::net::IpAddr,
        /// Port of the control-plane API (what E2B_API_URL points at).
        #[arg(long, default_value_t = 3000)]
        api_port: u16,
        /// Port of envd for every sandbox (what E2B_SANDBOX_URL points at).
        #[arg(long, default_value_t = 49983)]
        envd_port: u16,
        /// Accept only this API key (otherwise any non-empty key).
        #[arg(long, env = "SANDCASTLE_SANDBOXD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        isolation: sandcastle::sandboxd::Isolation,
        /// Give sandboxes a private network namespace with only loopback.
        #[arg(long)]
        no_network: bool,
        #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
        log: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run {
            namespace,
            log,
            embedded,
            max_concurrent_builds,
            max_running_tasks,
            max_running_tasks_per_namespace,
            instance,
            sweep_orphans_every,
            claude_command,
            verify_templates_every,
        } => {
            let settings = Limits {
                max_concurrent_builds,
                verify_templates_every: std::time::Duration::from_secs(verify_templates_every),
                claude_command,
                instance,
                sweep_orphans_every: std::time::Duration::from_secs(sweep_orphans_every.max(1)),
                max_running_tasks,
                max_running_tasks_per_namespace,
            };
            run(namespace, &log, embedded, settings).await
        }
        Command::Crd { out } => print_crds(out),
        Command::Dev {
            tools_bin,
            work_dir,
            apply,
        } => dev(&tools_bin, &work_dir, apply).await,
        Command::Sandboxd {
            root,
            listen,
            api_port,
            envd_port,
            api_key,
            isolation,
            no_network,
            log,
        } => {
            let mut config = sandcastle::sandboxd::Config::new(root);
            config.listen = listen;
            config.api_port = api_port;
            config.envd_port = envd_port;
            config.api_key = api_key;
            config.isolation = isolation;
            config.network = !no_network;
            sandboxd(config, &log).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

async fn sandboxd(config: sandcastle::sandboxd::Config, log: &str) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log)?)
        .init();
    let server = sandcastle::sandboxd::Sandboxd::start(config).await?;
    println!("E2B_API_URL={}", server.api_url());
    println!("E2B_SANDBOX_URL={}", server.sandbox_url());
    let _ = terminated().await;
    server.stop().await;
    Ok(())
}

/// The embedded sandbox server the operator starts as its default provider.
#[derive(clap::Args)]
struct EmbeddedArgs {
    /// Directory for the embedded server's templates, sandboxes and uploads.
    #[arg(
        long,
        env = "SANDCASTLE_SANDBOXD_ROOT",
        default_value = "/var/lib/sandcastle/sandboxd"
    )]
    sandboxd_root: PathBuf,
    /// Port of its control-plane API on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "SANDCASTLE_SANDBOXD_API_PORT", default_value_t = 0)]
    sandboxd_api_port: u16,
    /// Port of its envd on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "SANDCASTLE_SANDBOXD_ENVD_PORT", default_value_t = 0)]
    sandboxd_envd_port: u16,
    /// The API key it accepts; a random one when unset (only the operator needs it).
    #[arg(long, env = "SANDCASTLE_SANDBOXD_API_KEY", hide_env_values = true)]
    sandboxd_api_key: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    sandboxd_isolation: sandcastle::sandboxd::Isolation,
    /// Host directories mounted read-only at the same path in every embedded sandbox
    /// (an agent CLI installed outside /usr, say); `:`-separated in the variable.
    #[arg(long, env = "SANDCASTLE_SANDBOXD_HOST_PATHS", value_delimiter = ':')]
    sandboxd_host_path: Vec<PathBuf>,
}

/// The operator's settings beyond the cluster and the embedded server.
struct Limits {
    max_concurrent_builds: usize,
    verify_templates_every: std::time::Duration,
    claude_command: String,
    instance: String,
    sweep_orphans_every: std::time::Duration,
    max_running_tasks: usize,
    max_running_tasks_per_namespace: Option<usize>,
}

async fn run(
    namespace: Option<String>,
    log: &str,
    embedded: EmbeddedArgs,
    limits: Limits,
) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log)?)
        .init();
    let client = kube::Client::try_default().await?;
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "starting"
    );
    operate(
        client,
        sandcastle::controller::Scope { namespace },
        embedded,
        limits,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the embedded sandbox server and runs the controllers until SIGTERM or Ctrl-C.
async fn operate(
    client: kube::Client,
    scope: sandcastle::controller::Scope,
    embedded: EmbeddedArgs,
    limits: Limits,
) -> Result<(), BoxError> {
    let mut config = sandcastle::sandboxd::Config::new(embedded.sandboxd_root);
    config.api_port = embedded.sandboxd_api_port;
    config.envd_port = embedded.sandboxd_envd_port;
    config.isolation = embedded.sandboxd_isolation;
    config.host_paths = embedded.sandboxd_host_path;
    let api_key = embedded
        .sandboxd_api_key
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    config.api_key = Some(api_key.clone());
    let server = sandcastle::sandboxd::Sandboxd::start(config).await?;
    let embedded =
        sandcastle::e2b::client::E2bClient::new(sandcastle::e2b::client::ClientConfig::with_urls(
            server.api_url(),
            server.sandbox_url(),
            api_key,
        ))?;
    let settings = sandcastle::controller::Settings {
        embedded,
        max_concurrent_builds: limits.max_concurrent_builds,
        verify_templates_every: limits.verify_templates_every,
        claude_command: limits.claude_command,
        instance: limits.instance,
        sweep_orphans_every: limits.sweep_orphans_every,
        max_running_tasks: limits.max_running_tasks,
        max_running_tasks_per_namespace: limits.max_running_tasks_per_namespace,
    };
    let result = sandcastle::controller::run(client, scope, settings, async {
        let _ = terminated().await;
    })
    .await;
    server.stop().await;
    Ok(result?)
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends to stop a pod).
async fn terminated() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate.recv() => Ok(()),
    }
}

fn print_crds(out: Option<PathBuf>) -> Result<(), BoxError> {
    let crds = crd::all();
    match out {
        None => print!("{}", crd::to_yaml(&crds)?),
        Some(dir) => {
            for one in crds {
                let path = dir.join(crd::file_name(&one));
                std::fs::write(&path, crd::to_yaml(std::slice::from_ref(&one))?)
                    .map_err(|err| format!("writing {}: {err}", path.display()))?;
            }
        }
    }
    Ok(())
}

async fn dev(
    tools_bin: &std::path::Path,
    work_dir: &std::path::Path,
    apply: Option<PathBuf>,
) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(
            "warn,sandcastle=info,kube_client::client::builder=off",
        )?)
        .init();
    let cluster = localcluster::LocalCluster::start(tools_bin, work_dir).await?;
    let client = cluster.client().await?;
    crd::install(&client).await?;
    let kubeconfig = std::fs::canonicalize(cluster.kubeconfig_path())?;
    println!(
        "A local control plane is running at {}, with the Sandcastle CRDs",
        cluster.api_url()
    );
    println!("installed and the operator running against it on the embedded sandbox server.");
    println!("Point kubectl at it with:");
    println!();
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl apply -f examples/");
    println!("  kubectl get sandcastle -o wide");
    println!();
    println!("Press Ctrl-C to stop (the control plane's data is removed).");
    let mut embedded = EmbeddedArgs {
        sandboxd_root: std::fs::canonicalize(work_dir)?.join("sandboxd"),
        sandboxd_api_port: 0,
        sandboxd_envd_port: 0,
        sandboxd_api_key: None,
        sandboxd_isolation: sandcastle::sandboxd::Isolation::Auto,
        sandboxd_host_path: Vec::new(),
    };
    let mut limits = Limits {
        max_concurrent_builds: 4,
        verify_templates_every: std::time::Duration::from_secs(600),
        claude_command: "claude".into(),
        instance: "sandcastle-dev".into(),
        sweep_orphans_every: std::time::Duration::from_secs(300),
        max_running_tasks: 20,
        max_running_tasks_per_namespace: None,
    };
    // The pinned CLI scripts/setup installed, made visible inside the embedded sandboxes.
    if let Ok(claude) = tools_bin.join("claude").canonicalize()
        && let Some(prefix) = claude
            .ancestors()
            .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
            .and_then(std::path::Path::parent)
    {
        embedded.sandboxd_host_path.push(prefix.to_path_buf());
        limits.claude_command = claude.display().to_string();
    }
    if let Some(manifests) = apply {
        let kubectl = tools_bin.join("kubectl");
        let (client, kubeconfig) = (client.clone(), kubeconfig.clone());
        tokio::spawn(async move {
            if let Err(error) = show_example(&kubectl, &kubeconfig, &manifests, client).await {
                eprintln!("the example did not run: {error}");
            }
        });
    }
    operate(
        client,
        sandcastle::controller::Scope::default(),
        embedded,
        limits,
    )
    .await?;
    drop(cluster);
    Ok(())
}

/// Applies the examples with kubectl, waits for `hello-command` to finish and prints
/// the tasks and that task's result, the way a user would look at them.
async fn show_example(
    kubectl: &std::path::Path,
    kubeconfig: &std::path::Path,
    manifests: &std::path::Path,
    client: kube::Client,
) -> Result<(), BoxError> {
    let run = |args: Vec<String>| {
        let (kubectl, kubeconfig) = (kubectl.to_path_buf(), kubeconfig.to_path_buf());
        async move {
            let out = tokio::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(&args)
                .output()
                .await?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                return Err(format!("kubectl {}: {stderr}", args.join(" ")).into());
            }
            Ok::<_, BoxError>(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    // The Claude Code example's Secret, from the caller's environment when it has a key
    // (through the API, so the value never shows on a command line).
    let anthropic: std::collections::BTreeMap<&str, String> = [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok().map(|value| (name, value)))
    .collect();
    if !anthropic.is_empty() {
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(client.clone(), "default");
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "anthropic"},
            "stringData": anthropic,
        });
        secrets
            .patch(
                "anthropic",
                &kube::api::PatchParams::apply("sandcastle-dev").force(),
                &kube::api::Patch::Apply(&secret),
            )
            .await?;
    }
    print!(
        "{}",
        run(vec![
            "apply".into(),
            "-f".into(),
            manifests.display().to_string()
        ])
        .await?
    );
    let tasks: kube::Api<sandcastle::crd::AgentTask> = kube::Api::namespaced(client, "default");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let status = tasks.get("hello-command").await?.status.unwrap_or_default();
        if matches!(
            status.phase,
            Some(sandcastle::crd::TaskPhase::Succeeded | sandcastle::crd::TaskPhase::Failed)
        ) {
            break status;
        }
        if std::time::Instant::now() > deadline {
            return Err("hello-command did not finish within 120 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    println!();
    let listing = vec![
        "get".into(),
        "agenttasks,sandboxtemplates".into(),
        "-o".into(),
        "wide".into(),
    ];
    print!("{}", run(listing).await?);
    println!();
    let result = status.result.unwrap_or_default();
    let phase = status.phase.unwrap_or(sandcastle::crd::TaskPhase::Pending);
    println!("hello-command: {phase:?}, exit code {:?}", result.exit_code);
    println!("  result: {}", result.text.trim_end());
    for file in &status.files {
        println!("  wrote {} ({} bytes)", file.path, file.size);
    }
    println!();
    println!("The operator keeps running; press Ctrl-C to stop.");
    Ok(())
}
