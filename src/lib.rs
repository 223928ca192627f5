//! shardwarden: a daemon that holds a Discord bot's gateway sessions.
pub mod bot_server;
pub mod clock;
pub mod event_log;
pub mod hub;
pub mod protocol;
pub mod simulator;
