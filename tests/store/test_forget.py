"""``store.forget.forget`` (shared by ``pgplakar forget`` and PgPlakarForgetOperator) on a real store: kept and removed
IDs, dry runs, and the default grouping by source identity (issue 11 §7: never by ``map_index``)."""

from __future__ import annotations

import pendulum
import pytest

from airflow_provider_pgplakar.store.forget import forget, source_key
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.retention import Policy


def put(store: Store, when: str, origin: str, kind: str = "postgres", **labels: str) -> str:
    with store.writer(source={"kind": kind, "origin": origin}, labels=labels) as w:
        w._start = pendulum.parse(when)  # a snapshot taken at `when`
        w.add_bytes("/f", f"{origin} {when}".encode())
    return w.snapshot_id


def test_source_key_is_host_port_database() -> None:
    assert source_key({"kind": "postgres", "origin": "postgres://alice@db1:5432/sales"}) == "postgres:db1:5432/sales"
    assert source_key({"kind": "postgres", "origin": "postgres+aws://iam_user@db1:5432/sales"}) == \
        "postgres:db1:5432/sales"
    assert source_key({"kind": "postgres+bin", "origin": "postgres+bin://repl@[::1]:5433"}) == "postgres+bin:[::1]:5433"
    assert source_key({"kind": "files", "origin": "/srv/data"}) == "files:/srv/data"
    assert source_key({"kind": "postgres", "origin": "postgres://db1:5432"}) != \
        source_key({"kind": "postgres", "origin": "postgres://db1:5432/sales"})  # the cluster vs one database


def test_forget_by_policy_groups_by_source(store: Store) -> None:
    """Fan-out snapshots of one database under changing map_index and users are one group; another database is
    another group."""
    day = "2026-03-0{}T02:00:00+00:00"
    sales = [put(store, day.format(1), "postgres://a@db1:5432/sales", map_index="0", dag_id="nightly"),
             put(store, day.format(2), "postgres://b@db1:5432/sales", map_index="2", dag_id="nightly"),
             put(store, day.format(3), "postgres+aws://c@db1:5432/sales", map_index="1", dag_id="other")]
    crm = [put(store, day.format(1), "postgres://a@db1:5432/crm", map_index="1"),
           put(store, day.format(2), "postgres://a@db1:5432/crm", map_index="0")]

    dry = forget(store, Policy(keep_last=1), dry_run=True)
    assert dry.dry_run and sorted(dry.removed) == sorted(sales[:2] + crm[:1])
    assert sorted(dry.kept) == sorted([sales[2], crm[1]])
    assert sorted(g["group"] for g in dry.groups) == ["source=postgres:db1:5432/crm", "source=postgres:db1:5432/sales"]
    assert len(store.snapshot_ids()) == 5  # a dry run deletes nothing

    done = forget(store, Policy(keep_last=1))
    assert done.as_dict()["removed"] == dry.removed and not done.dry_run
    assert sorted(store.snapshot_ids()) == sorted([sales[2], crm[1]])

    by_dag = forget(store, Policy(keep_last=1), group_by=("label:dag_id",), dry_run=True)
    assert by_dag.removed == [] and len(by_dag.groups) == 2  # "other" and "" (crm has no dag_id)


def test_forget_by_ids_and_refusals(store: Store) -> None:
    a = put(store, "2026-01-01T00:00:00+00:00", "/data", kind="files")
    b = put(store, "2026-01-02T00:00:00+00:00", "/data", kind="files")
    res = forget(store, ids=[a[:8]], dry_run=True)
    assert res.removed == [a] and res.kept == [b] and len(store.snapshot_ids()) == 2
    assert forget(store, ids=[a]).removed == [a] and store.snapshot_ids() == [b]
    for kwargs, msg in (({"policy": Policy(keep_last=1), "ids": [b]}, "not both"), ({}, "needs snapshot IDs"),
                        ({"ids": b}, "not a string")):
        with pytest.raises(ValueError, match=msg):
            forget(store, **kwargs)
    assert store.snapshot_ids() == [b]


def test_verify_reports_follow_the_snapshot_they_verify(store: Store) -> None:
    """A report is not a source (alone in its group it was kept forever): it goes with its snapshot."""
    from airflow_provider_pgplakar.pg.verify import VERIFIES_LABEL, VERIFY_KIND
    from airflow_provider_pgplakar.store.forget import NOT_BACKUP_KINDS
    from airflow_provider_pgplakar.store.forget import VERIFIES_LABEL as LABEL

    assert VERIFY_KIND in NOT_BACKUP_KINDS and VERIFIES_LABEL == LABEL
    old = put(store, "2026-03-01T02:00:00+00:00", "postgres://u@db1:5432/sales")
    new = put(store, "2026-03-02T02:00:00+00:00", "postgres://u@db1:5432/sales")
    of_old = put(store, "2026-03-03T02:00:00+00:00", f"verify of {old}", kind=VERIFY_KIND, verifies=old)
    of_new = put(store, "2026-03-03T03:00:00+00:00", f"verify of {new}", kind=VERIFY_KIND, verifies=new)
    orphan = put(store, "2026-03-03T04:00:00+00:00", "verify of gone", kind=VERIFY_KIND, verifies="f" * 32)
    unknown = put(store, "2026-03-03T05:00:00+00:00", "verify of ?", kind=VERIFY_KIND)
    res = forget(store, Policy(keep_last=1))
    assert sorted(res.removed) == sorted([old, of_old, orphan])
    assert sorted(res.kept) == sorted([new, of_new, unknown])
    assert res.groups[-1]["group"].startswith("verify reports") and len(res.groups) == 2
    assert sorted(store.snapshot_ids()) == sorted([new, of_new, unknown])
