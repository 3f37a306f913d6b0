"""PgPlakarCheck/Forget/Prune/FreshnessOperator ``execute()`` in isolation (a plain dict context) on a real store,
through a ``pgplakar_store`` connection given as an ``AIRFLOW_CONN_*`` variable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pendulum
import pytest

from airflow_provider_pgplakar.operators.maintenance import (
    PgPlakarCheckOperator,
    PgPlakarForgetOperator,
    PgPlakarFreshnessOperator,
    PgPlakarPruneOperator,
)
from airflow_provider_pgplakar.store.check import CheckFailed
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.stats import StaleSources
from tests.task_context import FakeTI, context

PASSPHRASE = "maintenance-operators passphrase"


@pytest.fixture
def location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    loc = str(tmp_path / "store")
    monkeypatch.setenv("AIRFLOW_CONN_MAINT_STORE", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": loc}}))
    Store.create(loc, PASSPHRASE, pack_target=64 * 1024).close()
    return loc


def put(location: str, hours_ago: float, origin: str, data: bytes, **labels: str) -> str:
    kind = origin.partition("://")[0]
    with Store.open(location, PASSPHRASE) as st, st.writer(source={"kind": kind, "origin": origin},
                                                           labels=labels) as w:
        w._start = pendulum.now("UTC").subtract(seconds=int(hours_ago * 3600))
        w.add_bytes("/00001-db.dump", data, chunking=Chunking.fixed(16 * 1024))
    return w.snapshot_id


def run(op, **params):  # noqa: ANN001, ANN201
    ctx = context(FakeTI(task_id=op.task_id), **params)
    op.render_template_fields(ctx)
    return op.execute(ctx)


def payload(seed: int) -> bytes:
    return random.Random(seed).randbytes(400_000)


def test_forget_then_prune_frees_the_data_and_keeps_the_rest_exact(location: str) -> None:
    ids = [put(location, 72 - 24 * i, "postgres://u@db1:5432/sales", payload(i), map_index=str(i)) for i in range(3)]
    crm = put(location, 1, "postgres://u@db1:5432/crm", payload(9), map_index="0")

    dry = run(PgPlakarForgetOperator(task_id="forget", store_conn_id="{{ params.store }}", keep_last=1,
                                     dry_run=True), store="maint_store")
    assert dry["dry_run"] and sorted(dry["removed"]) == sorted(ids[:2]) and sorted(dry["kept"]) == sorted([ids[2], crm])
    with Store.open(location, PASSPHRASE) as st:
        assert len(st.snapshot_ids()) == 4
    res = run(PgPlakarForgetOperator(task_id="forget", store_conn_id="maint_store", keep_last=1))
    assert res["removed"] == dry["removed"] and not res["dry_run"]
    assert [g["group"] for g in res["groups"]] == ["source=postgres:db1:5432/crm", "source=postgres:db1:5432/sales"]

    pruned = run(PgPlakarPruneOperator(task_id="prune", store_conn_id="maint_store"))
    assert pruned["bytes_freed"] >= 2 * 400_000 * 0.9 and pruned["packs_deleted"] >= 2 and pruned["snapshots"] == 2
    again = run(PgPlakarPruneOperator(task_id="prune", store_conn_id="maint_store", dry_run=True))
    assert again["packs_deleted"] == 0 and again["dry_run"]
    with Store.open(location, PASSPHRASE) as st:
        assert sorted(st.snapshot_ids()) == sorted([ids[2], crm])
        for sid, seed in ((ids[2], 2), (crm, 9)):
            with st.open_record(st.find_record(sid, "/00001-db.dump")) as f:
                assert f.read() == payload(seed)
    assert run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store", read_data=True))["ok"]

    by_id = run(PgPlakarForgetOperator(task_id="forget_ids", store_conn_id="maint_store",
                                       snapshot_ids=["{{ params.victim }}"]), victim=crm[:8])
    assert by_id["removed"] == [crm] and by_id["kept"] == [ids[2]]
    nothing = run(PgPlakarForgetOperator(task_id="forget_ids", store_conn_id="maint_store", snapshot_ids=[]))
    assert nothing["removed"] == [] and nothing["kept"] == [ids[2]]


def test_forget_refuses_contradictions_at_parse_time() -> None:
    with pytest.raises(ValueError, match="not both"):
        PgPlakarForgetOperator(task_id="f", keep_last=1, snapshot_ids=["abcd"])
    with pytest.raises(ValueError, match="not both"):  # an empty ID list must not silently disable the policy
        PgPlakarForgetOperator(task_id="f", keep_last=1, snapshot_ids=[])
    with pytest.raises(ValueError, match="at least one keep"):
        PgPlakarForgetOperator(task_id="f")
    with pytest.raises(ValueError, match="keep_within"):
        PgPlakarForgetOperator(task_id="f", keep_within="6 months")
    with pytest.raises(ValueError, match="run_id"):
        PgPlakarForgetOperator(task_id="f", keep_last=1, group_by="label:run_id")
    with pytest.raises(ValueError, match="not both"):
        PgPlakarCheckOperator(task_id="c", read_data=True, read_data_subset="1/7")
    with pytest.raises(ValueError, match="read_data_subset"):
        PgPlakarCheckOperator(task_id="c", read_data_subset="8/7")
    with pytest.raises(ValueError, match="max_age"):
        PgPlakarFreshnessOperator(task_id="fresh", max_age="26 hours")


def test_check_fails_naming_the_broken_pack_and_snapshots(location: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sid = put(location, 1, "postgres://u@db1:5432/sales", payload(1))
    rolling = run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store", read_data_subset="/3"))
    assert rolling["ok"] and rolling["subset"].endswith("/3") and rolling["read_data"]
    full = run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store", read_data=True))
    with Store.open(location, PASSPHRASE) as st:
        obj = max(st.backend.list("packs/"), key=lambda o: o.size)
        data = bytearray(st.backend.get(obj.key))
        data[len(data) // 2] ^= 1
        st.backend.put(obj.key, bytes(data), create_only=False)
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache-after-damage"))
    assert run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store"))["ok"]  # metadata is intact
    with pytest.raises(CheckFailed) as exc:
        run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store", read_data=True))
    msg = str(exc.value)
    assert obj.key in msg and f"Affected snapshots: {sid[:8]}" in msg and PASSPHRASE not in msg
    report = run(PgPlakarCheckOperator(task_id="check", store_conn_id="maint_store", read_data=True,
                                       fail_on_problems=False))
    assert report["ok"] is False and obj.key in {p["object"] for p in report["problems"]}
    assert report["packs_read"] == full["packs_read"]


def test_freshness_fails_naming_every_stale_source(location: str) -> None:
    put(location, 2, "postgres://u@db1:5432/sales", b"a")
    put(location, 30, "postgres://u@db1:5432/crm", b"b")
    put(location, 50, "postgres+bin://u@db2:5432", b"c")
    with pytest.raises(StaleSources) as exc:
        run(PgPlakarFreshnessOperator(task_id="fresh", store_conn_id="maint_store", max_age="{{ params.age }}"),
            age="26h")
    msg = str(exc.value)
    assert msg.startswith("2 of 3 source(s) have no snapshot newer than 26h: ")
    assert "source=postgres:db1:5432/crm" in msg and "source=postgres+bin:db2:5432" in msg and "sales" not in msg
    ok = run(PgPlakarFreshnessOperator(task_id="fresh", store_conn_id="maint_store", max_age="3d"))
    assert ok["ok"] and ok["stale"] == [] and len(ok["sources"]) == 3
