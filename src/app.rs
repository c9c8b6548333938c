//! The tailgres process: builds every shared piece once from the validated
//! [`Config`], joins the tailnet, serves, and handles signals.
#![forbid(unsafe_code)]

use crate::audit::{AuditDest, AuditLog, AuditOptions};
use crate::client_tls::{self, ClientTls};
use crate::config::{Config, ConfigError};
use crate::context::Shared;
use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::server::{self, ServeOptions};
use crate::settings::{Settings, SettingsCell};
use crate::signals::{Request, Signals};
use crate::tailnet::{EmbeddedNode, NodeConfig, Tailnet, TsnetLog};
use anyhow::{Context, Result};
use std::sync::Arc;
use tokio::sync::watch;

/// Re-reads the configuration (flags, environment and --config file) for a
/// reload.
pub type Reread = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

pub async fn run(cfg: Config, reread: Reread) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut signals = Signals::new().context("installing signal handlers")?;

    // Everything that can be checked without the network, first.
    let dest =
        if cfg.audit_log == "-" { AuditDest::Stdout } else { AuditDest::File(cfg.audit_log.clone().into()) };
    // Every line names this node (a fleet's logs are read together).
    let options = AuditOptions {
        checkpoints: cfg.audit_checkpoints.clone(),
        node: cfg.hostname.clone(),
        ..AuditOptions::default()
    };
    let (audit, audit_task) = AuditLog::open_with(dest, options).await.context("--audit-log")?;
    let settings = Settings::from_config(&cfg)?;
    let metrics = Arc::new(Metrics::default());
    metrics.identity_cas(settings.identity_cas());
    let settings = SettingsCell::new(settings);
    let local_health = match cfg.health_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--health-listen {addr}: cannot listen"))?,
        ),
        None => None,
    };

    let mut env = Vec::new();
    if !cfg.tailscale_log_upload {
        env.push(("TS_NO_LOGS_NO_SUPPORT".to_string(), "true".to_string()));
    }
    let node_cfg = NodeConfig {
        state_dir: cfg.state_dir.clone(),
        hostname: cfg.hostname.clone(),
        auth_key: cfg.auth_key.clone(),
        control_url: cfg.control_url.clone(),
        ephemeral: cfg.ephemeral,
        advertise_tags: cfg.advertise_tags.clone(),
        tsnet_log: cfg.tsnet_log.as_ref().map(|l| {
            if l == "stderr" {
                TsnetLog::Stderr
            } else {
                TsnetLog::File(l.into())
            }
        }),
        env,
        start_timeout: None,
    };
    // Health is served while the node joins, so /readyz can show the login
    // URL an interactive login needs.
    let node = Arc::new(EmbeddedNode::launch(&node_cfg).await?);
    let health = Arc::new(Health::new(node.clone(), settings.clone(), metrics.clone(), audit.clone()));
    let (health_stop, health_stopped) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut health_tasks = tokio::task::JoinSet::new();
    if let Some(l) = local_health {
        tracing::info!(address = %cfg.health_listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()), "serving /healthz, /readyz, /metrics");
        health_tasks.spawn(health::serve(l, health.clone(), stopped(health_stopped.clone())));
    }
    // While joining (an interactive login may take a person minutes):
    // SIGTERM/SIGINT stop cleanly; SIGHUP reopens the audit log (a rotation
    // must not stop the proxy) and the wait goes on. The rest of a reload
    // applies once the node runs, with the settings read then.
    {
        let joined = node.wait_running(&node_cfg);
        tokio::pin!(joined);
        loop {
            tokio::select! {
                r = &mut joined => {
                    r?;
                    break;
                }
                req = signals.recv() => match req {
                    Request::Reload => {
                        tracing::info!("SIGHUP while joining the tailnet: reopening the audit log");
                        audit.reopen();
                    }
                    Request::Shutdown => {
                        // Asked to stop before anything was served: a clean stop.
                        tracing::info!("stopped while joining the tailnet");
                        node.shutdown().await;
                        audit.close().await;
                        let _ = audit_task.await;
                        return Ok(());
                    }
                },
            }
        }
    }
    if let Some(port) = cfg.health_tailnet_port {
        let l = node.listen(port).with_context(|| format!("--health-tailnet-port {port}"))?;
        tracing::info!(port, "serving /healthz, /readyz, /metrics on the tailnet");
        health_tasks.spawn(health::serve(l, health.clone(), stopped(health_stopped.clone())));
    }
    let status = node.status().await?;
    let client_tls = Arc::new(ClientTls::new(cfg.client_tls.as_ref(), &*node, &status).await?);
    metrics.client_cert(client_tls.not_after());
    let listeners = cfg.ports().into_iter().map(|p| node.listen(p)).collect::<Result<Vec<_>, _>>()?;
    // Cancel keys name this node by its IPv4 address (a fleet passes a
    // cancel on to the member its key names).
    let own_ip = status.tailscale_ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(a) => Some(*a),
        std::net::IpAddr::V6(_) => None,
    });
    let cancels = match own_ip {
        Some(ip) => crate::cancel::CancelRegistry::new(crate::cancel::node_pid(ip)),
        None if cfg.fleet.is_some() => anyhow::bail!("--service: this node has no tailnet IPv4 address, which a fleet's cancel keys name"),
        None => crate::cancel::CancelRegistry::new(rand::random()),
    };
    let service = match &cfg.fleet {
        Some(f) => {
            let listener = node
                .listen_service(&f.service, cfg.port)
                .with_context(|| format!("--service {} (README \"Fleet\" says what the node needs)", f.service))?;
            tracing::info!(service = %f.service, fleet_tag = %f.tag, port = cfg.port, "hosting the Tailscale Service");
            Some(crate::server::ServiceListener { name: f.service.clone(), listener, port: cfg.port })
        }
        None => None,
    };
    for r in &settings.get().routes {
        tracing::info!(route = %r.name, databases = ?r.databases, address = %format!("{}:{}", status.dns_name, r.port), upstream = %r.upstream.address(), "route");
    }
    tracing::info!(name = %status.dns_name, ports = ?cfg.ports(), "tailgres ready");

    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        client_cert: Some(client_tls.slot()),
        cancels,
        fleet: cfg.fleet.clone(),
        statements: crate::statements::Auditor::start(
            audit.clone(),
            cfg.audit_statement_text,
            tokio::runtime::Handle::current(),
        ),
        ..Shared::new(
            settings.clone(),
            Some(tokio_rustls::TlsAcceptor::from(client_tls.config.clone())),
            audit.clone(),
            metrics.clone(),
            stop_rx,
        )
    });
    // Signals: the first SIGTERM/SIGINT starts the drain, a second one cuts
    // it short; SIGHUP reloads.
    let opts = ServeOptions { max_sessions: cfg.max_sessions, grace: cfg.shutdown_grace, service };
    let explain_socket = cfg.state_dir.join(crate::explain::SOCKET_NAME);
    let (signalled_tx, signalled) = watch::channel(0u32);
    let signal_task = {
        let (shared, client_tls, audit) = (shared.clone(), client_tls.clone(), audit.clone());
        let mut current = cfg;
        tokio::spawn(async move {
            loop {
                match signals.recv().await {
                    Request::Shutdown => {
                        signalled_tx.send_modify(|n| *n += 1);
                    }
                    Request::Reload => {
                        tracing::info!("SIGHUP: reopening the audit log and reloading");
                        audit.reopen();
                        match reload(&reread, &current, &shared, &client_tls) {
                            Ok(new) => {
                                current = new;
                                shared.metrics.reload(true);
                                tracing::info!("reload done");
                            }
                            Err(e) => {
                                shared.metrics.reload(false);
                                tracing::error!(error = %format!("{e:#}"), "reload failed; still serving with the previous configuration");
                            }
                        }
                    }
                }
            }
        })
    };
    let nth_signal = |n: u32| {
        let mut rx = signalled.clone();
        async move {
            let _ = rx.wait_for(|c| *c >= n).await;
        }
    };
    let follower = tokio::spawn(crate::live::follow(node.clone(), shared.live_view()));
    let renewer = {
        let (client_tls, node, metrics) = (client_tls.clone(), node.clone(), metrics.clone());
        tokio::spawn(async move { client_tls.renew(&*node, &metrics).await })
    };
    let explainer = tokio::spawn(crate::explain::serve(explain_socket, node.clone(), shared.explain_view()));
    let first_signal = async {
        nth_signal(1).await;
        health.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    server::serve(listeners, node.clone(), shared.clone(), stop_tx, opts, first_signal, nth_signal(2)).await;
    signal_task.abort();
    renewer.abort();
    let _ = follower.await;
    if let Ok(Err(e)) = explainer.await {
        tracing::warn!(error = %e, "the explain socket failed");
    }
    let _ = health_stop.send(true);
    while health_tasks.join_next().await.is_some() {}
    node.shutdown().await;
    drop(shared);
    audit.close().await;
    let _ = audit_task.await;
    tracing::info!("tailgres stopped");
    Ok(())
}

/// Applies a re-read configuration: new settings (routes with their CA
/// bundles and client keys re-read, policy, timeouts) and the client
/// certificate files. All or nothing: any error keeps the running state.
/// Settings that need a restart are named in a warning.
fn reload(reread: &Reread, cur: &Config, shared: &Shared, client_tls: &ClientTls) -> Result<Config> {
    let new = reread().context("configuration")?;
    let settings = Settings::from_config(&new)?;
    let cert = match (&client_tls.source, &new.client_tls) {
        (client_tls::Source::Files { .. }, Some((cert, key))) => Some(client_tls::load_files(cert, key)?),
        (client_tls::Source::Files { .. }, None) | (_, Some(_)) => {
            anyhow::bail!(
                "--client-tls-cert: switching between files and the tailnet's certificate needs a restart"
            )
        }
        _ => None,
    };
    let mut restart = Vec::new();
    macro_rules! changed { ($($f:ident => $flag:literal),*) => { $( if cur.$f != new.$f { restart.push($flag); } )* } }
    changed!(
        hostname => "--hostname", state_dir => "--state-dir", control_url => "--control-url",
        ephemeral => "--ephemeral", advertise_tags => "--advertise-tags", port => "--port",
        audit_log => "--audit-log", max_sessions => "--max-sessions", shutdown_grace => "--shutdown-grace",
        health_listen => "--health-listen", health_tailnet_port => "--health-tailnet-port",
        log_format => "--log-format", tsnet_log => "--tsnet-log",
        audit_statement_text => "--audit-statement-text"
    );
    // The signing key and its cadence belong to the running writer.
    let key = |c: &Config| {
        c.audit_checkpoints.as_ref().map(|k| (k.signer.public_key().to_owned(), k.every, k.interval))
    };
    if key(cur) != key(&new) {
        restart.push("--audit-signing-key");
    }
    if cur.ports() != new.ports() {
        restart.push("[[route]] port");
    }
    if !restart.is_empty() {
        tracing::warn!(settings = ?restart, "changed, but these take effect only at a restart");
    }
    shared.metrics.identity_cas(settings.identity_cas());
    shared.settings.replace(settings);
    if let Some(k) = cert {
        client_tls.replace(k);
        shared.metrics.client_cert(client_tls.not_after());
        tracing::info!("client TLS certificate reloaded");
    }
    Ok(new)
}
