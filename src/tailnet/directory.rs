//! The peers the node has seen, by name, from the netmap watch: how
//! `tailgres explain` finds a peer by name, and how tailgres finds out
//! whether the tailnet uses grants at all.
#![forbid(unsafe_code)]

use super::NetmapEvent;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Peer names to tailnet addresses, from the netmap watch.
#[derive(Clone, Default)]
pub struct Directory {
    inner: Arc<Mutex<Names>>,
}

#[derive(Default)]
struct Names {
    /// Name → (address, numeric node ID).
    by_name: HashMap<String, (IpAddr, i64)>,
    /// A network map has been seen (until then, the directory knows
    /// nothing, which is not the same as knowing there are no peers).
    loaded: bool,
}

impl Directory {
    pub fn update(&self, ev: &NetmapEvent) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A full netmap replaces what was known; a removal forgets the
        // removed nodes (so explain stops naming them and the grant-use
        // scan stops asking after them).
        if ev.kind == "netmap" {
            m.by_name.clear();
        }
        m.loaded = true;
        if !ev.removed.is_empty() {
            m.by_name.retain(|_, (_, id)| *id == 0 || !ev.removed.contains(id));
        }
        for p in &ev.peers {
            if let Some(ip) = p.addresses.first() {
                m.by_name.insert(p.node_name.to_ascii_lowercase(), (*ip, p.node_id));
            }
        }
    }

    /// Every peer's address, once a network map has been seen.
    pub fn addresses(&self) -> Option<Vec<IpAddr>> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.loaded.then(|| m.by_name.values().map(|(ip, _)| *ip).collect())
    }

    /// A full MagicDNS name, its first label, or an IP address.
    pub fn lookup(&self, target: &str) -> Option<IpAddr> {
        if let Ok(ip) = target.parse() {
            return Some(ip);
        }
        let t = target.trim_end_matches('.').to_ascii_lowercase();
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.by_name.get(&t).map(|(ip, _)| *ip).or_else(|| {
            let mut hits = m.by_name.iter().filter(|(name, _)| name.split('.').next() == Some(t.as_str()));
            match (hits.next(), hits.next()) {
                (Some((_, (ip, _))), None) => Some(*ip),
                _ => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailnet::NetmapPeer;
    use std::net::IpAddr;

    #[test]
    fn directory_lookups() {
        let d = Directory::default();
        let peer = |name: &str, ip: &str| NetmapPeer {
            node_id: ip.rsplit('.').next().unwrap().parse().unwrap(),
            stable_id: name.into(),
            node_name: name.into(),
            addresses: vec![ip.parse().unwrap()],
            tags: vec![],
            user_id: 1,
            expired: false,
        };
        d.update(&NetmapEvent {
            seq: 1,
            kind: "netmap".into(),
            peers: vec![
                peer("alice.example.ts.net", "100.64.0.2"),
                peer("bob.example.ts.net", "100.64.0.3"),
                peer("bob.other.ts.net", "100.64.0.4"),
            ],
            removed: vec![],
        });
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(d.lookup("alice.example.ts.net"), ip("100.64.0.2"));
        assert_eq!(d.lookup("Alice.Example.ts.net."), ip("100.64.0.2"));
        assert_eq!(d.lookup("alice"), ip("100.64.0.2"));
        assert_eq!(d.lookup("bob"), None, "ambiguous short name");
        assert_eq!(d.lookup("bob.other.ts.net"), ip("100.64.0.4"));
        assert_eq!(d.lookup("100.64.0.9"), ip("100.64.0.9"));
        assert_eq!(d.lookup("carol"), None);
    }

    #[test]
    fn removed_peers_are_forgotten() {
        let d = Directory::default();
        let peer = |id: i64, name: &str| NetmapPeer {
            node_id: id,
            stable_id: format!("n{id}"),
            node_name: name.into(),
            addresses: vec![format!("100.64.0.{id}").parse().unwrap()],
            tags: vec![],
            user_id: 1,
            expired: false,
        };
        let ev = |kind: &str, peers, removed| NetmapEvent { seq: 1, kind: kind.into(), peers, removed };
        d.update(&ev("netmap", vec![peer(2, "alice.ts.net"), peer(3, "bob.ts.net")], vec![]));
        d.update(&ev("peers_removed", vec![], vec![3]));
        assert_eq!(d.lookup("bob"), None);
        assert_eq!(d.addresses().unwrap(), vec!["100.64.0.2".parse::<IpAddr>().unwrap()]);
        d.update(&ev("netmap", vec![peer(4, "carol.ts.net")], vec![]));
        assert_eq!(d.lookup("alice"), None, "a full netmap replaces the directory");
        assert!(d.lookup("carol").is_some());
    }
}
