//! The gateway protocol from Discord's side, for one drop-in client
//! connection (DESIGN.md §5; facts §3–§5 read from the server's end).
//!
//! The connection task owns everything that belongs to the connection
//! (compression context, send-limit window, heartbeat deadline); the
//! session it carries lives in [`super::sessions`] and outlives it. Events
//! come from the event log, read after the session's position exactly as a
//! socket bot reads them: the shard never waits on a client, and a client
//! that falls out of the ring is closed (its RESUME then gets op 9 `false`),
//! never silently skipped ahead.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::{Duration, Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::compress::Deflater;
use super::server::Ctx;
use super::sessions::{self, Session};
use crate::compression::Compression;
use crate::event_log::Entry;
use crate::gateway::{self as facts, op};
use crate::hub::{OutboundCommand, ShardState};
use crate::ratelimit::SendLimiter;

/// Ring entries looked at per read; the client's socket is written between
/// reads, so heartbeats are answered during a long replay.
const READ_BATCH: usize = 256;
/// How often a client waiting for its shard's READY is checked on.
const SHARD_WAIT_TICK: Duration = Duration::from_millis(100);
/// GUILDS: without it a client gets no GUILD_CREATE.
const GUILDS: u64 = 1;

/// What the upgrade request asked for.
pub struct Params {
    /// `v` (10 or 9); `Err` holds the refused value for close 4012.
    pub v: Result<u8, String>,
    /// `compress`.
    pub compression: Compression,
    /// Connection number.
    pub conn: u64,
    /// Peer address, for logs.
    pub peer: SocketAddr,
}

/// Close codes for client mistakes (facts §3.1, from the server's side),
/// and the daemon's own reasons to close.
mod close {
    /// Resumable: the session is kept (no heartbeat, fell behind,
    /// shutdown, taken over).
    pub const UNKNOWN_ERROR: u16 = 4000;
    /// Unknown opcode or bad payload for a valid opcode.
    pub const UNKNOWN_OPCODE: u16 = 4001;
    /// Not decodable, or over 4096 bytes.
    pub const DECODE_ERROR: u16 = 4002;
    /// A command before IDENTIFY.
    pub const NOT_AUTHENTICATED: u16 = 4003;
    /// Wrong token.
    pub const AUTHENTICATION_FAILED: u16 = 4004;
    /// A second IDENTIFY.
    pub const ALREADY_AUTHENTICATED: u16 = 4005;
    /// Over 120 frames in 60 s.
    pub const RATE_LIMITED: u16 = 4008;
    /// Shard not owned, or wrong total.
    pub const INVALID_SHARD: u16 = 4010;
    /// No shard while the daemon runs several.
    pub const SHARDING_REQUIRED: u16 = 4011;
    /// `v` not 9 or 10.
    pub const INVALID_API_VERSION: u16 = 4012;
    /// Intents malformed, or not held by the daemon.
    pub const INVALID_INTENTS: u16 = 4013;
    /// Privileged intents the daemon does not hold.
    pub const DISALLOWED_INTENTS: u16 = 4014;
}

/// How a connection ended, for the log line.
enum End {
    /// We closed with this code.
    Closed(u16, String),
    /// The client closed (code, if any).
    ClientClosed(Option<u16>),
    /// The socket failed.
    Transport(String),
}

#[derive(Deserialize)]
struct Frame<'a> {
    op: Option<i64>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Identify {
    token: String,
    #[serde(default)]
    intents: Option<Value>,
    #[serde(default)]
    shard: Option<[u64; 2]>,
    #[serde(default)]
    compress: Option<bool>,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
    #[serde(default)]
    presence: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Resume {
    token: String,
    session_id: String,
    #[serde(default)]
    seq: Option<u64>,
}

/// An IDENTIFY accepted but waiting for the shard's READY.
struct PendingIdentify {
    shard: u32,
    intents: u64,
    echo_shard: bool,
    client: String,
    presence: Option<Box<RawValue>>,
}

/// One client connection.
struct Client<S> {
    ctx: Arc<Ctx>,
    ws: WebSocketStream<S>,
    deflater: Deflater,
    conn: u64,
    v: u8,
    peer: SocketAddr,
    limiter: SendLimiter,
    heartbeat_deadline: Instant,
    session: Option<Arc<Mutex<Session>>>,
    kick: Arc<Notify>,
    pending: Option<PendingIdentify>,
    /// Ring position at which RESUMED is due (replay done).
    replay_until: Option<u64>,
    entries: Vec<Entry>,
    /// More ring entries are waiting (read again without waiting for a new head).
    more: bool,
}

/// Serve one upgraded connection until it ends.
pub async fn serve<S>(ws: WebSocketStream<S>, params: Params, ctx: Arc<Ctx>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deflater = match Deflater::new(params.compression) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(event = %"dropin_closed", conn = params.conn, "cannot create a compressor: {e}");
            return;
        }
    };
    let mut client = Client {
        heartbeat_deadline: Instant::now() + ctx.heartbeat * 3 / 2,
        ctx,
        ws,
        deflater,
        conn: params.conn,
        v: 10,
        peer: params.peer,
        limiter: SendLimiter::new(facts::SEND_LIMIT, facts::SEND_WINDOW),
        session: None,
        kick: Arc::new(Notify::new()),
        pending: None,
        replay_until: None,
        entries: Vec::with_capacity(READ_BATCH),
        more: false,
    };
    let end = match params.v {
        Err(v) => {
            client
                .close(
                    close::INVALID_API_VERSION,
                    format!("v={v} is not supported: use v=10 (or 9)"),
                )
                .await
        }
        Ok(v) => {
            client.v = v;
            client.run().await
        }
    };
    client.finish(end).await;
}

impl<S> Client<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(&mut self) -> End {
        let hello = json!({
            "t": null, "s": null, "op": op::HELLO,
            "d": {"heartbeat_interval": self.ctx.heartbeat.as_millis() as u64, "_trace": ["shardwarden"]}
        });
        if let Err(end) = self.send_json(hello.to_string()).await {
            return end;
        }
        let mut head = self.ctx.hub.log.subscribe_head();
        let mut shutdown = self.ctx.shutdown.clone();
        let mut tick = tokio::time::interval(SHARD_WAIT_TICK);
        loop {
            let active = self.session.is_some();
            let kick = self.kick.clone();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return self.close(close::UNKNOWN_ERROR, "shardwarden is shutting down; reconnect and identify".to_string()).await;
                }
                _ = kick.notified(), if active => {
                    // Another connection resumed this session: it is theirs now.
                    self.session = None;
                    return self.close(close::UNKNOWN_ERROR, "session resumed on another connection".to_string()).await;
                }
                _ = sleep_until(self.heartbeat_deadline) => {
                    return self.close(close::UNKNOWN_ERROR, format!("no heartbeat within {} ms; resume to continue", (self.ctx.heartbeat * 3 / 2).as_millis())).await;
                }
                message = self.ws.next() => {
                    let result = match message {
                        None => return End::Transport("connection ended without a close frame".to_string()),
                        Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                            return self.close(close::DECODE_ERROR, format!("payload too large ({e}); the limit is {} bytes", facts::MAX_SEND_PAYLOAD)).await;
                        }
                        Some(Err(e)) => return End::Transport(e.to_string()),
                        Some(Ok(Message::Text(text))) => self.on_frame(text.as_bytes()).await,
                        Some(Ok(Message::Binary(bytes))) => self.on_frame(&bytes).await,
                        Some(Ok(Message::Close(frame))) => {
                            return End::ClientClosed(frame.map(|f| u16::from(f.code)));
                        }
                        Some(Ok(_)) => Ok(()),
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
                _ = tick.tick(), if self.pending.is_some() => {
                    if let Err(end) = self.try_identify().await {
                        return end;
                    }
                }
                _ = std::future::ready(()), if active && self.more => {
                    if let Err(end) = self.pump().await {
                        return end;
                    }
                }
                changed = head.changed(), if active => {
                    if changed.is_err() {
                        return self.close(close::UNKNOWN_ERROR, "shardwarden is shutting down".to_string()).await;
                    }
                    if let Err(end) = self.pump().await {
                        return end;
                    }
                }
            }
        }
    }

    /// One frame from the client.
    async fn on_frame(&mut self, bytes: &[u8]) -> Result<(), End> {
        if bytes.len() > facts::MAX_SEND_PAYLOAD {
            return Err(self
                .close(
                    close::DECODE_ERROR,
                    format!(
                        "payload of {} bytes is over the {} byte limit",
                        bytes.len(),
                        facts::MAX_SEND_PAYLOAD
                    ),
                )
                .await);
        }
        let now = Instant::now();
        self.limiter.record(now);
        if self.limiter.in_window(now) > facts::SEND_LIMIT as usize {
            return Err(self
                .close(
                    close::RATE_LIMITED,
                    format!(
                        "more than {} payloads in {} s",
                        facts::SEND_LIMIT,
                        facts::SEND_WINDOW.as_secs()
                    ),
                )
                .await);
        }
        let frame: Frame = match serde_json::from_slice(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                return Err(self
                    .close(
                        close::DECODE_ERROR,
                        format!("not a JSON gateway payload ({e})"),
                    )
                    .await);
            }
        };
        let Some(opcode) = frame.op.and_then(|o| u8::try_from(o).ok()) else {
            return Err(self
                .close(close::UNKNOWN_OPCODE, "missing or unknown op".to_string())
                .await);
        };
        let d = frame.d.map_or("null", RawValue::get);
        match opcode {
            op::HEARTBEAT => {
                self.heartbeat_deadline = Instant::now() + self.ctx.heartbeat * 3 / 2;
                self.send_json(r#"{"t":null,"s":null,"op":11,"d":null}"#.to_string())
                    .await
            }
            op::IDENTIFY => self.on_identify(d).await,
            op::RESUME => self.on_resume(d).await,
            opcode if op::BOT_COMMANDS.contains(&opcode) => self.on_command(opcode, d, bytes).await,
            other => Err(self
                .close(close::UNKNOWN_OPCODE, format!("unknown opcode {other}"))
                .await),
        }
    }

    /// IDENTIFY's or RESUME's `d` (`what`), once per connection: a second one
    /// is 4005, an unparsable one closes the connection.
    async fn session_opener<T: serde::de::DeserializeOwned>(
        &mut self,
        d: &str,
        what: &str,
    ) -> Result<T, End> {
        if self.session.is_some() || self.pending.is_some() {
            return Err(self
                .close(
                    close::ALREADY_AUTHENTICATED,
                    "already identified".to_string(),
                )
                .await);
        }
        match serde_json::from_str(d) {
            Ok(parsed) => Ok(parsed),
            Err(e) => Err(self
                .close(close::UNKNOWN_OPCODE, format!("invalid {what} ({e})"))
                .await),
        }
    }

    async fn on_identify(&mut self, d: &str) -> Result<(), End> {
        let identify: Identify = self.session_opener(d, "IDENTIFY").await?;
        if !self.ctx.token_matches(&identify.token) {
            return Err(self
                .close(
                    close::AUTHENTICATION_FAILED,
                    "authentication failed: not this daemon's bot token".to_string(),
                )
                .await);
        }
        let total = self.ctx.hub.shard_total;
        let shard = match identify.shard {
            None if total > 1 => {
                return Err(self
                    .close(
                        close::SHARDING_REQUIRED,
                        format!("sharding required: this daemon runs {total} shards; identify with shard [id, {total}]"),
                    )
                    .await);
            }
            None => 0,
            Some([id, n]) if n != u64::from(total) || id >= n => {
                return Err(self
                    .close(
                        close::INVALID_SHARD,
                        format!("invalid shard [{id}, {n}]: this daemon runs {total} shards in total; use shard_count = {total}"),
                    )
                    .await);
            }
            Some([id, _]) => id as u32,
        };
        if self.ctx.hub.shard(shard).is_none() {
            let owned: Vec<u32> = self.ctx.hub.owned().map(|s| s.shard).collect();
            return Err(self
                .close(
                    close::INVALID_SHARD,
                    format!(
                        "shard {shard} is not owned by this daemon (it owns {owned:?}); connect to the daemon that owns it"
                    ),
                )
                .await);
        }
        let intents = match &identify.intents {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        let Some(intents) = intents else {
            return Err(self
                .close(
                    close::INVALID_INTENTS,
                    "invalid intents: IDENTIFY needs an integer intents bitfield".to_string(),
                )
                .await);
        };
        if let Err(e) = crate::intents::check_intent_bits(intents) {
            let e = e.split(';').next().unwrap_or("").to_string();
            return Err(self
                .close(close::INVALID_INTENTS, format!("invalid intents: {e}"))
                .await);
        }
        let missing = intents & !self.ctx.daemon_intents;
        if missing != 0 {
            let names = crate::intents::names_for_mask(missing).join(", ");
            let code = if missing & crate::intents::PRIVILEGED_MASK != 0 {
                close::DISALLOWED_INTENTS
            } else {
                close::INVALID_INTENTS
            };
            tracing::warn!(event = %"dropin_refused", conn = self.conn, close_code = code, "a client asked for intents the daemon does not hold: {names}; add them to [discord] intents (and events) to serve it");
            return Err(self
                .close(
                    code,
                    format!(
                        "intents not held by shardwarden: {names}; add them to [discord] intents"
                    ),
                )
                .await);
        }
        if identify.compress == Some(true) {
            self.deflater.enable_per_message();
        }
        let library = identify
            .properties
            .as_ref()
            .and_then(|p| p.get("browser").or_else(|| p.get("$browser")))
            .and_then(Value::as_str)
            .unwrap_or("client");
        let client: String = library
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        self.pending = Some(PendingIdentify {
            shard,
            intents,
            echo_shard: identify.shard.is_some(),
            client: format!("{client}#{}", self.conn),
            presence: identify.presence,
        });
        self.try_identify().await
    }

    /// Finish a pending IDENTIFY once the shard holds a session.
    async fn try_identify(&mut self) -> Result<(), End> {
        let Some(pending) = &self.pending else {
            return Ok(());
        };
        let Some(stats) = self.ctx.hub.shard(pending.shard).cloned() else {
            return Ok(());
        };
        if stats.state() != ShardState::Active {
            return Ok(());
        }
        let Some(raw_ready) = stats.ready() else {
            return Ok(());
        };
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let ctx = self.ctx.clone();
        // Head first, snapshot second: the cache already holds every event
        // up to the head, so nothing falls between snapshot and live events.
        let start_cursor = ctx.hub.log.head();
        let stubs = ctx.shared.cache.shard_guilds(pending.shard);
        let mut ready: Map<String, Value> = serde_json::from_slice(&raw_ready).unwrap_or_default();
        // One GUILD_CREATE per available guild; a guild the cache holds
        // only as unavailable (an outage, or still loading after the
        // shard's READY) gets GUILD_DELETE `unavailable: true`, as Discord
        // sends for guilds that stay unavailable (facts §4.4). Its
        // GUILD_CREATE follows live when Discord sends it.
        let mut burst: Vec<(&'static [u8], String)> = Vec::new();
        if pending.intents & GUILDS != 0 {
            for guild in &stubs {
                match (guild.unavailable, ctx.shared.cache.guild_create(guild.id)) {
                    (false, Some(create)) => burst.push((b"GUILD_CREATE", create)),
                    _ => burst.push((
                        b"GUILD_DELETE",
                        format!("{{\"id\":\"{}\",\"unavailable\":true}}", guild.id),
                    )),
                }
            }
        }
        let guild_creates = burst.iter().filter(|(t, _)| *t == b"GUILD_CREATE").count();
        let session = ctx.shared.sessions.create(
            self.conn,
            pending.client.clone(),
            pending.shard,
            pending.intents,
            start_cursor,
            1 + burst.len() as u64,
        );
        let session_id = sessions::lock(&session).id.clone();
        ready.insert("session_id".into(), Value::String(session_id));
        ready.insert(
            "resume_gateway_url".into(),
            // Trailing slash: see `server::gateway_info`.
            Value::String(format!("ws://{}/", ctx.listen)),
        );
        ready.insert(
            "guilds".into(),
            Value::Array(
                stubs
                    .iter()
                    .map(|g| json!({"id": g.id.to_string(), "unavailable": true}))
                    .collect(),
            ),
        );
        ready.insert("v".into(), json!(self.v));
        if pending.echo_shard {
            ready.insert("shard".into(), json!([pending.shard, ctx.hub.shard_total]));
        } else {
            ready.remove("shard");
        }
        self.kick = sessions::lock(&session).kick.clone();
        self.session = Some(session);
        tracing::info!(
            event = %"dropin_identify",
            client = %pending.client,
            conn = self.conn,
            peer = %self.peer,
            shard = pending.shard,
            intents = pending.intents,
            guilds = stubs.len(),
            guild_creates,
            "drop-in client identified (no upstream IDENTIFY spent)"
        );
        let ready = Value::Object(ready).to_string();
        self.feed(dispatch_frame(b"READY", 1, ready.as_bytes()))
            .await?;
        for (i, (t, d)) in burst.iter().enumerate() {
            self.feed(dispatch_frame(t, 2 + i as u64, d.as_bytes()))
                .await?;
        }
        self.flush().await?;
        if let Some(presence) = pending.presence {
            // IDENTIFY's presence sets the bot's presence, as on Discord.
            let payload = format!("{{\"op\":3,\"d\":{}}}", presence.get());
            self.forward(pending.shard, op::PRESENCE_UPDATE, payload);
        }
        self.more = true;
        Ok(())
    }

    async fn on_resume(&mut self, d: &str) -> Result<(), End> {
        let resume: Resume = self.session_opener(d, "RESUME").await?;
        let conn = self.conn;
        let refused = move |why: &str| {
            tracing::info!(event = %"dropin_resume_refused", conn, "RESUME refused with op 9 (false): {why}; the client identifies again (free)");
        };
        if !self.ctx.token_matches(&resume.token) {
            refused("not this daemon's bot token");
            return self.invalid_session().await;
        }
        let Some(session) = self.ctx.shared.sessions.get(&resume.session_id) else {
            refused("unknown or expired session");
            return self.invalid_session().await;
        };
        let seq = resume.seq.unwrap_or(0);
        let outcome = {
            let mut s = sessions::lock(&session);
            self.rewind(&mut s, seq)
        };
        let (client, shard, old_pos) = match outcome {
            Ok(x) => x,
            Err(why) => {
                refused(&why);
                return self.invalid_session().await;
            }
        };
        self.kick = sessions::lock(&session).kick.clone();
        self.session = Some(session);
        self.replay_until = Some(old_pos);
        tracing::info!(event = %"dropin_resume", client = %client, conn = self.conn, shard, seq, "drop-in client resumed; replaying what it missed from the ring");
        self.more = true;
        self.pump().await
    }

    /// Position `s` after `seq`: count accepted ring entries back from the
    /// session's position. Returns the label, shard and the old position
    /// (where RESUMED is due), or why the session cannot resume.
    fn rewind(&self, s: &mut Session, seq: u64) -> Result<(String, u32, u64), String> {
        if s.invalid {
            return Err("the session was invalidated".to_string());
        }
        if seq > s.s {
            return Err(format!("seq {seq} is past the session's last s {}", s.s));
        }
        if seq < s.burst {
            return Err(format!(
                "seq {seq} is inside the READY/GUILD_CREATE burst (s 1..={}), which is rebuilt only by IDENTIFY",
                s.burst
            ));
        }
        let need = (s.s - seq) as usize;
        let log = &self.ctx.hub.log;
        if s.pos + 1 < log.oldest() {
            return Err(format!(
                "events after the session's position (cursor {}) left the replay ring while it was away",
                s.pos
            ));
        }
        let table = self.ctx.hub.events();
        let lowest = s.start_cursor.max(log.oldest().saturating_sub(1));
        let mut last: VecDeque<u64> = VecDeque::with_capacity(need.min(4096));
        let mut after = lowest;
        let mut batch = Vec::new();
        let pos = s.pos;
        while need > 0 && after < pos {
            batch.clear();
            let outcome = log.entries_after(after, READ_BATCH * 16, &mut batch);
            for entry in batch.iter().take_while(|e| e.cursor <= pos) {
                if s.accepts(entry, &table) {
                    if last.len() == need {
                        last.pop_front();
                    }
                    last.push_back(entry.cursor);
                }
            }
            if outcome.after == after {
                break;
            }
            after = outcome.after;
        }
        if last.len() < need {
            return Err(format!(
                "{} of the {need} events after seq {seq} are no longer held in the replay ring",
                need - last.len()
            ));
        }
        let old_pos = s.pos;
        if let Some(&first) = last.front() {
            s.pos = first - 1;
        }
        s.s = seq;
        s.attached = self.conn;
        s.detached_at = None;
        s.resumes += 1;
        // The connection that carried the session (if still open) is told to
        // go; a fresh Notify so a stale permit never closes this one.
        s.kick.notify_one();
        s.kick = Arc::new(Notify::new());
        Ok((s.client.clone(), s.shard, old_pos))
    }

    async fn invalid_session(&mut self) -> Result<(), End> {
        self.send_json(r#"{"t":null,"s":null,"op":9,"d":false}"#.to_string())
            .await
    }

    async fn on_command(&mut self, opcode: u8, d: &str, raw: &[u8]) -> Result<(), End> {
        let Some(session) = self.session.clone() else {
            return Err(self
                .close(
                    close::NOT_AUTHENTICATED,
                    format!("op {opcode} before IDENTIFY"),
                )
                .await);
        };
        let shard = {
            let mut s = sessions::lock(&session);
            if opcode == op::REQUEST_GUILD_MEMBERS {
                #[derive(Deserialize)]
                struct Request {
                    nonce: Option<String>,
                }
                if let Ok(Request { nonce: Some(nonce) }) = serde_json::from_str(d) {
                    s.add_nonce(nonce);
                }
            }
            s.shard
        };
        let payload = String::from_utf8_lossy(raw).into_owned();
        self.forward(shard, opcode, payload);
        Ok(())
    }

    /// Send a command to the upstream shard through its send limiter,
    /// without holding up this connection.
    fn forward(&self, shard: u32, opcode: u8, payload: String) {
        let Some(commands) = self.ctx.hub.commands.get(&shard).cloned() else {
            return;
        };
        let conn = self.conn;
        tokio::spawn(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if commands
                .send(OutboundCommand { payload, reply })
                .await
                .is_err()
            {
                return;
            }
            match answer.await {
                Ok(Ok(())) => {
                    tracing::debug!(conn, shard, opcode, "drop-in command sent upstream")
                }
                Ok(Err(refusal)) => tracing::warn!(
                    event = %"dropin_command_refused",
                    conn,
                    shard,
                    opcode,
                    code = refusal.code,
                    "a drop-in client's op {opcode} was not sent: {}",
                    refusal.message
                ),
                Err(_) => {}
            }
        });
    }

    /// Read the ring after the session's position and send what it accepts.
    async fn pump(&mut self) -> Result<(), End> {
        let Some(session) = self.session.clone() else {
            return Ok(());
        };
        let table = self.ctx.hub.events();
        self.entries.clear();
        let mut frames: Vec<(u64, usize)> = Vec::new();
        let (pos, last_s, gap) = {
            let mut s = sessions::lock(&session);
            if s.attached != self.conn {
                return Ok(()); // taken over; the kick ends this connection
            }
            let outcome = self
                .ctx
                .hub
                .log
                .entries_after(s.pos, READ_BATCH, &mut self.entries);
            if outcome.gap.is_some() {
                s.invalid = true;
                (s.pos, s.s, outcome.gap)
            } else {
                for (i, entry) in self.entries.iter().enumerate() {
                    if s.accepts(entry, &table) {
                        s.s += 1;
                        frames.push((s.s, i));
                    }
                }
                s.pos = outcome.after;
                (s.pos, s.s, None)
            }
        };
        if let Some((from, to, _)) = gap {
            tracing::warn!(event = %"dropin_fell_behind", conn = self.conn, from, to, "a drop-in client fell out of the replay ring (events {from}..={to} gone before it read them); closing it so its RESUME is refused and it identifies again, rather than skip events silently");
            return Err(self
                .close(
                    close::UNKNOWN_ERROR,
                    "fell too far behind; identify again".to_string(),
                )
                .await);
        }
        let entries = std::mem::take(&mut self.entries);
        let mut result = Ok(());
        for &(s, i) in &frames {
            if let Some((t, d)) = super::line_parts(&entries[i].line) {
                result = self.feed(dispatch_frame(t, s, d)).await;
                if result.is_err() {
                    break;
                }
            }
        }
        self.entries = entries;
        result?;
        if self.replay_until.is_some_and(|until| pos >= until) {
            self.replay_until = None;
            // RESUMED repeats the last `s` rather than taking a new one, so
            // `s` stays a function of the ring (libraries such as twilight
            // require a number here).
            self.feed(format!(
                "{{\"t\":\"RESUMED\",\"s\":{last_s},\"op\":0,\"d\":{{}}}}"
            ))
            .await?;
        }
        self.more = pos < self.ctx.hub.log.head();
        self.flush().await
    }

    async fn send_json(&mut self, text: String) -> Result<(), End> {
        self.feed(text).await?;
        self.flush().await
    }

    async fn feed(&mut self, text: String) -> Result<(), End> {
        let message = self
            .deflater
            .encode(text)
            .map_err(|e| End::Transport(format!("compression failed: {e}")))?;
        let limit = self.write_limit();
        match timeout(limit, self.ws.feed(message)).await {
            Ok(result) => result.map_err(|e| End::Transport(e.to_string())),
            Err(_) => Err(self.stalled(limit)),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.write_limit();
        match timeout(limit, self.ws.flush()).await {
            Ok(result) => result.map_err(|e| End::Transport(e.to_string())),
            Err(_) => Err(self.stalled(limit)),
        }
    }

    /// How long one write may block on a client that does not read: as long
    /// as a client may go without heartbeating.
    fn write_limit(&self) -> Duration {
        self.ctx.heartbeat * 3 / 2
    }

    /// A client that stopped reading: dropped without a close frame (it
    /// would not read one). Its session stays; if its events leave the ring
    /// meanwhile, its RESUME gets op 9.
    fn stalled(&self, limit: Duration) -> End {
        tracing::warn!(event = %"dropin_stalled", conn = self.conn, "a drop-in client has not read from its socket for {} ms; dropping the connection (the shard never waited on it)", limit.as_millis());
        End::Transport(format!(
            "client stopped reading for {} ms",
            limit.as_millis()
        ))
    }

    /// Close with `code`; the caller ends the connection.
    async fn close(&mut self, code: u16, reason: String) -> End {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        let _ = timeout(
            Duration::from_secs(2),
            self.ws.send(Message::Close(Some(frame))),
        )
        .await;
        End::Closed(code, reason)
    }

    /// Detach (or invalidate) the session and log how the connection ended.
    async fn finish(&mut self, end: End) {
        // Let the close handshake complete so the client reads our code.
        if matches!(end, End::Closed(..)) {
            let _ = timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
        let mut label = format!("conn#{}", self.conn);
        let mut seq = None;
        if let Some(session) = self.session.take() {
            let mut s = sessions::lock(&session);
            if s.attached == self.conn {
                s.attached = 0;
                s.detached_at = Some(std::time::Instant::now());
                match end {
                    End::ClientClosed(Some(1000 | 1001)) => s.invalid = true,
                    End::Closed(code, _) if code == close::ALREADY_AUTHENTICATED => {
                        s.invalid = true
                    }
                    _ => {}
                }
            }
            label = s.client.clone();
            seq = Some(s.s);
        }
        match end {
            End::Closed(code, reason) => {
                tracing::info!(event = %"dropin_closed", client = %label, conn = self.conn, close_code = code, seq, "closed a drop-in client: {reason}")
            }
            End::ClientClosed(code) => {
                tracing::info!(event = %"dropin_closed", client = %label, conn = self.conn, close_code = code, seq, "drop-in client disconnected{}", if matches!(code, Some(1000 | 1001)) { " (1000/1001: session ended)" } else { "; its session stays resumable" })
            }
            End::Transport(e) => {
                tracing::info!(event = %"dropin_closed", client = %label, conn = self.conn, seq, "drop-in client connection lost ({e}); its session stays resumable")
            }
        }
    }
}

/// `{"t":T,"s":S,"op":0,"d":D}` with `d` copied verbatim.
fn dispatch_frame(t: &[u8], s: u64, d: &[u8]) -> String {
    let mut out = String::with_capacity(d.len() + t.len() + 40);
    out.push_str("{\"t\":\"");
    out.push_str(std::str::from_utf8(t).unwrap_or("UNKNOWN"));
    out.push_str("\",\"s\":");
    out.push_str(&s.to_string());
    out.push_str(",\"op\":0,\"d\":");
    // The log line was built from text, so `d` is UTF-8.
    out.push_str(std::str::from_utf8(d).unwrap_or("null"));
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_frame_is_the_gateway_envelope() {
        let frame = dispatch_frame(b"MESSAGE_CREATE", 7, br#"{"a":"b"}"#);
        let v: Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(v, json!({"t":"MESSAGE_CREATE","s":7,"op":0,"d":{"a":"b"}}));
    }
}
