//! A fleet (README "Fleet"): three tailgres nodes (pg-1..3, tagged tag:pg)
//! serve the Tailscale Service svc:pg on the lab's loopback tailnet, and
//! three client nodes reach it by its name. Sessions land on more than one
//! node; a cancel sent to the wrong member cancels the right query; a
//! forged PROXY header from a local process and a fleet cancel from a
//! non-member are refused; one node drained (SIGTERM) and one killed
//! (SIGKILL), new sessions still succeed through the survivor while its
//! session carries on. How long a client sees errors while its node goes
//! is printed (a figure, not an assertion).
mod common;

use common::lab::{LabOptions, LabUp};
use common::within;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

/// The fleet's nodes as the lab describes them.
struct Node {
    hostname: String,
    pid: u32,
    audit: PathBuf,
    log: PathBuf,
}

fn nodes(lab: &LabUp) -> Vec<Node> {
    lab.info["fleet"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| Node {
            hostname: n["hostname"].as_str().unwrap().into(),
            pid: n["pid"].as_u64().unwrap() as u32,
            audit: n["audit_log"].as_str().unwrap().into(),
            log: n["log"].as_str().unwrap().into(),
        })
        .collect()
}

fn records(n: &Node) -> Vec<Value> {
    if !n.audit.exists() {
        return vec![];
    }
    common::audit::validate_live_lines(&n.audit, common::audit::LIVE_TAIL_WAIT)
}

/// Waits for a record matching `pred` in node `n`'s log.
async fn wait_record(n: &Node, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    within(what, async {
        loop {
            if let Some(r) = records(n).into_iter().find(|r| pred(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Which node wrote application `app`'s session_start.
async fn node_of(nodes: &[Node], app: &str) -> usize {
    within(&format!("{app}'s session_start"), async {
        loop {
            for (i, n) in nodes.iter().enumerate() {
                if records(n).iter().any(|r| r["event"] == "session_start" && r["postgres"]["application_name"] == app) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn connect_to(forward: &str, app: &str) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (host, port) = forward.rsplit_once(':').unwrap();
    let conn = format!(
        "host={host} port={port} user=role_scram password=scram-pass dbname=app sslmode=disable \
         application_name={app} connect_timeout=10"
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    Ok((client, tokio::spawn(async move {
        let _ = connection.await;
    })))
}

/// A session through client `i`'s forward to the Service.
async fn connect(lab: &LabUp, i: usize, app: &str) -> (Client, tokio::task::JoinHandle<()>) {
    within("connect through the Service", connect_to(&lab.forward(i), app))
        .await
        .unwrap_or_else(|e| panic!("connect through the Service: {e}"))
}

/// Client `i`'s forward to node `hostname`'s own address.
fn node_forward(lab: &LabUp, i: usize, hostname: &str) -> String {
    lab.info["clients"][i]["node_forwards"][hostname].as_str().unwrap().to_string()
}

/// The Service's loopback listener of node `n`, from its log.
fn service_listener(n: &Node) -> String {
    let log = std::fs::read_to_string(&n.log).unwrap();
    let line = log.lines().find(|l| l.contains("serving the Tailscale Service")).expect("the Service line");
    let at = line.find("local=").expect("local=") + 6;
    line[at..].split_whitespace().next().unwrap().to_string()
}

async fn sleeping(lab: &LabUp, app: &str) -> usize {
    let sql = format!(
        "select count(*) from pg_stat_activity where application_name = '{app}' and wait_event = 'PgSleep'"
    );
    lab.psql_admin(&sql).await.trim().parse().unwrap()
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// New sessions from client `i` until one succeeds: how long it took and
/// how many attempts failed first.
async fn until_a_session(lab: &LabUp, i: usize, app: &str) -> (Duration, usize, Client) {
    let began = Instant::now();
    let mut failed = 0;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(15), connect_to(&lab.forward(i), app)).await;
        match attempt {
            Ok(Ok((c, _))) if c.simple_query("select 1").await.is_ok() => return (began.elapsed(), failed, c),
            _ => failed += 1,
        }
        assert!(began.elapsed() < Duration::from_secs(90), "no session through the Service for 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_one_service() {
    let lab = LabUp::start(LabOptions {
        clients: vec!["alice", "bob", "carol"],
        fleet: 3,
        tailgres_args: vec!["--shutdown-grace=3s"],
        ..Default::default()
    })
    .await;
    let nodes = nodes(&lab);
    assert_eq!(nodes.len(), 3);

    // 1. One session per client: they land on more than one node.
    let mut sessions = Vec::new();
    let mut landed = Vec::new();
    for i in 0..3 {
        let app = format!("fleet-{i}");
        let s = connect(&lab, i, &app).await;
        s.0.simple_query("select 1").await.unwrap();
        // Some megabytes each way through the node's relay for Service sockets.
        let big: String = s.0.query_one("select repeat('x', 3000000)", &[]).await.unwrap().get(0);
        assert_eq!(big.len(), 3_000_000);
        let back: i32 = s.0.query_one("select length($1::text)", &[&big]).await.unwrap().get(0);
        assert_eq!(back, 3_000_000);
        landed.push(node_of(&nodes, &app).await);
        sessions.push(s);
    }
    let mut distinct = landed.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "every session landed on one node: {landed:?}");
    let r = wait_record(&nodes[landed[0]], "session_start", |r| r["event"] == "session_start").await;
    assert_eq!(r["peer"]["node_name"], lab.info["clients"][0]["tailnet_name"], "the client, from the PROXY header: {r}");

    // 2. alice's query, cancelled through a member that does not hold it.
    let (home, other) = (landed[0], (landed[0] + 1) % 3);
    let app = "fleet-cancel";
    let (client, _driver) = connect(&lab, 0, app).await;
    assert_eq!(node_of(&nodes, app).await, home, "alice's sessions go to one node");
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.batch_execute("select pg_sleep(60)").await });
    within("the query to run", async {
        while sleeping(&lab, app).await != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let wrong = node_forward(&lab, 0, &nodes[other].hostname);
    token.cancel_query_raw(TcpStream::connect(&wrong).await.unwrap(), NoTls).await.unwrap();
    let e = within("the cancel to take effect", query).await.unwrap().expect_err("pg_sleep(60) was cancelled");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    let passed = wait_record(&nodes[other], "the passed-on cancel", |r| r["event"] == "cancel").await;
    assert_eq!(passed["reason"], "to_peer", "{passed}");
    let home_name = format!("{}.{}", nodes[home].hostname, lab.info["magic_dns_suffix"].as_str().unwrap());
    assert_eq!(passed["fleet_peer"], home_name, "{passed}");
    let done = wait_record(&nodes[home], "the cancel at home", |r| r["event"] == "cancel").await;
    assert_eq!(done["reason"], "forwarded", "{done}");
    assert_eq!(done["peer"]["node_name"], lab.info["clients"][0]["tailnet_name"], "the record is alice's: {done}");

    // 3. bob (no fleet tag) passes alice's cancel on as if he were a member.
    let key = {
        let (c, _d) = connect(&lab, 0, "fleet-key").await;
        let mut raw = Vec::new();
        // tokio-postgres writes the CancelRequest and waits for the close.
        let (mut a, mut b) = tokio::io::duplex(256);
        let t = c.cancel_token();
        let w = tokio::spawn(async move { t.cancel_query_raw(&mut a, NoTls).await });
        let mut buf = [0u8; 64];
        let n = b.read(&mut buf).await.unwrap();
        raw.extend_from_slice(&buf[..n]);
        drop(b);
        let _ = w.await;
        raw
    };
    let (pid, secret) = (u32::from_be_bytes(key[8..12].try_into().unwrap()), &key[12..]);
    let alice_ip: std::net::IpAddr = lab.info["clients"][0]["tailnet_ips"][0].as_str().unwrap().parse().unwrap();
    let forged = tailgres::pgwire::fleet_cancel_request(pid, secret, std::net::SocketAddr::new(alice_ip, 1));
    let mut s = TcpStream::connect(node_forward(&lab, 1, &nodes[home].hostname)).await.unwrap();
    s.write_all(&forged).await.unwrap();
    let mut rest = Vec::new();
    let _ = within("the refused fleet cancel closes", s.read_to_end(&mut rest)).await;
    let r = wait_record(&nodes[home], "not_fleet_member", |r| r["reason"] == "not_fleet_member").await;
    assert_eq!(r["peer"]["node_name"], lab.info["clients"][1]["tailnet_name"], "{r}");

    // 4. A valid PROXY header, forged by a local process (this test).
    let local = service_listener(&nodes[home]);
    let mut s = TcpStream::connect(&local).await.unwrap();
    let node_ip: std::net::SocketAddr = "100.64.0.1:5432".parse().unwrap();
    // (tailgres may close it before these are written: a reset is fine.)
    let mut forged = tailgres::proxy_header::encode(std::net::SocketAddr::new(alice_ip, 40000), node_ip, &[]);
    forged.extend(common::wire::startup(196608, &[("user", "role_scram"), ("database", "app")]));
    let _ = s.write_all(&forged).await;
    let mut rest = Vec::new();
    let _ = within("the forged connection closes", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "a forged header got an answer: {rest:?}");
    let r = wait_record(&nodes[home], "service_connection_refused", |r| r["reason"] == "service_connection_refused").await;
    assert!(r["detail"].as_str().unwrap().contains("another local process"), "{r}");

    // 5. A node drained, then one killed: new sessions go to the others,
    // the survivor's session carries on.
    let gone = [landed[0], (landed[0] + 1) % 3];
    let survivor = (0..3).find(|i| !gone.contains(i)).unwrap();
    signal(nodes[gone[0]].pid, "-TERM");
    // alice's session there ends at once, told why (its client is about to
    // be routed elsewhere, which would strand it).
    let e = within("the drained node's Service session ends", async {
        loop {
            if let Err(e) = sessions[0].0.simple_query("select 1").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    assert!(e.is_closed() || msg.contains("leaving the Service"), "{e:?}");
    let (took, failed, _c) = until_a_session(&lab, 0, "fleet-after-term").await;
    eprintln!("FIGURE after SIGTERM of {}: a new session in {took:?}, {failed} failed attempts first", nodes[gone[0]].hostname);
    signal(nodes[gone[1]].pid, "-KILL");
    let client_of = |n: usize| landed.iter().position(|l| *l == n);
    let moved = client_of(gone[1]).unwrap_or(1);
    let (took, failed, _c) = until_a_session(&lab, moved, "fleet-after-kill").await;
    eprintln!("FIGURE after SIGKILL of {}: a new session in {took:?}, {failed} failed attempts first", nodes[gone[1]].hostname);
    for (i, app) in [(0, "fleet-survivor-0"), (1, "fleet-survivor-1"), (2, "fleet-survivor-2")] {
        let (_, _, c) = until_a_session(&lab, i, app).await;
        drop(c);
        assert_eq!(node_of(&nodes, app).await, survivor, "{app} went to a node that is gone");
    }
    if let Some(i) = client_of(survivor) {
        sessions[i].0.simple_query("select 1").await.expect("the survivor's session carries on");
    }
    // The drained node ended its sessions with records of their own.
    wait_record(&nodes[gone[0]], "the drained node's session_end", |r| {
        r["event"] == "session_end" && r["postgres"]["application_name"] == "fleet-0"
    })
    .await;
    lab.stop().await;
}
