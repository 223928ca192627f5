//! The `shardwarden` command line (DESIGN.md §2): run, check-config, status, demo.

use std::process::ExitCode;

use clap::Parser;

use shardwarden::config::{Config, LogFormat};
use shardwarden::supervisor::{self, DaemonOptions};

mod cli;
use cli::{Cli, Command};

/// `shardwarden --version`: the crate version and the commit it was built
/// from (build.rs; "unknown" outside a git checkout, "-dirty" when src/ had
/// uncommitted changes).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SHARDWARDEN_COMMIT"),
    ")"
);

/// The WebSocket and TLS crates log frame contents at debug/trace level,
/// and an IDENTIFY frame carries the token: never let them below info.
fn quiet_dependencies(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    [
        "tungstenite=info",
        "tokio_tungstenite=info",
        "rustls=info",
        "hyper=info",
    ]
    .into_iter()
    .filter_map(|d| d.parse().ok())
    .fold(filter, |f, d| f.add_directive(d))
}

fn init_logging(format: LogFormat, level: &str) -> Box<supervisor::SetLogLevel> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};

    let from_env = std::env::var("RUST_LOG").is_ok();
    let filter = quiet_dependencies(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
    );
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Auto if journald => match tracing_journald::layer() {
            // Structured fields (SHARD=, EVENT=, CLASS=…) straight into the journal.
            Ok(layer) => registry
                .with(layer.with_syslog_identifier("shardwarden".into()))
                .init(),
            Err(_) => registry
                .with(
                    fmt::layer()
                        .with_ansi(false)
                        .without_time()
                        .with_target(false)
                        .with_writer(std::io::stderr),
                )
                .init(),
        },
        LogFormat::Auto | LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    Box::new(move |level: &str| {
        if from_env {
            return Err("RUST_LOG is set in the environment and takes precedence".to_string());
        }
        handle
            .modify(|f| *f = quiet_dependencies(EnvFilter::new(level)))
            .map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Run { config } => {
            let config_path = config;
            let config = match Config::load(&config_path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(supervisor::EXIT_CONFIG as u8);
                }
            };
            let reload_log_level = init_logging(config.health.log_format, &config.health.log_level);
            let options = DaemonOptions {
                config_path: Some(config_path),
                reload_log_level: Some(reload_log_level),
                ..DaemonOptions::default()
            };
            match runtime.block_on(supervisor::run(config, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(event = %"exit", exit_code = e.exit_code, "{e}");
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code as u8)
                }
            }
        }
        Command::CheckConfig { config } => shardwarden::check::check_config(&config),
        Command::Status { socket, json } => {
            runtime.block_on(shardwarden::status::status(&socket, json))
        }
        Command::Demo { seconds, dir } => {
            let _ = init_logging(LogFormat::Text, "info");
            match runtime.block_on(shardwarden::demo::run(seconds, dir.as_deref())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
