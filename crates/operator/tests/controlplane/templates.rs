//! The SandboxTemplate controller against a real control plane, with the operator binary
//! and its embedded sandbox server running as in production.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use sandcastle_api::{SandboxTemplate, SandboxTemplateStatus, TemplatePhase};
use sandcastle_e2b::client::SandboxSpec;
use serde_json::json;

use sandcastle_testkit::cluster::TestEnv;
use sandcastle_testkit::operator::{Operator, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// Waits for `Stalled=True` with `reason`, and checks the message names `subject`.
async fn wait_stalled(api: &Api<SandboxTemplate>, name: &str, reason: &str, subject: &str) {
    let stalled = wait_for(api, name, reason, |status| {
        condition(status, "Stalled") == ("True", reason)
    })
    .await;
    let message = stalled.message.unwrap_or_default();
    assert!(
        message.contains(subject),
        "{name}: {message:?} does not name {subject}"
    );
}

/// Waits until the object is gone (its finalizer released).
async fn wait_gone(api: &Api<SandboxTemplate>, name: &str) {
    let deadline = Instant::now() + WAIT;
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "{name} was not removed within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition<'a>(status: &'a SandboxTemplateStatus, type_: &str) -> (&'a str, &'a str) {
    status
        .conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| (condition.status.as_str(), condition.reason.as_str()))
        .unwrap_or(("", ""))
}

fn is_ready(status: &SandboxTemplateStatus) -> bool {
    status.phase == Some(TemplatePhase::Ready)
}

async fn create_template(api: &Api<SandboxTemplate>, name: &str, spec: serde_json::Value) {
    let template: SandboxTemplate = serde_json::from_value(json!({
        "apiVersion": "sandcastle.dev/v1alpha1",
        "kind": "SandboxTemplate",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a template");
    api.create(&PostParams::default(), &template)
        .await
        .expect("create template");
}

async fn put_config_map(env: &TestEnv, ns: &str, name: &str, file: &str, content: &str) {
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), ns);
    let config_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {file: content},
    });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&config_map),
    )
    .await
    .expect("apply ConfigMap");
}

async fn build_count(operator: &Operator, template_id: &str) -> u64 {
    operator
        .provider()
        .get_template(template_id)
        .await
        .expect("the provider has the template")
        .build_count
}

/// The namespace's events once `wanted` holds of them, or as they stand after 20 s so the
/// caller's assertion shows what was there: the operator publishes an event after the status
/// write it reports, so a test that saw the status may list events a moment too early.
async fn events_once(
    env: &TestEnv,
    ns: &str,
    wanted: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reasons = event_reasons(env, ns).await;
        if wanted(&reasons) || tokio::time::Instant::now() >= deadline {
            return reasons;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn has_reason(reasons: &[(String, String)], wanted: &str) -> bool {
    reasons.iter().any(|(reason, _)| reason == wanted)
}

/// Each event's reason and note, repeated as often as it happened: the recorder folds
/// repeats of a reason into one event with a series count.
async fn event_reasons(env: &TestEnv, ns: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .flat_map(|event| {
            let times = event
                .series
                .as_ref()
                .map_or(1, |series| series.count.max(1)) as usize;
            let entry = (
                event.reason.unwrap_or_default(),
                event.note.unwrap_or_default(),
            );
            std::iter::repeat_n(entry, times)
        })
        .collect()
}

pub async fn builds_record_ids_early_and_rebuild_only_on_change(env: Arc<TestEnv>) {
    let ns = env.namespace("build").await;
    let operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    put_config_map(&env, &ns, "tools", "note.txt", "one").await;
    create_template(
        &api,
        "tools",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [
                {"copy": {"configMapRef": {"name": "tools"}, "dest": "/home/user/tools"}},
                {"run": "sleep 2; cat /home/user/tools/note.txt"},
            ],
        }}),
    )
    .await;
    let building = wait_for(&api, "tools", "building with IDs", |status| {
        status.build_id.is_some() && status.phase == Some(TemplatePhase::Building)
    })
    .await;
    assert_eq!(condition(&building, "Reconciling").0, "True");
    let ready = wait_for(&api, "tools", "ready", is_ready).await;
    let template_id = ready.template_id.clone().expect("template ID");
    assert_eq!(
        ready.build_id, building.build_id,
        "one build from request to ready"
    );
    assert_eq!(
        ready.template_name.as_deref(),
        Some(format!("{ns}-tools").as_str())
    );
    assert!(
        ready.log_tail.iter().any(|line| line == "one"),
        "{:?}",
        ready.log_tail
    );
    assert_eq!(condition(&ready, "Ready"), ("True", "BuildSucceeded"));
    assert_eq!(condition(&ready, "Stalled").0, "False");
    assert_eq!(build_count(&operator, &template_id).await, 1);

    // A change that does not touch the build: no provider call, no status write.
    let labelled = json!({"metadata": {"labels": {"touched": "yes"}}});
    api.patch("tools", &PatchParams::default(), &Patch::Merge(&labelled))
        .await
        .expect("label");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api
        .get("tools")
        .await
        .expect("template")
        .status
        .expect("status");
    assert_eq!(
        after, ready,
        "an unchanged spec must not be rebuilt or rewritten"
    );
    assert_eq!(build_count(&operator, &template_id).await, 1);

    put_config_map(&env, &ns, "tools", "note.txt", "two").await;
    let rebuilt = wait_for(
        &api,
        "tools",
        "rebuilt after the ConfigMap changed",
        |status| is_ready(status) && status.build_id != ready.build_id,
    )
    .await;
    assert_eq!(rebuilt.template_id.as_deref(), Some(template_id.as_str()));
    assert!(
        rebuilt.log_tail.iter().any(|line| line == "two"),
        "{:?}",
        rebuilt.log_tail
    );
    assert_eq!(build_count(&operator, &template_id).await, 2);

    let bigger = json!({"spec": {"build": {"cpuCount": 4}}});
    api.patch("tools", &PatchParams::default(), &Patch::Merge(&bigger))
        .await
        .expect("patch spec");
    wait_for(&api, "tools", "rebuilt after the spec changed", |status| {
        is_ready(status) && status.build_id != rebuilt.build_id
    })
    .await;
    assert_eq!(build_count(&operator, &template_id).await, 3);
    let reasons = events_once(&env, &ns, |reasons| {
        reasons
            .iter()
            .filter(|(reason, _)| reason == "BuildStarted")
            .count()
            >= 3
    })
    .await;
    let started = reasons
        .iter()
        .filter(|(reason, _)| reason == "BuildStarted")
        .count();
    assert_eq!(started, 3, "{reasons:?}");
}

pub async fn a_failed_step_is_reported_with_its_log(env: Arc<TestEnv>) {
    let ns = env.namespace("failing").await;
    let _operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(
        &api,
        "broken",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [
                {"run": "echo preparing"},
                {"env": {"MODE": "strict"}},
                {"run": "echo the third step breaks >&2; exit 3"},
            ],
        }}),
    )
    .await;
    let failed = wait_for(&api, "broken", "failed", |status| {
        status.phase == Some(TemplatePhase::Failed)
    })
    .await;
    assert_eq!(failed.failed_step, Some(3));
    assert!(
        failed
            .log_tail
            .iter()
            .any(|line| line.contains("the third step breaks")),
        "{:?}",
        failed.log_tail
    );
    assert_eq!(condition(&failed, "Ready"), ("False", "BuildFailed"));
    assert_eq!(condition(&failed, "Stalled"), ("True", "BuildFailed"));
    assert_eq!(condition(&failed, "Reconciling").0, "False");
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("step 3")
    );
    let reasons = events_once(&env, &ns, |reasons| has_reason(reasons, "BuildFailed")).await;
    assert!(
        reasons.iter().any(|(reason, _)| reason == "BuildFailed"),
        "{reasons:?}"
    );
}

/// `spec.build.timeoutSeconds` is enforced: a build that hangs fails the template with a
/// reason of its own, soon after its limit.
pub async fn a_build_past_its_timeout_fails(env: Arc<TestEnv>) {
    let ns = env.namespace("build-timeout").await;
    let _operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(
        &api,
        "hanging",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [{"run": "echo hanging; sleep 600"}],
            "timeoutSeconds": 3,
        }}),
    )
    .await;
    let failed = wait_for(&api, "hanging", "failed", |status| {
        status.phase == Some(TemplatePhase::Failed)
    })
    .await;
    assert_eq!(condition(&failed, "Ready"), ("False", "BuildTimedOut"));
    assert_eq!(condition(&failed, "Stalled"), ("True", "BuildTimedOut"));
    assert_eq!(condition(&failed, "Reconciling").0, "False");
    let started = failed.build_started_at.as_ref().expect("started").0;
    let ended = failed.build_completed_at.as_ref().expect("ended").0;
    let took = ended.duration_since(started).as_secs_f64();
    assert!(
        (3.0..=10.0).contains(&took),
        "failed {took} s after the build started"
    );
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("within 3 s"),
        "{failed:#?}"
    );
    let reasons = events_once(&env, &ns, |reasons| has_reason(reasons, "BuildTimedOut")).await;
    assert!(
        reasons.iter().any(|(reason, _)| reason == "BuildTimedOut"),
        "{reasons:?}"
    );
}

pub async fn existing_templates_are_adopted_or_reported_missing(env: Arc<TestEnv>) {
    let ns = env.namespace("existing").await;
    let _operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(&api, "base", json!({"existing": {"templateId": "base"}})).await;
    create_template(
        &api,
        "ghost",
        json!({"existing": {"templateId": "no-such-template"}}),
    )
    .await;
    let adopted = wait_for(&api, "base", "adopted", is_ready).await;
    assert_eq!(adopted.template_id.as_deref(), Some("base"));
    assert_eq!(condition(&adopted, "Ready"), ("True", "Adopted"));
    let missing = wait_for(&api, "ghost", "reported missing", |status| {
        condition(status, "Stalled") == ("True", "TemplateNotFound")
    })
    .await;
    assert!(missing.template_id.is_none());
}

pub async fn missing_credentials_are_retried_once_the_secret_exists(env: Arc<TestEnv>) {
    let ns = env.namespace("credentials").await;
    let operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(
        &api,
        "remote",
        json!({
            "provider": {"e2b": {"apiUrl": operator.api_url(), "apiKeySecretRef": {"name": "e2b"}}},
            "build": {"fromTemplate": "base", "steps": [{"run": "true"}]},
        }),
    )
    .await;
    wait_stalled(&api, "remote", "MissingCredentials", "e2b").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let wrong_key = "wrong-key-value-7f3a";
    let secret = |key: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "e2b"},
               "stringData": {"E2B_API_KEY": key}})
    };
    secrets
        .patch(
            "e2b",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret(wrong_key)),
        )
        .await
        .expect("create Secret");
    let refused = wait_for(&api, "remote", "refused", |status| {
        condition(status, "Stalled") == ("True", "Unauthorized")
    })
    .await;
    secrets
        .patch(
            "e2b",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret(operator.api_key())),
        )
        .await
        .expect("fix Secret");
    wait_for(&api, "remote", "ready", is_ready).await;
    let template = serde_json::to_string(&api.get("remote").await.expect("template")).unwrap();
    let events = format!("{:?}", event_reasons(&env, &ns).await);
    for (what, text) in [
        ("status", &template),
        ("events", &events),
        ("refused status", &format!("{refused:?}")),
    ] {
        assert!(
            !text.contains(wrong_key) && !text.contains(operator.api_key()),
            "a key leaked into {what}"
        );
    }
}

pub async fn deletion_follows_the_policy_and_waits_for_users(env: Arc<TestEnv>) {
    let ns = env.namespace("deletion").await;
    let operator = Operator::start(env.kubeconfig_path(), &ns);
    let provider = operator.provider();
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let build = json!({"fromTemplate": "base", "steps": [{"run": "true"}]});
    create_template(&api, "deleted", json!({"build": build})).await;
    create_template(
        &api,
        "kept",
        json!({"build": build, "deletionPolicy": "Retain"}),
    )
    .await;
    let deleted = wait_for(&api, "deleted", "ready", is_ready)
        .await
        .template_id
        .expect("ID");
    let kept = wait_for(&api, "kept", "ready", is_ready)
        .await
        .template_id
        .expect("ID");

    let sandbox = provider
        .create_sandbox(&SandboxSpec::new(deleted.clone(), Duration::from_secs(120)))
        .await
        .expect("a sandbox from the template");
    api.delete("deleted", &DeleteParams::default())
        .await
        .expect("delete");
    let blocked = wait_for(&api, "deleted", "blocked by its sandbox", |status| {
        condition(status, "Ready").1 == "DeletionBlocked"
    })
    .await;
    assert!(
        blocked
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("in use"),
        "{blocked:?}"
    );
    assert!(provider.get_template(&deleted).await.is_ok());
    assert!(
        provider
            .kill_sandbox(&sandbox.sandbox_id)
            .await
            .expect("kill")
    );
    wait_gone(&api, "deleted").await;
    let gone = provider.get_template(&deleted).await;
    assert!(
        gone.as_ref().is_err_and(|error| error.is_not_found()),
        "{gone:?}"
    );

    api.delete("kept", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&api, "kept").await;
    assert!(
        provider.get_template(&kept).await.is_ok(),
        "Retain keeps the provider's template"
    );
}

pub async fn a_restart_mid_build_follows_the_same_build(env: Arc<TestEnv>) {
    let ns = env.namespace("restart").await;
    let mut operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(
        &api,
        "slow",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [{"run": "sleep 4; echo slept"}],
        }}),
    )
    .await;
    let building = wait_for(&api, "slow", "building", |status| {
        status.phase == Some(TemplatePhase::Building) && status.build_id.is_some()
    })
    .await;
    operator.crash_and_restart();
    let ready = wait_for(&api, "slow", "ready after the restart", is_ready).await;
    assert_eq!(
        ready.build_id, building.build_id,
        "the restarted operator followed the same build"
    );
    let template_id = ready.template_id.expect("ID");
    assert_eq!(
        build_count(&operator, &template_id).await,
        1,
        "one build for one spec"
    );
    assert!(
        ready.log_tail.iter().any(|line| line == "slept"),
        "{:?}",
        ready.log_tail
    );
}

pub async fn a_template_deleted_behind_the_operators_back_is_rebuilt(env: Arc<TestEnv>) {
    let ns = env.namespace("vanished").await;
    let operator = Operator::start(env.kubeconfig_path(), &ns);
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    create_template(
        &api,
        "fragile",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [{"run": "true"}],
        }}),
    )
    .await;
    let first = wait_for(&api, "fragile", "ready", is_ready).await;
    let first_id = first.template_id.clone().expect("ID");
    assert!(
        operator
            .provider()
            .delete_template(&first_id)
            .await
            .expect("delete")
    );
    let rebuilt = wait_for(&api, "fragile", "rebuilt", |status| {
        is_ready(status) && status.build_id != first.build_id
    })
    .await;
    let rebuilt_id = rebuilt.template_id.expect("ID");
    assert!(operator.provider().get_template(&rebuilt_id).await.is_ok());
    let reasons = events_once(&env, &ns, |reasons| has_reason(reasons, "TemplateVanished")).await;
    assert!(
        reasons
            .iter()
            .any(|(reason, _)| reason == "TemplateVanished"),
        "{reasons:?}"
    );
}

pub async fn builds_wait_for_a_slot_and_for_their_config_map(env: Arc<TestEnv>) {
    let ns = env.namespace("queue").await;
    let _operator = Operator::start_with(
        env.kubeconfig_path(),
        &ns,
        &[("SANDCASTLE_MAX_CONCURRENT_BUILDS", "1")],
    );
    let api: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let slow = json!({"fromTemplate": "base", "steps": [{"run": "sleep 3"}]});
    create_template(&api, "first", json!({"build": slow})).await;
    wait_for(&api, "first", "building", |status| {
        status.phase == Some(TemplatePhase::Building)
    })
    .await;
    create_template(&api, "second", json!({"build": slow})).await;
    let queued = wait_for(&api, "second", "queued", |status| {
        condition(status, "Ready").1 == "Queued"
    })
    .await;
    assert_eq!(condition(&queued, "Reconciling").0, "True");
    assert!(
        queued.build_id.is_none(),
        "a queued template has not asked for a build"
    );
    wait_for(&api, "first", "ready", is_ready).await;
    wait_for(&api, "second", "ready once the slot is free", is_ready).await;

    create_template(
        &api,
        "needs-files",
        json!({"build": {
            "fromTemplate": "base",
            "steps": [{"copy": {"configMapRef": {"name": "files"}, "dest": "/opt/files"}}],
        }}),
    )
    .await;
    wait_stalled(&api, "needs-files", "MissingConfigMap", "files").await;
    put_config_map(&env, &ns, "files", "a.txt", "content").await;
    wait_for(
        &api,
        "needs-files",
        "ready once the ConfigMap exists",
        is_ready,
    )
    .await;
}
