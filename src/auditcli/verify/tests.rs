//! `verify` against logs built line by line with the writer's own
//! stamping, then damaged the ways an intruder or an accident would.

use super::*;
use crate::audit::chain::{stamp, Link, Signer};
use serde_json::json;

/// A log being built: each line stamped as the writer stamps it.
struct Log {
    lines: Vec<String>,
    head: Option<Link>,
    n: u64,
    node: &'static str,
}

impl Default for Log {
    fn default() -> Log {
        Log::of("tailgres")
    }
}

impl Log {
    /// The log of the node `node`.
    fn of(node: &'static str) -> Log {
        Log { lines: Vec::new(), head: None, n: 0, node }
    }

    fn push(&mut self, mut body: serde_json::Value) {
        self.n += 1;
        body["ts"] = format!("2026-12-07T10:00:00.{:06}Z", self.n).into();
        let (line, link) = stamp(&serde_json::to_vec(&body).unwrap(), self.node, self.head);
        let mut line = String::from_utf8(line).unwrap().trim_end().to_owned();
        if self.node.is_empty() {
            // An older tailgres: lines without a node.
            line = line.replacen(r#","node":"""#, "", 1);
        }
        self.head = Some(Link { seq: link.seq, hash: line_hash(line.as_bytes()) });
        self.lines.push(line);
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
    verify(files, key.as_slice(), shipped).unwrap()
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
    assert!(verify(files, &["ed25519:short"], None).is_err());
}

/// Two nodes of a fleet, each with its own rotated files and its own key:
/// `(pg-1's three files, pg-2's two files)`, checkpoints at seq 5 in both.
fn fleet(k1: &Signer, k2: &Signer) -> (Log, Log) {
    let mut pg1 = Log::of("pg-1");
    pg1.records(4);
    pg1.checkpoint(k1); // seq 5
    pg1.records(10);
    let mut pg2 = Log::of("pg-2");
    pg2.records(4);
    pg2.checkpoint(k2); // seq 5, as pg-1's
    pg2.records(5);
    (pg1, pg2)
}

#[test]
fn each_node_of_a_fleet_is_a_chain_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = Signer::generate(&dir.path().join("k1.pem")).unwrap();
    let k2 = Signer::generate(&dir.path().join("k2.pem")).unwrap();
    let (pg1, pg2) = fleet(&k1, &k2);
    let files = [
        ("pg-2/audit.jsonl", pg2.text(5..10)),
        ("pg-1/audit.jsonl.1", pg1.text(5..10)),
        ("pg-1/audit.jsonl", pg1.text(10..15)),
        ("pg-2/audit.jsonl.1", pg2.text(0..5)),
        ("pg-1/audit.jsonl.2", pg1.text(0..5)),
    ];
    let r = check(&files, None, None);
    assert!(r.whole(), "{}", r.render());
    assert_eq!(
        r.order,
        [
            "node pg-1: pg-1/audit.jsonl.2: seq 1..5 (5 records)",
            "node pg-1: pg-1/audit.jsonl.1: seq 6..10 (5 records)",
            "node pg-1: pg-1/audit.jsonl: seq 11..15 (5 records)",
            "node pg-2: pg-2/audit.jsonl.1: seq 1..5 (5 records)",
            "node pg-2: pg-2/audit.jsonl: seq 6..10 (5 records)",
        ]
    );
    assert_eq!(r.nodes, ["pg-1", "pg-2"]);
    assert_eq!(r.checkpoints, 2);
    assert!(r.render().contains("2 nodes, each its own chain: pg-1, pg-2\n"), "{}", r.render());
    let unsigned: Vec<&String> = r.notes.iter().filter(|n| n.contains("after the last checkpoint")).collect();
    assert_eq!(
        unsigned,
        [
            "node pg-1: 10 record(s) after the last checkpoint (seq 5) are not signed yet",
            "node pg-2: 5 record(s) after the last checkpoint (seq 5) are not signed yet",
        ]
    );
    assert!(!r.notes.iter().any(|n| n.contains("signing key changes")), "{}", r.render());

    // Only pg-2's current file: its older files are elsewhere, which is
    // no gap in pg-1's chain (nor a file missing between the two nodes).
    let r = check(&[files[1].clone(), files[2].clone(), files[4].clone(), files[0].clone()], None, None);
    assert!(r.whole(), "{}", r.render());
    assert!(
        r.notes.iter().any(|n| n == "pg-2/audit.jsonl: the oldest file given starts at seq 6; earlier files are not part of this check"),
        "{}",
        r.render()
    );

    // A file missing in pg-1's chain is named between pg-1's files.
    let r = check(&[files[0].clone(), files[2].clone(), files[3].clone(), files[4].clone()], None, None);
    assert_eq!(
        r.problems,
        ["a rotated file is missing between pg-1/audit.jsonl.2 and pg-1/audit.jsonl: records seq 6..10 are not in any file given"],
        "{}",
        r.render()
    );
}

#[test]
fn a_fleet_pins_each_nodes_key_and_its_shipped_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = Signer::generate(&dir.path().join("k1.pem")).unwrap();
    let k2 = Signer::generate(&dir.path().join("k2.pem")).unwrap();
    let (pg1, mut pg2) = fleet(&k1, &k2);
    pg2.checkpoint(&k2); // seq 11
    let both = [k1.public_key(), k2.public_key()];
    let files = |pg2_lines: std::ops::Range<usize>| {
        vec![
            ("pg-1".to_string(), std::io::Cursor::new(pg1.text(0..15).into_bytes())),
            ("pg-2".to_string(), std::io::Cursor::new(pg2.text(pg2_lines).into_bytes())),
        ]
    };
    let r = verify(files(0..11), &both, None).unwrap();
    assert!(r.whole(), "{}", r.render());
    assert_eq!(r.checkpoints, 3);
    // pg-2's key alone: pg-1's checkpoint is not trusted.
    let r = verify(files(0..11), &both[1..], None).unwrap();
    assert!(
        r.problems.iter().any(|p| p == "pg-1:5: checkpoint seq 5: the signature does not verify"),
        "{}",
        r.render()
    );
    assert!(!r.problems.iter().any(|p| p.starts_with("pg-2")), "{}", r.render());

    // Shipped copies of both nodes' checkpoints at seq 5 each match their
    // own node's; pg-2's log without its tail is caught, and named as pg-2's.
    let shipped = format!("{}\n{}\n{}\n", pg1.lines[4], pg2.lines[4], pg2.lines[10]);
    let r = verify(files(0..11), &both, Some(&shipped)).unwrap();
    assert!(r.whole(), "{}", r.render());
    let r = verify(files(0..8), &both, Some(&shipped)).unwrap();
    assert_eq!(
        r.problems,
        ["the logs end at seq 8 (pg-2:8), but shipped checkpoint (line 3) of node pg-2 seq 11 was shipped: records after pg-2:8 were deleted"],
        "{}",
        r.render()
    );
}

#[test]
fn a_log_from_before_records_named_their_node_goes_with_the_node() {
    let mut log = Log::of(""); // an older tailgres: no node
    log.records(10);
    log.node = "pg-1"; // upgraded, appending to the same file
    log.records(5);
    assert!(!log.lines[0].contains("node") && log.lines[14].contains(r#""node":"pg-1""#));
    let r = check(&[("audit.jsonl", log.text(8..15)), ("audit.jsonl.1", log.text(0..8))], None, None);
    assert!(r.whole(), "{}", r.render());
    assert_eq!(r.nodes, ["pg-1"]);
    assert_eq!(r.order, ["audit.jsonl.1: seq 1..8 (8 records)", "audit.jsonl: seq 9..15 (7 records)"]);
    assert!(r.notes.is_empty(), "{}", r.render());
    // A renamed node (--hostname changed between runs) is one chain, said once.
    let mut log = Log::of("pg-1");
    log.records(3);
    log.node = "db-1";
    log.records(3);
    let r = check(&[("a", log.text(0..6))], None, None);
    assert!(r.whole(), "{}", r.render());
    assert_eq!(r.notes, ["a:4: the records name node db-1 from here on, not pg-1"]);
}
