//! Which clients work through tailgres, and what the audit log says about
//! them: psql (libpq 15) across every sslmode × channel_binding × role, a
//! pure-Rust driver (tokio-postgres) in plaintext and over TLS, direct TLS
//! (PostgreSQL 17+ `sslnegotiation=direct`, done by hand), wrong passwords,
//! and `--auth passthrough`.
//!
//! The expected authentication methods follow
//! docs/postgres-protocol.md, "SCRAM channel binding through a
//! TLS-terminating proxy": a TLS client of a SCRAM role is asked for its
//! password and the proxy runs SCRAM-SHA-256-PLUS upstream
//! (`password_relay_scram_sha_256_plus`); a plaintext client gets the
//! upstream's SCRAM relayed without `-PLUS` (`scram_sha_256`); MD5 and trust
//! are relayed as they are.
//!
//! Every test starts its own lab (`tailgres-lab up`), so they must run
//! inside a loopback-only network namespace: run them with
//! `scripts/test --test client_matrix`.
mod common;

use common::lab::{psql, LabOptions, LabUp};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;
use tokio_rustls::TlsConnector;

/// The proxy's MagicDNS name in the lab (`tailgres-lab up` names it "pg";
/// tslab's tailnet suffix is fixed).
const PROXY_NAME: &str = "pg.tail-lab.ts.net";
/// The lab's login roles, their passwords, and the audit `auth_method` each
/// gets from a plaintext and from a TLS client in the default
/// (password-relay) mode.
const ROLES: &[Role] = &[
    Role {
        name: "role_scram",
        password: Some("scram-pass"),
        method_plaintext: "scram_sha_256",
        method_tls: "password_relay_scram_sha_256_plus",
    },
    Role { name: "role_md5", password: Some("md5-pass"), method_plaintext: "md5", method_tls: "md5" },
    Role { name: "role_trust", password: None, method_plaintext: "trust", method_tls: "trust" },
];
const SSLMODES: &[&str] = &["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];
const CHANNEL_BINDINGS: &[&str] = &["prefer", "disable"];
/// psql processes at once (the lab runs on two cores).
const PSQL_PARALLEL: usize = 6;
/// The SSLRequest code (docs/postgres-protocol.md, "Before the
/// StartupMessage").
const SSL_REQUEST: u32 = 80877103;

struct Role {
    name: &'static str,
    password: Option<&'static str>,
    method_plaintext: &'static str,
    method_tls: &'static str,
}

/// A throwaway CA and the certificate it issued for the proxy's client leg
/// (SAN 127.0.0.1, where the forward listens, and the MagicDNS name), so
/// verify-ca and verify-full clients can trust the proxy.
struct TestPki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl TestPki {
    fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "tailgres client_matrix test CA");
        ca.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), PROXY_NAME.to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, PROXY_NAME);
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (ca_file, cert_file, key_file) =
            (dir.path().join("ca.pem"), dir.path().join("proxy.pem"), dir.path().join("proxy.key"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, leaf.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        TestPki { _dir: dir, ca_file, cert_file, key_file, ca_der: ca.der().clone() }
    }

    /// tailgres arguments that make the proxy offer this certificate.
    fn tailgres_args(&self) -> Vec<String> {
        vec![
            format!("--client-tls-cert={}", self.cert_file.display()),
            format!("--client-tls-key={}", self.key_file.display()),
        ]
    }

    /// A rustls client trusting only this CA, offering `alpn` if given.
    fn connector(&self, alpn: Option<&[u8]>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// Starts a lab whose proxy offers `pki`'s certificate, plus `extra` args.
async fn lab_with(pki: &TestPki, extra: &[&str]) -> LabUp {
    let args = pki.tailgres_args();
    let mut tailgres_args: Vec<&str> = args.iter().map(String::as_str).collect();
    tailgres_args.extend_from_slice(extra);
    let lab = LabUp::start(LabOptions { tailgres_args, ..Default::default() }).await;
    assert_eq!(lab.info["proxy"]["name"], PROXY_NAME, "the test certificate names the proxy");
    lab
}

/// All audit records of the sessions whose StartupMessage carried
/// `application_name = app`, grouped by session id, once every one of them
/// has ended (records are written asynchronously to what the client sees).
async fn sessions_of(lab: &LabUp, app: &str) -> BTreeMap<String, Vec<Value>> {
    lab.wait_record(&format!("session_end of {app}"), |r| {
        r["event"] == "session_end" && r["postgres"]["application_name"] == app
    })
    .await;
    let mut by_session: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in lab.audit_records() {
        if r["postgres"]["application_name"] == app {
            by_session.entry(r["session_id"].as_str().unwrap().to_string()).or_default().push(r);
        }
    }
    by_session
}

/// The one session of `app`; panics if libpq made more than one attempt
/// (sslmode=allow/prefer retry silently on another transport).
async fn only_session(lab: &LabUp, app: &str) -> Vec<Value> {
    let sessions = sessions_of(lab, app).await;
    assert_eq!(sessions.len(), 1, "{app}: expected exactly one session, got {sessions:#?}");
    sessions.into_values().next().unwrap()
}

fn event<'a>(records: &'a [Value], name: &str) -> &'a Value {
    records.iter().find(|r| r["event"] == name).unwrap_or_else(|| panic!("no {name} in {records:#?}"))
}

/// The client ended the session cleanly: it sent Terminate
/// (`client_terminated`) or closed its connection (`client_closed`).
fn assert_client_ended(end: &Value, what: &str) {
    let reason = end["reason"].as_str().unwrap_or_default();
    assert!(matches!(reason, "client_terminated" | "client_closed"), "{what}: {end}");
    assert_eq!(end["ended_by"], "client", "{what}: {end}");
}

fn events(records: &[Value]) -> Vec<&str> {
    records.iter().map(|r| r["event"].as_str().unwrap()).collect()
}

/// Panics if any of `secrets` appears in the audit log or the proxy's log.
fn assert_never_logged(lab: &LabUp, secrets: &[&str]) {
    let audit = std::fs::read_to_string(lab.audit_log()).unwrap();
    let proxy = std::fs::read_to_string(lab.proxy_log()).unwrap();
    for s in secrets {
        assert!(!audit.contains(s), "password {s:?} reached the audit log");
        assert!(!proxy.contains(s), "password {s:?} reached the proxy log");
    }
}

/// libpq connection string through client 0's forward. verify-full names
/// the proxy by its MagicDNS name (what a tailnet client would use) and
/// dials 127.0.0.1 with hostaddr; verify-ca dials 127.0.0.1 by host.
fn conninfo(lab: &LabUp, pki: &TestPki, sslmode: &str, extra: &str) -> String {
    let (host, port) = lab.forward_host_port(0);
    let addr = match sslmode {
        "verify-full" => format!("host={PROXY_NAME} hostaddr={host}"),
        _ => format!("host={host}"),
    };
    let root = match sslmode {
        "verify-ca" | "verify-full" => format!(" sslrootcert={}", pki.ca_file.display()),
        _ => String::new(),
    };
    format!("{addr} port={port} dbname=app sslmode={sslmode}{root} {extra}")
}

/// The transport libpq ends up on: `allow` tries plaintext first (and the
/// proxy accepts plaintext, the tailnet leg being WireGuard), `disable`
/// never asks for TLS, every other mode starts with an SSLRequest.
fn expected_transport(sslmode: &str) -> &'static str {
    match sslmode {
        "disable" | "allow" => "plaintext",
        _ => "tls",
    }
}

/// psql with every sslmode × channel_binding × role connects, and each
/// session is audited once with its transport, method, user, database,
/// application_name and protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_every_sslmode_channel_binding_and_role() {
    let pki = TestPki::new();
    let lab = lab_with(&pki, &[]).await;

    struct Case {
        app: String,
        sslmode: &'static str,
        role: &'static Role,
        conninfo: String,
    }
    let mut cases = Vec::new();
    for sslmode in SSLMODES {
        for cb in CHANNEL_BINDINGS {
            for role in ROLES {
                let app = format!("cm-{sslmode}-cb_{cb}-{}", role.name);
                let extra = format!("user={} channel_binding={cb} application_name={app}", role.name);
                cases.push(Case { conninfo: conninfo(&lab, &pki, sslmode, &extra), app, sslmode, role });
            }
        }
    }

    let limit = Arc::new(tokio::sync::Semaphore::new(PSQL_PARALLEL));
    let mut runs = tokio::task::JoinSet::new();
    for (i, c) in cases.iter().enumerate() {
        let (limit, conninfo, password) = (limit.clone(), c.conninfo.clone(), c.role.password);
        runs.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let sql = "select current_user, current_database()";
            let mut r = psql(&conninfo, password, sql).await;
            // Seen once in ~8 full-suite runs under load: one connection of
            // the 36 closed with no message. Retried once so a transient of
            // the lab's tailnet forwarder does not fail the matrix; printed so
            // it stays visible (see the closing note of session 1).
            if !r.0 && r.2.contains("closed the connection unexpectedly") {
                eprintln!("RETRY after transient close: {conninfo}: {}", r.2.trim());
                r = psql(&conninfo, password, sql).await;
            }
            (i, r)
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = runs.join_next().await {
        let (i, (ok, out, err)) = r.unwrap();
        let c = &cases[i];
        let want = format!("{}|app", c.role.name);
        if !ok || out.trim() != want {
            failures.push(format!("{}: ok={ok} out={:?} err={}", c.conninfo, out.trim(), err.trim()));
        }
    }
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {} psql connections failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    for c in &cases {
        let s = only_session(&lab, &c.app).await;
        assert_eq!(events(&s), ["session_start", "auth_ok", "session_end"], "{}", c.app);
        let transport = expected_transport(c.sslmode);
        let method = if transport == "tls" { c.role.method_tls } else { c.role.method_plaintext };
        let (ok, end) = (event(&s, "auth_ok"), event(&s, "session_end"));
        assert_eq!(end["client_transport"], transport, "{}: {end}", c.app);
        assert_eq!(ok["auth_method"], method, "{}: {ok}", c.app);
        assert_client_ended(end, &c.app);
        for r in &s {
            assert_eq!(r["postgres"]["user"], c.role.name, "{}: {r}", c.app);
            assert_eq!(r["postgres"]["database"], "app", "{}: {r}", c.app);
            assert_eq!(r["postgres"]["protocol"], "3.0", "{}: {r}", c.app);
            assert_eq!(r["peer"]["node_name"], "laptop.tail-lab.ts.net", "{}: {r}", c.app);
        }
    }
    assert_never_logged(&lab, &["scram-pass", "md5-pass"]);
    lab.stop().await;
}

/// Sends an SSLRequest and expects the proxy's 'S'.
async fn ssl_request(tcp: &mut TcpStream) {
    let mut req = 8u32.to_be_bytes().to_vec();
    req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S', "the proxy accepts TLS");
}

fn pg_config(role: &Role, app: Option<&str>) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    // The stream handed to connect_raw is already what it will be (plain
    // TCP or TLS we set up ourselves): tokio-postgres must not negotiate.
    c.user(role.name).dbname("app").ssl_mode(SslMode::Disable);
    if let Some(p) = role.password {
        c.password(p);
    }
    if let Some(a) = app {
        c.application_name(a);
    }
    c
}

/// Runs an extended-protocol query with parameters on `client` (Parse,
/// Bind, Execute through the relay) and checks the answer.
async fn parameter_query(client: &tokio_postgres::Client, role: &Role) {
    let row = client
        .query_one(
            "select $1::int4 + 1, $2::text || '!', current_user::text, current_database()::text",
            &[&41i32, &"hello"],
        )
        .await
        .unwrap_or_else(|e| panic!("{}: query: {e}", role.name));
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hello!");
    assert_eq!(row.get::<_, String>(2), role.name);
    assert_eq!(row.get::<_, String>(3), "app");
}

/// Connects tokio-postgres over `stream`, runs the parameter query, closes
/// (Terminate), and waits for the connection task to finish.
async fn tokio_postgres_session<S>(stream: S, role: &Role, app: Option<&str>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = pg_config(role, app)
        .connect_raw(stream, NoTls)
        .await
        .unwrap_or_else(|e| panic!("{} ({app:?}): connect: {e}", role.name));
    let conn = tokio::spawn(connection);
    parameter_query(&client, role).await;
    drop(client);
    conn.await.unwrap().unwrap();
}

/// A driver outside libpq: tokio-postgres, plaintext for every role and
/// over TLS (SSLRequest and rustls done here) for the SCRAM role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_plaintext_and_tls() {
    let pki = TestPki::new();
    let lab = lab_with(&pki, &[]).await;
    let forward = lab.forward(0);

    for role in ROLES {
        let app = format!("tp-plain-{}", role.name);
        let tcp = TcpStream::connect(&forward).await.unwrap();
        tokio_postgres_session(tcp, role, Some(&app)).await;
        let s = only_session(&lab, &app).await;
        assert_eq!(event(&s, "session_end")["client_transport"], "plaintext", "{app}");
        assert_eq!(event(&s, "auth_ok")["auth_method"], role.method_plaintext, "{app}");
        assert_client_ended(event(&s, "session_end"), &app);
    }

    // TLS: the certificate is checked against the IP SAN (the client dials
    // the forward's 127.0.0.1).
    let role = &ROLES[0];
    let mut tcp = TcpStream::connect(&forward).await.unwrap();
    ssl_request(&mut tcp).await;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = pki.connector(None).connect(name, tcp).await.expect("TLS handshake with the proxy");
    tokio_postgres_session(tls, role, Some("tp-tls-role_scram")).await;
    let s = only_session(&lab, "tp-tls-role_scram").await;
    assert_eq!(event(&s, "session_end")["client_transport"], "tls");
    assert_eq!(event(&s, "auth_ok")["auth_method"], "password_relay_scram_sha_256_plus");

    // No application_name in the StartupMessage: audited as null (the only
    // such session in this lab).
    let tcp = TcpStream::connect(&forward).await.unwrap();
    tokio_postgres_session(tcp, &ROLES[2], None).await;
    let end = lab
        .wait_record("session_end without application_name", |r| {
            r["event"] == "session_end"
                && r["postgres"]["user"] == "role_trust"
                && r["postgres"]["application_name"].is_null()
        })
        .await;
    assert_eq!(end["postgres"]["protocol"], "3.0");

    assert_never_logged(&lab, &["scram-pass", "md5-pass"]);
    lab.stop().await;
}

/// Direct TLS (PostgreSQL 17+ `sslnegotiation=direct`; libpq 15 cannot, so
/// by hand): a ClientHello straight away with ALPN "postgresql" works and
/// is audited as direct_tls; without the ALPN the proxy refuses, as
/// PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let pki = TestPki::new();
    let lab = lab_with(&pki, &[]).await;
    let forward = lab.forward(0);
    let name = ServerName::try_from(PROXY_NAME).unwrap();

    let tcp = TcpStream::connect(&forward).await.unwrap();
    let tls =
        pki.connector(Some(b"postgresql")).connect(name.clone(), tcp).await.expect("direct TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"postgresql"[..]),
        "the proxy agreed on ALPN postgresql"
    );
    tokio_postgres_session(tls, &ROLES[0], Some("direct-tls")).await;
    let s = only_session(&lab, "direct-tls").await;
    assert_eq!(events(&s), ["session_start", "auth_ok", "session_end"]);
    assert_eq!(event(&s, "session_end")["client_transport"], "direct_tls");
    assert_eq!(event(&s, "auth_ok")["auth_method"], "password_relay_scram_sha_256_plus");

    // Without ALPN: the handshake may complete, but no session follows.
    let tcp = TcpStream::connect(&forward).await.unwrap();
    match pki.connector(None).connect(name, tcp).await {
        Err(e) => eprintln!("direct TLS without ALPN: handshake refused: {e}"),
        Ok(tls) => {
            assert_eq!(tls.get_ref().1.alpn_protocol(), None);
            let err = match pg_config(&ROLES[2], Some("direct-tls-no-alpn")).connect_raw(tls, NoTls).await {
                Ok(_) => panic!("a direct TLS session without ALPN \"postgresql\" was accepted"),
                Err(e) => e,
            };
            if let Some(db) = err.as_db_error() {
                assert_eq!(db.code(), &tokio_postgres::error::SqlState::PROTOCOL_VIOLATION, "{db:?}");
                assert!(db.message().contains("ALPN"), "{db:?}");
            }
        }
    }
    let denied = lab
        .wait_record("session_denied for direct TLS without ALPN", |r| {
            r["event"] == "session_denied" && r["detail"].as_str().is_some_and(|d| d.contains("ALPN"))
        })
        .await;
    assert_eq!(denied["reason"], "protocol_error");
    assert_eq!(denied["side"], "client");
    assert!(
        !lab.audit_records().iter().any(|r| r["postgres"]["application_name"] == "direct-tls-no-alpn"),
        "no session may start without ALPN"
    );
    lab.stop().await;
}

/// A wrong password fails with libpq's "password authentication failed",
/// is audited as auth_failed 28P01 followed by session_end auth_failed,
/// and never reaches a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_refused_and_never_logged() {
    let pki = TestPki::new();
    let lab = lab_with(&pki, &[]).await;
    // (role, sslmode, wrong password, expected auth_method)
    let cases = [
        ("role_scram", "require", "wrong-scram-tls-3f9c1e", "password_relay_scram_sha_256_plus"),
        ("role_scram", "disable", "wrong-scram-plain-8d2a47", "scram_sha_256"),
        ("role_md5", "require", "wrong-md5-tls-51b0c9", "md5"),
        ("role_md5", "disable", "wrong-md5-plain-e6047d", "md5"),
    ];
    for (role, sslmode, password, method) in cases {
        let app = format!("wrong-{role}-{sslmode}");
        let conn = conninfo(&lab, &pki, sslmode, &format!("user={role} application_name={app}"));
        let (ok, _, err) = psql(&conn, Some(password), "select 1").await;
        assert!(!ok, "{app}: a wrong password was accepted");
        assert!(err.contains("password authentication failed"), "{app}: {err}");

        let s = only_session(&lab, &app).await;
        assert_eq!(events(&s), ["session_start", "auth_failed", "session_end"], "{app}");
        let failed = event(&s, "auth_failed");
        assert_eq!(failed["sqlstate"], "28P01", "{app}: {failed}");
        assert_eq!(failed["auth_method"], method, "{app}: {failed}");
        let end = event(&s, "session_end");
        assert_eq!(end["reason"], "auth_failed", "{app}: {end}");
        assert_eq!(end["client_transport"], expected_transport(sslmode), "{app}: {end}");
    }
    let wrong: Vec<&str> = cases.iter().map(|c| c.2).collect();
    assert_never_logged(&lab, &wrong);
    lab.stop().await;
}

/// `--auth passthrough` keeps the proxy blind to passwords, at a price.
///
/// The trade-off (docs/postgres-protocol.md, "SCRAM channel binding through a
/// TLS-terminating proxy"): in passthrough the proxy relays the upstream's
/// SCRAM exchange, and to a TLS client it can only offer plain
/// SCRAM-SHA-256 (the client's binding to the proxy's certificate could
/// never match the upstream's). libpq's default `channel_binding=prefer`
/// then sends gs2 flag `y` ("I could bind, you don't seem to"), the
/// upstream, which can bind, refuses it as a downgrade, and the flag is
/// inside the signed proof, so no proxy can rewrite it. TLS clients must
/// therefore set `channel_binding=disable` (plaintext clients and MD5/trust
/// roles are unaffected). The default password relay avoids that by
/// seeing the password, inside TLS inside WireGuard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_needs_channel_binding_disable_over_tls() {
    let pki = TestPki::new();
    let lab = lab_with(&pki, &["--auth=passthrough"]).await;

    // (sslmode, channel_binding, role, succeeds, expected auth_method)
    let cases = [
        ("require", "disable", "role_scram", true, "scram_sha_256"),
        ("verify-full", "disable", "role_scram", true, "scram_sha_256"),
        ("disable", "prefer", "role_scram", true, "scram_sha_256"),
        ("require", "prefer", "role_md5", true, "md5"),
        ("require", "prefer", "role_scram", false, "scram_sha_256"),
    ];
    for (sslmode, cb, role, succeeds, method) in cases {
        let app = format!("pt-{sslmode}-cb_{cb}-{role}");
        let r = ROLES.iter().find(|r| r.name == role).unwrap();
        let conn = conninfo(
            &lab,
            &pki,
            sslmode,
            &format!("user={role} channel_binding={cb} application_name={app}"),
        );
        let (ok, out, err) = psql(&conn, r.password, "select current_user").await;
        let s = only_session(&lab, &app).await;
        let end = event(&s, "session_end");
        assert_eq!(end["client_transport"], expected_transport(sslmode), "{app}: {end}");
        if succeeds {
            assert!(ok, "{app}: {err}");
            assert_eq!(out.trim(), role);
            assert_eq!(event(&s, "auth_ok")["auth_method"], method, "{app}");
        } else {
            assert!(!ok, "{app}: channel_binding=prefer over TLS worked in passthrough");
            assert!(err.contains("channel binding"), "{app}: libpq should blame channel binding: {err}");
            assert_eq!(events(&s), ["session_start", "auth_failed", "session_end"], "{app}");
            assert_eq!(event(&s, "auth_failed")["auth_method"], method, "{app}");
            assert_eq!(end["reason"], "auth_failed", "{app}: {end}");
        }
    }
    assert_never_logged(&lab, &["scram-pass", "md5-pass"]);
    lab.stop().await;
}
