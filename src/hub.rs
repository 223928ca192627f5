//! What shards, the supervisor and the bot server share: the event log, each
//! shard's live statistics, the stream of session reports, the identify
//! budget, bot acknowledgements and the command channels into the shards.
//!
//! Shards only ever write here without waiting on anyone: counters are
//! atomics, session reports go into a broadcast channel that drops for
//! laggards, and events go into the event log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::event_log::EventLog;

/// What a shard is doing (DESIGN.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ShardState {
    /// Not started yet.
    Idle = 0,
    /// Waiting for its turn in the identify queue (or for identify budget).
    Queued = 1,
    /// Opening the WebSocket.
    Connecting = 2,
    /// Connected, waiting for HELLO.
    AwaitingHello = 3,
    /// IDENTIFY sent, waiting for READY.
    Identifying = 4,
    /// RESUME sent, waiting for RESUMED.
    Resuming = 5,
    /// READY or RESUMED received; events flowing.
    Active = 6,
    /// Connection lost; waiting out backoff before the next attempt.
    Reconnecting = 7,
    /// Stopped for good (fatal close code, or no identify budget).
    Fatal = 8,
    /// Stopped by a shutdown.
    Stopped = 9,
}

impl ShardState {
    /// The name used in logs and in the bot protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Idle => "idle",
            ShardState::Queued => "queued",
            ShardState::Connecting => "connecting",
            ShardState::AwaitingHello => "awaiting_hello",
            ShardState::Identifying => "identifying",
            ShardState::Resuming => "resuming",
            ShardState::Active => "active",
            ShardState::Reconnecting => "reconnecting",
            ShardState::Fatal => "fatal",
            ShardState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> ShardState {
        match v {
            1 => ShardState::Queued,
            2 => ShardState::Connecting,
            3 => ShardState::AwaitingHello,
            4 => ShardState::Identifying,
            5 => ShardState::Resuming,
            6 => ShardState::Active,
            7 => ShardState::Reconnecting,
            8 => ShardState::Fatal,
            9 => ShardState::Stopped,
            _ => ShardState::Idle,
        }
    }
}

/// Most event types a daemon can forward (one bit each in a bot filter).
pub const MAX_EVENTS: usize = 127;

/// The configured dispatch events; an event's position is its filter bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTable {
    /// Every name that ever had a bit in this daemon's life.
    names: Vec<String>,
    /// Bits of the names currently configured.
    active: u128,
}

impl EventTable {
    /// A table of `names`, all active.
    pub fn new(names: Vec<String>) -> Self {
        let active = (0..names.len().min(MAX_EVENTS)).fold(0u128, |m, i| m | (1 << i));
        EventTable { names, active }
    }

    /// The filter bit of `t`, if it is configured.
    pub fn index(&self, t: &str) -> Option<u8> {
        self.names
            .iter()
            .position(|name| name == t)
            .filter(|&i| self.active & (1 << i) != 0)
            .map(|i| i as u8)
    }

    /// Names currently configured, in bit order.
    pub fn active_names(&self) -> impl Iterator<Item = &str> {
        self.names
            .iter()
            .enumerate()
            .filter(|(i, _)| self.active & (1 << i) != 0)
            .map(|(_, name)| name.as_str())
    }

    /// Every name with a bit (active or not), by bit.
    pub fn all_names(&self) -> &[String] {
        &self.names
    }

    /// This table changed to configure exactly `names`.
    pub fn with(&self, names: &[String]) -> Result<EventTable, String> {
        let mut next = self.clone();
        next.active = 0;
        for name in names {
            let i = match next.names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    next.names.push(name.clone());
                    next.names.len() - 1
                }
            };
            if i >= MAX_EVENTS {
                return Err(format!(
                    "this daemon has seen {} different event names; adding {name} needs a restart",
                    MAX_EVENTS
                ));
            }
            next.active |= 1 << i;
        }
        Ok(next)
    }
}

/// Number of heartbeat round trips kept for latency percentiles.
const LATENCY_WINDOW: usize = 64;

/// Live statistics of one shard, written by its actor, read by anyone.
pub struct ShardStats {
    /// Shard id.
    pub shard: u32,
    state: AtomicU8,
    /// Last heartbeat round trip in ms (`u64::MAX` = none yet).
    latency_ms: AtomicU64,
    /// Last sequence number received.
    pub seq: AtomicU64,
    /// IDENTIFYs sent.
    pub identifies: AtomicU32,
    /// RESUMEs that succeeded.
    pub resumes: AtomicU32,
    /// Zombied connections detected.
    pub zombies: AtomicU32,
    /// Heartbeats that went unacknowledged.
    pub heartbeat_misses: AtomicU32,
    /// Seq of the last state-changing dispatch the front door's cache
    /// applied (saved with the cache snapshot).
    pub cache_seq: AtomicU64,
    /// Dispatches at or below this seq are already in a cache restored from
    /// a snapshot: a resume's replay of them is not applied twice (until the
    /// next READY, which starts a new sequence).
    pub cache_skip: AtomicU64,
    /// Connections lost or refused (`closed`, `zombie`, `invalidated`,
    /// `fatal` reports) since start: zero while a shard is merely starting.
    pub setbacks: AtomicU32,
    /// Last close code received (0 = none).
    pub last_close: AtomicU32,
    /// Dispatches received / forwarded, and bytes received (inflated).
    pub events: AtomicU64,
    /// Dispatches forwarded to the event log.
    pub forwarded: AtomicU64,
    /// Dispatches dropped because no bot subscription wants them.
    pub unsubscribed: AtomicU64,
    /// Inflated bytes received.
    pub bytes: AtomicU64,
    /// Current session generation (bumped on each READY).
    pub session_gen: AtomicU32,
    /// The highest seq of the current session that a resume may start from
    /// (`u64::MAX` = no limit): set when events could not be forwarded (no
    /// durable cursor lease), so a later restart has Discord replay them.
    pub resume_cap: AtomicU64,
    /// Session id, resume URL and when the session started.
    session: Mutex<SessionInfo>,
    /// Session ids of the latest generations (for consumers reading the
    /// event log behind the live session, e.g. JetStream message ids).
    session_ids: Mutex<std::collections::VecDeque<(u32, Arc<str>)>>,
    latencies: Mutex<Vec<u32>>,
    /// Forwarded dispatches per configured event (index = filter bit).
    by_event: Box<[AtomicU64]>,
    /// The latest `session` line about this shard, replayed to diagnostics
    /// bots when they connect so they know each shard's state at once.
    last_report: Mutex<Option<Bytes>>,
    /// This daemon runs the shard now. Always true without `[cluster]`;
    /// with it, true only while this daemon holds the shard's lease.
    pub owned: std::sync::atomic::AtomicBool,
    /// The fencing token of this daemon's lease on the shard (0 = none, or
    /// no `[cluster]`).
    pub fence: AtomicU64,
    /// `d` of the session's READY as Discord sent it: the front door builds
    /// each drop-in client's READY from it (DESIGN.md §5).
    ready: Mutex<Option<Bytes>>,
}

/// The session a shard holds.
#[derive(Clone, Debug, Default)]
pub struct SessionInfo {
    /// Discord's session id.
    pub session_id: Option<String>,
    /// READY's `resume_gateway_url`.
    pub resume_url: Option<String>,
    /// When READY arrived.
    pub started: Option<Instant>,
}

impl ShardStats {
    /// Whether the dispatch `seq` goes into the front door's cache (not a
    /// replay of what a restored cache holds); remembers it as applied.
    pub fn cache_takes(&self, seq: u64) -> bool {
        // A skipped replay is already held: `cache_seq` stays where the
        // restored cache put it, never below.
        let takes = seq > self.cache_skip.load(Ordering::Relaxed);
        if takes {
            self.cache_seq.store(seq, Ordering::Relaxed);
        }
        takes
    }

    /// Fresh statistics for `shard`.
    pub fn new(shard: u32) -> Self {
        Self::with_events(shard, 0)
    }

    /// Fresh statistics for `shard`, counting each of `events` configured
    /// event types separately.
    pub fn with_events(shard: u32, events: usize) -> Self {
        ShardStats {
            by_event: (0..events).map(|_| AtomicU64::new(0)).collect(),
            shard,
            state: AtomicU8::new(ShardState::Idle as u8),
            latency_ms: AtomicU64::new(u64::MAX),
            seq: AtomicU64::new(0),
            identifies: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
            zombies: AtomicU32::new(0),
            heartbeat_misses: AtomicU32::new(0),
            last_close: AtomicU32::new(0),
            events: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            unsubscribed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            session_gen: AtomicU32::new(0),
            resume_cap: AtomicU64::new(u64::MAX),
            setbacks: AtomicU32::new(0),
            cache_seq: AtomicU64::new(0),
            cache_skip: AtomicU64::new(0),
            session: Mutex::new(SessionInfo::default()),
            session_ids: Mutex::new(std::collections::VecDeque::new()),
            latencies: Mutex::new(Vec::with_capacity(LATENCY_WINDOW)),
            last_report: Mutex::new(None),
            owned: std::sync::atomic::AtomicBool::new(true),
            fence: AtomicU64::new(0),
            ready: Mutex::new(None),
        }
    }

    /// Whether this daemon runs the shard now.
    pub fn is_owned(&self) -> bool {
        self.owned.load(Ordering::Relaxed)
    }

    /// Keep the raw `d` of this shard's READY (once per session).
    pub fn set_ready(&self, d: &[u8]) {
        *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(Bytes::copy_from_slice(d));
    }

    /// The raw `d` of this shard's latest READY, if one arrived.
    pub fn ready(&self) -> Option<Bytes> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The latest session line about this shard.
    pub fn last_report(&self) -> Option<Bytes> {
        self.last_report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Count one forwarded dispatch of configured event `index`.
    pub fn count_event(&self, index: u8) {
        if let Some(counter) = self.by_event.get(index as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forwarded dispatches per configured event index.
    pub fn events_by_type(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.by_event
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::Relaxed)))
    }

    /// Last close code received, if any.
    pub fn last_close(&self) -> Option<u32> {
        match self.last_close.load(Ordering::Relaxed) {
            0 => None,
            code => Some(code),
        }
    }

    /// Current state.
    pub fn state(&self) -> ShardState {
        ShardState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Record a state change.
    pub fn set_state(&self, state: ShardState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Record one heartbeat round trip.
    pub fn record_latency(&self, ms: u64) {
        self.latency_ms.store(ms, Ordering::Relaxed);
        metrics::histogram!("shardwarden_heartbeat_latency_seconds", "shard" => self.shard.to_string())
            .record(ms as f64 / 1000.0);
        let mut window = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if window.len() == LATENCY_WINDOW {
            window.remove(0);
        }
        window.push(ms.min(u32::MAX as u64) as u32);
    }

    /// Last heartbeat round trip, if any.
    pub fn latency_ms(&self) -> Option<u64> {
        match self.latency_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(ms),
        }
    }

    /// p50 and p99 over the recent round trips.
    pub fn latency_percentiles(&self) -> Option<(u32, u32)> {
        let mut window = self
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if window.is_empty() {
            return None;
        }
        window.sort_unstable();
        let at = |q: f64| window[((window.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }

    /// The session currently held.
    pub fn session(&self) -> SessionInfo {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Remember that session generation `generation` is Discord session `id`.
    pub fn remember_session_id(&self, generation: u32, id: &str) {
        let mut ids = self.session_ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.retain(|(g, _)| *g != generation);
        if ids.len() == 8 {
            ids.pop_front();
        }
        ids.push_back((generation, Arc::from(id)));
    }

    /// The Discord session id of generation `generation`, if still known.
    pub fn session_id_of(&self, generation: u32) -> Option<Arc<str>> {
        self.session_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, id)| id.clone())
    }

    /// Replace the session (None fields clear it).
    pub fn set_session(&self, info: SessionInfo) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = info;
    }
}

/// `session_start_limit` as last seen, and what the daemon spent since.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct IdentifyBudget {
    /// Session starts left in the window.
    pub remaining: u32,
    /// Session starts per window.
    pub total: u32,
    /// When the window resets (unix ms), if known.
    #[serde(skip)]
    pub resets_at_ms: u64,
    /// Identifies per 5 s (bucket count).
    #[serde(skip)]
    pub max_concurrency: u32,
}

/// Why the daemon refused a bot's `send` (the bot protocol's error codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRefusal {
    /// Protocol error code, e.g. `rate_limited`.
    pub code: &'static str,
    /// What happened and what to do.
    pub message: String,
}

/// A gateway command from a bot, routed to a shard.
pub struct OutboundCommand {
    /// The serialized payload (`{"op":..,"d":..}`), already checked for op
    /// and size.
    pub payload: String,
    /// Answered once the frame is written (or refused).
    pub reply: oneshot::Sender<Result<(), SendRefusal>>,
}

/// Everything the daemon's parts share.
pub struct Hub {
    /// The cursor-numbered replay ring.
    pub log: EventLog,
    /// Statistics of the shards this daemon owns, by position.
    pub shards: Vec<Arc<ShardStats>>,
    /// Total shard count (`[shard, total]` in IDENTIFY).
    pub shard_total: u32,
    /// The configured events (swapped whole on a SIGHUP reload).
    events: RwLock<Arc<EventTable>>,
    /// Bumped whenever `events` changes, so shards refresh their copy
    /// without taking the lock per event.
    events_gen: AtomicU64,
    /// Session report lines (`{"op":"session",...}\n`) for diagnostics bots.
    pub sessions: broadcast::Sender<Bytes>,
    /// Command channels into each owned shard.
    pub commands: HashMap<u32, mpsc::Sender<OutboundCommand>>,
    /// Identify budget as last known.
    pub budget: Mutex<IdentifyBudget>,
    /// Each bot client's ack, and the resume point they give together.
    pub consumers: crate::consumers::Consumers,
    /// Events not forwarded because the cursor lease could not be written.
    pub unforwarded: AtomicU64,
    /// Woken when a shard's session starts or ends, so the state file holds
    /// it within milliseconds, not at the next periodic check.
    pub session_changed: tokio::sync::Notify,
    /// The JetStream sink's state (DESIGN §4).
    pub broker: crate::cluster::broker::BrokerStats,
    /// Redis coordination's state (DESIGN §4).
    pub cluster: crate::cluster::ownership::ClusterStats,
    /// Highest cursor handed to any bot's socket (0 = none).
    pub delivered: AtomicU64,
    /// Bot clients connected now.
    pub bot_clients: AtomicU32,
    /// `gap` messages sent to bots, and the cursors they reported lost.
    pub gaps: AtomicU64,
    /// Cursors bots lost to ring overflow (sum over gaps).
    pub missed: AtomicU64,
    /// How often diagnostics bots get `health` (ms; 0 = the bot server's
    /// configured default). Changed by a SIGHUP reload.
    health_interval_ms: AtomicU64,
    /// The drop-in front door's state cache and sessions, when `[proxy]` is
    /// set (shards feed the cache; `health` lists the sessions).
    pub frontdoor: std::sync::OnceLock<Arc<crate::frontdoor::Shared>>,
    /// The suspected Discord-side incident in progress, if any.
    incident: Mutex<Option<IncidentReport>>,
    /// Why the daemon is about to close bot sockets (`closing` reason and
    /// detail), set before shutdown is signalled.
    closing: Mutex<Option<(&'static str, String)>>,
    /// Incidents suspected since start.
    pub incidents: AtomicU64,
    /// Decides when failures point at Discord (gateway and REST evidence).
    pub detector: crate::upstream::incident::IncidentDetector,
    /// Notified when an incident is raised or cleared.
    pub incident_changed: tokio::sync::Notify,
}

impl Hub {
    /// A hub for `shards` (statistics per shard are created here) out of
    /// `shard_total`, forwarding `events`.
    pub fn new(
        log: EventLog,
        shards: &[u32],
        shard_total: u32,
        events: Vec<String>,
        commands: HashMap<u32, mpsc::Sender<OutboundCommand>>,
        budget: IdentifyBudget,
    ) -> Hub {
        Hub {
            log,
            shards: shards
                .iter()
                .map(|&s| Arc::new(ShardStats::with_events(s, MAX_EVENTS)))
                .collect(),
            shard_total,
            events: RwLock::new(Arc::new(EventTable::new(events))),
            events_gen: AtomicU64::new(0),
            sessions: broadcast::channel(4096).0,
            commands,
            budget: Mutex::new(budget),
            consumers: crate::consumers::Consumers::new(std::time::Duration::from_secs(
                crate::config::defaults::CONSUMER_TTL_SECS,
            )),
            unforwarded: AtomicU64::new(0),
            session_changed: tokio::sync::Notify::new(),
            broker: Default::default(),
            cluster: Default::default(),
            delivered: AtomicU64::new(0),
            bot_clients: AtomicU32::new(0),
            gaps: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            health_interval_ms: AtomicU64::new(0),
            frontdoor: std::sync::OnceLock::new(),
            incident: Mutex::new(None),
            closing: Mutex::new(None),
            incidents: AtomicU64::new(0),
            detector: Default::default(),
            incident_changed: tokio::sync::Notify::new(),
        }
    }

    /// The `health` interval set by a reload, if any.
    pub fn health_interval(&self) -> Option<std::time::Duration> {
        match self.health_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Change the `health` interval of diagnostics bots (SIGHUP).
    pub fn set_health_interval(&self, every: std::time::Duration) {
        self.health_interval_ms
            .store(every.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// The configured events now.
    pub fn events(&self) -> Arc<EventTable> {
        self.events
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes whenever the configured events change.
    pub fn events_generation(&self) -> u64 {
        self.events_gen.load(Ordering::Relaxed)
    }

    /// Replace the configured events (SIGHUP). Names keep their filter bit;
    /// new names get new bits; removed names stop being forwarded.
    pub fn set_events(&self, names: &[String]) -> Result<(), String> {
        let mut table = self.events.write().unwrap_or_else(|p| p.into_inner());
        let next = table.with(names)?;
        *table = Arc::new(next);
        self.events_gen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The bit of `event` in bot filters, if it is a configured event.
    pub fn event_index(&self, event: &str) -> Option<u8> {
        self.events().index(event)
    }

    /// The configured event names.
    pub fn event_names(&self) -> Vec<String> {
        self.events().active_names().map(str::to_string).collect()
    }

    /// Filter for `["*"]`: every configured event, including events a
    /// reload adds later (the log only ever holds configured events).
    pub fn all_events_filter(&self) -> u128 {
        u128::MAX
    }

    /// Stats of a shard this daemon runs now (`None`: not owned; with
    /// `[cluster]`, not leased by this daemon at the moment).
    pub fn shard(&self, shard: u32) -> Option<&Arc<ShardStats>> {
        self.shard_stats(shard).filter(|s| s.is_owned())
    }

    /// Stats of a shard this daemon may run (with `[cluster]`: every shard
    /// it may lease), owned now or not.
    pub fn shard_stats(&self, shard: u32) -> Option<&Arc<ShardStats>> {
        self.shards.iter().find(|s| s.shard == shard)
    }

    /// The shards this daemon runs now.
    pub fn owned(&self) -> impl Iterator<Item = &Arc<ShardStats>> {
        self.shards.iter().filter(|s| s.is_owned())
    }

    /// Shard that owns a guild: `(guild_id >> 22) % shard_total`.
    pub fn shard_for_guild(&self, guild_id: u64) -> u32 {
        ((guild_id >> 22) % u64::from(self.shard_total.max(1))) as u32
    }

    /// Publish one session report to diagnostics bots.
    pub fn report(&self, report: &SessionReport) {
        let mut line = serde_json::to_vec(report).unwrap_or_default();
        line.push(b'\n');
        let line = Bytes::from(line);
        if let Some(stats) = self.shard(report.shard) {
            if matches!(report.event, "closed" | "zombie" | "invalidated" | "fatal") {
                stats.setbacks.fetch_add(1, Ordering::Relaxed);
            }
            *stats.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(line.clone());
        }
        // No receivers is fine: nobody listens for diagnostics right now.
        let _ = self.sessions.send(line);
    }

    /// Publish a change of the daemon-wide incident state to diagnostics
    /// bots (DESIGN.md §3.2 `incident`) and keep it for `health`.
    pub fn report_incident(&self, report: &IncidentReport) {
        {
            let mut current = self.incident.lock().unwrap_or_else(|p| p.into_inner());
            if report.state == IncidentReport::SUSPECTED {
                self.incidents.fetch_add(1, Ordering::Relaxed);
                *current = Some(report.clone());
            } else {
                *current = None;
            }
        }
        let _ = self.sessions.send(report.line());
        self.incident_changed.notify_one();
    }

    /// A REST call's outcome on `route` (a template without ids or
    /// tokens): `failed` Discord-side (5xx, transport) or answered. Raises
    /// or clears the suspected incident when the evidence says so.
    pub fn observe_rest(&self, route: &str, failed: bool) {
        if let Some(report) = self.detector.rest(route, failed, self) {
            self.report_incident(&report);
        }
    }

    /// Say why bot sockets are about to be closed (sent to each bot as
    /// `closing` before its socket is closed).
    pub fn set_closing(&self, reason: &'static str, detail: String) {
        *self.closing.lock().unwrap_or_else(|p| p.into_inner()) = Some((reason, detail));
    }

    /// The `closing` line for bots whose sockets the daemon closes now.
    pub fn closing_line(&self) -> Bytes {
        match &*self.closing.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((reason, detail)) => crate::protocol::closing_line(reason, detail),
            None => crate::protocol::closing_line(
                crate::protocol::closing::SHUTDOWN,
                "the daemon is stopping; reconnect and resume_from your last cursor",
            ),
        }
    }

    /// The incident in progress, if any.
    pub fn incident(&self) -> Option<IncidentReport> {
        self.incident
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The `health` message (DESIGN.md §3.2) as one line.
    pub fn health_line(&self) -> Bytes {
        let shards: Vec<HealthShard> = self
            .owned()
            .map(|s| HealthShard {
                shard: s.shard,
                state: s.state().as_str(),
                latency_ms: s.latency_ms(),
                seq: s.seq.load(Ordering::Relaxed),
                identifies: s.identifies.load(Ordering::Relaxed),
                resumes: s.resumes.load(Ordering::Relaxed),
                zombies: s.zombies.load(Ordering::Relaxed),
                last_close: s.last_close(),
                session_age_s: s.session().started.map(|t| t.elapsed().as_secs()),
            })
            .collect();
        let (ring_bytes, ring_events, _) = self.log.usage();
        let head = self.log.head();
        let message = HealthMessage {
            op: "health",
            at: crate::clock::now_rfc3339(),
            shards,
            identify_budget: *self.budget.lock().unwrap_or_else(|p| p.into_inner()),
            head,
            oldest: self.log.oldest_held(),
            ring_bytes,
            ring_events,
            bot_clients: self.bot_clients.load(Ordering::Relaxed),
            dropin: self.frontdoor.get().map(|f| f.sessions.health()),
            clients: self.consumers.view(head),
            unforwarded: self.unforwarded.load(Ordering::Relaxed),
            broker: self.broker.view(head),
            cluster: self.cluster.view(self),
            incident: self.incident().map(|i| HealthIncident {
                state: i.state,
                since: i.at,
                shards: i.shards,
                detail: i.detail,
            }),
        };
        let mut line = serde_json::to_vec(&message).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

#[derive(Serialize)]
struct HealthShard {
    shard: u32,
    state: &'static str,
    latency_ms: Option<u64>,
    seq: u64,
    identifies: u32,
    resumes: u32,
    zombies: u32,
    last_close: Option<u32>,
    session_age_s: Option<u64>,
}

#[derive(Serialize)]
struct HealthMessage {
    op: &'static str,
    at: String,
    shards: Vec<HealthShard>,
    identify_budget: IdentifyBudget,
    head: u64,
    oldest: Option<u64>,
    ring_bytes: usize,
    ring_events: usize,
    bot_clients: u32,
    /// Drop-in front door sessions (only when `[proxy]` is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    dropin: Option<Vec<crate::frontdoor::DropinHealth>>,
    /// Each bot client's ack and lag (DESIGN §3.3).
    clients: Vec<crate::consumers::ConsumerView>,
    /// Events not forwarded because the state directory could not be written.
    unforwarded: u64,
    /// The JetStream sink, when `[broker]` is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<crate::cluster::broker::BrokerView>,
    /// Redis coordination and this daemon's shard leases, with `[cluster]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<crate::cluster::ownership::ClusterView>,
    /// The suspected Discord-side incident in progress (`null`: none).
    incident: Option<HealthIncident>,
}

#[derive(Serialize)]
struct HealthIncident {
    state: &'static str,
    since: String,
    shards: Vec<u32>,
    detail: String,
}

/// A suspected Discord-side incident, or its end, as sent to diagnostics
/// bots (`{"op":"incident",...}`, DESIGN.md §3.2): a daemon-wide fact,
/// never one shard's `session` event.
#[derive(Debug, Clone, Serialize)]
pub struct IncidentReport {
    /// Always `"incident"`.
    pub op: &'static str,
    /// [`IncidentReport::SUSPECTED`] or [`IncidentReport::RECOVERED`].
    pub state: &'static str,
    /// When it was noticed.
    pub at: String,
    /// The shards whose failures made it likely (for `recovered`: those of
    /// the incident that ended).
    pub shards: Vec<u32>,
    /// What happened and what the daemon does about it, for a human.
    pub detail: String,
}

impl IncidentReport {
    /// Many shards failed together: Discord is the likelier culprit.
    pub const SUSPECTED: &'static str = "suspected";
    /// Every shard is back.
    pub const RECOVERED: &'static str = "recovered";

    /// A report stamped now.
    pub fn new(state: &'static str, shards: Vec<u32>, detail: String) -> Self {
        IncidentReport {
            op: "incident",
            state,
            at: crate::clock::now_rfc3339(),
            shards,
            detail,
        }
    }

    /// The NDJSON line.
    pub fn line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// A lifecycle change of one shard, as sent to diagnostics bots
/// (`{"op":"session",...}`) and logged.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    /// Always `"session"`.
    pub op: &'static str,
    /// Shard id.
    pub shard: u32,
    /// `connecting`, `ready`, `resumed`, `zombie`, `reconnect_requested`,
    /// `invalidated`, `closed` or `fatal`.
    pub event: &'static str,
    /// When it happened.
    pub at: String,
    /// The session concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Last sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Close code, when the connection ended with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    /// `resumable`, `reidentify`, `fatal` or `transport`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    /// What happened and what the daemon does next, for a human.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl SessionReport {
    /// A report of `event` on `shard`, stamped now.
    pub fn new(shard: u32, event: &'static str) -> Self {
        SessionReport {
            op: "session",
            shard,
            event,
            at: crate::clock::now_rfc3339(),
            session_id: None,
            seq: None,
            close_code: None,
            class: None,
            detail: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn event_table_keeps_bits_across_reloads() {
        let table = EventTable::new(names(&["READY", "MESSAGE_CREATE"]));
        assert_eq!(table.index("MESSAGE_CREATE"), Some(1));
        let next = table
            .with(&names(&["MESSAGE_CREATE", "GUILD_DELETE"]))
            .expect("fits");
        assert_eq!(next.index("READY"), None, "removed: no longer forwarded");
        assert_eq!(next.index("MESSAGE_CREATE"), Some(1), "same bit as before");
        assert_eq!(next.index("GUILD_DELETE"), Some(2), "new bit");
        assert_eq!(
            next.active_names().collect::<Vec<_>>(),
            vec!["MESSAGE_CREATE", "GUILD_DELETE"]
        );
        let back = next.with(&names(&["READY"])).expect("fits");
        assert_eq!(
            back.index("READY"),
            Some(0),
            "a returning name keeps its bit"
        );
    }

    #[test]
    fn event_table_has_room_for_127_names() {
        let many: Vec<String> = (0..MAX_EVENTS).map(|i| format!("E{i}")).collect();
        let table = EventTable::new(many);
        assert!(table.with(&names(&["ONE_MORE"])).is_err());
    }
}
