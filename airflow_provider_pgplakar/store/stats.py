"""What a store holds and how fresh it is: per source the newest snapshot, its age and sizes, and the store's totals;
``freshness`` names every source whose newest snapshot is older than a maximum age (the CLI exits 3, the Airflow
operator fails the task, so the usual failure alerts fire).

Sources are grouped as ``forget`` groups them (:func:`.forget.source_key`: kind, host, port, database or data
directory, unless ``group_by`` says otherwise). Verify reports (kind ``pgplakar-verify``, written by
``pg/verify.py``) are evidence about a backup, not a backup: they are not sources here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pendulum

from .errors import StoreError
from .forget import NOT_BACKUP_KINDS, group_text, snapshot_info, source_label
from .retention import DEFAULT_GROUP_BY, Duration, group_key, parse_duration

if TYPE_CHECKING:
    from .repo import Snapshot, Store



def age_text(seconds: float) -> str:
    """``30h``, ``1h5min``, ``4d2h``: an age as a person reads it (hours up to three days, as max ages are given)."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes = rest // 60
    if hours >= 72:
        days, hours = divmod(hours, 24)
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}min" if minutes else f"{hours}h"
    return f"{minutes}min" if minutes else f"{total}s"


@dataclass
class SourceStats:
    """One source: its newest snapshot (ID, time, age, sizes) and how many snapshots the store keeps of it."""

    source: str
    origin: str
    snapshots: int
    newest: str
    newest_time: str
    age_s: float
    bytes: int
    new_bytes: int
    new_stored_bytes: int
    stored_bytes_total: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "age": age_text(self.age_s)}


@dataclass
class StoreStats:
    """Per source, then the store's totals: logical bytes (what the snapshots hold), stored bytes (the packs) and
    the ratio of the two (deduplication and compression)."""

    sources: list[SourceStats] = field(default_factory=list)
    snapshots: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    packs: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return round(self.logical_bytes / self.stored_bytes, 2) if self.stored_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"sources": [s.as_dict() for s in self.sources], "snapshots": self.snapshots,
                "logical_bytes": self.logical_bytes, "stored_bytes": self.stored_bytes, "packs": self.packs,
                "dedup_ratio": self.dedup_ratio, "unreadable": self.unreadable}


def _now(now: datetime | None) -> datetime:
    return pendulum.now("UTC") if now is None else pendulum.instance(now)


def _groups(snaps: list[Snapshot], group_by: Sequence[str]) -> dict[str, list[Snapshot]]:
    groups: dict[str, list[Snapshot]] = {}
    for s in snaps:
        if (s.header.get("source") or {}).get("kind") in NOT_BACKUP_KINDS:
            continue
        groups.setdefault(group_text(group_key(snapshot_info(s), group_by)), []).append(s)
    return groups


def store_stats(store: Store, *, group_by: Sequence[str] = DEFAULT_GROUP_BY, now: datetime | None = None,
                totals: bool = True) -> StoreStats:
    """Per source and store totals (``totals=False`` skips listing the packs); unreadable snapshots are listed in
    ``unreadable`` (``check`` tells why)."""
    t = _now(now)
    out = StoreStats()
    snaps = store.snapshots(errors=out.unreadable)
    out.snapshots = len(snaps)
    out.logical_bytes = sum(int((s.header.get("stats") or {}).get("bytes", 0)) for s in snaps)
    for obj in store.backend.list("packs/") if totals else ():
        out.packs += 1
        out.stored_bytes += obj.size
    for name, members in sorted(_groups(snaps, group_by).items()):
        newest = max(members, key=lambda s: (s.time, s.id))
        st = newest.header.get("stats") or {}
        out.sources.append(SourceStats(
            source=name, origin=source_label(newest.header.get("source") or {}), snapshots=len(members),
            newest=newest.id, newest_time=newest.time,
            age_s=round((t - pendulum.parse(newest.time)).total_seconds(), 1),
            bytes=int(st.get("bytes", 0)), new_bytes=int(st.get("new_raw_bytes", 0)),
            new_stored_bytes=int(st.get("new_stored_bytes", 0)),
            stored_bytes_total=sum(int((m.header.get("stats") or {}).get("new_stored_bytes", 0)) for m in members),
        ))
    return out


class StaleSources(StoreError):
    """A source's newest snapshot is older than the maximum age (or the store holds no backup at all)."""

    def __init__(self, report: FreshnessReport) -> None:
        super().__init__(report.failure_text())
        self.report = report


@dataclass
class FreshnessReport:
    """Every source with its newest snapshot's age; ``stale`` lists those older than ``max_age``."""

    max_age: str
    sources: list[SourceStats] = field(default_factory=list)
    stale: list[SourceStats] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No stale source, and at least one source (a store no backup ever reached is not fresh)."""
        return bool(self.sources) and not self.stale

    def failure_text(self) -> str:
        if not self.sources:
            return "no backups in the store at all: nothing is fresh"
        names = "; ".join(f"{s.source} (newest {s.newest[:8]} at {s.newest_time[:19].replace('T', ' ')}, "
                          f"{age_text(s.age_s)} old)" for s in self.stale)
        return f"{len(self.stale)} of {len(self.sources)} source(s) have no snapshot newer than {self.max_age}: {names}"

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "max_age": self.max_age, "sources": [s.as_dict() for s in self.sources],
                "stale": [s.source for s in self.stale]}


def parse_max_age(value: str | timedelta | Duration) -> Duration | timedelta:
    """``26h``, ``2d``, ``1w`` (retention's units: y, m months, w, d, h) or a timedelta; ValueError names the fix."""
    if isinstance(value, (timedelta, Duration)):
        return value
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"max_age: {value!r} is not a duration (e.g. 26h, 2d, 1w: y, m months, w, d, h)") from None


def freshness(store: Store, max_age: str | timedelta | Duration, *, group_by: Sequence[str] = DEFAULT_GROUP_BY,
              now: datetime | None = None) -> FreshnessReport:
    """Which sources' newest snapshot is older than ``max_age`` (measured from the snapshot's start)."""
    span = parse_max_age(max_age)
    t = _now(now)
    cutoff = span.before(t, "UTC") if isinstance(span, Duration) else t - span
    text = str(span) if isinstance(span, Duration) else age_text(span.total_seconds())
    rep = FreshnessReport(max_age=text, sources=store_stats(store, group_by=group_by, now=t, totals=False).sources)
    rep.stale = [s for s in rep.sources if pendulum.parse(s.newest_time) < cutoff]
    return rep


def parse_newer_than(value: str | datetime | timedelta | None, now: datetime | None = None) -> datetime | None:
    """An absolute time from an ISO timestamp (``2026-06-01T02:00:00+00:00``; naive means UTC), a datetime, or a
    duration back from ``now`` (``"26h"``, ``"2d"``, a timedelta); None or ``""`` means no bound."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return pendulum.instance(value) if value.tzinfo else pendulum.instance(value, tz="UTC")
    if isinstance(value, timedelta):
        return _now(now) - value
    try:
        return parse_duration(value).before(_now(now), "UTC")
    except ValueError:
        pass
    try:
        parsed = pendulum.parse(value, tz="UTC")
    except Exception:
        parsed = None
    if not isinstance(parsed, datetime):
        raise ValueError(f"newer_than: {value!r} is neither a timestamp (2026-06-01T02:00:00+00:00) nor a duration "
                         "(26h, 2d)")
    return parsed


@dataclass(frozen=True)
class SnapshotFilter:
    """What a waiting task looks for: all ``tags``, all ``labels`` (equal values), a source whose identity
    (:func:`.forget.source_key`, e.g. ``postgres:db1:5432/sales``) matches the glob ``source``, started after
    ``newer_than``. Verify reports never match."""

    tags: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    newer_than: datetime | None = None

    def matches(self, snap: Snapshot) -> bool:
        import fnmatch

        from .forget import source_key

        h = snap.header
        src = h.get("source") or {}
        if src.get("kind") in NOT_BACKUP_KINDS:
            return False
        if not set(self.tags) <= set(h.get("tags") or ()):
            return False
        labels = h.get("labels") or {}
        if any(str(labels.get(k)) != v for k, v in self.labels):
            return False
        if self.source and not fnmatch.fnmatchcase(source_key(src), self.source):
            return False
        return self.newer_than is None or pendulum.parse(snap.time) > self.newer_than


def newest_matching(store: Store, flt: SnapshotFilter) -> Snapshot | None:
    """The newest snapshot matching ``flt``, or None."""
    found = [s for s in store.snapshots() if flt.matches(s)]
    return max(found, key=lambda s: (s.time, s.id)) if found else None
