//! Hostile and malformed input before the StartupMessage, over the tailnet
//! (docs/postgres-protocol.md, "Before the StartupMessage"): each
//! case is answered with FATAL 08P01 (where the client is still there to read
//! it) or a close, leaves a `session_denied` record, and never stops the
//! proxy from serving the next client.
//!
//! Run with scripts/test (a fresh network namespace with only `lo`).

mod common;
use common::{within, STEP};

use common::lab::{psql, LabOptions, LabUp};
use common::wire::{startup, PROTOCOL_3_0};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH, which the proxy copies.
const MAX_STARTUP: usize = 10000;
/// The handshake timeout the lab's proxy runs with, and how it is written
/// in the audit detail.
const HANDSHAKE_TIMEOUT_ARG: &str = "--handshake-timeout=2s";
const HANDSHAKE_TIMEOUT: &str = "2s";

fn be(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

/// An 8-byte SSLRequest / GSSENCRequest.
fn request(code: u32) -> Vec<u8> {
    [be(8), be(code)].concat()
}

/// A well-formed startup for role_scram exactly `total` bytes long: many
/// custom (`tg.*`) parameters, the last one padded to fit.
fn big_startup(total: usize, app: &str) -> Vec<u8> {
    let filler = "x".repeat(40);
    let mut owned: Vec<(String, String)> = vec![
        ("user".into(), "role_scram".into()),
        ("database".into(), "app".into()),
        ("application_name".into(), app.into()),
    ];
    let len =
        |p: &[(String, String)]| 4 + 4 + p.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>() + 1;
    while len(&owned) + 60 < total {
        let n = owned.len();
        owned.push((format!("tg.p{n:04}"), filler.clone()));
    }
    let pad = total - len(&owned) - "tg.pad".len() - 2;
    owned.push(("tg.pad".into(), "y".repeat(pad)));
    let params: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let p = startup(PROTOCOL_3_0, &params);
    assert_eq!(p.len(), total);
    p
}

/// A protocol 2.0 StartupMessage: fixed 296 bytes.
fn startup_v2() -> Vec<u8> {
    let mut p = [be(296), be(2 << 16)].concat();
    let mut field = |s: &str, width: usize| {
        let mut f = s.as_bytes().to_vec();
        f.resize(width, 0);
        p.extend(f);
    };
    field("app", 64); // database
    field("role_scram", 32); // user
    field("", 64); // options
    field("", 64); // unused
    field("", 64); // tty
    assert_eq!(p.len(), 296);
    p
}

/// A CancelRequest with a key of `key_len` bytes.
fn cancel(key_len: usize) -> Vec<u8> {
    [be(12 + key_len as u32).to_vec(), be(CANCEL_REQUEST).to_vec(), be(4242).to_vec(), vec![7; key_len]]
        .concat()
}

/// What the client is meant to see.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// An ErrorResponse, severity FATAL, SQLSTATE 08P01, then EOF.
    Fatal,
    /// EOF with nothing sent (the client half-closed, so cannot be answered).
    Close,
    /// A client that opened with a TLS record byte gets TLS back (an alert)
    /// or a close, never a plaintext PostgreSQL message.
    TlsAlertOrClose,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Half-close after sending (a client that gave up).
    half_close: bool,
    expect: Expect,
    /// A piece of the `session_denied` record's detail for this case.
    detail: &'static str,
}

fn case(name: &'static str, bytes: Vec<u8>, detail: &'static str) -> Case {
    Case { name, bytes, half_close: false, expect: Expect::Fatal, detail }
}

fn truncated(name: &'static str, bytes: Vec<u8>) -> Case {
    Case {
        name,
        bytes,
        half_close: true,
        expect: Expect::Close,
        detail: "closed the connection during negotiation",
    }
}

fn cases() -> Vec<Case> {
    let good = startup(PROTOCOL_3_0, &[("user", "role_scram"), ("database", "app")]);
    let ssl_then_plain = [request(SSL_REQUEST), good.clone()].concat();
    let mut no_terminator = good.clone();
    no_terminator.pop();
    let len = no_terminator.len() as u32;
    no_terminator[..4].copy_from_slice(&be(len));
    let bad_utf8 =
        [be(17).to_vec(), be(PROTOCOL_3_0).to_vec(), vec![0xff, 0xfe, 0, b'v', 0, 0, 0, 0, 0]].concat();
    vec![
        truncated("2 bytes then close", vec![0, 0]),
        truncated("half a startup then close", good[..12].to_vec()),
        case("length 0", be(0).to_vec(), "invalid startup packet length 0"),
        case("length 7", [be(7).to_vec(), vec![1, 2, 3]].concat(), "invalid startup packet length 7"),
        case("length 10001", be(10001).to_vec(), "startup packet too long (10001 bytes"),
        case("length 2^31", be(1 << 31).to_vec(), "startup packet too long (2147483648 bytes"),
        case("length 2^32-1", be(u32::MAX).to_vec(), "startup packet too long (4294967295 bytes"),
        case("HTTP request", b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(), "startup packet too long"),
        case(
            "unknown code",
            [be(16), be(0xdead_beef), be(0), be(0)].concat(),
            "unsupported frontend protocol",
        ),
        case("protocol 2.0", startup_v2(), "unsupported frontend protocol 2.0"),
        case(
            "protocol 4.0",
            startup(4 << 16, &[("user", "role_scram")]),
            "unsupported frontend protocol 4.0",
        ),
        case(
            "SSLRequest with 4 extra bytes",
            [be(12), be(SSL_REQUEST), be(0)].concat(),
            "invalid length of SSL/GSSENC",
        ),
        case("bytes after SSLRequest", ssl_then_plain, "received unencrypted data after SSL request"),
        case(
            "startup without user",
            startup(PROTOCOL_3_0, &[("database", "app")]),
            "no PostgreSQL user name",
        ),
        case("startup without terminator", no_terminator, "invalid startup packet layout"),
        case("startup with a non-UTF-8 name", bad_utf8, "not UTF-8"),
        case(
            "startup over 10000 bytes",
            big_startup(10500, "hostile-too-big"),
            "startup packet too long (10500 bytes",
        ),
        case("cancel without a key", cancel(0), "invalid length of cancel request"),
        case("cancel with a 257-byte key", cancel(257), "invalid length of cancel request"),
        // Last: junk after a TLS record header is a TLS failure, not a hang-up.
        Case {
            name: "direct TLS byte then junk",
            bytes: [vec![0x16, 0x03, 0x01, 0x00, 0x20], vec![0xab; 32]].concat(),
            half_close: false,
            expect: Expect::TlsAlertOrClose,
            detail: "client TLS handshake failed",
        },
    ]
}

/// Sends `bytes` through the forward and reads until the proxy closes.
async fn exchange(forward: &str, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = within("connect forward", TcpStream::connect(forward)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    read_until_close(&mut s).await
}

/// Everything the proxy sends until it closes. A reset after its answer
/// counts as a close (the answer already arrived).
async fn read_until_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("proxy closes the connection", s.read(&mut buf)).await {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("reading from the forward: {e}"),
        }
    }
}

/// Parses one backend message: (type, body, rest).
fn message(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *bytes.first()?;
    let len = u32::from_be_bytes(bytes.get(1..5)?.try_into().unwrap()) as usize;
    let body = bytes.get(5..1 + len)?;
    Some((tag, body, &bytes[1 + len..]))
}

/// The fields of an ErrorResponse body, by field type.
fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|&b| b == 0)
        .take_while(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// Asserts `got` is exactly one ErrorResponse, FATAL, 08P01.
fn assert_fatal_08p01(got: &[u8], what: &str) {
    let (tag, body, rest) = message(got).unwrap_or_else(|| panic!("{what}: no complete message in {got:?}"));
    assert_eq!(tag, b'E', "{what}: expected an ErrorResponse, got {got:?}");
    let fields = error_fields(body);
    let field = |t: u8| fields.iter().find(|(k, _)| *k == t).map(|(_, v)| v.as_str());
    assert_eq!(field(b'S'), Some("FATAL"), "{what}: {fields:?}");
    assert_eq!(field(b'V'), Some("FATAL"), "{what}: {fields:?}");
    assert_eq!(field(b'C'), Some("08P01"), "{what}: {fields:?}");
    assert!(field(b'M').is_some_and(|m| !m.is_empty()), "{what}: no message: {fields:?}");
    assert!(rest.is_empty(), "{what}: bytes after the ErrorResponse: {rest:?}");
}

/// Waits for a `session_denied` record after the first `skip` records whose
/// detail contains `detail`; checks reason and side.
async fn wait_denied(lab: &LabUp, skip: usize, reason: &str, detail: &str, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let found = lab.audit_records().into_iter().skip(skip).find(|r| {
            r["event"] == "session_denied" && r["detail"].as_str().is_some_and(|d| d.contains(detail))
        });
        if let Some(r) = found {
            assert_eq!(r["reason"], reason, "{what}: {r}");
            assert_eq!(r["side"], "client", "{what}: {r}");
            assert!(r["postgres"].is_null(), "{what}: a refused startup is not recorded as one: {r}");
            assert!(r["peer"]["node_name"].as_str().is_some_and(|n| n.starts_with("alice.")), "{what}: {r}");
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: no session_denied with detail containing {detail:?}:\n{:#?}",
            lab.audit_records().into_iter().skip(skip).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real psql through the same forward.
async fn assert_psql_works(lab: &LabUp, after: &str) {
    let (host, port) = lab.forward_host_port(0);
    let conn = format!("host={host} port={port} user=role_scram dbname=app sslmode=require");
    let (ok, out, err) = psql(&conn, Some("scram-pass"), "select 1").await;
    assert!(ok && out.trim() == "1", "psql after {after}: {out} {err}");
}

async fn hostile_lab() -> LabUp {
    LabUp::start(LabOptions {
        clients: vec!["alice"],
        tailgres_args: vec![HANDSHAKE_TIMEOUT_ARG],
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_refused_and_the_proxy_keeps_serving() {
    let lab = hostile_lab().await;
    let forward = lab.forward(0);
    for c in cases() {
        let skip = lab.audit_records().len();
        let got = exchange(&forward, &c.bytes, c.half_close).await;
        match c.expect {
            Expect::Fatal => assert_fatal_08p01(&got, c.name),
            Expect::Close => assert!(got.is_empty(), "{}: the proxy answered {got:?}", c.name),
            Expect::TlsAlertOrClose => {
                assert!(
                    got.is_empty() || got[0] == 0x15,
                    "{}: expected a TLS alert or a close, got {got:?}",
                    c.name
                )
            }
        }
        // A hang-up and a failed TLS handshake have reasons of their own.
        let reason = if c.detail.contains("closed the connection") {
            "client_closed"
        } else if c.detail.contains("TLS handshake failed") {
            "client_tls_failed"
        } else {
            "protocol_error"
        };
        wait_denied(&lab, skip, reason, c.detail, c.name).await;
        assert_psql_works(&lab, c.name).await;
    }
    lab.stop().await;
}

/// SSLRequest/GSSENCRequest answered one at a time, then refused when a
/// client loops on them instead of starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_gssenc_requests_are_refused() {
    let lab = hostile_lab().await;
    let skip = lab.audit_records().len();
    let mut s = within("connect", TcpStream::connect(lab.forward(0))).await.unwrap();
    let mut answered = 0;
    let mut refusal = Vec::new();
    for _ in 0..8 {
        s.write_all(&request(GSSENC_REQUEST)).await.unwrap();
        let mut b = [0u8; 1];
        within("answer to GSSENCRequest", s.read_exact(&mut b)).await.unwrap();
        if b[0] == b'N' {
            answered += 1;
            continue;
        }
        refusal.push(b[0]);
        refusal.extend(read_until_close(&mut s).await);
        break;
    }
    assert!(answered >= 1, "the first GSSENCRequest must be answered 'N'");
    assert!(!refusal.is_empty(), "8 GSSENCRequests in a row were all answered 'N'");
    assert_fatal_08p01(&refusal, "8 GSSENCRequests");
    wait_denied(&lab, skip, "protocol_error", "too many SSL/GSSENC requests", "8 GSSENCRequests").await;
    assert_psql_works(&lab, "8 GSSENCRequests").await;
    lab.stop().await;
}

/// A StartupMessage of any length up to the server's limit is accepted:
/// exactly 10000 bytes of parameters reaches authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_of_exactly_the_limit_reaches_authentication() {
    let lab = hostile_lab().await;
    let app = "hostile-big-startup";
    let mut s = within("connect", TcpStream::connect(lab.forward(0))).await.unwrap();
    s.write_all(&big_startup(MAX_STARTUP, app)).await.unwrap();
    let mut head = [0u8; 9];
    within("answer to a 10000-byte startup", s.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[0], b'R', "a 10000-byte startup must reach authentication, got {head:?}");
    let code = u32::from_be_bytes(head[5..9].try_into().unwrap());
    assert_eq!(code, 10, "the database itself took the startup and asks for SCRAM");
    drop(s);
    let start = lab
        .wait_record("session_start of the big startup", |r| {
            r["event"] == "session_start" && r["postgres"]["application_name"] == app
        })
        .await;
    assert_eq!(start["postgres"]["user"], "role_scram");
    assert_psql_works(&lab, "a 10000-byte startup").await;
    lab.stop().await;
}

/// GSSENCRequest → 'N', then a plaintext startup on the same socket
/// proceeds to authentication (closing here breaks Kerberos users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_then_plaintext_startup_works() {
    let lab = hostile_lab().await;
    let app = "hostile-gssenc-then-startup";
    let mut s = within("connect", TcpStream::connect(lab.forward(0))).await.unwrap();
    s.write_all(&request(GSSENC_REQUEST)).await.unwrap();
    let mut b = [0u8; 1];
    within("answer to GSSENCRequest", s.read_exact(&mut b)).await.unwrap();
    assert_eq!(b[0], b'N');
    s.write_all(&startup(
        PROTOCOL_3_0,
        &[("user", "role_scram"), ("database", "app"), ("application_name", app)],
    ))
    .await
    .unwrap();
    let mut head = [0u8; 9];
    within("authentication request", s.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[0], b'R', "expected an authentication request, got {head:?}");
    let code = u32::from_be_bytes(head[5..9].try_into().unwrap());
    assert_eq!(code, 10, "role_scram over plaintext: AuthenticationSASL");
    drop(s);
    let start = lab
        .wait_record("session_start", |r| {
            r["event"] == "session_start" && r["postgres"]["application_name"] == app
        })
        .await;
    assert_eq!(start["client_transport"], "plaintext");
    lab.stop().await;
}

/// A client that sends half a startup and never finishes is closed at the
/// handshake timeout, and others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_closed_at_the_handshake_timeout() {
    let lab = hostile_lab().await;
    let skip = lab.audit_records().len();
    let good = startup(PROTOCOL_3_0, &[("user", "role_scram"), ("database", "app")]);
    let mut s = within("connect", TcpStream::connect(lab.forward(0))).await.unwrap();
    s.write_all(&good[..good.len() / 2]).await.unwrap();
    assert_psql_works(&lab, "a stalled startup on another connection").await;
    let got = read_until_close(&mut s).await;
    assert!(got.is_empty(), "the proxy answered a stalled startup: {got:?}");
    let r = wait_denied(&lab, skip, "handshake_timeout", "no startup within", "stalled startup").await;
    assert!(r["detail"].as_str().unwrap().contains(HANDSHAKE_TIMEOUT), "{r}");
    assert_psql_works(&lab, "a stalled startup").await;
    lab.stop().await;
}

/// 50 garbage connections at once, interleaved with 5 good psql sessions:
/// every good session succeeds and every bad one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_storm_does_not_starve_good_sessions() {
    // The default handshake timeout: on a loaded machine 55 connections
    // through one tailnet forward can take longer than 2 s to arrive.
    let lab = LabUp::start(LabOptions { clients: vec!["alice"], ..Default::default() }).await;
    let forward = lab.forward(0);
    // Records from before the storm (the lab's readiness probe) don't count.
    let skip = lab.audit_records().len();
    let garbage: Vec<(Vec<u8>, bool)> = vec![
        (b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(), false),
        (be(0).to_vec(), false),
        (be(1 << 31).to_vec(), false),
        (startup_v2(), false),
        ([request(SSL_REQUEST), startup(PROTOCOL_3_0, &[("user", "role_scram")])].concat(), false),
        (vec![0, 0], true),
    ];
    let mut bad = tokio::task::JoinSet::new();
    let mut good = tokio::task::JoinSet::new();
    for i in 0..55 {
        if i % 11 == 5 {
            let (host, port) = lab.forward_host_port(0);
            good.spawn(async move {
                let conn = format!("host={host} port={port} user=role_scram dbname=app sslmode=require application_name=storm-{i}");
                (i, psql(&conn, Some("scram-pass"), "select 1").await)
            });
        } else {
            let (bytes, half_close) = garbage[i % garbage.len()].clone();
            let forward = forward.clone();
            bad.spawn(async move { (i, half_close, exchange(&forward, &bytes, half_close).await) });
        }
    }
    let mut refused = 0;
    while let Some(r) = bad.join_next().await {
        let (i, half_close, got) = r.unwrap();
        if half_close {
            assert!(got.is_empty(), "garbage #{i}: answered {got:?}");
        } else {
            assert_fatal_08p01(&got, &format!("garbage #{i}"));
        }
        refused += 1;
    }
    assert_eq!(refused, 50);
    let mut ok = 0;
    while let Some(r) = good.join_next().await {
        let (i, (success, out, err)) = r.unwrap();
        assert!(success && out.trim() == "1", "psql #{i} during the storm: {out} {err}");
        ok += 1;
    }
    assert_eq!(ok, 5);

    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let records = lab.audit_records();
        let denied = records
            .iter()
            .skip(skip)
            .filter(|r| {
                r["event"] == "session_denied"
                    && (r["reason"] == "protocol_error" || r["reason"] == "client_closed")
            })
            .count();
        let ended = records
            .iter()
            .filter(|r| {
                r["event"] == "session_end"
                    && (r["reason"] == "client_terminated" || r["reason"] == "client_closed")
                    && r["postgres"]["application_name"].as_str().is_some_and(|a| a.starts_with("storm-"))
            })
            .count();
        if denied == 50 && ended == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit: {denied} denied of 50, {ended} ended of 5:\n{:#?}",
            records
                .iter()
                .skip(skip)
                .map(|r| format!("{} {} {}", r["event"], r["reason"], r["detail"]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lab.stop().await;
}
