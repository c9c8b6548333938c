//! Stage 7, relay: the data phase, as an engine that does no I/O.
//!
//! From ReadyForQuery on, whoever owns the connections' I/O moves the bytes
//! (the embedded tailnet node's goroutines in production, see
//! `vendor/tsffi/relay.go`; tokio tasks for the in-memory tailnet, see
//! [`drive`]) and calls into a [`Relay`], which decides everything under one
//! lock: TLS on both legs (rustls), message boundaries, Terminate, byte
//! counts, who ended the session, and the FATAL a stopped client is told.
//! No future, no waker and no thread hand-over sits on the data path: a
//! driver reads on its own threads, calls [`Relay::input`], and writes what
//! [`Relay::output`] gives it.
//!
//! A driver keeps to this protocol (`tsffi.h` says the same in C):
//! - One reader per side. It first calls [`Relay::begin`] for its side (bytes
//!   admission had already read), then loops: read, [`Relay::input`] (an
//!   empty slice is the end of the stream), or [`Relay::failed`] for a read
//!   error; then it acts on the returned bits ([`WRITE_CLIENT`],
//!   [`WRITE_UPSTREAM`], [`HALF_CLOSE`], [`END`]).
//! - Writing a side means calling [`Relay::output`] until it returns less
//!   than the buffer, writing each chunk in full, all under that side's
//!   write lock (so TLS records leave in the order they were made). Bytes
//!   queued after that are reported to whichever call queued them, whose
//!   caller writes them. A write error goes to [`Relay::failed`].
//! - [`HALF_CLOSE`]: write the other side's pending bytes, then shut down
//!   its write half; this reader is done. [`END`], or [`Relay::stop`]
//!   calling the kick the driver registered with [`Relay::set_kick`]: stop
//!   both readers; from then on every write gets [`STOP_WRITE_GRACE`].
//! - When both readers are done: write both sides' pending bytes (the
//!   FATAL, TLS close_notify), close both connections, call
//!   [`Relay::finished`].
//!
//! The session waits in [`supervise`], which also turns the proxy's
//! decisions (revocation, shutdown, idle timeout) into [`Relay::stop`].
#![forbid(unsafe_code)]

mod drive;

pub use drive::drive;

use crate::audit::EndReason;
use crate::pgwire;
use crate::statements;
use std::future::Future;
use std::io::{self, BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// The client's side of a relay (an index into per-side arrays).
pub const CLIENT: usize = 0;
/// The database's side.
pub const UPSTREAM: usize = 1;

/// Bits a driver acts on, returned by [`Relay::input`], [`Relay::failed`]
/// and [`Relay::begin`]. The client side has bytes to write.
pub const WRITE_CLIENT: u32 = 1;
/// The database side has bytes to write.
pub const WRITE_UPSTREAM: u32 = 2;
/// The side just read ended its stream cleanly: write the other side's
/// pending bytes and shut down its write half; this side's reader is done.
pub const HALF_CLOSE: u32 = 4;
/// The session is over: stop reading, write what is pending within
/// [`STOP_WRITE_GRACE`], close both sides, call [`Relay::finished`].
pub const END: u32 = 8;

/// The write bit for `side`.
pub fn write_bit(side: usize) -> u32 {
    if side == CLIENT {
        WRITE_CLIENT
    } else {
        WRITE_UPSTREAM
    }
}

/// Once the session is stopped, how long a write already under way (or the
/// last FATAL, or the close) may still take. A client that stops reading
/// blocks a write for as long as it likes; without this bound it would
/// keep a revoked or drained session, its backend and its locks, forever.
pub const STOP_WRITE_GRACE: Duration = Duration::from_secs(2);

/// A plaintext side's pending output keeps its allocation up to this size;
/// a larger one (a bulk transfer's) is freed once a small write empties it,
/// so an idle session holds little.
const KEEP_PLAIN_OUT: usize = 16 * 1024;

#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Who ended it and why (the side that closed first, the side whose
    /// error ended it, or the reason the stop gave).
    pub reason: EndReason,
    pub detail: Option<String>,
}

/// Why the proxy ends a session, and what the client is told.
#[derive(Debug, Clone)]
pub struct Stop {
    pub reason: EndReason,
    /// Sent to the client as FATAL 57P01 when the server→client stream is
    /// between messages (it always is, unless a large message is halfway).
    pub client_message: String,
    pub detail: Option<String>,
}

/// Follows message boundaries in one direction's plaintext without
/// buffering (type byte + Int32 length), to know the last complete message:
/// a client that sent Terminate ('X') ended the session even if the
/// server's close reaches us first, a server that sent a FATAL error ended
/// it even if the client's reaction (its close, a write to the closed
/// backend failing) reaches us before the server's close, and a FATAL may
/// only go to the client between the server's messages.
struct Frames {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
    current: u8,
    last_complete: Option<u8>,
    /// The start of the ErrorResponse being read: enough for its severity.
    error_head: [u8; ERROR_HEAD],
    error_head_len: usize,
    /// A complete ErrorResponse said FATAL or PANIC.
    fatal: bool,
}

/// Bytes of an ErrorResponse kept to read its severity: the localized `S`
/// field, then `V` (PostgreSQL 9.6 and later), come first.
const ERROR_HEAD: usize = 64;

impl Default for Frames {
    fn default() -> Frames {
        Frames {
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            current: 0,
            last_complete: None,
            error_head: [0; ERROR_HEAD],
            error_head_len: 0,
            fatal: false,
        }
    }
}

impl Frames {
    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(buf.len() as u64)) as usize;
                if self.current == b'E' {
                    let k = n.min(ERROR_HEAD - self.error_head_len);
                    self.error_head[self.error_head_len..self.error_head_len + k].copy_from_slice(&buf[..k]);
                    self.error_head_len += k;
                }
                self.remaining -= n as u64;
                buf = &buf[n..];
                if self.remaining == 0 {
                    self.complete();
                }
                continue;
            }
            let n = (5 - self.header_len).min(buf.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
            self.header_len += n;
            buf = &buf[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                self.current = self.header[0];
                let len =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = u64::from(len.saturating_sub(4));
                self.error_head_len = 0;
                if self.remaining == 0 {
                    self.complete();
                }
            }
        }
    }

    fn complete(&mut self) {
        self.last_complete = Some(self.current);
        if self.current == b'E' {
            self.fatal |= fatal_severity(&self.error_head[..self.error_head_len]);
        }
    }

    /// The server said FATAL (or PANIC): its backend is ending.
    fn fatal(&self) -> bool {
        self.fatal
    }

    fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    fn terminated(&self) -> bool {
        self.last_complete == Some(b'X') && self.at_boundary()
    }
}

/// Whether an ErrorResponse body (or its start) has severity FATAL or
/// PANIC: the non-localized `V` field when there is one, else `S`.
fn fatal_severity(body: &[u8]) -> bool {
    let mut severity = None;
    // (A value cut off by the kept head is not read.)
    for (code, value, _) in pgwire::fields(body).take_while(|&(_, _, whole)| whole) {
        match code {
            b'V' => {
                severity = Some(value);
                break;
            }
            b'S' => severity = Some(value),
            _ => {}
        }
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

/// One leg: its TLS connection (`None`: plaintext), and for a plaintext
/// leg the bytes waiting to be written to it.
struct Leg {
    tls: Option<rustls::Connection>,
    plain_out: Vec<u8>,
    /// Bytes read from this leg before the relay began (the rest of a
    /// direct-TLS ClientHello's read, say), fed in by [`Relay::begin`].
    pending: Vec<u8>,
}

impl Leg {
    fn new(tls: Option<rustls::Connection>, pending: Vec<u8>) -> Leg {
        let mut tls = tls;
        if let Some(t) = tls.as_mut() {
            // The driver writes out what each input made before it reads
            // again, so what is buffered here stays one read's worth.
            t.set_buffer_limit(None);
        }
        Leg { tls, plain_out: Vec::new(), pending }
    }

    /// Queues plaintext for this leg (encrypted at once on a TLS leg).
    fn send(&mut self, data: &[u8]) {
        match &mut self.tls {
            // With no buffer limit, the writer takes everything.
            Some(t) => drop(t.writer().write_all(data)),
            None => self.plain_out.extend_from_slice(data),
        }
    }

    fn wants_write(&self) -> bool {
        match &self.tls {
            Some(t) => t.wants_write(),
            None => !self.plain_out.is_empty(),
        }
    }

    fn close_notify(&mut self) {
        if let Some(t) = &mut self.tls {
            t.send_close_notify();
        }
    }
}

/// The state behind the lock.
struct Engine {
    legs: [Leg; 2],
    /// Messages read from each side.
    frames: [Frames; 2],
    /// The side whose stream ended cleanly first.
    first_closed: Option<EndReason>,
    /// An error ended the session (the first one counts).
    ended: Option<(EndReason, Option<String>)>,
    /// The proxy ended the session.
    stopped: Option<Stop>,
    /// The driver is done (both sides closed).
    finished: bool,
    /// Statement audit, when this session has it: fed every forwarded
    /// byte's message boundaries, under this lock, without copying them.
    statements: Option<statements::Sink>,
}

impl Engine {
    fn over(&self) -> bool {
        self.ended.is_some() || self.stopped.is_some() || self.finished
    }

    fn pending(&self) -> u32 {
        let mut bits = 0;
        for side in [CLIENT, UPSTREAM] {
            if self.legs[side].wants_write() {
                bits |= write_bit(side);
            }
        }
        bits
    }

    fn end(&mut self, reason: EndReason, detail: Option<String>) -> u32 {
        // After the database's FATAL, whatever broke next (the client
        // hanging up on it, a write to the gone backend) is its close.
        let (reason, detail) =
            if self.frames[UPSTREAM].fatal() { (EndReason::UpstreamClosed, None) } else { (reason, detail) };
        if self.stopped.is_none() {
            self.ended.get_or_insert((reason, detail));
        }
        END | self.pending()
    }

    /// Takes ciphertext (or plaintext) read from `from`, forwarding the
    /// plaintext to the other leg. `Ok(true)`: `from` ended its stream
    /// cleanly (end of a plaintext stream, or TLS close_notify).
    fn take_in(
        &mut self,
        from: usize,
        mut data: &[u8],
        eof: bool,
        moved: &AtomicU64,
    ) -> Result<bool, String> {
        let [client, upstream] = &mut self.legs;
        let (src, dst) = if from == CLIENT { (client, upstream) } else { (upstream, client) };
        let frames = &mut self.frames[from];
        let mut statements = self.statements.as_mut().map(|s| (s, std::time::Instant::now()));
        let mut forward = |dst: &mut Leg, bytes: &[u8]| {
            frames.feed(bytes);
            if let Some((s, now)) = &mut statements {
                s.feed(from == CLIENT, bytes, *now);
            }
            moved.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            dst.send(bytes);
        };
        let Some(tls) = &mut src.tls else {
            if !data.is_empty() {
                forward(dst, data);
            }
            return Ok(eof);
        };
        loop {
            if !data.is_empty() || eof {
                // Takes what the TLS layer has room for; an empty read
                // marks the end of the stream.
                tls.read_tls(&mut data).map_err(|e| e.to_string())?;
            }
            tls.process_new_packets().map_err(|e| e.to_string())?;
            loop {
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok([]) => return Ok(true), // close_notify
                    Ok(chunk) => {
                        let n = chunk.len();
                        forward(dst, chunk);
                        reader.consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
            if data.is_empty() {
                return Ok(false);
            }
        }
    }

    /// A read from `from` failed (or its TLS stream was cut short).
    fn read_failed(&mut self, from: usize, why: String) -> u32 {
        if from == CLIENT {
            return self.end(EndReason::ClientError, Some(why));
        }
        // A database that closes without a TLS close_notify after the
        // client's Terminate, or after the client hung up: the client ended
        // it.
        if self.frames[CLIENT].terminated() {
            self.end(EndReason::ClientTerminated, None)
        } else if self.first_closed == Some(EndReason::ClientClosed) {
            self.end(EndReason::ClientClosed, None)
        } else {
            self.end(EndReason::UpstreamError, Some(why))
        }
    }
}

/// One session's relay, shared by the session and the driver.
pub struct Relay {
    engine: Mutex<Engine>,
    /// Plaintext bytes taken from each side and forwarded.
    moved: [AtomicU64; 2],
    /// Wakes the driver's readers after [`Relay::stop`].
    kick: OnceLock<Box<dyn Fn() + Send + Sync>>,
    done: tokio::sync::Notify,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("moved", &self.moved).finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay between a client leg and a database leg. `*_tls` is the
    /// leg's established TLS connection (`None`: plaintext); `*_pending`
    /// what was read from it and not yet given to TLS.
    pub fn new(
        client_tls: Option<rustls::Connection>,
        client_pending: Vec<u8>,
        upstream_tls: Option<rustls::Connection>,
    ) -> Relay {
        Relay {
            engine: Mutex::new(Engine {
                legs: [Leg::new(client_tls, client_pending), Leg::new(upstream_tls, Vec::new())],
                frames: Default::default(),
                first_closed: None,
                ended: None,
                stopped: None,
                finished: false,
                statements: None,
            }),
            moved: Default::default(),
            kick: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        }
    }

    /// Audits the session's statements through `sink` (before the relay
    /// begins).
    pub fn with_statements(self, sink: statements::Sink) -> Relay {
        self.lock().statements = Some(sink);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        // Nothing here panics while holding it; if something did, the
        // state is still consistent enough to wind the session down.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a side's first read: forwards what admission had already
    /// read from it (bytes and TLS plaintext not yet taken).
    pub fn begin(&self, side: usize) -> u32 {
        let mut e = self.lock();
        let pending = std::mem::take(&mut e.legs[side].pending);
        let bits = self.take(&mut e, side, &pending, false);
        self.hand_statements(e, bits)
    }

    /// Bytes read from `side`; an empty slice is the end of its stream.
    pub fn input(&self, side: usize, data: &[u8]) -> u32 {
        let mut e = self.lock();
        if e.over() {
            return END;
        }
        let bits = self.take(&mut e, side, data, data.is_empty());
        self.hand_statements(e, bits)
    }

    /// Hands the statements that finished to the auditor, outside the lock
    /// (waiting for room holds back only this reader: the database's side,
    /// whose answers finish statements). A session whose statements cannot
    /// be audited ends (fail closed).
    fn hand_statements(&self, mut e: MutexGuard<'_, Engine>, bits: u32) -> u32 {
        let Some(sink) = e.statements.as_mut() else { return bits };
        let lost = sink.lost();
        let handoff = sink.has_ran().then(|| sink.take());
        drop(e);
        let failed = match (handoff.map(statements::Handoff::send), lost) {
            (Some(Err(why)), _) | (_, Some(why)) => why,
            _ => return bits,
        };
        self.stop(Stop {
            reason: EndReason::AuditUnavailable,
            client_message: "terminating connection: tailgres cannot audit this session's statements".into(),
            detail: Some(failed),
        });
        END | self.lock().pending()
    }

    fn take(&self, e: &mut Engine, side: usize, data: &[u8], eof: bool) -> u32 {
        match e.take_in(side, data, eof, &self.moved[side]) {
            Err(why) => e.read_failed(side, why),
            Ok(false) => e.pending(),
            Ok(true) => {
                let reason = if side == CLIENT { EndReason::ClientClosed } else { EndReason::UpstreamClosed };
                e.first_closed.get_or_insert(reason);
                e.legs[1 - side].close_notify();
                HALF_CLOSE | e.pending()
            }
        }
    }

    /// Fills `buf` with bytes to write to `side`: less than `buf` holds
    /// once none are left.
    pub fn output(&self, side: usize, buf: &mut [u8]) -> usize {
        let mut e = self.lock();
        let leg = &mut e.legs[side];
        match &mut leg.tls {
            Some(t) => {
                let mut n = 0;
                while n < buf.len() && t.wants_write() {
                    let mut rest = &mut buf[n..];
                    match t.write_tls(&mut rest) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                n
            }
            None => {
                let out = &mut leg.plain_out;
                let n = out.len().min(buf.len());
                buf[..n].copy_from_slice(&out[..n]);
                out.drain(..n);
                // A bulk transfer keeps its buffer; once what is written is
                // small again (the end of a result, an interactive session)
                // a large one is freed.
                if out.is_empty() && out.capacity() > KEEP_PLAIN_OUT && n < KEEP_PLAIN_OUT {
                    *out = Vec::new();
                }
                n
            }
        }
    }

    /// Reading from (`writing` false) or writing to `side` failed.
    pub fn failed(&self, side: usize, writing: bool, err: &io::Error) -> u32 {
        let mut e = self.lock();
        if e.over() {
            // After a stop, a write cut short by the grace: the reason
            // stays the stop's.
            return END;
        }
        if !writing {
            return e.read_failed(side, err.to_string());
        }
        let reason = if side == UPSTREAM { EndReason::UpstreamError } else { EndReason::ClientError };
        e.end(reason, Some(err.to_string()))
    }

    /// The driver's wake-up for [`Relay::stop`] (set once).
    pub fn set_kick(&self, kick: Box<dyn Fn() + Send + Sync>) {
        let _ = self.kick.set(kick);
        // A stop that came first found no kick to call.
        if self.lock().over() {
            if let Some(kick) = self.kick.get() {
                kick();
            }
        }
    }

    /// Ends the session for the proxy's reason: the client is told why
    /// (when the server→client stream is between messages), both TLS legs
    /// get a close_notify, and the driver is woken to wind down. Nothing
    /// read after this is forwarded. False if the session had already
    /// ended.
    pub fn stop(&self, s: Stop) -> bool {
        {
            let mut e = self.lock();
            if e.over() {
                return false;
            }
            if e.frames[UPSTREAM].at_boundary() {
                let code = match s.reason {
                    EndReason::IdleTimeout => pgwire::sqlstate::IDLE_SESSION_TIMEOUT,
                    _ => pgwire::sqlstate::ADMIN_SHUTDOWN,
                };
                e.legs[CLIENT].send(&pgwire::fatal(code, &s.client_message));
            }
            for leg in &mut e.legs {
                leg.close_notify();
            }
            e.stopped = Some(s);
        }
        if let Some(kick) = self.kick.get() {
            kick();
        }
        true
    }

    /// The driver is done: both connections are closed.
    pub fn finished(&self) {
        self.lock().finished = true;
        self.done.notify_one();
    }

    /// Plaintext bytes forwarded so far, client→database and back.
    pub fn moved(&self) -> (u64, u64) {
        (self.moved[CLIENT].load(Ordering::Relaxed), self.moved[UPSTREAM].load(Ordering::Relaxed))
    }

    /// How it ended (call after [`Relay::finished`]).
    fn outcome(&self) -> RelayOutcome {
        let e = self.lock();
        let (reason, detail) = if let Some(s) = &e.stopped {
            (s.reason, s.detail.clone())
        } else if let Some((r, d)) = &e.ended {
            (*r, d.clone())
        } else if e.frames[UPSTREAM].fatal() {
            // The database said FATAL, and the client may have hung up
            // before the database's own close reached us.
            (EndReason::UpstreamClosed, None)
        } else if e.frames[CLIENT].terminated() {
            // A client that said Terminate ended the session, whichever
            // close came first.
            (EndReason::ClientTerminated, None)
        } else {
            (e.first_closed.unwrap_or(EndReason::ClientClosed), None)
        };
        let (c2u, u2c) = self.moved();
        RelayOutcome { client_to_upstream: c2u, upstream_to_client: u2c, reason, detail }
    }
}

/// How a session's client connection hands its data phase to a driver.
pub trait HandOff: Sized {
    /// From now on the connection's owner moves the bytes between it and
    /// `upstream` (the database's TCP connection), and `relay` decides.
    /// On error, both connections are closed and the relay never ran.
    fn hand_off(self, upstream: std::net::TcpStream, relay: Arc<Relay>) -> io::Result<()>;

    /// The same for a client that is a host socket (a Tailscale Service's
    /// connection) on this kind of tailnet. By default tokio tasks move
    /// the bytes.
    fn hand_off_socket(
        client: tokio::net::TcpStream,
        upstream: std::net::TcpStream,
        relay: Arc<Relay>,
    ) -> io::Result<()> {
        let upstream = tokio::net::TcpStream::from_std(upstream)?;
        tokio::spawn(drive(client, upstream, relay));
        Ok(())
    }
}

/// Waits for the relay to end, until either side ends it, `stop` resolves,
/// or (with `idle`) no byte has moved either way for that long. Pre-relay
/// byte counts (the handshake) are added by the caller.
pub async fn supervise<F>(relay: &Relay, idle: Option<Duration>, stop: F) -> RelayOutcome
where
    F: Future<Output = Stop>,
{
    let idle_stop = async {
        let Some(limit) = idle else { return std::future::pending().await };
        // Checked a few times per period: the session ends at most a
        // quarter period late, and an active session costs one timer.
        let mut tick = tokio::time::interval(limit / 4);
        let (mut seen, mut since) = (u64::MAX, tokio::time::Instant::now());
        loop {
            tick.tick().await;
            let (c2u, u2c) = relay.moved();
            if c2u + u2c != seen {
                (seen, since) = (c2u + u2c, tokio::time::Instant::now());
            } else if since.elapsed() >= limit {
                return Stop {
                    reason: EndReason::IdleTimeout,
                    client_message: format!(
                        "terminating connection: idle for {} (tailgres --idle-timeout)",
                        humantime::format_duration(limit)
                    ),
                    detail: Some(format!("no traffic either way for {limit:?}")),
                };
            }
        }
    };
    tokio::select! {
        biased;
        _ = relay.done.notified() => {}
        s = async { tokio::select! { s = stop => s, s = idle_stop => s } } => {
            relay.stop(s);
            // Every write the driver still makes is bounded by the grace;
            // this bound only guards against a driver that lost its way.
            if tokio::time::timeout(STOP_WRITE_GRACE * 3, relay.done.notified()).await.is_err() {
                tracing::error!("the relay did not end after it was stopped");
            }
        }
    }
    relay.outcome()
}

#[cfg(test)]
mod tests;
