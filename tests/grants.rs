//! Capability grants decide who may be which database user (stage 4), with
//! policies pushed through the lab's control server like a tailnet admin
//! would: an `app` capability per source, `ip` grants for packets.
mod common;
use common::http_json;
use common::lab::{psql, LabOptions, LabUp};
use serde_json::json;
use std::time::Duration;

const CAP: &str = "tailgres.dev/cap/postgres";

fn conn(lab: &LabUp, client: usize, user: &str, app: &str) -> String {
    let (h, p) = lab.forward_host_port(client);
    format!("host={h} port={p} user={user} dbname=app sslmode=disable application_name={app}")
}

fn password(user: &str) -> Option<&'static str> {
    match user {
        "role_scram" => Some("scram-pass"),
        "role_md5" => Some("md5-pass"),
        _ => None,
    }
}

/// Retries until the outcome is as wanted (policies reach the proxy
/// asynchronously); returns psql's stderr of the last try.
async fn until(lab: &LabUp, client: usize, user: &str, want_ok: bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, _, err) = psql(&conn(lab, client, user, "grants"), password(user), "select 1").await;
        if ok == want_ok {
            return err;
        }
        assert!(tokio::time::Instant::now() < deadline, "client {client} as {user}: still ok={ok}: {err}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_user_and_database() {
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice-laptop", "bob-laptop", "ci=tag:ci"],
        log_connections: true,
        ..Default::default()
    })
    .await;
    // No grants anywhere: Tailscale let them through, so any user is fine.
    until(&lab, 1, "role_trust", true).await;

    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": ["role_scram"]}]}},
        {"src": ["tag:ci"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": ["role_md5"], "max_connections": 1}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");

    // alice is held to her grant.
    let err = until(&lab, 0, "role_md5", false).await;
    assert!(err.contains("may not open a session as user \"role_md5\" to database \"app\""), "{err}");
    assert!(err.contains(CAP), "the message says how to grant it: {err}");
    let denied = lab
        .wait_record("alice denied", |r| {
            r["event"] == "session_denied"
                && r["reason"] == "not_authorized"
                && r["postgres"]["user"] == "role_md5"
        })
        .await;
    assert_eq!(denied["peer"]["node_name"], "alice-laptop.tail-lab.ts.net");
    assert_eq!(denied["side"], "client");
    // Not one byte of a denied startup reached the database.
    let pg_log = std::fs::read_to_string(lab.upstream_log()).unwrap();
    assert!(!pg_log.contains("user=role_md5"), "denied startup reached the upstream:\n{pg_log}");
    until(&lab, 0, "role_scram", true).await;
    // A replication connection needs a grant that says so.
    let (h, p) = lab.forward_host_port(0);
    let repl = format!("host={h} port={p} user=role_scram dbname=app sslmode=disable replication=database");
    let (ok, _, err) = psql(&repl, Some("scram-pass"), "IDENTIFY_SYSTEM").await;
    assert!(!ok && err.contains("may not open a replication connection"), "{err}");

    // bob has no grant, and others do: once the tailnet uses grants, a
    // peer without one is refused (it was let through before grants).
    let err = until(&lab, 1, "role_trust", false).await;
    assert!(err.contains("has no access grant"), "{err}");
    let denied = lab
        .wait_record("bob denied", |r| {
            r["event"] == "session_denied" && r["peer"]["node_name"] == "bob-laptop.tail-lab.ts.net"
        })
        .await;
    assert!(denied["detail"].as_str().unwrap().contains("other peers carry it"), "{denied}");

    // The tagged device: its grant, and its limit of one session at a time.
    until(&lab, 2, "role_md5", true).await;
    let (h, p) = lab.forward_host_port(2);
    let c = format!("host={h} port={p} user=role_md5 dbname=app sslmode=disable application_name=long");
    let long = tokio::spawn(async move { psql(&c, Some("md5-pass"), "select pg_sleep(5)").await });
    lab.wait_record("long session started", |r| {
        r["event"] == "auth_ok" && r["postgres"]["application_name"] == "long"
    })
    .await;
    let (ok, _, err) = psql(&conn(&lab, 2, "role_md5", "second"), Some("md5-pass"), "select 1").await;
    assert!(!ok && err.contains("already has 1 sessions open"), "second session of tag:ci: {err}");
    assert!(long.await.unwrap().0, "the first session was not disturbed");
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_grant_refuses_peers_without_one() {
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice-laptop", "bob-laptop"],
        tailgres_args: vec!["--require-grant"],
        ..Default::default()
    })
    .await;
    let err = until(&lab, 1, "role_trust", false).await;
    assert!(err.contains("has no access grant"), "{err}");
    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["bob-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["*"], "users": ["role_*"]}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");
    until(&lab, 1, "role_trust", true).await;
    until(&lab, 0, "role_trust", false).await;
    lab.stop().await;
}

/// Live sessions lose access the moment the tailnet takes it away: when the
/// grant is withdrawn (the client is told, FATAL 57P01) and when the node
/// is removed from the tailnet (the database session ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_are_revoked() {
    let lab =
        LabUp::start(LabOptions { clients: vec!["alice-laptop", "bob-laptop"], ..Default::default() }).await;
    let grant = |users: &str| {
        json!({"grants": [
            {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
            {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": [users]}]}},
            {"src": ["bob-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": ["role_trust"]}]}},
        ]})
    };
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(grant("role_scram"))).await;
    assert_eq!(status, 200, "{body}");
    until(&lab, 0, "role_scram", true).await;

    // alice runs a long query; her grant is withdrawn meanwhile.
    let c = conn(&lab, 0, "role_scram", "revoke-me");
    let long = tokio::spawn(async move { psql(&c, Some("scram-pass"), "select pg_sleep(120)").await });
    lab.wait_record("alice's long session", |r| {
        r["event"] == "auth_ok" && r["postgres"]["application_name"] == "revoke-me"
    })
    .await;
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(grant("role_md5"))).await;
    assert_eq!(status, 200, "{body}");
    let (ok, _, err) =
        tokio::time::timeout(Duration::from_secs(60), long).await.expect("not revoked in time").unwrap();
    assert!(!ok, "the session survived the withdrawal");
    assert!(err.contains("access for this peer was revoked"), "{err}");
    let end = lab
        .wait_record("revoked end", |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == "revoke-me"
        })
        .await;
    assert_eq!(end["reason"], "revoked");
    assert_eq!(end["ended_by"], "proxy");
    assert!(end["detail"].as_str().unwrap().contains("role_scram"), "{end}");

    // Withdrawing a peer's last grant takes its access away too: with no
    // grant left anywhere the tailnet is "open", but a session admitted by
    // a grant never outlives it (it once did: no grant read as "allow").
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(grant("role_md5"))).await;
    assert_eq!(status, 200, "{body}");
    until(&lab, 0, "role_md5", true).await;
    let c = conn(&lab, 0, "role_md5", "last-grant");
    let long = tokio::spawn(async move { psql(&c, Some("md5-pass"), "select pg_sleep(120)").await });
    lab.wait_record("alice's session under her last grant", |r| {
        r["event"] == "auth_ok" && r["postgres"]["application_name"] == "last-grant"
    })
    .await;
    let no_grants = json!({"grants": [{"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]}]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(no_grants)).await;
    assert_eq!(status, 200, "{body}");
    let (ok, _, err) =
        tokio::time::timeout(Duration::from_secs(60), long).await.expect("not revoked in time").unwrap();
    assert!(!ok && err.contains("access for this peer was revoked"), "{err}");
    let end = lab
        .wait_record("last grant revoked", |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == "last-grant"
        })
        .await;
    assert_eq!(end["reason"], "revoked", "{end}");
    // (Which words depends on whether tailgres saw the tailnet without any
    // grant before or after it re-checked this session.)
    assert!(end["detail"].as_str().unwrap().contains("grant"), "{end}");
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(grant("role_scram"))).await;
    assert_eq!(status, 200, "{body}");

    // bob runs a long query under his grant; his node is removed from the
    // tailnet: his session ends at the database.
    let c = conn(&lab, 1, "role_trust", "bob-long");
    let long = tokio::spawn(async move { psql(&c, None, "select pg_sleep(120)").await });
    lab.wait_record("bob's long session", |r| {
        r["event"] == "auth_ok" && r["postgres"]["application_name"] == "bob-long"
    })
    .await;
    let (status, body) = http_json(&lab.admin_url(), "DELETE", "/nodes/bob-laptop", None).await;
    assert_eq!(status, 200, "{body}");
    let end = lab
        .wait_record("bob revoked", |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == "bob-long"
        })
        .await;
    assert_eq!(end["reason"], "revoked", "{end}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while lab
        .psql_admin("select count(*) from pg_stat_activity where application_name = 'bob-long'")
        .await
        .trim()
        != "0"
    {
        assert!(tokio::time::Instant::now() < deadline, "bob's database session outlived the revocation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    long.abort(); // bob's psql cannot hear anything any more: his node is gone
    lab.stop().await;
}

/// With --identity-settings the database sees who is connecting (for
/// row-level security and logs); a client can never supply those settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_identity_reaches_the_database() {
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice-laptop", "ci=tag:ci"],
        tailgres_args: vec!["--identity-settings"],
        ..Default::default()
    })
    .await;
    let sql = "select current_setting('tailgres.login'), current_setting('tailgres.tags'), \
               current_setting('tailgres.node'), current_setting('tailgres.ip')";
    let (ok, out, err) = psql(&conn(&lab, 0, "role_scram", "who"), Some("scram-pass"), sql).await;
    assert!(ok, "{err}");
    let alice: Vec<&str> = out.trim().split('|').collect();
    assert!(alice[0].ends_with("@fake-control.example.net"), "{out}");
    assert_eq!(alice[1], "");
    assert_eq!(alice[2], "alice-laptop.tail-lab.ts.net");
    assert_eq!(alice[3], lab.info["clients"][0]["tailnet_ips"][0].as_str().unwrap());
    let start = lab
        .wait_record("alice's start", |r| {
            r["event"] == "session_start" && r["postgres"]["application_name"] == "who"
        })
        .await;
    assert_eq!(
        start["peer"]["user_login"].as_str().unwrap(),
        alice[0],
        "the database sees what the audit log says"
    );

    let (ok, out, err) = psql(&conn(&lab, 1, "role_trust", "who-ci"), None, sql).await;
    assert!(ok, "{err}");
    let ci: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(
        (ci[0], ci[1], ci[2]),
        ("", "tag:ci", "ci.tail-lab.ts.net"),
        "a tagged device has tags, no login"
    );

    // Impersonation attempts are refused before the database sees them.
    // The server drops backslashes when it splits options: `tail\gres` is
    // `tailgres` by the time it reaches the settings (libpq's conninfo
    // turns each `\\` into one backslash).
    for spoof in [
        "options='-c tailgres.login=postgres@corp'",
        "options='--tailgres.tags=tag:admin'",
        "options='-c tail\\\\gres.login=postgres@corp'",
    ] {
        let c = format!("{} {spoof}", conn(&lab, 0, "role_scram", "spoof"));
        let (ok, _, err) = psql(&c, Some("scram-pass"), "select 1").await;
        assert!(!ok && err.contains("are set by tailgres from the tailnet identity"), "{spoof}: {err}");
    }
    lab.wait_record("spoof denied", |r| r["event"] == "session_denied" && r["reason"] == "not_authorized")
        .await;
    lab.stop().await;
}

/// `tailgres explain` answers "why can't alice connect?" from the running
/// proxy: identity, grants, what they allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_tells_who_may_do_what() {
    let lab =
        LabUp::start(LabOptions { clients: vec!["alice-laptop", "ci=tag:ci"], ..Default::default() }).await;
    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["analytics"], "users": ["readonly"], "max_connections": 3}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");
    until(&lab, 0, "role_scram", false).await; // the grant is in force

    let state_dir = format!("{}/proxy-state", lab.info["dir"].as_str().unwrap());
    let explain = |target: &str, json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tailgres"));
        cmd.args(["explain", target, "--state-dir", &state_dir]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "explain {target}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let a: serde_json::Value = serde_json::from_str(&explain("alice-laptop", true)).unwrap();
    assert_eq!(a["identity"]["node_name"], "alice-laptop.tail-lab.ts.net");
    assert_eq!(a["grants"][0]["users"][0], "readonly");
    let may = a["may_connect_as"][0].as_str().unwrap();
    assert!(may.contains("readonly") && may.contains("analytics") && may.contains("at most 3"), "{may}");

    // ci carries no grant while alice does: nothing.
    let ci = explain("ci", false);
    assert!(ci.contains("tag:ci") && ci.contains("nothing: it carries no"), "{ci}");
    let by_ip = explain(lab.info["clients"][1]["tailnet_ips"][0].as_str().unwrap(), false);
    assert!(by_ip.contains("ci.tail-lab.ts.net"), "{by_ip}");
    let unknown = explain("nobody", false);
    assert!(unknown.contains("no peer named"), "{unknown}");
    lab.stop().await;
}
