//! The REST front door's rate limiter and failure handling (DESIGN.md §6,
//! issue 11) end to end: the daemon on the simulator, plain HTTP clients
//! sending through the front door, the simulator recording what reached
//! "Discord".

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::servers::free_port;
use serde_json::{Value, json};
use shardwarden::config::{Config, Token};
use shardwarden::simulator::{
    LimitScope, RateLimitCounts, RestFailure, SharedBucket, SimConfig, Simulator, world,
};
use shardwarden::supervisor::{self, DaemonOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const TOKEN: &str = "rest-test-token-9876";
const WAIT: Duration = Duration::from_secs(10);

struct Daemon {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), supervisor::DaemonError>>,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

async fn simulator(bucket: (u32, Duration)) -> Simulator {
    Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        shards: 1,
        guilds_per_shard: 2,
        heartbeat_interval_ms: 1000,
        message_bucket: bucket,
        route_bucket: bucket,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

/// The daemon with `[proxy]` on and `proxy_extra` keys.
async fn daemon(sim: &Simulator, proxy_extra: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let text = format!(
        r#"
[discord]
token_env = "SW_REST_TEST_UNUSED"
api_base = "{api_base}"
intents = ["GUILDS", "GUILD_MESSAGES"]
events = ["*"]

[shards]
total = 1

[bot]
socket = "{dir}/bot.sock"

[state]
dir = "{dir}/state"

[proxy]
listen = "127.0.0.1:{port}"
heartbeat_interval = "1s"
{proxy_extra}
"#,
        api_base = sim.api_base(),
        dir = dir.path().display(),
    );
    let config = Config::parse(&text).expect("valid config");
    let (shutdown, shutdown_rx) = watch::channel(false);
    let options = DaemonOptions {
        token: Some(Token::new(TOKEN)),
        api_base: Some(sim.api_base()),
        shutdown: Some(shutdown_rx),
        backoff_min: Some(Duration::from_millis(50)),
        ..DaemonOptions::default()
    };
    let task = tokio::spawn(supervisor::run(config, options));
    assert!(
        sim.wait_until(|s| !s.sessions().is_empty(), WAIT).await,
        "the shard identifies upstream"
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(started.elapsed() < WAIT, "front door listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Daemon {
        addr,
        shutdown,
        task,
        _dir: dir,
    }
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// One request over a fresh connection.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text[9..12].parse().expect("status");
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // The front door answers Discord's bodies with a length, or chunked
    // when streamed: undo chunking for the tests.
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        headers: headers.to_string(),
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn bot() -> String {
    format!("Bot {TOKEN}")
}

fn channels(sim: &Simulator) -> Vec<u64> {
    let guild = sim.shard_guilds(0)[0];
    world::text_channel_ids(guild)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_clients_share_one_limiter_and_see_no_429() {
    // Buckets of 10 per 500 ms; a global limit of 40 per second.
    let sim = simulator((10, Duration::from_millis(500))).await;
    let d = daemon(&sim, "global_rate_limit = 40\nmax_queue_wait = \"30s\"").await;
    let ch = channels(&sim);
    let routes = [
        ("GET", format!("/api/v10/channels/{}", ch[0])),
        ("POST", format!("/api/v10/channels/{}/messages", ch[0])),
        ("POST", format!("/api/v10/channels/{}/messages", ch[1])),
    ];
    let before = sim.rest_calls().len();
    let started = Instant::now();
    let mut clients = Vec::new();
    for client in 0..8 {
        let routes = routes.clone();
        let addr = d.addr;
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut tasks = Vec::new();
            for i in 0..15 {
                let (method, path) = routes[(client + i) % 3].clone();
                let body =
                    (method == "POST").then(|| json!({"content": format!("c{client} m{i}")}));
                tasks.push(tokio::spawn(async move {
                    http(addr, method, &path, &bot(), body).await.status
                }));
            }
            for t in tasks {
                statuses.push(t.await.expect("request"));
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.expect("client"));
    }
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), 120);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request succeeds: {statuses:?}"
    );
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(before).collect();
    let mut limited: HashMap<String, usize> = HashMap::new();
    for c in calls.iter().filter(|c| c.status == 429) {
        *limited
            .entry(format!("{} {}", c.method, c.path))
            .or_default() += 1;
    }
    assert!(
        limited.values().all(|n| *n <= 1),
        "at most one 429 per bucket reached Discord: {limited:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| c.status == 200).count(),
        120,
        "each request reached Discord once"
    );
    // Never more than 40 in any one second (a little slack for the time
    // between sending and the simulator's clock).
    let times: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .filter(|u| u.duration_since(*t) < Duration::from_millis(950))
            .count();
        assert!(in_window <= 40, "{in_window} requests within one second");
    }
    // 40 per route at 10 per 500 ms is ≥ 1.5 s; 120 at 40/s ≥ 2 s.
    assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
}

/// The simulator as Discord groups its limits: posting has a bucket of its own
/// (`post`), editing and deleting a message share one (`edit`), both per channel;
/// 50 requests per second in all.
async fn discord_like_simulator(post: (u32, Duration), edit: (u32, Duration)) -> Simulator {
    Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        shards: 1,
        guilds_per_shard: 2,
        heartbeat_interval_ms: 1000,
        message_bucket: post,
        shared_buckets: vec![SharedBucket {
            routes: vec![
                "PATCH /channels/{channel_id}/messages/{message_id}".into(),
                "DELETE /channels/{channel_id}/messages/{message_id}".into(),
            ],
            limit: edit,
        }],
        global_limit: Some(50),
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

/// 8 clients send 25 requests each, as fast as they can, to 3 routes in 2 buckets of
/// one channel: posting (bucket M, 15 per 500 ms), and editing and deleting (bucket E,
/// shared by both routes, 10 per 500 ms): together faster than Discord's global 50 per
/// second, which the front door (at `global_rate_limit`) must then hold on its own, and
/// E alone is held by its bucket. Every request
/// succeeds, at most one 429 per bucket reaches Discord (its discovery), none on the
/// global limit, and each client's requests of one bucket reach Discord in the order it
/// sent them.
async fn shared_bucket_burst(global_rate_limit: u32) {
    let sim = discord_like_simulator(
        (15, Duration::from_millis(500)),
        (10, Duration::from_millis(500)),
    )
    .await;
    let d = daemon(
        &sim,
        &format!("global_rate_limit = {global_rate_limit}\nmax_queue_wait = \"60s\""),
    )
    .await;
    let channel = channels(&sim)[0];
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 25;
    // What each request is: (client, index) by message id (edits and deletes) or by
    // content (posts and edits).
    let mut by_message: HashMap<String, (usize, usize)> = HashMap::new();
    let mut plans = Vec::new();
    for client in 0..CLIENTS {
        let mut plan = Vec::new();
        for i in 0..PER_CLIENT {
            let content = format!("c{client} r{i}");
            let request = match (client + i) % 3 {
                0 => (
                    "POST",
                    format!("/api/v10/channels/{channel}/messages"),
                    Some(json!({ "content": content })),
                ),
                route => {
                    let msg = sim.bot_message(channel, "to change").expect("channel");
                    let id = msg["id"].as_str().expect("id").to_string();
                    by_message.insert(id.clone(), (client, i));
                    let path = format!("/api/v10/channels/{channel}/messages/{id}");
                    if route == 1 {
                        ("PATCH", path, Some(json!({ "content": content })))
                    } else {
                        ("DELETE", path, None)
                    }
                }
            };
            plan.push(request);
        }
        plans.push(plan);
    }
    let before = sim.rest_calls().len();
    let started = Instant::now();
    let mut clients = Vec::new();
    for plan in plans {
        let addr = d.addr;
        clients.push(tokio::spawn(async move {
            // Each client fires its requests 30 ms apart without waiting for answers: the
            // order it sent them in is the order each bucket must keep.
            let mut tasks = Vec::new();
            for (method, path, body) in plan {
                tasks.push(tokio::spawn(async move {
                    http(addr, method, &path, &bot(), body).await.status
                }));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(t.await.expect("request"));
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.expect("client"));
    }
    let elapsed = started.elapsed();
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(before).collect();
    let counts = RateLimitCounts::of(&calls);
    let rate = (CLIENTS * PER_CLIENT) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "{} requests in {elapsed:?} ({rate:.1}/s); 429s per bucket {:?}, global {}, shared {}",
        CLIENTS * PER_CLIENT,
        counts.by_bucket,
        counts.global,
        counts.shared
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 204),
        "every request succeeds: {statuses:?}"
    );
    let buckets: std::collections::BTreeSet<_> =
        calls.iter().filter_map(|c| c.bucket.clone()).collect();
    assert_eq!(buckets.len(), 2, "3 routes in 2 buckets: {buckets:?}");
    assert!(
        counts.by_bucket.values().all(|n| *n <= 1),
        "at most one 429 per bucket reached Discord (its discovery): {:?}",
        counts.by_bucket
    );
    assert_eq!(
        counts.global, 0,
        "none on the global limit (front door at {global_rate_limit}/s, Discord at 50/s)"
    );
    assert_eq!(
        calls.iter().filter(|c| c.status < 300).count(),
        CLIENTS * PER_CLIENT,
        "each request reached Discord once"
    );
    // Order within each bucket: each client's requests of one bucket reached Discord in
    // the order it sent them.
    let mut seen: HashMap<(usize, String), Vec<usize>> = HashMap::new();
    for c in calls.iter().filter(|c| c.status < 300) {
        let who = match c.body.as_ref().and_then(|b| b["content"].as_str()) {
            Some(content) if c.method == "POST" || c.method == "PATCH" => {
                let (client, i) = content.split_once(" r").expect("c{client} r{i}");
                (client[1..].parse().expect("client"), i.parse().expect("i"))
            }
            _ => {
                let id = c.path.rsplit('/').next().expect("message id");
                by_message[id]
            }
        };
        let bucket = c.bucket.clone().expect("bucket");
        seen.entry((who.0, bucket)).or_default().push(who.1);
    }
    for ((client, bucket), order) in &seen {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "client {client}, bucket {bucket}: Discord got {order:?}"
        );
    }
    assert!(
        calls.iter().all(|c| c.scope != Some(LimitScope::Shared)),
        "no shared 429 here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_on_shared_buckets_see_one_429_per_bucket_at_most() {
    // 10 % under Discord's 50: the margin the front door's schedule needs (see below).
    shared_bucket_burst(45).await;
}

/// The same burst with the front door at Discord's own 50 per second: the
/// daemon's own /gateway/bot counts too, and each slot is held for the
/// answer time as well, so Discord never counts 51 in a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_discords_own_global_limit_the_burst_meets_no_global_429() {
    shared_bucket_burst(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_one_route_leaves_the_other_routes_alone() {
    let second = (50, Duration::from_secs(1));
    let sim = discord_like_simulator(second, second).await;
    let d = daemon(&sim, "").await;
    let ch = channels(&sim);
    let failing = format!("/api/v10/channels/{}", ch[0]);
    sim.set_route_failure(
        &format!("GET /channels/{}", ch[0]),
        Some(RestFailure::Status(500, None)),
    );
    let from = sim.rest_calls().len();
    let addr = d.addr;
    let path = failing.clone();
    let started = Instant::now();
    let broken = tokio::spawn(async move { http(addr, "GET", &path, &bot(), None).await.status });
    // Meanwhile the same channel's other routes, and another channel, answer at once.
    let others = [
        ("GET", format!("/api/v10/channels/{}", ch[1]), None),
        (
            "POST",
            format!("/api/v10/channels/{}/messages", ch[0]),
            Some(json!({"content": "unaffected"})),
        ),
        (
            "POST",
            format!("/api/v10/channels/{}/messages", ch[1]),
            Some(json!({"content": "unaffected"})),
        ),
    ];
    for (method, path, body) in others {
        let asked = Instant::now();
        let a = http(d.addr, method, &path, &bot(), body).await;
        assert_eq!(a.status, 200, "{method} {path}: {}", a.body);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "{method} {path} waited {:?}",
            asked.elapsed()
        );
    }
    assert_eq!(
        broken.await.expect("request"),
        500,
        "returned after its retries"
    );
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(from).collect();
    let failed: Vec<u16> = calls
        .iter()
        .filter(|c| c.path == failing)
        .map(|c| c.status)
        .collect();
    assert_eq!(failed, vec![500; 4], "GET tried 1 + 3 times");
    assert!(
        calls
            .iter()
            .filter(|c| c.path != failing)
            .all(|c| c.status == 200),
        "{calls:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_sent_once_and_5xx_retried_only_when_idempotent() {
    let sim = simulator((50, Duration::from_secs(1))).await;
    let d = daemon(&sim, "").await;
    let ch = channels(&sim);
    let get = format!("/api/v10/channels/{}", ch[0]);
    let post = format!("/api/v10/channels/{}/messages", ch[0]);
    let calls_to = |path: &str, from: usize| {
        sim.rest_calls()
            .into_iter()
            .skip(from)
            .filter(|c| c.path == path)
            .map(|c| c.status)
            .collect::<Vec<_>>()
    };

    // 400: an empty message.
    let from = sim.rest_calls().len();
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": ""}))).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["code"], 50006, "Discord's body unchanged");
    assert_eq!(calls_to(&post, from), vec![400], "sent once");

    // 401: a wrong token.
    let from = sim.rest_calls().len();
    let a = http(d.addr, "GET", &get, "Bot wrong-token", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(calls_to(&get, from), vec![401]);

    // 403 (injected).
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Times {
        times: 1,
        status: 403,
        retry_after: None,
    }));
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["code"], 50001);
    assert_eq!(calls_to(&get, from), vec![403]);

    // 404: an unknown channel.
    let unknown = "/api/v10/channels/12345";
    let from = sim.rest_calls().len();
    let a = http(d.addr, "GET", unknown, &bot(), None).await;
    assert_eq!(a.status, 404);
    assert_eq!(calls_to(unknown, from), vec![404]);

    // 500 on GET: retried until it succeeds.
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Times {
        times: 2,
        status: 500,
        retry_after: None,
    }));
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(calls_to(&get, from), vec![500, 500, 200]);

    // 500 on POST: not retried (Discord may have processed it).
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Times {
        times: 1,
        status: 500,
        retry_after: None,
    }));
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "x"}))).await;
    assert_eq!(a.status, 500);
    assert_eq!(calls_to(&post, from), vec![500]);

    // Transport failures (Discord hangs up): GET tried 1 + 3 times, POST once.
    sim.set_rest_failure(Some(RestFailure::Hangup));
    let before = sim.rest_requests();
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 502);
    assert_eq!(sim.rest_requests() - before, 4, "GET retried 3 times");
    let before = sim.rest_requests();
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "y"}))).await;
    assert_eq!(a.status, 502);
    assert_eq!(sim.rest_requests() - before, 1, "POST sent once");
    sim.set_rest_failure(None);

    // 429 from Discord: waited out and retried, up to 3 times, then
    // returned unchanged.
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Times {
        times: 1,
        status: 429,
        retry_after: Some(0.2),
    }));
    let started = Instant::now();
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "z"}))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(calls_to(&post, from), vec![429, 200]);
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Status(429, Some(0.1))));
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["retry_after"], 0.1, "Discord's 429 unchanged");
    assert_eq!(calls_to(&get, from), vec![429, 429, 429, 429]);
    sim.set_rest_failure(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_max_queue_wait_gets_discords_429_at_once() {
    // One message per 5 s; max_queue_wait 1 s.
    let sim = simulator((1, Duration::from_secs(5))).await;
    let d = daemon(&sim, "max_queue_wait = \"1s\"").await;
    let post = format!("/api/v10/channels/{}/messages", channels(&sim)[0]);
    let from = sim.rest_calls().len();
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "1"}))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let started = Instant::now();
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "2"}))).await;
    assert!(started.elapsed() < Duration::from_millis(500), "at once");
    assert_eq!(a.status, 429);
    let v = a.json();
    assert_eq!(v["message"], "You are being rate limited.");
    assert_eq!(v["global"], false);
    let retry_after = v["retry_after"].as_f64().expect("retry_after");
    assert!(
        (3.5..=5.0).contains(&retry_after),
        "the projected wait: {retry_after}"
    );
    assert_eq!(a.header("via").as_deref(), Some("shardwarden"));
    assert_eq!(a.header("retry-after").as_deref(), Some("5"));
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(from).collect();
    assert_eq!(calls.len(), 1, "the refused request never reached Discord");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalid_request_guard_trips_and_says_why() {
    let sim = simulator((50, Duration::from_secs(1))).await;
    let d = daemon(&sim, "invalid_request_limit = 3").await;
    let get = format!("/api/v10/channels/{}", channels(&sim)[0]);
    let from = sim.rest_calls().len();
    for _ in 0..3 {
        let a = http(d.addr, "GET", &get, "Bot wrong-token", None).await;
        assert_eq!(a.status, 401);
    }
    // Now even a valid request is refused locally.
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 429, "{}", a.body);
    let v = a.json();
    assert_eq!(v["limit"], "invalid_request_limit");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid_request_limit") && m.contains("10 minutes")),
        "{v}"
    );
    let clears = v["clears_in"].as_f64().expect("clears_in");
    assert!((590.0..=600.0).contains(&clears), "{clears}");
    assert_eq!(a.header("via").as_deref(), Some("shardwarden"));
    assert_eq!(
        sim.rest_calls().len() - from,
        3,
        "the refused request never reached Discord"
    );
}

#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_logged_once_classified_and_without_secrets() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global: the daemon's tasks run on every worker thread. Other tests of
    // this file log here too, which only adds lines to check.
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
    let sim = simulator((50, Duration::from_secs(1))).await;
    let d = daemon(&sim, "").await;
    let get = format!("/api/v10/channels/{}", channels(&sim)[0]);
    let a = http(d.addr, "GET", &get, "Bot leaky-secret-token-zz99", None).await;
    assert_eq!(a.status, 401);
    let webhook = "/api/v10/webhooks/77/secret-webhook-token?wait=true&token=query-secret";
    let a = http(
        d.addr,
        "POST",
        webhook,
        &bot(),
        Some(json!({"content": "w"})),
    )
    .await;
    assert_eq!(a.status, 404);
    // Log lines are written as events happen; give the writer a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).to_string();
    for secret in [
        TOKEN,
        "leaky-secret-token",
        "secret-webhook-token",
        "query-secret",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} leaked into the logs:\n{logs}"
        );
    }
    let failed: Vec<&str> = logs.lines().filter(|l| l.contains("rest_failed")).collect();
    let auth: Vec<&&str> = failed
        .iter()
        .filter(|l| l.contains("class=auth") && l.contains("…zz99"))
        .collect();
    assert_eq!(auth.len(), 1, "one line for the 401:\n{logs}");
    assert!(
        auth[0].contains("…zz99") && auth[0].contains("status=401"),
        "{}",
        auth[0]
    );
    let payload: Vec<&&str> = failed
        .iter()
        .filter(|l| l.contains("class=payload") && l.contains("webhooks/77/:token"))
        .collect();
    assert_eq!(payload.len(), 1, "one line for the 404:\n{logs}");
    assert!(payload[0].contains("status=404"), "{}", payload[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scope_429s_are_retried_and_not_counted_as_invalid() {
    let sim = simulator((50, Duration::from_secs(1))).await;
    let d = daemon(&sim, "invalid_request_limit = 2").await;
    let get = format!("/api/v10/channels/{}", channels(&sim)[0]);
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Shared {
        times: 3,
        retry_after: 0.05,
    }));
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let statuses: Vec<u16> = sim
        .rest_calls()
        .into_iter()
        .skip(from)
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 429, 200]);
    // Three 429s but of shared scope: the guard (limit 2) did not trip.
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A user-scope 429 does count: two of them trip it.
    sim.set_rest_failure(Some(RestFailure::Times {
        times: 2,
        status: 429,
        retry_after: Some(0.05),
    }));
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = http(d.addr, "GET", &get, &bot(), None).await;
    assert_eq!(a.status, 429, "the guard trips: {}", a.body);
    assert_eq!(a.json()["limit"], "invalid_request_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_of_one_bucket_reach_discord_in_arrival_order() {
    // 2 messages per 300 ms: the 12 below queue up.
    let sim = simulator((2, Duration::from_millis(300))).await;
    let d = daemon(&sim, "max_queue_wait = \"30s\"").await;
    let post = format!("/api/v10/channels/{}/messages", channels(&sim)[0]);
    let from = sim.rest_calls().len();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let post = post.clone();
        let addr = d.addr;
        tasks.push(tokio::spawn(async move {
            http(
                addr,
                "POST",
                &post,
                &bot(),
                Some(json!({"content": format!("m{i}")})),
            )
            .await
            .status
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        assert_eq!(t.await.expect("request"), 200);
    }
    let sent: Vec<String> = sim
        .rest_calls()
        .into_iter()
        .skip(from)
        .filter(|c| c.status == 200)
        .filter_map(|c| {
            c.body
                .and_then(|b| b["content"].as_str().map(str::to_string))
        })
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    assert_eq!(sent, expected, "FIFO within the bucket");
    let limited = sim
        .rest_calls()
        .into_iter()
        .skip(from)
        .filter(|c| c.status == 429)
        .count();
    assert_eq!(limited, 0, "the learned bucket was obeyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_429_holds_every_route_until_it_passes() {
    let sim = simulator((50, Duration::from_secs(1))).await;
    let d = daemon(&sim, "").await;
    let ch = channels(&sim);
    let get = format!("/api/v10/channels/{}", ch[0]);
    let post = format!("/api/v10/channels/{}/messages", ch[1]);
    let from = sim.rest_calls().len();
    sim.set_rest_failure(Some(RestFailure::Global {
        times: 1,
        retry_after: 0.5,
    }));
    let addr = d.addr;
    let first = tokio::spawn(async move { http(addr, "GET", &get, &bot(), None).await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = http(d.addr, "POST", &post, &bot(), Some(json!({"content": "g"}))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(first.await.expect("first"), 200);
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(from).collect();
    let limited: Vec<_> = calls.iter().filter(|c| c.status == 429).collect();
    assert_eq!(limited.len(), 1, "one global 429: {calls:?}");
    let other = calls
        .iter()
        .find(|c| c.path == post)
        .expect("the POST reached Discord");
    assert_eq!(other.status, 200);
    assert!(
        other.at.duration_since(limited[0].at) >= Duration::from_millis(450),
        "the other route waited out the global 429"
    );
}
