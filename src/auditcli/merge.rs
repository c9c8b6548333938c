//! Several inputs at once: the logs of a fleet's nodes, merged by time.
//!
//! Every node writes its own log, so `tailgres audit pg-1/audit.jsonl
//! pg-2/audit.jsonl` has two streams of records, each in its own order.
//! Only records the filter lets through are merged. Inputs given one
//! after another whose first such records name the same node (a log and
//! its rotated files, or logs from before records named their node) are
//! one stream, read in turn as given; the streams are merged by
//! `ts`, a record of the same time as another going after it only if its
//! stream was given later. A stream's own order is never changed, so a
//! node whose clock stepped back still reads as it wrote.
//!
//! Memory: one record (and one read buffer) per input, whatever the logs'
//! sizes.
#![forbid(unsafe_code)]

use super::entry::Entry;
use super::input::Lines;
use super::{RunError, Sink, Source};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};

/// A record read ahead: what it says and its line, unchanged.
struct Record {
    entry: Entry,
    line: Vec<u8>,
}

/// One input being read.
struct Input {
    name: String,
    lines: Lines<Box<dyn Read>>,
    /// Its first record, read to learn its node and not yet shown.
    first: Option<Record>,
}

/// The inputs of one node, in the order given, and its next record.
struct Stream {
    node: Option<String>,
    inputs: VecDeque<Input>,
    head: Option<Record>,
}

/// Reads every source, the nodes' records merged by time, into `sink`.
pub(super) fn merge<W: Write>(sink: &mut Sink<'_, W>, sources: &[Source]) -> Result<(), RunError> {
    let mut streams: Vec<Stream> = Vec::new();
    for source in sources {
        let Some(mut input) = open(sink, source) else { continue };
        input.first = next_record(sink, &mut input);
        // Nothing in it (or nothing readable): nothing to merge.
        let Some(first) = &input.first else { continue };
        let node = first.entry.proxy.clone();
        match streams.last_mut() {
            Some(s) if s.node == node => s.inputs.push_back(input),
            _ => streams.push(Stream { node, inputs: VecDeque::from([input]), head: None }),
        }
    }
    // Records of several nodes: the table says whose each is.
    let mut nodes: Vec<&Option<String>> = streams.iter().map(|s| &s.node).collect();
    nodes.sort();
    nodes.dedup();
    if nodes.len() > 1 {
        sink.several_nodes();
    }
    for s in &mut streams {
        advance(sink, s);
    }
    // The earliest head; ties go to the stream given first. A linear scan:
    // streams are a fleet's nodes, a handful.
    while let Some(i) = streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.head.as_ref().map(|h| (h.entry.time, i)))
        .min()
        .map(|(_, i)| i)
    {
        if let Some(r) = streams[i].head.take() {
            sink.emit(&r.entry, &r.line).map_err(RunError::Output)?;
        }
        advance(sink, &mut streams[i]);
    }
    Ok(())
}

/// Opens a source; one that cannot be read is reported and counted.
fn open<W: Write>(sink: &mut Sink<'_, W>, source: &Source) -> Option<Input> {
    let (name, reader): (String, io::Result<Box<dyn Read>>) = match source {
        Source::Stdin => ("<stdin>".into(), Ok(Box::new(io::stdin().lock()))),
        Source::File(path) => {
            (path.display().to_string(), File::open(path).map(|f| Box::new(f) as Box<dyn Read>))
        }
    };
    match reader {
        Ok(r) => Some(Input { name, lines: Lines::new(r), first: None }),
        Err(e) => {
            unreadable(sink, &name, &e);
            None
        }
    }
}

fn unreadable<W: Write>(sink: &mut Sink<'_, W>, name: &str, e: &io::Error) {
    eprintln!("tailgres audit: cannot read {name}: {e}");
    sink.outcome.unreadable += 1;
}

/// The next record of `input` that the filter lets through, lines that are
/// not records reported on the way; `None` at its end (or when it cannot
/// be read further, reported).
fn next_record<W: Write>(sink: &mut Sink<'_, W>, input: &mut Input) -> Option<Record> {
    loop {
        match input.lines.next(true) {
            Ok(Some((number, item))) => {
                // Records no filter lets through take no part in the
                // merge (nor do the log's own, with their own times).
                match sink.parse(&input.name, number, &item) {
                    Some(entry) if sink.filter.matches(&entry) => {
                        return Some(Record { entry, line: item.line().to_vec() })
                    }
                    _ => {}
                }
            }
            Ok(None) => return None,
            Err(e) => {
                unreadable(sink, &input.name, &e);
                return None;
            }
        }
    }
}

/// Moves `stream` on to its next record: from its current input, else
/// the next input's first.
fn advance<W: Write>(sink: &mut Sink<'_, W>, stream: &mut Stream) {
    stream.head = None;
    while let Some(input) = stream.inputs.front_mut() {
        if let Some(r) = input.first.take().or_else(|| next_record(sink, input)) {
            stream.head = Some(r);
            return;
        }
        stream.inputs.pop_front();
    }
}
