//! The waiting tasks of a connection the node wakes ([`ffi::Wake`]): one
//! slot per direction, shared by tailnet connections and watched sockets.
#![forbid(unsafe_code)]

use super::ffi;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// One direction's waiting task and a count of the node's wake-ups.
#[derive(Debug, Default)]
pub(super) struct Slot {
    waker: Mutex<Option<Waker>>,
    /// Bumped by every wake-up for this direction, before the waker is
    /// taken: an operation that saw -EAGAIN retries only if it changed.
    pub(super) wakes: AtomicU64,
}

impl Slot {
    fn arm(&self, w: &Waker) {
        let mut g = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match &*g {
            Some(old) if old.will_wake(w) => {}
            _ => *g = Some(w.clone()),
        }
    }

    fn fire(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        let w = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Runs `op` (`None`: nothing to do yet) until it is ready or nothing
    /// has changed since it last found nothing to do. A wake-up that lands
    /// between the call into the node and arming the waker bumps `wakes`,
    /// so it is never lost; and no second call into the node is made just
    /// to be sure.
    pub(super) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<Option<T>>,
    ) -> Poll<io::Result<T>> {
        loop {
            let seen = self.wakes.load(Ordering::Acquire);
            if let Some(v) = op().transpose() {
                return Poll::Ready(v);
            }
            if self.park(cx, seen) {
                return Poll::Pending;
            }
        }
    }

    /// Arms the waker; true if no wake-up came since the count was `seen`
    /// (the task may then wait), false if one did (look again).
    pub(super) fn park(&self, cx: &mut Context<'_>, seen: u64) -> bool {
        self.arm(cx.waker());
        self.wakes.load(Ordering::Acquire) == seen
    }
}

/// The wakers of the task reading and of the task writing (one each).
#[derive(Debug, Default)]
pub(super) struct Wakers {
    pub(super) read: Slot,
    pub(super) write: Slot,
}

impl ffi::Wake for Wakers {
    fn wake(&self, readable: bool, writable: bool) {
        if readable {
            self.read.fire();
        }
        if writable {
            self.write.fire();
        }
    }
}

