"""The benchmark's world: the processes it starts (lab control plane and
database, the systems under test and their client nodes), how to reach
each system with libpq, and what /proc says about a process."""

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_lab_env(path):
    """KEY=VALUE lines of path (blank lines and # comments skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, sep, v = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: not KEY=VALUE: {line}")
            env[k] = v
    return env


# The knobs every tailnet process runs with (docs/lab.md, "The lab environment"); the Go
# runtime reads them once, at start. vendor/cmd/tslab/lab.env is the one list.
TS_ENV = read_lab_env(ROOT / "vendor" / "cmd" / "tslab" / "lab.env")
TAILSCALE_VERSION = "v1.102.5"  # vendor/go.mod; pgproxy is installed at this version
DB = "app"
SCRAM = ("role_scram", "scram-pass")
TRUST = ("role_trust", None)
# Identity login (tailgres only): no password; tailgres signs a client
# certificate the lab database accepts for this role.
IDENTITY = ("role_identity", None)
# --auth scram-verifier (tailgres only): a SCRAM role of its own, looked up
# as the lab database's tailgres_auth role; clients require channel binding.
VERIFIER = ("role_verifier", "verifier-pass")
VERIFIER_LOOKUP_PASSWORD = "lookup-pass"  # tailgres-lab's lookup role
SERVER_NAME = "db.lab.test"
PG_PORT_ON_TAILNET = 5432
# tailgres's identity-login route (login = "identity"), beside the main one,
# and its scram-verifier route.
IDENTITY_PORT_ON_TAILNET = 5433
VERIFIER_PORT_ON_TAILNET = 5434
CAPABILITY = "tailgres.dev/cap/postgres"
READY_TIMEOUT = 120.0
# libpq must never read this machine's ~/.pgpass; /dev/null makes it warn
# on every trust connection ("not a plain file"), a missing file does not.
NO_PGPASS = "/nonexistent/tailgres-bench-pgpass"

SYSTEMS = ["direct", "floor", "tailgres", "pgproxy"]
# Run only when named in --systems: tailgres with statement audit on for
# every session (--audit-statements), beside "tailgres" for its cost.
EXTRA_SYSTEMS = ["tailgres-stmt"]
ALL_SYSTEMS = SYSTEMS + EXTRA_SYSTEMS


# ---------------------------------------------------------------- helpers

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg):
    log("error: " + msg)
    sys.exit(1)


def require_loopback_only():
    ifaces = [l.split(":")[0].strip() for l in open("/proc/self/net/dev").read().splitlines()[2:]]
    if any(i != "lo" for i in ifaces):
        die(f"refusing to run outside a loopback-only network namespace (found {ifaces}); use bench/run")
    for k, v in TS_ENV.items():
        if os.environ.get(k) != v:
            die(f"{k}={v} must be in the environment; use bench/run")


def context_switches(pid):
    """Voluntary + involuntary context switches of all of pid's threads
    (threads that ended are not counted)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
        except OSError:
            pass  # the thread ended meanwhile
    return n


def proc_stats(pid):
    """RSS (bytes), OS threads, open fds and CPU seconds (user+system) of pid."""
    st = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            st[k] = int(v.split()[0])
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return {
        "rss": st["VmRSS"] * 1024,
        "threads": st["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu": cpu,
    }


class Proc:
    """A child process; stderr to a log file; optionally reads its first
    stdout line as a ready JSON document."""

    def __init__(self, name, argv, world, env=None, ready_line=False):
        self.name = name
        self.log = world.dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
            env=full_env,
        )
        world.procs.append(self)
        self.ready = None
        if ready_line:
            self.ready = self._read_ready()

    def _read_ready(self):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        deadline = time.time() + READY_TIMEOUT
        buf = b""
        while b"\n" not in buf:
            if self.p.poll() is not None:
                die(f"{self.name} exited ({self.p.returncode}) before it was ready:\n{self.tail()}")
            if time.time() > deadline:
                die(f"{self.name} not ready after {READY_TIMEOUT:.0f}s:\n{self.tail()}")
            if sel.select(0.2):
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    continue
                buf += chunk
        sel.close()
        return json.loads(buf.split(b"\n", 1)[0])

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def tail(self, n=30):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class World:
    """Everything this benchmark started; torn down in reverse order."""

    def __init__(self, args):
        self.args = args
        base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="tailgres-bench.", dir=base))
        os.chmod(self.dir, 0o755)  # the lab database runs as 'postgres' and must get in
        self.procs = []
        self.bins = find_binaries(args)
        self.perf_dir = ROOT / "bench" / "results" / ("perf-" + time.strftime("%Y%m%dT%H%M%S"))

    def close(self):
        for p in reversed(self.procs):
            try:
                p.stop(signal.SIGINT if p.name == "postgres" else signal.SIGTERM)
            except Exception as e:  # keep tearing down the rest
                log(f"stopping {p.name}: {e}")
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log(f"kept {self.dir}")


def find_binaries(args):
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    bins = {
        "tailgres": target / "release" / "tailgres",
        "tailgres-lab": target / "release" / "tailgres-lab",
        "tslab": target / "tslab",
        "pgproxy": ROOT / "bench" / ".gobin" / "pgproxy",
        "pgbench": Path(shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"),
        "psql": Path(shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"),
    }
    for name, p in bins.items():
        if not p.exists():
            die(f"{name} not found at {p}: run bench/run (it builds everything first)")
    return bins


# ---------------------------------------------------------------- the world

class Lab:
    """Control plane and database, shared by every system."""

    def __init__(self, world):
        self.world = world
        a = world.args
        b = world.bins
        log("starting the loopback tailnet (tslab control)")
        self.control = Proc("control", [str(b["tslab"]), "control"], world, env=TS_ENV, ready_line=True)
        self.control_url = self.control.ready["control_url"]
        self.admin_url = self.control.ready["admin_url"]
        log("starting PostgreSQL with TLS (tailgres-lab pg)")
        settings = [
            f"max_connections={a.idle + 200}",
            "shared_buffers=256MB",
            # Keep checkpoints out of the measurements (data is throwaway).
            "checkpoint_timeout=1h",
            "max_wal_size=20GB",
        ]
        argv = [str(b["tailgres-lab"]), "pg", f"--dir={world.dir / 'pg'}"]
        argv += [f"--set={s}" for s in settings]
        self.pg = Proc("postgres", argv, world, ready_line=True)
        r = self.pg.ready
        self.pg_port = r["port"]
        self.ca_file = r["ca_file"]
        self.identity_ca = (r["identity_ca_file"], r["identity_key_file"])
        self.socket_dir = r["socket_dir"]
        self.pg_settings = settings
        self.bulk_file = world.dir / "bulk.copy"
        self.bulk_bytes = 0

    def set_global_caps(self, caps):
        """The lab's global app capabilities (a grant from every source to
        every node); {} clears them."""
        req = urllib.request.Request(f"{self.admin_url}/caps/global", method="POST",
                                     data=json.dumps(caps).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def admin_sql(self, sql):
        out = subprocess.run(
            [str(self.world.bins["psql"]), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
             f"host={self.socket_dir} port={self.pg_port} user=postgres dbname={DB}"],
            capture_output=True, text=True)
        if out.returncode != 0:
            die(f"admin SQL failed: {sql}\n{out.stderr}")
        return out.stdout.strip()

    def prepare_data(self, bulk=True):
        a = self.world.args
        direct = DirectSystem(self)
        log(f"pgbench -i -s {a.scale}")
        run_pgbench(self.world, direct.env(SCRAM), ["-i", "-q", "-s", str(a.scale)], check=True)
        self.admin_sql("drop role if exists role_verifier;"
                       "set password_encryption = 'scram-sha-256';"
                       f"create role {VERIFIER[0]} login password '{VERIFIER[1]}'")
        self.admin_sql("grant select on all tables in schema public to role_trust, role_identity, role_verifier")
        if not bulk:
            return
        # ~105 bytes of COPY text per row.
        rows = int(a.copy_mb * 1_000_000 / 105)
        log(f"bulk table: {rows} rows (~{a.copy_mb} MB of COPY text)")
        self.admin_sql(
            "drop table if exists bulk_out, bulk_in;"
            "create table bulk_out (id bigint, payload text);"
            f"insert into bulk_out select i, repeat(md5(i::text), 3) from generate_series(1, {rows}) i;"
            "create unlogged table bulk_in (like bulk_out);"
            "grant select on all tables in schema public to role_trust, role_scram;"
            "grant all on bulk_in to role_trust, role_scram;")
        self.admin_sql("vacuum analyze")
        self.admin_sql("checkpoint")
        with open(self.bulk_file, "wb") as f:
            subprocess.run([str(self.world.bins["psql"]), "-X", "-q", "-c", "copy bulk_out to stdout"],
                           env=direct.env(SCRAM), stdout=f, check=True)
        self.bulk_bytes = self.bulk_file.stat().st_size
        log(f"bulk COPY text: {self.bulk_bytes / 1e6:.0f} MB")

    def delete_node(self, name):
        try:
            req = urllib.request.Request(f"{self.admin_url}/nodes/{name}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).read()
        except Exception as e:
            log(f"deleting node {name}: {e}")

    def node_ip(self, name, proc):
        deadline = time.time() + READY_TIMEOUT
        while time.time() < deadline:
            if not proc.alive():
                die(f"{proc.name} exited ({proc.p.returncode}):\n{proc.tail()}")
            try:
                with urllib.request.urlopen(f"{self.admin_url}/nodes/{name}", timeout=5) as r:
                    n = json.load(r)
                v4 = [a for a in n.get("addresses", []) if "." in a]
                if v4:
                    return v4[0]
            except Exception:
                pass
            time.sleep(0.2)
        die(f"{name} never registered with the lab control server:\n{proc.tail()}")


def libpq_env(host, port, role, extra=None):
    user, password = role
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PG"):
            del env[k]
    env.update({
        "PGHOST": host, "PGPORT": str(port), "PGUSER": user, "PGDATABASE": DB,
        "PGSSLMODE": "require", "PGCHANNELBINDING": "disable",
        "PGPASSFILE": NO_PGPASS, "PGSERVICEFILE": "/dev/null", "PGCONNECT_TIMEOUT": "30",
        "PGAPPNAME": "bench",
    })
    if password:
        env["PGPASSWORD"] = password
    env.update(extra or {})
    return env


def conninfo(host, port, role):
    return (f"host={host} port={port} user={role[0]} dbname={DB} sslmode=require "
            f"channel_binding=disable" + (" password=…" if role[1] else ""))


class DirectSystem:
    name = "direct"

    def __init__(self, lab):
        self.lab = lab
        self.host, self.port = "127.0.0.1", lab.pg_port
        self.proc = None

    def env(self, role):
        return libpq_env(self.host, self.port, role)

    def conninfo(self, role):
        return conninfo(self.host, self.port, role)

    def dial_timeouts(self):
        return 0

    def stop(self):
        pass


class TailnetSystem:
    """A server on the lab tailnet and a fresh client node forwarding a
    loopback port to it."""

    def __init__(self, lab, name, rnd, extra_env=None):
        self.lab = lab
        self.name = name
        w = lab.world
        b = w.bins
        self.hostname = f"{name}-r{rnd}"
        state = w.dir / f"state-{self.hostname}"
        up = f"127.0.0.1:{lab.pg_port}"
        if name == "floor":
            argv = [str(b["tslab"]), "node", f"--control-url={lab.control_url}", f"--hostname={self.hostname}",
                    f"--state-dir={state}", f"--serve={PG_PORT_ON_TAILNET}={up}"]
            if not w.args.derp:
                argv.append("--direct")
            self.proc = Proc(self.hostname, argv, w, env=dict(TS_ENV, **(extra_env or {})), ready_line=True)
        elif name in ("tailgres", "tailgres-stmt"):
            # A second route, on its own port, logs in by identity (only
            # the identity connection figure uses it).
            config = w.dir / f"{self.hostname}.toml"
            config.write_text(
                "[[route]]\n"
                'name = "identity"\n'
                f"port = {IDENTITY_PORT_ON_TAILNET}\n"
                f'upstream = "{up}"\n'
                f'upstream-server-name = "{SERVER_NAME}"\n'
                f'upstream-ca = ["{lab.ca_file}"]\n'
                'login = "identity"\n'
                f'identity-ca-cert = "{lab.identity_ca[0]}"\n'
                f'identity-ca-key = "{lab.identity_ca[1]}"\n'
                "[[route]]\n"
                'name = "verifier"\n'
                f"port = {VERIFIER_PORT_ON_TAILNET}\n"
                f'upstream = "{up}"\n'
                f'upstream-server-name = "{SERVER_NAME}"\n'
                f'upstream-ca = ["{lab.ca_file}"]\n'
                'auth = "scram-verifier"\n')
            lookup_pw = w.dir / f"{self.hostname}.verifier-password"
            lookup_pw.write_text(VERIFIER_LOOKUP_PASSWORD)
            lookup_pw.chmod(0o600)
            argv = [str(b["tailgres"]), f"--config={config}", f"--upstream={up}",
                    f"--upstream-server-name={SERVER_NAME}",
                    f"--upstream-ca={lab.ca_file}", f"--hostname={self.hostname}", f"--state-dir={state}",
                    f"--control-url={lab.control_url}", f"--audit-log={w.dir / (self.hostname + '.audit.jsonl')}",
                    f"--port={PG_PORT_ON_TAILNET}", f"--max-sessions={w.args.idle + 1000}",
                    f"--verifier-password-file={lookup_pw}"]
            if name == "tailgres-stmt":
                argv.append("--audit-statements")
            self.audit_log = w.dir / (self.hostname + '.audit.jsonl')
            self.proc = Proc(self.hostname, argv, w, env=dict(TS_ENV, RUST_LOG="warn", **(extra_env or {})))
        elif name == "pgproxy":
            # tsnet reads TS_CONTROL_URL from the environment; the lab
            # control server needs no auth key.
            argv = [str(b["pgproxy"]), f"--hostname={self.hostname}", f"--state-dir={state}",
                    f"--upstream-addr={up}", f"--upstream-ca-file={lab.ca_file}",
                    f"--port={PG_PORT_ON_TAILNET}", "--debug-port=0"]
            self.proc = Proc(self.hostname, argv, w,
                             env=dict(TS_ENV, TS_CONTROL_URL=lab.control_url, **(extra_env or {})))
        else:
            raise ValueError(name)
        self.argv = argv
        self.ip = lab.node_ip(self.hostname, self.proc)
        self.client_name = f"client-{self.hostname}"
        cargv = [str(b["tslab"]), "node", f"--control-url={lab.control_url}", f"--hostname={self.client_name}",
                 f"--state-dir={w.dir / ('state-' + self.client_name)}",
                 f"--forward=127.0.0.1:0={self.ip}:{PG_PORT_ON_TAILNET}", "--dial-timeout=20s"]
        if name in ("tailgres", "tailgres-stmt"):
            cargv.append(f"--forward=127.0.0.1:0={self.ip}:{IDENTITY_PORT_ON_TAILNET}")
            cargv.append(f"--forward=127.0.0.1:0={self.ip}:{VERIFIER_PORT_ON_TAILNET}")
        if not w.args.derp:
            cargv.append("--direct")
        self.client = Proc(self.client_name, cargv, w, env=TS_ENV, ready_line=True)
        self.host, port = self.client.ready["forwards"][0]["listen"].rsplit(":", 1)
        self.port = int(port)
        # The identity route's forward (tailgres only).
        forwards = self.client.ready["forwards"]
        self.identity_port = int(forwards[1]["listen"].rsplit(":", 1)[1]) if len(forwards) > 1 else None
        self.verifier_port = int(forwards[2]["listen"].rsplit(":", 1)[1]) if len(forwards) > 2 else None
        self.wait_answering()

    def wait_answering(self):
        """An SSLRequest through the forward gets its one-byte answer once
        the whole path works."""
        deadline = time.time() + READY_TIMEOUT
        while time.time() < deadline:
            for p in (self.proc, self.client):
                if not p.alive():
                    die(f"{p.name} exited ({p.p.returncode}):\n{p.tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=10) as s:
                    s.settimeout(10)
                    s.sendall(bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F]))
                    if s.recv(1) in (b"S", b"N"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        die(f"{self.name} did not answer through the tailnet:\n{self.proc.tail()}")

    def route_port(self, role):
        return {IDENTITY: self.identity_port, VERIFIER: self.verifier_port}.get(role, self.port)

    def env(self, role):
        # Verifier mode is for strict clients: channel binding required.
        extra = {"PGCHANNELBINDING": "require"} if role == VERIFIER else None
        return libpq_env(self.host, self.route_port(role), role, extra)

    def conninfo(self, role):
        return conninfo(self.host, self.route_port(role), role)

    def dial_timeouts(self):
        """Connections the client node gave up on (its --dial-timeout)."""
        try:
            return self.client.log.read_text(errors="replace").count("dial: context deadline exceeded")
        except OSError:
            return 0

    def stop(self):
        self.client.stop()
        self.proc.stop()
        self.lab.delete_node(self.client_name)
        self.lab.delete_node(self.hostname)

def run_pgbench(world, env, args, check=False, timeout=None):
    out = subprocess.run([str(world.bins["pgbench"])] + args, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        die(f"pgbench {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out

# Go 1.26 places its heap at a random 64 MB-aligned address below 2^46
# (runtime/malloc.go, randomizeHeapBase); glibc's mmap area, thread stacks
# and PIE binaries sit far above that on x86-64.
GO_ARENA = (0, 1 << 46)


def rss_breakdown(pid):
    """Resident memory by kind of mapping (kB), from /proc/PID/smaps: the Go
    heap (anonymous mappings below 2^46), the brk heap (glibc's main malloc
    arena), other anonymous memory (glibc's per-thread arenas, thread
    stacks, Go runtime metadata) and file-backed pages."""
    out = {"go_arena": 0, "brk_heap": 0, "anon_other": 0, "file": 0}
    kind = None
    for line in open(f"/proc/{pid}/smaps"):
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            parts = line.split()
            start = int(parts[0].split("-")[0], 16)
            path = parts[5] if len(parts) > 5 else ""
            if GO_ARENA[0] <= start < GO_ARENA[1] and path == "":
                kind = "go_arena"
            elif path == "[heap]":
                kind = "brk_heap"
            elif path == "" or path.startswith("["):
                kind = "anon_other"
            else:
                kind = "file"
        elif first == "Rss:":
            out[kind] += int(line.split()[1])
    return out

def machine():
    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "ram_GiB": round(mem / 2**30, 1),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "pgbench": sh("pgbench", "--version"),
        "postgres": sh(str(Path(sh("pg_config", "--bindir") or "/usr/lib/postgresql/15/bin") / "postgres"), "--version"),
        "go": sh("go", "version"),
        "python": platform.python_version(),
    }


def git_commit():
    def g(*a):
        return subprocess.run(["git", "-C", str(ROOT)] + list(a), capture_output=True, text=True).stdout.strip()
    commit = g("rev-parse", "HEAD")
    dirty = bool(g("status", "--porcelain", "--untracked-files=no"))
    return commit + ("-dirty" if dirty else "")
