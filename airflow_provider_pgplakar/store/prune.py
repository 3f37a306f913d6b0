"""Prune: delete what no snapshot references, under the exclusive prune lease.

With the lease held no backup runs, so every pack not reachable from a committed snapshot is garbage (orphans of
crashed or aborted writers included). Order, so that a crash at any step loses nothing and the next prune
finishes the job:

1. mark: walk every snapshot's manifest into a SQLite ``live`` table (bounded memory). An unreadable snapshot
   aborts the prune: we never delete when we cannot know what is live;
2. repack packs that are mostly dead (live blobs re-sealed into new packs, uploaded, verified);
3. write consolidated index segments for everything kept, then delete the superseded segments;
4. delete dead packs, stale temp files and stale leases.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .blobsink import BlobSink
from .errors import IntegrityError, StoreError
from .index import write_segments
from .locks import Lease, acquire, is_stale, list_leases
from .pack import CHUNKLIST, TREE, decode_blob, pack_key, pack_object_name
from .reader import chunk_refs, iter_records

if TYPE_CHECKING:
    from .repo import Store

log = logging.getLogger(__name__)

REPACK_DEAD_FRACTION = 0.25
TEMP_FILE_MAX_AGE = 86400.0


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
        return _prune(store, dry_run, lease)
    finally:
        _release(store, lease)


def _before_deleting(lease: Lease, what: str) -> None:
    """Our own lease must still be fresh on both clocks before a deletion phase: if it went stale (refreshes
    failed, the VM was suspended), a backup may have started meanwhile and use what we are about to delete."""
    lease.check_fresh(f"not deleting {what}")


def _mark(store: Store, rep: PruneReport) -> None:
    db = store.cache.db
    db.execute("CREATE TEMP TABLE IF NOT EXISTS live(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("DELETE FROM temp.live")
    ins = "INSERT OR IGNORE INTO temp.live VALUES (?)"
    for sid in store.snapshot_ids():
        try:
            snap = store.load_snapshot(sid, use_cache=False)
            db.execute("BEGIN")
            for leaf_id, _n in snap.header["manifest"]["leaves"]:
                db.execute(ins, (leaf_id,))
            for rec in iter_records(store, snap):
                for cl in rec.get("cl", ()):
                    db.execute(ins, (cl,))
                if rec.get("k") == "f":
                    db.executemany(ins, ((b,) for b, _ in chunk_refs(store, rec)))
            db.execute("COMMIT")
        except StoreError as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"refusing to prune: snapshot {sid[:8]} is unreadable ({e}); "
                             "run `check`, then repair or forget it") from None
        rep.snapshots += 1
    rep.live_blobs = db.execute("SELECT count(*) FROM temp.live").fetchone()[0]


def _prune(store: Store, dry_run: bool, lease: Lease) -> PruneReport:
    rep = PruneReport(dry_run=dry_run)
    store.sync_index()
    if store.cache.bad_segments:
        raise StoreError("refusing to prune: corrupt index segment(s) "
                         f"{', '.join(s[:16] for s in store.cache.bad_segments)}; run `repair index` first")
    _mark(store, rep)
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
    listed = {o.key.rsplit("/", 1)[-1]: o.size for o in store.backend.list("packs/")}
    indexed = {p[1] for p in packs}
    orphans = [(pid, size) for pid, size in listed.items() if pid not in indexed]
    rep.packs_deleted = len(delete) + len(orphans) + len(repack)
    rep.packs_repacked = len(repack)
    rep.bytes_freed = sum(s for _, s in delete) + sum(s for _, s in orphans)
    if dry_run:
        return rep
    new_packs = _repack(store, repack) if repack else []
    rep.bytes_freed += sum(r[2] for r in repack) - sum(p["size"] for p in new_packs)
    # consolidated index: kept packs, listing only the blobs they own, plus the repacked ones
    entries: list[dict] = list(new_packs)
    for no in keep:
        pid, size, kind, salt = db.execute("SELECT id, size, kind, salt FROM packs WHERE no=?", (no,)).fetchone()
        rows = db.execute("SELECT b.type, b.id, b.off, b.len, b.raw FROM blobs b JOIN temp.owner o "
                          "ON o.id=b.id AND o.pack=b.pack WHERE b.pack=?", (no,)).fetchall()
        entries.append({"id": pid, "size": size, "kind": kind, "salt": salt, "blobs": [list(r) for r in rows]})
    old_segments = sorted(store.cache.segments())
    # supersedes is cumulative: an old segment re-uploaded later is recognised however many prunes ago it went
    write_segments(store.backend, store.keys, entries, set(old_segments) | store.cache.superseded())
    _before_deleting(lease, "superseded index segments")
    for seg in old_segments + sorted(store.cache.superseded_listed):
        store.backend.delete(f"index/{seg}")
    rep.segments_replaced = len(old_segments)
    _before_deleting(lease, "packs")
    for pid, _size in delete + orphans + [(r[1], r[2]) for r in repack]:
        store.backend.delete(pack_object_name(pid))
    _before_deleting(lease, "stale leases and temporary files")
    _cleanup(store)
    store.cache.reset()
    store.sync_index()
    log.info("prune: %d pack(s) deleted (%d repacked), %.1f MiB freed", rep.packs_deleted, rep.packs_repacked,
             rep.bytes_freed / 2**20)
    return rep


def _repack(store: Store, repack: list[tuple[int, str, int, bytes]]) -> list[dict]:
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
    def known_blobs(self, blob_ids: list[bytes], packs: set[int] | None = None) -> set[bytes]:
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
