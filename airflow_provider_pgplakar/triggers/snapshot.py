"""A trigger that polls a store until a snapshot matching a filter exists, so a deferred
:class:`..sensors.snapshot.PgPlakarSnapshotSensor` holds no worker slot while it waits.

Each poll opens the store and lists its snapshots in a thread (``asyncio.to_thread``): the store's reads are
blocking I/O and must not stall the triggerer's event loop. Its arguments are plain JSON values, so it serializes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


def find_snapshot(store_conn_id: str, tags: list[str], labels: dict[str, str], source: str | None,
                  newer_than: str | None) -> dict[str, Any] | None:
    """The newest matching snapshot as ``{"snapshot_id", "time", "source"}``, or None (blocking)."""
    import pendulum

    from ..hooks.store import PgPlakarStoreHook
    from ..store.forget import source_key
    from ..store.stats import SnapshotFilter, newest_matching

    flt = SnapshotFilter(tags=tuple(tags), labels=tuple(sorted(labels.items())), source=source or None,
                         newer_than=pendulum.parse(newer_than) if newer_than else None)
    with PgPlakarStoreHook(store_conn_id).get_store() as store:
        snap = newest_matching(store, flt)
    if snap is None:
        return None
    return {"snapshot_id": snap.id, "time": snap.time, "source": source_key(snap.header.get("source") or {})}


class PgPlakarSnapshotTrigger(BaseTrigger):
    """Fire once a snapshot with all ``tags``, all ``labels``, a source matching the glob ``source`` and started
    after ``newer_than`` (ISO timestamp) is in the store; poll every ``poll_interval`` seconds.

    Events: ``{"status": "success", "snapshot_id", "time", "source"}``, or ``{"status": "error", "message"}``
    when the store cannot be read (the sensor fails the task with that message).
    """

    def __init__(self, *, store_conn_id: str, tags: list[str] | None = None, labels: dict[str, str] | None = None,
                 source: str | None = None, newer_than: str | None = None, poll_interval: float = 60.0) -> None:
        super().__init__()
        self.store_conn_id = store_conn_id
        self.tags = list(tags or [])
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.source = source
        self.newer_than = newer_than
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow_provider_pgplakar.triggers.snapshot.PgPlakarSnapshotTrigger", {
            "store_conn_id": self.store_conn_id, "tags": self.tags, "labels": self.labels, "source": self.source,
            "newer_than": self.newer_than, "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                found = await asyncio.to_thread(find_snapshot, self.store_conn_id, self.tags, self.labels,
                                                self.source, self.newer_than)
            except Exception as e:  # one event naming the failure; the sensor raises it in the task
                yield TriggerEvent({"status": "error", "message": f"{type(e).__name__}: {e}"})
                return
            if found:
                self.log.info("snapshot %s matches (%s)", found["snapshot_id"], found["source"])
                yield TriggerEvent({"status": "success", **found})
                return
            self.log.info("no matching snapshot yet; next poll in %g s", self.poll_interval)
            await asyncio.sleep(self.poll_interval)
