//! One audit line as the reader sees it.
//!
//! Deliberately looser than [`crate::audit::Record`]: the reader must keep
//! working on logs written by older and newer tailgres versions, so
//! unknown fields and unknown event names pass, and only what every
//! record has always had (`ts`, `event`) is required.
#![forbid(unsafe_code)]

use super::when::parse_rfc3339;
use serde::Deserialize;
use std::net::IpAddr;
use std::time::SystemTime;

/// Why a line is not an audit record.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("not UTF-8 (byte {0})")]
    NotUtf8(usize),
    #[error("not an audit record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("ts {0:?} is not an RFC 3339 time")]
    BadTime(String),
    #[error("not an audit record: missing field `session_id`")]
    NoSession,
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// The fields of a record that the reader filters on and shows.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub ts: String,
    pub event: String,
    /// Empty for the log's own records (`log_opened`, `checkpoint`), which
    /// have none; every other record must have one.
    #[serde(skip)]
    pub session_id: String,
    #[serde(rename = "session_id", default)]
    read_session_id: Option<String>,
    /// `ts`, parsed.
    #[serde(skip, default = "epoch")]
    pub time: SystemTime,
    /// The tailgres node that wrote the record (its `node`); `None` in logs
    /// from before records named it. (`node()` is the peer's machine.)
    #[serde(rename = "node")]
    pub proxy: Option<String>,
    pub peer_addr: Option<String>,
    pub peer: Option<PeerView>,
    pub postgres: Option<PostgresView>,
    pub client_transport: Option<String>,
    // Event fields; which are present depends on `event`.
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub side: Option<String>,
    pub auth_method: Option<String>,
    pub sqlstate: Option<String>,
    pub target_session_id: Option<String>,
    pub duration_ms: Option<u64>,
    pub bytes_client_to_upstream: Option<u64>,
    pub bytes_upstream_to_client: Option<u64>,
    pub ended_by: Option<String>,
    // Statement records.
    pub text: Option<String>,
    pub text_status: Option<String>,
    pub fingerprint: Option<String>,
    pub duration_us: Option<u64>,
    pub outcome: Option<String>,
    pub command_tag: Option<String>,
    pub rows: Option<u64>,
}

fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PeerView {
    pub stable_id: String,
    pub node_name: String,
    pub user_login: String,
    pub tags: Vec<String>,
    pub tailnet_ip: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PostgresView {
    pub user: String,
    pub database: String,
}

impl Entry {
    /// Parses one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Entry, LineError> {
        // Checked first so that the message says what is wrong in words an
        // operator knows, rather than serde's "invalid unicode code point".
        let text = std::str::from_utf8(line).map_err(|e| LineError::NotUtf8(e.valid_up_to() + 1))?;
        let mut entry: Entry = serde_json::from_str(text)?;
        entry.session_id = match entry.read_session_id.take() {
            Some(id) => id,
            None if super::filter::EventKind::is_log_record(&entry.event) => String::new(),
            None => return Err(LineError::NoSession),
        };
        entry.time = parse_rfc3339(&entry.ts).ok_or_else(|| LineError::BadTime(entry.ts.clone()))?;
        Ok(entry)
    }

    /// Who the peer is, as an operator names it: the user's login, or the
    /// tags of a tagged device (whose login is the meaningless
    /// `tagged-devices`). `None` when the tailnet did not identify it.
    pub fn who(&self) -> Option<String> {
        let peer = self.peer.as_ref()?;
        Some(if peer.tags.is_empty() { peer.user_login.clone() } else { peer.tags.join(",") })
    }

    /// The peer's tailnet address: from WhoIs when known, else the address
    /// the connection came from (the only identity an unknown peer has).
    pub fn ip(&self) -> Option<IpAddr> {
        let from_peer = self.peer.as_ref().and_then(|p| p.tailnet_ip.as_deref()?.parse().ok());
        from_peer.or_else(|| {
            let addr = self.peer_addr.as_deref()?;
            addr.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok().or_else(|| addr.parse().ok())
        })
    }

    pub fn node(&self) -> Option<&str> {
        self.peer.as_ref().map(|p| p.node_name.trim_end_matches('.'))
    }

    pub fn db_user(&self) -> Option<&str> {
        self.postgres.as_ref().map(|p| p.user.as_str())
    }

    pub fn database(&self) -> Option<&str> {
        self.postgres.as_ref().map(|p| p.database.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let good = br#"{"ts":"2026-11-23T14:03:07.123456Z","event":"session_start","session_id":"0123456789abcdef","peer_addr":"100.64.0.3:41234","peer":null,"postgres":null,"client_transport":null,"upstream":null}"#;
        let cases: &[(&[u8], Result<(), &str>)] = &[
            (good, Ok(())),
            // Future events and fields pass.
            (br#"{"ts":"2026-11-23T14:03:07Z","event":"session_paused","session_id":"x","new":1}"#, Ok(())),
            (br#"{"ts":"2026-11-23T14:03:07Z","event":"cancel"}"#, Err("missing field `session_id`")),
            (br#"{"ts":"yesterday","event":"cancel","session_id":"x"}"#, Err("is not an RFC 3339 time")),
            (br#"{"ts":"2026-11-23T14:03:07Z","event":"cancel","session_id":"x""#, Err("EOF")),
            (b"[1,2]", Err("not an audit record")),
            (b"42", Err("not an audit record")),
            (b"\"ts\"", Err("not an audit record")),
            (b"{\"ts\":\"\xff\"}", Err("not UTF-8 (byte 8)")),
            (
                br#"{"ts":"2026-11-23T14:03:07Z","event":"session_end","session_id":"x","duration_ms":-1}"#,
                Err("invalid value"),
            ),
        ];
        for (line, want) in cases {
            let got = Entry::parse(line);
            match (want, got) {
                (Ok(()), Ok(_)) => {}
                (Err(needle), Err(e)) => assert!(e.to_string().contains(needle), "{e} vs {needle:?}"),
                (want, got) => panic!("{}: want {want:?}, got {got:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn who_is_the_login_or_the_tags() {
        let mut e = Entry::parse(
            br#"{"ts":"2026-11-23T14:03:07Z","event":"session_start","session_id":"x","peer_addr":"[fd7a:115c:a1e0::3]:5000",
                "peer":{"stable_id":"n1","node_name":"ci.tail1234.ts.net.","user_login":"tagged-devices","tags":["tag:ci","tag:db"],"tailnet_ip":"fd7a:115c:a1e0::3"}}"#,
        )
        .unwrap();
        assert_eq!(e.who().as_deref(), Some("tag:ci,tag:db"));
        assert_eq!(e.node(), Some("ci.tail1234.ts.net"));
        assert_eq!(e.ip(), Some("fd7a:115c:a1e0::3".parse().unwrap()));
        e.peer.as_mut().unwrap().tags.clear();
        e.peer.as_mut().unwrap().user_login = "alice@example.com".into();
        assert_eq!(e.who().as_deref(), Some("alice@example.com"));
        // An unidentified peer still has the address it came from.
        e.peer = None;
        assert_eq!(e.who(), None);
        assert_eq!(e.ip(), Some("fd7a:115c:a1e0::3".parse().unwrap()));
    }
}
