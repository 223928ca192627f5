//! The bot socket protocol, version 1 (DESIGN.md §3): what a bot may send,
//! how each line is checked, and the lines the daemon answers with.
//!
//! Parsing is strict about what the contract requires and lenient about
//! what it does not: unknown fields are ignored (a newer bot may send more),
//! but a missing or mistyped field is a `bad_request` whose message names
//! the field. Dispatch lines are not built here: the event log builds each
//! one once and every bot shares it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::gateway::MAX_SEND_PAYLOAD;

/// The protocol version this daemon speaks (`hello.v`, `welcome.v`).
pub const PROTOCOL_VERSION: u64 = 1;

/// The `client` name `shardwarden status` says hello with: a query, not a
/// bot, so it is not counted in `bot_clients`.
pub const STATUS_CLIENT: &str = "shardwarden-status";

/// Longest line a bot may send, newline excluded (DESIGN.md §3: 64 KiB).
pub const MAX_LINE: usize = 64 * 1024;

/// Error codes of `{"op":"error"}` lines. The first nine are the contract;
/// the rest are additions (new codes are allowed within version 1).
pub mod code {
    /// Malformed input: bad JSON, unknown op, missing or mistyped field,
    /// over-long line, a request before `hello`.
    pub const BAD_REQUEST: &str = "bad_request";
    /// No `hello` within 5 s of connecting; the daemon closes.
    pub const HELLO_TIMEOUT: &str = "hello_timeout";
    /// `hello.v` is not a version this daemon speaks.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// `hello.events` names an event the daemon is not configured to receive.
    pub const UNSUBSCRIBED_EVENT: &str = "unsubscribed_event";
    /// `send` with an opcode that is not a bot command.
    pub const OP_NOT_ALLOWED: &str = "op_not_allowed";
    /// `send` whose serialized payload is over [`crate::gateway::MAX_SEND_PAYLOAD`] bytes.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// `send` to (or routed to) a shard this daemon does not own.
    pub const SHARD_NOT_OWNED: &str = "shard_not_owned";
    /// The shard cannot take the command now (not running, queue full,
    /// reply lost).
    pub const SHARD_UNAVAILABLE: &str = "shard_unavailable";
    /// The shard's send limiter refused the command.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// Addition: session reports were dropped because this bot read too
    /// slowly; the connection goes on.
    pub const DIAGNOSTICS_LAGGED: &str = "diagnostics_lagged";
}

/// The gateway opcodes a bot may send (DESIGN.md §3.3, facts sheet §9).
pub const BOT_COMMANDS: &[(u64, &str)] = &[
    (3, "presence update"),
    (4, "voice state update"),
    (8, "request guild members"),
    (31, "request soundboard sounds"),
    (43, "request channel info"),
];

/// Opcodes that only the daemon sends, because they belong to a session.
const DAEMON_OPCODES: &[(u64, &str)] = &[(1, "heartbeat"), (2, "identify"), (6, "resume")];

/// Op 31, the one command whose payload names several guilds.
pub const OP_REQUEST_SOUNDBOARD_SOUNDS: u64 = 31;

/// One request from a bot.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `{"op":"hello",...}`.
    Hello(Hello),
    /// `{"op":"ack","cursor":N}`.
    Ack {
        /// Everything up to this cursor is done with.
        cursor: u64,
    },
    /// `{"op":"send",...}`.
    Send(SendRequest),
    /// `{"op":"status"}`.
    Status,
}

/// The handshake a bot opens with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hello {
    /// Protocol version the bot speaks.
    pub v: u64,
    /// The bot's name, for logs (optional).
    #[serde(default)]
    pub client: String,
    /// Dispatch names, or `["*"]` for every configured event.
    pub events: Vec<String>,
    /// Whether to receive `session` and periodic `health` lines (optional,
    /// default false).
    #[serde(default)]
    pub diagnostics: bool,
    /// The last cursor the bot finished with; `null` (or absent) = live only,
    /// `0` = everything held.
    #[serde(default)]
    pub resume_from: Option<u64>,
}

/// A gateway command a bot wants sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    /// The bot's id for this request, echoed in `sent` / `error` (a JSON
    /// string or number).
    pub id: Value,
    /// How the shard is picked.
    pub target: SendTarget,
    /// What goes to Discord.
    pub command: GatewayCommand,
}

/// How a `send` picks its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendTarget {
    /// `shard` given: that shard, payload untouched.
    Shard(u32),
    /// `guild_id` given: the shard that owns the guild.
    Guild(u64),
    /// Op 31 without `shard` or `guild_id`: each guild in `d.guild_ids` goes
    /// to its owning shard (split into one payload per shard).
    GuildIds,
}

/// A checked gateway command: an allowed opcode and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayCommand {
    /// Gateway opcode (one of [`BOT_COMMANDS`]).
    pub op: u64,
    /// The command's `d`.
    pub d: Value,
    /// `{"op":..,"d":..}` as it will be sent (compact JSON, at most [`MAX_SEND_PAYLOAD`] bytes).
    pub payload: String,
}

#[derive(Serialize)]
struct PayloadOut<'a> {
    op: u64,
    d: &'a Value,
}

impl GatewayCommand {
    fn new(op: u64, d: Value) -> Self {
        let payload = serde_json::to_string(&PayloadOut { op, d: &d }).unwrap_or_default();
        GatewayCommand { op, d, payload }
    }

    /// Op 31's `d.guild_ids`, parsed as snowflakes.
    pub fn guild_ids(&self) -> Result<Vec<u64>, String> {
        let ids = self
            .d
            .get("guild_ids")
            .ok_or("op 31 without `shard` or `guild_id` needs `payload.d.guild_ids` to route by")?;
        let ids = ids
            .as_array()
            .ok_or("`payload.d.guild_ids` must be an array of snowflakes")?;
        if ids.is_empty() {
            return Err("`payload.d.guild_ids` is empty".into());
        }
        ids.iter()
            .map(|id| snowflake(id).map_err(|e| format!("`payload.d.guild_ids`: {e}")))
            .collect()
    }

    /// This op 31 command's payload with `d.guild_ids` replaced by `ids`
    /// (every other field of `d` kept).
    pub fn payload_for_guilds(&self, ids: &[u64]) -> String {
        let mut d = self.d.clone();
        if let Some(map) = d.as_object_mut() {
            let ids = ids.iter().map(|id| Value::String(id.to_string())).collect();
            map.insert("guild_ids".into(), Value::Array(ids));
        }
        GatewayCommand::new(self.op, d).payload
    }
}

/// Why a request was refused: an `error` line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProtocolError {
    /// Always `"error"`.
    op: &'static str,
    /// The `send` id this answers, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// One of [`code`].
    pub code: &'static str,
    /// What was wrong and what to do, for a human.
    pub message: String,
    /// Optional extra fields some codes carry.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Box<ErrorDetail>>,
}

/// Extra fields of an `error` line (additions within protocol version 1).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorDetail {
    /// `unsubscribed_event`: the names that are not configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_events: Option<Vec<String>>,
    /// `unsubscribed_event`: the names that are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configured_events: Option<Vec<String>>,
    /// `diagnostics_lagged`: how many session reports were dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// A split `send` that reached some shards before one refused: where it
    /// did go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_shards: Option<Vec<u32>>,
}

impl ProtocolError {
    /// An error with `code` and `message`, answering no request id.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ProtocolError {
            op: "error",
            id: None,
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// A `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ProtocolError::new(code::BAD_REQUEST, message)
    }

    /// The same error, answering request `id`.
    pub fn with_id(mut self, id: Option<Value>) -> Self {
        self.id = id;
        self
    }

    /// The same error, with extra fields.
    pub fn with_detail(mut self, detail: ErrorDetail) -> Self {
        self.detail = Some(Box::new(detail));
        self
    }

    /// The `error` line, `\n` included.
    pub fn line(&self) -> Bytes {
        to_line(self)
    }
}

/// Parse one line from a bot (without its `\n`).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|e| {
        ProtocolError::bad_request(format!(
            "line is not valid UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::bad_request(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ProtocolError::bad_request(format!(
            "a message must be a JSON object, got {}",
            kind_of(&value)
        )));
    };
    let op = match obj.get("op") {
        None => return Err(ProtocolError::bad_request("missing field `op`")),
        Some(Value::String(op)) => op.clone(),
        Some(other) => {
            return Err(ProtocolError::bad_request(format!(
                "`op` must be a string, got {}",
                kind_of(other)
            )));
        }
    };
    match op.as_str() {
        "hello" => serde_json::from_value::<Hello>(Value::Object(obj))
            .map(Request::Hello)
            .map_err(|e| ProtocolError::bad_request(format!("hello: {e}"))),
        "ack" => {
            #[derive(Deserialize)]
            struct Ack {
                cursor: u64,
            }
            serde_json::from_value::<Ack>(Value::Object(obj))
                .map(|ack| Request::Ack { cursor: ack.cursor })
                .map_err(|e| ProtocolError::bad_request(format!("ack: {e}")))
        }
        "status" => Ok(Request::Status),
        "send" => parse_send(obj).map(Request::Send),
        other => Err(ProtocolError::bad_request(format!(
            "unknown op {:?} (expected \"hello\", \"ack\", \"send\" or \"status\")",
            clip(other)
        ))),
    }
}

fn parse_send(mut obj: Map<String, Value>) -> Result<SendRequest, ProtocolError> {
    let id = match obj.remove("id") {
        None => return Err(ProtocolError::bad_request("send: missing field `id`")),
        Some(id @ (Value::String(_) | Value::Number(_))) => id,
        Some(other) => {
            return Err(ProtocolError::bad_request(format!(
                "send: `id` must be a string or a number, got {}",
                kind_of(&other)
            )));
        }
    };
    let fail = |code, message: String| ProtocolError::new(code, message).with_id(Some(id.clone()));
    let bad = |message: String| fail(code::BAD_REQUEST, message);

    let mut payload = match obj.remove("payload") {
        None => return Err(bad("send: missing field `payload`".into())),
        Some(Value::Object(payload)) => payload,
        Some(other) => {
            return Err(bad(format!(
                "send: `payload` must be an object {{\"op\":..,\"d\":..}}, got {}",
                kind_of(&other)
            )));
        }
    };
    let op = match payload.get("op") {
        None => return Err(bad("send: missing field `payload.op`".into())),
        Some(op) => op.as_u64().ok_or_else(|| {
            bad(format!(
                "send: `payload.op` must be a gateway opcode (unsigned integer), got {}",
                clip(&op.to_string())
            ))
        })?,
    };
    if !BOT_COMMANDS.iter().any(|&(allowed, _)| allowed == op) {
        let allowed = BOT_COMMANDS
            .iter()
            .map(|(op, name)| format!("{op} {name}"))
            .collect::<Vec<_>>()
            .join(", ");
        let message = match DAEMON_OPCODES.iter().find(|&&(daemon, _)| daemon == op) {
            Some((_, name)) => format!(
                "op {op} ({name}) belongs to the daemon, which keeps the session; bots may send {allowed}"
            ),
            None => format!("op {op} is not a bot command; bots may send {allowed}"),
        };
        return Err(fail(code::OP_NOT_ALLOWED, message));
    }
    let Some(d) = payload.remove("d") else {
        return Err(bad("send: missing field `payload.d`".into()));
    };

    let shard = match obj.get("shard") {
        None | Some(Value::Null) => None,
        Some(shard) => Some(
            shard
                .as_u64()
                .and_then(|s| u32::try_from(s).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "send: `shard` must be a shard id (u32), got {}",
                        clip(&shard.to_string())
                    ))
                })?,
        ),
    };
    let guild = match obj.get("guild_id") {
        None | Some(Value::Null) => None,
        Some(guild) => Some(snowflake(guild).map_err(|e| bad(format!("send: `guild_id`: {e}")))?),
    };
    let target = match (shard, guild) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "send: give either `shard` or `guild_id`, not both".into()
            ));
        }
        (Some(shard), None) => SendTarget::Shard(shard),
        (None, Some(guild)) => SendTarget::Guild(guild),
        (None, None) if op == OP_REQUEST_SOUNDBOARD_SOUNDS => SendTarget::GuildIds,
        (None, None) => {
            return Err(bad(
                "send: give `shard` or `guild_id` so the daemon knows which shard sends it".into(),
            ));
        }
    };

    let command = GatewayCommand::new(op, d);
    if target == SendTarget::GuildIds {
        command.guild_ids().map_err(|e| bad(format!("send: {e}")))?;
    }
    if command.payload.len() > MAX_SEND_PAYLOAD {
        return Err(fail(
            code::PAYLOAD_TOO_LARGE,
            format!(
                "payload is {} bytes serialized; Discord allows at most {MAX_SEND_PAYLOAD} bytes per gateway payload",
                command.payload.len()
            ),
        ));
    }
    Ok(SendRequest {
        id,
        target,
        command,
    })
}

/// A snowflake given as a JSON string of digits or as a number.
fn snowflake(value: &Value) -> Result<u64, String> {
    match value {
        Value::String(s) => s
            .parse::<u64>()
            .map_err(|_| format!("{:?} is not a snowflake (a decimal u64)", clip(s))),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a snowflake (a decimal u64)")),
        other => Err(format!(
            "a snowflake must be a string or a number, got {}",
            kind_of(other)
        )),
    }
}

/// At most 40 characters of something a bot sent, for an error message.
fn clip(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn to_line<T: Serialize>(message: &T) -> Bytes {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The daemon's answer to `hello`.
#[derive(Debug, Clone, Serialize)]
pub struct Welcome {
    /// Always `"welcome"`.
    pub op: &'static str,
    /// Protocol version.
    pub v: u64,
    /// The daemon's version.
    pub version: &'static str,
    /// Total shard count.
    pub shard_total: u32,
    /// The shards this daemon owns.
    pub shards: Vec<u32>,
    /// Newest cursor.
    pub head: u64,
    /// Oldest cursor still held (`null` when nothing is held).
    pub oldest: Option<u64>,
    /// Cursors after `resume_from` that are no longer held.
    pub missed: u64,
    /// Addition: set when `resume_from` was ahead of `head` (a cursor from
    /// another daemon, or the daemon lost its state); delivery starts live
    /// from `head`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resume_from_ahead: bool,
    /// Addition: a human-readable note about how delivery starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

impl Welcome {
    /// The `welcome` line.
    pub fn line(&self) -> Bytes {
        to_line(self)
    }
}

/// `{"op":"gap","from":F,"to":T,"missed":N}`: cursors `from..=to` are lost;
/// `missed` of them were events (cursors of an earlier daemon life that were
/// never used, or whose events Discord redelivered, are not counted).
pub fn gap_line(from: u64, to: u64, missed: u64) -> Bytes {
    #[derive(Serialize)]
    struct Gap {
        op: &'static str,
        from: u64,
        to: u64,
        missed: u64,
    }
    to_line(&Gap {
        op: "gap",
        from,
        to,
        missed,
    })
}

/// Why the daemon closes a bot's socket on purpose (`closing.reason`).
pub mod closing {
    /// The daemon is stopping (SIGTERM, SIGINT, or it cannot go on).
    pub const SHUTDOWN: &str = "shutdown";
}

/// `{"op":"closing","reason":..,"detail":..}`: the last line before the
/// daemon closes the socket on purpose (DESIGN.md §3.2), so a bot can tell
/// a clean stop or restart from a crash and reconnect quietly.
pub fn closing_line(reason: &str, detail: &str) -> Bytes {
    #[derive(Serialize)]
    struct Closing<'a> {
        op: &'static str,
        reason: &'a str,
        detail: &'a str,
    }
    to_line(&Closing {
        op: "closing",
        reason,
        detail,
    })
}

/// `{"op":"sent","id":..,"shard":..}`; a split op 31 adds every shard in
/// `shards` (the first is `shard`).
pub fn sent_line(id: &Value, shards: &[u32]) -> Bytes {
    #[derive(Serialize)]
    struct Sent<'a> {
        op: &'static str,
        id: &'a Value,
        shard: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        shards: Option<&'a [u32]>,
    }
    to_line(&Sent {
        op: "sent",
        id,
        shard: shards.first().copied().unwrap_or_default(),
        shards: (shards.len() > 1).then_some(shards),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(line: &str) -> ProtocolError {
        parse_request(line.as_bytes()).expect_err("should be refused")
    }

    #[test]
    fn parses_hello_with_defaults() {
        let req = parse_request(br#"{"op":"hello","v":1,"events":["*"]}"#).unwrap();
        assert_eq!(
            req,
            Request::Hello(Hello {
                v: 1,
                client: String::new(),
                events: vec!["*".into()],
                diagnostics: false,
                resume_from: None,
            })
        );
        let req = parse_request(
            br#"{"op":"hello","v":1,"client":"b","events":["A"],"diagnostics":true,"resume_from":7,"future":1}"#,
        )
        .unwrap();
        let Request::Hello(hello) = req else { panic!() };
        assert_eq!((hello.resume_from, hello.diagnostics), (Some(7), true));
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        assert!(err("{nope").message.starts_with("invalid JSON"));
        assert!(err("[1]").message.contains("JSON object"));
        assert!(err(r#"{"v":1}"#).message.contains("`op`"));
        assert!(err(r#"{"op":5}"#).message.contains("`op` must be a string"));
        assert!(
            err(r#"{"op":"dance"}"#)
                .message
                .contains("unknown op \"dance\"")
        );
        assert!(
            err(r#"{"op":"hello","v":1}"#)
                .message
                .contains("missing field `events`")
        );
        assert!(
            err(r#"{"op":"ack"}"#)
                .message
                .contains("missing field `cursor`")
        );
        assert!(
            err(r#"{"op":"ack","cursor":"x"}"#)
                .message
                .contains("invalid type")
        );
        let e = parse_request(b"{\"op\":\"st\xffatus\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        assert_eq!(e.code, code::BAD_REQUEST);
    }

    #[test]
    fn send_checks_op_target_and_size() {
        let e = err(r#"{"op":"send","id":"a","shard":0,"payload":{"op":2,"d":{}}}"#);
        assert_eq!(
            (e.code, e.id.clone()),
            (code::OP_NOT_ALLOWED, Some(json!("a")))
        );
        assert!(e.message.contains("identify") && e.message.contains("daemon"));
        let e = err(r#"{"op":"send","id":"a","shard":0,"payload":{"op":0,"d":{}}}"#);
        assert_eq!(e.code, code::OP_NOT_ALLOWED);
        let e = err(r#"{"op":"send","id":"a","shard":0,"guild_id":"1","payload":{"op":3,"d":{}}}"#);
        assert_eq!(e.code, code::BAD_REQUEST);
        let e = err(r#"{"op":"send","id":"a","payload":{"op":3,"d":{}}}"#);
        assert_eq!(e.code, code::BAD_REQUEST);
        let e = err(r#"{"op":"send","shard":0,"payload":{"op":3,"d":{}}}"#);
        assert_eq!((e.code, e.id), (code::BAD_REQUEST, None));
        let big = "x".repeat(MAX_SEND_PAYLOAD);
        let e = err(&format!(
            r#"{{"op":"send","id":1,"shard":0,"payload":{{"op":3,"d":{{"s":"{big}"}}}}}}"#
        ));
        assert_eq!(e.code, code::PAYLOAD_TOO_LARGE);

        let Request::Send(send) = parse_request(
            br#"{"op":"send","id":"a2","guild_id":81384788765712384,"payload":{"op":8, "d":{"x": 1}}}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(send.target, SendTarget::Guild(81384788765712384));
        assert_eq!(send.command.payload, r#"{"op":8,"d":{"x":1}}"#);
    }

    #[test]
    fn op31_routes_by_guild_ids() {
        let Request::Send(send) = parse_request(
            br#"{"op":"send","id":"s","payload":{"op":31,"d":{"guild_ids":["1",2]}}}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(send.target, SendTarget::GuildIds);
        assert_eq!(send.command.guild_ids().unwrap(), vec![1, 2]);
        assert_eq!(
            send.command.payload_for_guilds(&[2]),
            r#"{"op":31,"d":{"guild_ids":["2"]}}"#
        );
        let e = err(r#"{"op":"send","id":"s","payload":{"op":31,"d":{}}}"#);
        assert!(e.message.contains("guild_ids"));
    }

    #[test]
    fn outgoing_lines() {
        assert_eq!(
            &gap_line(6, 10, 5)[..],
            b"{\"op\":\"gap\",\"from\":6,\"to\":10,\"missed\":5}\n"
        );
        assert_eq!(
            &sent_line(&json!("a1"), &[3])[..],
            b"{\"op\":\"sent\",\"id\":\"a1\",\"shard\":3}\n"
        );
        let line = ProtocolError::bad_request("x").line();
        assert_eq!(
            &line[..],
            b"{\"op\":\"error\",\"code\":\"bad_request\",\"message\":\"x\"}\n"
        );
    }
}
