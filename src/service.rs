//! The Tailscale Service's connections (`--service`, README "Fleet").
//!
//! tsnet forwards each connection to the Service's address to a loopback
//! listener, behind a PROXY protocol v2 header that names the client's
//! tailnet address. Any local process can reach that listener, so a
//! connection becomes a session only when the socket that dialed it is open
//! in this very process (tsnet's forwarder runs inside tailgres) and it
//! starts with a valid v2 header whose source is a tailnet address.
//! Anything else is refused and audited (`service_connection_refused`),
//! never trusted. A session that passes runs as if its client had dialed
//! the node: WhoIs of the header's source, then everything else as usual.
#![forbid(unsafe_code)]

use crate::audit::{DenyReason, Event, Record};
use crate::context::Shared;
use crate::proxy_header;
use crate::relay::{HandOff, Relay};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A session's client connection: one the node accepted on its own
/// address, or one the Service forwarded.
pub enum Client<C> {
    Tailnet(C),
    Service(TcpStream),
}

impl<C: AsyncRead + Unpin> AsyncRead for Client<C> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Tailnet(c) => Pin::new(c).poll_read(cx, buf),
            Client::Service(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Client<C> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Tailnet(c) => Pin::new(c).poll_write(cx, buf),
            Client::Service(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Tailnet(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Client::Service(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Client::Tailnet(c) => c.is_write_vectored(),
            Client::Service(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Tailnet(c) => Pin::new(c).poll_flush(cx),
            Client::Service(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Tailnet(c) => Pin::new(c).poll_shutdown(cx),
            Client::Service(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A Service connection is a host socket: the tailnet moves its bytes as
/// it can (the embedded node's goroutines read it like the database's
/// socket; see [`HandOff::hand_off_socket`]).
impl<C: HandOff> HandOff for Client<C> {
    fn hand_off(self, upstream: std::net::TcpStream, relay: Arc<Relay>) -> io::Result<()> {
        match self {
            Client::Tailnet(c) => c.hand_off(upstream, relay),
            Client::Service(s) => C::hand_off_socket(s, upstream, relay),
        }
    }
}

/// How long a Service connection may take to send its PROXY header (the
/// forwarder sends it at once).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Origin checks run at once at most (each walks this process's file
/// descriptors when the connection is not tsnet's: about 1 µs per open fd),
/// so a local process that keeps connecting costs bounded CPU.
const CONCURRENT_CHECKS: usize = 4;

/// Accepts the Service's connections until the listener fails for good,
/// sending each one that proves itself on to `out` with its client's
/// tailnet address and `port` (the Service's port).
pub async fn accept_loop<C: Send + 'static>(
    listener: TcpListener,
    port: u16,
    out: mpsc::Sender<(Client<C>, SocketAddr, u16)>,
    shared: Arc<Shared>,
) {
    let checks = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                shared.metrics.error("accept");
                tracing::warn!(error = %e, "accepting a Service connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (out, shared, checks) = (out.clone(), shared.clone(), checks.clone());
        tokio::spawn(async move {
            match admit(stream, &checks).await {
                Ok((stream, client)) => {
                    let _ = out.send((Client::Service(stream), client, port)).await;
                }
                Err(why) => refuse(&shared, from, why).await,
            }
        });
    }
}

/// Checks where a Service connection comes from and reads its header; the
/// stream (positioned at the client's first PostgreSQL byte) and the
/// client's tailnet address.
async fn admit(mut stream: TcpStream, checks: &tokio::sync::Semaphore) -> Result<(TcpStream, SocketAddr), String> {
    let fd = stream.as_fd().try_clone_to_owned().map_err(|e| format!("duplicating the socket: {e}"))?;
    let _check = checks.acquire().await.map_err(|e| e.to_string())?;
    let own = tokio::task::spawn_blocking(move || crate::sys::peer_is_own_socket(fd.as_fd()))
        .await
        .map_err(|e| format!("checking where the connection comes from: {e}"))?
        .map_err(|e| format!("checking where the connection comes from: {e}"))?;
    drop(_check);
    if !own {
        return Err("the connection did not come from this node's Service forwarder (another local process \
                    connected to the Service's loopback listener)"
            .into());
    }
    let header = proxy_header::read_header(&mut stream, HEADER_TIMEOUT).await.map_err(|e| e.to_string())?;
    if !proxy_header::is_tailnet_address(header.source.ip()) {
        return Err(format!("the PROXY header's client {} is not a tailnet address", header.source));
    }
    Ok((stream, header.source))
}

/// Audits a refused Service connection (at most one record a second per
/// address, with a count of the others) and closes it.
async fn refuse(shared: &Shared, from: SocketAddr, why: String) {
    shared.metrics.denied(DenyReason::ServiceConnectionRefused);
    tracing::warn!(from = %from, "Service connection refused: {why}");
    if let Some(more) = shared.denials.due(from.ip()) {
        let detail = if more > 0 { format!("{why} ({more} more refused from {from} since the last record)") } else { why };
        let r = Record::new(
            crate::audit::new_session_id(),
            from,
            Event::denied(DenyReason::ServiceConnectionRefused, detail),
        );
        crate::session::write_audit(shared, &r).await;
    }
}
