#!/usr/bin/env python3
"""Side by side, in absolute terms: each system's proxy CPU per unit of work
by component, from a `bench/run --perf` directory and its results JSON.
perfsum.py gives shares of one process's samples; two shares do not compare
when the totals differ, so this counts samples instead (one sample is
1/499 s of CPU, as bench.py records) and divides by the work the
measurement did: transactions for select-only, connections for the
new-connection runs, GB relayed (both directions) for COPY.

    bench/perfcmp.py PERF_DIR RESULTS.json [ROUND] [--symbols COMPONENT] [--top N]

--symbols lists, below each measurement, the N symbols (default 15) of the
components whose name contains COMPONENT (e.g. kernel, "Go runtime") that
differ most between the systems, in the same unit.

The pid of each process comes from the .proxy.txt report perfsum wrote
next to each .data file.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import perfsum

HZ = 499
FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def samples_by_component(data, pid):
    out = subprocess.run(["perf", "script", "-i", str(data), f"--pid={pid}", "-F", "ip,sym,dso", "-G"],
                         capture_output=True, text=True)
    counts, symbols = {}, {}
    for line in out.stdout.splitlines():
        m = FRAME.match(line)
        if not m:
            continue
        sym, dso = m.group(1), m.group(2)
        what = ("[kernel]" if dso.startswith("[kernel") else Path(dso).name) + " " + sym
        name = next((n for n, rx in perfsum.COMPONENTS if re.search(rx, what)), "other")
        counts[name] = counts.get(name, 0) + 1
        symbols[(name, sym)] = symbols.get((name, sym), 0) + 1
    return counts, symbols


def proxy_pid(txt):
    m = re.search(r" pid (\d+):", txt.read_text().splitlines()[0])
    return int(m.group(1)) if m else None


def work(res, measurement):
    """(units of work, unit name, scale to print) for a measurement's result."""
    r = res.get(measurement) or {}
    if measurement.startswith("select"):
        return r.get("transactions"), "µs per transaction", 1e6
    if measurement.startswith("connect") and r.get("connections"):
        return r["connections"], "µs per connection", 1e6
    if measurement == "copy" and r.get("copy_bytes_each_way"):
        return 2 * r["copy_bytes_each_way"] / 1e9, "ms per GB", 1e3
    return None, None, None


def main():
    ap = argparse.ArgumentParser(usage=__doc__)
    ap.add_argument("perf_dir")
    ap.add_argument("results")
    ap.add_argument("round", nargs="?", type=int, default=1)
    ap.add_argument("--symbols")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    pdir, results = Path(a.perf_dir), json.loads(Path(a.results).read_text())["results"]
    rnd = a.round
    systems = [s for s in ("floor", "tailgres", "pgproxy") if s in results]
    for measurement in ("select_c1", "select_c8", "select_c32", "connect_scram", "connect_trust", "copy"):
        cols, syms, unit = {}, {}, None
        for s in systems:
            res = next((r for r in results[s] if r.get("round") == rnd), None)
            txt = pdir / f"{s}-r{rnd}-{measurement}.proxy.txt"
            if res is None or not txt.exists():
                continue
            n, unit, scale = work(res, measurement)
            if not n:
                continue
            counts, symbols = samples_by_component(pdir / f"{s}-r{rnd}-{measurement}.data", proxy_pid(txt))
            cols[s] = {k: v / HZ / n * scale for k, v in counts.items()}
            syms[s] = {k[1]: v / HZ / n * scale for k, v in symbols.items()
                       if a.symbols and a.symbols.lower() in k[0].lower()}
        if not cols:
            continue
        names = sorted({k for c in cols.values() for k in c}, key=lambda k: -max(c.get(k, 0) for c in cols.values()))
        print(f"\n{measurement}: proxy CPU, {unit} (round {rnd})")
        print(f"  {'component':52s}" + "".join(f"{s:>10s}" for s in cols))
        for k in names + ["total"]:
            vals = [sum(c.values()) if k == "total" else c.get(k, 0) for c in cols.values()]
            if k != "total" and max(vals) < 0.01 * max(sum(c.values()) for c in cols.values()):
                continue
            print(f"  {k[:52]:52s}" + "".join(f"{v:10.1f}" for v in vals))
        if a.symbols:
            top = sorted({k for c in syms.values() for k in c},
                         key=lambda k: -(max(c.get(k, 0) for c in syms.values()) - min(c.get(k, 0) for c in syms.values())))
            print(f"  symbols of '{a.symbols}' that differ most:")
            for k in top[:a.top]:
                print(f"    {k[:50]:50s}" + "".join(f"{syms[s].get(k, 0):10.2f}" for s in syms))


if __name__ == "__main__":
    main()
