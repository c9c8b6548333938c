#!/usr/bin/env python3
"""Where a process spent its CPU, from a system-wide `perf record`: self
time grouped into components (Rust TLS crypto, tokio, Go runtime, gVisor
netstack, WireGuard, kernel, ...), then the top symbols.

    bench/perfsum.py PERF.DATA PID [TOP]

bench.py --perf calls this for every measurement and process it profiles.
"""

import re
import subprocess
import sys

# First match wins; tested against "DSO SYMBOL".
COMPONENTS = [
    ("kernel", r"^\[kernel"),
    ("libc (memcpy, malloc, syscall stubs)", r"^libc"),
    ("Rust crypto (ring: TLS records, handshakes)", r"ring_core_|\bring::|_nistz256|aes_hw|gcm_|fiat_|bn_mul"),
    ("Rust SCRAM (sha2, hmac, pbkdf2)", r"\bsha2::|\bhmac::|pbkdf2|tailgres::scram"),
    ("Rust TLS state machine (rustls)", r"\brustls::|tokio_rustls::|rustls_pki_types|webpki::"),
    ("Rust X.509 parsing", r"x509_parser|der_parser|asn1_rs|\brcgen::"),
    ("Rust JSON (serde_json)", r"serde_json::|\bserde::"),
    ("Rust tokio (scheduler, io driver, sync)", r"\btokio::|\bmio::|parking_lot|core::future|PollFn|futures_"),
    ("Rust allocator", r"__rust_alloc|__rust_dealloc|alloc::raw_vec|alloc::alloc"),
    ("tailgres code", r"\btailgres::|tsffi"),
    ("Go WireGuard crypto (chacha20poly1305)", r"chacha20|poly1305|curve25519|blake2s"),
    ("Go wireguard-go", r"wireguard-go"),
    ("Go netstack (gVisor TCP/IP)", r"gvisor\.dev"),
    ("Go magicsock, UDP batching", r"tailscale\.com/wgengine/magicsock|tailscale\.com/net/"),
    ("Go tailscale other (netstack glue, LocalAPI, WhoIs)", r"tailscale\.com/"),
    ("Go JSON", r"encoding/json|go-json-experiment"),
    ("Go TLS and crypto (crypto/*)", r"\bcrypto/|vendor/golang\.org/x/crypto"),
    ("Go runtime (scheduler, GC, malloc, cgo)", r"\bruntime[.\[/]|internal/runtime|gcBgMarkWorker|_cgo_|crosscall"),
    ("Go stdlib (net, io, sync, syscall, time)",
     r"\bsyscall\.|internal/poll|\bnet\.|\bos\.|\bio\.|\bbufio\.|\bsync\.|\btime\.|\bexpvar\.|internal/"),
]
LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$")


def symbols(data, pid):
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", f"--pid={pid}", "--percentage",
         "relative", "--sort", "dso,sym", "--percent-limit", "0", "-g", "none"],
        capture_output=True, text=True)
    samples = None
    m = re.search(r"# Samples: (\S+)", out.stdout)
    if m:
        samples = m.group(1)
    rows = []
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        if m:
            pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
            rows.append((pct, ("[kernel]" if kind == "k" else dso) + " " + sym))
    return samples, rows


def components(rows):
    totals = {}
    for pct, what in rows:
        name = next((n for n, rx in COMPONENTS if re.search(rx, what)), "other")
        totals[name] = totals.get(name, 0.0) + pct
    return sorted(totals.items(), key=lambda kv: -kv[1])


def render(data, pid, top=30):
    samples, rows = symbols(data, pid)
    lines = [f"{data} pid {pid}: {samples or '?'} samples of this process (cpu-clock, 499 Hz)", "",
             "its CPU by component:"]
    for name, pct in components(rows):
        if pct >= 0.1:
            lines.append(f"{pct:6.1f}%  {name}")
    lines.append("")
    lines.append(f"top {top} symbols:")
    for pct, what in rows[:top]:
        lines.append(f"{pct:6.2f}%  {what}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(render(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30), end="")
