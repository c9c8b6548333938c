//! The few raw system calls tailgres needs that neither std nor tokio offer:
//! receiving one message from a SOCK_SEQPACKET socket, and
//! adding `SA_ONSTACK` to signal handlers so they can run on Go threads.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

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

/// Registers an owned descriptor with tokio's reactor (readable interest:
/// both uses here only read), after making it non-blocking.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    set_nonblocking(fd.as_fd())?;
    // SAFETY: an OwnedFd is open for its whole lifetime and as_raw_fd always
    // returns the same descriptor; the AsyncFd takes ownership of it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
