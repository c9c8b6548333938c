//! Stage 7, relay: copy bytes both ways until the session ends, propagating
//! a close from either side to the other, counting bytes, and saying who
//! ended it (for the audit record).
#![forbid(unsafe_code)]

use crate::audit::EndReason;
use crate::pgwire;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Copy buffer per direction: it starts small, so an idle session holds
/// little, doubles while reads fill it (bulk COPY gets big reads), and
/// drops back once reads are small again.
const MIN_BUF: usize = 1024;
const MAX_BUF: usize = 64 * 1024;

/// The adaptive copy buffer.
struct Buffer(Vec<u8>);

impl Buffer {
    fn new() -> Self {
        Buffer(vec![0u8; MIN_BUF])
    }

    /// After a read of `n` bytes: grow when it filled the buffer, shrink
    /// when it used less than an eighth of it.
    fn adapt(&mut self, n: usize) {
        let len = self.0.len();
        if n == len && len < MAX_BUF {
            self.0 = vec![0u8; len * 2];
        } else if n < len / 8 && len > MIN_BUF {
            self.0 = vec![0u8; MIN_BUF];
        }
    }
}

#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Who ended it and why (the side that closed first, the side whose
    /// error ended it, or the reason the stop future returned).
    pub reason: EndReason,
    pub detail: Option<String>,
}

/// Follows message boundaries in the client→server stream without buffering
/// (type byte + Int32 length), to know the last complete message: a client
/// that sent Terminate ('X') ended the session even if the server's close
/// reaches us first.
#[derive(Default)]
struct Frames {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
    current: u8,
    last_complete: Option<u8>,
}

impl Frames {
    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(buf.len() as u64)) as usize;
                self.remaining -= n as u64;
                buf = &buf[n..];
                if self.remaining == 0 {
                    self.last_complete = Some(self.current);
                }
                continue;
            }
            let n = (5 - self.header_len).min(buf.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
            self.header_len += n;
            buf = &buf[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                self.current = self.header[0];
                let len = u32::from_be_bytes(self.header[1..5].try_into().unwrap());
                self.remaining = u64::from(len.saturating_sub(4));
                if self.remaining == 0 {
                    self.last_complete = Some(self.current);
                }
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    fn terminated(&self) -> bool {
        self.last_complete == Some(b'X') && self.remaining == 0 && self.header_len == 0
    }
}

#[derive(Default)]
struct Counters {
    c2u: AtomicU64,
    u2c: AtomicU64,
    /// The client's last whole message was a Terminate.
    terminated: std::sync::atomic::AtomicBool,
}

enum DirEnd {
    Eof,
    /// Stopped between writes: the peer has whole messages only.
    Stopped,
    /// Stopped while a write to a peer that does not read was still under
    /// way, after [`STOP_WRITE_GRACE`]: the peer may have half a message.
    StoppedMidWrite,
    ReadErr(io::Error),
    WriteErr(io::Error),
}

/// Once the session is stopped, how long a write already under way (or the
/// last FATAL, or the close) may still take. A client that stops reading
/// blocks a write for as long as it likes; without this bound it would
/// keep a revoked or drained session, its backend and its locks, forever.
pub const STOP_WRITE_GRACE: Duration = Duration::from_secs(2);

/// Runs `fut` unless the stop is signalled and [`STOP_WRITE_GRACE`] passes
/// first (`None` then).
async fn unless_stopped<F: Future>(fut: F, stop: &mut watch::Receiver<bool>) -> Option<F::Output> {
    let deadline = async move {
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(STOP_WRITE_GRACE).await;
    };
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = deadline => None,
    }
}

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    frames: &mut Frames,
    terminated: Option<&std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> DirEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Buffer::new();
    loop {
        // A pending read is dropped at once on a stop (that loses nothing);
        // a write under way gets STOP_WRITE_GRACE to finish, so the peer
        // normally stays at a known message position.
        let n = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return DirEnd::Stopped,
            r = r.read(&mut buf.0) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return DirEnd::ReadErr(e),
            },
        };
        frames.feed(&buf.0[..n]);
        if let Some(t) = terminated {
            t.store(frames.terminated(), Ordering::Relaxed);
        }
        // Flush per read: small interactive messages must not linger in a
        // TLS writer's buffer.
        let write = async {
            w.write_all(&buf.0[..n]).await?;
            w.flush().await
        };
        match unless_stopped(write, &mut stop).await {
            None => return DirEnd::StoppedMidWrite,
            Some(Err(e)) => return DirEnd::WriteErr(e),
            Some(Ok(())) => {}
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        buf.adapt(n);
    }
    // Forward the half-close; the other side's close then ends the session.
    let _ = unless_stopped(w.shutdown(), &mut stop).await;
    DirEnd::Eof
}

/// Why the proxy ends a session, and what the client is told.
#[derive(Debug, Clone)]
pub struct Stop {
    pub reason: EndReason,
    /// Sent to the client as FATAL 57P01 when the server→client stream is
    /// between messages (it always is, unless a large message is halfway).
    pub client_message: String,
    pub detail: Option<String>,
}

/// Relays until both directions are done, one fails, `stop` resolves, or
/// (with `idle`) no byte has moved either way for that long. Pre-relay byte
/// counts (the handshake) are added by the caller.
pub async fn relay<C, U, F>(client: C, upstream: U, idle: Option<Duration>, stop: F) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Stop>,
{
    let counters = Counters::default();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let outcome = |reason, detail: Option<String>| RelayOutcome {
        client_to_upstream: counters.c2u.load(Ordering::Relaxed),
        upstream_to_client: counters.u2c.load(Ordering::Relaxed),
        reason,
        detail,
    };
    let idle_stop = async {
        let Some(limit) = idle else { return std::future::pending().await };
        // Checked a few times per period: the session ends at most a
        // quarter period late, and an active session costs one timer.
        let mut tick = tokio::time::interval(limit / 4);
        let (mut seen, mut since) = (u64::MAX, tokio::time::Instant::now());
        loop {
            tick.tick().await;
            let moved = counters.c2u.load(Ordering::Relaxed) + counters.u2c.load(Ordering::Relaxed);
            if moved != seen {
                (seen, since) = (moved, tokio::time::Instant::now());
            } else if since.elapsed() >= limit {
                return Stop {
                    reason: EndReason::IdleTimeout,
                    client_message: format!(
                        "terminating connection: idle for {} (tailgres --idle-timeout)",
                        humantime::format_duration(limit)
                    ),
                    detail: Some(format!("no traffic either way for {limit:?}")),
                };
            }
        }
    };
    let stop = async {
        tokio::select! {
            s = stop => s,
            s = idle_stop => s,
        }
    };
    tokio::pin!(stop);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut c_frames = Frames::default();
    let mut u_frames = Frames::default();
    let mut stopped: Option<Stop> = None;
    let mut client_mid_message = false;
    let first = {
        let c2u =
            pump(&mut cr, &mut uw, &counters.c2u, &mut c_frames, Some(&counters.terminated), stop_rx.clone());
        let u2c = pump(&mut ur, &mut cw, &counters.u2c, &mut u_frames, None, stop_rx);
        tokio::pin!(c2u, u2c);
        let (mut c_done, mut u_done) = (false, false);
        let mut first: Option<EndReason> = None;
        while !(c_done && u_done) {
            tokio::select! {
                end = &mut c2u, if !c_done => {
                    c_done = true;
                    match end {
                        DirEnd::Eof => { first.get_or_insert(EndReason::ClientClosed); }
                        DirEnd::Stopped | DirEnd::StoppedMidWrite => {}
                        DirEnd::ReadErr(e) => return outcome(EndReason::ClientError, Some(e.to_string())),
                        DirEnd::WriteErr(e) => return outcome(EndReason::UpstreamError, Some(e.to_string())),
                    }
                }
                end = &mut u2c, if !u_done => {
                    u_done = true;
                    match end {
                        DirEnd::Eof => { first.get_or_insert(EndReason::UpstreamClosed); }
                        DirEnd::Stopped => {}
                        DirEnd::StoppedMidWrite => client_mid_message = true,
                        // A database that closes without a TLS close_notify
                        // after the client's Terminate, or after the client
                        // hung up: the client ended it.
                        DirEnd::ReadErr(_) if counters.terminated.load(Ordering::Relaxed) => {
                            return outcome(EndReason::ClientTerminated, None)
                        }
                        DirEnd::ReadErr(_) if first == Some(EndReason::ClientClosed) => {
                            return outcome(EndReason::ClientClosed, None)
                        }
                        DirEnd::ReadErr(e) => return outcome(EndReason::UpstreamError, Some(e.to_string())),
                        DirEnd::WriteErr(e) => return outcome(EndReason::ClientError, Some(e.to_string())),
                    }
                }
                s = &mut stop, if stopped.is_none() => {
                    stopped = Some(s);
                    let _ = stop_tx.send(true);
                }
            }
        }
        first
    };
    if let Some(s) = stopped {
        // The FATAL and the closes are bounded too: the client may still
        // not be reading.
        let _ = tokio::time::timeout(STOP_WRITE_GRACE, async {
            if u_frames.at_boundary() && !client_mid_message {
                let code = match s.reason {
                    EndReason::IdleTimeout => pgwire::sqlstate::IDLE_SESSION_TIMEOUT,
                    _ => pgwire::sqlstate::ADMIN_SHUTDOWN,
                };
                let _ = cw.write_all(&pgwire::fatal(code, &s.client_message)).await;
                let _ = cw.flush().await;
            }
            let _ = cw.shutdown().await;
        })
        .await;
        let _ = tokio::time::timeout(STOP_WRITE_GRACE, uw.shutdown()).await;
        return outcome(s.reason, s.detail);
    }
    // A client that said Terminate ended the session, whichever close we
    // saw first.
    let first = first.expect("a direction finished");
    let reason = if c_frames.terminated() { EndReason::ClientTerminated } else { first };
    outcome(reason, None)
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
            let task = tokio::spawn(relay(c, u, None, std::future::pending::<Stop>()));
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

    #[test]
    fn frames_follow_boundaries_across_chunks() {
        let mut msgs = Vec::new();
        msgs.extend(crate::pgwire::message_bytes(b'Q', b"select 1\0"));
        msgs.extend(crate::pgwire::message_bytes(b'd', &[b'X'; 300]));
        msgs.extend(crate::pgwire::message_bytes(b'X', b""));
        for chunk in [1, 2, 3, 5, 7, 64, msgs.len()] {
            let mut f = Frames::default();
            for c in msgs.chunks(chunk) {
                f.feed(c);
            }
            assert!(f.terminated(), "chunk {chunk}");
            let mut g = Frames::default();
            g.feed(&msgs[..msgs.len() - 5]);
            assert!(!g.terminated(), "chunk {chunk}: CopyData full of 'X' is not a Terminate");
        }
    }

    #[tokio::test]
    async fn stop_ends_the_relay_with_a_fatal_at_a_message_boundary() {
        let (mut c_peer, c) = duplex(1024);
        let (mut u_peer, u) = duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
            Stop {
                reason: EndReason::Revoked,
                client_message: "access revoked".into(),
                detail: Some("why".into()),
            }
        };
        let task = tokio::spawn(relay(c, u, None, stop));
        // A whole message from the server reaches the client, then the stop.
        let msg = crate::pgwire::message_bytes(b'Z', b"I");
        u_peer.write_all(&msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        c_peer.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        let out = task.await.unwrap();
        assert_eq!(out.reason, EndReason::Revoked);
        assert_eq!(out.detail.as_deref(), Some("why"));
        let mut rest = Vec::new();
        c_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest[0], b'E', "the client is told why");
        let (code, text) = crate::pgwire::error_fields(&rest[5..]);
        assert_eq!((code.as_deref(), text.as_deref()), (Some("57P01"), Some("access revoked")));
        let mut up_rest = Vec::new();
        u_peer.read_to_end(&mut up_rest).await.unwrap(); // the upstream sees EOF
    }

    #[test]
    fn buffer_grows_for_bulk_and_shrinks_when_idle() {
        let mut b = Buffer::new();
        let sizes: Vec<usize> = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 65536, 100, 10]
            .iter()
            .map(|n| {
                b.adapt(*n);
                b.0.len()
            })
            .collect();
        assert_eq!(sizes, [2048, 4096, 8192, 16384, 32768, 65536, 65536, 65536, 1024, 1024]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_end_and_busy_ones_do_not() {
        let (mut c_peer, c) = duplex(1024);
        let (mut u_peer, u) = duplex(1024);
        let idle = Duration::from_secs(60);
        let task = tokio::spawn(relay(c, u, Some(idle), std::future::pending::<Stop>()));
        // Traffic every 50 s keeps it alive past several idle periods.
        let msg = crate::pgwire::message_bytes(b'Z', b"I");
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            u_peer.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            c_peer.read_exact(&mut got).await.unwrap();
            assert!(!task.is_finished(), "ended while traffic flowed");
        }
        let out = task.await.unwrap();
        assert_eq!(out.reason, EndReason::IdleTimeout);
        let mut rest = Vec::new();
        c_peer.read_to_end(&mut rest).await.unwrap();
        let (code, _) = crate::pgwire::error_fields(&rest[5..]);
        assert_eq!(code.as_deref(), Some("57P05"));
    }

    #[tokio::test]
    async fn no_fatal_is_spliced_into_a_half_sent_message() {
        let (mut c_peer, c) = duplex(1024);
        let (mut u_peer, u) = duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
            Stop { reason: EndReason::Shutdown, client_message: "bye".into(), detail: None }
        };
        let task = tokio::spawn(relay(c, u, None, stop));
        let msg = crate::pgwire::message_bytes(b'D', &[7u8; 100]);
        u_peer.write_all(&msg[..50]).await.unwrap();
        let mut got = vec![0u8; 50];
        c_peer.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        assert_eq!(task.await.unwrap().reason, EndReason::Shutdown);
        let mut rest = Vec::new();
        c_peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing may follow half a message: {rest:?}");
    }

    /// A client that stops reading must not keep a stopped session alive:
    /// the write under way gets STOP_WRITE_GRACE, then the relay ends, and
    /// no FATAL is spliced into the half-written message.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_cannot_outlive_a_stop() {
        for reason in [EndReason::Revoked, EndReason::Shutdown] {
            let (mut c_peer, c) = duplex(1024);
            let (mut u_peer, u) = duplex(1024);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let stop = async move {
                let _ = rx.await;
                Stop { reason, client_message: "bye".into(), detail: None }
            };
            let task = tokio::spawn(relay(c, u, None, stop));
            // The database streams rows; the client reads none of them.
            let row = crate::pgwire::message_bytes(b'D', &[7u8; 300]);
            let flood = tokio::spawn(async move {
                for _ in 0..10_000 {
                    if u_peer.write_all(&row).await.is_err() {
                        break;
                    }
                }
                u_peer
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!task.is_finished());
            let stopped_at = tokio::time::Instant::now();
            tx.send(()).unwrap();
            let out = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("the relay ended despite a client that never reads")
                .unwrap();
            assert_eq!(out.reason, reason);
            assert!(stopped_at.elapsed() <= STOP_WRITE_GRACE * 2, "{:?}", stopped_at.elapsed());
            // What the client got is whole rows and then at most part of one:
            // never a FATAL in the middle of a row.
            let mut got = Vec::new();
            c_peer.read_to_end(&mut got).await.unwrap();
            let row = crate::pgwire::message_bytes(b'D', &[7u8; 300]);
            let expected: Vec<u8> = row.iter().copied().cycle().take(got.len()).collect();
            assert_eq!(got, expected, "{reason:?}: only row bytes reach the client");
            flood.abort();
        }
    }

    /// Reads like the inner stream, but its end is an error (a TLS peer that
    /// closed without close_notify).
    struct EofIsError(tokio::io::DuplexStream);

    impl AsyncRead for EofIsError {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let before = buf.filled().len();
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => std::task::Poll::Ready(
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no close_notify")),
                ),
                other => other,
            }
        }
    }

    impl AsyncWrite for EofIsError {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, b)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// The client said Terminate; the database then closed without a TLS
    /// close_notify (an error on our read): the client ended the session.
    #[tokio::test]
    async fn terminate_then_an_unclean_upstream_close_is_the_clients() {
        let (mut c_peer, c) = duplex(1024);
        let (u_peer, u) = duplex(1024);
        let task = tokio::spawn(relay(c, EofIsError(u), None, std::future::pending::<Stop>()));
        c_peer.write_all(&crate::pgwire::message_bytes(b'X', b"")).await.unwrap();
        let mut u_peer = u_peer;
        let mut got = [0u8; 5];
        u_peer.read_exact(&mut got).await.unwrap();
        drop(u_peer);
        let out = task.await.unwrap();
        assert_eq!(out.reason, EndReason::ClientTerminated, "{:?}", out.detail);
    }
}
