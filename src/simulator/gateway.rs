//! The WebSocket gateway: one task per connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use super::handshake::{self, Prefixed};
use super::payloads::{guild_ids_for_shard, message_create_payload_in};
use super::world;
use super::{
    ALL_INTENTS, ClientFrame, Compression, ConnectionInfo, Fault, Inner, LiveConn, Session,
    StreamCompressor,
};

type Ws = WebSocketStream<Prefixed<TcpStream>>;

/// Largest payload a client may send (bytes).
const MAX_CLIENT_PAYLOAD: usize = 4096;
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);
/// Messages sent per scheduling step of a burst.
const BURST_STEP: u32 = 128;

pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            res = listener.accept() => {
                if let Ok((stream, _)) = res {
                    tokio::spawn(handle_conn(inner.clone(), stream));
                }
            }
            _ = super::wait_shutdown(&mut shutdown) => break,
        }
    }
}

fn close_code_invalidates(code: u16) -> bool {
    matches!(code, 4003 | 4004 | 4005 | 4007 | 4009..=4014)
}

fn op_frame(op: u8, d: Value) -> String {
    json!({"t": null, "s": null, "op": op, "d": d}).to_string()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn handle_conn(inner: Arc<Inner>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut target: Option<(String, String, Option<String>)> = None;
    // The callback signature is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        target = Some((
            req.uri().path().to_string(),
            req.uri().query().unwrap_or("").to_string(),
            req.headers()
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ));
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let accept = async {
        let stream = handshake::read_head(stream).await.ok()?;
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
            .await
            .ok()
    };
    let mut ws = match tokio::time::timeout(Duration::from_secs(10), accept).await {
        Ok(Some(ws)) => ws,
        _ => return,
    };
    let (path, query, user_agent) = target.unwrap_or_default();

    let (faults_tx, faults_rx) = mpsc::unbounded_channel();
    let pump = Arc::new(Notify::new());
    let id = {
        let mut st = inner.lock();
        let id = st.connections.len() as u64 + 1;
        st.connections.push(ConnectionInfo {
            conn: id,
            path,
            query: query.clone(),
            user_agent,
            shard: None,
            close_code_received: None,
            close_code_sent: None,
            opened_at: Instant::now(),
            closed: false,
            session_id: None,
            last_heartbeat: None,
            resumed: false,
        });
        st.live.insert(
            id,
            LiveConn {
                shard: None,
                faults: faults_tx,
                pump: pump.clone(),
            },
        );
        id
    };
    inner.notify_changed();

    let mut conn = Conn {
        inner: inner.clone(),
        id,
        comp: StreamCompressor::new(Compression::None),
        session: None,
        sent_upto: 0,
        acking: true,
        recent: VecDeque::new(),
        last_heartbeat: Instant::now(),
        client_close: None,
        rng: StdRng::from_os_rng(),
        burst: None,
    };
    conn.run(&mut ws, &query, faults_rx, pump).await;
    drop(ws);

    {
        let mut st = inner.lock();
        st.live.remove(&id);
        if let Some(c) = st.conn_mut(id) {
            c.closed = true;
        }
        conn.detach_session(&mut st.sessions);
    }
    inner.notify_changed();
}

enum Flow {
    Continue,
    Close(u16, &'static str),
    /// Drop the TCP connection without a close frame (or it is already broken).
    Drop,
    /// The client closed; drain until the stream ends.
    ClientClosed,
}

struct Conn {
    inner: Arc<Inner>,
    id: u64,
    comp: StreamCompressor,
    session: Option<String>,
    sent_upto: u64,
    acking: bool,
    recent: VecDeque<Instant>,
    last_heartbeat: Instant,
    client_close: Option<u16>,
    rng: StdRng,
    /// Remaining (count, size) of an injected burst.
    burst: Option<(u32, usize)>,
}

impl Conn {
    async fn run(
        &mut self,
        ws: &mut Ws,
        query: &str,
        mut faults: mpsc::UnboundedReceiver<Fault>,
        pump: Arc<Notify>,
    ) {
        if query_param(query, "v") != Some("10") {
            self.close(ws, 4012, "Invalid API version").await;
            return;
        }
        if !matches!(query_param(query, "encoding"), None | Some("json")) {
            self.close(ws, 4002, "Only encoding=json is supported")
                .await;
            return;
        }
        match Compression::from_query(query_param(query, "compress")) {
            Ok(kind) => self.comp = StreamCompressor::new(kind),
            Err(_) => {
                self.close(ws, 4002, "Unknown compress value").await;
                return;
            }
        }
        let (interval, hb_timeout) = {
            let st = self.inner.lock();
            (st.cfg.heartbeat_interval_ms, st.cfg.heartbeat_timeout)
        };
        let hello = op_frame(
            10,
            json!({"heartbeat_interval": interval, "_trace": ["[\"sim-gateway\",{\"micros\":0}]"]}),
        );
        if self.send(ws, &hello).await.is_err() {
            return;
        }
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let hb_deadline = tokio::time::Instant::from_std(
                self.last_heartbeat + hb_timeout.unwrap_or(Duration::from_secs(3600)),
            );
            let flow = tokio::select! {
                msg = ws.next() => match msg {
                    None | Some(Err(_)) => Flow::Drop,
                    Some(Ok(msg)) => self.on_message(ws, msg).await,
                },
                Some(fault) = faults.recv(), if self.burst.is_none() => self.on_fault(ws, fault).await,
                _ = std::future::ready(()), if self.burst.is_some() => self.burst_step(ws).await,
                _ = pump.notified() => self.pump(ws).await,
                _ = tokio::time::sleep_until(hb_deadline), if hb_timeout.is_some() => {
                    Flow::Close(4009, "Session timed out")
                }
                _ = super::wait_shutdown(&mut shutdown) => Flow::Drop,
            };
            match flow {
                Flow::Continue => {}
                Flow::Close(code, reason) => {
                    self.close(ws, code, reason).await;
                    return;
                }
                Flow::Drop => return,
                Flow::ClientClosed => {
                    let _ = tokio::time::timeout(CLOSE_DRAIN, async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    return;
                }
            }
        }
    }

    fn encode(&mut self, json: &str) -> Message {
        match self.comp.kind() {
            Compression::None => Message::text(json.to_string()),
            _ => Message::binary(self.comp.compress(json.as_bytes())),
        }
    }

    async fn send(&mut self, ws: &mut Ws, json: &str) -> Result<(), ()> {
        let msg = self.encode(json);
        ws.send(msg).await.map_err(|_| ())
    }

    async fn send_flow(&mut self, ws: &mut Ws, json: &str) -> Flow {
        match self.send(ws, json).await {
            Ok(()) => Flow::Continue,
            Err(()) => Flow::Drop,
        }
    }

    async fn close(&mut self, ws: &mut Ws, code: u16, reason: &'static str) {
        {
            let inner = self.inner.clone();
            let mut st = inner.lock();
            if let Some(c) = st.conn_mut(self.id) {
                c.close_code_sent = Some(code);
            }
            if close_code_invalidates(code)
                && let Some(sid) = &self.session
                && let Some(s) = st.sessions.get_mut(sid)
            {
                s.invalid = true;
            }
            self.detach_session(&mut st.sessions);
        }
        self.inner.notify_changed();
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if ws.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_DRAIN, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }

    /// Detaches this connection's session (it stays resumable unless invalidated).
    fn detach_session(&mut self, sessions: &mut std::collections::HashMap<String, Session>) {
        if let Some(sid) = self.session.take()
            && let Some(s) = sessions.get_mut(&sid)
            && s.attached == Some(self.id)
        {
            s.attached = None;
            s.detached_at = Some(Instant::now());
            if matches!(self.client_close, Some(1000 | 1001)) {
                s.invalid = true;
            }
        }
    }

    fn record(&self, op: u8, json: Value) {
        {
            let mut st = self.inner.lock();
            let shard = st.live.get(&self.id).and_then(|l| l.shard);
            st.frames.push(ClientFrame {
                conn: self.id,
                shard,
                op,
                json,
                at: Instant::now(),
            });
        }
        self.inner.notify_changed();
    }

    async fn on_message(&mut self, ws: &mut Ws, msg: Message) -> Flow {
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(frame) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                self.client_close = code;
                {
                    let inner = self.inner.clone();
                    let mut st = inner.lock();
                    if let Some(c) = st.conn_mut(self.id) {
                        c.close_code_received = code;
                    }
                    self.detach_session(&mut st.sessions);
                }
                self.inner.notify_changed();
                return Flow::ClientClosed;
            }
            _ => return Flow::Continue,
        };
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                let lossy = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
                self.record(255, Value::String(lossy));
                return Flow::Close(4002, "Error while decoding payload.");
            }
        };
        let parsed: Option<Value> = serde_json::from_str(text).ok();
        let op = parsed
            .as_ref()
            .and_then(|v| v.get("op"))
            .and_then(Value::as_u64)
            .and_then(|o| u8::try_from(o).ok());
        match &parsed {
            Some(v) => self.record(op.unwrap_or(255), v.clone()),
            None => self.record(255, Value::String(text.chars().take(512).collect())),
        }
        if text.len() > MAX_CLIENT_PAYLOAD {
            return Flow::Close(4002, "Error while decoding payload.");
        }
        let (limit, window) = self.inner.lock().cfg.client_rate_limit;
        let now = Instant::now();
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() > limit as usize {
            return Flow::Close(4008, "Rate limited.");
        }
        let Some(v) = parsed else {
            return Flow::Close(4002, "Error while decoding payload.");
        };
        let d = v.get("d").cloned().unwrap_or(Value::Null);
        match op {
            Some(1) => self.on_heartbeat(ws, d).await,
            Some(2) => self.on_identify(ws, d).await,
            Some(6) => self.on_resume(ws, d).await,
            Some(3 | 4 | 8 | 31 | 43) => {
                if self.session.is_none() {
                    return Flow::Close(4003, "Not authenticated.");
                }
                if op == Some(8) {
                    self.on_request_members(ws, d).await
                } else {
                    Flow::Continue
                }
            }
            _ => Flow::Close(4001, "Unknown opcode."),
        }
    }

    async fn on_heartbeat(&mut self, ws: &mut Ws, d: Value) -> Flow {
        self.last_heartbeat = Instant::now();
        {
            let mut st = self.inner.lock();
            if let Some(c) = st.conn_mut(self.id) {
                c.last_heartbeat = Some(d);
            }
        }
        if self.acking {
            self.send_flow(ws, &op_frame(11, Value::Null)).await
        } else {
            Flow::Continue
        }
    }

    async fn on_identify(&mut self, ws: &mut Ws, d: Value) -> Flow {
        if self.session.is_some() {
            return Flow::Close(4005, "Already authenticated.");
        }
        if !d.is_object() {
            return Flow::Close(4002, "Error while decoding payload.");
        }
        let token = d.get("token").and_then(Value::as_str).unwrap_or("");
        let token = token.strip_prefix("Bot ").unwrap_or(token);
        let cfg = self.inner.lock().cfg.clone();
        if token != cfg.token {
            return Flow::Close(4004, "Authentication failed.");
        }
        let shard = match d.get("shard") {
            None | Some(Value::Null) => None,
            Some(s) => {
                let pair = s.as_array().filter(|a| a.len() == 2).and_then(|a| {
                    Some((
                        u32::try_from(a[0].as_u64()?).ok()?,
                        u32::try_from(a[1].as_u64()?).ok()?,
                    ))
                });
                match pair {
                    Some((id, total)) if total >= 1 && id < total => Some([id, total]),
                    _ => return Flow::Close(4010, "Invalid shard."),
                }
            }
        };
        let Some(intents) = d.get("intents").and_then(Value::as_u64) else {
            return Flow::Close(4013, "Invalid intent(s).");
        };
        if intents & !ALL_INTENTS != 0 {
            return Flow::Close(4013, "Invalid intent(s).");
        }
        if intents & super::PRIVILEGED_INTENTS & !cfg.allowed_privileged != 0 {
            return Flow::Close(4014, "Disallowed intent(s).");
        }
        let [shard_id, total] = shard.unwrap_or([0, 1]);
        let session_id = format!("{:032x}", self.rng.random::<u128>());
        let guild_ids = guild_ids_for_shard(shard_id, total, cfg.guilds_per_shard);
        let ready = json!({
            "v": 10,
            "user": world::bot_user(),
            "guilds": guild_ids.iter().map(|g| json!({"id": g.to_string(), "unavailable": true})).collect::<Vec<_>>(),
            "session_id": session_id,
            "session_type": "normal",
            "resume_gateway_url": self.inner.resume_url(),
            "application": {"id": super::BOT_USER_ID, "flags": 0},
            "private_channels": [],
            "presences": [],
            "relationships": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["sim-local"],
            "user_settings": {},
            "_trace": ["[\"sim-gateway\",{\"micros\":0}]"]
        });
        let mut ready = ready;
        if let Some(s) = shard {
            ready["shard"] = json!(s);
        }
        let guilds: Vec<String> = guild_ids
            .iter()
            .map(|g| world::guild_create(*g, intents).to_string())
            .collect();
        let rejected = 'accept: {
            let mut st = self.inner.lock();
            let now = Instant::now();
            st.gc_sessions();
            let window = st.cfg.identify_window;
            if st.cfg.enforce_identify_concurrency {
                let key = shard_id % st.cfg.max_concurrency.max(1);
                if st
                    .buckets
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < window)
                {
                    break 'accept Some(false);
                }
                st.buckets.insert(key, now);
            }
            if st.cfg.session_start_remaining == 0 {
                // Discord resets the token when the budget runs out.
                break 'accept Some(true);
            }
            st.cfg.session_start_remaining -= 1;
            let mut session = Session {
                id: session_id.clone(),
                shard: [shard_id, total],
                intents,
                seq: 0,
                log: VecDeque::new(),
                attached: Some(self.id),
                detached_at: None,
                invalid: false,
                guilds: guild_ids.iter().copied().collect(),
            };
            session.append("READY", &ready.to_string());
            for g in &guilds {
                session.append("GUILD_CREATE", g);
            }
            st.sessions.insert(session_id.clone(), session);
            if let Some(l) = st.live.get_mut(&self.id) {
                l.shard = Some(shard_id);
            }
            if let Some(c) = st.conn_mut(self.id) {
                c.shard = Some(shard_id);
                c.session_id = Some(session_id.clone());
            }
            None
        };
        match rejected {
            Some(false) => return self.send_flow(ws, &op_frame(9, Value::Bool(false))).await,
            Some(true) => return Flow::Close(4004, "Authentication failed."),
            None => {}
        }
        self.inner.notify_changed();
        self.session = Some(session_id);
        self.sent_upto = 0;
        self.pump(ws).await
    }

    async fn on_resume(&mut self, ws: &mut Ws, d: Value) -> Flow {
        if self.session.is_some() {
            return Flow::Close(4005, "Already authenticated.");
        }
        if !d.is_object() {
            return Flow::Close(4002, "Error while decoding payload.");
        }
        let token = d.get("token").and_then(Value::as_str).unwrap_or("");
        let token = token.strip_prefix("Bot ").unwrap_or(token);
        if token != self.inner.lock().cfg.token {
            return Flow::Close(4004, "Authentication failed.");
        }
        let sid = d
            .get("session_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let seq = match d.get("seq") {
            None | Some(Value::Null) => Some(0),
            Some(v) => v.as_u64(),
        };
        let Some(seq) = seq else {
            return Flow::Close(4007, "Invalid seq.");
        };
        enum Outcome {
            Invalid,
            BadSeq,
            Resumed(u32, Option<u64>),
        }
        let outcome = {
            let mut st = self.inner.lock();
            let timeout = st.cfg.session_timeout;
            let now = Instant::now();
            let id = self.id;
            let outcome = match st.sessions.get_mut(&sid) {
                None => Outcome::Invalid,
                Some(s) if !s.resumable(timeout, now) => Outcome::Invalid,
                Some(s) if seq > s.seq => {
                    s.invalid = true;
                    Outcome::BadSeq
                }
                Some(s) if s.log.front().is_some_and(|(first, _)| *first > seq + 1) => {
                    // Missed events were evicted from the replay log.
                    s.invalid = true;
                    Outcome::Invalid
                }
                Some(s) => {
                    // A session resumed elsewhere is taken away from its old connection.
                    let previous = s.attached.filter(|c| *c != id);
                    s.attached = Some(id);
                    s.detached_at = None;
                    s.append(
                        "RESUMED",
                        r#"{"_trace":["[\"sim-gateway\",{\"micros\":0}]"]}"#,
                    );
                    Outcome::Resumed(s.shard[0], previous)
                }
            };
            if let Outcome::Resumed(_, Some(old)) = outcome
                && let Some(l) = st.live.get_mut(&old)
            {
                l.shard = None;
                let _ = l.faults.send(Fault::Close(4000));
            }
            if let Outcome::Resumed(shard, _) = outcome {
                if let Some(l) = st.live.get_mut(&id) {
                    l.shard = Some(shard);
                }
                if let Some(c) = st.conn_mut(id) {
                    c.shard = Some(shard);
                    c.session_id = Some(sid.clone());
                    c.resumed = true;
                }
            }
            outcome
        };
        self.inner.notify_changed();
        match outcome {
            Outcome::Invalid => self.send_flow(ws, &op_frame(9, Value::Bool(false))).await,
            Outcome::BadSeq => Flow::Close(4007, "Invalid seq."),
            Outcome::Resumed(..) => {
                self.session = Some(sid);
                self.sent_upto = seq;
                self.pump(ws).await
            }
        }
    }

    /// Op 8: one GUILD_MEMBERS_CHUNK with the world's members of the guild that match
    /// (`query` prefix, `user_ids`, `limit`), with presences when asked and the session has
    /// GUILD_PRESENCES. `guild_id` may be a string or a number, as on Discord; a guild of
    /// another shard gets an empty chunk.
    async fn on_request_members(&mut self, ws: &mut Ws, d: Value) -> Flow {
        let id_of = |v: &Value| match v {
            Value::String(s) => s.parse::<u64>().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        };
        let guild_id = d.get("guild_id").and_then(id_of);
        let (guilds, intents) = {
            let st = self.inner.lock();
            self.session
                .as_ref()
                .and_then(|sid| st.sessions.get(sid))
                .map(|s| (s.guilds.clone(), s.intents))
                .unwrap_or_default()
        };
        let user_ids: Vec<String> = match d.get("user_ids") {
            Some(Value::Array(a)) => a.iter().filter_map(id_of).map(|i| i.to_string()).collect(),
            Some(v) => id_of(v).map(|i| vec![i.to_string()]).unwrap_or_default(),
            None => Vec::new(),
        };
        let limit = d.get("limit").and_then(Value::as_u64).unwrap_or(0) as usize;
        let (members, not_found) = match guild_id.filter(|g| guilds.contains(g)) {
            Some(g) => {
                world::request_members(g, d.get("query").and_then(Value::as_str), &user_ids, limit)
            }
            None => (Vec::new(), user_ids.clone()),
        };
        let mut chunk = json!({
            "guild_id": guild_id.map(|g| g.to_string()),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": not_found,
        });
        let want_presences = d.get("presences").and_then(Value::as_bool) == Some(true);
        if want_presences && intents & (1 << 8) != 0 {
            chunk["presences"] = Value::Array(
                members
                    .iter()
                    .map(|m| json!({"user": {"id": m["user"]["id"]}, "status": "online", "activities": [], "client_status": {"desktop": "online"}}))
                    .collect(),
            );
        }
        if let Some(n) = d
            .get("nonce")
            .filter(|n| n.as_str().is_some_and(|s| s.len() <= 32))
        {
            chunk["nonce"] = n.clone();
        }
        self.append_and_pump(ws, "GUILD_MEMBERS_CHUNK", &chunk.to_string())
            .await
    }

    async fn append_and_pump(&mut self, ws: &mut Ws, t: &str, d: &str) -> Flow {
        {
            let mut st = self.inner.lock();
            let Some(sid) = &self.session else {
                return Flow::Continue;
            };
            if let Some(s) = st.sessions.get_mut(sid) {
                s.append(t, d);
            }
        }
        self.pump(ws).await
    }

    /// Sends every logged dispatch of the attached session not yet sent on this connection.
    async fn pump(&mut self, ws: &mut Ws) -> Flow {
        let entries = {
            let st = self.inner.lock();
            let Some(s) = self.session.as_ref().and_then(|sid| st.sessions.get(sid)) else {
                return Flow::Continue;
            };
            if s.attached != Some(self.id) {
                return Flow::Continue;
            }
            s.entries_after(self.sent_upto)
        };
        let Some((last, _)) = entries.last() else {
            return Flow::Continue;
        };
        self.sent_upto = *last;
        for (_, env) in entries {
            let msg = self.encode(&env);
            if ws.feed(msg).await.is_err() {
                return Flow::Drop;
            }
        }
        match ws.flush().await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Drop,
        }
    }

    async fn burst_step(&mut self, ws: &mut Ws) -> Flow {
        let Some((remaining, size)) = self.burst.take() else {
            return Flow::Continue;
        };
        let n = remaining.min(BURST_STEP);
        if remaining > n {
            self.burst = Some((remaining - n, size));
        }
        let Some(sid) = self.session.clone() else {
            self.burst = None;
            return Flow::Continue;
        };
        let (shard, total, guilds) = {
            let st = self.inner.lock();
            match st.sessions.get(&sid) {
                Some(s) if s.attached == Some(self.id) => {
                    (s.shard[0], s.shard[1], st.cfg.guilds_per_shard.max(1))
                }
                _ => {
                    self.burst = None;
                    return Flow::Continue;
                }
            }
        };
        let guild_ids = guild_ids_for_shard(shard, total, guilds);
        let payloads: Vec<String> = (0..n)
            .map(|_| {
                let g = guild_ids[self.rng.random_range(0..guild_ids.len())];
                message_create_payload_in(&mut self.rng, size, Some(g))
            })
            .collect();
        {
            let mut st = self.inner.lock();
            if let Some(s) = st.sessions.get_mut(&sid) {
                for p in &payloads {
                    s.append("MESSAGE_CREATE", p);
                }
            }
        }
        self.pump(ws).await
    }

    async fn on_fault(&mut self, ws: &mut Ws, fault: Fault) -> Flow {
        match fault {
            Fault::StopAcking => {
                self.acking = false;
                Flow::Continue
            }
            Fault::ResumeAcking => {
                self.acking = true;
                Flow::Continue
            }
            Fault::RequestHeartbeat => self.send_flow(ws, &op_frame(1, Value::Null)).await,
            Fault::Reconnect => self.send_flow(ws, &op_frame(7, Value::Null)).await,
            Fault::InvalidSession { resumable } => {
                {
                    let inner = self.inner.clone();
                    let mut st = inner.lock();
                    if !resumable
                        && let Some(sid) = &self.session
                        && let Some(s) = st.sessions.get_mut(sid)
                    {
                        s.invalid = true;
                    }
                    self.detach_session(&mut st.sessions);
                }
                self.inner.notify_changed();
                self.send_flow(ws, &op_frame(9, Value::Bool(resumable)))
                    .await
            }
            // Codes that must never appear in a close frame: just drop the connection.
            Fault::Close(1005 | 1006 | 1015) => Flow::Drop,
            Fault::Close(code) => Flow::Close(code, "Simulated close"),
            Fault::DropTcp => Flow::Drop,
            Fault::MalformedJson => self.send_flow(ws, r#"{"t":"MESSAGE_CREATE","s":"#).await,
            Fault::CorruptFrame => {
                let bytes: Vec<u8> = match self.comp.kind() {
                    // Invalid UTF-8, not JSON.
                    Compression::None => vec![0xff, 0xfe, 0xfd, 0x00, 0xc3, 0x28],
                    // Deflate block header with the reserved block type 11, then a sync marker.
                    Compression::ZlibStream => vec![0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0xff, 0xff],
                    // zstd block header with the reserved block type 3.
                    Compression::ZstdStream => vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                };
                match ws.send(Message::binary(bytes)).await {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Drop,
                }
            }
            Fault::Oversized(n) => self.oversized(ws, n).await,
            Fault::Burst { count, size } => {
                if count > 0 {
                    self.burst = Some((count, size));
                }
                Flow::Continue
            }
        }
    }

    async fn oversized(&mut self, ws: &mut Ws, n: usize) -> Flow {
        let base = message_create_payload_in(&mut self.rng, 0, None);
        let mut v: Value = serde_json::from_str(&base).unwrap_or_else(|_| json!({}));
        v["content"] = Value::String(String::new());
        let empty = v.to_string();
        let sequenced = {
            let mut st = self.inner.lock();
            let attached = self
                .session
                .as_ref()
                .and_then(|sid| st.sessions.get_mut(sid))
                .filter(|s| s.attached == Some(self.id));
            match attached {
                Some(s) => {
                    let s_digits = (s.seq + 1).to_string().len();
                    // {"t":"MESSAGE_CREATE","s":N,"op":0,"d":D}
                    let overhead = r#"{"t":"MESSAGE_CREATE","s":,"op":0,"d":}"#.len() + s_digits;
                    let pad = n.saturating_sub(overhead + empty.len());
                    v["content"] = Value::String(filler(pad));
                    s.append("MESSAGE_CREATE", &v.to_string());
                    true
                }
                None => false,
            }
        };
        if sequenced {
            return self.pump(ws).await;
        }
        let overhead = r#"{"t":"MESSAGE_CREATE","s":null,"op":0,"d":}"#.len();
        let pad = n.saturating_sub(overhead + empty.len());
        v["content"] = Value::String(filler(pad));
        let env = format!(r#"{{"t":"MESSAGE_CREATE","s":null,"op":0,"d":{v}}}"#);
        self.send_flow(ws, &env).await
    }
}

fn filler(n: usize) -> String {
    const TEXT: &str = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ";
    TEXT.chars().cycle().take(n).collect()
}
