//! Status computation, free of I/O: what the operator writes, given what it observed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

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
}
