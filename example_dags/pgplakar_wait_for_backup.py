"""Cross-DAG dependency on a backup: wait (deferred, holding no worker slot) until the store holds tonight's
snapshot from ``pgplakar_nightly_backup``, then use it.

``wait_for_backup`` is a deferrable :class:`PgPlakarSnapshotSensor`: it succeeds when a snapshot tagged
``nightly``, labelled ``dag_id=pgplakar_nightly_backup`` and ``task_id=backup``, whose source matches
``params.source`` (a glob on ``kind:host:port/database``, as ``pgplakar at STORE stats`` prints it; ``*`` = any) and
that started within ``params.newer_than`` (a duration such as ``20h``, or an ISO timestamp) is in the store, and
returns its ID. ``use_backup`` stands for the work that needs the backup (a report, a refresh of a staging copy);
here it prints the snapshot's summary.

The wait is polled every ``PGPLAKAR_WAIT_POLL_SECONDS`` (default 300) by the triggerer and gives up after 8 hours.
Every run works from a manual trigger, the schedule or the REST API. The store connection is read only when tasks
run: ``pgplakar_store_default`` (or ``PGPLAKAR_STORE_CONN_ID``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_pgplakar.sensors.snapshot import PgPlakarSnapshotSensor

STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
POLL_SECONDS = float(os.environ.get("PGPLAKAR_WAIT_POLL_SECONDS", "300"))

with DAG(
    dag_id="pgplakar_wait_for_backup",
    description="Wait (deferred) for tonight's nightly backup, then use it",
    schedule="0 3 * * *",  # after pgplakar_nightly_backup starts (02:15); the sensor waits for it to commit
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "store_conn_id": Param(STORE_CONN_ID, type="string", description="Airflow pgplakar connection"),
        "source": Param("*", type="string", description="glob on kind:host:port/database, e.g. postgres:*/sales"),
        "newer_than": Param("20h", type="string", description="a duration (20h) or an ISO timestamp"),
    },
    tags=["pgplakar", "sensor"],
    doc_md=__doc__,
) as dag:
    wait = PgPlakarSnapshotSensor(
        task_id="wait_for_backup",
        store_conn_id="{{ params.store_conn_id }}",
        tags=["nightly"],
        labels={"dag_id": "pgplakar_nightly_backup", "task_id": "backup"},
        source="{{ params.source }}",
        newer_than="{{ params.newer_than }}",
        deferrable=True,
        poke_interval=POLL_SECONDS,
        timeout=timedelta(hours=8),
    )

    @task
    def use_backup(snapshot_id: str, params: dict | None = None) -> dict:
        """The work that needs the backup; here: the snapshot's summary."""
        from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook

        with PgPlakarStoreHook((params or {})["store_conn_id"]).get_store() as store:
            snap = store.load_snapshot(store.resolve(snapshot_id))
        summary = {"snapshot": snap.id, "time": snap.time, "databases": snap.header["meta"].get("databases", []),
                   "bytes": snap.header["stats"]["bytes"]}
        print(f"using snapshot {snap.id[:8]} of {snap.time}: {len(summary['databases'])} database(s)")
        return summary

    use_backup(wait.output)
