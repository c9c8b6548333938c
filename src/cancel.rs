//! Identity-bound cancel (docs/postgres-protocol.md, "Cancel").
//!
//! The client learned the upstream's (pid, key) from BackendKeyData relayed
//! through us. We remember which live session and which tailnet node own
//! each pair; a CancelRequest is forwarded only when the pair is live and it
//! comes from that same node.
#![forbid(unsafe_code)]

use crate::upstream::UpstreamTls;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct CancelOwner {
    pub session_id: String,
    /// Stable node ID of the tailnet node that owns the session.
    pub node: String,
    /// The database the session runs on (with several routes, a cancel
    /// must reach the same one).
    pub upstream: Arc<UpstreamTls>,
}

/// Why a cancel was or was not forwarded (audit `reason`).
#[derive(Debug, Clone)]
pub enum CancelDecision {
    Forward { target_session_id: String, upstream: Arc<UpstreamTls> },
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

/// A backend's (pid, secret key) as BackendKeyData announced it.
type BackendKey = (u32, Vec<u8>);

/// Live (pid, key) pairs of relayed sessions.
#[derive(Debug, Default, Clone)]
pub struct CancelRegistry {
    inner: Arc<Mutex<HashMap<BackendKey, CancelOwner>>>,
}

/// Removes the entry when the session ends (drop guard).
pub struct Registration {
    registry: CancelRegistry,
    key: BackendKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

impl CancelRegistry {
    pub fn register(&self, pid: u32, key: Vec<u8>, owner: CancelOwner) -> Registration {
        let k = (pid, key);
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).insert(k.clone(), owner);
        Registration { registry: self.clone(), key: k }
    }

    /// Decides on a cancel from tailnet node `node`. Compares the whole key
    /// (a guessed pid alone is worth nothing).
    pub fn decide(&self, pid: u32, key: &[u8], node: &str) -> CancelDecision {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&(pid, key.to_vec())) {
            None => CancelDecision::UnknownKey,
            Some(o) if o.node != node => {
                CancelDecision::OtherNode { target_session_id: o.session_id.clone() }
            }
            Some(o) => CancelDecision::Forward {
                target_session_id: o.session_id.clone(),
                upstream: o.upstream.clone(),
            },
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
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
        let owner = CancelOwner { session_id: "s1".into(), node: "nA".into(), upstream };
        let reg = r.register(10, vec![1, 2, 3, 4], owner);
        let cases: &[(u32, &[u8], &str, &str)] = &[
            (10, &[1, 2, 3, 4], "nA", "forwarded"),
            (10, &[1, 2, 3, 4], "nB", "other_node"),
            (10, &[1, 2, 3, 5], "nA", "unknown_key"),
            (11, &[1, 2, 3, 4], "nA", "unknown_key"),
            (10, &[1, 2, 3, 4, 0], "nA", "unknown_key"),
        ];
        for (pid, key, node, want) in cases {
            assert_eq!(r.decide(*pid, key, node).reason(), *want, "{pid} {key:?} {node}");
        }
        drop(reg);
        assert_eq!(r.decide(10, &[1, 2, 3, 4], "nA").reason(), "unknown_key");
        assert!(r.is_empty());
    }
}
