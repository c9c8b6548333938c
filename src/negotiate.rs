//! Stage 3, negotiate: the packets a client sends before its
//! StartupMessage (docs/postgres-protocol.md, "Before the
//! StartupMessage"). Yields the client stream (plaintext or TLS) and the
//! parsed StartupMessage, or a CancelRequest.
//!
//! Every refusal is answered with a FATAL ErrorResponse (08P01) on the
//! transport the client is on, then the connection is closed. The caller
//! bounds the whole exchange with a timeout.
#![forbid(unsafe_code)]

use crate::pgwire::{self, sqlstate};
use crate::stream::{ClientStream, Rewind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::TlsAcceptor;

/// How the client reached us (the audit record's type: one type per fact).
pub use crate::audit::ClientTransport;

/// A parsed StartupMessage.
#[derive(Debug, Clone)]
pub struct Startup {
    /// The protocol version code (3.0 = 196608, 3.2 = 196610, ...).
    pub version: u32,
    /// Parameters in the order the client sent them.
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        // The server takes the last occurrence; so do we.
        self.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn user(&self) -> &str {
        self.param("user").unwrap_or("")
    }
    /// The database, defaulting to the user name as the server does.
    pub fn database(&self) -> &str {
        self.param("database").unwrap_or_else(|| self.user())
    }
    pub fn application_name(&self) -> Option<&str> {
        self.param("application_name")
    }
    /// Replaces the user and database with `user` and `database` (one
    /// occurrence each, where the first user or database was).
    pub fn set_names(&mut self, user: &str, database: &str) {
        let mut seen = (false, false);
        let mut params = Vec::with_capacity(self.params.len() + 1);
        for (k, v) in self.params.drain(..) {
            match k.as_str() {
                "user" if !seen.0 => {
                    seen.0 = true;
                    params.push((k, user.to_string()));
                }
                "database" if !seen.1 => {
                    seen.1 = true;
                    params.push((k, database.to_string()));
                }
                "user" | "database" => {}
                _ => params.push((k, v)),
            }
        }
        if !seen.1 {
            params.push(("database".to_string(), database.to_string()));
        }
        self.params = params;
    }
    pub fn protocol_label(&self) -> String {
        format!("{}.{}", self.version >> 16, self.version & 0xffff)
    }
    /// The packet to send upstream (re-encoded from the parsed parameters).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut body = self.version.to_be_bytes().to_vec();
        for (k, v) in &self.params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }
}

/// A CancelRequest as the client sent it, or as a fleet member passed it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: u32,
    pub key: Vec<u8>,
    /// A fleet cancel: the address of the client that sent it to the
    /// member that passed it on (who that member is, is checked before
    /// this is believed).
    pub on_behalf_of: Option<std::net::SocketAddr>,
}

pub enum Negotiated<S> {
    Startup {
        stream: ClientStream<S>,
        startup: Startup,
        transport: ClientTransport,
    },
    /// The stream is kept so that, once the cancel is handled, it is
    /// closed as PostgreSQL closes it: with a TLS close_notify on a TLS
    /// connection (libpq 17+ reports an error for a bare close there).
    Cancel {
        stream: ClientStream<S>,
        request: CancelRequest,
        transport: ClientTransport,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("client closed the connection during negotiation")]
    Closed,
    #[error("reading from the client: {0}")]
    Io(#[source] std::io::Error),
    #[error("client protocol error: {0}")]
    Protocol(String),
    #[error("client TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
}

/// At most this many pre-startup requests (SSL, GSSENC) before a
/// StartupMessage; a client looping on them is refused.
const MAX_PRE_STARTUP: usize = 4;

fn io_err(e: std::io::Error) -> NegotiateError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => NegotiateError::Closed,
        _ => NegotiateError::Io(e),
    }
}

/// A hang-up in the middle of the TLS handshake is a hang-up, not a TLS
/// failure (e.g. a probe that only checks the port answers).
fn tls_err(e: std::io::Error) -> NegotiateError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => NegotiateError::Closed,
        _ => NegotiateError::Tls(e),
    }
}

/// Runs negotiation on a fresh client connection. `tls` is the acceptor for
/// clients that ask for TLS (SSLRequest or direct TLS); `None` answers 'N'.
pub async fn negotiate<S>(stream: S, tls: Option<&TlsAcceptor>) -> Result<Negotiated<S>, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut plain = Rewind::new(stream);
    let mut first = [0u8; 4];
    plain.read_exact(&mut first).await.map_err(io_err)?;

    let (mut s, mut transport, mut header) = if first[0] == pgwire::TLS_HANDSHAKE_BYTE {
        // Direct TLS (PostgreSQL 17+ sslnegotiation=direct): the bytes are
        // the start of a ClientHello; replay them into the TLS handshake.
        let Some(acceptor) = tls else {
            return Err(NegotiateError::Protocol("direct TLS requested but TLS is disabled".into()));
        };
        let rewound = Rewind::with_prefix(plain.into_inner(), first.to_vec());
        let tls_stream = acceptor.accept(rewound).await.map_err(tls_err)?;
        let alpn_ok = tls_stream.get_ref().1.alpn_protocol() == Some(pgwire::ALPN_POSTGRESQL);
        let mut s = ClientStream::Tls(Box::new(tls_stream));
        if !alpn_ok {
            // PostgreSQL requires ALPN "postgresql" on direct TLS so that a
            // TLS connection meant for another protocol is never taken for
            // ours; so do we.
            return refuse(&mut s, "direct TLS connection without ALPN \"postgresql\"").await;
        }
        (s, ClientTransport::DirectTls, None)
    } else {
        (ClientStream::Plain(plain), ClientTransport::Plaintext, Some(first))
    };

    // The same loop whichever way the client came in: inside TLS (after an
    // SSLRequest or direct), a further SSLRequest or GSSENCRequest is
    // answered 'N', as for a server with nothing more to offer.
    let mut requests = 0;
    loop {
        match read_packets(&mut s, header.take(), requests).await? {
            Step::Startup(startup) => return Ok(Negotiated::Startup { stream: s, startup, transport }),
            Step::Cancel(request) => return Ok(Negotiated::Cancel { stream: s, request, transport }),
            Step::GssEncRequest => {
                requests += 1;
                // No GSSAPI encryption here: 'N', and the client continues
                // on the same connection (closing it breaks Kerberos users).
                write(&mut s, b"N").await?;
            }
            Step::SslRequest => {
                requests += 1;
                let (mut plain, acceptor) = match (s, tls) {
                    (ClientStream::Plain(plain), Some(a)) => (plain, a),
                    // No TLS configured, or an SSLRequest inside TLS.
                    (other, _) => {
                        s = other;
                        write(&mut s, b"N").await?;
                        continue;
                    }
                };
                // CVE-2021-23214: a client must wait for our 'S' before it
                // sends anything. Bytes already here were sent in the clear
                // and must never be read as if they had come through TLS.
                if has_buffered_bytes(&mut plain) {
                    let mut p = ClientStream::Plain(plain);
                    return refuse(&mut p, "received unencrypted data after SSL request").await;
                }
                plain.write_all(b"S").await.map_err(io_err)?;
                plain.flush().await.map_err(io_err)?;
                let tls_stream = acceptor.accept(plain).await.map_err(tls_err)?;
                s = ClientStream::Tls(Box::new(tls_stream));
                transport = ClientTransport::Tls;
            }
        }
    }
}

/// One pre-startup packet, parsed.
enum Step {
    SslRequest,
    GssEncRequest,
    Startup(Startup),
    Cancel(CancelRequest),
}

async fn write<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut ClientStream<S>,
    bytes: &[u8],
) -> Result<(), NegotiateError> {
    s.write_all(bytes).await.map_err(io_err)?;
    s.flush().await.map_err(io_err)
}

/// Sends FATAL 08P01 with `why` and returns the matching error.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin, T>(
    s: &mut ClientStream<S>,
    why: &str,
) -> Result<T, NegotiateError> {
    let _ = s.write_all(&pgwire::fatal(sqlstate::PROTOCOL_VIOLATION, why)).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
    linger(s).await;
    Err(NegotiateError::Protocol(why.to_string()))
}

/// How long a refused client's remaining input is read and discarded.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and discards what the client is still sending (say the rest of an
/// oversized packet) for a moment before the connection is dropped: closing
/// a socket with unread input sends a reset, and a reset can destroy the
/// ErrorResponse before the client reads it.
async fn linger<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads one pre-startup packet (its first 4 bytes may already be read).
async fn read_packets<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut ClientStream<S>,
    header: Option<[u8; 4]>,
    requests: usize,
) -> Result<Step, NegotiateError> {
    let len_bytes = match header {
        Some(h) => h,
        None => {
            let mut h = [0u8; 4];
            s.read_exact(&mut h).await.map_err(io_err)?;
            h
        }
    };
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len < 8 {
        return refuse(s, &format!("invalid startup packet length {len}")).await;
    }
    if len > pgwire::MAX_STARTUP_PACKET {
        return refuse(
            s,
            &format!("startup packet too long ({len} bytes, limit {})", pgwire::MAX_STARTUP_PACKET),
        )
        .await;
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.map_err(io_err)?;
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    let rest = &body[4..];
    match code {
        pgwire::SSL_REQUEST | pgwire::GSSENC_REQUEST => {
            if len != 8 {
                return refuse(s, "invalid length of SSL/GSSENC request").await;
            }
            if requests >= MAX_PRE_STARTUP {
                return refuse(s, "too many SSL/GSSENC requests").await;
            }
            Ok(if code == pgwire::SSL_REQUEST { Step::SslRequest } else { Step::GssEncRequest })
        }
        pgwire::CANCEL_REQUEST => {
            // pid (4) + key (4 in 3.0, 4..=256 in 3.2)
            if rest.len() < 8 || rest.len() > 4 + pgwire::MAX_CANCEL_KEY {
                return refuse(s, "invalid length of cancel request").await;
            }
            let pid = u32::from_be_bytes(rest[..4].try_into().unwrap());
            Ok(Step::Cancel(CancelRequest { pid, key: rest[4..].to_vec(), on_behalf_of: None }))
        }
        pgwire::FLEET_CANCEL_REQUEST => {
            // pid (4) + the client's address (16 + 2) + key (4..=256)
            if rest.len() < 4 + 18 + 4 || rest.len() > 4 + 18 + pgwire::MAX_CANCEL_KEY {
                return refuse(s, "invalid length of fleet cancel request").await;
            }
            let (pid, rest) = rest.split_at(4);
            let (ip, rest) = rest.split_at(16);
            let (port, key) = rest.split_at(2);
            let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(ip).unwrap_or_default());
            let ip = ip.to_ipv4_mapped().map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
            let port = u16::from_be_bytes([port[0], port[1]]);
            Ok(Step::Cancel(CancelRequest {
                pid: u32::from_be_bytes(pid.try_into().unwrap_or_default()),
                key: key.to_vec(),
                on_behalf_of: Some(std::net::SocketAddr::new(ip, port)),
            }))
        }
        v if v >> 16 == 3 => match parse_params(rest) {
            Ok(params) => {
                let startup = Startup { version: v, params };
                if startup.user().is_empty() {
                    return refuse(s, "no PostgreSQL user name specified in startup packet").await;
                }
                Ok(Step::Startup(startup))
            }
            Err(why) => refuse(s, &why).await,
        },
        v => {
            refuse(
                s,
                &format!("unsupported frontend protocol {}.{}: tailgres supports 3.x", v >> 16, v & 0xffff),
            )
            .await
        }
    }
}

/// `name\0value\0 ... \0`, names non-empty, UTF-8.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, String> {
    let bad = || "invalid startup packet layout: expected terminator as last byte".to_string();
    let mut params = Vec::new();
    loop {
        let end = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        if end == 0 {
            if rest.len() != 1 {
                return Err(bad());
            }
            return Ok(params);
        }
        let name = std::str::from_utf8(&rest[..end])
            .map_err(|_| "startup parameter name is not UTF-8".to_string())?;
        rest = &rest[end + 1..];
        let vend = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        let value = std::str::from_utf8(&rest[..vend])
            .map_err(|_| format!("startup parameter {name:?} is not UTF-8"))?;
        params.push((name.to_string(), value.to_string()));
        rest = &rest[vend + 1..];
    }
}

/// Whether bytes are already readable on the stream without waiting: a
/// single poll with a no-op waker (nothing is consumed if Pending; if
/// Ready, the bytes were sent in the clear before our answer).
fn has_buffered_bytes<S: AsyncRead + Unpin>(s: &mut Rewind<S>) -> bool {
    if s.has_prefix() {
        return true;
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    match Pin::new(s).poll_read(&mut cx, &mut buf) {
        Poll::Ready(Ok(())) => !buf.filled().is_empty(),
        Poll::Ready(Err(_)) => false, // the error resurfaces on the next read
        Poll::Pending => false,
    }
}

/// Shared TLS acceptor for clients, built once (session resumption on).
pub fn acceptor(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

#[cfg(test)]
mod tests;
