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
    },
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start a local control plane (etcd + kube-apiserver) with the CRDs installed and
    /// keep it running until interrupted.
    Dev {
        /// Directory holding the kube-apiserver and etcd binaries (see scripts/setup).
        #[arg(long, env = "SANDCASTLE_TOOLS_BIN", default_value_os_t = localcluster::tools_bin_dir())]
        tools_bin: PathBuf,
        /// Directory for the control plane's data, logs and kubeconfig.
        #[arg(long, default_value = "target/dev")]
        work_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run { namespace, log } => run(namespace, &log).await,
        Command::Crd { out } => print_crds(out),
        Command::Dev {
            tools_bin,
            work_dir,
        } => dev(&tools_bin, &work_dir).await,
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

async fn run(namespace: Option<String>, log: &str) -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log)?)
        .init();
    let client = kube::Client::try_default().await?;
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("(all)"),
        "starting"
    );
    sandcastle::controller::run(client, sandcastle::controller::Scope { namespace }, async {
        let _ = terminated().await;
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
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

async fn dev(tools_bin: &std::path::Path, work_dir: &std::path::Path) -> Result<(), BoxError> {
    let cluster = localcluster::LocalCluster::start(tools_bin, work_dir).await?;
    crd::install(&cluster.client().await?).await?;
    let kubeconfig = std::fs::canonicalize(cluster.kubeconfig_path())?;
    println!("A local control plane is running at {}.", cluster.api_url());
    println!("The Sandcastle CRDs are installed. Point kubectl at it with:");
    println!();
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get crds");
    println!("  kubectl apply -f examples/");
    println!();
    println!("Press Ctrl-C to stop it (its data is removed).");
    terminated().await?;
    drop(cluster);
    Ok(())
}
