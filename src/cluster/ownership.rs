//! Which shards this daemon runs, with `[cluster]` (DESIGN §4): the
//! [`Keeper`] claims free shard leases, renews the ones it holds every third
//! of `lease_ttl`, writes each held shard's session to Redis (at most once a
//! second, only when it changed, fenced), and tells the supervisor to start
//! a shard once its lease is taken and to stop it at once when the lease is
//! lost or cannot be renewed before it would expire. That order is what
//! keeps a shard from ever having two connections: a daemon stops a shard
//! while its lease still runs, and another can only take the lease after it
//! expired.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cluster::coord::{Redis, StoredSession};
use crate::hub::Hub;
use crate::shard::ResumeState;

/// How often held sessions are written to Redis when they change.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Most claim attempts per round (a round is a third of `lease_ttl`), so a
/// daemon among thousands of held shards does not flood Redis.
const CLAIM_ATTEMPTS_PER_ROUND: usize = 64;

/// What the keeper tells the supervisor.
#[derive(Debug)]
pub enum LeaseEvent {
    /// The lease of `shard` is ours (token `fence`): run it, resuming
    /// `resume` when a previous owner left a fresh session.
    Claimed {
        /// The shard.
        shard: u32,
        /// Our fencing token.
        fence: u64,
        /// The session to RESUME (no IDENTIFY), if fresh enough.
        resume: Option<ResumeState>,
    },
    /// Stop `shard` now: its lease is lost or would expire before it could
    /// be renewed.
    Lost {
        /// The shard.
        shard: u32,
    },
}

/// Redis coordination's counters, for `health`, `status` and metrics.
#[derive(Default)]
pub struct ClusterStats {
    /// `[cluster]` is configured.
    pub enabled: AtomicBool,
    /// This daemon's name.
    pub name: std::sync::OnceLock<String>,
    /// `lease_ttl` in ms.
    pub lease_ttl_ms: AtomicU64,
    /// The last Redis call succeeded.
    pub redis_up: AtomicBool,
    /// Lease renewals that succeeded.
    pub renewals: AtomicU64,
    /// Leases taken.
    pub claims: AtomicU64,
    /// Shards taken over from another daemon's session (resumed, no IDENTIFY).
    pub takeovers: AtomicU64,
    /// Leases lost (taken by another after expiry, or not renewable in time).
    pub lost: AtomicU64,
    /// Session writes to Redis that succeeded.
    pub sessions_saved: AtomicU64,
    /// Why the last Redis call failed.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// A shard's session started or ended: written to Redis at once rather
    /// than at the next once-a-second save.
    pub sessions_changed: tokio::sync::Notify,
}

/// `health.cluster`.
#[derive(Serialize)]
pub struct ClusterView {
    /// This daemon's name in leases.
    pub name: String,
    /// `"connected"` or `"down"`.
    pub redis: &'static str,
    /// Why Redis is down, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_error: Option<String>,
    /// `[cluster] lease_ttl` in ms.
    pub lease_ttl_ms: u64,
    /// The leases this daemon holds.
    pub leases: Vec<LeaseView>,
    /// Renewals that succeeded.
    pub renewals: u64,
    /// Leases taken.
    pub claims: u64,
    /// Shards taken over from another daemon.
    pub takeovers: u64,
    /// Leases lost.
    pub lost: u64,
}

/// One lease this daemon holds.
#[derive(Serialize)]
pub struct LeaseView {
    /// The shard.
    pub shard: u32,
    /// The lease holder (this daemon).
    pub owner: String,
    /// Its fencing token.
    pub fence: u64,
}

impl ClusterStats {
    /// The view for `health`, `None` without `[cluster]`.
    pub fn view(&self, hub: &Hub) -> Option<ClusterView> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let name = self.name.get().cloned().unwrap_or_default();
        let up = self.redis_up.load(Ordering::Relaxed);
        Some(ClusterView {
            leases: hub
                .owned()
                .map(|s| LeaseView {
                    shard: s.shard,
                    owner: name.clone(),
                    fence: s.fence.load(Ordering::Relaxed),
                })
                .collect(),
            name,
            redis: if up { "connected" } else { "down" },
            redis_error: if up {
                None
            } else {
                self.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            },
            lease_ttl_ms: self.lease_ttl_ms.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
            claims: self.claims.load(Ordering::Relaxed),
            takeovers: self.takeovers.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        })
    }
}

/// A lease this daemon holds.
struct Held {
    fence: u64,
    /// When the last successful renewal (or the claim) was *sent*: Redis
    /// set the expiry no earlier than this, so `renewed_at + ttl` is a
    /// bound on when another daemon can take the lease.
    renewed_at: Instant,
    /// The session last written, to write only changes.
    saved: Option<(String, u64)>,
}

/// Keeps this daemon's shard leases.
pub struct Keeper {
    redis: Arc<Redis>,
    hub: Arc<Hub>,
    ttl: Duration,
    /// Shards this daemon may run.
    candidates: Vec<u32>,
    /// Most shards held at once.
    max: usize,
    /// Sessions older than this are not resumed.
    resume_window: Duration,
    held: BTreeMap<u32, Held>,
    events: mpsc::UnboundedSender<LeaseEvent>,
}

impl Keeper {
    /// A keeper for `candidates` (at most `max` held), telling the
    /// supervisor through `events`.
    pub fn new(
        redis: Arc<Redis>,
        hub: Arc<Hub>,
        ttl: Duration,
        candidates: Vec<u32>,
        max: usize,
        resume_window: Duration,
        events: mpsc::UnboundedSender<LeaseEvent>,
    ) -> Keeper {
        hub.cluster.enabled.store(true, Ordering::Relaxed);
        let _ = hub.cluster.name.set(redis.name.clone());
        hub.cluster
            .lease_ttl_ms
            .store(ttl.as_millis() as u64, Ordering::Relaxed);
        for stats in &hub.shards {
            stats.owned.store(false, Ordering::Relaxed);
        }
        Keeper {
            redis,
            hub,
            ttl,
            candidates,
            max: max.max(1),
            resume_window,
            held: BTreeMap::new(),
            events,
        }
    }

    /// Renew every third of the TTL; give a lease up (stop the shard) when
    /// it has not been renewed for two thirds of it.
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn give_up_after(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// Claim, renew and save until `shutdown`; then the caller stops the
    /// shards and hands their final sessions to [`Keeper::finish`].
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Keeper {
        let tick = (self.ttl / 10).max(Duration::from_millis(50));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_claim: Option<Instant> = None;
        let mut last_save = Instant::now();
        let mut waiting_logged: Option<Instant> = None;
        // The last round took all it could: more leases may be free (a
        // takeover), so look again at the next tick.
        let mut claim_more = false;
        let hub = self.hub.clone();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = hub.cluster.sessions_changed.notified() => {
                    self.save_changed(true).await;
                    continue;
                }
                _ = shutdown.changed() => return self,
            }
            if *shutdown.borrow() {
                return self;
            }
            self.renew().await;
            if claim_more || last_claim.is_none_or(|at| at.elapsed() >= self.renew_every()) {
                last_claim = Some(Instant::now());
                claim_more = self.claim().await;
                if self.held.is_empty()
                    && !self.redis.is_up()
                    && waiting_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
                {
                    waiting_logged = Some(Instant::now());
                    tracing::warn!(
                        event = %"cluster_waiting",
                        error = %self.redis.last_error().unwrap_or_default(),
                        "Redis does not answer: no shard is started until this daemon holds its lease"
                    );
                }
            }
            if last_save.elapsed() >= SAVE_EVERY {
                last_save = Instant::now();
                self.save().await;
                self.mirror_budget().await;
            }
            self.hub
                .cluster
                .redis_up
                .store(self.redis.is_up(), Ordering::Relaxed);
            if let Some(e) = self.redis.last_error() {
                *self
                    .hub
                    .cluster
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        }
    }

    /// Show the bot's shared session-start budget (every daemon spends it)
    /// in this daemon's `health`, `status` and metrics.
    async fn mirror_budget(&self) {
        if let Ok(Some((remaining, total, resets_at_ms))) = self.redis.budget().await {
            let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
            budget.remaining = remaining;
            budget.total = total;
            budget.resets_at_ms = resets_at_ms;
        }
    }

    /// Renew the leases due, all at once; stop shards whose lease is gone
    /// or would expire before another attempt could succeed.
    async fn renew(&mut self) {
        let due: Vec<(u32, u64)> = self
            .held
            .iter()
            .filter(|(_, h)| h.renewed_at.elapsed() >= self.renew_every())
            .map(|(&s, h)| (s, h.fence))
            .collect();
        let sent_at = Instant::now();
        let results = futures::future::join_all(
            due.iter()
                .map(|&(shard, fence)| self.redis.renew_shard(shard, fence, self.ttl)),
        )
        .await;
        for (&(shard, _), result) in due.iter().zip(results) {
            match result {
                Ok(true) => {
                    if let Some(h) = self.held.get_mut(&shard) {
                        h.renewed_at = sent_at;
                    }
                    self.hub.cluster.renewals.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => self.lose(
                    shard,
                    "its lease is held by another daemon now (it expired unrenewed)",
                ),
                Err(_) => {}
            }
        }
        let give_up = self.give_up_after();
        let expiring: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.renewed_at.elapsed() >= give_up)
            .map(|(&s, _)| s)
            .collect();
        for shard in expiring {
            let why = format!(
                "its lease could not be renewed for {} ms (Redis: {}) and expires in {} ms; stopping the shard first so it never runs twice (its session stays resumable for whoever takes it)",
                give_up.as_millis(),
                self.redis
                    .last_error()
                    .unwrap_or_else(|| "no answer".into()),
                (self.ttl - give_up).as_millis()
            );
            self.lose(shard, &why);
        }
    }

    fn lose(&mut self, shard: u32, why: &str) {
        if self.held.remove(&shard).is_none() {
            return;
        }
        if let Some(stats) = self.hub.shard_stats(shard) {
            stats.owned.store(false, Ordering::Relaxed);
            stats.fence.store(0, Ordering::Relaxed);
        }
        self.hub.cluster.lost.fetch_add(1, Ordering::Relaxed);
        tracing::error!(shard, event = %"lease_lost", "shard {shard}: {why}");
        let _ = self.events.send(LeaseEvent::Lost { shard });
    }

    /// Take free leases, a few per round (a sixteenth of the shards, at
    /// least 4), starting at a random candidate so daemons starting together
    /// spread the shards between them.
    /// `true` when the round took as many as a round may.
    async fn claim(&mut self) -> bool {
        if self.held.len() >= self.max || self.candidates.is_empty() {
            return false;
        }
        let per_round = (self.candidates.len() / 16).max(4);
        let start = rand::random_range(0..self.candidates.len());
        let mut claimed = 0;
        let mut attempts = 0;
        for i in 0..self.candidates.len() {
            if claimed >= per_round
                || self.held.len() >= self.max
                || attempts >= CLAIM_ATTEMPTS_PER_ROUND
            {
                break;
            }
            let shard = self.candidates[(start + i) % self.candidates.len()];
            if self.held.contains_key(&shard) {
                continue;
            }
            attempts += 1;
            let sent_at = Instant::now();
            let fence = match self.redis.claim_shard(shard, self.ttl).await {
                Ok(Some(fence)) => fence,
                Ok(None) => continue,
                Err(_) => return false,
            };
            let stored = match self.redis.load_session(shard).await {
                Ok(stored) => stored,
                // Unknown whether a session waits: give the lease back
                // rather than identify over one.
                Err(_) => {
                    let _ = self.redis.release_shard(shard, fence).await;
                    return false;
                }
            };
            claimed += 1;
            self.hub.cluster.claims.fetch_add(1, Ordering::Relaxed);
            let fresh = stored.filter(|s| {
                crate::clock::unix_millis().saturating_sub(s.saved_at_ms)
                    <= self.resume_window.as_millis() as u64
            });
            let takeover = fresh.as_ref().is_some_and(|s| s.owner != self.redis.name);
            if takeover {
                self.hub.cluster.takeovers.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(
                shard,
                event = %if takeover { "shard_takeover" } else { "lease_claimed" },
                fence,
                previous_owner = fresh.as_ref().map(|s| s.owner.as_str()).unwrap_or("-"),
                resume_seq = fresh.as_ref().map(|s| s.seq),
                "shard {shard}: lease taken (fence {fence}); {}",
                match &fresh {
                    Some(s) => format!("resuming session from seq {} left by {}", s.seq, s.owner),
                    None => "no fresh session in Redis: it will identify".to_string(),
                }
            );
            self.held.insert(
                shard,
                Held {
                    fence,
                    renewed_at: sent_at,
                    saved: fresh.as_ref().map(|s| (s.session_id.clone(), s.seq)),
                },
            );
            if let Some(stats) = self.hub.shard_stats(shard) {
                // What this daemon knew of the shard from an earlier lease
                // is stale now: the session to save is the one taken over.
                stats.set_session(match &fresh {
                    Some(s) => crate::hub::SessionInfo {
                        session_id: Some(s.session_id.clone()),
                        resume_url: Some(s.resume_url.clone()),
                        started: None,
                    },
                    None => crate::hub::SessionInfo::default(),
                });
                stats
                    .seq
                    .store(fresh.as_ref().map_or(0, |s| s.seq), Ordering::Relaxed);
                stats.fence.store(fence, Ordering::Relaxed);
                stats.owned.store(true, Ordering::Relaxed);
            }
            let _ = self.events.send(LeaseEvent::Claimed {
                shard,
                fence,
                resume: fresh.map(|s| ResumeState {
                    session_id: s.session_id,
                    resume_url: s.resume_url,
                    seq: s.seq,
                }),
            });
        }
        claimed >= per_round
    }

    /// The held shards' live sessions, each at the seq a successor resumes
    /// from: [`crate::persist::sessions_to_save`]'s rule (the lowest of the
    /// bots' acks and the JetStream sink's stored position), so a takeover
    /// has Discord replay what was received but not yet published.
    fn live_sessions(
        &self,
        exits: Option<&[(u32, ResumeState)]>,
    ) -> Vec<(u32, Option<StoredSession>)> {
        let mut live = Vec::new();
        let mut none = Vec::new();
        for &shard in self.held.keys() {
            let from_exit =
                exits.and_then(|e| e.iter().find(|(s, _)| *s == shard).map(|(_, r)| r.clone()));
            let resume = from_exit.or_else(|| {
                let stats = self.hub.shard_stats(shard)?;
                let info = stats.session();
                Some(ResumeState {
                    session_id: info.session_id?,
                    resume_url: info.resume_url?,
                    seq: stats.seq.load(Ordering::Relaxed),
                })
            });
            match resume {
                Some(r) => live.push((shard, r)),
                None => none.push(shard),
            }
        }
        let (_, sessions) = crate::persist::sessions_to_save(&self.hub, live);
        let now = crate::clock::unix_millis();
        let mut out: Vec<(u32, Option<StoredSession>)> = sessions
            .into_iter()
            .filter_map(|s| {
                let fence = self.held.get(&s.shard)?.fence;
                Some((
                    s.shard,
                    Some(StoredSession {
                        session_id: s.session_id,
                        resume_url: s.resume_url,
                        seq: s.seq,
                        owner: self.redis.name.clone(),
                        fence,
                        saved_at_ms: now,
                    }),
                ))
            })
            .collect();
        out.extend(none.into_iter().map(|s| (s, None)));
        out
    }

    /// Write the sessions that changed since the last write.
    async fn save(&mut self) {
        self.save_changed(false).await;
    }

    /// Write the sessions that changed since the last write; with
    /// `new_only`, only those whose session itself changed (started or
    /// ended), not just its seq.
    async fn save_changed(&mut self, new_only: bool) {
        let changed: Vec<(u32, u64, Option<StoredSession>)> = self
            .live_sessions(None)
            .into_iter()
            .filter_map(|(shard, session)| {
                let held = self.held.get(&shard)?;
                let key = session.as_ref().map(|s| (s.session_id.clone(), s.seq));
                let id_changed = key.as_ref().map(|k| &k.0) != held.saved.as_ref().map(|k| &k.0);
                (key != held.saved && (id_changed || !new_only))
                    .then_some((shard, held.fence, session))
            })
            .collect();
        self.write(changed).await;
    }

    async fn write(&mut self, sessions: Vec<(u32, u64, Option<StoredSession>)>) {
        let keep = self.resume_window.max(self.ttl * 2);
        let results =
            futures::future::join_all(sessions.iter().map(|(shard, fence, s)| {
                self.redis.save_session(*shard, *fence, s.as_ref(), keep)
            }))
            .await;
        for ((shard, _, session), result) in sessions.into_iter().zip(results) {
            match result {
                Ok(true) => {
                    self.hub
                        .cluster
                        .sessions_saved
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(h) = self.held.get_mut(&shard) {
                        h.saved = session.map(|s| (s.session_id, s.seq));
                    }
                }
                Ok(false) => self.lose(
                    shard,
                    "the session write was refused: the lease holds another fencing token",
                ),
                Err(_) => {}
            }
        }
    }

    /// At shutdown, after the shards stopped: write their final sessions
    /// (fenced) and give the leases up, so another daemon resumes them
    /// without waiting for the leases to expire.
    pub async fn finish(mut self, exits: &[(u32, ResumeState)]) {
        let sessions: Vec<(u32, u64, Option<StoredSession>)> = self
            .live_sessions(Some(exits))
            .into_iter()
            .filter_map(|(shard, s)| Some((shard, self.held.get(&shard)?.fence, s)))
            .collect();
        self.write(sessions).await;
        let held: Vec<(u32, u64)> = self.held.iter().map(|(&s, h)| (s, h.fence)).collect();
        for (shard, fence) in held {
            match self.redis.release_shard(shard, fence).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(shard, error = %e, "cannot release the lease; it expires by itself within lease_ttl")
                }
            }
            if let Some(stats) = self.hub.shard_stats(shard) {
                stats.owned.store(false, Ordering::Relaxed);
            }
        }
        tracing::info!(
            leases = self.held.len(),
            "sessions written to Redis and leases released"
        );
    }
}
