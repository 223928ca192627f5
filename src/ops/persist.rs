//! What the supervisor keeps in the state file, and when it writes it
//! (the file's format is [`crate::state`]).
//!
//! - At start-up, [`Restored::from_saved`] decides which saved sessions are
//!   resumed, where cursors continue, and which cursor ranges of the last
//!   life were not events a bot can miss; [`Persister::lease`] then writes
//!   the new cursor lease *before any shard connects*. If that write fails
//!   the daemon refuses to start: a cursor that is not durably leased could
//!   be handed out twice after a crash.
//! - While running, [`Persister::run`] writes whenever something a restart
//!   needs has changed (the lease, a session or its resume seq, a client's
//!   ack, an IDENTIFY), at most once a second, and only then. The event log
//!   never hands out a cursor past the lease last written; if writes keep
//!   failing, forwarding stops at the lease's end, loudly and repeatedly,
//!   rather than reuse cursors.
//! - At shutdown, [`Persister::snapshot`] with the shards' final sessions is
//!   written once more, and a failure is an error exit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::event_log::CURSOR_LEASE;
use crate::hub::Hub;
use crate::identify_queue::IdentifyQueue;
use crate::shard::ResumeState;
use crate::state::{self, SavedSession, SavedState, StateStore};

/// How often the persister looks for changes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How often a failing write is logged again.
const FAILURE_REMINDER: Duration = Duration::from_secs(10);

/// What start-up takes from the state file.
#[derive(Debug, Default)]
pub struct Restored {
    /// The first cursor this life hands out.
    pub first_cursor: u64,
    /// Sessions to resume, by shard.
    pub resumes: HashMap<u32, ResumeState>,
    /// Cursor ranges of earlier lives that were not events a bot can miss.
    pub not_missed: Vec<(u64, u64)>,
    /// The saved state (clients, identify times), if any.
    pub saved: Option<SavedState>,
}

impl Restored {
    /// Decide what to resume from `saved`, for a daemon of `total` shards
    /// owning `owned`, resuming sessions no older than `window`; with
    /// `[proxy]` on (`front_door` is `Some`), only the sessions the front
    /// door's cache snapshot was taken from (shard → session id).
    pub fn from_saved(
        saved: Option<SavedState>,
        total: u32,
        owned: &[u32],
        window: Duration,
        front_door: Option<&BTreeMap<u32, String>>,
    ) -> Restored {
        let Some(saved) = saved else {
            return Restored {
                first_cursor: 1,
                ..Restored::default()
            };
        };
        let all_resumed = |resumes: &HashMap<u32, ResumeState>| {
            saved
                .sessions
                .iter()
                .filter(|s| owned.contains(&s.shard))
                .all(|s| resumes.contains_key(&s.shard))
        };
        let first_cursor = saved.next_cursor.max(1);
        let age =
            Duration::from_millis(crate::clock::unix_millis().saturating_sub(saved.saved_at_ms));
        let mut resumes = HashMap::new();
        if saved.shard_total != total {
            tracing::warn!(
                event = %"state_ignored",
                saved_total = saved.shard_total,
                total,
                "persisted sessions were for another shard count; identifying"
            );
        } else if age > window {
            tracing::warn!(
                event = %"state_ignored",
                age_s = age.as_secs(),
                window_s = window.as_secs(),
                "persisted sessions are too old to resume ([state] resume_window); identifying"
            );
        } else {
            let mut uncached = 0;
            for session in &saved.sessions {
                // The front door rebuilds READY and GUILD_CREATE from what a
                // shard received since READY; a resumed session replays
                // neither, so only shards whose cache was saved with this
                // very session resume.
                let cached = front_door.is_none_or(|snapshot| {
                    snapshot.get(&session.shard) == Some(&session.session_id)
                });
                if !cached {
                    uncached += 1;
                } else if owned.contains(&session.shard) {
                    resumes.insert(session.shard, session.into());
                }
            }
            if uncached > 0 {
                tracing::warn!(
                    event = %"state_ignored",
                    sessions = uncached,
                    "[proxy] is on and the front door's cache of these sessions was not saved (no snapshot of them in [state] dir): identifying them, since the drop-in state cache is filled only by READY and GUILD_CREATE"
                );
            }
        }
        let mut not_missed = saved.not_missed.clone();
        // Cursors after the resume point were either redelivered by Discord
        // (the resumed sessions replay them under new cursors) or leased and
        // never used. Without a resume, the events after the point are
        // really gone; only the unused cursors after the head are not events.
        // Only when every saved session resumes is everything after the
        // point redelivered; a shard left to identify loses its events after
        // it, and those must be counted.
        let from = if resumes.is_empty() || !all_resumed(&resumes) {
            saved.head
        } else {
            saved.resume_point
        };
        state::add_range(&mut not_missed, from + 1, first_cursor - 1);
        tracing::info!(
            sessions = resumes.len(),
            age_s = age.as_secs(),
            next_cursor = first_cursor,
            clean = saved.clean,
            clients = saved.clients.len(),
            "state restored"
        );
        Restored {
            first_cursor,
            resumes,
            not_missed,
            saved: Some(saved),
        }
    }
}

/// Writes the state file for one daemon life.
pub struct Persister {
    store: StateStore,
    hub: Arc<Hub>,
    queue: Arc<IdentifyQueue>,
    total: u32,
    not_missed: Vec<(u64, u64)>,
    /// What was last written (to write only changes).
    last: Option<SavedState>,
    /// Write at least this often while sessions are live, so a quiet
    /// daemon's saved sessions never look older than they are.
    refresh_every: Duration,
}

impl Persister {
    /// A persister for `hub`'s log, sessions and clients and `queue`'s
    /// identify times.
    pub fn new(
        store: StateStore,
        hub: Arc<Hub>,
        queue: Arc<IdentifyQueue>,
        total: u32,
        not_missed: Vec<(u64, u64)>,
    ) -> Self {
        Persister {
            store,
            hub,
            queue,
            total,
            not_missed,
            last: None,
            refresh_every: Duration::from_secs(60),
        }
    }

    /// Rewrite an unchanged state at least every `every` (half of
    /// `[state] resume_window`: a session saved by a quiet daemon must still
    /// be young enough to resume after a crash).
    pub fn refresh_every(mut self, every: Duration) -> Self {
        self.refresh_every = every.max(Duration::from_secs(1));
        self
    }

    /// The state file for now: `sessions` as given (a clean shutdown) or the
    /// shards' live sessions.
    pub fn snapshot(&self, clean: bool, sessions: Option<Vec<(u32, ResumeState)>>) -> SavedState {
        let live = || {
            self.hub
                .owned()
                .filter_map(|s| {
                    let info = s.session();
                    Some((
                        s.shard,
                        ResumeState {
                            session_id: info.session_id?,
                            resume_url: info.resume_url?,
                            seq: s.seq.load(Ordering::Relaxed),
                        },
                    ))
                })
                .collect::<Vec<_>>()
        };
        let sessions = sessions.unwrap_or_else(live);
        let (point, sessions) = sessions_to_save(&self.hub, sessions);
        let mut state = SavedState::new(self.lease_wanted(), self.total, sessions);
        state.clean = clean;
        state.head = self.hub.log.head();
        // Events a slow client had not acked that have left the ring are not
        // redelivered (the resume seq comes from what the ring holds): they
        // must count as missed, so the point never goes below the ring.
        state.resume_point = match self.hub.log.oldest_held() {
            Some(oldest) if point + 1 < oldest => oldest - 1,
            _ => point,
        };
        state.not_missed = self.not_missed.clone();
        state.clients = self.hub.consumers.durable();
        state.identify = self.queue.times();
        state
    }

    fn lease_wanted(&self) -> u64 {
        *self.hub.log.subscribe_lease().borrow()
    }

    /// Write the start-up state (the new lease, the sessions being resumed,
    /// the clients and identify times restored): before any shard connects.
    pub async fn lease(&mut self, restored: &Restored) -> Result<(), String> {
        let mut state = self.snapshot(
            false,
            Some(
                restored
                    .resumes
                    .iter()
                    .map(|(&shard, r)| (shard, r.clone()))
                    .collect(),
            ),
        );
        state.next_cursor = restored.first_cursor + CURSOR_LEASE;
        // Nothing of this life exists yet: every cursor from the first one on
        // is unused if the daemon dies now.
        state.resume_point = restored.first_cursor - 1;
        if let Some(saved) = &restored.saved {
            state.clients.extend(saved.clients.clone());
        }
        self.write(state).await.map_err(|e| e.to_string())
    }

    async fn write(&mut self, state: SavedState) -> std::io::Result<()> {
        let lease = state.next_cursor;
        self.store
            .save_async(state.clone(), state::IO_TIMEOUT)
            .await?;
        self.hub.log.set_durable_until(lease);
        self.last = Some(state);
        Ok(())
    }

    /// Write whenever something changed, until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Self {
        let mut lease = self.hub.log.subscribe_lease();
        let identified = self.queue.identified();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut last_reminder: Option<tokio::time::Instant> = None;
        let mut failures = 0u64;
        loop {
            tokio::select! {
                _ = lease.changed() => {}
                _ = identified.notified() => {}
                _ = self.hub.session_changed.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => return self,
            }
            let state = self.snapshot(false, None);
            let fresh = self.last.as_ref().is_some_and(|last| {
                crate::clock::unix_millis().saturating_sub(last.saved_at_ms)
                    < self.refresh_every.as_millis() as u64
            });
            if fresh
                && self
                    .last
                    .as_ref()
                    .is_some_and(|last| last.same_content(&state))
            {
                continue;
            }
            match self.write(state).await {
                Ok(()) => {
                    if let Some(since) = failing_since.take() {
                        tracing::info!(
                            event = %"state_saved",
                            failures,
                            failing_for_s = since.elapsed().as_secs(),
                            "the state file can be written again; cursors and sessions are safe"
                        );
                    }
                    failures = 0;
                    last_reminder = None;
                }
                Err(e) => {
                    failures += 1;
                    let now = tokio::time::Instant::now();
                    failing_since.get_or_insert(now);
                    if last_reminder.is_none_or(|at| now - at >= FAILURE_REMINDER) {
                        last_reminder = Some(now);
                        self.report_failure(&e, failures);
                    }
                }
            }
        }
    }

    fn report_failure(&self, e: &std::io::Error, failures: u64) {
        let refused = self.hub.log.refused();
        let durable = self.last.as_ref().map_or(0, |last| last.next_cursor);
        let left = durable.saturating_sub(self.hub.log.next_cursor());
        if refused > 0 {
            tracing::error!(
                event = %"state_unwritable",
                path = %self.store.path().display(),
                error = %e,
                failures,
                unforwarded = refused,
                "cannot write the state file, and the cursor lease it holds is used up: events are NOT being forwarded to bots (handing out cursors that are not durably leased could reuse them after a crash). Free space or fix [state] dir; forwarding resumes at once, and a restart then has Discord replay what was held back"
            );
        } else {
            tracing::error!(
                event = %"state_unwritable",
                path = %self.store.path().display(),
                error = %e,
                failures,
                cursors_left = left,
                "cannot write the state file: a crash now would resume from the last state written, and forwarding stops when the {left} cursors still leased are used up. Free space or fix [state] dir"
            );
        }
    }

    /// The state last written, if any.
    pub fn last_written(&self) -> Option<&SavedState> {
        self.last.as_ref()
    }

    /// The final write at shutdown, once every shard has stopped: no cursor
    /// is handed out after it, so the next life continues right after the
    /// last one used (cursors stay contiguous across clean restarts).
    pub async fn finish(
        &mut self,
        sessions: Vec<(u32, ResumeState)>,
    ) -> Result<SavedState, String> {
        let mut state = self.snapshot(true, Some(sessions));
        state.next_cursor = self.hub.log.next_cursor();
        match self.write(state.clone()).await {
            Ok(()) => Ok(state),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The resume point, and the sessions to persist with the seq each resumes
/// from: where bots ack, the lowest ack of the clients that ack (Discord then
/// replays what the slowest has not finished); else what was handed to a
/// bot; with no bot at all, from before everything held, so Discord replays
/// what no bot has seen (at-least-once).
pub fn sessions_to_save(
    hub: &Hub,
    sessions: impl IntoIterator<Item = (u32, ResumeState)>,
) -> (u64, Vec<SavedSession>) {
    let point = hub
        .consumers
        .resume_point(crate::clock::unix_millis())
        .unwrap_or_else(|| hub.delivered.load(Ordering::Relaxed));
    let gens: Vec<(u32, u32)> = hub
        .shards
        .iter()
        .map(|s| (s.shard, s.session_gen.load(Ordering::Relaxed)))
        .collect();
    let unacked = hub.log.lowest_unacked_seq(point, &gens);
    let sessions = sessions
        .into_iter()
        .map(|(shard, resume)| {
            let mut seq = unacked
                .iter()
                .find(|&&(s, _)| s == shard)
                .map_or(resume.seq, |&(_, lowest)| {
                    lowest.saturating_sub(1).min(resume.seq)
                });
            if let Some(stats) = hub.shard(shard) {
                seq = seq.min(stats.resume_cap.load(Ordering::Relaxed));
            }
            SavedSession {
                shard,
                session_id: resume.session_id,
                resume_url: resume.resume_url,
                seq,
            }
        })
        .collect();
    (point, sessions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(next: u64, head: u64, point: u64, sessions: usize) -> SavedState {
        let mut s = SavedState::new(
            next,
            2,
            (0..sessions as u32)
                .map(|shard| SavedSession {
                    shard,
                    session_id: format!("s{shard}"),
                    resume_url: "ws://127.0.0.1:1".into(),
                    seq: 10,
                })
                .collect(),
        );
        s.head = head;
        s.resume_point = point;
        s
    }

    #[test]
    fn resumed_sessions_make_everything_after_the_point_not_missed() {
        let r = Restored::from_saved(
            Some(saved(1_000_040, 40, 30, 2)),
            2,
            &[0, 1],
            Duration::from_secs(120),
            None,
        );
        assert_eq!(r.first_cursor, 1_000_040);
        assert_eq!(r.resumes.len(), 2);
        assert_eq!(r.not_missed, vec![(31, 1_000_039)]);
    }

    #[test]
    fn without_a_resume_only_unused_cursors_are_not_missed() {
        let r = Restored::from_saved(
            Some(saved(1_000_040, 40, 30, 2)),
            4,
            &[0, 1],
            Duration::from_secs(120),
            None,
        );
        assert!(r.resumes.is_empty(), "other shard total");
        assert_eq!(r.not_missed, vec![(41, 1_000_039)]);
        let mut old = saved(1_000_040, 40, 30, 2);
        old.saved_at_ms -= 121_000;
        let r = Restored::from_saved(Some(old), 2, &[0, 1], Duration::from_secs(120), None);
        assert!(r.resumes.is_empty(), "too old");
    }

    #[test]
    fn a_fresh_start_begins_at_cursor_1() {
        let r = Restored::from_saved(None, 2, &[0, 1], Duration::from_secs(120), None);
        assert_eq!((r.first_cursor, r.resumes.len()), (1, 0));
        assert!(r.not_missed.is_empty());
    }
}
