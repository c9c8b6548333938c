//! End-to-end tests of the embedded tailnet node over a real (loopback)
//! tailnet: Tailscale's test control server, DERP and STUN from the lab, an
//! embedded node built with `tailgres::tailnet`, and independent client
//! nodes (`tslab node`) that forward loopback ports through the tailnet.
//!
//! Run with scripts/test (a fresh network namespace with only `lo`).

mod common;

use common::{forward_addr, Lab};
use serde_json::json;
use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tailgres::tailnet::{EmbeddedNode, Listener, PeerIdentity, Tailnet, TailnetConn, TailnetError, Watch};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const PG_PORT: u16 = 5432;
/// Generous bound for one step over the tailnet (first packets go via DERP).
const STEP: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    common::within_for(STEP, what, f).await
}

/// Reads the `TSLAB-SRC ip:port` line the forwarding node puts first on each
/// tailnet connection: the address the client node itself dialed from.
async fn read_src_line(r: &mut BufReader<TailnetConn>) -> SocketAddr {
    let mut line = String::new();
    within("src line", r.read_line(&mut line)).await.unwrap();
    let addr = line.trim().strip_prefix("TSLAB-SRC ").unwrap_or_else(|| panic!("got {line:?}"));
    addr.parse().unwrap()
}

async fn read_line(r: &mut BufReader<TailnetConn>) -> String {
    let mut line = String::new();
    within("line", r.read_line(&mut line)).await.unwrap();
    line.trim_end().to_string()
}

/// Two users and a tagged device reach the embedded node by MagicDNS name;
/// each accepted connection is identified correctly, bytes flow both ways,
/// and a close on either side reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whois_bytes_and_close_for_users_and_tags() {
    let lab = Lab::start(None).await;
    let proxy = lab.embedded("proxy").await;
    let listener = proxy.listen(PG_PORT).unwrap();
    let status = proxy.status().await.unwrap();
    assert_eq!(status.dns_name, format!("proxy.{}", lab.suffix));

    let target = format!("--forward=127.0.0.1:0=proxy.{}:{PG_PORT}", lab.suffix);
    let alice = lab.node("alice", &[&target, "--announce-src"]).await;
    let bob = lab.node("bob", &[&target, "--announce-src"]).await;
    let ci = lab.node("ci", &[&target, "--announce-src", "--advertise-tags=tag:ci"]).await;

    let mut logins = HashMap::new();
    for (name, node) in [("alice", &alice), ("bob", &bob), ("ci", &ci)] {
        // Client -> proxy, with the client closing its write side first.
        let mut client = TcpStream::connect(forward_addr(node, 0)).await.unwrap();
        client.write_all(format!("hello from {name}\n").as_bytes()).await.unwrap();

        let (stream, addr) = within("accept", listener.accept()).await.unwrap();
        let mut server = BufReader::new(stream);
        assert_eq!(read_src_line(&mut server).await, addr, "hand-over address is the dialer's");
        let id: PeerIdentity = proxy.whois(addr).await.unwrap();
        assert_eq!(id.node_name, format!("{name}.{}", lab.suffix));
        assert!(id.addresses.contains(&addr.ip()), "{addr} not in {:?}", id.addresses);
        assert!(!id.stable_id.is_empty());
        assert_eq!(id.os, "linux");
        assert!(!id.shared_in);
        if name == "ci" {
            assert_eq!(id.tags, vec!["tag:ci".to_string()]);
            assert!(id.is_tagged());
            assert_eq!(id.principal(), "tag:ci");
        } else {
            assert!(id.tags.is_empty(), "{name} has tags {:?}", id.tags);
            assert!(id.user_login.contains('@'), "login {:?}", id.user_login);
            logins.insert(name, id.user_login.clone());
        }
        assert_eq!(read_line(&mut server).await, format!("hello from {name}"));

        // Client half-closes: the proxy side sees EOF but can still answer.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        within("eof at proxy", server.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        let mut stream = server.into_inner();
        stream.write_all(b"goodbye\n").await.unwrap();
        stream.shutdown().await.unwrap(); // proxy closes: client sees EOF
        let mut got = String::new();
        within("eof at client", client.read_to_string(&mut got)).await.unwrap();
        assert_eq!(got, "goodbye\n");
    }
    assert_ne!(logins["alice"], logins["bob"], "two nodes, two users");

    // Close in the other direction: the proxy closes first, then the client.
    let mut client = TcpStream::connect(forward_addr(&alice, 0)).await.unwrap();
    client.write_all(b"x\n").await.unwrap();
    let (stream, _) = within("accept", listener.accept()).await.unwrap();
    drop(stream);
    let mut got = Vec::new();
    within("client sees proxy close", client.read_to_end(&mut got)).await.unwrap();

    // The tailnet listing agrees with what whois said.
    let nodes = lab.admin("GET", "/nodes", None).await;
    let names: Vec<&str> =
        nodes.as_array().unwrap().iter().map(|n| n["hostname"].as_str().unwrap()).collect();
    for n in ["proxy", "alice", "bob", "ci"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    proxy.shutdown().await;
}

/// Bytes as a function of their offset, so a lost, repeated or reordered
/// chunk shows up at its position.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
}

/// Accepted connections are read and written straight from the node's
/// TCP/IP stack: 8 MiB echoed through it both ways at once (so writes meet
/// a full send buffer and reads an empty one, again and again) arrive
/// intact, a half-close travels both ways (also when it arrives together
/// with the last data), and shutting the node down ends a read that is
/// waiting for data instead of leaving it hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_echo_half_close_and_shutdown_wake_pending_reads() {
    const LEN: usize = 8 << 20;
    let lab = Lab::start(None).await;
    let proxy = lab.embedded("proxy").await;
    let listener = proxy.listen(PG_PORT).unwrap();
    let alice = lab.node("alice", &[&format!("--forward=127.0.0.1:0=proxy:{PG_PORT}")]).await;

    let client = TcpStream::connect(forward_addr(&alice, 0)).await.unwrap();
    let (stream, _) = within("accept", listener.accept()).await.unwrap();
    let echo = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(stream);
        let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap(); // the client's half-close, passed back
        n
    });
    let (mut cr, mut cw) = client.into_split();
    let sent = pattern(LEN);
    let writer = tokio::spawn(async move {
        cw.write_all(&sent).await.unwrap();
        cw.shutdown().await.unwrap();
        cw
    });
    let mut got = Vec::with_capacity(LEN);
    within("echo of 8 MiB", cr.read_to_end(&mut got)).await.unwrap();
    let _cw = writer.await.unwrap();
    assert_eq!(within("echo task", echo).await.unwrap(), LEN as u64);
    assert_eq!(got.len(), LEN);
    assert!(got == pattern(LEN), "echoed bytes differ from those sent");

    // Gathered writes (how TLS hands over a flight): up to 64 buffers of 1
    // byte to 24 KiB per call, against a full send buffer, so calls take
    // only part of what they are given and stop inside a buffer.
    let mut gathered = TcpStream::connect(forward_addr(&alice, 0)).await.unwrap();
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    assert!(stream.is_write_vectored());
    let sender = tokio::spawn(async move {
        let data = pattern(LEN);
        let (mut off, mut calls, mut short) = (0, 0, 0);
        while off < data.len() {
            let mut bufs = Vec::new();
            let mut at = off;
            for k in 0..(calls % 64 + 1) {
                let end = (at + (off + k * 4099) % (24 << 10) + 1).min(data.len());
                bufs.push(IoSlice::new(&data[at..end]));
                at = end;
            }
            let n = stream.write_vectored(&bufs).await.unwrap();
            assert!(n > 0 && off + n <= at, "write_vectored took {n} of {} bytes", at - off);
            short += usize::from(off + n < at);
            (off, calls) = (off + n, calls + 1);
        }
        stream.shutdown().await.unwrap();
        short
    });
    let mut got = Vec::with_capacity(LEN);
    within("8 MiB of gathered writes", gathered.read_to_end(&mut got)).await.unwrap();
    let short = within("gathering writer", sender).await.unwrap();
    assert!(got == pattern(LEN), "gathered bytes differ from those written ({} of {LEN})", got.len());
    assert!(short > 0, "no gathered write met a full send buffer: the partial case went untested");

    // Data and the peer's FIN queued together before the first read: the
    // read that takes the data must not leave the end of stream unseen
    // (its wake-up came before the read, so none follows it).
    let mut short = TcpStream::connect(forward_addr(&alice, 0)).await.unwrap();
    short.write_all(b"last words").await.unwrap();
    short.shutdown().await.unwrap();
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    // Not a timing assumption: the read below must end either way; the
    // pause only makes the queued-together case the likely one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = Vec::new();
    within("data then end of stream", stream.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"last words");

    // A read waiting on a quiet connection when the node shuts down.
    let mut quiet = TcpStream::connect(forward_addr(&alice, 0)).await.unwrap();
    quiet.write_all(b"x").await.unwrap();
    let (mut stream, _) = within("accept", listener.accept()).await.unwrap();
    let mut one = [0u8; 1];
    within("first byte", stream.read_exact(&mut one)).await.unwrap();
    let pending = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        stream.read(&mut buf).await
    });
    // Not a timing assumption: the checks below hold whether or not the
    // read has parked by then; the pause only makes the parked case (the
    // node's last wake-up) the likely one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "read returned with nothing sent");
    proxy.shutdown().await;
    let r = within("pending read after node shutdown", pending).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "read after shutdown gave {r:?}");
}

/// 200 connections accepted concurrently from three nodes: each gets its
/// own peer address and identity (upstream libtailscale can mix them up).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_accepts_each_get_their_own_identity() {
    const CONNS: usize = 200;
    let lab = Lab::start(None).await;
    let proxy = Arc::new(lab.embedded("proxy").await);
    let listener = proxy.listen(PG_PORT).unwrap();
    let target = format!("--forward=127.0.0.1:0=proxy:{PG_PORT}");
    let names = ["alice", "bob", "carol"];
    let mut nodes = Vec::new();
    for n in names {
        nodes.push(lab.node(n, &[&target, "--announce-src"]).await);
    }
    let forwards: Vec<String> = nodes.iter().map(|n| forward_addr(n, 0)).collect();

    // Server: accept everything first, concurrently identify each.
    let server = {
        let proxy = proxy.clone();
        let suffix = lab.suffix.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..CONNS {
                let (stream, addr) = within("accept", listener.accept()).await.unwrap();
                let proxy = proxy.clone();
                let suffix = suffix.clone();
                tasks.push(tokio::spawn(async move {
                    let id = proxy.whois(addr).await.unwrap();
                    let mut r = BufReader::new(stream);
                    let src = read_src_line(&mut r).await;
                    let claim = read_line(&mut r).await; // "<node> <i>"
                    let (node, i) = claim.split_once(' ').unwrap();
                    assert_eq!(src, addr, "connection {i}: address handed over with another fd");
                    assert_eq!(id.node_name, format!("{node}.{suffix}"), "connection {i}");
                    let mut s = r.into_inner();
                    s.write_all(format!("{i} {}\n", id.user_login).as_bytes()).await.unwrap();
                    s.shutdown().await.unwrap();
                    (node.to_string(), id.user_login)
                }));
            }
            let mut users: HashMap<String, String> = HashMap::new();
            for t in tasks {
                let (node, login) = t.await.unwrap();
                let prev = users.insert(node.clone(), login.clone());
                assert!(prev.is_none() || prev == Some(login), "{node} changed user");
            }
            users
        })
    };

    let mut clients = Vec::new();
    for i in 0..CONNS {
        let node = names[i % names.len()];
        let fwd = forwards[i % names.len()].clone();
        clients.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(fwd).await.unwrap();
            c.write_all(format!("{node} {i}\n").as_bytes()).await.unwrap();
            let mut got = String::new();
            within("reply", c.read_to_string(&mut got)).await.unwrap();
            assert!(got.starts_with(&format!("{i} ")), "conn {i} got {got:?}");
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let users = server.await.unwrap();
    assert_eq!(users.len(), 3);
    let distinct: std::collections::HashSet<_> = users.values().collect();
    assert_eq!(distinct.len(), 3, "three nodes, three users: {users:?}");
    proxy.shutdown().await;
}

/// One connection attempt through a forwarding node: `Some(peer)` if it
/// reached the listener, `None` if the forwarder's tailnet dial failed (the
/// local connection closes without reaching the listener).
async fn attempt(
    proxy: &EmbeddedNode,
    listener: &tailgres::tailnet::TailnetListener,
    forward: &str,
) -> Option<PeerIdentity> {
    let mut c = TcpStream::connect(forward).await.unwrap();
    let _ = c.write_all(b"knock\n").await;
    tokio::select! {
        r = listener.accept() => {
            let (_stream, addr) = r.unwrap();
            Some(proxy.whois(addr).await.unwrap())
        }
        _ = async {
            let mut b = Vec::new();
            let _ = within("forwarder closes", c.read_to_end(&mut b)).await;
        } => None,
    }
}

/// A peer that the proxy's packet filter denies never reaches the listener,
/// while an allowed peer does; lifting the denial lets it in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packet_filter_denied_peer_never_reaches_listener() {
    let lab = Lab::start(None).await;
    let proxy = lab.embedded("proxy").await;
    let listener = proxy.listen(PG_PORT).unwrap();
    let target = format!("--forward=127.0.0.1:0=proxy:{PG_PORT}");
    let alice = lab.node("alice", &[&target, "--dial-timeout=5s"]).await;
    let mallory = lab.node("mallory", &[&target, "--dial-timeout=5s"]).await;
    let (to_alice, to_mallory) = (forward_addr(&alice, 0), forward_addr(&mallory, 0));

    // Before any policy, everyone is let through (testcontrol's default).
    let id = attempt(&proxy, &listener, &to_mallory).await.expect("open tailnet lets mallory in");
    assert!(id.node_name.starts_with("mallory."));

    // Only alice may reach the proxy on 5432.
    let grants = json!({"grants": [{"src": ["alice"], "dst": ["proxy"], "ip": [format!("tcp:{PG_PORT}")]}]});
    lab.admin("PUT", "/policy", Some(grants)).await;
    // The new filter reaches the proxy node asynchronously: wait for the
    // first refused attempt (an accepted one before that is the old filter).
    let mut tries = 0;
    while attempt(&proxy, &listener, &to_mallory).await.is_some() {
        tries += 1;
        assert!(tries < 30, "the deny policy never took effect");
    }
    // From now on mallory never reaches the listener, and alice does.
    for _ in 0..2 {
        assert!(attempt(&proxy, &listener, &to_mallory).await.is_none(), "denied peer got through");
        let id = attempt(&proxy, &listener, &to_alice).await.expect("alice is allowed");
        assert!(id.node_name.starts_with("alice."), "accepted {}", id.node_name);
    }

    // Lifting the policy lets mallory in again: the denial was the filter.
    lab.admin("DELETE", "/policy", None).await;
    let mut tries = 0;
    let id = loop {
        if let Some(id) = attempt(&proxy, &listener, &to_mallory).await {
            break id;
        }
        tries += 1;
        assert!(tries < 30, "lifting the policy never took effect");
    };
    assert!(id.node_name.starts_with("mallory."));
    proxy.shutdown().await;
}

/// Launches an embedded node against a `--require-login` lab, waits for the
/// interactive login URL in its status, completes the login as a person
/// would, and waits until it runs.
async fn login_interactively(lab: &Lab, cfg: &tailgres::tailnet::NodeConfig) -> EmbeddedNode {
    let node = EmbeddedNode::launch(cfg).await.expect("launch");
    let url = within("login URL", async {
        loop {
            let st = node.status().await.unwrap();
            if st.backend_state == "NeedsLogin" && !st.auth_url.is_empty() {
                return st.auth_url;
            }
            assert!(!st.is_running(), "ran without a login");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(url.starts_with(&lab.control_url), "login URL {url} is on the control server");
    lab.admin("POST", "/auth/complete", Some(json!({ "url": url }))).await;
    node.wait_running(cfg).await.expect("running after login");
    node
}

/// The node keeps its tailnet identity across a restart with the same state
/// directory, without a new login or auth key; a fresh state directory is a
/// new node that must log in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_identity_without_new_login() {
    let lab = Lab::start_with(&["--require-login"]).await;
    let dir = lab.dir.path().join("proxy-state");
    let cfg = lab.node_config("proxy", &dir);
    let first = login_interactively(&lab, &cfg).await;
    let before = first.status().await.unwrap();
    first.shutdown().await;
    drop(first);

    let second = EmbeddedNode::start(cfg).await.expect("restart without a new login");
    let after = second.status().await.unwrap();
    assert_eq!(before.stable_id, after.stable_id);
    assert_eq!(before.tailscale_ips, after.tailscale_ips);
    assert_eq!(before.dns_name, after.dns_name);
    second.shutdown().await;

    // Control: a different state directory is a different node, and the
    // control server asks it to log in.
    let mut other = lab.node_config("proxy", &lab.dir.path().join("other-state"));
    other.start_timeout = Some(Duration::from_secs(3));
    match EmbeddedNode::start(other).await {
        Err(TailnetError::StartTimeout { state, .. }) => assert_eq!(state, "NeedsLogin"),
        Err(e) => panic!("expected to wait for login, got {e}"),
        Ok(_) => panic!("a new state directory ran without logging in"),
    }
}

/// A rejected auth key is reported as a login failure that says what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_auth_key_is_a_clear_error() {
    let lab = Lab::start(Some("tskey-the-right-one")).await;
    let mut cfg = lab.node_config("proxy", &lab.dir.path().join("bad-key"));
    cfg.auth_key = Some(zeroize::Zeroizing::new("tskey-wrong".into()));
    match EmbeddedNode::start(cfg).await {
        Err(e @ TailnetError::Login { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("auth key"), "{msg}");
            assert!(!msg.contains("tskey-wrong"), "the key must not be echoed: {msg}");
        }
        Err(e) => panic!("expected a login error, got: {e}"),
        Ok(_) => panic!("a wrong auth key was accepted"),
    }
}

/// A node configuration for tests without a lab (5 s to start).
fn standalone_config(state_dir: std::path::PathBuf, control_url: &str) -> tailgres::tailnet::NodeConfig {
    tailgres::tailnet::NodeConfig {
        state_dir,
        hostname: "proxy".into(),
        auth_key: None,
        control_url: Some(control_url.into()),
        ephemeral: false,
        advertise_tags: vec![],
        tsnet_log: None,
        env: vec![],
        start_timeout: Some(Duration::from_secs(5)),
    }
}

/// An unreachable control server ends in a timeout that names the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_control_server_times_out_clearly() {
    common::require_sandbox();
    let dir = tempfile::tempdir().unwrap();
    // A loopback port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cfg = standalone_config(dir.path().join("state"), &format!("http://127.0.0.1:{port}"));
    cfg.auth_key = Some(zeroize::Zeroizing::new("tskey-x".into()));
    match EmbeddedNode::start(cfg).await {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        }
        Ok(_) => panic!("started without a control server"),
    }
}

/// A state directory that cannot be created is refused before any network
/// activity, with the path in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_state_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let cfg = standalone_config(file.join("state"), "http://127.0.0.1:9");
    match EmbeddedNode::start(cfg).await {
        Err(e @ TailnetError::Config(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("not-a-dir/state"), "{msg}");
            assert!(msg.contains("state directory"), "{msg}");
        }
        Err(e) => panic!("expected a configuration error, got: {e}"),
        Ok(_) => panic!("started with an unusable state directory"),
    }
}

/// The netmap watch reports the initial peers, a peer joining, a tag
/// change and a peer leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn netmap_watch_reports_changes() {
    let lab = Lab::start(None).await;
    let proxy = lab.embedded("proxy").await;
    let _alice = lab.node("alice", &[]).await;
    let mut watch = proxy.watch().unwrap();
    async fn next_until(
        watch: &mut tailgres::tailnet::NetmapWatch,
        what: &str,
        pred: impl Fn(&tailgres::tailnet::NetmapEvent) -> bool,
    ) -> tailgres::tailnet::NetmapEvent {
        within(what, async {
            loop {
                let ev = watch.next().await.expect("watch ended").expect("event");
                if pred(&ev) {
                    return ev;
                }
            }
        })
        .await
    }
    let first = next_until(&mut watch, "initial netmap with alice", |e| {
        e.kind == "netmap" || e.peers.iter().any(|p| p.node_name.starts_with("alice."))
    })
    .await;
    assert!(first.seq >= 1);

    let _bob = lab.node("bob", &[]).await;
    let joined = next_until(&mut watch, "bob joins", |e| {
        e.kind == "peers_changed" && e.peers.iter().any(|p| p.node_name.starts_with("bob."))
    })
    .await;
    let bob_ip = joined.peers.iter().find(|p| p.node_name.starts_with("bob.")).unwrap().addresses[0];
    let bob_addr = SocketAddr::new(bob_ip, 40000);
    assert!(proxy.whois(bob_addr).await.is_ok());

    lab.admin("POST", "/nodes/bob/tags", Some(json!({"tags": ["tag:db"]}))).await;
    next_until(&mut watch, "bob's new tag", |e| {
        e.peers.iter().any(|p| p.node_name.starts_with("bob.") && p.tags == vec!["tag:db".to_string()])
    })
    .await;
    assert_eq!(proxy.whois(bob_addr).await.unwrap().tags, vec!["tag:db".to_string()]);

    // Removal: announced as a change (with a full peer list the client
    // reports the remaining peers rather than PeersRemoved); what matters is
    // that an event arrives and whois no longer knows bob.
    lab.admin("DELETE", "/nodes/bob", None).await;
    within("bob is gone", async {
        loop {
            watch.next().await.expect("watch ended").expect("event");
            if proxy.whois(bob_addr).await.is_err() {
                return;
            }
        }
    })
    .await;
    proxy.shutdown().await;
    // The watch ends with the node.
    within("watch ends", async { while watch.next().await.is_some() {} }).await;
}
