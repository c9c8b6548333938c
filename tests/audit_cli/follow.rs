//! `--follow`: appends, rotation by rename, copytruncate, SIGINT.

use super::child::{append, Follower};
use super::fixture::{fixture, path};
use std::io::Write;

#[test]
fn follow_picks_up_appends_and_survives_rotation() {
    let f = fixture();
    let p = &f.path;
    let log =
        Follower::start(&["--who", "*@example.com", "--event", "session_start,session_denied", path(&f)]);
    // What is already there.
    for want in ["s1.start", "s2.start", "s4.denied", "s5.start"] {
        assert_eq!(f.label(&log.next()), want);
    }
    // Appended: a record that does not match, then one that does. Seeing
    // the second without the first shows the filter applies while following.
    append(p, f.line("s3.start"));
    append(p, f.line("s2.start"));
    assert_eq!(f.label(&log.next()), "s2.start");

    // Rotation by rename: the writer keeps appending to the old file until
    // told to reopen; those lines are not lost.
    let rotated = p.with_file_name("audit.jsonl.1");
    std::fs::rename(p, &rotated).unwrap();
    append(&rotated, f.line("s1.start"));
    assert_eq!(f.label(&log.next()), "s1.start");
    // The writer reopens: a new file under the old name, read from its start.
    std::fs::write(p, format!("{}\n{}\n", f.line("s3.start"), f.line("s4.denied"))).unwrap();
    assert_eq!(f.label(&log.next()), "s4.denied");
    // A late line in the rotated file still arrives (the grace period).
    append(&rotated, f.line("s5.start"));
    assert_eq!(f.label(&log.next()), "s5.start");
    // And the new file keeps being followed.
    append(p, f.line("s1.start"));
    assert_eq!(f.label(&log.next()), "s1.start");

    // copytruncate: the same file, emptied and written again (shorter than
    // what was read, which is how truncation is told from growth).
    std::fs::OpenOptions::new().write(true).truncate(true).open(p).unwrap();
    append(p, f.line("s4.denied"));
    assert_eq!(f.label(&log.next()), "s4.denied");

    // A half-written line waits for its end.
    let line = f.line("s2.start");
    let (head, tail) = line.split_at(50);
    std::fs::OpenOptions::new().append(true).open(p).unwrap().write_all(head.as_bytes()).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap()
        .write_all(format!("{tail}\n").as_bytes())
        .unwrap();
    assert_eq!(f.label(&log.next()), "s2.start");

    let (status, stderr, rest) = log.interrupt();
    assert_eq!(status.code(), Some(0), "SIGINT ends following cleanly: {stderr}");
    assert!(rest.is_empty(), "unexpected output: {rest:?}");
    assert!(stderr.contains("was replaced (rotated)"), "{stderr}");
    assert!(stderr.contains("was truncated"), "{stderr}");
    assert!(!stderr.contains("skipped"), "{stderr}");
}

#[test]
fn follow_as_a_table() {
    let f = fixture();
    let log = Follower::start(&["--format", "table", "--event", "session_end", path(&f)]);
    assert!(log.next().starts_with("TIME (UTC)"));
    for want in ["s1.end", "s2.end", "s3.end", "s5.end"] {
        let row = log.next();
        let ts = f.ts(want);
        assert!(row.starts_with(&format!("{}Z  session_end", &ts[..19])), "{want}: {row}");
    }
    append(&f.path, f.line("s3.end"));
    assert!(log.next().contains("upstream_closed (by upstream)"));
    let (status, stderr, _) = log.interrupt();
    assert_eq!(status.code(), Some(0), "{stderr}");
}
