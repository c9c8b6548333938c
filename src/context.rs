//! The process context: what every session and every task around the
//! sessions share, built once at start by [`crate::app`]. The tasks that
//! need only part of it ([`crate::live::follow`], [`crate::explain::serve`])
//! get narrow views of their own, so no module below this one depends on it.
#![forbid(unsafe_code)]

use crate::audit::AuditLog;
use crate::cancel::CancelRegistry;
use crate::metrics::Metrics;
use crate::settings::SettingsCell;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// What every session shares (built once at start).
pub struct Shared {
    /// Routes, policy and timeouts: what a reload may replace.
    pub settings: SettingsCell,
    /// TLS for clients that ask for it; `None` answers 'N'.
    pub client_tls: Option<TlsAcceptor>,
    /// The certificate `client_tls` offers, for SCRAM channel binding in
    /// `--auth scram-verifier` (without it, PLUS is not offered).
    pub client_cert: Option<Arc<crate::client_tls::CertSlot>>,
    pub audit: AuditLog,
    pub cancels: CancelRegistry,
    pub metrics: Arc<Metrics>,
    /// Live sessions per identity, for grants' max_connections.
    pub per_identity: crate::authorize::Counter,
    /// Connections per tailnet node still in their handshake (see
    /// `session::MAX_HANDSHAKES_PER_PEER`).
    pub handshaking: crate::authorize::Counter,
    /// Refusals in a burst (over --max-sessions, over a peer's handshake
    /// cap) that are told why at once: a FATAL after a brief negotiation.
    /// Past [`MAX_REFUSING`], they are closed without a word, so a flood
    /// costs no TLS handshakes.
    pub refusers: Arc<Semaphore>,
    /// Aggregates the records of refusals that come in bursts.
    pub denials: crate::audit::DenialLog,
    /// Whether any peer carries the capability (kept by `live::follow`).
    pub grant_use: crate::authorize::GrantUse,
    /// Peer names to addresses (for `tailgres explain`).
    pub directory: crate::tailnet::Directory,
    /// Relayed sessions, so access can be taken away while they run.
    pub live: crate::live::LiveSessions,
    /// Becomes true when the proxy ends its sessions (after the grace).
    pub shutdown: watch::Receiver<bool>,
    /// Writes the statement records of the sessions that have them.
    pub statements: crate::statements::Auditor,
    /// This node is one of a fleet (`--service`, `--fleet-tag`).
    pub fleet: Option<crate::config::Fleet>,
}

/// See [`Shared::refusers`].
pub const MAX_REFUSING: usize = 32;

impl Shared {
    /// The context at start: these, and empty registries, counters and
    /// directory. `shutdown` becomes true when sessions are to end.
    pub fn new(
        settings: SettingsCell,
        client_tls: Option<TlsAcceptor>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Shared {
        Shared {
            settings,
            client_tls,
            client_cert: None,
            audit: audit.clone(),
            cancels: CancelRegistry::default(),
            metrics,
            per_identity: Default::default(),
            handshaking: Default::default(),
            refusers: Arc::new(Semaphore::new(MAX_REFUSING)),
            denials: Default::default(),
            grant_use: Default::default(),
            live: Default::default(),
            directory: Default::default(),
            shutdown,
            statements: crate::statements::Auditor::start(
                audit.clone(),
                Default::default(),
                tokio::runtime::Handle::current(),
            ),
            fleet: None,
        }
    }

    /// What revocation needs.
    pub fn live_view(&self) -> crate::live::LiveView {
        crate::live::LiveView {
            settings: self.settings.clone(),
            live: self.live.clone(),
            directory: self.directory.clone(),
            grant_use: self.grant_use.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// What `tailgres explain` needs.
    pub fn explain_view(&self) -> crate::explain::ExplainView {
        crate::explain::ExplainView {
            settings: self.settings.clone(),
            directory: self.directory.clone(),
            grant_use: self.grant_use.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}
