//! The audit record: what one JSON line says, typed so that a record the
//! schema (`audit-schema.json`) would reject is hard to build.
//!
//! Closed sets (events, reasons, auth methods, transports) are enums whose
//! serialized names are the schema's `enum` values; who is to blame for a
//! denial or an end is derived from the reason, never chosen separately.
//! No type here has a place for a password, a key or a token: the only free
//! text is `detail`, and callers must put operator-facing explanations there,
//! never client-supplied secrets.
#![forbid(unsafe_code)]

use super::time::rfc3339;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// One audit line. Build it with [`Record::new`] and the `with_*` setters.
///
/// Serialized field order: `ts`, `event` and the event's own fields, then
/// the session context (`session_id`, `peer_addr`, `peer`, `postgres`,
/// `client_transport`, `upstream`), so the line reads left to right as
/// "when, what, who".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// When the event happened (RFC 3339 UTC with microseconds).
    #[serde(serialize_with = "ser_ts_micros")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub event: Event,
    /// The session this record belongs to ([`super::new_session_id`]).
    pub session_id: String,
    /// The tailnet address the connection came from.
    pub peer_addr: SocketAddr,
    /// Who the tailnet says the peer is; `None` before (or without) WhoIs.
    pub peer: Option<Peer>,
    /// What the client asked for in its StartupMessage; `None` before it.
    pub postgres: Option<PostgresInfo>,
    pub client_transport: Option<ClientTransport>,
    /// The verified upstream connection; `None` before TLS is established.
    pub upstream: Option<UpstreamInfo>,
}

impl Record {
    /// A record stamped now, with no peer, startup, transport or upstream
    /// information yet.
    pub fn new(session_id: impl Into<String>, peer_addr: SocketAddr, event: Event) -> Record {
        Record {
            ts: SystemTime::now(),
            event,
            session_id: session_id.into(),
            peer_addr,
            peer: None,
            postgres: None,
            client_transport: None,
            upstream: None,
        }
    }

    pub fn with_ts(mut self, ts: SystemTime) -> Record {
        self.ts = ts;
        self
    }

    pub fn with_peer(mut self, peer: Peer) -> Record {
        self.peer = Some(peer);
        self
    }

    pub fn with_postgres(mut self, postgres: PostgresInfo) -> Record {
        self.postgres = Some(postgres);
        self
    }

    pub fn with_client_transport(mut self, transport: ClientTransport) -> Record {
        self.client_transport = Some(transport);
        self
    }

    pub fn with_upstream(mut self, upstream: UpstreamInfo) -> Record {
        self.upstream = Some(upstream);
        self
    }

    /// The same session context with another event, stamped now: a session
    /// keeps one base record and derives each of its lines from it.
    pub fn with_event(&self, event: Event) -> Record {
        Record { ts: SystemTime::now(), event, ..self.clone() }
    }

    /// The JSON line (without the trailing newline).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// What happened. The `event` field of the line, plus that event's fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The session passed identification, authorization and the upstream
    /// handshake and is about to be relayed.
    SessionStart,
    /// The connection was refused before a session started.
    SessionDenied(Denial),
    /// The upstream accepted the client's authentication.
    AuthOk {
        auth_method: AuthMethod,
        /// The certificate tailgres signed for an identity login (null
        /// otherwise).
        client_certificate: Option<ClientCertificate>,
    },
    /// The upstream (or the proxy's relay of it) rejected authentication.
    AuthFailed(AuthFailure),
    /// A CancelRequest arrived on this connection (or was passed on by a
    /// fleet member).
    Cancel(Cancel),
    /// A relayed session ended.
    SessionEnd(SessionEnd),
    /// A statement the session ran (statement audit, opt-in).
    Statement(Statement),
}

impl Event {
    /// The `event` value this variant serializes as.
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionStart => "session_start",
            Event::SessionDenied(_) => "session_denied",
            Event::AuthOk { .. } => "auth_ok",
            Event::AuthFailed(_) => "auth_failed",
            Event::Cancel(_) => "cancel",
            Event::SessionEnd(_) => "session_end",
            Event::Statement(_) => "statement",
        }
    }

    /// A cancel handled here, from the client that sent it.
    pub fn cancel(outcome: CancelOutcome) -> Event {
        Event::Cancel(Cancel { outcome, fleet_peer: None })
    }

    /// A cancel that went through the fleet member `peer`: the one this
    /// node passed it to, or the one that passed it here.
    pub fn cancel_via(outcome: CancelOutcome, peer: impl Into<String>) -> Event {
        Event::Cancel(Cancel { outcome, fleet_peer: Some(peer.into()) })
    }

    pub fn denied(reason: DenyReason, detail: impl Into<String>) -> Event {
        Event::SessionDenied(Denial { reason, detail: detail.into() })
    }

    pub fn auth_ok(auth_method: AuthMethod) -> Event {
        Event::AuthOk { auth_method, client_certificate: None }
    }

    /// An identity login: the database accepted `cert`.
    pub fn auth_ok_certificate(cert: ClientCertificate) -> Event {
        Event::AuthOk { auth_method: AuthMethod::IdentityCertificate, client_certificate: Some(cert) }
    }

    pub fn auth_failed(
        auth_method: AuthMethod,
        sqlstate: Option<SqlState>,
        detail: impl Into<String>,
    ) -> Event {
        Event::AuthFailed(AuthFailure { auth_method, sqlstate, detail: detail.into() })
    }
}

/// A record about the log itself rather than a session, written by the
/// writer: where a file or a run begins, and signed checkpoints. It has no
/// session context; `seq` and `prev` are appended like every record's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRecord {
    #[serde(serialize_with = "ser_ts_micros")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub event: LogEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LogEvent {
    /// The writer opened the log: the first record of every run and of
    /// every file it reopens (rotation).
    LogOpened {
        reason: OpenReason,
        /// The tailgres version that writes from here on.
        version: &'static str,
        pid: u32,
        /// The checkpoint key (`ed25519:<base64>`), null without signing.
        signing_key: Option<String>,
    },
    /// A signature over this record's `seq` and `prev`, and so over every
    /// line before it (`tailgres audit verify` checks it).
    Checkpoint {
        /// Records written since the previous checkpoint.
        records: u64,
        signing_key: String,
        /// Base64 Ed25519 signature of the checkpoint message
        /// (`chain::checkpoint_message`).
        signature: String,
    },
}

/// Why the writer (re)opened the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenReason {
    /// tailgres started.
    Start,
    /// A reopen was asked for (SIGHUP, after rotation).
    Reopen,
}

/// One statement a session ran: what it was (never with its literals, unless
/// the operator asked for raw text) and how it ended. Serialized with
/// `duration_us`, and `outcome` derived from the SQLSTATE and tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// `simple` (a Query message) or `extended` (Parse/Bind/Execute).
    pub protocol: StatementProtocol,
    /// The statement's text as `text_status` says; `None` when there is
    /// none to show.
    pub text: Option<String>,
    /// `normalized`, `raw`, `redacted`, `unparsed`, `too_long`, `unknown`.
    pub text_status: &'static str,
    /// 16 hex digits, equal for statements that differ only in literals.
    pub fingerprint: String,
    /// From the client's message to the database's answer.
    pub duration: Duration,
    /// The command tag without its counts (`SELECT`, `INSERT`, `BEGIN`).
    pub command_tag: Option<String>,
    /// The tag's row count, when it has one.
    pub rows: Option<u64>,
    pub sqlstate: Option<SqlState>,
    /// A portal that stopped at its row limit (PortalSuspended).
    pub suspended: bool,
    pub copy: Option<StatementCopy>,
    /// The Execute's bind values (`--audit-statement-text raw` only, and
    /// only with raw text); NULL as `None`, binary as `\\x` hex.
    pub params: Option<Vec<Option<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementProtocol {
    Simple,
    Extended,
}

/// A COPY's direction and CopyData bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatementCopy {
    /// `in` (to the database), `out`, or `both`.
    pub direction: &'static str,
    pub bytes: u64,
}

impl Serialize for Statement {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let duration_us = u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX);
        let outcome = if self.sqlstate.is_some() || self.command_tag.is_none() && !self.suspended {
            "error"
        } else if self.suspended {
            "suspended"
        } else {
            "ok"
        };
        let mut st = s.serialize_struct("Statement", 11)?;
        st.serialize_field("protocol", &self.protocol)?;
        st.serialize_field("text", &self.text)?;
        st.serialize_field("text_status", self.text_status)?;
        st.serialize_field("fingerprint", &self.fingerprint)?;
        st.serialize_field("duration_us", &duration_us)?;
        st.serialize_field("outcome", outcome)?;
        st.serialize_field("command_tag", &self.command_tag)?;
        st.serialize_field("rows", &self.rows)?;
        st.serialize_field("sqlstate", &self.sqlstate)?;
        st.serialize_field("copy", &self.copy)?;
        st.serialize_field("params", &self.params)?;
        st.end()
    }
}

/// A refusal. Serialized as `reason`, `detail` and `side` (derived from
/// the reason).
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub reason: DenyReason,
    /// What an operator needs to know (never a secret).
    pub detail: String,
}

impl Serialize for Denial {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Denial", 3)?;
        st.serialize_field("reason", &self.reason)?;
        st.serialize_field("detail", &self.detail)?;
        st.serialize_field("side", &self.reason.side())?;
        st.end()
    }
}

/// Whose doing something was: the audit log's answer to "who broke it"
/// (the one `Side` of the crate: errors of every layer say theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Client,
    Upstream,
    Proxy,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// WhoIs knows no node at the peer address.
    UnknownPeer,
    /// WhoIs itself failed (tailnet node not ready, internal error).
    WhoisFailed,
    /// The audit log cannot be written: fail closed.
    AuditUnavailable,
    /// The client broke the pre-startup or startup protocol.
    ProtocolError,
    /// The client did not finish negotiation in time.
    HandshakeTimeout,
    UpstreamUntrustedCertificate,
    UpstreamNameMismatch,
    UpstreamCertificateExpired,
    /// The upstream answered 'N' to SSLRequest.
    UpstreamNoTls,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// Any other TLS failure with the upstream.
    UpstreamTls,
    /// The upstream broke the protocol before the session started.
    UpstreamProtocolError,
    /// The live-session limit is reached.
    TooManySessions,
    /// The peer already has the most connections that may be in their
    /// handshake at once (`session::MAX_HANDSHAKES_PER_PEER`).
    TooManyHandshakes,
    /// The peer's grants do not allow this role or database.
    NotAuthorized,
    /// No route serves the database asked for (on the port dialled).
    NoRoute,
    /// The client hung up before its startup was complete.
    ClientClosed,
    /// The client's TLS handshake with tailgres failed.
    ClientTlsFailed,
    /// tailgres was shutting down (its grace over) before the session
    /// started: the connection was closed mid-handshake.
    ShuttingDown,
    /// tailgres could not sign the identity-login certificate (or build
    /// the TLS client that presents it).
    IdentityCertificateFailed,
    /// `--auth scram-verifier`: the client's password (its SCRAM proof or
    /// MD5 answer) did not verify against the role's stored verifier.
    PasswordFailed,
    /// `--auth scram-verifier`: the role's verifier could not be looked up
    /// (the database unreachable, the lookup role refused, the query
    /// failed).
    VerifierLookupFailed,
    /// A connection on the Tailscale Service's loopback listener that did
    /// not come from this node's own forwarder, or without a valid PROXY
    /// protocol v2 header naming a tailnet client: never trusted.
    ServiceConnectionRefused,
}

impl DenyReason {
    /// Every reason, in declaration order (tests cover each one against
    /// the schema, so the two cannot drift apart).
    pub const ALL: [DenyReason; 24] = [
        DenyReason::UnknownPeer,
        DenyReason::WhoisFailed,
        DenyReason::AuditUnavailable,
        DenyReason::ProtocolError,
        DenyReason::HandshakeTimeout,
        DenyReason::UpstreamUntrustedCertificate,
        DenyReason::UpstreamNameMismatch,
        DenyReason::UpstreamCertificateExpired,
        DenyReason::UpstreamNoTls,
        DenyReason::UpstreamUnreachable,
        DenyReason::UpstreamTimeout,
        DenyReason::UpstreamTls,
        DenyReason::UpstreamProtocolError,
        DenyReason::TooManySessions,
        DenyReason::TooManyHandshakes,
        DenyReason::NotAuthorized,
        DenyReason::NoRoute,
        DenyReason::ClientClosed,
        DenyReason::ClientTlsFailed,
        DenyReason::ShuttingDown,
        DenyReason::IdentityCertificateFailed,
        DenyReason::PasswordFailed,
        DenyReason::VerifierLookupFailed,
        DenyReason::ServiceConnectionRefused,
    ];

    /// The name it is serialized as (the audit record's and the metrics'
    /// label value).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownPeer => "unknown_peer",
            DenyReason::WhoisFailed => "whois_failed",
            DenyReason::AuditUnavailable => "audit_unavailable",
            DenyReason::ProtocolError => "protocol_error",
            DenyReason::HandshakeTimeout => "handshake_timeout",
            DenyReason::UpstreamUntrustedCertificate => "upstream_untrusted_certificate",
            DenyReason::UpstreamNameMismatch => "upstream_name_mismatch",
            DenyReason::UpstreamCertificateExpired => "upstream_certificate_expired",
            DenyReason::UpstreamNoTls => "upstream_no_tls",
            DenyReason::UpstreamUnreachable => "upstream_unreachable",
            DenyReason::UpstreamTimeout => "upstream_timeout",
            DenyReason::UpstreamTls => "upstream_tls",
            DenyReason::UpstreamProtocolError => "upstream_protocol_error",
            DenyReason::TooManySessions => "too_many_sessions",
            DenyReason::TooManyHandshakes => "too_many_handshakes",
            DenyReason::NotAuthorized => "not_authorized",
            DenyReason::NoRoute => "no_route",
            DenyReason::ClientClosed => "client_closed",
            DenyReason::ClientTlsFailed => "client_tls_failed",
            DenyReason::ShuttingDown => "shutting_down",
            DenyReason::IdentityCertificateFailed => "identity_certificate_failed",
            DenyReason::PasswordFailed => "password_failed",
            DenyReason::VerifierLookupFailed => "verifier_lookup_failed",
            DenyReason::ServiceConnectionRefused => "service_connection_refused",
        }
    }

    /// Who caused the refusal.
    pub fn side(self) -> Side {
        use DenyReason::*;
        match self {
            UnknownPeer | ProtocolError | HandshakeTimeout | NotAuthorized | NoRoute | ClientClosed
            | ClientTlsFailed | TooManyHandshakes | PasswordFailed | ServiceConnectionRefused => Side::Client,
            UpstreamUntrustedCertificate
            | UpstreamNameMismatch
            | UpstreamCertificateExpired
            | UpstreamNoTls
            | UpstreamUnreachable
            | UpstreamTimeout
            | UpstreamTls
            | UpstreamProtocolError => Side::Upstream,
            WhoisFailed
            | AuditUnavailable
            | TooManySessions
            | ShuttingDown
            | IdentityCertificateFailed
            | VerifierLookupFailed => Side::Proxy,
        }
    }
}

/// How the client was authenticated to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// The proxy took the password from the client and ran
    /// SCRAM-SHA-256-PLUS (channel binding) upstream.
    #[serde(rename = "password_relay_scram_sha_256_plus")]
    PasswordRelayScramSha256Plus,
    /// As above without channel binding.
    #[serde(rename = "password_relay_scram_sha_256")]
    PasswordRelayScramSha256,
    /// SCRAM-SHA-256 relayed message by message.
    #[serde(rename = "scram_sha_256")]
    ScramSha256,
    Md5,
    Cleartext,
    /// The upstream asked for no authentication.
    Trust,
    /// Identity login: tailgres presented a client certificate it signed
    /// for the session, and the database accepted it (`cert`).
    IdentityCertificate,
    /// `--auth scram-verifier`: tailgres checked the client's SCRAM proof
    /// against the role's stored verifier and logged in with the client
    /// key it yielded (the password never reached the proxy).
    ScramVerifier,
    /// As above for a role with an MD5 password: the stored hash checked
    /// the client's MD5 answer and answered the database's.
    Md5Verifier,
    Other,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 10] = [
        AuthMethod::PasswordRelayScramSha256Plus,
        AuthMethod::PasswordRelayScramSha256,
        AuthMethod::ScramSha256,
        AuthMethod::Md5,
        AuthMethod::Cleartext,
        AuthMethod::Trust,
        AuthMethod::IdentityCertificate,
        AuthMethod::ScramVerifier,
        AuthMethod::Md5Verifier,
        AuthMethod::Other,
    ];
}

/// The client certificate tailgres signed for an identity login.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientCertificate {
    /// Serial number, hex (it is the session id).
    pub serial: String,
    /// Subject, RFC 4514 (as the database's `pg_stat_ssl` shows it).
    pub subject: String,
    #[serde(serialize_with = "ser_ts_seconds")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "ser_ts_seconds")]
    pub not_after: SystemTime,
}

/// Failed authentication: `auth_method`, `sqlstate`, `detail`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthFailure {
    pub auth_method: AuthMethod,
    /// From the upstream's ErrorResponse, when there was one.
    pub sqlstate: Option<SqlState>,
    pub detail: String,
}

/// A five-character SQLSTATE code (digits and upper-case letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState([u8; 5]);

impl SqlState {
    /// `None` unless `code` is exactly five of `0-9A-Z`.
    pub fn parse(code: &str) -> Option<SqlState> {
        let bytes: [u8; 5] = code.as_bytes().try_into().ok()?;
        bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()).then_some(SqlState(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `parse`).
        std::str::from_utf8(&self.0).unwrap_or("?????")
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for SqlState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What became of a CancelRequest. Serialized as `forwarded`,
/// `target_session_id` and `reason`; the combinations the schema allows are
/// exactly these variants.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Sent to the upstream of a live session from the same node.
    Forwarded { target_session_id: String },
    /// No live session has that (pid, secret key) pair.
    UnknownKey,
    /// The key belongs to a live session of another tailnet node: refused.
    OtherNode { target_session_id: String },
    /// The key was valid but the upstream could not be reached.
    UpstreamError { target_session_id: String },
    /// The key names another fleet member: passed on to it (its own record
    /// says what became of it).
    ToPeer,
    /// The key names another fleet member, which could not be reached.
    PeerUnreachable,
    /// A cancel passed on by a node that is not a fleet member: refused.
    NotFleetMember,
}

/// A cancel's record: what became of it and, in a fleet, the member it went
/// through (`fleet_peer`, null otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Cancel {
    pub outcome: CancelOutcome,
    pub fleet_peer: Option<String>,
}

impl CancelOutcome {
    pub fn forwarded(&self) -> bool {
        matches!(self, CancelOutcome::Forwarded { .. })
    }

    pub fn target_session_id(&self) -> Option<&str> {
        match self {
            CancelOutcome::Forwarded { target_session_id }
            | CancelOutcome::OtherNode { target_session_id }
            | CancelOutcome::UpstreamError { target_session_id } => Some(target_session_id),
            CancelOutcome::UnknownKey
            | CancelOutcome::ToPeer
            | CancelOutcome::PeerUnreachable
            | CancelOutcome::NotFleetMember => None,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            CancelOutcome::Forwarded { .. } => "forwarded",
            CancelOutcome::UnknownKey => "unknown_key",
            CancelOutcome::OtherNode { .. } => "other_node",
            CancelOutcome::UpstreamError { .. } => "upstream_error",
            CancelOutcome::ToPeer => "to_peer",
            CancelOutcome::PeerUnreachable => "peer_unreachable",
            CancelOutcome::NotFleetMember => "not_fleet_member",
        }
    }
}

impl Serialize for Cancel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = &self.outcome;
        let mut st = s.serialize_struct("Cancel", 4)?;
        st.serialize_field("forwarded", &o.forwarded())?;
        st.serialize_field("target_session_id", &o.target_session_id())?;
        st.serialize_field("reason", o.reason())?;
        st.serialize_field("fleet_peer", &self.fleet_peer)?;
        st.end()
    }
}

/// The end of a relayed session. Serialized with `ended_by` derived from
/// the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEnd {
    pub duration: Duration,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub reason: EndReason,
    pub detail: Option<String>,
}

impl Serialize for SessionEnd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // u64 milliseconds cover 584 million years; saturate anyway.
        let duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX);
        let mut st = s.serialize_struct("SessionEnd", 6)?;
        st.serialize_field("duration_ms", &duration_ms)?;
        st.serialize_field("bytes_client_to_upstream", &self.bytes_client_to_upstream)?;
        st.serialize_field("bytes_upstream_to_client", &self.bytes_upstream_to_client)?;
        st.serialize_field("ended_by", &self.reason.ended_by())?;
        st.serialize_field("reason", &self.reason)?;
        st.serialize_field("detail", &self.detail)?;
        st.end()
    }
}

/// Why a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The client closed its connection without a Terminate message.
    ClientClosed,
    /// The client sent Terminate ('X').
    ClientTerminated,
    /// Reading from or writing to the client failed.
    ClientError,
    /// The upstream closed its connection.
    UpstreamClosed,
    /// Reading from or writing to the upstream failed.
    UpstreamError,
    /// The upstream rejected authentication and closed the session.
    AuthFailed,
    /// The proxy is shutting down.
    Shutdown,
    /// The peer's access was revoked (node removed, grant withdrawn).
    Revoked,
    IdleTimeout,
    /// Statement audit could not record the session's statements (the
    /// log could not be written, or the session outran what it can
    /// follow): ended, fail closed.
    AuditUnavailable,
}

impl EndReason {
    pub const ALL: [EndReason; 10] = [
        EndReason::ClientClosed,
        EndReason::ClientTerminated,
        EndReason::ClientError,
        EndReason::UpstreamClosed,
        EndReason::UpstreamError,
        EndReason::AuthFailed,
        EndReason::Shutdown,
        EndReason::Revoked,
        EndReason::IdleTimeout,
        EndReason::AuditUnavailable,
    ];

    /// The name it is serialized as (the audit record's and the metrics'
    /// label value).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::ClientTerminated => "client_terminated",
            EndReason::ClientError => "client_error",
            EndReason::UpstreamClosed => "upstream_closed",
            EndReason::UpstreamError => "upstream_error",
            EndReason::AuthFailed => "auth_failed",
            EndReason::Shutdown => "shutdown",
            EndReason::Revoked => "revoked",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::AuditUnavailable => "audit_unavailable",
        }
    }

    /// Who ended the session.
    pub fn ended_by(self) -> Side {
        use EndReason::*;
        match self {
            ClientClosed | ClientTerminated | ClientError => Side::Client,
            UpstreamClosed | UpstreamError | AuthFailed => Side::Upstream,
            Shutdown | Revoked | IdleTimeout | AuditUnavailable => Side::Proxy,
        }
    }
}

/// The tailnet identity of the peer, as WhoIs reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub stable_id: String,
    pub node_name: String,
    pub user_login: String,
    pub user_display_name: String,
    pub tags: Vec<String>,
    /// The peer's tailnet address the connection came from.
    pub tailnet_ip: IpAddr,
    pub os: String,
    pub shared_in: bool,
}

/// What the StartupMessage asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostgresInfo {
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    pub protocol: ProtocolVersion,
}

/// Frontend/backend protocol version of the StartupMessage ("3.0",
/// "3.2"; a client may ask for a newer minor, which the upstream then
/// negotiates down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    pub const V3_0: ProtocolVersion = ProtocolVersion { major: 3, minor: 0 };
    pub const V3_2: ProtocolVersion = ProtocolVersion { major: 3, minor: 2 };

    /// From the StartupMessage's version code (major << 16 | minor).
    pub fn from_code(code: u32) -> ProtocolVersion {
        ProtocolVersion { major: (code >> 16) as u16, minor: (code & 0xffff) as u16 }
    }
}

impl Serialize for ProtocolVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}.{}", self.major, self.minor))
    }
}

/// How the client leg is carried (inside WireGuard in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientTransport {
    Plaintext,
    /// TLS after an SSLRequest.
    Tls,
    /// TLS from the first byte (PostgreSQL 17 `sslnegotiation=direct`).
    DirectTls,
}

impl ClientTransport {
    pub fn is_tls(self) -> bool {
        self != ClientTransport::Plaintext
    }
}

/// The verified upstream connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamInfo {
    /// The dial address as configured ("host:port").
    pub address: String,
    /// The name the certificate was verified against.
    pub server_name: String,
    pub tls_version: TlsVersion,
    /// The negotiated suite, rustls spelling ("TLS13_AES_256_GCM_SHA384").
    pub cipher: String,
    /// SHA-256 of the end-entity certificate (DER), serialized as hex.
    #[serde(serialize_with = "ser_hex")]
    pub cert_sha256: [u8; 32],
    /// The end-entity certificate's notAfter (RFC 3339, seconds).
    #[serde(serialize_with = "ser_opt_ts_seconds")]
    pub cert_not_after: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

fn ser_ts_micros<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t, true))
}

fn ser_ts_seconds<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t, false))
}

fn ser_opt_ts_seconds<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t, false)),
        None => s.serialize_none(),
    }
}

fn ser_hex<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    use fmt::Write;
    let mut hex = String::with_capacity(64);
    for b in bytes {
        let _ = write!(hex, "{b:02x}");
    }
    s.serialize_str(&hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::time::UNIX_EPOCH;

    /// `secs` seconds and `micros` microseconds after the epoch.
    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn sqlstate_parse() {
        for ok in ["28P01", "57014", "XX000", "00000"] {
            assert_eq!(SqlState::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "28p01", "28P0", "28P011", "28P0\u{e9}", "28 01"] {
            assert!(SqlState::parse(bad).is_none(), "{bad:?}");
        }
    }

    fn addr() -> SocketAddr {
        "100.64.0.3:41234".parse().unwrap()
    }

    #[test]
    fn minimal_record_has_every_common_field() {
        let r =
            Record::new("0123456789abcdef", addr(), Event::SessionStart).with_ts(at(1_795_442_587, 123_456));
        let v: Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "ts": "2026-11-23T14:03:07.123456Z",
                "event": "session_start",
                "session_id": "0123456789abcdef",
                "peer_addr": "100.64.0.3:41234",
                "peer": null,
                "postgres": null,
                "client_transport": null,
                "upstream": null,
            })
        );
        // "event" comes second on the line.
        assert!(r
            .to_json()
            .unwrap()
            .starts_with(r#"{"ts":"2026-11-23T14:03:07.123456Z","event":"session_start","#));
    }

    #[test]
    fn event_fields_are_derived_consistently() {
        let cases: Vec<(Event, Value)> = vec![
            (
                Event::denied(DenyReason::UpstreamNameMismatch, "cert is for db2"),
                json!({"event": "session_denied", "reason": "upstream_name_mismatch",
                       "detail": "cert is for db2", "side": "upstream"}),
            ),
            (
                Event::denied(DenyReason::TooManySessions, "limit 100"),
                json!({"event": "session_denied", "reason": "too_many_sessions",
                       "detail": "limit 100", "side": "proxy"}),
            ),
            (
                Event::auth_ok(AuthMethod::PasswordRelayScramSha256Plus),
                json!({"event": "auth_ok", "auth_method": "password_relay_scram_sha_256_plus",
                       "client_certificate": null}),
            ),
            (
                Event::auth_ok_certificate(ClientCertificate {
                    serial: "8f3a0c1d2e4b5a69".into(),
                    subject: "CN=app,O=tailgres,serialNumber=8f3a0c1d2e4b5a69,L=laptop,OU=alice@example.com"
                        .into(),
                    not_before: at(1_795_442_527, 0),
                    not_after: at(1_795_442_887, 0),
                }),
                json!({"event": "auth_ok", "auth_method": "identity_certificate",
                       "client_certificate": {"serial": "8f3a0c1d2e4b5a69",
                           "subject": "CN=app,O=tailgres,serialNumber=8f3a0c1d2e4b5a69,L=laptop,OU=alice@example.com",
                           "not_before": "2026-11-23T14:02:07Z", "not_after": "2026-11-23T14:08:07Z"}}),
            ),
            (
                Event::auth_failed(AuthMethod::Md5, SqlState::parse("28P01"), "bad password"),
                json!({"event": "auth_failed", "auth_method": "md5", "sqlstate": "28P01",
                       "detail": "bad password"}),
            ),
            (
                Event::cancel(CancelOutcome::UnknownKey),
                json!({"event": "cancel", "forwarded": false, "target_session_id": null,
                       "reason": "unknown_key", "fleet_peer": null}),
            ),
            (
                Event::cancel(CancelOutcome::Forwarded { target_session_id: "00000000000000ff".into() }),
                json!({"event": "cancel", "forwarded": true,
                       "target_session_id": "00000000000000ff", "reason": "forwarded", "fleet_peer": null}),
            ),
            (
                Event::cancel_via(CancelOutcome::ToPeer, "pg-2.example.ts.net"),
                json!({"event": "cancel", "forwarded": false, "target_session_id": null,
                       "reason": "to_peer", "fleet_peer": "pg-2.example.ts.net"}),
            ),
            (
                Event::SessionEnd(SessionEnd {
                    duration: Duration::from_micros(1_234_567),
                    bytes_client_to_upstream: 10,
                    bytes_upstream_to_client: 20,
                    reason: EndReason::ClientTerminated,
                    detail: None,
                }),
                json!({"event": "session_end", "duration_ms": 1234,
                       "bytes_client_to_upstream": 10, "bytes_upstream_to_client": 20,
                       "ended_by": "client", "reason": "client_terminated", "detail": null}),
            ),
        ];
        for (event, want) in cases {
            let name = event.name();
            let v: Value = serde_json::to_value(Record::new("0123456789abcdef", addr(), event)).unwrap();
            assert_eq!(v["event"], name);
            for (k, want_v) in want.as_object().unwrap() {
                assert_eq!(&v[k], want_v, "{name}.{k}");
            }
            // 8 common fields plus exactly the event's own.
            assert_eq!(v.as_object().unwrap().len(), 7 + want.as_object().unwrap().len(), "{v}");
        }
    }

    #[test]
    fn filled_context_serializes_as_specified() {
        let r =
            Record::new("0123456789abcdef", "[fd7a:115c:a1e0::3]:5000".parse().unwrap(), Event::SessionStart)
                .with_peer(Peer {
                    stable_id: "nXYZ".into(),
                    node_name: "laptop.tail1234.ts.net".into(),
                    user_login: "alice@example.com".into(),
                    user_display_name: "Alice".into(),
                    tags: vec!["tag:dev".into()],
                    tailnet_ip: "fd7a:115c:a1e0::3".parse().unwrap(),
                    os: "linux".into(),
                    shared_in: false,
                })
                .with_postgres(PostgresInfo {
                    user: "alice".into(),
                    database: "app".into(),
                    application_name: None,
                    protocol: ProtocolVersion::V3_2,
                })
                .with_client_transport(ClientTransport::DirectTls)
                .with_upstream(UpstreamInfo {
                    address: "db.internal:5432".into(),
                    server_name: "db.internal".into(),
                    tls_version: TlsVersion::Tls13,
                    cipher: "TLS13_AES_256_GCM_SHA384".into(),
                    cert_sha256: [0xab; 32],
                    cert_not_after: Some(at(1_795_442_587, 5)),
                });
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["peer_addr"], "[fd7a:115c:a1e0::3]:5000");
        assert_eq!(v["peer"]["tailnet_ip"], "fd7a:115c:a1e0::3");
        assert_eq!(v["postgres"]["protocol"], "3.2");
        assert_eq!(v["postgres"]["application_name"], Value::Null);
        assert_eq!(v["client_transport"], "direct_tls");
        assert_eq!(v["upstream"]["tls_version"], "TLSv1.3");
        assert_eq!(v["upstream"]["cert_sha256"], "ab".repeat(32));
        assert_eq!(v["upstream"]["cert_not_after"], "2026-11-23T14:03:07Z");
        let again = r.with_event(Event::auth_ok(AuthMethod::Trust));
        assert_eq!(again.peer, r.peer);
        assert_eq!(again.upstream, r.upstream);
    }

    #[test]
    fn sides_are_derived_from_reasons() {
        assert_eq!(DenyReason::UnknownPeer.side(), Side::Client);
        assert_eq!(DenyReason::AuditUnavailable.side(), Side::Proxy);
        assert_eq!(DenyReason::UpstreamNoTls.side(), Side::Upstream);
        assert_eq!(EndReason::UpstreamClosed.ended_by(), Side::Upstream);
        assert_eq!(EndReason::Revoked.ended_by(), Side::Proxy);
        // as_str is the serialized name (metrics labels use it).
        for r in DenyReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str(), "{r:?}");
        }
        for r in EndReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str(), "{r:?}");
        }
        // Every reason's name is snake_case (the schema's pattern).
        for r in DenyReason::ALL {
            let s = serde_json::to_value(r).unwrap();
            let s = s.as_str().unwrap();
            assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{s}");
        }
    }
}
