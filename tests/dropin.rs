//! Real, unmodified discord.py and discord.js bots (tests/dropin/) through the daemon's
//! drop-in front door (DESIGN.md §5, issue 10's "Tests with the real libraries"): the
//! daemon binary runs 2 shards on the simulator with `[proxy]` on a free loopback port and
//! `events = ["*"]`; the bots connect to the front door as they would to Discord.
//!
//! 1. both reach ready with every guild of their shards fully cached, and the simulator
//!    saw one IDENTIFY per shard in all;
//! 2. the simulator's messages arrive once each at both;
//! 3. discord.py is killed and restarted: ready again with a full cache, nothing upstream;
//! 4. the bots' connections are cut (`ss -K`) while messages flow: both RESUME and get
//!    every message once, in order;
//! 5. change_presence reaches the simulator on the right shard; member requests get
//!    their chunks;
//! 6. a message sent with the library's REST call reaches the simulator through the front
//!    door and comes back as MESSAGE_CREATE;
//! 7. wrong token, a shard the daemon does not own (4010), intents it does not hold
//!    (4013/4014): what each library reports;
//! 8. both libraries send bursts of messages to two channels at once: each message
//!    reaches the simulator once, and at most one 429 per bucket reaches it.
//!
//! The libraries are installed by `tests/dropin/setup.sh` (`.ci/run` calls it); without
//! them the tests are skipped with a printed reason, except under `CI`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::bots::{
    Bot, Lib, READY_TIMEOUT, STEP_TIMEOUT, Target, assert_full_cache, bot_or_skip, in_ci,
};
use common::daemon::{self, Daemon, TOKEN};
use common::servers::free_port;
use serde_json::{Value, json};
use shardwarden::simulator::{RateLimitCounts, SimConfig, Simulator, world};

const SHARDS: u32 = 2;
/// What the bots ask for by default: GUILDS, GUILD_MEMBERS, GUILD_EXPRESSIONS,
/// GUILD_MESSAGES, MESSAGE_CONTENT (33291).
const DAEMON_INTENTS: [&str; 5] = [
    "GUILDS",
    "GUILD_MEMBERS",
    "GUILD_EXPRESSIONS",
    "GUILD_MESSAGES",
    "MESSAGE_CONTENT",
];
const BOT_INTENTS: u64 = 1 | 1 << 1 | 1 << 3 | 1 << 9 | 1 << 15;

/// The daemon binary on the simulator with the front door on `port`.
struct FrontDoor {
    sim: Simulator,
    daemon: Daemon,
    port: u16,
    _dir: tempfile::TempDir,
}

impl FrontDoor {
    /// `range`: the daemon's `[shards] range` (all shards when `None`). Returns once every
    /// owned shard has its READY and GUILD_CREATEs upstream and the front door listens.
    async fn start(range: Option<&str>) -> FrontDoor {
        FrontDoor::start_on(range, SimConfig::default()).await
    }

    /// As [`FrontDoor::start`], on a simulator with `sim`'s REST limits.
    async fn start_on(range: Option<&str>, sim: SimConfig) -> FrontDoor {
        let port = free_port();
        let (sim, daemon, dir) = daemon::start_with(
            SimConfig {
                shards: SHARDS,
                guilds_per_shard: 2,
                max_concurrency: 2,
                ..sim
            },
            "",
            |t| {
                let discord = t["discord"].as_table_mut().expect("[discord]");
                discord.insert("intents".into(), DAEMON_INTENTS.to_vec().into());
                discord.insert("events".into(), vec!["*"].into());
                if let Some(range) = range {
                    t["shards"]
                        .as_table_mut()
                        .expect("[shards]")
                        .insert("range".into(), range.into());
                }
                let mut proxy = toml::Table::new();
                proxy.insert("listen".into(), format!("127.0.0.1:{port}").into());
                proxy.insert("heartbeat_interval".into(), "5s".into());
                t.insert("proxy".into(), proxy.into());
            },
        )
        .await;
        let owned = if range.is_some() { 1 } else { SHARDS as usize };
        // READY and both GUILD_CREATEs sent on every owned shard: the cache is full.
        let ready = sim
            .wait_until(
                |s| {
                    let sessions = s.sessions();
                    sessions.len() >= owned && sessions.iter().all(|x| x.seq >= 3)
                },
                daemon::WAIT,
            )
            .await;
        assert!(
            ready,
            "the daemon's shards are ready; log:\n{}",
            daemon.log()
        );
        let deadline = tokio::time::Instant::now() + daemon::WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the front door listens on {port}; log:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        FrontDoor {
            sim,
            daemon,
            port,
            _dir: dir,
        }
    }

    fn target(&self) -> Target {
        Target {
            api_base: format!("http://127.0.0.1:{}/api/v10", self.port),
            gateway: format!("ws://127.0.0.1:{}/", self.port),
            token: TOKEN.to_string(),
            shard_count: SHARDS,
        }
    }

    fn spawn(&self, lib: Lib, shards: &[u32], env: &[(&str, &str)]) -> Bot {
        let cmd = bot_or_skip(lib).expect("checked before");
        Bot::spawn(cmd, lib, &self.target(), shards, env)
    }

    /// Upstream frames with this op.
    fn upstream(&self, op: u8) -> usize {
        self.sim.frames().iter().filter(|f| f.op == op).count()
    }

    fn all_guilds(&self) -> BTreeSet<u64> {
        (0..SHARDS).flat_map(|s| self.sim.shard_guilds(s)).collect()
    }
}

/// Both libraries, or `None` after saying why they are skipped (a failure under CI).
fn both_libraries() -> Option<()> {
    bot_or_skip(Lib::DiscordPy)?;
    bot_or_skip(Lib::DiscordJs)?;
    Some(())
}

/// The message's id; waits until `bot` got it.
async fn await_message(bot: &mut Bot, id: &str, what: &str) -> Value {
    if let Some(ev) = bot
        .seen
        .iter()
        .find(|e| e["event"] == "message_create" && e["id"] == id)
    {
        return ev.clone();
    }
    bot.wait_for(what, STEP_TIMEOUT, |e| {
        e["event"] == "message_create" && e["id"] == id
    })
    .await
}

fn id_of(msg: &Value) -> String {
    msg["id"].as_str().expect("message id").to_string()
}

/// Every message in `ids` was seen exactly once by `bot`.
fn assert_once(bot: &Bot, ids: &[String], what: &str) {
    for id in ids {
        assert_eq!(
            bot.message_count(id),
            1,
            "{:?}: {what}: message {id} delivered once",
            bot.lib
        );
    }
}

/// `guild_id` of an upstream op 8, sent as a string or a JSON number.
fn guild_of_frame(f: &Value) -> Option<u64> {
    let g = &f["d"]["guild_id"];
    g.as_u64().or_else(|| g.as_str()?.parse().ok())
}

/// Kills every TCP connection to the front door from the client's side (`ss -K`, as a
/// network failure would: the client gets ECONNABORTED, the daemon an RST). The number
/// of sockets killed, or why it cannot be done here.
fn cut_client_connections(port: u16) -> Result<usize, String> {
    let out = std::process::Command::new("ss")
        .args(["-K", "-H", "-t", "-n", "state", "established"])
        .args(["dst", "127.0.0.1", "dport", "=", &format!(":{port}")])
        .output()
        .map_err(|e| format!("cannot run ss: {e}"))?;
    let killed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    if killed == 0 {
        return Err(format!(
            "ss -K killed nothing (needs root and CONFIG_INET_DIAG_DESTROY): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(killed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_libraries_through_the_front_door() {
    if both_libraries().is_none() {
        return;
    }
    let fd = FrontDoor::start(None).await;
    let sim = &fd.sim;
    let all = fd.all_guilds();

    // 1. Both ready with every guild of both shards fully cached; one IDENTIFY per shard
    // upstream in all.
    let mut py = fd.spawn(Lib::DiscordPy, &[0, 1], &[]);
    let mut js = fd.spawn(Lib::DiscordJs, &[0, 1], &[]);
    let (py_ready, js_ready) = tokio::join!(
        py.wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready"),
        js.wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready"),
    );
    assert_full_cache(Lib::DiscordPy, &py_ready, &all, SHARDS);
    assert_full_cache(Lib::DiscordJs, &js_ready, &all, SHARDS);
    let identified: Vec<u64> = sim
        .frames()
        .iter()
        .filter(|f| f.op == 2)
        .filter_map(|f| f.json["d"]["shard"][0].as_u64())
        .collect();
    assert_eq!(
        identified.iter().copied().collect::<BTreeSet<_>>(),
        [0, 1].into(),
        "one IDENTIFY per shard upstream: {identified:?}"
    );
    assert_eq!(
        identified.len(),
        2,
        "client identifies cost nothing upstream; log:\n{}",
        fd.daemon.log()
    );
    // The libraries' REST calls (not the daemon's own): discord.py logs in with these
    // two, forwarded; discord.js's /gateway/bot is answered by the front door itself.
    let paths: BTreeSet<String> = sim
        .rest_calls()
        .into_iter()
        .filter(|c| {
            !c.user_agent
                .as_deref()
                .is_some_and(|ua| ua.contains("shardwarden"))
        })
        .map(|c| c.path)
        .collect();
    assert!(paths.contains("/api/v10/users/@me"), "{paths:?}");
    assert!(
        paths.contains("/api/v10/oauth2/applications/@me"),
        "{paths:?}"
    );
    assert!(!paths.contains("/api/v10/gateway/bot"), "{paths:?}");

    // 2. A member's message on each shard arrives once at both.
    let mut posted = Vec::new();
    for shard in 0..SHARDS {
        let guild = sim.shard_guilds(shard)[1];
        let channel = world::text_channel_ids(guild)[1];
        let msg = sim
            .member_message(channel, &format!("hello shard {shard}"))
            .expect("a text channel of the world");
        let id = id_of(&msg);
        for bot in [&mut py, &mut js] {
            let ev = await_message(bot, &id, "the member's message").await;
            assert_eq!(ev["channel_id"], channel.to_string(), "{ev}");
            assert_eq!(ev["guild_id"], guild.to_string(), "{ev}");
            assert_eq!(ev["shard"], shard, "{ev}");
            assert_eq!(ev["content"], format!("hello shard {shard}"), "{ev}");
        }
        posted.push(id);
    }

    // 3. discord.py killed (SIGKILL, no close frame) and started again: ready with a full
    // cache, and still no new IDENTIFY or RESUME upstream.
    assert_once(&py, &posted, "before the restart");
    py.child.kill().await.expect("kill discord.py");
    // Started again as where zstandard is not installed: zlib-stream from here on (the
    // first run used zstd-stream).
    let mut py = fd.spawn(Lib::DiscordPy, &[0, 1], &[("SW_COMPRESS", "zlib-stream")]);
    let py_ready = py
        .wait_for("ready after the restart", READY_TIMEOUT, |e| {
            e["event"] == "ready"
        })
        .await;
    assert_full_cache(Lib::DiscordPy, &py_ready, &all, SHARDS);
    assert_eq!(fd.upstream(2), 2, "no IDENTIFY upstream for the restart");
    assert_eq!(fd.upstream(6), 0, "no RESUME upstream for the restart");
    let mut posted = Vec::new();
    let guild = sim.shard_guilds(0)[0];
    let msg = sim
        .member_message(world::text_channel_ids(guild)[0], "after the restart")
        .expect("channel");
    let id = id_of(&msg);
    for bot in [&mut py, &mut js] {
        await_message(bot, &id, "the message after the restart").await;
    }
    posted.push(id);

    // 4. Every connection of both bots cut while messages flow on both shards: each
    // shard of each library RESUMEs and gets every message once, in order. A burst right
    // after the cut lands while the libraries reconnect, so RESUME has to replay it.
    let channels: Vec<u64> = (0..SHARDS)
        .map(|s| world::text_channel_ids(sim.shard_guilds(s)[1])[2])
        .collect();
    let mut flow: Vec<Vec<String>> = vec![Vec::new(); SHARDS as usize];
    let mut after_cut = BTreeSet::new();
    let mut cut = None;
    for i in 0..40 {
        if i == 12 {
            cut = Some(cut_client_connections(fd.port));
        }
        let shard = i % SHARDS as usize;
        let msg = sim
            .member_message(channels[shard], &format!("flow {i}"))
            .expect("channel");
        flow[shard].push(id_of(&msg));
        if i >= 12 {
            after_cut.insert(id_of(&msg));
        }
        if !(12..20).contains(&i) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let cut = match cut.expect("cut attempted") {
        Ok(killed) => {
            assert!(killed >= 4, "both bots' gateway connections cut: {killed}");
            true
        }
        Err(why) if in_ci() => panic!("cannot cut connections under CI: {why}"),
        Err(why) => {
            eprintln!("not cutting connections (step 4 only sends messages): {why}");
            false
        }
    };
    for bot in [&mut py, &mut js] {
        if cut {
            for shard in 0..SHARDS {
                if !bot
                    .seen
                    .iter()
                    .any(|e| e["event"] == "resumed" && e["shard"] == shard)
                {
                    bot.wait_for("resumed after the cut", STEP_TIMEOUT, |e| {
                        e["event"] == "resumed" && e["shard"] == shard
                    })
                    .await;
                }
            }
        }
        for (shard, ids) in flow.iter().enumerate() {
            await_message(bot, ids.last().unwrap(), "the last message of the flow").await;
            let set: BTreeSet<&String> = ids.iter().collect();
            let got: Vec<String> = bot
                .message_ids()
                .into_iter()
                .filter(|id| set.contains(id))
                .collect();
            assert_eq!(
                &got, ids,
                "{:?}: shard {shard}: every message once, in order",
                bot.lib
            );
        }
        if cut {
            // Posted after the cut and handed over before RESUMED: replayed from the ring.
            let mut resumed = BTreeSet::new();
            let mut replayed = 0;
            for e in &bot.seen {
                if e["event"] == "resumed" {
                    resumed.insert(e["shard"].as_u64());
                } else if e["event"] == "message_create"
                    && !resumed.contains(&e["shard"].as_u64())
                    && e["id"].as_str().is_some_and(|id| after_cut.contains(id))
                {
                    replayed += 1;
                }
            }
            eprintln!("{:?}: {replayed} messages replayed on RESUME", bot.lib);
            assert!(
                replayed > 0,
                "{:?}: nothing was replayed on RESUME",
                bot.lib
            );
        }
    }
    assert_eq!(fd.upstream(2), 2, "no IDENTIFY upstream for the cut");
    assert_eq!(fd.upstream(6), 0, "no RESUME upstream for the cut");
    posted.extend(flow.into_iter().flatten());

    // 5. change_presence: one op 3 on each upstream shard per library (a command on a
    // library's shard-0 connection goes to shard 0). Member requests get their chunks.
    py.command(
        json!({"op": "change_presence", "ref": "p1", "status": "idle", "activity": "py presence"}),
    )
    .await;
    js.command(
        json!({"op": "change_presence", "ref": "p2", "status": "dnd", "activity": "js presence"}),
    )
    .await;
    let presence_shards = |sim: &Simulator, status: &str, name: &str| -> Vec<u32> {
        let mut shards: Vec<u32> = sim
            .frames()
            .iter()
            .filter(|f| f.op == 3 && f.json["d"]["status"] == status)
            .filter(|f| {
                let acts = f.json["d"]["activities"].as_array();
                acts.is_some_and(|a| a.iter().any(|x| x["name"] == name))
            })
            .filter_map(|f| f.shard)
            .collect();
        shards.sort();
        shards
    };
    for (status, name) in [("idle", "py presence"), ("dnd", "js presence")] {
        let reached = sim
            .wait_until(
                |s| presence_shards(s, status, name).len() >= 2,
                STEP_TIMEOUT,
            )
            .await;
        assert!(reached, "{name}: {:?}", presence_shards(sim, status, name));
    }
    py.wait_for("presence_changed", STEP_TIMEOUT, |e| {
        e["event"] == "presence_changed" && e["ref"] == "p1"
    })
    .await;
    js.wait_for("presence_changed", STEP_TIMEOUT, |e| {
        e["event"] == "presence_changed" && e["ref"] == "p2"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(presence_shards(sim, "idle", "py presence"), vec![0, 1]);
    assert_eq!(presence_shards(sim, "dnd", "js presence"), vec![0, 1]);

    let py_guild = sim.shard_guilds(1)[0];
    let js_guild = sim.shard_guilds(0)[1];
    py.command(json!({"op": "request_members", "ref": "m1", "guild_id": py_guild.to_string()}))
        .await;
    js.command(json!({"op": "request_members", "ref": "m2", "guild_id": js_guild.to_string()}))
        .await;
    for (bot, guild, r) in [(&mut py, py_guild, "m1"), (&mut js, js_guild, "m2")] {
        let members = bot
            .wait_for("members", STEP_TIMEOUT, |e| {
                e["event"] == "members" && e["ref"] == r
            })
            .await;
        let want: BTreeSet<String> = world::members(guild)
            .iter()
            .map(|m| m["user"]["id"].as_str().unwrap().to_string())
            .collect();
        let got: BTreeSet<String> = members["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "{:?}: {members}", bot.lib);
        let op8: Vec<Option<u32>> = sim
            .frames()
            .iter()
            .filter(|f| f.op == 8 && guild_of_frame(&f.json) == Some(guild))
            .map(|f| f.shard)
            .collect();
        let shard = ((guild >> 22) % u64::from(SHARDS)) as u32;
        assert_eq!(
            op8,
            vec![Some(shard)],
            "{:?}: op 8 on the guild's shard",
            bot.lib
        );
    }

    // 6. A message sent with each library's REST call: through the front door to the
    // simulator, and back to both bots as MESSAGE_CREATE on the channel's shard.
    let sends = [
        (
            Lib::DiscordPy,
            "s1",
            sim.shard_guilds(0)[0],
            "sent by discord.py",
        ),
        (
            Lib::DiscordJs,
            "s2",
            sim.shard_guilds(1)[1],
            "sent by discord.js",
        ),
    ];
    for (lib, r, guild, content) in sends {
        let channel = world::text_channel_ids(guild)[0];
        let bot = if lib == Lib::DiscordPy {
            &mut py
        } else {
            &mut js
        };
        bot.command(
            json!({"op": "send", "ref": r, "channel_id": channel.to_string(), "content": content}),
        )
        .await;
        let sent = bot
            .wait_for("sent", STEP_TIMEOUT, |e| {
                e["event"] == "sent" && e["ref"] == r
            })
            .await;
        assert_eq!(sent["channel_id"], channel.to_string(), "{lib:?}: {sent}");
        assert_eq!(sent["content"], content, "{lib:?}: {sent}");
        let call = sim
            .rest_calls()
            .into_iter()
            .find(|c| {
                c.method == "POST" && c.body.as_ref().is_some_and(|b| b["content"] == content)
            })
            .unwrap_or_else(|| panic!("{lib:?}: the POST reached the simulator"));
        assert_eq!(call.path, format!("/api/v10/channels/{channel}/messages"));
        assert_eq!(call.status, 200, "{lib:?}: {call:?}");
        assert!(
            call.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("DiscordBot (")),
            "{lib:?}: the library's User-Agent forwarded: {call:?}"
        );
        let id = id_of(&sent);
        for bot in [&mut py, &mut js] {
            let ev = await_message(bot, &id, "the sent message back").await;
            assert_eq!(ev["author_id"], shardwarden::simulator::BOT_USER_ID);
            assert_eq!(ev["shard"], (guild >> 22) % u64::from(SHARDS), "{ev}");
        }
        posted.push(id);
    }

    for bot in [&py, &js] {
        assert_once(bot, &posted, "at the end");
    }
    assert_eq!(fd.upstream(2), 2, "one IDENTIFY per shard upstream in all");
    assert_eq!(fd.upstream(6), 0);
    py.exit().await;
    js.exit().await;
}

/// Runs `bot` until it exits by itself; it must exit with status 2 after reporting
/// `want` (an `error` or `disconnect` event matching it). Returns its events.
async fn refused(mut bot: Bot, what: &str, want: impl Fn(&Value) -> bool) -> Vec<Value> {
    let status = bot.until_exit(READY_TIMEOUT).await;
    let lib = bot.lib;
    let seen = std::mem::take(&mut bot.seen);
    let shown: Vec<String> = seen.iter().map(Value::to_string).collect();
    assert_eq!(
        status.code(),
        Some(2),
        "{lib:?}: {what}: exit status {status}; events:\n{}",
        shown.join("\n")
    );
    assert!(
        seen.iter().any(&want),
        "{lib:?}: {what}: not reported; events:\n{}",
        shown.join("\n")
    );
    assert!(
        !seen.iter().any(|e| e["event"] == "ready"),
        "{lib:?}: {what}: must not reach ready; events:\n{}",
        shown.join("\n")
    );
    seen
}

fn close_code_is(code: u16) -> impl Fn(&Value) -> bool {
    move |e| (e["event"] == "error" || e["event"] == "disconnect") && e["close_code"] == code
}

/// 7. What each library reports for its mistakes. A wrong token is refused at REST before
/// any gateway connection (discord.py's `GET /users/@me`, forwarded: 401; discord.js's
/// `GET /gateway/bot`, answered by the front door: 401), so neither library ever sees the
/// gateway's 4004; the front door's 4004 for an IDENTIFY with a wrong token is covered with
/// a raw client by tests/frontdoor.rs (`client_mistakes_get_discords_close_codes`), as are
/// the other close codes. Here the libraries get 4010 for a shard the daemon does not own
/// and 4013/4014 for intents it does not hold, and stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_libraries_get_discords_refusals() {
    if both_libraries().is_none() {
        return;
    }
    let (fd, partial) = tokio::join!(FrontDoor::start(None), FrontDoor::start(Some("0..1")));
    let identifies = (fd.upstream(2), partial.upstream(2));
    assert_eq!(identifies, (2, 1), "the daemons' own IDENTIFYs");

    let voice_states = (BOT_INTENTS | 1 << 7).to_string();
    let presences = (BOT_INTENTS | 1 << 8).to_string();
    let wrong_token = |lib| {
        let mut target = fd.target();
        target.token = "not-the-daemons-token".to_string();
        Bot::spawn(
            bot_or_skip(lib).expect("checked"),
            lib,
            &target,
            &[0, 1],
            &[],
        )
    };
    let mut cases = Vec::new();
    for lib in [Lib::DiscordPy, Lib::DiscordJs] {
        let py = lib == Lib::DiscordPy;
        let token_refused = move |e: &Value| {
            e["event"] == "error"
                && e["where"] == "login"
                && (e["status"] == 401 || (!py && e["code"] == "TokenInvalid"))
        };
        cases.push(tokio::spawn(refused(
            wrong_token(lib),
            "wrong token",
            token_refused,
        )));
        cases.push(tokio::spawn(refused(
            partial.spawn(lib, &[1], &[]),
            "a shard the daemon does not own",
            close_code_is(4010),
        )));
        cases.push(tokio::spawn(refused(
            fd.spawn(lib, &[0, 1], &[("SW_INTENTS", &voice_states)]),
            "GUILD_VOICE_STATES, which the daemon does not hold",
            close_code_is(4013),
        )));
        cases.push(tokio::spawn(refused(
            fd.spawn(lib, &[0, 1], &[("SW_INTENTS", &presences)]),
            "GUILD_PRESENCES (privileged), which the daemon does not hold",
            close_code_is(4014),
        )));
    }
    for case in cases {
        if let Err(e) = case.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    assert_eq!(
        (fd.upstream(2), partial.upstream(2)),
        identifies,
        "nothing upstream for refused clients"
    );
    // The wrong token reached the simulator only with discord.py's forwarded login call.
    let refused_calls: Vec<_> = fd
        .sim
        .rest_calls()
        .into_iter()
        .filter(|c| c.status == 401)
        .map(|c| c.path)
        .collect();
    assert_eq!(refused_calls, vec!["/api/v10/users/@me".to_string()]);
}

/// Sends `per_channel` messages to each of `channels` as fast as `bot`'s library allows
/// (every `send` command at once; the library queues them by bucket) and waits for every
/// `sent`. Returns the contents sent.
async fn burst(bot: &mut Bot, channels: &[u64], per_channel: usize) -> Vec<String> {
    let tag = match bot.lib {
        Lib::DiscordPy => "py",
        Lib::DiscordJs => "js",
    };
    let mut contents = Vec::new();
    for i in 0..per_channel {
        for channel in channels {
            let content = format!("burst {tag} {channel} {i}");
            let r = format!("b-{tag}-{channel}-{i}");
            bot.command(json!({"op": "send", "ref": r, "channel_id": channel.to_string(), "content": content}))
                .await;
            contents.push(content);
        }
    }
    let is_burst =
        |e: &Value| e["event"] == "sent" && e["ref"].as_str().is_some_and(|r| r.starts_with("b-"));
    let mut sent = bot.seen.iter().filter(|e| is_burst(e)).count();
    while sent < contents.len() {
        bot.wait_for("every burst message sent", BURST_TIMEOUT, is_burst)
            .await;
        sent += 1;
    }
    contents
}

/// How long a whole burst may take (the libraries wait out the buckets).
const BURST_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_libraries_sending_at_once_meet_one_429_per_bucket_at_most() {
    if both_libraries().is_none() {
        return;
    }
    // 10 messages per second per channel, as on a busy bot's channels: 2 libraries × 30
    // messages to each of 2 channels wait on the buckets for about 6 s.
    let fd = FrontDoor::start_on(
        None,
        SimConfig {
            message_bucket: (10, Duration::from_secs(1)),
            ..SimConfig::default()
        },
    )
    .await;
    let sim = &fd.sim;
    let mut py = fd.spawn(Lib::DiscordPy, &[0, 1], &[]);
    let mut js = fd.spawn(Lib::DiscordJs, &[0, 1], &[]);
    tokio::join!(
        py.wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready"),
        js.wait_for("ready", READY_TIMEOUT, |e| e["event"] == "ready"),
    );
    // A channel of a guild of each shard.
    let channels = [
        world::text_channel_ids(sim.shard_guilds(0)[0])[0],
        world::text_channel_ids(sim.shard_guilds(1)[0])[0],
    ];
    const PER_CHANNEL: usize = 30;
    let from = sim.rest_calls().len();
    let started = std::time::Instant::now();
    let (py_sent, js_sent) = tokio::join!(
        burst(&mut py, &channels, PER_CHANNEL),
        burst(&mut js, &channels, PER_CHANNEL),
    );
    let elapsed = started.elapsed();
    let calls: Vec<_> = sim.rest_calls().into_iter().skip(from).collect();
    let counts = RateLimitCounts::of(&calls);
    let posts = calls.iter().filter(|c| c.method == "POST").count();
    eprintln!(
        "{} messages in {elapsed:?} ({:.1}/s), {posts} POSTs; 429s per bucket {:?}, global {}, shared {}",
        py_sent.len() + js_sent.len(),
        (py_sent.len() + js_sent.len()) as f64 / elapsed.as_secs_f64(),
        counts.by_bucket,
        counts.global,
        counts.shared,
    );
    // Every message reached Discord exactly once (a 429 is not processed: not counted).
    let mut delivered: std::collections::HashMap<String, usize> = Default::default();
    for c in calls
        .iter()
        .filter(|c| c.method == "POST" && c.status == 200)
    {
        if let Some(content) = c.body.as_ref().and_then(|b| b["content"].as_str()) {
            *delivered.entry(content.to_string()).or_default() += 1;
        }
    }
    for content in py_sent.iter().chain(&js_sent) {
        assert_eq!(
            delivered.get(content),
            Some(&1),
            "{content:?} reached the simulator once"
        );
    }
    assert_eq!(delivered.len(), 4 * PER_CHANNEL, "nothing else was posted");
    assert!(
        counts.by_bucket.values().all(|n| *n <= 1),
        "at most one 429 per bucket reached Discord: {:?}",
        counts.by_bucket
    );
    assert_eq!(counts.global, 0, "none on the global limit");
    py.exit().await;
    js.exit().await;
}
