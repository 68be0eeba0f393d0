//! Status computation, free of I/O: what the operator writes, given what it observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{AgentTaskStatus, CONDITION_READY, CONDITION_RECONCILING, TaskPhase};

/// The reason of the conditions written when the operator first sees an object.
pub const REASON_PENDING: &str = "Pending";

const PENDING_MESSAGE: &str = "accepted by the operator; work has not started yet";

/// A condition with `lastTransitionTime` kept from `previous` when the status value
/// did not change, as the API conventions require.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether the status already describes this generation, so there is nothing to write.
pub fn is_observed(observed_generation: Option<i64>, generation: Option<i64>) -> bool {
    generation.is_some() && observed_generation == generation
}

fn pending_conditions(
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    vec![
        condition(
            previous,
            CONDITION_READY,
            "Unknown",
            REASON_PENDING,
            PENDING_MESSAGE,
            generation,
            now,
        ),
        condition(
            previous,
            CONDITION_RECONCILING,
            "True",
            REASON_PENDING,
            PENDING_MESSAGE,
            generation,
            now,
        ),
    ]
}

/// The status of a task the operator has just seen: kstatus reads it as in progress,
/// never as the "no status yet, so current" of an empty status.
pub fn pending_task(
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> AgentTaskStatus {
    AgentTaskStatus {
        phase: Some(TaskPhase::Pending),
        conditions: pending_conditions(previous, generation, now),
        observed_generation: generation,
        ..AgentTaskStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(timestamp: &str) -> Time {
        Time(timestamp.parse().expect("a timestamp"))
    }

    #[test]
    fn transition_time_is_kept_while_the_status_value_holds() {
        let earlier = at("2026-11-23T10:00:00Z");
        let now = at("2026-11-23T11:00:00Z");
        let previous = vec![condition(
            &[],
            "Ready",
            "Unknown",
            "Pending",
            "",
            Some(1),
            &earlier,
        )];
        let same = condition(
            &previous,
            "Ready",
            "Unknown",
            "Other",
            "new message",
            Some(2),
            &now,
        );
        assert_eq!(same.last_transition_time, earlier);
        assert_eq!(
            (same.reason.as_str(), same.observed_generation),
            ("Other", Some(2))
        );
        let flipped = condition(&previous, "Ready", "True", "Built", "", Some(2), &now);
        assert_eq!(flipped.last_transition_time, now);
    }

    #[test]
    fn pending_status_reads_as_in_progress_for_kstatus() {
        let now = at("2026-11-23T10:00:00Z");
        let status = pending_task(&[], Some(3), &now);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.phase, Some(TaskPhase::Pending));
        let reconciling = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_RECONCILING)
            .expect("a Reconciling condition");
        assert_eq!(reconciling.status, "True");
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn only_an_unobserved_generation_needs_a_write() {
        assert!(is_observed(Some(2), Some(2)));
        assert!(!is_observed(Some(1), Some(2)));
        assert!(!is_observed(None, Some(1)));
        assert!(!is_observed(None, None));
    }
}
