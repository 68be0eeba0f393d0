//! The reasons the operator writes, read from its sources, so the troubleshooting guide
//! and the health-check fixtures follow the code instead of a copy of it: template
//! reasons are the variants of `template_build::Reason`, task reasons and event reasons
//! are the CamelCase string literals of the controllers.

use std::collections::BTreeSet;
use std::path::Path;

/// CamelCase literals in the controllers that are not reasons: condition statuses,
/// condition types (`Succeeded` is a reason as well, so it is not listed) and kinds.
pub const NOT_REASONS: &[&str] = &[
    "True",
    "False",
    "Ready",
    "Reconciling",
    "Stalled",
    "AgentTask",
    "ConfigMap",
];

fn source(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// The variants of `template_build::Reason`, in declaration order.
pub fn template_reasons() -> Vec<String> {
    let text = source("src/template_build.rs");
    let start = text
        .find("pub enum Reason {")
        .expect("src/template_build.rs declares `pub enum Reason`");
    let body = &text[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    let variants: Vec<String> = body
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("//") && !line.starts_with('#'))
        .map(|line| line.trim_end_matches(',').to_string())
        .collect();
    assert!(
        variants.iter().all(|name| is_camel_case(name)),
        "unexpected lines in `enum Reason`: {variants:?}"
    );
    variants
}

/// The condition and event reasons of the task controller.
pub fn task_reasons() -> BTreeSet<String> {
    reasons_in("src/controller/task.rs")
}

/// The event reasons of the template controller (its condition reasons are the enum's).
pub fn template_event_reasons() -> BTreeSet<String> {
    reasons_in("src/controller/template.rs")
}

/// Every reason the operator writes, on conditions or on events.
pub fn all_reasons() -> BTreeSet<String> {
    let mut all: BTreeSet<String> = template_reasons().into_iter().collect();
    all.extend(task_reasons());
    all.extend(template_event_reasons());
    all
}

fn reasons_in(relative: &str) -> BTreeSet<String> {
    let text = source(relative);
    // Unit tests at the end of the file use names of their own.
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        // Between the 1st and 2nd quote, the 3rd and 4th, …: the controllers hold no
        // escaped quotes or quote characters outside string literals.
        for (index, piece) in line.split('"').enumerate() {
            if index % 2 == 1 && is_camel_case(piece) && !NOT_REASONS.contains(&piece) {
                found.insert(piece.to_string());
            }
        }
    }
    assert!(!found.is_empty(), "no reasons found in {relative}");
    found
}

fn is_camel_case(word: &str) -> bool {
    word.len() > 1
        && word.starts_with(|c: char| c.is_ascii_uppercase())
        && word.chars().all(|c| c.is_ascii_alphanumeric())
        && word.chars().any(|c| c.is_ascii_lowercase())
}
