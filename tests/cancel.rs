//! Identity-bound cancel through the tailnet (docs/postgres-protocol.md,
//! "Cancel"): psql's Ctrl-C works, a wrong key and a right key from another
//! tailnet node do nothing, and every CancelRequest leaves a `cancel` record.
//!
//! Run with scripts/test (a fresh network namespace with only `lo`).

mod common;
use common::{within, STEP};

use common::lab::{LabOptions, LabUp};
use serde_json::Value;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_postgres::{CancelToken, Client, NoTls};

/// PostgreSQL's CancelRequest code (the "protocol version" field).
const CANCEL_REQUEST_CODE: u32 = 80877102;
/// psql must give up its query this soon after Ctrl-C.
const CANCEL_EFFECT: Duration = Duration::from_secs(10);

/// How many backends of `app` are inside pg_sleep right now (asked of the
/// database directly, not through the proxy).
async fn sleeping(lab: &LabUp, app: &str) -> usize {
    let sql = format!(
        "select count(*) from pg_stat_activity where application_name = '{app}' and wait_event = 'PgSleep'"
    );
    lab.psql_admin(&sql).await.trim().parse().unwrap()
}

/// Waits until the database shows `app`'s pg_sleep running.
async fn wait_sleeping(lab: &LabUp, app: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    while sleeping(lab, app).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "{app}: pg_sleep never showed in pg_stat_activity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The session id the proxy gave the session with this application_name.
async fn session_id(lab: &LabUp, app: &str) -> String {
    let start = lab
        .wait_record(&format!("session_start of {app}"), |r| {
            r["event"] == "session_start" && r["postgres"]["application_name"] == app
        })
        .await;
    start["session_id"].as_str().unwrap().to_string()
}

/// The tailnet node name of lab client `i` ("alice.tail-lab.ts.net").
fn node_name(lab: &LabUp, i: usize) -> String {
    lab.info["clients"][i]["tailnet_name"].as_str().unwrap().trim_end_matches('.').to_string()
}

/// Checks the parts of a `cancel` record every case shares.
fn assert_cancel_record(r: &Value, reason: &str, target: Option<&str>, node: &str) {
    assert_eq!(r["event"], "cancel");
    assert_eq!(r["reason"], reason, "{r}");
    assert_eq!(r["forwarded"], reason == "forwarded", "{r}");
    match target {
        Some(t) => assert_eq!(r["target_session_id"], t, "{r}"),
        None => assert!(r["target_session_id"].is_null(), "{r}"),
    }
    assert_eq!(r["peer"]["node_name"], node, "the cancel is attributed to the node that sent it: {r}");
    assert!(r["postgres"].is_null(), "a cancel carries no startup: {r}");
}

/// psql's Ctrl-C: a plaintext CancelRequest on a new connection through the
/// same forward, whatever the session's own sslmode.
async fn psql_ctrl_c(lab: &LabUp, sslmode: &str) {
    let app = format!("cancel-psql-{sslmode}");
    let (host, port) = lab.forward_host_port(0);
    let conn = format!(
        "host={host} port={port} user=role_scram dbname=app sslmode={sslmode} application_name={app}"
    );
    let child = Command::new("psql")
        .args(["-X", "-At", "-c", "select pg_sleep(60)", &conn])
        .env("PGPASSWORD", "scram-pass")
        .env("PGPASSFILE", "/dev/null")
        .env("PGSERVICEFILE", "/dev/null")
        .env("PGCONNECT_TIMEOUT", "30")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_sleeping(lab, &app).await;
    let sid = session_id(lab, &app).await;

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status().await.unwrap();
    assert!(killed.success(), "kill -INT psql");
    let out = tokio::time::timeout(CANCEL_EFFECT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{sslmode}: psql still running {CANCEL_EFFECT:?} after Ctrl-C"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{sslmode}: psql succeeded after Ctrl-C: {stderr}");
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{sslmode}: psql did not report the cancel: {stderr}"
    );

    let r = lab
        .wait_record(&format!("cancel of {app}"), |r| r["event"] == "cancel" && r["target_session_id"] == sid)
        .await;
    assert_cancel_record(&r, "forwarded", Some(&sid), &node_name(lab, 0));
    assert_eq!(r["client_transport"], "plaintext", "psql sends its cancel in plaintext: {r}");
    assert_ne!(r["session_id"], sid, "the cancel arrives on a connection of its own: {r}");
    assert_eq!(sleeping(lab, &app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_through_the_proxy() {
    let lab = LabUp::start(LabOptions { clients: vec!["alice"], ..Default::default() }).await;
    psql_ctrl_c(&lab, "prefer").await;
    psql_ctrl_c(&lab, "disable").await;
    lab.stop().await;
}

/// A tokio-postgres session through client `i`'s forward (plaintext inside
/// WireGuard, so its cancel token is exactly what the proxy relayed).
async fn connect(lab: &LabUp, i: usize, app: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (host, port) = lab.forward_host_port(i);
    let conn = format!(
        "host={host} port={port} user=role_scram password=scram-pass dbname=app sslmode=disable application_name={app}"
    );
    let (client, connection) = within("tokio-postgres connect", tokio_postgres::connect(&conn, NoTls))
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {e}"));
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

/// The CancelRequest bytes tokio-postgres would send for `token` (it writes
/// them to any stream we hand it; the fields themselves are private).
async fn cancel_bytes(token: &CancelToken) -> Vec<u8> {
    let (ours, mut theirs) = tokio::io::duplex(64);
    token.cancel_query_raw(ours, NoTls).await.unwrap();
    let mut bytes = Vec::new();
    theirs.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes.len(), 16, "a protocol 3.0 CancelRequest: {bytes:?}");
    assert_eq!(bytes[..4], 16u32.to_be_bytes());
    assert_eq!(bytes[4..8], CANCEL_REQUEST_CODE.to_be_bytes());
    bytes
}

/// Sends raw CancelRequest bytes through client `i`'s forward; the proxy
/// answers nothing and closes, as the server would.
async fn send_cancel(lab: &LabUp, i: usize, bytes: &[u8]) {
    let mut s = within("connect forward", TcpStream::connect(lab.forward(i))).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut rest = Vec::new();
    let _ = within("proxy closes after a cancel", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "the proxy answered a CancelRequest: {rest:?}");
}

/// Starts `select pg_sleep(60)` and waits until the database runs it.
async fn start_sleep(
    lab: &LabUp,
    client: Client,
    app: &str,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let query = tokio::spawn(async move { client.batch_execute("select pg_sleep(60)").await });
    wait_sleeping(lab, app).await;
    query
}

async fn assert_canceled(query: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) {
    let r = tokio::time::timeout(CANCEL_EFFECT, query)
        .await
        .expect("query still running after the cancel")
        .unwrap();
    let e = r.expect_err("pg_sleep(60) finished instead of being canceled");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing() {
    let lab = LabUp::start(LabOptions { clients: vec!["alice"], ..Default::default() }).await;
    let app = "cancel-wrong-key";
    let (client, _driver) = connect(&lab, 0, app).await;
    let backend_pid: i32 = client.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    let token = client.cancel_token();
    let right = cancel_bytes(&token).await;
    // The client's key is tailgres's own: its pid names the proxy's node (a
    // tailnet IPv4 address), and the database's key never leaves tailgres.
    assert_ne!(right[8..12], backend_pid.to_be_bytes(), "the database's pid reached the client");
    assert_eq!(right[8], 100, "the key's pid is the node's tailnet address: {:?}", &right[8..12]);
    let sid = session_id(&lab, app).await;
    let query = start_sleep(&lab, client, app).await;

    // Same pid, every key bit flipped.
    let mut wrong = right.clone();
    for b in &mut wrong[12..] {
        *b = !*b;
    }
    send_cancel(&lab, 0, &wrong).await;
    let r = lab.wait_record("unknown_key cancel", |r| r["event"] == "cancel").await;
    assert_cancel_record(&r, "unknown_key", None, &node_name(&lab, 0));
    assert_eq!(sleeping(&lab, app).await, 1, "a wrong key canceled the query");

    // The right key still works: the wrong one was ignored, not fatal.
    token.cancel_query_raw(TcpStream::connect(lab.forward(0)).await.unwrap(), NoTls).await.unwrap();
    assert_canceled(query).await;
    let r =
        lab.wait_record("forwarded cancel", |r| r["event"] == "cancel" && r["reason"] == "forwarded").await;
    assert_cancel_record(&r, "forwarded", Some(&sid), &node_name(&lab, 0));

    // Once the session has ended (the query task dropped the client) its
    // key is unknown, even from its own node.
    lab.wait_record("session_end", |r| r["event"] == "session_end" && r["session_id"] == sid).await;
    send_cancel(&lab, 0, &right).await;
    let unknown = |r: &Value| r["event"] == "cancel" && r["reason"] == "unknown_key";
    let deadline = tokio::time::Instant::now() + STEP;
    while lab.audit_records().iter().filter(|r| unknown(r)).count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second unknown_key cancel: {:#?}",
            lab.audit_records()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancels = lab.audit_records().into_iter().filter(|r| r["event"] == "cancel").count();
    assert_eq!(cancels, 3);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_another_tailnet_node_does_nothing() {
    let lab = LabUp::start(LabOptions { clients: vec!["alice", "bob"], ..Default::default() }).await;
    let app = "cancel-other-node";
    let (client, _driver) = connect(&lab, 0, app).await;
    let token = client.cancel_token();
    let sid = session_id(&lab, app).await;
    let query = start_sleep(&lab, client, app).await;

    // Bob has alice's exact (pid, key) and sends it from his own node.
    token.cancel_query_raw(TcpStream::connect(lab.forward(1)).await.unwrap(), NoTls).await.unwrap();
    let r = lab.wait_record("other_node cancel", |r| r["event"] == "cancel").await;
    assert_cancel_record(&r, "other_node", Some(&sid), &node_name(&lab, 1));
    assert_eq!(sleeping(&lab, app).await, 1, "bob's node canceled alice's query");
    assert!(!query.is_finished(), "alice's query ended after bob's cancel");

    // The same key from alice's node cancels it.
    token.cancel_query_raw(TcpStream::connect(lab.forward(0)).await.unwrap(), NoTls).await.unwrap();
    assert_canceled(query).await;
    let r =
        lab.wait_record("forwarded cancel", |r| r["event"] == "cancel" && r["reason"] == "forwarded").await;
    assert_cancel_record(&r, "forwarded", Some(&sid), &node_name(&lab, 0));
    lab.stop().await;
}

/// Sends CancelRequest bytes inside TLS (SSLRequest, 'S', handshake), as
/// libpq 17's new cancel API does for a TLS session.
async fn send_cancel_in_tls(lab: &LabUp, i: usize, bytes: &[u8]) {
    let config = common::wire::any_server_cert();
    let mut s = within("connect forward", TcpStream::connect(lab.forward(i))).await.unwrap();
    s.write_all(&[&8u32.to_be_bytes()[..], &80877103u32.to_be_bytes()].concat()).await.unwrap();
    let mut answer = [0u8; 1];
    within("answer to SSLRequest", s.read_exact(&mut answer)).await.unwrap();
    assert_eq!(answer[0], b'S', "the lab's proxy offers TLS to clients");
    let name = rustls::pki_types::ServerName::try_from("tailgres").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = within("TLS handshake", connector.connect(name, s)).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = within("proxy closes after a cancel", tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "the proxy answered a CancelRequest: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_inside_tls_is_forwarded() {
    let lab = LabUp::start(LabOptions { clients: vec!["alice"], ..Default::default() }).await;
    let app = "cancel-in-tls";
    let (client, _driver) = connect(&lab, 0, app).await;
    let bytes = cancel_bytes(&client.cancel_token()).await;
    let sid = session_id(&lab, app).await;
    let query = start_sleep(&lab, client, app).await;
    send_cancel_in_tls(&lab, 0, &bytes).await;
    assert_canceled(query).await;
    let r = lab.wait_record("forwarded cancel", |r| r["event"] == "cancel").await;
    assert_cancel_record(&r, "forwarded", Some(&sid), &node_name(&lab, 0));
    assert_eq!(r["client_transport"], "tls", "{r}");
    lab.stop().await;
}
