"""The throttled progress lines: text, estimate mark, ETA, closing line, heartbeat."""

from __future__ import annotations

import time

import pytest

from airflow_provider_pgplakar.store import progress
from airflow_provider_pgplakar.store.progress import Progress, ProgressEvent, heartbeat


@pytest.fixture
def events():
    seen: list[ProgressEvent] = []
    progress.set_sink(seen.append, every=0.05)
    yield seen
    progress.set_sink(None)


def test_lines_are_throttled_and_say_share_rate_and_eta(events: list[ProgressEvent]) -> None:
    p = Progress("dump of sales", total=4 * 2**20, estimate=True)
    for _ in range(4):
        p.add(2**20 // 2)  # many adds within one interval: at most one line
    assert events == []
    time.sleep(0.06)
    p.add(2**20)
    (tick,) = events
    assert tick.done == 3 * 2**20 and tick.eta is not None and tick.eta > 0
    text = tick.text()
    assert text.startswith("dump of sales: 3.0 MiB of ~4.0 MiB (75%), ") and "/s, ETA 0:00:" in text
    p.finish()
    assert events[-1].final and "done in 0:00:0" in events[-1].text() and "ETA" not in events[-1].text()


def test_short_work_stays_quiet_and_unknown_totals_have_no_eta(events: list[ProgressEvent]) -> None:
    quiet = Progress("small")
    quiet.add(10)
    quiet.finish()
    assert events == []
    p = Progress("stream")
    time.sleep(0.06)
    p.add(5000)
    assert events[0].text().startswith("stream: 4.9 KiB, ") and "ETA" not in events[0].text()


def test_heartbeat_says_what_it_waits_for(events: list[ProgressEvent]) -> None:
    with heartbeat("base backup", "waiting for the server's checkpoint"):
        time.sleep(0.18)
    assert len(events) >= 2
    assert events[0].text().startswith("base backup: waiting for the server's checkpoint (0:00:00 so far)")
    count = len(events)
    time.sleep(0.1)
    assert len(events) == count  # stopped with the block


def test_ticker_reports_counts_at_the_same_interval(events: list[ProgressEvent]) -> None:
    ticker = progress.Ticker("manifest")
    ticker.tick("1 of 3 database(s) detailed (a)")
    assert events == []  # within the first interval
    time.sleep(0.06)
    ticker.tick("2 of 3 database(s) detailed (b)")
    ticker.tick("3 of 3 database(s) detailed (c)")  # within the next interval: throttled
    (event,) = events
    assert event.text().startswith("manifest: 2 of 3 database(s) detailed (b) (0:00:00 so far)")
