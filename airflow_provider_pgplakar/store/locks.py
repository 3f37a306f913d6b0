"""Leases: who is using the store. Backups never wait; readers and prune exclude each other.

- Every party writes ``locks/<id>``, then lists ``locks/``. A backup (kind ``backup``) proceeds whatever it sees:
  a running prune announces what it will delete in an intent (store/intents.py) and the backup avoids, re-checks
  and if need be rolls back around it; the backup's lease tells prune which unindexed packs are still being written.
  A reader (kind ``read``: restores, ``cat``, ``check``, verification) withdraws and waits while a live ``prune``
  lease exists; a prune withdraws while another prune or a reader is live. With read-after-write list consistency
  (local fs, AWS S3) two conflicting parties cannot both proceed: whichever wrote second is guaranteed to see the
  first. Both may withdraw; they retry with jitter.
- A lease is live until its storage mtime is ``STALE_AFTER`` old. It is judged dead earlier only when it was written
  on this host, in this boot, in this pid namespace (all three recorded in the lease) and no process with its pid
  *and* start time exists: two containers with one host name (host networking, cloned hostnames) share neither a
  pid namespace nor, usually, a boot, so they never misjudge each other's live lease as dead.
- Holders refresh every ``REFRESH_EVERY``. A holder MUST NOT commit (backup) or delete (prune) when its lease is older
  than ``ABORT_AFTER``, judged both by the process's monotonic clock and by the lease object's age on the storage
  clock (which keeps running while a VM is suspended): a prune may already consider it stale — restic's rule. A
  lease found that old, or removed, by its own refresher is lost for good; refreshing it again would hide the gap.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import secrets
import socket
import sys
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
WAIT_LOG_EVERY = 30.0
LEASE_VERSION = 2
KINDS = ("backup", "read", "prune")
SHARED_KINDS = ("backup", "read")  # conflict only with prune
_MAX_TEXT = 256  # bound on host / boot id / namespace strings read from storage


@dataclass(frozen=True)
class Identity:
    """Who holds a lease: enough to tell, on the same machine, whether that process still runs."""

    host: str
    boot: str | None  # /proc/sys/kernel/random/boot_id
    pidns: str | None  # "<st_dev>:<st_ino>" of /proc/self/ns/pid
    pid: int  # as seen in that pid namespace
    pstart: int | None  # field 22 of /proc/<pid>/stat: clock ticks after boot (tells a reused pid apart)


@dataclass(frozen=True)
class LeaseInfo:
    id: str
    kind: str
    host: str
    pid: int
    start: float
    mtime: float
    v: int = 1
    boot: str | None = None
    pidns: str | None = None
    pstart: int | None = None

    def describe(self) -> str:
        return f"{self.kind} lease {self.id} (host {self.host}, pid {self.pid})"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command name, which may hold spaces)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(fields: list[str] | None) -> int | None:
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22; fields[0] is field 3
    except ValueError:
        return None


def _proc_is_ours() -> bool:
    """/proc shows our own pid namespace (not a parent's /proc seen from an ``unshare --pid`` child)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def own_identity() -> Identity:
    pstart = _start_ticks(_stat_fields("self"))
    # without a /proc of our namespace nobody (not even we) can check our pid later: record no start time, so the
    # lease is judged by age only
    return Identity(socket.gethostname(), _boot_id(), _pid_namespace(), os.getpid(),
                    pstart if _proc_is_ours() else None)


def _process_gone(pid: int, pstart: int) -> bool:
    """True only when certain: no such pid here, a zombie, or a pid reused by a process started at another time."""
    if not _proc_is_ours():
        return False
    fields = _stat_fields(pid)
    if fields is None:
        return not os.path.exists(f"/proc/{pid}")
    if fields[0] in ("Z", "X"):
        return True  # a zombie runs no code: it will never refresh its lease
    start = _start_ticks(fields)
    return start is not None and start != pstart


def dead_here(lease: LeaseInfo, me: Identity | None = None) -> bool:
    """The lease was written by a process of this host, boot and pid namespace that no longer runs.

    Version 1 leases (host + pid only) are never judged dead this way: a pid absent here may live in another pid
    namespace under the same host name.
    """
    if lease.v < 2 or not lease.boot or not lease.pidns or lease.pstart is None:
        return False
    me = me or own_identity()
    if (lease.host, lease.boot, lease.pidns) != (me.host, me.boot, me.pidns) or me.pstart is None:
        return False
    return _process_gone(lease.pid, lease.pstart)


def is_stale(lease: LeaseInfo, now: float, me: Identity | None = None) -> bool:
    if now - lease.mtime > STALE_AFTER:
        return True
    return dead_here(lease, me)


def _opt_text(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    return v if isinstance(v, str) and 0 < len(v) <= _MAX_TEXT else None


def _parse(lease_id: str, body: Any, mtime: float) -> LeaseInfo:
    """A lease from its (authenticated) body; odd fields make it an ``unknown`` lease, which prune still respects."""
    if not isinstance(body, dict):
        body = {}
    kind = body.get("kind") if body.get("kind") in KINDS else "unknown"
    host = body.get("host") if isinstance(body.get("host"), str) else "?"
    pid = body.get("pid") if isinstance(body.get("pid"), int) else -1
    start = body.get("start") if isinstance(body.get("start"), (int, float)) else 0.0
    v = body.get("v") if isinstance(body.get("v"), int) else 1
    pstart = body.get("pstart") if isinstance(body.get("pstart"), int) else None
    return LeaseInfo(lease_id, kind, host[:_MAX_TEXT], pid, float(start), mtime, v,
                     _opt_text(body, "boot"), _opt_text(body, "pidns"), pstart)


def list_leases(backend: Backend, keys: Keys) -> list[LeaseInfo]:
    out = []
    for obj in backend.list("locks/"):
        try:
            body = open_object(keys, b"LEAS", backend.get(obj.key), obj.key)
        except (IntegrityError, ObjectNotFound):
            continue  # a lease being replaced or removed, or foreign junk; age rules cover the rest
        out.append(_parse(obj.key.rsplit("/", 1)[-1], body, obj.mtime))
    return out


class Lease:
    """A held lease with a refresh thread. Use :func:`acquire`."""

    def __init__(self, backend: Backend, keys: Keys, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"lease kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.backend, self.keys, self.kind = backend, keys, kind
        self.id = secrets.token_hex(16)
        self.key = f"locks/{self.id}"
        self.start = time.time()
        self.me = own_identity()
        self.last_refresh = 0.0
        self.lost: str | None = None  # why this lease can no longer be trusted (set by the refresher)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        me = self.me
        body = {"v": LEASE_VERSION, "kind": self.kind, "host": me.host, "boot": me.boot, "pidns": me.pidns,
                "pid": me.pid, "pstart": me.pstart, "start": self.start}
        self.backend.put(self.key, seal_object(self.keys, b"LEAS", body), create_only=False)
        self.last_refresh = time.monotonic()

    def _storage_problem(self) -> str | None:
        """Why the lease object no longer protects us, judged on the storage clock; None when it does."""
        info = self.backend.stat(self.key)
        if info is None:
            return "was removed from the store (a prune judged it stale)"
        age = self.backend.now() - info.mtime
        if age > ABORT_AFTER:
            return f"is {age:.0f}s old on the storage clock (limit {ABORT_AFTER:.0f}s)"
        return None

    def refresh(self) -> None:
        """Rewrite the lease, unless it was already stale-able: then it is lost (see the module docstring)."""
        if self.lost:
            return
        problem = self._storage_problem()
        if problem:
            self.lost = problem
            log.error("%s lease %s %s: it is no longer held", self.kind, self.id, problem)
            return
        self._write()

    def _refresher(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self.refresh()
            except Exception as e:  # keep trying; check_fresh() decides whether committing is still safe
                log.warning("could not refresh %s lease %s: %s", self.kind, self.id, e)
            if self.lost:
                return

    def check_fresh(self, action: str = "not committing") -> None:
        """Raise :class:`LeaseExpired` unless the lease is fresh by both clocks (one ``stat`` of the lease)."""
        age = time.monotonic() - self.last_refresh
        problem = self.lost
        if problem is None and age > ABORT_AFTER:
            problem = f"was last refreshed {age:.0f}s ago (limit {ABORT_AFTER:.0f}s)"
        if problem is None:
            problem = self._storage_problem()
        if problem:
            self.lost = problem
            raise LeaseExpired(
                f"{self.kind} lease {self.id} {problem}: {action}, since a prune (or a backup) may have treated "
                "this process as dead; retry"
            )

    def release(self) -> None:
        self._stop.set()
        try:
            self.backend.delete(self.key)
        except Exception as e:
            log.warning("could not remove lease %s (it will go stale): %s", self.key, e)


def _conflicts(mine: Lease, leases: list[LeaseInfo], now: float) -> list[LeaseInfo]:
    """Backups conflict with nobody (prune announces its deletions in intents instead: store/intents.py);
    readers and prunes exclude each other, and one prune runs at a time. A lease of unknown kind counts as a
    conflict for a prune."""
    others = [le for le in leases if le.id != mine.id and not is_stale(le, now, mine.me)]
    if mine.kind == "prune":
        return [le for le in others if le.kind != "backup"]
    if mine.kind == "read":
        return [le for le in others if le.kind == "prune"]
    return []


def acquire(backend: Backend, keys: Keys, kind: str, wait: float = 0.0, poll: float = 2.0) -> Lease:
    """Take a ``backup`` or ``read`` (shared) or ``prune`` (exclusive) lease, waiting up to ``wait`` seconds."""
    t0 = time.monotonic()
    deadline = t0 + wait
    next_log = t0
    while True:
        lease = Lease(backend, keys, kind)
        lease._write()
        conflicts = _conflicts(lease, list_leases(backend, keys), backend.now())
        if not conflicts:
            lease._thread = threading.Thread(target=lease._refresher, name=f"lease-{lease.id[:8]}", daemon=True)
            lease._thread.start()
            return lease
        backend.delete(lease.key)
        now = time.monotonic()
        if now >= deadline:
            held = "; ".join(c.describe() for c in conflicts)
            raise StoreLocked(f"store {backend.location} is busy ({held}): retry later, or wait for it to finish")
        if now >= next_log:
            waited = f" (waited {now - t0:.0f}s of {wait:.0f}s)" if now > t0 else ""
            log.info("store busy (%s); waiting%s", conflicts[0].describe(), waited)
            next_log = now + WAIT_LOG_EVERY
        time.sleep(min(poll * (0.5 + random.random()), max(0.0, deadline - now) + 0.01))


def _write_refused(e: BaseException) -> bool:
    """The store refuses our writes (read-only credentials or mount), as opposed to any other failure."""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return True
    s3 = sys.modules.get(__package__ + ".s3")  # loaded whenever the backend is S3; not imported for local stores
    return s3 is not None and isinstance(e, s3.S3AccessError)


class StoreLeases:
    """The leases one opened store holds. Reads need a ``read`` lease, taken on the first read and kept until the
    store is closed (a restore reads packs for hours; prune must neither delete nor repack them meanwhile). A
    ``backup`` or ``prune`` lease this store holds protects its reads as well, so none is taken then.

    With read-only access (a restore host's credentials, a read-only mount) no lease can be written: reads go on
    without one, with a warning. A prune running meanwhile can then make a read fail; it never returns wrong bytes."""

    def __init__(self, backend: Backend, keys: Keys, wait: float) -> None:
        self.backend, self.keys, self.wait = backend, keys, wait
        self.read: Lease | None = None
        self.unprotected: str | None = None  # why reads run without a lease (write access refused)
        self._held: list[Lease] = []
        self._lock = threading.Lock()

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._held.append(lease)

    def drop(self, lease: Lease) -> None:
        with self._lock:
            if lease in self._held:
                self._held.remove(lease)

    def ensure_read(self) -> bool:
        """Make sure reads are protected; True when a read lease was just taken (the caller re-syncs its index:
        a prune may have run since it last did)."""
        with self._lock:
            if self._held or self.unprotected:
                return False
            if self.read is not None:
                if self.read.lost:
                    raise LeaseExpired(f"read lease {self.read.id} {self.read.lost}: a prune may have changed the "
                                       "packs being read; retry")
                return False
            try:
                self.read = acquire(self.backend, self.keys, "read", wait=self.wait)
            except Exception as e:
                if not _write_refused(e):
                    raise
                self.unprotected = str(e)
                log.warning("cannot write a read lease to %s (%s): reading without one; a prune running meanwhile "
                            "can make this read fail (it never returns wrong bytes)", self.backend.location, e)
                return False
            return True

    def release_read(self) -> None:
        with self._lock:
            lease, self.read = self.read, None
        if lease is not None:
            lease.release()
