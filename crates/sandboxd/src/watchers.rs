//! envd's filesystem watchers (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`) on
//! inotify, through `notify`. Events are named relative to the watched directory and
//! kept until the client asks for them; a sandbox's watchers end with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use sandcastle_e2b::envd::{Code, ConnectError, FilesystemEvent, FsEventType};

/// Events a watcher keeps for a client that does not ask; older ones are dropped first.
const MAX_PENDING: usize = 10_000;

/// The watchers of one sandbox, by id.
#[derive(Default)]
pub(crate) struct Watchers(Mutex<HashMap<String, Watch>>);

struct Watch {
    /// Dropping it stops the inotify watch.
    _watcher: notify::RecommendedWatcher,
    pending: Arc<Mutex<Vec<FilesystemEvent>>>,
}

impl Watchers {
    /// Starts watching `dir` (a host path inside the sandbox) under the id `id`.
    pub(crate) fn create(
        &self,
        id: String,
        dir: &Path,
        recursive: bool,
    ) -> Result<(), ConnectError> {
        let pending: Arc<Mutex<Vec<FilesystemEvent>>> = Arc::default();
        let sink = pending.clone();
        let watcher = watch(dir, recursive, move |event| {
            let mut pending = sink.lock().expect("watcher events");
            if pending.len() == MAX_PENDING {
                pending.remove(0);
            }
            pending.push(event);
        })?;
        self.0.lock().expect("watchers").insert(
            id,
            Watch {
                _watcher: watcher,
                pending,
            },
        );
        Ok(())
    }

    /// The events since the last call.
    pub(crate) fn take_events(&self, id: &str) -> Result<Vec<FilesystemEvent>, ConnectError> {
        let watchers = self.0.lock().expect("watchers");
        let watch = watchers.get(id).ok_or_else(|| unknown(id))?;
        Ok(std::mem::take(
            &mut *watch.pending.lock().expect("watcher events"),
        ))
    }

    pub(crate) fn remove(&self, id: &str) -> Result<(), ConnectError> {
        self.0
            .lock()
            .expect("watchers")
            .remove(id)
            .map(drop)
            .ok_or_else(|| unknown(id))
    }
}

/// Watches `dir`, handing each event envd would report to `sink`, until the returned
/// watcher is dropped.
pub(crate) fn watch(
    dir: &Path,
    recursive: bool,
    sink: impl Fn(FilesystemEvent) + Send + 'static,
) -> Result<notify::RecommendedWatcher, ConnectError> {
    let root = dir.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            envd_events(&root, &event).into_iter().for_each(&sink);
        }
    })
    .map_err(watch_error)?;
    let mode = if recursive {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    watcher.watch(dir, mode).map_err(watch_error)?;
    Ok(watcher)
}

fn unknown(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher with id {id} not found"))
}

fn watch_error(error: notify::Error) -> ConnectError {
    ConnectError::new(Code::Internal, format!("error watching directory: {error}"))
}

/// What envd (on fsnotify) reports for an inotify event: a rename is the old name
/// renamed and the new one created; reads and closes are not reported.
fn envd_events(root: &Path, event: &notify::Event) -> Vec<FilesystemEvent> {
    let kind = match event.kind {
        EventKind::Create(_) => FsEventType::Create,
        EventKind::Remove(_) => FsEventType::Remove,
        EventKind::Modify(ModifyKind::Metadata(_)) => FsEventType::Chmod,
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => FsEventType::Rename,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => FsEventType::Create,
        // The pair once more, after its two halves.
        EventKind::Modify(ModifyKind::Name(_)) => return Vec::new(),
        EventKind::Modify(_) => FsEventType::Write,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => return Vec::new(),
    };
    event
        .paths
        .iter()
        .filter_map(|path| relative(root, path))
        .map(|name| FilesystemEvent {
            name,
            kind,
            entry: None,
        })
        .collect()
}

fn relative(root: &Path, path: &Path) -> Option<String> {
    let name: PathBuf = path.strip_prefix(root).ok()?.to_path_buf();
    let name = name.to_string_lossy().into_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn events_until(
        watchers: &Watchers,
        id: &str,
        enough: impl Fn(&[FilesystemEvent]) -> bool,
    ) -> Vec<FilesystemEvent> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen.extend(watchers.take_events(id).unwrap());
            if enough(&seen) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    }

    fn has(events: &[FilesystemEvent], name: &str, kind: FsEventType) -> bool {
        events
            .iter()
            .any(|event| event.name == name && event.kind == kind)
    }

    #[test]
    fn a_watcher_reports_what_envd_reports() {
        let dir = std::env::temp_dir().join(format!("sandcastle-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let watchers = Watchers::default();
        watchers.create("w".into(), &dir, true).unwrap();
        std::fs::write(dir.join("a.txt"), "one").unwrap();
        std::fs::write(dir.join("sub/b.txt"), "two").unwrap();
        std::fs::rename(dir.join("a.txt"), dir.join("c.txt")).unwrap();
        std::fs::set_permissions(
            dir.join("c.txt"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_file(dir.join("c.txt")).unwrap();
        let events = events_until(&watchers, "w", |seen| {
            has(seen, "c.txt", FsEventType::Remove)
        });
        for (name, kind) in [
            ("a.txt", FsEventType::Create),
            ("a.txt", FsEventType::Write),
            ("sub/b.txt", FsEventType::Create),
            ("a.txt", FsEventType::Rename),
            ("c.txt", FsEventType::Create),
            ("c.txt", FsEventType::Chmod),
            ("c.txt", FsEventType::Remove),
        ] {
            assert!(
                has(&events, name, kind),
                "no {kind:?} of {name} in {events:?}"
            );
        }
        assert!(watchers.take_events("w").unwrap().is_empty(), "taken once");
        watchers.remove("w").unwrap();
        assert_eq!(watchers.take_events("w").unwrap_err().code, Code::NotFound);
        assert_eq!(watchers.remove("w").unwrap_err().code, Code::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flat_watcher_leaves_subdirectories_out() {
        let dir = std::env::temp_dir().join(format!("sandcastle-flat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let watchers = Watchers::default();
        watchers.create("w".into(), &dir, false).unwrap();
        std::fs::write(dir.join("sub/deep.txt"), "x").unwrap();
        std::fs::write(dir.join("top.txt"), "y").unwrap();
        let events = events_until(&watchers, "w", |seen| {
            has(seen, "top.txt", FsEventType::Create)
        });
        assert!(has(&events, "top.txt", FsEventType::Create), "{events:?}");
        assert!(
            !events.iter().any(|event| event.name.starts_with("sub/")),
            "{events:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
