//! The front door: the Discord-compatible HTTP + WebSocket listener that
//! unmodified bot libraries (discord.py, discord.js, twilight, serenity …)
//! connect to as if it were Discord (DESIGN.md §5, §6).
//!
//! - [`cache`] follows every guild of every shard from the raw dispatch
//!   stream and rebuilds the GUILD_CREATE a client gets after IDENTIFY.
//! - [`server`]: one loopback listener (hyper) for HTTP and WebSocket
//!   upgrades; `/gateway` and `/gateway/bot` answered locally, every other
//!   `/api/…` request streamed to `[discord] api_base`.
//! - [`gateway`]: the gateway protocol from the server's side, one task per
//!   client connection: HELLO, heartbeats, IDENTIFY → READY built from the
//!   shard's real READY plus one GUILD_CREATE per guild from the cache,
//!   then the shard's events read from the event log like a socket bot
//!   reads them (a slow client never slows a shard).
//! - [`sessions`]: what a RESUME needs, kept after a connection ends.
//! - [`compress`]: zlib-stream, zstd-stream and per-message zlib, server side.
//! - [`snapshot`]: the cache across a clean restart, so resuming costs no
//!   IDENTIFY with the front door on.

pub mod cache;
pub mod compress;
pub mod gateway;
pub mod server;
pub mod sessions;
pub mod snapshot;

pub use cache::{CacheStats, GuildStub, StateCache};
pub use server::FrontDoor;
pub use sessions::{DropinHealth, Sessions};

/// What the front door shares with the rest of the daemon through the hub.
#[derive(Default)]
pub struct Shared {
    /// Guild state of every owned shard, fed by the shards.
    pub cache: StateCache,
    /// Drop-in client sessions.
    pub sessions: Sessions,
}

/// `t` and `d` of an event-log line
/// (`{"op":"dispatch","cursor":C,"shard":S,"seq":Q,"t":"T","d":D}\n`),
/// found without parsing `d`: `t` is a configured (quote-free) name, so the
/// first `","d":` after `"t":"` ends it.
pub fn line_parts(line: &[u8]) -> Option<(&[u8], &[u8])> {
    const T: &[u8] = b",\"t\":\"";
    const D: &[u8] = b"\",\"d\":";
    let head = &line[..line.len().min(128)];
    let t_start = find(head, T)? + T.len();
    let t_len = find(&line[t_start..], D)?;
    let d_start = t_start + t_len + D.len();
    let end = line.len().checked_sub(2)?; // `}\n`
    (d_start <= end).then(|| (&line[t_start..t_start + t_len], &line[d_start..end]))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::EventLog;

    #[test]
    fn line_parts_finds_t_and_raw_d() {
        let log = EventLog::new(7, 1 << 20);
        let d = br#"{"content":"\",\"d\":","id":"1"}"#;
        log.append(3, 42, 1, 0, "MESSAGE_CREATE", d);
        let mut out = Vec::new();
        log.entries_after(0, 10, &mut out);
        let (t, got) = line_parts(&out[0].line).expect("parts");
        assert_eq!(t, b"MESSAGE_CREATE");
        assert_eq!(got, d);
        assert_eq!(line_parts(b"{}\n"), None);
    }
}
