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
//!
//! The budget, by contrast, is taken when the turn is granted: checking at
//! the turn and spending at the frame would let shards of different buckets
//! all pass the `identify_reserve` check before any of them spends. A permit
//! dropped without sending (the connection failed before IDENTIFY) gives its
//! session start back.
//!
//! The figures come from Discord, not from a local count: `/gateway/bot` is
//! re-read periodically, before identifying when the last reading is old,
//! and when a budget window ends, instead of assuming a full budget at
//! `reset_after` (facts §1.1: its values must not be cached for long).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::{Mutex, Notify, OwnedMutexGuard, watch};
use tokio::time::{Duration, Instant};

use crate::hub::{Hub, SessionReport};
use crate::rest::GatewayBot;

/// Discord's identify window per bucket.
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);

/// Safety margin on top of the window, for jitter between our clock and
/// Discord's view of frame arrival.
const MARGIN: Duration = Duration::from_millis(20);

/// How often a budget wait is reported again.
const BUDGET_REMINDER: Duration = Duration::from_secs(300);

/// Figures older than this are re-read before the next IDENTIFY.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// How often the supervisor re-reads `/gateway/bot` in any case.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);

/// Longest wait for one `/gateway/bot` answer before identifying anyway on
/// the figures held.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// After a window ended and `/gateway/bot` could not be read, try again this
/// soon (never assume a refill).
const RETRY_AFTER_FAILED_REFRESH: Duration = Duration::from_secs(60);

/// Where fresh `/gateway/bot` figures come from (the REST client; tests
/// substitute a script).
pub trait GatewayBotSource: Send + Sync {
    /// One `GET /gateway/bot`.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<GatewayBot, String>> + Send + '_>>;
}

/// One rate-limit bucket: when its last IDENTIFY went out.
type Bucket = Arc<Mutex<Option<Instant>>>;

/// Paces IDENTIFYs and guards the daily session-start budget.
pub struct IdentifyQueue {
    /// Last IDENTIFY sent per rate-limit bucket (replaced whole when
    /// Discord changes `max_concurrency`).
    buckets: RwLock<Vec<Bucket>>,
    /// Last IDENTIFY sent per bucket, as unix ms (0 = never), for the state
    /// file: the 5 s spacing must hold across daemon restarts too.
    sent_ms: Arc<std::sync::Mutex<Vec<u64>>>,
    /// Woken whenever an IDENTIFY goes out (the persister saves its time).
    identified: Arc<Notify>,
    /// Identifies never spent (changeable on SIGHUP).
    reserve: AtomicU32,
    /// Pacing multiplier in percent (100 = Discord's limit); raised during a
    /// suspected Discord incident so re-identifies do not burn budget.
    stretch_percent: AtomicU32,
    /// Session starts taken by granted turns whose IDENTIFY has not gone out
    /// yet (Discord does not count them yet). Changed under `hub.budget`.
    reserved: Arc<AtomicU32>,
    /// `/gateway/bot`, once the supervisor attaches it.
    source: OnceLock<Arc<dyn GatewayBotSource>>,
    /// When `/gateway/bot` was last asked (answered or not, so an outage
    /// costs each IDENTIFY at most one slow request per [`STALE_AFTER`]);
    /// one request at a time.
    refreshed: Mutex<Option<Instant>>,
    /// Discord's recommended shard count as last read.
    recommended_shards: AtomicU32,
    /// With `[cluster]`: the Redis side, shared by every daemon of the bot
    /// (bucket turns and the session-start budget).
    cluster: OnceLock<Arc<crate::cluster::coord::Redis>>,
    hub: Arc<Hub>,
}

/// How a re-read of `/gateway/bot` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Discord's figures are in use now.
    Applied,
    /// Asked recently enough; not asked again.
    Recent,
    /// No source attached (embedded use, tests).
    NoSource,
    /// The request failed; the figures held are unchanged.
    Failed,
}

impl IdentifyQueue {
    /// A queue with `max_concurrency` buckets drawing on `hub.budget`.
    pub fn new(max_concurrency: u32, reserve: u32, hub: Arc<Hub>) -> Self {
        IdentifyQueue {
            buckets: RwLock::new(new_buckets(max_concurrency, None)),
            sent_ms: Arc::new(std::sync::Mutex::new(vec![
                0;
                max_concurrency.max(1) as usize
            ])),
            identified: Arc::new(Notify::new()),
            reserve: AtomicU32::new(reserve),
            stretch_percent: AtomicU32::new(100),
            reserved: Arc::new(AtomicU32::new(0)),
            source: OnceLock::new(),
            refreshed: Mutex::new(None),
            recommended_shards: AtomicU32::new(0),
            cluster: OnceLock::new(),
            hub,
        }
    }

    /// Start from the IDENTIFY times an earlier daemon life saved, so no
    /// bucket identifies within 5 s of its last IDENTIFY before a restart.
    /// With a different `max_concurrency` the buckets do not line up, so
    /// every bucket waits for the latest saved one. Call before any shard
    /// acquires a turn.
    pub fn restore(&self, saved: &crate::state::IdentifyTimes) {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        let mut sent_ms = self.sent_ms.lock().unwrap_or_else(|p| p.into_inner());
        let same =
            saved.max_concurrency as usize == buckets.len() && saved.sent_ms.len() == buckets.len();
        let now_ms = crate::clock::unix_millis();
        let now = Instant::now();
        for (i, bucket) in buckets.iter().enumerate() {
            let at_ms = if same {
                saved.sent_ms[i]
            } else {
                saved.latest_ms()
            };
            if at_ms == 0 {
                continue;
            }
            sent_ms[i] = at_ms;
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
        let sent_ms = self
            .sent_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        crate::state::IdentifyTimes {
            max_concurrency: sent_ms.len() as u32,
            sent_ms,
        }
    }

    /// Notified whenever an IDENTIFY goes out.
    pub fn identified(&self) -> Arc<Notify> {
        self.identified.clone()
    }

    /// Re-read `/gateway/bot` from `source` from now on; `current` is the
    /// answer the budget was just seeded from.
    pub fn set_source(&self, source: Arc<dyn GatewayBotSource>, current: &GatewayBot) {
        self.recommended_shards
            .store(current.shards, Ordering::Relaxed);
        if let Ok(mut refreshed) = self.refreshed.try_lock() {
            *refreshed = Some(Instant::now());
        }
        let _ = self.source.set(source);
    }

    /// Share turns and the budget with every daemon through Redis from now
    /// on (`[cluster]`): a turn then also holds the bucket's Redis lease, and
    /// the session start is spent from Redis's counter.
    pub fn set_cluster(&self, redis: Arc<crate::cluster::coord::Redis>) {
        let _ = self.cluster.set(redis);
    }

    /// The bucket's Redis lease and one session start from Redis's counter.
    /// Waits (and says why) while Redis does not answer: never an IDENTIFY
    /// without the lease. `Err(wait)` at the reserve.
    async fn cluster_turn(
        &self,
        redis: &Arc<crate::cluster::coord::Redis>,
        shard: u32,
        bucket: u32,
    ) -> Result<ClusterTurn, Duration> {
        use crate::cluster::coord::Reserve;
        let mut said: Option<Instant> = None;
        let mut say = |why: &str| {
            if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                said = Some(Instant::now());
                tracing::warn!(shard, bucket, event = %"identify_waiting", "shard {shard} waits to identify: {why}; it never identifies without its bucket's Redis lease");
            }
        };
        loop {
            let token = match redis.take_turn(bucket, CLUSTER_TURN_HOLD).await {
                Ok(Some(token)) => token,
                Ok(None) => {
                    tokio::time::sleep(CLUSTER_POLL).await;
                    continue;
                }
                Err(e) => {
                    say(&format!("Redis does not answer ({e})"));
                    tokio::time::sleep(CLUSTER_RETRY).await;
                    continue;
                }
            };
            let mut figures_read = false;
            loop {
                match redis
                    .reserve_start(
                        self.reserve.load(Ordering::Relaxed),
                        &token,
                        CLUSTER_TURN_HOLD,
                    )
                    .await
                {
                    Ok(Reserve::Spent { remaining, total }) => {
                        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
                        budget.remaining = remaining;
                        budget.total = total;
                        return Ok(ClusterTurn {
                            redis: redis.clone(),
                            bucket,
                            token,
                            window: self.interval() + MARGIN,
                        });
                    }
                    Ok(Reserve::AtReserve {
                        remaining,
                        resets_at_ms,
                    }) => {
                        let _ = redis.turn_abandoned(bucket, &token).await;
                        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
                        budget.remaining = remaining;
                        budget.resets_at_ms = resets_at_ms;
                        let now = crate::clock::unix_millis();
                        return Err(Duration::from_millis(
                            resets_at_ms.saturating_sub(now).max(1000),
                        ));
                    }
                    Ok(Reserve::NeedFigures) if !figures_read => {
                        figures_read = true;
                        if self.refresh().await != Refresh::Applied {
                            // No fresh figures from Discord: seed Redis from
                            // the last ones this daemon read.
                            let budget = *self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
                            let _ = redis
                                .reconcile(budget.remaining, budget.total, budget.resets_at_ms)
                                .await;
                        }
                    }
                    Ok(Reserve::NeedFigures) => {
                        let _ = redis.turn_abandoned(bucket, &token).await;
                        say("no session-start figures in Redis yet (re-reading /gateway/bot)");
                        tokio::time::sleep(CLUSTER_RETRY).await;
                        break;
                    }
                    Err(e) => {
                        let _ = redis.turn_abandoned(bucket, &token).await;
                        say(&format!("Redis does not answer ({e})"));
                        tokio::time::sleep(CLUSTER_RETRY).await;
                        break;
                    }
                }
            }
        }
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

    /// The bucket `shard` identifies in (`shard % max_concurrency`).
    fn bucket(&self, shard: u32) -> Bucket {
        self.bucket_at(shard).1
    }

    /// `shard`'s bucket and its index, read together (a change of
    /// `max_concurrency` replaces the buckets).
    fn bucket_at(&self, shard: u32) -> (usize, Bucket) {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        let index = shard as usize % buckets.len();
        (index, buckets[index].clone())
    }

    /// How long until `shard`'s bucket could next grant a turn, and whether
    /// another turn holds it right now (then the wait is at least one more
    /// interval after that IDENTIFY goes out). For log lines that name the
    /// real wait before an IDENTIFY.
    pub fn next_turn_in(&self, shard: u32) -> (Duration, bool) {
        let bucket = self.bucket(shard);
        let next = match bucket.try_lock() {
            Ok(last) => match *last {
                Some(at) => {
                    (at + self.interval() + MARGIN).saturating_duration_since(Instant::now())
                }
                None => Duration::ZERO,
            },
            Err(_) => return (self.interval() + MARGIN, true),
        };
        (next, false)
    }

    /// Wait for `shard`'s turn to IDENTIFY and take one session start for
    /// it. While the budget is at the reserve, reports a `fatal` session and
    /// waits for the window to reset (then re-reads Discord's figures)
    /// instead of spending. The bucket stays taken until the permit is
    /// marked sent; a permit dropped unsent gives its session start back.
    pub async fn acquire(&self, shard: u32) -> IdentifyPermit {
        let (index, bucket) = self.bucket_at(shard);
        let last = bucket.lock_owned().await;
        loop {
            if let Some(at) = *last {
                tokio::time::sleep_until(at + self.interval() + MARGIN).await;
            }
            // After a long pause our figures may be far from Discord's.
            self.refresh_if_older_than(STALE_AFTER).await;
            let granted = match self.cluster.get() {
                // Redis holds the bot's budget: its counter is spent instead.
                Some(redis) => self
                    .cluster_turn(redis, shard, index as u32)
                    .await
                    .map(|turn| (false, Some(turn))),
                None => self.reserve_start().map(|reserved| (reserved, None)),
            };
            match granted {
                Ok((reserved, cluster)) => {
                    return IdentifyPermit {
                        last,
                        reserved: reserved.then(|| self.reserved.clone()),
                        hub: self.hub.clone(),
                        sent_ms: self.sent_ms.clone(),
                        index,
                        identified: self.identified.clone(),
                        cluster,
                    };
                }
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
                    match self.refresh().await {
                        Refresh::Applied | Refresh::Recent => {}
                        // Embedded without a source: the window has reset.
                        Refresh::NoSource => self.refill(),
                        Refresh::Failed => {
                            let mut budget =
                                self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
                            budget.resets_at_ms = crate::clock::unix_millis()
                                + RETRY_AFTER_FAILED_REFRESH.as_millis() as u64;
                        }
                    }
                }
            }
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

    /// Take one session start if the budget is above the reserve: `Ok(true)`
    /// when one was taken, `Ok(false)` when the budget is unknown (no
    /// `/gateway/bot` yet: nothing to guard), or how long until the window
    /// resets. Check and take happen under one lock, so shards of different
    /// buckets can never pass the check together on the same last start.
    fn reserve_start(&self) -> Result<bool, Duration> {
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        if budget.total == 0 {
            return Ok(false);
        }
        if budget.remaining > self.reserve.load(Ordering::Relaxed) {
            budget.remaining -= 1;
            self.reserved.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        let now = crate::clock::unix_millis();
        let wait_ms = budget.resets_at_ms.saturating_sub(now).max(1000);
        Err(Duration::from_millis(wait_ms))
    }

    /// No `/gateway/bot` to ask: assume the window that just ended gave a
    /// full budget again.
    fn refill(&self) {
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.remaining = budget.total;
        budget.resets_at_ms = crate::clock::unix_millis() + 24 * 3600 * 1000;
    }

    /// Re-read `/gateway/bot` unless another caller did within `age`.
    async fn refresh_if_older_than(&self, age: Duration) -> Refresh {
        if self.source.get().is_none() {
            return Refresh::NoSource;
        }
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| at.elapsed() < age) {
            return Refresh::Recent;
        }
        self.fetch_and_apply(&mut refreshed).await
    }

    /// Re-read `/gateway/bot` now and use Discord's figures.
    pub async fn refresh(&self) -> Refresh {
        if self.source.get().is_none() {
            return Refresh::NoSource;
        }
        let mut refreshed = self.refreshed.lock().await;
        self.fetch_and_apply(&mut refreshed).await
    }

    async fn fetch_and_apply(&self, refreshed: &mut Option<Instant>) -> Refresh {
        let Some(source) = self.source.get() else {
            return Refresh::NoSource;
        };
        let outcome = tokio::time::timeout(REFRESH_TIMEOUT, source.fetch()).await;
        *refreshed = Some(Instant::now());
        match outcome {
            Ok(Ok(info)) => {
                self.apply(&info);
                if let Some(redis) = self.cluster.get() {
                    self.reconcile_cluster(redis, &info).await;
                }
                Refresh::Applied
            }
            Ok(Err(e)) => {
                tracing::warn!(event = %"gateway_bot_refresh", error = %e, "cannot re-read /gateway/bot; keeping the identify budget figures held");
                Refresh::Failed
            }
            Err(_) => {
                tracing::warn!(event = %"gateway_bot_refresh", "/gateway/bot did not answer within {} s; keeping the identify budget figures held", REFRESH_TIMEOUT.as_secs());
                Refresh::Failed
            }
        }
    }

    /// Put Discord's figures into Redis (Discord wins), saying how far the
    /// shared counter was off.
    async fn reconcile_cluster(&self, redis: &crate::cluster::coord::Redis, info: &GatewayBot) {
        let limit = &info.session_start_limit;
        let resets_at_ms = crate::clock::unix_millis() + limit.reset_after;
        match redis
            .reconcile(limit.remaining, limit.total, resets_at_ms)
            .await
        {
            Ok(Some((remaining, total)))
                if remaining != limit.remaining || total != limit.total =>
            {
                tracing::warn!(
                    event = %"identify_budget_corrected",
                    redis_remaining = remaining,
                    redis_total = total,
                    discord_remaining = limit.remaining,
                    discord_total = limit.total,
                    "/gateway/bot says {} of {} session starts are left, the shared Redis counter said {} of {}; Redis now holds Discord's figures",
                    limit.remaining,
                    limit.total,
                    remaining,
                    total
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(event = %"gateway_bot_refresh", error = %e, "cannot put /gateway/bot's figures into Redis; identifies wait for Redis")
            }
        }
    }

    /// Use Discord's figures, saying where they differ from ours. Starts
    /// reserved but not yet sent are not in Discord's count, so they are
    /// taken off what it reports.
    pub fn apply(&self, info: &GatewayBot) {
        let limit = &info.session_start_limit;
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight = self.reserved.load(Ordering::Relaxed);
        let ours = budget.remaining + in_flight;
        if ours != limit.remaining || budget.total != limit.total {
            tracing::warn!(
                event = %"identify_budget_corrected",
                ours_remaining = ours,
                ours_total = budget.total,
                discord_remaining = limit.remaining,
                discord_total = limit.total,
                in_flight,
                "/gateway/bot says {} of {} session starts are left, not {} of {}; using Discord's figures",
                limit.remaining,
                limit.total,
                ours,
                budget.total
            );
        }
        budget.remaining = limit.remaining.saturating_sub(in_flight);
        budget.total = limit.total;
        budget.resets_at_ms = crate::clock::unix_millis() + limit.reset_after;
        let old_concurrency = budget.max_concurrency;
        if limit.max_concurrency > 0 && limit.max_concurrency != old_concurrency {
            budget.max_concurrency = limit.max_concurrency;
            drop(budget);
            tracing::warn!(
                event = %"identify_buckets_changed",
                old = old_concurrency,
                new = limit.max_concurrency,
                "/gateway/bot changed max_concurrency from {old_concurrency} to {}: identifying in {} bucket(s) from now on",
                limit.max_concurrency,
                limit.max_concurrency
            );
            self.set_buckets(limit.max_concurrency);
        }
        let recommended = self.recommended_shards.swap(info.shards, Ordering::Relaxed);
        if recommended != 0 && recommended != info.shards {
            tracing::warn!(
                event = %"recommended_shards_changed",
                old = recommended,
                new = info.shards,
                running = self.hub.shard_total,
                "/gateway/bot now recommends {} shards (was {recommended}); this daemon runs {} until restarted (with [shards] total = \"auto\" a restart uses Discord's figure)",
                info.shards,
                self.hub.shard_total
            );
        }
    }

    /// New buckets for a new `max_concurrency`. Each starts as if an
    /// IDENTIFY had gone out when the latest old one did (or now, while an
    /// old bucket is still taken), so the change never packs two IDENTIFYs
    /// closer than the window.
    fn set_buckets(&self, max_concurrency: u32) {
        let mut buckets = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        let latest = buckets
            .iter()
            .map(|b| match b.try_lock() {
                Ok(last) => *last,
                Err(_) => Some(Instant::now()),
            })
            .max()
            .flatten();
        *buckets = new_buckets(max_concurrency, latest);
        // The saved times follow the new numbering: every bucket as late as
        // the latest old one.
        let mut sent_ms = self.sent_ms.lock().unwrap_or_else(|p| p.into_inner());
        let newest = sent_ms.iter().copied().max().unwrap_or(0);
        *sent_ms = vec![newest; max_concurrency.max(1) as usize];
    }

    /// Re-read `/gateway/bot` every `every` until shutdown.
    pub async fn refresh_loop(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            self.refresh_if_older_than(every / 2).await;
        }
    }
}

fn new_buckets(max_concurrency: u32, last: Option<Instant>) -> Vec<Bucket> {
    (0..max_concurrency.max(1))
        .map(|_| Arc::new(Mutex::new(last)))
        .collect()
}

/// A shard's turn to IDENTIFY in its bucket, holding one session start.
pub struct IdentifyPermit {
    last: OwnedMutexGuard<Option<Instant>>,
    /// The queue's count of reserved starts, while this permit holds one.
    reserved: Option<Arc<AtomicU32>>,
    hub: Arc<Hub>,
    /// The queue's saved IDENTIFY times, and this permit's bucket in them.
    sent_ms: Arc<std::sync::Mutex<Vec<u64>>>,
    index: usize,
    identified: Arc<Notify>,
    /// With `[cluster]`: the bucket's Redis lease for this turn (the start
    /// was spent from Redis's counter).
    cluster: Option<ClusterTurn>,
}
/// A turn's hold on its bucket in Redis.
struct ClusterTurn {
    redis: Arc<crate::cluster::coord::Redis>,
    bucket: u32,
    token: String,
    /// How long the bucket stays taken after the IDENTIFY frame.
    window: Duration,
}

/// Longest a turn holds a bucket in Redis if its daemon dies before the
/// IDENTIFY (connect and HELLO fit well within it).
const CLUSTER_TURN_HOLD: Duration = Duration::from_secs(30);

/// How often a taken bucket is asked for again.
const CLUSTER_POLL: Duration = Duration::from_millis(50);

/// How soon Redis is asked again after it did not answer.
const CLUSTER_RETRY: Duration = Duration::from_millis(500);

impl IdentifyPermit {
    /// The IDENTIFY frame went out now: start the bucket's 5 s; the session
    /// start taken with the turn is spent.
    pub fn sent(mut self) {
        *self.last = Some(Instant::now());
        if let Some(at) = self
            .sent_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.index)
        {
            *at = crate::clock::unix_millis();
        }
        self.identified.notify_one();
        if let Some(turn) = self.cluster.take() {
            // The bucket stays taken in Redis for the window from now; the
            // start was spent from Redis's counter when the turn began.
            tokio::spawn(async move {
                let _ = turn
                    .redis
                    .turn_sent(turn.bucket, &turn.token, turn.window)
                    .await;
            });
            return;
        }
        let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        match self.reserved.take() {
            Some(reserved) => {
                reserved.fetch_sub(1, Ordering::Relaxed);
            }
            // Granted while the budget was unknown: count it now.
            None => budget.remaining = budget.remaining.saturating_sub(1),
        }
    }
}

impl Drop for IdentifyPermit {
    /// Dropped unsent (the connection failed before IDENTIFY): give the
    /// session start back.
    fn drop(&mut self) {
        if let Some(turn) = self.cluster.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = turn.redis.turn_abandoned(turn.bucket, &turn.token).await;
                let _ = turn.redis.give_back_start(&turn.token).await;
            });
        }
        if let Some(reserved) = self.reserved.take() {
            let mut budget = self.hub.budget.lock().unwrap_or_else(|p| p.into_inner());
            reserved.fetch_sub(1, Ordering::Relaxed);
            budget.remaining += 1;
        }
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

    /// `/gateway/bot` as a script: always answers `info`, counting calls.
    struct Script {
        info: std::sync::Mutex<GatewayBot>,
        calls: AtomicU32,
        /// Answer with an error instead.
        down: std::sync::atomic::AtomicBool,
    }

    impl GatewayBotSource for Script {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<GatewayBot, String>> + Send + '_>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let info = self.info.lock().unwrap().clone();
            let down = self.down.load(Ordering::Relaxed);
            Box::pin(async move {
                if down {
                    Err("HTTP 503".to_string())
                } else {
                    Ok(info)
                }
            })
        }
    }

    fn gateway_bot(remaining: u32, total: u32, max_concurrency: u32) -> GatewayBot {
        GatewayBot {
            url: "wss://gateway.discord.gg".to_string(),
            shards: 4,
            session_start_limit: crate::rest::SessionStartLimit {
                total,
                remaining,
                reset_after: 3_600_000,
                max_concurrency,
            },
        }
    }

    fn script(queue: &IdentifyQueue, discord: GatewayBot, seeded_from: GatewayBot) -> Arc<Script> {
        let script = Arc::new(Script {
            info: std::sync::Mutex::new(discord),
            calls: AtomicU32::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
        });
        queue.set_source(script.clone(), &seeded_from);
        script
    }

    #[tokio::test(start_paused = true)]
    async fn many_shards_in_many_buckets_never_spend_below_the_reserve() {
        // Budget just above the reserve, more buckets than starts left.
        let reserve = 25;
        let hub = hub(reserve + 3, 1000, 3_600_000);
        let queue = Arc::new(IdentifyQueue::new(4, reserve, hub.clone()));
        let sent = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for shard in 0..16u32 {
            let (queue, hub, sent) = (queue.clone(), hub.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures_left = u32::from(shard % 3 == 0);
                loop {
                    let permit = queue.acquire(shard).await;
                    assert!(hub.budget.lock().unwrap().remaining >= reserve);
                    // Connect and HELLO take a while; some connects fail
                    // before IDENTIFY and try again.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if failures_left > 0 {
                        failures_left -= 1;
                        drop(permit);
                        continue;
                    }
                    permit.sent();
                    sent.fetch_add(1, Ordering::Relaxed);
                    assert!(hub.budget.lock().unwrap().remaining >= reserve);
                    return;
                }
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            sent.load(Ordering::Relaxed),
            3,
            "exactly the starts above the reserve"
        );
        assert_eq!(hub.budget.lock().unwrap().remaining, reserve);
        for task in &tasks {
            if task.is_finished() {
                continue;
            }
            task.abort();
        }
        for task in tasks {
            if let Err(e) = task.await {
                assert!(e.is_cancelled(), "a shard task failed: {e}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn next_turn_names_the_wait_for_the_bucket() {
        let queue = IdentifyQueue::new(2, 0, hub(1000, 1000, 86_400_000));
        assert_eq!(queue.next_turn_in(0), (Duration::ZERO, false));
        queue.acquire(0).await.sent();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(queue.next_turn_in(0), (Duration::from_millis(4020), false));
        assert_eq!(
            queue.next_turn_in(2),
            (Duration::from_millis(4020), false),
            "same bucket"
        );
        assert_eq!(
            queue.next_turn_in(1),
            (Duration::ZERO, false),
            "other bucket"
        );
        let held = queue.acquire(1).await;
        assert_eq!(queue.next_turn_in(1), (Duration::from_millis(5020), true));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_dropped_before_identify_gives_its_start_back() {
        let hub = hub(26, 1000, 3_600_000);
        let queue = IdentifyQueue::new(2, 25, hub.clone());
        let permit = queue.acquire(0).await;
        assert_eq!(
            hub.budget.lock().unwrap().remaining,
            25,
            "taken at the turn"
        );
        drop(permit);
        assert_eq!(hub.budget.lock().unwrap().remaining, 26, "given back");
        queue.acquire(1).await.sent();
        assert_eq!(hub.budget.lock().unwrap().remaining, 25);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_end_rereads_discord_instead_of_refilling() {
        let hub = hub(25, 1000, 3_600_000);
        let queue = IdentifyQueue::new(1, 25, hub.clone());
        // Another process of this bot identified meanwhile: Discord's
        // new window is not full.
        let script = script(&queue, gateway_bot(400, 1000, 1), gateway_bot(25, 1000, 1));
        queue.acquire(0).await.sent();
        assert!(script.calls.load(Ordering::Relaxed) >= 1);
        assert_eq!(hub.budget.lock().unwrap().remaining, 399);
    }

    #[tokio::test(start_paused = true)]
    async fn old_figures_are_reread_before_identifying() {
        let hub = hub(1000, 1000, 86_400_000);
        let mut sessions = hub.sessions.subscribe();
        let queue = Arc::new(IdentifyQueue::new(1, 25, hub.clone()));
        let script = script(&queue, gateway_bot(25, 1000, 1), gateway_bot(1000, 1000, 1));
        queue.acquire(0).await.sent();
        assert_eq!(
            script.calls.load(Ordering::Relaxed),
            0,
            "fresh figures are used"
        );
        assert_eq!(hub.budget.lock().unwrap().remaining, 999);
        // A long quiet spell, then a re-identify: Discord says the budget
        // is at the reserve (spent elsewhere), so no IDENTIFY.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(0).await.sent() }
        });
        let line = sessions.recv().await.expect("fatal report");
        let report: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(report["event"], "fatal");
        assert_eq!(script.calls.load(Ordering::Relaxed), 1);
        assert_eq!(hub.budget.lock().unwrap().remaining, 25);
        assert!(!waiter.is_finished());
        waiter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_gateway_bot_is_asked_once_a_minute_not_per_identify() {
        let hub = hub(1000, 1000, 86_400_000);
        let queue = IdentifyQueue::new(4, 25, hub.clone());
        let script = script(
            &queue,
            gateway_bot(1000, 1000, 4),
            gateway_bot(1000, 1000, 4),
        );
        script.down.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(120)).await;
        for shard in 0..4 {
            queue.acquire(shard).await.sent();
        }
        assert_eq!(script.calls.load(Ordering::Relaxed), 1);
        assert_eq!(
            hub.budget.lock().unwrap().remaining,
            996,
            "the figures held"
        );
        tokio::time::sleep(Duration::from_secs(61)).await;
        queue.acquire(0).await.sent();
        assert_eq!(script.calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn starts_in_flight_are_kept_apart_from_discords_count() {
        let hub = hub(1000, 1000, 86_400_000);
        let queue = IdentifyQueue::new(2, 25, hub.clone());
        script(
            &queue,
            gateway_bot(500, 1000, 2),
            gateway_bot(1000, 1000, 2),
        );
        let permit = queue.acquire(0).await;
        assert_eq!(queue.refresh().await, Refresh::Applied);
        assert_eq!(hub.budget.lock().unwrap().remaining, 499);
        drop(permit);
        assert_eq!(hub.budget.lock().unwrap().remaining, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_max_concurrency_changes_the_buckets() {
        let hub = hub(1000, 1000, 86_400_000);
        let queue = IdentifyQueue::new(2, 0, hub.clone());
        script(
            &queue,
            gateway_bot(1000, 1000, 1),
            gateway_bot(1000, 1000, 2),
        );
        let start = Instant::now();
        queue.acquire(0).await.sent();
        queue.acquire(1).await.sent();
        assert_eq!(start.elapsed().as_secs(), 0, "two buckets");
        assert_eq!(queue.refresh().await, Refresh::Applied);
        assert_eq!(hub.budget.lock().unwrap().max_concurrency, 1);
        queue.acquire(0).await.sent();
        queue.acquire(1).await.sent();
        assert_eq!(start.elapsed().as_secs(), 10, "one bucket now");
    }
}
