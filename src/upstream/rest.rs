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
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const SECRET: &str = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GhIjKl.s3cr3t-t0ken-body-wxyz";
    const GOOD: &str = r#"{"url":"wss://gateway.discord.gg","shards":9,"session_start_limit":{"total":1000,"remaining":999,"reset_after":14400000,"max_concurrency":1}}"#;

    fn token() -> Token {
        Token::new(SECRET)
    }

    fn response(status_line: &str, headers: &[&str], body: &str) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status_line}\r\n");
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
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
        let result = get_gateway_bot(&base, &token()).await;
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
        get_gateway_bot(&format!("{base}/"), &token())
            .await
            .unwrap();
        let requests = server.await.unwrap();
        let request = &requests[0];
        let port = base.split(':').nth(2).unwrap().split('/').next().unwrap();
        assert!(
            request.starts_with("GET /api/v10/gateway/bot HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("\r\nAuthorization: Bot {SECRET}\r\n")));
        assert!(request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")));
        assert!(request.contains(
            "\r\nUser-Agent: DiscordBot (https://github.com/shardwarden/shardwarden, 0.1.0)\r\n"
        ));
        assert!(request.contains("\r\nAccept: application/json\r\n"));
        assert!(request.contains("\r\nConnection: close\r\n"));
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
        let err = get_gateway_bot_with_retry(&base, &token(), Duration::from_secs(60))
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
        let info = retry(
            tiny_backoff(),
            Duration::from_secs(30),
            &TokioClock::start(),
            || get_gateway_bot(&base, &token),
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
        let info = retry(
            tiny_backoff(),
            Duration::from_secs(30),
            &TokioClock::start(),
            || get_gateway_bot(&base, &token),
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
        let err = get_gateway_bot(&format!("http://127.0.0.1:{port}/api/v10"), &token())
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
        let err = fetch(&base, &token(), Duration::from_millis(300))
            .await
            .unwrap_err();
        server.abort();
        assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
        assert!(err.message.contains("timed out"), "{err}");
        assert!(err.message.contains("waiting for the response"), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_unexpected_and_truncation_is_transport() {
        let err = one(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()).await.unwrap_err();
        assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
        assert!(err.message.contains("SSH-2.0"), "{err}");

        let err = one(b"HTTP/1.1 OK maybe\r\n\r\n".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");

        let err = one(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"url\":".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err.kind, RestErrorKind::Transport), "{err:?}");
        assert!(err.message.contains("closed the connection"), "{err}");

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
                let body = serde_json::json!({ "message": request, "code": 1, "url": request })
                    .to_string();
                let _ = socket.write_all(&response(status, &[], &body)).await;
            }
        });
        let base = format!("http://127.0.0.1:{port}/api/v10");
        let mut errors = Vec::new();
        for _ in 0..3 {
            errors.push(get_gateway_bot(&base, &token()).await.unwrap_err());
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
            get_gateway_bot("http://127.0.0.1:1/api/v10", &token())
                .await
                .unwrap_err(),
        );
        errors.push(
            get_gateway_bot("http://example.com/api/v10", &token())
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

        // Garbage is quoted as soon as it is seen, maybe before the rest of
        // a word has arrived.
        let text = snippet_of_partial(b"ECHO Bot MTIzNDU2");
        assert_eq!(text, "\"ECHO Bot …\"");
        assert_eq!(snippet_of_partial(b"whole line\r\n"), "\"whole line  \"");
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
        let err = get_gateway_bot("http://127.0.0.1:1/api/v10", &bad)
            .await
            .unwrap_err();
        assert!(matches!(err.kind, RestErrorKind::Unauthorized), "{err:?}");
        assert!(!err.message.contains("X-Injected"), "{err}");
        assert!(err.message.contains("…wxyz"), "{err}");
    }

    #[tokio::test]
    async fn insecure_api_base_is_refused() {
        let err = get_gateway_bot("http://discord.com/api/v10", &token())
            .await
            .unwrap_err();
        assert!(matches!(err.kind, RestErrorKind::Unexpected), "{err:?}");
        assert!(err.message.contains("api_base"), "{err}");
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("https://discord.com/api/v10").unwrap();
        assert!(e.tls);
        assert_eq!((e.host.as_str(), e.port), ("discord.com", 443));
        assert_eq!(e.host_header, "discord.com");
        assert_eq!(e.path, "/api/v10/gateway/bot");

        let e = Endpoint::parse("http://[::1]:8080/api/v10/").unwrap();
        assert!(!e.tls);
        assert_eq!((e.host.as_str(), e.port), ("::1", 8080));
        assert_eq!(e.host_header, "[::1]:8080");
        assert_eq!(e.path, "/api/v10/gateway/bot");

        let e = Endpoint::parse("http://localhost:9000").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("localhost", 9000, "/gateway/bot")
        );

        assert!(Endpoint::parse("http://discord.com/api/v10").is_err());
        assert!(Endpoint::parse("https://discord.com:0/api").is_err());
        assert!(Endpoint::parse("https://discord.com:x/api").is_err());
        assert!(Endpoint::parse("https://discord.com/api?x=1").is_err());
        assert!(Endpoint::parse("https://u:p@discord.com/api").is_err());
        assert!(Endpoint::parse("ftp://discord.com/api").is_err());
    }

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let token = token();
        let once = get_gateway_bot("https://discord.com/api/v10", &token);
        assert_send(&once);
        let retrying =
            get_gateway_bot_with_retry("https://discord.com/api/v10", &token, Duration::ZERO);
        assert_send(&retrying);
    }

    #[test]
    fn tls_config_builds() {
        let config = tls_config().unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    async fn parse(raw: &[u8]) -> Result<Response, HttpFailure> {
        let mut stream = raw;
        read_response(&mut stream).await
    }

    #[tokio::test]
    async fn parser_edge_cases() {
        let r =
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                .await
                .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"hi".as_slice()));

        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        assert!(r.body.is_empty());

        let r = parse(b"HTTP/1.1 200 OK\r\nX-A:  spaced  \r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(r.header("x-a"), Some("spaced"));

        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").await,
            Err(HttpFailure::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab").await,
            Err(HttpFailure::Truncated(_))
        ));
        assert!(matches!(
            parse(b"HTT").await,
            Err(HttpFailure::Truncated(_))
        ));
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS + 1 {
            huge.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        assert!(matches!(parse(&huge).await, Err(HttpFailure::TooLarge(_))));
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(matches!(parse(&long).await, Err(HttpFailure::TooLarge(_))));
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
            let (result, times) =
                run(vec![Err(err(kind, None)), Ok(1)], Duration::from_secs(60)).await;
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
        let result = retry(
            tiny_backoff(),
            Duration::from_secs(30),
            &TokioClock::start(),
            || get_gateway_bot(&base, &token),
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
}
