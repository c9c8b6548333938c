//! psycopg 3 with the libpq its binary wheel bundles (17 or later), as
//! most Python users run it: login with every sslmode and with direct TLS
//! (sslnegotiation=direct), and both of libpq's
//! newer cancel paths (PQcancelBlocking, and PQcancelStart/Poll) during a
//! running query. Over TLS these fail with "SSL error: unexpected eof while
//! reading" unless the proxy ends the cancel connection with a TLS
//! close_notify, as PostgreSQL does.
mod common;
use common::lab::{LabOptions, LabUp};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_libpq18_cancels_with_every_sslmode() {
    let lab = LabUp::start(LabOptions::default()).await;
    let (host, port) = lab.forward_host_port(0);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/psycopg_check.py");
    // "direct" is sslmode=require with sslnegotiation=direct: TLS from the
    // first byte, with ALPN "postgresql" (libpq 17+).
    for sslmode in ["disable", "prefer", "require", "direct"] {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(180),
            tokio::process::Command::new("python3")
                .args([script, &host, &port.to_string(), sslmode])
                .output(),
        )
        .await
        .expect("psycopg check hung")
        .unwrap();
        assert!(
            out.status.success(),
            "psycopg ({sslmode}) failed (is psycopg[binary] installed? .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(r["libpq"].as_u64().unwrap() >= 170000, "the wheel's libpq, not the machine's 15: {r}");
        for path in ["blocking", "nonblocking"] {
            let p = &r[path];
            assert_eq!(p["query"], "canceled", "{sslmode} {path}: {r}");
            assert_eq!(p["after_cancel"], 7, "{sslmode} {path}: {r}");
            assert_eq!(p["ssl_in_use"], sslmode != "disable", "{sslmode} {path}: {r}");
            let app = format!("psycopg-{path}-{sslmode}");
            let start = lab
                .wait_record(&format!("{app} start"), |x| {
                    x["event"] == "session_start" && x["postgres"]["application_name"] == app.as_str()
                })
                .await;
            let sid = start["session_id"].as_str().unwrap().to_string();
            let cancel = lab
                .wait_record(&format!("{app} cancel"), |x| {
                    x["event"] == "cancel" && x["target_session_id"] == sid.as_str()
                })
                .await;
            assert_eq!(cancel["reason"], "forwarded", "{cancel}");
            let transport = match sslmode {
                "disable" => "plaintext",
                "direct" => "direct_tls",
                _ => "tls",
            };
            assert_eq!(start["client_transport"], transport, "{start}");
            assert_eq!(
                cancel["client_transport"], transport,
                "libpq 17+ cancels over TLS, as it connected: {cancel}"
            );
        }
    }
    lab.stop().await;
}
