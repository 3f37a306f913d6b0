"""Weekly physical base backup plus nightly logical backup of one cluster, with a weekly restore check.

Every night at 01:30 ``choose`` picks the work: on ``params.physical_weekday`` (0 = Monday ... 6 = Sunday, default
Sunday) the physical ``base_backup`` runs first and the logical ``logical_backup`` after it (never both at once on
the same server); on the other nights only the logical backup runs. The logical backup also runs when the base
backup failed (``trigger_rule="all_done"``). The day is that of the run's ``run_after`` (the schedule's time, or the
moment of a manual or REST API trigger: those runs have no logical date in Airflow 3); ``params.run_physical``
= ``always`` / ``never`` overrides the weekday, e.g. to take a base backup now from the trigger form.

After a base backup, ``restore_check`` restores it on the worker into ``params.restore_check_dir``/<run_after as
YYYYmmddTHHMMSS> (the snapshot ID comes by XCom), checks the PostgreSQL major version of ``params.pg_bin_dir``
when given, and runs ``pg_verifybackup`` when the worker has one of the backup's major version;
``remove_restore_check`` deletes the directory again. If the cluster has extra tablespaces, give
``params.tablespace_mapping`` (``{"OLD": "NEW"}``), otherwise the restore is refused when the original tablespace
directories are not empty (same host).

Connections (read only when tasks run): ``postgres_default``, a standard ``postgres`` connection whose user has
the REPLICATION privilege, with a ``replication`` line for the worker in the server's pg_hba.conf (its ``schema``
is ignored by the base backup); ``pgplakar_store_default``, a ``pgplakar`` connection. Ids are overridable
with params or the ``PGPLAKAR_POSTGRES_CONN_ID`` / ``PGPLAKAR_STORE_CONN_ID`` environment variables.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator
from airflow_provider_pgplakar.operators.physical import PgPlakarBaseBackupOperator, PgPlakarPhysicalRestoreOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_POSTGRES_CONN_ID", "postgres_default")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
# Scratch databases of restore checks and verifies are never backed up (a scratch database dropped mid-run must not
# fail the backup either): shell patterns, see README "exclude_databases".
SCRATCH_DATABASES = ["*_restore_check", "pgplakar_verify_*"]

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
        "run_physical": Param("weekday", enum=["weekday", "always", "never"],
                              description="weekday: base backup on physical_weekday only; always/never override it"),
        "exclude_databases": Param(SCRATCH_DATABASES, type="array", items={"type": "string"},
                                   description="shell patterns of databases left out (scratch databases)"),
        "checkpoint": Param("spread", enum=["spread", "fast"], description="spread: no I/O spike on the primary"),
        "restore_check_dir": Param("/tmp/pgplakar-restore-check", type="string", minLength=1),
        "tablespace_mapping": Param({}, type="object", description='{"/old/location": "/new/location"}'),
        "pg_bin_dir": Param(None, type=["null", "string"], description="PostgreSQL bin dir of the backup's major"),
    },
    tags=["pgplakar", "backup", "postgres", "physical"],
    doc_md=__doc__,
) as dag:

    @task.branch
    def choose(params: dict, dag_run: Any) -> list[str]:
        """``run_after`` is set for every run (a manual or REST API run has no ``logical_date``)."""
        mode = params.get("run_physical", "weekday")
        physical = mode == "always" or (mode == "weekday"
                                        and dag_run.run_after.weekday() == int(params["physical_weekday"]))
        return ["base_backup", "logical_backup"] if physical else ["logical_backup"]

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
        options={"exclude_databases": "{{ params.exclude_databases | join(',') }}"},
        tags=["nightly"],
        trigger_rule="all_done",  # also after a failed or skipped base backup
        execution_timeout=timedelta(hours=6),
    )
    restore_check = PgPlakarPhysicalRestoreOperator(
        task_id="restore_check",
        snapshot_id="{{ ti.xcom_pull(task_ids='base_backup') }}",
        target_dir="{{ params.restore_check_dir }}/{{ dag_run.run_after.strftime('%Y%m%dT%H%M%S') }}",
        tablespace_mapping="{{ params.tablespace_mapping | tojson }}",  # JSON text: the operator parses it
        pg_bin_dir="{{ params.pg_bin_dir or '' }}",
        store_conn_id="{{ params.store_conn_id }}",
        overwrite=True,  # a retried check starts from an empty directory
    )

    @task(trigger_rule="none_skipped")
    def remove_restore_check(params: dict, dag_run: Any) -> None:
        import shutil

        stamp = dag_run.run_after.strftime("%Y%m%dT%H%M%S")
        shutil.rmtree(os.path.join(params["restore_check_dir"], stamp), ignore_errors=True)
        for mapped in (params.get("tablespace_mapping") or {}).values():
            shutil.rmtree(mapped, ignore_errors=True)

    choose() >> [base_backup, logical_backup]
    base_backup >> logical_backup
    base_backup >> restore_check >> remove_restore_check()
