//! The tailgres binary: parse and validate the configuration, then run.
use anyhow::Result;
use clap::Parser;
use tailgres::config::{Args, LogFormat};

/// `tailgres explain`: ask the running proxy about a peer.
#[derive(clap::Parser)]
#[command(
    name = "tailgres explain",
    about = "Who a tailnet peer is, its grants, and which databases and users it may use"
)]
struct ExplainArgs {
    /// The peer: MagicDNS name, short name, or tailnet IP.
    target: String,
    /// The running proxy's state directory.
    #[arg(long, env = "TAILGRES_STATE_DIR", default_value = tailgres::config::DEFAULT_STATE_DIR)]
    state_dir: std::path::PathBuf,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

/// See the runtime builder in [`main`].
const MAX_BLOCKING_THREADS: usize = 16;

fn main() -> Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "audit") {
        let sub = std::env::args_os().nth(2);
        if sub.as_deref().is_some_and(|a| a == "verify") {
            let args = tailgres::auditcli::verify::VerifyArgs::parse_from(std::env::args_os().skip(2));
            std::process::exit(tailgres::auditcli::verify::main(args));
        }
        if sub.as_deref().is_some_and(|a| a == "keygen") {
            let rest: Vec<_> = std::env::args_os().skip(3).collect();
            std::process::exit(tailgres::auditcli::verify::keygen(&rest));
        }
        let args = tailgres::auditcli::AuditArgs::parse_from(std::env::args_os().skip(1));
        std::process::exit(tailgres::auditcli::main(args));
    }
    if std::env::args().nth(1).as_deref() == Some("explain") {
        let a = ExplainArgs::parse_from(std::env::args().skip(1));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let answer = rt.block_on(tailgres::explain::ask(&a.state_dir, &a.target))?;
        if a.json {
            println!("{answer:#}");
        } else {
            print!("{}", tailgres::explain::render(&answer));
        }
        return Ok(());
    }
    let args = Args::parse();
    // The auth key may come from TS_AUTHKEY (never from argv, where other
    // users of the machine could read it). A reload re-reads both.
    let load = move || args.clone().merge_file().and_then(|a| a.validate(std::env::var("TS_AUTHKEY").ok()));
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tailgres: {e}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let run = tailgres::app::run(config, Box::new(load));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Calls into the Go side (WhoIs per session, status) run on
        // blocking threads; they are short, so a small pool serves a burst
        // of a thousand new sessions without a thread (and a Go M) each.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()?
        .block_on(run)
}
