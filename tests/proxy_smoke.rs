//! The shortest end-to-end path: psql through the tailnet and the proxy to
//! a TLS-only PostgreSQL, and the audit trail it leaves.
mod common;
use common::lab::{psql, LabOptions, LabUp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_the_tailnet_is_audited() {
    let lab = LabUp::start(LabOptions::default()).await;
    let (host, port) = lab.forward_host_port(0);
    let conn =
        format!("host={host} port={port} user=role_scram dbname=app sslmode=require application_name=smoke");
    let (ok, out, err) = psql(
        &conn,
        Some("scram-pass"),
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await;
    assert!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "role_scram|t", "upstream leg is TLS");
    let end = lab
        .wait_record("session_end of smoke", |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == "smoke"
        })
        .await;
    assert_eq!(end["reason"], "client_terminated", "psql sends Terminate");
    assert_eq!(end["ended_by"], "client");
    assert_eq!(end["client_transport"], "tls");
    assert_eq!(end["peer"]["node_name"], "laptop.tail-lab.ts.net");
    assert_eq!(end["upstream"]["server_name"], "db.lab.test");
    assert!(end["bytes_upstream_to_client"].as_u64().unwrap() > 0);
    let sid = end["session_id"].as_str().unwrap();
    let events: Vec<String> = lab
        .audit_records()
        .iter()
        .filter(|r| r["session_id"] == sid)
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events, ["session_start", "auth_ok", "session_end"]);
    let all = std::fs::read_to_string(lab.audit_log()).unwrap();
    assert!(!all.contains("scram-pass"), "a password reached the audit log");
    let proxy_log = std::fs::read_to_string(lab.proxy_log()).unwrap();
    assert!(!proxy_log.contains("scram-pass"), "a password reached the proxy log");
    lab.stop().await;
}
