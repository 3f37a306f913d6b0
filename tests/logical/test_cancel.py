"""A killed backup stops, and so do its tools (issue 9 §10), against a real PostgreSQL 15.

- ``on_kill`` while the manifest's catalog query waits on a lock (and the pg_dump started beside it waits too):
  nothing further runs (no pg_dumpall, no other tool), the error says the task was cancelled, every connection of
  the backup closes, nothing is committed.
- SIGTERM to the ``pgplakar`` CLI mid-dump: pg_dump is killed, exit status 143, nothing is committed.
- SIGKILL of the process running a backup while its pg_dump waits on a lock: pg_dump dies with it (parent-death
  signal), every server connection of the backup closes, nothing is committed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator
from airflow_provider_pgplakar.pg import process as process_mod
from airflow_provider_pgplakar.pg.process import TaskCancelled
from airflow_provider_pgplakar.store.repo import Store
from tests.helpers import lock_probe_database
from tests.logical.conftest import src_opts
from tests.pgservers import PgServer
from tests.task_context import FakeTI, context

REPO = Path(__file__).resolve().parents[2]
BACKUP = """
import json, sys
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.repo import Store
loc, opts, path = json.loads(sys.argv[1])
with Store.open(path, "pw") as st:
    logical_backup(st, parse_source_options(loc, opts))
"""


@pytest.fixture
def db(pg15: PgServer) -> str:
    return lock_probe_database(pg15, "cancel", notes=0)


def _backends(watcher: Any, db: str, *, waiting: bool = False) -> list[int]:
    q = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'pgplakar'"
    if waiting:
        q += " AND wait_event_type = 'Lock'"
    return [r[0] for r in watcher.execute(q, (db,))]


def _children(parent: int, name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == parent and comm == name and fields[0] != "Z":
                found.append(int(entry))
    return found


def _until(what: str, pred: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_on_kill_while_the_manifest_waits_starts_nothing_more(db: str, pg15: PgServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": pg15.host, "port": pg15.port, "login": pg15.superuser,
        "password": pg15.password, "extra": {"pg_bin_dir": str(pg15.bin_dir)}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": "pw", "extra": {"location": str(tmp_path / "store")}}))
    Store.create(str(tmp_path / "store"), "pw").close()
    started: list[str] = []
    real_spawn = process_mod.spawn
    monkeypatch.setattr(process_mod, "spawn", lambda argv, **kw: started.append(argv[0]) or real_spawn(argv, **kw))
    op = PgPlakarBackupOperator(task_id="backup", database=db)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = op.execute(context(FakeTI()))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    with pg15.connect(db, autocommit=False) as locker, pg15.connect() as watcher:
        locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        _until("the manifest query and the pg_dump beside it to wait on the lock",
               lambda: (len(_backends(watcher, db, waiting=True)) >= 2 and len(started) >= 2) or outcome.get("error"))
        assert "error" not in outcome, outcome
        # the manifest is read on the dump's fingerprint connection and waits; the dump waits on the same lock; the
        # globals (another database) do not wait for either
        assert sorted(os.path.basename(t) for t in started) == ["pg_dump", "pg_dumpall"]
        before = list(started)
        op.on_kill()
        thread.join(30)
        assert not thread.is_alive(), "execute() did not return after on_kill"
        locker.rollback()
        _until("the backup's connections to close", lambda: not _backends(watcher, db))

    assert "result" not in outcome
    assert isinstance(outcome.get("error"), TaskCancelled), outcome
    assert "the task was cancelled" in str(outcome["error"])
    assert started == before, "a tool was started after on_kill"
    with Store.open(str(tmp_path / "store"), "pw") as st:
        assert st.snapshot_ids() == []


def test_sigkill_of_the_backup_process_kills_pg_dump_and_closes_its_connections(
        db: str, pg15: PgServer, store: Store, tmp_path: Path) -> None:
    loc, opts = src_opts(pg15, database=db)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with pg15.connect(db, autocommit=False) as locker, pg15.connect() as watcher:
        locker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")  # pg_dump waits on it, mid-dump
        parent = subprocess.Popen([sys.executable, "-c", BACKUP, json.dumps([loc, opts, store.location])], env=env)
        try:
            dumps = _until("pg_dump to wait on the lock",
                           lambda: _backends(watcher, db, waiting=True) and _children(parent.pid, "pg_dump"))
            backends = _backends(watcher, db)  # pg_dump's and the exported snapshot's
            assert len(backends) >= 2
            parent.send_signal(signal.SIGKILL)
            parent.wait(10)
            for pid in dumps:  # gone while the lock is still held: killed, not ended by a broken pipe later
                _until(f"pg_dump {pid} to die", lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=10)
        finally:
            parent.kill()
            parent.wait()
        locker.rollback()
        _until("the backup's server connections to close",
               lambda: not set(backends) & set(_backends(watcher, db)), timeout=30)
    with Store.open(store.location, "pw") as st:
        assert st.snapshot_ids() == []


def test_sigterm_cancels_a_cli_backup(db: str, pg15: PgServer, store: Store) -> None:
    loc, opts = src_opts(pg15, database=db)
    argv = [sys.executable, "-c", "import sys; from airflow_provider_pgplakar.cli.main import main; sys.exit(main())",
            "at", store.location, "backup", loc, *(f"{k}={v}" for k, v in opts.items() if k != "password")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PGPLAKAR_PASSPHRASE": "pw", "PGPASSWORD": pg15.password}
    with pg15.connect(db, autocommit=False) as locker, pg15.connect() as watcher:
        locker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
        cli = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            dumps = _until("pg_dump to wait on the lock",
                           lambda: _backends(watcher, db, waiting=True) and _children(cli.pid, "pg_dump"))
            cli.send_signal(signal.SIGTERM)
            out, err = cli.communicate(timeout=60)  # ends while the lock is still held
        finally:
            cli.kill()
            cli.wait()
        assert cli.returncode == 143, (out, err)
        assert "pgplakar: error: the task was cancelled" in err and "killed by signal" not in err, err
        for pid in dumps:
            assert not os.path.exists(f"/proc/{pid}")
        locker.rollback()
    with Store.open(store.location, "pw") as st:
        assert st.snapshot_ids() == []
