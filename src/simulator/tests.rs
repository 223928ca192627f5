//! Loopback tests of the simulator, with tokio-tungstenite as the client.

use std::time::Duration;

use flate2::{Decompress, FlushDecompress};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::*;

const T: Duration = Duration::from_secs(3);

fn cfg() -> SimConfig {
    SimConfig {
        heartbeat_interval_ms: 500,
        ..Default::default()
    }
}

/// One raw HTTP/1.1 request. Returns (status, head, body).
async fn http(
    sim: &Simulator,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let base = sim.api_base();
    let addr = base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    // The simulator keeps connections alive unless asked not to.
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && *v == "chunked");
    if !chunked {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// A header of a response head, by name in any case (hyper sends them
/// lower-case, as Discord's HTTP/2 answers do).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

async fn http_get(sim: &Simulator, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let auth: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http(sim, "GET", &format!("/api/v10{path}"), &auth, b"").await
}

enum Inflate {
    None,
    Zlib(Box<Decompress>),
    Zstd(Box<Decoder<'static>>),
}

impl Inflate {
    fn new(c: Compression) -> Self {
        match c {
            Compression::None => Inflate::None,
            Compression::ZlibStream => Inflate::Zlib(Box::new(Decompress::new(true))),
            Compression::ZstdStream => Inflate::Zstd(Box::new(Decoder::new().unwrap())),
        }
    }

    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Inflate::None => Ok(data.to_vec()),
            Inflate::Zlib(d) => {
                assert!(data.ends_with(&[0, 0, 0xff, 0xff]), "missing sync marker");
                let mut out = Vec::with_capacity(data.len() * 4 + 64);
                let start = d.total_in();
                loop {
                    if out.capacity() - out.len() < 64 {
                        out.reserve(out.capacity());
                    }
                    let used = (d.total_in() - start) as usize;
                    d.decompress_vec(&data[used..], &mut out, FlushDecompress::Sync)
                        .map_err(|e| e.to_string())?;
                    let used = (d.total_in() - start) as usize;
                    if used == data.len() && out.len() < out.capacity() {
                        return Ok(out);
                    }
                }
            }
            Inflate::Zstd(d) => {
                let mut out: Vec<u8> = Vec::with_capacity(data.len() * 4 + 64);
                let mut input = InBuffer::around(data);
                loop {
                    if out.capacity() - out.len() < 1024 {
                        out.reserve(out.capacity().max(4096));
                    }
                    let pos = out.len();
                    let mut ob = OutBuffer::around_pos(&mut out, pos);
                    d.run(&mut input, &mut ob).map_err(|e| e.to_string())?;
                    let full = ob.pos() == ob.capacity();
                    if input.pos() == data.len() && !full {
                        return Ok(out);
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
enum Got {
    Json(Value),
    Closed(Option<u16>),
    Bad(String),
}

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    inflate: Inflate,
}

impl Client {
    async fn connect(base: &str, c: Compression) -> Client {
        let mut url = format!("{base}/?v=10&encoding=json");
        if let Some(q) = c.query_value() {
            url.push_str("&compress=");
            url.push_str(q);
        }
        Self::connect_url(&url, c).await
    }

    async fn connect_url(url: &str, c: Compression) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client {
            ws,
            inflate: Inflate::new(c),
        }
    }

    async fn recv(&mut self) -> Got {
        loop {
            let msg = match tokio::time::timeout(T, self.ws.next()).await {
                Err(_) => panic!("timed out waiting for a frame"),
                Ok(None) => return Got::Closed(None),
                Ok(Some(Err(_))) => return Got::Closed(None),
                Ok(Some(Ok(m))) => m,
            };
            let bytes = match msg {
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Binary(b) => match self.inflate.inflate(&b) {
                    Ok(v) => v,
                    Err(e) => return Got::Bad(e),
                },
                Message::Close(f) => return Got::Closed(f.map(|f| u16::from(f.code))),
                _ => continue,
            };
            return match serde_json::from_slice(&bytes) {
                Ok(v) => Got::Json(v),
                Err(e) => Got::Bad(format!("json: {e}")),
            };
        }
    }

    async fn json(&mut self) -> Value {
        match self.recv().await {
            Got::Json(v) => v,
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Got::Closed(c) => return c,
                Got::Json(_) => continue,
                Got::Bad(e) => panic!("bad frame {e}"),
            }
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    async fn hello(&mut self) -> Value {
        let h = self.json().await;
        assert_eq!(h["op"], 10);
        h
    }

    async fn identify(&mut self, token: &str, shard: [u32; 2], intents: u64) {
        self.send(json!({"op": 2, "d": {
            "token": token,
            "intents": intents,
            "shard": shard,
            "properties": {"os": "linux", "browser": "test", "device": "test"}
        }}))
        .await;
    }

    async fn close(&mut self, code: u16) {
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: "".into(),
            })))
            .await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(T, self.ws.next()).await {}
    }
}

/// Connects, identifies, reads READY and the GUILD_CREATEs. Returns (client, session_id, last s).
async fn ready_client(sim: &Simulator, c: Compression, shard: [u32; 2]) -> (Client, String, u64) {
    let mut cl = Client::connect(&sim.gateway_url(), c).await;
    cl.hello().await;
    cl.identify("sim-token-0000", shard, 513).await;
    let ready = cl.json().await;
    assert_eq!(ready["t"], "READY", "{ready}");
    let sid = ready["d"]["session_id"].as_str().unwrap().to_string();
    let mut last = 1;
    for _ in 0..sim.config().guilds_per_shard {
        let g = cl.json().await;
        assert_eq!(g["t"], "GUILD_CREATE");
        last = g["s"].as_u64().unwrap();
    }
    (cl, sid, last)
}

#[tokio::test]
async fn http_gateway_bot() {
    let sim = Simulator::start(SimConfig {
        shards: 4,
        max_concurrency: 2,
        ..cfg()
    })
    .await
    .unwrap();
    let (st, _, body) = http_get(&sim, "/gateway/bot", Some("Bot sim-token-0000")).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["url"], sim.gateway_url());
    assert_eq!(v["shards"], 4);
    assert_eq!(v["session_start_limit"]["total"], 1000);
    assert_eq!(v["session_start_limit"]["remaining"], 1000);
    assert_eq!(v["session_start_limit"]["reset_after"], 86_400_000u64);
    assert_eq!(v["session_start_limit"]["max_concurrency"], 2);

    let (st, _, body) = http_get(&sim, "/gateway/bot", Some("Bot wrong")).await;
    assert_eq!(st, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"message": "401: Unauthorized", "code": 0})
    );
    let (st, _, _) = http_get(&sim, "/gateway/bot", None).await;
    assert_eq!(st, 401);
    let (st, _, _) = http_get(&sim, "/nope", None).await;
    assert_eq!(st, 404);

    sim.set_rest_failure(Some(RestFailure::Status(429, Some(2.5))));
    let (st, head, body) = http_get(&sim, "/gateway/bot", Some("Bot sim-token-0000")).await;
    assert_eq!(st, 429);
    assert_eq!(header(&head, "Retry-After"), Some("3"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["retry_after"], 2.5);

    sim.set_rest_failure(Some(RestFailure::Count(2)));
    for want in [502, 502, 200] {
        let (st, _, _) = http_get(&sim, "/gateway/bot", Some("Bot sim-token-0000")).await;
        assert_eq!(st, want);
    }
    sim.set_session_start_remaining(7);
    let (_, _, body) = http_get(&sim, "/gateway/bot", Some("Bot sim-token-0000")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["session_start_limit"]["remaining"], 7);
    assert_eq!(sim.rest_requests(), 9);
}

async fn identify_flow(c: Compression) {
    let sim = Simulator::start(SimConfig {
        shards: 2,
        guilds_per_shard: 3,
        ..cfg()
    })
    .await
    .unwrap();
    let mut cl = Client::connect(&sim.gateway_url(), c).await;
    let hello = cl.hello().await;
    assert_eq!(hello["d"]["heartbeat_interval"], 500);
    cl.send(json!({"op": 1, "d": null})).await;
    assert_eq!(cl.json().await["op"], 11);
    cl.identify("sim-token-0000", [1, 2], 513).await;
    let ready = cl.json().await;
    assert_eq!(ready["op"], 0);
    assert_eq!(ready["t"], "READY");
    assert_eq!(ready["s"], 1);
    let d = &ready["d"];
    assert_eq!(d["v"], 10);
    assert_eq!(d["user"]["bot"], true);
    assert_eq!(d["shard"], json!([1, 2]));
    assert_eq!(d["resume_gateway_url"], sim.resume_url());
    assert_eq!(d["guilds"].as_array().unwrap().len(), 3);
    assert!(d["application"]["id"].is_string());
    for s in 2..=4 {
        let g = cl.json().await;
        assert_eq!(g["t"], "GUILD_CREATE");
        assert_eq!(g["s"], s);
        let id: u64 = g["d"]["id"].as_str().unwrap().parse().unwrap();
        assert_eq!((id >> 22) % 2, 1);
    }
    assert_eq!(sim.config().session_start_remaining, 999);

    // Several more messages through the same stream context.
    assert!(sim.inject(
        1,
        Fault::Burst {
            count: 300,
            size: 1024
        }
    ));
    for s in 5..305 {
        let m = cl.json().await;
        assert_eq!(m["s"], s);
        assert_eq!(m["t"], "MESSAGE_CREATE");
        let len = m["d"].to_string().len();
        assert!((900..1200).contains(&len), "{len}");
    }
    assert_eq!(sim.dispatch(1, "TYPING_START", json!({"x": 1})), 1);
    let m = cl.json().await;
    assert_eq!(
        (m["t"].as_str(), m["s"].as_u64()),
        (Some("TYPING_START"), Some(305))
    );
    sim.inject(1, Fault::Oversized(200_000));
    let raw = match cl.ws.next().await.unwrap().unwrap() {
        Message::Text(t) => t.as_bytes().to_vec(),
        Message::Binary(b) => cl.inflate.inflate(&b).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(raw.len(), 200_000);
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["s"], 306);

    cl.send(json!({"op": 1, "d": 306})).await;
    assert_eq!(cl.json().await["op"], 11);
    let conns = sim.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].shard, Some(1));
    assert_eq!(conns[0].last_heartbeat, Some(json!(306)));
    let ops: Vec<u8> = sim.frames().iter().map(|f| f.op).collect();
    assert_eq!(ops, vec![1, 2, 1]);
    assert_eq!(sim.frames()[2].shard, Some(1));
}

#[tokio::test]
async fn identify_ready_zlib_stream() {
    identify_flow(Compression::ZlibStream).await;
}

#[tokio::test]
async fn identify_ready_zstd_stream() {
    identify_flow(Compression::ZstdStream).await;
}

#[tokio::test]
async fn identify_ready_uncompressed() {
    identify_flow(Compression::None).await;
}

#[tokio::test]
async fn resume_replays_missed_events() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let (mut cl, sid, last) = ready_client(&sim, Compression::ZlibStream, [0, 1]).await;
    assert_eq!(last, 3);
    cl.close(4000).await;
    assert!(
        sim.wait_until(|s| s.connections()[0].closed, T).await,
        "close not seen"
    );
    assert_eq!(sim.connections()[0].close_code_received, Some(4000));
    // Missed while disconnected.
    assert_eq!(sim.dispatch(0, "MESSAGE_CREATE", json!({"n": 1})), 1);
    assert_eq!(sim.dispatch(0, "MESSAGE_CREATE", json!({"n": 2})), 1);

    let url = format!(
        "{}?v=10&encoding=json&compress=zlib-stream",
        sim.resume_url()
    );
    let mut cl = Client::connect_url(&url, Compression::ZlibStream).await;
    cl.hello().await;
    // Resume from s=2: GUILD_CREATE s=3 and both messages are replayed.
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": 2}}))
        .await;
    let got: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let m = cl.json().await;
            v.push((
                m["t"].as_str().unwrap().to_string(),
                m["s"].as_u64().unwrap(),
            ));
        }
        v
    };
    assert_eq!(
        got,
        vec![
            ("GUILD_CREATE".into(), 3),
            ("MESSAGE_CREATE".into(), 4),
            ("MESSAGE_CREATE".into(), 5),
            ("RESUMED".into(), 6)
        ]
    );
    sim.dispatch(0, "MESSAGE_CREATE", json!({"n": 3}));
    assert_eq!(cl.json().await["s"], 7);
    let c = &sim.connections()[1];
    assert_eq!(c.path, "/resume");
    assert!(c.query.contains("compress=zlib-stream"));
    assert!(c.resumed);
    assert_eq!(sim.config().session_start_remaining, 999);

    // A seq from the future: 4007 and the session is gone.
    cl.close(4000).await;
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": 99}}))
        .await;
    assert_eq!(cl.close_code().await, Some(4007));
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": 7}}))
        .await;
    let m = cl.json().await;
    assert_eq!((m["op"].clone(), m["d"].clone()), (json!(9), json!(false)));
}

#[tokio::test]
async fn invalid_session_false_expires_session() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let (mut cl, sid, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    assert!(sim.inject(0, Fault::InvalidSession { resumable: false }));
    let m = cl.json().await;
    assert_eq!(m["op"], 9);
    assert_eq!(m["d"], false);
    cl.close(4000).await;
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": 3}}))
        .await;
    let m = cl.json().await;
    assert_eq!((m["op"].clone(), m["d"].clone()), (json!(9), json!(false)));
}

#[tokio::test]
async fn injected_close_codes() {
    let sim = Simulator::start(SimConfig {
        enforce_identify_concurrency: false,
        ..cfg()
    })
    .await
    .unwrap();
    // 4000 keeps the session resumable.
    let (mut cl, sid, last) = ready_client(&sim, Compression::ZstdStream, [0, 1]).await;
    sim.inject(0, Fault::Close(4000));
    assert_eq!(cl.close_code().await, Some(4000));
    assert!(sim.wait_until(|s| s.connections()[0].closed, T).await);
    assert_eq!(sim.connections()[0].close_code_sent, Some(4000));
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": last}}))
        .await;
    assert_eq!(cl.json().await["t"], "RESUMED");

    // Resuming while that connection still holds the session takes it over.
    let mut cl2 = Client::connect(&sim.resume_url(), Compression::None).await;
    cl2.hello().await;
    cl2.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": last}}))
        .await;
    assert_eq!(cl2.json().await["t"], "RESUMED");
    assert_eq!(cl.close_code().await, Some(4000));
    let mut cl = cl2;

    // 4009 invalidates it.
    sim.inject(0, Fault::Close(4009));
    assert_eq!(cl.close_code().await, Some(4009));
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": last + 2}}))
        .await;
    assert_eq!(cl.json().await["op"], 9);

    // Reconnect / heartbeat request / drop.
    let (mut cl, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    sim.inject(0, Fault::RequestHeartbeat);
    assert_eq!(cl.json().await["op"], 1);
    sim.inject(0, Fault::Reconnect);
    assert_eq!(cl.json().await["op"], 7);
    sim.inject(0, Fault::DropTcp);
    assert_eq!(cl.close_code().await, None);
}

#[tokio::test]
async fn stop_acking_makes_a_zombie() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let (mut cl, _, _) = ready_client(&sim, Compression::ZlibStream, [0, 1]).await;
    cl.send(json!({"op": 1, "d": 3})).await;
    assert_eq!(cl.json().await["op"], 11);
    sim.inject(0, Fault::StopAcking);
    // Faults are applied in order: once op 1 arrives, acking is off.
    sim.inject(0, Fault::RequestHeartbeat);
    assert_eq!(cl.json().await["op"], 1);
    cl.send(json!({"op": 1, "d": 3})).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cl.ws.next())
            .await
            .is_err(),
        "got an ACK while acking is stopped"
    );
    sim.inject(0, Fault::ResumeAcking);
    sim.inject(0, Fault::RequestHeartbeat);
    assert_eq!(cl.json().await["op"], 1);
    cl.send(json!({"op": 1, "d": 3})).await;
    assert_eq!(cl.json().await["op"], 11);
}

async fn identify_close(
    sim: &Simulator,
    token: &str,
    shard: [u32; 2],
    intents: u64,
) -> Option<u16> {
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.identify(token, shard, intents).await;
    cl.close_code().await
}

#[tokio::test]
async fn identify_errors() {
    let sim = Simulator::start(SimConfig {
        allowed_privileged: 1 << 1,
        enforce_identify_concurrency: false,
        ..cfg()
    })
    .await
    .unwrap();
    assert_eq!(
        identify_close(&sim, "sim-token-0000", [0, 1], 1 << 15).await,
        Some(4014)
    );
    assert_eq!(
        identify_close(&sim, "sim-token-0000", [0, 1], 1 << 17).await,
        Some(4013)
    );
    assert_eq!(identify_close(&sim, "bad", [0, 1], 1).await, Some(4004));
    assert_eq!(
        identify_close(&sim, "sim-token-0000", [2, 2], 1).await,
        Some(4010)
    );
    assert_eq!(sim.config().session_start_remaining, 1000);

    // Payload before identify.
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.send(
        json!({"op": 3, "d": {"since": null, "activities": [], "status": "online", "afk": false}}),
    )
    .await;
    assert_eq!(cl.close_code().await, Some(4003));
    // Second identify.
    let (mut cl, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    cl.identify("sim-token-0000", [0, 1], 1).await;
    assert_eq!(cl.close_code().await, Some(4005));
    // Oversized client payload.
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 1, "d": null, "pad": "x".repeat(5000)}))
        .await;
    assert_eq!(cl.close_code().await, Some(4002));
    // Unknown opcode.
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 5, "d": null})).await;
    assert_eq!(cl.close_code().await, Some(4001));
    // Wrong version.
    let mut cl = Client::connect_url(
        &format!("{}/?v=9&encoding=json", sim.gateway_url()),
        Compression::None,
    )
    .await;
    assert_eq!(cl.close_code().await, Some(4012));
    // Everything was recorded.
    assert!(sim.connections().iter().all(|c| c.opened_at.elapsed() < T));
    assert!(sim.frames().iter().any(|f| f.op == 5));
}

#[tokio::test]
async fn identify_concurrency_and_rate_limit() {
    let sim = Simulator::start(SimConfig {
        client_rate_limit: (5, Duration::from_secs(60)),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut first, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    cl.identify("sim-token-0000", [0, 1], 1).await;
    let m = cl.json().await;
    assert_eq!((m["op"].clone(), m["d"].clone()), (json!(9), json!(false)));
    assert_eq!(sim.config().session_start_remaining, 999);
    // 1 identify + 5 heartbeats > 5 frames: 4008.
    for _ in 0..5 {
        first.send(json!({"op": 1, "d": 3})).await;
    }
    assert_eq!(first.close_code().await, Some(4008));
}

#[tokio::test]
async fn client_close_1000_invalidates_session() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let (mut cl, sid, last) = ready_client(&sim, Compression::None, [0, 1]).await;
    cl.close(1000).await;
    assert!(sim.wait_until(|s| s.sessions()[0].invalid, T).await);
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid, "seq": last}}))
        .await;
    assert_eq!(cl.json().await["op"], 9);
    assert_eq!(sim.connections()[0].close_code_received, Some(1000));
}

#[tokio::test]
async fn corrupt_and_malformed_frames() {
    for c in [
        Compression::None,
        Compression::ZlibStream,
        Compression::ZstdStream,
    ] {
        let sim = Simulator::start(cfg()).await.unwrap();
        let (mut cl, _, _) = ready_client(&sim, c, [0, 1]).await;
        sim.inject(0, Fault::MalformedJson);
        match cl.recv().await {
            Got::Bad(e) => assert!(e.starts_with("json"), "{c:?}: {e}"),
            other => panic!("{c:?}: {other:?}"),
        }
        sim.inject(0, Fault::CorruptFrame);
        match cl.ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => {
                let r = cl.inflate.inflate(&b);
                match c {
                    Compression::None => assert!(std::str::from_utf8(&b).is_err()),
                    _ => assert!(r.is_err(), "{c:?} inflated {r:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn wait_until_times_out_and_shutdown_stops() {
    let sim = Simulator::start(cfg()).await.unwrap();
    assert!(
        !sim.wait_until(|s| !s.frames().is_empty(), Duration::from_millis(50))
            .await
    );
    let (mut cl, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    sim.shutdown();
    assert_eq!(cl.close_code().await, None);
    assert!(sim.wait_until(|s| s.connections()[0].closed, T).await);
}

#[test]
fn compressors_round_trip() {
    for c in [Compression::ZlibStream, Compression::ZstdStream] {
        let mut comp = StreamCompressor::new(c);
        let mut inf = Inflate::new(c);
        for i in 0..50u64 {
            let p = message_create_payload_seeded(i, 1000 + i as usize * 10);
            let out = comp.compress(p.as_bytes());
            if c == Compression::ZlibStream {
                assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
            }
            assert!(out.len() < p.len());
            assert_eq!(inf.inflate(&out).unwrap(), p.as_bytes());
        }
    }
    assert_eq!(
        "zlib-stream".parse::<Compression>(),
        Ok(Compression::ZlibStream)
    );
    assert_eq!(Compression::from_query(None), Ok(Compression::None));
    assert!("gzip".parse::<Compression>().is_err());
}

#[test]
fn message_payload_is_realistic() {
    let a = message_create_payload_seeded(1, 1024);
    let b = message_create_payload_seeded(2, 1024);
    assert_ne!(a, b);
    assert_eq!(a, message_create_payload_seeded(1, 1024));
    for p in [&a, &b] {
        let v: Value = serde_json::from_str(p).unwrap();
        assert!((1000..1100).contains(&p.len()), "{}", p.len());
        assert!(v["id"].as_str().unwrap().parse::<u64>().is_ok());
        assert!(v["author"]["username"].is_string());
    }
    let ids = guild_ids_for_shard(3, 8, 5);
    assert!(ids.iter().all(|g| (g >> 22) % 8 == 3));
}

#[tokio::test]
async fn weird_clients_do_not_break_the_simulator() {
    let sim = Simulator::start(cfg()).await.unwrap();
    let cases: Vec<(Message, Option<u16>)> = vec![
        (Message::binary(vec![0xff, 0x00, 0xfe]), Some(4002)),
        (Message::text("not json"), Some(4002)),
        (Message::text("[1,2,3]"), Some(4001)),
        (Message::text(r#"{"op":"1"}"#), Some(4001)),
        (Message::text(r#"{"op":99999999999}"#), Some(4001)),
        (Message::text(r#"{"op":2,"d":"x"}"#), Some(4002)),
        (Message::text(r#"{"op":6,"d":{"seq":-1}}"#), Some(4004)),
        (
            Message::text(r#"{"op":2,"d":{"token":"sim-token-0000","intents":1,"shard":[1]}}"#),
            Some(4010),
        ),
        (
            Message::text(r#"{"op":2,"d":{"token":"sim-token-0000","intents":-5}}"#),
            Some(4013),
        ),
    ];
    for (msg, want) in cases {
        let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
        cl.hello().await;
        cl.ws.send(msg.clone()).await.unwrap();
        assert_eq!(cl.close_code().await, want, "{msg:?}");
    }
    // A message over the server's frame limit just drops the connection.
    let mut cl = Client::connect(&sim.gateway_url(), Compression::None).await;
    cl.hello().await;
    let _ = cl.ws.send(Message::text("x".repeat(2 << 20))).await;
    assert_eq!(cl.close_code().await, None);
    // Garbage that is not even a WebSocket handshake.
    let addr = sim.gateway_url().trim_start_matches("ws://").to_string();
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    drop(raw);
    // Still serving.
    let (_cl, _, _) = ready_client(&sim, Compression::ZlibStream, [0, 1]).await;
    assert!(sim.connections().iter().filter(|c| c.closed).count() >= 10);
}

#[tokio::test]
async fn session_and_heartbeat_timeouts() {
    let sim = Simulator::start(SimConfig {
        session_timeout: Duration::from_millis(100),
        heartbeat_timeout: Some(Duration::from_millis(200)),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut cl, _, _) = ready_client(&sim, Compression::None, [0, 1]).await;
    // No heartbeat: closed with 4009.
    assert_eq!(cl.close_code().await, Some(4009));
    assert!(sim.sessions()[0].invalid);

    let sim = Simulator::start(SimConfig {
        session_timeout: Duration::from_millis(100),
        ..cfg()
    })
    .await
    .unwrap();
    let (mut cl, sid2, last2) = ready_client(&sim, Compression::None, [0, 1]).await;
    cl.close(4000).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut cl = Client::connect(&sim.resume_url(), Compression::None).await;
    cl.hello().await;
    cl.send(json!({"op": 6, "d": {"token": "sim-token-0000", "session_id": sid2, "seq": last2}}))
        .await;
    assert_eq!(cl.json().await["d"], false);
}

#[test]
fn simulator_is_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Simulator>();
    check::<Fault>();
    check::<ClientFrame>();
    check::<ConnectionInfo>();
}

mod buckets;
/// REST routes, the world's guilds and member chunks.
mod world_rest;
