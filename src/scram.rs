//! SCRAM-SHA-256(-PLUS) client toward the upstream, for the password relay
//! (stage 6): the proxy holds the client's cleartext password and logs in
//! itself, bound to the upstream's real certificate (tls-server-end-point).
//! See docs/postgres-protocol.md, "SCRAM channel binding through a TLS-terminating proxy".
//!
//! Never `ChannelBinding::unrequested()` (gs2 flag `y`): toward a TLS upstream
//! that supports binding it is refused as a negotiation error. Without binding
//! data we send `n`, which PostgreSQL accepts.
//!
//! The binding data is tls-server-end-point (RFC 5929): a hash of the
//! upstream's end-entity certificate, computed here from its signature
//! algorithm as OpenSSL, and so PostgreSQL, computes it.
//!
//! Passwords: callers keep them in `zeroize::Zeroizing`; this module never
//! logs them or puts them in errors. `postgres_protocol`'s `ScramSha256` keeps
//! its own SASLprep-normalised copy (and later the salted password) without
//! zeroizing it on drop; drop the `ScramClient` as soon as the exchange ends.
#![forbid(unsafe_code)]

use std::io;

use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};

use sha2::Digest;

use crate::audit::Side;

/// Authentication request codes in 'R' messages ("Message Formats").
pub const AUTH_OK: i32 = 0;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

/// The most PBKDF2 iterations a database may ask for. The count comes from
/// the server-first message, so without a bound a hostile (or impostor)
/// database sets how much CPU each login costs the proxy. PostgreSQL's
/// default is 4096; this is about 24 times that (pgJDBC's cap too).
pub const MAX_ITERATIONS: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("the database offered SASL mechanisms {offered:?}, none of which tailgres speaks (SCRAM-SHA-256, or SCRAM-SHA-256-PLUS with tls-server-end-point)")]
    NoCommonMechanism { offered: Vec<String> },
    #[error("malformed AuthenticationSASL mechanism list from the database")]
    MalformedMechanisms,
    #[error("invalid SCRAM server-first message from the database: {0}")]
    ServerFirst(#[source] io::Error),
    #[error("the database's SCRAM server-final message did not verify (it does not hold this role's verifier, or something in between is answering): {0}")]
    ServerFinal(#[source] io::Error),
    #[error("SCRAM messages out of order: {0}")]
    OutOfOrder(&'static str),
    #[error(
        "the database asks for {0} SCRAM iterations; tailgres derives keys with at most {MAX_ITERATIONS}"
    )]
    TooManyIterations(u64),
    /// Verifier mode: the database's salt or iteration count is not the
    /// verifier's that was looked up (the password changed since).
    #[error("the database's SCRAM salt or iteration count differs from the role's verifier tailgres looked up (the password changed since); the next login looks it up again")]
    VerifierChanged,
}

impl ScramError {
    pub fn side(&self) -> Side {
        match self {
            ScramError::OutOfOrder(_) => Side::Proxy,
            _ => Side::Upstream,
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            ScramError::NoCommonMechanism { .. } => "upstream_sasl_mechanism",
            ScramError::MalformedMechanisms
            | ScramError::ServerFirst(_)
            | ScramError::TooManyIterations(_) => "upstream_scram_protocol",
            ScramError::VerifierChanged => "upstream_scram_verifier_changed",
            ScramError::ServerFinal(_) => "upstream_scram_server_signature",
            ScramError::OutOfOrder(_) => "proxy_scram_state",
        }
    }
}

/// Picks the mechanism and channel binding: PLUS bound to the upstream's
/// certificate when both are available, else plain SCRAM-SHA-256 with gs2 `n`.
pub fn choose_mechanism(offered: &[&str], binding: Option<&[u8]>) -> Option<(&'static str, ChannelBinding)> {
    match binding {
        Some(data) if offered.contains(&SCRAM_SHA_256_PLUS) => {
            Some((SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(data.to_vec())))
        }
        _ if offered.contains(&SCRAM_SHA_256) => Some((SCRAM_SHA_256, ChannelBinding::unsupported())),
        _ => None,
    }
}

/// The mechanism names in an AuthenticationSASL body (after its Int32 code):
/// NUL-terminated strings, ended by an empty one.
pub fn parse_mechanisms(body: &[u8]) -> Result<Vec<&str>, ScramError> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let nul = rest.iter().position(|&b| b == 0).ok_or(ScramError::MalformedMechanisms)?;
        if nul == 0 {
            return if rest.len() == 1 { Ok(out) } else { Err(ScramError::MalformedMechanisms) };
        }
        out.push(std::str::from_utf8(&rest[..nul]).map_err(|_| ScramError::MalformedMechanisms)?);
        rest = &rest[nul + 1..];
    }
}

enum Step {
    First,
    Final,
    Done,
}

/// One SCRAM exchange with the upstream.
pub struct ScramClient {
    mechanism: &'static str,
    /// Kept apart: `ScramSha256::message()` panics once the exchange is done.
    client_first: Vec<u8>,
    inner: Inner,
    step: Step,
}

enum Inner {
    /// From the password (the password relay).
    Password(ScramSha256),
    /// From the client key and the verifier (verifier mode).
    Keys(KeysExchange),
}

/// The client side of SCRAM computed from ClientKey and the role's
/// verifier instead of the password (RFC 5802, section 3): no PBKDF2.
struct KeysExchange {
    client_key: zeroize::Zeroizing<[u8; 32]>,
    keys: std::sync::Arc<crate::verifier::Verifier>,
    gs2_header: Vec<u8>,
    binding: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    auth_message: Vec<u8>,
}

impl KeysExchange {
    fn keys(&self) -> &crate::verifier::ScramKeys {
        match &*self.keys {
            crate::verifier::Verifier::Scram(k) => k,
            crate::verifier::Verifier::Md5(_) => unreachable!("with_keys takes SCRAM verifiers only"),
        }
    }

    fn server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        use base64::{engine::general_purpose::STANDARD as B64, Engine};
        let bad =
            |m: &str| ScramError::ServerFirst(io::Error::new(io::ErrorKind::InvalidInput, m.to_string()));
        let text = std::str::from_utf8(server_first).map_err(|_| bad("not UTF-8"))?;
        let mut attrs = text.split(',');
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or_else(|| bad("no nonce"))?;
        let salt = attrs.next().and_then(|a| a.strip_prefix("s=")).ok_or_else(|| bad("no salt"))?;
        let iterations =
            attrs.next().and_then(|a| a.strip_prefix("i=")).ok_or_else(|| bad("no iteration count"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(bad("the server nonce does not extend ours"));
        }
        let salt = B64.decode(salt).map_err(|_| bad("salt is not base64"))?;
        let keys = self.keys();
        if salt != keys.salt || iterations.parse::<u32>().ok() != Some(keys.iterations) {
            return Err(ScramError::VerifierChanged);
        }
        let mut cbind = self.gs2_header.clone();
        cbind.extend_from_slice(&self.binding);
        let without_proof = format!("c={},r={nonce}", B64.encode(&cbind));
        let mut auth = self.client_first_bare.as_bytes().to_vec();
        auth.push(b',');
        auth.extend_from_slice(server_first);
        auth.push(b',');
        auth.extend_from_slice(without_proof.as_bytes());
        let signature = crate::verifier::client_signature(&keys.stored_key, &auth);
        let proof = crate::verifier::proof(&self.client_key, &signature);
        self.auth_message = auth;
        Ok(format!("{without_proof},p={}", B64.encode(proof.as_slice())).into_bytes())
    }

    fn server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        use base64::{engine::general_purpose::STANDARD as B64, Engine};
        use subtle::ConstantTimeEq;
        let fail = |m: String| ScramError::ServerFinal(io::Error::new(io::ErrorKind::InvalidInput, m));
        let text = std::str::from_utf8(server_final).map_err(|_| fail("not UTF-8".into()))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(fail(format!("the database says {e}")));
        }
        let v = text.strip_prefix("v=").and_then(|v| B64.decode(v.split(',').next()?).ok());
        let want = crate::verifier::server_signature(&self.keys().server_key, &self.auth_message);
        match v {
            Some(v) if v.ct_eq(&want).unwrap_u8() == 1 => Ok(()),
            _ => Err(fail("invalid server signature".into())),
        }
    }
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient").field("mechanism", &self.mechanism).finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange for the mechanisms the upstream `offered`, bound to
    /// `binding` (tls-server-end-point data) when the upstream offers PLUS.
    pub fn new(password: &[u8], offered: &[&str], binding: Option<&[u8]>) -> Result<ScramClient, ScramError> {
        let (mechanism, cb) = choose_mechanism(offered, binding).ok_or_else(|| {
            ScramError::NoCommonMechanism { offered: offered.iter().map(|s| s.to_string()).collect() }
        })?;
        let inner = ScramSha256::new(password, cb);
        Ok(ScramClient {
            mechanism,
            client_first: inner.message().to_vec(),
            inner: Inner::Password(inner),
            step: Step::First,
        })
    }

    /// Starts an exchange from a client key recovered from the client's
    /// proof and the role's SCRAM verifier (verifier mode): the same
    /// mechanism and binding choice as [`ScramClient::new`].
    pub fn with_keys(
        client_key: &[u8; 32],
        verifier: std::sync::Arc<crate::verifier::Verifier>,
        offered: &[&str],
        binding: Option<&[u8]>,
    ) -> Result<ScramClient, ScramError> {
        use base64::{engine::general_purpose::STANDARD as B64, Engine};
        assert!(matches!(*verifier, crate::verifier::Verifier::Scram(_)), "a SCRAM verifier");
        let (mechanism, _) = choose_mechanism(offered, binding).ok_or_else(|| {
            ScramError::NoCommonMechanism { offered: offered.iter().map(|s| s.to_string()).collect() }
        })?;
        let plus = mechanism == SCRAM_SHA_256_PLUS;
        let gs2_header = if plus { b"p=tls-server-end-point,,".to_vec() } else { b"n,,".to_vec() };
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        let client_first_bare = format!("n=,r={nonce}");
        let client_first = [&gs2_header[..], client_first_bare.as_bytes()].concat();
        let inner = Inner::Keys(KeysExchange {
            client_key: zeroize::Zeroizing::new(*client_key),
            keys: verifier,
            gs2_header,
            binding: if plus { binding.unwrap_or_default().to_vec() } else { Vec::new() },
            client_first_bare,
            nonce,
            auth_message: Vec::new(),
        });
        Ok(ScramClient { mechanism, client_first, inner, step: Step::First })
    }

    /// "SCRAM-SHA-256-PLUS" or "SCRAM-SHA-256".
    pub fn mechanism(&self) -> &'static str {
        self.mechanism
    }

    pub fn channel_bound(&self) -> bool {
        self.mechanism == SCRAM_SHA_256_PLUS
    }

    /// client-first-message (the data of SASLInitialResponse).
    pub fn client_first(&self) -> Vec<u8> {
        self.client_first.clone()
    }

    /// The whole SASLInitialResponse frontend message.
    pub fn initial_response(&self) -> Vec<u8> {
        sasl_initial_response(self.mechanism, &self.client_first)
    }

    /// Takes AuthenticationSASLContinue's data, returns client-final-message
    /// (send it with [`sasl_response`]).
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.step, Step::First) {
            return Err(ScramError::OutOfOrder("server-first message after the first round"));
        }
        self.step = Step::Done;
        if let Some(i) = iterations(server_first).filter(|i| *i > u64::from(MAX_ITERATIONS)) {
            return Err(ScramError::TooManyIterations(i));
        }
        let reply = match &mut self.inner {
            // The key derivation (PBKDF2, `i` rounds): callers run this off
            // the async workers (see authenticate::password_relay).
            Inner::Password(p) => {
                p.update(server_first).map_err(ScramError::ServerFirst)?;
                p.message().to_vec()
            }
            Inner::Keys(k) => k.server_first(server_first)?,
        };
        self.step = Step::Final;
        Ok(reply)
    }

    /// Checks AuthenticationSASLFinal's data: only Ok means the upstream
    /// proved it knows the verifier (and, with PLUS, saw our binding).
    pub fn verify_server_final(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        if !matches!(self.step, Step::Final) {
            return Err(ScramError::OutOfOrder("server-final message before server-first"));
        }
        self.step = Step::Done;
        match &mut self.inner {
            Inner::Password(p) => p.finish(server_final).map_err(ScramError::ServerFinal),
            Inner::Keys(k) => k.server_final(server_final),
        }
    }

    /// Whether the database's key derivation runs here (PBKDF2: keep it
    /// off the async workers) or not at all (verifier mode).
    pub fn derives_keys(&self) -> bool {
        matches!(self.inner, Inner::Password(_))
    }
}

/// The `i=` attribute of a server-first message, if it reads as a number.
fn iterations(server_first: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(server_first).ok()?;
    let i = text.split(',').find_map(|a| a.strip_prefix("i="))?;
    // Saturates: a count too long for u64 is too many all the same.
    i.bytes().all(|b| b.is_ascii_digit()).then(|| i.parse::<u64>().unwrap_or(u64::MAX))
}

/// The hash tls-server-end-point uses for a certificate (RFC 5929 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// Signature (and, for RSASSA-PSS parameters, hash) algorithm OIDs, with the
/// hash RFC 5929 uses for them: MD5 and SHA-1 are replaced by SHA-256.
const END_POINT_HASHES: &[(&str, EndPointHash)] = &[
    ("1.2.840.113549.1.1.4", EndPointHash::Sha256), // md5WithRSAEncryption
    ("1.2.840.113549.1.1.5", EndPointHash::Sha256), // sha1WithRSAEncryption
    ("1.2.840.10045.4.1", EndPointHash::Sha256),    // ecdsa-with-SHA1
    ("1.2.840.10040.4.3", EndPointHash::Sha256),    // dsa-with-sha1
    ("1.2.840.113549.1.1.14", EndPointHash::Sha224), // sha224WithRSAEncryption
    ("1.2.840.10045.4.3.1", EndPointHash::Sha224),  // ecdsa-with-SHA224
    ("2.16.840.1.101.3.4.3.1", EndPointHash::Sha224), // dsa-with-sha224
    ("1.2.840.113549.1.1.11", EndPointHash::Sha256), // sha256WithRSAEncryption
    ("1.2.840.10045.4.3.2", EndPointHash::Sha256),  // ecdsa-with-SHA256
    ("2.16.840.1.101.3.4.3.2", EndPointHash::Sha256), // dsa-with-sha256
    ("1.2.840.113549.1.1.12", EndPointHash::Sha384), // sha384WithRSAEncryption
    ("1.2.840.10045.4.3.3", EndPointHash::Sha384),  // ecdsa-with-SHA384
    ("1.2.840.113549.1.1.13", EndPointHash::Sha512), // sha512WithRSAEncryption
    ("1.2.840.10045.4.3.4", EndPointHash::Sha512),  // ecdsa-with-SHA512
    ("1.2.840.113549.2.5", EndPointHash::Sha256),   // md5
    ("1.3.14.3.2.26", EndPointHash::Sha256),        // sha1
    ("2.16.840.1.101.3.4.2.4", EndPointHash::Sha224), // sha224
    ("2.16.840.1.101.3.4.2.1", EndPointHash::Sha256), // sha256
    ("2.16.840.1.101.3.4.2.2", EndPointHash::Sha384), // sha384
    ("2.16.840.1.101.3.4.2.3", EndPointHash::Sha512), // sha512
];
const OID_RSASSA_PSS: &str = "1.2.840.113549.1.1.10";
const OID_MGF1: &str = "1.2.840.113549.1.1.8";

fn hash_of_oid(oid: &str) -> Option<EndPointHash> {
    END_POINT_HASHES.iter().find(|(o, _)| *o == oid).map(|(_, h)| *h)
}

/// Which hash tls-server-end-point uses for this certificate: its signature
/// algorithm's (SHA-256 for MD5 and SHA-1); None when there is no single such
/// hash (Ed25519, Ed448, SHA-3, RSA-PSS whose MGF1 hash differs), and then
/// SCRAM must go without binding (gs2 `n`).
pub fn end_point_hash(cert_der: &[u8]) -> Option<EndPointHash> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let alg = &cert.signature_algorithm;
    let oid = alg.algorithm.to_id_string();
    if oid != OID_RSASSA_PSS {
        return hash_of_oid(&oid);
    }
    // PSS: the hash is in the parameters (SHA-1 when absent), which is where
    // OpenSSL's X509_get_signature_info, used by PostgreSQL, reads it.
    let params =
        x509_parser::signature_algorithm::RsaSsaPssParams::try_from(alg.parameters.as_ref()?).ok()?;
    let hash = params.hash_algorithm_oid().to_id_string();
    let mgf = params.mask_gen_algorithm().ok()?;
    if mgf.mgf.to_id_string() != OID_MGF1 || mgf.hash.to_id_string() != hash {
        return None;
    }
    hash_of_oid(&hash)
}

/// tls-server-end-point channel binding data for a certificate (DER).
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    Some(match end_point_hash(cert_der)? {
        EndPointHash::Sha224 => sha2::Sha224::digest(cert_der).to_vec(),
        EndPointHash::Sha256 => sha2::Sha256::digest(cert_der).to_vec(),
        EndPointHash::Sha384 => sha2::Sha384::digest(cert_der).to_vec(),
        EndPointHash::Sha512 => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// SASLInitialResponse: 'p', Int32 len, mechanism\0, Int32 data len, data.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(mechanism.len() + 5 + data.len());
    body.extend_from_slice(mechanism.as_bytes());
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    crate::pgwire::message_bytes(b'p', &body)
}

/// SASLResponse: 'p', Int32 len, data.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    crate::pgwire::message_bytes(b'p', data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

    /// The table lives in tests/fixtures/make-certs.sh, with digests computed
    /// by OpenSSL: `name expected-hash hex`.
    #[test]
    fn end_point_hash_table() {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/endpoint");
        let table = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
        for line in table.lines() {
            let [name, hash, digest] = line.split(' ').collect::<Vec<_>>()[..] else { panic!("{line}") };
            let der = CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap();
            let want = match hash {
                "sha224" => Some(EndPointHash::Sha224),
                "sha256" => Some(EndPointHash::Sha256),
                "sha384" => Some(EndPointHash::Sha384),
                "sha512" => Some(EndPointHash::Sha512),
                _ => None,
            };
            assert_eq!(end_point_hash(&der), want, "{name}");
            let data = tls_server_end_point(&der);
            let hex =
                data.map_or("none".into(), |d| d.iter().map(|b| format!("{b:02x}")).collect::<String>());
            assert_eq!(hex, digest, "{name}");
        }
        assert_eq!(table.lines().count(), 18, "every fixture is in the table");
    }

    #[test]
    fn sasl_messages_match_postgres_protocol() {
        for (mech, data) in
            [("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]), ("SCRAM-SHA-256-PLUS", b""), ("X", &[0u8; 300][..])]
        {
            let mut want = BytesMut::new();
            frontend::sasl_initial_response(mech, data, &mut want).unwrap();
            assert_eq!(sasl_initial_response(mech, data), want.to_vec(), "{mech}");
            let mut want = BytesMut::new();
            frontend::sasl_response(data, &mut want).unwrap();
            assert_eq!(sasl_response(data), want.to_vec());
        }
        // Hand-checked bytes for one case.
        assert_eq!(
            sasl_initial_response("M", b"ab"),
            [&b"p"[..], &[0, 0, 0, 12], b"M\0", &[0, 0, 0, 2], b"ab"].concat()
        );
        assert_eq!(sasl_response(b"xyz"), [&b"p"[..], &[0, 0, 0, 7], b"xyz"].concat());
    }

    /// (offered, binding data?, chosen mechanism, gs2 header of client-first)
    type Case<'a> = (&'a [&'a str], Option<&'a [u8]>, Option<&'a str>, &'a str);

    #[test]
    fn mechanism_choice() {
        let both = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"];
        let cb = Some(&[1u8; 32][..]);
        let table: [Case; 6] = [
            (&both, cb, Some("SCRAM-SHA-256-PLUS"), "p=tls-server-end-point,,"),
            (&both, None, Some("SCRAM-SHA-256"), "n,,"),
            (&["SCRAM-SHA-256"], cb, Some("SCRAM-SHA-256"), "n,,"),
            (&["SCRAM-SHA-256-PLUS"], cb, Some("SCRAM-SHA-256-PLUS"), "p=tls-server-end-point,,"),
            (&["SCRAM-SHA-256-PLUS"], None, None, ""),
            (&["OAUTHBEARER"], cb, None, ""),
        ];
        for (offered, binding, want, gs2) in table {
            assert_eq!(choose_mechanism(offered, binding).map(|(m, _)| m), want, "{offered:?}");
            match ScramClient::new(b"pw", offered, binding) {
                Ok(c) => {
                    assert_eq!(Some(c.mechanism()), want);
                    let first = String::from_utf8(c.client_first()).unwrap();
                    assert!(first.starts_with(&format!("{gs2}n=,r=")), "{first}");
                    assert!(!first.starts_with('y'));
                    assert_eq!(c.channel_bound(), gs2.starts_with('p'));
                    let msg = c.initial_response();
                    assert_eq!(msg, sasl_initial_response(c.mechanism(), first.as_bytes()));
                }
                Err(e) => {
                    assert!(want.is_none());
                    assert_eq!(e.reason_code(), "upstream_sasl_mechanism");
                }
            }
        }
    }

    #[test]
    fn mechanism_lists() {
        assert_eq!(
            parse_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap(),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert_eq!(parse_mechanisms(b"\0").unwrap(), Vec::<&str>::new());
        for bad in [&b""[..], b"SCRAM-SHA-256\0", b"SCRAM", b"A\0\0trailing", b"\xff\0\0"] {
            assert!(parse_mechanisms(bad).is_err(), "{bad:?}");
        }
    }

    /// A full exchange against a server computed here by hand (RFC 7677
    /// formulas), with channel binding, so the flags and binding data are
    /// checked, and errors never contain the password.
    #[test]
    fn exchange_and_errors() {
        use base64::{engine::general_purpose::STANDARD, Engine};
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        let hmac = |k: &[u8], m: &[u8]| {
            let mut h = Hmac::<Sha256>::new_from_slice(k).unwrap();
            h.update(m);
            h.finalize().into_bytes().to_vec()
        };
        let password = zeroize::Zeroizing::new(b"hunter2-secret".to_vec());
        let cb = [7u8; 32];
        let mut c = ScramClient::new(&password, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], Some(&cb)).unwrap();
        assert!(c.verify_server_final(b"v=AAAA").is_err());
        let first = String::from_utf8(c.client_first()).unwrap();
        let client_nonce = first.split_once(",r=").unwrap().1.to_string();
        let (salt, iters) = (b"saltsalt", 4096u32);
        let server_first = format!("r={client_nonce}SERVER,s={},i={iters}", STANDARD.encode(salt));
        let client_final =
            String::from_utf8(c.handle_server_first(server_first.as_bytes()).unwrap()).unwrap();
        let cbind = [&b"p=tls-server-end-point,,"[..], &cb].concat();
        assert!(client_final.starts_with(&format!("c={},r={client_nonce}SERVER,p=", STANDARD.encode(&cbind))));

        let mut salted = hmac(&password, &[&salt[..], &[0, 0, 0, 1]].concat());
        let mut u = salted.clone();
        for _ in 1..iters {
            u = hmac(&password, &u);
            salted.iter_mut().zip(&u).for_each(|(s, x)| *s ^= x);
        }
        let without_proof = client_final.rsplit_once(",p=").unwrap().0;
        let auth = format!("n=,r={client_nonce},{server_first},{without_proof}");
        let client_key = hmac(&salted, b"Client Key");
        let sig = hmac(&Sha256::digest(&client_key), auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        assert_eq!(client_final.rsplit_once(",p=").unwrap().1, STANDARD.encode(&proof));
        let server_sig = hmac(&hmac(&salted, b"Server Key"), auth.as_bytes());

        let mut wrong = ScramClient::new(&password, &["SCRAM-SHA-256"], None).unwrap();
        let n = String::from_utf8(wrong.client_first()).unwrap().split_once(",r=").unwrap().1.to_string();
        wrong.handle_server_first(format!("r={n}X,s=c2FsdA==,i=4096").as_bytes()).unwrap();
        let e =
            wrong.verify_server_final(format!("v={}", STANDARD.encode(&server_sig)).as_bytes()).unwrap_err();
        assert_eq!(e.reason_code(), "upstream_scram_server_signature");
        assert!(!format!("{e} {e:?}").contains("hunter2"));

        c.verify_server_final(format!("v={}", STANDARD.encode(&server_sig)).as_bytes()).unwrap();
        assert!(matches!(c.verify_server_final(b"v=x"), Err(ScramError::OutOfOrder(_))));
        assert!(matches!(c.handle_server_first(b"r=x"), Err(ScramError::OutOfOrder(_))));
        assert!(c.initial_response().ends_with(first.as_bytes()), "no panic after the exchange");

        // A server nonce that does not extend ours, and an absurd iteration count.
        let mut c = ScramClient::new(&password, &["SCRAM-SHA-256"], None).unwrap();
        assert!(matches!(
            c.handle_server_first(b"r=other,s=c2FsdA==,i=4096"),
            Err(ScramError::ServerFirst(_))
        ));
        let mut c = ScramClient::new(&password, &["SCRAM-SHA-256"], None).unwrap();
        let n = String::from_utf8(c.client_first()).unwrap().split_once(",r=").unwrap().1.to_string();
        let e = c.handle_server_first(format!("r={n}X,s=c2FsdA==,i=999999999").as_bytes()).unwrap_err();
        assert!(matches!(e, ScramError::TooManyIterations(999999999)), "{e:?}");
        assert!(!format!("{e:?}").contains("hunter2"));
        let mut c = ScramClient::new(&password, &["SCRAM-SHA-256"], None).unwrap();
        let huge = format!("r={n}X,s=c2FsdA==,i=99999999999999999999999999");
        assert!(matches!(c.handle_server_first(huge.as_bytes()), Err(ScramError::TooManyIterations(_))));
        assert!(format!("{c:?}").contains("SCRAM-SHA-256") && !format!("{c:?}").contains("hunter2"));
    }
}
