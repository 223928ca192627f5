//! Suspected Discord-side incidents from the REST side (DESIGN.md §6,
//! issue 11), end to end with the daemon binary: REST calls failing
//! Discord-side on several routes through the front door raise one
//! incident (log line, `incident` message, `health`, `shardwarden status`),
//! failures on one route alone do not, and it clears when Discord answers
//! again.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::daemon::*;
use common::servers::{free_port, http_get};
use serde_json::{Value, json};
use shardwarden::simulator::{RestFailure, world};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request through the front door; the status it answered.
async fn call(addr: SocketAddr, method: &str, path: &str) -> u16 {
    call_as(addr, method, path, TOKEN).await
}

async fn call_as(addr: SocketAddr, method: &str, path: &str, token: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = if method == "POST" {
        r#"{"content":"hi"}"#
    } else {
        ""
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bot {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    String::from_utf8_lossy(&answer)[9..12]
        .parse()
        .expect("status")
}

/// The next `incident` message, skipping everything else.
async fn next_incident(bot: &mut Bot) -> Value {
    bot.next_op("incident").await
}

/// The metrics once they contain `line` (they are exported now and then).
async fn metrics_show(port: u16, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http_get(port, "/metrics");
        if text.contains(line) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status_table(daemon: &Daemon) -> String {
    let socket = daemon.socket();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("status")
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("run shardwarden status")
    })
    .await
    .expect("status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_failures_across_routes_are_one_incident_that_clears_when_calls_succeed() {
    let port = free_port();
    let metrics_port = free_port();
    let extra = format!("metrics_listen = \"127.0.0.1:{metrics_port}\"");
    let (sim, daemon, _tmp) = start_with(shards(2), &extra, |t| {
        let mut proxy = toml::Table::new();
        proxy.insert("listen".into(), format!("127.0.0.1:{port}").into());
        t.insert("proxy".into(), proxy.into());
        t["discord"]["events"] = toml::Value::Array(vec!["*".into()]);
    })
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut hello = hello(Value::Null);
    hello["diagnostics"] = json!(true);
    let (mut bot, _) = Bot::connect(&daemon.socket(), hello).await;
    wait_sim(&sim, "both shards identified", |s| s.sessions().len() == 2).await;
    let channel = world::text_channel_ids(sim.shard_guilds(0)[0])[0];

    // Secrets in a route, a query and another token's Authorization.
    let webhook = "/api/v10/webhooks/77/secret-webhook-token?wait=true&token=query-secret";
    assert_eq!(call(addr, "POST", webhook).await, 404);
    assert_eq!(
        call_as(addr, "GET", "/api/v10/users/@me", "other-secret-token-zz99").await,
        401
    );

    // One route failing over and over is that route's problem.
    sim.set_rest_failure(Some(RestFailure::Status(500, None)));
    let messages = format!("/api/v10/channels/{channel}/messages");
    for _ in 0..4 {
        assert_eq!(call(addr, "POST", &messages).await, 500);
    }
    // Two more routes fail Discord-side (GETs are retried first): now it
    // is Discord.
    assert_eq!(call(addr, "GET", "/api/v10/users/@me").await, 500);
    assert_eq!(
        call(addr, "GET", &format!("/api/v10/channels/{channel}")).await,
        500
    );
    let suspected = next_incident(&mut bot).await;
    assert_eq!(suspected["state"], "suspected", "{suspected}");
    let detail = suspected["detail"].as_str().expect("detail");
    assert!(
        detail.contains("3 routes") && detail.contains("POST /api/v10/channels/:id/messages"),
        "{detail}"
    );
    assert!(
        !detail.contains(&channel.to_string()),
        "ids left out: {detail}"
    );
    let table = status_table(&daemon).await;
    assert!(
        table.contains("Discord-side incident suspected"),
        "status shows it:\n{table}"
    );
    bot.send(json!({"op":"status"})).await;
    let health = bot.next_op("health").await;
    assert_eq!(health["incident"]["state"], "suspected", "{health}");
    metrics_show(metrics_port, "\nshardwarden_discord_incident 1\n").await;

    // Still failing: no second report. Then Discord answers again.
    assert_eq!(call(addr, "GET", "/api/v10/applications/@me").await, 500);
    sim.set_rest_failure(None);
    assert_eq!(call(addr, "GET", "/api/v10/users/@me").await, 200);
    let recovered = next_incident(&mut bot).await;
    assert_eq!(recovered["state"], "recovered", "{recovered}");
    bot.send(json!({"op":"status"})).await;
    let health = bot.next_op("health").await;
    assert!(health["incident"].is_null(), "{health}");

    let log = daemon.log();
    assert_eq!(
        log.matches("event=discord_incident_suspected").count(),
        1,
        "one report:\n{log}"
    );
    assert_eq!(log.matches("event=discord_incident_recovered").count(), 1);
    metrics_show(metrics_port, "\nshardwarden_discord_incidents_total 1\n").await;
    let scraped = metrics_show(metrics_port, "\nshardwarden_discord_incident 0\n").await;
    assert!(
        scraped.contains("shardwarden_rest_failures_total{"),
        "{scraped}"
    );
    for secret in [
        TOKEN,
        "other-secret-token",
        "secret-webhook-token",
        "query-secret",
    ] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
        assert!(
            !scraped.contains(secret),
            "{secret:?} in the metrics:\n{scraped}"
        );
    }
    assert!(
        log.contains("…zz99"),
        "the other token by its last 4:\n{log}"
    );
}
