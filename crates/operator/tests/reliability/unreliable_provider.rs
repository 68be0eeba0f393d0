//! A provider that fails a share of all requests, control plane and envd alike, in every
//! way the fault switch knows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandcastle_api::TaskPhase;
use sandcastle_sandboxd::{Fault, FaultPlan, RandomFaults};

use super::{
    Provider, create_task, figure, finished, identifying_task, misreport, overlapping, setting,
    setup, tasks, warnings,
};
use sandcastle_testkit::cluster::TestEnv;

/// The reasons a task may fail with once its retries are spent: infrastructure failures
/// the controller retries under `backoffLimit`.
const RETRIED: [&str; 3] = ["SandboxLost", "AgentLost", "AgentIncomplete"];

pub async fn a_failing_provider_ends_every_task_cleanly(env: Arc<TestEnv>) {
    let count: usize = setting("SANDCASTLE_FAULT_TASKS", 20);
    let rate: f64 = setting("SANDCASTLE_FAULT_RATE", 0.3);
    let seed: u64 = setting("SANDCASTLE_FAULT_SEED", 30);
    let mut rng = StdRng::seed_from_u64(seed);
    let provider = Provider::start("faults").await;
    let (ns, operator, api) = setup(&env, "faults", &provider, &[]).await;
    provider.server.faults().set(FaultPlan {
        retry_after_secs: 1,
        // A few of the rarer faults for certain, whatever the draws: only creates can
        // vanish and only starts can be cut, a small share of all requests.
        cut_starts: 2,
        vanish_after: Some((2, Duration::from_millis(1500))),
        random: Some(RandomFaults {
            rate,
            seed,
            kinds: vec![
                Fault::RateLimited,
                Fault::Unavailable,
                Fault::Latency(Duration::from_secs(2)),
                Fault::CutStream,
                Fault::Vanish(Duration::from_millis(1500)),
            ],
        }),
        ..FaultPlan::default()
    });
    let names: Vec<String> = (0..count).map(|n| format!("faults-{n:03}")).collect();
    for name in &names {
        let sleep = Duration::from_millis(rng.random_range(10..=30) * 100);
        create_task(&api, name, identifying_task(name, sleep)).await;
    }

    let wait = Duration::from_secs(120 + 6 * count as u64);
    let deadline = Instant::now() + wait;
    let all = loop {
        let all = tasks(&api).await;
        if all.iter().all(|task| finished(task.status.as_ref())) {
            break all;
        }
        if Instant::now() >= deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A task that vanished would read as finished above: count them all.
    assert_eq!(
        all.len(),
        count,
        "{} of {count} tasks vanished",
        count - all.len()
    );
    let injected = provider.server.faults().injected();
    provider.server.faults().clear();
    let leaked = provider.settle(Duration::from_secs(30)).await;
    let lives = provider.lives_by_task();
    let warned = warnings(&env, &ns).await;
    let spent = a_spent_budget(&api, &provider).await;

    let stuck: Vec<String> = all
        .iter()
        .filter(|task| !finished(task.status.as_ref()))
        .map(|task| format!("{:?}: {:#?}", task.metadata.name, task.status))
        .collect();
    let mut wrong = Vec::new();
    let (mut succeeded, mut failed) = (0, Vec::new());
    let mut attempts = 0;
    for task in all.iter().filter(|task| finished(task.status.as_ref())) {
        let name = task.metadata.name.clone().unwrap_or_default();
        let status = task.status.clone().unwrap_or_default();
        let recorded = status.attempts.unwrap_or(0);
        attempts += recorded as usize;
        let uid = task.metadata.uid.clone().unwrap_or_default();
        let mine = lives.get(&uid).cloned().unwrap_or_default();
        if overlapping(&mine) {
            wrong.push(format!("{name}: two live sandboxes at once"));
        }
        if mine.len() != recorded as usize {
            wrong.push(format!(
                "{name}: {} sandboxes for {recorded} recorded attempts",
                mine.len()
            ));
        }
        if status.phase == Some(TaskPhase::Succeeded) {
            succeeded += 1;
            wrong.extend(misreport(task));
            continue;
        }
        let reason = status.reason.clone().unwrap_or_default();
        let budget = task.spec.backoff_limit + 1;
        let message = status.message.clone().unwrap_or_default();
        if !RETRIED.contains(&reason.as_str())
            || recorded != budget
            || !message.contains(&format!("after {budget} attempts"))
        {
            wrong.push(format!(
                "{name}: failed with {reason} after {recorded} attempts: {message}"
            ));
        }
        failed.push(reason);
    }
    let created: usize = lives.values().map(Vec::len).sum();
    figure(format!(
        "faults: {count} tasks, {} of {} requests faulted ({:.0} %: {} 429, {} 503, {} delayed 2 s, {} streams cut, {} sandboxes vanished); {succeeded} succeeded, {} failed {failed:?}, {} stuck, {leaked} leaked; {created} sandboxes for {attempts} attempts, warnings {warned:?}, seed {seed}; every sandbox vanishing: {spent}",
        injected.total(),
        injected.requests,
        100.0 * injected.total() as f64 / injected.requests.max(1) as f64,
        injected.rate_limited,
        injected.unavailable,
        injected.delayed,
        injected.cut_streams,
        injected.vanished,
        failed.len(),
        stuck.len(),
    ));
    assert!(
        stuck.is_empty(),
        "not finished within {wait:?}:\n{}",
        stuck.join("\n")
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(leaked, 0, "sandboxes alive after every task finished");
    for (kind, injected) in [
        ("429", injected.rate_limited),
        ("503", injected.unavailable),
        ("latency", injected.delayed),
        ("stream cut", injected.cut_streams),
        ("vanishing", injected.vanished),
    ] {
        assert!(
            injected > 0,
            "no {kind} was injected; the run proves nothing about it"
        );
    }
    drop(operator);
    provider.stop().await;
}

/// A task whose every sandbox vanishes: it fails once `backoffLimit` retries are spent,
/// saying why and after how many attempts, with one sandbox per attempt and none left.
async fn a_spent_budget(api: &kube::Api<sandcastle_api::AgentTask>, provider: &Provider) -> String {
    provider.server.faults().set(FaultPlan {
        vanish_after: Some((3, Duration::from_millis(500))),
        ..FaultPlan::default()
    });
    create_task(
        api,
        "unlucky",
        serde_json::json!({
            "templateRef": {"name": "base"},
            "agent": {"command": {"command": ["sleep", "5"]}},
            "backoffLimit": 2,
        }),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let task = loop {
        let task = api.get("unlucky").await.expect("the task");
        if finished(task.status.as_ref()) {
            break task;
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {:#?}",
            task.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    provider.server.faults().clear();
    let status = task.status.clone().unwrap_or_default();
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let lives = provider.lives_by_task().remove(&uid).unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    assert_eq!(
        (status.phase, status.reason.as_deref(), status.attempts),
        (Some(TaskPhase::Failed), Some("SandboxLost"), Some(3)),
        "{status:#?}"
    );
    assert!(message.contains("after 3 attempts"), "{message}");
    assert_eq!(lives.len(), 3, "one sandbox per attempt");
    assert!(lives.iter().all(|life| life.ended.is_some()));
    format!(
        "Failed/{} after {} attempts and {} sandboxes",
        status.reason.unwrap_or_default(),
        status.attempts.unwrap_or_default(),
        lives.len()
    )
}
