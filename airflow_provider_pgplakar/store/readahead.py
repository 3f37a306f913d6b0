"""Overlap chunking, the record's digest and the caller's work (handing batches to the encode pool) on threads.

Measured on the 2-core CI machine: with everything on the caller's thread, chunking + SHA-256 + BLAKE3 capped an
identical (fully deduplicated) re-backup at ~290 MB/s. pyfastcdc's cut, file reads and hashlib all release the
GIL, so a reader thread (chunking) and a hasher thread (the record digest) run beside the caller. Items are batches of
chunks (:meth:`Chunker.batches`, ~4 MiB each), so the queues are touched a few times per 4 MiB instead of several
times per chunk; they are bounded (``DEPTH`` batches), so memory stays constant whatever the stream size.

A batch's views keep its whole buffer alive, so no thread keeps a batch it has handed on (no loop variable left
bound while waiting for the next one): at most ``1 + 2 × DEPTH + 1`` batches are alive here, the one being cut
(or put), ``DEPTH`` in each queue and the one being hashed; the queues overlap when the digest keeps up.
``DEPTH = 1``: with 4 MiB batches one queued batch keeps the caller busy (2 instead of 1 gave no faster ingest in
an A/B on 2 cores, and 8 MiB more peak RSS; README "The store").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

DEPTH = 1
_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Readahead:
    """Iterate ``batches`` of chunks (produced on a reader thread); ``digest`` is updated with every chunk, in
    order, on a hasher thread."""

    def __init__(self, batches: Iterator[list[memoryview]], digest: Any) -> None:
        self._chunks = batches
        self._digest = digest
        self._out: queue.Queue[Any] = queue.Queue(DEPTH)
        self._hash_q: queue.Queue[Any] = queue.Queue(DEPTH)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="pgplakar-chunker", daemon=True)
        self._hasher = threading.Thread(target=self._hash, name="pgplakar-digest", daemon=True)
        self._reader.start()
        self._hasher.start()

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for batch in self._chunks:
                if not (self._put(self._hash_q, batch) and self._put(self._out, batch)):
                    return
                del batch  # not kept alive while the next one is cut
            self._put(self._hash_q, _END)
            self._put(self._out, _END)
        except BaseException as e:  # a failing source (pipe, file): re-raised on the caller's thread
            self._put(self._hash_q, _END)
            self._put(self._out, _Failed(e))

    def _hash(self) -> None:
        while True:
            try:
                item = self._hash_q.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _END:
                return
            for chunk in item:
                self._digest.update(chunk)
            del item, chunk  # not kept alive while waiting for the next batch

    def __iter__(self) -> Iterator[list[memoryview]]:
        try:
            while True:
                item = self._out.get()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
                del item  # not kept alive while waiting for the next batch
            self._hasher.join()
            self._reader.join()
        finally:
            self.close()

    def close(self) -> None:
        """Stop both threads (also when the caller stops early); safe to call twice."""
        if self._reader.is_alive() or self._hasher.is_alive():
            self._stop.set()
            for q in (self._out, self._hash_q):
                while True:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        break
            self._reader.join()
            self._hasher.join()
