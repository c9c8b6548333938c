//! `--summary`: who accessed what, from which machine.
//!
//! One group per (identity, node, database user, database, and the
//! tailgres node that wrote the records: a fleet's logs read together give
//! each proxy's counts); memory grows with the number of groups, not with
//! the log.
#![forbid(unsafe_code)]

use super::entry::Entry;
use super::table::{self, Table};
use crate::audit::rfc3339;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::SystemTime;

/// A summary printed at the end of the input.
pub trait Report {
    fn is_empty(&self) -> bool;
    fn write_json(self, out: &mut impl Write) -> io::Result<()>;
    fn write_table(self, out: &mut impl Write) -> io::Result<()>;
}

/// Prints `rows` under `t`'s header, the widths sized to all of them (every
/// row is known: the table is exact).
fn print_rows(mut t: Table, rows: Vec<Vec<String>>, out: &mut impl Write) -> io::Result<()> {
    t.size_to(&rows);
    for r in rows {
        t.row(out, r)?;
    }
    t.flush(out)
}

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
    /// The tailgres node that wrote the records.
    proxy: Option<String>,
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
    /// The tailgres node that wrote the records (their `node`; null in logs
    /// from before records named it). `node` is the peer's machine.
    pub proxy: Option<String>,
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
            proxy: e.proxy.clone(),
        };
        let g = self.groups.entry(key).or_insert_with_key(|k| Group {
            who: k.who.clone(),
            node: k.node.clone(),
            ips: BTreeSet::new(),
            user: k.user.clone(),
            database: k.database.clone(),
            proxy: k.proxy.clone(),
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

    /// The groups, ordered by identity, node, user, database, tailgres node.
    pub fn groups(self) -> Vec<Group> {
        let mut all: Vec<(Key, Group)> = self.groups.into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, g)| g).collect()
    }
}

impl Report for Summary {
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn write_json(self, out: &mut impl Write) -> io::Result<()> {
        write_json_lines(self.groups(), out)
    }

    fn write_table(self, out: &mut impl Write) -> io::Result<()> {
        let mut t = Table::new(&[
            ("WHO", false),
            ("NODE", false),
            ("IP", false),
            ("USER", false),
            ("DATABASE", false),
            ("PROXY", false),
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
        // The tailgres node, when the records come from more than one.
        let proxies: BTreeSet<&Option<String>> = groups.iter().map(|g| &g.proxy).collect();
        t.show(5, proxies.len() > 1);
        let mut rows = Vec::with_capacity(groups.len());
        for g in groups {
            let ips: Vec<String> = g.ips.iter().map(IpAddr::to_string).collect();
            rows.push(vec![
                g.who.as_deref().map_or_else(|| "(unidentified)".to_string(), table::clean),
                opt(&g.node),
                if ips.is_empty() { "-".into() } else { ips.join(",") },
                opt(&g.user),
                opt(&g.database),
                opt(&g.proxy),
                g.sessions.to_string(),
                g.denied.to_string(),
                g.auth_failed.to_string(),
                table::time(g.first_seen),
                table::time(g.last_seen),
                table::bytes(g.bytes_client_to_upstream),
                table::bytes(g.bytes_upstream_to_client),
            ]);
        }
        print_rows(t, rows, out)
    }
}

fn write_json_lines<T: Serialize>(groups: Vec<T>, out: &mut impl Write) -> io::Result<()> {
    for g in groups {
        serde_json::to_writer(&mut *out, &g)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// `--summary --statements`: per identity and statement fingerprint, how
/// often, how long in total and at most, and how many failed.
#[derive(Debug, Default)]
pub struct StatementSummary {
    groups: HashMap<(Option<String>, String), StatementGroup>,
}

/// One line of the statement summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementGroup {
    /// The login, or the tags of a tagged device.
    pub who: Option<String>,
    pub fingerprint: String,
    /// The statement's text, as the first record of the group has it.
    pub text: Option<String>,
    pub databases: BTreeSet<String>,
    pub count: u64,
    pub errors: u64,
    pub total_us: u64,
    pub max_us: u64,
    pub rows: u64,
}

impl StatementSummary {
    /// Counts a statement record (others are ignored).
    pub fn add(&mut self, e: &Entry) {
        let (Some(fingerprint), "statement") = (&e.fingerprint, e.event.as_str()) else { return };
        let who = e.who();
        let g = self.groups.entry((who.clone(), fingerprint.clone())).or_insert_with(|| StatementGroup {
            who,
            fingerprint: fingerprint.clone(),
            text: e.text.clone(),
            databases: BTreeSet::new(),
            count: 0,
            errors: 0,
            total_us: 0,
            max_us: 0,
            rows: 0,
        });
        if g.text.is_none() {
            g.text = e.text.clone();
        }
        g.databases.extend(e.database().map(str::to_owned));
        g.count += 1;
        g.errors += u64::from(e.outcome.as_deref() == Some("error"));
        let us = e.duration_us.unwrap_or(0);
        g.total_us = g.total_us.saturating_add(us);
        g.max_us = g.max_us.max(us);
        g.rows = g.rows.saturating_add(e.rows.unwrap_or(0));
    }

    /// By identity, then the most total time first.
    pub fn groups(self) -> Vec<StatementGroup> {
        let mut all: Vec<StatementGroup> = self.groups.into_values().collect();
        all.sort_by(|a, b| {
            (a.who.is_none(), &a.who, std::cmp::Reverse(a.total_us), &a.fingerprint).cmp(&(
                b.who.is_none(),
                &b.who,
                std::cmp::Reverse(b.total_us),
                &b.fingerprint,
            ))
        });
        all
    }
}

impl Report for StatementSummary {
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    fn write_json(self, out: &mut impl Write) -> io::Result<()> {
        write_json_lines(self.groups(), out)
    }

    fn write_table(self, out: &mut impl Write) -> io::Result<()> {
        let t = Table::new(&[
            ("WHO", false),
            ("FINGERPRINT", false),
            ("COUNT", true),
            ("ERRORS", true),
            ("TOTAL", true),
            ("MEAN", true),
            ("MAX", true),
            ("ROWS", true),
            ("DATABASE", false),
            ("TEXT", false),
        ]);
        let took = |us: u64| if us < 1000 { format!("{us}µs") } else { table::duration(us / 1000) };
        let groups = self.groups();
        let mut rows = Vec::with_capacity(groups.len());
        for g in groups {
            let dbs: Vec<&str> = g.databases.iter().map(String::as_str).collect();
            rows.push(vec![
                g.who.as_deref().map_or_else(|| "(unidentified)".to_string(), table::clean),
                g.fingerprint.clone(),
                g.count.to_string(),
                g.errors.to_string(),
                took(g.total_us),
                took(g.total_us / g.count.max(1)),
                took(g.max_us),
                g.rows.to_string(),
                if dbs.is_empty() { "-".into() } else { table::clean(&dbs.join(",")) },
                g.text.as_deref().map_or_else(|| "-".to_string(), table::clean),
            ]);
        }
        print_rows(t, rows, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_group_by_identity_and_fingerprint() {
        let st = |fp: &str, us: u64, outcome: &str, rows: &str| {
            format!(
                r#","fingerprint":"{fp}","text":"SELECT $1","duration_us":{us},"outcome":"{outcome}","rows":{rows}"#
            )
        };
        let mut s = StatementSummary::default();
        s.add(&line("statement", "2026-11-23T10:00:00Z", ALICE, APP, &st("aa", 100, "ok", "1")));
        s.add(&line("statement", "2026-11-23T10:00:01Z", ALICE_V6, APP, &st("aa", 300, "error", "null")));
        s.add(&line("statement", "2026-11-23T10:00:02Z", ALICE, APP, &st("bb", 5000, "ok", "7")));
        s.add(&line("statement", "2026-11-23T10:00:03Z", CI, APP, &st("aa", 1, "ok", "1")));
        s.add(&line("session_start", "2026-11-23T10:00:04Z", ALICE, APP, ""));
        let g = s.groups();
        let got: Vec<(Option<&str>, &str, u64, u64, u64, u64, u64)> = g
            .iter()
            .map(|g| {
                (g.who.as_deref(), g.fingerprint.as_str(), g.count, g.errors, g.total_us, g.max_us, g.rows)
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("alice@example.com"), "bb", 1, 0, 5000, 5000, 7),
                (Some("alice@example.com"), "aa", 2, 1, 400, 300, 1),
                (Some("tag:ci"), "aa", 1, 0, 1, 1, 1),
            ]
        );
    }

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
