//! The identify queue: IDENTIFY pacing and the session-start budget
//! (facts §5.2). Bucket `shard_id % max_concurrency`, one IDENTIFY per bucket
//! per 5 s, buckets in parallel, waiters served in arrival order (tokio's
//! mutex is fair), so shards started in order identify in order. RESUME never
//! comes here: it costs no budget and needs no pacing.
//!
//! The 5 s are measured from when the IDENTIFY frame actually went out (the
//! shard holds an [`IdentifyPermit`] through connect and HELLO, then marks it
//! sent), not from when the turn was granted: Discord sees frames, and a slow
//! first connect followed by a fast second one would otherwise land two
//! IDENTIFYs closer than 5 s and earn an op 9.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use tokio::time::{Duration, Instant};

use crate::hub::{Hub, SessionReport};

/// Discord's identify window per bucket.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);

/// Safety margin on top of the window, for jitter between our clock and
/// Discord's view of frame arrival.
const MARGIN: Duration = Duration::from_millis(20);

/// How often a budget wait is reported again.
const BUDGET_REMINDER: Duration = Duration::from_secs(300);

/// Paces IDENTIFYs and guards the daily session-start budget.
pub struct IdentifyQueue {
    /// Last IDENTIFY sent per rate-limit bucket.
    buckets: Vec<Arc<Mutex<Option<Instant>>>>,
    /// Last IDENTIFY sent per bucket, as unix ms (0 = never), for the state
    /// file: the 5 s spacing must hold across daemon restarts too.
    sent_ms: Arc<[AtomicU64]>,
    /// Woken whenever an IDENTIFY goes out (the persister saves its time).
    identified: Arc<Notify>,
    /// Identifies never spent (changeable on SIGHUP).
    reserve: AtomicU32,
    /// Pacing multiplier in percent (100 = Discord's limit); raised during a
    /// suspected Discord incident so re-identifies do not burn budget.
    stretch_percent: AtomicU32,
    hub: Arc<Hub>,
}

impl IdentifyQueue {
    /// A queue with `max_concurrency` buckets drawing on `hub.budget`.
    pub fn new(max_concurrency: u32, reserve: u32, hub: Arc<Hub>) -> Self {
        IdentifyQueue {
            buckets: (0..max_concurrency.max(1))
                .map(|_| Arc::new(Mutex::new(None)))
                .collect(),
            sent_ms: (0..max_concurrency.max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
            identified: Arc::new(Notify::new()),
            reserve: AtomicU32::new(reserve),
            stretch_percent: AtomicU32::new(100),
            hub,
        }
    }

    /// Start from the IDENTIFY times an earlier daemon life saved, so no
    /// bucket identifies within 5 s of its last IDENTIFY before a restart.
    /// With a different `max_concurrency` the buckets do not line up, so
    /// every bucket waits for the latest saved one. Call before any shard
    /// acquires a turn.
    pub fn restore(&self, saved: &crate::state::IdentifyTimes) {
        let same = saved.max_concurrency as usize == self.buckets.len()
            && saved.sent_ms.len() == self.buckets.len();
        let now_ms = crate::clock::unix_millis();
        let now = Instant::now();
        for (i, bucket) in self.buckets.iter().enumerate() {
            let at_ms = if same {
                saved.sent_ms[i]
            } else {
                saved.latest_ms()
            };
            if at_ms == 0 {
                continue;
            }
            self.sent_ms[i].store(at_ms, Ordering::Relaxed);
            // A clock that went backwards counts as "just now".
            let age = Duration::from_millis(now_ms.saturating_sub(at_ms));
            if age < IDENTIFY_INTERVAL * 4
                && let Ok(mut last) = bucket.try_lock()
            {
                *last = Some(now.checked_sub(age).unwrap_or(now));
            }
        }
    }

    /// Each bucket's last IDENTIFY, for the state file.
    pub fn times(&self) -> crate::state::IdentifyTimes {
        crate::state::IdentifyTimes {
            max_concurrency: self.buckets.len() as u32,
            sent_ms: self
                .sent_ms
                .iter()
                .map(|t| t.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// Notified whenever an IDENTIFY goes out.
    pub fn identified(&self) -> Arc<Notify> {
        self.identified.clone()
    }

    /// Change the reserve (SIGHUP reload).
    pub fn set_reserve(&self, reserve: u32) {
        self.reserve.store(reserve, Ordering::Relaxed);
    }

    /// Slow re-identifies down (`percent` > 100) or back to normal (100).
    pub fn set_stretch(&self, percent: u32) {
        self.stretch_percent
            .store(percent.max(100), Ordering::Relaxed);
    }

    /// Current pacing interval per bucket.
    pub fn interval(&self) -> Duration {
        IDENTIFY_INTERVAL * self.stretch_percent.load(Ordering::Relaxed) / 100
    }

    /// Wait for `shard`'s turn to IDENTIFY. While the budget is at the
    /// reserve, reports a `fatal` session and waits for the reset instead of
    /// spending. The bucket stays taken until the permit is marked sent (or
    /// dropped, when the connection failed before IDENTIFY).
    pub async fn acquire(&self, shard: u32) -> IdentifyPermit {
        let index = shard as usize % self.buckets.len();
        let bucket = self.buckets[index].clone();
        let last = bucket.lock_owned().await;
        loop {
            if let Some(at) = *last {
                tokio::time::sleep_until(at + self.interval() + MARGIN).await;
            }
            match self.check_budget() {
                Ok(()) => break,
                Err(wait) => {
                    let reset = Instant::now() + wait;
                    // Say it again every few minutes while waiting, so the
                    // log and late-joining bots keep seeing why.
                    loop {
                        let left = reset.saturating_duration_since(Instant::now());
                        self.report_exhausted(shard, left);
                        if left <= BUDGET_REMINDER {
                            tokio::time::sleep(left).await;
                            break;
                        }
                        tokio::time::sleep(BUDGET_REMINDER).await;
                    }
                    self.refill();
                }
            }
        }
        IdentifyPermit {
            last,
            hub: self.hub.clone(),
            sent_ms: self.sent_ms.clone(),
            index,
            identified: self.identified.clone(),
        }
    }

    fn report_exhausted(&self, shard: u32, left: Duration) {
        // "fatal" in the protocol's sense: the shard cannot run until the
        // reset (it resumes on its own then).
        if let Some(stats) = self.hub.shard(shard) {
            stats.set_state(crate::hub::ShardState::Fatal);
        }
        let budget = *self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = SessionReport::new(shard, "fatal");
        report.detail = Some(format!(
            "identify budget at the reserve: {} of {} session starts left, identify_reserve = {}; not identifying until the window resets at {} (in {} s). Check for a crash loop or restarts that identify instead of resuming.",
            budget.remaining,
            budget.total,
            self.reserve.load(Ordering::Relaxed),
            crate::clock::rfc3339_millis(budget.resets_at_ms),
            left.as_secs()
        ));
        tracing::error!(
            shard,
            event = %"fatal",
            class = %"identify_budget",
            remaining = budget.remaining,
            total = budget.total,
            reserve = self.reserve.load(Ordering::Relaxed),
            reset_in_s = left.as_secs(),
            "identify budget exhausted down to the reserve; waiting for the reset instead of identifying"
        );
        self.hub.report(&report);
    }

    /// May one more identify be spent, or how long until the window resets.
    fn check_budget(&self) -> Result<(), Duration> {
        let budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        if budget.total == 0 || budget.remaining > self.reserve.load(Ordering::Relaxed) {
            // total 0: budget unknown (no /gateway/bot yet), do not block.
            return Ok(());
        }
        let now = crate::clock::unix_millis();
        let wait_ms = budget.resets_at_ms.saturating_sub(now).max(1000);
        Err(Duration::from_millis(wait_ms))
    }

    /// The window has reset (we slept until `reset_after`): Discord gives a
    /// full budget again. The supervisor's next `/gateway/bot` refresh
    /// corrects this if Discord says otherwise.
    fn refill(&self) {
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.remaining = budget.total;
        budget.resets_at_ms = crate::clock::unix_millis() + 24 * 3600 * 1000;
    }
}

/// A shard's turn to IDENTIFY in its bucket.
pub struct IdentifyPermit {
    last: OwnedMutexGuard<Option<Instant>>,
    hub: Arc<Hub>,
    sent_ms: Arc<[AtomicU64]>,
    index: usize,
    identified: Arc<Notify>,
}

impl IdentifyPermit {
    /// The IDENTIFY frame went out now: start the bucket's 5 s and spend one
    /// session start.
    pub fn sent(mut self) {
        *self.last = Some(Instant::now());
        self.sent_ms[self.index].store(crate::clock::unix_millis(), Ordering::Relaxed);
        self.identified.notify_one();
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.remaining = budget.remaining.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::EventLog;
    use crate::hub::IdentifyBudget;
    use std::collections::HashMap;

    fn hub(remaining: u32, total: u32, reset_in_ms: u64) -> Arc<Hub> {
        Arc::new(Hub::new(
            EventLog::new(1, 1 << 20),
            &[],
            4,
            Vec::new(),
            HashMap::new(),
            IdentifyBudget {
                remaining,
                total,
                resets_at_ms: crate::clock::unix_millis() + reset_in_ms,
                max_concurrency: 2,
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn one_identify_per_bucket_per_five_seconds_buckets_in_parallel() {
        let queue = Arc::new(IdentifyQueue::new(2, 0, hub(1000, 1000, 86_400_000)));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for shard in 0..6u32 {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let permit = queue.acquire(shard).await;
                let at = Instant::now().duration_since(start);
                permit.sent();
                (shard, at)
            }));
            // Shards are started in order.
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.expect("task"));
        }
        let secs: Vec<(u32, u64)> = got.iter().map(|&(s, d)| (s, d.as_secs())).collect();
        assert_eq!(secs, vec![(0, 0), (1, 0), (2, 5), (3, 5), (4, 10), (5, 10)]);
        let budget = *queue.hub.budget.lock().unwrap();
        assert_eq!(
            budget.remaining, 994,
            "each identify spends one session start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_counts_from_the_identify_sent_not_the_turn_granted() {
        let queue = IdentifyQueue::new(1, 0, hub(1000, 1000, 86_400_000));
        let start = Instant::now();
        let permit = queue.acquire(0).await;
        // A slow connect: IDENTIFY goes out 3 s after the turn was granted.
        tokio::time::sleep(Duration::from_secs(3)).await;
        permit.sent();
        queue.acquire(0).await.sent();
        assert_eq!(Instant::now().duration_since(start).as_secs(), 8);
        // A connect that failed before IDENTIFY spends neither time nor budget.
        let before = Instant::now();
        drop(queue.acquire(0).await);
        assert_eq!(Instant::now().duration_since(before).as_secs(), 5);
        queue.acquire(0).await.sent();
        assert_eq!(Instant::now().duration_since(before).as_secs(), 5);
        assert_eq!(queue.hub.budget.lock().unwrap().remaining, 997);
    }

    #[tokio::test(start_paused = true)]
    async fn spacing_holds_across_restarts() {
        let saved_ms = crate::clock::unix_millis() - 2000;
        let before_restart = crate::state::IdentifyTimes {
            max_concurrency: 2,
            sent_ms: vec![saved_ms, 0],
        };
        let queue = IdentifyQueue::new(2, 0, hub(1000, 1000, 86_400_000));
        queue.restore(&before_restart);
        let start = Instant::now();
        queue.acquire(1).await.sent();
        assert!(Instant::now().duration_since(start) < Duration::from_millis(1));
        queue.acquire(0).await.sent();
        let waited = Instant::now().duration_since(start);
        assert!(
            waited >= Duration::from_millis(2900) && waited <= Duration::from_millis(3100),
            "bucket 0 waits out the 5 s from its IDENTIFY before the restart: {waited:?}"
        );
        let times = queue.times();
        assert_eq!(times.max_concurrency, 2);
        assert!(times.sent_ms.iter().all(|&t| t > saved_ms));

        // Another max_concurrency: buckets do not line up, so all wait.
        let queue = IdentifyQueue::new(4, 0, hub(1000, 1000, 86_400_000));
        queue.restore(&before_restart);
        let start = Instant::now();
        queue.acquire(3).await.sent();
        assert!(Instant::now().duration_since(start) >= Duration::from_millis(2900));
    }

    #[tokio::test(start_paused = true)]
    async fn stretch_slows_reidentifies() {
        let queue = IdentifyQueue::new(1, 0, hub(1000, 1000, 86_400_000));
        queue.set_stretch(300);
        let start = Instant::now();
        queue.acquire(0).await.sent();
        queue.acquire(0).await.sent();
        assert_eq!(Instant::now().duration_since(start).as_secs(), 15);
        queue.set_stretch(100);
        queue.acquire(0).await.sent();
        assert_eq!(Instant::now().duration_since(start).as_secs(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_at_reserve_reports_fatal_and_waits_for_the_reset() {
        let hub = hub(25, 1000, 3_600_000);
        let mut sessions = hub.sessions.subscribe();
        let queue = Arc::new(IdentifyQueue::new(1, 25, hub.clone()));
        let start = Instant::now();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(7).await.sent() }
        });
        let line = sessions.recv().await.expect("fatal report");
        let report: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(report["event"], "fatal");
        assert_eq!(report["shard"], 7);
        let detail = report["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("25 of 1000"), "{detail}");
        assert!(detail.contains("resets at"), "{detail}");
        assert!(!waiter.is_finished());
        waiter.await.expect("identifies after the reset");
        let waited = Instant::now().duration_since(start);
        assert!(waited >= Duration::from_secs(3599), "waited {waited:?}");
        assert_eq!(hub.budget.lock().unwrap().remaining, 999);
    }
}
