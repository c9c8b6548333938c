//! Records as aligned columns for a person at a terminal.
//!
//! Column widths come from the first rows (up to [`SAMPLE_ROWS`], or fewer
//! when the input pauses), so the table starts promptly and memory stays
//! bounded; a later, wider value widens its column from then on. An
//! optional column (the tailgres node) is shown only when those rows differ
//! in it, or when told to.
#![forbid(unsafe_code)]

use super::entry::Entry;
use crate::audit::rfc3339;
use std::io::{self, Write};
use std::time::SystemTime;

/// Rows held back to size the columns before the first is printed.
pub const SAMPLE_ROWS: usize = 256;
const GAP: &str = "  ";

/// A streaming table: a header, then rows; the last column is not padded.
pub struct Table {
    header: Vec<&'static str>,
    /// Right-aligned columns (numbers).
    right: Vec<bool>,
    widths: Vec<usize>,
    /// Whether each column is printed; settled for optional columns when
    /// the header is.
    shown: Vec<bool>,
    /// Optional columns not yet settled by [`Table::show`].
    optional: Vec<bool>,
    pending: Vec<Vec<String>>,
    started: bool,
}

impl Table {
    pub fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            header: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            widths: columns.iter().map(|c| width(c.0)).collect(),
            shown: vec![true; columns.len()],
            optional: vec![false; columns.len()],
            pending: Vec::new(),
            started: false,
        }
    }

    /// Makes column `i` optional: printed only if the rows sampled before
    /// the header differ in it (unless [`Table::show`] settles it first).
    pub fn optional(mut self, i: usize) -> Table {
        self.optional[i] = true;
        self
    }

    /// Settles whether optional column `i` is printed (before the header is).
    pub fn show(&mut self, i: usize, shown: bool) {
        if !self.started {
            self.optional[i] = false;
            self.shown[i] = shown;
        }
    }

    pub fn row(&mut self, out: &mut impl Write, cells: Vec<String>) -> io::Result<()> {
        for (w, c) in self.widths.iter_mut().zip(&cells) {
            *w = (*w).max(width(c));
        }
        if self.started {
            self.write_row(out, &cells)
        } else {
            self.pending.push(cells);
            if self.pending.len() >= SAMPLE_ROWS {
                self.flush(out)?;
            }
            Ok(())
        }
    }

    /// Widens the columns to fit `rows` (for a table known in full).
    pub fn size_to(&mut self, rows: &[Vec<String>]) {
        for cells in rows {
            for (w, c) in self.widths.iter_mut().zip(cells) {
                *w = (*w).max(width(c));
            }
        }
    }

    /// Prints what is held back (and the header, the first time).
    pub fn flush(&mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.started && !self.pending.is_empty() {
            self.started = true;
            for i in 0..self.optional.len() {
                if std::mem::take(&mut self.optional[i]) {
                    let first = &self.pending[0][i];
                    self.shown[i] = self.pending.iter().any(|r| &r[i] != first);
                }
            }
            let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
            self.write_row(out, &header)?;
        }
        for cells in std::mem::take(&mut self.pending) {
            self.write_row(out, &cells)?;
        }
        Ok(())
    }

    /// Whether any row was printed or is waiting to be.
    pub fn is_empty(&self) -> bool {
        !self.started && self.pending.is_empty()
    }

    fn write_row(&self, out: &mut impl Write, cells: &[String]) -> io::Result<()> {
        let mut line = String::new();
        let last = (0..cells.len()).rev().find(|&i| self.shown[i]).unwrap_or(0);
        let mut first = true;
        for (i, cell) in cells.iter().enumerate() {
            if !self.shown[i] {
                continue;
            }
            if !std::mem::take(&mut first) {
                line.push_str(GAP);
            }
            let pad = self.widths[i].saturating_sub(width(cell));
            if self.right[i] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i < last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        writeln!(out, "{}", line.trim_end())
    }
}

/// Display width, counting characters (close enough for the names and
/// addresses in a log; East Asian wide characters are not measured).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Text from the log made safe to print to a terminal: control characters
/// (a log line may carry whatever a client put in a name or an error) and
/// bidirectional overrides are shown escaped instead of acting on it.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds are what a person reads; the log and `--format json` keep the
/// microseconds.
pub fn time(t: SystemTime) -> String {
    rfc3339(t, false)
}

/// `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `850ms`, `12.3s`, `5m12s`, `2h03m`, `3d04h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{}.{}s", s, ms % 1000 / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The columns of the record table.
pub const RECORD_COLUMNS: &[(&str, bool)] = &[
    ("TIME (UTC)", false),
    ("PROXY", false),
    ("EVENT", false),
    ("WHO", false),
    ("NODE", false),
    ("IP", false),
    ("USER@DATABASE", false),
    ("OUTCOME", false),
    ("TO DB", true),
    ("FROM DB", true),
    ("DURATION", true),
    ("SESSION", false),
    ("DETAIL", false),
];

/// [`RECORD_COLUMNS`]' tailgres node (the record's `node`): optional, shown
/// when the records come from more than one node.
pub const PROXY_COLUMN: usize = 1;

/// The record table, its node column optional.
pub fn records() -> Table {
    Table::new(RECORD_COLUMNS).optional(PROXY_COLUMN)
}

/// One record as a row of [`RECORD_COLUMNS`].
pub fn record_row(e: &Entry) -> Vec<String> {
    let dash = || "-".to_string();
    let user_db = match &e.postgres {
        Some(p) => format!("{}@{}", p.user, p.database),
        None => dash(),
    };
    let outcome = match e.event.as_str() {
        "session_start" => e.client_transport.clone().unwrap_or_default(),
        "session_denied" => {
            join(&[e.reason.as_deref(), e.side.as_deref().map(|s| format!("({s})")).as_deref()])
        }
        "auth_ok" => e.auth_method.clone().unwrap_or_default(),
        "auth_failed" => join(&[e.sqlstate.as_deref(), e.auth_method.as_deref()]),
        "session_end" => {
            join(&[e.reason.as_deref(), e.ended_by.as_deref().map(|s| format!("(by {s})")).as_deref()])
        }
        "statement" => match (e.outcome.as_deref(), &e.command_tag) {
            (Some("error"), _) => join(&[Some("error"), e.sqlstate.as_deref()]),
            (Some("suspended"), _) => "suspended".into(),
            (_, Some(tag)) => match e.rows {
                Some(n) => format!("{tag} {n}"),
                None => tag.clone(),
            },
            _ => String::new(),
        },
        _ => e.reason.clone().unwrap_or_default(),
    };
    // A statement's detail is its text (or why there is none).
    let detail = match (e.event.as_str(), &e.text) {
        ("statement", Some(t)) => t.clone(),
        ("statement", None) => format!("[{}]", e.text_status.as_deref().unwrap_or("no text")),
        _ => e.detail.clone().unwrap_or_default(),
    };
    let took = match (e.duration_ms, e.duration_us) {
        (Some(ms), _) => duration(ms),
        (None, Some(us)) if us < 1000 => format!("{us}µs"),
        (None, Some(us)) => duration(us / 1000),
        (None, None) => String::new(),
    };
    // A cancel's own connection is short-lived; the session it was aimed
    // at is what the operator wants to find.
    let session = match &e.target_session_id {
        Some(target) => format!("{} -> {target}", e.session_id),
        None => e.session_id.clone(),
    };
    vec![
        time(e.time),
        e.proxy.clone().unwrap_or_else(dash),
        e.event.clone(),
        e.who().unwrap_or_else(dash),
        e.node().map_or_else(dash, str::to_owned),
        e.ip().map_or_else(dash, |ip| ip.to_string()),
        user_db,
        outcome,
        e.bytes_client_to_upstream.map(bytes).unwrap_or_default(),
        e.bytes_upstream_to_client.map(bytes).unwrap_or_default(),
        took,
        session,
        detail,
    ]
    .into_iter()
    .map(|c| clean(&c))
    .collect()
}

fn join(parts: &[Option<&str>]) -> String {
    parts.iter().flatten().copied().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_table() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    #[test]
    fn duration_table() {
        let cases = [
            (0, "0ms"),
            (850, "850ms"),
            (12_345, "12.3s"),
            (59_999, "59.9s"),
            (60_000, "1m00s"),
            (312_000, "5m12s"),
            (7_380_000, "2h03m"),
            (273_600_000, "3d04h"),
        ];
        for (ms, want) in cases {
            assert_eq!(duration(ms), want, "{ms}");
        }
    }

    #[test]
    fn clean_table() {
        let cases = [
            ("alice@example.com", "alice@example.com"),
            ("über", "über"),
            ("a\x1b[31mred", "a\\u{1b}[31mred"),
            ("two\nlines", "two\\nlines"),
            ("\u{9b}2J", "\\u{9b}2J"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&[("A", false), ("NUM", true), ("LAST", false)]);
        let mut out = Vec::new();
        t.row(&mut out, vec!["x".into(), "1".into(), "tail".into()]).unwrap();
        t.row(&mut out, vec!["longer".into(), "12345".into(), "".into()]).unwrap();
        assert!(out.is_empty(), "held back until flushed");
        t.flush(&mut out).unwrap();
        t.row(&mut out, vec!["wider still".into(), "7".into(), "z".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "A         NUM  LAST\n\
             x           1  tail\n\
             longer  12345\n\
             wider still      7  z\n"
        );
    }

    #[test]
    fn an_optional_column_shows_only_when_its_values_differ() {
        let table = |rows: &[[&str; 3]], show: Option<bool>| {
            let mut t = Table::new(&[("A", false), ("NODE", false), ("B", false)]).optional(1);
            if let Some(s) = show {
                t.show(1, s);
            }
            let mut out = Vec::new();
            for r in rows {
                t.row(&mut out, r.iter().map(|c| c.to_string()).collect()).unwrap();
            }
            t.flush(&mut out).unwrap();
            // Settled once the header is out: a later row does not change it.
            t.row(&mut out, vec!["z".into(), "pg-9".into(), "w".into()]).unwrap();
            String::from_utf8(out).unwrap()
        };
        let one = [["x", "pg-1", "y"], ["xx", "pg-1", "yy"]];
        let two = [["x", "pg-1", "y"], ["xx", "pg-2", "yy"]];
        assert_eq!(table(&one, None), "A   B\nx   y\nxx  yy\nz   w\n");
        assert_eq!(table(&two, None), "A   NODE  B\nx   pg-1  y\nxx  pg-2  yy\nz   pg-9  w\n");
        assert_eq!(table(&one, Some(true)), "A   NODE  B\nx   pg-1  y\nxx  pg-1  yy\nz   pg-9  w\n");
        assert_eq!(table(&two, Some(false)), "A   B\nx   y\nxx  yy\nz   w\n");
    }
}
