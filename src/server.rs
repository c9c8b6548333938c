//! Stage 1, accept: the accept loops (one per tailnet port). They never exit
//! on an error (they back off and go on); live sessions are bounded by a
//! semaphore; on shutdown they stop accepting, give running sessions a
//! grace period, then end the rest and wait for their audit records.
#![forbid(unsafe_code)]

use crate::audit::{DenyReason, Event, Record};
use crate::context::Shared;
use crate::pgwire::sqlstate;
use crate::service::{self, Client};
use crate::session;
use crate::tailnet::{Listener, Tailnet, TailnetError};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

/// Accept errors back off from this, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// After the grace, how long ended sessions get to write their
/// `session_end` and cancel their queries before they are aborted.
const END_WAIT: Duration = Duration::from_secs(5);

pub struct ServeOptions {
    pub max_sessions: usize,
    /// How long running sessions may go on after shutdown is signalled.
    pub grace: Duration,
    /// The Tailscale Service this node serves (`--service`), if any.
    pub service: Option<ServiceListener>,
}

/// A Tailscale Service's loopback listener ([`Tailnet::listen_service`]).
pub struct ServiceListener {
    /// `svc:NAME`.
    pub name: String,
    pub listener: std::net::TcpListener,
    /// The Service's port (sessions see it as their local port).
    pub port: u16,
}

/// What a session that came through the Service is told when the node
/// withdraws from it.
pub const LEAVING_SERVICE: &str =
    "terminating connection: this tailgres node is leaving the Service; connect again to reach another";

/// Serves until `shutdown` resolves, then stops accepting at once, lets
/// running sessions finish for `opts.grace` (cut short when `force`
/// resolves), then ends the rest: each gets FATAL 57P01 and writes its
/// `session_end` (reason `shutdown`). `stop_sessions` is the sending side of
/// `shared.shutdown`.
pub async fn serve<T: Tailnet>(
    listeners: Vec<T::Listener>,
    tailnet: Arc<T>,
    shared: Arc<Shared>,
    stop_sessions: watch::Sender<bool>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_sessions));
    let mut tasks = Sessions { tokio: JoinSet::new(), node: tailnet.session_tasks() };
    let (conn_tx, mut conns) = mpsc::channel(64);
    // On a node that runs sessions itself, the accept loops run there too
    // and start each session they can take a permit for, so a new
    // connection never waits on a tokio worker; the rest (and every
    // connection of a tailnet without) go through the loop below.
    let mut acceptors = JoinSet::new();
    let node_acceptors = tailnet.session_tasks();
    for l in listeners {
        tracing::info!(port = l.port(), max_sessions = opts.max_sessions, "accepting on the tailnet");
        match (&node_acceptors, &tasks.node) {
            (Some(on_node), Some(sessions)) => {
                let direct = Direct {
                    sessions: sessions.clone(),
                    permits: permits.clone(),
                    tailnet: tailnet.clone(),
                    shared: shared.clone(),
                };
                on_node.spawn(accept_loop::<T>(l, conn_tx.clone(), shared.clone(), Some(direct)));
            }
            _ => {
                acceptors.spawn(accept_loop::<T>(l, conn_tx.clone(), shared.clone(), None));
            }
        }
    }
    let mut service = None;
    if let Some(s) = opts.service {
        let listener = s.listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(s.listener));
        match listener {
            Ok(l) => {
                let local = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(service = %s.name, port = s.port, local = %local, "serving the Tailscale Service");
                let task = tokio::spawn(service::accept_loop(l, s.port, conn_tx.clone(), shared.clone()));
                service = Some((s.name, task));
            }
            Err(e) => tracing::error!(service = %s.name, error = %e, "the Service's listener cannot be used"),
        }
    }
    drop(conn_tx);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            conn = conns.recv() => {
                let Some((stream, addr, port)) = conn else {
                    tracing::error!("every tailnet listener closed; no more sessions can be accepted");
                    break;
                };
                let (tailnet, shared) = (tailnet.clone(), shared.clone());
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let via_service = matches!(stream, Client::Service(_));
                        // A Service connection is a host socket, served by
                        // tokio's reactor: its session stays on tokio.
                        tasks.spawn(!via_service, holding(permit, stream, addr, port, tailnet, shared));
                    }
                    Err(_) => {
                        // Counted every time; recorded once a second per
                        // address (with how many were not); told while
                        // few are being told.
                        shared.metrics.denied(DenyReason::TooManySessions);
                        let due = shared.denials.due(addr.ip());
                        let refuser = shared.refusers.clone().try_acquire_owned().ok();
                        let limit = opts.max_sessions;
                        if due.is_some() || refuser.is_some() {
                            tasks.tokio.spawn(async move {
                                if let Some(more) = due {
                                    let mut d = format!("session limit (--max-sessions {limit}) reached");
                                    if more > 0 {
                                        d.push_str(&format!(" ({more} more refused from this address since the last record)"));
                                    }
                                    tracing::warn!(peer = %addr, "{d}");
                                    let r = Record::new(crate::audit::new_session_id(), addr, Event::denied(DenyReason::TooManySessions, d));
                                    session::write_audit(&shared, &r).await;
                                }
                                if let Some(_refuser) = refuser {
                                    session::refuse_unnegotiated(stream, &shared, sqlstate::TOO_MANY_CONNECTIONS,
                                        "tailgres has too many sessions open; try again shortly").await;
                                }
                            });
                        }
                    }
                }
            },
            Some(done) = tasks.tokio.join_next(), if !tasks.tokio.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a session task panicked");
                    }
                }
            }
        }
    }
    // Stop accepting at once: the listeners close, so new dials are refused.
    acceptors.abort_all();
    while acceptors.join_next().await.is_some() {}
    if let Some(on_node) = &node_acceptors {
        on_node.abort_all();
        on_node.all_done().await;
    }
    if let Some((name, task)) = service.take() {
        task.abort();
        let _ = task.await;
        leave_service(&*tailnet, &shared, &name).await;
    }
    drop(conns);
    let live = tasks.len();
    tracing::info!(live, grace = ?opts.grace, "shutting down: no new sessions; running ones may finish");
    tokio::pin!(force);
    let finished = tokio::select! {
        r = tokio::time::timeout(opts.grace, tasks.all_done()) => r.is_ok(),
        _ = &mut force => {
            tracing::warn!("second signal: ending sessions now");
            false
        }
    };
    if !finished {
        tracing::info!(left = tasks.len(), "ending the remaining sessions");
        let _ = stop_sessions.send(true);
        let ended = tokio::time::timeout(END_WAIT, tasks.all_done()).await;
        if ended.is_err() {
            tracing::warn!(left = tasks.len(), "sessions did not end in time; aborting them");
            tasks.abort_all();
            tasks.all_done().await;
        }
    }
    let _ = stop_sessions.send(true);
}

/// The running sessions (and refusals): on tokio, or polled on the
/// tailnet node's scheduler (`Tailnet::session_tasks`).
struct Sessions {
    tokio: JoinSet<()>,
    node: Option<crate::tailnet::NodeTasks>,
}

impl Sessions {
    /// Starts a session, on the node when `on_node` and the tailnet has one.
    fn spawn(&mut self, on_node: bool, session: impl Future<Output = ()> + Send + 'static) {
        match &self.node {
            Some(node) if on_node => node.spawn(session),
            _ => {
                self.tokio.spawn(session);
            }
        }
    }

    fn len(&self) -> usize {
        self.tokio.len() + self.node.as_ref().map_or(0, |n| n.len())
    }

    async fn all_done(&mut self) {
        while self.tokio.join_next().await.is_some() {}
        if let Some(node) = &self.node {
            node.all_done().await;
        }
    }

    fn abort_all(&mut self) {
        self.tokio.abort_all();
        if let Some(node) = &self.node {
            node.abort_all();
        }
    }
}

/// Leaves the Service: ends the sessions that came through it, then
/// withdraws (the caller has stopped accepting its connections).
///
/// A Service's address is routed to one host per client: once the control
/// server moves this node's clients to the other hosts (a moment after the
/// withdrawal), their packets for the Service go there, and every
/// connection they still had here stalls. So those sessions end first,
/// with FATAL 57P01 and their queries cancelled (`session_end` reason
/// `shutdown`), while the client can still hear it and reconnect; sessions
/// on the node's own address keep the grace. A connection that still
/// reaches this node before its client moves is refused at once (nothing
/// accepts it), so the client retries and lands on another host.
async fn leave_service<T: Tailnet>(tailnet: &T, shared: &Shared, name: &str) {
    let mut ended = 0;
    for s in shared.live.snapshot().into_iter().filter(|s| s.via_service) {
        let stop = crate::relay::Stop {
            reason: crate::audit::EndReason::Shutdown,
            client_message: LEAVING_SERVICE.into(),
            detail: Some(format!("this node left {name}: its clients move to the other hosts")),
        };
        ended += usize::from(shared.live.end(&s.session_id, stop));
    }
    // Their FATALs go out before the withdrawal moves the clients away
    // (bounded: a client that does not read is cut by the relay's own
    // write grace).
    let gone = async {
        while shared.live.snapshot().iter().any(|s| s.via_service) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), gone).await;
    tracing::info!(service = %name, ended, "shutting down: withdrawing the Service so new sessions go to other hosts");
    match tokio::time::timeout(Duration::from_secs(5), tailnet.withdraw_service(name)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "withdrawing the Service failed"),
        Err(_) => tracing::error!(service = %name, "withdrawing the Service timed out"),
    }
}

/// One session, holding its `--max-sessions` permit to the end.
async fn holding<T: Tailnet>(
    permit: tokio::sync::OwnedSemaphorePermit,
    stream: Client<T::Conn>,
    addr: std::net::SocketAddr,
    port: u16,
    tailnet: Arc<T>,
    shared: Arc<Shared>,
) {
    let via_service = matches!(stream, Client::Service(_));
    session::run(stream, addr, port, via_service, &*tailnet, &shared).await;
    drop(permit);
}

/// What an accept loop on the node needs to start a session itself.
struct Direct<T: Tailnet> {
    sessions: crate::tailnet::NodeTasks,
    permits: Arc<Semaphore>,
    tailnet: Arc<T>,
    shared: Arc<Shared>,
}

impl<T: Tailnet> Direct<T> {
    /// Starts the session on the node if a permit is free; otherwise
    /// gives the connection back (for the serve loop's refusal).
    fn start(&self, stream: T::Conn, addr: std::net::SocketAddr, port: u16) -> Option<T::Conn> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else { return Some(stream) };
        let (tailnet, shared) = (self.tailnet.clone(), self.shared.clone());
        self.sessions.spawn(holding(permit, Client::Tailnet(stream), addr, port, tailnet, shared));
        None
    }
}

/// Accepts on one listener until it closes; never exits on a transient error.
async fn accept_loop<T: Tailnet>(
    listener: T::Listener,
    out: mpsc::Sender<(Client<T::Conn>, std::net::SocketAddr, u16)>,
    shared: Arc<Shared>,
    direct: Option<Direct<T>>,
) {
    let mut backoff = MIN_BACKOFF;
    let port = listener.port();
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                backoff = MIN_BACKOFF;
                let stream = match &direct {
                    Some(d) => match d.start(stream, addr, port) {
                        None => continue,
                        Some(stream) => stream,
                    },
                    None => stream,
                };
                if out.send((Client::Tailnet(stream), addr, port)).await.is_err() {
                    return;
                }
            }
            Err(TailnetError::Closed) => {
                tracing::error!(port, "a tailnet listener closed");
                return;
            }
            Err(e) => {
                shared.metrics.error("accept");
                tracing::warn!(port, error = %e, backoff = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
