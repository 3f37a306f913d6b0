"""Retention policy: decide which snapshots ``forget`` keeps, with restic's semantics.

Pure on purpose (no I/O, no Airflow, no PostgreSQL): deleting snapshots is irreversible,
so the decision is isolated here where it can be tested exhaustively on hand-built series,
and the caller only has to act on the returned :class:`Decision` list.

Semantics, per group (see :func:`apply_policy`): snapshots are walked newest to oldest; each
count rule (last, hourly, daily, weekly, monthly, yearly) keeps a snapshot when it still has
count left and the snapshot falls into a different calendar bucket than the last one the rule
kept, so each rule keeps the *newest* snapshot of each of its N most recent buckets. A snapshot
is kept if any rule keeps it; all reasons are reported. A count of -1 means unlimited.

``keep_within`` durations use restic's units (``y`` years, ``m`` *months*, ``d`` days, ``h`` hours, plus ``w``
weeks), combined as in ``2y5m7d3h``: years, months and days are calendar units in the policy's time zone (a month
back from March 31 is February 28 or 29, clamped rather than overflowing into March), hours are exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a CLI command that only lists snapshots does not load pendulum
    import pendulum

__all__ = [
    "DEFAULT_GROUP_BY",
    "DURATION_HELP",
    "EMPTY_POLICY_MESSAGE",
    "UNGROUPED_LABELS",
    "UNLIMITED",
    "VOLATILE_LABELS",
    "Decision",
    "Duration",
    "Policy",
    "SnapshotInfo",
    "apply_policy",
    "group_key",
    "parse_duration",
    "parse_group_by",
]

#: Count value meaning "no limit" (restic's ``unlimited``).
UNLIMITED = -1

#: Labels that differ on every run; grouping by them would put each snapshot in its own
#: group, so every ``keep_last=1`` would keep everything.
VOLATILE_LABELS: frozenset[str] = frozenset({"run_id", "try_number"})

#: Labels the ``labels`` item ignores besides the volatile ones: a fanned-out task's ``map_index`` follows the
#: position of a database in this run's list, not the database (``label:map_index`` still groups by it).
UNGROUPED_LABELS: frozenset[str] = VOLATILE_LABELS | {"map_index"}

#: One group per source: what identifies it (kind, host, port, database, or data directory; see
#: ``store/forget.py`` ``source_key``), not the Airflow task or run that took the snapshot.
DEFAULT_GROUP_BY: tuple[str, ...] = ("source",)

EMPTY_POLICY_MESSAGE = "refusing to forget every snapshot: give at least one keep rule"

_LABEL_PREFIX = "label:"
_PLAIN_GROUP_ITEMS = frozenset({"source", "labels", "tags"})

# Count rules in restic's order; the order only affects the order of reasons.
_COUNT_RULES: tuple[tuple[str, str], ...] = (
    ("keep_last", "last"),
    ("keep_hourly", "hourly"),
    ("keep_daily", "daily"),
    ("keep_weekly", "weekly"),
    ("keep_monthly", "monthly"),
    ("keep_yearly", "yearly"),
)


#: A group as ``((item, value), ...)``: ``(("source", "postgres:db1:5432/sales"), ("label:dag_id", "nightly"))``.
GroupKey = tuple[tuple[str, object], ...]


def parse_time(text: str) -> datetime:
    """A snapshot's ISO 8601 timestamp (``time_start``) as a timezone-aware datetime; ValueError for anything else
    (pendulum also parses bare dates, times and durations)."""
    import pendulum

    parsed = pendulum.parse(text)
    if not isinstance(parsed, datetime):
        raise ValueError(f"not a timestamp: {text!r}")
    return parsed


@dataclass(frozen=True)
class SnapshotInfo:
    """What the policy needs to know of a snapshot (a projection of the snapshot object)."""

    id: str
    time: datetime
    source: str
    labels: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Duration:
    """A restic ``--keep-within`` span: calendar years, months and days, then exact hours (weeks are 7 days)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        for name in ("years", "months", "days", "hours"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"keep_within: {name} must be a non-negative integer, got {value!r}")

    def __str__(self) -> str:
        parts = [f"{v}{u}" for v, u in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h"))]
        return "".join(p for p in parts if p[0] != "0") or "0h"

    def before(self, t: datetime, tz: str) -> datetime:
        """``t`` minus this span, calendar parts counted in ``tz``; the earliest instant when that predates year 1."""
        import pendulum

        local = pendulum.instance(t).in_timezone(pendulum.timezone(tz))
        try:
            return local.subtract(years=self.years, months=self.months, days=self.days).subtract(hours=self.hours)
        except (ValueError, OverflowError):  # a span longer than the calendar: everything is within it
            return datetime.min.replace(tzinfo=UTC)


_DURATION_UNITS = {"y": "years", "m": "months", "w": "weeks", "d": "days", "h": "hours"}
# One number and its unit; at most 9 digits per number: larger values mean "all history" anyway, and bound the parse.
_DURATION_PART = re.compile(rf"([0-9]{{1,9}})([{''.join(_DURATION_UNITS)}])")
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART.pattern})+")
DURATION_HELP = "y years, m months, w weeks, d days, h hours, combined as in 1y6m or 7d12h"


def parse_duration(text: str) -> Duration:
    """Parse a restic duration such as ``6m`` (six months), ``2y5m7d3h`` or ``2w``; ValueError names the fix."""
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text):
        raise ValueError(f"keep_within: {text!r} is not a duration ({DURATION_HELP})")
    total = dict.fromkeys(_DURATION_UNITS.values(), 0)
    for number, unit in _DURATION_PART.findall(text):
        total[_DURATION_UNITS[unit]] += int(number)  # a repeated unit adds up, as in restic
    weeks = total.pop("weeks")
    total["days"] += 7 * weeks
    return Duration(**total)


@dataclass(frozen=True)
class Policy:
    """The ``--keep-*`` options of ``forget``; validated at construction so bad input fails early.

    A count of 0 disables the rule, :data:`UNLIMITED` (-1) keeps one snapshot per bucket forever.
    ``keep_within`` is relative to the newest snapshot *of the group*, not to "now", so a group
    that stopped receiving backups is never emptied by the passage of time. It takes a restic duration string
    (``"6m"`` is six months, see :func:`parse_duration`), a :class:`Duration`, or an exact ``timedelta``.
    """

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: Duration | timedelta | str | None = None
    keep_tags: tuple[str, ...] = ()
    tz: str = "UTC"

    def __post_init__(self) -> None:
        for attr, _ in _COUNT_RULES:
            value = getattr(self, attr)
            # bool is an int subclass; True as a count is almost surely a caller bug.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{attr} must be an integer, got {value!r}")
            if value < UNLIMITED:
                raise ValueError(f"{attr} must be >= 0 or -1 (unlimited), got {value}")
        if isinstance(self.keep_within, str):
            object.__setattr__(self, "keep_within", parse_duration(self.keep_within))
        if self.keep_within is not None and not isinstance(self.keep_within, Duration):
            if not isinstance(self.keep_within, timedelta):
                raise ValueError(f"keep_within must be a duration such as '6m' or '7d', got {self.keep_within!r}")
            if self.keep_within < timedelta(0):
                raise ValueError(f"keep_within must not be negative, got {self.keep_within}")
        if isinstance(self.keep_tags, str):
            # A bare string would be iterated character by character.
            raise ValueError(f"keep_tags must be a tuple of tags, not a string: {self.keep_tags!r}")
        object.__setattr__(self, "keep_tags", tuple(self.keep_tags))
        if any(not t for t in self.keep_tags):
            raise ValueError("keep_tags must not contain an empty tag")
        if not isinstance(self.tz, str) or not self.tz:
            raise ValueError(f"tz must be a time zone name, got {self.tz!r}")
        import pendulum

        try:
            pendulum.timezone(self.tz)
        except Exception as exc:  # pendulum raises InvalidTimezone (a ValueError) or others
            raise ValueError(f"unknown time zone for tz: {self.tz!r}") from exc

    def is_empty(self) -> bool:
        """True when no rule would keep anything, i.e. applying it would forget every snapshot."""
        return (
            all(getattr(self, attr) == 0 for attr, _ in _COUNT_RULES)
            and self.keep_within is None
            and not self.keep_tags
        )


@dataclass
class Decision:
    """Outcome for one group: ``keep`` and ``remove`` are both ordered newest first."""

    group: GroupKey
    keep: list[tuple[SnapshotInfo, list[str]]] = field(default_factory=list)
    remove: list[SnapshotInfo] = field(default_factory=list)


def parse_group_by(text: str) -> tuple[str, ...]:
    """Parse a ``--group-by`` string such as ``"source,label:dag_id"``; ``""`` means one group.

    Volatile labels are refused by name because grouping on them would silently disable retention.
    """
    text = text.strip()
    if not text:
        return ()
    items: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        _validate_group_item(item)
        if item in items:
            raise ValueError(f"duplicate group-by item: {item!r}")
        items.append(item)
    return tuple(items)


def _validate_group_item(item: str) -> None:
    if item in _PLAIN_GROUP_ITEMS:
        return
    if item.startswith(_LABEL_PREFIX):
        name = item[len(_LABEL_PREFIX) :]
        if not name:
            raise ValueError(f"invalid group-by item {item!r}: missing label name after 'label:'")
        if name in VOLATILE_LABELS:
            raise ValueError(
                f"invalid group-by item {item!r}: label {name!r} differs on every run, "
                "so every snapshot would be its own group"
            )
        return
    raise ValueError(f"invalid group-by item {item!r}: expected 'source', 'labels', 'tags' or 'label:NAME'")


def _check_group_by(group_by: Sequence[str]) -> None:
    if isinstance(group_by, str):
        raise TypeError("group_by must be a sequence of items; use parse_group_by() on a string")
    for item in group_by:
        _validate_group_item(item)


def group_key(s: SnapshotInfo, group_by: Sequence[str]) -> GroupKey:
    """The group a snapshot belongs to, as ``((item, value), ...)`` so it prints self-describingly."""
    _check_group_by(group_by)
    return _group_key(s, group_by)


def _group_key(s: SnapshotInfo, group_by: Sequence[str]) -> GroupKey:
    key: list[tuple[str, object]] = []
    for item in group_by:
        if item == "source":
            key.append((item, s.source))
        elif item == "labels":
            stable = tuple(sorted((k, v) for k, v in s.labels.items() if k not in UNGROUPED_LABELS))
            key.append((item, stable))
        elif item == "tags":
            key.append((item, tuple(sorted(s.tags))))
        else:  # "label:NAME", validated by the caller
            key.append((item, s.labels.get(item[len(_LABEL_PREFIX) :], "")))
    return tuple(key)


def _bucketers(tz: str) -> dict[str, Callable[[datetime, int], Hashable]]:
    """Bucket functions by rule; calendar ones use local time in ``tz`` so "a day" is the user's day."""
    import pendulum

    zone = pendulum.timezone(tz)

    def local(t: datetime) -> pendulum.DateTime:
        return pendulum.instance(t).in_timezone(zone)

    def weekly(t: datetime, _: int) -> Hashable:
        iso = local(t).isocalendar()  # ISO year, not calendar year: 2026-12-31 is 2026-W53
        return (iso.year, iso.week)

    def hourly(t: datetime, _: int) -> Hashable:
        d = local(t)
        return (d.year, d.month, d.day, d.hour)

    def daily(t: datetime, _: int) -> Hashable:
        d = local(t)
        return (d.year, d.month, d.day)

    def monthly(t: datetime, _: int) -> Hashable:
        d = local(t)
        return (d.year, d.month)

    def yearly(t: datetime, _: int) -> Hashable:
        return local(t).year

    def last(_: datetime, position: int) -> Hashable:
        return position  # every snapshot is its own bucket

    return {"last": last, "hourly": hourly, "daily": daily, "weekly": weekly, "monthly": monthly, "yearly": yearly}


def _format_timedelta(td: timedelta) -> str:
    """Compact duration for reasons, e.g. ``7d12h`` (``min``, not ``m``: ``m`` means months in a duration)."""
    total = int(td.total_seconds())
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")) if v]
    return "".join(parts) or "0s"


def _decide_group(key: GroupKey, members: list[SnapshotInfo], policy: Policy) -> Decision:
    # Newest first; ties by id (descending, consistently with the time order) for determinism.
    ordered = sorted(members, key=lambda s: (s.time, s.id), reverse=True)
    bucketers = _bucketers(policy.tz)
    counts = {name: getattr(policy, attr) for attr, name in _COUNT_RULES}
    last_kept: dict[str, Hashable] = {}
    cutoff: datetime | None = None
    within_reason = ""
    if isinstance(policy.keep_within, Duration):
        cutoff = policy.keep_within.before(ordered[0].time, policy.tz)
        within_reason = f"within {policy.keep_within}"
    elif isinstance(policy.keep_within, timedelta):  # a str was parsed into a Duration by Policy.__post_init__
        cutoff = ordered[0].time - policy.keep_within
        within_reason = f"within {_format_timedelta(policy.keep_within)}"
    keep_tags = set(policy.keep_tags)

    decision = Decision(group=key)
    for position, snap in enumerate(ordered):
        reasons: list[str] = []
        for _, name in _COUNT_RULES:
            if counts[name] == 0:
                continue
            bucket = bucketers[name](snap.time, position)
            if name in last_kept and last_kept[name] == bucket:
                continue
            last_kept[name] = bucket
            if counts[name] > 0:
                counts[name] -= 1
            reasons.append(f"{name} snapshot")
        if cutoff is not None and snap.time >= cutoff:
            reasons.append(within_reason)
        matched = sorted(keep_tags.intersection(snap.tags))
        if matched:
            reasons.append("tag " + ",".join(matched))
        if reasons:
            decision.keep.append((snap, reasons))
        else:
            decision.remove.append(snap)
    return decision


def apply_policy(
    snapshots: Iterable[SnapshotInfo],
    policy: Policy,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
) -> list[Decision]:
    """Split ``snapshots`` into groups and apply ``policy`` to each; one Decision per group, sorted by key.

    Raises ValueError for an empty policy (forgetting by explicit id is a separate path), naive
    datetimes (calendar buckets would be ambiguous) and duplicate ids (a caller bug).
    """
    if policy.is_empty():
        raise ValueError(EMPTY_POLICY_MESSAGE)
    _check_group_by(group_by)

    groups: dict[GroupKey, list[SnapshotInfo]] = {}
    seen: set[str] = set()
    for s in snapshots:
        if s.time.tzinfo is None or s.time.utcoffset() is None:
            raise ValueError(f"snapshot {s.id}: time must be timezone-aware, got naive {s.time!r}")
        if s.id in seen:
            raise ValueError(f"duplicate snapshot id: {s.id}")
        seen.add(s.id)
        groups.setdefault(_group_key(s, group_by), []).append(s)

    return [_decide_group(key, groups[key], policy) for key in sorted(groups)]
