//! `shardwarden check-config`: validate a configuration and print the plan
//! the daemon would run, with warnings and notes an operator should read.

use std::path::{Path, PathBuf};
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
    // Set when the token's file is known and missing: the plan is still
    // printed, then this error, and the exit status is 1.
    let mut token_missing = None;
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
            Err(_) => match unit_credential_source(file, UNIT_DIRS) {
                // The credential path exists only inside the running
                // service; what can be checked here is the file systemd
                // copies it from.
                Some((unit, source)) if source.exists() => println!(
                    "token       from {} (systemd copies it from {} when {unit} starts)",
                    file.display(),
                    source.display()
                ),
                Some((unit, source)) => {
                    println!(
                        "token       from {} (missing: {unit} loads it from {})",
                        file.display(),
                        source.display()
                    );
                    token_missing = Some(format!(
                        "error: no bot token: {unit} loads [discord] token_file {} from {} (LoadCredential=), which does not exist. Put the token there (mode 0600, owner root), e.g. `sudo sh -c 'umask 077; systemd-ask-password \"Discord bot token:\" > {1}'`, then `sudo systemctl enable --now {unit}`",
                        file.display(),
                        source.display()
                    ));
                }
                None => println!(
                    "token       from {} (not readable here: `run` needs it readable by the service user, e.g. via LoadCredential=)",
                    file.display()
                ),
            },
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
    if let Some(error) = token_missing {
        eprintln!();
        eprintln!("{error}");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// Where systemd looks for unit files, highest precedence first.
const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// For a token_file that is a systemd credential,
/// `/run/credentials/<unit>/<id>`, the unit and the file its
/// `LoadCredential=<id>:<source>` copies it from, read from the installed
/// unit file and its drop-ins. None when the path is no credential, the unit
/// is not installed or does not load that id from a file.
fn unit_credential_source(token_file: &Path, unit_dirs: &[&str]) -> Option<(String, PathBuf)> {
    let rest = token_file.strip_prefix("/run/credentials").ok()?;
    let mut parts = rest.iter();
    let (unit, id) = (parts.next()?.to_str()?, parts.next()?.to_str()?);
    if parts.next().is_some() {
        return None;
    }
    let main = unit_dirs
        .iter()
        .map(|dir| Path::new(dir).join(unit))
        .find(|p| p.is_file())?;
    // Drop-ins from every directory, applied in file-name order; a name in
    // a higher-precedence directory hides the same name further down.
    let mut dropins: Vec<PathBuf> = Vec::new();
    for dir in unit_dirs {
        let Ok(entries) = std::fs::read_dir(Path::new(dir).join(format!("{unit}.d"))) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "conf")
                && !dropins.iter().any(|d| d.file_name() == path.file_name())
            {
                dropins.push(path);
            }
        }
    }
    dropins.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let mut source = None;
    for file in std::iter::once(main).chain(dropins) {
        let text = std::fs::read_to_string(&file).ok()?;
        source = load_credential(&text, id, source);
    }
    source.map(|s| (unit.to_string(), s))
}

/// Apply one unit file's `LoadCredential=` lines for `id` to what earlier
/// files said: a later setting of the same id wins, an empty
/// `LoadCredential=` resets the list, and `id` without a path (loaded from
/// systemd's credential store) is no file to check.
fn load_credential(unit_text: &str, id: &str, mut source: Option<PathBuf>) -> Option<PathBuf> {
    for line in unit_text.lines().map(str::trim) {
        let Some(value) = line
            .strip_prefix("LoadCredential")
            .and_then(|v| v.trim_start().strip_prefix('='))
            .map(str::trim)
        else {
            continue;
        };
        if value.is_empty() {
            source = None;
            continue;
        }
        match value.split_once(':') {
            Some((name, path)) if name == id => source = Some(PathBuf::from(path)),
            None if value == id => source = None,
            _ => {}
        }
    }
    source
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_credential_follows_systemd_overrides() {
        let unit = "[Service]\nLoadCredential=other:/x\nLoadCredential=discord-token:/etc/shardwarden/discord-token\n";
        assert_eq!(
            load_credential(unit, "discord-token", None),
            Some(PathBuf::from("/etc/shardwarden/discord-token"))
        );
        let dropin = "[Service]\nLoadCredential=\nLoadCredential = discord-token:/srv/token\n";
        assert_eq!(
            load_credential(dropin, "discord-token", Some(PathBuf::from("/a"))),
            Some(PathBuf::from("/srv/token"))
        );
        assert_eq!(
            load_credential(
                "LoadCredential=\n",
                "discord-token",
                Some(PathBuf::from("/a"))
            ),
            None
        );
        assert_eq!(
            load_credential(
                "LoadCredential=discord-token\n",
                "discord-token",
                Some(PathBuf::from("/a"))
            ),
            None
        );
        assert_eq!(
            load_credential("# LoadCredential=discord-token:/a\n", "discord-token", None),
            None
        );
    }

    #[test]
    fn credential_source_reads_the_installed_unit_and_its_dropins() {
        let etc = tempfile::tempdir().unwrap();
        let usr = tempfile::tempdir().unwrap();
        let dirs = [etc.path().to_str().unwrap(), usr.path().to_str().unwrap()];
        let token = Path::new("/run/credentials/shardwarden.service/discord-token");
        assert_eq!(
            unit_credential_source(token, &dirs),
            None,
            "no unit installed"
        );

        std::fs::write(
            usr.path().join("shardwarden.service"),
            "[Service]\nLoadCredential=discord-token:/etc/shardwarden/discord-token\n",
        )
        .unwrap();
        assert_eq!(
            unit_credential_source(token, &dirs),
            Some((
                "shardwarden.service".to_string(),
                PathBuf::from("/etc/shardwarden/discord-token")
            ))
        );
        assert_eq!(
            unit_credential_source(Path::new("/etc/shardwarden/discord-token"), &dirs),
            None,
            "not a credential path"
        );

        std::fs::create_dir(etc.path().join("shardwarden.service.d")).unwrap();
        std::fs::write(
            etc.path().join("shardwarden.service.d/token.conf"),
            "[Service]\nLoadCredential=discord-token:/srv/bot/token\n",
        )
        .unwrap();
        assert_eq!(
            unit_credential_source(token, &dirs).map(|(_, s)| s),
            Some(PathBuf::from("/srv/bot/token"))
        );
    }
}
