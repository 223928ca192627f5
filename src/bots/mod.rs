//! The event log and the bot socket (DESIGN §3): how events reach the bot's
//! own processes and how their commands reach Discord.
//!
//! [`event_log`] numbers every dispatch with a cursor and keeps the replay
//! ring; [`consumers`] keeps each bot client's ack (the resume point after a
//! restart); [`bot_server`] serves the bot protocol ([`protocol`]) on a Unix
//! socket; [`commands`] routes a bot's gateway commands to the owning shard
//! (also for NATS requests).

pub mod bot_server;
pub mod commands;
pub mod consumers;
pub mod event_log;
pub mod protocol;
