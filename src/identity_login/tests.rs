//! The CA checks and minted certificates, parsed back with x509-parser.

use super::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

const HOUR: Duration = Duration::from_secs(3600);

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

/// Writes a CA made from `params` (key: a fresh P-256 PKCS#8 key, or `key_pem`).
fn write_ca(params: CertificateParams, key_pem: Option<String>) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pem.unwrap_or_else(|| key.serialize_pem())).unwrap();
    Files { _dir: dir, cert: cert_path, key: key_path }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "Example Corp");
    p.distinguished_name.push(DnType::CommonName, "tailgres identity CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    p.not_before = (now - HOUR).into();
    p.not_after = (now + 24 * HOUR).into();
    p
}

fn load(f: &Files) -> Result<Arc<IdentityCa>, CaError> {
    IdentityCa::load(&f.cert, &f.key, DEFAULT_VALIDITY)
}

fn holder() -> Holder<'static> {
    Holder {
        role: "app_rw",
        principal: "alice@example.com",
        node: "alice-laptop.tail-lab.ts.net",
        session_id: "8f3a0c1d2e4b5a69",
    }
}

fn parsed<'a>(der: &'a CertificateDer<'_>) -> x509_parser::certificate::X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der).unwrap().1
}

#[test]
fn a_minted_certificate_names_the_role_the_person_and_the_session() {
    let f = write_ca(ca_params(), None);
    let ca = load(&f).unwrap();
    let before = SystemTime::now();
    let m = ca.mint(&holder()).unwrap();
    assert_eq!(m.chain.len(), 2, "the certificate, then the CA");
    let leaf = parsed(&m.chain[0]);
    let ca_cert = parsed(&m.chain[1]);
    // What `cert` authentication matches, and who it was for.
    let cn: Vec<_> = leaf.subject().iter_common_name().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(cn, ["app_rw"]);
    let ou: Vec<_> = leaf.subject().iter_organizational_unit().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(ou, ["alice@example.com"]);
    assert_eq!(
        m.facts.subject,
        "CN=app_rw,O=tailgres,serialNumber=8f3a0c1d2e4b5a69,L=alice-laptop.tail-lab.ts.net,OU=alice@example.com"
    );
    // The serial number is the session id.
    let serial = leaf.raw_serial().iter().skip_while(|b| **b == 0).fold(0u64, |n, b| n << 8 | u64::from(*b));
    assert_eq!(serial, 0x8f3a0c1d2e4b5a69);
    assert_eq!(m.facts.serial, "8f3a0c1d2e4b5a69");
    // Issued by the CA, byte for byte its subject.
    assert_eq!(leaf.issuer().as_raw(), ca_cert.subject().as_raw());
    // A client certificate, not a CA, valid for the configured minutes.
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(nb <= secs(before) - 59 && nb >= secs(before) - 61, "backdated a minute: {nb}");
    assert_eq!(na - nb, (DEFAULT_VALIDITY + BACKDATE).as_secs() as i64);
    assert_eq!(secs(m.facts.not_after), na);
}

#[test]
fn every_session_gets_its_own_key() {
    let f = write_ca(ca_params(), None);
    let ca = load(&f).unwrap();
    let a = ca.mint(&holder()).unwrap();
    let b = ca.mint(&holder()).unwrap();
    assert_ne!(a.key.secret_der(), b.key.secret_der());
    assert_ne!(parsed(&a.chain[0]).public_key().raw, parsed(&b.chain[0]).public_key().raw);
}

#[test]
fn names_with_separators_are_escaped_in_the_subject_text() {
    assert_eq!(escape("a,b+c"), "a\\,b\\+c");
    assert_eq!(escape(" lead"), "\\ lead");
    assert_eq!(escape("tail "), "tail\\ ");
    assert_eq!(escape("#x"), "\\#x");
    assert_eq!(escape("tag:ci,tag:prod"), "tag:ci\\,tag:prod");
    assert_eq!(escape("plain"), "plain");
}

fn load_err(f: &Files) -> String {
    load(f).unwrap_err().to_string()
}

#[test]
fn a_certificate_that_is_not_a_ca_is_refused() {
    let mut p = ca_params();
    p.is_ca = IsCa::ExplicitNoCa;
    let e = load_err(&write_ca(p, None));
    assert!(e.contains("not a CA certificate"), "{e}");
}

#[test]
fn a_ca_whose_key_usage_forbids_signing_certificates_is_refused() {
    let mut p = ca_params();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let e = load_err(&write_ca(p, None));
    assert!(e.contains("keyCertSign"), "{e}");
}

#[test]
fn an_expired_ca_is_refused() {
    let mut p = ca_params();
    let now = SystemTime::now();
    p.not_before = (now - 48 * HOUR).into();
    p.not_after = (now - 24 * HOUR).into();
    let e = load_err(&write_ca(p, None));
    assert!(e.contains("not valid now"), "{e}");
}

#[test]
fn a_key_that_is_not_the_cas_is_refused() {
    let other = KeyPair::generate().unwrap().serialize_pem();
    let e = load_err(&write_ca(ca_params(), Some(other)));
    assert!(e.contains("is not the private key of"), "{e}");
}

#[test]
fn a_key_in_another_format_is_refused_with_the_conversion_command() {
    // SEC1 ("EC PRIVATE KEY"), as `openssl ecparam -genkey` writes it.
    let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIIm0\n-----END EC PRIVATE KEY-----\n".to_string();
    let e = load_err(&write_ca(ca_params(), Some(sec1)));
    assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
    let e = load_err(&write_ca(ca_params(), Some(String::new())));
    assert!(e.contains("no usable private key"), "{e}");
}

#[test]
fn a_subject_tailgres_cannot_reproduce_is_refused_not_minted_under_another_name() {
    // A BMPString attribute (old Windows CAs write them): a string type
    // tailgres does not re-encode, so it refuses the CA at load.
    let mut p = ca_params();
    p.distinguished_name.push(
        DnType::OrganizationalUnitName,
        DnValue::BmpString(rcgen::BmpString::try_from("Ops".to_string()).unwrap()),
    );
    let e = load_err(&write_ca(p, None));
    assert!(e.contains("does not reproduce"), "{e}");
}

#[test]
fn missing_or_empty_files_are_named() {
    let f = write_ca(ca_params(), None);
    let missing =
        Files { _dir: tempfile::tempdir().unwrap(), cert: "/nonexistent/ca.pem".into(), key: f.key.clone() };
    let e = load_err(&missing);
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    std::fs::write(&f.cert, "").unwrap();
    let e = load_err(&f);
    assert!(e.contains("no certificate"), "{e}");
}
