use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn headers(bucket: &str, limit: u32, remaining: u32, reset_after: f64) -> BucketHeaders {
    BucketHeaders {
        bucket: Some(bucket.into()),
        limit: Some(limit),
        remaining: Some(remaining),
        reset_after: Some(Duration::from_secs_f64(reset_after)),
    }
}

fn token() -> TokenId {
    TokenId::of(Some("Bot secret-token-abcd"))
}

#[test]
fn route_keys_keep_the_major_parameter_only() {
    assert_eq!(
        route_key("GET", "/api/v10/channels/123/messages/456"),
        "GET /channels/123/messages/:id"
    );
    assert_eq!(
        route_key(
            "PUT",
            "/api/v10/channels/1/messages/2/reactions/%F0%9F%91%8D/@me"
        ),
        "PUT /channels/1/messages/:id/reactions/:emoji/@me"
    );
    assert_eq!(
        route_key("PATCH", "/api/guilds/9/members/77"),
        "PATCH /guilds/9/members/:id"
    );
    let webhook = route_key("POST", "/api/v10/webhooks/5/very-secret-token");
    assert!(!webhook.contains("very-secret-token"), "{webhook}");
    assert!(webhook.starts_with("POST /webhooks/5/tok"), "{webhook}");
    assert_ne!(
        webhook,
        route_key("POST", "/api/v10/webhooks/5/other-token"),
        "the webhook token is part of the major parameter"
    );
    assert_eq!(
        major_of(&route_key("GET", "/api/v10/channels/3/pins")),
        "channels/3"
    );
    assert!(major_of(&webhook).starts_with("webhooks/5/tok"));
    assert_eq!(major_of("GET /users/@me"), "");
    assert!(is_interaction("/api/v10/interactions/1/tok/callback"));
    assert!(!is_interaction("/api/v10/channels/1/messages"));
}

#[test]
fn fingerprints_are_the_last_four_characters_only() {
    let t = token();
    assert_eq!(t.fingerprint, "…abcd");
    assert_ne!(t.key, TokenId::of(Some("Bot other-token-abcd")).key);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_bucket_is_waited_out_before_sending() {
    let limiter = Limiter::new(1000, 100, Duration::from_secs(30));
    let key = route_key("POST", "/api/v10/channels/1/messages");
    let mut p = limiter.acquire(&token(), &key, false).await.expect("first");
    limiter.learn(&p, &headers("b1", 5, 0, 2.0));
    limiter.release(&mut p);
    drop(p);
    let started = Instant::now();
    let p = limiter
        .acquire(&token(), &key, false)
        .await
        .expect("second");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(p.waited_bucket >= Duration::from_secs(2));
    assert_eq!(p.bucket_id(), "b1");
}

#[tokio::test(start_paused = true)]
async fn one_bucket_keeps_order_and_others_do_not_wait() {
    let limiter = Arc::new(Limiter::new(1000, 100, Duration::from_secs(60)));
    let a = route_key("POST", "/api/v10/channels/1/messages");
    let b = route_key("POST", "/api/v10/channels/2/messages");
    // Learn bucket a: 1 per second, none left now.
    let mut p = limiter.acquire(&token(), &a, false).await.expect("a");
    limiter.learn(&p, &headers("msg", 1, 0, 1.0));
    limiter.release(&mut p);
    drop(p);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let limiter = limiter.clone();
        let order = order.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut p = limiter.acquire(&token(), &a, false).await.expect("queued");
            order.lock().unwrap().push((i, Instant::now()));
            limiter.learn(&p, &headers("msg", 1, 0, 1.0));
            limiter.release(&mut p);
        }));
        // Arrival order is spawn order.
        tokio::task::yield_now().await;
    }
    // Another channel (same bucket id, other major parameter) is free.
    let started = Instant::now();
    let other = limiter.acquire(&token(), &b, false).await.expect("b");
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "bucket b waits on nothing"
    );
    drop(other);
    for t in tasks {
        t.await.expect("task");
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<_> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4], "FIFO within a bucket");
    for pair in order.windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= Duration::from_secs(1),
            "one per window"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_route_found_to_share_a_bucket_moves_its_queue_there() {
    let limiter = Arc::new(Limiter::new(1000, 100, Duration::from_secs(60)));
    let edit = route_key("PATCH", "/api/v10/channels/1/messages/10");
    let delete = route_key("DELETE", "/api/v10/channels/1/messages/11");
    // The edit route knows bucket x: 2 per second, 1 left.
    let mut p = limiter.acquire(&token(), &edit, false).await.expect("edit");
    limiter.learn(&p, &headers("x", 2, 1, 1.0));
    limiter.release(&mut p);
    drop(p);
    // The delete route's first request goes alone; a second queues behind it.
    let mut first = limiter
        .acquire(&token(), &delete, false)
        .await
        .expect("delete");
    let queued = {
        let limiter = limiter.clone();
        let delete = delete.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let p = limiter
                .acquire(&token(), &delete, false)
                .await
                .expect("queued");
            (started.elapsed(), p)
        })
    };
    tokio::task::yield_now().await;
    // Its answer names x, now empty: what waits on the delete route's own
    // bucket moves to x and waits for x's reset, as does a new edit.
    limiter.learn(&first, &headers("x", 2, 0, 1.0));
    limiter.release(&mut first);
    drop(first);
    let (waited, mut moved) = queued.await.expect("joined");
    assert_eq!(waited, Duration::from_secs(1), "waited for x to reset");
    limiter.release(&mut moved);
    let started = Instant::now();
    let edit_after = limiter.acquire(&token(), &edit, false).await.expect("edit");
    assert!(
        Arc::ptr_eq(&moved.bucket, &edit_after.bucket),
        "one bucket for both routes"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_global_limit_is_never_passed_in_any_second() {
    let limiter = Arc::new(Limiter::new(2, 100, Duration::from_secs(60)));
    let started = Instant::now();
    let mut at = Vec::new();
    for i in 0..5 {
        let key = route_key("GET", &format!("/api/v10/channels/{i}"));
        let p = limiter.acquire(&token(), &key, false).await.expect("sent");
        at.push(started.elapsed());
        drop(p);
    }
    assert_eq!(
        at,
        [0, 0, 1, 1, 2].map(Duration::from_secs).to_vec(),
        "2 per second"
    );
    // Interaction callbacks are not bound by it.
    let key = route_key("POST", "/api/v10/interactions/1/tok/callback");
    let before = Instant::now();
    limiter.acquire(&token(), &key, true).await.expect("exempt");
    assert_eq!(before.elapsed(), Duration::ZERO);
    // Another token has a limit of its own.
    let other = TokenId::of(Some("Bot another-token-wxyz"));
    let before = Instant::now();
    limiter
        .acquire(&other, &route_key("GET", "/api/v10/channels/9"), false)
        .await
        .expect("other token");
    assert_eq!(before.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_global_slot_is_held_for_the_answer_time_too() {
    // Discord counts a request when it arrives, up to its answer: with
    // answers taking 200 ms, the third request of a 2-per-second limit
    // goes 1.2 s after the first, not 1 s.
    let limiter = Arc::new(Limiter::new(2, 100, Duration::from_secs(60)));
    let started = Instant::now();
    let mut at = Vec::new();
    for i in 0..3 {
        let key = route_key("GET", &format!("/api/v10/channels/{i}"));
        let mut p = limiter.acquire(&token(), &key, false).await.expect("sent");
        at.push(started.elapsed());
        if i < 2 {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                limiter.answered(&p);
                limiter.release(&mut p);
            });
        }
    }
    assert_eq!(
        at,
        vec![Duration::ZERO, Duration::ZERO, Duration::from_millis(1200)]
    );
    // A slow answer adds at most MAX_MARGIN.
    let mut p = limiter
        .acquire(&token(), &route_key("GET", "/api/v10/channels/9"), false)
        .await
        .expect("sent");
    tokio::time::sleep(Duration::from_secs(5)).await;
    limiter.answered(&p);
    limiter.release(&mut p);
    let st = limiter.lock();
    let hold = st.globals.get(&token().key).expect("token").hold();
    assert_eq!(hold, Duration::from_secs(1) + MAX_MARGIN);
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_max_queue_wait_is_refused_at_once() {
    let limiter = Limiter::new(1000, 100, Duration::from_secs(2));
    let key = route_key("POST", "/api/v10/channels/1/messages");
    let mut p = limiter.acquire(&token(), &key, false).await.expect("first");
    limiter.learn(&p, &headers("b", 5, 0, 5.0));
    limiter.release(&mut p);
    drop(p);
    let started = Instant::now();
    match limiter.acquire(&token(), &key, false).await {
        Err(Refusal::QueueWait { wait, global }) => {
            assert_eq!(wait, Duration::from_secs(5));
            assert!(!global);
        }
        Err(other) => panic!("wrong refusal {other:?}"),
        Ok(_) => panic!("should be refused"),
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
    // Within the bound it waits instead.
    tokio::time::advance(Duration::from_secs(4)).await;
    let p = limiter
        .acquire(&token(), &key, false)
        .await
        .expect("waits 1 s");
    assert!(p.waited_bucket >= Duration::from_secs(1));

    // The global limit counts too: 1 per second, one sent and two ahead → 3 s.
    let limiter = Limiter::new(1, 100, Duration::from_millis(2500));
    // One sent now, two waiting their turn.
    let first = limiter
        .acquire(&token(), &route_key("GET", "/api/v10/guilds/0"), false)
        .await
        .expect("first");
    drop(first);
    {
        // As two requests in wait_global would count themselves.
        let mut st = limiter.lock();
        st.globals.entry(token().key).or_default().waiting = 2;
    }
    match limiter
        .acquire(&token(), &route_key("GET", "/api/v10/guilds/9"), false)
        .await
    {
        Err(Refusal::QueueWait { wait, global }) => {
            assert_eq!(wait, Duration::from_secs(3));
            assert!(global);
        }
        Err(other) => panic!("wrong refusal {other:?}"),
        Ok(_) => panic!("should be refused"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_queue_behind_an_exhausted_bucket_projects_whole_windows() {
    let limiter = Arc::new(Limiter::new(1000, 100, Duration::from_millis(2500)));
    let key = route_key("POST", "/api/v10/channels/1/messages");
    let mut p = limiter.acquire(&token(), &key, false).await.expect("first");
    limiter.learn(&p, &headers("b", 1, 0, 1.0));
    limiter.release(&mut p);
    drop(p);
    // Two queued: the next waits 1 s for the reset, then 1 s per window.
    let mut held = Vec::new();
    for _ in 0..2 {
        let limiter = limiter.clone();
        let key = key.clone();
        held.push(tokio::spawn(async move {
            let mut p = limiter.acquire(&token(), &key, false).await.expect("q");
            limiter.learn(&p, &headers("b", 1, 0, 1.0));
            limiter.release(&mut p);
        }));
        tokio::task::yield_now().await;
    }
    // Ahead: 2, remaining 0, limit 1 → 1 s + 2 windows = 3 s > 2.5 s.
    match limiter.acquire(&token(), &key, false).await {
        Err(Refusal::QueueWait { wait, .. }) => assert_eq!(wait, Duration::from_secs(3)),
        Err(other) => panic!("wrong refusal {other:?}"),
        Ok(_) => panic!("should be refused"),
    }
    for t in held {
        t.await.expect("task");
    }
}

#[tokio::test(start_paused = true)]
async fn the_invalid_request_window_slides_over_ten_minutes() {
    let limiter = Limiter::new(1000, 3, Duration::from_secs(10));
    let key = route_key("GET", "/api/v10/users/@me");
    for _ in 0..2 {
        limiter.count_invalid();
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert!(limiter.acquire(&token(), &key, false).await.is_ok());
    limiter.count_invalid();
    match limiter.acquire(&token(), &key, false).await {
        Err(Refusal::InvalidRequests { count, clears_in }) => {
            assert_eq!(count, 3);
            // The oldest (t = 0) leaves at 600 s; now is 120 s.
            assert_eq!(clears_in, Duration::from_secs(480));
        }
        Err(other) => panic!("wrong refusal {other:?}"),
        Ok(_) => panic!("the guard should trip"),
    }
    tokio::time::advance(Duration::from_secs(480)).await;
    assert_eq!(limiter.invalid_count(), 2);
    assert!(limiter.acquire(&token(), &key, false).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_upstream_global_429_holds_every_route_of_the_token() {
    let limiter = Limiter::new(1000, 100, Duration::from_secs(30));
    let a = route_key("GET", "/api/v10/channels/1");
    let p = limiter.acquire(&token(), &a, false).await.expect("a");
    limiter.rate_limited(&p, Duration::from_secs(3), true);
    drop(p);
    let started = Instant::now();
    let _p = limiter
        .acquire(&token(), &route_key("GET", "/api/v10/guilds/2"), false)
        .await
        .expect("b");
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn idle_buckets_are_forgotten_but_pending_ones_kept() {
    let limiter = Limiter::new(100_000, 100, Duration::from_secs(30));
    // One bucket still in its window.
    let held = route_key("POST", "/api/v10/channels/1/messages");
    let mut p = limiter.acquire(&token(), &held, true).await.expect("held");
    limiter.learn(&p, &headers("msg", 5, 0, 60.0));
    limiter.release(&mut p);
    drop(p);
    // Many whose windows pass.
    for i in 0..MAX_IDLE_BUCKETS as u64 {
        let key = route_key("GET", &format!("/api/v10/channels/{}", i + 10));
        let mut p = limiter.acquire(&token(), &key, true).await.expect("idle");
        limiter.learn(&p, &headers("get", 5, 4, 1.0));
        limiter.release(&mut p);
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    let key = route_key("GET", "/api/v10/channels/5");
    drop(
        limiter
            .acquire(&token(), &key, true)
            .await
            .expect("one more"),
    );
    let (buckets, remembered) = {
        let st = limiter.lock();
        (
            st.buckets.len(),
            st.routes.contains_key(&(token().key, held.clone())),
        )
    };
    assert!(buckets < 10, "idle buckets dropped: {buckets}");
    assert!(remembered, "the bucket still in its window is remembered");
    // And still obeyed.
    match limiter.acquire(&token(), &held, true).await {
        Err(Refusal::QueueWait { wait, .. }) => assert!(wait > Duration::from_secs(30)),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(start_paused = true)]
async fn a_401_on_one_webhook_route_locks_nothing_else() {
    let limiter = Limiter::new(50, 100, Duration::from_secs(10));
    let deleted = route_key("POST", "/api/v10/webhooks/5/deleted-token");
    // The front door's handling of a 401: counted as invalid, and its
    // answer (no rate-limit headers) learned.
    let mut p = limiter
        .acquire(&token(), &deleted, false)
        .await
        .expect("sent");
    limiter.count_invalid();
    limiter.learn(&p, &BucketHeaders::default());
    limiter.release(&mut p);
    drop(p);
    let started = Instant::now();
    for path in [
        "/api/v10/webhooks/6/live-token",
        "/api/v10/channels/1/messages",
        "/api/v10/webhooks/5/deleted-token",
    ] {
        let p = limiter
            .acquire(&token(), &route_key("POST", path), false)
            .await
            .expect("not refused");
        drop(p);
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing waited");
    assert_eq!(limiter.invalid_count(), 1);
}
