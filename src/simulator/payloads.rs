//! Realistic dispatch payloads (MESSAGE_CREATE, GUILD_CREATE, READY).

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

/// Milliseconds between the Unix epoch and the Discord epoch (2015-01-01).
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
/// A fixed "now" (2026-01-01) so payloads are reproducible for a seed.
const BASE_UNIX_MS: u64 = 1_767_225_600_000;

/// The simulated bot user / application id.
pub const BOT_USER_ID: &str = "1100000000000000001";

const WORDS: &[&str] = &[
    "the",
    "shard",
    "gateway",
    "ping",
    "pong",
    "latency",
    "guild",
    "channel",
    "hello",
    "world",
    "rust",
    "tokio",
    "async",
    "deploy",
    "today",
    "tomorrow",
    "maybe",
    "never",
    "always",
    "raid",
    "boss",
    "loot",
    "queue",
    "match",
    "ranked",
    "lol",
    "gg",
    "wp",
    "brb",
    "afk",
    "meeting",
    "coffee",
    "lunch",
    "pizza",
    "weekend",
    "server",
    "update",
    "patch",
    "notes",
    "release",
    "bug",
    "fix",
    "crash",
    "restart",
    "please",
    "thanks",
    "anyone",
    "here",
    "there",
    "why",
    "how",
    "what",
    "when",
    "music",
    "playlist",
    "stream",
    "video",
    "photo",
    "meme",
    "event",
    "tournament",
    "voice",
    "join",
    "leave",
    "kick",
    "ban",
    "role",
    "color",
    "emoji",
    "sticker",
    "reaction",
    "thread",
    "forum",
    "post",
    "reply",
    "mention",
    "everyone",
    "moderator",
    "admin",
    "welcome",
    "rules",
    "verify",
    "captcha",
    "giveaway",
    "winner",
    "prize",
    "vote",
    "poll",
];

const NAMES: &[&str] = &[
    "aurora", "blaze", "cobalt", "dusk", "ember", "frost", "glitch", "harbor", "ivy", "jade",
    "kestrel", "lumen", "mosaic", "nova", "onyx", "pixel", "quartz", "raven", "sable", "tundra",
];

/// A snowflake for a moment `ago_ms` before the fixed base time, with random low bits.
pub fn snowflake<R: Rng + ?Sized>(rng: &mut R, ago_ms: u64) -> u64 {
    let ts = BASE_UNIX_MS.saturating_sub(ago_ms) - DISCORD_EPOCH_MS;
    (ts << 22) | rng.random_range(0..(1u64 << 22))
}

pub(crate) fn iso_timestamp(unix_ms: u64) -> String {
    // Civil-from-days (Howard Hinnant), UTC.
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}000+00:00",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn sentence<R: Rng + ?Sized>(rng: &mut R, target: usize) -> String {
    let mut s = String::with_capacity(target + 16);
    while s.len() < target {
        if !s.is_empty() {
            s.push(if rng.random_ratio(1, 12) { '\n' } else { ' ' });
        }
        let w = WORDS[rng.random_range(0..WORDS.len())];
        if rng.random_ratio(1, 15) {
            s.push_str(&rng.random_range(0..100_000u32).to_string());
        } else {
            s.push_str(w);
        }
        if rng.random_ratio(1, 10) {
            s.push(['!', '?', '.', ','][rng.random_range(0..4)]);
        }
    }
    s.truncate(target);
    s
}

fn message_value<R: Rng + ?Sized>(rng: &mut R, content: &str, guild_id: Option<u64>) -> Value {
    let ago = rng.random_range(0..86_400_000u64);
    let id = snowflake(rng, ago);
    let author_age = 1_000_000_000 + rng.random_range(0..10_000_000_000u64);
    let author_id = snowflake(rng, author_age);
    let channel_id = snowflake(rng, 2_000_000_000);
    let guild_id = guild_id.unwrap_or_else(|| snowflake(rng, 3_000_000_000));
    let name = format!(
        "{}{}",
        NAMES[rng.random_range(0..NAMES.len())],
        rng.random_range(0..10_000u32)
    );
    let ts = iso_timestamp(BASE_UNIX_MS - ago);
    json!({
        "type": 0,
        "tts": false,
        "timestamp": ts,
        "pinned": false,
        "nonce": rng.random_range(0..u64::MAX >> 1).to_string(),
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": false,
        "member": {
            "roles": [snowflake(rng, 2_500_000_000).to_string()],
            "premium_since": null,
            "pending": false,
            "nick": null,
            "mute": false,
            "joined_at": iso_timestamp(BASE_UNIX_MS - 1_000_000_000 - ago),
            "flags": 0,
            "deaf": false,
            "communication_disabled_until": null,
            "banner": null,
            "avatar": null
        },
        "id": id.to_string(),
        "flags": 0,
        "embeds": [],
        "edited_timestamp": null,
        "content": content,
        "components": [],
        "channel_id": channel_id.to_string(),
        "author": {
            "username": name,
            "public_flags": 0,
            "id": author_id.to_string(),
            "global_name": name.to_uppercase(),
            "discriminator": "0",
            "clan": null,
            "avatar_decoration_data": null,
            "avatar": format!("{:032x}", rng.random::<u128>()),
        },
        "attachments": [],
        "guild_id": guild_id.to_string(),
    })
}

/// A realistic MESSAGE_CREATE `d` object serialized to JSON, about `size` bytes long
/// (never shorter than the fixed fields, roughly 900 bytes).
pub fn message_create_payload<R: Rng + ?Sized>(rng: &mut R, size: usize) -> String {
    message_create_payload_in(rng, size, None)
}

/// [`message_create_payload`] with a reproducible seed.
pub fn message_create_payload_seeded(seed: u64, size: usize) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    message_create_payload(&mut rng, size)
}

pub(crate) fn message_create_payload_in<R: Rng + ?Sized>(
    rng: &mut R,
    size: usize,
    guild_id: Option<u64>,
) -> String {
    let mut v = message_value(rng, "", guild_id);
    let base = v.to_string().len();
    let want = size.saturating_sub(base).max(1);
    v["content"] = Value::String(sentence(rng, want));
    v.to_string()
}

/// Guild ids that route to `shard` out of `total`: `(id >> 22) % total == shard`.
pub fn guild_ids_for_shard(shard: u32, total: u32, count: u32) -> Vec<u64> {
    let total = u64::from(total.max(1));
    let base_ts: u64 = 300_000_000_000 / total * total;
    (0..u64::from(count))
        .map(|k| {
            let ts = base_ts + u64::from(shard) + k * total;
            (ts << 22) | (k & 0xfff)
        })
        .collect()
}
