"""Index segments and the local SQLite cache of them.

``index/<sha256>`` segments (sealed msgpack) list packs and the blobs inside them. The cache mirrors them so that
dedup lookups and reads are local. It is never authoritative (invariant): missing, corrupt, from another store or
stale (a segment it applied has been removed by prune) means it is rebuilt from ``index/``.

A segment names the segments it replaces in ``supersedes`` (prune and ``repair index`` write it, cumulatively: every
segment ever superseded, so an old segment re-uploaded after any number of prunes is still recognised). Superseded
segments are never applied: a replayed pre-prune segment would make backups dedup against deleted packs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import Backend
from .crypto import Keys
from .errors import IntegrityError, ObjectNotFound, StoreError
from .objects import open_object, seal_object

log = logging.getLogger(__name__)

SEGMENT_MAX_ENTRIES = 100_000
SCHEMA_VERSION = "2"  # 2: the superseded table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS packs(no INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, size INT, kind TEXT, salt BLOB,
                                 segment TEXT);
CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, pack INT NOT NULL, off INT, len INT, raw INT, type INT,
                                 PRIMARY KEY(id, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS segments(id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS superseded(id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS snapshots(id TEXT PRIMARY KEY, header BLOB);
"""


@dataclass(frozen=True)
class Location:
    pack_id: str
    salt: bytes
    offset: int
    length: int
    raw_len: int
    blob_type: int


def default_cache_dir() -> Path:
    env = os.environ.get("PGPLAKAR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pgplakar"


def segment_name(seg_id: str) -> str:
    return f"index/{seg_id}"


def write_segment(backend: Backend, keys: Keys, packs: list[dict[str, Any]], supersedes: Iterable[str] = ()) -> str:
    """Write one segment (create-only, named by SHA-256 of its bytes) and return its ID."""
    data = seal_object(keys, b"INDX", {"v": 1, "packs": packs, "supersedes": list(supersedes)})
    seg_id = hashlib.sha256(data).hexdigest()
    from .errors import AlreadyExists

    try:
        backend.put(segment_name(seg_id), data)
    except AlreadyExists:
        pass  # content-addressed: the identical segment is already there
    return seg_id


def write_segments(
    backend: Backend, keys: Keys, packs: list[dict[str, Any]], supersedes: Iterable[str] = ()
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Write ``packs`` as segments of at most SEGMENT_MAX_ENTRIES blobs; return [(segment_id, packs), ...].

    With ``supersedes`` and no packs, one empty segment is written anyway: it alone records what was superseded."""
    groups: list[list[dict[str, Any]]] = []
    count = 0
    for p in packs:
        if not groups or count + len(p["blobs"]) > SEGMENT_MAX_ENTRIES:
            groups.append([])
            count = 0
        groups[-1].append(p)
        count += len(p["blobs"])
    supersedes = sorted(set(supersedes))
    if not groups and supersedes:
        groups.append([])
    return [(write_segment(backend, keys, g, supersedes), g) for g in groups]


def read_segment(backend: Backend, keys: Keys, seg_id: str) -> dict[str, Any]:
    name = segment_name(seg_id)
    data = backend.get(name)
    if hashlib.sha256(data).hexdigest() != seg_id:
        raise IntegrityError(f"{name}: content does not match its name (corrupt index segment)")
    seg: dict[str, Any] = open_object(keys, b"INDX", data, name)
    why = segment_problem(seg)
    if why:
        raise IntegrityError(f"{name}: {why}")
    sup = seg.get("supersedes", [])
    if not isinstance(sup, list) or not all(isinstance(x, str) and _is_seg_id(x) for x in sup):
        raise IntegrityError(f"{name}: malformed supersedes list")
    return seg


def _is_seg_id(text: str) -> bool:
    return len(text) == 64 and not text.strip("0123456789abcdef")


def segment_problem(seg: Any) -> str | None:
    """Why a decoded segment is unusable (None when every pack and blob entry is within bounds)."""
    from .pack import entry_problem, pack_size_ok

    packs = seg.get("packs") if isinstance(seg, dict) else None
    if not isinstance(packs, list):
        return "malformed index segment"
    for p in packs:
        if not isinstance(p, dict) or not isinstance(p.get("id"), str) or len(p["id"]) != 64 \
                or p["id"].strip("0123456789abcdef") or p.get("kind") not in ("data", "tree") \
                or not isinstance(p.get("salt"), bytes) or len(p["salt"]) != 32 or not isinstance(p.get("blobs"), list):
            return "malformed pack entry"
        if not pack_size_ok(p.get("size")):
            return f"pack {p['id'][:16]}: size {p.get('size')!r} out of bounds"
        for row in p["blobs"]:
            why = entry_problem(row, p["size"] - 8)
            if why:
                return f"pack {p['id'][:16]}: {why}"
    return None


class IndexCache:
    """SQLite mirror of ``index/`` (plus decrypted snapshot headers, which are immutable)."""

    def __init__(self, path: Path, repo_id: str) -> None:
        self.path = path
        self.repo_id = repo_id
        self.bad_segments: dict[str, str] = {}
        self.superseded_listed: set[str] = set()  # listed in index/ but superseded: garbage for the next prune
        self.frozen = False  # prune's private view: sync() leaves it as it is (store/prune.py)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect()
        except (sqlite3.DatabaseError, StoreError) as e:
            log.warning("index cache %s unusable (%s): rebuilding it", path, e)
            self._remove_files()
            self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA cache_size=-65536")
        db.executescript(_SCHEMA)
        row = dict(db.execute("SELECT k, v FROM meta").fetchall())
        if not row:
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('repo_id', ?), ('schema', ?)", (self.repo_id, SCHEMA_VERSION)
            )
        elif row.get("repo_id") != self.repo_id:
            db.close()
            raise StoreError(f"cache belongs to store {row.get('repo_id')}, not {self.repo_id}")
        elif row.get("schema") != SCHEMA_VERSION:
            db.close()
            raise StoreError(f"cache schema {row.get('schema')} is not {SCHEMA_VERSION}")
        return db

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    def reset(self) -> None:
        """Forget every applied segment (not the superseded IDs: they come from authenticated segments and stay
        true for good)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for table in ("blobs", "packs", "segments"):
                self.db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names

    def sync(self, backend: Backend, keys: Keys) -> None:
        """Bring the cache up to date with ``index/``; corrupt segments are skipped and remembered."""
        if self.frozen:
            return
        try:
            self._sync(backend, keys)
        except sqlite3.DatabaseError as e:
            log.warning("index cache %s is corrupt (%s): rebuilding it", self.path, e)
            self.db.close()
            self._remove_files()
            self.db = self._connect()
            self._sync(backend, keys)

    def _sync(self, backend: Backend, keys: Keys) -> None:
        for _attempt in range(5):
            listed = {o.key.rsplit("/", 1)[-1] for o in backend.list("index/")}
            try:
                if self._apply_listed(backend, keys, listed):
                    return
            except ObjectNotFound:
                # a prune running beside us deleted a listed segment after consolidating it: list again (the
                # consolidated segments are written before the old ones go)
                log.info("an index segment was consolidated by a running prune while being read: listing again")
                continue
            # a segment read now supersedes one applied earlier (a prune consolidating now, one that crashed
            # before deleting the old segments, or a replay): start over without it
            log.info("an applied index segment is superseded by another: rebuilding the local index cache")
            self.reset()
        raise StoreError(f"index of {backend.location} keeps changing while it is read: retry")

    def _apply_listed(self, backend: Backend, keys: Keys, listed: set[str]) -> bool:
        """Apply the listed segments not applied yet; False when an applied one turned out to be superseded."""
        known = self.segments()
        if known - listed:
            log.info("index segments were consolidated by a prune: rebuilding the local index cache")
            self.reset()
            known = set()
        superseded = self.superseded()
        self.bad_segments = {}
        for seg_id in sorted(listed - known):
            if seg_id in superseded:
                continue
            try:
                seg = read_segment(backend, keys, seg_id)
            except IntegrityError as e:
                self.bad_segments[seg_id] = str(e)
                log.warning("%s", e)
                continue
            new = set(seg["supersedes"]) - superseded
            if new:
                with self.db:
                    self.db.executemany("INSERT OR IGNORE INTO superseded VALUES (?)", ((x,) for x in new))
                superseded |= new
            if seg_id not in superseded:
                self.apply_segment(seg_id, seg)
        self.superseded_listed = listed & superseded
        for seg_id in self.superseded_listed:
            self.bad_segments.pop(seg_id, None)
        return not (self.segments() & superseded)

    def apply_segment(self, seg_id: str, seg: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone():
                return
            for p in seg["packs"]:
                self.db.execute(
                    "INSERT OR IGNORE INTO packs(id, size, kind, salt, segment) VALUES (?,?,?,?,?)",
                    (p["id"], p["size"], p["kind"], p["salt"], seg_id),
                )
                (no,) = self.db.execute("SELECT no FROM packs WHERE id=?", (p["id"],)).fetchone()
                self.db.executemany(
                    "INSERT OR IGNORE INTO blobs VALUES (?,?,?,?,?,?)",
                    ((b[1], no, b[2], b[3], b[4], b[0]) for b in p["blobs"]),
                )
            self.db.execute("INSERT INTO segments VALUES (?)", (seg_id,))

    def has_blob(self, blob_id: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM blobs WHERE id=? LIMIT 1", (blob_id,)).fetchone() is not None

    def known_blobs(self, blob_ids: list[bytes], locations: dict[bytes, str] | None = None,
                    exclude: set[str] | frozenset[str] = frozenset()) -> set[bytes]:
        """The subset of ``blob_ids`` the index holds: one query per batch instead of one per blob. ``locations``
        gets, for each, the ID of a pack holding it (what a snapshot deduplicating it depends on); locations in
        the ``exclude`` packs (a prune intends to delete them) do not count."""
        known: set[bytes] = set()
        for i in range(0, len(blob_ids), 500):  # well under SQLite's bound-parameter limit
            part = blob_ids[i : i + 500]
            marks = ",".join("?" * len(part))
            if locations is None and not exclude:
                known.update(r[0] for r in self.db.execute(f"SELECT id FROM blobs WHERE id IN ({marks})", part))  # noqa: S608
                continue
            sql = f"SELECT b.id, p.id FROM blobs b JOIN packs p ON p.no=b.pack WHERE b.id IN ({marks})"  # noqa: S608
            for blob_id, pack_id in self.db.execute(sql, part):
                if pack_id in exclude:
                    continue
                known.add(blob_id)
                if locations is not None:
                    locations[blob_id] = pack_id
        return known

    def pack_sizes(self, pack_ids: Iterable[str]) -> list[tuple[str, int]]:
        """(pack_id, indexed size) of the indexed packs among ``pack_ids``."""
        ids = list(pack_ids)
        out: list[tuple[str, int]] = []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            sql = f"SELECT id, size FROM packs WHERE id IN ({','.join('?' * len(part))})"  # noqa: S608 - placeholders
            out.extend(self.db.execute(sql, part).fetchall())
        return out

    def lookup(self, blob_id: bytes) -> Location | None:
        row = self.db.execute(
            "SELECT p.id, p.salt, b.off, b.len, b.raw, b.type FROM blobs b JOIN packs p ON p.no=b.pack "
            "WHERE b.id=? LIMIT 1",
            (blob_id,),
        ).fetchone()
        return Location(*row) if row else None

    def lookup_many(self, blob_ids: list[bytes]) -> dict[bytes, Location]:
        """:meth:`lookup` for a batch (a restore's chunk list): one query per 500 IDs instead of one per blob. A blob
        held by several packs maps to the one with the lowest pack number, as :meth:`lookup` picks."""
        out: dict[bytes, Location] = {}
        for i in range(0, len(blob_ids), 500):
            part = blob_ids[i : i + 500]
            sql = ("SELECT b.id, p.id, p.salt, b.off, b.len, b.raw, b.type FROM blobs b JOIN packs p ON p.no=b.pack "  # noqa: S608
                   f"WHERE b.id IN ({','.join('?' * len(part))}) ORDER BY b.pack")
            for blob_id, *loc in self.db.execute(sql, part):
                if blob_id not in out:
                    out[blob_id] = Location(*loc)
        return out

    def packs(self) -> list[tuple[str, int, str, str]]:
        return self.db.execute("SELECT id, size, kind, segment FROM packs").fetchall()

    def pack_entries(self, pack_id: str) -> list[tuple[bytes, int, int, int, int]]:
        """(blob_id, off, len, raw, type) of every blob indexed in the pack."""
        return self.db.execute(
            "SELECT b.id, b.off, b.len, b.raw, b.type FROM blobs b JOIN packs p ON p.no=b.pack WHERE p.id=? "
            "ORDER BY b.off",
            (pack_id,),
        ).fetchall()

    def segments(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM segments")}

    def superseded(self) -> set[str]:
        """Every segment ID a segment this cache read has superseded (cumulative)."""
        return {r[0] for r in self.db.execute("SELECT id FROM superseded")}

    def cached_snapshot(self, snap_id: str) -> bytes | None:
        row = self.db.execute("SELECT header FROM snapshots WHERE id=?", (snap_id,)).fetchone()
        return row[0] if row else None

    def cache_snapshot(self, snap_id: str, header: bytes) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?)", (snap_id, header))

    def close(self) -> None:
        self.db.close()
