//! Replays a recorded dispatch stream through the state cache and, after
//! every event, compares each guild's rebuilt GUILD_CREATE with the guild's
//! true state, computed here by a plain `serde_json::Value` model that applies
//! the same events (lists compared as sets by id).
//!
//! The stream is `tests/fixtures/cache_stream.ndjson` (written by
//! `gen_cache_stream.py` beside it): two shards, five guilds, READY and
//! GUILD_CREATE bursts, a guild outage and its return, a guild left and one
//! joined, a re-identify of shard 1, every state event of the cache, noise
//! (MESSAGE_CREATE, TYPING_START, reactions) and malformed payloads.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use shardwarden::frontdoor::cache::{GuildStub, StateCache};

/// GUILD_CREATE's lists and where each entry's id is.
const LISTS: [(&str, &[&str]); 11] = [
    ("channels", &["id"]),
    ("threads", &["id"]),
    ("roles", &["id"]),
    ("emojis", &["id"]),
    ("stickers", &["id"]),
    ("members", &["user", "id"]),
    ("voice_states", &["user_id"]),
    ("presences", &["user", "id"]),
    ("stage_instances", &["id"]),
    ("guild_scheduled_events", &["id"]),
    ("soundboard_sounds", &["sound_id"]),
];

fn id_at(path: &[&str], value: &Value) -> Option<String> {
    let mut at = value;
    for step in path {
        at = at.get(step)?;
    }
    match at {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

fn path_of(field: &str) -> &'static [&'static str] {
    LISTS
        .iter()
        .find(|(name, _)| *name == field)
        .map(|(_, path)| *path)
        .expect("a GUILD_CREATE list")
}

/// A guild's true state: GUILD_CREATE's object, every list present.
#[derive(Debug, Clone)]
struct Model {
    /// Guild id → (shard, state; `None` while unavailable).
    guilds: BTreeMap<String, (u32, Option<Value>)>,
    /// The bot's user id, from READY.
    me: Option<String>,
}

fn without(value: &Value, fields: &[&str]) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        for field in fields {
            object.remove(*field);
        }
    }
    value
}

/// Write `sent`'s fields over `stored`, except `skip`; `deep` fields that are
/// objects on both sides get the same treatment one level down.
fn merge(stored: &mut Value, sent: &Value, skip: &[&str], deep: &[&str]) {
    for (field, value) in sent.as_object().expect("object") {
        if skip.contains(&field.as_str()) {
            continue;
        }
        match stored.get_mut(field) {
            Some(old) if deep.contains(&field.as_str()) && old.is_object() && value.is_object() => {
                merge(old, value, &[], &[]);
            }
            _ => {
                stored[field] = value.clone();
            }
        }
    }
}

fn list<'a>(guild: &'a mut Value, field: &str) -> &'a mut Vec<Value> {
    guild[field].as_array_mut().expect("list")
}

fn find<'a>(guild: &'a mut Value, field: &str, id: &str) -> Option<&'a mut Value> {
    let path = path_of(field);
    list(guild, field)
        .iter_mut()
        .find(|entry| id_at(path, entry).as_deref() == Some(id))
}

fn upsert(guild: &mut Value, field: &str, entry: Value) -> bool {
    let id = id_at(path_of(field), &entry).expect("entry id");
    match find(guild, field, &id) {
        Some(old) => {
            *old = entry;
            false
        }
        None => {
            list(guild, field).push(entry);
            true
        }
    }
}

fn remove(guild: &mut Value, field: &str, id: &str) {
    let path = path_of(field);
    list(guild, field).retain(|entry| id_at(path, entry).as_deref() != Some(id));
}

fn str_of(value: &Value) -> String {
    id_at(&[], value).expect("id")
}

fn apply_presence(guild: &mut Value, presence: &Value) {
    let user_id = str_of(&presence["user"]["id"]);
    if presence["status"] == "offline" {
        remove(guild, "presences", &user_id);
    } else if let Some(stored) = find(guild, "presences", &user_id) {
        merge(stored, presence, &["guild_id"], &["user"]);
    } else {
        list(guild, "presences").push(without(presence, &["guild_id"]));
    }
    if presence["user"].as_object().expect("user").len() > 1
        && let Some(member) = find(guild, "members", &user_id)
    {
        merge(&mut member["user"], &presence["user"], &[], &[]);
    }
}

impl Model {
    fn guild(&mut self, d: &Value, field: &str) -> Option<&mut Value> {
        let id = str_of(&d[field]);
        self.guilds.get_mut(&id)?.1.as_mut()
    }

    fn apply(&mut self, shard: u32, t: &str, d: &Value) {
        match t {
            "READY" => {
                self.me = Some(str_of(&d["user"]["id"]));
                let listed: BTreeSet<String> = d["guilds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| str_of(&g["id"]))
                    .collect();
                self.guilds
                    .retain(|id, (s, _)| *s != shard || listed.contains(id));
                for id in listed {
                    self.guilds.insert(id, (shard, None));
                }
            }
            "GUILD_CREATE" => {
                let id = str_of(&d["id"]);
                if d["unavailable"] == true {
                    self.guilds.insert(id, (shard, None));
                    return;
                }
                let mut guild = d.clone();
                guild["unavailable"] = json!(false);
                for (field, _) in LISTS {
                    if guild.get(field).is_none() {
                        guild[field] = json!([]);
                    }
                }
                self.guilds.insert(id, (shard, Some(guild)));
            }
            "GUILD_UPDATE" => {
                let lists: Vec<&str> = LISTS.iter().map(|(field, _)| *field).collect();
                if let Some(guild) = self.guild(d, "id") {
                    let mut skip = lists;
                    skip.extend(["member_count", "unavailable", "guild_id"]);
                    merge(guild, d, &skip, &[]);
                }
            }
            "GUILD_DELETE" => {
                let id = str_of(&d["id"]);
                if d["unavailable"] == true {
                    let shard = self.guilds.get(&id).map_or(shard, |(s, _)| *s);
                    self.guilds.insert(id, (shard, None));
                } else {
                    self.guilds.remove(&id);
                }
            }
            "CHANNEL_CREATE" | "CHANNEL_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    upsert(guild, "channels", without(d, &["guild_id"]));
                }
            }
            "CHANNEL_DELETE" => {
                let id = str_of(&d["id"]);
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "channels", &id);
                    list(guild, "threads").retain(|thread| thread["parent_id"] != json!(id));
                }
            }
            "CHANNEL_PINS_UPDATE" => {
                let id = str_of(&d["channel_id"]);
                let pinned = d.get("last_pin_timestamp").cloned().unwrap_or(Value::Null);
                if let Some(guild) = self.guild(d, "guild_id") {
                    for field in ["channels", "threads"] {
                        if let Some(channel) = find(guild, field, &id) {
                            channel["last_pin_timestamp"] = pinned.clone();
                        }
                    }
                }
            }
            "THREAD_CREATE" | "THREAD_UPDATE" => {
                let id = str_of(&d["id"]);
                if let Some(guild) = self.guild(d, "guild_id") {
                    if d["thread_metadata"]["archived"] == true {
                        remove(guild, "threads", &id);
                        return;
                    }
                    let mut thread = without(d, &["newly_created"]);
                    if thread.get("member").is_none()
                        && let Some(member) =
                            find(guild, "threads", &id).and_then(|old| old.get("member"))
                    {
                        thread["member"] = member.clone();
                    }
                    upsert(guild, "threads", thread);
                }
            }
            "THREAD_DELETE" => {
                let id = str_of(&d["id"]);
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "threads", &id);
                }
            }
            "THREAD_LIST_SYNC" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    match d.get("channel_ids") {
                        Some(parents) => {
                            let parents = parents.as_array().unwrap().clone();
                            list(guild, "threads")
                                .retain(|thread| !parents.contains(&thread["parent_id"]));
                        }
                        None => list(guild, "threads").clear(),
                    }
                    for thread in d["threads"].as_array().unwrap() {
                        if thread["thread_metadata"]["archived"] != true {
                            upsert(guild, "threads", without(thread, &["newly_created"]));
                        }
                    }
                    for member in d["members"].as_array().unwrap() {
                        if let Some(thread) = find(guild, "threads", &str_of(&member["id"])) {
                            thread["member"] = without(member, &["guild_id"]);
                        }
                    }
                }
            }
            "THREAD_MEMBER_UPDATE" => {
                let id = str_of(&d["id"]);
                if let Some(guild) = self.guild(d, "guild_id")
                    && let Some(thread) = find(guild, "threads", &id)
                {
                    thread["member"] = without(d, &["guild_id"]);
                }
            }
            "THREAD_MEMBERS_UPDATE" => {
                let id = str_of(&d["id"]);
                let me = self.me.clone().map(Value::String);
                if let Some(guild) = self.guild(d, "guild_id")
                    && let Some(thread) = find(guild, "threads", &id)
                {
                    thread["member_count"] = d["member_count"].clone();
                    for added in d
                        .get("added_members")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if Some(&added["user_id"]) == me.as_ref() {
                            thread["member"] = without(added, &["member", "presence", "guild_id"]);
                        }
                    }
                    let removed = d.get("removed_member_ids").and_then(Value::as_array);
                    if let (Some(removed), Some(me)) = (removed, &me)
                        && removed.contains(me)
                    {
                        thread.as_object_mut().unwrap().remove("member");
                    }
                }
            }
            "GUILD_ROLE_CREATE" | "GUILD_ROLE_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    upsert(guild, "roles", d["role"].clone());
                }
            }
            "GUILD_ROLE_DELETE" => {
                let id = d["role_id"].clone();
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "roles", &str_of(&id));
                    for member in list(guild, "members") {
                        if let Some(roles) = member["roles"].as_array_mut() {
                            roles.retain(|role| *role != id);
                        }
                    }
                }
            }
            "GUILD_EMOJIS_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    guild["emojis"] = d["emojis"].clone();
                }
            }
            "GUILD_STICKERS_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    guild["stickers"] = d["stickers"].clone();
                }
            }
            "GUILD_MEMBER_ADD" => {
                if let Some(guild) = self.guild(d, "guild_id")
                    && upsert(guild, "members", without(d, &["guild_id"]))
                {
                    guild["member_count"] = json!(guild["member_count"].as_u64().unwrap() + 1);
                }
            }
            "GUILD_MEMBER_UPDATE" => {
                let user_id = str_of(&d["user"]["id"]);
                if let Some(guild) = self.guild(d, "guild_id")
                    && let Some(member) = find(guild, "members", &user_id)
                {
                    merge(member, d, &["guild_id"], &["user"]);
                }
            }
            "GUILD_MEMBER_REMOVE" => {
                let user_id = str_of(&d["user"]["id"]);
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "members", &user_id);
                    remove(guild, "presences", &user_id);
                    let count = guild["member_count"].as_u64().unwrap();
                    guild["member_count"] = json!(count.saturating_sub(1));
                }
            }
            "GUILD_MEMBERS_CHUNK" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    for member in d["members"].as_array().unwrap() {
                        upsert(guild, "members", member.clone());
                    }
                    for presence in d
                        .get("presences")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        apply_presence(guild, presence);
                    }
                }
            }
            "PRESENCE_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    apply_presence(guild, d);
                }
            }
            "VOICE_STATE_UPDATE" => {
                let user_id = str_of(&d["user_id"]);
                if let Some(guild) = self.guild(d, "guild_id") {
                    if let Some(member) = d.get("member").filter(|member| !member.is_null()) {
                        upsert(guild, "members", member.clone());
                    }
                    if d["channel_id"].is_null() {
                        remove(guild, "voice_states", &user_id);
                    } else {
                        upsert(guild, "voice_states", without(d, &["guild_id", "member"]));
                    }
                }
            }
            "STAGE_INSTANCE_CREATE" | "STAGE_INSTANCE_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    upsert(guild, "stage_instances", d.clone());
                }
            }
            "STAGE_INSTANCE_DELETE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "stage_instances", &str_of(&d["id"]));
                }
            }
            "GUILD_SCHEDULED_EVENT_CREATE" | "GUILD_SCHEDULED_EVENT_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    upsert(guild, "guild_scheduled_events", d.clone());
                }
            }
            "GUILD_SCHEDULED_EVENT_DELETE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "guild_scheduled_events", &str_of(&d["id"]));
                }
            }
            "GUILD_SCHEDULED_EVENT_USER_ADD" | "GUILD_SCHEDULED_EVENT_USER_REMOVE" => {
                let id = str_of(&d["guild_scheduled_event_id"]);
                let change: i64 = if t.ends_with("ADD") { 1 } else { -1 };
                if let Some(guild) = self.guild(d, "guild_id")
                    && let Some(event) = find(guild, "guild_scheduled_events", &id)
                    && let Some(count) = event.get("user_count").and_then(Value::as_i64)
                {
                    event["user_count"] = json!((count + change).max(0));
                }
            }
            "GUILD_SOUNDBOARD_SOUND_CREATE" | "GUILD_SOUNDBOARD_SOUND_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    upsert(guild, "soundboard_sounds", d.clone());
                }
            }
            "GUILD_SOUNDBOARD_SOUND_DELETE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    remove(guild, "soundboard_sounds", &str_of(&d["sound_id"]));
                }
            }
            "GUILD_SOUNDBOARD_SOUNDS_UPDATE" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    for sound in d["soundboard_sounds"].as_array().unwrap() {
                        upsert(guild, "soundboard_sounds", sound.clone());
                    }
                }
            }
            "SOUNDBOARD_SOUNDS" => {
                if let Some(guild) = self.guild(d, "guild_id") {
                    guild["soundboard_sounds"] = d["soundboard_sounds"].clone();
                }
            }
            _ => {}
        }
    }
}

/// `value` with every GUILD_CREATE list sorted by id: lists compare as sets.
fn as_sets(mut value: Value) -> Value {
    for (field, path) in LISTS {
        let entries = value[field].as_array_mut().expect("list present");
        entries.sort_by_key(|entry| id_at(path, entry).expect("entry id"));
        let ids: BTreeSet<_> = entries.iter().map(|entry| id_at(path, entry)).collect();
        assert_eq!(ids.len(), entries.len(), "{field} holds an id twice");
    }
    value
}

struct Line {
    shard: u32,
    t: String,
    d: Option<Value>,
    bytes: Vec<u8>,
}

fn stream() -> Vec<Line> {
    let text = include_str!("fixtures/cache_stream.ndjson");
    text.lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).expect("fixture line");
            let shard = line["shard"].as_u64().expect("shard") as u32;
            let t = line["t"].as_str().expect("t").to_owned();
            match line.get("raw") {
                Some(raw) => Line {
                    shard,
                    t,
                    d: None,
                    bytes: raw.as_str().expect("raw text").as_bytes().to_vec(),
                },
                None => Line {
                    shard,
                    t,
                    bytes: line["d"].to_string().into_bytes(),
                    d: Some(line["d"].clone()),
                },
            }
        })
        .collect()
}

fn assert_same(cache: &StateCache, model: &Model, seen: &BTreeSet<String>, step: usize, t: &str) {
    for id in seen {
        let rebuilt = cache.guild_create(id.parse().unwrap());
        match model.guilds.get(id) {
            Some((_, Some(truth))) => {
                let rebuilt =
                    rebuilt.unwrap_or_else(|| panic!("step {step} ({t}): guild {id} missing"));
                let rebuilt: Value =
                    serde_json::from_str(&rebuilt).expect("rebuilt GUILD_CREATE is JSON");
                let (rebuilt, truth) = (as_sets(rebuilt), as_sets(truth.clone()));
                if rebuilt != truth {
                    for (field, value) in truth.as_object().unwrap() {
                        assert_eq!(
                            &rebuilt[field], value,
                            "step {step} ({t}): guild {id} field {field}"
                        );
                    }
                    assert_eq!(rebuilt, truth, "step {step} ({t}): guild {id}");
                }
            }
            _ => assert_eq!(
                rebuilt, None,
                "step {step} ({t}): guild {id} should be absent or unavailable"
            ),
        }
    }
    for shard in 0..2 {
        let truth: Vec<GuildStub> = model
            .guilds
            .iter()
            .filter(|(_, (s, _))| *s == shard)
            .map(|(id, (_, state))| GuildStub {
                id: id.parse().unwrap(),
                unavailable: state.is_none(),
            })
            .collect();
        let mut truth = truth;
        truth.sort_by_key(|stub| stub.id);
        assert_eq!(
            cache.shard_guilds(shard),
            truth,
            "step {step} ({t}): shard {shard} guilds"
        );
    }
}

#[test]
fn replayed_stream_rebuilds_every_guild_create() {
    let stream = stream();
    assert!(stream.len() >= 100, "a realistic stream");
    let cache = StateCache::new();
    let mut model = Model {
        guilds: BTreeMap::new(),
        me: None,
    };
    let mut seen = BTreeSet::new();
    let mut applied = 0;
    for (step, line) in stream.iter().enumerate() {
        if StateCache::tracks(&line.t) {
            cache.apply(line.shard, &line.t, &line.bytes);
            applied += 1;
        }
        if let Some(d) = &line.d {
            model.apply(line.shard, &line.t, d);
            for field in ["id", "guild_id"] {
                if let Some(id) = id_at(&[field], d)
                    && line.t.starts_with("GUILD_CREATE")
                {
                    seen.insert(id);
                }
            }
        }
        assert_same(&cache, &model, &seen, step, &line.t);
    }
    assert!(
        applied < stream.len(),
        "noise events are skipped by tracks()"
    );

    // Hand-checked against the fixture: Alpha and Gamma on shard 0, Beta
    // and Epsilon on shard 1 (after its second READY and GUILD_CREATEs),
    // Delta left (GUILD_DELETE without `unavailable`).
    let names = |shard| -> Vec<String> {
        cache
            .shard_guilds(shard)
            .iter()
            .map(|stub| {
                assert!(!stub.unavailable);
                let guild: Value =
                    serde_json::from_str(&cache.guild_create(stub.id).unwrap()).unwrap();
                guild["name"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let mut shard0 = names(0);
    let mut shard1 = names(1);
    shard0.sort();
    shard1.sort();
    assert!(
        shard0[0].starts_with("Alpha") && shard0[1].starts_with("Gamma"),
        "{shard0:?}"
    );
    assert!(
        shard1[0].starts_with("Beta") && shard1[1].starts_with("Epsilon"),
        "{shard1:?}"
    );
    assert_eq!(seen.len(), 5);
    let stats = cache.stats();
    assert_eq!(stats.guilds, 4);
    assert_eq!(stats.unavailable_guilds, 0);
    let members: usize = model
        .guilds
        .values()
        .map(|(_, guild)| guild.as_ref().unwrap()["members"].as_array().unwrap().len())
        .sum();
    assert_eq!(stats.members, members);
}

#[test]
fn stream_covers_every_tracked_event_kind() {
    let kinds: BTreeSet<String> = stream().into_iter().map(|line| line.t).collect();
    // Every event the cache tracks, and one it must leave alone.
    let tracked = shardwarden::frontdoor::cache::TRACKED;
    for t in tracked.iter().copied().chain(["MESSAGE_CREATE"]) {
        assert!(kinds.contains(t), "the fixture has no {t}");
    }
}
