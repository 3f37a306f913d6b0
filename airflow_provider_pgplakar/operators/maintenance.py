"""Operating a store from Airflow: check, forget, prune and freshness as tasks. Thin glue over ``store/check.py``,
``store/forget.py``, ``store/prune.py`` and ``store/stats.py`` (what ``pgplakar check|forget|prune|freshness``
run).

Each returns a small report dict (XCom ``return_value``). A check that finds damage and a freshness test that finds
a stale source fail the task with one message naming the broken objects or stale sources, so Airflow's own failure
callbacks and notifiers raise the alert. Options that contradict each other fail when the DAG is parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ..hooks.store import PgPlakarStoreHook
from ..store.retention import DEFAULT_GROUP_BY, Policy, parse_group_by

if TYPE_CHECKING:
    from airflow.sdk import Context


def _group_by(value: str | Sequence[str]) -> tuple[str, ...]:
    """A ``--group-by`` string (``"source,label:dag_id"``) or a sequence of items, validated."""
    return parse_group_by(value) if isinstance(value, str) else parse_group_by(",".join(value))


class _StoreOperator(BaseOperator):
    ui_color = "#f5ecd0"

    def __init__(self, *, store_conn_id: str = PgPlakarStoreHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_conn_id = store_conn_id


class PgPlakarCheckOperator(_StoreOperator):
    """Check the store: metadata always; ``read_data`` reads every byte, ``read_data_subset`` some packs.

    :param read_data_subset: restic's forms: ``"n/m"`` (slice n of m), ``"/m"`` (today's slice: a daily task reads
        every pack within m days) or ``"x%"`` (random packs); templated.
    :param fail_on_problems: fail the task naming the broken objects and the snapshots they affect (default True).
    Returns the report: ``ok``, ``problems`` (object, message, affects), ``snapshots``, ``packs``, ``packs_read``,
    ``bytes_read``, ``subset``.
    """

    template_fields: Sequence[str] = ("store_conn_id", "read_data_subset")

    def __init__(self, *, read_data: bool = False, read_data_subset: str | None = None,
                 fail_on_problems: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if read_data and read_data_subset:
            raise ValueError(f"{kwargs.get('task_id')}: give read_data or read_data_subset, not both")
        if read_data_subset and "{{" not in read_data_subset:
            from ..store.check import parse_subset

            parse_subset(read_data_subset)  # a bad form fails at parse time
        self.read_data = read_data
        self.read_data_subset = read_data_subset
        self.fail_on_problems = fail_on_problems

    def execute(self, context: Context) -> dict[str, Any]:
        from ..store.check import CheckFailed, check, parse_subset

        subset = parse_subset(self.read_data_subset) if self.read_data_subset else None
        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            rep = check(store, read_data=self.read_data, read_data_subset=subset,
                        progress=lambda m: self.log.info("%s", m))
        for n in rep.notes:
            self.log.info("note: %s", n)
        read = f", {rep.packs_read} pack(s) / {rep.bytes_read / 2**20:.1f} MiB read" if rep.read_data else ""
        subset_text = f" (subset {rep.subset})" if rep.subset else ""
        self.log.info("check %s: %d snapshots, %d records, %d packs%s%s", "ok" if rep.ok else "FAILED",
                      rep.snapshots, rep.records, rep.packs, read, subset_text)
        if not rep.ok:
            for p in rep.problems:
                self.log.error("%s", p)
            if self.fail_on_problems:
                raise CheckFailed(rep)
        return rep.as_dict()


class PgPlakarForgetOperator(_StoreOperator):
    """Forget snapshots by a retention policy (``pgplakar forget --keep-*``), or the IDs in ``snapshot_ids``.

    :param keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly: counts (-1: unlimited).
    :param keep_within: a duration in restic's units (``"6m"`` six months, ``"7d"``, ``"1y6m"``).
    :param keep_tags: keep snapshots with any of these tags.
    :param group_by: ``"source"`` (default: kind, host, port, database or data directory), ``"labels"``, ``"tags"``,
        ``"label:NAME"``, comma-separated or a list; ``""`` for one group.
    :param dry_run: decide and report, delete nothing.
    Returns ``{"kept": [ids], "removed": [ids], "groups": [...], "dry_run": bool}``. Data is freed by prune.
    """

    template_fields: Sequence[str] = ("store_conn_id", "snapshot_ids")

    def __init__(self, *, keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
                 keep_monthly: int = 0, keep_yearly: int = 0, keep_within: str | None = None,
                 keep_tags: Sequence[str] = (), tz: str = "UTC", group_by: str | Sequence[str] = DEFAULT_GROUP_BY,
                 snapshot_ids: Sequence[str] | None = None, dry_run: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        task = kwargs.get("task_id")
        if isinstance(snapshot_ids, str):
            raise ValueError(f"{task}: snapshot_ids must be a list of IDs, not a string")
        self.policy = Policy(keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily,
                             keep_weekly=keep_weekly, keep_monthly=keep_monthly, keep_yearly=keep_yearly,
                             keep_within=keep_within, keep_tags=tuple(keep_tags), tz=tz)
        if snapshot_ids is not None and not self.policy.is_empty():
            raise ValueError(f"{task}: give snapshot_ids or keep_* rules, not both")
        if snapshot_ids is None and self.policy.is_empty():
            raise ValueError(f"{task}: refusing to forget every snapshot: give at least one keep_* rule")
        self.group_by = _group_by(group_by)
        # a list, or an XComArg / template resolved at run time (e.g. the output of a task choosing IDs)
        self.snapshot_ids = list(snapshot_ids) if isinstance(snapshot_ids, (list, tuple)) else snapshot_ids
        # not ``self.dry_run``: that name is BaseOperator.dry_run(), the template-rendering check
        self.is_dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        from ..store.forget import forget

        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            if self.snapshot_ids is not None:
                given = [self.snapshot_ids] if isinstance(self.snapshot_ids, str) else self.snapshot_ids
                ids = [str(i).strip() for i in given if str(i).strip()]
                if not ids:
                    self.log.info("no snapshot IDs given: nothing to forget")
                    return {"kept": store.snapshot_ids(), "removed": [], "groups": [], "dry_run": self.is_dry_run}
                res = forget(store, ids=ids, dry_run=self.is_dry_run)
            else:
                res = forget(store, self.policy, group_by=self.group_by, dry_run=self.is_dry_run)
        for g in res.groups:
            self.log.info("group %s: keep %d, remove %d", g["group"], len(g["keep"]), len(g["remove"]))
        removed = ": " + " ".join(i[:8] for i in res.removed) if res.removed else ""
        self.log.info("%s %d snapshot(s), kept %d%s", "would remove" if self.is_dry_run else "removed",
                      len(res.removed), len(res.kept), removed)
        return res.as_dict()


class PgPlakarPruneOperator(_StoreOperator):
    """Delete the data no snapshot references (``pgplakar prune``); returns the prune report: ``bytes_freed``,
    ``packs_deleted``, ``packs_repacked``, ``snapshots`` kept, ``dry_run``.

    :param lock_wait: seconds to wait for running readers (restores, checks); backups never make prune wait
        (``store/intents.py``).
    """

    template_fields: Sequence[str] = ("store_conn_id",)

    def __init__(self, *, dry_run: bool = False, lock_wait: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.is_dry_run = dry_run
        self.lock_wait = lock_wait

    def execute(self, context: Context) -> dict[str, Any]:
        from ..store.prune import prune

        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            rep = prune(store, dry_run=self.is_dry_run, lock_wait=self.lock_wait)
        self.log.info("prune%s: %d pack(s) %s (%d repacked), %.1f MiB freed; %d snapshot(s) kept",
                      " (dry run)" if self.is_dry_run else "", rep.packs_deleted,
                      "would go" if self.is_dry_run else "deleted", rep.packs_repacked, rep.bytes_freed / 2**20,
                      rep.snapshots)
        return rep.as_dict()


class PgPlakarFreshnessOperator(_StoreOperator):
    """Fail naming every source whose newest snapshot is older than ``max_age`` (``pgplakar freshness``).

    :param max_age: ``"26h"``, ``"2d"``, ``"1w"`` (y, m months, w, d, h); templated.
    :param group_by: what a source is, as for :class:`PgPlakarForgetOperator` (default: kind, host, port, database
        or data directory).
    Returns the report (``ok``, ``max_age``, ``sources`` with newest snapshot and age, ``stale``) when all are fresh.
    """

    template_fields: Sequence[str] = ("store_conn_id", "max_age")

    def __init__(self, *, max_age: str = "26h", group_by: str | Sequence[str] = DEFAULT_GROUP_BY,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if "{{" not in max_age:
            from ..store.stats import parse_max_age

            parse_max_age(max_age)  # a bad duration fails at parse time
        self.max_age = max_age
        self.group_by = _group_by(group_by)

    def execute(self, context: Context) -> dict[str, Any]:
        from ..store.stats import StaleSources, age_text, freshness

        with PgPlakarStoreHook(self.store_conn_id).get_store() as store:
            rep = freshness(store, self.max_age, group_by=self.group_by)
        stale = {s.source for s in rep.stale}
        for s in rep.sources:
            self.log.info("%s %s: newest %s at %s (%s old)", "STALE" if s.source in stale else "ok", s.source,
                          s.newest[:8], s.newest_time[:19], age_text(s.age_s))
        if not rep.ok:
            raise StaleSources(rep)
        return rep.as_dict()
