//! Issue 11's measurement of the REST front door: the latency it adds to a
//! request and the daemon's CPU per request, at a steady rate on loopback.
//! The release `shardwarden` binary runs as a child process (its CPU is its
//! own); the simulator and the client run in this process.
//!
//! `cargo bench --bench rest`
//!
//! One request mix is sent (a) straight to the simulator's REST API, then
//! (b) through the daemon's front door (`[proxy]` on, `api_base` = the
//! simulator). Open loop: one request per tick (1 ms at 1,000/s) whether or
//! not earlier ones were answered, at most `IN_FLIGHT` at once on a
//! keep-alive pool of as many connections; a request's latency runs from
//! its tick to the last byte of its answer, so time spent waiting for a free
//! connection counts and a slow answer cannot hide the requests queued
//! behind it (no coordinated omission).
//!
//! The mix is GET `/channels/{id}` and POST `/channels/{id}/messages` in
//! turn, round-robin over 96 channels, with the simulator's buckets and the
//! daemon's `global_rate_limit` raised far above the rate: it measures the
//! proxy, not rate-limit waits, and every 429 (seen by the client, or by
//! the simulator and retried by the daemon) is reported. The daemon holds
//! the shard without GUILD_MESSAGES, so the simulator sends it no
//! MESSAGE_CREATE for the posted messages: its CPU is the REST path alone.
//!
//! The simulator answers every request with `Connection: close`, so both
//! paths open one TCP connection to it per request; the client's
//! connections to the front door are kept alive.
//!
//! `BENCH_REST_RATE` (requests/s, default 1000), `BENCH_REST_SECS`
//! (measured seconds, default 10) and `BENCH_REST_WARMUP` (seconds before
//! them, default 3) change the run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shardwarden::simulator::{Simulator, world};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use common::daemon::{Daemon, TOKEN, free_port, simulator};
use common::{env_count, percentile, proc_cpu_us, process_cpu_ns, result_line};

/// Requests in flight at most, and connections in the client's pool.
const IN_FLIGHT: usize = 16;
/// Guilds on the one shard (three text channels each).
const GUILDS: u32 = 32;
/// The simulator's buckets for the bench: never exhausted at these rates.
const UNLIMITED: (u32, Duration) = (1_000_000, Duration::from_secs(1));

fn main() {
    let rate = env_count("BENCH_REST_RATE", 1000).max(1);
    let measured = rate * env_count("BENCH_REST_SECS", 10);
    let warmup = rate * env_count("BENCH_REST_WARMUP", 3);
    let rt = common::runtime();
    rt.block_on(async {
        let sim = simulator(1, |c| {
            c.guilds_per_shard = GUILDS;
            c.message_bucket = UNLIMITED;
            c.route_bucket = UNLIMITED;
            // Nor the token-wide 50 per second: this measures the proxy, not waits.
            c.global_limit = None;
        })
        .await;
        let port = free_port();
        let daemon = Daemon::start_intents(
            &sim,
            "16MiB",
            "zlib-stream",
            r#"["GUILDS"]"#,
            r#"["*"]"#,
            &format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\nglobal_rate_limit = 1000000\n"),
        );
        let front_door = format!("http://127.0.0.1:{port}/api/v10");
        ready(&sim, &front_door).await;
        let schedule = Schedule {
            rate,
            warmup,
            measured,
        };
        let pid = daemon.pid();
        // Other work on the machine shows in the tail: say how busy it was.
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!(
            "REST: {rate} requests/s, {warmup} warm-up + {measured} measured per path, \
             {IN_FLIGHT} in flight at most, GET/POST over {} channels; load average {}",
            GUILDS * 3,
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let direct = run(&sim, &mix(&sim, &sim.api_base()), &schedule, pid).await;
        let proxied = run(&sim, &mix(&sim, &front_door), &schedule, pid).await;
        let failures = daemon.log_text().matches("rest_failed").count();
        report(&direct, &proxied, failures);
    });
}

/// Wait until the daemon's shard is up and its front door answers.
async fn ready(sim: &Simulator, front_door: &str) {
    assert!(
        sim.wait_until(|s| !s.sessions().is_empty(), Duration::from_secs(30))
            .await,
        "the daemon's shard identifies"
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri: Uri = format!("{front_door}/users/@me").parse().expect("uri");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = Request::get(uri.clone())
            .header(header::AUTHORIZATION, format!("Bot {TOKEN}"))
            .body(Full::default())
            .expect("request");
        match client.request(request).await {
            Ok(r) if r.status().is_success() => return,
            _ if Instant::now() > deadline => panic!("the front door does not answer"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One request of the mix.
struct Call {
    method: Method,
    uri: Uri,
    body: Bytes,
}

/// GET a channel, POST a message to it, for every text channel of the
/// shard's guilds, below `base` (`http://…/api/v10`).
fn mix(sim: &Simulator, base: &str) -> Vec<Call> {
    sim.shard_guilds(0)
        .into_iter()
        .flat_map(world::text_channel_ids)
        .flat_map(|c| {
            [
                Call {
                    method: Method::GET,
                    uri: format!("{base}/channels/{c}").parse().expect("uri"),
                    body: Bytes::new(),
                },
                Call {
                    method: Method::POST,
                    uri: format!("{base}/channels/{c}/messages")
                        .parse()
                        .expect("uri"),
                    body: Bytes::from(format!(r#"{{"content":"bench message in {c}"}}"#)),
                },
            ]
        })
        .collect()
}

struct Schedule {
    /// Requests per second.
    rate: usize,
    /// Requests sent before the measured ones.
    warmup: usize,
    /// Requests measured.
    measured: usize,
}

/// What one path measured.
struct Run {
    /// Latency of each measured request, tick to last byte, ns, sorted.
    latency_ns: Vec<u64>,
    /// Measured answers per second, first measured tick to last answer.
    rate: f64,
    /// 429s the client got (warm-up included).
    throttled: usize,
    /// 429s the simulator sent (the daemon retries them before a client
    /// sees one).
    upstream_throttled: usize,
    /// Answers other than 200 or 429, and transport errors (warm-up
    /// included).
    errors: usize,
    /// How late the client's ticks fired (worst, ns): if large, the client
    /// itself fell behind its schedule.
    tick_lag_max_ns: u64,
    /// The daemon's CPU per measured request, µs.
    daemon_cpu_us: f64,
    /// This process's (client and simulator) CPU per measured request, µs.
    bench_cpu_us: f64,
}

/// Send `schedule`'s requests of `calls`, in turn, open loop.
async fn run(sim: &Simulator, calls: &[Call], schedule: &Schedule, daemon: u32) -> Run {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(IN_FLIGHT)
        .build(connector);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let auth = format!("Bot {TOKEN}");
    let upstream_before = sim.rest_calls().len();
    // Late ticks fire at once to catch up (MissedTickBehavior::Burst), so
    // the rate holds whatever the answers do.
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / schedule.rate as f64));
    let total = schedule.warmup + schedule.measured;
    let mut tasks = Vec::with_capacity(total);
    let mut tick_lag_max_ns = 0;
    let mut start = (Instant::now(), 0.0, 0.0);
    for i in 0..total {
        let due = ticks.tick().await;
        let issued = Instant::now();
        if i == schedule.warmup {
            start = (
                issued,
                proc_cpu_us(daemon),
                process_cpu_ns() as f64 / 1000.0,
            );
        }
        if i >= schedule.warmup {
            tick_lag_max_ns = tick_lag_max_ns.max((issued - due).as_nanos() as u64);
        }
        let call = &calls[i % calls.len()];
        let request = Request::builder()
            .method(call.method.clone())
            .uri(call.uri.clone())
            .header(header::AUTHORIZATION, &auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(call.body.clone()))
            .expect("request");
        let client = client.clone();
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            let status = match client.request(request).await {
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    match answer.into_body().collect().await {
                        Ok(_) => status,
                        Err(_) => 0,
                    }
                }
                Err(_) => 0,
            };
            let done = Instant::now();
            ((done - issued).as_nanos() as u64, done, status)
        }));
    }
    let mut latency_ns = Vec::with_capacity(schedule.measured);
    let (mut throttled, mut errors) = (0, 0);
    let mut last = start.0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (ns, done, status) = task.await.expect("request task");
        match status {
            200 => {}
            429 => throttled += 1,
            _ => errors += 1,
        }
        if i >= schedule.warmup {
            latency_ns.push(ns);
            last = last.max(done);
        }
    }
    let daemon_cpu = proc_cpu_us(daemon) - start.1;
    let bench_cpu = process_cpu_ns() as f64 / 1000.0 - start.2;
    latency_ns.sort_unstable();
    let n = schedule.measured as f64;
    Run {
        latency_ns,
        rate: n / (last - start.0).as_secs_f64(),
        throttled,
        upstream_throttled: sim
            .rest_calls()
            .iter()
            .skip(upstream_before)
            .filter(|c| c.status == 429)
            .count(),
        errors,
        tick_lag_max_ns,
        daemon_cpu_us: daemon_cpu / n,
        bench_cpu_us: bench_cpu / n,
    }
}

impl Run {
    fn us(&self, p: f64) -> f64 {
        percentile(&self.latency_ns, p) as f64 / 1000.0
    }

    fn max_us(&self) -> f64 {
        self.latency_ns.last().copied().unwrap_or(0) as f64 / 1000.0
    }
}

fn report(direct: &Run, proxied: &Run, failures: usize) {
    let row = |name: &str, p50: f64, p99: f64, max: String, r: Option<&Run>| {
        let rest = r.map_or(String::new(), |r| {
            format!(
                "{:>8.0} {:>5} {:>7} {:>8.1} {:>10.2} {:>10.2}",
                r.rate,
                format!("{}/{}", r.throttled, r.upstream_throttled),
                r.errors,
                r.tick_lag_max_ns as f64 / 1000.0,
                r.daemon_cpu_us,
                r.bench_cpu_us,
            )
        });
        eprintln!("  {name:<8} {p50:>8.0} {p99:>8.0} {max:>8} {rest}");
    };
    eprintln!(
        "  {:<8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>8} {:>10} {:>10}",
        "",
        "p50 us",
        "p99 us",
        "max us",
        "req/s",
        "429s",
        "errors",
        "lag us",
        "daemon us",
        "bench us"
    );
    row(
        "direct",
        direct.us(50.0),
        direct.us(99.0),
        format!("{:.0}", direct.max_us()),
        Some(direct),
    );
    row(
        "proxied",
        proxied.us(50.0),
        proxied.us(99.0),
        format!("{:.0}", proxied.max_us()),
        Some(proxied),
    );
    row(
        "added",
        proxied.us(50.0) - direct.us(50.0),
        proxied.us(99.0) - direct.us(99.0),
        // The two worst answers are of different requests: no difference.
        "-".to_string(),
        None,
    );
    eprintln!(
        "  (429s: client/simulator; lag: worst tick lateness of the client; \
         daemon us, bench us: CPU per request of the daemon and of this process)"
    );
    if failures > 0 {
        eprintln!("  the daemon logged {failures} rest_failed lines");
    }
    for (path, r) in [("direct", direct), ("proxied", proxied)] {
        result_line(&format!("rest_{path}_p50_us"), r.us(50.0), "us");
        result_line(&format!("rest_{path}_p99_us"), r.us(99.0), "us");
        result_line(&format!("rest_{path}_max_us"), r.max_us(), "us");
        result_line(&format!("rest_{path}_rps"), r.rate, "req/s");
        result_line(&format!("rest_{path}_bench_cpu_us"), r.bench_cpu_us, "us");
    }
    result_line(
        "rest_added_p50_us",
        proxied.us(50.0) - direct.us(50.0),
        "us",
    );
    result_line(
        "rest_added_p99_us",
        proxied.us(99.0) - direct.us(99.0),
        "us",
    );
    result_line("rest_daemon_cpu_us", proxied.daemon_cpu_us, "us");
    result_line("rest_daemon_idle_cpu_us", direct.daemon_cpu_us, "us");
    result_line(
        "rest_429_client",
        (direct.throttled + proxied.throttled) as f64,
        "count",
    );
    result_line(
        "rest_429_upstream",
        (direct.upstream_throttled + proxied.upstream_throttled) as f64,
        "count",
    );
    result_line(
        "rest_errors",
        (direct.errors + proxied.errors) as f64,
        "count",
    );
    result_line(
        "rest_tick_lag_max_us",
        direct.tick_lag_max_ns.max(proxied.tick_lag_max_ns) as f64 / 1000.0,
        "us",
    );
}
