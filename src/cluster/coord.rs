//! Redis coordination between daemons (DESIGN §4): identify bucket leases,
//! the shared session-start budget, shard leases with fencing tokens, and
//! each shard's session for a takeover. Every check-and-change is one Lua
//! script, so it is atomic on the server; the client is redis-rs's
//! `ConnectionManager`, which reconnects on its own.
//!
//! Keys (prefix `shardwarden:`):
//! - `lease:{shard}` = `"{fence} {name}"`, `PX lease_ttl`: who may connect the
//!   shard. `fence:{shard}` is the counter the tokens come from (`INCR`), so a
//!   later owner always holds a larger token than any earlier one.
//! - `session:{shard}`: JSON `{session_id, resume_url, seq, owner, fence,
//!   saved_at_ms}`, written only by the lease holder (the script compares the
//!   lease value), so a stale owner can never overwrite a newer session.
//! - `identify:{bucket}` = a turn token: held from the turn until 5 s after
//!   the IDENTIFY frame (then it expires), or deleted when the connection
//!   failed before IDENTIFY.
//! - `budget`: hash `remaining`, `total`, `resets_at_ms`: the bot's daily
//!   session starts, spent by a script that never goes below the reserve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "shardwarden:";

/// Take a free shard lease with a new fencing token: `fence` or 0 when
/// someone holds it.
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], fence .. ' ' .. ARGV[1], 'PX', ARGV[2])
return fence
"#;

/// Extend a lease only if it is still exactly ours: 1, else 0.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Delete a key only if it still holds our value: 1, else 0.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Write (or, with an empty value, delete) a shard's session only while the
/// lease holds our fencing token: 1, else 0.
const SAVE_SESSION: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
return 1
"#;

/// Hold an identify bucket for a turn: 1 when taken, 0 when another turn
/// (of any daemon) holds it or its 5 s are still running.
const TAKE_TURN: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

/// The IDENTIFY went out: the bucket stays taken for the window from now,
/// and the turn's start is no longer in flight (Discord counts it now).
const TURN_SENT: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Spend one session start unless that would leave the reserve or fewer:
/// `{status, remaining, total, resets_at_ms}` with status 1 spent, 0 at the
/// reserve, -1 unknown (never seeded), -2 the window has ended (re-read
/// Discord's figures first). A spent start stays *in flight* (KEYS[2], a
/// sorted set of turn tokens by expiry) until its IDENTIFY is sent, so a
/// reconcile with Discord's figure, which does not count it yet, takes it
/// off.
const RESERVE_START: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'remaining', 'total', 'resets_at_ms')
if not r[1] or not r[2] or not r[3] then return {-1, 0, 0, 0} end
local remaining = tonumber(r[1])
local total = tonumber(r[2])
local resets = tonumber(r[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if resets <= now then return {-2, remaining, total, resets} end
if remaining <= tonumber(ARGV[1]) then return {0, remaining, total, resets} end
redis.call('HSET', KEYS[1], 'remaining', remaining - 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
return {1, remaining - 1, total, resets}
"#;

/// Give back the start of turn ARGV[1], whose IDENTIFY was never sent
/// (once; never past the total).
const GIVE_BACK: &str = r#"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return -1 end
local r = redis.call('HMGET', KEYS[1], 'remaining', 'total')
if not r[1] or not r[2] then return 0 end
local remaining = tonumber(r[1])
if remaining < tonumber(r[2]) then redis.call('HSET', KEYS[1], 'remaining', remaining + 1) end
return remaining + 1
"#;

/// Discord's figures win: set them, answering what Redis held before
/// (`{remaining, total}`, -1 when nothing). ARGV: remaining, total,
/// resets_at_ms. Starts in flight (spent, IDENTIFY not sent yet, so not in
/// Discord's count) are taken off; those whose turn expired are forgotten.
const RECONCILE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'remaining', 'total')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local remaining = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[2])
if remaining < 0 then remaining = 0 end
redis.call('HSET', KEYS[1], 'remaining', remaining, 'total', ARGV[2], 'resets_at_ms', ARGV[3])
if not r[1] then return {-1, -1} end
return {tonumber(r[1]), tonumber(r[2])}
"#;

/// A shard's session as kept in Redis for whoever owns the shard next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Discord's session id.
    pub session_id: String,
    /// READY's `resume_gateway_url`.
    pub resume_url: String,
    /// The seq a RESUME starts from.
    pub seq: u64,
    /// The daemon that wrote it.
    pub owner: String,
    /// Its fencing token when it wrote it.
    pub fence: u64,
    /// When it was written (unix ms).
    pub saved_at_ms: u64,
}

/// The outcome of spending one session start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Spent; this many are left.
    Spent {
        /// Session starts left.
        remaining: u32,
        /// Of this many.
        total: u32,
    },
    /// Not spent: at the reserve until the window resets.
    AtReserve {
        /// Session starts left.
        remaining: u32,
        /// When the window resets (unix ms).
        resets_at_ms: u64,
    },
    /// Redis holds no figures, or the window has ended: read `/gateway/bot`
    /// and [`Redis::reconcile`] first.
    NeedFigures,
}

/// The shared Redis connection and this daemon's name in it.
pub struct Redis {
    conn: ConnectionManager,
    /// This daemon's name (`[cluster] name`).
    pub name: String,
    /// Each call's longest wait: a hung Redis must not hold up lease
    /// decisions.
    call_timeout: Duration,
    scripts: Scripts,
    /// The last call reached Redis.
    up: AtomicBool,
    /// When the last call failed (unix ms; 0 = never), and why.
    last_error: std::sync::Mutex<Option<String>>,
    /// Calls that failed.
    pub errors: AtomicU64,
}

struct Scripts {
    claim: Script,
    renew: Script,
    release: Script,
    save_session: Script,
    take_turn: Script,
    turn_sent: Script,
    reserve_start: Script,
    give_back: Script,
    reconcile: Script,
}

/// `redis://user:secret@host/0` → `redis://***@host/0`: a URL fit for logs.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Redis {
    /// A client for `url`; connects lazily (a daemon starts while Redis is
    /// down: running nothing that needs it until it answers).
    pub fn new(url: &str, name: &str, call_timeout: Duration) -> Result<Arc<Redis>, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("[cluster] redis = {:?}: {e}", redacted_url(url)))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(call_timeout))
            .set_response_timeout(Some(call_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("[cluster] redis = {:?}: {e}", redacted_url(url)))?;
        Ok(Arc::new(Redis {
            conn,
            name: name.to_string(),
            call_timeout,
            scripts: Scripts {
                claim: Script::new(CLAIM),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
                save_session: Script::new(SAVE_SESSION),
                take_turn: Script::new(TAKE_TURN),
                turn_sent: Script::new(TURN_SENT),
                reserve_start: Script::new(RESERVE_START),
                give_back: Script::new(GIVE_BACK),
                reconcile: Script::new(RECONCILE),
            },
            up: AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
            errors: AtomicU64::new(0),
        }))
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why the last failed call failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut conn = self.conn.clone();
        let result = tokio::time::timeout(self.call_timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {} ms", self.call_timeout.as_millis()))
            .and_then(|r: redis::RedisResult<T>| r.map_err(|e| e.to_string()));
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(event = %"redis_connected", name = %self.name, "Redis answers");
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(event = %"redis_disconnected", error = %e, "Redis does not answer: running shards keep running while their leases last; new identifies wait");
                }
            }
        }
        result
    }

    fn lease_key(shard: u32) -> String {
        format!("{PREFIX}lease:{shard}")
    }

    /// The value a lease holds for `fence` of this daemon.
    fn lease_value(&self, fence: u64) -> String {
        format!("{fence} {}", self.name)
    }

    /// Take `shard`'s lease if free: its fencing token, or `None`.
    pub async fn claim_shard(&self, shard: u32, ttl: Duration) -> Result<Option<u64>, String> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.key(Self::lease_key(shard))
            .key(format!("{PREFIX}fence:{shard}"))
            .arg(&self.name)
            .arg(ttl.as_millis() as u64);
        let fence: u64 = self.invoke(inv).await?;
        Ok((fence > 0).then_some(fence))
    }

    /// Extend our lease on `shard`: `false` when it is no longer ours.
    pub async fn renew_shard(&self, shard: u32, fence: u64, ttl: Duration) -> Result<bool, String> {
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.key(Self::lease_key(shard))
            .arg(self.lease_value(fence))
            .arg(ttl.as_millis() as u64);
        Ok(self.invoke::<i64>(inv).await? == 1)
    }

    /// Give `shard`'s lease up (clean shutdown), if still ours.
    pub async fn release_shard(&self, shard: u32, fence: u64) -> Result<bool, String> {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(Self::lease_key(shard)).arg(self.lease_value(fence));
        Ok(self.invoke::<i64>(inv).await? == 1)
    }

    /// Who holds `shard`'s lease: `(fence, name)`.
    pub async fn lease_holder(&self, shard: u32) -> Result<Option<(u64, String)>, String> {
        let mut conn = self.conn.clone();
        let value: Option<String> = tokio::time::timeout(
            self.call_timeout,
            redis::cmd("GET")
                .arg(Self::lease_key(shard))
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(value.and_then(|v| {
            let (fence, name) = v.split_once(' ')?;
            Some((fence.parse().ok()?, name.to_string()))
        }))
    }

    /// Write `shard`'s session (or delete it: `None`) under our lease
    /// `fence`; `false` when the lease is not ours (nothing written).
    pub async fn save_session(
        &self,
        shard: u32,
        fence: u64,
        session: Option<&StoredSession>,
        keep: Duration,
    ) -> Result<bool, String> {
        let value = match session {
            Some(s) => serde_json::to_string(s).map_err(|e| e.to_string())?,
            None => String::new(),
        };
        let mut inv = self.scripts.save_session.prepare_invoke();
        inv.key(Self::lease_key(shard))
            .key(format!("{PREFIX}session:{shard}"))
            .arg(self.lease_value(fence))
            .arg(value)
            .arg(keep.as_millis().max(1) as u64);
        Ok(self.invoke::<i64>(inv).await? == 1)
    }

    /// `shard`'s session as last saved by any owner.
    pub async fn load_session(&self, shard: u32) -> Result<Option<StoredSession>, String> {
        let mut conn = self.conn.clone();
        let value: Option<String> = tokio::time::timeout(
            self.call_timeout,
            redis::cmd("GET")
                .arg(format!("{PREFIX}session:{shard}"))
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Take identify bucket `bucket` for one turn (held at most `hold` if
    /// this daemon dies before sending): `Some(token)` when taken.
    pub async fn take_turn(&self, bucket: u32, hold: Duration) -> Result<Option<String>, String> {
        let token = format!("{} {:016x}", self.name, rand::random::<u64>());
        let mut inv = self.scripts.take_turn.prepare_invoke();
        inv.key(format!("{PREFIX}identify:{bucket}"))
            .arg(&token)
            .arg(hold.as_millis() as u64);
        Ok((self.invoke::<i64>(inv).await? == 1).then_some(token))
    }

    /// The IDENTIFY of turn `token` went out: keep the bucket for `window`.
    pub async fn turn_sent(
        &self,
        bucket: u32,
        token: &str,
        window: Duration,
    ) -> Result<(), String> {
        let mut inv = self.scripts.turn_sent.prepare_invoke();
        inv.key(format!("{PREFIX}identify:{bucket}"))
            .key(format!("{PREFIX}budget:inflight"))
            .arg(token)
            .arg(window.as_millis() as u64);
        self.invoke::<i64>(inv).await.map(|_| ())
    }

    /// Turn `token` ended without an IDENTIFY: free the bucket at once.
    pub async fn turn_abandoned(&self, bucket: u32, token: &str) -> Result<(), String> {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(format!("{PREFIX}identify:{bucket}")).arg(token);
        self.invoke::<i64>(inv).await.map(|_| ())
    }

    /// Spend one session start for turn `token` (in flight for at most
    /// `hold`), never leaving fewer than `reserve`.
    pub async fn reserve_start(
        &self,
        reserve: u32,
        token: &str,
        hold: Duration,
    ) -> Result<Reserve, String> {
        let mut inv = self.scripts.reserve_start.prepare_invoke();
        inv.key(format!("{PREFIX}budget"))
            .key(format!("{PREFIX}budget:inflight"))
            .arg(reserve)
            .arg(token)
            .arg(hold.as_millis() as u64);
        let r: Vec<i64> = self.invoke(inv).await?;
        let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(match r.first().copied().unwrap_or(-1) {
            1 => Reserve::Spent {
                remaining: at(1) as u32,
                total: at(2) as u32,
            },
            0 => Reserve::AtReserve {
                remaining: at(1) as u32,
                resets_at_ms: at(3),
            },
            _ => Reserve::NeedFigures,
        })
    }

    /// The shared budget as Redis holds it: `(remaining, total,
    /// resets_at_ms)`, `None` before it was first set.
    pub async fn budget(&self) -> Result<Option<(u32, u32, u64)>, String> {
        let mut conn = self.conn.clone();
        let values: Vec<Option<u64>> = tokio::time::timeout(
            self.call_timeout,
            redis::cmd("HMGET")
                .arg(format!("{PREFIX}budget"))
                .arg("remaining")
                .arg("total")
                .arg("resets_at_ms")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(match values.as_slice() {
            [Some(r), Some(t), Some(at)] => Some((*r as u32, *t as u32, *at)),
            _ => None,
        })
    }

    /// Give back turn `token`'s start: its IDENTIFY was never sent.
    pub async fn give_back_start(&self, token: &str) -> Result<(), String> {
        let mut inv = self.scripts.give_back.prepare_invoke();
        inv.key(format!("{PREFIX}budget"))
            .key(format!("{PREFIX}budget:inflight"))
            .arg(token);
        self.invoke::<i64>(inv).await.map(|_| ())
    }

    /// Set Discord's figures (it wins); answers what Redis held before,
    /// `(remaining, total)`, if anything.
    pub async fn reconcile(
        &self,
        remaining: u32,
        total: u32,
        resets_at_ms: u64,
    ) -> Result<Option<(u32, u32)>, String> {
        let mut inv = self.scripts.reconcile.prepare_invoke();
        inv.key(format!("{PREFIX}budget"))
            .key(format!("{PREFIX}budget:inflight"))
            .arg(remaining)
            .arg(total)
            .arg(resets_at_ms);
        let r: Vec<i64> = self.invoke(inv).await?;
        Ok(match (r.first(), r.get(1)) {
            (Some(&a), Some(&b)) if a >= 0 && b >= 0 => Some((a as u32, b as u32)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The scripts against a real `redis-server` (Debian's package; the test
    //! skips with a printed reason when it is not installed, and fails under
    //! CI, where `.ci/run` installs it).
    use super::*;

    pub(crate) struct Server {
        child: std::process::Child,
        pub port: u16,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub(crate) async fn server() -> Option<Server> {
        let binary = [
            "/usr/bin/redis-server",
            "/usr/sbin/redis-server",
            "/usr/local/bin/redis-server",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file());
        let Some(binary) = binary else {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is missing under CI: .ci/run should have installed it"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut child = std::process::Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Server { child, port });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not listen on {port}");
    }

    fn client(server: &Server, name: &str) -> Arc<Redis> {
        Redis::new(
            &format!("redis://127.0.0.1:{}/0", server.port),
            name,
            Duration::from_secs(2),
        )
        .expect("client")
    }

    #[tokio::test]
    async fn shard_leases_fence_and_only_the_holder_renews_or_writes() {
        let Some(server) = server().await else { return };
        let a = client(&server, "host-a");
        let b = client(&server, "host-b");
        let ttl = Duration::from_millis(400);
        let fa = a.claim_shard(3, ttl).await.unwrap().expect("free lease");
        assert_eq!(b.claim_shard(3, ttl).await.unwrap(), None, "held by a");
        assert!(
            !b.renew_shard(3, fa, ttl).await.unwrap(),
            "b cannot renew a's lease"
        );
        assert!(a.renew_shard(3, fa, ttl).await.unwrap());
        assert_eq!(
            a.lease_holder(3).await.unwrap(),
            Some((fa, "host-a".into()))
        );
        let session = StoredSession {
            session_id: "s1".into(),
            resume_url: "ws://127.0.0.1:1/resume".into(),
            seq: 41,
            owner: "host-a".into(),
            fence: fa,
            saved_at_ms: 1,
        };
        assert!(
            a.save_session(3, fa, Some(&session), ttl * 10)
                .await
                .unwrap()
        );
        // The lease expires (a is partitioned); b takes over with a larger token.
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let fb = b.claim_shard(3, ttl).await.unwrap().expect("expired lease");
        assert!(fb > fa, "fencing tokens only grow");
        assert_eq!(b.load_session(3).await.unwrap(), Some(session.clone()));
        // The stale owner can neither renew nor overwrite the session.
        assert!(!a.renew_shard(3, fa, ttl).await.unwrap());
        let stale = StoredSession {
            seq: 7,
            ..session.clone()
        };
        assert!(!a.save_session(3, fa, Some(&stale), ttl * 10).await.unwrap());
        assert_eq!(b.load_session(3).await.unwrap(), Some(session));
        assert!(!a.release_shard(3, fa).await.unwrap());
        assert!(b.save_session(3, fb, None, ttl).await.unwrap());
        assert_eq!(b.load_session(3).await.unwrap(), None);
        assert!(b.release_shard(3, fb).await.unwrap());
        assert_eq!(a.lease_holder(3).await.unwrap(), None);
    }

    #[tokio::test]
    async fn identify_turns_are_exclusive_and_held_for_the_window_after_sending() {
        let Some(server) = server().await else { return };
        let a = client(&server, "host-a");
        let b = client(&server, "host-b");
        let hold = Duration::from_secs(30);
        let t = a.take_turn(1, hold).await.unwrap().expect("free bucket");
        assert_eq!(b.take_turn(1, hold).await.unwrap(), None);
        assert!(
            b.take_turn(0, hold).await.unwrap().is_some(),
            "other bucket"
        );
        // Abandoned: free at once.
        a.turn_abandoned(1, &t).await.unwrap();
        let t = b.take_turn(1, hold).await.unwrap().expect("freed");
        b.turn_sent(1, &t, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(
            a.take_turn(1, hold).await.unwrap(),
            None,
            "within the window"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            a.take_turn(1, hold).await.unwrap().is_some(),
            "after the window"
        );
    }

    #[tokio::test]
    async fn the_budget_is_spent_atomically_and_never_below_the_reserve() {
        let Some(server) = server().await else { return };
        let a = client(&server, "host-a");
        let hold = Duration::from_secs(30);
        assert_eq!(
            a.reserve_start(2, "t0", hold).await.unwrap(),
            Reserve::NeedFigures
        );
        let resets = crate::clock::unix_millis() + 60_000;
        assert_eq!(a.reconcile(12, 1000, resets).await.unwrap(), None);
        assert_eq!(a.budget().await.unwrap(), Some((12, 1000, resets)));
        // Many daemons at once: exactly 10 spent, none past the reserve.
        let mut tasks = Vec::new();
        for i in 0..30 {
            let c = client(&server, &format!("h{i}"));
            tasks.push(tokio::spawn(async move {
                (i, c.reserve_start(2, &format!("t{i}"), hold).await.unwrap())
            }));
        }
        let mut spent = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Reserve::Spent { remaining, .. }) => {
                    assert!(remaining >= 2);
                    spent.push(i);
                }
                (_, Reserve::AtReserve { remaining, .. }) => assert_eq!(remaining, 2),
                (_, Reserve::NeedFigures) => panic!("figures are set"),
            }
        }
        assert_eq!(spent.len(), 10);
        // Discord has not seen the 10 in-flight IDENTIFYs yet: its figure
        // (still 12) is reduced by them, so nothing is spent twice.
        assert_eq!(
            a.reconcile(12, 1000, resets).await.unwrap(),
            Some((2, 1000))
        );
        assert!(matches!(
            a.reserve_start(2, "x", hold).await.unwrap(),
            Reserve::AtReserve { remaining: 2, .. }
        ));
        // One turn gives its start back (once only); one is sent.
        let given = format!("t{}", spent[0]);
        a.give_back_start(&given).await.unwrap();
        a.give_back_start(&given).await.unwrap();
        a.turn_sent(0, &format!("t{}", spent[1]), hold)
            .await
            .unwrap();
        assert!(matches!(
            a.reserve_start(2, "y", hold).await.unwrap(),
            Reserve::Spent { remaining: 2, .. }
        ));
        // Discord counted the one sent (11 left); 9 are in flight ("y" too).
        assert_eq!(
            a.reconcile(11, 1000, resets).await.unwrap(),
            Some((2, 1000))
        );
        assert!(matches!(
            a.reserve_start(2, "z", hold).await.unwrap(),
            Reserve::AtReserve { remaining: 2, .. }
        ));
        // An ended window needs fresh figures.
        a.reconcile(500, 1000, crate::clock::unix_millis() - 1)
            .await
            .unwrap();
        assert_eq!(
            a.reserve_start(2, "w", hold).await.unwrap(),
            Reserve::NeedFigures
        );
    }

    #[tokio::test]
    async fn calls_fail_fast_when_redis_is_down() {
        let Some(server) = server().await else { return };
        let a = client(&server, "host-a");
        assert!(
            a.claim_shard(0, Duration::from_secs(1))
                .await
                .unwrap()
                .is_some()
        );
        assert!(a.is_up());
        drop(server);
        let started = std::time::Instant::now();
        assert!(a.renew_shard(0, 1, Duration::from_secs(1)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!a.is_up());
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(
            redacted_url("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(redacted_url("redis://127.0.0.1/0"), "redis://127.0.0.1/0");
    }
}
