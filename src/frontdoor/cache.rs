//! The state cache: follows every guild of every shard from the raw dispatch
//! stream, so the front door can give a client that IDENTIFYs the READY
//! guild list and one GUILD_CREATE per guild without asking Discord
//! (DESIGN.md §5).
//!
//! Each entity is kept as the JSON text Discord sent, keyed by id; only ids,
//! and the top-level fields of partial updates, are ever parsed. A rebuilt
//! GUILD_CREATE is the guild's own fields as last seen, its `member_count`,
//! `unavailable: false` and its lists, written out without re-encoding any
//! entity. Events that change no state (MESSAGE_CREATE, TYPING_START …) never
//! get here: the hot path asks [`StateCache::tracks`] first.
//!
//! What each event changes (twilight-cache-inmemory's `src/event/*.rs` was the
//! checklist):
//!
//! | Event | Change |
//! |---|---|
//! | READY | the shard's guild set becomes READY's `guilds`, all unavailable stubs; guilds it no longer lists are dropped |
//! | GUILD_CREATE | the whole guild replaced (or an unavailable stub when `unavailable: true`) |
//! | GUILD_UPDATE | the guild's own fields overwritten; lists, `member_count`, `joined_at`, `large` kept |
//! | GUILD_DELETE | `unavailable: true`: unavailable stub (data dropped); otherwise the guild removed |
//! | CHANNEL_CREATE/UPDATE/DELETE | channel upserted / removed (with its threads) |
//! | CHANNEL_PINS_UPDATE | the channel's `last_pin_timestamp` |
//! | THREAD_CREATE/UPDATE/DELETE | thread upserted / removed; archived threads removed (GUILD_CREATE holds active threads only) |
//! | THREAD_LIST_SYNC | threads of the synced parents (or of the guild) replaced; the bot's thread members attached |
//! | THREAD_MEMBER_UPDATE | the thread's `member` (the bot's thread member) |
//! | THREAD_MEMBERS_UPDATE | the thread's `member_count`, and `member` when the bot was added or removed |
//! | GUILD_ROLE_CREATE/UPDATE/DELETE | role upserted / removed, and removed from members' `roles` |
//! | GUILD_EMOJIS_UPDATE, GUILD_STICKERS_UPDATE | list replaced |
//! | GUILD_MEMBER_ADD/REMOVE | member upserted / removed (with its presence); `member_count` up / down |
//! | GUILD_MEMBER_UPDATE | sent fields merged into a cached member (`user` merged field by field) |
//! | GUILD_MEMBERS_CHUNK | members (and presences) upserted |
//! | PRESENCE_UPDATE | sent fields merged into the presence; `offline` removes it; user fields also merged into the member's `user` |
//! | VOICE_STATE_UPDATE | voice state upserted, removed when `channel_id` is null; its `member` upserted |
//! | STAGE_INSTANCE_*, GUILD_SCHEDULED_EVENT_CREATE/UPDATE/DELETE | upserted / removed |
//! | GUILD_SCHEDULED_EVENT_USER_ADD/REMOVE | the event's `user_count`, when it has one |
//! | GUILD_SOUNDBOARD_SOUND_CREATE/UPDATE/DELETE, GUILD_SOUNDBOARD_SOUNDS_UPDATE | sounds upserted / removed |
//! | SOUNDBOARD_SOUNDS (answer to op 31) | the guild's sound list replaced |
//!
//! Entities are stored in GUILD_CREATE's shape: the `guild_id` that events
//! carry is dropped from channels, members, presences and voice states (and
//! `member` from voice states, `newly_created` from threads), as Discord
//! leaves them out of GUILD_CREATE.
//!
//! Left out on purpose: `last_message_id` of channels and threads (it moves
//! with MESSAGE_CREATE, which must stay off this path), and USER_UPDATE (the
//! bot's own user inside its member objects).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Every dispatch that changes cached state. Everything else is ignored.
pub const TRACKED: &[&str] = &[
    "READY",
    "GUILD_CREATE",
    "GUILD_UPDATE",
    "GUILD_DELETE",
    "CHANNEL_CREATE",
    "CHANNEL_UPDATE",
    "CHANNEL_DELETE",
    "CHANNEL_PINS_UPDATE",
    "THREAD_CREATE",
    "THREAD_UPDATE",
    "THREAD_DELETE",
    "THREAD_LIST_SYNC",
    "THREAD_MEMBER_UPDATE",
    "THREAD_MEMBERS_UPDATE",
    "GUILD_ROLE_CREATE",
    "GUILD_ROLE_UPDATE",
    "GUILD_ROLE_DELETE",
    "GUILD_EMOJIS_UPDATE",
    "GUILD_STICKERS_UPDATE",
    "GUILD_MEMBER_ADD",
    "GUILD_MEMBER_UPDATE",
    "GUILD_MEMBER_REMOVE",
    "GUILD_MEMBERS_CHUNK",
    "PRESENCE_UPDATE",
    "VOICE_STATE_UPDATE",
    "STAGE_INSTANCE_CREATE",
    "STAGE_INSTANCE_UPDATE",
    "STAGE_INSTANCE_DELETE",
    "GUILD_SCHEDULED_EVENT_CREATE",
    "GUILD_SCHEDULED_EVENT_UPDATE",
    "GUILD_SCHEDULED_EVENT_DELETE",
    "GUILD_SCHEDULED_EVENT_USER_ADD",
    "GUILD_SCHEDULED_EVENT_USER_REMOVE",
    "GUILD_SOUNDBOARD_SOUND_CREATE",
    "GUILD_SOUNDBOARD_SOUND_UPDATE",
    "GUILD_SOUNDBOARD_SOUND_DELETE",
    "GUILD_SOUNDBOARD_SOUNDS_UPDATE",
    "SOUNDBOARD_SOUNDS",
];

/// Number of independently locked parts of the guild index.
const STRIPES: usize = 64;

/// Bytes of bookkeeping per cached entity beyond its JSON text (key, boxed
/// text pointer, map node share, allocator rounding); for [`CacheStats`].
const ENTRY_OVERHEAD: usize = 56;

/// A guild as READY lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuildStub {
    /// Guild id.
    pub id: u64,
    /// No guild data held (after READY, during an outage): the client will
    /// get the guild's GUILD_CREATE live, when Discord sends it.
    pub unavailable: bool,
}

/// What the cache holds, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Available guilds (their data is held).
    pub guilds: usize,
    /// Guilds known only as unavailable stubs.
    pub unavailable_guilds: usize,
    /// Members over all guilds.
    pub members: usize,
    /// Presences over all guilds.
    pub presences: usize,
    /// Entities of every kind over all guilds (members and presences included).
    pub entities: usize,
    /// Approximate heap bytes held: JSON text plus per-entity bookkeeping.
    pub bytes: usize,
}

/// Guild state of every shard, rebuilt into READY's guild list and
/// GUILD_CREATE. Shared by every shard task and front-door session: each
/// guild has its own lock, and the guild index is split into stripes, so
/// shards never wait on each other for different guilds.
pub struct StateCache {
    /// Guild index, split by a hash of the guild id.
    stripes: Box<[RwLock<HashMap<u64, Slot>>]>,
    /// The bot's user id from READY (0 until then); THREAD_MEMBERS_UPDATE
    /// names it when the bot itself joins or leaves a thread.
    current_user: AtomicU64,
}

/// One guild in the index.
struct Slot {
    /// Shard that delivers the guild's events.
    shard: u32,
    /// The guild's state; `None` while it is unavailable.
    guild: Option<Arc<Mutex<Guild>>>,
}

impl Default for StateCache {
    fn default() -> Self {
        Self::new()
    }
}

impl StateCache {
    /// An empty cache.
    pub fn new() -> Self {
        StateCache {
            stripes: (0..STRIPES).map(|_| RwLock::default()).collect(),
            current_user: AtomicU64::new(0),
        }
    }

    /// Whether dispatch `t` can change cached state. The hot path asks this
    /// before [`apply`](Self::apply), so other events cost one lookup.
    pub fn tracks(t: &str) -> bool {
        // The busiest dispatches (MESSAGE_*, INTERACTION_CREATE) are ruled
        // out by their first byte, before any string comparison.
        matches!(
            t.as_bytes().first(),
            Some(b'C' | b'G' | b'P' | b'R' | b'S' | b'T' | b'V')
        ) && TRACKED.contains(&t)
    }

    /// Follow one dispatch `t` with raw data `d`, as received on `shard`.
    /// Malformed data is ignored with a debug log; events the cache does not
    /// track, and events for guilds it does not hold, change nothing.
    pub fn apply(&self, shard: u32, t: &str, d: &[u8]) {
        let result = std::str::from_utf8(d)
            .map_err(de::Error::custom)
            .and_then(|d| self.try_apply(shard, t, d));
        if let Err(error) = result {
            tracing::debug!(shard, event = t, %error, "state cache ignored a malformed dispatch");
        }
    }

    /// Every guild of `shard` now, by id, for READY's `guilds`.
    pub fn shard_guilds(&self, shard: u32) -> Vec<GuildStub> {
        let mut guilds = Vec::new();
        for stripe in self.stripes.iter() {
            let stripe = read(stripe);
            guilds.extend(stripe.iter().filter(|(_, slot)| slot.shard == shard).map(
                |(&id, slot)| GuildStub {
                    id,
                    unavailable: slot.guild.is_none(),
                },
            ));
        }
        guilds.sort_unstable_by_key(|guild| guild.id);
        guilds
    }

    /// The GUILD_CREATE `d` (a JSON object) Discord would send for the
    /// guild's current state; `None` if the guild is unknown or unavailable.
    pub fn guild_create(&self, guild_id: u64) -> Option<String> {
        let guild = self.guild(guild_id)?;
        let guild = lock(&guild);
        Some(guild.rebuild())
    }

    /// Counts and approximate bytes held.
    pub fn stats(&self) -> CacheStats {
        let mut stats = CacheStats::default();
        for stripe in self.stripes.iter() {
            let stripe = read(stripe);
            stats.bytes += stripe.capacity() * (8 + std::mem::size_of::<Slot>() + 1);
            for slot in stripe.values() {
                let Some(guild) = &slot.guild else {
                    stats.unavailable_guilds += 1;
                    continue;
                };
                let guild = lock(guild);
                stats.guilds += 1;
                stats.members += guild.list(List::Members).len();
                stats.presences += guild.list(List::Presences).len();
                stats.bytes += std::mem::size_of::<Guild>() + guild.fields.len();
                for entries in &guild.lists {
                    stats.entities += entries.len();
                    stats.bytes += entries
                        .values()
                        .map(|json| json.len() + ENTRY_OVERHEAD)
                        .sum::<usize>();
                }
            }
        }
        stats
    }

    fn try_apply(&self, shard: u32, t: &str, d: &str) -> Result<(), serde_json::Error> {
        match t {
            "READY" => self.ready(shard, d),
            "GUILD_CREATE" => self.guild_create_event(shard, d),
            "GUILD_UPDATE" => self.guild_update(d),
            "GUILD_DELETE" => self.guild_delete(shard, d),
            "CHANNEL_CREATE" | "CHANNEL_UPDATE" => self.channel_upsert(d),
            "CHANNEL_DELETE" => self.channel_delete(d),
            "CHANNEL_PINS_UPDATE" => self.channel_pins_update(d),
            "THREAD_CREATE" | "THREAD_UPDATE" => self.thread_upsert(d),
            "THREAD_DELETE" => self.entity_delete(d, List::Threads, "id"),
            "THREAD_LIST_SYNC" => self.thread_list_sync(d),
            "THREAD_MEMBER_UPDATE" => self.thread_member_update(d),
            "THREAD_MEMBERS_UPDATE" => self.thread_members_update(d),
            "GUILD_ROLE_CREATE" | "GUILD_ROLE_UPDATE" => self.role_upsert(d),
            "GUILD_ROLE_DELETE" => self.role_delete(d),
            "GUILD_EMOJIS_UPDATE" => self.list_replace(d, List::Emojis, "emojis"),
            "GUILD_STICKERS_UPDATE" => self.list_replace(d, List::Stickers, "stickers"),
            "GUILD_MEMBER_ADD" => self.member_add(d),
            "GUILD_MEMBER_UPDATE" => self.member_update(d),
            "GUILD_MEMBER_REMOVE" => self.member_remove(d),
            "GUILD_MEMBERS_CHUNK" => self.members_chunk(d),
            "PRESENCE_UPDATE" => self.presence_update(d),
            "VOICE_STATE_UPDATE" => self.voice_state_update(d),
            "STAGE_INSTANCE_CREATE" | "STAGE_INSTANCE_UPDATE" => {
                self.entity_upsert(d, List::StageInstances)
            }
            "STAGE_INSTANCE_DELETE" => self.entity_delete(d, List::StageInstances, "id"),
            "GUILD_SCHEDULED_EVENT_CREATE" | "GUILD_SCHEDULED_EVENT_UPDATE" => {
                self.entity_upsert(d, List::ScheduledEvents)
            }
            "GUILD_SCHEDULED_EVENT_DELETE" => self.entity_delete(d, List::ScheduledEvents, "id"),
            "GUILD_SCHEDULED_EVENT_USER_ADD" => self.scheduled_event_users(d, 1),
            "GUILD_SCHEDULED_EVENT_USER_REMOVE" => self.scheduled_event_users(d, -1),
            "GUILD_SOUNDBOARD_SOUND_CREATE" | "GUILD_SOUNDBOARD_SOUND_UPDATE" => {
                self.entity_upsert(d, List::SoundboardSounds)
            }
            "GUILD_SOUNDBOARD_SOUND_DELETE" => {
                self.entity_delete(d, List::SoundboardSounds, "sound_id")
            }
            "GUILD_SOUNDBOARD_SOUNDS_UPDATE" => self.sounds_update(d),
            "SOUNDBOARD_SOUNDS" => {
                self.list_replace(d, List::SoundboardSounds, "soundboard_sounds")
            }
            _ => Ok(()),
        }
    }

    // ----- the guild index -----

    fn stripe(&self, guild_id: u64) -> &RwLock<HashMap<u64, Slot>> {
        // Fibonacci hashing: snowflakes' low bits are mostly zero.
        let index = (guild_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize;
        &self.stripes[index % STRIPES]
    }

    /// The guild's state, if it is held and available.
    fn guild(&self, guild_id: u64) -> Option<Arc<Mutex<Guild>>> {
        read(self.stripe(guild_id))
            .get(&guild_id)
            .and_then(|slot| slot.guild.clone())
    }

    /// Run `f` on the guild's state; nothing happens for a guild not held.
    fn with_guild<R>(&self, guild_id: u64, f: impl FnOnce(&mut Guild) -> R) -> Option<R> {
        let guild = self.guild(guild_id)?;
        let mut guild = lock(&guild);
        Some(f(&mut guild))
    }

    // ----- READY and the guild itself -----

    fn ready(&self, shard: u32, d: &str) -> Result<(), serde_json::Error> {
        #[derive(Deserialize)]
        struct Ready {
            #[serde(default)]
            user: Option<ById>,
            guilds: Vec<ById>,
        }
        let ready: Ready = serde_json::from_str(d)?;
        if let Some(user) = ready.user {
            self.current_user.store(user.id.0, Ordering::Relaxed);
        }
        let listed: HashSet<u64> = ready.guilds.iter().map(|guild| guild.id.0).collect();
        // A new session starts every guild over as unavailable: its
        // GUILD_CREATE follows, and whatever was held may be stale.
        for stripe in self.stripes.iter() {
            write(stripe).retain(|id, slot| slot.shard != shard || listed.contains(id));
        }
        for id in listed {
            write(self.stripe(id)).insert(id, Slot { shard, guild: None });
        }
        Ok(())
    }

    fn guild_create_event(&self, shard: u32, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let id = object.id("id")?;
        let guild = if object.flag("unavailable")? {
            None
        } else {
            Some(Arc::new(Mutex::new(Guild::from_create(&object)?)))
        };
        write(self.stripe(id)).insert(id, Slot { shard, guild });
        Ok(())
    }

    fn guild_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let id = object.id("id")?;
        self.with_guild(id, |guild| -> Result<(), serde_json::Error> {
            guild.fields = merge(&guild.fields, &object, &Guild::NOT_OWN_FIELDS, &[])?;
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn guild_delete(&self, shard: u32, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let id = object.id("id")?;
        let mut stripe = write(self.stripe(id));
        if object.flag("unavailable")? {
            // An outage: the guild stays the shard's, without data.
            let shard = stripe.get(&id).map_or(shard, |slot| slot.shard);
            stripe.insert(id, Slot { shard, guild: None });
        } else {
            stripe.remove(&id);
        }
        Ok(())
    }

    // ----- channels and threads -----

    fn channel_upsert(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        // DM channels have no guild: nothing to follow.
        let Some(guild_id) = object.optional_id("guild_id")? else {
            return Ok(());
        };
        let id = object.id("id")?;
        let json = object.without(&["guild_id"]);
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::Channels).insert(id, json);
        });
        Ok(())
    }

    fn channel_delete(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let Some(guild_id) = object.optional_id("guild_id")? else {
            return Ok(());
        };
        let id = object.id("id")?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::Channels).remove(&id);
            // Threads go with their parent.
            guild
                .list_mut(List::Threads)
                .retain(|_, thread| parent_of(thread) != Some(id));
        });
        Ok(())
    }

    fn channel_pins_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let Some(guild_id) = object.optional_id("guild_id")? else {
            return Ok(());
        };
        let channel_id = object.id("channel_id")?;
        let timestamp = object.get("last_pin_timestamp").unwrap_or("null");
        let change = RawObject::single("last_pin_timestamp", timestamp);
        self.with_guild(guild_id, |guild| {
            for list in [List::Channels, List::Threads] {
                if let Some(stored) = guild.list_mut(list).get_mut(&channel_id) {
                    *stored = merge(stored, &change, &[], &[])?;
                }
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn thread_upsert(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let id = object.id("id")?;
        let archived = is_archived(&object)?;
        let json = object.without(&["newly_created"]);
        self.with_guild(guild_id, |guild| {
            let threads = guild.list_mut(List::Threads);
            if archived {
                threads.remove(&id);
                return Ok(());
            }
            // THREAD_UPDATE does not repeat the bot's thread member.
            let member = match threads.get(&id) {
                Some(old) if object.get("member").is_none() => {
                    RawObject::parse(old)?.get("member").map(str::to_owned)
                }
                _ => None,
            };
            let json = match member {
                Some(member) => merge(&json, &RawObject::single("member", &member), &[], &[])?,
                None => json,
            };
            threads.insert(id, json);
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn thread_list_sync(&self, d: &str) -> Result<(), serde_json::Error> {
        #[derive(Deserialize)]
        struct ThreadListSync<'a> {
            guild_id: Snowflake,
            #[serde(default)]
            channel_ids: Option<Vec<Snowflake>>,
            #[serde(borrow)]
            threads: Vec<&'a RawValue>,
            #[serde(default, borrow)]
            members: Vec<&'a RawValue>,
        }
        let sync: ThreadListSync = serde_json::from_str(d)?;
        let mut threads = Vec::with_capacity(sync.threads.len());
        for thread in &sync.threads {
            let object = RawObject::parse(thread.get())?;
            if !is_archived(&object)? {
                threads.push((object.id("id")?, object.without(&["newly_created"])));
            }
        }
        let mut members = Vec::with_capacity(sync.members.len());
        for member in &sync.members {
            let object = RawObject::parse(member.get())?;
            members.push((object.id("id")?, object.without(&["guild_id"])));
        }
        self.with_guild(sync.guild_id.0, |guild| {
            let cached = guild.list_mut(List::Threads);
            match &sync.channel_ids {
                Some(parents) => {
                    let parents: HashSet<u64> = parents.iter().map(|id| id.0).collect();
                    cached.retain(|_, thread| {
                        parent_of(thread).is_none_or(|p| !parents.contains(&p))
                    });
                }
                None => cached.clear(),
            }
            cached.extend(threads);
            for (thread_id, member) in members {
                if let Some(thread) = cached.get_mut(&thread_id) {
                    *thread = merge(thread, &RawObject::single("member", &member), &[], &[])?;
                }
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn thread_member_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let thread_id = object.id("id")?;
        let member = object.without(&["guild_id"]);
        self.with_guild(guild_id, |guild| {
            if let Some(thread) = guild.list_mut(List::Threads).get_mut(&thread_id) {
                *thread = merge(thread, &RawObject::single("member", &member), &[], &[])?;
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn thread_members_update(&self, d: &str) -> Result<(), serde_json::Error> {
        #[derive(Deserialize)]
        struct ThreadMembersUpdate<'a> {
            id: Snowflake,
            guild_id: Snowflake,
            #[serde(borrow)]
            member_count: &'a RawValue,
            #[serde(default, borrow)]
            added_members: Vec<&'a RawValue>,
            #[serde(default)]
            removed_member_ids: Vec<Snowflake>,
        }
        let update: ThreadMembersUpdate = serde_json::from_str(d)?;
        let me = self.current_user.load(Ordering::Relaxed);
        let mut own_member = None;
        for added in &update.added_members {
            let object = RawObject::parse(added.get())?;
            if me != 0 && object.id("user_id")? == me {
                // The thread's `member` is a plain thread member.
                own_member = Some(object.without(&["member", "presence", "guild_id"]));
            }
        }
        let removed = me != 0 && update.removed_member_ids.iter().any(|id| id.0 == me);
        let mut change = RawObject::single("member_count", update.member_count.get());
        if let Some(member) = &own_member {
            change.set(Cow::Borrowed("member"), Cow::Borrowed(&**member));
        }
        self.with_guild(update.guild_id.0, |guild| {
            if let Some(thread) = guild.list_mut(List::Threads).get_mut(&update.id.0) {
                let mut merged = merge(thread, &change, &[], &[])?;
                if removed {
                    merged = RawObject::parse(&merged)?.without(&["member"]);
                }
                *thread = merged;
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    // ----- roles, emojis, stickers, sounds -----

    fn role_upsert(&self, d: &str) -> Result<(), serde_json::Error> {
        #[derive(Deserialize)]
        struct RoleEvent<'a> {
            guild_id: Snowflake,
            #[serde(borrow)]
            role: &'a RawValue,
        }
        let event: RoleEvent = serde_json::from_str(d)?;
        let role = event.role.get();
        let id = entry_id(Key::Id, role)?;
        self.with_guild(event.guild_id.0, |guild| {
            guild.list_mut(List::Roles).insert(id, role.into());
        });
        Ok(())
    }

    fn role_delete(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let role_id = object.id("role_id")?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::Roles).remove(&role_id);
            // Members lose the role with it. Only members whose text names
            // the id are parsed.
            let needle = format!("\"{role_id}\"");
            for member in guild.list_mut(List::Members).values_mut() {
                if member.contains(&needle) {
                    match without_role(member, role_id) {
                        Ok(kept) => *member = kept,
                        Err(error) => {
                            tracing::debug!(%error, "state cache kept a member whose roles it cannot read");
                        }
                    }
                }
            }
        });
        Ok(())
    }

    fn list_replace(&self, d: &str, list: List, field: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let entries = parse_list(list, object.get(field).unwrap_or("[]"))?;
        self.with_guild(guild_id, |guild| {
            *guild.list_mut(list) = entries;
        });
        Ok(())
    }

    fn sounds_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let sounds = parse_list(
            List::SoundboardSounds,
            object.get("soundboard_sounds").unwrap_or("[]"),
        )?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::SoundboardSounds).extend(sounds);
        });
        Ok(())
    }

    // ----- members, presences, voice states -----

    fn member_add(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let json = object.without(&["guild_id"]);
        let user_id = entry_id(Key::UserObject, &json)?;
        self.with_guild(guild_id, |guild| {
            // Discord may send GUILD_MEMBER_ADD for a member it already has.
            let joined = guild
                .list_mut(List::Members)
                .insert(user_id, json)
                .is_none();
            if joined && let Some(count) = &mut guild.member_count {
                *count += 1;
            }
        });
        Ok(())
    }

    fn member_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let user_id = object.user_id()?;
        self.with_guild(guild_id, |guild| {
            // A member not held stays unknown: the update lacks fields a
            // member needs (`deaf`, `mute`), and libraries require them.
            if let Some(member) = guild.list_mut(List::Members).get_mut(&user_id) {
                *member = merge(member, &object, &["guild_id"], &["user"])?;
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn member_remove(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let user_id = object.user_id()?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::Members).remove(&user_id);
            guild.list_mut(List::Presences).remove(&user_id);
            // Counted even when the member was not held (large guilds).
            if let Some(count) = &mut guild.member_count {
                *count = count.saturating_sub(1);
            }
        });
        Ok(())
    }

    fn members_chunk(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let members = parse_list(List::Members, object.get("members").unwrap_or("[]"))?;
        let presences = match object.get("presences") {
            Some(presences) => serde_json::from_str::<Vec<&RawValue>>(presences)?,
            None => Vec::new(),
        };
        // Everything is checked before anything changes.
        let presences = presences
            .iter()
            .map(|presence| {
                entry_id(Key::UserObject, presence.get())?;
                RawObject::parse(presence.get())
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(List::Members).extend(members);
            for presence in &presences {
                guild.apply_presence(presence)?;
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    fn presence_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        self.with_guild(guild_id, |guild| guild.apply_presence(&object))
            .unwrap_or(Ok(()))
    }

    fn voice_state_update(&self, d: &str) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        // Voice states outside guilds (DM calls) are not followed.
        let Some(guild_id) = object.optional_id("guild_id")? else {
            return Ok(());
        };
        let user_id = object.id("user_id")?;
        let member = match object.get("member") {
            Some(member) if member != "null" => {
                Some((entry_id(Key::UserObject, member)?, Box::<str>::from(member)))
            }
            _ => None,
        };
        let left = object
            .get("channel_id")
            .is_none_or(|channel| channel == "null");
        let json = object.without(&["guild_id", "member"]);
        self.with_guild(guild_id, |guild| {
            if let Some((member_id, member)) = member {
                guild.list_mut(List::Members).insert(member_id, member);
            }
            let voice_states = guild.list_mut(List::VoiceStates);
            if left {
                voice_states.remove(&user_id);
            } else {
                voice_states.insert(user_id, json);
            }
        });
        Ok(())
    }

    // ----- stage instances, scheduled events, sounds: plain keyed entities -----

    fn entity_upsert(&self, d: &str, list: List) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let id = entry_id(list.key(), d)?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(list).insert(id, d.into());
        });
        Ok(())
    }

    fn entity_delete(
        &self,
        d: &str,
        list: List,
        id_field: &'static str,
    ) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let id = object.id(id_field)?;
        self.with_guild(guild_id, |guild| {
            guild.list_mut(list).remove(&id);
        });
        Ok(())
    }

    fn scheduled_event_users(&self, d: &str, change: i64) -> Result<(), serde_json::Error> {
        let object = RawObject::parse(d)?;
        let guild_id = object.id("guild_id")?;
        let event_id = object.id("guild_scheduled_event_id")?;
        self.with_guild(guild_id, |guild| {
            let Some(event) = guild.list_mut(List::ScheduledEvents).get_mut(&event_id) else {
                return Ok(());
            };
            // `user_count` is only there when Discord sent it; never invent it.
            let Some(count) = RawObject::parse(event)?
                .get("user_count")
                .map(str::to_owned)
            else {
                return Ok(());
            };
            let Ok(count) = count.parse::<i64>() else {
                return Ok(());
            };
            let count = (count + change).max(0).to_string();
            *event = merge(event, &RawObject::single("user_count", &count), &[], &[])?;
            Ok(())
        })
        .unwrap_or(Ok(()))
    }
}

/// The lists of a GUILD_CREATE, each kept as entities keyed by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    Channels,
    Threads,
    Roles,
    Emojis,
    Stickers,
    Members,
    VoiceStates,
    Presences,
    StageInstances,
    ScheduledEvents,
    SoundboardSounds,
}

impl List {
    /// Every list, in the order a rebuilt GUILD_CREATE writes them.
    const ALL: [List; 11] = [
        List::Roles,
        List::Emojis,
        List::Stickers,
        List::Channels,
        List::Threads,
        List::Members,
        List::Presences,
        List::VoiceStates,
        List::StageInstances,
        List::ScheduledEvents,
        List::SoundboardSounds,
    ];

    /// The list's field in GUILD_CREATE.
    fn field(self) -> &'static str {
        match self {
            List::Channels => "channels",
            List::Threads => "threads",
            List::Roles => "roles",
            List::Emojis => "emojis",
            List::Stickers => "stickers",
            List::Members => "members",
            List::VoiceStates => "voice_states",
            List::Presences => "presences",
            List::StageInstances => "stage_instances",
            List::ScheduledEvents => "guild_scheduled_events",
            List::SoundboardSounds => "soundboard_sounds",
        }
    }

    /// How the list's entries are keyed.
    fn key(self) -> Key {
        match self {
            List::Members | List::Presences => Key::UserObject,
            List::VoiceStates => Key::UserId,
            List::SoundboardSounds => Key::SoundId,
            _ => Key::Id,
        }
    }

    fn from_field(field: &str) -> Option<List> {
        List::ALL.into_iter().find(|list| list.field() == field)
    }
}

/// Where an entity's id is.
#[derive(Debug, Clone, Copy)]
enum Key {
    /// `id`.
    Id,
    /// `user.id` (members, presences).
    UserObject,
    /// `user_id` (voice states).
    UserId,
    /// `sound_id` (soundboard sounds).
    SoundId,
}

/// The id of one entity, read from its JSON text.
fn entry_id(key: Key, json: &str) -> Result<u64, serde_json::Error> {
    #[derive(Deserialize)]
    struct ByUser {
        user: ById,
    }
    #[derive(Deserialize)]
    struct ByUserId {
        user_id: Snowflake,
    }
    #[derive(Deserialize)]
    struct BySoundId {
        sound_id: Snowflake,
    }
    Ok(match key {
        Key::Id => serde_json::from_str::<ById>(json)?.id.0,
        Key::UserObject => serde_json::from_str::<ByUser>(json)?.user.id.0,
        Key::UserId => serde_json::from_str::<ByUserId>(json)?.user_id.0,
        Key::SoundId => serde_json::from_str::<BySoundId>(json)?.sound_id.0,
    })
}

/// A JSON array of entities, keyed. An entry without its id is skipped (and
/// logged): one odd entity should not cost the rest of the guild.
fn parse_list(list: List, array: &str) -> Result<BTreeMap<u64, Json>, serde_json::Error> {
    let entries: Vec<&RawValue> = serde_json::from_str(array)?;
    let mut keyed = BTreeMap::new();
    for entry in entries {
        match entry_id(list.key(), entry.get()) {
            Ok(id) => {
                keyed.insert(id, entry.get().into());
            }
            Err(error) => {
                tracing::debug!(list = list.field(), %error, "state cache skipped an entity without its id");
            }
        }
    }
    Ok(keyed)
}

/// JSON text of one entity, as Discord sent it or as merged here.
type Json = Box<str>;

/// One available guild.
struct Guild {
    /// The guild object's own fields as a JSON object: everything but the
    /// lists, `member_count` and `unavailable`.
    fields: Json,
    /// Members in the guild, as GUILD_CREATE said and adds/removes moved it.
    member_count: Option<u64>,
    /// Entities of each [`List`], by id, indexed by `List as usize`.
    lists: [BTreeMap<u64, Json>; 11],
}

impl Guild {
    /// GUILD_UPDATE fields that are not the guild's own: the lists have their
    /// own events, and GUILD_CREATE's extras are not in a guild object.
    const NOT_OWN_FIELDS: [&'static str; 14] = [
        "channels",
        "threads",
        "roles",
        "emojis",
        "stickers",
        "members",
        "voice_states",
        "presences",
        "stage_instances",
        "guild_scheduled_events",
        "soundboard_sounds",
        "member_count",
        "unavailable",
        "guild_id",
    ];

    fn from_create(object: &RawObject<'_>) -> Result<Guild, serde_json::Error> {
        let mut guild = Guild {
            fields: "{}".into(),
            member_count: None,
            lists: Default::default(),
        };
        let mut own = RawObject::default();
        for (field, value) in &object.fields {
            if let Some(list) = List::from_field(field) {
                *guild.list_mut(list) = parse_list(list, value)?;
            } else if field == "member_count" {
                guild.member_count = serde_json::from_str(value)?;
            } else if field != "unavailable" {
                own.set(field.clone(), value.clone());
            }
        }
        guild.fields = own.to_json();
        Ok(guild)
    }

    fn list(&self, list: List) -> &BTreeMap<u64, Json> {
        &self.lists[list as usize]
    }

    fn list_mut(&mut self, list: List) -> &mut BTreeMap<u64, Json> {
        &mut self.lists[list as usize]
    }

    /// PRESENCE_UPDATE (or a presence of a member chunk) for this guild.
    fn apply_presence(&mut self, object: &RawObject<'_>) -> Result<(), serde_json::Error> {
        let user_id = object.user_id()?;
        let user = object.get("user").unwrap_or("{}");
        if object.get("status") == Some("\"offline\"") {
            // GUILD_CREATE lists no offline presences.
            self.list_mut(List::Presences).remove(&user_id);
        } else {
            let presences = self.list_mut(List::Presences);
            let merged = match presences.get(&user_id) {
                Some(stored) => merge(stored, object, &["guild_id"], &["user"])?,
                None => object.without(&["guild_id"]),
            };
            presences.insert(user_id, merged);
        }
        // A presence carries the user's new name or avatar; the member's
        // user object is where GUILD_CREATE has them.
        let user_object = RawObject::parse(user)?;
        if user_object.fields.len() > 1
            && let Some(member) = self.list_mut(List::Members).get_mut(&user_id)
        {
            let change = RawObject::single("user", user);
            *member = merge(member, &change, &[], &["user"])?;
        }
        Ok(())
    }

    /// The GUILD_CREATE `d` for this guild.
    fn rebuild(&self) -> String {
        let size: usize = self
            .lists
            .iter()
            .flat_map(|entries| entries.values())
            .map(|json| json.len() + 1)
            .sum();
        let mut out = String::with_capacity(self.fields.len() + size + 400);
        // `fields` is an object written by RawObject: `{` … `}` with no
        // padding, so its inside can be spliced in.
        let inside = &self.fields[1..self.fields.len() - 1];
        out.push('{');
        out.push_str(inside);
        if !inside.is_empty() {
            out.push(',');
        }
        if let Some(count) = self.member_count {
            out.push_str("\"member_count\":");
            out.push_str(&count.to_string());
            out.push(',');
        }
        out.push_str("\"unavailable\":false");
        for list in List::ALL {
            out.push_str(",\"");
            out.push_str(list.field());
            out.push_str("\":[");
            for (i, json) in self.list(list).values().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(json);
            }
            out.push(']');
        }
        out.push('}');
        out
    }
}

/// A thread's `parent_id`, if it has one.
fn parent_of(thread: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Parent {
        #[serde(default)]
        parent_id: Option<Snowflake>,
    }
    serde_json::from_str::<Parent>(thread)
        .ok()?
        .parent_id
        .map(|id| id.0)
}

/// Whether a thread is archived (`thread_metadata.archived`).
fn is_archived(thread: &RawObject<'_>) -> Result<bool, serde_json::Error> {
    #[derive(Deserialize)]
    struct Metadata {
        #[serde(default)]
        archived: bool,
    }
    match thread.get("thread_metadata") {
        Some(metadata) if metadata != "null" => {
            Ok(serde_json::from_str::<Metadata>(metadata)?.archived)
        }
        _ => Ok(false),
    }
}

/// A member's JSON with `role_id` taken out of its `roles`.
fn without_role(member: &str, role_id: u64) -> Result<Json, serde_json::Error> {
    let object = RawObject::parse(member)?;
    let Some(roles) = object.get("roles") else {
        return Ok(member.into());
    };
    let roles: Vec<Snowflake> = serde_json::from_str(roles)?;
    let mut kept = String::from("[");
    for role in roles.iter().filter(|role| role.0 != role_id) {
        if kept.len() > 1 {
            kept.push(',');
        }
        kept.push('"');
        kept.push_str(&role.0.to_string());
        kept.push('"');
    }
    kept.push(']');
    merge(member, &RawObject::single("roles", &kept), &[], &[])
}

/// `stored` with every top-level field of `sent` written over it, except
/// those in `skip`. Fields in `deep` that are objects on both sides are
/// merged the same way one level down (a partial `user` keeps the rest).
fn merge(
    stored: &str,
    sent: &RawObject<'_>,
    skip: &[&str],
    deep: &[&str],
) -> Result<Json, serde_json::Error> {
    let mut out = RawObject::parse(stored)?;
    for (field, value) in &sent.fields {
        if skip.contains(&field.as_ref()) {
            continue;
        }
        let nested = match out.get(field) {
            Some(old) if deep.contains(&field.as_ref()) && is_object(old) && is_object(value) => {
                Some(merge(old, &RawObject::parse(value)?, &[], &[])?)
            }
            _ => None,
        };
        match nested {
            Some(nested) => out.set(field.clone(), Cow::Owned(nested.into())),
            None => out.set(field.clone(), Cow::Borrowed(value)),
        }
    }
    Ok(out.to_json())
}

fn is_object(json: &str) -> bool {
    json.trim_start().starts_with('{')
}

/// A JSON object's top-level fields in order, each value left as its JSON
/// text: enough to key, merge and drop fields without decoding entities.
#[derive(Default)]
struct RawObject<'a> {
    fields: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> RawObject<'a> {
    fn parse(json: &'a str) -> Result<RawObject<'a>, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// An object of one field.
    fn single(field: &'a str, value: &'a str) -> RawObject<'a> {
        RawObject {
            fields: vec![(Cow::Borrowed(field), Cow::Borrowed(value))],
        }
    }

    /// A field's JSON text.
    fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, value)| value.as_ref())
    }

    fn set(&mut self, field: Cow<'a, str>, value: Cow<'a, str>) {
        match self.fields.iter_mut().find(|(name, _)| *name == field) {
            Some((_, old)) => *old = value,
            None => self.fields.push((field, value)),
        }
    }

    /// A required snowflake field.
    fn id(&self, field: &'static str) -> Result<u64, serde_json::Error> {
        self.optional_id(field)?
            .ok_or_else(|| de::Error::missing_field(field))
    }

    /// A snowflake field that may be absent or null.
    fn optional_id(&self, field: &str) -> Result<Option<u64>, serde_json::Error> {
        match self.get(field) {
            None | Some("null") => Ok(None),
            Some(value) => Ok(Some(serde_json::from_str::<Snowflake>(value)?.0)),
        }
    }

    /// `user.id`, as members and presences are keyed.
    fn user_id(&self) -> Result<u64, serde_json::Error> {
        let user = self
            .get("user")
            .ok_or_else(|| de::Error::missing_field("user"))?;
        entry_id(Key::Id, user)
    }

    /// A boolean field that counts as `false` when absent or null.
    fn flag(&self, field: &str) -> Result<bool, serde_json::Error> {
        match self.get(field) {
            None | Some("null") => Ok(false),
            Some(value) => serde_json::from_str(value),
        }
    }

    /// This object's JSON without the named fields.
    fn without(&self, drop: &[&str]) -> Json {
        self.write(|field| !drop.contains(&field))
    }

    fn to_json(&self) -> Json {
        self.write(|_| true)
    }

    fn write(&self, keep: impl Fn(&str) -> bool) -> Json {
        let size: usize = self
            .fields
            .iter()
            .map(|(field, value)| field.len() + value.len() + 4)
            .sum();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        for (field, value) in self.fields.iter().filter(|(field, _)| keep(field)) {
            if out.len() > 1 {
                out.push(',');
            }
            push_json_string(&mut out, field);
            out.push(':');
            out.push_str(value);
        }
        out.push('}');
        out.into()
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut object = RawObject::default();
                while let Some(Name(field)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    object.set(field, Cow::Borrowed(value.get()));
                }
                Ok(object)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A field name that borrows from the input unless it holds escapes.
#[derive(Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

/// Append `text` as a JSON string.
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        // Escaping a string cannot fail.
        out.push_str(&serde_json::to_string(text).unwrap_or_default());
    }
}

/// An object keyed by `id`.
#[derive(Deserialize)]
struct ById {
    id: Snowflake,
}

/// A Discord id: a string of digits on the wire, accepted as a number too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snowflake(u64);

impl<'de> Deserialize<'de> for Snowflake {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Id;
        impl Visitor<'_> for Id {
            type Value = Snowflake;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a snowflake (string of digits or integer)")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Snowflake, E> {
                Ok(Snowflake(value))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Snowflake, E> {
                value
                    .parse()
                    .map(Snowflake)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
            }
        }
        deserializer.deserialize_any(Id)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
