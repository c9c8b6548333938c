//! The knobs every tailnet process of the lab runs with (tailnet.md): no
//! log upload, no port mapping, no LAN addresses, and never Tailscale's
//! own control plane. vendor/cmd/tslab/lab.env is the one list; this reads
//! it for tailgres-lab and, through `#[path]`, for the tests.

/// The list's KEY=VALUE lines (blank lines and # comments skipped).
pub fn lab_env() -> impl Iterator<Item = (&'static str, &'static str)> {
    include_str!("../../../vendor/cmd/tslab/lab.env")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').unwrap_or_else(|| panic!("lab.env: not KEY=VALUE: {l}")))
}
