//! Configuration: command-line flags, each with an environment variable,
//! and an optional TOML file (flags and environment win over the file).
//! Validated once, at start, into [`Config`]; every refusal names the flag
//! and says what to do.
#![forbid(unsafe_code)]

use crate::authenticate::AuthMode;
use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

/// tailgres: a PostgreSQL proxy that joins your tailnet, knows who is
/// connecting, and speaks verify-full TLS to the database.
#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "tailgres",
    version,
    about,
    long_about = None,
    after_help = "Other commands: `tailgres audit` reads the audit log back (filters, summary, follow); \
                  `tailgres explain PEER` asks the running proxy about a peer. Each takes --help."
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these settings (keys as the long flag names).
    #[arg(long, env = "TAILGRES_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// The database, HOST:PORT. tailgres always verifies its certificate.
    #[arg(long, env = "TAILGRES_UPSTREAM", value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// TLS name to verify on the database's certificate when it differs from
    /// the host in --upstream (e.g. you dial an IP or a private DNS name).
    #[arg(long, env = "TAILGRES_UPSTREAM_SERVER_NAME", value_name = "NAME")]
    pub upstream_server_name: Option<String>,
    /// CA certificates (PEM file or directory) to trust for the database;
    /// repeatable. Default: Mozilla's root store.
    #[arg(long, env = "TAILGRES_UPSTREAM_CA", value_name = "FILE|DIR", value_delimiter = ',')]
    pub upstream_ca: Vec<PathBuf>,
    /// Client certificate (PEM) for mutual TLS to the database.
    #[arg(long, env = "TAILGRES_UPSTREAM_CLIENT_CERT", value_name = "FILE")]
    pub upstream_client_cert: Option<PathBuf>,
    /// Key for --upstream-client-cert (PEM).
    #[arg(long, env = "TAILGRES_UPSTREAM_CLIENT_KEY", value_name = "FILE")]
    pub upstream_client_key: Option<PathBuf>,
    /// Connect to the database with direct TLS (PostgreSQL 17+).
    #[arg(long, env = "TAILGRES_UPSTREAM_DIRECT_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub upstream_direct_tls: Option<bool>,

    /// Our name on the tailnet (MagicDNS: HOSTNAME.<tailnet>.ts.net).
    #[arg(long, env = "TAILGRES_HOSTNAME")]
    pub hostname: Option<String>,
    /// Where the tailnet node keeps its keys (reuse it across restarts).
    #[arg(long, env = "TAILGRES_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Coordination server URL (default: Tailscale's; e.g. a headscale URL).
    #[arg(long, env = "TAILGRES_CONTROL_URL", value_name = "URL")]
    pub control_url: Option<String>,
    /// File holding the auth key (else the TS_AUTHKEY environment variable;
    /// else an interactive login URL is logged).
    #[arg(long, env = "TAILGRES_AUTH_KEY_FILE", value_name = "FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// Register as an ephemeral node (removed when it goes offline).
    #[arg(long, env = "TAILGRES_EPHEMERAL", num_args = 0..=1, default_missing_value = "true")]
    pub ephemeral: Option<bool>,
    /// Tags to advertise (e.g. tag:db-proxy); repeatable.
    #[arg(long, env = "TAILGRES_ADVERTISE_TAGS", value_delimiter = ',')]
    pub advertise_tags: Vec<String>,
    /// Tailnet port to accept PostgreSQL connections on.
    #[arg(long, env = "TAILGRES_PORT")]
    pub port: Option<u16>,
    /// Also serve this Tailscale Service (svc:NAME) on --port, as one of a
    /// fleet of tailgres nodes (the node must be tagged; see README "Fleet").
    #[arg(long, env = "TAILGRES_SERVICE", value_name = "svc:NAME")]
    pub service: Option<String>,
    /// The tag every fleet member carries: only nodes with it may forward a
    /// cancel to this one, and cancels are forwarded only to them.
    #[arg(long, env = "TAILGRES_FLEET_TAG", value_name = "tag:NAME")]
    pub fleet_tag: Option<String>,
    /// Where tsnet's verbose log goes: "stderr" or a file (default: off).
    #[arg(long, env = "TAILGRES_TSNET_LOG", value_name = "stderr|FILE")]
    pub tsnet_log: Option<String>,
    /// Upload tsnet's logs to Tailscale (off by default).
    #[arg(long, env = "TAILGRES_TAILSCALE_LOG_UPLOAD", num_args = 0..=1, default_missing_value = "true")]
    pub tailscale_log_upload: Option<bool>,

    /// JSON-lines audit log: a file path, or - for standard output.
    #[arg(long, env = "TAILGRES_AUDIT_LOG", value_name = "PATH|-")]
    pub audit_log: Option<String>,
    /// Ed25519 key (PEM PKCS#8, mode 0600; `tailgres audit keygen FILE`
    /// makes one) that signs audit checkpoints: with it, `tailgres audit
    /// verify` detects any edit, not only a careless one.
    #[arg(long, env = "TAILGRES_AUDIT_SIGNING_KEY", value_name = "FILE")]
    pub audit_signing_key: Option<PathBuf>,
    /// A signed checkpoint after this many records (default 1000).
    #[arg(long, env = "TAILGRES_AUDIT_CHECKPOINT_EVERY", value_name = "N")]
    pub audit_checkpoint_every: Option<u64>,
    /// ... or this long after the last one, if anything was written
    /// since (default 60s, 1s to 1h).
    #[arg(long, env = "TAILGRES_AUDIT_CHECKPOINT_INTERVAL", value_name = "DURATION")]
    pub audit_checkpoint_interval: Option<String>,
    /// Record every statement of every session (a `statement` record
    /// each); without it, only sessions whose grant says "audit":
    /// "statements" are.
    #[arg(long, env = "TAILGRES_AUDIT_STATEMENTS", num_args = 0..=1, default_missing_value = "true")]
    pub audit_statements: Option<bool>,
    /// What a statement record holds of its text: normalized (literals
    /// replaced by $n; the default) or raw (as sent; statements that set or
    /// mention a password are still never written raw).
    #[arg(long, env = "TAILGRES_AUDIT_STATEMENT_TEXT", value_enum)]
    pub audit_statement_text: Option<StatementText>,

    /// Certificate (PEM) offered to clients that ask for TLS. Default: the
    /// tailnet's HTTPS certificate for our MagicDNS name, else self-signed.
    #[arg(long, env = "TAILGRES_CLIENT_TLS_CERT", value_name = "FILE")]
    pub client_tls_cert: Option<PathBuf>,
    /// Key for --client-tls-cert (PEM).
    #[arg(long, env = "TAILGRES_CLIENT_TLS_KEY", value_name = "FILE")]
    pub client_tls_key: Option<PathBuf>,

    /// How passwords are handled: password-relay (default) makes SCRAM
    /// channel binding work with every client; passthrough never sees a
    /// password but TLS clients must set channel_binding=disable.
    #[arg(long, env = "TAILGRES_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// --auth scram-verifier: the role tailgres looks up stored verifiers
    /// as (default tailgres_auth; README gives its function and grants).
    #[arg(long, env = "TAILGRES_VERIFIER_USER", value_name = "ROLE")]
    pub verifier_user: Option<String>,
    /// File holding the lookup role's password (else the
    /// TAILGRES_VERIFIER_PASSWORD environment variable; never a flag).
    #[arg(long, env = "TAILGRES_VERIFIER_PASSWORD_FILE", value_name = "FILE")]
    pub verifier_password_file: Option<PathBuf>,
    /// Database the lookup connects to (default postgres).
    #[arg(long, env = "TAILGRES_VERIFIER_DATABASE", value_name = "NAME")]
    pub verifier_database: Option<String>,
    /// The lookup: one row, one column (the role's rolpassword), with the
    /// role as $1 (default: SELECT tailgres_auth.verifier($1)).
    #[arg(long, env = "TAILGRES_VERIFIER_QUERY", value_name = "SQL")]
    pub verifier_query: Option<String>,
    /// How long a looked-up verifier is reused (default 30s, at most 10m;
    /// a failed login drops it at once).
    #[arg(long, env = "TAILGRES_VERIFIER_CACHE", value_name = "DURATION")]
    pub verifier_cache: Option<String>,
    /// How sessions log in to the database: password (the client's, as
    /// --auth says) or identity (no password: tailgres signs a short-lived
    /// client certificate for the role, from --identity-ca-cert, for
    /// sessions whose grant says "login": "identity"). A [[route]] can set
    /// its own.
    #[arg(long, env = "TAILGRES_LOGIN", value_enum)]
    pub login: Option<LoginMode>,
    /// CA certificate (PEM) tailgres signs identity-login certificates
    /// with; the database trusts it for its `cert` method.
    #[arg(long, env = "TAILGRES_IDENTITY_CA_CERT", value_name = "FILE")]
    pub identity_ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM, PKCS#8). It never leaves the proxy.
    #[arg(long, env = "TAILGRES_IDENTITY_CA_KEY", value_name = "FILE")]
    pub identity_ca_key: Option<PathBuf>,
    /// How long each identity-login certificate is valid (1m to 1h;
    /// default 5m). The database checks it once, at login.
    #[arg(long, env = "TAILGRES_IDENTITY_CERT_VALIDITY", value_name = "DURATION")]
    pub identity_cert_validity: Option<String>,
    /// Time a client has to finish its startup (e.g. 15s).
    #[arg(long, env = "TAILGRES_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<String>,
    /// Time to connect to the database, TLS included (e.g. 10s).
    #[arg(long, env = "TAILGRES_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Most sessions at once; more are refused with 53300.
    #[arg(long, env = "TAILGRES_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Application capability that carries database grants in the tailnet
    /// policy (see capability-schema.json).
    #[arg(long, env = "TAILGRES_CAPABILITY", value_name = "NAME")]
    pub capability: Option<String>,
    /// Refuse peers that carry no grant (default: a peer Tailscale lets
    /// through and that has no grant may connect as any user).
    #[arg(long, env = "TAILGRES_REQUIRE_GRANT", num_args = 0..=1, default_missing_value = "true")]
    pub require_grant: Option<bool>,
    /// Let devices shared in from another tailnet connect.
    #[arg(long, env = "TAILGRES_ALLOW_SHARED_NODES", num_args = 0..=1, default_missing_value = "true")]
    pub allow_shared_nodes: Option<bool>,
    /// Tell the database who is connecting: startup settings tailgres.login,
    /// tailgres.tags, tailgres.node, tailgres.node_id, tailgres.ip (for
    /// row-level security and server logs). Clients can never supply them.
    #[arg(long, env = "TAILGRES_IDENTITY_SETTINGS", num_args = 0..=1, default_missing_value = "true")]
    pub identity_settings: Option<bool>,
    /// Operator log format (text is coloured only on a terminal).
    #[arg(long, env = "TAILGRES_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// After SIGTERM/SIGINT, how long running sessions may go on before
    /// they are ended with FATAL 57P01 (e.g. 20s). A second signal ends
    /// them at once.
    #[arg(long, env = "TAILGRES_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// End a session when neither side has sent a byte for this long
    /// (e.g. 1h). Default: off.
    #[arg(long, env = "TAILGRES_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Serve /healthz, /readyz and /metrics on this local address
    /// (e.g. 127.0.0.1:9187). Default: not served locally.
    #[arg(long, env = "TAILGRES_HEALTH_LISTEN", value_name = "ADDR:PORT")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Also serve them on this tailnet port (reachable by whoever the
    /// tailnet policy lets reach it). Default: not on the tailnet.
    #[arg(long, env = "TAILGRES_HEALTH_TAILNET_PORT", value_name = "PORT")]
    pub health_tailnet_port: Option<u16>,

    /// Several databases behind one proxy: `[[route]]` tables, only in the
    /// --config file (see README).
    #[arg(skip)]
    pub route: Vec<RouteFile>,
}

/// One `[[route]]` of the configuration file: sessions whose startup names
/// a database matching `databases` (globs), on `port` if given (else the
/// main --port), go to `upstream`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteFile {
    pub name: Option<String>,
    pub databases: Vec<String>,
    pub port: Option<u16>,
    pub upstream: String,
    pub upstream_server_name: Option<String>,
    pub upstream_ca: Vec<PathBuf>,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
    pub upstream_direct_tls: bool,
    /// Default: --auth.
    pub auth: Option<AuthMode>,
    /// Default: --verifier-user, --verifier-password-file,
    /// --verifier-database, --verifier-query.
    pub verifier_user: Option<String>,
    pub verifier_password_file: Option<PathBuf>,
    pub verifier_database: Option<String>,
    pub verifier_query: Option<String>,
    /// Default: --login.
    pub login: Option<LoginMode>,
    /// Default: --identity-ca-cert / --identity-ca-key.
    pub identity_ca_cert: Option<PathBuf>,
    pub identity_ca_key: Option<PathBuf>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    /// Database-name globs; the first route that matches wins.
    pub databases: Vec<String>,
    /// Tailnet port it is served on.
    pub port: u16,
    pub upstream: crate::upstream::UpstreamOptions,
    pub login: RouteLogin,
    /// How the route's password logins are handled.
    pub auth: AuthMode,
    /// For `auth` scram-verifier: how verifiers are looked up.
    pub verifier: Option<crate::lookup::LookupConfig>,
}

/// How a session logs in to the database (`--login`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoginMode {
    /// With the client's password (handled as --auth says).
    #[default]
    Password,
    /// With a client certificate tailgres signs for the session.
    Identity,
}

/// A route's login, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteLogin {
    Password,
    Identity { ca_cert: PathBuf, ca_key: PathBuf, validity: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// `--audit-statement-text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementText {
    Normalized,
    Raw,
}

/// A fleet member's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The Tailscale Service served, `svc:NAME`.
    pub service: String,
    /// The tag that makes a node a fleet member.
    pub tag: String,
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    /// In order: the file's routes, then --upstream as the catch-all.
    pub routes: Vec<RouteConfig>,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub control_url: Option<String>,
    pub auth_key: Option<Zeroizing<String>>,
    pub ephemeral: bool,
    pub advertise_tags: Vec<String>,
    pub port: u16,
    /// `--service` and `--fleet-tag`: this node is one of a fleet.
    pub fleet: Option<Fleet>,
    pub tsnet_log: Option<String>,
    pub tailscale_log_upload: bool,
    pub audit_log: String,
    /// Signed checkpoints (`--audit-signing-key`).
    pub audit_checkpoints: Option<crate::audit::Checkpoints>,
    /// `--audit-statements`: every session's statements (reloadable).
    pub audit_statements: bool,
    /// `--audit-statement-text` (restart only).
    pub audit_statement_text: crate::statements::describe::TextMode,
    pub client_tls: Option<(PathBuf, PathBuf)>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_sessions: usize,
    pub log_format: LogFormat,
    pub policy: crate::authorize::Policy,
    pub identity_settings: bool,
    pub shutdown_grace: Duration,
    pub idle_timeout: Option<Duration>,
    pub health_listen: Option<std::net::SocketAddr>,
    pub health_tailnet_port: Option<u16>,
}

impl Config {
    /// Every tailnet port sessions are accepted on (main port first).
    pub fn ports(&self) -> Vec<u16> {
        let mut ports = vec![self.port];
        for r in &self.routes {
            if !ports.contains(&r.port) {
                ports.push(r.port);
            }
        }
        ports
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn err(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { flag, problem: problem.into() }
}

pub const DEFAULT_PORT: u16 = 5432;
pub const DEFAULT_HOSTNAME: &str = "tailgres";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tailgres";
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Enough for a busy team's tools and poolers, far below what one process
/// can hold (about 10 KiB per idle session; see bench/).
pub const DEFAULT_MAX_SESSIONS: usize = 1000;
/// Kubernetes' default terminationGracePeriodSeconds is 30 s: 20 s for
/// running sessions leaves time to end the rest, write their audit records
/// and leave the tailnet before a SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

impl Args {
    /// Fills unset values from the --config file, if any.
    pub fn merge_file(mut self) -> Result<Args, ConfigError> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
        let file: Args =
            toml::from_str(&text).map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        macro_rules! fill { ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* } }
        fill!(
            upstream,
            upstream_server_name,
            upstream_client_cert,
            upstream_client_key,
            upstream_direct_tls,
            hostname,
            state_dir,
            control_url,
            auth_key_file,
            ephemeral,
            port,
            service,
            fleet_tag,
            tsnet_log,
            tailscale_log_upload,
            audit_log,
            audit_signing_key,
            audit_checkpoint_every,
            audit_checkpoint_interval,
            audit_statements,
            audit_statement_text,
            client_tls_cert,
            client_tls_key,
            auth,
            verifier_user,
            verifier_password_file,
            verifier_database,
            verifier_query,
            verifier_cache,
            login,
            identity_ca_cert,
            identity_ca_key,
            identity_cert_validity,
            handshake_timeout,
            connect_timeout,
            max_sessions,
            log_format,
            capability,
            require_grant,
            allow_shared_nodes,
            identity_settings,
            shutdown_grace,
            idle_timeout,
            health_listen,
            health_tailnet_port
        );
        if self.upstream_ca.is_empty() {
            self.upstream_ca = file.upstream_ca;
        }
        if self.advertise_tags.is_empty() {
            self.advertise_tags = file.advertise_tags;
        }
        self.route = file.route;
        Ok(self)
    }

    /// Validates everything once. `ts_authkey` is the TS_AUTHKEY variable.
    pub fn validate(self, ts_authkey: Option<String>) -> Result<Config, ConfigError> {
        let duration = |v: &Option<String>, flag: &'static str, default: Duration| match v {
            None => Ok(default),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(d),
                _ => Err(err(flag, format!("{s:?} is not a positive duration (e.g. 15s, 1m)"))),
            },
        };
        let connect_timeout = duration(&self.connect_timeout, "--connect-timeout", DEFAULT_CONNECT_TIMEOUT)?;
        let port = self.port.unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(err("--port", "must be a port number (1-65535)"));
        }
        let validity = duration(
            &self.identity_cert_validity,
            "--identity-cert-validity",
            crate::identity_login::DEFAULT_VALIDITY,
        )?;
        if !(crate::identity_login::MIN_VALIDITY..=crate::identity_login::MAX_VALIDITY).contains(&validity) {
            return Err(err("--identity-cert-validity", "must be between 1m and 1h"));
        }
        let global_ca = (&self.identity_ca_cert, &self.identity_ca_key);
        let verifier_cache =
            duration(&self.verifier_cache, "--verifier-cache", crate::lookup::DEFAULT_CACHE_TTL)?;
        if verifier_cache > MAX_VERIFIER_CACHE {
            return Err(err("--verifier-cache", "must be at most 10m (verifiers are cached briefly)"));
        }
        let mut routes = Vec::new();
        for (i, r) in self.route.iter().enumerate() {
            let name = r.name.clone().unwrap_or_else(|| format!("route{}", i + 1));
            let within = |e: ConfigError| {
                err(
                    "--config",
                    format!("[[route]] {name:?}: {}: {}", e.flag.trim_start_matches("--"), e.problem),
                )
            };
            if routes.iter().any(|o: &RouteConfig| o.name == name) {
                return Err(err("--config", format!("two [[route]]s are named {name:?}")));
            }
            if r.port == Some(0) {
                return Err(err("--config", format!("[[route]] {name:?}: port must be 1-65535")));
            }
            let databases = if r.databases.is_empty() { vec!["*".to_string()] } else { r.databases.clone() };
            let upstream = upstream_options(
                Some(r.upstream.clone()).filter(|u| !u.is_empty()),
                &r.upstream_server_name,
                &r.upstream_ca,
                (&r.upstream_client_cert, &r.upstream_client_key),
                r.upstream_direct_tls,
                connect_timeout,
            )
            .map_err(within)?;
            let own_ca = (&r.identity_ca_cert, &r.identity_ca_key);
            let mode = r.login.or(self.login).unwrap_or_default();
            let login = route_login(mode, own_ca, global_ca, &upstream, validity).map_err(within)?;
            let auth = r.auth.or(self.auth).unwrap_or(AuthMode::PasswordRelay);
            let lookup = LookupFlags {
                user: r.verifier_user.as_ref().or(self.verifier_user.as_ref()),
                password_file: r.verifier_password_file.as_ref().or(self.verifier_password_file.as_ref()),
                database: r.verifier_database.as_ref().or(self.verifier_database.as_ref()),
                query: r.verifier_query.as_ref().or(self.verifier_query.as_ref()),
                cache: verifier_cache,
            };
            let own_lookup = r.verifier_user.is_some()
                || r.verifier_password_file.is_some()
                || r.verifier_database.is_some()
                || r.verifier_query.is_some();
            let verifier = route_verifier(auth, &login, &upstream, &lookup, own_lookup).map_err(within)?;
            routes.push(RouteConfig {
                name,
                databases,
                port: r.port.unwrap_or(port),
                upstream,
                login,
                auth,
                verifier,
            });
        }
        if self.upstream.is_some() || routes.is_empty() {
            let upstream = upstream_options(
                self.upstream.clone(),
                &self.upstream_server_name,
                &self.upstream_ca,
                (&self.upstream_client_cert, &self.upstream_client_key),
                self.upstream_direct_tls.unwrap_or(false),
                connect_timeout,
            )?;
            let login =
                route_login(self.login.unwrap_or_default(), (&None, &None), global_ca, &upstream, validity)?;
            let auth = self.auth.unwrap_or(AuthMode::PasswordRelay);
            let lookup = LookupFlags {
                user: self.verifier_user.as_ref(),
                password_file: self.verifier_password_file.as_ref(),
                database: self.verifier_database.as_ref(),
                query: self.verifier_query.as_ref(),
                cache: verifier_cache,
            };
            let verifier = route_verifier(auth, &login, &upstream, &lookup, false)?;
            let name = if routes.is_empty() { "default" } else { "upstream" };
            routes.push(RouteConfig {
                name: name.into(),
                databases: vec!["*".into()],
                port,
                upstream,
                login,
                auth,
                verifier,
            });
        }
        // Lookup settings no route uses would do nothing.
        let verifier_routes = routes.iter().any(|r| r.verifier.is_some());
        let lookup_flags = [
            (self.verifier_user.is_some(), "--verifier-user"),
            (self.verifier_password_file.is_some(), "--verifier-password-file"),
            (self.verifier_database.is_some(), "--verifier-database"),
            (self.verifier_query.is_some(), "--verifier-query"),
            (self.verifier_cache.is_some(), "--verifier-cache"),
        ];
        if let Some((_, flag)) = lookup_flags.iter().find(|(set, _)| *set).filter(|_| !verifier_routes) {
            return Err(err(
                flag,
                "set, but no route authenticates with stored verifiers (add --auth scram-verifier, or \
                 auth = \"scram-verifier\" to a [[route]])",
            ));
        }
        // A CA given to no route that logs in by identity is a setting that
        // does nothing, which an operator would not expect.
        let identity_routes = routes.iter().any(|r| matches!(r.login, RouteLogin::Identity { .. }));
        if (self.identity_ca_cert.is_some() || self.identity_ca_key.is_some()) && !identity_routes {
            return Err(err(
                "--identity-ca-cert",
                "set, but no route logs in by identity (add --login identity, or login = \"identity\" \
                 to a [[route]])",
            ));
        }
        if self.identity_cert_validity.is_some() && !identity_routes {
            return Err(err("--identity-cert-validity", "set, but no route logs in by identity"));
        }
        if self.client_tls_cert.is_some() != self.client_tls_key.is_some() {
            return Err(err("--client-tls-cert", "--client-tls-cert and --client-tls-key go together"));
        }

        let hostname = self.hostname.unwrap_or_else(|| DEFAULT_HOSTNAME.into());
        let label_ok = !hostname.is_empty()
            && hostname.len() <= 63
            && hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !hostname.starts_with('-');
        if !label_ok {
            return Err(err("--hostname", format!("{hostname:?} is not a DNS label (letters, digits, '-')")));
        }
        for t in &self.advertise_tags {
            if !t.starts_with("tag:") || t.len() == 4 {
                return Err(err("--advertise-tags", format!("{t:?} is not a tag (tag:name)")));
            }
        }
        let fleet = match (self.service, self.fleet_tag) {
            (None, None) => None,
            (None, Some(_)) => return Err(err("--fleet-tag", "set, but no --service: a fleet tag names the members of a Service's fleet")),
            (Some(_), None) => {
                return Err(err("--service", "needs --fleet-tag: the tag of the fleet's members (cancels are forwarded only between them)"))
            }
            (Some(service), Some(tag)) => {
                let name = service.strip_prefix("svc:").unwrap_or("");
                let label_ok = !name.is_empty()
                    && name.len() <= 63
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !name.starts_with('-')
                    && !name.ends_with('-');
                if !label_ok {
                    return Err(err("--service", format!("{service:?} is not a Service name (svc: then a lower-case DNS label)")));
                }
                if name.eq_ignore_ascii_case(&hostname) {
                    return Err(err(
                        "--service",
                        format!("the Service's name {name:?} is this node's --hostname: the two MagicDNS names would collide; give the node its own name"),
                    ));
                }
                if !tag.starts_with("tag:") || tag.len() == 4 {
                    return Err(err("--fleet-tag", format!("{tag:?} is not a tag (tag:name)")));
                }
                Some(Fleet { service, tag })
            }
        };
        if let Some(u) = &self.control_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(err("--control-url", format!("{u:?} is not an http(s) URL")));
            }
        }
        let auth_key = match (&self.auth_key_file, ts_authkey) {
            (Some(f), _) => {
                let k = std::fs::read_to_string(f)
                    .map_err(|e| err("--auth-key-file", format!("cannot read {}: {e}", f.display())))?;
                let k = Zeroizing::new(k.trim().to_string());
                if k.is_empty() {
                    return Err(err("--auth-key-file", format!("{} is empty", f.display())));
                }
                Some(k)
            }
            (None, Some(k)) if !k.trim().is_empty() => Some(Zeroizing::new(k.trim().to_string())),
            _ => None,
        };
        let audit_log = self.audit_log.ok_or_else(|| {
            err("--audit-log", "required: a file path for the JSON-lines audit log, or - for standard output")
        })?;
        let checkpoint_interval = duration(
            &self.audit_checkpoint_interval,
            "--audit-checkpoint-interval",
            crate::audit::DEFAULT_CHECKPOINT_INTERVAL,
        )?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&checkpoint_interval) {
            return Err(err("--audit-checkpoint-interval", "must be between 1s and 1h"));
        }
        if self.audit_checkpoint_every == Some(0) {
            return Err(err("--audit-checkpoint-every", "must be at least 1"));
        }
        let audit_checkpoints = match &self.audit_signing_key {
            Some(path) => Some(crate::audit::Checkpoints {
                signer: std::sync::Arc::new(
                    crate::audit::chain::Signer::load(path)
                        .map_err(|e| err("--audit-signing-key", e.to_string()))?,
                ),
                every: self.audit_checkpoint_every.unwrap_or(crate::audit::DEFAULT_CHECKPOINT_EVERY),
                interval: checkpoint_interval,
            }),
            None => {
                // Settings that would do nothing are a mistake worth a word.
                for (set, flag) in [
                    (self.audit_checkpoint_every.is_some(), "--audit-checkpoint-every"),
                    (self.audit_checkpoint_interval.is_some(), "--audit-checkpoint-interval"),
                ] {
                    if set {
                        return Err(err(flag, "signs checkpoints, which needs --audit-signing-key"));
                    }
                }
                None
            }
        };
        let max_sessions = self.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS);
        if max_sessions == 0 {
            return Err(err("--max-sessions", "must be at least 1"));
        }
        let capability = self.capability.unwrap_or_else(|| crate::authorize::DEFAULT_CAPABILITY.into());
        let (domain, name) = capability.split_once("/cap/").unwrap_or(("", ""));
        if domain.is_empty() || name.is_empty() || capability.contains(char::is_whitespace) {
            return Err(err(
                "--capability",
                format!("{capability:?} is not a capability name (<domain>/cap/<name>)"),
            ));
        }
        if self.health_tailnet_port == Some(0) || self.health_tailnet_port.is_some_and(|p| p == port) {
            return Err(err("--health-tailnet-port", "must be a port number other than --port"));
        }
        if let Some(p) = self.health_tailnet_port.filter(|p| routes.iter().any(|r| r.port == *p)) {
            return Err(err("--health-tailnet-port", format!("port {p} already serves a [[route]]")));
        }
        Ok(Config {
            routes,
            hostname,
            state_dir: self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            control_url: self.control_url,
            auth_key,
            ephemeral: self.ephemeral.unwrap_or(false),
            advertise_tags: self.advertise_tags,
            port,
            fleet,
            tsnet_log: self.tsnet_log,
            tailscale_log_upload: self.tailscale_log_upload.unwrap_or(false),
            audit_log,
            audit_checkpoints,
            audit_statements: self.audit_statements.unwrap_or(false),
            audit_statement_text: match self.audit_statement_text {
                Some(StatementText::Raw) => crate::statements::describe::TextMode::Raw,
                _ => crate::statements::describe::TextMode::Normalized,
            },
            client_tls: self.client_tls_cert.zip(self.client_tls_key),
            handshake_timeout: duration(
                &self.handshake_timeout,
                "--handshake-timeout",
                DEFAULT_HANDSHAKE_TIMEOUT,
            )?,
            connect_timeout,
            max_sessions,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            identity_settings: self.identity_settings.unwrap_or(false),
            policy: crate::authorize::Policy {
                capability,
                require_grant: self.require_grant.unwrap_or(false),
                allow_shared_nodes: self.allow_shared_nodes.unwrap_or(false),
            },
            shutdown_grace: duration(&self.shutdown_grace, "--shutdown-grace", DEFAULT_SHUTDOWN_GRACE)?,
            idle_timeout: match &self.idle_timeout {
                None => None,
                Some(_) => Some(duration(&self.idle_timeout, "--idle-timeout", Duration::ZERO)?),
            },
            health_listen: self.health_listen,
            health_tailnet_port: self.health_tailnet_port,
        })
    }
}

/// Checks a route's login: identity needs a CA (certificate and key: the
/// route's own, else the global one) and excludes a fixed client
/// certificate; a route's own CA without identity login is refused as a
/// setting that would do nothing (the global one is checked once all
/// routes are known).
fn route_login(
    mode: LoginMode,
    own: (&Option<PathBuf>, &Option<PathBuf>),
    global: (&Option<PathBuf>, &Option<PathBuf>),
    upstream: &crate::upstream::UpstreamOptions,
    validity: Duration,
) -> Result<RouteLogin, ConfigError> {
    let own_set = own.0.is_some() || own.1.is_some();
    match mode {
        LoginMode::Password if own_set => Err(err(
            "--identity-ca-cert",
            "set, but this route logs in by password (login = \"identity\" uses it)",
        )),
        LoginMode::Password => Ok(RouteLogin::Password),
        LoginMode::Identity => {
            let (cert, key) = if own_set { own } else { global };
            let (Some(ca_cert), Some(ca_key)) = (cert, key) else {
                return Err(err(
                    "--identity-ca-cert",
                    "identity login needs --identity-ca-cert and --identity-ca-key (the CA tailgres signs \
                     database client certificates with)",
                ));
            };
            if upstream.client_cert.is_some() {
                return Err(err(
                    "--upstream-client-cert",
                    "identity login signs a client certificate for every session; a fixed \
                     --upstream-client-cert cannot be used with it",
                ));
            }
            Ok(RouteLogin::Identity { ca_cert: ca_cert.clone(), ca_key: ca_key.clone(), validity })
        }
    }
}

/// The --verifier-* settings that apply to one route.
struct LookupFlags<'a> {
    user: Option<&'a String>,
    password_file: Option<&'a PathBuf>,
    database: Option<&'a String>,
    query: Option<&'a String>,
    cache: Duration,
}

/// The environment variable that can hold the lookup role's password.
pub const VERIFIER_PASSWORD_ENV: &str = "TAILGRES_VERIFIER_PASSWORD";
const MAX_VERIFIER_CACHE: Duration = Duration::from_secs(600);

/// Checks a route's verifier lookup: only for `auth` scram-verifier, never
/// with identity login (which uses no password); the lookup role's password
/// from its file or the environment (a route that presents
/// --upstream-client-cert may go without, if its database takes the
/// certificate).
fn route_verifier(
    auth: AuthMode,
    login: &RouteLogin,
    upstream: &crate::upstream::UpstreamOptions,
    flags: &LookupFlags,
    own_flags: bool,
) -> Result<Option<crate::lookup::LookupConfig>, ConfigError> {
    use crate::lookup;
    if auth != AuthMode::ScramVerifier {
        if own_flags {
            return Err(err("--verifier-user", "set, but this route does not use auth = \"scram-verifier\""));
        }
        return Ok(None);
    }
    if matches!(login, RouteLogin::Identity { .. }) {
        return Err(err(
            "--auth",
            "scram-verifier authenticates passwords, and this route logs in by identity (no password): \
             choose one",
        ));
    }
    let password = match flags.password_file {
        Some(f) => {
            let text =
                Zeroizing::new(std::fs::read_to_string(f).map_err(|e| {
                    err("--verifier-password-file", format!("cannot read {}: {e}", f.display()))
                })?);
            let p = text.trim_end_matches(['\n', '\r']);
            if p.is_empty() {
                return Err(err("--verifier-password-file", format!("{} is empty", f.display())));
            }
            Some(Zeroizing::new(p.to_string()))
        }
        None => std::env::var(VERIFIER_PASSWORD_ENV).ok().filter(|p| !p.is_empty()).map(Zeroizing::new),
    };
    if password.is_none() && upstream.client_cert.is_none() {
        return Err(err(
            "--verifier-password-file",
            format!(
                "scram-verifier looks verifiers up as a role that needs a password: give it in a file \
                 (--verifier-password-file) or in {VERIFIER_PASSWORD_ENV}, never on the command line"
            ),
        ));
    }
    let name = |v: Option<&String>, default: &str, flag: &'static str| match v {
        Some(n) if n.is_empty() || n.contains('\0') => Err(err(flag, "must be a non-empty name")),
        Some(n) => Ok(n.clone()),
        None => Ok(default.to_string()),
    };
    let query = name(flags.query, lookup::DEFAULT_QUERY, "--verifier-query")?;
    if !query.contains("$1") {
        return Err(err("--verifier-query", "must take the role name as $1"));
    }
    Ok(Some(lookup::LookupConfig {
        user: name(flags.user, lookup::DEFAULT_USER, "--verifier-user")?,
        password,
        database: name(flags.database, lookup::DEFAULT_DATABASE, "--verifier-database")?,
        query,
        cache_ttl: flags.cache,
    }))
}

/// Checks one upstream's settings (flag names in errors are the
/// `--upstream*` flags; a route's caller rewrites them).
fn upstream_options(
    addr: Option<String>,
    server_name: &Option<String>,
    ca: &[PathBuf],
    (client_cert, client_key): (&Option<PathBuf>, &Option<PathBuf>),
    direct_tls: bool,
    connect_timeout: Duration,
) -> Result<crate::upstream::UpstreamOptions, ConfigError> {
    let addr =
        addr.ok_or_else(|| err("--upstream", "required: the database as HOST:PORT (e.g. db.internal:5432)"))?;
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| err("--upstream", format!("{addr:?} is not HOST:PORT")))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(err("--upstream", format!("{addr:?} is not HOST:PORT")));
    }
    if let Some(n) = server_name {
        if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
            return Err(err("--upstream-server-name", format!("{n:?} is not a DNS name or IP address")));
        }
    }
    for c in ca {
        if !c.exists() {
            return Err(err("--upstream-ca", format!("{} does not exist", c.display())));
        }
    }
    if client_cert.is_some() != client_key.is_some() {
        return Err(err(
            "--upstream-client-cert",
            "--upstream-client-cert and --upstream-client-key go together",
        ));
    }
    Ok(crate::upstream::UpstreamOptions {
        addr,
        server_name: server_name.clone(),
        ca: ca.to_vec(),
        client_cert: client_cert.clone(),
        client_key: client_key.clone(),
        direct_tls,
        connect_timeout,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["tailgres"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).unwrap().merge_file()?.validate(None)
    }

    #[test]
    fn audit_signing_key_and_checkpoint_cadence() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        crate::audit::chain::Signer::generate(&key).unwrap();
        let flag = format!("--audit-signing-key={}", key.display());
        let c = parse(&["--upstream=db:5432", "--audit-log=-", &flag, "--audit-checkpoint-every=5"]).unwrap();
        let cp = c.audit_checkpoints.unwrap();
        assert_eq!((cp.every, cp.interval), (5, crate::audit::DEFAULT_CHECKPOINT_INTERVAL));
        assert!(cp.signer.public_key().starts_with("ed25519:"));
        let c = from_toml(&format!(
            "upstream = \"db:5432\"\naudit-log = \"-\"\naudit-signing-key = \"{}\"\naudit-checkpoint-interval = \"10s\"\n",
            key.display()
        ))
        .unwrap();
        assert_eq!(c.audit_checkpoints.unwrap().interval, Duration::from_secs(10));
        assert!(parse(&["--upstream=db:5432", "--audit-log=-"]).unwrap().audit_checkpoints.is_none());
        // A key others can read would let them sign a rewritten log.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = parse(&["--upstream=db:5432", "--audit-log=-", &flag]).unwrap_err();
        assert_eq!(e.flag, "--audit-signing-key");
        assert!(e.problem.contains("readable by group or others"), "{e}");
    }

    /// The configuration a `--config` file with `text` (and no flags) gives.
    pub(crate) fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, text).unwrap();
        parse(&[&format!("--config={}", f.display())])
    }

    /// scram-verifier: the lookup role's password from a file (never a
    /// flag), a route of its own beside password-relay routes; settings
    /// that would do nothing, or that contradict each other, are refused.
    #[test]
    fn verifier_mode_needs_a_lookup_password_and_nothing_contradictory() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "lookup-secret\n").unwrap();
        let pw_flag = format!("--verifier-password-file={}", pw.display());
        let base = ["--upstream=db:5432", "--audit-log=-"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());

        let c = with(&["--auth=scram-verifier", &pw_flag, "--verifier-cache=5s"]).unwrap();
        let v = c.routes[0].verifier.as_ref().expect("a lookup");
        assert_eq!(c.routes[0].auth, AuthMode::ScramVerifier);
        assert_eq!(
            v.password.as_deref().map(String::as_str),
            Some("lookup-secret"),
            "the newline is not part of it"
        );
        assert_eq!(
            (v.user.as_str(), v.database.as_str(), v.query.as_str(), v.cache_ttl),
            ("tailgres_auth", "postgres", "SELECT tailgres_auth.verifier($1)", Duration::from_secs(5))
        );
        assert!(!format!("{c:?}").contains("lookup-secret"), "the password is never printed");

        let refusals: [(&[&str], &str, &str); 7] = [
            (&["--auth=scram-verifier"], "--verifier-password-file", "never on the command line"),
            (&[&pw_flag], "--verifier-password-file", "no route authenticates"),
            (&["--verifier-user=x"], "--verifier-user", "no route authenticates"),
            (&["--auth=scram-verifier", &pw_flag, "--verifier-query=SELECT 1"], "--verifier-query", "$1"),
            (&["--auth=scram-verifier", &pw_flag, "--verifier-cache=1h"], "--verifier-cache", "10m"),
            (
                &["--auth=scram-verifier", "--verifier-password-file=/nonexistent"],
                "--verifier-password-file",
                "cannot read",
            ),
            (
                &[
                    "--auth=scram-verifier",
                    &pw_flag,
                    "--login=identity",
                    "--identity-ca-cert=/a",
                    "--identity-ca-key=/b",
                ],
                "--auth",
                "choose one",
            ),
        ];
        for (args, flag, want) in refusals {
            let e = with(args).expect_err(&format!("{args:?}"));
            assert_eq!(e.flag, flag, "{args:?}: {e}");
            assert!(e.problem.contains(want), "{args:?}: {e}");
        }

        // Per route: one route by verifier (its own lookup role), the
        // catch-all by password relay.
        let c = from_toml(&format!(
            r#"
audit-log = "-"
upstream = "db:5432"
verifier-password-file = "{}"
[[route]]
name = "strict"
databases = ["billing"]
upstream = "billing:5432"
auth = "scram-verifier"
verifier-user = "billing_lookup"
"#,
            pw.display()
        ))
        .unwrap();
        let auths: Vec<(&str, AuthMode, Option<&str>)> = c
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.auth, r.verifier.as_ref().map(|v| v.user.as_str())))
            .collect();
        assert_eq!(
            auths,
            [
                ("strict", AuthMode::ScramVerifier, Some("billing_lookup")),
                ("upstream", AuthMode::PasswordRelay, None)
            ]
        );
        let e = from_toml("audit-log = \"-\"\n[[route]]\nupstream = \"db:1\"\nverifier-user = \"x\"\n")
            .unwrap_err();
        assert!(e.problem.contains("does not use auth = \"scram-verifier\""), "{e}");
    }

    #[test]
    fn refusals_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--audit-log=-"], "--upstream"),
            (&["--upstream=db", "--audit-log=-"], "--upstream"),
            (&["--upstream=db:0", "--audit-log=-"], "--upstream"),
            (&["--upstream=db:5432"], "--audit-log"),
            (&["--upstream=db:5432", "--audit-log=-", "--hostname=bad_name"], "--hostname"),
            (&["--upstream=db:5432", "--audit-log=-", "--upstream-client-cert=/x"], "--upstream-client-cert"),
            (&["--upstream=db:5432", "--audit-log=-", "--client-tls-key=/x"], "--client-tls-cert"),
            (&["--upstream=db:5432", "--audit-log=-", "--upstream-ca=/nonexistent"], "--upstream-ca"),
            (&["--upstream=db:5432", "--audit-log=-", "--handshake-timeout=soon"], "--handshake-timeout"),
            (&["--upstream=db:5432", "--audit-log=-", "--advertise-tags=db"], "--advertise-tags"),
            (&["--upstream=db:5432", "--audit-log=-", "--control-url=ftp://x"], "--control-url"),
            (&["--upstream=db:5432", "--audit-log=-", "--service=svc:db"], "--service"),
            (&["--upstream=db:5432", "--audit-log=-", "--fleet-tag=tag:pg"], "--fleet-tag"),
            (&["--upstream=db:5432", "--audit-log=-", "--service=db", "--fleet-tag=tag:pg"], "--service"),
            (&["--upstream=db:5432", "--audit-log=-", "--service=svc:Bad_Name", "--fleet-tag=tag:pg"], "--service"),
            (&["--upstream=db:5432", "--audit-log=-", "--service=svc:db", "--fleet-tag=pg"], "--fleet-tag"),
            (
                &["--upstream=db:5432", "--audit-log=-", "--hostname=pg", "--service=svc:pg", "--fleet-tag=tag:pg"],
                "--service",
            ),
            (
                &["--upstream=db:5432", "--audit-log=-", "--upstream-server-name=a b"],
                "--upstream-server-name",
            ),
            (&["--upstream=db:5432", "--audit-log=-", "--auth-key-file=/nonexistent"], "--auth-key-file"),
            (
                &["--upstream=db:5432", "--audit-log=-", "--audit-signing-key=/nonexistent"],
                "--audit-signing-key",
            ),
            (
                &["--upstream=db:5432", "--audit-log=-", "--audit-checkpoint-every=10"],
                "--audit-checkpoint-every",
            ),
            (
                &["--upstream=db:5432", "--audit-log=-", "--audit-checkpoint-interval=2h"],
                "--audit-checkpoint-interval",
            ),
            (
                &["--upstream=db:5432", "--audit-log=-", "--audit-checkpoint-interval=1m"],
                "--audit-checkpoint-interval",
            ),
            (&["--upstream=db:5432", "--audit-log=-", "--capability=postgres"], "--capability"),
        ];
        for (args, flag) in cases {
            let e = parse(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.flag, *flag, "{args:?}: {e}");
        }
    }

    #[test]
    fn identity_login_needs_a_ca_and_a_ca_needs_identity_login() {
        let base = ["--upstream=db:5432", "--audit-log=-"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        // Identity login without a CA, or half a CA.
        let e = with(&["--login=identity"]).unwrap_err();
        assert_eq!(e.flag, "--identity-ca-cert", "{e}");
        let e = with(&["--login=identity", "--identity-ca-cert=/ca.pem"]).unwrap_err();
        assert_eq!(e.flag, "--identity-ca-cert", "{e}");
        // A CA that no route uses does nothing: refused, not ignored.
        let e = with(&["--identity-ca-cert=/ca.pem", "--identity-ca-key=/ca.key"]).unwrap_err();
        assert!(e.problem.contains("no route logs in by identity"), "{e}");
        let e = with(&["--identity-cert-validity=10m"]).unwrap_err();
        assert_eq!(e.flag, "--identity-cert-validity", "{e}");
        // A fixed client certificate and per-session ones exclude each other.
        let e = with(&[
            "--login=identity",
            "--identity-ca-cert=/ca.pem",
            "--identity-ca-key=/ca.key",
            "--upstream-client-cert=/c.pem",
            "--upstream-client-key=/c.key",
        ])
        .unwrap_err();
        assert_eq!(e.flag, "--upstream-client-cert", "{e}");
        // Validity stays within 1m..1h.
        for bad in ["30s", "2h"] {
            let v = format!("--identity-cert-validity={bad}");
            let e =
                with(&["--login=identity", "--identity-ca-cert=/ca.pem", "--identity-ca-key=/ca.key", &v])
                    .unwrap_err();
            assert_eq!(e.flag, "--identity-cert-validity", "{bad}: {e}");
        }
        let c = with(&[
            "--login=identity",
            "--identity-ca-cert=/ca.pem",
            "--identity-ca-key=/ca.key",
            "--identity-cert-validity=10m",
        ])
        .unwrap();
        assert_eq!(
            c.routes[0].login,
            RouteLogin::Identity {
                ca_cert: "/ca.pem".into(),
                ca_key: "/ca.key".into(),
                validity: Duration::from_secs(600)
            }
        );
        assert_eq!(parse(&base).unwrap().routes[0].login, RouteLogin::Password);
    }

    #[test]
    fn a_route_can_log_in_by_identity_beside_password_routes() {
        let c = from_toml(
            r#"
audit-log = "-"
upstream = "db:5432"
identity-ca-cert = "/ca.pem"
identity-ca-key = "/ca.key"
[[route]]
name = "people"
port = 5433
upstream = "db:5432"
login = "identity"
[[route]]
name = "own-ca"
port = 5434
upstream = "db:5432"
login = "identity"
identity-ca-cert = "/other.pem"
identity-ca-key = "/other.key"
"#,
        )
        .unwrap();
        let logins: Vec<(&str, &RouteLogin)> = c.routes.iter().map(|r| (r.name.as_str(), &r.login)).collect();
        let id = |cert: &str, key: &str| RouteLogin::Identity {
            ca_cert: cert.into(),
            ca_key: key.into(),
            validity: crate::identity_login::DEFAULT_VALIDITY,
        };
        assert_eq!(
            logins,
            [
                ("people", &id("/ca.pem", "/ca.key")),
                ("own-ca", &id("/other.pem", "/other.key")),
                ("upstream", &RouteLogin::Password),
            ]
        );
        // A route's own CA on a password route is a mistake.
        let e = from_toml(
            "audit-log = \"-\"\n[[route]]\nupstream = \"db:5432\"\nidentity-ca-cert = \"/a\"\nidentity-ca-key = \"/b\"\n",
        )
        .unwrap_err();
        assert!(e.problem.contains("logs in by password"), "{e}");
    }

    #[test]
    fn packaged_example_config_parses() {
        let a: Args = toml::from_str(include_str!("../packaging/tailgres.toml")).unwrap();
        assert_eq!(a.route.len(), 2);
        assert_eq!(a.route[1].port, Some(5433));
        assert_eq!(a.shutdown_grace.as_deref(), Some("20s"));
    }

    #[test]
    fn defaults_and_file() {
        let c = parse(&["--upstream=db.internal:5432", "--audit-log=-"]).unwrap();
        assert_eq!(c.port, 5432);
        assert_eq!(c.hostname, "tailgres");
        assert_eq!(c.hostname, crate::audit::DEFAULT_NODE, "the audit log's default node is the default hostname");
        assert_eq!(c.routes[0].auth, AuthMode::PasswordRelay);
        assert!(!c.tailscale_log_upload);
        assert_eq!(c.fleet, None);
        let c = parse(&["--upstream=db:5432", "--audit-log=-", "--hostname=pg-1", "--service=svc:pg", "--fleet-tag=tag:pg"])
            .unwrap();
        assert_eq!(c.fleet, Some(Fleet { service: "svc:pg".into(), tag: "tag:pg".into() }));

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "upstream = \"db:6432\"\nhostname = \"pg\"\naudit-log = \"/tmp/a.jsonl\"\nauth = \"passthrough\"\n").unwrap();
        let c = parse(&[&format!("--config={}", f.display()), "--hostname=flagwins"]).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].upstream.addr, "db:6432");
        assert_eq!(c.hostname, "flagwins");
        assert_eq!(c.routes[0].auth, AuthMode::Passthrough);
        std::fs::write(&f, "upstrem = \"typo:1\"\n").unwrap();
        let e = parse(&[&format!("--config={}", f.display())]).unwrap_err();
        assert_eq!(e.flag, "--config");
    }
}
