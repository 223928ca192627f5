//! The bot server: the Unix socket bots connect to, and one handler per bot
//! (DESIGN.md §3).
//!
//! Each connection is two tasks. The *reader* parses the bot's lines and
//! answers them; answers go into a small bounded queue, so a bot that sends
//! faster than it reads is slowed down, not buffered without limit. The
//! *writer* owns the socket's write half and, on every wake-up, gathers
//! what is due — queued answers, session reports, a `health` line, and one
//! batch of dispatch lines read from the event log after the bot's cursor —
//! into one reused buffer written with a single `write_all`. Shards only
//! ever append to the log, so a slow bot slows nobody but itself; it holds
//! at most one batch, and when it falls out of the replay ring it is told
//! exactly which cursors it lost (`gap`) and goes on.
//!
//! Choices the contract leaves open:
//! - A refused `hello` (`unsupported_version`, `unsubscribed_event`,
//!   malformed) does not close the connection: the bot may send a corrected
//!   `hello` until the 5 s hello deadline, then gets `hello_timeout`.
//! - `resume_from: 0` means "everything held", so it never reports a gap;
//!   a cursor ahead of `head` starts live at `head` and says so in `welcome`
//!   (`resume_from_ahead`, `notice`).
//! - `missed` and `gap` count events, whatever their type: events the bot's
//!   filter would have skipped are counted too, as the daemon no longer knows
//!   what they were. Cursors of an earlier daemon life that were never used,
//!   or whose events Discord redelivered under new cursors, are not events
//!   and are not counted (`gap.from`/`to` still span them).
//! - A bot's acks are kept under its hello `client` name (see
//!   [`crate::consumers`]); a bot without a name holds the resume point only
//!   while connected.
//! - Op 31 without `shard`/`guild_id` is routed by its `d.guild_ids`: one
//!   payload per owning shard, answered once (`sent` lists every shard in an
//!   added `shards` field). If any guild's shard is not owned, nothing is sent.
//! - `events: []` is allowed (a bot that only wants diagnostics or sends).
//! - `send` with `shard` or `guild_id` goes to that one shard as is, op 31
//!   included.
//! - An `ack` beyond the cursor delivered so far is a `bad_request`; acks
//!   only move forward (a lower one is ignored).
//! - `hub.bot_clients` counts bots that completed the handshake, except
//!   `shardwarden status` (client `shardwarden-status`), which only asks.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{Instant, Interval, MissedTickBehavior, timeout_at};

use crate::hub::Hub;
use crate::protocol::{
    self, ErrorDetail, Hello, MAX_LINE, PROTOCOL_VERSION, ProtocolError, Request, SendRequest,
    Welcome, code,
};

/// A bot must send `hello` this soon after connecting (DESIGN.md §3.1).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// At shutdown, how long each bot gets to take what is pending.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Dispatch bytes read from the log per wake-up (one write).
const BATCH_BYTES: usize = 256 * 1024;

/// Answers queued for one bot before its reader waits.
const ANSWER_QUEUE: usize = 256;

/// Queued answers / session reports taken per wake-up.
const DRAIN_MAX: usize = 256;

/// What the bot server needs to know.
#[derive(Debug, Clone)]
pub struct BotServerConfig {
    /// Path of the Unix socket (`[bot] socket`).
    pub socket: PathBuf,
    /// Permission bits of the socket (`[bot] socket_mode`, e.g. `0o660`).
    pub socket_mode: u32,
    /// How often diagnostics bots get a `health` line (zero: never).
    pub health_interval: Duration,
    /// The daemon's version, sent in `welcome`.
    pub version: &'static str,
}

/// What went wrong binding the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BotServerErrorKind {
    /// The socket's directory could not be created.
    CreateDir,
    /// Another process is listening on the socket.
    InUse,
    /// The path exists and is not a socket.
    NotASocket,
    /// Checking whether the existing socket is live failed.
    Probe,
    /// Binding (or moving the new socket into place) failed.
    Bind,
    /// Setting the socket's mode failed.
    Chmod,
}

/// Binding the bot socket failed.
#[derive(Debug)]
pub struct BotServerError {
    kind: BotServerErrorKind,
    path: PathBuf,
    source: Option<io::Error>,
}

impl BotServerError {
    fn new(kind: BotServerErrorKind, path: &Path, source: Option<io::Error>) -> Self {
        BotServerError {
            kind,
            path: path.to_path_buf(),
            source,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> BotServerErrorKind {
        self.kind
    }
}

impl fmt::Display for BotServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.kind {
            BotServerErrorKind::CreateDir => write!(
                f,
                "cannot create the directory of the bot socket {path} ([bot] socket)"
            )?,
            BotServerErrorKind::InUse => write!(
                f,
                "another process is listening on the bot socket {path}: is shardwarden already running? \
                 Stop it, or set [bot] socket to another path"
            )?,
            BotServerErrorKind::NotASocket => write!(
                f,
                "{path} exists and is not a socket; refusing to replace it. \
                 Remove it, or set [bot] socket to another path"
            )?,
            BotServerErrorKind::Probe => {
                write!(f, "cannot tell whether the bot socket {path} is in use")?
            }
            BotServerErrorKind::Bind => write!(f, "cannot listen on the bot socket {path}")?,
            BotServerErrorKind::Chmod => write!(
                f,
                "cannot set the mode of the bot socket {path} ([bot] socket_mode)"
            )?,
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BotServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Set the permission bits of the socket at `path` (SIGHUP reload).
pub fn set_socket_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The listening bot socket.
pub struct BotServer {
    listener: UnixListener,
    cfg: BotServerConfig,
    hub: Arc<Hub>,
    /// `(dev, ino)` of the socket file, so shutdown removes only our own.
    identity: (u64, u64),
    /// [`HELLO_TIMEOUT`], shortened by tests.
    hello_timeout: Duration,
}

impl BotServer {
    /// Bind the socket. A stale socket file (nothing listening: connect() is
    /// refused) is replaced; a live one is never taken over. The parent
    /// directory is created if missing, and the socket gets `socket_mode`
    /// before anyone can connect to it.
    pub async fn bind(cfg: BotServerConfig, hub: Arc<Hub>) -> Result<BotServer, BotServerError> {
        use BotServerErrorKind as Kind;
        let path = cfg.socket.clone();
        let fail = |kind, source| BotServerError::new(kind, &path, source);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| fail(Kind::CreateDir, Some(e)))?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(fail(Kind::NotASocket, None)),
            Ok(_) => match UnixStream::connect(&path).await {
                Ok(_) => return Err(fail(Kind::InUse, None)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing a stale bot socket (nothing listens on it)");
                }
                Err(e) => return Err(fail(Kind::Probe, Some(e))),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(Kind::Probe, Some(e))),
        }

        // Bind under a temporary name, set the mode, then rename into place:
        // the socket is never reachable with the umask's mode, and a stale
        // file is replaced in one step.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|e| fail(Kind::Bind, Some(e)))?;
        let placed = set_socket_mode(&tmp, cfg.socket_mode)
            .map_err(|e| fail(Kind::Chmod, Some(e)))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| fail(Kind::Bind, Some(e))));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(Kind::Bind, Some(e)))?;
        tracing::info!(socket = %path.display(), mode = format_args!("{:o}", cfg.socket_mode), "bot socket listening");
        Ok(BotServer {
            listener,
            cfg,
            hub,
            identity: (meta.dev(), meta.ino()),
            hello_timeout: HELLO_TIMEOUT,
        })
    }

    /// The socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket
    }

    /// Change the socket's permission bits (SIGHUP reload).
    pub fn set_socket_mode(&self, mode: u32) -> io::Result<()> {
        set_socket_mode(&self.cfg.socket, mode)
    }

    /// Accept bots until `shutdown` turns true (or its sender goes away);
    /// each bot runs in its own task. Then stop accepting, remove the
    /// socket file, give every bot up to [`FLUSH_TIMEOUT`] to take what is
    /// pending, and close.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let BotServer {
            listener,
            cfg,
            hub,
            identity,
            hello_timeout,
        } = self;
        let cfg = Arc::new(cfg);
        let mut bots = JoinSet::new();
        let mut next_conn = 0u64;
        loop {
            tokio::select! {
                biased;
                () = wait_shutdown(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_conn += 1;
                        let bot = serve_bot(next_conn, stream, hub.clone(), cfg.clone(), hello_timeout, shutdown.clone());
                        bots.spawn(bot);
                    }
                    Err(e) => {
                        // Typically out of file descriptors: back off rather than spin.
                        tracing::warn!(error = %e, "accepting a bot connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(joined) = bots.join_next(), if !bots.is_empty() => {
                    if let Err(e) = joined && e.is_panic() {
                        tracing::error!(error = %e, "a bot connection task panicked");
                    }
                }
            }
        }

        // New bots get "no such file" / "connection refused" from now on.
        remove_if_ours(&cfg.socket, identity);
        drop(listener);
        let deadline = Instant::now() + FLUSH_TIMEOUT + Duration::from_millis(500);
        while let Ok(Some(_)) = timeout_at(deadline, bots.join_next()).await {}
        if !bots.is_empty() {
            tracing::warn!(
                bots = bots.len(),
                "bots still busy after the shutdown flush; closing them"
            );
            bots.abort_all();
            while bots.join_next().await.is_some() {}
        }
        tracing::info!(socket = %cfg.socket.display(), "bot server stopped");
    }
}

/// Remove the socket file if it is still the one we bound (another daemon
/// may have replaced it since).
fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove the bot socket");
            }
        }
        _ => {}
    }
}

/// Resolves once `shutdown` is true or its sender is gone.
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// One line read from a bot.
enum Line<'a> {
    /// A complete line, `\n` (and a trailing `\r`) removed.
    Text(&'a [u8]),
    /// A line over [`MAX_LINE`], discarded; its length.
    TooLong(usize),
    /// The bot closed its side.
    Eof,
}

/// Splits a bot's bytes into lines of at most [`MAX_LINE`] bytes; longer
/// lines are skipped up to their newline without being kept.
struct LineReader {
    inner: BufReader<OwnedReadHalf>,
    line: Vec<u8>,
}

impl LineReader {
    fn new(read: OwnedReadHalf) -> Self {
        LineReader {
            inner: BufReader::with_capacity(16 * 1024, read),
            line: Vec::new(),
        }
    }

    async fn next_line(&mut self) -> io::Result<Line<'_>> {
        self.line.clear();
        let mut total = 0usize;
        let mut too_long = false;
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                // End of stream: a last line without `\n` still counts.
                return Ok(match (too_long, total) {
                    (true, _) => Line::TooLong(total),
                    (false, 0) => Line::Eof,
                    (false, _) => Line::Text(trim_cr(&self.line)),
                });
            }
            let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(at) => (&buf[..at], at + 1, true),
                None => (buf, buf.len(), false),
            };
            total += chunk.len();
            if !too_long {
                if total > MAX_LINE {
                    too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.inner.consume(used);
            if done {
                return Ok(if too_long {
                    Line::TooLong(total)
                } else {
                    Line::Text(trim_cr(&self.line))
                });
            }
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn too_long(len: usize) -> ProtocolError {
    ProtocolError::bad_request(format!(
        "line of {len} bytes is over the {MAX_LINE}-byte limit; it was discarded"
    ))
}

/// What an accepted `hello` settles.
struct Subscription {
    client: String,
    filter: u128,
    diagnostics: bool,
    resume_from: Option<u64>,
}

/// Check a `hello` against the configuration: version and event names.
fn accept_hello(hello: Hello, hub: &Hub) -> Result<Subscription, ProtocolError> {
    if hello.v != PROTOCOL_VERSION {
        return Err(ProtocolError::new(
            code::UNSUPPORTED_VERSION,
            format!(
                "hello says v={}, this daemon speaks bot protocol version {PROTOCOL_VERSION}",
                hello.v
            ),
        ));
    }
    let filter = if hello.events.iter().any(|e| e == "*") {
        hub.all_events_filter()
    } else {
        let mut filter = 0u128;
        let mut unknown = Vec::new();
        for name in &hello.events {
            match hub.event_index(name) {
                Some(bit) => filter |= 1u128 << bit,
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(ProtocolError::new(
                code::UNSUBSCRIBED_EVENT,
                format!(
                    "the daemon is not configured to receive {}; configured events: {}. \
                     Add them to [discord] events (with an intent that delivers them), or ask for [\"*\"]",
                    unknown.join(", "),
                    hub.event_names().join(", ")
                ),
            )
            .with_detail(ErrorDetail {
                unknown_events: Some(unknown),
                configured_events: Some(hub.event_names()),
                ..ErrorDetail::default()
            }));
        }
        filter
    };
    // The name only goes into logs: keep it short.
    let client = match hello.client.char_indices().nth(64) {
        Some((end, _)) => hello.client[..end].to_string(),
        None => hello.client,
    };
    Ok(Subscription {
        client,
        filter,
        diagnostics: hello.diagnostics,
        resume_from: hello.resume_from,
    })
}

/// Read lines until a valid `hello`, answering everything else with an
/// error. `None`: the bot left first.
async fn handshake(
    lines: &mut LineReader,
    write: &mut OwnedWriteHalf,
    hub: &Hub,
) -> io::Result<Option<Subscription>> {
    loop {
        let refusal = match lines.next_line().await? {
            Line::Eof => return Ok(None),
            Line::TooLong(len) => too_long(len),
            Line::Text(line) if is_blank(line) => continue,
            Line::Text(line) => match protocol::parse_request(line) {
                Ok(Request::Hello(hello)) => match accept_hello(hello, hub) {
                    Ok(subscription) => return Ok(Some(subscription)),
                    Err(refusal) => refusal,
                },
                Ok(request) => {
                    let id = match request {
                        Request::Send(send) => Some(send.id),
                        _ => None,
                    };
                    ProtocolError::bad_request(
                        "send hello first: {\"op\":\"hello\",\"v\":1,\"events\":[...]}",
                    )
                    .with_id(id)
                }
                Err(refusal) => refusal,
            },
        };
        tracing::debug!(code = refusal.code, message = %refusal.message, "bot request refused before hello");
        write.write_all(&refusal.line()).await?;
    }
}

/// The `welcome` for a subscription, and the cursor delivery starts after.
fn plan_welcome(hub: &Hub, cfg: &BotServerConfig, resume_from: Option<u64>) -> (Welcome, u64) {
    let head = hub.log.head();
    let oldest = hub.log.oldest_held();
    // Everything up to this cursor has either been handed out or is held.
    let held_from = oldest.unwrap_or(head + 1);
    let mut shards: Vec<u32> = hub.owned().map(|s| s.shard).collect();
    shards.sort_unstable();
    let mut welcome = Welcome {
        op: "welcome",
        v: PROTOCOL_VERSION,
        version: cfg.version,
        shard_total: hub.shard_total,
        shards,
        head,
        oldest,
        missed: 0,
        resume_from_ahead: false,
        notice: None,
    };
    let start = match resume_from {
        None => head,
        // Cursors start at 1: 0 asks for everything held, and misses nothing.
        Some(0) => held_from - 1,
        Some(cursor) if cursor > head => {
            welcome.resume_from_ahead = true;
            welcome.notice = Some(format!(
                "resume_from {cursor} is ahead of head {head} (a cursor from another daemon, or lost state); \
                 delivering live events from {head}"
            ));
            head
        }
        Some(cursor) => {
            // Only cursors that were events and are gone count: unused
            // cursors of an earlier life, and events Discord redelivered
            // under new cursors after a restart, are not missed.
            welcome.missed = hub.log.events_between(cursor + 1, held_from - 1);
            cursor
        }
    };
    (welcome, start)
}

/// Keeps `hub.bot_clients` and the client's consumer entry right however a
/// connection ends.
struct ClientCount<'a> {
    hub: &'a Hub,
    /// The key this connection's acks go under.
    consumer: String,
    /// Counted in `hub.bot_clients` (`shardwarden status` asking is not a
    /// bot connecting).
    counted: bool,
}

impl<'a> ClientCount<'a> {
    fn add(hub: &'a Hub, client: &str, conn: u64) -> Self {
        let counted = client != protocol::STATUS_CLIENT;
        if counted {
            hub.bot_clients.fetch_add(1, Ordering::Relaxed);
        }
        // `status` asking holds no ack and is not listed as a client.
        let consumer = if counted {
            hub.consumers.connect(client, conn)
        } else {
            String::new()
        };
        ClientCount {
            hub,
            consumer,
            counted,
        }
    }
}

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.hub.bot_clients.fetch_sub(1, Ordering::Relaxed);
            self.hub.consumers.disconnect(&self.consumer);
        }
    }
}

/// One bot connection, from accept to close.
async fn serve_bot(
    conn: u64,
    stream: UnixStream,
    hub: Arc<Hub>,
    cfg: Arc<BotServerConfig>,
    hello_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = LineReader::new(read);
    let deadline = Instant::now() + hello_timeout;
    let subscription = tokio::select! {
        biased;
        () = wait_shutdown(&mut shutdown) => return,
        greeted = timeout_at(deadline, handshake(&mut lines, &mut write, &hub)) => match greeted {
            Ok(Ok(Some(subscription))) => subscription,
            Ok(Ok(None)) => {
                tracing::debug!(conn, "bot connection closed before hello");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(conn, error = %e, "bot connection failed before hello");
                return;
            }
            Err(_) => {
                let waited = hello_timeout.as_secs_f64();
                tracing::info!(conn, "bot sent no valid hello within {waited} s; closing");
                let line = ProtocolError::new(
                    code::HELLO_TIMEOUT,
                    format!("no valid hello within {waited} s of connecting; closing"),
                )
                .line();
                let _ = tokio::time::timeout(Duration::from_secs(1), write.write_all(&line)).await;
                let _ = write.shutdown().await;
                return;
            }
        },
    };

    let (welcome, start) = plan_welcome(&hub, &cfg, subscription.resume_from);
    let welcomed = tokio::time::timeout(FLUSH_TIMEOUT, write.write_all(&welcome.line())).await;
    if !matches!(welcomed, Ok(Ok(()))) {
        tracing::debug!(conn, "bot connection lost while sending welcome");
        return;
    }
    // Subscribe before the snapshot so no report falls between the two.
    let sessions = subscription.diagnostics.then(|| hub.sessions.subscribe());
    if subscription.diagnostics {
        // Each shard's latest session report (and an incident in progress),
        // so the bot knows where things stand without waiting for a change.
        let snapshot: Vec<u8> = hub
            .owned()
            .filter_map(|s| s.last_report())
            .chain(hub.incident().map(|i| i.line()))
            .flat_map(|line| line.to_vec())
            .collect();
        if !snapshot.is_empty()
            && !matches!(
                tokio::time::timeout(FLUSH_TIMEOUT, write.write_all(&snapshot)).await,
                Ok(Ok(()))
            )
        {
            return;
        }
    }
    let client = subscription.client;
    let count = ClientCount::add(&hub, &client, conn);
    tracing::info!(
        conn,
        client = ?client,
        resume_from = ?subscription.resume_from,
        missed = welcome.missed,
        head = welcome.head,
        diagnostics = subscription.diagnostics,
        "bot connected"
    );

    let (answers_tx, answers_rx) = mpsc::channel(ANSWER_QUEUE);
    let delivered = Arc::new(AtomicU64::new(start));
    let acked = Arc::new(AtomicU64::new(0));
    let mut reader = tokio::spawn(read_requests(
        lines,
        Requests {
            conn,
            hub: hub.clone(),
            answers: answers_tx,
            delivered: delivered.clone(),
            acked: acked.clone(),
            consumer: count.consumer.clone(),
        },
    ));

    let health_every = hub.health_interval().unwrap_or(cfg.health_interval);
    let health =
        (subscription.diagnostics && !health_every.is_zero()).then(|| health_tick(health_every));
    let mut delivery = Delivery {
        conn,
        client,
        head: hub.log.subscribe_head(),
        sessions,
        hub: hub.clone(),
        write,
        filter: subscription.filter,
        position: start,
        delivered,
        answers: answers_rx,
        health,
        health_every,
        default_health_every: cfg.health_interval,
        out: Vec::new(),
        lines: Vec::new(),
        events: 0,
        missed: 0,
    };
    let end = delivery.run(&mut reader, &mut shutdown).await;
    reader.abort();

    let missed = welcome.missed.max(delivery.missed);
    let position = delivery.delivered.load(Ordering::Relaxed);
    let client = &delivery.client;
    let acked = acked.load(Ordering::Relaxed);
    match &end {
        End::Io(e) => {
            tracing::warn!(conn, client = ?client, error = %e, delivered = position, acked, missed, "bot disconnected")
        }
        _ => {
            tracing::info!(conn, client = ?client, reason = end.as_str(), delivered = position, acked, events = delivery.events, missed, "bot disconnected")
        }
    }
}

/// Why a connection ended.
enum End {
    /// The bot closed its side.
    Closed,
    /// Reading or writing failed.
    Io(io::Error),
    /// The daemon is shutting down.
    Shutdown,
    /// The bot did not take what was pending in time at shutdown.
    FlushTimeout,
}

impl End {
    fn as_str(&self) -> &'static str {
        match self {
            End::Closed => "closed by bot",
            End::Io(_) => "i/o error",
            End::Shutdown => "daemon shutdown",
            End::FlushTimeout => "shutdown flush timed out",
        }
    }
}

/// How a write raced against shutdown ended.
enum Written {
    Done(io::Result<()>),
    DoneAtShutdown(io::Result<()>),
    TimedOut,
}

/// The writer side of one bot connection.
struct Delivery {
    /// Connection number, for logs.
    conn: u64,
    /// The bot's name, for logs.
    client: String,
    hub: Arc<Hub>,
    write: OwnedWriteHalf,
    /// Bit set over `hub.events`.
    filter: u128,
    /// Cursor the next log read starts after.
    position: u64,
    /// Cursor up to which events have been handed to the socket (written or
    /// being written). The reader checks acks against it: a bot may read
    /// and ack the start of a batch before the whole batch is written.
    delivered: Arc<AtomicU64>,
    head: watch::Receiver<u64>,
    answers: mpsc::Receiver<Bytes>,
    sessions: Option<broadcast::Receiver<Bytes>>,
    health: Option<Interval>,
    /// The interval `health` runs at, and the configured default.
    health_every: Duration,
    default_health_every: Duration,
    /// What the next write sends; reused.
    out: Vec<u8>,
    /// One batch of dispatch lines; reused.
    lines: Vec<Bytes>,
    /// Dispatches written.
    events: u64,
    /// Cursors lost to ring overflow.
    missed: u64,
}

impl Delivery {
    async fn run(
        &mut self,
        reader: &mut JoinHandle<io::Result<()>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        loop {
            self.gather();
            if !self.out.is_empty() {
                let written = {
                    let write = self.write.write_all(&self.out);
                    tokio::pin!(write);
                    tokio::select! {
                        biased;
                        written = &mut write => Written::Done(written),
                        // Finish this write within the flush budget, then flush the rest.
                        () = wait_shutdown(shutdown) => {
                            match timeout_at(Instant::now() + FLUSH_TIMEOUT, write).await {
                                Ok(written) => Written::DoneAtShutdown(written),
                                Err(_) => Written::TimedOut,
                            }
                        }
                    }
                };
                match written {
                    Written::Done(Ok(())) => self.committed(),
                    Written::DoneAtShutdown(Ok(())) => {
                        self.committed();
                        return self.close_on_purpose().await;
                    }
                    Written::Done(Err(e)) | Written::DoneAtShutdown(Err(e)) => {
                        return end_of_write(e);
                    }
                    Written::TimedOut => return End::FlushTimeout,
                }
            }
            if *shutdown.borrow() || shutdown.has_changed().is_err() {
                return self.close_on_purpose().await;
            }
            if reader.is_finished() {
                let read = reader.await;
                return self.reader_ended(read).await;
            }
            if self.position < *self.head.borrow() {
                // Still behind: go on reading, but let others run between batches.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                biased;
                () = wait_shutdown(shutdown) => return self.close_on_purpose().await,
                read = &mut *reader => return self.reader_ended(read).await,
                answer = self.answers.recv() => if let Some(answer) = answer {
                    self.out.extend_from_slice(&answer);
                },
                _ = self.head.changed() => {}
                report = next_session(&mut self.sessions) => self.session_report(report),
                _ = next_tick(&mut self.health) => {
                    let line = self.hub.health_line();
                    self.out.extend_from_slice(&line);
                    // A reload may have changed the interval.
                    let every = self.hub.health_interval().unwrap_or(self.default_health_every);
                    if every != self.health_every && !every.is_zero() {
                        self.health_every = every;
                        self.health = Some(health_tick(every));
                    }
                }
            }
        }
    }

    /// Append what is due to `out`: queued answers, session reports, and one
    /// batch of dispatches (after a `gap` line if the bot fell out of the ring).
    fn gather(&mut self) {
        for _ in 0..DRAIN_MAX {
            match self.answers.try_recv() {
                Ok(answer) => self.out.extend_from_slice(&answer),
                Err(_) => break,
            }
        }
        for _ in 0..DRAIN_MAX {
            let Some(sessions) = &mut self.sessions else {
                break;
            };
            match sessions.try_recv() {
                Err(broadcast::error::TryRecvError::Empty) => break,
                report => self.session_report(report.map_err(|e| match e {
                    broadcast::error::TryRecvError::Lagged(n) => {
                        broadcast::error::RecvError::Lagged(n)
                    }
                    _ => broadcast::error::RecvError::Closed,
                })),
            }
        }
        // A bot catching up never waits, so poll its health tick here too.
        if let Some(tick) = &mut self.health
            && tick.tick().now_or_never().is_some()
        {
            self.out.extend_from_slice(&self.hub.health_line());
        }
        let head = *self.head.borrow_and_update();
        if self.position >= head {
            return;
        }
        let outcome =
            self.hub
                .log
                .read_after(self.position, self.filter, BATCH_BYTES, &mut self.lines);
        if let Some((from, to, lost)) = outcome.gap {
            self.missed += lost;
            tracing::warn!(
                conn = self.conn,
                client = ?self.client,
                from,
                to,
                missed = lost,
                "bot fell out of the replay ring; sending gap"
            );
            self.out
                .extend_from_slice(&protocol::gap_line(from, to, lost));
            self.hub.gaps.fetch_add(1, Ordering::Relaxed);
            self.hub.missed.fetch_add(lost, Ordering::Relaxed);
        }
        self.events += self.lines.len() as u64;
        for line in self.lines.drain(..) {
            self.out.extend_from_slice(&line);
        }
        self.position = outcome.after;
        self.delivered.store(self.position, Ordering::Relaxed);
        self.hub
            .delivered
            .fetch_max(self.position, Ordering::Relaxed);
    }

    fn session_report(&mut self, report: Result<Bytes, broadcast::error::RecvError>) {
        match report {
            Ok(line) => self.out.extend_from_slice(&line),
            Err(broadcast::error::RecvError::Lagged(dropped)) => {
                tracing::debug!(dropped, "diagnostics bot lagged behind session reports");
                let line = ProtocolError::new(
                    code::DIAGNOSTICS_LAGGED,
                    format!(
                        "{dropped} session reports were dropped because this bot read too slowly"
                    ),
                )
                .with_detail(ErrorDetail {
                    dropped: Some(dropped),
                    ..ErrorDetail::default()
                })
                .line();
                self.out.extend_from_slice(&line);
            }
            Err(broadcast::error::RecvError::Closed) => self.sessions = None,
        }
    }

    /// The last write went out.
    fn committed(&mut self) {
        self.out.clear();
        // One huge event (a big GUILD_CREATE) must not pin its size forever.
        if self.out.capacity() > 4 * BATCH_BYTES {
            self.out.shrink_to(BATCH_BYTES);
        }
    }

    /// The bot stopped sending: deliver what is pending (a bot may half-close
    /// and still read its answers), then end.
    async fn reader_ended(&mut self, read: Result<io::Result<()>, JoinError>) -> End {
        let read = read.unwrap_or_else(|e| Err(io::Error::other(e)));
        match self.flush().await {
            End::Shutdown => match read {
                Ok(()) => End::Closed,
                Err(e) => End::Io(e),
            },
            other => other,
        }
    }

    /// The daemon closes this socket on purpose: deliver what is pending,
    /// then say why (`closing`, DESIGN.md §3.2) as the last line.
    async fn close_on_purpose(&mut self) -> End {
        let closing = self.hub.closing_line();
        self.flush_then(Some(closing)).await
    }

    /// Write everything pending within [`FLUSH_TIMEOUT`], then close.
    async fn flush(&mut self) -> End {
        self.flush_then(None).await
    }

    /// Write everything pending, then `last` (if any), within
    /// [`FLUSH_TIMEOUT`]; then close.
    async fn flush_then(&mut self, last: Option<Bytes>) -> End {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        loop {
            self.gather();
            if self.out.is_empty() {
                // A read can end early (bounded scan) with nothing for this
                // bot's filter: only stop once caught up.
                if self.position >= *self.head.borrow() {
                    break;
                }
                if Instant::now() >= deadline {
                    return End::FlushTimeout;
                }
                continue;
            }
            match timeout_at(deadline, self.write.write_all(&self.out)).await {
                Ok(Ok(())) => self.committed(),
                Ok(Err(e)) => return end_of_write(e),
                Err(_) => return End::FlushTimeout,
            }
        }
        if let Some(last) = last {
            match timeout_at(deadline, self.write.write_all(&last)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return end_of_write(e),
                Err(_) => return End::FlushTimeout,
            }
        }
        let _ = timeout_at(deadline, self.write.shutdown()).await;
        End::Shutdown
    }
}

fn end_of_write(e: io::Error) -> End {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => End::Closed,
        _ => End::Io(e),
    }
}

async fn next_session(
    sessions: &mut Option<broadcast::Receiver<Bytes>>,
) -> Result<Bytes, broadcast::error::RecvError> {
    match sessions {
        Some(sessions) => sessions.recv().await,
        None => std::future::pending().await,
    }
}

fn health_tick(every: Duration) -> Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

async fn next_tick(health: &mut Option<Interval>) {
    match health {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The reader side of one bot connection.
struct Requests {
    conn: u64,
    hub: Arc<Hub>,
    /// Answers to the bot, written by the delivery side.
    answers: mpsc::Sender<Bytes>,
    delivered: Arc<AtomicU64>,
    /// Highest cursor this bot acknowledged.
    acked: Arc<AtomicU64>,
    /// The key this bot's acks go under in `hub.consumers`.
    consumer: String,
}

async fn read_requests(mut lines: LineReader, requests: Requests) -> io::Result<()> {
    loop {
        let answer = match lines.next_line().await? {
            Line::Eof => return Ok(()),
            Line::TooLong(len) => Some(requests.refused(too_long(len))),
            Line::Text(line) if is_blank(line) => None,
            Line::Text(line) => match protocol::parse_request(line) {
                Ok(request) => requests.handle(request),
                Err(refusal) => Some(requests.refused(refusal)),
            },
        };
        if let Some(answer) = answer
            && requests.answers.send(answer).await.is_err()
        {
            return Ok(());
        }
    }
}

impl Requests {
    fn refused(&self, refusal: ProtocolError) -> Bytes {
        tracing::debug!(conn = self.conn, code = refusal.code, message = %refusal.message, "bot request refused");
        refusal.line()
    }

    /// Act on one request; the answer to send now, if any.
    fn handle(&self, request: Request) -> Option<Bytes> {
        match request {
            Request::Hello(_) => Some(self.refused(ProtocolError::bad_request(
                "hello was already accepted on this connection; reconnect to change the subscription",
            ))),
            Request::Ack { cursor } => {
                let delivered = self.delivered.load(Ordering::Relaxed);
                if cursor > delivered {
                    return Some(self.refused(ProtocolError::bad_request(format!(
                        "ack {cursor} is beyond what was delivered (up to cursor {delivered})"
                    ))));
                }
                self.acked.fetch_max(cursor, Ordering::Relaxed);
                self.hub.consumers.ack(&self.consumer, cursor);
                None
            }
            Request::Status => Some(self.hub.health_line()),
            Request::Send(send) => self.send(send),
        }
    }

    /// Route a `send` to its shard(s). Refusals known at once are returned;
    /// otherwise a task waits for the shards' replies and queues the answer,
    /// so reading goes on meanwhile.
    fn send(&self, send: SendRequest) -> Option<Bytes> {
        match crate::commands::route(&self.hub, send) {
            Err(refusal) => {
                tracing::debug!(conn = self.conn, "bot send refused");
                Some(refusal)
            }
            Ok(answer) => {
                let answers = self.answers.clone();
                tokio::spawn(async move {
                    let _ = answers.send(answer.await).await;
                });
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
