"""The operators' ``execute()`` in isolation (a plain dict context, airflow.md §4.5) against a real PostgreSQL 15.

Covered: run labels on every snapshot; a retry (same dag/task/run/map_index, try 2) reusing the snapshot; the
manifest-only snapshot; restore with templated snapshot ID and options; ``on_kill`` during a running ``pg_dump``;
no secret in logs, rendered template fields, return values (XCom) or error messages.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.operators.base import idempotency_key
from airflow_provider_pgplakar.operators.logical import (
    PgPlakarBackupOperator,
    PgPlakarManifestOperator,
    PgPlakarRestoreOperator,
)
from airflow_provider_pgplakar.pg import PgError
from airflow_provider_pgplakar.pg.process import TaskCancelled
from airflow_provider_pgplakar.store.repo import Store
from tests.pgservers import PgServer
from tests.task_context import FakeTI, context

PASSPHRASE = "operator-tests passphrase"
DATA = [
    "CREATE TABLE items (id serial PRIMARY KEY, name text)",
    "INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 2500) g",
    "CREATE TABLE notes (body text)",
    "INSERT INTO notes SELECT repeat('n', g % 50) FROM generate_series(1, 400) g",
]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg15: PgServer) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": pg15.host, "port": pg15.port, "login": pg15.superuser,
        "password": pg15.password, "schema": "postgres", "extra": {"pg_bin_dir": str(pg15.bin_dir)}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(tmp_path / "store")}}))
    Store.create(str(tmp_path / "store"), PASSPHRASE).close()


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(str(tmp_path / "store"), PASSPHRASE) as st:
        yield st


@pytest.fixture
def db(pg15: PgServer) -> str:
    """A fresh database with two small tables."""
    name = f"ops_{secrets.token_hex(4)}"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    with pg15.connect(name) as c:
        for q in DATA:
            c.execute(q)
    return name


def counts(server: PgServer, dbname: str) -> tuple[int, int]:
    with server.connect(dbname) as c:
        return (c.execute("SELECT count(*) FROM items").fetchone()[0],
                c.execute("SELECT count(*) FROM notes").fetchone()[0])


def test_backup_labels_and_retry_reuses_the_snapshot(db: str, store: Store) -> None:
    op = PgPlakarBackupOperator(task_id="backup", database="{{ params.db }}", tags=["t1"], labels={"team": "dba"})
    ti = FakeTI(map_index=2)
    ctx = context(ti, db=db)
    op.render_template_fields(ctx)
    assert op.database == db
    sid = op.execute(ctx)

    header = store.load_snapshot(sid).header
    assert header["labels"] == {"team": "dba", "dag_id": "ops_dag", "task_id": "backup", "run_id": ti.run_id,
                                "map_index": "2", "try_number": "1"}
    assert header["tags"] == ["t1"] and header["meta"]["databases"] == [db]
    assert sid == store.idempotent_id(idempotency_key(header["labels"]))

    ti.try_number = 2  # the retry of the same mapped task instance
    assert op.execute(ctx) == sid
    assert store.snapshot_ids() == [sid]
    assert store.load_snapshot(sid).header["labels"]["try_number"] == "1"  # the committed try's snapshot

    other = op.execute(context(FakeTI(map_index=3), db=db))  # another map index is another snapshot
    assert other != sid and sorted(store.snapshot_ids()) == sorted([sid, other])


def test_manifest_operator_writes_a_manifest_only_snapshot(db: str, store: Store) -> None:
    ti = FakeTI(task_id="manifest")
    sid = PgPlakarManifestOperator(task_id="manifest", database=db).execute(context(ti))
    snap = store.load_snapshot(sid)
    assert snap.header["source"]["kind"] == "postgres-manifest"
    assert [r.path for r in store.records(snap) if r.kind == "f"] == ["/manifest.json"]
    manifest = json.loads(store.open_record(store.find_record(snap, "/manifest.json")).read())
    assert "items" in json.dumps(manifest) and "notes" in json.dumps(manifest)
    # the same task context for a full backup is a different snapshot (the key is suffixed for manifests)
    full = PgPlakarBackupOperator(task_id="manifest", database=db).execute(context(ti))
    assert full != sid and {r.path for r in store.records(full)} >= {"/manifest.json", f"/00001-{db}.dump"}


def test_restore_operator_with_templated_snapshot_id_and_options(db: str, store: Store, pg15: PgServer) -> None:
    sid = PgPlakarBackupOperator(task_id="backup", database=db).execute(context(FakeTI()))
    target = f"{db}_copy"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{target}"')

    op = PgPlakarRestoreOperator(
        task_id="restore",
        snapshot_id="{{ ti.xcom_pull(task_ids='backup')[:12] }}",  # an unambiguous prefix resolves too
        options={"database": "{{ params.target }}", "databases": ["{{ params.source }}"], "no_globals": True},
    )
    ti = FakeTI(task_id="restore", xcoms={"backup": sid})
    ctx = context(ti, source=db, target=target)
    op.render_template_fields(ctx)
    assert op.snapshot_id == sid[:12]
    assert op.options == {"database": target, "databases": [db], "no_globals": True}
    summary = op.execute(ctx)
    assert summary["ok"] and summary["snapshot"] == sid
    assert [(r["database"], r["status"]) for r in summary["records"] if r["database"]] == [(target, "restored")]
    assert counts(pg15, target) == counts(pg15, db) == (2500, 400)


def test_restore_operator_fails_on_globals_errors_and_empty_selectors(db: str, store: Store, pg15: PgServer) -> None:
    from airflow_provider_pgplakar.pg.restore import RestoreFailed

    with store.writer(source={"kind": "postgres", "origin": "test"}) as w:  # globals whose one statement fails
        w.add_bytes("/00000-globals.sql", b"GRANT op_missing_role TO op_missing_member;\n")
    bad_globals = w.snapshot_id
    op = PgPlakarRestoreOperator(task_id="restore", snapshot_id=bad_globals)
    with pytest.raises(RestoreFailed, match=r'1 statement\(s\) failed: GRANT op_missing_role TO op_missing_member;'):
        op.execute(context(FakeTI(task_id="restore")))
    op = PgPlakarRestoreOperator(task_id="restore", snapshot_id=bad_globals, options={"ignore_globals_errors": True})
    summary = op.execute(context(FakeTI(task_id="restore")))
    assert summary["ok"] and summary["records"][0]["detail"].endswith("(ignored: ignore_globals_errors=true)")

    sid = PgPlakarBackupOperator(task_id="backup", database=db).execute(context(FakeTI()))
    op = PgPlakarRestoreOperator(task_id="restore", snapshot_id=sid, options={
        "database": db, "databases": [db], "clean": True, "no_globals": True, "tables": ["nosuchtable"]})
    with pytest.raises(PgError, match="tables: 'nosuchtable' not in the dump"):
        op.execute(context(FakeTI(task_id="restore")))
    assert counts(pg15, db) == (2500, 400)  # nothing was dropped


def _children_named(name: str) -> list[int]:
    """PIDs of this process's children whose command is ``name`` (from /proc)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == me and comm == name:
            found.append(int(entry))
    return found


def test_on_kill_stops_pg_dump_and_commits_nothing(db: str, store: Store, pg15: PgServer) -> None:
    """pg_dump is held mid-dump by a conflicting lock (deterministic, unlike racing a large dump), then killed."""
    op = PgPlakarBackupOperator(task_id="backup", database=db)
    ctx = context(FakeTI())
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = op.execute(ctx)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    with pg15.connect(db, autocommit=False) as locker:
        # This lock makes pg_dump's ACCESS SHARE lock on ``notes`` wait. ``notes`` has no default, index or
        # constraint, so the manifest's catalog queries (pg_get_expr & co. lock their relation) pass it and
        # pg_dump itself is what blocks.
        locker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        pids: list[int] = []
        with pg15.connect() as watcher:
            while time.monotonic() < deadline:
                pids = _children_named("pg_dump")
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'pgplakar' "
                    "AND wait_event_type = 'Lock'", (db,)).fetchone()[0]
                if pids and waiting:
                    break
                assert thread.is_alive(), outcome
                time.sleep(0.05)
        assert pids, "pg_dump never started"
        assert waiting, "pg_dump is not waiting on the table lock"
        op.on_kill()
        thread.join(30)
        assert not thread.is_alive(), "execute() did not return after on_kill"
        locker.rollback()

    assert "result" not in outcome
    assert isinstance(outcome.get("error"), TaskCancelled) and "the task was cancelled" in str(outcome["error"])
    assert "killed by signal" not in str(outcome["error"])
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)  # killed and reaped
    assert store.snapshot_ids() == []  # nothing committed

    ctx["ti"].try_number = 2  # the retry after the kill commits the one snapshot of this task instance
    sid = op.execute(ctx)
    assert store.snapshot_ids() == [sid]
    assert store.load_snapshot(sid).header["labels"]["try_number"] == "2"


def test_secrets_stay_out_of_logs_templates_xcom_and_errors(db: str, store: Store, pg15: PgServer,
                                                           caplog: pytest.LogCaptureFixture,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level("DEBUG")
    backup = PgPlakarBackupOperator(task_id="backup", database="{{ params.db }}")
    ctx = context(FakeTI(), db=db)
    backup.render_template_fields(ctx)
    sid = backup.execute(ctx)

    target = f"{db}_r"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{target}"')
    restore = PgPlakarRestoreOperator(task_id="restore", snapshot_id="{{ ti.xcom_pull(task_ids='backup') }}",
                                      options={"database": target, "databases": [db], "no_globals": True})
    rctx = context(FakeTI(task_id="restore", xcoms={"backup": sid}))
    restore.render_template_fields(rctx)
    summary = restore.execute(rctx)

    with pytest.raises(PgError) as missing:  # an error path: its message is shown in the task log
        PgPlakarBackupOperator(task_id="b2", database="no_such_db").execute(context(FakeTI(task_id="b2")))

    rendered = {f: getattr(op, f) for op in (backup, restore) for f in op.template_fields}
    header = store.load_snapshot(sid).header
    out, err = capfd.readouterr()
    texts = [caplog.text, out, err, json.dumps(rendered, default=str), json.dumps([sid, summary]),
             json.dumps(header, default=str), str(missing.value)]
    assert "snapshot" in caplog.text  # the log really was captured
    # what a deployment showed (issue 11 §7): the restore summary once, sizes never "0.0 MiB", a manifest phase
    assert caplog.text.count(f"restore of snapshot {sid[:8]}") == 1
    assert " MiB" not in caplog.text and " KiB" in caplog.text
    assert "manifest: reading the cluster inventory from" in caplog.text and "manifest: done in" in caplog.text
    for secret in (pg15.password, PASSPHRASE):
        for text in texts:
            assert secret not in text
