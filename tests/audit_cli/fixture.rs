//! The fixture: a realistic audit log, written by the proxy's own writer
//! from real `Record`s, each line with a label for the assertions.

use super::audit_check;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tailgres::audit::{
    AuditDest, AuditLog, AuditOptions, AuthMethod, CancelOutcome, ClientTransport, DenyReason, EndReason,
    Event, Peer, PostgresInfo, ProtocolVersion, Record, SessionEnd, SqlState, TlsVersion, UpstreamInfo,
};

const MIN: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    /// Each line of the file and its label, in file order.
    pub lines: Vec<(String, &'static str)>,
}

impl Fixture {
    pub fn label(&self, line: &str) -> &'static str {
        self.lines.iter().find(|(l, _)| l == line).unwrap_or_else(|| panic!("not a fixture line: {line}")).1
    }

    /// The labels of `stdout`'s lines, which must all be fixture lines.
    pub fn labels(&self, stdout: &str) -> Vec<&'static str> {
        stdout.lines().map(|l| self.label(l)).collect()
    }

    pub fn line(&self, label: &str) -> &str {
        &self.lines.iter().find(|(_, l)| *l == label).unwrap().0
    }

    pub fn ts(&self, label: &str) -> String {
        let v: Value = serde_json::from_str(self.line(label)).unwrap();
        v["ts"].as_str().unwrap().to_owned()
    }

    pub fn text(&self) -> String {
        self.lines.iter().map(|(l, _)| format!("{l}\n")).collect()
    }
}

fn peer(login: &str, tags: &[&str], node: &str, stable_id: &str, ip: &str) -> Peer {
    Peer {
        stable_id: stable_id.into(),
        node_name: node.into(),
        user_login: login.into(),
        user_display_name: login.split('@').next().unwrap().into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        tailnet_ip: ip.parse().unwrap(),
        os: "linux".into(),
        shared_in: false,
    }
}

fn pg(user: &str, database: &str) -> PostgresInfo {
    PostgresInfo {
        user: user.into(),
        database: database.into(),
        application_name: Some("psql".into()),
        protocol: ProtocolVersion::V3_0,
    }
}

fn upstream() -> UpstreamInfo {
    UpstreamInfo {
        address: "db.internal:5432".into(),
        server_name: "db.internal".into(),
        tls_version: TlsVersion::Tls13,
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
        cert_sha256: [0x5a; 32],
        cert_not_after: None,
    }
}

fn end(c2u: u64, u2c: u64, secs: u64, reason: EndReason, detail: Option<&str>) -> Event {
    Event::SessionEnd(SessionEnd {
        duration: Duration::from_secs(secs),
        bytes_client_to_upstream: c2u,
        bytes_upstream_to_client: u2c,
        reason,
        detail: detail.map(str::to_owned),
    })
}

/// Session ids as the proxy makes them (16 lowercase hex), fixed so that
/// tests can name them.
fn sid(n: u64) -> String {
    format!("{:016x}", 0x5e55_0000_0000_0000 | n)
}

/// A week and a half of a small tailnet's traffic, ending a few minutes
/// before now, in the order the proxy would have written it.
fn records(now: SystemTime) -> Vec<(&'static str, Record)> {
    let ago = |s: u64| now - Duration::from_secs(s);
    let v4 = |ip: &str| -> SocketAddr { format!("{ip}:41234").parse().unwrap() };
    let alice = peer("alice@example.com", &[], "laptop.tail1234.ts.net", "nALICE1CNTRL", "100.64.0.3");
    let alice6 =
        peer("alice@example.com", &[], "laptop.tail1234.ts.net", "nALICE1CNTRL", "fd7a:115c:a1e0::3");
    let ci = peer(
        "tagged-devices",
        &["tag:ci", "tag:prod"],
        "ci-runner.tail1234.ts.net",
        "nCI7CNTRL",
        "100.64.0.7",
    );
    let bob = peer("bob@example.com", &[], "desk.tail1234.ts.net", "nBOB9CNTRL", "100.64.0.9");

    // alice, three days ago, over TLS
    let s1 = Record::new(sid(1), v4("100.64.0.3"), Event::SessionStart)
        .with_peer(alice.clone())
        .with_postgres(pg("alice", "app"))
        .with_client_transport(ClientTransport::Tls);
    let s1u = s1.clone().with_upstream(upstream());
    // alice again, two hours ago, from the same laptop's IPv6 address
    let s2 = Record::new(sid(2), "[fd7a:115c:a1e0::3]:50000".parse().unwrap(), Event::SessionStart)
        .with_peer(alice6)
        .with_postgres(pg("alice", "app"))
        .with_client_transport(ClientTransport::DirectTls);
    let s2u = s2.clone().with_upstream(upstream());
    // CI, a tagged device, an hour ago; a second connection cancels its query
    let s3 = Record::new(sid(3), v4("100.64.0.7"), Event::SessionStart)
        .with_peer(ci.clone())
        .with_postgres(pg("app_ci", "app"))
        .with_client_transport(ClientTransport::Plaintext);
    let s3u = s3.clone().with_upstream(upstream());
    let c3 = Record::new(
        sid(0x3c),
        v4("100.64.0.7"),
        Event::cancel(CancelOutcome::Forwarded { target_session_id: sid(3) }),
    )
    .with_peer(ci);
    // bob, refused the payroll database; the detail carries a terminal
    // escape, as a hostile client name might
    let s4 = Record::new(
        sid(4),
        v4("100.64.0.9"),
        Event::denied(DenyReason::NotAuthorized, "no grant lets bob use postgres@payroll \u{1b}[2J"),
    )
    .with_peer(bob.clone())
    .with_postgres(pg("postgres", "payroll"))
    .with_client_transport(ClientTransport::Tls);
    // bob, wrong password for app
    let s5 = Record::new(sid(5), v4("100.64.0.9"), Event::SessionStart)
        .with_peer(bob)
        .with_postgres(pg("bob", "app"))
        .with_client_transport(ClientTransport::Tls)
        .with_upstream(upstream());
    // a peer the tailnet does not know: no identity, no startup
    let unknown = |n| {
        Record::new(
            sid(n),
            v4("100.64.0.99"),
            Event::denied(DenyReason::UnknownPeer, "no node has 100.64.0.99"),
        )
    };

    vec![
        ("u1.denied", unknown(0x61).with_ts(ago(10 * DAY))),
        ("s1.start", s1.with_ts(ago(3 * DAY))),
        (
            "s1.auth_ok",
            s1u.with_event(Event::auth_ok(AuthMethod::PasswordRelayScramSha256Plus))
                .with_ts(ago(3 * DAY - 1)),
        ),
        (
            "s1.end",
            s1u.with_event(end(12_000, 480_000, 10 * MIN, EndReason::ClientTerminated, None))
                .with_ts(ago(3 * DAY - 10 * MIN)),
        ),
        ("s2.start", s2.with_ts(ago(2 * HOUR))),
        (
            "s2.auth_ok",
            s2u.with_event(Event::auth_ok(AuthMethod::PasswordRelayScramSha256Plus))
                .with_ts(ago(2 * HOUR - 1)),
        ),
        ("s3.start", s3.with_ts(ago(HOUR))),
        ("s3.auth_ok", s3u.with_event(Event::auth_ok(AuthMethod::ScramSha256)).with_ts(ago(HOUR - 1))),
        (
            "s2.end",
            s2u.with_event(end(3_000, 90_000, HOUR, EndReason::ClientClosed, None)).with_ts(ago(HOUR - 2)),
        ),
        ("c3.cancel", c3.with_ts(ago(50 * MIN))),
        (
            "s3.end",
            s3u.with_event(end(
                700,
                5_000,
                15 * MIN,
                EndReason::UpstreamClosed,
                Some("server closed the connection"),
            ))
            .with_ts(ago(45 * MIN)),
        ),
        ("s4.denied", s4.with_ts(ago(30 * MIN))),
        ("s5.start", s5.clone().with_ts(ago(20 * MIN))),
        (
            "s5.auth_failed",
            s5.with_event(Event::auth_failed(
                AuthMethod::Md5,
                SqlState::parse("28P01"),
                "password authentication failed for user \"bob\"",
            ))
            .with_ts(ago(20 * MIN - 1)),
        ),
        (
            "s5.end",
            s5.with_event(end(0, 0, 1, EndReason::AuthFailed, Some("password authentication failed")))
                .with_ts(ago(20 * MIN - 1)),
        ),
        ("u2.denied", unknown(0x62).with_ts(ago(5 * MIN))),
    ]
}

/// Writes the records through the proxy's own audit writer.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let labelled = records(SystemTime::now());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (log, writer) = AuditLog::open(AuditDest::File(path.clone())).await.unwrap();
        for (_, r) in &labelled {
            log.record(r).await.unwrap();
        }
        log.close().await;
        writer.await.unwrap();
    });
    // What the proxy writes, the schema accepts.
    let values = audit_check::validate_lines(&path);
    assert_eq!(values.len(), labelled.len());
    let text = std::fs::read_to_string(&path).unwrap();
    // The writer's own records (the log_opened heading the file) are not
    // the fixture's: `tailgres audit` leaves them out unless asked.
    let records = text.lines().filter(|l| !audit_check::is_log_record(&serde_json::from_str(l).unwrap()));
    let lines = records.zip(labelled.iter().map(|(l, _)| *l)).map(|(t, l)| (t.to_owned(), l)).collect();
    Fixture { _dir: dir, path, lines }
}

pub fn path(f: &Fixture) -> &str {
    f.path.to_str().unwrap()
}

/// A fleet of two nodes behind one Service, each with its own log, written
/// by the real writer: pg-1 (rotated once) and pg-2, their records
/// interleaved in time.
pub struct Fleet {
    _dir: tempfile::TempDir,
    /// pg-1's rotated file, pg-1's current file, pg-2's file.
    pub files: [PathBuf; 3],
    /// Every session record of all three files and its label, in time order.
    pub lines: Vec<(String, &'static str)>,
}

/// The fixture's sessions that pg-1 served, before and after its rotation;
/// pg-2 served the rest.
const PG1_ROTATED: &[&str] = &["u1.denied", "s1.start", "s1.auth_ok", "s1.end"];
const PG1_CURRENT: &[&str] = &["s3.start", "s3.auth_ok", "c3.cancel", "s3.end"];

impl Fleet {
    pub fn label(&self, line: &str) -> &'static str {
        self.lines.iter().find(|(l, _)| l == line).unwrap_or_else(|| panic!("not a fleet line: {line}")).1
    }

    /// The labels of `stdout`'s lines, which must all be lines of the files.
    pub fn labels(&self, stdout: &str) -> Vec<&'static str> {
        stdout.lines().map(|l| self.label(l)).collect()
    }

    /// Every label, in time order.
    pub fn all(&self) -> Vec<&'static str> {
        self.lines.iter().map(|(_, l)| *l).collect()
    }

    /// The node that wrote the record labelled `label`.
    pub fn node(label: &str) -> &'static str {
        if PG1_ROTATED.contains(&label) || PG1_CURRENT.contains(&label) {
            "pg-1"
        } else {
            "pg-2"
        }
    }

    pub fn paths(&self) -> Vec<&str> {
        self.files.iter().map(|p| p.to_str().unwrap()).collect()
    }
}

pub fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    for node in ["pg-1", "pg-2"] {
        std::fs::create_dir(dir.path().join(node)).unwrap();
    }
    let files = [
        dir.path().join("pg-1/audit.jsonl.1"),
        dir.path().join("pg-1/audit.jsonl"),
        dir.path().join("pg-2/audit.jsonl"),
    ];
    let labelled = records(SystemTime::now());
    let of = |node: &'static str| labelled.iter().filter(move |(l, _)| Fleet::node(l) == node);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let open = |node: &str, path: &PathBuf| {
            let options = AuditOptions { node: node.into(), ..AuditOptions::default() };
            AuditLog::open_with(AuditDest::File(path.clone()), options)
        };
        // pg-2's log is begun first: files are not ordered by when they
        // were written.
        let (log, writer) = open("pg-2", &files[2]).await.unwrap();
        for (_, r) in of("pg-2") {
            log.record(r).await.unwrap();
        }
        log.close().await;
        writer.await.unwrap();
        // pg-1, its log rotated (renamed, then SIGHUP) before s3.
        let (log, writer) = open("pg-1", &files[1]).await.unwrap();
        for (label, r) in of("pg-1") {
            if *label == PG1_CURRENT[0] {
                std::fs::rename(&files[1], &files[0]).unwrap();
                log.reopen();
            }
            log.record(r).await.unwrap();
        }
        log.close().await;
        writer.await.unwrap();
    });
    // What the proxy writes, the schema accepts; each file is one chain.
    let mut lines = Vec::new();
    for (path, labels) in
        files.iter().zip([PG1_ROTATED.to_vec(), PG1_CURRENT.to_vec(), of("pg-2").map(|(l, _)| *l).collect()])
    {
        let values = audit_check::validate_lines(path);
        assert_eq!(values.len(), labels.len(), "{}", path.display());
        let text = std::fs::read_to_string(path).unwrap();
        let records = text.lines().filter(|l| !audit_check::is_log_record(&serde_json::from_str(l).unwrap()));
        lines.extend(records.zip(labels).map(|(t, l)| (t.to_owned(), l)));
    }
    let when = |label: &str| labelled.iter().position(|(l, _)| *l == label).unwrap();
    lines.sort_by_key(|(_, l)| when(l));
    Fleet { _dir: dir, files, lines }
}
