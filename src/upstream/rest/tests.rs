use super::*;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SECRET: &str = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.s3cr3t-t0ken-body-wxyz";
const GOOD: &str = r#"{"url":"wss://gateway.discord.gg","shards":9,"session_start_limit":{"total":1000,"remaining":999,"reset_after":14400000,"max_concurrency":1}}"#;

fn token() -> Token {
    Token::new(SECRET)
}

fn api(base: &str) -> Arc<ApiClient> {
    ApiClient::new(base).expect("a valid api_base")
}

fn response(status_line: &str, headers: &[&str], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status_line}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    // The canned server closes each connection after one answer.
    out.push_str(&format!(
        "Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

fn ok(body: &str) -> Vec<u8> {
    response("200 OK", &["Content-Type: application/json"], body)
}

/// Read one request head from a connection.
async fn read_request(socket: &mut TcpStream) -> String {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}

/// A loopback server answering each connection with the next canned
/// response, then closing it. Yields the api_base and the requests read.
async fn serve(responses: Vec<Vec<u8>>) -> (String, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = tokio::spawn(async move {
        let mut requests = Vec::new();
        for canned in responses {
            let (mut socket, _) = listener.accept().await.unwrap();
            requests.push(read_request(&mut socket).await);
            let _ = socket.write_all(&canned).await;
            let _ = socket.shutdown().await;
        }
        requests
    });
    (format!("http://127.0.0.1:{port}/api/v10"), handle)
}

async fn one(canned: Vec<u8>) -> Result<GatewayBot, RestError> {
    let (base, server) = serve(vec![canned]).await;
    let result = get_gateway_bot(&api(&base), &token()).await;
    server.abort();
    result
}

fn assert_no_secret(err: &RestError) {
    let display = err.to_string();
    let debug = format!("{err:?}");
    assert!(!display.contains(SECRET), "token in Display: {display}");
    assert!(!debug.contains(SECRET), "token in Debug: {debug}");
    assert!(
        !display.contains("s3cr3t"),
        "token part in Display: {display}"
    );
    assert!(!debug.contains("s3cr3t"), "token part in Debug: {debug}");
}

#[tokio::test]
async fn ok_with_content_length() {
    let info = one(ok(GOOD)).await.unwrap();
    assert_eq!(info.url, "wss://gateway.discord.gg");
    assert_eq!(info.shards, 9);
    let limit = &info.session_start_limit;
    assert_eq!(
        (
            limit.total,
            limit.remaining,
            limit.reset_after,
            limit.max_concurrency
        ),
        (1000, 999, 14_400_000, 1)
    );
}

#[tokio::test]
async fn ok_chunked_with_extension_and_trailer() {
    let (a, b) = GOOD.split_at(40);
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nX-Trailer: yes\r\n\r\n",
        a.len(),
        b.len()
    );
    let info = one(raw.into_bytes()).await.unwrap();
    assert_eq!(info.shards, 9);
}

#[tokio::test]
async fn ok_read_to_eof_without_length() {
    let raw = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{GOOD}");
    let info = one(raw.into_bytes()).await.unwrap();
    assert_eq!(info.session_start_limit.total, 1000);
}

#[tokio::test]
async fn request_has_path_and_headers() {
    let (base, server) = serve(vec![ok(GOOD)]).await;
    get_gateway_bot(&api(&format!("{base}/")), &token())
        .await
        .unwrap();
    let requests = server.await.unwrap();
    let request = &requests[0];
    let port = base.split(':').nth(2).unwrap().split('/').next().unwrap();
    assert!(
        request.starts_with("GET /api/v10/gateway/bot HTTP/1.1\r\n"),
        "{request}"
    );
    // Header names are case-insensitive (hyper sends them lower-case).
    let lower = request.to_ascii_lowercase();
    let has = |line: &str| lower.contains(&format!("\r\n{}\r\n", line.to_ascii_lowercase()));
    assert!(has(&format!("Authorization: Bot {SECRET}")), "{request}");
    assert!(has(&format!("Host: 127.0.0.1:{port}")), "{request}");
    assert!(has(
        "User-Agent: DiscordBot (https://github.com/shardwarden/shardwarden, 0.1.0)"
    ));
    assert!(has("Accept: application/json"), "{request}");
}

#[tokio::test]
async fn unauthorized_is_fatal_and_names_the_fingerprint_only() {
    let body = r#"{"message": "401: Unauthorized", "code": 0}"#;
    let err = one(response("401 Unauthorized", &[], body))
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unauthorized), "{err:?}");
    assert_eq!(err.status, Some(401));
    assert_eq!(err.code, Some(0));
    assert!(!err.is_retryable());
    assert!(err.message.contains("…wxyz"), "{err}");
    assert!(err.message.contains("Reset Token"), "{err}");
    assert!(err.message.contains("401: Unauthorized"), "{err}");
    assert_no_secret(&err);
}

#[tokio::test]
async fn unauthorized_is_not_retried() {
    let (base, server) = serve(vec![
        response(
            "401 Unauthorized",
            &[],
            r#"{"message":"401: Unauthorized","code":0}"#,
        ),
        ok(GOOD),
    ])
    .await;
    let err = get_gateway_bot_with_retry(&api(&base), &token(), None, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unauthorized));
    assert!(!server.is_finished());
    server.abort();
}

#[tokio::test]
async fn forbidden() {
    let body = r#"{"message": "Missing Access", "code": 50001}"#;
    let err = one(response("403 Forbidden", &[], body)).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Forbidden), "{err:?}");
    assert_eq!((err.status, err.code), (Some(403), Some(50001)));
    assert!(!err.is_retryable());
    assert!(err.message.contains("Missing Access"), "{err}");
    assert!(err.message.contains("Cloudflare"), "{err}");
    assert_no_secret(&err);
}

#[tokio::test]
async fn rate_limited_reads_header_and_json() {
    let err = one(response("429 Too Many Requests", &["Retry-After: 3"], ""))
        .await
        .unwrap_err();
    match err.kind {
        RestErrorKind::RateLimited { retry_after } => {
            assert_eq!(retry_after, Duration::from_secs(3))
        }
        ref other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());

    let body = r#"{"message": "You are being rate limited.", "retry_after": 4.5, "global": true, "code": 0}"#;
    let err = one(response("429 Too Many Requests", &["Retry-After: 4"], body))
        .await
        .unwrap_err();
    match err.kind {
        RestErrorKind::RateLimited { retry_after } => {
            assert_eq!(retry_after, Duration::from_millis(4500))
        }
        ref other => panic!("{other:?}"),
    }
    assert!(err.message.contains("global"), "{err}");
    assert!(err.message.contains("4.500 s"), "{err}");
}

#[tokio::test]
async fn rate_limit_retry_after_is_honoured_over_sockets() {
    let token = token();
    let (base, server) = serve(vec![
        response(
            "429 Too Many Requests",
            &["Retry-After: 1"],
            r#"{"message":"You are being rate limited.","retry_after":0.8,"global":false}"#,
        ),
        ok(GOOD),
    ])
    .await;
    let started = std::time::Instant::now();
    let client = api(&base);
    let info = retry(
        tiny_backoff(),
        Duration::from_secs(30),
        &TokioClock::start(),
        || get_gateway_bot(&client, &token),
    )
    .await
    .unwrap();
    assert_eq!(info.shards, 9);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(server.await.unwrap().len(), 2);
}

#[tokio::test]
async fn server_error_then_success() {
    let token = token();
    let (base, server) = serve(vec![
        response(
            "502 Bad Gateway",
            &["Content-Type: text/html"],
            "<html>bad gateway</html>",
        ),
        response(
            "500 Internal Server Error",
            &[],
            r#"{"message":"500: Internal Server Error","code":0}"#,
        ),
        ok(GOOD),
    ])
    .await;
    let client = api(&base);
    let info = retry(
        tiny_backoff(),
        Duration::from_secs(30),
        &TokioClock::start(),
        || get_gateway_bot(&client, &token),
    )
    .await
    .unwrap();
    assert_eq!(info.shards, 9);
    assert_eq!(server.await.unwrap().len(), 3);
}

#[tokio::test]
async fn server_error_is_classified() {
    let err = one(response("503 Service Unavailable", &[], ""))
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::ServerError), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.message.contains("Discord-side error, retrying"),
        "{err}"
    );
    assert!(err.message.contains("503 Service Unavailable"), "{err}");
}

#[tokio::test]
async fn other_status_is_unexpected() {
    let err = one(response(
        "404 Not Found",
        &[],
        r#"{"message":"404: Not Found","code":0}"#,
    ))
    .await
    .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.message.contains("api_base"), "{err}");
}

#[tokio::test]
async fn connection_refused_is_transport() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let err = get_gateway_bot(&api(&format!("http://127.0.0.1:{port}/api/v10")), &token())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.message.contains("127.0.0.1"), "{err}");
    assert!(err.message.to_lowercase().contains("refused"), "{err}");
    assert_no_secret(&err);
}

#[tokio::test]
async fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_request(&mut socket).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let base = format!("http://127.0.0.1:{port}/api/v10");
    let err = fetch(&api(&base), &token(), Duration::from_millis(300))
        .await
        .unwrap_err();
    server.abort();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
    assert!(err.message.contains("no answer"), "{err}");
    assert!(err.message.contains("300ms"), "{err}");
}

#[tokio::test]
async fn garbage_is_unexpected_and_truncation_is_transport() {
    let err = one(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(err.message.contains("valid HTTP/1.1"), "{err}");

    let err = one(b"HTTP/1.1 OK maybe\r\n\r\n".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");

    let err = one(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"url\":".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
    assert!(err.message.contains("reading the answer"), "{err}");

    let err = one(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");

    let err = one(Vec::new()).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
}

#[tokio::test]
async fn body_over_the_cap() {
    let err = one(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(err.message.contains("too large"), "{err}");

    let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(b"10000\r\n");
        chunked.extend(std::iter::repeat_n(b' ', 0x10000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let err = one(chunked).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(err.message.contains("too large"), "{err}");

    let mut unframed = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    unframed.extend(std::iter::repeat_n(b' ', MAX_BODY + 10));
    let err = one(unframed).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(err.message.contains("too large"), "{err}");
}

#[tokio::test]
async fn gateway_url_must_be_tls_unless_loopback() {
    let insecure = GOOD.replace("wss://gateway.discord.gg", "ws://gateway.discord.gg");
    let err = one(ok(&insecure)).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert!(err.message.contains("ws://gateway.discord.gg"), "{err}");

    let wrong_scheme = GOOD.replace("wss://gateway.discord.gg", "https://gateway.discord.gg");
    let err = one(ok(&wrong_scheme)).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");

    let loopback = GOOD.replace("wss://gateway.discord.gg", "ws://127.0.0.1:9999");
    assert_eq!(one(ok(&loopback)).await.unwrap().url, "ws://127.0.0.1:9999");
}

#[tokio::test]
async fn body_that_is_not_the_expected_json() {
    let err = one(ok(r#"{"url":"wss://gateway.discord.gg"}"#))
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    assert_eq!(err.status, Some(200));
    let err = one(ok("<html>captive portal</html>")).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
    let zero = GOOD.replace("\"shards\":9", "\"shards\":0");
    let err = one(ok(&zero)).await.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
}

#[tokio::test]
async fn token_never_in_any_error() {
    // A server echoing the request (with the Authorization header) back
    // inside Discord's JSON message field, and in a 200 body.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let echo = tokio::spawn(async move {
        for status in ["400 Bad Request", "401 Unauthorized", "200 OK"] {
            let (mut socket, _) = listener.accept().await.unwrap();
            let request = read_request(&mut socket).await;
            let body =
                serde_json::json!({ "message": request, "code": 1, "url": request }).to_string();
            let _ = socket.write_all(&response(status, &[], &body)).await;
        }
    });
    let base = format!("http://127.0.0.1:{port}/api/v10");
    let mut errors = Vec::new();
    for _ in 0..3 {
        errors.push(get_gateway_bot(&api(&base), &token()).await.unwrap_err());
    }
    echo.await.unwrap();
    assert!(errors[0].message.contains("…wxyz"), "{}", errors[0]);

    for canned in [
        response("403 Forbidden", &[], ""),
        response("429 Too Many Requests", &["Retry-After: 2"], ""),
        response("500 Internal Server Error", &[], ""),
        b"garbage".to_vec(),
        ok("{}"),
    ] {
        errors.push(one(canned).await.unwrap_err());
    }
    errors.push(
        get_gateway_bot(&api("http://127.0.0.1:1/api/v10"), &token())
            .await
            .unwrap_err(),
    );
    for err in &errors {
        assert_no_secret(err);
    }
}

#[tokio::test]
async fn a_cut_never_leaves_part_of_the_token() {
    // Discord's message field is quoted up to 200 characters; put the
    // token across that cut.
    let message = format!("{} Bot {SECRET} tail", "x".repeat(180));
    let body = serde_json::json!({ "message": message, "code": 0 }).to_string();
    let err = one(response("401 Unauthorized", &[], &body))
        .await
        .unwrap_err();
    assert!(!err.message.contains("MTIzNDU2"), "{err}");
    assert!(err.message.contains("Bot …\""), "{err}");
    assert_no_secret(&err);

    // A garbage answer is quoted up to 60 characters.
    let garbage = format!("{} {SECRET}\r\n", "GARBAGE".repeat(7));
    let err = one(garbage.into_bytes()).await.unwrap_err();
    assert!(!err.message.contains("MTIz"), "{err}");
    assert_no_secret(&err);
}

#[test]
fn clean_cuts_at_word_boundaries() {
    assert_eq!(clean("short", 10), "short");
    assert_eq!(clean("one two three", 9), "one two …");
    assert_eq!(clean("a\nb", 10), "a b");
    assert_eq!(clean("abcdefghijkl", 5), "…");
}

#[tokio::test]
async fn unsendable_token_is_refused_before_connecting() {
    let bad = Token::new("abc\r\nX-Injected: 1\r\nwxyz");
    let err = get_gateway_bot(&api("http://127.0.0.1:1/api/v10"), &bad)
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Unauthorized), "{err:?}");
    assert!(!err.message.contains("X-Injected"), "{err}");
    assert!(err.message.contains("…wxyz"), "{err}");
}

#[test]
fn insecure_api_base_is_refused() {
    let err = ApiClient::new("http://discord.com/api/v10")
        .err()
        .expect("refused");
    assert!(err.contains("loopback") || err.contains("https"), "{err}");
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let token = token();
    let client = api("https://discord.com/api/v10");
    let once = get_gateway_bot(&client, &token);
    assert_send(&once);
    let retrying = get_gateway_bot_with_retry(&client, &token, None, Duration::ZERO);
    assert_send(&retrying);
}

#[tokio::test]
async fn interim_answers_and_chunk_errors() {
    let raw = format!(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{GOOD}",
        GOOD.len()
    );
    assert_eq!(one(raw.into_bytes()).await.unwrap().shards, 9);
    let err = one(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
    let err = one(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec())
        .await
        .unwrap_err();
    assert!(!matches!(err.kind, RestErrorKind::Unauthorized), "{err:?}");
}

// The retry policy, in virtual time with canned outcomes.

fn tiny_backoff() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(40))
        .without_max_times()
}

fn err(kind: RestErrorKind, status: Option<u16>) -> RestError {
    RestError::new(kind, status, None, "canned".to_string())
}

/// Virtual time: sleeping advances it at once.
#[derive(Default)]
struct FakeClock(Mutex<Duration>);

impl RetryClock for FakeClock {
    fn elapsed(&self) -> Duration {
        *self.0.lock().unwrap()
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        *self.0.lock().unwrap() += duration;
        std::future::ready(())
    }
}

/// Run `retry` with the default policy over canned outcomes, returning
/// the result and the (virtual) time of each attempt since the start.
async fn run(
    outcomes: Vec<Result<u32, RestError>>,
    max_wait: Duration,
) -> (Result<u32, RestError>, Vec<Duration>) {
    let clock = FakeClock::default();
    let times = Mutex::new(Vec::new());
    let outcomes = Mutex::new(outcomes.into_iter());
    let result = retry(default_backoff(), max_wait, &clock, || {
        times.lock().unwrap().push(clock.elapsed());
        let next = outcomes.lock().unwrap().next();
        async move { next.unwrap_or_else(|| Err(err(RestErrorKind::ServerError, Some(500)))) }
    })
    .await;
    (result, times.into_inner().unwrap())
}

#[tokio::test]
async fn retry_after_is_the_least_wait() {
    let limited = err(
        RestErrorKind::RateLimited {
            retry_after: Duration::from_secs(7),
        },
        Some(429),
    );
    let (result, times) = run(vec![Err(limited), Ok(5)], Duration::from_secs(60)).await;
    assert_eq!(result.unwrap(), 5);
    assert_eq!(times.len(), 2);
    assert!(times[1] >= Duration::from_secs(7), "{times:?}");
    assert!(times[1] < Duration::from_secs(8), "{times:?}");
}

#[tokio::test]
async fn backoff_grows_is_capped_and_stops_at_max_wait() {
    let (result, times) = run(Vec::new(), Duration::from_secs(300)).await;
    let err = result.unwrap_err();
    assert!(matches!(err.kind, RestErrorKind::ServerError));
    let waits: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(waits.len() >= 8, "{waits:?}");
    assert!(waits[0] >= Duration::from_secs(1) && waits[0] < Duration::from_secs(2));
    assert!(waits[1] >= Duration::from_secs(2) && waits[1] < Duration::from_secs(4));
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(30)),
        "{waits:?}"
    );
    assert!(
        waits.iter().any(|w| *w >= Duration::from_secs(15)),
        "{waits:?}"
    );
    assert!(
        *times.last().unwrap() <= Duration::from_secs(300),
        "{times:?}"
    );
}

#[tokio::test]
async fn retry_after_beyond_max_wait_gives_up_at_once() {
    let limited = err(
        RestErrorKind::RateLimited {
            retry_after: Duration::from_secs(3600),
        },
        Some(429),
    );
    let (result, times) = run(vec![Err(limited), Ok(1)], Duration::from_secs(60)).await;
    assert!(matches!(
        result.unwrap_err().kind,
        RestErrorKind::RateLimited { .. }
    ));
    assert_eq!(times, vec![Duration::ZERO]);
}

#[tokio::test]
async fn fatal_errors_are_not_retried() {
    for kind in [
        RestErrorKind::Unauthorized,
        RestErrorKind::Forbidden,
        RestErrorKind::Unexpected,
    ] {
        let (result, times) = run(vec![Err(err(kind, None)), Ok(1)], Duration::from_secs(60)).await;
        assert!(result.is_err());
        assert_eq!(times.len(), 1);
    }
    let (result, times) = run(
        vec![Err(err(RestErrorKind::Transport, None)), Ok(1)],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(result.unwrap(), 1);
    assert_eq!(times.len(), 2);
}

#[tokio::test]
async fn failures_are_logged_without_the_token() {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // With a single registered dispatcher, tracing caches a callsite's
    // interest from whichever thread hits it first, so a parallel test
    // without a subscriber could silence our events. A second, inert
    // dispatcher makes tracing ask every live dispatcher instead.
    let _inert = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let _guard = tracing::subscriber::set_default(subscriber);
    let token = token();

    let (base, server) = serve(vec![
        response(
            "500 Internal Server Error",
            &[],
            r#"{"message":"boom","code":0}"#,
        ),
        response(
            "401 Unauthorized",
            &[],
            r#"{"message":"401: Unauthorized","code":0}"#,
        ),
    ])
    .await;
    let client = api(&base);
    let result = retry(
        tiny_backoff(),
        Duration::from_secs(30),
        &TokioClock::start(),
        || get_gateway_bot(&client, &token),
    )
    .await;
    assert!(matches!(
        result.unwrap_err().kind,
        RestErrorKind::Unauthorized
    ));
    server.await.unwrap();
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("status=500"), "{logs}");
    assert!(logs.contains("status=401"), "{logs}");
    assert!(logs.contains("attempt=1"), "{logs}");
    assert!(logs.contains("attempt=2"), "{logs}");
    assert!(logs.contains("next_retry_ms="), "{logs}");
    assert!(logs.contains("…wxyz"), "{logs}");
    assert!(!logs.contains("s3cr3t"), "{logs}");
}
