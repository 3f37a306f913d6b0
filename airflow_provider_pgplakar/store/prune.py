"""Prune: delete what no snapshot references, while backups go on (restic's rules plus intents).

Backups never wait for prune and prune never waits for backups (readers and other prunes exclude it: store/locks.py).
Order, so that a crash at any step loses nothing and the next prune finishes the job:

1. mark: list the snapshots, then read the index, and walk every listed snapshot's manifest into a SQLite ``live``
   table (bounded memory). An unreadable snapshot aborts the prune: we never delete when we cannot know what is live;
2. repack packs that are mostly dead (live blobs re-sealed into new packs, uploaded, verified);
3. write consolidated index segments for everything kept (dead blobs of kept packs stay indexed);
4. write an intent (store/intents.py) naming the packs and segments to delete, wait for commits in flight, re-list
   the snapshots and spare (and re-index) the packs that snapshots committed meanwhile need;
5. delete the superseded segments, then the packs, then the intent; stale temp files and leases last.

Unindexed packs are deleted only when older than the grace period and than every live backup lease: they may be
the uploads of a backup that has not committed yet. ``packs/`` and the leases are listed before the index is read,
so that a backup committing in between (index segment, snapshot, lease released) is never taken for a crashed one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .blobsink import BlobSink
from .errors import IntegrityError, StoreError
from .index import IndexCache, read_segment, write_segments
from .intents import delete_intent, env_seconds, list_intents, settle_seconds, write_intent
from .locks import Lease, acquire, is_stale, list_leases
from .pack import CHUNKLIST, TREE, decode_blob, pack_key, pack_object_name
from .reader import chunk_refs, iter_records
from .record import RecordKind

if TYPE_CHECKING:
    from .backend import ObjInfo
    from .repo import Store

log = logging.getLogger(__name__)

REPACK_DEAD_FRACTION = 0.25
MIN_SKEW_S = 5.0  # at least this allowance between a lease's start (holder clock) and pack times (storage clock)
TEMP_FILE_MAX_AGE = 86400.0


def grace_seconds() -> float:
    """Unindexed packs younger than this (storage clock) are never deleted, and it is the allowance for clock skew
    against backup leases' start times (default 1 h; ``$PGPLAKAR_PRUNE_GRACE``)."""
    return env_seconds("PGPLAKAR_PRUNE_GRACE", 3600.0, 7 * 86400.0)


@dataclass
class PruneReport:
    snapshots: int = 0
    live_blobs: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    bytes_freed: int = 0
    segments_replaced: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


def _exclusive(store: Store, lock_wait: float = 0.0) -> Lease:
    """The prune lease; this store's own read lease (from an earlier restore or check) would conflict with it."""
    store.check_writable()
    store.leases.release_read()
    lease = acquire(store.backend, store.keys, "prune", wait=lock_wait)
    store.leases.hold(lease)
    return lease


def _release(store: Store, lease: Lease) -> None:
    store.leases.drop(lease)
    lease.release()


def prune(store: Store, *, dry_run: bool = False, lock_wait: float = 0.0) -> PruneReport:
    lease = _exclusive(store, lock_wait)
    try:
        marked = store.snapshot_ids()  # listed before the index is read: a later commit is re-checked (spare)
        listed, cutoff = _packs_then_cutoff(store)
        with _private_cache(store):
            return _prune(store, dry_run, lease, marked, listed, cutoff)
    finally:
        _release(store, lease)
        store.sync_index()  # the shared cache notices the consolidation and rebuilds


@contextmanager
def _private_cache(store: Store) -> Iterator[None]:
    """Run with an index cache of our own, rebuilt from ``index/``: the shared cache file is also used by backups
    on this host, which apply the segments they and others write (ours included) while we still need the
    pre-prune view of what the doomed packs hold."""
    shared = store.cache
    with tempfile.TemporaryDirectory(prefix="pgplakar-prune-") as tmp:
        store.cache = IndexCache(Path(tmp) / "index.sqlite", shared.repo_id)
        try:
            store.sync_index()
            store.cache.frozen = True
            yield
        finally:
            store.cache.close()
            store.cache = shared


def _before_deleting(lease: Lease, what: str) -> None:
    """Our own lease must still be fresh on both clocks before a deletion phase: if it went stale (refreshes
    failed, the VM was suspended), a backup may have started meanwhile and use what we are about to delete."""
    lease.check_fresh(f"not deleting {what}")


def _mark(store: Store, snapshot_ids: list[str], table: str = "live") -> int:
    """Every blob the snapshots reference (manifest leaves, chunk lists, chunks) into ``temp.<table>``, in batches
    (no transaction spans the reads: reading may sync the cache, which commits)."""
    db = store.cache.db
    db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table}(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute(f"DELETE FROM temp.{table}")  # noqa: S608 - a fixed table name
    ins = f"INSERT OR IGNORE INTO temp.{table} VALUES (?)"  # noqa: S608
    batch: list[tuple[bytes]] = []

    def add(blob_id: bytes) -> None:
        batch.append((blob_id,))
        if len(batch) >= 10_000:
            db.executemany(ins, batch)
            batch.clear()

    for sid in snapshot_ids:
        try:
            snap = store.load_snapshot(sid, use_cache=False)
            for leaf_id, _n in snap.header["manifest"]["leaves"]:
                add(leaf_id)
            for rec in iter_records(store, snap):
                for cl in rec.chunk_list_ids():
                    add(cl)
                if rec.kind == RecordKind.FILE:
                    for b, _ in chunk_refs(store, rec):
                        add(b)
        except StoreError as e:
            raise StoreError(f"refusing to prune: snapshot {sid[:8]} is unreadable ({e}); "
                             "run `check`, then repair or forget it") from None
    db.executemany(ins, batch)
    return int(db.execute(f"SELECT count(*) FROM temp.{table}").fetchone()[0])  # noqa: S608


def _orphans_deletable_before(store: Store, grace: float) -> float:
    """Unindexed packs are uploads of crashed writers, or of writers still running (they index their packs at
    commit). Only packs older than ``grace`` on the storage clock and older than the start of every live backup
    lease (its holder's clock, with ``grace`` as the allowance for skew) are deleted."""
    now = store.backend.now()
    cutoff = now - grace
    for lease in list_leases(store.backend, store.keys):
        if lease.kind != "prune" and not is_stale(lease, now):
            # S3's LastModified has whole seconds: a pack uploaded in the lease's first second may look older
            cutoff = min(cutoff, lease.start - max(grace, MIN_SKEW_S))
    return cutoff


def _packs_then_cutoff(store: Store) -> tuple[dict[str, ObjInfo], float]:
    """``packs/`` listed, then the orphan cutoff taken from the leases, both before the index is read. A pack
    listed here that the index read afterwards does not hold belongs to a writer that crashed, or that had not
    committed when the index was read and so still held its lease when the leases were listed (a writer releases
    its lease only after writing its index segment). Listed after the index read, the packs of a backup that
    committed and released its lease in between looked like orphans: deleted though indexed, while its
    segment (which the consolidated index does not supersede) still maps blobs to them."""
    listed = {o.key.rsplit("/", 1)[-1]: o for o in store.backend.list("packs/")}
    cutoff = _orphans_deletable_before(store, grace_seconds())
    return listed, cutoff


def _prune(store: Store, dry_run: bool, lease: Lease, marked: list[str], listed: dict[str, ObjInfo],
           cutoff: float) -> PruneReport:
    rep = PruneReport(dry_run=dry_run)
    if store.cache.bad_segments:
        raise StoreError("refusing to prune: corrupt index segment(s) "
                         f"{', '.join(s[:16] for s in store.cache.bad_segments)}; run `repair index` first")
    rep.live_blobs = _mark(store, marked)
    rep.snapshots = len(marked)
    older_intents = list_intents(store)  # of crashed prunes: this one recomputes everything, then replaces them
    db = store.cache.db
    # each live blob is owned by one location: the lowest-numbered pack holding it
    db.execute("CREATE TEMP TABLE IF NOT EXISTS owner(id BLOB PRIMARY KEY, pack INT) WITHOUT ROWID")
    db.execute("DELETE FROM temp.owner")
    db.execute("INSERT INTO temp.owner SELECT b.id, min(b.pack) FROM blobs b JOIN temp.live l ON l.id=b.id "
               "GROUP BY b.id")
    missing = rep.live_blobs - db.execute("SELECT count(*) FROM temp.owner").fetchone()[0]
    if missing:
        raise StoreError(f"refusing to prune: {missing} referenced blob(s) are not in the index; run `check`")
    packs = db.execute(
        "SELECT p.no, p.id, p.size, p.kind, p.salt, "
        "coalesce((SELECT sum(b.len) FROM blobs b JOIN temp.owner o ON o.id=b.id AND o.pack=b.pack "
        "          WHERE b.pack=p.no), 0), "
        "(SELECT count(*) FROM blobs b JOIN temp.owner o ON o.id=b.id AND o.pack=b.pack WHERE b.pack=p.no) "
        "FROM packs p"
    ).fetchall()
    from .pack import PREFIX_LEN, TRAILER_LEN

    keep, repack, delete = [], [], []
    for no, pid, size, _kind, salt, used, owned in packs:
        # the pack format's own bytes (prefix, trailer, sealed header of ~50 bytes per blob) are not dead space:
        # counted as dead, a pack of small all-live blobs was "repacked" into an identical one by every prune
        overhead = PREFIX_LEN + TRAILER_LEN + 64 + 64 * owned
        if used == 0:
            delete.append((pid, size))
        elif (size - used - overhead) / size > REPACK_DEAD_FRACTION:
            repack.append((no, pid, size, salt))
        else:
            keep.append(no)
    indexed = {p[1] for p in packs}
    orphans = [(pid, o.size) for pid, o in listed.items() if pid not in indexed and o.mtime < cutoff]
    young = sum(1 for pid, o in listed.items() if pid not in indexed and o.mtime >= cutoff)
    if young:
        log.info("prune: %d unindexed pack(s) kept: written by a running backup, or within the grace period", young)
    rep.packs_deleted = len(delete) + len(orphans) + len(repack)
    rep.packs_repacked = len(repack)
    rep.bytes_freed = sum(s for _, s in delete) + sum(s for _, s in orphans)
    if dry_run:
        return rep
    new_packs = _repack(store, repack) if repack else []
    rep.bytes_freed += sum(r[2] for r in repack) - sum(p["size"] for p in new_packs)
    # consolidated index: the repacked packs, and each kept pack with every blob not owned by another pack. Dead
    # blobs of kept packs stay indexed: a backup running now may have deduplicated against one, and nothing
    # would tell it that the entry went away (their packs are not in the intent).
    entries: list[dict[str, Any]] = list(new_packs)
    for no in keep:
        pid, size, kind, salt = db.execute("SELECT id, size, kind, salt FROM packs WHERE no=?", (no,)).fetchone()
        rows = db.execute("SELECT b.type, b.id, b.off, b.len, b.raw FROM blobs b LEFT JOIN temp.owner o "
                          "ON o.id=b.id WHERE b.pack=? AND (o.pack IS NULL OR o.pack=b.pack)", (no,)).fetchall()
        entries.append({"id": pid, "size": size, "kind": kind, "salt": salt, "blobs": [list(r) for r in rows]})
    old_segments = sorted(store.cache.segments())
    # supersedes is cumulative: an old segment re-uploaded later is recognised however many prunes ago it went
    consolidated = write_segments(store.backend, store.keys, entries, set(old_segments) | store.cache.superseded())
    doomed = {pid for pid, _ in delete + orphans} | {r[1] for r in repack}
    intent = write_intent(store, doomed, set(old_segments) | store.cache.superseded_listed)
    settle = settle_seconds()
    log.info("prune: intent %s: %d pack(s) to delete; waiting %.0f s for backups committing now", intent.id[:8],
             len(doomed), settle)
    time.sleep(settle)
    spared = _spare_for_new_snapshots(store, marked, doomed, new_packs, {seg for seg, _ in consolidated})
    rep.packs_deleted -= len(spared)
    rep.bytes_freed -= sum(s for pid, s in delete + orphans if pid in spared)
    _before_deleting(lease, "superseded index segments")
    store.backend.delete_many(f"index/{seg}" for seg in old_segments + sorted(store.cache.superseded_listed))
    rep.segments_replaced = len(old_segments)
    _before_deleting(lease, "packs")
    store.backend.delete_many(pack_object_name(pid) for pid in sorted(doomed - spared))
    delete_intent(store, intent)
    for old in older_intents:
        delete_intent(store, old)
    _before_deleting(lease, "stale leases and temporary files")
    _cleanup(store)
    log.info("prune: %d pack(s) deleted (%d repacked), %.1f MiB freed", rep.packs_deleted, rep.packs_repacked,
             rep.bytes_freed / 2**20)
    return rep


def _spare_for_new_snapshots(store: Store, marked: list[str], doomed: set[str], new_packs: list[dict[str, Any]],
                             written: set[str]) -> set[str]:
    """Snapshots committed since the mark may use blobs whose only location is in a doomed pack (their writers
    deduplicated against it before our intent existed). Spare those packs, and index their blobs again (the
    consolidated index may have left them out) before the old segments go."""
    late = sorted(set(store.snapshot_ids()) - set(marked))
    if not late:
        return set()
    log.info("prune: %d snapshot(s) committed during this prune: sparing what they use", len(late))
    db = store.cache.db
    db.execute("CREATE TEMP TABLE IF NOT EXISTS late(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("DELETE FROM temp.late")
    # read them through a fresh cache: ours must stay the pre-prune index (it alone still maps the doomed packs),
    # and reading syncs the cache with the segments written since, the consolidated ones included
    # our (frozen) pre-prune view plus the segments those backups wrote; never our consolidated ones, which would
    # make the doomed packs' entries vanish from the view that decides what to spare
    for seg_id in sorted({o.key.rsplit("/", 1)[-1] for o in store.backend.list("index/")} - store.cache.segments()
                         - written):
        seg = read_segment(store.backend, store.keys, seg_id)
        if not seg.get("supersedes"):
            store.cache.apply_segment(seg_id, seg)
    _mark(store, late, "late")
    db.execute("CREATE TEMP TABLE IF NOT EXISTS moved(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("DELETE FROM temp.moved")
    db.executemany("INSERT OR IGNORE INTO temp.moved VALUES (?)", ((b[1],) for p in new_packs for b in p["blobs"]))
    db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed(id TEXT PRIMARY KEY) WITHOUT ROWID")
    db.execute("DELETE FROM temp.doomed")
    db.executemany("INSERT INTO temp.doomed VALUES (?)", ((pid,) for pid in doomed))
    # blobs of late snapshots with no location outside the doomed packs (the pre-prune cache still knows them),
    # and not repacked either
    rows = db.execute(
        "SELECT l.id FROM temp.late l WHERE l.id NOT IN (SELECT id FROM temp.moved) AND NOT EXISTS (SELECT 1 "
        "FROM blobs b JOIN packs p ON p.no=b.pack WHERE b.id=l.id AND p.id NOT IN (SELECT id FROM temp.doomed))"
    ).fetchall()
    spared: set[str] = set()
    needed = [r[0] for r in rows]
    for i in range(0, len(needed), 500):
        part = needed[i : i + 500]
        marks = ",".join("?" * len(part))
        spared.update(r[0] for r in db.execute(  # noqa: S608 - placeholders
            f"SELECT DISTINCT p.id FROM blobs b JOIN packs p ON p.no=b.pack WHERE b.id IN ({marks})", part))
    spared &= doomed
    if spared:
        entries = []
        for pid in sorted(spared):
            size, kind, salt = db.execute("SELECT size, kind, salt FROM packs WHERE id=?", (pid,)).fetchone()
            entries.append({"id": pid, "size": size, "kind": kind, "salt": salt,
                            "blobs": [[t, b, off, n, raw] for b, off, n, raw, t in store.cache.pack_entries(pid)]})
        write_segments(store.backend, store.keys, entries)
        log.info("prune: %d pack(s) spared for snapshots committed meanwhile", len(spared))
    return spared


def _repack(store: Store, repack: list[tuple[int, str, int, bytes]]) -> list[dict[str, Any]]:
    db = store.cache.db
    sink = BlobSink(store.backend, store.keys, store.cache, compression_level=store.compression_level,
                    pack_target=store.config.pack_target, uploaders=store.uploaders)
    sink.cache = _NoDedup()  # type: ignore[assignment]  # every owned blob must be rewritten
    try:
        for no, pid, _size, salt in repack:
            name = pack_object_name(pid)
            data = memoryview(store.backend.get(name))
            okey = pack_key(store.keys, salt)
            rows = db.execute("SELECT b.id, b.off, b.len, b.raw, b.type FROM blobs b JOIN temp.owner o "
                              "ON o.id=b.id AND o.pack=b.pack WHERE b.pack=?", (no,)).fetchall()
            for blob_id, off, length, raw, btype in rows:
                plain = decode_blob(okey, btype, blob_id, data[off : off + length], raw, store.keys, name)
                if sink.add(btype, plain) != blob_id:
                    raise IntegrityError(f"repacking {name}: blob {blob_id.hex()[:16]} changed ID")
        return sink.close()
    except BaseException:
        sink.abort()
        raise


class _NoDedup:
    def known_blobs(self, blob_ids: list[bytes], locations: dict[bytes, str] | None = None,
                    exclude: frozenset[str] = frozenset()) -> set[bytes]:
        return set()


def _cleanup(store: Store) -> None:
    now = store.backend.now()
    temp_lister = getattr(store.backend, "list_temp_files", None)
    if temp_lister:
        for obj in list(temp_lister()):
            if time.time() - obj.mtime > TEMP_FILE_MAX_AGE:
                store.backend.delete(obj.key)
    for lease in list_leases(store.backend, store.keys):
        if lease.kind != "prune" and is_stale(lease, now):
            store.backend.delete(f"locks/{lease.id}")
            log.info("removed stale %s", lease.describe())


def repair_index(store: Store) -> int:
    """Rebuild ``index/`` from pack headers (after index segments were lost or corrupted). Returns packs indexed."""
    from .pack import parse_pack

    lease = _exclusive(store)
    try:
        old = [o.key for o in store.backend.list("index/")]
        store.sync_index()  # the readable segments: the fallback for packs whose own header is damaged
        entries = []
        for obj in store.backend.list("packs/"):
            pid = obj.key.rsplit("/", 1)[-1]
            try:
                salt, blobs = parse_pack(store.keys, store.backend.get(obj.key), obj.key)
            except IntegrityError as e:
                # its blobs are still individually sealed: keep what a readable segment says about them rather
                # than delete the only map to intact data along with the old segments
                known = store.cache.db.execute("SELECT size, kind, salt FROM packs WHERE id=?", (pid,)).fetchone()
                rows = store.cache.pack_entries(pid)
                if known is None or not rows:
                    log.warning("skipping unreadable pack: %s", e)
                    continue
                log.warning("%s; keeping its entries from the existing index", e)
                entries.append({"id": pid, "size": known[0], "kind": known[1], "salt": known[2],
                                "blobs": [[t, b, off, n, raw] for b, off, n, raw, t in rows]})
                continue
            kind = "data" if all(b.blob_type not in (TREE, CHUNKLIST) for b in blobs) else "tree"
            entries.append({"id": pid, "size": obj.size, "kind": kind, "salt": salt,
                            "blobs": [[b.blob_type, b.blob_id, b.offset, b.length, b.raw_len] for b in blobs]})
        superseded = {key.rsplit("/", 1)[-1] for key in old} | store.cache.superseded()
        write_segments(store.backend, store.keys, entries, superseded)
        _before_deleting(lease, "the old index segments")
        for key in old:
            store.backend.delete(key)
        store.cache.reset()
        store.sync_index()
        return len(entries)
    finally:
        _release(store, lease)
