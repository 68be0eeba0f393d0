//! Which files a run created or changed: the workspace listed before and after the agent
//! runs, compared, filtered by `outputs.exclude` and capped at `outputs.maxFiles`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use globset::{Glob, GlobSet, GlobSetBuilder};

/// A regular file as listed: its size and modification time (as the provider prints it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub size: i64,
    pub modified: Option<String>,
}

/// Files by path relative to the workspace.
pub type Listing = BTreeMap<String, Listed>;

/// A changed file for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedFile {
    pub path: String,
    pub size: i64,
}

/// The changed files, at most the cap, with the total count before capping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes {
    pub files: Vec<ChangedFile>,
    pub count: usize,
    pub truncated: bool,
}

/// The most bytes of one path in the status. Linux allows 4,096, and 500 such paths
/// would fill a status; a path this long is unreadable anyway, its start tells where it is.
pub const MAX_SHOWN_PATH_BYTES: usize = 1024;
/// Ends a path cut to [`MAX_SHOWN_PATH_BYTES`].
pub const CUT_MARKER: &str = "…";

/// `path` as the status lists it: at most [`MAX_SHOWN_PATH_BYTES`], cut on a character
/// boundary and ended with [`CUT_MARKER`] when longer.
pub fn shown_path(path: &str) -> String {
    cut_path(path, MAX_SHOWN_PATH_BYTES)
}

/// `path` cut to at most `limit` bytes as [`shown_path`] cuts it.
pub fn cut_path(path: &str, limit: usize) -> String {
    if path.len() <= limit {
        return path.to_string();
    }
    let mut end = limit - CUT_MARKER.len();
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARKER}", &path[..end])
}

#[derive(Debug, thiserror::Error)]
#[error("invalid exclude pattern {pattern:?}: {source}")]
pub struct PatternError {
    pattern: String,
    source: globset::Error,
}

/// The `outputs.exclude` globs. `dir/**` also excludes `dir` itself and, like gitignore,
/// a pattern without a slash matches at any depth. The last list compiled is kept: tasks
/// nearly always share one (the default), and compiling it cost more CPU than the rest
/// of a finished task's pass.
pub fn exclusions(patterns: &[String]) -> Result<Arc<GlobSet>, PatternError> {
    static LAST: Mutex<Option<(Vec<String>, Arc<GlobSet>)>> = Mutex::new(None);
    if let Some((last, set)) = &*LAST.lock().expect("exclusions cache")
        && last.as_slice() == patterns
    {
        return Ok(set.clone());
    }
    let set = Arc::new(compile(patterns)?);
    *LAST.lock().expect("exclusions cache") = Some((patterns.to_vec(), set.clone()));
    Ok(set)
}

fn compile(patterns: &[String]) -> Result<GlobSet, PatternError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let anchored = if pattern.contains('/') {
            pattern.clone()
        } else {
            format!("**/{pattern}")
        };
        for candidate in [anchored.clone(), format!("**/{anchored}")] {
            let glob = Glob::new(&candidate).map_err(|source| PatternError {
                pattern: pattern.clone(),
                source,
            })?;
            set.add(glob);
        }
    }
    set.build().map_err(|source| PatternError {
        pattern: patterns.join(", "),
        source,
    })
}

/// Files that are new or differ in size or modification time, in path order.
pub fn changes(before: &Listing, after: &Listing, exclude: &GlobSet, max_files: usize) -> Changes {
    let changed: Vec<ChangedFile> = after
        .iter()
        .filter(|(path, listed)| before.get(*path) != Some(listed))
        .filter(|(path, _)| !exclude.is_match(path.as_str()))
        .map(|(path, listed)| ChangedFile {
            path: path.clone(),
            size: listed.size,
        })
        .collect();
    let count = changed.len();
    Changes {
        truncated: count > max_files,
        files: changed.into_iter().take(max_files).collect(),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(entries: &[(&str, i64, &str)]) -> Listing {
        entries
            .iter()
            .map(|(path, size, modified)| {
                (
                    path.to_string(),
                    Listed {
                        size: *size,
                        modified: Some(modified.to_string()),
                    },
                )
            })
            .collect()
    }

    fn defaults() -> Arc<GlobSet> {
        exclusions(&[
            ".git/**".to_string(),
            "node_modules/**".to_string(),
            "__pycache__/**".to_string(),
        ])
        .unwrap()
    }

    #[test]
    fn new_and_modified_files_count_unchanged_ones_do_not() {
        let before = listing(&[("README.md", 10, "t1"), ("src/lib.rs", 5, "t1")]);
        let after = listing(&[
            ("README.md", 10, "t1"),
            ("src/lib.rs", 7, "t2"),
            ("src/new.rs", 3, "t2"),
        ]);
        let changes = changes(&before, &after, &defaults(), 500);
        let paths: Vec<&str> = changes.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["src/lib.rs", "src/new.rs"]);
        assert_eq!((changes.count, changes.truncated), (2, false));
    }

    #[test]
    fn excluded_directories_are_left_out_at_any_depth() {
        let after = listing(&[
            (".git/HEAD", 1, "t"),
            ("app/node_modules/x/index.js", 1, "t"),
            ("pkg/__pycache__/m.pyc", 1, "t"),
            ("app/main.py", 1, "t"),
        ]);
        let changes = changes(&Listing::new(), &after, &defaults(), 500);
        let paths: Vec<&str> = changes.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["app/main.py"]);
    }

    #[test]
    fn the_cap_keeps_the_count() {
        let after: Listing = (0..10)
            .map(|n| {
                (
                    format!("f{n:02}"),
                    Listed {
                        size: n,
                        modified: None,
                    },
                )
            })
            .collect();
        let changes = changes(&Listing::new(), &after, &defaults(), 3);
        assert_eq!(changes.files.len(), 3);
        assert_eq!((changes.count, changes.truncated), (10, true));
        assert_eq!(changes.files[0].path, "f00");
    }

    #[test]
    fn long_paths_are_cut_on_a_character_boundary() {
        assert_eq!(shown_path("a/b.txt"), "a/b.txt");
        let long = format!("{}/{}", "é".repeat(1000), "x".repeat(2000));
        let shown = shown_path(&long);
        assert!(shown.len() <= MAX_SHOWN_PATH_BYTES, "{}", shown.len());
        assert!(shown.len() > MAX_SHOWN_PATH_BYTES - 4);
        assert!(
            shown.ends_with(CUT_MARKER) && long.starts_with(shown.trim_end_matches(CUT_MARKER))
        );
    }

    #[test]
    fn each_list_gets_its_own_set_whatever_was_compiled_before() {
        let logs = vec!["*.log".to_string()];
        let temps = vec!["*.tmp".to_string()];
        for list in [&logs, &temps, &logs, &logs, &temps] {
            let set = exclusions(list).unwrap();
            let log_excluded = list == &logs;
            assert_eq!(set.is_match("out/x.log"), log_excluded, "{list:?}");
            assert_eq!(set.is_match("out/x.tmp"), !log_excluded, "{list:?}");
        }
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let error = exclusions(&["a[".to_string()]).unwrap_err();
        assert!(error.to_string().contains("a["));
    }
}
