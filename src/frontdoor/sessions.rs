//! Drop-in client sessions: what a RESUME needs (the shard, the client's
//! intents, its position in the event log and the `s` it had reached), kept
//! after the connection ends so the client can come back.
//!
//! A session's `s` numbers are a pure function of the ring: after the
//! READY/GUILD_CREATE burst (`s` 1..=`burst`), every ring entry the session's
//! filter accepts gets the next `s`. So a RESUME from `seq` is answered by
//! counting accepted entries back from the session's position — no per-event
//! bookkeeping — and replays them with their original `s`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::event_log::Entry;
use crate::hub::EventTable;

/// How long a session without a connection stays resumable (Discord: "a
/// few minutes").
pub const SESSION_TTL: Duration = Duration::from_secs(300);

/// Nonces of op 8 requests remembered per session, for routing
/// GUILD_MEMBERS_CHUNK answers to the session that asked.
const NONCES_KEPT: usize = 64;

/// One drop-in session.
pub struct Session {
    /// The daemon-issued session id (unguessable).
    pub id: String,
    /// A label for logs and `health`: the library's `properties.browser`
    /// and the connection number.
    pub client: String,
    /// The upstream shard this session follows.
    pub shard: u32,
    /// The client's IDENTIFY intents.
    pub intents: u64,
    /// The log head when the session was identified: live events start after it.
    pub start_cursor: u64,
    /// `s` of the last event of the READY/GUILD_CREATE burst.
    pub burst: u64,
    /// Ring position read up to (accepted or not).
    pub pos: u64,
    /// Last `s` given out.
    pub s: u64,
    /// Which connection carries the session (0 = none).
    pub attached: u64,
    /// When the last connection ended.
    pub detached_at: Option<Instant>,
    /// Set when the session can no longer be resumed (client closed with
    /// 1000/1001, or it fell out of the replay ring).
    pub invalid: bool,
    /// RESUMEs that succeeded.
    pub resumes: u32,
    /// Told to the connection carrying the session when another takes it over.
    pub kick: Arc<Notify>,
    /// op 8 nonces this session sent.
    nonces: VecDeque<String>,
    /// Accepted event indices, for the event table of the given length.
    mask: (usize, u128),
}

impl Session {
    /// Remember an op 8 nonce.
    pub fn add_nonce(&mut self, nonce: String) {
        if self.nonces.len() == NONCES_KEPT {
            self.nonces.pop_front();
        }
        self.nonces.push_back(nonce);
    }

    /// Whether this session asked with `nonce`.
    pub fn asked(&self, nonce: &str) -> bool {
        self.nonces.iter().any(|n| n == nonce)
    }

    /// Whether the ring entry is one of this session's events.
    pub fn accepts(&mut self, entry: &Entry, table: &EventTable) -> bool {
        if entry.shard != self.shard {
            return false;
        }
        let names = table.all_names();
        if self.mask.0 != names.len() {
            self.mask = (names.len(), event_mask(names, self.intents));
        }
        if self.mask.1 & (1u128 << entry.event) == 0 {
            return false;
        }
        let answer_nonce = match names.get(entry.event as usize).map(String::as_str) {
            // With a nonce, the chunk belongs to whoever asked (facts §9.1),
            // and so does a RATE_LIMITED answer to that op 8 (facts §5.6).
            Some("GUILD_MEMBERS_CHUNK") => {
                super::line_parts(&entry.line).and_then(|(_, d)| chunk_nonce(d))
            }
            Some("RATE_LIMITED") => {
                super::line_parts(&entry.line).and_then(|(_, d)| rate_limited_nonce(d))
            }
            _ => None,
        };
        match answer_nonce {
            Some(nonce) => self.asked(&nonce),
            None => true,
        }
    }
}

/// The configured events (by filter bit) a client with `intents` receives:
/// those needing no intent and those one of its intents delivers. READY and
/// RESUMED from upstream never go to clients: they get their own.
fn event_mask(names: &[String], intents: u64) -> u128 {
    let mut mask = 0u128;
    for (i, name) in names.iter().enumerate().take(127) {
        if name == "READY" || name == "RESUMED" {
            continue;
        }
        let by = crate::intents::intents_for_event(name);
        if by.is_empty() || by.iter().any(|intent| intents & intent.mask() != 0) {
            mask |= 1 << i;
        }
    }
    mask
}

fn chunk_nonce(d: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Chunk {
        nonce: Option<String>,
    }
    serde_json::from_slice::<Chunk>(d).ok()?.nonce
}

fn rate_limited_nonce(d: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        nonce: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct RateLimited {
        meta: Option<Meta>,
    }
    serde_json::from_slice::<RateLimited>(d).ok()?.meta?.nonce
}

/// One row of `health`'s `dropin` array and of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct DropinHealth {
    /// Library and connection number.
    pub client: String,
    /// Upstream shard.
    pub shard: u32,
    /// `connected` or `detached` (resumable for a while).
    pub state: &'static str,
    /// Last `s` given to the client.
    pub seq: u64,
    /// RESUMEs that succeeded.
    pub resumes: u32,
}

/// Every drop-in session.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Arc<Mutex<Session>>>>,
    /// Connection numbers (also session labels).
    next_conn: AtomicU64,
}

/// Lock a session, even after a panic elsewhere (every change is a plain
/// field store).
pub fn lock(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sessions {
    /// A new connection number (from 1).
    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Create a session carried by connection `conn`.
    pub fn create(
        &self,
        conn: u64,
        client: String,
        shard: u32,
        intents: u64,
        start_cursor: u64,
        burst: u64,
    ) -> Arc<Mutex<Session>> {
        let id = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Mutex::new(Session {
            id: id.clone(),
            client,
            shard,
            intents,
            start_cursor,
            burst,
            pos: start_cursor,
            s: burst,
            attached: conn,
            detached_at: None,
            invalid: false,
            resumes: 0,
            kick: Arc::new(Notify::new()),
            nonces: VecDeque::new(),
            mask: (usize::MAX, 0),
        }));
        let mut map = self.map();
        prune(&mut map);
        map.insert(id, session.clone());
        session
    }

    /// The session with this id, if it is still held.
    pub fn get(&self, id: &str) -> Option<Arc<Mutex<Session>>> {
        let mut map = self.map();
        prune(&mut map);
        map.get(id).cloned()
    }

    /// Rows for `health` and `status`.
    pub fn health(&self) -> Vec<DropinHealth> {
        let mut map = self.map();
        prune(&mut map);
        let mut rows: Vec<DropinHealth> = map
            .values()
            .map(|s| {
                let s = lock(s);
                DropinHealth {
                    client: s.client.clone(),
                    shard: s.shard,
                    state: if s.attached != 0 {
                        "connected"
                    } else {
                        "detached"
                    },
                    seq: s.s,
                    resumes: s.resumes,
                }
            })
            .collect();
        rows.sort_by(|a, b| (a.shard, &a.client).cmp(&(b.shard, &b.client)));
        rows
    }

    /// Sessions held now (connected, detached).
    pub fn counts(&self) -> (usize, usize) {
        let rows = self.health();
        let connected = rows.iter().filter(|r| r.state == "connected").count();
        (connected, rows.len() - connected)
    }
}

/// Drop sessions that can no longer be resumed.
fn prune(map: &mut HashMap<String, Arc<Mutex<Session>>>) {
    map.retain(|_, s| {
        let s = lock(s);
        s.attached != 0 || !s.invalid && s.detached_at.is_none_or(|at| at.elapsed() < SESSION_TTL)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::EventLog;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn intents_decide_which_events_a_session_gets() {
        let table = EventTable::new(names(&[
            "READY",
            "GUILD_CREATE",
            "MESSAGE_CREATE",
            "PRESENCE_UPDATE",
            "INTERACTION_CREATE",
            "GUILD_MEMBERS_CHUNK",
            "RATE_LIMITED",
        ]));
        let guilds_and_messages = 1 | 1 << 9;
        let mask = event_mask(table.all_names(), guilds_and_messages);
        assert_eq!(
            mask, 0b1110110,
            "READY never, PRESENCE_UPDATE not without its intent"
        );
        let log = EventLog::new(1, 1 << 20);
        log.append(0, 1, 1, 5, "GUILD_MEMBERS_CHUNK", br#"{"nonce":"mine"}"#);
        log.append(0, 2, 1, 5, "GUILD_MEMBERS_CHUNK", br#"{"nonce":"theirs"}"#);
        log.append(0, 3, 1, 5, "GUILD_MEMBERS_CHUNK", br#"{"guild_id":"1"}"#);
        log.append(1, 1, 1, 2, "MESSAGE_CREATE", b"{}");
        log.append(
            0,
            4,
            1,
            6,
            "RATE_LIMITED",
            br#"{"opcode":8,"retry_after":1.5,"meta":{"guild_id":"1","nonce":"mine"}}"#,
        );
        log.append(
            0,
            5,
            1,
            6,
            "RATE_LIMITED",
            br#"{"opcode":8,"retry_after":1.5,"meta":{"guild_id":"1","nonce":"theirs"}}"#,
        );
        let sessions = Sessions::default();
        let session = sessions.create(1, "test".into(), 0, guilds_and_messages, 0, 1);
        let mut session = lock(&session);
        session.add_nonce("mine".into());
        let mut entries = Vec::new();
        log.entries_after(0, 100, &mut entries);
        let accepted: Vec<u64> = entries
            .iter()
            .filter(|e| session.accepts(e, &table))
            .map(|e| e.cursor)
            .collect();
        assert_eq!(
            accepted,
            vec![1, 3, 5],
            "own nonce and no nonce; other shard never; RATE_LIMITED by meta.nonce"
        );
    }

    #[test]
    fn detached_sessions_expire_and_invalid_ones_go_at_once() {
        let sessions = Sessions::default();
        let a = sessions.create(1, "a".into(), 0, 1, 0, 1);
        let b = sessions.create(2, "b".into(), 0, 1, 0, 1);
        let (id_a, id_b) = (lock(&a).id.clone(), lock(&b).id.clone());
        assert_ne!(id_a, id_b);
        assert_eq!(id_a.len(), 32);
        {
            let mut a = lock(&a);
            a.attached = 0;
            a.detached_at = Some(Instant::now());
        }
        {
            let mut b = lock(&b);
            b.attached = 0;
            b.invalid = true;
        }
        assert!(sessions.get(&id_a).is_some(), "detached: still resumable");
        assert!(sessions.get(&id_b).is_none(), "invalid: gone");
        lock(&a).detached_at = Some(Instant::now() - SESSION_TTL);
        assert!(sessions.get(&id_a).is_none(), "expired");
    }
}
