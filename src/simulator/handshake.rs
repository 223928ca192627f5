//! The WebSocket handshake's request head, read before tungstenite sees it.
//!
//! A client given a URL with no path (`ws://host:port?v=10&encoding=json`, which is what a
//! library makes of a path-less `resume_gateway_url` by appending the query) may send the
//! request line `GET ?v=10&encoding=json HTTP/1.1`. tungstenite refuses that target, Discord
//! does not; so the simulator reads the head itself, makes such a target `/?…`, and hands
//! tungstenite a stream that replays the (fixed) head before the rest of the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// A stream that yields `head` first, then the inner stream.
pub(crate) struct Prefixed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.head[start..start + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads the request head (and whatever arrived with it) and fixes a path-less target.
pub(crate) async fn read_head(mut stream: TcpStream) -> io::Result<Prefixed<TcpStream>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(Prefixed {
        head: fix_target(head),
        pos: 0,
        inner: stream,
    })
}

/// `GET ?q HTTP/1.1` → `GET /?q HTTP/1.1`; anything else is left alone.
fn fix_target(mut head: Vec<u8>) -> Vec<u8> {
    if let Some(sp) = head.iter().position(|b| *b == b' ')
        && head.get(sp + 1) == Some(&b'?')
    {
        head.insert(sp + 1, b'/');
    }
    head
}

#[cfg(test)]
mod tests {
    use super::fix_target;

    #[test]
    fn path_less_targets_get_a_slash() {
        let fixed = fix_target(b"GET ?v=10 HTTP/1.1\r\n\r\n".to_vec());
        assert_eq!(fixed, b"GET /?v=10 HTTP/1.1\r\n\r\n");
        let kept = b"GET /resume?v=10 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(fix_target(kept.clone()), kept);
        assert_eq!(fix_target(b"garbage".to_vec()), b"garbage");
    }
}
