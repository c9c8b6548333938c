//! The shortest end-to-end path: psql through the tailnet and the proxy to
//! a TLS-only PostgreSQL, and the audit trail it leaves.
mod common;
use common::lab::{psql, LabOptions, LabUp};
use sha2::Digest;

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

/// Megabytes through the proxy's TLS leg to the client: each relay write is
/// several TLS records, handed to the tailnet connection in one gathered
/// write that often takes only part of them. The client's copy must be the
/// database's, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_results_arrive_intact_over_tls() {
    let lab = LabUp::start(LabOptions::default()).await;
    let (host, port) = lab.forward_host_port(0);
    let conn = format!("host={host} port={port} user=role_scram dbname=app sslmode=require");
    let rows =
        "select md5(i::text) || repeat(chr(65 + i % 26), i % 300) as r from generate_series(1, 40000) i";
    let joined = "string_agg(r, E'\\n' order by r)";
    let sql = format!("select encode(sha256(convert_to({joined}, 'UTF8')), 'hex') from ({rows}) t");
    let (ok, digest, err) = psql(&conn, Some("scram-pass"), &sql).await;
    assert!(ok, "psql (digest) failed: {err}");
    let (ok, out, err) =
        psql(&conn, Some("scram-pass"), &format!("select r from ({rows}) t order by r")).await;
    assert!(ok, "psql (rows) failed: {err}");
    let body = out.strip_suffix('\n').unwrap_or(&out);
    assert!(body.len() > 5_000_000, "only {} bytes came back", body.len());
    let got = format!("{:x}", sha2::Sha256::digest(body.as_bytes()));
    assert_eq!(got, digest.trim(), "the rows the client got differ from the database's");
    lab.stop().await;
}
