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
    pub fn with_current_runtime() -> NodeTasks {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailnet::NodeSocket;
    use std::io::{Read, Write};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sets its flag when dropped.
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_runs_on_the_node_with_tokio_timers_and_channels() {
        let tasks = NodeTasks::with_current_runtime();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<u32>();
        tasks.spawn(async move {
            let outside = on_node();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let n = go_rx.await.unwrap();
            // A blocking-pool hop and back, as admission makes for PBKDF2.
            let m = tokio::task::spawn_blocking(move || n * 2).await.unwrap();
            let _ = tx.send((outside, on_node(), m));
        });
        assert_eq!(tasks.len(), 1);
        go_tx.send(21).unwrap();
        let (before, after, m) = tokio::time::timeout(Duration::from_secs(10), rx).await.unwrap().unwrap();
        assert!(before && after, "polled on the node");
        assert_eq!(m, 42);
        tokio::time::timeout(Duration::from_secs(10), tasks.all_done()).await.unwrap();
        assert!(tasks.is_empty());
        assert!(!on_node(), "only inside a node task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abort_drops_waiting_tasks_and_a_panic_stays_in_its_task() {
        let tasks = NodeTasks::with_current_runtime();
        let flags: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for f in &flags {
            let guard = Dropped(f.clone());
            tasks.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        tasks.spawn(async { panic!("a session's bug") });
        // (The first call into Go waits for its runtime to start.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tasks.len() > 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tasks.len(), 3, "the panicking task is over, the others wait");
        assert!(flags.iter().all(|f| !f.load(Ordering::Acquire)));
        tasks.abort_all();
        tokio::time::timeout(Duration::from_secs(10), tasks.all_done()).await.unwrap();
        assert!(flags.iter().all(|f| f.load(Ordering::Acquire)), "every aborted task was dropped");
    }

    /// A database stand-in: echoes what it reads, in pieces, then closes.
    fn echo_server() -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                // Answers late, so the reader has to wait in the netpoller.
                std::thread::sleep(Duration::from_millis(5));
                s.write_all(&buf[..n]).unwrap();
            }
            got
        });
        (addr, t)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_socket_connects_reads_and_writes_from_a_node_task() {
        let (addr, server) = echo_server();
        let tasks = NodeTasks::with_current_runtime();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let r = async {
                let mut s = crate::upstream::Socket::connect(addr).await?;
                let on_node_socket = matches!(s, crate::upstream::Socket::Node(_));
                // More than a socket buffer, so writes wait for room too.
                let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
                let (mut rd, mut wr) = tokio::io::split(&mut s);
                let write = async {
                    wr.write_all(&data).await?;
                    wr.shutdown().await
                };
                let mut back = Vec::new();
                let read = rd.read_to_end(&mut back);
                let (w, r) = tokio::join!(write, read);
                w?;
                r?;
                Ok::<_, std::io::Error>((on_node_socket, back == data, back.len()))
            }
            .await;
            let _ = tx.send(r);
        });
        let (node, same, len) = tokio::time::timeout(Duration::from_secs(30), rx).await.unwrap().unwrap().unwrap();
        assert!(node, "a socket made in a node task waits in the node's netpoller");
        assert!(same, "{len} bytes came back changed");
        assert_eq!(server.join().unwrap().len(), 4_000_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_connect_is_an_error_and_a_socket_polled_by_tokio_still_works() {
        // A port nothing listens on (bound, then closed).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let tasks = NodeTasks::with_current_runtime();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let _ = tx.send(NodeSocket::connect(closed).await.map(|_| ()));
        });
        let err = tokio::time::timeout(Duration::from_secs(10), rx).await.unwrap().unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

        // Made and used on tokio: the node's netpoller wakes tokio's task.
        let (addr, server) = echo_server();
        let mut s = NodeSocket::connect(addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        let std = s.into_std();
        drop(std);
        assert_eq!(server.join().unwrap(), b"ping");
    }
}
