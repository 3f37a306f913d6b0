"""Running a backup's per-database dumps ``jobs`` at a time: largest first, results in listing order, and the first
failure stops every other dump; and the backup's other reads (manifest, globals) beside them (:class:`Beside`).

Used by :mod:`.logical` for the ``jobs`` source option. Each dump runs on its own thread (the tools and the store's
C extensions release the GIL); its result is handed back on the calling thread in the databases' listing order, so
the snapshot's records, their names and their order are those of ``jobs=1`` whatever order the dumps end in.

A :class:`Stopper` holds what the running dumps started (tools, connections): when one dump fails, the others'
process groups are killed and their queries cancelled, dumps not yet started never start, and the first error is
raised once every thread has ended (the caller's snapshot writer then commits nothing).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

from . import PgError
from .process import also_checking

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Stopped(PgError):
    """A dump did not start, or was cut short, because another dump of the same backup failed."""


class Finished(PgError):
    """Not a failure: the backup has nothing left to do (a retry reuses an earlier try's snapshot). It stops the
    other work like a failure does, without an error line: the task succeeds."""


class Stopper:
    """The tools and connections of one backup's running dumps, so that one failure can stop all the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._tools: set[Any] = set()
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def check(self) -> None:
        if self._stopped:
            raise Stopped("stopped: another dump of this backup failed")

    @contextmanager
    def tool(self, tool: Any) -> Iterator[Any]:
        """Track a started :class:`.process.Tool` while the block runs (killed at once if already stopped)."""
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._tools.add(tool)
        if stopped:
            tool.kill()
            self.check()
        try:
            yield tool
        finally:
            with self._lock:
                self._tools.discard(tool)

    def connection(self, conn: Any) -> Any:
        """Track a psycopg connection (its running query is cancelled on stop); returns ``conn``."""
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._conns.add(conn)
        if stopped:
            conn.close()
            self.check()
        return conn

    def stop(self, why: BaseException | None = None) -> None:
        """Kill every tracked tool's process group and cancel every tracked query; later starts are refused.
        ``why`` a :class:`Finished`: said at info level, as what it is (not "another dump failed")."""
        with self._lock:
            first, self._stopped = not self._stopped, True
            tools, conns = list(self._tools), list(self._conns)
        for c in conns:
            if not c.closed:
                try:
                    c.cancel_safe(timeout=5)
                except Exception as e:  # noqa: BLE001 - best effort: the dump's own error ends it anyway
                    log.warning("could not cancel a running query: %s", e)
        for t in tools:
            if not first:  # said when the backup was stopped; a later stop only makes sure
                pass
            elif isinstance(why, Finished):
                log.info("stopping %s (pid %d): %s", t.name, t.proc.pid, why)
            elif why is not None:  # what failed: a dump, the manifest, the store's unlock (a wrong passphrase)
                log.warning("stopping %s (pid %d): this backup failed: %s", t.name, t.proc.pid, why)
            else:
                log.warning("stopping %s (pid %d): another dump of this backup failed", t.name, t.proc.pid)
            t.kill()


def run_ordered(items: Sequence[T], work: Callable[[T], R], deliver: Callable[[int, R], None], *, jobs: int,
                size: Callable[[T], int], stopper: Stopper, name: Callable[[T], str] = str) -> None:
    """``work(item)`` for every item, ``jobs`` at a time, starting with the largest ``size``; ``deliver(i, result)``
    on this thread in item order, each as soon as it and every item before it are done.

    Memory: at most ``len(items)`` results wait for delivery (a dump's result is its record's chunk references and
    fingerprints, not its data). On the first failure ``stopper.stop()`` ends the rest and that error is raised.
    """
    if jobs <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            deliver(i, work(item))
        return
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))  # stable: ties keep the listing order

    def guarded(item: T) -> R:  # a thread freed by the failure may take the next item before it is cancelled
        stopper.check()
        return work(item)

    done: dict[int, R] = {}
    first_error: BaseException | None = None
    with ThreadPoolExecutor(min(jobs, len(items)), thread_name_prefix="pgplakar-dump") as pool:
        futures: dict[Future[R], int] = {pool.submit(guarded, items[i]): i for i in order}
        pending = set(futures)
        next_i = 0
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    if f.cancelled():
                        continue
                    err = f.exception()
                    if err is None:
                        done[futures[f]] = f.result()
                    elif first_error is None:
                        first_error = err
                        # an error after a stop is its consequence: whoever stopped the backup said why
                        if not (stopper.stopped or isinstance(err, Finished)):
                            log.error("%s failed, stopping the other dumps: %s", name(items[futures[f]]), err)
                        stopper.stop(err)
                        for other in pending:
                            other.cancel()
                if first_error is None:
                    while next_i in done:
                        deliver(next_i, done.pop(next_i))
                        next_i += 1
        except BaseException as e:  # deliver() failed, or we were interrupted: stop the dumps still running
            if first_error is None:
                first_error = e
            stopper.stop(e)
            for other in pending:
                other.cancel()
    if first_error is not None:
        raise first_error


class Beside:
    """``work()`` on its own thread while the ``with`` block runs (a backup's manifest and globals beside its dumps).

    A failure on either side stops the other through ``stopper`` (tools killed, queries cancelled), and the error
    raised when the block ends is the one that came first: the other side's is only its consequence. The thread has
    ended when the block is left. :meth:`result` waits for ``work`` and returns its value (or raises its error).
    """

    def __init__(self, work: Callable[[], R], stopper: Stopper, *, name: str) -> None:
        self._work = work
        self._stopper = stopper
        self._value: Any = None
        self._error: BaseException | None = None
        self._first = False  # work failed before anything stopped the backup
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            with also_checking(self._stopper.check):  # every phase's check_cancelled() also sees a stop
                self._value = self._work()
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
            self._first = not self._stopper.stopped
            self._error = e
            if self._first and not isinstance(e, Finished):
                log.error("%s failed, stopping the dumps: %s", self._thread.name, e)
            self._stopper.stop(e)

    def __enter__(self) -> Beside:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self._stopper.stop(exc)  # the block failed: end the work too
        self._thread.join()
        if exc is not None:
            if self._first and self._error is not None and self._error is not exc:
                raise self._error from exc
            return
        self.result()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
