"""The backup operator's ``jobs`` parameter (templated) dumps several databases at once into one snapshot."""

from __future__ import annotations

import secrets

import pytest

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.store.repo import Store
from tests.airflow.test_operators import _env, db, store  # noqa: F401 - fixtures (_env is autouse)
from tests.pgservers import PgServer
from tests.task_context import FakeTI, context


def test_backup_operator_jobs_parameter(store: Store, pg15: PgServer, db: str) -> None:  # noqa: F811
    other = db + "_b"
    with pg15.connect() as c:
        c.execute(f'CREATE DATABASE "{other}" TEMPLATE "{db}"')
    try:
        op = PgPlakarBackupOperator(task_id="backup", database="", jobs="{{ params.jobs }}",
                                    options={"exclude_databases": "postgres,template1"})
        ctx = context(FakeTI(), jobs=3)
        op.render_template_fields(ctx)
        assert op.jobs == "3"
        header = store.load_snapshot(op.execute(ctx)).header
        assert header["meta"]["options"]["jobs"] == 3
        assert set(header["meta"]["databases"]) >= {db, other}
        dumps = [r.meta["database"] for r in store.records(header["id"]) if r.path.endswith(".dump")]
        assert dumps == header["meta"]["databases"]  # listing order, as with jobs=1

        with pytest.raises(OptionError, match="jobs"):
            PgPlakarBackupOperator(task_id="b2", database=db, jobs=0).execute(context(FakeTI(task_id="b2")))
    finally:
        with pg15.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')


def test_stats_xcom_gives_each_database_its_new_bytes(store: Store, pg15: PgServer) -> None:  # noqa: F811
    """jobs=2 dumps two databases at once into one snapshot: the one unchanged since the previous snapshot adds
    (almost) nothing, the new one all of its dump; the stats XCom, its summary and the CLI-facing totals agree."""
    token = secrets.token_hex(4)
    old, new = f"nb_{token}_old", f"nb_{token}_new"
    rows = "INSERT INTO t SELECT g, md5(%s || g::text) || md5(g::text || %s) FROM generate_series(1, 60000) g"
    try:
        for name in (old, new):
            with pg15.connect() as c:
                c.execute(f'CREATE DATABASE "{name}"')
        with pg15.connect(old) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
            c.execute(rows, ("old", "old"))
        PgPlakarBackupOperator(task_id="first", database=old).execute(context(FakeTI(task_id="first")))
        with pg15.connect(new) as c:  # created before the first backup, filled after it: new data
            c.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
            c.execute(rows, ("new", "new"))
        with pg15.connect() as c:
            others = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datname NOT IN (%s, %s)",
                                              (old, new))]
        ti = FakeTI(task_id="both")
        sid = PgPlakarBackupOperator(task_id="both", database="", jobs=2,
                                     options={"exclude_databases": ",".join(others)}).execute(context(ti))
        stats = ti.pushed["stats"]
        header = store.load_snapshot(sid).header
        assert header["meta"]["options"]["jobs"] == 2
        rows_by_db = {r["database"]: r for r in stats["databases"]}
        assert set(rows_by_db) == {old, new}
        o, n = rows_by_db[old], rows_by_db[new]
        assert o["bytes"] > 1 << 20 and n["bytes"] > 1 << 20, stats
        assert o["new_bytes"] < 0.2 * o["bytes"] and o["new_stored_bytes"] < 0.2 * o["bytes"], stats  # deduplicated
        assert n["new_bytes"] > 0.8 * n["bytes"] and n["new_stored_bytes"] > 0.3 * n["bytes"], stats  # all new
        # the records' figures are the snapshot's: they add up to no more than its totals
        assert o["new_bytes"] + n["new_bytes"] <= stats["new_bytes"] == header["stats"]["new_raw_bytes"]
        assert o["new_stored_bytes"] + n["new_stored_bytes"] <= stats["new_stored_bytes"]
        meta = header["meta"]
        assert sum(meta["new_stored_bytes"].values()) <= header["stats"]["new_stored_bytes"]
        assert set(meta["new_raw_bytes"]) == {r.path for r in store.records(sid)}
    finally:
        with pg15.connect() as c:
            for name in (old, new):
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
