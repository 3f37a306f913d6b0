"""Prove a backup restores: back a database up with full fingerprints, then verify the snapshot.

``backup`` dumps ``params.source_database`` with ``fingerprint=full``: exact row counts and content digests of
every table, taken in the very MVCC snapshot the dump reads (so writes that continue on the source cannot make them
disagree). ``verify`` gets the snapshot ID through XCom (``{{ ti.xcom_pull(task_ids='backup') }}``), restores it
into a throwaway PostgreSQL on the worker (the newest installed major >= the source's, or ``params.verify_pg_bin_dir``;
removed afterwards), recomputes the fingerprints and compares; the report is stored in the store as a snapshot
labelled ``verifies=<snapshot id>`` and returned as XCom. A difference fails the task, naming the table.

(This DAG used to restore into a scratch database and compare row counts with the *live* source, which moves on
while the dump runs: see README "Verified restores".)

Connections are read only when tasks run: ``postgres_default`` (standard postgres connection) and
``pgplakar_store_default`` (extra ``location``, password = passphrase); ids overridable with params or the
``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID`` environment variables.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator
from airflow_provider_pgplakar.operators.verify import PgPlakarVerifyOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
SOURCE_DATABASE = os.environ.get("PGPLAKAR_SOURCE_DATABASE", "postgres")

with DAG(
    dag_id="pgplakar_backup_restore_check",
    description="Backup with full fingerprints -> verify the snapshot in a throwaway server",
    schedule="0 4 * * 0",  # weekly, Sunday 04:00
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "postgres_conn_id": Param(POSTGRES_CONN_ID, type="string"),
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "source_database": Param(SOURCE_DATABASE, type="string", minLength=1),
        "verify_pg_bin_dir": Param("", type="string",
                                   description="bin dir of the verify server (empty: newest installed)"),
        "amcheck": Param(False, type="boolean"),
    },
    tags=["pgplakar", "restore-test", "postgres"],
    doc_md=__doc__,
) as dag:
    backup = PgPlakarBackupOperator(
        task_id="backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="{{ params.source_database }}",
        options={"fingerprint": "full"},
        tags=["restore-check"],
    )

    verify = PgPlakarVerifyOperator(
        task_id="verify",
        store_conn_id="{{ params.store_conn_id }}",
        snapshot_id="{{ ti.xcom_pull(task_ids='backup') }}",
        options={"pg_bin_dir": "{{ params.verify_pg_bin_dir }}", "amcheck": "{{ params.amcheck }}"},
    )
    backup >> verify
