//! The tailgres binary: parse and validate the configuration, then run.
use anyhow::Result;
use clap::Parser;
use tailgres::config::{Args, LogFormat};

fn main() -> Result<()> {
    let args = Args::parse();
    // The auth key may come from TS_AUTHKEY (never from argv, where other
    // users of the machine could read it).
    let config = match args.merge_file().and_then(|a| a.validate(std::env::var("TS_AUTHKEY").ok())) {
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
        LogFormat::Text => builder.init(),
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(tailgres::app::run(config))
}
