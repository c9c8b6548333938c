//! `tailgres explain <node|ip>`: asks the running proxy who a peer is, what
//! it has been granted, and what it may therefore do — the answer to "why
//! can't alice connect?".
//!
//! The proxy answers on a unix socket in its state directory (mode 0600, so
//! only the proxy's own user — the operator — can ask). One request line
//! (the node name, short name or tailnet IP), one JSON answer.
#![forbid(unsafe_code)]

use crate::authorize::Grant;
use crate::authorize::GrantUse;
use crate::settings::SettingsCell;
use crate::tailnet::{Directory, Tailnet};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The socket's name inside the state directory.
pub const SOCKET_NAME: &str = "tailgres.sock";
/// A request is a name or an address; nothing longer.
const MAX_REQUEST: u64 = 512;

/// What answering needs of the process (a narrow view of the process
/// context).
#[derive(Clone)]
pub struct ExplainView {
    pub settings: SettingsCell,
    pub directory: Directory,
    pub grant_use: GrantUse,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Serves explain requests until the proxy shuts down.
pub async fn serve<T: Tailnet>(path: PathBuf, tailnet: Arc<T>, shared: ExplainView) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path); // a stale socket from an earlier run
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (conn, _) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "explain socket accept");
                    continue;
                }
            },
        };
        let (tailnet, shared) = (tailnet.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &*tailnet, &shared).await {
                tracing::debug!(error = %e, "explain request");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle<T: Tailnet>(conn: UnixStream, tailnet: &T, shared: &ExplainView) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line).await?;
    let answer = answer(line.trim(), tailnet, shared).await;
    w.write_all(format!("{answer}\n").as_bytes()).await?;
    w.shutdown().await
}

/// The answer for one target, as JSON.
pub async fn answer<T: Tailnet>(target: &str, tailnet: &T, shared: &ExplainView) -> Value {
    let settings = shared.settings.get();
    let policy = &settings.policy;
    let base = json!({
        "target": target,
        "capability": policy.capability,
        "require_grant": policy.require_grant,
        "grants_in_use": format!("{:?}", shared.grant_use.get()).to_lowercase(),
        "allow_shared_nodes": policy.allow_shared_nodes,
        "audit_statements": settings.audit_statements,
    });
    // Statement audit, said beside each way in: for everyone, or by grant.
    let audited = |by_grant: bool| {
        if settings.audit_statements || by_grant {
            " (statements audited)"
        } else {
            ""
        }
    };
    let with = |mut v: Value, extra: Value| {
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    let Some(ip) = shared.directory.lookup(target) else {
        return with(base, json!({"verdict": format!("no peer named {target:?} is known to tailgres")}));
    };
    let id = match tailnet.whois(SocketAddr::new(ip, 0)).await {
        Ok(id) => id,
        Err(e) => {
            return with(
                base,
                json!({"address": ip, "verdict": format!("not in the tailnet as tailgres sees it: {e}")}),
            )
        }
    };
    let values = id.capability(&policy.capability).to_vec();
    let grants: Vec<Result<Grant, String>> =
        values.iter().map(|v| Grant::parse(v).map_err(|e| format!("{v}: {e}"))).collect();
    // The same order of checks as Policy::decide.
    let may = if id.expired {
        vec!["nothing: its node key has expired".to_string()]
    } else if id.shared_in && !policy.allow_shared_nodes {
        vec!["nothing: a device shared in from another tailnet (--allow-shared-nodes is off)".to_string()]
    } else if let Some(Err(e)) = grants.iter().find(|g| g.is_err()) {
        vec![format!("nothing: a grant is malformed ({e})")]
    } else if grants.is_empty() {
        use crate::authorize::GrantUseState::*;
        let cap = &policy.capability;
        match (policy.require_grant, shared.grant_use.get()) {
            (true, _) => vec![format!("nothing: it carries no {cap} grant and --require-grant is on")],
            (false, Used) => vec![format!("nothing: it carries no {cap} grant, and other peers do")],
            (false, Unknown) => {
                vec![format!(
                    "nothing yet: it carries no {cap} grant, and tailgres has not yet read the tailnet"
                )]
            }
            (false, Unused) => vec![format!(
                "any user on any database (not replication){}: no peer on the tailnet carries {cap}, \
                 and --require-grant is off",
                audited(false)
            )],
        }
    } else {
        grants
            .iter()
            .flatten()
            .map(|g| {
                let limit = g.max_connections.map(|n| format!(" (at most {n} sessions)")).unwrap_or_default();
                let repl = if g.replication { " (replication too)" } else { "" };
                let audit = audited(g.audit == crate::authorize::GrantAudit::Statements);
                format!("users {:?} on databases {:?}{limit}{repl}{audit}", g.users, g.databases)
            })
            .collect()
    };
    with(
        base,
        json!({
            "address": ip,
            "identity": id,
            "grants": values,
            "may_connect_as": may,
            "verdict": "see may_connect_as (if Tailscale ACLs let its packets reach tailgres at all)",
        }),
    )
}

/// Human-readable rendering of an answer.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let s = |k: &str| v[k].as_str().map(str::to_string).unwrap_or_else(|| v[k].to_string());
    out.push_str(&format!("peer:        {}\n", s("target")));
    if let Some(id) = v.get("identity") {
        let tags =
            id["tags"].as_array().map(|t| t.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","));
        out.push_str(&format!(
            "node:        {} ({})\n",
            id["node_name"].as_str().unwrap_or(""),
            id["stable_id"].as_str().unwrap_or("")
        ));
        out.push_str(&format!("user:        {}\n", id["user_login"].as_str().unwrap_or("")));
        out.push_str(&format!(
            "tags:        {}\n",
            tags.filter(|t| !t.is_empty()).unwrap_or_else(|| "-".into())
        ));
        out.push_str(&format!("address:     {}\n", s("address")));
        out.push_str(&format!(
            "os:          {}   shared in: {}   expired: {}\n",
            id["os"].as_str().unwrap_or(""),
            id["shared_in"],
            id["expired"]
        ));
        out.push_str(&format!("grants ({}): {}\n", s("capability"), v["grants"]));
        out.push_str("may connect as:\n");
        for m in v["may_connect_as"].as_array().into_iter().flatten() {
            out.push_str(&format!("  - {}\n", m.as_str().unwrap_or("")));
        }
        out.push_str("(Tailscale ACLs decide first whether its packets reach tailgres at all.)\n");
    } else {
        out.push_str(&format!("verdict:     {}\n", s("verdict")));
    }
    out
}

/// The `tailgres explain` command: asks the proxy whose state dir is given.
pub async fn ask(state_dir: &Path, target: &str) -> anyhow::Result<Value> {
    let path = state_dir.join(SOCKET_NAME);
    let mut conn = UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the running tailgres at {} ({e}); is it running with --state-dir {}?",
            path.display(),
            state_dir.display()
        )
    })?;
    conn.write_all(format!("{target}\n").as_bytes()).await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(serde_json::from_str(answer.trim())?)
}
