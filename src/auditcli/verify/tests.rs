//! `verify` against logs built line by line with the writer's own
//! stamping, then damaged the ways an intruder or an accident would.

use super::*;
use crate::audit::chain::{stamp, Link, Signer};
use serde_json::json;

/// A log being built: each line stamped as the writer stamps it.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    head: Option<Link>,
    n: u64,
}

impl Log {
    fn push(&mut self, mut body: serde_json::Value) {
        self.n += 1;
        body["ts"] = format!("2026-12-07T10:00:00.{:06}Z", self.n).into();
        let (line, link) = stamp(&serde_json::to_vec(&body).unwrap(), self.head);
        self.head = Some(link);
        self.lines.push(String::from_utf8(line).unwrap().trim_end().to_owned());
    }

    fn records(&mut self, count: usize) {
        for _ in 0..count {
            let n = self.n;
            self.push(json!({"ts": "", "event": "session_denied", "detail": format!("record {n}"),
                "session_id": "00000000000000a1"}));
        }
    }

    fn checkpoint(&mut self, signer: &Signer) {
        let head = self.head.unwrap();
        let signature = signer.sign(head.seq + 1, &head.hash);
        self.push(json!({"ts": "", "event": "checkpoint", "records": 1,
            "signing_key": signer.public_key(), "signature": signature}));
    }

    fn text(&self, range: std::ops::Range<usize>) -> String {
        joined(&self.lines[range])
    }
}

/// Lines as a file holds them.
fn joined(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn check(files: &[(&str, String)], key: Option<&str>, shipped: Option<&str>) -> Report {
    let files =
        files.iter().map(|(n, t)| (n.to_string(), std::io::Cursor::new(t.clone().into_bytes()))).collect();
    verify(files, key, shipped).unwrap()
}

fn ten() -> Log {
    let mut log = Log::default();
    log.records(10);
    log
}

#[test]
fn a_whole_log_verifies() {
    let log = ten();
    let r = check(&[("a", log.text(0..10))], None, None);
    assert!(r.whole(), "{}", r.render());
    assert_eq!(r.records, 10);
    assert!(
        r.render().ends_with("whole: 10 records, 0 signed checkpoints (no signing key)\n"),
        "{}",
        r.render()
    );
}

#[test]
fn an_edited_line_is_named() {
    let log = ten();
    let text = log.text(0..10).replace("record 4\"", "record 9\"");
    let r = check(&[("a", text)], None, None);
    assert!(!r.whole());
    assert!(r.problems[0].starts_with("a:5: changed"), "{}", r.render());
}

#[test]
fn a_deleted_line_is_named() {
    let log = ten();
    let mut lines = log.lines.clone();
    lines.remove(3);
    let text = joined(&lines);
    let r = check(&[("a", text)], None, None);
    assert!(
        r.problems[0].starts_with("a:4: 1 record(s) missing before this line (seq 5 follows 3)"),
        "{}",
        r.render()
    );
}

#[test]
fn a_reordered_pair_is_named() {
    let log = ten();
    let mut lines = log.lines.clone();
    lines.swap(5, 6);
    let text = joined(&lines);
    let r = check(&[("a", text)], None, None);
    assert!(
        r.problems[0].starts_with("a:6: 1 record(s) missing before this line (seq 7 follows 5)"),
        "{}",
        r.render()
    );
    assert!(r.problems[1].starts_with("a:7: out of order (seq 6 after 7)"), "{}", r.render());
}

#[test]
fn rotated_files_are_ordered_and_a_missing_one_is_named() {
    let mut log = Log::default();
    log.records(15);
    let (f1, f2, f3) = (log.text(0..5), log.text(5..10), log.text(10..15));
    let r = check(
        &[("audit.jsonl", f3.clone()), ("audit.jsonl.2", f1.clone()), ("audit.jsonl.1", f2)],
        None,
        None,
    );
    assert!(r.whole(), "{}", r.render());
    let order: Vec<&str> = r.order.iter().map(|o| o.split(':').next().unwrap()).collect();
    assert_eq!(order, ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]);
    let r = check(&[("audit.jsonl", f3), ("audit.jsonl.2", f1)], None, None);
    assert_eq!(
        r.problems,
        ["a rotated file is missing between audit.jsonl.2 and audit.jsonl: records seq 6..10 are not in any file given"]
    );
}

#[test]
fn an_edit_at_a_file_boundary_is_named() {
    let mut log = Log::default();
    log.records(6);
    let f1 = log.text(0..3).replace("record 2\"", "record 7\"");
    let r = check(&[("old", f1), ("new", log.text(3..6))], None, None);
    assert!(r.problems[0].starts_with("old:3: changed"), "{}", r.render());
}

#[test]
fn a_torn_fragment_is_skipped_but_an_edited_non_record_is_not() {
    let log = ten();
    let mut lines = log.lines.clone();
    lines.insert(4, lines[4][..20].to_owned());
    let text = joined(&lines);
    let r = check(&[("a", text)], None, None);
    assert!(r.whole(), "{}", r.render());
    assert!(r.notes[0].starts_with("a:5: not a record, skipped"), "{}", r.render());
    // A record turned into garbage does not pass for a torn write.
    let mut lines = log.lines.clone();
    lines[4] = "garbage".into();
    let text = joined(&lines);
    let r = check(&[("a", text)], None, None);
    assert!(r.problems[0].starts_with("a:5: not a record, and the chain does not skip it"), "{}", r.render());
}

#[test]
fn signatures_checkpoints_and_a_deleted_tail() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::generate(&dir.path().join("k.pem")).unwrap();
    let mut log = Log::default();
    log.records(4);
    log.checkpoint(&signer); // seq 5
    log.records(4);
    log.checkpoint(&signer); // seq 10
    log.records(2);
    let key = signer.public_key();
    let r = check(&[("a", log.text(0..12))], Some(key), None);
    assert!(r.whole(), "{}", r.render());
    assert_eq!(r.checkpoints, 2);
    assert!(
        r.notes.iter().any(|n| n.contains("2 record(s) after the last checkpoint (seq 10)")),
        "{}",
        r.render()
    );

    // Another key's log: refused when ours is pinned.
    let other = Signer::generate(&dir.path().join("o.pem")).unwrap();
    let r = check(&[("a", log.text(0..12))], Some(other.public_key()), None);
    assert!(r.problems[0].contains("a:5: checkpoint seq 5: the signature does not verify"), "{}", r.render());

    // The tail (with the second checkpoint) deleted: the chain alone cannot
    // tell, a shipped copy of that checkpoint can.
    let truncated = log.text(0..7);
    let r = check(&[("a", truncated.clone())], Some(key), None);
    assert!(r.whole(), "a deleted tail is invisible without shipped checkpoints: {}", r.render());
    let shipped = format!(
        "Dec  7 10:00:01 host tailgres[42]: {}\nDec  7 10:00:02 host tailgres[42]: {}\n",
        log.lines[4], log.lines[9]
    );
    let r = check(&[("a", truncated)], Some(key), Some(&shipped));
    assert_eq!(r.problems.len(), 1, "{}", r.render());
    assert!(
        r.problems[0]
            .starts_with("the logs end at seq 7 (a:7), but shipped checkpoint (line 2) seq 10 was shipped"),
        "{}",
        r.render()
    );
    // Shipped inside a JSON log line's field works too.
    let json_log = serde_json::to_string(&json!({"fields": {"checkpoint": log.lines[9]}})).unwrap();
    let r = check(&[("a", log.text(0..12))], Some(key), Some(&json_log));
    assert!(r.whole(), "{}", r.render());
}

#[test]
fn a_bad_key_is_a_usage_error() {
    let files = vec![("a".to_string(), std::io::Cursor::new(Vec::new()))];
    assert!(verify(files, Some("ed25519:short"), None).is_err());
}
