"""A backup task killed under Airflow's real task supervisor (issue 9 §10), against a real PostgreSQL 15.

tests/airflow/supervised_driver.py runs the DAG with ``supervise_task``: the task runs in a forked subprocess and
the supervisor heartbeats it through the execution API, as on a worker. A lock held by the test keeps the backup in
the phase under test (the manifest's catalog query, or pg_dump mid-dump), then:

- the task instance is marked failed (as in the UI): the supervisor terminates the task (SIGTERM → ``on_kill``,
  SIGKILL after its grace period). The backup stops where it is: while the manifest's catalog query waits no tool is
  started any more (it used to go on dumping; the pg_dump started beside the manifest, waiting on the same lock, is
  killed, and no pg_dumpall starts after the mark); mid-dump its pg_dump is gone. The task fails saying it was
  cancelled;
- the task process is SIGKILLed (the OOM killer, the supervisor's escalation): its pg_dump dies with it.

Each time: no pg_dump left, the backup's server connections close, no snapshot is committed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.store.repo import Store
from tests.helpers import lock_probe_database
from tests.pgservers import PgServer

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "supervised-kill passphrase"
DAG = """
from airflow.sdk import DAG
from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator

with DAG("pgplakar_supervised_kill", schedule=None) as dag:
    PgPlakarBackupOperator(task_id="backup", database={db!r})
"""


@pytest.fixture
def db(pg15: PgServer) -> str:
    return lock_probe_database(pg15, "supervised", notes=100)


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command name) of every live process."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                out[int(entry)] = (int(fields[1]), stat[stat.index("(") + 1:stat.rindex(")")])
    return out


def _descendants(root: int, name: str) -> list[int]:
    procs = _procs()

    def under(pid: int) -> bool:
        seen = 0
        while pid in procs and seen < 64:
            pid, seen = procs[pid][0], seen + 1
            if pid == root:
                return True
        return False

    return [pid for pid, (_, comm) in procs.items() if comm == name and under(pid) and not _probe(pid)]


def _probe(pid: int) -> bool:
    """A version probe, not a tool run: our tool discovery's ``--version``, or the ``pg_dump -V`` that pg_dumpall
    runs (through ``sh -c``) to check its sibling before it dumps the globals, beside the dump (it used to count as a
    second pg_dump, failing the catalog phase once in CI). A process whose command line reads empty is exiting (its
    memory is gone before it turns zombie): a probe that ended between reading its ``stat`` and its ``cmdline`` used
    to count as a pg_dump run (a tool run lives on, waiting on the test's lock, and is seen again)."""
    argv = _argv(pid)
    return argv is None or argv == [b""] or b"--version" in argv or b"-V" in argv


def _argv(pid: int) -> list[bytes] | None:
    """A process's argv (``[b""]`` while it exits); None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    argv = _argv(pid)
    return "(gone)" if argv is None else b" ".join(argv).decode(errors="replace").strip() or "(exiting)"


def _backends(watcher: Any, db: str, *, waiting: bool = False, manifest: bool = False) -> list[int]:
    """The backup's backends on ``db``; ``waiting``: only those waiting on a lock; ``manifest``: only those running
    one of the manifest's per-relation queries."""
    q = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'pgplakar'"
    if waiting:
        q += " AND wait_event_type = 'Lock'"
    if manifest:
        q += " AND query LIKE ANY(%s)"
    return [r[0] for r in watcher.execute(q, (db, MANIFEST_QUERIES) if manifest else (db,))]


# What the manifest's per-relation queries (pg/manifest.py ``_columns``, ``_constraints``, ``_indexes``) start with:
# one of them (pg_get_expr() of the serial default, or pg_get_indexdef()) waits on the test's lock on ``items``.
# pg_dump's queries look nothing like them, and a lock-waiting pg_dump is not the catalog phase.
MANIFEST_QUERIES = ["SELECT a.attrelid AS oid, %", "SELECT k.conrelid AS oid, %", "SELECT x.indrelid AS oid, %"]


def _until(what: str, pred: Any, driver: subprocess.Popen[bytes] | None = None, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the DAG run ended while waiting for {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _start(tmp_path: Path, pg15: PgServer, db: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    dags, control, home = tmp_path / "dags", tmp_path / "control", tmp_path / "airflow"
    for d in (dags, control, home):
        d.mkdir()
    (dags / "supervised_kill.py").write_text(DAG.format(db=db))
    store = tmp_path / "store"
    Store.create(str(store), PASSPHRASE).close()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(tmp_path / "logs"),
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "PGPLAKAR_KDF": "1,8192,1",
        "PGPLAKAR_CACHE_DIR": str(tmp_path / "cache"),
        "AIRFLOW_CONN_POSTGRES_DEFAULT": json.dumps({
            "conn_type": "postgres", "host": pg15.host, "port": pg15.port, "login": pg15.superuser,
            "password": pg15.password, "extra": {"pg_bin_dir": str(pg15.bin_dir)}}),
        "AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT": json.dumps(
            {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(store)}}),
    }
    driver = subprocess.Popen([sys.executable, "-m", "tests.airflow.supervised_driver",
                               str(dags / "supervised_kill.py"), str(control)], cwd=REPO, env=env,
                              stdout=open(tmp_path / "driver.out", "wb"), stderr=subprocess.STDOUT)
    return driver, control, store


def _finish(driver: subprocess.Popen[bytes], control: Path, tmp_path: Path) -> dict[str, Any]:
    try:
        driver.wait(180)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
        pytest.fail("the DAG run did not end: " + (tmp_path / "driver.out").read_text()[-3000:])
    result = control / "result.json"
    assert result.exists(), (tmp_path / "driver.out").read_text()[-3000:]
    return json.loads(result.read_text())


def _task_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*.log"))


@pytest.mark.parametrize("phase", ["catalog", "dump"])
def test_task_marked_failed_stops_the_backup(phase: str, db: str, pg15: PgServer, tmp_path: Path) -> None:
    locked = "items" if phase == "catalog" else "notes"
    dumps_seen: set[int] = set()
    globals_seen: set[int] = set()
    with pg15.connect(db, autocommit=False) as locker, pg15.connect() as watcher:
        locker.execute(f"LOCK TABLE {locked} IN ACCESS EXCLUSIVE MODE")
        driver, control, store = _start(tmp_path, pg15, db)
        try:
            def waiting() -> bool:
                dumps_seen.update(_descendants(driver.pid, "pg_dump"))
                globals_seen.update(_descendants(driver.pid, "pg_dumpall"))  # beside the dump, from the start
                if phase == "catalog":  # the manifest's own query, and the pg_dump beside it on the same lock
                    return bool(_backends(watcher, db, waiting=True, manifest=True)) and bool(dumps_seen) and len(
                        _backends(watcher, db, waiting=True)) >= 2
                return bool(_backends(watcher, db, waiting=True)) and bool(dumps_seen)

            _until(f"the backup to wait on the lock ({phase})", waiting, driver)
            backends = _backends(watcher, db)
            before = set(dumps_seen)  # in the catalog phase: the one pg_dump beside the manifest
            globals_before = set(globals_seen)
            if phase == "catalog":
                assert len(before) == 1, {pid: _cmdline(pid) for pid in before}
            (control / "mark-failed").touch()
            deadline = time.monotonic() + 180
            while driver.poll() is None and time.monotonic() < deadline:  # the lock is still held: the kill ends it
                dumps_seen.update(_descendants(driver.pid, "pg_dump"))
                globals_seen.update(_descendants(driver.pid, "pg_dumpall"))
                time.sleep(0.05)
            result = _finish(driver, control, tmp_path)
            assert result["tasks"] == {"backup": "failed"}, result
            if phase == "catalog":
                assert dumps_seen == before, "pg_dump was started after the task was marked failed"
                assert globals_seen == globals_before, "pg_dumpall was started after the task was marked failed"
            else:
                assert dumps_seen
            for pid in dumps_seen:
                assert not os.path.exists(f"/proc/{pid}"), f"pg_dump {pid} outlived its task"
            assert "the task was cancelled" in _task_log(tmp_path)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        locker.rollback()
        _until("the backup's server connections to close",
               lambda: not set(backends) & set(_backends(watcher, db)), timeout=30)
    with Store.open(str(store), PASSPHRASE) as st:
        assert st.snapshot_ids() == []


def test_sigkill_of_the_task_process_kills_its_pg_dump(db: str, pg15: PgServer, tmp_path: Path) -> None:
    with pg15.connect(db, autocommit=False) as locker, pg15.connect() as watcher:
        locker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")  # pg_dump waits on it, mid-dump
        driver, control, store = _start(tmp_path, pg15, db)
        try:
            dumps = _until("pg_dump to wait on the lock", lambda: _backends(watcher, db, waiting=True)
                           and _descendants(driver.pid, "pg_dump"), driver)
            backends = _backends(watcher, db)
            task_process = _procs()[dumps[0]][0]  # the supervised task process, pg_dump's parent
            assert task_process != driver.pid and _procs()[task_process][0] == driver.pid
            os.kill(task_process, signal.SIGKILL)
            for pid in dumps:  # gone while the lock is still held: killed, not ended by a broken pipe later
                _until(f"pg_dump {pid} to die", lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=10)
            result = _finish(driver, control, tmp_path)
            assert result["tasks"] == {"backup": "failed"}, result
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        locker.rollback()
        _until("the backup's server connections to close",
               lambda: not set(backends) & set(_backends(watcher, db)), timeout=30)
    with Store.open(str(store), PASSPHRASE) as st:
        assert st.snapshot_ids() == []


def test_version_probes_are_not_counted_as_tool_runs(tmp_path: Path) -> None:
    """The filter the tests above rely on: a real run is seen; our ``--version`` probe and pg_dumpall's ``pg_dump
    -V`` are not (a shell script named pg_dump stands in for each: its process is named after it)."""
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    procs = {args: subprocess.Popen([str(fake), *args], start_new_session=True)
             for args in (("-Fc", "db"), ("--version",), ("-V",))}
    try:
        _until("the fake tools to start", lambda: all(
            _procs().get(p.pid, (0, ""))[1] == "pg_dump" and str(fake) in _cmdline(p.pid)
            for p in procs.values()), timeout=10)
        assert _descendants(os.getpid(), "pg_dump") == [procs[("-Fc", "db")].pid]
    finally:
        for p in procs.values():
            os.killpg(p.pid, signal.SIGKILL)  # its sleep too
            p.wait()
