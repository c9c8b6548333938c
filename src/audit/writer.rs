//! The one thread that writes the audit log.
//!
//! Every line is written with `write(2)` on an `O_APPEND` descriptor (so
//! `copytruncate` rotation works too) and acknowledged only once it has
//! reached the OS (and the disk, with `sync`). The writer is an OS thread of
//! its own, not a runtime task: a slow disk back-pressures callers through
//! the bounded channel instead of stalling a runtime worker, and a record
//! costs one wake each way (caller to writer, acknowledgement back) rather
//! than a hop through the blocking pool and back for every line.
//!
//! Being the only writer, it also keeps the chain ([`super::chain`]): it
//! stamps each line with the node's name, the next `seq` and the previous
//! line's hash, heads
//! every run and every reopened file with a `log_opened` record, and signs
//! checkpoints when given a key.
#![forbid(unsafe_code)]

use super::chain::{self, Link, Signer};
use super::record::{LogEvent, LogRecord, OpenReason};
use super::{AuditError, Shared};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot};

/// Mode of a newly created log: the log names users and machines.
const NEW_FILE_MODE: u32 = 0o600;

pub(super) enum Msg {
    /// One serialized record: a JSON object, without `node`, `seq`, `prev`
    /// or a newline (the writer adds them).
    Write { line: Vec<u8>, ack: oneshot::Sender<Result<(), AuditError>> },
    /// Several records, written in order; acknowledged once, after the
    /// last (or the first that fails: the rest are not written).
    WriteMany { lines: Vec<Vec<u8>>, ack: oneshot::Sender<Result<(), AuditError>> },
    /// Write what is queued, then stop.
    Close { done: oneshot::Sender<()> },
    /// Look at the reopen flag now (sent by [`super::AuditLog::reopen`] so
    /// that an idle writer reopens without waiting for a record).
    Wake,
    /// The checkpoint interval passed: sign what was written since the
    /// last checkpoint, if anything.
    Tick,
}

/// Signed checkpoints: the key and how often.
pub(super) struct Signing {
    pub(super) signer: Arc<Signer>,
    /// A checkpoint after this many records (at least 1).
    pub(super) every: u64,
    /// Records (the writer's own included) not yet covered by one.
    pub(super) since: u64,
}

/// Where lines go.
pub(super) enum Sink {
    File {
        path: PathBuf,
        /// `None` after a failed reopen: the next write opens the path.
        file: Option<File>,
    },
    Stdout,
}

/// Opens `path` for appending, creating it with mode 0600. Also says
/// whether the file ends mid-line (see [`ends_mid_line`]).
pub(super) fn open_append(path: &Path) -> io::Result<(File, bool)> {
    let file = OpenOptions::new().create(true).append(true).mode(NEW_FILE_MODE).open(path)?;
    // An existing file keeps its mode; say so when others can read it.
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode();
        if meta.is_file() && mode & 0o077 != 0 {
            tracing::warn!(
                audit_log = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "audit log is accessible to group or others"
            );
        }
    }
    let torn = ends_mid_line(path);
    if torn {
        tracing::warn!(
            audit_log = %path.display(),
            "audit log ends with an unterminated line (an earlier writer stopped mid-write); \
             the next record starts on a new line"
        );
    }
    Ok((file, torn))
}

/// Whether the regular file at `path` is not empty and its last byte is not
/// a newline: a writer was stopped in the middle of a line (killed, or the
/// disk filled). Appending there would glue the next record to that
/// fragment and lose both; the writer starts its first line with a newline
/// instead, so the fragment stands alone (a reader names it) and every new
/// record stays whole. Anything that cannot be read counts as whole.
fn ends_mid_line(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(file) = File::open(path) else { return false };
    let Ok(meta) = file.metadata() else { return false };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    let mut last = [0u8; 1];
    matches!(file.read_at(&mut last, meta.len() - 1), Ok(1)) && last[0] != b'\n'
}

pub(super) struct Writer {
    pub(super) sink: Sink,
    pub(super) shared: Arc<Shared>,
    pub(super) sync: bool,
    pub(super) rx: mpsc::Receiver<Msg>,
    /// A failed write left part of a line that could not be cut off: the
    /// next line starts with a newline so it stands on its own.
    pub(super) torn: bool,
    /// The last record line written; `None` before the first of a new
    /// chain.
    pub(super) head: Option<Link>,
    /// A `log_opened` record is owed before the next record.
    pub(super) header_due: Option<OpenReason>,
    pub(super) signing: Option<Signing>,
    /// This node's name, stamped on every line as `node`.
    pub(super) node: String,
}

/// What a blocking write reports.
struct Attempt {
    result: io::Result<()>,
    torn: bool,
}

impl Writer {
    /// Runs on the writer's thread until the channel closes or a
    /// [`Msg::Close`].
    pub(super) fn run(mut self) {
        // The run's first record, even if no session ever comes.
        let _ = self.header();
        while let Some(msg) = self.rx.blocking_recv() {
            match msg {
                Msg::Wake => {
                    self.reopen_if_requested();
                    let _ = self.header();
                }
                Msg::Tick => self.checkpoint(),
                Msg::Write { line, ack } => {
                    let result = self.record(&line);
                    // The caller may have given up waiting; the line is
                    // written all the same.
                    let _ = ack.send(result);
                }
                Msg::WriteMany { lines, ack } => {
                    let result = lines.iter().try_for_each(|l| self.record(l));
                    let _ = ack.send(result);
                }
                Msg::Close { done } => {
                    self.drain();
                    self.checkpoint();
                    let _ = done.send(());
                    break;
                }
            }
        }
        // Every sender gone without a Close: sign the tail all the same.
        self.checkpoint();
        // No writer, no audit: fail closed from here on.
        self.shared.healthy.store(false, Ordering::Release);
        tracing::debug!(audit_log = %self.shared.dest, "audit writer stopped");
    }

    /// Refuses new messages and writes those already queued.
    fn drain(&mut self) {
        self.rx.close();
        while let Some(msg) = self.rx.blocking_recv() {
            match msg {
                Msg::Write { line, ack } => {
                    let result = self.record(&line);
                    let _ = ack.send(result);
                }
                Msg::WriteMany { lines, ack } => {
                    let result = lines.iter().try_for_each(|l| self.record(l));
                    let _ = ack.send(result);
                }
                Msg::Close { done } => {
                    let _ = done.send(());
                }
                Msg::Wake | Msg::Tick => {}
            }
        }
    }

    fn reopen_if_requested(&mut self) {
        if !self.shared.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        let Sink::File { path, file } = &mut self.sink else {
            tracing::debug!("audit log is stdout; nothing to reopen");
            return;
        };
        // Close first: after a rename, the old name is gone anyway, and
        // keeping a handle to the rotated file would hide a failed reopen.
        *file = None;
        match open_append(path) {
            Ok((f, torn)) => {
                *file = Some(f);
                self.torn = torn;
                // The new file starts with a record naming the old one's
                // last line (the chain's head, kept in memory).
                self.header_due = Some(OpenReason::Reopen);
                tracing::info!(audit_log = %path.display(), "audit log reopened");
            }
            Err(error) => {
                self.shared.healthy.store(false, Ordering::Release);
                tracing::error!(
                    audit_log = %path.display(), %error,
                    "cannot reopen audit log; refusing new sessions until it can be written"
                );
            }
        }
    }

    /// Writes one record (after the `log_opened` record owed, if any), then
    /// a checkpoint if one is due.
    fn record(&mut self, body: &[u8]) -> Result<(), AuditError> {
        self.reopen_if_requested();
        self.header()?;
        self.append(body)?;
        if self.signing.as_ref().is_some_and(|s| s.since >= s.every) {
            self.checkpoint();
        }
        Ok(())
    }

    /// Writes the `log_opened` record if one is owed.
    fn header(&mut self) -> Result<(), AuditError> {
        let Some(reason) = self.header_due else { return Ok(()) };
        let event = LogEvent::LogOpened {
            reason,
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            signing_key: self.signing.as_ref().map(|s| s.signer.public_key().to_owned()),
        };
        self.append(&serde_json::to_vec(&LogRecord { ts: SystemTime::now(), event })?)?;
        self.header_due = None;
        Ok(())
    }

    /// Signs everything written since the last checkpoint (nothing to do
    /// without a key or without new records). A failure is logged and
    /// tried again at the next record or tick; the records stay written.
    fn checkpoint(&mut self) {
        let (Some(signing), Some(head)) = (&self.signing, self.head) else { return };
        if signing.since == 0 {
            return;
        }
        let event = LogEvent::Checkpoint {
            records: signing.since,
            signing_key: signing.signer.public_key().to_owned(),
            // `append` stamps it with exactly this seq and prev: one
            // thread writes, so nothing comes between.
            signature: signing.signer.sign(head.seq + 1, &head.hash),
        };
        let body = match serde_json::to_vec(&LogRecord { ts: SystemTime::now(), event }) {
            Ok(b) => b,
            Err(error) => return tracing::error!(%error, "cannot encode an audit checkpoint"),
        };
        match self.append(&body) {
            Ok(line) => {
                if let Some(s) = &mut self.signing {
                    s.since = 0;
                }
                // A second copy, outside the log: shipped with the proxy's
                // own logs, it shows a deleted tail (README: tamper evidence).
                tracing::info!(
                    target: "tailgres::audit::checkpoint",
                    checkpoint = %String::from_utf8_lossy(&line).trim_end(),
                    "audit checkpoint"
                );
            }
            Err(error) => tracing::warn!(%error, "audit checkpoint not written; retrying later"),
        }
    }

    /// Stamps `body` with the chain and writes it; the chain advances only
    /// once the line is written. Returns the line.
    fn append(&mut self, body: &[u8]) -> Result<Vec<u8>, AuditError> {
        let (line, link) = chain::stamp(body, &self.node, self.head);
        self.write(&line)?;
        self.head = Some(link);
        if let Some(s) = &mut self.signing {
            s.since += 1;
        }
        Ok(line)
    }

    /// Writes one line: on failure reopens once and writes it again.
    fn write(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let first = match self.attempt(line) {
            Ok(()) => return self.succeeded(),
            Err(e) => e,
        };
        tracing::warn!(
            audit_log = %self.shared.dest, error = %first,
            "audit write failed; reopening and retrying once"
        );
        if let Sink::File { path, file } = &mut self.sink {
            *file = None;
            match open_append(path) {
                Ok((f, torn)) => {
                    *file = Some(f);
                    // What the file's tail says: a partial line the failed
                    // write could not cut off is still there.
                    self.torn = torn;
                }
                Err(error) => return Err(self.failed(error)),
            }
        }
        match self.attempt(line) {
            Ok(()) => self.succeeded(),
            Err(error) => Err(self.failed(error)),
        }
    }

    fn succeeded(&self) -> Result<(), AuditError> {
        self.shared.healthy.store(true, Ordering::Release);
        Ok(())
    }

    fn failed(&self, error: io::Error) -> AuditError {
        self.shared.healthy.store(false, Ordering::Release);
        tracing::error!(
            audit_log = %self.shared.dest, %error,
            "cannot write audit log; refusing new sessions until it can be written"
        );
        AuditError::Write { dest: self.shared.dest.to_string(), source: error }
    }

    /// One write (plus fdatasync with `sync`), opening the file first if a
    /// reopen had failed.
    fn attempt(&mut self, line: &[u8]) -> io::Result<()> {
        let attempt = match &mut self.sink {
            Sink::File { path, file } => {
                let f = match file {
                    Some(f) => f,
                    None => {
                        let (f, torn) = open_append(path)?;
                        self.torn = torn;
                        file.insert(f)
                    }
                };
                write_file(f, line, self.torn, self.sync)
            }
            Sink::Stdout => write_stdout(line, self.torn),
        };
        self.torn = attempt.torn;
        attempt.result
    }
}

/// Writes `line` as one or more `write(2)` calls, counting what got out.
fn write_counted(out: &mut impl Write, line: &[u8]) -> (usize, io::Result<()>) {
    let mut written = 0;
    while written < line.len() {
        match out.write(&line[written..]) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

fn write_file(file: &File, line: &[u8], torn: bool, sync: bool) -> Attempt {
    let mut out = file;
    if torn {
        if let (_, Err(e)) = write_counted(&mut out, b"\n") {
            return Attempt { result: Err(e), torn: true };
        }
    }
    let (written, result) = write_counted(&mut out, line);
    if let Err(e) = result {
        // Cut off a partial line (we are the only writer, so it is the
        // file's tail); if that fails too, the next line starts afresh.
        let torn = written > 0
            && file.metadata().and_then(|m| file.set_len(m.len().saturating_sub(written as u64))).is_err();
        return Attempt { result: Err(e), torn };
    }
    // With `sync`, a line counts as written once it is on disk: a failed
    // fdatasync is a failed write (retrying may duplicate the line, which
    // a reader can tell; losing it would go unnoticed).
    let result = if sync { file.sync_data() } else { Ok(()) };
    Attempt { result, torn: false }
}

fn write_stdout(line: &[u8], torn: bool) -> Attempt {
    let mut out = io::stdout().lock();
    if torn {
        if let (_, Err(e)) = write_counted(&mut out, b"\n") {
            return Attempt { result: Err(e), torn: true };
        }
    }
    let (written, result) = write_counted(&mut out, line);
    let result = result.and_then(|()| out.flush());
    Attempt { torn: result.is_err() && written > 0, result }
}
