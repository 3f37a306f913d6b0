"""Nightly full-cluster logical backup into the snapshot store, then a manifest-only capture.

Connections (nothing is read at parse time, only when a task runs):

* ``postgres_default``: a standard Airflow ``postgres`` connection (host, port, login, password; the ``schema``
  field is left empty so the whole cluster is dumped; extras such as ``sslmode`` or ``pg_bin_dir`` are honoured);
* ``pgplakar_store_default``: a ``pgplakar`` connection (extra ``location``, password = store passphrase).

Both ids can be changed per run with the ``postgres_conn_id`` / ``store_conn_id`` params, or per deployment with the
``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID`` environment variables (their defaults). The store must
exist already (``pgplakar at LOCATION create``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator, PgPlakarManifestOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
# Scratch databases of restore checks and verifies are never backed up (a scratch database dropped mid-run must not
# fail the backup either): shell patterns, see README "exclude_databases".
SCRATCH_DATABASES = ["*_restore_check", "pgplakar_verify_*"]

with DAG(
    dag_id="pgplakar_nightly_backup",
    description="Nightly full-cluster PostgreSQL logical backup + manifest into an encrypted pgplakar store",
    schedule="15 2 * * *",  # 02:15 every night (in the DAG's timezone, UTC here)
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # never two full backups of the same cluster at once
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    params={
        "postgres_conn_id": Param(POSTGRES_CONN_ID, type="string", description="Airflow postgres connection"),
        "store_conn_id": Param(STORE_CONN_ID, type="string", description="Airflow pgplakar connection"),
        "exclude_databases": Param(SCRATCH_DATABASES, type="array", items={"type": "string"},
                                   description="shell patterns of databases left out (scratch databases)"),
    },
    tags=["pgplakar", "backup", "postgres"],
    doc_md=__doc__,
) as dag:
    backup = PgPlakarBackupOperator(
        task_id="backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="",  # "" = the whole cluster, even when the connection names a database
        options={"exclude_databases": "{{ params.exclude_databases | join(',') }}"},
        tags=["nightly"],
        execution_timeout=timedelta(hours=6),
    )
    manifest = PgPlakarManifestOperator(
        task_id="manifest",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="",
        options={"exclude_databases": "{{ params.exclude_databases | join(',') }}"},
        tags=["nightly", "manifest"],
    )
    backup >> manifest
