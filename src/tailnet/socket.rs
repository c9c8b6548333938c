//! [`NodeSocket`]: a host TCP socket (the database's) that a session reads
//! and writes itself, without blocking, and waits on in the embedded node's
//! netpoller. A session polled on the node's goroutines (see `task`) then
//! hears from the database as a goroutine would, instead of through
//! tokio's reactor on another thread.
#![forbid(unsafe_code)]

use super::ffi::FdWatch;
use super::wakers::Wakers;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug)]
pub struct NodeSocket {
    tcp: std::net::TcpStream,
    watch: FdWatch<Wakers>,
    wakers: Arc<Wakers>,
}

/// Runs `op` until it is not interrupted; `WouldBlock` becomes `None`.
fn nonblocking<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<Option<T>> {
    loop {
        match op() {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

impl NodeSocket {
    /// Watches a connected (or connecting) socket; it is made non-blocking.
    pub fn new(tcp: std::net::TcpStream) -> io::Result<NodeSocket> {
        tcp.set_nonblocking(true)?;
        let wakers = Arc::new(Wakers::default());
        let watch = FdWatch::new(tcp.as_fd(), wakers.clone())?;
        Ok(NodeSocket { tcp, watch, wakers })
    }

    /// Connects to `addr` (the caller bounds how long it may take).
    pub async fn connect(addr: SocketAddr) -> io::Result<NodeSocket> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)?;
        let pending = match socket.connect(&addr.into()) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) => return Err(e),
        };
        let s = NodeSocket::new(socket.into())?;
        if pending {
            // Writable once the connection is made or has failed.
            std::future::poll_fn(|cx| {
                s.wakers.write.poll(cx, || {
                    if crate::sys::writable_now(s.tcp.as_fd())? {
                        return Ok(Some(()));
                    }
                    s.watch.wait(false, true)?;
                    Ok(None)
                })
            })
            .await?;
            if let Some(e) = s.tcp.take_error()? {
                return Err(e);
            }
            s.tcp.peer_addr()?; // ENOTCONN if it did not connect after all
        }
        Ok(s)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    /// The socket, no longer watched.
    pub fn into_std(self) -> std::net::TcpStream {
        drop(self.watch);
        self.tcp
    }
}

impl AsyncRead for NodeSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.wakers.read.poll(cx, || {
            match nonblocking(|| (&this.tcp).read(buf.initialize_unfilled()))? {
                Some(n) => {
                    buf.advance(n);
                    Ok(Some(()))
                }
                None => {
                    this.watch.wait(true, false)?;
                    Ok(None)
                }
            }
        })
    }
}

impl AsyncWrite for NodeSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wakers.write.poll(cx, || match nonblocking(|| (&this.tcp).write_vectored(bufs))? {
            Some(n) => Ok(Some(n)),
            None => {
                this.watch.wait(false, true)?;
                Ok(None)
            }
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.tcp.shutdown(std::net::Shutdown::Write))
    }
}
