//! Stage 6, authenticate: send the StartupMessage upstream and carry the
//! authentication exchange to AuthenticationOk and ReadyForQuery.
//!
//! The adaptive password relay (docs/postgres-protocol.md, "SCRAM
//! channel binding through a TLS-terminating proxy"), decided by what the
//! upstream asks for:
//! - AuthenticationOk, cleartext, MD5, GSS...: relayed unchanged.
//! - SASL with a plaintext client (or `--auth passthrough`): relayed, with
//!   `-PLUS` mechanisms removed (the client then sends gs2 flag `n`).
//! - SASL with a TLS client (default): the client is asked for its password
//!   in cleartext (inside TLS inside WireGuard), and the proxy runs
//!   SCRAM-SHA-256-PLUS to the upstream, bound to the upstream's real
//!   certificate. The password is zeroized after use and never logged.
#![forbid(unsafe_code)]

use crate::audit::{AuthMethod, SqlState};
use crate::negotiate::Startup;
use crate::pgwire::{self, auth, sqlstate, Message};
use crate::scram;
use crate::verifier::{md5_answer, Verifier};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// The largest message accepted from either side before ReadyForQuery
/// (GSSAPI tokens and ParameterStatus values are the big ones).
const MAX_AUTH_MESSAGE: usize = 1 << 20;
/// A password message is small; anything bigger is not a password.
const MAX_PASSWORD_MESSAGE: usize = 8 * 1024;
/// Messages held for the client (see [`Exchange::hold_client`]) are sent
/// once they reach this much: one full TLS record.
const MAX_HELD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Relay passwords for TLS clients so SCRAM channel binding works with
    /// every client's defaults (the proxy sees the password, inside TLS).
    PasswordRelay,
    /// Never see passwords; TLS clients must set channel_binding=disable.
    Passthrough,
    /// Authenticate clients with the role's stored SCRAM verifier (looked
    /// up as --verifier-user), SCRAM-SHA-256-PLUS bound to tailgres's own
    /// certificate, and log in to the database with the client key the
    /// proof yields: channel_binding=require works, no password is seen.
    ScramVerifier,
}

/// How a session answers the database's authentication requests.
pub enum Credentials {
    /// With the client's own answers (password relay or passthrough).
    Client(AuthMode),
    /// tailgres's client certificate (identity login): nothing more.
    Certificate,
    /// The client proved its password to tailgres (`--auth scram-verifier`).
    Verified(VerifiedClient),
}

/// What the client's proof left tailgres with.
pub enum VerifiedClient {
    /// The client key recovered from a SCRAM proof, and the verifier.
    Scram { client_key: Zeroizing<[u8; 32]>, verifier: Arc<Verifier> },
    /// The role's MD5 hash (`Verifier::Md5`), which answers MD5 itself.
    Md5(Arc<Verifier>),
}

impl VerifiedClient {
    pub fn method(&self) -> AuthMethod {
        match self {
            VerifiedClient::Scram { .. } => AuthMethod::ScramVerifier,
            VerifiedClient::Md5(_) => AuthMethod::Md5Verifier,
        }
    }
}

/// Given the database's cancel key (pid, secret), the key the client is
/// told instead (the session registers it for cancel).
pub type IssueKey<'a> = &'a mut (dyn FnMut(u32, &[u8]) -> (u32, Vec<u8>) + Send);

/// What authentication established.
#[derive(Debug)]
pub struct AuthOutcome {
    /// How the client was authenticated, for the audit record.
    pub method: AuthMethod,
    /// The database's BackendKeyData (pid, key), when it sent one: what a
    /// cancel sends it. The client was given `issue_key`'s key instead.
    pub backend_key: Option<(u32, Vec<u8>)>,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The upstream refused (its ErrorResponse was forwarded to the client).
    #[error("upstream refused the session: {} {message}", sqlstate.map(|s| s.to_string()).unwrap_or_default())]
    Rejected { method: AuthMethod, sqlstate: Option<SqlState>, message: String },
    #[error("client went away during authentication: {0}")]
    ClientClosed(#[source] std::io::Error),
    #[error("client protocol error during authentication: {0}")]
    ClientProtocol(String),
    #[error("upstream connection failed during authentication: {0}")]
    Upstream(#[source] std::io::Error),
    #[error("upstream protocol error during authentication: {0}")]
    UpstreamProtocol(String),
    #[error("SCRAM with the upstream failed: {0}")]
    Scram(String),
    /// Identity login: the database asked for more than the certificate
    /// (its pg_hba.conf does not use `cert` for the role). The client has
    /// been told.
    #[error("the database asked for {asked} although tailgres logged in with a client certificate; its pg_hba.conf must use `cert` for role {role:?}")]
    CertificateNotEnough { asked: &'static str, role: String },
    /// Verifier mode: tailgres refused the client's own authentication (a
    /// wrong password, a channel binding that does not match, a malformed
    /// SCRAM message). The client has not been told yet.
    #[error("{0}")]
    ClientRefused(#[source] crate::verifier::ScramServerError),
    /// Verifier mode: the database asked for something the verifier
    /// cannot answer (a cleartext password, GSSAPI; SCRAM for an MD5 role).
    /// The client has been told.
    #[error("the database asked for {asked}, which tailgres cannot answer from role {role:?}'s stored verifier; its pg_hba.conf must use scram-sha-256 (or md5 for an MD5 password) for the role")]
    VerifierNotEnough { asked: &'static str, role: String },
}

impl AuthError {
    pub fn method(&self) -> AuthMethod {
        match self {
            AuthError::Rejected { method, .. } => *method,
            AuthError::CertificateNotEnough { .. } => AuthMethod::IdentityCertificate,
            AuthError::VerifierNotEnough { .. } | AuthError::ClientRefused(_) => AuthMethod::ScramVerifier,
            _ => AuthMethod::Other,
        }
    }
}

struct Exchange<'a, C, U> {
    client: &'a mut C,
    upstream: &'a mut U,
    c2u: u64,
    u2c: u64,
    /// Messages for the client not yet written (see `hold_client`).
    held: Vec<u8>,
}

impl<C, U> Exchange<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// Writes the held messages and `bytes`, in one write.
    async fn send_client(&mut self, bytes: &[u8]) -> Result<(), AuthError> {
        let out = if self.held.is_empty() {
            bytes
        } else {
            self.held.extend_from_slice(bytes);
            &self.held
        };
        self.client.write_all(out).await.map_err(AuthError::ClientClosed)?;
        self.client.flush().await.map_err(AuthError::ClientClosed)?;
        self.u2c += out.len() as u64;
        self.held.clear();
        Ok(())
    }
    /// Holds a message that needs no answer until the next `send_client`,
    /// as PostgreSQL itself holds AuthenticationOk and what follows it
    /// until ReadyForQuery: the client then gets them in one TLS record and
    /// one packet, not one per message (a connection's dozen or more
    /// ParameterStatus messages included). Bounded by `MAX_HELD`.
    async fn hold_client(&mut self, bytes: &[u8]) -> Result<(), AuthError> {
        self.held.extend_from_slice(bytes);
        if self.held.len() >= MAX_HELD {
            self.send_client(&[]).await?;
        }
        Ok(())
    }
    async fn send_upstream(&mut self, bytes: &[u8]) -> Result<(), AuthError> {
        self.upstream.write_all(bytes).await.map_err(AuthError::Upstream)?;
        self.upstream.flush().await.map_err(AuthError::Upstream)?;
        self.c2u += bytes.len() as u64;
        Ok(())
    }
    async fn recv_upstream(&mut self) -> Result<Message, AuthError> {
        upstream_message(pgwire::read_message(self.upstream, MAX_AUTH_MESSAGE).await)
    }
    /// The client's answer to an authentication request: a 'p' message.
    async fn recv_client(&mut self, max: usize) -> Result<Message, AuthError> {
        client_message(pgwire::read_message(self.client, max).await)
    }
    /// After a message that may or may not want an answer (the last
    /// AuthenticationGSSContinue of a mutual GSSAPI authentication wants
    /// none): the client's answer, or the upstream's next message if that
    /// comes first. Only single-byte reads are raced (cancel-safe), then
    /// the side that spoke first is read to the end of its message.
    async fn recv_either(&mut self) -> Result<Either, AuthError> {
        let (mut c, mut u) = ([0u8; 1], [0u8; 1]);
        let first = tokio::select! {
            r = self.client.read(&mut c) => Either::Client(r),
            r = self.upstream.read(&mut u) => Either::Upstream(r),
        };
        let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
        match first {
            Either::Client(Ok(0)) => Err(AuthError::ClientClosed(eof())),
            Either::Client(Err(e)) => Err(AuthError::ClientClosed(e)),
            Either::Client(Ok(_)) => {
                let mut r = (&c[..]).chain(&mut *self.client);
                client_message(pgwire::read_message(&mut r, MAX_AUTH_MESSAGE).await).map(Either::Client)
            }
            Either::Upstream(Ok(0)) => Err(AuthError::Upstream(eof())),
            Either::Upstream(Err(e)) => Err(AuthError::Upstream(e)),
            Either::Upstream(Ok(_)) => {
                let mut r = (&u[..]).chain(&mut *self.upstream);
                upstream_message(pgwire::read_message(&mut r, MAX_AUTH_MESSAGE).await).map(Either::Upstream)
            }
        }
    }
    /// [`scram_with_upstream`], its bytes counted and a refusal forwarded.
    async fn scram(
        &mut self,
        client: scram::ScramClient,
        method: AuthMethod,
    ) -> Result<AuthMethod, AuthError> {
        match scram_with_upstream(self.upstream, client).await {
            Ok(sent) => {
                self.c2u += sent;
                Ok(method)
            }
            Err(UpstreamScramError::Rejected(m)) => Err(self.rejected(&m, method).await),
            Err(UpstreamScramError::Io(e)) => Err(AuthError::Upstream(e)),
            Err(UpstreamScramError::Protocol(e)) => Err(AuthError::UpstreamProtocol(e)),
            Err(UpstreamScramError::Scram(e)) => Err(AuthError::Scram(e.to_string())),
            Err(e @ UpstreamScramError::Task(_)) => Err(AuthError::Scram(e.to_string())),
        }
    }
    /// Forwards an upstream ErrorResponse and turns it into the error.
    async fn rejected(&mut self, m: &Message, method: AuthMethod) -> AuthError {
        let _ = self.send_client(&m.to_bytes()).await;
        let (code, msg) = pgwire::error_fields(&m.body);
        let sqlstate = code.as_deref().and_then(SqlState::parse);
        AuthError::Rejected { method, sqlstate, message: msg.unwrap_or_default() }
    }
}

/// One side's message, or its result, in [`Exchange::recv_either`].
enum Either<C = Message, U = Message> {
    Client(C),
    Upstream(U),
}

/// A message read from the client during authentication: an answer ('p'),
/// with every other outcome typed.
fn client_message(read: std::io::Result<Message>) -> Result<Message, AuthError> {
    let m = read.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            AuthError::ClientProtocol(e.to_string())
        } else {
            AuthError::ClientClosed(e)
        }
    })?;
    match m.tag {
        b'p' => Ok(m),
        b'X' => Err(AuthError::ClientClosed(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "client sent Terminate",
        ))),
        t => Err(AuthError::ClientProtocol(format!("expected a password message, got '{}'", t as char))),
    }
}

fn upstream_message(read: std::io::Result<Message>) -> Result<Message, AuthError> {
    read.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            AuthError::UpstreamProtocol(e.to_string())
        } else {
            AuthError::Upstream(e)
        }
    })
}

/// What an authentication request asks of the client, for messages.
fn asked_for(code: u32) -> &'static str {
    match code {
        auth::CLEARTEXT => "a cleartext password",
        auth::MD5 => "an MD5 password",
        auth::SASL | auth::SASL_CONTINUE | auth::SASL_FINAL => "a SCRAM password",
        _ => "GSSAPI or SSPI authentication",
    }
}

/// Runs the whole exchange. `client_tls` says whether the client's leg is
/// TLS; `binding` is the upstream's tls-server-end-point data. With
/// [`Credentials::Certificate`] (identity login) the upstream has seen
/// tailgres's client certificate and must answer AuthenticationOk; with
/// [`Credentials::Verified`] tailgres answers from the verifier. Either
/// way a request for anything more is refused: the client is never asked
/// for a password.
pub async fn authenticate<C, U>(
    client: &mut C,
    upstream: &mut U,
    startup: &Startup,
    client_tls: bool,
    credentials: &Credentials,
    binding: Option<&[u8]>,
    issue_key: IssueKey<'_>,
) -> Result<AuthOutcome, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut x = Exchange { client, upstream, c2u: 0, u2c: 0, held: Vec::new() };
    x.send_upstream(&startup.to_bytes()).await?;
    let mut method: Option<AuthMethod> = None;
    // An upstream message read while waiting for either side.
    let mut next: Option<Message> = None;

    // Authentication requests until AuthenticationOk.
    loop {
        let m = match next.take() {
            Some(m) => m,
            None => x.recv_upstream().await?,
        };
        match m.tag {
            b'R' => {
                let code = m.code().ok_or_else(|| {
                    AuthError::UpstreamProtocol("authentication request without a code".into())
                })?;
                match (code, credentials) {
                    (auth::OK, _) => {
                        x.hold_client(&m.to_bytes()).await?;
                        let by = match credentials {
                            Credentials::Certificate => AuthMethod::IdentityCertificate,
                            Credentials::Verified(v) => v.method(),
                            Credentials::Client(_) => AuthMethod::Trust,
                        };
                        method.get_or_insert(by);
                        break;
                    }
                    (auth::SASL, Credentials::Verified(VerifiedClient::Scram { client_key, verifier })) => {
                        method = Some(verified_scram(&mut x, &m, binding, client_key, verifier).await?);
                    }
                    (auth::MD5, Credentials::Verified(VerifiedClient::Md5(v))) => {
                        let salt = m.body.get(4..8).and_then(|s| <[u8; 4]>::try_from(s).ok());
                        let (Verifier::Md5(hash), Some(salt)) = (&**v, salt) else {
                            return Err(AuthError::UpstreamProtocol("malformed MD5 request".into()));
                        };
                        method = Some(AuthMethod::Md5Verifier);
                        let answer = md5_answer(hash, &salt);
                        let message =
                            Zeroizing::new(pgwire::message_bytes(b'p', &[&answer[..], b"\0"].concat()));
                        x.send_upstream(&message).await?;
                    }
                    (other, Credentials::Verified(_)) => {
                        let asked = asked_for(other);
                        let role = startup.user().to_string();
                        let msg = format!(
                            "tailgres authenticated you with role \"{role}\"'s stored password verifier, but the \
                             database asked for {asked}; its operator must use scram-sha-256 for this role in \
                             pg_hba.conf"
                        );
                        let _ = x.send_client(&pgwire::fatal(sqlstate::INVALID_AUTHORIZATION, &msg)).await;
                        return Err(AuthError::VerifierNotEnough { asked, role });
                    }
                    (other, Credentials::Certificate) => {
                        let asked = asked_for(other);
                        let role = startup.user().to_string();
                        let msg = format!(
                            "tailgres logs in to this database by tailnet identity (a client certificate), \
                             but the database asked for {asked} for role \"{role}\"; its operator must use \
                             `cert` for this role in pg_hba.conf"
                        );
                        let _ = x.send_client(&pgwire::fatal(sqlstate::INVALID_AUTHORIZATION, &msg)).await;
                        return Err(AuthError::CertificateNotEnough { asked, role });
                    }
                    (auth::SASL, Credentials::Client(AuthMode::PasswordRelay)) if client_tls => {
                        method = Some(password_relay(&mut x, &m, binding).await?);
                    }
                    (auth::SASL, _) => {
                        method = Some(AuthMethod::ScramSha256);
                        let stripped = strip_plus(&m.body[4..]).ok_or_else(|| {
                            AuthError::UpstreamProtocol("malformed SASL mechanism list".into())
                        })?;
                        if stripped.is_empty() {
                            let msg = "the database only offers SCRAM-SHA-256-PLUS, which needs the \
                                       password relay: connect with TLS (sslmode=require)";
                            let _ = x.send_client(&pgwire::fatal(sqlstate::FEATURE_NOT_SUPPORTED, msg)).await;
                            return Err(AuthError::UpstreamProtocol(msg.into()));
                        }
                        x.send_client(&pgwire::auth_request(auth::SASL, &stripped)).await?;
                        let answer = x.recv_client(MAX_AUTH_MESSAGE).await?;
                        x.send_upstream(&answer.to_bytes()).await?;
                    }
                    (auth::SASL_FINAL, _) => {
                        // Relayed SASL: the final message needs no answer.
                        x.hold_client(&m.to_bytes()).await?;
                    }
                    (auth::GSS_CONTINUE, _) => {
                        // GSSAPI/SSPI: the last continue of a mutual
                        // authentication carries the server's final token
                        // and wants no answer; the client knows, we do not.
                        method.get_or_insert(AuthMethod::Other);
                        x.send_client(&m.to_bytes()).await?;
                        match x.recv_either().await? {
                            Either::Client(answer) => x.send_upstream(&answer.to_bytes()).await?,
                            Either::Upstream(m) => next = Some(m),
                        }
                    }
                    (other, _) => {
                        // Cleartext, MD5, SASL continue, GSS, SSPI: relay the
                        // request and the client's answer unchanged.
                        method.get_or_insert(match other {
                            auth::CLEARTEXT => AuthMethod::Cleartext,
                            auth::MD5 => AuthMethod::Md5,
                            _ => AuthMethod::Other,
                        });
                        x.send_client(&m.to_bytes()).await?;
                        let answer = x.recv_client(MAX_AUTH_MESSAGE).await?;
                        x.send_upstream(&answer.to_bytes()).await?;
                    }
                }
            }
            b'E' => return Err(x.rejected(&m, method.unwrap_or(AuthMethod::Other)).await),
            // NegotiateProtocolVersion and notices reach the client unchanged.
            b'v' | b'N' => x.send_client(&m.to_bytes()).await?,
            t => {
                return Err(AuthError::UpstreamProtocol(format!(
                    "unexpected message '{}' before authentication completed",
                    t as char
                )))
            }
        }
    }
    let method = method.unwrap_or(AuthMethod::Trust);

    // After AuthenticationOk: parameters, the cancel key, ReadyForQuery.
    let mut backend_key = None;
    loop {
        let m = x.recv_upstream().await?;
        match m.tag {
            b'K' => {
                if m.body.len() < 8 || m.body.len() > 4 + pgwire::MAX_CANCEL_KEY {
                    return Err(AuthError::UpstreamProtocol("malformed BackendKeyData".into()));
                }
                let (pid, key) = m.body.split_at(4);
                let pid = u32::from_be_bytes(pid.try_into().unwrap_or_default());
                let (client_pid, client_key) = issue_key(pid, key);
                backend_key = Some((pid, key.to_vec()));
                let body = [&client_pid.to_be_bytes()[..], &client_key].concat();
                x.hold_client(&pgwire::message_bytes(b'K', &body)).await?;
            }
            b'Z' => {
                x.send_client(&m.to_bytes()).await?;
                return Ok(AuthOutcome {
                    method,
                    backend_key,
                    client_to_upstream: x.c2u,
                    upstream_to_client: x.u2c,
                });
            }
            b'E' => return Err(x.rejected(&m, method).await),
            b'S' | b'N' | b'v' => x.hold_client(&m.to_bytes()).await?,
            t => {
                return Err(AuthError::UpstreamProtocol(format!(
                    "unexpected message '{}' before ReadyForQuery",
                    t as char
                )))
            }
        }
    }
}

/// Asks the client for its password and runs SCRAM with the upstream.
async fn password_relay<C, U>(
    x: &mut Exchange<'_, C, U>,
    sasl: &Message,
    binding: Option<&[u8]>,
) -> Result<AuthMethod, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let offered = offered_mechanisms(sasl)?;

    x.send_client(&pgwire::auth_request(auth::CLEARTEXT, &[])).await?;
    let answer = x.recv_client(MAX_PASSWORD_MESSAGE).await?;
    let mut password = Zeroizing::new(answer.body);
    // PasswordMessage: the password and a terminating NUL.
    if password.last() != Some(&0) {
        return Err(AuthError::ClientProtocol("password message without terminator".into()));
    }
    password.pop();

    // Picks SCRAM-SHA-256-PLUS bound to the upstream's certificate when both
    // are available, else plain SCRAM with gs2 flag 'n' (never 'y').
    let client = scram::ScramClient::new(&password, &offered, binding)
        .map_err(|e| AuthError::UpstreamProtocol(format!("{e} (offered {offered:?})")))?;
    drop(password);
    let method = if client.channel_bound() {
        AuthMethod::PasswordRelayScramSha256Plus
    } else {
        AuthMethod::PasswordRelayScramSha256
    };
    x.scram(client, method).await
}

/// Verifier mode, before the database is dialled: authenticates the client
/// with the role's `verifier`. SCRAM: SCRAM-SHA-256-PLUS bound to
/// `binding` (tailgres's certificate, for a TLS client) or SCRAM-SHA-256;
/// the client key comes back. MD5 (a role with an MD5 password): checked
/// against the stored hash. The client's answer is its proof, never its
/// password.
pub async fn verify_client<C>(
    client: &mut C,
    verifier: &Arc<Verifier>,
    binding: Option<&[u8]>,
) -> Result<VerifiedClient, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    async fn send<C: AsyncWrite + Unpin>(c: &mut C, bytes: &[u8]) -> Result<(), AuthError> {
        c.write_all(bytes).await.map_err(AuthError::ClientClosed)?;
        c.flush().await.map_err(AuthError::ClientClosed)
    }
    let recv = async |c: &mut C| client_message(pgwire::read_message(c, MAX_AUTH_MESSAGE).await);
    match &**verifier {
        Verifier::Scram(keys) => {
            let mut server = crate::verifier::ScramServer::new(keys, binding);
            send(client, &pgwire::auth_request(auth::SASL, &server.mechanisms())).await?;
            let first = recv(client).await?;
            let server_first = server.client_first(&first.body).map_err(AuthError::ClientRefused)?;
            send(client, &pgwire::auth_request(auth::SASL_CONTINUE, &server_first)).await?;
            let last = recv(client).await?;
            let done = server.client_final(&last.body).map_err(AuthError::ClientRefused)?;
            send(client, &pgwire::auth_request(auth::SASL_FINAL, &done.server_final)).await?;
            Ok(VerifiedClient::Scram { client_key: done.client_key, verifier: verifier.clone() })
        }
        Verifier::Md5(hash) => {
            let salt: [u8; 4] = rand::random();
            send(client, &pgwire::auth_request(auth::MD5, &salt)).await?;
            let answer = recv(client).await?;
            if !crate::verifier::md5_check(hash, &salt, &answer.body) {
                return Err(AuthError::ClientRefused(crate::verifier::ScramServerError::WrongPassword));
            }
            Ok(VerifiedClient::Md5(verifier.clone()))
        }
    }
}

/// Verifier mode: logs in with the client key the client's proof yielded
/// (SCRAM-SHA-256-PLUS bound to the upstream's certificate when offered).
async fn verified_scram<C, U>(
    x: &mut Exchange<'_, C, U>,
    sasl: &Message,
    binding: Option<&[u8]>,
    client_key: &[u8; 32],
    verifier: &Arc<Verifier>,
) -> Result<AuthMethod, AuthError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let offered = offered_mechanisms(sasl)?;
    let client = scram::ScramClient::with_keys(client_key, verifier.clone(), &offered, binding)
        .map_err(|e| AuthError::UpstreamProtocol(format!("{e} (offered {offered:?})")))?;
    x.scram(client, AuthMethod::ScramVerifier).await
}

/// The mechanisms an AuthenticationSASL offers.
fn offered_mechanisms(sasl: &Message) -> Result<Vec<&str>, AuthError> {
    scram::parse_mechanisms(&sasl.body[4..])
        .map_err(|_| AuthError::UpstreamProtocol("malformed SASL mechanism list".into()))
}

/// Why [`scram_with_upstream`] did not end in AuthenticationSASLFinal.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamScramError {
    /// The database's ErrorResponse (not yet sent anywhere).
    #[error("the database refused the login")]
    Rejected(Message),
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Scram(#[from] scram::ScramError),
    #[error("key derivation task failed: {0}")]
    Task(String),
}

/// Runs `client`'s SCRAM exchange with the database after its
/// AuthenticationSASL: SASLInitialResponse to AuthenticationSASLFinal,
/// whose server signature is checked (a proxy that skipped this would
/// accept an impostor database). Returns the bytes sent.
pub async fn scram_with_upstream<U>(
    upstream: &mut U,
    mut client: scram::ScramClient,
) -> Result<u64, UpstreamScramError>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    async fn send<U: AsyncWrite + Unpin>(
        u: &mut U,
        bytes: &[u8],
        sent: &mut u64,
    ) -> Result<(), UpstreamScramError> {
        u.write_all(bytes).await.map_err(UpstreamScramError::Io)?;
        u.flush().await.map_err(UpstreamScramError::Io)?;
        *sent += bytes.len() as u64;
        Ok(())
    }
    let mut sent = 0u64;
    send(upstream, &client.initial_response(), &mut sent).await?;
    loop {
        let m = pgwire::read_message(upstream, MAX_AUTH_MESSAGE).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                UpstreamScramError::Protocol(e.to_string())
            } else {
                UpstreamScramError::Io(e)
            }
        })?;
        match (m.tag, m.code()) {
            (b'R', Some(auth::SASL_CONTINUE)) => {
                let server_first = m.body[4..].to_vec();
                let reply = if client.derives_keys() {
                    // PBKDF2 runs on the blocking pool: on an async worker, a
                    // stream of logins would stall every relay on that worker.
                    let (back, reply) = tokio::task::spawn_blocking(move || {
                        let reply = client.handle_server_first(&server_first);
                        (client, reply)
                    })
                    .await
                    .map_err(|e| UpstreamScramError::Task(e.to_string()))?;
                    client = back;
                    reply?
                } else {
                    client.handle_server_first(&server_first)?
                };
                send(upstream, &scram::sasl_response(&reply), &mut sent).await?;
            }
            (b'R', Some(auth::SASL_FINAL)) => {
                client.verify_server_final(&m.body[4..])?;
                return Ok(sent);
            }
            (b'E', _) => return Err(UpstreamScramError::Rejected(m)),
            _ => {
                return Err(UpstreamScramError::Protocol(format!(
                    "unexpected message '{}' during SCRAM",
                    m.tag as char
                )))
            }
        }
    }
}

/// The mechanism list without `-PLUS` variants, re-encoded; empty if none
/// remain.
fn strip_plus(list: &[u8]) -> Option<Vec<u8>> {
    let all = scram::parse_mechanisms(list).ok()?;
    let kept: Vec<&str> = all.into_iter().filter(|m| !m.ends_with("-PLUS")).collect();
    if kept.is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    for m in kept {
        out.extend_from_slice(m.as_bytes());
        out.push(0);
    }
    out.push(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// `authenticate` for a TLS client of user "u", password relay.
    async fn relay<C, U>(client: &mut C, upstream: &mut U) -> Result<AuthOutcome, AuthError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let startup = Startup { version: pgwire::PROTOCOL_3_0, params: vec![("user".into(), "u".into())] };
        // The client is given the database's key, reversed.
        let mut issue = |pid: u32, key: &[u8]| (pid, key.iter().rev().copied().collect());
        authenticate(client, upstream, &startup, true, &Credentials::Client(AuthMode::PasswordRelay), None, &mut issue)
            .await
    }

    /// The client's side: records each write, reads nothing.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }
    impl AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
            self.get_mut().0.push(b.to_vec());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// AuthenticationOk and everything up to ReadyForQuery reach the client
    /// in one write, unchanged and in order, as PostgreSQL sends them.
    #[tokio::test]
    async fn what_follows_authentication_ok_is_one_write() {
        let mut from_db = pgwire::auth_request(auth::OK, &[]);
        for i in 0..20 {
            from_db.extend(pgwire::message_bytes(b'S', format!("param{i}\0value{i}\0").as_bytes()));
        }
        from_db.extend(pgwire::message_bytes(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]));
        from_db.extend(pgwire::message_bytes(b'Z', b"I"));
        let (mut db, mut upstream) = tokio::io::duplex(1 << 16);
        db.write_all(&from_db).await.unwrap();
        let mut client = Writes::default();
        let out = relay(&mut client, &mut upstream).await.unwrap();
        assert_eq!(out.method, AuthMethod::Trust);
        assert_eq!(out.backend_key, Some((42, vec![1, 2, 3, 4])));
        let mut to_client = from_db.clone();
        let k = to_client.len() - 6 - 4;
        to_client[k..k + 4].copy_from_slice(&[4, 3, 2, 1]);
        assert_eq!(client.0, vec![to_client], "one write of what the database sent, with the key tailgres issued");
        assert_eq!(out.upstream_to_client, from_db.len() as u64);
    }

    /// A hostile database that never sends ReadyForQuery does not make the
    /// proxy hold an unbounded amount: held messages go out at MAX_HELD.
    #[tokio::test]
    async fn held_messages_are_bounded() {
        // Room for all of it, so the feed finishes before authenticate runs.
        let (mut db, mut upstream) = tokio::io::duplex(1 << 20);
        let feed = tokio::spawn(async move {
            db.write_all(&pgwire::auth_request(auth::OK, &[])).await.unwrap();
            let s = pgwire::message_bytes(b'S', &[b'x'; 1000]);
            for _ in 0..100 {
                db.write_all(&s).await.unwrap();
            }
            db // the stream stays open: no ReadyForQuery, no end
        });
        let mut client = Writes::default();
        let auth = relay(&mut client, &mut upstream);
        let _db = feed.await.unwrap();
        assert!(tokio::time::timeout(std::time::Duration::from_millis(200), auth).await.is_err());
        let sent: usize = client.0.iter().map(Vec::len).sum();
        assert!(client.0.len() >= 5, "{} writes: held messages were not sent at MAX_HELD", client.0.len());
        assert!(client.0.iter().all(|w| w.len() < MAX_HELD + 1100), "a write beyond the bound");
        let total = 9 + 100 * 1005; // AuthenticationOk, then 100 ParameterStatus
        assert!(
            sent + MAX_HELD > total,
            "{sent} of {total} bytes reached the client: more than MAX_HELD held"
        );
    }

    #[test]
    fn plus_is_stripped() {
        let list = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(strip_plus(list).unwrap(), b"SCRAM-SHA-256\0\0");
        assert_eq!(strip_plus(b"SCRAM-SHA-256-PLUS\0\0").unwrap(), b"");
        assert!(strip_plus(b"SCRAM-SHA-256").is_none());
        assert!(strip_plus(b"SCRAM-SHA-256\0\0trailing").is_none());
    }

    /// GSSAPI mutual authentication: the last AuthenticationGSSContinue
    /// wants no answer, and the database goes on to AuthenticationOk; the
    /// proxy must not wait for the client (it once hung here until the
    /// handshake timeout). A continue that does want an answer is relayed.
    #[tokio::test]
    async fn the_last_gss_continue_needs_no_answer() {
        let gss = |code: u32, token: &[u8]| pgwire::auth_request(code, token);
        let (mut db, mut upstream) = tokio::io::duplex(1 << 16);
        let (mut app, mut client) = tokio::io::duplex(1 << 16);
        let db_task = tokio::spawn(async move {
            // The StartupMessage.
            let len = db.read_u32().await.unwrap();
            let mut b = vec![0; len as usize - 4];
            db.read_exact(&mut b).await.unwrap();
            db.write_all(&gss(7, b"")).await.unwrap(); // AuthenticationGSS
            let m = pgwire::read_message(&mut db, 1 << 16).await.unwrap();
            assert_eq!((m.tag, &m.body[..]), (b'p', &b"token-1"[..]));
            db.write_all(&gss(auth::GSS_CONTINUE, b"more")).await.unwrap();
            let m = pgwire::read_message(&mut db, 1 << 16).await.unwrap();
            assert_eq!((m.tag, &m.body[..]), (b'p', &b"token-2"[..]));
            // The final token: the context is complete, no answer comes.
            db.write_all(&gss(auth::GSS_CONTINUE, b"final")).await.unwrap();
            db.write_all(&gss(auth::OK, b"")).await.unwrap();
            db.write_all(&pgwire::message_bytes(b'Z', b"I")).await.unwrap();
            db
        });
        let app_task = tokio::spawn(async move {
            let expect = |m: Message, token: &[u8]| assert_eq!(&m.body[4..], token);
            expect(pgwire::read_message(&mut app, 1 << 16).await.unwrap(), b"");
            app.write_all(&pgwire::message_bytes(b'p', b"token-1")).await.unwrap();
            expect(pgwire::read_message(&mut app, 1 << 16).await.unwrap(), b"more");
            app.write_all(&pgwire::message_bytes(b'p', b"token-2")).await.unwrap();
            expect(pgwire::read_message(&mut app, 1 << 16).await.unwrap(), b"final");
            // Then AuthenticationOk and ReadyForQuery, without a word from us.
            let ok = pgwire::read_message(&mut app, 1 << 16).await.unwrap();
            assert_eq!((ok.tag, ok.code()), (b'R', Some(auth::OK)));
            assert_eq!(pgwire::read_message(&mut app, 1 << 16).await.unwrap().tag, b'Z');
            app
        });
        let out = tokio::time::timeout(std::time::Duration::from_secs(10), relay(&mut client, &mut upstream))
            .await
            .expect("authentication finished without waiting for the client")
            .unwrap();
        assert_eq!(out.method, AuthMethod::Other);
        let _app = app_task.await.unwrap();
        let _db = db_task.await.unwrap();
    }

    /// The password relay's key derivation (PBKDF2, as many rounds as the
    /// database asks, up to scram::MAX_ITERATIONS) runs off the async
    /// workers: on a runtime with a single worker, another task keeps
    /// running while the derivation is under way. (It ran on the worker
    /// before: nothing else on it moved until the derivation was done.)
    #[tokio::test(flavor = "current_thread")]
    async fn key_derivation_leaves_the_worker_free() {
        use base64::{engine::general_purpose::STANDARD, Engine};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (mut db, mut upstream) = tokio::io::duplex(1 << 16);
        let (mut app, mut client) = tokio::io::duplex(1 << 16);
        let db_ticks = ticks.clone();
        let db_task = tokio::spawn(async move {
            let len = db.read_u32().await.unwrap();
            let mut b = vec![0; len as usize - 4];
            db.read_exact(&mut b).await.unwrap();
            db.write_all(&pgwire::auth_request(auth::SASL, b"SCRAM-SHA-256\0\0")).await.unwrap();
            let first = pgwire::read_message(&mut db, 1 << 16).await.unwrap();
            let text = String::from_utf8_lossy(&first.body).to_string();
            let nonce = text.split(",r=").nth(1).unwrap().to_string();
            let server_first =
                format!("r={nonce}server,s={},i={}", STANDARD.encode(b"salt"), scram::MAX_ITERATIONS);
            let sent_at = db_ticks.load(Ordering::Relaxed);
            db.write_all(&pgwire::auth_request(auth::SASL_CONTINUE, server_first.as_bytes())).await.unwrap();
            let _client_final = pgwire::read_message(&mut db, 1 << 16).await.unwrap();
            let during = db_ticks.load(Ordering::Relaxed) - sent_at;
            db.write_all(&pgwire::fatal("28P01", "no")).await.unwrap();
            during
        });
        let app_task = tokio::spawn(async move {
            let _ask = pgwire::read_message(&mut app, 1 << 16).await.unwrap();
            app.write_all(&pgwire::message_bytes(b'p', b"secret\0")).await.unwrap();
            let mut rest = Vec::new();
            let _ = app.read_to_end(&mut rest).await;
        });
        let r = relay(&mut client, &mut upstream).await;
        assert!(matches!(r, Err(AuthError::Rejected { .. })), "{r:?}");
        drop(client);
        let during = db_task.await.unwrap();
        app_task.await.unwrap();
        ticker.abort();
        assert!(during > 0, "nothing else ran on the worker while the key was derived");
    }
}
