//! The cap on running tasks: who gets a sandbox slot, in creation order.

use super::*;

/// The caps a task must fit under.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    pub(crate) running: usize,
    pub(crate) per_namespace: Option<usize>,
}

/// Why a task must wait for a sandbox slot.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error(
        "waiting for a sandbox slot: {running} running, {ahead} queued ahead, at most {cap} at once"
    )]
    Cap {
        running: usize,
        ahead: usize,
        cap: usize,
    },
    #[error(
        "waiting for a sandbox slot in this namespace: {running} running, {ahead} queued ahead, at most {cap} at once"
    )]
    NamespaceCap {
        running: usize,
        ahead: usize,
        cap: usize,
    },
}

/// Gives the task a sandbox slot, or says why it must wait. Counted from the cache: a
/// pass must not cost a LIST of every task.
pub(super) fn admit<'a>(
    ctx: &'a Context,
    task: &AgentTask,
    cached: &[Arc<DeserializeGuard<AgentTask>>],
) -> Result<Slot<'a>, Refusal> {
    let others: Vec<&AgentTask> = cached
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .collect();
    let caps = Caps {
        running: ctx.max_running_tasks,
        per_namespace: ctx.max_running_tasks_per_namespace,
    };
    let uid = task.metadata.uid.clone().unwrap_or_default();
    let mut refusal = None;
    let slot = ctx.memory.admit_if(&uid, |holds_slot| {
        refusal = admission(task, &others, holds_slot, caps).err();
        refusal.is_none()
    });
    slot.ok_or_else(|| refusal.expect("a refused slot has its refusal"))
}

/// Whether `task` may take a sandbox slot now, and if not, why. Tasks with a sandbox, or
/// with a slot from this process (`holds_slot`) whose sandbox the cache does not show
/// yet, count against the caps; older tasks that could start go first.
pub(crate) fn admission(
    task: &AgentTask,
    others: &[&AgentTask],
    holds_slot: &dyn Fn(&str) -> bool,
    caps: Caps,
) -> Result<(), Refusal> {
    let all: Vec<&AgentTask> = others
        .iter()
        .copied()
        .filter(|other| other.metadata.uid != task.metadata.uid && !is_terminal(phase(other)))
        .collect();
    let key = |other: &AgentTask| {
        (
            other
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0),
            other.metadata.name.clone(),
        )
    };
    let own_key = key(task);
    let holding = |other: &&&AgentTask| {
        let recorded = other
            .status
            .as_ref()
            .is_some_and(|status| status.sandbox_id.is_some());
        recorded || other.metadata.uid.as_deref().is_some_and(holds_slot)
    };
    // Every older task that could start now is ahead, whether or not it has been looked at
    // yet; those waiting for their template or a Secret are not, so they hold nobody up.
    let queued_ahead = |other: &&&AgentTask| {
        let waiting_on_input = other.status.as_ref().is_some_and(|status| {
            matches!(
                status
                    .reason
                    .as_deref()
                    .and_then(|reason| reason.parse().ok()),
                Some(
                    TaskReason::MissingSecret
                        | TaskReason::TemplateNotReady
                        | TaskReason::ProviderUnavailable
                )
            )
        });
        !holding(other)
            && !waiting_on_input
            && other.metadata.deletion_timestamp.is_none()
            && key(other) < own_key
    };
    let running = all.iter().filter(holding).count();
    let ahead = all.iter().filter(queued_ahead).count();
    if running + ahead >= caps.running {
        return Err(Refusal::Cap {
            running,
            ahead,
            cap: caps.running,
        });
    }
    if let Some(cap) = caps.per_namespace {
        let here = |other: &&&AgentTask| other.metadata.namespace == task.metadata.namespace;
        let running = all.iter().filter(holding).filter(here).count();
        let ahead = all.iter().filter(queued_ahead).filter(here).count();
        if running + ahead >= cap {
            return Err(Refusal::NamespaceCap {
                running,
                ahead,
                cap,
            });
        }
    }
    Ok(())
}

/// Whether no sandbox can exist for the task, so there is none to adopt and the
/// provider need not be asked: it was created after this process started (a whole second
/// after, as creation times are in seconds) and this process never asked for one.
pub(super) fn never_asked_for_a_sandbox(ctx: &Context, task: &AgentTask) -> bool {
    let created_since_start = task
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|created| created.0 >= ctx.started + jiff::SignedDuration::from_secs(1));
    let uid = task.metadata.uid.as_deref().unwrap_or_default();
    created_since_start && !ctx.memory.asked_for_a_sandbox(uid)
}

/// Forgets what this process noted about a task that ended.
pub(super) fn forget(ctx: &Context, task: &AgentTask) {
    if let Some(uid) = &task.metadata.uid {
        ctx.memory.forget(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task created at second `created`, in namespace `ns`, standing as `state` says:
    /// "new", "sandbox" (holds one), "done", "waiting" (on its template), "deleting".
    fn task(name: &str, ns: &str, created: u32, state: &str) -> AgentTask {
        let status = match state {
            "sandbox" => serde_json::json!({"phase": "Running", "sandboxId": format!("sb-{name}")}),
            "done" => serde_json::json!({"phase": "Succeeded", "sandboxId": "sb-old"}),
            "waiting" => serde_json::json!({"phase": "Pending", "reason": "TemplateNotReady"}),
            _ => serde_json::json!({}),
        };
        let mut metadata = serde_json::json!({
            "name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "creationTimestamp": format!("2026-12-04T10:00:{created:02}Z"),
        });
        if state == "deleting" {
            metadata["deletionTimestamp"] = "2026-12-04T11:00:00Z".into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sandcastle.dev/v1alpha1", "kind": "AgentTask",
            "metadata": metadata,
            "spec": {"templateRef": {"name": "base"}, "agent": {"command": {"command": ["true"]}}},
            "status": status,
        }))
        .expect("a task")
    }

    const TWO: Caps = Caps {
        running: 2,
        per_namespace: None,
    };
    const ONE_PER_NAMESPACE: Caps = Caps {
        running: 5,
        per_namespace: Some(1),
    };

    /// A case's name, the other tasks, the UIDs holding a slot in this process, the caps,
    /// and the decision.
    type Case = (
        &'static str,
        Vec<AgentTask>,
        &'static [&'static str],
        Caps,
        Result<(), &'static str>,
    );

    #[test]
    fn admission_decisions() {
        let me = task("me", "a", 10, "new");
        let cases: Vec<Case> = vec![
            (
                "room under the cap",
                vec![task("x", "a", 1, "sandbox")],
                &[],
                TWO,
                Ok(()),
            ),
            (
                "full with recorded sandboxes",
                vec![task("x", "a", 1, "sandbox"), task("y", "b", 2, "sandbox")],
                &[],
                TWO,
                Err("waiting for a sandbox slot: 2 running, 0 queued ahead, at most 2 at once"),
            ),
            (
                "a slot given here counts before the cache shows its sandbox",
                vec![task("x", "a", 1, "sandbox"), task("y", "a", 20, "new")],
                &["uid-y"],
                TWO,
                Err("waiting for a sandbox slot: 2 running, 0 queued ahead, at most 2 at once"),
            ),
            (
                "an older task that could start goes first",
                vec![task("x", "a", 1, "sandbox"), task("older", "a", 5, "new")],
                &[],
                TWO,
                Err("waiting for a sandbox slot: 1 running, 1 queued ahead, at most 2 at once"),
            ),
            (
                "a younger task does not",
                vec![
                    task("x", "a", 1, "sandbox"),
                    task("younger", "a", 30, "new"),
                ],
                &[],
                TWO,
                Ok(()),
            ),
            (
                "an older task waiting on its template holds nobody up",
                vec![
                    task("x", "a", 1, "sandbox"),
                    task("older", "a", 5, "waiting"),
                ],
                &[],
                TWO,
                Ok(()),
            ),
            (
                "an older task being deleted holds nobody up",
                vec![
                    task("x", "a", 1, "sandbox"),
                    task("older", "a", 5, "deleting"),
                ],
                &[],
                TWO,
                Ok(()),
            ),
            (
                "finished tasks hold no slot",
                vec![task("x", "a", 1, "done"), task("y", "a", 2, "done")],
                &["uid-x"],
                TWO,
                Ok(()),
            ),
            (
                "the task itself is not counted",
                vec![task("me", "a", 10, "sandbox"), task("x", "a", 1, "sandbox")],
                &["uid-me"],
                TWO,
                Ok(()),
            ),
            (
                "the namespace cap counts only the namespace",
                vec![task("x", "a", 1, "sandbox"), task("y", "b", 2, "sandbox")],
                &[],
                ONE_PER_NAMESPACE,
                Err(
                    "waiting for a sandbox slot in this namespace: 1 running, 0 queued ahead, at most 1 at once",
                ),
            ),
            (
                "other namespaces leave room under the namespace cap",
                vec![task("y", "b", 2, "sandbox"), task("z", "b", 3, "sandbox")],
                &[],
                ONE_PER_NAMESPACE,
                Ok(()),
            ),
        ];
        for (name, others, slots_here, caps, admitted) in cases {
            let others: Vec<&AgentTask> = others.iter().collect();
            let holds = |uid: &str| slots_here.contains(&uid);
            let got = admission(&me, &others, &holds, caps).map_err(|refusal| refusal.to_string());
            assert_eq!(got, admitted.map_err(str::to_string), "{name}");
        }
    }
}
