//! Fuzz target: statement audit's two hostile inputs. The tracker reads
//! both directions of every audited session (a client, or a database, may
//! send anything); libpg_query (C) parses whatever text a client sends.
//! Properties:
//! - the tracker takes any bytes, either way, in any pieces, without
//!   panicking, and never reports more statements than Query/Execute
//!   messages it saw;
//! - for generated exchanges (simple queries of several statements,
//!   extended Parse/Bind/Execute pipelines, failures at any point) the
//!   tracker reports exactly what an independent model says ran, fed in
//!   any pieces;
//! - describing any text (NUL bytes, invalid grammar, deep nesting) never
//!   panics, and a literal in a statement never appears in its text unless
//!   raw text was asked for;
//! - two statements of one shape (the auditor's cache key) describe the
//!   same, whatever their literals.

mod fuzz;

use fuzz::*;
use proptest::prelude::*;
use std::time::Instant;
use tailgres::statements::describe::{describe, shape, Cache, TextMode, TextStatus};
use tailgres::statements::tracker::{Outcome, Ran, Text, Tracker};

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/regressions/fuzz_statements.txt");

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    tailgres::pgwire::message_bytes(kind, body)
}

fn cs(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Feeds `bytes` in the given piece sizes (cycled).
fn feed(t: &mut Tracker, client: bool, bytes: &[u8], pieces: &[usize], ran: &mut Vec<Ran>) {
    let now = Instant::now();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = pieces.get(i % pieces.len().max(1)).copied().unwrap_or(bytes.len()).max(1);
        let end = (at + n).min(bytes.len());
        t.feed(client, &bytes[at..end], now, ran);
        at = end;
        i += 1;
    }
}

/// One round trip a client makes, and how the database answers it.
#[derive(Debug, Clone)]
enum Exchange {
    /// A Query of `statements` statements; the one at `fails` (if any) errs.
    Simple { statements: usize, fails: Option<usize> },
    /// Parse/Bind/Execute per statement, then one Sync; the Execute at
    /// `fails` errs and the rest before Sync never run.
    Extended { statements: usize, fails: Option<usize> },
}

fn exchange() -> impl Strategy<Value = Exchange> {
    prop_oneof![
        (1usize..4, proptest::option::of(0usize..4))
            .prop_map(|(n, f)| Exchange::Simple { statements: n, fails: f.filter(|f| *f < n) }),
        (1usize..4, proptest::option::of(0usize..4))
            .prop_map(|(n, f)| Exchange::Extended { statements: n, fails: f.filter(|f| *f < n) }),
    ]
}

/// What the client sends, what the database answers, and what the model
/// says ran: (extended?, text, outcome) per statement.
fn script(exchanges: &[Exchange]) -> (Vec<u8>, Vec<u8>, Vec<(bool, String, Outcome)>) {
    let (mut client, mut server, mut want) = (Vec::new(), Vec::new(), Vec::new());
    let error = msg(b'E', &[b"SERROR\0C".to_vec(), cs("22012"), b"Mboom\0\0".to_vec()].concat());
    let mut n = 0;
    for e in exchanges {
        match e {
            Exchange::Simple { statements, fails } => {
                let texts: Vec<String> = (0..*statements).map(|i| format!("select {}", n + i)).collect();
                n += statements;
                let whole = texts.join("; ");
                client.extend(msg(b'Q', &cs(&whole)));
                let mut results = Vec::new();
                for i in 0..*statements {
                    if *fails == Some(i) {
                        server.extend(&error);
                        results.push(Outcome::Error(Some("22012".into())));
                        break;
                    }
                    server.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
                    server.extend(msg(b'C', &cs("SELECT 1")));
                    results.push(Outcome::Complete("SELECT 1".into()));
                }
                server.extend(msg(b'Z', b"I"));
                // The model records a Query as one entry per result, with
                // the whole text (splitting is the auditor's).
                for r in results {
                    want.push((false, whole.clone(), r));
                }
            }
            Exchange::Extended { statements, fails } => {
                let mut stopped = false;
                for i in 0..*statements {
                    let text = format!("select ${} + {}", 1, n + i);
                    let name = format!("s{}", n + i);
                    client.extend(msg(b'P', &[cs(&name), cs(&text), vec![0, 0]].concat()));
                    client.extend(msg(b'B', &[cs(""), cs(&name), vec![0, 0, 0, 0, 0, 0]].concat()));
                    client.extend(msg(b'E', &[cs(""), vec![0, 0, 0, 0]].concat()));
                    if stopped {
                        continue;
                    }
                    server.extend(msg(b'1', b""));
                    server.extend(msg(b'2', b""));
                    if *fails == Some(i) {
                        server.extend(&error);
                        want.push((true, text, Outcome::Error(Some("22012".into()))));
                        stopped = true;
                    } else {
                        server.extend(msg(b'C', &cs("SELECT 1")));
                        want.push((true, text, Outcome::Complete("SELECT 1".into())));
                    }
                }
                n += statements;
                client.extend(msg(b'S', b""));
                server.extend(msg(b'Z', b"I"));
            }
        }
    }
    (client, server, want)
}

fn flatten(ran: &[Ran]) -> Vec<(bool, String, Outcome)> {
    let text = |t: &Text| match t {
        Text::Sql(s) => s.to_string(),
        other => format!("{other:?}"),
    };
    ran.iter()
        .flat_map(|r| match r {
            Ran::Query { text: t, results, .. } => {
                results.iter().map(|res| (false, text(t), res.outcome.clone())).collect::<Vec<_>>()
            }
            Ran::Execute { text: t, result, .. } => vec![(true, text(t), result.outcome.clone())],
        })
        .collect()
}

proptest! {
    #![proptest_config(config(1000, REGRESSIONS))]

    #[test]
    fn the_tracker_takes_any_bytes(
        client in bytes(600),
        server in bytes(600),
        pieces in proptest::collection::vec(1usize..64, 1..8),
        client_first in any::<bool>(),
    ) {
        let mut t = Tracker::default();
        let mut ran = Vec::new();
        if client_first {
            feed(&mut t, true, &client, &pieces, &mut ran);
            feed(&mut t, false, &server, &pieces, &mut ran);
        } else {
            feed(&mut t, false, &server, &pieces, &mut ran);
            feed(&mut t, true, &client, &pieces, &mut ran);
        }
        // Each reported statement answers a Query or an Execute: no more
        // of them than the client's bytes could hold (five bytes each).
        prop_assert!(ran.len() <= client.len() / 5);
    }

    #[test]
    fn the_tracker_reports_what_ran(
        exchanges in proptest::collection::vec(exchange(), 1..6),
        pieces in proptest::collection::vec(1usize..40, 1..6),
        interleave in any::<bool>(),
    ) {
        let (client, server, want) = script(&exchanges);
        let mut t = Tracker::default();
        let mut ran = Vec::new();
        if interleave {
            // Pipelined: all of the client's messages, then the answers.
            feed(&mut t, true, &client, &pieces, &mut ran);
            feed(&mut t, false, &server, &pieces, &mut ran);
        } else {
            // Whole, in one piece each.
            t.feed(true, &client, Instant::now(), &mut ran);
            t.feed(false, &server, Instant::now(), &mut ran);
        }
        prop_assert_eq!(flatten(&ran), want);
        prop_assert!(t.lost().is_none());
    }

    #[test]
    fn describing_any_text_never_panics(text in "(?s).{0,200}", raw in any::<bool>()) {
        let d = describe(&text, if raw { TextMode::Raw } else { TextMode::Normalized });
        prop_assert_eq!(d.fingerprint.len(), 16);
        prop_assert!(d.text.is_some() == matches!(d.status, TextStatus::Normalized | TextStatus::Raw));
    }

    /// The auditor's cache shares a description between statements of one
    /// shape: what it answers must be what describing the statement says.
    #[test]
    fn one_shape_describes_the_same(
        template in proptest::collection::vec(
            prop_oneof![
                Just("SELECT ".to_string()), Just(" FROM t1 ".to_string()), Just("WHERE a = ".to_string()),
                Just(" AND ".to_string()), Just(", ".to_string()), Just("(".to_string()), Just(")".to_string()),
                Just("-".to_string()), Just("::int".to_string()), Just(" IN ".to_string()), Just("b".to_string()),
                Just("interval ".to_string()), Just("$1".to_string()), Just("\"q\"".to_string()),
                Just("#".to_string()),
            ],
            1..14,
        ),
        fills in proptest::collection::vec(
            (prop_oneof![
                "[0-9]{1,6}", "[0-9]{1,3}\\.[0-9]{1,3}", "[0-9]e[0-9]", "'[a-z ]{0,6}'", "'[a-z]''[a-z]'"
            ], prop_oneof!["[0-9]{1,6}", "'[a-z]{0,4}'"]),
            14,
        ),
    ) {
        // `#` is a hole: both statements put a literal there.
        let mut holes = fills.iter();
        let (mut a, mut b) = (String::new(), String::new());
        for part in &template {
            if part == "#" {
                let (x, y) = holes.next().unwrap();
                a.push_str(x);
                b.push_str(y);
            } else {
                a.push_str(part);
                b.push_str(part);
            }
        }
        // The cache is invisible: what it answers is what describing says.
        let mut cache = Cache::new(TextMode::Normalized);
        prop_assert_eq!(cache.describe(&a), describe(&a, TextMode::Normalized), "{}", a);
        prop_assert_eq!(cache.describe(&b), describe(&b, TextMode::Normalized), "{} after {}", b, a);
        if let Some(sa) = shape(&a) {
            prop_assert!(!sa.contains('\''), "a shape holds no string literal: {}", sa);
        }
    }

    #[test]
    fn literals_never_reach_normalized_text(
        secret in "zq[a-z0-9]{6}",
        number in 1000u32..u32::MAX,
        shape in 0usize..6,
        column in "[a-z][a-z_]{0,8}",
    ) {
        let sql = match shape {
            0 => format!("SELECT * FROM t WHERE {column} = '{secret}' AND n = {number}"),
            1 => format!("INSERT INTO t ({column}, n) VALUES ('{secret}', {number}), (E'{secret}\\n', -{number})"),
            2 => format!("UPDATE t SET {column} = $${secret}$$ WHERE n IN ({number}, {number})"),
            3 => format!("SELECT '{secret}'::text || $1, {number}.5e3 /* {secret} */ -- {secret}\n FROM t"),
            4 => format!("DO $body$ BEGIN RAISE NOTICE '{secret} {number}'; END $body$"),
            _ => format!("CREATE ROLE r{column} LOGIN PASSWORD '{secret}' CONNECTION LIMIT {number}"),
        };
        let d = describe(&sql, TextMode::Normalized);
        let text = d.text.unwrap_or_default();
        prop_assert!(!text.contains(&secret), "{sql}\n-> {text}");
        prop_assert!(!text.contains(&number.to_string()), "{sql}\n-> {text}");
    }
}
