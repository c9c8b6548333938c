//! Follows the data phase's messages, both ways, to tell which statements
//! ran and how each ended, without I/O and without copying the data
//! stream: only the bodies of the few messages it needs (a query's text, a
//! statement or portal name, a command tag, an error's SQLSTATE) are kept,
//! each up to a bound; rows and COPY data are counted and skipped.
//!
//! PostgreSQL answers a connection's messages in order, so a queue of what
//! the client asked for pairs each answer with its question: a Query ('Q')
//! waits for ReadyForQuery and collects one result per statement in it;
//! an Execute ('E') is answered by CommandComplete, an error, an empty
//! query or PortalSuspended; after an error in the extended protocol the
//! server skips to the next Sync, and so does the queue. Parse and Bind
//! only name things: the prepared statement's text follows its name to
//! the portal and from the portal to each Execute.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// A Query or Parse text longer than this is not kept (its statement is
/// recorded with a digest of its text instead).
pub const MAX_TEXT: usize = 256 * 1024;
/// Other messages whose body is read keep at most this much of it (names,
/// tags and the SQLSTATE come first).
const MAX_SMALL: usize = 4096;
/// Prepared statements and portals followed per session; a client that
/// makes more (the database would hold them all) gets the oldest names
/// forgotten, and statements run through them recorded without text.
const MAX_NAMES: usize = 10_000;
/// Questions waiting for their answers (a pipeline this deep, with no
/// answer read, is not a real client's).
pub const MAX_PENDING: usize = 65_536;
/// Statement text one session may have the tracker hold, in prepared
/// statements (and in Queries waiting for their answers, separately):
/// past it, texts are kept as their digest, so a client cannot make the
/// proxy hold more than this however many statements it prepares.
pub const TEXT_BUDGET: usize = 2 << 20;

/// Which way a COPY went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// Into the database (`COPY … FROM STDIN`).
    In,
    /// Out of it (`COPY … TO STDOUT`).
    Out,
    /// Both (replication's CopyBoth).
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    pub direction: CopyDirection,
    /// CopyData bytes (payload), either way.
    pub bytes: u64,
}

/// How a statement ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// CommandComplete, with its tag (`SELECT 3`, `INSERT 0 1`, `BEGIN`).
    Complete(String),
    /// ErrorResponse, with its SQLSTATE when it had one.
    Error(Option<String>),
    /// PortalSuspended: the Execute's row limit was reached.
    Suspended,
}

/// One statement's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Result {
    pub finished: Instant,
    pub outcome: Outcome,
    pub copy: Option<Copy>,
}

/// The statement's text as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    Sql(Arc<str>),
    /// Longer than [`MAX_TEXT`]: its SHA-256 and length.
    TooLong {
        sha256: [u8; 32],
        len: usize,
    },
    /// Not valid UTF-8, or run through a prepared statement or portal that
    /// was not followed.
    Unknown,
}

/// One bind value, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Null,
    /// Text format.
    Text(String),
    /// Binary format.
    Binary(Vec<u8>),
}

/// A portal's bind values (kept only when the tracker was asked to).
pub type Params = Option<Arc<[Param]>>;

/// What the tracker saw run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// A simple-protocol Query: its whole text (one or more statements)
    /// and one result per statement that ran, in order.
    Query { text: Text, started: Instant, results: Vec<Result> },
    /// One extended-protocol Execute, with its portal's bind values when
    /// they are kept.
    Execute { text: Text, params: Params, started: Instant, result: Result },
}

/// Why the tracker gave up on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// More than [`MAX_PENDING`] questions without answers.
    Pipeline,
}

enum Pending {
    Query { text: Text, started: Instant, results: Vec<Result>, copy: Option<Copy> },
    Execute { text: Text, params: Params, started: Instant, copy: Option<Copy> },
    Sync,
}

/// Reads one direction's messages: header, then the body, of which only
/// the wanted part is kept.
#[derive(Default)]
struct Reader {
    header: [u8; 5],
    header_len: usize,
    kind: u8,
    /// Body bytes still to come.
    remaining: usize,
    body_len: usize,
    keep: usize,
    body: Vec<u8>,
    /// A Query/Parse too long to keep: its digest so far.
    digest: Option<sha2::Sha256>,
}

/// One message, as handed to the tracker.
struct Message<'a> {
    kind: u8,
    len: usize,
    /// The kept part of the body (its start, if the body was longer than
    /// what its kind keeps).
    body: &'a [u8],
    digest: Option<[u8; 32]>,
}

impl Reader {
    /// Feeds bytes; calls `on` for every complete message. `wants` says
    /// how much of a message kind's body to keep.
    fn feed(&mut self, mut buf: &[u8], wants: impl Fn(u8) -> usize, mut on: impl FnMut(Message<'_>)) {
        use sha2::Digest;
        while !buf.is_empty() {
            if self.header_len < 5 {
                let n = (5 - self.header_len).min(buf.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
                self.header_len += n;
                buf = &buf[n..];
                if self.header_len < 5 {
                    return;
                }
                self.kind = self.header[0];
                let len =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.body_len = (len as usize).saturating_sub(4);
                self.remaining = self.body_len;
                self.keep = wants(self.kind);
                self.body.clear();
                self.digest = None;
            }
            let n = self.remaining.min(buf.len());
            let chunk = &buf[..n];
            buf = &buf[n..];
            self.remaining -= n;
            if self.keep > 0 {
                let room = self.keep.saturating_sub(self.body.len());
                if self.digest.is_none() && chunk.len() > room && self.keep == MAX_TEXT {
                    // Too long to keep: digest it all instead.
                    let mut d = sha2::Sha256::new();
                    d.update(&self.body);
                    self.digest = Some(d);
                    self.body = Vec::new();
                }
                match &mut self.digest {
                    Some(d) => d.update(chunk),
                    None => self.body.extend_from_slice(&chunk[..chunk.len().min(room)]),
                }
            }
            if self.remaining == 0 {
                self.header_len = 0;
                let digest = self.digest.take().map(|d| d.finalize().into());
                on(Message { kind: self.kind, len: self.body_len, body: &self.body, digest });
                if self.body.capacity() > MAX_SMALL * 4 {
                    self.body = Vec::new();
                }
            }
        }
    }
}

/// A NUL-terminated string at the start of `b`, and what follows it.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// The statement text of a Query or Parse body part.
/// `room`: how much text may still be kept; a text past it is kept as
/// its digest.
fn text_of(msg: &Message<'_>, raw: &[u8], room: usize) -> Text {
    use sha2::Digest;
    if let Some(sha256) = msg.digest {
        return Text::TooLong { sha256, len: msg.len };
    }
    if raw.len() > room {
        return Text::TooLong { sha256: sha2::Sha256::digest(raw).into(), len: raw.len() };
    }
    match std::str::from_utf8(raw) {
        Ok(s) => Text::Sql(Arc::from(s)),
        Err(_) => Text::Unknown,
    }
}

impl Text {
    /// Bytes of text kept.
    fn kept(&self) -> usize {
        match self {
            Text::Sql(s) => s.len(),
            _ => 0,
        }
    }
}

/// The statements of one session, as they run.
#[derive(Default)]
pub struct Tracker {
    readers: [Reader; 2],
    prepared: Names,
    portals: Names,
    pending: VecDeque<Pending>,
    lost: Option<Lost>,
    /// Keep bind values (`--audit-statement-text raw`).
    params: bool,
    /// Text held by Queries waiting for their answers.
    queued: usize,
}

/// Names (prepared statements or portals) and their text (and a portal's
/// bind values), bounded.
#[derive(Default)]
struct Names {
    map: HashMap<Box<[u8]>, (Text, Params)>,
    order: VecDeque<Box<[u8]>>,
    /// Text held by `map` (within [`TEXT_BUDGET`]; shared texts count
    /// once per name).
    kept: usize,
}

impl Names {
    fn insert(&mut self, name: &[u8], text: Text, params: Params) {
        self.kept += text.kept();
        match self.map.insert(name.into(), (text, params)) {
            Some((old, _)) => self.kept -= old.kept(),
            None => self.order.push_back(name.into()),
        }
        // The oldest names go first.
        while self.map.len() > MAX_NAMES || self.kept > TEXT_BUDGET {
            let Some(old) = self.order.pop_front() else { break };
            if old.as_ref() != name {
                self.remove(&old);
            } else {
                self.order.push_back(old);
                if self.map.len() == 1 {
                    break;
                }
            }
        }
    }

    fn get(&self, name: &[u8]) -> (Text, Params) {
        self.map.get(name).cloned().unwrap_or((Text::Unknown, None))
    }

    fn remove(&mut self, name: &[u8]) {
        // `order` keeps the name until it comes up; bounded all the same.
        if let Some((old, _)) = self.map.remove(name) {
            self.kept -= old.kept();
        }
        if self.order.len() > 2 * MAX_NAMES {
            self.order.retain(|n| self.map.contains_key(n));
        }
    }
}

impl Tracker {
    /// A tracker that also keeps each Execute's bind values (for raw text;
    /// never by default).
    pub fn with_params() -> Tracker {
        Tracker { params: true, ..Tracker::default() }
    }

    /// Bytes the client sent (`client`) or the database sent, in order, as
    /// they were forwarded; `now` is when they arrived. What finished is
    /// pushed to `ran`.
    pub fn feed(&mut self, client: bool, bytes: &[u8], now: Instant, ran: &mut Vec<Ran>) {
        if self.lost.is_some() {
            return;
        }
        let [c, s] = &mut self.readers;
        if client {
            let (prepared, portals, pending, lost, params, queued) = (
                &mut self.prepared,
                &mut self.portals,
                &mut self.pending,
                &mut self.lost,
                self.params,
                &mut self.queued,
            );
            let wants = |kind| if kind == b'B' && params { MAX_TEXT } else { client_wants(kind) };
            c.feed(bytes, wants, |m| {
                Self::client_message(prepared, portals, pending, lost, params, queued, m, now)
            });
        } else {
            let (pending, queued) = (&mut self.pending, &mut self.queued);
            s.feed(bytes, server_wants, |m| Self::server_message(pending, queued, m, now, ran));
        }
    }

    /// Set once the tracker gave up (the session should end: its
    /// statements can no longer be told apart).
    pub fn lost(&self) -> Option<&Lost> {
        self.lost.as_ref()
    }

    fn client_message(
        prepared: &mut Names,
        portals: &mut Names,
        pending: &mut VecDeque<Pending>,
        lost: &mut Option<Lost>,
        keep_params: bool,
        queued: &mut usize,
        m: Message<'_>,
        now: Instant,
    ) {
        let push = |pending: &mut VecDeque<Pending>, lost: &mut Option<Lost>, p: Pending| {
            if pending.len() >= MAX_PENDING {
                *lost = Some(Lost::Pipeline);
            } else {
                pending.push_back(p);
            }
        };
        match m.kind {
            b'Q' => {
                let raw = m.body.strip_suffix(b"\0").unwrap_or(m.body);
                let text = text_of(&m, raw, TEXT_BUDGET.saturating_sub(*queued));
                *queued += text.kept();
                push(pending, lost, Pending::Query { text, started: now, results: Vec::new(), copy: None });
            }
            b'P' => {
                let Some((name, rest)) = cstr(m.body) else { return };
                let text = match cstr(rest) {
                    // Kept whole: the oldest names make room.
                    Some((q, _)) => text_of(&m, q, TEXT_BUDGET),
                    None if m.digest.is_some() => text_of(&m, rest, 0),
                    None => Text::Unknown,
                };
                prepared.insert(name, text, None);
            }
            b'B' => {
                let Some((portal, rest)) = cstr(m.body) else { return };
                let Some((statement, values)) = cstr(rest) else { return };
                let params = match (keep_params, m.digest) {
                    (true, None) => bind_values(values).map(Arc::from),
                    _ => None,
                };
                portals.insert(portal, prepared.get(statement).0, params);
            }
            b'E' => {
                let Some((portal, _)) = cstr(m.body) else { return };
                let (text, params) = portals.get(portal);
                push(pending, lost, Pending::Execute { text, params, started: now, copy: None });
            }
            b'C' => {
                let Some((&which, rest)) = m.body.split_first() else { return };
                let Some((name, _)) = cstr(rest) else { return };
                match which {
                    b'S' => prepared.remove(name),
                    b'P' => portals.remove(name),
                    _ => {}
                }
            }
            b'S' => push(pending, lost, Pending::Sync),
            b'd' => {
                if let Some(copy) = pending.front_mut().and_then(Pending::copy) {
                    copy.bytes += m.len as u64;
                }
            }
            _ => {}
        }
    }

    fn server_message(
        pending: &mut VecDeque<Pending>,
        queued: &mut usize,
        m: Message<'_>,
        now: Instant,
        ran: &mut Vec<Ran>,
    ) {
        let finish = |outcome: Outcome, copy: Option<Copy>| Result { finished: now, outcome, copy };
        match m.kind {
            b'C' | b'E' | b's' => {
                let outcome = match m.kind {
                    b'C' => Outcome::Complete(
                        String::from_utf8_lossy(cstr(m.body).map_or(m.body, |(t, _)| t)).into_owned(),
                    ),
                    b'E' => Outcome::Error(sqlstate(m.body)),
                    _ => Outcome::Suspended,
                };
                let error = m.kind == b'E';
                match pending.front_mut() {
                    Some(Pending::Query { results, copy, .. }) => results.push(finish(outcome, copy.take())),
                    Some(Pending::Execute { .. }) => {
                        let Some(Pending::Execute { text, params, started, copy }) = pending.pop_front()
                        else {
                            return;
                        };
                        ran.push(Ran::Execute { text, params, started, result: finish(outcome, copy) });
                        if error {
                            // The server skips to the next Sync: those
                            // Executes never run.
                            while matches!(pending.front(), Some(Pending::Execute { .. })) {
                                pending.pop_front();
                            }
                        }
                    }
                    // An error for a Parse or Bind that no Execute
                    // followed, or none asked for.
                    Some(Pending::Sync) | None => {}
                }
            }
            b'I' => match pending.front() {
                // An empty query: nothing ran.
                Some(Pending::Execute { .. }) => drop(pending.pop_front()),
                _ => {}
            },
            b'G' | b'H' | b'W' => {
                let direction = match m.kind {
                    b'G' => CopyDirection::In,
                    b'H' => CopyDirection::Out,
                    _ => CopyDirection::Both,
                };
                if let Some(c) = pending.front_mut().and_then(Pending::copy_slot) {
                    *c = Some(Copy { direction, bytes: 0 });
                }
            }
            b'd' => {
                if let Some(copy) = pending.front_mut().and_then(Pending::copy) {
                    copy.bytes += m.len as u64;
                }
            }
            b'Z' => {
                // Answers everything up to and including the first Query
                // or Sync.
                while let Some(p) = pending.pop_front() {
                    match p {
                        Pending::Query { text, started, results, .. } => {
                            *queued = queued.saturating_sub(text.kept());
                            ran.push(Ran::Query { text, started, results });
                            break;
                        }
                        Pending::Sync => break,
                        Pending::Execute { .. } => {}
                    }
                }
            }
            _ => {}
        }
    }
}

impl Pending {
    fn copy_slot(&mut self) -> Option<&mut Option<Copy>> {
        match self {
            Pending::Query { copy, .. } | Pending::Execute { copy, .. } => Some(copy),
            Pending::Sync => None,
        }
    }

    fn copy(&mut self) -> Option<&mut Copy> {
        self.copy_slot()?.as_mut()
    }
}

/// The parameter values of a Bind body after the portal and statement
/// names: format codes, then each value (length -1: NULL). `None` if the
/// body does not hold together.
fn bind_values(b: &[u8]) -> Option<Vec<Param>> {
    let int16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize);
    let nformats = int16(b, 0)?;
    let formats: Vec<usize> = (0..nformats).map(|i| int16(b, 2 + 2 * i)).collect::<Option<_>>()?;
    let mut at = 2 + 2 * nformats;
    let n = int16(b, at)?;
    at += 2;
    let mut values = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            values.push(Param::Null);
            continue;
        }
        let v = b.get(at..at + len as usize)?;
        at += len as usize;
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => *formats.get(i)? == 1,
        };
        values.push(if binary {
            Param::Binary(v.to_vec())
        } else {
            Param::Text(String::from_utf8_lossy(v).into_owned())
        });
    }
    Some(values)
}

/// The SQLSTATE ('C' field) of an ErrorResponse body.
fn sqlstate(mut body: &[u8]) -> Option<String> {
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            return None;
        }
        let (value, after) = cstr(rest)?;
        if field == b'C' {
            return std::str::from_utf8(value).ok().map(str::to_owned);
        }
        body = after;
    }
    None
}

/// How much of a client message's body to keep.
fn client_wants(kind: u8) -> usize {
    match kind {
        b'Q' | b'P' => MAX_TEXT,
        b'B' | b'E' | b'C' => MAX_SMALL,
        _ => 0,
    }
}

/// How much of a server message's body to keep.
fn server_wants(kind: u8) -> usize {
    match kind {
        b'C' | b'E' => MAX_SMALL,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
