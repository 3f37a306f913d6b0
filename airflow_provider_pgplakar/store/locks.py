"""Leases: backups share the store, prune has it alone.

- A backup writes ``locks/<id>`` (kind ``backup``), then lists ``locks/``; if a live ``prune`` lease exists it
  withdraws and waits. A prune does the same and withdraws if any other live lease exists. With read-after-write
  list consistency (local fs, AWS S3) two conflicting parties cannot both proceed: whichever wrote second is
  guaranteed to see the first. Both may withdraw; they retry with jitter.
- A lease is live until its storage mtime is ``STALE_AFTER`` old, or (same host) its process is gone — so a
  ``kill -9``'d writer does not block prune for half an hour on the machine it ran on.
- Holders refresh every ``REFRESH_EVERY``. A writer whose last successful refresh is older than ``ABORT_AFTER``
  MUST NOT commit (a prune may already consider it stale) — restic's rule.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .crypto import Keys
from .errors import IntegrityError, LeaseExpired, ObjectNotFound, StoreLocked
from .objects import open_object, seal_object

log = logging.getLogger(__name__)

REFRESH_EVERY = 300.0
STALE_AFTER = 1800.0
ABORT_AFTER = 1200.0


@dataclass(frozen=True)
class LeaseInfo:
    id: str
    kind: str
    host: str
    pid: int
    start: float
    mtime: float

    def describe(self) -> str:
        return f"{self.kind} lease {self.id} (host {self.host}, pid {self.pid})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(lease: LeaseInfo, now: float) -> bool:
    if now - lease.mtime > STALE_AFTER:
        return True
    return lease.host == socket.gethostname() and not _pid_alive(lease.pid)


def list_leases(backend: Backend, keys: Keys) -> list[LeaseInfo]:
    out = []
    for obj in backend.list("locks/"):
        try:
            body: dict[str, Any] = open_object(keys, b"LEAS", backend.get(obj.key), obj.key)
        except (IntegrityError, ObjectNotFound):
            continue  # a lease being replaced or removed, or foreign junk; age rules cover the rest
        lease_id = obj.key.rsplit("/", 1)[-1]
        out.append(LeaseInfo(lease_id, body["kind"], body["host"], body["pid"], body["start"], obj.mtime))
    return out


class Lease:
    """A held lease with a refresh thread. Use :func:`acquire`."""

    def __init__(self, backend: Backend, keys: Keys, kind: str) -> None:
        self.backend, self.keys, self.kind = backend, keys, kind
        self.id = secrets.token_hex(16)
        self.key = f"locks/{self.id}"
        self.start = time.time()
        self.last_refresh = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        body = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "start": self.start}
        self.backend.put(self.key, seal_object(self.keys, b"LEAS", body), create_only=False)
        self.last_refresh = time.monotonic()

    def _refresher(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self._write()
            except Exception as e:  # keep trying; check_fresh() decides whether committing is still safe
                log.warning("could not refresh %s lease %s: %s", self.kind, self.id, e)

    def check_fresh(self) -> None:
        age = time.monotonic() - self.last_refresh
        if age > ABORT_AFTER:
            raise LeaseExpired(
                f"{self.kind} lease {self.id} was last refreshed {age:.0f}s ago (limit {ABORT_AFTER:.0f}s): "
                "not committing, since a prune may have treated this writer as dead; retry the backup"
            )

    def release(self) -> None:
        self._stop.set()
        try:
            self.backend.delete(self.key)
        except Exception as e:
            log.warning("could not remove lease %s (it will go stale): %s", self.key, e)


def _conflicts(mine: Lease, leases: list[LeaseInfo], now: float) -> list[LeaseInfo]:
    others = [le for le in leases if le.id != mine.id and not is_stale(le, now)]
    if mine.kind == "prune":
        return others
    return [le for le in others if le.kind == "prune"]


def acquire(backend: Backend, keys: Keys, kind: str, wait: float = 0.0, poll: float = 2.0) -> Lease:
    """Take a ``backup`` (shared) or ``prune`` (exclusive) lease, waiting up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        lease = Lease(backend, keys, kind)
        lease._write()
        conflicts = _conflicts(lease, list_leases(backend, keys), backend.now())
        if not conflicts:
            lease._thread = threading.Thread(target=lease._refresher, name=f"lease-{lease.id[:8]}", daemon=True)
            lease._thread.start()
            return lease
        backend.delete(lease.key)
        if time.monotonic() >= deadline:
            held = "; ".join(c.describe() for c in conflicts)
            raise StoreLocked(f"store {backend.location} is busy ({held}): retry later, or wait for it to finish")
        log.info("store busy (%s); waiting", conflicts[0].describe())
        time.sleep(poll * (0.5 + random.random()))
