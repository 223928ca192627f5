//! The front door's listener: one loopback port for HTTP and WebSocket
//! upgrades (hyper 1 serving, tokio-tungstenite on the upgraded
//! connection).
//!
//! - `GET /api[/v9|/v10]/gateway[/bot]` is answered here: `url` is this
//!   listener, `shards` the daemon's total, and a `session_start_limit` that
//!   never stops a library from starting every shard (client IDENTIFYs cost
//!   no Discord IDENTIFY).
//! - Every other `/api/…` request goes to `[discord] api_base` unchanged
//!   through the one rate limiter ([`super::ratelimit`], DESIGN.md §6), over
//!   a small pool of kept-alive connections. Request bodies up to 8 MiB are
//!   held so 429s, 5xx and transport failures can be retried; larger ones
//!   are streamed once. Successful answers are streamed back; error answers
//!   are read (to classify and log them) and returned unchanged. Each
//!   failure is logged once with its class, method, route (webhook and
//!   interaction tokens redacted, query left out), status, Discord's code
//!   and message, bucket, retries, latency and the token's last 4
//!   characters; the Authorization header is never logged.
//! - A WebSocket upgrade on any path becomes a gateway connection
//!   ([`super::gateway`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::Shared;
use super::gateway::{self, Params};
use crate::compression::Compression;
use crate::config::{ProxyConfig, Token};
use crate::hub::Hub;
use crate::upstream::http::{ApiClient, Class, body_failure};
use crate::upstream::rest_limiter;

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest frame accepted from a client before the 4096-byte check (a
/// larger one is refused with 4002 either way).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Most bytes queued for a client beyond what its socket took.
const MAX_WRITE_BUFFER: usize = 4 << 20;
/// Limit on Discord's answer headers to a forwarded request.
const UPSTREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection of the front door shares.
pub struct Ctx {
    /// The daemon's hub (event log, shard stats, command channels).
    pub hub: Arc<Hub>,
    /// State cache and sessions.
    pub shared: Arc<Shared>,
    /// The bot token clients must present.
    token: Token,
    /// The address bound (what `url` and `resume_gateway_url` name).
    pub listen: SocketAddr,
    /// HELLO's heartbeat interval.
    pub heartbeat: Duration,
    /// The daemon's IDENTIFY intents: a client may ask for a subset.
    pub daemon_intents: u64,
    /// Where REST requests go: the daemon's one HTTP client to `api_base`.
    upstream: Arc<ApiClient>,
    /// The one rate limiter of every REST request (DESIGN.md §6).
    pub limiter: Arc<rest_limiter::Limiter>,
    /// Changes to true on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

impl Ctx {
    /// Whether `presented` (with or without `Bot `) is the daemon's token.
    /// Compared in constant time.
    pub fn token_matches(&self, presented: &str) -> bool {
        let presented = presented.trim();
        let presented = presented.strip_prefix("Bot ").unwrap_or(presented);
        let expected = self.token.expose().as_bytes();
        let presented = presented.as_bytes();
        presented.len() == expected.len()
            && presented
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// The bound front door, ready to serve.
pub struct FrontDoor {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

impl FrontDoor {
    /// Bind `[proxy] listen`. Errors say what to change.
    pub async fn bind(
        config: &ProxyConfig,
        upstream: Arc<ApiClient>,
        limiter: Arc<rest_limiter::Limiter>,
        token: Token,
        daemon_intents: u64,
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<FrontDoor, String> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            format!(
                "[proxy] listen = \"{}\": cannot listen there ({e}); pick a free loopback port",
                config.listen
            )
        })?;
        let listen = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = hub.frontdoor.get_or_init(Default::default).clone();
        Ok(FrontDoor {
            listener,
            ctx: Arc::new(Ctx {
                hub,
                shared,
                token,
                listen,
                heartbeat: config.heartbeat_interval,
                daemon_intents,
                upstream,
                limiter,
                shutdown,
            }),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.ctx.listen
    }

    /// Accept connections until shutdown.
    pub async fn run(self) {
        let FrontDoor { listener, ctx } = self;
        tracing::info!(event = %"frontdoor_listening", listen = %ctx.listen, "drop-in front door on http://{0} and ws://{0}: point bot libraries here", ctx.listen);
        let mut shutdown = ctx.shutdown.clone();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(event = %"frontdoor_accept_failed", "front door accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(route(req, ctx, peer).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    tracing::debug!(peer = %peer, "front door HTTP connection ended: {e}");
                }
            });
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert("via", HeaderValue::from_static("shardwarden"));
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"message": message, "code": 0}).to_string();
    full(status, "application/json", body)
}

async fn route(req: Request<Incoming>, ctx: Arc<Ctx>, peer: SocketAddr) -> Response<Body> {
    if is_websocket_upgrade(&req) {
        return upgrade(req, ctx, peer);
    }
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/api") else {
        return json_error(
            StatusCode::NOT_FOUND,
            "404: Not Found (shardwarden serves /api/... and WebSocket upgrades)",
        );
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return json_error(StatusCode::NOT_FOUND, "404: Not Found");
    }
    let unversioned = strip_version(rest);
    if req.method() == Method::GET && (unversioned == "/gateway" || unversioned == "/gateway/bot") {
        return gateway_info(&req, &ctx, unversioned == "/gateway/bot");
    }
    forward(req, ctx).await
}

/// `/v10/x` → `/x`; unversioned paths stay.
fn strip_version(path: &str) -> &str {
    if let Some(after) = path.strip_prefix("/v") {
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && (after.len() == digits || after.as_bytes()[digits] == b'/') {
            return &after[digits..];
        }
    }
    path
}

/// `/gateway` and `/gateway/bot`, answered locally.
fn gateway_info(req: &Request<Incoming>, ctx: &Ctx, bot: bool) -> Response<Body> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Discord's /gateway needs no token; /gateway/bot does. A wrong token is
    // refused on both, as Discord refuses an invalid Authorization.
    let authorized = match presented {
        Some(value) => ctx.token_matches(value),
        None => !bot,
    };
    if !authorized {
        tracing::info!(event = %"frontdoor_unauthorized", path = %req.uri().path(), "refused a gateway info request with a missing or wrong bot token (401)");
        return json_error(StatusCode::UNAUTHORIZED, "401: Unauthorized");
    }
    // With a trailing slash: libraries append `?v=10…` literally, and a
    // request line of `GET ?v=10` (no path) is not valid HTTP; `/?v=10` is,
    // and so is twilight's `//?v=10`.
    let url = format!("ws://{}/", ctx.listen);
    let body = if bot {
        let total = ctx.hub.shard_total.max(1);
        serde_json::json!({
            "url": url,
            "shards": total,
            "session_start_limit": {
                "total": 1_000_000,
                "remaining": 1_000_000,
                "reset_after": 86_400_000,
                "max_concurrency": total,
            }
        })
    } else {
        serde_json::json!({ "url": url })
    };
    full(StatusCode::OK, "application/json", body.to_string())
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    req.method() == Method::GET
        && has(header::UPGRADE, "websocket")
        && has(header::CONNECTION, "upgrade")
}

/// Answer the upgrade (101) and hand the connection to the gateway task.
fn upgrade(mut req: Request<Incoming>, ctx: Arc<Ctx>, peer: SocketAddr) -> Response<Body> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "WebSocket upgrade without Sec-WebSocket-Key",
        );
    };
    let mut v: Result<u8, String> = Ok(10);
    let mut compression = Compression::None;
    for (name, value) in query_pairs(req.uri().query().unwrap_or("")) {
        match name.as_str() {
            "v" => {
                v = match value.as_str() {
                    "10" => Ok(10),
                    "9" => Ok(9),
                    other => Err(other.to_string()),
                }
            }
            "encoding" if value == "json" => {}
            "encoding" if value == "etf" => {
                tracing::warn!(event = %"dropin_refused", peer = %peer, "refused a client asking for encoding=etf: shardwarden passes Discord's JSON through untouched and speaks JSON only; configure the library for JSON (e.g. drop the ETF/erlpack option)");
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "encoding=etf is not supported by shardwarden: it relays Discord's JSON untouched; connect with encoding=json",
                );
            }
            "encoding" => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "encoding must be json (etf is not supported by shardwarden)",
                );
            }
            "compress" => match value.as_str() {
                "zlib-stream" => compression = Compression::ZlibStream,
                "zstd-stream" => compression = Compression::ZstdStream,
                "" | "none" => compression = Compression::None,
                _ => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        "compress must be zlib-stream, zstd-stream or absent",
                    );
                }
            },
            _ => {}
        }
    }
    let conn = ctx.shared.sessions.next_conn();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // A bounded write buffer, so a client that stops reading
                // blocks its writer (and gets dropped by the write limit)
                // instead of growing the buffer without end.
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_CLIENT_MESSAGE))
                    .max_frame_size(Some(MAX_CLIENT_MESSAGE))
                    .write_buffer_size(64 * 1024)
                    .max_write_buffer_size(MAX_WRITE_BUFFER);
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                tracing::debug!(conn, peer = %peer, compress = compression.name(), "drop-in client connected");
                gateway::serve(
                    ws,
                    Params {
                        v,
                        compression,
                        conn,
                        peer,
                    },
                    ctx,
                )
                .await;
            }
            Err(e) => tracing::debug!(peer = %peer, "WebSocket upgrade failed: {e}"),
        }
    });
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// `a=1&b=2` → pairs (percent-decoding is not needed for these keys).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), not forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request bodies up to this size are held so the request can be retried;
/// larger ones are streamed once, without retries.
const MAX_BUFFERED_BODY: u64 = 8 << 20;
/// Error bodies read to classify and log (Discord's are small).
const MAX_ERROR_BODY: usize = 1 << 20;
/// Upstream 429s waited out and retried before the 429 goes to the client.
const MAX_RATELIMIT_RETRIES: u32 = 3;
/// 5xx and transport failures retried (idempotent methods only).
const MAX_FAILURE_RETRIES: usize = 3;

/// A request body: held (retryable) or streamed once.
enum RequestBody {
    Held(Bytes),
    Stream(Option<Incoming>),
}

impl RequestBody {
    fn next(&mut self) -> Option<Body> {
        match self {
            RequestBody::Held(bytes) => Some(
                Full::new(bytes.clone())
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            ),
            RequestBody::Stream(body) => body.take().map(BodyExt::boxed),
        }
    }
}

/// The route with every id replaced, for metrics labels.
fn route_template(route: &str) -> String {
    route
        .split('/')
        .map(|s| {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                ":id"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The front door's own 429 (queue wait or invalid-request guard).
fn local_429(refusal: &rest_limiter::Refusal) -> Response<Body> {
    let (body, retry_after) = match refusal {
        rest_limiter::Refusal::QueueWait { wait, .. } => {
            let secs = (wait.as_secs_f64() * 1000.0).ceil() / 1000.0;
            (
                serde_json::json!({
                    "message": "You are being rate limited.",
                    "retry_after": secs,
                    "global": false,
                }),
                secs,
            )
        }
        rest_limiter::Refusal::InvalidRequests { count, clears_in } => {
            let secs = clears_in.as_secs_f64().ceil();
            (
                serde_json::json!({
                    "message": format!("shardwarden refused this request: {count} invalid requests (401, 403, 429) in the last 10 minutes reached [proxy] invalid_request_limit; Cloudflare bans a bot at 10,000. Requests resume in {secs} s, when the oldest leaves the window. Fix the failing calls (see the rest_failed log lines)."),
                    "limit": "invalid_request_limit",
                    "invalid_requests": count,
                    "clears_in": secs,
                    "retry_after": secs,
                    "global": true,
                    "code": 0,
                }),
                secs,
            )
        }
    };
    let mut response = full(
        StatusCode::TOO_MANY_REQUESTS,
        "application/json",
        body.to_string(),
    );
    if let Ok(v) = HeaderValue::from_str(&(retry_after.ceil() as u64).max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// `retry_after` of a 429: the body's (seconds, fractional), else the
/// `Retry-After` header; global from the body or `X-RateLimit-Global`.
fn retry_after_of(headers: &hyper::HeaderMap, body: &serde_json::Value) -> (Duration, bool) {
    let header_secs = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok());
    let secs = body
        .get("retry_after")
        .and_then(serde_json::Value::as_f64)
        .or(header_secs)
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0)
        .min(3600.0);
    let global = body
        .get("global")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
        || headers
            .get("x-ratelimit-global")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    (Duration::from_secs_f64(secs), global)
}

/// Forward one request to `api_base` through the rate limiter and return
/// its answer (DESIGN.md §6).
async fn forward(req: Request<Incoming>, ctx: Arc<Ctx>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = redacted_route(&path);
    let template = route_template(&route);
    let key = rest_limiter::route_key(method.as_str(), &path);
    let exempt = rest_limiter::is_interaction(&path);
    let token = rest_limiter::TokenId::of(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let upstream = &ctx.upstream;
    let uri = match upstream.forward_uri(&path_and_query) {
        Ok(uri) => uri,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let connection_listed: Vec<String> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .map(str::to_string)
        .chain(connection_listed)
    {
        parts.headers.remove(name.as_str());
    }
    if let Ok(host) = HeaderValue::from_str(upstream.authority()) {
        parts.headers.insert(header::HOST, host);
    }
    let mut body = match hyper::body::Body::size_hint(&body).exact() {
        Some(n) if n <= MAX_BUFFERED_BODY => match body.collect().await {
            Ok(collected) => RequestBody::Held(collected.to_bytes()),
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("could not read the request body: {e}"),
                );
            }
        },
        _ => RequestBody::Stream(Some(body)),
    };
    let held = matches!(body, RequestBody::Held(_));
    let idempotent = held
        && matches!(
            method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        );
    let limiter = &ctx.limiter;
    let mut permit = match limiter.acquire(&token, &key, exempt).await {
        Ok(permit) => permit,
        Err(refusal) => {
            let why = match &refusal {
                rest_limiter::Refusal::QueueWait { wait, global } => format!(
                    "its wait for the {} ({:.1} s) would pass [proxy] max_queue_wait; answered 429 at once so the client waits and retries",
                    if *global { "global limit" } else { "bucket" },
                    wait.as_secs_f64()
                ),
                rest_limiter::Refusal::InvalidRequests { count, clears_in } => format!(
                    "the invalid-request guard is tripped ({count} 401/403/429 in 10 min, [proxy] invalid_request_limit); clears in {:.0} s",
                    clears_in.as_secs_f64()
                ),
            };
            metrics::counter!("shardwarden_rest_local_429_total", "reason" => match refusal { rest_limiter::Refusal::QueueWait { .. } => "max_queue_wait", rest_limiter::Refusal::InvalidRequests { .. } => "invalid_request_limit" }).increment(1);
            tracing::warn!(event = %"rest_failed", class = %"ratelimit", method = %method, route = %route, status = 429, local = true, token = %token.fingerprint, latency_ms = started.elapsed().as_millis() as u64, "refused a REST request locally: {why}");
            return local_429(&refusal);
        }
    };
    let mut backoff = backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(MAX_FAILURE_RETRIES),
    );
    let mut retries = 0u32;
    let mut ratelimit_retries = 0u32;
    // What incident detection calls this route.
    let incident_route = format!("{method} {template}");
    let fail_log = |class: Class,
                    status: Option<u16>,
                    code: Option<i64>,
                    message: &str,
                    bucket: &str,
                    retries: u32| {
        let latency_ms = started.elapsed().as_millis() as u64;
        ctx.hub
            .observe_rest(&incident_route, class.is_discord_side());
        let class = class.as_str();
        metrics::counter!("shardwarden_rest_failures_total", "route" => template.clone(), "method" => method.to_string(), "class" => class).increment(1);
        tracing::warn!(event = %"rest_failed", class = %class, method = %method, route = %route, status = status.unwrap_or(0), code = code.unwrap_or(0), bucket = %bucket, retries, latency_ms, token = %token.fingerprint, "REST {method} {route} failed ({class}): {message}");
    };
    loop {
        let Some(next_body) = body.next() else {
            // A streamed body is gone after one attempt (not reached: such
            // requests are never retried).
            return json_error(StatusCode::BAD_GATEWAY, "request body already sent");
        };
        let mut request = Request::new(next_body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.version_mut() = hyper::Version::HTTP_11;
        *request.headers_mut() = parts.headers.clone();
        // A hung answer would hold the bucket's turn (and the client) with
        // no end: past this it is a transport failure.
        let result = upstream.send(request, UPSTREAM_ANSWER_TIMEOUT).await;
        if result.is_ok() {
            limiter.answered(&permit);
        }
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                if idempotent && let Some(delay) = backoff.next() {
                    retries += 1;
                    tracing::debug!(method = %method, route = %route, retries, "transport failure, retrying in {delay:?}: {}", e.message);
                    tokio::time::sleep(delay).await;
                    limiter.wait_again(&mut permit, exempt).await;
                    continue;
                }
                limiter.release(&mut permit);
                fail_log(
                    Class::Transport,
                    None,
                    None,
                    &e.message,
                    &permit.bucket_id(),
                    retries,
                );
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("shardwarden could not reach Discord: {}", e.message),
                );
            }
        };
        let status = response.status().as_u16();
        let learned = rest_limiter::BucketHeaders::from_headers(response.headers());
        // An answer from Discord without rate-limit headers means the route
        // has no bucket, so its requests need not go one at a time; a 5xx
        // or 429 without them (Cloudflare's, say) says nothing about it.
        if (status < 500 && status != 429)
            || learned.bucket.is_some()
            || learned.remaining.is_some()
        {
            limiter.learn(&permit, &learned);
        }
        metrics::counter!("shardwarden_rest_requests_total", "route" => template.clone(), "method" => method.to_string(), "status" => status_class(status)).increment(1);
        if status < 400 {
            limiter.release(&mut permit);
            ctx.hub.observe_rest(&incident_route, false);
            metrics::histogram!("shardwarden_rest_bucket_wait_seconds")
                .record(permit.waited_bucket.as_secs_f64());
            metrics::histogram!("shardwarden_rest_global_wait_seconds")
                .record(permit.waited_global.as_secs_f64());
            tracing::debug!(method = %method, route = %route, status, retries, latency_ms = started.elapsed().as_millis() as u64, "forwarded");
            let (mut parts, body) = response.into_parts();
            for name in HOP_BY_HOP {
                parts.headers.remove(*name);
            }
            return Response::from_parts(parts, body.boxed());
        }
        let (mut resp_parts, resp_body) = response.into_parts();
        for name in HOP_BY_HOP {
            resp_parts.headers.remove(*name);
        }
        let bytes = match http_body_util::Limited::new(resp_body, MAX_ERROR_BODY)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                if idempotent && let Some(delay) = backoff.next() {
                    retries += 1;
                    tokio::time::sleep(delay).await;
                    limiter.wait_again(&mut permit, exempt).await;
                    continue;
                }
                limiter.release(&mut permit);
                let e = body_failure(upstream.host(), &*e);
                fail_log(
                    Class::Transport,
                    Some(status),
                    None,
                    &e.message,
                    &permit.bucket_id(),
                    retries,
                );
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("shardwarden lost Discord's answer: {}", e.message),
                );
            }
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status == 429 {
            let scope = resp_parts
                .headers
                .get("x-ratelimit-scope")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("user")
                .to_ascii_lowercase();
            let (retry_after, global) = retry_after_of(&resp_parts.headers, &json);
            let scope_label = if global {
                "global".to_string()
            } else {
                scope.clone()
            };
            metrics::counter!("shardwarden_rest_429_total", "scope" => scope_label.clone())
                .increment(1);
            if scope != "shared" {
                limiter.count_invalid();
            }
            limiter.rate_limited(&permit, retry_after, global);
            if held && ratelimit_retries < MAX_RATELIMIT_RETRIES {
                ratelimit_retries += 1;
                retries += 1;
                tracing::info!(event = %"rest_429", method = %method, route = %route, scope = %scope_label, bucket = %permit.bucket_id(), retry_after_ms = retry_after.as_millis() as u64, token = %token.fingerprint, "Discord answered 429 ({scope_label}); waiting {:.3} s and retrying", retry_after.as_secs_f64());
                limiter.wait_again(&mut permit, exempt).await;
                continue;
            }
        } else if status >= 500 && idempotent {
            if let Some(delay) = backoff.next() {
                retries += 1;
                tracing::debug!(method = %method, route = %route, status, retries, "Discord answered {status}, retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                limiter.wait_again(&mut permit, exempt).await;
                continue;
            }
        } else if status == 401 || status == 403 {
            limiter.count_invalid();
        }
        limiter.release(&mut permit);
        let message = json
            .get("message")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        let code = json.get("code").and_then(serde_json::Value::as_i64);
        fail_log(
            Class::of_status(status).unwrap_or(Class::Payload),
            Some(status),
            code,
            &message,
            &permit.bucket_id(),
            retries,
        );
        return Response::from_parts(
            resp_parts,
            Full::new(bytes)
                .map_err(|never: Infallible| match never {})
                .boxed(),
        );
    }
}

/// The path for logs: ids kept, webhook and interaction tokens replaced.
fn redacted_route(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let after_id_of = |name: &str| {
            i >= 2 && segments[i - 2] == name && segments[i - 1].bytes().all(|b| b.is_ascii_digit())
        };
        if after_id_of("webhooks") || after_id_of("interactions") {
            out.push(":token");
        } else {
            out.push(segment);
        }
    }
    out.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stripped_only_when_they_are_versions() {
        assert_eq!(strip_version("/v10/gateway/bot"), "/gateway/bot");
        assert_eq!(strip_version("/v9/gateway"), "/gateway");
        assert_eq!(strip_version("/gateway"), "/gateway");
        assert_eq!(strip_version("/voice/regions"), "/voice/regions");
        assert_eq!(strip_version("/v10"), "");
    }

    #[test]
    fn routes_in_logs_lose_webhook_and_interaction_tokens() {
        assert_eq!(
            redacted_route("/api/v10/webhooks/123/secret-token/messages/@original"),
            "/api/v10/webhooks/123/:token/messages/@original"
        );
        assert_eq!(
            redacted_route("/api/v10/interactions/99/tok/callback"),
            "/api/v10/interactions/99/:token/callback"
        );
        assert_eq!(
            redacted_route("/api/v10/channels/5/messages"),
            "/api/v10/channels/5/messages"
        );
    }
}
