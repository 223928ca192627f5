//! The JetStream sink and NATS commands (DESIGN §4) against a real
//! `nats-server -js` on loopback: every event once after deduplication, with
//! its headers; nothing lost across a NATS restart or a daemon crash; a
//! worker's command answered by the owning daemon only.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::daemon::*;
use common::servers::Nats;
use futures::StreamExt;
use serde_json::{Value, json};
use shardwarden::simulator::Simulator;

const STREAM: &str = "swtest";

fn with_broker(nats: &Nats) -> impl FnOnce(&mut toml::Table) + use<> {
    let url = nats.url();
    move |t: &mut toml::Table| {
        let mut broker = toml::Table::new();
        broker.insert("nats".into(), url.into());
        broker.insert("stream".into(), STREAM.into());
        t.insert("broker".into(), broker.into());
    }
}

/// Every event in the stream so far: `n` → (subject, headers, body), each
/// `n` seen how many times.
async fn stream_contents(js: &jetstream::Context) -> (BTreeMap<u64, Value>, BTreeMap<u64, usize>) {
    let stream = js.get_stream(STREAM).await.expect("stream exists");
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("{STREAM}.events.>"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(10_000)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let mut by_n = BTreeMap::new();
    let mut counts = BTreeMap::new();
    while let Some(Ok(message)) = messages.next().await {
        let body: Value = serde_json::from_slice(&message.payload).expect("json body");
        let Some(n) = body["n"].as_u64() else {
            continue;
        };
        let headers = message.headers.clone().unwrap_or_default();
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        *counts.entry(n).or_insert(0) += 1;
        by_n.insert(
            n,
            json!({
                "subject": message.subject.as_str(),
                "shard": header("Shardwarden-Shard"),
                "seq": header("Shardwarden-Seq"),
                "id": header("Nats-Msg-Id"),
                "body": body,
            }),
        );
    }
    (by_n, counts)
}

async fn wait_stream(js: &jetstream::Context, n: u64) -> BTreeMap<u64, usize> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, counts) = stream_contents(js).await;
        if (0..n).all(|i| counts.contains_key(&i)) {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream has {:?} of 0..{n}",
            counts.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn both_ready(sim: &Simulator) {
    wait_sim(sim, "both shards ready", |s| {
        s.sessions().iter().filter(|s| s.attached.is_some()).count() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_jetstream_once_each_with_their_headers() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let (sim, _daemon, _tmp) = start_with(shards(2), "", with_broker(&nats)).await;
    both_ready(&sim).await;
    for n in 0..20u64 {
        sim.dispatch(
            (n % 2) as u32,
            "MESSAGE_CREATE",
            json!({"n": n, "text": "héllo"}),
        );
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client);
    let counts = wait_stream(&js, 20).await;
    assert!(counts.values().all(|&c| c == 1), "once each: {counts:?}");
    let (events, _) = stream_contents(&js).await;
    let sessions: BTreeMap<u32, String> = sim
        .sessions()
        .into_iter()
        .map(|s| (s.shard[0], s.session_id))
        .collect();
    for (n, e) in &events {
        let shard = (n % 2) as u32;
        assert_eq!(
            e["subject"],
            format!("{STREAM}.events.{shard}.MESSAGE_CREATE")
        );
        assert_eq!(e["shard"], shard.to_string());
        assert_eq!(e["body"], json!({"n": n, "text": "héllo"}), "the body is d");
        assert_eq!(
            e["id"].as_str().unwrap(),
            format!("{}:{}", sessions[&shard], e["seq"].as_str().unwrap()),
            "Nats-Msg-Id = session:seq"
        );
    }
    let stream = js.get_stream(STREAM).await.expect("stream");
    let subjects = stream.cached_info().config.subjects.clone();
    assert_eq!(
        subjects,
        vec![format!("{STREAM}.events.>"), format!("{STREAM}.sessions.>")],
        "never the command subject"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_and_a_daemon_crash_lose_nothing_and_duplicate_nothing() {
    let Some(mut nats) = Nats::start().await else {
        return;
    };
    let (sim, mut daemon, _tmp) = start_with(shards(2), "", with_broker(&nats)).await;
    both_ready(&sim).await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client);
    for n in 0..10u64 {
        sim.dispatch((n % 2) as u32, "MESSAGE_CREATE", json!({"n": n}));
    }
    wait_stream(&js, 10).await;

    // NATS goes away; events keep coming; NATS comes back with its store.
    nats.down();
    for n in 10..30u64 {
        sim.dispatch((n % 2) as u32, "MESSAGE_CREATE", json!({"n": n}));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.up().await;
    let client = async_nats::connect(nats.url()).await.expect("reconnect");
    let js = jetstream::new(client);
    wait_stream(&js, 30).await;

    // The daemon dies; Discord replays on resume; JetStream drops duplicates.
    for n in 30..40u64 {
        sim.dispatch((n % 2) as u32, "MESSAGE_CREATE", json!({"n": n}));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.child.kill().expect("kill");
    let _ = daemon.child.wait();
    for n in 40..45u64 {
        sim.dispatch((n % 2) as u32, "MESSAGE_CREATE", json!({"n": n}));
    }
    daemon.restart();
    let counts = wait_stream(&js, 45).await;
    assert!(
        counts.values().all(|&c| c == 1),
        "each event once after deduplication: {counts:?}"
    );
    assert_eq!(identifies(&sim), 2, "resumed, not identified");
    let h = {
        let (mut probe, _) = Bot::connect(&daemon.socket(), hello(Value::Null)).await;
        probe.send(json!({"op":"status"})).await;
        probe.next_op("health").await
    };
    assert_eq!(h["broker"]["missed"], 0, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_is_answered_by_the_daemon_that_owns_the_shard() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    // This daemon owns shard 0 of 2 only.
    let (sim, _daemon, _tmp) = start_with(shards(2), "", |t| {
        with_broker(&nats)(t);
        let shards = t["shards"].as_table_mut().expect("[shards]");
        shards.insert("range".into(), "0..1".into());
    })
    .await;
    wait_sim(&sim, "shard 0 ready", |s| {
        s.sessions().iter().any(|s| s.attached.is_some())
    })
    .await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let subject = format!("{STREAM}.commands");
    let presence = json!({"op":"send","id":"w1","shard":0,"payload":{"op":3,"d":{"since":null,"activities":[],"status":"idle","afk":false}}});
    let deadline = tokio::time::Instant::now() + WAIT;
    let reply = loop {
        // The daemon subscribes shortly after start-up.
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.request(subject.clone(), presence.to_string().into()),
        )
        .await
        {
            Ok(Ok(reply)) => break reply,
            _ if tokio::time::Instant::now() < deadline => continue,
            other => panic!("no answer to a command: {other:?}"),
        }
    };
    let answer: Value = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(answer, json!({"op":"sent","id":"w1","shard":0}));
    wait_sim(&sim, "op 3 on shard 0", |s| {
        s.frames()
            .iter()
            .any(|f| f.op == 3 && f.shard == Some(0) && f.json["d"]["status"] == "idle")
    })
    .await;
    // Shard 1 is another daemon's: this one stays silent.
    let other = json!({"op":"send","id":"w2","shard":1,"payload":{"op":3,"d":{"since":null,"activities":[],"status":"dnd","afk":false}}});
    let silent = tokio::time::timeout(
        Duration::from_secs(1),
        client.request(subject.clone(), other.to_string().into()),
    )
    .await;
    assert!(
        !matches!(silent, Ok(Ok(_))),
        "a daemon that does not own the shard must not answer: {silent:?}"
    );
    // A shard past the total cannot be anyone's: refused, not left hanging.
    let nowhere = json!({"op":"send","id":"w3","shard":7,"payload":{"op":3,"d":{"since":null,"activities":[],"status":"dnd","afk":false}}});
    let refused = client
        .request(subject.clone(), nowhere.to_string().into())
        .await
        .expect("answered");
    let refused: Value = serde_json::from_slice(&refused.payload).expect("json");
    assert_eq!(refused["code"], "shard_not_owned", "{refused}");
    // A malformed command is refused with the reason.
    let bad = client
        .request(subject, "{\"op\":\"send\"}".into())
        .await
        .expect("answered");
    let bad: Value = serde_json::from_slice(&bad.payload).expect("json");
    assert_eq!(bad["code"], "bad_request", "{bad}");
}

/// The venv `tests/dropin/setup.sh` (run by `.ci/run`) makes, with nats-py.
fn worker_python() -> Option<std::path::PathBuf> {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dropin/.venv/bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import nats"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "nats-py missing under CI: tests/dropin/setup.sh installs it"
    );
    eprintln!("SKIPPED: no venv with nats-py (run tests/dropin/setup.sh)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_worker_consumes_durably_and_sends_a_command() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let Some(python) = worker_python() else {
        return;
    };
    let (sim, _daemon, _tmp) = start_with(shards(2), "", with_broker(&nats)).await;
    both_ready(&sim).await;
    for n in 0..6u64 {
        sim.dispatch((n % 2) as u32, "MESSAGE_CREATE", json!({"n": n}));
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    wait_stream(&jetstream::new(client), 6).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/worker.py");
    let run = |count: &str, command: Option<Value>| {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&script)
            .args(["--nats", &nats.url(), "--stream", STREAM, "--durable", "w"])
            .args([
                "--events",
                "*.MESSAGE_CREATE",
                "--count",
                count,
                "--idle-exit",
                "10",
            ]);
        if let Some(c) = command {
            cmd.args(["--command", &c.to_string()]);
        }
        cmd.output().expect("run worker")
    };
    let lines = |out: &std::process::Output| -> Vec<Value> {
        assert!(
            out.status.success(),
            "worker failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let command = json!({"op":"send","id":"py","shard":1,"payload":{"op":3,"d":{"since":null,"activities":[],"status":"online","afk":false}}});
    let first = lines(&run("4", Some(command)));
    assert_eq!(first[0]["answer"], json!({"op":"sent","id":"py","shard":1}));
    let ns = |ls: &[Value]| -> Vec<u64> {
        ls.iter()
            .filter(|l| l["kind"] == "event")
            .map(|l| l["d"]["n"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ns(&first).len(), 4, "{first:?}");
    // A restarted worker goes on after what it acked.
    let second = lines(&run("2", None));
    let mut all = ns(&first);
    all.extend(ns(&second));
    all.sort_unstable();
    assert_eq!(
        all,
        (0..6).collect::<Vec<_>>(),
        "each event once across restarts"
    );
}
