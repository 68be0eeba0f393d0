//! Artifacts: files of the workspace a task keeps after its sandbox is gone, chosen by
//! glob. Which files match, which of them fit the ConfigMap that keeps them, under which
//! keys, and what of their contents may be kept. Nothing here does I/O.

use std::collections::{BTreeSet, HashSet};

use globset::{Glob, GlobMatcher};
use sandcastle_api::ArtifactPattern;

use super::files::Listing;
use super::redact::Redactor;

/// The most artifacts a task records.
pub const MAX_ARTIFACTS: usize = 100;
/// The longest artifact path and ConfigMap key the status shows, in bytes: with the
/// hash, a hundred artifacts stay well within the status's 64 KiB.
pub const MAX_ARTIFACT_NAME_BYTES: usize = 200;
/// The most bytes of artifacts one ConfigMap keeps: a ConfigMap holds at most 1 MiB, and
/// the rest leaves room for its keys and metadata.
pub const KEPT_LIMIT: u64 = 768 * 1024;

/// A pattern that is not a glob.
#[derive(Debug, thiserror::Error)]
#[error("invalid outputs.artifacts pattern {pattern:?}: {source}")]
pub struct PatternError {
    pattern: String,
    source: globset::Error,
}

/// A pattern that must match and did not.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("outputs.artifacts pattern {0:?} matched no file of the workspace")]
pub struct Missing(pub String);

/// The patterns, compiled: `*` stays within a directory, `**` crosses them, and a
/// pattern is matched against the whole path relative to the workspace.
pub fn compile(patterns: &[ArtifactPattern]) -> Result<Vec<GlobMatcher>, PatternError> {
    patterns
        .iter()
        .map(|pattern| {
            globset::GlobBuilder::new(&pattern.path)
                .literal_separator(true)
                .build()
                .map(|glob: Glob| glob.compile_matcher())
                .map_err(|source| PatternError {
                    pattern: pattern.path.clone(),
                    source,
                })
        })
        .collect()
}

/// The files the patterns match, in path order, at most [`MAX_ARTIFACTS`], and the
/// first pattern not marked optional that matched nothing.
pub fn select(
    listing: &Listing,
    patterns: &[ArtifactPattern],
    matchers: &[GlobMatcher],
) -> (Vec<(String, u64)>, Option<Missing>) {
    let mut missing = None;
    let mut chosen = BTreeSet::new();
    for (pattern, matcher) in patterns.iter().zip(matchers) {
        let mut matched = false;
        for path in listing.keys() {
            if matcher.is_match(path) {
                matched = true;
                chosen.insert(path.clone());
            }
        }
        if !matched && !pattern.optional && missing.is_none() {
            missing = Some(Missing(pattern.path.clone()));
        }
    }
    let chosen = chosen
        .into_iter()
        .take(MAX_ARTIFACTS)
        .map(|path| {
            let size = listing
                .get(&path)
                .map_or(0, |listed| listed.size.max(0) as u64);
            (path, size)
        })
        .collect();
    (chosen, missing)
}

/// Which of the selected files fit the ConfigMap, in path order: each that fits what is
/// left of [`KEPT_LIMIT`] is kept, so a large file does not crowd out the small ones
/// after it.
pub fn fitting(selected: &[(String, u64)]) -> Vec<bool> {
    let mut left = KEPT_LIMIT;
    selected
        .iter()
        .map(|(_, size)| {
            let fits = *size <= left;
            if fits {
                left -= size;
            }
            fits
        })
        .collect()
}

/// A ConfigMap key for `path`, unique among `used`: characters a key may not hold
/// (`[-._a-zA-Z0-9]` only) become `_`, and a clash or an over-long name gets a suffix.
pub fn key_for(path: &str, used: &mut HashSet<String>) -> String {
    let mut base: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // "." and ".." are not keys; nor is anything over 253 characters.
    if base.chars().all(|c| c == '.') {
        base = format!("_{base}");
    }
    base.truncate(MAX_ARTIFACT_NAME_BYTES - 8);
    let mut key = base.clone();
    let mut n = 1;
    while !used.insert(key.clone()) {
        n += 1;
        key = format!("{base}.{n}");
    }
    key
}

/// What of a file's contents may be kept: text with every Secret value redacted, binary
/// content as it is, or nothing when binary content holds a Secret value (it cannot be
/// redacted without breaking the file).
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    AsIs(Vec<u8>),
    Redacted(Vec<u8>),
    Withheld,
}

pub fn keep(bytes: Vec<u8>, redactor: &Redactor) -> Kept {
    match String::from_utf8(bytes) {
        Ok(text) => {
            let redacted = redactor.redact(&text);
            if redacted == text {
                Kept::AsIs(text.into_bytes())
            } else {
                Kept::Redacted(redacted.into_bytes())
            }
        }
        Err(error) => {
            let bytes = error.into_bytes();
            if redactor.occurs_in(&bytes) {
                Kept::Withheld
            } else {
                Kept::AsIs(bytes)
            }
        }
    }
}

/// The hashes `sha256sum` printed for the files it was given, in their order; `None`
/// when the output does not hold one per file.
pub fn parse_sums(output: &str, files: usize) -> Option<Vec<String>> {
    let sums: Vec<String> = output
        .lines()
        .map(|line| line.trim_start_matches('\\'))
        .filter_map(|line| line.get(..64))
        .filter(|sum| sum.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .collect();
    (sums.len() == files).then_some(sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::files::Listed;

    fn listing(paths: &[(&str, i64)]) -> Listing {
        paths
            .iter()
            .map(|(path, size)| {
                (
                    path.to_string(),
                    Listed {
                        size: *size,
                        modified: None,
                    },
                )
            })
            .collect()
    }

    fn patterns(list: &[(&str, bool)]) -> Vec<ArtifactPattern> {
        list.iter()
            .map(|(path, optional)| ArtifactPattern {
                path: path.to_string(),
                optional: *optional,
            })
            .collect()
    }

    #[test]
    fn globs_choose_files_and_a_required_one_must_match() {
        let files = listing(&[
            ("dist/app.tar.gz", 10),
            ("dist/sub/x.tar.gz", 20),
            ("report.json", 3),
            ("src/main.rs", 5),
        ]);
        let wanted = patterns(&[
            ("dist/*.tar.gz", false),
            ("*.json", false),
            ("logs/**", true),
        ]);
        let matchers = compile(&wanted).expect("globs");
        assert_eq!(
            select(&files, &wanted, &matchers),
            (
                vec![("dist/app.tar.gz".into(), 10), ("report.json".into(), 3)],
                None
            )
        );
        let wanted = patterns(&[("dist/**/*.tar.gz", false), ("missing/*", false)]);
        let matchers = compile(&wanted).expect("globs");
        assert_eq!(
            select(&files, &wanted, &matchers),
            (
                vec![
                    ("dist/app.tar.gz".into(), 10),
                    ("dist/sub/x.tar.gz".into(), 20)
                ],
                Some(Missing("missing/*".into()))
            )
        );
        assert!(compile(&patterns(&[("a/[", false)])).is_err());
    }

    #[test]
    fn what_fits_is_kept_in_path_order() {
        let selected = vec![
            ("a".to_string(), 100),
            ("b".to_string(), KEPT_LIMIT),
            ("c".to_string(), KEPT_LIMIT - 100),
            ("d".to_string(), 1),
        ];
        assert_eq!(fitting(&selected), [true, false, true, false]);
    }

    #[test]
    fn keys_are_valid_and_unique() {
        let mut used = HashSet::new();
        assert_eq!(
            key_for("dist/app v1.tar.gz", &mut used),
            "dist_app_v1.tar.gz"
        );
        assert_eq!(
            key_for("dist_app v1.tar.gz", &mut used),
            "dist_app_v1.tar.gz.2"
        );
        assert_eq!(key_for("..", &mut used), "_..");
        assert!(key_for(&"x".repeat(300), &mut used).len() <= MAX_ARTIFACT_NAME_BYTES);
    }

    #[test]
    fn secret_values_are_redacted_from_text_and_withhold_binary() {
        let redactor = Redactor::new(vec!["hunter2".to_string()]);
        assert_eq!(
            keep(b"plain".to_vec(), &redactor),
            Kept::AsIs(b"plain".to_vec())
        );
        assert_eq!(
            keep(b"pw=hunter2".to_vec(), &redactor),
            Kept::Redacted(b"pw=[redacted]".to_vec())
        );
        assert_eq!(keep(b"\xff\x00hunter2".to_vec(), &redactor), Kept::Withheld);
        assert_eq!(
            keep(b"\xff\x00clean".to_vec(), &redactor),
            Kept::AsIs(b"\xff\x00clean".to_vec())
        );
    }

    #[test]
    fn sums_are_read_in_order() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        assert_eq!(
            parse_sums(&format!("{a}  x\n\\{b}  y\\nz\n"), 2),
            Some(vec![a.clone(), b.to_ascii_lowercase()])
        );
        assert_eq!(parse_sums(&format!("{a}  x\n"), 2), None);
    }
}
