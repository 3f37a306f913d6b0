"""Nightly full-cluster logical backup into the snapshot store, then a manifest-only capture.

Connections (nothing is read at parse time, only when a task runs):

* ``postgres_default``: a standard Airflow ``postgres`` connection (host, port, login, password; the ``schema``
  field is left empty so the whole cluster is dumped; extras such as ``sslmode`` or ``pg_bin_dir`` are honoured);
* ``pgplakar_store_default``: a ``pgplakar_store`` connection (extra ``location``, password = store passphrase).

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
        "store_conn_id": Param(STORE_CONN_ID, type="string", description="Airflow pgplakar_store connection"),
    },
    tags=["pgplakar", "backup", "postgres"],
    doc_md=__doc__,
) as dag:
    backup = PgPlakarBackupOperator(
        task_id="backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="",  # "" = the whole cluster, even when the connection names a database
        tags=["nightly"],
        execution_timeout=timedelta(hours=6),
    )
    manifest = PgPlakarManifestOperator(
        task_id="manifest",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="",
        tags=["nightly", "manifest"],
    )
    backup >> manifest
