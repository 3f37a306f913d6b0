"""PgPlakarVerifyOperator.execute() in isolation (a plain dict context) against real servers: the report is stored
with the run labels and returned as XCom; a failed verify fails the task after its report is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_pgplakar.operators.verify import PgPlakarVerifyOperator
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.pg.verify import VerifyFailed, verifications
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import src_opts
from tests.task_context import FakeTI, context

PASSPHRASE = "verify-operator passphrase"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(tmp_path / "store")}}))
    with Store.create(str(tmp_path / "store"), PASSPHRASE) as st:
        yield st


def _backup(store, server, db: str, statements: list[str]) -> str:
    with server.connect() as c:
        c.execute(f"CREATE DATABASE {db}")
    with server.connect(db) as c:
        for q in statements:
            c.execute(q)
    location, opts = src_opts(server, database=db, fingerprint="counts")
    return logical_backup(store, parse_source_options(location, opts)).snapshot_id


def test_operator_returns_the_report_and_stores_it_with_run_labels(pg_factory, pg_manager, store) -> None:
    src = pg_factory(15)
    sid = _backup(store, src, "app", ["CREATE TABLE t (id int)", "INSERT INTO t SELECT generate_series(1, 30)"])
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id="{{ ti.xcom_pull(task_ids='backup') }}",
                                options={"pg_bin_dir": "{{ params.bin }}", "databases": ["app"], "amcheck": True})
    ti = FakeTI(task_id="verify", xcoms={"backup": sid[:10]})
    ctx = context(ti, bin=str(pg_manager.bin_dir(15)))
    op.render_template_fields(ctx)
    out = op.execute(ctx)
    assert out["ok"] and out["status"] == "passed" and out["snapshot_id"] == sid
    assert [(f["object"], f["status"], f["expected"], f["found"]) for f in out["databases"][0]["findings"]] \
        == [("public.t", "ok", 30, 30)]
    (proof,) = verifications(store)[sid]
    assert proof.header["labels"]["task_id"] == "verify" and proof.header["labels"]["verify_status"] == "passed"
    json.dumps(out)  # XCom-serialisable


def test_operator_fails_after_storing_the_report(pg_factory, pg_manager, store) -> None:
    src = pg_factory(15)
    sid = _backup(store, src, "ids", ['CREATE EXTENSION "uuid-ossp"', "CREATE TABLE ids (id uuid)"])
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id=sid, options={"pg_bin_dir": str(pg_manager.bin_dir(18))})
    with pytest.raises(VerifyFailed, match="extension uuid-ossp is not available on the verify server"):
        op.execute(context(FakeTI(task_id="verify")))
    (proof,) = verifications(store)[sid]
    assert proof.header["labels"]["verify_status"] == "failed"


def test_operator_refuses_unknown_options_before_any_work(store) -> None:
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id="abcd", options={"amcheck": "maybe"})
    with pytest.raises(OptionError, match="amcheck: invalid boolean"):
        op.execute(context(FakeTI(task_id="verify")))
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id="abcd", options={"jobs": "2"})
    with pytest.raises(OptionError, match="jobs: unknown verify option"):
        op.execute(context(FakeTI(task_id="verify")))
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id="abcd", options={"target": "postgres://h"})
    with pytest.raises(OptionError, match="target: use target_conn_id"):
        op.execute(context(FakeTI(task_id="verify")))
    assert store.snapshot_ids() == []


def test_operator_verifies_into_a_target_connection(pg_factory, store, monkeypatch) -> None:
    src = pg_factory(15)
    sid = _backup(store, src, "app", ["CREATE TABLE t (id int)", "INSERT INTO t SELECT generate_series(1, 12)"])
    scratch = pg_factory(18)
    monkeypatch.setenv("AIRFLOW_CONN_SCRATCH_PG", json.dumps({
        "conn_type": "postgres", "host": scratch.host, "port": scratch.port, "login": scratch.superuser,
        "password": scratch.password, "extra": {"pg_bin_dir": str(scratch.bin_dir)}}))
    with scratch.connect() as c:
        before = sorted(r[0] for r in c.execute("SELECT datname FROM pg_database"))
    op = PgPlakarVerifyOperator(task_id="verify", snapshot_id=sid, target_conn_id="scratch_pg")
    out = op.execute(context(FakeTI(task_id="verify")))
    assert out["ok"] and out["server"].startswith("PostgreSQL 18.") and scratch.password not in json.dumps(out)
    assert [(f["object"], f["found"]) for f in out["databases"][0]["findings"]] == [("public.t", 12)]
    with scratch.connect() as c:
        assert sorted(r[0] for r in c.execute("SELECT datname FROM pg_database")) == before
