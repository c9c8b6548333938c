//! Shared pieces of the generative fuzz targets (`tests/fuzz_*.rs`):
//! how many cases to run, the bound on every call (virtual time for
//! waits, a wall-clock watchdog for spinning), and checks on what the
//! proxy wrote back.
//!
//! - `TAILGRES_FUZZ_CASES=N`: cases per property (default: each
//!   property's own modest count, sized so the whole set stays well under
//!   two minutes on two cores).
//! - `TAILGRES_FUZZ_SEED=N|random`: the generator's seed. Unset, runs are
//!   deterministic (CI sees the same inputs every time; new inputs come
//!   from `scripts/fuzz`, which sets `random`).
//! - Failures are shrunk by proptest and persisted to
//!   `tests/fuzz/regressions/<target>.txt` (replayed first on every run;
//!   commit them), and then made into a named regression test.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

/// The default seed of the deterministic CI run.
const DEFAULT_SEED: u64 = 0x7a11_9e55_f022_2026;

/// Proptest configuration for one property: `default_cases` unless
/// `TAILGRES_FUZZ_CASES` says otherwise.
pub fn config(default_cases: u32, regressions: &'static str) -> Config {
    let cases =
        std::env::var("TAILGRES_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    let rng_seed = match std::env::var("TAILGRES_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => RngSeed::Fixed(n.parse().expect("TAILGRES_FUZZ_SEED is a number or `random`")),
        Err(_) => RngSeed::Fixed(DEFAULT_SEED),
    };
    Config {
        cases,
        rng_seed,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
        // Shrinking a failure found in a long campaign may take a while;
        // it is worth it (the shrunk input becomes the regression test).
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

/// Virtual-time bound on one call. Time is paused in [`run`]: the clock
/// jumps forward only when every task is waiting, so this fires at once
/// on a deadlock (a call waiting for input that can never come) and
/// never on a slow machine.
pub const VIRTUAL_BOUND: Duration = Duration::from_secs(600);

/// Wall-clock bound on one case: past it the call is spinning without
/// ever yielding (which no virtual timeout can see); the process is
/// aborted with the input, as a hang.
pub const WALL_BOUND: Duration = Duration::from_secs(60);

/// Runs `f` on a fresh current-thread runtime with paused time, bounded
/// by [`VIRTUAL_BOUND`] (Err on a hang) and [`WALL_BOUND`] (abort).
pub fn run<F: Future>(what: impl Fn() -> String, f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let (done, wait) = mpsc::channel::<()>();
    let described = what();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(WALL_BOUND) {
            eprintln!("fuzz: HANG (no return in {WALL_BOUND:?} of wall-clock time): {described}");
            std::process::abort();
        }
    });
    let out = rt.block_on(async { tokio::time::timeout(VIRTUAL_BOUND, f).await });
    let _ = done.send(());
    let _ = watchdog.join();
    out.map_err(|_| format!("hang: no return within {VIRTUAL_BOUND:?} (virtual) for {}", what()))
}

/// Byte strings that favour the interesting: short, empty, all bytes.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..=16),
        1 => proptest::collection::vec(any::<u8>(), 0..=max),
    ]
}

/// Lengths near the boundaries the code checks, and anything else.
pub fn length_field() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..=16,
        2 => 9990u32..=10010,
        1 => Just(u32::MAX),
        1 => Just(i32::MAX as u32),
        1 => Just(1u32 << 31),
        1 => (1u32 << 20) - 8..=(1u32 << 20) + 8,
        2 => any::<u32>(),
    ]
}

/// Cut `data` into chunks at the given points (each taken modulo the
/// length), so a stream delivers it split at arbitrary places.
pub fn split_at_points(data: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![];
    }
    let mut cuts: Vec<usize> = points.iter().map(|p| p % data.len()).filter(|&p| p > 0).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        out.push(data[start..c].to_vec());
        start = c;
    }
    out
}

/// One typed backend/frontend message split off the front of `bytes`:
/// (tag, body, rest). None if `bytes` does not start with a whole,
/// well-formed message.
pub fn split_message(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if len < 4 {
        return None;
    }
    let body = rest.get(4..len)?;
    Some((tag, body, &rest[len..]))
}

/// Every typed message in `bytes`; Err if the bytes are not exactly a
/// sequence of whole, well-formed messages.
pub fn messages(mut bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (tag, body, rest) =
            split_message(bytes).ok_or_else(|| format!("not a whole message: {:?}", preview(bytes)))?;
        out.push((tag, body.to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// The first bytes of `b`, for messages.
pub fn preview(b: &[u8]) -> String {
    let head: Vec<u8> = b.iter().take(48).copied().collect();
    format!("{} bytes {:?}{}", b.len(), head, if b.len() > 48 { "..." } else { "" })
}

/// The (SQLSTATE, message) of a well-formed ErrorResponse that is all of
/// `bytes`.
pub fn sole_error(bytes: &[u8]) -> Result<(String, String), String> {
    let (tag, body, rest) =
        split_message(bytes).ok_or_else(|| format!("no whole message: {}", preview(bytes)))?;
    if tag != b'E' || !rest.is_empty() {
        return Err(format!("expected one ErrorResponse, got {}", preview(bytes)));
    }
    if body.last() != Some(&0) {
        return Err("ErrorResponse without its terminator".into());
    }
    let (code, msg) = tailgres::pgwire::error_fields(body);
    Ok((code.unwrap_or_default(), msg.unwrap_or_default()))
}

/// Hand-picked seed inputs of one target, from `tests/fuzz/corpus/<target>/`
/// (one file per input, raw bytes), in name order.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Mutations of a seed input: each (position, new byte) overwrite, each
/// deletion point, each insertion; used to derive cases from the corpus.
#[derive(Debug, Clone)]
pub enum Mutation {
    Set(usize, u8),
    Delete(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    /// Overwrite a 4-byte big-endian integer (a length or a code).
    SetU32(usize, u32),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => (any::<usize>(), bytes(32)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        3 => (any::<usize>(), length_field()).prop_map(|(p, v)| Mutation::SetU32(p, v)),
    ]
}

pub fn mutate(data: &mut Vec<u8>, m: &Mutation) {
    let n = data.len();
    match m {
        Mutation::Set(p, b) if n > 0 => data[p % n] = *b,
        Mutation::Delete(p, k) if n > 0 => {
            let p = p % n;
            data.drain(p..(p + k).min(n));
        }
        Mutation::Insert(p, b) => {
            let p = p % (n + 1);
            data.splice(p..p, b.iter().copied());
        }
        Mutation::Truncate(p) => data.truncate(p % (n + 1)),
        Mutation::SetU32(p, v) if n >= 4 => {
            let p = p % (n - 3);
            data[p..p + 4].copy_from_slice(&v.to_be_bytes());
        }
        _ => {}
    }
}

/// A reader that hands out its data in the given pieces (and an empty
/// read only at the end), like a socket.
pub struct Pieces {
    chunks: std::collections::VecDeque<Vec<u8>>,
}

impl Pieces {
    /// `data` cut at `splits` (see [`split_at_points`]).
    pub fn new(data: &[u8], splits: &[usize]) -> Pieces {
        Pieces { chunks: split_at_points(data, splits).into() }
    }

    /// What has not been read yet.
    pub fn rest(&self) -> Vec<u8> {
        self.chunks.iter().flatten().copied().collect()
    }
}

impl tokio::io::AsyncRead for Pieces {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(front) = self.chunks.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}
