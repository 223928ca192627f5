//! shardwarden: a daemon that holds a Discord bot's gateway sessions and
//! hands every event to the bot over a local Unix socket.
//!
//! Read the modules in the order data flows:
//!
//! - **Discord facts**: [`gateway`] (opcodes, the close-code table and its
//!   classes, limits) and [`intents`] (the intent ↔ event table). Everything
//!   else asks these tables rather than repeating them.
//! - **Configuration**: [`config`] parses and validates the TOML of
//!   DESIGN.md §2; [`check`] is `shardwarden check-config`.
//! - **Shard**: [`shard`] is the actor that owns one gateway session. It uses
//!   [`compression`] (one inflate context per connection), [`envelope`]
//!   (parses `op`/`s`/`t` only; `d` stays raw bytes), [`heartbeat`] (timing and
//!   zombie detection) and [`ratelimit`] (the 120/60 s send limit).
//! - **Supervisor**: [`supervisor`] plans shards from [`rest`]
//!   (`/gateway/bot`), starts them through the [`identify_queue`] (buckets and
//!   the session-start budget), restarts crashed actors, detects incidents and
//!   persists sessions, the cursor lease, acks and identify times through
//!   [`persist`] (what and when) and [`state`] (the file).
//! - **Event log and bot server**: [`hub`] is what the parts share (shard
//!   statistics, session reports, command channels); [`event_log`] numbers
//!   every dispatch with a cursor and keeps the replay ring; [`consumers`]
//!   keeps each bot client's ack (the resume point); [`bot_server`]
//!   serves the bot protocol of DESIGN.md §3 ([`protocol`]) on a Unix socket;
//!   [`commands`] routes a bot's gateway commands to the owning shard;
//!   [`status`] is `shardwarden status`.
//! - **Beyond one machine**: [`cluster`] (DESIGN §4): the JetStream sink and
//!   the commands remote workers send over NATS; with `[cluster]`, Redis
//!   shard leases (the supervisor starts and stops shard actors as leases
//!   come and go), sessions kept for a takeover, and the identify queue's
//!   buckets and budget shared by every daemon of the bot.
//! - **Simulator**: [`simulator`] is an embedded, scriptable Discord used by
//!   [`demo`], the tests and the benchmarks. It stands apart: the daemon never
//!   depends on it.
pub mod bot_server;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod compression;
pub mod config;
pub mod consumers;
pub mod demo;
pub mod envelope;
pub mod event_log;
pub mod gateway;
pub mod heartbeat;
pub mod hub;
pub mod identify_queue;
pub mod intents;
pub mod persist;
pub mod protocol;
pub mod ratelimit;
pub mod rest;
pub mod shard;
pub mod simulator;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
