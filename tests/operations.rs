//! Running tailgres in production (issue 5): readiness, metrics, graceful
//! drain, the session limit, idle timeout, reload with a broken certificate,
//! and several databases routed by name (cancel included).
//!
//! Run with scripts/test (a fresh network namespace with only `lo`).

mod common;
use common::within;

use common::lab::{psql, LabOptions, LabUp};
use common::ops::{free_port, http_get, sample, wait_readyz, PgProc};
use common::wire::{startup, PROTOCOL_3_0};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

fn conninfo(lab: &LabUp, db: &str, app: &str) -> String {
    let (host, port) = lab.forward_host_port(0);
    format!("host={host} port={port} user=role_scram password=scram-pass dbname={db} sslmode=disable application_name={app}")
}

async fn connect(lab: &LabUp, db: &str, app: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) =
        within("connect", tokio_postgres::connect(&conninfo(lab, db, app), NoTls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn proxy_pid(lab: &LabUp) -> String {
    lab.info["proxy"]["pid"].to_string()
}

async fn signal(pid: &str, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), pid]).status().await.unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits for the lab to record how tailgres exited.
async fn exit_code(lab: &LabUp) -> String {
    let f = lab.info["dir"].as_str().map(|d| Path::new(d).join("tailgres.exit")).unwrap();
    within("tailgres to exit", async {
        loop {
            if let Ok(c) = std::fs::read_to_string(&f) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Waits until the database shows `app`'s pg_sleep running.
async fn wait_sleeping(lab: &LabUp, app: &str) {
    let sql = format!(
        "select count(*) from pg_stat_activity where application_name = '{app}' and wait_event = 'PgSleep'"
    );
    within("the query to run", async {
        while lab.psql_admin(&sql).await.trim() != "1" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

fn ends_of(lab: &LabUp, app: &str) -> Vec<Value> {
    let sids: Vec<Value> = lab
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "session_start" && r["postgres"]["application_name"] == app)
        .map(|r| r["session_id"].clone())
        .collect();
    lab.audit_records()
        .into_iter()
        .filter(|r| r["event"] == "session_end" && sids.contains(&r["session_id"]))
        .collect()
}

/// /readyz follows the tailnet (503 with the login URL until an interactive
/// login completes, then 200) and the database (503 naming the route once
/// it stops); /healthz answers throughout; SIGTERM then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_login_and_database() {
    let lab = common::Lab::start_with(&["--require-login"]).await;
    let pg = PgProc::start().await;
    let health = free_port();
    let dir = lab.dir.path();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .arg(format!("--control-url={}", lab.control_url))
        .arg("--hostname=pg")
        .arg(format!("--state-dir={}", dir.join("proxy").display()))
        .arg(format!("--audit-log={}", dir.join("audit.jsonl").display()))
        .arg(format!("--upstream={}", pg.addr()))
        .arg(format!("--upstream-ca={}", pg.ca()))
        .arg(format!("--upstream-server-name={}", pg.server_name()))
        .arg(format!("--health-listen=127.0.0.1:{health}"))
        .stderr(std::fs::File::create(dir.join("proxy.stderr")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let v =
        wait_readyz(health, "a login URL", |s, v| s == 503 && v["tailnet"]["login_url"].is_string()).await;
    assert_eq!(v["ready"], false);
    assert_eq!(v["tailnet"]["state"], "NeedsLogin", "{v}");
    assert_eq!(http_get(health, "/healthz").await.0, 200, "alive while waiting for a login");
    let url = v["tailnet"]["login_url"].as_str().unwrap();
    assert!(url.starts_with(&lab.control_url), "{url}");
    lab.admin("POST", "/auth/complete", Some(json!({ "url": url }))).await;

    let v = wait_readyz(health, "ready", |s, _| s == 200).await;
    assert_eq!(v["tailnet"]["state"], "Running");
    assert_eq!(v["upstreams"][0]["ok"], true, "{v}");
    assert_eq!(v["upstreams"][0]["address"], pg.addr());
    let metrics = http_get(health, "/metrics").await.1;
    assert_eq!(sample(&metrics, "tailgres_tailnet_backend_state{state=\"Running\"}"), 1.0);
    let left = sample(&metrics, "tailgres_upstream_cert_expiry_seconds{route=\"default\"}");
    assert!(left > 86_400.0, "the probe reads the database's certificate: {left}");

    pg.stop().await;
    let v = wait_readyz(health, "the database down", |s, _| s == 503).await;
    assert_eq!(v["tailnet"]["state"], "Running");
    assert_eq!(v["upstreams"][0]["ok"], false);
    assert!(v["upstreams"][0]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(http_get(health, "/nope").await.0, 404);

    signal(&proxy.id().unwrap().to_string(), "TERM").await;
    let status = within("tailgres to exit", proxy.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "clean exit after SIGTERM");
    lab.control.stop().await;
}

/// Metrics move with real sessions: outcomes, bytes, stage latencies,
/// audit writes, certificate expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_sessions() {
    let health = free_port();
    let arg = format!("--health-listen=127.0.0.1:{health}");
    let lab = LabUp::start(LabOptions { tailgres_args: vec![&arg], ..Default::default() }).await;
    let before = http_get(health, "/metrics").await.1;
    let ok = psql(&conninfo(&lab, "app", "metrics"), None, "select repeat('x', 100000)").await;
    assert!(ok.0, "{}", ok.2);
    let bad = conninfo(&lab, "app", "metrics").replace("scram-pass", "wrong");
    assert!(!psql(&bad, None, "select 1").await.0);
    lab.wait_record("two ends", |_| ends_of(&lab, "metrics").len() == 2).await;
    let after = http_get(health, "/metrics").await.1;

    let d = |s: &str| sample(&after, s) - sample(&before, s);
    assert_eq!(d("tailgres_sessions_total{event=\"session_end\",reason=\"client_terminated\"}"), 1.0);
    assert_eq!(d("tailgres_sessions_total{event=\"session_end\",reason=\"auth_failed\"}"), 1.0);
    assert!(d("tailgres_relayed_bytes_total{direction=\"upstream_to_client\"}") > 100_000.0);
    assert!(d("tailgres_relayed_bytes_total{direction=\"client_to_upstream\"}") > 0.0);
    assert_eq!(d("tailgres_stage_duration_seconds_count{stage=\"whois\"}"), 2.0);
    assert_eq!(d("tailgres_stage_duration_seconds_count{stage=\"upstream_connect\"}"), 2.0);
    assert_eq!(d("tailgres_stage_duration_seconds_count{stage=\"auth\"}"), 2.0);
    assert!(d("tailgres_audit_write_duration_seconds_count") >= 5.0, "start, auth, end ×2");
    assert_eq!(sample(&after, "tailgres_sessions_active"), 0.0);
    assert!(sample(&after, "tailgres_upstream_cert_expiry_seconds{route=\"default\"}") > 86_400.0);
    assert!(sample(&after, "tailgres_client_cert_expiry_seconds") > 86_400.0, "self-signed certificate");

    // `tailgres audit` on this real log: the two ends, then the summary.
    let audit = |args: &[&str]| common::audit::cli(&lab.audit_log(), args);
    let node = lab.info["clients"][0]["tailnet_name"].as_str().unwrap().to_string();
    let ends =
        audit(&["--format=json", "--event=session_end", "--database=app", "--who", &node, "--since=1h"]);
    let mut reasons: Vec<&str> = ends.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(reasons, ["auth_failed", "client_terminated"], "{ends:#?}");
    let summary = audit(&["--summary", "--format=json", "--user=role_scram"]);
    assert_eq!(summary.len(), 1, "{summary:#?}");
    assert_eq!((summary[0]["sessions"].as_u64(), summary[0]["auth_failed"].as_u64()), (Some(2), Some(1)));
    assert_eq!(summary[0]["node"], node.as_str());
    assert!(summary[0]["bytes_upstream_to_client"].as_u64().unwrap() > 100_000);
    assert!(audit(&["--format=json", "--who=nobody-else"]).is_empty());
    lab.stop().await;
}

/// SIGTERM: new connections are refused at once; a query that ends inside
/// the grace finishes; one that outlives it is ended with 57P01 and its
/// session_end says `shutdown`; tailgres exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_short_queries_and_ends_long_ones() {
    let health = free_port();
    let arg = format!("--health-listen=127.0.0.1:{health}");
    let lab =
        LabUp::start(LabOptions { tailgres_args: vec!["--shutdown-grace=6s", &arg], ..Default::default() })
            .await;
    let short = connect(&lab, "app", "drain-short").await.unwrap();
    let long = connect(&lab, "app", "drain-long").await.unwrap();
    let short_q = tokio::spawn(async move { short.query_one("select pg_sleep(3)::text", &[]).await });
    let long_q = tokio::spawn(async move { long.query_one("select pg_sleep(120)::text", &[]).await });
    wait_sleeping(&lab, "drain-short").await;
    wait_sleeping(&lab, "drain-long").await;

    signal(&proxy_pid(&lab), "TERM").await;
    // Stop accepting at once: a new session is refused (the listener is gone).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = connect(&lab, "app", "drain-late").await;
    assert!(late.is_err(), "a session started after SIGTERM");
    let v = wait_readyz(health, "draining", |s, _| s == 503).await;
    assert_eq!(v["draining"], true, "{v}");

    let short_r = within("the short query", short_q).await.unwrap();
    assert!(short_r.is_ok(), "the query inside the grace finished: {short_r:?}");
    let long_r = within("the long query", long_q).await.unwrap();
    let e = long_r.expect_err("the long query outlived the grace");
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e}");
    assert_eq!(exit_code(&lab).await.trim(), "0");

    let long_end = ends_of(&lab, "drain-long");
    assert_eq!(long_end.len(), 1, "{long_end:#?}");
    assert_eq!(long_end[0]["reason"], "shutdown");
    let short_end = ends_of(&lab, "drain-short");
    assert_eq!(short_end.len(), 1, "{short_end:#?}");
    assert_eq!(short_end[0]["reason"], "client_terminated", "its client closed after the query");
    lab.stop().await;
}

/// A second SIGTERM ends the sessions at once instead of after the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_ends_sessions_at_once() {
    let lab =
        LabUp::start(LabOptions { tailgres_args: vec!["--shutdown-grace=10m"], ..Default::default() }).await;
    let c = connect(&lab, "app", "drain-twice").await.unwrap();
    let q = tokio::spawn(async move { c.query_one("select pg_sleep(120)::text", &[]).await });
    wait_sleeping(&lab, "drain-twice").await;
    let pid = proxy_pid(&lab);
    signal(&pid, "TERM").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!q.is_finished(), "the grace is ten minutes");
    signal(&pid, "TERM").await;
    let e = within("the query to be ended", q).await.unwrap().expect_err("ended");
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e}");
    assert_eq!(exit_code(&lab).await.trim(), "0");
    assert_eq!(ends_of(&lab, "drain-twice")[0]["reason"], "shutdown");
    lab.stop().await;
}

/// Sessions still in their handshake when the grace ends are ended too,
/// and audited: one whose session_start is written gets a session_end
/// (`shutdown`), one that had not got that far a session_denied
/// (`shutting_down`). Neither waits for its handshake timeout (ten minutes
/// here), and tailgres exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_audits_sessions_still_in_their_handshake() {
    let health = free_port();
    let arg = format!("--health-listen=127.0.0.1:{health}");
    let lab = LabUp::start(LabOptions {
        tailgres_args: vec!["--shutdown-grace=1s", "--handshake-timeout=10m", &arg],
        ..Default::default()
    })
    .await;
    // Says nothing: the proxy waits for its startup.
    let silent = within("connect", tokio::net::TcpStream::connect(lab.forward(0))).await.unwrap();
    // Sends its startup, reads the database's SCRAM request, then stalls.
    let app = "drain-mid-auth";
    let mut stalled = within("connect", tokio::net::TcpStream::connect(lab.forward(0))).await.unwrap();
    let params = [("user", "role_scram"), ("database", "app"), ("application_name", app)];
    stalled.write_all(&startup(PROTOCOL_3_0, &params)).await.unwrap();
    let mut head = [0u8; 9];
    within("authentication request", stalled.read_exact(&mut head)).await.unwrap();
    assert_eq!((head[0], head[8]), (b'R', 10), "AuthenticationSASL, got {head:?}");
    let start = lab.wait_record("session_start", |r| {
        r["event"] == "session_start" && r["postgres"]["application_name"] == app
    });
    let start = start.await;
    within("both sessions to be live", async {
        while sample(&http_get(health, "/metrics").await.1, "tailgres_sessions_active") != 2.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    signal(&proxy_pid(&lab), "TERM").await;
    assert_eq!(exit_code(&lab).await.trim(), "0");
    let records = lab.audit_records();
    let ends: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "session_end" && r["session_id"] == start["session_id"])
        .collect();
    assert_eq!(ends.len(), 1, "{records:#?}");
    assert_eq!(ends[0]["reason"], "shutdown");
    let denied: Vec<&Value> =
        records.iter().filter(|r| r["event"] == "session_denied" && r["reason"] == "shutting_down").collect();
    assert_eq!(denied.len(), 1, "the silent client: {records:#?}");
    assert_ne!(denied[0]["session_id"], start["session_id"]);
    assert_eq!(denied[0]["side"], "proxy");
    drop((silent, stalled));
    lab.stop().await;
}

/// --max-sessions: the excess gets 53300 and a session_denied record; a
/// freed slot is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_refuses_the_excess_with_53300() {
    let lab =
        LabUp::start(LabOptions { tailgres_args: vec!["--max-sessions=2"], ..Default::default() }).await;
    let a = connect(&lab, "app", "limit").await.unwrap();
    let _b = connect(&lab, "app", "limit").await.unwrap();
    let e = connect(&lab, "app", "limit").await.expect_err("a third session");
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    let r = lab.wait_record("too_many_sessions", |r| r["reason"] == "too_many_sessions").await;
    assert_eq!(r["event"], "session_denied");
    assert_eq!(r["side"], "proxy");
    drop(a);
    lab.wait_record("a slot freed", |_| !ends_of(&lab, "limit").is_empty()).await;
    let c = connect(&lab, "app", "limit").await.expect("a freed slot is usable");
    c.query_one("select 1", &[]).await.unwrap();
    lab.stop().await;
}

/// --idle-timeout ends a session nobody uses with 57P05 (`idle_timeout`);
/// with --log-format json the operator log is JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_ended() {
    let args = vec!["--idle-timeout=2s", "--log-format=json"];
    let lab = LabUp::start(LabOptions { tailgres_args: args, ..Default::default() }).await;
    let c = connect(&lab, "app", "idle").await.unwrap();
    c.query_one("select 1", &[]).await.unwrap();
    let r = lab.wait_record("idle_timeout", |r| r["event"] == "session_end").await;
    assert_eq!(r["reason"], "idle_timeout");
    assert_eq!(r["ended_by"], "proxy");
    assert!(c.query_one("select 1", &[]).await.is_err(), "the session is gone");
    // --log-format json: every line of the operator log is a JSON object.
    let log = std::fs::read_to_string(lab.proxy_log()).unwrap();
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    lab.stop().await;
}

/// The SHA-256 of the certificate tailgres shows a TLS client, via
/// `openssl s_client -starttls postgres` through the forward.
async fn served_fingerprint(lab: &LabUp) -> String {
    let cmd = format!(
        "openssl s_client -connect {} -starttls postgres </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
        lab.forward(0)
    );
    let out =
        within("openssl", Command::new("sh").args(["-c", &cmd]).stdin(Stdio::null()).output()).await.unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write_cert(dir: &Path) -> String {
    let c = rcgen::generate_simple_self_signed(vec!["pg.tail-lab.ts.net".to_string()]).unwrap();
    std::fs::write(dir.join("client.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("client.key"), c.key_pair.serialize_pem()).unwrap();
    let der = c.cert.der().to_vec();
    use sha2::Digest;
    sha2::Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// SIGHUP with a broken certificate keeps serving the old one (and says
/// so in the reload metric); a good one then replaces it without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_broken_certificate_keeps_the_old_one() {
    let certs = tempfile::tempdir().unwrap();
    let first = write_cert(certs.path());
    let health = free_port();
    let args = [
        format!("--client-tls-cert={}", certs.path().join("client.pem").display()),
        format!("--client-tls-key={}", certs.path().join("client.key").display()),
        format!("--health-listen=127.0.0.1:{health}"),
    ];
    let lab = LabUp::start(LabOptions {
        tailgres_args: args.iter().map(String::as_str).collect(),
        ..Default::default()
    })
    .await;
    assert!(served_fingerprint(&lab).await.ends_with(&first), "serves the configured certificate");

    std::fs::write(certs.path().join("client.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    signal(&proxy_pid(&lab), "HUP").await;
    within("the failed reload", async {
        while sample(&http_get(health, "/metrics").await.1, "tailgres_reloads_total{result=\"failed\"}") < 1.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served_fingerprint(&lab).await.ends_with(&first), "the old certificate is still served");
    let (ok, out, err) =
        psql(&conninfo(&lab, "app", "reload").replace("disable", "require"), None, "select 7").await;
    assert!(ok && out.trim() == "7", "still serving TLS sessions: {err}");

    let second = write_cert(certs.path());
    signal(&proxy_pid(&lab), "HUP").await;
    within("the good reload", async {
        while sample(&http_get(health, "/metrics").await.1, "tailgres_reloads_total{result=\"ok\"}") < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served_fingerprint(&lab).await.ends_with(&second), "the new certificate, no restart");
    lab.stop().await;
}

/// Two databases behind one proxy, routed by database name, each with its
/// own CA; a cancel reaches the database its session runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upstreams_routed_by_database_with_cancel() {
    let second = PgProc::start().await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("tailgres.toml");
    std::fs::write(&cfg, second.route_toml("second", "postgres", None, second.ca())).unwrap();
    let arg = format!("--config={}", cfg.display());
    let lab = LabUp::start(LabOptions { tailgres_args: vec![&arg], ..Default::default() }).await;
    let first_port = lab.info["upstream"]["port"].as_u64().unwrap() as i32;

    let port_of = |c: Client| async move {
        let r = c.query_one("select inet_server_port()", &[]).await.unwrap();
        r.get::<_, i32>(0)
    };
    assert_eq!(port_of(connect(&lab, "app", "route-app").await.unwrap()).await, first_port);
    let c = connect(&lab, "postgres", "route-second").await.unwrap();
    assert_eq!(port_of(c).await, second.port() as i32);
    let e = connect(&lab, "nonexistent", "route-none").await.expect_err("no such database upstream");
    assert_eq!(
        e.code(),
        Some(&SqlState::UNDEFINED_DATABASE),
        "the catch-all route asked the first database: {e}"
    );

    // Cancel on the second database.
    let c = connect(&lab, "postgres", "route-cancel").await.unwrap();
    let token = c.cancel_token();
    let q = tokio::spawn(async move { c.query_one("select pg_sleep(60)::text", &[]).await });
    let sql = "select count(*) from pg_stat_activity where application_name = 'route-cancel' and wait_event = 'PgSleep'";
    let second_admin = format!(
        "host={} port={} user={} dbname=postgres",
        second.info["socket_dir"].as_str().unwrap(),
        second.port(),
        second.info["superuser"].as_str().unwrap()
    );
    within("the query on the second database", async {
        loop {
            let out =
                Command::new("psql").args(["-X", "-At", "-c", sql, &second_admin]).output().await.unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    token
        .cancel_query_raw(tokio::net::TcpStream::connect(lab.forward(0)).await.unwrap(), NoTls)
        .await
        .unwrap();
    let e = within("the cancel", q).await.unwrap().expect_err("canceled");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e}");
    let r =
        lab.wait_record("forwarded cancel", |r| r["event"] == "cancel" && r["reason"] == "forwarded").await;
    assert_eq!(r["event"], "cancel");
    let ends = lab.audit_records();
    let second_start = ends
        .iter()
        .find(|r| r["event"] == "auth_ok" && r["postgres"]["application_name"] == "route-cancel")
        .expect("auth_ok");
    assert_eq!(second_start["upstream"]["server_name"], second.server_name());
    lab.stop().await;
    second.stop().await;
}

/// Routes by tailnet port: the main port reaches the catch-all database, a
/// route's own port reaches its database, a database that port does not
/// route is refused with 3D000 (`no_route`). Health is also served on its
/// own tailnet port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_tailnet_port_and_health_on_the_tailnet() {
    let lab = common::Lab::start(None).await;
    let (first, second) = (PgProc::start().await, PgProc::start().await);
    let dir = lab.dir.path();
    let cfg = dir.join("tailgres.toml");
    std::fs::write(&cfg, second.route_toml("side", "app", Some(6543), second.ca())).unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .arg(format!("--config={}", cfg.display()))
        .arg(format!("--control-url={}", lab.control_url))
        .arg("--hostname=pg")
        .arg(format!("--state-dir={}", dir.join("proxy").display()))
        .arg(format!("--audit-log={}", dir.join("audit.jsonl").display()))
        .arg(format!("--upstream={}", first.addr()))
        .arg(format!("--upstream-ca={}", first.ca()))
        .arg(format!("--upstream-server-name={}", first.server_name()))
        .arg("--health-tailnet-port=9187")
        .stderr(std::fs::File::create(dir.join("proxy.stderr")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target = |port: u16| format!("--forward=127.0.0.1:0=pg.{}:{port}", lab.suffix);
    let node = lab.node("laptop", &[&target(5432), &target(6543), &target(9187), "--dial-timeout=20s"]).await;
    let port_of =
        |n: usize| -> u16 { common::forward_addr(&node, n).rsplit_once(':').unwrap().1.parse().unwrap() };

    // Health through the tailnet (retried until the proxy has joined).
    let v = wait_readyz(port_of(2), "ready over the tailnet", |s, _| s == 200).await;
    assert_eq!(v["upstreams"].as_array().unwrap().len(), 2, "{v}");
    assert!(http_get(port_of(2), "/metrics").await.1.contains("tailgres_sessions_active"));

    let server_port = |fwd: u16, db: &'static str| async move {
        let conn = format!(
            "host=127.0.0.1 port={fwd} user=role_scram password=scram-pass dbname={db} sslmode=disable"
        );
        let (c, connection) = within("connect", tokio_postgres::connect(&conn, NoTls)).await?;
        tokio::spawn(connection);
        let r = c.query_one("select inet_server_port()", &[]).await?;
        Ok::<i32, tokio_postgres::Error>(r.get(0))
    };
    assert_eq!(server_port(port_of(0), "app").await.unwrap(), first.port() as i32);
    assert_eq!(server_port(port_of(1), "app").await.unwrap(), second.port() as i32);
    let e = server_port(port_of(1), "postgres").await.expect_err("no route for postgres on 6543");
    assert_eq!(e.code(), Some(&SqlState::INVALID_CATALOG_NAME), "{e}");
    let denied = within("a no_route record", async {
        loop {
            let records =
                common::audit::validate_live_lines(&dir.join("audit.jsonl"), common::audit::LIVE_TAIL_WAIT);
            if let Some(r) = records.into_iter().find(|r| r["reason"] == "no_route") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(denied["postgres"]["database"], "postgres");
    assert_eq!(denied["side"], "client");

    signal(&proxy.id().unwrap().to_string(), "TERM").await;
    assert_eq!(within("exit", proxy.wait()).await.unwrap().code(), Some(0));
    node.stop().await;
    lab.control.stop().await;
    first.stop().await;
    second.stop().await;
}

/// SIGHUP re-reads a route's CA bundle: a database the old bundle could
/// not verify is reachable after the operator puts the right CA in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_a_new_upstream_ca() {
    let second = PgProc::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("second-ca.pem");
    let cfg = dir.path().join("tailgres.toml");
    std::fs::write(&cfg, second.route_toml("second", "postgres", None, &ca.display().to_string())).unwrap();
    // The right CA at start; then the wrong one (the first database's,
    // known once the lab is up), then the right one again.
    std::fs::copy(second.ca(), &ca).unwrap();
    let arg = format!("--config={}", cfg.display());
    let lab = LabUp::start(LabOptions { tailgres_args: vec![&arg], ..Default::default() }).await;
    connect(&lab, "postgres", "ca-reload").await.expect("verified with the right CA");
    std::fs::copy(lab.info["upstream"]["ca_file"].as_str().unwrap(), &ca).unwrap();
    signal(&proxy_pid(&lab), "HUP").await;
    let refused = within("the wrong CA to take effect", async {
        loop {
            match connect(&lab, "postgres", "ca-reload").await {
                Err(e) => break e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Some(&SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION), "{refused:?}");
    // Both lab CAs have the same name: the other one's signature fails.
    let r = lab
        .wait_record("refused upstream", |r| r["event"] == "session_denied" && r["side"] == "upstream")
        .await;
    assert_eq!(r["reason"], "upstream_tls", "{r}");

    std::fs::copy(second.ca(), &ca).unwrap();
    signal(&proxy_pid(&lab), "HUP").await;
    within("the right CA to take effect", async {
        while connect(&lab, "postgres", "ca-reload").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    lab.stop().await;
    second.stop().await;
}
