"""Daily store maintenance: forget by retention policy, prune, a rolling check that reads every byte within a week,
and a freshness test that fails naming every source without a recent backup.

* ``forget``: keep 7 daily, 4 weekly, 12 monthly snapshots of each source (a source is what identifies it: kind,
  host, port, database or data directory; never the Airflow task or its ``map_index``); returns kept/removed IDs.
* ``prune``: frees the data the forgotten snapshots alone referenced; returns bytes and packs freed.
* ``check``: verifies the metadata and reads today's seventh of the packs (``read_data_subset="/7"``), so every
  byte is read within 7 days; a damaged pack fails the task naming it and the snapshots it affects.
* ``freshness``: fails when a source's newest snapshot is older than ``params.max_age`` (default 26h), so the
  DAG's failure callbacks / notifiers raise the alert. It runs independently of the other three.

Every run works from a manual trigger, the schedule or the REST API (nothing reads a logical date). The store
connection is read only when tasks run: ``pgplakar_store_default`` (or ``PGPLAKAR_STORE_CONN_ID``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_pgplakar.operators.maintenance import (
    PgPlakarCheckOperator,
    PgPlakarForgetOperator,
    PgPlakarFreshnessOperator,
    PgPlakarPruneOperator,
)

STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_store_maintenance",
    description="Daily: forget + prune, a rolling read-data check, and backup freshness",
    schedule="30 6 * * *",  # 06:30, after the night's backups
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=15)},
    params={
        "store_conn_id": Param(STORE_CONN_ID, type="string", description="Airflow pgplakar connection"),
        "max_age": Param("26h", type="string", pattern=r"^([0-9]+[ymwdh])+$",
                         description="a source whose newest snapshot is older than this is stale (h, d, w, m, y)"),
        "check_subset": Param("/7", type="string", pattern=r"^([0-9]*/[0-9]+|[0-9.]+%)$",
                              description="packs the check reads: /7 = today's seventh, n/m, or x%"),
    },
    tags=["pgplakar", "maintenance"],
    doc_md=__doc__,
) as dag:
    forget = PgPlakarForgetOperator(
        task_id="forget",
        store_conn_id="{{ params.store_conn_id }}",
        keep_daily=7, keep_weekly=4, keep_monthly=12,
    )
    prune = PgPlakarPruneOperator(
        task_id="prune",
        store_conn_id="{{ params.store_conn_id }}",
        lock_wait=1800,  # a backup still running holds the store: wait for it up to 30 minutes
        execution_timeout=timedelta(hours=4),
    )
    check = PgPlakarCheckOperator(
        task_id="check",
        store_conn_id="{{ params.store_conn_id }}",
        read_data_subset="{{ params.check_subset }}",
        execution_timeout=timedelta(hours=4),
    )
    freshness = PgPlakarFreshnessOperator(
        task_id="freshness",
        store_conn_id="{{ params.store_conn_id }}",
        max_age="{{ params.max_age }}",
        retries=0,  # an alert, not a transient failure
    )
    forget >> prune >> check
