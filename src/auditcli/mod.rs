//! `tailgres audit`: reads the JSON-lines audit log back for a person —
//! filtered, as a table or as the original lines, summarised as "who
//! accessed what, from which machine", or followed as it is written.
//!
//! The log is read line by line in bounded memory (a summary holds one
//! entry per group). The logs of several nodes (a fleet) are merged by time
//! ([`merge`]), holding one record per node. A line that is not a record is reported with its file
//! and line number and skipped; it makes the exit status 1 unless
//! `--lenient`. Nothing here writes to the log.
#![forbid(unsafe_code)]

mod entry;
mod filter;
mod input;
mod merge;
mod summary;
mod table;
pub mod verify;
mod when;

pub use entry::{Entry, LineError};
pub use filter::{EventKind, Filter, Glob, WhoPattern};
pub use when::{parse_instant, parse_rfc3339, TimeError};

use input::{Change, Followed};
/// The bounded line reader, for the fuzz targets (`tests/fuzz_audit.rs`).
#[doc(hidden)]
pub use input::{Item, Lines, MAX_LINE};
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use summary::{Report, StatementSummary, Summary};
use table::Table;

/// How often a followed file is checked for new lines and rotation.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// After a rotation, how long the old file is still read: a writer that
/// has not yet been told to reopen (logrotate's `create`, then a SIGHUP)
/// keeps appending there for a moment.
pub const RETIRE_GRACE: Duration = Duration::from_secs(5);
/// Malformed lines reported one by one; later ones are only counted.
const MAX_REPORTED: u64 = 20;

const ABOUT: &str = "Read tailgres audit logs: filter them, show them as a table or JSON lines, \
                     summarise who accessed what from which machine, or follow a live log";

const LONG_ABOUT: &str = "\
Read tailgres audit logs (JSON lines): filter them, show them as a table or JSON lines, \
summarise who accessed what from which machine, or follow a live log.

Files are read in the order given; with none, or `-`, standard input is read. Lines are \
read one at a time, so logs of any size take little memory. A line that is not an audit \
record is reported on stderr as FILE:LINE and skipped; blank lines are ignored.

Every record names the tailgres node that wrote it (`node`, its --hostname). Given the logs \
of several nodes (a fleet behind one Tailscale Service), tailgres audit merges them by time: \
consecutive files of one node (a log and its rotated files, oldest first) are read in turn, \
and the nodes' records interleave by their ts (records of the same time keep the order of \
the files). The table then shows each record's node (PROXY), --node picks nodes, and the \
summary counts each node apart.

The log's own records (log_opened, checkpoint) are left out unless --event names them. \
`tailgres audit verify FILE...` checks that logs are whole (their seq/prev chain and signed \
checkpoints); `tailgres audit keygen FILE` makes a checkpoint signing key.

Filters combine with AND. Repeating a filter flag means OR: `--who alice@example.com --who \
tag:ci` is alice's records and CI's. Patterns may use `*` (any run of characters) and `?` \
(one character); without them a pattern must match the whole value.";

const EXAMPLES: &str = "\
Examples:
  # Who accessed what, from which machine, in the last 24 hours
  tailgres audit --summary --since 24h /var/log/tailgres/audit.jsonl

  # Every refusal this week, as a table
  tailgres audit --event session_denied --since 7d /var/log/tailgres/audit.jsonl

  # Alice's sessions on the payroll database, as JSON for jq
  tailgres audit --who alice@example.com -d payroll --format json audit.jsonl | jq -c '{ts, event, detail}'

  # Everything CI's tagged devices did on 23 November (UTC)
  tailgres audit --who 'tag:ci' --since 2026-11-23 --until 2026-11-24 audit.jsonl

  # Which statements did CI's devices run this week, by fingerprint (statement audit)
  tailgres audit --summary --statements --who 'tag:ci' --since 7d audit.jsonl

  # Every run of one statement, and statements touching payroll
  tailgres audit --fingerprint 5735f5c64dd9f68e audit.jsonl
  tailgres audit --event statement --text '*payroll*' audit.jsonl

  # One session, including cancels aimed at it
  tailgres audit --session 3f9c2a7d1e5b4c60 audit.jsonl

  # Watch the live log; rotation (rename or copytruncate) is followed
  tailgres audit -f --event session_start,session_denied /var/log/tailgres/audit.jsonl

  # Rotated and compressed logs, oldest first
  zcat audit.jsonl.3.gz audit.jsonl.2.gz | tailgres audit --summary - audit.jsonl.1 audit.jsonl

  # A fleet: two nodes' logs merged by time; then only what pg-2 saw
  tailgres audit pg-1/audit.jsonl pg-2/audit.jsonl --since 1h
  tailgres audit --node pg-2 pg-1/audit.jsonl pg-2/audit.jsonl

Output columns (table): time, proxy (the tailgres node that wrote the record; shown when the \
records come from more than one), event, who (the user's login, or a tagged device's tags), \
node (the peer's machine), tailnet IP, database user@database, outcome (transport, auth method, denial or end \
reason and whose side caused it), bytes to and from the database and duration (session \
ends), session id (a cancel shows its own -> the target's), detail.

Summary: one row per (who, node, database user, database, and tailgres node): sessions let in \
(session_start), denied (session_denied), failed authentications (auth_failed), first and \
last record seen, and the bytes of its session_end records. Peers the tailnet could not \
identify are grouped by address. Only records inside --since/--until are counted. With \
--statements: one row per (who, statement fingerprint) of the statement records: count, \
errors, total, mean and slowest time, rows, and the statement's (normalized) text.

Exit status: 0 success (also when nothing matches); 1 some lines were not audit records \
(0 with --lenient); 2 bad usage, or a file could not be read.";

/// Arguments of `tailgres audit`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tailgres audit", bin_name = "tailgres audit", about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct AuditArgs {
    /// Audit logs to read, in order (`-`: standard input; none: standard input). Several
    /// nodes' logs are merged by time.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Records written by this tailgres node (its --hostname, the record's `node`;
    /// case-insensitive; `*` and `?` allowed).
    #[arg(long, value_name = "NAME")]
    pub node: Vec<String>,

    /// Peers whose user login, node name (full or first label), tag, stable node ID or
    /// tailnet IP matches PATTERN (case-insensitive; `*` and `?` allowed).
    #[arg(long, value_name = "PATTERN")]
    pub who: Vec<String>,

    /// Sessions to this database (`*` and `?` allowed).
    #[arg(long, short = 'd', value_name = "DB")]
    pub database: Vec<String>,

    /// Sessions as this database user (`*` and `?` allowed).
    #[arg(long, short = 'U', value_name = "DBUSER")]
    pub user: Vec<String>,

    /// Records of these events (repeatable, or comma-separated).
    #[arg(long, short = 'e', value_name = "EVENT", value_delimiter = ',')]
    pub event: Vec<EventKind>,

    /// Records at or after TIME: RFC 3339 (2026-11-23T14:03:07Z, 2026-11-23T15:03+01:00,
    /// 2026-11-23; no zone means UTC) or a duration ago (30m, 24h, 7d, 1h30m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// Records before TIME (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,

    /// Records of this session id (`*` and `?` allowed), including cancels aimed at it.
    #[arg(long, value_name = "ID")]
    pub session: Vec<String>,

    /// After the end of FILE, keep reading what is appended to it (checked every 250 ms),
    /// across rotation, until interrupted. One file only.
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// Output format [default: table on a terminal, json otherwise]. json prints the
    /// matching records unchanged, one per line.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<Format>,

    /// Print one line per (who, node, database user, database, tailgres node) instead of
    /// the records.
    #[arg(long)]
    pub summary: bool,

    /// With --summary: one line per (who, statement fingerprint) instead: count, errors,
    /// total, mean and slowest time, rows, and the statement's text.
    #[arg(long, requires = "summary")]
    pub statements: bool,

    /// Statement records with this fingerprint (`*` and `?` allowed).
    #[arg(long, value_name = "HEX")]
    pub fingerprint: Vec<String>,

    /// Statement records whose text matches PATTERN (case-insensitive; `*` and `?` allowed:
    /// `--text '*payroll*'`).
    #[arg(long, value_name = "PATTERN")]
    pub text: Vec<String>,

    /// Exit 0 even if some lines were not audit records (they are still reported).
    #[arg(long)]
    pub lenient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Flags that cannot be run as given.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("--{flag}: {source}")]
    Time {
        flag: &'static str,
        #[source]
        source: TimeError,
    },
    #[error("--since {since} is not before --until {until}: nothing can match")]
    EmptyWindow { since: String, until: String },
    #[error("--follow needs a file to follow (standard input cannot be rotated or reopened)")]
    FollowStdin,
    #[error("--follow follows one file, not {0}")]
    FollowManyFiles(usize),
    #[error("--follow and --summary do not go together (a summary is printed at the end of the input)")]
    FollowSummary,
}

/// Failures that stop the whole run (unreadable inputs do not: they are
/// reported and the next input is read).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    #[error("cannot follow {}: {source}", path.display())]
    Follow {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up signal handling or the poll timer: {0}")]
    Runtime(#[source] io::Error),
}

/// Where records come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stdin,
    File(PathBuf),
}

/// Validated arguments: what to read, keep and print.
#[derive(Debug, Clone)]
pub struct Query {
    pub sources: Vec<Source>,
    pub filter: Filter,
    pub format: Format,
    pub summary: bool,
    /// `--summary --statements`.
    pub statements: bool,
    pub follow: bool,
    pub lenient: bool,
}

impl Query {
    /// Checks the arguments; relative times are taken back from `now`.
    pub fn new(args: &AuditArgs, now: SystemTime, stdout_is_terminal: bool) -> Result<Query, UsageError> {
        let time = |flag: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|t| parse_instant(t, now).map_err(|source| UsageError::Time { flag, source }))
                .transpose()
        };
        let since = time("since", &args.since)?;
        let until = time("until", &args.until)?;
        if let (Some(s), Some(u)) = (since, until) {
            if s >= u {
                return Err(UsageError::EmptyWindow {
                    since: args.since.clone().unwrap_or_default(),
                    until: args.until.clone().unwrap_or_default(),
                });
            }
        }
        let sources: Vec<Source> = if args.files.is_empty() {
            vec![Source::Stdin]
        } else {
            args.files
                .iter()
                .map(|f| if f.as_os_str() == "-" { Source::Stdin } else { Source::File(f.clone()) })
                .collect()
        };
        if args.follow {
            if args.summary {
                return Err(UsageError::FollowSummary);
            }
            if sources.len() > 1 {
                return Err(UsageError::FollowManyFiles(sources.len()));
            }
            if sources[0] == Source::Stdin {
                return Err(UsageError::FollowStdin);
            }
        }
        let filter = Filter {
            who: args.who.iter().map(|p| WhoPattern::new(p)).collect(),
            databases: args.database.iter().map(|p| Glob::new(p, false)).collect(),
            users: args.user.iter().map(|p| Glob::new(p, false)).collect(),
            events: args.event.clone(),
            since,
            until,
            sessions: args.session.iter().map(|p| Glob::new(p, true)).collect(),
            fingerprints: args.fingerprint.iter().map(|p| Glob::new(p, true)).collect(),
            texts: args.text.iter().map(|p| Glob::new(p, true)).collect(),
            nodes: args.node.iter().map(|p| Glob::new(p, true)).collect(),
        };
        let format = args.format.unwrap_or(if stdout_is_terminal { Format::Table } else { Format::Json });
        Ok(Query {
            sources,
            filter,
            format,
            summary: args.summary,
            statements: args.statements,
            follow: args.follow,
            lenient: args.lenient,
        })
    }
}

/// What the run met, for the exit status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub records: u64,
    pub malformed: u64,
    pub unreadable: u64,
}

impl Outcome {
    pub fn exit_code(&self, lenient: bool) -> i32 {
        if self.unreadable > 0 {
            2
        } else if self.malformed > 0 && !lenient {
            1
        } else {
            0
        }
    }
}

/// Runs `tailgres audit` and returns the process exit status.
pub fn main(args: AuditArgs) -> i32 {
    let query = match Query::new(&args, SystemTime::now(), io::stdout().is_terminal()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("tailgres audit: {e}");
            return 2;
        }
    };
    if query.sources.contains(&Source::Stdin) && io::stdin().is_terminal() {
        eprintln!("tailgres audit: reading the audit log from standard input (give a FILE to read one)");
    }
    let stdout = io::stdout().lock();
    match run(&query, io::BufWriter::with_capacity(64 * 1024, stdout)) {
        Ok(outcome) => outcome.exit_code(query.lenient),
        // The reader went away (`| head`): stop quietly, as cat does.
        Err(RunError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("tailgres audit: {e}");
            2
        }
    }
}

/// Reads every source (or follows the one file) and writes to `out`.
pub fn run<W: Write>(query: &Query, out: W) -> Result<Outcome, RunError> {
    let output = match (query.summary, query.format) {
        (true, _) if query.statements => Output::Statements(StatementSummary::default()),
        (true, _) => Output::Summary(Summary::default()),
        (false, Format::Json) => Output::Json,
        (false, Format::Table) => Output::Table(table::records()),
    };
    let mut sink = Sink { filter: &query.filter, out, output, outcome: Outcome::default() };
    if query.follow {
        match query.sources.as_slice() {
            [Source::File(path)] => follow(&mut sink, path)?,
            [Source::Stdin] => return Err(UsageError::FollowStdin.into()),
            many => return Err(UsageError::FollowManyFiles(many.len()).into()),
        }
    } else if let [source] = query.sources.as_slice() {
        read_source(&mut sink, source)?;
    } else {
        merge::merge(&mut sink, &query.sources)?;
    }
    sink.finish(query.format)
}

fn read_source<W: Write>(sink: &mut Sink<'_, W>, source: &Source) -> Result<(), RunError> {
    let (name, result) = match source {
        Source::Stdin => ("<stdin>".to_string(), read_all(sink, "<stdin>", io::stdin().lock(), true)),
        Source::File(path) => {
            let name = path.display().to_string();
            let result = match File::open(path) {
                Ok(f) => read_all(sink, &name, f, false),
                Err(e) => Err(Failure::Input(e)),
            };
            (name, result)
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(Failure::Output(e)) => Err(RunError::Output(e)),
        Err(Failure::Input(e)) => {
            eprintln!("tailgres audit: cannot read {name}: {e}");
            sink.outcome.unreadable += 1;
            Ok(())
        }
    }
}

enum Failure {
    Input(io::Error),
    Output(io::Error),
}

/// Reads `input` to its end. `live` inputs (pipes) have output flushed
/// whenever reading would wait, so `tail -f log | tailgres audit` shows
/// records as they come.
fn read_all<W: Write>(
    sink: &mut Sink<'_, W>,
    name: &str,
    input: impl Read,
    live: bool,
) -> Result<(), Failure> {
    let mut lines = Lines::new(input);
    loop {
        if live && !lines.has_buffered() {
            sink.idle().map_err(Failure::Output)?;
        }
        match lines.next(true).map_err(Failure::Input)? {
            Some((number, item)) => sink.item(name, number, item).map_err(Failure::Output)?,
            None => return Ok(()),
        }
    }
}

/// Reads every complete line `f` has now.
fn drain<W: Write>(sink: &mut Sink<'_, W>, f: &mut Followed, eof_ends_line: bool) -> Result<(), RunError> {
    let name = f.path.display().to_string();
    loop {
        match f.lines.next(eof_ends_line) {
            Ok(Some((number, item))) => sink.item(&name, number, item).map_err(RunError::Output)?,
            Ok(None) => return Ok(()),
            Err(source) => return Err(RunError::Follow { path: f.path.clone(), source }),
        }
    }
}

/// `--follow`: read the file, then poll it until SIGINT, SIGTERM or SIGHUP.
fn follow<W: Write>(sink: &mut Sink<'_, W>, path: &Path) -> Result<(), RunError> {
    let mut current =
        Followed::open(path).map_err(|source| RunError::Follow { path: path.to_owned(), source })?;
    // The file that was rotated away, still read for RETIRE_GRACE.
    let mut retiring: Option<(Followed, Instant)> = None;
    let mut reopen_failed = false;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(RunError::Runtime)?;
    rt.block_on(async {
        let mut signals = crate::signals::Signals::new().map_err(RunError::Runtime)?;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some((old, since)) = &mut retiring {
                let done = since.elapsed() >= RETIRE_GRACE;
                drain(sink, old, done)?;
                if done {
                    retiring = None;
                }
            }
            drain(sink, &mut current, false)?;
            match current.check() {
                Change::None => {}
                Change::Truncated => {
                    eprintln!("tailgres audit: {} was truncated; reading it from the start", path.display());
                    current.rewind().map_err(|source| RunError::Follow { path: path.to_owned(), source })?;
                    continue;
                }
                Change::Replaced => match Followed::open(path) {
                    Ok(new) => {
                        eprintln!(
                            "tailgres audit: {} was replaced (rotated); reading the new file",
                            path.display()
                        );
                        reopen_failed = false;
                        let old = std::mem::replace(&mut current, new);
                        // A file rotated away twice within the grace period
                        // is read to its end now.
                        if let Some((mut older, _)) = retiring.replace((old, Instant::now())) {
                            drain(sink, &mut older, true)?;
                        }
                        continue;
                    }
                    Err(e) => {
                        // Renamed again, or not yet readable: keep the
                        // open file and try again on the next poll.
                        if !reopen_failed && e.kind() != io::ErrorKind::NotFound {
                            eprintln!("tailgres audit: cannot open the new {}: {e}", path.display());
                        }
                        reopen_failed = true;
                    }
                },
            }
            sink.idle().map_err(RunError::Output)?;
            tokio::select! {
                _ = tick.tick() => {}
                _ = signals.recv() => break,
            }
        }
        Ok(())
    })
}

/// Prints a summary; says whether a table had nothing to show.
fn report(s: impl Report, format: Format, out: &mut impl Write) -> Result<bool, RunError> {
    let empty = s.is_empty();
    match format {
        Format::Json => s.write_json(out),
        Format::Table => s.write_table(out),
    }
    .map_err(RunError::Output)?;
    Ok(empty && format == Format::Table)
}

/// Where matching records go.
enum Output {
    Json,
    Table(Table),
    Summary(Summary),
    Statements(StatementSummary),
}

struct Sink<'q, W: Write> {
    filter: &'q Filter,
    out: W,
    output: Output,
    outcome: Outcome,
}

impl<W: Write> Sink<'_, W> {
    fn item(&mut self, name: &str, number: u64, item: Item<'_>) -> io::Result<()> {
        match self.parse(name, number, &item) {
            Some(entry) => self.emit(&entry, item.line()),
            None => Ok(()),
        }
    }

    /// The record on a line; `None` for a blank line or one that is not a
    /// record (reported).
    fn parse(&mut self, name: &str, number: u64, item: &Item<'_>) -> Option<Entry> {
        let line = match item {
            Item::TooLong => {
                self.malformed(name, number, LineError::TooLong(input::MAX_LINE));
                return None;
            }
            Item::Line(line) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        match Entry::parse(line) {
            Ok(e) => Some(e),
            Err(e) => {
                self.malformed(name, number, e);
                None
            }
        }
    }

    /// Shows (or counts) `entry`, whose line is `line`, if it matches.
    fn emit(&mut self, entry: &Entry, line: &[u8]) -> io::Result<()> {
        if !self.filter.matches(entry) {
            return Ok(());
        }
        self.outcome.records += 1;
        match &mut self.output {
            Output::Json => {
                self.out.write_all(line)?;
                self.out.write_all(b"\n")
            }
            Output::Table(t) => t.row(&mut self.out, table::record_row(entry)),
            Output::Summary(s) => {
                s.add(entry);
                Ok(())
            }
            Output::Statements(s) => {
                s.add(entry);
                Ok(())
            }
        }
    }

    fn malformed(&mut self, name: &str, number: u64, e: LineError) {
        self.outcome.malformed += 1;
        if self.outcome.malformed <= MAX_REPORTED {
            eprintln!("tailgres audit: {name}:{number}: skipped: {e}");
        }
        if self.outcome.malformed == MAX_REPORTED + 1 {
            eprintln!("tailgres audit: more lines are not audit records; counting them without showing them");
        }
    }

    /// The records come from several tailgres nodes: the table shows whose
    /// each is.
    fn several_nodes(&mut self) {
        if let Output::Table(t) = &mut self.output {
            t.show(table::PROXY_COLUMN, true);
        }
    }

    /// The input has nothing more for now: show what is held back.
    fn idle(&mut self) -> io::Result<()> {
        if let Output::Table(t) = &mut self.output {
            t.flush(&mut self.out)?;
        }
        self.out.flush()
    }

    fn finish(mut self, format: Format) -> Result<Outcome, RunError> {
        let empty = match std::mem::replace(&mut self.output, Output::Json) {
            Output::Json => false,
            Output::Table(mut t) => {
                let empty = t.is_empty();
                t.flush(&mut self.out).map_err(RunError::Output)?;
                empty
            }
            Output::Summary(s) => report(s, format, &mut self.out)?,
            Output::Statements(s) => report(s, format, &mut self.out)?,
        };
        self.out.flush().map_err(RunError::Output)?;
        if empty {
            eprintln!("tailgres audit: no matching records");
        }
        if self.outcome.malformed > 0 {
            let n = self.outcome.malformed;
            eprintln!(
                "tailgres audit: {n} line{} skipped (not audit records)",
                if n == 1 { "" } else { "s" }
            );
        }
        Ok(self.outcome)
    }
}

#[cfg(test)]
mod tests;
