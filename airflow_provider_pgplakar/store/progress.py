"""Progress of long operations, throttled: one line per interval, never one per chunk.

Every long phase (a record's stream, a base backup, a restore, a read-data check) counts its bytes in a
:class:`Progress`; at most every :data:`EVERY_S` seconds that becomes a line with bytes done, rate, and the share
done and ETA when the total is known (``~`` marks an estimate, such as a database's size for its dump). Waits
whose end we cannot measure (a spread checkpoint, a lock, the manifest queries) use :func:`heartbeat`, which says
what is being waited for at the same rate; progress counted in other units (the manifest's databases) uses
:class:`Ticker`. One interval for all of them: :func:`interval`, ``PGPLAKAR_PROGRESS_EVERY`` seconds (default 30).

Lines go to the module logger (the Airflow task log); the CLI installs a different sink with :func:`set_sink`: a
redrawn bar on a terminal, JSON lines with ``--json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .sizes import human_bytes

log = logging.getLogger("airflow_provider_pgplakar.progress")


def _every() -> float:
    try:
        value = float(os.environ.get("PGPLAKAR_PROGRESS_EVERY", "30"))
    except ValueError:
        value = 30.0
    return min(max(value, 0.1), 3600.0)


EVERY_S = _every()


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: ``total`` is None when unknown; ``estimate`` marks a guessed total."""

    what: str
    done: int
    total: int | None
    estimate: bool
    elapsed: float
    final: bool = False
    waiting: str | None = None

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def text(self) -> str:
        if self.waiting is not None:
            return f"{self.what}: {self.waiting} ({_clock(self.elapsed)} so far)"
        parts = [f"{self.what}: {human_bytes(self.done)}"]
        if self.total:
            mark = "~" if self.estimate else ""
            parts[0] += f" of {mark}{human_bytes(self.total)} ({min(100 * self.done / self.total, 100):.0f}%)"
        parts.append(f"{human_bytes(self.rate)}/s")
        if self.final:
            parts.append(f"done in {_clock(self.elapsed)}")
        elif self.eta is not None:
            parts.append(f"ETA {_clock(self.eta)}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {"what": self.what, "done": self.done, "total": self.total, "estimate": self.estimate,
                "elapsed_s": round(self.elapsed, 3), "rate": round(self.rate), "eta_s":
                None if self.eta is None else round(self.eta, 1), "final": self.final, "waiting": self.waiting}


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _log_sink(event: ProgressEvent) -> None:
    log.info("%s", event.text())


_sink: Callable[[ProgressEvent], None] = _log_sink
_sink_every: float | None = None


def set_sink(sink: Callable[[ProgressEvent], None] | None, every: float | None = None) -> None:
    """Route progress to ``sink`` (None: back to the log), optionally at another interval (a terminal bar)."""
    global _sink, _sink_every
    _sink = sink or _log_sink
    _sink_every = every


def interval() -> float:
    """Seconds between two progress lines: the sink's own (a terminal bar), else :data:`EVERY_S`."""
    return _sink_every or EVERY_S


@dataclass
class Progress:
    """Bytes done in one named operation; thread-safe, reports at most every interval (and never for short work)."""

    what: str
    total: int | None = None
    estimate: bool = False
    done: int = 0
    _t0: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reported: bool = False

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < interval():
                return
            self._last = now
            self._reported = True
            event = ProgressEvent(self.what, self.done, self.total, self.estimate, now - self._t0)
        _sink(event)

    def finish(self) -> None:
        """A closing line, only when progress was reported before (short work stays quiet)."""
        if self._reported:
            _sink(ProgressEvent(self.what, self.done, self.total, self.estimate, time.monotonic() - self._t0,
                                final=True))


@dataclass
class Ticker:
    """Progress in other units than bytes: :meth:`tick` with a status (``3 of 40 database(s) detailed``) reports
    it at most once per :func:`interval`."""

    what: str
    _t0: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    def tick(self, status: str) -> None:
        now = time.monotonic()
        if now - self._last < interval():
            return
        self._last = now
        _sink(ProgressEvent(self.what, 0, None, False, now - self._t0, waiting=status))


@contextlib.contextmanager
def heartbeat(what: str, waiting: str, every: float | None = None) -> Iterator[None]:
    """While the block runs, say every interval that ``what`` is ``waiting`` (e.g. for a spread checkpoint)."""
    stop = threading.Event()
    t0 = time.monotonic()
    seconds = every or interval()

    def beat() -> None:
        while not stop.wait(seconds):
            _sink(ProgressEvent(what, 0, None, False, time.monotonic() - t0, waiting=waiting))

    thread = threading.Thread(target=beat, name="pgplakar-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
