//! Table-driven tests of negotiation over in-memory streams.
use super::*;
use crate::pgwire::PROTOCOL_3_0;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{duplex, DuplexStream};

fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    Startup { version, params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
        .to_bytes()
}

fn request(code: u32) -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v
}

struct Tls {
    acceptor: TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn tls(alpn_client: bool) -> Tls {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    if alpn_client {
        client.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
    }
}

async fn run(
    input: Vec<u8>,
    tls: Option<&TlsAcceptor>,
) -> (Result<Negotiated<DuplexStream>, NegotiateError>, Vec<u8>) {
    let (mut client, server) = duplex(1 << 16);
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let res = negotiate(server, tls).await;
    let mut reply = Vec::new();
    // Drop the server side so the client read ends.
    let res = match res {
        Ok(Negotiated::Startup { stream, startup, transport }) => {
            drop(stream);
            Ok((startup, transport))
        }
        Ok(Negotiated::Cancel { stream, request, transport }) => {
            drop(stream);
            Err(Ok((request, transport)))
        }
        Err(e) => Err(Err(e)),
    };
    client.read_to_end(&mut reply).await.unwrap();
    let res = match res {
        Ok((startup, transport)) => {
            let (_c, s) = duplex(1);
            Ok(Negotiated::Startup { stream: ClientStream::Plain(Rewind::new(s)), startup, transport })
        }
        Err(Ok((request, transport))) => {
            let (_c, s) = duplex(1);
            Ok(Negotiated::Cancel { stream: ClientStream::Plain(Rewind::new(s)), request, transport })
        }
        Err(Err(e)) => Err(e),
    };
    (res, reply)
}

fn fatal_message(reply: &[u8]) -> String {
    assert_eq!(reply.first(), Some(&b'E'), "expected an ErrorResponse, got {reply:?}");
    let (code, msg) = pgwire::error_fields(&reply[5..]);
    assert_eq!(code.as_deref(), Some("08P01"));
    msg.unwrap()
}

#[tokio::test]
async fn plaintext_startups_of_any_length_and_version() {
    let long = "x".repeat(9000);
    let cases: Vec<(u32, Vec<(&str, &str)>)> = vec![
        (PROTOCOL_3_0, vec![("user", "alice")]),
        (PROTOCOL_3_0, vec![("user", "alice"), ("database", "app"), ("application_name", "psql")]),
        (pgwire::PROTOCOL_3_2, vec![("user", "bob"), ("options", "-c search_path=x")]),
        (PROTOCOL_3_0, vec![("user", "carol"), ("options", long.as_str())]),
        (PROTOCOL_3_0 | 7, vec![("user", "dave"), ("_pq_.future", "1")]), // 3.7: upstream negotiates
    ];
    for (version, params) in cases {
        let (res, reply) = run(startup_packet(version, &params), None).await;
        let Ok(Negotiated::Startup { startup, transport, .. }) = res else {
            panic!("{params:?}: {:?}", res.err())
        };
        assert!(reply.is_empty());
        assert_eq!(transport, ClientTransport::Plaintext);
        assert_eq!(startup.version, version);
        assert_eq!(startup.user(), params[0].1);
        assert_eq!(startup.to_bytes(), startup_packet(version, &params), "re-encoding is exact");
    }
}

#[tokio::test]
async fn database_defaults_to_user() {
    let (res, _) = run(startup_packet(PROTOCOL_3_0, &[("user", "alice")]), None).await;
    let Ok(Negotiated::Startup { startup, .. }) = res else { panic!() };
    assert_eq!(startup.database(), "alice");
    assert_eq!(startup.application_name(), None);
    assert_eq!(startup.protocol_label(), "3.0");
}

#[tokio::test]
async fn gssenc_is_declined_and_the_client_continues_on_the_same_socket() {
    let mut input = request(pgwire::GSSENC_REQUEST);
    input.extend(startup_packet(PROTOCOL_3_0, &[("user", "k")]));
    let (res, reply) = run(input, None).await;
    assert_eq!(reply, b"N");
    assert!(matches!(res, Ok(Negotiated::Startup { transport: ClientTransport::Plaintext, .. })));
}

#[tokio::test]
async fn ssl_request_without_tls_configured_gets_n() {
    let mut input = request(pgwire::SSL_REQUEST);
    input.extend(startup_packet(PROTOCOL_3_0, &[("user", "k")]));
    let (res, reply) = run(input, None).await;
    assert_eq!(reply, b"N");
    assert!(matches!(res, Ok(Negotiated::Startup { .. })));
}

#[tokio::test]
async fn cancel_requests_for_both_key_sizes() {
    for key in [vec![1u8, 2, 3, 4], (0..32).collect::<Vec<u8>>(), vec![9u8; 256]] {
        let (res, reply) = run(pgwire::cancel_request(4242, &key), None).await;
        assert!(reply.is_empty(), "a cancel gets no answer");
        match res {
            Ok(Negotiated::Cancel { request, transport, .. }) => {
                assert_eq!(request, CancelRequest { pid: 4242, key: key.clone(), on_behalf_of: None });
                assert_eq!(transport, ClientTransport::Plaintext);
            }
            _ => panic!("key of {} bytes not accepted", key.len()),
        }
    }
}

#[tokio::test]
async fn fleet_cancels_carry_the_clients_address() {
    let clients: [std::net::SocketAddr; 2] = ["100.64.0.7:40001".parse().unwrap(), "[fd7a:115c:a1e0::7]:40002".parse().unwrap()];
    for (client, key) in clients.into_iter().zip([vec![1u8, 2, 3, 4], vec![7u8; 256]]) {
        let (res, reply) = run(pgwire::fleet_cancel_request(0x6440_0001, &key, client), None).await;
        assert!(reply.is_empty(), "a cancel gets no answer");
        let Ok(Negotiated::Cancel { request, .. }) = res else { panic!("{client}: not accepted") };
        assert_eq!(request, CancelRequest { pid: 0x6440_0001, key, on_behalf_of: Some(client) });
    }
    for bad in [3usize, 257] {
        let p = pgwire::fleet_cancel_request(1, &vec![0; bad], clients[0]);
        let (res, _) = run(p, None).await;
        assert!(res.is_err(), "a fleet cancel with a {bad}-byte key");
    }
}

#[tokio::test]
async fn hostile_packets_are_refused_with_08p01() {
    let mut after_ssl = request(pgwire::SSL_REQUEST);
    after_ssl.extend(startup_packet(PROTOCOL_3_0, &[("user", "injected")]));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("length 0", vec![0, 0, 0, 0, 0, 0, 0, 0], "invalid startup packet length 0"),
        ("length 7", vec![0, 0, 0, 7, 0, 3, 0, 0], "invalid startup packet length 7"),
        ("length 10001", 10001u32.to_be_bytes().to_vec(), "startup packet too long"),
        ("length 2^31", (1u32 << 31).to_be_bytes().to_vec(), "startup packet too long"),
        (
            "protocol 2.0",
            {
                let mut v = 8u32.to_be_bytes().to_vec();
                v.extend(0x20000u32.to_be_bytes());
                v
            },
            "unsupported frontend protocol 2.0",
        ),
        (
            "garbage code",
            {
                let mut v = 12u32.to_be_bytes().to_vec();
                v.extend(1234u32.to_be_bytes());
                v.extend([0; 4]);
                v
            },
            "unsupported frontend protocol",
        ),
        (
            "no terminator",
            {
                let mut v = 13u32.to_be_bytes().to_vec();
                v.extend(PROTOCOL_3_0.to_be_bytes());
                v.extend(b"user\0");
                v
            },
            "invalid startup packet layout",
        ),
        ("no user", startup_packet(PROTOCOL_3_0, &[("database", "x")]), "no PostgreSQL user name"),
        (
            "long ssl request",
            {
                let mut v = 12u32.to_be_bytes().to_vec();
                v.extend(pgwire::SSL_REQUEST.to_be_bytes());
                v.extend([0; 4]);
                v
            },
            "invalid length of SSL",
        ),
        (
            "short cancel",
            {
                let mut v = 12u32.to_be_bytes().to_vec();
                v.extend(pgwire::CANCEL_REQUEST.to_be_bytes());
                v.extend([0; 4]);
                v
            },
            "invalid length of cancel",
        ),
        ("gssenc loop", request(pgwire::GSSENC_REQUEST).repeat(6), "too many SSL/GSSENC requests"),
    ];
    let t = tls(true);
    for (name, input, want) in cases {
        let (res, reply) = run(input, None).await;
        assert!(matches!(res, Err(NegotiateError::Protocol(_))), "{name}: {:?}", res.err());
        let reply = reply.strip_prefix(b"NNNN").unwrap_or(&reply); // gssenc loop
        assert!(fatal_message(reply).contains(want), "{name}: {}", fatal_message(reply));
    }
    // Plaintext bytes queued behind an SSLRequest are never read as TLS.
    let (res, reply) = run(after_ssl, Some(&t.acceptor)).await;
    assert!(matches!(res, Err(NegotiateError::Protocol(_))), "{:?}", res.err());
    assert!(fatal_message(&reply).contains("unencrypted data after SSL request"));
}

#[tokio::test]
async fn truncated_packets_are_a_clean_close() {
    for input in [vec![0u8, 0], vec![0, 0, 0, 20, 0, 3, 0, 0, b'u']] {
        let (res, _) = run(input, None).await;
        assert!(matches!(res, Err(NegotiateError::Closed)), "{:?}", res.err());
    }
}

async fn tls_client(
    t: &Tls,
    ssl_request_first: bool,
) -> (Result<Negotiated<DuplexStream>, NegotiateError>, Vec<u8>) {
    let (client, server) = duplex(1 << 16);
    let server_task = {
        let acceptor = t.acceptor.clone();
        tokio::spawn(async move {
            match negotiate(server, Some(&acceptor)).await {
                Ok(Negotiated::Startup { mut stream, startup, transport }) => {
                    stream.write_all(b"R-ok").await.unwrap();
                    stream.flush().await.unwrap();
                    let _ = stream.shutdown().await;
                    Ok((startup, transport))
                }
                Ok(Negotiated::Cancel { .. }) => panic!("cancel"),
                Err(e) => Err(e),
            }
        })
    };
    let mut client = client;
    if ssl_request_first {
        client.write_all(&request(pgwire::SSL_REQUEST)).await.unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"S");
    }
    let name = ServerName::try_from("proxy.test").unwrap();
    let mut got = Vec::new();
    if let Ok(mut tls) = t.connector.connect(name, client).await {
        tls.write_all(&startup_packet(PROTOCOL_3_0, &[("user", "tls-user")])).await.unwrap();
        tls.flush().await.unwrap();
        let _ = tls.read_to_end(&mut got).await;
    }
    let res = server_task.await.unwrap().map(|(startup, transport)| {
        let (_c, s) = duplex(1);
        Negotiated::Startup { stream: ClientStream::Plain(Rewind::new(s)), startup, transport }
    });
    (res, got)
}

#[tokio::test]
async fn ssl_request_then_tls() {
    let t = tls(false);
    let (res, got) = tls_client(&t, true).await;
    let Ok(Negotiated::Startup { startup, transport, .. }) = res else { panic!("{:?}", res.err()) };
    assert_eq!(transport, ClientTransport::Tls);
    assert_eq!(startup.user(), "tls-user");
    assert_eq!(got, b"R-ok");
}

#[tokio::test]
async fn direct_tls_requires_alpn_postgresql() {
    let (res, got) = tls_client(&tls(true), false).await;
    let Ok(Negotiated::Startup { transport, .. }) = res else { panic!("{:?}", res.err()) };
    assert_eq!(transport, ClientTransport::DirectTls);
    assert_eq!(got, b"R-ok");

    let (res, got) = tls_client(&tls(false), false).await;
    assert!(matches!(res, Err(NegotiateError::Protocol(_))), "{:?}", res.err());
    assert!(fatal_message(&got).contains("ALPN"));
}

/// A client that asks for TLS (or GSSAPI encryption) again from inside a
/// TLS session, direct or after an SSLRequest, is told 'N' and goes on; this
/// once reached `unreachable!` and killed the session task unaudited.
#[tokio::test]
async fn requests_inside_tls_are_answered_n() {
    for direct in [true, false] {
        let t = tls(true);
        let (client, server) = duplex(1 << 16);
        let acceptor = t.acceptor.clone();
        let server_task = tokio::spawn(async move {
            match negotiate(server, Some(&acceptor)).await {
                Ok(Negotiated::Startup { mut stream, startup, transport }) => {
                    stream.write_all(b"R-ok").await.unwrap();
                    stream.flush().await.unwrap();
                    let _ = stream.shutdown().await;
                    Ok((startup.user().to_string(), transport))
                }
                Ok(Negotiated::Cancel { .. }) => panic!("cancel"),
                Err(e) => Err(e.to_string()),
            }
        });
        let mut client = client;
        if !direct {
            client.write_all(&request(pgwire::SSL_REQUEST)).await.unwrap();
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"S");
        }
        let name = ServerName::try_from("proxy.test").unwrap();
        let mut conn = t.connector.connect(name, client).await.unwrap();
        for code in [pgwire::SSL_REQUEST, pgwire::GSSENC_REQUEST] {
            conn.write_all(&request(code)).await.unwrap();
            conn.flush().await.unwrap();
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"N", "direct {direct}");
        }
        conn.write_all(&startup_packet(PROTOCOL_3_0, &[("user", "again")])).await.unwrap();
        conn.flush().await.unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got).await;
        assert_eq!(got, b"R-ok");
        let want = if direct { ClientTransport::DirectTls } else { ClientTransport::Tls };
        assert_eq!(server_task.await.unwrap(), Ok(("again".to_string(), want)));

        // And a client that hangs up right after such a request: a clean
        // close, not a dead task.
        let t = tls(true);
        let (client, server) = duplex(1 << 16);
        let acceptor = t.acceptor.clone();
        let server_task = tokio::spawn(async move { negotiate(server, Some(&acceptor)).await.err() });
        let name = ServerName::try_from("proxy.test").unwrap();
        let mut conn = t.connector.connect(name, client).await.unwrap();
        conn.write_all(&request(pgwire::SSL_REQUEST)).await.unwrap();
        conn.flush().await.unwrap();
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).await.unwrap();
        drop(conn);
        assert!(matches!(server_task.await.unwrap(), Some(NegotiateError::Closed)));
    }
}
