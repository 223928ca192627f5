//! The one REST rate limiter (DESIGN.md §6), shared by every client of the
//! front door and by the daemon's own `/gateway/bot` calls: buckets learned from `X-RateLimit-Bucket` per route
//! key, the global limit, the `max_queue_wait` cut-off and the
//! invalid-request window. No table of routes: everything is learned from
//! Discord's headers.
//!
//! - A *route key* is the method and the path with the major parameter kept
//!   (channel id, guild id, webhook id + token) and every other id replaced.
//! - Each route key maps, once Discord named it, to a bucket id; a bucket is
//!   the bucket id plus the major parameter plus the token. Before the first
//!   answer a route key has a bucket of its own, which becomes the real one.
//! - Requests of one bucket go out one at a time, in arrival order (a FIFO
//!   lock held until Discord's answer headers arrive), after waiting out
//!   `Remaining = 0` until `Reset-After`. Different buckets never wait on
//!   each other.
//! - The global limit is a schedule of send times per token: never more
//!   than `global_rate_limit` in any one second *as Discord counts them*.
//!   Discord counts a request when it arrives, somewhere between its send
//!   and its answer, so a slot is held for one second plus the longest
//!   recent answer time (capped at [`MAX_MARGIN`]): a request sent when an
//!   old slot frees arrives a full second after the old one did.
//! - Everything is per token (a hash of the Authorization value: the value
//!   is never stored or logged; logs show its last 4 characters).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Cloudflare's window for invalid requests.
pub const INVALID_WINDOW: Duration = Duration::from_secs(600);

/// Method and path with the major parameter kept and other ids replaced;
/// webhook and interaction tokens are hashed (this key is never logged).
/// `path` is below `/api` with or without the version.
pub fn route_key(method: &str, path: &str) -> String {
    let path = path.strip_prefix("/api").unwrap_or(path);
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_version =
        |s: &str| s.len() > 1 && s.starts_with('v') && s[1..].bytes().all(|b| b.is_ascii_digit());
    if segments.first().is_some_and(|s| is_version(s)) {
        segments.remove(0);
    }
    let mut out = String::with_capacity(path.len() + 8);
    out.push_str(method);
    out.push(' ');
    let mut i = 0;
    while i < segments.len() {
        let segment = segments[i];
        out.push('/');
        let previous = i.checked_sub(1).map(|p| segments[p]);
        let numeric = segment.bytes().all(|b| b.is_ascii_digit());
        let major = matches!(previous, Some("channels" | "guilds" | "webhooks"));
        if numeric && major && i == 1 {
            out.push_str(segment);
        } else if i >= 2
            && matches!(segments[i - 2], "webhooks" | "interactions")
            && segments[i - 1].bytes().all(|b| b.is_ascii_digit())
        {
            // The token: part of the major parameter, kept only as a hash.
            out.push_str(&format!("tok{:x}", hash_of(segment)));
        } else if numeric {
            out.push_str(":id");
        } else if previous == Some("reactions") {
            // The emoji of a reaction route is not a bucket of its own.
            out.push_str(":emoji");
        } else {
            out.push_str(segment);
        }
        i += 1;
    }
    out
}

/// The major parameter of a route key (`channels/1`, `webhooks/1/tok…`),
/// empty for routes without one.
fn major_of(route_key: &str) -> &str {
    let path = route_key.split_once(' ').map_or(route_key, |(_, p)| p);
    let path = path.trim_start_matches('/');
    let mut parts = path.splitn(4, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(kind @ ("channels" | "guilds")), Some(id), _) => &path[..kind.len() + 1 + id.len()],
        (Some(kind @ ("webhooks" | "interactions")), Some(id), Some(token))
            if token.starts_with("tok") =>
        {
            &path[..kind.len() + 2 + id.len() + token.len()]
        }
        (Some(kind @ ("webhooks" | "interactions")), Some(id), _) => {
            &path[..kind.len() + 1 + id.len()]
        }
        _ => "",
    }
}

/// Whether a path is an interaction endpoint (not bound by the global limit).
pub fn is_interaction(path: &str) -> bool {
    let key = route_key("X", path);
    key.starts_with("X /interactions/")
}

fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A token's identity inside the limiter: a hash of the Authorization
/// value, and its last 4 characters for logs.
#[derive(Clone, Debug)]
pub struct TokenId {
    key: u64,
    pub fingerprint: String,
}

impl TokenId {
    /// The daemon's own token, as its clients present it (`Bot …`).
    pub fn of_token(token: &crate::config::Token) -> TokenId {
        TokenId::of(Some(&format!("Bot {}", token.expose())))
    }

    pub fn of(authorization: Option<&str>) -> TokenId {
        match authorization {
            None => TokenId {
                key: 0,
                fingerprint: "none".into(),
            },
            Some(value) => {
                let chars: Vec<char> = value.trim().chars().collect();
                let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
                TokenId {
                    key: hash_of(value.trim()),
                    fingerprint: format!("…{tail}"),
                }
            }
        }
    }
}

/// What Discord said about a bucket in one answer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BucketHeaders {
    pub bucket: Option<String>,
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    pub reset_after: Option<Duration>,
}

impl BucketHeaders {
    pub fn from_headers(headers: &hyper::HeaderMap) -> BucketHeaders {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        BucketHeaders {
            bucket: get("x-ratelimit-bucket").map(str::to_string),
            limit: get("x-ratelimit-limit").and_then(|v| v.parse().ok()),
            remaining: get("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            reset_after: get("x-ratelimit-reset-after")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64),
        }
    }
}

#[derive(Debug, Default)]
struct BucketState {
    /// Learned from headers; `None` until Discord answered once.
    limit: Option<u32>,
    remaining: Option<u32>,
    reset_at: Option<Instant>,
    /// The longest `Reset-After` seen: the window's length, for projections.
    window: Duration,
    /// Discord sent no rate-limit headers for this route: no queue.
    unlimited: bool,
}

/// One bucket of one token.
#[derive(Debug, Default)]
pub struct Bucket {
    /// FIFO: held from the turn until Discord's answer headers arrive.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Requests queued or in flight.
    queued: AtomicUsize,
    state: Mutex<BucketState>,
    /// Discord's bucket id, once known (for logs).
    pub id: Mutex<Option<String>>,
    /// A route's first bucket, once Discord named a bucket another route
    /// already found: requests still queued here move to that one.
    merged_into: Mutex<Option<Arc<Bucket>>>,
}

impl Bucket {
    fn lock(&self) -> std::sync::MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn merged_into(&self) -> Option<Arc<Bucket>> {
        self.merged_into
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The wait a request arriving now would have before its turn comes and
    /// the bucket lets it go, given `ahead` requests before it.
    fn projected_wait(&self, now: Instant, ahead: usize) -> Duration {
        let st = self.lock();
        if st.unlimited {
            return Duration::ZERO;
        }
        let (Some(limit), Some(remaining)) = (st.limit, st.remaining) else {
            // Unknown yet: the ones ahead go one at a time, each a round
            // trip; nothing to project.
            return Duration::ZERO;
        };
        let reset_at = st.reset_at.unwrap_or(now);
        let remaining = if reset_at <= now { limit } else { remaining } as usize;
        if ahead < remaining {
            return Duration::ZERO;
        }
        let limit = limit.max(1) as usize;
        let windows_after = (ahead - remaining) / limit;
        let first = reset_at.saturating_duration_since(now);
        first + st.window * windows_after as u32
    }

    /// Wait (with the turn held) until the bucket allows one request.
    async fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        loop {
            let until = {
                let mut st = self.lock();
                let now = Instant::now();
                match (st.remaining, st.reset_at) {
                    (Some(0), Some(at)) if at > now => Some(at),
                    (Some(0), _) => {
                        // The window passed: Discord refilled it.
                        st.remaining = st.limit;
                        None
                    }
                    _ => None,
                }
            };
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => break,
            }
        }
        {
            let mut st = self.lock();
            if let Some(r) = st.remaining.as_mut() {
                *r = r.saturating_sub(1);
            }
        }
        started.elapsed()
    }

    /// Learn from an answer's headers.
    fn learn(&self, h: &BucketHeaders, now: Instant) {
        let mut st = self.lock();
        if h.bucket.is_none() && h.remaining.is_none() {
            st.unlimited = true;
            return;
        }
        st.unlimited = false;
        if let Some(limit) = h.limit {
            st.limit = Some(limit);
        }
        if let Some(remaining) = h.remaining {
            st.remaining = Some(remaining);
            if st.limit.is_none() {
                st.limit = Some(remaining + 1);
            }
        }
        if let Some(after) = h.reset_after {
            st.reset_at = Some(now + after);
            st.window = st.window.max(after);
        }
    }

    /// A 429 for this bucket: nothing left until `retry_after` from now.
    fn exhausted_for(&self, retry_after: Duration, now: Instant) {
        let mut st = self.lock();
        st.remaining = Some(0);
        st.reset_at = Some(now + retry_after);
        st.window = st.window.max(retry_after);
        if st.limit.is_none() {
            st.limit = Some(1);
        }
        st.unlimited = false;
    }
}

/// A request's place in its bucket: holds the turn until dropped.
pub struct Permit {
    bucket: Arc<Bucket>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    route_key: String,
    token: u64,
    /// Time spent waiting for the bucket and the global limit.
    pub waited_bucket: Duration,
    pub waited_global: Duration,
    /// When its latest global slot let it go.
    sent_at: Option<Instant>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.bucket.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Permit {
    /// Discord's bucket id for logs, `unknown` before it named one.
    pub fn bucket_id(&self) -> String {
        self.bucket
            .id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "unknown".into())
    }
}

/// The global limit of one token: recent send times, and the requests
/// waiting their turn.
#[derive(Debug, Default)]
struct Global {
    /// Send times still held (ascending).
    slots: VecDeque<Instant>,
    /// Requests wait for the global limit one at a time, in arrival order;
    /// the one holding the turn re-checks the schedule after each sleep
    /// (the hold may have grown meanwhile).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Requests waiting for (or holding) the turn.
    waiting: usize,
    /// An upstream global 429 holds every request until then.
    blocked_until: Option<Instant>,
    /// Recent send → answer-headers times.
    answer_times: VecDeque<Duration>,
}

/// The most added to a global slot's second for the answer time.
pub const MAX_MARGIN: Duration = Duration::from_millis(500);
/// Answer times remembered per token.
const ANSWER_TIMES: usize = 32;

impl Global {
    /// How long a slot is held: a second, plus the time Discord may take
    /// to count the request after it was sent.
    fn hold(&self) -> Duration {
        let margin = self.answer_times.iter().max().copied().unwrap_or_default();
        Duration::from_secs(1) + margin.min(MAX_MARGIN)
    }

    fn prune(&mut self, now: Instant) {
        let hold = self.hold();
        while self.slots.front().is_some_and(|t| *t + hold <= now) {
            self.slots.pop_front();
        }
    }

    fn answered(&mut self, took: Duration) {
        if self.answer_times.len() == ANSWER_TIMES {
            self.answer_times.pop_front();
        }
        self.answer_times.push_back(took);
    }

    /// When the request holding the turn may be sent.
    fn next_slot(&mut self, now: Instant, per_second: u32) -> Instant {
        self.prune(now);
        let per_second = per_second.max(1) as usize;
        let mut at = now;
        if self.slots.len() >= per_second {
            at = at.max(self.slots[self.slots.len() - per_second] + self.hold());
        }
        if let Some(blocked) = self.blocked_until {
            at = at.max(blocked);
        }
        at
    }

    /// How long a request asking now would wait, behind those waiting
    /// already (a projection: answers may lengthen it).
    fn projected_wait(&mut self, now: Instant, per_second: u32) -> Duration {
        self.prune(now);
        let n = per_second.max(1) as usize;
        let hold = self.hold();
        // Play the schedule forward: each waiter ahead, then this one,
        // goes when the send `n` places before it has left the window.
        let mut sends: Vec<Instant> = self.slots.iter().copied().collect();
        let mut at = now;
        for _ in 0..=self.waiting {
            at = match sends.len().checked_sub(n) {
                Some(i) => now.max(sends[i] + hold),
                None => now,
            };
            sends.push(at);
        }
        if let Some(blocked) = self.blocked_until {
            at = at.max(blocked);
        }
        at.saturating_duration_since(now)
    }
}

/// Counts a request among a token's global waiters while it waits (also
/// when the wait is abandoned: a client that hung up).
struct Waiting<'a> {
    limiter: &'a Limiter,
    token: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.limiter.lock();
        if let Some(g) = st.globals.get_mut(&self.token) {
            g.waiting = g.waiting.saturating_sub(1);
        }
    }
}

/// Why a request is answered by the front door itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Its wait would pass `max_queue_wait`.
    QueueWait { wait: Duration, global: bool },
    /// The invalid-request window is full.
    InvalidRequests { count: usize, clears_in: Duration },
}

/// The limiter shared by every client of the front door.
pub struct Limiter {
    global_per_second: u32,
    max_queue_wait: Duration,
    invalid_limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (token, route key) → Discord's bucket id.
    routes: HashMap<(u64, String), String>,
    /// (token, bucket key) → bucket. The key is `id major` once learned,
    /// `route:<route key>` before.
    buckets: HashMap<(u64, String), Arc<Bucket>>,
    globals: HashMap<u64, Global>,
    /// 401/403/429 answers in the last 10 minutes.
    invalid: VecDeque<Instant>,
}

impl Limiter {
    /// The limiter `[proxy]` asks for.
    pub fn from_config(proxy: &crate::config::ProxyConfig) -> Limiter {
        Limiter::new(
            proxy.global_rate_limit,
            proxy.invalid_request_limit,
            proxy.max_queue_wait,
        )
    }

    pub fn new(global_per_second: u32, invalid_limit: u32, max_queue_wait: Duration) -> Limiter {
        Limiter {
            global_per_second,
            max_queue_wait,
            invalid_limit: invalid_limit as usize,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bucket_for(st: &mut State, token: u64, route_key: &str) -> Arc<Bucket> {
        if st.buckets.len() >= MAX_IDLE_BUCKETS {
            evict_idle(st, Instant::now());
        }
        let key = match st.routes.get(&(token, route_key.to_string())) {
            Some(id) => format!("{id} {}", major_of(route_key)),
            None => format!("route:{route_key}"),
        };
        st.buckets.entry((token, key)).or_default().clone()
    }

    /// 401/403/429 answers counted now, and whether the window is full.
    pub fn invalid_refusal(&self) -> Option<Refusal> {
        let now = Instant::now();
        let mut st = self.lock();
        prune_invalid(&mut st.invalid, now);
        metrics::gauge!("shardwarden_rest_invalid_requests").set(st.invalid.len() as f64);
        if st.invalid.len() >= self.invalid_limit {
            let oldest = st.invalid.front().copied().unwrap_or(now);
            return Some(Refusal::InvalidRequests {
                count: st.invalid.len(),
                clears_in: (oldest + INVALID_WINDOW).saturating_duration_since(now),
            });
        }
        None
    }

    /// Count one invalid answer (401, 403, or a 429 not of shared scope).
    pub fn count_invalid(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        prune_invalid(&mut st.invalid, now);
        st.invalid.push_back(now);
        metrics::gauge!("shardwarden_rest_invalid_requests").set(st.invalid.len() as f64);
    }

    /// Invalid answers in the window now.
    pub fn invalid_count(&self) -> usize {
        let now = Instant::now();
        let mut st = self.lock();
        prune_invalid(&mut st.invalid, now);
        metrics::gauge!("shardwarden_rest_invalid_requests").set(st.invalid.len() as f64);
        st.invalid.len()
    }

    /// Wait for the request's turn in its bucket and for the global limit,
    /// or refuse at once when that wait would pass `max_queue_wait`.
    pub async fn acquire(
        &self,
        token: &TokenId,
        route_key: &str,
        global_exempt: bool,
    ) -> Result<Permit, Refusal> {
        if let Some(refusal) = self.invalid_refusal() {
            return Err(refusal);
        }
        let now = Instant::now();
        let bucket = {
            let mut st = self.lock();
            let bucket = Self::bucket_for(&mut st, token.key, route_key);
            let ahead = bucket.queued.load(Ordering::SeqCst);
            let bucket_wait = bucket.projected_wait(now, ahead);
            let global_wait = if global_exempt {
                Duration::ZERO
            } else {
                let per_second = self.global_per_second;
                let global = st.globals.entry(token.key).or_default();
                global.projected_wait(now, per_second)
            };
            let wait = bucket_wait.max(global_wait);
            if wait > self.max_queue_wait {
                return Err(Refusal::QueueWait {
                    wait,
                    global: global_wait > bucket_wait,
                });
            }
            bucket.queued.fetch_add(1, Ordering::SeqCst);
            bucket
        };
        let mut permit = Permit {
            bucket: bucket.clone(),
            _turn: None,
            route_key: route_key.to_string(),
            token: token.key,
            waited_bucket: Duration::ZERO,
            waited_global: Duration::ZERO,
            sent_at: None,
        };
        let started = Instant::now();
        loop {
            let unlimited = permit.bucket.lock().unlimited;
            if !unlimited {
                permit._turn = Some(permit.bucket.turn.clone().lock_owned().await);
            }
            // Queued on a route's first bucket while another route's answer
            // showed both share one: queue on the shared one instead.
            let Some(shared) = permit.bucket.merged_into() else {
                break;
            };
            permit._turn = None;
            shared.queued.fetch_add(1, Ordering::SeqCst);
            permit.bucket.queued.fetch_sub(1, Ordering::SeqCst);
            permit.bucket = shared;
        }
        permit.bucket.wait_ready().await;
        permit.waited_bucket = started.elapsed();
        if !global_exempt {
            permit.waited_global = self.wait_global(token.key).await;
            permit.sent_at = Some(Instant::now());
        }
        Ok(permit)
    }

    /// The answer's headers arrived: how long Discord took feeds the
    /// global schedule's margin.
    pub fn answered(&self, permit: &Permit) {
        let Some(sent) = permit.sent_at else {
            return;
        };
        let took = sent.elapsed();
        let mut st = self.lock();
        st.globals.entry(permit.token).or_default().answered(took);
    }

    /// Wait for the token's global limit (in arrival order), then take a
    /// slot.
    async fn wait_global(&self, token: u64) -> Duration {
        let started = Instant::now();
        let turn = {
            let mut st = self.lock();
            let global = st.globals.entry(token).or_default();
            global.waiting += 1;
            global.turn.clone()
        };
        let _waiting = Waiting {
            limiter: self,
            token,
        };
        let _turn = turn.lock().await;
        loop {
            let at = {
                let mut st = self.lock();
                let now = Instant::now();
                let global = st.globals.entry(token).or_default();
                let at = global.next_slot(now, self.global_per_second);
                if at <= now {
                    global.slots.push_back(now);
                    break;
                }
                at
            };
            tokio::time::sleep_until(at).await;
        }
        started.elapsed()
    }

    /// Learn from Discord's answer headers (any status).
    pub fn learn(&self, permit: &Permit, headers: &BucketHeaders) {
        let now = Instant::now();
        permit.bucket.learn(headers, now);
        let Some(id) = &headers.bucket else {
            return;
        };
        *permit.bucket.id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        let mut st = self.lock();
        let route = (permit.token, permit.route_key.clone());
        if st.routes.get(&route) == Some(id) {
            return;
        }
        st.routes.insert(route, id.clone());
        let key = (
            permit.token,
            format!("{id} {}", major_of(&permit.route_key)),
        );
        // The route's own bucket becomes the real one, queue and all,
        // unless another route already found it: then what is queued on
        // the route's bucket moves over to that one.
        let shared = st
            .buckets
            .entry(key)
            .or_insert_with(|| permit.bucket.clone())
            .clone();
        if !Arc::ptr_eq(&shared, &permit.bucket) {
            // This answer is the shared bucket's latest word too.
            shared.learn(headers, now);
            *permit
                .bucket
                .merged_into
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(shared);
        }
        st.buckets
            .remove(&(permit.token, format!("route:{}", permit.route_key)));
    }

    /// A 429 from Discord: hold the bucket, or every request of the token
    /// when global.
    pub fn rate_limited(&self, permit: &Permit, retry_after: Duration, global: bool) {
        let now = Instant::now();
        if global {
            let mut st = self.lock();
            let g = st.globals.entry(permit.token).or_default();
            let until = now + retry_after;
            g.blocked_until = Some(g.blocked_until.map_or(until, |b| b.max(until)));
        } else {
            permit.bucket.exhausted_for(retry_after, now);
        }
    }

    /// Let the next request of the bucket go (the answer's headers are in).
    pub fn release(&self, permit: &mut Permit) {
        permit._turn = None;
    }

    /// Wait again in the same bucket (a retry after a 429): the turn is
    /// kept, so order holds.
    pub async fn wait_again(&self, permit: &mut Permit, global_exempt: bool) {
        permit.waited_bucket += permit.bucket.wait_ready().await;
        if !global_exempt {
            permit.waited_global += self.wait_global(permit.token).await;
            permit.sent_at = Some(Instant::now());
        }
    }
}

/// Buckets kept before idle ones are dropped (a bot in many channels
/// would otherwise grow the map without end).
const MAX_IDLE_BUCKETS: usize = 4096;

/// Drop buckets nobody waits on whose window has passed (Discord refilled
/// them, so forgetting them loses nothing but the learned route mapping,
/// which is dropped with them and learned again on the next answer).
fn evict_idle(st: &mut State, now: Instant) {
    st.buckets.retain(|_, bucket| {
        let in_use = Arc::strong_count(bucket) > 1 || bucket.queued.load(Ordering::SeqCst) > 0;
        let pending = bucket.lock().reset_at.is_some_and(|at| at > now);
        in_use || pending
    });
    let live: std::collections::HashSet<(u64, String)> = st
        .buckets
        .keys()
        .filter_map(|(token, key)| {
            key.split_once(' ')
                .filter(|_| !key.starts_with("route:"))
                .map(|(id, _)| (*token, id.to_string()))
        })
        .collect();
    st.routes
        .retain(|(token, _), id| live.contains(&(*token, id.clone())));
}

fn prune_invalid(invalid: &mut VecDeque<Instant>, now: Instant) {
    while invalid.front().is_some_and(|t| *t + INVALID_WINDOW <= now) {
        invalid.pop_front();
    }
}

#[cfg(test)]
#[path = "rest_limiter_tests.rs"]
mod tests;
