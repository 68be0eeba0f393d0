//! kube-apiserver stopped mid-run and started again (same etcd, port and certificates):
//! the operator, left alone, picks up where it was and every task reports its true result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandcastle_api::TaskPhase;

use super::{
    Provider, create_task, figure, identifying_task, misreport, open_tasks, setting, setup, tasks,
};
use sandcastle_testkit::cluster::TestEnv;

pub async fn an_apiserver_outage_loses_nothing(_shared: Arc<TestEnv>) {
    let count: usize = setting("SANDCASTLE_OUTAGE_TASKS", 8);
    let down = Duration::from_secs(setting("SANDCASTLE_OUTAGE_SECONDS", 10));
    // A control plane of its own: stopping the shared one would fail the parts running
    // beside this one.
    let env = TestEnv::start_with(false)
        .await
        .expect("a control plane for the outage");
    let provider = Provider::start("outage").await;
    let (_ns, mut operator, api) = setup(&env, "outage", &provider, &[]).await;
    let names: Vec<String> = (0..count).map(|n| format!("outage-{n:02}")).collect();
    // Long enough to be running when the apiserver stops, short enough that most end
    // while it is down: their results wait in the sandboxes.
    for (n, name) in names.iter().enumerate() {
        let sleep = Duration::from_secs(4 + (n % 4) as u64);
        create_task(&api, name, identifying_task(name, sleep)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = loop {
        let all = tasks(&api).await;
        let running = all
            .iter()
            .filter(|task| {
                task.status.as_ref().and_then(|status| status.phase) == Some(TaskPhase::Running)
            })
            .count();
        if running == count {
            break running;
        }
        assert!(
            Instant::now() < deadline,
            "only {running} of {count} tasks running after a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    env.stop_apiserver();
    tokio::time::sleep(down).await;
    // Counted from the restart: the apiserver answers before it reports ready.
    let restarted = Instant::now();
    env.restart_apiserver()
        .await
        .expect("the apiserver starts again");
    // A task created after the outage is seen only through a watch that came back.
    let after = format!("outage-{count:02}");
    create_task(&api, &after, identifying_task(&after, Duration::ZERO)).await;
    let count = count + 1;
    let deadline = restarted + Duration::from_secs(120);
    loop {
        let open = open_tasks(&api).await;
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {count} tasks still open two minutes after the apiserver came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered = restarted.elapsed();
    // A task that vanished is not open either: count them all.
    let present = tasks(&api).await.len();
    assert_eq!(
        present,
        count,
        "{} of {count} tasks vanished",
        count - present
    );
    let leaked = provider.settle(Duration::from_secs(30)).await;
    let exited = operator.exit_within(Duration::ZERO).await;
    let lost: Vec<String> = tasks(&api).await.iter().filter_map(misreport).collect();
    figure(format!(
        "outage: apiserver down {} s with {running} tasks running, {} lost, {leaked} leaked, recovered in {:.1} s (all {count} tasks done, one created after the outage)",
        down.as_secs(),
        lost.len(),
        recovered.as_secs_f64()
    ));
    assert_eq!(exited, None, "the operator exited during the outage");
    // kube's default watch backoff left the operator blind for 100 s after a 10 s outage.
    assert!(
        recovered < Duration::from_secs(60),
        "the operator took {recovered:?} to notice the apiserver was back"
    );
    assert!(lost.is_empty(), "lost or misreported:\n{}", lost.join("\n"));
    assert_eq!(leaked, 0, "sandboxes alive after every task finished");
    let logs = operator.logs();
    assert!(!logs.contains("panicked"), "the operator panicked:\n{logs}");
    drop(operator);
    provider.stop().await;
}
