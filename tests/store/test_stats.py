"""``store.stats``: per-source newest snapshot, age, sizes and store totals, and ``freshness`` naming every stale
source, on a real (local) store."""

from __future__ import annotations

import random
from datetime import timedelta

import pendulum
import pytest

from airflow_provider_pgplakar.pg.verify import VERIFY_KIND
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.stats import NOT_BACKUP_KINDS, age_text, freshness, store_stats

NOW = pendulum.datetime(2026, 6, 10, 12, 0, tz="UTC")


def put(store: Store, hours_ago: float, origin: str, data: bytes, kind: str = "postgres", **labels: str) -> str:
    with store.writer(source={"kind": kind, "origin": origin}, labels=labels) as w:
        w._start = NOW.subtract(seconds=int(hours_ago * 3600))
        w.add_bytes("/dump", data, chunking=Chunking.fixed(16 * 1024))  # an appended tail is one new chunk
    return w.snapshot_id


@pytest.fixture
def local_store(tmp_path):
    st = Store.create(str(tmp_path / "store"), "pw")
    yield st
    st.close()


def test_stats_per_source_and_totals(local_store: Store) -> None:
    st = local_store
    big = random.Random(1).randbytes(300_000)
    old_sales = put(st, 50, "postgres://a@db1:5432/sales", big, map_index="0")
    new_sales = put(st, 2, "postgres+aws://b@db1:5432/sales", big + b"tail", map_index="3")  # mostly deduplicated
    crm = put(st, 30, "postgres://a@db1:5432/crm", random.Random(2).randbytes(50_000))
    put(st, 1, f"verify of {new_sales}", b"{}", kind=VERIFY_KIND)  # not a source
    assert VERIFY_KIND in NOT_BACKUP_KINDS

    rep = store_stats(st, now=NOW)
    by = {s.source: s for s in rep.sources}
    assert set(by) == {"source=postgres:db1:5432/sales", "source=postgres:db1:5432/crm"}
    sales = by["source=postgres:db1:5432/sales"]
    assert (sales.snapshots, sales.newest, sales.age_s) == (2, new_sales, 7200.0)
    assert sales.origin == "postgres:postgres+aws://b@db1:5432/sales"
    assert sales.bytes == 300_004 and 0 < sales.new_bytes < 20_000  # the shared chunks were not new
    old = st.load_snapshot(old_sales).header["stats"]
    assert sales.stored_bytes_total == old["new_stored_bytes"] + sales.new_stored_bytes
    assert by["source=postgres:db1:5432/crm"].newest == crm
    assert rep.snapshots == 4 and rep.logical_bytes == 300_000 + 300_004 + 50_000 + 2
    assert rep.stored_bytes == sum(o.size for o in st.backend.list("packs/")) and rep.packs >= 1
    assert rep.dedup_ratio == round(rep.logical_bytes / rep.stored_bytes, 2) and rep.dedup_ratio > 1.3
    d = rep.as_dict()
    assert d["sources"][0]["age"] in ("30h", "2h") and d["dedup_ratio"] == rep.dedup_ratio

    by_label = store_stats(st, group_by=("label:map_index",), now=NOW)
    assert sorted(s.source for s in by_label.sources) == ["label:map_index=", "label:map_index=0",
                                                          "label:map_index=3"]


def test_freshness_names_every_stale_source(local_store: Store) -> None:
    st = local_store
    assert not freshness(st, "26h", now=NOW).ok  # an empty store is not fresh
    assert "no backups" in freshness(st, "26h", now=NOW).failure_text()
    put(st, 2, "postgres://a@db1:5432/sales", b"x")
    put(st, 30, "postgres://a@db1:5432/crm", b"y")
    put(st, 27, "/srv/files", b"z", kind="files")
    rep = freshness(st, "26h", now=NOW)
    assert not rep.ok
    assert [s.source for s in rep.stale] == ["source=files:/srv/files", "source=postgres:db1:5432/crm"]
    text = rep.failure_text()
    assert text.startswith("2 of 3 source(s) have no snapshot newer than 26h: ")
    assert "source=postgres:db1:5432/crm" in text and "30h old" in text and "sales" not in text
    assert rep.as_dict()["stale"] == ["source=files:/srv/files", "source=postgres:db1:5432/crm"]
    assert freshness(st, "2d", now=NOW).ok
    assert freshness(st, timedelta(hours=31), now=NOW).ok
    with pytest.raises(ValueError, match="max_age: '26 hours' is not a duration"):
        freshness(st, "26 hours", now=NOW)


def test_age_text() -> None:
    assert [age_text(s) for s in (5, 120, 3600, 3660, 26 * 3600, 86400 * 2 + 3600, 86400 * 4, 86400 * 4 + 7200)] == \
        ["5s", "2min", "1h", "1h1min", "26h", "49h", "4d", "4d2h"]
