//! Stage 4, authorize: the peer's capability grants against the database
//! user and database it asks for, before any byte reaches the upstream.
//!
//! Tailscale ACLs have already decided whether the peer's packets reach us
//! at all; this is the finer layer. Admins grant access with an application
//! capability in the tailnet policy:
//!
//! ```json
//! "grants": [{"src": ["group:analysts"], "dst": ["tag:db-proxy"], "ip": ["tcp:5432"],
//!             "app": {"tailgres.dev/cap/postgres": [{"databases": ["analytics"],
//!                                                    "users": ["readonly"]}]}}]
//! ```
//!
//! Each grant value (see `capability-schema.json`) allows the users matching
//! one of its `users` patterns on the databases matching one of its
//! `databases` patterns; several grants combine (any one suffices). Patterns
//! are globs (`*`, `?`); `{login}` stands for the peer's full login name and
//! `{login_local}` for the part before '@' (never for tagged devices).
//!
//! A peer with at least one grant is always held to its grants. A peer with
//! none is let through unless `--require-grant`. A malformed grant denies
//! (fail closed). Devices shared in from another tailnet are denied unless
//! `--allow-shared-nodes`.
#![forbid(unsafe_code)]

use crate::tailnet::PeerIdentity;
use serde::Deserialize;

/// Startup parameters under this prefix carry the verified identity to the
/// database (`--identity-settings`); clients may never supply them.
pub const IDENTITY_PREFIX: &str = "tailgres.";

/// Refuses client-supplied parameters under [`IDENTITY_PREFIX`], directly or
/// through `options` (`-c tailgres.x=y`, `--tailgres.x=y`).
pub fn reserved_parameter(params: &[(String, String)]) -> Option<String> {
    for (k, v) in params {
        if k.to_ascii_lowercase().starts_with(IDENTITY_PREFIX) {
            return Some(k.clone());
        }
        if k == "options" && v.to_ascii_lowercase().contains(IDENTITY_PREFIX) {
            return Some(format!("options ({v})"));
        }
    }
    None
}

/// The settings that tell the database who is connecting: login (empty for
/// tagged devices), tags, node name, stable node ID, tailnet IP.
pub fn identity_parameters(id: &PeerIdentity, ip: std::net::IpAddr) -> Vec<(String, String)> {
    let login = if id.is_tagged() { String::new() } else { id.user_login.clone() };
    [
        ("login", login),
        ("tags", id.tags.join(",")),
        ("node", id.node_name.clone()),
        ("node_id", id.stable_id.clone()),
        ("ip", ip.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{IDENTITY_PREFIX}{k}"), v.replace('\0', "")))
    .collect()
}

/// The default application capability name.
pub const DEFAULT_CAPABILITY: &str = "tailgres.dev/cap/postgres";

#[derive(Debug, Clone)]
pub struct Policy {
    pub capability: String,
    pub require_grant: bool,
    pub allow_shared_nodes: bool,
}

/// One grant value.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub databases: Vec<String>,
    pub users: Vec<String>,
    /// Most concurrent sessions per identity through this grant.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed; `limit` is the per-identity session limit, if any grant
    /// that allowed it sets one (the most generous applies).
    Allow {
        via_grant: bool,
        limit: Option<u32>,
    },
    Deny {
        detail: String,
        client_message: String,
    },
}

impl Policy {
    pub fn decide(&self, id: &PeerIdentity, user: &str, database: &str) -> Decision {
        let who = format!("{} on {}", id.principal(), id.node_name);
        if id.expired {
            return deny(
                format!("{who}: node key expired"),
                format!(
                    "tailgres: the node key of {who} has expired; log the device in to the tailnet again"
                ),
            );
        }
        if id.shared_in && !self.allow_shared_nodes {
            return deny(
                format!("{who} is a device shared in from another tailnet; --allow-shared-nodes is off"),
                format!(
                    "tailgres: {who} is shared in from another tailnet and may not connect; \
                     the operator can allow shared devices with --allow-shared-nodes"
                ),
            );
        }
        let values = id.capability(&self.capability);
        if values.is_empty() {
            if self.require_grant {
                return deny(
                    format!("{who} has no {} grant and --require-grant is on", self.capability),
                    format!(
                        "tailgres: {who} has no access grant; an admin grants it in the tailnet \
                         policy with the \"{}\" capability",
                        self.capability
                    ),
                );
            }
            return Decision::Allow { via_grant: false, limit: None };
        }
        let mut grants = Vec::with_capacity(values.len());
        for v in values {
            match serde_json::from_value::<Grant>(v.clone()) {
                Ok(g) => grants.push(g),
                Err(e) => {
                    return deny(
                        format!("{who}: malformed {} grant {v}: {e}", self.capability),
                        format!(
                            "tailgres: the access grant for {who} is malformed, so access is refused; \
                             the operator's log says why"
                        ),
                    )
                }
            }
        }
        let mut allowed = false;
        let mut limit: Option<u32> = Some(0);
        for g in &grants {
            let user_ok = g.users.iter().any(|p| user_matches(p, user, id));
            let db_ok = g.databases.iter().any(|p| glob(p, database));
            if user_ok && db_ok {
                allowed = true;
                limit = match (limit, g.max_connections) {
                    (_, None) | (None, _) => None,
                    (Some(a), Some(b)) => Some(a.max(b)),
                };
            }
        }
        if allowed {
            return Decision::Allow { via_grant: true, limit };
        }
        deny(
            format!(
                "{who} asked for user {user:?} on database {database:?}; its {} grants allow {}",
                self.capability,
                describe(&grants)
            ),
            format!(
                "tailgres: {who} may not connect as user \"{user}\" to database \"{database}\"; \
                 an admin grants it in the tailnet policy with the \"{}\" capability",
                self.capability
            ),
        )
    }
}

fn deny(detail: String, client_message: String) -> Decision {
    Decision::Deny { detail, client_message }
}

fn describe(grants: &[Grant]) -> String {
    grants
        .iter()
        .map(|g| format!("users {:?} on databases {:?}", g.users, g.databases))
        .collect::<Vec<_>>()
        .join("; ")
}

fn user_matches(pattern: &str, user: &str, id: &PeerIdentity) -> bool {
    match pattern {
        // A tagged device has no login of its own ("tagged-devices").
        "{login}" => !id.is_tagged() && !id.user_login.is_empty() && user == id.user_login,
        "{login_local}" => {
            !id.is_tagged() && id.user_login.split('@').next().is_some_and(|l| !l.is_empty() && user == l)
        }
        p => glob(p, user),
    }
}

/// Glob with `*` (any run) and `?` (one character); everything else literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer(login: &str, tags: &[&str], caps: Vec<serde_json::Value>) -> PeerIdentity {
        PeerIdentity {
            stable_id: "n1".into(),
            node_name: "laptop.example.ts.net".into(),
            user_login: login.into(),
            user_display_name: String::new(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            addresses: vec![],
            os: "linux".into(),
            shared_in: false,
            key_expiry: None,
            expired: false,
            cap_map: if caps.is_empty() {
                Default::default()
            } else {
                [(DEFAULT_CAPABILITY.to_string(), caps)].into()
            },
        }
    }

    fn policy(require_grant: bool) -> Policy {
        Policy { capability: DEFAULT_CAPABILITY.into(), require_grant, allow_shared_nodes: false }
    }

    #[test]
    fn globs() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("app_*", "app_prod", true),
            ("app_*", "ap", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*ly", "readonly", true),
            ("read*only", "read-write-only", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn decisions() {
        let analyst = json!({"databases": ["analytics"], "users": ["readonly"]});
        let own = json!({"databases": ["app*"], "users": ["{login_local}"], "max_connections": 2});
        let cases: Vec<(PeerIdentity, bool, &str, &str, bool)> = vec![
            // No grant: allowed unless --require-grant.
            (peer("alice@x.com", &[], vec![]), false, "anyone", "anydb", true),
            (peer("alice@x.com", &[], vec![]), true, "anyone", "anydb", false),
            // A grant holds the peer to it.
            (peer("alice@x.com", &[], vec![analyst.clone()]), false, "readonly", "analytics", true),
            (peer("alice@x.com", &[], vec![analyst.clone()]), false, "postgres", "analytics", false),
            (peer("alice@x.com", &[], vec![analyst.clone()]), false, "readonly", "app", false),
            // Grants combine; user and database must match in the same one.
            (peer("alice@x.com", &[], vec![analyst.clone(), own.clone()]), false, "alice", "app_prod", true),
            (
                peer("alice@x.com", &[], vec![analyst.clone(), own.clone()]),
                false,
                "alice",
                "analytics",
                false,
            ),
            // {login_local} is never a tagged device's.
            (peer("tagged-devices", &["tag:ci"], vec![own.clone()]), false, "tagged-devices", "app", false),
            // Malformed grants fail closed.
            (peer("alice@x.com", &[], vec![json!({"databases": ["*"]})]), false, "alice", "app", false),
            (
                peer("alice@x.com", &[], vec![json!({"databases": ["*"], "users": ["*"], "extra": 1})]),
                false,
                "a",
                "b",
                false,
            ),
            (peer("alice@x.com", &[], vec![json!("all")]), false, "a", "b", false),
        ];
        for (i, (id, require, user, db, want)) in cases.into_iter().enumerate() {
            let d = policy(require).decide(&id, user, db);
            assert_eq!(matches!(d, Decision::Allow { .. }), want, "case {i}: {d:?}");
        }
    }

    #[test]
    fn limits_and_messages() {
        let own = json!({"databases": ["*"], "users": ["{login}"], "max_connections": 2});
        let more = json!({"databases": ["*"], "users": ["*"], "max_connections": 5});
        let id = peer("alice@x.com", &[], vec![own.clone(), more]);
        assert_eq!(
            policy(false).decide(&id, "alice@x.com", "d"),
            Decision::Allow { via_grant: true, limit: Some(5) }
        );
        let unlimited = peer("alice@x.com", &[], vec![own, json!({"databases": ["*"], "users": ["*"]})]);
        assert_eq!(
            policy(false).decide(&unlimited, "alice@x.com", "d"),
            Decision::Allow { via_grant: true, limit: None }
        );

        let id = peer("alice@x.com", &[], vec![json!({"databases": ["analytics"], "users": ["readonly"]})]);
        let Decision::Deny { client_message, detail } = policy(false).decide(&id, "postgres", "app") else {
            panic!()
        };
        assert!(
            client_message.contains("alice@x.com") && client_message.contains("\"postgres\""),
            "{client_message}"
        );
        assert!(client_message.contains(DEFAULT_CAPABILITY), "{client_message}");
        assert!(detail.contains("readonly"), "{detail}");

        let mut shared = peer("bob@other.com", &[], vec![]);
        shared.shared_in = true;
        assert!(matches!(policy(false).decide(&shared, "a", "b"), Decision::Deny { .. }));
        let open = Policy { allow_shared_nodes: true, ..policy(false) };
        assert!(matches!(open.decide(&shared, "a", "b"), Decision::Allow { .. }));

        let mut expired = peer("carol@x.com", &[], vec![]);
        expired.expired = true;
        assert!(
            matches!(open.decide(&expired, "a", "b"), Decision::Deny { .. }),
            "an expired node is never let in"
        );
    }

    #[test]
    fn published_schema_and_parser_agree() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../capability-schema.json")).unwrap();
        let v = jsonschema::validator_for(&schema).unwrap();
        for ex in schema["examples"].as_array().unwrap() {
            assert!(v.is_valid(ex), "{ex}");
            assert!(serde_json::from_value::<Grant>(ex.clone()).is_ok(), "{ex}");
        }
        for bad in [
            json!({"databases": ["*"]}),
            json!({"databases": ["*"], "users": ["*"], "extra": 1}),
            json!({"databases": "*", "users": ["*"]}),
            json!({"databases": ["*"], "users": ["*"], "max_connections": -1}),
            json!("all"),
        ] {
            assert!(!v.is_valid(&bad), "schema accepts {bad}");
            assert!(serde_json::from_value::<Grant>(bad.clone()).is_err(), "parser accepts {bad}");
        }
    }

    #[test]
    fn reserved_parameters_are_found() {
        let p =
            |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(reserved_parameter(&p(&[("user", "a"), ("application_name", "tailgres.x")])), None);
        assert!(reserved_parameter(&p(&[("user", "a"), ("tailgres.login", "root")])).is_some());
        assert!(reserved_parameter(&p(&[("TailGres.Login", "root")])).is_some());
        assert!(reserved_parameter(&p(&[("options", "-c tailgres.login=root")])).is_some());
        assert!(reserved_parameter(&p(&[("options", "--TAILGRES.login=root")])).is_some());
        let id = peer("alice@x.com", &[], vec![]);
        let params = identity_parameters(&id, "100.64.0.9".parse().unwrap());
        assert_eq!(params[0], ("tailgres.login".to_string(), "alice@x.com".to_string()));
        let tagged = peer("tagged-devices", &["tag:ci", "tag:db"], vec![]);
        let params = identity_parameters(&tagged, "100.64.0.9".parse().unwrap());
        assert_eq!(params[0].1, "", "a tagged device has no login");
        assert_eq!(params[1].1, "tag:ci,tag:db");
    }
}
