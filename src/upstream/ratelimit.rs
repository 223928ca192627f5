//! The per-connection gateway send limit (facts §5.1: 120 commands per 60 s),
//! with head-room kept for the daemon's own heartbeats, IDENTIFY and RESUME.

use std::collections::VecDeque;

use tokio::time::{Duration, Instant};

use crate::gateway::{SEND_LIMIT, SEND_WINDOW};

/// Sends kept free for heartbeats, IDENTIFY/RESUME and server-requested
/// heartbeats within one window (a 41 s interval needs ~2 per minute).
pub const RESERVED_FOR_DAEMON: u32 = 10;

/// Sliding-window counter of frames sent on one connection.
#[derive(Debug)]
pub struct SendLimiter {
    sent: VecDeque<Instant>,
    limit: u32,
    window: Duration,
}

impl Default for SendLimiter {
    fn default() -> Self {
        SendLimiter::new(SEND_LIMIT, SEND_WINDOW)
    }
}

impl SendLimiter {
    /// A limiter of `limit` sends per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        SendLimiter {
            sent: VecDeque::new(),
            limit,
            window,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&first) = self.sent.front() {
            if now.duration_since(first) >= self.window {
                self.sent.pop_front();
            } else {
                break;
            }
        }
    }

    /// Record a daemon frame (heartbeat, identify, resume): always sent.
    pub fn record(&mut self, now: Instant) {
        self.expire(now);
        self.sent.push_back(now);
    }

    /// When a bot command may go: `None` = now (and it is recorded), else
    /// the instant a slot frees up.
    pub fn try_acquire_for_bot(&mut self, now: Instant) -> Option<Instant> {
        self.expire(now);
        let bot_limit = self.limit.saturating_sub(RESERVED_FOR_DAEMON) as usize;
        if self.sent.len() < bot_limit {
            self.sent.push_back(now);
            return None;
        }
        // The slot frees when enough old sends expire to get below the limit.
        let index = self.sent.len() - bot_limit;
        Some(self.sent[index] + self.window)
    }

    /// Sends counted in the current window.
    pub fn in_window(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.sent.len()
    }

    /// A new connection starts with a fresh budget.
    pub fn reset(&mut self) {
        self.sent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bot_commands_leave_room_for_heartbeats() {
        let mut limiter = SendLimiter::default();
        let start = Instant::now();
        for _ in 0..(SEND_LIMIT - RESERVED_FOR_DAEMON) {
            assert_eq!(limiter.try_acquire_for_bot(Instant::now()), None);
        }
        let next = limiter
            .try_acquire_for_bot(Instant::now())
            .expect("bot budget used up");
        assert_eq!(next, start + SEND_WINDOW);
        // The daemon's own frames still fit under Discord's limit.
        for _ in 0..RESERVED_FOR_DAEMON {
            limiter.record(Instant::now());
        }
        assert_eq!(limiter.in_window(Instant::now()), SEND_LIMIT as usize);
        tokio::time::advance(SEND_WINDOW).await;
        assert_eq!(limiter.try_acquire_for_bot(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let mut limiter = SendLimiter::new(12, Duration::from_secs(60));
        for _ in 0..2 {
            assert!(limiter.try_acquire_for_bot(Instant::now()).is_none());
            tokio::time::advance(Duration::from_secs(30)).await;
        }
        // Two sent at t=0 and t=30; t=60 now: the first expired.
        assert_eq!(limiter.in_window(Instant::now()), 1);
        limiter.reset();
        assert_eq!(limiter.in_window(Instant::now()), 0);
    }
}
