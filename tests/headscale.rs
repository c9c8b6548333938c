//! Grants, tags, `--require-grant`, revocation and `tailgres explain`
//! against headscale, an independent Tailscale control server, rather than
//! our own lab's: its policy compiler turns a HuJSON policy file's `grants`
//! (`app: {"tailgres.dev/cap/postgres": [...]}`) into the capability map
//! tailgres reads with WhoIs; users register with their own pre-auth keys,
//! tagged devices (the proxy among them) with tagged keys. Policy changes
//! are written to the file and headscale is told to reload it (SIGHUP).
//!
//! Needs the headscale binary in `$TAILGRES_HEADSCALE` (scripts/test sets
//! it); fails without it. Run with scripts/test (a fresh network namespace
//! holding only `lo`; headscale listens on 127.0.0.1 only).
mod common;

use common::headscale::{explain, Owner, World};
use common::http_json;
use common::lab::{LabOptions, LabUp};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const CAP: &str = "tailgres.dev/cap/postgres";

/// The database side of these tests: a role for `{localpart:*@DOMAIN}` and a
/// second database.
const SQL: &[&str] = &[
    "CREATE ROLE alice LOGIN PASSWORD 'alice-pass'",
    "CREATE DATABASE analytics",
    "GRANT CONNECT ON DATABASE analytics TO PUBLIC",
];

/// groups, tagOwners and the packet grant every policy here starts with:
/// who may reach the proxy's port at all (Tailscale's layer, not tailgres').
fn policy(srcs: &str, app_grants: &str) -> String {
    format!(
        r#"// tailgres on headscale (HuJSON: comments and trailing commas are fine).
{{
  "groups": {{
    "group:analysts": ["alice@"],
  }},
  "tagOwners": {{
    "tag:db-proxy": [],
    "tag:ci": [],
  }},
  "grants": [
    // Packets: these sources may reach the proxy's port.
    {{"src": [{srcs}], "dst": ["tag:db-proxy"], "ip": ["tcp:5432"]}},
    // Database users and databases: the proxy's application capability.
{app_grants}
  ],
}}
"#
    )
}

fn app_grant(src: &str, values: &str) -> String {
    format!(r#"    {{"src": ["{src}"], "dst": ["tag:db-proxy"], "app": {{"{CAP}": [{values}]}}}},"#)
}

/// Reads `err` as a refusal by tailgres' grants (FATAL 28000 naming the
/// user, database and capability).
fn assert_refused(err: &str, user: &str, database: &str) {
    assert!(
        err.contains(&format!("may not open a session as user \"{user}\" to database \"{database}\"")),
        "{err}"
    );
    assert!(err.contains(CAP), "the refusal says how to grant it: {err}");
}

/// Who may be which database user, decided by a headscale policy. First
/// no peer carries the capability (an open tailnet: whoever the ACLs let
/// through may connect); a reload brings grants: users' (literal roles,
/// `{localpart:*@DOMAIN}`, per database), a tag's, and a user without one,
/// now refused. Denials are audited `not_authorized` with the identity
/// headscale gave; `tailgres explain` tells each peer's grants. Then
/// revocation: a reload that withdraws a running session's grant, one that
/// no longer lets the peer's packets through, and a node deleted from
/// headscale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headscale_grants_decide_and_revoke() {
    let srcs = r#""alice@", "bob@", "tag:ci""#;
    let v0 = policy(srcs, "");
    let (mut w, users) =
        World::start(&v0, &[("alice", "alice@example.com"), ("bob", "bob@example.com")], SQL, &[]).await;
    let alice = w.client("alice-laptop", Owner::User(users[0])).await;
    let bob = w.client("bob-laptop", Owner::User(users[1])).await;
    let ci = w.client("ci", Owner::Tags("tag:ci")).await;

    // The proxy registered with the tagged key: headscale lists it as a
    // tagged device, owned by no user.
    let nodes = w.hs.nodes().await;
    let pg = nodes.iter().find(|n| n["given_name"] == "pg").unwrap_or_else(|| panic!("{nodes:#?}"));
    assert_eq!(pg["tags"], json!(["tag:db-proxy"]), "{pg}");
    assert_eq!(pg["user"]["name"], "tagged-devices", "{pg}");

    // No grants anywhere: the ACLs decide alone.
    w.until(bob, "role_trust", "app", true).await;
    let text = w.explain("bob-laptop", false);
    assert!(text.contains("bob@example.com") && text.contains("any user on any database"), "{text}");

    let alice_values = r#"{"databases": ["app"], "users": ["role_scram"]},
      {"databases": ["analytics"], "users": ["{localpart:*@example.com}"], "max_connections": 3}"#;
    let ci_values = r#"{"databases": ["app", "analytics"], "users": ["role_md5"]}"#;
    let v1 = policy(srcs, &[app_grant("alice@", alice_values), app_grant("tag:ci", ci_values)].join("\n"));
    w.hs.set_policy(&v1).await;

    // alice: her grants, and nothing else.
    w.until(alice, "role_scram", "app", true).await;
    w.until(alice, "alice", "analytics", true).await; // {localpart:*@example.com}
    let err = w.until(alice, "role_md5", "app", false).await;
    assert_refused(&err, "role_md5", "app");
    let err = w.until(alice, "alice", "app", false).await;
    assert_refused(&err, "alice", "app"); // user and database must match in one grant
    let err = w.until(alice, "role_scram", "analytics", false).await;
    assert_refused(&err, "role_scram", "analytics");
    let denied = w
        .wait_record("alice denied", |r| {
            r["event"] == "session_denied"
                && r["postgres"]["user"] == "role_md5"
                && r["postgres"]["database"] == "app"
        })
        .await;
    assert_eq!(denied["reason"], "not_authorized", "{denied}");
    assert_eq!(denied["side"], "client", "{denied}");
    assert_eq!(denied["peer"]["user_login"], "alice@example.com", "{denied}");
    assert_eq!(denied["peer"]["node_name"], "alice-laptop.tail.lab", "{denied}");
    assert_eq!(denied["peer"]["tailnet_ip"], w.c(alice).ip().as_str(), "{denied}");
    assert_eq!(denied["peer"]["tags"], json!([]), "{denied}");

    // bob carries no grant while others do: refused now.
    let err = w.until(bob, "role_trust", "app", false).await;
    assert!(err.contains("has no access grant") && err.contains(CAP), "{err}");
    let denied = w
        .wait_record("bob denied", |r| {
            r["event"] == "session_denied" && r["peer"]["user_login"] == "bob@example.com"
        })
        .await;
    assert_eq!(denied["reason"], "not_authorized", "{denied}");
    assert!(denied["detail"].as_str().unwrap().contains("other peers carry it"), "{denied}");

    // The tagged device: its tag's grant, identified by the tag.
    w.until(ci, "role_md5", "app", true).await;
    w.until(ci, "role_md5", "analytics", true).await;
    let err = w.until(ci, "role_trust", "app", false).await;
    assert_refused(&err, "role_trust", "app");
    let denied = w
        .wait_record("ci denied", |r| {
            r["event"] == "session_denied" && r["peer"]["tailnet_ip"] == w.c(ci).ip().as_str()
        })
        .await;
    assert_eq!(denied["reason"], "not_authorized", "{denied}");
    assert_eq!(denied["peer"]["tags"], json!(["tag:ci"]), "{denied}");
    assert_eq!(denied["peer"]["node_name"], "ci.tail.lab", "{denied}");

    // explain: each peer's identity and grants as headscale delivered them.
    let a = w.explain_json("alice-laptop");
    assert_eq!(a["identity"]["node_name"], "alice-laptop.tail.lab", "{a}");
    assert_eq!(a["identity"]["user_login"], "alice@example.com", "{a}");
    assert_eq!(a["grants_in_use"], "used", "{a}");
    let mut grants: Vec<String> = a["grants"].as_array().unwrap().iter().map(|g| g.to_string()).collect();
    grants.sort();
    assert_eq!(
        grants,
        [
            r#"{"databases":["analytics"],"max_connections":3,"users":["{localpart:*@example.com}"]}"#,
            r#"{"databases":["app"],"users":["role_scram"]}"#,
        ],
        "headscale hands tailgres the grant values as written: {a}"
    );
    let mut may: Vec<&str> =
        a["may_connect_as"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    may.sort();
    assert_eq!(
        may,
        [
            r#"users ["role_scram"] on databases ["app"]"#,
            r#"users ["{localpart:*@example.com}"] on databases ["analytics"] (at most 3 sessions)"#,
        ]
    );
    let text = w.explain("ci", false);
    assert!(
        text.contains("tag:ci") && text.contains(r#"users ["role_md5"] on databases ["app", "analytics"]"#),
        "{text}"
    );
    let text = w.explain("bob-laptop", false);
    assert!(text.contains("nothing: it carries no") && text.contains("other peers do"), "{text}");
    let by_ip = w.explain(&w.c(ci).ip(), false);
    assert!(by_ip.contains("ci.tail.lab"), "{by_ip}");
    let unknown = w.explain("nobody", false);
    assert!(unknown.contains("no peer named"), "{unknown}");

    // Revocation by policy: alice runs a long query; the policy file loses
    // her role_scram grant and headscale reloads it.
    let long = w.long_session(alice, "role_scram", "app", "alice-long").await;
    let alice_analytics = r#"{"databases": ["analytics"], "users": ["{localpart:*@example.com}"]}"#;
    let v2 = policy(srcs, &[app_grant("alice@", alice_analytics), app_grant("tag:ci", ci_values)].join("\n"));
    let t = Instant::now();
    w.hs.set_policy(&v2).await;
    let end = w.wait_end("alice-long").await;
    eprintln!("headscale: policy reload to revoked session_end in {:?}", t.elapsed());
    assert_eq!(end["reason"], "revoked", "{end}");
    assert_eq!(end["ended_by"], "proxy", "{end}");
    assert!(end["detail"].as_str().unwrap().contains("role_scram"), "{end}");
    let (ok, _, err) =
        tokio::time::timeout(Duration::from_secs(30), long).await.expect("psql ended").unwrap();
    assert!(!ok && err.contains("access for this peer was revoked"), "{err}");
    w.wait_gone_from_database("alice-long").await;
    w.until(alice, "role_scram", "app", false).await;
    w.until(alice, "alice", "analytics", true).await; // what the new policy still grants

    // Revocation at the packet layer: a reload that no longer lets alice's
    // packets reach the proxy at all (headscale then drops her from the
    // proxy's peers, so the tailnet no longer identifies her).
    let long = w.long_session(alice, "alice", "analytics", "alice-acl").await;
    let v3 = policy(r#""bob@", "tag:ci""#, &app_grant("tag:ci", ci_values));
    let t = Instant::now();
    w.hs.set_policy(&v3).await;
    let end = w.wait_end("alice-acl").await;
    eprintln!(
        "headscale: packet-layer reload to revoked session_end in {:?}: {}",
        t.elapsed(),
        end["detail"]
    );
    assert_eq!(end["reason"], "revoked", "{end}");
    assert!(end["detail"].as_str().unwrap().contains("no longer identifies the peer"), "{end}");
    w.wait_gone_from_database("alice-acl").await;
    long.abort(); // her packets no longer reach the proxy: her psql may never hear the end
    w.until(ci, "role_md5", "app", true).await; // the tag's access is untouched

    // Revocation by deletion: ci's node is deleted from headscale.
    let long = w.long_session(ci, "role_md5", "app", "ci-long").await;
    let t = Instant::now();
    w.hs.delete_node("ci").await;
    let end = w.wait_end("ci-long").await;
    eprintln!("headscale: node delete to revoked session_end in {:?}", t.elapsed());
    assert_eq!(end["reason"], "revoked", "{end}");
    assert_eq!(end["ended_by"], "proxy", "{end}");
    assert!(end["detail"].as_str().unwrap().contains("no longer identifies the peer"), "{end}");
    w.wait_gone_from_database("ci-long").await;
    long.abort(); // ci's node is gone: its psql may never hear the end
    let text = w.explain("ci", false);
    assert!(!text.contains("may connect as"), "a deleted node has no access: {text}");
    w.stop().await;
}

/// `--require-grant` with a headscale policy (alice's grant through a
/// group, as in README's example): a user without a grant is
/// refused; a reload that grants her lets her in, and one that takes a
/// running session's grant away ends it, leaving other sessions alone; a
/// node expired in headscale loses its running session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headscale_require_grant_reload_and_expiry() {
    let srcs = r#""group:analysts", "carol@", "tag:ci""#;
    let alice_grant = app_grant("group:analysts", r#"{"databases": ["*"], "users": ["role_*"]}"#);
    let ci_grant = app_grant("tag:ci", r#"{"databases": ["app"], "users": ["role_trust"]}"#);
    let v1 = policy(srcs, &[alice_grant.clone(), ci_grant.clone()].join("\n"));
    let (mut w, users) = World::start(
        &v1,
        &[("alice", "alice@example.com"), ("carol", "carol@example.com")],
        &[],
        &["--require-grant"],
    )
    .await;
    let alice = w.client("alice-laptop", Owner::User(users[0])).await;
    let carol = w.client("carol-laptop", Owner::User(users[1])).await;
    let ci = w.client("ci", Owner::Tags("tag:ci")).await;

    w.until(alice, "role_scram", "app", true).await;
    w.until(ci, "role_trust", "app", true).await;
    let err = w.until(carol, "role_trust", "app", false).await;
    assert!(err.contains("has no access grant") && err.contains(CAP), "{err}");
    let denied = w
        .wait_record("carol denied", |r| {
            r["event"] == "session_denied" && r["peer"]["user_login"] == "carol@example.com"
        })
        .await;
    assert_eq!(denied["reason"], "not_authorized", "{denied}");
    let e = w.explain_json("carol-laptop");
    assert_eq!(e["require_grant"], true);
    assert!(e["may_connect_as"][0].as_str().unwrap().starts_with("nothing: it carries no"), "{e}");

    // The same policy on the lab's own control server: explain answers
    // alike for every peer, whichever control server compiled the grants.
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice-laptop", "carol-laptop", "ci=tag:ci"],
        tailgres_args: vec!["--require-grant"],
        ..Default::default()
    })
    .await;
    let lab_policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["*"], "users": ["role_*"]}]}},
        {"src": ["tag:ci"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": ["role_trust"]}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(lab_policy)).await;
    assert_eq!(status, 200, "{body}");
    let lab_state = Path::new(lab.info["dir"].as_str().unwrap()).join("proxy-state");
    let lab_explain = |t: &str| -> Value { serde_json::from_str(&explain(&lab_state, t, true)).unwrap() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab_explain("alice-laptop")["grants_in_use"] != "used"
        || w.explain_json("alice-laptop")["grants_in_use"] != "used"
    {
        assert!(Instant::now() < deadline, "the lab's grants never reached its proxy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for peer in ["alice-laptop", "carol-laptop", "ci"] {
        let (hs, lab) = (w.explain_json(peer), lab_explain(peer));
        for k in [
            "capability",
            "require_grant",
            "grants_in_use",
            "allow_shared_nodes",
            "grants",
            "may_connect_as",
            "verdict",
        ] {
            assert_eq!(hs[k], lab[k], "{peer}: {k} differs\nheadscale: {hs:#}\nlab: {lab:#}");
        }
        for k in ["tags", "expired", "shared_in", "os"] {
            assert_eq!(
                hs["identity"][k], lab["identity"][k],
                "{peer}: identity.{k} differs\n{hs:#}\n{lab:#}"
            );
        }
        let keys = |v: &Value| v["identity"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&hs), keys(&lab), "{peer}: the identities have the same fields");
    }
    lab.stop().await;

    // Reload: carol is granted role_trust; alice loses every grant (her
    // packets still reach the proxy). alice's running session ends; ci's
    // goes on.
    let alice_long = w.long_session(alice, "role_scram", "app", "alice-long").await;
    let ci_long = w.long_session(ci, "role_trust", "app", "ci-long").await;
    let v2 = policy(
        srcs,
        &[app_grant("carol@", r#"{"databases": ["app"], "users": ["role_trust"]}"#), ci_grant].join("\n"),
    );
    let t = Instant::now();
    w.hs.set_policy(&v2).await;
    let end = w.wait_end("alice-long").await;
    eprintln!("headscale: policy reload to revoked session_end in {:?}", t.elapsed());
    assert_eq!(end["reason"], "revoked", "{end}");
    assert!(end["detail"].as_str().unwrap().contains("has no"), "{end}");
    let (ok, _, err) =
        tokio::time::timeout(Duration::from_secs(30), alice_long).await.expect("psql ended").unwrap();
    assert!(!ok && err.contains("access for this peer was revoked"), "{err}");
    w.until(carol, "role_trust", "app", true).await;
    w.until(alice, "role_scram", "app", false).await;
    assert!(!ci_long.is_finished(), "ci's session was not touched by the reload");
    w.wait_sleeping("ci-long").await;

    // Expiry: headscale expires ci's node key; its running session ends.
    let t = Instant::now();
    w.hs.expire_node("ci").await;
    let end = w.wait_end("ci-long").await;
    eprintln!("headscale: node expire to revoked session_end in {:?}", t.elapsed());
    assert_eq!(end["reason"], "revoked", "{end}");
    assert!(end["detail"].as_str().unwrap().contains("expired"), "seen as expired, not gone: {end}");
    w.wait_gone_from_database("ci-long").await;
    ci_long.abort(); // an expired node may not hear the end
    w.stop().await;
}
