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
