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
