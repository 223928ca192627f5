//! Beyond one machine (DESIGN §4): the parts that connect a daemon to
//! others and to bot workers on other hosts, each on an existing engine:
//! [`broker`] publishes events to NATS JetStream and serves commands from
//! remote workers; [`coord`] is the Redis side (identify buckets, the shared
//! budget, shard leases, sessions) and [`ownership`] keeps this daemon's
//! shard leases and decides which shards it runs.

pub mod broker;
pub mod coord;
pub mod ownership;
