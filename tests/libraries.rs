//! Real bot libraries against the simulator: the discord.py and discord.js bots of
//! tests/dropin/ connect straight to the embedded simulator (2 shards) as they would to
//! Discord, and must reach ready with full guild caches, receive messages, send one over
//! REST (which the simulator dispatches back), change presence, get a member chunk and
//! resume after a cut. This proves the simulator is Discord-like enough for the drop-in
//! front-door tests, which run the same bots against the daemon.
//!
//! The libraries are installed by `tests/dropin/setup.sh` (called by `.ci/run`). Without
//! them the tests are skipped with a printed reason, except under `CI`, where their
//! absence fails.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::bots::{Bot, Lib, READY_TIMEOUT, STEP_TIMEOUT, Target, assert_full_cache, bot_or_skip};
use serde_json::json;
use shardwarden::simulator::{Fault, SimConfig, Simulator, world};

const SHARDS: u32 = 2;

fn target(sim: &Simulator) -> Target {
    Target {
        api_base: sim.api_base(),
        gateway: sim.gateway_url(),
        token: sim.config().token,
        shard_count: SHARDS,
    }
}

async fn run_library(lib: Lib) {
    let Some(cmd) = bot_or_skip(lib) else { return };
    let sim = Simulator::start(SimConfig {
        shards: SHARDS,
        guilds_per_shard: 2,
        max_concurrency: 2,
        // Like Discord's and the front door's: no path, the library appends `?v=10…`.
        resume_path: String::new(),
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let mut bot = Bot::spawn(cmd, lib, &target(&sim), &[0, 1], &[]);

    // 1. Ready, with every guild of both shards fully in the library's cache.
    let ready = bot
        .wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready")
        .await;
    let expected: BTreeSet<u64> = (0..SHARDS).flat_map(|s| sim.shard_guilds(s)).collect();
    assert_full_cache(lib, &ready, &expected, SHARDS);

    // One IDENTIFY per shard; every REST call with a library User-Agent and answered 200.
    let identifies: Vec<_> = sim.frames().into_iter().filter(|f| f.op == 2).collect();
    let shards: Vec<u64> = identifies
        .iter()
        .filter_map(|f| f.json["d"]["shard"][0].as_u64())
        .collect();
    assert_eq!(identifies.len(), 2, "{lib:?}: identifies {shards:?}");
    assert_eq!(
        shards.iter().collect::<BTreeSet<_>>(),
        [0, 1].iter().collect(),
        "{lib:?}"
    );
    let calls = sim.rest_calls();
    for c in &calls {
        assert!(
            c.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("DiscordBot (")),
            "{lib:?}: REST call without a library User-Agent: {c:?}"
        );
        assert_eq!(c.status, 200, "{lib:?}: {c:?}");
    }
    let paths: HashSet<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    eprintln!("{lib:?} REST calls up to ready: {paths:?}");
    let queries: Vec<String> = sim.connections().iter().map(|c| c.query.clone()).collect();
    match lib {
        Lib::DiscordPy => {
            // discord.py logs in with these two, and never asks /gateway/bot for a fixed
            // shard count; with zstandard installed it asks for zstd-stream.
            assert!(paths.contains("/api/v10/users/@me"), "{lib:?}: {paths:?}");
            assert!(
                paths.contains("/api/v10/oauth2/applications/@me"),
                "{lib:?}: {paths:?}"
            );
            assert!(
                queries.iter().all(|q| q.contains("compress=zstd-stream")),
                "{lib:?}: {queries:?}"
            );
        }
        Lib::DiscordJs => {
            assert!(paths.contains("/api/v10/gateway/bot"), "{lib:?}: {paths:?}");
        }
    }

    // 2. A member's message on each shard arrives once, with its content.
    let mut posted = Vec::new();
    for shard in 0..SHARDS {
        let guild = sim.shard_guilds(shard)[1];
        let channel = world::text_channel_ids(guild)[1];
        let msg = sim
            .member_message(channel, &format!("hello shard {shard}"))
            .expect("a text channel of the world");
        let id = msg["id"].as_str().unwrap().to_string();
        let ev = bot
            .wait_for("the member's message", STEP_TIMEOUT, |e| {
                e["event"] == "message_create" && e["id"] == id.as_str()
            })
            .await;
        assert_eq!(ev["channel_id"], channel.to_string(), "{lib:?}: {ev}");
        assert_eq!(ev["guild_id"], guild.to_string(), "{lib:?}: {ev}");
        assert_eq!(ev["content"], format!("hello shard {shard}"), "{lib:?}");
        assert_eq!(ev["shard"], shard, "{lib:?}: {ev}");
        posted.push(id);
    }

    // 3. A message sent with the library's REST call: answered, and dispatched back on the
    // shard owning the channel's guild.
    let guild = sim.shard_guilds(1)[0];
    let channel = world::text_channel_ids(guild)[0];
    bot.command(json!({"op": "send", "ref": "s1", "channel_id": channel.to_string(), "content": "sent by the library"}))
        .await;
    let sent = bot
        .wait_for("sent", STEP_TIMEOUT, |e| {
            e["event"] == "sent" && e["ref"] == "s1"
        })
        .await;
    let sent_id = sent["id"].as_str().expect("message id").to_string();
    assert_eq!(sent["channel_id"], channel.to_string(), "{lib:?}: {sent}");
    assert_eq!(sent["content"], "sent by the library", "{lib:?}");
    let post = sim
        .rest_calls()
        .into_iter()
        .find(|c| c.method == "POST")
        .expect("the POST reached the simulator");
    assert_eq!(post.path, format!("/api/v10/channels/{channel}/messages"));
    assert_eq!(post.status, 200);
    assert_eq!(
        post.body.as_ref().unwrap()["content"],
        "sent by the library"
    );
    let echo = bot
        .wait_for("MESSAGE_CREATE of the sent message", STEP_TIMEOUT, |e| {
            e["event"] == "message_create" && e["id"] == sent_id.as_str()
        })
        .await;
    assert_eq!(echo["shard"], 1, "{lib:?}: {echo}");
    assert_eq!(echo["author_id"], shardwarden::simulator::BOT_USER_ID);
    posted.push(sent_id);

    // 4. change_presence reaches the gateway on both shards as op 3.
    bot.command(json!({"op": "change_presence", "ref": "p1", "status": "idle", "activity": "drop-in tests"}))
        .await;
    bot.wait_for("presence_changed", STEP_TIMEOUT, |e| {
        e["event"] == "presence_changed" && e["ref"] == "p1"
    })
    .await;
    let presence_on = |sim: &Simulator| -> BTreeSet<u32> {
        sim.frames()
            .iter()
            .filter(|f| f.op == 3 && f.json["d"]["status"] == "idle")
            .filter(|f| {
                let acts = f.json["d"]["activities"].as_array();
                acts.is_some_and(|a| a.iter().any(|x| x["name"] == "drop-in tests"))
            })
            .filter_map(|f| f.shard)
            .collect()
    };
    let all: BTreeSet<u32> = (0..SHARDS).collect();
    let ok = sim
        .wait_until(|s| presence_on(s) == all, STEP_TIMEOUT)
        .await;
    assert!(ok, "{lib:?}: op 3 seen on shards {:?}", presence_on(&sim));

    // 5. A member request gets its chunk back: every member of the guild.
    let guild = sim.shard_guilds(0)[0];
    bot.command(json!({"op": "request_members", "ref": "m1", "guild_id": guild.to_string()}))
        .await;
    let members = bot
        .wait_for("members", STEP_TIMEOUT, |e| {
            e["event"] == "members" && e["ref"] == "m1"
        })
        .await;
    let want: BTreeSet<String> = world::members(guild)
        .iter()
        .map(|m| m["user"]["id"].as_str().unwrap().to_string())
        .collect();
    let got: BTreeSet<String> = members["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "{lib:?}: {members}");
    let op8 = sim
        .frames()
        .into_iter()
        .find(|f| f.op == 8)
        .expect("op 8 reached the gateway");
    assert_eq!(op8.shard, Some(0), "{lib:?}: op 8 on the guild's shard");

    // 6. The connection of shard 0 is cut while a message is posted: the library resumes
    // on resume_gateway_url (which has no path) and gets the message exactly once.
    assert!(sim.inject(0, Fault::Close(4000)));
    let guild = sim.shard_guilds(0)[1];
    let msg = sim
        .member_message(world::text_channel_ids(guild)[2], "during the cut")
        .expect("channel");
    let cut_id = msg["id"].as_str().unwrap().to_string();
    bot.wait_for("resumed", STEP_TIMEOUT, |e| {
        e["event"] == "resumed" && e["shard"] == 0
    })
    .await;
    if bot.message_count(&cut_id) == 0 {
        bot.wait_for("the message posted during the cut", STEP_TIMEOUT, |e| {
            e["event"] == "message_create" && e["id"] == cut_id.as_str()
        })
        .await;
    }
    let resumed = sim
        .connections()
        .into_iter()
        .filter(|c| c.resumed)
        .collect::<Vec<_>>();
    assert_eq!(resumed.len(), 1, "{lib:?}: {resumed:?}");
    assert_eq!(
        resumed[0].path, "/",
        "{lib:?}: resumed on resume_gateway_url"
    );
    assert!(
        resumed[0].query.contains("v=10"),
        "{lib:?}: {:?}",
        resumed[0]
    );
    assert_eq!(
        sim.frames().iter().filter(|f| f.op == 2).count(),
        2,
        "{lib:?}: no new IDENTIFY for a resume"
    );
    posted.push(cut_id);

    // A last message after the resume, then nothing was delivered twice.
    let channel = world::text_channel_ids(guild)[0];
    let last = sim
        .member_message(channel, "after the resume")
        .expect("channel");
    let last_id = last["id"].as_str().unwrap().to_string();
    bot.wait_for("the message after the resume", STEP_TIMEOUT, |e| {
        e["event"] == "message_create" && e["id"] == last_id.as_str()
    })
    .await;
    posted.push(last_id);
    for id in &posted {
        assert_eq!(
            bot.message_count(id),
            1,
            "{lib:?}: message {id} delivered once"
        );
    }

    // 7. exit: the bot closes and ends with status 0.
    bot.exit().await;
}

/// discord.py where zstandard is not installed asks for zlib-stream; one shard of two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_py_with_zlib_stream_runs_one_shard_of_two() {
    let lib = Lib::DiscordPy;
    let Some(cmd) = bot_or_skip(lib) else { return };
    let sim = Simulator::start(SimConfig {
        shards: SHARDS,
        guilds_per_shard: 3,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let mut bot = Bot::spawn(
        cmd,
        lib,
        &target(&sim),
        &[1],
        &[("SW_COMPRESS", "zlib-stream")],
    );
    let ready = bot
        .wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready")
        .await;
    let ids: BTreeSet<String> = ready["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = sim.shard_guilds(1).iter().map(u64::to_string).collect();
    assert_eq!(ids, want);
    let conns = sim.connections();
    assert_eq!(conns.len(), 1);
    assert!(
        conns[0].query.contains("compress=zlib-stream"),
        "{:?}",
        conns[0]
    );
    let channel = world::text_channel_ids(sim.shard_guilds(1)[2])[0];
    let msg = sim.member_message(channel, "inflated").unwrap();
    let id = msg["id"].as_str().unwrap().to_string();
    let ev = bot
        .wait_for("the message", STEP_TIMEOUT, |e| {
            e["event"] == "message_create" && e["id"] == id.as_str()
        })
        .await;
    assert_eq!(ev["content"], "inflated");
    bot.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_py_against_the_simulator() {
    run_library(Lib::DiscordPy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_js_against_the_simulator() {
    run_library(Lib::DiscordJs).await;
}
