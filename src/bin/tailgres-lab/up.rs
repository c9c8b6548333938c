//! `tailgres-lab up`: the whole world on loopback, in the current network
//! namespace — the loopback tailnet (tslab control), a TLS PostgreSQL from
//! a throwaway CA (or the one given), the real `tailgres` binary joined to
//! the tailnet, and client nodes forwarding loopback ports through the
//! tailnet to the proxy's MagicDNS name. Writes a JSON description and runs
//! until SIGINT/SIGTERM or until one of its children dies.

use crate::pg::{self, Pg, PgOptions, UpstreamCert};
use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The proxy's tailnet hostname in the lab.
pub const PROXY_HOSTNAME: &str = "pg";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Working directory (state, logs, audit log); default: a new temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Write the endpoints as JSON here (also printed as one line on stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A client node: NAME, or NAME=tag:a,tag:b for a tagged device. Each
    /// forwards a loopback port to the proxy. Default: one client "laptop".
    #[arg(long = "client")]
    pub clients: Vec<String>,
    /// Loopback port of the first client's forward (0 = any).
    #[arg(long, default_value_t = 0)]
    pub forward_port: u16,
    /// Use this database instead of starting one (HOST:PORT).
    #[arg(long)]
    pub upstream: Option<String>,
    #[arg(long, requires = "upstream")]
    pub upstream_ca: Option<PathBuf>,
    #[arg(long, requires = "upstream")]
    pub upstream_server_name: Option<String>,
    /// Certificate of the lab's own database (to see tailgres refuse it).
    #[arg(long, value_enum, default_value_t = UpstreamCert::Good)]
    pub upstream_cert: UpstreamCert,
    /// Start the lab's database with log_connections = on.
    #[arg(long)]
    pub log_connections: bool,
    /// Run tailgres with identity login (--login identity and the lab's
    /// identity CA, which the lab's database trusts for role_identity).
    #[arg(long, conflicts_with = "upstream")]
    pub identity_login: bool,
    /// Run tailgres with --auth scram-verifier, looking verifiers up as the
    /// lab database's tailgres_auth role (its password in a file).
    #[arg(long, conflicts_with_all = ["upstream", "identity_login"])]
    pub scram_verifier: bool,
    /// The proxy's audit log (default: DIR/audit.jsonl).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Run a fleet of N tailgres nodes (pg-1 .. pg-N, tagged tag:pg) behind
    /// the Tailscale Service svc:pg instead of one proxy; clients reach the
    /// Service by its name (pg.<suffix>). Each node has its own audit log
    /// (DIR/audit-pg-I.jsonl), and a node that exits does not stop the lab.
    #[arg(long, default_value_t = 0, conflicts_with = "audit_log")]
    pub fleet: u8,
    /// The tailgres binary (default: next to this one).
    #[arg(long)]
    pub tailgres: Option<PathBuf>,
    /// The tslab binary (default: $TAILGRES_TSLAB, else target/tslab).
    #[arg(long)]
    pub tslab: Option<PathBuf>,
    /// Extra arguments for tailgres, after `--`.
    #[arg(last = true)]
    pub tailgres_args: Vec<String>,
}

/// A child whose stdout's first line is its ready JSON; stderr to a file.
struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    async fn spawn(
        name: &str,
        mut cmd: Command,
        dir: &Path,
        ready_line: bool,
    ) -> anyhow::Result<(Proc, Value)> {
        let stderr = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&stderr).with_context(|| format!("create {}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stderr(file).kill_on_drop(true);
        cmd.envs(crate::lab_env::lab_env());
        cmd.stdout(if ready_line { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
        let mut ready = Value::Null;
        if ready_line {
            let out = child.stdout.take().expect("piped");
            let mut lines = BufReader::new(out).lines();
            let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await;
            let line = match line {
                Ok(Ok(Some(l))) => l,
                other => {
                    let _ = child.start_kill();
                    bail!("{name} did not report ready ({other:?}); its log:\n{}", tail(&stderr));
                }
            };
            ready = serde_json::from_str(&line).with_context(|| format!("{name} ready line {line:?}"))?;
        }
        Ok((Proc { child, stderr }, ready))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-s", "TERM", &pid.to_string()]).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().ok_or_else(|| anyhow!("no parent of {}", exe.display()))?.join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!("{} not found: build it (cargo build) or pass its path", p.display())
    }
}

fn tslab_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given.or_else(|| std::env::var_os("TAILGRES_TSLAB").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    // target/debug/tailgres-lab -> target/tslab
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("tslab");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("tslab not found: build it (cd vendor && go build -o ../target/tslab ./cmd/tslab) or pass --tslab")
}

/// Refuses to run where tailnet traffic could leave the machine.
fn require_loopback_only_namespace() -> anyhow::Result<()> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")?;
    let ifaces: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    if ifaces.iter().any(|i| *i != "lo") {
        bail!(
            "tailgres-lab runs only in a network namespace with nothing but loopback (found {ifaces:?}); \
             use scripts/demo, or: unshare --net sh -c 'ip link set lo up && tailgres-lab up'"
        );
    }
    Ok(())
}

/// A fleet's Service and the tag its nodes carry.
const FLEET_SERVICE: &str = "svc:pg";
const FLEET_TAG: &str = "tag:pg";

/// Fails when a proxy exited during start or time ran out; else waits a
/// moment before the next check.
async fn waiting_or_bail(proxies: &mut [(String, Proc, PathBuf)], deadline: Instant) -> anyhow::Result<()> {
    for (name, p, _) in proxies.iter_mut() {
        if let Ok(Some(status)) = p.child.try_wait() {
            bail!("tailgres {name} exited ({status}) during start; its log:\n{}", tail(&p.stderr));
        }
    }
    if Instant::now() > deadline {
        let logs: Vec<String> = proxies.iter().map(|(n, p, _)| format!("{n}:\n{}", tail(&p.stderr))).collect();
        bail!("tailgres did not answer through the tailnet in time; its log:\n{}", logs.join("\n"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// One HTTP/1.1 request to the lab's admin API (loopback): status and body.
async fn http(base: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(host).await.with_context(|| format!("admin API at {host}"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let code = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, mut body) = resp.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or_default();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        // size CRLF data CRLF ... 0 CRLF CRLF
        let (mut rest, mut joined) = (body.as_str(), String::new());
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            joined.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        body = joined;
    }
    Ok((code, body))
}

/// Connects through a forward and sends an SSLRequest; the proxy answers
/// with one byte once the whole path (client node, tailnet, proxy) works.
async fn probe(forward: &str) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(forward).await.ok()?;
        s.write_all(&tailgres::pgwire::SSL_REQUEST_PACKET).await.ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        Some(b[0] == b'S' || b[0] == b'N')
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.ok().flatten().unwrap_or(false)
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    require_loopback_only_namespace()?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("tailgres-lab-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let started = Instant::now();

    // 1. The tailnet.
    let mut cmd = Command::new(tslab_binary(a.tslab.clone())?);
    cmd.arg("control");
    let (control, ready) = Proc::spawn("control", cmd, &dir, true).await?;
    let control_url = ready["control_url"].as_str().context("control_url")?.to_string();
    let admin_url = ready["admin_url"].as_str().context("admin_url")?.to_string();
    let suffix = ready["magic_dns_suffix"].as_str().context("suffix")?.to_string();

    // 2. The database.
    let mut pg: Option<Pg> = None;
    let (up_addr, up_ca, up_name) = match &a.upstream {
        Some(u) => (u.clone(), a.upstream_ca.clone(), a.upstream_server_name.clone()),
        None => {
            let p = Pg::start(PgOptions {
                cert: a.upstream_cert,
                log_connections: a.log_connections,
                ..PgOptions::new(dir.join("postgres"))
            })
            .await?;
            let v = (format!("{}:{}", p.host, p.port), Some(p.ca_file.clone()), Some(p.server_name.clone()));
            pg = Some(p);
            v
        }
    };

    // 3. The proxy: the real binary, joined to the lab tailnet.
    let audit_log = a.audit_log.clone().unwrap_or_else(|| dir.join("audit.jsonl"));
    // A log that exists already is a restart onto it: left as it is.
    let new_log = !audit_log.exists();
    let tailgres = match &a.tailgres {
        Some(p) => p.clone(),
        None => sibling_binary("tailgres")?,
    };
    let names: Vec<String> = if a.fleet == 0 {
        vec![PROXY_HOSTNAME.to_string()]
    } else {
        // The Service first: its hosts are recognised as they advertise it.
        let (code, body) = http(&admin_url, "PUT", &format!("/services/{FLEET_SERVICE}"), r#"{"ports":[5432]}"#).await?;
        anyhow::ensure!(code == 200, "defining {FLEET_SERVICE} in the lab's control: {code} {body}");
        (1..=a.fleet).map(|i| format!("{PROXY_HOSTNAME}-{i}")).collect()
    };
    let mut proxies = Vec::new();
    for name in &names {
        let (state, log) = if a.fleet == 0 {
            (dir.join("proxy-state"), audit_log.clone())
        } else {
            (dir.join(format!("state-{name}")), dir.join(format!("audit-{name}.jsonl")))
        };
        let mut cmd = Command::new(&tailgres);
        cmd.arg(format!("--upstream={up_addr}"))
            .arg(format!("--hostname={name}"))
            .arg(format!("--state-dir={}", state.display()))
            .arg(format!("--control-url={control_url}"))
            .arg(format!("--audit-log={}", log.display()));
        if a.fleet > 0 {
            cmd.arg(format!("--advertise-tags={FLEET_TAG}"))
                .arg(format!("--service={FLEET_SERVICE}"))
                .arg(format!("--fleet-tag={FLEET_TAG}"));
        }
        if let Some(ca) = &up_ca {
            cmd.arg(format!("--upstream-ca={}", ca.display()));
        }
        if let Some(n) = &up_name {
            cmd.arg(format!("--upstream-server-name={n}"));
        }
        if let (true, Some(p)) = (a.identity_login, &pg) {
            cmd.arg("--login=identity")
                .arg(format!("--identity-ca-cert={}", p.identity_ca_file.display()))
                .arg(format!("--identity-ca-key={}", p.identity_key_file.display()));
        }
        if a.scram_verifier {
            let file = dir.join("verifier-password");
            std::fs::write(&file, crate::pg::VERIFIER_PASSWORD)?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            cmd.arg("--auth=scram-verifier").arg(format!("--verifier-password-file={}", file.display()));
        }
        cmd.args(&a.tailgres_args);
        let log_name = if a.fleet == 0 { "tailgres".to_string() } else { format!("tailgres-{name}") };
        let (proc, _) = Proc::spawn(&log_name, cmd, &dir, false).await?;
        proxies.push((name.clone(), proc, log));
    }

    // 4. Client nodes, each forwarding a loopback port to the proxy.
    let specs = if a.clients.is_empty() { vec!["laptop".to_string()] } else { a.clients.clone() };
    let mut clients = Vec::new();
    let mut client_json = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (name, tags) = spec.split_once('=').unwrap_or((spec.as_str(), ""));
        let port = if i == 0 { a.forward_port } else { 0 };
        let mut cmd = Command::new(tslab_binary(a.tslab.clone())?);
        cmd.arg("node")
            .arg(format!("--control-url={control_url}"))
            .arg(format!("--hostname={name}"))
            .arg(format!("--state-dir={}", dir.join(format!("client-{name}")).display()))
            .arg(format!("--forward=127.0.0.1:{port}={PROXY_HOSTNAME}.{suffix}:5432"))
            // Generous: a loaded machine must not turn a slow first dial
            // (via DERP) into a refused client. A second dial (another
            // source port) after one that stalled: see tslab's labNode.dial.
            .arg("--dial-timeout=20s")
            .arg("--dial-attempts=2");
        if !tags.is_empty() {
            cmd.arg(format!("--advertise-tags={tags}"));
        }
        if a.fleet > 0 {
            // Also each node's own address: a cancel can be sent to a
            // member other than the one the Service chose.
            for n in &names {
                cmd.arg(format!("--forward=127.0.0.1:0={n}.{suffix}:5432"));
            }
        }
        let (p, ready) = Proc::spawn(&format!("client-{name}"), cmd, &dir, true).await?;
        let forward = ready["forwards"][0]["listen"].as_str().context("forward")?.to_string();
        let node_forwards: serde_json::Map<String, Value> = names
            .iter()
            .enumerate()
            .filter(|_| a.fleet > 0)
            .map(|(i, n)| (n.clone(), ready["forwards"][i + 1]["listen"].clone()))
            .collect();
        client_json.push(json!({
            "name": name,
            "tags": if tags.is_empty() { vec![] } else { tags.split(',').collect::<Vec<_>>() },
            "tailnet_name": ready["name"],
            "tailnet_ips": ready["ips"],
            "forward": forward,
            "node_forwards": node_forwards,
        }));
        clients.push(p);
    }

    // 5. Ready when the proxy answers through the first client's forward
    // (a fleet: when every node hosts the Service and every client's
    // forward answers).
    let first = client_json[0]["forward"].as_str().unwrap().to_string();
    let deadline = Instant::now() + READY_TIMEOUT;
    let forwards: Vec<String> = if a.fleet == 0 {
        vec![first.clone()]
    } else {
        client_json.iter().map(|c| c["forward"].as_str().unwrap_or_default().to_string()).collect()
    };
    let mut waiting = forwards.clone();
    loop {
        if a.fleet > 0 && waiting.len() == forwards.len() {
            let (_, svc) = http(&admin_url, "GET", &format!("/services/{FLEET_SERVICE}"), "").await?;
            let hosts = serde_json::from_str::<Value>(&svc).ok().and_then(|v| v["hosts"].as_array().map(Vec::len));
            if hosts != Some(usize::from(a.fleet)) {
                waiting_or_bail(&mut proxies, deadline).await?;
                continue;
            }
        }
        let mut still = Vec::new();
        for f in &waiting {
            if !probe(f).await {
                still.push(f.clone());
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        waiting_or_bail(&mut proxies, deadline).await?;
    }
    let (_, proxy, audit_log) = proxies.remove(0);
    let mut proxy = proxy;

    // The probe leaves one record (a client that hung up during negotiation).
    // It is the lab's, not the user's: once it is written, rotate it away as
    // an operator would (rename, SIGHUP) into lab-probe.jsonl, so the audit
    // log that the demo and the tests read starts with their own sessions.
    // A log that was there before (a restart onto it) keeps the record: its
    // earlier lines are not the lab's to move.
    if new_log && a.fleet == 0 {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The probe's own record, not just the log_opened line heading the file.
        let probed = |b: &[u8]| b.windows(16).any(|w| w == b"\"session_denied\"");
        while std::fs::read(&audit_log).map_or(true, |b| !probed(&b)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let probe_log = dir.join("lab-probe.jsonl");
        if std::fs::rename(&audit_log, &probe_log).is_ok() {
            let pid = proxy.child.id().context("tailgres's pid")?;
            // kill(1): the lab keeps to safe code (no libc::kill).
            let status = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status()?;
            anyhow::ensure!(status.success(), "could not send SIGHUP to tailgres ({pid})");
            // The reopen creates the file again: wait for it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !audit_log.exists() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "tailgres did not reopen its audit log after SIGHUP"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    let (host, port) = up_addr.rsplit_once(':').unwrap_or((up_addr.as_str(), ""));
    let description = json!({
        "dir": dir,
        "control_url": control_url,
        "admin_url": admin_url,
        "magic_dns_suffix": suffix,
        "proxy": {
            "hostname": names[0],
            "name": format!("{}.{suffix}", names[0]),
            "log": proxy.stderr,
            "pid": proxy.child.id(),
        },
        "audit_log": audit_log,
        "fleet": if a.fleet == 0 { Value::Null } else { json!({
            "service": FLEET_SERVICE,
            "dns_name": format!("{PROXY_HOSTNAME}.{suffix}"),
            "tag": FLEET_TAG,
            "nodes": std::iter::once((names[0].clone(), proxy.stderr.clone(), proxy.child.id(), audit_log.clone()))
                .chain(proxies.iter().map(|(n, p, l)| (n.clone(), p.stderr.clone(), p.child.id(), l.clone())))
                .map(|(n, log, pid, audit)| json!({"hostname": n, "name": format!("{n}.{suffix}"), "log": log, "pid": pid, "audit_log": audit}))
                .collect::<Vec<_>>(),
        }) },
        "clients": client_json,
        "upstream": {
            "address": up_addr,
            "host": host,
            "port": port.parse::<u16>().ok(),
            "server_name": up_name,
            "ca_file": up_ca,
            "identity_ca_file": pg.as_ref().map(|p| p.identity_ca_file.clone()),
            "identity_key_file": pg.as_ref().map(|p| p.identity_key_file.clone()),
            "socket_dir": pg.as_ref().map(|p| p.socket_dir.clone()),
            "superuser": pg.as_ref().map(|p| p.superuser.clone()),
            "log_file": pg.as_ref().map(|p| p.log_file.clone()),
            "roles": pg.as_ref().map(|_| pg::ROLES.iter().map(|(r, pw, m)| json!({"role": r, "password": pw, "method": m})).collect::<Vec<_>>()),
            "database": pg.as_ref().map(|_| pg::DATABASE),
        },
        "started_in_ms": started.elapsed().as_millis() as u64,
    });
    if let Some(path) = &a.json {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&description)?)?;
        std::fs::rename(&tmp, path)?;
    }
    println!("{description}");
    tracing::info!(forward = %first, audit_log = %audit_log.display(), "lab up");

    // 6. Run until stopped, or until a child dies.
    let mut control = control;
    let fleet = a.fleet > 0;
    let reason = tokio::select! {
        _ = int.recv() => None,
        _ = term.recv() => None,
        // (A fleet's nodes may be stopped by the tests: the lab goes on.)
        s = proxy.child.wait(), if !fleet => {
            // Tests that stop tailgres themselves read how it ended here.
            let code = s.as_ref().ok().and_then(|s| s.code()).map_or("signal".to_string(), |c| c.to_string());
            let _ = std::fs::write(dir.join("tailgres.exit"), code);
            Some(format!("tailgres exited ({s:?}); its log:\n{}", tail(&proxy.stderr)))
        }
        s = control.child.wait() => Some(format!("tslab control exited ({s:?})")),
        e = async { match pg.as_mut() { Some(p) => p.unexpected_exit().await, None => std::future::pending().await } } => Some(e.to_string()),
    };
    for c in clients {
        c.stop().await;
    }
    proxy.stop().await;
    for (_, p, _) in proxies {
        p.stop().await;
    }
    if let Some(p) = pg {
        p.stop().await;
    }
    control.stop().await;
    match reason {
        None => Ok(()),
        Some(r) => Err(anyhow!(r)),
    }
}
