"""Weekly restore drill: verify the newest snapshot of every source in the store.

``newest_snapshots`` lists the newest logical (``postgres://``) or physical (``postgres+bin://``) backup of each
source (verify reports and manifest-only snapshots are skipped); ``verify`` is mapped over them: each restores one
snapshot into a throwaway PostgreSQL on the worker (the newest installed major >= the source's, or
``params.verify_pg_bin_dir``), compares it with the fingerprints recorded at backup time, runs ``pg_amcheck`` when
``params.amcheck`` is set, stores the report as a snapshot labelled ``verifies=<snapshot id>`` (``pgplakar at STORE
ls --verified`` lists them) and returns it as XCom. Any failed verify fails its mapped task, naming the table or
extension.

Snapshots taken with ``fingerprint=full`` are proven row for row; ``catalog`` ones (the default) are proven to
restore with every relation, column, index, constraint and extension, with row counts reported; physical ones are
started with their own major and compared with the manifest captured at backup time.

The store connection is read only when tasks run: ``pgplakar_store_default`` (or ``PGPLAKAR_STORE_CONN_ID``).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from airflow_provider_pgplakar.operators.verify import PgPlakarVerifyOperator

STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_restore_drill",
    description="Weekly: verify the newest snapshot of every source in a throwaway server",
    schedule="0 5 * * 6",  # weekly, Saturday 05:00
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "verify_pg_bin_dir": Param("", type="string",
                                   description="bin dir of the verify server (empty: newest installed)"),
        "amcheck": Param(True, type="boolean"),
    },
    tags=["pgplakar", "restore-test", "postgres"],
    doc_md=__doc__,
) as dag:

    @task
    def newest_snapshots() -> list[str]:
        """The newest snapshot ID of each source."""
        from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook
        from airflow_provider_pgplakar.pg.verify import newest_per_source

        params = get_current_context()["params"]
        with PgPlakarStoreHook(params["store_conn_id"]).get_store() as store:
            ids = newest_per_source(store)
        print(f"{len(ids)} source(s) to verify: {', '.join(i[:8] for i in ids) or 'none'}")
        return ids

    PgPlakarVerifyOperator.partial(
        task_id="verify",
        store_conn_id="{{ params.store_conn_id }}",
        options={"pg_bin_dir": "{{ params.verify_pg_bin_dir }}", "amcheck": "{{ params.amcheck }}"},
    ).expand(snapshot_id=newest_snapshots())
