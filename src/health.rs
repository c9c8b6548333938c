//! `/healthz`, `/readyz` and `/metrics` over a minimal HTTP/1.1 (GET and
//! HEAD, one request per connection), on a local address and/or a tailnet
//! port the operator chooses.
//!
//! - `/healthz`: 200 while the process serves requests at all.
//! - `/readyz`: 200 when the tailnet node is running, every route's
//!   database answers a verified TLS handshake and no shutdown has begun;
//!   the audit log is writable; else 503. The JSON body says which part is
//!   not ready. While the node needs an interactive login, the login URL is
//!   in it only for a client on this machine's loopback: whoever opens that
//!   URL first claims the node for their tailnet, so it is never shown to a
//!   client that reaches the port from elsewhere (a container's 0.0.0.0, or
//!   the tailnet port).
//! - `/metrics`: Prometheus text ([`crate::metrics`]).
//!
//! The database probe is TLS then a CancelRequest for a backend that does
//! not exist: PostgreSQL ignores it quietly, where a bare close would log
//! "incomplete startup packet" at every probe.
#![forbid(unsafe_code)]

use crate::metrics::{Metrics, TailnetGauge};
use crate::settings::SettingsCell;
use crate::tailnet::Tailnet;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

/// A request head larger than this is refused (we serve three GETs).
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Probe results are reused for this long, so frequent /readyz polls do not
/// turn into a handshake each at the database.
const PROBE_FRESH: Duration = Duration::from_secs(2);

/// A route's last probe: when, and what came of it.
type Probe = (Instant, Result<(), String>);

pub struct Health<T> {
    pub tailnet: Arc<T>,
    pub settings: SettingsCell,
    pub metrics: Arc<Metrics>,
    /// The audit log: sessions are refused while it cannot be written.
    pub audit: crate::audit::AuditLog,
    /// Route name → its last probe.
    probes: Mutex<HashMap<String, Probe>>,
    /// Set when shutdown begins: /readyz turns 503 so load balancers and
    /// orchestrators stop sending new sessions during the drain.
    pub draining: std::sync::atomic::AtomicBool,
}

impl<T: Tailnet> Health<T> {
    pub fn new(
        tailnet: Arc<T>,
        settings: SettingsCell,
        metrics: Arc<Metrics>,
        audit: crate::audit::AuditLog,
    ) -> Self {
        Health {
            tailnet,
            settings,
            metrics,
            audit,
            probes: Mutex::new(HashMap::new()),
            draining: Default::default(),
        }
    }

    /// Answers one connection; `local` when the client is on this
    /// machine's loopback (only it may see the login URL).
    pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(&self, mut conn: S, local: bool) {
        let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn)).await {
            Ok(Ok(h)) => h,
            Ok(Err(status)) => return respond(&mut conn, status, "text/plain", "bad request\n", false).await,
            Err(_) => return,
        };
        let mut parts = head.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            return respond(&mut conn, 405, "text/plain", "only GET and HEAD\n", false).await;
        }
        let path = target.split('?').next().unwrap_or("");
        match path {
            "/healthz" => respond(&mut conn, 200, "text/plain", "ok\n", head_only).await,
            "/readyz" => {
                let (ready, body) = self.readiness(local).await;
                let text = format!("{body:#}\n");
                respond(&mut conn, if ready { 200 } else { 503 }, "application/json", &text, head_only).await
            }
            "/metrics" => {
                let state = match self.tailnet.status().await {
                    Ok(st) => st.backend_state,
                    Err(_) => "Unknown".into(),
                };
                let text = self.metrics.render(&TailnetGauge { backend_state: &state });
                respond(&mut conn, 200, "text/plain; version=0.0.4", &text, head_only).await
            }
            _ => {
                respond(
                    &mut conn,
                    404,
                    "text/plain",
                    "not found: try /healthz, /readyz or /metrics\n",
                    head_only,
                )
                .await
            }
        }
    }

    /// Whether tailgres can serve a session now, and why not; the login
    /// URL only when `local`.
    pub async fn readiness(&self, local: bool) -> (bool, Value) {
        let (tailnet_ok, tailnet) = match self.tailnet.status().await {
            Ok(st) => {
                let ok = st.is_running() && !st.tailscale_ips.is_empty();
                let mut v = json!({"ok": ok, "state": st.backend_state, "name": st.dns_name});
                if !st.auth_url.is_empty() {
                    v["login_url"] = if local {
                        json!(st.auth_url)
                    } else {
                        json!("in tailgres's log, or /readyz asked from this machine's loopback")
                    };
                }
                if !st.last_error.is_empty() {
                    v["error"] = json!(st.last_error);
                }
                (ok, v)
            }
            Err(e) => (false, json!({"ok": false, "error": e.to_string()})),
        };
        let settings = self.settings.get();
        let mut probes = self.probes.lock().await;
        let mut upstreams = Vec::new();
        let mut all_ok = true;
        for r in &settings.routes {
            let fresh =
                probes.get(&r.name).filter(|(at, _)| at.elapsed() < PROBE_FRESH).map(|(_, res)| res.clone());
            let res = match fresh {
                Some(res) => res,
                None => {
                    let res = probe(&r.upstream).await.map(|not_after| {
                        self.metrics.upstream_cert(&r.name, not_after);
                    });
                    probes.insert(r.name.clone(), (Instant::now(), res.clone()));
                    res
                }
            };
            all_ok &= res.is_ok();
            upstreams.push(json!({
                "route": r.name,
                "address": r.upstream.address(),
                "ok": res.is_ok(),
                "error": res.err(),
            }));
        }
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        let audit_ok = self.audit.is_healthy();
        let audit = if audit_ok {
            json!({"ok": true})
        } else {
            json!({"ok": false, "error": "the audit log cannot be written; new sessions are refused (the operator's log says why)"})
        };
        let ready = tailnet_ok && all_ok && audit_ok && !draining;
        (
            ready,
            json!({"ready": ready, "draining": draining, "tailnet": tailnet, "audit": audit, "upstreams": upstreams}),
        )
    }
}

/// A verified TLS handshake with the database; returns its certificate's
/// notAfter.
async fn probe(up: &crate::upstream::UpstreamTls) -> Result<Option<std::time::SystemTime>, String> {
    let mut c = up.connect().await.map_err(|e| e.to_string())?;
    let _ = c.stream.write_all(&crate::pgwire::cancel_request(0, &[0; 4])).await;
    let _ = c.stream.shutdown().await;
    Ok(c.facts.cert_not_after)
}

/// Reads the request head; returns its request line.
async fn read_head<S: AsyncRead + Unpin>(conn: &mut S) -> Result<String, u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| 400u16)?.trim_end_matches('\r');
    if !line.ends_with("HTTP/1.1") && !line.ends_with("HTTP/1.0") {
        return Err(400);
    }
    Ok(line.to_string())
}

async fn respond<S: AsyncWrite + Unpin>(conn: &mut S, status: u16, ctype: &str, body: &str, head_only: bool) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    let _ = conn.write_all(out.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// A listener health is served on: a local TCP one or a tailnet port.
pub trait Listener: Send + Sync + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, and whether its client is on this machine's
    /// loopback; `Err(None)` once the listener is closed for good,
    /// `Err(Some(why))` for a failure worth retrying.
    fn next(&self) -> impl std::future::Future<Output = Result<(Self::Conn, bool), Option<String>>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn next(&self) -> Result<(Self::Conn, bool), Option<String>> {
        self.accept().await.map(|(c, peer)| (c, peer.ip().is_loopback())).map_err(|e| Some(e.to_string()))
    }
}

impl Listener for crate::tailnet::TailnetListener {
    type Conn = crate::tailnet::TailnetConn;
    async fn next(&self) -> Result<(Self::Conn, bool), Option<String>> {
        match crate::tailnet::Listener::accept(self).await {
            // A tailnet peer is never local.
            Ok((c, _)) => Ok((c, false)),
            Err(crate::tailnet::TailnetError::Closed) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        }
    }
}

/// Serves on `listener` until `stop` resolves or the listener closes.
pub async fn serve<T: Tailnet + 'static, L: Listener>(
    listener: L,
    health: Arc<Health<T>>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = listener.next() => match r {
                Ok((conn, local)) => {
                    let h = health.clone();
                    tokio::spawn(async move { h.handle(conn, local).await });
                }
                Err(None) => return,
                Err(Some(e)) => {
                    tracing::warn!(error = %e, "health listener accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_heads() {
        let cases: &[(&[u8], Result<&str, u16>)] = &[
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Ok("GET /healthz HTTP/1.1")),
            (b"GET /readyz HTTP/1.0\n\n", Ok("GET /readyz HTTP/1.0")),
            (b"GET /readyz\r\n\r\n", Err(400)),
            (b"\xff\xfe /x HTTP/1.1\r\n\r\n", Err(400)),
            (b"GET /x HTTP/1.1\r\n", Err(400)),
        ];
        for (input, want) in cases {
            let mut r: &[u8] = input;
            assert_eq!(read_head(&mut r).await.as_deref().map_err(|e| *e), *want, "{input:?}");
        }
        let big = [b'a'; MAX_HEAD * 2];
        assert_eq!(read_head(&mut &big[..]).await, Err(431));
    }
}
