"""Prove a backup restores: back a database up, restore the snapshot into a scratch database, compare row counts.

``create_scratch_database`` (re)creates an empty scratch database on the same server; ``backup`` dumps
``params.source_database`` and returns the snapshot ID; ``restore`` gets that ID through XCom
(``{{ ti.xcom_pull(task_ids='backup') }}``) and restores only that database's dump into the scratch database
(options ``database=<scratch>`` + ``databases=<source>``, no globals: the roles are already on this server);
``compare_row_counts`` counts the rows of every table in both databases and fails on any difference;
``drop_scratch_database`` removes the scratch database unless ``keep_scratch_database`` is set (it is also kept
when the check fails, for a look).

Connections are read only when tasks run: ``postgres_default`` (standard postgres connection) and
``pgplakar_store_default`` (extra ``location``, password = passphrase); ids overridable with params or the
``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID`` environment variables.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator, PgPlakarRestoreOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
SOURCE_DATABASE = os.environ.get("PGPLAKAR_SOURCE_DATABASE", "postgres")


@contextmanager
def _connect(conn_id: str, dbname: str, **kw: Any):
    """A psycopg connection to ``dbname`` with the credentials of an Airflow postgres connection."""
    from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook
    from airflow_provider_pgplakar.pg.connect import connect
    from airflow_provider_pgplakar.pg.secrets import ssl_files

    opts = PgPlakarPostgresHook(conn_id).source_options()
    with ssl_files(opts.conn) as ssl, connect(opts.conn, ssl, dbname, **kw) as conn:
        yield conn


def _scratch_name(params: dict[str, Any]) -> str:
    return params.get("scratch_database") or f"{params['source_database']}_restore_check"


def table_row_counts(conn: Any) -> dict[str, int]:
    """``{"schema.table": rows}`` for every ordinary and partitioned table outside the system schemas."""
    from psycopg import sql

    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' "
        "AND n.nspname NOT LIKE 'pg\\_temp\\_%' ORDER BY 1, 2"
    ).fetchall()
    counts = {}
    for schema, name in tables:
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
        counts[f"{schema}.{name}"] = conn.execute(query).fetchone()[0]
    return counts


with DAG(
    dag_id="pgplakar_backup_restore_check",
    description="Backup -> restore into a scratch database -> compare row counts of every table",
    schedule="0 4 * * 0",  # weekly, Sunday 04:00
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs share the scratch database
    params={
        "postgres_conn_id": Param(POSTGRES_CONN_ID, type="string"),
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "source_database": Param(SOURCE_DATABASE, type="string", minLength=1),
        "scratch_database": Param(None, type=["null", "string"],
                                  description="default: <source_database>_restore_check"),
        "keep_scratch_database": Param(False, type="boolean"),
    },
    tags=["pgplakar", "restore-test", "postgres"],
    doc_md=__doc__,
) as dag:

    @task
    def create_scratch_database() -> str:
        """Drop (if left over) and create the empty scratch database; return its name."""
        from psycopg import sql

        params = get_current_context()["params"]
        scratch = _scratch_name(params)
        if scratch == params["source_database"]:
            raise ValueError("scratch_database must differ from source_database")
        with _connect(params["postgres_conn_id"], "postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(scratch)))
        return scratch

    scratch = create_scratch_database()

    backup = PgPlakarBackupOperator(
        task_id="backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="{{ params.source_database }}",
        tags=["restore-check"],
    )

    restore = PgPlakarRestoreOperator(
        task_id="restore",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        snapshot_id="{{ ti.xcom_pull(task_ids='backup') }}",
        options={
            "database": scratch,  # XComArg: the name create_scratch_database returned (also sets the dependency)
            "databases": ["{{ params.source_database }}"],
            "no_globals": True,  # same server: the roles exist already
            "exit_on_error": True,
        },
    )
    backup >> restore

    @task(multiple_outputs=False)
    def compare_row_counts(scratch_name: str) -> dict[str, Any]:
        """Fail unless every table of the source has the same number of rows in the scratch database."""
        params = get_current_context()["params"]
        with _connect(params["postgres_conn_id"], params["source_database"]) as conn:
            source = table_row_counts(conn)
        with _connect(params["postgres_conn_id"], scratch_name) as conn:
            restored = table_row_counts(conn)
        diffs = {t: (source.get(t), restored.get(t)) for t in sorted(set(source) | set(restored))
                 if source.get(t) != restored.get(t)}
        for t in sorted(source):
            print(f"{t:50} source={source[t]:>10}  restored={restored.get(t)!s:>10}")
        if diffs:
            raise ValueError(f"restored data differs (table: (source, restored)): {diffs}")
        return {"tables": len(source), "rows": sum(source.values()), "counts": source}

    check = compare_row_counts(scratch)
    restore >> check

    @task
    def drop_scratch_database(scratch_name: str) -> None:
        from psycopg import sql

        params = get_current_context()["params"]
        if params["keep_scratch_database"]:
            print(f"keeping {scratch_name} (keep_scratch_database)")
            return
        with _connect(params["postgres_conn_id"], "postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch_name)))

    check >> drop_scratch_database(scratch)
