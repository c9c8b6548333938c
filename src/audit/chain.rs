//! Tamper evidence: every line carries a sequence number and the SHA-256 of
//! the line before it, and with a signing key the writer adds signed
//! checkpoints.
//!
//! The writer appends `"node":"<name>","seq":N,"prev":"<hex>"` to each
//! record's JSON object (so a record reads "when, what, who", then the
//! tailgres node that wrote it and its place in that node's chain). Each
//! node of a fleet keeps its own log and its own chain; `node` is part of
//! the line, so the chain covers it like any other field.
//! `prev` is the SHA-256 of the previous record's exact line, without its
//! newline; it is `null` only for the first record of a new chain. The
//! chain continues across restarts (the writer reads the last line of the
//! file it appends to), SIGHUP reopen and rotation (the first record of a
//! new file names the last of the old), so `tailgres audit verify` can put
//! rotated files back in order and say which one is missing.
//!
//! A line that is not a record (the fragment a killed writer left) is not
//! part of the chain: the next record names the last whole record before
//! it, and a reader reports the fragment.
//!
//! Checkpoints (`event: checkpoint`) sign `seq` and `prev` with Ed25519
//! ([`checkpoint_message`]); since `prev` covers every line before, one
//! valid signature vouches for the whole log up to it. The public key is in
//! every `log_opened` record and in the checkpoint itself.
#![forbid(unsafe_code)]

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How far back from the end of a file the writer looks for the last
/// whole line when it resumes the chain (longer lines are not written).
const RESUME_WINDOW: u64 = 1 << 20;

/// Prefix of a public key as the log writes it.
pub const KEY_PREFIX: &str = "ed25519:";

/// The chain's head: the last record line written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Its `seq`; 0 for a line written before chaining (an older tailgres).
    pub seq: u64,
    /// SHA-256 of the line, without its newline.
    pub hash: [u8; 32],
}

/// SHA-256 of a line (without its newline), as `prev` holds it.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `body` (one JSON object) with `node` (the writing node's name), `seq`
/// and `prev` appended, and a newline. Returns the line and the link it
/// makes.
pub fn stamp(body: &[u8], node: &str, head: Option<Link>) -> (Vec<u8>, Link) {
    debug_assert!(body.first() == Some(&b'{') && body.last() == Some(&b'}') && body.len() > 2);
    let seq = head.map_or(1, |h| h.seq + 1);
    let prev = match head {
        Some(h) => format!("\"{}\"", hex(&h.hash)),
        None => "null".into(),
    };
    // A JSON string (a DNS label needs no escaping, but nothing else can
    // break the line either).
    let node = serde_json::Value::from(node);
    let mut line = Vec::with_capacity(body.len() + 128);
    line.extend_from_slice(&body[..body.len() - 1]);
    line.extend_from_slice(format!(",\"node\":{node},\"seq\":{seq},\"prev\":{prev}}}").as_bytes());
    let link = Link { seq, hash: line_hash(&line) };
    line.push(b'\n');
    (line, link)
}

/// The head of the chain in an existing log: its last whole line (a
/// trailing fragment is skipped). `None` for an empty or missing file, or
/// one whose last line is longer than [`RESUME_WINDOW`].
pub fn resume(path: &Path) -> io::Result<Option<Link>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(RESUME_WINDOW);
    let mut tail = vec![0; (len - start) as usize];
    file.read_exact_at(&mut tail, start)?;
    Ok(last_whole_line(&tail, start == 0)
        .map(|line| Link { seq: seq_of(line).unwrap_or(0), hash: line_hash(line) }))
}

/// The last newline-terminated, non-blank line of `tail`. Unless `whole`
/// (the tail is the file from its first byte), the first line may be cut
/// and is not returned.
fn last_whole_line(tail: &[u8], whole: bool) -> Option<&[u8]> {
    let end = tail.iter().rposition(|&b| b == b'\n')?;
    let mut lines: Vec<&[u8]> = tail[..end].split(|&b| b == b'\n').collect();
    if !whole {
        // The first piece starts mid-line unless the byte before it was a
        // newline, which we cannot see: never trust it.
        lines.remove(0);
    }
    lines.into_iter().rev().find(|l| !l.iter().all(u8::is_ascii_whitespace))
}

/// The `seq` of a record line, if it has one.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq)
}

/// What a checkpoint signs: its own `seq` and `prev` (which covers every
/// line before it, their `node` included). The checkpoint's own `node` is
/// not in the message (it is vouched for by the next line's `prev`, as its
/// `ts` is), so the message is the same as before records named their node.
pub fn checkpoint_message(seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    format!("tailgres audit checkpoint v1\nseq={seq}\nprev={}\n", hex(prev)).into_bytes()
}

/// Whether `signature` (base64) is `key`'s (`ed25519:<base64>`) over the
/// checkpoint with this `seq` and `prev`.
pub fn verify_checkpoint(key: &str, seq: u64, prev: &[u8; 32], signature: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Some(public), Ok(sig)) = (parse_public_key(key), b64.decode(signature)) else { return false };
    UnparsedPublicKey::new(&ED25519, public).verify(&checkpoint_message(seq, prev), &sig).is_ok()
}

/// The 32 key bytes of `ed25519:<base64>`.
pub fn parse_public_key(key: &str) -> Option<Vec<u8>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(key.strip_prefix(KEY_PREFIX)?).ok()?;
    (raw.len() == 32).then_some(raw)
}

/// The checkpoint signing key (`--audit-signing-key`).
pub struct Signer {
    pair: Ed25519KeyPair,
    public: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("public", &self.public).finish_non_exhaustive()
    }
}

/// Why a signing key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(
        "{path} is not a PEM PKCS#8 Ed25519 private key ({why}); `tailgres audit keygen FILE` makes one"
    )]
    Parse { path: String, why: String },
    #[error("{path} is readable by group or others (mode {mode:o}); whoever reads it can sign a forged log: chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

impl Signer {
    /// Loads a PEM `PRIVATE KEY` (PKCS#8, as `tailgres audit keygen` or
    /// `openssl genpkey -algorithm ed25519` writes it). A key others can
    /// read is refused: it would let them sign a rewritten log.
    pub fn load(path: &Path) -> Result<Signer, KeyError> {
        use rustls_pki_types::pem::PemObject;
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let meta =
            std::fs::metadata(path).map_err(|source| KeyError::Read { path: shown.clone(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: shown, mode });
        }
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
            .map_err(|e| KeyError::Parse { path: shown.clone(), why: e.to_string() })?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| KeyError::Parse { path: shown, why: e.to_string() })?;
        Ok(Signer::from_pair(pair))
    }

    fn from_pair(pair: Ed25519KeyPair) -> Signer {
        let public = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref())
        );
        Signer { pair, public }
    }

    /// A new key written to `path` (mode 0600, which must not exist yet).
    pub fn generate(path: &Path) -> Result<Signer, KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Generate(e.to_string()))?;
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| KeyError::Generate(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
        let shown = path.display().to_string();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Write { path: shown.clone(), source })?;
        f.write_all(pem.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| KeyError::Write { path: shown, source })?;
        Ok(Signer::from_pair(pair))
    }

    /// `ed25519:<base64>`, as the log names it.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// Base64 signature of the checkpoint with this `seq` and `prev`.
    pub fn sign(&self, seq: u64, prev: &[u8; 32]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.pair.sign(&checkpoint_message(seq, prev)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_appends_node_seq_and_prev_and_links_the_exact_line() {
        let (first, a) = stamp(br#"{"event":"x"}"#, "pg-1", None);
        assert_eq!(first, b"{\"event\":\"x\",\"node\":\"pg-1\",\"seq\":1,\"prev\":null}\n");
        assert_eq!(a, Link { seq: 1, hash: line_hash(&first[..first.len() - 1]) });
        let (second, b) = stamp(br#"{"event":"y"}"#, "pg-1", Some(a));
        let text = String::from_utf8(second).unwrap();
        assert_eq!(
            text,
            format!("{{\"event\":\"y\",\"node\":\"pg-1\",\"seq\":2,\"prev\":\"{}\"}}\n", hex(&a.hash))
        );
        assert_eq!(b.seq, 2);
        assert_eq!(seq_of(text.trim_end().as_bytes()), Some(2));
        // Whatever the name, the line stays one JSON object.
        let (odd, _) = stamp(br#"{"event":"z"}"#, "a\"b\n", None);
        let v: serde_json::Value = serde_json::from_slice(&odd).unwrap();
        assert_eq!(v["node"], "a\"b\n");
    }

    #[test]
    fn resume_finds_the_last_whole_line_and_skips_a_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        assert_eq!(resume(&path).unwrap(), None, "missing file");
        std::fs::write(&path, "").unwrap();
        assert_eq!(resume(&path).unwrap(), None, "empty file");
        let (l1, _) = stamp(br#"{"n":1}"#, "tailgres", None);
        let (l2, k2) = stamp(br#"{"n":2}"#, "tailgres", Some(Link { seq: 6, hash: [0; 32] }));
        let mut text = [l1, l2].concat();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(resume(&path).unwrap(), Some(k2));
        text.extend_from_slice(b"{\"n\":3,\"se");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(resume(&path).unwrap(), Some(k2), "a torn tail is not the head");
        // A line from before chaining: linked, with seq 0.
        std::fs::write(&path, "{\"event\":\"old\"}\n").unwrap();
        assert_eq!(resume(&path).unwrap(), Some(Link { seq: 0, hash: line_hash(b"{\"event\":\"old\"}") }));
    }

    #[test]
    fn a_line_cut_by_the_resume_window_is_not_trusted() {
        assert_eq!(last_whole_line(b"tail of a long line\n", false), None);
        assert_eq!(last_whole_line(b"cut\nwhole\n", false), Some(&b"whole"[..]));
        assert_eq!(last_whole_line(b"whole\n\n", true), Some(&b"whole"[..]));
    }

    #[test]
    fn checkpoints_verify_with_their_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        let signer = Signer::generate(&key).unwrap();
        assert!(Signer::generate(&key).is_err(), "an existing key is never overwritten");
        let loaded = Signer::load(&key).unwrap();
        assert_eq!(loaded.public_key(), signer.public_key());
        let prev = line_hash(b"line");
        let sig = loaded.sign(7, &prev);
        assert!(verify_checkpoint(signer.public_key(), 7, &prev, &sig));
        assert!(!verify_checkpoint(signer.public_key(), 8, &prev, &sig), "another seq");
        assert!(!verify_checkpoint(signer.public_key(), 7, &line_hash(b"other"), &sig), "another prev");
        let other = Signer::generate(&dir.path().join("o.pem")).unwrap();
        assert!(!verify_checkpoint(other.public_key(), 7, &prev, &sig), "another key");
        assert!(!verify_checkpoint("ed25519:AAAA", 7, &prev, &sig));
        assert!(!verify_checkpoint(signer.public_key(), 7, &prev, "not base64!"));
    }

    #[test]
    fn keys_others_can_read_or_that_are_not_ed25519_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        Signer::generate(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(Signer::load(&key), Err(KeyError::Exposed { mode: 0o640, .. })));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Signer::load(&bad).unwrap_err().to_string();
        assert!(e.contains("tailgres audit keygen"), "{e}");
    }
}
