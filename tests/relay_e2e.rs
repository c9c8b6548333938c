//! The data phase (after ReadyForQuery) end to end, through the real
//! tailnet and the real TLS PostgreSQL: bytes counted each way, how each
//! side's close ends a session, and how a stop (revocation, drain) ends one
//! whose client is busy reading a COPY or never reads at all. These hold
//! whatever moves the bytes (the relay's implementation is not assumed).
//!
//! Run with scripts/test (a fresh network namespace with only `lo`):
//! `scripts/test --test relay_e2e`.

mod common;
use common::lab::{psql, psql_stdin, psql_superuser, LabOptions, LabUp};
use common::ops::PgProc;
use common::wire::{error_field, query, read_message, startup, PROTOCOL_3_0};
use common::{http_json, within, within_for, STEP};

use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

const CAP: &str = "tailgres.dev/cap/postgres";

/// How long a stop (revocation, drain) may take to end a session, its
/// backend and its client's connection; it includes the 2 s a stuck write
/// is given and the time a policy takes to reach the proxy.
const STOP_BOUND: Duration = Duration::from_secs(15);

/// How many bytes of the write a stop cuts short may reach the client
/// without being counted (the relay counts whole writes; its buffer is
/// 64 KiB at most).
const CUT_WRITE_SLACK: u64 = 256 * 1024;

/// A result far larger than any buffer on the way (10 GB): a client that
/// does not read blocks the database in a write long before its end.
const HUGE_SELECT: &str =
    "select repeat('x', 1000) from generate_series(1, 10000) a, generate_series(1, 1000) b";

fn conninfo(lab: &LabUp, user: &str, sslmode: &str, app: &str) -> String {
    let (host, port) = lab.forward_host_port(0);
    let password = if user == "role_scram" { "password=scram-pass" } else { "" };
    format!(
        "host={host} port={port} user={user} {password} dbname=app sslmode={sslmode} application_name={app}"
    )
}

/// The session_end record of the session named `app`.
async fn end_of(lab: &LabUp, app: &str) -> Value {
    lab.wait_record(&format!("session_end of {app}"), |r| {
        r["event"] == "session_end" && r["postgres"]["application_name"] == app
    })
    .await
}

/// Waits at most `limit` until the database `pg` (a lab database's
/// description) has `want` backends named `app` that match `and` (SQL,
/// e.g. "and wait_event = 'ClientWrite'").
async fn wait_backends(pg: &Value, app: &str, and: &str, want: usize, limit: Duration, what: &str) {
    let sql = format!("select count(*) from pg_stat_activity where application_name = '{app}' {and}");
    within_for(limit, what, async {
        while psql_superuser(pg, &sql).await.trim() != want.to_string() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// A client playing the protocol by hand, as a passwordless role: the
/// startup, then messages up to ReadyForQuery. What the proxy or the
/// database said instead, when the login is refused.
async fn login(lab: &LabUp, user: &str, database: &str, app: &str) -> Result<TcpStream, String> {
    let mut s = within("connect to the forward", TcpStream::connect(lab.forward(0)))
        .await
        .map_err(|e| e.to_string())?;
    let params = [("user", user), ("database", database), ("application_name", app)];
    s.write_all(&startup(PROTOCOL_3_0, &params)).await.map_err(|e| e.to_string())?;
    loop {
        match within("the login", read_message(&mut s)).await {
            Ok((b'Z', _)) => return Ok(s),
            Ok((b'E', body)) => {
                return Err(format!("{:?} {:?}", error_field(&body, b'C'), error_field(&body, b'M')))
            }
            Ok(_) => {}
            Err(e) => return Err(format!("during the login: {e}")),
        }
    }
}

/// Bytes waiting unread in `s`'s receive queue (FIONREAD).
fn unread(s: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer; the fd is open.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "ioctl FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Sends a query with a huge result on `s` and reads none of it; returns
/// once the whole path is full: nothing more has reached `s` for a second
/// (every buffer between it and the proxy is full, so the proxy's write to
/// it is stuck) and the backend `app` on `pg` is blocked writing to the
/// proxy.
async fn query_and_stall(s: &mut TcpStream, pg: &Value, app: &str) {
    s.write_all(&query(HUGE_SELECT)).await.unwrap();
    within("the client's receive queue to fill and stay full", async {
        let mut last = (0, tokio::time::Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = unread(s);
            if n != last.0 {
                last = (n, tokio::time::Instant::now());
            } else if n > 0 && last.1.elapsed() >= Duration::from_secs(1) {
                return;
            }
        }
    })
    .await;
    let what = "the backend to block on a client that does not read";
    wait_backends(pg, app, "and wait_event = 'ClientWrite'", 1, STEP, what).await;
}

/// Reads everything until the connection ends (EOF or an error), adding
/// what arrives to `seen`; returns how it ended.
async fn read_until_closed(mut s: TcpStream, seen: Arc<AtomicU64>) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return "EOF".to_string(),
            Ok(n) => seen.fetch_add(n as u64, Ordering::Relaxed),
            Err(e) => return format!("error: {e}"),
        };
    }
}

/// Asserts `lo <= n < 2 * lo`: every payload byte counted, and not
/// counted twice.
fn assert_counted(end: &Value, field: &str, lo: usize) {
    let n = end[field].as_u64().unwrap_or_else(|| panic!("{field} in {end}")) as usize;
    assert!(n >= lo && n < 2 * lo, "{field} = {n}, the payload alone is {lo}: {end}");
}

/// Both relay directions carry a COPY intact and count it; Terminate ends
/// the session as `client_terminated`. Done once per client leg.
async fn copy_both_ways(lab: &LabUp, sslmode: &str, transport: &str) {
    const ROW: usize = 1000;
    const OUT_ROWS: usize = 20_000;
    const IN_ROWS: usize = 5_000;
    let app = format!("copy-{sslmode}");
    let input = format!("{}\n", "y".repeat(ROW)).repeat(IN_ROWS).into_bytes();
    let copy_out = format!("copy (select repeat('x', {ROW}) from generate_series(1, {OUT_ROWS})) to stdout");
    let commands = [
        "create temp table copied (x text)",
        "copy copied from stdin",
        &copy_out,
        "select count(*), sum(length(x)) from copied",
    ];
    let (ok, out, err) =
        psql_stdin(&conninfo(lab, "role_scram", sslmode, &app), None, &commands, input.clone()).await;
    assert!(ok, "psql sslmode={sslmode}: {err}");
    let row = "x".repeat(ROW);
    assert_eq!(out.lines().filter(|l| *l == row).count(), OUT_ROWS, "rows the client got, sslmode={sslmode}");
    let stored = format!("{IN_ROWS}|{}", IN_ROWS * ROW);
    assert!(
        out.lines().any(|l| l == stored),
        "the database did not store every row sent ({stored}): {out:.300}"
    );

    let end = end_of(lab, &app).await;
    assert_eq!(end["reason"], "client_terminated", "{end}");
    assert_eq!(end["ended_by"], "client", "{end}");
    assert_eq!(end["client_transport"], transport, "{end}");
    assert_counted(&end, "bytes_upstream_to_client", OUT_ROWS * (ROW + 1));
    assert_counted(&end, "bytes_client_to_upstream", input.len());
}

/// A client that hangs up without Terminate: `client_closed`, and its
/// backend goes.
async fn hang_up_is_client_closed(lab: &LabUp) {
    let app = "hang-up";
    let mut s = login(lab, "role_trust", "app", app).await.expect("login");
    s.write_all(&query("select 1")).await.unwrap();
    loop {
        let (tag, _) = within("the answer to select 1", read_message(&mut s)).await.unwrap();
        if tag == b'Z' {
            break;
        }
    }
    let up = &lab.info["upstream"];
    wait_backends(up, app, "", 1, STEP, "the session's backend").await;
    drop(s); // everything was read: a FIN, not a reset
    let end = end_of(lab, app).await;
    assert_eq!((&end["reason"], &end["ended_by"]), (&json!("client_closed"), &json!("client")), "{end}");
    wait_backends(up, app, "", 0, STOP_BOUND, "the backend to go after its client hung up").await;
}

/// A backend ended by the database (pg_terminate_backend from another
/// session): the client gets the server's own FATAL 57P01, the session is
/// `upstream_closed`.
async fn terminated_backend_is_upstream_closed(lab: &LabUp) {
    let app = "terminated";
    let (client, connection) =
        within("connect", tokio_postgres::connect(&conninfo(lab, "role_scram", "disable", app), NoTls))
            .await
            .expect("connect");
    let connection = tokio::spawn(connection);
    // The client is kept until its connection ends: dropped, it would send
    // a Terminate, and the session could be the client's.
    let terminate = async {
        let running = "and wait_event = 'PgSleep'";
        wait_backends(&lab.info["upstream"], app, running, 1, STEP, "the query to run").await;
        let sql = format!(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = '{app}'"
        );
        lab.psql_admin(&sql).await
    };
    let (r, killed) = tokio::join!(
        within("the query to fail", client.query_one("select pg_sleep(60)::text", &[])),
        terminate
    );
    assert_eq!(killed.trim(), "t", "pg_terminate_backend");
    let e = r.expect_err("the backend was terminated");
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e:?}");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(
        msg.contains("terminating connection due to administrator command"),
        "the database's FATAL: {e:?}"
    );
    let _ = within("the client connection to end", connection).await;
    drop(client);
    let end = end_of(lab, app).await;
    assert_eq!((&end["reason"], &end["ended_by"]), (&json!("upstream_closed"), &json!("upstream")), "{end}");
}

/// SIGTERM with a session whose client sent a query with a huge result and
/// reads nothing: after the grace (1 s) and the stuck write's own 2 s, the
/// session ends `shutdown`, its backend goes, and tailgres exits 0. The
/// session runs on `drained` (routed by database name), a database that
/// outlives the lab's own (the lab stops that one when tailgres exits).
async fn drain_ends_a_session_whose_client_never_reads(lab: &LabUp, drained: &PgProc) {
    let app = "drain-unread";
    let mut s = login(lab, "role_trust", "postgres", app).await.expect("login");
    query_and_stall(&mut s, &drained.info, app).await;

    let pid = lab.info["proxy"]["pid"].to_string();
    let ok = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success();
    assert!(ok, "kill -TERM {pid}");
    let exit_file = Path::new(lab.info["dir"].as_str().unwrap()).join("tailgres.exit");
    let code =
        within_for(STOP_BOUND, "tailgres to exit after SIGTERM with a client that never reads", async {
            loop {
                if let Ok(c) = std::fs::read_to_string(&exit_file) {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    assert_eq!(code.trim(), "0", "tailgres's exit");
    let end = end_of(lab, app).await;
    assert_eq!((&end["reason"], &end["ended_by"]), (&json!("shutdown"), &json!("proxy")), "{end}");
    wait_backends(&drained.info, app, "", 0, STOP_BOUND, "the backend to go after the drain").await;
    // (Not asserted: that this client's connection ends. The proxy's
    // tailnet node went with its process, with data still queued for a
    // client whose window is shut, so nothing may tell the client's node.)
    drop(s);
}

/// Bytes and closes: a COPY each way over a plaintext and a TLS client leg,
/// Terminate, a hang-up, a backend terminated by the database; then a drain
/// with a client that never reads (last: the proxy exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_closes_and_a_drain_through_the_relay() {
    let drained = PgProc::start().await;
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), drained.route_toml("drained", "postgres", None, drained.ca())).unwrap();
    let cfg_arg = format!("--config={}", cfg.path().display());
    let args = vec!["--shutdown-grace=1s", &cfg_arg];
    let lab = LabUp::start(LabOptions { tailgres_args: args, ..Default::default() }).await;
    copy_both_ways(&lab, "disable", "plaintext").await;
    copy_both_ways(&lab, "require", "tls").await;
    hang_up_is_client_closed(&lab).await;
    terminated_backend_is_upstream_closed(&lab).await;
    drain_ends_a_session_whose_client_never_reads(&lab, &drained).await;
    lab.stop().await;
    drained.stop().await;
}

/// Puts a policy granting `alice-laptop` these users on database app.
async fn grant(lab: &LabUp, users: &[&str]) {
    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": users}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");
}

/// Grants role_trust (only) and waits until the proxy applies it: role_trust
/// is let in and role_scram is refused.
async fn grant_role_trust(lab: &LabUp) {
    grant(lab, &["role_trust"]).await;
    within_for(Duration::from_secs(60), "the role_trust grant to reach the proxy", async {
        loop {
            let scram = psql(&conninfo(lab, "role_scram", "disable", "grant-probe"), None, "select 1").await;
            if !scram.0
                && scram.2.contains("may not open a session")
                && login(lab, "role_trust", "app", "grant-probe").await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// A client busy reading a long COPY TO STDOUT has its access revoked: its
/// connection ends within the bound, the session ends `revoked` having
/// counted at least what the client got, and its backend goes.
async fn revocation_mid_copy(lab: &LabUp) {
    grant_role_trust(lab).await;
    let app = "revoked-mid-copy";
    let mut s = login(lab, "role_trust", "app", app).await.expect("login under the grant");
    // 100 GB: it is still streaming when the grant goes.
    let copy = "copy (select repeat('x', 1000) from generate_series(1, 10000) a, generate_series(1, 10000) b) to stdout";
    s.write_all(&query(copy)).await.unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let mut reader = tokio::spawn(read_until_closed(s, seen.clone()));
    within("the COPY to stream 4 MB", async {
        while seen.load(Ordering::Relaxed) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!reader.is_finished(), "the COPY ended early: {:?}", (&mut reader).await);

    grant(lab, &["role_md5"]).await;
    let how = within_for(STOP_BOUND, "the COPY client's connection to end after the revocation", reader)
        .await
        .unwrap();
    let received = seen.load(Ordering::Relaxed);
    let end = end_of(lab, app).await;
    assert_eq!(
        (&end["reason"], &end["ended_by"]),
        (&json!("revoked"), &json!("proxy")),
        "{end} (client: {how})"
    );
    let counted = end["bytes_upstream_to_client"].as_u64().unwrap();
    assert!(counted >= received, "counted {counted} bytes to the client, which got {received}: {end}");
    let what = "the backend to go after the revocation mid-COPY";
    wait_backends(&lab.info["upstream"], app, "", 0, STOP_BOUND, what).await;
}

/// A client that sent a query with a huge result and reads nothing has its
/// access revoked: despite the write stuck on it, the session ends
/// `revoked` within the bound, its backend goes, and its connection ends
/// once it reads what was already on its way.
async fn revocation_of_a_client_that_never_reads(lab: &LabUp) {
    grant_role_trust(lab).await;
    let app = "revoked-unread";
    let mut s = login(lab, "role_trust", "app", app).await.expect("login under the grant");
    query_and_stall(&mut s, &lab.info["upstream"], app).await;

    grant(lab, &["role_md5"]).await;
    let end =
        within_for(STOP_BOUND, "session_end after revoking a client that never reads", end_of(lab, app))
            .await;
    assert_eq!((&end["reason"], &end["ended_by"]), (&json!("revoked"), &json!("proxy")), "{end}");
    let what = "the backend to go after revoking a client that never reads";
    wait_backends(&lab.info["upstream"], app, "", 0, STOP_BOUND, what).await;
    let seen = Arc::new(AtomicU64::new(0));
    within_for(STOP_BOUND, "the unread connection to end once read", read_until_closed(s, seen.clone()))
        .await;
    // All that reached the client was counted, but for the write the stop
    // cut short: what of it got through is not counted (found: up to one
    // relay buffer).
    let (counted, read) = (end["bytes_upstream_to_client"].as_u64().unwrap(), seen.load(Ordering::Relaxed));
    assert!(counted + CUT_WRITE_SLACK >= read, "counted {counted}, yet the client then read {read}: {end}");
}

/// Revocation of live sessions in the data phase: one streaming a COPY to
/// a client that reads, one whose client never reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_streaming_and_stuck_sessions() {
    let lab = LabUp::start(LabOptions { clients: vec!["alice-laptop"], ..Default::default() }).await;
    revocation_mid_copy(&lab).await;
    revocation_of_a_client_that_never_reads(&lab).await;
    lab.stop().await;
}
