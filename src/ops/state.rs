//! Persisted state (`[state] dir`/state.json): what a restarted daemon needs
//! so that a restart costs no IDENTIFY and loses no acknowledged event:
//!
//! - each shard's resumable session, with the seq to resume from (derived
//!   from the slowest acking bot, so Discord replays what it has not
//!   finished);
//! - the cursor lease: the first cursor a restarted daemon may hand out.
//!   Cursors are leased ahead in large blocks, and a shard never forwards an
//!   event past what is durably leased, so no cursor is ever handed out twice;
//! - which cursor ranges of earlier lives were not events a bot can miss
//!   (leased but never used, or redelivered by Discord's resume under new
//!   cursors), so `missed` and `gap` count only real losses;
//! - each bot client's last ack and when it was last seen (DESIGN §3.3);
//! - each identify bucket's last IDENTIFY, so the 5 s spacing holds across
//!   restarts.
//!
//! Written atomically (write, fsync, rename; the temporary file is removed
//! when any step fails). All file I/O runs on a plain thread with a timeout
//! ([`StateStore::load_async`], [`StateStore::save_async`]), so a state file
//! that blocks (a FIFO, a hung network mount) never stalls the runtime or
//! signal handling. A corrupt file is reported and moved aside; a file that
//! cannot be read at all stops start-up (its cursors would otherwise be
//! reused).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shard::ResumeState;

/// Format version written. Version 1 files (sessions and the lease only) are
/// still read.
const VERSION: u32 = 2;

/// How long one read or write of the state file may take before it is
/// treated as failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Most `not_missed` ranges kept (older ones are dropped: a bot resuming from
/// a cursor that old is told about more than it lost, never less).
const MAX_NOT_MISSED: usize = 64;

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

/// A bot client's durable ack (keyed by its hello `client` name).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ClientAck {
    /// The last cursor the client acknowledged.
    pub acked: u64,
    /// When the client was last connected (unix ms; 0 = it was connected
    /// when the state was written).
    pub seen_ms: u64,
}

/// Each identify bucket's last IDENTIFY.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IdentifyTimes {
    /// `max_concurrency` the buckets were numbered with.
    pub max_concurrency: u32,
    /// Per bucket, when its last IDENTIFY was sent (unix ms; 0 = never).
    pub sent_ms: Vec<u64>,
}

impl IdentifyTimes {
    /// The latest IDENTIFY of any bucket (unix ms; 0 = none).
    pub fn latest_ms(&self) -> u64 {
        self.sent_ms.iter().copied().max().unwrap_or(0)
    }
}

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedState {
    /// Format version.
    pub version: u32,
    /// When written (unix ms).
    pub saved_at_ms: u64,
    /// Written by a clean shutdown (false: a periodic save, the daemon may
    /// have crashed after it).
    #[serde(default)]
    pub clean: bool,
    /// The first cursor a restarted daemon may hand out (the end of the
    /// durable lease).
    pub next_cursor: u64,
    /// The newest cursor handed out when this was written.
    #[serde(default)]
    pub head: u64,
    /// The cursor the sessions' seqs were derived from: every event after it
    /// is redelivered by Discord when the sessions resume.
    #[serde(default)]
    pub resume_point: u64,
    /// Cursor ranges (inclusive) of earlier lives that were not events a bot
    /// can miss.
    #[serde(default)]
    pub not_missed: Vec<(u64, u64)>,
    /// Shard total the sessions were identified with.
    pub shard_total: u32,
    /// Resumable sessions.
    pub sessions: Vec<SavedSession>,
    /// Bot clients' durable acks.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientAck>,
    /// Each identify bucket's last IDENTIFY.
    #[serde(default)]
    pub identify: IdentifyTimes,
}

impl SavedState {
    /// A state stamped now, with nothing but the lease and sessions.
    pub fn new(next_cursor: u64, shard_total: u32, sessions: Vec<SavedSession>) -> Self {
        SavedState {
            version: VERSION,
            saved_at_ms: crate::clock::unix_millis(),
            clean: false,
            next_cursor,
            head: next_cursor.saturating_sub(1),
            resume_point: 0,
            not_missed: Vec::new(),
            shard_total,
            sessions,
            clients: BTreeMap::new(),
            identify: IdentifyTimes::default(),
        }
    }

    /// Equal apart from when it was written (so an unchanged state is not
    /// written again).
    pub fn same_content(&self, other: &SavedState) -> bool {
        let mut a = self.clone();
        a.saved_at_ms = other.saved_at_ms;
        a == *other
    }
}

/// Add the inclusive range `(from, to)` to sorted, merged `ranges`, keeping
/// at most 64 (the oldest go first).
pub fn add_range(ranges: &mut Vec<(u64, u64)>, from: u64, to: u64) {
    if from > to {
        return;
    }
    ranges.push((from, to));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(f, t) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if f <= last.1.saturating_add(1) => last.1 = last.1.max(t),
            _ => merged.push((f, t)),
        }
    }
    let excess = merged.len().saturating_sub(MAX_NOT_MISSED);
    merged.drain(..excess);
    *ranges = merged;
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

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Load the state: `Ok(None)` when there is none (or it is corrupt: it
    /// is then moved aside and reported in the `Ok` warning), `Err` when the
    /// file exists but cannot be read.
    pub fn load(&self) -> Result<(Option<SavedState>, Option<String>), String> {
        self.remove_leftovers();
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
            Err(e) => {
                return Err(format!(
                    "cannot read state file {}: {e}",
                    self.path.display()
                ));
            }
        };
        if !meta.is_file() {
            return Err(format!(
                "state file {} is not a regular file (a FIFO, socket or directory)",
                self.path.display()
            ));
        }
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("cannot read state file {}: {e}", self.path.display()))?;
        let parsed = serde_json::from_slice::<SavedState>(&bytes)
            .map_err(|e| format!("is corrupt ({e})"))
            .and_then(|state| {
                if state.version == 1 || state.version == VERSION {
                    Ok(state)
                } else {
                    Err(format!(
                        "has version {} (this daemon reads 1 and {VERSION})",
                        state.version
                    ))
                }
            });
        match parsed {
            Ok(state) => Ok((Some(state), None)),
            Err(why) => {
                let aside = self
                    .path
                    .with_extension(format!("json.unreadable-{}", crate::clock::unix_millis()));
                let moved = match std::fs::rename(&self.path, &aside) {
                    Ok(()) => format!("moved aside to {}", aside.display()),
                    Err(e) => format!("could not be moved aside ({e})"),
                };
                Ok((
                    None,
                    Some(format!(
                        "state file {} {why}; {moved}. Sessions identify again; bots should reconnect with resume_from null",
                        self.path.display()
                    )),
                ))
            }
        }
    }

    /// Remove temporary files a crash in the middle of a write left behind.
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".state.json.") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Write atomically: a temporary file in the same directory, fsync,
    /// rename over the old one, fsync the directory. The temporary file is
    /// removed when any step fails.
    pub fn save(&self, state: &SavedState) -> std::io::Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(dir)?;
        // Unique per write, so two writers never rename each other's file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".state.json.{}.{n}.tmp", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
        if let Err(e) = synced {
            // Renamed but the directory entry may not be on disk yet.
            tracing::debug!(error = %e, "fsync of the state directory failed");
        }
        Ok(())
    }

    /// [`load`](Self::load) on its own thread, failing after `timeout`.
    pub async fn load_async(
        &self,
        timeout: Duration,
    ) -> Result<(Option<SavedState>, Option<String>), String> {
        let store = self.clone();
        off_thread(timeout, move || store.load())
            .await
            .unwrap_or_else(|| {
                Err(format!(
                    "reading state file {} did not finish within {} s (a FIFO, or a hung mount?)",
                    self.path.display(),
                    timeout.as_secs()
                ))
            })
    }

    /// [`save`](Self::save) on its own thread, failing after `timeout`.
    pub async fn save_async(&self, state: SavedState, timeout: Duration) -> std::io::Result<()> {
        let store = self.clone();
        off_thread(timeout, move || store.save(&state))
            .await
            .unwrap_or_else(|| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "writing {} did not finish within {} s (a hung mount?)",
                        self.path.display(),
                        timeout.as_secs()
                    ),
                ))
            })
    }
}

/// Run blocking file I/O on a plain thread (not tokio's blocking pool, whose
/// threads the runtime waits for at exit) and give up after `timeout`.
pub(crate) async fn off_thread<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("state-io".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if spawned.is_err() {
        return None;
    }
    tokio::time::timeout(timeout, rx).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        assert_eq!(store.load(), Ok((None, None)));
        let mut state = SavedState::new(
            1234,
            4,
            vec![SavedSession {
                shard: 2,
                session_id: "abc".into(),
                resume_url: "wss://x".into(),
                seq: 99,
            }],
        );
        state.clients.insert(
            "slow".into(),
            ClientAck {
                acked: 17,
                seen_ms: 5,
            },
        );
        state.identify = IdentifyTimes {
            max_concurrency: 2,
            sent_ms: vec![10, 20],
        };
        store.save(&state).expect("save");
        assert_eq!(store.load(), Ok((Some(state.clone()), None)));
        let newer = SavedState::new(2000, 4, vec![]);
        store.save(&newer).expect("save again");
        assert_eq!(store.load(), Ok((Some(newer), None)));
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn version_1_files_are_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        std::fs::write(
            store.path(),
            br#"{"version":1,"saved_at_ms":5,"next_cursor":77,"shard_total":1,"sessions":[]}"#,
        )
        .expect("write");
        let (state, warning) = store.load().expect("readable");
        let state = state.expect("a state");
        assert_eq!((state.next_cursor, warning), (77, None));
        assert!(state.clients.is_empty());
    }

    #[test]
    fn corrupt_file_is_reported_and_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        std::fs::write(store.path(), b"{\"version\":1,\"next_cur").expect("write");
        let (state, warning) = store.load().expect("not fatal");
        assert!(state.is_none());
        let warning = warning.expect("reported");
        assert!(
            warning.contains("corrupt") && warning.contains("moved aside"),
            "{warning}"
        );
        assert!(!store.path().exists(), "moved out of the way");
    }

    #[test]
    fn failed_write_leaves_no_temporary_file_and_old_leftovers_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        // A directory where the state file should be: the rename fails.
        std::fs::create_dir(store.path()).expect("mkdir");
        std::fs::write(store.path().join("x"), b"").expect("non-empty dir");
        assert!(store.save(&SavedState::new(1, 1, vec![])).is_err());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
        // A crash mid-write leaves one behind; the next load removes it.
        std::fs::write(dir.path().join(".state.json.1.0.tmp"), b"{").expect("write");
        let _ = store.load();
        assert!(leftovers(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        let path =
            std::ffi::CString::new(store.path().as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let err = store
            .load_async(Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[tokio::test]
    async fn io_that_hangs_times_out() {
        let slow = off_thread(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(2));
            1
        });
        assert_eq!(slow.await, None);
        assert_eq!(off_thread(Duration::from_secs(2), || 2).await, Some(2));
    }

    #[test]
    fn ranges_merge_and_stay_bounded() {
        let mut r = Vec::new();
        add_range(&mut r, 10, 20);
        add_range(&mut r, 21, 30);
        add_range(&mut r, 5, 7);
        add_range(&mut r, 9, 4);
        assert_eq!(r, vec![(5, 7), (10, 30)]);
        for i in 0..100u64 {
            add_range(&mut r, 100 + i * 10, 100 + i * 10 + 1);
        }
        assert_eq!(r.len(), MAX_NOT_MISSED);
        assert_eq!(r.last(), Some(&(1090, 1091)));
    }
}
