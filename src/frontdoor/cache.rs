//! PLACEHOLDER until branch `cache` is merged (its `cache.rs` replaces this
//! file whole): the smallest state cache with the agreed API, so the front
//! door compiles and its end-to-end tests run. It keeps each guild's last
//! GUILD_CREATE verbatim and follows READY, GUILD_CREATE and GUILD_DELETE
//! only; channel, role, member and other updates are not applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use serde::Deserialize;

/// A guild as READY lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuildStub {
    /// Guild id.
    pub id: u64,
    /// Not (yet) available: no GUILD_CREATE held.
    pub unavailable: bool,
}

/// Cache size, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheStats {
    /// Guilds held.
    pub guilds: usize,
    /// Bytes of raw JSON held.
    pub bytes: usize,
}

#[derive(Default)]
struct Shard {
    /// Guild id → last GUILD_CREATE `d` (None: unavailable).
    guilds: BTreeMap<u64, Option<String>>,
}

/// The state cache (placeholder).
#[derive(Default)]
pub struct StateCache {
    shards: RwLock<HashMap<u32, Shard>>,
}

#[derive(Deserialize)]
struct Ready {
    #[serde(default)]
    guilds: Vec<Stub>,
}

#[derive(Deserialize)]
struct Stub {
    id: String,
    #[serde(default)]
    unavailable: Option<bool>,
}

impl StateCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `t` changes cached state.
    pub fn tracks(t: &str) -> bool {
        matches!(t, "READY" | "GUILD_CREATE" | "GUILD_DELETE")
    }

    /// Apply one dispatch of `shard`.
    pub fn apply(&self, shard: u32, t: &str, d: &[u8]) {
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        let entry = shards.entry(shard).or_default();
        match t {
            "READY" => {
                if let Ok(ready) = serde_json::from_slice::<Ready>(d) {
                    entry.guilds = ready
                        .guilds
                        .iter()
                        .filter_map(|g| g.id.parse().ok())
                        .map(|id| (id, None))
                        .collect();
                }
            }
            "GUILD_CREATE" => {
                if let Ok(stub) = serde_json::from_slice::<Stub>(d)
                    && let Ok(id) = stub.id.parse()
                {
                    let text = String::from_utf8_lossy(d).into_owned();
                    entry.guilds.insert(id, Some(text));
                }
            }
            "GUILD_DELETE" => {
                if let Ok(stub) = serde_json::from_slice::<Stub>(d)
                    && let Ok(id) = stub.id.parse::<u64>()
                {
                    if stub.unavailable == Some(true) {
                        entry.guilds.insert(id, None);
                    } else {
                        entry.guilds.remove(&id);
                    }
                }
            }
            _ => {}
        }
    }

    /// The guilds of `shard`, as READY would list them.
    pub fn shard_guilds(&self, shard: u32) -> Vec<GuildStub> {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        shards.get(&shard).map_or_else(Vec::new, |s| {
            s.guilds
                .iter()
                .map(|(&id, g)| GuildStub {
                    id,
                    unavailable: g.is_none(),
                })
                .collect()
        })
    }

    /// The guild's GUILD_CREATE `d` as Discord would send it now.
    pub fn guild_create(&self, guild_id: u64) -> Option<String> {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        shards
            .values()
            .find_map(|s| s.guilds.get(&guild_id).cloned().flatten())
    }

    /// Size of the cache.
    pub fn stats(&self) -> CacheStats {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        let mut stats = CacheStats::default();
        for s in shards.values() {
            for g in s.guilds.values() {
                stats.guilds += 1;
                stats.bytes += g.as_ref().map_or(0, String::len);
            }
        }
        stats
    }
}
