//! The Go and Java drivers most applications use, through the proxy: pgx v5
//! (`tests/clients/pgx`, a Go module of its own) and pgJDBC
//! (`tests/clients/JdbcCheck.java`), both built into `target/clients/` by
//! `scripts/build --tests` (`scripts/build-clients`). For every sslmode each
//! driver supports: login as a SCRAM role, a parameterised query, a running
//! `pg_sleep(20)` cancelled the driver's own way (pgx: cancelling the
//! query's context with `CancelRequestContextWatcherHandler`, which sends a
//! CancelRequest over TLS when the session is TLS; pgJDBC:
//! `Statement.cancel()` from another thread, always a plaintext
//! CancelRequest), which must end with SQLSTATE 57014 and nothing else,
//! the connection usable after it, and a clean close; pgx also asking for
//! protocol 3.2 over TLS. One lab for both.
mod common;
use common::clients::{built_checks, PGJDBC_VERSION, PGX_VERSION};
use common::lab::{LabOptions, LabUp};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// One run: `PROGRAM [PREFIX...] HOST PORT SSLMODE [EXTRA...]`.
struct Case {
    driver: &'static str,
    sslmode: &'static str,
    program: PathBuf,
    prefix: Vec<String>,
    extra: Vec<String>,
}

impl Case {
    fn app(&self) -> String {
        // pgx's optional argument (max_protocol_version) ends its name.
        let mut app = format!("{}-{}", self.driver, self.sslmode);
        if self.driver == "pgx" {
            self.extra.iter().for_each(|e| app += &format!("-{e}"));
        }
        app
    }
    fn tls(&self) -> bool {
        self.sslmode != "disable"
    }
}

/// Every case, after checking that its program was built: a missing check
/// fails the test (never a silent skip).
fn cases() -> Vec<Case> {
    let (pgx, classpath) = built_checks();
    let java = |sslmode: &'static str, factory: Option<&str>| Case {
        driver: "pgjdbc",
        sslmode,
        program: PathBuf::from("java"),
        prefix: vec!["-cp".into(), classpath.clone(), "JdbcCheck".into()],
        extra: factory.map(str::to_string).into_iter().collect(),
    };
    let go = |sslmode: &'static str| Case {
        driver: "pgx",
        sslmode,
        program: pgx.clone(),
        prefix: vec![],
        extra: vec![],
    };
    vec![
        go("disable"),
        go("prefer"),
        go("require"),
        // Protocol 3.2 asked for (variable-length cancel keys in PostgreSQL 18).
        Case { extra: vec!["latest".into()], ..go("require") },
        java("disable", None),
        java("prefer", None),
        // The lab proxy's certificate is self-signed: the factory pgJDBC's
        // documentation gives for "encrypt, do not verify".
        java("require", Some("org.postgresql.ssl.NonValidatingFactory")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx_and_pgjdbc_login_query_and_cancel_with_every_sslmode() {
    let cases = cases();
    let lab = LabUp::start(LabOptions::default()).await;
    let (host, port) = lab.forward_host_port(0);
    for case in &cases {
        let what = format!("{} sslmode={} {:?}", case.driver, case.sslmode, case.extra);
        let mut args = case.prefix.clone();
        args.extend([host.clone(), port.to_string(), case.sslmode.to_string()]);
        args.extend(case.extra.iter().cloned());
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(&case.program).args(&args).kill_on_drop(true).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for 120 s"))
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", case.program.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what} failed through the proxy: {stderr}\n{}", lab.log_tails(20));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{what}: no JSON line ({e}): {}", String::from_utf8_lossy(&out.stdout))
        });
        eprintln!("{what}: {r}");

        let version = if case.driver == "pgx" { PGX_VERSION } else { PGJDBC_VERSION };
        assert_eq!(r["version"], version, "{what}: the pinned driver: {r}");
        assert_eq!(r["answer"], 42, "{what}: {r}");
        assert_eq!(r["query_sqlstate"], "57014", "{what}: cancelled, nothing else: {r}");
        assert!(r["cancel_seconds"].as_f64().unwrap() < 10.0, "{what}: the cancel took too long: {r}");
        assert_eq!(r["after_cancel"], 7, "{what}: usable after the cancel: {r}");
        assert!(r["close_seconds"].as_f64().unwrap() < 5.0, "{what}: close: {r}");
        if case.driver == "pgx" {
            assert_eq!(r["ssl_in_use"], case.tls(), "{what}: {r}");
        }

        // The audit trail of the session, found by its application_name.
        let app = case.app();
        let transport = if case.tls() { "tls" } else { "plaintext" };
        let start = lab
            .wait_record(&format!("{app} session_start"), |x| {
                x["event"] == "session_start" && x["postgres"]["application_name"] == app.as_str()
            })
            .await;
        assert_eq!(start["client_transport"], transport, "{what}: {start}");
        assert_eq!(start["postgres"]["user"], "role_scram", "{what}: {start}");
        assert_eq!(start["postgres"]["database"], "app", "{what}: {start}");
        // What the StartupMessage asked for (pgx's "latest" is 3.2; the lab's
        // PostgreSQL may negotiate it down, and the cancel key with it).
        let protocol = if case.extra.iter().any(|e| e == "latest") { "3.2" } else { "3.0" };
        assert_eq!(start["postgres"]["protocol"], protocol, "{what}: {start}");
        let sid = start["session_id"].as_str().unwrap().to_string();
        let auth = lab
            .wait_record(&format!("{app} auth_ok"), |x| {
                x["event"] == "auth_ok" && x["session_id"] == sid.as_str()
            })
            .await;
        // TLS clients give the proxy the password, which runs SCRAM with
        // channel binding to the database itself; plaintext SCRAM is relayed.
        let method = if case.tls() { "password_relay_scram_sha_256_plus" } else { "scram_sha_256" };
        assert_eq!(auth["auth_method"], method, "{what}: {auth}");
        let cancel = lab
            .wait_record(&format!("{app} cancel"), |x| {
                x["event"] == "cancel" && x["target_session_id"] == sid.as_str()
            })
            .await;
        assert_eq!(cancel["reason"], "forwarded", "{what}: {cancel}");
        // pgx encrypts the cancel as its session is; pgJDBC never does.
        let cancel_transport = if case.driver == "pgx" { transport } else { "plaintext" };
        assert_eq!(cancel["client_transport"], cancel_transport, "{what}: {cancel}");
        let end = lab
            .wait_record(&format!("{app} session_end"), |x| {
                x["event"] == "session_end" && x["session_id"] == sid.as_str()
            })
            .await;
        assert_eq!(end["reason"], "client_terminated", "{what}: {end}");
        assert_eq!(end["ended_by"], "client", "{what}: {end}");
        let cancels = lab
            .audit_records()
            .into_iter()
            .filter(|x| x["event"] == "cancel" && x["target_session_id"] == sid.as_str())
            .count();
        assert_eq!(cancels, 1, "{what}: one CancelRequest per cancel");
    }
    // Nothing was refused or failed along the way (pgx's sslmode=prefer
    // fallback, for one, must not have been needed).
    let records = lab.audit_records();
    let bad: Vec<&Value> = records
        .iter()
        .filter(|x| {
            !matches!(x["event"].as_str(), Some("session_start" | "auth_ok" | "cancel" | "session_end"))
        })
        .collect();
    assert!(bad.is_empty(), "unexpected records: {bad:#?}");
    let starts = records.iter().filter(|x| x["event"] == "session_start").count();
    assert_eq!(starts, cases.len(), "one session per check: {records:#?}");
    lab.stop().await;
}
