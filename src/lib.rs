//! tailgres: a PostgreSQL proxy that is its own node on a Tailscale tailnet.
//!
//! The session pipeline, one module per stage, in order (see
//! `shared/design/architecture.md`):
//!
//! 1. accept    — [`tailnet::TailnetListener`] yields `(stream, peer address)`
//! 2. identify  — [`tailnet::Tailnet::whois`] turns the address into a
//!    [`tailnet::PeerIdentity`]
//! 3. negotiate, 4. authorize, 5. upstream, 6. authenticate, 7. relay,
//!    8. audit — the proxy proper (built on this foundation)
//!
//! The tailnet is reached only through the [`tailnet::Tailnet`] trait, whose
//! one implementation today is the embedded Go node ([`tailnet::EmbeddedNode`]).
//! `unsafe` lives only in `tailnet::ffi` and `sys`.
#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod authenticate;
pub mod cancel;
pub mod config;
pub mod negotiate;
pub mod pgwire;
pub mod relay;
pub mod server;
pub mod session;
pub mod scram;
pub mod signals;
pub mod stream;
pub mod sys;
pub mod tailnet;
pub mod upstream;
