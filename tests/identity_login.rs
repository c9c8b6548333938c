//! Identity login: the tailnet identity is the database login. The lab's
//! PostgreSQL allows only `cert` for `role_identity` (`clientname=DN`, a
//! pg_ident map from the CN), trusting the lab's identity CA; tailgres runs
//! with `--login identity` and that CA. Through the tailnet, psql, psycopg
//! (libpq 18), asyncpg, pgx and pgJDBC log in with no password and any
//! sslmode; the database's `pg_stat_ssl` and log name the person and the
//! session; a peer whose grant does not say `"login": "identity"` is
//! refused before the database; and the database itself refuses an expired
//! certificate and one from a CA it does not trust.
mod common;
use base64::Engine as _;
use common::clients::{built_checks, run_check, script};
use common::http_json;
use common::lab::{psql, LabOptions, LabUp};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime};
use tailgres::identity_login::{Holder, IdentityCa, Minted};

const CAP: &str = "tailgres.dev/cap/postgres";
const ROLE: &str = "role_identity";
const WHO_AM_I: &str = "select current_user || '|' || client_dn || '|' || client_serial \
                        from pg_stat_ssl where pid = pg_backend_pid()";

fn conn(lab: &LabUp, client: usize, sslmode: &str, app: &str) -> String {
    let (h, p) = lab.forward_host_port(client);
    format!("host={h} port={p} user={ROLE} dbname=app sslmode={sslmode} application_name={app}")
}

/// psql with no password until the outcome is as wanted (the policy reaches
/// the proxy asynchronously); returns (stdout, stderr) of the last try.
async fn until(lab: &LabUp, client: usize, sslmode: &str, app: &str, want_ok: bool) -> (String, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, err) = psql(&conn(lab, client, sslmode, app), None, WHO_AM_I).await;
        if ok == want_ok {
            return (out, err);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client {client} {sslmode}: still ok={ok}: {err}\n{}",
            lab.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn auth_ok(lab: &LabUp, app: &str) -> Value {
    lab.wait_record(&format!("{app} auth_ok"), |r| {
        r["event"] == "auth_ok" && r["postgres"]["application_name"] == app
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tailnet_identity_is_the_database_login() {
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice-laptop", "bob-laptop"],
        log_connections: true,
        identity_login: true,
        ..Default::default()
    })
    .await;
    let policy = json!({"grants": [
        {"src": ["*"], "dst": ["pg"], "ip": ["tcp:5432"]},
        {"src": ["alice-laptop"], "dst": ["pg"],
         "app": {CAP: [{"databases": ["app"], "users": [ROLE], "login": "identity"}]}},
        // Bob may be the role, but not by identity.
        {"src": ["bob-laptop"], "dst": ["pg"], "app": {CAP: [{"databases": ["app"], "users": [ROLE]}]}},
    ]});
    let (status, body) = http_json(&lab.admin_url(), "PUT", "/policy", Some(policy)).await;
    assert_eq!(status, 200, "{body}");

    // psql, no password at all, each sslmode: the database sees the
    // certificate tailgres signed for alice and this session.
    for sslmode in ["disable", "prefer", "require"] {
        let app = format!("identity-psql-{sslmode}");
        let (out, _) = until(&lab, 0, sslmode, &app, true).await;
        let auth = auth_ok(&lab, &app).await;
        assert_eq!(auth["auth_method"], "identity_certificate", "{auth}");
        let cert = &auth["client_certificate"];
        let sid = auth["session_id"].as_str().unwrap();
        assert_eq!(cert["serial"], sid, "the serial number is the session id: {auth}");
        let login = auth["peer"]["user_login"].as_str().unwrap();
        let subject = cert["subject"].as_str().unwrap();
        assert!(subject.starts_with(&format!("CN={ROLE},O=tailgres,serialNumber={sid},")), "{subject}");
        assert!(subject.ends_with(&format!("OU={login}")), "{subject}");
        let fields: Vec<&str> = out.trim().split('|').collect();
        assert_eq!(fields[0], ROLE, "{out}");
        // pg_stat_ssl names the person (client_dn, cut at 63 bytes, starts
        // with them) and the session (client_serial).
        assert!(fields[1].starts_with(&format!("/OU={login}/L=")), "client_dn {out} vs {subject}");
        let serial = u64::from_str_radix(sid, 16).unwrap();
        assert_eq!(fields[2], serial.to_string(), "client_serial: {out}");
        // And so does the database's log (clientname=DN).
        let log = std::fs::read_to_string(lab.upstream_log()).unwrap();
        let line = format!("identity=\"{subject}\"");
        assert!(
            log.lines().any(|l| l.contains(&line) && l.contains("method=cert")),
            "no `connection authenticated` line for {sid} in the database log:\n{log}"
        );
        // A few minutes, as configured (default 5m, backdated 1m).
        let span = |k: &str| time_of(cert[k].as_str().unwrap());
        assert_eq!(span("not_after") - span("not_before"), 6 * 60, "{cert}");
    }

    // Bob's grant allows the role but not identity login: refused before
    // the database (no upstream leg at all), told what an admin can do.
    let (_, err) = until(&lab, 1, "disable", "identity-bob", false).await;
    assert!(err.contains("\"login\": \"identity\""), "{err}");
    let denied = lab
        .wait_record("bob denied", |r| {
            r["event"] == "session_denied" && r["postgres"]["application_name"] == "identity-bob"
        })
        .await;
    assert_eq!(denied["reason"], "not_authorized", "{denied}");
    assert!(denied["upstream"].is_null(), "a refused session reached the database: {denied}");

    // The drivers people use, no password, through alice's node.
    let (host, port) = lab.forward_host_port(0);
    let port = port.to_string();
    let (pgx, classpath) = built_checks();
    let nv = "org.postgresql.ssl.NonValidatingFactory";
    let python = |check: &str, mode: &str| {
        (
            vec![
                "python3".to_string(),
                script(check).display().to_string(),
                host.clone(),
                port.clone(),
                mode.into(),
            ],
            None,
        )
    };
    let java = |mode: &str, factory: Option<&str>| {
        let mut v = vec!["java".into(), "-cp".into(), classpath.clone(), "JdbcCheck".into()];
        v.extend([host.clone(), port.clone(), mode.to_string()]);
        v.extend(factory.map(str::to_string));
        (v, Some(format!("pgjdbc-{mode}")))
    };
    let go = |mode: &str| {
        (
            vec![pgx.display().to_string(), host.clone(), port.clone(), mode.to_string()],
            Some(format!("pgx-{mode}")),
        )
    };
    let runs: Vec<(Vec<String>, Option<String>)> = vec![
        python("psycopg_check.py", "disable"),
        python("psycopg_check.py", "require"),
        python("psycopg_check.py", "direct"),
        python("asyncpg_check.py", "disable"),
        python("asyncpg_check.py", "require"),
        go("disable"),
        go("require"),
        java("disable", None),
        java("require", Some(nv)),
    ];
    for (argv, app) in &runs {
        let what = argv[1..].join(" ");
        let r = run_check(argv, &[("CHECK_USER", ROLE), ("CHECK_PASSWORD", "")], || lab.log_tails(20)).await;
        eprintln!("{what}: {r}");
        if let Some(app) = app {
            assert_eq!(r["answer"], 42, "{what}: {r}");
            let auth = auth_ok(&lab, app).await;
            assert_eq!(auth["auth_method"], "identity_certificate", "{what}: {auth}");
        }
    }
    // Every driver session logged in by identity; nothing asked a password.
    let records = lab.audit_records();
    let methods: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "auth_ok")
        .map(|r| r["auth_method"].as_str().unwrap())
        .collect();
    assert!(methods.len() >= 3 + runs.len(), "{methods:?}");
    assert!(methods.iter().all(|m| *m == "identity_certificate"), "{methods:?}");
    assert!(!records.iter().any(|r| r["event"] == "auth_failed"), "{records:#?}");

    // The database refuses what it should not trust, whoever presents it:
    // straight to it, with psql, an expired certificate from the right CA
    // and a current one from a CA it does not know. The same CA's current
    // certificate gets in, so the refusals are about expiry and trust.
    let pg = &lab.info["upstream"];
    let ca = IdentityCa::load(
        Path::new(pg["identity_ca_file"].as_str().unwrap()),
        Path::new(pg["identity_key_file"].as_str().unwrap()),
        tailgres::identity_login::DEFAULT_VALIDITY,
    )
    .unwrap();
    let holder =
        Holder { role: ROLE, principal: "direct@test", node: "test", session_id: "00000000000000aa" };
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let current = ca.mint(&holder).unwrap();
    let expired = ca.mint_between(&holder, now - 2 * hour, now - hour).unwrap();
    let foreign_ca = foreign_ca();
    let foreign = foreign_ca.0.mint(&holder).unwrap();
    let (ok, out, err) = psql_with_cert(&lab, &current, "current").await;
    assert!(ok && out.contains(ROLE), "the lab CA's current certificate must get in: {err}");
    let (ok, _, err) = psql_with_cert(&lab, &expired, "expired").await;
    assert!(!ok && err.contains("certificate expired"), "an expired certificate was not refused: {err}");
    let (ok, _, err) = psql_with_cert(&lab, &foreign, "foreign").await;
    assert!(!ok && err.contains("unknown ca"), "a foreign CA's certificate was not refused: {err}");
    lab.stop().await;
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp (the audit log's
/// `...Z` form).
fn time_of(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    t.unix_timestamp()
}

/// A CA of its own (the database trusts only the lab's identity CA).
fn foreign_ca() -> (std::sync::Arc<IdentityCa>, tempfile::TempDir) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "not the lab's identity CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (IdentityCa::load(&c, &k, tailgres::identity_login::DEFAULT_VALIDITY).unwrap(), dir)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// psql straight to the lab's database (not through tailgres) presenting
/// `m`, verifying the server against the lab CA.
async fn psql_with_cert(lab: &LabUp, m: &Minted, name: &str) -> (bool, String, String) {
    use std::os::unix::fs::OpenOptionsExt;
    let pg = &lab.info["upstream"];
    let dir = lab.path().join(format!("direct-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("client.crt"), dir.join("client.key"));
    let chain: String = m.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    std::fs::write(&cert, chain).unwrap();
    // libpq refuses a key others can read.
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key).unwrap();
    std::io::Write::write_all(&mut f, pem("PRIVATE KEY", m.key.secret_der()).as_bytes()).unwrap();
    let conninfo = format!(
        "host={} port={} user={ROLE} dbname=app sslmode=verify-ca sslrootcert={} sslcert={} sslkey={}",
        pg["host"].as_str().unwrap(),
        pg["port"],
        pg["ca_file"].as_str().unwrap(),
        cert.display(),
        key.display()
    );
    psql(&conninfo, None, "select current_user").await
}

/// The README's commands for a dedicated identity CA (OpenSSL) make a CA
/// tailgres loads and signs with: the commands are read from the README,
/// so the two cannot drift apart.
#[test]
fn the_readmes_identity_ca_commands_make_a_ca_tailgres_accepts() {
    let readme = include_str!("../README.md");
    let start = readme.find("    openssl req -x509").expect("the README shows how to make the CA");
    let command: Vec<&str> = readme[start..]
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.trim().trim_end_matches('\\'))
        .collect();
    let command = command.join(" ");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .current_dir(dir.path())
        .output()
        .expect("run sh (openssl: scripts/prereqs installs it)");
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
    let ca = IdentityCa::load(
        &dir.path().join("identity-ca.pem"),
        &dir.path().join("identity-ca.key"),
        tailgres::identity_login::DEFAULT_VALIDITY,
    )
    .unwrap_or_else(|e| panic!("the README's CA is refused: {e}"));
    let holder = Holder {
        role: "app_rw",
        principal: "alice@example.com",
        node: "laptop",
        session_id: "0123456789abcdef",
    };
    ca.mint(&holder).unwrap();
}
