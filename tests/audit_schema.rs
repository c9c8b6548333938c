//! `audit-schema.json` against the real writer: every kind of record the
//! Rust types can build, written through `AuditLog` to a file and read
//! back, validates; and records the schema must refuse (unknown or
//! secret-looking fields, missing fields, inconsistent combinations) fail.

#[path = "common/audit.rs"]
mod audit_check;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tailgres::audit::{
    chain, new_session_id, AuditDest, AuditLog, AuditOptions, AuthMethod, CancelOutcome, Checkpoints,
    ClientTransport, DenyReason, EndReason, Event, LogEvent, LogRecord, OpenReason, Peer, PostgresInfo,
    ProtocolVersion, Record, SessionEnd, SqlState, Statement, StatementCopy, StatementProtocol, TlsVersion,
    UpstreamInfo,
};

/// Every event the types can express, each closed set walked in full.
fn all_events() -> Vec<Event> {
    let mut events = vec![Event::SessionStart];
    for reason in DenyReason::ALL {
        events.push(Event::denied(reason, format!("denied: {reason:?}")));
    }
    for method in AuthMethod::ALL {
        events.push(Event::auth_ok(method));
        events.push(Event::auth_failed(method, SqlState::parse("28P01"), "password authentication failed"));
        events.push(Event::auth_failed(method, None, "upstream closed during authentication"));
    }
    events.push(Event::cancel(CancelOutcome::Forwarded { target_session_id: new_session_id() }));
    events.push(Event::cancel(CancelOutcome::UnknownKey));
    events.push(Event::cancel(CancelOutcome::OtherNode { target_session_id: new_session_id() }));
    events.push(Event::cancel(CancelOutcome::UpstreamError { target_session_id: new_session_id() }));
    for o in [CancelOutcome::ToPeer, CancelOutcome::PeerUnreachable] {
        events.push(Event::cancel_via(o, "pg-2.tail-lab.ts.net"));
    }
    events.push(Event::cancel(CancelOutcome::NotFleetMember));
    events.push(Event::cancel_via(CancelOutcome::Forwarded { target_session_id: new_session_id() }, "pg-1.tail-lab.ts.net"));
    for reason in EndReason::ALL {
        for detail in [None, Some("connection reset by peer".to_string())] {
            events.push(Event::SessionEnd(SessionEnd {
                duration: Duration::from_millis(12_345),
                bytes_client_to_upstream: 1_234,
                bytes_upstream_to_client: u64::MAX,
                reason,
                detail,
            }));
        }
    }
    let statement = |text: Option<&str>, status, tag: Option<&str>, sqlstate: Option<&str>| Statement {
        protocol: StatementProtocol::Simple,
        text: text.map(str::to_owned),
        text_status: status,
        fingerprint: "0123456789abcdef".into(),
        duration: Duration::from_micros(1234),
        command_tag: tag.map(str::to_owned),
        rows: tag.map(|_| 3),
        sqlstate: sqlstate.and_then(SqlState::parse),
        suspended: false,
        copy: None,
        params: None,
    };
    events.push(Event::Statement(statement(Some("SELECT $1"), "normalized", Some("SELECT"), None)));
    events.push(Event::Statement(statement(Some("SELECT 1"), "raw", Some("SELECT"), None)));
    events.push(Event::Statement(Statement {
        protocol: StatementProtocol::Extended,
        params: Some(vec![Some("alice".into()), None, Some("\\x0007".into())]),
        ..statement(Some("SELECT $1, $2, $3"), "raw", Some("SELECT"), None)
    }));
    events.push(Event::Statement(Statement {
        protocol: StatementProtocol::Extended,
        copy: Some(StatementCopy { direction: "in", bytes: 1 << 40 }),
        ..statement(Some("COPY t FROM STDIN"), "normalized", Some("COPY"), None)
    }));
    for status in ["redacted", "unparsed", "too_long", "unknown"] {
        events.push(Event::Statement(statement(None, status, Some("ALTER ROLE"), None)));
    }
    events.push(Event::Statement(statement(Some("SELECT $1/$2"), "normalized", None, Some("22012"))));
    events.push(Event::Statement(statement(None, "unknown", None, None)));
    events.push(Event::Statement(Statement {
        suspended: true,
        ..statement(Some("SELECT $1"), "normalized", None, None)
    }));
    events
}

fn peer(tags: &[&str], ip: &str) -> Peer {
    Peer {
        stable_id: "nQ8tVb3CNTRL".into(),
        node_name: "laptop.tail1234.ts.net".into(),
        user_login: "alice@example.com".into(),
        user_display_name: "Alice Example".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        tailnet_ip: ip.parse().unwrap(),
        os: "linux".into(),
        shared_in: !tags.is_empty(),
    }
}

fn upstream(not_after: Option<SystemTime>) -> UpstreamInfo {
    UpstreamInfo {
        address: "db.internal:5432".into(),
        server_name: "db.internal".into(),
        tls_version: TlsVersion::Tls13,
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
        cert_sha256: [0x5a; 32],
        cert_not_after: not_after,
    }
}

/// Each event with every optional part null, and with every part filled
/// (alternating the variants of the filled parts).
fn all_records() -> Vec<Record> {
    let v4: SocketAddr = "100.64.0.3:41234".parse().unwrap();
    let v6: SocketAddr = "[fd7a:115c:a1e0::3]:41234".parse().unwrap();
    let mut records = Vec::new();
    for (i, event) in all_events().into_iter().enumerate() {
        records.push(Record::new(new_session_id(), v4, event.clone()));
        let odd = i % 2 == 1;
        let filled = Record::new(new_session_id(), if odd { v6 } else { v4 }, event)
            .with_peer(if odd {
                peer(&["tag:ci", "tag:prod-db"], "fd7a:115c:a1e0::3")
            } else {
                peer(&[], "100.64.0.3")
            })
            .with_postgres(PostgresInfo {
                user: "alice".into(),
                database: "app".into(),
                application_name: odd.then(|| "psql \"quoted\"\n\u{1F418}".to_string()),
                protocol: if odd { ProtocolVersion::V3_2 } else { ProtocolVersion::V3_0 },
            })
            .with_client_transport(
                [ClientTransport::Plaintext, ClientTransport::Tls, ClientTransport::DirectTls][i % 3],
            )
            .with_upstream(upstream(odd.then(|| UNIX_EPOCH + Duration::from_secs(253_402_300_799))));
        records.push(filled);
    }
    records
}

/// The records, written by the real writer (signing a checkpoint every 7
/// records) to a file, read back validated: every line, the writer's own
/// `log_opened` and `checkpoint` records included; and the file's text.
async fn written(records: &[Record]) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let signer = std::sync::Arc::new(chain::Signer::generate(&dir.path().join("key.pem")).unwrap());
    let checkpoints = Checkpoints { signer, every: 7, interval: Duration::from_secs(3600) };
    let options =
        AuditOptions { checkpoints: Some(checkpoints), node: "pg-1".into(), ..AuditOptions::default() };
    let (log, writer) = AuditLog::open_with(AuditDest::File(path.clone()), options).await.unwrap();
    for r in records {
        log.record(r).await.unwrap();
    }
    log.close().await;
    writer.await.unwrap();
    (audit_check::validate_all_lines(&path), std::fs::read_to_string(&path).unwrap())
}

/// `values` as a chained log's lines: `node`, `seq` and `prev` replaced by
/// what the writer would stamp (keeping the node), in order.
fn stamped(values: &[Value]) -> Vec<String> {
    let mut head = None;
    values
        .iter()
        .map(|v| {
            let mut v = v.clone();
            let node = v.as_object_mut().unwrap().remove("node").unwrap();
            v.as_object_mut().unwrap().remove("seq");
            v.as_object_mut().unwrap().remove("prev");
            let (line, link) = chain::stamp(&serde_json::to_vec(&v).unwrap(), node.as_str().unwrap(), head);
            head = Some(link);
            String::from_utf8(line).unwrap().trim_end().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn every_record_kind_written_by_the_writer_validates() {
    let records = all_records();
    let (all, text) = written(&records).await;
    let lines: Vec<Value> = all.iter().filter(|v| !audit_check::is_log_record(v)).cloned().collect();
    assert_eq!(lines.len(), records.len());
    for (record, line) in records.iter().zip(&lines) {
        // What reached the file is exactly what the record serializes to,
        // then the node that wrote it and its place in the chain.
        let mut line = line.clone();
        let chain = line.as_object_mut().unwrap();
        assert_eq!(chain.remove("node").unwrap(), "pg-1");
        assert!(chain.remove("seq").unwrap().is_u64());
        assert!(chain.remove("prev").unwrap().is_string());
        assert_eq!(line, serde_json::to_value(record).unwrap());
    }
    let kinds: std::collections::BTreeSet<&str> = all.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "auth_failed",
            "auth_ok",
            "cancel",
            "checkpoint",
            "log_opened",
            "session_denied",
            "session_end",
            "session_start",
            "statement"
        ]
    );
    assert_eq!(all[0]["event"], "log_opened");
    assert!(all.iter().all(|l| l["node"] == "pg-1"), "every line names the node, the log's own too");
    // The node comes before the chain fields (the line reads "who wrote
    // it, where in the chain").
    for line in text.lines() {
        let at = |field: &str| line.rfind(field).unwrap_or_else(|| panic!("no {field} in {line}"));
        let (node, seq, prev) = (at(r#","node":"pg-1","#), at(r#","seq":"#), at(r#","prev":"#));
        assert!(node < seq && seq < prev && !line[prev + 1..].contains(','), "{line}");
    }
    assert_eq!(all.last().unwrap()["event"], "checkpoint", "close signs the tail");
    // Both the null and the filled shapes are covered.
    for part in ["peer", "postgres", "client_transport", "upstream"] {
        assert!(lines.iter().any(|l| l[part].is_null()), "{part} never null");
        assert!(lines.iter().any(|l| !l[part].is_null()), "{part} never filled");
    }
}

/// One filled, valid record of each event kind (the log's own included),
/// as JSON, to break.
fn samples() -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let dir = tempfile::tempdir().unwrap();
    let signer = chain::Signer::generate(&dir.path().join("key.pem")).unwrap();
    let prev = chain::line_hash(b"the line before");
    let log = |event| serde_json::to_value(LogRecord { ts: SystemTime::now(), event }).unwrap();
    all_records()
        .into_iter()
        .filter(|r| r.peer.is_some() && seen.insert(r.event.name()))
        .map(|r| serde_json::to_value(r).unwrap())
        .chain([
            log(LogEvent::LogOpened {
                reason: OpenReason::Reopen,
                version: "0.1.0",
                pid: 42,
                signing_key: Some(signer.public_key().into()),
            }),
            log(LogEvent::Checkpoint {
                records: 1000,
                signing_key: signer.public_key().into(),
                signature: signer.sign(7, &prev),
            }),
        ])
        .map(|mut v| {
            v["node"] = json!("pg-1");
            v["seq"] = json!(7);
            v["prev"] = json!(chain::hex(&prev));
            v
        })
        .inspect(|v| audit_check::validate_value(v, "sample"))
        .collect()
}

fn sample(event: &str) -> Value {
    samples().into_iter().find(|v| v["event"] == event).unwrap()
}

#[track_caller]
fn assert_rejected(v: &Value, why: &str) {
    assert!(!audit_check::errors(v).is_empty(), "audit-schema.json accepts a record with {why}:\n{v}");
}

#[test]
fn unknown_and_secret_looking_fields_are_rejected_everywhere() {
    for s in samples() {
        let event = s["event"].as_str().unwrap().to_string();
        for field in ["unknown_field", "password", "auth_key", "secret_key", "token"] {
            let mut v = s.clone();
            v[field] = json!("hunter2");
            assert_rejected(&v, &format!("extra top-level {field:?} on {event}"));
            for part in ["peer", "postgres", "upstream"] {
                let mut v = s.clone();
                v[part][field] = json!("hunter2");
                assert_rejected(&v, &format!("extra {part}.{field} on {event}"));
            }
        }
    }
}

#[test]
fn every_field_is_required() {
    for s in samples() {
        let event = s["event"].as_str().unwrap();
        for key in s.as_object().unwrap().keys() {
            let mut v = s.clone();
            v.as_object_mut().unwrap().remove(key);
            assert_rejected(&v, &format!("no {key:?} on {event}"));
        }
        for part in ["peer", "postgres", "upstream"] {
            for key in s[part].as_object().into_iter().flat_map(|o| o.keys()) {
                let mut v = s.clone();
                v[part].as_object_mut().unwrap().remove(key);
                assert_rejected(&v, &format!("no {part}.{key} on {event}"));
            }
        }
    }
    let mut denied = sample("session_denied");
    denied.as_object_mut().unwrap().remove("reason");
    assert_rejected(&denied, "a session_denied without reason");
}

#[test]
fn fields_of_one_event_are_refused_on_another() {
    let foreign: &[(&str, &str, Value)] = &[
        ("session_start", "reason", json!("unknown_peer")),
        ("auth_ok", "reason", json!("client_closed")),
        ("auth_ok", "sqlstate", json!(null)),
        ("session_denied", "auth_method", json!("md5")),
        ("cancel", "duration_ms", json!(1)),
        ("session_end", "forwarded", json!(false)),
        ("log_opened", "session_id", json!("0123456789abcdef")),
        ("statement", "reason", json!("client_closed")),
        ("session_end", "fingerprint", json!("0123456789abcdef")),
        ("checkpoint", "peer", json!(null)),
        ("checkpoint", "reason", json!("start")),
    ];
    for (event, key, value) in foreign {
        let mut v = sample(event);
        v[*key] = value.clone();
        assert_rejected(&v, &format!("{key} on {event}"));
    }
}

#[test]
fn malformed_values_are_rejected() {
    let cases: &[(&str, &str, Value)] = &[
        ("session_start", "event", json!("session_begin")),
        ("session_start", "ts", json!("2026-11-23T14:03:07Z")),
        ("session_start", "ts", json!("2026-11-23T14:03:07.123456")),
        ("session_start", "ts", json!("2026-11-23T14:03:07.123456+00:00")),
        ("session_start", "ts", json!("2026-13-23T14:03:07.123456Z")),
        ("session_start", "session_id", json!("0123456789ABCDEF")),
        ("session_start", "session_id", json!("0123456789abcde")),
        ("session_start", "peer_addr", json!("laptop:5432")),
        ("session_start", "client_transport", json!("ssl")),
        ("session_denied", "reason", json!("because")),
        ("session_denied", "side", json!("nobody")),
        ("auth_ok", "auth_method", json!("kerberos")),
        ("auth_failed", "sqlstate", json!("28p01")),
        ("cancel", "target_session_id", json!("not-a-session")),
        ("session_end", "duration_ms", json!(-1)),
        ("session_end", "duration_ms", json!(1.5)),
        ("session_end", "bytes_client_to_upstream", json!("12")),
        ("session_end", "reason", json!("bored")),
        ("statement", "fingerprint", json!("0123")),
        ("statement", "text_status", json!("secret")),
        ("statement", "protocol", json!("copy")),
        ("statement", "duration_us", json!(-1)),
        ("statement", "copy", json!({"direction": "sideways", "bytes": 1})),
        ("session_start", "seq", json!(0)),
        ("session_start", "seq", json!("7")),
        ("session_start", "prev", json!("AB".repeat(32))),
        ("session_start", "prev", json!("ab")),
        ("session_start", "node", json!("pg_1")),
        ("session_start", "node", json!("")),
        ("session_start", "node", json!("-pg")),
        ("session_start", "node", json!("pg-1.tail1234.ts.net")),
        ("session_start", "node", json!("p".repeat(64))),
        ("session_start", "node", json!(null)),
        ("log_opened", "node", json!(1)),
        ("checkpoint", "node", json!(null)),
        ("log_opened", "reason", json!("crash")),
        ("log_opened", "signing_key", json!("ed25519:short")),
        ("log_opened", "pid", json!(0)),
        ("checkpoint", "prev", json!(null)),
        ("checkpoint", "signing_key", json!(null)),
        ("checkpoint", "signature", json!("c2lnbmF0dXJl")),
        ("checkpoint", "records", json!(0)),
    ];
    for (event, key, value) in cases {
        let mut v = sample(event);
        v[*key] = value.clone();
        assert_rejected(&v, &format!("{key} = {value} on {event}"));
    }
    let nested: &[(&str, &str, Value)] = &[
        ("peer", "tailnet_ip", json!("999.0.0.1")),
        ("peer", "tags", json!(["prod"])),
        ("peer", "shared_in", json!("yes")),
        ("postgres", "protocol", json!("2.0")),
        ("postgres", "protocol", json!("3")),
        ("postgres", "user", json!("")),
        ("upstream", "tls_version", json!("TLSv1.1")),
        ("upstream", "cert_sha256", json!("AB".repeat(32))),
        ("upstream", "cert_not_after", json!("tomorrow")),
    ];
    for (part, key, value) in nested {
        let mut v = sample("session_start");
        v[*part][*key] = value.clone();
        assert_rejected(&v, &format!("{part}.{key} = {value}"));
    }
}

#[test]
fn inconsistent_combinations_are_rejected() {
    let mut v = sample("session_denied");
    v["reason"] = json!("upstream_tls");
    v["side"] = json!("client");
    assert_rejected(&v, "an upstream reason blamed on the client");

    let mut v = sample("session_end");
    v["reason"] = json!("client_terminated");
    v["ended_by"] = json!("proxy");
    assert_rejected(&v, "a client Terminate ended by the proxy");

    let mut v = sample("cancel");
    v["reason"] = json!("unknown_key");
    v["forwarded"] = json!(true);
    assert_rejected(&v, "a forwarded cancel for an unknown key");

    let mut v = sample("cancel");
    v["reason"] = json!("forwarded");
    v["forwarded"] = json!(true);
    v["target_session_id"] = json!(null);
    assert_rejected(&v, "a forwarded cancel without a target");

    let mut v = sample("cancel");
    v["reason"] = json!("unknown_key");
    v["forwarded"] = json!(false);
    v["target_session_id"] = json!(new_session_id());
    assert_rejected(&v, "an unknown key that names a session");

    let mut v = sample("cancel");
    v["reason"] = json!("other_node");
    v["forwarded"] = json!(true);
    assert_rejected(&v, "a cancel from another node marked forwarded");

    let mut v = sample("statement");
    v["text_status"] = json!("redacted");
    assert_rejected(&v, "a redacted statement with text");

    let mut v = sample("statement");
    v["outcome"] = json!("error");
    assert_rejected(&v, "a failed statement with a command tag");

    let mut v = sample("statement");
    v["params"] = json!(["hunter2"]);
    assert_rejected(&v, "bind values beside normalized text");

    let mut v = sample("statement");
    v["sqlstate"] = json!("22012");
    assert_rejected(&v, "a statement that succeeded with a SQLSTATE");
}

#[test]
#[should_panic(expected = "audit.jsonl:2")]
fn validate_lines_names_the_offending_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let good = sample("session_start");
    let mut bad = good.clone();
    bad["password"] = json!("hunter2");
    let [good, bad] = <[String; 2]>::try_from(stamped(&[good, bad])).unwrap();
    std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
    audit_check::validate_lines(&path);
}

#[test]
#[should_panic(expected = "unterminated line")]
fn validate_lines_refuses_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    audit_check::validate_lines(&torn_log(dir.path()));
}

/// A log of one record followed by the first 20 bytes of another.
fn torn_log(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("audit.jsonl");
    let good = sample("session_start").to_string();
    std::fs::write(&path, format!("{good}\n{}", &good[..20])).unwrap();
    path
}

#[test]
fn validate_live_lines_waits_for_a_line_being_written() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let [a, b] = <[String; 2]>::try_from(stamped(&[sample("session_start"), sample("session_end")])).unwrap();
    std::fs::write(&path, format!("{a}\n{}", &b[..20])).unwrap();
    let rest = b[20..].to_string();
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(format!("{rest}\n").as_bytes()).unwrap();
        })
    };
    let records = audit_check::validate_live_lines(&path, Duration::from_secs(30));
    writer.join().unwrap();
    let events: Vec<&str> = records.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["session_start", "session_end"]);
}

#[test]
#[should_panic(expected = "audit.jsonl:2: prev is not the line before's SHA-256")]
fn validate_lines_checks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut lines = stamped(&[sample("session_start"), sample("session_end")]);
    lines[0] = lines[0].replace("alice@example.com", "mallory@example.com");
    std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    audit_check::validate_lines(&path);
}

#[test]
#[should_panic(expected = "unterminated line")]
fn validate_live_lines_refuses_a_tail_that_stays_torn() {
    let dir = tempfile::tempdir().unwrap();
    audit_check::validate_live_lines(&torn_log(dir.path()), Duration::from_millis(100));
}
