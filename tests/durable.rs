//! Durable state end to end (the daemon binary against the simulator): a
//! restart costs no IDENTIFY and loses no acknowledged event, whatever the
//! order of SIGTERMs and SIGKILLs, however fast each bot acks, and whatever
//! the state directory does. After every restart: no cursor reused, every
//! event after each bot's last ack delivered at least once, a RESUME (not an
//! IDENTIFY) while the saved session is fresh, no bucket's IDENTIFYs closer
//! than 5 s.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use common::daemon::*;
use serde_json::{Value, json};
use shardwarden::simulator::{SimConfig, Simulator};

fn state(daemon: &Daemon) -> Option<Value> {
    std::fs::read(daemon.dir.join("state/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn sessions_saved(daemon: &Daemon) -> Option<usize> {
    state(daemon).and_then(|s| s["sessions"].as_array().map(Vec::len))
}

fn sigkill(daemon: &mut Daemon) {
    daemon.child.kill().expect("kill");
    let _ = daemon.child.wait();
}

fn resumes(sim: &Simulator) -> usize {
    sim.frames().iter().filter(|f| f.op == 6).count()
}

fn named(client: &str, resume_from: Value) -> Value {
    json!({"op":"hello","v":1,"client":client,"events":["MESSAGE_CREATE"],"diagnostics":false,"resume_from":resume_from})
}

/// Wait until the state file says `what`.
async fn wait_state(daemon: &Daemon, what: &str, f: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if state(daemon).as_ref().is_some_and(&f) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state file never showed {what}: {:?}\nlog:\n{}",
            state(daemon),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `health` message, asked over the socket.
async fn health(daemon: &Daemon) -> Value {
    let (mut probe, _) = Bot::connect(&daemon.socket(), hello(Value::Null)).await;
    probe.send(json!({"op":"status"})).await;
    probe.next_op("health").await
}

/// What one bot received, checked against the invariants.
#[derive(Default)]
struct Ledger {
    /// cursor → (shard, seq, n): a cursor never names two events.
    by_cursor: HashMap<u64, (u64, u64, u64)>,
    /// Every `n` received.
    seen: BTreeSet<u64>,
    /// The last cursor acknowledged.
    acked: u64,
    /// The highest cursor ever received.
    highest: u64,
}

impl Ledger {
    fn record(&mut self, event: &Value) {
        let cursor = event["cursor"].as_u64().expect("cursor");
        let key = (
            event["shard"].as_u64().expect("shard"),
            event["seq"].as_u64().expect("seq"),
            event["d"]["n"].as_u64().expect("n"),
        );
        if let Some(before) = self.by_cursor.insert(cursor, key) {
            assert_eq!(before, key, "cursor {cursor} was handed out twice");
        }
        self.seen.insert(key.2);
        self.highest = self.highest.max(cursor);
    }

    /// Read until every `n` below `upto` has been seen, acking as it goes.
    async fn catch_up(&mut self, bot: &mut Bot, upto: u64) {
        while (0..upto).any(|n| !self.seen.contains(&n)) {
            let missing: Vec<u64> = (0..upto).filter(|n| !self.seen.contains(n)).collect();
            let line = tokio::time::timeout(WAIT, bot.lines.next_line()).await;
            let Ok(Ok(Some(line))) = line else {
                panic!("events {missing:?} never arrived (acked {})", self.acked);
            };
            let v: Value = serde_json::from_str(&line).expect("json");
            match v["op"].as_str() {
                Some("dispatch") => {
                    self.record(&v);
                    let cursor = v["cursor"].as_u64().expect("cursor");
                    bot.send(json!({"op":"ack","cursor":cursor})).await;
                    self.acked = cursor;
                }
                Some("gap") => panic!("nothing may be lost: {v}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resumed_at_start_up_survive_a_crash_after_a_restart() {
    let (sim, mut daemon, _tmp) = start(shards(2), "").await;
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello(json!(0))).await;
    bot.dispatches(6).await;
    drop(bot);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0, "log:\n{}", daemon.log());
    assert_eq!(sessions_saved(&daemon), Some(2));

    daemon.restart();
    wait_sim(&sim, "two RESUMEs", |s| resumes(s) == 2).await;
    // The periodic save must keep both sessions, from its first write on.
    for _ in 0..20 {
        assert_eq!(
            sessions_saved(&daemon),
            Some(2),
            "the state file lost the resumed sessions; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigkill(&mut daemon);
    daemon.restart();
    wait_sim(&sim, "two more RESUMEs", |s| resumes(s) == 4).await;
    assert_eq!(identifies(&sim), 2, "no IDENTIFY after the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_during_a_steady_stream_resumes_and_loses_nothing() {
    let (sim, mut daemon, _tmp) = start(shards(2), "").await;
    wait_sim(&sim, "both shards ready", |s| {
        s.sessions().iter().filter(|s| s.attached.is_some()).count() == 2
    })
    .await;
    let mut ledger = Ledger::default();
    let mut sent = 0u64;
    let mut resume_from = json!(null);
    // Pseudo-random kill points, the same on every run.
    let mut rng = 0x2545_f491_u64;
    for round in 0..6 {
        let (mut bot, welcome) =
            Bot::connect(&daemon.socket(), named("steady", resume_from.clone())).await;
        assert_eq!(
            welcome["missed"], 0,
            "round {round}: nothing was lost, so nothing is missed: {welcome}"
        );
        for _ in 0..30 {
            sim.dispatch((sent % 2) as u32, "MESSAGE_CREATE", json!({"n": sent}));
            sent += 1;
        }
        ledger.catch_up(&mut bot, sent).await;
        if round == 0 {
            // The first ack must be on disk before a crash can honour it.
            wait_state(&daemon, "the first ack", |s| {
                s["clients"]["steady"]["acked"].as_u64() == Some(ledger.acked)
            })
            .await;
        }
        // More events the bot receives but has not acked when the daemon dies.
        for _ in 0..10 {
            sim.dispatch((sent % 2) as u32, "MESSAGE_CREATE", json!({"n": sent}));
            sent += 1;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 1500)).await;
        sigkill(&mut daemon);
        // Events while the daemon is down: Discord keeps them for the resume.
        for _ in 0..5 {
            sim.dispatch((sent % 2) as u32, "MESSAGE_CREATE", json!({"n": sent}));
            sent += 1;
        }
        resume_from = json!(ledger.acked);
        daemon.restart();
        wait_sim(&sim, "every shard resumed", |s| {
            resumes(s) == 2 * (round + 1)
        })
        .await;
    }
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), named("steady", resume_from)).await;
    assert_eq!(welcome["missed"], 0, "{welcome}");
    ledger.catch_up(&mut bot, sent).await;
    assert_eq!(identifies(&sim), 2, "every restart resumed");
    assert_eq!(ledger.seen.len() as u64, sent, "every event delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_bot_gets_everything_after_its_own_ack_when_a_fast_one_acked_further() {
    let (sim, mut daemon, _tmp) = start(shards(1), "").await;
    let (mut fast, _) = Bot::connect(&daemon.socket(), named("fast", json!(null))).await;
    let (mut slow, _) = Bot::connect(&daemon.socket(), named("slow", json!(null))).await;
    for n in 0..40 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    let fast_events = fast.dispatches(40).await;
    let slow_events = slow.dispatches(40).await;
    let fast_ack = fast_events[39]["cursor"].as_u64().unwrap();
    let slow_ack = slow_events[9]["cursor"].as_u64().unwrap();
    fast.send(json!({"op":"ack","cursor":fast_ack})).await;
    slow.send(json!({"op":"ack","cursor":slow_ack})).await;
    wait_state(&daemon, "both acks", |s| {
        s["clients"]["fast"]["acked"].as_u64() == Some(fast_ack)
            && s["clients"]["slow"]["acked"].as_u64() == Some(slow_ack)
    })
    .await;
    let h = health(&daemon).await;
    let clients = h["clients"].as_array().expect("clients in health");
    let slow_view = clients
        .iter()
        .find(|c| c["client"] == "slow")
        .expect("slow listed");
    assert_eq!(slow_view["acked"], slow_ack);
    assert_eq!(slow_view["lag"], h["head"].as_u64().unwrap() - slow_ack);
    drop((fast, slow));

    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0, "log:\n{}", daemon.log());
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| resumes(s) == 1).await;
    let resume = sim.frames().into_iter().find(|f| f.op == 6).unwrap();
    assert_eq!(
        resume.json["d"]["seq"], slow_events[9]["seq"],
        "resumed from the slowest ack, not the fastest"
    );
    let (mut slow, welcome) = Bot::connect(&daemon.socket(), named("slow", json!(slow_ack))).await;
    assert_eq!(welcome["missed"], 0, "{welcome}");
    let again = slow.dispatches(30).await;
    let ns: Vec<u64> = again
        .iter()
        .map(|e| e["d"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns,
        (10..40).collect::<Vec<_>>(),
        "every event after its ack"
    );
    assert!(
        again
            .iter()
            .all(|e| e["cursor"].as_u64().unwrap() > fast_ack),
        "redelivered under new cursors"
    );
    let (_fast, welcome) = Bot::connect(&daemon.socket(), named("fast", json!(fast_ack))).await;
    assert_eq!(welcome["missed"], 0, "{welcome}");
    assert_eq!(identifies(&sim), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_client_stops_holding_the_point_after_consumer_ttl() {
    let (sim, mut daemon, _tmp) = start_with(shards(1), "", |t| {
        let bot = t["bot"].as_table_mut().expect("[bot]");
        bot.insert("consumer_ttl".into(), "2s".into());
    })
    .await;
    let (mut fast, _) = Bot::connect(&daemon.socket(), named("fast", json!(null))).await;
    let (mut gone, _) = Bot::connect(&daemon.socket(), named("gone", json!(null))).await;
    for n in 0..10 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    let events = fast.dispatches(10).await;
    gone.dispatches(1).await;
    gone.send(json!({"op":"ack","cursor":events[0]["cursor"]}))
        .await;
    fast.send(json!({"op":"ack","cursor":events[9]["cursor"]}))
        .await;
    wait_state(&daemon, "gone's ack", |s| {
        s["clients"]["gone"]["acked"] == events[0]["cursor"]
    })
    .await;
    drop(gone);
    wait_state(&daemon, "gone forgotten after consumer_ttl", |s| {
        s["clients"].get("gone").is_none()
    })
    .await;
    drop(fast);
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0);
    assert!(
        daemon.log().contains("consumer_expired"),
        "the log says so:\n{}",
        daemon.log()
    );
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| resumes(s) == 1).await;
    let resume = sim.frames().into_iter().find(|f| f.op == 6).unwrap();
    assert_eq!(resume.json["d"]["seq"], events[9]["seq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_counts_only_events_that_existed_and_are_gone() {
    let (sim, mut daemon, _tmp) = start(shards(1), "").await;
    let (mut acking, _) = Bot::connect(&daemon.socket(), named("acking", json!(null))).await;
    for n in 0..5 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    let first = acking.dispatches(5).await;
    let behind = first[4]["cursor"].as_u64().unwrap();
    // Thirty more that the acking bot finishes; a bot that stopped at
    // `behind` (and does not ack) will never get them back.
    for n in 5..35 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    let rest = acking.dispatches(30).await;
    let last = rest[29]["cursor"].as_u64().unwrap();
    acking.send(json!({"op":"ack","cursor":last})).await;
    wait_state(&daemon, "the ack", |s| {
        s["clients"]["acking"]["acked"].as_u64() == Some(last)
    })
    .await;
    drop(acking);

    // A clean restart and then a crash: the cursor lease jumps by a million.
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0);
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| resumes(s) == 1).await;
    let (_probe, w) = Bot::connect(&daemon.socket(), named("acking", json!(last))).await;
    assert_eq!(w["missed"], 0, "clean restart: {w}");
    assert_eq!(w["oldest"], Value::Null, "nothing held yet: {w}");
    drop(_probe);
    wait_state(&daemon, "a save of the new life", |s| s["clean"] == false).await;
    sigkill(&mut daemon);
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| resumes(s) == 2).await;
    sim.dispatch(0, "MESSAGE_CREATE", json!({"n": 35}));

    let (mut acking, w) = Bot::connect(&daemon.socket(), named("acking", json!(last))).await;
    assert_eq!(w["missed"], 0, "after a crash: {w}");
    assert_eq!(acking.dispatches(1).await[0]["d"]["n"], 35);
    // The bot that stopped at `behind` lost exactly the thirty events.
    let (mut old, w) = Bot::connect(
        &daemon.socket(),
        json!({"op":"hello","v":1,"events":["MESSAGE_CREATE"],"resume_from":behind}),
    )
    .await;
    assert_eq!(w["missed"], 30, "{w}");
    let gap = old.next_op("gap").await;
    assert_eq!(gap["missed"], 30, "{gap}");
    assert_eq!(gap["from"], behind + 1);
    assert_eq!(old.dispatches(1).await[0]["d"]["n"], 35);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_spacing_holds_across_a_restart() {
    // Two shards in one bucket: the second IDENTIFY is due 5 s after the first.
    let (sim, mut daemon, _tmp) = start(shards(2), "").await;
    wait_sim(&sim, "the first IDENTIFY", |s| identifies(s) == 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.sigterm();
    assert_eq!(daemon.wait_exit().await, 0, "log:\n{}", daemon.log());
    daemon.restart();
    wait_sim(&sim, "the second IDENTIFY", |s| identifies(s) == 2).await;
    let at: Vec<_> = sim
        .frames()
        .into_iter()
        .filter(|f| f.op == 2)
        .map(|f| f.at)
        .collect();
    let apart = at[1].duration_since(at[0]);
    assert!(
        apart >= Duration::from_secs(5),
        "IDENTIFYs {apart:?} apart across a restart; log:\n{}",
        daemon.log()
    );
    wait_sim(&sim, "shard 0 resumed", |s| resumes(s) == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(identifies(&sim), 2, "no op 9 and no third IDENTIFY");
}

/// A mount for the state directory, undone on drop; `None` (with the reason
/// printed) where this test cannot mount.
struct Mount(std::path::PathBuf);

impl Mount {
    fn run(args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("mount")
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let target = dir.to_str().expect("utf-8 path");
        match Self::run(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            target,
        ]) {
            Ok(()) => Some(Mount(dir.to_path_buf())),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs ({e}); run as root to test a full state directory"
                );
                None
            }
        }
    }

    fn read_only(dir: &Path) -> Option<Mount> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let target = dir.to_str().expect("utf-8 path");
        let done = Self::run(&["--bind", target, target]).and_then(|()| {
            Self::run(&["-o", "remount,ro,bind", target]).inspect_err(|_| {
                let _ = std::process::Command::new("umount").arg(target).status();
            })
        });
        match done {
            Ok(()) => Some(Mount(dir.to_path_buf())),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot make a read-only bind mount ({e}); run as root to test a read-only state directory"
                );
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_refuses_to_start() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        ..shards(1)
    })
    .await
    .expect("simulator");
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(_mount) = Mount::read_only(&tmp.path().join("state")) else {
        return;
    };
    let config = write_config(tmp.path(), &sim, "");
    let mut daemon = Daemon {
        child: spawn(tmp.path(), &config, TOKEN),
        dir: tmp.path().to_path_buf(),
        config,
    };
    assert_eq!(daemon.wait_exit().await, 78, "log:\n{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("Refusing to start") && log.contains("state"),
        "says why and what to fix:\n{log}"
    );
    assert_eq!(sim.connections().len(), 0, "no shard connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_is_an_error_exit_and_never_reuses_cursors() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        heartbeat_interval_ms: 500,
        ..shards(1)
    })
    .await
    .expect("simulator");
    let tmp = tempfile::tempdir().expect("tempdir");
    let state_dir = tmp.path().join("state");
    let Some(_mount) = Mount::tmpfs(&state_dir, "256k") else {
        return;
    };
    let config = write_config(tmp.path(), &sim, "");
    let mut daemon = Daemon {
        child: spawn(tmp.path(), &config, TOKEN),
        dir: tmp.path().to_path_buf(),
        config,
    };
    let mut ledger = Ledger::default();
    let (mut bot, _) = Bot::connect(&daemon.socket(), named("b", json!(null))).await;
    for n in 0..10 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    ledger.catch_up(&mut bot, 10).await;
    wait_state(&daemon, "the ack", |s| {
        s["clients"]["b"]["acked"].as_u64() == Some(ledger.acked)
    })
    .await;
    // Fill the disk.
    let filler = state_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|()| f.flush()).is_ok() {}
        let _ = f.sync_all();
    }
    for n in 10..20 {
        sim.dispatch(0, "MESSAGE_CREATE", json!({"n": n}));
    }
    ledger.catch_up(&mut bot, 20).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !daemon.log().contains("state_unwritable") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leftovers: Vec<_> = std::fs::read_dir(&state_dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    drop(bot);
    daemon.sigterm();
    let code = daemon.wait_exit().await;
    let log = daemon.log();
    assert_ne!(
        code, 0,
        "a failed save at shutdown is an error exit:\n{log}"
    );
    assert!(
        log.contains("cannot save state") && !log.contains("will identify again"),
        "says what the next start does:\n{log}"
    );

    // Space again: the next start resumes from the last state written and
    // hands out no cursor twice.
    std::fs::remove_file(&filler).expect("free space");
    daemon.restart();
    wait_sim(&sim, "RESUME", |s| resumes(s) == 1).await;
    assert_eq!(identifies(&sim), 1);
    let before = ledger.highest;
    let (mut bot, welcome) = Bot::connect(&daemon.socket(), named("b", json!(ledger.acked))).await;
    assert_eq!(welcome["missed"], 0, "{welcome}");
    sim.dispatch(0, "MESSAGE_CREATE", json!({"n": 20}));
    // What was not acked durably comes again, then the new event; every
    // cursor is new.
    loop {
        let event = bot.dispatches(1).await.remove(0);
        assert!(event["cursor"].as_u64().unwrap() > before, "{event}");
        ledger.record(&event);
        if event["d"]["n"] == 20 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_state_file_stops_start_up_with_a_clear_error() {
    let sim = Simulator::start(SimConfig {
        token: TOKEN.into(),
        ..shards(1)
    })
    .await
    .expect("simulator");
    let tmp = tempfile::tempdir().expect("tempdir");
    let state_dir = tmp.path().join("state");
    std::fs::create_dir_all(&state_dir).expect("mkdir");
    let fifo = std::ffi::CString::new(state_dir.join("state.json").as_os_str().as_encoded_bytes())
        .expect("path");
    // SAFETY: mkfifo(3) on a NUL-terminated path in our own directory.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let config = write_config(tmp.path(), &sim, "");
    let mut daemon = Daemon {
        child: spawn(tmp.path(), &config, TOKEN),
        dir: tmp.path().to_path_buf(),
        config,
    };
    assert_eq!(daemon.wait_exit().await, 78, "log:\n{}", daemon.log());
    assert!(
        daemon.log().contains("not a regular file"),
        "log:\n{}",
        daemon.log()
    );
}
