//! The gateway payload envelope (`op`, `s`, `t`, `d`): the only part of a
//! dispatch the daemon parses. `d` stays the raw bytes Discord sent.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One received gateway payload, borrowing from the inflated buffer.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// Opcode.
    pub op: u8,
    /// Sequence number (dispatches only).
    #[serde(default)]
    pub s: Option<u64>,
    /// Event name (dispatches only); borrowed unless it holds escapes.
    #[serde(default, borrow, deserialize_with = "borrowed_name")]
    pub t: Option<Cow<'a, str>>,
    /// Event data, unparsed. Absent and `null` both read as `None`.
    #[serde(default, borrow)]
    pub d: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    /// Parse one payload. Only the envelope is decoded; `d` is checked for
    /// well-formedness and kept as a slice.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// `d` as raw JSON text (`null` when absent).
    pub fn raw_d(&self) -> &'a str {
        self.d.map_or("null", RawValue::get)
    }
}

/// `Option<Cow<str>>` that borrows from the payload. serde's `borrow` only
/// reaches a `Cow` that is the field itself; inside an `Option` the `Cow`
/// would be deserialized owned, one `String` per dispatch.
fn borrowed_name<'de, D>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Name<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Name<'de>>::deserialize(deserializer)?.map(|name| name.0))
}

/// The parts of READY the daemon needs.
#[derive(Debug, Deserialize)]
pub struct Ready {
    /// Session id for RESUME.
    pub session_id: String,
    /// Where to RESUME (absent on very old gateways: resume on the main URL).
    #[serde(default)]
    pub resume_gateway_url: Option<String>,
}

/// HELLO's data.
#[derive(Debug, Deserialize)]
pub struct Hello {
    /// Milliseconds between heartbeats.
    pub heartbeat_interval: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_keeps_d_raw() {
        let text = br#"{"t":"MESSAGE_CREATE","s":42,"op":0,"d":{"content":"a \"b\"","nested":{"x":[1,2]}}}"#;
        let env = Envelope::parse(text).expect("parses");
        assert_eq!(env.op, 0);
        assert_eq!(env.s, Some(42));
        assert_eq!(env.t.as_deref(), Some("MESSAGE_CREATE"));
        assert_eq!(env.raw_d(), r#"{"content":"a \"b\"","nested":{"x":[1,2]}}"#);
    }

    #[test]
    fn event_name_is_borrowed_unless_escaped() {
        let env =
            Envelope::parse(br#"{"op":0,"s":1,"t":"MESSAGE_CREATE","d":{}}"#).expect("parses");
        assert!(matches!(env.t, Some(Cow::Borrowed("MESSAGE_CREATE"))));
        let env = Envelope::parse(br#"{"op":0,"s":1,"t":"A\u0042C","d":{}}"#).expect("escaped");
        assert_eq!(env.t.as_deref(), Some("ABC"));
        let env = Envelope::parse(br#"{"op":11,"t":null}"#).expect("null t");
        assert!(env.t.is_none());
    }

    #[test]
    fn lenient_about_missing_and_null_fields() {
        let env = Envelope::parse(br#"{"op":11}"#).expect("ack without d");
        assert_eq!(
            (env.op, env.s, env.t.is_none(), env.d.is_none()),
            (11, None, true, true)
        );
        let env = Envelope::parse(br#"{"op":7,"d":null,"s":null,"t":null}"#).expect("op 7");
        assert_eq!(env.op, 7);
        let env = Envelope::parse(br#"{"op":9,"d":false,"extra":{"ignored":true}}"#).expect("op 9");
        assert_eq!(env.raw_d(), "false");
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(Envelope::parse(b"{\"op\":0,\"d\":{").is_err());
        assert!(Envelope::parse(b"not json").is_err());
        assert!(Envelope::parse(b"{\"op\":\"zero\"}").is_err());
        assert!(Envelope::parse(b"{\"op\":999}").is_err());
    }
}
