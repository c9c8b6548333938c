//! [`EmbeddedNode`]: the [`Tailnet`] implemented by the Go shim in this
//! process. Calls into Go that may block (status and certificates are
//! in-process LocalAPI calls with their own timeouts) run on tokio's
//! blocking pool. WhoIs is called in place: it reads the backend's peer
//! map under its lock (microseconds, no I/O), as a write to a tailnet
//! connection does, and a hop through the pool and back cost every new
//! session two thread wake-ups.
#![forbid(unsafe_code)]

use super::conn::TailnetConn;
use super::ffi::{FdWatch, Handle};
use super::wakers::Wakers;
use super::{CertPair, NetmapEvent, NodeConfig, PeerIdentity, Status, Tailnet, TailnetError, TsnetLog};
use crate::sys;
use serde::Serialize;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

/// How often `start` polls the node's state while it comes up.
const START_POLL: Duration = Duration::from_millis(200);

/// A tailnet node running inside this process.
#[derive(Clone)]
pub struct EmbeddedNode {
    handle: Arc<Handle>,
}

/// The JSON document `tsffi_new` takes; borrowed so the auth key is not
/// copied around (the serialized text is zeroized after use).
#[derive(Serialize)]
struct ShimConfig<'a> {
    dir: &'a str,
    hostname: &'a str,
    auth_key: &'a str,
    control_url: &'a str,
    ephemeral: bool,
    advertise_tags: &'a [String],
    log: String,
    env: std::collections::BTreeMap<&'a str, &'a str>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("tailnet shim call panicked")
}

impl EmbeddedNode {
    /// Joins the tailnet and waits until the node is running
    /// ([`EmbeddedNode::launch`] then [`EmbeddedNode::wait_running`]).
    pub async fn start(cfg: NodeConfig) -> Result<EmbeddedNode, TailnetError> {
        let node = Self::launch(&cfg).await?;
        node.wait_running(&cfg).await?;
        Ok(node)
    }

    /// Creates the node and starts connecting, without waiting.
    pub async fn launch(cfg: &NodeConfig) -> Result<EmbeddedNode, TailnetError> {
        let dir = cfg
            .state_dir
            .to_str()
            .ok_or_else(|| TailnetError::Config("state directory path is not UTF-8".into()))?;
        let shim = ShimConfig {
            dir,
            hostname: &cfg.hostname,
            auth_key: cfg.auth_key.as_ref().map(|k| k.as_str()).unwrap_or(""),
            control_url: cfg.control_url.as_deref().unwrap_or(""),
            ephemeral: cfg.ephemeral,
            advertise_tags: &cfg.advertise_tags,
            log: match &cfg.tsnet_log {
                None => String::new(),
                Some(TsnetLog::Stderr) => "stderr".into(),
                Some(TsnetLog::File(p)) => p.display().to_string(),
            },
            env: cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        };
        let json = Zeroizing::new(
            serde_json::to_string(&shim)
                .map_err(|e| TailnetError::Config(format!("cannot encode node configuration: {e}")))?,
        );
        let handle = blocking(move || Handle::new(&json)).await.map_err(TailnetError::Config)?;
        let node = EmbeddedNode { handle: Arc::new(handle) };
        let h = node.handle.clone();
        blocking(move || h.start()).await.map_err(TailnetError::Start)?;
        Ok(node)
    }

    /// Waits until the node is running (within `cfg.start_timeout`). While
    /// the control server asks for an interactive login, its URL is logged
    /// (warn) as soon as it is known and whenever it changes; it is also in
    /// [`Tailnet::status`].
    pub async fn wait_running(&self, cfg: &NodeConfig) -> Result<(), TailnetError> {
        let started = Instant::now();
        let mut shown_url = String::new();
        let control = cfg.control_url.clone().unwrap_or_else(|| "(Tailscale's)".into());
        loop {
            let st = self.status().await?;
            if st.is_running() && !st.tailscale_ips.is_empty() {
                tracing::info!(
                    name = %st.dns_name,
                    ips = ?st.tailscale_ips,
                    stable_id = %st.stable_id,
                    "tailnet node running"
                );
                return Ok(());
            }
            if !st.last_error.is_empty() {
                return Err(TailnetError::Login { message: st.last_error, control });
            }
            if st.backend_state == "NeedsLogin" && !st.auth_url.is_empty() && st.auth_url != shown_url {
                tracing::warn!(
                    login_url = %st.auth_url,
                    "tailnet login required: open this URL to add the node to your tailnet"
                );
                shown_url = st.auth_url.clone();
            }
            if let Some(limit) = cfg.start_timeout {
                if started.elapsed() >= limit {
                    let mut detail = String::new();
                    if !st.health.is_empty() {
                        detail = format!("; health: {}", st.health.join("; "));
                    }
                    return Err(TailnetError::StartTimeout {
                        waited: limit,
                        state: st.backend_state,
                        detail,
                        control,
                    });
                }
            }
            tokio::time::sleep(START_POLL).await;
        }
    }
}

impl Tailnet for EmbeddedNode {
    type Conn = TailnetConn;
    type Listener = TailnetListener;
    type Watch = NetmapWatch;

    async fn status(&self) -> Result<Status, TailnetError> {
        let h = self.handle.clone();
        let js = blocking(move || h.status_json()).await.map_err(TailnetError::Status)?;
        serde_json::from_str(&js).map_err(|e| TailnetError::Decode(format!("status: {e}")))
    }

    fn listen(&self, port: u16) -> Result<TailnetListener, TailnetError> {
        let addr = format!(":{port}");
        let fd = self
            .handle
            .listen("tcp", &addr)
            .map_err(|reason| TailnetError::Listen { addr: addr.clone(), reason })?;
        TailnetListener::new(fd, port)
    }

    fn listen_service(&self, name: &str, port: u16) -> Result<std::net::TcpListener, TailnetError> {
        let fd = self
            .handle
            .listen_service(name, port)
            .map_err(|reason| TailnetError::Service { name: name.into(), reason })?;
        Ok(std::net::TcpListener::from(fd))
    }

    async fn withdraw_service(&self, name: &str) -> Result<(), TailnetError> {
        let (h, n) = (self.handle.clone(), name.to_string());
        blocking(move || h.withdraw_service(&n))
            .await
            .map_err(|reason| TailnetError::Service { name: name.into(), reason })
    }

    async fn dial(&self, addr: SocketAddr) -> Result<TailnetConn, TailnetError> {
        let h = self.handle.clone();
        let id = blocking(move || h.dial(addr)).await.map_err(|reason| TailnetError::Dial { addr, reason })?;
        TailnetConn::attach(id).map_err(|e| TailnetError::Dial { addr, reason: e.to_string() })
    }

    async fn whois(&self, addr: SocketAddr) -> Result<PeerIdentity, TailnetError> {
        let js = self
            .handle
            .whois_json(addr)
            .map_err(|reason| TailnetError::WhoIs { addr, reason })?
            .ok_or(TailnetError::UnknownPeer { addr })?;
        serde_json::from_str(&js).map_err(|e| TailnetError::Decode(format!("whois {addr}: {e}")))
    }

    async fn cert_pair(&self, domain: &str) -> Result<CertPair, TailnetError> {
        let h = self.handle.clone();
        let d = domain.to_string();
        let (cert_pem, key_pem) = blocking(move || h.cert_pair(&d))
            .await
            .map_err(|reason| TailnetError::Cert { domain: domain.to_string(), reason })?;
        Ok(CertPair { cert_pem, key_pem })
    }

    fn watch(&self) -> Result<NetmapWatch, TailnetError> {
        let fd = self.handle.watch().map_err(TailnetError::Watch)?;
        NetmapWatch::new(fd)
    }

    async fn shutdown(&self) {
        let h = self.handle.clone();
        blocking(move || h.close()).await;
    }

    /// Sessions run on the node's goroutines (see `task`).
    fn session_tasks(&self) -> Option<super::NodeTasks> {
        Some(super::NodeTasks::with_current_runtime())
    }
}

/// Bytes of one announcement (tsffi.h's TSFFI_ANNOUNCE_LEN).
const ANNOUNCE_LEN: usize = super::ffi::ANNOUNCE_LEN;

/// Accepted tailnet connections, each with its peer's address.
///
/// The announcements' socket waits in the node's netpoller (a watched
/// socket, like the database's): an accept loop polled on the node hears of
/// a new connection from a goroutine, not through tokio's reactor.
pub struct TailnetListener {
    // Declared (so dropped) before fd: the node's duplicate closes first,
    // and closing fd then ends the listener.
    watch: FdWatch<Wakers>,
    wakers: Arc<Wakers>,
    fd: OwnedFd,
    port: u16,
}

impl TailnetListener {
    fn new(fd: OwnedFd, port: u16) -> Result<Self, TailnetError> {
        sys::set_nonblocking(fd.as_fd()).map_err(TailnetError::Accept)?;
        let wakers = Arc::new(Wakers::default());
        let watch = FdWatch::new(fd.as_fd(), wakers.clone()).map_err(TailnetError::Accept)?;
        Ok(TailnetListener { watch, wakers, fd, port })
    }
}

impl super::Listener for TailnetListener {
    type Conn = TailnetConn;

    fn port(&self) -> u16 {
        self.port
    }

    /// The next connection and its peer's tailnet address. The address and
    /// the connection arrive in one message, so they always belong together.
    ///
    /// An error for one malformed announcement does not end the listener:
    /// call again. [`TailnetError::Closed`] means the node shut down.
    async fn accept(&self) -> Result<(TailnetConn, SocketAddr), TailnetError> {
        let msg = std::future::poll_fn(|cx| {
            self.wakers.read.poll(cx, || match sys::recv_seqpacket(self.fd.as_fd()) {
                Ok(msg) => Ok(Some(msg)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.watch.wait(true, false)?;
                    Ok(None)
                }
                Err(e) => Err(e),
            })
        })
        .await
        .map_err(TailnetError::Accept)?;
        match msg {
            Some(msg) => Self::connection(&msg),
            None => Err(TailnetError::Closed),
        }
    }
}

impl TailnetListener {
    /// Parses an announcement (TSFFI_ANNOUNCE_LEN bytes: the id, 8 bytes
    /// little-endian; the peer's IP, 16; its port, 2) and takes the
    /// connection over. An announcement of another length is left to the
    /// node, which closes its connection with the listener.
    fn connection(msg: &[u8]) -> Result<(TailnetConn, SocketAddr), TailnetError> {
        let parts = msg.split_first_chunk::<8>().and_then(|(id, rest)| Some((id, rest.try_into().ok()?)));
        let Some((id, addr)) = parts else {
            let why = format!("announcement of {} bytes, not {ANNOUNCE_LEN}", msg.len());
            return Err(TailnetError::Accept(std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
        };
        let id = u64::from_le_bytes(*id);
        let addr = super::ffi::announced_addr(addr);
        let conn = TailnetConn::attach(id).map_err(TailnetError::Accept)?;
        Ok((conn, addr))
    }
}

/// Network-map changes, one event per change.
pub struct NetmapWatch {
    lines: Lines<BufReader<UnixStream>>,
}

impl NetmapWatch {
    fn new(fd: OwnedFd) -> Result<Self, TailnetError> {
        sys::set_nonblocking(fd.as_fd()).map_err(|e| TailnetError::Watch(e.to_string()))?;
        let s = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
            .map_err(|e| TailnetError::Watch(e.to_string()))?;
        Ok(NetmapWatch { lines: BufReader::new(s).lines() })
    }
}

impl super::Watch for NetmapWatch {
    async fn next(&mut self) -> Option<Result<NetmapEvent, TailnetError>> {
        match self.lines.next_line().await {
            Ok(Some(line)) => Some(
                serde_json::from_str(&line).map_err(|e| TailnetError::Decode(format!("netmap event: {e}"))),
            ),
            Ok(None) => None,
            Err(e) => Some(Err(TailnetError::Watch(e.to_string()))),
        }
    }
}
