//! Stage 8, audit: the JSON-lines audit log.
//!
//! One JSON object per line ([`Record`], described by `audit-schema.json` at
//! the repository root), written by one writer thread and acknowledged to the
//! caller only once the line has reached the OS (and the disk, with
//! [`AuditOptions::sync`]).
//!
//! The log fails closed: callers refuse a new session when
//! [`AuditLog::record`] of its `session_start` fails. They must attempt
//! that write even while [`AuditLog::is_healthy`] is false: it is the
//! probe, and its success makes the log healthy again (a reopen alone does
//! not, since opening a file proves nothing about writing it). The writer never
//! drops a record (callers wait for room in the bounded channel) and never
//! panics on I/O errors: a failed write is retried once on a reopened file,
//! then reported.
//!
//! Rotation: rename the file and send SIGHUP ([`AuditLog::reopen`]), or use
//! `copytruncate` (the file is opened with `O_APPEND`).
//!
//! Tamper evidence ([`chain`]): each line carries `seq` and the SHA-256 of
//! the line before; with [`AuditOptions::checkpoints`] the writer signs
//! checkpoints. `tailgres audit verify` checks both.
//!
//! Every line also names the node that wrote it (`node`,
//! [`AuditOptions::node`]: the `--hostname`), so that the logs of a fleet's
//! nodes can be read together (`tailgres audit` merges them by time).
#![forbid(unsafe_code)]

pub mod chain;
mod record;
mod time;
mod writer;

/// Record timestamps, for readers of the log (`tailgres audit`).
pub(crate) use time::rfc3339;

pub use record::{
    AuthFailure, AuthMethod, CancelOutcome, ClientCertificate, ClientTransport, Denial, DenyReason,
    EndReason, Event, LogEvent, LogRecord, OpenReason, Peer, PostgresInfo, ProtocolVersion, Record,
    SessionEnd, Side, SqlState, Statement, StatementCopy, StatementProtocol, TlsVersion, UpstreamInfo,
};

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use writer::{Msg, Signing, Sink, Writer};

/// Records that may wait for the writer before [`AuditLog::record`] waits.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditDest {
    /// Appended to; created with mode 0600.
    File(PathBuf),
    Stdout,
}

impl fmt::Display for AuditDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditDest::File(path) => write!(f, "{}", path.display()),
            AuditDest::Stdout => f.write_str("stdout"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// fdatasync after every record (a record is acknowledged once on disk).
    pub sync: bool,
    /// Channel capacity, in records (at least 1).
    pub capacity: usize,
    /// Signed checkpoints; `None`: the chain alone.
    pub checkpoints: Option<Checkpoints>,
    /// The node's name (its `--hostname`, a DNS label), written on every
    /// line as `node`. Default: [`DEFAULT_NODE`].
    pub node: String,
}

/// [`AuditOptions::node`] by default: the default `--hostname`.
pub const DEFAULT_NODE: &str = "tailgres";

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions { sync: false, capacity: DEFAULT_CAPACITY, checkpoints: None, node: DEFAULT_NODE.into() }
    }
}

/// `--audit-signing-key`: a signed checkpoint after `every` records, or
/// `interval` after the last one if anything was written since.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub signer: Arc<chain::Signer>,
    pub every: u64,
    pub interval: std::time::Duration,
}

/// Default for [`Checkpoints::every`].
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// Default for [`Checkpoints::interval`].
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Audit failures; all of them are the proxy's own (no client or upstream
/// causes one).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write audit log {dest}: {source}")]
    Write {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("audit log is closed")]
    Closed,
}

/// State shared between the handles and the writer.
struct Shared {
    /// What the log is written to, for messages.
    dest: String,
    healthy: AtomicBool,
    /// A reopen was asked for and not yet done.
    reopen: AtomicBool,
}

/// A handle to the audit log; clones are cheap and share one writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("dest", &self.shared.dest)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl AuditLog {
    /// Opens the log with [`AuditOptions::default`] and spawns its writer.
    pub async fn open(dest: AuditDest) -> Result<(AuditLog, JoinHandle<()>), AuditError> {
        AuditLog::open_with(dest, AuditOptions::default()).await
    }

    /// Opens the log (a file now, so that a bad path stops the proxy at
    /// start with a message naming it) and spawns its writer.
    pub async fn open_with(
        dest: AuditDest,
        options: AuditOptions,
    ) -> Result<(AuditLog, JoinHandle<()>), AuditError> {
        let label = dest.to_string();
        let (sink, torn, head) = match dest {
            AuditDest::File(path) => {
                let p = path.clone();
                // The chain goes on from the file's last line (a restart);
                // an empty or new file starts a new one.
                let (file, torn, head) = tokio::task::spawn_blocking(move || {
                    let (file, torn) = writer::open_append(&p)?;
                    Ok::<_, io::Error>((file, torn, chain::resume(&p)?))
                })
                .await
                .unwrap_or_else(|join| Err(io::Error::other(join)))
                .map_err(|source| AuditError::Open { path: path.clone(), source })?;
                (Sink::File { path, file: Some(file) }, torn, head)
            }
            AuditDest::Stdout => (Sink::Stdout, false, None),
        };
        let shared =
            Arc::new(Shared { dest: label, healthy: AtomicBool::new(true), reopen: AtomicBool::new(false) });
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let signing = options.checkpoints.as_ref().map(|c| Signing {
            signer: c.signer.clone(),
            every: c.every.max(1),
            since: 0,
        });
        let writer = Writer {
            sink,
            shared: shared.clone(),
            sync: options.sync,
            rx,
            torn,
            head,
            header_due: Some(OpenReason::Start),
            signing,
            node: options.node.clone(),
        };
        // The writer is a thread of its own (see `writer`); the handle the
        // caller awaits finishes when that thread does.
        let (finished, on_finish) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tailgres-audit".into())
            .spawn(move || {
                writer.run();
                drop(finished);
            })
            .map_err(|source| AuditError::Write { dest: shared.dest.clone(), source })?;
        let handle = tokio::spawn(async move {
            let _ = on_finish.await;
        });
        if let Some(c) = &options.checkpoints {
            // A weak sender: the ticker never keeps the writer alive.
            let weak = tx.downgrade();
            let interval = c.interval.max(std::time::Duration::from_millis(10));
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(tx) = weak.upgrade() else { break };
                    // A full channel is a busy writer, whose record count
                    // brings the next checkpoint anyway.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Msg::Tick) {
                        break;
                    }
                }
            });
        }
        Ok((AuditLog { tx, shared }, handle))
    }

    /// Writes one record; resolves once the line is written and flushed.
    /// Waits while the writer is behind (records are never dropped).
    ///
    /// If this future is dropped after the record was queued, the record is
    /// still written.
    pub async fn record(&self, r: &Record) -> Result<(), AuditError> {
        let line = serde_json::to_vec(r)?;
        let (ack, acked) = oneshot::channel();
        self.tx.send(Msg::Write { line, ack }).await.map_err(|_| AuditError::Closed)?;
        acked.await.map_err(|_| AuditError::Closed)?
    }

    /// Writes `records` in order with one hand-over to the writer (the
    /// statement auditor's batches); resolves once all are written, or
    /// with the first failure (the records after it are not written).
    pub async fn record_many(&self, records: &[Record]) -> Result<(), AuditError> {
        let lines = records.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?;
        let (ack, acked) = oneshot::channel();
        self.tx.send(Msg::WriteMany { lines, ack }).await.map_err(|_| AuditError::Closed)?;
        acked.await.map_err(|_| AuditError::Closed)?
    }

    /// False after a write failed (or a reopen failed, or the writer
    /// stopped), until a later write succeeds.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Asks the writer to close and reopen the file (log rotation, SIGHUP).
    /// Records sent after this call go to the reopened file. A failed
    /// reopen makes the log unhealthy and is logged with the path and error.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // A full channel means a busy writer, which looks at the flag
        // before its next write anyway.
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// Writes every record already queued, then stops the writer. Records
    /// sent afterwards through other clones fail with [`AuditError::Closed`].
    pub async fn close(self) {
        let (done, stopped) = oneshot::channel();
        if self.tx.send(Msg::Close { done }).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

/// A fresh session id: 16 lowercase hex characters (64 random bits).
/// Rate-limits the records of refusals that come in bursts (over
/// --max-sessions, or over a peer's handshake cap): at most one record per
/// address per [`DenialLog::EVERY`], saying how many were refused since the
/// last one. Every refusal is still counted in the metrics.
#[derive(Clone, Default)]
pub struct DenialLog {
    last: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u64)>>>,
}

impl DenialLog {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    /// Forget addresses quiet for this long (bounds the map).
    const FORGET: std::time::Duration = std::time::Duration::from_secs(60);

    /// `Some(n)` when a record is due for `ip` now (`n` refusals since the
    /// last record were not written); `None` to skip this one.
    pub fn due(&self, ip: std::net::IpAddr) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            m.retain(|_, (at, _)| now.duration_since(*at) < Self::FORGET);
        }
        match m.get_mut(&ip) {
            Some((at, skipped)) if now.duration_since(*at) < Self::EVERY => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                let n = *skipped;
                (*at, *skipped) = (now, 0);
                Some(n)
            }
            None => {
                m.insert(ip, (now, 0));
                Some(0)
            }
        }
    }
}

pub fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests;
