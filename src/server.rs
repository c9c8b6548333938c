//! Stage 1, accept: the accept loop. It never exits on an error (it backs
//! off and goes on), bounds live sessions with a semaphore, and on shutdown
//! stops accepting, tells live sessions to end, and waits for them.
#![forbid(unsafe_code)]

use crate::audit::{DenyReason, Event, Record};
use crate::pgwire::sqlstate;
use crate::session::{self, Shared};
use crate::tailnet::{Tailnet, TailnetError, TailnetListener};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Accept errors back off from this, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub struct ServeOptions {
    pub max_sessions: usize,
    /// How long live sessions get to end after shutdown is signalled.
    pub drain: Duration,
}

/// Serves until `shutdown` resolves, then drains. `stop_sessions` is the
/// sending side of `shared.shutdown`.
pub async fn serve<T: Tailnet>(
    listener: TailnetListener,
    tailnet: Arc<T>,
    shared: Arc<Shared>,
    stop_sessions: watch::Sender<bool>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_sessions));
    let mut tasks = JoinSet::new();
    let mut backoff = MIN_BACKOFF;
    tokio::pin!(shutdown);
    tracing::info!(port = listener.port(), max_sessions = opts.max_sessions, "accepting on the tailnet");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    backoff = MIN_BACKOFF;
                    let (tailnet, shared) = (tailnet.clone(), shared.clone());
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tasks.spawn(async move {
                                session::run(stream, addr, &*tailnet, &shared).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            let limit = opts.max_sessions;
                            tasks.spawn(async move {
                                let d = format!("session limit (--max-sessions {limit}) reached");
                                tracing::warn!(peer = %addr, "{d}");
                                let r = Record::new(crate::audit::new_session_id(), addr, Event::denied(DenyReason::TooManySessions, d));
                                let _ = shared.audit.record(&r).await;
                                session::refuse_unnegotiated(stream, &shared, sqlstate::TOO_MANY_CONNECTIONS,
                                    "tailgres has too many sessions open; try again shortly").await;
                            });
                        }
                    }
                }
                Err(TailnetError::Closed) => {
                    tracing::error!("the tailnet listener closed; no more sessions can be accepted");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, backoff = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a session task panicked");
                    }
                }
            }
        }
    }
    drop(listener);
    let live = tasks.len();
    let _ = stop_sessions.send(true);
    tracing::info!(live, drain = ?opts.drain, "shutting down: ending live sessions");
    let drained =
        tokio::time::timeout(opts.drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "sessions did not end in time; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}
