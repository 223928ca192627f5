//! Gateway intents and the dispatch events each one delivers.
//!
//! This is the one table of intents ↔ events (facts sheet §7 and §8, API v10).
//! Everything else asks it: `check-config` and daemon start run [`plan`] over
//! `[discord] intents` / `[discord] events`, IDENTIFY sends [`IntentPlan::bits`],
//! and the close 4013/4014 messages use [`check_intent_bits`] and
//! [`names_for_mask`].
//!
//! `Intent::events` means "delivers": any one of an event's intents makes it
//! arrive. Intents that only change what an event carries (MESSAGE_CONTENT;
//! GUILD_MEMBERS for THREAD_MEMBERS_UPDATE; GUILD_MEMBERS and GUILD_PRESENCES
//! for op 8 replies) are kept apart in `ENRICHES`, so that they are neither
//! required for nor reported as useless with those events.

use std::collections::HashSet;
use std::fmt;

use serde::Serialize;

/// One Discord gateway intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Intent {
    /// Canonical name, as the docs spell it (`GUILD_MESSAGES`).
    pub name: &'static str,
    /// Bit position: the intent's value in IDENTIFY is `1 << bit`.
    pub bit: u32,
    /// Must be switched on in the Developer Portal, or Discord closes with 4014.
    pub privileged: bool,
    /// Dispatch events (`t`) this intent delivers; empty for MESSAGE_CONTENT.
    pub events: &'static [&'static str],
    /// What the bare table does not say: partial delivery, permissions, old names.
    pub note: Option<&'static str>,
}

impl Intent {
    /// The intent's value in the IDENTIFY `intents` bitfield.
    pub const fn mask(&self) -> u64 {
        1 << self.bit
    }
}

const MESSAGE_CONTENT_NOTE: &str = "MESSAGE_CONTENT delivers no event of its own: it decides \
    whether message content is filled in. Without it, content, embeds, attachments and \
    components in MESSAGE_CREATE and MESSAGE_UPDATE are empty (and poll is left out), and \
    AUTO_MODERATION_ACTION_EXECUTION loses content and matched_content — except for DMs with \
    the bot, messages that mention the bot, the bot's own messages and the target message of \
    a message context-menu command";

/// Every documented intent, in bit order (facts §7.1). Bits 17, 18, 19, 22
/// and 23 are unassigned.
pub static INTENTS: &[Intent] = &[
    Intent {
        name: "GUILDS",
        bit: 0,
        privileged: false,
        events: &[
            "GUILD_CREATE",
            "GUILD_UPDATE",
            "GUILD_DELETE",
            "GUILD_ROLE_CREATE",
            "GUILD_ROLE_UPDATE",
            "GUILD_ROLE_DELETE",
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
            "STAGE_INSTANCE_CREATE",
            "STAGE_INSTANCE_UPDATE",
            "STAGE_INSTANCE_DELETE",
            "VOICE_CHANNEL_STATUS_UPDATE",
            "VOICE_CHANNEL_START_TIME_UPDATE",
        ],
        note: Some(
            "THREAD_MEMBERS_UPDATE comes with GUILDS alone only when the bot itself is added \
             to or removed from a thread; for other users' changes GUILD_MEMBERS is needed too",
        ),
    },
    Intent {
        name: "GUILD_MEMBERS",
        bit: 1,
        privileged: true,
        // The docs also list THREAD_MEMBERS_UPDATE here (with an asterisk), but
        // GUILDS delivers it; GUILD_MEMBERS only widens it, see ENRICHES.
        events: &[
            "GUILD_MEMBER_ADD",
            "GUILD_MEMBER_UPDATE",
            "GUILD_MEMBER_REMOVE",
        ],
        note: Some(
            "GUILD_MEMBER_UPDATE for the bot's own member arrives even without GUILD_MEMBERS; \
             other members' updates need it. Also needed for THREAD_MEMBERS_UPDATE about other \
             users and for requesting a guild's whole member list (op 8). It does not fill \
             GUILD_CREATE's member list: that takes GUILD_PRESENCES, and even then guilds over \
             large_threshold list only online, role-holding, nicknamed or voice members, and \
             guilds over 75,000 members only the bot and voice members",
        ),
    },
    Intent {
        name: "GUILD_MODERATION",
        bit: 2,
        privileged: false,
        events: &[
            "GUILD_AUDIT_LOG_ENTRY_CREATE",
            "GUILD_BAN_ADD",
            "GUILD_BAN_REMOVE",
        ],
        note: Some(
            "formerly GUILD_BANS. Permissions are needed too: GUILD_BAN_ADD/REMOVE need \
             BAN_MEMBERS or VIEW_AUDIT_LOG, GUILD_AUDIT_LOG_ENTRY_CREATE needs VIEW_AUDIT_LOG",
        ),
    },
    Intent {
        name: "GUILD_EXPRESSIONS",
        bit: 3,
        privileged: false,
        events: &[
            "GUILD_EMOJIS_UPDATE",
            "GUILD_STICKERS_UPDATE",
            "GUILD_SOUNDBOARD_SOUND_CREATE",
            "GUILD_SOUNDBOARD_SOUND_UPDATE",
            "GUILD_SOUNDBOARD_SOUND_DELETE",
            "GUILD_SOUNDBOARD_SOUNDS_UPDATE",
        ],
        note: Some("formerly GUILD_EMOJIS_AND_STICKERS"),
    },
    Intent {
        name: "GUILD_INTEGRATIONS",
        bit: 4,
        privileged: false,
        events: &[
            "GUILD_INTEGRATIONS_UPDATE",
            "INTEGRATION_CREATE",
            "INTEGRATION_UPDATE",
            "INTEGRATION_DELETE",
        ],
        note: None,
    },
    Intent {
        name: "GUILD_WEBHOOKS",
        bit: 5,
        privileged: false,
        events: &["WEBHOOKS_UPDATE"],
        note: None,
    },
    Intent {
        name: "GUILD_INVITES",
        bit: 6,
        privileged: false,
        events: &["INVITE_CREATE", "INVITE_DELETE"],
        note: Some("invite events also need MANAGE_CHANNELS on the channel"),
    },
    Intent {
        name: "GUILD_VOICE_STATES",
        bit: 7,
        privileged: false,
        events: &["VOICE_CHANNEL_EFFECT_SEND", "VOICE_STATE_UPDATE"],
        note: Some(
            "set it if the bot joins voice: the join flow waits for the bot's own \
             VOICE_STATE_UPDATE, and the docs do not say whether that arrives without this intent",
        ),
    },
    Intent {
        name: "GUILD_PRESENCES",
        bit: 8,
        privileged: true,
        events: &["PRESENCE_UPDATE"],
        note: Some(
            "without it GUILD_CREATE lists only the bot and members in voice channels, and \
             op 8 replies carry no presences",
        ),
    },
    Intent {
        name: "GUILD_MESSAGES",
        bit: 9,
        privileged: false,
        events: &[
            "MESSAGE_CREATE",
            "MESSAGE_UPDATE",
            "MESSAGE_DELETE",
            "MESSAGE_DELETE_BULK",
        ],
        note: Some("message text needs MESSAGE_CONTENT as well"),
    },
    Intent {
        name: "GUILD_MESSAGE_REACTIONS",
        bit: 10,
        privileged: false,
        events: &[
            "MESSAGE_REACTION_ADD",
            "MESSAGE_REACTION_REMOVE",
            "MESSAGE_REACTION_REMOVE_ALL",
            "MESSAGE_REACTION_REMOVE_EMOJI",
        ],
        note: None,
    },
    Intent {
        name: "GUILD_MESSAGE_TYPING",
        bit: 11,
        privileged: false,
        events: &["TYPING_START"],
        note: None,
    },
    Intent {
        name: "DIRECT_MESSAGES",
        bit: 12,
        privileged: false,
        events: &[
            "MESSAGE_CREATE",
            "MESSAGE_UPDATE",
            "MESSAGE_DELETE",
            "CHANNEL_PINS_UPDATE",
        ],
        note: Some(
            "no MESSAGE_DELETE_BULK in DMs; ephemeral messages arrive under this intent, \
             without guild_id and member",
        ),
    },
    Intent {
        name: "DIRECT_MESSAGE_REACTIONS",
        bit: 13,
        privileged: false,
        events: &[
            "MESSAGE_REACTION_ADD",
            "MESSAGE_REACTION_REMOVE",
            "MESSAGE_REACTION_REMOVE_ALL",
            "MESSAGE_REACTION_REMOVE_EMOJI",
        ],
        note: None,
    },
    Intent {
        name: "DIRECT_MESSAGE_TYPING",
        bit: 14,
        privileged: false,
        events: &["TYPING_START"],
        note: None,
    },
    Intent {
        name: "MESSAGE_CONTENT",
        bit: 15,
        privileged: true,
        events: &[],
        note: Some(MESSAGE_CONTENT_NOTE),
    },
    Intent {
        name: "GUILD_SCHEDULED_EVENTS",
        bit: 16,
        privileged: false,
        events: &[
            "GUILD_SCHEDULED_EVENT_CREATE",
            "GUILD_SCHEDULED_EVENT_UPDATE",
            "GUILD_SCHEDULED_EVENT_DELETE",
            "GUILD_SCHEDULED_EVENT_USER_ADD",
            "GUILD_SCHEDULED_EVENT_USER_REMOVE",
        ],
        note: None,
    },
    Intent {
        name: "AUTO_MODERATION_CONFIGURATION",
        bit: 20,
        privileged: false,
        events: &[
            "AUTO_MODERATION_RULE_CREATE",
            "AUTO_MODERATION_RULE_UPDATE",
            "AUTO_MODERATION_RULE_DELETE",
        ],
        note: Some("auto-moderation events also need the MANAGE_GUILD permission"),
    },
    Intent {
        name: "AUTO_MODERATION_EXECUTION",
        bit: 21,
        privileged: false,
        events: &["AUTO_MODERATION_ACTION_EXECUTION"],
        note: Some(
            "auto-moderation events also need the MANAGE_GUILD permission; content and \
             matched_content need MESSAGE_CONTENT",
        ),
    },
    Intent {
        name: "GUILD_MESSAGE_POLLS",
        bit: 24,
        privileged: false,
        events: &["MESSAGE_POLL_VOTE_ADD", "MESSAGE_POLL_VOTE_REMOVE"],
        note: None,
    },
    Intent {
        name: "DIRECT_MESSAGE_POLLS",
        bit: 25,
        privileged: false,
        events: &["MESSAGE_POLL_VOTE_ADD", "MESSAGE_POLL_VOTE_REMOVE"],
        note: None,
    },
];

/// Old names Discord still accepts in docs and libraries: (deprecated, canonical).
/// The bit is the same; only the name changed.
static ALIASES: &[(&str, &str)] = &[
    ("GUILD_BANS", "GUILD_MODERATION"),
    ("GUILD_EMOJIS_AND_STICKERS", "GUILD_EXPRESSIONS"),
];

/// Intents that change what an event carries without delivering it:
/// (intent, events). A declared intent listed here is not "unneeded" when one
/// of these events is subscribed. GUILD_CREATE is deliberately left out: it
/// is always subscribed, and counting it would hide that GUILD_PRESENCES (the
/// heaviest intent) is unused.
static ENRICHES: &[(&str, &[&str])] = &[
    (
        "MESSAGE_CONTENT",
        &[
            "MESSAGE_CREATE",
            "MESSAGE_UPDATE",
            "AUTO_MODERATION_ACTION_EXECUTION",
        ],
    ),
    (
        "GUILD_MEMBERS",
        &["THREAD_MEMBERS_UPDATE", "GUILD_MEMBERS_CHUNK"],
    ),
    ("GUILD_PRESENCES", &["GUILD_MEMBERS_CHUNK"]),
];

/// Dispatch events that need no intent: always delivered, or sent only as a
/// reply to a command (GUILD_MEMBERS_CHUNK to op 8, SOUNDBOARD_SOUNDS to op 31,
/// CHANNEL_INFO to op 43, RATE_LIMITED to a limited command). Facts §7.4.
pub static NO_INTENT_EVENTS: &[&str] = &[
    "READY",
    "RESUMED",
    "RATE_LIMITED",
    "USER_UPDATE",
    "INTERACTION_CREATE",
    "APPLICATION_COMMAND_PERMISSIONS_UPDATE",
    "VOICE_SERVER_UPDATE",
    "GUILD_MEMBERS_CHUNK",
    "SOUNDBOARD_SOUNDS",
    "CHANNEL_INFO",
    "ENTITLEMENT_CREATE",
    "ENTITLEMENT_UPDATE",
    "ENTITLEMENT_DELETE",
    "SUBSCRIPTION_CREATE",
    "SUBSCRIPTION_UPDATE",
    "SUBSCRIPTION_DELETE",
];

/// Every dispatch event name (`t`), sorted (facts §8). HELLO, RECONNECT and
/// INVALID_SESSION are opcodes, not dispatches, and are not here.
pub static ALL_EVENTS: &[&str] = &[
    "APPLICATION_COMMAND_PERMISSIONS_UPDATE",
    "AUTO_MODERATION_ACTION_EXECUTION",
    "AUTO_MODERATION_RULE_CREATE",
    "AUTO_MODERATION_RULE_DELETE",
    "AUTO_MODERATION_RULE_UPDATE",
    "CHANNEL_CREATE",
    "CHANNEL_DELETE",
    "CHANNEL_INFO",
    "CHANNEL_PINS_UPDATE",
    "CHANNEL_UPDATE",
    "ENTITLEMENT_CREATE",
    "ENTITLEMENT_DELETE",
    "ENTITLEMENT_UPDATE",
    "GUILD_AUDIT_LOG_ENTRY_CREATE",
    "GUILD_BAN_ADD",
    "GUILD_BAN_REMOVE",
    "GUILD_CREATE",
    "GUILD_DELETE",
    "GUILD_EMOJIS_UPDATE",
    "GUILD_INTEGRATIONS_UPDATE",
    "GUILD_MEMBERS_CHUNK",
    "GUILD_MEMBER_ADD",
    "GUILD_MEMBER_REMOVE",
    "GUILD_MEMBER_UPDATE",
    "GUILD_ROLE_CREATE",
    "GUILD_ROLE_DELETE",
    "GUILD_ROLE_UPDATE",
    "GUILD_SCHEDULED_EVENT_CREATE",
    "GUILD_SCHEDULED_EVENT_DELETE",
    "GUILD_SCHEDULED_EVENT_UPDATE",
    "GUILD_SCHEDULED_EVENT_USER_ADD",
    "GUILD_SCHEDULED_EVENT_USER_REMOVE",
    "GUILD_SOUNDBOARD_SOUNDS_UPDATE",
    "GUILD_SOUNDBOARD_SOUND_CREATE",
    "GUILD_SOUNDBOARD_SOUND_DELETE",
    "GUILD_SOUNDBOARD_SOUND_UPDATE",
    "GUILD_STICKERS_UPDATE",
    "GUILD_UPDATE",
    "INTEGRATION_CREATE",
    "INTEGRATION_DELETE",
    "INTEGRATION_UPDATE",
    "INTERACTION_CREATE",
    "INVITE_CREATE",
    "INVITE_DELETE",
    "MESSAGE_CREATE",
    "MESSAGE_DELETE",
    "MESSAGE_DELETE_BULK",
    "MESSAGE_POLL_VOTE_ADD",
    "MESSAGE_POLL_VOTE_REMOVE",
    "MESSAGE_REACTION_ADD",
    "MESSAGE_REACTION_REMOVE",
    "MESSAGE_REACTION_REMOVE_ALL",
    "MESSAGE_REACTION_REMOVE_EMOJI",
    "MESSAGE_UPDATE",
    "PRESENCE_UPDATE",
    "RATE_LIMITED",
    "READY",
    "RESUMED",
    "SOUNDBOARD_SOUNDS",
    "STAGE_INSTANCE_CREATE",
    "STAGE_INSTANCE_DELETE",
    "STAGE_INSTANCE_UPDATE",
    "SUBSCRIPTION_CREATE",
    "SUBSCRIPTION_DELETE",
    "SUBSCRIPTION_UPDATE",
    "THREAD_CREATE",
    "THREAD_DELETE",
    "THREAD_LIST_SYNC",
    "THREAD_MEMBERS_UPDATE",
    "THREAD_MEMBER_UPDATE",
    "THREAD_UPDATE",
    "TYPING_START",
    "USER_UPDATE",
    "VOICE_CHANNEL_EFFECT_SEND",
    "VOICE_CHANNEL_START_TIME_UPDATE",
    "VOICE_CHANNEL_STATUS_UPDATE",
    "VOICE_SERVER_UPDATE",
    "VOICE_STATE_UPDATE",
    "WEBHOOKS_UPDATE",
];

/// All documented intent bits OR-ed together (`0x331FFFF`).
pub const ALL_INTENTS_MASK: u64 = 53608447;

/// GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT (`0x8102`).
pub const PRIVILEGED_MASK: u64 = 33026;

/// Events that partly arrive without the intent that delivers them; said in
/// the Undeliverable message, which still asks for the intent.
static PARTIAL_WITHOUT_INTENT: &[(&str, &str)] = &[(
    "GUILD_MEMBER_UPDATE",
    "updates to the bot's own member arrive without GUILD_MEMBERS; other members' updates \
     need \"GUILD_MEMBERS\" (privileged) in [discord] intents",
)];

/// Events that never carry a `guild_id`, so Discord sends them to shard 0
/// only (facts §6): entitlements and subscriptions.
static SHARD_ZERO_ONLY: &[&str] = &[
    "ENTITLEMENT_CREATE",
    "ENTITLEMENT_UPDATE",
    "ENTITLEMENT_DELETE",
    "SUBSCRIPTION_CREATE",
    "SUBSCRIPTION_UPDATE",
    "SUBSCRIPTION_DELETE",
];

/// Intents whose events come without a `guild_id` (DMs), so only shard 0
/// gets what they deliver (facts §6).
static DM_INTENTS: &[&str] = &[
    "DIRECT_MESSAGES",
    "DIRECT_MESSAGE_REACTIONS",
    "DIRECT_MESSAGE_TYPING",
    "DIRECT_MESSAGE_POLLS",
];

/// Where intents and events are written in the config file, for messages.
const INTENTS_KEY: &str = "[discord] intents";
const EVENTS_KEY: &str = "[discord] events";

/// Looks an intent up by its exact, upper-case name. Deprecated aliases
/// (GUILD_BANS, GUILD_EMOJIS_AND_STICKERS) resolve to the canonical intent.
pub fn intent(name: &str) -> Option<&'static Intent> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canonical)| *canonical);
    INTENTS.iter().find(|i| i.name == name)
}

/// Whether `name` is a documented dispatch event (exact, upper-case).
pub fn is_event(name: &str) -> bool {
    ALL_EVENTS.binary_search(&name).is_ok()
}

/// The intents that deliver `event`, in bit order. Any one of them is enough
/// for the event to arrive (each delivers its part: guild or DM). Empty when
/// the event needs no intent, and for unknown names.
pub fn intents_for_event(event: &str) -> Vec<&'static Intent> {
    INTENTS
        .iter()
        .filter(|i| i.events.contains(&event))
        .collect()
}

/// The names of the documented intents set in `mask`, in bit order.
/// Undocumented bits are skipped; [`check_intent_bits`] reports those.
pub fn names_for_mask(mask: u64) -> Vec<&'static str> {
    INTENTS
        .iter()
        .filter(|i| mask & i.mask() != 0)
        .map(|i| i.name)
        .collect()
}

/// Rejects an IDENTIFY `intents` value with bits Discord does not document,
/// which Discord answers with close 4013 (Invalid intent(s)).
pub fn check_intent_bits(bits: u64) -> Result<(), String> {
    let unknown = bits & !ALL_INTENTS_MASK;
    if unknown == 0 {
        return Ok(());
    }
    let positions: Vec<String> = (0..64)
        .filter(|b| unknown & (1u64 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    Err(format!(
        "intents value {bits} sets undocumented bit(s) {} (value {unknown}); Discord would close \
         the connection with 4013 (Invalid intent(s)). Only bits in {ALL_INTENTS_MASK} are \
         intents: declare intents by name in {INTENTS_KEY}",
        positions.join(", ")
    ))
}

/// The candidate closest to `name` by edit distance (ASCII case ignored,
/// a swap of two neighbouring letters counts as one edit), if it is close
/// enough to be a likely typo: at most one edit per four characters, and at
/// least one. Ties go to the earlier candidate.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 4).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let d = edit_distance(name, candidate);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance over ASCII-upper-cased chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_uppercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_uppercase()).collect();
    // Three rows: two back (for transpositions), previous, current.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            cur[j] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Events `intent` changes without delivering them (see [`ENRICHES`]).
fn enriches(intent: &str) -> impl Iterator<Item = &'static str> {
    ENRICHES
        .iter()
        .filter(move |(i, _)| *i == intent)
        .flat_map(|(_, events)| events.iter().copied())
}

/// Suggestion for a mistyped intent: typos of aliases lead to the canonical name.
fn suggest_intent(name: &str) -> Option<&'static str> {
    let names = INTENTS
        .iter()
        .map(|i| i.name)
        .chain(ALIASES.iter().map(|(alias, _)| *alias));
    closest(name, names).and_then(intent).map(|i| i.name)
}

/// Result of checking declared intents against subscribed events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IntentPlan {
    /// The IDENTIFY `intents` value.
    pub bits: u64,
    /// Declared intents: canonical, deduplicated, in bit order.
    pub intents: Vec<&'static Intent>,
    /// Subscribed events, deduplicated, in config order.
    pub events: Vec<String>,
    /// Things to fix that do not stop the daemon: unneeded intents,
    /// deprecated names, duplicates.
    pub warnings: Vec<String>,
    /// Things to know: privileged intents, what MESSAGE_CONTENT changes,
    /// events that arrive only in part.
    pub notes: Vec<String>,
}

/// A mistake in `[discord] intents` / `[discord] events` that stops the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentError {
    /// A name in `[discord] intents` that is no documented intent.
    UnknownIntent {
        name: String,
        suggestion: Option<&'static str>,
    },
    /// A name in `[discord] events` that is no documented dispatch event.
    UnknownEvent {
        name: String,
        suggestion: Option<&'static str>,
    },
    /// A subscribed event that no declared intent delivers.
    Undeliverable {
        event: String,
        delivered_by: Vec<&'static str>,
    },
}

/// `"NAME"`, with ` (privileged)` where it applies.
fn quoted_intent(name: &str) -> String {
    match intent(name) {
        Some(i) if i.privileged => format!("\"{name}\" (privileged)"),
        _ => format!("\"{name}\""),
    }
}

impl fmt::Display for IntentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntentError::UnknownIntent { name, suggestion } => {
                write!(f, "unknown intent \"{name}\" in {INTENTS_KEY}")?;
                if is_event(name) {
                    let by: Vec<String> = intents_for_event(name)
                        .iter()
                        .map(|i| quoted_intent(i.name))
                        .collect();
                    write!(f, "; \"{name}\" is an event: list it in {EVENTS_KEY}")?;
                    match by.len() {
                        0 => write!(f, " (it needs no intent)"),
                        1 => write!(f, " and declare {} here", by[0]),
                        _ => write!(f, " and declare one of {} here", by.join(", ")),
                    }
                } else if let Some(s) = suggestion {
                    write!(f, "; did you mean \"{s}\"?")
                } else {
                    write!(
                        f,
                        "; intents are upper-case names such as \"GUILDS\" or \"GUILD_MESSAGES\""
                    )
                }
            }
            IntentError::UnknownEvent { name, suggestion } => {
                write!(f, "unknown event \"{name}\" in {EVENTS_KEY}")?;
                if let Some(i) = intent(name) {
                    write!(
                        f,
                        "; \"{name}\" is an intent: list it in {INTENTS_KEY}, and its events \
                         here"
                    )?;
                    if !i.events.is_empty() {
                        write!(f, " ({})", i.events.join(", "))?;
                    }
                    Ok(())
                } else if let Some(s) = suggestion {
                    write!(f, "; did you mean \"{s}\"?")
                } else {
                    write!(
                        f,
                        "; events are dispatch names as Discord sends them, such as \
                         \"MESSAGE_CREATE\""
                    )
                }
            }
            IntentError::Undeliverable {
                event,
                delivered_by,
            } => {
                let names: Vec<String> = delivered_by.iter().map(|n| quoted_intent(n)).collect();
                write!(
                    f,
                    "event \"{event}\" can never arrive: no declared intent delivers it; "
                )?;
                match names.len() {
                    0 => write!(f, "remove it from {EVENTS_KEY}")?,
                    1 => write!(f, "add {} to {INTENTS_KEY}", names[0])?,
                    _ => write!(f, "add one of {} to {INTENTS_KEY}", names.join(", "))?,
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for IntentError {}

fn privileged_note(name: &str) -> String {
    format!(
        "{name} is privileged: enable it in the Developer Portal (Applications → your app → \
         Bot → Privileged Gateway Intents) or Discord closes the connection with 4014"
    )
}

/// Checks `[discord] intents` against `[discord] events`. Every subscribed
/// event must need no intent or be delivered by a declared one. All errors
/// are collected, not just the first.
pub fn plan(intents: &[String], events: &[String]) -> Result<IntentPlan, Vec<IntentError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut notes = Vec::new();

    // Intents: resolve, dedupe, remember typo suggestions.
    let mut declared: Vec<&'static Intent> = Vec::new();
    let mut spelled: Vec<&str> = Vec::new();
    let mut suggested: HashSet<&'static str> = HashSet::new();
    for name in intents {
        let Some(i) = intent(name) else {
            let suggestion = suggest_intent(name);
            suggested.extend(suggestion);
            errors.push(IntentError::UnknownIntent {
                name: name.clone(),
                suggestion,
            });
            continue;
        };
        if name != i.name {
            warnings.push(format!(
                "intent name \"{name}\" is deprecated; write \"{}\" in {INTENTS_KEY} (same bit)",
                i.name
            ));
        }
        match declared.iter().position(|d| d.name == i.name) {
            Some(at) if spelled[at] == name => warnings.push(format!(
                "intent \"{name}\" is listed more than once in {INTENTS_KEY}"
            )),
            Some(at) => warnings.push(format!(
                "\"{}\" and \"{name}\" in {INTENTS_KEY} are the same intent; keep only \"{}\"",
                spelled[at], i.name
            )),
            None => {
                declared.push(i);
                spelled.push(name);
            }
        }
    }
    declared.sort_by_key(|i| i.bit);

    // `["*"]`: every event the declared intents deliver, and those that
    // need none (what a drop-in library expects to see, DESIGN.md §5).
    let star: Vec<String>;
    let events = if events.iter().any(|e| e == "*") {
        star = ALL_EVENTS
            .iter()
            .filter(|e| {
                let by = intents_for_event(e);
                by.is_empty() || by.iter().any(|i| declared.contains(i))
            })
            .map(|e| e.to_string())
            .collect();
        &star[..]
    } else {
        events
    };

    // Events: check names, dedupe, check delivery.
    let mut subscribed: Vec<String> = Vec::new();
    for name in events {
        if !is_event(name) {
            let suggestion = if name == "*" {
                None
            } else {
                closest(name, ALL_EVENTS.iter().copied())
            };
            errors.push(IntentError::UnknownEvent {
                name: name.clone(),
                suggestion,
            });
            continue;
        }
        if subscribed.contains(name) {
            warnings.push(format!(
                "event \"{name}\" is listed more than once in {EVENTS_KEY}"
            ));
            continue;
        }
        subscribed.push(name.clone());
        let by = intents_for_event(name);
        let delivered = by.is_empty() || by.iter().any(|i| declared.contains(i));
        // Arrives in part without its intent (the bot's own member update):
        // accepted, with a note on what is missing.
        if !delivered
            && let Some((_, caveat)) = PARTIAL_WITHOUT_INTENT.iter().find(|(e, _)| e == name)
        {
            notes.push(format!("{name} is subscribed without its intent: {caveat}"));
            continue;
        }
        // A mistyped intent whose suggestion would deliver this event is
        // already reported; fixing the typo fixes this too.
        let pending = by.iter().any(|i| suggested.contains(i.name));
        if !delivered && !pending {
            errors.push(IntentError::Undeliverable {
                event: name.clone(),
                delivered_by: by.iter().map(|i| i.name).collect(),
            });
        }
    }

    let is_subscribed = |e: &str| subscribed.iter().any(|s| s == e);

    // Declared intents nothing subscribed needs.
    for i in &declared {
        let delivers = i.events.iter().any(|e| is_subscribed(e));
        if delivers || enriches(i.name).any(is_subscribed) {
            continue;
        }
        if i.events.is_empty() {
            // MESSAGE_CONTENT, the one intent that delivers nothing.
            let affects = enriches(i.name).collect::<Vec<_>>().join(", ");
            warnings.push(format!(
                "intent \"{}\" is declared but no subscribed event carries message content \
                 ({affects}); remove it from {INTENTS_KEY}",
                i.name
            ));
        } else {
            warnings.push(format!(
                "intent \"{}\" is declared but no subscribed event needs it (it delivers {}); \
                 remove it from {INTENTS_KEY} or subscribe to its events",
                i.name,
                i.events.join(", ")
            ));
        }
    }

    // Notes: privileged intents, then what changes what an event carries.
    for i in declared.iter().filter(|i| i.privileged) {
        notes.push(privileged_note(i.name));
    }
    let content_events: Vec<&str> = enriches("MESSAGE_CONTENT")
        .filter(|e| is_subscribed(e))
        .collect();
    let has = |name: &str| declared.iter().any(|i| i.name == name);
    if !content_events.is_empty() {
        if has("MESSAGE_CONTENT") {
            notes.push(MESSAGE_CONTENT_NOTE.to_owned());
        } else {
            notes.push(format!(
                "MESSAGE_CONTENT is not declared, so {} arrive without message content: \
                 content, embeds, attachments and components are empty (poll and \
                 matched_content left out) except for DMs with the bot, messages that mention \
                 the bot and the bot's own messages; add \"MESSAGE_CONTENT\" (privileged) to \
                 {INTENTS_KEY} if the bot reads message text",
                content_events.join(", ")
            ));
        }
    }
    if is_subscribed("THREAD_MEMBERS_UPDATE") && has("GUILDS") && !has("GUILD_MEMBERS") {
        notes.push(format!(
            "THREAD_MEMBERS_UPDATE arrives with GUILDS alone only when the bot itself joins or \
             leaves a thread; add \"GUILD_MEMBERS\" (privileged) to {INTENTS_KEY} to get it for \
             other users"
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(IntentPlan {
        bits: declared.iter().fold(0, |bits, i| bits | i.mask()),
        intents: declared,
        events: subscribed,
        warnings,
        notes,
    })
}

/// Warnings for an instance that does not own shard 0: what it subscribes
/// to but Discord sends only to shard 0 (events without a `guild_id`:
/// DMs, entitlements, subscriptions, interactions from DMs and user
/// installs; facts §6).
pub fn shard_zero_warnings(plan: &IntentPlan) -> Vec<String> {
    let dm_intents: Vec<&str> = plan
        .intents
        .iter()
        .map(|i| i.name)
        .filter(|name| DM_INTENTS.contains(name))
        .collect();
    let mut warnings = Vec::new();
    for event in &plan.events {
        let event = event.as_str();
        if SHARD_ZERO_ONLY.contains(&event) {
            warnings.push(format!(
                "{event} has no guild_id, so Discord sends it only to shard 0, which \
                 [shards] range leaves out: this instance never receives it (run it where \
                 shard 0 is, or remove it from {EVENTS_KEY})"
            ));
        } else if event == "INTERACTION_CREATE" {
            warnings.push(format!(
                "{event} from DMs and user-installed commands has no guild_id and goes only to \
                 shard 0, which [shards] range leaves out: this instance gets guild \
                 interactions only"
            ));
        } else {
            let by_dm: Vec<&str> = intents_for_event(event)
                .iter()
                .map(|i| i.name)
                .filter(|name| dm_intents.contains(name))
                .collect();
            if !by_dm.is_empty() {
                warnings.push(format!(
                    "{event} in DMs (declared {}) has no guild_id and goes only to shard 0, \
                     which [shards] range leaves out: this instance gets its guild part only",
                    by_dm.join(", ")
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests;
