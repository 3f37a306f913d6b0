"""Verify every new backup as soon as it lands: a DAG scheduled on the backups' Assets.

Backup operators (``PgPlakarBackupOperator``, ``PgPlakarBaseBackupOperator``) emit one Asset event per backed-up
source through the outlet alias ``pgplakar-backups``: ``pgplakar://HOST:PORT/DATABASE`` for a logical backup (one per
database), ``pgplakar+bin://HOST:PORT/`` for a physical one. Each event's ``extra`` carries ``snapshot_id``,
``store``, ``bytes``, ``new_bytes`` and ``duration_s``.

This DAG is scheduled on that alias, so it runs after any backup DAG's task succeeds; ``snapshots`` reads the
snapshot IDs from the run's triggering events (one verify per snapshot, however many databases it holds) and
``verify`` restores each into a throwaway PostgreSQL on the worker and compares it with its fingerprints (see
``pgplakar_restore_drill``). To follow a single source instead, schedule on its Asset:
``schedule=[Asset("pgplakar://db.example.com:5432/sales")]``.

A manual run (no triggering event) verifies nothing. The store connection is read only when tasks run:
``pgplakar_store_default`` (or ``PGPLAKAR_STORE_CONN_ID``); one store per deployment is assumed, as the events name
the store by its location only.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG, AssetAlias, Param, get_current_context, task

from airflow_provider_pgplakar.operators.outcome import BACKUPS_ALIAS
from airflow_provider_pgplakar.operators.verify import PgPlakarVerifyOperator

STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")

with DAG(
    dag_id="pgplakar_verify_after_backup",
    description="After each backup: verify its snapshot in a throwaway server",
    schedule=[AssetAlias(BACKUPS_ALIAS)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "store_conn_id": Param(STORE_CONN_ID, type="string"),
        "verify_pg_bin_dir": Param("", type="string",
                                   description="bin dir of the verify server (empty: newest installed)"),
    },
    tags=["pgplakar", "restore-test", "postgres"],
    doc_md=__doc__,
) as dag:

    @task
    def snapshots() -> list[str]:
        """The distinct snapshot IDs of the events that triggered this run, in event order."""
        events = get_current_context().get("triggering_asset_events") or {}
        ids: list[str] = []
        for asset_events in events.values():
            for event in asset_events:
                sid = (event.extra or {}).get("snapshot_id")
                if sid and sid not in ids:
                    ids.append(sid)
        print(f"{len(ids)} snapshot(s) to verify: {', '.join(i[:8] for i in ids) or 'none'}")
        return ids

    PgPlakarVerifyOperator.partial(
        task_id="verify",
        store_conn_id="{{ params.store_conn_id }}",
        options={"pg_bin_dir": "{{ params.verify_pg_bin_dir }}"},
    ).expand(snapshot_id=snapshots())
