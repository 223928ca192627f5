//! `shardwarden status`: ask a running daemon for one `health` message over
//! the bot socket and print it as a table (or JSON). Exit 0 only when every
//! shard is active, so it doubles as a health check.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How the table and the log spell "nothing here" (no close yet, no
/// latency yet, nothing held).
pub const NONE: &str = "-";

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
    let hello = format!(
        "{{\"op\":\"hello\",\"v\":1,\"client\":\"{}\",\"events\":[],\"diagnostics\":false,\"resume_from\":null}}\n{{\"op\":\"status\"}}\n",
        crate::protocol::STATUS_CLIENT
    );
    write
        .write_all(hello.as_bytes())
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
    print!("{}", table(health));
}

/// The health table `status` prints.
fn table(health: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
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
            Value::Null => NONE.to_string(),
            other => other.to_string().trim_matches('"').to_string(),
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<14} {:>8} {:>10} {:>10} {:>8} {:>10} {:>8} {:>10}",
            text(&s["shard"]),
            text(&s["state"]),
            s["latency_ms"]
                .as_u64()
                .map_or(NONE.to_string(), |ms| format!("{ms} ms")),
            text(&s["seq"]),
            s["session_age_s"]
                .as_u64()
                .map_or(NONE.to_string(), |a| format!("{a} s")),
            text(&s["resumes"]),
            text(&s["identifies"]),
            text(&s["zombies"]),
            text(&s["last_close"]),
        );
    }
    let active = shards.iter().filter(|s| s["state"] == "active").count();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{active}/{} shards active; identify budget {}/{}; cursor head {}, oldest held {}; {} bot(s) connected",
        shards.len(),
        health["identify_budget"]["remaining"],
        health["identify_budget"]["total"],
        health["head"],
        match &health["oldest"] {
            Value::Null => NONE.to_string(),
            v => v.to_string(),
        },
        health["bot_clients"],
    );
    let incident = &health["incident"];
    if incident.is_object() {
        let _ = writeln!(
            out,
            "Discord-side incident {} since {} (shards {}): {}",
            incident["state"].as_str().unwrap_or("suspected"),
            incident["since"].as_str().unwrap_or("?"),
            incident["shards"],
            incident["detail"].as_str().unwrap_or("")
        );
    }
    write_clients(&mut out, health);
    write_extras(&mut out, health);
    write_dropin(&mut out, health);
    out
}

/// The drop-in front door's client sessions (when `[proxy]` is on).
fn write_dropin(out: &mut String, health: &Value) {
    use std::fmt::Write;
    let Some(dropin) = health["dropin"].as_array() else {
        return;
    };
    let _ = writeln!(out);
    if dropin.is_empty() {
        let _ = writeln!(out, "drop-in front door: no client sessions");
        return;
    }
    let _ = writeln!(
        out,
        "{:<24} {:>5}  {:<10} {:>10} {:>8}",
        "drop-in client", "shard", "state", "seq", "resumes"
    );
    for c in dropin {
        let _ = writeln!(
            out,
            "{:<24} {:>5}  {:<10} {:>10} {:>8}",
            c["client"].as_str().unwrap_or(NONE),
            c["shard"],
            c["state"].as_str().unwrap_or(NONE),
            c["seq"],
            c["resumes"],
        );
    }
}

/// Each bot client's ack and lag (the slowest acking one sets the resume
/// point after a restart).
fn write_clients(out: &mut String, health: &Value) {
    use std::fmt::Write;
    let Some(clients) = health["clients"].as_array().filter(|c| !c.is_empty()) else {
        return;
    };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>12} {:>10}  last seen",
        "client", "connected", "acked", "lag"
    );
    let or_none = |v: &Value| v.as_u64().map_or(NONE.to_string(), |n| n.to_string());
    for c in clients {
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>12} {:>10}  {}",
            c["client"].as_str().unwrap_or("?"),
            or_none(&c["connected"]),
            or_none(&c["acked"]),
            or_none(&c["lag"]),
            c["seen"].as_str().unwrap_or(NONE),
        );
    }
}

/// The JetStream sink and held-back events, when there is something to say.
fn write_extras(out: &mut String, health: &Value) {
    use std::fmt::Write;
    if let Some(b) = health.get("broker").filter(|b| b.is_object()) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "JetStream: {}; published {}, position {}, backlog {}, lost to the ring {}",
            if b["connected"] == true {
                "connected"
            } else {
                "NOT connected (events wait in the replay ring)"
            },
            b["published"],
            b["position"],
            b["backlog"],
            b["missed"],
        );
    }
    if let Some(c) = health.get("cluster").filter(|c| c.is_object()) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Cluster: this daemon is {:?}; Redis {}{}; lease_ttl {} ms; renewals {}, claims {}, takeovers {}, leases lost {}",
            c["name"].as_str().unwrap_or("?"),
            if c["redis"] == "connected" {
                "connected".to_string()
            } else {
                "DOWN (running shards keep running while their leases last; new identifies wait)"
                    .to_string()
            },
            c["redis_error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            c["lease_ttl_ms"],
            c["renewals"],
            c["claims"],
            c["takeovers"],
            c["lost"],
        );
        let leases = c["leases"].as_array().cloned().unwrap_or_default();
        let _ = writeln!(out, "{:>5}  {:<24} {:>8}", "lease", "owner", "fence");
        for l in &leases {
            let _ = writeln!(
                out,
                "{:>5}  {:<24} {:>8}",
                l["shard"],
                l["owner"].as_str().unwrap_or("?"),
                l["fence"]
            );
        }
    }
    if let Some(n) = health["unforwarded"].as_u64().filter(|&n| n > 0) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{n} event(s) NOT forwarded: the state directory cannot be written (see the log, event=state_unwritable)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_names_an_incident_in_progress() {
        let mut health = json!({
            "op": "health",
            "shards": [{"shard": 0, "state": "reconnecting", "latency_ms": null, "seq": 9,
                        "identifies": 1, "resumes": 0, "zombies": 0, "last_close": 4000}],
            "identify_budget": {"remaining": 999, "total": 1000},
            "head": 9, "oldest": 1, "bot_clients": 1,
            "incident": {"state": "suspected", "since": "2026-11-25T10:00:00.000Z",
                         "shards": [0, 1], "detail": "2 of 2 shards lost their connections"},
        });
        let text = table(&health);
        assert!(
            text.contains("Discord-side incident suspected since 2026-11-25T10:00:00.000Z (shards [0,1]): 2 of 2 shards"),
            "{text}"
        );
        health["incident"] = Value::Null;
        assert!(!table(&health).contains("incident"));
    }

    #[test]
    fn the_table_shows_leases_and_redis() {
        let health = json!({
            "op": "health", "shards": [], "identify_budget": {"remaining": 9, "total": 10},
            "head": 0, "oldest": null, "bot_clients": 0,
            "cluster": {"name": "host-a", "redis": "down", "redis_error": "no answer within 500 ms",
                        "lease_ttl_ms": 3000, "renewals": 5, "claims": 2, "takeovers": 1, "lost": 0,
                        "leases": [{"shard": 4, "owner": "host-a", "fence": 17}]},
        });
        let text = table(&health);
        assert!(text.contains("Redis DOWN"), "{text}");
        assert!(text.contains("(no answer within 500 ms)"), "{text}");
        assert!(text.contains("takeovers 1"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["4", "host-a", "17"]),
            "{text}"
        );
    }
}
