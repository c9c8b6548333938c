//! Identity login: the tailnet identity is the database login.
//!
//! On a route with `login = "identity"`, a session whose grant allows it
//! (`"login": "identity"` in the capability value) is logged in to the
//! database with a client certificate tailgres signs for it, from a CA the
//! operator gives (`--identity-ca-cert`/`--identity-ca-key`). The database
//! trusts that CA for its `cert` method; the client sends no password.
//!
//! Each session gets a certificate of its own, with a fresh key: it names
//! the role (CN), the person or tags (OU), the machine (L) and the session
//! (the subject's serialNumber, and the certificate's serial number is the
//! session id too), so the database's `pg_stat_ssl` (`client_dn` starts
//! with the person; `client_serial` is the session) and its log name the
//! person, and a key is never shared between two people's sessions. It is
//! valid for a few minutes (the database checks it once, at login). Minting
//! one costs a key generation and a signature (see `bench/RESULTS.md`), done
//! on the blocking pool, never on an async worker.
//!
//! The CA is checked when it is loaded: a CA certificate (basicConstraints
//! CA:TRUE, keyCertSign where key usage is given), within its validity, the
//! key matching it, and a probe certificate signed with it verifies against
//! it (webpki, as strict as a database's TLS library). A CA that fails any
//! of these stops tailgres at start (or a reload) with the reason.
#![forbid(unsafe_code)]

use crate::audit::ClientCertificate;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PrintableString, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use x509_parser::der_parser::asn1_rs::Tag;

/// How long a minted certificate is valid, unless configured.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(5 * 60);
/// Bounds of `--identity-cert-validity`.
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);
pub const MAX_VALIDITY: Duration = Duration::from_secs(60 * 60);
/// A CA that expires sooner than this is warned about when it is loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// A certificate's validity starts this long before it is minted, so a
/// database whose clock is a little behind the proxy's accepts it.
const BACKDATE: Duration = Duration::from_secs(60);
/// The subject's O: says which tool minted it.
const ORGANIZATION: &str = "tailgres";
/// OID of the X.520 serialNumber attribute (2.5.4.5).
const SERIAL_NUMBER_ATTR: [u64; 4] = [2, 5, 4, 5];

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {why}", path.display())]
    Certificate { path: PathBuf, why: String },
    #[error(
        "{}: no usable private key in it ({why}); tailgres reads unencrypted PKCS#8 keys \
         (\"BEGIN PRIVATE KEY\"), ECDSA P-256/P-384, Ed25519 or RSA: convert one with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
        path.display()
    )]
    Key { path: PathBuf, why: String },
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("a probe certificate signed with {} does not verify against it: {why}", cert.display())]
    Probe { cert: PathBuf, why: String },
}

/// Why a certificate could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "the identity CA {} expired at {}; replace it and reload tailgres (SIGHUP)",
        cert.display(),
        crate::audit::rfc3339(*at, false)
    )]
    CaExpired { cert: PathBuf, at: SystemTime },
    #[error("signing the certificate: {0}")]
    Sign(#[from] rcgen::Error),
}

/// The operator's CA, loaded and checked.
pub struct IdentityCa {
    /// The CA as rcgen's issuer (its subject, as the CA certificate has it).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate and the rest of its file (intermediates), sent
    /// after each minted certificate.
    chain: Vec<CertificateDer<'static>>,
    validity: Duration,
    cert_path: PathBuf,
    /// The CA's own notAfter: no certificate outlives it, and none is
    /// minted after it.
    ca_not_after: SystemTime,
}

impl std::fmt::Debug for IdentityCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityCa")
            .field("cert", &self.cert_path)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// Who a certificate is minted for.
#[derive(Debug, Clone)]
pub struct Holder<'a> {
    /// The database role (the subject's CN: what `cert` authentication
    /// matches).
    pub role: &'a str,
    /// The person's login, or the device's tags.
    pub principal: &'a str,
    /// The machine's tailnet name.
    pub node: &'a str,
    /// The session id (16 hex digits): the certificate's serial number.
    pub session_id: &'a str,
}

/// A minted certificate and its key, and what the audit record says of it.
pub struct Minted {
    /// The certificate, then the CA's chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Serial (hex: the session id), subject (RFC 4514, CN first, as the
    /// database prints it) and validity, as the `auth_ok` record has them.
    pub facts: ClientCertificate,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted").field("facts", &self.facts).finish_non_exhaustive()
    }
}

impl IdentityCa {
    /// Loads and checks the CA (see the module docs); `validity` is how long
    /// each minted certificate is valid.
    pub fn load(cert_path: &Path, key_path: &Path, validity: Duration) -> Result<Arc<IdentityCa>, CaError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Read { path, source }
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .map_err(read_err(cert_path))?
            .collect::<Result<_, _>>()
            .map_err(read_err(cert_path))?;
        let Some(ca_der) = chain.first() else {
            return Err(CaError::NoCertificate { path: cert_path.to_path_buf() });
        };
        let cert_err = |why: String| CaError::Certificate { path: cert_path.to_path_buf(), why };
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| cert_err(format!("not a certificate tailgres can parse: {e}")))?;
        match ca.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(cert_err("not a CA certificate (basicConstraints CA:TRUE is missing)".into()))
            }
            Err(e) => return Err(cert_err(format!("unreadable basicConstraints: {e}"))),
        }
        match ca.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(cert_err(
                    "its key usage does not include keyCertSign (signing certificates)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(cert_err(format!("unreadable key usage: {e}"))),
        }
        if !ca.validity().is_valid() {
            return Err(cert_err(format!(
                "not valid now (valid from {} to {})",
                ca.validity().not_before,
                ca.validity().not_after
            )));
        }
        let ca_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(ca.validity().not_after.timestamp()).unwrap_or(0));
        if ca_not_after < SystemTime::now() + EXPIRY_WARNING {
            tracing::warn!(
                identity_ca = %cert_path.display(),
                not_after = %crate::audit::rfc3339(ca_not_after, false),
                "the identity CA expires within 30 days; identity login stops when it does"
            );
        }
        let distinguished_name = issuer_name(ca.subject()).map_err(cert_err)?;

        // The key signs database logins: say so when others can read it (a
        // warning, not a refusal: secret mounts are often 0440 or 0444).
        if let Ok(meta) = std::fs::metadata(key_path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    identity_ca_key = %key_path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "the identity CA's key is readable by group or others; whoever reads it can log in \
                     to the database as any role that trusts this CA"
                );
            }
        }
        let key_err = |why: String| CaError::Key { path: key_path.to_path_buf(), why };
        let key_der = PrivatePkcs8KeyDer::from_pem_file(key_path).map_err(|e| key_err(e.to_string()))?;
        let key = KeyPair::try_from(&PrivateKeyDer::Pkcs8(key_der)).map_err(|e| key_err(e.to_string()))?;
        if key.public_key_der() != ca.public_key().raw {
            return Err(CaError::Mismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf() });
        }
        // rcgen signs with an issuer given as a certificate; this one is
        // only ever read for its subject (the CA's, attribute by attribute).
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = params.self_signed(&key).map_err(|e| cert_err(e.to_string()))?;
        let ca =
            IdentityCa { issuer, key, chain, validity, cert_path: cert_path.to_path_buf(), ca_not_after };
        ca.probe()?;
        Ok(Arc::new(ca))
    }

    /// How long minted certificates are valid.
    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// When the CA itself expires (identity login stops then).
    pub fn not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// Mints a certificate for `holder`, valid from a minute ago for the
    /// configured validity (never past the CA's own notAfter).
    pub fn mint(&self, holder: &Holder<'_>) -> Result<Minted, MintError> {
        let now = SystemTime::now();
        if now >= self.ca_not_after {
            return Err(MintError::CaExpired { cert: self.cert_path.clone(), at: self.ca_not_after });
        }
        Ok(self.mint_between(holder, now - BACKDATE, (now + self.validity).min(self.ca_not_after))?)
    }

    /// Mints a certificate valid from `not_before` to `not_after`, as given
    /// (tests use it for an expired one).
    pub fn mint_between(
        &self,
        holder: &Holder<'_>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Minted, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        // DER order: the person first, because `pg_stat_ssl.client_dn`
        // prints it in this order and cuts it at 63 bytes; the database's
        // log (clientname=DN) prints it reversed (RFC 4514), CN first.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationalUnitName, holder.principal);
        dn.push(DnType::LocalityName, holder.node);
        let sid = PrintableString::try_from(holder.session_id.to_string())?;
        dn.push(DnType::CustomDnType(SERIAL_NUMBER_ATTR.to_vec()), DnValue::PrintableString(sid));
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::CommonName, holder.role);
        params.distinguished_name = dn;
        let serial = serial_of(holder.session_id);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain.iter().cloned());
        let subject = format!(
            "CN={},O={ORGANIZATION},serialNumber={},L={},OU={}",
            escape(holder.role),
            escape(holder.session_id),
            escape(holder.node),
            escape(holder.principal),
        );
        Ok(Minted {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            facts: ClientCertificate {
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
                subject,
                not_before,
                not_after,
            },
        })
    }

    /// Signs a probe certificate and verifies it against the CA the way a
    /// TLS server does (webpki): catches a CA whose subject tailgres would
    /// not reproduce, or any other reason its certificates would not verify.
    fn probe(&self) -> Result<(), CaError> {
        let holder =
            Holder { role: "probe", principal: "probe", node: "probe", session_id: "0000000000000001" };
        let probe_err = |why: String| CaError::Probe { cert: self.cert_path.clone(), why };
        let minted = self.mint(&holder).map_err(|e| probe_err(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        let root = self.chain.last().cloned().ok_or_else(|| probe_err("no CA certificate".into()))?;
        roots.add(root).map_err(|e| probe_err(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| probe_err(e.to_string()))?;
        let (leaf, intermediates) =
            minted.chain.split_first().ok_or_else(|| probe_err("empty chain".into()))?;
        let intermediates = intermediates.split_last().map(|(_, rest)| rest).unwrap_or(&[]);
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| probe_err(e.to_string()))?;
        Ok(())
    }
}

/// The certificate serial number for a session id: its 8 bytes (positive;
/// the encoder adds a leading zero where the top bit is set). A session id
/// that is not 16 hex digits (never, from `new_session_id`) gets random bytes.
fn serial_of(session_id: &str) -> Vec<u8> {
    match u64::from_str_radix(session_id, 16) {
        Ok(v) if session_id.len() == 16 => v.to_be_bytes().to_vec(),
        _ => rand::random::<u64>().to_be_bytes().to_vec(),
    }
}

/// The CA's subject for rcgen, attribute by attribute and in order. rcgen
/// keeps one value per attribute type and one attribute per RDN, so a
/// subject with a repeated type (two OUs, two DCs) or a multi-valued RDN is
/// refused here rather than minted under a name the database would not
/// match (use a dedicated CA: the README shows how to make one).
fn issuer_name(subject: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in subject.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("its subject has a multi-valued RDN, which tailgres cannot reproduce; \
                        use a CA with a plain subject"
                .into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| {
                format!("its subject has an attribute type tailgres cannot read ({})", attr.attr_type())
            })?
            .collect();
        if seen.contains(&oid) {
            return Err(format!(
                "its subject repeats the attribute {} (tailgres reproduces each type once); \
                 use a CA with a plain subject",
                attr.attr_type()
            ));
        }
        let value = attr.attr_value();
        let text = || {
            attr.as_str()
                .map(str::to_string)
                .map_err(|e| format!("its subject attribute {} is not text: {e}", attr.attr_type()))
        };
        let value = match value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text()?).map_err(|e| format!("its subject: {e}"))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                rcgen::Ia5String::try_from(text()?).map_err(|e| format!("its subject: {e}"))?,
            ),
            t => {
                return Err(format!(
                    "its subject attribute {} is a {t:?}, which tailgres does not reproduce \
                     (UTF8String, PrintableString and IA5String are)",
                    attr.attr_type()
                ))
            }
        };
        dn.push(DnType::CustomDnType(oid.clone()), value);
        seen.push(oid);
    }
    Ok(dn)
}

/// Escapes an RFC 4514 attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
