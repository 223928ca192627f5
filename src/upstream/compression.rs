//! Transport compression, client side: one decompression context per
//! connection (Discord shares it across every message of the connection),
//! created fresh for each new connection and dropped with it.

use flate2::{Decompress, FlushDecompress, Status};

/// Largest inflated gateway message accepted. Discord's biggest payloads
/// (READY, GUILD_CREATE of huge guilds) are a few MiB; anything far beyond is
/// a corrupt or hostile stream.
pub const MAX_MESSAGE: usize = 64 << 20;

/// `compress=` query value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// No transport compression: text frames.
    None,
    /// One zlib stream per connection, each message ending with `00 00 ff ff`.
    ZlibStream,
    /// One zstd frame per connection, never ended.
    ZstdStream,
}

impl Compression {
    /// Parse the config / query spelling.
    pub fn from_name(name: &str) -> Option<Compression> {
        match name {
            "none" => Some(Compression::None),
            "zlib-stream" => Some(Compression::ZlibStream),
            "zstd-stream" => Some(Compression::ZstdStream),
            _ => None,
        }
    }

    /// The config / query spelling.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::ZlibStream => "zlib-stream",
            Compression::ZstdStream => "zstd-stream",
        }
    }

    /// The `&compress=…` suffix of the connect URL ("" for none).
    pub fn query(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::ZlibStream => "&compress=zlib-stream",
            Compression::ZstdStream => "&compress=zstd-stream",
        }
    }
}

/// Why a frame could not be decompressed.
#[derive(Debug)]
pub enum InflateError {
    /// The compressed bytes are not a valid stream.
    Corrupt(String),
    /// The message inflates beyond [`MAX_MESSAGE`].
    TooLarge(usize),
}

impl std::fmt::Display for InflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InflateError::Corrupt(e) => write!(f, "corrupt compressed frame: {e}"),
            InflateError::TooLarge(n) => {
                write!(f, "message inflates past {n} bytes (limit {MAX_MESSAGE})")
            }
        }
    }
}

const ZLIB_SUFFIX: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The per-connection decompressor.
pub enum Inflater {
    /// Frames are the messages.
    None,
    /// zlib-stream: buffered partial chunks and the shared inflate context.
    Zlib {
        /// Inflate context shared by every message of the connection.
        ctx: Box<Decompress>,
        /// Compressed bytes of a message not yet complete.
        pending: Vec<u8>,
    },
    /// zstd-stream: the shared decompression context.
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

impl Inflater {
    /// A fresh context for a new connection.
    pub fn new(compression: Compression) -> Result<Inflater, InflateError> {
        Ok(match compression {
            Compression::None => Inflater::None,
            Compression::ZlibStream => Inflater::Zlib {
                ctx: Box::new(Decompress::new(true)),
                pending: Vec::new(),
            },
            Compression::ZstdStream => Inflater::Zstd(Box::new(
                zstd::stream::raw::Decoder::new()
                    .map_err(|e| InflateError::Corrupt(e.to_string()))?,
            )),
        })
    }

    /// Feed one binary WebSocket message. Returns `Ok(true)` when `out` now
    /// holds one complete gateway message (cleared first), `Ok(false)` when
    /// the message was a partial zlib chunk.
    pub fn push(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<bool, InflateError> {
        out.clear();
        match self {
            Inflater::None => {
                out.extend_from_slice(frame);
                Ok(true)
            }
            Inflater::Zlib { ctx, pending } => {
                // Fast path: a whole message in one frame, nothing buffered.
                if pending.is_empty() && frame.ends_with(&ZLIB_SUFFIX) {
                    return inflate_zlib(ctx, frame, out).map(|()| true);
                }
                if pending.len() + frame.len() > MAX_MESSAGE {
                    let n = pending.len() + frame.len();
                    pending.clear();
                    return Err(InflateError::TooLarge(n));
                }
                pending.extend_from_slice(frame);
                if !pending.ends_with(&ZLIB_SUFFIX) {
                    return Ok(false);
                }
                let result = inflate_zlib(ctx, pending, out);
                pending.clear();
                if pending.capacity() > 256 << 10 {
                    // Do not pin a huge message's buffer for the connection's life.
                    *pending = Vec::new();
                }
                result.map(|()| true)
            }
            Inflater::Zstd(decoder) => {
                inflate_zstd(decoder, frame, out)?;
                Ok(true)
            }
        }
    }
}

fn inflate_zlib(
    ctx: &mut Decompress,
    mut input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    if out.capacity() < input.len() * 4 {
        out.reserve(input.len() * 4);
    }
    loop {
        let before_in = ctx.total_in();
        let before_out = ctx.total_out();
        if out.len() == out.capacity() {
            if out.len() >= MAX_MESSAGE {
                return Err(InflateError::TooLarge(out.len()));
            }
            out.reserve(out.capacity().max(4096));
        }
        let status = ctx
            .decompress_vec(input, out, FlushDecompress::Sync)
            .map_err(|e| InflateError::Corrupt(e.to_string()))?;
        let consumed = (ctx.total_in() - before_in) as usize;
        let produced = (ctx.total_out() - before_out) as usize;
        input = &input[consumed..];
        match status {
            Status::StreamEnd => return Ok(()),
            Status::Ok | Status::BufError => {
                if input.is_empty() && out.len() < out.capacity() {
                    return Ok(());
                }
                if consumed == 0 && produced == 0 && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt("inflate made no progress".into()));
                }
            }
        }
    }
}

fn inflate_zstd(
    decoder: &mut zstd::stream::raw::Decoder<'static>,
    frame: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut input = InBuffer::around(frame);
    if out.capacity() < frame.len() * 4 {
        out.reserve(frame.len() * 4);
    }
    loop {
        if out.len() == out.capacity() {
            if out.len() >= MAX_MESSAGE {
                return Err(InflateError::TooLarge(out.len()));
            }
            out.reserve(out.capacity().max(4096));
        }
        let len = out.len();
        let spare = out.capacity() - len;
        // Decode into the spare capacity: OutBuffer tracks how much is filled.
        out.resize(len + spare, 0);
        let written = {
            let mut output = OutBuffer::around_pos(&mut out[..], len);
            decoder
                .run(&mut input, &mut output)
                .map_err(|e| InflateError::Corrupt(e.to_string()))?;
            output.pos()
        };
        out.truncate(written);
        // Done once the input is consumed and the decoder did not fill the
        // whole buffer (which would mean more output may be pending).
        if input.pos() == frame.len() && written < len + spare {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, FlushCompress};

    fn zlib_stream(messages: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut c = Compress::new(flate2::Compression::default(), true);
        messages
            .iter()
            .map(|m| {
                let mut out = Vec::with_capacity(m.len() + 64);
                let mut input: &[u8] = m;
                loop {
                    let before = c.total_in();
                    out.reserve(256);
                    c.compress_vec(input, &mut out, FlushCompress::Sync)
                        .expect("compress");
                    input = &input[(c.total_in() - before) as usize..];
                    if input.is_empty() && out.ends_with(&ZLIB_SUFFIX) {
                        break;
                    }
                }
                out
            })
            .collect()
    }

    #[test]
    fn zlib_stream_shares_context_across_messages() {
        let msgs: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                format!(
                    "{{\"op\":0,\"s\":{i},\"t\":\"X\",\"d\":{{\"n\":\"{}\"}}}}",
                    "ab".repeat(i * 10)
                )
                .into_bytes()
            })
            .collect();
        let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
        let frames = zlib_stream(&refs);
        let mut inflater = Inflater::new(Compression::ZlibStream).expect("new");
        let mut out = Vec::new();
        for (frame, want) in frames.iter().zip(&msgs) {
            assert!(inflater.push(frame, &mut out).expect("inflates"));
            assert_eq!(&out, want);
        }
    }

    #[test]
    fn zlib_message_split_across_frames() {
        let msg = b"{\"op\":10,\"d\":{\"heartbeat_interval\":41250}}".repeat(20);
        let frames = zlib_stream(&[&msg]);
        let frame = &frames[0];
        let mut inflater = Inflater::new(Compression::ZlibStream).expect("new");
        let mut out = Vec::new();
        let (a, b) = frame.split_at(frame.len() / 2);
        assert!(!inflater.push(a, &mut out).expect("partial"));
        assert!(inflater.push(b, &mut out).expect("complete"));
        assert_eq!(out, msg);
    }

    #[test]
    fn corrupt_zlib_is_an_error_not_a_panic() {
        let mut inflater = Inflater::new(Compression::ZlibStream).expect("new");
        let mut out = Vec::new();
        let garbage = [0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0xff, 0xff];
        assert!(matches!(
            inflater.push(&garbage, &mut out),
            Err(InflateError::Corrupt(_))
        ));
    }

    #[test]
    fn zstd_stream_across_messages() {
        use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
        let mut enc = Encoder::new(3).expect("encoder");
        let mut inflater = Inflater::new(Compression::ZstdStream).expect("new");
        let mut out = Vec::new();
        for i in 0..20 {
            let msg = format!(
                "{{\"op\":0,\"s\":{i},\"t\":\"MESSAGE_CREATE\",\"d\":{{\"content\":\"{}\"}}}}",
                "xyz".repeat(i * 50)
            );
            let mut buf = vec![0u8; msg.len() + 1024];
            let mut input = InBuffer::around(msg.as_bytes());
            let mut output = OutBuffer::around(&mut buf[..]);
            enc.run(&mut input, &mut output).expect("run");
            enc.flush(&mut output).expect("flush");
            let n = output.pos();
            assert!(inflater.push(&buf[..n], &mut out).expect("inflates"));
            assert_eq!(out, msg.as_bytes());
        }
        assert!(matches!(
            Inflater::new(Compression::ZstdStream)
                .expect("new")
                .push(b"not zstd at all", &mut out),
            Err(InflateError::Corrupt(_))
        ));
    }
}
