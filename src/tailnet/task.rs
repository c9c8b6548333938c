//! [`NodeTasks`]: sessions polled on the embedded node's goroutines.
//!
//! A session's admission waits on the client (the node's netstack), the
//! database's socket and the audit writer. Polled on a tokio worker, every
//! message from the client woke that worker from one of the node's threads,
//! and every write to the client readied a goroutine that another of the
//! node's threads had to run: two schedulers handing each handshake step
//! across OS threads. Polled on a goroutine, the node's scheduler runs the
//! session next to the netstack, as it runs tsnet's own connections (and
//! as the data phase's relay already is, see `relay`). The future is the
//! same one tokio would poll; tokio's timers, its blocking pool and its
//! reactor still serve it (the runtime is entered while it is polled).
#![forbid(unsafe_code)]

use super::ffi;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use tokio::sync::Notify;

type BoxedTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The tasks running on the node; cloning gives another handle to the
/// same set.
#[derive(Clone)]
pub struct NodeTasks {
    registry: Arc<Registry>,
}

struct Registry {
    live: Mutex<HashMap<u64, Arc<Task>>>,
    /// Notified when the last live task ends.
    empty: Notify,
    runtime: tokio::runtime::Handle,
}

struct Task {
    id: u64,
    future: Mutex<Option<BoxedTask>>,
    aborted: AtomicBool,
    registry: Arc<Registry>,
}

thread_local! {
    /// Set while this thread polls a node task.
    static ON_NODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the caller runs in a task the node polls: sockets it makes
/// then wait in the node's netpoller ([`super::NodeSocket`]).
pub fn on_node() -> bool {
    ON_NODE.with(|c| c.get())
}

/// Task ids, unique in the process (the node's tasks of every set).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeTasks {
    /// A set whose tasks use the current tokio runtime's timers and
    /// reactor. Panics outside a runtime (like `tokio::spawn`).
    pub fn new() -> NodeTasks {
        NodeTasks {
            registry: Arc::new(Registry {
                live: Mutex::new(HashMap::new()),
                empty: Notify::new(),
                runtime: tokio::runtime::Handle::current(),
            }),
        }
    }

    /// Starts `future` on a goroutine of the node.
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let task = Arc::new(Task {
            id,
            future: Mutex::new(Some(Box::pin(future))),
            aborted: AtomicBool::new(false),
            registry: self.registry.clone(),
        });
        lock(&self.registry.live).insert(id, task.clone());
        ffi::task_start(id, task);
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        lock(&self.registry.live).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no task is running.
    pub async fn all_done(&self) {
        loop {
            let notified = self.registry.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Drops every running task at its next poll (as tokio's abort does):
    /// what it holds is closed, and it writes nothing more.
    pub fn abort_all(&self) {
        for task in lock(&self.registry.live).values() {
            task.aborted.store(true, Ordering::Release);
            ffi::task_wake(task.id);
        }
    }
}

impl Registry {
    fn finished(&self, id: u64) {
        let mut live = lock(&self.live);
        live.remove(&id);
        if live.is_empty() {
            self.empty.notify_waiters();
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        ffi::task_wake(self.id);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        ffi::task_wake(self.id);
    }
}

impl ffi::PollTask for Task {
    fn poll_task(self: &Arc<Self>) -> bool {
        let _runtime = self.registry.runtime.enter();
        struct OnNode(bool);
        impl Drop for OnNode {
            fn drop(&mut self) {
                ON_NODE.with(|c| c.set(self.0));
            }
        }
        let _on_node = OnNode(ON_NODE.with(|c| c.replace(true)));
        let mut slot = lock(&self.future);
        let Some(future) = slot.as_mut() else { return true };
        // A panic must not unwind into the node's goroutine (it would
        // abort the process): the session is dropped, as tokio drops a
        // task that panicked.
        let over = self.aborted.load(Ordering::Acquire) || {
            let waker = Waker::from(self.clone());
            let mut cx = Context::from_waker(&waker);
            match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
                Ok(Poll::Ready(())) => true,
                Ok(Poll::Pending) => false,
                Err(_) => {
                    tracing::error!("a session task panicked");
                    true
                }
            }
        };
        if !over {
            return false;
        }
        let future = slot.take();
        drop(slot);
        if std::panic::catch_unwind(AssertUnwindSafe(move || drop(future))).is_err() {
            tracing::error!("a session task panicked while it was dropped");
        }
        self.registry.finished(self.id);
        true
    }
}
