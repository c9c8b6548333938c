//! The upstream leg (src/upstream.rs) and the SCRAM client (src/scram.rs)
//! against a real PostgreSQL 15 with a throwaway CA made by the openssl CLI,
//! plus small fake servers for the answers a real one never gives.
//!
//! These start servers, so they refuse to run outside a network namespace
//! that holds only `lo`: run them with scripts/test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tailgres::pgwire::SSL_REQUEST_PACKET as SSL_REQUEST;
use tailgres::scram::{self, ScramClient, AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL};
use tailgres::upstream::{Phase, Side, Upstream, UpstreamError, UpstreamOptions, UpstreamTls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Contains U+2168 (ROMAN NUMERAL NINE), which SASLprep turns into "IX": the
/// login only works if both sides normalise alike.
const ALICE_PASSWORD: &str = "correct horse \u{2168} battery";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn require_loopback_only() {
    let dev = std::fs::read_to_string("/proc/self/net/dev").expect("read /proc/self/net/dev");
    let ifaces: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert!(
        ifaces.iter().all(|i| *i == "lo"),
        "these tests start servers and must run in a network namespace with only `lo` (found {ifaces:?}); run with scripts/test"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    run(Command::new("openssl").current_dir(dir).args(args))
}

const EC_P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
const RSA_2048: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
const ED25519: &[&str] = &["-algorithm", "ED25519"];

/// A throwaway CA (openssl CLI) issuing server and client certificates.
struct Pki {
    dir: PathBuf,
    /// Signature options for `openssl ca` (they decide the certificates'
    /// signature algorithm, and so the channel binding hash).
    sign: Vec<String>,
}

impl Pki {
    fn new(dir: &Path, ca_key: &[&str], sign: &[&str]) -> Pki {
        let conf = "[ca]\ndefault_ca = test_ca\n\
            [test_ca]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\n\
            policy = policy_any\nunique_subject = no\n\
            [policy_any]\ncommonName = supplied\n\
            [server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
            extendedKeyUsage = serverAuth\nsubjectAltName = DNS:db.test,IP:127.0.0.1\n\
            [client]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
            extendedKeyUsage = clientAuth\n";
        std::fs::write(dir.join("ca.cnf"), conf).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        openssl(dir, &[&["genpkey"], ca_key, &["-out", "ca.key"]].concat());
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=tailgres test CA",
                "-days",
                "30",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
                "-out",
                "ca.pem",
            ],
        );
        Pki { dir: dir.to_path_buf(), sign: sign.iter().map(|s| s.to_string()).collect() }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues `<name>.pem` / `<name>.key` with extension section `ext`;
    /// `validity` is openssl ca's ["-days", "30"] or ["-startdate", .., "-enddate", ..].
    fn issue(&self, name: &str, cn: &str, ext: &str, validity: &[&str]) -> (PathBuf, PathBuf) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(
            &self.dir,
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key],
        );
        openssl(&self.dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={cn}"), "-out", &csr]);
        let mut args = vec![
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-notext",
            "-extensions",
            ext,
            "-in",
            &csr,
            "-out",
            &pem,
        ];
        args.extend_from_slice(validity);
        args.extend(self.sign.iter().map(String::as_str));
        openssl(&self.dir, &args);
        (self.dir.join(pem), self.dir.join(key))
    }
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root
/// (setpriv execs, so the child's pid is the server's own).
fn pg_command(bin: &str) -> Command {
    let bin = format!("{PG_BIN}/{bin}");
    assert!(Path::new(&bin).exists(), "{bin} is missing: apt-get install postgresql-15");
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--", &bin]);
        c
    } else {
        Command::new(bin)
    }
}

/// A scratch directory with a CA, server certificates and an initdb'd
/// cluster whose superuser `alice` has ALICE_PASSWORD.
struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
}

impl Lab {
    fn new() -> Lab {
        require_loopback_only();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new(&dir, EC_P256, &[]);
        pki.issue("server", "db.test", "server", &["-days", "30"]);
        pki.issue(
            "expired",
            "db.test",
            "server",
            &["-startdate", "20200101000000Z", "-enddate", "20210101000000Z"],
        );
        pki.issue("bob", "bob", "client", &["-days", "30"]);
        std::fs::write(dir.join("pwfile"), format!("{ALICE_PASSWORD}\n")).unwrap();
        // Only TLS, only SCRAM; bob must also show a client certificate.
        std::fs::write(
            dir.join("pg_hba.conf"),
            "hostssl all bob 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        hand_to_postgres(&dir, &["server.key", "expired.key"]);
        run(pg_command("initdb")
            .args(["-U", "alice", "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--pwfile"])
            .arg(dir.join("pwfile"))
            .arg("-D")
            .arg(dir.join("data")));
        Lab { _tmp: tmp, dir, pki }
    }

    /// Another CA, in `sub`, with a server certificate `server.pem`.
    fn pki_in(&self, sub: &str, ca_key: &[&str], sign: &[&str]) -> Pki {
        let dir = self.dir.join(sub);
        std::fs::create_dir(&dir).unwrap();
        let pki = Pki::new(&dir, ca_key, sign);
        pki.issue("server", "db.test", "server", &["-days", "30"]);
        hand_to_postgres(&dir, &["server.key"]);
        pki
    }

    /// Starts the cluster with ssl on (CA `pki`, certificate `<name>.pem`) or off.
    async fn start(&self, ssl: Option<(&Pki, &str)>) -> Postgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            "unix_socket_directories=".into(),
            format!("hba_file={}", d("pg_hba.conf")),
            "log_connections=on".into(),
        ];
        match ssl {
            Some((pki, name)) => settings.extend([
                "ssl=on".into(),
                format!("ssl_cert_file={}", pki.dir.join(format!("{name}.pem")).display()),
                format!("ssl_key_file={}", pki.dir.join(format!("{name}.key")).display()),
                format!("ssl_ca_file={}", pki.ca().display()),
            ]),
            None => settings.push("ssl=off".into()),
        }
        let log = self.dir.join(format!("postgres-{port}.log"));
        let mut cmd = pg_command("postgres");
        cmd.arg("-D").arg(self.dir.join("data"));
        for s in &settings {
            cmd.arg("-c").arg(s);
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let mut pg = Postgres { child: child.spawn().expect("start postgres"), port, log };
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = pg.child.try_wait().unwrap() {
                panic!("postgres exited ({status}):\n{}", pg.log_text());
            }
            let ready = tokio::process::Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-t", "2", "-p", &port.to_string()])
                .status()
                .await
                .unwrap();
            if ready.success() {
                return pg;
            }
            assert!(tokio::time::Instant::now() < deadline, "postgres not ready in time:\n{}", pg.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// PostgreSQL wants its key files private and its own.
fn hand_to_postgres(dir: &Path, keys: &[&str]) {
    if is_root() {
        run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir));
    }
    for key in keys {
        run(Command::new("chmod").arg("600").arg(dir.join(key)));
    }
}

struct Postgres {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Postgres {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown, so no backend outlives the test.
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn options(addr: &str, server_name: Option<&str>, ca: Option<&Path>) -> UpstreamOptions {
    UpstreamOptions {
        addr: addr.to_string(),
        server_name: server_name.map(str::to_string),
        ca: ca.map(|c| vec![c.to_path_buf()]).unwrap_or_default(),
        client_cert: None,
        client_key: None,
        direct_tls: false,
        connect_timeout: Duration::from_secs(10),
    }
}

async fn connect(o: &UpstreamOptions) -> Result<Upstream, UpstreamError> {
    UpstreamTls::new(o).expect("valid options").connect().await
}

async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.expect("read message header");
    let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.expect("read message body");
    (head[0], body)
}

/// "SQLSTATE message" from an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let field = |code: u8| {
        body.split(|b| *b == 0)
            .find(|f| f.first() == Some(&code))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    format!("{} {}", field(b'C'), field(b'M'))
}

async fn send(up: &mut Upstream, msg: &[u8]) {
    up.stream.write_all(msg).await.unwrap();
    up.stream.flush().await.unwrap();
}

/// StartupMessage, then SCRAM through ScramClient; Ok(mechanism) at
/// ReadyForQuery, Err("SQLSTATE message") on an ErrorResponse.
async fn login(
    up: &mut Upstream,
    user: &str,
    password: &str,
    binding: Option<&[u8]>,
) -> Result<&'static str, String> {
    let mut buf = BytesMut::new();
    frontend::startup_message([("user", user), ("database", "postgres")], &mut buf).unwrap();
    send(up, &buf).await;
    let mut client: Option<ScramClient> = None;
    loop {
        let (kind, body) = read_msg(&mut up.stream).await;
        match kind {
            b'E' => return Err(error_text(&body)),
            b'R' => {
                let data = &body[4..];
                match i32::from_be_bytes(body[..4].try_into().unwrap()) {
                    AUTH_SASL => {
                        let offered = scram::parse_mechanisms(data).unwrap();
                        assert_eq!(
                            offered,
                            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
                            "a TLS server offers PLUS"
                        );
                        let c = ScramClient::new(password.as_bytes(), &offered, binding).unwrap();
                        send(up, &c.initial_response()).await;
                        client = Some(c);
                    }
                    AUTH_SASL_CONTINUE => {
                        let client_final = client.as_mut().unwrap().handle_server_first(data).unwrap();
                        send(up, &scram::sasl_response(&client_final)).await;
                    }
                    AUTH_SASL_FINAL => client.as_mut().unwrap().verify_server_final(data).unwrap(),
                    AUTH_OK => {}
                    other => panic!("unexpected authentication request {other}"),
                }
            }
            b'Z' => return Ok(client.expect("SCRAM was used").mechanism()),
            _ => {} // ParameterStatus, BackendKeyData, notices
        }
    }
}

/// One simple query; the first column of each row.
async fn query(up: &mut Upstream, sql: &str) -> Result<Vec<String>, String> {
    send(up, &[&b"Q"[..], &((4 + sql.len() + 1) as u32).to_be_bytes(), sql.as_bytes(), b"\0"].concat()).await;
    let (mut rows, mut err) = (vec![], None);
    loop {
        match read_msg(&mut up.stream).await {
            (b'D', body) => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                rows.push(if len < 0 {
                    "NULL".into()
                } else {
                    String::from_utf8_lossy(&body[6..6 + len as usize]).into()
                });
            }
            (b'E', body) => err = Some(error_text(&body)),
            (b'Z', _) => return err.map_or(Ok(rows), Err),
            _ => {}
        }
    }
}

fn fingerprint(cert: &Path) -> String {
    let out = openssl(
        Path::new("."),
        &["x509", "-noout", "-fingerprint", "-sha256", "-in", cert.to_str().unwrap()],
    );
    out.trim().rsplit('=').next().unwrap().replace(':', "").to_lowercase()
}

#[tokio::test]
async fn verified_tls_and_scram_plus_login() {
    let lab = Lab::new();
    let pg = lab.start(Some((&lab.pki, "server"))).await;
    let ca = lab.pki.ca();

    let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&ca))).await.expect("verified TLS");
    assert_eq!(up.facts.tls_version, tailgres::audit::TlsVersion::Tls13);
    assert_eq!(up.facts.address, pg.addr());
    assert_eq!(up.facts.server_name, "db.test");
    assert!(up.facts.cipher.starts_with("TLS13_"), "{}", up.facts.cipher);
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(&up.facts.cert_sha256), fingerprint(&lab.dir.join("server.pem")));
    assert!(
        up.facts.cert_not_after.is_some_and(|t| t > std::time::SystemTime::now()),
        "{:?}",
        up.facts.cert_not_after
    );
    // ecdsa-with-SHA256: the binding data is the SHA-256 of the certificate.
    let binding = up.channel_binding.clone().expect("tls-server-end-point data");
    assert_eq!(binding, up.facts.cert_sha256);
    let json = serde_json::to_value(&up.facts).unwrap();
    assert_eq!(json["tls_version"], "TLSv1.3");
    assert_eq!(json["cert_sha256"], fingerprint(&lab.dir.join("server.pem")));
    assert!(json["cert_not_after"].as_str().is_some_and(|t| t.ends_with('Z')), "{json}");

    // SCRAM-SHA-256-PLUS: PostgreSQL checks the binding data against its own
    // certificate, so success means the binding was accepted.
    assert_eq!(login(&mut up, "alice", ALICE_PASSWORD, Some(&binding)).await, Ok("SCRAM-SHA-256-PLUS"));
    assert_eq!(
        query(&mut up, "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await,
        Ok(vec!["true".into()])
    );
    query(&mut up, "CREATE ROLE bob LOGIN PASSWORD 'bob-password'").await.unwrap();

    // ... and wrong binding data is refused by the server.
    let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&ca))).await.unwrap();
    let err = login(&mut up, "alice", ALICE_PASSWORD, Some(&[0u8; 32])).await.unwrap_err();
    assert!(err.contains("channel binding"), "{err}");

    // Without binding data: SCRAM-SHA-256 with gs2 flag `n` is accepted.
    let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&ca))).await.unwrap();
    assert_eq!(login(&mut up, "alice", ALICE_PASSWORD, None).await, Ok("SCRAM-SHA-256"));

    // A wrong password fails at the server, with its usual SQLSTATE.
    let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&ca))).await.unwrap();
    let b = up.channel_binding.clone();
    let err = login(&mut up, "alice", "not the password", b.as_deref()).await.unwrap_err();
    assert!(err.starts_with("28P01"), "{err}");

    // The server name defaults to the host of the address: the IP SAN matches.
    let up = connect(&options(&pg.addr(), None, Some(&ca))).await.expect("IP SAN");
    assert_eq!(up.facts.server_name, "127.0.0.1");

    // Wrong name.
    match connect(&options(&pg.addr(), Some("other.test"), Some(&ca))).await {
        Err(e @ UpstreamError::NameMismatch { .. }) => {
            let UpstreamError::NameMismatch { ref expected, ref presented, .. } = e else { unreachable!() };
            assert_eq!(expected, "other.test");
            assert!(presented.iter().any(|p| p.contains("db.test")), "{presented:?}");
            assert_eq!((e.side(), e.reason_code()), (Side::Upstream, "upstream_name_mismatch"));
        }
        other => panic!("expected NameMismatch, got {other:?}"),
    }
    // No CA: the Mozilla roots do not know our test CA.
    match connect(&options(&pg.addr(), Some("db.test"), None)).await {
        Err(e @ UpstreamError::UntrustedCertificate { mozilla_roots: true, .. }) => {
            assert_eq!(e.reason_code(), "upstream_untrusted_certificate");
            assert!(!e.client_message().contains("127.0.0.1"));
        }
        other => panic!("expected UntrustedCertificate, got {other:?}"),
    }

    // mTLS: bob's hba line demands a client certificate whose CN is "bob".
    let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&ca))).await.unwrap();
    let b = up.channel_binding.clone();
    let err = login(&mut up, "bob", "bob-password", b.as_deref()).await.unwrap_err();
    assert!(err.starts_with("28000"), "{err}");
    let mut o = options(&pg.addr(), Some("db.test"), Some(&ca));
    o.client_cert = Some(lab.dir.join("bob.pem"));
    o.client_key = Some(lab.dir.join("bob.key"));
    let tls = UpstreamTls::new(&o).unwrap();
    let mut up = tls.connect().await.unwrap();
    let b = up.channel_binding.clone();
    assert_eq!(login(&mut up, "bob", "bob-password", b.as_deref()).await, Ok("SCRAM-SHA-256-PLUS"));
}

/// The tls-server-end-point hash follows the certificate's signature
/// algorithm; PostgreSQL (through OpenSSL) must agree, or PLUS fails. With no
/// single hash (Ed25519) there is no binding data and SCRAM uses gs2 `n`.
#[tokio::test]
async fn channel_binding_follows_the_signature_algorithm() {
    /// (name, CA key, `openssl ca` signing options, binding data length)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], Option<usize>);
    let lab = Lab::new();
    let pss = ["-md", "sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"];
    let cases: [Case; 3] = [
        ("ecdsa-sha384", EC_P256, &["-md", "sha384"], Some(48)),
        ("rsa-pss-sha256", RSA_2048, &pss, Some(32)),
        ("ed25519", ED25519, &["-md", "default"], None),
    ];
    for (name, ca_key, sign, binding_len) in cases {
        let pki = lab.pki_in(name, ca_key, sign);
        let pg = lab.start(Some((&pki, "server"))).await;
        let mut up = connect(&options(&pg.addr(), Some("db.test"), Some(&pki.ca()))).await.unwrap();
        assert_eq!(up.channel_binding.as_ref().map(Vec::len), binding_len, "{name}");
        let b = up.channel_binding.clone();
        let want = if binding_len.is_some() { "SCRAM-SHA-256-PLUS" } else { "SCRAM-SHA-256" };
        assert_eq!(
            login(&mut up, "alice", ALICE_PASSWORD, b.as_deref()).await,
            Ok(want),
            "{name}:\n{}",
            pg.log_text()
        );
    }
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let lab = Lab::new();
    let pg = lab.start(Some((&lab.pki, "expired"))).await;
    match connect(&options(&pg.addr(), Some("db.test"), Some(&lab.pki.ca()))).await {
        Err(e @ UpstreamError::Expired { .. }) => {
            let UpstreamError::Expired { ref not_after, .. } = e else { unreachable!() };
            assert_eq!(not_after.as_deref(), Some("2021-01-01T00:00:00Z"));
            assert_eq!(e.reason_code(), "upstream_certificate_expired");
        }
        other => panic!("expected Expired, got {other:?}"),
    }
}

#[tokio::test]
async fn server_without_tls_is_refused() {
    let lab = Lab::new();
    let pg = lab.start(None).await;
    match connect(&options(&pg.addr(), Some("db.test"), Some(&lab.pki.ca()))).await {
        Err(e @ UpstreamError::ServerRefusedTls { .. }) => {
            assert_eq!(e.reason_code(), "upstream_no_tls");
            assert!(
                e.to_string().contains("does not offer TLS; tailgres only connects with verified TLS"),
                "{e}"
            );
        }
        other => panic!("expected ServerRefusedTls, got {other:?}"),
    }
}

/// A one-connection server: checks the SSLRequest, then sends `answer` and
/// holds the socket open until the client goes away.
async fn fake_server(answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = [0u8; 8];
        s.read_exact(&mut req).await.unwrap();
        assert_eq!(req, SSL_REQUEST);
        s.write_all(answer).await.unwrap();
        let mut sink = vec![0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    addr
}

#[tokio::test]
async fn answers_a_real_server_never_gives() {
    require_loopback_only();
    let o = |addr: &str| UpstreamOptions {
        connect_timeout: Duration::from_millis(500),
        ..options(addr, Some("db.test"), None)
    };

    let e = connect(&o(&fake_server(b"EFATAL: sorry, too many clients already\0").await)).await.unwrap_err();
    assert!(matches!(e, UpstreamError::ServerErrorBeforeTls { .. }), "{e:?}");
    assert!(!e.to_string().contains("too many"), "the server's text is never shown: {e}");
    let e = connect(&o(&fake_server(b"X").await)).await.unwrap_err();
    assert!(matches!(e, UpstreamError::UnexpectedSslResponse { byte: b'X', .. }), "{e:?}");
    // CVE-2021-23222: plaintext injected after 'S' goes to rustls, which
    // rejects it as a malformed handshake; it is never taken as data.
    let e = connect(&o(&fake_server(b"SR\0\0\0\x08\0\0\0\0").await)).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Tls { .. }), "{e:?}");
    // A server that never answers.
    let e = connect(&o(&fake_server(b"").await)).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Timeout { phase: Phase::SslRequest, .. }), "{e:?}");
    assert_eq!(e.reason_code(), "upstream_timeout");
    // Nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let e = connect(&o(&closed)).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Unreachable { .. }), "{e:?}");
    assert_eq!((e.side(), e.reason_code()), (Side::Upstream, "upstream_unreachable"));
}

/// Direct TLS (PostgreSQL 17 style) against a rustls server with our test CA:
/// no SSLRequest, ALPN "postgresql" required, and TLS sessions resumed
/// across connections made from one `UpstreamTls`.
#[tokio::test]
async fn direct_tls_alpn_and_resumption() {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    require_loopback_only();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), EC_P256, &[]);
    let (cert, key) = pki.issue("server", "db.test", "server", &["-days", "30"]);
    for alpn in [true, false] {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from_pem_file(&cert).unwrap()],
                    PrivateKeyDer::from_pem_file(&key).unwrap(),
                )
                .unwrap();
        if alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns = if alpn { 2 } else { 1 };
        let server = tokio::spawn(async move {
            for _ in 0..conns {
                let (s, _) = listener.accept().await.unwrap();
                let mut first = [0u8; 1];
                s.peek(&mut first).await.unwrap();
                assert_eq!(first[0], 0x16, "a TLS ClientHello, not an SSLRequest");
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.shutdown().await;
                }
            }
        });
        let mut o = options(&addr, Some("db.test"), Some(&pki.ca()));
        o.direct_tls = true;
        let tls = UpstreamTls::new(&o).unwrap();
        match (alpn, tls.connect().await) {
            (true, Ok(mut up)) => {
                assert_eq!(up.stream.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
                // Reading to the server's close takes in its session ticket;
                // the next session from the same (shared) config resumes.
                let _ = up.stream.read_to_end(&mut vec![]).await;
                let again = tls.connect().await.unwrap();
                assert_eq!(again.stream.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
            }
            (false, Err(e @ UpstreamError::AlpnMissing { .. })) => {
                assert_eq!(e.reason_code(), "upstream_alpn")
            }
            (_, other) => panic!("alpn={alpn}: {other:?}"),
        }
        server.await.unwrap();
    }
}
