//! Minimal HTTP/1.1 server for the REST routes bot libraries call at login and use:
//! `GET /gateway[/bot]`, `GET /users/@me`, `GET /oauth2/applications/@me` (and
//! `/applications/@me`), `GET /channels/{id}` and `POST /channels/{id}/messages`, under
//! `/api/v10` and `/api/v9`. One request per connection (`Connection: close`); bodies by
//! `Content-Length` or chunked. Every answer carries Discord's rate-limit headers from a
//! fixed-window bucket per route and major parameter; an exhausted bucket answers 429 in
//! Discord's shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::world;
use super::{Inner, RestCall, RestFailure, State};

const MAX_HEAD: usize = 16 * 1024;
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
                        let _ = tokio::time::timeout(Duration::from_secs(10), handle(inner, stream)).await;
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

enum ReadError {
    /// Answer with this status, then close.
    Status(u16),
    /// The peer went away.
    Gone,
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), ReadError> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => Err(ReadError::Gone),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
    }
}

async fn read_request(stream: &mut TcpStream) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(2048);
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Status(400));
        }
        read_more(stream, &mut buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut req = Request {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let mut rest = buf.split_off(head_end + 4);
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        req.body = read_chunked(stream, rest).await?;
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| ReadError::Status(400))?;
        if len > MAX_BODY {
            return Err(ReadError::Status(413));
        }
        while rest.len() < len {
            read_more(stream, &mut rest).await?;
        }
        rest.truncate(len);
        req.body = rest;
    }
    Ok(req)
}

async fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(p) = find(&buf, b"\r\n") {
                break p;
            }
            if buf.len() > MAX_HEAD {
                return Err(ReadError::Status(400));
            }
            read_more(stream, &mut buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ReadError::Status(400))?;
        if body.len() + size > MAX_BODY {
            return Err(ReadError::Status(413));
        }
        buf.drain(..line_end + 2);
        if size == 0 {
            return Ok(body); // trailers, if any, are ignored
        }
        while buf.len() < size + 2 {
            read_more(stream, &mut buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

fn find(buf: &[u8], needle: &[u8]) -> Option<usize> {
    buf.windows(needle.len()).position(|w| w == needle)
}

/// A REST route: which one, and its major parameter.
enum Route {
    Gateway,
    GatewayBot,
    UsersMe,
    ApplicationMe,
    Channel(u64),
    ChannelMessages(u64),
}

impl Route {
    /// The route and its bucket key (`METHOD template major`) for a method and a path below
    /// `/api/vN`; `Err` with 404 or 405.
    fn parse(method: &str, path: &str) -> Result<(Route, String), u16> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let id = |s: &str| s.parse::<u64>().map_err(|_| 404u16);
        let (route, allowed) = match segs.as_slice() {
            ["gateway"] => (Route::Gateway, "GET"),
            ["gateway", "bot"] => (Route::GatewayBot, "GET"),
            ["users", "@me"] => (Route::UsersMe, "GET"),
            ["oauth2", "applications", "@me"] | ["applications", "@me"] => {
                (Route::ApplicationMe, "GET")
            }
            ["channels", c] => (Route::Channel(id(c)?), "GET"),
            ["channels", c, "messages"] => (Route::ChannelMessages(id(c)?), "POST"),
            _ => return Err(404),
        };
        if method != allowed {
            return Err(405);
        }
        let bucket = match &route {
            Route::Channel(c) => format!("{method} /channels/{{channel_id}} {c}"),
            Route::ChannelMessages(c) => format!("{method} /channels/{{channel_id}}/messages {c}"),
            _ => format!("{method} {path}"),
        };
        Ok((route, bucket))
    }
}

/// Discord's bucket hash is opaque; this one is stable per route template.
fn bucket_hash(key: &str) -> String {
    let template =
        key.rsplit_once(' ').map_or(
            key,
            |(t, major)| {
                if major.parse::<u64>().is_ok() { t } else { key }
            },
        );
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in template.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Takes one request from the bucket; returns the headers and, when exhausted, the
/// seconds to wait.
fn take_bucket(
    st: &mut State,
    key: &str,
    limit: (u32, Duration),
) -> (Vec<(String, String)>, Option<f64>) {
    let now = Instant::now();
    let (max, window) = (limit.0.max(1), limit.1);
    let entry = st.rest_buckets.entry(key.to_string()).or_insert((now, 0));
    if now.duration_since(entry.0) >= window {
        *entry = (now, 0);
    }
    let limited = entry.1 >= max;
    if !limited {
        entry.1 += 1;
    }
    let reset_after = window.saturating_sub(now.duration_since(entry.0));
    let reset_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + reset_after;
    let headers = vec![
        ("X-RateLimit-Limit".to_string(), max.to_string()),
        (
            "X-RateLimit-Remaining".to_string(),
            (max - entry.1.min(max)).to_string(),
        ),
        (
            "X-RateLimit-Reset".to_string(),
            format!("{:.3}", reset_at.as_secs_f64()),
        ),
        (
            "X-RateLimit-Reset-After".to_string(),
            format!("{:.3}", reset_after.as_secs_f64()),
        ),
        ("X-RateLimit-Bucket".to_string(), bucket_hash(key)),
    ];
    (headers, limited.then_some(reset_after.as_secs_f64()))
}

/// Injected failure for this request: `Some(Some(status, retry_after))`, `Some(None)` to hang up.
fn injected_failure(st: &mut State) -> Option<Option<(u16, Option<f64>)>> {
    match st.rest_failure.clone() {
        None => None,
        Some(RestFailure::Status(code, ra)) => Some(Some((code, ra))),
        Some(RestFailure::Hangup) => Some(None),
        Some(RestFailure::Shared { times, retry_after }) => {
            st.rest_failure = (times > 1).then_some(RestFailure::Shared {
                times: times - 1,
                retry_after,
            });
            (times > 0).then_some(Some((SHARED_429, Some(retry_after))))
        }
        Some(RestFailure::Global { times, retry_after }) => {
            st.rest_failure = (times > 1).then_some(RestFailure::Global {
                times: times - 1,
                retry_after,
            });
            (times > 0).then_some(Some((GLOBAL_429, Some(retry_after))))
        }
        Some(RestFailure::Count(n)) => {
            st.rest_failure = if n > 1 {
                Some(RestFailure::Count(n - 1))
            } else {
                None
            };
            if n > 0 { Some(Some((502, None))) } else { None }
        }
        Some(RestFailure::Times {
            times,
            status,
            retry_after,
        }) => {
            st.rest_failure = if times > 1 {
                Some(RestFailure::Times {
                    times: times - 1,
                    status,
                    retry_after,
                })
            } else {
                None
            };
            if times > 0 {
                Some(Some((status, retry_after)))
            } else {
                None
            }
        }
    }
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
    Response::ok(msg)
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
    }
}

async fn handle(inner: Arc<Inner>, mut stream: TcpStream) {
    let req = match read_request(&mut stream).await {
        Ok(r) => r,
        Err(ReadError::Status(s)) => {
            let _ = write_response(&mut stream, &error_response(s, None)).await;
            return;
        }
        Err(ReadError::Gone) => return,
    };
    let path = req.path.clone();
    let api_path = path
        .strip_prefix("/api/v10")
        .or_else(|| path.strip_prefix("/api/v9"));

    let resp = {
        let mut st = inner.lock();
        st.rest_requests += 1;
        let failure = injected_failure(&mut st);
        let resp = match api_path.map(|p| Route::parse(&req.method, p)) {
            None | Some(Err(404)) => error_response(404, None),
            Some(Err(s)) => error_response(s, None),
            Some(Ok((route, bucket))) => {
                let expected = format!("Bot {}", st.cfg.token);
                let authorized = req.header("authorization") == Some(expected.as_str());
                match failure {
                    Some(Some((code, ra))) => error_response(code, ra),
                    Some(None) => {
                        drop(st);
                        inner.notify_changed();
                        return; // hang up without a response
                    }
                    None if !authorized && !matches!(route, Route::Gateway) => {
                        error_response(401, None)
                    }
                    None => {
                        let limit = match route {
                            Route::ChannelMessages(_) => st.cfg.message_bucket,
                            _ => st.cfg.route_bucket,
                        };
                        let (headers, limited) = take_bucket(&mut st, &bucket, limit);
                        let mut r = match limited {
                            Some(wait) => error_response(429, Some(wait)),
                            None => route_response(&inner, &mut st, &route, &req),
                        };
                        r.extra_headers.extend(headers);
                        r
                    }
                }
            }
        };
        st.rest_calls.push(RestCall {
            method: req.method.clone(),
            path: path.clone(),
            user_agent: req.header("user-agent").map(str::to_string),
            status: resp.status,
            body: serde_json::from_slice(&req.body).ok(),
            at: Instant::now(),
        });
        resp
    };
    inner.notify_changed();
    let _ = write_response(&mut stream, &resp).await;
}

async fn write_response(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        reason(r.status),
        r.body.len()
    );
    for (k, v) in &r.extra_headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&r.body);
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(())
}
