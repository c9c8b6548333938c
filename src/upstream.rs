//! Stage 5, upstream: dial the real database and bring up **verified** TLS.
//!
//! TCP dial (TCP_NODELAY), then either an SSLRequest answered by exactly one
//! byte, or direct TLS (PostgreSQL 17+, ALPN `postgresql`). The certificate is
//! checked by rustls's `WebPkiServerVerifier` (chain, name, validity); there is
//! deliberately no option to skip that. See docs/postgres-protocol.md,
//! "Before the StartupMessage" and "SCRAM channel binding".
#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, ProtocolVersion, RootCertStore};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsConnector;

use crate::pgwire::ALPN_POSTGRESQL;

pub use crate::audit::Side;

/// How to reach and authenticate the database (from the `--upstream*` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamOptions {
    /// host:port to dial (`--upstream`).
    pub addr: String,
    /// TLS name to verify (`--upstream-server-name`); default: the host of `addr`.
    pub server_name: Option<String>,
    /// PEM files or directories of them (`--upstream-ca`); empty = Mozilla roots.
    pub ca: Vec<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// TLS from the first byte (PostgreSQL 17+ `sslnegotiation=direct`).
    pub direct_tls: bool,
    /// Budget for the whole of `connect()`: resolve, dial, negotiate, handshake.
    pub connect_timeout: Duration,
}

/// The upstream TLS client, built once and shared by every session (so TLS
/// sessions are resumed from one in-memory cache).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    /// Kept to build a per-session config with a client certificate
    /// ([`UpstreamTls::with_client_cert`]): the same verify-full.
    verifier: Arc<WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    addr: String,
    server_name: ServerName<'static>,
    server_name_text: String,
    mozilla_roots: bool,
    direct_tls: bool,
    connect_timeout: Duration,
}

/// The database's socket: in tokio's reactor, or, for a session the
/// tailnet node polls on its own scheduler, in the node's netpoller (then
/// the session's waits for the database stay on that scheduler too).
#[derive(Debug)]
pub enum Socket {
    Tokio(TcpStream),
    Node(crate::tailnet::NodeSocket),
}

impl Socket {
    /// Connects where the caller runs (see [`crate::tailnet::on_node`]).
    pub async fn connect(addr: std::net::SocketAddr) -> io::Result<Socket> {
        if crate::tailnet::on_node() {
            return crate::tailnet::NodeSocket::connect(addr).await.map(Socket::Node);
        }
        TcpStream::connect(addr).await.map(Socket::Tokio)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tokio(s) => s.set_nodelay(on),
            Socket::Node(s) => s.set_nodelay(on),
        }
    }

    /// The plain (blocking-mode unchanged) socket, out of either poller.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            Socket::Tokio(s) => s.into_std(),
            Socket::Node(s) => Ok(s.into_std()),
        }
    }
}

macro_rules! socket_delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tokio($s) => $e,
            Socket::Node($s) => $e,
        }
    };
}

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        socket_delegate!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        socket_delegate!(self, s => std::pin::Pin::new(s).poll_write(cx, b))
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        socket_delegate!(self, s => std::pin::Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        socket_delegate!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        socket_delegate!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// A verified TLS connection to the database, before the StartupMessage.
#[derive(Debug)]
pub struct Upstream {
    pub stream: tokio_rustls::client::TlsStream<Socket>,
    pub facts: UpstreamFacts,
    /// tls-server-end-point channel binding data (RFC 5929) for SCRAM-PLUS, or
    /// None when the certificate's signature has no single hash (then SCRAM
    /// uses gs2 flag `n`); see [`crate::scram::tls_server_end_point`].
    pub channel_binding: Option<Vec<u8>>,
    /// How long the whole connect took, and its TLS handshake alone.
    pub connect_time: Duration,
    pub tls_time: Duration,
}

/// What the audit log records about the upstream leg (its `address` is
/// the resolved ip:port dialed).
pub type UpstreamFacts = crate::audit::UpstreamInfo;

/// The step of `connect()` that was under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Resolve,
    Dial,
    SslRequest,
    Handshake,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Resolve => "name resolution",
            Phase::Dial => "TCP connect",
            Phase::SslRequest => "SSLRequest",
            Phase::Handshake => "TLS handshake",
        })
    }
}

/// A problem reading a PEM file. Deliberately carries no file contents (the
/// underlying parser quotes lines and bytes, which for a key file is secret).
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("not valid PEM (a section without END line, a malformed BEGIN line or bad base64)")]
    Malformed,
    /// No item of the wanted kind; says which.
    #[error("{0}")]
    Empty(&'static str),
}

impl From<pem::Error> for PemError {
    fn from(e: pem::Error) -> Self {
        match e {
            pem::Error::Io(e) => PemError::Io(e),
            _ => PemError::Malformed,
        }
    }
}

/// Invalid `--upstream*` settings, found once at startup.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--upstream {addr:?}: expected host:port")]
    Address { addr: String },
    #[error("--upstream-server-name {name:?}: not a valid DNS name or IP address")]
    ServerName { name: String },
    #[error("--upstream-ca {}: {source}", path.display())]
    Ca { path: PathBuf, source: PemError },
    #[error("--upstream-ca {}: certificate #{index} is not usable as a trust anchor: {source}", path.display())]
    CaUnusable { path: PathBuf, index: usize, source: rustls::Error },
    #[error("--upstream-client-cert {}: {source}", path.display())]
    ClientCert { path: PathBuf, source: PemError },
    #[error("--upstream-client-key {}: {source}", path.display())]
    ClientKey { path: PathBuf, source: PemError },
    #[error("--upstream-client-cert and --upstream-client-key go together; {missing} is missing")]
    ClientPairIncomplete { missing: &'static str },
    #[error("--upstream-client-key {}: not usable with --upstream-client-cert {}: {source}", key.display(), cert.display())]
    ClientKeyUnusable { key: PathBuf, cert: PathBuf, source: rustls::Error },
    #[error("building the upstream TLS client: {0}")]
    Tls(#[source] rustls::Error),
    #[error("building the upstream certificate verifier: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// Why the upstream leg could not be established.
#[derive(Debug, thiserror::Error)]
///
/// Configuration errors are not among them: they are found when the route is
/// built ([`UpstreamTls::new`] returns [`ConfigError`]), at start or reload,
/// so a session can never blame the database for the proxy's settings.
pub enum UpstreamError {
    #[error("could not resolve {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("could not connect to {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("{phase} with {addr} timed out (connect timeout {after:?})")]
    Timeout { addr: String, phase: Phase, after: Duration },
    #[error("{phase} with {addr} failed: {source}")]
    Io { addr: String, phase: Phase, source: io::Error },
    #[error("the database at {addr} does not offer TLS; tailgres only connects with verified TLS (turn on ssl in its postgresql.conf)")]
    ServerRefusedTls { addr: String },
    #[error("the database at {addr} answered the SSLRequest with an error message, which tailgres does not read (it is unencrypted and unauthenticated); the server may be too old or overloaded, or something sits in between")]
    ServerErrorBeforeTls { addr: String },
    #[error("the database at {addr} answered the SSLRequest with byte {byte:#04x} instead of 'S' or 'N': is it a PostgreSQL server?")]
    UnexpectedSslResponse { addr: String, byte: u8 },
    #[error("the certificate of the database at {addr} does not chain to {}", roots_text(*mozilla_roots))]
    UntrustedCertificate { addr: String, mozilla_roots: bool },
    #[error("the certificate of the database at {addr} is not valid for {expected:?} (it names {presented:?}); set --upstream-server-name to one of its names")]
    NameMismatch { addr: String, expected: String, presented: Vec<String> },
    #[error("the certificate of the database at {addr} has expired (not after {})", not_after.as_deref().unwrap_or("?"))]
    Expired { addr: String, not_after: Option<String> },
    #[error("the certificate of the database at {addr} is not valid yet (not before {})", not_before.as_deref().unwrap_or("?"))]
    NotYetValid { addr: String, not_before: Option<String> },
    #[error("the certificate of the database at {addr} has been revoked")]
    Revoked { addr: String },
    #[error("the certificate of the database at {addr} was rejected: {source}")]
    CertificateInvalid { addr: String, source: rustls::Error },
    #[error("TLS with the database at {addr} failed: {source}")]
    Tls { addr: String, source: rustls::Error },
    #[error("the database at {addr} did not negotiate ALPN \"postgresql\" on direct TLS (--upstream-direct-tls needs PostgreSQL 17 or later)")]
    AlpnMissing { addr: String },
}

fn roots_text(mozilla: bool) -> &'static str {
    if mozilla {
        "a root in the Mozilla store (no --upstream-ca was given; pass the database's CA with --upstream-ca)"
    } else {
        "a certificate given with --upstream-ca"
    }
}

impl UpstreamError {
    /// Always the database's side: the proxy's own settings are checked
    /// before any session ([`ConfigError`]).
    pub fn side(&self) -> Side {
        Side::Upstream
    }

    /// The audit record's reason (a configuration error is the proxy's).
    pub fn deny_reason(&self) -> crate::audit::DenyReason {
        use crate::audit::DenyReason as D;
        match self {
            UpstreamError::Resolve { .. } | UpstreamError::Unreachable { .. } | UpstreamError::Io { .. } => {
                D::UpstreamUnreachable
            }
            UpstreamError::Timeout { .. } => D::UpstreamTimeout,
            UpstreamError::ServerRefusedTls { .. } => D::UpstreamNoTls,
            UpstreamError::ServerErrorBeforeTls { .. }
            | UpstreamError::UnexpectedSslResponse { .. }
            | UpstreamError::AlpnMissing { .. } => D::UpstreamProtocolError,
            UpstreamError::UntrustedCertificate { .. } => D::UpstreamUntrustedCertificate,
            UpstreamError::NameMismatch { .. } => D::UpstreamNameMismatch,
            UpstreamError::Expired { .. } => D::UpstreamCertificateExpired,
            UpstreamError::NotYetValid { .. }
            | UpstreamError::Revoked { .. }
            | UpstreamError::CertificateInvalid { .. }
            | UpstreamError::Tls { .. } => D::UpstreamTls,
        }
    }

    /// Stable identifier for the operator's log (finer than the audit
    /// record's [`Self::deny_reason`]).
    pub fn reason_code(&self) -> &'static str {
        match self {
            UpstreamError::Resolve { .. } => "upstream_resolve",
            UpstreamError::Unreachable { .. } => "upstream_unreachable",
            UpstreamError::Timeout { .. } => "upstream_timeout",
            UpstreamError::Io { .. } => "upstream_io",
            UpstreamError::ServerRefusedTls { .. } => "upstream_no_tls",
            UpstreamError::ServerErrorBeforeTls { .. } => "upstream_error_before_tls",
            UpstreamError::UnexpectedSslResponse { .. } => "upstream_protocol",
            UpstreamError::UntrustedCertificate { .. } => "upstream_untrusted_certificate",
            UpstreamError::NameMismatch { .. } => "upstream_name_mismatch",
            UpstreamError::Expired { .. } => "upstream_certificate_expired",
            UpstreamError::NotYetValid { .. } => "upstream_certificate_not_yet_valid",
            UpstreamError::Revoked { .. } => "upstream_certificate_revoked",
            UpstreamError::CertificateInvalid { .. } => "upstream_certificate_invalid",
            UpstreamError::Tls { .. } => "upstream_tls",
            UpstreamError::AlpnMissing { .. } => "upstream_alpn",
        }
    }

    /// What the Postgres client is told (no addresses, names or certificate
    /// details: the operator's log has those).
    pub fn client_message(&self) -> String {
        let what = match self {
            UpstreamError::Resolve { .. }
            | UpstreamError::Unreachable { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Io { .. } => "tailgres could not reach the database",
            UpstreamError::ServerRefusedTls { .. }
            | UpstreamError::ServerErrorBeforeTls { .. }
            | UpstreamError::UnexpectedSslResponse { .. } => {
                "the database did not accept TLS, and tailgres only connects to it with verified TLS"
            }
            _ => "tailgres could not establish a verified TLS connection to the database",
        };
        format!("{what}; the operator's log has the details")
    }

    /// SQLSTATE for the client's ErrorResponse.
    pub fn sqlstate(&self) -> &'static str {
        "08001" // sqlclient_unable_to_establish_sqlconnection
    }
}

/// A client config builder with verify-full: TLS 1.3 and 1.2 only, the
/// route's verifier. Every upstream config starts here (the route's shared
/// one, and each identity-login session's).
fn verifying_builder(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    verifier: &Arc<WebPkiServerVerifier>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_webpki_verifier(verifier.clone()))
}

impl UpstreamTls {
    pub fn new(o: &UpstreamOptions) -> Result<Self, ConfigError> {
        let host = host_of(&o.addr).ok_or_else(|| ConfigError::Address { addr: o.addr.clone() })?;
        let server_name_text = o.server_name.clone().unwrap_or_else(|| host.to_string());
        let server_name = ServerName::try_from(server_name_text.clone())
            .map_err(|_| ConfigError::ServerName { name: server_name_text.clone() })?;

        let mut roots = RootCertStore::empty();
        if o.ca.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for path in &o.ca {
            load_ca(&mut roots, path)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(ConfigError::Verifier)?;
        let builder = verifying_builder(&provider, &verifier).map_err(ConfigError::Tls)?;
        let mut config = match (&o.client_cert, &o.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => Err(ConfigError::ClientPairIncomplete { missing: "--upstream-client-key" })?,
            (None, Some(_)) => Err(ConfigError::ClientPairIncomplete { missing: "--upstream-client-cert" })?,
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)
                    .map_err(|source| ConfigError::ClientCert { path: cert.clone(), source })?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    let source = match e {
                        pem::Error::NoItemsFound => PemError::Empty(NO_KEY),
                        e => e.into(),
                    };
                    ConfigError::ClientKey { path: key.clone(), source }
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|source| {
                    ConfigError::ClientKeyUnusable { key: key.clone(), cert: cert.clone(), source }
                })?
            }
        };
        // Resumption stays at rustls's default (an in-memory cache), shared by
        // every session because the config is.
        if o.direct_tls {
            config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        }
        Ok(UpstreamTls {
            config: Arc::new(config),
            verifier,
            provider,
            addr: o.addr.clone(),
            server_name,
            server_name_text,
            mozilla_roots: o.ca.is_empty(),
            direct_tls: o.direct_tls,
            connect_timeout: o.connect_timeout,
        })
    }

    /// The same upstream (address, server name, verify-full with the same
    /// roots) presenting `chain` with `key` as its client certificate: for
    /// one session's identity login. TLS resumption is off for it, so no
    /// session of one certificate is ever resumed under another.
    pub fn with_client_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<UpstreamTls, rustls::Error> {
        let mut config =
            verifying_builder(&self.provider, &self.verifier)?.with_client_auth_cert(chain, key)?;
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = self.config.alpn_protocols.clone();
        Ok(UpstreamTls { config: Arc::new(config), ..self.clone() })
    }

    pub async fn connect(&self) -> Result<Upstream, UpstreamError> {
        let began = Instant::now();
        let deadline = began + self.connect_timeout;
        let (mut tcp, peer) = self.dial(deadline).await?;
        let addr = peer.to_string();
        let io_err = |phase| {
            let addr = addr.clone();
            move |source| UpstreamError::Io { addr, phase, source }
        };
        if !self.direct_tls {
            // CVE-2021-23222: read exactly one byte from the raw socket, so
            // nothing a machine-in-the-middle appends can be taken for data
            // that came through TLS.
            let negotiate = async {
                tcp.write_all(&crate::pgwire::SSL_REQUEST_PACKET).await?;
                let mut answer = [0u8; 1];
                tcp.read_exact(&mut answer).await?;
                Ok::<u8, io::Error>(answer[0])
            };
            let answer = self
                .within(deadline, Phase::SslRequest, &addr, negotiate)
                .await?
                .map_err(io_err(Phase::SslRequest))?;
            match answer {
                b'S' => {}
                b'N' => return Err(UpstreamError::ServerRefusedTls { addr }),
                b'E' => return Err(UpstreamError::ServerErrorBeforeTls { addr }),
                byte => return Err(UpstreamError::UnexpectedSslResponse { addr, byte }),
            }
        }
        let tls_began = Instant::now();
        let connector = TlsConnector::from(self.config.clone());
        let handshake = connector.connect(self.server_name.clone(), tcp);
        let stream = match self.within(deadline, Phase::Handshake, &addr, handshake).await? {
            Ok(s) => s,
            Err(e) => return Err(self.handshake_error(addr, e)),
        };
        let conn = stream.get_ref().1;
        if self.direct_tls && conn.alpn_protocol() != Some(ALPN_POSTGRESQL) {
            return Err(UpstreamError::AlpnMissing { addr });
        }
        let end_entity =
            conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
        let tls_version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_2) => crate::audit::TlsVersion::Tls12,
            // rustls speaks nothing else (the config allows only these two).
            _ => crate::audit::TlsVersion::Tls13,
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| s.suite().as_str().map(str::to_string).unwrap_or_else(|| format!("{:?}", s.suite())))
            .unwrap_or_default();
        let facts = UpstreamFacts {
            address: addr,
            server_name: self.server_name_text.clone(),
            tls_version,
            cipher,
            cert_sha256: sha2::Sha256::digest(&end_entity).into(),
            cert_not_after: not_after(&end_entity),
        };
        let tls_time = tls_began.elapsed();
        Ok(Upstream {
            stream,
            facts,
            channel_binding: crate::scram::tls_server_end_point(&end_entity),
            connect_time: began.elapsed(),
            tls_time,
        })
    }

    /// The configured HOST:PORT.
    pub fn address(&self) -> &str {
        &self.addr
    }

    /// The configured TLS server name.
    pub fn server_name(&self) -> &str {
        &self.server_name_text
    }

    async fn within<F: std::future::Future>(
        &self,
        deadline: Instant,
        phase: Phase,
        addr: &str,
        f: F,
    ) -> Result<F::Output, UpstreamError> {
        timeout_at(deadline, f).await.map_err(|_| UpstreamError::Timeout {
            addr: addr.to_string(),
            phase,
            after: self.connect_timeout,
        })
    }

    /// Resolves `addr` and tries each address in turn, like libpq does.
    async fn dial(&self, deadline: Instant) -> Result<(Socket, std::net::SocketAddr), UpstreamError> {
        let resolve_err = |source| UpstreamError::Resolve { addr: self.addr.clone(), source };
        let addrs: Vec<_> = self
            .within(deadline, Phase::Resolve, &self.addr, tokio::net::lookup_host(self.addr.as_str()))
            .await?
            .map_err(resolve_err)?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
        if addrs.is_empty() {
            return Err(resolve_err(last));
        }
        for a in addrs {
            match self.within(deadline, Phase::Dial, &a.to_string(), Socket::connect(a)).await? {
                Ok(tcp) => {
                    // Postgres messages are small and latency-bound.
                    tcp.set_nodelay(true).map_err(|source| UpstreamError::Io {
                        addr: a.to_string(),
                        phase: Phase::Dial,
                        source,
                    })?;
                    return Ok((tcp, a));
                }
                Err(e) => last = io::Error::new(e.kind(), format!("{a}: {e}")),
            }
        }
        Err(UpstreamError::Unreachable { addr: self.addr.clone(), source: last })
    }

    fn handshake_error(&self, addr: String, e: io::Error) -> UpstreamError {
        let tls = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(_) => {
                *e.into_inner().and_then(|i| i.downcast::<rustls::Error>().ok()).expect("checked above")
            }
            None => return UpstreamError::Io { addr, phase: Phase::Handshake, source: e },
        };
        let rustls::Error::InvalidCertificate(cert) = tls else {
            return UpstreamError::Tls { addr, source: tls };
        };
        match cert {
            CertificateError::UnknownIssuer => {
                UpstreamError::UntrustedCertificate { addr, mozilla_roots: self.mozilla_roots }
            }
            CertificateError::NotValidForName => UpstreamError::NameMismatch {
                addr,
                expected: self.server_name_text.clone(),
                presented: vec![],
            },
            CertificateError::NotValidForNameContext { presented, .. } => UpstreamError::NameMismatch {
                addr,
                expected: self.server_name_text.clone(),
                presented: presented.iter().map(|n| presented_name(n).to_string()).collect(),
            },
            CertificateError::Expired => UpstreamError::Expired { addr, not_after: None },
            CertificateError::ExpiredContext { not_after, .. } => {
                UpstreamError::Expired { addr, not_after: rfc3339(not_after.as_secs() as i64) }
            }
            CertificateError::NotValidYet => UpstreamError::NotYetValid { addr, not_before: None },
            CertificateError::NotValidYetContext { not_before, .. } => {
                UpstreamError::NotYetValid { addr, not_before: rfc3339(not_before.as_secs() as i64) }
            }
            CertificateError::Revoked => UpstreamError::Revoked { addr },
            other => {
                UpstreamError::CertificateInvalid { addr, source: rustls::Error::InvalidCertificate(other) }
            }
        }
    }
}

/// The host part of "host:port" or "[v6]:port" (the port must be valid).
fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest.split_once("]:")?;
            (host, port)
        }
        None => addr.rsplit_once(':').filter(|(h, _)| !h.contains(':'))?,
    };
    (!host.is_empty() && port.parse::<u16>().is_ok()).then_some(host)
}

/// A certificate name as the operator would type it: webpki reports each
/// one Debug-formatted (`DnsName("db.example")`, `IpAddress(10.0.0.1)`).
fn presented_name(n: &str) -> &str {
    n.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| n.strip_prefix("IpAddress(").and_then(|r| r.strip_suffix(')')))
        .unwrap_or(n)
}

const NO_CERTS: &str = "no certificates found";
const NO_KEY: &str = "no private key found (PEM PKCS#8, PKCS#1 or SEC1; encrypted keys are not supported)";

/// Every certificate in a PEM file; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PemError::Empty(NO_CERTS));
    }
    Ok(certs)
}

/// Adds a CA file, or every *.pem / *.crt file of a directory; zero
/// certificates in either is an error (it is almost surely a wrong path).
fn load_ca(roots: &mut RootCertStore, path: &Path) -> Result<(), ConfigError> {
    let read_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ConfigError::Ca { path: p, source }
    };
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| read_err(path)(PemError::Io(e)))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
                (ext == "pem" || ext == "crt") && p.is_file()
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut found = 0;
    for file in files {
        let certs = match read_certs(&file) {
            // In a directory, a *.pem without certificates (a key, say) is skipped.
            Err(PemError::Empty(_)) if file != path => continue,
            other => other.map_err(read_err(&file))?,
        };
        for (i, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|source| ConfigError::CaUnusable {
                path: file.clone(),
                index: i + 1,
                source,
            })?;
            found += 1;
        }
    }
    if found == 0 {
        return Err(read_err(path)(PemError::Empty(NO_CERTS)));
    }
    Ok(())
}

fn rfc3339(unix: i64) -> Option<String> {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).ok()?);
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

/// A certificate's notAfter.
pub fn not_after(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).ok()?),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
    }

    fn opts() -> UpstreamOptions {
        UpstreamOptions {
            addr: "db.test:5432".into(),
            server_name: None,
            ca: vec![],
            client_cert: None,
            client_key: None,
            direct_tls: false,
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn config_err(o: &UpstreamOptions) -> String {
        match UpstreamTls::new(o) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a config error"),
        }
    }

    #[test]
    fn host_and_default_server_name() {
        for (addr, host) in [
            ("db.test:5432", Some("db.test")),
            ("127.0.0.1:5432", Some("127.0.0.1")),
            ("[::1]:5432", Some("::1")),
            ("db.test", None),
            ("::1:5432", None),
            (":5432", None),
            ("db.test:x", None),
        ] {
            assert_eq!(host_of(addr), host, "{addr}");
        }
        let tls = UpstreamTls::new(&UpstreamOptions { addr: "[::1]:5432".into(), ..opts() }).unwrap();
        assert_eq!(tls.server_name(), "::1");
        assert!(matches!(tls.server_name, ServerName::IpAddress(_)));
        let tls =
            UpstreamTls::new(&UpstreamOptions { server_name: Some("db.internal".into()), ..opts() }).unwrap();
        assert_eq!(tls.server_name(), "db.internal");
    }

    #[test]
    fn config_errors_name_the_flag() {
        let e = config_err(&UpstreamOptions { addr: "db.test".into(), ..opts() });
        assert!(e.starts_with("--upstream \"db.test\""), "{e}");
        let e = config_err(&UpstreamOptions { server_name: Some("not a name!".into()), ..opts() });
        assert!(e.starts_with("--upstream-server-name"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = config_err(&UpstreamOptions { ca: vec![missing.clone()], ..opts() });
        assert!(e.starts_with(&format!("--upstream-ca {}: ", missing.display())), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = config_err(&UpstreamOptions { ca: vec![empty.clone()], ..opts() });
        assert_eq!(e, format!("--upstream-ca {}: no certificates found", empty.display()));
        // A directory whose only *.pem holds no certificate, and other files ignored.
        std::fs::write(dir.path().join("README"), "x").unwrap();
        let e = config_err(&UpstreamOptions { ca: vec![dir.path().into()], ..opts() });
        assert_eq!(e, format!("--upstream-ca {}: no certificates found", dir.path().display()));

        let cert = fixture("client/client-rsa.pem");
        let e = config_err(&UpstreamOptions { client_cert: Some(cert.clone()), ..opts() });
        assert!(e.contains("--upstream-client-key is missing"), "{e}");
        let e = config_err(&UpstreamOptions {
            client_cert: Some(cert.clone()),
            client_key: Some(empty.clone()),
            ..opts()
        });
        assert!(e.starts_with("--upstream-client-key") && e.contains("no private key found"), "{e}");
        let e = config_err(&UpstreamOptions {
            client_cert: Some(cert),
            client_key: Some(fixture("client/client-ec.sec1.key")),
            ..opts()
        });
        assert!(e.starts_with("--upstream-client-key") && e.contains("not usable"), "{e}");
        // A broken key file: the message must not quote it.
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0!!!\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let e = config_err(&UpstreamOptions {
            client_cert: Some(fixture("client/client-rsa.pem")),
            client_key: Some(bad),
            ..opts()
        });
        assert!(e.contains("not valid PEM") && !e.contains("c2Vj"), "{e}");
    }

    #[test]
    fn ca_files_dirs_and_client_keys_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("client/ca.pem"), dir.path().join("a.crt")).unwrap();
        std::fs::copy(fixture("endpoint/rsa-sha256.pem"), dir.path().join("b.pem")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let tls = UpstreamTls::new(&UpstreamOptions {
            ca: vec![dir.path().into(), fixture("client/ca.pem")],
            ..opts()
        });
        assert!(!tls.unwrap().mozilla_roots);
        for (cert, key) in [
            ("client-rsa.pem", "client-rsa.pkcs8.key"),
            ("client-rsa.pem", "client-rsa.pkcs1.key"),
            ("client-ec.pem", "client-ec.sec1.key"),
        ] {
            let o = UpstreamOptions {
                client_cert: Some(fixture(&format!("client/{cert}"))),
                client_key: Some(fixture(&format!("client/{key}"))),
                direct_tls: true,
                ..opts()
            };
            let tls = UpstreamTls::new(&o).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(tls.config.alpn_protocols, vec![b"postgresql".to_vec()]);
        }
    }

    #[test]
    fn presented_names_lose_webpki_debug_wrapping() {
        for (raw, plain) in [
            (r#"DnsName("db.example")"#, "db.example"),
            (r#"DnsName("*.example")"#, "*.example"),
            ("IpAddress(10.0.0.1)", "10.0.0.1"),
            ("IpAddress(fd7a:115c:a1e0::1)", "fd7a:115c:a1e0::1"),
            ("UniformResourceIdentifier(\"x\")", "UniformResourceIdentifier(\"x\")"),
            ("Unsupported(0x80)", "Unsupported(0x80)"),
        ] {
            assert_eq!(presented_name(raw), plain, "{raw}");
        }
    }

    #[test]
    fn sides_codes_and_client_messages() {
        let addr = || "10.0.0.1:5432".to_string();
        let errors = [
            UpstreamError::ServerRefusedTls { addr: addr() },
            UpstreamError::ServerErrorBeforeTls { addr: addr() },
            UpstreamError::UnexpectedSslResponse { addr: addr(), byte: b'X' },
            UpstreamError::UntrustedCertificate { addr: addr(), mozilla_roots: true },
            UpstreamError::NameMismatch { addr: addr(), expected: "db.test".into(), presented: vec![] },
            UpstreamError::Expired { addr: addr(), not_after: Some("2020-01-01T00:00:00Z".into()) },
            UpstreamError::Timeout { addr: addr(), phase: Phase::Handshake, after: Duration::from_secs(1) },
            UpstreamError::Unreachable { addr: addr(), source: io::ErrorKind::ConnectionRefused.into() },
        ];
        let mut codes: Vec<_> = errors.iter().map(UpstreamError::reason_code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), errors.len(), "distinct reason codes");
        for e in &errors {
            assert_eq!(e.side(), Side::Upstream);
            assert!(e.to_string().contains("10.0.0.1:5432"), "{e}");
            let m = e.client_message();
            assert!(
                !m.contains("10.0.0.1")
                    && !m.contains("db.test")
                    && m.ends_with("the operator's log has the details"),
                "{m}"
            );
        }
        assert_eq!(serde_json::to_string(&Side::Proxy).unwrap(), "\"proxy\"");
    }
}
