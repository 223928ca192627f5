//! Configuration: the TOML file of DESIGN.md §2, parsed, defaulted and
//! validated. Every error names the key, the bad value and what would be
//! valid; a TOML syntax error carries its line and column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::compression::Compression;

/// Where the bot token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// An environment variable.
    Env(String),
    /// A file (relative names are looked up in `$CREDENTIALS_DIRECTORY`
    /// first, as systemd's `LoadCredential=` provides them).
    File(PathBuf),
}

/// The bot token. Never printed: `Debug` and `Display` show only a
/// fingerprint (its last 4 characters).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wrap a token read from a file or the environment.
    pub fn new(token: impl Into<String>) -> Self {
        let token: String = token.into();
        let token = token.trim();
        let token = token.strip_prefix("Bot ").unwrap_or(token);
        Token(token.to_string())
    }

    /// The secret itself, for IDENTIFY/RESUME and the Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `…abcd`: enough to tell tokens apart, useless to an attacker.
    pub fn fingerprint(&self) -> String {
        let tail: String = self
            .0
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.fingerprint())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// `[shards] total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardTotal {
    /// Discord's recommendation from `/gateway/bot`.
    Auto,
    /// A fixed count.
    Fixed(u32),
}

/// `[shards] range`: the shards this daemon owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardRange {
    /// Every shard of `total`.
    All,
    /// `start..end`, end excluded.
    Span(u32, u32),
    /// `"auto"` (only with `[cluster]`): any shard whose lease is free,
    /// claimed at run time (DESIGN §4).
    Auto,
}

impl ShardRange {
    /// The shard ids owned out of `total`, or an error when the range does
    /// not fit.
    pub fn resolve(self, total: u32) -> Result<Vec<u32>, String> {
        match self {
            ShardRange::All | ShardRange::Auto => Ok((0..total).collect()),
            ShardRange::Span(start, end) if end <= total => Ok((start..end).collect()),
            ShardRange::Span(start, end) => Err(format!(
                "[shards] range = \"{start}..{end}\" does not fit in total = {total}: the end (excluded) must be at most {total}"
            )),
        }
    }
}

impl fmt::Display for ShardRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardRange::All => f.write_str("all"),
            ShardRange::Auto => f.write_str("auto"),
            ShardRange::Span(start, end) => write!(f, "{start}..{end}"),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when `$JOURNAL_STREAM` says stderr is the journal, else text.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[discord]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscordConfig {
    /// Where the token comes from.
    pub token_source: TokenSource,
    /// REST base, e.g. `https://discord.com/api/v10`.
    pub api_base: String,
    /// Declared intent names, as written.
    pub intents: Vec<String>,
    /// Subscribed dispatch names, as written.
    pub events: Vec<String>,
    /// Transport compression.
    pub compression: Compression,
    /// IDENTIFY `large_threshold` (50–250).
    pub large_threshold: u32,
}

/// `[shards]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardsConfig {
    /// Total shard count.
    pub total: ShardTotal,
    /// Shards this daemon owns.
    pub range: ShardRange,
    /// Identifies never spent from `session_start_limit.remaining`.
    pub identify_reserve: u32,
}

/// `[bot]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BotConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Socket file permissions.
    pub socket_mode: u32,
    /// Replay ring size in bytes.
    pub replay_buffer: usize,
    /// How long a bot client that has not connected keeps holding the
    /// resume point back with its last ack (DESIGN §3.3).
    pub consumer_ttl: Duration,
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Summary log and bot `health` interval.
    pub log_interval: Duration,
    /// Prometheus endpoint, if any.
    pub metrics_listen: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Default log filter (e.g. `info`), overridden by `RUST_LOG`.
    pub log_level: String,
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// Where sessions and the cursor counter are persisted.
    pub dir: PathBuf,
    /// A persisted session older than this is not resumed (Discord keeps a
    /// dropped session for "a few minutes").
    pub resume_window: Duration,
}

/// `[proxy]`: the drop-in front door (DESIGN.md §5). Absent = off.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Loopback address the front door listens on (HTTP and WebSocket).
    pub listen: std::net::SocketAddr,
    /// `heartbeat_interval` sent to clients in HELLO.
    pub heartbeat_interval: Duration,
    /// REST requests per second for the bot, shared by every client.
    pub global_rate_limit: u32,
    /// 401/403/429 answers per 10 minutes before the front door refuses locally.
    pub invalid_request_limit: u32,
    /// Longest a REST request waits for its bucket or the global limit.
    pub max_queue_wait: Duration,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[discord]`
    pub discord: DiscordConfig,
    /// `[shards]`
    pub shards: ShardsConfig,
    /// `[bot]`
    pub bot: BotConfig,
    /// `[health]`
    pub health: HealthConfig,
    /// `[state]`
    pub state: StateConfig,
    /// `[proxy]`, when the drop-in front door is on.
    pub proxy: Option<ProxyConfig>,
    /// `[broker]`: JetStream for events and commands (DESIGN §4); off when
    /// absent.
    pub broker: Option<BrokerConfig>,
    /// `[cluster]`: Redis coordination between daemons (DESIGN §4); off
    /// when absent.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]` (DESIGN §4).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Redis URL (`redis://host:6379/0`, or `rediss://` for TLS).
    pub redis: String,
    /// This daemon's name in leases and logs.
    pub name: String,
    /// Shard leases expire this long after their last renewal (renewed
    /// every third of it).
    pub lease_ttl: Duration,
    /// With `range = "auto"`: claim at most this many shards.
    pub max_shards: Option<u32>,
}

/// `[broker]` (DESIGN §4).
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// NATS server URL(s), comma-separated (`nats://host:4222`).
    pub nats: String,
    /// Stream name and subject prefix.
    pub stream: String,
    /// The stream keeps at most this many bytes (oldest dropped first).
    pub max_bytes: u64,
    /// The stream keeps messages at most this long.
    pub max_age: Duration,
    /// JetStream's duplicate window for `Nats-Msg-Id` (covers a failover or
    /// a restart that replays events).
    pub duplicate_window: Duration,
}

/// Everything wrong with a configuration, one message per problem.
#[derive(Debug)]
pub struct ConfigError {
    /// Each message names the key, the value and what would be valid.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "error: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    discord: RawDiscord,
    #[serde(default)]
    shards: RawShards,
    #[serde(default)]
    bot: RawBot,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    state: RawState,
    proxy: Option<RawProxy>,
    broker: Option<RawBroker>,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis: Option<String>,
    name: Option<String>,
    lease_ttl: Option<String>,
    max_shards: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    nats: Option<String>,
    stream: Option<String>,
    max_bytes: Option<String>,
    max_age: Option<String>,
    duplicate_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscord {
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    api_base: Option<String>,
    #[serde(default)]
    intents: Vec<String>,
    #[serde(default)]
    events: Vec<String>,
    compression: Option<String>,
    large_threshold: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShards {
    total: Option<toml::Value>,
    range: Option<String>,
    identify_reserve: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBot {
    socket: Option<PathBuf>,
    socket_mode: Option<toml::Value>,
    replay_buffer: Option<toml::Value>,
    consumer_ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    log_interval: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<String>,
    heartbeat_interval: Option<String>,
    global_rate_limit: Option<i64>,
    invalid_request_limit: Option<i64>,
    max_queue_wait: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
    resume_window: Option<String>,
}

/// Defaults (DESIGN.md §2).
pub mod defaults {
    /// Discord's REST base.
    pub const API_BASE: &str = "https://discord.com/api/v10";
    /// Bot socket.
    pub const SOCKET: &str = "/run/shardwarden/bot.sock";
    /// Bot socket permissions.
    pub const SOCKET_MODE: u32 = 0o660;
    /// Replay ring: 256 MiB.
    pub const REPLAY_BUFFER: usize = 256 << 20;
    /// Identifies kept in reserve.
    pub const IDENTIFY_RESERVE: u32 = 25;
    /// Health interval.
    pub const LOG_INTERVAL_SECS: u64 = 30;
    /// State directory.
    pub const STATE_DIR: &str = "/var/lib/shardwarden";
    /// How old a persisted session may be and still be resumed.
    pub const RESUME_WINDOW_SECS: u64 = 120;
    /// `[cluster] lease_ttl`.
    pub const LEASE_TTL_SECS: u64 = 30;
    /// `[proxy] heartbeat_interval`: Discord's usual 41.25 s.
    pub const PROXY_HEARTBEAT_MS: u64 = 41_250;
    /// `[proxy] global_rate_limit`: Discord's global limit per bot.
    pub const PROXY_GLOBAL_RATE_LIMIT: u32 = 50;
    /// `[proxy] invalid_request_limit`: below Cloudflare's 10,000 per 10 min.
    pub const PROXY_INVALID_REQUEST_LIMIT: u32 = 9000;
    /// `[proxy] max_queue_wait`.
    pub const PROXY_MAX_QUEUE_WAIT_SECS: u64 = 10;
    /// `[broker] stream`.
    pub const BROKER_STREAM: &str = "shardwarden";
    /// `[bot] consumer_ttl`: an absent bot's acks hold the resume point
    /// this long.
    pub const CONSUMER_TTL_SECS: u64 = 24 * 3600;
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one(format!(
                "cannot read config file {}: {e} (pass an existing file with --config)",
                path.display()
            ))
        })?;
        Config::parse(&text).map_err(|mut e| {
            for problem in &mut e.problems {
                *problem = format!("{}: {problem}", path.display());
            }
            e
        })
    }

    /// Parse and validate configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::one(toml_error(text, &e)))?;
        let mut problems = Vec::new();

        let d = raw.discord;
        let token_source = match (d.token_env, d.token_file) {
            (Some(_), Some(_)) => {
                problems.push(
                    "[discord] sets both token_env and token_file: keep exactly one".to_string(),
                );
                None
            }
            (None, None) => {
                problems.push("[discord] needs token_env (an environment variable name, e.g. \"DISCORD_TOKEN\") or token_file (a path, e.g. \"/run/credentials/shardwarden.service/discord-token\")".to_string());
                None
            }
            (Some(env), None) if env.trim().is_empty() => {
                problems.push("[discord] token_env = \"\" is empty: name the environment variable that holds the token".to_string());
                None
            }
            (Some(env), None) => Some(TokenSource::Env(env)),
            (None, Some(file)) => Some(TokenSource::File(file)),
        };
        let api_base = d.api_base.unwrap_or_else(|| defaults::API_BASE.to_string());
        if let Err(e) = check_url(&api_base, &["https", "http"]) {
            problems.push(format!("[discord] api_base = {api_base:?}: {e}"));
        }
        let compression = match d.compression.as_deref() {
            None => Compression::ZlibStream,
            Some(value) => match Compression::from_name(value) {
                Some(c) => c,
                None => {
                    problems.push(format!(
                        "[discord] compression = {value:?} is not valid: use \"zlib-stream\", \"zstd-stream\" or \"none\""
                    ));
                    Compression::None
                }
            },
        };
        if d.events.is_empty() {
            problems.push("[discord] events = [] subscribes to nothing: list the dispatch events the bot handles, e.g. [\"GUILD_CREATE\", \"MESSAGE_CREATE\"]".to_string());
        }
        if d.events.len() > 127 {
            problems.push(format!(
                "[discord] events lists {} names: at most 127 are supported",
                d.events.len()
            ));
        }
        let large_threshold = match d.large_threshold {
            None => 50,
            Some(v @ 50..=250) => v as u32,
            Some(v) => {
                problems.push(format!(
                    "[discord] large_threshold = {v} is out of range: Discord accepts 50 to 250"
                ));
                50
            }
        };

        let s = raw.shards;
        let total = match s.total {
            None => ShardTotal::Auto,
            Some(toml::Value::String(v)) if v == "auto" => ShardTotal::Auto,
            Some(toml::Value::Integer(n)) if (1..=u32::MAX as i64).contains(&n) => {
                ShardTotal::Fixed(n as u32)
            }
            Some(other) => {
                problems.push(format!(
                    "[shards] total = {other} is not valid: use \"auto\" (Discord's recommendation) or a whole number ≥ 1"
                ));
                ShardTotal::Auto
            }
        };
        let range = match s.range.as_deref() {
            None | Some("all") => ShardRange::All,
            Some("auto") => ShardRange::Auto,
            Some(text) => match parse_range(text) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("[shards] range = {text:?}: {e}"));
                    ShardRange::All
                }
            },
        };
        if let (ShardTotal::Fixed(total), ShardRange::Span(..)) = (total, range)
            && let Err(e) = range.resolve(total)
        {
            problems.push(e);
        }
        let identify_reserve = match s.identify_reserve {
            None => defaults::IDENTIFY_RESERVE,
            Some(v) if (0..=100_000).contains(&v) => v as u32,
            Some(v) => {
                problems.push(format!("[shards] identify_reserve = {v} is not valid: use a whole number ≥ 0 (default 25)"));
                defaults::IDENTIFY_RESERVE
            }
        };

        let b = raw.bot;
        let socket = b.socket.unwrap_or_else(|| PathBuf::from(defaults::SOCKET));
        if socket.as_os_str().len() > 107 {
            problems.push(format!(
                "[bot] socket = {:?} is {} bytes long: Unix socket paths must be under 108 bytes",
                socket.display(),
                socket.as_os_str().len()
            ));
        }
        let socket_mode = match b.socket_mode {
            None => defaults::SOCKET_MODE,
            Some(toml::Value::String(v)) => {
                match u32::from_str_radix(v.trim_start_matches("0o"), 8) {
                    Ok(m) if m <= 0o777 => m,
                    _ => {
                        problems.push(format!("[bot] socket_mode = {v:?} is not valid: use an octal permission string such as \"0660\""));
                        defaults::SOCKET_MODE
                    }
                }
            }
            Some(other) => {
                problems.push(format!(
                    "[bot] socket_mode = {other} is not valid: write it as an octal string such as \"0660\" (a bare number would be read as decimal)"
                ));
                defaults::SOCKET_MODE
            }
        };
        let replay_buffer = match b.replay_buffer {
            None => defaults::REPLAY_BUFFER,
            Some(toml::Value::String(v)) => match parse_size(&v) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("[bot] replay_buffer = {v:?}: {e}"));
                    defaults::REPLAY_BUFFER
                }
            },
            Some(toml::Value::Integer(n)) if n > 0 => n as usize,
            Some(other) => {
                problems.push(format!(
                    "[bot] replay_buffer = {other} is not valid: use a size such as \"256MiB\""
                ));
                defaults::REPLAY_BUFFER
            }
        };
        if replay_buffer < 64 << 10 {
            problems.push(format!("[bot] replay_buffer = {replay_buffer} bytes is too small: use at least \"64KiB\" (default \"256MiB\")"));
        }
        let consumer_ttl = match b.consumer_ttl.as_deref() {
            None => Duration::from_secs(defaults::CONSUMER_TTL_SECS),
            Some(v) => match parse_duration(v) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                Ok(_) => {
                    problems.push(format!(
                        "[bot] consumer_ttl = {v:?} is too short: use at least \"1s\" (default \"24h\")"
                    ));
                    Duration::from_secs(defaults::CONSUMER_TTL_SECS)
                }
                Err(e) => {
                    problems.push(format!("[bot] consumer_ttl = {v:?}: {e}"));
                    Duration::from_secs(defaults::CONSUMER_TTL_SECS)
                }
            },
        };

        let h = raw.health;
        let log_interval = match h.log_interval.as_deref() {
            None => Duration::from_secs(defaults::LOG_INTERVAL_SECS),
            Some(v) => match parse_duration(v) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                Ok(_) => {
                    problems.push(format!(
                        "[health] log_interval = {v:?} is too short: use at least \"1s\""
                    ));
                    Duration::from_secs(defaults::LOG_INTERVAL_SECS)
                }
                Err(e) => {
                    problems.push(format!("[health] log_interval = {v:?}: {e}"));
                    Duration::from_secs(defaults::LOG_INTERVAL_SECS)
                }
            },
        };
        if let Some(listen) = &h.metrics_listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            problems.push(format!("[health] metrics_listen = {listen:?} is not an address: use host:port such as \"127.0.0.1:9464\""));
        }
        let log_format = match h.log_format.as_deref() {
            None | Some("auto") => LogFormat::Auto,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                problems.push(format!("[health] log_format = {other:?} is not valid: use \"auto\", \"text\" or \"json\""));
                LogFormat::Auto
            }
        };
        let log_level = h.log_level.unwrap_or_else(|| "info".to_string());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            problems.push(format!("[health] log_level = {log_level:?} is not valid: use \"error\", \"warn\", \"info\", \"debug\" or \"trace\""));
        }

        let st = raw.state;
        let resume_window = match st.resume_window.as_deref() {
            None => Duration::from_secs(defaults::RESUME_WINDOW_SECS),
            Some(v) => match parse_duration(v) {
                Ok(d) => d,
                Err(e) => {
                    problems.push(format!("[state] resume_window = {v:?}: {e}"));
                    Duration::from_secs(defaults::RESUME_WINDOW_SECS)
                }
            },
        };

        let proxy = raw.proxy.and_then(|p| parse_proxy(p, &mut problems));
        let broker = raw.broker.map(|b| broker_config(b, &mut problems));
        let cluster = raw.cluster.map(|c| cluster_config(c, &mut problems));
        if range == ShardRange::Auto && cluster.is_none() {
            problems.push("[shards] range = \"auto\" needs [cluster]: shards are claimed through Redis leases shared by the daemons; add [cluster] redis = \"redis://host:6379/0\", or set range = \"all\" or \"START..END\"".to_string());
        }
        if let Some(c) = &cluster
            && c.max_shards.is_some()
            && range != ShardRange::Auto
        {
            problems.push(format!("[cluster] max_shards = {} applies only to [shards] range = \"auto\" (range is \"{range}\"): remove it or set range = \"auto\"", c.max_shards.unwrap_or(0)));
        }

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            discord: DiscordConfig {
                token_source: token_source.expect("checked above"),
                api_base,
                intents: d.intents,
                events: d.events,
                compression,
                large_threshold,
            },
            shards: ShardsConfig {
                total,
                range,
                identify_reserve,
            },
            bot: BotConfig {
                socket,
                socket_mode,
                replay_buffer,
                consumer_ttl,
            },
            health: HealthConfig {
                log_interval,
                metrics_listen: h.metrics_listen,
                log_format,
                log_level,
            },
            state: StateConfig {
                dir: st.dir.unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
                resume_window,
            },
            proxy,
            broker,
            cluster,
        })
    }
}

/// `[cluster]`, with every problem added to `problems`.
fn cluster_config(c: RawCluster, problems: &mut Vec<String>) -> ClusterConfig {
    let redis = c.redis.unwrap_or_default();
    if redis.is_empty() {
        problems.push("[cluster] redis is required when [cluster] is present: the Redis URL, e.g. \"redis://127.0.0.1:6379/0\" (remove [cluster] to run alone)".to_string());
    } else if !(redis.starts_with("redis://") || redis.starts_with("rediss://"))
        || redis::Client::open(redis.as_str()).is_err()
    {
        // Never echo the URL: it may carry a password.
        problems.push("[cluster] redis is not a valid Redis URL: use redis://[:password@]host:port/db (or rediss:// for TLS)".to_string());
    }
    let name = match c.name {
        Some(n) if !n.trim().is_empty() && !n.contains(char::is_whitespace) && n.len() <= 64 => n,
        Some(n) => {
            problems.push(format!("[cluster] name = {n:?} is not valid: use 1–64 characters without spaces (default: the host name)"));
            n
        }
        None => default_cluster_name(),
    };
    let lease_ttl = match c.lease_ttl.as_deref().map(parse_duration) {
        None => Duration::from_secs(defaults::LEASE_TTL_SECS),
        Some(Ok(d)) if d >= Duration::from_secs(1) => d,
        Some(Ok(_)) => {
            problems.push("[cluster] lease_ttl is too short: use at least \"1s\" (default \"30s\"; renewed every third of it)".to_string());
            Duration::from_secs(defaults::LEASE_TTL_SECS)
        }
        Some(Err(e)) => {
            problems.push(format!(
                "[cluster] lease_ttl = {:?}: {e}",
                c.lease_ttl.unwrap_or_default()
            ));
            Duration::from_secs(defaults::LEASE_TTL_SECS)
        }
    };
    let max_shards = match c.max_shards {
        None => None,
        Some(n) if (1..=u32::MAX as i64).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.push(format!("[cluster] max_shards = {n} is not valid: use a whole number ≥ 1 (or leave it out: no limit)"));
            None
        }
    };
    ClusterConfig {
        redis,
        name,
        lease_ttl,
        max_shards,
    }
}

/// The host name (`[cluster] name`'s default).
fn default_cluster_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shardwarden".to_string())
}

/// `[proxy]`; `None` (with problems pushed) when it is unusable.
fn parse_proxy(p: RawProxy, problems: &mut Vec<String>) -> Option<ProxyConfig> {
    let before = problems.len();
    let listen = match p.listen.as_deref() {
        None => {
            problems.push("[proxy] is present but has no listen: set listen = \"127.0.0.1:7878\" (a loopback address) or remove [proxy] to keep the front door off".to_string());
            None
        }
        Some(text) => match text.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(addr) => {
                problems.push(format!(
                    "[proxy] listen = {text:?}: {} is not a loopback address. The front door takes the bot token in plain text and holds no TLS, so it listens on 127.0.0.1 or [::1] only; bot workers on other hosts use the NATS/Redis deployment of DESIGN.md §4 instead",
                    addr.ip()
                ));
                None
            }
            Err(_) => {
                problems.push(format!("[proxy] listen = {text:?} is not an address: use ip:port on loopback, e.g. \"127.0.0.1:7878\""));
                None
            }
        },
    };
    let mut duration = |key: &str, value: Option<&str>, default: Duration| match value {
        None => default,
        Some(v) => match parse_duration_fraction(v) {
            Ok(d) if d >= Duration::from_millis(100) => d,
            Ok(_) => {
                problems.push(format!(
                    "[proxy] {key} = {v:?} is too short: use at least \"100ms\""
                ));
                default
            }
            Err(e) => {
                problems.push(format!("[proxy] {key} = {v:?}: {e}"));
                default
            }
        },
    };
    let heartbeat_interval = duration(
        "heartbeat_interval",
        p.heartbeat_interval.as_deref(),
        Duration::from_millis(defaults::PROXY_HEARTBEAT_MS),
    );
    let max_queue_wait = duration(
        "max_queue_wait",
        p.max_queue_wait.as_deref(),
        Duration::from_secs(defaults::PROXY_MAX_QUEUE_WAIT_SECS),
    );
    let mut count = |key: &str, value: Option<i64>, default: u32| match value {
        None => default,
        Some(v) if (1..=1_000_000).contains(&v) => v as u32,
        Some(v) => {
            problems.push(format!(
                "[proxy] {key} = {v} is not valid: use a whole number ≥ 1 (default {default})"
            ));
            default
        }
    };
    let global_rate_limit = count(
        "global_rate_limit",
        p.global_rate_limit,
        defaults::PROXY_GLOBAL_RATE_LIMIT,
    );
    let invalid_request_limit = count(
        "invalid_request_limit",
        p.invalid_request_limit,
        defaults::PROXY_INVALID_REQUEST_LIMIT,
    );
    if problems.len() > before {
        return None;
    }
    Some(ProxyConfig {
        listen: listen?,
        heartbeat_interval,
        global_rate_limit,
        invalid_request_limit,
        max_queue_wait,
    })
}

/// Like [`parse_duration`], but also `"41.25s"` (HELLO intervals are often
/// written with a fraction).
pub fn parse_duration_fraction(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.split_once('.') {
        None => parse_duration(text),
        Some((whole, rest)) => {
            let split = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (frac, unit) = rest.split_at(split);
            let unit_ms: f64 = match unit.trim() {
                "ms" => 1.0,
                "s" => 1000.0,
                "m" | "min" => 60_000.0,
                "h" => 3_600_000.0,
                other => {
                    return Err(format!(
                        "unknown unit {other:?}: use ms, s, m or h, e.g. \"41.25s\""
                    ));
                }
            };
            let n: f64 = format!("{whole}.{frac}").parse().map_err(|_| {
                "not a duration: use a number with a unit, e.g. \"41.25s\"".to_string()
            })?;
            Ok(Duration::from_millis((n * unit_ms).round() as u64))
        }
    }
}

/// `[broker]`, with every problem added to `problems`.
fn broker_config(b: RawBroker, problems: &mut Vec<String>) -> BrokerConfig {
    let nats = b.nats.unwrap_or_default();
    if nats.is_empty() {
        problems.push(
            "[broker] nats is required when [broker] is present: the NATS server URL, e.g. \"nats://127.0.0.1:4222\" (remove [broker] to run without JetStream)".to_string(),
        );
    }
    for url in nats.split(',').filter(|u| !u.trim().is_empty()) {
        let url = url.trim();
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            problems.push(format!(
                "[broker] nats = {url:?} is not valid: use nats://host:port (or tls://host:port)"
            ));
        }
    }
    let stream = b
        .stream
        .unwrap_or_else(|| defaults::BROKER_STREAM.to_string());
    if stream.is_empty()
        || !stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        problems.push(format!(
            "[broker] stream = {stream:?} is not valid: use letters, digits, '_' or '-' (it is the JetStream stream name and the subject prefix)"
        ));
    }
    let size = |key: &str, value: Option<String>, default: &str, problems: &mut Vec<String>| {
        let text = value.unwrap_or_else(|| default.to_string());
        parse_size(&text).unwrap_or_else(|e| {
            problems.push(format!("[broker] {key} = {text:?}: {e}"));
            0
        }) as u64
    };
    let duration = |key: &str, value: Option<String>, default: &str, problems: &mut Vec<String>| {
        let text = value.unwrap_or_else(|| default.to_string());
        match parse_duration(&text) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(_) => {
                problems.push(format!(
                    "[broker] {key} = {text:?} is too short: use at least \"1s\""
                ));
                Duration::from_secs(1)
            }
            Err(e) => {
                problems.push(format!("[broker] {key} = {text:?}: {e}"));
                Duration::from_secs(1)
            }
        }
    };
    let max_bytes = size("max_bytes", b.max_bytes, "1GiB", problems);
    let max_age = duration("max_age", b.max_age, "24h", problems);
    let duplicate_window = duration("duplicate_window", b.duplicate_window, "2m", problems);
    if duplicate_window > max_age {
        problems.push(format!(
            "[broker] duplicate_window ({} s) is longer than max_age ({} s): make it shorter",
            duplicate_window.as_secs(),
            max_age.as_secs()
        ));
    }
    BrokerConfig {
        nats,
        stream,
        max_bytes,
        max_age,
        duplicate_window,
    }
}

impl TokenSource {
    /// Read the token. Errors say where it was looked for, never what it is.
    pub fn load(&self) -> Result<Token, String> {
        let token = match self {
            TokenSource::Env(name) => std::env::var(name).map_err(|_| {
                format!(
                    "[discord] token_env = {name:?}: the environment variable {name} is not set (export it, or use token_file)"
                )
            })?,
            TokenSource::File(path) => {
                let candidates = credential_paths(path);
                let mut last_err = None;
                let mut found = None;
                for candidate in &candidates {
                    match std::fs::read_to_string(candidate) {
                        Ok(text) => {
                            found = Some(text);
                            break;
                        }
                        Err(e) => last_err = Some((candidate.clone(), e)),
                    }
                }
                match found {
                    Some(text) => text,
                    None => {
                        let (where_, e) = last_err.expect("at least one candidate");
                        return Err(format!(
                            "[discord] token_file = {:?}: cannot read {}: {e} (check the path and that the service user may read it; under systemd use LoadCredential=)",
                            path.display(),
                            where_.display()
                        ));
                    }
                }
            }
        };
        let token = Token::new(token);
        if token.expose().is_empty() {
            return Err(format!("{} holds an empty token", self.describe()));
        }
        if token
            .expose()
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "{} holds a token with whitespace inside it (token {}): paste only the token",
                self.describe(),
                token.fingerprint()
            ));
        }
        Ok(token)
    }

    fn describe(&self) -> String {
        match self {
            TokenSource::Env(name) => format!("environment variable {name}"),
            TokenSource::File(path) => format!("token file {}", path.display()),
        }
    }
}

/// A relative token_file is a credential name: `$CREDENTIALS_DIRECTORY/name`
/// first (systemd `LoadCredential=`), then the path as given.
fn credential_paths(path: &Path) -> Vec<PathBuf> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut out = Vec::new();
    if path.is_relative() {
        if let Some(dir) = &credentials {
            out.push(dir.join(path));
        }
        out.push(path.to_path_buf());
    } else {
        out.push(path.to_path_buf());
        // An absolute path that is not there may still be a credential.
        if let (Some(dir), Some(name)) = (&credentials, path.file_name()) {
            out.push(dir.join(name));
        }
    }
    out
}

fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_string(),
    }
}

/// `"0..16"` → shards 0 to 15.
fn parse_range(text: &str) -> Result<ShardRange, String> {
    let bad = || {
        "use \"all\" or \"START..END\" with END excluded, e.g. \"0..16\" for shards 0–15"
            .to_string()
    };
    let (start, end) = text.split_once("..").ok_or_else(bad)?;
    let start: u32 = start.trim().parse().map_err(|_| bad())?;
    let end: u32 = end.trim().parse().map_err(|_| bad())?;
    if start >= end {
        return Err(format!(
            "the range is empty (start {start} ≥ end {end}); {}",
            bad()
        ));
    }
    Ok(ShardRange::Span(start, end))
}

/// `"30s"`, `"500ms"`, `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        "not a duration: use a number with a unit, e.g. \"30s\", \"500ms\", \"5m\"".to_string()
    })?;
    let unit_ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use ms, s, m or h, e.g. \"30s\""
            ));
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(unit_ms)))
}

/// `"256MiB"`, `"1GiB"`, `"64KiB"`, `"500MB"`, `"1000"` (bytes).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "not a size: use a number with a unit, e.g. \"256MiB\"".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use B, KiB, MiB or GiB (or KB, MB, GB), e.g. \"256MiB\""
            ));
        }
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| "too large".to_string())
}

/// Check a URL's scheme, and that a plain-text scheme (`http`, `ws`) only
/// points at a loopback address: anything leaving the machine must be TLS.
pub fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("not a URL: expected {}://host/…", schemes[0]))?;
    if !schemes.contains(&scheme) {
        return Err(format!(
            "scheme {scheme:?} is not allowed: use {}",
            schemes.join(" or ")
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host_of(authority);
    if host.is_empty() {
        return Err("the URL has no host".to_string());
    }
    if (scheme == "http" || scheme == "ws") && !is_loopback(host) {
        return Err(format!(
            "plain {scheme}:// is only allowed to loopback addresses (127.0.0.1, [::1], localhost); {host} must use {}s://",
            scheme
        ));
    }
    Ok(())
}

/// The host part of `host[:port]` (IPv6 in brackets kept without them).
pub fn host_of(authority: &str) -> &str {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

/// Is `host` a loopback name or address?
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests;
