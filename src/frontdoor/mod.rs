//! The front door: the Discord-compatible HTTP + WebSocket listener that
//! unmodified bot libraries (discord.py, discord.js, twilight, serenity …)
//! connect to as if it were Discord (DESIGN.md §5, §6).
//!
//! - [`cache`] follows every guild of every shard from the raw dispatch
//!   stream and rebuilds the GUILD_CREATE a client gets after IDENTIFY.

pub mod cache;
