"""Tests for the pure retention policy (restic ``forget`` semantics).

Expected sets are written out by hand from the calendar, never recomputed with the code under
test, so a change in bucket semantics shows up as a readable diff of snapshot ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta

import pytest

from airflow_provider_pgplakar.store.retention import (
    DEFAULT_GROUP_BY,
    EMPTY_POLICY_MESSAGE,
    VOLATILE_LABELS,
    Decision,
    Duration,
    Policy,
    SnapshotInfo,
    apply_policy,
    group_key,
    parse_duration,
    parse_group_by,
)

SOURCE = "postgres://db1:5432"
LABELS = {"dag_id": "backup_db1", "task_id": "dump", "map_index": "-1"}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def sid(t: datetime) -> str:
    """Readable id derived from the time, so assertions list times rather than opaque hashes."""
    return t.strftime("%Y%m%dT%H%M")


def snap(
    t: datetime,
    *,
    source: str = SOURCE,
    labels: Mapping[str, str] | None = None,
    tags: tuple[str, ...] = (),
    id: str | None = None,
) -> SnapshotInfo:
    return SnapshotInfo(id=id or sid(t), time=t, source=source, labels=dict(labels or LABELS), tags=tags)


def series(start: datetime, step: timedelta, count: int, **kw: object) -> list[SnapshotInfo]:
    return [snap(start + i * step, **kw) for i in range(count)]  # type: ignore[arg-type]


def six_hourly() -> list[SnapshotInfo]:
    """One snapshot every 6 hours for 60 days: 2026-03-01T00:00Z .. 2026-04-29T18:00Z (240 snapshots)."""
    return series(utc(2026, 3, 1), timedelta(hours=6), 60 * 4)


def kept(decisions: Iterable[Decision]) -> set[str]:
    return {s.id for d in decisions for s, _ in d.keep}


def reasons(decisions: Iterable[Decision]) -> dict[str, list[str]]:
    return {s.id: r for d in decisions for s, r in d.keep}


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1
    return decisions[0]


# --- fixture sanity -------------------------------------------------------------------------


def test_six_hourly_fixture_bounds() -> None:
    snaps = six_hourly()
    assert len(snaps) == 240
    assert snaps[0].id == "20260301T0000"
    assert snaps[-1].id == "20260429T1800"
    assert date(2026, 4, 29).isocalendar()[:2] == (2026, 18)  # a Wednesday


# --- count rules ----------------------------------------------------------------------------


def test_keep_last() -> None:
    d = only(apply_policy(six_hourly(), Policy(keep_last=3)))
    assert [s.id for s, _ in d.keep] == ["20260429T1800", "20260429T1200", "20260429T0600"]
    assert all(r == ["last snapshot"] for _, r in d.keep)
    assert len(d.remove) == 237


def test_keep_hourly_each_snapshot_is_its_own_hour() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_hourly=3))) == {
        "20260429T1800",
        "20260429T1200",
        "20260429T0600",
    }


def test_keep_hourly_collapses_same_hour() -> None:
    snaps = [snap(utc(2026, 5, 1, 10, m)) for m in (0, 20, 40)] + [snap(utc(2026, 5, 1, 9, m)) for m in (5, 50)]
    assert kept(apply_policy(snaps, Policy(keep_hourly=2))) == {"20260501T1040", "20260501T0950"}


def test_keep_daily_keeps_newest_of_each_day() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_daily=3))) == {
        "20260429T1800",
        "20260428T1800",
        "20260427T1800",
    }


def test_keep_weekly_uses_iso_weeks() -> None:
    # 2026-04-29 is in W18 (Mon 04-27); W17 and W16 end on Sundays 04-26 and 04-19.
    assert kept(apply_policy(six_hourly(), Policy(keep_weekly=3))) == {
        "20260429T1800",
        "20260426T1800",
        "20260419T1800",
    }


def test_keep_monthly_only_as_many_as_months_exist() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_monthly=3))) == {"20260429T1800", "20260331T1800"}


def test_keep_yearly() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_yearly=5))) == {"20260429T1800"}


def test_combined_rules_accumulate_reasons() -> None:
    policy = Policy(keep_last=2, keep_daily=2, keep_weekly=2, keep_monthly=2)
    assert reasons(apply_policy(six_hourly(), policy)) == {
        "20260429T1800": ["last snapshot", "daily snapshot", "weekly snapshot", "monthly snapshot"],
        "20260429T1200": ["last snapshot"],
        "20260428T1800": ["daily snapshot"],
        "20260426T1800": ["weekly snapshot"],
        "20260331T1800": ["monthly snapshot"],
    }


def test_rule_count_is_independent_of_other_rules() -> None:
    # keep_daily still counts the day already kept by keep_last: restic semantics, no sharing.
    policy = Policy(keep_last=1, keep_daily=1)
    assert reasons(apply_policy(six_hourly(), policy)) == {"20260429T1800": ["last snapshot", "daily snapshot"]}


# --- calendar edges -------------------------------------------------------------------------


def year_change_daily() -> list[SnapshotInfo]:
    """Daily at 12:00Z from 2026-12-26 to 2027-01-10 (16 snapshots)."""
    return series(utc(2026, 12, 26, 12), timedelta(days=1), 16)


def test_iso_week_across_year_change() -> None:
    assert date(2026, 12, 31).isocalendar()[:2] == (2026, 53)
    assert date(2027, 1, 4).isocalendar()[:2] == (2027, 1)
    # 2027-W01 ends Sun 01-10; 2026-W53 runs Mon 12-28 .. Sun 2027-01-03; 2026-W52 ends Sun 12-27.
    assert kept(apply_policy(year_change_daily(), Policy(keep_weekly=3))) == {
        "20270110T1200",
        "20270103T1200",
        "20261227T1200",
    }


def test_monthly_and_yearly_use_calendar_year_not_iso_year() -> None:
    expected = {"20270110T1200", "20261231T1200"}
    assert kept(apply_policy(year_change_daily(), Policy(keep_yearly=2))) == expected
    assert kept(apply_policy(year_change_daily(), Policy(keep_monthly=2))) == expected


def tz_series() -> list[SnapshotInfo]:
    return [snap(utc(2026, 6, 9, 12)), snap(utc(2026, 6, 10, 3)), snap(utc(2026, 6, 10, 20))]


def test_daily_in_utc() -> None:
    assert kept(apply_policy(tz_series(), Policy(keep_daily=2))) == {"20260610T2000", "20260609T1200"}


def test_tz_moves_snapshot_into_previous_day() -> None:
    # New York is UTC-4 in June: 06-10T03:00Z is 06-09 23:00 local, the newest of local 06-09.
    policy = Policy(keep_daily=2, tz="America/New_York")
    assert kept(apply_policy(tz_series(), policy)) == {"20260610T2000", "20260610T0300"}


def test_tz_moves_snapshot_into_next_day() -> None:
    # Tokyo is UTC+9: 06-10T20:00Z is 06-11 05:00 local, alone on its local day.
    policy = Policy(keep_daily=2, tz="Asia/Tokyo")
    assert kept(apply_policy(tz_series(), policy)) == {"20260610T2000", "20260610T0300"}
    policy = Policy(keep_daily=3, tz="Asia/Tokyo")  # local days 06-09, 06-10, 06-11
    assert kept(apply_policy(tz_series(), policy)) == {"20260610T2000", "20260610T0300", "20260609T1200"}


def test_hourly_on_dst_fall_back_uses_wall_clock() -> None:
    # Paris falls back at 2026-10-25T01:00Z: 00:30Z and 01:30Z are both 02:30 local wall clock.
    snaps = [snap(utc(2026, 10, 24, 23, 30)), snap(utc(2026, 10, 25, 0, 30)), snap(utc(2026, 10, 25, 1, 30))]
    policy = Policy(keep_hourly=2, tz="Europe/Paris")
    assert kept(apply_policy(snaps, policy)) == {"20261025T0130", "20261024T2330"}


# --- unlimited, within, tags ----------------------------------------------------------------


def test_unlimited_daily_keeps_one_per_day() -> None:
    got = kept(apply_policy(six_hourly(), Policy(keep_daily=-1)))
    assert len(got) == 60
    assert all(i.endswith("T1800") for i in got)


def test_unlimited_last_keeps_everything() -> None:
    d = only(apply_policy(six_hourly(), Policy(keep_last=-1)))
    assert len(d.keep) == 240 and d.remove == []


def test_unlimited_monthly() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_monthly=-1))) == {"20260429T1800", "20260331T1800"}


def test_keep_within_is_inclusive_and_relative_to_newest() -> None:
    # Newest is 04-29T18:00, so the cutoff is 04-28T18:00, which itself is kept.
    got = reasons(apply_policy(six_hourly(), Policy(keep_within=timedelta(days=1))))
    assert set(got) == {"20260428T1800", "20260429T0000", "20260429T0600", "20260429T1200", "20260429T1800"}
    assert got["20260429T0000"] == ["within 1d"]
    got = kept(apply_policy(six_hourly(), Policy(keep_within=timedelta(hours=13))))
    assert got == {"20260429T0600", "20260429T1200", "20260429T1800"}


def test_keep_within_does_not_drain_a_stale_group() -> None:
    # A group whose backups stopped years ago keeps its tail: "within" is not relative to now.
    old = series(utc(2020, 1, 1), timedelta(days=1), 10)
    assert kept(apply_policy(old, Policy(keep_within=timedelta(days=2)))) == {
        "20200108T0000",
        "20200109T0000",
        "20200110T0000",
    }


def test_keep_within_zero_keeps_only_the_newest_instant() -> None:
    assert kept(apply_policy(six_hourly(), Policy(keep_within=timedelta(0)))) == {"20260429T1800"}


# --- keep_within in restic's units (y, m = months, w, d, h), calendar-correct ---------------------------------------

# (duration, tz, snapshot times as ISO strings with offsets, the ones kept). The newest of each row is its anchor;
# cutoffs are worked out by hand from the calendar (comments), never with the code under test.
WITHIN_TABLE = [
    pytest.param(  # six MONTHS, not six minutes: cutoff 2025-10-29T18:00Z
        "6m", "UTC",
        ["2025-10-29T17:59Z", "2025-10-29T18:00Z", "2026-01-15T00:00Z", "2026-04-29T12:00Z", "2026-04-29T18:00Z"],
        {"2025-10-29T18:00Z", "2026-01-15T00:00Z", "2026-04-29T12:00Z", "2026-04-29T18:00Z"},
        id="6m-is-six-months",
    ),
    pytest.param(  # Mar 31 minus a month clamps to Feb 29 in a leap year (never overflows into March)
        "1m", "UTC",
        ["2024-02-29T11:00Z", "2024-02-29T12:00Z", "2024-03-01T00:00Z", "2024-03-31T12:00Z"],
        {"2024-02-29T12:00Z", "2024-03-01T00:00Z", "2024-03-31T12:00Z"},
        id="mar31-leap",
    ),
    pytest.param(  # ... and to Feb 28 otherwise
        "1m", "UTC",
        ["2025-02-28T11:59Z", "2025-02-28T12:00Z", "2025-03-31T12:00Z"],
        {"2025-02-28T12:00Z", "2025-03-31T12:00Z"},
        id="mar31-common",
    ),
    pytest.param(  # Feb 28 minus a month is Jan 28: Jan 31 is within one month of Feb 28
        "1m", "UTC",
        ["2025-01-27T23:00Z", "2025-01-28T00:00Z", "2025-01-31T00:00Z", "2025-02-28T00:00Z"],
        {"2025-01-28T00:00Z", "2025-01-31T00:00Z", "2025-02-28T00:00Z"},
        id="feb28-back-to-jan",
    ),
    pytest.param(  # a leap day minus a year is Feb 28
        "1y", "UTC",
        ["2023-02-27T23:00Z", "2023-02-28T00:00Z", "2023-03-01T00:00Z", "2024-02-29T00:00Z"],
        {"2023-02-28T00:00Z", "2023-03-01T00:00Z", "2024-02-29T00:00Z"},
        id="leap-day-minus-a-year",
    ),
    pytest.param(  # 2026-04-29T18 -2y -> 2024-04-29T18, -5m -> 2023-11-29T18, -7d -> 2023-11-22T18, -3h -> 15:00
        "2y5m7d3h", "UTC",
        ["2023-11-22T14:59Z", "2023-11-22T15:00Z", "2026-04-29T18:00Z"],
        {"2023-11-22T15:00Z", "2026-04-29T18:00Z"},
        id="combined",
    ),
    pytest.param(  # units in any order, as restic parses them
        "3h7d5m2y", "UTC",
        ["2023-11-22T14:59Z", "2023-11-22T15:00Z", "2026-04-29T18:00Z"],
        {"2023-11-22T15:00Z", "2026-04-29T18:00Z"},
        id="combined-any-order",
    ),
    pytest.param(  # weeks are 7 days: cutoff 2026-04-15T18:00Z
        "2w", "UTC",
        ["2026-04-15T17:00Z", "2026-04-15T18:00Z", "2026-04-29T18:00Z"],
        {"2026-04-15T18:00Z", "2026-04-29T18:00Z"},
        id="weeks",
    ),
    pytest.param(  # hours are exact: cutoff 2026-04-28T18:00Z
        "24h", "UTC",
        ["2026-04-28T17:59Z", "2026-04-28T18:00Z", "2026-04-29T18:00Z"],
        {"2026-04-28T18:00Z", "2026-04-29T18:00Z"},
        id="hours",
    ),
    pytest.param(  # a day is a calendar day in tz: Berlin's 2026-03-29 has 23 hours (12:00 CEST back to 12:00 CET)
        "1d", "Europe/Berlin",
        ["2026-03-28T10:30Z", "2026-03-28T11:00Z", "2026-03-29T10:00Z"],
        {"2026-03-28T11:00Z", "2026-03-29T10:00Z"},
        id="day-across-dst",
    ),
    pytest.param(  # a span longer than the calendar keeps the whole group
        "999999999y", "UTC",
        ["0001-01-01T00:00Z", "2026-04-29T18:00Z"],
        {"0001-01-01T00:00Z", "2026-04-29T18:00Z"},
        id="longer-than-history",
    ),
    pytest.param("0h", "UTC", ["2026-04-29T17:00Z", "2026-04-29T18:00Z"], {"2026-04-29T18:00Z"}, id="zero"),
]


@pytest.mark.parametrize(("duration", "tz", "times", "expected"), WITHIN_TABLE)
def test_keep_within_table(duration: str, tz: str, times: list[str], expected: set[str]) -> None:
    snaps = [snap(datetime.fromisoformat(t), id=t) for t in times]
    decision = only(apply_policy(snaps, Policy(keep_within=duration, tz=tz)))
    assert {s.id for s, _ in decision.keep} == expected
    assert {s.id for s in decision.remove} == set(times) - expected
    assert all(r == [f"within {parse_duration(duration)}"] for _, r in decision.keep)


def test_keep_within_reason_names_the_calendar_span() -> None:
    got = reasons(apply_policy(six_hourly(), Policy(keep_within="1y6m")))
    assert got["20260301T0000"] == ["within 1y6m"]
    assert len(got) == 240  # 60 days of history are all within a year and a half


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6m", Duration(months=6)),
        ("1y", Duration(years=1)),
        ("7d", Duration(days=7)),
        ("12h", Duration(hours=12)),
        ("2w", Duration(days=14)),
        ("2y5m7d3h", Duration(years=2, months=5, days=7, hours=3)),
        ("1w2d", Duration(days=9)),
        ("1d1d", Duration(days=2)),  # a repeated unit adds up, as in restic
        ("0d", Duration()),
    ],
)
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "6", "m", "6M", "6 m", " 6m", "6m ", "6m\n", "6min", "6s", "-1d", "1.5d", "1e3d", "\uff16d",
             "d6", "1234567890d", "six months"],
)
def test_bad_duration_is_one_clear_error(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(text)
    msg = str(exc.value)
    assert "\n" not in msg and repr(text) in msg
    assert msg.startswith("keep_within: ") and "m months" in msg
    with pytest.raises(ValueError, match="keep_within"):
        Policy(keep_within=text)


def test_keep_tags_any_of() -> None:
    snaps = six_hourly()
    snaps[10] = snap(snaps[10].time, tags=("pinned",))
    snaps[20] = snap(snaps[20].time, tags=("release", "other"))
    snaps[30] = snap(snaps[30].time, tags=("other",))
    got = reasons(apply_policy(snaps, Policy(keep_last=1, keep_tags=("pinned", "release"))))
    assert got == {
        "20260429T1800": ["last snapshot"],
        snaps[10].id: ["tag pinned"],
        snaps[20].id: ["tag release"],
    }


def test_keep_tags_alone_is_a_valid_policy() -> None:
    snaps = [snap(utc(2026, 1, 1)), snap(utc(2026, 1, 2), tags=("keep",))]
    d = only(apply_policy(snaps, Policy(keep_tags=("keep",))))
    assert [s.id for s, _ in d.keep] == ["20260102T0000"]
    assert [s.id for s in d.remove] == ["20260101T0000"]


# --- grouping -------------------------------------------------------------------------------


def two_sources_two_tasks() -> list[SnapshotInfo]:
    """2 sources x 2 tasks, 5 daily snapshots each, every one with its own run_id and try_number."""
    out = []
    for source in ("postgres://db1:5432", "dir:/data"):
        for task in ("dump", "dump_globals"):
            for day in range(1, 6):
                labels = {"dag_id": "nightly", "task_id": task, "run_id": f"scheduled__{day}", "try_number": "1"}
                out.append(snap(utc(2026, 2, day), source=source, labels=labels, id=f"{source}|{task}|{day}"))
    return out


def test_default_groups_by_source_only() -> None:
    """Issue 11 §7: grouping by the task that took a snapshot (or its map_index) split one database into groups
    that never expire; the default is the source alone."""
    assert DEFAULT_GROUP_BY == ("source",)
    decisions = apply_policy(two_sources_two_tasks(), Policy(keep_last=1))
    assert kept(decisions) == {"postgres://db1:5432|dump_globals|5", "dir:/data|dump_globals|5"} or \
        kept(decisions) == {"postgres://db1:5432|dump|5", "dir:/data|dump|5"}
    assert [len(d.keep) + len(d.remove) for d in decisions] == [10, 10]


def test_map_index_never_splits_a_group() -> None:
    """A fanned-out task backs up the same database as map_index 0 one day and 3 the next: one group, with the
    default grouping and with ``labels``."""
    a = snap(utc(2026, 1, 1), labels={**LABELS, "map_index": "0"})
    b = snap(utc(2026, 1, 2), labels={**LABELS, "map_index": "3"})
    for group_by in (DEFAULT_GROUP_BY, ("source", "labels")):
        d = only(apply_policy([a, b], Policy(keep_last=1), group_by=group_by))
        assert [s.id for s, _ in d.keep] == [b.id] and [s.id for s in d.remove] == [a.id]
    assert len(apply_policy([a, b], Policy(keep_last=1), group_by=("source", "label:map_index"))) == 2


def test_keep_last_one_per_group() -> None:
    decisions = apply_policy(two_sources_two_tasks(), Policy(keep_last=1), group_by=("source", "labels"))
    assert len(decisions) == 4
    assert kept(decisions) == {
        "postgres://db1:5432|dump|5",
        "postgres://db1:5432|dump_globals|5",
        "dir:/data|dump|5",
        "dir:/data|dump_globals|5",
    }
    assert all(len(d.keep) == 1 and len(d.remove) == 4 for d in decisions)


def test_run_id_and_try_number_do_not_split_groups() -> None:
    assert {"run_id", "try_number"} <= VOLATILE_LABELS
    a = snap(utc(2026, 1, 1), labels={**LABELS, "run_id": "manual__1", "try_number": "1"})
    b = snap(utc(2026, 1, 2), labels={**LABELS, "run_id": "manual__2", "try_number": "3"})
    assert group_key(a, DEFAULT_GROUP_BY) == group_key(b, DEFAULT_GROUP_BY)
    d = only(apply_policy([a, b], Policy(keep_last=1)))
    assert [s.id for s, _ in d.keep] == [b.id]


def test_coarser_grouping() -> None:
    snaps = two_sources_two_tasks()
    by_source = apply_policy(snaps, Policy(keep_last=1), group_by=("source",))
    assert [d.group for d in by_source] == [(("source", "dir:/data"),), (("source", "postgres://db1:5432"),)]
    assert len(kept(apply_policy(snaps, Policy(keep_last=1), group_by=()))) == 1


def test_group_key_shapes() -> None:
    s = snap(utc(2026, 1, 1), labels={"dag_id": "d", "task_id": "t", "run_id": "r"}, tags=("b", "a"))
    assert group_key(s, ("source", "labels")) == (("source", SOURCE), ("labels", (("dag_id", "d"), ("task_id", "t"))))
    assert group_key(s, ("label:dag_id", "label:missing")) == (("label:dag_id", "d"), ("label:missing", ""))
    assert group_key(s, ("tags",)) == (("tags", ("a", "b")),)
    assert group_key(s, ()) == ()


def test_group_key_rejects_bare_string_and_bad_items() -> None:
    s = snap(utc(2026, 1, 1))
    with pytest.raises(TypeError):
        group_key(s, "source")
    with pytest.raises(ValueError, match="'host'"):
        group_key(s, ("host",))


# --- ordering and determinism ---------------------------------------------------------------


def test_ties_broken_by_id_regardless_of_input_order() -> None:
    t = utc(2026, 3, 3, 3)
    snaps = [snap(t, id="aa"), snap(t, id="cc"), snap(t, id="bb")]
    for seed in range(5):
        random.Random(seed).shuffle(snaps)
        d = only(apply_policy(snaps, Policy(keep_last=1)))
        assert [s.id for s, _ in d.keep] == ["cc"]
        assert [s.id for s in d.remove] == ["bb", "aa"]


def test_keep_and_remove_partition_the_group_newest_first() -> None:
    snaps = six_hourly()
    shuffled = snaps[:]
    random.Random(42).shuffle(shuffled)
    d = only(apply_policy(shuffled, Policy(keep_daily=7, keep_weekly=4)))
    keep_ids = [s.id for s, _ in d.keep]
    remove_ids = [s.id for s in d.remove]
    assert keep_ids == sorted(keep_ids, reverse=True)
    assert remove_ids == sorted(remove_ids, reverse=True)
    assert set(keep_ids) | set(remove_ids) == {s.id for s in snaps}
    assert not set(keep_ids) & set(remove_ids)


def test_no_snapshots_no_decisions() -> None:
    assert apply_policy([], Policy(keep_last=1)) == []


# --- validation -----------------------------------------------------------------------------


def test_empty_policy_is_refused() -> None:
    assert Policy().is_empty()
    with pytest.raises(ValueError) as exc:
        apply_policy(six_hourly(), Policy())
    assert str(exc.value) == EMPTY_POLICY_MESSAGE
    assert EMPTY_POLICY_MESSAGE == "refusing to forget every snapshot: give at least one keep rule"


@pytest.mark.parametrize(
    "policy",
    [Policy(keep_daily=-1), Policy(keep_within=timedelta(0)), Policy(keep_tags=("x",)), Policy(keep_yearly=1)],
)
def test_non_empty_policies(policy: Policy) -> None:
    assert not policy.is_empty()


@pytest.mark.parametrize(
    "attr", ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"]
)
def test_negative_count_other_than_unlimited_names_the_option(attr: str) -> None:
    with pytest.raises(ValueError, match=attr):
        Policy(**{attr: -2})
    with pytest.raises(ValueError, match=attr):
        Policy(**{attr: True})
    Policy(**{attr: -1})


def test_bad_within_tags_and_tz() -> None:
    with pytest.raises(ValueError, match="keep_within"):
        Policy(keep_within=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="keep_tags"):
        Policy(keep_tags="pinned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Mars/Olympus_Mons"):
        Policy(keep_last=1, tz="Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="tz"):
        Policy(keep_last=1, tz="")


def test_naive_time_and_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        apply_policy([snap(datetime(2026, 1, 1))], Policy(keep_last=1))
    with pytest.raises(ValueError, match="duplicate snapshot id"):
        apply_policy([snap(utc(2026, 1, 1), id="x"), snap(utc(2026, 1, 2), id="x")], Policy(keep_last=1))


# --- parse_group_by -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("source,labels", ("source", "labels")),
        ("source,label:dag_id,label:task_id", ("source", "label:dag_id", "label:task_id")),
        (" source , tags ", ("source", "tags")),
        ("", ()),
        ("   ", ()),
    ],
)
def test_parse_group_by(text: str, expected: tuple[str, ...]) -> None:
    assert parse_group_by(text) == expected


def test_parse_group_by_default_round_trip() -> None:
    assert parse_group_by(",".join(DEFAULT_GROUP_BY)) == DEFAULT_GROUP_BY


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("source,host", "'host'"),
        ("label:", "'label:'"),
        ("source,,labels", "''"),
        ("label:run_id", "'label:run_id'"),
        ("label:try_number", "'label:try_number'"),
        ("source,source", "'source'"),
        ("Source", "'Source'"),
    ],
)
def test_parse_group_by_errors_name_the_bad_item(text: str, bad: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_group_by(text)
    assert bad in str(exc.value)
