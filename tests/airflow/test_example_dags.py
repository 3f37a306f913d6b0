"""The example DAGs: they import cleanly, and two of them run end to end with ``dag.test()`` against a real server.

Connections come from ``AIRFLOW_CONN_*`` environment variables (JSON form), exactly as a deployment would set
them; the DAG files themselves read nothing at parse time.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from airflow_provider_pgplakar.store.repo import Store
from tests.conftest import REPO_ROOT
from tests.pgservers import PgServer

DAGS_DIR = REPO_ROOT / "example_dags"
PASSPHRASE = "example-dags store passphrase"
SHOP = [
    "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL)",
    "INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 1200) g",
    "CREATE SCHEMA sales",
    "CREATE TABLE sales.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    " customer_id int REFERENCES customers(id), total numeric(10,2))",
    "INSERT INTO sales.orders (customer_id, total) SELECT 1 + g % 1200, g * 0.25 FROM generate_series(1, 3500) g",
    'CREATE TABLE "Mixed Case" (v text)',
    "INSERT INTO \"Mixed Case\" SELECT md5(g::text) FROM generate_series(1, 77) g",
    "CREATE TABLE empty_table (x int)",
]


def load_dag_module(name: str) -> ModuleType:
    """Import ``example_dags/<name>.py`` as a module (example_dags is a DAGS_FOLDER, not a package)."""
    mod_name = f"pgplakar_example_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, DAGS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def set_connections(monkeypatch: pytest.MonkeyPatch, server: PgServer, store_location: Path,
                    database: str | None = None) -> None:
    """``postgres_default`` and ``pgplakar_store_default`` as JSON ``AIRFLOW_CONN_*`` variables."""
    pg: dict[str, Any] = {"conn_type": "postgres", "host": server.host, "port": server.port,
                          "login": server.superuser, "password": server.password,
                          "extra": {"pg_bin_dir": str(server.bin_dir)}}
    if database:
        pg["schema"] = database
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", json.dumps(pg))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(store_location)}}))


def create_database(server: PgServer, name: str, statements: list[str]) -> None:
    with server.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    with server.connect(name) as c:
        for q in statements:
            c.execute(q)




@pytest.fixture(autouse=True)
def _fast_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    location = tmp_path / "store"
    Store.create(str(location), PASSPHRASE).close()
    return location


def test_example_dags_import_without_errors() -> None:
    """DagBag over example_dags/ with no connection defined: no import errors, every example DAG, no cycles."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"pgplakar_nightly_backup", "pgplakar_fanout_per_database", "pgplakar_iam_backup",
                                "pgplakar_weekly_physical", "pgplakar_restore_on_demand",
                                "pgplakar_backup_restore_check", "pgplakar_restore_drill",
                                "pgplakar_verify_after_backup", "pgplakar_store_maintenance",
                                "pgplakar_wait_for_backup"}
    nightly = bag.dags["pgplakar_nightly_backup"]
    assert nightly.schedule == "15 2 * * *"
    assert nightly.get_task("manifest").upstream_task_ids == {"backup"}
    fanout = bag.dags["pgplakar_fanout_per_database"]
    assert fanout.get_task("backup").max_active_tis_per_dag == 4
    check = bag.dags["pgplakar_backup_restore_check"]
    assert check.get_task("verify").upstream_task_ids == {"backup"}
    drill = bag.dags["pgplakar_restore_drill"]
    assert drill.get_task("verify").upstream_task_ids == {"newest_snapshots"}
    after = bag.dags["pgplakar_verify_after_backup"]
    assert "pgplakar-backups" in repr(after.timetable.asset_condition)


def _secrets_absent(dag_id: str, run_id: str, texts: list[str], *needles: str) -> None:
    """No secret in the captured output, the rendered template fields or any XCom of the run."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rendered = session.scalars(select(RenderedTaskInstanceFields).where(
            RenderedTaskInstanceFields.dag_id == dag_id, RenderedTaskInstanceFields.run_id == run_id)).all()
        xcoms = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id)).all()
        assert rendered, "no rendered template fields recorded"
        blobs = [json.dumps(r.rendered_fields, default=str) for r in rendered]
        blobs += [json.dumps(x.value, default=str) for x in xcoms]
    for needle in needles:
        for blob in blobs + texts:
            assert needle not in blob


def test_backup_restore_check_dag_end_to_end(pg15: PgServer, store_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                             airflow_db: None) -> None:
    source = f"shop_{secrets.token_hex(4)}"
    create_database(pg15, source, SHOP)
    set_connections(monkeypatch, pg15, store_dir, database="postgres")
    dag = load_dag_module("pgplakar_backup_restore_check").dag

    caplog.set_level("DEBUG")
    dr = dag.test(run_conf={"source_database": source, "verify_pg_bin_dir": str(pg15.bin_dir)})
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]

    snapshot_id = dr.get_task_instance("backup").xcom_pull(task_ids="backup")
    report = dr.get_task_instance("verify").xcom_pull(task_ids="verify")
    assert report["snapshot_id"] == snapshot_id and report["ok"]  # the ID travelled backup -> verify by XCom
    assert report["server"].startswith("PostgreSQL 15.")
    (db,) = report["databases"]
    found = {f["object"]: (f["status"], f["found"]) for f in db["findings"]}
    assert db["level"] == "full"
    assert {k: found[k] for k in ("public.customers", "public.empty_table", 'public."Mixed Case"', "sales.orders")} \
        == {"public.customers": ("ok", 1200), "public.empty_table": ("ok", 0), 'public."Mixed Case"': ("ok", 77),
            "sales.orders": ("ok", 3500)}
    with Store.open(str(store_dir), PASSPHRASE) as store:
        snaps = {s.id: s.header for s in store.snapshots()}
    labels = snaps[snapshot_id]["labels"]
    assert labels["dag_id"] == "pgplakar_backup_restore_check" and labels["task_id"] == "backup"
    assert labels["run_id"] == dr.run_id and labels["map_index"] == "-1" and labels["try_number"] == "1"
    (proof,) = [h for sid, h in snaps.items() if sid != snapshot_id]
    assert proof["labels"]["verifies"] == snapshot_id and proof["labels"]["verify_status"] == "passed"
    assert proof["labels"]["task_id"] == "verify" and proof["labels"]["run_id"] == dr.run_id

    # the backup's Asset event (through the pgplakar-backups alias) and its stats XCom
    stats = dr.get_task_instance("backup").xcom_pull(task_ids="backup", key="stats")
    assert stats["snapshot_id"] == snapshot_id and stats["kind"] == "postgres"
    assert [row["database"] for row in stats["databases"]] == [source] and stats["databases"][0]["bytes"] > 0
    assert stats["databases"][0]["seconds"] > 0  # how long its pg_dump ran
    assert stats["bytes"] == snaps[snapshot_id]["stats"]["bytes"] and stats["new_bytes"] > 0
    (event,) = asset_events(dag.dag_id, dr.run_id)
    assert event[0] == f"pgplakar://{pg15.host}:{pg15.port}/{source}"
    assert event[1] == {"snapshot_id": snapshot_id, "store": str(store_dir), "kind": "postgres",
                        "bytes": stats["bytes"], "new_bytes": stats["new_bytes"], "duration_s": stats["duration_s"],
                        "database": source, "database_bytes": stats["databases"][0]["bytes"]}

    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    assert f"snapshot {snapshot_id} (postgres) in {store_dir}: " in logs and f"  {source}: " in logs  # the summary
    _secrets_absent(dag.dag_id, dr.run_id, [out, err, caplog.text], pg15.password, PASSPHRASE)


def asset_events(dag_id: str, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(URI, extra) of the Asset events the run's tasks emitted."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetModel.uri, AssetEvent.extra).join(
            AssetModel, AssetEvent.asset_id == AssetModel.id).where(
            AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run_id)).all()
    return [(uri, extra) for uri, extra in rows]


def test_restore_drill_verifies_the_newest_snapshot_of_each_source(pg15: PgServer, store_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   airflow_db: None) -> None:
    from airflow_provider_pgplakar.pg.logical import logical_backup
    from airflow_provider_pgplakar.pg.options import parse_source_options

    names = [f"drill_{secrets.token_hex(3)}_{s}" for s in ("a", "b")]
    for name in names:
        create_database(pg15, name, SHOP[:2])
    set_connections(monkeypatch, pg15, store_dir)
    newest = {}
    with Store.open(str(store_dir), PASSPHRASE) as store:
        for name in names + names[:1]:  # two snapshots of the first source: only the newer is verified
            opts = parse_source_options(f"postgres:///{name}", {
                "host": pg15.host, "port": str(pg15.port), "username": pg15.superuser, "password": pg15.password,
                "pg_bin_dir": str(pg15.bin_dir)})
            newest[name] = logical_backup(store, opts).snapshot_id
    dag = load_dag_module("pgplakar_restore_drill").dag
    dr = dag.test(run_conf={"verify_pg_bin_dir": str(pg15.bin_dir), "amcheck": False})
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]
    listed = dr.get_task_instance("newest_snapshots").xcom_pull(task_ids="newest_snapshots")
    assert sorted(listed) == sorted(newest.values())
    with Store.open(str(store_dir), PASSPHRASE) as store:
        proven = {s.header["labels"].get("verifies"): s.header["labels"].get("verify_status")
                  for s in store.snapshots() if s.header["source"]["kind"] == "pgplakar-verify"}
    assert proven == {sid: "passed" for sid in newest.values()}


def test_fanout_dag_one_snapshot_per_database(pg15: PgServer, store_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              airflow_db: None) -> None:
    prefix = f"fan_{secrets.token_hex(3)}"
    names = [f"{prefix}_{s}" for s in ("a", "b", "c")]
    for i, name in enumerate(names):
        create_database(pg15, name, ["CREATE TABLE t (n int)",
                                     f"INSERT INTO t SELECT generate_series(1, {100 * (i + 1)})"])
    set_connections(monkeypatch, pg15, store_dir)
    dag = load_dag_module("pgplakar_fanout_per_database").dag

    dr = dag.test(run_conf={"database_pattern": f"{prefix}_*"})
    assert dr.state == "success", [(ti.task_id, ti.map_index, ti.state) for ti in dr.get_task_instances()]

    mapped = sorted((ti for ti in dr.get_task_instances() if ti.task_id == "backup"), key=lambda ti: ti.map_index)
    assert [ti.map_index for ti in mapped] == [0, 1, 2]
    assert [ti.rendered_map_index for ti in mapped] == names  # map_index_template = the database name
    summary = dr.get_task_instance("summarize").xcom_pull(task_ids="summarize")
    assert summary["count"] == 3 and list(summary["databases"]) == names

    with Store.open(str(store_dir), PASSPHRASE) as store:
        ids = store.snapshot_ids()
        assert len(ids) == 3
        by_db = {}
        for sid in ids:
            header = store.load_snapshot(sid).header
            assert header["labels"]["task_id"] == "backup" and header["labels"]["run_id"] == dr.run_id
            (database,) = header["meta"]["databases"]  # exactly one database per snapshot
            by_db[database] = header["labels"]["map_index"]
    assert by_db == {name: str(i) for i, name in enumerate(names)}
    assert {summary["databases"][n]["snapshot"] for n in names} == set(ids)


# -- store maintenance and waiting for a backup (issue 11 §1, §2) ----------------------------------------------------
def _backup(server: PgServer, store: Store, database: str, **kw: Any) -> str:
    from airflow_provider_pgplakar.pg.logical import logical_backup
    from airflow_provider_pgplakar.pg.options import parse_source_options

    opts = parse_source_options(f"postgres:///{database}", {
        "host": server.host, "port": str(server.port), "username": server.superuser, "password": server.password,
        "pg_bin_dir": str(server.bin_dir)})
    return logical_backup(store, opts, **kw).snapshot_id


def _dump_bytes(store: Store, sid: str) -> bytes:
    (rec,) = [r for r in store.records(sid) if r.path.endswith(".dump")]
    with store.open_record(rec) as f:
        return f.read()


def test_store_maintenance_dag_end_to_end(pg15: PgServer, store_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          airflow_db: None) -> None:
    """Three fan-out backups of one database today (map_index 0, 1, 2) are one source: forget keeps the newest,
    prune frees the rest, the rolling check reads today's slice, freshness fails naming only the stale source; the
    kept snapshot reads back byte for byte."""
    import pendulum

    name = f"maint_{secrets.token_hex(3)}"
    create_database(pg15, name, SHOP)
    set_connections(monkeypatch, pg15, store_dir)
    with Store.open(str(store_dir), PASSPHRASE) as store:
        ids = []
        for i in range(3):
            with pg15.connect(name) as c:
                c.execute(f"INSERT INTO customers (name) SELECT 'run {i} ' || g FROM generate_series(1, 500) g")
            ids.append(_backup(pg15, store, name, labels={"dag_id": "fanout", "task_id": "backup",
                                                          "map_index": str(i)}))
        with store.writer(source={"kind": "files", "origin": "/srv/old-host"}) as w:  # a source that stopped
            w._start = pendulum.now("UTC").subtract(hours=30)
            w.add_bytes("/f", b"old")
        stale = w.snapshot_id
        kept_before = _dump_bytes(store, ids[2])
    dag = load_dag_module("pgplakar_store_maintenance").dag

    dr = dag.test(run_conf={"max_age": "26h", "check_subset": "/7"})
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states == {"forget": "success", "prune": "success", "check": "success", "freshness": "failed"}, states
    forget = dr.get_task_instance("forget").xcom_pull(task_ids="forget")
    assert sorted(forget["removed"]) == sorted(ids[:2]) and sorted(forget["kept"]) == sorted([ids[2], stale])
    pruned = dr.get_task_instance("prune").xcom_pull(task_ids="prune")
    assert pruned["bytes_freed"] > 0 and pruned["packs_deleted"] >= 1 and pruned["snapshots"] == 2
    check = dr.get_task_instance("check").xcom_pull(task_ids="check")
    assert check["ok"] and check["subset"].endswith("/7") and check["read_data"]

    with Store.open(str(store_dir), PASSPHRASE) as store:
        assert sorted(store.snapshot_ids()) == sorted([ids[2], stale])
        assert _dump_bytes(store, ids[2]) == kept_before
        from airflow_provider_pgplakar.store.check import check as full_check

        assert full_check(store, read_data=True).ok

    dr2 = dag.test(run_conf={"max_age": "2d"})  # both sources are younger than two days: no alert
    assert {ti.task_id: ti.state for ti in dr2.get_task_instances()} == dict.fromkeys(states, "success")
    fresh = dr2.get_task_instance("freshness").xcom_pull(task_ids="freshness")
    assert fresh["ok"] and {s["source"] for s in fresh["sources"]} == {
        f"source=postgres:{pg15.host}:{pg15.port}/{name}", "source=files:/srv/old-host"}


def test_wait_for_backup_dag_defers_until_the_nightly_backup_commits(pg15: PgServer, store_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     airflow_db: None) -> None:
    import threading
    import time

    name = f"wait_{secrets.token_hex(3)}"
    create_database(pg15, name, SHOP[:2])
    set_connections(monkeypatch, pg15, store_dir)
    monkeypatch.setenv("PGPLAKAR_WAIT_POLL_SECONDS", "0.5")
    with Store.open(str(store_dir), PASSPHRASE) as store:  # last night's backup: too old to count
        _backup(pg15, store, name, tags=["nightly"],
                labels={"dag_id": "pgplakar_nightly_backup", "task_id": "backup"})
    time.sleep(1.1)
    made: dict[str, str] = {}

    from airflow_provider_pgplakar.triggers import snapshot as trigger_mod

    polls: list[str] = []
    real_find = trigger_mod.find_snapshot

    def find_and_record(*args: Any, **kwargs: Any) -> Any:
        polls.append(threading.current_thread().name)
        return real_find(*args, **kwargs)

    monkeypatch.setattr(trigger_mod, "find_snapshot", find_and_record)

    def tonight() -> None:
        """Commit tonight's backup once the trigger polls (the sensor deferred: the wait left the worker)."""
        deadline = time.time() + 180
        while time.time() < deadline and not any(n.startswith("asyncio") for n in polls):
            time.sleep(0.2)
        made["deferred"] = "yes" if any(n.startswith("asyncio") for n in polls) else "no"
        time.sleep(1)
        with Store.open(str(store_dir), PASSPHRASE) as st:
            made["id"] = _backup(pg15, st, name, tags=["nightly"],
                                 labels={"dag_id": "pgplakar_nightly_backup", "task_id": "backup"})

    dag = load_dag_module("pgplakar_wait_for_backup").dag
    started = pendulum_now = time.time()
    worker = threading.Thread(target=tonight)
    worker.start()
    dr = dag.test(run_conf={"newer_than": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(pendulum_now)),
                            "source": f"postgres:*/{name}"})
    worker.join()
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]
    assert made.get("deferred") == "yes"  # the sensor was deferred to the trigger before the backup existed
    assert time.time() - started >= 1
    assert dr.get_task_instance("wait_for_backup").xcom_pull(task_ids="wait_for_backup") == made["id"]
    summary = dr.get_task_instance("use_backup").xcom_pull(task_ids="use_backup")
    assert summary["snapshot"] == made["id"] and summary["databases"] == [name]
