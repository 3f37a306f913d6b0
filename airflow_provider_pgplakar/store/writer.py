"""Writing a snapshot: records in, one atomic commit out.

Order of durability (restic's rule, the crash-safety invariant): packs → index segment → snapshot file. The
snapshot file is the only commit point and is written create-only, so a crash anywhere before it leaves only
garbage for prune, never a half snapshot; an exception inside the ``with`` block commits nothing.

New bytes per record: each record's :class:`RecordInfo` says what it added to the store (``new_raw_bytes``,
``new_stored_bytes``; :class:`.blobsink.NewBytes`): the chunks and chunk lists this snapshot stored because of it,
each charged to the first record that handed it to the store (records stored at once on several threads race for
a shared chunk under the sink's dedup lock; the loser, like any later record or snapshot, is charged nothing).
The manifest's leaves are charged to :attr:`SnapshotWriter.manifest_new`; records plus manifest add up to the
header's ``new_raw_bytes`` and ``new_stored_bytes``. The per-record figures are not in the snapshot format (a
caller may keep some in its ``meta``, as pg/logical.py does for its dumps).
"""

from __future__ import annotations

import collections
import getpass
import itertools
import logging
import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Generator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import blake3
import msgpack

from .blobsink import BlobSink, DepLog, NewBytes
from .chunker import Chunking, read_full
from .errors import AlreadyExists, DependencyMissing, StoreError
from .failpoints import failpoint
from .index import write_segments
from .intents import doomed_packs
from .locks import Lease, acquire
from .msgshape import BIN32, Shape, outside_bytes
from .objects import seal_object
from .pack import CHUNKLIST, DATA, TREE, pack_object_name
from .progress import Progress
from .readahead import Readahead
from .record import RecordKind
from .sizes import human_bytes

if TYPE_CHECKING:
    from .repo import Store

log = logging.getLogger(__name__)

INLINE_REFS = 256
# Chunk lists of big records are cut where a (keyed, so random) blob ID ends in a byte divisible by
# CHUNKLIST_CUT_MOD: ~80 refs (~3 KiB) per list on average, content-defined like the data, so a change in a 1 GiB
# file re-stores a few small lists instead of every fixed 4096-ref list after it. Measured on a second base backup
# after a 1 % change (bench/physical_bench.py): lists of ~256 refs stored 47 KiB of the 790 KiB, these ~15 KiB.
CHUNKLIST_MIN_REFS = 16
CHUNKLIST_CUT_MOD = 64
CHUNKLIST_REFS = 4096
FIXED_BATCH = 4 << 20  # bytes of fixed-size blocks per pool task (fewer hand-offs: 4 % faster than 1 MiB in an A/B)
FIXED_WINDOW = 8  # pending batches per record (the sink's semaphore bounds the total)
CDC_QUEUED = 1  # content-defined batches per record waiting in the pool beyond one per worker (see _cdc_refs)
# Manifest leaves are cut after a record whose keyed hash is divisible by LEAF_CUT_MOD (~24 records per leaf): a
# snapshot that changes a few records re-stores a few small leaves (a base backup after a 1 % change touched 3 of
# 4 leaves of ~320 records, 27 KiB stored; ~8 leaves of ~48, 24 KiB; ~12 of ~24, ~14 KiB).
LEAF_MIN, LEAF_MAX, LEAF_MAX_BYTES = 8, 8192, 1 << 20
LEAF_CUT_MOD = 16
# A record may hold at most 1 MiB outside its ``cl`` list (paths, meta, inline refs: a few KiB in practice), so a
# leaf holds at most 2 MiB outside those lists: what readers accept (reader.LEAF_SHAPE, docs/format.md §6.2).
RECORD_OTHER_MAX = 1 << 20
RECORD_SHAPE = Shape(RECORD_OTHER_MAX, {("cl",): BIN32})
DEPENDENCY_STAT_MAX = 64  # up to this many referenced packs are checked one HEAD/stat each, more by listing packs/


@dataclass(frozen=True)
class RecordInfo:
    path: str
    size: int
    digest: str | None  # hex BLAKE3 of the whole content (record key ``b``), None for ``digest=False``
    new: NewBytes = field(default_factory=NewBytes, compare=False, repr=False)  # what it added to the store

    @property
    def new_raw_bytes(self) -> int:
        """Plaintext bytes of the chunks (and chunk lists) this record added to the store (module docstring)."""
        return self.new.raw

    @property
    def new_stored_bytes(self) -> int:
        """Their size in packs, compressed and encrypted (waits for the record's last chunks to be encoded)."""
        return self.new.stored


@dataclass(frozen=True)
class StoredRecord:
    """A record whose content is stored, not yet in the snapshot (see :meth:`SnapshotWriter.store_stream`)."""

    info: RecordInfo
    rec: dict[str, Any]


class _NoDigest:
    def update(self, data: Any) -> None:
        pass


class _Manifest:
    """Streams records into leaf blobs cut at content-defined record boundaries (so unchanged runs dedup)."""

    def __init__(self, sink: BlobSink, key: bytes) -> None:
        self.sink, self.key = sink, key
        self.buf = bytearray()
        self.count = 0
        self.leaves: list[list[Any]] = []
        self.total = 0
        self.new = NewBytes()

    def add(self, record: dict[str, Any]) -> None:
        packed = msgpack.packb(record, use_bin_type=True)
        if outside_bytes(packed, RECORD_SHAPE) is None:
            raise StoreError(f"record {record['p'][:200]!r}: more than {RECORD_OTHER_MAX} bytes of path, attributes "
                             "and meta: readers would refuse it")
        self.buf += packed
        self.count += 1
        self.total += 1
        boundary = blake3.blake3(packed, key=self.key).digest(1)[0] % LEAF_CUT_MOD == 0 and self.count >= LEAF_MIN
        if boundary or self.count >= LEAF_MAX or len(self.buf) >= LEAF_MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.count:
            leaf_id = self.sink.add(TREE, bytes(self.buf), self.new)
            self.leaves.append([leaf_id, self.count])
            self.buf, self.count = bytearray(), 0


class SnapshotWriter:
    """Context manager that adds records and commits them as one snapshot on clean exit."""

    def __init__(
        self,
        store: Store,
        *,
        source: dict[str, Any] | None = None,
        tags: list[str] | tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        meta: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        lock_wait: float = 3600.0,
        started: datetime | None = None,
    ) -> None:
        """``started``: when the backup began reading its source, if before this writer is entered (a logical backup
        starts its tools while the store opens: pg/logical.py). It is the header's ``time_start``, which "newer
        than" compares, so it must not be later than the data."""
        self.store = store
        self.started = started
        self.source = source or {}
        self.tags = list(tags)
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.meta = meta or {}
        self.idempotency_key = idempotency_key
        self.lock_wait = lock_wait
        self.snapshot_id = store.idempotent_id(idempotency_key) if idempotency_key else secrets.token_hex(16)
        self.already_existed = False
        self._lease: Lease | None = None
        self._sink: BlobSink | None = None
        self._deps: DepLog | None = None  # where deduplicated blobs were found; closed with the lease
        self._manifest: _Manifest | None = None
        self._bytes = 0
        self._errors = 0
        self._t0 = 0.0

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> SnapshotWriter:
        st = self.store
        st.check_writable()
        self._lease = acquire(st.backend, st.keys, "backup", wait=self.lock_wait)
        st.leases.hold(self._lease)  # reads through this store (a parent snapshot) need no read lease meanwhile
        try:
            st.cache.sync(st.backend, st.keys)  # after the lease: no prune can remove what we dedup against
            self._sink = BlobSink(
                st.backend, st.keys, st.cache,
                compression_level=st.compression_level, pack_target=st.config.pack_target,
                uploaders=st.uploaders,
            )
            # blobs only in packs a running prune will delete count as absent: stored again, never depended on
            self._sink.excluded_packs = frozenset(doomed_packs(st))
            self._deps = self._sink.deps = DepLog()
        except BaseException:
            self._release_lease()
            raise
        self._manifest = _Manifest(self._sink, st.keys.id_key)
        self._start = self.started or datetime.now(UTC)
        self._t0 = self._start.timestamp()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (uploaded packs become orphans that prune removes)."""
        try:
            if self._sink is not None:
                self._sink.abort()
        finally:
            self._release_lease()

    def _release_lease(self) -> None:
        if self._deps is not None:
            self._deps.close()
            self._deps = None
        if self._lease is not None:
            self.store.leases.drop(self._lease)
            self._lease.release()
            self._lease = None

    @property
    def manifest_new(self) -> NewBytes:
        """What the snapshot's manifest leaves added to the store (final after the commit)."""
        assert self._manifest is not None, "use the writer as a context manager"
        return self._manifest.new

    # -- records -------------------------------------------------------------------------------------------------
    def _record(self, path: str, kind: str, attrs: dict[str, Any]) -> dict[str, Any]:
        # no sequence number: the manifest's order is the record order, and a number would change every later
        # record (and so every later manifest leaf) whenever a file is added or removed, defeating metadata dedup
        rec: dict[str, Any] = {"p": path, "k": kind}
        for short, name in (("m", "mode"), ("t", "mtime_ns"), ("u", "uid"), ("g", "gid"), ("un", "uname"),
                            ("gn", "gname"), ("lt", "link_target")):
            v = attrs.pop(name, None)
            if v is not None:
                rec[short] = v
        meta = attrs.pop("meta", None)
        if meta:
            rec["x"] = meta
        if attrs:
            raise TypeError(f"unknown record attributes: {', '.join(sorted(attrs))}")
        return rec

    def add_stream(self, path: str, stream: BinaryIO, *, chunking: Chunking = Chunking(), digest: bool = True,
                   expected_size: int | None = None, **attrs: Any) -> RecordInfo:
        """Add a file record from any readable stream of unknown length; size and digest are filled at EOF.

        The record digest is the plain BLAKE3 of the whole content (``b3sum``'s; records of older writers carry a
        SHA-256 instead, which readers still verify: docs/format.md §6.3). ``digest=False`` leaves it out
        (readers then check sizes and, as always, every chunk's keyed BLAKE3 ID): for callers whose data carries
        its own end-to-end checksum, such as relation files listed with CRC32C in a PostgreSQL backup manifest.
        ``expected_size`` (an estimate, e.g. a database's size for its dump) gives the progress lines of a long
        record a share done and an ETA.
        """
        return self.add_stored(self.store_stream(path, stream, chunking=chunking, digest=digest,
                                                 expected_size=expected_size, **attrs))

    def add_stored(self, stored: StoredRecord) -> RecordInfo:
        """Append a record made by :meth:`store_stream` to the snapshot (records keep the order of these calls)."""
        assert self._manifest is not None, "use the writer as a context manager"
        self._manifest.add(stored.rec)
        self._bytes += stored.info.size
        return stored.info

    def store_stream(self, path: str, stream: BinaryIO, *, chunking: Chunking = Chunking(), digest: bool = True,
                     expected_size: int | None = None, **attrs: Any) -> StoredRecord:
        """Store a stream's content like :meth:`add_stream` but leave the record out of the snapshot until
        :meth:`add_stored`: several threads may call this at once (the blob sink is thread-safe), while the
        manifest is appended to on one thread in the order the caller chooses, whatever order streams end in.
        Each call holds its own bounded read-ahead (see :mod:`.readahead`); the sink's bounds are shared.
        A record stored but never added costs only orphan blobs, as an abort does."""
        assert self._sink is not None and self._manifest is not None, "use the writer as a context manager"
        rec = self._record(path, "f", attrs)
        new = NewBytes()
        hasher: Any = blake3.blake3() if digest else _NoDigest()
        refs: list[list[Any]] = []
        chunklists: list[bytes] = []
        size = 0
        progress = Progress(path, total=expected_size, estimate=True)
        source = self._fixed_refs(stream, chunking.block_size, hasher, new) if chunking.block_size else \
            self._cdc_refs(stream, chunking, hasher, new)
        try:
            for ref in source:
                refs.append(ref)
                size += ref[1]
                if len(refs) >= CHUNKLIST_REFS or (len(refs) >= CHUNKLIST_MIN_REFS
                                                   and refs[-1][0][-1] % CHUNKLIST_CUT_MOD == 0):
                    chunklists.append(self._sink.add(CHUNKLIST, msgpack.packb(refs, use_bin_type=True), new))
                    refs = []
                progress.add(ref[1])
        finally:
            source.close()
        progress.finish()
        if chunklists or len(refs) > INLINE_REFS:
            if refs:
                chunklists.append(self._sink.add(CHUNKLIST, msgpack.packb(refs, use_bin_type=True), new))
            rec["cl"] = chunklists
        else:
            rec["c"] = refs
        rec["s"] = size
        if digest:
            rec["b"] = hasher.digest()
        return StoredRecord(RecordInfo(path, size, hasher.hexdigest() if digest else None, new), rec)

    def _cdc_refs(self, stream: BinaryIO, chunking: Chunking, digest: Any,
                  new: NewBytes) -> Generator[list[Any], None, None]:
        """Content-defined chunks: cut and record digest on helper threads (see readahead), a batch of ~4 MiB of chunks
        per encode-pool task for BLAKE3, dedup and compression (:meth:`BlobSink.add_blocks`, as for fixed blocks:
        the caller only hands batches on, so the GIL changes hands per batch instead of several times per chunk).

        Memory: every batch keeps its whole buffer (``Chunker.batches``: 4 MiB by default, ``2 × max`` for a larger
        maximum chunk size) alive until its task is done. A record gives the pool one batch per encode worker
        (``BlobSink.workers``, ``min(4, cores)``) plus ``CDC_QUEUED`` waiting, so a worker that finishes never
        waits for the caller to wake up (the caller waits for the oldest task, then hands on the next batch), and
        the read-ahead holds ``2 × DEPTH + 2`` more (:mod:`.readahead`): at most ``workers + 5`` buffers per
        record, 7 (28 MiB) on 2 cores, 9 (36 MiB) on 4 or more, whatever the record's size. It was 12 on 2 cores
        before: the sink's ``2 × workers + 2`` slots, a deeper read-ahead, the first two batches pinned for the
        whole record and loop variables that kept the previous batch alive in every thread (README "The store",
        memory)."""
        assert self._sink is not None
        batches = self.store.chunker.batches(stream)
        head = list(itertools.islice(batches, 2))
        if len(head) < 2:  # a small record (one batch): threads and a pool round trip would cost more than they save
            for chunk in head[0] if head else ():
                digest.update(chunk)
                yield [self._sink.add(DATA, chunk, new), len(chunk)]
            return
        source = Readahead(_pop_then(head, batches), digest)
        del head
        window = self._sink.workers + CDC_QUEUED
        pending: collections.deque[Future[list[list[Any]]]] = collections.deque()
        try:
            for batch in source:
                pending.append(self._sink.add_blocks(DATA, batch, new))
                del batch  # the pool holds it now: not kept alive while waiting below
                while pending and (len(pending) >= window or pending[0].done()):  # a done task holds no batch
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            source.close()

    def _fixed_refs(self, stream: BinaryIO, block: int, digest: Any,
                    new: NewBytes) -> Generator[list[Any], None, None]:
        """Fixed-size blocks: this thread reads each block straight into its own buffer and hashes the record, the
        sink's pool does the rest, a batch of blocks per task (:meth:`BlobSink.add_blocks`); at most
        ``FIXED_WINDOW`` batches are pending, so memory stays bounded.

        A stream with ``read_block(n)`` (``pg/tarstream.py``) gives each block itself: ``n`` bytes (fewer only at
        its end) in a buffer that never changes afterwards, often a view of a bigger one, so no copy is made here.
        A small record's blocks are copied (``bytes``) so that they do not keep that bigger buffer alive; a batch of
        views keeps at most the two partly used buffers at its edges alive beyond its own bytes (~2 MiB with
        ``pg/basebackup.py``'s ~1 MiB buffers), so the sink's bound on batches in flight still bounds memory."""
        assert self._sink is not None
        per_batch = max(1, FIXED_BATCH // block)
        read_block = getattr(stream, "read_block", None)
        pending: collections.deque[Future[list[list[Any]]]] = collections.deque()
        try:
            eof = False
            while not eof:
                blocks: list[bytes | bytearray | memoryview] = []
                while len(blocks) < per_batch and not eof:
                    buf: bytes | bytearray | memoryview
                    if read_block is not None:
                        buf = read_block(block)
                        n = len(buf)
                        eof = n < block
                    else:
                        buf = bytearray(block)
                        n = read_full(stream, buf)
                        if n < block:
                            eof = True
                            del buf[n:]
                    if n:
                        digest.update(buf)
                        blocks.append(buf)
                if blocks and eof and not pending:
                    # the whole record fits in one batch (most relation files are a few pages): hash and claim
                    # here, so the next file starts at once instead of waiting for a pool round trip
                    for buf in blocks:
                        yield [self._sink.add(DATA, bytes(buf), new), len(buf)]
                elif blocks:
                    pending.append(self._sink.add_blocks(DATA, blocks, new))
                while pending and (eof or len(pending) > FIXED_WINDOW or pending[0].done()):
                    yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def add_bytes(self, path: str, data: bytes, **attrs: Any) -> RecordInfo:
        import io

        return self.add_stream(path, io.BytesIO(data), **attrs)

    def add_entry(self, path: str, kind: RecordKind, **attrs: Any) -> None:
        """Add a record without content: a directory, a symlink or a hard link (``link_target``)."""
        if kind not in (RecordKind.DIR, RecordKind.SYMLINK, RecordKind.HARDLINK):
            raise ValueError(f"entry kind must be a directory, symlink or hard link, not {kind!r}")
        assert self._manifest is not None, "use the writer as a context manager"
        self._manifest.add(self._record(path, RecordKind(kind).value, attrs))

    def add_error(self, path: str, message: str, **attrs: Any) -> None:
        """Record that ``path`` could not be read (multi-record sources continue; the snapshot says so)."""
        assert self._manifest is not None, "use the writer as a context manager"
        rec = self._record(path, "e", attrs)
        rec["e"] = message
        self._errors += 1
        self._manifest.add(rec)

    # -- commit --------------------------------------------------------------------------------------------------
    def commit(self) -> str:
        assert self._sink is not None and self._manifest is not None and self._lease is not None
        st = self.store
        try:
            self._manifest.flush()
            packs = self._sink.close()
            assert self._deps is not None
            self._avoid_doomed_packs(self._deps)
            deps = st.cache.pack_sizes(self._deps.packs)
            self._check_dependencies(deps)
            failpoint("after-packs")
            seg_ids = write_segments(st.backend, st.keys, packs)
            failpoint("after-index")
            stats = self._sink.stats
            header = {
                "v": 1, "id": self.snapshot_id, "repo": st.config.repo_id,
                "time_start": self._start.isoformat(), "time_end": datetime.now(UTC).isoformat(),
                "duration_s": round(time.time() - self._t0, 3),
                "host": socket.gethostname(), "user": _user(), "pid": os.getpid(),
                "tool": f"pgplakar/{_version()}", "python": sys.version.split()[0], "platform": platform.platform(),
                "tags": self.tags, "labels": self.labels, "source": self.source, "meta": self.meta,
                "manifest": {"leaves": self._manifest.leaves},
                "stats": {
                    "records": self._manifest.total, "bytes": self._bytes, "chunks": stats.chunks,
                    "new_chunks": stats.new_chunks, "new_raw_bytes": stats.new_raw_bytes,
                    "new_stored_bytes": stats.new_stored_bytes, "packs": stats.packs, "errors": self._errors,
                },
                "digest": blake3.blake3(msgpack.packb(self._manifest.leaves), key=st.keys.id_key).hexdigest(),
                "index_segments": [s for s, _ in seg_ids],
                "idempotency": bool(self.idempotency_key),
            }
            self._lease.check_fresh()
            data = seal_object(st.keys, b"SNAP", header, context=st.snapshot_context(self.snapshot_id))
            try:
                st.backend.put(f"snapshots/{self.snapshot_id}", data)
            except AlreadyExists:
                if not self.idempotency_key:
                    raise StoreError(f"snapshot ID collision for {self.snapshot_id}") from None
                self.already_existed = True
                log.info("snapshot %s already committed by an earlier attempt: keeping it", self.snapshot_id)
            failpoint("after-commit")
            if not self.already_existed:
                self._check_after_commit(deps)
            for seg_id, group in seg_ids:
                st.cache.apply_segment(seg_id, {"packs": group})
            if not self.already_existed:
                log.info(
                    "committed snapshot %s: %d records, %s, %s new (%s stored) in %.1fs",
                    self.snapshot_id, self._manifest.total, human_bytes(self._bytes), human_bytes(stats.new_raw_bytes),
                    human_bytes(stats.new_stored_bytes), time.time() - self._t0,
                )
            return self.snapshot_id
        except BaseException:
            self._sink.abort()
            raise
        finally:
            self._release_lease()


    def _avoid_doomed_packs(self, dep_log: DepLog) -> None:
        """A prune that started after us may be deleting packs we deduplicated against. Its repacked copies and
        consolidated index are written before its intent, so after re-reading the index most such blobs have
        another location; depend on that one instead. A blob with none (it was dead when the prune marked, e.g.
        its only snapshot was forgotten) makes the commit fail: a retry stores it anew."""
        st = self.store
        doomed = dep_log.packs & doomed_packs(st)
        if not doomed:
            return
        st.cache.sync(st.backend, st.keys)
        doomed = dep_log.packs & doomed_packs(st)
        moved: dict[bytes, str] = {}
        for ids in dep_log.blobs_in(doomed):
            found: dict[bytes, str] = {}
            st.cache.known_blobs(ids, found, exclude=doomed)
            lost = [b for b in ids if b not in found]
            if lost:
                raise DependencyMissing(
                    f"not committing snapshot {self.snapshot_id}: a running prune is deleting the only copy of "
                    f"{len(lost)}+ chunk(s) it deduplicates against (in {pack_object_name(sorted(doomed)[0])}): "
                    "retry the backup, which stores that data again")
            moved.update(found)
        dep_log.repoint(moved)
        log.info("snapshot %s: %d deduplicated chunk(s) now depend on their repacked copies (a prune is running)",
                 self.snapshot_id, len(moved))

    def _check_after_commit(self, deps: list[tuple[str, int]]) -> None:
        """After the snapshot file is written: a prune that re-listed snapshots before our commit may now be
        deleting a pack we depend on. Then our snapshot is withdrawn (deleted) and the commit fails; a retry stores
        that data anew (store/intents.py)."""
        try:
            self._check_dependencies(deps)
        except DependencyMissing:
            self.store.backend.delete(f"snapshots/{self.snapshot_id}")
            log.warning("snapshot %s withdrawn: a prune deleted (or is deleting) data it depends on", self.snapshot_id)
            raise

    def _check_dependencies(self, deps: list[tuple[str, int]]) -> None:
        """Every indexed pack this snapshot deduplicates against must exist, at its indexed size, and be in no prune
        intent: an index that lists deleted packs (a replayed segment, lost data) or a prune deleting them now
        would otherwise yield a snapshot that cannot be restored. One listing of ``intents/``, then one stat per
        distinct pack, or one listing of ``packs/`` when that is fewer requests."""
        st = self.store
        if not deps:
            return
        doomed = sorted({pid for pid, _size in deps} & doomed_packs(st))
        if doomed:
            more = f" (and {len(doomed) - 1} more)" if len(doomed) > 1 else ""
            raise DependencyMissing(
                f"not committing snapshot {self.snapshot_id}: a running prune is deleting "
                f"{pack_object_name(doomed[0])}{more}, which it deduplicates against: retry the backup (it stores "
                "that data again)")
        total = st.cache.db.execute("SELECT count(*) FROM packs").fetchone()[0]
        if len(deps) <= DEPENDENCY_STAT_MAX or len(deps) * 1000 <= total:
            sizes = {}
            for pid, _size in deps:
                info = st.backend.stat(pack_object_name(pid))
                if info is not None:
                    sizes[pid] = info.size
        else:
            sizes = {o.key.rsplit("/", 1)[-1]: o.size for o in st.backend.list("packs/")}
        bad = sorted(pid for pid, size in deps if sizes.get(pid) != size)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DependencyMissing(
                f"not committing snapshot {self.snapshot_id}: {pack_object_name(bad[0])}{more}, which it "
                f"deduplicates against, is missing from {st.location} or not its indexed size (an index segment "
                "that outlived its packs, or lost data): run `pgplakar check`, then `repair index`, and retry"
            )


def _pop_then(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    """``head``'s items (taken out of it), then ``rest``'s. Not ``itertools.chain(head, rest)``: its argument tuple
    keeps ``head``, and so the first batch buffers, alive until the very end of the record."""
    while head:
        yield head.pop(0)
    yield from rest


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def _version() -> str:
    from .. import __version__

    return __version__
