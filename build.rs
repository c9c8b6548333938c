//! Builds the Go side (`vendor/tsffi`, our shim over tailscale.com/tsnet) as a
//! C archive, generates Rust bindings from its one header, and links it.
//!
//! Go is a hard requirement; when it is missing or too old this fails with a
//! message that says what to install, rather than a wall of linker errors.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The oldest Go that builds the pinned tailscale.com (its go.mod `go` line).
const MIN_GO: (u32, u32, u32) = (1, 26, 6);
const GO_HELP: &str = "install Go from https://go.dev/dl/ (or your distribution) and put `go` on PATH, \
     or point the GO environment variable at the binary";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let vendor = manifest.join("vendor");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let go = env::var("GO").unwrap_or_else(|_| "go".into());

    // Rebuild only when the Go side changes (cargo scans directories
    // recursively); the lab harness in vendor/cmd does not affect the crate.
    for p in ["go.mod", "go.sum", "tsffi"] {
        println!("cargo:rerun-if-changed={}", vendor.join(p).display());
    }
    for v in ["GO", "GOFLAGS", "CC", "CGO_CFLAGS", "CGO_LDFLAGS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_env == "musl" {
        fail(
            "Go c-archives crash at initialisation under musl; build for a glibc target \
              (e.g. x86_64-unknown-linux-gnu)",
        );
    }

    check_go_version(&go);

    let archive = out.join("libtsffi.a");
    let status = Command::new(&go)
        .current_dir(&vendor)
        .env("GOTOOLCHAIN", "local") // never let Go download another toolchain
        .env("CGO_ENABLED", "1")
        .args(["build", "-buildmode=c-archive", "-trimpath", "-o"])
        .arg(&archive)
        .arg("./tsffi")
        .status()
        .unwrap_or_else(|e| fail(&format!("could not run `{go} build`: {e}; {GO_HELP}")));
    if !status.success() {
        fail(&format!(
            "`{go} build -buildmode=c-archive ./tsffi` in {} failed (see its output above). \
             It needs the Go module proxy (or a filled module cache) and a C compiler for cgo.",
            vendor.display()
        ));
    }

    let header = vendor.join("tsffi").join("tsffi.h");
    bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_function("tsffi_.*")
        .allowlist_var("TSFFI_.*")
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "bindgen could not read {}: {e}. bindgen needs libclang: \
                 `apt-get install libclang-dev` (Debian/Ubuntu)",
                header.display()
            ))
        })
        .write_to_file(out.join("tsffi_bindings.rs"))
        .expect("writing bindings to OUT_DIR");

    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=tsffi");
    // The archive uses cgo's DNS resolver (libresolv) and pthreads.
    println!("cargo:rustc-link-lib=dylib=resolv");
    println!("cargo:rustc-link-lib=dylib=pthread");
}

fn check_go_version(go: &str) {
    let out = Command::new(go).arg("env").arg("GOVERSION").env("GOTOOLCHAIN", "local").output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => fail(&format!(
            "`{go} env GOVERSION` failed: {}; {GO_HELP}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => fail(&format!(
            "Go {}.{}.{} or newer is required to build the embedded Tailscale node, \
             but `{go}` could not be run ({e}); {GO_HELP}",
            MIN_GO.0, MIN_GO.1, MIN_GO.2
        )),
    };
    let parsed = parse_go_version(&version);
    match parsed {
        Some(v) if v >= MIN_GO => {}
        _ => fail(&format!(
            "Go {}.{}.{} or newer is required to build the embedded Tailscale node \
             (vendor/go.mod pins tailscale.com, which needs it), found `{version}`; {GO_HELP}",
            MIN_GO.0, MIN_GO.1, MIN_GO.2
        )),
    }
}

/// "go1.26.8" -> (1, 26, 8); "go1.27rc1" -> (1, 27, 0).
fn parse_go_version(s: &str) -> Option<(u32, u32, u32)> {
    let rest = s.strip_prefix("go")?;
    let mut parts = rest.split('.');
    let num = |p: Option<&str>| -> Option<u32> {
        let p = p?;
        let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let major = num(parts.next())?;
    let minor = num(parts.next())?;
    let patch = num(parts.next()).unwrap_or(0);
    Some((major, minor, patch))
}

fn fail(msg: &str) -> ! {
    // cargo shows build-script panics with their message; make it the first
    // thing a person reads.
    panic!("\n\ntailgres build: {msg}\n");
}
