//! Stage 7, relay: copy bytes both ways until the session ends, propagating
//! a close from either side to the other, counting bytes, and saying who
//! ended it (for the audit record).
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use crate::audit::EndReason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Copy buffer per direction.
const BUF: usize = 16 * 1024;

#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Who ended it and why (the side that closed first, the side whose
    /// error ended it, or the reason the stop future returned).
    pub reason: EndReason,
    pub detail: Option<String>,
}

#[derive(Default)]
struct Counters {
    c2u: AtomicU64,
    u2c: AtomicU64,
}

enum DirEnd {
    Eof,
    ReadErr(io::Error),
    WriteErr(io::Error),
}

async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return DirEnd::ReadErr(e),
        };
        if let Err(e) = w.write_all(&buf[..n]).await {
            return DirEnd::WriteErr(e);
        }
        // Flush per read: small interactive messages must not linger in a
        // TLS writer's buffer.
        if let Err(e) = w.flush().await {
            return DirEnd::WriteErr(e);
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Forward the half-close; the other side's close then ends the session.
    let _ = w.shutdown().await;
    DirEnd::Eof
}

/// Relays until both directions are done, one fails, or `stop` resolves
/// (with the reason, e.g. shutdown or revocation). Pre-relay byte counts
/// (the handshake) are added by the caller.
pub async fn relay<C, U, F>(client: C, upstream: U, stop: F) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = EndReason>,
{
    let counters = Counters::default();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let c2u = pump(&mut cr, &mut uw, &counters.c2u);
    let u2c = pump(&mut ur, &mut cw, &counters.u2c);
    tokio::pin!(c2u, u2c, stop);

    let outcome = |reason, detail: Option<String>| RelayOutcome {
        client_to_upstream: counters.c2u.load(Ordering::Relaxed),
        upstream_to_client: counters.u2c.load(Ordering::Relaxed),
        reason,
        detail,
    };
    let (mut c_done, mut u_done) = (false, false);
    let mut first: Option<EndReason> = None;
    loop {
        tokio::select! {
            end = &mut c2u, if !c_done => {
                c_done = true;
                match end {
                    DirEnd::Eof => { first.get_or_insert(EndReason::ClientClosed); }
                    DirEnd::ReadErr(e) => return outcome(EndReason::ClientError, Some(e.to_string())),
                    DirEnd::WriteErr(e) => return outcome(EndReason::UpstreamError, Some(e.to_string())),
                }
            }
            end = &mut u2c, if !u_done => {
                u_done = true;
                match end {
                    DirEnd::Eof => { first.get_or_insert(EndReason::UpstreamClosed); }
                    DirEnd::ReadErr(e) => return outcome(EndReason::UpstreamError, Some(e.to_string())),
                    DirEnd::WriteErr(e) => return outcome(EndReason::ClientError, Some(e.to_string())),
                }
            }
            reason = &mut stop => return outcome(reason, None),
        }
        if c_done && u_done {
            return outcome(first.expect("a direction finished"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn close_propagates_both_ways_and_counts() {
        for client_first in [true, false] {
            let (mut c_peer, c) = duplex(1024);
            let (mut u_peer, u) = duplex(1024);
            let task = tokio::spawn(relay(c, u, std::future::pending()));
            c_peer.write_all(b"hello").await.unwrap();
            let mut b = [0u8; 5];
            u_peer.read_exact(&mut b).await.unwrap();
            u_peer.write_all(b"hi!").await.unwrap();
            c_peer.read_exact(&mut b[..3]).await.unwrap();
            let mut rest = Vec::new();
            if client_first {
                c_peer.shutdown().await.unwrap();
                u_peer.read_to_end(&mut rest).await.unwrap(); // EOF reached upstream
                u_peer.shutdown().await.unwrap();
                c_peer.read_to_end(&mut rest).await.unwrap();
            } else {
                u_peer.shutdown().await.unwrap();
                c_peer.read_to_end(&mut rest).await.unwrap(); // EOF reached client
                c_peer.shutdown().await.unwrap();
                u_peer.read_to_end(&mut rest).await.unwrap();
            }
            let out = task.await.unwrap();
            assert_eq!((out.client_to_upstream, out.upstream_to_client), (5, 3));
            let want = if client_first { EndReason::ClientClosed } else { EndReason::UpstreamClosed };
            assert_eq!(out.reason, want);
        }
    }

    #[tokio::test]
    async fn stop_ends_the_relay_with_its_reason() {
        let (_c_peer, c) = duplex(64);
        let (_u_peer, u) = duplex(64);
        let out = relay(c, u, async { EndReason::Revoked }).await;
        assert_eq!(out.reason, EndReason::Revoked);
    }
}
