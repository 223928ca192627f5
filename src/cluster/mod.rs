//! Beyond one machine (DESIGN §4): the parts that connect a daemon to
//! others and to bot workers on other hosts, each on an existing engine:
//! [`broker`] publishes events to NATS JetStream and serves commands from
//! remote workers.

pub mod broker;
