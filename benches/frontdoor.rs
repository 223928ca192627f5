//! Issue 10's measurements of the drop-in front door: the release
//! `shardwarden` binary as a child process (its CPU is its own), the
//! simulator and the clients in this process.
//!
//! `cargo bench --bench frontdoor -- [fanout] [burst]`
//!
//! - **fanout**: `Fault::Burst` of ~1 KB MESSAGE_CREATEs on one shard, read
//!   by one NDJSON socket bot alone, then with 1 and with 4 drop-in clients
//!   beside it (compress none); the daemon's CPU per event in each case and
//!   the extra CPU per event per drop-in client.
//! - **burst**: one shard holding 1,000 guilds; time from a drop-in
//!   client's IDENTIFY to its last GUILD_CREATE.
//!
//! `BENCH_FRONTDOOR` scales the fan-out (default 20000 events per run).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use shardwarden::simulator::{Fault, Simulator};
use tokio_tungstenite::tungstenite::Message;

use common::daemon::{Bot, Daemon, TOKEN, contains, free_port, simulator};
use common::{EVENT_SIZE, env_count, proc_cpu_us, result};

fn main() {
    let want = common::wanted_parts();
    let rt = common::runtime();
    rt.block_on(async {
        if want("fanout") {
            let n = env_count("BENCH_FRONTDOOR", 20_000) as u32;
            let base = fanout(0, n).await;
            for clients in [1usize, 4] {
                let cpu = fanout(clients, n).await;
                result(
                    &format!("frontdoor_{clients}_client_extra_cpu_us"),
                    (cpu - base) / clients as f64,
                    "us",
                    &format!("fanout: extra daemon CPU per event per drop-in client ({clients})"),
                );
            }
        }
        if want("burst") {
            burst(1000).await;
        }
    });
}

fn start(sim: &Simulator) -> (Daemon, SocketAddr) {
    let port = free_port();
    let daemon = Daemon::start_full(
        sim,
        "256MiB",
        "zlib-stream",
        r#"["*"]"#,
        &format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    (daemon, format!("127.0.0.1:{port}").parse().expect("addr"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A drop-in client that identified and read its READY burst.
async fn client(addr: SocketAddr) -> Ws {
    let url = format!("ws://{addr}/?v=10&encoding=json");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ws = loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => break ws,
            Err(e) if Instant::now() > deadline => panic!("front door: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    ws.next().await.expect("hello").expect("hello");
    let identify = format!(
        r#"{{"op":2,"d":{{"token":"{TOKEN}","intents":513,"shard":[0,1],"properties":{{"os":"linux","browser":"bench","device":"bench"}}}}}}"#
    );
    ws.send(Message::text(identify)).await.expect("identify");
    loop {
        let m = ws.next().await.expect("open").expect("frame");
        if let Message::Text(t) = m
            && contains(t.as_bytes(), b"\"t\":\"GUILD_CREATE\"")
        {
            break;
        }
    }
    ws
}

/// Read until `n` MESSAGE_CREATEs, heartbeating on the way.
async fn count(mut ws: Ws, n: usize) {
    let mut seen = 0;
    let mut beat = Instant::now();
    while seen < n {
        let m = ws.next().await.expect("open").expect("frame");
        if let Message::Text(t) = m {
            let head = &t.as_bytes()[..t.len().min(40)];
            seen += usize::from(contains(head, b"MESSAGE_CREATE"));
        }
        if beat.elapsed() > Duration::from_secs(20) {
            ws.send(Message::text(r#"{"op":1,"d":null}"#))
                .await
                .expect("heartbeat");
            beat = Instant::now();
        }
    }
}

/// Daemon CPU (µs) per event with `clients` drop-in clients beside one
/// socket bot.
async fn fanout(clients: usize, n: u32) -> f64 {
    let sim = simulator(1, |_| {}).await;
    let (daemon, addr) = start(&sim);
    let socket = daemon.socket.clone();
    let bot = tokio::task::spawn_blocking(move || Bot::connect(&socket, "null"))
        .await
        .expect("bot");
    let mut drop_ins = Vec::new();
    for _ in 0..clients {
        drop_ins.push(client(addr).await);
    }
    if clients == 0 {
        // Without a client the shard's READY may still be on its way.
        let probe = client(addr).await;
        drop(probe);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = daemon.pid();
    let cpu0 = proc_cpu_us(pid);
    let t0 = Instant::now();
    assert!(sim.inject(
        0,
        Fault::Burst {
            count: n,
            size: EVENT_SIZE
        }
    ));
    let readers: Vec<_> = drop_ins
        .into_iter()
        .map(|ws| tokio::spawn(count(ws, n as usize)))
        .collect();
    let mut bot = bot;
    let bot_task = tokio::task::spawn_blocking(move || {
        bot.count("MESSAGE_CREATE", n as usize);
    });
    for r in readers {
        r.await.expect("client");
    }
    bot_task.await.expect("bot");
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (proc_cpu_us(pid) - cpu0) / f64::from(n);
    result(
        &format!("frontdoor_fanout_{clients}_cpu_us"),
        cpu,
        "us",
        &format!("fanout: daemon CPU per event, socket bot + {clients} drop-in client(s)"),
    );
    result(
        &format!("frontdoor_fanout_{clients}_eps"),
        f64::from(n) / wall,
        "ev/s",
        &format!("fanout: events/s, socket bot + {clients} drop-in client(s)"),
    );
    cpu
}

/// IDENTIFY → last GUILD_CREATE for a shard holding `guilds` guilds.
async fn burst(guilds: u32) {
    let sim = simulator(1, |c| c.guilds_per_shard = guilds).await;
    let (daemon, addr) = start(&sim);
    // Let the shard's READY and every GUILD_CREATE reach the cache.
    let first = client(addr).await;
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let url = format!("ws://{addr}/?v=10&encoding=json");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connect");
    ws.next().await.expect("hello").expect("hello");
    let identify = format!(
        r#"{{"op":2,"d":{{"token":"{TOKEN}","intents":513,"shard":[0,1],"properties":{{"os":"linux","browser":"bench","device":"bench"}}}}}}"#
    );
    let t0 = Instant::now();
    ws.send(Message::text(identify)).await.expect("identify");
    let mut creates = 0;
    let mut bytes = 0usize;
    while creates < guilds {
        let m = ws.next().await.expect("open").expect("frame");
        if let Message::Text(t) = m {
            bytes += t.len();
            creates += u32::from(contains(&t.as_bytes()[..t.len().min(40)], b"GUILD_CREATE"));
        }
    }
    let took = t0.elapsed();
    result(
        "frontdoor_identify_to_last_guild_create_ms",
        took.as_secs_f64() * 1000.0,
        "ms",
        &format!(
            "burst: IDENTIFY to the last of {guilds} GUILD_CREATEs ({} KiB)",
            bytes / 1024
        ),
    );
    drop(daemon);
}
