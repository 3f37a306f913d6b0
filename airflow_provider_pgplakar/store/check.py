"""Integrity checks. ``check`` verifies metadata end to end; ``read_data`` also reads and verifies every byte.

``read_data_subset`` reads only some packs, in restic's forms: ``n/m`` (packs whose ID's first byte modulo ``m`` is
``n-1``), ``x%`` (a random ``x`` percent of the packs, at least one), and ``/m`` (today's slice ``n = day % m + 1``,
the day counted from 1970-01-01 UTC), so a task run once a day reads every pack within ``m`` days.

The report names each broken object (key in the store) and the snapshots and records it affects. The check never
trusts the local cache: it builds a fresh index from ``index/`` in a temporary directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError, StoreError
from .index import IndexCache
from .keyfiles import load_checked
from .pack import decode_blob, pack_key, pack_object_name, parse_pack
from .reader import chunk_refs, iter_records
from .record import RecordKind

if TYPE_CHECKING:
    from .repo import Store

log = logging.getLogger(__name__)


@dataclass
class Problem:
    object: str
    message: str
    affects: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        tail = f" — affects {', '.join(self.affects[:10])}" if self.affects else ""
        more = f" (+{len(self.affects) - 10} more)" if len(self.affects) > 10 else ""
        return f"{self.object}: {self.message}{tail}{more}"


MAX_SUBSET_BUCKETS = 256  # one bucket per value of a pack ID's first byte, as in restic
_SUBSET_RE = re.compile(r"(?:([0-9]{1,3})?/([0-9]{1,3}))|(?:([0-9]{1,3}(?:\.[0-9]{1,6})?)%)")
SUBSET_HELP = "n/m (slice n of m, 1 <= n <= m <= 256), /m (today's slice of m) or x% (0 < x <= 100)"


@dataclass(frozen=True)
class Subset:
    """Which packs a partial ``read_data`` reads: slice ``n`` of ``m``, or ``percent`` of them at random."""

    text: str
    n: int = 0
    m: int = 0
    percent: float = 0.0

    def select(self, pack_ids: list[str]) -> list[str]:
        if self.m:
            return [p for p in pack_ids if int(p[:2], 16) % self.m == self.n - 1]
        want = min(len(pack_ids), max(1, math.ceil(len(pack_ids) * self.percent / 100))) if pack_ids else 0
        return sorted(random.SystemRandom().sample(pack_ids, want))


def parse_subset(text: str, now: float | None = None) -> Subset:
    """Parse ``n/m``, ``/m`` (slice ``day % m + 1``, UTC days since the epoch) or ``x%``; ValueError names the fix."""
    match = _SUBSET_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"read_data_subset: {text!r} is not a subset ({SUBSET_HELP})")
    n_text, m_text, pct = match.groups()
    if pct is not None:
        percent = float(pct)
        if not 0 < percent <= 100:
            raise ValueError(f"read_data_subset: {text!r}: the percentage must be > 0 and <= 100 ({SUBSET_HELP})")
        return Subset(text.strip(), percent=percent)
    m = int(m_text)
    if not 1 <= m <= MAX_SUBSET_BUCKETS:
        raise ValueError(f"read_data_subset: {text!r}: m must be 1..{MAX_SUBSET_BUCKETS} ({SUBSET_HELP})")
    if n_text is None:  # today's slice
        day = int((time.time() if now is None else now) // 86400)
        n = day % m + 1
        return Subset(f"{n}/{m}", n=n, m=m)
    n = int(n_text)
    if not 1 <= n <= m:
        raise ValueError(f"read_data_subset: {text!r}: n must be 1..m ({SUBSET_HELP})")
    return Subset(f"{n}/{m}", n=n, m=m)


class CheckFailed(StoreError):
    """``check`` found problems; the message names the broken objects and the snapshots they affect."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__(report.failure_text())
        self.report = report


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snapshots: int = 0
    records: int = 0
    packs: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    packs_read: int = 0
    read_data: bool = False
    subset: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [{"object": p.object, "message": p.message, "affects": p.affects} for p in self.problems],
            "notes": self.notes,
            "snapshots": self.snapshots, "records": self.records, "packs": self.packs,
            "blobs_read": self.blobs_read, "bytes_read": self.bytes_read, "packs_read": self.packs_read,
            "read_data": self.read_data, "subset": self.subset,
        }

    def affected_snapshots(self) -> list[str]:
        """Short IDs of the snapshots any problem affects (from ``affects`` entries ``snapshot <id> ...``)."""
        out: list[str] = []
        for p in self.problems:
            for a in p.affects:
                sid = a.split()[1] if a.startswith("snapshot ") and len(a.split()) > 1 else None
                if sid and sid not in out:
                    out.append(sid)
        return out

    def failure_text(self, limit: int = 10) -> str:
        """One paragraph for a failed task: the broken objects and the snapshots they affect."""
        shown = "; ".join(str(p) for p in self.problems[:limit])
        more = f"; (+{len(self.problems) - limit} more problems)" if len(self.problems) > limit else ""
        snaps = self.affected_snapshots()
        tail = f". Affected snapshots: {', '.join(snaps)}" if snaps else ""
        return f"check found {len(self.problems)} problem(s): {shown}{more}{tail}"


def check(store: Store, read_data: bool = False, progress: Callable[[str], None] | None = None,
          read_data_subset: str | Subset | None = None) -> CheckReport:
    """Check the store; ``read_data`` reads every pack, ``read_data_subset`` (see :func:`parse_subset`) some."""
    subset = parse_subset(read_data_subset) if isinstance(read_data_subset, str) else read_data_subset
    if subset is not None and read_data:
        raise ValueError("give read_data or read_data_subset, not both (read_data reads everything)")
    rep = CheckReport(read_data=read_data or subset is not None, subset=subset.text if subset else None)
    say = progress or (lambda msg: log.info("%s", msg))
    store.ensure_read_lease()  # prune must not delete or repack what we are about to read
    for obj in store.backend.list("keys/"):
        try:
            load_checked(store.backend.get(obj.key), obj.key)
        except IntegrityError as e:
            rep.problems.append(Problem(obj.key, str(e).split(": ", 1)[-1]))
    with tempfile.TemporaryDirectory(prefix="pgplakar-check-") as tmp:
        fresh = IndexCache(Path(tmp) / "index.sqlite", store.config.repo_id)
        own_cache, store.cache = store.cache, fresh
        try:
            say("loading index")
            fresh.sync(store.backend, store.keys)
            for seg_id, msg in fresh.bad_segments.items():
                rep.problems.append(Problem(f"index/{seg_id}", msg.split(": ", 1)[-1]))
            bad_packs = _check_packs(store, fresh, rep, read_data, say, subset)
            _check_snapshots(store, fresh, rep, bad_packs, say)
        finally:
            store.cache = own_cache
            fresh.close()
    return rep


def _check_packs(store: Store, cache: IndexCache, rep: CheckReport, read_data: bool,
                 say: Callable[[str], None], subset: Subset | None = None) -> dict[str, str]:
    """Return {pack_id or blob_id hex: problem} for packs missing/short, and blobs unreadable (read_data)."""
    listed = {o.key.rsplit("/", 1)[-1]: o.size for o in store.backend.list("packs/")}
    bad: dict[str, str] = {}
    indexed = cache.packs()
    rep.packs = len(listed)
    for pack_id, size, _kind, segment in indexed:
        name = pack_object_name(pack_id)
        if pack_id not in listed:
            bad[pack_id] = "missing"
            rep.problems.append(Problem(name, f"missing (listed by index/{segment[:16]})"))
        elif listed[pack_id] != size:
            bad[pack_id] = "wrong size"
            rep.problems.append(Problem(name, f"size {listed[pack_id]} differs from indexed {size}"))
    orphans = set(listed) - {p[0] for p in indexed}
    if orphans and cache.bad_segments:
        rep.notes.append(f"{len(orphans)} pack(s) not in the readable index: they may hold data of the corrupt "
                         "segment(s); run `repair index` (prune refuses to run until then)")
    elif orphans:
        rep.notes.append(f"{len(orphans)} pack(s) not in the index (left by interrupted backups; prune removes them)")
    if not read_data and subset is None:
        return bad
    chosen = sorted(listed) if subset is None else subset.select(sorted(listed))
    if subset is not None:
        say(f"reading subset {subset.text}: {len(chosen)} of {len(listed)} packs")
    for i, pack_id in enumerate(chosen, 1):
        if pack_id in bad:
            continue
        name = pack_object_name(pack_id)
        if i % 50 == 0:
            say(f"read {i}/{len(chosen)} packs")
        data = store.backend.get(name)
        rep.packs_read += 1
        rep.bytes_read += len(data)
        if hashlib.sha256(data).hexdigest() != pack_id:
            rep.problems.append(Problem(name, "content does not match its name (SHA-256)"))
        try:
            salt, entries = parse_pack(store.keys, data, name)
        except IntegrityError as e:
            rep.problems.append(Problem(name, str(e).split(": ", 1)[-1]))
            entries, salt = [], None
        indexed_rows = cache.pack_entries(pack_id)
        if salt is not None and entries and pack_id not in orphans:
            header_set = {(e.blob_id, e.offset, e.length) for e in entries}
            if {(r[0], r[1], r[2]) for r in indexed_rows} - header_set:
                rep.problems.append(Problem(name, "index entries disagree with the pack header"))
        okey_salt = salt if salt is not None else _indexed_salt(cache, pack_id)
        if okey_salt is None:
            continue
        okey = pack_key(store.keys, okey_salt)
        view = memoryview(data)
        for blob_id, off, length, raw, btype in indexed_rows:
            rep.blobs_read += 1
            try:
                decode_blob(okey, btype, blob_id, view[off : off + length], raw, store.keys, name)
            except IntegrityError as e:
                bad[blob_id.hex()] = str(e)
                rep.problems.append(Problem(name, f"blob {blob_id.hex()[:16]} is corrupt ({str(e).split(': ')[-1]})"))
    return bad


def _indexed_salt(cache: IndexCache, pack_id: str) -> bytes | None:
    row = cache.db.execute("SELECT salt FROM packs WHERE id=?", (pack_id,)).fetchone()
    return row[0] if row else None


def _check_snapshots(store: Store, cache: IndexCache, rep: CheckReport, bad: dict[str, str],
                     say: Callable[[str], None]) -> None:
    by_object: dict[str, Problem] = {}

    def hit(obj: str, message: str, affected: str) -> None:
        p = by_object.get(obj)
        if p is None:
            p = by_object[obj] = Problem(obj, message)
            rep.problems.append(p)
        p.affects.append(affected)

    for sid in store.snapshot_ids():
        short = sid[:8]
        try:
            snap = store.load_snapshot(sid, use_cache=False)
        except StoreError as e:
            rep.problems.append(Problem(f"snapshots/{sid}", str(e).split(": ", 1)[-1]))
            continue
        rep.snapshots += 1
        say(f"checking snapshot {short}")
        try:
            for rec in iter_records(store, snap):
                rep.records += 1
                if rec.kind != RecordKind.FILE:
                    continue
                where = f"snapshot {short} record {rec.path!r}"
                try:
                    for blob_id, _raw in chunk_refs(store, rec):
                        loc = cache.lookup(blob_id)
                        if loc is None:
                            hit(f"blob {blob_id.hex()[:16]}", "referenced but not in the index", where)
                            break
                        reason = bad.get(loc.pack_id) or bad.get(blob_id.hex())
                        if reason:
                            hit(pack_object_name(loc.pack_id), reason if len(reason) < 40 else "corrupt data", where)
                            break
                except IntegrityError as e:
                    hit(f"chunk list of {rec.path!r}", str(e), where)
        except IntegrityError as e:
            hit(f"manifest of snapshot {short}", str(e), f"snapshot {short} (all records)")
