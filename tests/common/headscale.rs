//! headscale, an independent Tailscale control server (github.com/juanfont/headscale),
//! run inside the test's network namespace on 127.0.0.1, with its embedded
//! DERP and STUN and a HuJSON policy file; plus a whole world on it: a TLS
//! PostgreSQL from a throwaway CA (`tailgres-lab pg`), the real tailgres
//! binary registered with a tagged pre-auth key, and client nodes (`tslab
//! node`) registered with users' or tags' keys, each forwarding a loopback
//! port to the proxy.
//!
//! The binary is found through `$TAILGRES_HEADSCALE` (scripts/test sets a
//! default). Without it the tests fail, loudly: they never pass silently.

use super::audit::{validate_live_lines, LIVE_TAIL_WAIT};
use super::lab::{psql, terminate};
use super::ops::{free_port, wait_readyz, PgProc};
use super::{require_sandbox, LabProcess, READY_TIMEOUT};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Nodes reach headscale's embedded DERP over plain HTTP (it serves DERP on
/// its own HTTP listener, without TLS); the lab's own DERP speaks TLS, so
/// this is set per process, for the processes of these tests only.
pub const DERP_HTTP: (&str, &str) = ("TS_DEBUG_USE_DERP_HTTP", "1");

/// The proxy's tailnet hostname.
pub const PROXY_HOSTNAME: &str = "pg";
/// headscale's MagicDNS base domain in these tests.
pub const BASE_DOMAIN: &str = "tail.lab";
/// Bound on any one wait for the tailnet to reflect a change.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The headscale binary: `$TAILGRES_HEADSCALE`. Panics (so the test fails)
/// when it is unset or not a file, saying how to provide it.
pub fn headscale_bin() -> PathBuf {
    let ci = std::env::var("CI").map(|v| !v.is_empty() && v != "false").unwrap_or(false);
    let given = std::env::var_os("TAILGRES_HEADSCALE").map(PathBuf::from);
    match given {
        Some(p) if p.is_file() => p,
        other => {
            panic!(
                "\n\n*** headscale tests: NO HEADSCALE BINARY ***\n\
                 TAILGRES_HEADSCALE is {other:?}. These tests prove grants and revocation against \
                 headscale (v0.29.x), an independent Tailscale control server: set TAILGRES_HEADSCALE \
                 to its binary (scripts/test sets a default when it finds one). {}\n",
                if ci { "CI is set: this is a failure, never a skip." } else { "Not skipped: failed." }
            );
        }
    }
}

/// A running headscale.
pub struct Headscale {
    pub dir: PathBuf,
    pub url: String,
    config: PathBuf,
    policy: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Headscale {
    /// Starts headscale in `dir` with `policy` (HuJSON) as its policy file;
    /// returns once its CLI (over the unix socket) answers. Its ports are
    /// picked free just before; should another process take one first,
    /// headscale exits and is started again on new ones.
    pub async fn start(dir: &Path, policy: &str) -> Headscale {
        let bin = headscale_bin(); // first: its absence is the failure to report
        require_sandbox();
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let policy_path = dir.join("policy.hujson");
        std::fs::write(&policy_path, policy).unwrap();
        let config_path = dir.join("config.yaml");
        let log = dir.join("headscale.log");
        let deadline = Instant::now() + READY_TIMEOUT;
        for attempt in 1.. {
            let (http, metrics, grpc, stun) = (free_port(), free_port(), free_port(), free_udp_port());
            std::fs::write(&config_path, config(&dir, http, metrics, grpc, stun)).unwrap();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&config_path)
                .arg("serve")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::options().append(true).open(&log).unwrap())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
            let mut hs = Headscale {
                dir: dir.clone(),
                url: format!("http://127.0.0.1:{http}"),
                config: config_path.clone(),
                policy: policy_path.clone(),
                log: log.clone(),
                child,
            };
            loop {
                if hs.try_cli(&["health"]).await.is_ok() {
                    return hs;
                }
                if let Ok(Some(status)) = hs.child.try_wait() {
                    assert!(attempt < 3, "headscale exited ({status}); its log:\n{}", hs.log_text());
                    eprintln!(
                        "headscale exited ({status}) at start; again on other ports:\n{}",
                        hs.log_text()
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "headscale did not come up; its log:\n{}", hs.log_text());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let run = Command::new(headscale_bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .map_err(|_| format!("headscale {args:?} hung"))?
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "headscale {args:?}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs the CLI with `-o json`; panics on failure.
    pub async fn cli(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.try_cli(&all).await.unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("headscale {args:?} printed {out:?}: {e}"))
    }

    /// Creates a user (name, and email as login); returns its ID.
    pub async fn create_user(&self, name: &str, email: &str) -> u64 {
        let v = self.cli(&["users", "create", name, "--email", email]).await;
        v["id"].as_u64().unwrap_or_else(|| panic!("users create: {v}"))
    }

    /// A reusable pre-auth key for a user's nodes or for tagged nodes (a
    /// node registered with a user's key cannot advertise tags).
    pub async fn auth_key(&self, owner: Owner<'_>) -> String {
        let v = match owner {
            Owner::User(id) => {
                self.cli(&["preauthkeys", "create", "--reusable", "--user", &id.to_string()]).await
            }
            Owner::Tags(tags) => self.cli(&["preauthkeys", "create", "--reusable", "--tags", tags]).await,
        };
        v["key"].as_str().unwrap_or_else(|| panic!("preauthkeys create: {v}")).to_string()
    }

    /// All nodes as headscale lists them.
    pub async fn nodes(&self) -> Vec<Value> {
        self.cli(&["nodes", "list"]).await.as_array().cloned().unwrap_or_default()
    }

    /// headscale's ID of the node with this hostname.
    pub async fn node_id(&self, hostname: &str) -> u64 {
        let nodes = self.nodes().await;
        nodes
            .iter()
            .find(|n| n["name"] == hostname || n["given_name"] == hostname)
            .and_then(|n| n["id"].as_u64())
            .unwrap_or_else(|| panic!("no node {hostname} in {nodes:#?}"))
    }

    pub async fn delete_node(&self, hostname: &str) {
        let id = self.node_id(hostname).await.to_string();
        self.try_cli(&["nodes", "delete", "--identifier", &id, "--force"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn expire_node(&self, hostname: &str) {
        let id = self.node_id(hostname).await.to_string();
        self.try_cli(&["nodes", "expire", "--identifier", &id, "--force"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Replaces the policy file and has headscale reload it (SIGHUP: v0.29
    /// does not watch the file). `headscale policy check` first, so a
    /// policy headscale would refuse fails here, not as a timeout later.
    pub async fn set_policy(&self, policy: &str) {
        let next = self.dir.join("policy.next.hujson");
        std::fs::write(&next, policy).unwrap();
        let path = next.to_str().unwrap();
        self.try_cli(&["policy", "check", "--file", path]).await.unwrap_or_else(|e| panic!("{e}"));
        std::fs::rename(&next, &self.policy).unwrap();
        let pid = self.child.id().expect("headscale is running").to_string();
        let ok = Command::new("kill").args(["-HUP", &pid]).status().await.unwrap().success();
        assert!(ok, "kill -HUP headscale");
    }

    pub async fn stop(mut self) {
        terminate(&mut self.child);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

impl Drop for Headscale {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// headscale's configuration: everything on 127.0.0.1, its embedded DERP
/// and STUN as the only DERP region, SQLite, the policy from a file.
fn config(dir: &Path, http: u16, metrics: u16, grpc: u16, stun: u16) -> String {
    let d = dir.display();
    format!(
        "server_url: http://127.0.0.1:{http}\n\
         listen_addr: 127.0.0.1:{http}\n\
         metrics_listen_addr: 127.0.0.1:{metrics}\n\
         grpc_listen_addr: 127.0.0.1:{grpc}\n\
         grpc_allow_insecure: true\n\
         noise:\n  private_key_path: {d}/noise_private.key\n\
         prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n  allocation: sequential\n\
         derp:\n  server:\n    enabled: true\n    region_id: 999\n    region_code: \"lab\"\n    \
         region_name: \"Lab DERP\"\n    verify_clients: true\n    stun_listen_addr: \"127.0.0.1:{stun}\"\n    \
         private_key_path: {d}/derp_server_private.key\n    automatically_add_embedded_derp_region: true\n    \
         ipv4: 127.0.0.1\n  urls: []\n  paths: []\n  auto_update_enabled: false\n  update_frequency: 24h\n\
         disable_check_updates: true\n\
         database:\n  type: sqlite\n  sqlite:\n    path: {d}/db.sqlite\n    write_ahead_log: true\n\
         policy:\n  mode: file\n  path: {d}/policy.hujson\n\
         dns:\n  magic_dns: true\n  base_domain: {BASE_DOMAIN}\n  override_local_dns: false\n  \
         nameservers:\n    global: []\n\
         unix_socket: {d}/headscale.sock\n\
         unix_socket_permission: \"0770\"\n\
         log:\n  level: info\n"
    )
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for STUN).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A client node of the world.
pub struct Client {
    pub hostname: String,
    pub node: LabProcess,
    /// "127.0.0.1:PORT", forwarded through the tailnet to the proxy.
    pub forward: String,
}

impl Client {
    pub fn ip(&self) -> String {
        self.node.ready["ips"][0].as_str().unwrap().to_string()
    }
    pub fn tailnet_name(&self) -> String {
        self.node.ready["name"].as_str().unwrap().to_string()
    }
    /// A libpq connection string through this client's forward.
    pub fn conninfo(&self, user: &str, database: &str, app: &str) -> String {
        let (h, p) = self.forward.rsplit_once(':').unwrap();
        format!("host={h} port={p} user={user} dbname={database} sslmode=disable application_name={app}")
    }
}

/// Whose key registers a node.
#[derive(Clone, Copy)]
pub enum Owner<'a> {
    User(u64),
    Tags(&'a str),
}

/// headscale, PostgreSQL, tailgres and client nodes.
pub struct World {
    pub dir: tempfile::TempDir,
    pub hs: Headscale,
    pub pg: PgProc,
    pub proxy: Child,
    pub proxy_state: PathBuf,
    pub proxy_log: PathBuf,
    pub audit_log: PathBuf,
    pub health_port: u16,
    pub clients: Vec<Client>,
}

impl World {
    /// headscale with `policy` and `users` (name, email), the database with
    /// each of `sql` run on it as superuser, and tailgres (tagged tag:db-proxy via a
    /// tagged key) with `tailgres_args`. Clients are added with [`World::client`].
    pub async fn start(
        policy: &str,
        users: &[(&str, &str)],
        sql: &[&str],
        tailgres_args: &[&str],
    ) -> (World, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let hs = Headscale::start(&dir.path().join("headscale"), policy).await;
        let mut ids = Vec::new();
        for (name, email) in users {
            ids.push(hs.create_user(name, email).await);
        }
        let pg = PgProc::start().await;
        for s in sql {
            psql_superuser(&pg, s).await;
        }
        let proxy_state = dir.path().join("proxy-state");
        let audit_log = dir.path().join("audit.jsonl");
        let proxy_log = dir.path().join("tailgres.log");
        let key_file = dir.path().join("proxy.key");
        std::fs::write(&key_file, hs.auth_key(Owner::Tags("tag:db-proxy")).await).unwrap();
        let health_port = free_port();
        let proxy = Command::new(env!("CARGO_BIN_EXE_tailgres"))
            .arg(format!("--control-url={}", hs.url))
            .arg(format!("--hostname={PROXY_HOSTNAME}"))
            .arg(format!("--state-dir={}", proxy_state.display()))
            .arg(format!("--auth-key-file={}", key_file.display()))
            .arg(format!("--audit-log={}", audit_log.display()))
            .arg(format!("--upstream={}", pg.addr()))
            .arg(format!("--upstream-ca={}", pg.ca()))
            .arg(format!("--upstream-server-name={}", pg.server_name()))
            .arg(format!("--health-listen=127.0.0.1:{health_port}"))
            .args(tailgres_args)
            .env(DERP_HTTP.0, DERP_HTTP.1)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&proxy_log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let world =
            World { dir, hs, pg, proxy, proxy_state, proxy_log, audit_log, health_port, clients: vec![] };
        wait_readyz(health_port, "tailgres running on headscale", |s, _| s == 200).await;
        (world, ids)
    }

    /// Adds a client node registered with `owner`'s key, forwarding a
    /// loopback port to the proxy; returns its index.
    pub async fn client(&mut self, hostname: &str, owner: Owner<'_>) -> usize {
        let key = self.hs.auth_key(owner).await;
        let args = vec![
            "node".to_string(),
            format!("--control-url={}", self.hs.url),
            format!("--hostname={hostname}"),
            format!("--state-dir={}", self.dir.path().join(format!("node-{hostname}")).display()),
            format!("--auth-key={key}"),
            format!("--forward=127.0.0.1:0={PROXY_HOSTNAME}.{BASE_DOMAIN}:5432"),
            // See tailgres-lab up: slow first dials on a loaded machine.
            "--dial-timeout=20s".to_string(),
            "--dial-attempts=2".to_string(),
        ];
        let node = LabProcess::spawn_env(&args, self.dir.path(), hostname, &[DERP_HTTP]).await;
        let forward = node.ready["forwards"][0]["listen"].as_str().unwrap().to_string();
        self.clients.push(Client { hostname: hostname.to_string(), node, forward });
        self.clients.len() - 1
    }

    pub fn c(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    /// Audit records so far, each validated against audit-schema.json.
    pub fn audit_records(&self) -> Vec<Value> {
        if !self.audit_log.exists() {
            return vec![];
        }
        validate_live_lines(&self.audit_log, LIVE_TAIL_WAIT)
    }

    /// Waits (bounded) for an audit record matching `pred`.
    pub async fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        loop {
            if let Some(r) = self.audit_records().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(Instant::now() < deadline, "no audit record: {what}\n{:#?}", self.audit_records());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for the `session_end` of the session whose
    /// application_name is `app`.
    pub async fn wait_end(&self, app: &str) -> Value {
        self.wait_record(&format!("session_end of {app}"), |r| {
            r["event"] == "session_end" && r["postgres"]["application_name"] == app
        })
        .await
    }

    /// psql through client `i`; retries until the outcome is `want_ok`
    /// (changes reach the proxy asynchronously); returns the last stderr.
    pub async fn until(&self, i: usize, user: &str, database: &str, want_ok: bool) -> String {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let c = &self.clients[i];
        loop {
            let (ok, _, err) = psql(&c.conninfo(user, database, "hs"), password(user), "select 1").await;
            if ok == want_ok {
                return err;
            }
            assert!(
                Instant::now() < deadline,
                "{} as {user} on {database}: still ok={ok}: {err}\n{}",
                c.hostname,
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// One psql through client `i`: (success, stdout, stderr).
    pub async fn psql(
        &self,
        i: usize,
        user: &str,
        database: &str,
        app: &str,
        sql: &str,
    ) -> (bool, String, String) {
        psql(&self.clients[i].conninfo(user, database, app), password(user), sql).await
    }

    /// Starts a long query through client `i` as `app` and waits until the
    /// database runs it.
    pub async fn long_session(
        &self,
        i: usize,
        user: &str,
        database: &str,
        app: &str,
    ) -> tokio::task::JoinHandle<(bool, String, String)> {
        let (c, pw) = (self.clients[i].conninfo(user, database, app), password(user));
        let h = tokio::spawn(async move { psql(&c, pw, "select pg_sleep(120)").await });
        self.wait_sleeping(app).await;
        h
    }

    /// Waits until the database shows `app`'s pg_sleep running.
    pub async fn wait_sleeping(&self, app: &str) {
        let sql = format!(
            "select count(*) from pg_stat_activity where application_name = '{app}' and wait_event = 'PgSleep'"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql_superuser(&self.pg, &sql).await.trim() != "1" {
            assert!(Instant::now() < deadline, "{app}'s query never ran\n{}", self.log_tails());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the database has no session of `app` left.
    pub async fn wait_gone_from_database(&self, app: &str) {
        let sql = format!("select count(*) from pg_stat_activity where application_name = '{app}'");
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql_superuser(&self.pg, &sql).await.trim() != "0" {
            assert!(Instant::now() < deadline, "{app}'s database session outlived its revocation");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `tailgres explain TARGET --state-dir ...` (JSON or text).
    pub fn explain(&self, target: &str, json: bool) -> String {
        explain(&self.proxy_state, target, json)
    }

    pub fn explain_json(&self, target: &str) -> Value {
        serde_json::from_str(&self.explain(target, true)).unwrap()
    }

    /// The last lines of headscale's, tailgres' and the nodes' logs.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let mut logs = vec![self.hs.log.clone(), self.proxy_log.clone()];
        logs.extend(self.clients.iter().map(|c| c.node.stderr_path.clone()));
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out += &format!("--- {} (last 30 lines)\n", p.display());
            for l in &all[all.len().saturating_sub(30)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    pub async fn stop(mut self) {
        if std::env::var_os("TAILGRES_KEEP_LAB").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("headscale world kept at {}", dir.keep().display());
        }
        terminate(&mut self.proxy);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.proxy.wait()).await;
        for c in self.clients.drain(..) {
            c.node.stop().await;
        }
        self.hs.stop().await;
        self.pg.stop().await;
    }
}

/// `tailgres explain TARGET` asked of the proxy with this state directory.
pub fn explain(state_dir: &Path, target: &str, json: bool) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tailgres"));
    cmd.args(["explain", target, "--state-dir"]).arg(state_dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "explain {target}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The lab database's passwords (tailgres-lab's roles, and the roles these
/// tests create).
pub fn password(user: &str) -> Option<&'static str> {
    match user {
        "role_scram" => Some("scram-pass"),
        "role_md5" => Some("md5-pass"),
        "alice" => Some("alice-pass"),
        _ => None,
    }
}

/// SQL on the database as its superuser (unix socket, not through the proxy).
pub async fn psql_superuser(pg: &PgProc, sql: &str) -> String {
    let conn = format!(
        "host={} port={} user={} dbname=postgres",
        pg.info["socket_dir"].as_str().unwrap(),
        pg.port(),
        pg.info["superuser"].as_str().unwrap()
    );
    let out = Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, &conn])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "psql superuser {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
