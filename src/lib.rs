//! shardwarden: a daemon that holds a Discord bot's gateway sessions.
pub mod intents;
