//! The task tools: AgentTasks made, followed and read through the apiserver, with the
//! server's own ServiceAccount, so RBAC decides what a caller of the server may do.

use std::time::Duration;

use kube::api::{Api, ListParams, PostParams};
use sandcastle_api::{
    Agent, AgentTask, AgentTaskSpec, AgentTaskStatus, CommandAgent, EnvFromSource,
    MAX_PROMPT_CHARS, SandboxTemplate, SecretReference, TaskPhase,
};
use serde::Serialize;

/// What the task tools answer about one task: its state and, once finished, its result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    pub namespace: String,
    pub name: String,
    pub template: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub message: Option<String>,
    pub finished: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "bool")]
    pub is_error: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "i32")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "i64")]
    pub num_turns: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub cost_usd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub sandbox_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "i64")]
    pub turns_so_far: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String")]
    pub last_tool: Option<String>,
}

/// The summary the tools answer with, from a task as the apiserver holds it.
pub fn summarize(task: &AgentTask) -> TaskSummary {
    let status = task.status.clone().unwrap_or_default();
    let AgentTaskStatus {
        phase,
        reason,
        message,
        result,
        usage,
        sandbox_id,
        progress,
        ..
    } = status;
    TaskSummary {
        namespace: task.metadata.namespace.clone().unwrap_or_default(),
        name: task.metadata.name.clone().unwrap_or_default(),
        template: task.spec.template_ref.name.clone(),
        phase: phase.map(|phase| format!("{phase:?}")),
        reason,
        message,
        finished: matches!(phase, Some(TaskPhase::Succeeded | TaskPhase::Failed)),
        result: result.as_ref().map(|result| result.text.clone()),
        is_error: result.as_ref().map(|result| result.is_error),
        exit_code: result.as_ref().and_then(|result| result.exit_code),
        num_turns: result.as_ref().and_then(|result| result.num_turns),
        cost_usd: usage.and_then(|usage| usage.cost_usd),
        sandbox_id,
        turns_so_far: progress.as_ref().map(|progress| progress.turns),
        last_tool: progress.and_then(|progress| progress.last_tool),
    }
}

/// A line for a progress notification, when the task moved since `last`.
pub fn progress_line(summary: &TaskSummary) -> String {
    let mut line = format!(
        "{}: {}",
        summary.name,
        summary.phase.as_deref().unwrap_or("Pending")
    );
    if let Some(reason) = summary
        .reason
        .as_ref()
        .filter(|reason| Some(*reason) != summary.phase.as_ref())
    {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(turns) = summary.turns_so_far {
        line.push_str(&format!(", {turns} turns"));
    }
    if let Some(tool) = &summary.last_tool {
        line.push_str(&format!(", last tool {tool}"));
    }
    line
}

/// What `create_task` makes.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub namespace: String,
    pub name: Option<String>,
    pub template: String,
    pub prompt: Option<String>,
    pub command: Vec<String>,
    pub secrets: Vec<String>,
    pub active_deadline_seconds: Option<i64>,
}

/// The AgentTask to create, or why not: what the apiserver would refuse, said in the
/// tool's own terms.
pub fn build_task(new: &NewTask) -> Result<AgentTask, String> {
    if let Some(prompt) = &new.prompt {
        let chars = prompt.chars().count();
        if chars > MAX_PROMPT_CHARS as usize {
            return Err(format!(
                "the prompt is {chars} characters; an AgentTask takes at most {MAX_PROMPT_CHARS}"
            ));
        }
        if chars == 0 {
            return Err("the prompt is empty".into());
        }
    } else if new.command.is_empty() {
        return Err("give a prompt (for Claude Code) or a command".into());
    }
    let agent = (!new.command.is_empty()).then(|| Agent {
        claude_code: None,
        command: Some(CommandAgent {
            command: new.command.clone(),
        }),
    });
    let mut spec: AgentTaskSpec = serde_json::from_value(serde_json::json!({
        "templateRef": {"name": new.template},
    }))
    .map_err(|error| format!("building the task: {error}"))?;
    spec.prompt = new.prompt.clone();
    spec.agent = agent;
    spec.env_from = new
        .secrets
        .iter()
        .map(|name| EnvFromSource {
            secret_ref: SecretReference {
                name: name.clone(),
                optional: false,
            },
            prefix: None,
        })
        .collect();
    if let Some(seconds) = new.active_deadline_seconds {
        spec.active_deadline_seconds = seconds;
    }
    let mut task = AgentTask::new(new.name.as_deref().unwrap_or_default(), spec);
    task.metadata.namespace = Some(new.namespace.clone());
    if new.name.is_none() {
        task.metadata.name = None;
        task.metadata.generate_name = Some("mcp-".into());
    }
    task.metadata.labels = Some(
        [(
            "app.kubernetes.io/created-by".to_string(),
            "sandcastle-mcp".to_string(),
        )]
        .into(),
    );
    Ok(task)
}

#[derive(Clone)]
pub struct Tasks {
    client: kube::Client,
    pub default_namespace: String,
}

impl Tasks {
    pub fn new(client: kube::Client, default_namespace: String) -> Tasks {
        Tasks {
            client,
            default_namespace,
        }
    }

    fn api(&self, namespace: &str) -> Api<AgentTask> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub async fn create(&self, new: &NewTask) -> Result<AgentTask, String> {
        let task = build_task(new)?;
        let templates: Api<SandboxTemplate> = Api::namespaced(self.client.clone(), &new.namespace);
        match templates.get_opt(&new.template).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "no SandboxTemplate {:?} in namespace {:?}",
                    new.template, new.namespace
                ));
            }
            Err(error) => return Err(api_error("reading the template", error)),
        }
        self.api(&new.namespace)
            .create(&PostParams::default(), &task)
            .await
            .map_err(|error| api_error("creating the AgentTask", error))
    }

    pub async fn get(&self, namespace: &str, name: &str) -> Result<AgentTask, String> {
        match self.api(namespace).get_opt(name).await {
            Ok(Some(task)) => Ok(task),
            Ok(None) => Err(format!("no AgentTask {name:?} in namespace {namespace:?}")),
            Err(error) => Err(api_error("reading the AgentTask", error)),
        }
    }

    pub async fn list(&self, namespace: &str, limit: u32) -> Result<Vec<TaskSummary>, String> {
        let tasks = self
            .api(namespace)
            .list(&ListParams::default().limit(limit))
            .await
            .map_err(|error| api_error("listing AgentTasks", error))?;
        Ok(tasks.items.iter().map(summarize).collect())
    }

    /// Polls the task until it finishes or `wait` runs out, telling `moved` of every
    /// change a caller would want to hear of.
    pub async fn wait(
        &self,
        namespace: &str,
        name: &str,
        wait: Duration,
        mut moved: impl FnMut(&TaskSummary) -> futures::future::BoxFuture<'static, ()>,
    ) -> Result<TaskSummary, String> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = String::new();
        loop {
            let summary = summarize(&self.get(namespace, name).await?);
            let line = progress_line(&summary);
            if line != last {
                moved(&summary).await;
                last = line;
            }
            if summary.finished || tokio::time::Instant::now() >= deadline {
                return Ok(summary);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn api_error(doing: &str, error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{doing}: {} ({})", status.message, status.reason),
        other => format!("{doing}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_task() -> NewTask {
        NewTask {
            namespace: "team".into(),
            name: None,
            template: "python".into(),
            prompt: Some("fix the tests".into()),
            command: Vec::new(),
            secrets: vec!["anthropic".into()],
            active_deadline_seconds: None,
        }
    }

    #[test]
    fn a_task_from_a_prompt_names_its_template_and_secrets() {
        let task = build_task(&new_task()).unwrap();
        assert_eq!(task.metadata.generate_name.as_deref(), Some("mcp-"));
        assert_eq!(task.metadata.name, None);
        assert_eq!(task.metadata.namespace.as_deref(), Some("team"));
        assert_eq!(task.spec.template_ref.name, "python");
        assert_eq!(task.spec.prompt.as_deref(), Some("fix the tests"));
        assert!(
            task.spec.agent.is_none(),
            "Claude Code is the default agent"
        );
        assert_eq!(task.spec.env_from[0].secret_ref.name, "anthropic");
    }

    #[test]
    fn a_command_task_and_a_named_one() {
        let task = build_task(&NewTask {
            name: Some("t1".into()),
            prompt: None,
            command: vec!["echo".into(), "hi".into()],
            active_deadline_seconds: Some(60),
            ..new_task()
        })
        .unwrap();
        assert_eq!(task.metadata.name.as_deref(), Some("t1"));
        assert_eq!(task.metadata.generate_name, None);
        assert_eq!(
            task.spec.agent.unwrap().command.unwrap().command,
            vec!["echo", "hi"]
        );
        assert_eq!(task.spec.active_deadline_seconds, 60);
    }

    #[test]
    fn what_the_apiserver_would_refuse_is_refused_first() {
        let long = "x".repeat(MAX_PROMPT_CHARS as usize + 1);
        let cases = [
            (Some(long.as_str()), vec![], "at most 65536"),
            (Some(""), vec![], "empty"),
            (None, vec![], "give a prompt"),
        ];
        for (prompt, command, expected) in cases {
            let error = build_task(&NewTask {
                prompt: prompt.map(String::from),
                command,
                ..new_task()
            })
            .unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn progress_lines_change_when_the_task_moves() {
        let mut summary = TaskSummary {
            name: "t".into(),
            ..TaskSummary::default()
        };
        assert_eq!(progress_line(&summary), "t: Pending");
        summary.phase = Some("Running".into());
        summary.turns_so_far = Some(2);
        summary.last_tool = Some("Bash".into());
        assert_eq!(
            progress_line(&summary),
            "t: Running, 2 turns, last tool Bash"
        );
        summary.phase = Some("Succeeded".into());
        summary.reason = Some("Succeeded".into());
        assert_eq!(
            progress_line(&summary),
            "t: Succeeded, 2 turns, last tool Bash"
        );
        summary.phase = Some("Failed".into());
        summary.reason = Some("DeadlineExceeded".into());
        assert!(progress_line(&summary).contains("Failed (DeadlineExceeded)"));
    }
}
