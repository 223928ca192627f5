//! Server-side compression for drop-in clients: the mirror of
//! [`crate::compression`]. One context per client connection, as Discord
//! keeps one per connection (facts §1.3, §1.4).

use flate2::{Compress, FlushCompress};
use tokio_tungstenite::tungstenite::Message;
use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

use crate::compression::Compression;

/// How a client's frames are encoded.
pub enum Deflater {
    /// Text frames.
    None,
    /// IDENTIFY `compress: true` without transport compression: large
    /// payloads go as binary frames, each its own zlib stream (facts §1.4);
    /// small ones stay text.
    PerMessage,
    /// zlib-stream: one deflate stream, sync-flushed after every message.
    Zlib(Box<Compress>),
    /// zstd-stream: one zstd frame for the connection, flushed per message.
    Zstd(Box<Encoder<'static>>),
}

/// Payloads at least this long are compressed under `compress: true`.
const PER_MESSAGE_MIN: usize = 1024;

impl Deflater {
    /// A fresh context for a new connection.
    pub fn new(compression: Compression) -> std::io::Result<Deflater> {
        Ok(match compression {
            Compression::None => Deflater::None,
            Compression::ZlibStream => {
                Deflater::Zlib(Box::new(Compress::new(flate2::Compression::fast(), true)))
            }
            Compression::ZstdStream => Deflater::Zstd(Box::new(Encoder::new(1)?)),
        })
    }

    /// Switch to per-message compression (IDENTIFY `compress: true`); a
    /// connection with transport compression ignores it, as Discord does.
    pub fn enable_per_message(&mut self) {
        if matches!(self, Deflater::None) {
            *self = Deflater::PerMessage;
        }
    }

    /// One gateway payload as one WebSocket message.
    pub fn encode(&mut self, json: String) -> std::io::Result<Message> {
        match self {
            Deflater::None => Ok(Message::text(json)),
            Deflater::PerMessage if json.len() < PER_MESSAGE_MIN => Ok(Message::text(json)),
            Deflater::PerMessage => {
                let mut ctx = Compress::new(flate2::Compression::fast(), true);
                let mut out = Vec::with_capacity(json.len() / 3 + 64);
                deflate_all(&mut ctx, json.as_bytes(), &mut out, FlushCompress::Finish)?;
                Ok(Message::binary(out))
            }
            Deflater::Zlib(ctx) => {
                let mut out = Vec::with_capacity(json.len() / 3 + 64);
                deflate_all(ctx, json.as_bytes(), &mut out, FlushCompress::Sync)?;
                Ok(Message::binary(out))
            }
            Deflater::Zstd(encoder) => {
                let mut out = Vec::with_capacity(json.len() / 3 + 64);
                let mut input = InBuffer::around(json.as_bytes());
                let mut chunk = vec![0u8; 32 * 1024];
                while input.pos() < json.len() {
                    let mut output = OutBuffer::around(&mut chunk[..]);
                    encoder.run(&mut input, &mut output)?;
                    let n = output.pos();
                    out.extend_from_slice(&chunk[..n]);
                }
                loop {
                    let mut output = OutBuffer::around(&mut chunk[..]);
                    let remaining = encoder.flush(&mut output)?;
                    let n = output.pos();
                    out.extend_from_slice(&chunk[..n]);
                    if remaining == 0 {
                        break;
                    }
                }
                Ok(Message::binary(out))
            }
        }
    }
}

fn deflate_all(
    ctx: &mut Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    flush: FlushCompress,
) -> std::io::Result<()> {
    loop {
        out.reserve(input.len() / 2 + 1024);
        let before = ctx.total_in();
        ctx.compress_vec(input, out, flush)
            .map_err(std::io::Error::other)?;
        input = &input[(ctx.total_in() - before) as usize..];
        // Spare room left after the call: nothing more is pending.
        if input.is_empty() && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Inflater;

    fn roundtrip(compression: Compression) {
        let mut deflater = Deflater::new(compression).expect("deflater");
        let mut inflater = Inflater::new(compression).expect("inflater");
        let big = format!("{{\"x\":\"{}\"}}", "abc".repeat(50_000));
        for payload in [
            "{\"op\":10}".to_string(),
            big.clone(),
            "{\"op\":11}".to_string(),
        ] {
            let message = deflater.encode(payload.clone()).expect("encode");
            let bytes = message.into_data();
            let mut out = Vec::new();
            assert!(
                inflater.push(&bytes, &mut out).expect("inflate"),
                "complete message"
            );
            assert_eq!(out, payload.as_bytes());
        }
    }

    #[test]
    fn zlib_stream_roundtrips_through_the_client_inflater() {
        roundtrip(Compression::ZlibStream);
    }

    #[test]
    fn zstd_stream_roundtrips_through_the_client_inflater() {
        roundtrip(Compression::ZstdStream);
    }

    #[test]
    fn per_message_zlib_is_one_stream_per_payload() {
        let mut deflater = Deflater::new(Compression::None).expect("deflater");
        deflater.enable_per_message();
        assert!(deflater.encode("{}".to_string()).expect("small").is_text());
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(5000));
        let bytes = deflater.encode(big.clone()).expect("big").into_data();
        let mut inflated = String::new();
        use std::io::Read;
        flate2::read::ZlibDecoder::new(&bytes[..])
            .read_to_string(&mut inflated)
            .expect("own zlib stream");
        assert_eq!(inflated, big);
    }
}
