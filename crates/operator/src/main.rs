use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sandcastle_api as crd;

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
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
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
        isolation: sandcastle_sandboxd::Isolation,
        /// Give sandboxes a private network namespace with only loopback.
        #[arg(long)]
        no_network: bool,
        #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
        log: String,
    },
    /// Run the E2B-compatible sandbox server with its kubernetes runtime: every sandbox a
    /// Pod in one namespace, any number of replicas.
    SandboxdKubernetes(Box<KubeSandboxdArgs>),
    /// Run the MCP server: run_code (Python, JavaScript, bash) in sandboxes, with
    /// contexts that keep state, and AgentTasks as tools. Over stdio (for a desktop
    /// client) or streamable HTTP (in a cluster).
    Mcp(Box<McpArgs>),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum McpTransport {
    Stdio,
    Http,
}

#[derive(clap::Args)]
struct McpArgs {
    #[arg(
        long,
        env = "SANDCASTLE_MCP_TRANSPORT",
        value_enum,
        default_value = "stdio"
    )]
    transport: McpTransport,
    /// Where streamable HTTP listens; the endpoint is /mcp.
    #[arg(long, env = "SANDCASTLE_MCP_LISTEN", default_value = "127.0.0.1:8090")]
    listen: std::net::SocketAddr,
    /// Host names clients may address the HTTP server by, beyond loopback (the Service's
    /// name in a cluster); the Host header is checked against them, against DNS rebinding.
    #[arg(long, env = "SANDCASTLE_MCP_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_host: Vec<String>,
    /// Require `Authorization: Bearer <token>` on HTTP requests.
    #[arg(long, env = "SANDCASTLE_MCP_BEARER_TOKEN", hide_env_values = true)]
    bearer_token: Option<String>,
    /// The template (ID or name on the provider) run_code's sandboxes start from.
    #[arg(long, env = "SANDCASTLE_MCP_TEMPLATE", default_value = "base")]
    template: String,
    /// The most sandboxes alive at once.
    #[arg(long, env = "SANDCASTLE_MCP_MAX_SANDBOXES", default_value_t = 4)]
    max_sandboxes: usize,
    /// Calls and contexts sharing one sandbox before another is made.
    #[arg(long, env = "SANDCASTLE_MCP_PER_SANDBOX", default_value_t = 8)]
    per_sandbox: usize,
    /// Seconds a sandbox nobody uses is kept.
    #[arg(
        long,
        env = "SANDCASTLE_MCP_SANDBOX_IDLE_SECONDS",
        default_value_t = 300
    )]
    sandbox_idle_seconds: u64,
    /// The lifetime given to each sandbox on its provider and renewed while the server
    /// lives: the longest a sandbox outlives a crashed server that no sweep covers.
    #[arg(
        long,
        env = "SANDCASTLE_MCP_SANDBOX_LIFETIME_SECONDS",
        default_value_t = 300
    )]
    sandbox_lifetime_seconds: u64,
    #[arg(long, env = "SANDCASTLE_MCP_MAX_CONTEXTS", default_value_t = 32)]
    max_contexts: usize,
    /// Seconds an unused context keeps its interpreter.
    #[arg(
        long,
        env = "SANDCASTLE_MCP_CONTEXT_IDLE_SECONDS",
        default_value_t = 1800
    )]
    context_idle_seconds: u64,
    /// The namespace of the task tools.
    #[arg(long, env = "SANDCASTLE_MCP_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The namespace of the server's Lease (its liveness for the orphan sweep); --namespace
    /// when unset. In a pod, the pod's own, so the pod can own the Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This server's name in its Lease; the host name and process ID when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the server's Lease holds unrenewed: once it has run out, the operator's
    /// orphan sweep kills the sandboxes of a server that crashed.
    #[arg(long, env = "SANDCASTLE_MCP_LEASE_SECONDS", default_value_t = sandcastle_mcp::liveness::LEASE_SECONDS)]
    lease_seconds: i32,
    /// The UID of the server's Pod (the downward API's metadata.uid): with the Pod's name
    /// (POD_NAME), the Pod then owns the server's Lease, which goes with it.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Do without a cluster: no task tools, and no Lease for the orphan sweep.
    #[arg(long)]
    no_kubernetes: bool,
    #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
    log: String,
    #[command(flatten)]
    provider: ProviderArgs,
    #[command(flatten)]
    embedded: EmbeddedArgs,
}

#[derive(clap::Args)]
struct KubeSandboxdArgs {
    /// Where sandbox pods and templates live.
    #[arg(long, env = "SANDCASTLE_SANDBOX_NAMESPACE")]
    namespace: String,
    /// An image with the static envd binary at --envd-path, for the pods' init container.
    #[arg(long, env = "SANDCASTLE_ENVD_IMAGE")]
    envd_image: String,
    #[arg(long, default_value = "/usr/local/bin/sandcastle-envd")]
    envd_path: String,
    /// The image of the `base` template.
    #[arg(long, env = "SANDCASTLE_BASE_IMAGE")]
    base_image: String,
    #[arg(long, default_value = "0.0.0.0")]
    listen: std::net::IpAddr,
    #[arg(long, default_value_t = 3000)]
    api_port: u16,
    #[arg(long, default_value_t = 49983)]
    envd_port: u16,
    #[arg(long, env = "SANDCASTLE_SANDBOXD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, env = "SANDCASTLE_RUNTIME_CLASS")]
    runtime_class_name: Option<String>,
    /// KEY=VALUE; repeat for more.
    #[arg(long, env = "SANDCASTLE_NODE_SELECTOR", value_delimiter = ',', value_parser = key_value)]
    node_selector: Vec<(String, String)>,
    /// A JSON list of Kubernetes tolerations.
    #[arg(long, env = "SANDCASTLE_TOLERATIONS", default_value = "[]")]
    tolerations: String,
    /// The labels of the server's own pods (KEY=VALUE, repeatable): sandboxes admit
    /// traffic from these only.
    #[arg(long, env = "SANDCASTLE_SERVER_LABELS", value_delimiter = ',', value_parser = key_value)]
    server_label: Vec<(String, String)>,
    #[arg(long, env = "SANDCASTLE_SERVER_NAMESPACE")]
    server_namespace: Option<String>,
    /// Egress denied even to sandboxes with internet access (CIDR, repeatable); defaults
    /// to the private ranges and the link-local metadata range.
    #[arg(long, env = "SANDCASTLE_DENY_CIDRS", value_delimiter = ',')]
    deny_cidr: Vec<String>,
    #[arg(long, default_value_t = 100)]
    max_sandboxes: usize,
    /// The share of a template's CPUs its sandboxes request (their limit is all of them).
    #[arg(long, env = "SANDCASTLE_CPU_REQUEST_FRACTION", default_value_t = 1.0)]
    cpu_request_fraction: f64,
    /// kaniko's executor image: templates with RUN or COPY steps are built with it, in
    /// Jobs. Without it such builds fail at their first RUN or COPY step.
    #[arg(
        long,
        env = "SANDCASTLE_BUILDER_IMAGE",
        requires = "builder_repository"
    )]
    builder_image: Option<String>,
    /// Where built template images are pushed (HOST[:PORT]/PATH); nodes pull them from
    /// there by digest.
    #[arg(
        long,
        env = "SANDCASTLE_BUILDER_REPOSITORY",
        requires = "builder_image"
    )]
    builder_repository: Option<String>,
    /// The registry of --builder-repository (and of template base images) speaks plain HTTP.
    #[arg(long, env = "SANDCASTLE_BUILDER_INSECURE")]
    builder_insecure: bool,
    /// The build Jobs' namespace (it must admit the baseline Pod Security profile);
    /// defaults to --namespace.
    #[arg(long, env = "SANDCASTLE_BUILDER_NAMESPACE")]
    builder_namespace: Option<String>,
    /// Seconds a build may take.
    #[arg(long, env = "SANDCASTLE_BUILD_TIMEOUT", default_value_t = 1800)]
    build_timeout: u64,
    #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
    log: String,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => run(*args).await,
        Command::Crd { out } => print_crds(out),
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
            let mut config = sandcastle_sandboxd::Config::new(root);
            config.listen = listen;
            config.api_port = api_port;
            config.envd_port = envd_port;
            config.api_key = api_key;
            config.isolation = isolation;
            config.network = !no_network;
            sandboxd(config, &log).await
        }
        Command::SandboxdKubernetes(args) => sandboxd_kubernetes(*args).await,
        Command::Mcp(args) => mcp(*args).await,
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

async fn sandboxd(config: sandcastle_sandboxd::Config, log: &str) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log)?)
        .init();
    let server = sandcastle_sandboxd::Sandboxd::start(config).await?;
    println!("E2B_API_URL={}", server.api_url());
    println!("E2B_SANDBOX_URL={}", server.sandbox_url());
    let _ = terminated().await;
    server.stop().await;
    Ok(())
}

async fn sandboxd_kubernetes(args: KubeSandboxdArgs) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .init();
    let mut config = sandcastle_sandboxd::KubeConfig::new(args.namespace, args.envd_image);
    config.envd_path = args.envd_path;
    config.base_image = args.base_image;
    config.listen = args.listen;
    config.api_port = args.api_port;
    config.envd_port = args.envd_port;
    config.api_key = args.api_key;
    config.runtime_class = args.runtime_class_name;
    config.node_selector = args.node_selector.into_iter().collect();
    config.tolerations = serde_json::from_str(&args.tolerations)
        .map_err(|error| format!("--tolerations is not a JSON list: {error}"))?;
    config.server_labels = args.server_label.into_iter().collect();
    config.server_namespace = args.server_namespace;
    if !args.deny_cidr.is_empty() {
        config.denied_cidrs = args.deny_cidr;
    }
    config.max_sandboxes = args.max_sandboxes;
    config.cpu_request_fraction = args.cpu_request_fraction;
    if let (Some(image), Some(repository)) = (args.builder_image, args.builder_repository) {
        config.builder = Some(sandcastle_sandboxd::BuilderConfig {
            image,
            repository,
            insecure: args.builder_insecure,
            namespace: args
                .builder_namespace
                .unwrap_or_else(|| config.namespace.clone()),
            timeout: std::time::Duration::from_secs(args.build_timeout),
        });
    }
    let client = kube::Client::try_default().await?;
    let server = sandcastle_sandboxd::KubeSandboxd::start(config, client).await?;
    println!("E2B_API_URL={}", server.api_url());
    println!("E2B_SANDBOX_URL={}", server.sandbox_url());
    let _ = terminated().await;
    server.stop().await;
    Ok(())
}

async fn mcp(args: McpArgs) -> Result<(), BoxError> {
    // stdout is the protocol on stdio: everything else goes to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .init();
    let metrics = Arc::new(sandcastle::metrics::Metrics::new());
    let (provider, embedded) = match args.provider.provider {
        ProviderKind::Embedded => {
            let (client, server) = start_embedded(args.embedded, &metrics).await?;
            (client, Some(server))
        }
        ProviderKind::E2b => (
            e2b_provider(args.provider, &metrics)?.ok_or("the e2b provider needs E2B_API_KEY")?,
            None,
        ),
    };
    let kube = if args.no_kubernetes {
        None
    } else {
        match kube::Client::try_default().await {
            Ok(client) => Some(client),
            Err(error) => {
                tracing::warn!(%error, "no Kubernetes cluster: the task tools are off");
                None
            }
        }
    };
    let pod = args.identity.clone().zip(args.pod_uid);
    let identity = args
        .identity
        .unwrap_or_else(default_identity)
        .to_ascii_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
    let settings = sandcastle_mcp::server::Settings {
        pool: sandcastle_mcp::sandboxes::PoolSettings {
            template: args.template,
            max_sandboxes: args.max_sandboxes.max(1),
            per_sandbox: args.per_sandbox.max(1),
            idle_timeout: std::time::Duration::from_secs(args.sandbox_idle_seconds),
            lifetime: std::time::Duration::from_secs(args.sandbox_lifetime_seconds.max(30)),
            wait: std::time::Duration::from_secs(60),
            metadata: Default::default(),
        },
        max_contexts: args.max_contexts,
        context_idle_timeout: std::time::Duration::from_secs(args.context_idle_seconds),
        lease_namespace: args
            .lease_namespace
            .unwrap_or_else(|| args.namespace.clone()),
        namespace: args.namespace,
        identity,
        lease_seconds: args.lease_seconds,
        pod,
    };
    let transport = match args.transport {
        McpTransport::Stdio => sandcastle_mcp::server::Transport::Stdio,
        McpTransport::Http => sandcastle_mcp::server::Transport::Http {
            listen: args.listen,
            allowed_hosts: args.allowed_host,
            bearer_token: args.bearer_token,
        },
    };
    let stop = async {
        let _ = terminated().await;
    };
    let served = sandcastle_mcp::server::serve(provider, kube, settings, transport, stop).await;
    if let Some(server) = embedded {
        server.stop().await;
    }
    served.map_err(|error| error.to_string().into())
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (repeat the flag for more); all namespaces when absent.
    #[arg(long, env = "SANDCASTLE_NAMESPACES", value_delimiter = ',')]
    namespace: Vec<String>,
    /// Log filter, in `RUST_LOG` syntax.
    #[arg(long, env = "SANDCASTLE_LOG", default_value = "info")]
    log: String,
    #[arg(
        long,
        env = "SANDCASTLE_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "SANDCASTLE_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    admin_address: std::net::SocketAddr,
    #[command(flatten)]
    election: ElectionArgs,
    #[command(flatten)]
    provider: ProviderArgs,
    #[command(flatten)]
    embedded: EmbeddedArgs,
    #[command(flatten)]
    limits: Limits,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// Several replicas elect one leader through a Lease; only the leader reconciles.
#[derive(clap::Args)]
struct ElectionArgs {
    /// Reconcile only while holding the leader lease.
    #[arg(long, env = "SANDCASTLE_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the lease (the operator's own, in a cluster).
    #[arg(
        long,
        env = "SANDCASTLE_LEADER_ELECTION_NAMESPACE",
        default_value = "default"
    )]
    leader_election_namespace: String,
    #[arg(
        long,
        env = "SANDCASTLE_LEADER_ELECTION_LEASE",
        default_value = "sandcastle"
    )]
    leader_election_lease: String,
    /// How long the lease lasts unrenewed: the most a standby waits for a vanished leader.
    #[arg(
        long,
        env = "SANDCASTLE_LEADER_ELECTION_LEASE_SECONDS",
        default_value_t = 15
    )]
    leader_election_lease_seconds: u64,
    /// This replica's name in the lease; the host name and process ID when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

/// The provider of templates that do not name their own.
#[derive(clap::Args)]
struct ProviderArgs {
    /// `embedded`: the sandbox server inside the operator (development); `e2b`: an E2B
    /// or E2B-compatible service.
    #[arg(
        long,
        env = "SANDCASTLE_PROVIDER",
        value_enum,
        default_value = "embedded"
    )]
    provider: ProviderKind,
    #[arg(long, env = "E2B_DOMAIN", default_value = sandcastle_e2b::client::DEFAULT_DOMAIN)]
    e2b_domain: String,
    /// The REST API; `https://api.<domain>` when unset.
    #[arg(long, env = "E2B_API_URL")]
    e2b_api_url: Option<String>,
    /// envd's URL pattern, with `{port}`, `{sandboxId}` and `{domain}`.
    #[arg(long, env = "E2B_SANDBOX_URL")]
    e2b_sandbox_url: Option<String>,
    /// Without a key, templates that name no provider report `ProviderNotConfigured`.
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    e2b_api_key: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProviderKind {
    Embedded,
    E2b,
}

/// The embedded sandbox server, when it is the default provider.
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
    /// The most sandboxes it runs at once, warm pools' idle ones included; a create
    /// beyond it gets E2B's 429.
    #[arg(long, env = "SANDCASTLE_SANDBOXD_MAX_SANDBOXES", default_value_t = 100)]
    sandboxd_max_sandboxes: usize,
    #[arg(
        long,
        env = "SANDCASTLE_SANDBOXD_ISOLATION",
        value_enum,
        default_value = "auto"
    )]
    sandboxd_isolation: sandcastle_sandboxd::Isolation,
    /// Host directories mounted read-only at the same path in every embedded sandbox
    /// (an agent CLI installed outside /usr, say); `:`-separated in the variable.
    #[arg(long, env = "SANDCASTLE_SANDBOXD_HOST_PATHS", value_delimiter = ':')]
    sandboxd_host_path: Vec<PathBuf>,
}

/// The operator's settings beyond the cluster and the providers.
#[derive(clap::Args)]
struct Limits {
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
}

async fn run(args: RunArgs) -> Result<(), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)?;
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let metrics = Arc::new(sandcastle::metrics::Metrics::new());
    let readiness = Arc::new(sandcastle::admin::Readiness::default());
    let admin =
        sandcastle::admin::serve(args.admin_address, metrics.clone(), readiness.clone()).await?;
    tracing::info!(address = %admin, "admin endpoint listening");
    let client = kube::Client::try_default().await?;
    sandcastle::controller::check_crds(&client).await?;
    readiness.set(true);
    let namespaces = if args.namespace.is_empty() {
        "(all)".to_string()
    } else {
        args.namespace.join(",")
    };
    tracing::info!(%namespaces, "starting");
    let scope = sandcastle::controller::Scope {
        namespaces: args.namespace,
    };
    let election = args
        .election
        .leader_election
        .then(|| sandcastle::leader::Election {
            namespace: args.election.leader_election_namespace,
            lease: args.election.leader_election_lease,
            identity: args.election.identity.unwrap_or_else(default_identity),
            lease_seconds: args.election.leader_election_lease_seconds,
        });
    operate(
        client,
        scope,
        (args.provider, args.embedded),
        args.limits,
        election,
        metrics,
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "sandcastle".into());
    format!("{host}-{}", std::process::id())
}

/// Starts the default provider, waits for the leader lease when elections are on, and
/// runs the controllers until SIGTERM or Ctrl-C, or until the lease is lost.
async fn operate(
    client: kube::Client,
    scope: sandcastle::controller::Scope,
    (provider, embedded): (ProviderArgs, EmbeddedArgs),
    limits: Limits,
    election: Option<sandcastle::leader::Election>,
    metrics: Arc<sandcastle::metrics::Metrics>,
) -> Result<(), BoxError> {
    let (default_provider, server) = match provider.provider {
        ProviderKind::Embedded => {
            let (client, server) = start_embedded(embedded, &metrics).await?;
            (Some(client), Some(server))
        }
        ProviderKind::E2b => (e2b_provider(provider, &metrics)?, None),
    };
    let leadership = match &election {
        None => None,
        Some(election) => {
            tokio::select! {
                leading = sandcastle::leader::acquire(client.clone(), election) => Some(leading?),
                _ = terminated() => {
                    if let Some(server) = server {
                        server.stop().await;
                    }
                    return Ok(());
                }
            }
        }
    };
    metrics.set_leader(true);
    let lost = leadership.as_ref().map(|leadership| leadership.lost());
    let lost_lease = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let lost_lease = lost_lease.clone();
        async move {
            match lost {
                Some(lost) => tokio::select! {
                    _ = lost => lost_lease.store(true, std::sync::atomic::Ordering::Relaxed),
                    _ = terminated() => {}
                },
                None => {
                    let _ = terminated().await;
                }
            }
        }
    };
    let embedded = server.is_some().then(|| default_provider.clone()).flatten();
    let settings = sandcastle::controller::Settings {
        default_provider,
        embedded,
        metrics: metrics.clone(),
        max_concurrent_builds: limits.max_concurrent_builds,
        verify_templates_every: std::time::Duration::from_secs(limits.verify_templates_every),
        claude_command: limits.claude_command,
        instance: limits.instance,
        sweep_orphans_every: std::time::Duration::from_secs(limits.sweep_orphans_every.max(1)),
        max_running_tasks: limits.max_running_tasks,
        max_running_tasks_per_namespace: limits.max_running_tasks_per_namespace,
    };
    let result = sandcastle::controller::run(client, scope, settings, shutdown).await;
    metrics.set_leader(false);
    if let Some(server) = server {
        server.stop().await;
    }
    if lost_lease.load(std::sync::atomic::Ordering::Relaxed) {
        // Another replica leads now; starting over as a standby is the pod's restart.
        tracing::error!("lost the leader lease; exiting to rejoin as a standby");
        return Err("lost the leader lease".into());
    }
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    Ok(result?)
}

async fn start_embedded(
    embedded: EmbeddedArgs,
    metrics: &Arc<sandcastle::metrics::Metrics>,
) -> Result<
    (
        sandcastle_e2b::client::E2bClient,
        sandcastle_sandboxd::Sandboxd,
    ),
    BoxError,
> {
    let mut config = sandcastle_sandboxd::Config::new(embedded.sandboxd_root);
    config.api_port = embedded.sandboxd_api_port;
    config.envd_port = embedded.sandboxd_envd_port;
    config.isolation = embedded.sandboxd_isolation;
    config.host_paths = embedded.sandboxd_host_path;
    config.max_sandboxes = embedded.sandboxd_max_sandboxes;
    let api_key = embedded
        .sandboxd_api_key
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    config.api_key = Some(api_key.clone());
    let server = sandcastle_sandboxd::Sandboxd::start(config).await?;
    let mut client = sandcastle_e2b::client::ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        api_key,
    );
    client.observer = Some(metrics.request_observer());
    Ok((sandcastle_e2b::client::E2bClient::new(client)?, server))
}

fn e2b_provider(
    provider: ProviderArgs,
    metrics: &Arc<sandcastle::metrics::Metrics>,
) -> Result<Option<sandcastle_e2b::client::E2bClient>, BoxError> {
    let Some(key) = provider.e2b_api_key.filter(|key| !key.trim().is_empty()) else {
        tracing::warn!(
            "no E2B API key (E2B_API_KEY): only templates that name their own provider can be built"
        );
        return Ok(None);
    };
    let mut config = sandcastle_e2b::client::ClientConfig::for_domain(&provider.e2b_domain, key);
    if let Some(url) = provider.e2b_api_url {
        config.api_url = url;
    }
    if let Some(pattern) = provider.e2b_sandbox_url {
        config.sandbox_url = pattern;
    }
    config.observer = Some(metrics.request_observer());
    tracing::info!(api = %config.api_url, "default provider: E2B");
    Ok(Some(sandcastle_e2b::client::E2bClient::new(config)?))
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
