//! What a statement's record says about its text: PostgreSQL's own grammar
//! (libpg_query, through the `pg_query` crate) splits a simple query into
//! its statements, replaces every literal with `$n`, and fingerprints the
//! statement so that two differing only in literals are one fingerprint.
//!
//! Literals never reach the log by default. Statements that set a role's
//! password are never written at all, in any mode (their fingerprint is);
//! with raw text on, a statement that mentions a password anywhere is
//! written normalized instead. Comments go too (they are free text).
#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// What the log may hold of a statement's text (`--audit-statement-text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextMode {
    /// Literals replaced by `$n` (the default).
    #[default]
    Normalized,
    /// As the client sent it (except what sets or mentions a password).
    Raw,
}

/// How `text` came to be what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextStatus {
    /// Literals replaced by `$n`, comments removed.
    Normalized,
    /// As sent (`--audit-statement-text raw`).
    Raw,
    /// A statement that sets a password: no text.
    Redacted,
    /// PostgreSQL's grammar does not accept it: no text; the fingerprint is
    /// of the text itself.
    Unparsed,
    /// Longer than tailgres keeps: no text; the fingerprint is of the text.
    TooLong,
    /// Run through a prepared statement or portal whose text tailgres did
    /// not see (or not valid UTF-8).
    Unknown,
}

impl TextStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TextStatus::Normalized => "normalized",
            TextStatus::Raw => "raw",
            TextStatus::Redacted => "redacted",
            TextStatus::Unparsed => "unparsed",
            TextStatus::TooLong => "too_long",
            TextStatus::Unknown => "unknown",
        }
    }
}

/// A statement as its record shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub text: Option<String>,
    pub status: TextStatus,
    /// 16 hex digits: pg_query's fingerprint, or the first 64 bits of the
    /// SHA-256 of the text when the grammar does not accept it.
    pub fingerprint: String,
}

impl Described {
    pub fn of_digest(sha256: &[u8; 32], status: TextStatus) -> Described {
        Described { text: None, status, fingerprint: hex8(sha256) }
    }

    pub fn unknown() -> Described {
        Described { text: None, status: TextStatus::Unknown, fingerprint: "0000000000000000".into() }
    }
}

fn hex8(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The statements of a simple query's text, in order (one piece, the
/// whole text, if the grammar cannot split it).
pub fn split(text: &str) -> Vec<&str> {
    match pg_query::split_with_parser(text) {
        Ok(pieces) if !pieces.is_empty() => pieces.into_iter().map(str::trim).collect(),
        _ => vec![text.trim()],
    }
}

/// Describes one statement.
pub fn describe(statement: &str, mode: TextMode) -> Described {
    let fingerprint = match pg_query::fingerprint(statement, 0, 0) {
        Ok(f) => f.hex,
        Err(_) => {
            let digest: [u8; 32] = Sha256::digest(statement.as_bytes()).into();
            return Described::of_digest(&digest, TextStatus::Unparsed);
        }
    };
    let mentions_password = contains_ignore_case(statement, "password");
    if mentions_password && sets_password(statement) {
        return Described { text: None, status: TextStatus::Redacted, fingerprint };
    }
    if mode == TextMode::Raw && !mentions_password {
        return Described { text: Some(statement.to_owned()), status: TextStatus::Raw, fingerprint };
    }
    match pg_query::normalize(statement) {
        Ok(n) => Described { text: Some(strip_comments(&n)), status: TextStatus::Normalized, fingerprint },
        // Parsed for the fingerprint but not normalized: say nothing.
        Err(_) => Described { text: None, status: TextStatus::Unparsed, fingerprint },
    }
}

fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Whether the statement creates or alters a role with a password (or the
/// grammar cannot say: then it counts as one).
fn sets_password(statement: &str) -> bool {
    use pg_query::NodeRef;
    let Ok(parsed) = pg_query::parse(statement, 0) else { return true };
    parsed.protobuf.nodes().iter().any(|(node, ..)| {
        let options = match node {
            NodeRef::CreateRoleStmt(s) => &s.options,
            NodeRef::AlterRoleStmt(s) => &s.options,
            _ => return false,
        };
        options.iter().any(|o| {
            matches!(&o.node, Some(pg_query::NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("password"))
        })
    })
}

/// The text without its comments (`-- …` and `/* … */`), which are free
/// text a client chose.
fn strip_comments(text: &str) -> String {
    if !text.contains("--") && !text.contains("/*") {
        return text.to_owned();
    }
    let Ok(scan) = pg_query::scan(text) else { return text.to_owned() };
    let mut out = String::with_capacity(text.len());
    let mut at = 0usize;
    for t in &scan.tokens {
        let comment = matches!(
            pg_query::protobuf::Token::try_from(t.token),
            Ok(pg_query::protobuf::Token::SqlComment | pg_query::protobuf::Token::CComment)
        );
        if comment {
            let (start, end) = (t.start as usize, t.end as usize);
            if let (Some(before), true) = (text.get(at..start), end <= text.len()) {
                out.push_str(before);
                at = end;
            }
        }
    }
    out.push_str(text.get(at..).unwrap_or(""));
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The statement with each plain number and plain string literal replaced
/// by `?`: two statements with one shape differ only in those literals, so
/// libpg_query normalizes them to one text and one fingerprint. `None`
/// (describe it afresh) for anything this simple scan might misread:
/// comments, dollar quotes, escape/bit/Unicode strings, backslashes, a
/// number glued to a name, and anything that mentions a password (whose
/// statements are never cached). The shape holds no literal.
pub fn shape(statement: &str) -> Option<String> {
    if contains_ignore_case(statement, "password") {
        return None;
    }
    let b = statement.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let glued = i > 0 && ident(b[i - 1]);
        match c {
            b'\\' => return None,
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b'$' if !b.get(i + 1).is_some_and(u8::is_ascii_digit) && !glued => return None,
            b'"' => {
                // A quoted name: copied as it is.
                let end = i + 1 + b[i + 1..].iter().position(|&q| q == b'"')?;
                out.push_str(&statement[i..=end]);
                i = end + 1;
                continue;
            }
            b'\'' => {
                if glued {
                    return None; // E'..', B'..', X'..', U&'..'
                }
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                out.push('?');
                i = j + 1;
                continue;
            }
            b'0'..=b'9' | b'.' if !glued && (c != b'.' || b.get(i + 1).is_some_and(u8::is_ascii_digit)) => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                if j < b.len() && (b[j] == b'e' || b[j] == b'E') {
                    j += 1;
                    if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                        j += 1;
                    }
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                }
                if j < b.len() && ident(b[j]) {
                    return None;
                }
                out.push('?');
                i = j;
                continue;
            }
            _ => {}
        }
        // Copy one character (whole, for UTF-8).
        let n = statement[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&statement[i..i + n]);
        i += n;
    }
    Some(out)
}

/// Descriptions already made, by shape ([`shape`]): a prepared statement
/// run again, or a query an application sends again with other literals,
/// costs a scan and a hash lookup instead of the grammar's work.
pub struct Cache {
    mode: TextMode,
    map: HashMap<String, Described>,
}

impl Cache {
    const MAX: usize = 4096;

    pub fn new(mode: TextMode) -> Cache {
        Cache { mode, map: HashMap::new() }
    }

    pub fn describe(&mut self, statement: &str) -> Described {
        // Raw text is each statement's own: only shapes without literals
        // could be shared, and those are worth no special case.
        let key = match self.mode {
            TextMode::Normalized => shape(statement),
            TextMode::Raw => None,
        };
        let Some(key) = key else { return describe(statement, self.mode) };
        if let Some(d) = self.map.get(&key) {
            return d.clone();
        }
        let d = describe(statement, self.mode);
        // An unparsed statement's fingerprint is its own text's: not shared.
        if d.status == TextStatus::Unparsed {
            return d;
        }
        if self.map.len() >= Self::MAX {
            self.map.clear();
        }
        self.map.insert(key, d.clone());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_placeholders_and_one_fingerprint() {
        let a = describe("SELECT * FROM accounts WHERE id = 42 AND name = 'alice'", TextMode::Normalized);
        let b = describe("select * from accounts where id = 7 and name = 'bob'", TextMode::Normalized);
        assert_eq!(a.status, TextStatus::Normalized);
        assert_eq!(a.text.as_deref(), Some("SELECT * FROM accounts WHERE id = $1 AND name = $2"));
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 16);
        let c = describe("SELECT * FROM accounts WHERE id = 42 OR true", TextMode::Normalized);
        assert_ne!(a.fingerprint, c.fingerprint);
    }

    #[test]
    fn passwords_never_reach_the_text_in_any_mode() {
        for mode in [TextMode::Normalized, TextMode::Raw] {
            for sql in [
                "ALTER ROLE alice PASSWORD 'hunter2'",
                "create user bob with login password 'hunter2' valid until '2030-01-01'",
                "ALTER USER carol PASSWORD 'SCRAM-SHA-256$4096:aGVsbG8=$aGVsbG8=:aGVsbG8='",
                "CREATE ROLE dave ENCRYPTED PASSWORD 'md5c0ffee'",
            ] {
                let d = describe(sql, mode);
                assert_eq!((d.status, d.text), (TextStatus::Redacted, None), "{sql} ({mode:?})");
            }
            // Mentioning a password elsewhere: normalized even in raw mode.
            let d = describe("SELECT * FROM users WHERE password = 'hunter2'", mode);
            assert_eq!(d.text.as_deref(), Some("SELECT * FROM users WHERE password = $1"), "{mode:?}");
        }
    }

    #[test]
    fn raw_mode_keeps_the_text_and_the_fingerprint() {
        let sql = "SELECT 1 + 2";
        let d = describe(sql, TextMode::Raw);
        assert_eq!((d.status, d.text.as_deref()), (TextStatus::Raw, Some(sql)));
        assert_eq!(d.fingerprint, describe(sql, TextMode::Normalized).fingerprint);
    }

    #[test]
    fn what_the_grammar_refuses_has_no_text() {
        let d = describe("SELEC 'secret' FROM nowhere", TextMode::Raw);
        assert_eq!((d.status, &d.text), (TextStatus::Unparsed, &None));
        assert_eq!(d.fingerprint.len(), 16);
        assert_eq!(d, describe("SELEC 'secret' FROM nowhere", TextMode::Normalized));
    }

    #[test]
    fn comments_are_dropped() {
        let d = describe("SELECT 1 /* token=abc */ -- key=def\n + 2", TextMode::Normalized);
        let text = d.text.unwrap();
        assert!(!text.contains("abc") && !text.contains("def"), "{text}");
        assert_eq!(text, "SELECT $1 + $2");
    }

    #[test]
    fn a_simple_query_splits_into_its_statements() {
        assert_eq!(split("BEGIN; SELECT 1;  COMMIT"), ["BEGIN", "SELECT 1", "COMMIT"]);
        assert_eq!(split("SELEC nonsense; SELECT 1"), ["SELEC nonsense; SELECT 1"]);
    }

    #[test]
    fn a_shape_hides_literals_and_refuses_what_it_might_misread() {
        assert_eq!(
            shape("SELECT a FROM t1 WHERE id = 42 AND s = 'it''s' AND x = 1.5e-3 AND p = $1").as_deref(),
            Some("SELECT a FROM t1 WHERE id = ? AND s = ? AND x = ? AND p = $1")
        );
        assert_eq!(
            shape(r#"SELECT "col 1" FROM "t'x" WHERE v = 'é'"#).as_deref(),
            Some(r#"SELECT "col 1" FROM "t'x" WHERE v = ?"#)
        );
        for bail in [
            "SELECT 1 -- c",
            "SELECT 1 /* c */",
            "SELECT $$x$$",
            "SELECT E'\\n'",
            "SELECT x'1F'",
            "SELECT 5a",
            "SELECT 'unterminated",
            "ALTER ROLE r PASSWORD 'x'",
        ] {
            assert_eq!(shape(bail), None, "{bail}");
        }
    }

    #[test]
    fn one_shape_is_one_description() {
        // Every pair with one shape describes the same.
        let pairs = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
            ),
            (
                "select * from t where a = 'x' and b in (1, 2.5)",
                "select * from t where a = '' and b in (300, 0.1)",
            ),
            ("select interval '1 day', -5", "select interval '2 hours', -7"),
            ("insert into t2 values (1, 'a''b')", "insert into t2 values (2, 'c')"),
        ];
        for (a, b) in pairs {
            assert_eq!(shape(a), shape(b), "{a} / {b}");
            assert_eq!(describe(a, TextMode::Normalized), describe(b, TextMode::Normalized), "{a} / {b}");
        }
        let mut cache = Cache::new(TextMode::Normalized);
        let first = cache.describe(pairs[0].0);
        assert_eq!(cache.describe(pairs[0].1), first);
        assert_eq!(cache.map.len(), 1, "one entry for the shape");
        assert!(cache.map.keys().all(|k| !k.contains("12345")), "the cache holds no literal");
    }

    #[test]
    fn functions_dollar_quotes_and_do_blocks_lose_their_bodies() {
        let d = describe("DO $$BEGIN PERFORM pg_sleep(1); END$$", TextMode::Normalized);
        assert_eq!(d.text.as_deref(), Some("DO $1"));
        let d = describe("SELECT set_config('app.secret', 'xyz', false)", TextMode::Normalized);
        assert_eq!(d.text.as_deref(), Some("SELECT set_config($1, $2, $3)"));
    }
}
