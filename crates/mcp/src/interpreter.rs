//! A long-lived interpreter in a sandbox: Sandcastle's driver for one language, started
//! through envd with its stdin open. Calls go in as JSON lines on stdin; their output and
//! answer come back on the process's stream (see `exec::Collector`).

use std::time::Duration;

use sandcastle_e2b::envd::{ProcessSelector, Signal};
use sandcastle_e2b::envd_client::{CommandSpec, EnvdClient, ProcessUpdate};
use tokio::sync::mpsc;

use crate::exec::{CodeError, Collector, Execution, Language};

/// Where the drivers are put in each sandbox.
pub const DRIVER_DIR: &str = "/tmp/.sandcastle-mcp";
const PYTHON_DRIVER: &str = include_str!("drivers/driver.py");
const JAVASCRIPT_DRIVER: &str = include_str!("drivers/driver.js");
/// Past its own timeout, how long an interpreter has to answer before it is killed: the
/// drivers interrupt code themselves, so this is for code that cannot be interrupted.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    #[error("starting the {language} interpreter in sandbox {sandbox}: {source}")]
    Start {
        language: &'static str,
        sandbox: String,
        source: sandcastle_e2b::error::Error,
    },
    #[error("sending the code to the interpreter: {0}")]
    Send(sandcastle_e2b::error::Error),
    #[error("{0}")]
    Answer(String),
}

/// Writes the drivers into a sandbox, once, before any interpreter starts there.
pub async fn install_drivers(envd: &EnvdClient) -> Result<(), sandcastle_e2b::error::Error> {
    envd.write_file(&format!("{DRIVER_DIR}/driver.py"), PYTHON_DRIVER)
        .await?;
    envd.write_file(&format!("{DRIVER_DIR}/driver.js"), JAVASCRIPT_DRIVER)
        .await?;
    Ok(())
}

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Gone(String),
}

pub struct Interpreter {
    envd: EnvdClient,
    language: Language,
    pid: u32,
    token: String,
    events: mpsc::UnboundedReceiver<Event>,
    reader: tokio::task::JoinHandle<()>,
    gone: Option<String>,
}

impl Interpreter {
    /// Starts an interpreter whose working directory is `cwd` (made if missing).
    pub async fn start(
        envd: EnvdClient,
        language: Language,
        cwd: &str,
    ) -> Result<Interpreter, InterpreterError> {
        let token = format!("{:032x}", rand::random::<u128>());
        let (cmd, args) = match language {
            Language::Python => (
                "python3",
                vec![format!("{DRIVER_DIR}/driver.py"), "python".into()],
            ),
            Language::Bash => (
                "python3",
                vec![format!("{DRIVER_DIR}/driver.py"), "bash".into()],
            ),
            Language::Javascript => ("node", vec![format!("{DRIVER_DIR}/driver.js")]),
        };
        let failed = |source| InterpreterError::Start {
            language: language.as_str(),
            sandbox: envd.sandbox_id().to_string(),
            source,
        };
        envd.make_dir(cwd).await.map_err(failed)?;
        let mut spec = CommandSpec::new("/usr/bin/env")
            .cwd(cwd)
            .stdin(true)
            .env("SANDCASTLE_MCP_TOKEN", token.clone())
            .env("PYTHONUNBUFFERED", "1");
        spec.args = std::iter::once(cmd.to_string()).chain(args).collect();
        let mut stream = envd.start(&spec).await.map_err(failed)?;
        let pid = stream.pid();
        let (sender, events) = mpsc::unbounded_channel();
        let follower = envd.clone();
        let reader = tokio::spawn(async move {
            let mut reconnects = 0;
            loop {
                let event = match stream.next_update().await {
                    Ok(Some(ProcessUpdate::Stdout(data) | ProcessUpdate::Pty(data))) => {
                        Event::Stdout(data)
                    }
                    Ok(Some(ProcessUpdate::Stderr(data))) => Event::Stderr(data),
                    Ok(Some(ProcessUpdate::End(end))) => Event::Gone(format!(
                        "the interpreter exited ({})",
                        end.error.unwrap_or(end.status)
                    )),
                    Ok(None) => Event::Gone("the interpreter's stream ended".into()),
                    // A stream cut by a proxy or an idle timeout: the process lives on, so
                    // attach again. Output while detached is lost, which an idle
                    // interpreter has none of.
                    Err(error) if reconnects < 3 => {
                        reconnects += 1;
                        tracing::debug!(%error, pid, "reattaching to an interpreter");
                        match follower.connect(ProcessSelector::Pid(pid)).await {
                            Ok(again) => {
                                stream = again;
                                continue;
                            }
                            Err(error) => Event::Gone(format!("the interpreter is gone: {error}")),
                        }
                    }
                    Err(error) => Event::Gone(format!("the interpreter is gone: {error}")),
                };
                let last = matches!(event, Event::Gone(_));
                if sender.send(event).is_err() || last {
                    return;
                }
            }
        });
        Ok(Interpreter {
            envd,
            language,
            pid,
            token,
            events,
            reader,
            gone: None,
        })
    }

    pub fn language(&self) -> Language {
        self.language
    }

    /// Why the interpreter cannot take calls any more, once it cannot.
    pub fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    /// Runs one piece of code. The interpreter stops code at `timeout` and keeps its state;
    /// one that does not answer `GRACE` later is killed, and the answer says so.
    pub async fn run(
        &mut self,
        code: &str,
        timeout: Duration,
    ) -> Result<Execution, InterpreterError> {
        if let Some(gone) = &self.gone {
            return Err(InterpreterError::Answer(gone.clone()));
        }
        let mut line = serde_json::to_vec(&serde_json::json!({
            "code": code,
            "timeout": timeout.as_secs_f64(),
        }))
        .expect("a JSON object serializes");
        line.push(b'\n');
        self.envd
            .send_stdin(ProcessSelector::Pid(self.pid), &line)
            .await
            .map_err(InterpreterError::Send)?;
        let mut collector = Collector::new(&self.token);
        let deadline = tokio::time::Instant::now() + timeout + GRACE;
        let missing = loop {
            if collector.is_complete() {
                break None;
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Stdout(data))) => collector.push_stdout(&data),
                Ok(Some(Event::Stderr(data))) => collector.push_stderr(&data),
                Ok(Some(Event::Gone(why))) => {
                    self.gone = Some(why.clone());
                    break Some(lost(&why));
                }
                Ok(None) => {
                    let why = "the interpreter's reader stopped".to_string();
                    self.gone = Some(why.clone());
                    break Some(lost(&why));
                }
                Err(_) => {
                    let why = format!(
                        "the code did not stop at its {}s timeout, so its interpreter was \
                         killed and the context's state is lost",
                        timeout.as_secs_f64()
                    );
                    self.kill().await;
                    self.gone = Some(why.clone());
                    break Some(lost(&why));
                }
            }
        };
        collector.finish(missing).map_err(InterpreterError::Answer)
    }

    /// Kills the interpreter and what it started in its own process group.
    pub async fn kill(&mut self) {
        let _ = self
            .envd
            .send_signal(ProcessSelector::Pid(self.pid), Signal::Sigkill)
            .await;
        self.reader.abort();
        self.gone
            .get_or_insert_with(|| "the interpreter was stopped".into());
    }
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lost(why: &str) -> CodeError {
    CodeError {
        name: "InterpreterLost".into(),
        value: why.into(),
        traceback: String::new(),
    }
}
