//! Status computation, free of I/O: what the operator writes, given what it observed.

use sandcastle_api::AgentTaskStatus;

use crate::text::truncate;

/// The most bytes a task's status takes as the apiserver serves it. Each field has its
/// own cap, but they add up (a path can be 4,096 characters and the list 5,000 entries),
/// and a status the apiserver refuses would leave a finished task unrecorded forever.
pub const TASK_STATUS_BUDGET: usize = 60 * 1024;

/// What the status's messages and result text are cut to when files alone cannot bring
/// it under the budget.
const SQUEEZED_TEXT_CHARS: usize = 1024;

/// Brings `status` under [`TASK_STATUS_BUDGET`]: drops listed files from the end
/// (`filesTruncated` says so; `fileCount` keeps the total), then cuts the messages and
/// the result text.
pub fn fit_task_status(status: &mut AgentTaskStatus) {
    let mut over = served_size(status).saturating_sub(TASK_STATUS_BUDGET);
    while over > 0 {
        let Some(file) = status.files.pop() else {
            break;
        };
        status.files_truncated = true;
        // The entry and the comma before it.
        over = over.saturating_sub(served_size(&file) + 1);
    }
    if over == 0 {
        return;
    }
    let squeeze = |text: &mut String| *text = truncate(text, SQUEEZED_TEXT_CHARS);
    if let Some(message) = status.message.as_mut() {
        squeeze(message);
    }
    for condition in &mut status.conditions {
        squeeze(&mut condition.message);
    }
    if let Some(result) = status.result.as_mut()
        && result.text.chars().count() > SQUEEZED_TEXT_CHARS
    {
        let chars = result.text.chars().count();
        result.text = result
            .text
            .chars()
            .skip(chars - SQUEEZED_TEXT_CHARS)
            .collect();
        result.truncated = true;
    }
}

/// The length of `value`'s JSON as Go's encoder writes it, which escapes `<`, `>`, `&`,
/// U+2028 and U+2029 where serde_json does not.
fn served_size(value: &impl serde::Serialize) -> usize {
    let json = serde_json::to_string(value).expect("a status serializes");
    json.len()
        + json
            .chars()
            .map(|c| match c {
                '<' | '>' | '&' => 5,
                '\u{2028}' | '\u{2029}' => 3,
                _ => 0,
            })
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use sandcastle_api::conditions::condition;
    use sandcastle_api::{OutputFile, TaskResult};

    fn at(timestamp: &str) -> Time {
        Time(timestamp.parse().expect("a timestamp"))
    }

    #[test]
    fn a_status_over_budget_loses_files_from_the_end_first() {
        let mut status = AgentTaskStatus {
            files: (0..500)
                .map(|n| OutputFile {
                    path: format!("{n:03}/{}", "<".repeat(1000)),
                    size: n,
                })
                .collect(),
            file_count: Some(500),
            message: Some("the agent finished".into()),
            ..AgentTaskStatus::default()
        };
        fit_task_status(&mut status);
        assert!(served_size(&status) <= TASK_STATUS_BUDGET);
        assert!(
            served_size(&status) > TASK_STATUS_BUDGET - 6100,
            "dropped too many"
        );
        assert!(status.files_truncated && status.files[0].path.starts_with("000/"));
        assert_eq!(status.message.as_deref(), Some("the agent finished"));
    }

    #[test]
    fn long_texts_are_cut_when_files_are_not_enough() {
        let mut status = AgentTaskStatus {
            message: Some("\u{1}".repeat(4096)),
            result: Some(TaskResult {
                text: format!("{}end", "&".repeat(4093)),
                ..TaskResult::default()
            }),
            conditions: (0..4)
                .map(|n| {
                    condition(
                        &[],
                        &n.to_string(),
                        "True",
                        "R",
                        &"\u{1}".repeat(4096),
                        None,
                        &at("2026-11-23T10:00:00Z"),
                    )
                })
                .collect(),
            ..AgentTaskStatus::default()
        };
        fit_task_status(&mut status);
        assert!(served_size(&status) <= TASK_STATUS_BUDGET);
        let result = status.result.expect("result");
        assert!(result.truncated && result.text.ends_with("end"));
    }

    #[test]
    fn a_status_within_budget_is_left_alone() {
        let mut status = AgentTaskStatus {
            files: vec![OutputFile {
                path: "a".into(),
                size: 1,
            }],
            ..AgentTaskStatus::default()
        };
        let before = status.clone();
        fit_task_status(&mut status);
        assert_eq!(status, before);
    }
}
