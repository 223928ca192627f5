//! The REST call shardwarden makes itself: `GET {api_base}/gateway/bot`,
//! which hands out the gateway URL, the recommended shard count and the
//! session-start budget (facts §1.1).
//!
//! The request goes through the daemon's one HTTP client ([`super::http`],
//! shared with the front door's forward), with a cap on the answer's size
//! and on the time the whole call may take, and a retry policy (capped
//! exponential backoff with jitter, a 429's `retry_after` as the least wait).
//!
//! Every failure is a [`RestError`] whose kind says whether retrying can help
//! and whose message says what happened and what to do. No message ever holds
//! the token: errors are built from the fingerprint only, and the final
//! message is scrubbed of the token as a second line of defence.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;

use super::http::{ApiClient, Class, body_failure};
use super::rest_limiter::{Limiter, TokenId, route_key};
use crate::config::{Token, check_url};

/// `session_start_limit` of `/gateway/bot`.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionStartLimit {
    /// Session starts (IDENTIFYs) allowed in the current window.
    pub total: u32,
    /// Session starts left in the window.
    pub remaining: u32,
    /// Milliseconds until the window resets.
    pub reset_after: u64,
    /// IDENTIFYs allowed per 5 seconds.
    pub max_concurrency: u32,
}

/// The answer of `GET /gateway/bot`.
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayBot {
    /// The WebSocket URL to open (`wss://…`; `ws://` only to loopback).
    pub url: String,
    /// Discord's recommended shard count.
    pub shards: u32,
    /// The IDENTIFY budget.
    pub session_start_limit: SessionStartLimit,
}

/// What kind of failure a [`RestError`] is.
#[derive(Debug)]
pub enum RestErrorKind {
    /// DNS, connection refused, TLS, timeout, truncated response.
    Transport,
    /// 401: the token was rejected. Fatal, never retried.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 429: wait at least `retry_after` before the next request.
    RateLimited {
        /// From the `Retry-After` header or the JSON `retry_after`, whichever
        /// is longer.
        retry_after: Duration,
    },
    /// 5xx: a Discord-side error.
    ServerError,
    /// Any other status, a 200 whose body is not the expected JSON, an
    /// insecure gateway URL, or something that is not HTTP at all.
    Unexpected,
}

/// A failed `/gateway/bot` request.
pub struct RestError {
    /// What kind of failure.
    pub kind: RestErrorKind,
    /// The HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// Discord's JSON error `code`, when present.
    pub code: Option<i64>,
    /// What happened and what to do. Never contains the token.
    pub message: String,
}

impl RestError {
    fn new(kind: RestErrorKind, status: Option<u16>, code: Option<i64>, message: String) -> Self {
        RestError {
            kind,
            status,
            code,
            message,
        }
    }

    fn transport(message: String) -> Self {
        RestError::new(RestErrorKind::Transport, None, None, message)
    }

    /// The failure's class (DESIGN.md §6), as the front door logs it.
    pub fn class(&self) -> Class {
        match self.kind {
            RestErrorKind::Transport => Class::Transport,
            RestErrorKind::Unauthorized => Class::Auth,
            RestErrorKind::Forbidden => Class::Permission,
            RestErrorKind::RateLimited { .. } => Class::RateLimit,
            RestErrorKind::ServerError => Class::Discord,
            RestErrorKind::Unexpected => Class::Payload,
        }
    }

    /// Whether another attempt may succeed: transport failures, rate limits
    /// and Discord-side errors.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            RestErrorKind::Transport
                | RestErrorKind::RateLimited { .. }
                | RestErrorKind::ServerError
        )
    }

    /// Remove the token from the message, should it ever have got in (a
    /// server echoing the request back, say).
    fn scrubbed(mut self, token: &Token) -> Self {
        let secret = token.expose();
        if secret.is_empty() {
            return self;
        }
        // As sent, and as Debug-quoting would show it.
        let escaped = format!("{secret:?}");
        let escaped = &escaped[1..escaped.len() - 1];
        for form in [secret, escaped] {
            if self.message.contains(form) {
                self.message = self.message.replace(form, &token.fingerprint());
            }
        }
        self
    }
}

impl fmt::Display for RestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for RestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestError")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("code", &self.code)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for RestError {}

/// The whole call (connect, TLS, send, receive) must finish in this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body accepted.
const MAX_BODY: usize = 1 << 20;
/// The path below `api_base`.
const GATEWAY_BOT: &str = "/gateway/bot";
/// The `User-Agent` Discord asks of bots, `DiscordBot ($url, $version)`:
/// sent on every REST request and on the gateway WebSocket upgrade.
pub const USER_AGENT: &str = concat!(
    "DiscordBot (https://github.com/shardwarden/shardwarden, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);

/// One attempt at `GET {api_base}/gateway/bot`.
pub async fn get_gateway_bot(api: &ApiClient, token: &Token) -> Result<GatewayBot, RestError> {
    fetch(api, token, REQUEST_TIMEOUT).await
}

/// `GET {api_base}/gateway/bot`, retrying transport failures, rate limits and
/// Discord-side errors with capped exponential backoff and jitter (a 429's
/// `retry_after` is the least wait). Gives up, returning the last error, when
/// the failure is not retryable or the next wait would end more than
/// `max_wait` after the first attempt started. Every failure is logged at
/// warn level (never the token).
pub async fn get_gateway_bot_with_retry(
    api: &ApiClient,
    token: &Token,
    limiter: Option<&Limiter>,
    max_wait: Duration,
) -> Result<GatewayBot, RestError> {
    retry(default_backoff(), max_wait, &TokioClock::start(), || {
        get_gateway_bot_paced(api, token, limiter)
    })
    .await
}

/// One attempt that first takes its turn in the REST `limiter` (the front
/// door's, when it runs): the daemon's own call counts toward the token's
/// global limit and waits out what Discord said about its bucket.
pub async fn get_gateway_bot_paced(
    api: &ApiClient,
    token: &Token,
    limiter: Option<&Limiter>,
) -> Result<GatewayBot, RestError> {
    let Some(limiter) = limiter else {
        return get_gateway_bot(api, token).await;
    };
    // A refusal (a wait past max_queue_wait, or the invalid-request guard)
    // does not stop this one call a start or a re-read depends on.
    let mut permit = limiter
        .acquire(
            &TokenId::of_token(token),
            &route_key("GET", GATEWAY_BOT),
            false,
        )
        .await
        .ok();
    let result = get_gateway_bot(api, token).await;
    if let Some(permit) = permit.as_mut() {
        limiter.answered(permit);
        if let Err(RestError {
            kind: RestErrorKind::RateLimited { retry_after },
            ..
        }) = &result
        {
            limiter.rate_limited(permit, *retry_after, false);
        }
        limiter.release(permit);
    }
    result
}

/// Time as the retry loop sees it (tests substitute a virtual clock: tokio's
/// paused time needs its `test-util` feature, which this crate does not enable).
trait RetryClock {
    /// Time since the first attempt started.
    fn elapsed(&self) -> Duration;
    /// Wait `duration`.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()>;
}

/// The real clock.
struct TokioClock(Instant);

impl TokioClock {
    fn start() -> Self {
        TokioClock(Instant::now())
    }
}

impl RetryClock for TokioClock {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(duration)
    }
}

/// 1 s, 2 s, 4 s, … up to 15 s, each plus a random 0–100 %: waits stay under 30 s.
fn default_backoff() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_jitter()
        .with_factor(2.0)
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(15))
        .without_max_times()
}

/// The retry policy, apart from the request itself (tests pass a closure).
async fn retry<T, F, Fut>(
    backoff: ExponentialBuilder,
    max_wait: Duration,
    clock: &impl RetryClock,
    mut attempt_once: F,
) -> Result<T, RestError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RestError>>,
{
    let mut delays = backoff.build();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let err = match attempt_once().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let next_wait = if err.is_retryable() {
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            let wait = match err.kind {
                RestErrorKind::RateLimited { retry_after } => delay.max(retry_after),
                _ => delay,
            };
            (clock.elapsed() + wait <= max_wait).then_some(wait)
        } else {
            None
        };
        let next_retry_ms = next_wait.map(|w| w.as_millis() as u64);
        match next_wait {
            Some(wait) => {
                tracing::warn!(
                    status = err.status,
                    code = err.code,
                    error = %err.message,
                    attempt,
                    next_retry_ms,
                    "GET /gateway/bot failed; retrying"
                );
                clock.sleep(wait).await;
            }
            None => {
                let why = if err.is_retryable() {
                    "giving up: the next retry would pass the time allowed"
                } else {
                    "not retrying: this failure will not go away by itself"
                };
                tracing::warn!(
                    status = err.status,
                    code = err.code,
                    error = %err.message,
                    attempt,
                    next_retry_ms,
                    max_wait_ms = max_wait.as_millis() as u64,
                    "GET /gateway/bot failed; {why}"
                );
                return Err(err);
            }
        }
    }
}

/// One attempt with a given overall time limit.
async fn fetch(api: &ApiClient, token: &Token, limit: Duration) -> Result<GatewayBot, RestError> {
    fetch_unscrubbed(api, token, limit)
        .await
        .map_err(|e| e.scrubbed(token))
}

async fn fetch_unscrubbed(
    api: &ApiClient,
    token: &Token,
    limit: Duration,
) -> Result<GatewayBot, RestError> {
    let unexpected =
        |message: String| RestError::new(RestErrorKind::Unexpected, None, None, message);
    let uri = api.api_uri(GATEWAY_BOT).map_err(|e| {
        unexpected(format!(
            "cannot use [discord] api_base for {GATEWAY_BOT}: {e}; fix [discord] api_base (default https://discord.com/api/v10)"
        ))
    })?;
    let secret = token.expose();
    let authorization = (!secret.is_empty())
        .then(|| HeaderValue::from_str(&format!("Bot {secret}")).ok())
        .flatten()
        .filter(|_| !secret.bytes().any(|b| b == b' ' || b >= 0x80));
    let Some(mut authorization) = authorization else {
        return Err(RestError::new(
            RestErrorKind::Unauthorized,
            None,
            None,
            format!(
                "the bot token ({}) is empty or contains spaces, control or non-ASCII characters, so it cannot be sent; put the token exactly as the Developer Portal shows it (Bot → Reset Token) in the token file",
                token.fingerprint()
            ),
        ));
    };
    authorization.set_sensitive(true);
    let mut request = Request::new(
        Empty::new()
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed(),
    );
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(header::AUTHORIZATION, authorization);
    headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let deadline = Instant::now() + limit;
    let response = api.send(request, limit).await.map_err(|t| {
        let kind = if t.not_http {
            RestErrorKind::Unexpected
        } else {
            RestErrorKind::Transport
        };
        RestError::new(kind, None, None, t.message)
    })?;
    let (parts, body) = response.into_parts();
    let too_large = || {
        unexpected(format!(
            "{} sent an answer that is too large (over {MAX_BODY} bytes) to GET {GATEWAY_BOT}; check that [discord] api_base points at Discord's API",
            api.host()
        ))
    };
    if hyper::body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let body = match tokio::time::timeout_at(deadline, Limited::new(body, MAX_BODY).collect()).await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(RestError::transport(body_failure(api.host(), &*e).message)),
        Err(_) => {
            return Err(RestError::transport(format!(
                "the answer from {} did not arrive within {limit:?}; check network access to it (firewall, proxy); retrying may help",
                api.host()
            )));
        }
    };
    classify(
        api,
        token,
        Response {
            status: parts.status,
            headers: parts.headers,
            body,
        },
    )
}

/// An answer, read whole.
#[derive(Debug)]
struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Bytes shown in a message: quoted, printable, at most 60 characters.
fn snippet(bytes: &[u8]) -> String {
    format!("{:?}", clean(&String::from_utf8_lossy(bytes), 60))
}

/// Control characters replaced, cut to at most `max` characters. A cut
/// drops the whole word it falls in, so a secret the peer echoed back is
/// either quoted whole (and then scrubbed, see [`RestError::scrubbed`]) or
/// not at all, never as a telling prefix.
fn clean(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        let keep = out.trim_end_matches(|c: char| !c.is_whitespace()).len();
        out.truncate(keep);
        out.push('…');
    }
    out
}

/// Discord's JSON error body (`message`, `code`, and for 429 `retry_after`
/// and `global`), read leniently.
#[derive(Default)]
struct DiscordError {
    message: Option<String>,
    code: Option<i64>,
    retry_after: Option<f64>,
    global: bool,
}

impl DiscordError {
    fn parse(body: &[u8]) -> Option<DiscordError> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let object = value.as_object()?;
        Some(DiscordError {
            message: object
                .get("message")
                .and_then(|m| m.as_str())
                .map(|m| clean(m, 200)),
            code: object.get("code").and_then(|c| c.as_i64()),
            retry_after: object.get("retry_after").and_then(|r| r.as_f64()),
            global: object
                .get("global")
                .and_then(|g| g.as_bool())
                .unwrap_or(false),
        })
    }

    /// ` (Discord said: "…", code N)`, or about the body when it is not JSON.
    fn said(parsed: Option<&DiscordError>, response: &Response) -> String {
        match parsed {
            Some(DiscordError {
                message: Some(m),
                code: Some(c),
                ..
            }) => format!(" (Discord said: {m:?}, code {c})"),
            Some(DiscordError {
                message: Some(m), ..
            }) => format!(" (Discord said: {m:?})"),
            Some(DiscordError { code: Some(c), .. }) => format!(" (Discord code {c})"),
            Some(_) => String::new(),
            None if response.body.is_empty() => String::new(),
            None => format!(
                " (the body is not JSON: {}, {} bytes, starting {})",
                response.header("content-type").unwrap_or("no content-type"),
                response.body.len(),
                snippet(&response.body)
            ),
        }
    }
}

/// Turn a response into the gateway info or a classified error.
fn classify(api: &ApiClient, token: &Token, response: Response) -> Result<GatewayBot, RestError> {
    let status = response.status.as_u16();
    let reason = response
        .status
        .canonical_reason()
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    let host = api.host();
    let path = api
        .api_uri(GATEWAY_BOT)
        .map(|uri| uri.path().to_string())
        .unwrap_or_else(|_| GATEWAY_BOT.to_string());
    if status == 200 {
        return parse_gateway_bot(host, &path, &response.body);
    }
    let parsed = DiscordError::parse(&response.body);
    let said = DiscordError::said(parsed.as_ref(), &response);
    let code = parsed.as_ref().and_then(|p| p.code);
    let fp = token.fingerprint();
    let (kind, message) = match Class::of_status(status) {
        Some(Class::Auth) => (
            RestErrorKind::Unauthorized,
            format!(
                "Discord rejected the bot token ({fp}) with 401 Unauthorized: the token was reset or is wrong; put the current token from the Developer Portal (Bot → Reset Token) in the token file{said}"
            ),
        ),
        Some(Class::Permission) => (
            RestErrorKind::Forbidden,
            format!(
                "Discord answered 403 Forbidden to GET {path} with the bot token ({fp}){said}: the token lacks access to this endpoint, or this machine's IP is temporarily banned by Cloudflare after too many invalid requests (10,000 401/403/429 answers in 10 minutes); check the token is the bot's token, stop anything else using a bad token from this IP, and wait for the ban to lift"
            ),
        ),
        Some(Class::RateLimit) => {
            let header = response
                .header("retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok());
            let json = parsed.as_ref().and_then(|p| p.retry_after);
            let seconds = match (header, json) {
                (Some(h), Some(j)) => h.max(j),
                (Some(s), None) | (None, Some(s)) => s,
                (None, None) => 1.0,
            };
            let retry_after = Duration::try_from_secs_f64(seconds.clamp(0.0, 86_400.0))
                .unwrap_or(Duration::from_secs(1));
            let global = parsed.as_ref().is_some_and(|p| p.global)
                || response
                    .header("x-ratelimit-global")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let scope = if global {
                "the bot's global rate limit (50 requests/s across all its REST calls)".to_string()
            } else if let Some(scope) = response.header("x-ratelimit-scope") {
                format!("a {} rate limit", clean(scope, 20))
            } else if parsed.is_none() {
                "a limit without Discord's JSON body, likely Cloudflare's: too many invalid requests from this IP".to_string()
            } else {
                "the route's rate limit".to_string()
            };
            (
                RestErrorKind::RateLimited { retry_after },
                format!(
                    "Discord rate-limited GET {path} with 429 Too Many Requests ({scope}); retry after {:.3} s{said}",
                    retry_after.as_secs_f64()
                ),
            )
        }
        Some(Class::Discord) => (
            RestErrorKind::ServerError,
            format!(
                "Discord answered {status}{reason} to GET {path}: a Discord-side error, retrying with backoff; if it persists check https://discordstatus.com{said}"
            ),
        ),
        _ => (
            RestErrorKind::Unexpected,
            format!(
                "{host} answered {status}{reason} to GET {path}, which shardwarden does not expect{said}; check that [discord] api_base points at Discord's API (https://discord.com/api/v10)"
            ),
        ),
    };
    Err(RestError::new(kind, Some(status), code, message))
}

fn parse_gateway_bot(host: &str, path: &str, body: &[u8]) -> Result<GatewayBot, RestError> {
    let unexpected = |what: String| {
        RestError::new(
            RestErrorKind::Unexpected,
            Some(200),
            None,
            format!(
                "{host} answered 200 to GET {path} but {what}; check that [discord] api_base points at Discord's API (https://discord.com/api/v10)"
            ),
        )
    };
    let info: GatewayBot = serde_json::from_slice(body).map_err(|e| {
        unexpected(format!(
            "the body is not the expected {{url, shards, session_start_limit}} JSON ({e})"
        ))
    })?;
    if let Err(e) = check_url(&info.url, &["wss", "ws"]) {
        return Err(unexpected(format!(
            "its gateway url {:?} is not usable: {e}; refusing to connect",
            clean(&info.url, 200)
        )));
    }
    if info.shards == 0 {
        return Err(unexpected("it recommends 0 shards".to_string()));
    }
    if info.session_start_limit.max_concurrency == 0 {
        return Err(unexpected(
            "its session_start_limit.max_concurrency is 0".to_string(),
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests;
