use super::*;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Accepts one connection, or panics after a few seconds.
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((s, _)) => return s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A connected pair in this process: (connecting end, accepted end).
fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (client, accept(listener))
}

/// A child process (bash) that connects to `addr` and holds the
/// connection for a while; killed when dropped.
struct Outsider(Child);

impl Outsider {
    fn connect(addr: SocketAddr) -> Outsider {
        let script = format!("exec 3<>/dev/tcp/{}/{} && sleep 30", addr.ip(), addr.port());
        let child = Command::new("bash").args(["-c", &script]).stdin(Stdio::null()).spawn().expect("bash");
        Outsider(child)
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listener(addr: &str) -> Option<TcpListener> {
    match TcpListener::bind(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("skipped: cannot listen on {addr}: {e}");
            None
        }
    }
}

#[test]
fn own_connection_is_own() {
    let l = listener("127.0.0.1:0").unwrap();
    let (client, accepted) = pair(&l);
    assert!(peer_is_own_socket(accepted.as_fd()).unwrap());
    // Either end: the connecting socket's peer is the accepted one.
    assert!(peer_is_own_socket(client.as_fd()).unwrap());
}

#[test]
fn own_connection_over_ipv6_and_dual_stack() {
    if let Some(l) = listener("[::1]:0") {
        let (_client, accepted) = pair(&l);
        assert!(peer_is_own_socket(accepted.as_fd()).unwrap());
    }
    // An AF_INET6 listener on :: takes IPv4 connections with
    // ::ffff:127.0.0.1 as their peer; the AF_INET client says 127.0.0.1.
    if let Some(l) = listener("[::]:0") {
        let port = l.local_addr().unwrap().port();
        let Ok(client) = TcpStream::connect(("127.0.0.1", port)) else {
            eprintln!("skipped: [::] is not dual-stack here");
            return;
        };
        let accepted = accept(&l);
        assert!(matches!(accepted.peer_addr().unwrap(), SocketAddr::V6(_)));
        assert!(peer_is_own_socket(accepted.as_fd()).unwrap());
        drop(client);
    }
}

#[test]
fn connection_from_another_process_is_not_own() {
    let l = listener("127.0.0.1:0").unwrap();
    let _outsider = Outsider::connect(l.local_addr().unwrap());
    let accepted = accept(&l);
    assert!(!peer_is_own_socket(accepted.as_fd()).unwrap());
    // With other connections of ours open beside it.
    let (_client, own) = pair(&l);
    assert!(peer_is_own_socket(own.as_fd()).unwrap());
    assert!(!peer_is_own_socket(accepted.as_fd()).unwrap());
}

/// The other end far from the accepted socket in descriptor numbers is
/// found by the walk of `/proc/self/fd`, not only among the neighbours.
#[test]
fn own_connection_with_distant_descriptors() {
    let l = listener("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let filler: Vec<std::fs::File> =
        (0..3 * NEAR_FDS).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
    let accepted = accept(&l);
    assert!(accepted.as_raw_fd().abs_diff(client.as_raw_fd()) > NEAR_FDS as u32);
    assert!(peer_is_own_socket(accepted.as_fd()).unwrap());
    assert!(peer_is_own_socket(client.as_fd()).unwrap());
    drop(filler);
}

#[test]
fn closed_other_end_is_not_own() {
    let l = listener("127.0.0.1:0").unwrap();
    let (client, accepted) = pair(&l);
    drop(client);
    assert!(!peer_is_own_socket(accepted.as_fd()).unwrap());
    // A new connection of ours beside it changes nothing for the old one.
    let (_client, again) = pair(&l);
    assert!(peer_is_own_socket(again.as_fd()).unwrap());
    assert!(!peer_is_own_socket(accepted.as_fd()).unwrap());
}

#[test]
fn not_a_connected_ip_socket_is_an_error() {
    let l = listener("127.0.0.1:0").unwrap();
    assert!(peer_is_own_socket(l.as_fd()).is_err()); // not connected
    let f = std::fs::File::open("/dev/null").unwrap();
    assert!(peer_is_own_socket(f.as_fd()).is_err()); // not a socket
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(peer_is_own_socket(a.as_fd()).is_err()); // not IP
}

/// The cost of `peer_is_own_socket` with many descriptors open (each a
/// loopback TCP socket, the worst case: every one is asked for its
/// address). Run with
/// `cargo test --lib sys::tests::peer_is_own_socket_cost -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn peer_is_own_socket_cost() {
    let l = listener("127.0.0.1:0").unwrap();
    let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut held = Vec::new();
    for target in [1000usize, 10000] {
        // Ours with the client's descriptor far below the accepted one (the
        // walk finds it), ours next to each other (found at once), and a
        // stranger's (the walk goes through every descriptor).
        let far_listener = listener("127.0.0.1:0").unwrap();
        let far_client = TcpStream::connect(far_listener.local_addr().unwrap()).unwrap();
        while open() < target {
            held.push(pair(&l));
        }
        let far = accept(&far_listener);
        let (_client, near) = pair(&l);
        let _outsider = Outsider::connect(l.local_addr().unwrap());
        let stranger = accept(&l);
        let fds = open();
        for (what, stream, want) in [
            ("own, adjacent fd", &near, true),
            ("own, distant fd", &far, true),
            ("another process's", &stranger, false),
        ] {
            let rounds = 200;
            let start = Instant::now();
            for _ in 0..rounds {
                assert_eq!(peer_is_own_socket(stream.as_fd()).unwrap(), want);
            }
            let each = start.elapsed() / rounds;
            eprintln!("peer_is_own_socket with {fds} open descriptors, {what} peer: {each:?} per call");
        }
        drop(far_client);
    }
}
