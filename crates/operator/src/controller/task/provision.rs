//! The sandbox: created (or adopted) alongside the finalizer, and recorded.

use super::*;

/// Whether the last pass found the finalizer refused: its status says so.
pub(super) fn was_refused(task: &AgentTask) -> bool {
    previous(task).reason == TaskReason::FinalizerRefused
}

/// The finalizer could not be added. A refusal (RBAC, an admission policy) is the
/// cluster's setup, not the task's: the task waits with the apiserver's words until the
/// deadline, and no sandbox is made for it meanwhile. Anything else is retried.
pub(super) async fn write_finalizer_trouble(
    ctx: &Context,
    task: &AgentTask,
    error: Error,
) -> Result<Action, Error> {
    let Error::Kube(kube::Error::Api(status)) = &error else {
        return Err(error);
    };
    if !matches!(status.code, 400 | 403 | 422) {
        return Err(error);
    }
    let message = format!(
        "the apiserver refused the finalizer {FINALIZER}: {}",
        status.message
    );
    write_waiting(
        ctx,
        task,
        TaskReason::FinalizerRefused,
        &message,
        WAIT_INTERVAL * 3,
    )
    .await
}

pub(super) fn holds_sandbox(task: &AgentTask) -> bool {
    task.status
        .as_ref()
        .is_some_and(|status| status.sandbox_id.is_some())
}

/// Adds the finalizer and returns the task as written. The write holds only if the task
/// is still the version read, so no other finalizer is lost.
pub(super) async fn add_finalizer(
    ctx: &Context,
    api: &Api<AgentTask>,
    task: &AgentTask,
) -> Result<AgentTask, Error> {
    let mut finalizers = task.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": task.resource_version()},
    });
    let written = api
        .patch(
            &task.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map_err(|error| match error {
            kube::Error::Api(status) if status.is_conflict() => Error::Stale,
            error => Error::Kube(error),
        })?;
    remember_write(ctx, task, &written.resource_version().unwrap_or_default());
    Ok(written)
}

/// Creates the sandbox and starts the agent in it, or adopts the sandbox an earlier pass
/// created before it could record it: never two live sandboxes for one task.
pub(super) async fn provision(
    task: &AgentTask,
    ctx: &Context,
    slot: Slot<'_>,
    provider: &E2bClient,
    template: &sandcastle_api::SandboxTemplateStatus,
    inputs: Inputs,
    redactor: &Redactor,
) -> Result<Action, Error> {
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let query = ListQuery {
        metadata: BTreeMap::from([(TASK_UID.to_string(), uid.clone())]),
        ..ListQuery::default()
    };
    let existing = if never_asked_for_a_sandbox(ctx, task) {
        None
    } else {
        match provider.list_sandboxes(&query).await {
            Ok(found) => found.into_iter().next().map(|sandbox| sandbox.sandbox_id),
            Err(error) => {
                return write_provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL * 3)
                    .await;
            }
        }
    };
    // An adopted sandbox was created for the attempt after the recorded ones, by a pass
    // that could not record it.
    let attempts = previous(task).attempts.unwrap_or(0) + 1;
    let record = |sandbox_id: &str| {
        let sandbox_id = sandbox_id.to_string();
        move |status: &mut AgentTaskStatus| {
            status.sandbox_id = Some(sandbox_id);
            status.template_id = template.template_id.clone();
            status.build_id = template.build_id.clone();
            status.attempts = Some(attempts);
            if status.start_time.is_none() {
                status.start_time = Some(now());
            }
        }
    };
    if let Some(sandbox_id) = existing {
        let task = match finalized(ctx, task).await {
            Ok(task) => task,
            // The next pass adopts it again, with the slot this one took.
            Err(Error::Stale) => {
                slot.keep();
                return Err(Error::Stale);
            }
            Err(error) => {
                let _ = provider.kill_sandbox(&sandbox_id).await;
                return write_finalizer_trouble(ctx, task, error).await;
            }
        };
        slot.keep();
        // What the sandbox holds is unknown: the next pass looks before it starts anything.
        return write_provisioning(ctx, &task, &sandbox_id, record(&sandbox_id)).await;
    }
    // A refused finalizer must not cost a sandbox per pass: once refused, it goes first.
    let task = if was_refused(task) {
        match finalized(ctx, task).await {
            Ok(task) => task,
            Err(error) => {
                return write_finalizer_trouble(ctx, task, error).await;
            }
        }
    } else {
        std::borrow::Cow::Borrowed(task)
    };
    let task = task.as_ref();
    let spec = sandbox_spec(task, template, &ctx.instance, jiff::Timestamp::now());
    // Before the call: a create that fails may still have made the sandbox.
    ctx.memory.note_create(&uid);
    let asked = std::time::Instant::now();
    let (created, with_finalizer) = tokio::join!(
        async {
            // A warm sandbox of the template's pool, if it has one to give.
            if let Some(sandbox) =
                crate::controller::pool::claim(ctx, task, provider, template, spec.timeout).await
            {
                return Ok(sandbox);
            }
            let created = provider.create_sandbox(&spec).await;
            if created.is_ok() {
                ctx.metrics.sandbox_created(asked.elapsed());
            }
            created
        },
        finalized(ctx, task)
    );
    let task = match with_finalizer {
        Ok(task) => task,
        Err(error) => {
            // Without its finalizer the task could go with its sandbox left behind. A
            // create that failed but made one anyway is the orphan sweep's.
            if let Ok(sandbox) = &created {
                let _ = provider.kill_sandbox(&sandbox.sandbox_id).await;
            }
            return write_finalizer_trouble(ctx, task, error).await;
        }
    };
    let task = task.as_ref();
    let sandbox = match created {
        Ok(sandbox) => sandbox,
        Err(error) if matches!(error, ProviderError::RateLimited { .. }) => {
            let again = error.retry_after().unwrap_or(WAIT_INTERVAL * 3);
            return write_waiting(
                ctx,
                task,
                TaskReason::ProviderBusy,
                &error.to_string(),
                again,
            )
            .await;
        }
        // Waiting cannot fix a refused key or request: fail now instead of at the
        // deadline. (A template missing on the provider is rebuilt by the template
        // controller, so NotFound keeps waiting below.)
        Err(
            error @ (ProviderError::Unauthorized { .. }
            | ProviderError::Forbidden { .. }
            | ProviderError::InvalidRequest { .. }),
        ) => {
            let message = format!("the provider refused to create the sandbox: {error}");
            return write_failure(ctx, task, TaskReason::ProviderRejected, &message, |_| {}).await;
        }
        Err(error) => {
            return write_provider_trouble(ctx, task, &error.to_string(), WAIT_INTERVAL * 3).await;
        }
    };
    slot.keep();
    let sandbox_id = sandbox.sandbox_id.clone();
    // A clone can take long: the sandbox is recorded first, so the task shows it while
    // the next pass clones.
    if task.spec.workspace.git.is_some() {
        return write_provisioning(ctx, task, &sandbox_id, record(&sandbox_id)).await;
    }
    // A new sandbox holds nothing yet, so the agent starts in this pass and one status
    // write records both. Should the start not go through, the sandbox is recorded and
    // the next pass looks into it the careful way, as for one it adopted.
    match launch(task, ctx, &provider.envd(&sandbox), inputs, redactor).await {
        Ok((process, _)) => {
            let note = format!("the agent started in sandbox {sandbox_id}");
            write_running(ctx, task, process, record(&sandbox_id), note).await
        }
        Err(Launch::Invalid { reason, message }) => {
            let action = write_failure(ctx, task, reason, &message, record(&sandbox_id)).await?;
            let _ = provider.kill_sandbox(&sandbox_id).await;
            Ok(action)
        }
        Err(Launch::Provider(_) | Launch::Kube(_)) => {
            write_provisioning(ctx, task, &sandbox_id, record(&sandbox_id)).await
        }
    }
}

/// The task with the finalizer on, written now if it was not.
pub(super) async fn finalized<'a>(
    ctx: &Context,
    task: &'a AgentTask,
) -> Result<std::borrow::Cow<'a, AgentTask>, Error> {
    if task.finalizers().iter().any(|name| name == FINALIZER) {
        return Ok(std::borrow::Cow::Borrowed(task));
    }
    let api: Api<AgentTask> =
        Api::namespaced(ctx.client.clone(), &task.namespace().unwrap_or_default());
    Ok(std::borrow::Cow::Owned(
        add_finalizer(ctx, &api, task).await?,
    ))
}

/// Records a sandbox the agent has not been started in (as far as this pass knows) and
/// looks into it again shortly.
pub(super) async fn write_provisioning(
    ctx: &Context,
    task: &AgentTask,
    sandbox_id: &str,
    record: impl FnOnce(&mut AgentTaskStatus),
) -> Result<Action, Error> {
    let message = format!("sandbox {sandbox_id} is being prepared");
    let status = staged(
        task,
        TaskPhase::Provisioning,
        TaskReason::Provisioning,
        &message,
        record,
    );
    write_status(ctx, task, status).await?;
    publish_event(
        ctx,
        task,
        EventType::Normal,
        TaskReason::SandboxCreated,
        message,
    )
    .await;
    Ok(Action::requeue(Duration::from_millis(100)))
}

/// The sandbox a task asks for: from its template, living until the task's deadline plus
/// a grace (the provider's own dead-man switch, should the operator be gone), and
/// stamped with the task and this operator instance so the orphan sweep can find it.
pub(crate) fn sandbox_spec(
    task: &AgentTask,
    template: &sandcastle_api::SandboxTemplateStatus,
    instance: &str,
    now: jiff::Timestamp,
) -> SandboxSpec {
    let remaining = deadline(task)
        .map(|deadline| (deadline - now).get_seconds().max(1) as u64)
        .unwrap_or(task.spec.active_deadline_seconds as u64);
    let mut spec = SandboxSpec::new(
        template.template_id.clone().unwrap_or_default(),
        Duration::from_secs(remaining) + SANDBOX_GRACE,
    );
    spec.metadata = BTreeMap::from([
        (
            TASK_UID.to_string(),
            task.metadata.uid.clone().unwrap_or_default(),
        ),
        (
            TASK_NAMESPACE.to_string(),
            task.namespace().unwrap_or_default(),
        ),
        (TASK_NAME.to_string(), task.name_any()),
        (OPERATOR.to_string(), instance.to_string()),
    ]);
    if let Some(network) = &task.spec.network {
        spec.allow_internet_access = network.allow_internet_access;
        spec.allow_out = network.allow_out.clone();
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_lives_until_the_deadline_and_names_its_task() {
        let task: AgentTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "t", "namespace": "team", "uid": "u-1",
                         "creationTimestamp": "2026-12-04T10:00:00Z"},
            "spec": {"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}},
                     "activeDeadlineSeconds": 600},
        }))
        .expect("a task");
        let template: sandcastle_api::SandboxTemplateStatus =
            serde_json::from_value(serde_json::json!({"templateId": "tpl-1"})).expect("a status");
        let now: jiff::Timestamp = "2026-12-04T10:01:40Z".parse().expect("a time");
        let spec = sandbox_spec(&task, &template, "sandcastle", now);
        assert_eq!(spec.template, "tpl-1");
        assert_eq!(spec.timeout, Duration::from_secs(500) + SANDBOX_GRACE);
        let keys: Vec<(&str, &str)> = spec
            .metadata
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (OPERATOR, "sandcastle"),
                (TASK_NAME, "t"),
                (TASK_NAMESPACE, "team"),
                (TASK_UID, "u-1")
            ]
        );
        // Past the deadline it still asks for a moment, never for nothing.
        let late: jiff::Timestamp = "2026-12-04T11:00:00Z".parse().expect("a time");
        assert_eq!(
            sandbox_spec(&task, &template, "sandcastle", late).timeout,
            Duration::from_secs(1) + SANDBOX_GRACE
        );
        assert_eq!(spec.allow_internet_access, None);
        assert!(spec.allow_out.is_empty());
    }

    #[test]
    fn a_task_network_reaches_the_sandbox_request() {
        let task: AgentTask = serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "t", "namespace": "team"},
            "spec": {"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}},
                     "network": {"allowInternetAccess": false, "allowOut": ["10.0.0.7/32"]}},
        }))
        .expect("a task");
        let template = sandcastle_api::SandboxTemplateStatus::default();
        let spec = sandbox_spec(&task, &template, "sandcastle", jiff::Timestamp::now());
        assert_eq!(spec.allow_internet_access, Some(false));
        assert_eq!(spec.allow_out, ["10.0.0.7/32"]);
    }
}
