//! The `shardwarden` command line (DESIGN.md §2): run, check-config, status, demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shardwarden::config::{Config, LogFormat};
use shardwarden::supervisor::{self, DaemonOptions};

#[derive(Parser)]
#[command(
    name = "shardwarden",
    version,
    about = "Holds a Discord bot's gateway sessions and hands events to the bot over a Unix socket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (systemd runs this).
    Run {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and print the resolved plan; exit 0 (valid) or 1.
    CheckConfig {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print one health table from a running daemon; non-zero exit when any shard is unhealthy.
    Status {
        /// The daemon's bot socket.
        #[arg(long, short, default_value = "/run/shardwarden/bot.sock")]
        socket: PathBuf,
        /// Print the raw health message as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon against the embedded gateway simulator with a sample bot (no token needed).
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Where the demo puts its socket and state.
        #[arg(long, default_value = "/tmp/shardwarden-demo")]
        dir: PathBuf,
    },
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // journald stamps each line itself and shows no colours.
        LogFormat::Auto if journald => builder.with_ansi(false).without_time().init(),
        LogFormat::Auto | LogFormat::Text => builder.init(),
    }
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
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(supervisor::EXIT_CONFIG as u8);
                }
            };
            init_logging(config.health.log_format, &config.health.log_level);
            match runtime.block_on(supervisor::run(config, DaemonOptions::default())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(event = "exit", exit_code = e.exit_code, "{e}");
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
            init_logging(LogFormat::Text, "info");
            match runtime.block_on(shardwarden::demo::run(seconds, &dir)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
