//! The state cache across a restart. A resumed upstream session replays
//! neither READY nor GUILD_CREATE, so without this the front door would have
//! nothing to rebuild them from, and every daemon restart with `[proxy]` on
//! would cost one IDENTIFY per shard. The cache is written to
//! `[state] dir/frontdoor-cache.ndjson.zst` as the events that rebuild it
//! (each shard's READY, then one GUILD_CREATE per guild, and GUILD_DELETE for
//! guilds READY listed that have left), with each shard's session and the
//! seq of the last dispatch it holds: every few seconds while it changes, and
//! at a clean shutdown. The next start restores it for the shards whose saved
//! session it was taken from and resumes them from the older of the two seqs
//! (after a crash the snapshot may be a few seconds behind: Discord replays
//! from there, and bots get those events again, as at-least-once allows). The resume replays events after the bots' acked point; those
//! the saved cache already holds (up to its seq per shard) are not applied
//! again.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use std::sync::atomic::Ordering;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::Hub;
use crate::shard::ResumeState;

/// The file, beside `state.json`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("frontdoor-cache.ndjson.zst")
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    /// The upstream session each shard's cache was taken from.
    sessions: BTreeMap<u32, String>,
    /// The seq of the last dispatch each shard's cache holds: a resume
    /// replays from an earlier acked point, and those replays are not
    /// applied twice (a member removed twice would count down twice).
    #[serde(default)]
    seqs: BTreeMap<u32, u64>,
}

#[derive(Serialize, Deserialize)]
struct Line<'a> {
    shard: u32,
    t: &'a str,
    #[serde(borrow)]
    d: &'a RawValue,
}

#[derive(Deserialize)]
struct ReadyGuilds {
    #[serde(default)]
    guilds: Vec<Id>,
}

#[derive(Deserialize)]
struct Id {
    #[serde(deserialize_with = "snowflake")]
    id: u64,
}

fn snowflake<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S<'a> {
        N(u64),
        T(&'a str),
    }
    match S::deserialize(d)? {
        S::N(n) => Ok(n),
        S::T(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

/// A loaded snapshot: which session each shard's cache belongs to, and the
/// events that rebuild it.
pub struct Snapshot {
    /// Upstream session id per shard.
    pub sessions: BTreeMap<u32, String>,
    /// Seq of the last dispatch in each shard's cache.
    seqs: BTreeMap<u32, u64>,
    lines: Vec<String>,
}

/// Write the cache of `hub`'s shards whose sessions are `sessions` (shard →
/// upstream session id), after every shard has stopped.
pub fn save(hub: &Hub, sessions: &BTreeMap<u32, String>, file: &Path) -> std::io::Result<()> {
    let Some(front) = hub.frontdoor.get() else {
        return Ok(());
    };
    // One writer at a time (the periodic one and the one at shutdown share
    // the temporary file).
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _writing = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    // Only shards whose READY is known can be rebuilt.
    let sessions: BTreeMap<u32, String> = sessions
        .iter()
        .filter(|(shard, _)| hub.shard(**shard).is_some_and(|s| s.ready().is_some()))
        .map(|(shard, id)| (*shard, id.clone()))
        .collect();
    let tmp = file.with_extension("zst.tmp");
    let written = (|| {
        let out = std::fs::File::create(&tmp)?;
        let mut z = zstd::stream::write::Encoder::new(out, 3)?;
        let header = Header {
            version: 1,
            sessions: sessions.clone(),
            seqs: sessions
                .keys()
                .filter_map(|&shard| {
                    let stats = hub.shard(shard)?;
                    Some((shard, stats.cache_seq.load(Ordering::Relaxed)))
                })
                .collect(),
        };
        serde_json::to_writer(&mut z, &header)?;
        z.write_all(b"\n")?;
        let mut line = |shard: u32, t: &str, d: &str| -> std::io::Result<()> {
            let d = RawValue::from_string(d.to_string()).map_err(std::io::Error::other)?;
            serde_json::to_writer(&mut z, &Line { shard, t, d: &d })?;
            z.write_all(b"\n")
        };
        for &shard in sessions.keys() {
            let Some(ready) = hub.shard(shard).and_then(|s| s.ready()) else {
                continue;
            };
            let Ok(ready) = std::str::from_utf8(&ready) else {
                continue;
            };
            line(shard, "READY", ready)?;
            let now = front.cache.shard_guilds(shard);
            let present: HashSet<u64> = now.iter().map(|g| g.id).collect();
            let listed = serde_json::from_str::<ReadyGuilds>(ready)
                .map(|r| r.guilds)
                .unwrap_or_default();
            for gone in listed.iter().filter(|g| !present.contains(&g.id)) {
                line(
                    shard,
                    "GUILD_DELETE",
                    &format!("{{\"id\":\"{}\"}}", gone.id),
                )?;
            }
            for guild in now {
                match front.cache.guild_create(guild.id) {
                    Some(create) => line(shard, "GUILD_CREATE", &create)?,
                    None => line(
                        shard,
                        "GUILD_CREATE",
                        &format!("{{\"id\":\"{}\",\"unavailable\":true}}", guild.id),
                    )?,
                }
            }
        }
        let out = z.finish()?;
        out.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Read a snapshot. `Ok(None)` when there is none; an unreadable one is
/// removed.
pub fn load(file: &Path) -> Result<Option<Snapshot>, String> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    let result = read(f, file);
    if result.is_err() {
        let _ = std::fs::remove_file(file);
    }
    result
}

fn read(f: std::fs::File, file: &Path) -> Result<Option<Snapshot>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{} is unreadable ({e})", file.display());
    let reader = std::io::BufReader::new(zstd::stream::read::Decoder::new(f).map_err(|e| bad(&e))?);
    let mut lines = reader.lines();
    let header: Header = match lines.next() {
        Some(Ok(h)) => serde_json::from_str(&h).map_err(|e| bad(&e))?,
        Some(Err(e)) => return Err(bad(&e)),
        None => return Err(bad(&"empty")),
    };
    if header.version != 1 {
        return Err(bad(&format!("version {}", header.version)));
    }
    let lines = lines.collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))?;
    Ok(Some(Snapshot {
        sessions: header.sessions,
        seqs: header.seqs,
        lines,
    }))
}

impl Snapshot {
    /// The seq of the last dispatch the snapshot holds for `shard`.
    pub fn seq(&self, shard: u32) -> Option<u64> {
        self.seqs.get(&shard).copied()
    }

    /// Rebuild the cache (and each shard's READY) of the shards in `resumed`.
    pub fn restore(&self, hub: &Hub, resumed: &HashSet<u32>) -> usize {
        let Some(front) = hub.frontdoor.get() else {
            return 0;
        };
        for (shard, seq) in &self.seqs {
            if resumed.contains(shard)
                && let Some(stats) = hub.shard(*shard)
            {
                // The cache holds up to `seq`: replays at or below it are
                // not applied again, and the next save says so too.
                stats.cache_skip.store(*seq, Ordering::Relaxed);
                stats.cache_seq.store(*seq, Ordering::Relaxed);
            }
        }
        let mut applied = 0;
        for text in &self.lines {
            let Ok(line) = serde_json::from_str::<Line>(text) else {
                continue;
            };
            if !resumed.contains(&line.shard) {
                continue;
            }
            if line.t == "READY"
                && let Some(stats) = hub.shard(line.shard)
            {
                stats.set_ready(line.d.get().as_bytes());
            }
            front
                .cache
                .apply(line.shard, line.t, line.d.get().as_bytes());
            applied += 1;
        }
        applied
    }
}

/// How often, with `[proxy]` on, the cache is saved while it changes:
/// after a crash the shards resume from at most this far back.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// With `[proxy]` on, the front door's cache as last saved; without it, a
/// snapshot left by an earlier run is stale once this one has gone by, and
/// is removed.
pub async fn load_at_start(proxy: bool, file: &std::path::Path) -> Option<Snapshot> {
    let file = file.to_path_buf();
    if !proxy {
        crate::state::off_thread(crate::state::IO_TIMEOUT, move || {
            let _ = std::fs::remove_file(file);
        })
        .await;
        return None;
    }
    match crate::state::off_thread(crate::state::IO_TIMEOUT, move || load(&file)).await {
        Some(Ok(snapshot)) => snapshot,
        Some(Err(e)) => {
            tracing::warn!(event = %"state_ignored", "front door cache: {e}; shards identify to refill it");
            None
        }
        None => {
            tracing::warn!(event = %"state_ignored", "front door cache: reading it timed out; shards identify to refill it");
            None
        }
    }
}

/// The front door's cache of the sessions being saved, so the next start
/// resumes them (a resumed session replays no READY or GUILD_CREATE).
pub async fn save_at_shutdown(
    hub: &Arc<Hub>,
    sessions: &[(u32, ResumeState)],
    file: &std::path::Path,
) {
    let ids: std::collections::BTreeMap<u32, String> = sessions
        .iter()
        .map(|(shard, resume)| (*shard, resume.session_id.clone()))
        .collect();
    let (hub, path) = (hub.clone(), file.to_path_buf());
    let saved =
        crate::state::off_thread(Duration::from_secs(60), move || save(&hub, &ids, &path)).await;
    let fallback = "the next start uses the last periodic save (resuming from its seq) if it has these sessions, else identifies their shards";
    match saved {
        Some(Ok(())) => {
            tracing::info!(path = %file.display(), "front door cache saved for the next start")
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot save the front door cache: {fallback}")
        }
        None => tracing::warn!("saving the front door cache timed out: {fallback}"),
    }
}

/// With `[proxy]` on: save the front door's cache every `every` while it
/// changes (a new session, or dispatches that changed it), so a crash, not
/// only a clean stop, resumes the shards.
pub async fn save_every(
    hub: Arc<Hub>,
    file: std::path::PathBuf,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Vec::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let ids: std::collections::BTreeMap<u32, String> = hub
            .owned()
            .filter_map(|s| Some((s.shard, s.session().session_id?)))
            .collect();
        let now: Vec<(u32, String, u64)> = ids
            .iter()
            .filter_map(|(shard, id)| {
                let seq = hub.shard(*shard)?.cache_seq.load(Ordering::Relaxed);
                Some((*shard, id.clone(), seq))
            })
            .collect();
        if now == last || ids.is_empty() {
            continue;
        }
        let (writer_hub, writer_file) = (hub.clone(), file.clone());
        let saved = crate::state::off_thread(Duration::from_secs(60), move || {
            save(&writer_hub, &ids, &writer_file)
        })
        .await;
        match saved {
            Some(Ok(())) => {
                if failing {
                    tracing::info!(event = %"snapshot_saved", path = %file.display(), "front door cache saved again");
                }
                failing = false;
                last = now;
            }
            Some(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(event = %"snapshot_failed", path = %file.display(), "cannot save the front door cache ({e}); a crash now costs one IDENTIFY per shard. Fix [state] dir (permissions, free space)");
            }
            None if !failing => {
                failing = true;
                tracing::warn!(event = %"snapshot_failed", path = %file.display(), "saving the front door cache timed out; a crash now costs one IDENTIFY per shard");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::EventLog;
    use crate::hub::IdentifyBudget;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn hub() -> Hub {
        let hub = Hub::new(
            EventLog::new(1, 1 << 20),
            &[0, 1],
            2,
            vec![],
            HashMap::new(),
            IdentifyBudget::default(),
        );
        let _ = hub
            .frontdoor
            .set(Arc::new(crate::frontdoor::Shared::default()));
        hub
    }

    fn feed(hub: &Hub, shard: u32, t: &str, d: &str) {
        if t == "READY" {
            hub.shard(shard).unwrap().set_ready(d.as_bytes());
        }
        hub.frontdoor
            .get()
            .unwrap()
            .cache
            .apply(shard, t, d.as_bytes());
    }

    #[test]
    fn a_clean_restart_rebuilds_the_same_guilds() {
        let before = hub();
        feed(
            &before,
            0,
            "READY",
            r#"{"v":10,"session_id":"s0","user":{"id":"9"},"guilds":[{"id":"100","unavailable":true},{"id":"101","unavailable":true},{"id":"102","unavailable":true}]}"#,
        );
        feed(
            &before,
            0,
            "GUILD_CREATE",
            r#"{"id":"100","name":"a","member_count":2,"channels":[{"id":"5","type":0,"name":"general"}],"roles":[{"id":"100","name":"@everyone"}],"members":[{"user":{"id":"9"}}]}"#,
        );
        feed(
            &before,
            0,
            "GUILD_CREATE",
            r#"{"id":"102","name":"c","channels":[],"roles":[]}"#,
        );
        feed(&before, 0, "GUILD_DELETE", r#"{"id":"102"}"#);
        feed(
            &before,
            0,
            "CHANNEL_CREATE",
            r#"{"id":"6","guild_id":"100","type":0,"name":"news"}"#,
        );
        feed(
            &before,
            1,
            "READY",
            r#"{"v":10,"session_id":"s1","user":{"id":"9"},"guilds":[{"id":"201","unavailable":true}]}"#,
        );
        feed(
            &before,
            1,
            "GUILD_CREATE",
            r#"{"id":"201","name":"b","channels":[],"roles":[]}"#,
        );

        // The caches hold shard 0's dispatches up to seq 7, shard 1's up to 3.
        assert!(before.shard(0).unwrap().cache_takes(7));
        assert!(before.shard(1).unwrap().cache_takes(3));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = path(dir.path());
        let sessions = BTreeMap::from([(0, "s0".to_string()), (1, "s1".to_string())]);
        save(&before, &sessions, &file).expect("saved");

        let after = hub();
        let snapshot = load(&file).expect("readable").expect("present");
        assert_eq!(snapshot.sessions, sessions);
        snapshot.restore(&after, &HashSet::from([0]));
        let (b, a) = (
            &before.frontdoor.get().unwrap().cache,
            &after.frontdoor.get().unwrap().cache,
        );
        assert_eq!(
            a.shard_guilds(0),
            b.shard_guilds(0),
            "102 left, 101 still unavailable"
        );
        let json =
            |s: Option<String>| s.map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap());
        assert_eq!(json(a.guild_create(100)), json(b.guild_create(100)));
        assert!(a.shard_guilds(1).is_empty(), "shard 1 was not resumed");
        assert_eq!(
            after.shard(0).unwrap().ready(),
            before.shard(0).unwrap().ready()
        );
        // The resume replays from the bots' acked point: what the restored
        // cache holds is not applied again, what follows is.
        let stats = after.shard(0).unwrap();
        assert!(!stats.cache_takes(5) && !stats.cache_takes(7));
        assert!(stats.cache_takes(8));
        assert!(
            after.shard(1).unwrap().cache_takes(1),
            "shard 1 was not resumed: nothing skipped"
        );
    }

    #[test]
    fn a_corrupt_snapshot_is_refused_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = path(dir.path());
        std::fs::write(&file, b"not zstd").expect("write");
        assert!(load(&file).is_err());
        assert!(!file.exists());
        assert!(matches!(load(&file), Ok(None)));
    }
}
