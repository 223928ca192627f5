//! Heartbeat timing and zombie detection for one connection (facts §4.2):
//! first beat at `interval × jitter`, then every `interval`; a beat that is
//! due while the previous one is still unacknowledged means the connection
//! is a zombie.

use tokio::time::{Duration, Instant};

/// What to do when the heartbeat timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Send a heartbeat now.
    Send,
    /// The last heartbeat was never acknowledged: drop the connection and resume.
    Zombie,
}

/// Heartbeat state of one connection; a new connection gets a new one.
#[derive(Debug)]
pub struct Heartbeat {
    /// HELLO's `heartbeat_interval`.
    interval: Duration,
    /// When the next regular beat is due.
    next_due: Instant,
    /// A regular beat was sent and no ACK has arrived since.
    awaiting_ack: bool,
    /// When the last regular beat was sent (for latency).
    sent_at: Option<Instant>,
}

impl Heartbeat {
    /// Start after HELLO: the first beat is due at `interval × jitter`, with
    /// `jitter` in [0, 1).
    pub fn start(interval: Duration, jitter: f64, now: Instant) -> Self {
        Heartbeat {
            interval,
            next_due: now + interval.mul_f64(jitter.clamp(0.0, 1.0)),
            awaiting_ack: false,
            sent_at: None,
        }
    }

    /// The heartbeat interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// When the timer should next fire.
    pub fn next_due(&self) -> Instant {
        self.next_due
    }

    /// The timer fired at `now`.
    pub fn due(&mut self, now: Instant) -> Beat {
        if self.awaiting_ack {
            return Beat::Zombie;
        }
        self.awaiting_ack = true;
        self.sent_at = Some(now);
        // Schedule from the due time, not from now, so beats do not drift.
        self.next_due += self.interval;
        if self.next_due <= now {
            self.next_due = now + self.interval;
        }
        Beat::Send
    }

    /// An op 11 arrived: returns the round trip of the last regular beat.
    pub fn on_ack(&mut self, now: Instant) -> Option<Duration> {
        self.awaiting_ack = false;
        self.sent_at.take().map(|sent| now.duration_since(sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn first_beat_is_jittered_then_every_interval() {
        let interval = Duration::from_millis(41_250);
        let start = Instant::now();
        let mut hb = Heartbeat::start(interval, 0.25, start);
        assert_eq!(hb.next_due(), start + Duration::from_micros(10_312_500));
        tokio::time::sleep_until(hb.next_due()).await;
        assert_eq!(hb.due(Instant::now()), Beat::Send);
        assert_eq!(
            hb.next_due(),
            start + Duration::from_micros(10_312_500) + interval
        );
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(hb.on_ack(Instant::now()), Some(Duration::from_millis(40)));
        tokio::time::sleep_until(hb.next_due()).await;
        assert_eq!(hb.due(Instant::now()), Beat::Send);
    }

    #[tokio::test(start_paused = true)]
    async fn missing_ack_is_a_zombie() {
        let interval = Duration::from_secs(10);
        let mut hb = Heartbeat::start(interval, 0.0, Instant::now());
        assert_eq!(hb.due(Instant::now()), Beat::Send);
        tokio::time::sleep_until(hb.next_due()).await;
        assert_eq!(hb.due(Instant::now()), Beat::Zombie);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_clamped_to_the_interval() {
        let interval = Duration::from_secs(10);
        let now = Instant::now();
        assert_eq!(
            Heartbeat::start(interval, 7.0, now).next_due(),
            now + interval
        );
        assert_eq!(Heartbeat::start(interval, -1.0, now).next_due(), now);
    }

    #[tokio::test(start_paused = true)]
    async fn late_timer_does_not_burst() {
        let interval = Duration::from_secs(10);
        let mut hb = Heartbeat::start(interval, 0.0, Instant::now());
        tokio::time::advance(Duration::from_secs(35)).await;
        assert_eq!(hb.due(Instant::now()), Beat::Send);
        assert_eq!(hb.next_due(), Instant::now() + interval);
    }
}
