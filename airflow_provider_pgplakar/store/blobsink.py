"""The write pipeline: dedup → compress (thread pool) → seal into packs → upload (threads), with backpressure.

Threads and why: zstd, AES-GCM, BLAKE3 and hashlib all release the GIL, so compression runs in a pool while the
caller keeps chunking and hashing. Memory stays bounded whatever the data size: at most ``2 × workers + 2``
chunks (or batches of fixed-size blocks, see :meth:`BlobSink.add_blocks`) are in flight (a semaphore the caller
blocks on), at most two open packs, and at most ``UPLOAD_QUEUE``
finished packs wait for upload. Blob IDs seen in this session live in a SQLite file, not in RAM.

``verify_uploads`` (default on) decompresses every compressed blob in the worker and compares it with the input
before it enters a pack — restic's "extra verify", done per blob where the plaintext is still at hand instead of
re-reading whole packs (which cost ~25 % of ingest CPU here). It stops a faulty compressor or RAM from storing
wrong bytes under a valid tag. The seal is not opened again: AES-GCM gives back exactly what was sealed or fails
authentication, so a faulty seal can only make a blob unreadable (reads and ``check --read-data`` name it), never
return wrong bytes (docs/format.md §5.1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .backend import Backend
from .crypto import Keys
from .errors import AlreadyExists, IntegrityError, StoreError
from .failpoints import failpoint
from .index import IndexCache
from .pack import CODEC_RAW, CODEC_ZSTD, DATA, PackBuilder, decompress, pack_object_name

log = logging.getLogger(__name__)

UPLOAD_QUEUE = 2
# Adaptive effort: while at most NEW_FRACTION_LOW of the recent input (an exponential moving average over about
# 1/EMA_ALPHA chunks, ~32 MiB of 128 KiB blocks, starting at NEW_FRACTION_START) is new, new chunks are compressed
# at ``level + QUIET_EXTRA``. An incremental backup then spends spare CPU on the little it stores (PostgreSQL index
# blocks: 21 % smaller at level 6 than at 1; a clustered 1 % change is ~50 new blocks in a row, which keeps the
# average below the threshold), while a first backup, or a big new table inside an incremental, is back at the fast
# level after some 70 new chunks.
NEW_FRACTION_LOW = 0.25
NEW_FRACTION_START = 0.5
EMA_ALPHA = 1 / 256
QUIET_EXTRA = 5


@dataclass
class SinkStats:
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0  # sealed blob lengths in packs (codec byte + payload + AEAD overhead), as NewBytes
    packs: int = 0


class NewBytes:
    """What one record (or a snapshot's manifest) added to the store: ``raw``, the plaintext bytes of the blobs it
    was the first in this session to claim (a blob already indexed, or claimed earlier by any stream, counts for no
    one else: the sink's dedup lock decides the order, so concurrent streams never count a blob twice), and
    ``stored``, their sealed lengths in packs (compressed and encrypted; no pack header or trailer).

    ``raw`` is final once the caller's last ``add``/``add_blocks`` returned; ``stored`` waits for the blobs handed
    over one at a time by :meth:`BlobSink.add`, which are encoded on the pool after it returned (``add_blocks``
    encodes before its future resolves). The sink sums the same figures in :class:`SinkStats`, so the accounts of
    one session add up to its totals."""

    def __init__(self) -> None:
        self.raw = 0  # guarded by the sink's dedup lock
        self._stored = 0  # guarded by the sink's shared lock; read after the pending encodes ended
        self._pending = 0
        self._cond = threading.Condition()

    @property
    def stored(self) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)
            return self._stored

    def _begin(self) -> None:
        with self._cond:
            self._pending += 1

    def _end(self, _fut: Any = None) -> None:  # a done callback: also runs for a task cancelled by an abort
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None


class _SessionSet:
    """Blob IDs written in this session, on disk (a private SQLite file with no journal and no fsync: it dies with
    the session), so memory does not grow with the amount of new data."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="pgplakar-session-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE s(id BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("BEGIN")

    def add_many(self, blob_ids: list[bytes]) -> set[bytes]:
        """Record ``blob_ids`` (at most a few thousand); return those new to this session, in one statement."""
        if not blob_ids:
            return set()
        marks = ",".join(["(?)"] * len(blob_ids))
        sql = f"INSERT INTO s VALUES {marks} ON CONFLICT DO NOTHING RETURNING id"  # noqa: S608 - placeholders
        return {r[0] for r in self.db.execute(sql, blob_ids)}

    def close(self) -> None:
        self.db.close()
        os.unlink(self.path)


class DepLog:
    """For each blob a writer deduplicated, the indexed pack it was found in, on disk like :class:`_SessionSet`: a
    commit checks those packs against prune intents (store/intents.py) and finds another location for blobs whose
    pack a prune is deleting. Owned by the writer, which closes it after its commit."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="pgplakar-deps-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE d(id BLOB PRIMARY KEY, pack TEXT NOT NULL) WITHOUT ROWID")
        self.packs: set[str] = set()
        self._lock = threading.Lock()

    def add(self, locations: dict[bytes, str]) -> None:
        if not locations:
            return
        with self._lock:
            self.db.executemany("INSERT OR IGNORE INTO d VALUES (?, ?)", locations.items())
            self.packs.update(locations.values())

    def blobs_in(self, packs: set[str], batch: int = 500) -> Iterator[list[bytes]]:
        """The deduplicated blob IDs found in ``packs``, in batches."""
        ids = sorted(packs)
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            cur = self.db.execute(f"SELECT id FROM d WHERE pack IN ({','.join('?' * len(part))})", part)  # noqa: S608
            while rows := cur.fetchmany(batch):
                yield [r[0] for r in rows]

    def repoint(self, locations: dict[bytes, str]) -> None:
        """Record new locations (after the old pack turned out to be doomed); ``packs`` is recomputed."""
        with self._lock:
            self.db.executemany("UPDATE d SET pack=? WHERE id=?", ((p, b) for b, p in locations.items()))
            self.packs = {r[0] for r in self.db.execute("SELECT DISTINCT pack FROM d")}

    def close(self) -> None:
        self.db.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class BlobSink:
    """Accepts chunks, stores the new ones, and reports the packs it wrote (for the index segment)."""

    def __init__(
        self,
        backend: Backend,
        keys: Keys,
        cache: IndexCache,
        *,
        compression_level: int,
        pack_target: int,
        workers: int | None = None,
        uploaders: int = 2,
        verify_uploads: bool = True,
    ) -> None:
        self.backend, self.keys, self.cache = backend, keys, cache
        self.level = compression_level
        self.quiet_level = min(19, compression_level + QUIET_EXTRA) if compression_level > 0 else 0
        self._new_ema = NEW_FRACTION_START  # recent fraction of chunks that were new (guarded by _dedup)
        self.pack_target = pack_target
        self.verify_uploads = verify_uploads
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.stats = SinkStats()
        self.packs_written: list[dict[str, Any]] = []
        self.deps: DepLog | None = None  # set by a snapshot writer: where each deduplicated blob was found
        self.excluded_packs: frozenset[str] = frozenset()  # packs a prune intends to delete: not deduplicated against
        self._shared = _Shared()
        self._slots = threading.BoundedSemaphore(2 * self.workers + 2)
        self._dedup = threading.Lock()  # the cache and session connections, and the chunk counters
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pgplakar-encode")
        self._local = threading.local()
        self._open: dict[str, PackBuilder | None] = {"data": None, "tree": None}
        self._uploads: queue.Queue[tuple[str, bytearray, PackBuilder] | None] = queue.Queue(UPLOAD_QUEUE)
        self._uploaders = [
            threading.Thread(target=self._upload_loop, name=f"pgplakar-upload-{i}", daemon=True)
            for i in range(uploaders)
        ]
        for t in self._uploaders:
            t.start()
        self._session = _SessionSet()
        self._closed = False

    # -- caller side -------------------------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._shared.error is not None:
            raise StoreError(f"writing to {self.backend.location} failed: {self._shared.error}") from self._shared.error

    def add(self, blob_type: int, data: bytes | memoryview, account: NewBytes | None = None) -> bytes:
        """Store ``data`` unless already present; return its blob ID. Blocks when the pipeline is full. A new blob
        is charged to ``account``."""
        self._raise_if_failed()
        blob_id = self.keys.blob_id(data)
        with self._dedup:
            (level,) = self._claim([blob_id], [len(data)], account)
        if level is None:
            return blob_id
        self._slots.acquire()
        if account is not None:
            account._begin()
        try:
            fut = self._pool.submit(self._encode_task, blob_type, blob_id, data, level, account)
        except BaseException:
            self._slots.release()
            if account is not None:
                account._end()
            raise
        if account is not None:
            fut.add_done_callback(account._end)
        return blob_id

    def add_blocks(self, blob_type: int, blocks: Sequence[bytes | bytearray | memoryview],
                   account: NewBytes | None = None) -> Future[list[list[Any]]]:
        """Store each of ``blocks`` unless present; the future gives their ``[blob_id, length]`` references in
        order. Blocks when the pipeline is full. New blobs are charged to ``account``.

        Hashing, the dedup lookup and compression all run in the pool, one task per call: for fixed-size blocks
        (relation files) the caller only reads and submits, so one Python thread is no longer the bottleneck and
        GIL hand-offs happen per batch instead of several times per blob (measured: the physical backup's main
        thread spent most of its time waiting to get the GIL back after each BLAKE3 call and SQLite lookup).
        The blocks must not change until the future is done.
        """
        self._raise_if_failed()
        self._slots.acquire()
        try:
            fut = self._pool.submit(self._blocks_task, blob_type, blocks, account)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())  # also when the caller cancels it
        return fut

    def _claim(self, ids: list[bytes], sizes: list[int], account: NewBytes | None = None) -> list[int | None]:
        """For each of ``ids``: the compression level to store it at, or None when it is indexed or already
        claimed (also earlier in ``ids``); the claimed ones are charged to ``account``. The caller holds
        ``_dedup``; ``ids`` has at most a few hundred IDs."""
        locations: dict[bytes, str] | None = {} if self.deps is not None else None
        known = self.cache.known_blobs(ids, locations, self.excluded_packs)
        if self.deps is not None and locations:
            self.deps.add(locations)
        fresh = self._session.add_many([i for i in ids if i not in known])
        out: list[int | None] = []
        for blob_id, size in zip(ids, sizes, strict=True):
            new = blob_id in fresh
            fresh.discard(blob_id)  # a repeat within ``ids`` is stored once
            self._new_ema += EMA_ALPHA * (new - self._new_ema)
            self.stats.chunks += 1
            if new:
                self.stats.new_chunks += 1
                self.stats.new_raw_bytes += size
                if account is not None:
                    account.raw += size
                out.append(self.quiet_level if self._new_ema <= NEW_FRACTION_LOW else self.level)
            else:
                out.append(None)
        return out

    # -- encode pool -------------------------------------------------------------------------------------------
    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache = getattr(self._local, "zc", None)
        if cache is None:
            cache = self._local.zc = {}
        c = cache.get(level)
        if c is None:
            c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c

    def _encode_task(self, blob_type: int, blob_id: bytes, data: bytes | memoryview, level: int,
                     account: NewBytes | None) -> None:
        try:
            if self._shared.error is None:
                self._encode(blob_type, blob_id, data, level, account)
        except BaseException as e:
            self._fail(e)
        finally:
            self._slots.release()

    def _blocks_task(self, blob_type: int, blocks: Sequence[bytes | bytearray | memoryview],
                     account: NewBytes | None) -> list[list[Any]]:
        try:
            self._raise_if_failed()
            ids = [self.keys.blob_id(b) for b in blocks]
            with self._dedup:
                levels = self._claim(ids, [len(b) for b in blocks], account)
            encoded = []
            for piece, blob_id, level in zip(blocks, ids, levels, strict=True):
                if level is not None:
                    self._raise_if_failed()
                    encoded.append(self._compress(blob_id, piece, level))
            self._place(blob_type, encoded, account)
            return [[blob_id, len(b)] for blob_id, b in zip(ids, blocks, strict=True)]
        except BaseException as e:
            self._fail(e)
            raise

    def _encode(self, blob_type: int, blob_id: bytes, data: bytes | bytearray | memoryview, level: int,
                account: NewBytes | None = None) -> None:
        self._place(blob_type, [self._compress(blob_id, data, level)], account)

    def _compress(self, blob_id: bytes, data: bytes | bytearray | memoryview,
                  level: int) -> tuple[bytes, int, bytes | bytearray | memoryview, int]:
        """(blob_id, codec, payload, raw length) of one new blob, verified (see the module docstring)."""
        z = self._compressor(level).compress(data) if level > 0 else data
        compressed = len(z) < 0.97 * len(data)
        codec, payload = (CODEC_ZSTD, z) if compressed else (CODEC_RAW, data)
        if self.verify_uploads and compressed:
            out = decompress(z)
            # startswith compares with memcmp whatever the buffer type; ``==`` with a memoryview (the chunker's
            # zero-copy views) compares element by element, ~60x slower
            if len(out) != len(data) or not out.startswith(data):
                raise IntegrityError(f"blob {blob_id.hex()[:16]} did not survive compression: refusing to store it")
        return blob_id, codec, payload, len(data)

    def _place(self, blob_type: int, encoded: list[tuple[bytes, int, bytes | bytearray | memoryview, int]],
               account: NewBytes | None = None) -> None:
        """Seal blobs into the open pack of their kind, one batch together: a batch's chunks stay adjacent in the
        pack, so a restore reads them in one ranged read (interleaved with the other encode threads' blobs, reads
        were coalesced ~2.7 chunks at a time: ten times the GETs on S3)."""
        kind = "data" if blob_type == DATA else "tree"
        ready: list[PackBuilder] = []
        with self._shared.lock:
            for blob_id, codec, payload, raw_len in encoded:
                pb = self._open[kind]
                if pb is not None and not pb.fits(len(payload)):  # PACK_HARD_MAX: close it before it would overflow
                    ready.append(pb)
                    pb = None
                if pb is None:
                    pb = self._open[kind] = PackBuilder(self.keys, kind)
                pb.add(blob_type, blob_id, codec, payload, raw_len)
                sealed = pb.entries[-1].length  # what the blob takes in its pack: compressed and encrypted
                self.stats.new_stored_bytes += sealed
                if account is not None:
                    account._stored += sealed
                if len(pb) >= self.pack_target:
                    ready.append(pb)
                    self._open[kind] = None
        for pb in ready:
            self._enqueue(pb)

    def _enqueue(self, pb: PackBuilder) -> None:
        failpoint("before-first-pack")
        pack_id, data = pb.finish()
        while True:  # wake up regularly so that a failed uploader cannot leave us blocked forever
            if self._shared.error is not None:
                return
            try:
                self._uploads.put((pack_id, data, pb), timeout=1.0)
                return
            except queue.Full:
                continue

    def _fail(self, e: BaseException) -> None:
        with self._shared.lock:
            if self._shared.error is None:
                self._shared.error = e
                log.debug("pipeline failure: %s", e)  # re-raised to the caller, which reports it once

    # -- uploaders -----------------------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        while True:
            item = self._uploads.get()
            if item is None:
                return
            if self._shared.error is not None:
                continue
            pack_id, data, pb = item
            try:
                try:
                    # the pack's name is its SHA-256: S3's checksum reuses it instead of hashing the pack again
                    self.backend.put(pack_object_name(pack_id), data, sha256=bytes.fromhex(pack_id))
                except AlreadyExists:
                    pass  # content-addressed: identical bytes are already stored
                info = {
                    "id": pack_id, "size": len(data), "kind": pb.kind, "salt": pb.salt,
                    "blobs": [[e.blob_type, e.blob_id, e.offset, e.length, e.raw_len] for e in pb.entries],
                }
                with self._shared.lock:
                    self.packs_written.append(info)
                    self.stats.packs += 1
            except BaseException as e:
                self._fail(e)

    # -- end -----------------------------------------------------------------------------------------------------
    def close(self) -> list[dict[str, Any]]:
        """Flush everything; return the packs written. Raises if any stage failed."""
        self._pool.shutdown(wait=True)
        if self._shared.error is None:
            for kind, pb in list(self._open.items()):
                if pb is not None and pb.entries:
                    self._enqueue(pb)
                self._open[kind] = None
        self._finish_threads()
        self._raise_if_failed()
        return self.packs_written

    def abort(self) -> None:
        self._fail(StoreError("aborted"))
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._finish_threads()

    def _finish_threads(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._uploaders:
            self._uploads.put(None)
        for t in self._uploaders:
            t.join()
        self._session.close()

