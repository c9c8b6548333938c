//! One client session, through every stage of the pipeline in order:
//! identify → negotiate → upstream → authenticate → relay, with an audit
//! record at start, denial, authentication, cancel and end.
//!
//! Fail closed: an unidentified peer, an unwritable audit log or an
//! unverifiable upstream ends the session with a FATAL the client can act
//! on, and the details go to the operator's log and the audit record.
#![forbid(unsafe_code)]

use crate::audit::{self, DenyReason, EndReason, Event, Record, SessionEnd};
use crate::authenticate::{self, AuthError, Credentials, VerifiedClient};
use crate::authorize::Decision;
use crate::cancel::{CancelDecision, CancelOwner};
use crate::context::Shared;
use crate::identity_login::{Holder, IdentityCa};
use crate::lookup::{Origin, VerifierSource};
use crate::metrics::Stage;
use crate::negotiate::{self, CancelRequest, Negotiated, Startup};
use crate::pgwire::{self, sqlstate};
use crate::refusal::{Outcome, Refusal};
use crate::relay;
use crate::settings::{Login, Settings};
use crate::stream::ClientStream;
use crate::tailnet::{PeerIdentity, Tailnet};
use crate::upstream::{UpstreamError, UpstreamTls};
use crate::verifier::{ScramServerError, Verifier};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument;

/// Runs one session to its end. Never panics on peer input; every outcome
/// is audited (or, if the audit log itself fails, logged as an error).
/// `local_port` is the tailnet port the peer dialled (it selects routes).
/// `via_service`: the connection came through the Tailscale Service.
pub async fn run<S, T>(stream: S, peer_addr: SocketAddr, local_port: u16, via_service: bool, tailnet: &T, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + relay::HandOff,
    T: Tailnet,
{
    let id = audit::new_session_id();
    let span = tracing::info_span!("session", id = %id, peer = %peer_addr);
    let _active = shared.metrics.session_started();
    Session {
        base: Record::new(id, peer_addr, Event::SessionStart),
        shared,
        settings: shared.settings.get(),
        started: Instant::now(),
        start_requested: false,
        finished: AtomicBool::new(false),
        via_service,
    }
    .run(stream, local_port, tailnet)
    .instrument(span)
    .await
}

struct Session<'a> {
    /// Identity, connection facts; each audit record starts from this.
    base: Record,
    shared: &'a Shared,
    /// The settings when the session began, kept to its end.
    settings: Arc<Settings>,
    started: Instant,
    /// The session_start record was handed to the audit log: an end from
    /// here on is a session_end, not a session_denied.
    start_requested: bool,
    /// A session_denied or session_end was handed to the audit log: the
    /// session's last record, so nothing may write another.
    finished: AtomicBool,
    /// Came through the Tailscale Service.
    via_service: bool,
}

/// When the proxy ends its sessions, how long admission may go on to end
/// itself (sending the client a FATAL where it can) before it is dropped.
const ADMISSION_WIND_DOWN: Duration = Duration::from_secs(1);

/// Connections one peer (tailnet node) may have in their handshake, not
/// yet authorized, at once. Generous for a pooler filling its pool; small
/// beside --max-sessions (1000 by default).
pub const MAX_HANDSHAKES_PER_PEER: u32 = 64;

/// An admitted session: what the relay stage needs from admission.
///
/// The streams are boxed: a TLS stream is over a kilobyte, and a value
/// moved out of an async fn's local still occupies its state; boxed, each
/// stream exists once, wherever it is moved.
struct Admitted<S> {
    client: Box<ClientStream<S>>,
    parts: Parts,
}

/// What admission established besides the client's connection.
struct Parts {
    upstream: Box<tokio_rustls::client::TlsStream<crate::upstream::Socket>>,
    identity: PeerIdentity,
    startup: Startup,
    /// The route's upstream (cancels go there too).
    upstream_tls: Arc<UpstreamTls>,
    auth: authenticate::AuthOutcome,
    /// Admitted by a grant (not as a grant-less peer of an open tailnet):
    /// it is revoked when no grant allows it any more.
    via_grant: bool,
    /// A replication connection (authorized as one; re-checked as one).
    replication: bool,
    /// Logged in by identity (re-checked as such).
    identity_login: bool,
    /// Its statements are audited (`--audit-statements`, or a grant's
    /// `"audit": "statements"`).
    audit_statements: bool,
    /// The identity's session slot (its grant's limit), held to the end.
    _slot: crate::authorize::Slot,
    /// The cancel key the client was given, live until the session ends.
    _cancel: Option<crate::cancel::Registration>,
}

/// Writes one audit record, timing it.
pub async fn write_audit(shared: &Shared, r: &Record) -> bool {
    let began = Instant::now();
    let res = shared.audit.record(r).await;
    shared.metrics.audit_write(began.elapsed());
    match res {
        Ok(()) => true,
        Err(e) => {
            shared.metrics.error("audit_write");
            tracing::error!(error = %e, event = r.event.name(), "audit record not written");
            false
        }
    }
}

impl Session<'_> {
    async fn audit(&self, event: Event) -> bool {
        let mut r = self.base.with_event(event);
        r.ts = SystemTime::now();
        write_audit(self.shared, &r).await
    }

    async fn deny(&self, reason: DenyReason, detail: impl Into<String>) {
        self.finished.store(true, Ordering::Relaxed);
        let detail = detail.into();
        tracing::info!(?reason, %detail, "session denied");
        self.shared.metrics.denied(reason);
        self.audit(Event::denied(reason, detail)).await;
    }

    async fn end(&self, reason: EndReason, c2u: u64, u2c: u64, detail: Option<String>) {
        self.finished.store(true, Ordering::Relaxed);
        tracing::info!(?reason, c2u, u2c, "session ended");
        self.shared.metrics.ended(reason, c2u, u2c);
        self.audit(Event::SessionEnd(SessionEnd {
            duration: self.started.elapsed(),
            bytes_client_to_upstream: c2u,
            bytes_upstream_to_client: u2c,
            reason,
            detail,
        }))
        .await;
    }

    async fn run<S, T>(mut self, stream: S, local_port: u16, tailnet: &T)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + relay::HandOff,
        T: Tailnet,
    {
        // A task's future is as large as its largest state, and admission
        // (TLS handshakes, SCRAM, upstream connect) is several times larger
        // than the relay. Boxed, that state is freed once the session is
        // admitted, so an idle session holds only what the relay needs.
        //
        // Admission waits on the client and the database with timeouts of
        // its own; when the proxy ends its sessions (the shutdown grace is
        // over) it gets ADMISSION_WIND_DOWN to end itself (a stage that
        // watches for shutdown sends the client 57P01), then it is dropped,
        // which closes the connection, so a handshake cannot outlive the
        // shutdown unaudited. Whichever ends it writes the one last record.
        let shutdown = self.shared.shutdown.clone();
        let wound_down = async move {
            shutdown_signalled(shutdown).await;
            tokio::time::sleep(ADMISSION_WIND_DOWN).await;
        };
        let admitted = tokio::select! {
            a = Box::pin(self.admit(stream, local_port, tailnet)) => a,
            _ = wound_down => {
                if self.finished.load(Ordering::Relaxed) {
                    // Its last record is written, or on its way.
                } else if self.start_requested {
                    let d = "tailgres shut down before the session was admitted";
                    self.refuse(None::<&mut S>, Refusal::ended(EndReason::Shutdown, d)).await;
                } else {
                    let d = "tailgres shut down during the handshake";
                    self.refuse(None::<&mut S>, Refusal::denied(DenyReason::ShuttingDown, d)).await;
                }
                None
            }
        };
        if let Some(admitted) = admitted {
            self.relay(admitted).await;
        }
    }

    /// Stages 2 to 6: identify, negotiate, authorize, route, connect
    /// upstream and authenticate. `None` when the session ended there (its
    /// records are written, by [`Session::refuse`]).
    async fn admit<S, T>(&mut self, stream: S, local_port: u16, tailnet: &T) -> Option<Admitted<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        T: Tailnet,
    {
        // 2. identify
        let began = Instant::now();
        let whois = tailnet.whois(self.base.peer_addr).await;
        self.shared.metrics.stage(Stage::Whois, began.elapsed());
        let identity = match whois {
            Ok(id) => id,
            Err(e) => {
                let r = Refusal::whois(&e);
                if r.outcome == Outcome::Denied(DenyReason::WhoisFailed) {
                    // (Counted by the denial's metric, as a whois error.)
                    tracing::error!(error = %e, "WhoIs failed");
                }
                self.refuse_unnegotiated(stream, r).await;
                return None;
            }
        };
        self.base.peer = Some(audit_peer(&identity, self.base.peer_addr));
        tracing::debug!(node = %identity.node_name, principal = %identity.principal(), "identified");

        // One peer may hold only so many connections that are not yet
        // authorized: idle sockets from one machine must not take every
        // --max-sessions slot. Over the cap: told 53300 while few refusals
        // are being told (else closed at once), and the records for a
        // burst are aggregated.
        let Some(handshake) =
            self.shared.handshaking.acquire(&identity.stable_id, Some(MAX_HANDSHAKES_PER_PEER))
        else {
            let d = format!(
                "{} already has {MAX_HANDSHAKES_PER_PEER} connections in their handshake",
                identity.node_name
            );
            self.finished.store(true, Ordering::Relaxed);
            self.shared.metrics.denied(DenyReason::TooManyHandshakes);
            if let Some(more) = self.shared.denials.due(self.base.peer_addr.ip()) {
                let d = if more > 0 { format!("{d} ({more} more refused since the last record)") } else { d };
                self.audit(Event::denied(DenyReason::TooManyHandshakes, d)).await;
            }
            if let Ok(_refuser) = self.shared.refusers.clone().try_acquire_owned() {
                let msg = format!(
                    "tailgres: {} has {MAX_HANDSHAKES_PER_PEER} connections that are not yet authorized; \
                     try again shortly",
                    identity.node_name
                );
                refuse_unnegotiated(stream, self.shared, sqlstate::TOO_MANY_CONNECTIONS, &msg).await;
            }
            return None;
        };

        // Refusals by identity alone, before the client's startup is read.
        // (Not for a fleet member, which may pass on a cancel: a session it
        // asks for is decided at stage 4, which checks the identity again.)
        let member = crate::fleet::is_member(self.shared.fleet.as_ref(), &identity);
        let denied = if member { None } else { self.settings.policy.decide_identity(&identity, self.shared.grant_use.get()) };
        if let Some(Decision::Deny { detail, client_message }) = denied {
            let r = Refusal::denied(DenyReason::NotAuthorized, detail)
                .telling(sqlstate::INVALID_AUTHORIZATION, client_message);
            self.refuse_unnegotiated(stream, r).await;
            return None;
        }

        // 3. negotiate
        let handshake_timeout = self.settings.handshake_timeout;
        let negotiated = tokio::time::timeout(
            handshake_timeout,
            negotiate::negotiate(stream, self.shared.client_tls.as_ref()),
        )
        .await;
        let (mut client, startup, transport) = match negotiated {
            Err(_) => {
                let r = Refusal::denied(
                    DenyReason::HandshakeTimeout,
                    format!("no startup within {handshake_timeout:?}"),
                );
                self.refuse(None::<&mut S>, r).await;
                return None;
            }
            Ok(Err(e)) => {
                self.refuse(None::<&mut S>, Refusal::negotiation(&e)).await;
                return None;
            }
            Ok(Ok(Negotiated::Cancel { mut stream, request, transport })) => {
                self.base.client_transport = Some(transport);
                self.cancel(request, &identity, local_port, tailnet).await;
                // As PostgreSQL does once the cancel is handled: close, with
                // a TLS close_notify where the client came over TLS.
                close(&mut stream).await;
                return None;
            }
            Ok(Ok(Negotiated::Startup { stream, startup, transport })) => (stream, startup, transport),
        };
        self.base.client_transport = Some(transport);
        self.base.postgres = Some(audit_postgres(&startup));

        // 4 to 6, on the negotiated connection.
        match self.admit_negotiated(&mut client, startup, transport, identity, local_port, handshake).await {
            Ok(parts) => Some(Admitted { client: Box::new(client), parts }),
            Err(r) => {
                self.refuse(Some(&mut client), r).await;
                None
            }
        }
    }

    /// Stages 4 to 6 for a negotiated client: authorize, route, write
    /// session_start, connect upstream, authenticate.
    async fn admit_negotiated<S>(
        &mut self,
        client: &mut ClientStream<S>,
        mut startup: Startup,
        transport: crate::audit::ClientTransport,
        identity: PeerIdentity,
        local_port: u16,
        handshake: crate::authorize::Slot,
    ) -> Result<Parts, Refusal>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let settings = self.settings.clone();
        // The identity settings are ours to set: a client that supplies them
        // is trying to impersonate someone.
        if let Some(param) = crate::authorize::reserved_parameter(&startup.params) {
            let msg = format!(
                "parameters under \"{}\" are set by tailgres from the tailnet identity; remove {param}",
                crate::authorize::IDENTITY_PREFIX
            );
            return Err(Refusal::denied(
                DenyReason::NotAuthorized,
                format!("client supplied reserved parameter {param}"),
            )
            .telling(sqlstate::INSUFFICIENT_PRIVILEGE, msg));
        }
        // Authorize the names the server will use, and send it exactly those
        // (an empty database is the user's; long names are cut as the
        // server would cut them).
        let names = crate::authorize::Names::from_params(&startup.params);
        startup.set_names(&names.user, &names.database);
        self.base.postgres = Some(audit_postgres(&startup));
        if settings.identity_settings {
            startup.params.extend(crate::authorize::identity_parameters(&identity, self.base.peer_addr.ip()));
        }

        // 4. authorize: before any byte reaches the upstream.
        let decision = settings.policy.decide(&identity, &names, self.shared.grant_use.get());
        // Authorized (or refused): no longer a handshake of this peer's.
        drop(handshake);
        let via_grant = matches!(decision, Decision::Allow { via_grant: true, .. });
        let grant_allows_identity = matches!(decision, Decision::Allow { identity_login: true, .. });
        let audit_statements =
            settings.audit_statements || matches!(decision, Decision::Allow { audit_statements: true, .. });
        let slot = match decision {
            Decision::Deny { detail, client_message } => {
                return Err(Refusal::denied(DenyReason::NotAuthorized, detail)
                    .telling(sqlstate::INVALID_AUTHORIZATION, client_message))
            }
            Decision::Allow { limit, .. } => {
                let principal = identity.principal();
                self.shared.per_identity.acquire(&principal, limit).ok_or_else(|| {
                    let n = limit.unwrap_or(0);
                    Refusal::denied(
                        DenyReason::NotAuthorized,
                        format!("{principal}: grant limit of {n} sessions reached"),
                    )
                    .telling(
                        sqlstate::TOO_MANY_CONNECTIONS,
                        format!(
                            "tailgres: {principal} already has {n} sessions open, the most its grant allows"
                        ),
                    )
                })?
            }
        };

        // Which database: the first route for this port and database name.
        let Some(route) = settings.route(local_port, startup.database()) else {
            let db = startup.database();
            return Err(Refusal::denied(DenyReason::NoRoute, format!("no route for database {db:?} on port {local_port}"))
                .telling(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!(
                        "tailgres serves no database named \"{db}\" on port {local_port}; ask its operator which databases it routes"
                    ),
                ));
        };

        // Identity login: only for a session a grant allows it for (never a
        // grant-less peer), and the certificate is signed now, after
        // authorization, so a withdrawn grant stops new certificates at once.
        let (upstream_tls, certificate) = match &route.login {
            Login::Password => (route.upstream.clone(), None),
            Login::Identity(ca) => {
                if !grant_allows_identity {
                    let who = format!("{} on {}", identity.principal(), identity.node_name);
                    let cap = &settings.policy.capability;
                    return Err(Refusal::denied(
                        DenyReason::NotAuthorized,
                        format!(
                            "{who}: route {:?} logs in by identity, and no {cap} grant that allows user {:?} \
                             on database {:?} says \"login\": \"identity\"",
                            route.name, names.user, names.database
                        ),
                    )
                    .telling(
                        sqlstate::INVALID_AUTHORIZATION,
                        format!(
                            "tailgres: this database logs in by tailnet identity, and {who}'s grant does not \
                             allow that; an admin allows it with \"login\": \"identity\" in the \"{cap}\" grant"
                        ),
                    ));
                }
                let (cert, tls) =
                    self.identity_certificate(ca, &route.upstream, &names.user, &identity).await?;
                (Arc::new(tls), Some(cert))
            }
        };
        // Verifier mode: the client proves its password to tailgres before
        // a session exists or the database is dialled for it.
        let credentials = match (&certificate, &route.verifiers) {
            (Some(_), _) => Credentials::Certificate,
            (None, Some(source)) => Credentials::Verified(
                self.verify_client(
                    client,
                    source,
                    &route.upstream,
                    &names.user,
                    transport.is_tls(),
                    settings.handshake_timeout,
                )
                .await?,
            ),
            (None, None) => Credentials::Client(route.auth),
        };

        // Fail closed: no session whose session_start is not written. That
        // write is also the probe of an unhealthy log (skipping it while
        // unhealthy would leave nothing to make the log healthy again, and
        // every session refused after the operator repaired it and sent
        // SIGHUP). The denial is best effort: it gets through if the failure
        // was transient.
        self.start_requested = true;
        if !self.audit(Event::SessionStart).await {
            tracing::error!("session refused: audit log unavailable");
            return Err(Refusal::denied(DenyReason::AuditUnavailable, "the session_start record could not be written")
                .telling(
                    sqlstate::CANNOT_CONNECT_NOW,
                    "tailgres cannot write its audit log, so it refuses new sessions; the operator's log says why",
                ));
        }

        // 5. upstream
        let mut upstream = tokio::select! {
            r = upstream_tls.connect() => r.map_err(|e| {
                tracing::warn!(error = %e, "upstream refused");
                Refusal::upstream(&e)
            })?,
            _ = shutdown_signalled(self.shared.shutdown.clone()) => {
                return Err(Refusal::ended(EndReason::Shutdown, "tailgres shut down while connecting to the database")
                    .telling(sqlstate::ADMIN_SHUTDOWN, "tailgres is shutting down"));
            }
        };
        let metrics = &self.shared.metrics;
        metrics.stage(Stage::UpstreamConnect, upstream.connect_time);
        metrics.stage(Stage::UpstreamTls, upstream.tls_time);
        metrics.upstream_cert(&route.name, upstream.facts.cert_not_after);
        self.base.upstream = Some(upstream.facts.clone());

        // 6. authenticate (bounded: a client that stalls mid-exchange must
        // not hold an upstream connection open)
        let handshake_timeout = settings.handshake_timeout;
        let began = Instant::now();
        // The client's cancel key is tailgres's own; the database's stays
        // with the registration, which is what a cancel finds.
        let mut cancel = None;
        let mut issue_key = |pid: u32, key: &[u8]| {
            let owner = CancelOwner {
                session_id: self.base.session_id.clone(),
                node: identity.stable_id.clone(),
                upstream: route.upstream.clone(),
                backend: (pid, key.to_vec()),
            };
            let (issued, registration) = self.shared.cancels.issue(owner);
            cancel = Some(registration);
            issued
        };
        let auth = tokio::time::timeout(
            handshake_timeout,
            authenticate::authenticate(
                client,
                &mut upstream.stream,
                &startup,
                transport.is_tls(),
                &credentials,
                upstream.channel_binding.as_deref(),
                &mut issue_key,
            ),
        )
        .await;
        self.shared.metrics.stage(Stage::Auth, began.elapsed());
        if let (Credentials::Verified(_), Some(source), Ok(Err(_))) = (&credentials, &route.verifiers, &auth)
        {
            // The database did not take what the verifier gave: look it up
            // again next time (the password may have changed).
            source.forget(&names.user);
        }
        let out = match auth {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                if matches!(e, AuthError::Upstream(_) | AuthError::UpstreamProtocol(_) | AuthError::Scram(_))
                {
                    tracing::warn!(error = %e, "authentication with the database failed");
                }
                return Err(Refusal::auth(e));
            }
            Err(_) => {
                return Err(Refusal::ended(
                    EndReason::ClientError,
                    format!("authentication not finished within {handshake_timeout:?}"),
                )
                .telling(sqlstate::PROTOCOL_VIOLATION, "authentication took too long"))
            }
        };
        let identity_login = certificate.is_some();
        let event = match certificate {
            Some(c) => Event::auth_ok_certificate(c),
            None => Event::auth_ok(out.method),
        };
        self.audit(event).await;

        Ok(Parts {
            upstream: Box::new(upstream.stream),
            upstream_tls: route.upstream.clone(),
            identity,
            startup,
            auth: out,
            via_grant,
            replication: names.replication,
            identity_login,
            audit_statements,
            _slot: slot,
            _cancel: cancel,
        })
    }

    /// `--auth scram-verifier`: the role's verifier (cached or looked up),
    /// then the client's SCRAM (or MD5) exchange with tailgres, bound to
    /// tailgres's certificate for a TLS client. Bounded by the handshake
    /// timeout; a wrong password drops the cached verifier.
    async fn verify_client<S>(
        &self,
        client: &mut ClientStream<S>,
        source: &VerifierSource,
        upstream: &UpstreamTls,
        role: &str,
        tls: bool,
        timeout: Duration,
    ) -> Result<VerifiedClient, Refusal>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let work = async {
            let began = Instant::now();
            let (verifier, origin) = source.get(upstream, role).await.map_err(|e| {
                tracing::warn!(error = %e, role, "verifier lookup failed");
                Refusal::verifier_lookup(&e, role)
            })?;
            if origin != Origin::Cache {
                self.shared.metrics.stage(Stage::VerifierLookup, began.elapsed());
            }
            let binding = tls.then(|| self.shared.client_cert.as_ref().and_then(|c| c.binding())).flatten();
            let method = match &*verifier {
                Verifier::Scram(_) => crate::audit::AuthMethod::ScramVerifier,
                Verifier::Md5(_) => crate::audit::AuthMethod::Md5Verifier,
            };
            authenticate::verify_client(client, &verifier, binding.as_deref()).await.map_err(|e| {
                let wrong = matches!(e, AuthError::ClientRefused(ScramServerError::WrongPassword));
                if wrong {
                    source.forget(role);
                }
                let mut r = Refusal::verification(e, method, role);
                if wrong && origin == Origin::Missing {
                    r.detail = format!(
                        "role {role:?} has no usable stored verifier (no such role, no password, or a format \
                         scram-verifier cannot use); the client was told its password failed"
                    );
                }
                r
            })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Refusal::denied(
                DenyReason::HandshakeTimeout,
                format!("authentication with tailgres not finished within {timeout:?}"),
            )
            .telling(sqlstate::PROTOCOL_VIOLATION, "authentication took too long")),
        }
    }

    /// Signs this session's identity-login certificate (on the blocking
    /// pool: a key generation and a signature) and builds the TLS client
    /// that presents it to the database (verify-full as the route's).
    async fn identity_certificate(
        &self,
        ca: &Arc<IdentityCa>,
        route_tls: &UpstreamTls,
        role: &str,
        id: &PeerIdentity,
    ) -> Result<(audit::ClientCertificate, UpstreamTls), Refusal> {
        let ca = ca.clone();
        let (role, principal, node) = (role.to_string(), id.principal(), id.node_name.clone());
        let session_id = self.base.session_id.clone();
        let began = Instant::now();
        let minted = tokio::task::spawn_blocking(move || {
            ca.mint(&Holder { role: &role, principal: &principal, node: &node, session_id: &session_id })
        })
        .await;
        self.shared.metrics.stage(Stage::IdentityCertificate, began.elapsed());
        let fail = |why: String| {
            tracing::error!(error = %why, "cannot sign the identity-login certificate");
            Refusal::denied(
                DenyReason::IdentityCertificateFailed,
                format!("signing the identity-login certificate failed: {why}"),
            )
            .telling(
                sqlstate::CANNOT_CONNECT_NOW,
                "tailgres could not sign a login certificate for you; the operator's log says why",
            )
        };
        let m = match minted {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(join) => return Err(fail(join.to_string())),
        };
        let tls = route_tls.with_client_cert(m.chain, m.key).map_err(|e| fail(e.to_string()))?;
        tracing::debug!(serial = %m.facts.serial, subject = %m.facts.subject, "identity-login certificate signed");
        Ok((m.facts, tls))
    }

    /// [`Session::refuse`] for a client that has not negotiated yet: it is
    /// negotiated briefly, so the FATAL reaches it on the transport it
    /// expects (plaintext, or TLS after an SSLRequest or directly).
    async fn refuse_unnegotiated<S>(&self, stream: S, r: Refusal)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Some((code, msg)) = &r.tell {
            refuse_unnegotiated(stream, self.shared, code, msg).await;
        }
        self.refuse(None::<&mut S>, Refusal { tell: None, ..r }).await;
    }

    /// The one way admission ends short of a session: the client is told
    /// (FATAL) or closed, then the records are written (auth_failed first
    /// where there was one, then session_denied or session_end) and the
    /// metric counted.
    async fn refuse<C: AsyncWrite + Unpin>(&self, client: Option<&mut C>, r: Refusal) {
        if let Some(c) = client {
            match &r.tell {
                Some((code, msg)) => fatal(c, code, msg).await,
                None => close(c).await,
            }
        }
        if let Some((method, state)) = r.auth_failed {
            self.audit(Event::auth_failed(method, state, r.detail.clone())).await;
        }
        match r.outcome {
            Outcome::Denied(reason) => self.deny(reason, r.detail).await,
            Outcome::Ended(reason) => self.end(reason, 0, 0, Some(r.detail)).await,
        }
    }

    /// Stage 7 and the end: relay until either side ends the session, the
    /// proxy shuts down, or the tailnet takes this peer's access away.
    async fn relay<S>(&self, a: Admitted<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + relay::HandOff,
    {
        let Admitted {
            client,
            parts:
                Parts {
                    upstream,
                    upstream_tls,
                    identity,
                    startup,
                    auth: out,
                    via_grant,
                    replication,
                    identity_login,
                    audit_statements,
                    _slot,
                    _cancel,
                },
        } = a;
        let peer_addr = self.base.peer_addr;
        let settings = &self.settings;

        // 7. relay, until either side ends it, the proxy shuts down, or the
        // tailnet takes this peer's access away.
        let (_live, mut revoked) = self.shared.live.register(crate::live::LiveInfo {
            session_id: self.base.session_id.clone(),
            peer_addr,
            node: identity.stable_id.clone(),
            user: startup.user().to_string(),
            database: startup.database().to_string(),
            replication,
            via_grant,
            identity_login,
            via_service: self.via_service,
        });
        let stop = {
            let rx = self.shared.shutdown.clone();
            async move {
                tokio::select! {
                    _ = shutdown_signalled(rx) => relay::Stop {
                        reason: EndReason::Shutdown,
                        client_message: "terminating connection: tailgres is shutting down".into(),
                        detail: None,
                    },
                    stop = async {
                        loop {
                            let current = revoked.borrow_and_update().clone();
                            if let Some(s) = current {
                                break s;
                            }
                            if revoked.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    } => stop,
                }
            }
        };
        // Statement audit: records carry the session's context as it is now.
        let statements = audit_statements.then(|| crate::statements::SessionAudit::new(self.base.clone()));
        let sink = statements.as_ref().map(|s| self.shared.statements.sink(s.clone()));
        let r = match Self::hand_off(*client, *upstream, sink) {
            Ok(relay) => {
                if let Some(s) = &statements {
                    // A statement record that cannot be written ends the
                    // session (fail closed).
                    let weak = Arc::downgrade(&relay);
                    s.on_failure(Box::new(move |why| {
                        if let Some(relay) = weak.upgrade() {
                            relay.stop(relay::Stop {
                                reason: EndReason::AuditUnavailable,
                                client_message:
                                    "terminating connection: tailgres cannot write this session's \
                                                 statements to its audit log"
                                        .into(),
                                detail: Some(why),
                            });
                        }
                    }));
                }
                relay::supervise(&relay, settings.idle_timeout, stop).await
            }
            Err(e) => relay::RelayOutcome {
                client_to_upstream: 0,
                upstream_to_client: 0,
                reason: EndReason::ClientError,
                detail: Some(format!("the relay could not take over the connection: {e}")),
            },
        };
        if matches!(r.reason, EndReason::Revoked | EndReason::Shutdown) {
            // A backend busy with a query notices its client is gone only
            // when it next talks to it: cancel the query so the database
            // session ends now, not when the query does.
            if let Some((pid, key)) = &out.backend_key {
                // Boxed: a TLS connect is large, and only a few sessions
                // ever make one (see `run`).
                if let Err(e) = Box::pin(self.forward_cancel(&upstream_tls, *pid, key)).await {
                    tracing::warn!(error = %e, "could not cancel the ended session's query");
                }
            }
        }
        if statements.is_some() {
            // The session's statements come before its end.
            self.shared.statements.flush().await;
        }
        self.end(
            r.reason,
            out.client_to_upstream + r.client_to_upstream,
            out.upstream_to_client + r.upstream_to_client,
            r.detail,
        )
        .await;
    }

    /// Hands the data phase to the client connection's driver: from here on
    /// the tailnet node moves the bytes and [`relay::Relay`] decides. TLS
    /// state (and anything read but not yet relayed) moves with it.
    fn hand_off<S: relay::HandOff>(
        client: ClientStream<S>,
        upstream: tokio_rustls::client::TlsStream<crate::upstream::Socket>,
        statements: Option<crate::statements::Sink>,
    ) -> std::io::Result<Arc<relay::Relay>> {
        let (client, client_tls) = match client {
            ClientStream::Plain(s) => (s, None),
            ClientStream::Tls(t) => {
                let (s, tls) = t.into_inner();
                (s, Some(rustls::Connection::Server(tls)))
            }
        };
        let (client, pending) = client.into_parts();
        let (tcp, upstream_tls) = upstream.into_inner();
        let mut relay =
            relay::Relay::new(client_tls, pending, Some(rustls::Connection::Client(upstream_tls)));
        if let Some(sink) = statements {
            relay = relay.with_statements(sink);
        }
        let relay = Arc::new(relay);
        client.hand_off(tcp.into_std()?, relay.clone())?;
        Ok(relay)
    }

    /// A CancelRequest: handled here when this node issued the key; in a
    /// fleet, passed on to the member whose key it is; and one a member
    /// passed on is believed only from a member, and then is the client's.
    async fn cancel<T: Tailnet>(&mut self, request: CancelRequest, identity: &PeerIdentity, port: u16, tailnet: &T) {
        let fleet = self.shared.fleet.as_ref();
        let event = match (request.on_behalf_of, fleet) {
            (Some(client_addr), Some(_)) if crate::fleet::is_member(fleet, identity) => {
                // The record is the client's, as if it had come here; the
                // member that passed it on is its fleet_peer.
                let via = identity.node_name.clone();
                match tailnet.whois(client_addr).await {
                    Ok(client) => {
                        self.base.peer_addr = client_addr;
                        self.base.peer = Some(audit_peer(&client, client_addr));
                        Event::cancel_via(self.cancel_here(request.pid, &request.key, &client).await, via)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, client = %client_addr, "a fleet cancel for an unknown client");
                        Event::cancel_via(audit::CancelOutcome::UnknownKey, via)
                    }
                }
            }
            (Some(client_addr), _) => {
                tracing::warn!(node = %identity.node_name, claimed_client = %client_addr,
                    "a fleet cancel from a node that is not a fleet member: refused");
                Event::cancel(audit::CancelOutcome::NotFleetMember)
            }
            (None, Some(f)) if request.pid != self.shared.cancels.pid() => {
                let client = self.base.peer_addr;
                let (outcome, member) =
                    crate::fleet::pass_cancel(tailnet, f, request.pid, &request.key, client, port).await;
                match member {
                    Some(m) => Event::cancel_via(outcome, m),
                    None => Event::cancel(outcome),
                }
            }
            (None, _) => Event::cancel(self.cancel_here(request.pid, &request.key, identity).await),
        };
        if let Event::Cancel(c) = &event {
            tracing::info!(reason = c.outcome.reason(), fleet_peer = ?c.fleet_peer, "cancel request");
        }
        self.audit(event).await;
    }

    /// Identity-bound cancel: forwarded over a new verified TLS connection
    /// only for a live session of the same tailnet node.
    async fn cancel_here(&self, pid: u32, key: &[u8], identity: &PeerIdentity) -> audit::CancelOutcome {
        match self.shared.cancels.decide(pid, key, &identity.stable_id) {
            CancelDecision::UnknownKey => audit::CancelOutcome::UnknownKey,
            CancelDecision::OtherNode { target_session_id } => {
                audit::CancelOutcome::OtherNode { target_session_id }
            }
            CancelDecision::Forward { target_session_id, upstream, backend: (pid, key) } => {
                match self.forward_cancel(&upstream, pid, &key).await {
                    Ok(()) => audit::CancelOutcome::Forwarded { target_session_id },
                    Err(e) => {
                        self.shared.metrics.error("cancel_forward");
                        tracing::warn!(error = %e, "cancel not delivered");
                        audit::CancelOutcome::UpstreamError { target_session_id }
                    }
                }
            }
        }
    }

    async fn forward_cancel(
        &self,
        upstream: &UpstreamTls,
        pid: u32,
        key: &[u8],
    ) -> Result<(), UpstreamError> {
        let mut up = upstream.connect().await?;
        let addr = up.facts.address.clone();
        let io =
            |e| UpstreamError::Io { addr: addr.clone(), phase: crate::upstream::Phase::Handshake, source: e };
        up.stream.write_all(&pgwire::cancel_request(pid, key)).await.map_err(io)?;
        up.stream.flush().await.map_err(io)?;
        // The server closes after reading a cancel; we need not wait.
        let _ = up.stream.shutdown().await;
        Ok(())
    }
}

async fn shutdown_signalled(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// How long a closing message and close may take: the client may not read.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Sends the client a FATAL and closes (see [`close`]).
async fn fatal<S: AsyncWrite + Unpin>(s: &mut S, code: &str, msg: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = s.write_all(&pgwire::fatal(code, msg)).await;
        let _ = s.flush().await;
    })
    .await;
    close(s).await;
}

/// Closes the client's connection as PostgreSQL does: on TLS, a
/// close_notify first (libpq 17+ reports "unexpected eof" without one).
/// Bounded: a client that does not read cannot hold the session.
async fn close<S: AsyncWrite + Unpin>(s: &mut S) {
    let _ = tokio::time::timeout(CLOSE_WAIT, s.shutdown()).await;
}

/// Refuses a peer before negotiation finished: negotiates briefly (so the
/// client is on the transport it expects) and sends the FATAL there.
pub async fn refuse_unnegotiated<S>(stream: S, shared: &Shared, code: &str, msg: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = shared.settings.get().handshake_timeout.min(Duration::from_secs(5));
    if let Ok(Ok(Negotiated::Startup { mut stream, .. })) =
        tokio::time::timeout(limit, negotiate::negotiate(stream, shared.client_tls.as_ref())).await
    {
        fatal(&mut stream, code, msg).await;
    }
}

fn audit_peer(id: &PeerIdentity, addr: SocketAddr) -> audit::Peer {
    audit::Peer {
        stable_id: id.stable_id.clone(),
        node_name: id.node_name.clone(),
        user_login: id.user_login.clone(),
        user_display_name: id.user_display_name.clone(),
        tags: id.tags.clone(),
        tailnet_ip: addr.ip(),
        os: id.os.clone(),
        shared_in: id.shared_in,
    }
}

fn audit_postgres(s: &Startup) -> audit::PostgresInfo {
    audit::PostgresInfo {
        user: s.user().to_string(),
        database: s.database().to_string(),
        application_name: s.application_name().map(str::to_string),
        protocol: audit::ProtocolVersion::from_code(s.version),
    }
}
