use std::collections::HashMap;

use serde_json::{Value, json};
use tokio::io::Lines;

use super::*;
use crate::event_log::EventLog;
use crate::hub::{IdentifyBudget, OutboundCommand, SendRefusal, SessionReport};

const EVENTS: [&str; 3] = ["GUILD_CREATE", "MESSAGE_CREATE", "INTERACTION_CREATE"];
const WAIT: Duration = Duration::from_secs(10);

/// A guild on shard `shard` of 4: `(guild_id >> 22) % 4`.
fn guild_on(shard: u64) -> u64 {
    (shard + 4 * 1000) << 22
}

struct Daemon {
    hub: Arc<Hub>,
    socket: PathBuf,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    /// Command channels of shards 0 and 1 (of 4).
    shards: HashMap<u32, mpsc::Receiver<OutboundCommand>>,
    _dir: tempfile::TempDir,
}

fn hub(ring: usize) -> (Hub, HashMap<u32, mpsc::Receiver<OutboundCommand>>) {
    let mut commands = HashMap::new();
    let mut receivers = HashMap::new();
    for shard in [0, 1] {
        let (tx, rx) = mpsc::channel(8);
        commands.insert(shard, tx);
        receivers.insert(shard, rx);
    }
    let hub = Hub::new(
        EventLog::new(1, ring),
        &[0, 1],
        4,
        EVENTS.iter().map(|e| e.to_string()).collect(),
        commands,
        IdentifyBudget::default(),
    );
    (hub, receivers)
}

fn config(dir: &Path) -> BotServerConfig {
    BotServerConfig {
        socket: dir.join("run/bot.sock"),
        socket_mode: 0o660,
        health_interval: Duration::from_millis(50),
        version: "0.1.0-test",
    }
}

async fn start(ring: usize) -> Daemon {
    start_with(ring, HELLO_TIMEOUT).await
}

async fn start_with(ring: usize, hello_timeout: Duration) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let (hub, shards) = hub(ring);
    let hub = Arc::new(hub);
    let cfg = config(dir.path());
    let socket = cfg.socket.clone();
    let mut server = BotServer::bind(cfg, hub.clone()).await.unwrap();
    server.hello_timeout = hello_timeout;
    let (shutdown, rx) = watch::channel(false);
    let server = tokio::spawn(server.run(rx));
    Daemon {
        hub,
        socket,
        shutdown,
        server,
        shards,
        _dir: dir,
    }
}

impl Daemon {
    fn append(&self, event: &str) -> u64 {
        let index = self.hub.event_index(event).unwrap();
        self.hub
            .log
            .append(0, 1, 1, index, event, b"{\"x\":1}")
            .expect("no lease limit in tests")
    }

    async fn bot(&self) -> Bot {
        let (read, write) = UnixStream::connect(&self.socket)
            .await
            .unwrap()
            .into_split();
        Bot {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Wait until `cond` holds (something another task does).
    async fn until(&self, what: &str, cond: impl Fn(&Hub) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(&self.hub) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

struct Bot {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Bot {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, message: Value) {
        let mut line = serde_json::to_vec(&message).unwrap();
        line.push(b'\n');
        self.send_raw(&line).await;
    }

    async fn next_line(&mut self) -> Option<String> {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("timed out waiting for a line from the daemon")
            .unwrap()
    }

    async fn recv(&mut self) -> Value {
        let line = self
            .next_line()
            .await
            .expect("daemon closed the connection");
        serde_json::from_str(&line).unwrap()
    }

    async fn expect(&mut self, op: &str) -> Value {
        let message = self.recv().await;
        assert_eq!(message["op"], op, "{message}");
        message
    }

    async fn expect_error(&mut self, code: &str) -> Value {
        let message = self.expect("error").await;
        assert_eq!(message["code"], code, "{message}");
        message
    }

    async fn hello(&mut self, events: Value, resume_from: Value) -> Value {
        self.send(
            json!({"op":"hello","v":1,"client":"test","events":events,"resume_from":resume_from}),
        )
        .await;
        self.expect("welcome").await
    }

    /// The cursors of the next `n` dispatches.
    async fn dispatches(&mut self, n: usize) -> Vec<u64> {
        let mut cursors = Vec::with_capacity(n);
        while cursors.len() < n {
            let message = self.expect("dispatch").await;
            cursors.push(message["cursor"].as_u64().unwrap());
        }
        cursors
    }
}

#[tokio::test]
async fn hello_gets_welcome_then_live_events_only() {
    let daemon = start(1 << 20).await;
    for _ in 0..3 {
        daemon.append("MESSAGE_CREATE");
    }
    let mut bot = daemon.bot().await;
    let welcome = bot.hello(json!(["*"]), Value::Null).await;
    assert_eq!(welcome["v"], 1);
    assert_eq!(welcome["version"], "0.1.0-test");
    assert_eq!(welcome["shard_total"], 4);
    assert_eq!(welcome["shards"], json!([0, 1]));
    assert_eq!(
        (welcome["head"].as_u64(), welcome["oldest"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(welcome["missed"], 0);
    assert!(welcome.get("resume_from_ahead").is_none());
    daemon
        .until("bot counted", |hub| {
            hub.bot_clients.load(Ordering::Relaxed) == 1
        })
        .await;

    daemon.append("MESSAGE_CREATE");
    let dispatch = bot.expect("dispatch").await;
    assert_eq!(dispatch["cursor"], 4);
    assert_eq!(dispatch["t"], "MESSAGE_CREATE");
    assert_eq!(dispatch["d"], json!({"x":1}));

    drop(bot);
    daemon
        .until("bot uncounted", |hub| {
            hub.bot_clients.load(Ordering::Relaxed) == 0
        })
        .await;
}

#[tokio::test]
async fn replays_after_resume_from_then_goes_live() {
    let daemon = start(1 << 20).await;
    for _ in 0..5 {
        daemon.append("MESSAGE_CREATE");
    }
    let mut bot = daemon.bot().await;
    let welcome = bot.hello(json!(["MESSAGE_CREATE"]), json!(2)).await;
    assert_eq!(welcome["missed"], 0);
    assert_eq!(bot.dispatches(3).await, vec![3, 4, 5]);
    daemon.append("MESSAGE_CREATE");
    assert_eq!(bot.dispatches(1).await, vec![6]);
}

#[tokio::test]
async fn resume_from_zero_gets_everything_held() {
    let daemon = start(1 << 20).await;
    for _ in 0..3 {
        daemon.append("GUILD_CREATE");
    }
    let mut bot = daemon.bot().await;
    let welcome = bot.hello(json!(["*"]), json!(0)).await;
    assert_eq!(welcome["missed"], 0);
    assert_eq!(bot.dispatches(3).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn resume_from_ahead_of_head_goes_live_and_says_so() {
    let daemon = start(1 << 20).await;
    daemon.append("GUILD_CREATE");
    let mut bot = daemon.bot().await;
    let welcome = bot.hello(json!(["*"]), json!(1000)).await;
    assert_eq!(welcome["resume_from_ahead"], true);
    assert!(welcome["notice"].as_str().unwrap().contains("ahead"));
    daemon.append("GUILD_CREATE");
    assert_eq!(bot.dispatches(1).await, vec![2]);
}

#[tokio::test]
async fn resume_from_before_the_ring_reports_exact_gap() {
    let daemon = start(1000).await;
    for _ in 0..100 {
        daemon.append("MESSAGE_CREATE");
    }
    let oldest = daemon.hub.log.oldest();
    assert!(oldest > 6);
    let mut bot = daemon.bot().await;
    let welcome = bot.hello(json!(["*"]), json!(5)).await;
    assert_eq!(welcome["oldest"], oldest);
    assert_eq!(welcome["missed"], oldest - 1 - 5);
    let gap = bot.expect("gap").await;
    assert_eq!(
        gap,
        json!({"op":"gap","from":6,"to":oldest-1,"missed":oldest-1-5})
    );
    let held = (100 - oldest + 1) as usize;
    assert_eq!(
        bot.dispatches(held).await,
        (oldest..=100).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn bot_that_falls_out_of_the_ring_gets_gap_and_goes_on() {
    let daemon = start(64 * 1024).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;
    // Far more than the socket buffers and the ring hold, while the bot
    // does not read.
    let d = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
    let total = 3000u64;
    for seq in 1..=total {
        daemon
            .hub
            .log
            .append(1, seq, 1, 1, "MESSAGE_CREATE", d.as_bytes());
    }
    let (mut next, mut gaps, mut received) = (1u64, 0, 0);
    while next <= total {
        let message = bot.recv().await;
        match message["op"].as_str().unwrap() {
            "dispatch" => {
                assert_eq!(message["cursor"], next);
                received += 1;
                next += 1;
            }
            "gap" => {
                assert_eq!(message["from"], next, "{message}");
                let to = message["to"].as_u64().unwrap();
                assert_eq!(message["missed"], to - next + 1);
                gaps += 1;
                next = to + 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(gaps >= 1, "the bot must have fallen out of the ring");
    assert!(received > 0);
}

#[tokio::test]
async fn narrow_filter_replays_across_a_large_ring() {
    let daemon = start(64 << 20).await;
    let skipped = crate::event_log::MAX_SCAN as u64 * 2 + 5;
    for _ in 0..skipped {
        daemon.append("GUILD_CREATE");
    }
    let wanted = daemon.append("INTERACTION_CREATE");
    let mut bot = daemon.bot().await;
    bot.hello(json!(["INTERACTION_CREATE"]), json!(0)).await;
    assert_eq!(bot.dispatches(1).await, vec![wanted]);
    bot.send(json!({"op":"ack","cursor":wanted})).await;
    daemon
        .until("ack recorded", |hub| {
            hub.consumers.resume_point(crate::clock::unix_millis()) == Some(wanted)
        })
        .await;
}

#[tokio::test]
async fn bots_get_only_the_events_they_asked_for() {
    let daemon = start(1 << 20).await;
    let mut messages = daemon.bot().await;
    messages.hello(json!(["MESSAGE_CREATE"]), Value::Null).await;
    let mut guilds = daemon.bot().await;
    guilds
        .hello(json!(["GUILD_CREATE", "INTERACTION_CREATE"]), Value::Null)
        .await;
    let g1 = daemon.append("GUILD_CREATE");
    let m1 = daemon.append("MESSAGE_CREATE");
    let i1 = daemon.append("INTERACTION_CREATE");
    let m2 = daemon.append("MESSAGE_CREATE");
    assert_eq!(messages.dispatches(2).await, vec![m1, m2]);
    assert_eq!(guilds.dispatches(2).await, vec![g1, i1]);
    // Nothing else is pending for either.
    messages.send(json!({"op":"status"})).await;
    messages.expect("health").await;
    guilds.send(json!({"op":"status"})).await;
    guilds.expect("health").await;
}

#[tokio::test]
async fn refused_hello_can_be_corrected() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.send(json!({"op":"status"})).await;
    let error = bot.expect_error("bad_request").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("send hello first")
    );

    bot.send(json!({"op":"hello","v":2,"events":["*"]})).await;
    bot.expect_error("unsupported_version").await;

    bot.send(json!({"op":"hello","v":1,"events":["MESSAGE_CREATE","TYPING_START","NOPE"]}))
        .await;
    let error = bot.expect_error("unsubscribed_event").await;
    assert_eq!(error["unknown_events"], json!(["TYPING_START", "NOPE"]));
    assert_eq!(error["configured_events"], json!(EVENTS));
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("TYPING_START") && message.contains("GUILD_CREATE"));

    bot.hello(json!(["MESSAGE_CREATE"]), Value::Null).await;
    bot.send(json!({"op":"hello","v":1,"events":["*"]})).await;
    bot.expect_error("bad_request").await;
}

#[tokio::test]
async fn no_hello_in_time_gets_hello_timeout_and_close() {
    let daemon = start_with(1 << 20, Duration::from_millis(100)).await;
    let mut bot = daemon.bot().await;
    bot.send_raw(b"{\"op\":\"hel").await;
    bot.expect_error("hello_timeout").await;
    assert_eq!(bot.next_line().await, None);
}

#[tokio::test]
async fn ack_records_progress() {
    let daemon = start(1 << 20).await;
    for _ in 0..3 {
        daemon.append("MESSAGE_CREATE");
    }
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), json!(0)).await;
    assert_eq!(bot.dispatches(3).await, vec![1, 2, 3]);
    bot.send(json!({"op":"ack","cursor":3})).await;
    daemon
        .until("ack recorded", |hub| {
            hub.consumers.resume_point(crate::clock::unix_millis()) == Some(3)
        })
        .await;
    bot.send(json!({"op":"ack","cursor":1})).await;
    bot.send(json!({"op":"ack","cursor":10})).await;
    let error = bot.expect_error("bad_request").await;
    assert!(error["message"].as_str().unwrap().contains("beyond"));
    assert_eq!(
        daemon
            .hub
            .consumers
            .resume_point(crate::clock::unix_millis()),
        Some(3)
    );
}

#[tokio::test]
async fn status_and_diagnostics() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.send(json!({"op":"hello","v":1,"events":["*"],"diagnostics":true}))
        .await;
    bot.expect("welcome").await;
    // A periodic health line (every 50 ms here).
    let health = bot.expect("health").await;
    assert_eq!(health["shards"].as_array().unwrap().len(), 2);
    assert_eq!(health["bot_clients"], 1);

    daemon.hub.report(&SessionReport::new(1, "resumed"));
    let session = loop {
        let message = bot.recv().await;
        if message["op"] != "health" {
            break message;
        }
    };
    assert_eq!(session["op"], "session");
    assert_eq!(
        (session["shard"].as_u64(), session["event"].as_str()),
        (Some(1), Some("resumed"))
    );

    let mut plain = daemon.bot().await;
    plain.hello(json!(["*"]), Value::Null).await;
    plain.send(json!({"op":"status"})).await;
    let health = plain.expect("health").await;
    assert_eq!(health["shards"][0]["state"], "idle");
}

#[tokio::test]
async fn sends_are_checked_before_reaching_a_shard() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;

    bot.send(json!({"op":"send","id":"h","shard":0,"payload":{"op":1,"d":null}}))
        .await;
    let error = bot.expect_error("op_not_allowed").await;
    assert_eq!(error["id"], "h");
    assert!(error["message"].as_str().unwrap().contains("heartbeat"));
    for op in [2, 6, 0, 44] {
        bot.send(json!({"op":"send","id":op,"shard":0,"payload":{"op":op,"d":{}}}))
            .await;
        assert_eq!(bot.expect_error("op_not_allowed").await["id"], op);
    }

    let big = "x".repeat(4100);
    bot.send(json!({"op":"send","id":"big","shard":0,"payload":{"op":3,"d":{"s":big}}}))
        .await;
    assert_eq!(bot.expect_error("payload_too_large").await["id"], "big");

    bot.send(json!({"op":"send","id":"s3","shard":3,"payload":{"op":3,"d":{}}}))
        .await;
    let error = bot.expect_error("shard_not_owned").await;
    assert_eq!(error["id"], "s3");

    let foreign = guild_on(2).to_string();
    bot.send(json!({"op":"send","id":"g2","guild_id":foreign,"payload":{"op":8,"d":{}}}))
        .await;
    let error = bot.expect_error("shard_not_owned").await;
    assert!(error["message"].as_str().unwrap().contains("shard 2"));

    bot.send(json!({"op":"send","id":"both","shard":0,"guild_id":"1","payload":{"op":3,"d":{}}}))
        .await;
    bot.expect_error("bad_request").await;
    bot.send(json!({"op":"send","id":"none","payload":{"op":3,"d":{}}}))
        .await;
    bot.expect_error("bad_request").await;
    bot.send(json!({"op":"send","id":"nopayload","shard":0}))
        .await;
    bot.expect_error("bad_request").await;
}

#[tokio::test]
async fn send_reaches_the_shard_and_is_answered() {
    let mut daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;

    bot.send(json!({"op":"send","id":"a1","shard":0,"payload":{"op":3,"d":{"status":"idle"}}}))
        .await;
    let command = daemon.shards.get_mut(&0).unwrap().recv().await.unwrap();
    assert_eq!(command.payload, r#"{"op":3,"d":{"status":"idle"}}"#);
    command.reply.send(Ok(())).unwrap();
    assert_eq!(
        bot.expect("sent").await,
        json!({"op":"sent","id":"a1","shard":0})
    );

    // guild_id (as string and as number) picks the owning shard.
    let guild = guild_on(1);
    bot.send(json!({"op":"send","id":"a2","guild_id":guild.to_string(),"payload":{"op":8,"d":{"guild_id":guild.to_string()}}}))
        .await;
    let command = daemon.shards.get_mut(&1).unwrap().recv().await.unwrap();
    assert!(command.payload.starts_with(r#"{"op":8,"#));
    command
        .reply
        .send(Err(SendRefusal {
            code: "rate_limited",
            message: "try again in 2 s".into(),
        }))
        .unwrap();
    let error = bot.expect_error("rate_limited").await;
    assert_eq!(
        (error["id"].as_str(), error["message"].as_str()),
        (Some("a2"), Some("try again in 2 s"))
    );

    bot.send(json!({"op":"send","id":"a3","guild_id":guild,"payload":{"op":4,"d":{}}}))
        .await;
    let command = daemon.shards.get_mut(&1).unwrap().recv().await.unwrap();
    drop(command);
    assert_eq!(bot.expect_error("shard_unavailable").await["id"], "a3");
    assert!(daemon.shards[&0].is_empty());
}

#[tokio::test]
async fn op31_is_split_per_owning_shard() {
    let mut daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;
    let (g0, g1, g0b) = (guild_on(0), guild_on(1), guild_on(0) + 4);
    bot.send(json!({"op":"send","id":"sb","payload":{"op":31,"d":{"guild_ids":[g0.to_string(), g1, g0b.to_string()]}}}))
        .await;
    let to0 = daemon.shards.get_mut(&0).unwrap().recv().await.unwrap();
    let to1 = daemon.shards.get_mut(&1).unwrap().recv().await.unwrap();
    let d0: Value = serde_json::from_str(&to0.payload).unwrap();
    let d1: Value = serde_json::from_str(&to1.payload).unwrap();
    assert_eq!(
        d0["d"]["guild_ids"],
        json!([g0.to_string(), g0b.to_string()])
    );
    assert_eq!(d1["d"]["guild_ids"], json!([g1.to_string()]));
    to0.reply.send(Ok(())).unwrap();
    to1.reply.send(Ok(())).unwrap();
    let sent = bot.expect("sent").await;
    assert_eq!(sent["shards"], json!([0, 1]));

    bot.send(json!({"op":"send","id":"sb2","payload":{"op":31,"d":{"guild_ids":[g0.to_string(), guild_on(3).to_string()]}}}))
        .await;
    bot.expect_error("shard_not_owned").await;
    assert!(
        daemon.shards[&0].is_empty(),
        "nothing is sent when a part is not owned"
    );
}

#[tokio::test]
async fn garbage_gets_bad_request_and_the_connection_stays_usable() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;
    let mut other = daemon.bot().await;
    other.hello(json!(["*"]), Value::Null).await;

    bot.send_raw(b"{not json\n").await;
    let error = bot.expect_error("bad_request").await;
    assert!(error["message"].as_str().unwrap().contains("invalid JSON"));
    bot.send_raw(b"{\"op\":\"dance\"}\n").await;
    let error = bot.expect_error("bad_request").await;
    assert!(error["message"].as_str().unwrap().contains("unknown op"));
    bot.send_raw(b"{\"op\":\"ack\",\"cursor\":\"x\"}\n").await;
    bot.expect_error("bad_request").await;
    bot.send_raw(b"\xff\xfe\n").await;
    let error = bot.expect_error("bad_request").await;
    assert!(error["message"].as_str().unwrap().contains("UTF-8"));
    let mut long = vec![b'x'; 200 * 1024];
    long.push(b'\n');
    bot.send_raw(&long).await;
    let error = bot.expect_error("bad_request").await;
    assert!(
        error["message"].as_str().unwrap().contains("204800 bytes"),
        "{error}"
    );
    bot.send_raw(b"\n  \n").await;

    bot.send(json!({"op":"status"})).await;
    bot.expect("health").await;
    let cursor = daemon.append("MESSAGE_CREATE");
    assert_eq!(bot.dispatches(1).await, vec![cursor]);
    assert_eq!(other.dispatches(1).await, vec![cursor]);
}

#[tokio::test]
async fn a_bot_that_never_reads_blocks_nobody() {
    let daemon = start(64 << 20).await;
    let mut stuck = daemon.bot().await;
    stuck.hello(json!(["*"]), Value::Null).await;
    let mut reader = daemon.bot().await;
    reader.hello(json!(["*"]), Value::Null).await;

    let d = format!("{{\"pad\":\"{}\"}}", "x".repeat(200));
    let started = std::time::Instant::now();
    for seq in 1..=10_000 {
        daemon
            .hub
            .log
            .append(0, seq, 1, 1, "MESSAGE_CREATE", d.as_bytes());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "appends never wait on bots"
    );
    let got = reader.dispatches(10_000).await;
    assert!(got.iter().copied().eq(1..=10_000));
    // The stuck bot is still connected and can catch up.
    assert_eq!(stuck.dispatches(3).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn shutdown_flushes_and_removes_the_socket() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;
    for _ in 0..50 {
        daemon.append("MESSAGE_CREATE");
    }
    daemon.shutdown.send(true).unwrap();
    tokio::time::timeout(WAIT, daemon.server)
        .await
        .unwrap()
        .unwrap();
    assert!(!daemon.socket.exists());
    assert_eq!(bot.dispatches(50).await, (1..=50).collect::<Vec<_>>());
    assert_eq!(bot.recv().await["op"], "closing");
    assert_eq!(bot.next_line().await, None);
}

#[tokio::test]
async fn closing_is_the_last_line_before_a_shutdown_and_says_why() {
    let daemon = start(1 << 20).await;
    let mut bot = daemon.bot().await;
    bot.hello(json!(["*"]), Value::Null).await;
    daemon.append("MESSAGE_CREATE");
    assert_eq!(bot.dispatches(1).await, vec![1]);
    daemon.hub.set_closing(
        protocol::closing::SHUTDOWN,
        "SIGTERM: sessions saved; reconnect and resume_from your last cursor".to_string(),
    );
    daemon.shutdown.send(true).unwrap();
    let closing = bot.recv().await;
    assert_eq!(closing["op"], "closing", "{closing}");
    assert_eq!(closing["reason"], "shutdown");
    assert!(closing["detail"].as_str().unwrap().starts_with("SIGTERM"));
    assert_eq!(bot.next_line().await, None, "then the socket closes");
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_never_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(cfg.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&cfg.socket).unwrap());
    assert!(cfg.socket.exists(), "a stale socket file is left behind");

    let (hub1, _rx1) = hub(1 << 20);
    let server = BotServer::bind(cfg.clone(), Arc::new(hub1)).await.unwrap();
    let mode = std::fs::metadata(&cfg.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    server.set_socket_mode(0o600).unwrap();
    let mode = std::fs::metadata(&cfg.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (hub2, _rx2) = hub(1 << 20);
    let err = BotServer::bind(cfg.clone(), Arc::new(hub2))
        .await
        .err()
        .expect("a live socket must not be taken over");
    assert_eq!(err.kind(), BotServerErrorKind::InUse);
    assert!(err.to_string().contains("already running"));
    drop(server);

    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let (hub3, _rx3) = hub(1 << 20);
    let err = BotServer::bind(
        BotServerConfig {
            socket: file.clone(),
            ..cfg
        },
        Arc::new(hub3),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.kind(), BotServerErrorKind::NotASocket);
    assert!(file.exists());
}
