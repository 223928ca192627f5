//! systemd integration (`Type=notify`): READY=1 once every owned shard is
//! active (or fatal and reported), a one-line STATUS=, WATCHDOG=1 from the
//! supervisor loop itself (so a wedged daemon stops pinging and is
//! restarted), EXTEND_TIMEOUT_USEC while a large shard set is still
//! identifying, RELOADING=1 / STOPPING=1. Every call is a no-op outside
//! systemd (no `$NOTIFY_SOCKET`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::hub::{Hub, ShardState};

/// Tracks what systemd has been told.
pub struct Notifier {
    ready_sent: bool,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on.
    pub watchdog_every: Option<Duration>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// Read the watchdog settings from the environment.
    pub fn new() -> Self {
        Notifier {
            ready_sent: false,
            watchdog_every: sd_notify::watchdog_enabled().map(|d| d / 2),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "cannot notify systemd");
        }
    }

    /// Whether READY=1 has been sent.
    pub fn is_ready(&self) -> bool {
        self.ready_sent
    }

    /// Called on every shard state change and summary tick: sends READY=1
    /// the first time every shard is settled, and a fresh STATUS= line.
    pub fn update(&mut self, hub: &Hub) {
        let status = status_line(hub);
        let settled = hub
            .owned()
            .all(|s| matches!(s.state(), ShardState::Active | ShardState::Fatal));
        if settled && !self.ready_sent {
            self.ready_sent = true;
            self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        } else if !self.ready_sent {
            // Identifying many shards takes ceil(N / max_concurrency) × 5 s:
            // keep systemd's start timeout from firing meanwhile.
            self.send(&[
                NotifyState::Status(&status),
                NotifyState::ExtendTimeoutUsec(60_000_000),
            ]);
        } else {
            self.send(&[NotifyState::Status(&status)]);
        }
    }

    /// The supervisor loop is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// A SIGHUP reload starts.
    pub fn reloading(&self) {
        let now = sd_notify::NotifyState::monotonic_usec_now().ok();
        match now {
            Some(now) => self.send(&[NotifyState::Reloading, now]),
            None => self.send(&[NotifyState::Reloading]),
        }
    }

    /// The reload is done.
    pub fn reloaded(&self, hub: &Hub) {
        let status = status_line(hub);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// Shutdown starts.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: saving sessions for resume"),
        ]);
    }
}

/// `16/16 shards active, p50 latency 41 ms, 2 bots, identify budget 990/1000`.
pub fn status_line(hub: &Hub) -> String {
    let active = hub
        .owned()
        .filter(|s| s.state() == ShardState::Active)
        .count();
    let fatal = hub
        .owned()
        .filter(|s| s.state() == ShardState::Fatal)
        .count();
    let mut latencies: Vec<u64> = hub.owned().filter_map(|s| s.latency_ms()).collect();
    latencies.sort_unstable();
    let p50 = latencies
        .get(latencies.len() / 2)
        .map_or("-".to_string(), |ms| format!("{ms} ms"));
    let budget = *hub.budget.lock().unwrap_or_else(|p| p.into_inner());
    let fatal = if fatal > 0 {
        format!(", {fatal} fatal")
    } else {
        String::new()
    };
    format!(
        "{active}/{} shards active{fatal}, p50 latency {p50}, {} bots, identify budget {}/{}",
        hub.owned().count(),
        hub.bot_clients.load(Ordering::Relaxed),
        budget.remaining,
        budget.total
    )
}
