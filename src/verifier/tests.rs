use super::*;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::sync::Arc;

const PASSWORD: &str = "correct horse 7f3a";

fn scram_keys(v: &Verifier) -> &ScramKeys {
    match v {
        Verifier::Scram(k) => k,
        Verifier::Md5(_) => panic!("not SCRAM"),
    }
}

/// A verifier as PostgreSQL stores it (postgres-protocol writes the same
/// format as `ALTER ROLE ... PASSWORD`).
fn stored(password: &str) -> Verifier {
    Verifier::parse(&postgres_protocol::password::scram_sha_256(password.as_bytes())).unwrap()
}

/// The SASLInitialResponse body for `mechanism` and client-first `data`.
fn initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    crate::scram::sasl_initial_response(mechanism, data)[5..].to_vec()
}

/// Runs a real client (postgres-protocol's, as tokio-postgres uses)
/// against the server: Ok(client key) or the server's error; the client
/// also checks the server-final message.
fn exchange(
    v: &Verifier,
    password: &str,
    server_binding: Option<&[u8]>,
    mechanism: &str,
    cb: ChannelBinding,
) -> Result<ClientVerified, ScramServerError> {
    let mut server = ScramServer::new(scram_keys(v), server_binding);
    let mut client = ScramSha256::new(password.as_bytes(), cb);
    let first = server.client_first(&initial(mechanism, client.message()))?;
    client.update(&first).unwrap();
    let out = server.client_final(client.message())?;
    client.finish(&out.server_final).expect("the client accepts the server's signature");
    Ok(out)
}

#[test]
fn verifiers_parse_and_never_show_their_keys() {
    let v = stored(PASSWORD);
    let k = scram_keys(&v);
    assert_eq!(k.iterations, 4096);
    assert_eq!(k.salt.len(), 16);
    let dbg = format!("{v:?}");
    assert!(!dbg.contains(&B64.encode(k.stored_key)) && dbg.contains("4096"), "{dbg}");

    let md5 = postgres_protocol::password::md5(PASSWORD.as_bytes(), "alice");
    assert!(matches!(Verifier::parse(&md5), Ok(Verifier::Md5(_))));
    assert_eq!(format!("{:?}", Verifier::parse(&md5).unwrap()), "Verifier::Md5 { .. }");

    let key = B64.encode([1u8; 32]);
    for (text, want) in [
        ("hunter2", VerifierError::UnknownFormat),
        ("", VerifierError::UnknownFormat),
        ("md5abc", VerifierError::UnknownFormat),
        ("SCRAM-SHA-256$4096:c2FsdA==", VerifierError::Malformed("no keys")),
        (&format!("SCRAM-SHA-256$x:c2FsdA==${key}:{key}"), VerifierError::Malformed("iteration count")),
        (&format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"), VerifierError::Malformed("iteration count")),
        (&format!("SCRAM-SHA-256$4096:!!${key}:{key}"), VerifierError::Malformed("salt is not base64")),
        ("SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA", VerifierError::Malformed("key is not 32 bytes")),
    ] {
        assert_eq!(Verifier::parse(text).unwrap_err(), want, "{text}");
        assert!(!Verifier::parse(text).unwrap_err().to_string().contains("hunter2"));
    }
}

#[test]
fn a_real_client_logs_in_with_and_without_binding() {
    let v = stored(PASSWORD);
    let cb = [9u8; 32];
    // Plaintext client: only SCRAM-SHA-256 is offered, gs2 'n' or 'y'.
    let plain = ScramServer::new(scram_keys(&v), None);
    assert_eq!(plain.mechanisms(), b"SCRAM-SHA-256\0\0");
    for flag in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
        let out = exchange(&v, PASSWORD, None, SCRAM_SHA_256, flag).unwrap();
        assert!(!out.channel_bound);
        let want: [u8; 32] = Sha256::digest(out.client_key.as_slice()).into();
        assert_eq!(want, scram_keys(&v).stored_key);
    }
    // TLS client: PLUS first; bound to our certificate's data.
    let tls = ScramServer::new(scram_keys(&v), Some(&cb));
    assert_eq!(tls.mechanisms(), b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    let out = exchange(
        &v,
        PASSWORD,
        Some(&cb),
        SCRAM_SHA_256_PLUS,
        ChannelBinding::tls_server_end_point(cb.to_vec()),
    )
    .unwrap();
    assert!(out.channel_bound);
    // A TLS client that does not bind at all (channel_binding=disable).
    assert!(exchange(&v, PASSWORD, Some(&cb), SCRAM_SHA_256, ChannelBinding::unsupported()).is_ok());
}

#[test]
fn wrong_passwords_bindings_and_downgrades_are_refused() {
    let v = stored(PASSWORD);
    let cb = [9u8; 32];
    let r = exchange(&v, "wrong", None, SCRAM_SHA_256, ChannelBinding::unsupported());
    assert_eq!(r.err(), Some(ScramServerError::WrongPassword));
    // Bound to another certificate (a man in the middle's).
    let r = exchange(
        &v,
        PASSWORD,
        Some(&cb),
        SCRAM_SHA_256_PLUS,
        ChannelBinding::tls_server_end_point(vec![1; 32]),
    );
    assert!(matches!(r, Err(ScramServerError::Binding(_))), "{:?}", r.err());
    // 'y' (the client could bind but saw no PLUS) while we offer PLUS.
    let r = exchange(&v, PASSWORD, Some(&cb), SCRAM_SHA_256, ChannelBinding::unrequested());
    assert!(matches!(r, Err(ScramServerError::Binding(_))), "{:?}", r.err());
    // PLUS where it was not offered (plaintext), and PLUS with flag 'n'.
    let r =
        exchange(&v, PASSWORD, None, SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(cb.to_vec()));
    assert!(matches!(r, Err(ScramServerError::Protocol(_))), "{:?}", r.err());
    let mut s = ScramServer::new(scram_keys(&v), Some(&cb));
    let r = s.client_first(&initial(SCRAM_SHA_256_PLUS, b"n,,n=,r=abc"));
    assert!(matches!(r, Err(ScramServerError::Binding(_))), "{r:?}");
    // The mock verifier of a role without one refuses every password.
    let secret = [3u8; 32];
    let mock = Verifier::mock("nobody", &secret);
    let r = exchange(&mock, PASSWORD, None, SCRAM_SHA_256, ChannelBinding::unsupported());
    assert_eq!(r.err(), Some(ScramServerError::WrongPassword));
    assert_eq!(scram_keys(&mock).salt, scram_keys(&Verifier::mock("nobody", &secret)).salt, "stable salt");
    assert_ne!(scram_keys(&mock).salt, scram_keys(&Verifier::mock("other", &secret)).salt);
}

#[test]
fn malformed_messages_are_protocol_errors() {
    let v = stored(PASSWORD);
    let k = scram_keys(&v);
    let first = |data: &[u8]| ScramServer::new(k, None).client_first(&initial(SCRAM_SHA_256, data));
    for bad in [
        &b""[..],
        b"n",
        b"x,,n=,r=abc",
        b"n,a=admin,n=,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"n,,r=abc",
        b"n,,n=,r=",
        b"n,,n=,r=a\x01b",
        b"n,,n=,\xff",
    ] {
        assert!(matches!(first(bad), Err(ScramServerError::Protocol(_))), "{bad:?}");
    }
    let mut s = ScramServer::new(k, None);
    assert!(s.client_first(b"SCRAM-SHA-256\0\0\0\0\x0an,,n=,r=a").is_err(), "length beyond the data");
    assert!(s.client_first(b"OTHER\0\0\0\0\x08n,,n=,r=a").is_err());
    assert!(s.client_final(b"c=biws,r=x,p=AAAA").is_err(), "final before first");
    let sf = s.client_first(&initial(SCRAM_SHA_256, b"n,,n=,r=abc")).unwrap();
    let nonce = String::from_utf8(sf).unwrap().split(',').next().unwrap()[2..].to_string();
    let r = s.client_final(format!("c=biws,r={nonce}X,p={}", B64.encode([0u8; 32])).as_bytes());
    assert!(matches!(r, Err(ScramServerError::Protocol(_))), "nonce mismatch: {r:?}");
    assert!(s.client_final(b"c=biws").is_err(), "the exchange is over");
}

/// The key-based client (verifier mode's login to the database) against
/// this server: the server sees a valid proof for the same role, the client
/// a valid server signature; a salt that differs says the password changed.
#[test]
fn the_recovered_key_logs_in_like_the_password() {
    let v = Arc::new(stored(PASSWORD));
    let cb = [5u8; 32];
    let key = exchange(&v, PASSWORD, None, SCRAM_SHA_256, ChannelBinding::unsupported()).unwrap().client_key;
    for binding in [None, Some(&cb[..])] {
        let mut client = crate::scram::ScramClient::with_keys(
            &key,
            v.clone(),
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
            binding,
        )
        .unwrap();
        assert_eq!(client.channel_bound(), binding.is_some());
        assert!(!client.derives_keys());
        let mut server = ScramServer::new(scram_keys(&v), binding);
        let sf = server.client_first(&client.initial_response()[5..]).unwrap();
        let cf = client.handle_server_first(&sf).unwrap();
        let out = server.client_final(&cf).unwrap();
        assert_eq!(*out.client_key, *key);
        client.verify_server_final(&out.server_final).unwrap();
    }
    // The database holds a newer verifier (another salt): said as such.
    let newer = stored(PASSWORD);
    let mut client = crate::scram::ScramClient::with_keys(&key, v.clone(), &[SCRAM_SHA_256], None).unwrap();
    let mut server = ScramServer::new(scram_keys(&newer), None);
    let sf = server.client_first(&client.initial_response()[5..]).unwrap();
    let e = client.handle_server_first(&sf).unwrap_err();
    assert!(matches!(e, crate::scram::ScramError::VerifierChanged), "{e:?}");
    // A database that does not hold the verifier cannot sign.
    let mut client = crate::scram::ScramClient::with_keys(&key, v.clone(), &[SCRAM_SHA_256], None).unwrap();
    let mut server = ScramServer::new(scram_keys(&v), None);
    let sf = server.client_first(&client.initial_response()[5..]).unwrap();
    client.handle_server_first(&sf).unwrap();
    let forged = format!("v={}", B64.encode([0u8; 32]));
    assert!(client.verify_server_final(forged.as_bytes()).is_err());
}

#[test]
fn md5_answers_match_postgres() {
    let Verifier::Md5(h) =
        Verifier::parse(&postgres_protocol::password::md5(PASSWORD.as_bytes(), "alice")).unwrap()
    else {
        panic!()
    };
    let salt = [1, 2, 3, 4];
    let client = postgres_protocol::authentication::md5_hash(b"alice", PASSWORD.as_bytes(), salt);
    assert_eq!(&md5_answer(&h, &salt)[..], client.as_bytes());
    assert!(md5_check(&h, &salt, &[client.as_bytes(), b"\0"].concat()));
    assert!(!md5_check(&h, &[4, 3, 2, 1], &[client.as_bytes(), b"\0"].concat()));
    let wrong = postgres_protocol::authentication::md5_hash(b"alice", b"nope", salt);
    assert!(!md5_check(&h, &salt, wrong.as_bytes()));
    assert!(!md5_check(&h, &salt, b""));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> &'static ScramKeys {
        static V: std::sync::OnceLock<Verifier> = std::sync::OnceLock::new();
        scram_keys(V.get_or_init(|| stored(PASSWORD)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever a hostile client sends as its two SCRAM messages, the
        /// server answers with a typed error or goes on, never panics, and
        /// never accepts a proof it did not compute.
        #[test]
        fn hostile_messages_are_typed_errors(
            first in proptest::collection::vec(any::<u8>(), 0..200),
            last in proptest::collection::vec(any::<u8>(), 0..300),
            tls in any::<bool>(),
        ) {
            let cb = [9u8; 32];
            let mut s = ScramServer::new(keys(), tls.then_some(&cb[..]));
            let _ = s.client_first(&first);
            prop_assert!(!matches!(s.client_final(&last), Ok(_)), "a random proof verified");
        }

    }

    proptest! {
        // Each case runs the client's PBKDF2 (4096 rounds).
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// A real client's exchange with one byte of either message changed
        /// is refused: every byte is in the AuthMessage the proof signs, or
        /// is the binding, the nonce or the proof itself.
        #[test]
        fn one_changed_byte_is_refused(which in 0usize..2, at in any::<prop::sample::Index>(), to in any::<u8>()) {
            use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
            let cb = [9u8; 32];
            let mut server = ScramServer::new(keys(), Some(&cb));
            let mut client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::tls_server_end_point(cb.to_vec()));
            let mut first = initial(SCRAM_SHA_256_PLUS, client.message());
            if which == 0 {
                let i = at.index(first.len());
                prop_assume!(first[i] != to);
                first[i] = to;
            }
            let Ok(sf) = server.client_first(&first) else { return Ok(()) };
            prop_assume!(client.update(&sf).is_ok());
            let mut last = client.message().to_vec();
            if which == 1 {
                let i = at.index(last.len());
                prop_assume!(last[i] != to);
                last[i] = to;
            }
            prop_assert!(server.client_final(&last).is_err(), "a changed exchange verified");
        }
    }
}
