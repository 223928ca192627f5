use super::*;

#[test]
fn backoff_grows_is_capped_and_jittered() {
    let min = Duration::from_millis(500);
    let max = Duration::from_secs(60);
    let delays: Vec<Duration> = reconnect_backoff(min, max).take(40).collect();
    assert_eq!(delays.len(), 40, "never gives up");
    assert!(
        delays.iter().all(|d| *d >= min && *d <= max * 2),
        "{delays:?}"
    );
    assert!(delays[6] > delays[0] * 8, "grows exponentially: {delays:?}");
    let capped = &delays[20..];
    assert!(
        capped.iter().all(|d| *d >= max),
        "stays at the cap: {capped:?}"
    );
    let other: Vec<Duration> = reconnect_backoff(min, max).take(40).collect();
    assert_ne!(
        delays, other,
        "jittered: two shards do not retry in lockstep"
    );
}

#[test]
fn a_close_reason_comes_before_the_tables_advice() {
    let detail = close_detail(Some(4002), "missing User-Agent header");
    assert!(
        detail.starts_with(
            "Discord closed the connection with 4002, reason \"missing User-Agent header\""
        ),
        "{detail}"
    );
    assert!(detail.contains("usually means"), "{detail}");
    let detail = close_detail(Some(4000), "");
    assert_eq!(
        detail,
        "Discord closed the connection with 4000 (Unknown error): Discord-side error"
    );
    assert_eq!(
        close_detail(None, "x"),
        "Discord closed the connection without a code"
    );
}

#[test]
fn an_identify_retry_names_one_step_and_the_queue_wait() {
    let (text, eta) = identify_step(
        Duration::from_millis(613),
        Duration::from_millis(5020),
        false,
    );
    assert_eq!(
        text,
        "identifying in 5020 ms (613 ms backoff, then its turn in the identify queue)"
    );
    assert_eq!(eta, Duration::from_millis(5020));
    assert!(!text.contains("resum"));
    let (text, eta) = identify_step(Duration::from_millis(613), Duration::ZERO, false);
    assert_eq!(
        (text.as_str(), eta),
        ("identifying in 613 ms", Duration::from_millis(613))
    );
    let (text, _) = identify_step(
        Duration::from_millis(100),
        Duration::from_millis(5020),
        true,
    );
    assert!(
        text.starts_with("identifying in at least 5020 ms"),
        "{text}"
    );
}

#[test]
fn connect_url_appends_query() {
    assert_eq!(
        connect_url("wss://gateway.discord.gg", Compression::ZlibStream),
        "wss://gateway.discord.gg/?v=10&encoding=json&compress=zlib-stream"
    );
    assert_eq!(
        connect_url("wss://gateway-us-east1-b.discord.gg/", Compression::None),
        "wss://gateway-us-east1-b.discord.gg/?v=10&encoding=json"
    );
    assert_eq!(
        connect_url("ws://127.0.0.1:9/resume?old=1", Compression::ZstdStream),
        "ws://127.0.0.1:9/resume?v=10&encoding=json&compress=zstd-stream"
    );
}

#[test]
fn resume_urls_must_be_tls_off_loopback() {
    assert!(gateway_url_ok("wss://gateway.discord.gg"));
    assert!(gateway_url_ok("ws://127.0.0.1:4000/resume"));
    assert!(!gateway_url_ok("ws://gateway.discord.gg"));
    assert!(!gateway_url_ok("https://gateway.discord.gg"));
}
