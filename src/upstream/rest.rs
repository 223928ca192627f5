//! The one REST call shardwarden makes: `GET {api_base}/gateway/bot`, which
//! hands out the gateway URL, the recommended shard count and the
//! session-start budget (facts §1.1).
//!
//! There is no HTTP client crate in the dependency set, so this module holds
//! a small HTTP/1.1 client: one request per connection (`Connection: close`),
//! TLS through tokio-rustls with the webpki roots, plain TCP only to loopback
//! (for tests and the simulator), bodies framed by `Content-Length`, chunked
//! transfer-encoding or end-of-stream, and a cap on both the body size and
//! the time the whole request may take.
//!
//! Every failure is a [`RestError`] whose kind says whether retrying can help
//! and whose message says what happened and what to do. No message ever holds
//! the token: errors are built from the fingerprint only, and the final
//! message is scrubbed of the token as a second line of defence.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{Token, check_url, host_of};

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

/// The whole request (resolve, connect, TLS, send, receive) must finish in this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One address's TCP connect must finish in this (then the next is tried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body accepted.
const MAX_BODY: usize = 1 << 20;
/// Largest status line plus headers accepted.
const MAX_HEAD: usize = 64 << 10;
/// Most header lines accepted.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// The `User-Agent` Discord asks of bots, `DiscordBot ($url, $version)`:
/// sent on every REST request and on the gateway WebSocket upgrade.
pub const USER_AGENT: &str = concat!(
    "DiscordBot (https://github.com/shardwarden/shardwarden, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);

/// One attempt at `GET {api_base}/gateway/bot`.
pub async fn get_gateway_bot(api_base: &str, token: &Token) -> Result<GatewayBot, RestError> {
    fetch(api_base, token, REQUEST_TIMEOUT).await
}

/// `GET {api_base}/gateway/bot`, retrying transport failures, rate limits and
/// Discord-side errors with capped exponential backoff and jitter (a 429's
/// `retry_after` is the least wait). Gives up, returning the last error, when
/// the failure is not retryable or the next wait would end more than
/// `max_wait` after the first attempt started. Every failure is logged at
/// warn level (never the token).
pub async fn get_gateway_bot_with_retry(
    api_base: &str,
    token: &Token,
    max_wait: Duration,
) -> Result<GatewayBot, RestError> {
    retry(default_backoff(), max_wait, &TokioClock::start(), || {
        get_gateway_bot(api_base, token)
    })
    .await
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
async fn fetch(api_base: &str, token: &Token, limit: Duration) -> Result<GatewayBot, RestError> {
    fetch_unscrubbed(api_base, token, limit)
        .await
        .map_err(|e| e.scrubbed(token))
}

async fn fetch_unscrubbed(
    api_base: &str,
    token: &Token,
    limit: Duration,
) -> Result<GatewayBot, RestError> {
    let endpoint = Endpoint::parse(api_base).map_err(|e| {
        RestError::new(
            RestErrorKind::Unexpected,
            None,
            None,
            format!("cannot use api_base = {api_base:?}: {e}; fix [discord] api_base (default https://discord.com/api/v10)"),
        )
    })?;
    let secret = token.expose();
    if secret.is_empty()
        || secret
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b >= 0x80)
    {
        return Err(RestError::new(
            RestErrorKind::Unauthorized,
            None,
            None,
            format!(
                "the bot token ({}) is empty or contains spaces, control or non-ASCII characters, so it cannot be sent; put the token exactly as the Developer Portal shows it (Bot → Reset Token) in the token file",
                token.fingerprint()
            ),
        ));
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bot {secret}\r\nUser-Agent: {USER_AGENT}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        path = endpoint.path,
        host = endpoint.host_header,
    );
    let deadline = Instant::now() + limit;
    let response = endpoint
        .exchange(request.as_bytes(), deadline, limit)
        .await?;
    classify(&endpoint, token, response)
}

/// Where `api_base` points.
#[derive(Debug)]
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    host_header: String,
    path: String,
}

impl Endpoint {
    fn parse(api_base: &str) -> Result<Endpoint, String> {
        check_url(api_base, &["https", "http"])?;
        let (scheme, rest) = api_base.split_once("://").ok_or("not a URL")?;
        let tls = scheme == "https";
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.contains('@') {
            return Err("user:password@ in the URL is not supported; remove it".to_string());
        }
        let host = host_of(authority).to_string();
        let port_text = if authority.starts_with('[') {
            authority
                .split_once("]")
                .map(|(_, after)| after)
                .unwrap_or("")
        } else {
            authority.split_once(':').map(|(_, p)| p).unwrap_or("")
        };
        let port_text = port_text.strip_prefix(':').unwrap_or(port_text);
        let port = if port_text.is_empty() {
            if tls { 443 } else { 80 }
        } else {
            port_text
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {port_text:?} is not a number from 1 to 65535"))?
        };
        let path = tail.split(['?', '#']).next().unwrap_or("");
        if tail.len() != path.len() {
            return Err("a query string or fragment is not allowed in api_base".to_string());
        }
        if path.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err("the path contains spaces or control characters".to_string());
        }
        let path = format!("{}/gateway/bot", path.trim_end_matches('/'));
        Ok(Endpoint {
            tls,
            host,
            port,
            host_header: authority.to_string(),
            path,
        })
    }

    /// Connect, send `request`, read the response; everything before `deadline`.
    async fn exchange(
        &self,
        request: &[u8],
        deadline: Instant,
        limit: Duration,
    ) -> Result<Response, RestError> {
        let host = &self.host;
        let timed_out = |what: &str| {
            RestError::transport(format!(
                "request to {host} timed out after {limit:?} while {what}; check network access to {host} (firewall, proxy); retrying may help"
            ))
        };
        let stream = self.connect(deadline, &timed_out).await?;
        if !self.tls {
            return talk(stream, request, host, deadline, &timed_out).await;
        }
        let config = tls_config()
            .map_err(|e| RestError::transport(format!("cannot set up TLS for {host}: {e}")))?;
        let server_name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            RestError::transport(format!("{host:?} is not a valid TLS server name: {e}"))
        })?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout_at(deadline, connector.connect(server_name, stream))
            .await
            .map_err(|_| timed_out("doing the TLS handshake"))?
            .map_err(|e| {
                RestError::transport(format!(
                    "TLS handshake with {host} failed: {e}; check the system clock and whether a proxy intercepts TLS"
                ))
            })?;
        talk(tls, request, host, deadline, &timed_out).await
    }

    /// Resolve the host and connect to the first address that answers.
    async fn connect(
        &self,
        deadline: Instant,
        timed_out: &(dyn Fn(&str) -> RestError + Sync),
    ) -> Result<TcpStream, RestError> {
        let host = &self.host;
        let port = self.port;
        let addrs: Vec<SocketAddr> = tokio::time::timeout_at(
            deadline,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| timed_out(&format!("resolving {host} (DNS)")))?
        .map_err(|e| {
            RestError::transport(format!(
                "cannot resolve {host} (DNS): {e}; check DNS and network access from this machine"
            ))
        })?
        .collect();
        if addrs.is_empty() {
            return Err(RestError::transport(format!(
                "{host} resolved to no addresses (DNS); check DNS on this machine"
            )));
        }
        let mut failures = Vec::new();
        for addr in &addrs {
            let until = deadline.min(Instant::now() + CONNECT_TIMEOUT);
            match tokio::time::timeout_at(until, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                Err(_) if Instant::now() >= deadline => {
                    return Err(timed_out(&format!("connecting to {host} port {port}")));
                }
                Err(_) => failures.push(format!(
                    "{addr}: connect timed out after {CONNECT_TIMEOUT:?}"
                )),
            }
        }
        Err(RestError::transport(format!(
            "cannot connect to {host} port {port} ({}); check the network, firewall or proxy, and that api_base names the right host",
            failures.join("; ")
        )))
    }
}

/// TLS to Discord: webpki roots, ring, HTTP/1.1 by ALPN (also the front door's REST forward).
pub(crate) fn tls_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Send the request and read the response on an open stream.
async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
    host: &str,
    deadline: Instant,
    timed_out: &(dyn Fn(&str) -> RestError + Sync),
) -> Result<Response, RestError> {
    tokio::time::timeout_at(deadline, async {
        stream.write_all(request).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| timed_out("sending the request"))?
    .map_err(|e| RestError::transport(format!("sending the request to {host} failed: {e}")))?;
    let response = tokio::time::timeout_at(deadline, read_response(&mut stream))
        .await
        .map_err(|_| timed_out("waiting for the response"))?;
    response.map_err(|failure| failure.into_error(host))
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why reading a response failed.
#[derive(Debug)]
enum HttpFailure {
    /// The socket or TLS layer failed.
    Io(io::Error),
    /// The peer closed the connection before the response was complete.
    Truncated(&'static str),
    /// What came back is not HTTP/1.x.
    Malformed(String),
    /// The response is bigger than allowed.
    TooLarge(String),
}

impl HttpFailure {
    fn into_error(self, host: &str) -> RestError {
        match self {
            HttpFailure::Io(e) => RestError::transport(format!(
                "reading the response from {host} failed: {e}; retrying may help"
            )),
            HttpFailure::Truncated(what) => RestError::transport(format!(
                "{host} closed the connection before the response was complete ({what}); retrying may help"
            )),
            HttpFailure::Malformed(what) => RestError::new(
                RestErrorKind::Unexpected,
                None,
                None,
                format!(
                    "{host} did not answer with valid HTTP/1.1 ({what}); check that [discord] api_base points at Discord's API (https://discord.com/api/v10)"
                ),
            ),
            HttpFailure::TooLarge(what) => RestError::new(
                RestErrorKind::Unexpected,
                None,
                None,
                format!(
                    "{host} sent a response that is too large ({what}); check that [discord] api_base points at Discord's API"
                ),
            ),
        }
    }
}

/// Buffered reading from a stream.
struct Reader<'a, S> {
    stream: &'a mut S,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl<S: AsyncRead + Unpin> Reader<'_, S> {
    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Read more bytes; false at end of stream.
    async fn fill(&mut self) -> Result<bool, HttpFailure> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(HttpFailure::Io)?;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    /// The next CRLF-terminated line (without CRLF), at most `max` bytes.
    async fn line(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, HttpFailure> {
        loop {
            if let Some(i) = self.available().windows(2).position(|w| w == b"\r\n") {
                if i > max {
                    return Err(HttpFailure::TooLarge(format!(
                        "{what} longer than {max} bytes"
                    )));
                }
                let line = self.available()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.available().len() > max + 1 {
                return Err(HttpFailure::TooLarge(format!(
                    "{what} longer than {max} bytes"
                )));
            }
            if !self.fill().await? {
                return Err(HttpFailure::Truncated(what));
            }
        }
    }

    /// Exactly `n` bytes.
    async fn exact(&mut self, n: usize, what: &'static str) -> Result<Vec<u8>, HttpFailure> {
        while self.available().len() < n {
            if !self.fill().await? {
                return Err(HttpFailure::Truncated(what));
            }
        }
        let bytes = self.available()[..n].to_vec();
        self.pos += n;
        Ok(bytes)
    }
}

/// Read one HTTP/1.x response (interim 1xx responses skipped).
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Response, HttpFailure> {
    let mut r = Reader {
        stream,
        buf: Vec::new(),
        pos: 0,
        eof: false,
    };
    loop {
        let (status, reason, headers) = read_head(&mut r).await?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = read_body(&mut r, status, &headers).await?;
        return Ok(Response {
            status,
            reason,
            headers,
            body,
        });
    }
}

type Head = (u16, String, Vec<(String, String)>);

async fn read_head<S: AsyncRead + Unpin>(r: &mut Reader<'_, S>) -> Result<Head, HttpFailure> {
    // Tell garbage from a short read before waiting for a whole line.
    while r.available().len() < 5 {
        if !r.fill().await? {
            return Err(if r.available().is_empty() {
                HttpFailure::Truncated("no response at all")
            } else if b"HTTP/".starts_with(r.available()) {
                HttpFailure::Truncated("status line")
            } else {
                HttpFailure::Malformed(format!("it sent {}", snippet(r.available())))
            });
        }
    }
    if !r.available().starts_with(b"HTTP/") {
        return Err(HttpFailure::Malformed(format!(
            "it sent {}",
            snippet_of_partial(r.available())
        )));
    }
    let mut budget = MAX_HEAD;
    let line = r.line(budget, "status line").await?;
    budget -= line.len();
    let (status, reason) = parse_status_line(&line)?;
    let mut headers = Vec::new();
    loop {
        let line = r.line(budget, "headers").await?;
        if line.is_empty() {
            return Ok((status, reason, headers));
        }
        budget = budget.saturating_sub(line.len() + 2);
        if headers.len() == MAX_HEADERS {
            return Err(HttpFailure::TooLarge(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HttpFailure::Malformed("folded header line".to_string()));
        }
        let text = String::from_utf8_lossy(&line);
        let (name, value) = text.split_once(':').ok_or_else(|| {
            HttpFailure::Malformed(format!("header line without ':': {}", snippet(&line)))
        })?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(HttpFailure::Malformed(format!(
                "bad header name {}",
                snippet(name.as_bytes())
            )));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
}

fn parse_status_line(line: &[u8]) -> Result<(u16, String), HttpFailure> {
    let bad = || HttpFailure::Malformed(format!("bad status line {}", snippet(line)));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    let reason = parts.next().unwrap_or("").trim();
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let status: u16 = code.parse().map_err(|_| bad())?;
    if !(100..600).contains(&status) {
        return Err(bad());
    }
    Ok((status, clean(reason, 60)))
}

async fn read_body<S: AsyncRead + Unpin>(
    r: &mut Reader<'_, S>,
    status: u16,
    headers: &[(String, String)],
) -> Result<Vec<u8>, HttpFailure> {
    if status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .collect()
    };
    let codings = values("transfer-encoding");
    if let Some(last) = codings.last() {
        if last != "chunked" || codings.len() > 1 {
            return Err(HttpFailure::Malformed(format!(
                "unsupported transfer-encoding {:?}",
                codings.join(", ")
            )));
        }
        return read_chunked(r).await;
    }
    let lengths = values("content-length");
    if let Some(first) = lengths.first() {
        if lengths.iter().any(|l| l != first) {
            return Err(HttpFailure::Malformed(
                "conflicting content-length headers".to_string(),
            ));
        }
        if !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpFailure::Malformed(format!(
                "bad content-length {first:?}"
            )));
        }
        let length: usize = match first.parse() {
            Ok(n) if n <= MAX_BODY => n,
            _ => {
                return Err(HttpFailure::TooLarge(format!(
                    "content-length {first}, the limit is {MAX_BODY} bytes"
                )));
            }
        };
        return r
            .exact(length, "body shorter than its content-length")
            .await;
    }
    // No framing: the body runs to the end of the stream.
    while r.fill().await? {
        if r.available().len() > MAX_BODY {
            return Err(HttpFailure::TooLarge(format!("body over {MAX_BODY} bytes")));
        }
    }
    Ok(r.available().to_vec())
}

async fn read_chunked<S: AsyncRead + Unpin>(r: &mut Reader<'_, S>) -> Result<Vec<u8>, HttpFailure> {
    let mut body = Vec::new();
    loop {
        let line = r.line(MAX_CHUNK_LINE, "chunk size line").await?;
        let text = String::from_utf8_lossy(&line);
        let size_text = text.split(';').next().unwrap_or("").trim();
        if size_text.is_empty() || size_text.len() > 16 {
            return Err(HttpFailure::Malformed(format!(
                "bad chunk size {}",
                snippet(&line)
            )));
        }
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpFailure::Malformed(format!("bad chunk size {}", snippet(&line))))?;
        if size == 0 {
            // Trailers, up to the empty line.
            let mut budget = MAX_HEAD;
            loop {
                let trailer = r.line(budget, "trailers").await?;
                if trailer.is_empty() {
                    return Ok(body);
                }
                budget = budget.saturating_sub(trailer.len() + 2);
            }
        }
        if size > MAX_BODY - body.len() {
            return Err(HttpFailure::TooLarge(format!(
                "chunked body over {MAX_BODY} bytes"
            )));
        }
        body.extend(r.exact(size, "chunk").await?);
        if !r.exact(2, "chunk").await?.eq(b"\r\n") {
            return Err(HttpFailure::Malformed(
                "chunk not followed by CRLF".to_string(),
            ));
        }
    }
}

/// Bytes shown in a message: quoted, printable, at most 60 characters.
fn snippet(bytes: &[u8]) -> String {
    format!("{:?}", clean(&String::from_utf8_lossy(bytes), 60))
}

/// Like [`snippet`], for bytes that may stop in the middle of a word because
/// more has yet to arrive: that last word is dropped, as a cut would.
fn snippet_of_partial(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let whole = text.trim_end_matches(|c: char| !c.is_whitespace());
    let cut = if whole.len() < text.len() { "…" } else { "" };
    format!("{:?}", format!("{}{cut}", clean(whole, 60)))
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
fn classify(
    endpoint: &Endpoint,
    token: &Token,
    response: Response,
) -> Result<GatewayBot, RestError> {
    let status = response.status;
    let reason = if response.reason.is_empty() {
        String::new()
    } else {
        format!(" {}", response.reason)
    };
    let host = &endpoint.host;
    let path = &endpoint.path;
    if status == 200 {
        return parse_gateway_bot(host, path, &response.body);
    }
    let parsed = DiscordError::parse(&response.body);
    let said = DiscordError::said(parsed.as_ref(), &response);
    let code = parsed.as_ref().and_then(|p| p.code);
    let fp = token.fingerprint();
    let (kind, message) = match status {
        401 => (
            RestErrorKind::Unauthorized,
            format!(
                "Discord rejected the bot token ({fp}) with 401 Unauthorized: the token was reset or is wrong; put the current token from the Developer Portal (Bot → Reset Token) in the token file{said}"
            ),
        ),
        403 => (
            RestErrorKind::Forbidden,
            format!(
                "Discord answered 403 Forbidden to GET {path} with the bot token ({fp}){said}: the token lacks access to this endpoint, or this machine's IP is temporarily banned by Cloudflare after too many invalid requests (10,000 401/403/429 answers in 10 minutes); check the token is the bot's token, stop anything else using a bad token from this IP, and wait for the ban to lift"
            ),
        ),
        429 => {
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
        500..=599 => (
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
