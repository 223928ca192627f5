//! shardwarden: a daemon that holds a Discord bot's gateway sessions.
pub mod clock;
pub mod compression;
pub mod config;
pub mod envelope;
pub mod event_log;
pub mod gateway;
pub mod heartbeat;
pub mod hub;
pub mod identify_queue;
pub mod intents;
pub mod ratelimit;
pub mod shard;
pub mod simulator;
