//! Process signals that coexist with the Go runtime linked into tailgres.
//!
//! tokio installs its handlers lazily, when a signal is first subscribed;
//! right after that we add `SA_ONSTACK` (see [`crate::sys::add_sa_onstack`]).
//! Signals the Go runtime owns (SIGPIPE, SIGURG, SIGSEGV, SIGPROF, ...) are
//! never touched.
#![forbid(unsafe_code)]

use std::io;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// What the process was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGINT or SIGTERM: drain and stop.
    Shutdown,
    /// SIGHUP: reopen files (audit log rotation), reload.
    Reload,
}

/// Subscriptions to SIGINT, SIGTERM and SIGHUP, safe to receive on any thread.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Subscribes (must be called inside a tokio runtime).
    pub fn new() -> io::Result<Self> {
        let s = Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        };
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            crate::sys::add_sa_onstack(sig)?;
        }
        Ok(s)
    }

    /// Waits for the next request.
    pub async fn recv(&mut self) -> Request {
        tokio::select! {
            _ = self.int.recv() => Request::Shutdown,
            _ = self.term.recv() => Request::Shutdown,
            _ = self.hup.recv() => Request::Reload,
        }
    }
}
