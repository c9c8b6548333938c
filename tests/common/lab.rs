//! The whole world for proxy tests: `tailgres-lab up` (loopback tailnet,
//! Debian PostgreSQL with TLS from a throwaway CA, the real tailgres binary,
//! client nodes forwarding loopback ports to it), driven from tests.

use super::{require_sandbox, READY_TIMEOUT};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct LabUp {
    pub dir: tempfile::TempDir,
    pub info: Value,
    child: Child,
}

#[derive(Default)]
pub struct LabOptions<'a> {
    /// Client nodes: "name" or "name=tag:a,tag:b" (default: one "laptop").
    pub clients: Vec<&'a str>,
    /// --upstream-cert for the lab's database (good, wrong-host, ...).
    pub upstream_cert: Option<&'a str>,
    pub log_connections: bool,
    /// tailgres logs in by identity (the lab's identity CA).
    pub identity_login: bool,
    /// tailgres runs with --auth scram-verifier (the lab's lookup role).
    pub scram_verifier: bool,
    pub audit_log: Option<PathBuf>,
    /// Extra tailgres arguments.
    pub tailgres_args: Vec<&'a str>,
    /// A fleet of this many nodes behind the Service svc:pg (0: one proxy).
    pub fleet: u8,
}

impl LabUp {
    pub async fn start(o: LabOptions<'_>) -> LabUp {
        require_sandbox();
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("lab.json");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tailgres-lab"));
        cmd.arg("up")
            .arg(format!("--dir={}", dir.path().join("lab").display()))
            .arg(format!("--json={}", json.display()))
            .arg(format!("--tailgres={}", env!("CARGO_BIN_EXE_tailgres")))
            .arg(format!("--tslab={}", super::tslab_bin().display()));
        for c in &o.clients {
            cmd.arg(format!("--client={c}"));
        }
        if let Some(c) = o.upstream_cert {
            cmd.arg(format!("--upstream-cert={c}"));
        }
        if o.log_connections {
            cmd.arg("--log-connections");
        }
        if o.identity_login {
            cmd.arg("--identity-login");
        }
        if o.scram_verifier {
            cmd.arg("--scram-verifier");
        }
        if let Some(a) = &o.audit_log {
            cmd.arg(format!("--audit-log={}", a.display()));
        }
        if o.fleet > 0 {
            cmd.arg(format!("--fleet={}", o.fleet));
        }
        if !o.tailgres_args.is_empty() {
            cmd.arg("--").args(&o.tailgres_args);
        }
        let stderr = std::fs::File::create(dir.path().join("lab.stderr")).unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).stdin(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        let info: Value = match line {
            Ok(Ok(Some(l))) => serde_json::from_str(&l).unwrap(),
            other => {
                let err = std::fs::read_to_string(dir.path().join("lab.stderr")).unwrap_or_default();
                panic!("tailgres-lab up did not come up ({other:?}):\n{err}");
            }
        };
        LabUp { dir, info, child }
    }

    /// "127.0.0.1:PORT" of client `i`'s forward to the proxy.
    pub fn forward(&self, i: usize) -> String {
        self.info["clients"][i]["forward"].as_str().unwrap().to_string()
    }
    pub fn forward_host_port(&self, i: usize) -> (String, u16) {
        let f = self.forward(i);
        let (h, p) = f.rsplit_once(':').unwrap();
        (h.to_string(), p.parse().unwrap())
    }
    pub fn audit_log(&self) -> PathBuf {
        PathBuf::from(self.info["audit_log"].as_str().unwrap())
    }
    pub fn upstream_log(&self) -> PathBuf {
        PathBuf::from(self.info["upstream"]["log_file"].as_str().unwrap())
    }
    pub fn proxy_log(&self) -> PathBuf {
        PathBuf::from(self.info["proxy"]["log"].as_str().unwrap())
    }
    pub fn admin_url(&self) -> String {
        self.info["admin_url"].as_str().unwrap().to_string()
    }
    /// Runs SQL on the lab database as its superuser (unix socket, not
    /// through the proxy); returns psql -At output.
    pub async fn psql_admin(&self, sql: &str) -> String {
        psql_superuser(&self.info["upstream"], sql).await
    }

    /// Audit records so far, each validated against audit-schema.json.
    /// The proxy may be mid-write of a record: an unterminated last line
    /// is read again for up to `LIVE_TAIL_WAIT` before it counts as broken.
    pub fn audit_records(&self) -> Vec<Value> {
        let p = self.audit_log();
        if !p.exists() {
            return vec![];
        }
        super::audit::validate_live_lines(&p, super::audit::LIVE_TAIL_WAIT)
    }

    /// Waits until an audit record matches `pred` (records are written
    /// asynchronously to the client's view).
    pub async fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(r) = self.audit_records().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no audit record: {what}\n{:#?}",
                self.audit_records()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        let mut me = self;
        if std::env::var_os("TAILGRES_KEEP_LAB").is_some() {
            // For debugging a failure: keep the lab directory (logs, audit).
            let dir = std::mem::replace(&mut me.dir, tempfile::tempdir().unwrap());
            eprintln!("lab kept at {}", dir.keep().display());
        }
        me.stop_inner().await
    }

    async fn stop_inner(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait()).await;
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of every log in the lab directory (each
    /// process's `NAME.log`, and `lab.stderr`), for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut logs = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "log" || x == "stderr") {
                    logs.push(p);
                }
            }
        }
        logs.sort();
        let mut out = String::new();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| format!("(unreadable: {e})"));
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out += &format!("--- {} (last {} of {} lines)\n", p.display(), tail.len(), all.len());
            for l in tail {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

/// Runs SQL as the superuser of a lab database described by `pg` (the
/// `upstream` of `tailgres-lab up`, or the line `tailgres-lab pg` prints:
/// `socket_dir`, `port`, `superuser`) over its unix socket; psql -At output.
pub async fn psql_superuser(pg: &Value, sql: &str) -> String {
    let conn = format!(
        "host={} port={} user={} dbname=postgres",
        pg["socket_dir"].as_str().unwrap(),
        pg["port"],
        pg["superuser"].as_str().unwrap()
    );
    let out = Command::new("psql").args(["-X", "-At", "-c", sql, &conn]).output().await.unwrap();
    assert!(out.status.success(), "psql admin: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A test that panics drops its lab without [`LabUp::stop`]: SIGTERM (not
/// SIGKILL) lets `tailgres-lab` stop its own children, so no tailgres,
/// tslab or postgres outlives the test.
impl Drop for LabUp {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// Sends SIGTERM to a child that is still running; does not wait.
pub fn terminate(child: &mut Child) {
    if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
}

/// Runs psql with a connection string; returns (success, stdout, stderr).
pub async fn psql(conninfo: &str, password: Option<&str>, sql: &str) -> (bool, String, String) {
    psql_stdin(conninfo, password, &[sql], Vec::new()).await
}

/// [`psql`] with several `-c` commands run in one session, and `stdin`
/// written to its standard input (what `COPY ... FROM STDIN` reads).
pub async fn psql_stdin(
    conninfo: &str,
    password: Option<&str>,
    commands: &[&str],
    stdin: Vec<u8>,
) -> (bool, String, String) {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1"]);
    for sql in commands {
        cmd.args(["-c", sql]);
    }
    cmd.arg(conninfo).env_remove("PGPASSWORD");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    // Never read ~/.pgpass or service files of the machine running tests.
    cmd.env("PGPASSFILE", "/dev/null").env("PGSERVICEFILE", "/dev/null").env("PGCONNECT_TIMEOUT", "30");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start psql");
    let mut input = child.stdin.take().unwrap();
    // Written beside the wait: psql may print (and block) before it reads.
    let feed = tokio::spawn(async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut input, &stdin).await;
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("psql hung")
        .unwrap();
    let _ = feed.await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
