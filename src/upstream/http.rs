//! The one HTTP client to Discord's REST API, and the one table that
//! classifies what goes wrong with a call.
//!
//! Both REST callers use it: the supervisor's `GET /gateway/bot`
//! ([`super::rest`]) and the front door's forward of every bot request
//! (`crate::frontdoor`). It is hyper-util's pooled client over hyper-rustls:
//! HTTP/1.1 with keep-alive, idle connections reused (a request whose idle
//! connection was closed under it goes again on a fresh one), chunked and
//! close-delimited bodies, TLS by rustls with the webpki roots. Plain HTTP
//! is allowed only to loopback (checked with `[discord] api_base`).
//!
//! [`Class`] is the failure table of DESIGN.md §6 (`transport`, `auth`,
//! `permission`, `payload`, `ratelimit`, `discord`); [`Transport`] turns a
//! failed exchange into a message that says what happened and what to do.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::check_url;

/// Request and response bodies as the client takes them.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle connections kept open to `api_base`.
const MAX_IDLE: usize = 32;
/// An idle connection is closed after this (Discord's side closes
/// keep-alive connections after a while too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// One TCP connect must finish in this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of failure a REST call is (DESIGN.md §6): what the operator
/// does about it follows from the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// DNS, connect, TLS, a hang-up or no answer in time.
    Transport,
    /// 401: the token (or a webhook's token) was rejected.
    Auth,
    /// 403: the bot lacks a permission, or Cloudflare banned the IP.
    Permission,
    /// Any other 4xx (and anything that is not the answer expected): the
    /// request itself is wrong.
    Payload,
    /// 429.
    RateLimit,
    /// 5xx: Discord-side.
    Discord,
}

impl Class {
    /// The class of an answer's status; `None` for a success (below 400).
    pub fn of_status(status: u16) -> Option<Class> {
        match status {
            0..=399 => None,
            401 => Some(Class::Auth),
            403 => Some(Class::Permission),
            429 => Some(Class::RateLimit),
            500..=599 => Some(Class::Discord),
            _ => Some(Class::Payload),
        }
    }

    /// The name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Transport => "transport",
            Class::Auth => "auth",
            Class::Permission => "permission",
            Class::Payload => "payload",
            Class::RateLimit => "ratelimit",
            Class::Discord => "discord",
        }
    }

    /// Whether the failure points at Discord (or the path to it) rather than
    /// at the request: what incident detection counts.
    pub fn is_discord_side(self) -> bool {
        matches!(self, Class::Transport | Class::Discord)
    }
}

/// A call that got no usable answer.
#[derive(Debug, Clone)]
pub struct Transport {
    /// What happened and what to do.
    pub message: String,
    /// The peer answered, but not with HTTP/1.x: `api_base` likely points
    /// at something that is not Discord's API.
    pub not_http: bool,
}

impl Transport {
    fn new(message: String) -> Self {
        Transport {
            message,
            not_http: false,
        }
    }
}

/// The pooled client for one `api_base`.
pub struct ApiClient {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// `scheme://authority`.
    origin: String,
    /// The authority (`host[:port]`), for the `Host` header.
    authority: String,
    /// The host alone, for messages.
    host: String,
    /// `api_base`'s path without a trailing slash (`/api/v10`).
    base_path: String,
    /// The part of that path before `/api` (usually empty): forwarded
    /// `/api/…` paths go below it.
    root: String,
}

impl ApiClient {
    /// A client for `api_base` (`https://`, or `http://` to loopback).
    /// Errors say what is wrong with the URL.
    pub fn new(api_base: &str) -> Result<Arc<ApiClient>, String> {
        check_url(api_base, &["https", "http"])?;
        let uri: Uri = api_base.parse().map_err(|e| format!("not a URL ({e})"))?;
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("user:password@ in the URL is not supported; remove it".to_string());
        }
        if uri.query().is_some() || api_base.contains('#') {
            return Err("a query string or fragment is not allowed in api_base".to_string());
        }
        let scheme = uri.scheme_str().unwrap_or("https");
        let base_path = uri.path().trim_end_matches('/').to_string();
        let root = match base_path.rfind("/api") {
            Some(i) => base_path[..i].to_string(),
            None => base_path.clone(),
        };
        let tls = tls_config().map_err(|e| format!("cannot set up TLS: {e}"))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE)
            .build(connector);
        Ok(Arc::new(ApiClient {
            client,
            origin: format!("{scheme}://{authority}"),
            authority: authority.to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            base_path,
            root,
        }))
    }

    /// `api_base` followed by `path` (`/gateway/bot`).
    pub fn api_uri(&self, path: &str) -> Result<Uri, String> {
        format!("{}{}{path}", self.origin, self.base_path)
            .parse()
            .map_err(|e| format!("bad request path: {e}"))
    }

    /// Where a client's `/api/…?…` goes: below `api_base`'s root.
    pub fn forward_uri(&self, path_and_query: &str) -> Result<Uri, String> {
        format!("{}{}{path_and_query}", self.origin, self.root)
            .parse()
            .map_err(|e| format!("bad request path: {e}"))
    }

    /// `host[:port]` of `api_base`, for the `Host` header.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The host of `api_base`, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Send `request` and wait at most `limit` for the answer's head (its
    /// body streams after).
    pub async fn send(
        &self,
        request: Request<Body>,
        limit: Duration,
    ) -> Result<Response<Incoming>, Transport> {
        match tokio::time::timeout(limit, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.transport(&e)),
            Err(_) => Err(Transport::new(format!(
                "no answer from {} within {limit:?}; check network access to it (firewall, proxy); retrying may help",
                self.host,
            ))),
        }
    }

    /// A failed exchange as a message that says what to do.
    fn transport(&self, error: &hyper_util::client::legacy::Error) -> Transport {
        let host = &self.host;
        let chain = chain_of(error);
        if error.is_connect() {
            if tls_failure(error) {
                return Transport::new(format!(
                    "TLS handshake with {host} failed ({chain}); check the system clock and whether a proxy intercepts TLS"
                ));
            }
            return Transport::new(format!(
                "cannot connect to {host} ({chain}); check DNS, the network, firewall or proxy, and that [discord] api_base names the right host"
            ));
        }
        match hyper_error(error) {
            Some(e) if e.is_parse() || e.is_parse_status() => Transport {
                message: format!(
                    "{host} did not answer with valid HTTP/1.1 ({chain}); check that [discord] api_base points at Discord's API (https://discord.com/api/v10)"
                ),
                not_http: true,
            },
            Some(e) if e.is_incomplete_message() || e.is_closed() || e.is_canceled() => {
                Transport::new(format!(
                    "{host} closed the connection before the answer was complete ({chain}); retrying may help"
                ))
            }
            _ => Transport::new(format!(
                "the request to {host} failed ({chain}); retrying may help"
            )),
        }
    }
}

/// Reading an answer's body failed (after its head arrived).
pub fn body_failure(host: &str, error: &(dyn StdError + 'static)) -> Transport {
    Transport::new(format!(
        "reading the answer from {host} failed ({}); retrying may help",
        chain_of(error)
    ))
}

/// The error and each of its sources, outermost first.
fn sources<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&e| e.source())
}

/// The error and its sources, each message once.
fn chain_of(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for text in sources(error).map(|e| e.to_string()) {
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// The hyper error inside a client error, if any.
fn hyper_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a hyper::Error> {
    sources(error).find_map(|e| e.downcast_ref::<hyper::Error>())
}

/// Whether rustls refused the connection (certificate, protocol). An
/// `io::Error` wrapping it does not list it among its sources.
fn tls_failure(error: &(dyn StdError + 'static)) -> bool {
    sources(error).any(|e| {
        e.downcast_ref::<rustls::Error>().is_some()
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            })
    })
}

/// TLS to Discord: webpki roots, ring (hyper-rustls adds HTTP/1.1 by ALPN).
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_status() {
        assert_eq!(Class::of_status(200), None);
        assert_eq!(Class::of_status(304), None);
        assert_eq!(Class::of_status(400), Some(Class::Payload));
        assert_eq!(Class::of_status(401), Some(Class::Auth));
        assert_eq!(Class::of_status(403), Some(Class::Permission));
        assert_eq!(Class::of_status(404), Some(Class::Payload));
        assert_eq!(Class::of_status(429), Some(Class::RateLimit));
        assert_eq!(Class::of_status(502), Some(Class::Discord));
        assert!(Class::Discord.is_discord_side() && Class::Transport.is_discord_side());
        assert!(!Class::Auth.is_discord_side() && !Class::RateLimit.is_discord_side());
    }

    #[test]
    fn uris_below_api_base() {
        let api = ApiClient::new("http://127.0.0.1:9000/api/v10/").expect("valid");
        assert_eq!(
            api.api_uri("/gateway/bot").unwrap().to_string(),
            "http://127.0.0.1:9000/api/v10/gateway/bot"
        );
        assert_eq!(
            api.forward_uri("/api/v9/users/@me?x=1")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9000/api/v9/users/@me?x=1"
        );
        assert_eq!(
            (api.authority(), api.host()),
            ("127.0.0.1:9000", "127.0.0.1")
        );
        let api = ApiClient::new("https://example.com/discord/api/v10").expect("valid");
        assert_eq!(
            api.forward_uri("/api/v10/gateway").unwrap().to_string(),
            "https://example.com/discord/api/v10/gateway"
        );
        for bad in [
            "http://example.com/api",
            "https://u:p@example.com/api",
            "https://example.com/api?x=1",
            "ftp://example.com",
        ] {
            assert!(ApiClient::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_config_builds() {
        tls_config().expect("TLS config");
    }
}
