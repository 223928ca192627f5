//! Minimal HTTP/1.1 server for `GET /api/v10/gateway[/bot]`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Inner, RestFailure};

const MAX_HEAD: usize = 16 * 1024;

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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

fn error_response(status: u16, retry_after: Option<f64>) -> Response {
    let mut extra_headers = Vec::new();
    let body = match status {
        401 => json!({"message": "401: Unauthorized", "code": 0}),
        403 => json!({"message": "Missing Access", "code": 50001}),
        404 => json!({"message": "404: Not Found", "code": 0}),
        405 => json!({"message": "405: Method Not Allowed", "code": 0}),
        429 => {
            let ra = retry_after.unwrap_or(1.0).max(0.0);
            extra_headers.push(("Retry-After".into(), (ra.ceil() as u64).to_string()));
            extra_headers.push(("X-RateLimit-Scope".into(), "user".into()));
            extra_headers.push(("X-RateLimit-Global".into(), "false".into()));
            json!({"message": "You are being rate limited.", "retry_after": ra, "global": false, "code": 0})
        }
        s => json!({"message": format!("{s}: {}", reason(s)), "code": 0}),
    };
    Response {
        status,
        body: body.to_string(),
        extra_headers,
    }
}

async fn handle(inner: Arc<Inner>, mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(p) = find_head_end(&buf) {
            break p;
        }
        if buf.len() > MAX_HEAD {
            let _ = write_response(&mut stream, &error_response(400, None)).await;
            return;
        }
        let mut chunk = [0u8; 2048];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut auth: Option<String> = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
        {
            auth = Some(v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("").trim_end_matches('/');

    let resp = {
        let mut st = inner.lock();
        st.rest_requests += 1;
        let failure = match st.rest_failure.clone() {
            None => None,
            Some(RestFailure::Status(code, ra)) => Some(Some((code, ra))),
            Some(RestFailure::Hangup) => Some(None),
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
        };
        let is_api = path == "/api/v10/gateway/bot" || path == "/api/v10/gateway";
        if !is_api {
            error_response(404, None)
        } else if method != "GET" {
            error_response(405, None)
        } else if let Some(f) = failure {
            match f {
                Some((code, ra)) => error_response(code, ra),
                None => {
                    drop(st);
                    inner.notify_changed();
                    return; // hang up without a response
                }
            }
        } else if path == "/api/v10/gateway" {
            Response {
                status: 200,
                body: json!({"url": inner.gateway_url()}).to_string(),
                extra_headers: Vec::new(),
            }
        } else {
            let expected = format!("Bot {}", st.cfg.token);
            if auth.as_deref() != Some(expected.as_str()) {
                error_response(401, None)
            } else {
                let c = &st.cfg;
                Response {
                    status: 200,
                    body: json!({
                        "url": inner.gateway_url(),
                        "shards": c.shards,
                        "session_start_limit": {
                            "total": c.session_start_total,
                            "remaining": c.session_start_remaining,
                            "reset_after": c.reset_after_ms,
                            "max_concurrency": c.max_concurrency,
                        }
                    })
                    .to_string(),
                    extra_headers: Vec::new(),
                }
            }
        }
    };
    inner.notify_changed();
    let _ = write_response(&mut stream, &resp).await;
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
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
