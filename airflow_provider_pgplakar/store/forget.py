"""Retention applied to a store: which snapshots a policy removes (see :mod:`.retention` for the rules)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pendulum

from .retention import DEFAULT_GROUP_BY, Decision, Policy, SnapshotInfo, apply_policy

if TYPE_CHECKING:
    from .repo import Snapshot, Store


def source_label(source: dict) -> str:
    """One string naming where a snapshot came from (the grouping key's ``source`` part)."""
    kind, origin = source.get("kind", ""), source.get("origin", "")
    return f"{kind}:{origin}" if kind else origin


def snapshot_info(s: Snapshot) -> SnapshotInfo:
    return SnapshotInfo(
        id=s.id, time=pendulum.parse(s.time), source=source_label(s.header.get("source") or {}),
        labels=s.header.get("labels") or {}, tags=tuple(s.header.get("tags") or ()),
    )


def plan_forget(store: Store, policy: Policy, group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[Decision]:
    return apply_policy([snapshot_info(s) for s in store.snapshots()], policy, group_by)
