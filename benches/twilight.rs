//! Benchmark 4 of issue 5: the peer. twilight-gateway (zlib-stream, pointed
//! at the embedded simulator with `ConfigBuilder::proxy_url`) consumes the
//! same kind of burst as the end-to-end benchmark, as typed events and as
//! raw messages; beside it, shardwarden's own `Shard` actor consumes it into
//! its event log, with the same harness.
//!
//! Each consumer runs alone on its own OS thread with a current-thread tokio
//! runtime, so everything it does (socket reads, WebSocket framing, inflate,
//! parsing, its own timers) happens on that thread; its CPU is that thread's
//! CLOCK_THREAD_CPUTIME_ID from just before the burst to the last event.
//! The simulator runs on other threads of this process.
//!
//! `BENCH_PEER_EVENTS` (default 50000) and `BENCH_ROUNDS` (default 2).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use shardwarden::compression::Compression;
use shardwarden::config::Token;
use shardwarden::event_log::EventLog;
use shardwarden::hub::{Hub, IdentifyBudget};
use shardwarden::identify_queue::IdentifyQueue;
use shardwarden::shard::{Shard, ShardConfig};
use shardwarden::simulator::Fault;
use tokio::sync::{mpsc, watch};
use twilight_gateway::{ConfigBuilder, Event, EventTypeFlags, Intents, ShardId};

use common::daemon::{TOKEN, simulator};
use common::{EVENT_SIZE, env_count, median, result, thread_cpu_ns};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Consumer {
    TwilightTyped,
    TwilightRaw,
    Shardwarden,
}

/// What one consumer thread measured.
struct Measured {
    cpu_ns: u64,
    wall: Duration,
}

/// Run `consumer` against a fresh simulator: the thread reports when it is
/// READY, the burst of `n` events starts, and the thread reports its CPU.
fn run(rt: &tokio::runtime::Runtime, consumer: Consumer, n: u32) -> Measured {
    let sim = rt.block_on(simulator(1, |_| {}));
    let url = sim.gateway_url();
    let (ready_tx, ready_rx) = std_mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("consumer runtime");
        rt.block_on(async move {
            match consumer {
                Consumer::TwilightTyped | Consumer::TwilightRaw => {
                    twilight(consumer, url, n, ready_tx).await
                }
                Consumer::Shardwarden => shardwarden(url, n, ready_tx).await,
            }
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("consumer READY");
    assert!(
        sim.inject(
            0,
            Fault::Burst {
                count: n,
                size: EVENT_SIZE,
            },
        ),
        "no live connection"
    );
    let measured = thread.join().expect("consumer thread");
    rt.block_on(async { sim.shutdown() });
    measured
}

async fn twilight(
    consumer: Consumer,
    url: String,
    n: u32,
    ready: std_mpsc::Sender<()>,
) -> Measured {
    use twilight_gateway::StreamExt as _;
    let config = ConfigBuilder::new(
        TOKEN.to_string(),
        Intents::GUILDS | Intents::GUILD_MESSAGES | Intents::MESSAGE_CONTENT,
    )
    .proxy_url(url)
    .build();
    let mut shard = twilight_gateway::Shard::with_config(ShardId::ONE, config);
    // READY, then the simulator's GUILD_CREATE (read raw: twilight-model
    // cannot type the simulator's trimmed-down GUILD_CREATE).
    loop {
        let message = futures::StreamExt::next(&mut shard)
            .await
            .expect("open")
            .expect("message");
        if let twilight_gateway::Message::Text(text) = message
            && text.contains("\"t\":\"GUILD_CREATE\"")
        {
            break;
        }
    }
    let t0 = Instant::now();
    let cpu0 = thread_cpu_ns();
    ready.send(()).expect("main waits");
    let mut seen = 0u32;
    let mut check = 0usize;
    while seen < n {
        match consumer {
            Consumer::TwilightTyped => {
                let event = shard
                    .next_event(EventTypeFlags::all())
                    .await
                    .expect("open")
                    .expect("event");
                if let Event::MessageCreate(m) = event {
                    check = check.wrapping_add(m.content.len());
                    seen += 1;
                }
            }
            _ => {
                let message = futures::StreamExt::next(&mut shard)
                    .await
                    .expect("open")
                    .expect("message");
                if let twilight_gateway::Message::Text(text) = message {
                    check = check.wrapping_add(text.len());
                    seen += 1;
                }
            }
        }
    }
    let cpu_ns = thread_cpu_ns() - cpu0;
    std::hint::black_box(check);
    Measured {
        cpu_ns,
        wall: t0.elapsed(),
    }
}

async fn shardwarden(url: String, n: u32, ready: std_mpsc::Sender<()>) -> Measured {
    let (tx, rx) = mpsc::channel(64);
    let hub = Arc::new(Hub::new(
        EventLog::new(1, 16 << 20),
        &[0],
        1,
        ["READY", "RESUMED", "GUILD_CREATE", "MESSAGE_CREATE"]
            .iter()
            .map(|e| e.to_string())
            .collect(),
        HashMap::from([(0, tx)]),
        IdentifyBudget {
            remaining: 1000,
            total: 1000,
            resets_at_ms: shardwarden::clock::unix_millis() + 86_400_000,
            max_concurrency: 1,
        },
    ));
    let queue = Arc::new(IdentifyQueue::new(1, 0, hub.clone()));
    let (_shutdown_tx, shutdown) = watch::channel(false);
    let (report_tx, _reports) = mpsc::unbounded_channel();
    // GUILDS | GUILD_MESSAGES | MESSAGE_CONTENT
    let mut config = ShardConfig::new(0, 1, Token::new(TOKEN), 33281, url);
    config.compression = Compression::ZlibStream;
    let mut shard = Shard::new(
        config,
        hub.clone(),
        hub.shards[0].clone(),
        queue,
        rx,
        shutdown,
        report_tx,
        None,
    );
    let task = tokio::spawn(async move { shard.run().await });
    let mut head = hub.log.subscribe_head();
    // READY, then the simulator's GUILD_CREATE.
    head.wait_for(|&h| h >= 2).await.expect("log open");
    let t0 = Instant::now();
    let cpu0 = thread_cpu_ns();
    ready.send(()).expect("main waits");
    let target = 2 + u64::from(n);
    head.wait_for(|&h| h >= target).await.expect("log open");
    let cpu_ns = thread_cpu_ns() - cpu0;
    let wall = t0.elapsed();
    task.abort();
    Measured { cpu_ns, wall }
}

fn main() {
    let n = env_count("BENCH_PEER_EVENTS", 50_000) as u32;
    let rounds = env_count("BENCH_ROUNDS", 2).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    eprintln!("twilight: {n} ~1 KB MESSAGE_CREATEs per consumer, {rounds} round(s)");
    let consumers = [
        (Consumer::TwilightTyped, "peer_twilight_typed"),
        (Consumer::TwilightRaw, "peer_twilight_raw"),
        (Consumer::Shardwarden, "peer_shardwarden_shard"),
    ];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); consumers.len()];
    let mut eps: Vec<Vec<f64>> = vec![Vec::new(); consumers.len()];
    for _ in 0..rounds {
        for (i, (consumer, _)) in consumers.iter().enumerate() {
            let m = run(&rt, *consumer, n);
            cpu[i].push(m.cpu_ns as f64 / f64::from(n) / 1000.0);
            eps[i].push(f64::from(n) / m.wall.as_secs_f64());
        }
    }
    let typed = median(&mut cpu[0].clone());
    for (i, (consumer, key)) in consumers.iter().enumerate() {
        let us = median(&mut cpu[i]);
        result(
            &format!("{key}_cpu_us"),
            us,
            "us",
            &format!("{consumer:?}: consumer thread CPU per event"),
        );
        result(
            &format!("{key}_eps"),
            median(&mut eps[i]),
            "ev/s",
            &format!("{consumer:?}: events/s (simulator-bound)"),
        );
        if i > 0 {
            result(
                &format!("{key}_vs_typed"),
                us / typed,
                "x",
                "  ratio to twilight typed",
            );
        }
    }
}
