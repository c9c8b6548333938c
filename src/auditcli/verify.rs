//! `tailgres audit verify`: checks the chain (`seq`, `prev`) and the signed
//! checkpoints of one or more audit logs, puts rotated files back in order,
//! and names the first line that breaks them (or the rotated file that is
//! missing).
//!
//! The logs of several nodes (a fleet) can be given together: every node
//! keeps its own chain, so files are grouped by the `node` their records
//! name and each group is put in order and checked on its own (a hash still
//! joins a file to its predecessor whatever its group, so a node renamed
//! between runs stays one chain).
//!
//! What it can show: a line edited, inserted, deleted or moved anywhere but
//! at the very end; a rotated file missing between two given; with a
//! signing key, any rewrite before the last checkpoint (rewriting needs the
//! key); with shipped copies of the checkpoints (`--checkpoints`), a
//! deleted tail. What it cannot: records deleted after the last checkpoint
//! that was shipped, or whole files older than the oldest one given.
#![forbid(unsafe_code)]

use super::input::{Item, Lines};
use crate::audit::chain::{self, line_hash};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read};
use std::path::PathBuf;

const ABOUT: &str =
    "Check that audit logs are whole: the chain of seq/prev hashes and the signed checkpoints";

const LONG_ABOUT: &str = "\
Check that audit logs are whole: every record's seq follows the previous one and its prev is \
the SHA-256 of the previous line; checkpoints carry valid Ed25519 signatures. Give the current \
log and its rotated files in any order: they are put back in order by their chain, and a \
missing file between two is named. The logs of several nodes (a fleet) may be given together: \
each node's files (by the node their records name) are checked as a chain of their own.

Exit status: 0 the logs are whole; 1 something is broken (the first broken line is named); 2 \
bad usage, or a file could not be read.";

const EXAMPLES: &str = "\
Examples:
  tailgres audit verify /var/log/tailgres/audit.jsonl*
  tailgres audit verify --key ed25519:3q2+7w... audit.jsonl.1 audit.jsonl
  # A fleet: every node's logs at once, each node with its own key
  tailgres audit verify --key ed25519:3q2+7w... --key ed25519:Zm9v... pg-1/audit.jsonl* pg-2/audit.jsonl*
  # The checkpoints shipped off the host (e.g. from the proxy's own log) show a deleted tail:
  journalctl -u tailgres -o cat | grep 'audit checkpoint' > shipped.txt
  tailgres audit verify --checkpoints shipped.txt /var/log/tailgres/audit.jsonl*";

/// Arguments of `tailgres audit verify`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tailgres audit verify", bin_name = "tailgres audit verify", about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct VerifyArgs {
    /// The audit log and its rotated files, in any order (uncompressed).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// The checkpoint key to trust (`ed25519:<base64>`, as `tailgres audit keygen` printed
    /// it); repeat it for a fleet whose nodes sign with keys of their own. Without it, the
    /// key in the logs is reported but anyone could have made it.
    #[arg(long, value_name = "KEY")]
    pub key: Vec<String>,
    /// Copies of checkpoint records kept elsewhere (one per line; a prefix before the JSON,
    /// as syslog or journald adds, is fine): each must be in the logs.
    #[arg(long, value_name = "FILE")]
    pub checkpoints: Option<PathBuf>,
}

/// The fields of a chained record the check reads.
#[derive(Debug, Deserialize)]
struct Chained {
    seq: Option<u64>,
    #[serde(default, deserialize_with = "some_value")]
    prev: Option<serde_json::Value>,
    #[serde(default)]
    event: String,
    #[serde(default)]
    ts: String,
    /// The node that wrote it; `None` in logs from before records named it.
    node: Option<String>,
    // log_opened and checkpoint.
    signing_key: Option<String>,
    signature: Option<String>,
}

/// Tells a `"prev": null` (present) from a missing `prev`.
fn some_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub file: String,
    pub line: u64,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A record in the chain.
#[derive(Debug, Clone)]
struct Node {
    at: At,
    seq: u64,
    /// `None`: the first record of a new chain.
    prev: Option<[u8; 32]>,
    hash: [u8; 32],
    ts: String,
}

#[derive(Debug, Clone)]
struct Checkpoint {
    at: At,
    /// The index of the file it is in.
    file: usize,
    /// The node that wrote it.
    node: Option<String>,
    seq: u64,
    prev: Option<[u8; 32]>,
    key: String,
    signature: String,
}

/// What one file holds.
#[derive(Debug, Default)]
struct FileChain {
    name: String,
    /// The node its records name (the last that names one: a file is one
    /// node's, and the chain goes on under the name it ends with).
    node: Option<String>,
    first: Option<Node>,
    last: Option<Node>,
    records: u64,
}

/// The outcome: problems (the first is the first break), notes, figures.
#[derive(Debug, Default)]
pub struct Report {
    /// Breaks, in the order found; empty: the logs are whole.
    pub problems: Vec<String>,
    /// What is worth knowing but breaks nothing.
    pub notes: Vec<String>,
    pub records: u64,
    pub checkpoints: u64,
    /// Files in chain order, each with its seq range.
    pub order: Vec<String>,
    /// Signing keys seen (in order).
    pub keys: Vec<String>,
    /// The nodes whose logs were given, each checked as a chain of its own
    /// (`(no node)` for records from before lines named their node).
    pub nodes: Vec<String>,
}

/// A node as reports name it.
fn node_name(node: &Option<String>) -> &str {
    node.as_deref().unwrap_or("(no node)")
}

impl Report {
    pub fn whole(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for o in &self.order {
            let _ = writeln!(s, "{o}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for p in &self.problems {
            let _ = writeln!(s, "BROKEN: {p}");
        }
        if self.nodes.len() > 1 {
            let _ = writeln!(s, "{} nodes, each its own chain: {}", self.nodes.len(), self.nodes.join(", "));
        }
        let keys = if self.keys.is_empty() { "no signing key".to_string() } else { self.keys.join(", ") };
        let _ = writeln!(
            s,
            "{}: {} records, {} signed checkpoints ({keys})",
            if self.whole() { "whole" } else { "NOT WHOLE" },
            self.records,
            self.checkpoints
        );
        s
    }
}

fn parse_hash(v: &serde_json::Value) -> Result<Option<[u8; 32]>, ()> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(h) if h.len() == 64 => {
            let mut out = [0u8; 32];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(h.get(2 * i..2 * i + 2).ok_or(())?, 16).map_err(|_| ())?;
            }
            Ok(Some(out))
        }
        _ => Err(()),
    }
}

/// Checks `files` (name, contents) against each other; `keys` (if any)
/// are the signing keys to trust; `shipped` holds copies of checkpoint
/// records.
pub fn verify<R: Read>(files: Vec<(String, R)>, keys: &[&str], shipped: Option<&str>) -> io::Result<Report> {
    let mut report = Report::default();
    if let Some(k) = keys.iter().find(|k| chain::parse_public_key(k).is_none()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--key {k:?} is not ed25519:<base64 of 32 bytes>"),
        ));
    }
    let mut chains = Vec::new();
    let mut checkpoints = Vec::new();
    let mut opened = Vec::new();
    for (i, (name, r)) in files.into_iter().enumerate() {
        chains.push(read_file(i, name, r, &mut report, &mut checkpoints, &mut opened)?);
    }
    let nodes = Nodes::new(&chains);
    let several = nodes.named.len() > 1;
    // Each file's last record, by its hash: what a next file's first `prev`
    // names. Across nodes too: a hash joins only the file that really came
    // before (a node renamed between runs is still one chain).
    let ends: HashMap<[u8; 32], &Node> =
        chains.iter().filter_map(|c| c.last.as_ref().map(|n| (n.hash, n))).collect();
    for group in &nodes.groups {
        let files: Vec<&FileChain> =
            chains.iter().filter(|c| c.first.is_some() && &nodes.of(&c.node) == group).collect();
        let label = several.then(|| node_name(group));
        order_files(&files, &ends, label, &mut report);
    }
    report.nodes = nodes.groups.iter().map(|n| node_name(n).to_owned()).collect();
    let prefix =
        |node: &Option<String>| if several { format!("node {}: ", node_name(node)) } else { String::new() };

    // Signatures: the keys each node's log_opened records name, in chain order.
    opened
        .sort_by(|a: &Opened, b: &Opened| nodes.of(&a.node).cmp(&nodes.of(&b.node)).then(a.seq.cmp(&b.seq)));
    let mut current: HashMap<Option<String>, &str> = HashMap::new();
    for o in &opened {
        let Some(k) = o.key.as_deref() else { continue };
        if !report.keys.iter().any(|seen| seen == k) {
            report.keys.push(k.to_owned());
        }
        if current.insert(nodes.of(&o.node), k).is_some_and(|before| before != k) {
            report.notes.push(format!("{}: the signing key changes to {k}", o.at));
        }
        if !keys.is_empty() && !keys.contains(&k) {
            report.problems.push(format!("{}: signed with {k}, not {}", o.at, given(keys)));
        }
    }
    // Checkpoints, by the node that wrote them and their seq (every node
    // has a seq 5).
    let mut by_seq: HashMap<(Option<String>, u64), &Checkpoint> = HashMap::new();
    for c in &checkpoints {
        let trusted = keys.is_empty() || keys.contains(&c.key.as_str());
        let ok = trusted && c.prev.is_some_and(|p| chain::verify_checkpoint(&c.key, c.seq, &p, &c.signature));
        if ok {
            report.checkpoints += 1;
        } else {
            report
                .problems
                .push(format!("{}: checkpoint seq {}: the signature does not verify", c.at, c.seq));
        }
        by_seq.insert((nodes.of(&c.node), c.seq), c);
    }
    if keys.is_empty() && !report.keys.is_empty() {
        report.notes.push(
            "signatures were checked against the key the log names; give --key to check it is yours".into(),
        );
    }
    // Each node's last record, and what its last checkpoint leaves unsigned.
    let mut lasts: HashMap<Option<String>, &Node> = HashMap::new();
    for group in &nodes.groups {
        let in_group = |file: usize| &nodes.of(&chains[file].node) == group;
        let last = chains
            .iter()
            .enumerate()
            .filter(|(i, _)| in_group(*i))
            .filter_map(|(_, c)| c.last.as_ref())
            .max_by_key(|n| n.seq);
        let Some(last) = last else { continue };
        lasts.insert(group.clone(), last);
        if let Some(c) = checkpoints.iter().filter(|c| in_group(c.file)).max_by_key(|c| c.seq) {
            if last.seq > c.seq {
                report.notes.push(format!(
                    "{}{} record(s) after the last checkpoint (seq {}) are not signed yet",
                    prefix(group),
                    last.seq - c.seq,
                    c.seq
                ));
            }
        }
    }
    if let Some(text) = shipped {
        check_shipped(text, &by_seq, &nodes, keys, &lasts, &mut report);
    }
    Ok(report)
}

/// "the key given (K)" or "any of the keys given (K1, K2)".
fn given(keys: &[&str]) -> String {
    match keys {
        [k] => format!("the key given ({k})"),
        _ => format!("any of the keys given ({})", keys.join(", ")),
    }
}

/// The nodes whose logs were given: each is checked as a chain of its own.
struct Nodes {
    /// Names the files' records carry.
    named: Vec<String>,
    /// The groups, sorted (`None`: records from before lines named their
    /// node, when they cannot be put with the one node given).
    groups: Vec<Option<String>>,
}

impl Nodes {
    fn new(chains: &[FileChain]) -> Nodes {
        let mut named: Vec<String> = chains.iter().filter_map(|c| c.node.clone()).collect();
        named.sort();
        named.dedup();
        let mut nodes = Nodes { named, groups: Vec::new() };
        let mut groups: Vec<Option<String>> =
            chains.iter().filter(|c| c.first.is_some()).map(|c| nodes.of(&c.node)).collect();
        groups.sort();
        groups.dedup();
        nodes.groups = groups;
        nodes
    }

    /// The group of records that name `node`. Records from before lines
    /// named their node (an upgraded log) belong with the one node given;
    /// with several, they are a group of their own.
    fn of(&self, node: &Option<String>) -> Option<String> {
        match (node, self.named.as_slice()) {
            (None, [only]) => Some(only.clone()),
            _ => node.clone(),
        }
    }
}

/// A `log_opened` record: where, whose, and the key it names.
#[derive(Debug)]
struct Opened {
    at: At,
    node: Option<String>,
    seq: u64,
    key: Option<String>,
}

/// Reads one file, checking its records against each other.
fn read_file<R: Read>(
    file: usize,
    name: String,
    r: R,
    report: &mut Report,
    checkpoints: &mut Vec<Checkpoint>,
    opened: &mut Vec<Opened>,
) -> io::Result<FileChain> {
    let mut fc = FileChain { name: name.clone(), ..FileChain::default() };
    let mut lines = Lines::new(r);
    // A line that is not a record since the last record (torn or edited).
    let mut stray: Option<At> = None;
    // Records from before the log was chained (an older tailgres): the
    // count, and the last one's hash, which the first chained record names.
    let mut unchained = 0u64;
    let mut unchained_hash: Option<[u8; 32]> = None;
    while let Some((number, item)) = lines.next(true)? {
        let at = At { file: name.clone(), line: number };
        let line = match item {
            Item::Line(l) => l,
            Item::TooLong => {
                stray.get_or_insert(at);
                continue;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<Chained>(line) else {
            stray.get_or_insert(at);
            continue;
        };
        let (Some(seq), Some(prev)) = (rec.seq, rec.prev.as_ref()) else {
            if fc.last.is_some() {
                report
                    .problems
                    .push(format!("{at}: a record without seq and prev inside a chained log (inserted?)"));
            } else {
                unchained += 1;
                unchained_hash = Some(line_hash(line));
            }
            continue;
        };
        let Ok(prev) = parse_hash(prev) else {
            report.problems.push(format!("{at}: prev is not a SHA-256 in hex"));
            continue;
        };
        let node = Node { at: at.clone(), seq, prev, hash: line_hash(line), ts: rec.ts.clone() };
        match (&fc.last, unchained_hash, stray.take()) {
            (Some(last), _, stray) => link(last, &node, stray, report),
            // The first chained record names the last unchained one.
            (None, Some(hash), stray) if node.prev == Some(hash) => {
                report.notes.push(format!(
                    "{name}: {unchained} line(s) before line {number} were written before the log was chained"
                ));
                if let Some(s) = stray {
                    report.notes.push(format!("{s}: not a record, skipped by the chain (a write cut short)"));
                }
            }
            (None, Some(_), _) => report
                .problems
                .push(format!("{at}: does not follow the record before it (a line was changed or removed)")),
            // A fragment before a file's first record is a torn write only
            // if a new chain starts after it (the writer found nothing
            // whole to go on from).
            (None, None, Some(s)) if node.prev.is_some() => report
                .problems
                .push(format!("{s}: not a record, and the chain does not skip it (an edited line?)")),
            (None, None, Some(s)) => {
                report.notes.push(format!("{s}: not a record, before a new chain (a write cut short)"))
            }
            (None, None, None) => {}
        }
        // A node's name changes only with its --hostname (between runs);
        // the chain goes on all the same. A log from before records named
        // their node gains one when tailgres is upgraded: nothing to say.
        if let (Some(was), Some(now)) = (&fc.node, &rec.node) {
            if was != now {
                report.notes.push(format!("{at}: the records name node {now} from here on, not {was}"));
            }
        }
        if rec.node.is_some() {
            // The name the chain goes on with: the file's node.
            fc.node = rec.node.clone();
        }
        match rec.event.as_str() {
            "checkpoint" => checkpoints.push(Checkpoint {
                at: at.clone(),
                file,
                node: rec.node.clone(),
                seq,
                prev,
                key: rec.signing_key.unwrap_or_default(),
                signature: rec.signature.unwrap_or_default(),
            }),
            "log_opened" => {
                opened.push(Opened { at: at.clone(), node: rec.node.clone(), seq, key: rec.signing_key })
            }
            _ => {}
        }
        fc.first.get_or_insert_with(|| node.clone());
        fc.last = Some(node);
        fc.records += 1;
        report.records += 1;
    }
    if let Some(s) = stray {
        // Nothing after it to vouch that it is only a cut-off write.
        report.notes.push(format!("{s}: not a record (a write cut short at the end of the file?)"));
    }
    if fc.first.is_none() {
        report.notes.push(format!("{name}: no chained records"));
    }
    Ok(fc)
}

/// Checks that `node` follows `last` (with `stray`, a non-record line
/// between them, if any).
fn link(last: &Node, node: &Node, stray: Option<At>, report: &mut Report) {
    let linked = node.prev == Some(last.hash);
    if node.seq == last.seq + 1 && linked {
        if let Some(s) = stray {
            report.notes.push(format!("{s}: not a record, skipped by the chain (a write cut short)"));
        }
        return;
    }
    let problem = if let Some(s) = stray {
        format!("{s}: not a record, and the chain does not skip it (an edited line?)")
    } else if node.prev.is_none() {
        format!(
            "{}: a new chain (prev null) in the middle of a file: the lines before are not vouched for",
            node.at
        )
    } else if node.seq == last.seq + 1 {
        format!(
            "{}: changed: its SHA-256 is not the prev of the next record ({}), or that prev was changed",
            last.at, node.at
        )
    } else if node.seq > last.seq + 1 {
        let missing = node.seq - last.seq - 1;
        format!(
            "{}: {missing} record(s) missing before this line (seq {} follows {})",
            node.at, node.seq, last.seq
        )
    } else {
        format!("{}: out of order (seq {} after {})", node.at, node.seq, last.seq)
    };
    report.problems.push(problem);
}

/// Puts one node's files in chain order and reports the joins between
/// them. `ends` holds every file's last record (of every node), by hash;
/// `label` names the node when several were given.
fn order_files(
    files: &[&FileChain],
    ends: &HashMap<[u8; 32], &Node>,
    label: Option<&str>,
    report: &mut Report,
) {
    let mut with: Vec<&FileChain> = files.iter().copied().filter(|c| c.first.is_some()).collect();
    // Oldest first by their first record; the chain then says who follows whom.
    with.sort_by(|a, b| {
        let (fa, fb) = (a.first.as_ref().map(|n| &n.ts), b.first.as_ref().map(|n| &n.ts));
        fa.cmp(&fb).then_with(|| a.first.as_ref().map(|n| n.seq).cmp(&b.first.as_ref().map(|n| n.seq)))
    });
    for (i, c) in with.iter().enumerate() {
        let (Some(first), Some(last)) = (&c.first, &c.last) else { continue };
        let node = label.map(|n| format!("node {n}: ")).unwrap_or_default();
        report
            .order
            .push(format!("{node}{}: seq {}..{} ({} records)", c.name, first.seq, last.seq, c.records));
        let Some(prev) = first.prev else {
            if i > 0 {
                report.notes.push(format!(
                    "{}: a new chain starts here (tailgres started on an empty log): the files before it do not vouch for it",
                    first.at
                ));
            }
            continue;
        };
        if let Some(pl) = ends.get(&prev) {
            // Its predecessor is given (the hash joins them): the seq must
            // follow too.
            if first.seq != pl.seq + 1 {
                report.problems.push(format!(
                    "{}: seq {} does not follow {} (seq {})",
                    first.at, first.seq, pl.at, pl.seq
                ));
            }
            continue;
        }
        if i == 0 {
            if first.seq > 1 {
                report.notes.push(format!(
                    "{}: the oldest file given starts at seq {}; earlier files are not part of this check",
                    c.name, first.seq
                ));
            }
            continue;
        }
        // Not linked to any file given: what came before it, by time?
        let before =
            with[..i].iter().filter_map(|p| p.last.as_ref().map(|l| (p, l))).max_by_key(|(_, l)| l.seq);
        match before {
            Some((p, l)) if first.seq > l.seq + 1 => report.problems.push(format!(
                "a rotated file is missing between {} and {}: records seq {}..{} are not in any file given",
                p.name,
                c.name,
                l.seq + 1,
                first.seq - 1
            )),
            Some((_, l)) if first.seq == l.seq + 1 => report.problems.push(format!(
                "{}: changed: its SHA-256 is not the prev of the next record ({}), or that prev was changed",
                l.at, first.at
            )),
            _ => report.problems.push(format!(
                "{}: seq {} follows no record in the files given (prev {})",
                first.at,
                first.seq,
                chain::hex(&prev)
            )),
        }
    }
}

/// Checks the shipped copies of checkpoints against the logs (each against
/// the node that wrote it).
fn check_shipped(
    text: &str,
    logged: &HashMap<(Option<String>, u64), &Checkpoint>,
    nodes: &Nodes,
    keys: &[&str],
    lasts: &HashMap<Option<String>, &Node>,
    report: &mut Report,
) {
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let Some(cp) = shipped_checkpoint(line) else { continue };
        count += 1;
        let (Some(seq), Some(sig)) = (cp.seq, cp.signature.as_deref()) else { continue };
        let prev = cp.prev.as_ref().and_then(|p| parse_hash(p).ok().flatten());
        let key = cp.signing_key.as_deref().unwrap_or_default();
        let trusted = keys.is_empty() || keys.contains(&key);
        let valid = trusted && prev.is_some_and(|p| chain::verify_checkpoint(key, seq, &p, sig));
        let node = nodes.of(&cp.node);
        let whose =
            if nodes.named.len() > 1 { format!(" of node {}", node_name(&node)) } else { String::new() };
        let at = format!("shipped checkpoint (line {}){whose} seq {seq}", i + 1);
        if !valid {
            report.problems.push(format!("{at}: its signature does not verify"));
            continue;
        }
        match (logged.get(&(node.clone(), seq)), lasts.get(&node)) {
            (Some(c), _) if c.signature == sig && c.prev == prev => {}
            (Some(c), _) => report.problems.push(format!("{}: is not the checkpoint shipped as {at}", c.at)),
            (None, Some(l)) if l.seq < seq => report.problems.push(format!(
                "the logs end at seq {} ({}), but {at} was shipped: records after {} were deleted",
                l.seq, l.at, l.at
            )),
            (None, _) => report.problems.push(format!("{at} is not in the logs (its record was replaced)")),
        }
    }
    if count == 0 {
        report.problems.push("--checkpoints: no checkpoint records found in that file".into());
    }
}

/// A checkpoint record in a line of someone else's log: the JSON may
/// follow a prefix, or sit in a JSON log's field as a string.
fn shipped_checkpoint(line: &str) -> Option<Chained> {
    let start = line.find('{')?;
    let value: serde_json::Value =
        serde_json::Deserializer::from_str(&line[start..]).into_iter().next()?.ok()?;
    find_checkpoint(&value, 0)
}

fn find_checkpoint(v: &serde_json::Value, depth: usize) -> Option<Chained> {
    if depth > 4 {
        return None;
    }
    match v {
        serde_json::Value::Object(m) if m.get("event").and_then(|e| e.as_str()) == Some("checkpoint") => {
            serde_json::from_value(v.clone()).ok()
        }
        serde_json::Value::Object(m) => m.values().find_map(|x| find_checkpoint(x, depth + 1)),
        serde_json::Value::String(s) if s.starts_with('{') => {
            find_checkpoint(&serde_json::from_str(s).ok()?, depth + 1)
        }
        _ => None,
    }
}

/// `tailgres audit verify`.
pub fn main(args: VerifyArgs) -> i32 {
    let mut files = Vec::new();
    for path in &args.files {
        match std::fs::File::open(path) {
            Ok(f) => files.push((path.display().to_string(), f)),
            Err(e) => {
                eprintln!("tailgres audit verify: cannot read {}: {e}", path.display());
                return 2;
            }
        }
    }
    let shipped = match &args.checkpoints {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("tailgres audit verify: cannot read --checkpoints {}: {e}", p.display());
                return 2;
            }
        },
        None => None,
    };
    let keys: Vec<&str> = args.key.iter().map(String::as_str).collect();
    match verify(files, &keys, shipped.as_deref()) {
        Ok(report) => {
            print!("{}", report.render());
            if report.whole() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("tailgres audit verify: {e}");
            2
        }
    }
}

/// `tailgres audit keygen FILE`: a new checkpoint signing key.
pub fn keygen(args: &[std::ffi::OsString]) -> i32 {
    let [path] = args else {
        eprintln!("usage: tailgres audit keygen FILE\n  writes a new Ed25519 checkpoint signing key (mode 0600) for --audit-signing-key and prints its public key");
        return 2;
    };
    match chain::Signer::generate(std::path::Path::new(path)) {
        Ok(signer) => {
            println!("{}", signer.public_key());
            eprintln!(
                "wrote {}; give it to tailgres as --audit-signing-key, and keep the public key above for `tailgres audit verify --key`",
                std::path::Path::new(path).display()
            );
            0
        }
        Err(e) => {
            eprintln!("tailgres audit keygen: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests;
