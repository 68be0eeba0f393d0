//! `sandcastle mcp`: an MCP server whose tools run code in sandboxes (`run_code`, with
//! stateful contexts) and make, follow and read AgentTasks. It speaks stdio (a desktop
//! client starts it) and streamable HTTP (a Deployment in the cluster), and it kills
//! every sandbox it made when it stops.

pub mod contexts;
pub mod exec;
pub mod interpreter;
pub mod liveness;
pub mod sandboxes;
pub mod server;
pub mod tasks;

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{
    Implementation, ProgressNotificationParam, RequestMetaObject, ServerCapabilities, ServerConfig,
};
use rmcp::{Peer, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;

use crate::contexts::{ContextInfo, Runner};
use crate::exec::{Execution, Language, check_call};
use crate::tasks::{NewTask, TaskSummary, Tasks, progress_line, summarize};

/// The default per-call timeout of `run_code`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 60;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCodeRequest {
    /// The code to run.
    pub code: String,
    /// `python` (the default), `javascript` or `bash`. With a context, its language
    /// (and may be left out).
    #[serde(default)]
    #[schemars(with = "String")]
    pub language: Option<String>,
    /// A context from `create_context`: the code sees what earlier calls in it defined.
    /// Without one, the call runs in an interpreter of its own.
    #[serde(default)]
    #[schemars(with = "String")]
    pub context: Option<String>,
    /// Seconds before the code is interrupted (default 60); a context keeps its state.
    #[serde(default)]
    #[schemars(with = "u64")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateContextRequest {
    /// `python` (the default), `javascript` or `bash`.
    #[serde(default)]
    #[schemars(with = "String")]
    pub language: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DeleteContextRequest {
    /// The context's id, as `create_context` answered it.
    pub context: String,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Contexts {
    pub contexts: Vec<ContextInfo>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateTaskRequest {
    /// The SandboxTemplate (in the task's namespace) its sandbox starts from.
    pub template: String,
    /// What Claude Code is asked to do.
    #[serde(default)]
    #[schemars(with = "String")]
    pub prompt: Option<String>,
    /// Run this command instead of Claude Code (it gets the prompt in SANDCASTLE_PROMPT).
    #[serde(default)]
    pub command: Vec<String>,
    /// Secrets whose keys become the agent's environment (envFrom), such as the model's
    /// credentials.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// The server's namespace when absent.
    #[serde(default)]
    #[schemars(with = "String")]
    pub namespace: Option<String>,
    /// A name; one is generated (`mcp-…`) when absent.
    #[serde(default)]
    #[schemars(with = "String")]
    pub name: Option<String>,
    /// The task's activeDeadlineSeconds.
    #[serde(default)]
    #[schemars(with = "i64")]
    pub active_deadline_seconds: Option<i64>,
    /// Wait for the task to finish, with progress notifications (default true).
    #[serde(default)]
    #[schemars(with = "bool")]
    pub wait: Option<bool>,
    /// How long to wait, in seconds (default 3600); the task goes on if the wait ends.
    #[serde(default)]
    #[schemars(with = "u64")]
    pub wait_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetTaskRequest {
    pub name: String,
    /// The server's namespace when absent.
    #[serde(default)]
    #[schemars(with = "String")]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListTasksRequest {
    /// The server's namespace when absent.
    #[serde(default)]
    #[schemars(with = "String")]
    pub namespace: Option<String>,
    /// At most this many (default 100).
    #[serde(default)]
    #[schemars(with = "u32")]
    pub limit: Option<u32>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskSummary>,
}

/// One MCP session's handler; every session shares the runner and the task client.
#[derive(Clone)]
pub struct SandcastleMcp {
    runner: Arc<Runner>,
    tasks: Option<Tasks>,
    tool_router: ToolRouter<SandcastleMcp>,
}

impl SandcastleMcp {
    pub fn new(runner: Arc<Runner>, tasks: Option<Tasks>) -> SandcastleMcp {
        SandcastleMcp {
            runner,
            tasks,
            tool_router: Self::tool_router(),
        }
    }

    fn tasks(&self) -> Result<&Tasks, String> {
        self.tasks.as_ref().ok_or_else(|| {
            "this server has no Kubernetes cluster (no kubeconfig or in-cluster config): \
             the task tools are off"
                .to_string()
        })
    }

    fn namespace(tasks: &Tasks, asked: Option<String>) -> String {
        asked.unwrap_or_else(|| tasks.default_namespace.clone())
    }
}

fn language(name: Option<&str>) -> Result<Option<Language>, String> {
    name.map(Language::parse).transpose()
}

#[tool_router]
impl SandcastleMcp {
    #[tool(
        description = "Run Python, JavaScript or bash in a sandbox. Answers stdout, stderr, \
                       an error (name, value, traceback) if the code raised or exited \
                       non-zero, and the value of the last expression. Give a context from \
                       create_context to keep variables between calls."
    )]
    async fn run_code(
        &self,
        Parameters(request): Parameters<RunCodeRequest>,
    ) -> Result<Json<Execution>, String> {
        check_call(&request.code, request.timeout_seconds)?;
        let language = language(request.language.as_deref())?;
        let timeout =
            Duration::from_secs(request.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS));
        self.runner
            .run(&request.code, language, request.context.as_deref(), timeout)
            .await
            .map(Json)
            .map_err(|error| error.to_string())
    }

    #[tool(
        description = "Start a long-lived interpreter (python, javascript or bash) whose \
                       state persists across run_code calls that name it. Ends after it sits \
                       idle for the server's context idle timeout."
    )]
    async fn create_context(
        &self,
        Parameters(request): Parameters<CreateContextRequest>,
    ) -> Result<Json<ContextInfo>, String> {
        let language = language(request.language.as_deref())?.unwrap_or(Language::Python);
        self.runner
            .create_context(language)
            .await
            .map(Json)
            .map_err(|error| error.to_string())
    }

    #[tool(description = "End a context and its interpreter.")]
    async fn delete_context(
        &self,
        Parameters(request): Parameters<DeleteContextRequest>,
    ) -> Result<String, String> {
        self.runner
            .delete_context(&request.context)
            .await
            .map(|()| format!("deleted {}", request.context))
            .map_err(|error| error.to_string())
    }

    #[tool(description = "The contexts that exist, with their language and sandbox.")]
    async fn list_contexts(&self) -> Json<Contexts> {
        Json(Contexts {
            contexts: self.runner.list_contexts().await,
        })
    }

    #[tool(
        description = "Create an AgentTask (Claude Code with a prompt, or a command) from a \
                       SandboxTemplate and, unless wait is false, wait for it to finish while \
                       sending progress notifications. Answers the task's state and result."
    )]
    async fn create_task(
        &self,
        Parameters(request): Parameters<CreateTaskRequest>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
    ) -> Result<Json<TaskSummary>, String> {
        let tasks = self.tasks()?;
        let namespace = Self::namespace(tasks, request.namespace);
        let created = tasks
            .create(&NewTask {
                namespace: namespace.clone(),
                name: request.name,
                template: request.template,
                prompt: request.prompt,
                command: request.command,
                secrets: request.secrets,
                active_deadline_seconds: request.active_deadline_seconds,
            })
            .await?;
        let name = created.metadata.name.clone().unwrap_or_default();
        if !request.wait.unwrap_or(true) {
            return Ok(Json(summarize(&created)));
        }
        let token = meta.get_progress_token();
        let mut step = 0.0;
        let wait = Duration::from_secs(request.wait_seconds.unwrap_or(3600));
        tasks
            .wait(&namespace, &name, wait, move |summary| {
                step += 1.0;
                let notification = token.clone().map(|token| {
                    ProgressNotificationParam::new(token, step).with_message(progress_line(summary))
                });
                let peer = peer.clone();
                Box::pin(async move {
                    if let Some(notification) = notification {
                        let _ = peer.notify_progress(notification).await;
                    }
                })
            })
            .await
            .map(Json)
    }

    #[tool(description = "An AgentTask's state and, once it finished, its result.")]
    async fn get_task(
        &self,
        Parameters(request): Parameters<GetTaskRequest>,
    ) -> Result<Json<TaskSummary>, String> {
        let tasks = self.tasks()?;
        let namespace = Self::namespace(tasks, request.namespace);
        tasks
            .get(&namespace, &request.name)
            .await
            .map(|task| Json(summarize(&task)))
    }

    #[tool(description = "The AgentTasks of a namespace, with their state.")]
    async fn list_tasks(
        &self,
        Parameters(request): Parameters<ListTasksRequest>,
    ) -> Result<Json<TaskList>, String> {
        let tasks = self.tasks()?;
        let namespace = Self::namespace(tasks, request.namespace);
        tasks
            .list(&namespace, request.limit.unwrap_or(100).clamp(1, 500))
            .await
            .map(|tasks| Json(TaskList { tasks }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SandcastleMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("sandcastle", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Run code in sandboxes with run_code (contexts keep state between calls), \
                 and run coding agents as Kubernetes AgentTasks with create_task.",
            )
    }
}

/// Everything the server runs beside its sessions: the tending of sandboxes and contexts.
pub async fn tend(runner: Arc<Runner>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        runner.tend().await;
        runner.pool().tend().await;
    }
}
