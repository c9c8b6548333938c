//! A Python driver outside libpq (asyncpg): TLS and plaintext logins, a
//! cancel asyncpg sends by itself on a query timeout, and close() — which
//! hangs forever through proxies that do not propagate close.
mod common;
use common::lab::{LabOptions, LabUp};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_login_cancel_and_close() {
    let lab = LabUp::start(LabOptions::default()).await;
    let (host, port) = lab.forward_host_port(0);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/asyncpg_check.py");
    for ssl in ["require", "disable"] {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            tokio::process::Command::new("python3").args([script, &host, &port.to_string(), ssl]).output(),
        )
        .await
        .expect("asyncpg check hung")
        .unwrap();
        assert!(
            out.status.success(),
            "asyncpg ({ssl}) failed (is it installed? .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["answer"], 42, "{r}");
        assert_eq!(r["cancelled"], true, "{r}");
        assert_eq!(r["after_cancel"], 7, "{r}");
        assert!(r["cancel_seconds"].as_f64().unwrap() < 10.0, "cancel took too long: {r}");

        let transport = if ssl == "require" { "tls" } else { "plaintext" };
        let cancel = lab
            .wait_record(&format!("asyncpg cancel over {transport}"), |r| {
                r["event"] == "cancel" && r["client_transport"] == transport
            })
            .await;
        assert_eq!(cancel["reason"], "forwarded", "{cancel}");
        let sid = cancel["target_session_id"].as_str().unwrap().to_string();
        let end = lab
            .wait_record("asyncpg session end", |r| {
                r["event"] == "session_end" && r["session_id"] == sid.as_str()
            })
            .await;
        assert_eq!(end["postgres"]["application_name"], "asyncpg-check");
        assert_eq!(end["reason"], "client_terminated", "{end}");
        assert_eq!(end["ended_by"], "client", "{end}");
        let auth =
            lab.wait_record("auth", |r| r["event"] == "auth_ok" && r["session_id"] == sid.as_str()).await;
        let want = if ssl == "require" { "password_relay_scram_sha_256_plus" } else { "scram_sha_256" };
        assert_eq!(auth["auth_method"], want);
    }
    lab.stop().await;
}
