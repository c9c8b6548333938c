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

/// A record of node `node` (none: from before records named it) at
/// 14:00:`sec`, its detail `label`.
fn at(node: Option<&str>, sec: u32, label: &str) -> String {
    let node = node.map(|n| format!(r#","node":"{n}""#)).unwrap_or_default();
    format!(
        r#"{{"ts":"2026-11-23T14:00:{sec:02}.000000Z","event":"session_denied","reason":"unknown_peer","detail":"{label}","side":"client","session_id":"00000000000000b1","peer_addr":"100.64.0.99:1","peer":null,"postgres":null,"client_transport":null,"upstream":null{node}}}"#
    )
}

/// Runs over several files (name, lines), given in this order.
fn run_files(files: &[(&str, Vec<String>)], argv: &[&str]) -> (Outcome, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    for (name, lines) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        argv.push(path.to_str().unwrap().to_owned());
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let q = Query::new(&args(&argv), now(), false).unwrap();
    let mut out = Vec::new();
    let outcome = run(&q, &mut out).unwrap();
    (outcome, String::from_utf8(out).unwrap())
}

/// The details of the records printed as JSON lines.
fn details(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["detail"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn nodes_are_merged_by_time_and_a_nodes_files_stay_in_order() {
    let pg1 = |sec, label| at(Some("pg-1"), sec, label);
    let pg2 = |sec, label| at(Some("pg-2"), sec, label);
    // pg-1's rotated file, then its current one, whose clock stepped back
    // (a01 after a04); pg-2's log between them in time.
    let files = [
        ("pg1.1", vec![pg1(0, "a00"), pg1(2, "a02"), "not a record".to_string()]),
        ("pg1", vec![pg1(4, "a04"), pg1(1, "a01")]),
        ("pg2", vec![pg2(1, "b01"), pg2(2, "b02"), pg2(3, "b03")]),
    ];
    let (outcome, out) = run_files(&files, &[]);
    assert_eq!(outcome, Outcome { records: 7, malformed: 1, unreadable: 0 });
    // Same time (14:00:02): the file given first goes first.
    assert_eq!(details(&out), ["a00", "b01", "a02", "b02", "b03", "a04", "a01"]);
    // Given the other way round, ties go the other way; each node's own
    // order is kept.
    let (_, out) = run_files(&[files[2].clone(), files[0].clone(), files[1].clone()], &[]);
    assert_eq!(details(&out), ["a00", "b01", "b02", "a02", "b03", "a04", "a01"]);
    // One node's files only: as given (what reading them in turn gives).
    let (_, out) = run_files(&files[..2], &[]);
    assert_eq!(details(&out), ["a00", "a02", "a04", "a01"]);
    // --node, any case, globs.
    let (_, out) = run_files(&files, &["--node", "PG-2"]);
    assert_eq!(details(&out), ["b01", "b02", "b03"]);
    let (_, out) = run_files(&files, &["--node", "pg-*", "--since", "2026-11-23T14:00:02Z"]);
    assert_eq!(details(&out), ["a02", "b02", "b03", "a04"]);
    // Logs from before records named their node are read in turn, as before.
    let old = [("o.1", vec![at(None, 5, "o05")]), ("o", vec![at(None, 1, "o01")])];
    let (_, out) = run_files(&old, &[]);
    assert_eq!(details(&out), ["o05", "o01"]);
    // An unreadable file is reported and the rest still read.
    let (outcome, out) = run_files(&files[2..], &["/nonexistent/audit.jsonl"]);
    assert_eq!(outcome.unreadable, 1);
    assert_eq!(details(&out), ["b01", "b02", "b03"]);
}

#[test]
fn the_table_shows_the_node_when_there_are_several() {
    let files = [
        ("pg1", vec![at(Some("pg-1"), 0, "a00"), at(Some("pg-1"), 2, "a02")]),
        ("pg2", vec![at(Some("pg-2"), 1, "b01")]),
    ];
    let table = |files: &[(&str, Vec<String>)], extra: &[&str]| {
        let mut argv = vec!["--format", "table"];
        argv.extend_from_slice(extra);
        let (_, out) = run_files(files, &argv);
        out
    };
    let out = table(&files, &[]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TIME (UTC)            PROXY  EVENT"), "{out}");
    let col = lines[0].find("PROXY").unwrap();
    let proxies: Vec<&str> = lines[1..].iter().map(|l| l[col..].split(' ').next().unwrap()).collect();
    assert_eq!(proxies, ["pg-1", "pg-2", "pg-1"]);
    // One node: no column (as before records named their node).
    for out in [table(&files[..1], &[]), table(&files, &["--node", "pg-2"])] {
        assert!(!out.contains("PROXY"), "{out}");
        assert!(out.starts_with("TIME (UTC)            EVENT"), "{out}");
    }
    // Several nodes in one input (concatenated logs): the rows say so.
    let (_, out) =
        run_on(format!("{}\n{}\n", files[0].1[0], files[1].1[0]).as_bytes(), &["--format", "table"]);
    assert!(out.contains("PROXY"), "{out}");
}

#[test]
fn the_summary_counts_each_node_apart() {
    let start = |node: &str, sec: u32| {
        START
            .replace("14:00:00.000000Z", &format!("14:00:{sec:02}.000000Z"))
            .replace(r#""upstream":null}"#, &format!(r#""upstream":null,"node":"{node}"}}"#))
    };
    let files = [("pg1", vec![start("pg-1", 0), start("pg-1", 2)]), ("pg2", vec![start("pg-2", 1)])];
    let (_, out) = run_files(&files, &["--summary", "--format", "json"]);
    let groups: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str, u64)> = groups
        .iter()
        .map(|g| (g["who"].as_str().unwrap(), g["proxy"].as_str().unwrap(), g["sessions"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, [("alice@example.com", "pg-1", 2), ("alice@example.com", "pg-2", 1)]);
    let (_, out) = run_files(&files, &["--summary", "--format", "table"]);
    let lines: Vec<&str> = out.lines().collect();
    let col = lines[0].find("PROXY").unwrap_or_else(|| panic!("{out}"));
    assert!(lines[1][col..].starts_with("pg-1 "), "{out}");
    assert!(lines[2][col..].starts_with("pg-2 "), "{out}");
    let (_, out) = run_files(&files[..1], &["--summary", "--format", "table"]);
    assert!(!out.contains("PROXY"), "one node, no column: {out}");
}
