//! An in-memory tailnet for tests: peers are [`PeerIdentity`] values keyed
//! by address, a dial is a `tokio::io::duplex` pair handed to the listener
//! of that port, and netmap changes are announced by the test. Nothing here
//! touches a socket, so the whole pipeline (every refusal, cancel,
//! revocation, idle timeout and shutdown path) runs in-process, in
//! milliseconds and with paused time where a test wants it.
//!
//! It models what the pipeline relies on and no more: WhoIs answers from the
//! peer table (or fails, when told to), `watch` yields what [`MemoryTailnet`]
//! announces, and `shutdown` closes every listener.
#![forbid(unsafe_code)]

use super::{
    CertPair, Listener, NetmapEvent, NetmapPeer, PeerIdentity, Status, Tailnet, TailnetError, Watch,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

/// Bytes a dialled connection buffers each way (as a socket would).
const PIPE: usize = 64 * 1024;

#[derive(Default)]
pub struct MemoryTailnet {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    peers: HashMap<IpAddr, PeerIdentity>,
    /// When set, every WhoIs fails with this (a broken node).
    whois_failure: Option<String>,
    listeners: HashMap<u16, mpsc::Sender<(DuplexStream, SocketAddr)>>,
    watchers: Vec<mpsc::UnboundedSender<NetmapEvent>>,
    seq: u64,
    next_port: u16,
    /// While set, the node "needs a login" at this URL.
    login_url: Option<String>,
    /// Services served (`listen_service`), and whether still advertised.
    services: HashMap<String, bool>,
    /// Where a dial to an address goes: another in-memory node, dialled
    /// from our address there.
    links: HashMap<SocketAddr, (std::sync::Arc<MemoryTailnet>, IpAddr)>,
}

impl MemoryTailnet {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces the peer at `ip` and announces it.
    pub fn set_peer(&self, ip: IpAddr, id: PeerIdentity) {
        let peer = netmap_peer(ip, &id);
        let mut s = self.state();
        s.peers.insert(ip, id);
        s.announce("peers_changed", vec![peer], vec![]);
    }

    /// Removes the peer at `ip` and announces it.
    pub fn remove_peer(&self, ip: IpAddr) {
        let mut s = self.state();
        s.peers.remove(&ip);
        s.announce("peers_removed", vec![], vec![node_id(ip)]);
    }

    /// Makes every WhoIs fail (`Some`) or work again (`None`).
    pub fn fail_whois(&self, why: Option<&str>) {
        self.state().whois_failure = why.map(str::to_string);
    }

    /// Makes the node wait for an interactive login at `url` (`None`: it
    /// is running).
    pub fn need_login(&self, url: Option<&str>) {
        self.state().login_url = url.map(str::to_string);
    }

    /// Makes a dial to `addr` reach `other`'s listener on that port, as
    /// the peer `from` (two in-process nodes of one fleet).
    pub fn link(&self, addr: SocketAddr, other: std::sync::Arc<MemoryTailnet>, from: IpAddr) {
        self.state().links.insert(addr, (other, from));
    }

    /// Whether the Service `name` is served and still advertised.
    pub fn advertises(&self, name: &str) -> bool {
        self.state().services.get(name).copied().unwrap_or(false)
    }

    /// Announces the whole peer table, as a node's first netmap does.
    pub fn announce_netmap(&self) {
        let mut s = self.state();
        let peers = s.peers.iter().map(|(ip, id)| netmap_peer(*ip, id)).collect();
        s.announce("netmap", peers, vec![]);
    }

    /// Dials `port` from the peer at `from`; the other end is accepted by
    /// that port's listener.
    pub async fn dial(&self, from: IpAddr, port: u16) -> std::io::Result<DuplexStream> {
        let tx = {
            let mut s = self.state();
            s.next_port = s.next_port.wrapping_add(1).max(1024);
            let src = SocketAddr::new(from, s.next_port);
            let tx = s.listeners.get(&port).cloned();
            tx.map(|tx| (tx, src))
        };
        let Some((tx, src)) = tx else {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "nothing listens there"));
        };
        let (ours, theirs) = tokio::io::duplex(PIPE);
        tx.send((theirs, src))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "listener closed"))?;
        Ok(ours)
    }
}

/// How the watch announces the peer at `ip`.
fn netmap_peer(ip: IpAddr, id: &PeerIdentity) -> NetmapPeer {
    NetmapPeer {
        node_id: node_id(ip),
        stable_id: id.stable_id.clone(),
        node_name: id.node_name.clone(),
        addresses: vec![ip],
        tags: id.tags.clone(),
        user_id: 1,
        expired: id.expired,
    }
}

/// A peer's numeric node ID here: its address as a number.
fn node_id(ip: IpAddr) -> i64 {
    match ip {
        IpAddr::V4(a) => i64::from(u32::from(a)),
        IpAddr::V6(a) => (u128::from(a) & 0x7fff_ffff_ffff_ffff) as i64,
    }
}

impl State {
    fn announce(&mut self, kind: &str, peers: Vec<NetmapPeer>, removed: Vec<i64>) {
        self.seq += 1;
        let ev = NetmapEvent { seq: self.seq, kind: kind.into(), peers, removed };
        self.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }
}

pub struct MemoryListener {
    port: u16,
    conns: tokio::sync::Mutex<mpsc::Receiver<(DuplexStream, SocketAddr)>>,
}

impl Listener for MemoryListener {
    type Conn = DuplexStream;

    fn port(&self) -> u16 {
        self.port
    }

    async fn accept(&self) -> Result<(DuplexStream, SocketAddr), TailnetError> {
        self.conns.lock().await.recv().await.ok_or(TailnetError::Closed)
    }
}

pub struct MemoryWatch(mpsc::UnboundedReceiver<NetmapEvent>);

impl Watch for MemoryWatch {
    async fn next(&mut self) -> Option<Result<NetmapEvent, TailnetError>> {
        self.0.recv().await.map(Ok)
    }
}

impl Tailnet for MemoryTailnet {
    type Conn = DuplexStream;
    type Listener = MemoryListener;
    type Watch = MemoryWatch;

    async fn status(&self) -> Result<Status, TailnetError> {
        let login = self.state().login_url.clone();
        Ok(Status {
            backend_state: if login.is_some() { "NeedsLogin" } else { "Running" }.into(),
            auth_url: login.unwrap_or_default(),
            tailscale_ips: vec![IpAddr::from([100, 100, 100, 100])],
            dns_name: "tailgres.memory.ts.net".into(),
            magic_dns_suffix: "memory.ts.net".into(),
            cert_domains: vec![],
            stable_id: "nMEMORY".into(),
            home_derp: String::new(),
            health: vec![],
            last_error: String::new(),
        })
    }

    fn listen(&self, port: u16) -> Result<MemoryListener, TailnetError> {
        let (tx, rx) = mpsc::channel(64);
        let mut s = self.state();
        if s.listeners.get(&port).is_some_and(|l| !l.is_closed()) {
            return Err(TailnetError::Listen { addr: format!(":{port}"), reason: "in use".into() });
        }
        s.listeners.insert(port, tx);
        Ok(MemoryListener { port, conns: tokio::sync::Mutex::new(rx) })
    }

    /// A real loopback listener: tests connect to it as tsnet's forwarder
    /// would (or as a local process forging a header would).
    fn listen_service(&self, name: &str, _port: u16) -> Result<std::net::TcpListener, TailnetError> {
        let service = |reason: String| TailnetError::Service { name: name.into(), reason };
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| service(e.to_string()))?;
        if self.state().services.insert(name.into(), true).is_some() {
            return Err(service("already served".into()));
        }
        Ok(l)
    }

    async fn withdraw_service(&self, name: &str) -> Result<(), TailnetError> {
        match self.state().services.get_mut(name) {
            Some(advertised) => {
                *advertised = false;
                Ok(())
            }
            None => Err(TailnetError::Service { name: name.into(), reason: "not served".into() }),
        }
    }

    async fn dial(&self, addr: SocketAddr) -> Result<DuplexStream, TailnetError> {
        let link = self.state().links.get(&addr).cloned();
        let Some((other, from)) = link else {
            return Err(TailnetError::Dial { addr, reason: "no route to that peer".into() });
        };
        other.dial(from, addr.port()).await.map_err(|e| TailnetError::Dial { addr, reason: e.to_string() })
    }

    async fn whois(&self, addr: SocketAddr) -> Result<PeerIdentity, TailnetError> {
        let s = self.state();
        if let Some(why) = &s.whois_failure {
            return Err(TailnetError::WhoIs { addr, reason: why.clone() });
        }
        s.peers.get(&addr.ip()).cloned().ok_or(TailnetError::UnknownPeer { addr })
    }

    async fn cert_pair(&self, domain: &str) -> Result<CertPair, TailnetError> {
        Err(TailnetError::Cert {
            domain: domain.into(),
            reason: "the memory tailnet issues no certificates".into(),
        })
    }

    fn watch(&self) -> Result<MemoryWatch, TailnetError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().watchers.push(tx);
        Ok(MemoryWatch(rx))
    }

    async fn shutdown(&self) {
        let mut s = self.state();
        s.listeners.clear();
        s.watchers.clear();
    }
}

/// The in-memory tailnet's connections are tokio's: tokio tasks move their
/// bytes, keeping to the relay's protocol as the embedded node does.
impl crate::relay::HandOff for DuplexStream {
    fn hand_off(
        self,
        upstream: std::net::TcpStream,
        relay: std::sync::Arc<crate::relay::Relay>,
    ) -> std::io::Result<()> {
        let upstream = tokio::net::TcpStream::from_std(upstream)?;
        tokio::spawn(crate::relay::drive(self, upstream, relay));
        Ok(())
    }
}
