//! Test support: the loopback tailnet lab (`vendor/cmd/tslab`) driven from
//! Rust. Every test that uses it must run inside a network namespace that
//! holds only `lo` (scripts/test creates one); [`require_sandbox`] refuses
//! to run otherwise, so no tailnet traffic can ever leave this machine.
#![allow(dead_code)]

pub mod audit;
pub mod clients;
pub mod headscale;
pub mod lab;
pub mod ops;
pub mod wire;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tailgres::tailnet::{EmbeddedNode, NodeConfig, TsnetLog};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The knobs every tailnet process in tests runs with:
/// vendor/cmd/tslab/lab.env, the one list (it says what each is for). They
/// must be in the environment when the process starts, because the Go
/// runtime copies it at initialisation: scripts/test exports them.
pub fn ts_test_env() -> Vec<(&'static str, &'static str)> {
    lab_env::lab_env().collect()
}

/// tailgres-lab's reader of lab.env, shared rather than written twice.
#[path = "../../src/bin/tailgres-lab/lab_env.rs"]
mod lab_env;

/// How long one step of an end-to-end test may take (a dial through the
/// tailnet, a query, a record to appear) on a loaded 2-core machine.
pub const STEP: Duration = Duration::from_secs(30);

/// Awaits `f` for at most [`STEP`]; panics naming `what` otherwise. The one
/// copy for the end-to-end suites (the in-process harness has its own,
/// shorter wait).
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    within_for(STEP, what, f).await
}

/// [`within`] with another limit.
pub async fn within_for<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// How long a lab process may take to report ready (cold caches, 2 cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Panics unless this process runs in a namespace with only loopback and
/// with the tailnet test knobs in its environment.
pub fn require_sandbox() {
    // /proc/self/net follows this process's network namespace (/sys/class/net
    // would show the namespace /sys was mounted in).
    let dev = std::fs::read_to_string("/proc/self/net/dev").expect("read /proc/self/net/dev");
    let ifaces: Vec<String> =
        dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(|s| s.trim().to_string()).collect();
    assert!(
        ifaces.iter().all(|i| i == "lo"),
        "tailnet tests must run in a network namespace with only `lo` (found {ifaces:?}); \
         run them with scripts/test"
    );
    for (k, v) in ts_test_env() {
        assert_eq!(
            std::env::var(k).ok().as_deref(),
            Some(v),
            "{k}={v} must be in the environment at exec time; run the tests with scripts/test"
        );
    }
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The lab binary: $TAILGRES_TSLAB, or built from vendor/cmd/tslab (offline:
/// the module cache was filled before entering the namespace).
pub fn tslab_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TAILGRES_TSLAB") {
        return PathBuf::from(p);
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tslab");
    let vendor = Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor");
    let status = std::process::Command::new("go")
        .current_dir(&vendor)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly")
        .env("GOPROXY", "off")
        .args(["build", "-o"])
        .arg(&out)
        .arg("./cmd/tslab")
        .status()
        .expect("run go build for the lab");
    assert!(status.success(), "building vendor/cmd/tslab failed");
    out
}

/// A lab child process that is killed when dropped; its stderr goes to a
/// file so a failure can show it.
pub struct LabProcess {
    pub child: Child,
    pub ready: Value,
    pub stderr_path: PathBuf,
}

impl LabProcess {
    async fn spawn(args: &[String], dir: &Path, what: &str) -> LabProcess {
        LabProcess::spawn_env(args, dir, what, &[]).await
    }

    /// Starts `tslab ARGS` with `env` added to the inherited environment
    /// (e.g. a knob another control server needs) and waits for its ready line.
    pub async fn spawn_env(args: &[String], dir: &Path, what: &str, env: &[(&str, &str)]) -> LabProcess {
        let stderr_path = dir.join(format!("{what}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(tslab_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start tslab {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        let line = match line {
            Ok(Ok(Some(l))) => l,
            other => {
                let _ = child.start_kill();
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("tslab {what} did not report ready ({other:?}); stderr:\n{err}");
            }
        };
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("tslab {what} ready line {line:?}: {e}"));
        LabProcess { child, ready, stderr_path }
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A running loopback tailnet: control server, DERP, STUN, admin API.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub control: LabProcess,
    pub control_url: String,
    pub admin_url: String,
    pub suffix: String,
}

impl Lab {
    pub async fn start(auth_key: Option<&str>) -> Lab {
        match auth_key {
            Some(k) => Lab::start_with(&[&format!("--auth-key={k}")]).await,
            None => Lab::start_with(&[]).await,
        }
    }

    /// Starts `tslab control` with extra flags.
    pub async fn start_with(flags: &[&str]) -> Lab {
        require_sandbox();
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["control".to_string()];
        args.extend(flags.iter().map(|s| s.to_string()));
        let control = LabProcess::spawn(&args, dir.path(), "control").await;
        let s = |k: &str| control.ready[k].as_str().unwrap_or_else(|| panic!("{k}")).to_string();
        let (control_url, admin_url, suffix) = (s("control_url"), s("admin_url"), s("magic_dns_suffix"));
        Lab { dir, control, control_url, admin_url, suffix }
    }

    /// A client node (tslab node) with the given extra arguments.
    pub async fn node(&self, hostname: &str, extra: &[&str]) -> LabProcess {
        let state = self.dir.path().join(format!("node-{hostname}"));
        let mut args = vec![
            "node".to_string(),
            format!("--control-url={}", self.control_url),
            format!("--hostname={hostname}"),
            format!("--state-dir={}", state.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        LabProcess::spawn(&args, self.dir.path(), hostname).await
    }

    /// Node configuration for an embedded (Rust-side) node on this lab.
    pub fn node_config(&self, hostname: &str, state_dir: &Path) -> NodeConfig {
        NodeConfig {
            state_dir: state_dir.to_path_buf(),
            hostname: hostname.to_string(),
            auth_key: None,
            control_url: Some(self.control_url.clone()),
            ephemeral: false,
            advertise_tags: vec![],
            tsnet_log: std::env::var("TAILGRES_TEST_TSNET_LOG").ok().map(|_| TsnetLog::Stderr),
            env: vec![],
            start_timeout: Some(READY_TIMEOUT),
        }
    }

    pub async fn embedded(&self, hostname: &str) -> EmbeddedNode {
        let dir = self.dir.path().join(format!("embedded-{hostname}"));
        EmbeddedNode::start(self.node_config(hostname, &dir)).await.expect("embedded node starts")
    }

    /// Calls the admin API; panics on a non-2xx answer.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.admin_raw(method, path, body).await;
        assert!((200..300).contains(&status), "admin {method} {path}: {status} {v}");
        v
    }

    pub async fn admin_raw(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http_json(&self.admin_url, method, path, body).await
    }
}

/// A minimal HTTP/1.0 JSON client for the lab's loopback admin API.
pub async fn http_json(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let hostport = base.strip_prefix("http://").expect("http URL");
    assert!(hostport.starts_with("127.0.0.1:"), "admin API must be on loopback: {base}");
    let mut s = TcpStream::connect(hostport).await.expect("connect admin API");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let v = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body).unwrap() };
    (status, v)
}

/// The loopback address of a node's n-th forward.
pub fn forward_addr(node: &LabProcess, n: usize) -> String {
    node.ready["forwards"][n]["listen"].as_str().expect("forward listen").to_string()
}
