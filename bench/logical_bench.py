"""Logical backup benchmark (not a test): our backup and restore of a pgbench database next to raw pg_dump/pg_restore.

    .venv/bin/python bench/logical_bench.py [--case single|multi|both|fingerprint|fixed] [--scale 50]
                                            [--version 15|17|18]
                                            [--repeat 1] [--workdir DIR] [--pg-conf KEY=VALUE ...]
                                            [--multi-scale 20] [--jobs 2 --jobs 4]

Run it from the repository root (it reuses ``tests.pgservers.PgManager``; as root the server runs as an unprivileged
user). Steps, on a throwaway server of ``--version`` (default 15, Debian's binaries):

1. ``pgbench -i -s SCALE`` into a fresh database, then ``pg_dump -Fc -Z0 --dbname=... > /dev/null`` (the baseline,
   with the exact argv our backup runs) and our first backup (``database=bench``, default options, i.e. manifest,
   globals and the dump) into a fresh encrypted local store;
2. realistic changes: 1 % new rows appended to ``pgbench_history`` and ``pgbench_accounts`` and a clustered
   ``UPDATE`` of 1 % of the accounts, then per round the baseline ``pg_dump`` again, a first backup of the changed
   database into a fresh store (the control) and our second backup (new stored bytes from the snapshot header's
   ``new_stored_bytes``). The control is there because the first backups of step 1 ran earlier: on this shared
   machine the load of a minute later made second backups look slower than first ones (2026-12-03: 6.25 s against
   3.80 s, raw ``pg_dump`` 3.80 against 2.75 s); interleaved in one window, in process and through the CLI, the
   second backup was as fast or faster, with less CPU, and a second backup on a copy of the store was no slower
   than one on the original (the copy's index cache is as warm as the original's);
3. ``pg_restore`` of a local dump file into a new database (baseline) next to our ``logical_restore`` of the second
   snapshot into another new database (``database=<new>, databases=bench``, both pre-created), then row checks.

Every timed operation runs in a fresh child process (its own session, killed on interrupt) that times it
internally; peak RSS and CPU are that child's own (``RUSAGE_SELF``) and its tools' (``RUSAGE_CHILDREN``). Ours
includes unlocking the store with a passphrase (default Argon2id cost, ``PGPLAKAR_KDF`` is ignored), as a user
would, and as the CLI and the operators do it: on a thread while the backup connects and starts its tools
(store/opening.py; ``unlock_s`` is when the store was open). A CHECKPOINT precedes every timed step. With
``--repeat N`` each timed step runs N times (interleaved, baseline first; second backups each on a copy of the
post-first-backup store) and the median is shown.
The server, the store and all temp files are removed at the end, also on failure or Ctrl-C.

``--case multi`` (the ``jobs`` option, issue 13) instead builds 4 databases of different sizes (``pgbench -i`` at
50 %, 25 %, 15 % and 10 % of ``--multi-scale``, plus an ``events`` table of text rows in each) and times, side by
side: raw ``pg_dump`` of the 4 one after the other, raw ``pg_dump`` of the 4 all at once (the floor), our backup of
the 4 (``exclude_databases`` = every other database) with ``jobs=1`` and with each ``--jobs`` value, every backup
into a fresh store; wall time, CPU (ours, the tools' and the benchmark server's) and peak RSS. ``--case both``
runs both cases on one server.

Every step also measures the benchmark server's CPU (bench/server_cpu.py), and each target gets its CPU floor: the
CPU seconds of ours, the tools and the server divided by the cores, the least wall time any schedule of that work
allows. When the floor is above the target's time, better overlap or more parallelism cannot meet it; only less
CPU can.

``--case fixed`` (issue 13: the fixed cost of a run, ≤ 0.3 s with a raw key) times the ``pgplakar`` CLI itself, a
fresh interpreter each time as a user or a cron job runs it: ``pgplakar backup`` of an almost empty database
(``database=...``, one table of 100 rows) with a raw key next to raw ``pg_dump`` of the same database; the difference
is the fixed cost: start-up and imports, unlock, catalog, manifest, globals, fingerprints, commit, exit. For the
break-down it also times ``python -c pass`` and the imports alone.

``--case fingerprint`` (issue 12) times, on the ``--scale`` pgbench database: raw ``pg_dump`` (the baseline), our
backup with ``fingerprint=catalog`` (the default), ``counts`` and ``full``, each into a fresh store; then a plain
``logical_restore`` of the ``full`` snapshot into a new database next to ``verify_snapshot`` of it (a throwaway
server of the benchmark's own binaries: initdb, restore, recompute and compare the fingerprints, remove). Its table
adds the benchmark server's CPU over each step (``/proc`` of its postmaster and backends), where the ``counts`` and
``full`` scans run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.server_cpu import descendants, server_cpu  # noqa: E402 (after the sys.path line)

PASS = "bench passphrase: correct horse battery staple"
DB = "bench"
TARGET = 1.2  # from the issue: backup <= 1.2x raw pg_dump, restore <= 1.2x local pg_restore
MULTI_TARGET = 1.5  # issue 13: ours jobs=2 <= 1.5x raw pg_dump of every database at once
MULTI_WEIGHTS = (0.5, 0.25, 0.15, 0.10)  # share of --multi-scale per database: different sizes
MULTI_DBS = tuple(f"multi_{i + 1}" for i in range(len(MULTI_WEIGHTS)))
DEFAULT_CONF = {"shared_buffers": "128MB"}  # PostgreSQL's own default (the test servers use 32MB)


# ------------------------------------------------------------------------------------------------------------------
# Child side: one operation, one JSON line on stdout


TOOLS = ("pg_dump", "pg_dumpall", "pg_restore", "psql")


def _hwm_kib(pid: int | str = "self") -> int:
    """Peak RSS (VmHWM) of one process's current address space, 0 when it is gone.

    Not ``ru_maxrss``: Linux carries the parent's peak into a vfork()ed child across exec, so ``ru_maxrss`` of a
    tool started from a 100 MiB Python process reads 100 MiB whatever the tool really used."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ToolPeak(threading.Thread):
    """Samples VmHWM of the PostgreSQL client tools below this process (every 20 ms, so a tool that lives less
    than that, e.g. pg_dumpall --globals-only, may be missed; the big ones are not)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.wait(0.02):
            for pid in descendants(me):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                if comm in TOOLS:  # a vfork()ed child before exec would show our own address space
                    self.peak_kib = max(self.peak_kib, _hwm_kib(pid))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kib


class Meter:
    """CPU (ours and our tools') and peak RSS of one timed step in a child process."""

    def __init__(self) -> None:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu0 = (me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime)
        self.peak_before_reset = 0
        self.tools = ToolPeak()
        self.tools.start()

    def reset_peak(self) -> None:
        """Restart our own peak RSS from here (after the Argon2id unlock), keeping the overall peak."""
        self.peak_before_reset = _hwm_kib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def done(self) -> dict[str, float]:
        tool_kib = self.tools.stop()
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = _hwm_kib()
        return {"rss_mib": max(after, self.peak_before_reset) / 1024, "rss_after_unlock_mib": after / 1024,
                "tool_rss_mib": tool_kib / 1024, "cpu_s": me.ru_utime + me.ru_stime - self.cpu0[0],
                "tool_cpu_s": kids.ru_utime + kids.ru_stime - self.cpu0[1]}


def child_tool(spec: dict[str, Any]) -> dict[str, Any]:
    """A client tool alone, stdout to /dev/null or a file."""
    target = spec.get("stdout") or os.devnull
    meter = Meter()
    t0 = time.perf_counter()
    with open(target, "wb") as out:
        res = subprocess.run(spec["argv"], env=spec["env"], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.PIPE, check=False)
    secs = time.perf_counter() - t0
    usage = meter.done()
    if res.returncode:
        raise SystemExit(f"{spec['argv'][0]} exited {res.returncode}: {res.stderr.decode(errors='replace')[-3000:]}")
    out_bytes = os.path.getsize(target) if spec.get("stdout") else None
    return {"seconds": secs, "bytes": out_bytes, **usage}


def child_tools(spec: dict[str, Any]) -> dict[str, Any]:
    """Several tools to /dev/null, one after the other or (``parallel``) all started at once."""
    meter = Meter()
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as out:
        if spec["parallel"]:
            procs = [subprocess.Popen(argv, env=spec["env"], stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.DEVNULL) for argv in spec["argvs"]]
            codes = [p.wait() for p in procs]
        else:
            codes = [subprocess.run(argv, env=spec["env"], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.DEVNULL, check=False).returncode for argv in spec["argvs"]]
    secs = time.perf_counter() - t0
    usage = meter.done()
    if any(codes):
        raise SystemExit(f"a tool failed: exit codes {codes}")
    return {"seconds": secs, **usage}


def child_backup(spec: dict[str, Any]) -> dict[str, Any]:
    from airflow_provider_pgplakar.pg.logical import logical_backup
    from airflow_provider_pgplakar.pg.options import parse_source_options
    from airflow_provider_pgplakar.pg.session import dump_path
    from airflow_provider_pgplakar.store.repo import Store

    opts = parse_source_options("postgres://", spec["options"])
    meter = Meter()
    t0 = time.perf_counter()
    unlocked: list[float] = []

    def unlock() -> Store:  # as the CLI and the operators open it: on a thread, beside the backup's start-up
        st = Store.open(spec["store"], PASS, cache_dir=spec["cache"])
        unlocked.append(time.perf_counter() - t0)
        meter.reset_peak()
        return st

    with _opening(unlock) as opening:
        res = logical_backup(opening, opts)
    secs = time.perf_counter() - t0
    usage = meter.done()
    unlock_s = unlocked[0]
    with Store.open(spec["store"], PASS, cache_dir=spec["cache"]) as st:  # untimed
        stats = st.load_snapshot(res.snapshot_id).header["stats"]
        if opts.database is not None:
            dump_bytes = st.find_record(res.snapshot_id, dump_path(1, DB)).size
        else:
            dump_bytes = sum(r.size for r in st.records(res.snapshot_id) if r.path.endswith(".dump"))
    return {"seconds": secs, "unlock_s": unlock_s, "snapshot": res.snapshot_id, "stats": stats,
            "dump_bytes": dump_bytes, **usage}


def _opening(open_store: Callable[[], Any]) -> Any:
    """The store as a backup of the CLI or an operator gets it (store/opening.py)."""
    from airflow_provider_pgplakar.store.opening import OpeningStore

    return OpeningStore(open_store)


def child_restore(spec: dict[str, Any]) -> dict[str, Any]:
    from airflow_provider_pgplakar.pg.options import parse_restore_options
    from airflow_provider_pgplakar.pg.restore import logical_restore
    from airflow_provider_pgplakar.store.repo import Store

    opts = parse_restore_options("postgres://", spec["options"])
    meter = Meter()
    t0 = time.perf_counter()
    with Store.open(spec["store"], PASS, cache_dir=spec["cache"]) as st:
        unlock = time.perf_counter() - t0
        meter.reset_peak()
        summary = logical_restore(st, spec["snapshot"], opts)
    secs = time.perf_counter() - t0
    details = [r.detail for r in summary.results if r.detail]
    return {"seconds": secs, "unlock_s": unlock, "ok": summary.ok, "details": details, **meter.done()}


def child_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """``verify_snapshot`` on a throwaway server of ``pg_bin_dir`` (started, restored into, compared, removed)."""
    from airflow_provider_pgplakar.pg.verify import verify_snapshot
    from airflow_provider_pgplakar.store.repo import Store

    meter = Meter()
    t0 = time.perf_counter()
    with Store.open(spec["store"], PASS, cache_dir=spec["cache"]) as st:
        unlock = time.perf_counter() - t0
        meter.reset_peak()
        report = verify_snapshot(st, spec["snapshot"], pg_bin_dir=spec["pg_bin_dir"])
    secs = time.perf_counter() - t0
    usage = meter.done()
    if not report.ok:
        raise SystemExit(f"verify of {spec['snapshot'][:8]} FAILED:\n{report.text()}")
    findings = sum(len(d.findings) for d in report.databases)
    return {"seconds": secs, "unlock_s": unlock, "ok": report.ok, "level": report.level, "server": report.server,
            "findings": findings, **usage}


CHILD_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tool": child_tool, "tools": child_tools, "backup": child_backup, "restore": child_restore,
    "verify": child_verify}


def child_main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    spec = json.loads(sys.stdin.read())
    print(json.dumps(CHILD_OPS[spec["op"]](spec)))


# ------------------------------------------------------------------------------------------------------------------
# Parent side


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def spawn(argv: list[str], env: dict[str, str], stdin_text: str | None = None) -> tuple[str, float]:
    """Run ``argv`` in its own session (so Ctrl-C reaches only us); kill its whole group if we are interrupted.

    Returns (stdout, wall seconds); exits with its stderr when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin_text)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{Path(argv[0]).name} {' '.join(argv[1:3])} failed ({proc.returncode}):\n{err[-4000:]}")
    return out, wall


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out, wall = spawn([sys.executable, str(Path(__file__).resolve()), "--child"], _child_env(), json.dumps(spec))
    res = json.loads(out.strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median time and CPU, max RSS over repetitions; other fields from the last run."""
    out = dict(runs[-1])
    for key in ("seconds", "process_s", "cpu_s", "tool_cpu_s", "unlock_s", "server_cpu_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in runs)
    for key in ("rss_mib", "rss_after_unlock_mib", "tool_rss_mib"):
        out[key] = max(r[key] for r in runs)
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


class Bench:
    def __init__(self, server: Any, work: Path, scale: int, repeat: int) -> None:
        self.server = server
        self.work = work
        self.scale = scale
        self.repeat = repeat
        self.pg_dump = str(server.bin("pg_dump"))
        self.pg_restore = str(server.bin("pg_restore"))
        self.tool_env = server.env()
        self.conn_opts = {"host": server.host, "port": str(server.port), "username": server.superuser,
                          "password": server.password, "pg_bin_dir": str(server.bin_dir)}

    # -- database helpers ------------------------------------------------------------------------------------------
    def sql(self, query: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with self.server.connect(dbname) as c:
            cur = c.execute(query)
            return cur.fetchall() if cur.description else []

    def checkpoint(self) -> None:
        self.sql("CHECKPOINT")

    def create_db(self, name: str) -> None:
        self.sql(f'CREATE DATABASE "{name}"')

    def drop_db(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}"')

    def fingerprint(self, dbname: str) -> tuple[Any, ...]:
        return self.sql("SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT sum(abalance) FROM pgbench_accounts),"
                        " (SELECT count(*) FROM pgbench_history), (SELECT count(*) FROM pgbench_tellers),"
                        " (SELECT count(*) FROM pgbench_branches)", dbname)[0]

    def pgbench_init(self) -> float:
        own = self.server.bin_dir / "pgbench"
        pgbench = str(own) if own.is_file() else shutil.which("pgbench")
        if pgbench is None:
            raise SystemExit(f"pgbench not found in {self.server.bin_dir} nor on PATH")
        self.create_db(DB)
        _, wall = spawn([pgbench, "-i", "-s", str(self.scale), "-q"], self.server.env(DB))
        return wall

    def apply_changes(self) -> dict[str, int]:
        """1 % appended to history and accounts, then a clustered update of 1 % of the accounts."""
        n = self.scale * 100_000
        k = max(1, n // 100)
        x = n // 2
        self.sql(f"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT 1 + i % {10 * self.scale}, "
                 f"1 + i % {self.scale}, 1 + (i * 7919) % {n}, i % 10001 - 5000, now() "
                 f"FROM generate_series(1, {k}) i", DB)
        self.sql(f"INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT {n} + i, 1 + i % {self.scale}, 0, "
                 f"'' FROM generate_series(1, {k}) i", DB)
        self.sql(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN {x} AND {x + k - 1}", DB)
        return {"appended": k, "updated": k, "accounts": n}

    def check_and_drop(self, db: str, source: tuple[Any, ...]) -> None:
        got = self.fingerprint(db)
        if got != source:
            raise SystemExit(f"{db} differs from the source: {got} != {source}")
        self.drop_db(db)

    def server_cpu(self) -> float:
        """CPU seconds of the benchmark server so far: the postmaster, the backends it reaped, the live ones."""
        return server_cpu(self.server.datadir)

    def timed(self, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``step`` with the benchmark server's CPU over it (its pg_dump/restore backends, the fingerprint scans)."""
        cpu0 = self.server_cpu()
        res = step()
        res["server_cpu_s"] = self.server_cpu() - cpu0
        return res

    # -- timed steps -----------------------------------------------------------------------------------------------
    def raw_dump(self, stdout: Path | None = None) -> dict[str, Any]:
        from airflow_provider_pgplakar.pg import commands

        self.checkpoint()
        return self.timed(lambda: run_child({"op": "tool", "argv": commands.pg_dump(self.pg_dump, DB),
                                             "env": self.tool_env, "stdout": str(stdout) if stdout else None}))

    def backup(self, store: Path, cache: Path, extra: dict[str, str] | None = None) -> dict[str, Any]:
        self.checkpoint()
        return self.timed(lambda: run_child({"op": "backup", "store": str(store), "cache": str(cache),
                                             "options": {**self.conn_opts, "database": DB, **(extra or {})}}))

    def raw_restore(self, archive: Path, target: str) -> dict[str, Any]:
        from airflow_provider_pgplakar.pg import commands

        self.create_db(target)
        argv = commands.pg_restore(self.pg_restore, target, archive=str(archive))
        self.checkpoint()
        return self.timed(lambda: run_child({"op": "tool", "env": self.tool_env, "argv": argv}))

    def restore(self, store: Path, cache: Path, snapshot: str, target: str) -> dict[str, Any]:
        self.create_db(target)
        self.checkpoint()
        return self.timed(lambda: run_child({"op": "restore", "store": str(store), "cache": str(cache),
                                             "snapshot": snapshot,
                                             "options": {**self.conn_opts, "database": target, "databases": DB}}))

    # -- the whole run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from airflow_provider_pgplakar.store.repo import Store

        r: dict[str, Any] = {}
        progress(f"pgbench -i -s {self.scale} ...")
        r["init_s"] = self.pgbench_init()
        self.sql("VACUUM ANALYZE", DB)
        r["db_bytes_1"] = self.sql(f"SELECT pg_database_size('{DB}')")[0][0]

        base_store, base_cache = self.work / "store", self.work / "cache"
        dumps1, firsts = [], []
        for i in range(self.repeat):
            progress(f"[{i + 1}/{self.repeat}] raw pg_dump > /dev/null ...")
            dumps1.append(self.raw_dump())
            shutil.rmtree(base_store, ignore_errors=True)
            shutil.rmtree(base_cache, ignore_errors=True)
            Store.create(str(base_store), PASS, cache_dir=base_cache).close()
            progress(f"[{i + 1}/{self.repeat}] first backup ...")
            firsts.append(self.backup(base_store, base_cache))
        r["dump1"], r["first"] = summarize(dumps1), summarize(firsts)
        r["store_bytes_1"] = dir_bytes(base_store)

        progress("applying changes ...")
        r["changes"] = self.apply_changes()
        r["db_bytes_2"] = self.sql(f"SELECT pg_database_size('{DB}')")[0][0]
        dumps2, seconds, controls = [], [], []
        for i in range(self.repeat):
            progress(f"[{i + 1}/{self.repeat}] raw pg_dump > /dev/null after the changes ...")
            dumps2.append(self.raw_dump())
            # the control: a first backup of the same (changed) database in the same round, so that first and
            # second backups are compared in one window (the first backups above ran earlier, at another load)
            ctl_store, ctl_cache = self.work / f"control-{i}", self.work / f"control-cache-{i}"
            Store.create(str(ctl_store), PASS, cache_dir=ctl_cache).close()
            progress(f"[{i + 1}/{self.repeat}] first backup of the changed database (control) ...")
            controls.append(self.backup(ctl_store, ctl_cache))
            shutil.rmtree(ctl_store)
            shutil.rmtree(ctl_cache)
            if i < self.repeat - 1:  # every second backup but the last on a copy of the post-first-backup store
                store, cache = self.work / f"store-{i}", self.work / f"cache-{i}"
                shutil.copytree(base_store, store)
                shutil.copytree(base_cache, cache)
            else:
                store, cache = base_store, base_cache
            progress(f"[{i + 1}/{self.repeat}] second backup ...")
            seconds.append(self.backup(store, cache))
            if store != base_store:
                shutil.rmtree(store)
                shutil.rmtree(cache)
        r["dump2"], r["second"], r["control"] = summarize(dumps2), summarize(seconds), summarize(controls)
        r["store_bytes_2"] = dir_bytes(base_store)

        progress("writing the local dump file for the pg_restore baseline ...")
        archive = self.work / "bench.dump"
        r["dump_file"] = self.raw_dump(stdout=archive)
        source = self.fingerprint(DB)
        raws, ours = [], []
        for i in range(self.repeat):
            # each restored database is checked and dropped before the next step: left in place, autovacuum's
            # first pass over its freshly loaded 3 million rows ran during the next step (0.8 CPU s more on the
            # server during our restore, 1.36x instead of about 1.1x, 2026-12-03 21:03)
            progress(f"[{i + 1}/{self.repeat}] raw pg_restore from the local file ...")
            raws.append(self.raw_restore(archive, f"raw_restore_{i}"))
            self.check_and_drop(f"raw_restore_{i}", source)
            progress(f"[{i + 1}/{self.repeat}] our logical_restore of the second snapshot ...")
            ours.append(self.restore(base_store, base_cache, r["second"]["snapshot"], f"our_restore_{i}"))
            self.check_and_drop(f"our_restore_{i}", source)
        r["raw_restore"], r["restore"] = summarize(raws), summarize(ours)
        r["fingerprint"] = source
        return r


class MultiBench(Bench):
    """The multi-database case: raw pg_dump one after the other and all at once, ours with jobs=1 and jobs=N."""

    def __init__(self, server: Any, work: Path, scale: int, repeat: int, jobs: list[int]) -> None:
        super().__init__(server, work, scale, repeat)
        self.jobs = jobs

    def populate(self) -> dict[str, Any]:
        own = self.server.bin_dir / "pgbench"
        pgbench = str(own) if own.is_file() else shutil.which("pgbench")
        if pgbench is None:
            raise SystemExit(f"pgbench not found in {self.server.bin_dir} nor on PATH")
        out: dict[str, Any] = {"scales": {}, "bytes": {}}
        for name, weight in zip(MULTI_DBS, MULTI_WEIGHTS, strict=True):
            scale = max(1, round(self.scale * weight))
            self.create_db(name)
            spawn([pgbench, "-i", "-s", str(scale), "-q"], self.server.env(name))
            self.sql(f"CREATE TABLE events AS SELECT g AS id, now() - g * interval '1 s' AS at, md5(g::text) AS k, "
                     f"repeat(md5((g * 7)::text), 3) AS payload FROM generate_series(1, {scale * 20_000}) g", name)
            self.sql("VACUUM ANALYZE", name)
            out["scales"][name] = scale
            out["bytes"][name] = self.sql(f"SELECT pg_database_size('{name}')")[0][0]
        return out

    def raw(self, parallel: bool) -> dict[str, Any]:
        from airflow_provider_pgplakar.pg import commands

        self.checkpoint()
        return self.timed(lambda: run_child({"op": "tools", "parallel": parallel, "env": self.tool_env,
                                             "argvs": [commands.pg_dump(self.pg_dump, db) for db in MULTI_DBS]}))

    def ours(self, jobs: int, i: int) -> dict[str, Any]:
        from airflow_provider_pgplakar.store.repo import Store

        store, cache = self.work / f"multi-store-{jobs}-{i}", self.work / f"multi-cache-{jobs}-{i}"
        Store.create(str(store), PASS, cache_dir=cache).close()
        others = [d for (d,) in self.sql("SELECT datname FROM pg_database") if d not in MULTI_DBS]
        self.checkpoint()
        try:
            return self.timed(lambda: run_child({"op": "backup", "store": str(store), "cache": str(cache),
                                                 "options": {**self.conn_opts, "exclude_databases": ",".join(others),
                                                             "jobs": str(jobs)}}))
        finally:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        progress(f"multi: 4 databases, pgbench scales {[max(1, round(self.scale * w)) for w in MULTI_WEIGHTS]} ...")
        r: dict[str, Any] = {"populate": self.populate()}
        variants = [1, *[j for j in self.jobs if j != 1]]
        runs: dict[str, list[dict[str, Any]]] = {"seq": [], "par": [], **{f"jobs{j}": [] for j in variants}}
        for i in range(self.repeat):  # interleaved, baselines first
            progress(f"[{i + 1}/{self.repeat}] multi: raw pg_dump one after the other ...")
            runs["seq"].append(self.raw(parallel=False))
            progress(f"[{i + 1}/{self.repeat}] multi: raw pg_dump all at once ...")
            runs["par"].append(self.raw(parallel=True))
            for j in variants:
                progress(f"[{i + 1}/{self.repeat}] multi: our backup, jobs={j} ...")
                runs[f"jobs{j}"].append(self.ours(j, i))
        r["runs"] = {k: summarize(v) for k, v in runs.items()}
        r["variants"] = variants
        for name in MULTI_DBS:
            self.drop_db(name)
        return r


def report_multi(r: dict[str, Any], a: argparse.Namespace, server: Any, load0: tuple[float, ...]) -> None:
    runs, pop = r["runs"], r["populate"]
    floor, seq = runs["par"]["seconds"], runs["seq"]["seconds"]
    dump_bytes = runs["jobs1"]["dump_bytes"]
    how = f"median of {a.repeat} runs" if a.repeat > 1 else "single runs"
    print()
    print(f"Multi-database case: PostgreSQL {server.version}, 4 databases "
          + ", ".join(f"{n} (pgbench -s {pop['scales'][n]} + events, {_mib(pop['bytes'][n])})" for n in MULTI_DBS)
          + f"; dumps {_mib(dump_bytes)} in all; {os.cpu_count()} cores, load average {load0[0]:.2f} at start / "
          f"{os.getloadavg()[0]:.2f} at end ({how}).")
    print()
    print("| operation | seconds | vs raw all at once | vs raw one by one | target | met | "
          "CPU s (ours / tools / server) | peak RSS MiB: ours (after unlock) / largest tool |")
    print("|---|---:|---:|---:|---|---|---:|---:|")
    rows = [("raw `pg_dump -Fc -Z0` × 4, one after the other", runs["seq"], False, None),
            ("raw `pg_dump -Fc -Z0` × 4, all at once (the floor)", runs["par"], False, None)]
    rows += [(f"ours, `jobs={j}`", runs[f"jobs{j}"], True, MULTI_TARGET if j == 2 else None) for j in r["variants"]]
    for name, d, ours, target in rows:
        x = d["seconds"] / floor
        tgt, ok = (f"≤ {target:.1f}×", "yes" if x <= target else "**NO**") if target else ("", "")
        cpu = (f"{d['cpu_s']:.2f}" if ours else "–") + f" / {d['tool_cpu_s']:.2f} / {d['server_cpu_s']:.2f}"
        rss = (f"{d['rss_mib']:.0f} ({d['rss_after_unlock_mib']:.0f}) / {d['tool_rss_mib']:.0f}" if ours
               else f"– / {d['tool_rss_mib']:.0f}")
        print(f"| {name} | {d['seconds']:.2f} | {x:.2f}× | {d['seconds'] / seq:.2f}× | {tgt} | {ok} | {cpu} | {rss} |")
    print()
    for j in r["variants"]:
        if j == 2:
            print(f"- {cpu_floor(f'jobs={j}', runs[f'jobs{j}'], runs['par'], MULTI_TARGET, 'raw all at once')}")
    print("- ours: a whole-cluster backup minus every other database (manifest, globals, the 4 dumps, fingerprints "
          "at the default `catalog` level) into a fresh encrypted store, including the Argon2id unlock; raw: the "
          "same `pg_dump` argv to /dev/null. CPU: user+sys of the step, ours / its tools / the benchmark server "
          "(postmaster and backends, which share the cores: the floor is CPU-bound by them on a small machine).")
    if a.repeat > 1:
        for key in ("seq", "par", *[f"jobs{j}" for j in r["variants"]]):
            print(f"- {key} runs: {', '.join(f'{s:.2f}' for s in runs[key]['all_seconds'])} s")


FIXED_TARGET = 0.3  # issue 13: fixed cost per run (start-up, unlock, manifest) <= 0.3 s with a raw key
FIXED_DB = "fixed_tiny"
# what `pgplakar backup postgres://...` imports (its modules' own imports follow)
BACKUP_IMPORTS = ("airflow_provider_pgplakar.cli.main", "airflow_provider_pgplakar.cli.commands",
                  "airflow_provider_pgplakar.pg.logical", "airflow_provider_pgplakar.pg.manifest",
                  "airflow_provider_pgplakar.store.repo", "airflow_provider_pgplakar.store.writer")
CLI = "import sys; from airflow_provider_pgplakar.cli import main; sys.exit(main())"


class FixedBench(Bench):
    """Issue 13: the fixed cost of one ``pgplakar backup`` (a fresh interpreter, a raw key) of an almost empty
    database, next to raw ``pg_dump`` of it; plus the bare interpreter and the imports alone."""

    def process(self, argv: list[str], env: dict[str, str]) -> dict[str, float]:
        """Wall time as the caller sees it, and the CPU of the process and its children (``wait4``)."""
        with tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                err.seek(0)
                raise SystemExit(f"{Path(argv[0]).name} failed ({proc.returncode}):\n"
                                 f"{err.read().decode(errors='replace')[-4000:]}")
        return {"seconds": wall, "cpu_s": usage.ru_utime + usage.ru_stime}

    def run(self) -> dict[str, Any]:
        from airflow_provider_pgplakar.pg import commands
        from airflow_provider_pgplakar.store.repo import Store

        progress("fixed: an almost empty database, a raw-key store ...")
        self.create_db(FIXED_DB)
        self.sql("CREATE TABLE t (id int PRIMARY KEY, v text)", FIXED_DB)
        self.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 100) g", FIXED_DB)
        store, cache = self.work / "fixed-store", self.work / "fixed-cache"
        with Store.create(str(store), PASS, cache_dir=cache) as st:
            key = st.export_key()
        env = {**_child_env(), "PYTHONPATH": str(REPO), "PGPLAKAR_KEY": key, "PGPLAKAR_CACHE_DIR": str(cache),
               "PGPASSWORD": self.server.password}
        env.pop("PGPLAKAR_PASSPHRASE", None)
        location = f"postgres://{self.server.superuser}@{self.server.host}:{self.server.port}/{FIXED_DB}"
        steps: dict[str, list[str]] = {
            "raw": commands.pg_dump(self.pg_dump, FIXED_DB),
            "ours": [sys.executable, "-c", CLI, "at", str(store), "backup", location,
                     f"pg_bin_dir={self.server.bin_dir}"],
            "python": [sys.executable, "-c", "pass"],
            "imports": [sys.executable, "-c", "import " + ", ".join(BACKUP_IMPORTS)],
        }
        envs = {"raw": self.tool_env | {"PGDATABASE": FIXED_DB}}
        self.process(steps["ours"], env)  # once untimed: the index cache exists, as on every run but a store's first
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in steps}
        for i in range(self.repeat):  # interleaved, baseline first
            progress(f"[{i + 1}/{self.repeat}] fixed: raw pg_dump, pgplakar backup, python, imports ...")
            for name, argv in steps.items():
                runs[name].append(self.process(argv, envs.get(name, env)))
        self.drop_db(FIXED_DB)
        return {"runs": {k: {"seconds": statistics.median(r["seconds"] for r in v),
                             "cpu_s": statistics.median(r["cpu_s"] for r in v),
                             "all_seconds": [r["seconds"] for r in v]} for k, v in runs.items()}}


def report_fixed(r: dict[str, Any], a: argparse.Namespace, server: Any, load0: tuple[float, ...]) -> None:
    runs = r["runs"]
    raw, ours = runs["raw"], runs["ours"]
    fixed = ours["seconds"] - raw["seconds"]
    fixed_runs = [o - w for o, w in zip(ours["all_seconds"], raw["all_seconds"], strict=True)]
    how = f"median of {a.repeat} runs" if a.repeat > 1 else "single runs"
    print()
    print(f"Fixed-cost case (issue 13): PostgreSQL {server.version}, a database of one 100-row table; "
          f"{os.cpu_count()} cores, load average {load0[0]:.2f} at start / {os.getloadavg()[0]:.2f} at end ({how}).")
    print()
    print("| operation | seconds | CPU s (process and its children) |")
    print("|---|---:|---:|")
    for name, label in (("raw", "raw `pg_dump -Fc -Z0 > /dev/null`"),
                        ("ours", "`pgplakar backup` (raw key; start-up to exit)"),
                        ("python", "`python -c pass` (interpreter start-up and exit)"),
                        ("imports", "`python -c 'import …'` (what a backup imports)")):
        print(f"| {label} | {runs[name]['seconds']:.3f} | {runs[name]['cpu_s']:.3f} |")
    verdict = "yes" if fixed <= FIXED_TARGET else "**NO**"
    print()
    print(f"Fixed cost (ours − raw, median): {fixed:.3f} s (target ≤ {FIXED_TARGET} s: {verdict}); per run "
          f"{min(fixed_runs):.3f}–{max(fixed_runs):.3f} s; of which interpreter {runs['python']['seconds']:.3f} s and "
          f"imports {runs['imports']['seconds'] - runs['python']['seconds']:.3f} s.")
    if a.repeat > 1:
        for key in ("raw", "ours", "python", "imports"):
            print(f"- {key} runs: {', '.join(f'{s:.3f}' for s in runs[key]['all_seconds'])} s")


FINGERPRINT_LEVELS = ("catalog", "counts", "full")  # issue 12; catalog is the default


class FingerprintBench(Bench):
    """Issue 12: our backup at each ``fingerprint`` level next to raw pg_dump; verify next to a plain restore."""

    def ours(self, level: str, keep: bool) -> tuple[dict[str, Any], tuple[Path, Path] | None]:
        from airflow_provider_pgplakar.store.repo import Store

        store, cache = self.work / f"fp-store-{level}", self.work / f"fp-cache-{level}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        Store.create(str(store), PASS, cache_dir=cache).close()
        res = self.backup(store, cache, {"fingerprint": level})
        if keep:
            return res, (store, cache)
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        return res, None

    def verify(self, store: Path, cache: Path, snapshot: str) -> dict[str, Any]:
        self.checkpoint()
        return run_child({"op": "verify", "store": str(store), "cache": str(cache), "snapshot": snapshot,
                          "pg_bin_dir": str(self.server.bin_dir)})

    def run(self) -> dict[str, Any]:
        r: dict[str, Any] = {}
        progress(f"fingerprint: pgbench -i -s {self.scale} ...")
        r["init_s"] = self.pgbench_init()
        self.sql("VACUUM ANALYZE", DB)
        r["db_bytes"] = self.sql(f"SELECT pg_database_size('{DB}')")[0][0]
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], **{lv: [] for lv in FINGERPRINT_LEVELS}}
        full: tuple[Path, Path] | None = None
        for i in range(self.repeat):  # interleaved, baseline first
            progress(f"[{i + 1}/{self.repeat}] fingerprint: raw pg_dump > /dev/null ...")
            runs["raw"].append(self.raw_dump())
            for level in FINGERPRINT_LEVELS:
                progress(f"[{i + 1}/{self.repeat}] fingerprint: our backup, fingerprint={level} ...")
                res, kept = self.ours(level, keep=level == "full" and i == self.repeat - 1)
                runs[level].append(res)
                full = kept or full
        assert full is not None
        r["backups"] = {k: summarize(v) for k, v in runs.items()}
        snapshot = runs["full"][-1]["snapshot"]
        source = self.fingerprint(DB)
        restores, verifies = [], []
        for i in range(self.repeat):
            target = f"fp_restore_{i}"
            progress(f"[{i + 1}/{self.repeat}] fingerprint: plain logical_restore of the full snapshot ...")
            restores.append(self.restore(*full, snapshot, target))
            got = self.fingerprint(target)
            if got != source:
                raise SystemExit(f"{target} differs from the source: {got} != {source}")
            self.drop_db(target)
            progress(f"[{i + 1}/{self.repeat}] fingerprint: pgplakar verify of the full snapshot ...")
            verifies.append(self.timed(lambda: self.verify(*full, snapshot)))
        r["restore"], r["verify"] = summarize(restores), summarize(verifies)
        r["fingerprint"] = source
        self.drop_db(DB)
        return r


def report_fingerprint(r: dict[str, Any], a: argparse.Namespace, server: Any, load0: tuple[float, ...]) -> None:
    b, ro, ve = r["backups"], r["restore"], r["verify"]
    raw, cat = b["raw"], b["catalog"]
    how = f"median of {a.repeat} runs" if a.repeat > 1 else "single runs"
    print()
    print(f"Fingerprint case (issue 12): PostgreSQL {server.version}, `pgbench -i -s {a.scale}` (database "
          f"{_mib(r['db_bytes'])}, dump {_mib(cat['dump_bytes'])}); {os.cpu_count()} cores, load average "
          f"{load0[0]:.2f} at start / {os.getloadavg()[0]:.2f} at end ({how}).")
    print()
    print("| operation | seconds | process s | vs raw `pg_dump` | vs `catalog` backup | vs plain restore | "
          "CPU s (ours / tools) | benchmark server CPU s | peak RSS MiB: ours (after unlock) / largest tool |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(name: str, d: dict[str, Any], ours: bool, vs_raw: str, vs_cat: str, vs_restore: str) -> None:
        cpu = (f"{d['cpu_s']:.2f}" if ours else "–") + f" / {d['tool_cpu_s']:.2f} / {d['server_cpu_s']:.2f}"
        rss = (f"{d['rss_mib']:.0f} ({d['rss_after_unlock_mib']:.0f}) / {d['tool_rss_mib']:.0f}" if ours
               else f"– / {d['tool_rss_mib']:.0f}")
        print(f"| {name} | {d['seconds']:.2f} | {d['process_s']:.2f} | {vs_raw} | {vs_cat} | {vs_restore} | "
              f"{cpu} | {d['server_cpu_s']:.2f} | {rss} |")

    row("raw `pg_dump -Fc -Z0 > /dev/null`", raw, False, "1.00×", "", "")
    for level in FINGERPRINT_LEVELS:
        d = b[level]
        row(f"our backup, `fingerprint={level}`" + (" (default)" if level == "catalog" else ""), d, True,
            f"{d['seconds'] / raw['seconds']:.2f}×", f"{d['seconds'] / cat['seconds']:.2f}×", "")
    row("plain `logical_restore` of the `full` snapshot", ro, True, "", "", "1.00×")
    row("`pgplakar verify` of the `full` snapshot", ve, True, "", "",
        f"{ve['seconds'] / ro['seconds']:.2f}×")
    print()
    print("- backups: `database=bench` with the given `fingerprint`, each into a fresh encrypted store, Argon2id "
          "unlock included; raw: the same `pg_dump` argv to /dev/null. CPU: user+sys of the step, ours / its tools; "
          "the `counts`/`full` scans run in the benchmark server: its CPU over the step (backends, checkpointer, "
          "autovacuum: whatever ran then) is the server column.")
    print("- plain restore: into a new, empty database on the benchmark server (its work in the server column); "
          f"verify: a throwaway {ve['server']} of the same binaries (initdb, start, restore, recompute and compare "
          f"{ve['findings']} findings at level {ve['level']}, stop, remove), whose CPU, server included, is in "
          "`tools`; both with fsync=off. Restores checked against the source "
          f"{tuple(r['fingerprint'])}; verify PASSED.")
    if a.repeat > 1:
        for key, d in (*b.items(), ("restore", ro), ("verify", ve)):
            print(f"- {key} runs: {', '.join(f'{s:.2f}' for s in d['all_seconds'])} s")


# ------------------------------------------------------------------------------------------------------------------
# Report


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cpu_floor(label: str, ours: dict[str, Any], raw: dict[str, Any], target: float, raw_name: str = "raw") -> str:
    """The least wall time a step's measured CPU allows on this machine's cores, next to its target.

    Ours, its tools and the benchmark server's backends share the cores, so no schedule finishes the step sooner
    than their CPU seconds divided by the cores. When that floor is above the target's time, the target cannot be
    met by better overlap or parallelism, only by less CPU."""
    cores = os.cpu_count() or 1
    total = ours["cpu_s"] + ours["tool_cpu_s"] + ours["server_cpu_s"]
    floor = total / cores
    allowed = target * raw["seconds"]
    verdict = ("above the target's time: less CPU is the only way to meet it" if floor > allowed
               else "below the target's time")
    return (f"CPU floor of the {label}: {total:.2f} CPU s (ours + tools + server) / {cores} cores = {floor:.2f} s = "
            f"{floor / raw['seconds']:.2f}× {raw_name}; the target ≤ {target:.1f}× allows {allowed:.2f} s: {verdict}")


def report(r: dict[str, Any], a: argparse.Namespace, server: Any, work: Path, load0: tuple[float, ...],
           conf: dict[str, str]) -> None:
    d1, f1, d2, f2 = r["dump1"], r["first"], r["dump2"], r["second"]
    rr, ro = r["raw_restore"], r["restore"]
    dump1_bytes, dump2_bytes = f1["dump_bytes"], r["dump_file"]["bytes"]
    s2 = f2["stats"]
    ch = r["changes"]

    def ratio(ours: dict[str, Any], base: dict[str, Any]) -> float:
        return ours["seconds"] / base["seconds"]

    def met(x: float) -> str:
        return "yes" if x <= TARGET else "**NO**"

    def rss(d: dict[str, Any], ours: bool) -> str:
        if not ours:
            return f"– / {d['tool_rss_mib']:.0f}"
        return f"{d['rss_mib']:.0f} ({d['rss_after_unlock_mib']:.0f}) / {d['tool_rss_mib']:.0f}"

    def cpu(d: dict[str, Any], ours: bool) -> str:
        return (f"{d['cpu_s']:.2f}" if ours else "–") + f" / {d['tool_cpu_s']:.2f} / {d['server_cpu_s']:.2f}"

    rows = [
        ("1", "raw `pg_dump -Fc -Z0 > /dev/null`", d1, None, f"dump {_mib(dump1_bytes)}", False),
        ("2", "our first backup (fresh store)", f1, ratio(f1, d1),
         f"{_mib(f1['stats']['new_stored_bytes'])} new stored ({_mib(r['store_bytes_1'])} store on disk)", True),
        ("3", "raw `pg_dump -Fc -Z0 > /dev/null`, after changes", d2, None, f"dump {_mib(dump2_bytes)}", False),
        ("3", "our first backup of the changed database (fresh store, same rounds)", r["control"],
         ratio(r["control"], d2), f"{_mib(r['control']['stats']['new_stored_bytes'])} new stored", True),
        ("3", "our second backup", f2, ratio(f2, d2),
         f"**+{_mib(s2['new_stored_bytes'])} new stored = {100 * s2['new_stored_bytes'] / dump2_bytes:.2f} % of "
         f"the dump** ({_mib(s2['new_raw_bytes'])} new before compression = "
         f"{100 * s2['new_raw_bytes'] / dump2_bytes:.1f} %)", True),
        ("4", "raw `pg_restore` from a local file", rr, None, "into a new, empty database", False),
        ("4", "our `logical_restore` of the second snapshot", ro, ratio(ro, rr),
         "into a new, empty database (+ globals via psql)", True),
    ]
    cores = os.cpu_count()
    load1 = os.getloadavg()
    print()
    print(f"PostgreSQL {server.version} ({server.bin_dir}), `pgbench -i -s {a.scale}` "
          f"({ch['accounts']:,} accounts, database {_mib(r['db_bytes_1'])}, init {r['init_s']:.1f} s); "
          f"server conf: {', '.join(f'{k}={v}' for k, v in conf.items())}, fsync=off (test-server default); "
          f"{cores} cores, load average {load0[0]:.2f} at start / {load1[0]:.2f} at end; "
          f"work dir {work} ({'median of ' + str(a.repeat) + ' runs' if a.repeat > 1 else 'single runs'}).")
    print()
    print(f"Changes before the second backup: +{ch['appended']:,} rows in pgbench_history and in pgbench_accounts, "
          f"UPDATE of {ch['updated']:,} consecutive accounts (aid {ch['accounts'] // 2:,}..); database "
          f"{_mib(r['db_bytes_2'])} after.")
    print()
    print("| step | operation | seconds | process s | vs raw | target | met | data | "
          "peak RSS MiB: ours (after unlock) / tool | CPU s (ours / tools / server) |")
    print("|---|---|---:|---:|---:|---|---|---|---:|---:|")
    for step, name, d, x, data, ours in rows:
        vs = f"{x:.2f}×" if x is not None else "1.00×"
        tgt = f"≤ {TARGET:.1f}×" if x is not None else ""
        ok = met(x) if x is not None else ""
        print(f"| {step} | {name} | {d['seconds']:.2f} | {d['process_s']:.2f} | {vs} | {tgt} | {ok} | {data} | "
              f"{rss(d, ours)} | {cpu(d, ours)} |")
    print()
    print(f"- `seconds`: timed inside a fresh child process; ours includes opening the store with a passphrase "
          f"(Argon2id unlock: open after {f1['unlock_s']:.2f} s in a backup, on a thread beside its start-up; "
          f"{ro['unlock_s']:.2f} s before a restore). `process s`: wall "
          "time of that child as seen by the parent (adds interpreter start-up, and imports for ours).")
    print("- peak RSS (VmHWM): ours = the Python process, whole step and, in parentheses, from after the unlock "
          "(Argon2id takes 64 MiB); tool = the largest client tool (pg_dump, pg_restore, psql), sampled every 20 ms. "
          "CPU: user+sys of the step, ours / its tools / the benchmark server (postmaster and backends).")
    for label, ours_d, raw_d in (("first backup", f1, d1), ("second backup", f2, d2), ("restore", ro, rr)):
        print(f"- {cpu_floor(label, ours_d, raw_d, TARGET)}")
    print(f"- restores verified: accounts count/sum, history, tellers and branches match the source "
          f"{tuple(r['fingerprint'])}.")
    if a.repeat > 1:
        for key, label in (("dump1", "raw dump 1"), ("first", "first backup"), ("dump2", "raw dump 2"),
                           ("control", "first backup after the changes"), ("second", "second backup"),
                           ("raw_restore", "raw restore"), ("restore", "our restore")):
            print(f"- {label} runs: {', '.join(f'{s:.2f}' for s in r[key]['all_seconds'])} s")
    if ro.get("details"):
        print(f"- restore notes: {'; '.join(ro['details'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale factor (100,000 accounts each; default 50)")
    ap.add_argument("--version", type=int, default=15, choices=(15, 17, 18), help="PostgreSQL major (default 15)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per timed step; the median is shown (default 1)")
    ap.add_argument("--workdir", help="parent of the temp dir holding the store and the dump file (default $TMPDIR)")
    ap.add_argument("--pg-conf", action="append", default=[], metavar="KEY=VALUE",
                    help=f"extra postgresql.conf setting (default adds {DEFAULT_CONF})")
    ap.add_argument("--case", choices=("single", "multi", "both", "fingerprint", "fixed"), default="single",
                    help="single: one pgbench database (default); multi: 4 databases, raw vs ours with jobs; "
                         "fingerprint: each fingerprint level vs raw pg_dump, verify vs a plain restore; "
                         "fixed: the CLI's fixed cost per run (an almost empty database, a raw key)")
    ap.add_argument("--multi-scale", type=int, default=20,
                    help="multi case: total pgbench scale spread over the 4 databases (default 20)")
    ap.add_argument("--jobs", type=int, action="append", default=None,
                    help="multi case: jobs values besides 1 (repeatable; default 2 and 4)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main()
        return
    if a.scale < 1 or a.repeat < 1 or a.multi_scale < 1:
        ap.error("--scale, --multi-scale and --repeat must be >= 1")
    jobs = a.jobs or [2, 4]
    if any(not 1 <= j <= 32 for j in jobs):
        ap.error("--jobs must be between 1 and 32")
    conf = dict(DEFAULT_CONF)
    for item in a.pg_conf:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--pg-conf wants KEY=VALUE, got {item!r}")
        conf[key.strip()] = value.strip()
    # SIGTERM unwinds like Ctrl-C, so the finally below stops the server and removes the temp dirs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.pop("PGPLAKAR_KDF", None)  # the default Argon2id cost, as a user gets
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from tests.pgservers import PgManager, missing_description

    # an installed package has its bytecode compiled; with PYTHONDONTWRITEBYTECODE set, every child would compile
    # the modules it imports lazily inside its timed step (tens of milliseconds)
    compileall.compile_dir(str(REPO / "airflow_provider_pgplakar"), quiet=1)
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="pgplakar-logical-bench-", dir=a.workdir))
    manager = None
    try:
        manager = PgManager()
        if manager.bin_dir(a.version) is None:
            raise SystemExit(f"missing {missing_description(a.version)}")
        progress(f"starting PostgreSQL {a.version} ...")
        server = manager.start(a.version, conf=conf)
        if a.case in ("single", "both"):
            results = Bench(server, work, a.scale, a.repeat).run()
            report(results, a, server, work, load0, conf)
        if a.case in ("multi", "both"):
            multi = MultiBench(server, work, a.multi_scale, a.repeat, jobs).run()
            report_multi(multi, a, server, load0)
        if a.case == "fingerprint":
            fp = FingerprintBench(server, work, a.scale, a.repeat).run()
            report_fingerprint(fp, a, server, load0)
        if a.case == "fixed":
            fixed = FixedBench(server, work, a.scale, a.repeat).run()
            report_fixed(fixed, a, server, load0)
    finally:
        progress("cleaning up ...")
        if manager is not None:
            manager.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
