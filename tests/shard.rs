//! One shard actor against the simulator over real loopback sockets:
//! identify, heartbeat, every resume path, re-identify paths and fatal closes,
//! asserting what went over the wire.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shardwarden::compression::Compression;
use shardwarden::shard::{ResumeState, ShardExit};
use shardwarden::simulator::{Fault, SimConfig, Simulator};

#[tokio::test]
async fn identifies_with_token_intents_shard_and_properties() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    let identify = &h.frames(2)[0];
    assert_eq!(identify.json["d"]["token"], TOKEN);
    assert_eq!(identify.json["d"]["intents"], INTENTS);
    assert_eq!(identify.json["d"]["shard"], json!([0, 1]));
    assert_eq!(identify.json["d"]["properties"]["browser"], "shardwarden");
    let conn = &h.sim.connections()[0];
    assert_eq!(conn.query, "v=10&encoding=json&compress=zlib-stream");
    // READY and the GUILD_CREATE burst reach the event log with raw `d`.
    h.wait("GUILD_CREATEs", |_| true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut out = Vec::new();
    h.hub.log.read_after(0, u128::MAX, usize::MAX, &mut out);
    let lines: Vec<serde_json::Value> = out
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines[0]["t"], "READY");
    assert_eq!(lines.iter().filter(|l| l["t"] == "GUILD_CREATE").count(), 2);
    assert!(matches!(h.stop().await, ShardExit::Shutdown(Some(_))));
}

#[tokio::test]
async fn the_websocket_upgrade_carries_the_rest_user_agent() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    let conn = &h.sim.connections()[0];
    assert_eq!(
        conn.user_agent.as_deref(),
        Some(shardwarden::rest::USER_AGENT),
        "same string as REST"
    );
    assert!(shardwarden::rest::USER_AGENT.starts_with("DiscordBot ("));
    assert!(shardwarden::rest::USER_AGENT.ends_with(concat!(", ", env!("CARGO_PKG_VERSION"), ")")));
    assert!(matches!(h.stop().await, ShardExit::Shutdown(Some(_))));
}

#[tokio::test]
async fn heartbeats_carry_last_seq_and_answer_op1_at_once() {
    let mut h = start_shard(sim_config(), Compression::ZstdStream, INTENTS, None).await;
    h.ready().await;
    h.wait("two heartbeats", |s| count_ops(&s.frames(), 1) >= 2)
        .await;
    let seq = h.hub.shards[0]
        .seq
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(seq >= 3, "READY + 2 GUILD_CREATE");
    let last = h.frames(1).last().cloned().expect("heartbeat");
    assert_eq!(last.json["d"], seq);
    let before = h.frames(1).len();
    let asked_at = std::time::Instant::now();
    h.sim.inject(0, Fault::RequestHeartbeat);
    h.wait("requested heartbeat", |s| {
        count_ops(&s.frames(), 1) > before
    })
    .await;
    let answer = h.frames(1).into_iter().nth(before).expect("answer");
    assert!(
        answer.at.duration_since(asked_at) < Duration::from_millis(300),
        "op 1 answered at once, not at the next beat"
    );
    h.stop().await;
}

#[tokio::test]
async fn every_compression_mode_reaches_ready() {
    for compression in [
        Compression::None,
        Compression::ZlibStream,
        Compression::ZstdStream,
    ] {
        let mut h = start_shard(sim_config(), compression, INTENTS, None).await;
        h.ready().await;
        h.sim
            .dispatch(0, "MESSAGE_CREATE", json!({"content": "x".repeat(5000)}));
        h.wait("message", |_| true).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.hub.log.head() < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{compression:?}: message not logged"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            h.sim.connections()[0]
                .query
                .contains("compress=zlib-stream"),
            compression == Compression::ZlibStream
        );
        h.stop().await;
    }
}

/// A fault that must end in a RESUME on the resume URL with the last seq.
async fn assert_resumes_after(fault: Fault) {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    // A 1 MiB message limit so the oversized case stays cheap.
    let mut h = start_shard_with(sim, Compression::ZlibStream, INTENTS, None, |c| {
        c.max_message_size = 1 << 20
    })
    .await;
    h.ready().await;
    h.wait("GUILD_CREATEs seen", |_| true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session_id = h.sim.sessions()[0].session_id.clone();
    let seq_before = h.hub.shards[0]
        .seq
        .load(std::sync::atomic::Ordering::Relaxed);
    h.sim.inject(0, fault.clone());
    h.wait_report("resumed").await;
    let resumes = h.frames(6);
    assert_eq!(resumes.len(), 1, "{fault:?}: one RESUME");
    assert_eq!(resumes[0].json["d"]["session_id"], session_id.as_str());
    assert_eq!(resumes[0].json["d"]["seq"], seq_before);
    assert_eq!(resumes[0].json["d"]["token"], TOKEN);
    assert_eq!(h.frames(2).len(), 1, "{fault:?}: no second IDENTIFY");
    let conns = h.sim.connections();
    let resume_conn = conns
        .iter()
        .find(|c| c.conn == resumes[0].conn)
        .expect("resume connection");
    assert_eq!(
        resume_conn.path, "/resume",
        "{fault:?}: resumed on resume_gateway_url"
    );
    assert_eq!(resume_conn.query, "v=10&encoding=json&compress=zlib-stream");
    // The dead connection was not closed with 1000/1001 (that would kill the session).
    assert!(
        !matches!(conns[0].close_code_received, Some(1000 | 1001)),
        "{fault:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn zombie_connection_is_dropped_and_resumed() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    h.sim.inject(0, Fault::StopAcking);
    let zombie = h.wait_report("zombie").await;
    assert_eq!(zombie.class, Some("transport"));
    h.wait_report("resumed").await;
    assert_eq!(h.frames(6).len(), 1);
    assert_eq!(
        h.sim.connections()[0].close_code_received,
        Some(4900),
        "zombie closed with a resumable code"
    );
    assert_eq!(
        h.hub.shards[0]
            .zombies
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    h.stop().await;
}

#[tokio::test]
async fn op7_resumes() {
    assert_resumes_after(Fault::Reconnect).await;
}

#[tokio::test]
async fn op9_true_resumes() {
    assert_resumes_after(Fault::InvalidSession { resumable: true }).await;
}

#[tokio::test]
async fn resumable_close_codes_resume() {
    for code in [4000, 4001, 4002, 4008] {
        assert_resumes_after(Fault::Close(code)).await;
    }
}

#[tokio::test]
async fn transport_faults_resume() {
    assert_resumes_after(Fault::DropTcp).await;
    assert_resumes_after(Fault::MalformedJson).await;
    assert_resumes_after(Fault::CorruptFrame).await;
}

#[tokio::test]
async fn oversized_frame_resumes_then_gives_up_the_session_if_replayed() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let mut h = start_shard_with(sim, Compression::ZlibStream, INTENTS, None, |c| {
        c.max_message_size = 1 << 20
    })
    .await;
    h.ready().await;
    h.sim.inject(0, Fault::Oversized(2 << 20));
    let closed = h.wait_report("closed").await;
    assert_eq!(closed.class, Some("transport"));
    assert!(closed.detail.unwrap_or_default().contains("limit"));
    // The oversized dispatch is replayed on every resume; after three
    // strikes the shard starts a new session instead of looping.
    h.ready().await;
    assert!(h.frames(6).len() >= 2, "resumed first");
    assert_eq!(h.frames(2).len(), 2, "then identified once more");
    h.stop().await;
}

#[tokio::test]
async fn resume_replays_events_missed_while_disconnected() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    h.sim.inject(0, Fault::StopAcking);
    h.wait_report("zombie").await;
    // Discord keeps sequencing for the detached session; RESUME replays it.
    for i in 0..5 {
        h.sim.dispatch(0, "MESSAGE_CREATE", json!({"n": i}));
    }
    h.wait_report("resumed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut out = Vec::new();
    h.hub.log.read_after(0, u128::MAX, usize::MAX, &mut out);
    let seqs: Vec<u64> = out
        .iter()
        .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap())
        .filter(|l| l["t"] != "RESUMED")
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every seq once, in order");
    assert_eq!(seqs.len(), 3 + 5);
    h.stop().await;
}

#[tokio::test]
async fn op9_false_reidentifies_on_main_url_never_resumes() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    h.sim.inject(0, Fault::InvalidSession { resumable: false });
    let report = h.wait_report("invalidated").await;
    assert_eq!(report.class, Some("reidentify"));
    h.ready().await;
    assert_eq!(h.frames(6).len(), 0, "never a RESUME after op 9 false");
    assert_eq!(h.frames(2).len(), 2);
    let conns = h.sim.connections();
    let second = conns
        .iter()
        .find(|c| c.conn == h.frames(2)[1].conn)
        .expect("conn");
    assert_eq!(second.path, "/", "re-identify uses the main gateway URL");
    h.stop().await;
}

#[tokio::test]
async fn a_reidentify_names_the_identify_queue_wait_it_will_really_take() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    h.sim.inject(0, Fault::Close(4007));
    let closed = h.wait_report("closed").await;
    let reported_at = std::time::Instant::now();
    let detail = closed.detail.clone().unwrap_or_default();
    // The IDENTIFY that started this session went out moments ago, so the
    // bucket's 5 s, not the 20 ms backoff, decide when the next one goes.
    assert!(!detail.contains("resum"), "{detail}");
    assert!(
        detail.contains("then its turn in the identify queue"),
        "{detail}"
    );
    let ms: u64 = detail
        .split("identifying in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a wait in ms");
    assert!((4000..=5100).contains(&ms), "{detail}");
    h.wait("the second IDENTIFY", |s| count_ops(&s.frames(), 2) == 2)
        .await;
    let took = reported_at.elapsed().as_millis() as u64;
    assert!(took + 150 >= ms, "named {ms} ms, took {took} ms");
    h.stop().await;
}

#[tokio::test]
async fn reidentify_close_codes_start_a_new_session() {
    for code in [4003, 4007, 4009] {
        let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
        h.ready().await;
        h.sim.inject(0, Fault::Close(code));
        let closed = h.wait_report("closed").await;
        assert_eq!(
            (closed.close_code, closed.class),
            (Some(code), Some("reidentify"))
        );
        h.ready().await;
        assert_eq!(h.frames(6).len(), 0, "{code}: no RESUME");
        assert_eq!(h.frames(2).len(), 2, "{code}: a new IDENTIFY");
        h.stop().await;
    }
}

#[tokio::test]
async fn fatal_close_codes_stop_the_shard() {
    for code in [4004, 4010, 4011, 4012, 4013, 4014] {
        let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
        h.ready().await;
        h.sim.inject(0, Fault::Close(code));
        let fatal = h.wait_report("fatal").await;
        assert_eq!((fatal.close_code, fatal.class), (Some(code), Some("fatal")));
        let exit = tokio::time::timeout(WAIT, h.task)
            .await
            .expect("stops")
            .expect("no panic");
        assert!(matches!(exit, ShardExit::Fatal { close_code: Some(c), .. } if c == code));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.sim.connections().len(), 1, "{code}: never reconnects");
    }
}

#[tokio::test]
async fn disallowed_privileged_intent_names_the_intent_and_the_fix() {
    let cfg = SimConfig {
        allowed_privileged: 0,
        ..sim_config()
    };
    let mut h = start_shard(cfg, Compression::ZlibStream, INTENTS, None).await;
    let fatal = h.wait_report("fatal").await;
    assert_eq!(fatal.close_code, Some(4014));
    let detail = fatal.detail.expect("detail");
    assert!(detail.contains("MESSAGE_CONTENT"), "{detail}");
    assert!(detail.contains("Developer Portal"), "{detail}");
}

#[tokio::test]
async fn persisted_session_is_resumed_not_identified() {
    // A first shard identifies and stops, as the daemon does on SIGTERM.
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    let sim = h.sim.clone();
    let ShardExit::Shutdown(Some(resume)) = h.stop().await else {
        panic!("resumable shutdown")
    };
    assert!(
        sim.wait_until(
            |s| s.connections()[0].close_code_received == Some(4900),
            WAIT
        )
        .await,
        "shutdown closes with a resumable code, not 1000/1001"
    );
    let mut h2 = start_shard_on(
        sim.clone(),
        Compression::ZlibStream,
        INTENTS,
        Some(resume.clone()),
    )
    .await;
    h2.wait_report("resumed").await;
    assert_eq!(count_ops(&sim.frames(), 2), 1, "no second IDENTIFY");
    let resume_frame = sim
        .frames()
        .into_iter()
        .find(|f| f.op == 6)
        .expect("RESUME");
    assert_eq!(
        resume_frame.json["d"]["session_id"],
        resume.session_id.as_str()
    );
    assert_eq!(resume_frame.json["d"]["seq"], resume.seq);
    h2.stop().await;
}

#[tokio::test]
async fn expired_persisted_session_falls_back_to_identify() {
    let sim = shardwarden::simulator::Simulator::start(sim_config())
        .await
        .expect("sim");
    let stale = ResumeState {
        session_id: "gone".into(),
        resume_url: sim.resume_url(),
        seq: 10,
    };
    let mut h = start_shard_on(sim, Compression::ZlibStream, INTENTS, Some(stale)).await;
    h.ready().await;
    assert_eq!(h.frames(6).len(), 1, "tried the resume once");
    assert_eq!(h.frames(2).len(), 1, "then identified");
    h.stop().await;
}

#[tokio::test]
async fn unreachable_resume_url_ends_in_identify_on_main_url() {
    let sim = shardwarden::simulator::Simulator::start(sim_config())
        .await
        .expect("sim");
    // A resume URL nothing listens on: after a few failed connects the
    // session is given up and the shard identifies on the main URL (facts
    // §4.5), never sending RESUME anywhere else.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("ws://{}/resume", dead.local_addr().expect("addr"));
    drop(dead);
    let session = ResumeState {
        session_id: "whatever".into(),
        resume_url: dead_url,
        seq: 3,
    };
    let mut h = start_shard_on(sim, Compression::ZlibStream, INTENTS, Some(session)).await;
    let invalidated = h.wait_report("invalidated").await;
    assert!(
        invalidated
            .detail
            .unwrap_or_default()
            .contains("refused 3 connects")
    );
    h.ready().await;
    assert_eq!(h.frames(6).len(), 0, "no RESUME on the main URL");
    let identify = h.frames(2);
    assert_eq!(identify.len(), 1);
    let conn = h
        .sim
        .connections()
        .into_iter()
        .find(|c| c.conn == identify[0].conn)
        .expect("conn");
    assert_eq!(conn.path, "/");
    h.stop().await;
}

#[tokio::test]
async fn bot_commands_get_the_full_send_budget() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    let mut replies = Vec::new();
    for i in 0..100 {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let payload =
            json!({"op": 43, "d": {"guild_id": i.to_string(), "fields": ["status"]}}).to_string();
        h.commands
            .send(shardwarden::hub::OutboundCommand { payload, reply })
            .await
            .expect("send");
        replies.push(rx);
    }
    for rx in replies {
        let answer = tokio::time::timeout(Duration::from_secs(3), rx)
            .await
            .expect("sent within seconds, not held for the next window");
        assert_eq!(answer.expect("reply"), Ok(()));
    }
    h.wait("100 commands", |s| count_ops(&s.frames(), 43) == 100)
        .await;
    assert_eq!(
        h.sim.connections().len(),
        1,
        "under Discord's limit: no 4008"
    );
    h.stop().await;
}

#[tokio::test]
async fn bot_command_goes_out_on_the_shard() {
    let mut h = start_shard(sim_config(), Compression::ZlibStream, INTENTS, None).await;
    h.ready().await;
    let (reply, rx) = tokio::sync::oneshot::channel();
    let payload =
        json!({"op": 3, "d": {"since": null, "activities": [], "status": "idle", "afk": false}})
            .to_string();
    h.commands
        .send(shardwarden::hub::OutboundCommand { payload, reply })
        .await
        .expect("send");
    assert_eq!(
        tokio::time::timeout(WAIT, rx)
            .await
            .expect("answered")
            .expect("reply"),
        Ok(())
    );
    h.wait("presence update", |s| count_ops(&s.frames(), 3) == 1)
        .await;
    assert_eq!(h.frames(3)[0].json["d"]["status"], "idle");
    h.stop().await;
}

#[tokio::test]
async fn dead_gateway_is_retried_with_backoff_not_a_spin() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("ws://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let mut h = start_shard_with(sim, Compression::ZlibStream, INTENTS, None, |c| {
        c.gateway_url = dead_url;
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(400);
    })
    .await;
    let start = std::time::Instant::now();
    let mut failures = 0;
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(100), h.reports.recv()).await
            && r.event == "closed"
        {
            assert_eq!(r.class, Some("transport"));
            failures += 1;
        }
    }
    // 50, 100, 200, 400, 400… ms (+ jitter): about 6–12 attempts in 3 s.
    assert!(
        (3..=20).contains(&failures),
        "{failures} connect attempts in 3 s"
    );
    h.stop().await;
}
