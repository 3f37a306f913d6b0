"""Restore on demand, safely: pick a snapshot, see exactly what will happen, confirm, approve, restore.

Trigger it manually (the trigger form validates every Param against its schema) or through the REST API with a
``conf``. Tasks:

1. ``plan`` resolves the snapshot once (an ID or unambiguous prefix, or ``latest``: the newest ``kind`` backup whose
   origin contains ``source_contains`` and which carries ``tag``), looks at the target (the target server's
   ``pg_database`` for a logical restore, ``target_dir`` for a physical one) and logs the plan: every database
   that will be dropped and recreated, cleaned, created or restored into, with its current size, and what happens
   to roles. It fails, before anything is changed, when ``confirm`` does not repeat the targets (the database
   names, comma separated, or ``target_dir``), when options contradict each other (``clean`` with ``recreate``...),
   when a target database is absent without ``recreate``, or when ``target_dir`` is not empty.
2. ``approve``: Airflow's human-in-the-loop approval (Airflow 3.1+; in the UI under "Required actions", or
   ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails`` with
   ``{"chosen_options": ["Approve"]}``) shows the plan; "Reject", or no answer within ``APPROVAL_TIMEOUT``, skips the
   restore. Without the HITL operator (older Airflow) the confirmation alone guards the restore.
3. ``route`` then ``restore_logical`` (:class:`PgPlakarRestoreOperator`) or ``restore_physical``
   (:class:`PgPlakarPhysicalRestoreOperator`, never overwriting) with the snapshot ID the plan resolved, so a backup
   committed meanwhile cannot change what was approved. The summary is the task's XCom.

Connections are read only when tasks run: the store (``pgplakar`` connection, default ``pgplakar_store_default`` or
``PGPLAKAR_STORE_CONN_ID``) and the target (standard ``postgres`` connection, default ``postgres_default`` or
``PGPLAKAR_RESTORE_CONN_ID``). No secret is ever a Param.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_pgplakar.operators.logical import PgPlakarRestoreOperator
from airflow_provider_pgplakar.operators.physical import PgPlakarPhysicalRestoreOperator

try:  # Airflow >= 3.1 (standard provider): human-in-the-loop approval
    from airflow.providers.standard.operators.hitl import ApprovalOperator
except ImportError:  # pragma: no cover - the confirmation Param alone guards the restore then
    ApprovalOperator = None

STORE_CONN_ID = os.environ.get("PGPLAKAR_STORE_CONN_ID", "pgplakar_store_default")
TARGET_CONN_ID = os.environ.get("PGPLAKAR_RESTORE_CONN_ID", "postgres_default")
APPROVAL_TIMEOUT = timedelta(hours=24)
# Restore options taken from the Params (the plan returns them, the restore task reads them back from its XCom).
OPTION_KEYS = ("databases", "database", "recreate", "clean", "no_owner", "no_globals", "exit_on_error", "jobs",
               "pg_bin_dir")
PLAN = "ti.xcom_pull(task_ids='plan')"
log = logging.getLogger(__name__)


def restore_options(params: dict[str, Any]) -> dict[str, str]:
    """The logical restore options of ``params`` as the strings the operator parses ("" = unset)."""
    return {"databases": ",".join(params.get("databases") or []), "database": params.get("target_database") or "",
            "recreate": str(bool(params["recreate"])).lower(), "clean": str(bool(params["clean"])).lower(),
            "no_owner": str(bool(params["no_owner"])).lower(), "no_globals": str(bool(params["no_globals"])).lower(),
            "exit_on_error": str(bool(params["exit_on_error"])).lower(), "jobs": str(int(params["jobs"])),
            "pg_bin_dir": params.get("pg_bin_dir") or ""}


with DAG(
    dag_id="pgplakar_restore_on_demand",
    description="Plan, confirm, approve, then restore a pgplakar snapshot (logical or physical)",
    schedule=None,  # manual / REST API only
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two restores into the same target at once would interleave
    params={
        "store_conn_id": Param(STORE_CONN_ID, type="string", minLength=1, title="Store connection"),
        "kind": Param("logical", enum=["logical", "physical"], title="Kind",
                      description="logical: databases into a running server; physical: a data directory"),
        "snapshot": Param("latest", type="string", pattern="^(latest|[0-9a-fA-F]{4,64})$", title="Snapshot",
                          description="snapshot ID (at least 4 hex digits) or latest"),
        "source_contains": Param("", type="string", title="Source filter (latest)",
                                 description="latest only: the snapshot's origin contains this, e.g. db1:5432/shop"),
        "tag": Param("", type="string", title="Tag filter (latest)"),
        "target_conn_id": Param(TARGET_CONN_ID, type="string", minLength=1, title="Target postgres connection"),
        "databases": Param([], type="array", items={"type": "string", "minLength": 1, "pattern": "^[^,]+$"},
                           title="Databases", description="databases of the snapshot to restore (empty: all)"),
        "target_database": Param("", type="string", title="Restore into",
                                 description="restore the one selected database under this name (not with recreate)"),
        "recreate": Param(False, type="boolean", description="DROP and CREATE each target database"),
        "clean": Param(False, type="boolean", description="drop the dump's objects before restoring them"),
        "no_owner": Param(False, type="boolean", description="do not restore object ownership"),
        "no_globals": Param(True, type="boolean", description="leave roles and tablespaces alone"),
        "exit_on_error": Param(True, type="boolean", description="stop at the first error"),
        "jobs": Param(1, type="integer", minimum=1, maximum=16, description="parallel pg_restore jobs"),
        "target_dir": Param("", type="string", title="Target directory (physical)",
                            description="absolute, empty or absent"),
        "tablespace_mapping": Param({}, type="object", description='physical: {"/old/location": "/new/location"}'),
        "pg_bin_dir": Param("", type="string", description="PostgreSQL bin dir of the target's major (optional)"),
        "confirm": Param("", type="string", title="Confirm",
                         description="type the target database name(s), comma separated, or target_dir"),
    },
    tags=["pgplakar", "restore", "postgres"],
    doc_md=__doc__,
) as dag:

    @task
    def plan(params: dict) -> dict[str, Any]:
        """Resolve the snapshot, log what will be dropped and restored, check the confirmation. Reads only."""
        from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook, password_source
        from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook
        from airflow_provider_pgplakar.pg.restore_plan import (
            check_confirmation,
            pick_snapshot,
            plan_logical_restore,
            plan_physical_restore,
        )

        options = restore_options(params)
        with PgPlakarStoreHook(params["store_conn_id"]).get_store() as store:
            snap = pick_snapshot(store, params["snapshot"], kind=params["kind"],
                                 source_contains=params["source_contains"], tag=params["tag"])
            if params["kind"] == "logical":
                dest = PgPlakarPostgresHook(params["target_conn_id"]).restore_options(options)
                planned = plan_logical_restore(store, snap, dest.options,
                                               password=password_source(dest.options, dest.aws_conn_id))
            else:
                planned = plan_physical_restore(snap, params["target_dir"], params["tablespace_mapping"])
        log.info("%s", planned.text())
        check_confirmation(planned, params["confirm"])
        return {**planned.as_dict(), "options": options}

    planned = plan()

    @task.branch
    def route(ti: Any) -> str:
        return f"restore_{ti.xcom_pull(task_ids='plan')['kind']}"

    routed = route()

    restore_logical = PgPlakarRestoreOperator(
        task_id="restore_logical",
        postgres_conn_id="{{ params.target_conn_id }}",
        store_conn_id="{{ params.store_conn_id }}",
        snapshot_id=f"{{{{ {PLAN}['snapshot_id'] }}}}",
        options={key: f"{{{{ {PLAN}['options']['{key}'] }}}}" for key in OPTION_KEYS},
    )
    restore_physical = PgPlakarPhysicalRestoreOperator(
        task_id="restore_physical",
        store_conn_id="{{ params.store_conn_id }}",
        snapshot_id=f"{{{{ {PLAN}['snapshot_id'] }}}}",
        target_dir=f"{{{{ {PLAN}['target_names'][0] }}}}",
        tablespace_mapping="{{ params.tablespace_mapping | tojson }}",
        pg_bin_dir="{{ params.pg_bin_dir }}",
        overwrite=False,  # never: the plan checked the directory is empty or absent
    )

    if ApprovalOperator is not None:
        approve = ApprovalOperator(
            task_id="approve",
            subject=f"Restore {{{{ {PLAN}['kind'] }}}} snapshot {{{{ {PLAN}['snapshot_id'][:8] }}}} into "
                    f"{{{{ {PLAN}['target_names'] | join(', ') }}}}?",
            body=f"```\n{{{{ {PLAN}['text'] }}}}\n```",
            defaults="Reject",  # no answer within the timeout: nothing is restored
            response_timeout=APPROVAL_TIMEOUT,
        )
        planned >> approve >> routed
    else:  # pragma: no cover
        planned >> routed
    routed >> [restore_logical, restore_physical]
