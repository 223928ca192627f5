//! `shardwarden status`: ask a running daemon for one `health` message over
//! the bot socket and print it as a table (or JSON). Exit 0 only when every
//! shard is active, so it doubles as a health check.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Exit code when the daemon answers but some shard is not healthy.
const EXIT_UNHEALTHY: u8 = 2;

/// Query the daemon at `socket`.
pub async fn status(socket: &Path, json: bool) -> ExitCode {
    match tokio::time::timeout(Duration::from_secs(10), fetch_health(socket)).await {
        Ok(Ok(health)) => {
            if json {
                println!("{health}");
            } else {
                print_table(&health);
            }
            let healthy = health["shards"]
                .as_array()
                .is_some_and(|shards| shards.iter().all(|s| s["state"] == "active"));
            if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_UNHEALTHY)
            }
        }
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            eprintln!(
                "error: the daemon at {} did not answer within 10 s",
                socket.display()
            );
            ExitCode::from(1)
        }
    }
}

async fn fetch_health(socket: &Path) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is shardwarden running, and may this user open the socket? check [bot] socket and socket_mode)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(b"{\"op\":\"hello\",\"v\":1,\"client\":\"shardwarden-status\",\"events\":[\"*\"],\"diagnostics\":false,\"resume_from\":null}\n{\"op\":\"status\"}\n")
        .await
        .map_err(|e| format!("cannot write to the daemon: {e}"))?;
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| format!("reading from the daemon: {e}"))?
    {
        let Ok(value) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match value["op"].as_str() {
            Some("health") => return Ok(value),
            Some("error") => {
                return Err(format!(
                    "the daemon refused: {}",
                    value["message"].as_str().unwrap_or("?")
                ));
            }
            _ => {}
        }
    }
    Err("the daemon closed the connection before answering".to_string())
}

fn print_table(health: &Value) {
    println!(
        "{:>5}  {:<14} {:>8} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10}",
        "shard",
        "state",
        "latency",
        "seq",
        "session",
        "resumes",
        "identifies",
        "zombies",
        "last_close"
    );
    let empty = Vec::new();
    let shards = health["shards"].as_array().unwrap_or(&empty);
    for s in shards {
        let text = |v: &Value| match v {
            Value::Null => "-".to_string(),
            other => other.to_string().trim_matches('"').to_string(),
        };
        println!(
            "{:>5}  {:<14} {:>8} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10}",
            text(&s["shard"]),
            text(&s["state"]),
            s["latency_ms"]
                .as_u64()
                .map_or("-".to_string(), |ms| format!("{ms} ms")),
            text(&s["seq"]),
            s["session_age_s"]
                .as_u64()
                .map_or("-".to_string(), |a| format!("{a} s")),
            text(&s["resumes"]),
            text(&s["identifies"]),
            text(&s["zombies"]),
            text(&s["last_close"]),
        );
    }
    let active = shards.iter().filter(|s| s["state"] == "active").count();
    println!();
    println!(
        "{active}/{} shards active; identify budget {}/{}; cursor head {}, oldest held {}; {} bot(s) connected",
        shards.len(),
        health["identify_budget"]["remaining"],
        health["identify_budget"]["total"],
        health["head"],
        health["oldest"],
        health["bot_clients"],
    );
    if let Some(dropin) = health["dropin"].as_array() {
        println!();
        if dropin.is_empty() {
            println!("drop-in front door: no client sessions");
            return;
        }
        println!(
            "{:<24} {:>5}  {:<10} {:>10} {:>8}",
            "drop-in client", "shard", "state", "seq", "resumes"
        );
        for c in dropin {
            println!(
                "{:<24} {:>5}  {:<10} {:>10} {:>8}",
                c["client"].as_str().unwrap_or("-"),
                c["shard"],
                c["state"].as_str().unwrap_or("-"),
                c["seq"],
                c["resumes"],
            );
        }
    }
}
