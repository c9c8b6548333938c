//! Every way a session is refused or ended, in-process: the real accept
//! loop, sessions, revocation and audit log over the in-memory tailnet,
//! against a scripted TLS database (see `inprocess/harness.rs`). Each
//! DenyReason and EndReason is produced here and its record checked; the
//! end-to-end suites prove the same paths against real PostgreSQL over a
//! real tailnet.
#[path = "inprocess/harness.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};
use std::time::Duration;
use tailgres::audit::{DenyReason, EndReason};
use tailgres::pgwire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn grant(users: &[&str], databases: &[&str]) -> Value {
    json!({"users": users, "databases": databases})
}

/// Every reason the tests below produce, so a reason added to the enums
/// without a test here fails this.
#[test]
fn every_reason_is_produced_here() {
    let this = include_str!("inprocess.rs");
    for r in DenyReason::ALL {
        assert!(this.contains(&format!("denied(\"{}\")", r.as_str())), "no in-process test for {r:?}");
    }
    for r in EndReason::ALL {
        assert!(this.contains(&format!("ended(\"{}\")", r.as_str())), "no in-process test for {r:?}");
    }
}

// ---- refused before authorization ----

#[tokio::test]
async fn unknown_peer_and_failed_whois() {
    let w = World::start(Options::default()).await;
    let stranger: std::net::IpAddr = [100, 64, 0, 99].into();
    let mut c = w.dial(stranger).await;
    c.write_all(&startup("alice", "app")).await.unwrap();
    let (code, msg) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "28000", "{msg}");
    let r = w.denied("unknown_peer").await;
    assert_eq!(r["side"], "client");

    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    w.tailnet.fail_whois(Some("the node's backend is gone"));
    let mut c = w.dial(ip).await;
    c.write_all(&startup("alice", "app")).await.unwrap();
    let (code, _) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "57P03", "the proxy's failure: try again");
    let r = w.denied("whois_failed").await;
    assert_eq!(r["side"], "proxy");
    assert!(r["detail"].as_str().unwrap().contains("backend is gone"), "{r}");
}

#[tokio::test]
async fn protocol_errors_hangups_and_tls_failures() {
    let w = World::start(Options::default()).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;

    let mut c = w.dial(ip).await;
    c.write_all(&[0, 0, 0, 3]).await.unwrap(); // a length no packet has
    let (code, _) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "08P01");
    w.denied("protocol_error").await;

    drop(w.dial(ip).await); // dials and hangs up
    w.denied("client_closed").await;

    let mut c = w.dial(ip).await;
    c.write_all(&pgwire::SSL_REQUEST_PACKET).await.unwrap();
    let mut s = [0u8; 1];
    c.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    c.write_all(b"\x16\x03\x01\x00\x05not a client hello").await.unwrap();
    let _ = error_of(&mut c).await;
    w.denied("client_tls_failed").await;
}

#[tokio::test]
async fn a_silent_client_times_out() {
    let w =
        World::start(Options { handshake_timeout: Duration::from_millis(200), ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let _c = w.dial(ip).await;
    let r = w.denied("handshake_timeout").await;
    assert!(r["detail"].as_str().unwrap().contains("no startup within"), "{r}");
}

#[tokio::test]
async fn grants_routes_and_the_session_limit() {
    let w =
        World::start(Options { databases: vec!["app".into()], max_sessions: 2, ..Default::default() }).await;
    let alice = w.join(person(1, "alice@example.com", vec![grant(&["readonly"], &["app", "other"])])).await;
    let bob = w.join(person(2, "bob@example.com", vec![])).await;

    // alice's grant does not name this user.
    let e = w.connect(alice, "postgres").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{e}");
    let r = w.denied("not_authorized").await;
    assert!(r["detail"].as_str().unwrap().contains("readonly"), "{r}");
    // bob has no grant, and alice does: once grants are in use, refused.
    let e = w.connect(bob, "anyone").await.err().expect("refused");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("has no access grant"), "{msg}");

    // No route for another database name.
    let mut c = w.dial(alice).await;
    c.write_all(&startup("readonly", "other")).await.unwrap();
    let (code, _) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "3D000");
    w.denied("no_route").await;

    // --max-sessions 2: two connections in their handshake hold both (once
    // the refusals above have finished and given theirs back).
    w.wait_active(0).await;
    let _a = w.dial(alice).await;
    let _b = w.dial(alice).await;
    w.wait_active(2).await;
    let mut c = w.dial(alice).await;
    c.write_all(&startup("readonly", "app")).await.unwrap();
    let (code, _) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "53300");
    let r = w.denied("too_many_sessions").await;
    assert_eq!(r["side"], "proxy");
}

/// One peer cannot hold every slot with idle sockets: past its cap of
/// connections not yet authorized it is refused at once (told 53300, while
/// few refusals are being told), other peers still get in, and a burst of
/// refusals leaves one record per second, not one per connection.
#[tokio::test]
async fn one_peer_cannot_hold_every_slot_before_authorization() {
    use tailgres::session::MAX_HANDSHAKES_PER_PEER;
    let w = World::start(Options { max_sessions: 200, ..Default::default() }).await;
    let mallory = w.join(person(1, "mallory@example.com", vec![])).await;
    let alice = w.join(person(2, "alice@example.com", vec![])).await;
    let mut idle = Vec::new();
    for _ in 0..MAX_HANDSHAKES_PER_PEER {
        idle.push(w.dial(mallory).await);
    }
    within("every slot of mallory's is taken", async {
        while w.shared.handshaking.live("n1") < MAX_HANDSHAKES_PER_PEER {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut over = Vec::new();
    for _ in 0..20 {
        let mut c = w.dial(mallory).await;
        c.write_all(&startup("mallory", "app")).await.unwrap();
        over.push(c);
    }
    for c in &mut over {
        let (code, msg) = error_of(c).await.expect("told why");
        assert_eq!(code, "53300", "{msg}");
        assert!(msg.contains("not yet authorized"), "{msg}");
    }
    let r = w.denied("too_many_handshakes").await;
    assert_eq!(r["side"], "client");
    let records: Vec<Value> =
        w.records().into_iter().filter(|r| r["reason"] == "too_many_handshakes").collect();
    assert_eq!(records.len(), 1, "one record for the burst: {records:#?}");
    let m = w.metrics();
    assert!(m.contains("reason=\"too_many_handshakes\"} 20"), "every refusal is counted: {m}");
    // alice is not affected.
    let (client, conn) = w.connect(alice, "alice").await.unwrap();
    client.simple_query("select 1").await.unwrap();
    drop(client);
    conn.await.unwrap();
    // A second later the next refusal is recorded again, with the count.
    tokio::time::sleep(tailgres::audit::DenialLog::EVERY).await;
    let mut c = w.dial(mallory).await;
    c.write_all(&startup("mallory", "app")).await.unwrap();
    let _ = error_of(&mut c).await;
    let r = w
        .record("the next record", |r| {
            r["reason"] == "too_many_handshakes" && r["detail"].as_str().unwrap().contains("19 more")
        })
        .await;
    assert_eq!(r["event"], "session_denied");
}

/// A peer whose identity alone is refused (here: no grant, while others
/// carry one) is told so before its startup is read.
#[tokio::test]
async fn identity_refusals_come_before_the_startup() {
    let w = World::start(Options::default()).await;
    let _alice = w.join(person(1, "alice@example.com", vec![grant(&["alice"], &["app"])])).await;
    let bob = w.join(person(2, "bob@example.com", vec![])).await;
    let mut c = w.dial(bob).await;
    c.write_all(&startup("bob", "app")).await.unwrap();
    let (code, msg) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "28000", "{msg}");
    assert!(msg.contains("has no access grant"), "{msg}");
    let r = w.denied("not_authorized").await;
    assert!(r["postgres"].is_null(), "refused before the startup was read: {r}");
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_sessions() {
    let w = World::start(Options { audit: Some("/dev/full".into()), ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let e = w.connect(ip, "alice").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    // Nothing can be written to /dev/full: the metric says what happened.
    let m = w.metrics();
    let denied = "tailgres_sessions_total{event=\"session_denied\",reason=\"audit_unavailable\"} 1";
    assert!(m.contains(denied), "{m}");
    assert_eq!(w.db.live.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the database");
    // (the record itself could not be written: this is the one reason
    // asserted on the metric: denied("audit_unavailable"))
}

/// Statement audit in process: a simple query is recorded (normalized);
/// a client that pipelines more than the tracker can follow, with nothing
/// answered, is ended fail closed (`audit_unavailable`, FATAL 57P01).
#[tokio::test]
async fn statement_audit_records_and_fails_closed() {
    let w = World::start(Options { audit_statements: true, ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let (client, conn) = w.connect(ip, "alice").await.unwrap();
    client.simple_query("select 'hunter2'").await.unwrap();
    let st = w.record("a statement record", |r| r["event"] == "statement").await;
    assert_eq!(
        (st["text"].as_str(), st["command_tag"].as_str(), st["rows"].as_u64()),
        (Some("select $1"), Some("SELECT"), Some(0))
    );
    drop(client);
    conn.await.unwrap();
    w.ended("client_terminated").await;

    // The fake database ignores Execute: nothing is ever answered.
    let mut c = w.dial(ip).await;
    c.write_all(&startup("alice", "app")).await.unwrap();
    let mut buf = [0u8; 256];
    let _ = c.read(&mut buf).await.unwrap();
    let execute = tailgres::pgwire::message_bytes(b'E', b"\0\0\0\0\0");
    let n = tailgres::statements::tracker::MAX_PENDING + 1;
    let flood: Vec<u8> = execute.iter().copied().cycle().take(execute.len() * n).collect();
    let _ = c.write_all(&flood).await;
    let (code, msg) = error_of(&mut c).await.expect("a FATAL");
    assert_eq!(code, "57P01", "{msg}");
    assert!(msg.contains("cannot audit"), "{msg}");
    let r = w.ended("audit_unavailable").await;
    assert_eq!(r["ended_by"], "proxy");
    assert!(r["detail"].as_str().unwrap().contains("pipelined"), "{r}");
}

// ---- refused by the database leg ----

#[tokio::test]
async fn every_upstream_failure_is_the_databases() {
    let cases = [
        (Db::OtherCa, "upstream_untrusted_certificate"),
        (Db::OtherName, "upstream_name_mismatch"),
        (Db::Expired, "upstream_certificate_expired"),
        (Db::NotYetValid, "upstream_tls"),
        (Db::NoTls, "upstream_no_tls"),
        (Db::Garbage, "upstream_protocol_error"),
    ];
    let w = World::start(Options::default()).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    for (mode, reason) in cases {
        w.db.set(mode);
        let e = w.connect(ip, "alice").await.err().expect("refused");
        assert_eq!(e.code().map(|c| c.code()), Some("08001"), "{mode:?}: {e}");
        let r = w.record(reason, |r| r["event"] == "session_denied" && r["reason"] == reason).await;
        assert_eq!(r["side"], "upstream", "{r}");
    }
    // The named ones, for every_reason_is_produced_here:
    // denied("upstream_untrusted_certificate") denied("upstream_name_mismatch")
    // denied("upstream_certificate_expired") denied("upstream_tls")
    // denied("upstream_no_tls") denied("upstream_protocol_error")
}

#[tokio::test]
async fn unreachable_and_silent_databases() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let w = World::start(Options { upstream_addr: Some(closed.to_string()), ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let _ = w.connect(ip, "alice").await.err().expect("refused");
    w.denied("upstream_unreachable").await;

    let w = World::start(Options {
        db: Db::Silent,
        connect_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let _ = w.connect(ip, "alice").await.err().expect("refused");
    w.denied("upstream_timeout").await;
}

// ---- identity login ----

/// A route that logs in by identity. A grant that says `"login":
/// "identity"` gets in with no password, and the database verified a
/// certificate for the role, whose serial is the session id; a grant that
/// does not say so is refused before the database; a database that asks
/// for a password anyway ends the session, and the client is never asked.
#[tokio::test]
async fn identity_login_by_grant_and_never_a_password() {
    let w =
        World::start(Options { identity_login: Some(Duration::from_secs(3600)), ..Default::default() }).await;
    let by_identity = json!({"users": ["app", "password"], "databases": ["*"], "login": "identity"});
    let alice = w.join(person(1, "alice@example.com", vec![by_identity])).await;
    let bob = w.join(person(2, "bob@example.com", vec![grant(&["app"], &["*"])])).await;

    let (client, _conn) = w.connect(alice, "app").await.expect("identity login");
    client.simple_query("select 1").await.unwrap();
    let ok = w.record("auth_ok", |r| r["event"] == "auth_ok").await;
    assert_eq!(ok["auth_method"], "identity_certificate", "{ok}");
    assert_eq!(ok["client_certificate"]["serial"], ok["session_id"], "{ok}");
    let subject = ok["client_certificate"]["subject"].as_str().unwrap();
    assert!(subject.starts_with("CN=app,") && subject.ends_with(",OU=alice@example.com"), "{subject}");
    assert_eq!(
        *w.db.client_cns.lock().unwrap(),
        ["app"],
        "the database verified one certificate, for the role"
    );

    // bob's grant allows the role, not identity login: refused before the
    // database, told what the admin can add.
    let e = w.connect(bob, "app").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{e}");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("\"login\": \"identity\""), "{msg}");
    let r = w
        .record("bob denied", |r| {
            r["event"] == "session_denied" && r["peer"]["user_login"] == "bob@example.com"
        })
        .await;
    assert_eq!(r["reason"], "not_authorized", "{r}");
    assert!(r["upstream"].is_null(), "{r}");
    assert_eq!(w.db.client_cns.lock().unwrap().len(), 1, "bob never reached the database");

    // The database asks for a password (its pg_hba.conf is not `cert` for
    // the role): the session ends; the client (which has one) is not asked.
    let e = w.connect(alice, "password").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{e}");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("pg_hba.conf") && msg.contains("cert"), "{msg}");
    let failed = w.record("auth_failed", |r| r["event"] == "auth_failed").await;
    assert_eq!(failed["auth_method"], "identity_certificate", "{failed}");
    let end = w.ended("auth_failed").await;
    assert!(end["detail"].as_str().unwrap().contains("cleartext password"), "{end}");
}

/// `--auth scram-verifier`: tailgres checks the client's SCRAM proof
/// against the role's looked-up verifier and logs in to the database with
/// the recovered key. Cached: a second login looks nothing up; a wrong
/// password is refused by tailgres (the database sees no login), and drops
/// the cached verifier, so a changed password works at the next login; a
/// role without a verifier reads as a wrong password to the client.
#[tokio::test]
async fn verifier_mode_checks_the_proof_itself() {
    let w = World::start(Options { verifier: true, ..Default::default() }).await;
    let verifier = |pw: &str| postgres_protocol::password::scram_sha_256(pw.as_bytes());
    w.db.roles.lock().unwrap().insert("carol".into(), verifier("first-password"));
    let ip = w.join(person(1, "carol@example.com", vec![])).await;
    let logins = |w: &World, user: &str| w.db.logins.lock().unwrap().iter().filter(|u| *u == user).count();
    let lookups = |w: &World| w.db.lookups.load(std::sync::atomic::Ordering::SeqCst);

    let (client, _conn) = w.connect_with(ip, "carol", "first-password").await.expect("verifier login");
    client.simple_query("select 1").await.unwrap();
    let ok = w.record("auth_ok", |r| r["event"] == "auth_ok").await;
    assert_eq!(ok["auth_method"], "scram_verifier", "{ok}");
    assert_eq!((lookups(&w), logins(&w, "carol")), (1, 1), "one lookup, one login");
    let (again, _conn2) = w.connect_with(ip, "carol", "first-password").await.expect("cached");
    again.simple_query("select 1").await.unwrap();
    assert_eq!(lookups(&w), 1, "the second login used the cached verifier");

    // A wrong password: refused by tailgres, not the database.
    let e = w.connect_with(ip, "carol", "wrong").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert_eq!(msg, "password authentication failed for user \"carol\"");
    let r = w.denied("password_failed").await;
    assert_eq!(r["side"], "client", "{r}");
    assert!(r["upstream"].is_null(), "{r}");
    let failed = w.record("auth_failed", |r| r["event"] == "auth_failed").await;
    assert_eq!(
        (failed["auth_method"].as_str(), failed["sqlstate"].as_str()),
        (Some("scram_verifier"), Some("28P01"))
    );
    assert_eq!((lookups(&w), logins(&w, "carol")), (1, 2), "no database round trip");

    // The password changes: the next login looks the verifier up again.
    w.db.roles.lock().unwrap().insert("carol".into(), verifier("second-password"));
    let (client, _conn3) = w.connect_with(ip, "carol", "second-password").await.expect("the new password");
    client.simple_query("select 1").await.unwrap();
    assert_eq!(lookups(&w), 2, "looked up again after the failure");
    assert_eq!(logins(&w, "tailgres_auth"), 1, "on the lookup connection kept open");

    // No such role: the same answer as a wrong password; the record says why.
    let e = w.connect_with(ip, "ghost", "anything").await.err().expect("refused");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert_eq!(msg, "password authentication failed for user \"ghost\"");
    let r = w.record("ghost", |r| r["reason"] == "password_failed" && r["postgres"]["user"] == "ghost").await;
    assert!(r["detail"].as_str().unwrap().contains("no usable stored verifier"), "{r}");
    assert_eq!(logins(&w, "ghost"), 0);
}

/// A burst of logins for a role not yet cached costs the database one
/// lookup: they wait for the lookup connection, and find the verifier the
/// first one cached.
#[tokio::test]
async fn a_burst_of_logins_costs_one_lookup() {
    let w = World::start(Options { verifier: true, ..Default::default() }).await;
    let verifier = postgres_protocol::password::scram_sha_256(b"burst-password");
    w.db.roles.lock().unwrap().insert("dave".into(), verifier);
    let ip = w.join(person(1, "dave@example.com", vec![])).await;
    let logins = (0..8).map(|_| w.connect_with(ip, "dave", "burst-password"));
    let clients = futures_util::future::join_all(logins).await;
    for c in &clients {
        let (client, _) = c.as_ref().expect("every login of the burst");
        client.simple_query("select 1").await.unwrap();
    }
    assert_eq!(w.db.lookups.load(std::sync::atomic::Ordering::SeqCst), 1, "one lookup for the burst");
}

/// The lookup itself failing is the proxy's problem (57P03, side proxy),
/// never reported to the client as a wrong password.
#[tokio::test]
async fn a_failed_verifier_lookup_is_the_proxys() {
    let w = World::start(Options { verifier: true, ..Default::default() }).await;
    w.db.fail_lookups.store(true, std::sync::atomic::Ordering::SeqCst);
    let ip = w.join(person(1, "carol@example.com", vec![])).await;
    let e = w.connect_with(ip, "carol", "pw").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    let r = w.denied("verifier_lookup_failed").await;
    assert_eq!(r["side"], "proxy", "{r}");
    assert!(r["detail"].as_str().unwrap().contains("does not exist"), "{r}");
    assert!(!w.records().iter().any(|r| r["event"] == "auth_failed"), "not the client's failure");
}

/// An identity CA that has expired signs nothing: the session is refused
/// (the proxy's fault, 57P03), and the operator's detail says why.
#[tokio::test]
async fn an_expired_identity_ca_signs_nothing() {
    let w =
        World::start(Options { identity_login: Some(Duration::from_secs(2)), ..Default::default() }).await;
    let by_identity = json!({"users": ["app"], "databases": ["*"], "login": "identity"});
    let alice = w.join(person(1, "alice@example.com", vec![by_identity])).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = w.connect(alice, "app").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("57P03"), "{e}");
    let r = w.denied("identity_certificate_failed").await;
    assert_eq!(r["side"], "proxy", "{r}");
    assert!(r["detail"].as_str().unwrap().contains("expired"), "{r}");
    assert!(w.db.client_cns.lock().unwrap().is_empty());
}

// ---- sessions that end ----

#[tokio::test]
async fn authentication_outcomes() {
    let w = World::start(Options::default()).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;

    let e = w.connect(ip, "reject").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "the database's own error: {e}");
    let failed = w.record("auth_failed", |r| r["event"] == "auth_failed").await;
    assert_eq!(
        (failed["auth_method"].clone(), failed["sqlstate"].clone()),
        (json!("cleartext"), json!("28P01"))
    );
    w.ended("auth_failed").await;

    let e = w.connect(ip, "crash").await.err().expect("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e}");
    w.ended("upstream_error").await;

    // A client that answers a password request with a query.
    let mut c = w.dial(ip).await;
    c.write_all(&startup("password", "app")).await.unwrap();
    let m = pgwire::read_message(&mut c, 1 << 16).await.unwrap();
    assert_eq!(m.code(), Some(pgwire::auth::CLEARTEXT));
    c.write_all(&pgwire::message_bytes(b'Q', b"select 1\0")).await.unwrap();
    let _ = error_of(&mut c).await;
    w.ended("client_error").await;
}

#[tokio::test]
async fn clients_and_databases_that_close() {
    let w = World::start(Options::default()).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;

    let (client, conn) = w.connect(ip, "alice").await.unwrap();
    client.simple_query("select 1").await.unwrap();
    drop(client); // tokio-postgres sends Terminate
    conn.await.unwrap();
    let r = w.ended("client_terminated").await;
    assert_eq!(r["ended_by"], "client");

    // A client that just goes away.
    let mut c = w.dial(ip).await;
    c.write_all(&startup("alice", "app")).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = c.read(&mut buf).await.unwrap(); // AuthenticationOk .. ReadyForQuery
    w.record("its session_start", |r| r["event"] == "auth_ok").await;
    drop(c);
    w.ended("client_closed").await;

    let (client, conn) = w.connect(ip, "alice").await.unwrap();
    let _ = client.simple_query("close").await;
    conn.await.unwrap();
    let r = w.ended("upstream_closed").await;
    assert_eq!(r["ended_by"], "upstream");
}

#[tokio::test]
async fn idle_sessions_time_out() {
    let w =
        World::start(Options { idle_timeout: Some(Duration::from_millis(200)), ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let (client, conn) = w.connect(ip, "alice").await.unwrap();
    let r = w.ended("idle_timeout").await;
    assert_eq!(r["ended_by"], "proxy");
    let e = client.simple_query("select 1").await.err().expect("ended");
    assert!(e.is_closed() || e.code().is_some(), "{e}");
    conn.abort();
}

/// Revocation, with and without a client that reads: a peer removed from
/// the tailnet, and a peer whose last grant is withdrawn.
#[tokio::test]
async fn revocation_ends_even_a_session_whose_client_stopped_reading() {
    let w = World::start(Options::default()).await;
    let alice = w.join(person(1, "alice@example.com", vec![grant(&["alice"], &["app"])])).await;

    // alice floods herself with rows and reads none; her node is removed.
    let mut c = w.dial(alice).await;
    c.write_all(&startup("alice", "app")).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = c.read(&mut buf).await.unwrap();
    c.write_all(&pgwire::message_bytes(b'Q', b"stream\0")).await.unwrap();
    // (Long enough for the rows to fill every buffer on the way; the
    // revocation must end the session whether or not they have.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.tailnet.remove_peer(alice);
    let r = w.ended("revoked").await;
    assert_eq!(r["ended_by"], "proxy");
    within("the database session ends", async {
        while w.db.live.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("the running query is cancelled", async {
        while w.db.cancels.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(c);

    // The last grant withdrawn: no grant anywhere is an open tailnet, but
    // a session admitted by a grant does not outlive it.
    let bob = w.join(person(2, "bob@example.com", vec![grant(&["bob"], &["app"])])).await;
    let (client, conn) = w.connect(bob, "bob").await.unwrap();
    let (_, id) = person(2, "bob@example.com", vec![]);
    w.tailnet.set_peer(bob, id);
    let r = w
        .record("bob revoked", |r| {
            r["event"] == "session_end" && r["peer"]["user_login"] == "bob@example.com"
        })
        .await;
    assert_eq!(r["reason"], "revoked", "{r}");
    assert!(client.simple_query("select 1").await.is_err());
    conn.abort();
}

#[tokio::test]
async fn shutdown_ends_sessions_and_handshakes() {
    let mut w = World::start(Options { grace: Duration::from_millis(100), ..Default::default() }).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    // One admitted session whose client stopped reading, one idle, and one
    // connection still in its handshake.
    let mut flood = w.dial(ip).await;
    flood.write_all(&startup("alice", "app")).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = flood.read(&mut buf).await.unwrap();
    flood.write_all(&pgwire::message_bytes(b'Q', b"stream\0")).await.unwrap();
    let mut idle = w.dial(ip).await;
    idle.write_all(&startup("alice", "app")).await.unwrap();
    let m = pgwire::read_message(&mut idle, 1 << 16).await.unwrap();
    assert_eq!(m.code(), Some(pgwire::auth::OK));
    let _handshaking = w.dial(ip).await;
    w.wait_active(3).await;

    w.shut_down().await;
    let ends: Vec<Value> = w
        .records()
        .into_iter()
        .filter(|r| r["event"] == "session_end" && r["reason"] == "shutdown")
        .collect();
    assert_eq!(ends.len(), 2, "both admitted sessions: {ends:#?}");
    w.ended("shutdown").await;
    w.denied("shutting_down").await;
    // The idle client is told why, after the messages it had not read.
    let (code, msg) = error_of(&mut idle).await.expect("a FATAL");
    assert_eq!(code, "57P01", "{msg}");
    drop(flood);
}

// ---- faults ----

/// The database killed mid-query, and its certificate replaced by one from
/// another CA mid-run: running sessions are unaffected by the certificate
/// (they were verified when they began), new ones are refused while it is
/// wrong, the proxy serves again once it is right, and every session has
/// exactly one last record.
#[tokio::test]
async fn database_faults_lose_nothing() {
    let w = World::start(Options::default()).await;
    let ip = w.join(person(1, "alice@example.com", vec![])).await;
    let (running, running_conn) = w.connect(ip, "alice").await.unwrap();

    w.db.set(Db::OtherCa);
    let e = w.connect(ip, "alice").await.err().expect("refused while the certificate is wrong");
    assert_eq!(e.code().map(|c| c.code()), Some("08001"), "{e}");
    w.denied("upstream_untrusted_certificate").await;
    running.simple_query("select 1").await.expect("the running session goes on");
    w.db.set(Db::Normal);
    let (fresh, fresh_conn) = w.connect(ip, "alice").await.unwrap();
    fresh.simple_query("select 1").await.unwrap();

    // Killed in the middle of a query.
    assert!(fresh.simple_query("die").await.is_err());
    let _ = fresh_conn.await;
    let r = w.ended("upstream_error").await;
    assert_eq!(r["ended_by"], "upstream");
    running.simple_query("select 1").await.expect("another session is unaffected");
    drop(running);
    running_conn.await.unwrap();
    w.record("the last session's end", |r| r["event"] == "session_end" && r["reason"] == "client_terminated")
        .await;

    // One last record per session, none twice.
    let records = w.records();
    let mut last = std::collections::HashMap::<String, usize>::new();
    for r in &records {
        if r["event"] == "session_end" || r["event"] == "session_denied" {
            *last.entry(r["session_id"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    let starts = records.iter().filter(|r| r["event"] == "session_start").count();
    assert!(last.values().all(|n| *n == 1), "a session with two last records: {records:#?}");
    assert_eq!(starts, 3, "{records:#?}");
}

// ---- health ----

#[tokio::test]
async fn readiness_hides_the_login_url_and_watches_the_audit_log() {
    let w = World::start(Options::default()).await;
    let health = tailgres::health::Health::new(
        w.tailnet.clone(),
        w.shared.settings.clone(),
        w.shared.metrics.clone(),
        w.shared.audit.clone(),
    );
    let (ready, body) = health.readiness(false).await;
    assert!(ready, "{body}");
    w.tailnet.need_login(Some("https://login.example/a/secret"));
    let (ready, far) = health.readiness(false).await;
    assert!(!ready);
    assert!(!far.to_string().contains("secret"), "the URL reached a non-local client: {far}");
    let (_, near) = health.readiness(true).await;
    assert_eq!(near["tailnet"]["login_url"], "https://login.example/a/secret");
    w.tailnet.need_login(None);

    let full = World::start(Options { audit: Some("/dev/full".into()), ..Default::default() }).await;
    let ip = full.join(person(1, "alice@example.com", vec![])).await;
    let _ = full.connect(ip, "alice").await; // fails, and so marks the log unwritable
    let health = tailgres::health::Health::new(
        full.tailnet.clone(),
        full.shared.settings.clone(),
        full.shared.metrics.clone(),
        full.shared.audit.clone(),
    );
    let (ready, body) = health.readiness(true).await;
    assert!(!ready && body["audit"]["ok"] == false, "{body}");
}

// ---- a fleet: the Service's connections and cancels across members ----

fn fleet() -> Option<tailgres::config::Fleet> {
    Some(tailgres::config::Fleet { service: "svc:pg".into(), tag: "tag:pg".into() })
}

/// A fleet member's identity as its peers see it.
fn member(n: u8, tags: &[&str]) -> (std::net::IpAddr, tailgres::tailnet::PeerIdentity) {
    let (_, mut id) = person(0, "tagged-devices", vec![]);
    let ip = std::net::IpAddr::from([100, 100, 0, n]);
    id.stable_id = format!("nPG{n}");
    id.node_name = format!("pg-{n}.example.ts.net");
    id.tags = tags.iter().map(|t| t.to_string()).collect();
    id.addresses = vec![ip];
    (ip, id)
}

/// Runs `script` (bash) in a child process: a local process that is not
/// tailgres.
async fn from_another_process(script: &str) {
    let st = tokio::process::Command::new("bash").arg("-c").arg(script).status().await.unwrap();
    assert!(st.success(), "{script}");
}

/// The Service's loopback listener takes a session only from this process
/// (tsnet's forwarder runs in it) and only behind a valid PROXY v2 header
/// naming a tailnet client; the session is then that client's.
#[tokio::test]
async fn service_connections_prove_where_they_come_from() {
    let w = World::start(Options { fleet: fleet(), ..Default::default() }).await;
    let alice = w.join(person(1, "alice@example.com", vec![])).await;
    let service = w.service_addr.expect("the Service's listener");
    let node: std::net::SocketAddr = "100.100.100.100:5432".parse().unwrap();
    let client = std::net::SocketAddr::new(alice, 40001);

    // As the forwarder sends it: the session is alice's.
    let mut s = tokio::net::TcpStream::connect(service).await.unwrap();
    s.write_all(&tailgres::proxy_header::encode(client, node, &[])).await.unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("alice").dbname("app").password("pw").application_name("via-service");
    let (c, conn) = within("login through the Service", cfg.connect_raw(s, tokio_postgres::NoTls)).await.unwrap();
    let conn = tokio::spawn(conn);
    c.simple_query("select 1").await.unwrap();
    let r = w.record("session_start", |r| r["event"] == "session_start").await;
    assert_eq!(r["peer_addr"], "100.64.0.1:40001", "the header's client: {r}");
    assert_eq!(r["peer"]["user_login"], "alice@example.com", "{r}");
    drop(c);
    let _ = conn.await;

    // A valid header forged by another local process.
    let hex = |b: &[u8]| b.iter().map(|b| format!("\\x{b:02x}")).collect::<String>();
    from_another_process(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{}; printf '{}{}' >&3; sleep 0.5",
        service.port(),
        hex(&tailgres::proxy_header::encode(client, node, &[])),
        hex(&startup("alice", "app")),
    ))
    .await;
    let r = w.denied("service_connection_refused").await;
    assert!(r["detail"].as_str().unwrap().contains("another local process"), "{r}");

    // From this process, but no header, a header naming an address outside
    // the tailnet, and an unfinished one.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (startup("alice", "app"), "PROXY protocol"),
        (tailgres::proxy_header::encode("192.168.1.5:40002".parse().unwrap(), node, &[]), "not a tailnet address"),
        (tailgres::proxy_header::encode(client, node, &[])[..20].to_vec(), "PROXY protocol header"),
    ];
    for (bytes, why) in &cases {
        let mut s = tokio::net::TcpStream::connect(service).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = within("the refused connection closes", s.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "{why}: answered {rest:?}");
    }
    // (Their records are folded into the next one from 127.0.0.1, a
    // second later at the earliest; the metric counts each.)
    let counted = "tailgres_sessions_total{event=\"session_denied\",reason=\"service_connection_refused\"} 4";
    within("four refusals counted", async {
        while !w.metrics().contains(counted) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let r = w.denied("service_connection_refused").await;
    assert_eq!(r["side"], "client", "{r}");
    assert!(r["peer"].is_null(), "nothing about a refused connection is trusted: {r}");
    assert!(r["peer_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    // Records come at most once a second per address (127.0.0.1 here):
    // the rest are counted into the next record, none is a session.
    let starts = w.records().into_iter().filter(|r| r["event"] == "session_start").count();
    assert_eq!(starts, 1, "only the forwarder's connection became a session");
    assert!(!w.records().iter().any(|r| r["peer_addr"] == "192.168.1.5:40002"));
}

/// Shutdown on a Service host: the sessions that came through the Service
/// end first, told why, then the node withdraws; a session on the node's
/// own address keeps the grace.
#[tokio::test]
async fn a_service_host_ends_its_service_sessions_then_withdraws() {
    let mut w = World::start(Options { fleet: fleet(), grace: Duration::from_secs(2), ..Default::default() }).await;
    let alice = w.join(person(1, "alice@example.com", vec![])).await;
    let node: std::net::SocketAddr = "100.100.100.100:5432".parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(w.service_addr.unwrap()).await.unwrap();
    s.write_all(&tailgres::proxy_header::encode(std::net::SocketAddr::new(alice, 40001), node, &[])).await.unwrap();
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("alice").dbname("app").password("pw").application_name("via-service");
    let (via_service, conn) = cfg.connect_raw(s, tokio_postgres::NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let (direct, direct_conn) = w.connect(alice, "alice").await.unwrap();
    w.wait_active(2).await;
    assert!(w.tailnet.advertises("svc:pg"));

    let shutdown = tokio::spawn(async move {
        w.shut_down().await;
        w
    });
    let e = within("the Service session ends", async {
        loop {
            if let Err(e) = via_service.simple_query("select 1").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("leaving the Service"), "{e:?}");
    // Meanwhile the direct session still works (its grace runs).
    direct.simple_query("select 1").await.expect("the direct session keeps its grace");
    let w = shutdown.await.unwrap();
    assert!(!w.tailnet.advertises("svc:pg"), "the node withdrew");
    let ends: Vec<Value> = w.records().into_iter().filter(|r| r["event"] == "session_end").collect();
    let via = ends.iter().find(|r| r["postgres"]["application_name"] == "via-service").expect("its end");
    assert_eq!(via["reason"], "shutdown", "{via}");
    assert!(via["detail"].as_str().unwrap_or("").contains("left svc:pg"), "{via}");
    let other = ends.iter().find(|r| r["postgres"]["application_name"] == "inprocess").expect("its end");
    assert!(other["duration_ms"].as_u64().unwrap() >= 1500, "the direct session had its grace: {other}");
    let _ = conn.await;
    direct_conn.abort();
}

/// A cancel that lands on the wrong member of a fleet is passed on to the
/// member whose key it is, which applies the identity check and cancels;
/// a non-member passing a cancel on is refused.
#[tokio::test]
async fn a_cancel_on_the_wrong_member_reaches_the_right_one() {
    let ip = |n| std::net::Ipv4Addr::new(100, 100, 0, n);
    let a = World::start(Options { fleet: fleet(), node_ip: ip(1), ..Default::default() }).await;
    let b = World::start(Options { fleet: fleet(), node_ip: ip(2), ..Default::default() }).await;
    let alice = person(1, "alice@example.com", vec![]);
    for (w, other) in [(&a, 2), (&b, 1)] {
        w.join(alice.clone()).await;
        w.join(member(other, &["tag:pg"])).await;
    }
    // A reaches B's port 5432 as 100.100.0.1.
    a.tailnet.link("100.100.0.2:5432".parse().unwrap(), b.tailnet.clone(), ip(1).into());

    let (client, conn) = b.connect(alice.0, "alice").await.unwrap();
    let sid = b.record("alice's session", |r| r["event"] == "auth_ok").await["session_id"].clone();
    let token = client.cancel_token();
    // The Service sends the cancel to A.
    token.cancel_query_raw(a.dial(alice.0).await, tokio_postgres::NoTls).await.unwrap();
    let at_a = a.record("A's cancel", |r| r["event"] == "cancel").await;
    assert_eq!((&at_a["reason"], &at_a["fleet_peer"]), (&json!("to_peer"), &json!("pg-2.example.ts.net")), "{at_a}");
    assert_eq!(at_a["peer"]["user_login"], "alice@example.com", "{at_a}");
    let at_b = b.record("B's cancel", |r| r["event"] == "cancel").await;
    assert_eq!((&at_b["reason"], &at_b["target_session_id"]), (&json!("forwarded"), &sid), "{at_b}");
    assert_eq!(at_b["fleet_peer"], "pg-1.example.ts.net", "{at_b}");
    assert_eq!(at_b["peer"]["user_login"], "alice@example.com", "the record is the client's: {at_b}");
    assert_eq!(at_b["peer_addr"].as_str().unwrap().split(':').next(), Some("100.64.0.1"), "{at_b}");
    within("B's database gets the cancel", async {
        while b.db.cancels.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let (db_pid, _) = b.db.cancels.lock().unwrap()[0].clone();
    assert!(db_pid > 1000, "the database's own pid reached it, not the node's ({db_pid})");
    assert!(a.db.cancels.lock().unwrap().is_empty(), "A's database got nothing");

    // bob (no fleet tag) passes alice's key on to B as if he were a member.
    let bob = b.join(person(3, "bob@example.com", vec![])).await;
    let mut s = b.dial(bob).await;
    let bytes = {
        // The key alice's client holds, from her BackendKeyData.
        let mut raw = Vec::new();
        token.cancel_query_raw(RawCancel(&mut raw), tokio_postgres::NoTls).await.unwrap();
        raw
    };
    let (pid, key) = (u32::from_be_bytes(bytes[8..12].try_into().unwrap()), &bytes[12..]);
    assert_eq!(std::net::Ipv4Addr::from(pid), ip(2), "the client's key names its node");
    s.write_all(&pgwire::fleet_cancel_request(pid, key, std::net::SocketAddr::new(alice.0, 1))).await.unwrap();
    let r = b.record("bob's fleet cancel", |r| r["reason"] == "not_fleet_member").await;
    assert_eq!(r["peer"]["user_login"], "bob@example.com", "{r}");
    assert_eq!(b.db.cancels.lock().unwrap().len(), 1, "bob's cancel reached nobody");
    drop(client);
    conn.abort();
}

/// Collects what a client writes (a CancelRequest) and reads nothing.
struct RawCancel<'a>(&'a mut Vec<u8>);

impl tokio::io::AsyncRead for RawCancel<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(())) // end of stream: the server closed
    }
}

impl tokio::io::AsyncWrite for RawCancel<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().0.extend_from_slice(b);
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
