//! PostgreSQL wire messages built by hand (not with the proxy's own
//! encoder), for tests that play a client byte by byte.

/// The protocol version of a 3.0 StartupMessage.
pub const PROTOCOL_3_0: u32 = 196608;

/// A StartupMessage with these parameters.
pub fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    [(body.len() as u32 + 4).to_be_bytes().to_vec(), body].concat()
}

/// A simple-protocol Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let len = (4 + sql.len() + 1) as u32;
    [vec![b'Q'], len.to_be_bytes().to_vec(), sql.as_bytes().to_vec(), vec![0]].concat()
}

/// Reads one backend message: (type, body). An error at EOF or on a
/// message claiming less than its own length field.
pub async fn read_message<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let tag = s.read_u8().await?;
    let len = s.read_u32().await? as usize;
    let body_len = len.checked_sub(4).ok_or_else(|| std::io::Error::other(format!("length {len}")))?;
    let mut body = vec![0; body_len];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// The value of one field (`C` SQLSTATE, `M` message, ...) of an
/// ErrorResponse or NoticeResponse body.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&field))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// A rustls client that accepts any server certificate (still checking the
/// handshake signatures), as `sslmode=require` does: the lab proxy's
/// client-facing certificate is self-signed, and the tests that use this
/// are about something else (cancel inside TLS, channel binding).
#[allow(dead_code)] // not every test file that has `common` uses it
pub fn any_server_cert() -> rustls::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServerCert(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
