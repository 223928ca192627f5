//! The shard actor: one tokio task owning one gateway session through every
//! reconnect. It connects, heartbeats, identifies or resumes, forwards
//! dispatches into the event log and decides — from one close-code table —
//! whether a lost connection is resumed, re-identified or fatal.
//!
//! This file is the connection lifecycle (connect, the per-connection loop,
//! close handling, backoff); `payloads.rs` is what the shard does with each
//! payload and how it writes frames.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use crate::compression::{Compression, Inflater};
use crate::config::Token;
use crate::envelope::{Envelope, Hello, Ready};
use crate::gateway::{self, CloseClass, op};
use crate::heartbeat::{Beat, Heartbeat};
use crate::hub::{
    Hub, OutboundCommand, SendRefusal, SessionInfo, SessionReport, ShardState, ShardStats,
};
use crate::identify_queue::{IdentifyPermit, IdentifyQueue};
use crate::ratelimit::SendLimiter;

mod payloads;

/// Largest WebSocket message accepted from Discord (compressed size).
const MAX_WS_MESSAGE: usize = 32 << 20;
/// Inflate buffer capacity kept between messages; larger ones are freed.
const KEEP_BUFFER: usize = 256 << 10;
/// Initial WebSocket read buffer per connection.
const READ_BUFFER: usize = 16 * 1024;
/// Bot commands waiting for the send limiter, per connection.
const MAX_PENDING_COMMANDS: usize = 64;

/// Everything a shard needs to know to connect.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Shard id.
    pub shard: u32,
    /// Total shard count.
    pub total: u32,
    /// Bot token.
    pub token: Token,
    /// IDENTIFY intents bitfield.
    pub intents: u64,
    /// IDENTIFY `large_threshold`.
    pub large_threshold: u32,
    /// Transport compression.
    pub compression: Compression,
    /// Main gateway URL (from `/gateway/bot`), without query.
    pub gateway_url: String,
    /// Limit on opening a WebSocket (TCP + TLS + upgrade).
    pub connect_timeout: Duration,
    /// Limit on waiting for HELLO after connecting.
    pub hello_timeout: Duration,
    /// Largest message accepted, compressed or inflated; a larger one drops
    /// the connection and the shard resumes.
    pub max_message_size: usize,
    /// Shortest reconnect backoff.
    pub backoff_min: Duration,
    /// Longest reconnect backoff.
    pub backoff_max: Duration,
}

impl ShardConfig {
    /// Defaults for timeouts and backoff.
    pub fn new(shard: u32, total: u32, token: Token, intents: u64, gateway_url: String) -> Self {
        ShardConfig {
            shard,
            total,
            token,
            intents,
            large_threshold: 50,
            compression: Compression::ZlibStream,
            gateway_url,
            connect_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(20),
            max_message_size: MAX_WS_MESSAGE,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// What a resume needs (and what is persisted across daemon restarts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeState {
    /// Discord's session id.
    pub session_id: String,
    /// READY's `resume_gateway_url`.
    pub resume_url: String,
    /// Last sequence number received.
    pub seq: u64,
}

/// How a shard task ended.
#[derive(Debug)]
pub enum ShardExit {
    /// Stopped by shutdown; the session (if any) can be resumed later.
    Shutdown(Option<ResumeState>),
    /// Stopped for good.
    Fatal {
        /// The close code that made it fatal, if any.
        close_code: Option<u16>,
        /// What happened and what to fix.
        reason: String,
    },
}

/// What ended one connection and what comes next.
#[derive(Debug)]
enum Disconnect {
    /// Keep the session and RESUME.
    Resume {
        event: &'static str,
        close_code: Option<u16>,
        class: CloseClass,
        detail: String,
        /// Reconnect at once (op 7, zombie) rather than after backoff.
        immediately: bool,
    },
    /// The session is gone: IDENTIFY again.
    Reidentify {
        event: &'static str,
        close_code: Option<u16>,
        detail: String,
        /// Wait 1–5 s first (op 9).
        invalid_session: bool,
    },
    /// Stop the shard.
    Fatal {
        close_code: Option<u16>,
        detail: String,
    },
    /// The daemon is shutting down.
    Shutdown,
}

impl Disconnect {
    /// The connection failed (no close code): resume after backoff.
    fn transport(detail: impl Into<String>) -> Self {
        Disconnect::Resume {
            event: "closed",
            close_code: None,
            class: CloseClass::Transport,
            detail: detail.into(),
            immediately: false,
        }
    }

    /// The daemon dropped the connection itself (zombie, op 7, op 9 true):
    /// resume right away.
    fn resume_now(class: CloseClass, detail: impl Into<String>) -> Self {
        Disconnect::Resume {
            event: "closed",
            close_code: None,
            class,
            detail: detail.into(),
            immediately: true,
        }
    }
}

/// The shard actor.
pub struct Shard {
    config: ShardConfig,
    hub: Arc<Hub>,
    stats: Arc<ShardStats>,
    queue: Arc<IdentifyQueue>,
    /// The session a resume would continue.
    session: Option<(String, String)>,
    /// Last sequence number received in the session.
    seq: u64,
    commands: mpsc::Receiver<OutboundCommand>,
    shutdown: watch::Receiver<bool>,
    /// Session reports for the supervisor (incident detection, exit codes).
    supervisor: mpsc::UnboundedSender<SessionReport>,
    /// Consecutive failed attempts since the last healthy session.
    attempt: u32,
    /// The configured events and their generation: a local copy, refreshed
    /// when a reload changes them, so the hot path takes no shared lock.
    events: (u64, Arc<crate::hub::EventTable>),
    /// Consecutive connections lost to an oversized payload at this seq.
    oversize_strikes: (u64, u32),
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Shard {
    /// A shard actor; `resume` continues a persisted session.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ShardConfig,
        hub: Arc<Hub>,
        stats: Arc<ShardStats>,
        queue: Arc<IdentifyQueue>,
        commands: mpsc::Receiver<OutboundCommand>,
        shutdown: watch::Receiver<bool>,
        supervisor: mpsc::UnboundedSender<SessionReport>,
        resume: Option<ResumeState>,
    ) -> Self {
        let events = (hub.events_generation(), hub.events());
        let (session, seq) = match resume {
            Some(r) => {
                // What the periodic save reads: a persisted session is live
                // from the start, not only once a READY arrives.
                stats.seq.store(r.seq, Ordering::Relaxed);
                stats.remember_session_id(stats.session_gen.load(Ordering::Relaxed), &r.session_id);
                stats.set_session(SessionInfo {
                    session_id: Some(r.session_id.clone()),
                    resume_url: Some(r.resume_url.clone()),
                    started: None,
                });
                (Some((r.session_id, r.resume_url)), r.seq)
            }
            None => (None, 0),
        };
        Shard {
            config,
            hub,
            stats,
            queue,
            session,
            seq,
            commands,
            shutdown,
            supervisor,
            attempt: 0,
            events,
            oversize_strikes: (0, 0),
        }
    }

    fn id(&self) -> u32 {
        self.config.shard
    }

    /// The command receiver back, once the actor has stopped (a shard whose
    /// lease was lost may be started again later with the same channel).
    pub fn into_commands(self) -> mpsc::Receiver<OutboundCommand> {
        self.commands
    }

    fn resume_state(&self) -> Option<ResumeState> {
        self.session.as_ref().map(|(id, url)| ResumeState {
            session_id: id.clone(),
            resume_url: url.clone(),
            seq: self.seq,
        })
    }

    /// The session can no longer be resumed: drop it here and in what the
    /// state file (and the cluster) will hold.
    fn forget_session(&mut self) {
        self.session = None;
        self.seq = 0;
        self.set_session(SessionInfo::default());
    }

    /// Record the session the periodic save reads, and have it saved now.
    fn set_session(&self, info: SessionInfo) {
        self.stats.set_session(info);
        self.hub.session_changed.notify_one();
        // With [cluster], a new session goes to Redis at once, so a
        // takeover right after READY resumes it instead of identifying.
        self.hub.cluster.sessions_changed.notify_one();
    }

    fn set_state(&self, state: ShardState) {
        self.stats.set_state(state);
    }

    /// Log a lifecycle change and tell diagnostics bots and the supervisor.
    fn report(
        &self,
        event: &'static str,
        close_code: Option<u16>,
        class: Option<CloseClass>,
        detail: Option<String>,
        next_retry: Option<Duration>,
    ) {
        let mut report = SessionReport::new(self.id(), event);
        report.session_id = self.session.as_ref().map(|(id, _)| id.clone());
        report.seq = Some(self.seq);
        report.close_code = close_code;
        report.class = class.map(CloseClass::as_str);
        report.detail = detail;
        let session_age_s = self.stats.session().started.map(|t| t.elapsed().as_secs());
        let detail = report.detail.as_deref().unwrap_or("");
        let class = report.class.unwrap_or("-");
        let next_retry_ms = next_retry.map(|d| d.as_millis() as u64);
        match event {
            "fatal" => tracing::error!(
                shard = self.id(),
                event = %event,
                class = %class,
                close_code,
                seq = self.seq,
                session_age_s,
                attempt = self.attempt,
                "{detail}"
            ),
            "closed" | "zombie" | "invalidated" => tracing::warn!(
                shard = self.id(),
                event = %event,
                class = %class,
                close_code,
                seq = self.seq,
                session_age_s,
                attempt = self.attempt,
                next_retry_ms,
                "{detail}"
            ),
            _ => tracing::info!(
                shard = self.id(),
                event = %event,
                seq = self.seq,
                session_age_s,
                attempt = self.attempt,
                "{detail}"
            ),
        }
        self.hub.report(&report);
        let _ = self.supervisor.send(report);
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        reconnect_backoff(self.config.backoff_min, self.config.backoff_max)
    }

    /// Run until shutdown or a fatal close. Takes `&mut self` so that the
    /// supervisor can run the same shard again (session intact) after a panic.
    pub async fn run(&mut self) -> ShardExit {
        let mut backoff = self.backoff();
        let mut delay: Option<Duration> = None;
        // Connects to resume_gateway_url that failed in a row. Facts §4.5:
        // when resuming is not possible, IDENTIFY on the original URL; a
        // blip gets a few tries first, since an IDENTIFY costs budget.
        let mut resume_connect_failures = 0u32;
        loop {
            if *self.shutdown.borrow() {
                return self.stopped();
            }
            if let Some(wait) = delay.take() {
                self.set_state(ShardState::Reconnecting);
                tokio::select! {
                    _ = sleep(wait) => {}
                    _ = self.shutdown.changed() => return self.stopped(),
                }
            }
            let resume_url_ok = self
                .session
                .as_ref()
                .is_some_and(|(_, url)| gateway_url_ok(url));
            if self.session.is_some() && (resume_connect_failures >= 3 || !resume_url_ok) {
                let why = if resume_url_ok {
                    format!(
                        "resume_gateway_url refused {resume_connect_failures} connects in a row"
                    )
                } else {
                    "resume_gateway_url is not a wss:// (or loopback ws://) URL".to_string()
                };
                self.forget_session();
                self.report(
                    "invalidated",
                    None,
                    Some(CloseClass::Reidentify),
                    Some(format!(
                        "{why}: the session cannot be resumed; identifying on the main gateway URL"
                    )),
                    None,
                );
                resume_connect_failures = 0;
            }
            let resuming = self.session.is_some();
            let mut permit = None;
            if !resuming {
                self.set_state(ShardState::Queued);
                let queue = self.queue.clone();
                tokio::select! {
                    p = queue.acquire(self.id()) => permit = Some(p),
                    _ = self.shutdown.changed() => return self.stopped(),
                }
            }
            let base = match &self.session {
                Some((_, resume_url)) => resume_url.clone(),
                None => self.config.gateway_url.clone(),
            };
            let url = connect_url(&base, self.config.compression);
            self.set_state(ShardState::Connecting);
            self.report(
                "connecting",
                None,
                None,
                Some(format!(
                    "connecting to {base} to {}",
                    if resuming { "resume" } else { "identify" }
                )),
                None,
            );
            // tungstenite reserves its whole read buffer per connection
            // (128 KiB by default): most of an idle shard's memory. Frames
            // are a few hundred bytes; larger messages still grow it. No
            // write buffering: heartbeats and commands go out at once.
            let ws_config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0)
                .max_message_size(Some(self.config.max_message_size))
                .max_frame_size(Some(self.config.max_message_size));
            let connect = async {
                let request = upgrade_request(&url)?;
                tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true).await
            };
            let ws = tokio::select! {
                result = timeout(self.config.connect_timeout, connect) => match result {
                    Ok(Ok((ws, _response))) => Some(ws),
                    Ok(Err(e)) => {
                        self.attempt += 1;
                        let wait = backoff.next().unwrap_or(self.config.backoff_max);
                        let (next, eta) = self.next_step(wait);
                        self.report("closed", None, Some(CloseClass::Transport), Some(format!("cannot connect to {base}: {e}; {next}")), Some(eta));
                        delay = Some(wait);
                        None
                    }
                    Err(_) => {
                        self.attempt += 1;
                        let wait = backoff.next().unwrap_or(self.config.backoff_max);
                        let (next, eta) = self.next_step(wait);
                        self.report("closed", None, Some(CloseClass::Transport), Some(format!("connecting to {base} timed out after {} s; {next}", self.config.connect_timeout.as_secs())), Some(eta));
                        delay = Some(wait);
                        None
                    }
                },
                _ = self.shutdown.changed() => return self.stopped(),
            };
            let Some(ws) = ws else {
                if resuming {
                    resume_connect_failures += 1;
                }
                continue;
            };
            resume_connect_failures = 0;
            let (outcome, reached_active) = self.run_connection(ws, permit).await;
            if reached_active {
                self.attempt = 0;
                backoff = self.backoff();
            } else {
                self.attempt += 1;
            }
            self.set_session(SessionInfo {
                session_id: self.session.as_ref().map(|(id, _)| id.clone()),
                resume_url: self.session.as_ref().map(|(_, url)| url.clone()),
                started: self.stats.session().started,
            });
            match outcome {
                Disconnect::Shutdown => return self.stopped(),
                Disconnect::Fatal { close_code, detail } => {
                    self.set_state(ShardState::Fatal);
                    // Never resumed by a later start either.
                    self.forget_session();
                    self.report(
                        "fatal",
                        close_code,
                        Some(CloseClass::Fatal),
                        Some(detail.clone()),
                        None,
                    );
                    return ShardExit::Fatal {
                        close_code,
                        reason: detail,
                    };
                }
                Disconnect::Resume {
                    event,
                    close_code,
                    class,
                    detail,
                    immediately,
                } => {
                    let wait = if immediately && self.attempt <= 1 {
                        Duration::from_millis(rand::rng().random_range(0..250))
                    } else {
                        backoff.next().unwrap_or(self.config.backoff_max)
                    };
                    let (next, eta) = self.next_step(wait);
                    self.report(
                        event,
                        close_code,
                        Some(class),
                        Some(format!("{detail}; {next}")),
                        Some(eta),
                    );
                    delay = Some(wait);
                }
                Disconnect::Reidentify {
                    event,
                    close_code,
                    detail,
                    invalid_session,
                } => {
                    self.forget_session();
                    let wait = if invalid_session {
                        // Facts §4.7: a random 1–5 s wait before re-identifying.
                        Duration::from_millis(rand::rng().random_range(1000..5000))
                    } else {
                        backoff.next().unwrap_or(self.config.backoff_max)
                    };
                    let (next, eta) = self.next_step(wait);
                    self.report(
                        event,
                        close_code,
                        Some(CloseClass::Reidentify),
                        Some(format!("{detail}; {next}")),
                        Some(eta),
                    );
                    delay = Some(wait);
                }
            }
        }
    }

    /// What the next attempt will be, said once and truly: a RESUME after
    /// `backoff` when a session is held, else an IDENTIFY after `backoff`
    /// *and* the shard's turn in the identify queue. Returns the text and
    /// the expected wait.
    fn next_step(&self, backoff: Duration) -> (String, Duration) {
        if self.session.is_some() {
            return (format!("resuming in {} ms", backoff.as_millis()), backoff);
        }
        let (turn, taken) = self.queue.next_turn_in(self.id());
        identify_step(backoff, turn, taken)
    }

    fn stopped(&mut self) -> ShardExit {
        self.set_state(ShardState::Stopped);
        ShardExit::Shutdown(self.resume_state())
    }

    /// Drive one WebSocket connection until it ends. Everything that belongs
    /// to the connection (inflate context, heartbeat timer and pending ACK,
    /// send limiter, queued commands) lives in this function and is dropped
    /// with it; only the session and seq survive on `self`.
    async fn run_connection(
        &mut self,
        ws: WsStream,
        permit: Option<IdentifyPermit>,
    ) -> (Disconnect, bool) {
        let (mut sink, mut stream) = ws.split();
        let mut conn = Connection {
            inflater: match Inflater::new(self.config.compression) {
                Ok(inflater) => inflater,
                Err(e) => {
                    return (
                        Disconnect::transport(format!("cannot create decompressor: {e}")),
                        false,
                    );
                }
            },
            buf: Vec::new(),
            heartbeat: None,
            limiter: SendLimiter::default(),
            pending: std::collections::VecDeque::new(),
            active: false,
            identify: permit,
        };
        self.set_state(ShardState::AwaitingHello);
        let hello_deadline = Instant::now() + self.config.hello_timeout;
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);

        let outcome = loop {
            let heartbeat_due = conn
                .heartbeat
                .as_ref()
                .map_or(far_future, Heartbeat::next_due);
            let pending_at = conn.pending.front().map(|(at, _)| *at);
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => {
                    close(&mut sink, gateway::CLOSE_RESUMABLE, "shardwarden shutting down; will resume").await;
                    break Disconnect::Shutdown;
                }
                _ = sleep_until(heartbeat_due), if conn.heartbeat.is_some() => {
                    let now = Instant::now();
                    let beat = conn.heartbeat.as_mut().map(|hb| hb.due(now));
                    match beat {
                        Some(Beat::Send) => {
                            if let Err(d) = self.send_heartbeat(&mut sink, &mut conn).await {
                                break d;
                            }
                        }
                        Some(Beat::Zombie) | None => {
                            self.stats.zombies.fetch_add(1, Ordering::Relaxed);
                            self.stats.heartbeat_misses.fetch_add(1, Ordering::Relaxed);
                            let interval = conn.heartbeat.as_ref().map_or(0, |hb| hb.interval().as_millis());
                            self.report("zombie", None, Some(CloseClass::Transport), Some(format!("no heartbeat ACK within {interval} ms: connection presumed dead (zombie)")), None);
                            // Do not wait on a close handshake with a dead peer.
                            let _ = timeout(Duration::from_millis(500), sink.send(close_message(gateway::CLOSE_RESUMABLE, "zombie connection"))).await;
                            break Disconnect::resume_now(CloseClass::Transport, "zombie connection dropped".to_string());
                        }
                    }
                }
                _ = sleep_until(hello_deadline), if conn.heartbeat.is_none() => {
                    break Disconnect::transport(format!("no HELLO within {} s of connecting", self.config.hello_timeout.as_secs()));
                }
                _ = sleep_until(pending_at.unwrap_or(far_future)), if pending_at.is_some() => {
                    if let Err(d) = self.flush_pending(&mut sink, &mut conn).await {
                        break d;
                    }
                }
                command = self.commands.recv(), if conn.active && conn.pending.len() < MAX_PENDING_COMMANDS => {
                    if let Some(command) = command
                        && let Err(d) = self.send_command(&mut sink, &mut conn, command).await
                    {
                        break d;
                    }
                }
                message = stream.next() => {
                    match message {
                        None => break Disconnect::transport("connection ended without a close frame".to_string()),
                        Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                            break self.oversized(format!("a message from Discord is over the {} byte limit ({e})", self.config.max_message_size));
                        }
                        Some(Err(e)) => break Disconnect::transport(format!("WebSocket error: {e}")),
                        Some(Ok(Message::Binary(frame))) => {
                            let complete = conn.inflater.push(&frame, &mut conn.buf);
                            match complete {
                                Ok(false) => {}
                                Ok(true) if conn.buf.len() > self.config.max_message_size => {
                                    close(&mut sink, gateway::CLOSE_RESUMABLE, "oversized payload").await;
                                    break self.oversized(format!("a payload inflated to {} bytes, over the {} byte limit", conn.buf.len(), self.config.max_message_size));
                                }
                                Ok(true) => {
                                    let payload = std::mem::take(&mut conn.buf);
                                    let result = self.handle_payload(&mut sink, &mut conn, &payload).await;
                                    conn.buf = payload;
                                    // A huge READY/GUILD_CREATE should not pin its
                                    // buffer for the life of the connection.
                                    if conn.buf.capacity() > KEEP_BUFFER {
                                        conn.buf = Vec::with_capacity(KEEP_BUFFER / 4);
                                    }
                                    if let Err(d) = result {
                                        break d;
                                    }
                                }
                                Err(e) => {
                                    close(&mut sink, gateway::CLOSE_RESUMABLE, "corrupt compressed stream").await;
                                    break Disconnect::transport(format!("{e}; dropping the connection (a new one gets a fresh decompressor)"));
                                }
                            }
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Err(d) = self.handle_payload(&mut sink, &mut conn, text.as_bytes()).await {
                                break d;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.as_ref().map(|f| u16::from(f.code));
                            let reason = frame.as_ref().map(|f| f.reason.to_string()).unwrap_or_default();
                            break self.on_close(code, &reason);
                        }
                        Some(Ok(_)) => {}
                    }
                }
            }
        };
        // Commands that never went out are answered, not lost silently.
        for (_, command) in conn.pending.drain(..) {
            let _ = command.reply.send(Err(SendRefusal {
                code: crate::protocol::code::SHARD_UNAVAILABLE,
                message: format!(
                    "shard {}'s connection ended before the command could be sent; send it again",
                    self.id()
                ),
            }));
        }
        (outcome, conn.active)
    }

    /// A payload over the size limit. Resuming replays it, so the same seq
    /// failing three times in a row means this session cannot continue:
    /// start a new one, and say loudly that events were skipped.
    fn oversized(&mut self, what: String) -> Disconnect {
        let (seq, strikes) = self.oversize_strikes;
        let strikes = if seq == self.seq { strikes + 1 } else { 1 };
        self.oversize_strikes = (self.seq, strikes);
        if strikes >= 3 && self.session.is_some() {
            self.oversize_strikes = (0, 0);
            return Disconnect::Reidentify {
                event: "closed",
                close_code: None,
                detail: format!(
                    "{what}, and resuming replays it ({strikes} times after seq {}): giving up this session, so the events Discord holds after seq {} are lost (raise the limit if such payloads are legitimate)",
                    self.seq, self.seq
                ),
                invalid_session: false,
            };
        }
        Disconnect::transport(format!("{what}; dropping the connection"))
    }

    /// What a close frame from Discord means (facts §3.1, one table).
    fn on_close(&mut self, code: Option<u16>, reason: &str) -> Disconnect {
        if let Some(code) = code {
            self.stats
                .last_close
                .store(u32::from(code), Ordering::Relaxed);
        }
        let detail = close_detail(code, reason);
        match gateway::classify_close(code) {
            CloseClass::Fatal => {
                let detail = match code {
                    Some(4014) => {
                        let privileged = crate::intents::names_for_mask(
                            self.config.intents & crate::intents::PRIVILEGED_MASK,
                        );
                        format!(
                            "{detail}. Privileged intents sent: {}",
                            if privileged.is_empty() {
                                "none (check the Developer Portal settings)".to_string()
                            } else {
                                privileged.join(", ")
                            }
                        )
                    }
                    Some(4013) => format!(
                        "{detail}. Intents sent: {} = {}{}",
                        self.config.intents,
                        crate::intents::names_for_mask(self.config.intents).join(" | "),
                        match crate::intents::check_intent_bits(self.config.intents) {
                            Ok(()) => String::new(),
                            Err(e) => format!(" ({e})"),
                        }
                    ),
                    _ => detail,
                };
                Disconnect::Fatal {
                    close_code: code,
                    detail,
                }
            }
            CloseClass::Reidentify => Disconnect::Reidentify {
                event: "closed",
                close_code: code,
                detail,
                invalid_session: false,
            },
            class => Disconnect::Resume {
                event: "closed",
                close_code: code,
                class,
                detail,
                immediately: false,
            },
        }
    }
}

/// Per-connection state, dropped when the connection ends.
struct Connection {
    /// Decompression context of this connection.
    inflater: Inflater,
    /// Reused buffer for inflated payloads.
    buf: Vec<u8>,
    /// Heartbeat timer (after HELLO).
    heartbeat: Option<Heartbeat>,
    /// 120/60 s send limiter of this connection.
    limiter: SendLimiter,
    /// Bot commands waiting for the limiter: (when the slot frees, command).
    pending: std::collections::VecDeque<(Instant, OutboundCommand)>,
    /// READY or RESUMED received.
    active: bool,
    /// This connection's turn to IDENTIFY (None: it RESUMEs).
    identify: Option<IdentifyPermit>,
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: WsCloseCode::from(code),
        reason: reason.into(),
    }))
}

/// "identifying in N ms", where N is the later of the backoff and the
/// bucket's next turn (`taken`: another shard holds the turn now, so N is
/// a lower bound).
fn identify_step(backoff: Duration, turn: Duration, taken: bool) -> (String, Duration) {
    if turn <= backoff && !taken {
        return (
            format!("identifying in {} ms", backoff.as_millis()),
            backoff,
        );
    }
    let eta = turn.max(backoff);
    (
        format!(
            "identifying in {}{} ms ({} ms backoff, then its turn in the identify queue)",
            if taken { "at least " } else { "" },
            eta.as_millis(),
            backoff.as_millis()
        ),
        eta,
    )
}

/// How a close from Discord reads in the log and the `session` report. The
/// close reason is Discord's own word on what happened, so it comes first;
/// the table's advice is the code's usual meaning, and is only offered as
/// that when a reason was given.
fn close_detail(code: Option<u16>, reason: &str) -> String {
    let Some(code) = code else {
        return "Discord closed the connection without a code".to_string();
    };
    let row = gateway::close_code(code);
    let name = row.map_or("unlisted close code", |r| r.name);
    let advice = row.map_or("not a documented gateway close code", |r| r.advice);
    let reason = reason.trim();
    if reason.is_empty() {
        format!("Discord closed the connection with {code} ({name}): {advice}")
    } else {
        format!(
            "Discord closed the connection with {code}, reason \"{reason}\" ({name}; what {code} usually means: {advice})"
        )
    }
}

/// Send a close frame without waiting long for it (the peer may be dead).
async fn close<S>(sink: &mut S, code: u16, reason: &'static str)
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let _ = timeout(
        Duration::from_secs(1),
        sink.send(close_message(code, reason)),
    )
    .await;
}

/// Capped exponential backoff with jitter (backon): `min`, doubling, never
/// above `max` plus jitter, forever. Used for reconnects and actor restarts.
pub fn reconnect_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The WebSocket upgrade request for `url`, with the same `User-Agent` as
/// REST calls (Discord-compatible servers refuse upgrades without one).
fn upgrade_request(
    url: &str,
) -> Result<
    tokio_tungstenite::tungstenite::handshake::client::Request,
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "User-Agent",
        HeaderValue::from_static(crate::rest::USER_AGENT),
    );
    Ok(request)
}

/// Is a gateway URL acceptable: wss://, or ws:// to loopback?
pub fn gateway_url_ok(url: &str) -> bool {
    crate::config::check_url(url, &["wss", "ws"]).is_ok()
}

/// `base` + `?v=10&encoding=json[&compress=…]` (any query on `base` dropped).
pub fn connect_url(base: &str, compression: Compression) -> String {
    let base = base.split('?').next().unwrap_or(base);
    let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
    let slash = if after_scheme.contains('/') { "" } else { "/" };
    format!(
        "{base}{slash}?v={}&encoding=json{}",
        gateway::API_VERSION,
        compression.query()
    )
}

#[cfg(test)]
mod tests;
