//! The lab's PostgreSQL: Debian's packaged server, a fresh cluster per run,
//! TLS from a throwaway CA ([`crate::certs`]), listening on 127.0.0.1 only.
//!
//! Layout under `PgOptions::dir`:
//!
//! ```text
//! data/           PGDATA (initdb), pg_hba.conf and tailgres-lab.conf inside
//! run/            unix socket directory (0700): superuser admin access
//! tls/ca.crt      the CA tailgres is told to trust
//! tls/other-ca.crt  only for UpstreamCert::Untrusted: the CA that really signed
//! tls/server.crt, tls/server.key (0600)
//! postgres.log    the server's stderr (logging_collector is off)
//! ```
//!
//! Over TCP only `hostssl` rules exist, so a plaintext connection is
//! refused by pg_hba whatever the client asks for.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::certs::{self, Ca, Validity};

/// Login roles created in every lab cluster: (role, password, pg_hba method).
/// Each has its own `hostssl` rule; the password is stored in the form the
/// method needs (SCRAM verifier for scram-sha-256, MD5 hash for md5).
pub const ROLES: &[(&str, Option<&str>, &str)] = &[
    ("role_scram", Some("scram-pass"), "scram-sha-256"),
    ("role_md5", Some("md5-pass"), "md5"),
    ("role_trust", None, "trust"),
    // Identity login: tailgres's certificate names the role in its CN; the
    // log shows the whole subject (clientname=DN), mapped back to the CN.
    ("role_identity", None, "cert clientname=DN map=tailgres"),
];
/// pg_ident.conf: the `tailgres` map takes the role from the CN of the
/// subject (RFC 2253, CN first, as tailgres's certificates print). Quoted:
/// an unquoted comma separates a list.
const PG_IDENT: &str = "# Written by tailgres-lab.\n\
                        # MAPNAME  SYSTEM-USERNAME     PG-USERNAME\n\
                        tailgres   \"/^CN=([^,]+),\"     \\1\n";
/// The verifier lookup role (`--auth scram-verifier`), created from the
/// README's SQL (docs/verifier-lookup.sql), and its password.
pub const VERIFIER_USER: &str = "tailgres_auth";
pub const VERIFIER_PASSWORD: &str = "lookup-pass";
const VERIFIER_SQL: &str = include_str!("../../../docs/verifier-lookup.sql");
/// Database owned by `role_scram`; every role may connect.
pub const DATABASE: &str = "app";
/// The name the good server certificate carries (plus IP 127.0.0.1).
pub const DEFAULT_SERVER_NAME: &str = "db.lab.test";
/// The only name in the `WrongHost` certificate.
pub const WRONG_SERVER_NAME: &str = "wrong.lab.test";
/// Superuser created by initdb, reachable only over the unix socket.
pub const SUPERUSER: &str = "postgres";

const HOST: &str = "127.0.0.1";
/// The system account Debian's package creates; PostgreSQL refuses to run as root.
const OS_USER: &str = "postgres";
const PG_LIB_DIR: &str = "/usr/lib/postgresql";
/// initdb + first start; generous for slow CI machines.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// With port 0 we pick a free port and hand it to postgres; another process
/// may take it in between, so retry a few times on "could not bind".
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_BYTES: u64 = 8 * 1024;
/// Linux `sun_path` is 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Which certificate the server presents (relative to `Pg::ca_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamCert {
    /// Signed by the lab CA for `server_name` and 127.0.0.1.
    Good,
    /// Signed by the lab CA, but only for `wrong.lab.test`.
    WrongHost,
    /// Signed by the lab CA for the right names, expired 30 days ago.
    Expired,
    /// Right names and dates, signed by a different CA than `ca_file`.
    Untrusted,
    /// `ssl = off`: with hostssl-only pg_hba, no TCP connection succeeds.
    NoTls,
}

#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Working directory; created if missing, must not already hold `data/`.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    pub cert: UpstreamCert,
    pub server_name: String,
    pub log_connections: bool,
    /// Extra server settings (`name = 'value'`), after the lab's own, so
    /// they win (e.g. `max_connections` for many sessions).
    pub settings: Vec<Setting>,
}

/// One `NAME=VALUE` server setting, checked by [`Setting::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
}

impl Setting {
    /// `NAME=VALUE`; NAME is a plain (possibly dotted) parameter name, so
    /// nothing but VALUE needs quoting in postgresql.conf.
    pub fn parse(s: &str) -> Result<Setting, String> {
        let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: want NAME=VALUE"))?;
        let name = name.trim();
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        if name.is_empty() || !name.chars().all(plain) || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("{name:?}: not a PostgreSQL parameter name"));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(format!("{name}: the value may not contain line breaks or NUL"));
        }
        Ok(Setting { name: name.to_owned(), value: value.to_owned() })
    }
}

impl PgOptions {
    /// Defaults: free port, good certificate for `db.lab.test`, no connection logging.
    pub fn new(dir: impl Into<PathBuf>) -> PgOptions {
        PgOptions {
            dir: dir.into(),
            port: 0,
            cert: UpstreamCert::Good,
            server_name: DEFAULT_SERVER_NAME.to_owned(),
            log_connections: false,
            settings: Vec::new(),
        }
    }
}

/// A running lab PostgreSQL. Stop it with [`Pg::stop`]; dropping it kills
/// the postmaster (SIGKILL) instead.
pub struct Pg {
    pub port: u16,
    pub host: String,
    pub server_name: String,
    /// The CA tailgres should trust (the lab CA, even for `Untrusted`).
    pub ca_file: PathBuf,
    /// The identity CA (certificate, PKCS#8 key) the server trusts for
    /// `cert` logins: what tailgres's --identity-ca-cert/-key take.
    pub identity_ca_file: PathBuf,
    pub identity_key_file: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub superuser: String,
    pub cert: UpstreamCert,
    /// The working directory (PGDATA is `dir/data`).
    pub dir: PathBuf,
    /// The lab CA, e.g. to issue client certificates PostgreSQL accepts
    /// (its `ssl_ca_file` is `ca_file`).
    #[allow(dead_code)] // for the lab's mTLS stage
    pub ca: Ca,
    bin: PathBuf,
    /// `None` once stopped.
    child: Option<Child>,
}

impl Pg {
    /// Creates a fresh cluster in `o.dir`, starts it, waits until it accepts
    /// connections, and creates [`ROLES`] and [`DATABASE`].
    pub async fn start(o: PgOptions) -> anyhow::Result<Pg> {
        let started = Instant::now();
        let bin = find_bin_dir()?;
        let run_as = RunAs::detect().await?;
        let dir = prepare_dir(&o.dir)?;
        let data_dir = dir.join("data");
        let socket_dir = dir.join("run");
        let tls_dir = dir.join("tls");
        let log_file = dir.join("postgres.log");
        // run/ is the superuser's door: owner only. tls/ holds public certs
        // (any local user, e.g. an unprivileged tailgres, may read ca.crt);
        // the key inside is 0600.
        for (d, mode) in [(&socket_dir, 0o700), (&tls_dir, 0o755)] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
            fs::set_permissions(d, fs::Permissions::from_mode(mode))?;
        }
        let tls = write_tls(&tls_dir, o.cert, &o.server_name)?;
        if let Some(r) = &run_as {
            r.chown_tree(&dir)?;
        }

        initdb(&bin, run_as.as_ref(), &dir, &data_dir).await?;
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "initdb done");
        write_hba(&data_dir)?;
        let include = "\n# Added by tailgres-lab.\ninclude 'tailgres-lab.conf'\n";
        append(&data_dir.join("postgresql.conf"), include)?;

        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        if let Some(r) = &run_as {
            r.chown_tree(&data_dir)?;
            r.chown(&log_file)?;
        }

        let mut attempt = 0;
        let (port, child) = loop {
            attempt += 1;
            let port = match o.port {
                0 => free_port()?,
                p => p,
            };
            let conf = ServerConf {
                port,
                socket_dir: &socket_dir,
                tls: (o.cert != UpstreamCert::NoTls).then_some(&tls),
                log_connections: o.log_connections,
                settings: &o.settings,
            };
            let conf_path = data_dir.join("tailgres-lab.conf");
            fs::write(&conf_path, conf.render())
                .with_context(|| format!("writing {}", conf_path.display()))?;
            if let Some(r) = &run_as {
                r.chown(&conf_path)?;
            }
            let log_start = log.seek(SeekFrom::End(0))?;
            let mut child = spawn_postgres(&bin, run_as.as_ref(), &dir, &data_dir, &log)?;
            match wait_ready(&bin, &mut child, &socket_dir, port).await {
                Ok(()) => {
                    tracing::debug!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        port,
                        "accepting connections"
                    );
                    break (port, child);
                }
                Err(NotReady::Exited(status)) => {
                    let tail = log_tail(&log_file, Some(log_start));
                    // Someone took the port between free_port() and bind().
                    if o.port == 0
                        && attempt < PORT_ATTEMPTS
                        && tail.contains("could not create any TCP/IP sockets")
                    {
                        tracing::debug!(port, "port taken, retrying");
                        continue;
                    }
                    bail!("postgres exited during startup ({status}); {}:\n{tail}", log_file.display());
                }
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(match e {
                        NotReady::Io(e) => e.context("waiting for postgres to accept connections"),
                        _ => anyhow!(
                            "postgres not ready after {READY_TIMEOUT:?}; {}:\n{}",
                            log_file.display(),
                            log_tail(&log_file, Some(log_start))
                        ),
                    });
                }
            }
        };

        let pg = Pg {
            port,
            host: HOST.to_owned(),
            server_name: o.server_name,
            ca_file: tls.ca_file.clone(),
            identity_ca_file: tls.identity_ca_file.clone(),
            identity_key_file: tls.identity_key_file.clone(),
            socket_dir,
            log_file,
            superuser: SUPERUSER.to_owned(),
            cert: o.cert,
            dir,
            ca: tls.ca,
            bin,
            child: Some(child),
        };
        pg.create_roles().await?;
        tracing::info!(
            port = pg.port,
            cert = ?pg.cert,
            dir = %pg.dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "lab postgres ready"
        );
        Ok(pg)
    }

    /// Fast shutdown (SIGINT: disconnect clients, checkpoint, exit), then
    /// waits; SIGKILL if that takes longer than 15 s.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // tokio's Child can only SIGKILL; kill(1) keeps this module free of unsafe.
            let sent = Command::new("kill").args(["-s", "INT", &pid.to_string()]).status().await;
            if !matches!(sent, Ok(s) if s.success()) {
                tracing::warn!(pid, ?sent, "could not send SIGINT to postgres");
            }
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => tracing::info!(%status, port = self.port, "lab postgres stopped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "waiting for postgres"),
            Err(_) => {
                tracing::warn!(port = self.port, "postgres did not stop in time; killing it");
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Resolves only if postgres exits on its own, with an error carrying
    /// the exit status and the tail of the log. Cancel-safe.
    pub async fn unexpected_exit(&mut self) -> anyhow::Error {
        let Some(child) = self.child.as_mut() else {
            return std::future::pending().await;
        };
        let status = child.wait().await;
        self.child = None;
        anyhow!(
            "postgres exited unexpectedly ({}); {}:\n{}",
            match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            },
            self.log_file.display(),
            log_tail(&self.log_file, None)
        )
    }

    /// Runs `sql` (one or more statements, each in its own transaction)
    /// with `psql -At` over the unix socket as the superuser; returns stdout.
    /// Stops at the first error, which is returned with psql's stderr.
    pub async fn psql_admin(&self, sql: &str) -> anyhow::Result<String> {
        let conninfo = format!(
            "host={} port={} user={} dbname=postgres",
            conninfo_quote(&self.socket_dir.to_string_lossy()),
            self.port,
            conninfo_quote(&self.superuser),
        );
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-", "-d"])
            .arg(&conninfo)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running psql")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let run = async {
            stdin.write_all(sql.as_bytes()).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(ADMIN_TIMEOUT, run)
            .await
            .map_err(|_| anyhow!("psql did not finish within {ADMIN_TIMEOUT:?}"))?
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn create_roles(&self) -> anyhow::Result<()> {
        let mut sql = String::new();
        for &(role, password, method) in ROLES {
            // PostgreSQL stores the password hashed per password_encryption
            // at the time it is set; md5 auth needs an MD5-stored password.
            let enc = if method == "md5" { "md5" } else { "scram-sha-256" };
            writeln!(sql, "SET password_encryption = '{enc}';")?;
            writeln!(sql, "CREATE ROLE {role} LOGIN;")?;
            if let Some(pw) = password {
                writeln!(sql, "ALTER ROLE {role} PASSWORD {};", sql_literal(pw))?;
            }
        }
        // The lookup role of --auth scram-verifier, exactly as README says.
        sql.push_str("SET password_encryption = 'scram-sha-256';\n");
        sql.push_str(VERIFIER_SQL);
        writeln!(sql, "ALTER ROLE {VERIFIER_USER} PASSWORD {};", sql_literal(VERIFIER_PASSWORD))?;
        writeln!(sql, "CREATE DATABASE {DATABASE} OWNER role_scram;")?;
        writeln!(sql, "GRANT CONNECT ON DATABASE {DATABASE} TO PUBLIC;")?;
        self.psql_admin(&sql).await.context("creating lab roles")?;

        // Check the stored forms, so a changed default can't silently turn
        // the md5 role into a SCRAM one. (An MD5 hash is "md5" + 32 hex digits.)
        let mut want: Vec<String> = ROLES
            .iter()
            .map(|&(role, password, method)| match (password, method) {
                (None, _) => format!("{role}=none"),
                (Some(_), "md5") => format!("{role}=md5"),
                (Some(_), _) => format!("{role}=SCRAM-SHA-256"),
            })
            .collect();
        want.sort();
        let got = self
            .psql_admin(
                "SELECT rolname || '=' || CASE WHEN rolpassword IS NULL THEN 'none' \
                 WHEN rolpassword LIKE 'md5%' THEN 'md5' ELSE split_part(rolpassword, '$', 1) END \
                 FROM pg_authid WHERE rolname LIKE 'role\\_%' ORDER BY 1;",
            )
            .await?;
        if got.lines().ne(want.iter().map(String::as_str)) {
            bail!("lab roles stored as {got:?}, expected {want:?}");
        }
        Ok(())
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Drop can't await a clean shutdown. SIGKILL the postmaster (its
            // backends exit when they notice it is gone); tokio reaps the
            // process in the background.
            let _ = child.start_kill();
            let _ = child.try_wait();
        }
    }
}

/// The newest `/usr/lib/postgresql/<major>/bin` with a `postgres` binary.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(PG_LIB_DIR) {
        for e in entries.flatten() {
            let Some(major) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let bin = e.path().join("bin");
            if bin.join("postgres").is_file() && best.as_ref().is_none_or(|(m, _)| major > *m) {
                best = Some((major, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server under {PG_LIB_DIR}/*/bin; install Debian's server \
             package (apt-get install postgresql-15, or any newer major version)"
        )
    })
}

/// The OS account to run initdb/postgres as: `Some` when we are root.
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    async fn detect() -> anyhow::Result<Option<RunAs>> {
        if id(&["-u"]).await? != 0 {
            return Ok(None);
        }
        let uid = id(&["-u", OS_USER]).await.with_context(|| {
            format!(
                "running as root needs the '{OS_USER}' system user (Debian's postgresql-common creates it)"
            )
        })?;
        let gid = id(&["-g", OS_USER]).await?;
        Ok(Some(RunAs { uid, gid }))
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} to {OS_USER}", path.display()))
    }

    fn chown_tree(&self, path: &Path) -> anyhow::Result<()> {
        self.chown(path)?;
        if fs::symlink_metadata(path)?.is_dir() {
            for e in fs::read_dir(path)? {
                self.chown_tree(&e?.path())?;
            }
        }
        Ok(())
    }

    fn apply(&self, cmd: &mut Command) {
        // std drops supplementary groups when switching uid as root.
        cmd.uid(self.uid).gid(self.gid);
    }
}

async fn id(args: &[&str]) -> anyhow::Result<u32> {
    let out = Command::new("id").args(args).output().await.context("running id")?;
    if !out.status.success() {
        bail!("id {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim().parse().with_context(|| format!("parsing id output {s:?}"))
}

/// Creates `dir` (0755), refuses one that already holds a cluster, and
/// returns its absolute path (postgresql.conf wants absolute paths).
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    for sub in ["data", "run", "tls"] {
        if dir.join(sub).exists() {
            bail!("{} already exists; give the lab a fresh --dir", dir.join(sub).display());
        }
    }
    let s = dir.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", dir.display()))?;
    // These would need quoting in postgresql.conf, conninfo and the
    // unix_socket_directories list; a lab dir never needs them.
    if s.contains(|c: char| c == '\'' || c == '\\' || c == ',' || c.is_whitespace()) {
        bail!("{s}: use a directory path without quotes, backslashes, commas or spaces");
    }
    let socket = format!("{s}/run/.s.PGSQL.65535");
    if socket.len() > MAX_SOCKET_PATH {
        bail!(
            "{s} is too long for a unix socket path ({} > {MAX_SOCKET_PATH} bytes); use a shorter --dir",
            socket.len()
        );
    }
    Ok(dir)
}

struct Tls {
    ca: Ca,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    identity_ca_file: PathBuf,
    identity_key_file: PathBuf,
    /// The server's `ssl_ca_file`: the lab CA and the identity CA.
    client_ca_file: PathBuf,
}

fn write_tls(tls_dir: &Path, kind: UpstreamCert, server_name: &str) -> anyhow::Result<Tls> {
    let ca = Ca::new("tailgres-lab CA")?;
    let right_names = [server_name, HOST];
    let (cert, key) = match kind {
        UpstreamCert::Good | UpstreamCert::NoTls => ca.issue_server(&right_names, Validity::Current)?,
        UpstreamCert::WrongHost => ca.issue_server(&[WRONG_SERVER_NAME], Validity::Current)?,
        UpstreamCert::Expired => ca.issue_server(&right_names, Validity::Expired)?,
        UpstreamCert::Untrusted => {
            let other = Ca::new("tailgres-lab untrusted CA")?;
            certs::write_cert(&tls_dir.join("other-ca.crt"), &other.cert_pem())?;
            other.issue_server(&right_names, Validity::Current)?
        }
    };
    let identity = Ca::new("tailgres-lab identity CA")?;
    let tls = Tls {
        ca_file: tls_dir.join("ca.crt"),
        cert_file: tls_dir.join("server.crt"),
        key_file: tls_dir.join("server.key"),
        identity_ca_file: tls_dir.join("identity-ca.crt"),
        identity_key_file: tls_dir.join("identity-ca.key"),
        client_ca_file: tls_dir.join("client-ca.crt"),
        ca,
    };
    certs::write_cert(&tls.ca_file, &tls.ca.cert_pem())?;
    certs::write_cert(&tls.cert_file, &cert)?;
    certs::write_key(&tls.key_file, &key)?;
    certs::write_cert(&tls.identity_ca_file, &identity.cert_pem())?;
    certs::write_key(&tls.identity_key_file, &identity.key_pem())?;
    certs::write_cert(&tls.client_ca_file, &(tls.ca.cert_pem() + &identity.cert_pem()))?;
    Ok(tls)
}

async fn initdb(bin: &Path, run_as: Option<&RunAs>, dir: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D").arg(data_dir).args([
        "--username",
        SUPERUSER,
        "--auth-local=trust",
        "--auth-host=reject", // pg_hba.conf is rewritten below anyway
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync", // throwaway cluster
        "--no-instructions",
    ]);
    base_env(&mut cmd, run_as, dir);
    let out = cmd.kill_on_drop(true).output().await.with_context(|| {
        format!(
            "running initdb in {} (as root, initdb runs as '{OS_USER}', which must be able to \
                 reach that directory: every parent directory needs o+x)",
            dir.display()
        )
    })?;
    if !out.status.success() {
        let hint = if run_as.is_some() {
            format!(
                " (running as root, initdb runs as '{OS_USER}', which must be able to \
                 reach {}: every parent directory needs o+x)",
                dir.display()
            )
        } else {
            String::new()
        };
        bail!(
            "initdb failed ({}){hint}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Clean environment and a reachable cwd for server-side tools.
fn base_env(cmd: &mut Command, run_as: Option<&RunAs>, dir: &Path) {
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C").current_dir(dir).stdin(Stdio::null());
    if let Some(r) = run_as {
        r.apply(cmd);
    }
}

fn write_hba(data_dir: &Path) -> anyhow::Result<()> {
    let mut hba = String::from(
        "# Written by tailgres-lab. TCP has hostssl rules only: plaintext is refused.\n\
         # TYPE  DATABASE USER ADDRESS METHOD\n\
         local   all all trust\n",
    );
    for &(role, _, method) in ROLES {
        writeln!(hba, "hostssl all {role} {HOST}/32 {method}")?;
    }
    writeln!(hba, "hostssl all all {HOST}/32 scram-sha-256")?;
    let path = data_dir.join("pg_hba.conf");
    fs::write(&path, hba).with_context(|| format!("writing {}", path.display()))?;
    let path = data_dir.join("pg_ident.conf");
    fs::write(&path, PG_IDENT).with_context(|| format!("writing {}", path.display()))
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("appending to {}", path.display()))
}

struct ServerConf<'a> {
    port: u16,
    socket_dir: &'a Path,
    tls: Option<&'a Tls>,
    log_connections: bool,
    settings: &'a [Setting],
}

impl ServerConf<'_> {
    /// Paths were checked by `prepare_dir` to need no quoting.
    fn render(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let mut c = format!(
            "# Written by tailgres-lab; overrides postgresql.conf.\n\
             listen_addresses = '{HOST}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n\
             password_encryption = 'scram-sha-256'\n\
             log_connections = {}\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             # Throwaway data: durability only slows the lab down.\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            self.port,
            self.socket_dir.display(),
            on(self.log_connections),
        );
        match self.tls {
            Some(t) => {
                let _ = write!(
                    c,
                    "ssl = on\n\
                     ssl_cert_file = '{}'\n\
                     ssl_key_file = '{}'\n\
                     ssl_ca_file = '{}'\n\
                     ssl_min_protocol_version = 'TLSv1.2'\n",
                    t.cert_file.display(),
                    t.key_file.display(),
                    t.client_ca_file.display(),
                );
            }
            None => c.push_str("ssl = off\n"),
        }
        for st in self.settings {
            let _ = writeln!(c, "{} = {}", st.name, sql_literal(&st.value));
        }
        c
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((HOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn_postgres(
    bin: &Path,
    run_as: Option<&RunAs>,
    dir: &Path,
    data_dir: &Path,
    log: &fs::File,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(data_dir);
    base_env(&mut cmd, run_as, dir);
    cmd.stdout(log.try_clone()?).stderr(log.try_clone()?).kill_on_drop(true);
    cmd.spawn().context("starting postgres")
}

enum NotReady {
    Exited(ExitStatus),
    Timeout,
    Io(anyhow::Error),
}

/// Polls pg_isready over the unix socket until the server accepts
/// connections, the child exits, or READY_TIMEOUT passes.
async fn wait_ready(bin: &Path, child: &mut Child, socket_dir: &Path, port: u16) -> Result<(), NotReady> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| NotReady::Io(e.into()))? {
            return Err(NotReady::Exited(status));
        }
        let ready = Command::new(bin.join("pg_isready"))
            .arg("-q")
            .arg("-h")
            .arg(socket_dir)
            .args(["-p", &port.to_string(), "-U", SUPERUSER, "-d", "postgres", "-t", "2"])
            .env_clear()
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .map_err(|e| NotReady::Io(anyhow::Error::new(e).context("running pg_isready")))?;
        if ready.success() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NotReady::Timeout);
        }
        tokio::select! {
            status = child.wait() => {
                return Err(match status {
                    Ok(s) => NotReady::Exited(s),
                    Err(e) => NotReady::Io(e.into()),
                });
            }
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// The last lines of the log (from `from` if given), for error messages.
fn log_tail(path: &Path, from: Option<u64>) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = from.unwrap_or(0).max(len.saturating_sub(LOG_TAIL_BYTES));
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => "(log is empty)".to_owned(),
        Ok(s) => s,
        Err(e) => format!("(could not read log: {e})"),
    }
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hba_has_no_plain_host_rules() {
        let dir = tempfile::tempdir().unwrap();
        write_hba(dir.path()).unwrap();
        let hba = fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        let rules: Vec<Vec<&str>> = hba
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rules[0], ["local", "all", "all", "trust"]);
        for r in &rules[1..] {
            assert_eq!(r[0], "hostssl", "{r:?}");
            assert_eq!(r[3], "127.0.0.1/32", "{r:?}");
        }
        assert_eq!(rules.len(), 1 + ROLES.len() + 1);
        assert_eq!(rules.last().unwrap()[4], "scram-sha-256");
    }

    #[test]
    fn settings_parse_and_render_last() {
        let ok = Setting::parse("max_connections=1200").unwrap();
        assert_eq!((ok.name.as_str(), ok.value.as_str()), ("max_connections", "1200"));
        let quoted = Setting::parse("application_name=it's").unwrap();
        for bad in ["max_connections", "=1", "a b=1", "x;y=1", "1x=2", "a=b\nssl=off"] {
            assert!(Setting::parse(bad).is_err(), "{bad:?}");
        }
        let settings = [ok, quoted];
        let conf = ServerConf {
            port: 5432,
            socket_dir: Path::new("/run"),
            tls: None,
            log_connections: false,
            settings: &settings,
        }
        .render();
        let tail: Vec<&str> = conf.lines().rev().take(2).collect();
        assert_eq!(tail, ["application_name = 'it''s'", "max_connections = '1200'"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
    }

    /// Needs Debian's PostgreSQL; listens on 127.0.0.1. Run in a private
    /// network namespace:
    /// `unshare --net bash -c 'ip link set lo up; cargo test --bin tailgres-lab -- --ignored'`
    #[tokio::test]
    #[ignore = "starts real PostgreSQL servers"]
    async fn two_instances_start_and_stop() {
        let base = tempfile::tempdir().unwrap();
        // tempdir is 0700; as root, initdb runs as `postgres` and must get in.
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let a = PgOptions::new(base.path().join("a"));
        let b = PgOptions { cert: UpstreamCert::NoTls, ..PgOptions::new(base.path().join("b")) };
        let (a, b) = tokio::join!(Pg::start(a), Pg::start(b));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.port, b.port);
        assert_eq!(a.psql_admin("SHOW ssl;").await.unwrap().trim(), "on");
        assert_eq!(b.psql_admin("SHOW ssl;").await.unwrap().trim(), "off");
        let err = a.psql_admin("SELECT * FROM nope;").await.unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
        let roles = a
            .psql_admin("SELECT rolname FROM pg_roles WHERE rolcanlogin AND rolname LIKE 'role%' ORDER BY 1;")
            .await
            .unwrap();
        assert_eq!(roles.lines().collect::<Vec<_>>(), ["role_md5", "role_scram", "role_trust"]);
        a.stop().await;
        // Dropping kills the postmaster; its port must become free again.
        let port = b.port;
        drop(b);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpListener::bind((HOST, port)).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "port {port} still taken after drop");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    #[test]
    fn prepare_dir_rejects_awkward_paths() {
        let base = tempfile::tempdir().unwrap();
        assert!(prepare_dir(&base.path().join("has space")).is_err());
        assert!(prepare_dir(&base.path().join("x".repeat(120))).is_err());
        let ok = prepare_dir(&base.path().join("ok")).unwrap();
        fs::create_dir(ok.join("data")).unwrap();
        assert!(prepare_dir(&ok).is_err(), "existing data/ must be refused");
    }
}
