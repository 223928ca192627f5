//! `shardwarden check-config`: validate a configuration and print the plan
//! the daemon would run, with warnings and notes an operator should read.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, ShardRange, ShardTotal, TokenSource};

/// Validate `path`, print the resolved plan; exit 0 when valid, 1 when not.
pub fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let plan = match crate::intents::plan(&config.discord.intents, &config.discord.events) {
        Ok(plan) => plan,
        Err(errors) => {
            for e in errors {
                eprintln!("error: {}: {e}", path.display());
            }
            return ExitCode::from(1);
        }
    };
    let intent_names: Vec<&str> = plan.intents.iter().map(|i| i.name).collect();
    println!("config {}: valid", path.display());
    println!();
    println!("intents     {} = {}", plan.bits, intent_names.join(" | "));
    println!("events      {}", plan.events.join(", "));
    println!("compression {}", config.discord.compression.name());
    println!("api_base    {}", config.discord.api_base);
    match &config.discord.token_source {
        TokenSource::Env(name) => match std::env::var(name) {
            Ok(_) => println!("token       from ${name} (set)"),
            Err(_) => println!(
                "token       from ${name} (not set in this shell: `run` will fail unless it is set there)"
            ),
        },
        TokenSource::File(file) => match config.discord.token_source.load() {
            Ok(token) => println!(
                "token       from {} ({})",
                file.display(),
                token.fingerprint()
            ),
            Err(_) => println!(
                "token       from {} (not readable here: `run` needs it readable by the service user, e.g. via LoadCredential=)",
                file.display()
            ),
        },
    }
    let total = match config.shards.total {
        ShardTotal::Auto => "auto (Discord's recommendation from /gateway/bot)".to_string(),
        ShardTotal::Fixed(n) => n.to_string(),
    };
    let range = match (config.shards.range, config.shards.total) {
        (ShardRange::All, _) => "all".to_string(),
        (ShardRange::Auto, _) => format!(
            "auto (claimed through Redis leases, {})",
            config
                .cluster
                .as_ref()
                .and_then(|c| c.max_shards)
                .map_or("no per-daemon maximum".to_string(), |m| format!(
                    "at most {m} shards"
                ))
        ),
        (ShardRange::Span(a, b), _) => format!("{a}..{b} (shards {a}–{}, {} shards)", b - 1, b - a),
    };
    println!(
        "shards      total {total}, range {range}, identify_reserve {}",
        config.shards.identify_reserve
    );
    println!(
        "bot socket  {} (mode {:04o}), replay buffer {} bytes, consumer_ttl {} s",
        config.bot.socket.display(),
        config.bot.socket_mode,
        config.bot.replay_buffer,
        config.bot.consumer_ttl.as_secs()
    );
    if let Some(b) = &config.broker {
        println!(
            "broker      JetStream at {}, stream {:?} (subjects {0}.events.>, {0}.sessions.>; commands on {0}.commands), max {} bytes / {} s, duplicate window {} s",
            b.nats,
            b.stream,
            b.max_bytes,
            b.max_age.as_secs(),
            b.duplicate_window.as_secs()
        );
    }
    if let Some(c) = &config.cluster {
        println!(
            "cluster     Redis at {}, name {:?}, lease_ttl {} s (renewed every {} ms): identify buckets, budget, shard leases and sessions shared",
            crate::cluster::coord::redacted_url(&c.redis),
            c.name,
            c.lease_ttl.as_secs_f64(),
            (c.lease_ttl / 3).as_millis()
        );
    }
    println!(
        "health      every {} s{}",
        config.health.log_interval.as_secs(),
        config
            .health
            .metrics_listen
            .as_ref()
            .map(|m| format!(", metrics on {m}"))
            .unwrap_or_default()
    );
    println!(
        "state dir   {} (sessions younger than {} s are resumed)",
        config.state.dir.display(),
        config.state.resume_window.as_secs()
    );
    match &config.proxy {
        None => println!("proxy       off (no [proxy] section: drop-in bots cannot connect)"),
        Some(proxy) => println!(
            "proxy       http://{0} and ws://{0} (HELLO heartbeat {1} ms; REST global {2}/s, invalid requests {3}/10 min, queue wait {4} ms)",
            proxy.listen,
            proxy.heartbeat_interval.as_millis(),
            proxy.global_rate_limit,
            proxy.invalid_request_limit,
            proxy.max_queue_wait.as_millis()
        ),
    }
    if config.proxy.is_some() && !config.discord.events.iter().any(|e| e == "*") {
        println!();
        println!(
            "warning: [proxy] is on but [discord] events lists {} event(s): drop-in clients get only those live; use events = [\"*\"]",
            plan.events.len()
        );
    }
    let mut warnings = plan.warnings.clone();
    if let ShardRange::Span(first, _) = config.shards.range
        && first > 0
    {
        warnings.extend(crate::intents::shard_zero_warnings(&plan));
    }
    for warning in &warnings {
        println!();
        println!("warning: {warning}");
    }
    for note in &plan.notes {
        println!();
        println!("note: {note}");
    }
    ExitCode::SUCCESS
}
