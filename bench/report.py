"""What the benchmark prints and writes: medians over rounds, the table
of figures and ratios, the issue's targets, and the soak summary."""

import datetime
import json
import statistics
from pathlib import Path

from world import ALL_SYSTEMS, ROOT

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

# ---------------------------------------------------------------- figures

def ok(d):
    """A measurement that finished (failed runs stay out of the medians)."""
    return d if d and not d.get("failed") else {}


# (key, label, unit, higher_is_better, getter)
def figures(clients):
    f = []
    for c in clients:
        f.append((f"so_tps_c{c}", f"select-only tps, {c} client(s)", "tps", True,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("tps")))
        f.append((f"so_lat_c{c}", f"  latency avg, {c}", "ms", False,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("lat_avg_ms")))
        f.append((f"so_p99_c{c}", f"  latency p99, {c}", "ms", False,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("lat_p99_ms")))
        f.append((f"so_cpu_c{c}", f"  proxy CPU per transaction, {c}", "µs", False,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("proxy_cpu_us_per_txn")))
        f.append((f"so_cs_c{c}", f"  proxy context switches per transaction, {c}", "cs", False,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("proxy_ctxsw_per_txn")))
        f.append((f"so_audit_c{c}", f"  audit records written per second, {c}", "rec/s", True,
                  lambda r, c=c: ok(r.get(f"select_c{c}")).get("audit_records_per_s")))
    for label in ("scram", "trust", "identity", "verifier"):
        f.append((f"conn_rate_{label}", f"new conn/txn ({label}): conn/s", "conn/s", True,
                  lambda r, l=label: ok(r.get(f"connect_{l}")).get("conn_per_s")))
        f.append((f"conn_time_{label}", f"  connection time ({label})", "ms", False,
                  lambda r, l=label: ok(r.get(f"connect_{l}")).get("conn_time_ms")))
        f.append((f"conn_cpu_{label}", f"  proxy CPU per connection ({label})", "ms", False,
                  lambda r, l=label: ok(r.get(f"connect_{l}")).get("proxy_cpu_ms_per_conn")))
        f.append((f"conn_cs_{label}", f"  proxy context switches per connection ({label})", "cs", False,
                  lambda r, l=label: ok(r.get(f"connect_{l}")).get("proxy_ctxsw_per_conn")))
    f += [
        ("copy_out", "COPY out", "MB/s", True, lambda r: ok(r.get("copy")).get("copy_out_MBps")),
        ("copy_in", "COPY in", "MB/s", True, lambda r: ok(r.get("copy")).get("copy_in_MBps")),
        ("cpu_per_gb", "proxy CPU per GB relayed", "s/GB", False,
         lambda r: ok(r.get("copy")).get("cpu_s_per_GB")),
        ("idle_rss", "idle session: proxy RSS each", "kB", False,
         lambda r: (r.get("idle") or {}).get("rss_per_session_kB")),
        ("idle_threads", "idle session: proxy threads each", "thr", False,
         lambda r: (r.get("idle") or {}).get("threads_per_session")),
        ("idle_go_live", "idle session: Go live heap each (--gctrace)", "kB", False,
         lambda r: (r.get("idle") or {}).get("go_live_heap_per_session_kB")),
        ("idle_fds", "idle session: proxy fds each", "fds", False,
         lambda r: (r.get("idle") or {}).get("fds_per_session")),
        ("idle_cpu", "idle sessions: proxy CPU while idle", "%", False,
         lambda r: (r.get("idle") or {}).get("idle_cpu_pct")),
    ]
    return f


# Figures the issue does not ask for, shown to explain the others; they
# are left out of the "tailgres >= pgproxy on every figure" check.
def diagnostic(key):
    # Identity login and verifier mode are tailgres's alone: shown beside the password relay's
    # figures, compared with nothing.
    return (key.startswith(("so_cpu_", "so_cs_", "so_audit_", "conn_cpu_", "conn_cs_"))
            or key.endswith(("_identity", "_verifier"))
            or key in ("idle_fds", "idle_cpu", "idle_go_live"))


def summarize(results, clients):
    """Medians over rounds, per system and figure."""
    out = {}
    for sysname, rounds in results.items():
        out[sysname] = {}
        for key, _, _, _, get in figures(clients):
            vals = [get(r) for r in rounds]
            out[sysname][key] = median(vals)
            out[sysname][key + "_all"] = vals
        out[sysname]["failed_runs"] = sum(
            1 for r in rounds for v in r.values() if isinstance(v, dict) and v.get("failed"))
        out[sysname]["retried_runs"] = sum(
            1 for r in rounds for v in r.values() if isinstance(v, dict) and v.get("earlier_attempts"))
        out[sysname]["client_dial_timeouts"] = sum(
            v.get("client_dial_timeouts", 0) for r in rounds for v in r.values() if isinstance(v, dict))
    return out


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt(v, unit=""):
    if v is None:
        return "—"
    if unit in ("thr", "fds"):
        return f"{v:.3f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(v):
    return "—" if v is None else f"{v:.2f}×"


def table(summary, systems, clients):
    """Markdown: the figures, then each system's ratio to direct and to
    the tailnet floor."""
    lines = []
    head = ["figure", "unit"] + systems
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for key, label, unit, _, _ in figures(clients):
        label = label.strip() if not label.startswith("  ") else "&nbsp;&nbsp;" + label.strip()
        row = [label + (" *" if diagnostic(key) else ""), unit]
        row += [fmt(summary.get(s, {}).get(key), unit) for s in systems]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    pairs = [(s, "direct") for s in systems if s != "direct" and "direct" in systems]
    pairs += [(s, "floor") for s in systems if s not in ("direct", "floor") and "floor" in systems]
    if "tailgres" in systems and "pgproxy" in systems:
        pairs.append(("tailgres", "pgproxy"))
    if "tailgres" in systems and "tailgres-stmt" in systems:
        pairs.append(("tailgres-stmt", "tailgres"))
    if pairs:
        head = ["figure (ratio)"] + [f"{a}/{b}" for a, b in pairs]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for key, label, unit, hib, _ in figures(clients):
            row = [label.strip() + (" ↑" if hib else " ↓")]
            row += [fmt_ratio(ratio(summary.get(a, {}).get(key), summary.get(b, {}).get(key))) for a, b in pairs]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("↑ higher is better, ↓ lower is better; a ratio is system/reference of the medians. "
                     "\\* diagnostic figure (not one the issue sets a target on).")
    return "\n".join(lines)


def targets(summary, clients, idle_n):
    """The issue's targets for tailgres, each with the figures it rests on."""
    t = summary.get("tailgres")
    p = summary.get("pgproxy")
    fl = summary.get("floor")
    out = []
    if t and p:
        worse = []
        for key, label, unit, hib, _ in figures(clients):
            a, b = t.get(key), p.get(key)
            if a is None or b is None or diagnostic(key):
                continue
            if (hib and a < b) or (not hib and a > b):
                worse.append(f"{label.strip()}: {fmt(a, unit)} vs {fmt(b, unit)} {unit}")
        out.append(("tailgres ≥ pgproxy on every figure", not worse,
                    "worse on: " + "; ".join(worse) if worse else "better or equal on every figure"))
        for label in ("scram", "trust", "identity"):
            r = ratio(t.get(f"conn_rate_{label}"), p.get(f"conn_rate_{label}"))
            if r is not None:
                out.append((f"connection setup rate ≥ 1.5× pgproxy ({label})", r >= 1.5,
                            f"{fmt(t.get(f'conn_rate_{label}'))} vs {fmt(p.get(f'conn_rate_{label}'))} conn/s = {r:.2f}×"))
        r = ratio(t.get("idle_rss"), p.get("idle_rss"))
        if r is not None:
            out.append(("memory per idle session ≤ ½ pgproxy", r <= 0.5,
                        f"{fmt(t.get('idle_rss'))} vs {fmt(p.get('idle_rss'))} kB = {r:.2f}×"))
    st = summary.get("tailgres-stmt")
    if t and st:
        for c in clients:
            r = ratio(st.get(f"so_tps_c{c}"), t.get(f"so_tps_c{c}"))
            if r is not None:
                out.append((f"select-only tps with statement audit ≥ 0.9× without ({c} client(s))", r >= 0.9,
                            f"{fmt(st.get(f'so_tps_c{c}'))} vs {fmt(t.get(f'so_tps_c{c}'))} tps = {r:.2f}×; "
                            f"{fmt(st.get(f'so_audit_c{c}'))} audit records/s"))
    if t and fl:
        for c in clients:
            r = ratio(t.get(f"so_tps_c{c}"), fl.get(f"so_tps_c{c}"))
            if r is not None:
                out.append((f"select-only tps within 10% of the floor ({c} client(s))", r >= 0.9,
                            f"{fmt(t.get(f'so_tps_c{c}'))} vs {fmt(fl.get(f'so_tps_c{c}'))} tps = {r:.2f}×"))
    for s in ("tailgres", "pgproxy", "floor"):
        v = (summary.get(s) or {}).get("idle_threads")
        if v is not None:
            # One thread per session would be 1.0; "none" allows a few
            # runtime threads for the whole burst, not per session.
            out.append((f"no OS thread per idle session ({s})", v * idle_n < 0.05 * idle_n,
                        f"{v * idle_n:+.0f} threads with {idle_n} idle sessions (settled)"))
    return out

NOTES = """\
Notes
- Every system uses the same libpq settings: sslmode=require channel_binding=disable. pgproxy
  relays SCRAM unchanged and terminates TLS, so SCRAM channel binding cannot work through it;
  tailgres (default --auth password-relay) asks TLS clients for the password and runs
  SCRAM-SHA-256-PLUS to the database itself, so on every SCRAM connect tailgres does the
  client's PBKDF2 work. The trust-role rows (role_trust, no password) compare connection setup
  without that work.
- direct: no tailnet, so no proxy figures. floor: a plain TCP forward across the tailnet
  (tslab node --serve); the client's TLS goes end to end to PostgreSQL.
- Idle sessions: asyncpg over TLS, role_scram; per-session figures are (settled - baseline) / N
  of the proxy process (tailgres: one process, Go side included).
- CPU per GB: user+system CPU of the proxy process over COPY out + COPY in, per GB of COPY
  data relayed (both directions counted).
"""


def report(meta, results, a):
    summary = summarize(results, a.clients)
    systems = [s for s in ALL_SYSTEMS if s in results]
    tg = targets(summary, a.clients, a.idle)
    doc = dict(meta, results=results, summary=summary,
               targets=[{"target": n, "met": m, "evidence": e} for n, m, e in tg])
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    m = meta["machine"]
    copy_mb = 0
    for rounds in results.values():
        for r in rounds:
            copy_mb = max(copy_mb, ok(r.get("copy")).get("copy_bytes_each_way", 0) / 1e6)
    text = [
        f"tailgres benchmark — commit {meta['commit']}, {meta['started']} ({meta['wall_minutes']:.0f} min)",
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_GiB']} GiB RAM, Linux {m['kernel']}; "
        f"load average at start {' '.join(m['loadavg_at_start'])}, at end {' '.join(meta['loadavg_at_end'])}",
        f"command: {meta['command']}",
        f"{a.runs} rounds (medians), pgbench {a.duration} s per run, scale {a.scale}, COPY {copy_mb:.0f} MB "
        f"each way, {a.idle} idle sessions; tailnet path: {meta['tailnet_path']}",
        "",
        table(summary, systems, a.clients),
        "",
    ]
    text += [f"[{'met' if met else 'MISSED'}] {n}: {ev}" for n, met, ev in tg]
    text += [f"note: {summary[s]['failed_runs']} {s} measurement(s) failed (kept in the JSON, left out "
             "of the medians)" for s in systems if summary[s]["failed_runs"]]
    text += [f"note: {s}: {summary[s]['retried_runs']} run(s) failed and were run again (after gVisor's 60 s TIME_WAIT); the "
             f"client node gave up on {summary[s]['client_dial_timeouts']} connection(s) (20 s dial timeout)"
             for s in systems if summary[s]["retried_runs"] or summary[s]["client_dial_timeouts"]]
    text += ["", NOTES, "conninfo used (the forward's port differs per round):"]
    for s, c in meta.get("conninfo", {}).items():
        text.append(f"  {s}: {c['new connection per transaction'][0]}")
        text.append(f"  {' ' * len(s)}  {c['new connection per transaction'][1]}")
    md = out.with_suffix(".md")
    md.write_text("\n".join(text) + "\n")
    print()
    print("\n".join(text))
    print()
    print(f"JSON: {out}\nreport: {md}")


def report_soak(meta, a):
    s = meta["soak"]
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        "soak-" + datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1, default=str))
    b, p, af = s["baseline"], s["peak"], s["after"]
    print()
    print(f"soak: {s['sessions']} sessions ({s['role']}, new connection each) through tailgres "
          f"in {s['seconds']:.0f}s ({s['sessions'] / s['seconds']:.0f}/s); pgbench chunks that failed: "
          f"{len(s['pgbench_failed_chunks'])}; client-node dial timeouts: {s['client_dial_timeouts']}")
    print(f"{'':10} {'baseline':>12} {'peak':>12} {'idle after':>12} {'delta':>10}")
    for k, unit, div in (("fds", "", 1), ("threads", "", 1), ("rss", " MB", 1e6)):
        print(f"{k + unit:10} {b[k] / div:12.1f} {p.get(k, 0) / div:12.1f} {af[k] / div:12.1f} "
              f"{(af[k] - b[k]) / div:+10.1f}")
    cum = 0
    for ch in s["chunks"]:
        cum += ch["sessions"]
        st = ch["stats_after"]
        print(f"  after {cum:>7} sessions: rss {st['rss'] / 1e6:6.1f} MB, threads {st['threads']}, fds {st['fds']}")
    g = s["after_gc"]
    print(f"after Go's next GC: fds {g['fds']}, threads {g['threads']}, rss {g['rss'] / 1e6:.1f} MB "
          f"({(g['rss'] - b['rss']) / 1e6:+.1f}); Go live heap {s['go_live_heap_MB_at_baseline']} MB at "
          f"baseline, {s['go_live_heap_MB_after_gc']} MB after ({s['go_gcs']} GCs)")
    m = s["rss_by_mapping_kB"]
    print("rss by mapping (MB), baseline -> idle after -> after GC: " + ", ".join(
        f"{k} {m['baseline'][k] / 1024:.1f} -> {m['after'][k] / 1024:.1f} -> {m['after_gc'][k] / 1024:.1f}"
        for k in m["baseline"]))
    print(f"JSON: {out}")

