//! Benchmarks 3, 5, 6, 7 and 8 of issue 5: the release `shardwarden` binary
//! as a child process (so its CPU and memory are its own), the embedded
//! simulator in this process, and a bot on the daemon's Unix socket.
//!
//! `cargo bench --bench e2e -- [blast] [replay] [memory] [latency] [startup]`
//! runs the named parts (all when none is named; `replay` needs `blast`).
//!
//! - **blast**: `Fault::Burst` of ~1 KB MESSAGE_CREATEs, 1 shard × 100k and
//!   16 shards × 10k, zlib-stream; events/s at the bot, the daemon's CPU
//!   (utime + stime from /proc/PID/stat) per event, its read/write system
//!   calls per event and its peak RSS (VmHWM).
//! - **replay**: after the 1-shard blast, a second bot connects with
//!   `resume_from` 100k events back; events/s of the catch-up.
//! - **memory**: idle VmRSS of daemons holding 1, 100, 1000 and 2500 shards
//!   (connected and heartbeating, 1 MiB replay ring); per shard above the
//!   1-shard daemon.
//! - **latency**: MESSAGE_CREATEs at 10k/s, each carrying `d.ts_ns`
//!   (CLOCK_MONOTONIC when it was handed to the simulator); p50/p99 of
//!   arrival at the bot, and the same stream read straight off the
//!   simulator by a minimal client (the part the daemon did not add).
//! - **startup**: 8 shards, max_concurrency 2, the simulator enforcing the
//!   5 s identify window: time until every shard is READY against
//!   `ceil(N/C) × 5 s`.
//!
//! `BENCH_BLAST` scales the blast (default 100000 events per scenario);
//! `BENCH_PERF=DIR` records a perf profile of the daemon during each blast.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use shardwarden::compression::{Compression, Inflater};
use shardwarden::simulator::{Fault, Simulator, message_create_payload_seeded};
use tokio_tungstenite::tungstenite::Message;

use common::daemon::{Bot, Daemon, TOKEN, contains, number_after, simulator};
use common::{
    EVENT_SIZE, env_count, mono_ns, percentile, proc_cpu_us, proc_status_kib, process_cpu_ns,
    result,
};

fn main() {
    let want = common::wanted_parts();
    let rt = common::runtime();
    rt.block_on(async {
        let total = env_count("BENCH_BLAST", 100_000) as u32;
        if want("blast") || want("replay") {
            let one = blast("1x", 1, total, "256MiB").await;
            if want("replay") {
                replay(&one, total.min(100_000) as u64).await;
            }
            drop(one);
            if want("blast") {
                drop(blast("16x", 16, total / 16, "16MiB").await);
            }
        }
        if want("latency") {
            latency(10_000, 3).await;
        }
        if want("memory") {
            memory(&[1, 100, 1000, 2500]).await;
        }
        if want("startup") {
            startup(8, 2).await;
        }
    });
}

/// A daemon after a blast, kept for the replay.
struct Blasted {
    _sim: Simulator,
    daemon: Daemon,
    _bot: Bot,
    head: u64,
}

/// Run blocking bot work on a thread of its own.
async fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("bot thread")
}

/// Start the simulator and daemon for `shards` shards and a live bot, and
/// wait until every READY and GUILD_CREATE reached the bot.
async fn setup(shards: u32, ring: &str) -> (Simulator, Daemon, Bot) {
    let sim = simulator(shards, |_| {}).await;
    let daemon = Daemon::start(&sim, ring);
    let socket = daemon.socket.clone();
    let bot = on_thread(move || {
        let mut bot = Bot::connect(&socket, "0");
        // READY + one GUILD_CREATE per shard.
        let mut n = 0;
        bot.lines(|line, _| {
            n += usize::from(contains(line, b"\"op\":\"dispatch\""));
            n < 2 * shards as usize
        });
        bot
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (sim, daemon, bot)
}

async fn blast(label: &str, shards: u32, per_shard: u32, ring: &str) -> Blasted {
    let total = shards as usize * per_shard as usize;
    eprintln!("e2e blast {label}: {shards} shard(s) x {per_shard} events, ring {ring}");
    let (sim, daemon, bot) = setup(shards, ring).await;
    let pid = daemon.pid();
    // BENCH_PERF=DIR: sample the daemon during the blast with perf
    // (cpu-clock, call graphs) into DIR/perf-LABEL.data.
    let perf = std::env::var("BENCH_PERF").ok().map(|dir| {
        let child = std::process::Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "4000", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(format!("{dir}/perf-{label}.data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf record");
        std::thread::sleep(Duration::from_millis(500));
        child
    });
    let cpu0 = proc_cpu_us(pid);
    let reads0 = bot.reads;
    let own0 = process_cpu_ns();
    let t0 = Instant::now();
    for shard in 0..shards {
        assert!(
            sim.inject(
                shard,
                Fault::Burst {
                    count: per_shard,
                    size: EVENT_SIZE,
                },
            ),
            "shard {shard} has no live connection"
        );
    }
    let (bot, head) = on_thread(move || {
        let mut bot = bot;
        let head = bot.count("MESSAGE_CREATE", total);
        (bot, head)
    })
    .await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_us(pid) - cpu0;
    let reads = bot.reads - reads0;
    if let Some(mut perf) = perf {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let _ = perf.wait();
    }
    let own = (process_cpu_ns() - own0) as f64 / 1000.0;
    let n = total as f64;
    result(
        &format!("e2e_{label}_eps"),
        n / wall,
        "ev/s",
        &format!("e2e {label}: events/s at the bot"),
    );
    result(
        &format!("e2e_{label}_cpu_us"),
        cpu / n,
        "us",
        &format!("e2e {label}: daemon CPU per event"),
    );
    result(
        &format!("e2e_{label}_daemon_cores"),
        cpu / 1e6 / wall,
        "cores",
        &format!("e2e {label}: daemon CPU / wall time"),
    );
    result(
        &format!("e2e_{label}_sim_cpu_us"),
        own / n,
        "us",
        &format!("e2e {label}: simulator + bot process CPU per event"),
    );
    result(
        &format!("e2e_{label}_events_per_read"),
        n / reads.max(1) as f64,
        "ev",
        &format!("e2e {label}: events per bot read (daemon batching)"),
    );
    if bot.missed > 0 {
        result(
            &format!("e2e_{label}_missed"),
            bot.missed as f64,
            "ev",
            &format!("e2e {label}: events the bot lost to gaps (fell out of the ring)"),
        );
    }
    result(
        &format!("e2e_{label}_peak_rss_mib"),
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0,
        "MiB",
        &format!("e2e {label}: daemon peak RSS (ring {ring})"),
    );
    Blasted {
        _sim: sim,
        daemon,
        _bot: bot,
        head,
    }
}

async fn replay(after: &Blasted, back: u64) {
    eprintln!("e2e replay: a bot resuming {back} events back");
    let pid = after.daemon.pid();
    let cpu0 = proc_cpu_us(pid);
    let t0 = Instant::now();
    let from = after.head - back;
    let socket = after.daemon.socket.clone();
    let last = on_thread(move || {
        let mut bot = Bot::connect(&socket, &from.to_string());
        let mut n = 0u64;
        let mut last = 0;
        bot.lines(|line, _| {
            if contains(&line[..line.len().min(64)], b"\"op\":\"dispatch\"") {
                n += 1;
                last = common::daemon::cursor_of(line);
            }
            n < back
        });
        last
    })
    .await;
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(last, after.head, "replay ends at the head");
    result(
        "replay_eps",
        back as f64 / wall,
        "ev/s",
        "replay: catch-up events/s (resume_from 100k back)",
    );
    result(
        "replay_cpu_us",
        (proc_cpu_us(pid) - cpu0) / back as f64,
        "us",
        "replay: daemon CPU per replayed event",
    );
}

async fn memory(counts: &[u32]) {
    let mut base_kib = 0u64;
    for &n in counts {
        eprintln!("memory: {n} shards");
        let sim = simulator(n, |c| c.heartbeat_interval_ms = 2_000).await;
        let daemon = Daemon::start(&sim, "1MiB");
        let t0 = Instant::now();
        let all = sim
            .wait_until(
                |s| {
                    let sessions = s.sessions();
                    sessions.len() == n as usize
                        && sessions.iter().all(|x| x.attached.is_some() && !x.invalid)
                },
                Duration::from_secs(120),
            )
            .await;
        assert!(all, "{n} shards did not all start:\n{}", daemon.log_text());
        let started = t0.elapsed().as_secs_f64();
        // Two heartbeat intervals: every shard has heartbeated and settled.
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        let beating = sim
            .connections()
            .iter()
            .filter(|c| !c.closed && c.last_heartbeat.is_some())
            .count();
        assert!(beating >= n as usize, "only {beating} of {n} heartbeating");
        let rss = proc_status_kib(daemon.pid(), "VmRSS:");
        result(
            &format!("mem_rss_{n}_mib"),
            rss as f64 / 1024.0,
            "MiB",
            &format!("memory: idle daemon RSS, {n} shards (all READY in {started:.1} s)"),
        );
        if n == 1 {
            base_kib = rss;
        } else {
            result(
                &format!("mem_per_shard_{n}_kib"),
                (rss.saturating_sub(base_kib)) as f64 / f64::from(n - 1),
                "KiB",
                &format!("memory: per shard above the 1-shard daemon, {n} shards"),
            );
        }
        drop(daemon);
        sim.shutdown();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// MESSAGE_CREATE `d` objects, parsed once, to be stamped and dispatched.
fn stamped_pool() -> Vec<Value> {
    (0..64)
        .map(|i| {
            serde_json::from_str(&message_create_payload_seeded(0x1a7e_0000 + i, EVENT_SIZE))
                .expect("payload json")
        })
        .collect()
}

/// Dispatch `n` stamped events at `rate`/s from a dedicated thread, evenly
/// spaced (timer slack 1 ns so sleeps end on time).
fn paced_dispatch(sim: Simulator, rate: u64, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // SAFETY: prctl on the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let pool = stamped_pool();
        let period = Duration::from_nanos(1_000_000_000 / rate);
        let start = Instant::now() + Duration::from_millis(20);
        for i in 0..n {
            let mut d = pool[i % pool.len()].clone();
            let due = start + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            d["ts_ns"] = Value::from(mono_ns());
            sim.dispatch(0, "MESSAGE_CREATE", d);
        }
    })
}

fn report_latency(key: &str, what: &str, lat: &mut [u64]) -> (u64, u64) {
    lat.sort_unstable();
    let p50 = percentile(lat, 50.0);
    let p99 = percentile(lat, 99.0);
    result(
        &format!("{key}_p50_us"),
        p50 as f64 / 1000.0,
        "us",
        &format!("{what} p50"),
    );
    result(
        &format!("{key}_p99_us"),
        p99 as f64 / 1000.0,
        "us",
        &format!("{what} p99"),
    );
    (p50, p99)
}

/// The daemon and a minimal direct client hold one session each for shard
/// 0, so every stamped dispatch reaches both; matching them by `ts_ns`
/// gives, per event, how much later the bot got it than a client reading
/// the simulator itself (scheduling noise on the simulator's side cancels).
async fn latency(rate: u64, seconds: u64) {
    let n = (rate * seconds) as usize;
    let skip = n / 10;
    eprintln!("latency: {n} events at {rate}/s to the daemon and to a direct client at once");
    let sim = simulator(1, |c| c.enforce_identify_concurrency = false).await;
    let daemon = Daemon::start(&sim, "16MiB");
    let socket = daemon.socket.clone();
    let bot = on_thread(move || {
        let mut bot = Bot::connect(&socket, "0");
        let mut n = 0;
        bot.lines(|line, _| {
            n += usize::from(contains(line, b"\"op\":\"dispatch\""));
            n < 2
        });
        bot
    })
    .await;
    let url = format!(
        "{}/?v=10&encoding=json&compress=zlib-stream",
        sim.gateway_url()
    );
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    // On a thread and runtime of its own, like the daemon's reader.
    let direct = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        rt.block_on(direct_client(url, n, up_tx))
    });
    up_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("direct client identified");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sender = paced_dispatch(sim.clone(), rate, n);
    let via_daemon = on_thread(move || {
        let mut bot = bot;
        let mut got = Vec::with_capacity(n);
        bot.lines(|line, at| {
            if contains(&line[..line.len().min(96)], b"\"t\":\"MESSAGE_CREATE\"") {
                got.push((number_after(line, b"\"ts_ns\":"), at));
            }
            got.len() < n
        });
        got
    })
    .await;
    let direct = direct.join().expect("direct client");
    sender.join().expect("dispatcher");
    drop(daemon);
    let first: std::collections::HashMap<u64, u64> = direct.iter().copied().collect();
    let mut total: Vec<u64> = via_daemon
        .iter()
        .skip(skip)
        .map(|&(ts, at)| at - ts)
        .collect();
    let mut straight: Vec<u64> = direct.iter().skip(skip).map(|&(ts, at)| at - ts).collect();
    // Signed: under load the direct client is sometimes the later one.
    let mut added: Vec<i64> = via_daemon
        .iter()
        .skip(skip)
        .filter_map(|(ts, at)| first.get(ts).map(|d| *at as i64 - *d as i64))
        .collect();
    report_latency(
        "lat_daemon",
        "latency simulator -> bot via daemon",
        &mut total,
    );
    report_latency(
        "lat_direct",
        "latency simulator -> direct client",
        &mut straight,
    );
    added.sort_unstable();
    let pick = |p: f64| added[((added.len() - 1) as f64 * p / 100.0).round() as usize] as f64;
    if !added.is_empty() {
        result(
            "lat_added_p50_us",
            pick(50.0) / 1000.0,
            "us",
            "latency added by the daemon (per event) p50",
        );
        result(
            "lat_added_p99_us",
            pick(99.0) / 1000.0,
            "us",
            "latency added by the daemon (per event) p99",
        );
    }
}

/// A minimal zlib-stream gateway client for shard 0: IDENTIFY, say when the
/// session is up, then inflate each frame and keep `(d.ts_ns, arrival)` of
/// each MESSAGE_CREATE.
async fn direct_client(url: String, n: usize, up: std::sync::mpsc::Sender<()>) -> Vec<(u64, u64)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect to the simulator");
    let identify = format!(
        "{{\"op\":2,\"d\":{{\"token\":\"{TOKEN}\",\"intents\":33281,\"shard\":[0,1],\"properties\":{{\"os\":\"linux\",\"browser\":\"bench\",\"device\":\"bench\"}}}}}}"
    );
    ws.send(Message::text(identify)).await.expect("identify");
    let mut inflater = Inflater::new(Compression::ZlibStream).expect("inflater");
    let mut buf = Vec::new();
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let msg = ws.next().await.expect("open").expect("frame");
        let at = mono_ns();
        let Message::Binary(frame) = msg else {
            continue;
        };
        if !inflater.push(&frame, &mut buf).expect("inflate") {
            continue;
        }
        let head = &buf[..buf.len().min(48)];
        if contains(head, b"\"t\":\"GUILD_CREATE\"") {
            let _ = up.send(());
        } else if contains(head, b"\"t\":\"MESSAGE_CREATE\"") {
            got.push((number_after(&buf, b"\"ts_ns\":"), at));
        }
    }
    got
}

async fn startup(shards: u32, concurrency: u32) {
    eprintln!("startup: {shards} shards, max_concurrency {concurrency}");
    let sim = simulator(shards, |c| {
        c.max_concurrency = concurrency;
        c.enforce_identify_concurrency = true;
    })
    .await;
    let t0 = Instant::now();
    let daemon = Daemon::start(&sim, "16MiB");
    let socket = daemon.socket.clone();
    on_thread(move || {
        let mut bot = Bot::connect(&socket, "0");
        let mut ready = 0;
        bot.lines(|line, _| {
            ready += usize::from(contains(&line[..line.len().min(96)], b"\"t\":\"READY\""));
            ready < shards as usize
        });
    })
    .await;
    let all_ready = t0.elapsed().as_secs_f64();
    let identifies: Vec<Instant> = sim
        .frames()
        .iter()
        .filter(|f| f.op == 2)
        .map(|f| f.at)
        .collect();
    let rounds = shards.div_ceil(concurrency);
    let limit = f64::from(rounds) * 5.0;
    let floor = f64::from(rounds - 1) * 5.0;
    let span = match (identifies.iter().min(), identifies.iter().max()) {
        (Some(a), Some(b)) => b.duration_since(*a).as_secs_f64(),
        _ => 0.0,
    };
    let rejected = sim
        .connections()
        .iter()
        .filter(|c| c.close_code_sent.is_some())
        .count();
    result(
        "startup_s",
        all_ready,
        "s",
        &format!("startup: all {shards} READY at the bot (limit {limit:.0} s)"),
    );
    result(
        "startup_ratio",
        all_ready / limit,
        "x",
        "startup: ratio to ceil(N/C) x 5 s",
    );
    result(
        "startup_identify_span_s",
        span,
        "s",
        &format!("startup: first to last IDENTIFY (floor {floor:.0} s)"),
    );
    result(
        "startup_overhead_ms",
        (all_ready - floor) * 1000.0,
        "ms",
        "startup: time beyond the (rounds - 1) x 5 s floor",
    );
    result(
        "startup_identifies",
        identifies.len() as f64,
        "n",
        &format!("startup: IDENTIFYs sent ({rejected} connections closed by the simulator)"),
    );
}
