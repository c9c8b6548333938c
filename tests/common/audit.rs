//! Audit log checks for integration and end-to-end tests: every line of a
//! JSON-lines audit log must validate against `audit-schema.json`.
//!
//! Tests assert on audit JSON, never on log text (house style): read the
//! log with [`validate_lines`], then look at the values.
#![allow(dead_code)]

use jsonschema::Validator;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `audit-schema.json` at the repository root.
pub fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("audit-schema.json")
}

/// The compiled schema, with `format` asserted (2020-12 only annotates it
/// by default). Panics if the schema is not itself valid JSON Schema.
pub fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let path = schema_path();
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let schema: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("{} is not a valid JSON Schema: {e} at {}", path.display(), e.instance_path);
        }
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("compiling {}: {e}", path.display()))
    })
}

/// Every way `record` breaks the schema, as "path: message" (empty: valid).
pub fn errors(record: &Value) -> Vec<String> {
    validator().iter_errors(record).map(|e| format!("{}: {e}", e.instance_path)).collect()
}

/// Panics, naming `what` and each error, unless `record` is valid.
pub fn validate_value(record: &Value, what: &str) {
    let errs = errors(record);
    assert!(errs.is_empty(), "{what} breaks audit-schema.json:\n  {}\n{record}", errs.join("\n  "));
}

/// Reads a JSON-lines audit log, validates every line against the schema
/// and returns the records in file order. Panics with the line number and
/// the offending line on any failure: a line that is not JSON, breaks the
/// schema, is blank, or is the file's unterminated tail.
pub fn validate_lines(path: &Path) -> Vec<Value> {
    validate_text(&read(path), path)
}

/// How long the tests' live reads wait for a torn last line to complete.
pub const LIVE_TAIL_WAIT: Duration = Duration::from_secs(5);

/// [`validate_lines`] for a log the proxy may be writing right now. A
/// reader can see a `write(2)` to a regular file half done, so an
/// unterminated tail is read again until the line is complete; it is
/// still a failure if the tail stays unterminated for `settle`.
pub fn validate_live_lines(path: &Path, settle: Duration) -> Vec<Value> {
    let deadline = Instant::now() + settle;
    let mut text = read(path);
    while !text.is_empty() && !text.ends_with('\n') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        text = read(path);
    }
    validate_text(&text, path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading audit log {}: {e}", path.display()))
}

/// Whether `record` is one of the log's own records (`log_opened`,
/// `checkpoint`) rather than a session's.
pub fn is_log_record(record: &Value) -> bool {
    matches!(record["event"].as_str(), Some("log_opened" | "checkpoint"))
}

/// The session records of `text`, after [`validate_all_text`].
fn validate_text(text: &str, path: &Path) -> Vec<Value> {
    validate_all_text(text, path).into_iter().filter(|v| !is_log_record(v)).collect()
}

/// Every record of a log, the log's own included, each validated against
/// the schema and chained to the line before it in the file (`seq` one
/// more, `prev` its SHA-256).
pub fn validate_all_lines(path: &Path) -> Vec<Value> {
    validate_all_text(&read(path), path)
}

fn validate_all_text(text: &str, path: &Path) -> Vec<Value> {
    if !text.is_empty() && !text.ends_with('\n') {
        let tail = text.rsplit('\n').next().unwrap_or_default();
        panic!("audit log {} ends with an unterminated line: {tail}", path.display());
    }
    let mut before: Option<(&str, u64)> = None;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let what = format!("{}:{}", path.display(), i + 1);
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {line}"));
            validate_value(&value, &what);
            let seq = value["seq"].as_u64().unwrap_or_else(|| panic!("{what} has no seq: {line}"));
            if let Some((prev_line, prev_seq)) = before {
                let hash =
                    tailgres::audit::chain::hex(&tailgres::audit::chain::line_hash(prev_line.as_bytes()));
                assert_eq!(seq, prev_seq + 1, "{what}: seq does not follow the line before");
                assert_eq!(
                    value["prev"].as_str(),
                    Some(hash.as_str()),
                    "{what}: prev is not the line before's SHA-256"
                );
            }
            before = Some((line, seq));
            value
        })
        .collect()
}

/// Runs `tailgres audit ARGS LOG` (which must succeed) and returns the JSON
/// lines it printed (give `--format=json`).
pub fn cli(log: &Path, args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailgres"))
        .arg("audit")
        .args(args)
        .arg(log)
        .output()
        .unwrap();
    assert!(out.status.success(), "tailgres audit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
