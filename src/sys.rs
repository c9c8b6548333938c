//! The few raw system calls tailgres needs that neither std nor tokio offer:
//! receiving a file descriptor together with its message (SCM_RIGHTS), and
//! adding `SA_ONSTACK` to signal handlers so they can run on Go threads.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The largest payload a hand-over message carries: "[v6 address]:port".
pub const MAX_ADDR_MESSAGE: usize = 128;

/// One message from a SOCK_SEQPACKET socket: its payload and the descriptors
/// that travelled with it (owned: they close on drop).
#[derive(Debug)]
pub struct FdMessage {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receives one message with any SCM_RIGHTS descriptors (non-blocking: a
/// `WouldBlock` error means nothing is queued). Descriptors arrive
/// close-on-exec. A truncated payload or control message is an error, and
/// any descriptors that did arrive are closed.
pub fn recv_with_fds(sock: BorrowedFd<'_>) -> io::Result<Option<FdMessage>> {
    let mut buf = [0u8; MAX_ADDR_MESSAGE];
    // Room for 4 descriptors; the protocol sends exactly one.
    // SAFETY: CMSG_SPACE only computes a size.
    let cmsg_space = unsafe { libc::CMSG_SPACE((4 * mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cmsg_buf = vec![0u64; cmsg_space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space as _;

    // SAFETY: msg points at buffers that live for the whole call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel just wrote, within
    // msg_controllen; each SCM_RIGHTS payload is an array of ints.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None); // orderly shutdown of the peer
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-over message truncated (payload or descriptors lost)",
        ));
    }
    Ok(Some(FdMessage { payload: buf[..n as usize].to_vec(), fds }))
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
