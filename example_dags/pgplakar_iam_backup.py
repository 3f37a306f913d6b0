"""RDS/Aurora backup with IAM authentication, then a restore check into a scratch database (``postgres+aws``).

Usage example. The PostgreSQL side is a standard Airflow ``postgres`` connection with the extra ``"iam": true``,
as for the Airflow postgres provider; it has **no password** (a fresh IAM token is made for every connection and
every pg_dump/pg_dumpall/pg_restore/psql run, and masked in the task log)::

    AIRFLOW_CONN_POSTGRES_RDS_IAM='{"conn_type": "postgres",
        "host": "mydb.cluster-abc123.eu-west-3.rds.amazonaws.com", "port": 5432, "login": "backup_iam",
        "extra": {"iam": true, "region_name": "eu-west-3", "sslmode": "verify-full",
                  "sslrootcert": "/etc/ssl/rds/global-bundle.pem"}}'

The token is signed with boto3's default credential chain (IRSA/EKS web identity, instance or container role,
``AWS_PROFILE``, environment variables). Add ``"aws_conn_id": "aws_backup"`` to the extra to use an Airflow AWS
connection instead (needs ``apache-airflow-providers-amazon``). ``region_name`` may be left out when the SDK or the
AWS connection has a region, or when the host is an ``*.rds.amazonaws.com`` name.

The database user needs ``GRANT rds_iam TO backup_iam`` on RDS, and the role running the task the IAM permission
``rds-db:connect`` for it. The scratch database must exist (restores go into existing databases).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator, PgPlakarRestoreOperator

POSTGRES_CONN_ID = os.environ.get("PGPLAKAR_IAM_POSTGRES_CONN_ID", "postgres_rds_iam")
STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_iam_backup",
    description="RDS/Aurora logical backup with IAM authentication, restored into a scratch database",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "database": Param("app", type="string", description="database to back up"),
        "scratch_database": Param("app_restore_check", type="string", description="existing database to restore into"),
    },
    tags=["pgplakar", "backup", "postgres", "rds", "iam"],
    doc_md=__doc__,
) as dag:
    backup = PgPlakarBackupOperator(
        task_id="backup",
        postgres_conn_id=POSTGRES_CONN_ID,
        store_conn_id=STORE_CONN_ID,
        database="{{ params.database }}",
        tags=["rds-iam"],
    )
    restore = PgPlakarRestoreOperator(
        task_id="restore",
        postgres_conn_id=POSTGRES_CONN_ID,
        store_conn_id=STORE_CONN_ID,
        snapshot_id=backup.output,
        options={"database": "{{ params.scratch_database }}", "no_globals": True},
    )
