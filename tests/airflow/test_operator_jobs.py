"""The backup operator's ``jobs`` parameter (templated) dumps several databases at once into one snapshot."""

from __future__ import annotations

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
