//! A fleet's logs read together: two nodes' logs (one of them rotated),
//! written by the real writer, merged by time, filtered by node, shown and
//! summarised per node, and verified as one chain per node.

use super::child::audit;
use super::fixture::{fleet, Fleet};
use serde_json::Value;
use std::process::Command;

#[test]
fn the_nodes_logs_merge_by_time_each_line_unchanged() {
    let f = fleet();
    let p = f.paths();
    let run = audit(&p, None);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stderr, "");
    // Every record of both nodes, once, in time order, byte for byte.
    assert_eq!(f.labels(&run.stdout), f.all());
    let nodes: Vec<String> =
        run.stdout.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["node"].to_string()).collect();
    let want: Vec<String> = f.all().iter().map(|l| format!("\"{}\"", Fleet::node(l))).collect();
    assert_eq!(nodes, want, "each record names the node that wrote it");
    assert!(nodes.windows(2).filter(|w| w[0] != w[1]).count() >= 3, "the nodes interleave: {nodes:?}");
    // Given in another order (pg-1's files still oldest first): the same.
    let run = audit(&[p[2], p[0], p[1]], None);
    assert_eq!(f.labels(&run.stdout), f.all());
    // Filters apply to the merged records.
    let run = audit(&[&["--since", "90m"], &p[..]].concat(), None);
    assert_eq!(
        f.labels(&run.stdout),
        [
            "s3.start",
            "s3.auth_ok",
            "s2.end",
            "c3.cancel",
            "s3.end",
            "s4.denied",
            "s5.start",
            "s5.auth_failed",
            "s5.end",
            "u2.denied"
        ]
    );
}

#[test]
fn node_picks_one_nodes_records() {
    let f = fleet();
    let p = f.paths();
    let run = audit(&[&["--node", "pg-2"], &p[..]].concat(), None);
    assert!(run.status.success(), "{}", run.stderr);
    let pg2: Vec<&str> = f.all().into_iter().filter(|l| Fleet::node(l) == "pg-2").collect();
    assert_eq!(f.labels(&run.stdout), pg2);
    let run = audit(&[&["--node", "PG-1", "--event", "session_end"], &p[..]].concat(), None);
    assert_eq!(f.labels(&run.stdout), ["s1.end", "s3.end"]);
    let run = audit(&[&["--node", "pg-*", "--who", "alice@example.com"], &p[..]].concat(), None);
    assert_eq!(
        f.labels(&run.stdout),
        ["s1.start", "s1.auth_ok", "s1.end", "s2.start", "s2.auth_ok", "s2.end"]
    );
    let run = audit(&[&["--node", "pg-3"], &p[..]].concat(), None);
    assert!(run.status.success() && run.stdout.is_empty(), "{}", run.stderr);
}

#[test]
fn the_table_shows_each_records_node_and_the_summary_counts_per_node() {
    let f = fleet();
    let p = f.paths();
    let run = audit(&[&["--format", "table"], &p[..]].concat(), None);
    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let header = lines[0];
    let at = |name: &str| header.find(name).unwrap_or_else(|| panic!("no {name} in {header}"));
    assert!(at("TIME (UTC)") < at("PROXY") && at("PROXY") < at("EVENT"), "{header}");
    let cell = |row: &str, name: &str| row[at(name)..].split("  ").next().unwrap().to_owned();
    let got: Vec<String> = lines[1..].iter().map(|r| cell(r, "PROXY")).collect();
    let want: Vec<&str> = f.all().iter().map(|l| Fleet::node(l)).collect();
    assert_eq!(got, want, "{}", run.stdout);
    // One node's records: no node column.
    let run = audit(&[&["--format", "table", "--node", "pg-1"], &p[..]].concat(), None);
    assert!(!run.stdout.contains("PROXY"), "{}", run.stdout);

    // alice's sessions went to both nodes: one row each.
    let run =
        audit(&[&["--summary", "--format", "json", "--who", "alice@example.com"], &p[..]].concat(), None);
    let rows: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["proxy"].as_str().unwrap(),
                r["database"].as_str().unwrap(),
                r["sessions"].as_u64().unwrap(),
                r["bytes_upstream_to_client"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("pg-1", "app", 1, 480_000), ("pg-2", "app", 1, 90_000)]);
    let run = audit(&[&["--summary", "--format", "table"], &p[..]].concat(), None);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let at = |name: &str| lines[0].find(name).unwrap_or_else(|| panic!("no {name} in {}", lines[0]));
    assert!(lines[1].starts_with("alice@example.com "), "{}", run.stdout);
    assert!(lines[1][at("PROXY")..].starts_with("pg-1 "), "{}", run.stdout);
    assert!(lines[2][at("PROXY")..].starts_with("pg-2 "), "{}", run.stdout);
}

fn verify(args: &[&str]) -> (i32, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_tailgres")).args(["audit", "verify"]).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn verify_checks_each_nodes_chain_on_its_own() {
    let f = fleet();
    let p = f.paths();
    let (code, out) = verify(&[p[1], p[2], p[0]]);
    assert_eq!(code, 0, "{out}");
    let order: Vec<&str> = out.lines().filter(|l| l.starts_with("node ")).collect();
    assert_eq!(order.len(), 3, "{out}");
    assert!(order[0].starts_with(&format!("node pg-1: {}: seq 1..", p[0])), "{out}");
    assert!(order[1].starts_with(&format!("node pg-1: {}: seq ", p[1])), "{out}");
    assert!(order[2].starts_with(&format!("node pg-2: {}: seq 1..", p[2])), "{out}");
    assert!(out.contains("2 nodes, each its own chain: pg-1, pg-2\n"), "{out}");

    // pg-1's rotated file kept elsewhere: pg-1's chain starts later, which
    // is no gap (and pg-2's log, begun first, is not pg-1's past).
    let (code, out) = verify(&[p[1], p[2]]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("note: {}: the oldest file given starts at seq", p[1])), "{out}");

    // A line deleted from pg-2's log is named there.
    let mut lines: Vec<String> = std::fs::read_to_string(p[2]).unwrap().lines().map(str::to_owned).collect();
    lines.remove(3);
    std::fs::write(p[2], lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (code, out) = verify(&p);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("BROKEN: {}:4: 1 record(s) missing before this line (seq 5 follows 3)", p[2])),
        "{out}"
    );
}
