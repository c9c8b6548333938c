//! The tailnet: joining it, listening on it, and asking who a peer is.
//!
//! The session pipeline sees only the [`Tailnet`] trait and the plain types
//! here. The product's implementation is [`EmbeddedNode`], our Go shim over
//! tsnet linked into the binary (see `vendor/tsffi`); [`memory`] is a small
//! in-memory tailnet for tests, so every stage, refusal and shutdown path can
//! be driven in-process. A pure-Rust Tailscale could replace the embedded
//! node without touching the pipeline.

mod conn;
mod directory;
mod embedded;
mod ffi;
mod identity;
pub mod memory;
mod socket;
mod task;
mod wakers;

pub use conn::TailnetConn;
pub use directory::Directory;
pub use embedded::{EmbeddedNode, NetmapWatch, TailnetListener};
pub use identity::PeerIdentity;
pub use socket::NodeSocket;
pub use task::{on_node, NodeTasks};

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

/// How to join the tailnet.
#[derive(Clone)]
pub struct NodeConfig {
    /// Where the node keeps its keys and state (reused across restarts).
    pub state_dir: PathBuf,
    pub hostname: String,
    /// Pre-authorised key; `None` means interactive login (the URL is logged).
    pub auth_key: Option<Zeroizing<String>>,
    /// Coordination server; `None` means Tailscale's.
    pub control_url: Option<String>,
    pub ephemeral: bool,
    pub advertise_tags: Vec<String>,
    /// Where tsnet's verbose log goes: `None` discards it.
    pub tsnet_log: Option<TsnetLog>,
    /// `TS_*` knobs set inside Go before the node starts.
    pub env: Vec<(String, String)>,
    /// Give up if the node is not running by then (`None`: wait forever,
    /// e.g. for a person to complete an interactive login).
    pub start_timeout: Option<Duration>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("state_dir", &self.state_dir)
            .field("hostname", &self.hostname)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("control_url", &self.control_url)
            .field("ephemeral", &self.ephemeral)
            .field("advertise_tags", &self.advertise_tags)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub enum TsnetLog {
    Stderr,
    File(PathBuf),
}

/// A snapshot of the node's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// "NoState", "NeedsLogin", "NeedsMachineAuth", "Starting", "Running", ...
    pub backend_state: String,
    /// Interactive login URL while `backend_state` is "NeedsLogin".
    pub auth_url: String,
    pub tailscale_ips: Vec<IpAddr>,
    /// Our MagicDNS name, without the trailing dot.
    pub dns_name: String,
    pub magic_dns_suffix: String,
    /// Names for which the tailnet can issue HTTPS certificates.
    pub cert_domains: Vec<String>,
    pub stable_id: String,
    /// Home DERP region code, once connected to it.
    pub home_derp: String,
    pub health: Vec<String>,
    /// The backend's latest error (e.g. a rejected auth key).
    pub last_error: String,
}

impl Status {
    pub fn is_running(&self) -> bool {
        self.backend_state == "Running"
    }
}

/// A certificate chain and key for one of our names, as PEM.
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

/// One change on the tailnet, as the node saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetmapEvent {
    pub seq: u64,
    /// "netmap" (the first, full one), "peers_changed" (added, or tags,
    /// capabilities, key expiry changed), "peers_removed", "self_changed".
    /// Grant changes (packet filter) are not announced: re-check
    /// identities periodically too.
    pub kind: String,
    /// The peers concerned ("netmap": all of them).
    #[serde(default)]
    pub peers: Vec<NetmapPeer>,
    /// Node IDs of removed peers ("peers_removed").
    #[serde(default)]
    pub removed: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetmapPeer {
    /// The node's numeric ID (what `removed` names); 0 when not given.
    #[serde(default)]
    pub node_id: i64,
    pub stable_id: String,
    pub node_name: String,
    pub addresses: Vec<IpAddr>,
    pub tags: Vec<String>,
    pub user_id: i64,
    pub expired: bool,
}

/// Everything that can go wrong on the tailnet side, each saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TailnetError {
    #[error("tailnet node configuration rejected: {0}")]
    Config(String),
    #[error("tailnet node failed to start: {0}")]
    Start(String),
    #[error(
        "tailnet login at {control} failed: {message} (check that the auth key is valid, \
         unexpired and meant for this control server)"
    )]
    Login { message: String, control: String },
    #[error(
        "tailnet node not running after {waited:?} (state {state}{detail}); check that the \
         control server {control} is reachable"
    )]
    StartTimeout { waited: Duration, state: String, detail: String, control: String },
    #[error("tailnet status: {0}")]
    Status(String),
    #[error("listening on the tailnet at {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("accepting a tailnet connection: {0}")]
    Accept(#[source] std::io::Error),
    #[error("serving the Tailscale Service {name}: {reason}")]
    Service { name: String, reason: String },
    #[error("dialing {addr} over the tailnet: {reason}")]
    Dial { addr: SocketAddr, reason: String },
    /// No tailnet node has the address: the peer is unknown.
    #[error("no tailnet node has the address {addr}")]
    UnknownPeer { addr: SocketAddr },
    /// The lookup itself failed: the fault of this node, not of the peer.
    #[error("identifying the peer {addr} failed: {reason}")]
    WhoIs { addr: SocketAddr, reason: String },
    #[error("HTTPS certificate for {domain}: {reason}")]
    Cert { domain: String, reason: String },
    #[error("watching the network map: {0}")]
    Watch(String),
    #[error("the tailnet returned data tailgres cannot read: {0}")]
    Decode(String),
    #[error("the tailnet node is shut down")]
    Closed,
}

/// The backend boundary: what the proxy needs from a tailnet.
pub trait Tailnet: Send + Sync + 'static {
    /// An accepted connection from a peer.
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + crate::relay::HandOff + 'static;
    type Listener: Listener<Conn = Self::Conn>;
    type Watch: Watch;

    fn status(&self) -> impl Future<Output = Result<Status, TailnetError>> + Send;
    /// Listens on a TCP port of our tailnet addresses.
    fn listen(&self, port: u16) -> Result<Self::Listener, TailnetError>;
    /// Serves the Tailscale Service `name` ("svc:db") on `port`: the node
    /// advertises it, and its connections arrive on the returned loopback
    /// listener behind a PROXY protocol v2 header. Anything local can
    /// connect there too: the caller decides what a connection is.
    fn listen_service(&self, name: &str, port: u16) -> Result<std::net::TcpListener, TailnetError>;
    /// Stops advertising the Service: new connections go to other hosts.
    fn withdraw_service(&self, name: &str) -> impl Future<Output = Result<(), TailnetError>> + Send;
    /// Connects to a peer over the tailnet.
    fn dial(&self, addr: SocketAddr) -> impl Future<Output = Result<Self::Conn, TailnetError>> + Send;
    /// Identifies the peer at `addr` (the accepted connection's remote).
    fn whois(&self, addr: SocketAddr) -> impl Future<Output = Result<PeerIdentity, TailnetError>> + Send;
    fn cert_pair(&self, domain: &str) -> impl Future<Output = Result<CertPair, TailnetError>> + Send;
    fn watch(&self) -> Result<Self::Watch, TailnetError>;
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
    /// Where sessions on this tailnet's connections run: `Some` for a
    /// node that polls them on its own scheduler ([`NodeTasks`]), `None`
    /// for tokio.
    fn session_tasks(&self) -> Option<NodeTasks> {
        None
    }
}

/// Connections accepted on one tailnet port.
pub trait Listener: Send + Sync + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + crate::relay::HandOff + 'static;
    /// The tailnet port it serves.
    fn port(&self) -> u16;
    /// The next connection and its peer's tailnet address.
    /// [`TailnetError::Closed`] means the listener is done for good; any
    /// other error concerns one connection: call again.
    fn accept(&self) -> impl Future<Output = Result<(Self::Conn, SocketAddr), TailnetError>> + Send;
}

/// Network-map changes, one event per change.
pub trait Watch: Send + 'static {
    /// The next change; `None` once the node is shut down.
    fn next(&mut self) -> impl Future<Output = Option<Result<NetmapEvent, TailnetError>>> + Send;
}
