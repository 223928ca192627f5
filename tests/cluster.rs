//! Several daemons of one bot coordinating through a real `redis-server`
//! (DESIGN §4), each the release-shaped binary against one simulator:
//! shards shared out by leases, IDENTIFY paced per bucket across daemons and
//! the budget never spent below the reserve; a daemon killed with SIGKILL
//! has its shards RESUMEd by the others (no IDENTIFY) with every event in
//! JetStream once; a daemon cut off from Redis stops its shards before
//! anyone can take them, so no shard ever has two connections.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::daemon::*;
use common::servers::{Nats, Proxy, Redis};
use serde_json::{Value, json};
use shardwarden::simulator::{SimConfig, Simulator};

const LEASE_TTL: Duration = Duration::from_secs(3);

async fn simulator(shards: u32, max_concurrency: u32, remaining: u32) -> Simulator {
    Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        heartbeat_interval_ms: 500,
        shards,
        max_concurrency,
        session_start_remaining: remaining,
        ..SimConfig::default()
    })
    .await
    .expect("simulator")
}

/// One daemon of the cluster: `range = "auto"`, `lease_ttl = "3s"`, named
/// `name`, using Redis at `redis_url`; `edit` changes the rest.
fn cluster_daemon(
    sim: &Simulator,
    redis_url: &str,
    name: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> (Daemon, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let config = write_config_with(&dir, sim, "", |t| {
        let mut cluster = toml::Table::new();
        cluster.insert("redis".into(), redis_url.into());
        cluster.insert("name".into(), name.into());
        cluster.insert("lease_ttl".into(), "3s".into());
        t.insert("cluster".into(), cluster.into());
        t["shards"]
            .as_table_mut()
            .expect("[shards]")
            .insert("range".into(), "auto".into());
        edit(t);
    });
    let child = spawn(&dir, &config, TOKEN);
    (Daemon { child, dir, config }, tmp)
}

/// The daemon's `health` (its `cluster` part holds the leases).
async fn health(socket: &Path) -> Value {
    let (mut probe, _) = Bot::connect(
        socket,
        json!({"op":"hello","v":1,"client":"probe","events":[],"diagnostics":false,"resume_from":null}),
    )
    .await;
    probe.send(json!({"op":"status"})).await;
    probe.next_op("health").await
}

/// The shards whose lease the daemon holds.
async fn leases(daemon: &Daemon) -> BTreeSet<u64> {
    health(&daemon.socket()).await["cluster"]["leases"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["shard"].as_u64())
        .collect()
}

/// Wait until Redis holds, for each of `shards`, the session the simulator
/// has attached for that shard.
async fn sessions_in_redis(sim: &Simulator, url: &str, shards: u32) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let live: BTreeMap<u32, String> = sim
            .sessions()
            .iter()
            .filter(|s| !s.invalid && s.attached.is_some())
            .map(|s| (s.shard[0], s.session_id.clone()))
            .collect();
        let mut saved = 0;
        for shard in 0..shards {
            let value: Option<String> = redis::cmd("GET")
                .arg(format!("shardwarden:session:{shard}"))
                .query_async(&mut conn)
                .await
                .expect("GET");
            let id = value
                .and_then(|v| serde_json::from_str::<Value>(&v).ok())
                .and_then(|v| v["session_id"].as_str().map(str::to_string));
            if id.is_some() && id.as_ref() == live.get(&shard) {
                saved += 1;
            }
        }
        if saved == shards {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {saved} of {shards} sessions in Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shards with a session attached to a live connection.
fn attached(sim: &Simulator) -> usize {
    sim.sessions()
        .iter()
        .filter(|s| !s.invalid && s.attached.is_some())
        .count()
}

/// Live connections per shard, for "never two at once".
fn live_per_shard(sim: &Simulator) -> BTreeMap<u32, usize> {
    let mut live = BTreeMap::new();
    for c in sim.connections() {
        if let (Some(shard), false) = (c.shard, c.closed) {
            *live.entry(shard).or_insert(0) += 1;
        }
    }
    live
}

/// IDENTIFY frames as (bucket, arrival), by the `shard` they carried.
fn identify_times(
    sim: &Simulator,
    max_concurrency: u64,
) -> BTreeMap<u64, Vec<tokio::time::Instant>> {
    let mut by_bucket: BTreeMap<u64, Vec<_>> = BTreeMap::new();
    for f in sim.frames().into_iter().filter(|f| f.op == 2) {
        let shard = f.json["d"]["shard"][0].as_u64().expect("IDENTIFY shard");
        by_bucket
            .entry(shard % max_concurrency)
            .or_default()
            .push(f.at.into());
    }
    for times in by_bucket.values_mut() {
        times.sort();
    }
    by_bucket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_own_every_shard_once_pace_identifies_and_keep_the_reserve() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    // 12 shards, 2 buckets; 35 session starts with identify_reserve 25:
    // ten may identify, the last two must wait for the reset.
    let sim = simulator(12, 2, 35).await;
    let daemons: Vec<_> = (0..3)
        .map(|i| cluster_daemon(&sim, &redis.url(), &format!("host-{i}"), |_| {}))
        .collect();
    assert!(
        sim.wait_until(|s| identifies(s) >= 10, Duration::from_secs(60))
            .await,
        "ten IDENTIFYs; got {}",
        identifies(&sim)
    );
    // Every shard leased by exactly one daemon.
    let deadline = tokio::time::Instant::now() + WAIT;
    let owners = loop {
        let mut owners: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, (d, _)) in daemons.iter().enumerate() {
            for shard in leases(d).await {
                owners.entry(shard).or_default().push(i);
            }
        }
        if owners.len() == 12 || tokio::time::Instant::now() > deadline {
            break owners;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        owners.keys().copied().collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    assert!(
        owners.values().all(|o| o.len() == 1),
        "one owner each: {owners:?}"
    );
    let per_daemon: BTreeSet<usize> = owners.values().map(|o| o[0]).collect();
    assert!(per_daemon.len() >= 2, "spread over the daemons: {owners:?}");

    // The two left wait at the reserve: no eleventh IDENTIFY, ever.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        identifies(&sim),
        10,
        "the budget never goes below the reserve"
    );
    let h = health(&daemons[0].0.socket()).await;
    assert_eq!(h["identify_budget"]["remaining"], 25, "{h}");
    assert!(
        daemons
            .iter()
            .any(|(d, _)| d.log().contains("class=identify_budget")),
        "a daemon says why its shards wait:\n{}",
        daemons
            .iter()
            .map(|(d, _)| d.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    );

    // Per bucket, IDENTIFYs at least 5 s apart across the daemons.
    for (bucket, times) in identify_times(&sim, 2) {
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(5),
                "bucket {bucket}: IDENTIFYs {gap:?} apart"
            );
        }
    }
    // No op 9 for identifying too soon, and every identified shard is live.
    assert_eq!(attached(&sim), 10);
    for (d, _) in &daemons {
        assert!(!d.log().contains("event=invalidated"), "{}", d.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_shards_are_resumed_by_the_others_and_jetstream_gets_every_event_once() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let Some(nats) = Nats::start().await else {
        return;
    };
    let sim = simulator(6, 2, 1000).await;
    let nats_url = nats.url();
    let with_broker = |t: &mut toml::Table| {
        let mut broker = toml::Table::new();
        broker.insert("nats".into(), nats_url.clone().into());
        broker.insert("stream".into(), "swcluster".into());
        t.insert("broker".into(), broker.into());
    };
    let mut daemons: Vec<_> = (0..3)
        .map(|i| cluster_daemon(&sim, &redis.url(), &format!("host-{i}"), with_broker))
        .collect();
    assert!(
        sim.wait_until(|s| attached(s) == 6, Duration::from_secs(40))
            .await,
        "six shards ready"
    );
    assert_eq!(identifies(&sim), 6);

    // Events flow on every shard while one daemon dies.
    let flowing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pump = {
        let sim = sim.clone();
        let flowing = flowing.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while flowing.load(std::sync::atomic::Ordering::Relaxed) {
                sim.dispatch((n % 6) as u32, "MESSAGE_CREATE", json!({"n": n}));
                n += 1;
                sent.store(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    sessions_in_redis(&sim, &redis.url(), 6).await;
    let mut victim = None;
    for (i, (d, _)) in daemons.iter().enumerate() {
        let held = leases(d).await;
        if !held.is_empty() {
            victim = Some((i, held));
            break;
        }
    }
    let (victim, orphaned) = victim.expect("some daemon holds shards");
    let killed_at = tokio::time::Instant::now();
    daemons[victim].0.child.kill().expect("kill -9");
    let _ = daemons[victim].0.child.wait();
    let conns_before = sim.connections().len();

    // Each orphaned shard is RESUMEd on a new connection by a survivor.
    let resumed = |s: &Simulator| {
        orphaned.iter().all(|&shard| {
            s.connections()
                .iter()
                .skip(conns_before)
                .any(|c| c.shard == Some(shard as u32) && c.resumed && !c.closed)
        })
    };
    assert!(
        sim.wait_until(resumed, LEASE_TTL + Duration::from_secs(8))
            .await,
        "shards {orphaned:?} of the killed daemon resumed within lease TTL + a few seconds"
    );
    let took = killed_at.elapsed();
    assert_eq!(identifies(&sim), 6, "taken over by RESUME, no IDENTIFY");
    let mut survivors_hold = BTreeSet::new();
    for (i, (d, _)) in daemons.iter().enumerate() {
        if i != victim {
            survivors_hold.extend(leases(d).await);
        }
    }
    assert_eq!(
        survivors_hold,
        (0..6).collect(),
        "the survivors hold every shard"
    );
    assert!(
        daemons
            .iter()
            .enumerate()
            .any(|(i, (d, _))| i != victim && d.log().contains("shard_takeover")),
        "a takeover is logged"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    pump.await.expect("pump");
    let total = sent.load(std::sync::atomic::Ordering::Relaxed);

    // Every event in JetStream once (duplicates from the replay dropped by
    // Nats-Msg-Id).
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + WAIT;
    let counts = loop {
        let counts = stream_counts(&js, "swcluster").await;
        if (0..total).all(|n| counts.contains_key(&n)) || tokio::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let missing: Vec<u64> = (0..total).filter(|n| !counts.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {total} missing: {missing:?}",
        missing.len()
    );
    let twice: Vec<(&u64, &usize)> = counts.iter().filter(|(_, c)| **c != 1).collect();
    assert!(twice.is_empty(), "each once: {twice:?}");
    eprintln!(
        "kill -9 → shards {orphaned:?} resumed in {took:?}; {total} events, each once in JetStream"
    );
}

/// How often each `n` is in the stream's events.
async fn stream_counts(js: &async_nats::jetstream::Context, stream: &str) -> BTreeMap<u64, usize> {
    use futures::StreamExt;
    let stream = js.get_stream(stream).await.expect("stream exists");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "swcluster.events.>".to_string(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(100_000)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let mut counts = BTreeMap::new();
    while let Some(Ok(message)) = messages.next().await {
        let body: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        if let Some(n) = body["n"].as_u64() {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_cut_off_from_redis_stops_its_shards_before_another_can_take_them() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let sim = simulator(4, 2, 1000).await;
    // Daemon A reaches Redis through a proxy the test cuts; it takes two
    // shards before B starts, so it surely has some to lose.
    let proxy = Proxy::start(redis.port).await;
    let (a, _ta) = cluster_daemon(
        &sim,
        &format!("redis://127.0.0.1:{}/0", proxy.port),
        "host-a",
        |t| {
            t["cluster"]
                .as_table_mut()
                .expect("[cluster]")
                .insert("max_shards".into(), 2.into());
        },
    );
    assert!(
        sim.wait_until(|s| attached(s) == 2, Duration::from_secs(20))
            .await,
        "A's two shards ready"
    );
    let (b, _tb) = cluster_daemon(&sim, &redis.url(), "host-b", |_| {});
    assert!(
        sim.wait_until(|s| attached(s) == 4, Duration::from_secs(30))
            .await,
        "all four ready"
    );
    let a_held = leases(&a).await;
    assert_eq!(a_held.len(), 2, "{a_held:?}");
    let identified = identifies(&sim);

    // Watch the simulator: never two live connections for one shard.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let sim = sim.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut worst = BTreeMap::new();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for (shard, n) in live_per_shard(&sim) {
                    let w = worst.entry(shard).or_insert(0);
                    *w = (*w).max(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            worst
        })
    };
    let conns_before = sim.connections().len();
    proxy.cut();
    let cut_at = tokio::time::Instant::now();

    // A stops its shards on its own, before its leases expire...
    let a_conns: Vec<u64> = sim
        .connections()
        .iter()
        .filter(|c| !c.closed && c.shard.is_some_and(|s| a_held.contains(&(s as u64))))
        .map(|c| c.conn)
        .collect();
    assert_eq!(a_conns.len(), 2);
    assert!(
        sim.wait_until(
            |s| s
                .connections()
                .iter()
                .filter(|c| a_conns.contains(&c.conn))
                .all(|c| c.closed),
            LEASE_TTL
        )
        .await,
        "A closed its connections within the lease TTL"
    );
    let stopped_in = cut_at.elapsed();
    assert!(stopped_in < LEASE_TTL, "stopped after {stopped_in:?}");
    // ...and B resumes them once the leases expired.
    let taken = |s: &Simulator| {
        a_held.iter().all(|&shard| {
            s.connections()
                .iter()
                .skip(conns_before)
                .any(|c| c.shard == Some(shard as u32) && c.resumed && !c.closed)
        })
    };
    assert!(
        sim.wait_until(taken, LEASE_TTL + Duration::from_secs(8))
            .await,
        "B resumed A's shards"
    );
    assert_eq!(identifies(&sim), identified, "no IDENTIFY for the takeover");
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let worst = watcher.await.expect("watcher");
    assert!(
        worst.values().all(|&n| n <= 1),
        "a shard had two live connections: {worst:?}"
    );
    assert!(a.log().contains("lease_lost"), "{}", a.log());
    assert_eq!(leases(&b).await, (0..4).collect());
    // A says Redis is down and holds nothing.
    let h = health(&a.socket()).await;
    assert_eq!(h["cluster"]["redis"], "down", "{h}");
    assert_eq!(h["cluster"]["leases"], json!([]), "{h}");
    assert!(h["cluster"]["lost"].as_u64().unwrap_or(0) >= 2, "{h}");
}

#[test]
fn check_config_prints_the_cluster_plan_without_the_password_or_names_the_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = |name: &str, text: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write");
        std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run check-config")
    };
    let base = "[discord]\ntoken_env = \"X\"\nintents = [\"GUILDS\"]\nevents = [\"GUILD_CREATE\"]\n[bot]\nsocket = \"/tmp/x.sock\"\n";
    let out = run(
        "good",
        &format!(
            "{base}[shards]\nrange = \"auto\"\n[cluster]\nredis = \"redis://:s3cret@10.0.0.5:6379/0\"\nname = \"host-a\"\nlease_ttl = \"3s\"\nmax_shards = 4\n"
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("range auto (claimed through Redis leases, at most 4 shards)"),
        "{text}"
    );
    assert!(
        text.contains("cluster     Redis at redis://***@10.0.0.5:6379/0, name \"host-a\", lease_ttl 3 s (renewed every 1000 ms)"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");

    let out = run("auto-alone", &format!("{base}[shards]\nrange = \"auto\"\n"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("[shards] range = \"auto\" needs [cluster]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_redis_outage_leaves_running_shards_alone_and_holds_identifies_until_it_ends() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let sim = simulator(2, 1, 1000).await;
    let proxy = Proxy::start(redis.port).await;
    // A fixed range with [cluster]; lease_ttl 12 s: renewed every 4 s and
    // given up 8 s after the last renewal, so a 3 s outage is always
    // survived.
    let (daemon, _t) = cluster_daemon(
        &sim,
        &format!("redis://127.0.0.1:{}/0", proxy.port),
        "host-a",
        |t| {
            t["shards"]
                .as_table_mut()
                .expect("[shards]")
                .insert("range".into(), "all".into());
            t["cluster"]
                .as_table_mut()
                .expect("[cluster]")
                .insert("lease_ttl".into(), "12s".into());
        },
    );
    assert!(
        sim.wait_until(|s| attached(s) == 2, Duration::from_secs(20))
            .await,
        "both shards ready"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let live = |s: &Simulator, shard: u32| {
        s.connections()
            .iter()
            .filter(|c| c.shard == Some(shard) && !c.closed)
            .map(|c| c.conn)
            .collect::<Vec<_>>()
    };
    let shard1 = live(&sim, 1);
    assert_eq!(shard1.len(), 1);
    let identified = identifies(&sim);

    // Redis goes away for 3 s; shard 0's session ends (4009: identify again).
    proxy.cut();
    assert!(sim.inject(0, shardwarden::simulator::Fault::Close(4009)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(identifies(&sim), identified, "no IDENTIFY without Redis");
    assert!(
        daemon.log().contains("event=identify_waiting"),
        "the log says why: {}",
        daemon.log()
    );
    let healed_at = tokio::time::Instant::now();
    proxy.restore().await;
    assert!(
        sim.wait_until(|s| identifies(s) == identified + 1, Duration::from_secs(10))
            .await,
        "shard 0 identifies once Redis answers: {}",
        daemon.log()
    );
    let frame = sim
        .frames()
        .into_iter()
        .rfind(|f| f.op == 2)
        .expect("the IDENTIFY");
    assert!(tokio::time::Instant::from(frame.at) >= healed_at);
    // Shard 1 never noticed: same connection, lease kept.
    assert_eq!(
        live(&sim, 1),
        shard1,
        "shard 1 kept its connection: {}",
        daemon.log()
    );
    assert!(
        !daemon.log().contains("event=lease_lost"),
        "{}",
        daemon.log()
    );
    assert_eq!(leases(&daemon).await, (0..2).collect());
    assert!(
        sim.wait_until(|s| attached(s) == 2, Duration::from_secs(5))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_daemon_whose_every_leased_shard_closes_fatally_exits_78() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    // MESSAGE_CONTENT is not enabled for the "app": every IDENTIFY gets 4014.
    let sim = Simulator::start(SimConfig {
        token: TOKEN.to_string(),
        heartbeat_interval_ms: 500,
        shards: 2,
        max_concurrency: 2,
        allowed_privileged: 0,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let (mut daemon, _t) = cluster_daemon(&sim, &redis.url(), "host-a", |_| {});
    assert_eq!(daemon.wait_exit().await, 78, "{}", daemon.log());
    assert!(daemon.log().contains("4014"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_of_many_shards_resumes_them_all_within_the_lease_ttl_and_a_few_seconds() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    // 32 shards over two daemons (16 buckets: two IDENTIFY rounds).
    let sim = simulator(32, 16, 1000).await;
    let mut daemons: Vec<_> = (0..2)
        .map(|i| cluster_daemon(&sim, &redis.url(), &format!("host-{i}"), |_| {}))
        .collect();
    assert!(
        sim.wait_until(|s| attached(s) == 32, Duration::from_secs(40))
            .await,
        "32 shards ready"
    );
    let held = leases(&daemons[0].0).await;
    assert!(!held.is_empty(), "both daemons hold shards");
    // Sessions go to Redis as they start: wait until Redis holds each
    // shard's live session (a fixed pause lost the race on a loaded machine).
    sessions_in_redis(&sim, &redis.url(), 32).await;
    let conns_before = sim.connections().len();
    let killed_at = tokio::time::Instant::now();
    daemons[0].0.child.kill().expect("kill -9");
    let _ = daemons[0].0.child.wait();
    let resumed = |s: &Simulator| {
        held.iter().all(|&shard| {
            s.connections()
                .iter()
                .skip(conns_before)
                .any(|c| c.shard == Some(shard as u32) && c.resumed && !c.closed)
        })
    };
    assert!(
        sim.wait_until(resumed, LEASE_TTL + Duration::from_secs(5))
            .await,
        "all {} shards of the killed daemon resumed: {}",
        held.len(),
        daemons[1].0.log()
    );
    eprintln!(
        "failover of {} shards: all resumed {:?} after kill -9 (lease_ttl {LEASE_TTL:?})",
        held.len(),
        killed_at.elapsed()
    );
    assert_eq!(identifies(&sim), 32, "no IDENTIFY");
    assert_eq!(leases(&daemons[1].0).await, (0..32).collect());
}
