//! The command line's definition (DESIGN.md §2), and nothing else: main.rs
//! parses it, and build.rs includes this same file to write the man pages and
//! shell completions, so they always describe the binary they ship with. It
//! may use only clap (build.rs has no other dependency) and `super::VERSION`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shardwarden",
    version = super::VERSION,
    about = "Holds a Discord bot's gateway sessions and hands events to the bot over a Unix socket",
    after_long_help = "Files: /etc/shardwarden/shardwarden.toml (configuration, every key \
        documented in it), /etc/shardwarden/discord-token (the bot token, mode 0600, handed to the \
        service by systemd's LoadCredential=), /run/shardwarden/bot.sock (the bots' socket), \
        /var/lib/shardwarden (saved sessions). Operator's guide: \
        /usr/share/doc/shardwarden/runbook.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
        #[arg(long)]
        seconds: Option<u64>,
        /// Where the demo puts its socket and state (default: a new
        /// directory of its own under $TMPDIR, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}
