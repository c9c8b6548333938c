//! How long identity login's certificate costs: mints certificates from a
//! throwaway CA (a fresh P-256 key and one signature each, what every
//! identity-login session does on the blocking pool) and prints the time
//! per certificate, single-threaded.
//!
//!     cargo run --release --example identity_mint [N]
use std::time::{Duration, Instant};
use tailgres::identity_login::{Holder, IdentityCa, DEFAULT_VALIDITY};

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = tempfile_dir();
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "identity_mint CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca = p.self_signed(&key).expect("CA");
    let (cert, keyfile) = (dir.join("ca.pem"), dir.join("ca.key"));
    std::fs::write(&cert, ca.pem()).expect("write");
    std::fs::write(&keyfile, key.serialize_pem()).expect("write");
    let ca = IdentityCa::load(&cert, &keyfile, DEFAULT_VALIDITY).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    let holder = Holder {
        role: "app_rw",
        principal: "alice@example.com",
        node: "alice-laptop.example.ts.net",
        session_id: "8f3a0c1d2e4b5a69",
    };
    for _ in 0..50 {
        ca.mint(&holder).expect("mint"); // warm up
    }
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(ca.mint(&holder).expect("mint"));
    }
    let each = started.elapsed() / n;
    println!(
        "identity certificate: {n} minted, {:.1} µs each ({:.0}/s on one core)",
        micros(each),
        1e6 / micros(each)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("identity-mint-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
