//! The tailgres binary. (The proxy's CLI is built on this foundation.)
use anyhow::Result;

fn main() -> Result<()> {
    println!("tailgres {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
