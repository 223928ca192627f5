//! Persisted state (`[state] dir`/state.json): each shard's resumable
//! session and the next cursor, so a restarted daemon resumes instead of
//! identifying and never reuses a cursor. Written atomically (write, fsync,
//! rename); a corrupt or stale file is reported and ignored, never fatal.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::shard::ResumeState;

/// Format version of the state file.
const VERSION: u32 = 1;

/// One shard's resumable session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedSession {
    /// Shard id.
    pub shard: u32,
    /// Discord's session id.
    pub session_id: String,
    /// READY's `resume_gateway_url`.
    pub resume_url: String,
    /// Sequence number to resume from (the last one bots acknowledged, or
    /// the last delivered).
    pub seq: u64,
}

impl From<&SavedSession> for ResumeState {
    fn from(s: &SavedSession) -> Self {
        ResumeState {
            session_id: s.session_id.clone(),
            resume_url: s.resume_url.clone(),
            seq: s.seq,
        }
    }
}

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedState {
    /// Format version.
    pub version: u32,
    /// When written (unix ms).
    pub saved_at_ms: u64,
    /// The first cursor a restarted daemon may hand out.
    pub next_cursor: u64,
    /// Shard total the sessions were identified with.
    pub shard_total: u32,
    /// Resumable sessions.
    pub sessions: Vec<SavedSession>,
}

impl SavedState {
    /// A state stamped now.
    pub fn new(next_cursor: u64, shard_total: u32, sessions: Vec<SavedSession>) -> Self {
        SavedState {
            version: VERSION,
            saved_at_ms: crate::clock::unix_millis(),
            next_cursor,
            shard_total,
            sessions,
        }
    }
}

/// Reads and writes the state file.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// The store in `dir`.
    pub fn new(dir: &Path) -> Self {
        StateStore {
            path: dir.join("state.json"),
        }
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Load the state; `Ok(None)` when there is none, `Err` with a message
    /// when it is unreadable or corrupt (the caller logs it and goes on).
    pub fn load(&self) -> Result<Option<SavedState>, String> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot read state file {}: {e}",
                    self.path.display()
                ));
            }
        };
        let state: SavedState = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "state file {} is corrupt ({e}); ignoring it: sessions will identify again",
                self.path.display()
            )
        })?;
        if state.version != VERSION {
            return Err(format!(
                "state file {} has version {} (expected {VERSION}); ignoring it",
                self.path.display(),
                state.version
            ));
        }
        Ok(Some(state))
    }

    /// Write atomically: a temporary file in the same directory, fsync,
    /// rename over the old one.
    pub fn save(&self, state: &SavedState) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        // Unique per write, so two writers never rename each other's file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".state.json.{}.{n}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &self.path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        assert_eq!(store.load(), Ok(None));
        let state = SavedState::new(
            1234,
            4,
            vec![SavedSession {
                shard: 2,
                session_id: "abc".into(),
                resume_url: "wss://x".into(),
                seq: 99,
            }],
        );
        store.save(&state).expect("save");
        assert_eq!(store.load(), Ok(Some(state.clone())));
        let newer = SavedState::new(2000, 4, vec![]);
        store.save(&newer).expect("save again");
        assert_eq!(store.load(), Ok(Some(newer)));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn corrupt_file_is_reported_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        std::fs::write(store.path(), b"{\"version\":1,\"next_cur").expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(err.contains("corrupt"), "{err}");
    }
}
