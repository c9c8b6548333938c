//! Fuzz target: pgwire framing and the small parsers beside it
//! (`pgwire::read_message`, `error_fields`, the message builders,
//! `scram::parse_mechanisms`, the SASL message builders, and the
//! tls-server-end-point hash of a hostile certificate).
//!
//! Properties: no panic; `read_message` over any bytes, delivered in any
//! pieces, does what a model of the framing predicts (a message, invalid
//! data, or an early end) and reads no further than its message; every
//! builder's output frames and parses back to what was put in.

mod fuzz;

use fuzz::*;
use proptest::prelude::*;
use std::io;
use tailgres::pgwire;
use tailgres::scram;
use tokio::io::AsyncReadExt;

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/regressions/fuzz_pgwire.txt");


#[derive(Debug, PartialEq)]
enum Framed {
    Message { tag: u8, body: Vec<u8>, rest: Vec<u8> },
    Invalid,
    Eof,
}

/// The framing, from the protocol description.
fn model(data: &[u8], max: usize) -> Framed {
    if data.len() < 5 {
        return Framed::Eof;
    }
    let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
    if len < 4 || len - 4 > max {
        return Framed::Invalid;
    }
    match data.get(5..1 + len) {
        Some(body) => Framed::Message { tag: data[0], body: body.to_vec(), rest: data[1 + len..].to_vec() },
        None => Framed::Eof,
    }
}

fn framed(data: &[u8], splits: &[usize], max: usize) -> Framed {
    let mut r = Pieces::new(data, splits);
    let got =
        run(|| format!("read_message of {}", preview(data)), pgwire::read_message(&mut r, max)).unwrap();
    match got {
        Ok(m) => Framed::Message { tag: m.tag, body: m.body, rest: r.rest() },
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Framed::Invalid,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Framed::Eof,
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

/// Messages as a peer might send them: a valid one, mutated.
fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), bytes(300), proptest::collection::vec(mutation(), 0..3), bytes(16)).prop_map(
        |(tag, body, muts, trailing)| {
            let mut b = pgwire::message_bytes(tag, &body);
            for m in &muts {
                mutate(&mut b, m);
            }
            b.extend(trailing);
            b
        },
    )
}

/// A NUL-free UTF-8 string (what a field can carry).
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,20}", "\\PC{0,20}", Just(String::new())]
}

proptest! {
    #![proptest_config(config(2000, REGRESSIONS))]

    #[test]
    fn read_message_matches_the_framing(
        data in prop_oneof![message_bytes(), bytes(64)],
        splits in proptest::collection::vec(any::<usize>(), 0..5),
        max in prop_oneof![Just(0usize), 0usize..400, Just(1 << 20)],
    ) {
        prop_assert_eq!(framed(&data, &splits, max), model(&data, max));
    }

    #[test]
    fn built_messages_read_back(tag in any::<u8>(), body in bytes(2000), code in any::<u32>()) {
        let b = pgwire::message_bytes(tag, &body);
        prop_assert_eq!(framed(&b, &[], 1 << 20), Framed::Message { tag, body: body.clone(), rest: vec![] });
        let r = pgwire::auth_request(code, &body);
        let mut slice = &r[..];
        let m = run(|| "auth_request".into(), pgwire::read_message(&mut slice, 1 << 20)).unwrap().unwrap();
        prop_assert_eq!((m.tag, m.code()), (b'R', Some(code)));
        prop_assert_eq!(&m.body[4..], &body[..]);
        prop_assert_eq!(m.to_bytes(), r);
    }

    #[test]
    fn error_fields_never_panic(body in bytes(200)) {
        let (code, msg) = pgwire::error_fields(&body);
        // Whatever is found is a field's text, not more than the body.
        prop_assert!(code.map_or(0, |c| c.len()) <= body.len() * 3);
        prop_assert!(msg.map_or(0, |m| m.len()) <= body.len() * 3);
    }

    #[test]
    fn error_responses_round_trip(
        severity in text(), code in text(), message in prop_oneof![text(), "[a\\x00b]{0,10}"], hint in proptest::option::of(text()),
    ) {
        let b = pgwire::error_response(&severity, &code, &message, hint.as_deref());
        let msgs = messages(&b).map_err(TestCaseError::fail)?;
        prop_assert_eq!(msgs.len(), 1);
        let (tag, body) = &msgs[0];
        prop_assert_eq!(*tag, b'E');
        let (c, m) = pgwire::error_fields(body);
        prop_assert_eq!(c.unwrap(), code.clone());
        prop_assert_eq!(m.unwrap(), message.replace('\0', ""), "NULs are dropped, nothing else");
        prop_assert_eq!(body.last(), Some(&0));
        let f = pgwire::fatal(&code, &message);
        prop_assert_eq!(sole_error(&f).map_err(TestCaseError::fail)?, (code.clone(), message.replace('\0', "")));
    }

    #[test]
    fn cancel_requests_are_well_formed(pid in any::<u32>(), key in bytes(300)) {
        let p = pgwire::cancel_request(pid, &key);
        prop_assert_eq!(p.len(), 12 + key.len());
        prop_assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()) as usize, p.len());
        prop_assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), pgwire::CANCEL_REQUEST);
        prop_assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), pid);
        prop_assert_eq!(&p[12..], &key[..]);
    }

    #[test]
    fn mechanism_lists_parse_or_refuse(body in prop_oneof![
        bytes(64),
        proptest::collection::vec(prop_oneof![Just(b'S'), Just(b'-'), Just(0u8), Just(0xff)], 0..12),
    ]) {
        if let Ok(list) = scram::parse_mechanisms(&body) {
            // Accepted lists are exactly names, each NUL-ended, then one NUL.
            let mut again: Vec<u8> = list.iter().flat_map(|m| [m.as_bytes(), b"\0"].concat()).collect();
            again.push(0);
            prop_assert_eq!(&again, &body);
            prop_assert!(list.iter().all(|m| !m.is_empty()));
        }
    }

    #[test]
    fn mechanism_lists_round_trip(names in proptest::collection::vec("[A-Z0-9-]{1,20}|\\PC{1,5}", 0..5)) {
        let names: Vec<String> = names.into_iter().map(|n| n.replace('\0', "")).filter(|n| !n.is_empty()).collect();
        let mut body: Vec<u8> = names.iter().flat_map(|m| [m.as_bytes(), b"\0"].concat()).collect();
        body.push(0);
        let parsed = scram::parse_mechanisms(&body).unwrap();
        prop_assert_eq!(parsed, names.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn sasl_messages_frame(mechanism in text(), data in bytes(500)) {
        let init = scram::sasl_initial_response(&mechanism, &data);
        let msgs = messages(&init).map_err(TestCaseError::fail)?;
        prop_assert_eq!(msgs.len(), 1);
        let (tag, body) = &msgs[0];
        prop_assert_eq!(*tag, b'p');
        let nul = body.iter().position(|&b| b == 0).unwrap();
        prop_assert_eq!(&body[..nul], mechanism.as_bytes());
        let n = i32::from_be_bytes(body[nul + 1..nul + 5].try_into().unwrap());
        prop_assert_eq!(n as usize, data.len());
        prop_assert_eq!(&body[nul + 5..], &data[..]);
        let resp = scram::sasl_response(&data);
        prop_assert_eq!(messages(&resp).map_err(TestCaseError::fail)?, vec![(b'p', data.clone())]);
    }
}

/// The certificates of `tests/fixtures/endpoint`, DER.
fn fixture_certs() -> Vec<Vec<u8>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/endpoint");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    names.sort();
    names.iter().map(|p| CertificateDer::from_pem_file(p).unwrap().to_vec()).collect()
}

proptest! {
    #![proptest_config(config(500, REGRESSIONS))]

    /// A certificate the database presents is parsed for its signature
    /// algorithm (tls-server-end-point): mutated DER never panics, and the
    /// binding data, when there is any, is a digest of the whole DER.
    #[test]
    fn end_point_hash_of_mutated_certificates(
        which in any::<proptest::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 0..4),
    ) {
        let certs = fixture_certs();
        let mut der = which.get(&certs).clone();
        for m in &muts {
            mutate(&mut der, m);
        }
        let hash = scram::end_point_hash(&der);
        let data = scram::tls_server_end_point(&der);
        prop_assert_eq!(hash.is_some(), data.is_some());
        if let Some(d) = data {
            prop_assert!([28, 32, 48, 64].contains(&d.len()));
        }
    }
}

/// `read_message` stops at its message: what follows stays in the stream
/// for the next read (checked over many messages in a row).
#[test]
fn consecutive_messages_read_in_order() {
    let msgs: Vec<Vec<u8>> =
        (0..50u8).map(|i| pgwire::message_bytes(b'A' + i % 26, &vec![i; i as usize])).collect();
    let all = msgs.concat();
    let mut r = Pieces::new(&all, &[1, 2, 3, 7, 100, 101, 555, 556]);
    run(|| "consecutive".into(), async {
        for want in &msgs {
            let m = pgwire::read_message(&mut r, 1000).await.unwrap();
            assert_eq!(&m.to_bytes(), want);
        }
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty());
    })
    .unwrap();
}
