#!/usr/bin/env python3
"""The tailgres benchmark driver. Run it through `bench/run`, which builds
everything and starts this inside a fresh network namespace holding only
`lo`; this file refuses to run anywhere else.

One world per run, all on 127.0.0.1: the lab tailnet (`tslab control`:
test control server, DERP, STUN), a Debian PostgreSQL with TLS from a
throwaway CA (`tailgres-lab pg`), pgbench data and a bulk table. Then, one
system at a time, the same measurements:

  direct    pgbench/psql straight to PostgreSQL over TLS (no tailnet)
  floor     a plain TCP forward across the tailnet (`tslab node --serve`):
            what the tailnet itself costs
  tailgres  the release binary with its normal flags
  pgproxy   Tailscale's cmd/pgproxy at the pinned tailscale.com version

The three tailnet systems are reached through the same client-side
forwarder (`tslab node --forward`, a fresh node per system and round), so
only the server side differs. Every round starts each system afresh, in a
rotated order, so a noisy neighbour hurts all of them alike; the table
shows medians over rounds.

This file holds the measurements and main(); world.py starts and stops
processes, report.py prints the table and writes the results.
"""

import argparse
import asyncio
import datetime
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import perfsum
from report import report, report_soak
from world import (ALL_SYSTEMS, CAPABILITY, DB, IDENTITY, SCRAM, VERIFIER, SYSTEMS, TAILSCALE_VERSION, TRUST, DirectSystem, Lab,
                   TailnetSystem, World,
                   context_switches, git_commit, log, machine, proc_stats, require_loopback_only, rss_breakdown,
                   run_pgbench)


def pctl(sorted_xs, p):
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[i]

# ---------------------------------------------------------------- measurements
def parse_float(pattern, text):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def cpu_of(pids):
    return {k: proc_stats(p)["cpu"] for k, p in pids.items()}


def cpu_delta(before, pids):
    after = cpu_of(pids)
    return {k: round(after[k] - before[k], 3) for k in pids}


def failed(what, out):
    """A pgbench run that did not finish cleanly: logged and kept in the
    JSON, left out of the medians."""
    log(f"{what} failed (exit {out.returncode}):\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    return {"failed": True, "exit": out.returncode, "stdout": out.stdout[-3000:], "stderr": out.stderr[-3000:]}


class Perf:
    """With --perf: `perf record` during one measurement, then a flat
    profile (self time by DSO and symbol) of each process of interest.
    Sampling is system-wide on cpu-clock because that is what this kind of
    VM allows (no PMU; attaching to a pid counts nothing); the reports
    filter by pid. Frame-pointer call graphs (-g) are recorded for
    flamegraphs: complete for Go, shallow for the Rust side."""

    def __init__(self, world, label, pids):
        self.on = world.args.perf
        self.label, self.pids = label, pids
        self.dir = world.perf_dir
        self.p = None

    def __enter__(self):
        if self.on:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.data = self.dir / f"{self.label}.data"
            self.p = subprocess.Popen(["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "499",
                                       "-o", str(self.data)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches to every CPU before the measurement starts
        return self

    def __exit__(self, *exc):
        if not self.p:
            return False
        self.p.send_signal(signal.SIGINT)
        self.p.wait()
        for name, pid in self.pids.items():
            (self.dir / f"{self.label}.{name}.txt").write_text(perfsum.render(self.data, pid))
        return False


# gVisor keeps a closed TCP connection in TIME_WAIT this long
# (tcp.DefaultTCPTimeWaitTimeout; tsnet does not change it).
GVISOR_TIME_WAIT = 60
RETRIES = 2
SOAK_CHUNK = 10_000


def again_on_failure(sys_, run):
    """Runs a measurement; if it fails, up to RETRIES more times, each after
    gVisor's TIME_WAIT has run out. pgbench aborts a whole run when one
    connection fails, and through a tsnet server about one connection in a
    thousand or two stalls past the client node's dial timeout: its SYN
    reuses the 4-tuple of a connection the server closed first, which the
    server's netstack still holds in TIME_WAIT, and gVisor hands such a SYN
    only to a listening endpoint, which tsnet (a tcp.Forwarder) has not,
    so it is dropped (see RESULTS.md). Every attempt is kept; the client
    node's dial timeouts are counted."""
    before = sys_.dial_timeouts()
    res = run()
    failures = []
    while res.get("failed") and len(failures) < RETRIES:
        failures.append({k: res.get(k) for k in ("exit", "stderr")})
        log(f"{sys_.name}: waiting {GVISOR_TIME_WAIT + 5}s for the server's TIME_WAIT entries to expire")
        time.sleep(GVISOR_TIME_WAIT + 5)
        res = run()
    if failures:
        res["earlier_attempts"] = failures
    res["client_dial_timeouts"] = sys_.dial_timeouts() - before
    return res


def count_lines(path):
    """Lines in a file (0 if it is not there yet)."""
    if not path:
        return 0
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def select_only(world, sys_, clients, duration, pids):
    """pgbench -S: tps, mean and p99 latency (from the per-transaction log)."""
    logdir = Path(tempfile.mkdtemp(dir=world.dir, prefix="pgbench-log."))
    jobs = min(clients, world.args.pgbench_jobs)
    before = cpu_of(pids)
    cs_before = {k: context_switches(p) for k, p in pids.items()}
    audit_log = getattr(sys_, "audit_log", None)
    lines_before = count_lines(audit_log)
    started = time.time()
    out = run_pgbench(world, sys_.env(SCRAM),
                      ["-n", "-S", "-c", str(clients), "-j", str(jobs), "-T", str(duration),
                       "-l", f"--log-prefix={logdir / 'tx'}"], timeout=duration + 300)
    cpu = cpu_delta(before, pids)
    took = time.time() - started
    if out.returncode != 0:
        return failed(f"{sys_.name}: pgbench -S -c {clients}", out)
    # Audit records written meanwhile (one per statement with statement audit).
    audit_records = count_lines(audit_log) - lines_before if audit_log else None
    lat = []
    for f in logdir.iterdir():
        for line in open(f):
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]))
    shutil.rmtree(logdir, ignore_errors=True)
    lat.sort()
    res = {
        "tps": parse_float(r"tps = ([0-9.]+)", out.stdout),
        "lat_avg_ms": statistics.fmean(lat) / 1000 if lat else None,
        "lat_p99_ms": pctl(lat, 99) / 1000 if lat else None,
        "transactions": len(lat),
        "failed_transactions": parse_float(r"number of failed transactions: (\d+)", out.stdout),
        "cpu_s": cpu,
        "audit_records": audit_records,
        "audit_records_per_s": audit_records / took if audit_records is not None else None,
    }
    if "proxy" in cpu and lat:
        res["proxy_cpu_us_per_txn"] = cpu["proxy"] / len(lat) * 1e6
        res["proxy_ctxsw_per_txn"] = (context_switches(pids["proxy"]) - cs_before["proxy"]) / len(lat)
    return res


def connect_rate(world, sys_, role, duration, pids):
    """pgbench -S -C: a new connection per transaction."""
    c = world.args.connect_clients
    before = cpu_of(pids)
    cs_before = {k: context_switches(p) for k, p in pids.items()}
    out = run_pgbench(world, sys_.env(role),
                      ["-n", "-S", "-C", "-c", str(c), "-j", str(min(c, world.args.pgbench_jobs)),
                       "-T", str(duration)], timeout=duration + 300)
    cpu = cpu_delta(before, pids)
    if out.returncode != 0:
        return failed(f"{sys_.name}: pgbench -C ({role[0]})", out)
    res = {
        "conn_per_s": parse_float(r"tps = ([0-9.]+)", out.stdout),
        "conn_time_ms": parse_float(r"average connection time = ([0-9.]+) ms", out.stdout),
        "connections": parse_float(r"number of transactions actually processed: (\d+)", out.stdout),
        "cpu_s": cpu,
    }
    if "proxy" in cpu and res["connections"]:
        res["proxy_cpu_ms_per_conn"] = cpu["proxy"] / res["connections"] * 1e3
        res["proxy_ctxsw_per_conn"] = (context_switches(pids["proxy"]) - cs_before["proxy"]) / res["connections"]
    return res


def identity_connect_rate(world, lab, sys_, rnd, pids):
    """pgbench -C through tailgres's identity-login route: no password, a
    client certificate signed per connection. Identity login needs a grant
    that says so: the lab grants it to every node for this run only."""
    a = world.args
    lab.set_global_caps({CAPABILITY: [{"databases": ["*"], "users": ["*"], "login": "identity"}]})
    try:
        # Until the grant has reached tailgres (a netmap push).
        deadline = time.time() + 60
        while True:
            probe = subprocess.run([str(world.bins["psql"]), "-X", "-At", "-c", "select 1"],
                                   env=sys_.env(IDENTITY), capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if time.time() > deadline:
                return {"failed": True, "error": f"identity login never worked: {probe.stderr[-500:]}"}
            time.sleep(0.5)
        log(f"{sys_.name} r{rnd}: new connection per transaction ({IDENTITY[0]}, identity login), {a.duration}s")
        with Perf(world, f"{sys_.name}-r{rnd}-connect_identity", pids):
            return again_on_failure(sys_, lambda: connect_rate(world, sys_, IDENTITY, a.duration, pids))
    finally:
        lab.set_global_caps({})


def copy_runs(world, lab, sys_, pids):
    """COPY out then in of the bulk table through sys_; MB/s each way and
    CPU seconds of each process in pids over both."""
    psql = str(world.bins["psql"])
    lab.admin_sql("truncate bulk_in")
    before = cpu_of(pids)
    t0 = time.perf_counter()
    r1 = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "copy bulk_out to stdout"],
                        env=sys_.env(SCRAM), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t1 = time.perf_counter()
    with open(lab.bulk_file, "rb") as f:
        r2 = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "copy bulk_in from stdin"],
                            env=sys_.env(SCRAM), stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t2 = time.perf_counter()
    cpu = cpu_delta(before, pids)
    if r1.returncode or r2.returncode:
        err = r1.stderr.decode()[-1000:] + r2.stderr.decode()[-1000:]
        log(f"{sys_.name}: COPY failed: {err}")
        return {"failed": True, "exit": r1.returncode or r2.returncode, "stderr": err}
    n = lab.bulk_bytes
    got = int(lab.admin_sql("select count(*) from bulk_in"))
    gb = 2 * n / 1e9
    res = {
        "copy_out_MBps": n / (t1 - t0) / 1e6,
        "copy_in_MBps": n / (t2 - t1) / 1e6,
        "copy_bytes_each_way": n,
        "copy_in_rows": got,
        "cpu_s": cpu,
    }
    if "proxy" in pids:
        res["cpu_s_per_GB"] = res["cpu_s"]["proxy"] / gb
    return res


async def _open_idle(host, port, n, concurrency):
    import asyncpg
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # sslmode=require
    sem = asyncio.Semaphore(concurrency)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                c = await asyncpg.connect(host=host, port=port, user=SCRAM[0], password=SCRAM[1],
                                          database=DB, ssl=ctx, timeout=60, statement_cache_size=0)
                await c.fetchval("select 1")
                conns.append(c)
            except Exception as e:
                errors.append(repr(e))

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, errors


async def _close_all(conns):
    # terminate(), not close(). After close() of 1,000 sessions (Terminate,
    # then wait for the server to hang up) a few of the next minute's
    # connections, through tailgres and pgproxy alike, stalled until the
    # client node's 20 s dial timeout ("dial: context deadline exceeded").
    # Our reading, not verified: the server's netstack closed first and
    # holds 1,000 TIME_WAIT entries for 60 s, and a new SYN that reuses
    # one's client port is not accepted. Hanging up from the client, as
    # pgbench does, made it go away.
    for c in conns:
        c.terminate()
    await asyncio.sleep(0)

def idle_sessions(world, sys_, pid, label):
    """Opens N idle sessions through sys_ and reads the proxy process's
    RSS, threads and fds before, right after, once settled, and after
    closing them again."""
    n = world.args.idle
    loop = asyncio.new_event_loop()
    base = proc_stats(pid)
    base_map = rss_breakdown(pid)
    gcs_before = len(gc_lines(sys_.proc.log))
    t0 = time.perf_counter()
    conns, errors = loop.run_until_complete(_open_idle(sys_.host, sys_.port, n, world.args.idle_concurrency))
    opened_in = time.perf_counter() - t0
    peak = proc_stats(pid)
    t_idle = time.perf_counter()
    gcs_at_open = len(gc_lines(sys_.proc.log))
    with Perf(world, label, {"proxy": pid}):
        time.sleep(world.args.settle)
    settled = proc_stats(pid)
    idle_cpu_pct = (settled["cpu"] - peak["cpu"]) / (time.perf_counter() - t_idle) * 100
    settled_map = rss_breakdown(pid)
    go_live = go_live_heap_growth(world, sys_.proc.log, gcs_before, gcs_at_open) if world.args.gctrace else None
    loop.run_until_complete(_close_all(conns))
    # Wait for the proxy to notice the closes (fds are the exact signal).
    deadline = time.time() + 60
    while time.time() < deadline and proc_stats(pid)["fds"] > base["fds"]:
        time.sleep(0.2)
    time.sleep(world.args.settle)
    closed = proc_stats(pid)
    loop.close()
    if errors:
        log(f"{sys_.name}: {len(errors)} of {n} idle sessions failed, e.g. {errors[0]}")
    k = len(conns)
    per = lambda key, s: (s[key] - base[key]) / k if k else None
    return {
        "sessions": k,
        "errors": len(errors),
        "open_seconds": opened_in,
        "base": base, "peak": peak, "settled": settled, "closed": closed,
        "rss_per_session_kB": per("rss", settled) / 1024 if k else None,
        "rss_per_session_by_mapping_kB": {m: (settled_map[m] - base_map[m]) / k for m in base_map} if k else None,
        "go_live_heap_MB": go_live,
        "go_live_heap_per_session_kB": (go_live["after"] - go_live["before"]) * 1024 / k
        if go_live and k and go_live["before"] is not None and go_live["after"] is not None else None,
        "threads_per_session": per("threads", settled),
        "idle_cpu_pct": idle_cpu_pct,
        "threads_delta_settled": settled["threads"] - base["threads"],
        "threads_delta_peak": peak["threads"] - base["threads"],
        "fds_per_session": per("fds", settled),
        "rss_after_close_delta_kB": (closed["rss"] - base["rss"]) / 1024,
        "threads_after_close_delta": closed["threads"] - base["threads"],
        "fds_after_close_delta": closed["fds"] - base["fds"],
    }


def go_live_heap_growth(world, log_path, gcs_before, gcs_at_open):
    """With --gctrace: the Go live heap (MB, after a GC) before the sessions
    were opened and at the first GC that started once they were all open
    (an idle Go process collects only every 2 minutes; wait for it)."""
    deadline = time.time() + world.args.gc_wait
    while time.time() < deadline and len(gc_lines(log_path)) <= gcs_at_open:
        time.sleep(1)
    lines = gc_lines(log_path)
    return {
        "before": go_live_heap(gc_lines_before(lines, gcs_before)),
        "after": go_live_heap(lines[-1]) if len(lines) > gcs_at_open else None,
        "gc_after": lines[-1] if lines else None,
    }


def warm_up(world, sys_):
    """A short pgbench: brings up the direct path between the nodes and
    warms caches before anything is measured."""
    run_pgbench(world, sys_.env(SCRAM), ["-n", "-S", "-c", "4", "-j", "2", "-T", str(world.args.warmup)],
                timeout=300)


def measure(world, lab, sys_, rnd):
    a = world.args
    res = {"round": rnd}
    pid = sys_.proc.pid if sys_.proc else None
    pids = {}
    if pid:
        pids["proxy"] = pid
        pids["client_forwarder"] = sys_.client.pid
        pids["tailnet_control_derp"] = lab.control.pid
    log(f"{sys_.name} r{rnd}: warm-up")
    warm_up(world, sys_)
    if pid and a.idle > 0:
        log(f"{sys_.name} r{rnd}: {a.idle} idle sessions")
        res["idle"] = idle_sessions(world, sys_, pid, f"{sys_.name}-r{rnd}-idle")
    for c in a.clients:
        log(f"{sys_.name} r{rnd}: select-only, {c} clients, {a.duration}s")
        with Perf(world, f"{sys_.name}-r{rnd}-select_c{c}", pids):
            res[f"select_c{c}"] = again_on_failure(
                sys_, lambda: select_only(world, sys_, c, a.duration, pids))
    for label, role in (("scram", SCRAM), ("trust", TRUST)):
        log(f"{sys_.name} r{rnd}: new connection per transaction ({role[0]}), {a.duration}s")
        with Perf(world, f"{sys_.name}-r{rnd}-connect_{label}", pids):
            res[f"connect_{label}"] = again_on_failure(
                sys_, lambda: connect_rate(world, sys_, role, a.duration, pids))
    if getattr(sys_, "identity_port", None):
        res["connect_identity"] = identity_connect_rate(world, lab, sys_, rnd, pids)
    if getattr(sys_, "verifier_port", None):
        log(f"{sys_.name} r{rnd}: new connection per transaction ({VERIFIER[0]}, scram-verifier, "
            f"channel binding required), {a.duration}s")
        with Perf(world, f"{sys_.name}-r{rnd}-connect_verifier", pids):
            res["connect_verifier"] = again_on_failure(
                sys_, lambda: connect_rate(world, sys_, VERIFIER, a.duration, pids))
    log(f"{sys_.name} r{rnd}: COPY out and in, {lab.bulk_bytes / 1e6:.0f} MB each way")
    with Perf(world, f"{sys_.name}-r{rnd}-copy", pids):
        res["copy"] = again_on_failure(sys_, lambda: copy_runs(world, lab, sys_, pids))
    if pid:
        res["proxy_after"] = proc_stats(pid)
    res["loadavg"] = open("/proc/loadavg").read().split()[:3]
    return res

# ---------------------------------------------------------------- soak

def gc_lines(path):
    try:
        return [l for l in path.read_text(errors="replace").splitlines() if re.match(r"gc \d+ @", l)]
    except OSError:
        return []


def gc_lines_before(lines, n):
    return lines[n - 1] if 0 < n <= len(lines) else None


def go_live_heap(line):
    """The live heap after a GC, from a gctrace line ("... 4->4->2 MB ...")."""
    m = re.search(r"(\d+)->(\d+)->(\d+) MB", line or "")
    return int(m.group(3)) if m else None


def soak(world, lab):
    """N short sessions through tailgres, then idle: do fds, threads and
    memory come back to the baseline?"""
    a = world.args
    # gctrace: one line per Go GC in tailgres's log, with the live heap.
    sys_ = TailnetSystem(lab, "tailgres", 1, extra_env={"GODEBUG": "gctrace=1"})
    pid = sys_.proc.pid
    warm_up(world, sys_)
    time.sleep(a.settle)
    base = proc_stats(pid)
    base_map = rss_breakdown(pid)
    base_gc_count = len(gc_lines(sys_.proc.log))
    log(f"soak: baseline {base}")
    c = a.connect_clients
    t0 = time.perf_counter()
    samples, failures, chunks = [], [], []
    role = TRUST if a.soak_role == "trust" else SCRAM
    done = 0
    # In chunks, so one stalled connect (see again_on_failure) costs a
    # chunk's remainder, not the soak: pgbench aborts a run on the first
    # failed connection. What a failed chunk did get through still counts.
    # Such stalls come about once per several thousand connections (a
    # 100,000-session soak at c1be44c met one in nearly every chunk of
    # 10,000), so the cap on failed chunks grows with the soak; each is
    # reported, with the client node's dial timeouts.
    max_failures = max(5, a.soak_sessions // 5_000)
    while done < a.soak_sessions and len(failures) <= max_failures:
        per_client = max(1, min(SOAK_CHUNK, a.soak_sessions - done) // c)
        p = subprocess.Popen([str(world.bins["pgbench"]), "-n", "-S", "-C", "-c", str(c),
                              "-j", str(min(c, a.pgbench_jobs)), "-t", str(per_client)],
                             env=sys_.env(role), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None:
            samples.append(proc_stats(pid))
            time.sleep(1)
        out, err = p.communicate()
        got = int(parse_float(r"number of transactions actually processed: (\d+)", out) or 0)
        done += got
        chunks.append({"sessions": got, "ok": p.returncode == 0, "stats_after": proc_stats(pid)})
        log(f"soak: {done} of {a.soak_sessions} sessions; tailgres now {chunks[-1]['stats_after']}")
        if p.returncode != 0:
            failures.append({"exit": p.returncode, "stdout": out[-1500:], "stderr": err[-1500:]})
            log(f"soak: a pgbench chunk failed; waiting {GVISOR_TIME_WAIT + 5}s (TIME_WAIT):\n{err[-800:]}")
            time.sleep(GVISOR_TIME_WAIT + 5)
    elapsed = time.perf_counter() - t0
    log(f"soak: {done} sessions in {elapsed:.0f}s; waiting for idle")
    deadline = time.time() + 120
    while time.time() < deadline and proc_stats(pid)["fds"] > base["fds"]:
        time.sleep(0.5)
    time.sleep(max(a.settle, 15))  # tokio's blocking pool keeps idle threads 10 s
    after = proc_stats(pid)
    after_map = rss_breakdown(pid)
    # An idle Go heap is collected only by the forced GC every 2 minutes;
    # wait for it (and the scavenger) before reading memory once more.
    gcs = len(gc_lines(sys_.proc.log))
    deadline = time.time() + a.soak_gc_wait
    while time.time() < deadline and len(gc_lines(sys_.proc.log)) == gcs:
        time.sleep(1)
    time.sleep(5 if time.time() < deadline else 0)
    after_gc = proc_stats(pid)
    after_gc_map = rss_breakdown(pid)
    gl = gc_lines(sys_.proc.log)
    peak = {k: max(s[k] for s in samples) for k in ("rss", "threads", "fds")} if samples else {}
    sys_.stop()
    return {
        "sessions": done,
        "role": role[0],
        "seconds": elapsed,
        "pgbench_failed_chunks": failures,
        "client_dial_timeouts": sys_.dial_timeouts(),
        "chunks": chunks,
        "baseline": base,
        "peak": peak,
        "after": after,
        "delta": {k: after[k] - base[k] for k in ("rss", "threads", "fds")},
        "after_gc": after_gc,
        "go_gcs": len(gl),
        "go_last_gc": gl[-1] if gl else None,
        "go_live_heap_MB_after_gc": go_live_heap(gl[-1]) if gl else None,
        "go_live_heap_MB_at_baseline": go_live_heap(gc_lines_before(gl, base_gc_count)),
        "rss_by_mapping_kB": {"baseline": base_map, "after": after_map, "after_gc": after_gc_map},
        "samples_1s": samples,
    }


# ---------------------------------------------------------------- A/B

def snmp_counters():
    """This network namespace's IP-level counters (/proc/net/snmp), as
    {"Udp.OutDatagrams": n, ...}: every packet of the benchmark is here."""
    lines = open("/proc/net/snmp").read().splitlines()
    out = {}
    for head, vals in zip(lines[::2], lines[1::2]):
        proto = head.split(":")[0]
        for k, v in zip(head.split()[1:], vals.split()[1:]):
            out[f"{proto}.{k}"] = int(v)
    return out


def data_ab(world, lab):
    """--ab: select-only through each tailgres build given and the other
    systems, alternating within each round (the machine drifts between
    sittings), then the medians side by side. With --idle N, each system
    first holds and closes N idle sessions, as in the full run. Also counts the namespace's
    WireGuard datagrams per transaction: a relay that splits what it writes
    shows up there before it shows up in tps."""
    a = world.args
    variants = [("tailgres:" + Path(b).name, "tailgres", Path(b)) for b in a.ab.split(",") if b]
    variants += [(s, s, None) for s in a.systems if not s.startswith("tailgres")]
    default_bin = world.bins["tailgres"]
    rows = {}
    for rnd in range(1, a.runs + 1):
        for i, (label, name, binary) in enumerate(variants):
            world.bins["tailgres"] = binary or default_bin
            sys_ = TailnetSystem(lab, name, f"{rnd}{chr(ord('a') + i)}")
            try:
                pids = {"proxy": sys_.proc.pid}
                warm_up(world, sys_)
                if a.idle > 0:
                    # As the full run does before select-only: opened, held, closed.
                    idle_sessions(world, sys_, sys_.proc.pid, f"{label}-r{rnd}-idle")
                for c in a.clients:
                    before = snmp_counters()
                    with Perf(world, f"{label.replace(':', '-')}-r{rnd}-select_c{c}", pids):
                        res = again_on_failure(sys_, lambda: select_only(world, sys_, c, a.duration, pids))
                    after = snmp_counters()
                    if res.get("failed"):
                        log(f"{label} r{rnd} c{c}: failed: {res.get('error') or res.get('stderr', '')[-300:]}")
                        continue
                    n = res["transactions"]
                    res["udp_per_txn"] = (after["Udp.OutDatagrams"] - before["Udp.OutDatagrams"]) / n
                    rows.setdefault((label, c), []).append(res)
                    log(f"{label:24s} r{rnd} c{c:<3d} tps {res['tps']:9.1f}  lat {res['lat_avg_ms']:.3f} ms"
                        f"  p99 {res['lat_p99_ms']:.3f} ms  cpu/txn {res['proxy_cpu_us_per_txn']:6.1f} µs"
                        f"  cs/txn {res['proxy_ctxsw_per_txn']:5.2f}  udp/txn {res['udp_per_txn']:.2f}")
            finally:
                sys_.stop()
        variants = variants[1:] + variants[:1]  # rotate: nobody always goes first
    world.bins["tailgres"] = default_bin
    print(f"\nmedians of {a.runs} round(s), select-only, {a.duration} s each:")
    print(f"  {'system':24s} {'clients':>7s} {'tps':>9s} {'lat ms':>7s} {'p99 ms':>7s} {'cpu/txn µs':>10s}"
          f" {'cs/txn':>6s} {'udp/txn':>7s}")
    for (label, c), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"  {label:24s} {c:7d} {med('tps'):9.1f} {med('lat_avg_ms'):7.3f} {med('lat_p99_ms'):7.3f}"
              f" {med('proxy_cpu_us_per_txn'):10.1f} {med('proxy_ctxsw_per_txn'):6.2f} {med('udp_per_txn'):7.2f}")


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description="tailgres benchmark (use bench/run)")
    ap.add_argument("--quick", action="store_true", help="small and short, for developing the harness")
    ap.add_argument("--soak", action="store_true", help="N short tailgres sessions, then check the idle state")
    ap.add_argument("--runs", type=int, help="rounds per system (median over them); default 5")
    ap.add_argument("--duration", type=int, help="seconds per pgbench run; default 15")
    ap.add_argument("--scale", type=int, help="pgbench scale; default 10")
    ap.add_argument("--copy-mb", type=int, help="COPY size each way, MB; default 512")
    ap.add_argument("--idle", type=int, help="idle sessions; default 1000")
    ap.add_argument("--clients", help="select-only client counts; default 1,8,32")
    ap.add_argument("--connect-clients", type=int, default=8, help="clients for the new-connection run")
    ap.add_argument("--pgbench-jobs", type=int, default=2, help="pgbench threads at most")
    ap.add_argument("--idle-concurrency", type=int, default=32, help="idle sessions opened at once")
    ap.add_argument("--settle", type=float, default=12.0, help="seconds idle before reading settled figures")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up pgbench per system and round")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="subset of " + ",".join(ALL_SYSTEMS))
    ap.add_argument("--derp", action="store_true", help="relay the tailnet through DERP (default: direct UDP)")
    ap.add_argument("--gctrace", action="store_true",
                    help="run the Go-based servers with GODEBUG=gctrace=1 and report their live heap per idle "
                         "session (waits for a GC, up to --gc-wait s, after the idle sessions are open)")
    ap.add_argument("--gc-wait", type=float, default=130)
    ap.add_argument("--tailgres-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for tailgres, e.g. GOMAXPROCS=1 (experiments; repeatable)")
    ap.add_argument("--ab", metavar="BIN[,BIN...]",
                    help="data-phase A/B instead of the full run: select-only at --clients through each of "
                         "these tailgres builds and the other --systems (default pgproxy), alternating, "
                         "--runs rounds on one lab (with --perf, each measurement profiled)")
    ap.add_argument("--perf", action="store_true",
                    help="profile each measurement with perf (bench/results/perf-<timestamp>/)")
    ap.add_argument("--soak-sessions", type=int, default=100_000)
    ap.add_argument("--soak-role", choices=["scram", "trust"], default="scram")
    ap.add_argument("--soak-gc-wait", type=float, default=150,
                    help="seconds to wait for Go's forced GC after the soak")
    ap.add_argument("--workdir", help="where the world's temporary directory goes (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, audit)")
    ap.add_argument("--out", help="JSON results file (default: bench/results/<timestamp>.json)")
    a = ap.parse_args()
    q = a.quick
    a.runs = a.runs or (1 if q else 5)
    a.duration = a.duration or (3 if q else 15)
    a.scale = a.scale or 10
    a.copy_mb = a.copy_mb or (50 if q else 512)
    a.idle = a.idle if a.idle is not None else (100 if q else 0 if a.ab else 1000)
    a.clients = [int(c) for c in (a.clients or "1,8,32").split(",")]
    if a.ab and a.systems == ",".join(SYSTEMS):
        a.systems = "pgproxy"
    a.systems = [s for s in a.systems.split(",") if s]
    if q:
        a.settle = min(a.settle, 3.0)
        a.warmup = min(a.warmup, 2)
        a.soak_sessions = min(a.soak_sessions, 2000)
    for s in a.systems:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system {s!r}")
    return a


def main():
    a = parse_args()
    require_loopback_only()
    started = datetime.datetime.now(datetime.timezone.utc)
    world = World(a)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "command": "bench/run " + " ".join(sys.argv[1:]),
        "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "tailscale_version": TAILSCALE_VERSION,
        "tailnet_path": "DERP relay" if a.derp else "direct UDP (WireGuard over loopback)",
    }
    results = {}
    try:
        lab = Lab(world)
        meta["postgres_settings"] = lab.pg_settings
        lab.prepare_data(bulk=not (a.soak or a.ab))
        if a.ab:
            data_ab(world, lab)
            return
        if a.soak:
            meta["soak"] = soak(world, lab)
            report_soak(meta, a)
            return
        conninfos = {}
        order = list(a.systems)
        for rnd in range(1, a.runs + 1):
            for name in order:
                log(f"=== round {rnd}/{a.runs}: {name}")
                env = {"GODEBUG": "gctrace=1"} if a.gctrace else {}
                if name.startswith("tailgres"):
                    env.update(kv.split("=", 1) for kv in a.tailgres_env)
                sys_ = DirectSystem(lab) if name == "direct" else TailnetSystem(lab, name, rnd, extra_env=env)
                if rnd == 1:
                    conninfos[name] = {
                        "select-only, copy, idle (asyncpg, same role/TLS)": sys_.conninfo(SCRAM),
                        "new connection per transaction": [sys_.conninfo(SCRAM), sys_.conninfo(TRUST)],
                        "server": getattr(sys_, "argv", None),
                    }
                try:
                    results.setdefault(name, []).append(measure(world, lab, sys_, rnd))
                finally:
                    sys_.stop()
            order = order[1:] + order[:1]  # rotate: nobody always goes first
        meta["conninfo"] = conninfos
        meta["wall_minutes"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
        meta["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
        report(meta, results, a)
    finally:
        world.close()


if __name__ == "__main__":
    main()
