//! Fleet mode's first bytes: the PROXY protocol v2 header that Tailscale's
//! Service forwarder puts in front of every connection it hands us.
//!
//! With several nodes serving one Tailscale Service (issue #18), tsnet's
//! `ListenService` (TCP mode, `PROXYProtocolVersion: 2`) accepts a Service
//! connection in the node's netstack, dials a loopback listener of ours and
//! writes a v2 header whose source is the client's tailnet address and
//! whose destination is this node's tailnet IP and the loopback listener's
//! port (`ipn/ipnlocal/serve.go`, `forwardTCPWithProxyProtocol`, built with
//! `github.com/pires/go-proxyproto`): always the command PROXY, the family
//! TCP4 or TCP6 (as the client's address, unmapped), and no TLVs, so 28 or
//! 52 bytes. The PostgreSQL bytes follow at once.
//!
//! The loopback port is reachable by any local process: the caller first
//! checks that the connecting socket is our own forwarder's
//! ([`crate::sys::peer_is_own_socket`]), then reads the header here, then
//! checks the source with [`is_tailnet_address`].
//!
//! Sans-IO and strict ([`parse`]): version 2 only (a v1 text header is
//! refused), the PROXY command only (LOCAL carries no client), TCP over IPv4
//! or IPv6 only, at most [`MAX_BODY`] bytes of addresses and TLVs. TLVs are
//! skipped but must be well formed (each inside the declared length); a
//! CRC32C TLV (type 0x03) is verified and a wrong one refused (Tailscale
//! sends none; verifying costs nothing when it is absent). [`read_header`]
//! reads exactly the header from a stream, never a byte of what follows.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family and the 2-byte length.
pub const FIXED_LEN: usize = 16;
/// The most bytes of addresses and TLVs accepted after the fixed part
/// (Tailscale sends 12 or 36).
pub const MAX_BODY: usize = 512;
/// The longest header [`parse`] accepts.
pub const MAX_HEADER: usize = FIXED_LEN + MAX_BODY;

/// Version 2 in the high nibble, command PROXY in the low one.
pub const PROXY_V2: u8 = 0x21;
/// Version 2, command LOCAL (health checks; no client address).
pub const LOCAL_V2: u8 = 0x20;
/// TCP over IPv4 (address block of 12 bytes).
pub const TCP4: u8 = 0x11;
/// TCP over IPv6 (address block of 36 bytes).
pub const TCP6: u8 = 0x21;
/// The TLV type of a CRC32C of the whole header.
pub const TLV_CRC32C: u8 = 0x03;

const TCP4_BLOCK: usize = 12;
const TCP6_BLOCK: usize = 36;

/// A whole, valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client, as the forwarder saw it (its tailnet address).
    pub source: SocketAddr,
    /// Where the client connected (this node's tailnet IP; with Tailscale's
    /// forwarder, the port is the loopback listener's, not the Service's).
    pub destination: SocketAddr,
    /// The header's length in bytes: what follows belongs to PostgreSQL.
    pub len: usize,
}

/// What [`parse`] makes of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Valid so far; the header is at least `at_least` bytes in all (more
    /// than the bytes given, and never more than the header really is, so
    /// reading up to it never reads past the header).
    NeedMore { at_least: usize },
    /// The whole header is in the bytes given.
    Header(ProxyHeader),
}

/// Why a connection's first bytes are not an acceptable header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("a PROXY protocol v1 (text) header: only v2 (binary) is accepted")]
    VersionOne,
    #[error("no PROXY protocol v2 signature: byte {offset} is {byte:#04x}, not {expected:#04x}")]
    Signature { offset: usize, byte: u8, expected: u8 },
    #[error("PROXY protocol version {0}: only version 2 is accepted")]
    Version(u8),
    #[error("PROXY protocol LOCAL command (no client address): only PROXY is accepted")]
    Local,
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    #[error("PROXY protocol address family {name} ({byte:#04x}): only TCP over IPv4 or IPv6 is accepted")]
    Family { byte: u8, name: &'static str },
    #[error(
        "PROXY protocol header declares {len} bytes of addresses and TLVs, more than the {max} accepted"
    )]
    TooLong { len: usize, max: usize },
    #[error("PROXY protocol header declares {len} bytes, fewer than the {need} of a {family} address block")]
    Truncated { family: &'static str, len: usize, need: usize },
    #[error("malformed PROXY protocol TLV at byte {offset}: {reason}")]
    Tlv { offset: usize, reason: String },
    #[error("PROXY protocol header's CRC32C is {declared:#010x}, the header's is {computed:#010x}")]
    Crc { declared: u32, computed: u32 },
    #[error("connection closed after {got} bytes of the PROXY protocol header")]
    Closed { got: usize },
    #[error("no whole PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[source] std::io::Error),
}

fn family_name(byte: u8) -> &'static str {
    match byte {
        0x00 => "UNSPEC",
        0x11 => "TCP4",
        0x12 => "UDP4",
        0x21 => "TCP6",
        0x22 => "UDP6",
        0x31 => "UNIX stream",
        0x32 => "UNIX datagram",
        _ => "unknown",
    }
}

/// Parses the header at the start of `buf`, incrementally: feed it the
/// bytes read so far (from the first byte of the connection) until it
/// returns [`Parsed::Header`] or an error. An error depends only on bytes
/// already given (more bytes never turn it into something else), and is
/// returned as soon as they show it: a connection that does not start
/// with the signature is refused at its first wrong byte. Bytes past the
/// header are not looked at.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let seen = buf.len().min(SIGNATURE.len());
    if let Some(offset) = (0..seen).find(|&i| buf[i] != SIGNATURE[i]) {
        if buf[0] == b'P' {
            // "PROXY TCP4 ..." (v1). Decided on the first byte so the error
            // does not change as more bytes arrive.
            return Err(ProxyHeaderError::VersionOne);
        }
        return Err(ProxyHeaderError::Signature { offset, byte: buf[offset], expected: SIGNATURE[offset] });
    }
    if let Some(&ver_cmd) = buf.get(12) {
        match (ver_cmd >> 4, ver_cmd & 0x0f) {
            (2, 1) => {}
            (2, 0) => return Err(ProxyHeaderError::Local),
            (2, c) => return Err(ProxyHeaderError::Command(c)),
            (v, _) => return Err(ProxyHeaderError::Version(v)),
        }
    }
    let block = match buf.get(13) {
        Some(&TCP4) => Some(("TCP4", TCP4_BLOCK)),
        Some(&TCP6) => Some(("TCP6", TCP6_BLOCK)),
        Some(&byte) => return Err(ProxyHeaderError::Family { byte, name: family_name(byte) }),
        None => None,
    };
    let (Some((family, need)), Some(len)) = (block, buf.get(14..16)) else {
        return Ok(Parsed::NeedMore { at_least: FIXED_LEN });
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > MAX_BODY {
        return Err(ProxyHeaderError::TooLong { len, max: MAX_BODY });
    }
    if len < need {
        return Err(ProxyHeaderError::Truncated { family, len, need });
    }
    let total = FIXED_LEN + len;
    let Some(header) = buf.get(..total) else {
        return Ok(Parsed::NeedMore { at_least: total });
    };
    let body = &header[FIXED_LEN..];
    let addresses = if need == TCP4_BLOCK {
        address_block::<4>(body).map(|(s, d, sp, dp)| ((Ipv4Addr::from(s).into(), sp), (Ipv4Addr::from(d).into(), dp)))
    } else {
        address_block::<16>(body).map(|(s, d, sp, dp)| ((Ipv6Addr::from(s).into(), sp), (Ipv6Addr::from(d).into(), dp)))
    };
    // (`len >= need` above: the block is always there.)
    let Some(((s, sp), (d, dp))) = addresses else {
        return Err(ProxyHeaderError::Truncated { family, len, need });
    };
    let (source, destination) = (SocketAddr::new(s, sp), SocketAddr::new(d, dp));
    check_tlvs(header, FIXED_LEN + need)?;
    Ok(Parsed::Header(ProxyHeader { source, destination, len: total }))
}

/// An address block of `N`-byte addresses: source, destination, then their
/// ports.
fn address_block<const N: usize>(body: &[u8]) -> Option<([u8; N], [u8; N], u16, u16)> {
    let (s, rest) = body.split_first_chunk::<N>()?;
    let (d, rest) = rest.split_first_chunk::<N>()?;
    let (sp, rest) = rest.split_first_chunk::<2>()?;
    let (dp, _) = rest.split_first_chunk::<2>()?;
    Some((*s, *d, u16::from_be_bytes(*sp), u16::from_be_bytes(*dp)))
}

/// Walks the TLVs of `header` from `at` to its end: each must lie inside
/// the header; a CRC32C TLV (at most one) must hold the header's CRC.
fn check_tlvs(header: &[u8], mut at: usize) -> Result<(), ProxyHeaderError> {
    let tlv_err = |offset: usize, reason: String| ProxyHeaderError::Tlv { offset, reason };
    let mut crc_at = None;
    while at < header.len() {
        let left = header.len() - at;
        if left < 3 {
            return Err(tlv_err(
                at,
                format!("{left} byte(s) left, fewer than a TLV's 3-byte type and length"),
            ));
        }
        let kind = header[at];
        let len = usize::from(u16::from_be_bytes([header[at + 1], header[at + 2]]));
        if len > left - 3 {
            return Err(tlv_err(
                at,
                format!("type {kind:#04x} declares {len} bytes of value, only {} left", left - 3),
            ));
        }
        if kind == TLV_CRC32C {
            if len != 4 {
                return Err(tlv_err(at, format!("CRC32C value of {len} bytes, not 4")));
            }
            if crc_at.is_some() {
                return Err(tlv_err(at, "a second CRC32C".into()));
            }
            crc_at = Some(at + 3);
        }
        at += 3 + len;
    }
    if let Some(v) = crc_at {
        // (Its length was checked to be 4 above.)
        let Some(&declared) = header[v..].first_chunk::<4>() else {
            return Err(tlv_err(v - 3, "CRC32C value cut short".into()));
        };
        let declared = u32::from_be_bytes(declared);
        // The CRC of the whole header with the CRC field itself zeroed.
        let crc = crc32c_update(!0, &header[..v]);
        let crc = crc32c_update(crc, &[0; 4]);
        let computed = !crc32c_update(crc, &header[v + 4..]);
        if declared != computed {
            return Err(ProxyHeaderError::Crc { declared, computed });
        }
    }
    Ok(())
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The CRC32C of `bytes` (as the PROXY protocol's CRC32C TLV holds it).
pub fn crc32c(bytes: &[u8]) -> u32 {
    !crc32c_update(!0, bytes)
}

/// Whether `ip` is a Tailscale address: 100.64.0.0/10 (CGNAT range) or
/// fd7a:115c:a1e0::/48 (an IPv4-mapped IPv6 address is unmapped first).
pub fn is_tailnet_address(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && o[1] & 0xc0 == 64
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
        }
    }
}

/// Reads exactly the header from `stream` (never a byte past it: each read
/// asks for at most what [`parse`] says the header still needs, 16 bytes
/// then the declared rest) within `timeout`. A header that goes wrong is
/// refused at its first wrong byte; an early close is
/// [`ProxyHeaderError::Closed`], a slow one [`ProxyHeaderError::Timeout`].
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let read = async {
        let mut buf = [0u8; MAX_HEADER];
        let mut have = 0;
        loop {
            match parse(&buf[..have])? {
                Parsed::Header(header) => return Ok(header),
                Parsed::NeedMore { at_least } => {
                    let n = stream.read(&mut buf[have..at_least]).await.map_err(ProxyHeaderError::Io)?;
                    if n == 0 {
                        return Err(ProxyHeaderError::Closed { got: have });
                    }
                    have += n;
                }
            }
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

/// Encodes a v2 PROXY header (TCP4 when both addresses are IPv4, else TCP6
/// with IPv4 addresses mapped), followed by `tlvs` (raw, as given): what
/// Tailscale's forwarder sends when `tlvs` is empty. For tests and tools.
pub fn encode(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(PROXY_V2);
    let mut body = Vec::with_capacity(TCP6_BLOCK + tlvs.len());
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP4);
            body.extend(s.octets());
            body.extend(d.octets());
        }
        (s, d) => {
            out.push(TCP6);
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            body.extend(v6(s).octets());
            body.extend(v6(d).octets());
        }
    }
    body.extend(source.port().to_be_bytes());
    body.extend(destination.port().to_be_bytes());
    body.extend(tlvs);
    out.extend(u16::try_from(body.len()).expect("header fits a u16 length").to_be_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests;
