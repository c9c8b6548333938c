//! Writer tests against real files (no mocks: a temp dir and /dev/full).

use super::*;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

fn addr() -> SocketAddr {
    "100.64.0.3:41234".parse().unwrap()
}

fn denied(detail: impl Into<String>) -> Record {
    Record::new(new_session_id(), addr(), Event::denied(DenyReason::UnknownPeer, detail))
}

/// Every line of a log, the writer's own records included.
fn all_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "last line unterminated: {text:?}");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"))).collect()
}

/// The session records of a log (without `log_opened` and `checkpoint`).
fn lines(path: &Path) -> Vec<Value> {
    all_lines(path).into_iter().filter(|v| v.get("session_id").is_some()).collect()
}

/// `tailgres audit verify` on these files.
fn verify(files: &[&Path], key: Option<&str>) -> crate::auditcli::verify::Report {
    let files = files.iter().map(|p| (p.display().to_string(), std::fs::File::open(p).unwrap())).collect();
    crate::auditcli::verify::verify(files, key.as_slice(), None).unwrap()
}

#[test]
fn session_ids_are_16_lowercase_hex() {
    let ids: Vec<String> = (0..100).map(|_| new_session_id()).collect();
    for id in &ids {
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_are_whole_lines_in_per_task_order() {
    const TASKS: usize = 32;
    const EACH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // A tiny channel so that callers really wait for the writer.
    let options = AuditOptions { sync: false, capacity: 4, ..AuditOptions::default() };
    let (log, writer) = AuditLog::open_with(AuditDest::File(path.clone()), options).await.unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    // Long enough that a torn write would show.
                    let detail = format!("task={t} seq={i} {}", "x".repeat(1000));
                    log.record(&denied(detail)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(log.is_healthy());
    log.close().await;
    writer.await.unwrap();

    let got = lines(&path);
    assert_eq!(got.len(), TASKS * EACH);
    let mut next: HashMap<usize, usize> = HashMap::new();
    for v in got {
        let detail = v["detail"].as_str().unwrap();
        let mut words = detail.split(' ');
        let t: usize = words.next().unwrap().strip_prefix("task=").unwrap().parse().unwrap();
        let i: usize = words.next().unwrap().strip_prefix("seq=").unwrap().parse().unwrap();
        let want = next.entry(t).or_default();
        assert_eq!(i, *want, "task {t} out of order");
        *want += 1;
    }
    assert!(next.values().all(|&n| n == EACH));
}

#[tokio::test]
async fn unopenable_path_fails_at_open_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("audit.jsonl");
    let err = AuditLog::open(AuditDest::File(missing.clone())).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AuditError::Open { .. }), "{err:?}");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");

    // A directory is not a log file either.
    let err = AuditLog::open(AuditDest::File(dir.path().to_path_buf())).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("Is a directory"), "{msg}");
}

#[tokio::test]
async fn new_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    log.close().await;
    writer.await.unwrap();
}

#[tokio::test]
async fn write_failure_is_reported_and_makes_the_log_unhealthy() {
    let (log, writer) = AuditLog::open(AuditDest::File("/dev/full".into())).await.unwrap();
    let err = log.record(&denied("disk full")).await.unwrap_err();
    assert!(matches!(err, AuditError::Write { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("/dev/full"), "{msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(!log.is_healthy());
    // Still failing, still unhealthy, never a panic.
    assert!(log.record(&denied("again")).await.is_err());
    assert!(!log.is_healthy());
    log.close().await;
    writer.await.unwrap();
}

#[tokio::test]
async fn unhealthy_until_a_reopened_file_takes_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    assert!(log.record(&denied("lost")).await.is_err());
    assert!(!log.is_healthy());

    // The operator fixes the path and sends SIGHUP.
    std::fs::remove_file(&path).unwrap();
    log.reopen();
    log.record(&denied("kept")).await.unwrap();
    assert!(log.is_healthy());
    log.close().await;
    writer.await.unwrap();
    let got = lines(&path);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["detail"], "kept");
}

#[tokio::test]
async fn reopen_after_rotation_writes_to_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    log.record(&denied("before")).await.unwrap();
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    log.record(&denied("after")).await.unwrap();
    log.close().await;
    writer.await.unwrap();

    let old = lines(&rotated);
    let new = lines(&path);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["detail"], "before");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["detail"], "after");
}

#[tokio::test]
async fn reopen_on_an_idle_writer_happens_without_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
    log.reopen();
    // The writer recreates the file on its own; poll for it (no fixed sleep).
    for _ in 0..1000 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(path.exists(), "reopen did not recreate {}", path.display());
    log.close().await;
    writer.await.unwrap();
}

#[tokio::test]
async fn failed_reopen_is_unhealthy_and_recovers_when_the_path_returns() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let path = logs.join("audit.jsonl");
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    log.record(&denied("one")).await.unwrap();

    std::fs::rename(&logs, dir.path().join("logs.old")).unwrap();
    log.reopen();
    let err = log.record(&denied("nowhere")).await.unwrap_err();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    assert!(!log.is_healthy());

    std::fs::create_dir(&logs).unwrap();
    log.record(&denied("two")).await.unwrap();
    assert!(log.is_healthy());
    log.close().await;
    writer.await.unwrap();
    let got = lines(&path);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["detail"], "two");
}

#[tokio::test]
async fn sync_option_writes_and_close_drains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let options = AuditOptions { sync: true, ..AuditOptions::default() };
    let (log, writer) = AuditLog::open_with(AuditDest::File(path.clone()), options).await.unwrap();
    let other = log.clone();
    // Queue records without awaiting their acks, then close: all are written.
    let pending: Vec<_> = (0..20)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(&denied(format!("{i}"))).await })
        })
        .collect();
    for p in pending {
        p.await.unwrap().unwrap();
    }
    log.close().await;
    writer.await.unwrap();
    assert_eq!(lines(&path).len(), 20);
    assert!(matches!(other.record(&denied("late")).await, Err(AuditError::Closed)));
    assert!(!other.is_healthy());
}

#[tokio::test]
async fn appends_to_an_existing_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    for round in 0..2 {
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
        log.record(&denied(format!("round {round}"))).await.unwrap();
        log.close().await;
        writer.await.unwrap();
    }
    let got = lines(&path);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1]["detail"], "round 1");
}

/// A log whose last line was cut short (the proxy killed mid-write): the
/// next writer, at start or on reopen, starts on a line of its own, so the
/// fragment stays alone and the new record whole.
#[tokio::test]
async fn a_torn_tail_is_left_alone_on_its_line() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let whole = serde_json::to_string(&denied("before")).unwrap();
    let fragment = &whole[..whole.len() / 2];
    std::fs::write(&path, format!("{whole}\n{fragment}")).unwrap();
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    log.record(&denied("after start")).await.unwrap();
    // Torn again, then a reopen (SIGHUP) onto it.
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(fragment.as_bytes()).unwrap();
    log.reopen();
    log.record(&denied("after reopen")).await.unwrap();
    log.close().await;
    writer.await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), 7, "{text}");
    let event = |l: &str| serde_json::from_str::<Value>(l).unwrap();
    assert_eq!(got[0], whole);
    assert_eq!(got[1], fragment);
    assert_eq!(event(got[2])["reason"], "start");
    assert_eq!(event(got[3])["detail"], "after start");
    assert_eq!(got[4], fragment);
    assert_eq!(event(got[5])["reason"], "reopen");
    assert_eq!(event(got[6])["detail"], "after reopen");
    assert!(text.ends_with('\n'));
    // The chain steps over each fragment; verify names them and is content.
    let report = verify(&[&path], None);
    assert!(report.whole(), "{}", report.render());
    assert!(report.notes.iter().any(|n| n.contains(":5: not a record, skipped")), "{}", report.render());
}

/// The chain runs on across SIGHUP rotation and restarts: every record is
/// one more than the last and names its line, each file and run starts
/// with a `log_opened`, and verify puts the files back in order.
#[tokio::test]
async fn the_chain_survives_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    log.record(&denied("one")).await.unwrap();
    log.record(&denied("two")).await.unwrap();
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    log.record(&denied("three")).await.unwrap();
    log.close().await;
    writer.await.unwrap();
    // A restart appends to the current file and goes on from its last line.
    let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
    log.record(&denied("four")).await.unwrap();
    log.close().await;
    writer.await.unwrap();

    let (old, new) = (all_lines(&rotated), all_lines(&path));
    let events: Vec<String> = old
        .iter()
        .chain(&new)
        .map(|v| format!("{}:{}", v["seq"], v["detail"].as_str().or(v["reason"].as_str()).unwrap()))
        .collect();
    assert_eq!(events, ["1:start", "2:one", "3:two", "4:reopen", "5:three", "6:start", "7:four"]);
    assert_eq!(old[0]["prev"], Value::Null, "a new chain");
    let old_text = std::fs::read_to_string(&rotated).unwrap();
    let last_old = old_text.lines().last().unwrap();
    assert_eq!(
        new[0]["prev"],
        chain::hex(&chain::line_hash(last_old.as_bytes())),
        "rotation links the files"
    );
    // Given in any order.
    let report = verify(&[&path, &rotated], None);
    assert!(report.whole(), "{}", report.render());
    assert_eq!(report.records, 7);
    assert!(report.order[0].starts_with(&rotated.display().to_string()), "{:?}", report.order);
}

/// Every line names the node that wrote it (`AuditOptions::node`, the
/// `--hostname`), the writer's own records too; a restart under the same
/// name goes on with the chain, and the default name is "tailgres".
#[tokio::test]
async fn every_line_names_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let signer = Arc::new(chain::Signer::generate(&dir.path().join("key.pem")).unwrap());
    let checkpoints = Checkpoints { signer, every: 2, interval: std::time::Duration::from_secs(3600) };
    for run in ["first", "second"] {
        let options = AuditOptions {
            checkpoints: Some(checkpoints.clone()),
            node: "pg-1".into(),
            ..AuditOptions::default()
        };
        let (log, writer) = AuditLog::open_with(AuditDest::File(path.clone()), options).await.unwrap();
        log.record(&denied(run)).await.unwrap();
        log.close().await;
        writer.await.unwrap();
    }
    let all = all_lines(&path);
    let events: Vec<&str> = all.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["log_opened", "session_denied", "checkpoint", "log_opened", "session_denied", "checkpoint"]
    );
    assert!(all.iter().all(|v| v["node"] == "pg-1"), "{all:?}");
    let report = verify(&[&path], None);
    assert!(report.whole(), "{}", report.render());
    assert_eq!((report.records, report.checkpoints), (6, 2));

    let other = dir.path().join("default.jsonl");
    let (log, writer) = AuditLog::open(AuditDest::File(other.clone())).await.unwrap();
    log.record(&denied("x")).await.unwrap();
    log.close().await;
    writer.await.unwrap();
    assert!(all_lines(&other).iter().all(|v| v["node"] == "tailgres"));
}

#[tokio::test]
async fn checkpoints_are_signed_every_n_records_on_ticks_and_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let signer = Arc::new(chain::Signer::generate(&dir.path().join("key.pem")).unwrap());
    let checkpoints =
        Checkpoints { signer: signer.clone(), every: 3, interval: std::time::Duration::from_secs(1) };
    let options = AuditOptions { checkpoints: Some(checkpoints), ..AuditOptions::default() };
    let (log, writer) = AuditLog::open_with(AuditDest::File(path.clone()), options).await.unwrap();
    // The header and two records: the third line brings a checkpoint.
    log.record(&denied("a")).await.unwrap();
    log.record(&denied("b")).await.unwrap();
    // One record, then quiet: the interval signs it.
    log.record(&denied("c")).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while all_lines(&path).iter().filter(|v| v["event"] == "checkpoint").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint after a quiet interval");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    log.record(&denied("d")).await.unwrap();
    log.close().await;
    writer.await.unwrap();

    let got = all_lines(&path);
    let events: Vec<&str> = got.iter().map(|v| v["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "log_opened",
            "session_denied",
            "session_denied",
            "checkpoint",
            "session_denied",
            "checkpoint",
            "session_denied",
            "checkpoint"
        ],
        "every 3, after a quiet interval, and at close"
    );
    assert_eq!(got[0]["signing_key"], signer.public_key());
    assert_eq!(got[3]["records"], 3);
    let report = verify(&[&path], Some(signer.public_key()));
    assert!(report.whole(), "{}", report.render());
    assert_eq!(report.checkpoints, 3);

    // Someone who rewrites a record and recomputes every hash after it
    // keeps the chain whole, but cannot sign: the next checkpoint breaks.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut forged = String::new();
    let mut head: Option<chain::Link> = None;
    for (i, line) in text.lines().enumerate() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        if i == 1 {
            v["detail"] = "nothing to see".into();
        }
        let obj = v.as_object_mut().unwrap();
        obj.remove("node");
        obj.remove("seq");
        obj.remove("prev");
        let (l, link) = chain::stamp(&serde_json::to_vec(&v).unwrap(), crate::audit::DEFAULT_NODE, head);
        head = Some(link);
        forged.push_str(std::str::from_utf8(&l).unwrap());
    }
    let forged_path = dir.path().join("forged.jsonl");
    std::fs::write(&forged_path, forged).unwrap();
    let report = verify(&[&forged_path], Some(signer.public_key()));
    assert!(!report.whole());
    assert!(
        report.problems[0].contains("forged.jsonl:4: checkpoint seq 4: the signature does not verify"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn dropping_every_handle_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer) = AuditLog::open(AuditDest::File(dir.path().join("a.jsonl"))).await.unwrap();
    drop(log.clone());
    drop(log);
    writer.await.unwrap();
}
