//! Deletions racing the work: tasks deleted at each step of their start, and a namespace
//! deleted with its running tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use sandcastle_api::{AgentTask, TaskPhase};
use sandcastle_sandboxd::{FaultPlan, SandboxLife};
use serde_json::json;

use super::{Provider, create_task, figure, setting, setup, tasks, warnings};
use sandcastle_testkit::cluster::TestEnv;

use sandcastle_api::names::TASK_FINALIZER as FINALIZER;

fn sleeper() -> serde_json::Value {
    json!({
        "templateRef": {"name": "base"},
        "agent": {"command": {"command": ["sleep", "600"]}},
    })
}

/// When a task is deleted: before the operator's finalizer is on (its first sandbox is
/// created alongside that write), before its sandbox is recorded, or while its agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    Created,
    Pending,
    Running,
}

impl Moment {
    fn of(name: &str) -> Moment {
        match name.split('-').next() {
            Some("created") => Moment::Created,
            Some("pending") => Moment::Pending,
            _ => Moment::Running,
        }
    }

    /// Whether a task in this state is at the moment.
    fn reached(self, task: &AgentTask) -> bool {
        let status = task.status.clone().unwrap_or_default();
        match self {
            // Deleted by the loop that creates it, not from the watch.
            Moment::Created => false,
            // Seen by the operator (it holds the finalizer), no sandbox recorded yet.
            Moment::Pending => finalized(task) && status.sandbox_id.is_none(),
            Moment::Running => status.phase == Some(TaskPhase::Running),
        }
    }

    /// Whether a task in this state went past the moment unseen.
    fn passed(self, task: &AgentTask) -> bool {
        let status = task.status.clone().unwrap_or_default();
        match self {
            Moment::Created => false,
            Moment::Pending => status.sandbox_id.is_some(),
            Moment::Running => {
                matches!(status.phase, Some(TaskPhase::Succeeded | TaskPhase::Failed))
            }
        }
    }
}

fn finalized(task: &AgentTask) -> bool {
    task.metadata
        .finalizers
        .as_ref()
        .is_some_and(|finalizers| finalizers.iter().any(|f| f == FINALIZER))
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
    let moments = [Moment::Created, Moment::Pending, Moment::Running];
    let names: Vec<String> = moments
        .iter()
        .flat_map(|moment| {
            (0..per_moment).map(move |n| format!("{}-{n}", format!("{moment:?}").to_lowercase()))
        })
        .collect();
    let watch = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    // The moment each task was deleted at, as this watch saw it, and its UID.
    let mut deleted: BTreeMap<String, (Moment, String)> = BTreeMap::new();
    let mut missed = BTreeSet::new();
    // Those deleted right after their create, a few milliseconds later each so that some
    // land while the operator's first pass is under way, and how many went at once, before
    // the operator's finalizer was on.
    let mut before_finalizer = 0;
    for name in &names {
        let task = create_task(&api, name, sleeper()).await;
        if Moment::of(name) != Moment::Created {
            continue;
        }
        let pause = 3 * deleted.len() as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let outcome = api
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|err| panic!("delete {name}: {err}"));
        if outcome.is_right() {
            before_finalizer += 1;
        }
        let uid = task.metadata.uid.clone().unwrap_or_default();
        deleted.insert(name.clone(), (Moment::Created, uid));
    }
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
    // for the orphan sweep. A task deleted before its finalizer was on goes at once, and
    // the sandbox its pass was creating meanwhile is killed as soon as the finalizer's
    // write is refused: within seconds, not at the sweep.
    let alive_after_gone = |lives: &BTreeMap<String, Vec<SandboxLife>>, late: bool| {
        deleted
            .iter()
            .filter(|(_, (moment, _))| (*moment == Moment::Created) == late)
            .filter(|(_, (_, uid))| {
                lives
                    .get(uid)
                    .is_some_and(|mine| mine.iter().any(|life| life.ended.is_none()))
            })
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>()
    };
    let mut alive = alive_after_gone(&provider.lives_by_task(), false);
    let deadline = Instant::now() + Duration::from_secs(15);
    let alive_unfinalized = loop {
        let still = alive_after_gone(&provider.lives_by_task(), true);
        if still.is_empty() || Instant::now() > deadline {
            break still;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    alive.extend(alive_unfinalized);
    let lives = provider.lives_by_task();
    let created: usize = deleted
        .values()
        .map(|(_, uid)| lives.get(uid).map_or(0, Vec::len))
        .sum();
    let by_moment = |moment: Moment| deleted.values().filter(|(seen, _)| *seen == moment).count();
    provider.server.faults().clear();
    figure(format!(
        "deletion: {} tasks deleted ({} right after their create, {before_finalizer} of them before the operator's finalizer; {} before their sandbox was recorded; {} running; {} missed their moment); {created} sandboxes created, {} alive after their task was gone, 0 finalizers left",
        deleted.len(),
        by_moment(Moment::Created),
        by_moment(Moment::Pending),
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
    assert!(
        before_finalizer > 0,
        "every task deleted right after its create already had the finalizer; the race was not run"
    );
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

/// The operator's finalizer goes on alongside a new task's first sandbox create. Here an
/// admission policy refuses that write every time: the sandbox made alongside it must be
/// killed at once, the task must say why it waits, later passes must make no sandbox, and
/// the task must go without leaving one behind.
pub async fn a_refused_finalizer_leaves_no_sandbox(env: Arc<TestEnv>) {
    let provider = Provider::start("refused-finalizer").await;
    let (ns, operator, api) = setup(&env, "refused-finalizer", &provider, &[]).await;
    let policy_name = format!("refuse-finalizer-{ns}");
    let refusal = "this cluster refuses the operator's finalizer here";
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy_name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["sandcastle.dev"],
                "apiVersions": ["*"],
                "operations": ["UPDATE"],
                "resources": ["agenttasks"],
            }]},
            "validations": [{
                "expression": format!("!has(object.metadata.finalizers) || !object.metadata.finalizers.exists(f, f == '{FINALIZER}')"),
                "message": refusal,
            }],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy_name},
        "spec": {
            "policyName": policy_name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
        },
    });
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(env.client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(env.client.clone());
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(policy).expect("a policy"),
        )
        .await
        .expect("create the policy");
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(binding).expect("a binding"),
        )
        .await
        .expect("create the binding");
    // A policy takes a moment to be enforced: until a dry run of the operator's write is
    // refused, the operator would not meet it. The probe waits for a template that never
    // comes, so the operator leaves it alone.
    let mut waits = sleeper();
    waits["templateRef"]["name"] = json!("absent");
    let probe = create_task(&api, "probe", waits).await;
    let finalizer = json!({"metadata": {"finalizers": [FINALIZER]}});
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api
            .patch("probe", &dry_run, &Patch::Merge(&finalizer))
            .await
        {
            Err(kube::Error::Api(status)) if status.message.contains(refusal) => break,
            outcome => assert!(
                Instant::now() < deadline,
                "the admission policy is not enforced: {outcome:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(probe);

    let task = create_task(&api, "refused", sleeper()).await;
    let uid = task.metadata.uid.clone().unwrap_or_default();
    // The first pass made a sandbox alongside the refused write and killed it; the task
    // then waits with the apiserver's words and gets no sandbox until the finalizer is on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        let task = api.get("refused").await.expect("the task");
        let status = task.status.unwrap_or_default();
        if status.reason.as_deref() == Some("FinalizerRefused") {
            break status.message.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "the task does not say its finalizer was refused: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        waiting.contains(refusal),
        "the message does not quote the refusal: {waiting}"
    );
    // Passes go on meanwhile (every 15 s, and on each change): one more, made to come
    // now by a label, must not make a sandbox.
    api.patch(
        "refused",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"poked": "yes"}}})),
    )
    .await
    .expect("label the task");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lives = provider.lives_by_task().remove(&uid).unwrap_or_default();
    let made = lives.len();
    assert_eq!(
        made, 1,
        "sandboxes made for a task whose finalizer is refused: {lives:?}"
    );
    assert!(
        lives.iter().all(|life| life.ended.is_some()),
        "the sandbox made alongside the refused finalizer is alive: {lives:?}"
    );
    let refused = api.get("refused").await.expect("the task");
    assert!(
        refused.metadata.finalizers.unwrap_or_default().is_empty(),
        "the refused finalizer is on"
    );
    let outcome = api
        .delete("refused", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(outcome.is_right(), "the task did not go at once");
    // A pass under way when the task went ends with its sandbox killed too.
    let deadline = Instant::now() + Duration::from_secs(15);
    let lives = loop {
        let lives = provider.lives_by_task().remove(&uid).unwrap_or_default();
        if lives.iter().all(|life| life.ended.is_some()) || Instant::now() > deadline {
            break lives;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let alive = lives.iter().filter(|life| life.ended.is_none()).count();
    figure(format!(
        "refused finalizer: the task waits as FinalizerRefused; {made} sandbox made (and killed) while the finalizer was refused, {} in all, {alive} alive after the task was gone",
        lives.len()
    ));
    assert_eq!(alive, 0, "a sandbox outlived its task: {lives:?}");
    let _ = bindings
        .delete(&policy_name, &DeleteParams::default())
        .await;
    let _ = policies
        .delete(&policy_name, &DeleteParams::default())
        .await;
    drop(operator);
    provider.stop().await;
}
