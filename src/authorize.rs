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
//! `{localpart:*@example.com}` for the part before '@' of a login in that
//! domain (never for tagged devices). The domain must be named: a bare local
//! part would make alice@corp.com and alice@gmail.com the same role.
//!
//! Grants are checked on the names the server will use ([`Names`]): an empty
//! database is the user's name, and names are cut to 63 bytes as
//! PostgreSQL cuts them (the StartupMessage is rewritten to those names, so
//! the server cuts nothing further). A physical or logical replication
//! connection needs a grant that says `"replication": true`.
//!
//! A peer with at least one grant is always held to its grants. A peer with
//! none is refused with `--require-grant`, and otherwise refused too once
//! any peer on the tailnet carries the capability ([`GrantUse`]): only a
//! tailnet that does not use grants at all is open to every peer its ACLs
//! let through. A session admitted by a grant is revoked when no grant
//! allows it any more, whatever remains. A malformed grant denies (fail
//! closed). Devices shared in from another tailnet are denied unless
//! `--allow-shared-nodes`.
#![forbid(unsafe_code)]

use crate::tailnet::PeerIdentity;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// PostgreSQL's NAMEDATALEN - 1: the longest user or database name; the
/// server silently cuts longer ones (at a character boundary).
pub const MAX_NAME_BYTES: usize = 63;

/// `name` as the server will store it: cut to [`MAX_NAME_BYTES`] bytes at a
/// UTF-8 character boundary (pg_mbcliplen in a UTF-8 database).
pub fn server_name(name: &str) -> &str {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// What a StartupMessage asks for, with the names the server will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub user: String,
    /// The database; the user's name when none or an empty one is given.
    pub database: String,
    /// A walsender (`replication` is `database` or true): it can stream
    /// the whole cluster's WAL, so only a grant that says so allows it.
    pub replication: bool,
}

impl Names {
    /// From startup parameters (the last occurrence of each wins, as in
    /// the server).
    pub fn from_params(params: &[(String, String)]) -> Names {
        let get = |k: &str| params.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let user = server_name(get("user").unwrap_or("")).to_string();
        let database = match get("database") {
            Some(d) if !d.is_empty() => server_name(d).to_string(),
            _ => user.clone(),
        };
        // The server takes "database" or a boolean; anything it does not
        // read as false is treated as a request for replication (a value
        // it cannot read at all is refused there anyway).
        let replication = get("replication").is_some_and(|v| parse_bool(v) != Some(false));
        Names { user, database, replication }
    }
}

/// PostgreSQL's parse_bool: a case-insensitive prefix of true/false/yes/no,
/// "on", "off" (at least "of"), "1" or "0".
pub fn parse_bool(v: &str) -> Option<bool> {
    let l = v.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| l.len() >= min && word.starts_with(l.as_str());
    match l.as_bytes().first()? {
        b't' if prefix_of("true", 1) => Some(true),
        b'f' if prefix_of("false", 1) => Some(false),
        b'y' if prefix_of("yes", 1) => Some(true),
        b'n' if prefix_of("no", 1) => Some(false),
        b'o' if l == "on" => Some(true),
        b'o' if prefix_of("off", 2) => Some(false),
        b'1' if l.len() == 1 => Some(true),
        b'0' if l.len() == 1 => Some(false),
        _ => None,
    }
}

/// Whether any peer on the tailnet carries the capability, as last seen by
/// [`crate::live::follow`]. Until it has looked, the answer is unknown and
/// peers without a grant are refused (fail closed).
#[derive(Clone, Default)]
pub struct GrantUse(Arc<AtomicU8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantUseState {
    Unknown,
    /// No peer carries the capability: grants are not in use.
    Unused,
    /// At least one peer carries it: every peer must.
    Used,
}

impl GrantUse {
    fn state(v: u8) -> GrantUseState {
        match v {
            1 => GrantUseState::Unused,
            2 => GrantUseState::Used,
            _ => GrantUseState::Unknown,
        }
    }
    pub fn get(&self) -> GrantUseState {
        Self::state(self.0.load(Ordering::Relaxed))
    }
    /// Records what a scan found; returns the previous state.
    pub fn set(&self, used: bool) -> GrantUseState {
        Self::state(self.0.swap(if used { 2 } else { 1 }, Ordering::Relaxed))
    }
    /// A fixed state (tests, and tools that know).
    pub fn fixed(state: GrantUseState) -> GrantUse {
        let g = GrantUse::default();
        if state != GrantUseState::Unknown {
            g.set(state == GrantUseState::Used);
        }
        g
    }
}

/// Startup parameters under this prefix carry the verified identity to the
/// database (`--identity-settings`); clients may never supply them.
pub const IDENTITY_PREFIX: &str = "tailgres.";

/// Refuses client-supplied parameters under [`IDENTITY_PREFIX`], directly or
/// through `options` (`-c tailgres.x=y`, `--tailgres.x=y`, and any spelling
/// the server's own splitting turns into those, such as `tail\gres.x`).
pub fn reserved_parameter(params: &[(String, String)]) -> Option<String> {
    for (k, v) in params {
        if k.to_ascii_lowercase().starts_with(IDENTITY_PREFIX) {
            return Some(k.clone());
        }
        if k == "options"
            && (v.to_ascii_lowercase().contains(IDENTITY_PREFIX)
                || split_options(v).iter().any(|t| t.to_ascii_lowercase().contains(IDENTITY_PREFIX)))
        {
            return Some(format!("options ({v})"));
        }
    }
    None
}

/// Splits an `options` value exactly as PostgreSQL's pg_split_opts does:
/// words separated by C-locale white space, a backslash taking the next
/// character literally (and itself dropped).
pub fn split_options(v: &str) -> Vec<String> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
    let mut words = Vec::new();
    let mut chars = v.chars().peekable();
    loop {
        while chars.next_if(|c| is_space(*c)).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut w = String::new();
        while let Some(c) = chars.next_if(|c| !is_space(*c)) {
            match c {
                '\\' => match chars.next() {
                    Some(escaped) => w.push(escaped),
                    None => w.push('\\'),
                },
                c => w.push(c),
            }
        }
        words.push(w);
    }
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
    /// Whether it allows replication connections (walsenders) too.
    #[serde(default)]
    pub replication: bool,
    /// Whether its holder may be logged in by tailnet identity (a client
    /// certificate tailgres signs) on routes that log in that way.
    #[serde(default)]
    pub login: GrantLogin,
    /// What the audit log records of its holder's sessions.
    #[serde(default)]
    pub audit: GrantAudit,
}

/// A grant's `audit`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GrantAudit {
    /// Sessions: who connected as whom, when, for how long (always).
    #[default]
    Sessions,
    /// Also every statement the session runs (`statement` records).
    Statements,
}

/// A grant's `login`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GrantLogin {
    /// The database's own authentication (a password): routes that log in
    /// by identity refuse the session.
    #[default]
    Password,
    /// Also by identity, on routes with `login = "identity"`.
    Identity,
}

impl Grant {
    /// Parses and checks one capability value: patterns that cannot be
    /// what the admin meant are errors, not silently wide or narrow.
    pub fn parse(v: &serde_json::Value) -> Result<Grant, String> {
        let g: Grant = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        for u in &g.users {
            if u == "{login_local}" {
                return Err("\"{login_local}\" is not accepted: it would make alice@corp.com and \
                            alice@gmail.com the same role; name the domain, as in \
                            \"{localpart:*@corp.com}\""
                    .into());
            }
            if u.starts_with('{') && u != "{login}" && localpart_domain(u).is_none() {
                return Err(format!(
                    "unknown placeholder {u:?} in users; use \"{{login}}\" or \"{{localpart:*@DOMAIN}}\""
                ));
            }
        }
        Ok(g)
    }
}

/// The domain of a `{localpart:*@DOMAIN}` pattern.
fn localpart_domain(pattern: &str) -> Option<&str> {
    let d = pattern.strip_prefix("{localpart:*@")?.strip_suffix('}')?;
    (!d.is_empty() && !d.contains(['@', '*', '?', '{', '}'])).then_some(d)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed; `limit` is the per-identity session limit, if any grant
    /// that allowed it sets one (the most generous applies).
    Allow {
        via_grant: bool,
        limit: Option<u32>,
        /// A grant that allows it also allows identity login.
        identity_login: bool,
        /// A grant that allows it says `"audit": "statements"`.
        audit_statements: bool,
    },
    Deny {
        detail: String,
        client_message: String,
    },
}

impl Policy {
    /// The refusals that depend on the identity alone (an expired key, a
    /// shared-in device, no grant where one is needed): decided right after
    /// WhoIs, before the client's startup is read, and again by [`decide`].
    ///
    /// [`decide`]: Policy::decide
    pub fn decide_identity(&self, id: &PeerIdentity, grants: GrantUseState) -> Option<Decision> {
        let who = format!("{} on {}", id.principal(), id.node_name);
        if id.expired {
            return Some(deny(
                format!("{who}: node key expired"),
                format!(
                    "tailgres: the node key of {who} has expired; log the device in to the tailnet again"
                ),
            ));
        }
        if id.shared_in && !self.allow_shared_nodes {
            return Some(deny(
                format!("{who} is a device shared in from another tailnet; --allow-shared-nodes is off"),
                format!(
                    "tailgres: {who} is shared in from another tailnet and may not connect; \
                     the operator can allow shared devices with --allow-shared-nodes"
                ),
            ));
        }
        if id.capability(&self.capability).is_empty() {
            let why = match (self.require_grant, grants) {
                (false, GrantUseState::Unused) => return None,
                (true, _) => "--require-grant is on",
                (false, GrantUseState::Used) => "other peers carry it, so every peer must",
                (false, GrantUseState::Unknown) => {
                    "tailgres has not yet read whether the tailnet uses grants"
                }
            };
            return Some(deny(
                format!("{who} has no {} grant ({why})", self.capability),
                format!(
                    "tailgres: {who} has no access grant; an admin grants it in the tailnet \
                     policy with the \"{}\" capability",
                    self.capability
                ),
            ));
        }
        None
    }

    /// `names` are the names the server will use ([`Names`]); `grants` says
    /// whether the tailnet uses the capability at all.
    pub fn decide(&self, id: &PeerIdentity, names: &Names, grants: GrantUseState) -> Decision {
        if let Some(deny) = self.decide_identity(id, grants) {
            return deny;
        }
        let (user, database) = (names.user.as_str(), names.database.as_str());
        let who = format!("{} on {}", id.principal(), id.node_name);
        let values = id.capability(&self.capability);
        if values.is_empty() {
            // A grant-less peer of a tailnet that uses no grants at all.
            if names.replication {
                return deny(
                    format!("{who} asked for a replication connection without a grant"),
                    format!(
                        "tailgres: {who} may not open a replication connection; an admin allows \
                         it with \"replication\": true in a \"{}\" grant",
                        self.capability
                    ),
                );
            }
            return Decision::Allow {
                via_grant: false,
                limit: None,
                identity_login: false,
                audit_statements: false,
            };
        }
        let mut grants = Vec::with_capacity(values.len());
        for v in values {
            match Grant::parse(v) {
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
        let mut identity_login = false;
        let mut audit_statements = false;
        let mut limit: Option<u32> = Some(0);
        for g in &grants {
            let user_ok = g.users.iter().any(|p| user_matches(p, user, id));
            let db_ok = g.databases.iter().any(|p| glob(p, database));
            if user_ok && db_ok && (g.replication || !names.replication) {
                allowed = true;
                identity_login |= g.login == GrantLogin::Identity;
                // More audit is the safe side: any allowing grant asks.
                audit_statements |= g.audit == GrantAudit::Statements;
                limit = match (limit, g.max_connections) {
                    (_, None) | (None, _) => None,
                    (Some(a), Some(b)) => Some(a.max(b)),
                };
            }
        }
        if allowed {
            return Decision::Allow { via_grant: true, limit, identity_login, audit_statements };
        }
        let kind = if names.replication { "a replication connection" } else { "a session" };
        deny(
            format!(
                "{who} asked for {kind} as user {user:?} on database {database:?}; its {} grants allow {}",
                self.capability,
                describe(&grants)
            ),
            format!(
                "tailgres: {who} may not open {kind} as user \"{user}\" to database \"{database}\"; \
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
        .map(|g| {
            let repl = if g.replication { " (replication too)" } else { "" };
            format!("users {:?} on databases {:?}{repl}", g.users, g.databases)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn user_matches(pattern: &str, user: &str, id: &PeerIdentity) -> bool {
    match pattern {
        // A tagged device has no login of its own ("tagged-devices").
        "{login}" => !id.is_tagged() && !id.user_login.is_empty() && user == id.user_login,
        p if p.starts_with("{localpart:") => {
            let Some(domain) = localpart_domain(p) else { return false };
            match id.user_login.rsplit_once('@') {
                Some((local, d)) => {
                    !id.is_tagged() && !local.is_empty() && d.eq_ignore_ascii_case(domain) && user == local
                }
                None => false,
            }
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

// Per-identity session limits (grants' max_connections).

/// Live sessions per key (an identity), with optional limits.
#[derive(Debug, Default, Clone)]
pub struct Counter {
    inner: Arc<Mutex<HashMap<String, u32>>>,
}

/// One counted session; releases its slot when dropped.
pub struct Slot {
    counter: Counter,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Counter {
    /// Takes a slot for `key` unless `limit` slots are already taken.
    pub fn acquire(&self, key: &str, limit: Option<u32>) -> Option<Slot> {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.to_string()).or_insert(0);
        if limit.is_some_and(|l| *n >= l) {
            if *n == 0 {
                m.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(Slot { counter: self.clone(), key: key.to_string() })
    }

    pub fn live(&self, key: &str) -> u32 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied().unwrap_or(0)
    }
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

    fn names(user: &str, database: &str) -> Names {
        Names { user: user.into(), database: database.into(), replication: false }
    }

    impl Policy {
        /// As a tailnet that does not use grants at all would decide.
        fn decide_open(&self, id: &PeerIdentity, user: &str, database: &str) -> Decision {
            self.decide(id, &names(user, database), GrantUseState::Unused)
        }
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
        let own = json!({"databases": ["app*"], "users": ["{localpart:*@x.com}"], "max_connections": 2});
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
            // The local part counts only in the domain the grant names.
            (peer("alice@y.com", &[], vec![own.clone()]), false, "alice", "app_prod", false),
            (peer("alice@X.COM", &[], vec![own.clone()]), false, "alice", "app_prod", true),
            // A bare local part is refused outright (fail closed).
            (
                peer("alice@x.com", &[], vec![json!({"databases": ["*"], "users": ["{login_local}"]})]),
                false,
                "alice",
                "app",
                false,
            ),
            (
                peer("alice@x.com", &[], vec![json!({"databases": ["*"], "users": ["{loginn}"]})]),
                false,
                "alice",
                "app",
                false,
            ),
            // {localpart:...} is never a tagged device's.
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
            let d = policy(require).decide_open(&id, user, db);
            assert_eq!(matches!(d, Decision::Allow { .. }), want, "case {i}: {d:?}");
        }
    }

    #[test]
    fn statement_audit_is_asked_for_by_any_grant_that_allows_the_session() {
        let audited = json!({"databases": ["app"], "users": ["*"], "audit": "statements"});
        let plain = json!({"databases": ["*"], "users": ["*"]});
        let audits = |values: Vec<serde_json::Value>, db: &str| match policy(false).decide_open(
            &peer("alice@x.com", &[], values),
            "alice",
            db,
        ) {
            Decision::Allow { audit_statements, .. } => audit_statements,
            d => panic!("{d:?}"),
        };
        assert!(audits(vec![plain.clone(), audited.clone()], "app"), "one of two allowing grants asks");
        assert!(
            !audits(vec![plain.clone(), audited], "other"),
            "the grant that asks does not allow this one"
        );
        assert!(!audits(vec![plain], "app"));
        let bad = json!({"databases": ["*"], "users": ["*"], "audit": "everything"});
        let d = policy(false).decide_open(&peer("alice@x.com", &[], vec![bad]), "alice", "app");
        assert!(matches!(d, Decision::Deny { .. }), "a malformed audit value refuses: {d:?}");
    }

    #[test]
    fn limits_and_messages() {
        let own = json!({"databases": ["*"], "users": ["{login}"], "max_connections": 2});
        let more = json!({"databases": ["*"], "users": ["*"], "max_connections": 5});
        let id = peer("alice@x.com", &[], vec![own.clone(), more]);
        assert_eq!(
            policy(false).decide_open(&id, "alice@x.com", "d"),
            Decision::Allow {
                via_grant: true,
                limit: Some(5),
                identity_login: false,
                audit_statements: false
            }
        );
        let unlimited = peer("alice@x.com", &[], vec![own, json!({"databases": ["*"], "users": ["*"]})]);
        assert_eq!(
            policy(false).decide_open(&unlimited, "alice@x.com", "d"),
            Decision::Allow { via_grant: true, limit: None, identity_login: false, audit_statements: false }
        );

        let id = peer("alice@x.com", &[], vec![json!({"databases": ["analytics"], "users": ["readonly"]})]);
        let Decision::Deny { client_message, detail } = policy(false).decide_open(&id, "postgres", "app")
        else {
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
        assert!(matches!(policy(false).decide_open(&shared, "a", "b"), Decision::Deny { .. }));
        let open = Policy { allow_shared_nodes: true, ..policy(false) };
        assert!(matches!(open.decide_open(&shared, "a", "b"), Decision::Allow { .. }));

        let mut expired = peer("carol@x.com", &[], vec![]);
        expired.expired = true;
        assert!(
            matches!(open.decide_open(&expired, "a", "b"), Decision::Deny { .. }),
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
            assert!(Grant::parse(ex).is_ok(), "{ex}");
        }
        for bad in [
            json!({"databases": ["*"]}),
            json!({"databases": ["*"], "users": ["*"], "extra": 1}),
            json!({"databases": "*", "users": ["*"]}),
            json!({"databases": ["*"], "users": ["*"], "max_connections": -1}),
            json!({"databases": ["*"], "users": ["{login_local}"]}),
            json!({"databases": ["*"], "users": ["{localpart:*@}"]}),
            json!({"databases": ["*"], "users": ["{localpart:alice@x.com}"]}),
            json!({"databases": ["*"], "users": ["*"], "replication": "yes"}),
            json!("all"),
        ] {
            assert!(!v.is_valid(&bad), "schema accepts {bad}");
            assert!(Grant::parse(&bad).is_err(), "parser accepts {bad}");
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
        // The server drops backslashes when it splits options.
        assert!(reserved_parameter(&p(&[("options", "-c tail\\gres.login=root")])).is_some());
        assert!(reserved_parameter(&p(&[("options", "-c\\ x=1 --tail\\Gres\\.node=x")])).is_some());
        assert_eq!(reserved_parameter(&p(&[("options", "-c search_path=app")])), None);
        assert_eq!(split_options("  -c a\\ b=1\t--x=\\\\y z\\"), ["-c", "a b=1", "--x=\\y", "z\\"]);
        let id = peer("alice@x.com", &[], vec![]);
        let params = identity_parameters(&id, "100.64.0.9".parse().unwrap());
        assert_eq!(params[0], ("tailgres.login".to_string(), "alice@x.com".to_string()));
        let tagged = peer("tagged-devices", &["tag:ci", "tag:db"], vec![]);
        let params = identity_parameters(&tagged, "100.64.0.9".parse().unwrap());
        assert_eq!(params[0].1, "", "a tagged device has no login");
        assert_eq!(params[1].1, "tag:ci,tag:db");
    }

    /// A peer without a grant may connect only while the tailnet uses no
    /// grants at all (or not before tailgres has looked), and never for
    /// replication.
    #[test]
    fn peers_without_grants_once_grants_are_in_use() {
        let bare = peer("alice@x.com", &[], vec![]);
        let n = names("alice", "app");
        let p = policy(false);
        assert!(matches!(
            p.decide(&bare, &n, GrantUseState::Unused),
            Decision::Allow { via_grant: false, .. }
        ));
        for state in [GrantUseState::Used, GrantUseState::Unknown] {
            let Decision::Deny { detail, .. } = p.decide(&bare, &n, state) else { panic!("{state:?}") };
            assert!(detail.contains("no tailgres.dev/cap/postgres grant"), "{detail}");
        }
        let repl = Names { replication: true, ..n.clone() };
        assert!(matches!(p.decide(&bare, &repl, GrantUseState::Unused), Decision::Deny { .. }));
        // With a grant: replication only where it says so.
        let plain = peer("alice@x.com", &[], vec![json!({"databases": ["*"], "users": ["*"]})]);
        assert!(matches!(p.decide(&plain, &n, GrantUseState::Used), Decision::Allow { via_grant: true, .. }));
        let Decision::Deny { client_message, .. } = p.decide(&plain, &repl, GrantUseState::Used) else {
            panic!()
        };
        assert!(client_message.contains("replication connection"), "{client_message}");
        let wal = peer(
            "alice@x.com",
            &[],
            vec![json!({"databases": ["*"], "users": ["replicator"], "replication": true})],
        );
        let r = Names { user: "replicator".into(), ..repl };
        assert!(matches!(p.decide(&wal, &r, GrantUseState::Used), Decision::Allow { .. }));
    }

    /// Grants are decided on the names the server will use.
    #[test]
    fn names_are_the_servers() {
        let p = |v: &[(&str, &str)]| {
            Names::from_params(&v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>())
        };
        assert_eq!(p(&[("user", "alice")]).database, "alice");
        assert_eq!(p(&[("user", "alice"), ("database", "")]).database, "alice", "empty means the user");
        assert_eq!(p(&[("user", "alice"), ("database", "a"), ("database", "b")]).database, "b");
        let long = format!("app_{}", "x".repeat(70));
        assert_eq!(p(&[("user", "alice"), ("database", &long)]).database, &long[..63]);
        // Cut at a character boundary, never inside one.
        let wide = "é".repeat(40); // 80 bytes
        let cut = p(&[("user", &wide)]).user;
        assert_eq!((cut.len(), cut.chars().count()), (62, 31));
        for (v, repl) in [
            ("database", true),
            ("true", true),
            ("on", true),
            ("1", true),
            ("YES", true),
            ("bogus", true),
            ("false", false),
            ("off", false),
            ("of", false),
            ("0", false),
            ("n", false),
        ] {
            assert_eq!(p(&[("user", "a"), ("replication", v)]).replication, repl, "{v}");
        }
        assert!(!p(&[("user", "a")]).replication);
        assert_eq!(parse_bool("o"), None);
        assert_eq!(parse_bool("tr"), Some(true));
        assert_eq!(parse_bool("10"), None);
    }

    #[test]
    fn counter_limits_and_releases() {
        let c = Counter::default();
        let a = c.acquire("alice", Some(2)).unwrap();
        let _b = c.acquire("alice", Some(2)).unwrap();
        assert!(c.acquire("alice", Some(2)).is_none());
        assert!(c.acquire("alice", None).is_some(), "no limit, no refusal");
        assert!(c.acquire("bob", Some(0)).is_none());
        assert_eq!(c.live("bob"), 0);
        drop(a);
        assert!(c.acquire("alice", Some(2)).is_some());
    }
}
