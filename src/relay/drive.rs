//! The relay's driver on tokio, for connections tokio owns (the in-memory
//! tailnet's). It keeps to the protocol in the module docs exactly as the
//! embedded node's goroutines do (`vendor/tsffi/relay.go`); every decision
//! is the [`Relay`]'s.
#![forbid(unsafe_code)]

use super::{write_bit, Relay, CLIENT, END, HALF_CLOSE, STOP_WRITE_GRACE, UPSTREAM};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex};

const READ_BUF: usize = 16 * 1024;

/// Runs `fut` unless the wind-down has begun and [`STOP_WRITE_GRACE`]
/// passes first (`None` then).
async fn unless_stopped<F: Future>(fut: F, mut stop: watch::Receiver<bool>) -> Option<F::Output> {
    let deadline = async move {
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(STOP_WRITE_GRACE).await;
    };
    tokio::select! {
        biased;
        out = fut => Some(out),
        _ = deadline => None,
    }
}

/// A side's write half, whichever stream it is.
type Writer = Mutex<Box<dyn AsyncWrite + Unpin + Send>>;

struct Driver {
    relay: Arc<Relay>,
    /// Each side's write half, by [`CLIENT`] and [`UPSTREAM`].
    writers: [Writer; 2],
    /// The wind-down began: readers stop, writes get the grace.
    stopping: Arc<watch::Sender<bool>>,
    /// A write to this side failed; nothing more is written to it.
    dead: [AtomicBool; 2],
}

impl Driver {
    async fn flush(&self, side: usize) -> u32 {
        if self.dead[side].load(Ordering::Acquire) {
            return 0;
        }
        let mut w = self.writers[side].lock().await;
        let mut buf = vec![0u8; READ_BUF * 2];
        loop {
            let n = self.relay.output(side, &mut buf);
            if n > 0 {
                let write = async {
                    w.write_all(&buf[..n]).await?;
                    w.flush().await
                };
                let err = match unless_stopped(write, self.stopping.subscribe()).await {
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(e),
                    None => {
                        Some(io::Error::new(io::ErrorKind::TimedOut, "not written within the stop grace"))
                    }
                };
                if let Some(err) = err {
                    self.dead[side].store(true, Ordering::Release);
                    return self.relay.failed(side, true, &err);
                }
            }
            // A short chunk was all there was (see the protocol).
            if n < buf.len() {
                return 0;
            }
        }
    }

    async fn shutdown(&self, side: usize) {
        if self.dead[side].load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writers[side].lock().await;
        let _ = unless_stopped(w.shutdown(), self.stopping.subscribe()).await;
    }

    /// Acts on what the relay returned for `side`; false: this reader is done.
    async fn act(&self, side: usize, mut bits: u32) -> bool {
        let other = 1 - side;
        if bits & write_bit(other) != 0 {
            bits |= self.flush(other).await;
        }
        if bits & write_bit(side) != 0 {
            bits |= self.flush(side).await;
        }
        if bits & END != 0 {
            self.stopping.send_replace(true);
            return false;
        }
        if bits & HALF_CLOSE != 0 {
            self.shutdown(other).await;
            return false;
        }
        true
    }

    async fn read<R: AsyncRead + Unpin>(&self, side: usize, mut r: R) {
        let mut stop = self.stopping.subscribe();
        if !self.act(side, self.relay.begin(side)).await {
            return;
        }
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let bits = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                r = r.read(&mut buf) => match r {
                    Ok(n) => self.relay.input(side, &buf[..n]),
                    Err(e) => self.relay.failed(side, false, &e),
                },
            };
            if !self.act(side, bits).await {
                return;
            }
        }
    }
}

/// Moves a session's bytes between `client` and `upstream` until the relay
/// ends it, then closes both.
/// The kick is set before the future first runs, so a stop made meanwhile
/// reaches it.
pub fn drive<C, U>(client: C, upstream: U, relay: Arc<Relay>) -> impl Future<Output = ()> + Send
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stopping = Arc::new(watch::channel(false).0);
    let kick = stopping.clone();
    relay.set_kick(Box::new(move || {
        kick.send_replace(true);
    }));
    run(client, upstream, relay, stopping)
}

async fn run<C, U>(client: C, upstream: U, relay: Arc<Relay>, stopping: Arc<watch::Sender<bool>>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let d = Driver {
        relay,
        writers: [Mutex::new(Box::new(cw)), Mutex::new(Box::new(uw))],
        stopping,
        dead: Default::default(),
    };
    tokio::join!(d.read(CLIENT, cr), d.read(UPSTREAM, ur));
    d.stopping.send_replace(true);
    for side in [CLIENT, UPSTREAM] {
        d.flush(side).await;
        d.shutdown(side).await;
    }
    d.relay.finished();
}
