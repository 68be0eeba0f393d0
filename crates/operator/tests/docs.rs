//! The documentation against the code: the troubleshooting guide lists exactly the
//! reasons the operator writes, and every relative link of the docs and the README leads
//! to a file and heading that exist.

use std::collections::BTreeSet;

use sandcastle_api::{PoolReason, TaskReason, TemplateReason};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    sandcastle_testkit::repo()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// The Markdown files under `docs/`, and the README.
fn markdown_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ is readable")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    files.push(root().join("README.md"));
    files.sort();
    files
}

/// The lines outside fenced code blocks.
fn prose(markdown: &str) -> Vec<&str> {
    let mut fenced = false;
    markdown
        .lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// The names in the first cell of table rows that hold a single `CamelCase` word: the
/// reasons and events the guide documents.
fn documented_reasons(guide: &str) -> BTreeSet<String> {
    prose(guide)
        .into_iter()
        .filter_map(|line| {
            let cell = line.strip_prefix("| `")?;
            let name = &cell[..cell.find("` |")?];
            name.chars()
                .all(|c| c.is_ascii_alphanumeric())
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn the_troubleshooting_guide_documents_every_reason_the_operator_writes() {
    let guide = read(&root().join("docs/troubleshooting.md"));
    let documented = documented_reasons(&guide);
    let written: BTreeSet<String> = TaskReason::ALL
        .iter()
        .map(|reason| reason.as_str())
        .chain(TemplateReason::ALL.iter().map(|reason| reason.as_str()))
        .chain(PoolReason::ALL.iter().map(|reason| reason.as_str()))
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = written.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md has no table row for {missing:?}"
    );
    let unknown: Vec<&String> = documented.difference(&written).collect();
    assert!(
        unknown.is_empty(),
        "docs/troubleshooting.md documents reasons the operator never writes: {unknown:?}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    prose(markdown)
        .into_iter()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect()
}

/// The targets of `[text](target)` links outside code blocks.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose(markdown) {
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            rest = &rest[start + 2..];
            let Some(end) = rest.find(')') else { break };
            targets.push(rest[..end].to_string());
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn relative_links_lead_to_files_and_headings_that_exist() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        for target in link_targets(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a parent directory").join(path)
            };
            checked += 1;
            if !linked.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if let Some(fragment) = fragment
                && !anchors(&read(&linked)).contains(fragment)
            {
                broken.push(format!("{}: {target} (no such heading)", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 20, "only {checked} links were found");
}
