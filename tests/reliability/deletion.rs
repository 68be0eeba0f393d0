//! Deletions racing the work: tasks deleted at each step of their start, and a namespace
//! deleted with its running tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use kube::runtime::{WatchStreamExt, watcher};
use sandcastle::crd::{AgentTask, TaskPhase};
use sandcastle::sandboxd::FaultPlan;
use serde_json::json;

use super::cluster::TestEnv;
use super::{Provider, create_task, figure, setting, setup, tasks, warnings};

const FINALIZER: &str = "sandcastle.dev/task-cleanup";

fn sleeper() -> serde_json::Value {
    json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sleep", "600"]}},
    })
}

/// When a task is deleted: before its sandbox is recorded, while it is prepared, or while
/// its agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    Pending,
    Provisioning,
    Running,
}

impl Moment {
    fn of(name: &str) -> Moment {
        match name.split('-').next() {
            Some("pending") => Moment::Pending,
            Some("provisioning") => Moment::Provisioning,
            _ => Moment::Running,
        }
    }

    /// Whether a task in this state is at the moment.
    fn reached(self, task: &AgentTask) -> bool {
        let status = task.status.clone().unwrap_or_default();
        match self {
            // Seen by the operator (it holds the finalizer), no sandbox recorded yet.
            Moment::Pending => {
                task.metadata
                    .finalizers
                    .as_ref()
                    .is_some_and(|finalizers| finalizers.iter().any(|f| f == FINALIZER))
                    && status.sandbox_id.is_none()
            }
            Moment::Provisioning => status.phase == Some(TaskPhase::Provisioning),
            Moment::Running => status.phase == Some(TaskPhase::Running),
        }
    }

    /// Whether a task in this state went past the moment unseen.
    fn passed(self, task: &AgentTask) -> bool {
        let status = task.status.clone().unwrap_or_default();
        match self {
            Moment::Pending => status.sandbox_id.is_some(),
            Moment::Provisioning => matches!(
                status.phase,
                Some(TaskPhase::Running | TaskPhase::Succeeded | TaskPhase::Failed)
            ),
            Moment::Running => {
                matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
            }
        }
    }
}

pub async fn tasks_deleted_mid_flight_take_their_sandboxes(env: Arc<TestEnv>) {
    let per_moment: usize = setting("SANDCASTLE_DELETION_TASKS", 8);
    let provider = Provider::start("deletion").await;
    let (_ns, operator, api) = setup(&env, "deletion", &provider, &[]).await;
    // Every control-plane call takes this long, so a create is in flight for a while and
    // a recorded sandbox waits that long before its agent starts.
    provider.server.faults().set(FaultPlan {
        latency: Duration::from_millis(300),
        ..FaultPlan::default()
    });
    let moments = [Moment::Pending, Moment::Provisioning, Moment::Running];
    let names: Vec<String> = moments
        .iter()
        .flat_map(|moment| {
            (0..per_moment).map(move |n| format!("{}-{n}", format!("{moment:?}").to_lowercase()))
        })
        .collect();
    let watch = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    for name in &names {
        create_task(&api, name, sleeper()).await;
    }

    // The moment each task was deleted at, as this watch saw it, and its UID.
    let mut deleted: BTreeMap<String, (Moment, String)> = BTreeMap::new();
    let mut missed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut watch = watch;
    while deleted.len() + missed.len() < names.len() {
        let next = tokio::time::timeout_at(deadline.into(), watch.try_next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not every task reached its moment: deleted {:?}, missed {missed:?}",
                    deleted.keys()
                )
            });
        let Some(task) = next.expect("the watch") else {
            break;
        };
        let name = task.metadata.name.clone().unwrap_or_default();
        if deleted.contains_key(&name) || missed.contains(&name) {
            continue;
        }
        let moment = Moment::of(&name);
        if moment.reached(&task) {
            api.delete(&name, &DeleteParams::default())
                .await
                .unwrap_or_else(|err| panic!("delete {name}: {err}"));
            deleted.insert(
                name,
                (moment, task.metadata.uid.clone().unwrap_or_default()),
            );
        } else if moment.passed(&task) {
            missed.insert(name);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = tasks(&api).await;
        if left
            .iter()
            .all(|task| !deleted.contains_key(task.metadata.name.as_deref().unwrap_or_default()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deleted tasks still there: {:#?}",
            left.iter()
                .map(|task| (&task.metadata.name, &task.metadata.finalizers, &task.status))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The finalizer's promise: once a task is gone, so are its sandboxes, without waiting
    // for the orphan sweep.
    let lives = provider.lives_by_task();
    let mut alive = Vec::new();
    let mut created = 0;
    for (name, (_, uid)) in &deleted {
        let mine = lives.get(uid).cloned().unwrap_or_default();
        created += mine.len();
        if mine.iter().any(|life| life.ended.is_none()) {
            alive.push(name.clone());
        }
    }
    let by_moment = |moment: Moment| deleted.values().filter(|(seen, _)| *seen == moment).count();
    provider.server.faults().clear();
    figure(format!(
        "deletion: {} tasks deleted ({} pending, {} provisioning, {} running, {} missed their moment); {created} sandboxes created, {} alive after their task was gone, 0 finalizers left",
        deleted.len(),
        by_moment(Moment::Pending),
        by_moment(Moment::Provisioning),
        by_moment(Moment::Running),
        missed.len(),
        alive.len(),
    ));
    assert!(
        alive.is_empty(),
        "sandboxes outlived their deleted tasks: {alive:?}"
    );
    for moment in moments {
        assert!(
            by_moment(moment) > 0,
            "no task was deleted while {moment:?}; the race was not run"
        );
    }
    drop(operator);
    provider.stop().await;
}

pub async fn a_deleted_namespace_goes_away_with_its_sandboxes(env: Arc<TestEnv>) {
    let count: usize = setting("SANDCASTLE_NAMESPACE_TASKS", 20);
    let provider = Provider::start("namespace").await;
    let slots = count.to_string();
    let (ns, operator, api) = setup(
        &env,
        "doomed",
        &provider,
        &[("SANDCASTLE_MAX_RUNNING_TASKS", &slots)],
    )
    .await;
    for n in 0..count {
        create_task(&api, &format!("task-{n:03}"), sleeper()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let uids: Vec<String> = loop {
        let all = tasks(&api).await;
        let running = all
            .iter()
            .filter(|task| {
                task.status.as_ref().and_then(|status| status.phase) == Some(TaskPhase::Running)
            })
            .count();
        if running == count {
            break all
                .iter()
                .filter_map(|task| task.metadata.uid.clone())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "only {running} of {count} tasks running"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .expect("delete the namespace");
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(namespace) = namespaces.get_opt(&ns).await.expect("get the namespace") {
        if Instant::now() >= deadline {
            let left = tasks(&api).await;
            panic!(
                "namespace {ns} still {:?} with {} tasks: {:#?}\n{}",
                namespace.status.and_then(|status| status.phase),
                left.len(),
                left.iter()
                    .map(|task| (&task.metadata.name, &task.metadata.finalizers))
                    .collect::<Vec<_>>(),
                env.controller_manager_report()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lives = provider.lives_by_task();
    let killed = uids
        .iter()
        .filter(|uid| {
            lives.get(*uid).is_some_and(|mine| {
                !mine.is_empty() && mine.iter().all(|life| life.ended.is_some())
            })
        })
        .count();
    let leaked = provider.live().await;
    figure(format!(
        "namespace: {count} running tasks, namespace deleted and gone, {killed} of {count} sandboxes killed, 0 finalizers left, {leaked} leaked"
    ));
    assert_eq!(killed, count, "every task's sandbox is killed with it");
    assert_eq!(leaked, 0);
    drop(operator);
    provider.stop().await;
}

/// With the provider down, a deleted task keeps its finalizer (and says why) until its
/// sandbox can be killed; then it goes, and the sandbox with it.
pub async fn an_outage_holds_deletion_until_the_sandbox_is_killed(env: Arc<TestEnv>) {
    let provider = Provider::start("outage").await;
    let (ns, operator, api) = setup(&env, "outage", &provider, &[]).await;
    let names = ["outage-0", "outage-1"];
    for name in names {
        create_task(&api, name, sleeper()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while tasks(&api)
        .await
        .iter()
        .filter(|task| task.status.as_ref().and_then(|s| s.phase) == Some(TaskPhase::Running))
        .count()
        < names.len()
    {
        assert!(Instant::now() < deadline, "the tasks did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let uids: Vec<String> = tasks(&api)
        .await
        .iter()
        .filter_map(|task| task.metadata.uid.clone())
        .collect();
    provider.server.faults().set(FaultPlan {
        unavailable: u32::MAX,
        ..FaultPlan::default()
    });
    for name in names {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = tasks(&api).await;
        assert_eq!(
            left.len(),
            names.len(),
            "a task went away while its sandbox could not be killed"
        );
        let blocked = warnings(&env, &ns)
            .await
            .get("CleanupBlocked")
            .copied()
            .unwrap_or(0);
        if blocked >= names.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no CleanupBlocked event for each task"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lives = provider.lives_by_task();
    let alive_during = uids
        .iter()
        .filter(|uid| lives[*uid].iter().any(|life| life.ended.is_none()))
        .count();
    provider.server.faults().clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tasks(&api).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the tasks were not removed after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lives = provider.lives_by_task();
    let killed = uids
        .iter()
        .filter(|uid| lives[*uid].iter().all(|life| life.ended.is_some()))
        .count();
    figure(format!(
        "outage: {} tasks deleted during a provider outage, {alive_during} held by their finalizer with CleanupBlocked, {killed} sandboxes killed once it ended, {} leaked",
        names.len(),
        provider.live().await,
    ));
    assert_eq!(alive_during, names.len());
    assert_eq!(killed, names.len());
    drop(operator);
    provider.stop().await;
}
