//! Conditions as the API conventions want them, and the `Ready`/`Reconciling`/`Stalled`
//! triplet both resources carry, built in one place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED};

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

/// Where an object stands, as kstatus readers (Flux, Helm's `--wait`, Argo CD) read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    pub ready: bool,
    pub reconciling: bool,
    pub stalled: bool,
}

/// `Ready`, `Reconciling` and `Stalled`, all with the same reason and message.
pub fn triplet(
    previous: &[Condition],
    standing: Standing,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    [
        (CONDITION_READY, standing.ready),
        (CONDITION_RECONCILING, standing.reconciling),
        (CONDITION_STALLED, standing.stalled),
    ]
    .into_iter()
    .map(|(type_, value)| {
        let value = if value { "True" } else { "False" };
        condition(previous, type_, value, reason, message, generation, now)
    })
    .collect()
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
    fn the_triplet_says_each_standing_with_one_reason() {
        let now = at("2026-11-23T11:00:00Z");
        let standing = Standing {
            ready: false,
            reconciling: true,
            stalled: false,
        };
        let conditions = triplet(&[], standing, "Building", "step 2", Some(3), &now);
        let read: Vec<(&str, &str, &str)> = conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            read,
            [
                ("Ready", "False", "Building"),
                ("Reconciling", "True", "Building"),
                ("Stalled", "False", "Building")
            ]
        );
        assert!(
            conditions
                .iter()
                .all(|c| c.observed_generation == Some(3) && c.message == "step 2")
        );
    }
}
