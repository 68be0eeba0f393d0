//! What this process remembers about tasks between passes, beyond the cache: one type, so
//! its rules are stated once.
//!
//! Keyed by task UID. The invariants:
//! - a UID is in `admitted` from the pass that gave it a sandbox slot until the task
//!   ends, is deleted, or gives the slot back (its provision failed before a sandbox);
//!   while there, the task counts against the caps even if the cache does not show its
//!   sandbox yet, so no slot is given twice;
//! - a UID is in `creating` from just before this process first asks the provider for its
//!   sandbox until the task ends or is deleted: a task never in it, created after this
//!   process started, cannot have a sandbox anywhere;
//! - a UID is in `followed` exactly while a stream of its agent is open in this process;
//! - `transcripts[uid]` holds how far this process has read a running Claude Code agent's
//!   transcript and what it made of it, so each look reads only what is new; it goes when
//!   the task ends or is deleted (a new process starts again from the beginning);
//! - `written[uid]` lists the resourceVersions this process's writes were based on, each
//!   superseded by the next; a cached copy at one of them is stale. The list goes once the
//!   cache shows a newer version, or when the task is deleted.
//!
//! Everything here is lost with the process, and nothing here is needed to resume: a new
//! process re-reads status and sandboxes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub(crate) struct TaskMemory {
    admitted: Mutex<HashSet<String>>,
    creating: Mutex<HashSet<String>>,
    followed: Arc<Mutex<HashSet<String>>>,
    written: Mutex<HashMap<String, Vec<String>>>,
    transcripts: Mutex<HashMap<String, TranscriptRead>>,
}

/// How far a transcript has been read, and the parser that has read it.
#[derive(Default)]
pub(crate) struct TranscriptRead {
    /// The sandbox whose transcript it is: a new attempt's starts from nothing.
    pub(crate) sandbox: String,
    pub(crate) offset: u64,
    pub(crate) parser: crate::agent::stream_json::StreamParser,
}

impl TaskMemory {
    /// Counts the slots taken by this process, then, if `decide` (given whether a UID
    /// holds a slot here) admits the task, gives it one: under one lock, so two passes
    /// never both take the last slot.
    pub(crate) fn admit_if(
        &self,
        uid: &str,
        decide: impl FnOnce(&dyn Fn(&str) -> bool) -> bool,
    ) -> Option<Slot<'_>> {
        let mut admitted = self.admitted.lock().expect("admitted tasks");
        let holds = |other: &str| admitted.contains(other);
        if !decide(&holds) {
            return None;
        }
        admitted.insert(uid.to_string());
        Some(Slot {
            memory: self,
            uid: uid.to_string(),
            kept: false,
        })
    }

    /// Gives back a task's slot: it ended, was deleted, or has no sandbox.
    pub(crate) fn release_slot(&self, uid: &str) {
        self.admitted.lock().expect("admitted tasks").remove(uid);
    }

    /// Notes that this process is about to ask for the task's sandbox: a create that
    /// fails may still have made one.
    pub(crate) fn note_create(&self, uid: &str) {
        self.creating
            .lock()
            .expect("sandbox creates")
            .insert(uid.to_string());
    }

    pub(crate) fn asked_for_a_sandbox(&self, uid: &str) -> bool {
        self.creating.lock().expect("sandbox creates").contains(uid)
    }

    /// Starts following the task's agent unless a stream of it is already open: true if
    /// the caller is now the one following, and must call [`TaskMemory::stop_following`].
    pub(crate) fn start_following(&self, uid: &str) -> bool {
        self.followed
            .lock()
            .expect("followed agents")
            .insert(uid.to_string())
    }

    pub(crate) fn is_following(&self, uid: &str) -> bool {
        self.followed.lock().expect("followed agents").contains(uid)
    }

    /// A handle that ends the following from a task the stream runs in.
    pub(crate) fn following(&self) -> Arc<Mutex<HashSet<String>>> {
        self.followed.clone()
    }

    pub(crate) fn stop_following(followed: &Mutex<HashSet<String>>, uid: &str) {
        followed.lock().expect("followed agents").remove(uid);
    }

    /// Notes that a write based on version `read` made version `made`.
    pub(crate) fn note_write(&self, uid: &str, read: &str, made: &str) {
        // A write that changed nothing makes no new version to wait for.
        if made != read {
            self.written
                .lock()
                .expect("written statuses")
                .entry(uid.to_string())
                .or_default()
                .push(read.to_string());
        }
    }

    /// Whether a cached copy at `version` is older than a write this process made. Each
    /// write is based on the version the one before made (it is refused otherwise), and
    /// the cache only moves forward, so a version no write was based on is the last
    /// write's or newer: from then on nothing is stale, and the list goes.
    pub(crate) fn is_stale(&self, uid: &str, version: &str) -> bool {
        let mut written = self.written.lock().expect("written statuses");
        let Some(superseded) = written.get(uid) else {
            return false;
        };
        if superseded.iter().any(|made| made == version) {
            return true;
        }
        written.remove(uid);
        false
    }

    /// Takes the task's read of the transcript in `sandbox` (a fresh one the first time,
    /// and for a new attempt's sandbox), to be given back with
    /// [`TaskMemory::keep_transcript`] once the new part is fed to it.
    pub(crate) fn take_transcript(&self, uid: &str, sandbox: &str) -> TranscriptRead {
        self.transcripts
            .lock()
            .expect("transcripts")
            .remove(uid)
            .filter(|read| read.sandbox == sandbox)
            .unwrap_or_else(|| TranscriptRead {
                sandbox: sandbox.to_string(),
                ..TranscriptRead::default()
            })
    }

    pub(crate) fn keep_transcript(&self, uid: &str, read: TranscriptRead) {
        self.transcripts
            .lock()
            .expect("transcripts")
            .insert(uid.to_string(), read);
    }

    /// Forgets a task that ended: its slot, its create and its transcript read.
    pub(crate) fn forget(&self, uid: &str) {
        self.release_slot(uid);
        self.creating.lock().expect("sandbox creates").remove(uid);
        self.transcripts.lock().expect("transcripts").remove(uid);
    }

    /// Forgets a deleted task entirely.
    pub(crate) fn forget_deleted(&self, uid: &str) {
        self.forget(uid);
        self.written.lock().expect("written statuses").remove(uid);
    }
}

/// A sandbox slot given to a task in this pass. Dropped, it is given back: a pass that
/// ends before the task holds a sandbox frees it on every path. [`Slot::keep`] leaves it
/// taken, for a task that now has (or may have) a sandbox.
#[must_use]
pub(crate) struct Slot<'a> {
    memory: &'a TaskMemory,
    uid: String,
    kept: bool,
}

impl Slot<'_> {
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.memory.release_slot(&self.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_goes_back_unless_kept() {
        let memory = TaskMemory::default();
        let dropped = memory.admit_if("a", |_| true);
        assert!(dropped.is_some());
        drop(dropped);
        let counted = |memory: &TaskMemory| {
            let mut held = false;
            let _ = memory.admit_if("probe", |holds| {
                held = holds("a");
                false
            });
            held
        };
        assert!(!counted(&memory), "a dropped slot is given back");
        memory.admit_if("a", |_| true).expect("a slot").keep();
        assert!(counted(&memory), "a kept slot stays taken");
        memory.forget("a");
        assert!(!counted(&memory), "forgetting the task frees its slot");
    }

    #[test]
    fn a_refused_task_takes_no_slot() {
        let memory = TaskMemory::default();
        assert!(memory.admit_if("a", |_| false).is_none());
        let mut held = true;
        let _ = memory.admit_if("b", |holds| {
            held = holds("a");
            false
        });
        assert!(!held);
    }

    #[test]
    fn versions_a_write_was_based_on_are_stale_until_a_newer_one_is_seen() {
        let memory = TaskMemory::default();
        memory.note_write("t", "1", "2");
        memory.note_write("t", "2", "3");
        assert!(memory.is_stale("t", "1"));
        assert!(memory.is_stale("t", "2"));
        assert!(!memory.is_stale("t", "3"));
        // Once the newest was seen the list is gone: an old copy is no longer recognised,
        // and none can arrive, as the cache only moves forward.
        assert!(!memory.is_stale("t", "1"));
    }

    #[test]
    fn a_write_that_changed_nothing_leaves_nothing_to_wait_for() {
        let memory = TaskMemory::default();
        memory.note_write("t", "5", "5");
        assert!(!memory.is_stale("t", "5"));
    }

    #[test]
    fn one_follower_per_agent() {
        let memory = TaskMemory::default();
        assert!(memory.start_following("t"));
        assert!(!memory.start_following("t"));
        assert!(memory.is_following("t"));
        TaskMemory::stop_following(&memory.following(), "t");
        assert!(!memory.is_following("t"));
    }

    #[test]
    fn a_transcript_is_read_on_from_where_the_last_look_stopped() {
        let memory = TaskMemory::default();
        let mut read = memory.take_transcript("t", "sb-1");
        assert_eq!(read.offset, 0);
        let first = br#"{"type":"assistant","message":{"id":"m1","model":"m","content":[{"type":"tool_use","name":"Bash"}]}}
{"type":"assis"#;
        read.parser.feed(first);
        read.offset += first.len() as u64;
        memory.keep_transcript("t", read);
        let mut read = memory.take_transcript("t", "sb-1");
        assert_eq!(read.offset, first.len() as u64);
        // The rest of a line cut between two looks completes it.
        read.parser.feed(br#"tant","message":{"id":"m2","model":"m","content":[{"type":"tool_use","name":"Edit"}]}}
"#);
        assert_eq!(read.parser.progress().turns, 2);
        assert_eq!(read.parser.progress().last_tool.as_deref(), Some("Edit"));
        memory.keep_transcript("t", read);
        assert_eq!(
            memory.take_transcript("t", "sb-2").offset,
            0,
            "a new attempt's transcript is read from its start"
        );
        let mut read = memory.take_transcript("t", "sb-1");
        read.offset = 7;
        memory.keep_transcript("t", read);
        memory.forget("t");
        assert_eq!(
            memory.take_transcript("t", "sb-1").offset,
            0,
            "a finished task's read is gone"
        );
    }

    #[test]
    fn creates_are_remembered_until_the_task_is_forgotten() {
        let memory = TaskMemory::default();
        assert!(!memory.asked_for_a_sandbox("t"));
        memory.note_create("t");
        assert!(memory.asked_for_a_sandbox("t"));
        memory.forget("t");
        assert!(!memory.asked_for_a_sandbox("t"));
    }
}
