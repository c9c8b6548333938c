//! The few raw system calls tailgres needs that neither std nor tokio offer:
//! receiving one message from a SOCK_SEQPACKET socket,
//! adding `SA_ONSTACK` to signal handlers so they can run on Go threads, and
//! telling whether a loopback connection comes from this very process.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

/// The largest message a listener announces: an 8-byte connection id and
/// "[v6 address]:port".
pub const MAX_ANNOUNCEMENT: usize = 8 + 128;

/// Receives one message from a SOCK_SEQPACKET socket (non-blocking: a
/// `WouldBlock` error means nothing is queued); `None` once the peer closed
/// its end. A truncated message is an error.
pub fn recv_seqpacket(sock: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; MAX_ANNOUNCEMENT];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at buffers that live for the whole call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None); // orderly shutdown of the peer
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "listener announcement truncated"));
    }
    Ok(Some(buf[..n as usize].to_vec()))
}

/// Sets `O_NONBLOCK` on a descriptor (tokio requires it).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we borrow; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a socket is writable (or has failed) right now, without waiting.
pub fn writable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// Adds `SA_ONSTACK` to the currently installed handler of `signal`.
///
/// The Go runtime in this process requires every signal handler that may run
/// on a Go thread to use the alternate signal stack; tokio's handlers do not
/// ask for it, and a signal landing on a Go thread would then crash the
/// process ("signal arrived during external code execution" or worse).
pub fn add_sa_onstack(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: read-modify-write of this signal's disposition; sigaction is
    // plain data and the handler pointer is left unchanged.
    unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut action) != 0 {
            return Err(io::Error::last_os_error());
        }
        if action.sa_sigaction == libc::SIG_DFL || action.sa_sigaction == libc::SIG_IGN {
            return Ok(()); // no handler installed: nothing to run on a Go thread
        }
        if action.sa_flags & libc::SA_ONSTACK != 0 {
            return Ok(());
        }
        action.sa_flags |= libc::SA_ONSTACK;
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reports whether the handler of `signal` has `SA_ONSTACK` (for tests).
pub fn has_sa_onstack(signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: read-only query of the disposition into a zeroed struct.
    unsafe {
        let mut action: libc::sigaction = mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut action) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(action.sa_flags & libc::SA_ONSTACK != 0)
    }
}

/// One end of an IP socket: its address (an IPv4-mapped IPv6 address
/// unmapped, as a dual-stack AF_INET6 socket reports an IPv4 peer) and port.
type Endpoint = (IpAddr, u16);

/// The local (`peer == false`) or remote end of the socket `fd`. An error
/// when `fd` is not open, not a socket, not IPv4/IPv6, or not connected.
fn endpoint(fd: libc::c_int, peer: bool) -> io::Result<Endpoint> {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let sa = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the kernel writes at most `len` bytes into `ss`, which lives
    // for the call. `fd` is only queried: whatever it is (or is not) now,
    // nothing about it changes.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, sa, &mut len)
        } else {
            libc::getsockname(fd, sa, &mut len)
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = len as usize;
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for any.
            let sin = unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok((IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)).to_canonical();
            Ok((ip, u16::from_be(sin6.sin6_port)))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a connected IPv4 or IPv6 socket")),
    }
}

/// Whether the other end of the connected TCP socket `stream` is a socket
/// open in this process: some descriptor of ours whose local address is
/// `stream`'s peer address and whose peer address is `stream`'s local
/// address (TCP allows one connection per address pair, so that socket is
/// the other end). For fleet mode's loopback listener, which any local
/// process can reach, while Tailscale's Service forwarder dials it from
/// inside tailgres.
///
/// Asks descriptors for their addresses (getsockname, then getpeername on a
/// match): first the [`NEAR_FDS`] numbers on either side of `stream`'s (the
/// forwarder opened its socket just before the connection was accepted, and
/// the kernel hands out the lowest free number each time, so it is usually
/// a neighbour), then every other descriptor listed in `/proc/self/fd`.
/// A neighbour is found in microseconds; a stranger costs a walk of every
/// descriptor, about 1 µs each (1 ms with 1000 open, 12 ms with 10000:
/// the ignored test `sys::tests::peer_is_own_socket_cost`). Exact either
/// way: the order only changes the cost. A descriptor closed or reused
/// during the walk is simply not a match, so an end already closed gives
/// `false`. A socket a child inherited from us still counts as ours.
/// An error when `stream` is not a connected IPv4/IPv6 socket or
/// `/proc/self/fd` cannot be read: refuse the connection then.
pub fn peer_is_own_socket(stream: BorrowedFd<'_>) -> io::Result<bool> {
    let fd = stream.as_raw_fd();
    let local = endpoint(fd, false)?;
    let peer = endpoint(fd, true)?;
    if local == peer {
        return Ok(false); // a socket connected to itself: nobody dialed it
    }
    let other_end = |other: libc::c_int| {
        other >= 0
            && other != fd
            && matches!(endpoint(other, false), Ok(e) if e == peer)
            && matches!(endpoint(other, true), Ok(e) if e == local)
    };
    for d in 1..=NEAR_FDS {
        if other_end(fd.saturating_sub(d)) || other_end(fd.saturating_add(d)) {
            return Ok(true);
        }
    }
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(other) = entry?.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else {
            continue;
        };
        if other.abs_diff(fd) > NEAR_FDS.unsigned_abs() && other_end(other) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How many descriptor numbers on each side of the accepted socket's
/// [`peer_is_own_socket`] tries before walking them all.
pub const NEAR_FDS: libc::c_int = 64;

#[cfg(test)]
mod tests;
