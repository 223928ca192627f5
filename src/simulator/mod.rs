//! An embedded, scriptable Discord gateway simulator.
//!
//! [`Simulator::start`] binds two loopback listeners: a minimal HTTP/1.1 server answering
//! the REST routes bot libraries call at login and use (`/gateway/bot`, `/users/@me`,
//! `/oauth2/applications/@me`, `GET /channels/{id}`, posting, editing and deleting
//! messages, interaction callbacks; with Discord's buckets, shared buckets and global
//! limit, and failures injected per route), and a WebSocket gateway that speaks the Discord v10 JSON
//! protocol (HELLO, heartbeats, IDENTIFY/READY, RESUME/RESUMED, op 7/9, close codes,
//! zlib-stream and zstd-stream transport compression). Tests and benchmarks steer it with
//! [`Simulator::inject`] and [`Simulator::dispatch`] and inspect what clients did with
//! [`Simulator::frames`] and [`Simulator::connections`]. It only ever listens on 127.0.0.1.
//!
//! ```ignore
//! let sim = Simulator::start(SimConfig { shards: 2, heartbeat_interval_ms: 500, ..Default::default() }).await?;
//! // point the daemon at sim.api_base() with token "sim-token-0000", then:
//! sim.wait_until(|s| s.frames().iter().any(|f| f.op == 2), Duration::from_secs(5)).await;
//! sim.inject(0, Fault::Close(4000));           // the daemon should RESUME on sim.resume_url()
//! sim.dispatch(0, "MESSAGE_CREATE", serde_json::json!({"content": "hi"}));
//! ```
//!
//! Design notes:
//! - Every dispatch of a session is appended to its replay log (last [`SESSION_LOG_LIMIT`])
//!   under the state lock, which assigns `s`; the connection task then sends whatever is
//!   new in the log. Ordering of `s` on the wire is therefore always strict, and RESUME just
//!   rewinds the connection's send cursor to the client's `seq`.
//! - Faults for one connection are applied in the order they were injected.
//! - IDENTIFY with `session_start_remaining == 0` closes with 4004 (Discord resets the token
//!   when the budget runs out).
//! - A RESUME of a session that another live connection still holds takes the session over
//!   and closes the old connection with 4000.
//! - The guilds, their channels, roles, members … come from [`world`], generated from the
//!   guild id: every connection sees the same world, and a message posted over REST (or with
//!   [`Simulator::member_message`]) is dispatched on the shard owning the channel's guild.

mod compress;
mod gateway;
mod handshake;
mod http;
mod payloads;
#[cfg(test)]
mod tests;
pub mod world;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

pub use compress::{Compression, StreamCompressor, UnknownCompression};
pub use payloads::{
    BOT_USER_ID, guild_ids_for_shard, message_create_payload, message_create_payload_seeded,
    snowflake,
};
pub use world::guild_create as guild_create_payload;

/// Privileged intent bits: GUILD_MEMBERS, GUILD_PRESENCES, MESSAGE_CONTENT.
pub const PRIVILEGED_INTENTS: u64 = (1 << 1) | (1 << 8) | (1 << 15);
/// Every documented intent bit.
pub const ALL_INTENTS: u64 = 0x331_FFFF;

/// Number of dispatches kept per session for replay on RESUME.
pub const SESSION_LOG_LIMIT: usize = 10_000;

/// Simulator settings. Build with `SimConfig { shards: 4, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The only accepted bot token (without the `Bot ` prefix).
    pub token: String,
    /// Recommended shard count returned by `/gateway/bot`.
    pub shards: u32,
    /// `session_start_limit.max_concurrency`.
    pub max_concurrency: u32,
    /// `session_start_limit.total`.
    pub session_start_total: u32,
    /// `session_start_limit.remaining`; decremented by every accepted IDENTIFY.
    pub session_start_remaining: u32,
    /// `session_start_limit.reset_after` in milliseconds.
    pub reset_after_ms: u64,
    /// Sent in HELLO.
    pub heartbeat_interval_ms: u64,
    /// GUILD_CREATE dispatches sent after READY.
    pub guilds_per_shard: u32,
    /// Privileged intent bits the "app" has enabled; requesting others closes with 4014.
    pub allowed_privileged: u64,
    /// Answer op 9 `false` when a bucket (`shard_id % max_concurrency`) identifies twice in 5 s.
    pub enforce_identify_concurrency: bool,
    /// How long a disconnected session stays resumable.
    pub session_timeout: Duration,
    /// If set, a connection that sends no heartbeat for this long is closed with 4009
    /// (and its session invalidated). `None` (the default) disables the check.
    pub heartbeat_timeout: Option<Duration>,
    /// Client send limit per connection: more than `.0` frames within `.1` closes with 4008.
    pub client_rate_limit: (u32, Duration),
    /// Identify concurrency window per bucket (Discord: 5 s).
    pub identify_window: Duration,
    /// REST bucket of `POST /channels/{id}/messages`, per channel: requests per window
    /// (Discord: 5 per 5 s).
    pub message_bucket: (u32, Duration),
    /// REST bucket of every other route: requests per window.
    pub route_bucket: (u32, Duration),
    /// Routes that share one bucket, as Discord groups routes under one
    /// `X-RateLimit-Bucket` (counted per bucket and major parameter). A route in none of
    /// them has a bucket of its own. Default: editing and deleting a message.
    pub shared_buckets: Vec<SharedBucket>,
    /// Requests per second the token may make across all routes (Discord: 50), in a fixed
    /// window that starts with its first request; interaction callbacks are exempt. `None`:
    /// no global limit.
    pub global_limit: Option<u32>,
    /// Path of READY's `resume_gateway_url` (default `/resume`). `""` gives a URL with no
    /// path, like Discord's own and the front door's, to which libraries append `?v=10…`.
    pub resume_path: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            token: "sim-token-0000".to_string(),
            shards: 1,
            max_concurrency: 1,
            session_start_total: 1000,
            session_start_remaining: 1000,
            reset_after_ms: 86_400_000,
            heartbeat_interval_ms: 41_250,
            guilds_per_shard: 2,
            allowed_privileged: PRIVILEGED_INTENTS,
            enforce_identify_concurrency: true,
            session_timeout: Duration::from_secs(120),
            heartbeat_timeout: None,
            client_rate_limit: (120, Duration::from_secs(60)),
            identify_window: Duration::from_secs(5),
            message_bucket: (5, Duration::from_secs(5)),
            route_bucket: (50, Duration::from_secs(1)),
            shared_buckets: vec![SharedBucket {
                routes: vec![
                    "PATCH /channels/{channel_id}/messages/{message_id}".into(),
                    "DELETE /channels/{channel_id}/messages/{message_id}".into(),
                ],
                limit: (5, Duration::from_secs(5)),
            }],
            global_limit: Some(50),
            resume_path: "/resume".to_string(),
        }
    }
}

/// Route templates sharing one REST bucket (see [`SimConfig::shared_buckets`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBucket {
    /// Route templates as Discord's docs write them, e.g.
    /// `PATCH /channels/{channel_id}/messages/{message_id}` (see [`RestCall::route`]).
    pub routes: Vec<String>,
    /// Requests per window, per major parameter.
    pub limit: (u32, Duration),
}

/// A fault injected into the live connection(s) of a shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Stop answering heartbeats with op 11 (the connection becomes a zombie).
    StopAcking,
    /// Answer heartbeats again.
    ResumeAcking,
    /// Send op 1 (server-requested heartbeat).
    RequestHeartbeat,
    /// Send op 7 RECONNECT; the client is expected to close and resume.
    Reconnect,
    /// Send op 9; `resumable: false` also expires the session so a RESUME fails.
    InvalidSession { resumable: bool },
    /// Close with this code. 4003/4004/4005/4007/4009..=4014 also invalidate the session.
    Close(u16),
    /// Drop the TCP connection without a close frame.
    DropTcp,
    /// A message whose (inflated) content is not JSON.
    MalformedJson,
    /// Bytes that fail to inflate (for `compress=none`: a binary frame of invalid UTF-8).
    CorruptFrame,
    /// One MESSAGE_CREATE dispatch whose JSON is exactly that many bytes before compression
    /// (sequenced when a session exists, otherwise sent with `s: null`).
    Oversized(usize),
    /// `count` realistic MESSAGE_CREATE dispatches of about `size` bytes, as fast as possible
    /// (sequenced and logged; needs an identified session, ignored otherwise). Incoming frames
    /// keep being served during the burst; later faults wait until it is done.
    Burst { count: u32, size: usize },
}

/// How the REST API should fail: every route ([`Simulator::set_rest_failure`]) or the
/// routes under a path prefix ([`Simulator::set_route_failure`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RestFailure {
    /// Every request fails with this status (429 uses the retry-after seconds) until cleared.
    Status(u16, Option<f64>),
    /// The next `n` requests fail with 502 Bad Gateway, then service is normal again.
    Count(u32),
    /// The next `times` requests fail with `status` (and `retry_after` for 429).
    Times {
        times: u32,
        status: u16,
        retry_after: Option<f64>,
    },
    /// Every request gets its TCP connection closed without any response, until cleared.
    Hangup,
    /// The next `times` requests get a 429 with `X-RateLimit-Scope: shared`
    /// (a resource's limit shared by every bot; not an invalid request).
    Shared { times: u32, retry_after: f64 },
    /// The next `times` requests get a global 429 (`X-RateLimit-Global: true`,
    /// `"global": true`, scope `global`).
    Global { times: u32, retry_after: f64 },
}

/// One frame a client sent.
#[derive(Debug, Clone)]
pub struct ClientFrame {
    /// Connection id (see [`ConnectionInfo::conn`]).
    pub conn: u64,
    /// Shard of the connection when the frame arrived (after IDENTIFY/RESUME).
    pub shard: Option<u32>,
    /// `op` of the frame; 255 when the frame was not a JSON object with a valid `op`.
    pub op: u8,
    /// The parsed frame (for unparsable frames: a JSON string with the lossy text).
    pub json: Value,
    /// Arrival time.
    pub at: Instant,
}

/// One HTTP request the REST API received.
#[derive(Debug, Clone)]
pub struct RestCall {
    pub method: String,
    /// Path without the query, e.g. `/api/v10/users/@me`.
    pub path: String,
    pub user_agent: Option<String>,
    /// Status answered (a hung-up request is not recorded).
    pub status: u16,
    /// The body, when it was JSON.
    pub body: Option<Value>,
    pub at: Instant,
    /// The route template, e.g. `POST /channels/{channel_id}/messages` (`None` for paths
    /// the API does not know).
    pub route: Option<String>,
    /// The bucket the request belongs to: its `X-RateLimit-Bucket` and major parameter,
    /// `"{hash} {major}"` (`None` for unknown paths).
    pub bucket: Option<String>,
    /// For a 429: which limit answered it.
    pub scope: Option<LimitScope>,
}

/// The `X-RateLimit-Scope` of a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    /// The bucket of this bot (counts as an invalid request on Discord).
    User,
    /// The bot's global limit (`X-RateLimit-Global: true`).
    Global,
    /// A resource's limit shared by every bot (not an invalid request).
    Shared,
}

/// 429s answered, by bucket and by scope (see [`RateLimitCounts::of`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitCounts {
    /// 429s of scope `user` per bucket (`RestCall::bucket`).
    pub by_bucket: BTreeMap<String, u32>,
    pub user: u32,
    pub global: u32,
    pub shared: u32,
}

impl RateLimitCounts {
    /// Counts the 429s among `calls` (e.g. `&sim.rest_calls()[from..]`).
    pub fn of(calls: &[RestCall]) -> RateLimitCounts {
        let mut counts = RateLimitCounts::default();
        for c in calls {
            match c.scope {
                Some(LimitScope::User) => {
                    counts.user += 1;
                    let bucket = c.bucket.clone().unwrap_or_default();
                    *counts.by_bucket.entry(bucket).or_default() += 1;
                }
                Some(LimitScope::Global) => counts.global += 1,
                Some(LimitScope::Shared) => counts.shared += 1,
                None => {}
            }
        }
        counts
    }

    /// Every 429, whatever its scope.
    pub fn total(&self) -> u32 {
        self.user + self.global + self.shared
    }
}

/// Which requests a route-scoped injection applies to: `"[METHOD ]/path/prefix"` below
/// `/api/vN`, matched by whole path segments (`/channels/1` covers `/channels/1/messages`,
/// not `/channels/12`); `""` or `"/"` covers every path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteScope {
    method: Option<String>,
    prefix: String,
}

impl RouteScope {
    fn parse(route: &str) -> RouteScope {
        let route = route.trim();
        let (method, prefix) = match route.split_once(' ') {
            Some((m, p)) => (Some(m.to_ascii_uppercase()), p.trim()),
            None if route.starts_with('/') || route.is_empty() => (None, route),
            None => (Some(route.to_ascii_uppercase()), ""),
        };
        RouteScope {
            method,
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn covers(&self, method: &str, api_path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && api_path
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// One accepted WebSocket connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Connection id, starting at 1, in accept order.
    pub conn: u64,
    /// Request path, e.g. `/` or `/resume`.
    pub path: String,
    /// Raw query string, e.g. `v=10&encoding=json&compress=zlib-stream`.
    pub query: String,
    /// The upgrade request's `User-Agent`, if it sent one.
    pub user_agent: Option<String>,
    /// Shard after IDENTIFY/RESUME.
    pub shard: Option<u32>,
    /// Close code the client sent in its own close frame (not an echo of ours).
    pub close_code_received: Option<u16>,
    /// Close code the simulator sent, if it closed the connection.
    pub close_code_sent: Option<u16>,
    /// Accept time.
    pub opened_at: Instant,
    /// Whether the connection has ended.
    pub closed: bool,
    /// Session id after a successful IDENTIFY or RESUME.
    pub session_id: Option<String>,
    /// `d` of the last heartbeat the client sent (`None`: no heartbeat yet; `Some(Null)`: `d: null`).
    pub last_heartbeat: Option<Value>,
    /// Whether the client sent RESUME and it succeeded.
    pub resumed: bool,
}

/// A session as seen by tests.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: String,
    pub shard: [u32; 2],
    /// Last sequence number assigned.
    pub seq: u64,
    /// Connection currently carrying the session.
    pub attached: Option<u64>,
    /// Invalidated (op 9 false, client close 1000/1001, fatal close code).
    pub invalid: bool,
    pub intents: u64,
}

pub(crate) struct Session {
    id: String,
    shard: [u32; 2],
    intents: u64,
    seq: u64,
    /// (s, full serialized envelope)
    log: VecDeque<(u64, Arc<str>)>,
    attached: Option<u64>,
    detached_at: Option<Instant>,
    invalid: bool,
    /// The guilds of the session's shard.
    guilds: HashSet<u64>,
}

impl Session {
    fn append(&mut self, t: &str, d: &str) -> u64 {
        self.seq += 1;
        let s = self.seq;
        let t = serde_json::to_string(t).unwrap_or_else(|_| "\"UNKNOWN\"".into());
        let env = format!("{{\"t\":{t},\"s\":{s},\"op\":0,\"d\":{d}}}");
        self.log.push_back((s, env.into()));
        while self.log.len() > SESSION_LOG_LIMIT {
            self.log.pop_front();
        }
        s
    }

    /// Entries with s > after, in order.
    fn entries_after(&self, after: u64) -> Vec<(u64, Arc<str>)> {
        let first = match self.log.front() {
            Some((s, _)) => *s,
            None => return Vec::new(),
        };
        let start = if after < first {
            0
        } else {
            (after + 1 - first) as usize
        };
        self.log.iter().skip(start).cloned().collect()
    }

    fn resumable(&self, timeout: Duration, now: Instant) -> bool {
        if self.invalid {
            return false;
        }
        match self.detached_at {
            Some(at) if self.attached.is_none() => now.duration_since(at) <= timeout,
            _ => true,
        }
    }
}

pub(crate) struct LiveConn {
    shard: Option<u32>,
    faults: mpsc::UnboundedSender<Fault>,
    pump: Arc<Notify>,
}

pub(crate) struct State {
    cfg: SimConfig,
    frames: Vec<ClientFrame>,
    connections: Vec<ConnectionInfo>,
    sessions: HashMap<String, Session>,
    live: HashMap<u64, LiveConn>,
    buckets: HashMap<u32, Instant>,
    rest_failure: Option<RestFailure>,
    /// Failures injected for the routes under a prefix; the first that covers a request
    /// applies, before `rest_failure`.
    route_failures: Vec<(RouteScope, RestFailure)>,
    /// Delays before answering, for the routes under a prefix (the first that covers).
    route_delays: Vec<(RouteScope, Duration)>,
    rest_requests: u64,
    rest_calls: Vec<RestCall>,
    /// Fixed-window REST buckets: `"{hash} {major}"` -> window.
    rest_buckets: HashMap<String, http::Window>,
    /// The token's global fixed window.
    rest_global: http::Window,
    /// Messages the bot posted (for edit and delete), oldest first in `bot_message_order`.
    bot_messages: HashMap<u64, Value>,
    bot_message_order: VecDeque<u64>,
}

/// Bot messages kept for edits and deletes; older ones answer 404 like deleted ones.
const BOT_MESSAGES_KEPT: usize = 10_000;

impl State {
    /// Keeps one of the bot's messages (a REST message object) for edits and deletes.
    fn remember_bot_message(&mut self, msg: &Value) {
        let Some(id) = msg["id"].as_str().and_then(|i| i.parse::<u64>().ok()) else {
            return;
        };
        self.bot_messages.insert(id, msg.clone());
        self.bot_message_order.push_back(id);
        while self.bot_message_order.len() > BOT_MESSAGES_KEPT {
            if let Some(old) = self.bot_message_order.pop_front() {
                self.bot_messages.remove(&old);
            }
        }
    }

    /// Whether `guild_id` is a guild of the simulated world: one of a session's shard, or of
    /// the configured shard count.
    fn guild_exists(&self, guild_id: u64) -> bool {
        if self.sessions.values().any(|s| s.guilds.contains(&guild_id)) {
            return true;
        }
        let total = self.cfg.shards.max(1);
        let shard = ((guild_id >> 22) % u64::from(total)) as u32;
        guild_ids_for_shard(shard, total, self.cfg.guilds_per_shard).contains(&guild_id)
    }

    /// Sends one dispatch to every live session holding `guild_id` whose intents include one
    /// of `intents` (sequenced and logged for resume). When no live connection carries such a
    /// session, the newest resumable one gets it logged, to be replayed on RESUME.
    /// Returns how many sessions got it.
    fn dispatch_to_guild(&mut self, guild_id: u64, intents: u64, t: &str, d: &str) -> usize {
        self.dispatch_where(
            |s| s.guilds.contains(&guild_id) && s.intents & intents != 0,
            t,
            d,
        )
    }

    fn dispatch_where(&mut self, pick: impl Fn(&Session) -> bool, t: &str, d: &str) -> usize {
        let now = Instant::now();
        let timeout = self.cfg.session_timeout;
        let State { sessions, live, .. } = self;
        let mut n = 0;
        for s in sessions.values_mut() {
            if s.invalid || !pick(s) {
                continue;
            }
            if let Some(c) = s.attached
                && let Some(l) = live.get(&c)
            {
                s.append(t, d);
                l.pump.notify_one();
                n += 1;
            }
        }
        if n == 0 {
            // Newest resumable detached session: the one detached most recently.
            let target = sessions
                .values_mut()
                .filter(|s| pick(s) && s.resumable(timeout, now))
                .max_by_key(|s| s.detached_at);
            if let Some(s) = target {
                s.append(t, d);
                n = 1;
            }
        }
        n
    }

    /// Frees the replay logs of sessions that can never be resumed again.
    fn gc_sessions(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.session_timeout;
        for s in self.sessions.values_mut() {
            if s.attached.is_none() && !s.log.is_empty() && !s.resumable(timeout, now) {
                s.log = VecDeque::new();
            }
        }
    }

    fn conn_mut(&mut self, conn: u64) -> Option<&mut ConnectionInfo> {
        // Connection ids are dense and start at 1.
        let idx = conn.checked_sub(1)? as usize;
        self.connections.get_mut(idx).filter(|c| c.conn == conn)
    }
}

pub(crate) struct Inner {
    state: Mutex<State>,
    changed: Notify,
    shutdown: watch::Sender<bool>,
    api_addr: SocketAddr,
    gw_addr: SocketAddr,
    resume_path: String,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resume_url(&self) -> String {
        format!("ws://{}{}", self.gw_addr, self.resume_path)
    }

    fn gateway_url(&self) -> String {
        format!("ws://{}", self.gw_addr)
    }

    fn notify_changed(&self) {
        self.changed.notify_waiters();
    }
}

pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

struct ShutdownOnDrop(Arc<Inner>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown.send_replace(true);
    }
}

/// The running simulator. Cheap to clone; shuts down when the last clone is dropped
/// or [`Simulator::shutdown`] is called.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
    _guard: Arc<ShutdownOnDrop>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("api", &self.inner.api_addr)
            .field("gateway", &self.inner.gw_addr)
            .finish()
    }
}

impl Simulator {
    /// Binds the HTTP API and the gateway on 127.0.0.1 (ephemeral ports) and starts serving.
    pub async fn start(cfg: SimConfig) -> std::io::Result<Simulator> {
        let api = TcpListener::bind(("127.0.0.1", 0)).await?;
        let gw = TcpListener::bind(("127.0.0.1", 0)).await?;
        let (shutdown, _) = watch::channel(false);
        let resume_path = cfg.resume_path.clone();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                cfg,
                frames: Vec::new(),
                connections: Vec::new(),
                sessions: HashMap::new(),
                live: HashMap::new(),
                buckets: HashMap::new(),
                rest_failure: None,
                route_failures: Vec::new(),
                route_delays: Vec::new(),
                rest_requests: 0,
                rest_calls: Vec::new(),
                rest_buckets: HashMap::new(),
                rest_global: http::Window::default(),
                bot_messages: HashMap::new(),
                bot_message_order: VecDeque::new(),
            }),
            changed: Notify::new(),
            shutdown,
            api_addr: api.local_addr()?,
            gw_addr: gw.local_addr()?,
            resume_path,
        });
        tokio::spawn(http::serve(inner.clone(), api));
        tokio::spawn(gateway::serve(inner.clone(), gw));
        Ok(Simulator {
            _guard: Arc::new(ShutdownOnDrop(inner.clone())),
            inner,
        })
    }

    /// `http://127.0.0.1:PORT/api/v10`
    pub fn api_base(&self) -> String {
        format!("http://{}/api/v10", self.inner.api_addr)
    }

    /// `ws://127.0.0.1:PORT2` (the `url` returned by `/gateway/bot`).
    pub fn gateway_url(&self) -> String {
        self.inner.gateway_url()
    }

    /// `ws://127.0.0.1:PORT2/resume` (READY's `resume_gateway_url`; see
    /// [`SimConfig::resume_path`]).
    pub fn resume_url(&self) -> String {
        self.inner.resume_url()
    }

    /// A copy of the current configuration (including the live `session_start_remaining`).
    pub fn config(&self) -> SimConfig {
        self.inner.lock().cfg.clone()
    }

    /// Applies `fault` to every live connection currently carrying `shard`.
    /// Returns whether at least one connection got it.
    pub fn inject(&self, shard: u32, fault: Fault) -> bool {
        let st = self.inner.lock();
        let mut any = false;
        for live in st.live.values().filter(|l| l.shard == Some(shard)) {
            any |= live.faults.send(fault.clone()).is_ok();
        }
        any
    }

    /// Applies `fault` to one connection by id (also before IDENTIFY). Returns whether it is live.
    pub fn inject_conn(&self, conn: u64, fault: Fault) -> bool {
        let st = self.inner.lock();
        st.live
            .get(&conn)
            .is_some_and(|l| l.faults.send(fault).is_ok())
    }

    /// Every frame any client sent, in arrival order.
    pub fn frames(&self) -> Vec<ClientFrame> {
        self.inner.lock().frames.clone()
    }

    /// Every WebSocket connection accepted, in order.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.inner.lock().connections.clone()
    }

    /// All sessions ever created.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let st = self.inner.lock();
        let mut v: Vec<SessionInfo> = st
            .sessions
            .values()
            .map(|s| SessionInfo {
                session_id: s.id.clone(),
                shard: s.shard,
                seq: s.seq,
                attached: s.attached,
                invalid: s.invalid,
                intents: s.intents,
            })
            .collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    /// Number of HTTP requests the API listener has received.
    pub fn rest_requests(&self) -> u64 {
        self.inner.lock().rest_requests
    }

    /// Polls `f` until it returns true (waking on every new frame / connection change and
    /// at least every 10 ms) or `timeout` passes. Returns the last result of `f`.
    pub async fn wait_until<F: Fn(&Simulator) -> bool>(&self, f: F, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if f(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let tick = (now + Duration::from_millis(10)).min(deadline);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(tick) => {}
            }
        }
    }

    /// Sets `session_start_limit.remaining`.
    pub fn set_session_start_remaining(&self, n: u32) {
        self.inner.lock().cfg.session_start_remaining = n;
    }

    /// Makes every REST route fail (see [`RestFailure`]); `None` restores normal service.
    pub fn set_rest_failure(&self, f: Option<RestFailure>) {
        self.inner.lock().rest_failure = f;
    }

    /// Makes the routes under `route` fail, the others answering as usual: `route` is
    /// `"[METHOD ]/path/prefix"` below `/api/vN` (`"POST /channels/1/messages"`,
    /// `"/channels/1"`), matched by whole segments. Replaces what was set for the same
    /// `route`; `None` clears it. A counted failure (`Times`, `Count`, …) is cleared once
    /// spent. Applies before [`Simulator::set_rest_failure`]'s.
    pub fn set_route_failure(&self, route: &str, f: Option<RestFailure>) {
        let scope = RouteScope::parse(route);
        let mut st = self.inner.lock();
        st.route_failures.retain(|(s, _)| *s != scope);
        if let Some(f) = f {
            st.route_failures.push((scope, f));
        }
    }

    /// Holds every answer of the routes under `route` (as for
    /// [`Simulator::set_route_failure`]; `""` for all) for `delay` before writing it; the
    /// request itself is handled on arrival. `None` clears it.
    pub fn set_route_delay(&self, route: &str, delay: Option<Duration>) {
        let scope = RouteScope::parse(route);
        let mut st = self.inner.lock();
        st.route_delays.retain(|(s, _)| *s != scope);
        if let Some(d) = delay {
            st.route_delays.push((scope, d));
        }
    }

    /// The 429s answered so far, by bucket and scope.
    pub fn rate_limits(&self) -> RateLimitCounts {
        RateLimitCounts::of(&self.inner.lock().rest_calls)
    }

    /// Sends one dispatch to every live session of `shard` (sequenced and logged for resume).
    /// If no connection currently carries a session of that shard, the newest resumable
    /// session of that shard gets it logged, to be replayed on RESUME.
    /// Returns how many sessions got it.
    pub fn dispatch(&self, shard: u32, t: &str, d: Value) -> usize {
        let d = d.to_string();
        self.inner
            .lock()
            .dispatch_where(|s| s.shard[0] == shard, t, &d)
    }

    /// A message from one of the guild's members in `channel_id` (a text channel or thread
    /// of [`world`]), dispatched as MESSAGE_CREATE like Discord would: to the sessions holding
    /// the channel's guild with GUILD_MESSAGES. Returns the message, or `None` for a channel
    /// that does not exist.
    pub fn member_message(&self, channel_id: u64, content: &str) -> Option<Value> {
        let guild_id = world::guild_of(channel_id);
        let mut st = self.inner.lock();
        if !st.guild_exists(guild_id) || !world::is_messageable(channel_id) {
            return None;
        }
        let msg = world::member_message(channel_id, content);
        st.dispatch_to_guild(guild_id, 1 << 9, "MESSAGE_CREATE", &msg.to_string());
        Some(msg)
    }

    /// A message by the bot in `channel_id`, as if it had posted it earlier: kept for
    /// `PATCH`/`DELETE /channels/{id}/messages/{id}`, dispatched nowhere. Returns the REST
    /// message object, or `None` for a channel that does not exist.
    pub fn bot_message(&self, channel_id: u64, content: &str) -> Option<Value> {
        let guild_id = world::guild_of(channel_id);
        let mut st = self.inner.lock();
        if !st.guild_exists(guild_id) || !world::is_messageable(channel_id) {
            return None;
        }
        let msg = world::bot_message(channel_id, content, None, false);
        st.remember_bot_message(&msg);
        Some(msg)
    }

    /// The guilds of `shard` with the configured shard count.
    pub fn shard_guilds(&self, shard: u32) -> Vec<u64> {
        let cfg = &self.inner.lock().cfg;
        guild_ids_for_shard(shard, cfg.shards.max(1), cfg.guilds_per_shard)
    }

    /// Every REST request answered so far, in order.
    pub fn rest_calls(&self) -> Vec<RestCall> {
        self.inner.lock().rest_calls.clone()
    }

    /// Stops the listeners and drops every connection.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner.notify_changed();
    }
}
