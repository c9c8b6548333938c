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
