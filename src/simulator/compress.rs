//! Server-side transport compression, as the gateway does it.

use std::str::FromStr;

use flate2::{Compress, FlushCompress};
use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

/// Transport compression selected by the `compress` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// No `compress` parameter: text frames carrying plain JSON.
    #[default]
    None,
    /// `compress=zlib-stream`: one zlib stream per connection, sync flush after every message.
    ZlibStream,
    /// `compress=zstd-stream`: one zstd frame per connection, flushed after every message.
    ZstdStream,
}

/// Error returned when a `compress` query value is not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCompression(pub String);

impl std::fmt::Display for UnknownCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown compress value {:?}", self.0)
    }
}

impl std::error::Error for UnknownCompression {}

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "none" => Ok(Compression::None),
            "zlib-stream" => Ok(Compression::ZlibStream),
            "zstd-stream" => Ok(Compression::ZstdStream),
            other => Err(UnknownCompression(other.to_string())),
        }
    }
}

impl Compression {
    /// Parses the (optional) value of the `compress` query parameter; absent means none.
    pub fn from_query(value: Option<&str>) -> Result<Self, UnknownCompression> {
        match value {
            None => Ok(Compression::None),
            Some(v) => v.parse(),
        }
    }

    /// The value to put in the `compress` query parameter (`None` for no compression).
    pub fn query_value(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::ZlibStream => Some("zlib-stream"),
            Compression::ZstdStream => Some("zstd-stream"),
        }
    }

    /// Whether frames are sent as binary WebSocket messages.
    pub fn is_binary(self) -> bool {
        !matches!(self, Compression::None)
    }
}

enum Inner {
    None,
    Zlib(Box<Compress>),
    Zstd(Box<Encoder<'static>>),
}

/// Per-connection server-side compressor: every call to [`StreamCompressor::compress`]
/// yields exactly one WebSocket message.
pub struct StreamCompressor {
    inner: Inner,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Inner::None => "none",
            Inner::Zlib(_) => "zlib-stream",
            Inner::Zstd(_) => "zstd-stream",
        };
        f.debug_struct("StreamCompressor")
            .field("kind", &kind)
            .finish()
    }
}

impl StreamCompressor {
    /// A fresh compression context (one per connection).
    pub fn new(kind: Compression) -> Self {
        let inner = match kind {
            Compression::None => Inner::None,
            Compression::ZlibStream => Inner::Zlib(Box::new(Compress::new(
                flate2::Compression::default(),
                true,
            ))),
            Compression::ZstdStream => match Encoder::new(3) {
                Ok(e) => Inner::Zstd(Box::new(e)),
                // Creating a context only fails on allocation failure.
                Err(e) => panic!("zstd encoder: {e}"),
            },
        };
        StreamCompressor { inner }
    }

    /// The compression kind of this context.
    pub fn kind(&self) -> Compression {
        match self.inner {
            Inner::None => Compression::None,
            Inner::Zlib(_) => Compression::ZlibStream,
            Inner::Zstd(_) => Compression::ZstdStream,
        }
    }

    /// Compresses one gateway message. zlib output ends with `00 00 ff ff`;
    /// zstd output is flushed but the frame is never ended.
    pub fn compress(&mut self, json: &[u8]) -> Vec<u8> {
        match &mut self.inner {
            Inner::None => json.to_vec(),
            Inner::Zlib(c) => zlib_sync(c, json),
            Inner::Zstd(e) => zstd_flush(e, json),
        }
    }
}

fn zlib_sync(c: &mut Compress, json: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(json.len() / 2 + 64);
    let start = c.total_in();
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let consumed = (c.total_in() - start) as usize;
        if c.compress_vec(&json[consumed..], &mut out, FlushCompress::Sync)
            .is_err()
        {
            // Cannot happen with valid state; give what we have.
            break;
        }
        let consumed = (c.total_in() - start) as usize;
        if consumed >= json.len() && out.len() < out.capacity() {
            break;
        }
    }
    out
}

fn zstd_flush(e: &mut Encoder<'static>, json: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(json.len() / 2 + 64);
    let mut input = InBuffer::around(json);
    while input.pos() < json.len() {
        if out.capacity() - out.len() < 256 {
            out.reserve(out.capacity().max(1024));
        }
        let pos = out.len();
        let mut ob = OutBuffer::around_pos(&mut out, pos);
        if e.run(&mut input, &mut ob).is_err() {
            return out;
        }
    }
    loop {
        if out.capacity() - out.len() < 256 {
            out.reserve(out.capacity().max(1024));
        }
        let pos = out.len();
        let mut ob = OutBuffer::around_pos(&mut out, pos);
        match e.flush(&mut ob) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out
}
