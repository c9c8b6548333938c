//! Which records the operator asked for.
//!
//! Different flags combine with AND; repeating one flag widens it (OR):
//! `--who alice@example.com --who 'tag:ci' --event session_end` is "the
//! session ends of alice or of CI".
#![forbid(unsafe_code)]

use super::entry::Entry;
use std::net::IpAddr;
use std::time::SystemTime;

/// The events a record can be (the `event` field), as `--event` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum EventKind {
    SessionStart,
    SessionDenied,
    AuthOk,
    AuthFailed,
    Cancel,
    SessionEnd,
    Statement,
    // The log's own records (where a run or a file begins, signed
    // checkpoints): shown only when asked for by name. (No doc comment:
    // clap would list every value on a line of its own.)
    LogOpened,
    Checkpoint,
}

impl EventKind {
    /// The `event` value, as [`crate::audit::Event::name`] writes it.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::SessionDenied => "session_denied",
            EventKind::AuthOk => "auth_ok",
            EventKind::AuthFailed => "auth_failed",
            EventKind::Cancel => "cancel",
            EventKind::SessionEnd => "session_end",
            EventKind::Statement => "statement",
            EventKind::LogOpened => "log_opened",
            EventKind::Checkpoint => "checkpoint",
        }
    }

    /// Whether this is one of the log's own records, not a session's.
    pub fn is_log_record(event: &str) -> bool {
        event == "log_opened" || event == "checkpoint"
    }
}

/// A shell-style pattern: `*` is any run of characters, `?` any one;
/// everything else is literal, so a pattern without them is an exact match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<char>,
    /// ASCII case is ignored (logins, DNS names, tags are case-insensitive).
    fold_case: bool,
}

impl Glob {
    pub fn new(pattern: &str, fold_case: bool) -> Glob {
        let pattern = if fold_case { pattern.to_ascii_lowercase() } else { pattern.to_owned() };
        Glob { pattern: pattern.chars().collect(), fold_case }
    }

    pub fn matches(&self, text: &str) -> bool {
        let folded;
        let text = if self.fold_case {
            folded = text.to_ascii_lowercase();
            &folded
        } else {
            text
        };
        let t: Vec<char> = text.chars().collect();
        let p = &self.pattern;
        // Greedy with one backtrack point, the last `*`: linear for the
        // patterns people type, never exponential.
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(&c) if c == '?' || c == t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// `--who`: one pattern against every name the peer has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoPattern {
    glob: Glob,
    /// Set when the pattern is an address: compared as one, so that
    /// `fd7a:115c:a1e0:0::3` finds `fd7a:115c:a1e0::3`.
    ip: Option<IpAddr>,
}

impl WhoPattern {
    pub fn new(pattern: &str) -> WhoPattern {
        WhoPattern { glob: Glob::new(pattern, true), ip: pattern.parse().ok() }
    }

    /// The user login, the node name (full, or its first label), any tag,
    /// the stable node ID, or the tailnet IP.
    pub fn matches(&self, e: &Entry) -> bool {
        let ip = e.ip();
        if let (Some(want), Some(ip)) = (self.ip, ip) {
            if want == ip {
                return true;
            }
        }
        if ip.is_some_and(|ip| self.glob.matches(&ip.to_string())) {
            return true;
        }
        let Some(peer) = &e.peer else { return false };
        let node = peer.node_name.trim_end_matches('.');
        let short = node.split('.').next().unwrap_or(node);
        [peer.user_login.as_str(), node, short, peer.stable_id.as_str()]
            .into_iter()
            .chain(peer.tags.iter().map(String::as_str))
            .any(|name| !name.is_empty() && self.glob.matches(name))
    }
}

/// Everything the operator filtered on; the empty filter passes all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub who: Vec<WhoPattern>,
    pub databases: Vec<Glob>,
    pub users: Vec<Glob>,
    pub events: Vec<EventKind>,
    /// Inclusive.
    pub since: Option<SystemTime>,
    /// Exclusive, so that `--since D --until D+1` is one day, once.
    pub until: Option<SystemTime>,
    pub sessions: Vec<Glob>,
    /// Statement records with these fingerprints.
    pub fingerprints: Vec<Glob>,
    /// Statement records whose text matches (case-insensitive).
    pub texts: Vec<Glob>,
    /// Records written by these tailgres nodes (`node`, case-insensitive).
    pub nodes: Vec<Glob>,
}

impl Filter {
    pub fn matches(&self, e: &Entry) -> bool {
        fn any<T>(wanted: &[T], hit: impl Fn(&T) -> bool) -> bool {
            wanted.is_empty() || wanted.iter().any(hit)
        }
        self.since.is_none_or(|t| e.time >= t)
            && self.until.is_none_or(|t| e.time < t)
            && if self.events.is_empty() {
                // Who-did-what views leave out the log's own records.
                !EventKind::is_log_record(&e.event)
            } else {
                self.events.iter().any(|k| k.name() == e.event)
            }
            && any(&self.who, |w| w.matches(e))
            && any(&self.databases, |g| e.database().is_some_and(|d| g.matches(d)))
            && any(&self.users, |g| e.db_user().is_some_and(|u| g.matches(u)))
            // A cancel belongs to the session it targets as much as to
            // the connection that carried it.
            && any(&self.sessions, |g| {
                g.matches(&e.session_id) || e.target_session_id.as_deref().is_some_and(|t| g.matches(t))
            })
            && any(&self.fingerprints, |g| e.fingerprint.as_deref().is_some_and(|f| g.matches(f)))
            && any(&self.texts, |g| e.text.as_deref().is_some_and(|t| g.matches(t)))
            && any(&self.nodes, |g| e.proxy.as_deref().is_some_and(|n| g.matches(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{CancelOutcome, DenyReason, EndReason, Event, SessionEnd};
    use clap::ValueEnum;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn glob_table() {
        let cases: &[(&str, &str, bool, bool)] = &[
            // pattern, text, fold case, matches
            ("alice@example.com", "alice@example.com", true, true),
            ("alice@example.com", "Alice@Example.COM", true, true),
            ("alice", "alice@example.com", true, false),
            ("alice*", "alice@example.com", true, true),
            ("*@example.com", "bob@example.com", true, true),
            ("*@example.com", "bob@example.org", true, false),
            ("*", "", true, true),
            ("", "", true, true),
            ("", "x", true, false),
            ("a*b*c", "aXbYc", true, true),
            ("a*b*c", "aXbYcZ", true, false),
            ("a*b*c", "abcbc", true, true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", true, false),
            ("tag:?i", "tag:ci", true, true),
            ("tag:?i", "tag:cci", true, false),
            ("100.64.*", "100.64.0.3", true, true),
            ("100.64.*", "100.65.0.3", true, false),
            ("App", "app", false, false),
            ("app*", "app_ci", false, true),
            ("ü*", "über", false, true),
        ];
        for &(pattern, text, fold, want) in cases {
            assert_eq!(Glob::new(pattern, fold).matches(text), want, "{pattern:?} ~ {text:?}");
        }
    }

    /// Every `--event` value is a name the writer uses, and every name
    /// the writer uses is a `--event` value.
    #[test]
    fn event_kinds_are_the_writers_events() {
        let writer: Vec<&str> = [
            Event::SessionStart,
            Event::denied(DenyReason::UnknownPeer, ""),
            Event::auth_ok(crate::audit::AuthMethod::Trust),
            Event::auth_failed(crate::audit::AuthMethod::Md5, None, ""),
            Event::cancel(CancelOutcome::UnknownKey),
            Event::SessionEnd(SessionEnd {
                duration: Duration::ZERO,
                bytes_client_to_upstream: 0,
                bytes_upstream_to_client: 0,
                reason: EndReason::ClientClosed,
                detail: None,
            }),
            Event::Statement(crate::audit::Statement {
                protocol: crate::audit::StatementProtocol::Simple,
                text: None,
                text_status: "unknown",
                fingerprint: String::new(),
                duration: Duration::ZERO,
                command_tag: None,
                rows: None,
                sqlstate: None,
                suspended: false,
                copy: None,
                params: None,
            }),
        ]
        .iter()
        .map(Event::name)
        .chain(
            [
                crate::audit::LogEvent::LogOpened {
                    reason: crate::audit::OpenReason::Start,
                    version: "",
                    pid: 0,
                    signing_key: None,
                },
                crate::audit::LogEvent::Checkpoint {
                    records: 0,
                    signing_key: String::new(),
                    signature: String::new(),
                },
            ]
            .iter()
            .map(|e| {
                let v = serde_json::to_value(crate::audit::LogRecord {
                    ts: std::time::SystemTime::now(),
                    event: e.clone(),
                });
                match v.unwrap()["event"].as_str().unwrap() {
                    "log_opened" => "log_opened",
                    "checkpoint" => "checkpoint",
                    other => panic!("unexpected log event {other}"),
                }
            }),
        )
        .collect();
        let ours: Vec<&str> = EventKind::value_variants().iter().map(|k| k.name()).collect();
        assert_eq!(ours, writer);
        for k in EventKind::value_variants() {
            assert_eq!(k.to_possible_value().unwrap().get_name(), k.name());
        }
    }

    fn entry(json: &str) -> Entry {
        Entry::parse(json.as_bytes()).unwrap()
    }

    const ALICE: &str = r#"{"ts":"2026-11-23T14:03:07.000000Z","event":"session_end","session_id":"00000000000000a1",
        "peer_addr":"100.64.0.3:41234",
        "peer":{"stable_id":"nALICE","node_name":"laptop.tail1234.ts.net","user_login":"alice@example.com","tags":[],"tailnet_ip":"100.64.0.3"},
        "postgres":{"user":"alice","database":"app"},"node":"pg-1"}"#;
    const CI_CANCEL: &str = r#"{"ts":"2026-11-24T00:00:00.000000Z","event":"cancel","session_id":"00000000000000c1",
        "target_session_id":"00000000000000c0","peer_addr":"[fd7a:115c:a1e0::7]:1",
        "peer":{"stable_id":"nCI","node_name":"ci-runner.tail1234.ts.net","user_login":"tagged-devices","tags":["tag:ci"],"tailnet_ip":"fd7a:115c:a1e0::7"},
        "postgres":null,"node":"PG-2"}"#;
    const UNKNOWN: &str = r#"{"ts":"2026-11-22T00:00:00.000000Z","event":"session_denied","session_id":"00000000000000d1",
        "peer_addr":"100.64.0.99:5000","peer":null,"postgres":null,"reason":"unknown_peer"}"#;

    #[test]
    fn who_table() {
        let (alice, ci, unknown) = (entry(ALICE), entry(CI_CANCEL), entry(UNKNOWN));
        let cases: &[(&str, [bool; 3])] = &[
            ("alice@example.com", [true, false, false]),
            ("ALICE@example.com", [true, false, false]),
            ("alice", [false, false, false]),
            ("*@example.com", [true, false, false]),
            ("laptop", [true, false, false]),
            ("laptop.tail1234.ts.net", [true, false, false]),
            ("*.tail1234.ts.net", [true, true, false]),
            ("nALICE", [true, false, false]),
            ("tag:ci", [false, true, false]),
            ("tag:*", [false, true, false]),
            // "tagged-devices" is a login nobody means, but it is what the
            // log says, so it matches.
            ("tagged-devices", [false, true, false]),
            ("100.64.0.3", [true, false, false]),
            ("100.64.0.*", [true, false, true]),
            ("fd7a:115c:a1e0:0:0::7", [false, true, false]),
            ("100.64.0.99", [false, false, true]),
            ("*", [true, true, true]),
        ];
        for (pattern, want) in cases {
            let w = WhoPattern::new(pattern);
            let got = [w.matches(&alice), w.matches(&ci), w.matches(&unknown)];
            assert_eq!(&got, want, "--who {pattern}");
        }
    }

    #[test]
    fn filter_table() {
        let (alice, ci, unknown) = (entry(ALICE), entry(CI_CANCEL), entry(UNKNOWN));
        let t = |s: &str| Some(super::super::when::parse_rfc3339(s).unwrap());
        let cases: Vec<(&str, Filter, [bool; 3])> = vec![
            ("empty", Filter::default(), [true, true, true]),
            (
                "database",
                Filter { databases: vec![Glob::new("app", false)], ..Filter::default() },
                [true, false, false],
            ),
            (
                "database case",
                Filter { databases: vec![Glob::new("APP", false)], ..Filter::default() },
                [false, false, false],
            ),
            (
                "user",
                Filter { users: vec![Glob::new("al*", false)], ..Filter::default() },
                [true, false, false],
            ),
            (
                "events OR",
                Filter { events: vec![EventKind::Cancel, EventKind::SessionDenied], ..Filter::default() },
                [false, true, true],
            ),
            (
                "since inclusive",
                Filter { since: t("2026-11-23T14:03:07Z"), ..Filter::default() },
                [true, true, false],
            ),
            (
                "until exclusive",
                Filter { until: t("2026-11-23T14:03:07Z"), ..Filter::default() },
                [false, false, true],
            ),
            (
                "window",
                Filter { since: t("2026-11-23"), until: t("2026-11-24"), ..Filter::default() },
                [true, false, false],
            ),
            (
                "session",
                Filter { sessions: vec![Glob::new("00000000000000a1", true)], ..Filter::default() },
                [true, false, false],
            ),
            (
                "cancel target",
                Filter { sessions: vec![Glob::new("00000000000000c0", true)], ..Filter::default() },
                [false, true, false],
            ),
            (
                "session prefix",
                Filter { sessions: vec![Glob::new("*d1", true)], ..Filter::default() },
                [false, false, true],
            ),
            (
                "AND",
                Filter {
                    who: vec![WhoPattern::new("*.tail1234.ts.net")],
                    events: vec![EventKind::SessionEnd],
                    ..Filter::default()
                },
                [true, false, false],
            ),
            (
                "node",
                Filter { nodes: vec![Glob::new("pg-1", true)], ..Filter::default() },
                [true, false, false],
            ),
            // Case-insensitive, like DNS; a record from before records
            // named their node matches no --node.
            (
                "nodes",
                Filter { nodes: vec![Glob::new("pg-*", true)], ..Filter::default() },
                [true, true, false],
            ),
            (
                "nodes OR",
                Filter { nodes: vec![Glob::new("pg-2", true), Glob::new("pg-9", true)], ..Filter::default() },
                [false, true, false],
            ),
            (
                "who OR",
                Filter {
                    who: vec![WhoPattern::new("tag:ci"), WhoPattern::new("100.64.0.99")],
                    ..Filter::default()
                },
                [false, true, true],
            ),
        ];
        for (name, f, want) in cases {
            let got = [f.matches(&alice), f.matches(&ci), f.matches(&unknown)];
            assert_eq!(got, want, "{name}");
        }
        // Sanity of the fixtures themselves.
        assert_eq!(alice.time, UNIX_EPOCH + Duration::from_secs(1_795_442_587));
    }
}
