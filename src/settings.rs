//! What SIGHUP may change without a restart: the routes to the databases
//! (with their TLS settings, CA bundles re-read), the access policy,
//! password handling and the session timeouts.
//!
//! Each session takes one [`Settings`] snapshot when it starts and keeps it
//! to its end, so a reload never changes a session halfway; a cancel goes
//! to the very upstream its session used.
#![forbid(unsafe_code)]

use crate::authenticate::AuthMode;
use crate::authorize::{glob, Policy};
use crate::config::{Config, RouteLogin};
use crate::identity_login::IdentityCa;
use crate::lookup::VerifierSource;
use crate::upstream::UpstreamTls;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// One database behind the proxy.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub databases: Vec<String>,
    /// The tailnet port whose sessions it serves.
    pub port: u16,
    pub upstream: Arc<UpstreamTls>,
    pub login: Login,
    /// How password logins are handled (`--auth`, or the route's).
    pub auth: AuthMode,
    /// `auth` scram-verifier: the route's verifier lookup and cache.
    pub verifiers: Option<Arc<VerifierSource>>,
}

/// How a route's sessions log in to the database.
#[derive(Debug, Clone)]
pub enum Login {
    /// With the client's password (or whatever the database asks for).
    Password,
    /// With a client certificate signed for the session by this CA.
    Identity(Arc<IdentityCa>),
}

#[derive(Debug)]
pub struct Settings {
    /// In order; the first match wins.
    pub routes: Vec<Route>,
    pub policy: Policy,
    pub identity_settings: bool,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// `--audit-statements`: every session's statements are recorded.
    pub audit_statements: bool,
}

impl Settings {
    /// Builds every upstream TLS client and loads every identity CA
    /// (reading CA bundles and keys now, so a bad file is refused here and
    /// not at a session).
    pub fn from_config(cfg: &Config) -> Result<Settings, RouteError> {
        let routes = cfg
            .routes
            .iter()
            .map(|r| {
                let route_err = |e: Box<dyn std::error::Error + Send + Sync>| RouteError {
                    route: r.name.clone(),
                    source: e,
                };
                let upstream = UpstreamTls::new(&r.upstream).map_err(|e| route_err(Box::new(e)))?;
                let login = match &r.login {
                    RouteLogin::Password => Login::Password,
                    RouteLogin::Identity { ca_cert, ca_key, validity } => Login::Identity(
                        IdentityCa::load(ca_cert, ca_key, *validity).map_err(|e| route_err(Box::new(e)))?,
                    ),
                };
                Ok(Route {
                    name: r.name.clone(),
                    databases: r.databases.clone(),
                    port: r.port,
                    upstream: Arc::new(upstream),
                    login,
                    auth: r.auth,
                    verifiers: r.verifier.clone().map(|c| Arc::new(VerifierSource::new(c))),
                })
            })
            .collect::<Result<_, RouteError>>()?;
        Ok(Settings {
            routes,
            policy: cfg.policy.clone(),
            identity_settings: cfg.identity_settings,
            handshake_timeout: cfg.handshake_timeout,
            idle_timeout: cfg.idle_timeout,
            audit_statements: cfg.audit_statements,
        })
    }

    /// (route, CA notAfter) of every route that logs in by identity.
    pub fn identity_cas(&self) -> Vec<(String, std::time::SystemTime)> {
        self.routes
            .iter()
            .filter_map(|r| match &r.login {
                Login::Identity(ca) => Some((r.name.clone(), ca.not_after())),
                Login::Password => None,
            })
            .collect()
    }

    /// The route for a session accepted on tailnet `port` that asked for
    /// `database`.
    pub fn route(&self, port: u16, database: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.port == port && r.databases.iter().any(|g| glob(g, database)))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("route {route:?}: {source}")]
pub struct RouteError {
    pub route: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The current settings; replaced whole by a reload.
#[derive(Debug, Clone)]
pub struct SettingsCell(Arc<RwLock<Arc<Settings>>>);

impl SettingsCell {
    pub fn new(s: Settings) -> Self {
        SettingsCell(Arc::new(RwLock::new(Arc::new(s))))
    }

    pub fn get(&self) -> Arc<Settings> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, s: Settings) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::from_toml;

    #[test]
    fn first_matching_route_on_the_port_wins() {
        let cfg = from_toml(
            r#"
audit-log = "-"
upstream = "fallback.internal:5432"
[[route]]
name = "billing"
databases = ["billing", "billing_*"]
upstream = "billing.internal:5432"
[[route]]
name = "analytics"
port = 6543
upstream = "warehouse.internal:5432"
upstream-server-name = "warehouse.example"
"#,
        )
        .unwrap();
        assert_eq!(cfg.ports(), vec![5432, 6543]);
        let s = Settings::from_config(&cfg).unwrap();
        let on = |port, db| s.route(port, db).map(|r| r.name.as_str());
        assert_eq!(on(5432, "billing"), Some("billing"));
        assert_eq!(on(5432, "billing_eu"), Some("billing"));
        assert_eq!(on(5432, "app"), Some("upstream"));
        assert_eq!(on(6543, "billing"), Some("analytics"));
        assert_eq!(on(6543, "anything"), Some("analytics"));
        assert_eq!(on(7000, "app"), None);
        assert_eq!(s.route(6543, "x").unwrap().upstream.server_name(), "warehouse.example");
    }

    #[test]
    fn route_mistakes_name_the_route() {
        let cases = [
            ("[[route]]\nname = \"a\"\n", "\"a\": upstream: required"),
            ("[[route]]\nname = \"a\"\nupstream = \"db\"\n", "is not HOST:PORT"),
            ("[[route]]\nname = \"a\"\nupstream = \"db:1\"\nupstream-ca = [\"/nonexistent\"]\n", "/nonexistent"),
            ("[[route]]\nname = \"a\"\nupstream = \"db:1\"\n[[route]]\nname = \"a\"\nupstream = \"db:2\"\n", "two"),
            ("[[route]]\nupstream = \"db:1\"\nport = 0\n", "route1"),
            ("[[route]]\nupstream = \"db:1\"\ndatabase = [\"x\"]\n", "unknown field"),
        ];
        for (text, want) in cases {
            let e = from_toml(&format!("audit-log = \"-\"\n{text}")).expect_err(text);
            assert_eq!(e.flag, "--config", "{text}");
            assert!(e.problem.contains(want), "{text}: {e}");
        }
    }
}
