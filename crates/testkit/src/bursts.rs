//! Bursts of AgentTasks created at once, as the pods and pools benchmarks time them.

use std::time::{Duration, Instant};

use futures::future::join_all;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sandcastle_api::{AgentTask, TaskPhase};
use serde_json::json;

use crate::sightings::Sightings;

/// What one burst of tasks took.
pub struct Burst {
    /// Each task, from its create being answered to its phase Running.
    pub samples: Vec<Duration>,
    /// From the first create to the last task Running.
    pub all: Duration,
}

/// Creates `burst` tasks of `template` in `ns` at once, each running `command`, and
/// waits until each is Running (its agent started); then deletes them and waits until
/// they are gone, so that the next burst starts from nothing. Task names start with
/// `prefix`.
pub async fn task_burst(
    client: &kube::Client,
    ns: &str,
    template: &str,
    command: &[&str],
    burst: usize,
    prefix: &str,
) -> Burst {
    let tasks: Api<AgentTask> = Api::namespaced(client.clone(), ns);
    let seen = Sightings::watch(tasks.clone(), |task: &AgentTask| {
        matches!(
            task.status.as_ref().and_then(|s| s.phase),
            Some(TaskPhase::Running | TaskPhase::Succeeded)
        )
        .then_some(true)
    })
    .await;
    let names: Vec<String> = (0..burst).map(|i| format!("{prefix}-{i:03}")).collect();
    let started = Instant::now();
    let answered = join_all(names.iter().map(|name| {
        let task: AgentTask = serde_json::from_value(json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": name},
            "spec": {"templateRef": {"name": template},
                     "agent": {"command": {"command": command}}},
        }))
        .expect("a task");
        let tasks = tasks.clone();
        async move {
            tasks
                .create(&PostParams::default(), &task)
                .await
                .expect("a task");
            Instant::now()
        }
    }))
    .await;
    let running = seen
        .wait_for(burst, Duration::from_secs(300))
        .await
        .unwrap_or_else(|error| panic!("tasks Running: {error}"));
    let samples = names
        .iter()
        .zip(&answered)
        .map(|(name, at)| running[name].0.saturating_duration_since(*at))
        .collect();
    let all = names
        .iter()
        .map(|name| running[name].0)
        .max()
        .map_or(Duration::ZERO, |last| last - started);
    tasks
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("deleting the tasks");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !tasks
        .list(&ListParams::default())
        .await
        .expect("tasks")
        .items
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the tasks were not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Burst { samples, all }
}
