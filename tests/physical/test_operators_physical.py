"""The physical operators' ``execute()`` with a plain dict context, and the example DAG's shape.

A standard Airflow postgres connection (with a database in ``schema`` and a logical-only extra) drives a base
backup; the restore operator gets the snapshot ID and the tablespace mapping through templates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pendulum
import pytest

from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook
from airflow_provider_pgplakar.operators.physical import (
    PgPlakarBaseBackupOperator,
    PgPlakarPhysicalRestoreOperator,
)
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.store.repo import Store
from tests.conftest import REPO_ROOT
from tests.physical.conftest import make_tablespace_dir, scratch_dir
from tests.task_context import FakeTI, alias_events, context


def phys_ti(**kw: Any) -> FakeTI:
    return FakeTI(**{"dag_id": "phys_dag", "task_id": "base_backup",
                     "run_id": "scheduled__2026-11-29T01:30:00+00:00", **kw})


PASSPHRASE = "physical operators passphrase"


def set_conns(monkeypatch: pytest.MonkeyPatch, server: Any, store: Path, **extra: Any) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": server.host, "port": server.port, "login": server.superuser,
        "password": server.password, "schema": "postgres",
        "extra": {"pg_bin_dir": str(server.bin_dir), "compress": "false", **extra}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(store)}}))


def catversion(ts_dir):
    (sub,) = [p.name for p in ts_dir.iterdir()]
    return sub.split("_")[-1]


def test_base_backup_and_restore_operators(pg_factory, pg_manager, tmp_path, monkeypatch) -> None:
    src = pg_factory(15)
    ts_dir = make_tablespace_dir(pg_manager, "ts")
    with src.connect() as c:
        c.execute(f"CREATE TABLESPACE extra LOCATION '{ts_dir}'")
        c.execute("CREATE TABLE t TABLESPACE extra AS SELECT generate_series(1, 500) g")
    store_dir = tmp_path / "store"
    Store.create(str(store_dir), PASSPHRASE).close()
    set_conns(monkeypatch, src, store_dir)

    op = PgPlakarBaseBackupOperator(task_id="base_backup", checkpoint="{{ params.checkpoint }}", tags=["weekly"],
                                    server_compression="{{ params.compression }}")
    ti = phys_ti()
    ctx = context(ti, checkpoint="fast", compression="zstd:2")
    op.render_template_fields(ctx)
    assert (op.checkpoint, op.server_compression) == ("fast", "zstd:2")
    sid = op.execute(ctx)
    ti.try_number = 2
    assert op.execute(ctx) == sid  # a retry after the commit reuses the snapshot
    with Store.open(str(store_dir), PASSPHRASE) as store:
        header = store.load_snapshot(sid).header
        assert store.snapshot_ids() == [sid]
    assert header["source"]["kind"] == "postgres+bin" and header["tags"] == ["weekly"]
    assert header["labels"]["task_id"] == "base_backup" and header["meta"]["options"]["checkpoint"] == "fast"
    assert header["meta"]["options"]["server_compression"] == "zstd:2"
    assert header["meta"]["server_compression"] == "zstd"
    assert src.password not in json.dumps(header, default=repr)
    stats = ti.pushed["stats"]  # the second XCom and the Asset events (one per try: the retry reports it again)
    assert (stats["snapshot_id"], stats["kind"], stats["bytes"]) == (sid, "postgres+bin", header["stats"]["bytes"])
    assert stats["databases"] == [] and stats["new_stored_bytes"] == header["stats"]["new_stored_bytes"]
    events = alias_events(ctx, "pgplakar-backups")
    assert [uri for uri, _ in events] == [f"pgplakar+bin://{src.host}:{src.port}/"] * 2
    assert events[0][1]["snapshot_id"] == sid and events[0][1]["bytes"] == stats["bytes"]
    assert src.password not in json.dumps(events, default=repr)

    target = scratch_dir(pg_manager, "op-restore")
    new_ts = scratch_dir(pg_manager, "op-ts")
    restore = PgPlakarPhysicalRestoreOperator(
        task_id="restore", snapshot_id="{{ ti.xcom_pull(task_ids='base_backup') }}", target_dir="{{ params.dir }}",
        tablespace_mapping="{{ params.mapping | tojson }}", pg_bin_dir=str(src.bin_dir), require_verify=True,
        file_owner="{{ params.owner }}", sync=False)
    rctx = context(phys_ti(task_id="restore", xcoms={"base_backup": sid}), dir=str(target),
                   mapping={str(ts_dir): str(new_ts)}, owner="nobody" if os.geteuid() == 0 else "")
    restore.render_template_fields(rctx)
    assert restore.snapshot_id == sid and restore.target_dir == str(target)
    summary = restore.execute(rctx)
    assert summary["verified"] is True and summary["major"] == 15 and summary["synced"] is False
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody").pw_uid
        assert (target / "PG_VERSION").stat().st_uid == nobody and (new_ts / f"PG_15_{catversion(new_ts)}").stat(
        ).st_uid == nobody
    assert summary["tablespaces"][0]["restored_to"] == str(new_ts)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    json.dumps(summary)  # XCom-serialisable


def test_physical_options_from_connections(pg_factory, tmp_path, monkeypatch) -> None:
    src = pg_factory(15)
    set_conns(monkeypatch, src, tmp_path / "store")
    opts = PgPlakarPostgresHook().physical_source_options({"max_rate": "10M"})
    assert opts.conn.host == src.host and opts.max_rate == 10240 and opts.pg_bin_dir == str(src.bin_dir)
    with pytest.raises(OptionError, match="remove the database path /sales"):
        PgPlakarPostgresHook(None, location=f"postgres+bin://{src.host}/sales").physical_source_options()
    set_conns(monkeypatch, src, tmp_path / "store", iam=True)
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps({
        "conn_type": "postgres", "host": "db.example.com", "login": "u", "extra": {"iam": True,
                                                                                    "region_name": "eu-west-1"}}))
    with pytest.raises(OptionError, match="replication connection"):
        PgPlakarPostgresHook().physical_source_options()


def _load_weekly() -> Any:
    name = "pgplakar_example_weekly_physical"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "example_dags" / "pgplakar_weekly_physical.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].dag


def test_example_dag_weekly_physical_nightly_logical() -> None:
    dag = _load_weekly()
    assert dag.dag_id == "pgplakar_weekly_physical" and dag.schedule == "30 1 * * *"
    assert dag.get_task("base_backup").upstream_task_ids == {"choose"}
    assert dag.get_task("logical_backup").upstream_task_ids == {"choose", "base_backup"}
    assert dag.get_task("logical_backup").trigger_rule == "all_done"
    assert dag.get_task("restore_check").upstream_task_ids == {"base_backup"}
    assert dag.get_task("remove_restore_check").upstream_task_ids == {"restore_check"}
    choose = dag.get_task("choose").python_callable
    sunday, monday = (SimpleNamespace(run_after=pendulum.datetime(2026, 11, d, tz="UTC"), logical_date=None)
                      for d in (29, 30))
    both, logical = ["base_backup", "logical_backup"], ["logical_backup"]
    assert choose(params={"physical_weekday": 6}, dag_run=sunday) == both
    assert choose(params={"physical_weekday": 6}, dag_run=monday) == logical
    assert choose(params={"physical_weekday": 6, "run_physical": "always"}, dag_run=monday) == both
    assert choose(params={"physical_weekday": 6, "run_physical": "never"}, dag_run=sunday) == logical
    assert dag.params["exclude_databases"] == ["*_restore_check", "pgplakar_verify_*"]


def test_weekly_physical_dag_runs_from_a_manual_trigger(pg_factory, pg_manager, tmp_path, monkeypatch,
                                                        airflow_db) -> None:
    """A manual (or REST API) run has no logical date in Airflow 3: ``choose`` failed on every such run with
    "missing 1 required positional argument: 'logical_date'" and ``{{ ds_nodash }}`` was undefined (issue 11 §7).
    The run backs up physically (``run_physical=always``), restore-checks and cleans up; the logical backup leaves
    out the scratch databases."""
    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE DATABASE app")
        c.execute("CREATE DATABASE app_restore_check")
    store_dir = tmp_path / "store"
    Store.create(str(store_dir), PASSPHRASE).close()
    set_conns(monkeypatch, src, store_dir)
    check_dir = scratch_dir(pg_manager, "weekly")
    dag = _load_weekly()
    dr = dag.test(logical_date=None, run_conf={"run_physical": "always", "checkpoint": "fast",
                                               "restore_check_dir": str(check_dir), "pg_bin_dir": str(src.bin_dir)})
    assert dr.logical_date is None
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states == {t: "success" for t in ("choose", "base_backup", "logical_backup", "restore_check",
                                             "remove_restore_check")}, states
    check = dr.get_task_instance("restore_check").xcom_pull(task_ids="restore_check")
    assert check["verified"] is True and check["target_dir"].startswith(str(check_dir) + "/")
    assert not Path(check["target_dir"]).exists()  # removed again
    logical_id = dr.get_task_instance("logical_backup").xcom_pull(task_ids="logical_backup")
    with Store.open(str(store_dir), PASSPHRASE) as store:
        databases = store.load_snapshot(logical_id).header["meta"]["databases"]
    assert "app" in databases and "app_restore_check" not in databases


def test_on_kill_cancels_the_base_backup_and_commits_nothing(pg_factory, tmp_path, monkeypatch) -> None:
    import threading
    import time

    from airflow_provider_pgplakar.pg.process import TaskCancelled
    from tests.physical.conftest import scalar, wait_until

    src = pg_factory(15)
    store_dir = tmp_path / "store"
    Store.create(str(store_dir), PASSPHRASE).close()
    set_conns(monkeypatch, src, store_dir)
    op = PgPlakarBaseBackupOperator(task_id="base_backup", checkpoint="fast", max_rate=32)  # 32 kB/s: slow
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = op.execute(context(phys_ti()))
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' "
                                   "AND query LIKE 'BASE_BACKUP%'") == 1, what="BASE_BACKUP")
    time.sleep(0.3)
    op.on_kill()
    thread.join(timeout=30)
    assert not thread.is_alive() and "error" in outcome, outcome
    assert isinstance(outcome["error"], TaskCancelled), outcome["error"]
    assert "the task was cancelled" in str(outcome["error"]), outcome["error"]
    with Store.open(str(store_dir), PASSPHRASE) as store:
        assert store.snapshot_ids() == []


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_base_backup_operator_unlocks_the_store_while_it_connects(pg_factory, tmp_path, monkeypatch,
                                                                 caplog) -> None:
    """As the CLI (store/opening.py): the store's open waits until the task's replication connection holds its
    temporary slot, on the unlock thread, and the backup still completes. A retry finds the earlier try's snapshot
    once the store is open, also with the server unreachable by then; no secret reaches the log or XCom."""
    import logging
    import threading
    import time
    from collections.abc import Callable

    from tests.physical.conftest import scalar

    src = pg_factory(15)
    store_dir = tmp_path / "store"
    Store.create(str(store_dir), PASSPHRASE).close()
    set_conns(monkeypatch, src, store_dir)
    seen: dict[str, Any] = {}
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:  # the first try's open only
        if seen:
            return real_open(cls, *args, **kwargs)
        seen["thread"] = threading.current_thread().name
        deadline = time.monotonic() + 30
        slot = "SELECT count(*) FROM pg_replication_slots WHERE temporary"
        # on the task's own thread nobody else would connect meanwhile: do not wait in vain
        while threading.current_thread() is not threading.main_thread() and time.monotonic() < deadline:
            if scalar(src, slot):
                break
            time.sleep(0.02)
        seen["slot_first"] = bool(scalar(src, slot))
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Store, "open", classmethod(held))
    op = PgPlakarBaseBackupOperator(task_id="base_backup", checkpoint="fast")
    ti = phys_ti()
    with caplog.at_level(logging.INFO):
        sid = op.execute(context(ti))
        assert seen == {"thread": "pgplakar-unlock", "slot_first": True}
        set_conns(monkeypatch, SimpleNamespace(host="127.0.0.1", port=_unused_port(), superuser=src.superuser,
                                               password=src.password, bin_dir=src.bin_dir), store_dir)
        ti.try_number = 2
        assert op.execute(context(ti)) == sid  # the server is down: the earlier try's snapshot is the result
    assert [t.name for t in threading.enumerate() if t.name.startswith("pgplakar-")] == []
    assert "already committed by an earlier try" in caplog.text
    for secret in (PASSPHRASE, src.password):
        assert secret not in caplog.text and secret not in json.dumps(ti.pushed, default=repr)
    monkeypatch.undo()
    with Store.open(str(store_dir), PASSPHRASE) as store:
        assert store.snapshot_ids() == [sid] and list(store.backend.list("locks/")) == []
        header = store.load_snapshot(sid).header
        with store.open_record(store.find_record(sid, "/data/PG_VERSION")) as f:
            assert f.read() == b"15\n"
    assert header["meta"]["system_identifier"] == str(scalar(src, "SELECT system_identifier FROM "
                                                                  "pg_control_system()"))
    assert header["labels"]["try_number"] == "1" and ti.pushed["stats"]["snapshot_id"] == sid
