//! Live sessions, and taking access away while they run.
//!
//! Every relayed session is registered here with what it was authorized
//! for. [`follow`] re-checks them whenever the tailnet announces a change (a
//! peer removed, its tags or key changed) and every [`RECHECK_EVERY`] for
//! what it does not announce (grant changes); a session whose peer is gone, expired, now
//! a different node, or no longer allowed by its grants is ended with
//! FATAL 57P01 and audited as `revoked`.
#![forbid(unsafe_code)]

use crate::audit::EndReason;
use crate::authorize::GrantUse;
use crate::authorize::{Decision, Names};
use crate::relay::Stop;
use crate::settings::SettingsCell;
use crate::tailnet::{Directory, Tailnet, Watch};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Re-check period for changes the tailnet does not announce: capability
/// grants (they travel in the packet filter) and key expiry by time. A
/// WhoIs is an in-process lookup, so this is cheap even with many sessions.
pub const RECHECK_EVERY: Duration = Duration::from_secs(3);

pub const REVOKED_MESSAGE: &str = "terminating connection: tailnet access for this peer was revoked";

#[derive(Debug, Clone)]
pub struct LiveInfo {
    pub session_id: String,
    pub peer_addr: SocketAddr,
    /// Stable ID of the node the session was authorized for.
    pub node: String,
    pub user: String,
    pub database: String,
    /// A replication connection (its grant must still say so).
    pub replication: bool,
    /// Admitted by a grant: revoked once no grant allows it, even if the
    /// peer then carries no grant at all.
    pub via_grant: bool,
    /// Logged in by identity: revoked once no grant allows that.
    pub identity_login: bool,
    /// Came through the Tailscale Service (`--service`), not to the node's
    /// own address: it ends when the node withdraws from the Service.
    pub via_service: bool,
}

struct Entry {
    info: LiveInfo,
    stop: watch::Sender<Option<Stop>>,
}

#[derive(Clone, Default)]
pub struct LiveSessions {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

/// Removes the session from the registry when dropped.
pub struct LiveGuard {
    sessions: LiveSessions,
    id: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.sessions.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl LiveSessions {
    /// Registers a session; the receiver yields the [`Stop`] if it is ended.
    pub fn register(&self, info: LiveInfo) -> (LiveGuard, watch::Receiver<Option<Stop>>) {
        let (tx, rx) = watch::channel(None);
        let id = info.session_id.clone();
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), Entry { info, stop: tx });
        (LiveGuard { sessions: self.clone(), id }, rx)
    }

    pub fn snapshot(&self) -> Vec<LiveInfo> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).values().map(|e| e.info.clone()).collect()
    }

    /// Ends one session (if still live).
    pub fn end(&self, session_id: &str, stop: Stop) -> bool {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(session_id) {
            Some(e) => e.stop.send(Some(stop)).is_ok(),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What following the tailnet needs of the process (a narrow view of the
/// process context).
#[derive(Clone)]
pub struct LiveView {
    pub settings: SettingsCell,
    pub live: LiveSessions,
    pub directory: Directory,
    pub grant_use: GrantUse,
    pub shutdown: watch::Receiver<bool>,
}

/// Follows the tailnet until `shutdown` is signalled.
pub async fn follow<T: Tailnet>(tailnet: Arc<T>, shared: LiveView) {
    let mut shutdown = shared.shutdown.clone();
    let mut changes = match tailnet.watch() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, every = ?RECHECK_EVERY, "cannot follow netmap changes; re-checking sessions periodically only");
            None
        }
    };
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    let mut carrier = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
            ev = async { match changes.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                match ev {
                    Some(Ok(ev)) => {
                        tracing::debug!(seq = ev.seq, kind = %ev.kind, peers = ev.peers.len(), "tailnet changed");
                        shared.directory.update(&ev);
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "netmap watch"),
                    None => {
                        tracing::warn!("netmap watch ended");
                        changes = None;
                    }
                }
            }
        }
        scan_grant_use(&*tailnet, &shared, &mut carrier).await;
        recheck(&*tailnet, &shared).await;
    }
}

/// Finds out whether any peer on the tailnet carries the capability (see
/// [`crate::authorize::GrantUse`]): the last peer seen with it is asked
/// first, so a tailnet that uses grants costs one WhoIs per sweep. Says so
/// loudly when no peer carries it: a typo in `--capability` must not pass
/// for a tailnet without grants unnoticed.
pub async fn scan_grant_use<T: Tailnet>(tailnet: &T, shared: &LiveView, carrier: &mut Option<IpAddr>) {
    use crate::authorize::GrantUseState;
    let Some(peers) = shared.directory.addresses() else {
        return; // no network map yet: the state stays unknown (fail closed)
    };
    let capability = shared.settings.get().policy.capability.clone();
    let carries = |id: &crate::tailnet::PeerIdentity| !id.capability(&capability).is_empty();
    let mut found = None;
    for ip in carrier.iter().copied().chain(peers.into_iter().filter(|ip| Some(*ip) != *carrier)) {
        if let Ok(id) = tailnet.whois(SocketAddr::new(ip, 0)).await {
            if carries(&id) {
                found = Some(ip);
                break;
            }
        }
    }
    *carrier = found;
    let before = shared.grant_use.set(found.is_some());
    match (before, found) {
        (GrantUseState::Used, Some(_)) | (GrantUseState::Unused, None) => {}
        (_, Some(ip)) => {
            tracing::info!(%capability, example_peer = %ip, "grants are in use: peers without a grant are refused")
        }
        (_, None) => tracing::warn!(
            %capability,
            "no peer on the tailnet carries the capability: every peer the tailnet's ACLs let through may \
             use any database user and database. If you meant to use grants, check --capability for a typo; \
             --require-grant refuses peers without a grant whatever the tailnet does"
        ),
    }
}

/// Re-decides every live session against the tailnet as it is now.
pub async fn recheck<T: Tailnet>(tailnet: &T, shared: &LiveView) {
    // The policy as it is now: a reload that tightens it applies to
    // running sessions too.
    let settings = shared.settings.get();
    // WhoIs answers per address, so a node's sessions share one lookup per
    // sweep (a thousand idle sessions from one machine are one call, not a
    // thousand).
    let mut seen: HashMap<std::net::IpAddr, Result<crate::tailnet::PeerIdentity, String>> = HashMap::new();
    for s in shared.live.snapshot() {
        let who = match seen.get(&s.peer_addr.ip()) {
            Some(w) => w.clone(),
            None => {
                let w = tailnet.whois(s.peer_addr).await.map_err(|e| e.to_string());
                seen.insert(s.peer_addr.ip(), w.clone());
                w
            }
        };
        let verdict = match who {
            Err(e) => Some(format!("the tailnet no longer identifies the peer ({e})")),
            Ok(id) if id.stable_id != s.node => {
                Some(format!("{} now belongs to another node ({})", s.peer_addr.ip(), id.node_name))
            }
            Ok(id) if id.expired => Some(format!("the node key of {} expired", id.node_name)),
            Ok(id) => {
                let names =
                    Names { user: s.user.clone(), database: s.database.clone(), replication: s.replication };
                match settings.policy.decide(&id, &names, shared.grant_use.get()) {
                    Decision::Deny { detail, .. } => Some(detail),
                    Decision::Allow { via_grant: false, .. } if s.via_grant => Some(format!(
                        "{} no longer carries a grant that allows user {:?} on database {:?}",
                        id.node_name, s.user, s.database
                    )),
                    Decision::Allow { identity_login: false, .. } if s.identity_login => Some(format!(
                        "{} no longer carries a grant that allows identity login as user {:?} on database {:?}",
                        id.node_name, s.user, s.database
                    )),
                    Decision::Allow { .. } => None,
                }
            }
        };
        if let Some(detail) = verdict {
            tracing::warn!(session = %s.session_id, peer = %s.peer_addr, %detail, "revoking a live session");
            shared.live.end(
                &s.session_id,
                Stop {
                    reason: EndReason::Revoked,
                    client_message: REVOKED_MESSAGE.into(),
                    detail: Some(detail),
                },
            );
        }
    }
}
