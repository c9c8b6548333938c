//! The tailgres process: builds every shared piece once from the validated
//! [`Config`], joins the tailnet, serves, and handles signals.
#![forbid(unsafe_code)]

use crate::audit::{AuditDest, AuditLog};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::server::{self, ServeOptions};
use crate::session::Shared;
use crate::signals::{Request, Signals};
use crate::tailnet::{EmbeddedNode, NodeConfig, Status, Tailnet, TsnetLog};
use crate::upstream::{UpstreamOptions, UpstreamTls};
use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long live sessions get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);
/// Fetching the tailnet's HTTPS certificate must not hold up the start.
const CERT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(cfg: Config) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut signals = Signals::new().context("installing signal handlers")?;

    // Everything that can be checked without the network, first.
    let dest =
        if cfg.audit_log == "-" { AuditDest::Stdout } else { AuditDest::File(cfg.audit_log.clone().into()) };
    let (audit, audit_task) = AuditLog::open(dest).await.context("--audit-log")?;
    let upstream = UpstreamTls::new(&UpstreamOptions {
        addr: cfg.upstream.clone(),
        server_name: cfg.upstream_server_name.clone(),
        ca: cfg.upstream_ca.clone(),
        client_cert: cfg.upstream_client_cert.clone(),
        client_key: cfg.upstream_client_key.clone(),
        direct_tls: cfg.upstream_direct_tls,
        connect_timeout: cfg.connect_timeout,
    })?;

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
    let node = tokio::select! {
        n = EmbeddedNode::start(node_cfg) => n?,
        _ = signals.recv() => anyhow::bail!("stopped while joining the tailnet"),
    };
    let status = node.status().await?;
    let client_tls = client_tls_config(&cfg, &node, &status).await?;
    let listener = node.listen(cfg.port)?;
    tracing::info!(address = %format!("{}:{}", status.dns_name, cfg.port), upstream = %cfg.upstream, "tailgres ready");

    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        upstream,
        client_tls: Some(tokio_rustls::TlsAcceptor::from(client_tls)),
        audit: audit.clone(),
        cancels: CancelRegistry::default(),
        auth_mode: cfg.auth,
        policy: cfg.policy.clone(),
        per_identity: Default::default(),
        live: Default::default(),
        directory: Default::default(),
        identity_settings: cfg.identity_settings,
        handshake_timeout: cfg.handshake_timeout,
        shutdown: stop_rx,
    });
    let node = Arc::new(node);
    let shutdown = async {
        loop {
            match signals.recv().await {
                Request::Shutdown => break,
                Request::Reload => {
                    tracing::info!("SIGHUP: reopening the audit log");
                    audit.reopen();
                }
            }
        }
    };
    let follower = tokio::spawn(crate::live::follow(node.clone(), shared.clone()));
    let explain_socket = cfg.state_dir.join(crate::explain::SOCKET_NAME);
    let explainer = tokio::spawn(crate::explain::serve(explain_socket, node.clone(), shared.clone()));
    server::serve(
        listener,
        node.clone(),
        shared.clone(),
        stop_tx,
        ServeOptions { max_sessions: cfg.max_sessions, drain: DRAIN },
        shutdown,
    )
    .await;
    let _ = follower.await;
    if let Ok(Err(e)) = explainer.await {
        tracing::warn!(error = %e, "the explain socket failed");
    }
    node.shutdown().await;
    drop(shared);
    audit.close().await;
    let _ = audit_task.await;
    tracing::info!("tailgres stopped");
    Ok(())
}

/// TLS for clients that ask for it: the configured certificate, else the
/// tailnet's HTTPS certificate for our MagicDNS name, else a self-signed one
/// (the client leg runs inside WireGuard either way).
async fn client_tls_config(
    cfg: &Config,
    node: &EmbeddedNode,
    st: &Status,
) -> Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = if let Some((cert, key)) = &cfg.client_tls {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("--client-tls-cert {}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|_| {
            anyhow::anyhow!("--client-tls-key {}: not a readable PEM private key", key.display())
        })?;
        tracing::info!(cert = %cert.display(), "client TLS: configured certificate");
        (certs, key)
    } else if st.cert_domains.iter().any(|d| d == &st.dns_name) {
        match tokio::time::timeout(CERT_FETCH_TIMEOUT, node.cert_pair(&st.dns_name)).await {
            Ok(Ok(pair)) => {
                let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
                    .map_err(|_| anyhow::anyhow!("the tailnet's certificate key is not PEM"))?;
                tracing::info!(name = %st.dns_name, "client TLS: the tailnet's HTTPS certificate");
                (certs, key)
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {CERT_FETCH_TIMEOUT:?}"),
                };
                tracing::warn!(name = %st.dns_name, error = %why, "client TLS: no tailnet certificate; using a self-signed one");
                self_signed(st)?
            }
        }
    } else {
        tracing::info!(name = %st.dns_name, "client TLS: self-signed (the tailnet offers no HTTPS certificate)");
        self_signed(st)?
    };
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("client TLS certificate and key do not match")?;
    // Direct TLS (PostgreSQL 17+) requires ALPN "postgresql".
    config.alpn_protocols = vec![crate::pgwire::ALPN_POSTGRESQL.to_vec()];
    // Resumption: the default in-memory session cache, plus tickets.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

fn self_signed(st: &Status) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut names = vec![st.dns_name.clone()];
    names.extend(st.tailscale_ips.iter().map(|ip| ip.to_string()));
    let cert = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der()).map_err(|e| anyhow::anyhow!(e))?;
    Ok((vec![CertificateDer::from(cert.cert.der().to_vec())], key))
}
