//! Fuzz target: the authentication exchange (`authenticate::authenticate`)
//! between a hostile client and a malicious database, over in-memory duplex
//! streams, and the SCRAM client (`scram::ScramClient`) on its own.
//!
//! The database is a scripted actor: plausible sessions (trust, cleartext,
//! MD5, SASL with a real SCRAM server that answers the proxy's nonce and
//! can compute a correct server signature) whose steps are then replaced,
//! dropped, duplicated or mutated into arbitrary authentication requests,
//! SASL messages, ErrorResponses, truncated and oversized messages. The
//! client is a script of password messages, SASL responses, Terminate,
//! other messages and raw bytes. Both end by closing their side.
//!
//! Properties, for every script:
//! - `authenticate` returns (bounded) with Ok or a typed `AuthError`, and
//!   does not panic;
//! - the database receives exactly the re-encoded StartupMessage, then
//!   whole 'p' messages; the client receives whole messages only;
//! - on Ok the client's last message is ReadyForQuery and the byte
//!   counters equal what each side received; on `Rejected` the client's
//!   last message is the database's ErrorResponse;
//! - the client's password never appears in an error, never reaches the
//!   client, and, for a TLS client in password-relay mode whose database
//!   asks for SASL first, never reaches the database whatever it does next
//!   (the relay runs SCRAM itself); gs2 flag `y` is never sent;
//! - a password-relay session succeeds only if the database proved it
//!   holds the verifier (a correct SCRAM server signature).

mod fuzz;

use base64::{engine::general_purpose::STANDARD, Engine};
use fuzz::*;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tailgres::audit::AuthMethod;
use tailgres::authenticate::{authenticate, AuthError, AuthMode, AuthOutcome, Credentials, VerifiedClient};
use tailgres::negotiate::Startup;
use tailgres::pgwire::{self, auth};
use tailgres::scram::{self, ScramClient, ScramError};
use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const REGRESSIONS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/regressions/fuzz_authenticate.txt");
/// The client's password; the scripted database knows it too (so it can
/// compute a correct SCRAM server signature when the script says so).
const PASSWORD: &str = "fuzz-Pa55w0rd-7f3a9c";
/// A password sent later in a script (never the first message), which the
/// proxy may legitimately relay when the database asks for one.
const OTHER_PASSWORD: &str = "other-password-without-terminator";
/// How long the database waits (virtual time) for a message it expects
/// from the proxy before going on without it.
const DB_PATIENCE: Duration = Duration::from_secs(1);

// ------------------------------------------------------------ database

#[derive(Debug, Clone)]
enum Final {
    /// v= the right server signature (when the exchange allows one).
    Correct,
    /// v= a signature over something else.
    Wrong,
    /// e=... a server error attribute.
    ServerError,
    Raw(Vec<u8>),
}

#[derive(Debug, Clone)]
enum DbStep {
    /// Bytes written as they are (messages, mutated or not).
    Send(Vec<u8>),
    /// AuthenticationSASLContinue with a server-first message built on the
    /// nonce of the proxy's SASLInitialResponse (waited for).
    ScramFirst { suffix: String, salt: Vec<u8>, iterations: u32, garble: Vec<Mutation> },
    /// AuthenticationSASLFinal after the proxy's client-final (waited for).
    ScramFinal(Final),
}

fn r(code: u32, data: &[u8]) -> Vec<u8> {
    pgwire::auth_request(code, data)
}

fn mechanisms(list: &[&str]) -> Vec<u8> {
    let mut b: Vec<u8> = list.iter().flat_map(|m| [m.as_bytes(), b"\0"].concat()).collect();
    b.push(0);
    b
}

/// A backend message a database might send during authentication.
fn backend_message() -> impl Strategy<Value = Vec<u8>> {
    let mech_list = prop_oneof![
        Just(mechanisms(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])),
        Just(mechanisms(&["SCRAM-SHA-256"])),
        Just(mechanisms(&["SCRAM-SHA-256-PLUS"])),
        Just(mechanisms(&["OAUTHBEARER"])),
        Just(mechanisms(&[])),
        Just(b"SCRAM-SHA-256".to_vec()),
        Just(b"SCRAM-SHA-256\0\0trailing".to_vec()),
        bytes(24),
    ];
    prop_oneof![
        3 => Just(r(auth::OK, &[])),
        2 => Just(r(auth::CLEARTEXT, &[])),
        2 => bytes(4).prop_map(|salt| r(auth::MD5, &salt)),
        3 => mech_list.prop_map(|l| r(auth::SASL, &l)),
        2 => bytes(40).prop_map(|d| r(auth::SASL_CONTINUE, &d)),
        2 => bytes(40).prop_map(|d| r(auth::SASL_FINAL, &d)),
        1 => (any::<u32>(), bytes(16)).prop_map(|(c, d)| r(c, &d)),
        1 => bytes(3).prop_map(|d| pgwire::message_bytes(b'R', &d)),
        2 => ("[0-9A-Z]{5}", "[ -~]{0,30}").prop_map(|(c, m)| pgwire::error_response("FATAL", &c, &m, None)),
        1 => bytes(40).prop_map(|d| pgwire::message_bytes(b'E', &d)),
        1 => bytes(40).prop_map(|d| pgwire::message_bytes(b'N', &d)),
        1 => bytes(16).prop_map(|d| pgwire::message_bytes(b'v', &d)),
        2 => ("[a-z_]{1,12}", "[ -~]{0,12}")
            .prop_map(|(k, v)| pgwire::message_bytes(b'S', format!("{k}\0{v}\0").as_bytes())),
        2 => (any::<u32>(), prop_oneof![Just(4usize), Just(32), Just(256), 0usize..300])
            .prop_map(|(pid, n)| pgwire::message_bytes(b'K', &[&pid.to_be_bytes()[..], &vec![7u8; n]].concat())),
        3 => prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')].prop_map(|s| pgwire::message_bytes(b'Z', &[s])),
        1 => (any::<u8>(), bytes(32)).prop_map(|(t, d)| pgwire::message_bytes(t, &d)),
        // Oversized and truncated.
        1 => (any::<u8>(), length_field()).prop_map(|(t, l)| [&[t][..], &l.to_be_bytes()].concat()),
        1 => Just([&b"S"[..], &((1u32 << 20) + 5).to_be_bytes()].concat()),
        1 => bytes(8),
    ]
}

fn post_auth() -> Vec<DbStep> {
    vec![
        DbStep::Send(r(auth::OK, &[])),
        DbStep::Send(pgwire::message_bytes(b'S', b"server_version\x0017.2\0")),
        DbStep::Send(pgwire::message_bytes(b'K', &[0, 0, 0, 42, 1, 2, 3, 4])),
        DbStep::Send(pgwire::message_bytes(b'Z', b"I")),
    ]
}

fn final_kind() -> impl Strategy<Value = Final> {
    prop_oneof![
        6 => Just(Final::Correct),
        1 => Just(Final::Wrong),
        1 => Just(Final::ServerError),
        1 => bytes(48).prop_map(Final::Raw),
    ]
}

fn scram_first() -> impl Strategy<Value = DbStep> {
    (
        prop_oneof![4 => "[A-Za-z0-9+/]{1,24}", 1 => Just(String::new()), 1 => "[ -~]{0,8}"],
        proptest::collection::vec(any::<u8>(), 0..20),
        prop_oneof![6 => 1u32..=8, 1 => Just(4096u32), 1 => Just(0u32), 1 => Just(100_001u32), 1 => Just(u32::MAX)],
        prop_oneof![4 => Just(vec![]), 1 => proptest::collection::vec(mutation(), 1..3)],
    )
        .prop_map(|(suffix, salt, iterations, garble)| DbStep::ScramFirst { suffix, salt, iterations, garble })
}

/// A plausible database session, then edits.
fn db_script() -> impl Strategy<Value = Vec<DbStep>> {
    let sasl = (
        prop_oneof![
            Just(mechanisms(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])),
            Just(mechanisms(&["SCRAM-SHA-256"])),
            Just(mechanisms(&["SCRAM-SHA-256-PLUS"])),
        ],
        scram_first(),
        final_kind(),
    )
        .prop_map(|(mechs, first, fin)| {
            let mut s = vec![DbStep::Send(r(auth::SASL, &mechs)), first, DbStep::ScramFinal(fin)];
            s.extend(post_auth());
            s
        });
    let base = prop_oneof![
        1 => Just(post_auth()),
        1 => Just([vec![DbStep::Send(r(auth::CLEARTEXT, &[]))], post_auth()].concat()),
        1 => Just([vec![DbStep::Send(r(auth::MD5, &[1, 2, 3, 4]))], post_auth()].concat()),
        4 => sasl,
        1 => Just(vec![]),
    ];
    #[derive(Debug, Clone)]
    enum Edit {
        Replace(usize, Vec<u8>),
        Insert(usize, Vec<u8>),
        Drop(usize),
        Duplicate(usize),
        Mutate(usize, Mutation),
        InsertStep(usize, DbStep),
    }
    let edit = prop_oneof![
        3 => (any::<usize>(), backend_message()).prop_map(|(i, m)| Edit::Replace(i, m)),
        3 => (any::<usize>(), backend_message()).prop_map(|(i, m)| Edit::Insert(i, m)),
        1 => any::<usize>().prop_map(Edit::Drop),
        1 => any::<usize>().prop_map(Edit::Duplicate),
        2 => (any::<usize>(), mutation()).prop_map(|(i, m)| Edit::Mutate(i, m)),
        1 => (any::<usize>(), prop_oneof![scram_first(), final_kind().prop_map(DbStep::ScramFinal)])
            .prop_map(|(i, s)| Edit::InsertStep(i, s)),
    ];
    (base, prop_oneof![2 => Just(vec![]), 3 => proptest::collection::vec(edit, 1..4)]).prop_map(
        |(mut s, edits)| {
            for e in edits {
                let n = s.len();
                match e {
                    Edit::Replace(i, m) if n > 0 => s[i % n] = DbStep::Send(m),
                    Edit::Insert(i, m) => s.insert(i % (n + 1), DbStep::Send(m)),
                    Edit::Drop(i) if n > 0 => drop(s.remove(i % n)),
                    Edit::Duplicate(i) if n > 0 => s.insert(i % n, s[i % n].clone()),
                    Edit::Mutate(i, m) if n > 0 => {
                        if let DbStep::Send(b) = &mut s[i % n] {
                            mutate(b, &m);
                        }
                    }
                    Edit::InsertStep(i, st) => s.insert(i % (n + 1), st),
                    _ => {}
                }
            }
            s
        },
    )
}

/// What the database saw and did.
#[derive(Debug, Default)]
struct DbLog {
    /// Every byte the proxy sent upstream.
    received: Vec<u8>,
    /// The proxy's upstream bytes did not frame as startup + messages.
    framing_error: Option<String>,
    /// A correct SCRAM server signature was sent.
    proved_verifier: bool,
    /// gs2 headers of the SASLInitialResponses the proxy sent.
    gs2_headers: Vec<String>,
}

/// The proxy's next 'p' message, if one comes within [`DB_PATIENCE`].
async fn next_p(rx: &mut mpsc::UnboundedReceiver<(u8, Vec<u8>)>) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(DB_PATIENCE, rx.recv()).await {
            Ok(Some((b'p', body))) => return Some(body),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut h = Hmac::<Sha256>::new_from_slice(key).unwrap();
    h.update(msg);
    h.finalize().into_bytes().to_vec()
}

fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut u = hmac(password, &[salt, &[0, 0, 0, 1]].concat());
    let mut out = u.clone();
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(&u).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// The scripted database. Reads the proxy's messages as they come (for
/// the SCRAM steps) and logs every byte.
async fn database<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, steps: Vec<DbStep>) -> DbLog {
    let (mut rd, mut w) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<(u8, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut framing_error = None;
        // StartupMessage: Int32 length, then the rest.
        let mut len = [0u8; 4];
        if rd.read_exact(&mut len).await.is_ok() {
            all.extend_from_slice(&len);
            let n = (u32::from_be_bytes(len) as usize).saturating_sub(4);
            let mut body = vec![0; n.min(1 << 20)];
            if rd.read_exact(&mut body).await.is_ok() {
                all.extend_from_slice(&body);
                loop {
                    let mut head = [0u8; 5];
                    match rd.read_exact(&mut head[..1]).await {
                        Ok(_) => {}
                        Err(_) => break, // the proxy is done
                    }
                    if rd.read_exact(&mut head[1..]).await.is_err() {
                        framing_error = Some("a message header cut short".into());
                        all.extend_from_slice(&head[..1]);
                        break;
                    }
                    all.extend_from_slice(&head);
                    let n = (u32::from_be_bytes(head[1..].try_into().unwrap()) as usize).saturating_sub(4);
                    let mut body = vec![0; n.min(1 << 20)];
                    if rd.read_exact(&mut body).await.is_err() {
                        framing_error = Some("a message body cut short".into());
                        break;
                    }
                    all.extend_from_slice(&body);
                    let _ = tx.send((head[0], body));
                }
            } else {
                framing_error = Some("StartupMessage cut short".into());
            }
        }
        let mut rest = Vec::new();
        let _ = rd.read_to_end(&mut rest).await;
        if !rest.is_empty() && framing_error.is_none() {
            framing_error = Some(format!("{} bytes after a cut-short message", rest.len()));
        }
        all.extend(rest);
        (all, framing_error)
    });

    let mut log = DbLog::default();
    // SCRAM state: client-first-bare, server-first, salted password, ok.
    let mut client_first_bare: Option<String> = None;
    let mut exchange: Option<(String, Vec<u8>)> = None;
    for step in steps {
        let bytes = match step {
            DbStep::Send(b) => b,
            DbStep::ScramFirst { suffix, salt, iterations, garble } => {
                exchange = None;
                client_first_bare = None;
                let mut nonce = String::from("no-client-first");
                if let Some(body) = next_p(&mut rx).await {
                    // mechanism\0, Int32 length, client-first-message
                    if let Some(nul) = body.iter().position(|&b| b == 0) {
                        let data = body.get(nul + 5..).unwrap_or_default();
                        if let Ok(first) = std::str::from_utf8(data) {
                            let mut parts = first.splitn(3, ',');
                            let (flag, authzid, bare) = (parts.next(), parts.next(), parts.next());
                            if let (Some(flag), Some(_), Some(bare)) = (flag, authzid, bare) {
                                log.gs2_headers.push(flag.to_string());
                                if let Some(n) = bare.split_once(",r=").map(|(_, n)| n) {
                                    nonce = n.to_string();
                                }
                                client_first_bare = Some(bare.to_string());
                            }
                        }
                    }
                }
                let server_first = format!("r={nonce}{suffix},s={},i={iterations}", STANDARD.encode(&salt));
                let mut data = server_first.clone().into_bytes();
                for m in &garble {
                    mutate(&mut data, m);
                }
                if garble.is_empty() && iterations <= 4096 {
                    exchange = Some((server_first, salted_password(PASSWORD.as_bytes(), &salt, iterations)));
                }
                r(auth::SASL_CONTINUE, &data)
            }
            DbStep::ScramFinal(kind) => {
                let client_final = next_p(&mut rx).await;
                let data = match kind {
                    Final::Correct => {
                        let sig = match (&client_first_bare, &exchange, &client_final) {
                            (Some(bare), Some((server_first, salted)), Some(cf)) => std::str::from_utf8(cf)
                                .ok()
                                .and_then(|cf| cf.rsplit_once(",p="))
                                .map(|(without, _)| {
                                    let auth = format!("{bare},{server_first},{without}");
                                    hmac(&hmac(salted, b"Server Key"), auth.as_bytes())
                                }),
                            _ => None,
                        };
                        log.proved_verifier |= sig.is_some();
                        let sig = sig.unwrap_or_else(|| Sha256::digest(b"no exchange").to_vec());
                        format!("v={}", STANDARD.encode(sig)).into_bytes()
                    }
                    Final::Wrong => {
                        format!("v={}", STANDARD.encode(Sha256::digest(b"impostor"))).into_bytes()
                    }
                    Final::ServerError => b"e=invalid-proof".to_vec(),
                    Final::Raw(b) => b,
                };
                r(auth::SASL_FINAL, &data)
            }
        };
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
    drop(rx);
    let (received, framing_error) = reader.await.expect("db reader");
    log.received = received;
    log.framing_error = framing_error;
    log
}

// -------------------------------------------------------------- client

#[derive(Debug, Clone)]
enum ClientMsg {
    Password,
    PasswordWithoutNul,
    SaslInitial,
    SaslResponse(Vec<u8>),
    Terminate,
    Other(u8, Vec<u8>),
    Oversized(u32),
    Raw(Vec<u8>),
}

impl ClientMsg {
    fn encode(&self) -> Vec<u8> {
        match self {
            ClientMsg::Password => pgwire::message_bytes(b'p', format!("{PASSWORD}\0").as_bytes()),
            ClientMsg::PasswordWithoutNul => pgwire::message_bytes(b'p', OTHER_PASSWORD.as_bytes()),
            ClientMsg::SaslInitial => scram::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=clientnonce"),
            ClientMsg::SaslResponse(d) => scram::sasl_response(d),
            ClientMsg::Terminate => pgwire::message_bytes(b'X', &[]),
            ClientMsg::Other(t, d) => pgwire::message_bytes(*t, d),
            ClientMsg::Oversized(n) => [&b"p"[..], &n.to_be_bytes()].concat(),
            ClientMsg::Raw(b) => b.clone(),
        }
    }
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        2 => Just(ClientMsg::SaslInitial),
        2 => bytes(40).prop_map(ClientMsg::SaslResponse),
        1 => Just(ClientMsg::PasswordWithoutNul),
        1 => Just(ClientMsg::Terminate),
        1 => (any::<u8>(), bytes(20)).prop_map(|(t, d)| ClientMsg::Other(t, d)),
        1 => prop_oneof![Just(8 * 1024 + 5), Just((1 << 20) + 5), length_field()].prop_map(ClientMsg::Oversized),
        1 => bytes(12).prop_map(ClientMsg::Raw),
    ]
}

fn client_script() -> impl Strategy<Value = Vec<ClientMsg>> {
    (
        prop_oneof![4 => Just(Some(ClientMsg::Password)), 1 => Just(None)],
        proptest::collection::vec(client_msg(), 0..4),
    )
        .prop_map(|(first, rest)| first.into_iter().chain(rest).collect())
}

// ------------------------------------------------------------- driving

#[derive(Debug, Clone)]
struct Case {
    db: Vec<DbStep>,
    client: Vec<ClientMsg>,
    client_splits: Vec<usize>,
    client_tls: bool,
    mode: AuthMode,
    /// Identity login (tailgres presented a client certificate) or
    /// verifier mode (the client proved its password to tailgres).
    login: Login,
    binding: Option<Vec<u8>>,
    startup: Vec<(String, String)>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    Client,
    Certificate,
    VerifiedScram,
    VerifiedMd5,
}

/// What `authenticate` is given for the case's login: in verifier mode, the
/// verifier of PASSWORD and the client key a real client's proof yields.
fn credentials(c: &Case) -> Credentials {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use tailgres::verifier::{ScramServer, Verifier};
    match c.login {
        Login::Client => Credentials::Client(c.mode),
        Login::Certificate => Credentials::Certificate,
        Login::VerifiedMd5 => {
            let hash = postgres_protocol::password::md5(PASSWORD.as_bytes(), "alice");
            Credentials::Verified(VerifiedClient::Md5(Arc::new(Verifier::parse(&hash).unwrap())))
        }
        Login::VerifiedScram => {
            let text = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
            let verifier = Arc::new(Verifier::parse(&text).unwrap());
            let Verifier::Scram(keys) = &*verifier else { unreachable!() };
            let mut server = ScramServer::new(keys, None);
            let mut client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let first = tailgres::scram::sasl_initial_response("SCRAM-SHA-256", client.message());
            client.update(&server.client_first(&first[5..]).unwrap()).unwrap();
            let client_key = server.client_final(client.message()).unwrap().client_key;
            Credentials::Verified(VerifiedClient::Scram { client_key, verifier })
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        db_script(),
        client_script(),
        proptest::collection::vec(any::<usize>(), 0..4),
        any::<bool>(),
        prop_oneof![3 => Just(AuthMode::PasswordRelay), 1 => Just(AuthMode::Passthrough)],
        prop_oneof![4 => Just(Login::Client), 1 => Just(Login::Certificate), 1 => Just(Login::VerifiedScram), 1 => Just(Login::VerifiedMd5)],
        prop_oneof![Just(None), Just(Some(vec![7u8; 32])), bytes(64).prop_map(Some)],
        prop_oneof![
            Just(vec![("user".to_string(), "alice".to_string())]),
            proptest::collection::vec(("[a-z_]{1,10}", "\\PC{0,10}"), 1..4),
        ],
        prop_oneof![1 => 1usize..64, 3 => Just(1usize << 16)],
    )
        .prop_map(
            |(db, client, client_splits, client_tls, mode, login, binding, startup, capacity)| Case {
                db,
                client,
                client_splits,
                client_tls,
                mode,
                login,
                binding,
                startup,
                capacity,
            },
        )
}

struct Ran {
    result: Result<AuthOutcome, AuthError>,
    startup: Startup,
    to_client: Vec<u8>,
    db: DbLog,
}

async fn exchange(c: Case) -> Ran {
    let (client_end, mut proxy_client) = duplex(c.capacity);
    let (db_end, mut proxy_upstream) = duplex(c.capacity);
    let client_bytes: Vec<u8> = c.client.iter().flat_map(ClientMsg::encode).collect();
    let chunks = split_at_points(&client_bytes, &c.client_splits);
    let client = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(client_end);
        let writer = tokio::spawn(async move {
            for ch in chunks {
                if w.write_all(&ch).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = w.shutdown().await;
            w
        });
        let mut got = Vec::new();
        let _ = r.read_to_end(&mut got).await;
        drop(writer.await);
        got
    });
    let db = tokio::spawn(database(db_end, c.db.clone()));
    let startup = Startup { version: pgwire::PROTOCOL_3_0, params: c.startup.clone() };
    let result = authenticate(
        &mut proxy_client,
        &mut proxy_upstream,
        &startup,
        c.client_tls,
        &credentials(&c),
        c.binding.as_deref(),
        &mut |pid, key| issued(pid, key),
    )
    .await;
    drop(proxy_client);
    drop(proxy_upstream);
    Ran { result, startup, to_client: client.await.expect("client"), db: db.await.expect("database") }
}

/// The cancel key the client is given for the database's (what the
/// session's registry would issue, made recognisable).
fn issued(pid: u32, key: &[u8]) -> (u32, Vec<u8>) {
    (!pid, key.iter().map(|b| !b).collect())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn check(c: &Case, ran: &Ran) -> Result<(), String> {
    let pw = PASSWORD.as_bytes();
    let startup = ran.startup.to_bytes();
    if !ran.db.received.starts_with(&startup) {
        return Err(format!(
            "the database did not get the StartupMessage first: {}",
            preview(&ran.db.received)
        ));
    }
    if let Some(e) = &ran.db.framing_error {
        return Err(format!("upstream framing: {e}"));
    }
    let upstream = messages(&ran.db.received[startup.len()..])?;
    if let Some((t, _)) = upstream.iter().find(|(t, _)| *t != b'p') {
        return Err(format!("sent upstream a '{}' message during authentication", *t as char));
    }
    let to_client = messages(&ran.to_client).map_err(|e| format!("client framing: {e}"))?;
    if contains(&ran.to_client, pw) {
        return Err("the password reached the client".into());
    }
    if ran.db.gs2_headers.iter().any(|h| h.starts_with('y')) {
        return Err(format!("gs2 flag y sent: {:?}", ran.db.gs2_headers));
    }
    // A TLS client in password-relay mode whose database asks for SASL
    // first gives its password to the proxy, which runs SCRAM itself: the
    // password never goes upstream, whatever the database does next.
    let sasl_first = match c.db.first() {
        Some(DbStep::Send(b)) => split_message(b)
            .is_some_and(|(t, body, _)| t == b'R' && body.get(..4) == Some(&auth::SASL.to_be_bytes()[..])),
        _ => false,
    };
    // Identity login and verifier mode: the client is never asked for
    // anything (it has no password to give, or has proved it already), and
    // nothing of the client's goes upstream.
    if c.login != Login::Client {
        let asked =
            to_client.iter().any(|(t, b)| *t == b'R' && b.get(..4) != Some(&auth::OK.to_be_bytes()[..]));
        if asked {
            return Err("identity login: the client was asked to authenticate".into());
        }
        // In verifier mode tailgres answers the database itself: none of
        // the client's messages, and never the password, go upstream.
        let clients: Vec<Vec<u8>> = c.client.iter().map(ClientMsg::encode).collect();
        let forwarded = upstream.iter().any(|(t, b)| clients.contains(&pgwire::message_bytes(*t, b)));
        if (c.login == Login::Certificate && !upstream.is_empty())
            || forwarded
            || contains(&ran.db.received, pw)
        {
            return Err(format!("{:?}: a client message went upstream", c.login));
        }
        let want = match c.login {
            Login::Certificate => AuthMethod::IdentityCertificate,
            Login::VerifiedScram => AuthMethod::ScramVerifier,
            _ => AuthMethod::Md5Verifier,
        };
        if let Ok(out) = &ran.result {
            if out.method != want {
                return Err(format!("{:?} reported as {:?}", c.login, out.method));
            }
        }
    }
    let relayed = c.client_tls && c.mode == AuthMode::PasswordRelay;
    if relayed
        && sasl_first
        && matches!(c.client.first(), Some(ClientMsg::Password))
        && contains(&ran.db.received, pw)
    {
        return Err("the password relay sent the password to a database that asked for SASL".into());
    }
    match &ran.result {
        Ok(out) => {
            if to_client.last().map(|(t, _)| *t) != Some(b'Z') {
                return Err("Ok, but the client's last message is not ReadyForQuery".into());
            }
            if out.upstream_to_client != ran.to_client.len() as u64 {
                return Err(format!(
                    "upstream_to_client {} != {} received",
                    out.upstream_to_client,
                    ran.to_client.len()
                ));
            }
            if out.client_to_upstream != ran.db.received.len() as u64 {
                return Err(format!(
                    "client_to_upstream {} != {} received",
                    out.client_to_upstream,
                    ran.db.received.len()
                ));
            }
            let relayed = matches!(
                out.method,
                AuthMethod::PasswordRelayScramSha256 | AuthMethod::PasswordRelayScramSha256Plus
            );
            if relayed && !ran.db.proved_verifier {
                return Err(format!("{:?}: accepted a database that never proved the verifier", out.method));
            }
            if let Some((pid, key)) = &out.backend_key {
                if key.is_empty() || key.len() > pgwire::MAX_CANCEL_KEY {
                    return Err(format!("cancel key of {} bytes", key.len()));
                }
                // The client got the issued key, never the database's.
                let (ipid, ikey) = issued(*pid, key);
                let want = [&ipid.to_be_bytes()[..], &ikey].concat();
                let keys: Vec<&Vec<u8>> = to_client.iter().filter(|(t, _)| *t == b'K').map(|(_, b)| b).collect();
                if keys.last() != Some(&&want) {
                    return Err(format!("the client's BackendKeyData {keys:?}, not the issued {want:?}"));
                }
            }
        }
        Err(e) => {
            let text = format!("{e} {e:?}");
            if text.contains(PASSWORD) {
                return Err("the password is in an error".into());
            }
            if let AuthError::Rejected { .. } = e {
                if to_client.last().map(|(t, _)| *t) != Some(b'E') {
                    return Err("Rejected, but the client did not get the ErrorResponse".into());
                }
            }
        }
    }
    Ok(())
}

fn run_case(c: Case) -> Result<(), TestCaseError> {
    let what = format!("{c:?}");
    let ran = run(|| what.clone(), exchange(c.clone())).map_err(TestCaseError::fail)?;
    check(&c, &ran).map_err(|e| TestCaseError::fail(format!("{e}; result {:?}", ran.result)))
}

proptest! {
    #![proptest_config(config(1500, REGRESSIONS))]

    #[test]
    fn hostile_client_and_database(c in case()) {
        run_case(c)?;
    }
}

/// The unedited SASL session succeeds end to end (the harness itself
/// works: a correct server signature is computed and accepted), and a
/// wrong signature is refused.
#[test]
fn scripted_scram_session_succeeds() {
    for (fin, ok) in [(Final::Correct, true), (Final::Wrong, false), (Final::ServerError, false)] {
        let mut db = vec![
            DbStep::Send(r(auth::SASL, &mechanisms(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))),
            DbStep::ScramFirst {
                suffix: "srv".into(),
                salt: b"salt".to_vec(),
                iterations: 2,
                garble: vec![],
            },
            DbStep::ScramFinal(fin),
        ];
        db.extend(post_auth());
        let c = Case {
            db,
            client: vec![ClientMsg::Password],
            client_splits: vec![],
            client_tls: true,
            mode: AuthMode::PasswordRelay,
            login: Login::Client,
            binding: Some(vec![1; 32]),
            startup: vec![("user".into(), "alice".into())],
            capacity: 1 << 16,
        };
        let ran = run(|| "scripted".into(), exchange(c.clone())).unwrap();
        check(&c, &ran).unwrap();
        match &ran.result {
            Ok(out) if ok => {
                assert_eq!(out.method, AuthMethod::PasswordRelayScramSha256Plus);
                assert_eq!(out.backend_key, Some((42, vec![1, 2, 3, 4])));
                assert_eq!(ran.db.gs2_headers, ["p=tls-server-end-point"]);
            }
            Err(AuthError::Scram(_)) if !ok => {}
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------- SCRAM alone

#[derive(Debug, Clone)]
enum ScramOp {
    First(Vec<u8>),
    /// A server-first built on the client's own nonce.
    FirstFor {
        suffix: String,
        salt: Vec<u8>,
        iterations: u32,
    },
    Final(Vec<u8>),
    Initial,
}

fn scram_op() -> impl Strategy<Value = ScramOp> {
    prop_oneof![
        2 => bytes(64).prop_map(ScramOp::First),
        1 => "r=[ -~]{0,10},s=[A-Za-z0-9+/=]{0,8},i=[0-9]{0,6}".prop_map(|s| ScramOp::First(s.into_bytes())),
        3 => ("[!-+--~]{0,8}", bytes(16), prop_oneof![1u32..=4, Just(0u32), Just(100_001)])
            .prop_map(|(suffix, salt, iterations)| ScramOp::FirstFor { suffix, salt, iterations }),
        2 => bytes(64).prop_map(ScramOp::Final),
        1 => "v=[A-Za-z0-9+/=]{0,44}|e=[a-z-]{0,20}".prop_map(|s| ScramOp::Final(s.into_bytes())),
        1 => Just(ScramOp::Initial),
    ]
}

proptest! {
    #![proptest_config(config(1500, REGRESSIONS))]

    /// Any sequence of server messages, in any order: typed errors only,
    /// OutOfOrder exactly where the state machine says, the client's own
    /// messages available at every step, and no password in any error.
    #[test]
    fn scram_client_state_machine(
        password in prop_oneof![Just(PASSWORD.as_bytes().to_vec()), bytes(40), "\\PC{0,12}".prop_map(String::into_bytes)],
        offered in proptest::collection::vec(prop_oneof![
            Just("SCRAM-SHA-256".to_string()), Just("SCRAM-SHA-256-PLUS".to_string()), "[A-Z-]{0,20}",
        ], 0..4),
        binding in proptest::option::of(bytes(64)),
        ops in proptest::collection::vec(scram_op(), 0..6),
    ) {
        let offered_refs: Vec<&str> = offered.iter().map(String::as_str).collect();
        let mut c = match ScramClient::new(&password, &offered_refs, binding.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                prop_assert!(matches!(e, ScramError::NoCommonMechanism { .. }), "{e:?}");
                let plain = offered.iter().any(|m| m == "SCRAM-SHA-256");
                let plus = binding.is_some() && offered.iter().any(|m| m == "SCRAM-SHA-256-PLUS");
                prop_assert!(!plain && !plus, "refused a mechanism it speaks: {:?}", offered);
                return Ok(());
            }
        };
        let first = c.client_first();
        prop_assert!(!first.starts_with(b"y"));
        prop_assert_eq!(c.channel_bound(), first.starts_with(b"p=tls-server-end-point,,"));
        let nonce = String::from_utf8(first.clone()).unwrap().split_once(",r=").unwrap().1.to_string();
        #[derive(PartialEq, Debug)]
        enum S { First, Final, Done }
        let mut state = S::First;
        for op in ops {
            let (res, was_first) = match op {
                ScramOp::Initial => {
                    prop_assert!(c.initial_response().ends_with(&first));
                    continue;
                }
                ScramOp::First(d) => (c.handle_server_first(&d).map(|_| ()), true),
                ScramOp::FirstFor { suffix, salt, iterations } => {
                    let m = format!("r={nonce}{suffix},s={},i={iterations}", STANDARD.encode(&salt));
                    (c.handle_server_first(m.as_bytes()).map(|_| ()), true)
                }
                ScramOp::Final(d) => (c.verify_server_final(&d), false),
            };
            if let Err(e) = &res {
                let text = format!("{e} {e:?}");
                prop_assert!(password.len() < 8 || !text.contains(&*String::from_utf8_lossy(&password)), "password in {text}");
            }
            state = match (state, was_first, &res) {
                (S::First, true, Ok(())) => S::Final,
                (S::First, true, Err(ScramError::ServerFirst(_) | ScramError::TooManyIterations(_))) => S::Done,
                (S::Final, false, Err(ScramError::ServerFinal(_))) => S::Done,
                (S::Final, false, Ok(())) => return Err(TestCaseError::fail("a random server-final verified")),
                (s @ (S::Final | S::Done), true, Err(ScramError::OutOfOrder(_))) => s,
                (s @ (S::First | S::Done), false, Err(ScramError::OutOfOrder(_))) => s,
                (s, first, res) => {
                    return Err(TestCaseError::fail(format!("state {s:?}, server-first {first}: {res:?}")))
                }
            };
            prop_assert_eq!(c.client_first(), first.clone());
        }
    }
}
