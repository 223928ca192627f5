//! Minimal HTTP/1.1 server for the REST routes bot libraries call at login and use:
//! `GET /gateway[/bot]`, `GET /users/@me`, `GET /oauth2/applications/@me` (and
//! `/applications/@me`), `GET /channels/{id}`, `POST /channels/{id}/messages`,
//! `PATCH`/`DELETE /channels/{id}/messages/{id}` and
//! `POST /interactions/{id}/{token}/callback`, under `/api/v10` and `/api/v9`. Served by
//! hyper (HTTP/1.1 with keep-alive, as Discord's API).
//!
//! Rate limits as Discord applies them:
//! - Each route template belongs to a bucket (its own, or one shared with other templates,
//!   [`SimConfig::shared_buckets`]); a bucket is counted per major parameter (channel id,
//!   interaction id + token) in a fixed window that starts with its first request.
//! - The token's global limit ([`SimConfig::global_limit`] per second) is checked first,
//!   for every route but interaction callbacks; an exhausted one answers 429 with
//!   `X-RateLimit-Global: true` and scope `global`, and takes nothing from the bucket.
//! - Every answer to a known route with the bot's token carries `X-RateLimit-Limit`,
//!   `-Remaining`, `-Reset`, `-Reset-After` and `-Bucket`; 429s carry `Retry-After`,
//!   `X-RateLimit-Scope` and a body with `retry_after` (seconds), `global` and `code`.
//! - Injected failures (whole API or per route) answer before any limit is counted; they
//!   carry the bucket's headers without taking from it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::world;
use super::{Inner, LimitScope, RestCall, RestFailure, SimConfig, State};

/// Largest request body accepted (Discord's own limit for non-file requests is lower).
const MAX_BODY: usize = 1 << 20;
/// GUILD_MESSAGES intent: sessions without it get no MESSAGE_CREATE from guilds.
const GUILD_MESSAGES: u64 = 1 << 9;

pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        tokio::select! {
            res = listener.accept() => {
                if let Ok((stream, _)) = res {
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| handle(inner.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
            _ = super::wait_shutdown(&mut shutdown) => break,
        }
    }
}

struct Response {
    status: u16,
    body: String,
    extra_headers: Vec<(String, String)>,
}

impl Response {
    fn ok(body: Value) -> Response {
        Response {
            status: 200,
            body: body.to_string(),
            extra_headers: Vec::new(),
        }
    }

    fn no_content() -> Response {
        Response {
            status: 204,
            body: String::new(),
            extra_headers: Vec::new(),
        }
    }

    fn discord_error(status: u16, code: u32, message: &str) -> Response {
        Response {
            status,
            body: json!({"message": message, "code": code}).to_string(),
            extra_headers: Vec::new(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Stands for a 429 of `shared` scope in injected failures.
const SHARED_429: u16 = 1429;
/// Stands for a global 429 in injected failures.
const GLOBAL_429: u16 = 2429;

/// How long reading one request (head, then body) may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn error_response(status: u16, retry_after: Option<f64>) -> Response {
    let mut extra_headers = Vec::new();
    let (status, scope) = match status {
        SHARED_429 => (429, "shared"),
        GLOBAL_429 => (429, "global"),
        s => (s, "user"),
    };
    let body = match status {
        401 => json!({"message": "401: Unauthorized", "code": 0}),
        403 => json!({"message": "Missing Access", "code": 50001}),
        404 => json!({"message": "404: Not Found", "code": 0}),
        405 => json!({"message": "405: Method Not Allowed", "code": 0}),
        429 => {
            let ra = retry_after.unwrap_or(1.0).max(0.0);
            extra_headers.push(("Retry-After".into(), (ra.ceil() as u64).to_string()));
            extra_headers.push(("X-RateLimit-Scope".into(), scope.into()));
            let global = scope == "global";
            extra_headers.push(("X-RateLimit-Global".into(), global.to_string()));
            json!({"message": "You are being rate limited.", "retry_after": ra, "global": global, "code": 0})
        }
        s => json!({"message": format!("{s}: {}", reason(s)), "code": 0}),
    };
    Response {
        status,
        body: body.to_string(),
        extra_headers,
    }
}

/// A parsed request.
struct Request {
    method: String,
    /// Path without the query, trailing `/` removed.
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A REST route: which one, and its major parameter.
enum Route {
    Gateway,
    GatewayBot,
    UsersMe,
    ApplicationMe,
    Channel(u64),
    ChannelMessages(u64),
    /// `PATCH` or `DELETE` of one message: (channel, message).
    ChannelMessage(u64, u64),
    /// An interaction's callback: (interaction id, token).
    InteractionCallback(u64, String),
}

/// A request's route, as the rate limits see it.
struct Parsed {
    route: Route,
    /// `METHOD /template/{param}`, as Discord's docs write routes.
    template: String,
    /// The major parameter (channel id, interaction id and token), `""` when none.
    major: String,
}

impl Route {
    /// The route of a method and a path below `/api/vN`; `Err` with 404 or 405.
    fn parse(method: &str, path: &str) -> Result<Parsed, u16> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let id = |s: &str| s.parse::<u64>().map_err(|_| 404u16);
        let (route, allowed, template): (Route, &[&str], &str) = match segs.as_slice() {
            ["gateway"] => (Route::Gateway, &["GET"], path),
            ["gateway", "bot"] => (Route::GatewayBot, &["GET"], path),
            ["users", "@me"] => (Route::UsersMe, &["GET"], path),
            ["oauth2", "applications", "@me"] | ["applications", "@me"] => {
                (Route::ApplicationMe, &["GET"], path)
            }
            ["channels", c] => (Route::Channel(id(c)?), &["GET"], "/channels/{channel_id}"),
            ["channels", c, "messages"] => (
                Route::ChannelMessages(id(c)?),
                &["POST"],
                "/channels/{channel_id}/messages",
            ),
            ["channels", c, "messages", m] => (
                Route::ChannelMessage(id(c)?, id(m)?),
                &["PATCH", "DELETE"],
                "/channels/{channel_id}/messages/{message_id}",
            ),
            ["interactions", i, token, "callback"] => (
                Route::InteractionCallback(id(i)?, (*token).to_string()),
                &["POST"],
                "/interactions/{interaction_id}/{interaction_token}/callback",
            ),
            _ => return Err(404),
        };
        if !allowed.contains(&method) {
            return Err(405);
        }
        let major = match &route {
            Route::Channel(c) | Route::ChannelMessages(c) | Route::ChannelMessage(c, _) => {
                c.to_string()
            }
            Route::InteractionCallback(i, token) => format!("{i}/{token}"),
            _ => String::new(),
        };
        Ok(Parsed {
            template: format!("{method} {template}"),
            route,
            major,
        })
    }

    /// Interaction callbacks are not bound by the global limit, as on Discord.
    fn global_exempt(&self) -> bool {
        matches!(self, Route::InteractionCallback(..))
    }
}

/// The bucket of a route template: its hash (what `X-RateLimit-Bucket` says) and limit.
/// Discord's hash is opaque; this one is stable per template, or per shared group.
fn bucket_of(cfg: &SimConfig, template: &str) -> (String, (u32, Duration)) {
    let (name, limit) = match cfg
        .shared_buckets
        .iter()
        .find(|b| b.routes.iter().any(|r| r == template))
    {
        Some(shared) => (shared.routes.join("|"), shared.limit),
        None if template == "POST /channels/{channel_id}/messages" => {
            (template.to_string(), cfg.message_bucket)
        }
        None => (template.to_string(), cfg.route_bucket),
    };
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (format!("{h:016x}"), limit)
}

/// A fixed window: it starts with the first request after the previous one ended.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Window {
    start: Option<tokio::time::Instant>,
    used: u32,
}

impl Window {
    /// Takes one request (`take`) or only looks. Returns (remaining, reset after, whether
    /// the window was already full).
    fn count(&mut self, limit: (u32, Duration), take: bool) -> (u32, Duration, bool) {
        let now = tokio::time::Instant::now();
        let (max, length) = (limit.0.max(1), limit.1);
        let start = match self.start {
            Some(start) if now.duration_since(start) < length => start,
            _ if take => {
                self.used = 0;
                *self.start.insert(now)
            }
            // An idle bucket, only looked at: full and not started.
            _ => return (max, length, false),
        };
        let full = self.used >= max;
        if take && !full {
            self.used += 1;
        }
        let reset_after = length.saturating_sub(now.duration_since(start));
        (max - self.used.min(max), reset_after, full)
    }
}

/// Counts one request against a bucket (`take`) or only looks at it. Returns Discord's
/// headers for it and, when the window was full, the seconds to wait.
fn count_bucket(
    st: &mut State,
    hash: &str,
    major: &str,
    limit: (u32, Duration),
    take: bool,
) -> (Vec<(String, String)>, Option<f64>) {
    let window = st
        .rest_buckets
        .entry(format!("{hash} {major}"))
        .or_default();
    let (remaining, reset_after, full) = window.count(limit, take);
    let reset_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + reset_after;
    let headers = vec![
        ("X-RateLimit-Limit".to_string(), limit.0.max(1).to_string()),
        ("X-RateLimit-Remaining".to_string(), remaining.to_string()),
        (
            "X-RateLimit-Reset".to_string(),
            format!("{:.3}", reset_at.as_secs_f64()),
        ),
        (
            "X-RateLimit-Reset-After".to_string(),
            format!("{:.3}", reset_after.as_secs_f64()),
        ),
        ("X-RateLimit-Bucket".to_string(), hash.to_string()),
    ];
    (headers, full.then_some(reset_after.as_secs_f64()))
}

/// What an injected failure does to one request.
enum Injected {
    /// Answer with this status (a 429 with this retry_after).
    Status(u16, Option<f64>),
    /// Close the connection without an answer.
    Hangup,
}

/// Applies the injection in `slot` to one request, spending one of a counted failure
/// (the slot empties when none is left).
fn apply_failure(slot: &mut Option<RestFailure>) -> Option<Injected> {
    match slot.clone()? {
        RestFailure::Status(code, ra) => Some(Injected::Status(code, ra)),
        RestFailure::Hangup => Some(Injected::Hangup),
        RestFailure::Shared { times, retry_after } => {
            *slot = (times > 1).then_some(RestFailure::Shared {
                times: times - 1,
                retry_after,
            });
            (times > 0).then_some(Injected::Status(SHARED_429, Some(retry_after)))
        }
        RestFailure::Global { times, retry_after } => {
            *slot = (times > 1).then_some(RestFailure::Global {
                times: times - 1,
                retry_after,
            });
            (times > 0).then_some(Injected::Status(GLOBAL_429, Some(retry_after)))
        }
        RestFailure::Count(n) => {
            *slot = (n > 1).then_some(RestFailure::Count(n - 1));
            (n > 0).then_some(Injected::Status(502, None))
        }
        RestFailure::Times {
            times,
            status,
            retry_after,
        } => {
            *slot = (times > 1).then_some(RestFailure::Times {
                times: times - 1,
                status,
                retry_after,
            });
            (times > 0).then_some(Injected::Status(status, retry_after))
        }
    }
}

/// The injected failure for this request: the first route-scoped one that covers it,
/// else the whole API's.
fn injected_failure(st: &mut State, method: &str, api_path: Option<&str>) -> Option<Injected> {
    if let Some(path) = api_path
        && let Some(i) = st
            .route_failures
            .iter()
            .position(|(scope, _)| scope.covers(method, path))
    {
        let mut slot = Some(st.route_failures[i].1.clone());
        let injected = apply_failure(&mut slot);
        match slot {
            Some(left) => st.route_failures[i].1 = left,
            None => {
                st.route_failures.remove(i);
            }
        }
        if injected.is_some() {
            return injected;
        }
    }
    apply_failure(&mut st.rest_failure)
}

/// The injected delay before answering this request, if any.
fn injected_delay(st: &State, method: &str, api_path: Option<&str>) -> Option<Duration> {
    let path = api_path.unwrap_or("");
    st.route_delays
        .iter()
        .find(|(scope, _)| scope.covers(method, path))
        .map(|(_, d)| *d)
}

/// The JSON of a request body: plain JSON, or the `payload_json` part of a multipart form.
fn body_json(req: &Request) -> Result<Value, Response> {
    let invalid = || Response::discord_error(400, 50109, "The request body contains invalid JSON.");
    let ctype = req
        .header("content-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let marker = b"name=\"payload_json\"";
        let start = find(&req.body, marker).ok_or_else(invalid)?;
        let after = &req.body[start..];
        let data = find(after, b"\r\n\r\n").ok_or_else(invalid)? + 4;
        let end = find(&after[data..], b"\r\n--").ok_or_else(invalid)?;
        return serde_json::from_slice(&after[data..data + end]).map_err(|_| invalid());
    }
    serde_json::from_slice(&req.body).map_err(|_| invalid())
}

/// POST /channels/{id}/messages: validates, answers the message object, and dispatches its
/// MESSAGE_CREATE on the shard(s) owning the channel's guild.
fn create_message(st: &mut State, channel_id: u64, req: &Request) -> Response {
    let guild_id = world::guild_of(channel_id);
    if !st.guild_exists(guild_id) || world::channel_object(guild_id, channel_id).is_none() {
        return Response::discord_error(404, 10003, "Unknown Channel");
    }
    if !world::is_messageable(channel_id) {
        return Response::discord_error(400, 50008, "Cannot send messages in a non-text channel");
    }
    let body = match body_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let content = match body.get("content") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return invalid_form(
                "content",
                "STRING_TYPE_CONVERT",
                "Could not interpret value as string.",
            );
        }
    };
    if content.chars().count() > 2000 {
        return invalid_form(
            "content",
            "BASE_TYPE_MAX_LENGTH",
            "Must be 2000 or fewer in length.",
        );
    }
    let non_empty = |k: &str| {
        body.get(k)
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()) || v.is_object())
    };
    let has_other = ["embeds", "sticker_ids", "components", "attachments", "poll"]
        .iter()
        .any(|k| non_empty(k));
    if content.is_empty() && !has_other {
        return Response::discord_error(400, 50006, "Cannot send an empty message");
    }
    let tts = body.get("tts").and_then(Value::as_bool).unwrap_or(false);
    let mut msg = world::bot_message(channel_id, content, body.get("nonce"), tts);
    if let Some(e) = body.get("embeds").filter(|v| v.is_array()) {
        msg["embeds"] = e.clone();
    }
    if let Some(r) = body.get("message_reference").filter(|v| v.is_object()) {
        msg["message_reference"] = r.clone();
        msg["type"] = json!(19);
    }
    let gateway = world::gateway_message(msg.clone(), guild_id).to_string();
    st.dispatch_to_guild(guild_id, GUILD_MESSAGES, "MESSAGE_CREATE", &gateway);
    st.remember_bot_message(&msg);
    Response::ok(msg)
}

/// The bot's message `message_id` in `channel_id`, or Discord's 404.
fn own_message(st: &State, channel_id: u64, message_id: u64) -> Result<Value, Response> {
    let guild_id = world::guild_of(channel_id);
    if !st.guild_exists(guild_id) || world::channel_object(guild_id, channel_id).is_none() {
        return Err(Response::discord_error(404, 10003, "Unknown Channel"));
    }
    st.bot_messages
        .get(&message_id)
        .filter(|m| m["channel_id"].as_str().and_then(|c| c.parse().ok()) == Some(channel_id))
        .cloned()
        .ok_or_else(|| Response::discord_error(404, 10008, "Unknown Message"))
}

/// PATCH /channels/{id}/messages/{id}: edits the content of one of the bot's messages and
/// dispatches MESSAGE_UPDATE.
fn edit_message(st: &mut State, channel_id: u64, message_id: u64, req: &Request) -> Response {
    let mut msg = match own_message(st, channel_id, message_id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let body = match body_json(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match body.get("content") {
        None => {}
        Some(Value::Null) => msg["content"] = json!(""),
        Some(Value::String(s)) if s.chars().count() <= 2000 => msg["content"] = json!(s),
        Some(Value::String(_)) => {
            return invalid_form(
                "content",
                "BASE_TYPE_MAX_LENGTH",
                "Must be 2000 or fewer in length.",
            );
        }
        Some(_) => {
            return invalid_form(
                "content",
                "STRING_TYPE_CONVERT",
                "Could not interpret value as string.",
            );
        }
    }
    msg["edited_timestamp"] = json!(world::snowflake_timestamp(world::new_snowflake()));
    let guild_id = world::guild_of(channel_id);
    let gateway = world::gateway_message(msg.clone(), guild_id).to_string();
    st.dispatch_to_guild(guild_id, GUILD_MESSAGES, "MESSAGE_UPDATE", &gateway);
    st.bot_messages.insert(message_id, msg.clone());
    Response::ok(msg)
}

/// DELETE /channels/{id}/messages/{id}: 204, and MESSAGE_DELETE on the gateway.
fn delete_message(st: &mut State, channel_id: u64, message_id: u64) -> Response {
    if let Err(r) = own_message(st, channel_id, message_id) {
        return r;
    }
    st.bot_messages.remove(&message_id);
    let guild_id = world::guild_of(channel_id);
    let d = json!({
        "id": message_id.to_string(),
        "channel_id": channel_id.to_string(),
        "guild_id": guild_id.to_string(),
    });
    st.dispatch_to_guild(guild_id, GUILD_MESSAGES, "MESSAGE_DELETE", &d.to_string());
    Response::no_content()
}

fn invalid_form(field: &str, code: &str, message: &str) -> Response {
    Response {
        status: 400,
        body: json!({
            "message": "Invalid Form Body",
            "code": 50035,
            "errors": {field: {"_errors": [{"code": code, "message": message}]}}
        })
        .to_string(),
        extra_headers: Vec::new(),
    }
}

fn route_response(inner: &Inner, st: &mut State, route: &Route, req: &Request) -> Response {
    match route {
        Route::Gateway => Response::ok(json!({"url": inner.gateway_url()})),
        Route::GatewayBot => {
            let c = &st.cfg;
            Response::ok(json!({
                "url": inner.gateway_url(),
                "shards": c.shards,
                "session_start_limit": {
                    "total": c.session_start_total,
                    "remaining": c.session_start_remaining,
                    "reset_after": c.reset_after_ms,
                    "max_concurrency": c.max_concurrency,
                }
            }))
        }
        Route::UsersMe => Response::ok(world::bot_user()),
        Route::ApplicationMe => Response::ok(world::application()),
        Route::Channel(c) => {
            let g = world::guild_of(*c);
            match world::channel_object(g, *c).filter(|_| st.guild_exists(g)) {
                Some(obj) => Response::ok(obj),
                None => Response::discord_error(404, 10003, "Unknown Channel"),
            }
        }
        Route::ChannelMessages(c) => create_message(st, *c, req),
        Route::ChannelMessage(c, m) if req.method == "PATCH" => edit_message(st, *c, *m, req),
        Route::ChannelMessage(c, m) => delete_message(st, *c, *m),
        // Any interaction is accepted: the simulator does not send interactions.
        Route::InteractionCallback(..) => Response::no_content(),
    }
}

/// The answer to a request of a known route: its bucket and the global limit counted, or
/// the injected failure.
fn answer_route(
    inner: &Inner,
    st: &mut State,
    parsed: &Parsed,
    req: &Request,
    failure: Option<(u16, Option<f64>)>,
) -> (Response, Option<String>) {
    let route = &parsed.route;
    let (hash, limit) = bucket_of(&st.cfg, &parsed.template);
    let bucket = Some(format!("{hash} {}", parsed.major));
    let expected = format!("Bot {}", st.cfg.token);
    let authorized = req.header("authorization") == Some(expected.as_str());
    let needs_token = !matches!(route, Route::Gateway | Route::InteractionCallback(..));
    if let Some((code, ra)) = failure {
        let mut r = error_response(code, ra);
        if authorized || !needs_token {
            r.extra_headers
                .extend(count_bucket(st, &hash, &parsed.major, limit, false).0);
        }
        return (r, bucket);
    }
    if needs_token && !authorized {
        return (error_response(401, None), bucket);
    }
    if !route.global_exempt()
        && let Some(per_second) = st.cfg.global_limit
    {
        let (_, reset_after, full) = st
            .rest_global
            .count((per_second, Duration::from_secs(1)), true);
        if full {
            let mut r = error_response(GLOBAL_429, Some(reset_after.as_secs_f64()));
            r.extra_headers
                .extend(count_bucket(st, &hash, &parsed.major, limit, false).0);
            return (r, bucket);
        }
    }
    let (headers, limited) = count_bucket(st, &hash, &parsed.major, limit, true);
    let mut r = match limited {
        Some(wait) => error_response(429, Some(wait)),
        None => route_response(inner, st, route, req),
    };
    r.extra_headers.extend(headers);
    (r, bucket)
}

/// The injected hang-up: the connection is closed without an answer.
fn hang_up() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "injected hang-up")
}

async fn handle(
    inner: Arc<Inner>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body =
        match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Ok(to_hyper(&error_response(413, None)));
            }
            // The client went away or stalled.
            _ => return Err(hang_up()),
        };
    let req = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().trim_end_matches('/').to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let path = req.path.clone();
    let api_path = path
        .strip_prefix("/api/v10")
        .or_else(|| path.strip_prefix("/api/v9"));

    let (resp, delay) = {
        let mut st = inner.lock();
        st.rest_requests += 1;
        let failure = match injected_failure(&mut st, &req.method, api_path) {
            Some(Injected::Hangup) => {
                drop(st);
                inner.notify_changed();
                return Err(hang_up());
            }
            Some(Injected::Status(code, ra)) => Some((code, ra)),
            None => None,
        };
        let parsed = api_path.map(|p| Route::parse(&req.method, p));
        let (resp, bucket, route) = match parsed {
            None | Some(Err(404)) => (error_response(404, None), None, None),
            Some(Err(s)) => (error_response(s, None), None, None),
            Some(Ok(parsed)) => {
                let (resp, bucket) = answer_route(&inner, &mut st, &parsed, &req, failure);
                (resp, bucket, Some(parsed.template))
            }
        };
        let scope = (resp.status == 429).then(|| scope_of(&resp));
        st.rest_calls.push(RestCall {
            method: req.method.clone(),
            path: path.clone(),
            user_agent: req.header("user-agent").map(str::to_string),
            status: resp.status,
            body: serde_json::from_slice(&req.body).ok(),
            at: std::time::Instant::now(),
            route,
            bucket,
            scope,
        });
        (resp, injected_delay(&st, &req.method, api_path))
    };
    inner.notify_changed();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    Ok(to_hyper(&resp))
}

/// The scope a 429 answer says.
fn scope_of(r: &Response) -> LimitScope {
    let scope = r
        .extra_headers
        .iter()
        .find(|(k, _)| k == "X-RateLimit-Scope")
        .map(|(_, v)| v.as_str());
    match scope {
        Some("global") => LimitScope::Global,
        Some("shared") => LimitScope::Shared,
        _ => LimitScope::User,
    }
}

fn to_hyper(r: &Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder().status(r.status);
    // A 204 has neither a body nor its headers (RFC 9110 §8.6).
    if r.status != 204 {
        builder = builder.header("Content-Type", "application/json");
    }
    for (k, v) in &r.extra_headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder
        .body(Full::new(Bytes::from(r.body.clone())))
        .unwrap_or_else(|_| {
            let mut fallback = hyper::Response::new(Full::new(Bytes::new()));
            *fallback.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            fallback
        })
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}
