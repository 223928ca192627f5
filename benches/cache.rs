//! The state cache (issue 10, "Measure"): memory per guild and per member
//! against the raw GUILD_CREATE bytes, and the time to rebuild every
//! GUILD_CREATE, for a realistic guild mix.
//!
//! The mix: `BENCH_GUILDS` (default 1,000) guilds whose member counts run
//! from 50 to 5,000, skewed small as real bots' guilds are (median ≈ 170,
//! mean ≈ 680); each with 10–60 channels, 5–50 roles, emojis, stickers, a few
//! threads, voice states, scheduled events and sounds, and a presence for a
//! quarter of its members. Members carry full user objects, as in
//! GUILD_CREATE.
//!
//! Memory is what the cache's allocations hold (a counting allocator: bytes
//! requested and blocks live), measured twice: guilds with their members and
//! presences, and the same guilds without. The difference divided by the
//! member count is the cost of one member (with its share of presences); the
//! second run divided by the guild count is the cost of a guild's other
//! state. Generated payloads are dropped before each reading.
//!
//! Times are the bench thread's CPU time, median of `BENCH_ROUNDS` (default 5).
//!
//! A run on the 2-core build machine (2026-12-02), 1,000 guilds, 628,836
//! members, 356 MiB of GUILD_CREATE:
//!
//! | | raw GUILD_CREATE | cache heap | ratio |
//! |---|---|---|---|
//! | per member (user, ¼ presence) | 555 B | 603 B | 1.09 |
//! | per guild without members | 24.0 KiB | 28.9 KiB | 1.20 |
//! | all guilds | 356 MiB | 390 MiB | 1.09 |
//!
//! Rebuilding all 1,000 GUILD_CREATEs: 85 ms CPU (85 µs per guild, 4.2 GB/s);
//! applying them: 0.93 s; a held member's PRESENCE_UPDATE or
//! GUILD_MEMBER_UPDATE: 1.6 µs; `tracks("MESSAGE_CREATE")`: 1.7 ns.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardwarden::frontdoor::cache::StateCache;

use common::{env_count, median, result, thread_cpu_ns};

struct Counting;

/// Bytes currently allocated.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
/// Blocks currently allocated.
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> (i64, i64) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_BLOCKS.load(Ordering::Relaxed),
    )
}

/// Members of guild `i`: 50 to 5,000, skewed towards small guilds.
fn member_count(rng: &mut StdRng) -> usize {
    let u: f64 = rng.random();
    (50.0 * 100f64.powf(u * u)) as usize
}

fn snowflake(rng: &mut StdRng) -> u64 {
    let ms: u64 = rng.random_range(100_000_000_000..300_000_000_000);
    (ms << 22) | rng.random_range(0..1 << 22)
}

/// One guild's GUILD_CREATE `d`, as Discord would send it; with or without
/// its members and presences. The same seed gives the same guild either way.
fn guild_create(seed: u64, with_members: bool) -> (u64, String, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let id = snowflake(&mut rng);
    let members = member_count(&mut rng);
    let mut d = String::with_capacity(members * 600 + 20_000);
    let roles: Vec<u64> = (0..rng.random_range(5..50))
        .map(|_| snowflake(&mut rng))
        .collect();
    let channels: Vec<u64> = (0..rng.random_range(10..60))
        .map(|_| snowflake(&mut rng))
        .collect();
    write!(
        d,
        r#"{{"id":"{id}","name":"Guild {seed}","icon":"{:032x}","splash":null,"discovery_splash":null,"owner_id":"{}","afk_channel_id":null,"afk_timeout":300,"widget_enabled":false,"verification_level":1,"default_message_notifications":1,"explicit_content_filter":2,"features":["COMMUNITY","NEWS","ANIMATED_ICON"],"mfa_level":0,"system_channel_id":"{}","system_channel_flags":0,"rules_channel_id":"{}","max_members":500000,"vanity_url_code":null,"description":null,"banner":null,"premium_tier":1,"premium_subscription_count":4,"preferred_locale":"en-US","public_updates_channel_id":"{}","nsfw_level":0,"premium_progress_bar_enabled":false,"safety_alerts_channel_id":null,"incidents_data":null,"application_id":null,"lazy":true,"large":{},"joined_at":"2025-03-04T05:06:07.890000+00:00","unavailable":false,"member_count":{members}"#,
        rng.random::<u128>(),
        snowflake(&mut rng),
        channels[0],
        channels[0],
        channels[0],
        members > 250,
    )
    .unwrap();
    d.push_str(r#","roles":["#);
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{role}","name":"role {i}","description":null,"permissions":"{}","position":{i},"color":{},"colors":{{"primary_color":0,"secondary_color":null,"tertiary_color":null}},"hoist":false,"managed":false,"mentionable":true,"icon":null,"unicode_emoji":null,"flags":0}}"#,
            rng.random::<u32>(), rng.random_range(0..1 << 24)).unwrap();
    }
    d.push_str(r#"],"emojis":["#);
    for i in 0..rng.random_range(0..50) {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{}","name":"emoji_{i}","roles":[],"require_colons":true,"managed":false,"animated":false,"available":true}}"#, snowflake(&mut rng)).unwrap();
    }
    d.push_str(r#"],"stickers":["#);
    for i in 0..rng.random_range(0..5) {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{}","name":"sticker {i}","tags":"smile","type":2,"format_type":1,"description":null,"available":true,"guild_id":"{id}"}}"#, snowflake(&mut rng)).unwrap();
    }
    d.push_str(r#"],"channels":["#);
    for (i, channel) in channels.iter().enumerate() {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{channel}","type":{},"name":"channel-{i}","position":{i},"parent_id":null,"flags":0,"topic":"what channel {i} is for","nsfw":false,"last_message_id":"{}","rate_limit_per_user":0,"permission_overwrites":[{{"id":"{}","type":0,"allow":"1024","deny":"0"}}]}}"#,
            if i % 5 == 4 { 2 } else { 0 }, snowflake(&mut rng), roles[0]).unwrap();
    }
    d.push_str(r#"],"threads":["#);
    for i in 0..rng.random_range(0..5) {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{}","guild_id":"{id}","parent_id":"{}","owner_id":"{}","type":11,"name":"thread {i}","last_message_id":null,"message_count":3,"member_count":2,"rate_limit_per_user":0,"flags":0,"total_message_sent":3,"thread_metadata":{{"archived":false,"auto_archive_duration":1440,"archive_timestamp":"2026-01-01T00:00:00.000000+00:00","locked":false,"create_timestamp":"2026-01-01T00:00:00.000000+00:00"}}}}"#,
            snowflake(&mut rng), channels[0], snowflake(&mut rng)).unwrap();
    }
    let users: Vec<u64> = (0..members).map(|_| snowflake(&mut rng)).collect();
    d.push_str(r#"],"members":["#);
    if with_members {
        for (i, user) in users.iter().enumerate() {
            if i > 0 {
                d.push(',');
            }
            write!(d, r#"{{"user":{{"id":"{user}","username":"user{user}","global_name":"User {i}","avatar":"{:032x}","discriminator":"0","public_flags":0,"avatar_decoration_data":null,"banner":null,"clan":null,"primary_guild":null,"collectibles":null}},"nick":null,"avatar":null,"banner":null,"roles":["{}"],"joined_at":"2025-06-07T08:09:10.111000+00:00","premium_since":null,"deaf":false,"mute":false,"pending":false,"flags":0,"communication_disabled_until":null}}"#,
                rng.random::<u128>(), roles[i % roles.len()]).unwrap();
        }
    }
    d.push_str(r#"],"presences":["#);
    if with_members {
        for (i, user) in users.iter().step_by(4).enumerate() {
            if i > 0 {
                d.push(',');
            }
            write!(d, r#"{{"user":{{"id":"{user}"}},"status":"online","client_status":{{"desktop":"online"}},"broadcast":null,"activities":[{{"type":0,"name":"Game {i}","id":"{:x}","created_at":1780000000000}}]}}"#,
                rng.random::<u64>()).unwrap();
        }
    }
    d.push_str(r#"],"voice_states":["#);
    let in_voice = rng.random_range(0..4);
    for (i, user) in users.iter().take(in_voice).enumerate() {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"channel_id":"{}","user_id":"{user}","session_id":"{:032x}","deaf":false,"mute":false,"self_deaf":false,"self_mute":true,"self_video":false,"self_stream":false,"suppress":false,"request_to_speak_timestamp":null}}"#,
            channels[4 % channels.len()], rng.random::<u128>()).unwrap();
    }
    d.push_str(r#"],"stage_instances":[],"guild_scheduled_events":["#);
    for i in 0..rng.random_range(0..3) {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"id":"{}","guild_id":"{id}","channel_id":null,"creator_id":"{}","name":"event {i}","description":null,"scheduled_start_time":"2026-12-24T18:00:00+00:00","scheduled_end_time":"2026-12-24T20:00:00+00:00","privacy_level":2,"status":1,"entity_type":3,"entity_id":null,"entity_metadata":{{"location":"online"}},"recurrence_rule":null,"user_count":4}}"#,
            snowflake(&mut rng), users[0]).unwrap();
    }
    d.push_str(r#"],"soundboard_sounds":["#);
    for i in 0..rng.random_range(0..4) {
        if i > 0 {
            d.push(',');
        }
        write!(d, r#"{{"sound_id":"{}","name":"sound {i}","volume":0.8,"emoji_id":null,"emoji_name":"🎺","guild_id":"{id}","available":true}}"#,
            snowflake(&mut rng)).unwrap();
    }
    d.push_str("]}");
    (id, d, if with_members { members } else { 0 })
}

/// What one filling of the cache cost.
struct Fill {
    cache: StateCache,
    ids: Vec<u64>,
    raw_bytes: usize,
    members: usize,
    heap_bytes: i64,
    heap_blocks: i64,
    apply_ns: u64,
}

fn fill(guilds: usize, with_members: bool) -> Fill {
    let cache = StateCache::new();
    let (bytes_before, blocks_before) = live();
    let mut ids = Vec::with_capacity(guilds);
    let (mut raw_bytes, mut members, mut apply_ns) = (0, 0, 0);
    for i in 0..guilds {
        let (id, d, n) = guild_create(0xCAC4E + i as u64, with_members);
        raw_bytes += d.len();
        members += n;
        let start = thread_cpu_ns();
        cache.apply((i % 16) as u32, "GUILD_CREATE", d.as_bytes());
        apply_ns += thread_cpu_ns() - start;
        ids.push(id);
    }
    let (bytes_after, blocks_after) = live();
    // `ids` was allocated inside the window.
    let ids_bytes = (ids.capacity() * 8) as i64;
    Fill {
        cache,
        raw_bytes,
        members,
        heap_bytes: bytes_after - bytes_before - ids_bytes,
        heap_blocks: blocks_after - blocks_before - 1,
        apply_ns,
        ids,
    }
}

/// Presence and member updates for members of the first guilds, as Discord
/// sends them: full and partial presences, member updates with a user.
fn full_updates(full: &Fill, n: usize) -> Vec<(&'static str, String)> {
    let mut updates = Vec::with_capacity(n);
    let mut rng = StdRng::seed_from_u64(7);
    'guilds: for &guild_id in &full.ids {
        let d: serde_json::Value =
            serde_json::from_str(&full.cache.guild_create(guild_id).expect("held")).expect("JSON");
        for member in d["members"].as_array().expect("members") {
            let user = &member["user"]["id"];
            let update = match rng.random_range(0..3) {
                0 => (
                    "PRESENCE_UPDATE",
                    format!(
                        r#"{{"user":{{"id":{user}}},"guild_id":"{guild_id}","status":"idle","client_status":{{"mobile":"idle"}},"activities":[{{"type":0,"name":"Other game","created_at":1780000000001}}]}}"#
                    ),
                ),
                1 => (
                    "PRESENCE_UPDATE",
                    format!(r#"{{"user":{{"id":{user}}},"guild_id":"{guild_id}","status":"dnd"}}"#),
                ),
                _ => (
                    "GUILD_MEMBER_UPDATE",
                    format!(
                        r#"{{"guild_id":"{guild_id}","roles":[],"user":{{"id":{user},"username":"renamed","global_name":"Renamed","avatar":null}},"nick":"nick","avatar":null,"banner":null,"joined_at":"2025-06-07T08:09:10.111000+00:00","premium_since":null,"pending":false,"communication_disabled_until":null,"flags":0}}"#
                    ),
                ),
            };
            updates.push(update);
            if updates.len() == n {
                break 'guilds;
            }
        }
    }
    updates
}

fn main() {
    let guilds = env_count("BENCH_GUILDS", 1000);
    let rounds = env_count("BENCH_ROUNDS", 5);

    let bare = fill(guilds, false);
    let bare_stats = bare.cache.stats();
    let (bare_raw, bare_heap, bare_blocks) = (bare.raw_bytes, bare.heap_bytes, bare.heap_blocks);
    drop(bare);

    let full = fill(guilds, true);
    let stats = full.cache.stats();
    assert_eq!(stats.guilds, guilds);
    assert_eq!(stats.members, full.members);

    // Rebuild every GUILD_CREATE, as a front door does for a client's
    // IDENTIFY on every shard.
    let mut rebuild_ms = Vec::with_capacity(rounds);
    let mut rebuilt_bytes = 0;
    for _ in 0..rounds {
        rebuilt_bytes = 0;
        let start = thread_cpu_ns();
        for id in &full.ids {
            let d = full.cache.guild_create(*id).expect("guild held");
            rebuilt_bytes += d.len();
        }
        rebuild_ms.push((thread_cpu_ns() - start) as f64 / 1e6);
    }
    let rebuild_ms = median(&mut rebuild_ms);
    // A rebuilt GUILD_CREATE is the raw one plus `unavailable:false` moved
    // and lists reordered by id: the same size give or take a few bytes.
    let size_drift = rebuilt_bytes as f64 / full.raw_bytes as f64;

    // The hot path's question for every dispatch, answered for the most
    // common one.
    let calls = 10_000_000u32;
    let start = thread_cpu_ns();
    let mut tracked = 0u32;
    for _ in 0..calls {
        tracked += u32::from(StateCache::tracks(std::hint::black_box("MESSAGE_CREATE")));
    }
    let tracks_ns = (thread_cpu_ns() - start) as f64 / f64::from(calls);
    assert_eq!(tracked, 0);

    // The busiest state events of a large bot: presence and member updates
    // of members the cache holds.
    let updates = full_updates(&full, 20_000);
    let mut update_us = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = thread_cpu_ns();
        for (t, d) in &updates {
            full.cache.apply(0, t, d.as_bytes());
        }
        update_us.push((thread_cpu_ns() - start) as f64 / 1e3 / updates.len() as f64);
    }
    let update_us = median(&mut update_us);

    let member_raw = (full.raw_bytes - bare_raw) as f64 / full.members as f64;
    let member_heap = (full.heap_bytes - bare_heap) as f64 / full.members as f64;
    let member_blocks = (full.heap_blocks - bare_blocks) as f64 / full.members as f64;
    let guild_raw = bare_raw as f64 / guilds as f64;
    let guild_heap = bare_heap as f64 / guilds as f64;
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);

    eprintln!(
        "\nstate cache: {guilds} guilds, {} members ({} presences), {:.1} MiB of GUILD_CREATE",
        full.members,
        stats.presences,
        mib(full.raw_bytes as f64)
    );
    eprintln!(
        "  {:<34} {:>14} {:>14} {:>8}",
        "", "raw GUILD_CREATE", "cache heap", "ratio"
    );
    eprintln!(
        "  {:<34} {:>12.0} B {:>12.0} B {:>8.2}",
        "per member (user, ¼ presence)",
        member_raw,
        member_heap,
        member_heap / member_raw
    );
    eprintln!(
        "  {:<34} {:>10.1} KiB {:>10.1} KiB {:>8.2}",
        "per guild, without members",
        guild_raw / 1024.0,
        guild_heap / 1024.0,
        guild_heap / guild_raw
    );
    eprintln!(
        "  {:<34} {:>10.1} MiB {:>10.1} MiB {:>8.2}",
        "all guilds",
        mib(full.raw_bytes as f64),
        mib(full.heap_bytes as f64),
        full.heap_bytes as f64 / full.raw_bytes as f64
    );
    eprintln!(
        "  heap blocks per member {member_blocks:.2}; CacheStats.bytes estimate {:.1} MiB ({:.2}× measured); without members {:.1} MiB",
        mib(stats.bytes as f64),
        stats.bytes as f64 / full.heap_bytes as f64,
        mib(bare_stats.bytes as f64),
    );
    eprintln!(
        "  tracks(\"MESSAGE_CREATE\"): {tracks_ns:.1} ns; PRESENCE_UPDATE / GUILD_MEMBER_UPDATE of a held member: {:.2} µs each",
        update_us
    );
    eprintln!(
        "  apply {guilds} GUILD_CREATEs: {:.1} ms CPU ({:.0} MiB/s); rebuild all {guilds}: {rebuild_ms:.1} ms CPU ({:.0} MiB/s, {:.1} µs per guild, size {size_drift:.4}× raw)\n",
        full.apply_ns as f64 / 1e6,
        mib(full.raw_bytes as f64) / (full.apply_ns as f64 / 1e9),
        mib(rebuilt_bytes as f64) / (rebuild_ms / 1e3),
        rebuild_ms * 1e3 / guilds as f64,
    );

    result(
        "cache_member_bytes",
        member_heap,
        "B",
        "cache heap per member",
    );
    result(
        "cache_member_raw_bytes",
        member_raw,
        "B",
        "raw GUILD_CREATE bytes per member",
    );
    result(
        "cache_guild_kib",
        guild_heap / 1024.0,
        "KiB",
        "cache heap per guild without members",
    );
    result(
        "cache_guild_raw_kib",
        guild_raw / 1024.0,
        "KiB",
        "raw GUILD_CREATE per guild without members",
    );
    result(
        "cache_total_mib",
        mib(full.heap_bytes as f64),
        "MiB",
        "cache heap, all guilds",
    );
    result(
        "cache_raw_total_mib",
        mib(full.raw_bytes as f64),
        "MiB",
        "raw GUILD_CREATE, all guilds",
    );
    result(
        "cache_apply_ms",
        full.apply_ns as f64 / 1e6,
        "ms",
        "apply every GUILD_CREATE (CPU)",
    );
    result(
        "cache_rebuild_ms",
        rebuild_ms,
        "ms",
        "rebuild every GUILD_CREATE (CPU)",
    );
}
