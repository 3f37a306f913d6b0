"""One snapshot per database: list the server's databases, back each up in its own mapped task, then summarise.

Each database gets its own task instance (``map_index_template`` shows the database name in the UI instead of
0, 1, 2), so one failing database is retried on its own and the others are not redone; ``max_active_tis_per_dag``
caps how many ``pg_dump`` run against the server at once. Every snapshot carries the labels dag_id, run_id,
task_id, map_index and try_number, so a retried mapped task reuses its snapshot instead of writing a second one.

Params: ``database_pattern`` (shell-style glob over database names, default ``*``), ``exclude_databases`` (shell
patterns, default ``template1`` and the scratch databases ``*_restore_check``, ``pgplakar_verify_*``), and the
connection ids (defaults from ``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID``, else ``postgres_default``
/ ``pgplakar_store_default``). Connections are read only when a task runs.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_fanout_per_database",
    description="One pgplakar snapshot per PostgreSQL database (dynamic task mapping)",
    schedule="45 1 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "postgres_conn_id": Param(POSTGRES_CONN_ID, type="string"),
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "database_pattern": Param("*", type="string", description="glob over database names (fnmatch)"),
        "exclude_databases": Param(["template1", "*_restore_check", "pgplakar_verify_*"], type="array",
                                   items={"type": "string"}, description="shell patterns (fnmatch)"),
    },
    tags=["pgplakar", "backup", "postgres"],
    doc_md=__doc__,
) as dag:

    @task
    def list_databases() -> list[str]:
        """The connectable databases that match the params (``template0`` never accepts connections)."""
        from fnmatch import fnmatchcase

        from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook
        from airflow_provider_pgplakar.pg.connect import connect
        from airflow_provider_pgplakar.pg.connect import list_databases as server_databases
        from airflow_provider_pgplakar.pg.logical import excluded
        from airflow_provider_pgplakar.pg.secrets import ssl_files

        params = get_current_context()["params"]
        opts = PgPlakarPostgresHook(params["postgres_conn_id"]).source_options().options
        with ssl_files(opts.conn) as ssl, connect(opts.conn, ssl, opts.database or "postgres") as conn:
            names = server_databases(conn)
        patterns = params["exclude_databases"]
        selected = [n for n in names if fnmatchcase(n, params["database_pattern"]) and not excluded(n, patterns)]
        if not selected:
            raise ValueError(f"no database matches {params['database_pattern']!r} (server has: {', '.join(names)})")
        return selected

    databases = list_databases()

    backups = PgPlakarBackupOperator.partial(
        task_id="backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        tags=["per-database"],
        map_index_template="{{ task.database }}",
        max_active_tis_per_dag=4,
        retries=2,
        retry_delay=timedelta(minutes=5),
    ).expand(database=databases)

    @task(multiple_outputs=False)
    def summarize(names: list[str], snapshot_ids: list[str]) -> dict[str, Any]:
        """Fan-in: which snapshot holds which database, with its size, from the store itself."""
        from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook
        from airflow_provider_pgplakar.store.sizes import human_bytes

        params = get_current_context()["params"]
        ids = list(snapshot_ids)  # a lazy sequence of every mapped return_value, in map_index order
        out: dict[str, Any] = {}
        with PgPlakarStoreHook(params["store_conn_id"]).get_store() as store:
            for name, sid in zip(names, ids, strict=True):
                header = store.load_snapshot(sid).header
                out[name] = {"snapshot": sid, "bytes": header["stats"]["bytes"],
                             "map_index": header["labels"].get("map_index")}
                print(f"{name:30} {sid[:8]}  {human_bytes(header['stats']['bytes']):>10}")
        return {"databases": out, "count": len(out)}

    summarize(databases, backups.output)
