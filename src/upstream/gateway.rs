//! Discord gateway facts the daemon acts on, each in one table: opcodes,
//! close codes and their classes, limits (discord-gateway-facts.md §2, §3, §5).

/// Gateway API version.
pub const API_VERSION: u8 = 10;

/// Largest payload Discord accepts from a client (bytes); larger → close 4002.
pub const MAX_SEND_PAYLOAD: usize = 4096;

/// Gateway commands a client may send per connection per window.
pub const SEND_LIMIT: u32 = 120;
/// The send window.
pub const SEND_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Close code the daemon uses when it drops a connection it intends to
/// resume (zombie, op 7, shutdown). Anything but 1000/1001 keeps the session.
pub const CLOSE_RESUMABLE: u16 = 4900;

/// Gateway opcodes (§2).
pub mod op {
    /// Dispatch (receive).
    pub const DISPATCH: u8 = 0;
    /// Heartbeat (both ways).
    pub const HEARTBEAT: u8 = 1;
    /// Identify (send).
    pub const IDENTIFY: u8 = 2;
    /// Presence update (send; bot command).
    pub const PRESENCE_UPDATE: u8 = 3;
    /// Voice state update (send; bot command).
    pub const VOICE_STATE_UPDATE: u8 = 4;
    /// Resume (send).
    pub const RESUME: u8 = 6;
    /// Reconnect (receive).
    pub const RECONNECT: u8 = 7;
    /// Request guild members (send; bot command).
    pub const REQUEST_GUILD_MEMBERS: u8 = 8;
    /// Invalid session (receive).
    pub const INVALID_SESSION: u8 = 9;
    /// Hello (receive).
    pub const HELLO: u8 = 10;
    /// Heartbeat ACK (receive).
    pub const HEARTBEAT_ACK: u8 = 11;
    /// Request soundboard sounds (send; bot command).
    pub const REQUEST_SOUNDBOARD_SOUNDS: u8 = 31;
    /// Request channel info (send; bot command).
    pub const REQUEST_CHANNEL_INFO: u8 = 43;

    /// The opcodes a bot may send through the daemon (DESIGN.md §3.3).
    pub const BOT_COMMANDS: &[u8] = &[
        PRESENCE_UPDATE,
        VOICE_STATE_UPDATE,
        REQUEST_GUILD_MEMBERS,
        REQUEST_SOUNDBOARD_SOUNDS,
        REQUEST_CHANNEL_INFO,
    ];
}

/// What a disconnect means for the session (DESIGN.md §3.2 `class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseClass {
    /// Reconnect and RESUME.
    Resumable,
    /// The session is gone: reconnect and IDENTIFY (through the queue).
    Reidentify,
    /// Stop this shard; an operator must fix something.
    Fatal,
    /// No close code (TCP drop, timeout, corrupt stream): RESUME.
    Transport,
}

impl CloseClass {
    /// Name used in logs, the bot protocol and the runbook.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseClass::Resumable => "resumable",
            CloseClass::Reidentify => "reidentify",
            CloseClass::Fatal => "fatal",
            CloseClass::Transport => "transport",
        }
    }
}

/// One row of the close-code table.
pub struct CloseCode {
    /// Code.
    pub code: u16,
    /// Discord's name.
    pub name: &'static str,
    /// What the daemon does.
    pub class: CloseClass,
    /// What it means and what the operator should do. What the daemon
    /// does next (resume or identify, and when) is said by the shard,
    /// which knows whether it still holds a session.
    pub advice: &'static str,
}

/// Discord's close codes (facts §3.1). Unknown codes are resumable (op 9
/// decides), as are 1000–3999 codes sent by Discord's side.
pub static CLOSE_CODES: &[CloseCode] = &[
    CloseCode {
        code: 4000,
        name: "Unknown error",
        class: CloseClass::Resumable,
        advice: "Discord-side error",
    },
    CloseCode {
        code: 4001,
        name: "Unknown opcode",
        class: CloseClass::Resumable,
        advice: "the daemon sent an invalid opcode or payload (a bug: report it, or a bot `send` payload Discord rejected)",
    },
    CloseCode {
        code: 4002,
        name: "Decode error",
        class: CloseClass::Resumable,
        advice: "Discord could not decode a payload the daemon sent (malformed, or over the size limit; bot `send` payloads are checked against it, so a daemon bug is likelier)",
    },
    CloseCode {
        code: 4003,
        name: "Not authenticated",
        class: CloseClass::Reidentify,
        advice: "payload before IDENTIFY, or the session was invalidated",
    },
    CloseCode {
        code: 4004,
        name: "Authentication failed",
        class: CloseClass::Fatal,
        advice: "the token was rejected: it was reset or is wrong; put the current token from the Developer Portal (Bot → Reset Token) in the token file and restart",
    },
    CloseCode {
        code: 4005,
        name: "Already authenticated",
        class: CloseClass::Reidentify,
        advice: "a second IDENTIFY on one connection (a daemon bug)",
    },
    CloseCode {
        code: 4007,
        name: "Invalid seq",
        class: CloseClass::Reidentify,
        advice: "the RESUME sequence was not valid: the session is gone",
    },
    CloseCode {
        code: 4008,
        name: "Rate limited",
        class: CloseClass::Resumable,
        advice: "more than 120 gateway commands in 60 s on one connection (check what the bot sends)",
    },
    CloseCode {
        code: 4009,
        name: "Session timed out",
        class: CloseClass::Reidentify,
        advice: "the session expired",
    },
    CloseCode {
        code: 4010,
        name: "Invalid shard",
        class: CloseClass::Fatal,
        advice: "the shard id/count was refused: check [shards] total and range (use total = \"auto\" for large bots)",
    },
    CloseCode {
        code: 4011,
        name: "Sharding required",
        class: CloseClass::Fatal,
        advice: "too many guilds for this shard count: raise [shards] total (or use \"auto\") and restart",
    },
    CloseCode {
        code: 4012,
        name: "Invalid API version",
        class: CloseClass::Fatal,
        advice: "gateway version refused; upgrade shardwarden",
    },
    CloseCode {
        code: 4013,
        name: "Invalid intent(s)",
        class: CloseClass::Fatal,
        advice: "the intents bitfield was refused: check [discord] intents (run shardwarden check-config)",
    },
    CloseCode {
        code: 4014,
        name: "Disallowed intent(s)",
        class: CloseClass::Fatal,
        advice: "a privileged intent is not enabled for this application: enable it in the Developer Portal (Applications → your app → Bot → Privileged Gateway Intents) or remove it from [discord] intents",
    },
];

/// The row for a close code, if Discord documents it.
pub fn close_code(code: u16) -> Option<&'static CloseCode> {
    CLOSE_CODES.iter().find(|row| row.code == code)
}

/// Class of a close received from Discord (`None` = no close frame).
pub fn classify_close(code: Option<u16>) -> CloseClass {
    match code {
        None => CloseClass::Transport,
        Some(code) => close_code(code).map_or(CloseClass::Resumable, |row| row.class),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_table_matches_facts_sheet() {
        for code in [4000, 4001, 4002, 4008] {
            assert_eq!(classify_close(Some(code)), CloseClass::Resumable, "{code}");
        }
        for code in [4003, 4005, 4007, 4009] {
            assert_eq!(classify_close(Some(code)), CloseClass::Reidentify, "{code}");
        }
        for code in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert_eq!(classify_close(Some(code)), CloseClass::Fatal, "{code}");
        }
        assert_eq!(classify_close(None), CloseClass::Transport);
        assert_eq!(
            classify_close(Some(4006)),
            CloseClass::Resumable,
            "not a gateway code"
        );
        assert_eq!(classify_close(Some(1006)), CloseClass::Resumable);
        assert!(close_code(4006).is_none());
    }

    #[test]
    fn advice_leaves_the_next_step_to_the_shard() {
        // Whether a resumable close resumes depends on whether a session
        // exists; the shard says which, so the table must not.
        for row in CLOSE_CODES.iter().filter(|r| r.class != CloseClass::Fatal) {
            for word in ["resuming", "resumes", "identifying"] {
                assert!(!row.advice.contains(word), "{}: {}", row.code, row.advice);
            }
        }
    }

    #[test]
    fn daemon_close_code_keeps_sessions() {
        let code = std::hint::black_box(CLOSE_RESUMABLE);
        assert!(code != 1000 && code != 1001);
        assert!((4000..5000).contains(&code));
    }
}
