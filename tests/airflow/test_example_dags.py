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


def row_counts(server: PgServer, dbname: str) -> dict[str, int]:
    mod = load_dag_module("pgplakar_backup_restore_check")
    with server.connect(dbname) as c:
        return mod.table_row_counts(c)


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
                                "pgplakar_weekly_physical",
                                "pgplakar_backup_restore_check"}
    nightly = bag.dags["pgplakar_nightly_backup"]
    assert nightly.schedule == "15 2 * * *"
    assert nightly.get_task("manifest").upstream_task_ids == {"backup"}
    fanout = bag.dags["pgplakar_fanout_per_database"]
    assert fanout.get_task("backup").max_active_tis_per_dag == 4
    check = bag.dags["pgplakar_backup_restore_check"]
    assert check.get_task("restore").upstream_task_ids == {"backup", "create_scratch_database"}
    assert check.get_task("compare_row_counts").upstream_task_ids >= {"restore"}


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
    scratch = f"{source}_scratch"
    create_database(pg15, source, SHOP)
    set_connections(monkeypatch, pg15, store_dir, database="postgres")
    dag = load_dag_module("pgplakar_backup_restore_check").dag

    caplog.set_level("DEBUG")
    dr = dag.test(run_conf={"source_database": source, "scratch_database": scratch, "keep_scratch_database": True})
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]

    backup_ti, restore_ti = dr.get_task_instance("backup"), dr.get_task_instance("restore")
    snapshot_id = backup_ti.xcom_pull(task_ids="backup")
    with Store.open(str(store_dir), PASSPHRASE) as store:
        assert store.snapshot_ids() == [snapshot_id]
        labels = store.load_snapshot(snapshot_id).header["labels"]
    assert labels["dag_id"] == "pgplakar_backup_restore_check" and labels["task_id"] == "backup"
    assert labels["run_id"] == dr.run_id and labels["map_index"] == "-1" and labels["try_number"] == "1"
    summary = restore_ti.xcom_pull(task_ids="restore")
    assert summary["snapshot"] == snapshot_id and summary["ok"]  # the ID travelled backup -> restore by XCom
    assert [(r["database"], r["status"]) for r in summary["records"] if r["database"]] == [(scratch, "restored")]
    assert dr.get_task_instance("create_scratch_database").xcom_pull(task_ids="create_scratch_database") == scratch

    expected = row_counts(pg15, source)
    assert expected == {"public.customers": 1200, "public.empty_table": 0, 'public.Mixed Case': 77,
                        "sales.orders": 3500}
    assert row_counts(pg15, scratch) == expected
    check = dr.get_task_instance("compare_row_counts").xcom_pull(task_ids="compare_row_counts")
    assert check["counts"] == expected and check["rows"] == 4777

    out, err = capfd.readouterr()
    _secrets_absent(dag.dag_id, dr.run_id, [out, err, caplog.text], pg15.password, PASSPHRASE)


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
