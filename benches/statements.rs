//! Statement audit's costs off the data path, printed as figures (run with
//! `cargo bench --bench statements`; bench/run measures the whole proxy):
//! - describing a statement (libpg_query: fingerprint, normalize), for a
//!   text seen for the first time and for one in the cache;
//! - the audit writer's statement records per second: one writer (records
//!   acknowledged one at a time, as the statement auditor writes them) and
//!   eight concurrent writers, batches as the auditor hands them over under
//!   load, and with signed checkpoints.
use std::sync::Arc;
use std::time::{Duration, Instant};
use tailgres::audit::{
    chain::Signer, AuditDest, AuditLog, AuditOptions, Checkpoints, Event, Record, Statement,
    StatementProtocol,
};
use tailgres::statements::describe::{describe, Cache, TextMode};

fn rate(n: usize, took: Duration) -> String {
    format!("{:>9.0}/s  ({:.1} µs each)", n as f64 / took.as_secs_f64(), took.as_secs_f64() * 1e6 / n as f64)
}

fn statement(i: usize) -> Record {
    Record::new("00000000000000a1", "100.64.0.3:41234".parse().unwrap(), Event::SessionStart).with_event(
        Event::Statement(Statement {
            protocol: StatementProtocol::Simple,
            text: Some("SELECT abalance FROM pgbench_accounts WHERE aid = $1".into()),
            text_status: "normalized",
            fingerprint: format!("{:016x}", i % 7),
            duration: Duration::from_micros(180),
            command_tag: Some("SELECT".into()),
            rows: Some(1),
            sqlstate: None,
            suspended: false,
            copy: None,
            params: None,
        }),
    )
}

async fn batches(label: &str, size: usize, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (log, task) = AuditLog::open(AuditDest::File(dir.path().join("a.jsonl"))).await.unwrap();
    let batch: Vec<Record> = (0..size).map(statement).collect();
    let began = Instant::now();
    for _ in 0..n / size {
        log.record_many(&batch).await.unwrap();
    }
    let took = began.elapsed();
    log.close().await;
    task.await.unwrap();
    println!("audit writer, {label:<44} {}", rate(n / size * size, took));
}

async fn writer(label: &str, tasks: usize, n: usize, checkpoints: Option<Checkpoints>) {
    let dir = tempfile::tempdir().unwrap();
    let options = AuditOptions { checkpoints, ..AuditOptions::default() };
    let (log, task) =
        AuditLog::open_with(AuditDest::File(dir.path().join("a.jsonl")), options).await.unwrap();
    let record = Arc::new(statement(1));
    let began = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let (log, record) = (log.clone(), record.clone());
            tokio::spawn(async move {
                for _ in 0..n / tasks {
                    log.record(&record).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let took = began.elapsed();
    log.close().await;
    task.await.unwrap();
    println!("audit writer, {label:<44} {}", rate(n, took));
}

fn main() {
    const N: usize = 20_000;
    let texts: Vec<String> = (0..N)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", i * 7919 % 100_000))
        .collect();
    let began = Instant::now();
    for t in &texts {
        std::hint::black_box(describe(t, TextMode::Normalized));
    }
    println!("describe, a text not seen before (pgbench -S)          {}", rate(N, began.elapsed()));
    let mut cache = Cache::new(TextMode::Normalized);
    let fixed = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    cache.describe(fixed);
    let began = Instant::now();
    for _ in 0..N {
        std::hint::black_box(cache.describe(fixed));
    }
    println!("describe, a cached text (a prepared statement)          {}", rate(N, began.elapsed()));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        writer("1 writer (as the statement auditor)", 1, N, None).await;
        writer("8 concurrent writers", 8, N, None).await;
        batches("1 writer, batches of 64 (the auditor under load)", 64, N).await;
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(Signer::generate(&dir.path().join("k.pem")).unwrap());
        let signed = Checkpoints { signer, every: 1000, interval: Duration::from_secs(60) };
        writer("1 writer, signed checkpoint every 1000", 1, N, Some(signed)).await;
    });
}
