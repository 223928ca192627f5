//! The JetStream sink (DESIGN §4): every forwarded dispatch is published to
//! `{stream}.events.{shard}.{EVENT}` with `Nats-Msg-Id = {session_id}:{seq}`
//! (so JetStream drops the duplicates a restart or failover replays) and the
//! headers `Shardwarden-Shard`, `Shardwarden-Seq`, `Shardwarden-Cursor`; the
//! body is Discord's `d`. Session reports go to `{stream}.sessions.{shard}`.
//! Workers send §3.3 `send` objects as NATS requests to `{stream}.commands`
//! and the daemon that owns the shard answers.
//!
//! The publisher reads the event log like a bot does, so a shard's read loop
//! never waits on NATS: while JetStream is unreachable the ring keeps the
//! events, and publishing resumes from the last acknowledged one. The sink is
//! a durable consumer of the daemon (client `jetstream:{stream}` in
//! [`crate::consumers`]): its position is acknowledged once JetStream has
//! stored the message, so after a daemon restart Discord replays whatever was
//! received but not yet stored. If the sink falls out of the ring (a long
//! outage), what it lost is logged exactly and counted, as a bot's `gap` is.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::BrokerConfig;
use crate::event_log::Entry;
use crate::hub::Hub;
use crate::protocol::{self, ProtocolError, Request};

/// Most events published before waiting for their acknowledgements.
const BATCH: usize = 512;

/// How long one batch's acknowledgements may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts while JetStream is unreachable.
const RETRY: Duration = Duration::from_millis(500);

/// The sink's state, for `health`, `status` and metrics.
#[derive(Default)]
pub struct BrokerStats {
    /// A `[broker]` is configured.
    pub enabled: AtomicBool,
    /// The NATS connection is up.
    pub connected: AtomicBool,
    /// The last cursor JetStream acknowledged.
    pub position: AtomicU64,
    /// Events published and acknowledged.
    pub published: AtomicU64,
    /// Events that left the ring before they could be published.
    pub missed: AtomicU64,
}

/// `health.broker`.
#[derive(Serialize)]
pub struct BrokerView {
    /// The NATS connection is up.
    pub connected: bool,
    /// The last cursor JetStream acknowledged.
    pub position: u64,
    /// Events not yet published (head − position).
    pub backlog: u64,
    /// Events published and acknowledged.
    pub published: u64,
    /// Events lost to the ring before they could be published.
    pub missed: u64,
}

impl BrokerStats {
    /// The view for `health`, `None` when no broker is configured.
    pub fn view(&self, head: u64) -> Option<BrokerView> {
        self.enabled.load(Ordering::Relaxed).then(|| {
            let position = self.position.load(Ordering::Relaxed);
            BrokerView {
                connected: self.connected.load(Ordering::Relaxed),
                position,
                backlog: head.saturating_sub(position),
                published: self.published.load(Ordering::Relaxed),
                missed: self.missed.load(Ordering::Relaxed),
            }
        })
    }
}

/// The consumer name the sink acknowledges under.
pub fn consumer_name(stream: &str) -> String {
    format!("jetstream:{stream}")
}

/// Connect (in the background: the daemon runs while NATS is down) and start
/// the publisher, the session reporter and the command handler. They stop
/// when `shutdown` turns true.
pub async fn start(
    cfg: BrokerConfig,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinSet<()>, String> {
    hub.broker.enabled.store(true, Ordering::Relaxed);
    let events_hub = hub.clone();
    let client = async_nats::ConnectOptions::new()
        .name("shardwarden")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let hub = events_hub.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        hub.broker.connected.store(true, Ordering::Relaxed);
                        tracing::info!(event = %"broker_connected", "NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        hub.broker.connected.store(false, Ordering::Relaxed);
                        tracing::warn!(event = %"broker_disconnected", "NATS disconnected: events are kept in the replay ring and published when it is back");
                    }
                    other => tracing::info!(event = %"broker", "NATS: {other}"),
                }
            }
        })
        .connect(cfg.nats.as_str())
        .await
        .map_err(|e| format!("[broker] nats = {:?}: {e}", cfg.nats))?;
    let js = jetstream::new(client.clone());
    let mut tasks = JoinSet::new();
    let cfg = Arc::new(cfg);
    tasks.spawn(publish_events(
        cfg.clone(),
        js.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(publish_sessions(
        cfg.clone(),
        js,
        hub.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(answer_commands(cfg, client, hub, shutdown));
    Ok(tasks)
}

/// Create the stream, or bring an existing one's limits to the config.
async fn ensure_stream(cfg: &BrokerConfig, js: &jetstream::Context) -> Result<(), String> {
    let wanted = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![
            format!("{}.events.>", cfg.stream),
            format!("{}.sessions.>", cfg.stream),
        ],
        max_bytes: cfg.max_bytes as i64,
        max_age: cfg.max_age,
        duplicate_window: cfg.duplicate_window,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let mut existing = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| format!("cannot create or read stream {:?}: {e}", cfg.stream))?;
    let info = existing
        .info()
        .await
        .map_err(|e| format!("cannot read stream {:?}: {e}", cfg.stream))?;
    let have = &info.config;
    if have.subjects != wanted.subjects
        || have.max_bytes != wanted.max_bytes
        || have.max_age != wanted.max_age
        || have.duplicate_window != wanted.duplicate_window
    {
        tracing::info!(
            event = %"broker_stream",
            stream = %cfg.stream,
            "stream {:?} differs from [broker] (subjects {:?}, max_bytes {}, max_age {:?}, duplicate_window {:?}); updating it",
            cfg.stream,
            have.subjects,
            have.max_bytes,
            have.max_age,
            have.duplicate_window
        );
        js.update_stream(wanted)
            .await
            .map_err(|e| format!("cannot update stream {:?}: {e}", cfg.stream))?;
    }
    Ok(())
}

/// The id JetStream deduplicates on: the same event replayed after a restart
/// or a failover has the same session and seq.
fn message_id(hub: &Hub, entry: &Entry) -> String {
    match hub
        .shard(entry.shard)
        .and_then(|s| s.session_id_of(entry.session_gen))
    {
        Some(session) => format!("{session}:{}", entry.seq),
        // Session no longer known (many re-identifies behind): unique anyway.
        None => format!("{}:{}:c{}", entry.shard, entry.seq, entry.cursor),
    }
}

async fn publish_events(
    cfg: Arc<BrokerConfig>,
    js: jetstream::Context,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = consumer_name(&cfg.stream);
    let key = hub.consumers.connect(&name, 0);
    // Where the last life's sink stopped, else live from now.
    let mut position = hub
        .consumers
        .acked_of(&key)
        .unwrap_or_else(|| hub.log.head());
    hub.broker.position.store(position, Ordering::Relaxed);
    let mut head = hub.log.subscribe_head();
    let mut stream_ready = false;
    let mut batch: Vec<Entry> = Vec::with_capacity(BATCH);
    // Each published event's acknowledgement; `None` for one skipped.
    let mut pending: VecDeque<(u64, Option<PublishAckFuture>)> = VecDeque::with_capacity(BATCH);
    let names = || hub.events();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !stream_ready {
            match ensure_stream(&cfg, &js).await {
                Ok(()) => {
                    stream_ready = true;
                    tracing::info!(event = %"broker_stream", stream = %cfg.stream, position, "JetStream stream ready; publishing events");
                }
                Err(e) => {
                    tracing::warn!(event = %"broker_unavailable", error = %e, "JetStream not available yet; events wait in the replay ring");
                    if pause(&mut shutdown, Duration::from_secs(2)).await {
                        break;
                    }
                    continue;
                }
            }
        }
        if *head.borrow_and_update() <= position {
            tokio::select! {
                _ = head.changed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        batch.clear();
        let outcome = hub.log.entries_after(position, BATCH, &mut batch);
        if let Some((from, to, missed)) = outcome.gap {
            hub.broker.missed.fetch_add(missed, Ordering::Relaxed);
            tracing::error!(
                event = %"broker_gap",
                from,
                to,
                missed,
                "events left the replay ring before JetStream stored them: cursors {from}..={to} ({missed} events) are not in the stream. Raise [bot] replay_buffer or fix the NATS outage sooner"
            );
            // Lost for the stream; never reported twice.
            position = to;
            hub.consumers.ack(&key, position);
            hub.broker.position.store(position, Ordering::Relaxed);
        }
        let table = names();
        let started = tokio::time::Instant::now();
        let mut failed = None;
        for entry in &batch {
            let t = table
                .all_names()
                .get(entry.event as usize)
                .map_or("UNKNOWN", String::as_str);
            let mut headers = HeaderMap::new();
            headers.insert("Shardwarden-Shard", entry.shard.to_string().as_str());
            headers.insert("Shardwarden-Seq", entry.seq.to_string().as_str());
            headers.insert("Shardwarden-Cursor", entry.cursor.to_string().as_str());
            let message = PublishMessage::build()
                .payload(entry.d())
                .headers(headers)
                .message_id(message_id(&hub, entry));
            match js
                .send_publish(
                    format!("{}.events.{}.{t}", cfg.stream, entry.shard),
                    message,
                )
                .await
            {
                Ok(ack) => pending.push_back((entry.cursor, Some(ack))),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded =>
                {
                    // Retrying can never help: skip it, loudly and counted,
                    // instead of stalling every event behind it.
                    hub.broker.missed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        event = %"broker_gap",
                        from = entry.cursor,
                        to = entry.cursor,
                        missed = 1,
                        shard = entry.shard,
                        seq = entry.seq,
                        t,
                        bytes = entry.d().len(),
                        "event larger than the NATS server's max_payload: not published (raise max_payload in nats-server's config)"
                    );
                    pending.push_back((entry.cursor, None));
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        // Acknowledged in order: the position only moves over stored events.
        let mut stored = position;
        let mut count = 0u64;
        while let Some((cursor, ack)) = pending.pop_front() {
            let Some(ack) = ack else {
                stored = cursor;
                continue;
            };
            match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                Ok(Ok(_)) => {
                    stored = cursor;
                    count += 1;
                }
                Ok(Err(e)) => {
                    failed.get_or_insert(e.to_string());
                    break;
                }
                Err(_) => {
                    failed.get_or_insert("no acknowledgement within 10 s".to_string());
                    break;
                }
            }
        }
        pending.clear();
        if stored > position {
            position = stored;
            hub.consumers.ack(&key, position);
            hub.broker.position.store(position, Ordering::Relaxed);
            hub.broker.published.fetch_add(count, Ordering::Relaxed);
            metrics::histogram!("shardwarden_broker_publish_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        if let Some(e) = failed {
            tracing::warn!(event = %"broker_publish_failed", error = %e, position, "JetStream publish failed; retrying from the last stored event (duplicates are dropped by Nats-Msg-Id)");
            stream_ready = false;
            if pause(&mut shutdown, RETRY).await {
                break;
            }
        }
    }
    hub.consumers.disconnect(&key);
}

/// Sleep `d`; true when shutdown came first.
async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

async fn publish_sessions(
    cfg: Arc<BrokerConfig>,
    js: jetstream::Context,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut reports = hub.sessions.subscribe();
    loop {
        let line = tokio::select! {
            line = reports.recv() => line,
            _ = shutdown.changed() => return,
        };
        let line = match line {
            Ok(line) => line,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(skipped = n, "session reports to JetStream lagged");
                continue;
            }
            Err(_) => return,
        };
        let Some(shard) = serde_json::from_slice::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["shard"].as_u64())
        else {
            continue;
        };
        let body = Bytes::copy_from_slice(line.strip_suffix(b"\n").unwrap_or(&line));
        let subject = format!("{}.sessions.{shard}", cfg.stream);
        // Best effort: a report lost while NATS is down is also in the log.
        if let Ok(ack) = js.publish(subject, body).await {
            let _ = tokio::time::timeout(ACK_TIMEOUT, ack).await;
        }
    }
}

async fn answer_commands(
    cfg: Arc<BrokerConfig>,
    client: async_nats::Client,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    let subject = format!("{}.commands", cfg.stream);
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(event = %"broker_commands", error = %e, "cannot subscribe to {subject}: NATS commands are not served");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            m = requests.next() => m,
            _ = shutdown.changed() => return,
        };
        let Some(message) = message else {
            return;
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let answer = match protocol::parse_request(&message.payload) {
            Ok(Request::Send(send)) => {
                // Only the daemon that owns the shard answers; a shard that
                // no daemon can own (past the shard total) is refused by
                // every daemon, so the worker never waits for nothing.
                let shards = crate::commands::shards_for(&hub, &send);
                let possible = shards.iter().all(|&s| s < hub.shard_total);
                if possible && !shards.iter().any(|s| hub.shard(*s).is_some()) {
                    continue;
                }
                match crate::commands::route(&hub, send) {
                    Ok(answer) => {
                        let client = client.clone();
                        tokio::spawn(async move {
                            let _ = client.publish(reply, answer.await).await;
                        });
                        continue;
                    }
                    Err(refusal) => refusal,
                }
            }
            Ok(_) => ProtocolError::bad_request(
                "only {\"op\":\"send\",...} is accepted on the commands subject",
            )
            .line(),
            Err(refusal) => refusal.line(),
        };
        let _ = client.publish(reply, answer).await;
    }
}
