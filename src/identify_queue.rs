//! The identify queue: IDENTIFY pacing and the session-start budget
//! (facts §5.2). Bucket `shard_id % max_concurrency`, one IDENTIFY per bucket
//! per 5 s, buckets in parallel, waiters served in arrival order (tokio's
//! mutex is fair), so shards started in order identify in order. RESUME never
//! comes here: it costs no budget and needs no pacing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Mutex;
use tokio::time::{Duration, Instant};

use crate::hub::{Hub, SessionReport};

/// Discord's identify window per bucket.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);

/// Paces IDENTIFYs and guards the daily session-start budget.
pub struct IdentifyQueue {
    /// Last IDENTIFY per rate-limit bucket.
    buckets: Vec<Mutex<Option<Instant>>>,
    /// Identifies never spent.
    reserve: u32,
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
                .map(|_| Mutex::new(None))
                .collect(),
            reserve,
            stretch_percent: AtomicU32::new(100),
            hub,
        }
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

    /// Wait for `shard`'s turn to IDENTIFY and take one session start from
    /// the budget. While the budget is at the reserve, reports a `fatal`
    /// session (once per window) and waits for the reset instead of spending.
    pub async fn acquire(&self, shard: u32) {
        let bucket = &self.buckets[shard as usize % self.buckets.len()];
        let mut last = bucket.lock().await;
        loop {
            if let Some(at) = *last {
                tokio::time::sleep_until(at + self.interval()).await;
            }
            match self.take_budget() {
                Ok(()) => break,
                Err(wait) => {
                    let budget = *self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
                    let mut report = SessionReport::new(shard, "fatal");
                    report.detail = Some(format!(
                        "identify budget at the reserve: {} of {} session starts left, identify_reserve = {}; not identifying until the window resets at {} (in {} s). Check for a crash loop or restarts that identify instead of resuming.",
                        budget.remaining,
                        budget.total,
                        self.reserve,
                        crate::clock::rfc3339_millis(budget.resets_at_ms),
                        wait.as_secs()
                    ));
                    tracing::error!(
                        shard,
                        event = "fatal",
                        class = "identify_budget",
                        remaining = budget.remaining,
                        total = budget.total,
                        reserve = self.reserve,
                        reset_in_s = wait.as_secs(),
                        "identify budget exhausted down to the reserve; waiting for the reset instead of identifying"
                    );
                    self.hub.report(&report);
                    tokio::time::sleep(wait).await;
                    self.refill();
                }
            }
        }
        *last = Some(Instant::now());
    }

    /// Spend one identify, or say how long until the window resets.
    fn take_budget(&self) -> Result<(), Duration> {
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        if budget.total == 0 {
            // Budget unknown (no /gateway/bot yet): do not block.
            return Ok(());
        }
        if budget.remaining > self.reserve {
            budget.remaining -= 1;
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
