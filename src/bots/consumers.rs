//! Bot clients' acks (DESIGN §3.3): each client name's last ack, kept in the
//! state file, and the resume point they give together.
//!
//! After a restart the daemon resumes Discord sessions from the *lowest* ack
//! of the clients that ack, so a fast bot never moves the point past a slow
//! one. A client that has not been connected for `[bot] consumer_ttl` stops
//! holding the point back (and the log says so). A bot without a `client`
//! name holds the point only while it is connected: there is no name to keep
//! its ack under.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::state::ClientAck;

/// One client as the daemon tracks it.
#[derive(Debug, Clone, Copy, Default)]
struct Consumer {
    /// Last cursor acknowledged (0 = never acked).
    acked: u64,
    /// Last time the client was connected (unix ms).
    seen_ms: u64,
    /// Connections open under this name now.
    connected: u32,
    /// Kept in the state file (named clients only).
    durable: bool,
}

/// A client's ack as `health` and `status` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConsumerView {
    /// The hello `client` name (`(unnamed #N)` for a nameless connection).
    pub client: String,
    /// Connections open now.
    pub connected: u32,
    /// Last cursor acknowledged (null before the first ack).
    pub acked: Option<u64>,
    /// Cursors between the newest and its ack.
    pub lag: Option<u64>,
    /// When it was last connected (RFC 3339).
    pub seen: String,
}

/// The acks of every bot client.
pub struct Consumers {
    clients: Mutex<BTreeMap<String, Consumer>>,
    /// `[bot] consumer_ttl` in ms (changeable on SIGHUP).
    ttl_ms: AtomicU64,
    /// Bumped on every change that the state file holds.
    generation: AtomicU64,
}

impl Consumers {
    /// No clients yet; absent clients hold the point for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Consumers {
            clients: Mutex::new(BTreeMap::new()),
            ttl_ms: AtomicU64::new(ttl.as_millis() as u64),
            generation: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Consumer>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change `consumer_ttl` (SIGHUP).
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, Ordering::Relaxed);
    }

    /// Take the clients of a state file written at `saved_at_ms`.
    pub fn restore(&self, saved: &BTreeMap<String, ClientAck>, saved_at_ms: u64) {
        let mut clients = self.lock();
        for (name, ack) in saved {
            clients.insert(
                name.clone(),
                Consumer {
                    acked: ack.acked,
                    // 0: it was connected when the state was written.
                    seen_ms: if ack.seen_ms == 0 {
                        saved_at_ms
                    } else {
                        ack.seen_ms
                    },
                    connected: 0,
                    durable: true,
                },
            );
        }
    }

    /// Forget the saved clients `stale` says are stale (e.g. the JetStream
    /// sink of a `[broker]` no longer configured), each logged.
    pub fn forget_where(&self, stale: impl Fn(&str) -> bool) {
        let mut clients = self.lock();
        let gone: Vec<String> = clients.keys().filter(|name| stale(name)).cloned().collect();
        for name in gone {
            clients.remove(&name);
            tracing::info!(event = %"consumer_expired", client = %name, "client no longer configured; it no longer holds the resume point back");
        }
    }

    /// A bot connected; returns the key its acks go under.
    pub fn connect(&self, client: &str, conn: u64) -> String {
        let (key, durable) = if client.is_empty() {
            (format!("(unnamed #{conn})"), false)
        } else {
            (client.to_string(), true)
        };
        let mut clients = self.lock();
        let entry = clients.entry(key.clone()).or_default();
        entry.connected += 1;
        entry.durable = durable;
        entry.seen_ms = crate::clock::unix_millis();
        drop(clients);
        self.generation.fetch_add(1, Ordering::Relaxed);
        key
    }

    /// The bot under `key` acknowledged everything up to `cursor`.
    pub fn ack(&self, key: &str, cursor: u64) {
        let mut clients = self.lock();
        if let Some(c) = clients.get_mut(key)
            && cursor > c.acked
        {
            c.acked = cursor;
            drop(clients);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The last ack under `key` (`None` before the first).
    pub fn acked_of(&self, key: &str) -> Option<u64> {
        self.lock()
            .get(key)
            .map(|c| c.acked)
            .filter(|&acked| acked > 0)
    }

    /// A connection under `key` ended.
    pub fn disconnect(&self, key: &str) {
        let mut clients = self.lock();
        if let Some(c) = clients.get_mut(key) {
            c.connected = c.connected.saturating_sub(1);
            c.seen_ms = crate::clock::unix_millis();
            if c.connected == 0 && !c.durable {
                clients.remove(key);
            }
        }
        drop(clients);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes so far (the persister writes when this moves).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The resume point at `now_ms`: the lowest ack of the clients that ack
    /// and are connected or were within `consumer_ttl`; `None` when no
    /// client acks. Clients absent past the TTL are forgotten here, each
    /// logged once.
    pub fn resume_point(&self, now_ms: u64) -> Option<u64> {
        let ttl = self.ttl_ms.load(Ordering::Relaxed);
        let mut clients = self.lock();
        let expired: Vec<String> = clients
            .iter()
            .filter(|(_, c)| c.connected == 0 && now_ms.saturating_sub(c.seen_ms) > ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &expired {
            if let Some(c) = clients.remove(name) {
                tracing::warn!(
                    event = %"consumer_expired",
                    client = %name,
                    acked = c.acked,
                    absent_s = now_ms.saturating_sub(c.seen_ms) / 1000,
                    ttl_s = ttl / 1000,
                    "bot client has not connected for longer than [bot] consumer_ttl: its ack no longer holds the resume point back (it will miss what it has not acked if it comes back)"
                );
            }
        }
        let point = clients
            .values()
            .filter(|c| c.acked > 0)
            .map(|c| c.acked)
            .min();
        drop(clients);
        if !expired.is_empty() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        point
    }

    /// The named clients that ack, for the state file (one that never
    /// acked, such as `shardwarden status`, holds nothing back).
    pub fn durable(&self) -> BTreeMap<String, ClientAck> {
        self.lock()
            .iter()
            .filter(|(_, c)| c.durable && c.acked > 0)
            .map(|(name, c)| {
                (
                    name.clone(),
                    ClientAck {
                        acked: c.acked,
                        seen_ms: if c.connected > 0 { 0 } else { c.seen_ms },
                    },
                )
            })
            .collect()
    }

    /// Every client with its ack and lag behind `head`.
    pub fn view(&self, head: u64) -> Vec<ConsumerView> {
        let now = crate::clock::unix_millis();
        self.lock()
            .iter()
            .map(|(name, c)| ConsumerView {
                client: name.clone(),
                connected: c.connected,
                acked: (c.acked > 0).then_some(c.acked),
                lag: (c.acked > 0).then(|| head.saturating_sub(c.acked)),
                seen: crate::clock::rfc3339_millis(if c.connected > 0 { now } else { c.seen_ms }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_acking_client_sets_the_point() {
        let c = Consumers::new(Duration::from_secs(60));
        let fast = c.connect("fast", 1);
        let slow = c.connect("slow", 2);
        let _quiet = c.connect("never-acks", 3);
        assert_eq!(c.resume_point(crate::clock::unix_millis()), None);
        c.ack(&fast, 500);
        c.ack(&slow, 200);
        c.ack(&slow, 150); // acks only move forward
        assert_eq!(c.resume_point(crate::clock::unix_millis()), Some(200));
        // Gone but within the TTL: still holds the point.
        c.disconnect(&slow);
        assert_eq!(c.resume_point(crate::clock::unix_millis()), Some(200));
        let later = crate::clock::unix_millis() + 61_000;
        assert_eq!(c.resume_point(later), Some(500), "expired past the TTL");
        assert!(!c.durable().contains_key("slow"));
    }

    #[test]
    fn unnamed_clients_hold_the_point_only_while_connected() {
        let c = Consumers::new(Duration::from_secs(60));
        let key = c.connect("", 7);
        c.ack(&key, 40);
        assert_eq!(c.resume_point(crate::clock::unix_millis()), Some(40));
        assert!(c.durable().is_empty(), "nothing to keep it under");
        c.disconnect(&key);
        assert_eq!(c.resume_point(crate::clock::unix_millis()), None);
    }

    #[test]
    fn restored_clients_hold_the_point_after_a_restart() {
        let c = Consumers::new(Duration::from_secs(60));
        let now = crate::clock::unix_millis();
        c.restore(
            &BTreeMap::from([
                (
                    "slow".to_string(),
                    ClientAck {
                        acked: 90,
                        seen_ms: now - 1000,
                    },
                ),
                (
                    "was-connected".to_string(),
                    ClientAck {
                        acked: 95,
                        seen_ms: 0,
                    },
                ),
            ]),
            now - 500,
        );
        assert_eq!(c.resume_point(now), Some(90));
        assert_eq!(c.resume_point(now + 58_900), Some(90));
        assert_eq!(c.resume_point(now + 59_200), Some(95), "slow expired");
        assert_eq!(
            c.resume_point(now + 59_600),
            None,
            "absent since the state was written"
        );
        c.restore(
            &BTreeMap::from([(
                "was-connected".to_string(),
                ClientAck {
                    acked: 95,
                    seen_ms: 0,
                },
            )]),
            now,
        );
        let view = c.view(100);
        assert_eq!((view[0].acked, view[0].lag), (Some(95), Some(5)));
        assert!(c.durable().contains_key("was-connected"));
    }
}
