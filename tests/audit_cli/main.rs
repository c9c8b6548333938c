//! `tailgres audit` as an operator runs it: the built binary against an
//! audit log written by the real writer (`AuditLog`) from real `Record`s,
//! so the fixture cannot drift from what the proxy writes. No network.
//!
//! Every record in the fixture has a label; assertions compare the labels
//! of the lines printed with lists written out by hand.

#[path = "../common/audit.rs"]
mod audit_check;
mod child;
mod fixture;
mod fleet;
mod follow;

use child::{audit, drain, wait};
use fixture::{fixture, path, Fixture};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn json_passes_matching_records_through_unchanged() {
    let f = fixture();
    let run = audit(&[path(&f)], None);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout, f.text(), "not a terminal: JSON lines, byte for byte");
    assert_eq!(run.stderr, "");
}

#[test]
fn filters_select_exactly_the_right_records() {
    let f = fixture();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--who", "alice@example.com"],
            &["s1.start", "s1.auth_ok", "s1.end", "s2.start", "s2.auth_ok", "s2.end"],
        ),
        (&["--who", "laptop"], &["s1.start", "s1.auth_ok", "s1.end", "s2.start", "s2.auth_ok", "s2.end"]),
        (&["--who", "fd7a:115c:a1e0::3"], &["s2.start", "s2.auth_ok", "s2.end"]),
        (&["--who", "tag:ci"], &["s3.start", "s3.auth_ok", "c3.cancel", "s3.end"]),
        (&["--who", "nBOB9CNTRL"], &["s4.denied", "s5.start", "s5.auth_failed", "s5.end"]),
        (&["--who", "*@example.com", "--event", "session_end"], &["s1.end", "s2.end", "s5.end"]),
        (&["--who", "100.64.0.99"], &["u1.denied", "u2.denied"]),
        (
            &["--who", "tag:ci", "--who", "100.64.0.99"],
            &["u1.denied", "s3.start", "s3.auth_ok", "c3.cancel", "s3.end", "u2.denied"],
        ),
        (&["--who", "carol@example.com"], &[]),
        (&["--database", "payroll"], &["s4.denied"]),
        (&["-d", "app", "-U", "app_ci"], &["s3.start", "s3.auth_ok", "s3.end"]),
        (&["--user", "bob"], &["s5.start", "s5.auth_failed", "s5.end"]),
        (&["--event", "session_denied"], &["u1.denied", "s4.denied", "u2.denied"]),
        (
            &["--event", "auth_ok", "--event", "auth_failed"],
            &["s1.auth_ok", "s2.auth_ok", "s3.auth_ok", "s5.auth_failed"],
        ),
        (&["-e", "cancel,session_start"], &["s1.start", "s2.start", "s3.start", "c3.cancel", "s5.start"]),
        (&["--session", "5e55000000000003"], &["s3.start", "s3.auth_ok", "c3.cancel", "s3.end"]),
        (&["--session", "5e5500000000003c"], &["c3.cancel"]),
        (
            &["--since", "24h"],
            &[
                "s2.start",
                "s2.auth_ok",
                "s3.start",
                "s3.auth_ok",
                "s2.end",
                "c3.cancel",
                "s3.end",
                "s4.denied",
                "s5.start",
                "s5.auth_failed",
                "s5.end",
                "u2.denied",
            ],
        ),
        (&["--until", "1d"], &["u1.denied", "s1.start", "s1.auth_ok", "s1.end"]),
        (
            &["--since", "4d", "--until", "90m"],
            &["s1.start", "s1.auth_ok", "s1.end", "s2.start", "s2.auth_ok"],
        ),
        (&["--who", "alice@example.com", "--since", "24h", "--event", "session_end"], &["s2.end"]),
    ];
    for (args, want) in cases {
        let mut argv = args.to_vec();
        argv.push(path(&f));
        let run = audit(&argv, None);
        assert!(run.status.success(), "{args:?}: {}", run.stderr);
        assert_eq!(f.labels(&run.stdout), *want, "tailgres audit {args:?}");
    }
    // Absolute times, taken from the records themselves: since is
    // inclusive, until exclusive.
    let (since, until) = (f.ts("s3.start"), f.ts("s4.denied"));
    let run = audit(&["--since", &since, "--until", &until, path(&f)], None);
    assert_eq!(f.labels(&run.stdout), ["s3.start", "s3.auth_ok", "s2.end", "c3.cancel", "s3.end"]);
}

#[test]
fn bad_filters_are_refused_before_reading() {
    let f = fixture();
    let cases: &[(&[&str], &str)] = &[
        (&["--event", "login"], "invalid value 'login' for '--event <EVENT>'"),
        (&["--since", "last week"], "--since: \"last week\" is neither an RFC 3339 time"),
        (&["--since", "1h", "--until", "2h"], "is not before --until 2h: nothing can match"),
        (&["--follow"], "--follow needs a file to follow"),
        (&["--follow", "-"], "--follow needs a file to follow"),
        (&["--follow", "a.jsonl", "b.jsonl"], "--follow follows one file, not 2"),
        (&["--follow", "--summary", "a.jsonl"], "--follow and --summary do not go together"),
        (&["--format", "yaml"], "invalid value 'yaml'"),
    ];
    for (args, needle) in cases {
        let mut argv = args.to_vec();
        if !args.contains(&"--follow") {
            argv.push(path(&f));
        }
        let run = audit(&argv, None);
        assert_eq!(run.status.code(), Some(2), "{args:?}");
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
        assert_eq!(run.stdout, "", "{args:?}");
    }
    // The known events are listed for the operator.
    let run = audit(&["--event", "login", path(&f)], None);
    assert!(
        run.stderr.contains("session_start, session_denied, auth_ok, auth_failed, cancel, session_end"),
        "{}",
        run.stderr
    );
}

fn summary(f: &Fixture, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["--summary", "--format", "json"];
    argv.extend_from_slice(args);
    argv.push(path(f));
    let run = audit(&argv, None);
    assert!(run.status.success(), "{}", run.stderr);
    run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn summary_answers_who_accessed_what_from_which_machine() {
    let f = fixture();
    let row = |who: Value,
               node: Value,
               user: Value,
               db: Value,
               ips: &[&str],
               counts: [u64; 3],
               seen: [&str; 2],
               bytes: [u64; 2]| {
        json!({
            "who": who, "node": node, "ips": ips, "user": user, "database": db, "proxy": "tailgres",
            "sessions": counts[0], "denied": counts[1], "auth_failed": counts[2],
            "first_seen": f.ts(seen[0]), "last_seen": f.ts(seen[1]),
            "bytes_client_to_upstream": bytes[0], "bytes_upstream_to_client": bytes[1],
        })
    };
    let (alice, bob, ci) = (json!("alice@example.com"), json!("bob@example.com"), json!("tag:ci,tag:prod"));
    let (laptop, desk, runner) =
        (json!("laptop.tail1234.ts.net"), json!("desk.tail1234.ts.net"), json!("ci-runner.tail1234.ts.net"));
    let null = Value::Null;
    let all = summary(&f, &[]);
    assert_eq!(
        all,
        [
            row(
                alice.clone(),
                laptop.clone(),
                json!("alice"),
                json!("app"),
                &["100.64.0.3", "fd7a:115c:a1e0::3"],
                [2, 0, 0],
                ["s1.start", "s2.end"],
                [15_000, 570_000]
            ),
            row(
                bob.clone(),
                desk.clone(),
                json!("bob"),
                json!("app"),
                &["100.64.0.9"],
                [1, 0, 1],
                ["s5.start", "s5.end"],
                [0, 0]
            ),
            row(
                bob.clone(),
                desk.clone(),
                json!("postgres"),
                json!("payroll"),
                &["100.64.0.9"],
                [0, 1, 0],
                ["s4.denied", "s4.denied"],
                [0, 0]
            ),
            row(
                ci.clone(),
                runner.clone(),
                null.clone(),
                null.clone(),
                &["100.64.0.7"],
                [0, 0, 0],
                ["c3.cancel", "c3.cancel"],
                [0, 0]
            ),
            row(
                ci.clone(),
                runner.clone(),
                json!("app_ci"),
                json!("app"),
                &["100.64.0.7"],
                [1, 0, 0],
                ["s3.start", "s3.end"],
                [700, 5_000]
            ),
            row(
                null.clone(),
                null.clone(),
                null.clone(),
                null.clone(),
                &["100.64.0.99"],
                [0, 2, 0],
                ["u1.denied", "u2.denied"],
                [0, 0]
            ),
        ]
    );
    // The headline question, for the last day only.
    let day = summary(&f, &["--since", "24h"]);
    assert_eq!(day.len(), 6);
    assert_eq!(
        day[0],
        row(
            alice,
            laptop,
            json!("alice"),
            json!("app"),
            &["fd7a:115c:a1e0::3"],
            [1, 0, 0],
            ["s2.start", "s2.end"],
            [3_000, 90_000]
        )
    );
    assert_eq!(
        (day[5]["denied"].as_u64(), day[5]["first_seen"].as_str()),
        (Some(1), Some(f.ts("u2.denied").as_str()))
    );
    // Filters narrow the summary too.
    let payroll = summary(&f, &["--database", "payroll"]);
    assert_eq!(payroll.len(), 1);
    assert_eq!(payroll[0]["denied"], 1);
}

#[test]
fn summary_table_lines_up() {
    let f = fixture();
    let run = audit(&["--summary", "--format", "table", path(&f)], None);
    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", run.stdout);
    let header = lines[0];
    for col in
        ["WHO", "NODE", "IP", "USER", "DATABASE", "SESSIONS", "DENIED", "AUTH FAILED", "FIRST SEEN (UTC)"]
    {
        assert!(header.contains(col), "{header}");
    }
    let at = |name: &str| header.find(name).unwrap();
    assert!(lines[1][at("NODE")..].starts_with("laptop.tail1234.ts.net "), "{}", run.stdout);
    assert!(lines[1][at("USER")..].starts_with("alice "), "{}", run.stdout);
    assert!(lines[6].starts_with("(unidentified) "), "{}", run.stdout);
    assert!(lines[6][at("IP")..].starts_with("100.64.0.99 "), "{}", run.stdout);
    // Right-aligned counts end under their header's end.
    let sessions_end = at("SESSIONS") + "SESSIONS".len();
    assert_eq!(&lines[1][sessions_end - 1..sessions_end], "2", "{}", run.stdout);
    assert_eq!(&lines[6][at("DENIED") + "DENIED".len() - 1..][..1], "2", "{}", run.stdout);
    assert!(lines[1].contains("14.6 KiB") && lines[1].contains("556.6 KiB"), "{}", lines[1]);
}

#[test]
fn table_shows_each_record_in_aligned_columns_and_defangs_escapes() {
    let f = fixture();
    let run = audit(&["--format", "table", path(&f)], None);
    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + f.lines.len(), "{}", run.stdout);
    let header = lines[0];
    let at = |name: &str| header.find(name).unwrap_or_else(|| panic!("no {name} in {header}"));
    let cell = |row: &str, name: &str| row[at(name)..].split("  ").next().unwrap().to_owned();
    let row = |label: &str| lines[1 + f.lines.iter().position(|(_, l)| *l == label).unwrap()];
    let s1_end = row("s1.end");
    assert_eq!(cell(s1_end, "EVENT"), "session_end");
    assert_eq!(cell(s1_end, "WHO"), "alice@example.com");
    assert_eq!(cell(s1_end, "NODE"), "laptop.tail1234.ts.net");
    assert_eq!(cell(s1_end, "IP"), "100.64.0.3");
    assert_eq!(cell(s1_end, "USER@DATABASE"), "alice@app");
    assert_eq!(cell(s1_end, "OUTCOME"), "client_terminated (by client)");
    assert!(
        s1_end.contains("11.7 KiB") && s1_end.contains("468.8 KiB") && s1_end.contains("10m00s"),
        "{s1_end}"
    );
    assert_eq!(cell(row("s3.start"), "WHO"), "tag:ci,tag:prod");
    assert_eq!(cell(row("s5.auth_failed"), "OUTCOME"), "28P01 md5");
    assert_eq!(cell(row("u2.denied"), "WHO"), "-");
    assert_eq!(cell(row("u2.denied"), "OUTCOME"), "unknown_peer (client)");
    assert!(row("c3.cancel").contains("5e5500000000003c -> 5e55000000000003"), "{}", row("c3.cancel"));
    // The time column is the record's time, to the second.
    let s1_ts = f.ts("s1.end");
    assert_eq!(cell(s1_end, "TIME (UTC)"), format!("{}Z", &s1_ts[..19]));
    // Only the escape's text reaches the terminal.
    assert!(!run.stdout.contains('\u{1b}'), "raw escape printed");
    assert!(row("s4.denied").ends_with("postgres@payroll \\u{1b}[2J"), "{}", row("s4.denied"));
    // Every row's event starts where the header says.
    for l in &lines[1..] {
        assert!(l[at("EVENT")..].starts_with(|c: char| c.is_ascii_lowercase()), "{l}");
        assert_eq!(&l[at("EVENT") - 2..at("EVENT")], "  ", "{l}");
    }
}

#[test]
fn malformed_lines_are_reported_skipped_and_counted() {
    let f = fixture();
    let bad = f.path.with_file_name("bad.jsonl");
    let good = |label| f.line(label).as_bytes().to_vec();
    let half = &f.line("s2.start")[..40];
    let mut text = Vec::new();
    for part in [
        good("s1.start"),                  // 1
        b"garbage".to_vec(),               // 2
        b"{\"ts\":\"\xff\xfe\"}".to_vec(), // 3: not UTF-8
        b"   ".to_vec(),                   // 4: blank, ignored
        b"[]".to_vec(),                    // 5
        half.as_bytes().to_vec(),          // 6: torn
        good("s1.end"),                    // 7
    ] {
        text.extend(part);
        text.push(b'\n');
    }
    text.extend(good("u2.denied")); // 8, unterminated: still a record
    std::fs::write(&bad, &text).unwrap();
    let name = bad.display().to_string();

    let run = audit(&[&name], None);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert_eq!(f.labels(&run.stdout), ["s1.start", "s1.end", "u2.denied"]);
    for n in [2, 3, 5, 6] {
        assert!(run.stderr.contains(&format!("{name}:{n}: skipped")), "line {n}: {}", run.stderr);
    }
    for n in [1, 4, 7, 8] {
        assert!(!run.stderr.contains(&format!("{name}:{n}:")), "line {n}: {}", run.stderr);
    }
    assert!(run.stderr.contains(&format!("{name}:3: skipped: not UTF-8")), "{}", run.stderr);
    assert!(run.stderr.contains("4 lines skipped"), "{}", run.stderr);

    let run = audit(&["--lenient", &name], None);
    assert_eq!(run.status.code(), Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("4 lines skipped"), "still reported: {}", run.stderr);

    // Many bad lines: the first few are shown, all are counted.
    let junk = "junk\n".repeat(500);
    let run = audit(&["-"], Some(junk.as_bytes()));
    assert_eq!(run.status.code(), Some(1));
    assert!(run.stderr.contains("<stdin>:20: skipped"), "{}", run.stderr);
    assert!(!run.stderr.contains("<stdin>:21: skipped"), "{}", run.stderr);
    assert!(run.stderr.contains("500 lines skipped"), "{}", run.stderr);
}

#[test]
fn inputs_are_read_in_order_and_unreadable_ones_reported() {
    let f = fixture();
    let missing = f.path.with_file_name("missing.jsonl");
    let missing = missing.to_str().unwrap();
    // stdin between two files, with a filter.
    let cancel = format!("{}\n", f.line("c3.cancel"));
    let run = audit(
        &["--event", "cancel,session_denied", path(&f), "-", missing, path(&f)],
        Some(cancel.as_bytes()),
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert_eq!(
        f.labels(&run.stdout),
        [
            "u1.denied",
            "c3.cancel",
            "s4.denied",
            "u2.denied",
            "c3.cancel",
            "u1.denied",
            "c3.cancel",
            "s4.denied",
            "u2.denied"
        ]
    );
    assert!(
        run.stderr.contains(&format!("cannot read {missing}: No such file or directory")),
        "{}",
        run.stderr
    );
    // No file: standard input.
    let run = audit(&["--who", "tag:ci"], Some(f.text().as_bytes()));
    assert!(run.status.success());
    assert_eq!(f.labels(&run.stdout), ["s3.start", "s3.auth_ok", "c3.cancel", "s3.end"]);
    // A directory is not a log.
    let dir = f.path.parent().unwrap().to_str().unwrap().to_owned();
    let run = audit(&[&dir], None);
    assert_eq!(run.status.code(), Some(2));
    assert!(run.stderr.contains(&format!("cannot read {dir}: Is a directory")), "{}", run.stderr);
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    let f = fixture();
    let big = f.path.with_file_name("big.jsonl");
    std::fs::write(&big, f.text().repeat(500)).unwrap(); // a few MB: more than a pipe holds
    let mut child = Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .args(["audit", big.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(f.label(first.trim_end()), "u1.denied");
    // The reader is gone (as after `| head -1`).
    let err = drain(child.stderr.take().unwrap());
    let status = wait(&mut child);
    let stderr = err.join().unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn help_explains_with_examples() {
    let run = audit(&["--help"], None);
    assert!(run.status.success());
    for needle in [
        "tailgres audit --summary --since 24h /var/log/tailgres/audit.jsonl",
        "Examples:",
        "--who <PATTERN>",
        "--node <NAME>",
        "tailgres audit pg-1/audit.jsonl pg-2/audit.jsonl --since 1h",
        "--follow",
        "[possible values: session_start, session_denied, auth_ok, auth_failed, cancel, session_end, statement, log_opened, checkpoint]",
        "Exit status:",
    ] {
        assert!(run.stdout.contains(needle), "{needle:?} not in:\n{}", run.stdout);
    }
}
