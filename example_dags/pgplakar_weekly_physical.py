"""Weekly physical base backup plus nightly logical backup of one cluster, with a weekly restore check.

Every night at 01:30 ``choose`` picks the work: on ``params.physical_weekday`` (0 = Monday ... 6 = Sunday, default
Sunday) the physical ``base_backup`` runs first and the logical ``logical_backup`` after it (never both at once on
the same server); on the other nights only the logical backup runs. The logical backup also runs when the base
backup failed (``trigger_rule="all_done"``).

After a base backup, ``restore_check`` restores it on the worker into ``params.restore_check_dir``/<date> (the
snapshot ID comes by XCom), checks the PostgreSQL major version of ``params.pg_bin_dir`` when given, and runs
``pg_verifybackup`` when the worker has one of the backup's major version; ``remove_restore_check`` deletes the
directory again. If the cluster has extra tablespaces, give ``params.tablespace_mapping`` (``{"OLD": "NEW"}``),
otherwise the restore is refused when the original tablespace directories are not empty (same host).

Connections (read only when tasks run): ``postgres_default``, a standard ``postgres`` connection whose user has
the REPLICATION privilege, with a ``replication`` line for the worker in the server's pg_hba.conf (its ``schema``
is ignored by the base backup); ``pgplakar_store_default``, a ``pgplakar_store`` connection. Ids are overridable
with params or the ``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID`` environment variables.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator
from airflow_provider_pgplakar.operators.physical import PgPlakarBaseBackupOperator, PgPlakarPhysicalRestoreOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_weekly_physical",
    description="Weekly physical base backup + nightly logical backup into one encrypted pgplakar store",
    schedule="30 1 * * *",  # every night at 01:30 (UTC)
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=15)},
    params={
        "postgres_conn_id": Param(POSTGRES_CONN_ID, type="string"),
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "physical_weekday": Param(6, type="integer", minimum=0, maximum=6, description="0 = Monday, 6 = Sunday"),
        "checkpoint": Param("spread", enum=["spread", "fast"], description="spread: no I/O spike on the primary"),
        "restore_check_dir": Param("/tmp/pgplakar-restore-check", type="string", minLength=1),
        "tablespace_mapping": Param({}, type="object", description='{"/old/location": "/new/location"}'),
        "pg_bin_dir": Param(None, type=["null", "string"], description="PostgreSQL bin dir of the backup's major"),
    },
    tags=["pgplakar", "backup", "postgres", "physical"],
    doc_md=__doc__,
) as dag:

    @task.branch
    def choose(params: dict, logical_date: pendulum.DateTime) -> list[str]:
        if logical_date.weekday() == int(params["physical_weekday"]):
            return ["base_backup", "logical_backup"]
        return ["logical_backup"]

    base_backup = PgPlakarBaseBackupOperator(
        task_id="base_backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        checkpoint="{{ params.checkpoint }}",
        tags=["weekly", "physical"],
        execution_timeout=timedelta(hours=12),
    )
    logical_backup = PgPlakarBackupOperator(
        task_id="logical_backup",
        postgres_conn_id="{{ params.postgres_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        database="",  # the whole cluster
        tags=["nightly"],
        trigger_rule="all_done",  # also after a failed or skipped base backup
        execution_timeout=timedelta(hours=6),
    )
    restore_check = PgPlakarPhysicalRestoreOperator(
        task_id="restore_check",
        snapshot_id="{{ ti.xcom_pull(task_ids='base_backup') }}",
        target_dir="{{ params.restore_check_dir }}/{{ ds_nodash }}",
        tablespace_mapping="{{ params.tablespace_mapping | tojson }}",  # JSON text: the operator parses it
        pg_bin_dir="{{ params.pg_bin_dir or '' }}",
        store_conn_id="{{ params.store_conn_id }}",
        overwrite=True,  # a retried check starts from an empty directory
    )

    @task(trigger_rule="none_skipped")
    def remove_restore_check(params: dict, ds_nodash: str) -> None:
        import shutil

        shutil.rmtree(os.path.join(params["restore_check_dir"], ds_nodash), ignore_errors=True)
        for mapped in (params.get("tablespace_mapping") or {}).values():
            shutil.rmtree(mapped, ignore_errors=True)

    choose() >> [base_backup, logical_backup]
    base_backup >> logical_backup
    base_backup >> restore_check >> remove_restore_check()
