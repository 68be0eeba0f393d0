//! The operator killed with SIGKILL at random moments while tasks run, and started again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    Provider, create_task, figure, finished, identifying_task, misreport, overlapping, setting,
    setup, tasks, warnings,
};
use sandcastle_testkit::cluster::TestEnv;

pub async fn killed_operators_lose_and_duplicate_nothing(env: Arc<TestEnv>) {
    let count: usize = setting("SANDCASTLE_CHAOS_TASKS", 60);
    let kills: usize = setting("SANDCASTLE_CHAOS_KILLS", 10);
    let seed: u64 = setting("SANDCASTLE_CHAOS_SEED", 8);
    let mut rng = StdRng::seed_from_u64(seed);
    let provider = Provider::start("chaos").await;
    // A sixth of the tasks at a time at most, so the run lasts long enough for at least
    // `kills` kills to land while work is in flight (it goes on killing until the end).
    let slots = (count / 6).max(2).to_string();
    let (ns, mut operator, api) = setup(
        &env,
        "chaos",
        &provider,
        &[("SANDCASTLE_MAX_RUNNING_TASKS", &slots)],
    )
    .await;
    let names: Vec<String> = (0..count).map(|n| format!("chaos-{n:03}")).collect();
    for name in &names {
        let sleep = Duration::from_millis(rng.random_range(10..=50) * 100);
        create_task(&api, name, identifying_task(name, sleep)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(60 + 3 * count as u64);
    let mut killed = 0;
    loop {
        let pause = Duration::from_millis(rng.random_range(200..2000));
        tokio::time::sleep(pause).await;
        let all = tasks(&api).await;
        let open = all
            .iter()
            .filter(|task| !finished(task.status.as_ref()))
            .count();
        if open == 0 {
            break;
        }
        operator.crash_and_restart();
        killed += 1;
        assert!(
            Instant::now() < deadline,
            "{open} of {count} tasks still open after {killed} kills: {:#?}",
            all.iter()
                .filter(|task| !finished(task.status.as_ref()))
                .map(|task| (&task.metadata.name, &task.status))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        killed >= kills,
        "the tasks finished after only {killed} kills; raise SANDCASTLE_CHAOS_TASKS"
    );
    let leaked = provider.settle(Duration::from_secs(30)).await;

    let all = tasks(&api).await;
    let lives = provider.lives_by_task();
    let lost: Vec<String> = all.iter().filter_map(misreport).collect();
    let mut duplicate = Vec::new();
    let mut miscounted = Vec::new();
    let mut attempts = 0;
    for task in &all {
        let name = task.metadata.name.clone().unwrap_or_default();
        let uid = task.metadata.uid.clone().unwrap_or_default();
        let mine = lives.get(&uid).cloned().unwrap_or_default();
        let recorded = task
            .status
            .as_ref()
            .and_then(|status| status.attempts)
            .unwrap_or(0);
        attempts += recorded as usize;
        if overlapping(&mine) {
            duplicate.push(format!("{name}: two live sandboxes at once"));
        }
        if mine.len() != recorded as usize {
            miscounted.push(format!(
                "{name}: {} sandboxes for {recorded} recorded attempts",
                mine.len()
            ));
        }
    }
    let created: usize = lives.values().map(Vec::len).sum();
    // A second run in one sandbox shows in runs.log, which `misreport` checks; count it
    // as a duplicate rather than a loss.
    let (ran_twice, lost): (Vec<String>, Vec<String>) = lost
        .into_iter()
        .partition(|line| line.contains("(\"runs.log\", 8)"));
    duplicate.extend(ran_twice);
    let warned = warnings(&env, &ns).await;
    // Nothing here fails but the operator, and a crash is no reason to start an agent
    // over: every retry is work done twice.
    let redone = attempts.saturating_sub(count);
    figure(format!(
        "chaos: {count} tasks, {killed} kills, {} lost, {} duplicate, {redone} redone, {leaked} leaked; {created} sandboxes for {attempts} attempts, warnings {warned:?}, seed {seed}",
        lost.len(),
        duplicate.len(),
    ));
    assert_eq!(all.len(), count);
    assert!(lost.is_empty(), "lost or misreported:\n{}", lost.join("\n"));
    assert!(
        duplicate.is_empty(),
        "duplicated:\n{}",
        duplicate.join("\n")
    );
    assert!(
        miscounted.is_empty(),
        "the provider's count differs from the recorded attempts:\n{}",
        miscounted.join("\n")
    );
    assert_eq!(
        redone, 0,
        "attempts retried though only the operator failed: {warned:?}"
    );
    assert_eq!(leaked, 0, "sandboxes alive after every task finished");
    drop(operator);
    provider.stop().await;
}

/// The chaos above with a warm pool: tasks claim warm sandboxes while the operator is
/// killed at random moments. No sandbox is taken by two tasks (each task's `runs.log`
/// would show the other's run, and their recorded sandboxes would repeat), every task
/// reports its true result, and once the template is deleted nothing is left.
pub async fn killed_operators_take_no_warm_sandbox_twice(env: Arc<TestEnv>) {
    let count: usize = setting("SANDCASTLE_POOL_CHAOS_TASKS", 30);
    let kills: usize = setting("SANDCASTLE_POOL_CHAOS_KILLS", 5);
    let seed: u64 = setting("SANDCASTLE_CHAOS_SEED", 8);
    let mut rng = StdRng::seed_from_u64(seed);
    let provider = Provider::start("pool-chaos").await;
    let (ns, mut operator, api) = setup(&env, "pool-chaos", &provider, &[]).await;
    let templates: kube::Api<sandcastle_api::SandboxTemplate> =
        kube::Api::namespaced(env.client.clone(), &ns);
    let template: sandcastle_api::SandboxTemplate = serde_json::from_value(serde_json::json!({
        "apiVersion": "sandcastle.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": "warm"},
        "spec": {"existing": {"templateId": "base"}, "pool": {"size": 8}},
    }))
    .unwrap();
    templates
        .create(&Default::default(), &template)
        .await
        .expect("template");
    sandcastle_testkit::operator::wait_for(&templates, "warm", "a full pool", |status| {
        status.pool.as_ref().is_some_and(|pool| pool.ready == 8)
    })
    .await;

    let names: Vec<String> = (0..count).map(|n| format!("warm-{n:03}")).collect();
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(120 + 3 * count as u64);
    // Tasks arrive in waves while the operator is killed, so claims are in flight.
    for wave in names.chunks(5) {
        for name in wave {
            let sleep = Duration::from_millis(rng.random_range(5..=20) * 100);
            let mut spec = identifying_task(name, sleep);
            spec["templateRef"]["name"] = "warm".into();
            create_task(&api, name, spec).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        // Not after every wave: a restarted operator learns its pools on its first pass,
        // and claims need a pool to take from.
        if rng.random_bool(0.5) {
            operator.crash_and_restart();
            killed += 1;
        }
    }
    loop {
        let all = tasks(&api).await;
        if all.iter().all(|task| finished(task.status.as_ref())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tasks still open after {killed} kills"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
        if all.iter().any(|task| !finished(task.status.as_ref())) {
            operator.crash_and_restart();
            killed += 1;
        }
    }
    assert!(killed >= kills, "only {killed} kills");
    let all = tasks(&api).await;
    let lost: Vec<String> = all.iter().filter_map(misreport).collect();
    let sandboxes: Vec<String> = all
        .iter()
        .filter_map(|task| task.status.as_ref()?.sandbox_id.clone())
        .collect();
    let mut distinct = sandboxes.clone();
    distinct.sort();
    distinct.dedup();
    let pool_lives: Vec<String> = provider
        .server
        .history()
        .into_iter()
        .filter(|life| {
            life.metadata
                .contains_key(sandcastle_api::names::SANDBOX_POOL)
        })
        .map(|life| life.sandbox_id)
        .collect();
    let warm = sandboxes
        .iter()
        .filter(|id| pool_lives.contains(id))
        .count();
    // The pool's sandboxes go with the template; claims a crash cut off go after their
    // grace.
    templates
        .delete("warm", &Default::default())
        .await
        .expect("delete the template");
    let leaked = provider.settle(Duration::from_secs(120)).await;
    let warned = warnings(&env, &ns).await;
    figure(format!(
        "pool chaos: {count} tasks, {killed} kills, {warm} on warm sandboxes, {} lost, {} taken twice, {leaked} leaked; {} pool sandboxes made, warnings {warned:?}, seed {seed}",
        lost.len(),
        sandboxes.len() - distinct.len(),
        pool_lives.len(),
    ));
    assert_eq!(all.len(), count);
    assert!(
        lost.is_empty(),
        "lost, misreported or run twice:\n{}",
        lost.join("\n")
    );
    assert_eq!(sandboxes.len(), count, "every task recorded its sandbox");
    assert_eq!(
        distinct.len(),
        count,
        "a sandbox recorded by two tasks: {sandboxes:?}"
    );
    assert!(warm > 0, "no task took a warm sandbox");
    assert_eq!(
        leaked, 0,
        "sandboxes alive after the tasks and the template"
    );
    drop(operator);
    provider.stop().await;
}
