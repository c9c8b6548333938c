//! Short sessions leave nothing behind. After 2,000 sessions through the
//! proxy, each a new connection (startup, authentication, one query,
//! Terminate; plaintext SCRAM relayed and TLS with the password relay,
//! alternately), the proxy's open file descriptors come back to exactly
//! the baseline and its OS threads to the baseline (Go side included: it
//! is one process), give or take [`GO_THREAD_SLACK`]. Counts only, never
//! timings: the waits below are deadlines for the counts to settle, not
//! measurements.
//!
//! The full soak (100,000 sessions, memory too) is `bench/run --soak`.
mod common;

use common::lab::{LabOptions, LabUp};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;
use tokio_rustls::TlsConnector;

const SESSIONS: usize = 2_000;
/// Sessions at once (the lab runs on two cores).
const PARALLEL: usize = 8;
/// Sessions before the baseline is taken, with the same concurrency, so
/// that what is created once (TLS session cache, tokio's workers, the OS
/// threads Go starts for its scheduler) is in it.
const WARM_UP: usize = 400;
/// Go never ends an OS thread it started (an idle one parks), so the
/// proxy's thread count is the most Go ever needed at once: GOMAXPROCS plus
/// goroutines in blocking calls (and in calls out to C: the shim's wake-ups
/// into Rust), whatever the number of sessions. A busier moment after the
/// baseline adds a few: CI saw 9 → 12 on a loaded machine, and
/// `bench/run --soak` holds 12 over 100,000 sessions. A thread per session,
/// or one in a hundred, or tokio blocking threads that never end, would add
/// twenty to hundreds.
const GO_THREAD_SLACK: usize = 6;
/// Counts are "settled" once unchanged this long: longer than the 10 s an
/// idle tokio blocking-pool thread lives.
const QUIET: Duration = Duration::from_secs(12);
/// Deadline for the counts to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(120);
/// The SSLRequest code (docs/postgres-protocol.md, "Before the StartupMessage").
const SSL_REQUEST: u32 = 80877103;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    fds: usize,
    threads: usize,
}

fn counts(pid: u32) -> Counts {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("proxy /proc/PID/fd").count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proxy /proc/PID/status");
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads: in /proc/PID/status");
    Counts { fds, threads }
}

/// The proxy's threads by name (`/proc/PID/task/*/comm`) and how many bear
/// each: what a failed thread assertion prints, so it says whose they are
/// (tokio's workers and blocking pool, or the Go runtime's Ms, which carry
/// the name of the thread that started them).
fn thread_names(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut names = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("proxy /proc/PID/task") {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_insert(0) += 1;
    }
    names
}

/// The proxy's counts once they have stopped changing for [`QUIET`] (or at
/// the deadline: the assertions then say what they were).
async fn settled(pid: u32) -> Counts {
    let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
    let (mut last, mut since) = (counts(pid), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let c = counts(pid);
        let now = tokio::time::Instant::now();
        if c != last {
            (last, since) = (c, now);
        } else if now - since >= QUIET || now >= deadline {
            return c;
        }
    }
}

/// Waits until the audit log holds `n` session_end records.
async fn wait_ended(lab: &LabUp, n: usize) {
    let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
    loop {
        let ended = lab.audit_records().iter().filter(|r| r["event"] == "session_end").count();
        if ended >= n {
            assert_eq!(ended, n, "more sessions ended than were started");
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {ended} of {n} sessions audited as ended");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A certificate for the proxy to offer TLS clients, and a client that trusts it.
struct Pki {
    _dir: tempfile::TempDir,
    cert_file: PathBuf,
    key_file: PathBuf,
    connector: TlsConnector,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["pg.tail-lab.ts.net".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_file = dir.path().join("proxy.crt");
        let key_file = dir.path().join("proxy.key");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert.der().to_vec())).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        Pki { _dir: dir, cert_file, key_file, connector: TlsConnector::from(Arc::new(config)) }
    }
}

fn config() -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    // The stream handed to connect_raw is already plain TCP or our TLS.
    c.user("role_scram").password("scram-pass").dbname("app").application_name("soak");
    c.ssl_mode(SslMode::Disable);
    c
}

/// One short session through `forward`: TLS (password relay) when `tls`,
/// else plaintext (SCRAM relayed); one query; Terminate.
async fn session(forward: &str, pki: &Pki, tls: bool) -> Result<(), String> {
    let mut tcp = TcpStream::connect(forward).await.map_err(|e| format!("connect: {e}"))?;
    let query = |client: tokio_postgres::Client| async move {
        let n: i32 = client.query_one("select 1", &[]).await.map_err(|e| format!("query: {e}"))?.get(0);
        if n != 1 {
            return Err(format!("select 1 returned {n}"));
        }
        Ok::<_, String>(())
    };
    if tls {
        let mut req = Vec::with_capacity(8);
        req.extend_from_slice(&8u32.to_be_bytes());
        req.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        tcp.write_all(&req).await.map_err(|e| format!("SSLRequest: {e}"))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(|e| format!("SSLRequest answer: {e}"))?;
        if answer[0] != b'S' {
            return Err(format!("SSLRequest answered {:?}", answer[0] as char));
        }
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let tls = pki.connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (client, conn) = config().connect_raw(tls, NoTls).await.map_err(|e| format!("startup: {e}"))?;
        let conn = tokio::spawn(conn);
        query(client).await?;
        conn.await.map_err(|e| e.to_string())?.map_err(|e| format!("close: {e}"))
    } else {
        let (client, conn) = config().connect_raw(tcp, NoTls).await.map_err(|e| format!("startup: {e}"))?;
        let conn = tokio::spawn(conn);
        query(client).await?;
        conn.await.map_err(|e| e.to_string())?.map_err(|e| format!("close: {e}"))
    }
}

/// Runs `n` sessions, `PARALLEL` at once. On the first failure it stops
/// and panics with the failure and the tails of the lab's logs (the proxy's,
/// the client node's, the database's): a rare failure in CI must leave
/// enough behind to be explained.
async fn sessions(lab: &LabUp, pki: &Arc<Pki>, n: usize) {
    let forward = lab.forward(0);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL {
        let (forward, pki, next) = (forward.clone(), pki.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                if let Err(e) = session(&forward, &pki, i % 2 == 1).await {
                    next.store(n, Ordering::Relaxed); // the other workers stop too
                    return Err(format!("session {i} of {n}: {e}"));
                }
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r.expect("session worker panicked") {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        // Give the proxy a moment to log how the session ended on its side.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        panic!("{}\n\nlab logs:\n{}", failures.join("\n"), lab.log_tails(40));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_sessions_leave_no_fds_or_threads_behind() {
    let pki = Arc::new(Pki::new());
    let cert = format!("--client-tls-cert={}", pki.cert_file.display());
    let key = format!("--client-tls-key={}", pki.key_file.display());
    let lab = LabUp::start(LabOptions { tailgres_args: vec![&cert, &key], ..Default::default() }).await;
    let pid = lab.info["proxy"]["pid"].as_u64().expect("proxy pid") as u32;

    sessions(&lab, &pki, WARM_UP).await;
    wait_ended(&lab, WARM_UP).await;
    let base = settled(pid).await;
    let base_names = thread_names(pid);

    sessions(&lab, &pki, SESSIONS).await;
    wait_ended(&lab, WARM_UP + SESSIONS).await;
    let after = settled(pid).await;
    let after_names = thread_names(pid);
    eprintln!("proxy after {WARM_UP} warm-up sessions: {base:?} {base_names:?}");
    eprintln!("after {SESSIONS} more: {after:?} {after_names:?}");
    assert_eq!(after.fds, base.fds, "open fds after {SESSIONS} sessions (baseline {base:?}, now {after:?})");
    assert!(
        after.threads <= base.threads + GO_THREAD_SLACK,
        "OS threads after {SESSIONS} sessions: {} > baseline {} + {GO_THREAD_SLACK} ({after:?})",
        after.threads,
        base.threads
    );
    lab.stop().await;
}
