//! The CRDs on a real kube-apiserver: installation, admission, defaults, status,
//! printer columns and `kubectl explain`; and the operator binary's controllers.
//!
//! One control plane serves the whole binary (a custom harness, so it is torn down
//! after the last test even when tests fail); each test works in its own namespace.

mod git;
mod mcp;
mod operations;
mod tasks;
mod templates;

use std::process::ExitCode;
use std::sync::Arc;

use git::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use mcp::*;
use operations::*;
use sandcastle_api::{AgentTask, SandboxTemplate};
use sandcastle_testkit::cases;
use sandcastle_testkit::cluster::{SharedTest, TestEnv, run_shared, stderr};
use sandcastle_testkit::repo;
use serde_json::{Value, json};
use tasks::*;
use templates::*;

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        [$((stringify!($name), (|env| Box::pin($name(env))) as SharedTest)),*]
    };
}

fn main() -> ExitCode {
    run_shared(
        false,
        tests![
            crds_are_established_and_reapply_cleanly,
            names_short_names_and_category_resolve,
            examples_are_accepted_with_defaults,
            invalid_manifests_are_rejected_with_their_message,
            kubectl_apply_shows_the_rejection_message,
            printer_columns_show_status,
            explain_shows_the_field_docs,
            status_is_a_subresource_with_conditions_merged_by_type,
            status_size_caps_are_enforced,
            operator_binary_runs_the_examples,
            builds_record_ids_early_and_rebuild_only_on_change,
            a_failed_step_is_reported_with_its_log,
            a_build_past_its_timeout_fails,
            existing_templates_are_adopted_or_reported_missing,
            missing_credentials_are_retried_once_the_secret_exists,
            deletion_follows_the_policy_and_waits_for_users,
            a_restart_mid_build_follows_the_same_build,
            a_template_deleted_behind_the_operators_back_is_rebuilt,
            builds_wait_for_a_slot_and_for_their_config_map,
            a_command_task_reports_its_files_and_frees_its_sandbox,
            waiting_on_a_task_that_is_gone_fails_at_once,
            a_task_waits_for_its_secret_and_never_shows_the_value,
            deadlines_and_deletion_kill_the_sandbox,
            a_waiting_task_fails_at_its_deadline,
            claude_code_runs_for_real_against_the_scripted_model,
            a_restart_reattaches_and_a_lost_sandbox_is_retried,
            sandboxes_of_vanished_tasks_are_swept,
            the_sandbox_cap_queues_tasks_in_creation_order,
            a_refused_sandbox_fails_the_task_at_once,
            warm_pools_hand_out_sandboxes_and_keep_their_size,
            a_rebuild_rolls_the_warm_pool_while_tasks_claim,
            a_git_workspace_is_cloned_at_a_branch_a_tag_or_a_commit,
            the_agents_work_is_pushed_to_a_branch,
            git_failures_have_reasons_and_never_show_the_token,
            claude_code_edits_a_clone_and_its_work_is_pushed,
            artifacts_are_kept_with_their_hashes_and_without_secrets,
            the_standby_takes_over_a_running_task,
            a_leader_that_loses_its_lease_stops,
            templates_name_the_provider_the_operator_lacks,
            the_charts_rbac_is_enough_and_no_more,
            mcp_clients_run_code_and_tasks,
            an_mcp_server_leaves_no_sandbox_behind,
            claude_code_calls_a_tool_of_an_mcp_server_from_its_spec,
            the_mcp_servers_rbac_is_enough,
            the_mcp_inspector_drives_the_server,
        ],
    )
}

fn dynamic_api<K>(env: &TestEnv, ns: &str) -> Api<DynamicObject>
where
    K: kube::Resource<DynamicType = ()>,
{
    Api::namespaced_with(env.client.clone(), ns, &ApiResource::erase::<K>(&()))
}

async fn crds_are_established_and_reapply_cleanly(env: Arc<TestEnv>) {
    let out = env.kubectl_ok(&["apply", "-f", &repo().join("crds").display().to_string()]);
    assert_eq!(
        out.matches("unchanged").count(),
        2,
        "re-applying crds/ changed something: {out}"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for name in [
        "agenttasks.sandcastle.dev",
        "sandboxtemplates.sandcastle.dev",
    ] {
        let crd = crds.get(name).await.expect("the CRD exists");
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{name} lacks {wanted}=True: {conditions:?}"
            );
        }
    }
}

async fn names_short_names_and_category_resolve(env: Arc<TestEnv>) {
    let ns = env.namespace("names").await;
    env.apply(&ns, "examples");
    let by_category = env.kubectl_ok(&["get", "sandcastle", "-n", &ns, "-o", "name"]);
    for expected in [
        "agenttask.sandcastle.dev/hello-command",
        "sandboxtemplate.sandcastle.dev/python",
    ] {
        assert!(
            by_category.contains(expected),
            "`get sandcastle` lacks {expected}: {by_category}"
        );
    }
    assert!(
        env.kubectl_ok(&["get", "at", "-n", &ns, "-o", "name"])
            .contains("agenttask.sandcastle.dev/fizzbuzz")
    );
    assert!(
        env.kubectl_ok(&["get", "sbt", "-n", &ns, "-o", "name"])
            .contains("sandboxtemplate.sandcastle.dev/base")
    );
}

async fn examples_are_accepted_with_defaults(env: Arc<TestEnv>) {
    let ns = env.namespace("examples").await;
    let out = env.apply(&ns, "examples");
    let created = out.matches(" created").count();
    let expected: usize = cases::examples().iter().map(|(_, docs)| docs.len()).sum();
    assert_eq!(created, expected, "not every example was created: {out}");

    // The apiserver fills in the schema defaults, so the operator reads complete specs.
    let tasks: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    let task = tasks.get("fizzbuzz").await.expect("the example task");
    assert_eq!(task.spec.active_deadline_seconds, 1800);
    assert_eq!(task.spec.backoff_limit, 2);
    assert_eq!(task.spec.workspace.path, "/home/user/workspace");
    let command = tasks.get("hello-command").await.expect("the command task");
    assert_eq!(command.spec.outputs.max_files, 500);
    assert_eq!(
        command.spec.outputs.exclude,
        [".git/**", "node_modules/**", "__pycache__/**"]
    );
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let e2b = templates.get("node-e2b").await.expect("the e2b template");
    let provider = e2b
        .spec
        .provider
        .and_then(|p| p.e2b)
        .expect("an e2b provider");
    assert_eq!(provider.api_key_secret_ref.key, "E2B_API_KEY");
    let base = templates.get("base").await.expect("the base template");
    assert_eq!(
        base.spec.deletion_policy,
        sandcastle_api::DeletionPolicy::Delete
    );
    let build = templates
        .get("python")
        .await
        .expect("the python template")
        .spec
        .build
        .expect("a build");
    assert_eq!((build.cpu_count, build.memory_mb), (2, 2048));
}

async fn invalid_manifests_are_rejected_with_their_message(env: Arc<TestEnv>) {
    let ns = env.namespace("invalid").await;
    let cases = cases::invalid_cases();
    assert!(cases.len() >= 40, "the table lost cases");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if let Err(failure) = cases::rejection(&env.client, &ns, &format!("case-{i}"), case).await {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

async fn kubectl_apply_shows_the_rejection_message(env: Arc<TestEnv>) {
    let ns = env.namespace("kubectl-reject").await;
    let manifest = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("both-agents.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: sandcastle.dev/v1alpha1
kind: AgentTask
metadata: {name: both}
spec:
  templateRef: {name: base}
  prompt: hi
  agent: {claudeCode: {}, command: {command: [\"true\"]}}
",
    )
    .expect("writing the manifest");
    let out = env.kubectl(&["apply", "-n", &ns, "-f", &manifest.display().to_string()]);
    assert!(
        !out.status.success(),
        "kubectl accepted a task with two agents"
    );
    let message = stderr(&out);
    assert!(
        message.contains("spec.agent: Invalid value")
            && message.contains("set exactly one agent: claudeCode or command"),
        "kubectl printed: {message}"
    );
}

async fn write_status(api: &Api<DynamicObject>, name: &str, status: Value) {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .unwrap_or_else(|err| panic!("writing the status of {name}: {err}"));
}

fn ready_condition(status: &str, reason: &str) -> Value {
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": "",
        "lastTransitionTime": "2026-11-23T18:00:00Z",
    })
}

async fn printer_columns_show_status(env: Arc<TestEnv>) {
    let ns = env.namespace("columns").await;
    env.apply(&ns, "examples");
    let tasks = dynamic_api::<AgentTask>(&env, &ns);
    write_status(
        &tasks,
        "fizzbuzz",
        json!({
            "phase": "Succeeded",
            "sandboxId": "sbx-0123",
            "reason": "Completed",
            "progress": {"turns": 7},
            "usage": {"inputTokens": 10, "outputTokens": 20, "costUSD": "0.0123"},
        }),
    )
    .await;
    let table = env.kubectl_ok(&["get", "agenttasks", "-n", &ns]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "TEMPLATE", "TURNS", "COST", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .find(|line| line.starts_with("fizzbuzz "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["fizzbuzz", "Succeeded", "python", "7", "0.0123"],
        "{table}"
    );

    let wide = env.kubectl_ok(&["get", "agenttasks", "-n", &ns, "-o", "wide"]);
    let header = wide.lines().next().unwrap_or_default();
    assert!(
        header.contains("SANDBOX ID") && header.contains("REASON"),
        "{wide}"
    );
    let row = wide
        .lines()
        .find(|line| line.starts_with("fizzbuzz "))
        .unwrap_or_default();
    assert!(
        row.contains("sbx-0123") && row.contains("Completed"),
        "{wide}"
    );

    let templates = dynamic_api::<SandboxTemplate>(&env, &ns);
    write_status(
        &templates,
        "python",
        json!({
            "phase": "Ready",
            "templateId": "tpl-42",
            "buildId": "build-7",
            "conditions": [ready_condition("True", "BuildSucceeded")],
            "pool": {"ready": 37, "creating": 0, "outdated": 0, "claimed": 2},
        }),
    )
    .await;
    let table = env.kubectl_ok(&["get", "sandboxtemplates", "-n", &ns, "-o", "wide"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "PHASE",
            "TEMPLATE ID",
            "WARM",
            "AGE",
            "BUILD ID",
            "REASON"
        ],
        "{table}"
    );
    let row = table
        .lines()
        .find(|line| line.starts_with("python "))
        .unwrap_or_default();
    for value in ["Ready", "tpl-42", " 37 ", "build-7", "BuildSucceeded"] {
        assert!(row.contains(value), "{value} missing: {table}");
    }
}

async fn explain_shows_the_field_docs(env: Arc<TestEnv>) {
    let agent = env.kubectl_ok(&["explain", "agenttask.spec.agent"]);
    for text in [
        "The agent to run. Absent means `claudeCode` with its defaults.",
        "The Claude Code CLI in headless mode.",
        "A plain command; success is exit code 0.",
    ] {
        assert!(
            agent.contains(text),
            "explain agenttask.spec.agent lacks {text:?}:\n{agent}"
        );
    }
    let steps = env.kubectl_ok(&["explain", "sandboxtemplate.spec.build.steps"]);
    assert!(
        steps.contains("Files copied into the template from a ConfigMap's data."),
        "{steps}"
    );
    let root = env.kubectl_ok(&["explain", "agenttask"]);
    assert!(root.contains("A coding-agent run in a sandbox"), "{root}");
}

async fn status_is_a_subresource_with_conditions_merged_by_type(env: Arc<TestEnv>) {
    let ns = env.namespace("status").await;
    env.apply(&ns, "examples/agenttask-command.yaml");
    let tasks = dynamic_api::<AgentTask>(&env, &ns);

    // A status sent to the main resource is dropped, and status writes keep the generation.
    tasks
        .patch(
            "hello-command",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect("a merge patch of the main resource");
    let typed: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    let task = typed.get("hello-command").await.expect("the task");
    assert!(
        task.status.is_none(),
        "status changed through the main resource"
    );
    let generation = task.metadata.generation;

    // Two field managers each own one condition; server-side apply merges them by type.
    let apply = |manager: &'static str, condition: Value| {
        let tasks = tasks.clone();
        async move {
            let patch = json!({
                "apiVersion": "sandcastle.dev/v1alpha1",
                "kind": "AgentTask",
                "status": {"conditions": [condition]},
            });
            tasks
                .patch_status(
                    "hello-command",
                    &PatchParams::apply(manager).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .unwrap_or_else(|err| panic!("apply as {manager}: {err}"));
        }
    };
    apply("first", ready_condition("False", "Pending")).await;
    let mut reconciling = ready_condition("True", "Provisioning");
    reconciling["type"] = json!("Reconciling");
    apply("second", reconciling).await;

    let task = typed.get("hello-command").await.expect("the task");
    assert_eq!(
        task.metadata.generation, generation,
        "a status write bumped the generation"
    );
    let types: Vec<String> = task
        .status
        .expect("a status")
        .conditions
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert_eq!(types, ["Ready", "Reconciling"]);
}

async fn status_size_caps_are_enforced(env: Arc<TestEnv>) {
    let ns = env.namespace("caps").await;
    env.apply(&ns, "examples/agenttask-command.yaml");
    let tasks = dynamic_api::<AgentTask>(&env, &ns);
    let too_long = "x".repeat(4097);
    let too_many: Vec<Value> = (0..5001)
        .map(|i| json!({"path": format!("f{i}"), "size": 1}))
        .collect();
    for (what, status, field) in [
        (
            "result text",
            json!({"result": {"text": too_long}}),
            "status.result.text",
        ),
        ("file list", json!({"files": too_many}), "status.files"),
    ] {
        let err = tasks
            .patch_status(
                "hello-command",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .expect_err(&format!("an oversized {what} was stored"));
        assert!(err.to_string().contains(field), "{what}: {err}");
    }
}

async fn operator_binary_runs_the_examples(env: Arc<TestEnv>) {
    let ns = env.namespace("operator").await;
    env.apply(&ns, "examples");
    let operator = std::process::Command::new(env!("CARGO_BIN_EXE_sandcastle"))
        .args(["run", "--namespace", &ns, "--admin-address", "127.0.0.1:0"])
        .arg("--sandboxd-root")
        .arg(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sandboxd-{ns}")))
        .env("KUBECONFIG", env.kubeconfig_path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the operator starts");

    let tasks: Api<AgentTask> = Api::namespaced(env.client.clone(), &ns);
    let templates: Api<SandboxTemplate> = Api::namespaced(env.client.clone(), &ns);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (task, template) = loop {
        let task = tasks.get("hello-command").await.expect("the task");
        let template = templates.get("python").await.expect("the template");
        let done = task.status.as_ref().and_then(|s| s.phase)
            == Some(sandcastle_api::TaskPhase::Succeeded)
            && template.status.as_ref().and_then(|s| s.phase)
                == Some(sandcastle_api::TemplatePhase::Ready);
        if done {
            break (task, template);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the examples did not finish within 60 s: {:?} {:?}",
            task.status,
            template.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let status = task.status.expect("a status");
    let files: Vec<&str> = status.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(files, ["hello.txt"], "only what the command wrote");
    let result = status.result.expect("a result");
    assert_eq!(
        (result.exit_code, result.text.as_str()),
        (Some(0), "# Notes\n")
    );
    let summary: Vec<(String, String)> = status
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    assert!(
        summary.contains(&("Ready".into(), "True".into())),
        "{summary:?}"
    );
    assert!(
        summary.contains(&("Succeeded".into(), "True".into())),
        "{summary:?}"
    );
    let template = template.status.expect("a status");
    assert!(template.template_id.is_some() && template.build_id.is_some());

    // Its own status write must not make it write again.
    let version = tasks
        .get("hello-command")
        .await
        .expect("the task")
        .metadata
        .resource_version;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let later = tasks
        .get("hello-command")
        .await
        .expect("the task")
        .metadata
        .resource_version;
    assert_eq!(version, later, "the operator rewrote an observed status");

    let pid = operator.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let out = operator.wait_with_output().expect("the operator stops");
    assert!(
        out.status.success(),
        "the operator exited with {} on SIGTERM",
        out.status
    );
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(logs.lines().count() >= 2, "too few log lines: {logs}");
    for line in logs.lines() {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|err| panic!("log line is not JSON ({err}): {line}"));
    }
}
