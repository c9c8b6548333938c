//! `--auth scram-verifier`: strict clients log in through the tailnet
//! without the proxy ever seeing a password. The lab's PostgreSQL (TLS
//! only, scram-sha-256 and md5 roles) has the README's lookup role and
//! function; tailgres looks verifiers up as that role, authenticates the
//! client with SCRAM-SHA-256-PLUS bound to its own certificate, and logs in
//! with SCRAM-SHA-256-PLUS bound to the database's.
//!
//! Shown here: psql with `channel_binding=require` (and libpq's defaults,
//! plaintext, md5); psycopg (libpq 18) with `require_auth=scram-sha-256`
//! and `channel_binding=require`; pgx and pgJDBC with channel binding
//! required; tokio-postgres with `ChannelBinding::Require`; a client bound
//! to another certificate (a man in the middle's) refused; a wrong
//! password refused by the proxy with no login at the database; a changed
//! password working at the next login; and the proxy's memory holding
//! neither password (a scan of /proc/PID/mem that does find the lookup
//! role's password, which it must hold).
mod common;
use common::clients::{built_checks, run_check, script};
use common::lab::{psql, LabOptions, LabUp};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const ROLE: &str = "role_scram";
const PASSWORD: &str = "scram-pass";
/// The lab's lookup role password (tailgres-lab's VERIFIER_PASSWORD).
const LOOKUP_PASSWORD: &str = "lookup-pass";

fn conn(lab: &LabUp, user: &str, options: &str, app: &str) -> String {
    let (h, p) = lab.forward_host_port(0);
    format!("host={h} port={p} user={user} dbname=app {options} application_name={app}")
}

async fn auth_record(lab: &LabUp, event: &str, app: &str) -> Value {
    lab.wait_record(&format!("{app} {event}"), |r| {
        r["event"] == event && r["postgres"]["application_name"] == app
    })
    .await
}

/// How many lines of the database's log say `connection authorized` for
/// `user` (the lab database runs with log_connections).
fn db_logins(lab: &LabUp, user: &str) -> usize {
    let log = std::fs::read_to_string(lab.upstream_log()).unwrap();
    let needle = format!("connection authorized: user={user} ");
    log.lines().filter(|l| l.contains(&needle)).count()
}

/// How many lookups for `role` the database ran: its log, with
/// `log_statement = 'all'`, has each lookup's bound parameter.
fn db_lookups(lab: &LabUp, role: &str) -> usize {
    let log = std::fs::read_to_string(lab.upstream_log()).unwrap();
    let needle = format!("parameters: $1 = '{role}'");
    log.lines().filter(|l| l.contains(&needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_clients_log_in_and_no_password_reaches_the_proxy() {
    let lab =
        LabUp::start(LabOptions { log_connections: true, scram_verifier: true, ..Default::default() }).await;
    // The database logs every statement, the lookups' included (the marker
    // role's below come long after its lookup connection has reloaded).
    lab.psql_admin("ALTER SYSTEM SET log_statement = 'all'").await;
    lab.psql_admin("SELECT pg_reload_conf()").await;

    // psql: channel binding required, libpq's defaults, plaintext.
    let cases = [
        ("sslmode=require channel_binding=require", "psql-cb-require", true),
        ("", "psql-defaults", true),
        ("sslmode=disable", "psql-plaintext", false),
    ];
    for (options, app, tls) in cases {
        let (ok, out, err) =
            psql(&conn(&lab, ROLE, options, app), Some(PASSWORD), "select current_user").await;
        assert!(ok && out.trim() == ROLE, "{app}: {err}\n{}", lab.log_tails(20));
        let auth = auth_record(&lab, "auth_ok", app).await;
        assert_eq!(auth["auth_method"], "scram_verifier", "{app}: {auth}");
        assert_eq!(auth["client_transport"] != "plaintext", tls, "{app}: {auth}");
    }
    // An MD5 role: its stored hash answers both ways.
    let (ok, _, err) =
        psql(&conn(&lab, "role_md5", "sslmode=require", "psql-md5"), Some("md5-pass"), "select 1").await;
    assert!(ok, "md5 role: {err}");
    assert_eq!(auth_record(&lab, "auth_ok", "psql-md5").await["auth_method"], "md5_verifier");

    // The drivers, each insisting on channel binding (and psycopg's libpq
    // 18 on SCRAM itself).
    let (host, port) = lab.forward_host_port(0);
    let port = port.to_string();
    let (pgx, classpath) = built_checks();
    let nv = "org.postgresql.ssl.NonValidatingFactory";
    let runs: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "python3".into(),
                script("psycopg_check.py").display().to_string(),
                host.clone(),
                port.clone(),
                "require".into(),
            ],
            "require_auth=scram-sha-256 channel_binding=require",
            "psycopg-blocking-require",
        ),
        (
            vec![pgx.display().to_string(), host.clone(), port.clone(), "require".into()],
            "channel_binding=require",
            "pgx-require",
        ),
        (
            vec![
                "java".into(),
                "-cp".into(),
                classpath.clone(),
                "JdbcCheck".into(),
                host.clone(),
                port.clone(),
                "require".into(),
                nv.into(),
            ],
            "channelBinding=require",
            "pgjdbc-require",
        ),
    ];
    for (argv, options, app) in &runs {
        let what = format!("{} {options}", argv[1..].join(" "));
        let env = [("CHECK_USER", ROLE), ("CHECK_PASSWORD", PASSWORD), ("CHECK_OPTIONS", options)];
        let r = run_check(argv, &env, || lab.log_tails(20)).await;
        // pgx and pgJDBC answer a query; psycopg reports its two cancels.
        assert!(r["answer"] == 42 || r["blocking"]["query"] == "canceled", "{what}: {r}");
        let auth = auth_record(&lab, "auth_ok", app).await;
        assert_eq!(auth["auth_method"], "scram_verifier", "{what}: {auth}");
    }

    // tokio-postgres with ChannelBinding::Require; then a client whose TLS
    // reports another certificate's binding (what a man in the middle's
    // client leg would give): refused by the proxy.
    tokio_postgres_require(&lab, false).await.expect("tokio-postgres with channel binding required");
    assert_eq!(auth_record(&lab, "auth_ok", "tokio-postgres-cb").await["auth_method"], "scram_verifier");
    let e = tokio_postgres_require(&lab, true).await.expect_err("bound to another certificate");
    assert_eq!(e.code().map(|c| c.code()), Some("08P01"), "{e}");
    let denied = auth_record(&lab, "session_denied", "tokio-postgres-mitm").await;
    assert_eq!(denied["reason"], "protocol_error", "{denied}");
    assert!(denied["detail"].as_str().unwrap().contains("channel binding"), "{denied}");
    assert!(denied["upstream"].is_null(), "{denied}");

    // A role of its own, with a marker password set straight at the
    // database (never through the proxy).
    let first = format!("tg-marker-{:016x}", rand::random::<u64>());
    let second = format!("tg-marker-{:016x}", rand::random::<u64>());
    lab.psql_admin(&format!("CREATE ROLE role_marker LOGIN PASSWORD '{first}'")).await;
    let login = |password: String, app: &'static str| {
        let c = conn(&lab, "role_marker", "sslmode=require channel_binding=require", app);
        async move { psql(&c, Some(&password), "select current_user").await }
    };
    let (ok, _, err) = login(first.clone(), "marker-1").await;
    assert!(ok, "marker login: {err}");
    let (lookups, logins) = (db_lookups(&lab, "role_marker"), db_logins(&lab, "role_marker"));
    assert_eq!(
        (lookups, logins),
        (1, 1),
        "one lookup, one login at the database:\n{}",
        std::fs::read_to_string(lab.upstream_log())
            .unwrap()
            .lines()
            .filter(|l| l.contains("verifier") || l.contains("marker"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A wrong password, the verifier cached: refused by the proxy, with no
    // round trip to the database (neither a lookup nor a login).
    let (ok, _, err) = login("wrong-password".into(), "marker-wrong").await;
    assert!(!ok && err.contains("password authentication failed for user \"role_marker\""), "{err}");
    let denied = auth_record(&lab, "session_denied", "marker-wrong").await;
    assert_eq!(
        (denied["reason"].as_str(), denied["side"].as_str()),
        (Some("password_failed"), Some("client"))
    );
    let failed = auth_record(&lab, "auth_failed", "marker-wrong").await;
    assert_eq!(failed["sqlstate"], "28P01", "{failed}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (db_lookups(&lab, "role_marker"), db_logins(&lab, "role_marker")),
        (1, 1),
        "the wrong password reached the database"
    );

    // The password changes at the database: the next login looks the
    // verifier up again and gets in with the new one.
    lab.psql_admin(&format!("ALTER ROLE role_marker PASSWORD '{second}'")).await;
    let (ok, _, err) = login(second.clone(), "marker-2").await;
    assert!(ok, "the changed password: {err}\n{}", lab.log_tails(20));
    assert_eq!(db_lookups(&lab, "role_marker"), 2, "looked up again");
    assert_eq!(db_logins(&lab, "tailgres_auth"), 1, "every lookup on the one lookup connection");

    // Neither password is anywhere in the proxy's memory; the lookup
    // role's, which it holds to look verifiers up, is (the scan works).
    let pid = lab.info["proxy"]["pid"].as_u64().expect("the proxy's pid") as u32;
    let found = scan_memory(pid, &[first.as_bytes(), second.as_bytes(), LOOKUP_PASSWORD.as_bytes()]);
    assert!(found[2] > 0, "the scan did not find the lookup password the proxy must hold");
    assert_eq!((found[0], found[1]), (0, 0), "a client's password is in the proxy's memory");

    let records = lab.audit_records();
    assert!(
        records
            .iter()
            .filter(|r| r["event"] == "auth_ok")
            .all(|r| { matches!(r["auth_method"].as_str(), Some("scram_verifier" | "md5_verifier")) }),
        "{records:#?}"
    );
    lab.stop().await;
}

/// Counts the occurrences of each needle in every readable mapping of the
/// process (as root: /proc/PID/mem needs ptrace access).
fn scan_memory(pid: u32, needles: &[&[u8]]) -> Vec<usize> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("read the proxy's memory (root)");
    let mut found = vec![0; needles.len()];
    let mut scanned = 0usize;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else { continue };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        scanned += buf.len();
        for (i, n) in needles.iter().enumerate() {
            found[i] += buf.windows(n.len()).filter(|w| w == n).count();
        }
    }
    assert!(scanned > 1 << 20, "only {scanned} bytes of the proxy's memory were readable");
    found
}

/// tokio-postgres over rustls, `ChannelBinding::Require`. With `mitm`, the
/// stream reports binding data of another certificate.
async fn tokio_postgres_require(lab: &LabUp, mitm: bool) -> Result<(), tokio_postgres::Error> {
    let (host, port) = lab.forward_host_port(0);
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&host)
        .port(port)
        .user(ROLE)
        .password(PASSWORD)
        .dbname("app")
        .application_name(if mitm { "tokio-postgres-mitm" } else { "tokio-postgres-cb" })
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .channel_binding(tokio_postgres::config::ChannelBinding::Require);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.unwrap();
    let (client, conn) = cfg.connect_raw(tcp, tls::Rustls { mitm }).await?;
    let task = tokio::spawn(conn);
    let row = client.query_one("select 41 + 1", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    let _ = task.await;
    Ok(())
}

/// A tokio-postgres TLS connector over rustls that reports
/// tls-server-end-point binding data (as tokio-postgres-rustls does). The
/// lab proxy's certificate is self-signed: it is not verified here, which
/// is what `sslmode=require` means; the binding is what proves the client
/// reached tailgres.
mod tls {
    use super::Arc;
    use rustls::pki_types::ServerName;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

    pub struct Rustls {
        pub mitm: bool,
    }

    pub struct Stream {
        inner: tokio_rustls::client::TlsStream<TcpStream>,
        mitm: bool,
    }

    impl TlsConnect<TcpStream> for Rustls {
        type Stream = Stream;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream>> + Send>>;

        fn connect(self, tcp: TcpStream) -> Self::Future {
            Box::pin(async move {
                let mut config = crate::common::wire::any_server_cert();
                config.alpn_protocols = vec![b"postgresql".to_vec()];
                let name = ServerName::try_from("tailgres.lab").unwrap();
                let inner = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
                Ok(Stream { inner, mitm: self.mitm })
            })
        }
    }

    impl TlsStream for Stream {
        fn channel_binding(&self) -> ChannelBinding {
            if self.mitm {
                return ChannelBinding::tls_server_end_point(vec![0x5a; 32]);
            }
            let cert = self.inner.get_ref().1.peer_certificates().and_then(|c| c.first()).unwrap();
            match tailgres::scram::tls_server_end_point(cert) {
                Some(data) => ChannelBinding::tls_server_end_point(data),
                None => ChannelBinding::none(),
            }
        }
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Stream {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }
}

/// README gives exactly the SQL the lab's database runs
/// (docs/verifier-lookup.sql), so what a reader pastes is what is tested.
#[test]
fn readme_gives_the_lookup_sql_the_lab_runs() {
    let readme = include_str!("../README.md");
    let sql = include_str!("../docs/verifier-lookup.sql");
    let block: String =
        sql.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("    {l}\n") }).collect();
    assert!(readme.contains(&block), "README's lookup SQL differs from docs/verifier-lookup.sql");
}
