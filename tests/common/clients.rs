//! The driver checks in `tests/clients/`, built into `target/clients/` by
//! `scripts/build --tests` (`scripts/build-clients`): where they are and
//! the versions they pin. Each check logs in as `CHECK_USER` with
//! `CHECK_PASSWORD` (default role_scram / scram-pass; an empty password
//! sends none, for identity login).
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
