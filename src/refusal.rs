//! Why admission stopped: the one value every admission stage returns
//! instead of its next state. It carries the reason (which implies who is to
//! blame), the FATAL the client is told (SQLSTATE and message, or nothing
//! when the client cannot or need not be told) and the operator's detail;
//! [`crate::session`] turns it, in one place, into the FATAL, the audit
//! record and the metric.
//!
//! The mappings from each stage's error type live here, beside each other,
//! so that who is blamed and what the client reads can be compared at a
//! glance and tested as a table.
#![forbid(unsafe_code)]

use crate::audit::{AuthMethod, DenyReason, EndReason, SqlState};
use crate::authenticate::AuthError;
use crate::negotiate::NegotiateError;
use crate::pgwire::sqlstate;
use crate::tailnet::TailnetError;
use crate::upstream::UpstreamError;

/// The record that closes a refused session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `session_denied`: refused before a session was relayed.
    Denied(DenyReason),
    /// `session_end`: a session whose `session_start` was written.
    Ended(EndReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub outcome: Outcome,
    /// The FATAL for the client: SQLSTATE and a message that says what to
    /// do. `None`: the client is gone, timed out, or was already told (the
    /// database's own ErrorResponse was relayed); it is only closed.
    pub tell: Option<(&'static str, String)>,
    /// For the operator's log and the audit record (never a secret).
    pub detail: String,
    /// An `auth_failed` record comes first: how the client tried to log in
    /// and the database's SQLSTATE, when it answered with one.
    pub auth_failed: Option<(AuthMethod, Option<SqlState>)>,
}

impl Refusal {
    pub fn denied(reason: DenyReason, detail: impl Into<String>) -> Refusal {
        Refusal { outcome: Outcome::Denied(reason), tell: None, detail: detail.into(), auth_failed: None }
    }

    pub fn ended(reason: EndReason, detail: impl Into<String>) -> Refusal {
        Refusal { outcome: Outcome::Ended(reason), tell: None, detail: detail.into(), auth_failed: None }
    }

    /// Tells the client `message` with `code` before closing.
    pub fn telling(mut self, code: &'static str, message: impl Into<String>) -> Refusal {
        self.tell = Some((code, message.into()));
        self
    }

    /// WhoIs failed: an unknown address is the peer's, a failed lookup the
    /// proxy's.
    pub fn whois(e: &TailnetError) -> Refusal {
        match e {
            TailnetError::UnknownPeer { .. } => Refusal::denied(DenyReason::UnknownPeer, e.to_string())
                .telling(
                    sqlstate::INVALID_AUTHORIZATION,
                    "tailgres could not identify this tailnet peer, so it refuses the connection",
                ),
            _ => Refusal::denied(DenyReason::WhoisFailed, e.to_string()).telling(
                sqlstate::CANNOT_CONNECT_NOW,
                "tailgres could not look up who this tailnet peer is right now; try again shortly",
            ),
        }
    }

    /// Negotiation failed (negotiate has already told the client, where it
    /// could, with its own 08P01).
    pub fn negotiation(e: &NegotiateError) -> Refusal {
        let reason = match e {
            NegotiateError::Closed => DenyReason::ClientClosed,
            NegotiateError::Tls(_) => DenyReason::ClientTlsFailed,
            NegotiateError::Io(_) | NegotiateError::Protocol(_) => DenyReason::ProtocolError,
        };
        Refusal::denied(reason, e.to_string())
    }

    /// The database could not be reached over verified TLS.
    pub fn upstream(e: &UpstreamError) -> Refusal {
        Refusal::denied(e.deny_reason(), e.to_string()).telling(e.sqlstate(), e.client_message())
    }

    /// Authentication did not end in ReadyForQuery.
    pub fn auth(e: AuthError) -> Refusal {
        let lost = "tailgres lost the database connection during authentication; \
                    the operator's log has the details";
        match e {
            // The database's ErrorResponse has reached the client already.
            AuthError::Rejected { method, sqlstate, message } => Refusal {
                auth_failed: Some((method, sqlstate)),
                ..Refusal::ended(EndReason::AuthFailed, message)
            },
            // Told by authenticate; the database's settings are the cause.
            AuthError::CertificateNotEnough { .. } => Refusal {
                auth_failed: Some((
                    AuthMethod::IdentityCertificate,
                    SqlState::parse(sqlstate::INVALID_AUTHORIZATION),
                )),
                ..Refusal::ended(EndReason::AuthFailed, e.to_string())
            },
            AuthError::VerifierNotEnough { .. } => Refusal {
                auth_failed: Some((
                    AuthMethod::ScramVerifier,
                    SqlState::parse(sqlstate::INVALID_AUTHORIZATION),
                )),
                ..Refusal::ended(EndReason::AuthFailed, e.to_string())
            },
            AuthError::ClientClosed(_) => Refusal::ended(EndReason::ClientClosed, e.to_string()),
            AuthError::ClientProtocol(_) | AuthError::ClientRefused(_) => {
                Refusal::ended(EndReason::ClientError, e.to_string())
            }
            AuthError::Upstream(_) | AuthError::UpstreamProtocol(_) | AuthError::Scram(_) => Refusal {
                auth_failed: Some((e.method(), None)),
                ..Refusal::ended(EndReason::UpstreamError, e.to_string())
                    .telling(sqlstate::CONNECTION_FAILURE, lost)
            },
        }
    }
}

impl Refusal {
    /// `--auth scram-verifier`: the client's own authentication with
    /// tailgres failed, before any session started. A wrong password reads
    /// as PostgreSQL's own message (and the same for a role that does not
    /// exist); `auth_failed` comes first, with how the client tried.
    pub fn verification(e: AuthError, method: AuthMethod, role: &str) -> Refusal {
        use crate::verifier::ScramServerError;
        let failed = |state: &str| Some((method, SqlState::parse(state)));
        match e {
            AuthError::ClientRefused(ScramServerError::WrongPassword) => Refusal {
                auth_failed: failed(sqlstate::INVALID_PASSWORD),
                ..Refusal::denied(DenyReason::PasswordFailed, e.to_string()).telling(
                    sqlstate::INVALID_PASSWORD,
                    format!("password authentication failed for user \"{role}\""),
                )
            },
            AuthError::ClientRefused(ref r) => Refusal {
                auth_failed: failed(sqlstate::PROTOCOL_VIOLATION),
                ..Refusal::denied(DenyReason::ProtocolError, e.to_string())
                    .telling(sqlstate::PROTOCOL_VIOLATION, r.to_string())
            },
            AuthError::ClientClosed(_) => Refusal::denied(DenyReason::ClientClosed, e.to_string()),
            _ => Refusal::denied(DenyReason::ProtocolError, e.to_string())
                .telling(sqlstate::PROTOCOL_VIOLATION, "tailgres: unexpected message during authentication"),
        }
    }

    /// `--auth scram-verifier`: the role's verifier could not be looked up.
    /// The proxy's failure: the client is told to try again, not that its
    /// password is wrong.
    pub fn verifier_lookup(e: &crate::lookup::LookupError, role: &str) -> Refusal {
        Refusal::denied(DenyReason::VerifierLookupFailed, format!("looking up role {role:?}'s verifier: {e}"))
            .telling(
                sqlstate::CANNOT_CONNECT_NOW,
                "tailgres could not look up this role's password verifier right now; the operator's log says why",
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn each_stage_error_maps_to_its_reason_and_message() {
        let addr = "100.64.0.9:1234".parse().unwrap();
        let unknown = Refusal::whois(&TailnetError::UnknownPeer { addr });
        assert_eq!(unknown.outcome, Outcome::Denied(DenyReason::UnknownPeer));
        assert_eq!(unknown.tell.as_ref().unwrap().0, "28000");
        let broken = Refusal::whois(&TailnetError::WhoIs { addr, reason: "backend gone".into() });
        assert_eq!(broken.outcome, Outcome::Denied(DenyReason::WhoisFailed));
        assert_eq!(broken.tell.as_ref().unwrap().0, "57P03");
        assert!(broken.detail.contains("backend gone"));

        for (e, want) in [
            (NegotiateError::Closed, DenyReason::ClientClosed),
            (NegotiateError::Tls(io::Error::other("bad record")), DenyReason::ClientTlsFailed),
            (NegotiateError::Protocol("x".into()), DenyReason::ProtocolError),
            (NegotiateError::Io(io::Error::other("x")), DenyReason::ProtocolError),
        ] {
            let r = Refusal::negotiation(&e);
            assert_eq!((r.outcome, r.tell), (Outcome::Denied(want), None), "{e}");
        }

        let r = Refusal::upstream(&UpstreamError::ServerRefusedTls { addr: "db:5432".into() });
        assert_eq!(r.outcome, Outcome::Denied(DenyReason::UpstreamNoTls));
        assert!(!r.tell.as_ref().unwrap().1.contains("db:5432"), "no addresses for the client");

        let rejected = AuthError::Rejected {
            method: AuthMethod::Md5,
            sqlstate: SqlState::parse("28P01"),
            message: "password authentication failed".into(),
        };
        let r = Refusal::auth(rejected);
        assert_eq!(r.outcome, Outcome::Ended(EndReason::AuthFailed));
        assert_eq!(r.tell, None, "the database's own error was relayed");
        assert_eq!(r.auth_failed, Some((AuthMethod::Md5, SqlState::parse("28P01"))));
        let r = Refusal::auth(AuthError::Scram("server signature".into()));
        assert_eq!(r.outcome, Outcome::Ended(EndReason::UpstreamError));
        assert_eq!(r.tell.as_ref().unwrap().0, "08006");
        let r = Refusal::auth(AuthError::ClientClosed(io::Error::other("eof")));
        assert_eq!((r.outcome, r.auth_failed), (Outcome::Ended(EndReason::ClientClosed), None));
    }
}
