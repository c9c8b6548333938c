//! Fetching a role's stored verifier for `--auth scram-verifier`: as the
//! lookup role, over the route's verify-full TLS, with a parameterised
//! query (extended protocol: the role name is a bound parameter, never
//! spliced into SQL), then cached briefly.
//!
//! The cache: an entry lives `cache_ttl`; an entry that a client's proof
//! failed against is dropped at once, so a changed password works at the
//! next login; a reload (SIGHUP) starts an empty cache. A role without a
//! usable verifier gets a stand-in ([`Verifier::mock`]) so the client
//! cannot tell it from a wrong password; the stand-in is not cached.
//!
//! Lookups share one connection per route, kept open between them (a miss
//! costs the database one round trip, not a TLS handshake and a SCRAM
//! login) and reopened when it has been idle for [`REUSE_IDLE`] or fails.
//! They run one at a time, and a lookup waiting for the connection looks in
//! the cache again first: a burst of logins for one role costs one lookup.
#![forbid(unsafe_code)]

use crate::negotiate::Startup;
use crate::pgwire::{self, auth, Message};
use crate::upstream::UpstreamTls;
use crate::verifier::Verifier;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// The query the README's `tailgres_auth.verifier` function answers.
pub const DEFAULT_QUERY: &str = "SELECT tailgres_auth.verifier($1)";
pub const DEFAULT_USER: &str = "tailgres_auth";
pub const DEFAULT_DATABASE: &str = "postgres";
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
/// The most roles whose verifiers are held at once.
const MAX_CACHED: usize = 10_000;
/// A lookup (connect, log in, query) that takes longer has failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message the lookup accepts (a verifier is about 140 bytes).
const MAX_MESSAGE: usize = 64 * 1024;
/// A lookup connection idle this long is closed and a new one opened (the
/// database or something in between may have dropped it meanwhile).
pub const REUSE_IDLE: Duration = Duration::from_secs(60);

/// The kept lookup connection, logged in as the lookup role.
struct Conn {
    stream: tokio_rustls::client::TlsStream<crate::upstream::Socket>,
    last_used: Instant,
}

/// How verifiers are looked up (checked by [`crate::config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LookupConfig {
    pub user: String,
    /// The lookup role's password (from a file or the environment, never
    /// the command line); None when it logs in by client certificate.
    pub password: Option<Zeroizing<String>>,
    pub database: String,
    pub query: String,
    pub cache_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("connecting to the database for the lookup: {0}")]
    Connect(#[source] crate::upstream::UpstreamError),
    #[error("the lookup connection failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the database refused the lookup role {user:?}: {message}")]
    LoginRefused { user: String, message: String },
    #[error("the database asked the lookup role {user:?} for a password, and none is configured (--verifier-password-file or TAILGRES_VERIFIER_PASSWORD)")]
    NoPassword { user: String },
    #[error("the lookup query failed: {0}")]
    Query(String),
    #[error("the database broke the protocol during the lookup: {0}")]
    Protocol(String),
    #[error("the lookup took longer than {0:?}")]
    Timeout(Duration),
}

/// Where a verifier came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Lookup,
    /// The role has no usable verifier: a stand-in that fails every proof.
    Missing,
}

/// One route's verifiers: how to look them up, and the cache.
pub struct VerifierSource {
    pub config: LookupConfig,
    /// Salts the stand-in verifiers (per process).
    secret: [u8; 32],
    cache: Mutex<HashMap<String, (Instant, Arc<Verifier>)>>,
    /// The lookup connection (None: none open); held for a whole lookup.
    conn: tokio::sync::Mutex<Option<Conn>>,
}

impl std::fmt::Debug for VerifierSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierSource")
            .field("user", &self.config.user)
            .field("database", &self.config.database)
            .finish_non_exhaustive()
    }
}

impl VerifierSource {
    pub fn new(config: LookupConfig) -> VerifierSource {
        VerifierSource {
            config,
            secret: rand::random(),
            cache: Mutex::new(HashMap::new()),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    fn cached(&self, role: &str, now: Instant) -> Option<Arc<Verifier>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(role) {
            Some((at, v)) if now.duration_since(*at) < self.config.cache_ttl => Some(v.clone()),
            Some(_) => {
                cache.remove(role);
                None
            }
            None => None,
        }
    }

    /// Runs the query for `role` on the kept connection (opened, or opened
    /// again, as needed); a kept connection that fails is replaced once.
    async fn fetch(
        &self,
        slot: &mut Option<Conn>,
        upstream: &UpstreamTls,
        role: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError> {
        // Taken out while in use: a lookup cut short (timeout) leaves none.
        let kept = slot.take().filter(|c| c.last_used.elapsed() < REUSE_IDLE);
        let reused = kept.is_some();
        let mut conn = match kept {
            Some(c) => c,
            None => open(upstream, &self.config).await?,
        };
        let mut result = query(&mut conn.stream, &self.config.query, role).await;
        if reused && matches!(result, Err(LookupError::Io(_) | LookupError::Protocol(_))) {
            conn = open(upstream, &self.config).await?;
            result = query(&mut conn.stream, &self.config.query, role).await;
        }
        if matches!(result, Ok(_) | Err(LookupError::Query(_))) {
            conn.last_used = Instant::now();
            *slot = Some(conn);
        }
        result
    }

    /// `role`'s verifier: cached, else looked up through `upstream`.
    pub async fn get(
        &self,
        upstream: &UpstreamTls,
        role: &str,
    ) -> Result<(Arc<Verifier>, Origin), LookupError> {
        if let Some(v) = self.cached(role, Instant::now()) {
            return Ok((v, Origin::Cache));
        }
        tokio::time::timeout(LOOKUP_TIMEOUT, async {
            let mut slot = self.conn.lock().await;
            // While this waited for the connection, another lookup may have
            // fetched this very role (and cached it before letting go).
            if let Some(v) = self.cached(role, Instant::now()) {
                return Ok((v, Origin::Cache));
            }
            let text = self.fetch(&mut slot, upstream, role).await?;
            Ok(match text.as_deref().map(|t| Verifier::parse(t.as_str())) {
                Some(Ok(v)) => (self.remember(role, v), Origin::Lookup),
                Some(Err(e)) => {
                    tracing::warn!(role, error = %e, "the role's stored password cannot be used by scram-verifier");
                    (Arc::new(Verifier::mock(role, &self.secret)), Origin::Missing)
                }
                None => (Arc::new(Verifier::mock(role, &self.secret)), Origin::Missing),
            })
        })
        .await
        .map_err(|_| LookupError::Timeout(LOOKUP_TIMEOUT))?
    }

    fn remember(&self, role: &str, v: Verifier) -> Arc<Verifier> {
        let (v, now) = (Arc::new(v), Instant::now());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            let ttl = self.config.cache_ttl;
            cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(role.to_string(), (now, v.clone()));
        v
    }

    /// Drops `role`'s cached verifier (a proof failed against it, or the
    /// database held another): the next login looks it up again.
    pub fn forget(&self, role: &str) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(role);
    }
}

/// Connects as the lookup role, through ReadyForQuery.
async fn open(upstream: &UpstreamTls, cfg: &LookupConfig) -> Result<Conn, LookupError> {
    let mut up = upstream.connect().await.map_err(LookupError::Connect)?;
    let startup = Startup {
        version: pgwire::PROTOCOL_3_0,
        params: vec![
            ("user".into(), cfg.user.clone()),
            ("database".into(), cfg.database.clone()),
            ("application_name".into(), "tailgres verifier lookup".into()),
        ],
    };
    send(&mut up.stream, &startup.to_bytes()).await?;
    log_in(&mut up.stream, cfg, up.channel_binding.as_deref()).await?;
    Ok(Conn { stream: up.stream, last_used: Instant::now() })
}

/// Runs the lookup query for `role` on a logged-in connection: the first
/// column of its only row, None for no row or NULL.
async fn query<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sql: &str,
    role: &str,
) -> Result<Option<Zeroizing<String>>, LookupError> {
    send(s, &query_messages(sql, role)).await?;
    read_result(s).await
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> Result<(), LookupError> {
    s.write_all(bytes).await.map_err(LookupError::Io)?;
    s.flush().await.map_err(LookupError::Io)
}

async fn recv<S: AsyncRead + Unpin>(s: &mut S) -> Result<Message, LookupError> {
    pgwire::read_message(s, MAX_MESSAGE).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            LookupError::Protocol(e.to_string())
        } else {
            LookupError::Io(e)
        }
    })
}

fn error_text(m: &Message) -> String {
    let (code, msg) = pgwire::error_fields(&m.body);
    format!("{} {}", code.unwrap_or_default(), msg.unwrap_or_default())
}

/// Authenticates the lookup role, through ReadyForQuery.
async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &LookupConfig,
    binding: Option<&[u8]>,
) -> Result<(), LookupError> {
    let password = || cfg.password.as_ref().ok_or_else(|| LookupError::NoPassword { user: cfg.user.clone() });
    let refused = |m: &Message| LookupError::LoginRefused { user: cfg.user.clone(), message: error_text(m) };
    loop {
        let m = recv(s).await?;
        match (m.tag, m.code()) {
            (b'R', Some(auth::OK)) => break,
            (b'R', Some(auth::SASL)) => {
                let offered = crate::scram::parse_mechanisms(&m.body[4..])
                    .map_err(|e| LookupError::Protocol(e.to_string()))?;
                let client = crate::scram::ScramClient::new(password()?.as_bytes(), &offered, binding)
                    .map_err(|e| LookupError::Protocol(e.to_string()))?;
                match crate::authenticate::scram_with_upstream(s, client).await {
                    Ok(_) => {}
                    Err(crate::authenticate::UpstreamScramError::Rejected(m)) => return Err(refused(&m)),
                    Err(e) => return Err(LookupError::Protocol(e.to_string())),
                }
            }
            (b'R', Some(auth::MD5)) if m.body.len() == 8 => {
                let salt: [u8; 4] = m.body[4..8].try_into().unwrap();
                let answer = postgres_protocol::authentication::md5_hash(
                    cfg.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                let answer = Zeroizing::new([answer.as_bytes(), b"\0"].concat());
                send(s, &pgwire::message_bytes(b'p', &answer)).await?;
            }
            (b'R', Some(auth::CLEARTEXT)) => {
                // Inside verify-full TLS to the database.
                let answer = Zeroizing::new([password()?.as_bytes(), b"\0"].concat());
                send(s, &pgwire::message_bytes(b'p', &answer)).await?;
            }
            (b'R', code) => {
                return Err(LookupError::Protocol(format!(
                "the database asked the lookup role for authentication tailgres does not do (code {code:?})"
            )))
            }
            (b'E', _) => return Err(refused(&m)),
            (b'N' | b'v', _) => {}
            (t, _) => return Err(LookupError::Protocol(format!("unexpected message '{}'", t as char))),
        }
    }
    loop {
        let m = recv(s).await?;
        match m.tag {
            b'Z' => return Ok(()),
            b'E' => return Err(refused(&m)),
            b'S' | b'K' | b'N' | b'v' => {}
            t => {
                return Err(LookupError::Protocol(format!(
                    "unexpected message '{}' before ReadyForQuery",
                    t as char
                )))
            }
        }
    }
}

/// Parse, Bind (the role as the one text parameter), Execute, Sync.
fn query_messages(query: &str, role: &str) -> Vec<u8> {
    let mut parse = vec![0u8]; // unnamed statement
    parse.extend_from_slice(query.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&0u16.to_be_bytes()); // parameter types inferred
    let mut bind = vec![0u8, 0u8]; // unnamed portal, unnamed statement
    bind.extend_from_slice(&0u16.to_be_bytes()); // parameters in text
    bind.extend_from_slice(&1u16.to_be_bytes());
    bind.extend_from_slice(&(role.len() as i32).to_be_bytes());
    bind.extend_from_slice(role.as_bytes());
    bind.extend_from_slice(&0u16.to_be_bytes()); // results in text
    let mut execute = vec![0u8];
    execute.extend_from_slice(&0u32.to_be_bytes());
    [
        pgwire::message_bytes(b'P', &parse),
        pgwire::message_bytes(b'B', &bind),
        pgwire::message_bytes(b'E', &execute),
        pgwire::message_bytes(b'S', &[]),
    ]
    .concat()
}

/// The first column of the only row, to ReadyForQuery.
async fn read_result<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Zeroizing<String>>, LookupError> {
    let mut found: Option<Option<Zeroizing<String>>> = None;
    let mut failed = None;
    loop {
        let m = recv(s).await?;
        match m.tag {
            b'1' | b'2' | b'C' | b'N' | b'S' | b'n' => {}
            b'D' => {
                let body = Zeroizing::new(m.body);
                if found.is_some() {
                    failed.get_or_insert_with(|| "the lookup query returned more than one row".to_string());
                    continue;
                }
                found = Some(first_column(&body)?);
            }
            b'E' => {
                failed.get_or_insert_with(|| error_text(&m));
            }
            b'Z' => {
                return match failed {
                    Some(e) => Err(LookupError::Query(e)),
                    None => Ok(found.flatten()),
                }
            }
            t => {
                return Err(LookupError::Protocol(format!(
                    "unexpected message '{}' in the lookup's result",
                    t as char
                )))
            }
        }
    }
}

/// A DataRow's first column as text (None for NULL).
fn first_column(body: &[u8]) -> Result<Option<Zeroizing<String>>, LookupError> {
    let bad = || LookupError::Protocol("malformed DataRow".into());
    let columns = u16::from_be_bytes(body.get(..2).ok_or_else(bad)?.try_into().unwrap());
    if columns == 0 {
        return Err(LookupError::Query("the lookup query returned no column".into()));
    }
    let len = i32::from_be_bytes(body.get(2..6).ok_or_else(bad)?.try_into().unwrap());
    if len < 0 {
        return Ok(None);
    }
    let value = body.get(6..6 + len as usize).ok_or_else(bad)?;
    let text =
        std::str::from_utf8(value).map_err(|_| LookupError::Query("the verifier is not text".into()))?;
    Ok(Some(Zeroizing::new(text.to_string())))
}
