//! `shardwarden demo`: the daemon against the embedded simulator, a sample
//! bot on the socket, and a schedule of faults (zombie, op 7, op 9, a
//! resumable close) so a newcomer watches sessions recover while events keep
//! flowing. No token, no network beyond loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::signal::unix::SignalKind;
use tokio::sync::watch;

use crate::config::{Config, Token};
use crate::simulator::{Fault, SimConfig, Simulator, message_create_payload_seeded};
use crate::supervisor::{self, DaemonOptions};

/// The demo's configuration (also shipped as `config/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// Where a demo run keeps its socket and state.
struct RunDir {
    path: PathBuf,
    /// Created for this run (and removed at its end), or given by the user
    /// (left as it is).
    ours: bool,
}

impl RunDir {
    /// `dir` as given, or a new directory of this run's own under the
    /// system's temporary directory: two demos never share a socket or
    /// state, and no demo deletes another's.
    fn new(dir: Option<&Path>) -> Result<RunDir, String> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            return Ok(RunDir {
                path: dir.to_path_buf(),
                ours: false,
            });
        }
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!(
                "shardwarden-demo-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path, ours: true }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
        Err(format!(
            "cannot create a fresh demo directory under {}",
            base.display()
        ))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Run the demo for `seconds` (or until SIGINT or SIGTERM), keeping its
/// socket and state under `dir` (default: a new directory of its own).
/// Ends with an error when its daemon stops by itself.
pub async fn run(seconds: Option<u64>, dir: Option<&Path>) -> Result<(), String> {
    // Before anything else: a SIGTERM while starting must stop the demo
    // cleanly, not kill it with the default action.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let run_dir = RunDir::new(dir)?;
    let mut config = Config::parse(DEMO_CONFIG).map_err(|e| e.to_string())?;
    config.bot.socket = run_dir.path.join("bot.sock");
    config.state.dir = run_dir.path.join("state");
    let token = "demo-token-not-secret-0042".to_string();
    let sim = Simulator::start(SimConfig {
        token: token.clone(),
        shards: 4,
        max_concurrency: 2,
        heartbeat_interval_ms: 3000,
        guilds_per_shard: 2,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("cannot start the simulator: {e}"))?;
    println!(
        "demo: simulator on {} (gateway {}), daemon socket {}",
        sim.api_base(),
        sim.gateway_url(),
        config.bot.socket.display()
    );
    // Held for the whole run: the demo that holds it owns the documented
    // front-door port; demos started meanwhile take a free one instead of
    // racing for it.
    let mut _port_claim = None;
    if let Some(proxy) = &mut config.proxy {
        _port_claim = claim_front_door_port();
        if (_port_claim.is_none() || std::net::TcpListener::bind(proxy.listen).is_err())
            && let Ok(free) = std::net::TcpListener::bind("127.0.0.1:0")
            && let Ok(addr) = free.local_addr()
        {
            proxy.listen = addr;
        }
        println!(
            "demo: drop-in front door on ws://{0} (REST http://{0}/api/v10): point a discord.py or discord.js bot at it with shard_count 4 and the demo token from config/demo.toml (README: Drop-in mode)",
            proxy.listen
        );
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let socket = config.bot.socket.clone();
    let mut daemon = tokio::spawn(supervisor::run(
        config,
        DaemonOptions {
            token: Some(Token::new(token)),
            api_base: Some(sim.api_base()),
            shutdown: Some(stop_rx.clone()),
            backoff_min: Some(Duration::from_millis(200)),
            ..DaemonOptions::default()
        },
    ));
    tokio::spawn(sample_bot(socket, stop_rx.clone()));
    tokio::spawn(traffic(sim.clone(), stop_rx.clone()));
    tokio::spawn(faults(sim.clone(), stop_rx));

    let run_for = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                println!("demo: press Ctrl-C (or send SIGTERM) to stop");
                std::future::pending().await
            }
        }
    };
    let why = tokio::select! {
        // Signals first: the daemon sees them too and stops on its own.
        biased;
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        () = run_for => "time is up",
        ended = &mut daemon => {
            // The daemon stopped although nobody asked: the demo cannot go on.
            let _ = stop_tx.send(true);
            return Err(match ended {
                Ok(Err(e)) => format!("the demo's daemon failed: {e}"),
                Ok(Ok(())) => "the demo's daemon stopped unexpectedly".to_string(),
                Err(e) => format!("the demo's daemon task failed: {e}"),
            });
        }
    };
    println!("demo: stopping ({why})");
    let _ = stop_tx.send(true);
    match daemon.await {
        Ok(Ok(())) => {
            println!("demo: daemon stopped cleanly");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("the demo's daemon failed: {e}")),
        Err(e) => Err(format!("the demo's daemon task failed: {e}")),
    }
}

fn signal(kind: SignalKind) -> Result<tokio::signal::unix::Signal, String> {
    tokio::signal::unix::signal(kind).map_err(|e| format!("cannot handle signals: {e}"))
}

/// A few MESSAGE_CREATEs per second across the shards.
async fn traffic(sim: Simulator, mut stop: watch::Receiver<bool>) {
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
        n += 1;
        let d: Value =
            serde_json::from_str(&message_create_payload_seeded(n, 600)).unwrap_or(Value::Null);
        sim.dispatch((n % 4) as u32, "MESSAGE_CREATE", d);
    }
}

/// The fault schedule.
async fn faults(sim: Simulator, mut stop: watch::Receiver<bool>) {
    let schedule: [(u64, u32, Fault, &str); 5] = [
        (
            6,
            1,
            Fault::StopAcking,
            "shard 1 stops getting heartbeat ACKs (zombie)",
        ),
        (
            14,
            2,
            Fault::Reconnect,
            "Discord asks shard 2 to reconnect (op 7)",
        ),
        (
            20,
            3,
            Fault::InvalidSession { resumable: true },
            "Discord invalidates shard 3's session, resumable (op 9 true)",
        ),
        (
            26,
            0,
            Fault::Close(4000),
            "Discord closes shard 0 with 4000 (resumable)",
        ),
        (
            32,
            3,
            Fault::InvalidSession { resumable: false },
            "Discord invalidates shard 3's session for good (op 9 false): it must identify",
        ),
    ];
    let start = tokio::time::Instant::now();
    for (at, shard, fault, what) in schedule {
        tokio::select! {
            _ = tokio::time::sleep_until(start + Duration::from_secs(at)) => {}
            _ = stop.changed() => return,
        }
        println!("demo: >>> {what}");
        sim.inject(shard, fault);
    }
}

/// A bot like `examples/python/bot.py`: replays from cursor 0, prints.
async fn sample_bot(socket: std::path::PathBuf, mut stop: watch::Receiver<bool>) {
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&socket).await {
            break s;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    };
    let (read, mut write) = stream.into_split();
    let hello = b"{\"op\":\"hello\",\"v\":1,\"client\":\"demo-bot\",\"events\":[\"*\"],\"diagnostics\":true,\"resume_from\":0}\n";
    if write.write_all(hello).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    let mut received = 0u64;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            _ = stop.changed() => return,
        };
        let Ok(Some(line)) = line else {
            println!("demo-bot: daemon closed the socket");
            return;
        };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match msg["op"].as_str() {
            Some("dispatch") => {
                received += 1;
                if msg["t"] != "MESSAGE_CREATE" || received.is_multiple_of(20) {
                    println!(
                        "demo-bot: cursor {} shard {} seq {} {} ({} events so far)",
                        msg["cursor"],
                        msg["shard"],
                        msg["seq"],
                        msg["t"].as_str().unwrap_or("?"),
                        received
                    );
                }
                if received.is_multiple_of(50) {
                    let ack = format!("{{\"op\":\"ack\",\"cursor\":{}}}\n", msg["cursor"]);
                    let _ = write.write_all(ack.as_bytes()).await;
                }
            }
            Some("session") => println!(
                "demo-bot: session shard {} {}{}{}",
                msg["shard"],
                msg["event"].as_str().unwrap_or("?"),
                msg["class"]
                    .as_str()
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default(),
                msg["detail"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ),
            Some("health") => {
                let shards = msg["shards"].as_array().map(|s| {
                    s.iter()
                        .map(|s| format!("{}:{}", s["shard"], s["state"].as_str().unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(" ")
                });
                println!("demo-bot: health {}", shards.unwrap_or_default());
            }
            Some(other) => println!("demo-bot: {other}: {line}"),
            None => {}
        }
    }
}

/// An exclusive lock (released when the process ends) on the documented
/// front-door port, so two demos started together never both try it.
fn claim_front_door_port() -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::create(std::env::temp_dir().join("shardwarden-demo-front-door.lock"))
        .ok()?;
    // SAFETY: flock(2) on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}
