//! shardwarden: a daemon that holds a Discord bot's gateway sessions.
pub mod clock;
pub mod compression;
pub mod config;
pub mod event_log;
pub mod gateway;
pub mod hub;
pub mod intents;
pub mod rest;
pub mod simulator;
