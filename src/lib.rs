//! tailgres: a PostgreSQL proxy that is its own node on a Tailscale tailnet.
//!
//! The session pipeline, one module per stage, in order (see
//! `docs/architecture.md`, "The session pipeline"); [`session`] runs them for one client:
//!
//! 1. accept       — [`server`]: the accept loop over a [`tailnet::Listener`]
//! 2. identify     — [`tailnet::Tailnet::whois`] → [`tailnet::PeerIdentity`]
//! 3. negotiate    — [`negotiate`]: SSL/GSSENC requests, direct TLS, cancel, startup
//! 4. authorize    — [`authorize`]: capability grants; then the route ([`settings`])
//! 5. upstream     — [`upstream`]: SSLRequest, one byte, rustls verify-full (with
//!    a certificate [`identity_login`] signed, for identity login)
//! 6. authenticate — [`authenticate`]: the adaptive password relay ([`scram`]), or
//!    SCRAM from the role's stored verifier on both legs ([`verifier`],
//!    fetched by [`lookup`]; `--auth scram-verifier`, whose client half runs
//!    before stage 5)
//! 7. relay        — [`relay`]: both ways, close propagated, bytes counted
//! 8. audit        — [`audit`]: one writer thread, JSON lines, fail closed
//!
//! Around them: [`config`] (flags, env, TOML), [`settings`] (what SIGHUP
//! reloads), [`app`] (the process: drain, reload), [`cancel`] (identity-bound
//! cancel), [`live`] (revocation), [`client_tls`], [`health`] and [`metrics`]
//! (/healthz, /readyz, /metrics), [`pgwire`] and [`stream`]; for fleet mode
//! (a Tailscale Service), [`proxy_header`] (the PROXY v2 header of
//! Tailscale's forwarder) and [`sys::peer_is_own_socket`].
//! Operator commands beside the proxy: [`explain`] (asks the running proxy
//! about a peer) and [`auditcli`] (`tailgres audit`: reads the audit log back).
//! The tailnet is reached only through the [`tailnet::Tailnet`] trait: the
//! embedded Go node ([`tailnet::EmbeddedNode`]) in the product, an in-memory
//! tailnet ([`tailnet::memory`]) in the in-process tests.
//! `unsafe` lives only in `tailnet::ffi` and `sys`.
#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod auditcli;
pub mod authenticate;
pub mod authorize;
pub mod cancel;
pub mod client_tls;
pub mod config;
pub mod context;
pub mod explain;
pub mod fleet;
pub mod health;
pub mod identity_login;
pub mod live;
pub mod lookup;
pub mod metrics;
pub mod negotiate;
pub mod pgwire;
pub mod proxy_header;
pub mod refusal;
pub mod relay;
pub mod scram;
pub mod server;
pub mod service;
pub mod session;
pub mod settings;
pub mod signals;
pub mod statements;
pub mod stream;
pub mod sys;
pub mod tailnet;
pub mod upstream;
pub mod verifier;
