"""The write pipeline: dedup → compress (thread pool) → seal into packs → upload (threads), with backpressure.

Threads and why: zstd, AES-GCM, BLAKE3 and hashlib all release the GIL, so compression runs in a pool while the
caller keeps chunking and hashing. Memory stays bounded whatever the data size: at most ``2 × workers + 2``
chunks are in flight (a semaphore the caller blocks on), at most two open packs, and at most ``UPLOAD_QUEUE``
finished packs wait for upload. Blob IDs seen in this session live in a SQLite file, not in RAM.

``verify_uploads`` (default on) round-trips every blob's compression and sealing in the worker before it enters a
pack — restic's "extra verify", done per blob where the plaintext is still at hand instead of re-reading whole
packs (which cost ~25 % of ingest CPU here, this ~5 %). It catches a faulty library or RAM before it is stored.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .backend import Backend
from .crypto import Keys
from .errors import AlreadyExists, IntegrityError, StoreError
from .failpoints import failpoint
from .index import IndexCache
from .pack import CODEC_RAW, CODEC_ZSTD, DATA, PackBuilder, decompressor, pack_object_name

log = logging.getLogger(__name__)

UPLOAD_QUEUE = 2
PACK_HARD_MAX = 32 * 1024 * 1024


@dataclass
class SinkStats:
    chunks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    packs: int = 0


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

    def add(self, blob_id: bytes) -> bool:
        """True when ``blob_id`` is new to this session."""
        try:
            self.db.execute("INSERT INTO s VALUES (?)", (blob_id,))
        except sqlite3.IntegrityError:
            return False
        return True

    def close(self) -> None:
        self.db.close()
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
        self.pack_target = pack_target
        self.verify_uploads = verify_uploads
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.stats = SinkStats()
        self.packs_written: list[dict[str, Any]] = []
        self._shared = _Shared()
        self._slots = threading.BoundedSemaphore(2 * self.workers + 2)
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

    def add(self, blob_type: int, data: bytes) -> bytes:
        """Store ``data`` unless already present; return its blob ID. Blocks when the pipeline is full."""
        self._raise_if_failed()
        blob_id = self.keys.blob_id(data)
        self.stats.chunks += 1
        if self.cache.has_blob(blob_id) or not self._session.add(blob_id):
            return blob_id
        self.stats.new_chunks += 1
        self.stats.new_raw_bytes += len(data)
        self._slots.acquire()
        try:
            self._pool.submit(self._encode, blob_type, blob_id, data)
        except BaseException:
            self._slots.release()
            raise
        return blob_id

    # -- encode pool -------------------------------------------------------------------------------------------
    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "zc", None)
        if c is None:
            c = self._local.zc = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        return c

    def _encode(self, blob_type: int, blob_id: bytes, data: bytes) -> None:
        try:
            if self._shared.error is not None:
                return
            z = self._compressor().compress(data) if self.level > 0 else data
            codec, payload = (CODEC_ZSTD, z) if len(z) < 0.97 * len(data) else (CODEC_RAW, data)
            if self.verify_uploads and codec == CODEC_ZSTD and decompressor().decompress(z) != data:
                raise IntegrityError(f"blob {blob_id.hex()[:16]} did not survive compression: refusing to store it")
            kind = "data" if blob_type == DATA else "tree"
            full = None
            with self._shared.lock:
                pb = self._open[kind]
                if pb is None:
                    pb = self._open[kind] = PackBuilder(self.keys, kind)
                pb.add(blob_type, blob_id, codec, payload, len(data), verify=self.verify_uploads)
                self.stats.new_stored_bytes += len(payload)
                if len(pb) >= self.pack_target:
                    full, self._open[kind] = pb, None
            if full is not None:
                self._enqueue(full)
        except BaseException as e:
            self._fail(e)
        finally:
            self._slots.release()

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
                log.error("pipeline failure: %s", e)

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
                    self.backend.put(pack_object_name(pack_id), data)
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

