//! How tailgres fails: an upstream it cannot verify (the four bad lab
//! certificates), an audit log it cannot write (fail closed, then recover on
//! SIGHUP), audit log rotation, and bad configuration refused at start.
//!
//! The lab tests run the whole world (`tailgres-lab up`) and must run inside
//! scripts/test's network namespace; the startup refusals run the binary
//! without a tailnet.
mod common;

use common::lab::{psql, LabOptions, LabUp};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// How long to wait for something the proxy does asynchronously.
const WAIT: Duration = Duration::from_secs(30);
/// How long a refused start may take before we call it a hang.
const START_REFUSAL_LIMIT: Duration = Duration::from_secs(30);

/// The text of the FATAL in psql's stderr ("... failed: FATAL:  <message>").
fn fatal_message(stderr: &str) -> &str {
    let at = stderr.find("FATAL:").unwrap_or_else(|| panic!("no FATAL in psql's stderr:\n{stderr}"));
    stderr[at + "FATAL:".len()..].lines().next().unwrap_or("").trim()
}

fn conninfo(lab: &LabUp, sslmode: &str, application_name: &str) -> String {
    let (host, port) = lab.forward_host_port(0);
    format!(
        "host={host} port={port} user=role_scram dbname=app sslmode={sslmode} application_name={application_name}"
    )
}

/// Connects with tokio-postgres (plaintext to the proxy) and returns the
/// server's error, which must be a DbError (a FATAL from tailgres).
async fn db_error(lab: &LabUp, application_name: &str) -> tokio_postgres::error::DbError {
    let conn = format!("{} password=scram-pass", conninfo(lab, "disable", application_name));
    let r = tokio::time::timeout(WAIT, tokio_postgres::connect(&conn, tokio_postgres::NoTls))
        .await
        .expect("tokio-postgres connect hung");
    let e = match r {
        Ok(_) => panic!("tokio-postgres connected; expected a refusal"),
        Err(e) => e,
    };
    e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e:?}")).clone()
}

/// Waits until at least `n` audit records match `pred`; returns them.
async fn wait_records(lab: &LabUp, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found: Vec<Value> = lab.audit_records().into_iter().filter(|r| pred(r)).collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {n} audit records\n{:#?}",
            found.len(),
            lab.audit_records()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `cond` holds, polling; panics naming `what` after WAIT.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    String::from_utf8_lossy(&bytes[offset as usize..]).into_owned()
}

fn proxy_log(lab: &LabUp) -> String {
    std::fs::read_to_string(lab.proxy_log()).unwrap_or_default()
}

async fn sighup(lab: &LabUp) {
    let pid = lab.info["proxy"]["pid"].as_u64().expect("proxy pid").to_string();
    let st = Command::new("kill").args(["-HUP", &pid]).status().await.unwrap();
    assert!(st.success(), "kill -HUP {pid}");
}

/// One bad upstream certificate (or none): every client is refused with a
/// FATAL that tells it nothing about the upstream, the audit log says what
/// is wrong, and not one byte of the client's startup reaches the database.
async fn refused_upstream(cert: &str, reason: &str, detail_says: &[&str]) {
    let lab =
        LabUp::start(LabOptions { upstream_cert: Some(cert), log_connections: true, ..Default::default() })
            .await;
    let up = &lab.info["upstream"];
    let up_log = lab.upstream_log();
    // Everything before this is the lab's own setup (admin connections over
    // the unix socket log "connection authorized" too).
    let log_start = std::fs::metadata(&up_log).unwrap().len();
    let secrets_of_the_upstream = [
        up["address"].as_str().unwrap().to_string(),
        up["host"].as_str().unwrap().to_string(),
        up["port"].to_string(),
        up["server_name"].as_str().unwrap().to_string(),
        up["ca_file"].as_str().unwrap().to_string(),
        "wrong.lab.test".to_string(),
        "tailgres-lab".to_string(),
    ];

    let mut attempts = 0;
    for sslmode in ["require", "disable"] {
        let app = format!("{cert}-{sslmode}");
        let (ok, out, err) = psql(&conninfo(&lab, sslmode, &app), Some("scram-pass"), "select 1").await;
        assert!(!ok, "{cert}, sslmode={sslmode}: psql succeeded: {out}");
        attempts += 1;
        let msg = fatal_message(&err);
        assert!(
            msg.starts_with("tailgres ") || msg.starts_with("the database did not accept TLS"),
            "{cert}, sslmode={sslmode}: {msg}"
        );
        assert!(msg.contains("verified TLS"), "{cert}, sslmode={sslmode}: {msg}");
        assert!(msg.ends_with("the operator's log has the details"), "{cert}, sslmode={sslmode}: {msg}");
        for s in &secrets_of_the_upstream {
            assert!(!msg.contains(s.as_str()), "{cert}, sslmode={sslmode}: the client was told {s:?}: {msg}");
        }
        assert!(!msg.contains('/'), "{cert}, sslmode={sslmode}: a path reached the client: {msg}");
    }
    // The SQLSTATE psql does not show.
    let e = db_error(&lab, &format!("{cert}-code")).await;
    attempts += 1;
    assert_eq!(e.code().code(), "08001", "{cert}: {e:?}");
    assert_eq!(e.severity(), "FATAL");
    assert!(e.message().contains("verified TLS"), "{cert}: {}", e.message());

    let denied = wait_records(&lab, &format!("{cert}: session_denied"), attempts, |r| {
        r["event"] == "session_denied" && r["postgres"]["user"] == "role_scram"
    })
    .await;
    assert_eq!(denied.len(), attempts, "{cert}: {denied:#?}");
    for d in &denied {
        assert_eq!(d["reason"], reason, "{cert}: {d}");
        assert_eq!(d["side"], "upstream", "{cert}: {d}");
        assert_eq!(d["postgres"]["database"], "app", "{cert}: {d}");
        assert_eq!(d["peer"]["node_name"], "laptop.tail-lab.ts.net", "{cert}: {d}");
        assert!(d["upstream"].is_null(), "{cert}: no verified upstream, yet: {d}");
        let detail = d["detail"].as_str().unwrap();
        // The operator is told where and what.
        assert!(detail.contains(up["address"].as_str().unwrap()), "{cert}: detail {detail:?}");
        for want in detail_says {
            assert!(detail.contains(want), "{cert}: detail {detail:?} lacks {want:?}");
        }
        assert!(!detail.contains("scram-pass"), "{cert}: {detail}");
        // Each refusal follows its own session_start.
        let sid = d["session_id"].as_str().unwrap();
        let events: Vec<Value> = lab
            .audit_records()
            .into_iter()
            .filter(|r| r["session_id"] == sid)
            .map(|r| r["event"].clone())
            .collect();
        assert_eq!(events, ["session_start", "session_denied"], "{cert}: session {sid}");
    }

    // The proxy did dial the database once per attempt (so the checks below
    // are about real connections), and nothing of the client got there.
    wait_until(&format!("{cert}: {attempts} connections in postgres's log"), || {
        read_from(&up_log, log_start).matches("connection received").count() >= attempts
    })
    .await;
    let log = read_from(&up_log, log_start);
    for never in ["connection authorized", "role_scram", "database=app", "scram-pass", "application_name"] {
        assert!(!log.contains(never), "{cert}: postgres's log shows {never:?}:\n{log}");
    }
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_is_refused() {
    refused_upstream("untrusted", "upstream_untrusted_certificate", &["does not chain to", "--upstream-ca"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_for_another_name_is_refused() {
    refused_upstream(
        "wrong-host",
        "upstream_name_mismatch",
        &["is not valid for \"db.lab.test\"", "it names [\"wrong.lab.test\"]", "--upstream-server-name"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_upstream_certificate_is_refused() {
    refused_upstream("expired", "upstream_certificate_expired", &["has expired", "not after 20"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_without_tls_is_refused() {
    refused_upstream("no-tls", "upstream_no_tls", &["does not offer TLS"]).await;
}

/// An audit log whose every write fails (a symlink to /dev/full: ENOSPC)
/// refuses sessions with 57P03; after the operator points the path at a
/// writable file and sends SIGHUP, sessions work and are recorded there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_audit_log_refuses_sessions_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("audit-link.jsonl");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    let lab = LabUp::start(LabOptions { audit_log: Some(link.clone()), ..Default::default() }).await;
    assert_eq!(lab.audit_log(), link);

    let (ok, out, err) = psql(&conninfo(&lab, "require", "while-full"), Some("scram-pass"), "select 1").await;
    assert!(!ok, "psql got through with an unwritable audit log: {out}");
    let msg = fatal_message(&err);
    assert!(msg.contains("audit log"), "{msg}");
    let e = db_error(&lab, "while-full-code").await;
    assert_eq!(e.code().code(), "57P03", "{e:?}");
    assert_eq!(e.severity(), "FATAL");
    assert!(e.message().contains("audit log"), "{}", e.message());
    // The operator is told why (the path and the errno).
    let log = proxy_log(&lab);
    assert!(log.contains("cannot write audit log"), "proxy log:\n{log}");
    assert!(log.contains("No space left on device"), "proxy log:\n{log}");

    // The operator repairs the path and asks for a reopen.
    std::fs::remove_file(&link).unwrap();
    std::fs::write(&link, b"").unwrap();
    std::fs::set_permissions(&link, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let reopened = |log: &str| log.matches("audit log reopened").count();
    let before = reopened(&proxy_log(&lab));
    sighup(&lab).await;
    wait_until("the proxy to reopen its audit log", || reopened(&proxy_log(&lab)) > before).await;

    let (ok, out, err) =
        psql(&conninfo(&lab, "require", "after-reopen"), Some("scram-pass"), "select current_user").await;
    assert!(ok, "session after the reopen refused: {err}");
    assert_eq!(out.trim(), "role_scram");
    let end = lab
        .wait_record("session_end after the reopen", |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == "after-reopen"
        })
        .await;
    let sid = end["session_id"].as_str().unwrap();
    let records = common::audit::validate_live_lines(&link, common::audit::LIVE_TAIL_WAIT);
    let events: Vec<&str> =
        records.iter().filter(|r| r["session_id"] == sid).map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["session_start", "auth_ok", "session_end"]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_file());
    lab.stop().await;
}

/// One psql session through the proxy; returns its audit session id once
/// its session_end is recorded.
async fn session(lab: &LabUp, app: &str) -> String {
    let (ok, out, err) = psql(&conninfo(lab, "require", app), Some("scram-pass"), "select 1").await;
    assert!(ok, "{app}: {err}");
    assert_eq!(out.trim(), "1");
    let end = lab
        .wait_record(&format!("session_end of {app}"), |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == app
        })
        .await;
    end["session_id"].as_str().unwrap().to_string()
}

/// `mv audit.jsonl audit.jsonl.1` + SIGHUP: the old file keeps what was
/// written before, the new file gets what comes after; both are valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_rotates_on_sighup() {
    let lab = LabUp::start(LabOptions::default()).await;
    let current = lab.audit_log();
    let rotated = PathBuf::from(format!("{}.1", current.display()));

    let first = session(&lab, "before-rotation").await;

    std::fs::rename(&current, &rotated).unwrap();
    sighup(&lab).await;
    // The reopen creates the file anew.
    wait_until("the proxy to reopen its audit log", || current.exists()).await;

    let second = session(&lab, "after-rotation").await;

    let events_of = |records: &[Value], sid: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["session_id"] == sid)
            .map(|r| r["event"].as_str().unwrap().to_string())
            .collect()
    };
    let old = common::audit::validate_lines(&rotated);
    let new = common::audit::validate_live_lines(&current, common::audit::LIVE_TAIL_WAIT);
    assert_eq!(events_of(&old, &first), ["session_start", "auth_ok", "session_end"]);
    assert!(events_of(&old, &second).is_empty(), "the second session went to the rotated file");
    assert_eq!(events_of(&new, &second), ["session_start", "auth_ok", "session_end"]);
    assert!(events_of(&new, &first).is_empty(), "the first session went to the new file");
    lab.stop().await;
}

/// Runs the tailgres binary with `args` and no tailnet; it must exit
/// non-zero by itself, with stderr naming `flag`.
async fn refused_at_start(args: &[String], flag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailgres"));
    // Were a refusal to go missing, the process must still never talk to
    // Tailscale's control plane: a closed loopback port, a private state
    // directory, and the test knobs.
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(common::ts_test_env())
        .arg("--control-url=http://127.0.0.1:1")
        .arg(format!("--state-dir={}", dir.path().join("state").display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(START_REFUSAL_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{args:?}: tailgres did not exit; it should refuse to start"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?}: exited successfully; stderr:\n{stderr}");
    assert!(stderr.contains(flag), "{args:?}: stderr does not name {flag}:\n{stderr}");
    assert!(!dir.path().join("state").exists(), "{args:?}: got as far as the tailnet state:\n{stderr}");
    stderr
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let audit = format!("--audit-log={}", p("audit.jsonl"));
    let upstream = "--upstream=127.0.0.1:5432".to_string();
    let no_certs = p("no-certs.pem");
    std::fs::write(&no_certs, "just text, no PEM\n").unwrap();
    let a_file = p("a-file");
    std::fs::write(&a_file, "").unwrap();
    let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/client/client-rsa.pem");
    let cert = cert.display().to_string();

    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (vec![audit.clone()], "--upstream", "required"),
        (
            vec![upstream.clone(), audit.clone(), format!("--upstream-ca={}", p("nope.pem"))],
            "--upstream-ca",
            "does not exist",
        ),
        (
            vec![upstream.clone(), audit.clone(), format!("--upstream-ca={no_certs}")],
            "--upstream-ca",
            "no certificates found",
        ),
        (
            vec![upstream.clone(), format!("--audit-log={a_file}/audit.jsonl")],
            "--audit-log",
            "Not a directory",
        ),
        (
            vec![upstream.clone(), format!("--audit-log={}", dir.path().display())],
            "--audit-log",
            "Is a directory",
        ),
        (
            vec![upstream.clone(), audit.clone(), format!("--client-tls-cert={cert}")],
            "--client-tls-cert",
            "--client-tls-key",
        ),
        (
            vec![upstream.clone(), audit.clone(), format!("--client-tls-key={cert}")],
            "--client-tls-cert",
            "--client-tls-key",
        ),
    ];
    for (args, flag, says) in cases {
        let stderr = refused_at_start(&args, flag).await;
        assert!(stderr.contains(says), "{args:?}: stderr does not say {says:?}:\n{stderr}");
    }
}
