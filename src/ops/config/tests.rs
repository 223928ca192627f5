use super::*;

const GOOD: &str = r#"
[discord]
token_env = "DISCORD_TOKEN"
intents = ["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT"]
events = ["GUILD_CREATE", "MESSAGE_CREATE", "INTERACTION_CREATE"]
compression = "zstd-stream"

[shards]
total = 16
range = "0..8"
identify_reserve = 30

[bot]
socket = "/tmp/sw.sock"
socket_mode = "0600"
replay_buffer = "64MiB"

[health]
log_interval = "10s"
metrics_listen = "127.0.0.1:9464"

[state]
dir = "/tmp/sw-state"
"#;

fn problems(text: &str) -> Vec<String> {
    Config::parse(text).expect_err("should fail").problems
}

#[test]
fn parses_every_documented_key() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!(
        c.discord.token_source,
        TokenSource::Env("DISCORD_TOKEN".into())
    );
    assert_eq!(c.discord.compression, Compression::ZstdStream);
    assert_eq!(c.shards.total, ShardTotal::Fixed(16));
    assert_eq!(c.shards.range, ShardRange::Span(0, 8));
    assert_eq!(c.shards.identify_reserve, 30);
    assert_eq!(c.bot.socket_mode, 0o600);
    assert_eq!(c.bot.replay_buffer, 64 << 20);
    assert_eq!(c.health.log_interval, Duration::from_secs(10));
    assert_eq!(c.state.dir, PathBuf::from("/tmp/sw-state"));
}

#[test]
fn defaults_match_design() {
    let c = Config::parse(
        "[discord]\ntoken_env = \"T\"\nintents = [\"GUILDS\"]\nevents = [\"GUILD_CREATE\"]\n",
    )
    .expect("valid");
    assert_eq!(c.discord.api_base, "https://discord.com/api/v10");
    assert_eq!(c.discord.compression, Compression::ZlibStream);
    assert_eq!(c.shards.total, ShardTotal::Auto);
    assert_eq!(c.shards.range, ShardRange::All);
    assert_eq!(c.shards.identify_reserve, 25);
    assert_eq!(c.bot.socket, PathBuf::from("/run/shardwarden/bot.sock"));
    assert_eq!(c.bot.socket_mode, 0o660);
    assert_eq!(c.bot.replay_buffer, 256 << 20);
    assert_eq!(c.health.log_interval, Duration::from_secs(30));
    assert_eq!(c.state.dir, PathBuf::from("/var/lib/shardwarden"));
}

#[test]
fn syntax_error_has_line_and_column() {
    let p = problems("[discord]\ntoken_env = \"T\"\nintents = [\"GUILDS\"\n");
    assert!(p[0].contains("line 3"), "{p:?}");
    assert!(p[0].contains("column"), "{p:?}");
}

#[test]
fn errors_name_key_value_and_fix() {
    let text = GOOD
        .replace("\"zstd-stream\"", "\"gzip\"")
        .replace("total = 16", "total = \"many\"")
        .replace("\"0..8\"", "\"8..4\"")
        .replace("\"64MiB\"", "\"lots\"")
        .replace("\"10s\"", "\"ten\"");
    let p = problems(&text).join("\n");
    assert!(p.contains("[discord] compression = \"gzip\""), "{p}");
    assert!(p.contains("zlib-stream"), "{p}");
    assert!(p.contains("[shards] total"), "{p}");
    assert!(p.contains("[shards] range = \"8..4\""), "{p}");
    assert!(p.contains("[bot] replay_buffer = \"lots\""), "{p}");
    assert!(p.contains("[health] log_interval = \"ten\""), "{p}");
}

#[test]
fn cluster_keys_parse_with_defaults() {
    let c = Config::parse(&format!(
        "{}\n[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\n",
        GOOD
    ))
    .expect("valid");
    let cluster = c.cluster.expect("[cluster]");
    assert_eq!(cluster.lease_ttl, Duration::from_secs(30));
    assert!(!cluster.name.is_empty(), "the host name by default");
    assert_eq!(cluster.max_shards, None);
    let c = Config::parse(&format!(
        "{}\n[cluster]\nredis = \"redis://:pw@db:6379/2\"\nname = \"host-b\"\nlease_ttl = \"3s\"\nmax_shards = 40\n",
        GOOD.replace("\"0..8\"", "\"auto\"")
    ))
    .expect("valid");
    assert_eq!(c.shards.range, ShardRange::Auto);
    let cluster = c.cluster.expect("[cluster]");
    assert_eq!(
        (cluster.name.as_str(), cluster.max_shards),
        ("host-b", Some(40))
    );
    assert_eq!(cluster.lease_ttl, Duration::from_secs(3));
    assert_eq!(ShardRange::Auto.resolve(4), Ok(vec![0, 1, 2, 3]));
}

#[test]
fn cluster_errors_name_the_key_and_the_fix_and_never_the_password() {
    let p = problems(&GOOD.replace("\"0..8\"", "\"auto\"")).join("\n");
    assert!(
        p.contains("[shards] range = \"auto\" needs [cluster]"),
        "{p}"
    );
    let p = problems(&format!(
        "{GOOD}\n[cluster]\nredis = \"http://:hunter2@db\"\nname = \"two words\"\nlease_ttl = \"10ms\"\nmax_shards = 0\n"
    ))
    .join("\n");
    assert!(
        p.contains("[cluster] redis is not a valid Redis URL: use redis://"),
        "{p}"
    );
    assert!(!p.contains("hunter2"), "{p}");
    assert!(p.contains("[cluster] name = \"two words\""), "{p}");
    assert!(p.contains("[cluster] lease_ttl is too short"), "{p}");
    assert!(p.contains("[cluster] max_shards = 0"), "{p}");
    let p = problems(&format!("{GOOD}\n[cluster]\nmax_shards = 3\n")).join("\n");
    assert!(p.contains("[cluster] redis is required"), "{p}");
    assert!(
        p.contains("max_shards = 3 applies only to [shards] range = \"auto\""),
        "{p}"
    );
}

#[test]
fn unknown_key_is_named() {
    let p = problems(&GOOD.replace("identify_reserve", "identify_reserv"));
    assert!(p[0].contains("identify_reserv"), "{p:?}");
}

#[test]
fn range_must_fit_total() {
    let p = problems(&GOOD.replace("\"0..8\"", "\"8..20\""));
    assert!(p[0].contains("does not fit in total = 16"), "{p:?}");
}

#[test]
fn plain_text_only_to_loopback() {
    assert!(check_url("http://127.0.0.1:8080/api/v10", &["https", "http"]).is_ok());
    assert!(check_url("http://localhost/api", &["https", "http"]).is_ok());
    assert!(check_url("ws://[::1]:9000", &["wss", "ws"]).is_ok());
    assert!(check_url("https://discord.com/api/v10", &["https", "http"]).is_ok());
    let e = check_url("http://discord.com/api/v10", &["https", "http"]).unwrap_err();
    assert!(e.contains("https://"), "{e}");
    assert!(check_url("ws://10.0.0.1", &["wss", "ws"]).is_err());
    assert!(check_url("ftp://127.0.0.1", &["https", "http"]).is_err());
    let p = problems(&GOOD.replace(
        "token_env = \"DISCORD_TOKEN\"",
        "token_env = \"T\"\napi_base = \"http://example.com/api\"",
    ));
    assert!(p[0].contains("api_base"), "{p:?}");
}

#[test]
fn token_needs_exactly_one_source() {
    let p = problems(&GOOD.replace("token_env = \"DISCORD_TOKEN\"", ""));
    assert!(
        p[0].contains("token_env") && p[0].contains("token_file"),
        "{p:?}"
    );
    let p = problems(&GOOD.replace(
        "token_env = \"DISCORD_TOKEN\"",
        "token_env = \"A\"\ntoken_file = \"/x\"",
    ));
    assert!(p[0].contains("both"), "{p:?}");
}

#[test]
fn token_is_never_printed() {
    let token = Token::new("Bot abcdefghijklmnop.secretpart.wxyz\n");
    assert_eq!(token.expose(), "abcdefghijklmnop.secretpart.wxyz");
    assert_eq!(format!("{token:?}"), "Token(…wxyz)");
    assert_eq!(format!("{token}"), "…wxyz");
}

#[test]
fn token_file_and_credentials_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("discord-token"), "tok-1234\n").expect("write");
    let token = TokenSource::File(dir.path().join("discord-token"))
        .load()
        .expect("loads");
    assert_eq!(token.expose(), "tok-1234");
    let err = TokenSource::File(dir.path().join("missing"))
        .load()
        .unwrap_err();
    assert!(err.contains("cannot read"), "{err}");
    assert!(!err.contains("tok-1234"));
}

#[test]
fn proxy_defaults_and_loopback_only() {
    let config =
        Config::parse(&format!("{GOOD}\n[proxy]\nlisten = \"127.0.0.1:7878\"\n")).expect("valid");
    let proxy = config.proxy.expect("on");
    assert_eq!(proxy.listen.to_string(), "127.0.0.1:7878");
    assert_eq!(proxy.heartbeat_interval, Duration::from_millis(41_250));
    assert_eq!(proxy.global_rate_limit, 50);
    assert_eq!(proxy.invalid_request_limit, 9000);
    assert_eq!(proxy.max_queue_wait, Duration::from_secs(10));
    assert!(Config::parse(GOOD).expect("valid").proxy.is_none());
    let p = problems(&format!("{GOOD}\n[proxy]\nlisten = \"0.0.0.0:7878\"\n"));
    assert!(
        p[0].contains("[proxy] listen") && p[0].contains("loopback") && p[0].contains("§4"),
        "{p:?}"
    );
    let p = problems(&format!(
        "{GOOD}\n[proxy]\nlisten = \"[::1]:7878\"\nheartbeat_interval = \"soon\"\nglobal_rate_limit = 0\n"
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("heartbeat_interval") && p[1].contains("global_rate_limit"));
    let config = Config::parse(&format!(
        "{GOOD}\n[proxy]\nlisten = \"[::1]:7878\"\nheartbeat_interval = \"2.5s\"\nmax_queue_wait = \"3s\"\n"
    ))
    .expect("valid");
    let proxy = config.proxy.expect("on");
    assert_eq!(proxy.heartbeat_interval, Duration::from_millis(2500));
    assert_eq!(proxy.max_queue_wait, Duration::from_secs(3));
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("256MiB"), Ok(256 << 20));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("500MB"), Ok(500_000_000));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("12 parsecs").is_err());
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5 fortnights").is_err());
}
