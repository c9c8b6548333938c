//! [`TailnetConn`]: an accepted tailnet connection as a tokio byte stream,
//! read and written straight from the embedded node's TCP/IP stack.
//!
//! A read or write that finds nothing to do arms the task's waker; the node
//! calls back (on a Go thread) whenever the connection changes.
#![forbid(unsafe_code)]

use super::ffi;
use super::wakers::Wakers;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An accepted tailnet connection. Dropping it closes it.
#[derive(Debug)]
pub struct TailnetConn {
    conn: ffi::Conn<Wakers>,
    wakers: Arc<Wakers>,
    /// `Some(n)`: a read left nothing to take (no data, no end of stream
    /// or error pending), and `n` is the read wake-up count from before
    /// it. The node wakes readers after any such change, so while the
    /// count is still `n` there is nothing to read, and no call into the
    /// node is needed to find that out.
    drained_at: Option<u64>,
}

impl TailnetConn {
    /// Takes over the connection the listener announced as `id`.
    pub(super) fn attach(id: u64) -> io::Result<TailnetConn> {
        let wakers = Arc::new(Wakers::default());
        let conn = ffi::Conn::attach(id, wakers.clone())?;
        Ok(TailnetConn { conn, wakers, drained_at: None })
    }
}

impl AsyncRead for TailnetConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        let slot = &this.wakers.read;
        let seen = slot.wakes.load(Ordering::Acquire);
        if this.drained_at == Some(seen) && slot.park(cx, seen) {
            return Poll::Pending;
        }
        let mut drained = false;
        let res = slot.poll(cx, || Ok(this.conn.read(buf)?.map(|d| drained = d)));
        this.drained_at = drained.then_some(seen);
        res
    }
}

impl AsyncWrite for TailnetConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    /// One call into the node for all of `bufs`: rustls hands over a TLS
    /// flight (or a large write's records) as several buffers, which then
    /// leave in full segments instead of a segment per record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        this.wakers.write.poll(cx, || this.conn.write(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // writes go straight to the stack's send buffer
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().conn.shutdown_write())
    }
}

/// The node's goroutines move a relayed session's bytes (tsffi.h).
impl crate::relay::HandOff for TailnetConn {
    fn hand_off(self, upstream: std::net::TcpStream, relay: Arc<crate::relay::Relay>) -> io::Result<()> {
        self.conn.relay(upstream.into(), relay)
    }

    /// A Service connection: the node's goroutines read it as they read
    /// the database's socket, so its data phase runs where a direct
    /// session's does.
    fn hand_off_socket(
        client: tokio::net::TcpStream,
        upstream: std::net::TcpStream,
        relay: Arc<crate::relay::Relay>,
    ) -> io::Result<()> {
        let client = client.into_std()?;
        ffi::relay_sockets(client.into(), upstream.into(), relay)
    }
}
