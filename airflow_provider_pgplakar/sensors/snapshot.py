"""Wait for a backup: a sensor that succeeds once the store holds a snapshot matching tags, labels and a source,
newer than a time, for cross-DAG dependencies ("run the report after tonight's backup of sales").

With ``deferrable=True`` the wait runs in the triggerer (:mod:`..triggers.snapshot`), holding no worker slot; without,
it pokes like any sensor (``poke_interval``, ``mode="reschedule"`` also works). Returns the snapshot ID (XCom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from ..hooks.store import PgPlakarStoreHook

if TYPE_CHECKING:
    from airflow.sdk import Context


class SnapshotWaitFailed(Exception):
    """The trigger could not read the store while waiting (the message names why)."""


class PgPlakarSnapshotSensor(BaseSensorOperator):
    """Succeed when a snapshot matching every given condition exists; returns its ID.

    :param tags: the snapshot has all these tags.
    :param labels: the snapshot has these labels with these values (e.g. ``{"dag_id": "pgplakar_nightly_backup"}``).
    :param source: a glob on the source's identity ``kind:host:port/database`` (``pgplakar at S stats`` lists them),
        e.g. ``"postgres:*:5432/sales"``.
    :param newer_than: the snapshot started after this time: an ISO timestamp (templated, e.g.
        ``"{{ data_interval_end }}"``), a datetime, or a duration back from the task's start (``"26h"``, ``"2d"``;
        with ``mode="reschedule"`` each reschedule starts anew, so give a timestamp there).
    :param deferrable: wait in the triggerer (no worker slot) instead of poking.
    All of ``tags``, ``labels``, ``source``, ``newer_than`` and ``store_conn_id`` are templated.
    """

    template_fields: Sequence[str] = ("store_conn_id", "tags", "labels", "source", "newer_than")
    ui_color = "#e0d0f5"

    def __init__(self, *, store_conn_id: str = PgPlakarStoreHook.default_conn_name, tags: Sequence[str] = (),
                 labels: Mapping[str, str] | None = None, source: str | None = None,
                 newer_than: str | datetime | timedelta | None = None, deferrable: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(tags, str):
            raise ValueError(f"{self.task_id}: tags must be a list of tags, not a string")
        if isinstance(newer_than, str) and "{{" not in newer_than:
            from ..store.stats import parse_newer_than

            parse_newer_than(newer_than)  # a bad value fails at parse time
        self.store_conn_id = store_conn_id
        self.tags = list(tags)
        self.labels = dict(labels or {})
        self.source = source
        self.newer_than = newer_than
        self.deferrable = deferrable
        self._bound: str | None = None

    def _filter_args(self) -> dict[str, Any]:
        """The filter as plain values; a relative ``newer_than`` is fixed at the first call (it must not slide)."""
        from ..store.stats import parse_newer_than

        if self._bound is None:
            bound = parse_newer_than(self.newer_than)
            self._bound = bound.isoformat() if bound else ""
        return {"store_conn_id": self.store_conn_id, "tags": [str(t) for t in self.tags],
                "labels": {str(k): str(v) for k, v in self.labels.items()}, "source": self.source or None,
                "newer_than": self._bound or None}

    def poke(self, context: Context) -> bool | PokeReturnValue:
        from ..triggers.snapshot import find_snapshot

        args = self._filter_args()
        found = find_snapshot(**args)
        if not found:
            self.log.info("no snapshot matches yet (%s)", self._describe(args))
            return False
        self.log.info("snapshot %s (%s, %s) matches", found["snapshot_id"], found["source"], found["time"])
        return PokeReturnValue(is_done=True, xcom_value=found["snapshot_id"])

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        done = self.poke(context)  # already there: no deferral needed
        if isinstance(done, PokeReturnValue):
            return done.xcom_value
        from ..triggers.snapshot import PgPlakarSnapshotTrigger

        self.defer(trigger=PgPlakarSnapshotTrigger(**self._filter_args(), poll_interval=self.poke_interval),
                   method_name="execute_complete", timeout=timedelta(seconds=self.timeout))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> str:
        if not event or event.get("status") != "success":
            raise SnapshotWaitFailed(f"{self.task_id}: waiting for a snapshot failed: "
                                     f"{(event or {}).get('message', 'no event')}")
        self.log.info("snapshot %s (%s, %s) matches", event["snapshot_id"], event["source"], event["time"])
        return event["snapshot_id"]

    @staticmethod
    def _describe(args: dict[str, Any]) -> str:
        parts = [f"tags {','.join(args['tags'])}"] if args["tags"] else []
        parts += [f"label {k}={v}" for k, v in args["labels"].items()]
        parts += [f"source {args['source']}"] if args["source"] else []
        parts += [f"newer than {args['newer_than']}"] if args["newer_than"] else []
        return " and ".join(parts) or "any snapshot"
