use serde_json::{Value, json};

use super::*;

const GUILD: u64 = 81384788765712384;
const BOT: &str = "9000";

/// A guild as Discord sends it in GUILD_CREATE: two members (the bot and
/// one user), one of each other entity.
fn guild_create() -> Value {
    json!({
        "id": GUILD.to_string(),
        "name": "Shardwarden Test",
        "icon": null,
        "owner_id": "100",
        "afk_timeout": 300,
        "verification_level": 1,
        "features": ["COMMUNITY"],
        "joined_at": "2026-01-01T00:00:00.000000+00:00",
        "large": false,
        "unavailable": false,
        "member_count": 2,
        "roles": [
            {"id": GUILD.to_string(), "name": "@everyone", "permissions": "104324673", "position": 0},
            {"id": "300", "name": "mod", "permissions": "8", "position": 1}
        ],
        "emojis": [{"id": "400", "name": "wave", "roles": [], "animated": false}],
        "stickers": [{"id": "500", "name": "hi", "format_type": 1, "type": 2}],
        "channels": [
            {"id": "200", "type": 0, "name": "general", "position": 0, "permission_overwrites": []},
            {"id": "201", "type": 2, "name": "voice", "position": 1, "bitrate": 64000}
        ],
        "threads": [
            {"id": "600", "type": 11, "parent_id": "200", "guild_id": GUILD.to_string(), "name": "t",
             "member_count": 1, "thread_metadata": {"archived": false},
             "member": {"id": "600", "user_id": BOT, "join_timestamp": "2026-01-02T00:00:00Z", "flags": 0}}
        ],
        "members": [
            {"user": {"id": BOT, "username": "bot", "bot": true}, "roles": [], "joined_at": "2026-01-01T00:00:00Z", "deaf": false, "mute": false},
            {"user": {"id": "100", "username": "owner", "global_name": "Owner"}, "nick": null, "roles": ["300"], "joined_at": "2025-01-01T00:00:00Z", "deaf": false, "mute": false}
        ],
        "voice_states": [
            {"channel_id": "201", "user_id": "100", "session_id": "s1", "deaf": false, "mute": false,
             "self_deaf": false, "self_mute": true, "self_video": false, "suppress": false, "request_to_speak_timestamp": null}
        ],
        "presences": [
            {"user": {"id": "100"}, "status": "online", "activities": [], "client_status": {"desktop": "online"}}
        ],
        "stage_instances": [],
        "guild_scheduled_events": [
            {"id": "700", "guild_id": GUILD.to_string(), "name": "party", "status": 1, "entity_type": 3, "user_count": 3}
        ],
        "soundboard_sounds": [
            {"sound_id": "800", "name": "quack", "volume": 1.0, "emoji_id": null, "emoji_name": "🦆", "guild_id": GUILD.to_string(), "available": true}
        ]
    })
}

fn apply(cache: &StateCache, t: &str, d: Value) {
    assert!(StateCache::tracks(t), "{t} should be tracked");
    cache.apply(0, t, d.to_string().as_bytes());
}

fn cache() -> StateCache {
    let cache = StateCache::new();
    apply(&cache, "GUILD_CREATE", guild_create());
    cache
}

/// The rebuilt GUILD_CREATE, parsed.
fn state(cache: &StateCache) -> Value {
    let text = cache.guild_create(GUILD).expect("guild is available");
    serde_json::from_str(&text).expect("rebuilt GUILD_CREATE is JSON")
}

fn list<'a>(state: &'a Value, field: &str) -> &'a Vec<Value> {
    state[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is a list"))
}

/// The entry of `field` whose id (where that list keeps it) is `id`.
fn entry<'a>(state: &'a Value, field: &str, id: &str) -> Option<&'a Value> {
    list(state, field)
        .iter()
        .find(|entry| key(field, entry) == id)
}

fn key(field: &str, entry: &Value) -> String {
    let id = match field {
        "members" | "presences" => &entry["user"]["id"],
        "voice_states" => &entry["user_id"],
        "soundboard_sounds" => &entry["sound_id"],
        _ => &entry["id"],
    };
    id.as_str().expect("string id").to_owned()
}

fn ids(state: &Value, field: &str) -> Vec<String> {
    let mut ids: Vec<String> = list(state, field).iter().map(|e| key(field, e)).collect();
    ids.sort();
    ids
}

/// `value` with every GUILD_CREATE list sorted by id, so lists compare as sets.
fn normalized(mut value: Value) -> Value {
    for list in List::ALL {
        if let Some(entries) = value[list.field()].as_array_mut() {
            entries.sort_by_key(|entry| key(list.field(), entry));
        }
    }
    value
}

#[test]
fn tracks_state_events_only() {
    for t in TRACKED {
        assert!(
            crate::intents::ALL_EVENTS.contains(t),
            "{t} is not a Discord dispatch"
        );
        assert!(StateCache::tracks(t));
    }
    for t in [
        "MESSAGE_CREATE",
        "MESSAGE_UPDATE",
        "TYPING_START",
        "INTERACTION_CREATE",
        "MESSAGE_REACTION_ADD",
        "RESUMED",
        "GUILD_BAN_ADD",
        "",
    ] {
        assert!(!StateCache::tracks(t), "{t} must stay off the cache");
    }
}

#[test]
fn guild_create_round_trips() {
    let cache = cache();
    assert_eq!(normalized(state(&cache)), normalized(guild_create()));
    assert_eq!(
        cache.shard_guilds(0),
        vec![GuildStub {
            id: GUILD,
            unavailable: false
        }]
    );
    assert!(cache.shard_guilds(1).is_empty());
    assert_eq!(cache.guild_create(GUILD + 1), None);
}

#[test]
fn guild_create_sets_unavailable_false_even_when_absent() {
    let cache = StateCache::new();
    let mut guild = guild_create();
    guild.as_object_mut().unwrap().remove("unavailable");
    apply(&cache, "GUILD_CREATE", guild);
    assert_eq!(state(&cache)["unavailable"], json!(false));
}

#[test]
fn guild_create_replaces_a_held_guild() {
    let cache = cache();
    let mut guild = guild_create();
    guild["name"] = json!("Renamed");
    guild["channels"] = json!([{"id": "299", "type": 0, "name": "only"}]);
    apply(&cache, "GUILD_CREATE", guild.clone());
    assert_eq!(normalized(state(&cache)), normalized(guild));
}

#[test]
fn unavailable_guild_create_is_a_stub() {
    let cache = StateCache::new();
    apply(
        &cache,
        "GUILD_CREATE",
        json!({"id": GUILD.to_string(), "unavailable": true}),
    );
    assert_eq!(cache.guild_create(GUILD), None);
    assert_eq!(
        cache.shard_guilds(0),
        vec![GuildStub {
            id: GUILD,
            unavailable: true
        }]
    );
}

#[test]
fn guild_update_replaces_own_fields_and_keeps_lists() {
    let cache = cache();
    apply(
        &cache,
        "GUILD_UPDATE",
        json!({
            "id": GUILD.to_string(), "name": "New name", "icon": "abc", "owner_id": "100",
            "afk_timeout": 60, "verification_level": 2, "features": [],
            "roles": [{"id": "999", "name": "ignored"}], "emojis": [], "stickers": []
        }),
    );
    let state = state(&cache);
    assert_eq!(state["name"], json!("New name"));
    assert_eq!(state["icon"], json!("abc"));
    assert_eq!(state["afk_timeout"], json!(60));
    assert_eq!(state["features"], json!([]));
    // GUILD_CREATE-only fields and the lists stay.
    assert_eq!(
        state["joined_at"],
        json!("2026-01-01T00:00:00.000000+00:00")
    );
    assert_eq!(state["large"], json!(false));
    assert_eq!(state["member_count"], json!(2));
    assert_eq!(ids(&state, "roles"), vec!["300", &GUILD.to_string()]);
    assert_eq!(ids(&state, "emojis"), vec!["400"]);
    assert_eq!(ids(&state, "stickers"), vec!["500"]);
    assert_eq!(ids(&state, "members"), vec!["100", BOT]);
}

#[test]
fn guild_delete_unavailable_keeps_a_stub() {
    let cache = cache();
    apply(
        &cache,
        "GUILD_DELETE",
        json!({"id": GUILD.to_string(), "unavailable": true}),
    );
    assert_eq!(cache.guild_create(GUILD), None);
    assert_eq!(
        cache.shard_guilds(0),
        vec![GuildStub {
            id: GUILD,
            unavailable: true
        }]
    );
    assert_eq!(cache.stats().guilds, 0);
    assert_eq!(cache.stats().unavailable_guilds, 1);
    // Events for it while it is out change nothing and do not revive it.
    apply(
        &cache,
        "CHANNEL_CREATE",
        json!({"id": "209", "guild_id": GUILD.to_string(), "type": 0}),
    );
    assert_eq!(cache.guild_create(GUILD), None);
    // Back from the outage.
    apply(&cache, "GUILD_CREATE", guild_create());
    assert_eq!(normalized(state(&cache)), normalized(guild_create()));
}

#[test]
fn guild_delete_without_unavailable_removes_the_guild() {
    let cache = cache();
    apply(&cache, "GUILD_DELETE", json!({"id": GUILD.to_string()}));
    assert_eq!(cache.guild_create(GUILD), None);
    assert!(cache.shard_guilds(0).is_empty());
    assert_eq!(
        cache.stats(),
        CacheStats::default().with_bytes(cache.stats().bytes)
    );
}

impl CacheStats {
    fn with_bytes(mut self, bytes: usize) -> Self {
        self.bytes = bytes;
        self
    }
}

#[test]
fn ready_records_stubs_and_a_new_ready_replaces_the_shard_set() {
    let cache = StateCache::new();
    cache.apply(
        3,
        "READY",
        json!({"v": 10, "user": {"id": BOT}, "session_id": "x",
               "guilds": [{"id": "1", "unavailable": true}, {"id": "2", "unavailable": true}]})
        .to_string()
        .as_bytes(),
    );
    cache.apply(
        4,
        "READY",
        json!({"user": {"id": BOT}, "guilds": [{"id": "7", "unavailable": true}]})
            .to_string()
            .as_bytes(),
    );
    let stub = |id, unavailable| GuildStub { id, unavailable };
    assert_eq!(cache.shard_guilds(3), vec![stub(1, true), stub(2, true)]);
    assert_eq!(cache.guild_create(1), None);

    let mut one = guild_create();
    one["id"] = json!("1");
    cache.apply(3, "GUILD_CREATE", one.to_string().as_bytes());
    assert_eq!(cache.shard_guilds(3), vec![stub(1, false), stub(2, true)]);
    assert!(cache.guild_create(1).is_some());

    // A new session of shard 3: guild 2 is gone, guild 1 starts over as
    // unavailable until its GUILD_CREATE, guild 3 is new.
    cache.apply(
        3,
        "READY",
        json!({"user": {"id": BOT}, "guilds": [{"id": "1", "unavailable": true}, {"id": "3", "unavailable": true}]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(cache.shard_guilds(3), vec![stub(1, true), stub(3, true)]);
    assert_eq!(cache.guild_create(1), None);
    // Shard 4 is untouched.
    assert_eq!(cache.shard_guilds(4), vec![stub(7, true)]);
}

#[test]
fn channels_create_update_delete() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "CHANNEL_CREATE",
        json!({"id": "210", "guild_id": guild_id, "type": 0, "name": "new", "position": 2}),
    );
    let s = state(&cache);
    // Stored in GUILD_CREATE's shape: no guild_id.
    assert_eq!(
        entry(&s, "channels", "210"),
        Some(&json!({"id": "210", "type": 0, "name": "new", "position": 2}))
    );

    apply(
        &cache,
        "CHANNEL_UPDATE",
        json!({"id": "210", "guild_id": guild_id, "type": 0, "name": "renamed", "position": 3}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "channels", "210").unwrap()["name"],
        json!("renamed")
    );
    assert_eq!(ids(&s, "channels"), vec!["200", "201", "210"]);

    // Deleting a channel takes its threads with it.
    apply(
        &cache,
        "CHANNEL_DELETE",
        json!({"id": "200", "guild_id": guild_id, "type": 0}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "channels"), vec!["201", "210"]);
    assert!(ids(&s, "threads").is_empty());
}

#[test]
fn dm_channels_are_not_followed() {
    let cache = cache();
    let before = state(&cache);
    apply(
        &cache,
        "CHANNEL_CREATE",
        json!({"id": "5", "type": 1, "recipients": [{"id": "100"}]}),
    );
    assert_eq!(state(&cache), before);
}

#[test]
fn channel_pins_update_sets_last_pin_timestamp() {
    let cache = cache();
    apply(
        &cache,
        "CHANNEL_PINS_UPDATE",
        json!({"guild_id": GUILD.to_string(), "channel_id": "200", "last_pin_timestamp": "2026-02-02T00:00:00Z"}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "channels", "200").unwrap()["last_pin_timestamp"],
        json!("2026-02-02T00:00:00Z")
    );
    apply(
        &cache,
        "CHANNEL_PINS_UPDATE",
        json!({"guild_id": GUILD.to_string(), "channel_id": "600"}),
    );
    assert_eq!(
        entry(&state(&cache), "threads", "600").unwrap()["last_pin_timestamp"],
        Value::Null
    );
}

#[test]
fn threads_create_update_delete() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "THREAD_CREATE",
        json!({"id": "601", "guild_id": guild_id, "parent_id": "200", "type": 11, "name": "n",
               "newly_created": true, "thread_metadata": {"archived": false}}),
    );
    let s = state(&cache);
    let created = entry(&s, "threads", "601").unwrap();
    assert_eq!(created.get("newly_created"), None);
    assert_eq!(created["guild_id"], json!(guild_id));

    // THREAD_UPDATE keeps the bot's thread member, which it does not repeat.
    apply(
        &cache,
        "THREAD_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "parent_id": "200", "type": 11, "name": "renamed",
               "member_count": 4, "thread_metadata": {"archived": false}}),
    );
    let s = state(&cache);
    let updated = entry(&s, "threads", "600").unwrap();
    assert_eq!(updated["name"], json!("renamed"));
    assert_eq!(updated["member"]["user_id"], json!(BOT));

    // Archived threads are not in GUILD_CREATE.
    apply(
        &cache,
        "THREAD_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "parent_id": "200", "type": 11,
               "thread_metadata": {"archived": true}}),
    );
    assert_eq!(ids(&state(&cache), "threads"), vec!["601"]);

    apply(
        &cache,
        "THREAD_DELETE",
        json!({"id": "601", "guild_id": guild_id, "parent_id": "200", "type": 11}),
    );
    assert!(ids(&state(&cache), "threads").is_empty());
}

#[test]
fn thread_list_sync_replaces_threads_of_the_synced_parents() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "THREAD_CREATE",
        json!({"id": "610", "guild_id": guild_id, "parent_id": "201", "type": 11}),
    );
    // Parent 200 synced: thread 600 is gone, 602 arrives with the bot's
    // membership; 610 (parent 201) is untouched.
    apply(
        &cache,
        "THREAD_LIST_SYNC",
        json!({"guild_id": guild_id, "channel_ids": ["200"],
               "threads": [{"id": "602", "guild_id": guild_id, "parent_id": "200", "type": 11}],
               "members": [{"id": "602", "user_id": BOT, "join_timestamp": "2026-03-03T00:00:00Z", "flags": 0}]}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "threads"), vec!["602", "610"]);
    assert_eq!(
        entry(&s, "threads", "602").unwrap()["member"]["join_timestamp"],
        json!("2026-03-03T00:00:00Z")
    );

    // Without channel_ids the whole guild is synced.
    apply(
        &cache,
        "THREAD_LIST_SYNC",
        json!({"guild_id": guild_id,
               "threads": [{"id": "620", "guild_id": guild_id, "parent_id": "201", "type": 11}],
               "members": []}),
    );
    assert_eq!(ids(&state(&cache), "threads"), vec!["620"]);
}

#[test]
fn thread_member_updates() {
    let cache = StateCache::new();
    cache.apply(
        0,
        "READY",
        json!({"user": {"id": BOT}, "guilds": [{"id": GUILD.to_string(), "unavailable": true}]})
            .to_string()
            .as_bytes(),
    );
    apply(&cache, "GUILD_CREATE", guild_create());
    let guild_id = GUILD.to_string();

    apply(
        &cache,
        "THREAD_MEMBER_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "user_id": BOT, "join_timestamp": "2026-04-04T00:00:00Z", "flags": 1}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "threads", "600").unwrap()["member"],
        json!({"id": "600", "user_id": BOT, "join_timestamp": "2026-04-04T00:00:00Z", "flags": 1})
    );

    // Someone else joins: only the count changes.
    apply(
        &cache,
        "THREAD_MEMBERS_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "member_count": 2,
               "added_members": [{"id": "600", "user_id": "100", "join_timestamp": "2026-04-05T00:00:00Z", "flags": 0,
                                  "member": {"user": {"id": "100"}}, "presence": null}]}),
    );
    let s = state(&cache);
    let thread = entry(&s, "threads", "600").unwrap();
    assert_eq!(thread["member_count"], json!(2));
    assert_eq!(thread["member"]["user_id"], json!(BOT));

    // The bot leaves, then is added back.
    apply(
        &cache,
        "THREAD_MEMBERS_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "member_count": 1, "removed_member_ids": [BOT]}),
    );
    let s = state(&cache);
    assert_eq!(entry(&s, "threads", "600").unwrap().get("member"), None);
    apply(
        &cache,
        "THREAD_MEMBERS_UPDATE",
        json!({"id": "600", "guild_id": guild_id, "member_count": 2,
               "added_members": [{"id": "600", "user_id": BOT, "join_timestamp": "2026-04-06T00:00:00Z", "flags": 0,
                                  "member": {"user": {"id": BOT}}, "presence": null}]}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "threads", "600").unwrap()["member"],
        json!({"id": "600", "user_id": BOT, "join_timestamp": "2026-04-06T00:00:00Z", "flags": 0})
    );
}

#[test]
fn roles_create_update_delete() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "GUILD_ROLE_CREATE",
        json!({"guild_id": guild_id, "role": {"id": "301", "name": "new", "permissions": "0", "position": 2}}),
    );
    apply(
        &cache,
        "GUILD_ROLE_UPDATE",
        json!({"guild_id": guild_id, "role": {"id": "300", "name": "moderator", "permissions": "8", "position": 1}}),
    );
    let s = state(&cache);
    assert_eq!(
        ids(&s, "roles"),
        vec!["300", "301", GUILD.to_string().as_str()]
    );
    assert_eq!(
        entry(&s, "roles", "300").unwrap()["name"],
        json!("moderator")
    );

    // Deleting a role takes it off the members who had it.
    apply(
        &cache,
        "GUILD_ROLE_DELETE",
        json!({"guild_id": guild_id, "role_id": "300"}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "roles"), vec!["301", GUILD.to_string().as_str()]);
    let owner = entry(&s, "members", "100").unwrap();
    assert_eq!(owner["roles"], json!([]));
    assert_eq!(owner["user"]["username"], json!("owner"));
}

#[test]
fn emojis_and_stickers_are_replaced() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "GUILD_EMOJIS_UPDATE",
        json!({"guild_id": guild_id, "emojis": [{"id": "401", "name": "a"}, {"id": "402", "name": "b"}]}),
    );
    apply(
        &cache,
        "GUILD_STICKERS_UPDATE",
        json!({"guild_id": guild_id, "stickers": []}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "emojis"), vec!["401", "402"]);
    assert!(ids(&s, "stickers").is_empty());
}

#[test]
fn member_add_and_remove_move_member_count() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    let member = json!({"guild_id": guild_id, "user": {"id": "101", "username": "new"}, "roles": [],
                        "joined_at": "2026-05-05T00:00:00Z", "deaf": false, "mute": false});
    apply(&cache, "GUILD_MEMBER_ADD", member.clone());
    let s = state(&cache);
    assert_eq!(s["member_count"], json!(3));
    let added = entry(&s, "members", "101").unwrap();
    assert_eq!(added.get("guild_id"), None);
    assert_eq!(added["user"]["username"], json!("new"));

    // Discord may repeat GUILD_MEMBER_ADD for a member it has.
    apply(&cache, "GUILD_MEMBER_ADD", member);
    assert_eq!(state(&cache)["member_count"], json!(3));

    apply(
        &cache,
        "GUILD_MEMBER_REMOVE",
        json!({"guild_id": guild_id, "user": {"id": "100", "username": "owner"}}),
    );
    let s = state(&cache);
    assert_eq!(s["member_count"], json!(2));
    assert_eq!(ids(&s, "members"), vec!["101", BOT]);
    assert!(ids(&s, "presences").is_empty());

    // A member never held (large guild) still leaves.
    apply(
        &cache,
        "GUILD_MEMBER_REMOVE",
        json!({"guild_id": guild_id, "user": {"id": "555"}}),
    );
    assert_eq!(state(&cache)["member_count"], json!(1));
    assert_eq!(cache.stats().members, 2);
}

#[test]
fn member_update_merges_the_sent_fields() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "GUILD_MEMBER_UPDATE",
        json!({"guild_id": guild_id, "user": {"id": "100", "username": "renamed"}, "roles": [],
               "nick": "boss", "avatar": null, "joined_at": "2025-01-01T00:00:00Z"}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "members", "100"),
        Some(
            &json!({"user": {"id": "100", "username": "renamed", "global_name": "Owner"},
                     "nick": "boss", "roles": [], "joined_at": "2025-01-01T00:00:00Z",
                     "deaf": false, "mute": false, "avatar": null})
        )
    );

    // An update for a member not held does not invent one.
    apply(
        &cache,
        "GUILD_MEMBER_UPDATE",
        json!({"guild_id": guild_id, "user": {"id": "777"}, "roles": [], "joined_at": null}),
    );
    assert_eq!(ids(&state(&cache), "members"), vec!["100", BOT]);
}

#[test]
fn members_chunk_adds_members_and_presences() {
    let cache = cache();
    apply(
        &cache,
        "GUILD_MEMBERS_CHUNK",
        json!({"guild_id": GUILD.to_string(), "chunk_index": 0, "chunk_count": 1, "nonce": "n",
               "members": [{"user": {"id": "102"}, "roles": [], "joined_at": null, "deaf": false, "mute": false},
                           {"user": {"id": "103"}, "roles": [], "joined_at": null, "deaf": false, "mute": false}],
               "presences": [{"user": {"id": "102"}, "status": "idle", "activities": [], "client_status": {}},
                             {"user": {"id": "103"}, "status": "offline", "activities": [], "client_status": {}}]}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "members"), vec!["100", "102", "103", BOT]);
    assert_eq!(ids(&s, "presences"), vec!["100", "102"]);
    // A chunk answers a request; it is no join.
    assert_eq!(s["member_count"], json!(2));
}

#[test]
fn presence_update_merges_and_offline_removes() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "PRESENCE_UPDATE",
        json!({"user": {"id": "100"}, "guild_id": guild_id, "status": "dnd",
               "activities": [{"name": "x", "type": 0}], "client_status": {"mobile": "dnd"}}),
    );
    let s = state(&cache);
    assert_eq!(
        entry(&s, "presences", "100"),
        Some(&json!({"user": {"id": "100"}, "status": "dnd",
                     "activities": [{"name": "x", "type": 0}], "client_status": {"mobile": "dnd"}}))
    );

    // A partial update keeps what it does not send; new user fields also
    // reach the member's user.
    apply(
        &cache,
        "PRESENCE_UPDATE",
        json!({"user": {"id": "100", "avatar": "newhash"}, "guild_id": guild_id, "status": "idle"}),
    );
    let s = state(&cache);
    let presence = entry(&s, "presences", "100").unwrap();
    assert_eq!(presence["status"], json!("idle"));
    assert_eq!(presence["activities"], json!([{"name": "x", "type": 0}]));
    let member = entry(&s, "members", "100").unwrap();
    assert_eq!(member["user"]["avatar"], json!("newhash"));
    assert_eq!(member["user"]["username"], json!("owner"));

    // A presence for someone not listed yet is added.
    apply(
        &cache,
        "PRESENCE_UPDATE",
        json!({"user": {"id": BOT}, "guild_id": guild_id, "status": "online", "activities": [], "client_status": {"web": "online"}}),
    );
    assert_eq!(ids(&state(&cache), "presences"), vec!["100", BOT]);

    apply(
        &cache,
        "PRESENCE_UPDATE",
        json!({"user": {"id": "100"}, "guild_id": guild_id, "status": "offline", "activities": [], "client_status": {}}),
    );
    assert_eq!(ids(&state(&cache), "presences"), vec![BOT]);
}

#[test]
fn voice_states_join_move_leave() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    let voice = |channel: Value| {
        json!({"guild_id": guild_id, "channel_id": channel, "user_id": "101", "session_id": "s2",
               "deaf": false, "mute": false, "self_deaf": false, "self_mute": false, "self_video": false,
               "suppress": false, "request_to_speak_timestamp": null,
               "member": {"user": {"id": "101", "username": "voicer"}, "roles": [], "joined_at": null, "deaf": false, "mute": false}})
    };
    apply(&cache, "VOICE_STATE_UPDATE", voice(json!("201")));
    let s = state(&cache);
    assert_eq!(ids(&s, "voice_states"), vec!["100", "101"]);
    let joined = entry(&s, "voice_states", "101").unwrap();
    // GUILD_CREATE's voice states carry neither guild_id nor member…
    assert_eq!(joined.get("guild_id"), None);
    assert_eq!(joined.get("member"), None);
    // …and the member is in the member list instead (no join counted).
    assert_eq!(
        entry(&s, "members", "101").unwrap()["user"]["username"],
        json!("voicer")
    );
    assert_eq!(s["member_count"], json!(2));

    apply(&cache, "VOICE_STATE_UPDATE", voice(json!("202")));
    assert_eq!(
        entry(&state(&cache), "voice_states", "101").unwrap()["channel_id"],
        json!("202")
    );

    apply(&cache, "VOICE_STATE_UPDATE", voice(Value::Null));
    assert_eq!(ids(&state(&cache), "voice_states"), vec!["100"]);
}

#[test]
fn stage_instances_create_update_delete() {
    let cache = cache();
    let stage = |topic: &str| {
        json!({"id": "900", "guild_id": GUILD.to_string(), "channel_id": "201", "topic": topic,
               "privacy_level": 2, "discoverable_disabled": false, "guild_scheduled_event_id": null})
    };
    apply(&cache, "STAGE_INSTANCE_CREATE", stage("a"));
    apply(&cache, "STAGE_INSTANCE_UPDATE", stage("b"));
    let s = state(&cache);
    assert_eq!(list(&s, "stage_instances"), &vec![stage("b")]);
    apply(&cache, "STAGE_INSTANCE_DELETE", stage("b"));
    assert!(ids(&state(&cache), "stage_instances").is_empty());
}

#[test]
fn scheduled_events_and_their_user_count() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    apply(
        &cache,
        "GUILD_SCHEDULED_EVENT_CREATE",
        json!({"id": "701", "guild_id": guild_id, "name": "talk", "status": 1, "entity_type": 1}),
    );
    apply(
        &cache,
        "GUILD_SCHEDULED_EVENT_UPDATE",
        json!({"id": "700", "guild_id": guild_id, "name": "party!", "status": 2, "entity_type": 3, "user_count": 3}),
    );
    let users = |t: &str, event: &str| {
        apply(
            &cache,
            t,
            json!({"guild_scheduled_event_id": event, "user_id": "100", "guild_id": guild_id}),
        );
    };
    users("GUILD_SCHEDULED_EVENT_USER_ADD", "700");
    users("GUILD_SCHEDULED_EVENT_USER_ADD", "700");
    users("GUILD_SCHEDULED_EVENT_USER_REMOVE", "700");
    // No user_count was sent for 701: none is invented.
    users("GUILD_SCHEDULED_EVENT_USER_ADD", "701");
    let s = state(&cache);
    let party = entry(&s, "guild_scheduled_events", "700").unwrap();
    assert_eq!(party["name"], json!("party!"));
    assert_eq!(party["user_count"], json!(4));
    assert_eq!(
        entry(&s, "guild_scheduled_events", "701")
            .unwrap()
            .get("user_count"),
        None
    );

    apply(
        &cache,
        "GUILD_SCHEDULED_EVENT_DELETE",
        json!({"id": "700", "guild_id": guild_id, "name": "party!", "status": 3, "entity_type": 3}),
    );
    assert_eq!(ids(&state(&cache), "guild_scheduled_events"), vec!["701"]);
}

#[test]
fn soundboard_sounds() {
    let cache = cache();
    let guild_id = GUILD.to_string();
    let sound = |id: &str, name: &str| {
        json!({"sound_id": id, "name": name, "volume": 0.5, "emoji_id": null, "emoji_name": null,
               "guild_id": guild_id, "available": true})
    };
    apply(
        &cache,
        "GUILD_SOUNDBOARD_SOUND_CREATE",
        sound("801", "honk"),
    );
    apply(
        &cache,
        "GUILD_SOUNDBOARD_SOUND_UPDATE",
        sound("801", "HONK"),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "soundboard_sounds"), vec!["800", "801"]);
    assert_eq!(
        entry(&s, "soundboard_sounds", "801"),
        Some(&sound("801", "HONK"))
    );

    // SOUNDS_UPDATE updates the sounds it names and keeps the others.
    apply(
        &cache,
        "GUILD_SOUNDBOARD_SOUNDS_UPDATE",
        json!({"guild_id": guild_id, "soundboard_sounds": [sound("800", "QUACK")]}),
    );
    let s = state(&cache);
    assert_eq!(ids(&s, "soundboard_sounds"), vec!["800", "801"]);
    assert_eq!(
        entry(&s, "soundboard_sounds", "800").unwrap()["name"],
        json!("QUACK")
    );

    apply(
        &cache,
        "GUILD_SOUNDBOARD_SOUND_DELETE",
        json!({"sound_id": "800", "guild_id": guild_id}),
    );
    assert_eq!(ids(&state(&cache), "soundboard_sounds"), vec!["801"]);

    // The answer to op 31 is the whole list.
    apply(
        &cache,
        "SOUNDBOARD_SOUNDS",
        json!({"guild_id": guild_id, "soundboard_sounds": [sound("802", "a"), sound("803", "b")]}),
    );
    assert_eq!(ids(&state(&cache), "soundboard_sounds"), vec!["802", "803"]);
}

#[test]
fn events_for_unknown_guilds_change_nothing() {
    let cache = StateCache::new();
    apply(
        &cache,
        "CHANNEL_CREATE",
        json!({"id": "1", "guild_id": "5", "type": 0}),
    );
    apply(
        &cache,
        "GUILD_MEMBER_ADD",
        json!({"guild_id": "5", "user": {"id": "1"}, "roles": []}),
    );
    apply(&cache, "GUILD_UPDATE", json!({"id": "5", "name": "x"}));
    assert_eq!(cache.guild_create(5), None);
    assert!(cache.shard_guilds(0).is_empty());
    assert_eq!(cache.stats().guilds, 0);
}

#[test]
fn malformed_payloads_are_ignored() {
    let cache = cache();
    let before = state(&cache);
    let guild_id = GUILD.to_string();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("GUILD_CREATE", b"{not json".to_vec()),
        ("GUILD_CREATE", b"".to_vec()),
        ("GUILD_CREATE", b"null".to_vec()),
        ("GUILD_CREATE", b"[1,2]".to_vec()),
        ("GUILD_CREATE", br#"{"name":"no id"}"#.to_vec()),
        ("GUILD_CREATE", br#"{"id":"x1"}"#.to_vec()),
        ("GUILD_CREATE", br#"{"id":{"nested":1}}"#.to_vec()),
        ("GUILD_CREATE", vec![0xff, 0xfe, b'{', b'}']),
        ("GUILD_UPDATE", format!(r#"{{"id":"{guild_id}","name":"x""#).into_bytes()),
        ("GUILD_DELETE", format!(r#"{{"id":"{guild_id}","unavailable":"yes"}}"#).into_bytes()),
        ("READY", br#"{"guilds":"all"}"#.to_vec()),
        ("CHANNEL_CREATE", format!(r#"{{"guild_id":"{guild_id}","name":"no id"}}"#).into_bytes()),
        ("CHANNEL_DELETE", format!(r#"{{"guild_id":{guild_id}}}"#).into_bytes()),
        ("THREAD_LIST_SYNC", format!(r#"{{"guild_id":"{guild_id}","threads":{{}}}}"#).into_bytes()),
        ("THREAD_MEMBERS_UPDATE", format!(r#"{{"guild_id":"{guild_id}","id":"600"}}"#).into_bytes()),
        ("GUILD_ROLE_CREATE", format!(r#"{{"guild_id":"{guild_id}","role":{{"name":"no id"}}}}"#).into_bytes()),
        ("GUILD_ROLE_DELETE", format!(r#"{{"guild_id":"{guild_id}"}}"#).into_bytes()),
        ("GUILD_EMOJIS_UPDATE", format!(r#"{{"guild_id":"{guild_id}","emojis":5}}"#).into_bytes()),
        ("GUILD_MEMBER_ADD", format!(r#"{{"guild_id":"{guild_id}","roles":[]}}"#).into_bytes()),
        ("GUILD_MEMBER_UPDATE", format!(r#"{{"guild_id":"{guild_id}","user":"100"}}"#).into_bytes()),
        ("GUILD_MEMBER_REMOVE", format!(r#"{{"guild_id":"{guild_id}","user":{{}}}}"#).into_bytes()),
        ("GUILD_MEMBERS_CHUNK", format!(r#"{{"guild_id":"{guild_id}","members":[{{"user":{{"id":"1"}}}}],"presences":[{{"status":"online"}}]}}"#).into_bytes()),
        ("PRESENCE_UPDATE", format!(r#"{{"guild_id":"{guild_id}","status":"online"}}"#).into_bytes()),
        ("PRESENCE_UPDATE", format!(r#"{{"guild_id":"{guild_id}","user":{{"id":"100"}},"status":"online""#).into_bytes()),
        ("VOICE_STATE_UPDATE", format!(r#"{{"guild_id":"{guild_id}","channel_id":"201"}}"#).into_bytes()),
        ("STAGE_INSTANCE_CREATE", format!(r#"{{"guild_id":"{guild_id}"}}"#).into_bytes()),
        ("GUILD_SCHEDULED_EVENT_USER_ADD", format!(r#"{{"guild_id":"{guild_id}"}}"#).into_bytes()),
        ("GUILD_SOUNDBOARD_SOUND_DELETE", format!(r#"{{"guild_id":"{guild_id}","sound_id":true}}"#).into_bytes()),
        ("SOUNDBOARD_SOUNDS", format!(r#"{{"guild_id":"{guild_id}","soundboard_sounds":5}}"#).into_bytes()),
    ];
    for (t, d) in &bad {
        cache.apply(0, t, d);
        assert_eq!(
            state(&cache),
            before,
            "{t} {} changed the cache",
            String::from_utf8_lossy(d)
        );
    }
    assert_eq!(cache.shard_guilds(0).len(), 1);
}

#[test]
fn a_list_entry_without_its_id_is_skipped_alone() {
    let cache = StateCache::new();
    let mut guild = guild_create();
    guild["channels"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": 0, "name": "no id"}));
    apply(&cache, "GUILD_CREATE", guild);
    assert_eq!(ids(&state(&cache), "channels"), vec!["200", "201"]);
}

#[test]
fn numeric_snowflakes_are_accepted() {
    let cache = cache();
    apply(
        &cache,
        "CHANNEL_CREATE",
        json!({"id": 211, "guild_id": GUILD, "type": 0}),
    );
    assert!(
        list(&state(&cache), "channels")
            .iter()
            .any(|channel| channel["id"] == json!(211))
    );
}

#[test]
fn stats_count_what_is_held() {
    let cache = cache();
    apply(
        &cache,
        "GUILD_CREATE",
        json!({"id": "5", "unavailable": true}),
    );
    let stats = cache.stats();
    assert_eq!(stats.guilds, 1);
    assert_eq!(stats.unavailable_guilds, 1);
    assert_eq!(stats.members, 2);
    assert_eq!(stats.presences, 1);
    assert_eq!(stats.entities, 13);
    let text = cache.guild_create(GUILD).unwrap();
    assert!(
        stats.bytes > text.len(),
        "{} <= {}",
        stats.bytes,
        text.len()
    );
}

#[test]
fn field_names_with_escapes_survive_a_merge() {
    let cache = cache();
    cache.apply(
        0,
        "GUILD_UPDATE",
        format!(r#"{{"id":"{GUILD}","na\u006de":"escaped","we\"ird":1}}"#).as_bytes(),
    );
    let s = state(&cache);
    assert_eq!(s["name"], json!("escaped"));
    assert_eq!(s["we\"ird"], json!(1));
}

#[test]
fn cache_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<StateCache>();
}

#[test]
fn shards_apply_and_clients_rebuild_concurrently() {
    let cache = Arc::new(StateCache::new());
    let threads: Vec<_> = (0..4u32)
        .map(|shard| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let guild_id = 1000 + u64::from(shard);
                let mut guild = guild_create();
                guild["id"] = json!(guild_id.to_string());
                guild["member_count"] = json!(0);
                guild["members"] = json!([]);
                cache.apply(shard, "GUILD_CREATE", guild.to_string().as_bytes());
                for user in 0..200 {
                    let member = json!({"guild_id": guild_id.to_string(), "user": {"id": user.to_string()},
                                        "roles": [], "joined_at": null, "deaf": false, "mute": false});
                    cache.apply(shard, "GUILD_MEMBER_ADD", member.to_string().as_bytes());
                    // Another shard's guild, read while its shard writes.
                    let other = 1000 + u64::from((shard + 1) % 4);
                    if let Some(text) = cache.guild_create(other) {
                        serde_json::from_str::<Value>(&text).expect("consistent JSON");
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("no panic");
    }
    for shard in 0..4u32 {
        let state: Value =
            serde_json::from_str(&cache.guild_create(1000 + u64::from(shard)).unwrap()).unwrap();
        assert_eq!(state["member_count"], json!(200));
        assert_eq!(state["members"].as_array().unwrap().len(), 200);
        assert_eq!(cache.shard_guilds(shard).len(), 1);
    }
}
