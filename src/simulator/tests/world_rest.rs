//! The REST routes libraries call, the world behind READY/GUILD_CREATE, and op 8 chunks.

use super::*;

const AUTH: &str = "Bot sim-token-0000";

async fn post_message(sim: &Simulator, channel: u64, body: Value) -> (u16, String, Value) {
    let (st, head, body) = http(
        sim,
        "POST",
        &format!("/api/v10/channels/{channel}/messages"),
        &[
            ("Authorization", AUTH),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (st, head, serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn login_routes_answer_the_bot_user_and_application() {
    let sim = Simulator::start(cfg()).await.unwrap();
    for version in ["v10", "v9"] {
        let (st, head, body) = http(
            &sim,
            "GET",
            &format!("/api/{version}/users/@me"),
            &[("Authorization", AUTH), ("User-Agent", "DiscordBot (x, 1)")],
            b"",
        )
        .await;
        assert_eq!(st, 200, "{head}");
        let me: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(me["id"], BOT_USER_ID);
        assert_eq!(me["bot"], true);
        for k in [
            "username",
            "discriminator",
            "global_name",
            "avatar",
            "mfa_enabled",
            "flags",
        ] {
            assert!(me.get(k).is_some(), "users/@me lacks {k}: {me}");
        }
    }
    for path in [
        "/api/v10/oauth2/applications/@me",
        "/api/v10/applications/@me",
    ] {
        let (st, _, body) = http(&sim, "GET", path, &[("Authorization", AUTH)], b"").await;
        assert_eq!(st, 200);
        let app: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(app["id"], BOT_USER_ID);
        // discord.py's AppInfo reads these without defaults.
        for k in [
            "name",
            "description",
            "icon",
            "bot_public",
            "bot_require_code_grant",
            "owner",
            "verify_key",
            "flags",
        ] {
            assert!(app.get(k).is_some(), "{path} lacks {k}");
        }
    }
    // Token required everywhere but /gateway, and wrong methods or paths are refused.
    let (st, _, _) = http(&sim, "GET", "/api/v10/users/@me", &[], b"").await;
    assert_eq!(st, 401);
    let (st, _, _) = http(&sim, "GET", "/api/v10/gateway", &[], b"").await;
    assert_eq!(st, 200);
    let (st, _, _) = http(
        &sim,
        "DELETE",
        "/api/v10/users/@me",
        &[("Authorization", AUTH)],
        b"",
    )
    .await;
    assert_eq!(st, 405);
    let (st, _, _) = http(
        &sim,
        "GET",
        "/api/v8/users/@me",
        &[("Authorization", AUTH)],
        b"",
    )
    .await;
    assert_eq!(st, 404);
    let calls = sim.rest_calls();
    assert_eq!(calls.len(), 8);
    assert_eq!(calls[0].user_agent.as_deref(), Some("DiscordBot (x, 1)"));
    assert_eq!(calls[0].path, "/api/v10/users/@me");
    // An injected failure applies to every route.
    sim.set_rest_failure(Some(RestFailure::Count(1)));
    let (st, _, _) = http(
        &sim,
        "GET",
        "/api/v10/users/@me",
        &[("Authorization", AUTH)],
        b"",
    )
    .await;
    assert_eq!(st, 502);
}

#[tokio::test]
async fn rate_limit_headers_and_429_per_route_and_major_parameter() {
    let sim = Simulator::start(SimConfig {
        message_bucket: (3, Duration::from_millis(600)),
        route_bucket: (2, Duration::from_secs(60)),
        ..cfg()
    })
    .await
    .unwrap();
    let guild = sim.shard_guilds(0)[0];
    let [a, b, _] = world::text_channel_ids(guild)[..] else {
        panic!()
    };
    let mut buckets = Vec::new();
    for i in 0..3 {
        let (st, head, _) = post_message(&sim, a, json!({"content": "x"})).await;
        assert_eq!(st, 200, "{head}");
        assert_eq!(header(&head, "X-RateLimit-Limit"), Some("3"));
        assert_eq!(
            header(&head, "X-RateLimit-Remaining"),
            Some((2 - i).to_string().as_str())
        );
        let after: f64 = header(&head, "X-RateLimit-Reset-After")
            .unwrap()
            .parse()
            .unwrap();
        assert!(after > 0.0 && after <= 0.6, "{after}");
        let reset: f64 = header(&head, "X-RateLimit-Reset").unwrap().parse().unwrap();
        assert!(reset > 1.7e9, "{reset}");
        buckets.push(header(&head, "X-RateLimit-Bucket").unwrap().to_string());
    }
    let (st, head, body) = post_message(&sim, a, json!({"content": "x"})).await;
    assert_eq!(st, 429, "{head}");
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("0"));
    assert_eq!(header(&head, "X-RateLimit-Scope"), Some("user"));
    assert!(header(&head, "Retry-After").is_some());
    let ra = body["retry_after"].as_f64().unwrap();
    assert!(ra > 0.0 && ra <= 0.6, "{body}");
    assert_eq!(body["global"], false);
    // Another channel (major parameter) has its own count, under the same bucket hash.
    let (st, head, _) = post_message(&sim, b, json!({"content": "x"})).await;
    assert_eq!(st, 200);
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("2"));
    buckets.push(header(&head, "X-RateLimit-Bucket").unwrap().to_string());
    assert!(buckets.windows(2).all(|w| w[0] == w[1]), "{buckets:?}");
    // The window passes and the channel can post again.
    tokio::time::sleep(Duration::from_secs_f64(ra + 0.05)).await;
    let (st, _, _) = post_message(&sim, a, json!({"content": "x"})).await;
    assert_eq!(st, 200);
    // Other routes use the route bucket, with a different hash.
    let mut hashes = Vec::new();
    for want in [200, 200, 429] {
        let (st, head, _) = http(
            &sim,
            "GET",
            "/api/v10/users/@me",
            &[("Authorization", AUTH)],
            b"",
        )
        .await;
        assert_eq!(st, want);
        hashes.push(header(&head, "X-RateLimit-Bucket").unwrap().to_string());
    }
    assert_ne!(hashes[0], buckets[0]);
}

#[tokio::test]
async fn posting_a_message_answers_it_and_dispatches_it_on_the_guild_shard() {
    let sim = Simulator::start(SimConfig {
        shards: 2,
        max_concurrency: 2,
        ..cfg()
    })
    .await
    .unwrap();
    let (mut c0, _, _) = ready_client(&sim, Compression::None, [0, 2]).await;
    let (mut c1, _, _) = ready_client(&sim, Compression::None, [1, 2]).await;
    let guild = sim.shard_guilds(1)[1];
    let channel = world::text_channel_ids(guild)[0];
    let (st, _, msg) = post_message(
        &sim,
        channel,
        json!({"content": "hi there", "nonce": "n1", "tts": false}),
    )
    .await;
    assert_eq!(st, 200, "{msg}");
    assert_eq!(msg["channel_id"], channel.to_string());
    assert_eq!(msg["content"], "hi there");
    assert_eq!(msg["nonce"], "n1");
    assert_eq!(msg["author"]["id"], BOT_USER_ID);
    assert_eq!(msg["author"]["bot"], true);
    for k in [
        "id",
        "timestamp",
        "edited_timestamp",
        "mentions",
        "attachments",
        "embeds",
        "type",
        "pinned",
        "tts",
    ] {
        assert!(msg.get(k).is_some(), "message lacks {k}: {msg}");
    }
    let ev = c1.json().await;
    assert_eq!(ev["t"], "MESSAGE_CREATE", "{ev}");
    assert_eq!(ev["d"]["id"], msg["id"]);
    assert_eq!(ev["d"]["guild_id"], guild.to_string());
    assert_eq!(ev["d"]["member"]["roles"].as_array().map(Vec::len), Some(1));
    assert!(ev["d"]["member"].get("user").is_none());
    // Shard 0 does not hold the guild: its next event is the one posted in its own guild.
    let own = world::text_channel_ids(sim.shard_guilds(0)[0])[1];
    let m2 = sim.member_message(own, "shard zero").unwrap();
    let ev = c0.json().await;
    assert_eq!(ev["d"]["id"], m2["id"], "{ev}");
    assert_ne!(ev["d"]["author"]["id"], BOT_USER_ID);
    assert!(ev["d"]["member"]["roles"].is_array());

    // Refusals in Discord's shape.
    let (st, _, e) = post_message(&sim, channel, json!({"content": ""})).await;
    assert_eq!((st, e["code"].as_u64()), (400, Some(50006)));
    let (st, _, e) = post_message(&sim, channel, json!({"content": "x".repeat(2001)})).await;
    assert_eq!((st, e["code"].as_u64()), (400, Some(50035)), "{e}");
    assert!(e["errors"]["content"]["_errors"][0]["code"].is_string());
    let (st, _, e) = post_message(&sim, guild + 1 + (999 << 12), json!({"content": "x"})).await;
    assert_eq!((st, e["code"].as_u64()), (404, Some(10003)));
    let category = world::channels(guild)[0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (st, _, e) = post_message(&sim, category, json!({"content": "x"})).await;
    assert_eq!((st, e["code"].as_u64()), (400, Some(50008)));
    let (st, _, body) = http(
        &sim,
        "POST",
        &format!("/api/v10/channels/{channel}/messages"),
        &[
            ("Authorization", AUTH),
            ("Content-Type", "application/json"),
        ],
        b"{not json",
    )
    .await;
    assert_eq!(st, 400, "{body}");

    // Chunked and multipart bodies (libraries use both).
    let (st, _, body) = http(
        &sim,
        "POST",
        &format!("/api/v10/channels/{}/messages", world::thread_id(guild)),
        &[
            ("Authorization", AUTH),
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ],
        b"6\r\n{\"cont\r\nf\r\nent\":\"chunked\"}\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"content\":\"chunked\""), "{body}");
    let form = "--XyZ\r\nContent-Disposition: form-data; name=\"payload_json\"\r\nContent-Type: application/json\r\n\r\n{\"content\":\"multipart\"}\r\n--XyZ--\r\n";
    let (st, _, body) = http(
        &sim,
        "POST",
        &format!("/api/v10/channels/{channel}/messages"),
        &[
            ("Authorization", AUTH),
            ("Content-Type", "multipart/form-data; boundary=XyZ"),
        ],
        form.as_bytes(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"content\":\"multipart\""), "{body}");
    for want in ["chunked", "multipart"] {
        let ev = c1.json().await;
        assert_eq!(ev["d"]["content"], want, "{ev}");
    }

    // GET /channels/{id} knows the world's channels.
    let (st, _, body) = http(
        &sim,
        "GET",
        &format!("/api/v10/channels/{channel}"),
        &[("Authorization", AUTH)],
        b"",
    )
    .await;
    assert_eq!(st, 200);
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (c["type"].as_u64(), c["guild_id"].as_str()),
        (Some(0), Some(guild.to_string().as_str()))
    );
}

#[tokio::test]
async fn message_create_follows_intents() {
    let sim = Simulator::start(SimConfig {
        shards: 1,
        enforce_identify_concurrency: false,
        ..cfg()
    })
    .await
    .unwrap();
    let guild = sim.shard_guilds(0)[0];
    let channel = world::text_channel_ids(guild)[0];
    let seqs = |sim: &Simulator| -> Vec<u64> { sim.sessions().iter().map(|s| s.seq).collect() };
    // GUILDS only: READY and two GUILD_CREATEs, then no MESSAGE_CREATE.
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.identify("sim-token-0000", [0, 1], 1).await;
    for _ in 0..3 {
        cl.json().await;
    }
    assert_eq!(seqs(&sim), vec![3]);
    assert!(sim.member_message(channel, "not for you").is_some());
    assert_eq!(
        seqs(&sim),
        vec![3],
        "no MESSAGE_CREATE without GUILD_MESSAGES"
    );
    // Not a messageable channel: a guild id, the voice channel, an unknown guild.
    assert!(
        sim.member_message(guild, "a guild is not a channel")
            .is_none()
    );
    let voice = world::channels(guild)[5]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(sim.member_message(voice, "voice").is_none());
    assert!(
        sim.member_message(channel + (1 << 22), "elsewhere")
            .is_none()
    );
    // A GUILD_MESSAGES session of the same shard gets it.
    let (mut c2, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    let m = sim.member_message(channel, "for you").unwrap();
    let ev = c2.json().await;
    assert_eq!(ev["d"]["id"], m["id"]);
    assert_eq!(ev["d"]["content"], "for you");
}

#[tokio::test]
async fn ready_and_guild_create_carry_what_libraries_read() {
    let sim = Simulator::start(SimConfig { shards: 2, ..cfg() })
        .await
        .unwrap();
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    // GUILDS | GUILD_PRESENCES | GUILD_MESSAGES
    cl.identify("sim-token-0000", [1, 2], 1 | (1 << 8) | (1 << 9))
        .await;
    let ready = cl.json().await;
    let d = &ready["d"];
    assert_eq!(d["v"], 10);
    for k in [
        "id",
        "username",
        "discriminator",
        "global_name",
        "avatar",
        "bot",
        "mfa_enabled",
        "flags",
    ] {
        assert!(d["user"].get(k).is_some(), "READY user lacks {k}");
    }
    assert_eq!(d["application"], json!({"id": BOT_USER_ID, "flags": 0}));
    assert_eq!(d["shard"], json!([1, 2]));
    let stubs: Vec<Value> = sim
        .shard_guilds(1)
        .iter()
        .map(|g| json!({"id": g.to_string(), "unavailable": true}))
        .collect();
    assert_eq!(d["guilds"], Value::Array(stubs));
    for k in ["session_id", "resume_gateway_url"] {
        assert!(d[k].is_string());
    }
    let gc = cl.json().await;
    assert_eq!(gc["t"], "GUILD_CREATE");
    let g = &gc["d"];
    let id = sim.shard_guilds(1)[0];
    assert_eq!(g["id"], id.to_string());
    // The same guild every time: generated from its id.
    assert_eq!(*g, world::guild_create(id, 1 | (1 << 8) | (1 << 9)));
    for k in [
        "name",
        "owner_id",
        "roles",
        "channels",
        "emojis",
        "stickers",
        "members",
        "member_count",
        "large",
        "joined_at",
        "voice_states",
        "presences",
        "threads",
        "stage_instances",
        "guild_scheduled_events",
        "soundboard_sounds",
        "features",
        "unavailable",
        "icon",
        "afk_timeout",
        "verification_level",
        "premium_tier",
        "system_channel_id",
        "preferred_locale",
        "max_members",
        "nsfw_level",
        "mfa_level",
    ] {
        assert!(g.get(k).is_some(), "GUILD_CREATE lacks {k}");
    }
    let everyone = &g["roles"][0];
    assert_eq!(everyone["id"], g["id"], "@everyone has the guild's id");
    assert_eq!(everyone["name"], "@everyone");
    assert!(
        everyone["permissions"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    let channels = g["channels"].as_array().unwrap();
    let text: Vec<&Value> = channels.iter().filter(|c| c["type"] == 0).collect();
    assert_eq!(text.len(), 3);
    for c in &text {
        for k in [
            "id",
            "name",
            "position",
            "permission_overwrites",
            "parent_id",
        ] {
            assert!(c.get(k).is_some(), "text channel lacks {k}: {c}");
        }
        let parent = c["parent_id"].as_str().unwrap();
        assert!(channels.iter().any(|p| p["id"] == parent && p["type"] == 4));
    }
    assert!(
        text.iter()
            .any(|c| !c["permission_overwrites"].as_array().unwrap().is_empty())
    );
    // With GUILD_PRESENCES: every member, with users, the bot's own too, and presences.
    let members = g["members"].as_array().unwrap();
    assert_eq!(members.len() as u64, g["member_count"].as_u64().unwrap());
    assert!(
        members
            .iter()
            .all(|m| m["user"]["id"].is_string() && m["joined_at"].is_string())
    );
    assert!(members.iter().any(|m| m["user"]["id"] == BOT_USER_ID));
    assert!(!g["presences"].as_array().unwrap().is_empty());
    // Entities of the guild map back to it.
    for c in channels {
        let cid: u64 = c["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(world::guild_of(cid), id);
    }
    // Without GUILD_PRESENCES: the bot and the member in voice only, no presences.
    let lean = world::guild_create(id, 1);
    let ids: Vec<&str> = lean["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"]["id"].as_str().unwrap())
        .collect();
    let voice = lean["voice_states"][0]["user_id"].as_str().unwrap();
    assert_eq!(ids, vec![BOT_USER_ID, voice]);
    assert_eq!(lean["presences"], json!([]));
    assert_eq!(lean["member_count"], g["member_count"]);
}

#[tokio::test]
async fn request_guild_members_answers_from_the_world() {
    let sim = Simulator::start(SimConfig { shards: 2, ..cfg() })
        .await
        .unwrap();
    let (mut cl, _, _) = ready_client(&sim, Compression::ZlibStream, [0, 2]).await;
    let guild = sim.shard_guilds(0)[0];
    let all = world::members(guild);
    // All members, guild_id as a number, with a nonce.
    cl.send(json!({"op": 8, "d": {"guild_id": guild, "query": "", "limit": 0, "nonce": "abc"}}))
        .await;
    let chunk = cl.json().await;
    assert_eq!(chunk["t"], "GUILD_MEMBERS_CHUNK");
    let d = &chunk["d"];
    assert_eq!(d["guild_id"], guild.to_string());
    assert_eq!(d["nonce"], "abc");
    assert_eq!(
        (d["chunk_index"].as_u64(), d["chunk_count"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(d["members"], Value::Array(all.clone()));
    // A prefix query, and user ids with one unknown.
    let name = all[2]["user"]["username"].as_str().unwrap();
    cl.send(json!({"op": 8, "d": {"guild_id": guild.to_string(), "query": name[..name.len() - 1].to_uppercase(), "limit": 10}})).await;
    let d = cl.json().await["d"].clone();
    assert!(
        d["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"]["username"] == name),
        "{d}"
    );
    assert!(d.get("nonce").is_none());
    let known = all[1]["user"]["id"].as_str().unwrap();
    cl.send(json!({"op": 8, "d": {"guild_id": guild.to_string(), "user_ids": [known, "42"], "nonce": "x".repeat(33)}})).await;
    let d = cl.json().await["d"].clone();
    assert_eq!(d["members"].as_array().unwrap().len(), 1);
    assert_eq!(d["not_found"], json!(["42"]));
    assert!(d.get("nonce").is_none(), "a nonce over 32 bytes is dropped");
    // Presences only with GUILD_PRESENCES (this session has GUILD_MESSAGES only).
    cl.send(json!({"op": 8, "d": {"guild_id": guild.to_string(), "query": "", "limit": 0, "presences": true}})).await;
    let d = cl.json().await["d"].clone();
    assert!(d.get("presences").is_none());
    // A guild of the other shard: nothing.
    let other = sim.shard_guilds(1)[0];
    cl.send(json!({"op": 8, "d": {"guild_id": other.to_string(), "query": "", "limit": 0}}))
        .await;
    let d = cl.json().await["d"].clone();
    assert_eq!(d["members"], json!([]));
}

#[tokio::test]
async fn websocket_accepts_library_urls_and_headers() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let addr = sim.gateway_url().trim_start_matches("ws://").to_string();
    // A URL with no path (as a resume URL without one, with the query appended), and the
    // headers libraries send.
    for target in [
        "/?v=10&encoding=json&compress=zstd-stream",
        "?v=10&encoding=json",
        "/resume?v=10&encoding=json",
    ] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: DiscordBot (https://github.com/Rapptz/discord.py 2.7.1) Python/3.11 aiohttp/3.14.5\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate\r\nOrigin: http://{addr}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 101"), "{target}: {head}");
    }
    let url = format!("ws://{addr}?v=10&encoding=json&compress=zstd-stream");
    let mut cl = Client::connect_url(&url, Compression::ZstdStream).await;
    cl.hello().await;
    let conns = sim.connections();
    let last = conns.last().unwrap();
    assert_eq!(last.path, "/");
    assert_eq!(last.query, "v=10&encoding=json&compress=zstd-stream");
}

#[tokio::test]
async fn resume_on_a_resume_url_without_path() {
    let sim = Simulator::start(SimConfig {
        resume_path: String::new(),
        ..cfg()
    })
    .await
    .unwrap();
    assert_eq!(sim.resume_url(), sim.gateway_url());
    let (mut cl, sid, last) = ready_client(&sim, Compression::None, [0, 1]).await;
    cl.close(4000).await;
    sim.dispatch(0, "MESSAGE_CREATE", json!({"content": "missed"}));
    // What a library makes of it: the query appended to the bare URL.
    let url = format!("{}?v=10&encoding=json", sim.resume_url());
    let mut cl = Client::connect_url(&url, Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": last}}))
        .await;
    let missed = cl.json().await;
    assert_eq!(missed["d"]["content"], "missed", "{missed}");
    assert_eq!(cl.json().await["t"], "RESUMED");
    let c = sim.connections().pop().unwrap();
    assert!(c.resumed);
    assert_eq!(
        (c.path.as_str(), c.query.as_str()),
        ("/", "v=10&encoding=json")
    );
}
