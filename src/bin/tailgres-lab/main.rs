//! tailgres-lab: a development tool (not part of the product) that brings
//! up a whole world on loopback: `tailgres-lab up` (tailnet, database,
//! proxy, client nodes) and `tailgres-lab pg` (the database alone).
#![forbid(unsafe_code)]

mod certs;
mod lab_env;
mod pg;
mod up;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::pg::{Pg, PgOptions, Setting, UpstreamCert};

#[derive(Parser)]
#[command(about = "Brings up a tailgres test world on loopback")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up the loopback tailnet, a TLS PostgreSQL, tailgres and client
    /// nodes forwarding loopback ports to it; runs until SIGINT/SIGTERM.
    Up(up::UpArgs),
    /// Run a TLS PostgreSQL on 127.0.0.1 until SIGINT/SIGTERM; prints one JSON line.
    Pg(PgArgs),
}

#[derive(Args)]
struct PgArgs {
    /// Which certificate the server presents.
    #[arg(long, value_enum, default_value_t = UpstreamCert::Good)]
    cert: UpstreamCert,
    /// Working directory (kept afterwards); default: a fresh temporary one, removed on exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// TCP port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Name in the server certificate.
    #[arg(long, default_value = pg::DEFAULT_SERVER_NAME)]
    server_name: String,
    /// Set log_connections = on.
    #[arg(long)]
    log_connections: bool,
    /// A server setting NAME=VALUE, e.g. max_connections=1200 (repeatable;
    /// applied after the lab's own settings).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = Setting::parse)]
    settings: Vec<Setting>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: tests and the demo keep this log in a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Pg(a) => run_pg(a).await,
        Cmd::Up(a) => up::run(a).await,
    }
}

async fn run_pg(a: PgArgs) -> anyhow::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (dir, temporary) = match a.dir {
        Some(d) => (d, false),
        None => {
            let d = std::env::temp_dir().join(format!(
                "tailgres-lab-pg-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            (d, true)
        }
    };
    let opts = PgOptions {
        port: a.port,
        cert: a.cert,
        server_name: a.server_name,
        log_connections: a.log_connections,
        settings: a.settings,
        ..PgOptions::new(&dir)
    };
    let result = serve_pg(opts, &mut int, &mut term).await;
    if temporary {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove lab dir");
        }
    }
    result
}

async fn serve_pg(
    opts: PgOptions,
    int: &mut tokio::signal::unix::Signal,
    term: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    // Ctrl-C during startup abandons it; the children die with the future.
    let mut pg = tokio::select! {
        pg = Pg::start(opts) => pg?,
        _ = int.recv() => anyhow::bail!("interrupted while starting postgres"),
        _ = term.recv() => anyhow::bail!("terminated while starting postgres"),
    };
    let line = serde_json::json!({
        "host": pg.host,
        "port": pg.port,
        "server_name": pg.server_name,
        "ca_file": pg.ca_file,
        "identity_ca_file": pg.identity_ca_file,
        "identity_key_file": pg.identity_key_file,
        "socket_dir": pg.socket_dir,
        "superuser": pg.superuser,
        "log_file": pg.log_file,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).context("writing stdout")?;
    drop(out);
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        e = pg.unexpected_exit() => return Err(e),
    }
    pg.stop().await;
    Ok(())
}
