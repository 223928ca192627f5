//! Discord-like rate limits: buckets shared by several routes, the global limit, and
//! failures and delays injected per route. On tokio's paused clock: windows pass in no
//! time.

use super::*;

const AUTH: &str = "Bot sim-token-0000";

async fn call(
    sim: &Simulator,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http(
        sim,
        method,
        &format!("/api/v10{path}"),
        &[
            ("Authorization", AUTH),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

fn message_id(m: &Value) -> u64 {
    m["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn edit_and_delete_share_one_bucket_per_channel() {
    let sim = Simulator::start(SimConfig {
        shared_buckets: vec![SharedBucket {
            routes: vec![
                "PATCH /channels/{channel_id}/messages/{message_id}".into(),
                "DELETE /channels/{channel_id}/messages/{message_id}".into(),
            ],
            limit: (3, Duration::from_secs(1)),
        }],
        ..cfg()
    })
    .await
    .unwrap();
    let guild = sim.shard_guilds(0)[0];
    let [a, b, _] = world::text_channel_ids(guild)[..] else {
        panic!()
    };
    let msgs: Vec<u64> = (0..5)
        .map(|i| message_id(&sim.bot_message(a, &format!("m{i}")).unwrap()))
        .collect();
    let edit = |m: u64| format!("/channels/{a}/messages/{m}");
    let mut hashes = Vec::new();
    for (i, (method, m)) in [("PATCH", msgs[0]), ("DELETE", msgs[1]), ("PATCH", msgs[2])]
        .into_iter()
        .enumerate()
    {
        let body = (method == "PATCH").then(|| json!({"content": "edited"}));
        let (st, head, body) = call(&sim, method, &edit(m), body).await;
        assert_eq!(st, if method == "PATCH" { 200 } else { 204 }, "{head}");
        if method == "PATCH" {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["content"], "edited");
            assert!(v["edited_timestamp"].is_string());
        }
        assert_eq!(header(&head, "X-RateLimit-Limit"), Some("3"));
        assert_eq!(
            header(&head, "X-RateLimit-Remaining"),
            Some((2 - i).to_string().as_str()),
            "one count for both routes"
        );
        hashes.push(header(&head, "X-RateLimit-Bucket").unwrap().to_string());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    // The fourth, whichever route, is limited.
    let (st, head, body) = call(&sim, "DELETE", &edit(msgs[3]), None).await;
    assert_eq!(st, 429, "{head}");
    assert_eq!(header(&head, "X-RateLimit-Scope"), Some("user"));
    assert_eq!(
        header(&head, "X-RateLimit-Bucket"),
        Some(hashes[0].as_str())
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["global"], false);
    let retry_after = v["retry_after"].as_f64().unwrap();
    assert!(retry_after > 0.0 && retry_after <= 1.0, "{v}");
    // Another channel: the same hash, its own count.
    let other = message_id(&sim.bot_message(b, "elsewhere").unwrap());
    let (st, head, _) = call(
        &sim,
        "DELETE",
        &format!("/channels/{b}/messages/{other}"),
        None,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(
        header(&head, "X-RateLimit-Bucket"),
        Some(hashes[0].as_str())
    );
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("2"));
    // Posting is a bucket of its own.
    let (st, head, _) = call(
        &sim,
        "POST",
        &format!("/channels/{a}/messages"),
        Some(json!({"content": "new"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_ne!(
        header(&head, "X-RateLimit-Bucket"),
        Some(hashes[0].as_str())
    );
    // The window passes.
    tokio::time::sleep(Duration::from_secs_f64(retry_after)).await;
    let (st, _, _) = call(&sim, "DELETE", &edit(msgs[3]), None).await;
    assert_eq!(st, 204);
    // Deleted and unknown messages are Discord's 404.
    let (st, _, body) = call(&sim, "DELETE", &edit(msgs[1]), None).await;
    assert_eq!(st, 404);
    assert!(body.contains("10008"), "{body}");
    let counts = sim.rate_limits();
    assert_eq!(counts.user, 1);
    assert_eq!(counts.by_bucket, [(format!("{} {a}", hashes[0]), 1)].into());
    let calls = sim.rest_calls();
    let limited = calls.iter().find(|c| c.status == 429).unwrap();
    assert_eq!(limited.scope, Some(LimitScope::User));
    assert_eq!(
        limited.route.as_deref(),
        Some("DELETE /channels/{channel_id}/messages/{message_id}")
    );
}

#[tokio::test(start_paused = true)]
async fn the_global_limit_spans_routes_and_spares_interactions() {
    let sim = Simulator::start(SimConfig {
        global_limit: Some(4),
        route_bucket: (100, Duration::from_secs(10)),
        ..cfg()
    })
    .await
    .unwrap();
    let channel = world::text_channel_ids(sim.shard_guilds(0)[0])[0];
    for path in [
        "/users/@me",
        "/gateway/bot",
        &format!("/channels/{channel}"),
        "/users/@me",
    ] {
        let (st, head, _) = call(&sim, "GET", path, None).await;
        assert_eq!(st, 200, "{path}: {head}");
    }
    let (st, head, body) = call(&sim, "GET", &format!("/channels/{channel}"), None).await;
    assert_eq!(st, 429, "{head}");
    assert_eq!(header(&head, "X-RateLimit-Global"), Some("true"));
    assert_eq!(header(&head, "X-RateLimit-Scope"), Some("global"));
    assert!(header(&head, "Retry-After").is_some());
    // The bucket's headers too, and the global 429 took nothing from it.
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("99"));
    assert!(header(&head, "X-RateLimit-Bucket").is_some());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["global"], true);
    assert_eq!(v["code"], 0);
    assert_eq!(v["message"], "You are being rate limited.");
    let retry_after = v["retry_after"].as_f64().unwrap();
    assert!(retry_after > 0.0 && retry_after <= 1.0, "{v}");
    // Interaction callbacks are not bound by it (and need no bot token).
    let (st, head, _) = http(
        &sim,
        "POST",
        "/api/v10/interactions/123/aW50ZXJhY3Rpb24/callback",
        &[("Content-Type", "application/json")],
        br#"{"type":4,"data":{"content":"pong"}}"#,
    )
    .await;
    assert_eq!(st, 204, "{head}");
    assert!(header(&head, "X-RateLimit-Bucket").is_some());
    tokio::time::sleep(Duration::from_secs_f64(retry_after)).await;
    let (st, _, _) = call(&sim, "GET", "/users/@me", None).await;
    assert_eq!(st, 200, "a new second");
    let counts = sim.rate_limits();
    assert_eq!((counts.global, counts.user, counts.shared), (1, 0, 0));
    assert!(counts.by_bucket.is_empty());
}

#[tokio::test(start_paused = true)]
async fn failures_and_delays_are_injected_per_route() {
    let sim = Simulator::start(SimConfig {
        message_bucket: (10, Duration::from_secs(1)),
        ..cfg()
    })
    .await
    .unwrap();
    let [a, b, _] = world::text_channel_ids(sim.shard_guilds(0)[0])[..] else {
        panic!()
    };
    let post = |c: u64| format!("/channels/{c}/messages");
    let msg = || Some(json!({"content": "x"}));
    sim.set_route_failure(
        &format!("POST {}", post(a)),
        Some(RestFailure::Times {
            times: 2,
            status: 500,
            retry_after: None,
        }),
    );
    let (st, head, _) = call(&sim, "POST", &post(a), msg()).await;
    assert_eq!(st, 500);
    // Discord's bucket headers, nothing taken from the bucket.
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("10"), "{head}");
    // Other routes, and other channels, are unaffected meanwhile.
    let (st, _, _) = call(&sim, "GET", &format!("/channels/{a}"), None).await;
    assert_eq!(st, 200);
    let (st, _, _) = call(&sim, "POST", &post(b), msg()).await;
    assert_eq!(st, 200);
    let (st, _, _) = call(&sim, "POST", &post(a), msg()).await;
    assert_eq!(st, 500);
    let (st, head, _) = call(&sim, "POST", &post(a), msg()).await;
    assert_eq!(st, 200, "spent after 2");
    assert_eq!(header(&head, "X-RateLimit-Remaining"), Some("9"));
    // A prefix covers every route below it (by whole segments), any method.
    sim.set_route_failure(
        &format!("/channels/{b}"),
        Some(RestFailure::Status(503, None)),
    );
    assert_eq!(
        call(&sim, "GET", &format!("/channels/{b}"), None).await.0,
        503
    );
    assert_eq!(call(&sim, "POST", &post(b), msg()).await.0, 503);
    assert_eq!(call(&sim, "POST", &post(a), msg()).await.0, 200);
    sim.set_route_failure(&format!("/channels/{b}"), None);
    assert_eq!(call(&sim, "POST", &post(b), msg()).await.0, 200);
    // The whole-API injection still covers everything.
    sim.set_rest_failure(Some(RestFailure::Count(1)));
    assert_eq!(call(&sim, "GET", "/users/@me", None).await.0, 502);
    assert_eq!(call(&sim, "GET", "/users/@me", None).await.0, 200);
    // A delay before answering one route; the others answer at once.
    sim.set_route_delay("GET /users/@me", Some(Duration::from_secs(40)));
    let started = tokio::time::Instant::now();
    let slow = tokio::spawn({
        let sim = sim.clone();
        async move { call(&sim, "GET", "/users/@me", None).await.0 }
    });
    assert_eq!(call(&sim, "POST", &post(a), msg()).await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(slow.await.unwrap(), 200);
    assert!(started.elapsed() >= Duration::from_secs(40));
    sim.set_route_delay("GET /users/@me", None);
    let started = tokio::time::Instant::now();
    assert_eq!(call(&sim, "GET", "/users/@me", None).await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(sim.rate_limits().total(), 0);
}
