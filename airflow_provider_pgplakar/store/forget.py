"""Retention applied to a store: which snapshots a policy removes (see :mod:`.retention` for the rules), and the
``forget`` that the CLI and the Airflow operator share.

Snapshots are grouped by default by what identifies their source (:func:`source_key`): the kind of backup and the
host, port and database (or the data directory's server, or a file path) — never by the Airflow run that took them,
so snapshots of one database taken by a fanned-out task (``map_index`` 0 today, 3 next week) stay one group.

Verify reports (kind ``pgplakar-verify``, labelled ``verifies=<snapshot id>``, written by ``pg/verify.py``) are
evidence about a backup, not backups: a policy does not group them (each would be a group of one, kept forever);
a report goes when the snapshot it verifies goes, and stays while it stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pendulum

from .retention import DEFAULT_GROUP_BY, Policy, SnapshotInfo, apply_policy

if TYPE_CHECKING:
    from .repo import Snapshot, Store


#: Snapshot kinds that are not backups of a source (pg/verify.py's VERIFY_KIND) and the label naming what they prove.
NOT_BACKUP_KINDS: frozenset[str] = frozenset({"pgplakar-verify"})
VERIFIES_LABEL = "verifies"


def source_label(source: dict) -> str:
    """One string naming where a snapshot came from, for display (the origin as recorded, user name included)."""
    kind, origin = source.get("kind", ""), source.get("origin", "")
    return f"{kind}:{origin}" if kind else origin


def source_key(source: dict) -> str:
    """What identifies a source: its kind and, for a URL origin, ``host:port/database`` without the scheme's
    variant (``postgres+aws`` and ``postgres`` reach the same database) or the user name; other origins (file
    paths) as recorded."""
    kind, origin = str(source.get("kind", "")), str(source.get("origin", ""))
    scheme, sep, rest = origin.partition("://")
    if sep and scheme:
        authority, slash, path = rest.partition("/")
        origin = authority.rpartition("@")[2] + (slash + path if path else "")
    return f"{kind}:{origin}" if kind else origin


def snapshot_info(s: Snapshot) -> SnapshotInfo:
    return SnapshotInfo(
        id=s.id, time=pendulum.parse(s.time), source=source_key(s.header.get("source") or {}),
        labels=s.header.get("labels") or {}, tags=tuple(s.header.get("tags") or ()),
    )


def group_text(group: tuple) -> str:
    """``source=postgres:db1:5432/sales, label:dag_id=nightly`` for a group key of :func:`.retention.group_key`."""
    parts = []
    for item, value in group:
        if isinstance(value, tuple):
            value = ",".join(f"{k}={v}" for k, v in value) if value and isinstance(value[0], tuple) else \
                ",".join(map(str, value))
        parts.append(f"{item}={value}")
    return ", ".join(parts) or "(all snapshots)"


@dataclass
class ForgetResult:
    """What a forget kept and removed (full IDs, newest first per group); ``dry_run`` removed nothing."""

    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "removed": self.removed, "groups": self.groups, "dry_run": self.dry_run}


def forget(store: Store, policy: Policy | None = None, *, ids: Sequence[str] = (),
           group_by: Sequence[str] = DEFAULT_GROUP_BY, dry_run: bool = False) -> ForgetResult:
    """Remove the snapshots ``ids`` (full IDs, prefixes or ``latest``), or those ``policy`` does not keep.

    Only snapshot files are deleted; ``prune`` then frees the data. Exactly one of ``ids`` and ``policy``: giving
    both or neither is refused before anything is deleted (ValueError).
    """
    if isinstance(ids, str):
        raise ValueError("ids must be a list of snapshot IDs, not a string")
    if ids and policy is not None:
        raise ValueError("give snapshot IDs or a keep policy, not both")
    if not ids and policy is None:
        raise ValueError("forget needs snapshot IDs or a keep policy (at least one keep rule)")
    result = ForgetResult(dry_run=dry_run)
    if ids:
        result.removed = list(dict.fromkeys(store.resolve(i) for i in ids))
        result.kept = [i for i in store.snapshot_ids() if i not in set(result.removed)]
    else:
        assert policy is not None
        snaps = store.snapshots()
        reports = [s for s in snaps if (s.header.get("source") or {}).get("kind") in NOT_BACKUP_KINDS]
        backups = [s for s in snaps if s not in reports]
        for d in apply_policy([snapshot_info(s) for s in backups], policy, group_by):
            result.groups.append({
                "group": group_text(d.group),
                "keep": [{"id": s.id, "time": s.time.isoformat(), "reasons": r} for s, r in d.keep],
                "remove": [s.id for s in d.remove],
            })
            result.kept += [s.id for s, _ in d.keep]
            result.removed += [s.id for s in d.remove]
        if reports:
            existing, removing = set(store.snapshot_ids()), set(result.removed)
            group: dict[str, Any] = {"group": "verify reports (follow the snapshot they verify)", "keep": [],
                                     "remove": []}
            for r in reports:
                target = str((r.header.get("labels") or {}).get(VERIFIES_LABEL, ""))
                if target and (target in removing or target not in existing):
                    group["remove"].append(r.id)
                    result.removed.append(r.id)
                else:
                    group["keep"].append({"id": r.id, "time": r.time,
                                          "reasons": [f"verifies {target[:8]}" if target else "verifies unknown"]})
                    result.kept.append(r.id)
            result.groups.append(group)
    if not dry_run:
        store.forget(result.removed)
    return result
