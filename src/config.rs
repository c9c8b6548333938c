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
#[derive(Debug, Default, Parser, Deserialize)]
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
    /// Where tsnet's verbose log goes: "stderr" or a file (default: off).
    #[arg(long, env = "TAILGRES_TSNET_LOG", value_name = "stderr|FILE")]
    pub tsnet_log: Option<String>,
    /// Upload tsnet's logs to Tailscale (off by default).
    #[arg(long, env = "TAILGRES_TAILSCALE_LOG_UPLOAD", num_args = 0..=1, default_missing_value = "true")]
    pub tailscale_log_upload: Option<bool>,

    /// JSON-lines audit log: a file path, or - for standard output.
    #[arg(long, env = "TAILGRES_AUDIT_LOG", value_name = "PATH|-")]
    pub audit_log: Option<String>,

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
    /// Operator log format.
    #[arg(long, env = "TAILGRES_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    pub upstream: String,
    pub upstream_server_name: Option<String>,
    pub upstream_ca: Vec<PathBuf>,
    pub upstream_client_cert: Option<PathBuf>,
    pub upstream_client_key: Option<PathBuf>,
    pub upstream_direct_tls: bool,
    pub hostname: String,
    pub state_dir: PathBuf,
    pub control_url: Option<String>,
    pub auth_key: Option<Zeroizing<String>>,
    pub ephemeral: bool,
    pub advertise_tags: Vec<String>,
    pub port: u16,
    pub tsnet_log: Option<String>,
    pub tailscale_log_upload: bool,
    pub audit_log: String,
    pub client_tls: Option<(PathBuf, PathBuf)>,
    pub auth: AuthMode,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_sessions: usize,
    pub log_format: LogFormat,
    pub policy: crate::authorize::Policy,
    pub identity_settings: bool,
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
pub const DEFAULT_MAX_SESSIONS: usize = 1000;

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
            tsnet_log,
            tailscale_log_upload,
            audit_log,
            client_tls_cert,
            client_tls_key,
            auth,
            handshake_timeout,
            connect_timeout,
            max_sessions,
            log_format,
            capability,
            require_grant,
            allow_shared_nodes,
            identity_settings
        );
        if self.upstream_ca.is_empty() {
            self.upstream_ca = file.upstream_ca;
        }
        if self.advertise_tags.is_empty() {
            self.advertise_tags = file.advertise_tags;
        }
        Ok(self)
    }

    /// Validates everything once. `ts_authkey` is the TS_AUTHKEY variable.
    pub fn validate(self, ts_authkey: Option<String>) -> Result<Config, ConfigError> {
        let upstream = self.upstream.ok_or_else(|| {
            err("--upstream", "required: the database as HOST:PORT (e.g. db.internal:5432)")
        })?;
        let (host, port) = upstream
            .rsplit_once(':')
            .ok_or_else(|| err("--upstream", format!("{upstream:?} is not HOST:PORT")))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(err("--upstream", format!("{upstream:?} is not HOST:PORT")));
        }
        if let Some(n) = &self.upstream_server_name {
            if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
                return Err(err("--upstream-server-name", format!("{n:?} is not a DNS name or IP address")));
            }
        }
        for ca in &self.upstream_ca {
            if !ca.exists() {
                return Err(err("--upstream-ca", format!("{} does not exist", ca.display())));
            }
        }
        let pair = |a: &Option<PathBuf>, b: &Option<PathBuf>, flag: &'static str, other: &str| match (a, b) {
            (Some(_), None) | (None, Some(_)) => Err(err(flag, format!("{flag} and {other} go together"))),
            _ => Ok(()),
        };
        pair(
            &self.upstream_client_cert,
            &self.upstream_client_key,
            "--upstream-client-cert",
            "--upstream-client-key",
        )?;
        pair(&self.client_tls_cert, &self.client_tls_key, "--client-tls-cert", "--client-tls-key")?;

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
        let duration = |v: Option<String>, flag: &'static str, default: Duration| match v {
            None => Ok(default),
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if !d.is_zero() => Ok(d),
                _ => Err(err(flag, format!("{s:?} is not a positive duration (e.g. 15s, 1m)"))),
            },
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
        let port = self.port.unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(err("--port", "must be a port number (1-65535)"));
        }
        Ok(Config {
            upstream,
            upstream_server_name: self.upstream_server_name,
            upstream_ca: self.upstream_ca,
            upstream_client_cert: self.upstream_client_cert,
            upstream_client_key: self.upstream_client_key,
            upstream_direct_tls: self.upstream_direct_tls.unwrap_or(false),
            hostname,
            state_dir: self.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            control_url: self.control_url,
            auth_key,
            ephemeral: self.ephemeral.unwrap_or(false),
            advertise_tags: self.advertise_tags,
            port,
            tsnet_log: self.tsnet_log,
            tailscale_log_upload: self.tailscale_log_upload.unwrap_or(false),
            audit_log,
            client_tls: self.client_tls_cert.zip(self.client_tls_key),
            auth: self.auth.unwrap_or(AuthMode::PasswordRelay),
            handshake_timeout: duration(
                self.handshake_timeout,
                "--handshake-timeout",
                DEFAULT_HANDSHAKE_TIMEOUT,
            )?,
            connect_timeout: duration(self.connect_timeout, "--connect-timeout", DEFAULT_CONNECT_TIMEOUT)?,
            max_sessions,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            identity_settings: self.identity_settings.unwrap_or(false),
            policy: crate::authorize::Policy {
                capability,
                require_grant: self.require_grant.unwrap_or(false),
                allow_shared_nodes: self.allow_shared_nodes.unwrap_or(false),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["tailgres"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).unwrap().merge_file()?.validate(None)
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
            (
                &["--upstream=db:5432", "--audit-log=-", "--upstream-server-name=a b"],
                "--upstream-server-name",
            ),
            (&["--upstream=db:5432", "--audit-log=-", "--auth-key-file=/nonexistent"], "--auth-key-file"),
            (&["--upstream=db:5432", "--audit-log=-", "--capability=postgres"], "--capability"),
        ];
        for (args, flag) in cases {
            let e = parse(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.flag, *flag, "{args:?}: {e}");
        }
    }

    #[test]
    fn defaults_and_file() {
        let c = parse(&["--upstream=db.internal:5432", "--audit-log=-"]).unwrap();
        assert_eq!(c.port, 5432);
        assert_eq!(c.hostname, "tailgres");
        assert_eq!(c.auth, AuthMode::PasswordRelay);
        assert!(!c.tailscale_log_upload);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "upstream = \"db:6432\"\nhostname = \"pg\"\naudit-log = \"/tmp/a.jsonl\"\nauth = \"passthrough\"\n").unwrap();
        let c = parse(&[&format!("--config={}", f.display()), "--hostname=flagwins"]).unwrap();
        assert_eq!(c.upstream, "db:6432");
        assert_eq!(c.hostname, "flagwins");
        assert_eq!(c.auth, AuthMode::Passthrough);
        std::fs::write(&f, "upstrem = \"typo:1\"\n").unwrap();
        let e = parse(&[&format!("--config={}", f.display())]).unwrap_err();
        assert_eq!(e.flag, "--config");
    }
}
