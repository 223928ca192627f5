//! Failover time through Redis (DESIGN §4): 64 shards over two release
//! daemons with `range = "auto"` and `lease_ttl = "3s"` against the in-process
//! simulator and a real `redis-server` (Debian's package) on loopback. One
//! daemon is killed with SIGKILL; reported is the time from the kill until
//! every shard it held is RESUMEd by the other (and that none identified).
//!
//! `cargo bench --bench failover` (`BENCH_FAILOVER_SHARDS`, default 64)

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardwarden::simulator::{SimConfig, Simulator};

use common::daemon::free_port;
use common::{env_count, result};

const TOKEN: &str = "bench-token-0000";
const BIN: &str = env!("CARGO_BIN_EXE_shardwarden");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis(port: u16) -> Option<Proc> {
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
        ])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(Proc(child));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

fn daemon(sim: &Simulator, redis_port: u16, name: &str, dir: &std::path::Path) -> Proc {
    let config = format!(
        r#"
[discord]
token_env = "SW_BENCH_TOKEN"
api_base = "{api}"
intents = ["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT"]
events = ["READY", "GUILD_CREATE", "MESSAGE_CREATE"]

[shards]
total = {shards}
range = "auto"

[bot]
socket = "{dir}/bot.sock"
replay_buffer = "4MiB"

[health]
log_interval = "60s"

[state]
dir = "{dir}/state"

[cluster]
redis = "redis://127.0.0.1:{redis_port}/0"
name = "{name}"
lease_ttl = "3s"
"#,
        api = sim.api_base(),
        shards = sim.config().shards,
        dir = dir.display(),
    );
    let path = dir.join("shardwarden.toml");
    std::fs::write(&path, config).expect("config");
    let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
    Proc(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env("SW_BENCH_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon"),
    )
}

/// Shards with a live resumed or identified connection, by whether resumed.
fn live(sim: &Simulator) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut any = BTreeSet::new();
    let mut resumed = BTreeSet::new();
    for c in sim.connections() {
        if let (Some(shard), false) = (c.shard, c.closed) {
            any.insert(shard);
            if c.resumed {
                resumed.insert(shard);
            }
        }
    }
    (any, resumed)
}

fn main() {
    let port = free_port();
    let Some(_redis) = redis(port) else {
        eprintln!("SKIPPED: redis-server not installed (apt-get install redis-server)");
        return;
    };
    let shards = env_count("BENCH_FAILOVER_SHARDS", 64) as u32;
    let rt = common::runtime();
    rt.block_on(async {
        let sim = Simulator::start(SimConfig {
            token: TOKEN.to_string(),
            shards,
            max_concurrency: shards,
            session_start_total: 100_000,
            session_start_remaining: 100_000,
            guilds_per_shard: 1,
            heartbeat_interval_ms: 1000,
            ..SimConfig::default()
        })
        .await
        .expect("simulator");
        let (a_dir, b_dir) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let mut a = daemon(&sim, port, "a", a_dir.path());
        let _b = daemon(&sim, port, "b", b_dir.path());
        let all_up = sim
            .wait_until(
                |s| live(s).0.len() == shards as usize,
                Duration::from_secs(120),
            )
            .await;
        assert!(all_up, "every shard connected");
        // Let both daemons settle their leases and sessions.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let identifies = sim.frames().iter().filter(|f| f.op == 2).count();
        let killed_at = Instant::now();
        let _ = a.0.kill();
        let _ = a.0.wait();
        // The simulator sees the killed daemon's connections end, then the
        // survivor's RESUMEs bring every shard back.
        let gone = sim
            .wait_until(
                |s| live(s).0.len() < shards as usize,
                Duration::from_secs(10),
            )
            .await;
        assert!(gone, "the killed daemon's shards dropped");
        let back = sim
            .wait_until(
                |s| live(s).0.len() == shards as usize,
                Duration::from_secs(60),
            )
            .await;
        let took = killed_at.elapsed();
        let (_, resumed) = live(&sim);
        let new_identifies = sim.frames().iter().filter(|f| f.op == 2).count() - identifies;
        assert!(back, "every shard live again");
        result(
            "failover_seconds",
            took.as_secs_f64(),
            "s",
            &format!(
                "kill -9 to every shard live again, {shards} shards over 2 daemons, lease_ttl 3 s"
            ),
        );
        result(
            "failover_resumed_shards",
            resumed.len() as f64,
            "shards",
            "shards taken over by RESUME",
        );
        result(
            "failover_identifies",
            new_identifies as f64,
            "identifies",
            "IDENTIFYs spent by the failover (0 expected)",
        );
    });
}
