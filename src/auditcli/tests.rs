//! Argument checks and whole runs over small files (the built binary is
//! exercised in `tests/audit_cli.rs`).

use super::*;
use clap::Parser;
use std::time::UNIX_EPOCH;

fn args(argv: &[&str]) -> AuditArgs {
    AuditArgs::try_parse_from(std::iter::once("tailgres audit").chain(argv.iter().copied())).unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_442_587)
}

#[test]
fn query_table() {
    // argv, stdout is a terminal, Ok(format) or Err(message fragment)
    let cases: &[(&[&str], bool, Result<Format, &str>)] = &[
        (&[], true, Ok(Format::Table)),
        (&[], false, Ok(Format::Json)),
        (&["--format", "json"], true, Ok(Format::Json)),
        (&["--format", "table"], false, Ok(Format::Table)),
        (&["-f", "audit.jsonl"], false, Ok(Format::Json)),
        (&["--since", "24h", "--until", "1h"], false, Ok(Format::Json)),
        (&["-f"], false, Err("--follow needs a file")),
        (&["-f", "-"], false, Err("--follow needs a file")),
        (&["-f", "a", "b"], false, Err("--follow follows one file, not 2")),
        (&["-f", "--summary", "a"], false, Err("--follow and --summary")),
        (&["--since", "1h", "--until", "24h"], false, Err("is not before --until 24h")),
        (&["--since", "2026-11-23", "--until", "2026-11-23"], false, Err("nothing can match")),
        (&["--since", "tuesday"], false, Err("--since: \"tuesday\" is neither an RFC 3339 time")),
        (&["--until", "2026-02-30"], false, Err("--until: \"2026-02-30\" is neither")),
    ];
    for (argv, tty, want) in cases {
        let got = Query::new(&args(argv), now(), *tty);
        match (want, got) {
            (Ok(f), Ok(q)) => assert_eq!(q.format, *f, "{argv:?}"),
            (Err(needle), Err(e)) => assert!(e.to_string().contains(needle), "{argv:?}: {e}"),
            (want, got) => panic!("{argv:?}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn sources_and_filters_come_from_the_arguments() {
    let q = Query::new(
        &args(&[
            "--who",
            "alice@example.com",
            "--who",
            "tag:ci",
            "-e",
            "auth_ok,auth_failed",
            "-e",
            "cancel",
            "-",
            "log",
        ]),
        now(),
        false,
    )
    .unwrap();
    assert_eq!(q.sources, [Source::Stdin, Source::File("log".into())]);
    assert_eq!(q.filter.who.len(), 2);
    assert_eq!(q.filter.events, [EventKind::AuthOk, EventKind::AuthFailed, EventKind::Cancel]);
    let q = Query::new(&args(&["--since", "24h"]), now(), false).unwrap();
    assert_eq!(q.filter.since, Some(now() - Duration::from_secs(86_400)));
    assert_eq!(q.sources, [Source::Stdin]);
}

#[test]
fn unknown_events_are_refused_naming_the_known_ones() {
    let err = AuditArgs::try_parse_from(["tailgres audit", "--event", "session_stop"]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("invalid value 'session_stop'"), "{msg}");
    for k in ["session_start", "session_denied", "auth_ok", "auth_failed", "cancel", "session_end"] {
        assert!(msg.contains(k), "{msg}");
    }
}

#[test]
fn exit_codes() {
    let cases = [
        (Outcome::default(), false, 0),
        (Outcome { malformed: 1, ..Outcome::default() }, false, 1),
        (Outcome { malformed: 1, ..Outcome::default() }, true, 0),
        (Outcome { unreadable: 1, malformed: 1, ..Outcome::default() }, true, 2),
    ];
    for (outcome, lenient, want) in cases {
        assert_eq!(outcome.exit_code(lenient), want, "{outcome:?} lenient={lenient}");
    }
}

const START: &str = r#"{"ts":"2026-11-23T14:00:00.000000Z","event":"session_start","session_id":"00000000000000a1","peer_addr":"100.64.0.3:1","peer":{"stable_id":"nA","node_name":"laptop.ts.net","user_login":"alice@example.com","user_display_name":"Alice","tags":[],"tailnet_ip":"100.64.0.3","os":"linux","shared_in":false},"postgres":{"user":"alice","database":"app","application_name":null,"protocol":"3.0"},"client_transport":"tls","upstream":null}"#;
const DENIED: &str = r#"{"ts":"2026-11-23T14:01:00.000000Z","event":"session_denied","reason":"unknown_peer","detail":"no such node","side":"client","session_id":"00000000000000b1","peer_addr":"100.64.0.99:1","peer":null,"postgres":null,"client_transport":null,"upstream":null}"#;

fn run_on(text: &[u8], argv: &[&str]) -> (Outcome, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, text).unwrap();
    let mut argv = argv.to_vec();
    let p = path.to_str().unwrap();
    argv.push(p);
    let q = Query::new(&args(&argv), now(), false).unwrap();
    let mut out = Vec::new();
    let outcome = run(&q, &mut out).unwrap();
    (outcome, String::from_utf8(out).unwrap())
}

#[test]
fn runs_count_what_they_meet() {
    let text = format!("{START}\n\n   \nnot json\n{DENIED}\n\u{0}\n{{\"ts\":1}}\n");
    let (outcome, out) = run_on(text.as_bytes(), &[]);
    assert_eq!(outcome, Outcome { records: 2, malformed: 3, unreadable: 0 });
    assert_eq!(out, format!("{START}\n{DENIED}\n"));

    let (outcome, out) = run_on(text.as_bytes(), &["--who", "100.64.0.99"]);
    assert_eq!(outcome.records, 1);
    assert_eq!(out, format!("{DENIED}\n"));

    let (_, out) = run_on(text.as_bytes(), &["--summary", "--format", "json"]);
    let groups: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(groups.len(), 2, "{out}");
    assert_eq!(groups[0]["who"], "alice@example.com");
    assert_eq!(groups[0]["sessions"], 1);
    assert_eq!(groups[1]["who"], serde_json::Value::Null);
    assert_eq!(groups[1]["ips"], serde_json::json!(["100.64.0.99"]));
    assert_eq!(groups[1]["denied"], 1);
}

#[test]
fn table_rows_say_what_happened() {
    let (_, out) = run_on(format!("{START}\n{DENIED}\n").as_bytes(), &["--format", "table"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("TIME (UTC)"), "{out}");
    let col = |name: &str| lines[0].find(name).unwrap();
    // Every row has its values under the headers.
    assert_eq!(&lines[1][col("EVENT")..col("EVENT") + 13], "session_start");
    assert_eq!(&lines[2][col("EVENT")..col("EVENT") + 14], "session_denied");
    assert!(lines[1][col("WHO")..].starts_with("alice@example.com "), "{out}");
    assert!(lines[1][col("USER@DATABASE")..].starts_with("alice@app "), "{out}");
    assert!(lines[2][col("OUTCOME")..].starts_with("unknown_peer (client)"), "{out}");
    assert!(lines[2][col("IP")..].starts_with("100.64.0.99 "), "{out}");
    assert!(lines[2].ends_with("no such node"), "{out}");
}
