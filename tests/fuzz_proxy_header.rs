//! Fuzz target: fleet mode's PROXY protocol v2 header
//! (`proxy_header::parse`, `proxy_header::read_header`), the first bytes
//! of every connection Tailscale's Service forwarder hands us on a
//! loopback port any local process can reach.
//!
//! Properties, for every input:
//! - `parse` never panics, and on every prefix of the input says what an
//!   independent model of the v2 grammar says (need more, the header, or
//!   a refusal of the same kind), so feeding it byte by byte or whole is
//!   the same; while it needs more, it never asks past the header's end;
//! - `read_header` over the same bytes in arbitrary pieces returns the
//!   model's header and leaves exactly the bytes after it unread, or
//!   refuses as the model does (an early end is `Closed`);
//! - a valid header (TCP4 or TCP6, well-formed TLVs, maybe a right
//!   CRC32C) in front of any payload parses to its addresses and length;
//! - the same header with its signature, version, command, family, length
//!   or CRC changed is refused, with the refusal that names the change.

mod fuzz;

use fuzz::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tailgres::proxy_header::{
    self, encode, parse, read_header, Parsed, ProxyHeader, ProxyHeaderError, MAX_BODY, SIGNATURE, TLV_CRC32C,
};

const REGRESSIONS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/regressions/fuzz_proxy_header.txt");

// ---------------------------------------------------------------- model

/// What the model makes of some bytes.
#[derive(Debug, Clone, PartialEq)]
enum Model {
    More,
    Header(ProxyHeader),
    Refused(&'static str),
}

/// The refusal kinds, as the model names them.
fn kind(e: &ProxyHeaderError) -> &'static str {
    match e {
        ProxyHeaderError::VersionOne => "v1",
        ProxyHeaderError::Signature { .. } => "signature",
        ProxyHeaderError::Version(_) => "version",
        ProxyHeaderError::Local => "local",
        ProxyHeaderError::Command(_) => "command",
        ProxyHeaderError::Family { .. } => "family",
        ProxyHeaderError::TooLong { .. } => "too long",
        ProxyHeaderError::Truncated { .. } => "truncated",
        ProxyHeaderError::Tlv { .. } => "tlv",
        ProxyHeaderError::Crc { .. } => "crc",
        ProxyHeaderError::Closed { .. } => "closed",
        ProxyHeaderError::Timeout(_) => "timeout",
        ProxyHeaderError::Io(_) => "io",
    }
}

/// CRC32C bit by bit (not the module's table).
fn crc32c_bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// The v2 grammar (haproxy's proxy-protocol.txt, section 2.2) with
/// tailgres's restrictions, over the bytes so far, checked in the order
/// the bytes arrive.
fn model(b: &[u8]) -> Model {
    for (i, &byte) in b.iter().take(12).enumerate() {
        if byte != SIGNATURE[i] {
            return Model::Refused(if b[0] == b'P' { "v1" } else { "signature" });
        }
    }
    if b.len() > 12 {
        match (b[12] >> 4, b[12] & 0xf) {
            (2, 1) => {}
            (2, 0) => return Model::Refused("local"),
            (2, _) => return Model::Refused("command"),
            _ => return Model::Refused("version"),
        }
    }
    if b.len() > 13 && b[13] != 0x11 && b[13] != 0x21 {
        return Model::Refused("family");
    }
    if b.len() < 16 {
        return Model::More;
    }
    let len = (b[14] as usize) << 8 | b[15] as usize;
    let v6 = b[13] == 0x21;
    let block = if v6 { 36 } else { 12 };
    if len > 512 {
        return Model::Refused("too long");
    }
    if len < block {
        return Model::Refused("truncated");
    }
    let end = 16 + len;
    if b.len() < end {
        return Model::More;
    }
    let a = &b[16..];
    let (source, destination) = if v6 {
        let ip = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&a[i..i + 16]).unwrap()));
        let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
        (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
    } else {
        let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
        let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
        (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
    };
    let mut i = 16 + block;
    let mut crc = None;
    while i < end {
        if end - i < 3 {
            return Model::Refused("tlv");
        }
        let (t, l) = (b[i], (b[i + 1] as usize) << 8 | b[i + 2] as usize);
        if i + 3 + l > end {
            return Model::Refused("tlv");
        }
        if t == 0x03 {
            if l != 4 || crc.is_some() {
                return Model::Refused("tlv");
            }
            crc = Some(i + 3);
        }
        i += 3 + l;
    }
    if let Some(at) = crc {
        let mut zeroed = b[..end].to_vec();
        zeroed[at..at + 4].fill(0);
        if crc32c_bitwise(&zeroed).to_be_bytes() != b[at..at + 4] {
            return Model::Refused("crc");
        }
    }
    Model::Header(ProxyHeader { source, destination, len: end })
}

// ---------------------------------------------------------------- inputs

/// A valid header as a generator describes it.
#[derive(Debug, Clone)]
struct Header {
    source: SocketAddr,
    destination: SocketAddr,
    /// (type, value); never a CRC32C (that is `crc`).
    tlvs: Vec<(u8, Vec<u8>)>,
    /// Put a right CRC32C TLV among the others, at this index.
    crc: Option<usize>,
}

impl Header {
    /// The bytes, and where the CRC value is (if any).
    fn encode(&self) -> (Vec<u8>, Option<usize>) {
        let mut tlvs = Vec::new();
        let mut crc_at = None;
        let block = if self.source.is_ipv4() { 12 } else { 36 };
        for i in 0..=self.tlvs.len() {
            if self.crc.map(|c| c % (self.tlvs.len() + 1)) == Some(i) {
                crc_at = Some(16 + block + tlvs.len() + 3);
                tlvs.extend([TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
            }
            if let Some((t, v)) = self.tlvs.get(i) {
                tlvs.push(*t);
                tlvs.extend((v.len() as u16).to_be_bytes());
                tlvs.extend(v);
            }
        }
        let mut h = encode(self.source, self.destination, &tlvs);
        if let Some(at) = crc_at {
            let crc = crc32c_bitwise(&h);
            h[at..at + 4].copy_from_slice(&crc.to_be_bytes());
        }
        (h, crc_at)
    }
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        2 => (0u32..1 << 22).prop_map(|n| Ipv4Addr::from(0x6440_0000 | n)), // 100.64.0.0/10
        1 => any::<[u8; 4]>().prop_map(Ipv4Addr::from),
        1 => Just(Ipv4Addr::LOCALHOST),
    ]
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        2 => any::<[u16; 5]>().prop_map(|s| Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, s[0], s[1], s[2], s[3], s[4])),
        1 => any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        1 => ipv4().prop_map(|v4| v4.to_ipv6_mapped()),
    ]
}

fn header() -> impl Strategy<Value = Header> {
    let addrs = prop_oneof![
        (ipv4(), any::<u16>(), ipv4(), any::<u16>())
            .prop_map(|(s, sp, d, dp)| (SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp))),
        (ipv6(), any::<u16>(), ipv6(), any::<u16>())
            .prop_map(|(s, sp, d, dp)| (SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp))),
    ];
    let tlv = (any::<u8>().prop_filter("not a CRC", |t| *t != TLV_CRC32C), bytes(40));
    let tlvs = prop_oneof![
        3 => Just(vec![]), // what Tailscale sends
        2 => proptest::collection::vec(tlv, 1..6),
    ];
    (addrs, tlvs, proptest::option::of(any::<usize>()))
        .prop_map(|((source, destination), tlvs, crc)| Header { source, destination, tlvs, crc })
        .prop_filter("fits the bound", |h| h.encode().0.len() <= 16 + MAX_BODY)
}

/// Bytes that reach every check: a valid header mutated, a signature
/// then anything, the corpus seeds mutated, and plain random bytes.
fn near_headers() -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus("proxy_header").into_iter().map(|(_, b)| b).collect::<Vec<_>>();
    prop_oneof![
        3 => (header(), proptest::collection::vec(mutation(), 0..4), bytes(40)).prop_map(|(h, muts, payload)| {
            let mut b = h.encode().0;
            for m in &muts {
                mutate(&mut b, m);
            }
            b.extend(payload);
            b
        }),
        1 => (any::<u8>(), any::<u8>(), any::<u16>(), bytes(80)).prop_map(|(vc, fam, len, rest)| {
            let mut b = SIGNATURE.to_vec();
            b.extend([vc, fam]);
            b.extend(len.to_be_bytes());
            b.extend(rest);
            b
        }),
        2 => (proptest::sample::select(seeds), proptest::collection::vec(mutation(), 0..4), bytes(40))
            .prop_map(|(mut b, muts, payload)| {
                for m in &muts {
                    mutate(&mut b, m);
                }
                b.extend(payload);
                b
            }),
        2 => crc_soup(),
        1 => bytes(600),
    ]
}

/// A header whose TLVs are often CRC32Cs (of 4 bytes or not, one or
/// several), the first 4-byte one set right or not, then anything.
fn crc_soup() -> impl Strategy<Value = Vec<u8>> {
    let tlv = (
        prop_oneof![3 => Just(TLV_CRC32C), 1 => any::<u8>()],
        prop_oneof![3 => Just(4usize), 1 => 0usize..8],
    );
    (header(), proptest::collection::vec(tlv, 1..4), any::<bool>(), bytes(16)).prop_map(
        |(h, tlvs, right, after)| {
            let mut raw = Vec::new();
            for (t, l) in tlvs {
                raw.push(t);
                raw.extend((l as u16).to_be_bytes());
                raw.extend((0..l).map(|i| i as u8 ^ t));
            }
            let block = if h.source.is_ipv4() { 12 } else { 36 };
            let mut b = encode(h.source, h.destination, &raw);
            if right {
                // The first CRC32C TLV of 4 bytes, if the walk gets to it.
                let mut i = 16 + block;
                while i + 3 <= b.len() {
                    let l = (b[i + 1] as usize) << 8 | b[i + 2] as usize;
                    if b[i] == TLV_CRC32C && l == 4 && i + 7 <= b.len() {
                        b[i + 3..i + 7].fill(0);
                        let crc = crc32c_bitwise(&b);
                        b[i + 3..i + 7].copy_from_slice(&crc.to_be_bytes());
                        break;
                    }
                    i += 3 + l;
                }
            }
            b.extend(after);
            b
        },
    )
}

// ---------------------------------------------------------------- harness


/// `parse` on every prefix of `b` agrees with the model; while it needs
/// more it asks for more than it has and never past the header.
fn every_prefix(b: &[u8]) -> Result<(), TestCaseError> {
    let whole = model(b);
    for n in 0..=b.len() {
        let want = model(&b[..n]);
        let got = parse(&b[..n]);
        match (&got, &want) {
            (Ok(Parsed::NeedMore { at_least }), Model::More) => {
                prop_assert!(*at_least > n, "{n} bytes: at_least {at_least}");
                prop_assert!(*at_least <= proxy_header::MAX_HEADER);
                if let Model::Header(h) = &whole {
                    prop_assert!(
                        *at_least <= h.len,
                        "{n} bytes: at_least {at_least} past the header's {}",
                        h.len
                    );
                }
            }
            (Ok(Parsed::Header(h)), Model::Header(m)) => prop_assert_eq!(h, m, "{} bytes", n),
            (Err(e), Model::Refused(k)) => prop_assert_eq!(kind(e), *k, "{} bytes: {}", n, e),
            _ => {
                return Err(TestCaseError::fail(format!(
                    "{n} of {}: parse {got:?}, model {want:?}",
                    preview(b)
                )))
            }
        }
        if matches!(want, Model::Refused(_) | Model::Header(_)) {
            // Settled: longer prefixes say the same (checked by the model
            // agreeing on them too); no need to go on byte by byte.
            let rest = model(b);
            prop_assert_eq!(&rest, &want, "the model changed its mind on {}", preview(b));
            let again = parse(b);
            match (again, &want) {
                (Ok(Parsed::Header(h)), Model::Header(m)) => prop_assert_eq!(&h, m),
                (Err(e), Model::Refused(k)) => prop_assert_eq!(kind(&e), *k),
                (other, _) => return Err(TestCaseError::fail(format!("whole {}: {other:?}", preview(b)))),
            }
            break;
        }
    }
    Ok(())
}

/// `read_header` over `b` in pieces agrees with the model on the whole,
/// and leaves exactly what follows the header.
fn over_a_stream(b: &[u8], splits: &[usize]) -> Result<(), TestCaseError> {
    let mut r = Pieces::new(b, splits);
    let got = run(|| format!("read_header of {}", preview(b)), read_header(&mut r, Duration::from_secs(5)))
        .map_err(TestCaseError::fail)?;
    let rest = r.rest();
    let taken = b.len() - rest.len();
    match (got, model(b)) {
        (Ok(h), Model::Header(m)) => {
            prop_assert_eq!(h, m);
            prop_assert_eq!(taken, h.len, "read past the header");
        }
        (Err(ProxyHeaderError::Closed { got }), Model::More) => {
            prop_assert_eq!(got, b.len());
            prop_assert_eq!(taken, b.len());
        }
        (Err(e), Model::Refused(k)) => {
            prop_assert_eq!(kind(&e), k, "{}", e);
            prop_assert!(taken <= proxy_header::MAX_HEADER);
            // It stopped at the bytes that showed the refusal.
            prop_assert_eq!(model(&b[..taken]), Model::Refused(k));
        }
        (got, want) => {
            return Err(TestCaseError::fail(format!("{}: read {got:?}, model {want:?}", preview(b))))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(config(3000, REGRESSIONS))]

    #[test]
    fn parse_matches_the_model_on_every_prefix(b in near_headers()) {
        every_prefix(&b)?;
    }

    #[test]
    fn valid_headers_parse_whatever_follows(h in header(), payload in bytes(200)) {
        let (bytes, _) = h.encode();
        let want = ProxyHeader { source: h.source, destination: h.destination, len: bytes.len() };
        let mut all = bytes.clone();
        all.extend(&payload);
        prop_assert_eq!(parse(&all).unwrap(), Parsed::Header(want));
        prop_assert_eq!(model(&all), Model::Header(want));
        every_prefix(&all)?;
        // Tailscale's own sources are recognised as such.
        if let IpAddr::V4(v4) = h.source.ip().to_canonical() {
            let o = v4.octets();
            prop_assert_eq!(proxy_header::is_tailnet_address(h.source.ip()), o[0] == 100 && (64..128).contains(&o[1]));
        }
    }

    /// One field of a valid header changed: refused, and the refusal says
    /// which field (payload of 2+ bytes, so a longer length is not just
    /// waiting for more).
    #[test]
    fn changed_fields_are_refused(
        h in header(),
        payload in proptest::collection::vec(any::<u8>(), 2..64),
        field in 0usize..7,
        at in any::<usize>(),
        byte in any::<u8>(),
        value in any::<u16>(),
    ) {
        let (mut b, crc_at) = h.encode();
        let len = (b[14] as usize) << 8 | b[15] as usize;
        let block = if h.source.is_ipv4() { 12 } else { 36 };
        let set_len = |b: &mut Vec<u8>, l: usize| b[14..16].copy_from_slice(&(l as u16).to_be_bytes());
        let want: &[&str] = match field {
            0 => {
                let i = at % 12;
                b[i] = if byte == SIGNATURE[i] { byte ^ 0x80 } else { byte };
                &["signature", "v1"]
            }
            1 => {
                let v = if byte >> 4 == 2 { byte ^ 0x40 } else { byte };
                b[12] = v & 0xf0 | 1;
                &["version"]
            }
            2 => {
                let c = if byte & 0xf == 1 { 0 } else { byte & 0xf };
                b[12] = 0x20 | c;
                if c == 0 { &["local"] } else { &["command"] }
            }
            3 => {
                b[13] = if byte == 0x11 || byte == 0x21 { byte + 1 } else { byte };
                &["family"]
            }
            4 => {
                set_len(&mut b, 513 + value as usize % (65536 - 513));
                &["too long"]
            }
            5 => {
                set_len(&mut b, value as usize % block);
                &["truncated"]
            }
            _ => {
                // One or two bytes more or fewer: the last TLV no longer
                // ends where the header does (or the block is cut).
                let d = 1 + at % 2;
                if byte % 2 == 0 { set_len(&mut b, len + d) } else { set_len(&mut b, len - d.min(len)) }
                &["tlv", "truncated"]
            }
        };
        if field == 6 && byte % 2 == 0 && len + 1 + at % 2 > MAX_BODY {
            return Ok(()); // "too long" then, covered above
        }
        b.extend(&payload);
        let e = parse(&b).err().ok_or_else(|| TestCaseError::fail(format!("accepted: {}", preview(&b))))?;
        prop_assert!(want.contains(&kind(&e)), "field {}: {} (wanted {:?})", field, e, want);
        prop_assert_eq!(model(&b), Model::Refused(kind(&e)));
        // A changed CRC (when there is one) is refused as such.
        if let Some(c) = crc_at {
            let (mut b, _) = h.encode();
            b[c + at % 4] ^= byte | 1;
            b.extend(&payload);
            prop_assert!(matches!(parse(&b), Err(ProxyHeaderError::Crc { .. })), "{:?}", parse(&b));
        }
    }
}

proptest! {
    #![proptest_config(config(1000, REGRESSIONS))]

    #[test]
    fn read_header_matches_the_model(
        b in prop_oneof![near_headers(), (header(), bytes(40)).prop_map(|(h, p)| [h.encode().0, p].concat())],
        splits in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        over_a_stream(&b, &splits)?;
    }
}

/// Every corpus seed on its own (what Tailscale sends over IPv4 and IPv6,
/// one with TLVs and a CRC, a v1 header, a PostgreSQL SSLRequest): as the
/// model says, whole and over a stream one byte at a time.
#[test]
fn corpus_seeds_as_they_are() {
    for (name, bytes) in corpus("proxy_header") {
        every_prefix(&bytes).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        let ones: Vec<usize> = (1..bytes.len()).collect();
        over_a_stream(&bytes, &ones).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        let expected = match name.as_str() {
            "tailscale_v4.bin" | "tailscale_v6.bin" | "tlvs_and_crc.bin" => "header",
            "v1_text.bin" => "v1",
            "ssl_request.bin" => "signature",
            other => panic!("seed {other}: say what it should be"),
        };
        let got = match model(&bytes) {
            Model::Header(_) => "header",
            Model::Refused(k) => k,
            Model::More => "more",
        };
        assert_eq!(got, expected, "seed {name}");
    }
}

/// The model's CRC is the standard one (so it is not the module's own
/// mistake twice).
#[test]
fn model_crc_is_crc32c() {
    assert_eq!(crc32c_bitwise(b"123456789"), 0xe306_9283);
    assert_eq!(proxy_header::crc32c(b"123456789"), 0xe306_9283);
}
