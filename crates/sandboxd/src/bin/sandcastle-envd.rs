//! envd for sandbox pods. Built as a static binary so that an init container can place it
//! into any image, whatever its libc, and the sandbox container can run it as its
//! entrypoint.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "envd for Sandcastle's sandbox pods")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves envd for one sandbox.
    Serve {
        #[arg(long, env = "SANDCASTLE_SANDBOX_ID")]
        sandbox_id: String,
        #[arg(long, default_value_t = sandcastle_e2b::envd::ENVD_PORT)]
        port: u16,
        #[arg(long, default_value_t = 512 << 20)]
        max_body_bytes: usize,
    },
    /// Copies this binary to DEST: what the init container of a sandbox pod does.
    Install { dest: PathBuf },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match Cli::parse().command {
        Command::Install { dest } => install(&dest),
        Command::Serve {
            sandbox_id,
            port,
            max_body_bytes,
        } => {
            let config = sandcastle_sandboxd::PodEnvdConfig {
                listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                sandbox_id,
                max_body_bytes,
            };
            sandcastle_sandboxd::serve_pod_envd(config, terminated())
                .await
                .map_err(|error| error.to_string())
        }
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn install(dest: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().map_err(|error| format!("cannot find myself: {error}"))?;
    std::fs::copy(&me, dest)
        .map_err(|error| format!("cannot copy to {}: {error}", dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
        .map_err(|error| format!("cannot make {} executable: {error}", dest.display()))
}

/// The kubelet stops a pod with SIGTERM.
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
