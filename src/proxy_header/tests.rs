use super::*;
use std::time::Duration;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

/// What Tailscale v1.102.5's forwarder sends (go-proxyproto v0.8.1's
/// `Header.Format`, as `forwardTCPWithProxyProtocol` fills it in) for a
/// client 100.101.102.103:54321 reaching a node 100.64.0.7 whose loopback
/// listener is port 40123; produced by that library.
const TAILSCALE_V4: &str = "0d0a0d0a000d0a515549540a2111000c6465666764400007d4319cbb";
/// The same over IPv6: fd7a:115c:a1e0::1234 to fd7a:115c:a1e0::7.
const TAILSCALE_V6: &str =
    "0d0a0d0a000d0a515549540a21210024fd7a115ca1e000000000000000001234fd7a115ca1e000000000000000000007d4319cbb";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4() -> Vec<u8> {
    encode(sa("100.101.102.103:54321"), sa("100.64.0.7:40123"), &[])
}

fn header(buf: &[u8]) -> ProxyHeader {
    match parse(buf) {
        Ok(Parsed::Header(h)) => h,
        other => panic!("expected a header from {buf:?}, got {other:?}"),
    }
}

fn err(buf: &[u8]) -> ProxyHeaderError {
    match parse(buf) {
        Err(e) => e,
        other => panic!("expected an error from {buf:?}, got {other:?}"),
    }
}

/// A v4 header with these TLV bytes after the addresses.
fn with_tlvs(tlvs: &[u8]) -> Vec<u8> {
    encode(sa("100.101.102.103:54321"), sa("100.64.0.7:40123"), tlvs)
}

/// A v4 header with `before`, then a CRC32C TLV holding the right CRC
/// (xor `flip`), then `after`.
fn with_crc(before: &[u8], after: &[u8], flip: u32) -> Vec<u8> {
    let mut tlvs = before.to_vec();
    tlvs.extend([TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
    let at = FIXED_LEN + TCP4_BLOCK + before.len() + 3;
    tlvs.extend(after);
    let mut h = with_tlvs(&tlvs);
    let crc = crc32c(&h) ^ flip;
    h[at..at + 4].copy_from_slice(&crc.to_be_bytes());
    h
}

#[test]
fn tailscale_headers_parse() {
    let h = header(&hex(TAILSCALE_V4));
    assert_eq!(
        h,
        ProxyHeader { source: sa("100.101.102.103:54321"), destination: sa("100.64.0.7:40123"), len: 28 }
    );
    let h = header(&hex(TAILSCALE_V6));
    assert_eq!(
        h,
        ProxyHeader {
            source: sa("[fd7a:115c:a1e0::1234]:54321"),
            destination: sa("[fd7a:115c:a1e0::7]:40123"),
            len: 52
        }
    );
    assert!(is_tailnet_address(h.source.ip()));
}

#[test]
fn encode_is_what_tailscale_sends() {
    assert_eq!(v4(), hex(TAILSCALE_V4));
    let v6 = encode(sa("[fd7a:115c:a1e0::1234]:54321"), sa("[fd7a:115c:a1e0::7]:40123"), &[]);
    assert_eq!(v6, hex(TAILSCALE_V6));
}

#[test]
fn bytes_after_the_header_are_not_consumed() {
    let mut buf = v4();
    buf.extend(crate::pgwire::SSL_REQUEST_PACKET);
    assert_eq!(header(&buf).len, 28);
    // Even when they look like another header.
    let mut twice = v4();
    twice.extend(v4());
    assert_eq!(header(&twice).len, 28);
}

/// Fed one byte at a time, a header asks for more (never past its end)
/// until it is whole, then parses the same with any payload after it.
#[test]
fn byte_at_a_time() {
    let cases = [
        hex(TAILSCALE_V4),
        hex(TAILSCALE_V6),
        with_tlvs(&[0x04, 0, 0, 0xe0, 0, 2, 1, 2]),
        with_crc(&[0x01, 0, 2, b'h', b'2'], &[0x04, 0, 1, 0], 0),
    ];
    for h in cases {
        let want = header(&h);
        assert_eq!(want.len, h.len());
        let mut stream = h.clone();
        stream.extend(b"\0\0\0\x08\x04\xd2\x16\x2fafter");
        for n in 0..stream.len() {
            match parse(&stream[..n]) {
                Ok(Parsed::NeedMore { at_least }) => {
                    assert!(n < h.len(), "{n} bytes: still wants more past the header");
                    assert!(at_least > n && at_least <= h.len(), "{n} bytes: at_least {at_least}");
                }
                Ok(Parsed::Header(got)) => {
                    assert!(n >= h.len());
                    assert_eq!(got, want);
                }
                Err(e) => panic!("{n} bytes: {e}"),
            }
        }
    }
}

/// A wrong byte is refused as soon as it arrives, and the refusal does
/// not change as more bytes come.
#[test]
fn refused_at_the_first_wrong_byte() {
    let changed = |at: usize, byte: u8| {
        let mut h = v4();
        h[at] = byte;
        h
    };
    let cases: Vec<(Vec<u8>, usize)> = vec![
        (b"PROXY TCP4 100.64.0.1 100.64.0.2 1 2\r\n".to_vec(), 1),
        (crate::pgwire::SSL_REQUEST_PACKET.to_vec(), 1),
        (changed(7, b'q'), 8),
        (changed(12, LOCAL_V2), 13),
        (changed(13, 0x12), 14),
        (changed(14, 0x02), 16),
    ];
    for (bytes, at) in cases {
        for n in 0..bytes.len() {
            let got = parse(&bytes[..n]);
            if n < at {
                assert!(matches!(got, Ok(Parsed::NeedMore { .. })), "{n} of {bytes:?}: {got:?}");
            } else {
                let first = parse(&bytes[..at]).unwrap_err().to_string();
                assert_eq!(got.unwrap_err().to_string(), first, "{n} of {bytes:?}");
            }
        }
    }
}

#[test]
fn v1_and_other_protocols_are_refused() {
    assert!(matches!(err(b"PROXY TCP4 100.64.0.1 100.64.0.2 1 2\r\n"), ProxyHeaderError::VersionOne));
    assert!(matches!(err(b"PROXY UNKNOWN\r\n"), ProxyHeaderError::VersionOne));
    assert!(matches!(
        err(&crate::pgwire::SSL_REQUEST_PACKET),
        ProxyHeaderError::Signature { offset: 0, byte: 0, expected: b'\r' }
    ));
    assert!(matches!(err(b"GET / HTTP/1.1\r\n"), ProxyHeaderError::Signature { offset: 0, .. }));
    let mut h = v4();
    h[11] = b'\r';
    assert!(matches!(err(&h), ProxyHeaderError::Signature { offset: 11, byte: b'\r', expected: b'\n' }));
    assert!(err(&h).to_string().contains("no PROXY protocol v2 signature"), "{}", err(&h));
}

#[test]
fn version_and_command_are_checked() {
    for (byte, want) in [(0x11, "version 1"), (0x31, "version 3"), (0x01, "version 0"), (0xf1, "version 15")]
    {
        let mut h = v4();
        h[12] = byte;
        let e = err(&h);
        assert!(matches!(e, ProxyHeaderError::Version(_)), "{byte:#x}: {e:?}");
        assert!(e.to_string().contains(want), "{e}");
    }
    let mut h = v4();
    h[12] = LOCAL_V2;
    assert!(matches!(err(&h), ProxyHeaderError::Local));
    assert!(err(&h).to_string().contains("LOCAL"));
    for byte in [0x22, 0x2f] {
        h[12] = byte;
        assert!(matches!(err(&h), ProxyHeaderError::Command(c) if c == byte & 0x0f));
    }
}

#[test]
fn only_tcp_families() {
    for (byte, name) in [
        (0x00, "UNSPEC"),
        (0x12, "UDP4"),
        (0x22, "UDP6"),
        (0x31, "UNIX stream"),
        (0x32, "UNIX datagram"),
        (0x13, "unknown"),
        (0x10, "unknown"),
        (0xff, "unknown"),
    ] {
        let mut h = v4();
        h[13] = byte;
        let e = err(&h);
        assert!(
            matches!(e, ProxyHeaderError::Family { byte: b, name: n } if b == byte && n == name),
            "{e:?}"
        );
        assert!(e.to_string().contains("only TCP over IPv4 or IPv6"));
    }
}

#[test]
fn declared_length_is_bounded() {
    let set_len = |h: &mut Vec<u8>, len: u16| h[14..16].copy_from_slice(&len.to_be_bytes());
    let mut h = v4();
    for len in [513u16, 1024, u16::MAX] {
        set_len(&mut h, len);
        assert!(matches!(err(&h), ProxyHeaderError::TooLong { len: l, max: MAX_BODY } if l == len as usize));
    }
    for len in [0u16, 1, 11] {
        set_len(&mut h, len);
        assert!(matches!(err(&h), ProxyHeaderError::Truncated { family: "TCP4", need: 12, .. }));
    }
    let mut h = hex(TAILSCALE_V6);
    for len in [0u16, 12, 35] {
        set_len(&mut h, len);
        let e = err(&h);
        assert!(matches!(e, ProxyHeaderError::Truncated { family: "TCP6", need: 36, .. }), "{e:?}");
    }
    // An IPv6 address block under a TCP4 family is 24 bytes of TLVs that
    // do not parse.
    let mut h = hex(TAILSCALE_V6);
    h[13] = TCP4;
    assert!(matches!(err(&h), ProxyHeaderError::Tlv { .. }));
    // Exactly the bound is fine (a NOOP TLV filling it).
    let fill = MAX_BODY - TCP4_BLOCK - 3;
    let mut tlv = vec![0x04];
    tlv.extend((fill as u16).to_be_bytes());
    tlv.extend(vec![0u8; fill]);
    assert_eq!(header(&with_tlvs(&tlv)).len, MAX_HEADER);
}

#[test]
fn a_short_buffer_is_not_an_error() {
    assert_eq!(parse(&[]).unwrap(), Parsed::NeedMore { at_least: 16 });
    let h = v4();
    assert_eq!(parse(&h[..16]).unwrap(), Parsed::NeedMore { at_least: 28 });
    assert_eq!(parse(&h[..27]).unwrap(), Parsed::NeedMore { at_least: 28 });
}

#[test]
fn tlvs_are_skipped_when_well_formed() {
    // NOOP, ALPN, an SSL TLV with a sub-TLV, an unknown type, an empty value.
    let tlvs = [
        vec![0x04, 0, 3, 0, 0, 0],
        vec![0x01, 0, 2, b'h', b'2'],
        vec![0x20, 0, 8, 0x01, 0, 0, 0, 0, 0x21, 0, 0],
        vec![0xee, 0, 1, 7],
        vec![0x05, 0, 0],
    ]
    .concat();
    let h = header(&with_tlvs(&tlvs));
    assert_eq!(h.source, sa("100.101.102.103:54321"));
    assert_eq!(h.len, 28 + tlvs.len());
}

#[test]
fn malformed_tlvs_are_refused() {
    for (tlvs, reason) in [
        (vec![0x04], "1 byte(s) left"),
        (vec![0x04, 0], "2 byte(s) left"),
        (vec![0x04, 0, 1], "declares 1 bytes of value, only 0 left"),
        (vec![0x04, 0, 5, 1, 2, 3, 4], "declares 5 bytes of value, only 4 left"),
        (vec![0x04, 0, 0, 0xee, 0xff, 0xff], "type 0xee declares 65535"),
        (vec![0x04, 0, 0, 0x01], "1 byte(s) left"),
        (vec![TLV_CRC32C, 0, 3, 0, 0, 0], "CRC32C value of 3 bytes"),
    ] {
        let e = err(&with_tlvs(&tlvs));
        assert!(matches!(e, ProxyHeaderError::Tlv { .. }), "{tlvs:?}: {e:?}");
        assert!(e.to_string().contains(reason), "{tlvs:?}: {e}");
    }
}

#[test]
fn crc32c_is_verified() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283); // the standard check value
    assert_eq!(header(&with_crc(&[], &[], 0)).len, 28 + 7);
    assert_eq!(header(&with_crc(&[0x04, 0, 1, 9], &[0x01, 0, 2, b'h', b'2'], 0)).len, 28 + 4 + 7 + 5);
    for flip in [1, 0x8000_0000, 0xffff_ffff] {
        assert!(matches!(err(&with_crc(&[], &[], flip)), ProxyHeaderError::Crc { .. }));
    }
    // A right CRC over a header whose address then changes.
    let mut h = with_crc(&[], &[], 0);
    h[FIXED_LEN] ^= 1;
    assert!(matches!(err(&h), ProxyHeaderError::Crc { .. }));
    // Two CRC TLVs are refused.
    let h = with_crc(&[], &[TLV_CRC32C, 0, 4, 0, 0, 0, 0], 0);
    assert!(matches!(err(&h), ProxyHeaderError::Tlv { ref reason, .. } if reason.contains("second")));
}

#[test]
fn tailnet_addresses() {
    for ip in [
        "100.64.0.0",
        "100.64.0.1",
        "100.100.100.100",
        "100.127.255.255",
        "fd7a:115c:a1e0::1",
        "fd7a:115c:a1e0:ffff:ffff:ffff:ffff:ffff",
        "::ffff:100.64.0.1",
        "::ffff:100.101.102.103",
    ] {
        assert!(is_tailnet_address(ip.parse().unwrap()), "{ip}");
    }
    for ip in [
        "100.63.255.255",
        "100.128.0.0",
        "10.0.0.1",
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "fd7a:115c:a1e1::1",
        "fd7a:115c:a1df:ffff::1",
        "fd7b:115c:a1e0::1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:100.128.0.1",
        "::100.64.0.1", // IPv4-compatible (deprecated), not mapped
        "64:ff9b::100.64.0.1",
    ] {
        assert!(!is_tailnet_address(ip.parse().unwrap()), "{ip}");
    }
}

#[tokio::test]
async fn read_header_leaves_the_rest() {
    for h in [hex(TAILSCALE_V4), hex(TAILSCALE_V6), with_crc(&[0x04, 0, 1, 0], &[], 0)] {
        let (mut client, mut server) = duplex(1 << 12);
        client.write_all(&h).await.unwrap();
        client.write_all(b"postgres bytes").await.unwrap();
        drop(client);
        let got = read_header(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, header(&h));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"postgres bytes");
    }
}

#[tokio::test]
async fn read_header_one_byte_at_a_time() {
    let (mut client, mut server) = duplex(1);
    let h = hex(TAILSCALE_V6);
    let sent = h.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.unwrap();
        client.write_all(b"after").await.unwrap();
    });
    assert_eq!(read_header(&mut server, Duration::from_secs(5)).await.unwrap(), header(&h));
    let mut rest = [0u8; 5];
    server.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"after");
    writer.await.unwrap();
}

#[tokio::test]
async fn read_header_closed_early() {
    let (mut client, mut server) = duplex(1 << 12);
    client.write_all(&v4()[..20]).await.unwrap();
    drop(client);
    let e = read_header(&mut server, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(e, ProxyHeaderError::Closed { got: 20 }), "{e:?}");
    assert!(e.to_string().contains("closed after 20 bytes"));
    let (client, mut server) = duplex(1 << 12);
    drop(client);
    assert!(matches!(
        read_header(&mut server, Duration::from_secs(5)).await,
        Err(ProxyHeaderError::Closed { got: 0 })
    ));
}

#[tokio::test(start_paused = true)]
async fn read_header_times_out() {
    let (mut client, mut server) = duplex(1 << 12);
    client.write_all(&v4()[..27]).await.unwrap();
    let e = read_header(&mut server, Duration::from_secs(3)).await.unwrap_err();
    assert!(matches!(e, ProxyHeaderError::Timeout(d) if d == Duration::from_secs(3)), "{e:?}");
    drop(client);
}

/// A client that sends a PostgreSQL request and waits for the answer is
/// refused at once, not after the timeout.
#[tokio::test(start_paused = true)]
async fn read_header_refuses_without_waiting() {
    let (mut client, mut server) = duplex(1 << 12);
    client.write_all(&crate::pgwire::SSL_REQUEST_PACKET).await.unwrap();
    let start = tokio::time::Instant::now();
    let e = read_header(&mut server, Duration::from_secs(3)).await.unwrap_err();
    assert!(matches!(e, ProxyHeaderError::Signature { offset: 0, .. }), "{e:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(client);
}
