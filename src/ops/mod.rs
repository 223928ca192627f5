//! Operations: what an operator touches and what keeps the daemon's promises
//! across restarts.
//!
//! [`config`] parses and validates the TOML of DESIGN §2 and [`check`] is
//! `shardwarden check-config`; [`persist`] decides what the state directory
//! holds and when it is written, [`state`] is the file itself; [`status`] is
//! `shardwarden status`; [`telemetry`] the Prometheus metrics; [`systemd`]
//! the notify protocol; [`demo`] is `shardwarden demo`; [`clock`] formats
//! wall-clock times.

pub mod check;
pub mod clock;
pub mod config;
pub mod demo;
pub mod persist;
pub mod state;
pub mod status;
pub mod systemd;
pub mod telemetry;
