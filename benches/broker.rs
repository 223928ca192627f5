//! The JetStream sink beside the Unix socket, in one run: the release daemon
//! (child process) against the in-process simulator and a real
//! `nats-server -js` (Debian's package) on loopback.
//!
//! One shard, a `Fault::Burst` of ~1 KB MESSAGE_CREATEs (`BENCH_BROKER`,
//! default 50k), twice: first with the socket bot only, then with `[broker]`
//! too. Reported: events/s at the bot, events/s until JetStream had stored
//! all of them (the stream's message count), and the daemon's CPU per event
//! in each run; the difference is what publishing costs.
//!
//! `cargo bench --bench broker`

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardwarden::simulator::Fault;

use common::daemon::{Bot, Daemon, simulator};
use common::{EVENT_SIZE, env_count, proc_cpu_us, result};

/// The server and its store (removed when dropped).
struct NatsServer(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats_server(port: u16) -> Option<NatsServer> {
    let store = tempfile::tempdir().ok()?;
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-sd")
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(NatsServer(child, store));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

fn main() {
    let rt = common::runtime();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let Some(_nats) = nats_server(port) else {
        eprintln!("SKIPPED: nats-server not installed (apt-get install nats-server)");
        return;
    };
    let n = env_count("BENCH_BROKER", 50_000) as u32;
    rt.block_on(async {
        let socket_only = run(n, None).await;
        let with_broker = run(n, Some(port)).await;
        result(
            "broker_socket_only_cpu_us",
            socket_only.cpu_us,
            "us",
            "daemon CPU per event, Unix socket only",
        );
        result(
            "broker_with_jetstream_cpu_us",
            with_broker.cpu_us,
            "us",
            "daemon CPU per event, Unix socket + JetStream",
        );
        result(
            "broker_publish_cpu_us",
            with_broker.cpu_us - socket_only.cpu_us,
            "us",
            "of which publishing to JetStream",
        );
        result(
            "broker_socket_eps",
            with_broker.socket_eps,
            "ev/s",
            "events/s at the socket bot (with JetStream on)",
        );
        if let Some(eps) = with_broker.stored_eps {
            result(
                "broker_jetstream_eps",
                eps,
                "ev/s",
                "events/s until JetStream stored every event",
            );
        }
    });
}

struct Run {
    cpu_us: f64,
    socket_eps: f64,
    stored_eps: Option<f64>,
}

async fn run(n: u32, nats_port: Option<u16>) -> Run {
    let stream = format!("bench{}", nats_port.unwrap_or(0));
    let extra = nats_port.map_or(String::new(), |port| {
        format!("[broker]\nnats = \"nats://127.0.0.1:{port}\"\nstream = \"{stream}\"\n")
    });
    let sim = simulator(1, |_| {}).await;
    let daemon = Daemon::start_full(
        &sim,
        "256MiB",
        "zlib-stream",
        r#"["READY", "GUILD_CREATE", "MESSAGE_CREATE"]"#,
        &extra,
    );
    let socket = daemon.socket.clone();
    let bot = tokio::task::spawn_blocking(move || Bot::connect(&socket, "null"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let js = match nats_port {
        Some(port) => {
            let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
                .await
                .expect("nats");
            Some(async_nats::jetstream::new(client))
        }
        None => None,
    };
    let pid = daemon.pid();
    let cpu0 = proc_cpu_us(pid);
    let t0 = Instant::now();
    assert!(sim.inject(
        0,
        Fault::Burst {
            count: n,
            size: EVENT_SIZE,
        }
    ));
    let mut bot = bot.await.expect("bot");
    let socket_done = tokio::task::spawn_blocking(move || {
        bot.count("MESSAGE_CREATE", n as usize);
        Instant::now()
    })
    .await
    .expect("bot thread");
    let mut stored_at = None;
    if let Some(js) = &js {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let stored = match js.get_stream(&stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            };
            if stored >= u64::from(n) {
                stored_at = Some(Instant::now());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let end = stored_at.unwrap_or(socket_done).max(socket_done);
    let cpu = proc_cpu_us(pid) - cpu0;
    let n = f64::from(n);
    Run {
        cpu_us: cpu / n,
        socket_eps: n / socket_done.duration_since(t0).as_secs_f64(),
        stored_eps: stored_at.map(|_| n / end.duration_since(t0).as_secs_f64()),
    }
}
