//! The driver checks in `tests/clients/`, built into `target/clients/` by
//! `scripts/build --tests` (`scripts/build-clients`): where they are and
//! the versions they pin. Each check logs in as `CHECK_USER` with
//! `CHECK_PASSWORD` (default role_scram / scram-pass; an empty password
//! sends none, for identity login), adding the settings in `CHECK_OPTIONS`
//! (e.g. `channel_binding=require`; pgJDBC's property names for it).
use std::path::PathBuf;

pub const PGX_VERSION: &str = "v5.13.0";
pub const PGJDBC_VERSION: &str = "42.7.14";

/// Where scripts/build-clients put the checks (`TAILGRES_CLIENTS` overrides).
pub fn clients_dir() -> PathBuf {
    std::env::var_os("TAILGRES_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/clients")))
}

/// A check script of `tests/clients/` (the Python ones run from source).
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients")).join(name)
}

/// The pgx check binary and the pgJDBC check's class path, after checking
/// they were built: a missing check fails the test (never a silent skip).
pub fn built_checks() -> (PathBuf, String) {
    let dir = clients_dir();
    let pgx = dir.join("pgx-check");
    let jar = dir.join(format!("lib/postgresql-{PGJDBC_VERSION}.jar"));
    let classes = dir.join("jdbc");
    for need in [&pgx, &jar, &classes.join("JdbcCheck.class")] {
        assert!(
            need.is_file(),
            "{} is missing: build the driver checks with `scripts/build --tests` (scripts/build-clients; \
             it needs go, java, javac and mvn: `scripts/prereqs --tests` installs them)",
            need.display()
        );
    }
    (pgx, format!("{}:{}", classes.display(), jar.display()))
}

/// Runs one check (`argv`: the program and its arguments) with `env` set
/// and no PGPASSWORD; returns the JSON line it prints. A check that fails,
/// hangs (3 minutes) or prints no JSON fails the test, with `context()`
/// (e.g. the lab's log tails) in the message.
#[allow(dead_code)] // not every test file that has `common` runs checks
pub async fn run_check(
    argv: &[String],
    env: &[(&str, &str)],
    context: impl Fn() -> String,
) -> serde_json::Value {
    let what = argv[1..].join(" ");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env.iter().copied())
            .env_remove("PGPASSWORD")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: hung"))
    .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} ({env:?}) failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}
