//! A throwaway certificate authority for the lab: one self-signed CA per run,
//! server certificates for the lab's PostgreSQL (good, wrong host, expired,
//! not yet valid) and client certificates for mTLS.
//!
//! Keys are ECDSA P-256 (rcgen's default), which PostgreSQL/OpenSSL and
//! rustls both accept. Private keys leave this module only as
//! `Zeroizing<String>` PEM so they are wiped when the caller drops them
//! (the CA's own `rcgen::KeyPair` is ring's and cannot be zeroized here).
#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use zeroize::Zeroizing;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Mode for private keys: PostgreSQL refuses a key readable by group/other
/// unless it is root-owned, and nobody else should read them anyway.
pub const KEY_MODE: u32 = 0o600;
/// Mode for certificates (public).
pub const CERT_MODE: u32 = 0o644;

/// When a certificate is valid, relative to now. Windows are whole days so
/// clock skew between the lab's processes never matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// now-1d .. now+30d
    Current,
    /// now-60d .. now-30d
    Expired,
    /// now+30d .. now+60d
    #[allow(dead_code)] // no UpstreamCert uses it yet; kept for client-side tests
    NotYetValid,
}

impl Validity {
    /// (not_before, not_after)
    fn window(self, now: SystemTime) -> (SystemTime, SystemTime) {
        match self {
            Validity::Current => (now - DAY, now + 30 * DAY),
            Validity::Expired => (now - 60 * DAY, now - 30 * DAY),
            Validity::NotYetValid => (now + 30 * DAY, now + 60 * DAY),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a key pair")]
    Generate(#[source] rcgen::Error),
    #[error("building certificate parameters for {names:?}")]
    Params {
        names: Vec<String>,
        #[source]
        source: rcgen::Error,
    },
    #[error("signing the certificate for {subject}")]
    Sign {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A self-signed CA (certificate + key), alive for one lab run.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    /// Creates a CA whose subject CN is `name`, valid now-1d .. now+30d.
    pub fn new(name: &str) -> Result<Ca, CertError> {
        let key = KeyPair::generate().map_err(CertError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_window(&mut params, Validity::Current);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Sign { subject: name.to_owned(), source })?;
        Ok(Ca { cert, key })
    }

    /// The CA certificate, PEM: what a client is told to trust.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key, PEM (PKCS#8): for the identity CA, which
    /// tailgres signs with (`--identity-ca-key`).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// Issues a TLS server certificate. `names` are DNS names or IP
    /// addresses (each becomes a DNS or IP subjectAltName); the first is
    /// also the subject CN.
    ///
    /// Returns `(cert_pem, key_pem)`.
    pub fn issue_server(
        &self,
        names: &[&str],
        validity: Validity,
    ) -> Result<(String, Zeroizing<String>), CertError> {
        let cn = names.first().copied().unwrap_or("server");
        self.issue(names, cn, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// Issues a TLS client certificate with subject CN `cn` (PostgreSQL's
    /// `clientcert=verify-full` compares the CN with the role name).
    /// Returns `(cert_pem, key_pem)`.
    #[allow(dead_code)] // for the lab's mTLS (tailgres -> PostgreSQL client certs)
    pub fn issue_client(&self, cn: &str) -> Result<(String, Zeroizing<String>), CertError> {
        self.issue(&[], cn, ExtendedKeyUsagePurpose::ClientAuth, Validity::Current)
    }

    fn issue(
        &self,
        names: &[&str],
        cn: &str,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<(String, Zeroizing<String>), CertError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params =
            CertificateParams::new(names.clone()).map_err(|source| CertError::Params { names, source })?;
        params.distinguished_name = dn(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_window(&mut params, validity);
        let key = KeyPair::generate().map_err(CertError::Generate)?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|source| CertError::Sign { subject: cn.to_owned(), source })?;
        Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tailgres-lab");
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_window(params: &mut CertificateParams, validity: Validity) {
    let (not_before, not_after) = validity.window(SystemTime::now());
    params.not_before = not_before.into();
    params.not_after = not_after.into();
}

/// Positive 64-bit random serial (RFC 5280 §4.1.2.2: unique per issuer).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 8] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte, so DER keeps 8 bytes
    SerialNumber::from_slice(&bytes)
}

/// Writes a certificate (public) with mode 0644.
pub fn write_cert(path: &Path, pem: &str) -> Result<(), CertError> {
    write_mode(path, pem.as_bytes(), CERT_MODE)
}

/// Writes a private key with mode 0600. The file is created with that mode,
/// so it is never readable by others, not even briefly.
pub fn write_key(path: &Path, pem: &Zeroizing<String>) -> Result<(), CertError> {
    write_mode(path, pem.as_bytes(), KEY_MODE)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
        // `mode` applies only when the file is created; an existing file
        // keeps its old mode unless we set it.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|source| CertError::Write { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    fn parse<R>(pem: &str, f: impl FnOnce(&x509_parser::certificate::X509Certificate) -> R) -> R {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        f(&cert)
    }

    fn now_secs() -> i64 {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn validity_windows() {
        let ca = Ca::new("test CA").unwrap();
        let day = 86_400;
        let cases = [
            (Validity::Current, -day, 30 * day),
            (Validity::Expired, -60 * day, -30 * day),
            (Validity::NotYetValid, 30 * day, 60 * day),
        ];
        for (validity, from, to) in cases {
            let now = now_secs();
            let (cert_pem, _) = ca.issue_server(&["db.lab.test"], validity).unwrap();
            parse(&cert_pem, |c| {
                let nb = c.validity().not_before.timestamp() - now;
                let na = c.validity().not_after.timestamp() - now;
                assert!((nb - from).abs() < 60, "{validity:?} not_before {nb}");
                assert!((na - to).abs() < 60, "{validity:?} not_after {na}");
            });
        }
    }

    #[test]
    fn server_sans_and_issuer() {
        let ca = Ca::new("test CA").unwrap();
        let (cert_pem, _) = ca.issue_server(&["db.lab.test", "127.0.0.1"], Validity::Current).unwrap();
        let ca_pem = ca.cert_pem();
        let (_, ca_der) = parse_x509_pem(ca_pem.as_bytes()).unwrap();
        let ca_cert = ca_der.parse_x509().unwrap();
        assert!(ca_cert.is_ca());
        parse(&cert_pem, |c| {
            assert_eq!(c.issuer(), ca_cert.subject());
            let san = c.subject_alternative_name().unwrap().unwrap();
            let names: Vec<String> = san
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(b) => {
                        let a: [u8; 4] = (*b).try_into().unwrap();
                        IpAddr::from(a).to_string()
                    }
                    other => panic!("unexpected SAN {other:?}"),
                })
                .collect();
            assert_eq!(names, ["db.lab.test", "127.0.0.1"]);
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && !eku.client_auth);
        });
    }

    #[test]
    fn client_cert_has_cn_and_client_auth() {
        let ca = Ca::new("test CA").unwrap();
        let (cert_pem, key_pem) = ca.issue_client("role_scram").unwrap();
        parse(&cert_pem, |c| {
            let cn = c.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), "role_scram");
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
        });
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn key_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test CA").unwrap();
        let (cert_pem, key_pem) = ca.issue_client("x").unwrap();
        let key = dir.path().join("k.pem");
        // Pre-existing file with a loose mode must be tightened.
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        write_key(&key, &key_pem).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&key).unwrap(), *key_pem);
        let crt = dir.path().join("c.pem");
        write_cert(&crt, &cert_pem).unwrap();
        assert_eq!(fs::metadata(&crt).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
