//! The release-shaped daemon (the `shardwarden` binary) against the
//! simulator, with bots on the real Unix socket: restarts on either side,
//! replay and gaps, SIGTERM → RESUME, exit codes, `status`, `check-config`
//! and the example clients.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::*;
use common::servers::{free_port, http_get};
use serde_json::{Value, json};
use shardwarden::simulator::{Fault, SimConfig, Simulator};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_reconnect_with_resume_from_gets_every_missed_event_once_in_order() {
    let (sim, daemon, _tmp) = start(shards(2), "").await;
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    assert_eq!(welcome["v"], 1);
    assert_eq!(welcome["shard_total"], 2);
    assert_eq!(welcome["shards"], json!([0, 1]));
    // READY + 2 GUILD_CREATE per shard.
    let first = bot.dispatches(6).await;
    assert_eq!(cursors(&first), vec![1, 2, 3, 4, 5, 6]);
    let last = 6;
    drop(bot);
    for i in 0..50 {
        sim.dispatch(i % 2, "MESSAGE_CREATE", json!({"n": i}));
    }
    // Wait until the daemon has logged them (head = 56).
    let (mut probe, w) = Bot::connect(&daemon.socket(), hello(Value::Null)).await;
    let mut head = w["head"].as_u64().unwrap_or(0);
    while head < 56 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        probe.send(json!({"op":"status"})).await;
        head = probe.next_op("health").await["head"].as_u64().unwrap_or(0);
    }
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), hello(json!(last))).await;
    assert_eq!(welcome["missed"], 0);
    let missed = bot.dispatches(50).await;
    assert_eq!(
        cursors(&missed),
        (7..=56).collect::<Vec<u64>>(),
        "once each, in order"
    );
    let per_shard: Vec<Vec<u64>> = (0..2)
        .map(|s| {
            missed
                .iter()
                .filter(|e| e["shard"] == s)
                .map(|e| e["seq"].as_u64().unwrap())
                .collect()
        })
        .collect();
    for seqs in per_shard {
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "seq contiguous per shard: {seqs:?}"
        );
    }
    // Then live.
    sim.dispatch(0, "MESSAGE_CREATE", json!({"live": true}));
    let live = bot.dispatches(1).await;
    assert_eq!(live[0]["cursor"], 57);
    assert_eq!(
        live[0]["d"],
        json!({"live": true}),
        "d is exactly what Discord sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_reports_exactly_what_fell_out_of_the_ring() {
    let (sim, daemon, _tmp) = start(shards(1), "small_ring").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(3).await;
    drop(bot);
    sim.inject(
        0,
        Fault::Burst {
            count: 300,
            size: 1000,
        },
    );
    let (mut probe, _) = Bot::connect(&daemon.socket(), hello(Value::Null)).await;
    loop {
        probe.send(json!({"op":"status"})).await;
        if probe.next_op("health").await["head"].as_u64().unwrap_or(0) >= 303 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), hello(json!(3))).await;
    let oldest = welcome["oldest"].as_u64().expect("oldest");
    assert!(oldest > 4, "a 64 KiB ring cannot hold 300 KB");
    assert_eq!(welcome["missed"], oldest - 4);
    let gap = bot.next_op("gap").await;
    assert_eq!(
        (gap["from"].as_u64(), gap["to"].as_u64()),
        (Some(4), Some(oldest - 1))
    );
    assert_eq!(gap["missed"], oldest - 4);
    let first = bot.dispatches(1).await;
    assert_eq!(
        first[0]["cursor"], oldest,
        "goes on from the oldest held event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_resumes_the_same_sessions_with_continuing_cursors() {
    let (sim, mut daemon, _tmp) = start(shards(2), "").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    let first = bot.dispatches(6).await;
    for i in 0..4 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"before": i}));
    }
    let more = bot.dispatches(4).await;
    // The bot finished with everything but the last two events.
    let acked = more[1]["cursor"].as_u64().unwrap();
    bot.send(json!({"op":"ack","cursor":acked})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sessions_before: Vec<String> = sim
        .sessions()
        .iter()
        .map(|s| s.session_id.clone())
        .collect();
    assert_eq!(identifies(&sim), 2);

    daemon.sigterm();
    assert_eq!(
        daemon.wait_exit().await,
        0,
        "clean shutdown exits 0; log:\n{}",
        daemon.log()
    );
    let closes: Vec<Option<u16>> = sim
        .connections()
        .iter()
        .map(|c| c.close_code_received)
        .collect();
    assert!(
        closes.iter().all(|c| !matches!(c, Some(1000 | 1001))),
        "sessions kept resumable: {closes:?}"
    );
    let state: Value = serde_json::from_slice(
        &std::fs::read(daemon.dir.join("state/state.json")).expect("state saved"),
    )
    .expect("json");
    assert_eq!(state["sessions"].as_array().map(Vec::len), Some(2));

    daemon.restart();
    wait_sim(&sim, "two RESUMEs", |s| {
        s.frames().iter().filter(|f| f.op == 6).count() == 2
    })
    .await;
    let resumes: Vec<Value> = sim
        .frames()
        .into_iter()
        .filter(|f| f.op == 6)
        .map(|f| f.json)
        .collect();
    for r in &resumes {
        assert!(
            sessions_before
                .iter()
                .any(|s| r["d"]["session_id"] == s.as_str()),
            "same session: {r}"
        );
    }
    assert_eq!(identifies(&sim), 2, "no new IDENTIFY after a restart");
    // Shard 0 resumes from the acknowledged point, so the two unacknowledged
    // events come again (at-least-once), with new, continuing cursors.
    let shard0 = resumes
        .iter()
        .find(|r| r["d"]["seq"].as_u64() == more[1]["seq"].as_u64());
    assert!(
        shard0.is_some(),
        "shard 0 resumed from the acked seq {}: {resumes:?}",
        more[1]["seq"]
    );
    let last_cursor = more[3]["cursor"].as_u64().unwrap();
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), hello(json!(last_cursor))).await;
    assert!(welcome["head"].as_u64().unwrap() >= last_cursor);
    let again = bot.dispatches(2).await;
    assert!(
        cursors(&again).iter().all(|&c| c > last_cursor),
        "cursors continue, never reused"
    );
    assert_eq!(again[0]["seq"], more[2]["seq"]);
    assert_eq!(again[1]["seq"], more[3]["seq"]);
    assert_eq!(again[0]["d"], more[2]["d"]);
    let _ = first;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bot_never_stalls_shards_or_other_bots() {
    let (sim, daemon, _tmp) = start(shards(1), "").await;
    // A bot that subscribes and never reads.
    let stuck = UnixStream::connect_with_retry(&daemon.socket()).await;
    let (_stuck_read, mut stuck_write) = stuck.into_split();
    stuck_write
        .write_all(b"{\"op\":\"hello\",\"v\":1,\"client\":\"stuck\",\"events\":[\"*\"],\"diagnostics\":true,\"resume_from\":0}\n")
        .await
        .expect("hello");
    let (mut reader, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    reader.dispatches(3).await;
    let beats_before = sim.frames().iter().filter(|f| f.op == 1).count();
    sim.inject(
        0,
        Fault::Burst {
            count: 5000,
            size: 1000,
        },
    );
    let got = reader.dispatches(5000).await;
    assert_eq!(got.last().unwrap()["cursor"], 5003);
    // Heartbeats kept flowing and no zombie was declared.
    wait_sim(&sim, "more heartbeats", |s| {
        s.frames().iter().filter(|f| f.op == 1).count() >= beats_before + 2
    })
    .await;
    assert_eq!(sim.connections().len(), 1, "the shard never reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_exits_78_without_printing_it() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let tmp = tempfile::tempdir().expect("tmp");
    let config = write_config(tmp.path(), &sim, "");
    let wrong = "wrong-token-secret-9999";
    let mut daemon = Daemon {
        child: spawn(tmp.path(), &config, wrong),
        dir: tmp.path().into(),
        config,
    };
    assert_eq!(daemon.wait_exit().await, 78);
    let log = daemon.log();
    assert!(log.contains("401"), "{log}");
    assert!(log.contains("9999"), "fingerprint named: {log}");
    assert!(!log.contains(wrong), "the token never appears: {log}");
    assert_eq!(identifies(&sim), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_fatally_closed_exits_78() {
    let (sim, mut daemon, _tmp) = start(
        SimConfig {
            shards: 2,
            allowed_privileged: 0,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    assert_eq!(daemon.wait_exit().await, 78);
    let log = daemon.log();
    assert!(log.contains("4014"), "{log}");
    assert!(log.contains("MESSAGE_CONTENT"), "{log}");
    assert!(!log.contains(TOKEN));
    // Fatal closes never loop.
    assert_eq!(identifies(&sim), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_budget_at_the_reserve_reports_fatal_instead_of_identifying() {
    let (sim, daemon, _tmp) = start(
        SimConfig {
            shards: 1,
            session_start_remaining: 25,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    let (mut bot, _) = Bot::connect(
        &daemon.socket(),
        json!({"op":"hello","v":1,"client":"diag","events":["*"],"diagnostics":true,"resume_from":null}),
    )
    .await;
    let fatal = loop {
        let v = bot.next_op("session").await;
        if v["event"] == "fatal" {
            break v;
        }
    };
    assert!(
        fatal["detail"]
            .as_str()
            .unwrap()
            .contains("identify_reserve = 25"),
        "{fatal}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(identifies(&sim), 0, "never spends the reserve");
    assert!(daemon.log().contains("identify budget"));
    // The shard has never been closed: the log spells that as status does.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log().contains("shard_unhealthy") {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("shard_unhealthy"))
        .expect("line");
    assert!(line.contains("last_close=-"), "{line}");
    assert!(!line.contains("last_close=0"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_queued_at_start_up_are_starting_not_unhealthy() {
    // One bucket: IDENTIFYs 5 s apart, so shard 1 waits its turn through
    // a few 1 s summaries. Nothing has failed: no WARN for it.
    let (sim, daemon, _tmp) = start(
        SimConfig {
            shards: 2,
            max_concurrency: 1,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    wait_sim(&sim, "shard 0 identified", |s| !s.sessions().is_empty()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log().contains("event=shards_starting") {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_sim(&sim, "both shards identified", |s| s.sessions().len() == 2).await;
    let log = daemon.log();
    // The first summary may come while shard 0 is still starting too.
    let starting: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=shards_starting"))
        .collect();
    assert!(
        starting.iter().all(|l| l.contains("INFO"))
            && starting
                .iter()
                .any(|l| l.contains("shards=[1]") || l.contains("shards=[0, 1]")),
        "{starting:?}"
    );
    assert!(
        !log.contains("shard_unhealthy"),
        "a queued shard is not unhealthy:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_in_different_buckets_share_the_last_start_above_the_reserve() {
    // One start above identify_reserve = 25, two shards in two buckets:
    // exactly one may identify.
    let (sim, daemon, _tmp) = start(
        SimConfig {
            shards: 2,
            max_concurrency: 2,
            session_start_remaining: 26,
            ..SimConfig::default()
        },
        "",
    )
    .await;
    let (mut bot, _) = Bot::connect(
        &daemon.socket(),
        json!({"op":"hello","v":1,"client":"diag","events":["*"],"diagnostics":true,"resume_from":null}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fatal report; identifies: {}",
            identifies(&sim)
        );
        let v = bot.next_op("session").await;
        if v["event"] == "fatal" {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(identifies(&sim), 1, "the reserve is never spent");
    assert_eq!(sim.config().session_start_remaining, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_and_exits_by_health() {
    let (_sim, daemon, _tmp) = start(shards(2), "").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(6).await;
    let out = tokio::task::spawn_blocking({
        let socket = daemon.socket();
        move || {
            Command::new(BIN)
                .arg("status")
                .arg("--socket")
                .arg(socket)
                .output()
                .expect("status")
        }
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("2/2 shards active"), "{text}");
    assert!(
        text.contains("; 1 bot(s) connected"),
        "status does not count itself: {text}"
    );
    assert!(
        !text.contains("shardwarden-status"),
        "nor lists itself as a client: {text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("active")).count(),
        3,
        "{text}"
    );
    let json_out = Command::new(BIN)
        .arg("status")
        .arg("--json")
        .arg("--socket")
        .arg(daemon.socket())
        .output()
        .expect("status --json");
    let health: Value = serde_json::from_slice(&json_out.stdout).expect("json");
    assert_eq!(health["op"], "health");
    assert_eq!(health["bot_clients"], 1);
    let missing = Command::new(BIN)
        .args(["status", "--socket", "/nonexistent/bot.sock"])
        .output()
        .expect("status");
    assert_ne!(missing.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot connect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_clients_receive_and_ack() {
    let (_sim, daemon, _tmp) = start(shards(2), "").await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let clients: Vec<(&str, PathBuf)> = vec![
        ("python3", root.join("examples/python/bot.py")),
        ("node", root.join("examples/node/bot.js")),
    ];
    for (interpreter, script) in clients {
        if Command::new(interpreter).arg("--version").output().is_err() {
            panic!("{interpreter} is needed for the example-client tests (.ci/run installs it)");
        }
        let cursor_file = daemon.dir.join(format!("{interpreter}.cursor"));
        let run = |cursor_file: &Path, max_events: &str| {
            Command::new(interpreter)
                .arg(&script)
                .arg(daemon.socket())
                .arg("--cursor-file")
                .arg(cursor_file)
                .args(["--ack-every", "2", "--max-events", max_events])
                .output()
                .expect("run example client")
        };
        let out = tokio::task::block_in_place(|| run(&cursor_file, "4"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{interpreter}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("READY"), "{interpreter}: {stdout}");
        let saved: u64 = std::fs::read_to_string(&cursor_file)
            .expect("cursor saved")
            .trim()
            .parse()
            .expect("number");
        assert_eq!(
            saved, 4,
            "{interpreter}: acked and saved the last handled cursor"
        );
        // A second run resumes after the saved cursor (2 events are left).
        let out = tokio::task::block_in_place(|| run(&cursor_file, "2"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{interpreter} second run: {stdout}");
        let first_line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .unwrap_or("");
        assert!(
            first_line.trim_start().starts_with('5'),
            "{interpreter} resumed at cursor 5: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_clients_reconnect_quietly_after_a_clean_daemon_restart() {
    let (sim, mut daemon, _tmp) = start(shards(2), "").await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let clients: Vec<(&str, PathBuf)> = vec![
        ("python3", root.join("examples/python/bot.py")),
        ("node", root.join("examples/node/bot.js")),
    ];
    let mut children = Vec::new();
    for (interpreter, script) in &clients {
        let cursor_file = daemon.dir.join(format!("{interpreter}-restart.cursor"));
        let child = Command::new(interpreter)
            .arg(script)
            .arg(daemon.socket())
            .arg("--cursor-file")
            .arg(&cursor_file)
            .args(["--ack-every", "1", "--max-events", "8"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run example client");
        children.push((interpreter, cursor_file, child));
    }
    // Both have handled the 6 start-up events (READY and GUILD_CREATEs).
    let deadline = tokio::time::Instant::now() + WAIT;
    for (interpreter, cursor_file, _) in &children {
        while std::fs::read_to_string(cursor_file)
            .ok()
            .as_deref()
            .map(str::trim)
            != Some("6")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{interpreter} did not reach cursor 6"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0);
    daemon.restart();
    // New events once the daemon is back, until both clients have had 8.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    while children
        .iter_mut()
        .any(|(_, _, c)| c.try_wait().expect("wait").is_none())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients did not finish; log:\n{}",
            daemon.log()
        );
        if sim
            .connections()
            .iter()
            .filter(|c| !c.closed && c.resumed)
            .count()
            == 2
        {
            n += 1;
            sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (interpreter, _, child) in children {
        let out = child.wait_with_output().expect("output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{interpreter}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("daemon closing (shutdown): reconnecting"),
            "{interpreter}: {stdout}"
        );
        assert!(
            !stderr.contains("closed the connection"),
            "{interpreter}: {stderr}"
        );
        // Cursors go on after the restart (right after the last one used,
        // since the stop was clean): any cursor past the six start-up
        // events counts.
        assert!(
            stdout.lines().any(|l| {
                l.ends_with(" 0 MESSAGE_CREATE")
                    && l.split(' ')
                        .next()
                        .and_then(|c| c.parse::<u64>().ok())
                        .is_some_and(|c| c > 6)
            }),
            "{interpreter} went on after the restart: {stdout}"
        );
    }
}

/// Write `text` as `dir/name.toml` and run `check-config` on it.
fn check_config(dir: &Path, name: &str, text: &str) -> std::process::Output {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write");
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config")
}

#[test]
fn check_config_prints_the_plan_or_names_the_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = check_config(
        tmp.path(),
        "good",
        "[discord]\ntoken_env = \"X\"\nintents = [\"GUILDS\", \"GUILD_MESSAGES\", \"GUILD_PRESENCES\"]\nevents = [\"GUILD_CREATE\", \"MESSAGE_CREATE\"]\n[shards]\ntotal = 8\nrange = \"0..4\"\n[bot]\nsocket = \"/tmp/x.sock\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("{}", 1 | (1 << 9) | (1 << 8))),
        "intents bitmask: {text}"
    );
    assert!(text.contains("/tmp/x.sock"), "{text}");
    assert!(text.contains("0..4"), "{text}");
    assert!(
        text.contains("warning") && text.contains("GUILD_PRESENCES"),
        "unneeded intent warned: {text}"
    );
    assert!(text.contains("privileged"), "{text}");

    let out = check_config(
        tmp.path(),
        "bad",
        "[discord]\ntoken_env = \"X\"\nintents = [\"GUILDS\"]\nevents = [\"GUILD_MEMBER_ADD\", \"MESAGE_CREATE\"]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("GUILD_MEMBER_ADD") && err.contains("GUILD_MEMBERS"),
        "{err}"
    );
    assert!(err.contains("MESSAGE_CREATE"), "suggestion: {err}");

    let out = check_config(tmp.path(), "syntax", "[discord]\ntoken_env = \n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn check_config_accepts_own_member_updates_and_names_what_only_shard_zero_gets() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = check_config(
        tmp.path(),
        "no-shard-zero",
        "[discord]\ntoken_env = \"X\"\nintents = [\"GUILDS\"]\nevents = [\"GUILD_CREATE\", \"GUILD_MEMBER_UPDATE\", \"ENTITLEMENT_CREATE\"]\n[shards]\ntotal = 4\nrange = \"2..4\"\n[bot]\nsocket = \"/tmp/x.sock\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}{err}");
    assert!(
        text.contains("note: GUILD_MEMBER_UPDATE is subscribed without its intent"),
        "{text}"
    );
    assert!(
        text.contains(
            "warning: ENTITLEMENT_CREATE has no guild_id, so Discord sends it only to shard 0"
        ),
        "{text}"
    );
    // The same config owning shard 0 has nothing to warn about.
    let out = check_config(
        tmp.path(),
        "shard-zero",
        "[discord]\ntoken_env = \"X\"\nintents = [\"GUILDS\"]\nevents = [\"GUILD_CREATE\", \"ENTITLEMENT_CREATE\"]\n[shards]\ntotal = 4\nrange = \"0..2\"\n[bot]\nsocket = \"/tmp/x.sock\"\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("shard 0"), "{text}");
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_shards_failing_together_is_an_incident_for_diagnostics_bots_status_and_metrics() {
    let port = free_port();
    let (sim, daemon, _tmp) = start(
        SimConfig {
            shards: 4,
            max_concurrency: 4,
            ..SimConfig::default()
        },
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    )
    .await;
    wait_sim(&sim, "4 sessions", |s| {
        s.connections()
            .iter()
            .filter(|c| c.session_id.is_some())
            .count()
            == 4
    })
    .await;
    let (mut diag, _) = Bot::connect(
        &daemon.socket(),
        json!({"op":"hello","v":1,"client":"diag","events":[],"diagnostics":true,"resume_from":null}),
    )
    .await;
    let (mut plain, _) = Bot::connect(
        &daemon.socket(),
        json!({"op":"hello","v":1,"client":"plain","events":[],"diagnostics":false,"resume_from":null}),
    )
    .await;
    for shard in 0..3 {
        sim.inject(shard, Fault::Close(4000));
    }
    let incident = diag.next_op("incident").await;
    assert_eq!(incident["state"], "suspected", "{incident}");
    assert_eq!(incident["shards"], json!([0, 1, 2]));
    assert!(incident["at"].is_string() && incident["detail"].is_string());
    // Never dressed up as a session event.
    let deadline = tokio::time::Instant::now() + WAIT;
    let recovered = loop {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        let v = diag.next().await;
        assert!(
            !(v["op"] == "session" && v["event"].as_str().unwrap_or("").contains("incident")),
            "{v}"
        );
        if v["op"] == "incident" {
            break v;
        }
    };
    assert_eq!(recovered["state"], "recovered", "{recovered}");
    // Metrics count it; bots without diagnostics never see it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http_get(port, "/metrics");
        if metric(&text, "shardwarden_discord_incidents_total") == Some(1.0)
            && metric(&text, "shardwarden_discord_incident") == Some(0.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    plain.send(json!({"op":"status"})).await;
    let health = plain.next().await;
    assert_eq!(health["op"], "health", "{health}");
    assert!(health["incident"].is_null(), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_and_current() {
    let port = free_port();
    let (sim, daemon, _tmp) =
        start(shards(2), &format!("metrics_listen = \"127.0.0.1:{port}\"")).await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(6).await;
    sim.dispatch(1, "MESSAGE_CREATE", json!({"n": 1}));
    bot.dispatches(1).await;
    // The exporter copies counters once a second.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .expect("join");
        if metric(
            &text,
            "shardwarden_events_total{shard=\"1\",type=\"MESSAGE_CREATE\"}",
        ) == Some(1.0)
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never caught up:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        metric(&text, "shardwarden_shard_active{shard=\"0\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "shardwarden_events_total{shard=\"0\",type=\"GUILD_CREATE\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardwarden_identify_budget_total"),
        Some(1000.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardwarden_identify_budget_remaining"),
        Some(998.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardwarden_bot_clients"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardwarden_shards_active"),
        Some(2.0),
        "{text}"
    );
    assert!(
        text.contains("shardwarden_heartbeat_latency_seconds_bucket"),
        "{text}"
    );
    // A close shows up by class.
    sim.inject(0, Fault::Close(4000));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .expect("join");
        if metric(&text, "shardwarden_reconnects_total{class=\"resumable\"}") == Some(1.0)
            && metric(&text, "shardwarden_resumes_total{shard=\"0\"}") == Some(1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconnect not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_status_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        shards: 2,
        heartbeat_interval_ms: 500,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let tmp = tempfile::tempdir().expect("tmp");
    let config = write_config(tmp.path(), &sim, "");
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let child = spawn_with_env(
        tmp.path(),
        &config,
        TOKEN,
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", "400000".to_string()),
        ],
    );
    let mut daemon = Daemon {
        child,
        dir: tmp.path().into(),
        config,
    };
    // Collect datagrams with the simulator's view of identifies at arrival.
    let mut messages: Vec<(String, usize)> = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + WAIT;
    let recv = |messages: &mut Vec<(String, usize)>, buf: &mut [u8]| {
        if let Ok(n) = notify.recv(buf) {
            messages.push((
                String::from_utf8_lossy(&buf[..n]).to_string(),
                identifies(&sim),
            ));
        }
    };
    while !messages.iter().any(|(m, _)| m.contains("READY=1")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no READY=1: {messages:?}\n{}",
            daemon.log()
        );
        tokio::task::block_in_place(|| recv(&mut messages, &mut buf));
    }
    let (ready, identifies_at_ready) = messages
        .iter()
        .find(|(m, _)| m.contains("READY=1"))
        .cloned()
        .expect("ready");
    assert_eq!(
        identifies_at_ready, 2,
        "READY=1 only after both shards identified (max_concurrency 1: 5 s apart)"
    );
    assert!(ready.contains("STATUS=2/2 shards active"), "{ready}");
    let before_ready: Vec<&String> = messages
        .iter()
        .take_while(|(m, _)| !m.contains("READY=1"))
        .map(|(m, _)| m)
        .collect();
    assert!(
        before_ready.iter().any(|m| m.contains("STATUS=")),
        "status while starting: {before_ready:?}"
    );
    let watchdogs = messages
        .iter()
        .filter(|(m, _)| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        watchdogs >= 10,
        "a WATCHDOG=1 every 200 ms over ~5 s, got {watchdogs}"
    );
    daemon.sigterm();
    let deadline = std::time::Instant::now() + WAIT;
    while !messages.iter().any(|(m, _)| m.contains("STOPPING=1")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no STOPPING=1: {messages:?}"
        );
        tokio::task::block_in_place(|| recv(&mut messages, &mut buf));
    }
    assert_eq!(daemon.wait_exit().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_what_it_can_and_names_what_needs_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let (sim, daemon, _tmp) = start(shards(1), "").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(3).await;
    let text = std::fs::read_to_string(&daemon.config).expect("config");
    let changed = text
        .replace(
            "log_interval = \"1s\"",
            "log_interval = \"2s\"\nlog_level = \"debug\"\n",
        )
        .replace(
            "replay_buffer = \"16MiB\"",
            "replay_buffer = \"16MiB\"\nsocket_mode = \"0600\"",
        )
        .replace(
            "\"MESSAGE_CREATE\"]",
            "\"MESSAGE_CREATE\", \"GUILD_DELETE\"]",
        );
    std::fs::write(&daemon.config, changed).expect("write");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(daemon.child.id() as i32, libc::SIGHUP);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log().contains("config re-read") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload line:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("config re-read"))
        .expect("line");
    assert!(
        line.contains("[health] log_level")
            && line.contains("[bot] socket_mode")
            && line.contains("[health] log_interval"),
        "{line}"
    );
    assert!(line.contains("[discord] events"), "{line}");
    assert!(line.contains("nothing needs a restart"), "{line}");
    let mode = std::fs::metadata(daemon.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A broken config is refused and the daemon keeps running.
    std::fs::write(&daemon.config, "[discord\n").expect("write");
    unsafe {
        libc::kill(daemon.child.id() as i32, libc::SIGHUP);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log().contains("keeping the running one") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad config not reported:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No session was dropped, and the new event is forwarded at once.
    assert_eq!(sim.connections().len(), 1);
    sim.dispatch(0, "GUILD_DELETE", json!({"id": "1", "unavailable": true}));
    sim.dispatch(0, "MESSAGE_CREATE", json!({"after": "reload"}));
    let got = bot.dispatches(2).await;
    assert_eq!(
        got[0]["t"], "GUILD_DELETE",
        "a `*` bot gets events added by a reload"
    );
    assert_eq!(got[1]["d"]["after"], "reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_never_logged_even_at_trace_level() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        heartbeat_interval_ms: 300,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let tmp = tempfile::tempdir().expect("tmp");
    let config = write_config(tmp.path(), &sim, "");
    let child = spawn_with_env(
        tmp.path(),
        &config,
        TOKEN,
        &[("RUST_LOG", "trace".to_string())],
    );
    let mut daemon = Daemon {
        child,
        dir: tmp.path().into(),
        config,
    };
    wait_sim(&sim, "IDENTIFY", |s| s.frames().iter().any(|f| f.op == 2)).await;
    wait_sim(&sim, "heartbeats", |s| {
        s.frames().iter().filter(|f| f.op == 1).count() >= 2
    })
    .await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0);
    let log = daemon.log();
    assert!(log.contains("event=ready"), "the session was logged: {log}");
    assert!(!log.contains(TOKEN), "token leaked into the trace log");
    let bytes: Vec<String> = TOKEN.bytes().map(|b| b.to_string()).collect();
    assert!(
        !log.contains(&bytes.join(", ")),
        "token leaked as a byte list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_discord_is_unreachable_exits_cleanly() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    sim.set_rest_failure(Some(shardwarden::simulator::RestFailure::Status(503, None)));
    let tmp = tempfile::tempdir().expect("tmp");
    let config = write_config(tmp.path(), &sim, "");
    let mut daemon = Daemon {
        child: spawn(tmp.path(), &config, TOKEN),
        dir: tmp.path().into(),
        config,
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.rest_requests() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retries:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0, "{}", daemon.log());
    assert!(
        daemon.log().contains("503"),
        "the failure was logged with its status"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restart_resumes_from_the_acked_point_and_never_reuses_cursors() {
    let (sim, mut daemon, _tmp) = start(shards(1), "").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(3).await;
    for i in 0..4 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": i}));
    }
    let more = bot.dispatches(4).await;
    let acked_seq = more[1]["seq"].as_u64().unwrap();
    bot.send(json!({"op":"ack","cursor":more[1]["cursor"]}))
        .await;
    // The periodic save (every 5 s at least) records the acked point.
    let state_path = daemon.dir.join("state/state.json");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let saved: Option<Value> = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if saved
            .as_ref()
            .and_then(|v| v["sessions"][0]["seq"].as_u64())
            == Some(acked_seq)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state never saved the acked seq: {saved:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A crash: no clean shutdown.
    daemon.child.kill().expect("kill");
    let _ = daemon.child.wait();
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| s.frames().iter().any(|f| f.op == 6)).await;
    let resume = sim
        .frames()
        .into_iter()
        .find(|f| f.op == 6)
        .expect("RESUME");
    assert_eq!(resume.json["d"]["seq"], acked_seq);
    assert_eq!(identifies(&sim), 1, "resumed, not identified");
    let last = more[3]["cursor"].as_u64().unwrap();
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(last))).await;
    let again = bot.dispatches(2).await;
    assert!(
        cursors(&again).iter().all(|&c| c > last),
        "no cursor reused after a crash"
    );
    assert_eq!(again[0]["seq"], more[2]["seq"], "unacked events come again");
}
