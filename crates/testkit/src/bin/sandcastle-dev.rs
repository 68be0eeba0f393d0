//! `sandcastle-dev`: a local control plane with the CRDs installed and the operator
//! binary running against it on its embedded sandbox server, until Ctrl-C. The operator
//! runs as its own process, exactly as `sandcastle run` runs anywhere else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use sandcastle_api::{AgentTask, TaskPhase};
use sandcastle_testkit::localcluster::{LocalCluster, tools_bin_dir};

#[derive(Parser)]
#[command(name = "sandcastle-dev")]
struct Args {
    /// Directory holding the kube-apiserver and etcd binaries (see scripts/setup).
    #[arg(long, env = "SANDCASTLE_TOOLS_BIN", default_value_os_t = tools_bin_dir())]
    tools_bin: PathBuf,
    /// Directory for the control plane's data, logs and kubeconfig.
    #[arg(long, default_value = "target/dev")]
    work_dir: PathBuf,
    /// The operator binary; the `sandcastle` beside this one when unset.
    #[arg(long, env = "SANDCASTLE_OPERATOR_BIN")]
    operator: Option<PathBuf>,
    /// Apply the manifests of this directory once the operator runs, wait for the
    /// example task `hello-command`, and print what it did.
    #[arg(long)]
    apply: Option<PathBuf>,
}

type BoxError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> ExitCode {
    match dev(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn dev(args: Args) -> Result<(), BoxError> {
    let operator = match args.operator {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("sandcastle"),
    };
    if !operator.is_file() {
        return Err(format!(
            "the operator binary {} is missing: build it with `cargo build -p sandcastle`",
            operator.display()
        )
        .into());
    }
    let cluster = LocalCluster::start(&args.tools_bin, &args.work_dir).await?;
    let client = cluster.client().await?;
    sandcastle_api::install(&client).await?;
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

    let mut command = tokio::process::Command::new(&operator);
    command
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env(
            "SANDCASTLE_SANDBOXD_ROOT",
            std::fs::canonicalize(&args.work_dir)?.join("sandboxd"),
        )
        .env("SANDCASTLE_INSTANCE", "sandcastle-dev")
        .env("SANDCASTLE_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("SANDCASTLE_LOG_FORMAT", "text")
        .env(
            "SANDCASTLE_LOG",
            "warn,sandcastle=info,kube_client::client::builder=off",
        )
        .kill_on_drop(true);
    // The pinned CLI scripts/setup installed, made visible inside the embedded sandboxes.
    if let Ok(claude) = args.tools_bin.join("claude").canonicalize()
        && let Some(prefix) = claude
            .ancestors()
            .find(|dir| dir.file_name().is_some_and(|name| name == "node_modules"))
            .and_then(Path::parent)
    {
        command
            .env("SANDCASTLE_SANDBOXD_HOST_PATHS", prefix)
            .env("SANDCASTLE_CLAUDE_COMMAND", &claude);
    }
    let mut child = command.spawn()?;
    if let Some(manifests) = args.apply {
        let kubectl = args.tools_bin.join("kubectl");
        let (client, kubeconfig) = (client.clone(), kubeconfig.clone());
        tokio::spawn(async move {
            if let Err(error) = show_example(&kubectl, &kubeconfig, &manifests, client).await {
                eprintln!("the example did not run: {error}");
            }
        });
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let status = tokio::select! {
        status = child.wait() => Some(status?),
        _ = tokio::signal::ctrl_c() => None,
        _ = terminate.recv() => None,
    };
    if status.is_none()
        && let Some(pid) = child.id()
    {
        // The operator's own clean stop: it kills its sandboxes before it exits.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    }
    drop(cluster);
    match status {
        Some(status) if !status.success() => Err(format!("the operator exited: {status}").into()),
        _ => Ok(()),
    }
}

/// Applies the examples with kubectl, waits for `hello-command` to finish and prints
/// the tasks and that task's result, the way a user would look at them.
async fn show_example(
    kubectl: &Path,
    kubeconfig: &Path,
    manifests: &Path,
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
    let manifests = manifests.display().to_string();
    print!(
        "{}",
        run(vec!["apply".into(), "-f".into(), manifests]).await?
    );
    let tasks: kube::Api<AgentTask> = kube::Api::namespaced(client, "default");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = tasks.get("hello-command").await?.status.unwrap_or_default();
        if matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed)) {
            break status;
        }
        if Instant::now() > deadline {
            return Err("hello-command did not finish within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!();
    let listing = ["get", "agenttasks,sandboxtemplates", "-o", "wide"];
    print!("{}", run(listing.map(String::from).to_vec()).await?);
    println!();
    print!("{}", example_summary(&status));
    println!();
    println!("The operator keeps running; press Ctrl-C to stop.");
    Ok(())
}

/// What the quickstart prints of the example task, in words a user reads.
fn example_summary(status: &sandcastle_api::AgentTaskStatus) -> String {
    let result = status.result.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(TaskPhase::Pending);
    let exit = match result.exit_code {
        Some(code) => format!("exit code {code}"),
        None => "no exit code".to_string(),
    };
    let mut out = format!("hello-command: {phase:?}, {exit}\n");
    out.push_str(&format!("  result: {}\n", result.text.trim_end()));
    for file in &status.files {
        out.push_str(&format!("  wrote {} ({} bytes)\n", file.path, file.size));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_prints_the_exit_code_as_a_number() {
        let status: sandcastle_api::AgentTaskStatus = serde_json::from_value(serde_json::json!({
            "phase": "Succeeded",
            "result": {"text": "# Notes\n", "exitCode": 0},
            "files": [{"path": "hello.txt", "size": 6}],
        }))
        .expect("a status");
        assert_eq!(
            example_summary(&status),
            "hello-command: Succeeded, exit code 0\n  result: # Notes\n  wrote hello.txt (6 bytes)\n"
        );
    }
}
