//! Identity-bound cancel (docs/postgres-protocol.md, "Cancel").
//!
//! The database's (pid, key) never leaves tailgres: the client is given a
//! key of tailgres's own, whose pid names this node (its tailnet IPv4
//! address as a number) and whose secret is random, as long as the
//! database's. We remember which live session, which tailnet node and which
//! database key belong to each issued key; a CancelRequest is forwarded only
//! when the key is live and the request comes from that same node. In a
//! fleet (several nodes behind one Tailscale Service), a cancel that lands on
//! another node names its owner by the pid and is forwarded there (see
//! `session::Session::cancel`).
#![forbid(unsafe_code)]

use crate::upstream::UpstreamTls;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct CancelOwner {
    pub session_id: String,
    /// Stable node ID of the tailnet node that owns the session.
    pub node: String,
    /// The database the session runs on (with several routes, a cancel
    /// must reach the same one).
    pub upstream: Arc<UpstreamTls>,
    /// The key the database gave (what a cancel sends it).
    pub backend: BackendKey,
}

/// Why a cancel was or was not forwarded (audit `reason`).
#[derive(Debug, Clone)]
pub enum CancelDecision {
    Forward { target_session_id: String, upstream: Arc<UpstreamTls>, backend: BackendKey },
    UnknownKey,
    OtherNode { target_session_id: String },
}

impl CancelDecision {
    pub fn reason(&self) -> &'static str {
        match self {
            CancelDecision::Forward { .. } => "forwarded",
            CancelDecision::UnknownKey => "unknown_key",
            CancelDecision::OtherNode { .. } => "other_node",
        }
    }
}

/// A (pid, secret key) as BackendKeyData carries it.
pub type BackendKey = (u32, Vec<u8>);

/// The pid tailgres gives clients of the node at `ip`.
pub fn node_pid(ip: Ipv4Addr) -> u32 {
    u32::from(ip)
}

/// The node a key's pid names.
pub fn pid_node(pid: u32) -> Ipv4Addr {
    Ipv4Addr::from(pid)
}

/// The keys issued to live sessions.
#[derive(Debug, Clone)]
pub struct CancelRegistry {
    /// The pid of every key this node issues.
    pid: u32,
    inner: Arc<Mutex<HashMap<Vec<u8>, CancelOwner>>>,
}

impl Default for CancelRegistry {
    /// A registry for the in-memory tailnet's node (100.100.100.100).
    fn default() -> Self {
        CancelRegistry::new(node_pid(Ipv4Addr::new(100, 100, 100, 100)))
    }
}

/// Removes the entry when the session ends (drop guard).
pub struct Registration {
    registry: CancelRegistry,
    key: Vec<u8>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registration") // the key is a secret
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl CancelRegistry {
    pub fn new(pid: u32) -> Self {
        CancelRegistry { pid, inner: Default::default() }
    }

    /// The pid this node's keys carry.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, CancelOwner>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues the key a session's client is given: this node's pid and a
    /// random secret as long as the database's (so it fits the protocol
    /// version the two agreed), unique among live sessions.
    pub fn issue(&self, owner: CancelOwner) -> (BackendKey, Registration) {
        let len = owner.backend.1.len();
        let mut map = self.lock();
        let key = loop {
            let key: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            if !map.contains_key(&key) {
                break key;
            }
        };
        map.insert(key.clone(), owner);
        ((self.pid, key.clone()), Registration { registry: self.clone(), key })
    }

    /// Decides on a cancel from tailnet node `node`. Compares the whole key
    /// (a guessed pid alone is worth nothing).
    pub fn decide(&self, pid: u32, key: &[u8], node: &str) -> CancelDecision {
        if pid != self.pid {
            return CancelDecision::UnknownKey;
        }
        let map = self.lock();
        match map.get(key) {
            None => CancelDecision::UnknownKey,
            Some(o) if o.node != node => {
                CancelDecision::OtherNode { target_session_id: o.session_id.clone() }
            }
            Some(o) => CancelDecision::Forward {
                target_session_id: o.session_id.clone(),
                upstream: o.upstream.clone(),
                backend: o.backend.clone(),
            },
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let r = CancelRegistry::default();
        let upstream = crate::upstream::UpstreamOptions {
            addr: "db.internal:5432".into(),
            server_name: None,
            ca: vec![],
            client_cert: None,
            client_key: None,
            direct_tls: false,
            connect_timeout: std::time::Duration::from_secs(1),
        };
        let upstream = Arc::new(UpstreamTls::new(&upstream).unwrap());
        let owner = CancelOwner { session_id: "s1".into(), node: "nA".into(), upstream, backend: (77, vec![9; 4]) };
        let ((pid, key), reg) = r.issue(owner);
        assert_eq!(pid_node(pid), Ipv4Addr::new(100, 100, 100, 100), "the pid names this node");
        assert_eq!(key.len(), 4, "as long as the database's key");
        assert_ne!(key, vec![9; 4], "the database's key stays inside");
        let mut wrong = key.clone();
        wrong[3] ^= 1;
        let longer = [key.clone(), vec![0]].concat();
        let cases: &[(u32, &[u8], &str, &str)] = &[
            (pid, &key, "nA", "forwarded"),
            (pid, &key, "nB", "other_node"),
            (pid, &wrong, "nA", "unknown_key"),
            (pid + 1, &key, "nA", "unknown_key"),
            (pid, &longer, "nA", "unknown_key"),
        ];
        for (pid, key, node, want) in cases {
            assert_eq!(r.decide(*pid, key, node).reason(), *want, "{pid} {key:?} {node}");
        }
        let CancelDecision::Forward { backend, .. } = r.decide(pid, &key, "nA") else { panic!() };
        assert_eq!(backend, (77, vec![9; 4]), "the database's key is what reaches the database");
        drop(reg);
        assert_eq!(r.decide(pid, &key, "nA").reason(), "unknown_key");
        assert!(r.is_empty());
    }
}
