//! The certificate tailgres offers clients that ask for TLS: the operator's
//! files, else the tailnet's HTTPS certificate for our MagicDNS name, else a
//! self-signed one (the client leg runs inside WireGuard either way).
//!
//! The certificate sits behind a resolver so a SIGHUP (files) or a renewal
//! (the tailnet's certificate) swaps it without touching the TLS config,
//! its session cache or its tickets.
#![forbid(unsafe_code)]

use crate::metrics::Metrics;
use crate::tailnet::{Status, Tailnet};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// Fetching the tailnet's HTTPS certificate must not hold up the start.
const CERT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the tailnet certificate is asked for again. tsnet renews it
/// itself when a third of its life is left (Let's Encrypt: 90 days), so
/// twice a day picks a renewal up long before the old one expires.
pub const RENEW_EVERY: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Files { cert: PathBuf, key: PathBuf },
    Tailnet { domain: String },
    SelfSigned,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{flag} {path}: {problem}")]
    File { flag: &'static str, path: PathBuf, problem: String },
    #[error("the certificate and key do not match or are unusable: {0}")]
    Unusable(rustls::Error),
    #[error("the tailnet's certificate: {0}")]
    Tailnet(String),
    #[error("self-signed certificate: {0}")]
    SelfSigned(String),
}

/// The swappable certificate.
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl CertSlot {
    pub fn new(k: CertifiedKey) -> Arc<CertSlot> {
        Arc::new(CertSlot(RwLock::new(Arc::new(k))))
    }

    /// tls-server-end-point channel binding data of the certificate offered
    /// now (what a SCRAM-SHA-256-PLUS client binds to), None when its
    /// signature algorithm has no single hash.
    pub fn binding(&self) -> Option<Vec<u8>> {
        crate::scram::tls_server_end_point(&self.leaf())
    }

    fn set(&self, k: CertifiedKey) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
    }

    fn leaf(&self) -> Vec<u8> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

pub struct ClientTls {
    pub config: Arc<rustls::ServerConfig>,
    pub source: Source,
    slot: Arc<CertSlot>,
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, CertError> {
    let provider = rustls::crypto::ring::default_provider();
    let k = CertifiedKey::from_der(certs, key, &provider).map_err(CertError::Unusable)?;
    Ok(k)
}

/// Reads a certificate chain and its key (e.g. for `--client-tls-cert`).
pub fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let certs =
        CertificateDer::pem_file_iter(cert).and_then(|i| i.collect::<Result<Vec<_>, _>>()).map_err(|e| {
            CertError::File { flag: "--client-tls-cert", path: cert.into(), problem: e.to_string() }
        })?;
    if certs.is_empty() {
        let problem = "no PEM certificate in it".into();
        return Err(CertError::File { flag: "--client-tls-cert", path: cert.into(), problem });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|_| CertError::File {
        flag: "--client-tls-key",
        path: key.into(),
        problem: "not a readable PEM private key".into(),
    })?;
    certified(certs, key_der)
}

fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Tailnet(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| CertError::Tailnet("its key is not PEM".into()))?;
    certified(certs, key)
}

/// The tailnet's certificate for `domain` (tsnet caches and renews it).
async fn fetch<T: Tailnet>(node: &T, domain: &str) -> Result<CertifiedKey, CertError> {
    match tokio::time::timeout(CERT_FETCH_TIMEOUT, node.cert_pair(domain)).await {
        Ok(Ok(pair)) => from_pem(&pair.cert_pem, &pair.key_pem),
        Ok(Err(e)) => Err(CertError::Tailnet(e.to_string())),
        Err(_) => Err(CertError::Tailnet(format!("no answer within {CERT_FETCH_TIMEOUT:?}"))),
    }
}

fn self_signed(st: &Status) -> Result<CertifiedKey, CertError> {
    let mut names = vec![st.dns_name.clone()];
    names.extend(st.tailscale_ips.iter().map(|ip| ip.to_string()));
    let cert = rcgen::generate_simple_self_signed(names).map_err(|e| CertError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
        .map_err(|e| CertError::SelfSigned(e.into()))?;
    certified(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
}

impl ClientTls {
    /// Picks the certificate as the module docs say.
    pub async fn new<T: Tailnet>(
        files: Option<&(PathBuf, PathBuf)>,
        node: &T,
        st: &Status,
    ) -> Result<ClientTls, CertError> {
        let (key, source) = if let Some((cert, key)) = files {
            tracing::info!(cert = %cert.display(), "client TLS: configured certificate");
            (load_files(cert, key)?, Source::Files { cert: cert.clone(), key: key.clone() })
        } else if st.cert_domains.iter().any(|d| d == &st.dns_name) {
            match fetch(node, &st.dns_name).await {
                Ok(k) => {
                    tracing::info!(name = %st.dns_name, "client TLS: the tailnet's HTTPS certificate");
                    (k, Source::Tailnet { domain: st.dns_name.clone() })
                }
                Err(e) => {
                    tracing::warn!(name = %st.dns_name, error = %e, "client TLS: no tailnet certificate; using a self-signed one");
                    (self_signed(st)?, Source::SelfSigned)
                }
            }
        } else {
            tracing::info!(name = %st.dns_name, "client TLS: self-signed (the tailnet offers no HTTPS certificate)");
            (self_signed(st)?, Source::SelfSigned)
        };
        let slot = CertSlot::new(key);
        let mut config =
            rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(slot.clone());
        // Direct TLS (PostgreSQL 17+) requires ALPN "postgresql".
        config.alpn_protocols = vec![crate::pgwire::ALPN_POSTGRESQL.to_vec()];
        // Resumption: the default in-memory session cache, plus tickets.
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(CertError::Unusable)?;
        Ok(ClientTls { config: Arc::new(config), source, slot })
    }

    /// The certificate offered now (for channel binding).
    pub fn slot(&self) -> Arc<CertSlot> {
        self.slot.clone()
    }

    /// When the certificate offered now expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        crate::upstream::not_after(&self.slot.leaf())
    }

    /// Puts a new certificate in place (new handshakes use it at once).
    pub fn replace(&self, k: CertifiedKey) {
        self.slot.set(k);
    }

    /// Asks the tailnet for its certificate every [`RENEW_EVERY`] and swaps
    /// in a renewed one. Only for [`Source::Tailnet`]; returns at once
    /// otherwise.
    pub async fn renew<T: Tailnet>(&self, node: &T, metrics: &Metrics) {
        let Source::Tailnet { domain } = &self.source else { return };
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            match fetch(node, domain).await {
                Ok(k) if k.cert.first().map(|c| c.to_vec()) != Some(self.slot.leaf()) => {
                    self.replace(k);
                    metrics.client_cert(self.not_after());
                    tracing::info!(name = %domain, "client TLS: renewed tailnet certificate in place");
                }
                Ok(_) => tracing::debug!(name = %domain, "client TLS: tailnet certificate unchanged"),
                Err(e) => {
                    metrics.error("cert_renewal");
                    tracing::warn!(name = %domain, error = %e, "client TLS: renewal failed; keeping the current certificate");
                }
            }
        }
    }
}
