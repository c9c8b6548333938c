//! Who is on the other end of a tailnet connection, as Tailscale says.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The identity of a tailnet peer, from WhoIs on its address.
///
/// For tagged devices Tailscale reports the pseudo-user `tagged-devices`;
/// such a device is identified by its tags, never by that login (see
/// [`PeerIdentity::is_tagged`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// Stable node ID (survives key rotation and renames).
    pub stable_id: String,
    /// MagicDNS name of the node, without the trailing dot.
    pub node_name: String,
    pub user_login: String,
    pub user_display_name: String,
    pub tags: Vec<String>,
    /// The node's tailnet addresses.
    pub addresses: Vec<IpAddr>,
    /// Operating system the node reports ("linux", "windows", ...).
    pub os: String,
    /// True for a device shared into this tailnet from another one.
    pub shared_in: bool,
    /// Node key expiry (RFC 3339), when the node has one.
    pub key_expiry: Option<String>,
    pub expired: bool,
    /// Application capabilities granted from that peer to this node:
    /// `"<domain>/cap/<name>": [value, ...]`, one value per matching grant.
    pub cap_map: BTreeMap<String, Vec<serde_json::Value>>,
}

impl PeerIdentity {
    /// Whether the device is identified by tags rather than a user.
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    /// The name an operator reads: the user's login, or the tags of a
    /// tagged device.
    pub fn principal(&self) -> String {
        if self.is_tagged() {
            self.tags.join(",")
        } else {
            self.user_login.clone()
        }
    }

    /// The values granted under one capability name (empty when none).
    pub fn capability(&self, name: &str) -> &[serde_json::Value] {
        self.cap_map.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> &'static str {
        r#"{"stable_id":"nX1","node_name":"alice.example.ts.net","user_login":"alice@example.com",
            "user_display_name":"Alice","tags":[],"addresses":["100.64.0.1","fd7a:115c:a1e0::1"],
            "os":"linux","shared_in":false,"key_expiry":null,"expired":false,
            "cap_map":{"example.com/cap/postgres":[{"users":["app"]},{"databases":["x"]}]}}"#
    }

    #[test]
    fn parses_shim_json() {
        let id: PeerIdentity = serde_json::from_str(sample()).unwrap();
        assert_eq!(id.principal(), "alice@example.com");
        assert!(!id.is_tagged());
        assert_eq!(id.addresses.len(), 2);
        assert_eq!(id.capability("example.com/cap/postgres").len(), 2);
        assert!(id.capability("example.com/cap/other").is_empty());
    }

    #[test]
    fn tagged_devices_are_named_by_tags() {
        let mut id: PeerIdentity = serde_json::from_str(sample()).unwrap();
        id.user_login = "tagged-devices".into();
        id.tags = vec!["tag:ci".into(), "tag:db".into()];
        assert!(id.is_tagged());
        assert_eq!(id.principal(), "tag:ci,tag:db");
    }
}
