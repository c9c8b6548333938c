//! Faults: the proxy killed with SIGKILL while its audit writer is busy,
//! and the tailnet's control server unreachable for a while. In both,
//! nothing already written to the audit log is lost and the proxy serves
//! again (restarted on the same state, or still running).
//!
//! Run with scripts/test (a fresh network namespace with only `lo`).
//! `TAILGRES_FAULT_CONTROL_DOWN_SECS` sets how long the control server stays
//! down (default 60).

mod common;
use common::ops::PgProc;
use common::{within, within_for, Lab, LabProcess, READY_TIMEOUT};

use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

/// A control server, a database, a client node forwarding a loopback port
/// to the proxy, and the paths the proxy runs with (kept across restarts).
struct World {
    lab: Lab,
    pg: PgProc,
    node: LabProcess,
    state: PathBuf,
    audit: PathBuf,
    starts: usize,
}

impl World {
    async fn start() -> World {
        let lab = Lab::start(None).await;
        let pg = PgProc::start().await;
        let dir = lab.dir.path().to_path_buf();
        let node = lab.node("laptop", &[&forward_to_proxy(&lab), "--dial-timeout=20s"]).await;
        World { lab, pg, node, state: dir.join("proxy"), audit: dir.join("audit.jsonl"), starts: 0 }
    }

    /// Starts the real tailgres on this world's state dir and audit log.
    fn spawn_proxy(&mut self, extra: &[String]) -> Child {
        self.starts += 1;
        let stderr = self.lab.dir.path().join(format!("proxy-{}.stderr", self.starts));
        Command::new(env!("CARGO_BIN_EXE_tailgres"))
            .arg(format!("--control-url={}", self.lab.control_url))
            .arg("--hostname=pg")
            .arg(format!("--state-dir={}", self.state.display()))
            .arg(format!("--audit-log={}", self.audit.display()))
            .arg(format!("--upstream={}", self.pg.addr()))
            .arg(format!("--upstream-ca={}", self.pg.ca()))
            .arg(format!("--upstream-server-name={}", self.pg.server_name()))
            .args(extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn conninfo(&self, node: &LabProcess, app: &str) -> String {
        let (host, port) = common::forward_addr(node, 0)
            .rsplit_once(':')
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .unwrap();
        format!(
            "host={host} port={port} user=role_scram password=scram-pass dbname=app sslmode=disable \
             application_name={app} connect_timeout=20"
        )
    }

    /// Polls until a whole session through `node` works (the proxy has
    /// joined and its peers know where it is); each attempt is a new
    /// session named `app-N`.
    async fn wait_serving(&self, node: &LabProcess, app: &str) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        for n in 0.. {
            match short_session(&self.conninfo(node, &format!("{app}-{n}"))).await {
                Ok(()) => return,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "the proxy never served: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stop(self) {
        self.node.stop().await;
        self.lab.control.stop().await;
        self.pg.stop().await;
    }
}

fn forward_to_proxy(lab: &Lab) -> String {
    format!("--forward=127.0.0.1:0=pg.{}:5432", lab.suffix)
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = within("connect", tokio_postgres::connect(conninfo, NoTls)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connect, one query, close; each step bounded (an error, not a panic,
/// when it times out: a proxy that is gone or not joined yet).
async fn short_session(conninfo: &str) -> Result<(), String> {
    let step = common::STEP;
    let (client, connection) = tokio::time::timeout(step, tokio_postgres::connect(conninfo, NoTls))
        .await
        .map_err(|_| format!("connect: no answer in {step:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = tokio::time::timeout(step, client.query_one("select 1", &[]))
        .await
        .map_err(|_| format!("select 1: no answer in {step:?}"))?
        .map_err(|e| format!("select 1: {e}"))?;
    assert_eq!(row.get::<_, i32>(0), 1);
    Ok(())
}

/// The audit log's lines as they are on disk: the whole (newline-ended)
/// lines, and the unterminated tail if the file has one.
fn split_log(bytes: &[u8]) -> (Vec<String>, Option<String>) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let tail = lines.pop().filter(|t| !t.is_empty());
    (lines, tail)
}

/// Validates every line against audit-schema.json, naming FILE:LINE.
fn validate(path: &Path, lines: &[String], first_number: usize) -> Vec<Value> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let what = format!("{}:{}", path.display(), first_number + i);
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {l}"));
            common::audit::validate_value(&v, &what);
            v
        })
        .collect()
}

/// `tailgres audit ARGS FILE` (output piped: JSON lines): (exit code,
/// stdout records, stderr).
async fn audit_cli(file: &Path, args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = within(
        "tailgres audit",
        Command::new(env!("CARGO_BIN_EXE_tailgres"))
            .arg("audit")
            .args(args)
            .arg(file)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "tailgres audit panicked:\n{stderr}");
    let code = out.status.code().unwrap_or_else(|| panic!("tailgres audit died by a signal:\n{stderr}"));
    let records = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit output line {l:?}: {e}")))
        .collect();
    (code, records, stderr)
}

/// The lines of `stderr` that report a skipped line, as "FILE:LINE".
fn skipped(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("tailgres audit: ")?.split_once(": skipped:").map(|(at, _)| at.to_string())
        })
        .collect()
}

fn app_of(r: &Value) -> Option<&str> {
    r["postgres"]["application_name"].as_str()
}

/// SIGKILL while many short sessions run: every line before the last is a
/// whole record; the last is whole or torn, and `tailgres audit` names a
/// torn one as FILE:LINE (exit 1; 0 with --lenient). Every session a client
/// saw succeed has its session_start in the log (it is written before the
/// session goes on). Restarted on the same state dir and log, tailgres
/// starts its first line on a line of its own, after the torn tail, and
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_write_loses_no_record_and_restarts_cleanly() {
    let mut w = World::start().await;
    let mut proxy = w.spawn_proxy(&[]);
    w.wait_serving(&w.node, "warmup").await;

    // Short sessions, concurrently, until the proxy is gone.
    const WORKERS: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let (conninfo, stop, succeeded) = (w.conninfo(&w.node, "APP"), stop.clone(), succeeded.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let app = format!("burst-{i}-{n}");
                n += 1;
                if short_session(&conninfo.replace("APP", &app)).await.is_ok() {
                    succeeded.lock().unwrap().push(app);
                }
            }
        }));
    }

    // Kill at an arbitrary moment once the writer is busy: after some
    // records, plus a random delay.
    let audit = w.audit.clone();
    within_for(READY_TIMEOUT, "60 audit lines under load", async {
        while std::fs::read(&audit).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0) < 60 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..500))).await;
    proxy.start_kill().unwrap();
    let status = within("tailgres to die", proxy.wait()).await.unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    // Their sessions in flight fail with the proxy; what succeeded is counted.
    stop.store(true, Ordering::Relaxed);
    for h in &workers {
        h.abort();
    }
    for h in workers {
        let r = within("a client worker to stop", h).await;
        assert!(r.is_ok() || r.as_ref().unwrap_err().is_cancelled(), "a client worker failed: {r:?}");
    }

    let bytes = std::fs::read(&audit).unwrap();
    let (whole, tail) = split_log(&bytes);
    let all = validate(&audit, &whole, 1);
    // `tailgres audit` shows session records; the log's own (log_opened)
    // are checked by `verify` below.
    let records: Vec<Value> = all.iter().filter(|r| !common::audit::is_log_record(r)).cloned().collect();
    let succeeded = succeeded.lock().unwrap().clone();
    assert!(succeeded.len() >= 10, "too few sessions before the kill: {}", succeeded.len());
    let started: Vec<&str> =
        records.iter().filter(|r| r["event"] == "session_start").filter_map(app_of).collect();
    for app in &succeeded {
        assert!(started.contains(&app.as_str()), "{app} ran a query but has no session_start in the log");
    }
    eprintln!(
        "killed after {} whole lines ({} sessions succeeded); the kill left {}",
        whole.len(),
        succeeded.len(),
        match &tail {
            Some(t) => format!("a torn tail of {} bytes", t.len()),
            None => "no torn tail".to_string(),
        }
    );

    // A record write is one write(2) of a few hundred bytes: the kill almost
    // never cuts one. When it did not, cut the last record as it would have
    // (a prefix of the line, no newline), so what follows is tested either way.
    let torn = match tail {
        Some(t) => t,
        None => {
            let last = whole.last().unwrap();
            let t = last[..last.len() / 2].to_string();
            let mut f = std::fs::OpenOptions::new().append(true).open(&audit).unwrap();
            std::io::Write::write_all(&mut f, t.as_bytes()).unwrap();
            t
        }
    };
    assert!(serde_json::from_str::<Value>(&torn).is_err(), "a torn line is not a record: {torn}");
    let torn_at = format!("{}:{}", audit.display(), whole.len() + 1);

    let (code, out, stderr) = audit_cli(&audit, &[]).await;
    assert_eq!(code, 1, "a torn line makes `tailgres audit` exit 1:\n{stderr}");
    assert_eq!(skipped(&stderr), std::slice::from_ref(&torn_at), "only the torn line is named:\n{stderr}");
    assert_eq!(out, records, "every whole record passes through");
    let (code, out, stderr) = audit_cli(&audit, &["--lenient"]).await;
    assert_eq!(code, 0, "--lenient:\n{stderr}");
    assert_eq!(skipped(&stderr), std::slice::from_ref(&torn_at), "still named with --lenient:\n{stderr}");
    assert_eq!(out.len(), records.len());

    // Restart on the same state dir and log; it serves again.
    let mut proxy = w.spawn_proxy(&[]);
    w.wait_serving(&w.node, "after-restart").await;
    let after = w.conninfo(&w.node, "after-restart-check");
    short_session(&after).await.expect("a session after the restart");
    let ended = within("the session_end after the restart", async {
        loop {
            let (lines, _) = split_log(&std::fs::read(&audit).unwrap());
            let tail_records: Vec<Value> =
                lines[whole.len() + 1..].iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
            if tail_records
                .iter()
                .any(|r| r["event"] == "session_end" && app_of(r) == Some("after-restart-check"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    ended.await;

    // On disk: the old whole lines unchanged, the torn line alone on its
    // line (the new writer started with a newline), then whole records.
    let bytes = std::fs::read(&audit).unwrap();
    let (lines, tail) = split_log(&bytes);
    assert_eq!(tail, None, "the restarted proxy writes whole lines");
    assert_eq!(lines[..whole.len()], whole[..], "lines before the torn one are unchanged");
    assert_eq!(
        lines[whole.len()],
        torn,
        "the torn line stands alone; the first new record is not glued to it"
    );
    let new: Vec<Value> = validate(&audit, &lines[whole.len() + 1..], whole.len() + 2)
        .into_iter()
        .filter(|r| !common::audit::is_log_record(r))
        .collect();
    let events = |app: &str| -> Vec<&str> {
        new.iter().filter(|r| app_of(r) == Some(app)).map(|r| r["event"].as_str().unwrap()).collect()
    };
    assert_eq!(events("after-restart-check"), ["session_start", "auth_ok", "session_end"]);
    assert!(
        new.iter()
            .any(|r| r["event"] == "session_start"
                && app_of(r).is_some_and(|a| a.starts_with("after-restart-"))),
        "the first session after the restart is in the log"
    );

    let (code, out, stderr) = audit_cli(&audit, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(skipped(&stderr), [torn_at.clone()], "the reader still names only the torn line:\n{stderr}");
    assert_eq!(out.len(), records.len() + new.len(), "every whole record, old and new, is read");
    // The chain steps over the torn line: the restart's log_opened names the
    // last whole line before it, and verify says so without calling it broken.
    let verify = within(
        "tailgres audit verify",
        Command::new(env!("CARGO_BIN_EXE_tailgres")).args(["audit", "verify"]).arg(&audit).output(),
    )
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(0), "{report}");
    assert!(report.contains(&format!("note: {torn_at}: not a record, skipped by the chain")), "{report}");

    common::lab::terminate(&mut proxy);
    let status = within("tailgres to exit after SIGTERM", proxy.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    w.stop().await;
}

/// How long the control server stays down.
fn control_outage() -> Duration {
    let secs = std::env::var("TAILGRES_FAULT_CONTROL_DOWN_SECS")
        .ok()
        .map(|s| s.parse::<u64>().expect("TAILGRES_FAULT_CONTROL_DOWN_SECS: whole seconds"))
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn records_of(w: &World) -> Vec<Value> {
    if !w.audit.exists() {
        return vec![];
    }
    common::audit::validate_live_lines(&w.audit, common::audit::LIVE_TAIL_WAIT)
}

/// Waits until `app`'s session has its session_end; returns the session's
/// events in order.
async fn wait_session(w: &World, app: &str) -> Vec<Value> {
    within(&format!("{app}'s session_end"), async {
        loop {
            let records = records_of(w);
            let sid = records.iter().find(|r| app_of(r) == Some(app)).map(|r| r["session_id"].clone());
            if let Some(sid) = sid {
                let of: Vec<Value> = records.into_iter().filter(|r| r["session_id"] == sid).collect();
                if of.iter().any(|r| r["event"] == "session_end") {
                    return of;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The control server unreachable (its port closed, every connection to it
/// cut; DERP still up) for `TAILGRES_FAULT_CONTROL_DOWN_SECS`: a running
/// session keeps working, new sessions from a peer the proxy already knows
/// are admitted and audited with its identity (WhoIs answers from the
/// node's last network map), and once control is back the proxy serves a
/// node that joined after the outage (it is back in sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_server_down_keeps_known_peers_served() {
    let outage = control_outage();
    let mut w = World::start().await;
    let health = common::ops::free_port();
    let tsnet_log = w.lab.dir.path().join("proxy-tsnet.log");
    let mut proxy = w.spawn_proxy(&[
        format!("--health-listen=127.0.0.1:{health}"),
        format!("--tsnet-log={}", tsnet_log.display()),
    ]);
    w.wait_serving(&w.node, "warmup").await;
    let laptop = records_of(&w).into_iter().find(|r| r["event"] == "session_start").unwrap()["peer"].clone();

    let held = connect(&w.conninfo(&w.node, "held")).await.expect("the held session");
    let pid: i32 = within("held query", held.query_one("select pg_backend_pid()", &[])).await.unwrap().get(0);

    // Control down: its port refuses, its connections are cut.
    let control_port = w.lab.control_url.rsplit_once(':').unwrap().1.trim_end_matches('/').to_string();
    assert_eq!(w.lab.admin("POST", "/control/down", None).await["up"], false);
    assert_eq!(w.lab.admin("GET", "/control", None).await["up"], false);
    assert!(
        tokio::net::TcpStream::connect(format!("127.0.0.1:{control_port}")).await.is_err(),
        "the control port refuses while down"
    );

    // Throughout the outage: the held session answers every second, and a
    // new session opens every 5 s.
    let began = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut queries, mut opened) = (0usize, Vec::new());
    let readyz_during = Arc::new(AtomicUsize::new(0));
    while began.elapsed() < outage {
        tick.tick().await;
        let p: i32 = within(
            "a query on the held session during the outage",
            held.query_one("select pg_backend_pid()", &[]),
        )
        .await
        .unwrap_or_else(|e| panic!("the held session failed {:?} into the outage: {e}", began.elapsed()))
        .get(0);
        assert_eq!(p, pid, "the same backend");
        queries += 1;
        if queries % 5 == 1 {
            let app = format!("outage-{}", opened.len());
            short_session(&w.conninfo(&w.node, &app)).await.unwrap_or_else(|e| {
                panic!("a new session from a known peer {:?} into the outage: {e}", began.elapsed())
            });
            opened.push(app);
            if common::ops::readyz(health).await.0 == 200 {
                readyz_during.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    assert_eq!(w.lab.admin("GET", "/control", None).await["up"], false, "still down at the end");
    if std::env::var_os("TAILGRES_FAULT_SHOW_TSNET").is_some() {
        eprintln!("{}", std::fs::read_to_string(&tsnet_log).unwrap_or_default());
    }
    eprintln!(
        "control down {:?}: {queries} queries on the held session, {} new sessions, /readyz 200 at {}/{} checks",
        began.elapsed(),
        opened.len(),
        readyz_during.load(Ordering::Relaxed),
        opened.len()
    );

    // Every session of the outage is audited whole, with the identity the
    // proxy knew before it.
    for app in &opened {
        let events = wait_session(&w, app).await;
        let kinds: Vec<&str> = events.iter().map(|r| r["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["session_start", "auth_ok", "session_end"], "{app}");
        assert_eq!(events[0]["peer"], laptop, "{app} carries the laptop's identity");
        assert_eq!(events[2]["reason"], "client_terminated", "{app}: {}", events[2]);
    }

    // Control back, same address and state: the proxy catches up (a node
    // that joins now is in its network map: WhoIs knows it).
    assert_eq!(w.lab.admin("POST", "/control/up", None).await["up"], true);
    let desk = w.lab.node("desk", &[&forward_to_proxy(&w.lab), "--dial-timeout=20s"]).await;
    w.wait_serving(&desk, "desk").await;
    let desk_start = records_of(&w)
        .into_iter()
        .find(|r| r["event"] == "session_start" && app_of(r).is_some_and(|a| a.starts_with("desk-")))
        .unwrap();
    assert!(desk_start["peer"]["node_name"].as_str().is_some_and(|n| n.starts_with("desk.")), "{desk_start}");
    short_session(&w.conninfo(&w.node, "after-outage")).await.expect("the laptop after the outage");
    let p: i32 =
        within("held query after", held.query_one("select pg_backend_pid()", &[])).await.unwrap().get(0);
    assert_eq!(p, pid);
    drop(held);
    let events = wait_session(&w, "held").await;
    assert_eq!(events.last().unwrap()["reason"], "client_terminated", "{}", events.last().unwrap());
    wait_session(&w, "after-outage").await;

    common::lab::terminate(&mut proxy);
    let status = within("tailgres to exit after SIGTERM", proxy.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    desk.stop().await;
    w.stop().await;
}
