//! The handful of PostgreSQL wire-protocol pieces the proxy touches, built
//! and parsed by hand (see docs/postgres-protocol.md, "Framing"). All integers
//! are big-endian and every length includes itself.
#![forbid(unsafe_code)]

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Pre-startup request codes (the "protocol version" field).
pub const SSL_REQUEST: u32 = 80877103;
/// The whole SSLRequest packet: Int32 length 8, Int32 [`SSL_REQUEST`].
pub const SSL_REQUEST_PACKET: [u8; 8] = {
    let c = SSL_REQUEST.to_be_bytes();
    [0, 0, 0, 8, c[0], c[1], c[2], c[3]]
};
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
/// A cancel one tailgres fleet member passes to another, on behalf of the
/// client that sent it (1234/5700: not a PostgreSQL code; only tailgres
/// sends or accepts it, and only from a fleet member).
pub const FLEET_CANCEL_REQUEST: u32 = (1234 << 16) | 5700;
/// Protocol 3.0 and 3.2 (PostgreSQL 18) startup versions.
pub const PROTOCOL_3_0: u32 = 196608;
pub const PROTOCOL_3_2: u32 = 196610;
/// The server's own cap on a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10000;
/// A TLS handshake record starts with this byte: direct TLS (PG 17+).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// The ALPN protocol PostgreSQL 17 requires on direct TLS, both ways.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// Cancel keys: 4 bytes in protocol 3.0, up to 256 in 3.2.
pub const MAX_CANCEL_KEY: usize = 256;

/// Authentication request codes inside 'R' messages.
pub mod auth {
    pub const OK: u32 = 0;
    pub const CLEARTEXT: u32 = 3;
    pub const MD5: u32 = 5;
    /// AuthenticationGSSContinue (GSSAPI and SSPI): the last one of a
    /// mutual authentication expects no answer from the client.
    pub const GSS_CONTINUE: u32 = 8;
    pub const SASL: u32 = 10;
    pub const SASL_CONTINUE: u32 = 11;
    pub const SASL_FINAL: u32 = 12;
}

/// SQLSTATE codes tailgres sends.
pub mod sqlstate {
    /// protocol_violation
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// connection_failure (upstream unreachable / unverifiable)
    pub const CONNECTION_FAILURE: &str = "08006";
    /// sqlclient_unable_to_establish_sqlconnection
    pub const CANNOT_CONNECT: &str = "08001";
    /// invalid_authorization_specification
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_password
    pub const INVALID_PASSWORD: &str = "28P01";
    /// insufficient_privilege
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// too_many_connections
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// idle_session_timeout (PostgreSQL 14+ uses it for the same event)
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// invalid_catalog_name (no such database)
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// cannot_connect_now
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// internal_error
    pub const INTERNAL_ERROR: &str = "XX000";
    /// feature_not_supported
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// An ErrorResponse ('E') with severity FATAL.
pub fn fatal(code: &str, message: &str) -> Vec<u8> {
    error_response("FATAL", code, message, None)
}

/// An ErrorResponse with an optional hint.
pub fn error_response(severity: &str, code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + message.len());
    for (tag, val) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
        push_field(&mut body, tag, val);
    }
    if let Some(h) = hint {
        push_field(&mut body, b'H', h);
    }
    body.push(0);
    message_bytes(b'E', &body)
}

fn push_field(body: &mut Vec<u8>, tag: u8, val: &str) {
    body.push(tag);
    // A NUL inside a field would end it early on the client side.
    body.extend(val.bytes().filter(|&b| b != 0));
    body.push(0);
}

/// A typed message: type byte, Int32 length (including itself), body.
pub fn message_bytes(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An 'R' authentication request with a code and extra data.
pub fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message_bytes(b'R', &body)
}

/// A typed message read from a stream.
#[derive(Debug)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    pub fn to_bytes(&self) -> Vec<u8> {
        message_bytes(self.tag, &self.body)
    }
    /// The Int32 at the start of the body (auth code of an 'R').
    pub fn code(&self) -> Option<u32> {
        self.body.get(..4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
}

/// Reads one typed message, refusing bodies longer than `max`.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Message> {
    let tag = r.read_u8().await?;
    let len = r.read_u32().await? as usize;
    if len < 4 || len - 4 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message '{}' has invalid length {len}", tag as char),
        ));
    }
    let mut body = vec![0; len - 4];
    r.read_exact(&mut body).await?;
    Ok(Message { tag, body })
}

/// The fields of an ErrorResponse/NoticeResponse body, in order, up to the
/// terminating zero: (type, value, whether the value's own terminator was
/// there — a body cut short ends in a value without one).
pub fn fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8], bool)> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&tag, tail) = rest.split_first()?;
        if tag == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0);
        let value = &tail[..end.unwrap_or(tail.len())];
        rest = end.map_or(&[][..], |e| &tail[e + 1..]);
        Some((tag, value, end.is_some()))
    })
}

/// Fields of an ErrorResponse/NoticeResponse body: (code, message).
pub fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    let (mut code, mut msg) = (None, None);
    for (tag, value, _) in fields(body) {
        let val = String::from_utf8_lossy(value).into_owned();
        match tag {
            b'C' => code = Some(val),
            b'M' => msg = Some(val),
            _ => {}
        }
    }
    (code, msg)
}

/// A CancelRequest packet (protocol 3.0 keys are 4 bytes, 3.2 up to 256).
pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + key.len());
    out.extend_from_slice(&((12 + key.len()) as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// A fleet cancel: pid, the client's address (16 bytes, IPv4 as
/// ::ffff:a.b.c.d; then the port), then the key.
pub fn fleet_cancel_request(pid: u32, key: &[u8], client: std::net::SocketAddr) -> Vec<u8> {
    let ip = match client.ip() {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
        std::net::IpAddr::V6(a) => a,
    };
    let len = 8 + 4 + 18 + key.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&FLEET_CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_is_well_formed() {
        let b = fatal("08P01", "bad\0thing");
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes(b[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, b.len());
        let (code, msg) = error_fields(&b[5..]);
        assert_eq!(code.as_deref(), Some("08P01"));
        assert_eq!(msg.as_deref(), Some("badthing"));
    }

    #[tokio::test]
    async fn read_message_bounds_length() {
        let cases: &[(&[u8], bool)] = &[
            (&[b'Z', 0, 0, 0, 5, b'I'], true),
            (&[b'Z', 0, 0, 0, 3], false),             // shorter than itself
            (&[b'Z', 0x7f, 0xff, 0xff, 0xff], false), // 2 GiB
            (&[b'Z', 0, 0, 0, 9, 1], false),          // truncated body
        ];
        for (input, ok) in cases {
            let mut r = *input;
            assert_eq!(read_message(&mut r, 1024).await.is_ok(), *ok, "{input:?}");
        }
    }

    #[test]
    fn cancel_packet_layout() {
        let p = cancel_request(7, &[1, 2, 3, 4]);
        assert_eq!(p.len(), 16);
        assert_eq!(&p[..4], &16u32.to_be_bytes());
        assert_eq!(&p[4..8], &CANCEL_REQUEST.to_be_bytes());
    }
}
