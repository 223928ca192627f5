//! The drop-in front door (DESIGN.md §5) end to end: the daemon on the
//! simulator, a raw WebSocket client speaking the gateway protocol to the
//! front door over real sockets, and plain HTTP for the REST side.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::servers::free_port;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shardwarden::compression::{Compression, Inflater};
use shardwarden::config::{Config, Token};
use shardwarden::simulator::{SimConfig, Simulator};
use shardwarden::supervisor::{self, DaemonOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const TOKEN: &str = "frontdoor-test-token-4321";
const WAIT: Duration = Duration::from_secs(10);
/// GUILDS | GUILD_MESSAGES
const INTENTS: u64 = 1 | 1 << 9;

struct Daemon {
    addr: SocketAddr,
    socket: std::path::PathBuf,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), supervisor::DaemonError>>>,
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Shut down cleanly (SIGTERM's path) and hand back the directory with
    /// the saved state.
    async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.shutdown.send(true);
        let task = self.task.take().expect("running");
        task.await.expect("joined").expect("clean shutdown");
        self.dir.take().expect("dir")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn simulator(shards: u32) -> Simulator {
    Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        shards,
        guilds_per_shard: 2,
        heartbeat_interval_ms: 1000,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

/// The daemon with `[proxy]` on, every event, `shards` shards; REST goes to
/// `api_base` (the simulator's unless a test brings its own upstream).
async fn daemon(sim: &Simulator, api_base: &str, health_extra: &str, ring: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let daemon = daemon_in(dir, port, sim, api_base, health_extra, ring);
    let shards = sim.config().shards as usize;
    assert!(
        sim.wait_until(|s| s.sessions().len() >= shards, WAIT).await,
        "every shard identifies upstream"
    );
    daemon
}

/// The daemon on `dir` (its state and socket) and front door `port`.
fn daemon_in(
    dir: tempfile::TempDir,
    port: u16,
    sim: &Simulator,
    api_base: &str,
    health_extra: &str,
    ring: &str,
) -> Daemon {
    let text = format!(
        r#"
[discord]
token_env = "SW_FRONTDOOR_TEST_UNUSED"
api_base = "{api_base}"
intents = ["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT", "GUILD_MEMBERS"]
events = ["*"]
compression = "zlib-stream"

[shards]
total = {shards}

[bot]
socket = "{dir}/bot.sock"
replay_buffer = "{ring}"

[health]
log_interval = "1s"
{health_extra}

[state]
dir = "{dir}/state"

[proxy]
listen = "127.0.0.1:{port}"
heartbeat_interval = "1s"
"#,
        shards = sim.config().shards,
        dir = dir.path().display(),
    );
    let config = Config::parse(&text).expect("valid config");
    let (shutdown, shutdown_rx) = watch::channel(false);
    let options = DaemonOptions {
        token: Some(Token::new(TOKEN)),
        api_base: Some(api_base.to_string()),
        shutdown: Some(shutdown_rx),
        backoff_min: Some(Duration::from_millis(50)),
        snapshot_every: Some(Duration::from_millis(200)),
        ..DaemonOptions::default()
    };
    let task = tokio::spawn(supervisor::run(config, options));
    Daemon {
        socket: dir.path().join("bot.sock"),
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        shutdown,
        task: Some(task),
        dir: Some(dir),
    }
}

fn upstream_identifies(sim: &Simulator) -> usize {
    sim.frames().iter().filter(|f| f.op == 2).count()
}

/// A raw gateway client.
struct Gw {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    inflater: Inflater,
}

impl Gw {
    async fn connect(addr: SocketAddr, query: &str) -> Gw {
        let compression = if query.contains("zlib-stream") {
            Compression::ZlibStream
        } else if query.contains("zstd-stream") {
            Compression::ZstdStream
        } else {
            Compression::None
        };
        let url = format!("ws://{addr}/?{query}");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to the front door");
        Gw {
            ws,
            inflater: Inflater::new(compression).expect("inflater"),
        }
    }

    /// Connected, HELLO read and checked.
    async fn hello(addr: SocketAddr, query: &str) -> Gw {
        let mut gw = Gw::connect(addr, query).await;
        let hello = gw.recv().await;
        assert_eq!(hello["op"], 10, "{hello}");
        assert_eq!(hello["d"]["heartbeat_interval"], 1000);
        gw
    }

    async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    async fn send_raw(&mut self, text: String) {
        let _ = self.ws.send(Message::text(text)).await;
    }

    /// The next gateway payload (panics on close or timeout).
    async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a payload in time")
                .expect("connection open")
                .expect("no error");
            let mut out = Vec::new();
            let complete = match &message {
                Message::Text(t) => {
                    out.extend_from_slice(t.as_bytes());
                    true
                }
                Message::Binary(b) => self.inflater.push(b, &mut out).expect("inflates"),
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => false,
            };
            if complete {
                return serde_json::from_slice(&out).expect("json payload");
            }
        }
    }

    /// The next dispatch, skipping nothing.
    async fn dispatch(&mut self) -> Value {
        let v = self.recv().await;
        assert_eq!(v["op"], 0, "{v}");
        v
    }

    /// Read until the server closes; the close code.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => panic!("no close in time"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    fn identify(shard: u32, total: u32, intents: u64) -> Value {
        json!({"op": 2, "d": {
            "token": TOKEN,
            "intents": intents,
            "shard": [shard, total],
            "properties": {"os": "linux", "browser": "rawtest", "device": "rawtest"},
            "compress": false,
            "large_threshold": 250,
            "capabilities": 16381,
            "presence": {"since": null, "activities": [{"name": "tests", "type": 0}], "status": "online", "afk": false},
        }})
    }

    /// IDENTIFY while the shard may still be without a session: heartbeat
    /// every 400 ms until READY. Returns the READY frame and the heartbeats
    /// sent while waiting.
    async fn identify_waiting(&mut self, shard: u32, total: u32) -> (Value, u32) {
        self.send(Gw::identify(shard, total, INTENTS)).await;
        let mut beats = 0;
        let mut next_beat = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_beat {
                self.send(json!({"op": 1, "d": null})).await;
                next_beat += Duration::from_millis(400);
                beats += 1;
            }
            if let Ok(v) = tokio::time::timeout(Duration::from_millis(100), self.recv()).await
                && v["op"] == 0
            {
                return (v, beats);
            }
        }
    }

    /// IDENTIFY, then READY and one GUILD_CREATE per guild; returns READY's d.
    async fn identify_ready(&mut self, shard: u32, total: u32) -> Value {
        self.send(Gw::identify(shard, total, INTENTS)).await;
        let ready = self.dispatch().await;
        assert_eq!(ready["t"], "READY", "{ready}");
        assert_eq!(ready["s"], 1);
        let guilds = ready["d"]["guilds"].as_array().expect("guilds").len();
        for i in 0..guilds {
            let guild = self.dispatch().await;
            assert_eq!(guild["t"], "GUILD_CREATE", "{guild}");
            assert_eq!(guild["s"], 2 + i as u64);
        }
        ready["d"].clone()
    }
}

fn msg(id: u64, content: &str) -> Value {
    json!({"id": id.to_string(), "channel_id": "1", "content": content, "author": {"id": "2", "username": "u"}})
}

/// The next MESSAGE_CREATE (heartbeat ACKs and other dispatches skipped).
async fn next_message(gw: &mut Gw) -> Value {
    loop {
        let v = gw.recv().await;
        if v["op"] == 0 && v["t"] == "MESSAGE_CREATE" {
            return v;
        }
    }
}

#[tokio::test]
async fn identify_ready_guild_creates_and_live_events_with_own_seq() {
    let sim = simulator(2).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.send(json!({"op": 1, "d": null})).await;
    assert_eq!(gw.recv().await["op"], 11, "heartbeat ACKed at once");
    let ready = gw.identify_ready(1, 2).await;
    let session_id = ready["session_id"].as_str().expect("session id");
    assert_eq!(session_id.len(), 32);
    assert!(session_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(ready["resume_gateway_url"], format!("ws://{}/", d.addr));
    assert_eq!(ready["shard"], json!([1, 2]));
    assert_eq!(ready["v"], 10);
    assert!(ready["user"]["id"].is_string(), "{ready}");
    assert!(ready["application"]["id"].is_string(), "{ready}");
    let guilds = ready["guilds"].as_array().expect("guilds");
    assert_eq!(guilds.len(), 2, "the shard's guilds");
    assert!(guilds.iter().all(|g| g["unavailable"] == true));

    // A second client on the same shard numbers its own s from 1.
    let mut other = Gw::hello(d.addr, "v=9&encoding=json").await;
    let other_ready = other.identify_ready(1, 2).await;
    assert_ne!(other_ready["session_id"], ready["session_id"]);
    assert_eq!(other_ready["v"], 9);
    assert_eq!(
        upstream_identifies(&sim),
        2,
        "no upstream IDENTIFY for clients"
    );
    assert!(
        sim.wait_until(
            |s| s.frames().iter().any(|f| f.op == 3
                && f.shard == Some(1)
                && f.json["d"]["activities"][0]["name"] == "tests"),
            WAIT
        )
        .await,
        "IDENTIFY's presence reached shard 1 as an op 3"
    );

    sim.dispatch(0, "MESSAGE_CREATE", msg(10, "shard zero"));
    sim.dispatch(1, "MESSAGE_CREATE", msg(11, "shard one"));
    let got = next_message(&mut gw).await;
    assert_eq!(got["d"], msg(11, "shard one"), "only its own shard");
    assert_eq!(got["s"], 4, "after READY and two GUILD_CREATEs");
    let got = next_message(&mut other).await;
    assert_eq!(got["d"]["id"], "11");
    assert_eq!(got["s"], 4);
    sim.dispatch(1, "MESSAGE_CREATE", msg(12, "next"));
    assert_eq!(next_message(&mut gw).await["s"], 5);
    assert_eq!(upstream_identifies(&sim), 2);
}

#[tokio::test]
async fn resume_replays_every_missed_event_once_in_order_then_resumed() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json&compress=zlib-stream").await;
    let ready = gw.identify_ready(0, 1).await;
    let session_id = ready["session_id"].as_str().expect("id").to_string();
    let resume_url = ready["resume_gateway_url"]
        .as_str()
        .expect("url")
        .to_string();
    for id in 1..=3 {
        sim.dispatch(0, "MESSAGE_CREATE", msg(id, "before"));
    }
    let mut last = 0;
    for id in 1..=3 {
        let got = next_message(&mut gw).await;
        assert_eq!(got["d"]["id"], id.to_string());
        last = got["s"].as_u64().expect("s");
    }
    // Cut the connection without a close frame, as a network failure would.
    drop(gw);
    for id in 4..=8 {
        sim.dispatch(0, "MESSAGE_CREATE", msg(id, "while away"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The library only finished with s = last - 1: it gets that one again.
    // Libraries append the query to resume_gateway_url literally (no path).
    let url = format!("{resume_url}?v=10&encoding=json&compress=zlib-stream");
    assert!(url.starts_with(&format!("ws://{}/?v=10", d.addr)), "{url}");
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("resume_gateway_url with the query appended works");
    let mut gw = Gw {
        ws,
        inflater: Inflater::new(Compression::ZlibStream).expect("inflater"),
    };
    assert_eq!(gw.recv().await["op"], 10);
    gw.send(json!({"op": 6, "d": {"token": TOKEN, "session_id": session_id, "seq": last - 1}}))
        .await;
    let mut ids = Vec::new();
    loop {
        let v = gw.dispatch().await;
        if v["t"] == "RESUMED" {
            break;
        }
        assert_eq!(v["t"], "MESSAGE_CREATE", "{v}");
        assert_eq!(v["s"], last + ids.len() as u64, "original s numbers");
        ids.push(
            v["d"]["id"]
                .as_str()
                .expect("id")
                .parse::<u64>()
                .expect("n"),
        );
    }
    assert_eq!(
        ids,
        vec![3, 4, 5, 6, 7, 8],
        "every missed event once, in order"
    );
    sim.dispatch(0, "MESSAGE_CREATE", msg(9, "live again"));
    let live = next_message(&mut gw).await;
    assert_eq!(
        (live["d"]["id"].as_str(), live["s"].as_u64()),
        (Some("9"), Some(last + 6))
    );
    assert_eq!(upstream_identifies(&sim), 1);
    assert_eq!(
        sim.frames().iter().filter(|f| f.op == 6).count(),
        0,
        "no upstream RESUME either"
    );
}

#[tokio::test]
async fn resume_is_refused_with_op_9_when_it_cannot_be_honoured() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "64KiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    let ready = gw.identify_ready(0, 1).await;
    let session_id = ready["session_id"].as_str().expect("id").to_string();
    drop(gw);

    let mut probe = Gw::hello(d.addr, "v=10&encoding=json").await;
    probe
        .send(json!({"op": 6, "d": {"token": TOKEN, "session_id": "00000000000000000000000000000000", "seq": 3}}))
        .await;
    assert_eq!(
        probe.recv().await,
        json!({"t":null,"s":null,"op":9,"d":false}),
        "unknown session"
    );
    probe
        .send(json!({"op": 6, "d": {"token": "wrong-token", "session_id": session_id, "seq": 3}}))
        .await;
    assert_eq!(probe.recv().await["d"], false, "wrong token");
    probe
        .send(json!({"op": 6, "d": {"token": TOKEN, "session_id": session_id, "seq": 1}}))
        .await;
    assert_eq!(probe.recv().await["d"], false, "inside the READY burst");
    probe
        .send(json!({"op": 6, "d": {"token": TOKEN, "session_id": session_id, "seq": 99}}))
        .await;
    assert_eq!(probe.recv().await["d"], false, "past the session's s");

    // Overflow the 64 KiB ring while the client is away: the events it
    // missed are gone, so its RESUME is refused rather than leave a gap.
    let filler = "x".repeat(1000);
    for id in 0..200 {
        sim.dispatch(0, "MESSAGE_CREATE", msg(id, &filler));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    probe
        .send(json!({"op": 6, "d": {"token": TOKEN, "session_id": session_id, "seq": 3}}))
        .await;
    assert_eq!(probe.recv().await["d"], false, "events no longer held");
    // After op 9 the same connection may identify.
    let ready = probe.identify_ready(0, 1).await;
    assert_ne!(ready["session_id"].as_str(), Some(session_id.as_str()));
}

#[tokio::test]
async fn client_mistakes_get_discords_close_codes() {
    let sim = simulator(2).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let identify = |d: Value| json!({"op": 2, "d": d});
    let base = |shard: Value, intents: u64| json!({"token": TOKEN, "intents": intents, "shard": shard, "properties": {"os": "x", "browser": "x", "device": "x"}});
    let cases: Vec<(u16, &str, Vec<String>)> = vec![
        (4001, "unknown opcode", vec![json!({"op": 99, "d": null}).to_string()]),
        (4002, "not JSON", vec!["{not json".to_string()]),
        (
            4002,
            "over 4096 bytes",
            vec![json!({"op": 1, "d": "x".repeat(5000)}).to_string()],
        ),
        (
            4003,
            "command before IDENTIFY",
            vec![json!({"op": 3, "d": {"status": "online", "afk": false, "since": null, "activities": []}}).to_string()],
        ),
        (
            4004,
            "wrong token",
            vec![identify(json!({"token": "nope", "intents": INTENTS, "shard": [0, 2], "properties": {}})).to_string()],
        ),
        (
            4010,
            "wrong total",
            vec![identify(base(json!([0, 3]), INTENTS)).to_string()],
        ),
        (
            4010,
            "shard out of range",
            vec![identify(base(json!([2, 2]), INTENTS)).to_string()],
        ),
        (
            4011,
            "no shard while the daemon runs two",
            vec![identify(json!({"token": TOKEN, "intents": INTENTS, "properties": {}})).to_string()],
        ),
        (
            4013,
            "undocumented intent bit",
            vec![identify(base(json!([0, 2]), INTENTS | 1 << 30)).to_string()],
        ),
        (
            4013,
            "an intent the daemon does not hold",
            vec![identify(base(json!([0, 2]), INTENTS | 1 << 7)).to_string()],
        ),
        (
            4014,
            "a privileged intent the daemon does not hold",
            vec![identify(base(json!([0, 2]), INTENTS | 1 << 8)).to_string()],
        ),
    ];
    for (code, what, frames) in cases {
        let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
        for frame in frames {
            gw.send_raw(frame).await;
        }
        assert_eq!(gw.close_code().await, Some(code), "{what}");
    }

    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.identify_ready(0, 2).await;
    gw.send(Gw::identify(0, 2, INTENTS)).await;
    assert_eq!(gw.close_code().await, Some(4005), "second IDENTIFY");

    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    for _ in 0..121 {
        gw.send_raw(json!({"op": 1, "d": null}).to_string()).await;
    }
    assert_eq!(
        gw.close_code().await,
        Some(4008),
        "121 payloads within 60 s"
    );

    let mut gw = Gw::connect(d.addr, "v=8&encoding=json").await;
    assert_eq!(gw.close_code().await, Some(4012), "API v8");

    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/?v=10&encoding=etf", d.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let body =
                String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("etf"), "{body}");
        }
        other => panic!("encoding=etf must be refused: {:?}", other.map(|_| ())),
    }
    assert_eq!(upstream_identifies(&sim), 2);
}

#[tokio::test]
async fn silent_client_is_closed_and_its_session_resumes() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    let ready = gw.identify_ready(0, 1).await;
    let started = std::time::Instant::now();
    // No heartbeat: closed after 1.5 × the 1 s interval, resumably.
    assert_eq!(gw.close_code().await, Some(4000));
    assert!(started.elapsed() >= Duration::from_millis(1000));
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "missed"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.send(json!({"op": 6, "d": {"token": TOKEN, "session_id": ready["session_id"], "seq": 3}}))
        .await;
    let missed = gw.dispatch().await;
    assert_eq!(
        (missed["t"].as_str(), missed["s"].as_u64()),
        (Some("MESSAGE_CREATE"), Some(4))
    );
    assert_eq!(gw.dispatch().await["t"], "RESUMED");
}

#[tokio::test]
async fn zlib_stream_and_zstd_stream_and_payload_compression() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    for query in [
        "v=10&encoding=json&compress=zlib-stream",
        "v=10&encoding=json&compress=zstd-stream",
    ] {
        let mut gw = Gw::hello(d.addr, query).await;
        gw.identify_ready(0, 1).await;
        sim.dispatch(0, "MESSAGE_CREATE", msg(5, query));
        assert_eq!(next_message(&mut gw).await["d"]["content"], query);
    }
    // IDENTIFY compress: true without transport compression: large payloads
    // arrive as binary frames, each its own zlib stream.
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    let mut identify = Gw::identify(0, 1, INTENTS);
    identify["d"]["compress"] = json!(true);
    gw.send(identify).await;
    let big = "y".repeat(4000);
    let mut saw_binary = false;
    let mut got_big = false;
    for _ in 0..6 {
        let message = tokio::time::timeout(WAIT, gw.ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        let text = match message {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => {
                saw_binary = true;
                let mut out = String::new();
                use std::io::Read;
                flate2::read::ZlibDecoder::new(&b[..])
                    .read_to_string(&mut out)
                    .expect("zlib payload");
                out
            }
            _ => continue,
        };
        let v: Value = serde_json::from_str(&text).expect("json");
        if v["t"] == "GUILD_CREATE" && !got_big {
            sim.dispatch(0, "MESSAGE_CREATE", msg(6, &big));
        }
        if v["t"] == "MESSAGE_CREATE" {
            assert_eq!(v["d"]["content"].as_str().map(str::len), Some(4000));
            got_big = true;
            break;
        }
    }
    assert!(
        saw_binary && got_big,
        "large payloads compressed per message"
    );
}

#[tokio::test]
async fn member_chunks_go_to_the_asker_and_commands_reach_the_shard() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut asker = Gw::hello(d.addr, "v=10&encoding=json").await;
    asker.identify_ready(0, 1).await;
    let mut bystander = Gw::hello(d.addr, "v=10&encoding=json").await;
    bystander.identify_ready(0, 1).await;
    asker
        .send(json!({"op": 8, "d": {"guild_id": 81384788765712384u64, "query": "", "limit": 0, "nonce": "ask-1"}}))
        .await;
    asker
        .send(json!({"op": 3, "d": {"since": null, "game": {"name": "old field", "type": 0}, "status": "idle", "afk": false}}))
        .await;
    assert!(
        sim.wait_until(
            |s| {
                let frames = s.frames();
                frames.iter().any(|f| {
                    f.op == 8
                        && f.json["d"]["nonce"] == "ask-1"
                        && f.json["d"]["guild_id"] == 81384788765712384u64
                }) && frames
                    .iter()
                    .any(|f| f.op == 3 && f.json["d"]["game"]["name"] == "old field")
            },
            WAIT
        )
        .await,
        "op 8 (numeric guild_id) and op 3 (old game field) reached the shard as sent"
    );
    sim.dispatch(0, "GUILD_MEMBERS_CHUNK", json!({"guild_id": "81384788765712384", "members": [], "chunk_index": 0, "chunk_count": 1, "nonce": "ask-1"}));
    sim.dispatch(0, "GUILD_MEMBERS_CHUNK", json!({"guild_id": "81384788765712384", "members": [], "chunk_index": 0, "chunk_count": 1, "nonce": "someone-else"}));
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "marker"));
    // The simulator may answer op 8 itself; either way only `ask-1` chunks
    // reach the asker, and none reach the bystander.
    let mut chunks = Vec::new();
    loop {
        let v = asker.dispatch().await;
        if v["t"] == "MESSAGE_CREATE" {
            assert_eq!(v["d"]["content"], "marker");
            break;
        }
        assert_eq!(v["t"], "GUILD_MEMBERS_CHUNK", "{v}");
        chunks.push(v["d"]["nonce"].as_str().unwrap_or("").to_string());
    }
    assert!(chunks.contains(&"ask-1".to_string()), "{chunks:?}");
    assert!(chunks.iter().all(|n| n == "ask-1"), "{chunks:?}");
    let v = bystander.dispatch().await;
    assert_eq!(
        (v["t"].as_str(), v["d"]["content"].as_str()),
        (Some("MESSAGE_CREATE"), Some("marker")),
        "no chunk for the bystander: {v}"
    );
}

/// GET over a fresh connection; (status, body).
async fn http_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: DiscordBot (test, 1)\r\n{auth}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text[9..12].parse().expect("status");
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test]
async fn gateway_bot_is_answered_locally_and_checks_the_token() {
    let sim = simulator(2).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let before = sim.rest_requests();
    let (status, body) = http_get(
        d.addr,
        "/api/v10/gateway/bot",
        Some(&format!("Bot {TOKEN}")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["url"], format!("ws://{}/", d.addr));
    assert_eq!(v["shards"], 2);
    assert!(v["session_start_limit"]["remaining"].as_u64() >= Some(1000));
    assert!(v["session_start_limit"]["max_concurrency"].as_u64() >= Some(2));
    let (status, _) = http_get(d.addr, "/api/v9/gateway/bot", Some("Bot wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = http_get(d.addr, "/api/v10/gateway/bot", None).await;
    assert_eq!(status, 401);
    let (status, body) = http_get(d.addr, "/api/v10/gateway", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["url"],
        format!("ws://{}/", d.addr)
    );
    assert_eq!(
        sim.rest_requests(),
        before,
        "answered without asking Discord"
    );
}

/// What the stand-in REST API saw.
#[derive(Default)]
struct Echoed {
    /// Requests echoed.
    requests: AtomicUsize,
    /// Connections that carried echoed requests.
    connections: AtomicUsize,
}

/// A stand-in for Discord's REST API: answers `/gateway/bot` (pointing at
/// the simulator's gateway) and echoes every other request, keeping
/// connections alive unless the request says `Connection: close`.
async fn echo_upstream(sim: &Simulator) -> (String, Arc<Echoed>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gateway = sim.gateway_url();
    let shards = sim.config().shards;
    let echoed = Arc::new(Echoed::default());
    let count = echoed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let gateway = gateway.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut first_echo = true;
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let lower = head.to_ascii_lowercase();
                    let length: usize = lower
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body: Vec<u8> = buf.drain(..head_end + length).skip(head_end).collect();
                    let close = lower.contains("connection: close");
                    let request_line = head.lines().next().unwrap_or("").to_string();
                    let (status, body, extra) = if request_line.contains("/gateway/bot") {
                        let body = json!({"url": gateway, "shards": shards, "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 1000, "max_concurrency": 1}}).to_string();
                        (200, body, String::new())
                    } else {
                        count.requests.fetch_add(1, Ordering::SeqCst);
                        if first_echo {
                            count.connections.fetch_add(1, Ordering::SeqCst);
                            first_echo = false;
                        }
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("authorization: ")
                                    .or_else(|| l.strip_prefix("Authorization: "))
                            })
                            .unwrap_or("")
                            .to_string();
                        let content_type = head
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-type")
                                    .then(|| value.trim().to_string())
                            })
                            .unwrap_or_default();
                        let body = String::from_utf8_lossy(&body).to_string();
                        let echo = json!({"request_line": request_line, "authorization": auth, "content_type": content_type, "body": body})
                            .to_string();
                        (201, echo, "X-RateLimit-Bucket: abc\r\n".to_string())
                    };
                    let response = format!(
                        "HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}{}\r\n{body}",
                        body.len(),
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() || close {
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/api/v10"), echoed)
}

#[tokio::test]
async fn other_api_requests_are_forwarded_unchanged() {
    let sim = simulator(1).await;
    let (api_base, echoed) = echo_upstream(&sim).await;
    let d = daemon(&sim, &api_base, "", "16MiB").await;
    for round in 0..3 {
        let body = json!({"content": format!("hello through the front door {round}")}).to_string();
        let mut stream = TcpStream::connect(d.addr).await.expect("connect");
        let request = format!(
            "POST /api/v10/channels/42/messages?x=1 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bot {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            d.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response).to_string();
        assert!(text.starts_with("HTTP/1.1 201"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("x-ratelimit-bucket: abc"),
            "headers back: {text}"
        );
        let echo: Value =
            serde_json::from_str(text.split_once("\r\n\r\n").expect("body").1).expect("json");
        assert_eq!(
            echo["request_line"],
            "POST /api/v10/channels/42/messages?x=1 HTTP/1.1"
        );
        assert_eq!(echo["authorization"], format!("Bot {TOKEN}"));
        assert_eq!(echo["body"], body);
    }
    assert_eq!(echoed.requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        echoed.connections.load(Ordering::SeqCst),
        1,
        "one kept-alive upstream connection for all three (the client's Connection: close is hop-by-hop)"
    );
}

#[tokio::test]
async fn multipart_and_large_bodies_are_forwarded_intact() {
    let sim = simulator(1).await;
    let (api_base, echoed) = echo_upstream(&sim).await;
    let d = daemon(&sim, &api_base, "", "16MiB").await;
    let boundary = "----shardwarden-test-boundary";
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\nContent-Type: application/json\r\n\r\n{{\"content\":\"with a file\"}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nline one\r\nline two\r\n--{boundary}--\r\n"
    );
    // Past the 8 MiB held for retries: streamed once.
    let large = "x".repeat((8 << 20) + 4096);
    for (content_type, body) in [
        (
            format!("multipart/form-data; boundary={boundary}"),
            multipart,
        ),
        ("text/plain".to_string(), large),
    ] {
        let mut stream = TcpStream::connect(d.addr).await.expect("connect");
        let head = format!(
            "POST /api/v10/channels/42/messages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bot {TOKEN}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            d.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        stream.write_all(body.as_bytes()).await.expect("write body");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response).to_string();
        assert!(
            text.starts_with("HTTP/1.1 201"),
            "{}",
            &text[..text.len().min(300)]
        );
        let echo: Value =
            serde_json::from_str(text.split_once("\r\n\r\n").expect("body").1).expect("json");
        assert_eq!(echo["content_type"], content_type);
        assert!(
            echo["body"] == body,
            "the body arrived unchanged ({} bytes)",
            body.len()
        );
    }
    assert_eq!(echoed.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn drop_in_sessions_show_in_health() {
    use tokio::io::AsyncBufReadExt;
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.identify_ready(0, 1).await;
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "one"));
    assert_eq!(next_message(&mut gw).await["s"], 4);
    // `shardwarden status` prints the drop-in table.
    let socket = d.socket.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_shardwarden"))
            .arg("status")
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("run shardwarden status")
    })
    .await
    .expect("status");
    let table = String::from_utf8_lossy(&status.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("rawtest#"))
        .unwrap_or_else(|| panic!("no drop-in row in:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..], ["0", "connected", "4", "0"], "{row}");
    let stream = tokio::net::UnixStream::connect(&d.socket)
        .await
        .expect("bot socket");
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let hello = json!({"op":"hello","v":1,"client":"probe","events":["*"],"diagnostics":false,"resume_from":null});
    write
        .write_all(format!("{hello}\n{{\"op\":\"status\"}}\n").as_bytes())
        .await
        .expect("write");
    let health = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("json");
        if v["op"] == "health" {
            break v;
        }
    };
    let dropin = health["dropin"].as_array().expect("dropin array");
    assert_eq!(dropin.len(), 1, "{health}");
    assert!(
        dropin[0]["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("rawtest#")),
        "{health}"
    );
    assert_eq!(
        (
            dropin[0]["shard"].as_u64(),
            dropin[0]["state"].as_str(),
            dropin[0]["seq"].as_u64()
        ),
        (Some(0), Some("connected"), Some(4))
    );
    drop(gw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    write
        .write_all(b"{\"op\":\"status\"}\n")
        .await
        .expect("write");
    loop {
        let line = lines.next_line().await.expect("read").expect("line");
        let v: Value = serde_json::from_str(&line).expect("json");
        if v["op"] == "health" {
            assert_eq!(v["dropin"][0]["state"], "detached", "{v}");
            break;
        }
    }
}

/// A real library: twilight-gateway (zlib-stream, its own heartbeats)
/// identifies, gets READY and the GUILD_CREATEs, live events, and RESUMEs
/// through the front door after closing resumably; no event twice, none lost.
#[tokio::test]
async fn twilight_gateway_connects_and_resumes_through_the_front_door() {
    use twilight_gateway::{CloseFrame, ConfigBuilder, Intents, ShardId};
    async fn next(shard: &mut twilight_gateway::Shard) -> Option<Value> {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(shard))
            .await
            .expect("in time")
        {
            Some(Ok(twilight_gateway::Message::Text(text))) => {
                Some(serde_json::from_str::<Value>(&text).expect("json"))
            }
            Some(Ok(twilight_gateway::Message::Close(_))) => None,
            Some(Err(e)) => panic!("twilight: {e}"),
            None => panic!("shard stream ended"),
        }
    }
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let config = ConfigBuilder::new(TOKEN.to_string(), Intents::GUILDS | Intents::GUILD_MESSAGES)
        .proxy_url(format!("ws://{}", d.addr))
        .build();
    let mut shard = twilight_gateway::Shard::with_config(ShardId::ONE, config);
    let mut texts = Vec::new();
    while texts.len() < 3 {
        if let Some(v) = next(&mut shard).await
            && v["op"] == 0
        {
            texts.push(v["t"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(texts, ["READY", "GUILD_CREATE", "GUILD_CREATE"]);
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "first"));
    let mut ids = Vec::new();
    let mut resumed = false;
    while ids.is_empty() {
        if let Some(v) = next(&mut shard).await
            && v["t"] == "MESSAGE_CREATE"
        {
            ids.push(v["d"]["id"].as_str().unwrap_or("").to_string());
        }
    }
    shard.close(CloseFrame::RESUME);
    for id in 2..=4 {
        sim.dispatch(0, "MESSAGE_CREATE", msg(id, "around the resume"));
    }
    while ids.len() < 4 {
        if let Some(v) = next(&mut shard).await {
            match v["t"].as_str() {
                Some("MESSAGE_CREATE") => ids.push(v["d"]["id"].as_str().unwrap_or("").to_string()),
                Some("RESUMED") => resumed = true,
                Some("READY") => panic!("twilight had to identify again: {v}"),
                _ => {}
            }
        }
    }
    while !resumed {
        if let Some(v) = next(&mut shard).await {
            resumed = v["t"] == "RESUMED";
        }
    }
    assert_eq!(ids, ["1", "2", "3", "4"], "each once, in order");
    sim.dispatch(0, "MESSAGE_CREATE", msg(5, "after"));
    loop {
        if let Some(v) = next(&mut shard).await
            && v["t"] == "MESSAGE_CREATE"
        {
            assert_eq!(v["d"]["id"], "5");
            break;
        }
    }
    assert_eq!(upstream_identifies(&sim), 1);
}

/// A client that stops reading never holds up the shard or other clients:
/// its connection is dropped once a write has blocked for 1.5 × the
/// heartbeat interval, and its session resumes with everything it missed.
#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_resumes_with_everything() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(d.addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/?v=10&encoding=json", d.addr),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("handshake");
    let mut stuck = Gw {
        ws,
        inflater: Inflater::new(Compression::None).expect("inflater"),
    };
    assert_eq!(stuck.recv().await["op"], 10);
    let mut identify = Gw::identify(0, 1, INTENTS);
    identify["d"]["properties"]["browser"] = json!("stuck");
    stuck.send(identify).await;
    let ready = stuck.dispatch().await["d"].clone();
    for _ in 0..ready["guilds"].as_array().map_or(0, Vec::len) {
        assert_eq!(stuck.dispatch().await["t"], "GUILD_CREATE");
    }
    let mut healthy = Gw::hello(d.addr, "v=10&encoding=json").await;
    healthy.identify_ready(0, 1).await;

    // `stuck` stops reading; `healthy` keeps up.
    let filler = "z".repeat(2000);
    let total = 3000u64;
    let pump = {
        let sim = sim.clone();
        tokio::spawn(async move {
            for id in 1..=total {
                sim.dispatch(0, "MESSAGE_CREATE", msg(id, &filler));
                if id % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    for id in 1..=total {
        let v = next_message(&mut healthy).await;
        assert_eq!(
            v["d"]["id"],
            id.to_string(),
            "the reading client gets everything in order"
        );
        if id % 200 == 0 {
            healthy.send(json!({"op": 1, "d": null})).await;
            // `stuck` heartbeats too (it only stopped reading), so only the
            // write limit can drop it.
            stuck
                .send_raw(json!({"op": 1, "d": null}).to_string())
                .await;
        }
    }
    pump.await.expect("pump");
    // Its connection is dropped by the write limit (1.5 × heartbeat), not
    // left blocked: the session shows as detached.
    let mut detached = false;
    for _ in 0..50 {
        let h = health(&d).await;
        let rows = h["dropin"].as_array().cloned().unwrap_or_default();
        let stuck_row = rows.iter().find(|r| {
            r["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("stuck#"))
        });
        if stuck_row.is_some_and(|r| r["state"] == "detached") {
            detached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(detached, "the stuck client's connection was dropped");
    let mut again = Gw::hello(d.addr, "v=10&encoding=json").await;
    again
        .send(json!({"op": 6, "d": {"token": TOKEN, "session_id": ready["session_id"], "seq": 3}}))
        .await;
    // What the session had is replayed with its original s, then RESUMED;
    // events it had not been given yet follow as live ones, s continuing.
    let mut resumed = false;
    let mut id = 1;
    while id <= total {
        let v = again.recv().await;
        if v["op"] == 11 {
            continue;
        }
        if v["t"] == "RESUMED" {
            assert!(!resumed, "one RESUMED");
            resumed = true;
            continue;
        }
        assert_eq!(
            (v["d"]["id"].as_str(), v["s"].as_u64()),
            (Some(id.to_string().as_str()), Some(3 + id))
        );
        if id % 500 == 0 {
            again.send(json!({"op": 1, "d": null})).await;
        }
        id += 1;
    }
    assert!(resumed);
    drop(stuck);
}

/// One `health` message from the bot socket.
async fn health(d: &Daemon) -> Value {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::UnixStream::connect(&d.socket)
        .await
        .expect("bot socket");
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let hello = json!({"op":"hello","v":1,"client":"health-probe","events":["*"],"diagnostics":false,"resume_from":null});
    write
        .write_all(format!("{hello}\n{{\"op\":\"status\"}}\n").as_bytes())
        .await
        .expect("write");
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("json");
        if v["op"] == "health" {
            return v;
        }
    }
}

#[tokio::test]
async fn resume_takes_a_session_over_from_a_still_open_connection() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut old = Gw::hello(d.addr, "v=10&encoding=json").await;
    let ready = old.identify_ready(0, 1).await;
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "to the old connection"));
    assert_eq!(next_message(&mut old).await["s"], 4);
    // The library thinks `old` is dead (a zombie) and resumes elsewhere.
    let mut new = Gw::hello(d.addr, "v=10&encoding=json").await;
    new.send(json!({"op": 6, "d": {"token": TOKEN, "session_id": ready["session_id"], "seq": 3}}))
        .await;
    let replayed = new.dispatch().await;
    assert_eq!(
        (replayed["d"]["id"].as_str(), replayed["s"].as_u64()),
        (Some("1"), Some(4))
    );
    assert_eq!(new.dispatch().await["t"], "RESUMED");
    assert_eq!(
        old.close_code().await,
        Some(4000),
        "the old connection is let go"
    );
    sim.dispatch(0, "MESSAGE_CREATE", msg(2, "only to the new one"));
    assert_eq!(next_message(&mut new).await["s"], 5);
}

#[tokio::test]
async fn identify_waits_for_the_shard_to_hold_a_session() {
    use shardwarden::simulator::Fault;
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    // Discord ends the shard's session: it re-identifies after 1–5 s.
    assert!(sim.inject(0, Fault::InvalidSession { resumable: false }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.send(json!({"op": 1, "d": null})).await;
    assert_eq!(
        gw.recv().await["op"],
        11,
        "heartbeats answered while waiting"
    );
    let (ready, waited) = gw.identify_waiting(0, 1).await;
    assert!(
        waited >= 2,
        "READY waited for the shard ({waited} heartbeats)"
    );
    assert_eq!(
        (ready["t"].as_str(), ready["s"].as_u64()),
        (Some("READY"), Some(1))
    );
    assert_eq!(
        upstream_identifies(&sim),
        2,
        "READY came from the shard's new session"
    );
    assert_eq!(ready["d"]["guilds"].as_array().map(Vec::len), Some(2));
    sim.dispatch(0, "MESSAGE_CREATE", msg(1, "live"));
    assert_eq!(next_message(&mut gw).await["d"]["id"], "1");
}

#[tokio::test]
async fn a_guild_in_an_outage_gets_guild_delete_unavailable_in_the_burst() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut first = Gw::hello(d.addr, "v=10&encoding=json").await;
    let ready = first.identify_ready(0, 1).await;
    let down = ready["guilds"][0]["id"]
        .as_str()
        .expect("guild id")
        .to_string();
    sim.dispatch(0, "GUILD_DELETE", json!({"id": down, "unavailable": true}));
    let seen = first.dispatch().await;
    assert_eq!(
        (seen["t"].as_str(), seen["d"]["id"].as_str()),
        (Some("GUILD_DELETE"), Some(down.as_str()))
    );
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.send(Gw::identify(0, 1, INTENTS)).await;
    let ready = gw.dispatch().await;
    assert_eq!(
        ready["d"]["guilds"].as_array().map(Vec::len),
        Some(2),
        "still listed in READY"
    );
    let mut burst = Vec::new();
    for _ in 0..2 {
        let v = gw.dispatch().await;
        burst.push((
            v["t"].as_str().unwrap_or("").to_string(),
            v["d"]["id"].as_str().unwrap_or("").to_string(),
            v["d"]["unavailable"].clone(),
        ));
    }
    assert!(
        burst.contains(&("GUILD_DELETE".to_string(), down.clone(), json!(true))),
        "{burst:?}"
    );
    assert_eq!(
        burst.iter().filter(|(t, ..)| t == "GUILD_CREATE").count(),
        1,
        "{burst:?}"
    );
}

/// A front-door client of the daemon at `addr` that may still be starting:
/// connected (retrying), HELLO read.
async fn hello_when_up(addr: SocketAddr) -> Gw {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut gw = loop {
        if let Ok(Ok((ws, _))) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio_tungstenite::connect_async(format!("ws://{addr}/?v=10&encoding=json")),
        )
        .await
        {
            break Gw {
                ws,
                inflater: Inflater::new(Compression::None).expect("inflater"),
            };
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "front door never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(gw.recv().await["op"], 10);
    gw
}

/// READY lists both guilds and a GUILD_CREATE follows for each, with its
/// channels.
/// IDENTIFY as a client; READY and every GUILD_CREATE `d` it is followed by.
async fn full_ready(gw: &mut Gw) -> Vec<Value> {
    let (ready, _) = gw.identify_waiting(0, 1).await;
    assert_eq!(ready["t"], "READY");
    let guilds = ready["d"]["guilds"].as_array().map_or(0, Vec::len);
    assert_eq!(guilds, 2, "READY lists the shard's guilds: {ready}");
    let mut creates = Vec::new();
    while creates.len() < guilds {
        let v = gw.recv().await;
        if v["t"] == "GUILD_CREATE" {
            assert!(
                v["d"]["channels"].as_array().is_some_and(|c| !c.is_empty()),
                "{v}"
            );
            creates.push(v["d"].clone());
        }
    }
    creates
}

/// With [proxy] on, a clean restart resumes (the cache is saved at the stop
/// and restored at the start) and clients get a full READY and GUILD_CREATEs
/// again; so does a crash (the cache is also saved every few seconds while
/// it changes), with what changed before the crash.
#[tokio::test]
async fn a_clean_restart_and_a_crash_both_resume_with_the_cache() {
    let sim = simulator(1).await;
    let d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.identify_ready(0, 1).await;
    drop(gw);
    let port = d.addr.port();
    let dir = d.stop().await;
    assert!(
        dir.path().join("state/frontdoor-cache.ndjson.zst").exists(),
        "the cache was saved at the clean stop"
    );
    let d = daemon_in(dir, port, &sim, &sim.api_base(), "", "16MiB");
    assert!(
        sim.wait_until(
            |s| s.frames().iter().filter(|f| f.op == 6).count() == 1,
            WAIT
        )
        .await,
        "the restarted daemon resumed"
    );
    let mut gw = hello_when_up(d.addr).await;
    full_ready(&mut gw).await;
    assert_eq!(
        upstream_identifies(&sim),
        1,
        "a clean restart costs no IDENTIFY"
    );
    drop(gw);

    // The cache changes (a new channel), then a crash: the task is
    // dropped and nothing is saved at the end, but the periodic save
    // (every 200 ms here) has the change.
    let guild = sim.shard_guilds(0)[0];
    sim.dispatch(
        0,
        "CHANNEL_CREATE",
        json!({"id": "990001", "type": 0, "guild_id": guild.to_string(), "name": "after-restart", "position": 9, "permission_overwrites": []}),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut d = d;
    d.task.take().expect("running").abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = d.dir.take().expect("dir");
    drop(d);
    let d = daemon_in(dir, port, &sim, &sim.api_base(), "", "16MiB");
    assert!(
        sim.wait_until(
            |s| s.frames().iter().filter(|f| f.op == 6).count() == 2,
            WAIT
        )
        .await,
        "after the crash the shard resumed too"
    );
    let mut gw = hello_when_up(d.addr).await;
    let guilds = full_ready(&mut gw).await;
    assert_eq!(upstream_identifies(&sim), 1, "a crash costs no IDENTIFY");
    let text = serde_json::to_string(&guilds).expect("json");
    assert!(
        text.contains("after-restart"),
        "the rebuilt GUILD_CREATE has the channel created before the crash"
    );
}

/// A daemon that never stopped cleanly: its periodic save alone lets the
/// next start resume after a crash.
#[tokio::test]
async fn a_crash_before_any_clean_stop_resumes_from_the_periodic_save() {
    let sim = simulator(1).await;
    let mut d = daemon(&sim, &sim.api_base(), "", "16MiB").await;
    let cache = std::path::Path::new("state/frontdoor-cache.ndjson.zst");
    let file = d.dir.as_ref().expect("dir").path().join(cache);
    let started = std::time::Instant::now();
    while !file.exists() {
        assert!(started.elapsed() < WAIT, "the cache is saved while running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port = d.addr.port();
    d.task.take().expect("running").abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = d.dir.take().expect("dir");
    drop(d);
    let d = daemon_in(dir, port, &sim, &sim.api_base(), "", "16MiB");
    assert!(
        sim.wait_until(|s| s.frames().iter().any(|f| f.op == 6), WAIT)
            .await,
        "the shard resumed after the crash"
    );
    let mut gw = hello_when_up(d.addr).await;
    full_ready(&mut gw).await;
    assert_eq!(upstream_identifies(&sim), 1, "a crash costs no IDENTIFY");
}

#[test]
fn check_config_prints_the_front_door_and_refuses_a_public_listen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |listen: &str, events: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[discord]\ntoken_env = \"SW_UNUSED\"\nintents = [\"GUILDS\", \"GUILD_MESSAGES\"]\nevents = {events}\n[proxy]\nlisten = \"{listen}\"\n"
            ),
        )
        .expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardwarden"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run check-config");
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, text) = run("127.0.0.1:7878", r#"["*"]"#);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(
            "proxy       http://127.0.0.1:7878 and ws://127.0.0.1:7878 (HELLO heartbeat 41250 ms"
        ),
        "{text}"
    );
    assert!(!text.contains("[proxy] is on but"), "{text}");
    let (code, text) = run("127.0.0.1:7878", r#"["MESSAGE_CREATE"]"#);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("warning: [proxy] is on but [discord] events lists 1 event(s)"),
        "{text}"
    );
    let (code, text) = run("0.0.0.0:7878", r#"["*"]"#);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("[proxy] listen = \"0.0.0.0:7878\"") && text.contains("DESIGN.md §4"),
        "{text}"
    );
}

/// The only test in this process that installs the metrics exporter (it is
/// process-wide).
#[tokio::test]
async fn metrics_count_drop_in_sessions_and_the_cache() {
    let sim = simulator(1).await;
    let port = free_port();
    let d = daemon(
        &sim,
        &sim.api_base(),
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        "16MiB",
    )
    .await;
    let mut gw = Gw::hello(d.addr, "v=10&encoding=json").await;
    gw.identify_ready(0, 1).await;
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut text = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.send(json!({"op": 1, "d": null})).await;
        if let Ok(mut stream) = TcpStream::connect(metrics).await {
            let _ = stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            text.clear();
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes).await;
            text = String::from_utf8_lossy(&bytes).to_string();
            if text.contains("shardwarden_dropin_sessions{state=\"connected\"} 1") {
                break;
            }
        }
    }
    assert!(
        text.contains("shardwarden_dropin_sessions{state=\"connected\"} 1"),
        "{text}"
    );
    assert!(text.contains("shardwarden_cache_guilds 2"), "{text}");
}
