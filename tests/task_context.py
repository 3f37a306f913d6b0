"""A minimal task context for calling operators' ``execute()`` directly (no DagRun, no metadata DB)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeTI:
    """The task-instance attributes the operators read, plus ``xcom_pull`` for templates."""

    dag_id: str = "ops_dag"
    task_id: str = "backup"
    run_id: str = "manual__2026-11-24T00:00:00+00:00"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)
    pushed: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get(task_ids) if task_ids else None


def context(ti: FakeTI, **params: Any) -> dict[str, Any]:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    return {"ti": ti, "task_instance": ti, "run_id": ti.run_id, "params": params, "ds": "2026-11-24",
            "ds_nodash": "20261124", "outlet_events": OutletEventAccessors()}


def alias_events(ctx: dict[str, Any], alias: str) -> list[tuple[str, dict[str, Any]]]:
    """(asset URI, extra) of the events a task emitted through an outlet alias."""
    from airflow.sdk import AssetAlias

    return [(e.dest_asset_key.uri, e.extra) for e in ctx["outlet_events"][AssetAlias(alias)].asset_alias_events]
