//! The engine, driven on tokio over in-memory streams.
use super::*;
use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A plaintext relay between two streams, driven on tokio, as a session
/// runs it.
async fn relay<C, U, F>(client: C, upstream: U, idle: Option<Duration>, stop: F) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = Stop>,
{
    let r = Arc::new(Relay::new(None, Vec::new(), None));
    tokio::spawn(drive(client, upstream, r.clone()));
    supervise(&r, idle, stop).await
}

/// A stop that resolves to `s` once the sender is used.
fn stop_on_signal(s: Stop) -> (tokio::sync::oneshot::Sender<()>, impl Future<Output = Stop>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
        s
    })
}

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
    let (tx, stop) = stop_on_signal(Stop {
        reason: EndReason::Revoked,
        client_message: "access revoked".into(),
        detail: Some("why".into()),
    });
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
    let (tx, stop) =
        stop_on_signal(Stop { reason: EndReason::Shutdown, client_message: "bye".into(), detail: None });
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
        let (tx, stop) = stop_on_signal(Stop { reason, client_message: "bye".into(), detail: None });
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
            std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => {
                std::task::Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no close_notify")))
            }
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

/// An ErrorResponse body: `S` (localized), `V`, code and message.
fn error_body(localized: &str, severity: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend([&b"S"[..], localized.as_bytes(), b"\0"].concat());
    if let Some(v) = severity {
        b.extend([&b"V"[..], v.as_bytes(), b"\0"].concat());
    }
    b.extend(b"C57P01\0Mterminating connection due to administrator command\0\0");
    b
}

#[test]
fn frames_know_a_fatal_error_by_its_severity() {
    let cases = [
        (error_body("FATAL", Some("FATAL")), true),
        (error_body("SCHWERWIEGEND", Some("FATAL")), true), // localized S, V decides
        (error_body("PANIC", Some("PANIC")), true),
        (error_body("FATAL", None), true), // before 9.6: S only
        (error_body("ERROR", Some("ERROR")), false),
        (error_body("FATAL", Some("ERROR")), false), // V wins over a misleading S
        (error_body("NOTICE", Some("NOTICE")), false),
    ];
    for (body, fatal) in cases {
        let mut msgs = crate::pgwire::message_bytes(b'D', b"\0\x01\0\0\0\x01x");
        msgs.extend(crate::pgwire::message_bytes(b'E', &body));
        for chunk in [1, 3, msgs.len()] {
            let mut f = Frames::default();
            for c in msgs.chunks(chunk) {
                f.feed(c);
            }
            assert_eq!(f.fatal(), fatal, "{:?} in chunks of {chunk}", String::from_utf8_lossy(&body));
        }
    }
    // The same bytes inside a CopyData, or a NoticeResponse, are not an error.
    let mut f = Frames::default();
    f.feed(&crate::pgwire::message_bytes(b'd', &error_body("FATAL", Some("FATAL"))));
    f.feed(&crate::pgwire::message_bytes(b'N', &error_body("FATAL", Some("FATAL"))));
    assert!(!f.fatal());
}

/// The database's FATAL reaches the client, which hangs up (cleanly or
/// not) before the database's own close reaches the relay: the database
/// ended the session either way.
#[tokio::test]
async fn a_fatal_then_the_clients_hang_up_is_the_databases_close() {
    for clean in [true, false] {
        let (c_peer, c) = duplex(1024);
        let (mut u_peer, u) = duplex(1024);
        let r = Arc::new(Relay::new(None, Vec::new(), None));
        tokio::spawn(drive(EofIsError(c), u, r.clone()));
        let task = tokio::spawn(async move { supervise(&r, None, std::future::pending::<Stop>()).await });
        let fatal = crate::pgwire::message_bytes(b'E', &error_body("FATAL", Some("FATAL")));
        u_peer.write_all(&fatal).await.unwrap();
        let mut c_peer = c_peer;
        let mut got = vec![0u8; fatal.len()];
        c_peer.read_exact(&mut got).await.unwrap();
        if clean {
            c_peer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            u_peer.read_to_end(&mut rest).await.unwrap(); // the client's close came first
        }
        drop(c_peer);
        drop(u_peer);
        let out = task.await.unwrap();
        assert_eq!(out.reason, EndReason::UpstreamClosed, "clean {clean}: {:?}", out.detail);
    }
}

/// What admission read but did not use (a pipelined query) goes first.
#[tokio::test]
async fn bytes_read_before_the_relay_go_first() {
    let (mut c_peer, c) = duplex(1024);
    let (mut u_peer, u) = duplex(1024);
    let early = crate::pgwire::message_bytes(b'Q', b"select 1\0");
    let r = Arc::new(Relay::new(None, early.clone(), None));
    tokio::spawn(drive(c, u, r.clone()));
    let task = tokio::spawn(async move { supervise(&r, None, std::future::pending::<Stop>()).await });
    let later = crate::pgwire::message_bytes(b'X', b"");
    c_peer.write_all(&later).await.unwrap();
    c_peer.shutdown().await.unwrap();
    let mut got = Vec::new();
    u_peer.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, [early.clone(), later].concat());
    drop(u_peer);
    let out = task.await.unwrap();
    assert_eq!(out.reason, EndReason::ClientTerminated);
    assert_eq!(out.client_to_upstream, got.len() as u64, "the early bytes are counted too");
}

/// A stop after the session ended changes nothing: the end stands.
#[tokio::test]
async fn a_stop_after_the_end_is_ignored() {
    let (c_peer, c) = duplex(1024);
    let (u_peer, u) = duplex(1024);
    let r = Arc::new(Relay::new(None, Vec::new(), None));
    tokio::spawn(drive(c, u, r.clone()));
    drop(c_peer); // an unclean end of a plaintext stream is a clean close
    drop(u_peer);
    let out = supervise(&r, None, std::future::pending::<Stop>()).await;
    assert!(matches!(out.reason, EndReason::ClientClosed | EndReason::UpstreamClosed), "{:?}", out.reason);
    let stop = Stop { reason: EndReason::Revoked, client_message: "x".into(), detail: None };
    assert!(!r.stop(stop), "nothing to stop");
}
