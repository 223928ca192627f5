//! The upstream gateway: everything that faces Discord.
//!
//! - **Discord facts**: [`gateway`] (opcodes, the close-code table and its
//!   classes, limits) and [`intents`] (the intent ↔ event table). Everything
//!   else asks these tables rather than repeating them.
//! - **Shard**: [`shard`] is the actor that owns one gateway session. It uses
//!   [`compression`] (one inflate context per connection), [`envelope`]
//!   (parses `op`/`s`/`t` only; `d` stays raw bytes), [`heartbeat`] (timing
//!   and zombie detection) and [`ratelimit`] (the 120/60 s send limit).
//! - **REST**: [`http`] is the one HTTP client to Discord's API (pooled,
//!   TLS) and the failure-class table; [`rest`] is the `/gateway/bot` call
//!   on it. The front door forwards bots' REST calls through the same client,
//!   and [`rest_limiter`] paces every call (buckets, global limit, invalid
//!   requests) when the front door is on.
//! - **Supervisor**: [`supervisor`] plans shards from [`rest`]
//!   (`/gateway/bot`), starts them through the [`identify_queue`] (buckets
//!   and the session-start budget), restarts crashed actors and wires every
//!   other part together; [`incident`] decides when gateway and REST
//!   failures together point at Discord.

pub mod compression;
pub mod envelope;
pub mod gateway;
pub mod heartbeat;
pub mod http;
pub mod identify_queue;
pub mod incident;
pub mod intents;
pub mod ratelimit;
pub mod rest;
pub mod rest_limiter;
pub mod shard;
pub mod supervisor;
