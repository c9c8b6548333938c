//! `--summary`: who accessed what, from which machine.
//!
//! One group per (identity, node, database user, database); memory grows
//! with the number of groups, not with the log.
#![forbid(unsafe_code)]

use super::entry::Entry;
use super::table::{self, Table};
use crate::audit::rfc3339;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::SystemTime;

/// What identifies a group. A peer the tailnet could not identify has
/// only its address, which then stands in for identity and node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    /// Sorts identified peers first.
    unidentified: bool,
    who: Option<String>,
    node: Option<String>,
    unidentified_ip: Option<IpAddr>,
    user: Option<String>,
    database: Option<String>,
}

/// One line of the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// The login, or the tags of a tagged device; null when the tailnet
    /// did not identify the peer.
    pub who: Option<String>,
    pub node: Option<String>,
    /// Tailnet addresses seen (a node has one per address family).
    pub ips: BTreeSet<IpAddr>,
    /// Database user and database; null for refusals before the client
    /// said which.
    pub user: Option<String>,
    pub database: Option<String>,
    /// `session_start` records: sessions let in.
    pub sessions: u64,
    /// `session_denied` records.
    pub denied: u64,
    /// `auth_failed` records.
    pub auth_failed: u64,
    #[serde(serialize_with = "ser_time")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "ser_time")]
    pub last_seen: SystemTime,
    /// Totals over the group's `session_end` records.
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t, true))
}

#[derive(Debug, Default)]
pub struct Summary {
    groups: HashMap<Key, Group>,
}

impl Summary {
    pub fn add(&mut self, e: &Entry) {
        let who = e.who();
        let ip = e.ip();
        let key = Key {
            unidentified: who.is_none(),
            who: who.clone(),
            node: e.node().map(str::to_owned),
            unidentified_ip: if who.is_none() { ip } else { None },
            user: e.db_user().map(str::to_owned),
            database: e.database().map(str::to_owned),
        };
        let g = self.groups.entry(key).or_insert_with_key(|k| Group {
            who: k.who.clone(),
            node: k.node.clone(),
            ips: BTreeSet::new(),
            user: k.user.clone(),
            database: k.database.clone(),
            sessions: 0,
            denied: 0,
            auth_failed: 0,
            first_seen: e.time,
            last_seen: e.time,
            bytes_client_to_upstream: 0,
            bytes_upstream_to_client: 0,
        });
        g.ips.extend(ip);
        match e.event.as_str() {
            "session_start" => g.sessions += 1,
            "session_denied" => g.denied += 1,
            "auth_failed" => g.auth_failed += 1,
            _ => {}
        }
        g.first_seen = g.first_seen.min(e.time);
        g.last_seen = g.last_seen.max(e.time);
        // Saturating: a counter at u64::MAX is a broken log, not a reason
        // to crash.
        g.bytes_client_to_upstream =
            g.bytes_client_to_upstream.saturating_add(e.bytes_client_to_upstream.unwrap_or(0));
        g.bytes_upstream_to_client =
            g.bytes_upstream_to_client.saturating_add(e.bytes_upstream_to_client.unwrap_or(0));
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The groups, ordered by identity, node, user, database.
    pub fn groups(self) -> Vec<Group> {
        let mut all: Vec<(Key, Group)> = self.groups.into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, g)| g).collect()
    }

    pub fn write_json(self, out: &mut impl Write) -> io::Result<()> {
        for g in self.groups() {
            serde_json::to_writer(&mut *out, &g)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    pub fn write_table(self, out: &mut impl Write) -> io::Result<()> {
        let mut t = Table::new(&[
            ("WHO", false),
            ("NODE", false),
            ("IP", false),
            ("USER", false),
            ("DATABASE", false),
            ("SESSIONS", true),
            ("DENIED", true),
            ("AUTH FAILED", true),
            ("FIRST SEEN (UTC)", false),
            ("LAST SEEN (UTC)", false),
            ("TO DB", true),
            ("FROM DB", true),
        ]);
        let opt = |s: &Option<String>| s.as_deref().map_or_else(|| "-".to_string(), table::clean);
        let groups = self.groups();
        // Every row before the first is printed: the table is exact.
        let mut rows = Vec::with_capacity(groups.len());
        for g in groups {
            let ips: Vec<String> = g.ips.iter().map(IpAddr::to_string).collect();
            rows.push(vec![
                g.who.as_deref().map_or_else(|| "(unidentified)".to_string(), table::clean),
                opt(&g.node),
                if ips.is_empty() { "-".into() } else { ips.join(",") },
                opt(&g.user),
                opt(&g.database),
                g.sessions.to_string(),
                g.denied.to_string(),
                g.auth_failed.to_string(),
                table::time(g.first_seen),
                table::time(g.last_seen),
                table::bytes(g.bytes_client_to_upstream),
                table::bytes(g.bytes_upstream_to_client),
            ]);
        }
        t.size_to(&rows);
        for r in rows {
            t.row(out, r)?;
        }
        t.flush(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(event: &str, ts: &str, peer: &str, pg: &str, extra: &str) -> Entry {
        let json = format!(
            r#"{{"ts":"{ts}","event":"{event}","session_id":"0000000000000001","peer_addr":"100.64.0.9:1",
                "peer":{peer},"postgres":{pg}{extra}}}"#
        );
        Entry::parse(json.as_bytes()).unwrap()
    }

    const ALICE: &str = r#"{"stable_id":"nA","node_name":"laptop.ts.net","user_login":"alice@example.com","tags":[],"tailnet_ip":"100.64.0.3"}"#;
    const ALICE_V6: &str = r#"{"stable_id":"nA","node_name":"laptop.ts.net","user_login":"alice@example.com","tags":[],"tailnet_ip":"fd7a:115c:a1e0::3"}"#;
    const CI: &str = r#"{"stable_id":"nC","node_name":"ci.ts.net","user_login":"tagged-devices","tags":["tag:ci"],"tailnet_ip":"100.64.0.7"}"#;
    const APP: &str = r#"{"user":"alice","database":"app"}"#;

    #[test]
    fn groups_count_and_sum() {
        let mut s = Summary::default();
        let end = |c2u: u64, u2c: u64| {
            format!(r#","bytes_client_to_upstream":{c2u},"bytes_upstream_to_client":{u2c}"#)
        };
        s.add(&line("session_start", "2026-11-23T10:00:00Z", ALICE, APP, ""));
        s.add(&line("auth_ok", "2026-11-23T10:00:01Z", ALICE, APP, ""));
        s.add(&line("session_end", "2026-11-23T10:05:00Z", ALICE, APP, &end(100, 2000)));
        s.add(&line("session_start", "2026-11-22T09:00:00Z", ALICE_V6, APP, ""));
        s.add(&line("session_end", "2026-11-22T09:00:02Z", ALICE_V6, APP, &end(u64::MAX, 1)));
        s.add(&line(
            "auth_failed",
            "2026-11-24T00:00:00Z",
            ALICE,
            r#"{"user":"postgres","database":"app"}"#,
            "",
        ));
        s.add(&line(
            "session_denied",
            "2026-11-23T12:00:00Z",
            CI,
            r#"{"user":"app_ci","database":"payroll"}"#,
            "",
        ));
        s.add(&line("session_denied", "2026-11-23T12:00:00Z", "null", "null", ""));
        let groups = s.groups();
        type Counts<'a> = (Option<&'a str>, Option<&'a str>, u64, u64, u64);
        let summary: Vec<Counts> = groups
            .iter()
            .map(|g| (g.who.as_deref(), g.user.as_deref(), g.sessions, g.denied, g.auth_failed))
            .collect();
        assert_eq!(
            summary,
            [
                (Some("alice@example.com"), Some("alice"), 2, 0, 0),
                (Some("alice@example.com"), Some("postgres"), 0, 0, 1),
                (Some("tag:ci"), Some("app_ci"), 0, 1, 0),
                (None, None, 0, 1, 0),
            ]
        );
        let alice = &groups[0];
        assert_eq!(alice.bytes_client_to_upstream, u64::MAX, "saturates");
        assert_eq!(alice.bytes_upstream_to_client, 2001);
        assert_eq!(rfc3339(alice.first_seen, false), "2026-11-22T09:00:00Z");
        assert_eq!(rfc3339(alice.last_seen, false), "2026-11-23T10:05:00Z");
        assert_eq!(alice.ips.len(), 2);
        assert_eq!(groups[3].ips.iter().next().unwrap().to_string(), "100.64.0.9");
    }
}
