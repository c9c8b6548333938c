//! Statement audit end to end: real clients through the tailnet, the real
//! database. Simple, multi-statement, failing, COPY both ways (psql), and
//! extended, pipelined and failing (tokio-postgres) statements each get a
//! `statement` record with normalized text and no literal; passwords never
//! reach the log; a grant turns it on for its holder only; raw text is the
//! operator's choice and still never shows a password.
mod common;

use common::http_json;
use common::lab::{psql, psql_stdin, LabOptions, LabUp};
use serde_json::{json, Value};
use std::time::Duration;

const CAP: &str = "tailgres.dev/cap/postgres";

fn conninfo(lab: &LabUp, client: usize, app: &str) -> String {
    let (h, p) = lab.forward_host_port(client);
    format!("host={h} port={p} user=role_scram dbname=app sslmode=require application_name={app}")
}

/// tokio-postgres (extended protocol) through the proxy, as role_scram
/// without TLS; the connection's task beside it.
async fn extended_client(
    lab: &LabUp,
    app: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>) {
    let (h, p) = lab.forward_host_port(0);
    let (client, connection) = tokio_postgres::connect(
        &format!("host={h} port={p} user=role_scram password=scram-pass dbname=app sslmode=disable application_name={app}"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("tokio-postgres through tailgres");
    (client, tokio::spawn(connection))
}

/// The statement records of the session with this application name, once
/// its session_end is written (statements come before it).
async fn statements_of(lab: &LabUp, app: &str) -> Vec<Value> {
    lab.wait_record(&format!("session_end of {app}"), |r| {
        r["event"] == "session_end" && r["postgres"]["application_name"] == app
    })
    .await;
    lab.audit_records()
        .into_iter()
        .filter(|r| r["event"] == "statement" && r["postgres"]["application_name"] == app)
        .collect()
}

/// (command tag or SQLSTATE, text) of each record.
fn summary(records: &[Value]) -> Vec<(String, Option<String>)> {
    records
        .iter()
        .map(|r| {
            let what = match r["outcome"].as_str().unwrap() {
                "error" => format!("error {}", r["sqlstate"].as_str().unwrap_or("?")),
                _ => r["command_tag"].as_str().unwrap().to_owned(),
            };
            (what, r["text"].as_str().map(str::to_owned))
        })
        .collect()
}

fn s(what: &str, text: Option<&str>) -> (String, Option<String>) {
    (what.to_owned(), text.map(str::to_owned))
}

/// The secrets the sessions send, none of which may reach the log.
const SECRETS: &[&str] =
    &["copy-secret", "multi-secret", "secret-literal-", "bind-secret", "scram-pass", "SCRAM-SHA-256$"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_is_recorded_without_its_literals() {
    let lab =
        LabUp::start(LabOptions { tailgres_args: vec!["--audit-statements"], ..Default::default() }).await;

    // Extended protocol: tokio-postgres prepares, binds and executes, and
    // pipelines what is issued together.
    let (client, conn) = extended_client(&lab, "extended").await;
    let rows = client.query("select $1::text as v", &[&"bind-secret"]).await.unwrap();
    assert_eq!(rows[0].get::<_, &str>(0), "bind-secret");
    let (a, b) = futures_util::future::join(
        client.query_one("select $1::int + 1", &[&4242i32]),
        client.query_one("select $1::int * 2, $2::text", &[&21i32, &"bind-secret"]),
    )
    .await;
    assert_eq!((a.unwrap().get::<_, i32>(0), b.unwrap().get::<_, i32>(0)), (4243, 42));
    let err = client.query_one("select 1 / $1::int", &[&0i32]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    drop(client);
    let _ = conn.await;

    let extended = statements_of(&lab, "extended").await;
    assert!(extended.iter().all(|r| r["protocol"] == "extended"), "{extended:#?}");
    assert_eq!(
        summary(&extended),
        [
            s("SELECT", Some("select $1::text as v")),
            s("SELECT", Some("select $1::int + $2")),
            s("SELECT", Some("select $1::int * $3, $2::text")),
            s("error 22012", Some("select $2 / $1::int")),
        ]
    );
    assert!(extended.iter().take(3).all(|r| r["rows"] == 1), "{extended:#?}");

    // Simple protocol (psql), one session: DDL, COPY in and out, a
    // multi-statement transaction, literals, passwords, and an error.
    let copy_in = b"1\tcopy-secret\n2\tother\n".to_vec();
    let (ok, _, err) = psql_stdin(
        &conninfo(&lab, 0, "simple"),
        Some("scram-pass"),
        &[
            "CREATE TEMP TABLE t (id int, v text)",
            "COPY t FROM STDIN",
            "COPY t TO STDOUT",
            "BEGIN; INSERT INTO t VALUES (3, 'multi-secret'); SELECT count(*) FROM t; COMMIT",
            "select 1 as a, 'secret-literal-1' as b /* note: secret-literal-1 */",
            "select 2 as a, 'secret-literal-2' as b",
            "ALTER ROLE role_scram PASSWORD 'scram-pass'",
            // What psql's \password sends: an already hashed verifier.
            "ALTER USER role_scram PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy'",
            "select 1/0",
        ],
        copy_in.clone(),
    )
    .await;
    assert!(!ok && err.contains("division by zero"), "{err}");
    let simple = statements_of(&lab, "simple").await;
    assert!(simple.iter().all(|r| r["protocol"] == "simple"), "{simple:#?}");
    assert_eq!(
        summary(&simple),
        [
            s("CREATE TABLE", Some("CREATE TEMP TABLE t (id int, v text)")),
            s("COPY", Some("COPY t FROM STDIN")),
            s("COPY", Some("COPY t TO STDOUT")),
            s("BEGIN", Some("BEGIN")),
            s("INSERT", Some("INSERT INTO t VALUES ($1, $2)")),
            s("SELECT", Some("SELECT count(*) FROM t")),
            s("COMMIT", Some("COMMIT")),
            s("SELECT", Some("select $1 as a, $2 as b")),
            s("SELECT", Some("select $1 as a, $2 as b")),
            s("ALTER ROLE", None),
            s("ALTER ROLE", None),
            s("error 22012", Some("select $1/$2")),
        ]
    );
    assert_eq!(simple[1]["copy"], json!({"direction": "in", "bytes": copy_in.len()}));
    assert_eq!(simple[1]["rows"], 2);
    assert_eq!(simple[2]["copy"]["direction"], "out");
    assert_eq!(simple[2]["rows"], 2);
    assert_eq!(simple[4]["rows"], 1);
    assert!(simple[9..11].iter().all(|r| r["text_status"] == "redacted"), "{simple:#?}");
    // One fingerprint for statements that differ only in literals.
    assert_eq!(simple[7]["fingerprint"], simple[8]["fingerprint"]);
    let fp_of = |text: &str| {
        simple.iter().chain(&extended).find(|r| r["text"] == text).map(|r| r["fingerprint"].clone()).unwrap()
    };
    assert_ne!(fp_of("select $1 as a, $2 as b"), fp_of("SELECT count(*) FROM t"));
    // Each statement's time is its own.
    assert!(simple.iter().all(|r| r["duration_us"].as_u64().unwrap() < 30_000_000), "{simple:#?}");

    // Read back: by fingerprint, by text, and summarised per fingerprint.
    let audit = |args: &[&str]| common::audit::cli(&lab.audit_log(), args);
    let fp = simple[7]["fingerprint"].as_str().unwrap();
    let by_fp = audit(&["--format=json", "--fingerprint", fp]);
    // Both literal variants (libpg_query's fingerprint also takes
    // `select $1::text as v` for the same statement: constants, parameters
    // and column aliases do not count).
    assert!(by_fp.len() >= 2 && by_fp.iter().all(|r| r["fingerprint"] == fp), "{by_fp:#?}");
    let by_text = audit(&["--format=json", "--text", "*COUNT(*)*"]);
    assert_eq!(summary(&by_text), [s("SELECT", Some("SELECT count(*) FROM t"))]);
    let groups = audit(&["--format=json", "--summary", "--statements", "--fingerprint", fp]);
    assert_eq!(groups.len(), 1, "{groups:#?}");
    assert_eq!(
        (groups[0]["count"].as_u64(), groups[0]["errors"].as_u64()),
        (Some(by_fp.len() as u64), Some(0))
    );
    assert_eq!(groups[0]["text"], by_fp[0]["text"], "the first text seen");
    let errors: u64 = audit(&["--format=json", "--summary", "--statements"])
        .iter()
        .map(|g| g["errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, 2, "the two divisions by zero");

    // Not one literal anywhere in the log.
    let log = std::fs::read_to_string(lab.audit_log()).unwrap();
    for secret in SECRETS {
        assert!(!log.contains(secret), "{secret:?} reached the audit log");
    }
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_turns_statement_audit_on_for_its_holder_only() {
    let lab =
        LabUp::start(LabOptions { clients: vec!["alice-laptop", "bob-laptop"], ..Default::default() }).await;
    let grant = |audit: Option<&str>| {
        let mut v = json!({"databases": ["app"], "users": ["role_scram"]});
        if let Some(a) = audit {
            v["audit"] = a.into();
        }
        v
    };
    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"], "app": {CAP: [grant(Some("statements"))]}},
        {"src": ["bob-laptop"], "dst": ["pg"], "app": {CAP: [grant(None), grant(Some("sessions"))]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");

    // Policies reach the proxy asynchronously: retry until alice's session
    // is audited as her grant says.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    loop {
        round += 1;
        let (alice, bob) = (format!("alice-{round}"), format!("bob-{round}"));
        let (ok, _, err) = psql(&conninfo(&lab, 0, &alice), Some("scram-pass"), "select 42").await;
        assert!(ok, "{err}");
        let (ok, _, err) = psql(&conninfo(&lab, 1, &bob), Some("scram-pass"), "select 42").await;
        assert!(ok, "{err}");
        let (a, b) = (statements_of(&lab, &alice).await, statements_of(&lab, &bob).await);
        if !a.is_empty() {
            assert_eq!(summary(&a), [s("SELECT", Some("select $1"))]);
            assert!(b.is_empty(), "bob's grant does not ask for statements: {b:#?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "alice's statements are never audited");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // `tailgres explain` says whose statements are audited.
    let explain = |peer: &str| {
        let state_dir = format!("{}/proxy-state", lab.info["dir"].as_str().unwrap());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailgres"))
            .args(["explain", peer, "--json", "--state-dir", &state_dir])
            .output()
            .unwrap();
        assert!(out.status.success(), "explain {peer}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let may = |v: &Value| {
        v["may_connect_as"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        may(&explain("alice-laptop")),
        [r#"users ["role_scram"] on databases ["app"] (statements audited)"#]
    );
    assert!(
        may(&explain("bob-laptop")).iter().all(|m| !m.contains("audited")),
        "{:?}",
        may(&explain("bob-laptop"))
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_text_is_the_operators_choice_and_still_hides_passwords() {
    let lab = LabUp::start(LabOptions {
        tailgres_args: vec!["--audit-statements", "--audit-statement-text=raw"],
        ..Default::default()
    })
    .await;
    let (ok, _, err) = psql_stdin(
        &conninfo(&lab, 0, "raw"),
        Some("scram-pass"),
        &[
            "select 'visible-literal' as v",
            "select rolname from pg_roles where rolname = 'role_scram' and 'scram-pass' <> 'password'",
            "ALTER ROLE role_scram PASSWORD 'scram-pass'",
        ],
        Vec::new(),
    )
    .await;
    assert!(ok, "{err}");
    // Bind values come with raw text (and only then).
    let (client, conn) = extended_client(&lab, "raw-extended").await;
    client.query_one("select $1::text, $2::int", &[&"visible-bind", &7i32]).await.unwrap();
    client.query_one("select $1::text as password", &[&"hidden-bind"]).await.unwrap();
    drop(client);
    let _ = conn.await;
    let extended = statements_of(&lab, "raw-extended").await;
    let params: Vec<(&str, &Value)> =
        extended.iter().map(|r| (r["text_status"].as_str().unwrap(), &r["params"])).collect();
    // tokio-postgres binds in binary format: shown as PostgreSQL shows bytea.
    let hex: String = b"visible-bind".iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(params, [("raw", &json!([format!("\\x{hex}"), "\\x00000007"])), ("normalized", &Value::Null)]);

    let raw = statements_of(&lab, "raw").await;
    let texts: Vec<(&str, Option<&str>)> =
        raw.iter().map(|r| (r["text_status"].as_str().unwrap(), r["text"].as_str())).collect();
    assert_eq!(
        texts,
        [
            ("raw", Some("select 'visible-literal' as v")),
            ("normalized", Some("select rolname from pg_roles where rolname = $1 and $2 <> $3")),
            ("redacted", None),
        ]
    );
    let log = std::fs::read_to_string(lab.audit_log()).unwrap();
    assert!(!log.contains("scram-pass"), "a password reached the audit log");
    assert!(!log.contains("hidden-bind"), "a bind value beside a password reached the audit log");
    lab.stop().await;
}
