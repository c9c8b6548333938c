//! The only place that calls the Go shim's C API (`vendor/tsffi/tsffi.h`).
//!
//! Every call goes through [`check`], which turns the C convention (return
//! -1 and write a reason into a buffer) into `Result<_, String>`. Strings the
//! shim allocates are copied out and freed here; descriptors become
//! [`OwnedFd`]s. A [`Handle`] closes its node when dropped.
#![allow(unsafe_code)]
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]

use crate::relay::{self, Relay};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use zeroize::Zeroizing;

mod bindings {
    #![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code)]
    include!(concat!(env!("OUT_DIR"), "/tsffi_bindings.rs"));
}

/// Room for the shim's error messages (they are truncated to fit).
const ERR_LEN: usize = 1024;

/// Calls `f` with an error buffer and turns a -1 return into the message.
fn check(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<c_int, String> {
    let mut err = [0 as c_char; ERR_LEN];
    let ret = f(err.as_mut_ptr(), err.len());
    if ret < 0 {
        // SAFETY: the shim always NUL-terminates within ERR_LEN, and the
        // buffer was zeroed, so a NUL exists either way.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(if msg.is_empty() { "unknown error in the tailnet shim".into() } else { msg });
    }
    Ok(ret)
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("argument contains a NUL byte: {s:?}"))
}

/// Bytes of one listener announcement (tsffi.h's TSFFI_ANNOUNCE_LEN).
pub const ANNOUNCE_LEN: usize = bindings::TSFFI_ANNOUNCE_LEN as usize;

/// An IP address as the shim takes and announces it: 16 bytes, IPv4 mapped
/// into IPv6 (::ffff:a.b.c.d).
pub fn ip16(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

/// The peer address in an announcement, after its 8-byte id: 16 bytes of
/// IP (see [`ip16`]) and the port, big-endian.
pub fn announced_addr(bytes: &[u8; 18]) -> std::net::SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&bytes[..16]);
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    std::net::SocketAddr::new(std::net::Ipv6Addr::from(ip).to_canonical(), port)
}

/// Copies and frees a string the shim allocated.
///
/// SAFETY (caller): `p` is null or a malloc'd NUL-terminated string from the
/// shim that nobody else frees.
unsafe fn take_string(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    bindings::tsffi_free(p);
    s
}

/// Like [`take_string`] for key material: zeroed on both sides.
unsafe fn take_secret(p: *mut c_char) -> Zeroizing<String> {
    if p.is_null() {
        return Zeroizing::new(String::new());
    }
    let s = Zeroizing::new(CStr::from_ptr(p).to_string_lossy().into_owned());
    bindings::tsffi_free_secret(p);
    s
}

/// An embedded node; dropping it closes the node (safe in every state).
#[derive(Debug)]
pub struct Handle(c_int);

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

impl Handle {
    /// Creates a node from its JSON configuration (see tsffi.h).
    pub fn new(config_json: &Zeroizing<String>) -> Result<Handle, String> {
        let c = Zeroizing::new(cstring(config_json)?.into_bytes_with_nul());
        // SAFETY: c is NUL-terminated and outlives the call.
        let h = check(|e, n| unsafe { bindings::tsffi_new(c.as_ptr() as *mut c_char, e, n) })?;
        Ok(Handle(h))
    }

    /// Shuts the node down. Handles are never reused and closing is
    /// idempotent in the shim, so calling this more than once is fine.
    pub fn close(&self) {
        // SAFETY: tsffi_close is valid in every state, on any handle value.
        unsafe { bindings::tsffi_close(self.0) };
    }

    pub fn start(&self) -> Result<(), String> {
        // SAFETY: plain call on our handle.
        check(|e, n| unsafe { bindings::tsffi_start(self.0, e, n) }).map(drop)
    }

    pub fn status_json(&self) -> Result<String, String> {
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: out is written only on success, with a string we then own.
        check(|e, n| unsafe { bindings::tsffi_status(self.0, &mut out, e, n) })?;
        // SAFETY: see take_string.
        Ok(unsafe { take_string(out) })
    }

    pub fn listen(&self, network: &str, addr: &str) -> Result<OwnedFd, String> {
        let (network, addr) = (cstring(network)?, cstring(addr)?);
        let mut fd: c_int = -1;
        // SAFETY: strings outlive the call; fd is written on success.
        check(|e, n| unsafe {
            bindings::tsffi_listen(
                self.0,
                network.as_ptr() as *mut c_char,
                addr.as_ptr() as *mut c_char,
                &mut fd,
                e,
                n,
            )
        })?;
        // SAFETY: on success the shim hands us a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Makes the node a host of the Tailscale Service `name` on `port`; the
    /// loopback listener its connections arrive on (behind a PROXY v2
    /// header), as a duplicate the caller owns.
    pub fn listen_service(&self, name: &str, port: u16) -> Result<OwnedFd, String> {
        let name = cstring(name)?;
        let mut fd: c_int = -1;
        // SAFETY: name outlives the call; fd is written on success.
        check(|e, n| unsafe {
            bindings::tsffi_listen_service(self.0, name.as_ptr() as *mut c_char, port, &mut fd, e, n)
        })?;
        // SAFETY: on success the shim hands us a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Stops advertising the Service (blocks on a serve-config change).
    pub fn withdraw_service(&self, name: &str) -> Result<(), String> {
        let name = cstring(name)?;
        // SAFETY: name outlives the call.
        check(|e, n| unsafe { bindings::tsffi_withdraw_service(self.0, name.as_ptr() as *mut c_char, e, n) })
            .map(drop)
    }

    /// Dials `addr` over the tailnet (blocks, at most 10 s); the new
    /// connection's id, to attach.
    pub fn dial(&self, addr: std::net::SocketAddr) -> Result<u64, String> {
        let addr = cstring(&addr.to_string())?;
        let mut id: std::os::raw::c_ulonglong = 0;
        // SAFETY: addr outlives the call; id is written on success.
        check(|e, n| unsafe { bindings::tsffi_dial(self.0, addr.as_ptr() as *mut c_char, &mut id, e, n) })?;
        Ok(id)
    }

    /// The peer's identity as JSON; `None` when no tailnet node has the
    /// address. The address crosses as a value (16 bytes and a port).
    pub fn whois_json(&self, addr: std::net::SocketAddr) -> Result<Option<String>, String> {
        let mut ip = ip16(addr.ip());
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: as in status_json; `ip` is 16 bytes the shim only reads.
        let ret = check(|e, n| unsafe {
            bindings::tsffi_whois(self.0, ip.as_mut_ptr(), addr.port(), &mut out, e, n)
        })?;
        if ret == 1 {
            return Ok(None);
        }
        // SAFETY: see take_string.
        Ok(Some(unsafe { take_string(out) }))
    }

    pub fn cert_pair(&self, domain: &str) -> Result<(String, Zeroizing<String>), String> {
        let domain = cstring(domain)?;
        let (mut cert, mut key): (*mut c_char, *mut c_char) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: both outputs are written on success and owned by us.
        check(|e, n| unsafe {
            bindings::tsffi_cert_pair(self.0, domain.as_ptr() as *mut c_char, &mut cert, &mut key, e, n)
        })?;
        // SAFETY: see take_string / take_secret.
        Ok(unsafe { (take_string(cert), take_secret(key)) })
    }

    pub fn watch(&self) -> Result<OwnedFd, String> {
        let mut fd: c_int = -1;
        // SAFETY: fd is written on success.
        check(|e, n| unsafe { bindings::tsffi_watch(self.0, &mut fd, e, n) })?;
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// What a tailnet connection's wake callback does (implemented by
/// `conn::Wakers`). Called on one of Go's threads.
pub trait Wake: Send + Sync + 'static {
    fn wake(&self, readable: bool, writable: bool);
}

/// The callback tsffi calls; `ctx` is the `Arc<W>` [`Conn::attach`] leaked.
extern "C" fn wake_trampoline<W: Wake>(ctx: *mut std::ffi::c_void, events: std::ffi::c_uint) {
    // SAFETY: ctx came from Arc::into_raw in Conn::attach, and that
    // reference is released only after tsffi_conn_close has returned, after
    // which the shim never calls us with it (tsffi.h).
    let w = unsafe { &*(ctx as *const W) };
    w.wake(events & bindings::TSFFI_READABLE != 0, events & bindings::TSFFI_WRITABLE != 0);
}

fn errno(ret: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error(i32::try_from(-ret).unwrap_or(libc::EIO))
}

/// One tailnet connection, read and written straight from the node's
/// TCP/IP stack (see tsffi.h). Dropping it closes the connection.
#[derive(Debug)]
pub struct Conn<W: Wake> {
    id: u64,
    /// The reference the shim holds as the callback's ctx (null until
    /// attached); released on drop, after tsffi_conn_close.
    ctx: *const W,
}

// SAFETY: the id is a plain number and ctx points at a Send + Sync W. Not
// Sync: the shim allows one reader and one writer at a time, which the
// `&mut self` of read and write enforce.
unsafe impl<W: Wake> Send for Conn<W> {}

impl<W: Wake> Drop for Conn<W> {
    fn drop(&mut self) {
        // SAFETY: valid for any id; when it returns the callback is done
        // with ctx for good.
        unsafe { bindings::tsffi_conn_close(self.id) };
        if !self.ctx.is_null() {
            // SAFETY: ctx came from Arc::into_raw in attach and is released
            // exactly once, here.
            drop(unsafe { std::sync::Arc::from_raw(self.ctx) });
        }
    }
}

impl<W: Wake> Conn<W> {
    /// Takes ownership of an announced connection and registers `wake`.
    pub fn attach(id: u64, wake: std::sync::Arc<W>) -> std::io::Result<Conn<W>> {
        let mut conn = Conn { id, ctx: std::ptr::null() };
        let ctx = std::sync::Arc::into_raw(wake);
        // SAFETY: the trampoline matches tsffi_wake_fn and ctx stays valid
        // until Drop (see wake_trampoline).
        let ret = unsafe { bindings::tsffi_conn_attach(id, Some(wake_trampoline::<W>), ctx as *mut _) };
        if ret < 0 {
            // SAFETY: not registered, so the shim never saw ctx.
            drop(unsafe { std::sync::Arc::from_raw(ctx) });
            return Err(errno(ret.into()));
        }
        conn.ctx = ctx;
        Ok(conn)
    }

    /// Reads into `buf`'s unfilled part: `Ok(Some(drained))` when bytes
    /// arrived or at end of stream (nothing added), `Ok(None)` when nothing
    /// is there yet. `drained`: nothing is left to take until the next
    /// wake-up (tsffi.h).
    pub fn read(&mut self, buf: &mut tokio::io::ReadBuf<'_>) -> std::io::Result<Option<bool>> {
        let mut drained: std::ffi::c_int = 0;
        // SAFETY: the shim only writes (never reads) up to len bytes at the
        // pointer, returns how many it wrote, and writes at most drained.
        let ret = unsafe {
            let dst = buf.unfilled_mut();
            bindings::tsffi_conn_read(self.id, dst.as_mut_ptr().cast(), dst.len(), &mut drained)
        };
        match ret {
            n if n >= 0 => {
                let n = n as usize;
                // SAFETY: the shim initialised the first n unfilled bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                Ok(Some(drained != 0))
            }
            n if n == -(libc::EAGAIN as i64) => Ok(None),
            n => Err(errno(n)),
        }
    }

    /// Writes `bufs` in order as one write (see tsffi.h): `Ok(Some(n))`
    /// bytes taken from their start, `Ok(None)` when the send buffer is full.
    pub fn write(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<Option<usize>> {
        // SAFETY: IoSlice is ABI-compatible with struct iovec on Unix (its
        // documented guarantee), and the shim only reads the iovcnt entries
        // and the bytes they point at, during the call.
        let ret =
            unsafe { bindings::tsffi_conn_write(self.id, bufs.as_ptr() as *mut bindings::iovec, bufs.len()) };
        match ret {
            n if n >= 0 => Ok(Some(n as usize)),
            n if n == -(libc::EAGAIN as i64) => Ok(None),
            n => Err(errno(n)),
        }
    }

    /// Half-closes: the peer reads end of stream.
    pub fn shutdown_write(&mut self) -> std::io::Result<()> {
        // SAFETY: plain call on our id.
        let ret = unsafe { bindings::tsffi_conn_shutdown_write(self.id) };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        Ok(())
    }
}

/// The node's relay goroutines call into a [`Relay`] through these; ctx is
/// the `Arc<Relay>` [`Conn::relay`] leaked for them, released by
/// `relay_done` (tsffi.h: after done, ctx is never used again).
fn relay_of<'a>(ctx: *mut c_void) -> &'a Relay {
    // SAFETY: see above; the reference never outlives the callback.
    unsafe { &*(ctx as *const Relay) }
}

/// The side named in a callback (tsffi.h's TSFFI_CLIENT, TSFFI_UPSTREAM).
fn side_of(side: c_int) -> usize {
    if side == bindings::TSFFI_CLIENT as c_int {
        relay::CLIENT
    } else {
        relay::UPSTREAM
    }
}

extern "C" fn relay_begin(ctx: *mut c_void, side: c_int) -> c_uint {
    relay_of(ctx).begin(side_of(side))
}

extern "C" fn relay_input(ctx: *mut c_void, side: c_int, buf: *const u8, len: usize) -> c_uint {
    let data: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: the node passes len readable bytes at buf, for this call.
        unsafe { std::slice::from_raw_parts(buf, len) }
    };
    relay_of(ctx).input(side_of(side), data)
}

extern "C" fn relay_output(ctx: *mut c_void, side: c_int, buf: *mut u8, cap: usize) -> usize {
    if cap == 0 {
        return 0;
    }
    // SAFETY: the node passes cap writable bytes at buf, for this call.
    let out = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
    relay_of(ctx).output(side_of(side), out)
}

extern "C" fn relay_failed(ctx: *mut c_void, side: c_int, writing: c_int, err: c_int) -> c_uint {
    relay_of(ctx).failed(side_of(side), writing != 0, &std::io::Error::from_raw_os_error(err))
}

extern "C" fn relay_done(ctx: *mut c_void) {
    // SAFETY: the reference Conn::relay leaked; the node calls done once,
    // last.
    let r = unsafe { Arc::from_raw(ctx as *const Relay) };
    r.finished();
}

static RELAY_OPS: bindings::tsffi_relay_ops = bindings::tsffi_relay_ops {
    begin: Some(relay_begin),
    input: Some(relay_input),
    output: Some(relay_output),
    failed: Some(relay_failed),
    done: Some(relay_done),
};

// The relay's bits and sides are tsffi.h's.
const _: () = {
    assert!(bindings::TSFFI_CLIENT as usize == relay::CLIENT);
    assert!(bindings::TSFFI_UPSTREAM as usize == relay::UPSTREAM);
    assert!(bindings::TSFFI_RELAY_WRITE_CLIENT == relay::WRITE_CLIENT);
    assert!(bindings::TSFFI_RELAY_WRITE_UPSTREAM == relay::WRITE_UPSTREAM);
    assert!(bindings::TSFFI_RELAY_HALF_CLOSE == relay::HALF_CLOSE);
    assert!(bindings::TSFFI_RELAY_END == relay::END);
};

/// Starts a relay: `start` makes one of tsffi's relay_start calls with the
/// ops, the ctx and the grace it is given, and returns the call's result
/// and the relay's id (for its kick). ctx is the `Arc<Relay>` leaked for the
/// node, released here if the relay did not start (the node then never saw
/// it) and by `relay_done` otherwise.
fn start_relay(
    relay: Arc<Relay>,
    start: impl FnOnce(*mut bindings::tsffi_relay_ops, *mut c_void, c_uint) -> (c_int, u64),
) -> std::io::Result<()> {
    let ctx = Arc::into_raw(relay.clone());
    let grace = c_uint::try_from(relay::STOP_WRITE_GRACE.as_millis()).unwrap_or(c_uint::MAX);
    let (ret, id) = start(std::ptr::addr_of!(RELAY_OPS).cast_mut(), ctx as *mut c_void, grace);
    if ret < 0 {
        // SAFETY: not started, so the node never saw ctx.
        drop(unsafe { Arc::from_raw(ctx) });
        return Err(errno(ret.into()));
    }
    // SAFETY: a plain call; an id whose relay is over is ignored.
    relay.set_kick(Box::new(move || unsafe { bindings::tsffi_relay_kick(id) }));
    Ok(())
}

/// Hands a client that is a host socket and the database's socket to the
/// node, whose goroutines move the bytes from now on, `relay` deciding
/// (tsffi.h's tsffi_relay_start_sockets).
pub fn relay_sockets(client: OwnedFd, upstream: OwnedFd, relay: Arc<Relay>) -> std::io::Result<()> {
    start_relay(relay, |ops, ctx, grace| {
        let mut id: std::os::raw::c_ulonglong = 0;
        // SAFETY: RELAY_OPS lives forever and its callbacks match
        // tsffi_relay_ops; ctx stays valid until relay_done releases it.
        // The node takes both descriptors over, even on failure, and
        // writes id on success.
        let ret = unsafe {
            bindings::tsffi_relay_start_sockets(
                client.into_raw_fd(),
                upstream.into_raw_fd(),
                ops,
                ctx,
                grace,
                &mut id,
            )
        };
        (ret, id)
    })
}

impl<W: Wake> Conn<W> {
    /// Hands the connection and the database's socket to the node, whose
    /// goroutines move the bytes from now on, `relay` deciding (tsffi.h).
    pub fn relay(self, upstream: OwnedFd, relay: Arc<Relay>) -> std::io::Result<()> {
        let id = self.id;
        start_relay(relay, |ops, ctx, grace| {
            // SAFETY: as in relay_sockets; the node takes the descriptor
            // over, even on failure.
            (unsafe { bindings::tsffi_relay_start(id, upstream.into_raw_fd(), ops, ctx, grace) }, id)
        })?;
        // The node owns the connection now and will never wake us again:
        // release the wake ctx without closing the connection.
        let this = std::mem::ManuallyDrop::new(self);
        if !this.ctx.is_null() {
            // SAFETY: ctx came from Arc::into_raw in attach; Drop, which
            // would release it too, never runs.
            drop(unsafe { Arc::from_raw(this.ctx) });
        }
        Ok(())
    }
}

/// A socket of ours in the node's netpoller (tsffi_fd_watch): the node
/// calls `wake` when the socket may be ready. Dropping it ends the watch.
#[derive(Debug)]
pub struct FdWatch<W: Wake> {
    id: u64,
    /// The reference the shim holds as the callback's ctx; released on
    /// drop, after tsffi_fd_unwatch.
    ctx: *const W,
}

// SAFETY: the id is a plain number and ctx points at a Send + Sync W.
unsafe impl<W: Wake> Send for FdWatch<W> {}
unsafe impl<W: Wake> Sync for FdWatch<W> {}

impl<W: Wake> FdWatch<W> {
    pub fn new(fd: std::os::fd::BorrowedFd<'_>, wake: Arc<W>) -> std::io::Result<FdWatch<W>> {
        use std::os::fd::AsRawFd;
        let ctx = Arc::into_raw(wake);
        let mut id: std::os::raw::c_ulonglong = 0;
        // SAFETY: the trampoline matches tsffi_wake_fn and ctx stays valid
        // until Drop; the shim duplicates fd and writes id on success.
        let ret = unsafe { bindings::tsffi_fd_watch(fd.as_raw_fd(), Some(wake_trampoline::<W>), ctx as *mut _, &mut id) };
        if ret < 0 {
            // SAFETY: not registered, so the shim never saw ctx.
            drop(unsafe { Arc::from_raw(ctx) });
            return Err(errno(ret.into()));
        }
        Ok(FdWatch { id, ctx })
    }

    /// Has wake called once the socket may be readable and/or writable.
    pub fn wait(&self, readable: bool, writable: bool) -> std::io::Result<()> {
        let events = if readable { bindings::TSFFI_READABLE } else { 0 } | if writable { bindings::TSFFI_WRITABLE } else { 0 };
        // SAFETY: a plain call on our id.
        let ret = unsafe { bindings::tsffi_fd_wait(self.id, events) };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        Ok(())
    }
}

impl<W: Wake> Drop for FdWatch<W> {
    fn drop(&mut self) {
        // SAFETY: when it returns the callback is done with ctx for good.
        unsafe { bindings::tsffi_fd_unwatch(self.id) };
        // SAFETY: ctx came from Arc::into_raw in new, released once, here.
        drop(unsafe { Arc::from_raw(self.ctx) });
    }
}

/// A task the node polls on one of its goroutines (tsffi_task_start).
pub trait PollTask: Send + Sync + 'static {
    /// Polls the task once; true when it is over.
    fn poll_task(self: &Arc<Self>) -> bool;
}

/// The poll callback; ctx is the `Arc<T>` [`task_start`] leaked, released
/// here once the task is over (tsffi.h: ctx is never used again then).
extern "C" fn poll_trampoline<T: PollTask>(ctx: *mut c_void) -> c_int {
    // SAFETY: ctx came from Arc::into_raw in task_start and is released
    // only below, when this returns nonzero for the last time.
    let task = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(ctx as *const T) });
    if task.poll_task() {
        drop(std::mem::ManuallyDrop::into_inner(task));
        1
    } else {
        0
    }
}

/// Starts polling `task` on a goroutine; `id` must not be another running
/// task's.
pub fn task_start<T: PollTask>(id: u64, task: Arc<T>) {
    let ctx = Arc::into_raw(task) as *mut c_void;
    // SAFETY: the trampoline matches tsffi_poll_fn and owns ctx from now on.
    unsafe { bindings::tsffi_task_start(id, Some(poll_trampoline::<T>), ctx) }
}

/// Has the node poll task `id` again (ignored once it is over).
pub fn task_wake(id: u64) {
    // SAFETY: a plain call, valid for any id, from any thread.
    unsafe { bindings::tsffi_task_wake(id) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_cross_as_values() {
        for a in ["100.64.0.7:54321", "[fd7a:115c:a1e0::7]:5432", "[::ffff:1.2.3.4]:9"] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let mut bytes = [0u8; 18];
            bytes[..16].copy_from_slice(&ip16(addr.ip()));
            bytes[16..].copy_from_slice(&addr.port().to_be_bytes());
            let back = announced_addr(&bytes);
            assert_eq!(back.port(), addr.port(), "{a}");
            assert_eq!(back.ip(), addr.ip().to_canonical(), "{a}: IPv4 comes back as IPv4");
        }
        assert_eq!(ANNOUNCE_LEN, 8 + 16 + 2);
    }
}
