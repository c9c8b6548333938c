//! A fleet: several tailgres nodes serving one Tailscale Service
//! (`--service`, README "Fleet"). Each node hands its clients cancel keys of
//! its own whose pid names the node (`cancel`); a cancel that lands on
//! another member (the Service routes each connection to any of them) is
//! passed on to the member the key names, over the tailnet, as a fleet
//! cancel that carries the client's address. The member that owns the
//! session applies the same identity check as for a cancel sent to it
//! directly. Only nodes with the fleet's tag may pass a cancel on, and a
//! cancel is passed only to them: a key's pid never makes tailgres dial an
//! address that is not a fleet member.
#![forbid(unsafe_code)]

use crate::audit::CancelOutcome;
use crate::cancel;
use crate::config::Fleet;
use crate::pgwire;
use crate::tailnet::{PeerIdentity, Tailnet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long passing a cancel to a member may take (dial, send, and its
/// close once the member has handled it).
const PASS_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `id` is a member of `fleet` (carries its tag).
pub fn is_member(fleet: Option<&Fleet>, id: &PeerIdentity) -> bool {
    fleet.is_some_and(|f| id.tags.contains(&f.tag))
}

/// Passes the cancel from `client` for key (`pid`, `key`) on to the member
/// `pid` names, on `port`. The outcome and the member's name (when it is
/// one). A pid that names no member is an unknown key.
pub async fn pass_cancel<T: Tailnet>(
    tailnet: &T,
    fleet: &Fleet,
    pid: u32,
    key: &[u8],
    client: SocketAddr,
    port: u16,
) -> (CancelOutcome, Option<String>) {
    let ip = IpAddr::V4(cancel::pid_node(pid));
    let member = match tailnet.whois(SocketAddr::new(ip, 0)).await {
        Ok(p) if is_member(Some(fleet), &p) => p,
        Ok(p) => {
            tracing::info!(node = %p.node_name, "a cancel key names a node that is not a fleet member");
            return (CancelOutcome::UnknownKey, None);
        }
        Err(_) => return (CancelOutcome::UnknownKey, None),
    };
    let addr = SocketAddr::new(ip, port);
    let packet = pgwire::fleet_cancel_request(pid, key, client);
    let pass = async {
        let mut c = tailnet.dial(addr).await.map_err(|e| e.to_string())?;
        c.write_all(&packet).await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        // The member closes once it has handled it, as PostgreSQL does.
        let mut rest = [0u8; 64];
        while c.read(&mut rest).await.map_err(|e| e.to_string())? > 0 {}
        Ok::<(), String>(())
    };
    let name = member.node_name;
    match tokio::time::timeout(PASS_TIMEOUT, pass).await {
        Ok(Ok(())) => (CancelOutcome::ToPeer, Some(name)),
        Ok(Err(e)) => {
            tracing::warn!(member = %name, error = %e, "could not pass a cancel to its fleet member");
            (CancelOutcome::PeerUnreachable, Some(name))
        }
        Err(_) => {
            tracing::warn!(member = %name, "passing a cancel to its fleet member timed out");
            (CancelOutcome::PeerUnreachable, Some(name))
        }
    }
}
