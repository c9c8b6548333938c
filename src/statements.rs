//! Statement audit: one `statement` record per statement a session runs,
//! for the sessions the operator chose (`--audit-statements`, or a grant
//! whose value says `"audit": "statements"`).
//!
//! The relay's data path only follows messages ([`tracker`]: no I/O, no
//! copy of the data stream) and hands what finished to a [`Sink`]; the
//! grammar work (splitting, normalizing, fingerprinting: [`describe`]) and
//! the writing happen on the auditor's own thread, off the relay's lock.
//! The sink's queue is bounded: when the auditor is behind, the database
//! side of the session waits (as it would for a slow client), and nothing
//! is dropped. A statement record that cannot be written ends its session
//! (fail closed), and `session_end` is written only after the session's
//! statements ([`Auditor::flush`]).
#![forbid(unsafe_code)]

pub mod describe;
pub mod tracker;

use crate::audit::{AuditLog, Event, Record, SqlState, Statement, StatementCopy, StatementProtocol};
use describe::{Cache, Described, TextMode, TextStatus};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};
use tracker::{CopyDirection, Outcome, Ran, Text, Tracker};

/// Statements that may wait for the auditor before a session's database
/// side waits for it.
pub const QUEUE: usize = 16_384;

/// One session's statement audit: the identity its records carry, and
/// what to do when they cannot be written.
pub struct SessionAudit {
    base: Record,
    on_failure: OnceLock<Box<dyn Fn(String) + Send + Sync>>,
}

impl SessionAudit {
    /// `base`: the session's record (identity, database, transport).
    pub fn new(base: Record) -> Arc<SessionAudit> {
        Arc::new(SessionAudit { base, on_failure: OnceLock::new() })
    }

    /// Called (once per failure, from the auditor's thread) when a record
    /// of this session could not be written: end the session.
    pub fn on_failure(&self, f: Box<dyn Fn(String) + Send + Sync>) {
        let _ = self.on_failure.set(f);
    }

    fn fail(&self, why: String) {
        if let Some(f) = self.on_failure.get() {
            f(why);
        }
    }
}

enum Job {
    Ran { session: Arc<SessionAudit>, ran: Ran },
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The process's statement auditor: one thread, fed by every audited
/// session's [`Sink`].
#[derive(Clone)]
pub struct Auditor {
    tx: SyncSender<Job>,
    mode: TextMode,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor").finish_non_exhaustive()
    }
}

impl Auditor {
    /// Starts the auditor's thread. It writes through `log` (blocking on
    /// `runtime`); it stops when every handle and sink is gone. If the
    /// thread cannot be started, every audited session ends at its first
    /// statement (fail closed).
    pub fn start(log: AuditLog, mode: TextMode, runtime: tokio::runtime::Handle) -> Auditor {
        let (tx, rx) = sync_channel(QUEUE);
        if let Err(e) = std::thread::Builder::new()
            .name("tailgres-statements".into())
            .spawn(move || run(rx, log, Cache::new(mode), runtime))
        {
            tracing::error!(error = %e, "cannot start the statement auditor; sessions with statement audit will end");
        }
        Auditor { tx, mode }
    }

    /// A sink for one session's relay.
    pub fn sink(&self, session: Arc<SessionAudit>) -> Sink {
        // Bind values are kept only for raw text.
        let tracker = match self.mode {
            TextMode::Raw => Tracker::with_params(),
            TextMode::Normalized => Tracker::default(),
        };
        Sink { session, tx: self.tx.clone(), tracker, ran: Vec::new() }
    }

    /// Resolves once every statement handed over before this call has been
    /// written (or failed).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = match self.tx.try_send(Job::Flush(done)) {
            Ok(()) => true,
            // A full queue: `send` waits for room, which is not for a
            // runtime worker to do.
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                let tx = self.tx.clone();
                matches!(tokio::task::spawn_blocking(move || tx.send(job).is_ok()).await, Ok(true))
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        };
        if sent {
            let _ = wait.await;
        }
    }
}

/// Follows one session's messages and hands what ran to the auditor.
pub struct Sink {
    session: Arc<SessionAudit>,
    tx: SyncSender<Job>,
    tracker: Tracker,
    /// Finished statements not yet handed over.
    ran: Vec<Ran>,
}

impl Sink {
    /// Plaintext forwarded from the client (`client`) or the database, as
    /// the relay forwards it. Cheap: no allocation but a kept text.
    pub fn feed(&mut self, client: bool, bytes: &[u8], now: Instant) {
        self.tracker.feed(client, bytes, now, &mut self.ran);
    }

    /// Whether statements are waiting to be handed over.
    pub fn has_ran(&self) -> bool {
        !self.ran.is_empty()
    }

    /// Why the session cannot be followed any further, if so.
    pub fn lost(&self) -> Option<String> {
        self.tracker
            .lost()
            .map(|_| format!("more than {} statements pipelined without an answer", tracker::MAX_PENDING))
    }

    /// Takes what ran, to [`Handoff::send`] it outside the relay's lock.
    pub fn take(&mut self) -> Handoff {
        Handoff { session: self.session.clone(), tx: self.tx.clone(), ran: std::mem::take(&mut self.ran) }
    }
}

/// Statements on their way to the auditor.
pub struct Handoff {
    session: Arc<SessionAudit>,
    tx: SyncSender<Job>,
    ran: Vec<Ran>,
}

impl Handoff {
    /// Queues them, waiting for room when the auditor is behind. Err: the
    /// auditor is gone.
    pub fn send(self) -> Result<(), String> {
        for ran in self.ran {
            self.tx
                .send(Job::Ran { session: self.session.clone(), ran })
                .map_err(|_| "the statement auditor stopped".to_string())?;
        }
        Ok(())
    }
}

/// Jobs taken in one go: under load, one hand-over to the writer (and one
/// wake-up each way) carries many statements.
const BATCH: usize = 512;

fn run(rx: Receiver<Job>, log: AuditLog, mut cache: Cache, runtime: tokio::runtime::Handle) {
    let mut batch: Vec<Record> = Vec::new();
    let mut owners: Vec<Arc<SessionAudit>> = Vec::new();
    let mut flushes = Vec::new();
    while let Ok(first) = rx.recv() {
        // What is queued already comes along.
        for job in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH - 1)) {
            match job {
                Job::Flush(done) => flushes.push(done),
                Job::Ran { session, ran } => {
                    let before = batch.len();
                    batch.extend(records(&session.base, ran, &mut cache));
                    owners.extend(std::iter::repeat_n(session, batch.len() - before));
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = runtime.block_on(log.record_many(&batch)) {
                // Which records were written is not known: every session
                // with a record in the batch ends (fail closed).
                let mut failed: Vec<&Arc<SessionAudit>> = Vec::new();
                for s in &owners {
                    if !failed.iter().any(|f| Arc::ptr_eq(f, s)) {
                        failed.push(s);
                    }
                }
                for s in failed {
                    tracing::error!(error = %e, session_id = %s.base.session_id, "statement record not written; ending the session");
                    s.fail(e.to_string());
                }
            }
            batch.clear();
            owners.clear();
        }
        // A flush answers once everything sent before it is written.
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    tracing::debug!("statement auditor stopped");
}

/// The records for what ran.
fn records(base: &Record, ran: Ran, cache: &mut Cache) -> Vec<Record> {
    let describe = |cache: &mut Cache, text: &Text, piece: Option<&str>| -> Described {
        match (text, piece) {
            (_, Some(p)) => cache.describe(p),
            (Text::Sql(s), None) => cache.describe(s),
            (Text::TooLong { sha256, .. }, _) => Described::of_digest(sha256, TextStatus::TooLong),
            (Text::Unknown, _) => Described::unknown(),
        }
    };
    match ran {
        Ran::Execute { text, params, started, result } => {
            let d = describe(cache, &text, None);
            let mut r = record(base, StatementProtocol::Extended, d, started, &result);
            // Bind values go with raw text only: a statement shown
            // normalized (it mentions a password) or not at all shows none.
            if let (Event::Statement(s), Some(values)) = (&mut r.event, params) {
                if s.text_status == TextStatus::Raw.as_str() {
                    s.params = Some(values.iter().map(param_text).collect());
                }
            }
            vec![r]
        }
        Ran::Query { text, started, results } => {
            // Split whenever there may be more than one statement: a
            // failing first statement must not carry the ones that never ran.
            let pieces: Vec<&str> = match &text {
                Text::Sql(s) if s.contains(';') => describe::split(s),
                _ => Vec::new(),
            };
            let mut from = started;
            results
                .iter()
                .enumerate()
                .map(|(i, result)| {
                    // A statement's time runs from the end of the one before.
                    let d = describe(cache, &text, pieces.get(i).copied());
                    let r = record(base, StatementProtocol::Simple, d, from, result);
                    from = result.finished;
                    r
                })
                .collect()
        }
    }
}

fn record(
    base: &Record,
    protocol: StatementProtocol,
    d: Described,
    started: Instant,
    result: &tracker::Result,
) -> Record {
    let (command_tag, rows, sqlstate) = match &result.outcome {
        Outcome::Complete(tag) => {
            let (t, n) = split_tag(tag);
            (Some(t), n, None)
        }
        Outcome::Error(code) => (None, None, code.as_deref().and_then(SqlState::parse)),
        Outcome::Suspended => (None, None, None),
    };
    let copy = result.copy.map(|c| StatementCopy {
        direction: match c.direction {
            CopyDirection::In => "in",
            CopyDirection::Out => "out",
            CopyDirection::Both => "both",
        },
        bytes: c.bytes,
    });
    let statement = Statement {
        protocol,
        text: d.text,
        text_status: d.status.as_str(),
        fingerprint: d.fingerprint,
        duration: result.finished.saturating_duration_since(started),
        command_tag,
        rows,
        sqlstate,
        suspended: matches!(result.outcome, Outcome::Suspended),
        copy,
        params: None,
    };
    // When it finished, on the wall clock.
    let ago = Instant::now().saturating_duration_since(result.finished);
    let mut r = base.with_event(Event::Statement(statement));
    r.ts = SystemTime::now().checked_sub(ago).unwrap_or_else(SystemTime::now);
    r
}

/// A bind value as a record shows it: text as sent, binary as `\\x` and
/// hex (PostgreSQL's bytea form).
fn param_text(p: &tracker::Param) -> Option<String> {
    match p {
        tracker::Param::Null => None,
        tracker::Param::Text(t) => Some(t.clone()),
        tracker::Param::Binary(b) => {
            Some(format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))
        }
    }
}

/// `INSERT 0 5` → (`INSERT`, 5); `SELECT 3` → (`SELECT`, 3); `BEGIN` →
/// (`BEGIN`, none).
fn split_tag(tag: &str) -> (String, Option<u64>) {
    let words: Vec<&str> = tag.split_whitespace().collect();
    let rows = words.last().and_then(|w| w.parse().ok());
    let name: Vec<&str> = words.iter().copied().filter(|w| w.parse::<u64>().is_err()).collect();
    (name.join(" "), rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn command_tags_split_into_name_and_rows() {
        assert_eq!(split_tag("INSERT 0 5"), ("INSERT".into(), Some(5)));
        assert_eq!(split_tag("SELECT 3"), ("SELECT".into(), Some(3)));
        assert_eq!(split_tag("CREATE TABLE"), ("CREATE TABLE".into(), None));
        assert_eq!(split_tag("COPY 10"), ("COPY".into(), Some(10)));
        assert_eq!(split_tag(""), ("".into(), None));
    }

    fn base() -> Record {
        Record::new("00000000000000a1", "100.64.0.3:1".parse().unwrap(), Event::SessionStart)
    }

    #[test]
    fn a_multi_statement_query_is_one_record_per_statement_that_ran() {
        let t0 = Instant::now();
        let ran = Ran::Query {
            text: Text::Sql("BEGIN; INSERT INTO t VALUES (1, 'x'); SELECT 1/0; COMMIT".into()),
            started: t0,
            results: vec![
                tracker::Result {
                    finished: t0 + Duration::from_millis(1),
                    outcome: Outcome::Complete("BEGIN".into()),
                    copy: None,
                },
                tracker::Result {
                    finished: t0 + Duration::from_millis(3),
                    outcome: Outcome::Complete("INSERT 0 1".into()),
                    copy: None,
                },
                tracker::Result {
                    finished: t0 + Duration::from_millis(6),
                    outcome: Outcome::Error(Some("22012".into())),
                    copy: None,
                },
            ],
        };
        let records = records(&base(), ran, &mut Cache::new(TextMode::Normalized));
        let got: Vec<(Option<String>, Duration, Option<String>)> = records
            .iter()
            .map(|r| match &r.event {
                Event::Statement(s) => (s.text.clone(), s.duration, s.sqlstate.map(|c| c.to_string())),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("BEGIN".into()), Duration::from_millis(1), None),
                (Some("INSERT INTO t VALUES ($1, $2)".into()), Duration::from_millis(2), None),
                (Some("SELECT $1/$2".into()), Duration::from_millis(3), Some("22012".into())),
            ]
        );
        // A failing first statement is recorded alone.
        let ran = Ran::Query {
            text: Text::Sql("SELECT 1/0; DELETE FROM t".into()),
            started: t0,
            results: vec![tracker::Result {
                finished: t0,
                outcome: Outcome::Error(Some("22012".into())),
                copy: None,
            }],
        };
        let failed = super::records(&base(), ran, &mut Cache::new(TextMode::Normalized));
        assert!(
            matches!(&failed[..], [r] if matches!(&r.event, Event::Statement(s) if s.text.as_deref() == Some("SELECT $1/$2"))),
            "{failed:?}"
        );
        let v = serde_json::to_value(&records[1]).unwrap();
        assert_eq!(
            (v["command_tag"].as_str(), v["rows"].as_u64(), v["outcome"].as_str()),
            (Some("INSERT"), Some(1), Some("ok"))
        );
        assert_eq!(serde_json::to_value(&records[2]).unwrap()["outcome"], "error");
    }
}
