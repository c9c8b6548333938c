//! The in-process world: tailgres's real accept loop, sessions, revocation
//! follower and audit writer, over the in-memory tailnet
//! (`tailnet::memory`), against a scripted TLS database on loopback with
//! certificates from a throwaway CA. No network namespace, no Go, no
//! PostgreSQL: each test runs in milliseconds to a few seconds.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tailgres::audit::{AuditDest, AuditLog};
use tailgres::authenticate::AuthMode;
use tailgres::authorize::{Policy, DEFAULT_CAPABILITY};
use tailgres::context::Shared;
use tailgres::identity_login::{IdentityCa, DEFAULT_VALIDITY};
use tailgres::lookup::{LookupConfig, VerifierSource};
use tailgres::metrics::{Metrics, TailnetGauge};
use tailgres::pgwire;
use tailgres::server::{self, ServeOptions};
use tailgres::settings::{Login, Route, Settings, SettingsCell};
use tailgres::tailnet::memory::MemoryTailnet;
use tailgres::tailnet::{PeerIdentity, Tailnet};
use tailgres::upstream::{UpstreamOptions, UpstreamTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

pub const PORT: u16 = 5432;
pub const DB_NAME: &str = "db.test";

/// How long a test waits for something that should take milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---- certificates ----

pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        Ca::with_params(name, |_| {})
    }

    /// A CA whose own validity ends `left` from now.
    pub fn expiring(name: &str, left: Duration) -> Ca {
        Ca::with_params(name, |p| {
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::days(1);
            p.not_after = now + left;
        })
    }

    fn with_params(name: &str, f: impl FnOnce(&mut CertificateParams)) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        f(&mut params);
        let cert = params.clone().self_signed(&key).unwrap();
        Ca { pem: cert.pem(), params, key }
    }

    /// Writes the CA's certificate and key (PKCS#8) into `dir`: what
    /// --identity-ca-cert and --identity-ca-key take.
    pub fn write(&self, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join("identity-ca.pem"), dir.join("identity-ca.key"));
        std::fs::write(&c, &self.pem).unwrap();
        std::fs::write(&k, self.key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A server certificate for `name`, valid `from`..`to` (days from now).
    pub fn leaf(
        &self,
        name: &str,
        from: i64,
        to: i64,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let issuer = self.params.clone().self_signed(&self.key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(to);
        let cert = params.signed_by(&key, &issuer, &self.key).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
    }
}

/// The database's TLS: it asks for a client certificate, as PostgreSQL
/// with an `ssl_ca_file` does, and verifies one from `identity` if given
/// (clients without one still get in: the script decides by user name).
fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: &Ca,
) -> TlsAcceptor {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(identity.pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(cfg))
}

// ---- the scripted database ----

/// (pid, key) of every CancelRequest the database received.
pub type Cancels = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

/// What the database does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// TLS with a certificate from the trusted CA for DB_NAME; then the
    /// script below, by user name.
    Normal,
    /// Answers the SSLRequest with 'N'.
    NoTls,
    /// Answers the SSLRequest with a byte that is neither 'S' nor 'N'.
    Garbage,
    /// Accepts and says nothing.
    Silent,
    /// A certificate from another CA.
    OtherCa,
    /// A certificate for another name.
    OtherName,
    Expired,
    NotYetValid,
}

/// The database, by user name: "reject" asks for a password and refuses
/// it (28P01); "password" asks for one and accepts any; "crash" closes in
/// the middle of authentication; anyone else is trusted. A verified client
/// certificate's subject CN is kept in `client_cns`. After login, a
/// simple query "close" makes it close the session, "die" makes it vanish
/// mid-query, "stream" makes it send rows until the connection breaks,
/// anything else gets CommandComplete.
pub struct FakeDb {
    pub addr: SocketAddr,
    pub ca: Ca,
    /// The CA the database trusts for client certificates (tailgres's
    /// identity CA in the tests that use identity login).
    pub identity: Ca,
    /// The subject CN of every client certificate the database verified.
    pub client_cns: Arc<Mutex<Vec<String>>>,
    pub mode: Arc<Mutex<Db>>,
    /// (pid, key) of every CancelRequest received.
    pub cancels: Cancels,
    /// Sessions the database is serving right now.
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    /// Roles with a stored SCRAM verifier (rolpassword), by name: they log
    /// in with SCRAM-SHA-256, and the verifier lookup returns it.
    pub roles: Arc<Mutex<std::collections::HashMap<String, String>>>,
    /// The user of every StartupMessage, in order (lookups included).
    pub logins: Arc<Mutex<Vec<String>>>,
    /// Verifier lookups get an ErrorResponse.
    pub fail_lookups: Arc<std::sync::atomic::AtomicBool>,
    /// Verifier lookups (Bind messages) received.
    pub lookups: Arc<std::sync::atomic::AtomicUsize>,
}

/// What every connection of the scripted database shares.
#[derive(Clone)]
struct DbState {
    cancels: Cancels,
    live: Arc<std::sync::atomic::AtomicUsize>,
    client_cns: Arc<Mutex<Vec<String>>>,
    roles: Arc<Mutex<std::collections::HashMap<String, String>>>,
    logins: Arc<Mutex<Vec<String>>>,
    fail_lookups: Arc<std::sync::atomic::AtomicBool>,
    lookups: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeDb {
    /// `identity`: the CA it trusts for client certificates.
    pub async fn start(identity: Ca) -> FakeDb {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca = Ca::new("tailgres test CA");
        let other = Ca::new("someone else's CA");
        let mk = |ca: &Ca, name: &str, from, to| {
            let (c, k) = ca.leaf(name, from, to);
            server_tls(c, k, &identity)
        };
        let good = mk(&ca, DB_NAME, -1, 30);
        let variants = Arc::new([
            (Db::OtherCa, mk(&other, DB_NAME, -1, 30)),
            (Db::OtherName, mk(&ca, "other.test", -1, 30)),
            (Db::Expired, mk(&ca, DB_NAME, -30, -1)),
            (Db::NotYetValid, mk(&ca, DB_NAME, 10, 30)),
        ]);
        let mode = Arc::new(Mutex::new(Db::Normal));
        let st = DbState {
            cancels: Default::default(),
            live: Default::default(),
            client_cns: Default::default(),
            roles: Default::default(),
            logins: Default::default(),
            fail_lookups: Default::default(),
            lookups: Default::default(),
        };
        let (m, state) = (mode.clone(), st.clone());
        tokio::spawn(async move {
            let mut pid = 1000u32;
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                pid += 1;
                let mode = *m.lock().unwrap();
                let acceptor = variants.iter().find(|(d, _)| *d == mode).map(|(_, a)| a.clone());
                let acceptor = acceptor.unwrap_or_else(|| good.clone());
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = serve_db(tcp, mode, acceptor, pid, state).await;
                });
            }
        });
        FakeDb {
            addr,
            ca,
            identity,
            client_cns: st.client_cns,
            mode,
            cancels: st.cancels,
            live: st.live,
            roles: st.roles,
            logins: st.logins,
            fail_lookups: st.fail_lookups,
            lookups: st.lookups,
        }
    }

    pub fn set(&self, mode: Db) {
        *self.mode.lock().unwrap() = mode;
    }
}

struct LiveGuard(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn serve_db(
    mut tcp: tokio::net::TcpStream,
    mode: Db,
    acceptor: TlsAcceptor,
    pid: u32,
    st: DbState,
) -> std::io::Result<()> {
    let DbState { cancels, live, client_cns, roles, logins, fail_lookups, lookups } = st;
    let mut req = [0u8; 8];
    tcp.read_exact(&mut req).await?;
    match mode {
        Db::NoTls => return tcp.write_all(b"N").await,
        Db::Garbage => return tcp.write_all(b"X").await,
        Db::Silent => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return Ok(());
        }
        _ => tcp.write_all(b"S").await?,
    }
    let mut s = acceptor.accept(tcp).await?;
    if let Some(leaf) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let cn = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).unwrap_or("");
        client_cns.lock().unwrap().push(cn.to_string());
    }
    let len = s.read_u32().await? as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body).await?;
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    if code == pgwire::CANCEL_REQUEST {
        let pid = u32::from_be_bytes(body[4..8].try_into().unwrap());
        cancels.lock().unwrap().push((pid, body[8..].to_vec()));
        return Ok(());
    }
    let params: Vec<&[u8]> = body[4..].split(|b| *b == 0).collect();
    let user = params
        .chunks(2)
        .find(|kv| kv[0] == b"user")
        .and_then(|kv| kv.get(1))
        .map(|v| String::from_utf8_lossy(v).to_string())
        .unwrap_or_default();
    logins.lock().unwrap().push(user.clone());
    let stored = roles.lock().unwrap().get(&user).cloned();
    if let Some(text) = stored {
        // SCRAM-SHA-256 (no PLUS: this database does not bind).
        use tailgres::verifier::{ScramServer, Verifier};
        let Ok(Verifier::Scram(keys)) = Verifier::parse(&text) else { panic!("a SCRAM verifier") };
        let mut server = ScramServer::new(&keys, None);
        s.write_all(&pgwire::auth_request(pgwire::auth::SASL, &server.mechanisms())).await?;
        let first = pgwire::read_message(&mut s, 1 << 16).await?;
        let server_first = server.client_first(&first.body).expect("a valid client-first");
        s.write_all(&pgwire::auth_request(pgwire::auth::SASL_CONTINUE, &server_first)).await?;
        let last = pgwire::read_message(&mut s, 1 << 16).await?;
        match server.client_final(&last.body) {
            Ok(done) => {
                s.write_all(&pgwire::auth_request(pgwire::auth::SASL_FINAL, &done.server_final)).await?
            }
            Err(_) => {
                let msg = format!("password authentication failed for user \"{user}\"");
                s.write_all(&pgwire::fatal("28P01", &msg)).await?;
                return s.shutdown().await;
            }
        }
    }
    match user.as_str() {
        "crash" => return Ok(()), // closed without a word (or a close_notify)
        "reject" | "password" => {
            s.write_all(&pgwire::auth_request(pgwire::auth::CLEARTEXT, &[])).await?;
            let m = pgwire::read_message(&mut s, 1 << 16).await?;
            if user == "reject" || m.tag != b'p' {
                s.write_all(&pgwire::fatal(
                    "28P01",
                    &format!("password authentication failed for user \"{user}\""),
                ))
                .await?;
                return s.shutdown().await;
            }
        }
        _ => {}
    }
    live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _live = LiveGuard(live);
    let mut out = pgwire::auth_request(pgwire::auth::OK, &[]);
    out.extend(pgwire::message_bytes(b'S', b"server_version\x0017.0\x00"));
    let mut key = pid.to_be_bytes().to_vec();
    key.extend([1, 2, 3, 4]);
    out.extend(pgwire::message_bytes(b'K', &key));
    out.extend(pgwire::message_bytes(b'Z', b"I"));
    s.write_all(&out).await?;
    // The last Bind's first parameter (the verifier lookup's role).
    let mut bound: Option<String> = None;
    loop {
        let m = match pgwire::read_message(&mut s, 1 << 20).await {
            Ok(m) => m,
            // The client went away: as PostgreSQL, close with close_notify.
            Err(_) => return s.shutdown().await,
        };
        match m.tag {
            // As PostgreSQL: the session ends with a TLS close_notify.
            b'X' => return s.shutdown().await,
            // The verifier lookup: Parse, Bind (the role), Execute, Sync.
            b'B' => {
                lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let b = &m.body[2..]; // unnamed portal and statement
                let formats = u16::from_be_bytes([b[0], b[1]]) as usize;
                let p = &b[2 + 2 * formats..];
                let len = i32::from_be_bytes(p[2..6].try_into().unwrap()) as usize;
                bound = Some(String::from_utf8_lossy(&p[6..6 + len]).to_string());
            }
            b'S' => {
                let mut out = Vec::new();
                if fail_lookups.load(std::sync::atomic::Ordering::SeqCst) {
                    out.extend(pgwire::error_response(
                        "ERROR",
                        "42883",
                        "function tailgres_auth.verifier(unknown) does not exist",
                        None,
                    ));
                } else {
                    out.extend(pgwire::message_bytes(b'1', &[]));
                    out.extend(pgwire::message_bytes(b'2', &[]));
                    let role = bound.take().unwrap_or_default();
                    let mut row = 1u16.to_be_bytes().to_vec();
                    match roles.lock().unwrap().get(&role) {
                        Some(v) => {
                            row.extend((v.len() as i32).to_be_bytes());
                            row.extend(v.as_bytes());
                        }
                        None => row.extend((-1i32).to_be_bytes()),
                    }
                    out.extend(pgwire::message_bytes(b'D', &row));
                    out.extend(pgwire::message_bytes(b'C', b"SELECT 1\0"));
                }
                out.extend(pgwire::message_bytes(b'Z', b"I"));
                s.write_all(&out).await?;
            }
            b'Q' => {
                let q = String::from_utf8_lossy(&m.body).trim_end_matches('\0').to_string();
                match q.as_str() {
                    "close" => return s.shutdown().await,
                    // Killed mid-query: some rows, then gone without a
                    // TLS close_notify.
                    "die" => {
                        s.write_all(&pgwire::message_bytes(b'D', &[7u8; 100])).await?;
                        s.flush().await?;
                        return Ok(());
                    }
                    "stream" => {
                        let row = pgwire::message_bytes(b'D', &[7u8; 1000]);
                        loop {
                            s.write_all(&row).await?;
                        }
                    }
                    _ => {
                        let mut out = pgwire::message_bytes(b'C', b"SELECT 0\0");
                        out.extend(pgwire::message_bytes(b'Z', b"I"));
                        s.write_all(&out).await?;
                    }
                }
            }
            _ => {}
        }
    }
}

// ---- tailgres ----

pub struct Options {
    pub db: Db,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_sessions: usize,
    pub grace: Duration,
    pub require_grant: bool,
    pub audit: Option<PathBuf>,
    /// Route this database name only (instead of every name).
    pub databases: Vec<String>,
    pub upstream_addr: Option<String>,
    pub connect_timeout: Duration,
    /// The route logs in by identity, with a CA whose own validity ends
    /// this long from now (the database trusts it).
    pub identity_login: Option<Duration>,
    /// The route uses `--auth scram-verifier` (lookups as tailgres_auth,
    /// whom the database trusts).
    pub verifier: bool,
    /// `--audit-statements`.
    pub audit_statements: bool,
    /// `--service` and `--fleet-tag`: a fleet member serving the Service.
    pub fleet: Option<tailgres::config::Fleet>,
    /// This node's tailnet IPv4 address (what its cancel keys name).
    pub node_ip: std::net::Ipv4Addr,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            db: Db::Normal,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_sessions: 100,
            grace: Duration::from_millis(200),
            require_grant: false,
            audit: None,
            databases: vec!["*".into()],
            upstream_addr: None,
            connect_timeout: Duration::from_secs(2),
            identity_login: None,
            verifier: false,
            audit_statements: false,
            fleet: None,
            node_ip: std::net::Ipv4Addr::new(100, 100, 100, 100),
        }
    }
}

pub struct World {
    pub tailnet: Arc<MemoryTailnet>,
    pub shared: Arc<Shared>,
    pub db: FakeDb,
    pub audit_path: PathBuf,
    /// The Service's loopback listener (with `Options::fleet`).
    pub service_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// A tailnet peer: a user's laptop at 100.64.0.N, with `grants` as its
/// capability values.
pub fn person(n: u8, login: &str, grants: Vec<Value>) -> (IpAddr, PeerIdentity) {
    let ip = IpAddr::from([100, 64, 0, n]);
    let id = PeerIdentity {
        stable_id: format!("n{n}"),
        node_name: format!("laptop{n}.example.ts.net"),
        user_login: login.into(),
        user_display_name: String::new(),
        tags: vec![],
        addresses: vec![ip],
        os: "linux".into(),
        shared_in: false,
        key_expiry: None,
        expired: false,
        cap_map: if grants.is_empty() {
            Default::default()
        } else {
            [(DEFAULT_CAPABILITY.to_string(), grants)].into()
        },
    };
    (ip, id)
}

impl World {
    pub async fn start(o: Options) -> World {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let identity =
            Ca::expiring("tailgres identity test CA", o.identity_login.unwrap_or(Duration::from_secs(86400)));
        let login = match o.identity_login {
            None => Login::Password,
            Some(_) => {
                let (cert, key) = identity.write(dir.path());
                Login::Identity(IdentityCa::load(&cert, &key, DEFAULT_VALIDITY).unwrap())
            }
        };
        let db = FakeDb::start(identity).await;
        db.set(o.db);
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, &db.ca.pem).unwrap();
        let upstream = UpstreamTls::new(&UpstreamOptions {
            addr: o.upstream_addr.clone().unwrap_or_else(|| db.addr.to_string()),
            server_name: Some(DB_NAME.into()),
            ca: vec![ca_path],
            client_cert: None,
            client_key: None,
            direct_tls: false,
            connect_timeout: o.connect_timeout,
        })
        .unwrap();
        let settings = Settings {
            routes: vec![Route {
                name: "db".into(),
                databases: o.databases.clone(),
                port: PORT,
                upstream: Arc::new(upstream),
                login,
                auth: if o.verifier { AuthMode::ScramVerifier } else { AuthMode::PasswordRelay },
                verifiers: o.verifier.then(|| {
                    Arc::new(VerifierSource::new(LookupConfig {
                        user: "tailgres_auth".into(),
                        password: Some(zeroize::Zeroizing::new("lookup-secret".into())),
                        database: "postgres".into(),
                        query: tailgres::lookup::DEFAULT_QUERY.into(),
                        cache_ttl: Duration::from_secs(60),
                    }))
                }),
            }],
            policy: Policy {
                capability: DEFAULT_CAPABILITY.into(),
                require_grant: o.require_grant,
                allow_shared_nodes: false,
            },
            identity_settings: false,
            handshake_timeout: o.handshake_timeout,
            idle_timeout: o.idle_timeout,
            audit_statements: o.audit_statements,
        };
        let audit_path = o.audit.clone().unwrap_or_else(|| dir.path().join("audit.jsonl"));
        let (audit, _task) = AuditLog::open(AuditDest::File(audit_path.clone())).await.unwrap();
        let proxy_cert = rcgen::generate_simple_self_signed(vec!["tailgres.memory.ts.net".into()]).unwrap();
        let mut client_tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![proxy_cert.cert.der().clone()],
                PrivateKeyDer::try_from(proxy_cert.key_pair.serialize_der()).unwrap(),
            )
            .unwrap();
        client_tls.alpn_protocols = vec![b"postgresql".to_vec()];
        let tailnet = Arc::new(MemoryTailnet::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            cancels: tailgres::cancel::CancelRegistry::new(tailgres::cancel::node_pid(o.node_ip)),
            fleet: o.fleet.clone(),
            ..Shared::new(
                SettingsCell::new(settings),
                Some(TlsAcceptor::from(Arc::new(client_tls))),
                audit,
                Arc::new(Metrics::default()),
                stop_rx,
            )
        });
        tokio::spawn(tailgres::live::follow(tailnet.clone(), shared.live_view()));
        let listener = tailnet.listen(PORT).unwrap();
        let service = o.fleet.as_ref().map(|f| server::ServiceListener {
            name: f.service.clone(),
            listener: tailnet.listen_service(&f.service, PORT).unwrap(),
            port: PORT,
        });
        let service_addr = service.as_ref().map(|s| s.listener.local_addr().unwrap());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let served = tokio::spawn(server::serve(
            vec![listener],
            tailnet.clone(),
            shared.clone(),
            stop_tx,
            ServeOptions { max_sessions: o.max_sessions, grace: o.grace, service },
            async move {
                let _ = shutdown_rx.await;
            },
            std::future::pending::<()>(),
        ));
        World { tailnet, shared, db, audit_path, service_addr, shutdown: Some(shutdown_tx), served, _dir: dir }
    }

    /// Adds a peer and lets tailgres read the netmap (so it knows whether
    /// the tailnet uses grants).
    pub async fn join(&self, peer: (IpAddr, PeerIdentity)) -> IpAddr {
        let ip = peer.0;
        self.tailnet.set_peer(ip, peer.1);
        self.tailnet.announce_netmap();
        self.settled().await;
        ip
    }

    /// Waits until the follower has read the tailnet (grant use known).
    pub async fn settled(&self) {
        within("the follower reads the netmap", async {
            // (The follower may not have subscribed yet: announce again.)
            while self.shared.grant_use.get() == tailgres::authorize::GrantUseState::Unknown {
                self.tailnet.announce_netmap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // One more sweep after the last change.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pub async fn dial(&self, from: IpAddr) -> tokio::io::DuplexStream {
        self.tailnet.dial(from, PORT).await.unwrap()
    }

    /// A tokio-postgres client over the tailnet, without TLS.
    pub async fn connect(
        &self,
        from: IpAddr,
        user: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        self.connect_with(from, user, "pw").await
    }

    /// [`World::connect`] with `password`.
    pub async fn connect_with(
        &self,
        from: IpAddr,
        user: &str,
        password: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let stream = self.dial(from).await;
        let mut cfg = tokio_postgres::Config::new();
        cfg.user(user).dbname("app").password(password).application_name("inprocess");
        let (client, conn) = cfg.connect_raw(stream, tokio_postgres::NoTls).await?;
        Ok((
            client,
            tokio::spawn(async move {
                let _ = conn.await;
            }),
        ))
    }

    pub fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        text.lines().filter(|l| l.ends_with('}')).map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The first audit record matching `pred`, waiting for it.
    pub async fn record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(r) = self.records().into_iter().find(|r| pred(r)) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            let seen: Vec<String> = self
                .records()
                .iter()
                .map(|r| format!("{} {} {}", r["event"], r["reason"], r["detail"]))
                .collect();
            panic!("no audit record: {what}; the log has:\n{}", seen.join("\n"))
        })
    }

    pub async fn denied(&self, reason: &str) -> Value {
        self.record(reason, |r| r["event"] == "session_denied" && r["reason"] == reason).await
    }

    pub async fn ended(&self, reason: &str) -> Value {
        self.record(reason, |r| r["event"] == "session_end" && r["reason"] == reason).await
    }

    /// Sessions the proxy is running (tailgres_sessions_active).
    pub fn active(&self) -> u64 {
        let m = self.metrics();
        let line = m.lines().find(|l| l.starts_with("tailgres_sessions_active ")).expect("the gauge");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Waits until exactly `n` sessions run (earlier ones may still be
    /// finishing their refusals).
    pub async fn wait_active(&self, n: u64) {
        within(&format!("{n} active sessions"), async {
            while self.active() != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    pub fn metrics(&self) -> String {
        self.shared.metrics.render(&TailnetGauge { backend_state: "Running" })
    }

    /// SIGTERM: stop accepting, let sessions run for the grace, end the
    /// rest; returns when the accept loop has finished.
    pub async fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        within("shutdown", &mut self.served).await.unwrap();
    }
}

// ---- raw protocol ----

pub fn startup(user: &str, database: &str) -> Vec<u8> {
    tailgres::negotiate::Startup {
        version: pgwire::PROTOCOL_3_0,
        params: vec![("user".into(), user.into()), ("database".into(), database.into())],
    }
    .to_bytes()
}

/// Reads the connection to its end and returns the ErrorResponse's
/// (SQLSTATE, message), if one came.
pub async fn error_of<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, String)> {
    let mut all = Vec::new();
    let _ = within("the proxy closes", s.read_to_end(&mut all)).await;
    let i = all.iter().position(|b| *b == b'E')?;
    let (code, msg) = pgwire::error_fields(&all[i + 5..]);
    Some((code?, msg.unwrap_or_default()))
}
