//! Prometheus metrics (`[health] metrics_listen`). Shards keep plain atomic
//! counters on their hot path; a once-a-second exporter copies them into the
//! `metrics` registry, so values are current even when a shard is silent and
//! the hot path never touches a label map.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::watch;

use crate::hub::{Hub, ShardState, ShardStats};

/// Start the Prometheus listener on `addr` (GET /metrics).
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("shardwarden_heartbeat_latency_seconds".to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e} (check [health] metrics_listen)"))
}

/// Count one connection loss by class (`resumable`, `reidentify`, `fatal`,
/// `transport`).
pub fn count_reconnect(class: &str) {
    counter!("shardwarden_reconnects_total", "class" => class.to_string()).increment(1);
}

/// Handles of one shard's series, created once.
struct ShardSeries {
    stats: Arc<ShardStats>,
    state: Gauge,
    active: Gauge,
    latency_ms: Gauge,
    seq: Gauge,
    identifies: Counter,
    resumes: Counter,
    zombies: Counter,
    heartbeat_misses: Counter,
    bytes: Counter,
    unsubscribed: Counter,
    events: Vec<Counter>,
}

impl ShardSeries {
    fn new(stats: Arc<ShardStats>, event_names: &[String]) -> Self {
        let shard = stats.shard.to_string();
        ShardSeries {
            state: gauge!("shardwarden_shard_state", "shard" => shard.clone()),
            active: gauge!("shardwarden_shard_active", "shard" => shard.clone()),
            latency_ms: gauge!("shardwarden_shard_latency_ms", "shard" => shard.clone()),
            seq: gauge!("shardwarden_shard_seq", "shard" => shard.clone()),
            identifies: counter!("shardwarden_identifies_total", "shard" => shard.clone()),
            resumes: counter!("shardwarden_resumes_total", "shard" => shard.clone()),
            zombies: counter!("shardwarden_zombies_total", "shard" => shard.clone()),
            heartbeat_misses: counter!("shardwarden_heartbeat_misses_total", "shard" => shard.clone()),
            bytes: counter!("shardwarden_bytes_total", "shard" => shard.clone()),
            unsubscribed: counter!("shardwarden_unsubscribed_events_total", "shard" => shard.clone()),
            events: event_names
                .iter()
                .map(|t| counter!("shardwarden_events_total", "shard" => shard.clone(), "type" => t.clone()))
                .collect(),
            stats,
        }
    }

    fn update(&self) {
        let s = &self.stats;
        let state = s.state();
        self.state.set(state as u8 as f64);
        self.active.set(if state == ShardState::Active {
            1.0
        } else {
            0.0
        });
        self.latency_ms
            .set(s.latency_ms().map_or(f64::NAN, |ms| ms as f64));
        self.seq.set(s.seq.load(Ordering::Relaxed) as f64);
        self.identifies
            .absolute(u64::from(s.identifies.load(Ordering::Relaxed)));
        self.resumes
            .absolute(u64::from(s.resumes.load(Ordering::Relaxed)));
        self.zombies
            .absolute(u64::from(s.zombies.load(Ordering::Relaxed)));
        self.heartbeat_misses
            .absolute(u64::from(s.heartbeat_misses.load(Ordering::Relaxed)));
        self.bytes.absolute(s.bytes.load(Ordering::Relaxed));
        self.unsubscribed
            .absolute(s.unsubscribed.load(Ordering::Relaxed));
        for (i, count) in s.events_by_type() {
            if let Some(counter) = self.events.get(i) {
                counter.absolute(count);
            }
        }
    }
}

/// Copy the hub's state into the metrics registry every `every` until
/// shutdown.
pub async fn export_loop(hub: Arc<Hub>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let series: Vec<ShardSeries> = hub
        .shards
        .iter()
        .map(|s| ShardSeries::new(s.clone(), hub.events().all_names()))
        .collect();
    let budget_remaining = gauge!("shardwarden_identify_budget_remaining");
    let budget_total = gauge!("shardwarden_identify_budget_total");
    let bots = gauge!("shardwarden_bot_clients");
    let ring_bytes = gauge!("shardwarden_replay_ring_bytes");
    let ring_events = gauge!("shardwarden_replay_ring_events");
    let evicted = counter!("shardwarden_replay_evicted_total");
    let head = gauge!("shardwarden_event_log_head");
    let gaps = counter!("shardwarden_bot_gaps_total");
    let missed = counter!("shardwarden_bot_missed_events_total");
    let shards_active = gauge!("shardwarden_shards_active");
    let shards_owned = gauge!("shardwarden_shards_owned");
    let unforwarded = counter!("shardwarden_unforwarded_events_total");
    let redis_up = gauge!("shardwarden_redis_up");
    let lease_renewals = counter!("shardwarden_lease_renewals_total");
    let lease_claims = counter!("shardwarden_lease_claims_total");
    let takeovers = counter!("shardwarden_lease_takeovers_total");
    let leases_lost = counter!("shardwarden_leases_lost_total");
    let incident = gauge!("shardwarden_discord_incident");
    let incidents = counter!("shardwarden_discord_incidents_total");
    let dropin_connected = gauge!("shardwarden_dropin_sessions", "state" => "connected");
    let dropin_detached = gauge!("shardwarden_dropin_sessions", "state" => "detached");
    let cache_guilds = gauge!("shardwarden_cache_guilds");
    let cache_bytes = gauge!("shardwarden_cache_bytes");
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        for s in &series {
            s.update();
        }
        let budget = *hub.budget.lock().unwrap_or_else(|p| p.into_inner());
        budget_remaining.set(f64::from(budget.remaining));
        budget_total.set(f64::from(budget.total));
        bots.set(f64::from(hub.bot_clients.load(Ordering::Relaxed)));
        let (bytes, events, evicted_n) = hub.log.usage();
        ring_bytes.set(bytes as f64);
        ring_events.set(events as f64);
        evicted.absolute(evicted_n);
        head.set(hub.log.head() as f64);
        gaps.absolute(hub.gaps.load(Ordering::Relaxed));
        missed.absolute(hub.missed.load(Ordering::Relaxed));
        shards_active.set(
            hub.owned()
                .filter(|s| s.state() == ShardState::Active)
                .count() as f64,
        );
        shards_owned.set(hub.owned().count() as f64);
        unforwarded.absolute(hub.unforwarded.load(Ordering::Relaxed));
        for client in hub.consumers.view(hub.log.head()) {
            if let Some(lag) = client.lag {
                gauge!("shardwarden_client_ack_lag", "client" => client.client).set(lag as f64);
            }
        }
        if hub.cluster.enabled.load(Ordering::Relaxed) {
            let c = &hub.cluster;
            redis_up.set(if c.redis_up.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            });
            lease_renewals.absolute(c.renewals.load(Ordering::Relaxed));
            lease_claims.absolute(c.claims.load(Ordering::Relaxed));
            takeovers.absolute(c.takeovers.load(Ordering::Relaxed));
            leases_lost.absolute(c.lost.load(Ordering::Relaxed));
        }
        incident.set(if hub.incident().is_some() { 1.0 } else { 0.0 });
        incidents.absolute(hub.incidents.load(Ordering::Relaxed));
        if let Some(front) = hub.frontdoor.get() {
            let (connected, detached) = front.sessions.counts();
            dropin_connected.set(connected as f64);
            dropin_detached.set(detached as f64);
            let cache = front.cache.stats();
            cache_guilds.set(cache.guilds as f64);
            cache_bytes.set(cache.bytes as f64);
        }
    }
}
