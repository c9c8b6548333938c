//! tailgres: a PostgreSQL proxy that is its own node on a Tailscale tailnet.
//!
//! The session pipeline, one module per stage, in order (see
//! `shared/design/architecture.md`); [`session`] runs them for one client:
//!
//! 1. accept       — [`server`]: the accept loop over a [`tailnet::TailnetListener`]
//! 2. identify     — [`tailnet::Tailnet::whois`] → [`tailnet::PeerIdentity`]
//! 3. negotiate    — [`negotiate`]: SSL/GSSENC requests, direct TLS, cancel, startup
//! 4. authorize    — (capability grants; not yet)
//! 5. upstream     — [`upstream`]: SSLRequest, one byte, rustls verify-full
//! 6. authenticate — [`authenticate`]: the adaptive password relay ([`scram`])
//! 7. relay        — [`relay`]: both ways, close propagated, bytes counted
//! 8. audit        — [`audit`]: one writer task, JSON lines, fail closed
//!
//! Around them: [`config`] (flags, env, TOML), [`app`] (the process),
//! [`cancel`] (identity-bound cancel), [`pgwire`] and [`stream`] (wire helpers).
//! Operator commands beside the proxy: [`explain`] (asks the running proxy
//! about a peer) and [`auditcli`] (`tailgres audit`: reads the audit log back).
//! The tailnet is reached only through the [`tailnet::Tailnet`] trait, whose
//! one implementation today is the embedded Go node ([`tailnet::EmbeddedNode`]).
//! `unsafe` lives only in `tailnet::ffi` and `sys`.
#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod auditcli;
pub mod authenticate;
pub mod authorize;
pub mod cancel;
pub mod config;
pub mod explain;
pub mod live;
pub mod negotiate;
pub mod pgwire;
pub mod relay;
pub mod scram;
pub mod server;
pub mod session;
pub mod signals;
pub mod stream;
pub mod sys;
pub mod tailnet;
pub mod upstream;
