//! Helpers for the operations tests: a second lab database, HTTP GETs of
//! the health endpoints, Prometheus samples.

use super::READY_TIMEOUT;
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// `tailgres-lab pg`: a TLS PostgreSQL of its own (its own throwaway CA).
pub struct PgProc {
    pub info: Value,
    child: Child,
}

impl PgProc {
    pub async fn start() -> PgProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tailgres-lab"))
            .arg("pg")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
        let Ok(Ok(Some(line))) = line else { panic!("tailgres-lab pg did not come up: {line:?}") };
        PgProc { info: serde_json::from_str(&line).unwrap(), child }
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.info["host"].as_str().unwrap(), self.info["port"])
    }
    pub fn port(&self) -> u16 {
        self.info["port"].as_u64().unwrap() as u16
    }
    pub fn ca(&self) -> &str {
        self.info["ca_file"].as_str().unwrap()
    }
    pub fn server_name(&self) -> &str {
        self.info["server_name"].as_str().unwrap()
    }

    /// A `[[route]]` table sending `database` (on `port`, if given) here,
    /// verified with the CA in `ca` under this server's name.
    pub fn route_toml(&self, name: &str, database: &str, port: Option<u16>, ca: &str) -> String {
        let port = port.map(|p| format!("port = {p}\n")).unwrap_or_default();
        format!(
            "[[route]]\nname = \"{name}\"\n{port}databases = [\"{database}\"]\nupstream = \"{}\"\n\
             upstream-ca = [\"{ca}\"]\nupstream-server-name = \"{}\"\n",
            self.addr(),
            self.server_name()
        )
    }

    /// Stops it cleanly (SIGTERM) and waits.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// SIGTERM on drop (a panicking test): the lab stops its postgres.
impl Drop for PgProc {
    fn drop(&mut self) {
        super::lab::terminate(&mut self.child);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET over HTTP/1.1 to 127.0.0.1; returns (status, body). Status 0 if the
/// connection failed or was reset.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let answered = async {
        s.write_all(req.as_bytes()).await?;
        s.read_to_string(&mut out).await
    };
    // A forward whose far end is not listening yet resets: not an answer.
    if tokio::time::timeout(Duration::from_secs(30), answered).await.expect("health answer").is_err() {
        return (0, String::new());
    }
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// `/readyz` as JSON, with its status.
pub async fn readyz(port: u16) -> (u16, Value) {
    let (status, body) = http_get(port, "/readyz").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Polls `/readyz` until `pred` holds (at most [`READY_TIMEOUT`]).
pub async fn wait_readyz(port: u16, what: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let (status, v) = readyz(port).await;
        if pred(status, &v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never showed {what}; last: {status} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one sample (`name{labels}` exactly as rendered), or 0.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}
