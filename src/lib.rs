//! shardwarden: a daemon that holds a Discord bot's gateway sessions and
//! hands every event to the bot over a local Unix socket, to unmodified bot
//! libraries through a Discord-compatible front door, and to workers on
//! other hosts through NATS JetStream.
//!
//! The folders are the parts, in the order data flows:
//!
//! - [`upstream`]: Discord's side. The facts tables ([`gateway`],
//!   [`intents`]), the [`shard`] actor (one per gateway session), the
//!   [`identify_queue`] and the [`supervisor`] that plans, starts and
//!   restarts shards and wires everything together.
//! - [`hub`]: what the parts share (shard statistics, session reports,
//!   command channels, the event log).
//! - [`bots`]: the [`event_log`] (cursors and the replay ring), each bot
//!   client's acks ([`consumers`]), the Unix-socket [`bot_server`] and its
//!   [`protocol`] (DESIGN §3), and [`commands`] routing.
//! - [`frontdoor`]: unmodified bot libraries connect as if shardwarden were
//!   Discord (DESIGN §5, §6), served from the state cache and the event log.
//! - [`cluster`]: beyond one machine (DESIGN §4): the JetStream sink and
//!   commands from remote workers; with `[cluster]`, Redis shard leases (the
//!   supervisor starts and stops shard actors as leases come and go),
//!   sessions kept for a takeover, and the identify queue's buckets and
//!   budget shared by every daemon of the bot.
//! - [`ops`]: configuration, `check-config`, the state directory
//!   ([`persist`], [`state`]), `status`, metrics, systemd, the demo.
//! - [`simulator`]: an embedded, scriptable Discord used by the demo, the
//!   tests and the benchmarks. It stands apart: the daemon never depends on
//!   it.
//!
//! Each module is also reachable by its short name at the crate root (e.g.
//! `shardwarden::shard`), which is how the rest of the code refers to them.

pub mod bots;
pub mod cluster;
pub mod frontdoor;
pub mod hub;
pub mod ops;
pub mod simulator;
pub mod upstream;

pub use bots::{bot_server, commands, consumers, event_log, protocol};
pub use ops::{check, clock, config, demo, persist, state, status, systemd, telemetry};
pub use upstream::{
    compression, envelope, gateway, heartbeat, identify_queue, intents, ratelimit, rest, shard,
    supervisor,
};
