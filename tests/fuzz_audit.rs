//! Fuzz target: the audit reader (`tailgres audit`): its line reader
//! (`auditcli::Lines`), its record parser (`auditcli::Entry::parse`), its
//! time parsers, its glob, and whole runs over generated log files.
//!
//! The audit log carries strings a client chose (database and user names
//! from the StartupMessage, application names) and may be damaged (a
//! crash mid-line, rotation, another program writing to it), so the
//! reader's input is hostile too. Properties:
//! - nothing panics, whatever the bytes;
//! - lines read in any pieces join back to the input, and lines over
//!   `MAX_LINE` are reported, never held;
//! - a record the writer (`audit::Record`) produces, with arbitrary
//!   strings in every free field, reads back with those strings, its time
//!   (to the microsecond) and its address (round trip);
//! - RFC 3339 times built from a date parse to the instant an independent
//!   calendar computes; `--since/--until` durations never go before 1970;
//! - the glob agrees with a reference matcher;
//! - `--format json` over a file passes exactly the record lines through,
//!   in order, and counts the rest as malformed; tables and summaries of
//!   the same file complete;
//! - `tailgres audit verify` takes any bytes, accepts a chained log, and
//!   catches any one byte changed before its last line.

mod fuzz;

use fuzz::*;
use proptest::prelude::*;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tailgres::audit::{DenyReason, Event, Peer, PostgresInfo, ProtocolVersion, Record};
use tailgres::auditcli::{
    self, parse_instant, parse_rfc3339, Entry, Filter, Format, Glob, Item, LineError, Lines, Query, Source,
    WhoPattern, MAX_LINE,
};

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/regressions/fuzz_audit.txt");

// ------------------------------------------------------------- lines

/// A reader that returns the data in the given pieces, with Interrupted
/// errors sprinkled in (which the reader must retry).
struct Pieces {
    chunks: std::collections::VecDeque<Vec<u8>>,
    interrupt: bool,
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if std::mem::take(&mut self.interrupt) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let Some(front) = self.chunks.front_mut() else { return Ok(0) };
        let n = front.len().min(buf.len());
        buf[..n].copy_from_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.chunks.pop_front();
            self.interrupt = true;
        }
        Ok(n)
    }
}

fn line_input() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => bytes(40),
            2 => Just(b"\n".to_vec()),
            1 => Just(b"\r\n".to_vec()),
            1 => (1usize..200_000).prop_map(|n| vec![b'x'; n]),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

/// What the reader must return: lines split at '\n', a final
/// unterminated one when the input is complete, None for too long.
fn model_lines(input: &[u8], eof_ends_line: bool) -> Vec<Option<Vec<u8>>> {
    let mut out: Vec<Option<Vec<u8>>> = Vec::new();
    let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    let last = parts.pop().unwrap(); // after the last '\n' (maybe empty)
    for p in parts {
        out.push((p.len() <= MAX_LINE).then(|| p.to_vec()));
    }
    if eof_ends_line && !last.is_empty() {
        out.push((last.len() <= MAX_LINE).then(|| last.to_vec()));
    }
    out
}

fn read_lines(input: &[u8], splits: &[usize], eof_ends_line: bool) -> Vec<Option<Vec<u8>>> {
    let mut lines = Lines::new(Pieces { chunks: split_at_points(input, splits).into(), interrupt: false });
    let mut out = Vec::new();
    let mut number = 0;
    while let Some((n, item)) = lines.next(eof_ends_line).unwrap() {
        number += 1;
        assert_eq!(n, number, "line numbers count from 1 without gaps");
        out.push(match item {
            Item::Line(l) => Some(l.to_vec()),
            Item::TooLong => None,
        });
    }
    out
}

proptest! {
    #![proptest_config(config(600, REGRESSIONS))]

    #[test]
    fn lines_join_back(input in line_input(), splits in proptest::collection::vec(any::<usize>(), 0..8), eof in any::<bool>()) {
        prop_assert_eq!(read_lines(&input, &splits, eof), model_lines(&input, eof));
    }
}

/// Lines around `MAX_LINE`, cut anywhere: the limit is exact.
#[test]
fn lines_at_the_limit() {
    for n in [MAX_LINE - 1, MAX_LINE, MAX_LINE + 1] {
        let mut input = vec![b'y'; n];
        input.extend(b"\nnext\n");
        for splits in [vec![], vec![1], vec![n - 1, n, n + 1], vec![65536, 65537, 131072]] {
            assert_eq!(read_lines(&input, &splits, true), model_lines(&input, true), "{n} {splits:?}");
        }
    }
}

// ----------------------------------------------------------- records

fn free_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_.@-]{0,16}",
        2 => "\\PC{0,16}",
        1 => "[\\x00-\\x1f\"\\\\\u{2028}\u{feff}]{0,8}",
        1 => any::<String>(),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4),
        any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6)
    ]
}

/// Any instant the writer could stamp: 1970 to the end of 9999, to the
/// microsecond.
fn instant() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        (0u64..=253_402_300_799, 0u32..1_000_000),
        (1_700_000_000u64..1_900_000_000, 0u32..1_000_000),
        (
            prop_oneof![Just(0u64), Just(253_402_300_799), Just(951_782_400), Just(4_107_542_399)],
            prop_oneof![Just(0u32), Just(999_999)]
        ),
    ]
    .prop_map(|(s, us)| UNIX_EPOCH + Duration::new(s, us * 1000))
}

#[derive(Debug, Clone)]
struct Rec {
    ts: SystemTime,
    session_id: String,
    detail: String,
    peer_addr: SocketAddr,
    peer: Option<Peer>,
    postgres: Option<PostgresInfo>,
}

fn rec() -> impl Strategy<Value = Rec> {
    let peer = (
        free_text(),
        free_text(),
        free_text(),
        proptest::collection::vec(free_text(), 0..3),
        ip(),
        any::<bool>(),
    )
        .prop_map(|(stable_id, node_name, user_login, tags, tailnet_ip, shared_in)| Peer {
            stable_id,
            node_name,
            user_login,
            user_display_name: "Display".into(),
            tags,
            tailnet_ip,
            os: "linux".into(),
            shared_in,
        });
    let postgres = (free_text(), free_text(), proptest::option::of(free_text()), any::<u32>()).prop_map(
        |(user, database, application_name, code)| PostgresInfo {
            user,
            database,
            application_name,
            protocol: ProtocolVersion::from_code(code),
        },
    );
    (
        instant(),
        free_text(),
        free_text(),
        (ip(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port)),
        proptest::option::of(peer),
        proptest::option::of(postgres),
    )
        .prop_map(|(ts, session_id, detail, peer_addr, peer, postgres)| Rec {
            ts,
            session_id,
            detail,
            peer_addr,
            peer,
            postgres,
        })
}

impl Rec {
    fn record(&self) -> Record {
        let mut r = Record::new(
            self.session_id.clone(),
            self.peer_addr,
            Event::denied(DenyReason::ProtocolError, &self.detail),
        )
        .with_ts(self.ts);
        if let Some(p) = &self.peer {
            r = r.with_peer(p.clone());
        }
        if let Some(p) = &self.postgres {
            r = r.with_postgres(p.clone());
        }
        r
    }
    fn line(&self) -> String {
        self.record().to_json().unwrap()
    }
}

fn check_entry_accessors(e: &Entry) {
    let _ = (e.who(), e.ip(), e.node(), e.db_user(), e.database());
    assert!(e.time >= UNIX_EPOCH);
}

proptest! {
    #![proptest_config(config(1500, REGRESSIONS))]

    #[test]
    fn writer_records_read_back(r in rec()) {
        let line = r.line();
        prop_assert!(!line.contains('\n'), "one record, one line");
        let e = Entry::parse(line.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}: {line}")))?;
        check_entry_accessors(&e);
        prop_assert_eq!(&e.event, "session_denied");
        prop_assert_eq!(&e.session_id, &r.session_id);
        prop_assert_eq!(e.detail.as_deref(), Some(r.detail.as_str()));
        prop_assert_eq!(e.time, r.ts, "the time, to the microsecond");
        match &r.peer {
            Some(p) => {
                let v = e.peer.as_ref().unwrap();
                prop_assert_eq!((&v.stable_id, &v.node_name, &v.user_login, &v.tags), (&p.stable_id, &p.node_name, &p.user_login, &p.tags));
                prop_assert_eq!(e.ip(), Some(p.tailnet_ip));
            }
            None => {
                prop_assert!(e.peer.is_none());
                prop_assert_eq!(e.ip(), Some(r.peer_addr.ip()));
            }
        }
        prop_assert_eq!(e.db_user(), r.postgres.as_ref().map(|p| p.user.as_str()));
        prop_assert_eq!(e.database(), r.postgres.as_ref().map(|p| p.database.as_str()));
    }

    #[test]
    fn entry_parse_never_panics(line in prop_oneof![
        bytes(200),
        rec().prop_flat_map(|r| {
            let line = r.line().into_bytes();
            proptest::collection::vec(mutation(), 1..4).prop_map(move |ms| {
                let mut l = line.clone();
                for m in &ms { mutate(&mut l, m); }
                l
            })
        }),
        json_line(),
    ]) {
        match Entry::parse(&line) {
            Ok(e) => check_entry_accessors(&e),
            Err(LineError::NotUtf8(n)) => {
                let valid = std::str::from_utf8(&line).unwrap_err().valid_up_to();
                prop_assert_eq!(n, valid + 1);
            }
            Err(LineError::BadTime(ts)) => prop_assert!(parse_rfc3339(&ts).is_none()),
            Err(LineError::NoSession) => {
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
                prop_assert!(v.get("session_id").is_none());
            }
            Err(LineError::Json(_) | LineError::TooLong(_)) => {}
        }
    }
}

// ------------------------------------------------------------- verify

/// A chained log of `records` as the writer stamps it, one line each.
fn chained(records: &[Rec]) -> Vec<String> {
    let mut head = None;
    records
        .iter()
        .map(|r| {
            let (line, link) = tailgres::audit::chain::stamp(r.line().as_bytes(), "pg-1", head);
            head = Some(link);
            String::from_utf8(line).unwrap()
        })
        .collect()
}

fn verify_text(text: &[u8]) -> auditcli::verify::Report {
    auditcli::verify::verify(vec![("log".to_string(), io::Cursor::new(text.to_vec()))], &[], None).unwrap()
}

proptest! {
    #![proptest_config(config(400, REGRESSIONS))]

    /// `tailgres audit verify` takes any bytes without panicking.
    #[test]
    fn verify_never_panics(text in bytes(400)) {
        let _ = verify_text(&text).render();
    }

    /// A chained log verifies; changing any one byte of any line but the
    /// last (whose successor would vouch for it) is caught.
    #[test]
    fn verify_catches_any_changed_byte(
        records in proptest::collection::vec(rec(), 2..6),
        pick in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let lines = chained(&records);
        let whole = lines.concat();
        prop_assert!(verify_text(whole.as_bytes()).whole(), "{}", verify_text(whole.as_bytes()).render());
        // Not the last line, nor the newline before it: a last line glued
        // to the one before is a cut-off tail, which no chain can show.
        let span = whole.len() - lines.last().unwrap().len() - 1;
        let at = pick.index(span);
        let mut bent = whole.clone().into_bytes();
        prop_assume!(bent[at] != byte);
        bent[at] = byte;
        let report = verify_text(&bent);
        prop_assert!(!report.whole(), "byte {} of\n{}\nchanged to {:?} passed:\n{}", at, whole, byte as char, report.render());
    }
}

/// JSON objects with the reader's field names holding any JSON value.
fn json_line() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        free_text().prop_map(serde_json::Value::String),
        Just(serde_json::json!("2026-11-23T14:03:07.123456Z")),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(key(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    proptest::collection::btree_map(key(), value, 0..8)
        .prop_map(|m| serde_json::to_vec(&serde_json::Value::Object(m.into_iter().collect())).unwrap())
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "ts",
            "event",
            "session_id",
            "peer_addr",
            "peer",
            "postgres",
            "client_transport",
            "reason",
            "detail",
            "duration_ms",
            "tags",
            "tailnet_ip",
            "user",
            "database",
            "node_name",
            "user_login",
            "stable_id",
            "target_session_id",
            "bytes_client_to_upstream",
        ])
        .prop_map(String::from),
        "[a-z_]{1,8}",
    ]
}

// ------------------------------------------------------------- times

/// Days from 1970-01-01, counted year by year and month by month (an
/// independent calendar, slow and plain).
fn days_since_epoch(y: i64, m: i64, d: i64) -> i64 {
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = |y: i64, m: i64| {
        [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m as usize - 1]
    };
    let mut days = 0;
    for yy in 1970..y {
        days += if leap(yy) { 366 } else { 365 };
    }
    for mm in 1..m {
        days += month_days(y, mm);
    }
    days + d - 1
}

/// hours, minutes, and seconds with fraction digits.
type Clock = (i64, i64, Option<(i64, String)>);

#[derive(Debug, Clone)]
struct Civil {
    y: i64,
    m: i64,
    d: i64,
    time: Option<Clock>,
    sep: char,
    zone: Option<(i64, i64, bool)>, // hours, minutes, negative; None: Z or nothing
    zulu: Option<char>,
}

fn civil() -> impl Strategy<Value = Civil> {
    (
        1970i64..=9999,
        1i64..=12,
        1i64..=31,
        proptest::option::of((0i64..24, 0i64..60, proptest::option::of((0i64..=60, "[0-9]{0,12}")))),
        proptest::sample::select(vec!['T', 't', ' ']),
        proptest::option::of((0i64..24, 0i64..60, any::<bool>())),
        proptest::option::of(proptest::sample::select(vec!['Z', 'z'])),
    )
        .prop_map(|(y, m, d, time, sep, zone, zulu)| Civil { y, m, d, time, sep, zone, zulu })
}

impl Civil {
    fn text(&self) -> String {
        let mut s = format!("{:04}-{:02}-{:02}", self.y, self.m, self.d);
        if let Some((hh, mm, sec)) = &self.time {
            s += &format!("{}{hh:02}:{mm:02}", self.sep);
            if let Some((ss, frac)) = sec {
                s += &format!(":{ss:02}");
                if !frac.is_empty() {
                    s += &format!(".{frac}");
                }
            }
            if let Some(z) = self.zulu {
                s.push(z);
            } else if let Some((oh, om, neg)) = self.zone {
                s += &format!("{}{oh:02}:{om:02}", if neg { '-' } else { '+' });
            }
        }
        s
    }
    fn expected(&self) -> Option<SystemTime> {
        let month_len = days_since_epoch(
            if self.m == 12 { self.y + 1 } else { self.y },
            if self.m == 12 { 1 } else { self.m + 1 },
            1,
        ) - days_since_epoch(self.y, self.m, 1);
        if self.d > month_len {
            return None;
        }
        let mut secs = days_since_epoch(self.y, self.m, self.d) * 86_400;
        let mut nanos = 0u32;
        if let Some((hh, mm, sec)) = &self.time {
            secs += hh * 3600 + mm * 60;
            if let Some((ss, frac)) = sec {
                secs += ss;
                let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
                nanos = digits.parse().unwrap();
            }
            if self.zulu.is_none() {
                if let Some((oh, om, neg)) = self.zone {
                    let off = oh * 3600 + om * 60;
                    secs -= if neg { -off } else { off };
                }
            }
        }
        let secs = u64::try_from(secs).ok()?;
        Some(UNIX_EPOCH + Duration::new(secs, nanos))
    }
}

proptest! {
    #![proptest_config(config(3000, REGRESSIONS))]

    #[test]
    fn rfc3339_parses_to_the_calendar(c in civil()) {
        prop_assert_eq!(parse_rfc3339(&c.text()), c.expected(), "{}", c.text());
    }

    #[test]
    fn times_and_durations_never_panic(
        text in prop_oneof![
            any::<String>(),
            "[0-9:.TZtz+ -]{0,30}",
            "[0-9]{1,25}[a-z]{1,7}([0-9]{1,5}[a-z]{1,3}){0,3}",
            civil().prop_flat_map(|c| {
                let t = c.text().into_bytes();
                proptest::collection::vec(mutation(), 1..3).prop_map(move |ms| {
                    let mut b = t.clone();
                    for m in &ms { mutate(&mut b, m); }
                    String::from_utf8_lossy(&b).into_owned()
                })
            }),
        ],
        now in instant(),
    ) {
        if let Some(t) = parse_rfc3339(&text) {
            prop_assert!(t >= UNIX_EPOCH);
        }
        if let Ok(t) = parse_instant(&text, now) {
            prop_assert!(t >= UNIX_EPOCH);
        }
    }
}

// -------------------------------------------------------------- glob

/// `*` any run, `?` any one character, else literal: a plain dynamic
/// program over characters.
fn reference_glob(p: &[char], t: &[char]) -> bool {
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            m[i][j] = match p[i] {
                '*' => m[i + 1][j] || (j < t.len() && m[i][j + 1]),
                '?' => j < t.len() && m[i + 1][j + 1],
                c => j < t.len() && t[j] == c && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}

proptest! {
    #![proptest_config(config(3000, REGRESSIONS))]

    #[test]
    fn glob_agrees_with_a_reference(pattern in "[ab*?Ü]{0,10}", text in "[abAÜü]{0,12}", fold in any::<bool>()) {
        let g = Glob::new(&pattern, fold);
        let (p, t) = if fold { (pattern.to_ascii_lowercase(), text.to_ascii_lowercase()) } else { (pattern.clone(), text.clone()) };
        let want = reference_glob(&p.chars().collect::<Vec<_>>(), &t.chars().collect::<Vec<_>>());
        prop_assert_eq!(g.matches(&text), want);
    }
}

// --------------------------------------------------------- whole runs

#[derive(Debug, Clone)]
enum LogLine {
    Record(Box<Rec>),
    Garbage(Vec<u8>),
    Blank(String),
    Long(usize),
}

fn log_line() -> impl Strategy<Value = LogLine> {
    prop_oneof![
        6 => rec().prop_map(|r| LogLine::Record(Box::new(r))),
        2 => bytes(80).prop_map(|b| LogLine::Garbage(b.into_iter().filter(|&c| c != b'\n').collect())),
        1 => "[ \t\r]{0,3}".prop_map(LogLine::Blank),
        1 => prop_oneof![70_000usize..70_100, Just(MAX_LINE + 1)].prop_map(LogLine::Long),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    let glob = |fold: bool| "[a-z*?]{0,4}".prop_map(move |p| Glob::new(&p, fold));
    (
        proptest::collection::vec("[a-z*?.:0-9]{0,6}".prop_map(|p| WhoPattern::new(&p)), 0..2),
        proptest::collection::vec(glob(false), 0..2),
        proptest::collection::vec(glob(false), 0..2),
        proptest::option::of(instant()),
        proptest::option::of(instant()),
        proptest::collection::vec(glob(true), 0..2),
        proptest::collection::vec(glob(true), 0..2),
    )
        .prop_map(|(who, databases, users, since, until, sessions, texts)| Filter {
            who,
            databases,
            users,
            events: vec![],
            since,
            until,
            sessions,
            fingerprints: vec![],
            texts,
            nodes: vec![],
        })
}

fn run_file(
    lines: &[LogLine],
    final_newline: bool,
    filter: Filter,
    format: Format,
    summary: bool,
) -> (auditcli::Outcome, Vec<u8>) {
    let mut text = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        match l {
            LogLine::Record(r) => text.extend(r.line().into_bytes()),
            LogLine::Garbage(b) => text.extend(b),
            LogLine::Blank(s) => text.extend(s.as_bytes()),
            LogLine::Long(n) => text.extend(std::iter::repeat_n(b'{', *n)),
        }
        if i + 1 < lines.len() || final_newline {
            text.push(b'\n');
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, &text).unwrap();
    let query = Query {
        sources: vec![Source::File(path)],
        filter,
        format,
        summary,
        statements: summary && text.len() % 2 == 1,
        follow: false,
        lenient: true,
    };
    let mut out = Vec::new();
    let outcome = auditcli::run(&query, &mut out).expect("a readable file runs to the end");
    (outcome, out)
}

proptest! {
    #![proptest_config(config(150, REGRESSIONS))]

    #[test]
    fn json_output_is_the_record_lines(lines in proptest::collection::vec(log_line(), 0..12), final_newline in any::<bool>()) {
        let (outcome, out) = run_file(&lines, final_newline, Filter::default(), Format::Json, false);
        let mut want = Vec::new();
        let (mut records, mut malformed) = (0, 0);
        for l in &lines {
            match l {
                LogLine::Record(r) => {
                    want.extend(r.line().into_bytes());
                    want.push(b'\n');
                    records += 1;
                }
                LogLine::Blank(_) => {}
                LogLine::Garbage(b) if b.iter().all(u8::is_ascii_whitespace) => {}
                LogLine::Garbage(b) => {
                    // Garbage may happen to be a record.
                    if Entry::parse(b).is_ok() {
                        want.extend(b);
                        want.push(b'\n');
                        records += 1;
                    } else {
                        malformed += 1;
                    }
                }
                LogLine::Long(_) => malformed += 1,
            }
        }
        prop_assert_eq!(outcome.records, records);
        prop_assert_eq!(outcome.malformed, malformed);
        prop_assert_eq!(outcome.unreadable, 0);
        prop_assert!(out == want, "json output differs: {} vs {}", preview(&out), preview(&want));
    }

    #[test]
    fn filtered_tables_and_summaries_complete(
        lines in proptest::collection::vec(log_line(), 0..10),
        filter in filter(),
    ) {
        let (all, json) = run_file(&lines, true, filter.clone(), Format::Json, false);
        // Filtered JSON output is whole record lines, each one that
        // the filter passes.
        let text = String::from_utf8(json).unwrap();
        let mut n = 0;
        for l in text.lines() {
            let e = Entry::parse(l.as_bytes()).unwrap();
            prop_assert!(filter.matches(&e));
            n += 1;
        }
        prop_assert_eq!(n, all.records);
        for (format, summary) in [(Format::Table, false), (Format::Table, true), (Format::Json, true)] {
            let (outcome, out) = run_file(&lines, true, filter.clone(), format, summary);
            prop_assert_eq!(outcome, all);
            if summary && format == Format::Json {
                // JSON lines, one object per group.
                for l in String::from_utf8(out).unwrap().lines() {
                    let v: serde_json::Value =
                        serde_json::from_str(l).map_err(|e| TestCaseError::fail(format!("summary JSON: {e}")))?;
                    prop_assert!(v.is_object());
                }
            } else {
                prop_assert!(std::str::from_utf8(&out).is_ok(), "table output is UTF-8");
            }
        }
    }
}
