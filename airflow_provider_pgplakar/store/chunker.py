"""Cutting record streams into chunks: content-defined (FastCDC 2020) by default, fixed blocks on request.

Content-defined cuts survive insertions (dump files shift when rows are added); fixed page-aligned blocks suit
files that change in place and never shift (PostgreSQL relation files), where CDC resynchronises poorly. Readers
need nothing special either way: a record is its list of chunk references.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

DEFAULT_CDC = {"alg": "fastcdc2020", "lib": "pyfastcdc==0.3.1", "min": 32 * 1024, "avg": 128 * 1024,
               "max": 512 * 1024, "nc": 1}
CDC_BATCH = 4 << 20  # bytes of content-defined chunks read, cut and handed on together (see Chunker.batches)
SPARE_BUFFERS = 8  # batch buffers (4 MiB each by default) a Chunker keeps for its next records (Chunker.batches)
# Bounds on the CDC sizes a config may ask for (checked on every read of config): at least 4 KiB (tiny chunks
# explode the index), at most what pyfastcdc accepts for min/avg and the 8 MiB fixed-block cap for max.
CDC_BOUNDS = {"min": (4096, 1024 * 1024), "avg": (4096, 4 * 1024 * 1024), "max": (4096, 8 * 1024 * 1024)}


@dataclass(frozen=True)
class Chunking:
    """``Chunking()`` = the store's content-defined chunker; ``Chunking.fixed(n)`` = n-byte blocks."""

    block_size: int = 0

    @classmethod
    def fixed(cls, block_size: int = 128 * 1024) -> Chunking:
        if not 4096 <= block_size <= 8 * 1024 * 1024:
            raise ValueError(f"fixed block size must be between 4 KiB and 8 MiB, got {block_size}")
        return cls(block_size)


def read_full(stream: BinaryIO, buf: bytearray) -> int:
    """Fill ``buf`` from ``stream`` (``readinto`` when it has one); fewer bytes only at EOF."""
    return read_full_into(stream, memoryview(buf))


def read_full_into(stream: BinaryIO, view: memoryview) -> int:
    """:func:`read_full` into a writable view."""
    filled = 0
    readinto = getattr(stream, "readinto", None)
    while filled < len(view):
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            data = stream.read(len(view) - filled)
            n = len(data)
            view[filled : filled + n] = data
        if not n:
            break
        filled += n
    return filled


def _unused(buf: bytearray) -> bool:
    """True when no view of ``buf`` is alive: CPython refuses to resize a bytearray with live exports."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


def _fixed_chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    buf = bytearray(size)
    while filled := read_full(stream, buf):
        yield bytes(buf[:filled])
        if filled < size:
            return


class Chunker:
    def __init__(self, params: dict[str, Any], seed: int) -> None:
        from pyfastcdc.cy import FastCDC  # the compiled extension; the pure-Python fallback is 300x slower

        if params.get("alg") != "fastcdc2020":
            raise ValueError(f"unsupported chunker {params.get('alg')!r}")
        self._cdc = FastCDC(
            params["avg"], min_size=params["min"], max_size=params["max"],
            normalized_chunking=params["nc"], seed=seed,
        )
        self._max = int(params["max"])
        self._spare: list[bytearray] = []  # buffers of finished records, for the next ones (any thread)
        self._lock = threading.Lock()

    def chunks(self, stream: BinaryIO, chunking: Chunking = Chunking()) -> Iterator[bytes]:
        """Yield the stream's chunks as independent ``bytes``."""
        if chunking.block_size:
            yield from _fixed_chunks(stream, chunking.block_size)
            return
        for batch in self.batches(stream):
            for view in batch:
                yield bytes(view)

    def batches(self, stream: BinaryIO, batch_bytes: int = CDC_BATCH) -> Iterator[list[memoryview]]:
        """Yield the stream's content-defined chunks as lists of read-only views, about ``batch_bytes`` per list.

        Zero-copy: the views point into a batch buffer that is not written again while any view of it is alive,
        so they stay valid as long as the caller holds them; a buffer is reused once none is (which saves the
        page faults and zeroing of a fresh 4 MiB buffer per batch). pyfastcdc's ``cut_stream`` reads in small
        pieces into one reused 1 MiB buffer, moves its tail down after nearly every chunk and so needed a copy per
        chunk; here each byte is read once into its batch buffer (a tail of less than ``max`` bytes is carried
        over to the next one). Cut points are those of ``cut_stream``: a chunk is cut only where at least ``max``
        bytes follow its start in the buffer, or at the end of the stream (the golden tests pin this).

        A finished record's buffers are kept (up to ``SPARE_BUFFERS``) for the next records, from any thread, and
        taken again only once no view of them is alive: a fresh 4 MiB buffer costs its zeroing, a page fault per
        page and an ``munmap`` when freed (25 to 30 of them for the 4 dumps of ``bench/logical_bench.py --case
        multi``, 10 to 14 with the spares).
        """
        size = max(batch_bytes, 2 * self._max)
        held: list[bytearray] = []  # this record's buffers; at most as many as batches in flight, plus one
        try:
            yield from self._cut(stream, size, held)
        finally:
            self._keep(held)

    def _take(self, size: int) -> bytearray:
        with self._lock:
            for i, b in enumerate(self._spare):
                if len(b) == size and _unused(b):
                    return self._spare.pop(i)
        return bytearray(size)

    def _keep(self, held: list[bytearray]) -> None:
        with self._lock:
            self._spare.extend(held[: max(0, SPARE_BUFFERS - len(self._spare))])

    def _cut(self, stream: BinaryIO, size: int, held: list[bytearray]) -> Iterator[list[memoryview]]:
        tail = memoryview(b"")
        eof = False
        while not eof:
            buf = next((b for b in held if _unused(b)), None)
            if buf is None:
                buf = self._take(size)
                held.append(buf)
            carried = len(tail)
            buf[:carried] = tail
            tail = memoryview(b"")
            filled = carried + read_full_into(stream, memoryview(buf)[carried:])
            eof = filled < size
            if not filled:
                return
            view = memoryview(buf).toreadonly()[:filled]
            out, carry_from = self._split(view, eof)
            tail = view[carry_from:]
            del view
            if out:
                yield out
            del out  # this frame keeps no view of a batch it handed on while it reads the next (see batches)

    def _split(self, view: memoryview, eof: bool) -> tuple[list[memoryview], int]:
        """The chunks cut from ``view`` and where its carried-over tail starts (a function of its own, so that
        no loop variable outlives the cut holding a view of the buffer)."""
        out: list[memoryview] = []
        filled = len(view)
        for c in self._cdc.cut_buf(view):
            if not eof and filled - c.offset < self._max:
                return out, c.offset  # cut without the whole window ahead: recut in the next buffer
            out.append(c.data)
        return out, filled
