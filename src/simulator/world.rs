//! The simulated Discord world: the bot user, its application and every guild, generated
//! deterministically from ids so that READY, GUILD_CREATE, the REST routes and
//! GUILD_MEMBERS_CHUNK agree with each other across connections and sessions.
//!
//! Ids: a guild id (see [`super::guild_ids_for_shard`]) has bits 12..22 clear; every entity
//! of the guild (channel, role, emoji, member user …) has the guild's id with its own
//! index in those bits ([`entity_id`]), so [`guild_of`] finds an entity's guild without a
//! table, and the entity's shard is the guild's shard.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::payloads::{BOT_USER_ID, iso_timestamp};

/// Milliseconds between the Unix epoch and the Discord epoch (2015-01-01).
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
/// A fixed "now" (2026-01-01) for joined_at and other past timestamps.
const BASE_UNIX_MS: u64 = 1_767_225_600_000;

/// Username of the simulated bot.
pub const BOT_USERNAME: &str = "shardwarden-sim";

/// Intent bits that change what GUILD_CREATE and member chunks carry.
const GUILD_PRESENCES: u64 = 1 << 8;

// Entity indexes inside a guild.
const TEXT_CATEGORY: u64 = 1;
const GENERAL: u64 = 2;
const RANDOM: u64 = 3;
const BOT_COMMANDS: u64 = 4;
const VOICE_CATEGORY: u64 = 5;
const VOICE: u64 = 6;
const THREAD: u64 = 7;
const MOD_ROLE: u64 = 11;
const BOT_ROLE: u64 = 12;
const EMOJI: u64 = 20;
const STICKER: u64 = 21;
const SCHEDULED_EVENT: u64 = 22;
const SOUND: u64 = 23;
const FIRST_HUMAN: u64 = 100;
/// Human members per guild (besides the bot).
pub const HUMANS_PER_GUILD: u64 = 4;

const ENTITY_SHIFT: u32 = 12;
const ENTITY_MASK: u64 = 0x3ff << ENTITY_SHIFT;

const NAMES: &[&str] = &[
    "aurora", "blaze", "cobalt", "dusk", "ember", "frost", "glitch", "harbor", "ivy", "jade",
    "kestrel", "lumen", "mosaic", "nova", "onyx", "pixel", "quartz", "raven", "sable", "tundra",
];
const TOPICS: &[&str] = &[
    "raid", "music", "rust", "pizza", "ranked", "memes", "patch", "coffee", "forum", "lounge",
];

/// The id of entity `index` (1..1024) of `guild_id`.
pub fn entity_id(guild_id: u64, index: u64) -> u64 {
    (guild_id & !ENTITY_MASK) | ((index & 0x3ff) << ENTITY_SHIFT)
}

/// The guild an entity id (or a guild id) belongs to.
pub fn guild_of(id: u64) -> u64 {
    id & !ENTITY_MASK
}

fn guild_rng(guild_id: u64) -> StdRng {
    StdRng::seed_from_u64(guild_id ^ 0x0005_eed0_fd15_c0bd)
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(BASE_UNIX_MS)
}

/// A fresh snowflake for "now" (strictly increasing within this process).
pub fn new_snowflake() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ms = unix_now_ms().saturating_sub(DISCORD_EPOCH_MS);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (ms << 22) | (n & 0x3f_ffff)
}

/// The ISO 8601 timestamp a snowflake encodes.
pub fn snowflake_timestamp(id: u64) -> String {
    iso_timestamp((id >> 22) + DISCORD_EPOCH_MS)
}

/// The bot's user object as `GET /users/@me` returns it.
pub fn bot_user() -> Value {
    json!({
        "id": BOT_USER_ID,
        "username": BOT_USERNAME,
        "discriminator": "0",
        "global_name": null,
        "avatar": null,
        "avatar_decoration_data": null,
        "collectibles": null,
        "primary_guild": null,
        "banner": null,
        "accent_color": null,
        "bot": true,
        "system": false,
        "verified": true,
        "mfa_enabled": false,
        "locale": "en-US",
        "email": null,
        "flags": 0,
        "public_flags": 0,
        "premium_type": 0,
        "bio": ""
    })
}

/// The bot's user as it appears inside messages and members (a partial user).
pub fn bot_user_partial() -> Value {
    json!({
        "id": BOT_USER_ID,
        "username": BOT_USERNAME,
        "discriminator": "0",
        "global_name": null,
        "avatar": null,
        "avatar_decoration_data": null,
        "collectibles": null,
        "primary_guild": null,
        "bot": true,
        "public_flags": 0
    })
}

fn owner_user() -> Value {
    json!({
        "id": "1100000000000000002",
        "username": "sim-owner",
        "discriminator": "0",
        "global_name": "Sim Owner",
        "avatar": null,
        "avatar_decoration_data": null,
        "collectibles": null,
        "primary_guild": null,
        "public_flags": 0,
        "flags": 0
    })
}

/// The application object of `GET /oauth2/applications/@me` (and `/applications/@me`).
pub fn application() -> Value {
    json!({
        "id": BOT_USER_ID,
        "name": BOT_USERNAME,
        "icon": null,
        "description": "The bot of shardwarden's embedded Discord simulator",
        "summary": "",
        "type": null,
        "hook": true,
        "bot_public": false,
        "bot_require_code_grant": false,
        "verify_key": "6b8e6f1d0a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5",
        "flags": 0,
        "owner": owner_user(),
        "team": null,
        "bot": bot_user_partial(),
        "rpc_origins": [],
        "redirect_uris": [],
        "interactions_endpoint_url": null,
        "role_connections_verification_url": null,
        "event_webhooks_url": null,
        "event_webhooks_status": 1,
        "tags": [],
        "install_params": {"scopes": ["bot", "applications.commands"], "permissions": "117824"},
        "integration_types_config": {"0": {"oauth2_install_params": {"scopes": ["bot", "applications.commands"], "permissions": "117824"}}},
        "custom_install_url": null,
        "approximate_guild_count": 0,
        "approximate_user_install_count": 0,
        "is_monetized": false,
        "is_verified": false,
        "is_discoverable": false,
        "storefront_available": false
    })
}

/// One human member's user object.
fn human_user(guild_id: u64, i: u64) -> Value {
    let mut rng = guild_rng(guild_id ^ (i << 40));
    let name = format!(
        "{}{}",
        NAMES[rng.random_range(0..NAMES.len())],
        rng.random_range(0..10_000u32)
    );
    json!({
        "id": entity_id(guild_id, FIRST_HUMAN + i).to_string(),
        "username": name,
        "discriminator": "0",
        "global_name": name.to_uppercase(),
        "avatar": format!("{:032x}", rng.random::<u128>()),
        "avatar_decoration_data": null,
        "collectibles": null,
        "primary_guild": null,
        "public_flags": 0
    })
}

fn joined_at(guild_id: u64, i: u64) -> String {
    iso_timestamp(BASE_UNIX_MS - 40_000_000_000 + (guild_id % 1_000_000) * 1000 + i * 86_400_000)
}

fn member(user: Value, roles: Vec<String>, joined: String) -> Value {
    json!({
        "user": user,
        "nick": null,
        "avatar": null,
        "banner": null,
        "roles": roles,
        "joined_at": joined,
        "premium_since": null,
        "deaf": false,
        "mute": false,
        "flags": 0,
        "pending": false,
        "communication_disabled_until": null,
        "avatar_decoration_data": null,
        "collectibles": null
    })
}

/// Every member of the guild, the bot first (full member objects with users).
pub fn members(guild_id: u64) -> Vec<Value> {
    let mut out = Vec::with_capacity(1 + HUMANS_PER_GUILD as usize);
    out.push(member(
        bot_user_partial(),
        vec![entity_id(guild_id, BOT_ROLE).to_string()],
        iso_timestamp(BASE_UNIX_MS - 50_000_000),
    ));
    for i in 0..HUMANS_PER_GUILD {
        let roles = if i == 0 {
            vec![entity_id(guild_id, MOD_ROLE).to_string()]
        } else {
            vec![]
        };
        out.push(member(
            human_user(guild_id, i),
            roles,
            joined_at(guild_id, i),
        ));
    }
    out
}

fn role(guild_id: u64, id: u64, name: &str, perms: &str, position: u32, color: u32) -> Value {
    let mut r = json!({
        "id": id.to_string(),
        "name": name,
        "description": null,
        "color": color,
        "colors": {"primary_color": color, "secondary_color": null, "tertiary_color": null},
        "hoist": false,
        "icon": null,
        "unicode_emoji": null,
        "position": position,
        "permissions": perms,
        "managed": false,
        "mentionable": false,
        "flags": 0
    });
    if id == entity_id(guild_id, BOT_ROLE) {
        r["managed"] = json!(true);
        r["tags"] = json!({"bot_id": BOT_USER_ID});
    }
    r
}

fn channel(id: u64, kind: u8, name: &str, position: u32, parent: Option<u64>) -> Value {
    let mut c = json!({
        "id": id.to_string(),
        "type": kind,
        "name": name,
        "position": position,
        "permission_overwrites": [],
        "flags": 0,
        "parent_id": parent.map(|p| p.to_string()),
    });
    match kind {
        0 => {
            c["topic"] = Value::Null;
            c["nsfw"] = json!(false);
            c["last_message_id"] = Value::Null;
            c["rate_limit_per_user"] = json!(0);
            c["default_thread_rate_limit_per_user"] = json!(0);
            c["default_auto_archive_duration"] = json!(1440);
        }
        2 => {
            c["nsfw"] = json!(false);
            c["last_message_id"] = Value::Null;
            c["rate_limit_per_user"] = json!(0);
            c["bitrate"] = json!(64000);
            c["user_limit"] = json!(0);
            c["rtc_region"] = Value::Null;
            c["voice_background_display"] = Value::Null;
        }
        _ => {}
    }
    c
}

/// The guild's channels (categories, text and voice; threads are separate).
pub fn channels(guild_id: u64) -> Vec<Value> {
    let mut rng = guild_rng(guild_id);
    let topic = TOPICS[rng.random_range(0..TOPICS.len())];
    let text_cat = entity_id(guild_id, TEXT_CATEGORY);
    let voice_cat = entity_id(guild_id, VOICE_CATEGORY);
    let mut general = channel(
        entity_id(guild_id, GENERAL),
        0,
        "general",
        0,
        Some(text_cat),
    );
    general["topic"] = json!(format!("Talk about {topic}"));
    let mut random = channel(entity_id(guild_id, RANDOM), 0, topic, 1, Some(text_cat));
    // @everyone may not add reactions here; moderators may manage messages.
    random["permission_overwrites"] = json!([
        {"id": guild_id.to_string(), "type": 0, "allow": "0", "deny": "64"},
        {"id": entity_id(guild_id, MOD_ROLE).to_string(), "type": 0, "allow": "8192", "deny": "0"}
    ]);
    let mut bot_commands = channel(
        entity_id(guild_id, BOT_COMMANDS),
        0,
        "bot-commands",
        2,
        Some(text_cat),
    );
    bot_commands["permission_overwrites"] = json!([
        {"id": BOT_USER_ID, "type": 1, "allow": "3072", "deny": "0"}
    ]);
    vec![
        channel(text_cat, 4, "Text Channels", 0, None),
        general,
        random,
        bot_commands,
        channel(voice_cat, 4, "Voice Channels", 1, None),
        channel(entity_id(guild_id, VOICE), 2, "General", 0, Some(voice_cat)),
    ]
}

/// Ids of the guild's text channels (where messages can be posted).
pub fn text_channel_ids(guild_id: u64) -> Vec<u64> {
    [GENERAL, RANDOM, BOT_COMMANDS]
        .iter()
        .map(|i| entity_id(guild_id, *i))
        .collect()
}

/// Id of the guild's active thread (a public thread in #general).
pub fn thread_id(guild_id: u64) -> u64 {
    entity_id(guild_id, THREAD)
}

fn threads(guild_id: u64) -> Vec<Value> {
    let created = joined_at(guild_id, 9);
    vec![json!({
        "id": thread_id(guild_id).to_string(),
        "guild_id": guild_id.to_string(),
        "parent_id": entity_id(guild_id, GENERAL).to_string(),
        "owner_id": entity_id(guild_id, FIRST_HUMAN).to_string(),
        "type": 11,
        "name": "weekly planning",
        "last_message_id": null,
        "message_count": 3,
        "member_count": 2,
        "total_message_sent": 3,
        "rate_limit_per_user": 0,
        "flags": 0,
        "thread_metadata": {
            "archived": false,
            "auto_archive_duration": 10080,
            "archive_timestamp": created,
            "locked": false,
            "create_timestamp": created
        }
    })]
}

/// Is `channel_id` a channel (text, voice, category) or thread of the world's guild `guild_id`?
pub fn channel_object(guild_id: u64, channel_id: u64) -> Option<Value> {
    if guild_of(channel_id) != guild_id {
        return None;
    }
    let mut c = channels(guild_id)
        .into_iter()
        .chain(threads(guild_id))
        .find(|c| c["id"].as_str() == Some(channel_id.to_string().as_str()))?;
    c["guild_id"] = json!(guild_id.to_string());
    Some(c)
}

/// Is `channel_id` a channel messages can be posted in (text channel or thread)?
pub fn is_messageable(channel_id: u64) -> bool {
    let g = guild_of(channel_id);
    text_channel_ids(g).contains(&channel_id) || thread_id(g) == channel_id
}

/// A GUILD_CREATE `d` for `guild_id`, as Discord sends it to a bot with `intents`.
/// Without GUILD_PRESENCES, members are only the bot and members in voice channels, and
/// presences are empty (as on Discord).
pub fn guild_create(guild_id: u64, intents: u64) -> Value {
    let mut rng = guild_rng(guild_id);
    let name = format!(
        "{} {}",
        NAMES[rng.random_range(0..NAMES.len())],
        TOPICS[rng.random_range(0..TOPICS.len())]
    );
    let g = guild_id.to_string();
    let all_members = members(guild_id);
    let voice_user = entity_id(guild_id, FIRST_HUMAN + 1).to_string();
    let with_presences = intents & GUILD_PRESENCES != 0;
    let member_list: Vec<Value> = if with_presences {
        all_members.clone()
    } else {
        all_members
            .iter()
            .filter(|m| {
                let id = m["user"]["id"].as_str().unwrap_or("");
                id == BOT_USER_ID || id == voice_user
            })
            .cloned()
            .collect()
    };
    let presences: Vec<Value> = if with_presences {
        all_members
            .iter()
            .skip(1)
            .take(2)
            .map(|m| {
                json!({
                    "user": {"id": m["user"]["id"]},
                    "status": "online",
                    "activities": [],
                    "client_status": {"desktop": "online"},
                    "broadcast": null
                })
            })
            .collect()
    } else {
        vec![]
    };
    let creator = human_user(guild_id, 0);
    let owner_id = entity_id(guild_id, FIRST_HUMAN).to_string();
    let mut guild = json!({
        "id": g,
        "name": name,
        "icon": null,
        "icon_hash": null,
        "splash": null,
        "discovery_splash": null,
        "banner": null,
        "description": null,
        "owner_id": owner_id,
        "region": "deprecated",
        "afk_channel_id": null,
        "afk_timeout": 300,
        "widget_enabled": false,
        "widget_channel_id": null,
        "verification_level": 1,
        "default_message_notifications": 1,
        "explicit_content_filter": 0,
        "features": [],
        "mfa_level": 0,
        "application_id": null,
        "system_channel_id": entity_id(guild_id, GENERAL).to_string(),
        "system_channel_flags": 0,
        "rules_channel_id": null
    });
    let limits = json!({
        "max_presences": null,
        "max_members": 500_000,
        "vanity_url_code": null,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "preferred_locale": "en-US",
        "public_updates_channel_id": null,
        "max_video_channel_users": 25,
        "max_stage_video_channel_users": 50,
        "nsfw_level": 0,
        "nsfw": false,
        "premium_progress_bar_enabled": false,
        "safety_alerts_channel_id": null,
        "incidents_data": null,
        "hub_type": null,
        "latest_onboarding_question_id": null,
        "home_header": null,
        "inventory_settings": null,
        "version": 1_767_225_600_000u64,
        "embedded_activities": [],
        "activity_instances": [],
        "application_command_counts": {}
    });
    let rest = json!({
        "lazy": true,
        "large": false,
        "unavailable": false,
        "member_count": all_members.len(),
        "joined_at": iso_timestamp(BASE_UNIX_MS - 50_000_000),
        "roles": [
            role(guild_id, guild_id, "@everyone", "2222085186637377", 0, 0),
            role(guild_id, entity_id(guild_id, MOD_ROLE), "Moderator", "1099511635974", 2, 3_447_003),
            role(guild_id, entity_id(guild_id, BOT_ROLE), BOT_USERNAME, "117824", 1, 0),
        ],
        "emojis": [{
            "id": entity_id(guild_id, EMOJI).to_string(),
            "name": "sim_wave",
            "roles": [],
            "require_colons": true,
            "managed": false,
            "animated": false,
            "available": true
        }],
        "stickers": [{
            "id": entity_id(guild_id, STICKER).to_string(),
            "name": "sim-sticker",
            "tags": "wave",
            "type": 2,
            "format_type": 1,
            "description": "A simulated sticker",
            "asset": "",
            "available": true,
            "guild_id": g
        }],
        "channels": channels(guild_id),
        "threads": threads(guild_id),
        "members": member_list,
        "presences": presences,
        "voice_states": [{
            "channel_id": entity_id(guild_id, VOICE).to_string(),
            "user_id": voice_user,
            "session_id": format!("{:032x}", guild_rng(guild_id ^ 7).random::<u128>()),
            "deaf": false,
            "mute": false,
            "self_deaf": false,
            "self_mute": true,
            "self_video": false,
            "self_stream": false,
            "suppress": false,
            "request_to_speak_timestamp": null
        }],
        "stage_instances": [],
        "guild_scheduled_events": [{
            "id": entity_id(guild_id, SCHEDULED_EVENT).to_string(),
            "guild_id": g,
            "channel_id": entity_id(guild_id, VOICE).to_string(),
            "creator_id": creator["id"],
            "creator": creator,
            "name": "Game night",
            "description": "Bring snacks",
            "scheduled_start_time": iso_timestamp(BASE_UNIX_MS + 63_072_000_000),
            "scheduled_end_time": null,
            "privacy_level": 2,
            "status": 1,
            "entity_type": 2,
            "entity_id": null,
            "entity_metadata": null,
            "user_count": 3,
            "image": null,
            "recurrence_rule": null
        }],
        "soundboard_sounds": [{
            "sound_id": entity_id(guild_id, SOUND).to_string(),
            "name": "airhorn",
            "volume": 1.0,
            "emoji_id": null,
            "emoji_name": "\u{1f4ef}",
            "guild_id": g,
            "available": true,
            "user": human_user(guild_id, 0)
        }]
    });
    if let Some(o) = guild.as_object_mut() {
        for part in [limits, rest] {
            if let Value::Object(p) = part {
                o.extend(p);
            }
        }
    }
    guild
}

/// The members an op 8 Request Guild Members asks for: `query` is a case-insensitive
/// username prefix (`""` = everyone), `user_ids` picks ids, `limit` 0 = no limit.
/// Returns (members, not_found ids).
pub fn request_members(
    guild_id: u64,
    query: Option<&str>,
    user_ids: &[String],
    limit: usize,
) -> (Vec<Value>, Vec<String>) {
    let all = members(guild_id);
    if !user_ids.is_empty() {
        let mut found = Vec::new();
        let mut not_found = Vec::new();
        for id in user_ids.iter().take(100) {
            match all.iter().find(|m| m["user"]["id"].as_str() == Some(id)) {
                Some(m) => found.push(m.clone()),
                None => not_found.push(id.clone()),
            }
        }
        return (found, not_found);
    }
    let q = query.unwrap_or("").to_lowercase();
    let cap = if q.is_empty() && limit == 0 {
        usize::MAX
    } else if limit == 0 {
        100
    } else {
        limit.min(if q.is_empty() { usize::MAX } else { 100 })
    };
    let found = all
        .into_iter()
        .filter(|m| {
            m["user"]["username"]
                .as_str()
                .is_some_and(|u| u.to_lowercase().starts_with(&q))
        })
        .take(cap)
        .collect();
    (found, Vec::new())
}

/// A message object as `POST /channels/{id}/messages` returns it for the bot.
pub fn bot_message(channel_id: u64, content: &str, nonce: Option<&Value>, tts: bool) -> Value {
    let id = new_snowflake();
    let mut m = json!({
        "type": 0,
        "id": id.to_string(),
        "channel_id": channel_id.to_string(),
        "author": bot_user_partial(),
        "content": content,
        "timestamp": snowflake_timestamp(id),
        "edited_timestamp": null,
        "tts": tts,
        "mention_everyone": false,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "components": [],
        "pinned": false,
        "flags": 0
    });
    if let Some(n) = nonce {
        m["nonce"] = n.clone();
    }
    m
}

/// A message from one of the guild's human members in `channel_id`, as MESSAGE_CREATE `d`.
pub fn member_message(channel_id: u64, content: &str) -> Value {
    let guild_id = guild_of(channel_id);
    let id = new_snowflake();
    let author = human_user(guild_id, id % HUMANS_PER_GUILD);
    let mut m = bot_message(channel_id, content, None, false);
    m["id"] = json!(id.to_string());
    m["timestamp"] = json!(snowflake_timestamp(id));
    m["author"] = author;
    gateway_message(m, guild_id)
}

/// Adds what the gateway's MESSAGE_CREATE carries beyond the REST message object.
pub fn gateway_message(mut m: Value, guild_id: u64) -> Value {
    let author_id = m["author"]["id"].as_str().unwrap_or("").to_string();
    let member = members(guild_id)
        .into_iter()
        .find(|mm| mm["user"]["id"].as_str() == Some(author_id.as_str()));
    m["guild_id"] = json!(guild_id.to_string());
    if let Some(mut member) = member {
        if let Some(o) = member.as_object_mut() {
            o.remove("user");
        }
        m["member"] = member;
    }
    m
}
