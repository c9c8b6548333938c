//! `--auth scram-verifier`: tailgres authenticates the client itself, with
//! the role's stored SCRAM verifier (fetched by [`crate::lookup`]), and logs in to
//! the database with the client key recovered from the client's proof. The
//! password never exists in the proxy.
//!
//! With a TLS client the proxy offers SCRAM-SHA-256-PLUS bound to its own
//! certificate (tls-server-end-point), so clients that set
//! `channel_binding=require` log in; toward the database it binds to the
//! database's certificate ([`crate::scram::ScramClient::with_keys`]).
//!
//! Why the proof yields the client key (RFC 5802): the client sends
//! `ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)`; the verifier
//! holds StoredKey = H(ClientKey), so the proxy computes the HMAC, recovers
//! ClientKey, and checks H(ClientKey) = StoredKey. With ClientKey and the
//! verifier it can answer the database's SCRAM exchange of the same role,
//! as PgBouncer's auth_query does. Roles with an MD5 password: the stored
//! hash answers MD5 both ways.
//!
//! Keys are wiped from memory when dropped ([`ScramKeys`], [`Md5Hash`] and
//! the recovered client key).
#![forbid(unsafe_code)]

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL (and tailgres) support.
const TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// Server nonce bytes (PostgreSQL's SCRAM_RAW_NONCE_LEN).
const SERVER_NONCE_LEN: usize = 18;
/// Iterations of the stand-in verifier for a role without one
/// (PostgreSQL's default scram_iterations).
const MOCK_ITERATIONS: u32 = 4096;

/// A role's SCRAM-SHA-256 verifier:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub struct ScramKeys {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Drop for ScramKeys {
    fn drop(&mut self) {
        self.salt.zeroize();
        self.stored_key.zeroize();
        self.server_key.zeroize();
    }
}

/// A role's MD5 password hash: the 32 hex digits of md5(password || role).
pub struct Md5Hash(pub [u8; 32]);

impl Drop for Md5Hash {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What `pg_authid.rolpassword` holds for a role.
pub enum Verifier {
    Scram(ScramKeys),
    Md5(Md5Hash),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        match self {
            Verifier::Scram(k) => write!(f, "Verifier::Scram {{ iterations: {}, .. }}", k.iterations),
            Verifier::Md5(_) => f.write_str("Verifier::Md5 { .. }"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error("the stored password is neither a SCRAM-SHA-256 verifier nor an MD5 hash (a cleartext or unknown format cannot be used)")]
    UnknownFormat,
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    Malformed(&'static str),
}

impl Verifier {
    /// Parses a stored password. The text itself never reaches an error.
    pub fn parse(text: &str) -> Result<Verifier, VerifierError> {
        if let Some(rest) = text.strip_prefix("SCRAM-SHA-256$") {
            let (params, keys) = rest.split_once('$').ok_or(VerifierError::Malformed("no keys"))?;
            let (iter, salt) = params.split_once(':').ok_or(VerifierError::Malformed("no salt"))?;
            let (stored, server) = keys.split_once(':').ok_or(VerifierError::Malformed("no server key"))?;
            let iterations: u32 = iter.parse().map_err(|_| VerifierError::Malformed("iteration count"))?;
            if iterations == 0 {
                return Err(VerifierError::Malformed("iteration count"));
            }
            let salt = B64.decode(salt).map_err(|_| VerifierError::Malformed("salt is not base64"))?;
            if salt.is_empty() {
                return Err(VerifierError::Malformed("empty salt"));
            }
            let key = |s: &str| -> Result<[u8; 32], VerifierError> {
                let v =
                    Zeroizing::new(B64.decode(s).map_err(|_| VerifierError::Malformed("key is not base64"))?);
                v.as_slice().try_into().map_err(|_| VerifierError::Malformed("key is not 32 bytes"))
            };
            return Ok(Verifier::Scram(ScramKeys {
                iterations,
                salt,
                stored_key: key(stored)?,
                server_key: key(server)?,
            }));
        }
        if let Some(hex) = text.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                let mut h = [0u8; 32];
                h.copy_from_slice(hex.to_ascii_lowercase().as_bytes());
                return Ok(Verifier::Md5(Md5Hash(h)));
            }
        }
        Err(VerifierError::UnknownFormat)
    }

    /// A stand-in for a role that has no verifier (no such role, no
    /// password, cannot log in): the client goes through the same exchange
    /// as for a real role and fails at its proof, so a stranger cannot tell
    /// which roles exist. Its salt is stable per role (from `secret`, the
    /// process's own), as a real verifier's is.
    pub fn mock(role: &str, secret: &[u8; 32]) -> Verifier {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key");
        mac.update(b"tailgres mock salt\0");
        mac.update(role.as_bytes());
        let salt = mac.finalize().into_bytes()[..16].to_vec();
        Verifier::Scram(ScramKeys {
            iterations: MOCK_ITERATIONS,
            salt,
            // No client key hashes to this (it is random): every proof fails.
            stored_key: rand::random(),
            server_key: rand::random(),
        })
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// `HMAC(StoredKey, AuthMessage)` (the client signature) for `stored_key`.
pub fn client_signature(stored_key: &[u8; 32], auth_message: &[u8]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac(stored_key, &[auth_message]))
}

/// `HMAC(ServerKey, AuthMessage)` (the server signature).
pub fn server_signature(server_key: &[u8; 32], auth_message: &[u8]) -> [u8; 32] {
    hmac(server_key, &[auth_message])
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

/// `ClientKey XOR ClientSignature`: a proof from a client key, or the client
/// key from a proof.
pub fn proof(client_key_or_proof: &[u8; 32], signature: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    xor(client_key_or_proof, signature)
}

/// What went wrong in the client's SCRAM exchange, and what it is told.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramServerError {
    /// A malformed or out-of-order message (08P01).
    #[error("malformed SCRAM message from the client: {0}")]
    Protocol(String),
    /// Channel binding refused or not matching (08P01, as PostgreSQL).
    #[error("SCRAM channel binding: {0}")]
    Binding(&'static str),
    /// The proof did not verify: a wrong password (28P01).
    #[error("the client's SCRAM proof did not verify (wrong password, or a role without a usable password)")]
    WrongPassword,
}

struct Started {
    /// gs2 header, as the client sent it ("p=tls-server-end-point,,", "n,,"...).
    gs2_header: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
    nonce: Vec<u8>,
    plus: bool,
}

/// The server side of one client's SCRAM-SHA-256(-PLUS) exchange, sans-IO:
/// [`ScramServer::mechanisms`] for AuthenticationSASL,
/// [`ScramServer::client_first`] for the SASLInitialResponse, then
/// [`ScramServer::client_final`] for the SASLResponse.
pub struct ScramServer<'a> {
    keys: &'a ScramKeys,
    /// tls-server-end-point data of the proxy's certificate, when the
    /// client is on TLS (PLUS is offered only then).
    binding: Option<&'a [u8]>,
    started: Option<Started>,
}

/// What a successful exchange yields.
pub struct ClientVerified {
    /// AuthenticationSASLFinal's data for the client.
    pub server_final: Vec<u8>,
    pub client_key: Zeroizing<[u8; 32]>,
    /// The client used SCRAM-SHA-256-PLUS (bound to our certificate).
    pub channel_bound: bool,
}

impl std::fmt::Debug for ClientVerified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientVerified").field("channel_bound", &self.channel_bound).finish_non_exhaustive()
    }
}

impl<'a> ScramServer<'a> {
    pub fn new(keys: &'a ScramKeys, binding: Option<&'a [u8]>) -> Self {
        ScramServer { keys, binding, started: None }
    }

    /// AuthenticationSASL's mechanism list: PLUS first when we can bind.
    pub fn mechanisms(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.binding.is_some() {
            out.extend_from_slice(SCRAM_SHA_256_PLUS.as_bytes());
            out.push(0);
        }
        out.extend_from_slice(SCRAM_SHA_256.as_bytes());
        out.extend_from_slice(b"\0\0");
        out
    }

    /// Takes a SASLInitialResponse body (mechanism, Int32 length, data);
    /// returns server-first-message.
    pub fn client_first(&mut self, body: &[u8]) -> Result<Vec<u8>, ScramServerError> {
        let bad = |m: &str| ScramServerError::Protocol(m.to_string());
        if self.started.is_some() {
            return Err(bad("a second SASLInitialResponse"));
        }
        let nul = body.iter().position(|&b| b == 0).ok_or_else(|| bad("no mechanism name"))?;
        let mechanism = &body[..nul];
        let plus = match mechanism {
            m if m == SCRAM_SHA_256.as_bytes() => false,
            m if m == SCRAM_SHA_256_PLUS.as_bytes() && self.binding.is_some() => true,
            _ => return Err(bad("a SASL mechanism that was not offered")),
        };
        let rest = &body[nul + 1..];
        if rest.len() < 4 {
            return Err(bad("no initial response length"));
        }
        let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
        let data = &rest[4..];
        if len < 0 || len as usize != data.len() {
            return Err(bad("initial response length does not match"));
        }
        let text = std::str::from_utf8(data).map_err(|_| bad("client-first-message is not UTF-8"))?;

        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or_else(|| bad("no gs2 header"))?;
        match flag {
            "n" if !plus => {}
            "y" if !plus => {
                // The client can bind but believes we cannot: with PLUS on
                // offer, something in between removed it.
                if self.binding.is_some() {
                    return Err(ScramServerError::Binding(
                        "the client says the server does not support channel binding, but it does \
                         (SCRAM channel binding negotiation error)",
                    ));
                }
            }
            f if f.starts_with("p=") => {
                if !plus {
                    return Err(ScramServerError::Binding(
                        "the client asks for channel binding with SCRAM-SHA-256 (not -PLUS)",
                    ));
                }
                if &f[2..] != TLS_SERVER_END_POINT {
                    return Err(ScramServerError::Binding("unsupported channel binding type"));
                }
            }
            _ if plus => {
                return Err(ScramServerError::Binding("SCRAM-SHA-256-PLUS without channel binding data"))
            }
            _ => return Err(bad("unexpected gs2 channel binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or_else(|| bad("no client-first-message-bare"))?;
        if !authzid.is_empty() {
            return Err(bad("an authorization identity (a=) is not supported"));
        }
        let gs2_header = data[..flag.len() + authzid.len() + 2].to_vec();

        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or("");
        if user.starts_with("m=") {
            return Err(bad("mandatory SCRAM extensions are not supported"));
        }
        if !user.starts_with("n=") {
            return Err(bad("no username attribute"));
        }
        // PostgreSQL ignores the SCRAM username (the startup's user counts).
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or_else(|| bad("no client nonce"))?;
        if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
            return Err(bad("invalid client nonce"));
        }

        let mut combined = nonce.as_bytes().to_vec();
        let raw: [u8; SERVER_NONCE_LEN] = rand::random();
        combined.extend_from_slice(B64.encode(raw).as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&combined);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(B64.encode(&self.keys.salt).as_bytes());
        server_first.extend_from_slice(format!(",i={}", self.keys.iterations).as_bytes());
        self.started = Some(Started {
            gs2_header,
            client_first_bare: bare.as_bytes().to_vec(),
            server_first: server_first.clone(),
            nonce: combined,
            plus,
        });
        Ok(server_first)
    }

    /// Takes the SASLResponse body (client-final-message); checks the
    /// binding, the nonce and the proof, and returns the client key.
    pub fn client_final(&mut self, data: &[u8]) -> Result<ClientVerified, ScramServerError> {
        let bad = |m: &str| ScramServerError::Protocol(m.to_string());
        let s = self.started.take().ok_or_else(|| bad("client-final-message before client-first-message"))?;
        let text = std::str::from_utf8(data).map_err(|_| bad("client-final-message is not UTF-8"))?;
        let (without_proof, proof_b64) =
            text.rsplit_once(",p=").ok_or_else(|| bad("client-final-message without proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or_else(|| bad("no channel binding attribute"))?;
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or_else(|| bad("no nonce"))?;

        let cbind = B64.decode(cbind).map_err(|_| bad("channel binding attribute is not base64"))?;
        let mut expected = s.gs2_header.clone();
        if s.plus {
            // `plus` is only set when there is binding data.
            expected.extend_from_slice(self.binding.unwrap_or_default());
        }
        if cbind.ct_eq(&expected).unwrap_u8() != 1 {
            return Err(ScramServerError::Binding(
                "the channel binding data does not match tailgres's certificate (SCRAM channel binding check failed)",
            ));
        }
        if nonce.as_bytes() != s.nonce.as_slice() {
            return Err(bad("the nonce does not match"));
        }
        let proof_bytes = Zeroizing::new(B64.decode(proof_b64).map_err(|_| bad("proof is not base64"))?);
        let client_proof: &[u8; 32] =
            proof_bytes.as_slice().try_into().map_err(|_| bad("proof is not 32 bytes"))?;

        let mut auth_message = s.client_first_bare.clone();
        auth_message.push(b',');
        auth_message.extend_from_slice(&s.server_first);
        auth_message.push(b',');
        auth_message.extend_from_slice(without_proof.as_bytes());

        let signature = client_signature(&self.keys.stored_key, &auth_message);
        let client_key = proof(client_proof, &signature);
        let stored = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(client_key.as_slice())));
        if stored.ct_eq(&self.keys.stored_key).unwrap_u8() != 1 {
            return Err(ScramServerError::WrongPassword);
        }
        let v = server_signature(&self.keys.server_key, &auth_message);
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(B64.encode(v).as_bytes());
        Ok(ClientVerified { server_final, client_key, channel_bound: s.plus })
    }
}

/// `md5` + hex(md5(a || b)): PostgreSQL's MD5 password answer, with `a` the
/// stored hash's hex digits and `b` the 4-byte salt.
pub fn md5_answer(stored: &Md5Hash, salt: &[u8; 4]) -> Zeroizing<Vec<u8>> {
    use md5::Digest as _;
    let mut h = md5::Md5::new();
    h.update(stored.0);
    h.update(salt);
    let digest = h.finalize();
    let mut out = Zeroizing::new(b"md5".to_vec());
    for b in digest.iter() {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out
}

/// Checks a client's MD5 PasswordMessage body (answer and NUL) against the
/// stored hash for the salt it was sent.
pub fn md5_check(stored: &Md5Hash, salt: &[u8; 4], body: &[u8]) -> bool {
    let want = md5_answer(stored, salt);
    let got = body.strip_suffix(&[0]).unwrap_or(body);
    got.len() == want.len() && got.ct_eq(&want).unwrap_u8() == 1
}

#[cfg(test)]
mod tests;
