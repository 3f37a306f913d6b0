"""Cutting record streams into chunks: content-defined (FastCDC 2020) by default, fixed blocks on request.

Content-defined cuts survive insertions (dump files shift when rows are added); fixed page-aligned blocks suit
files that change in place and never shift (PostgreSQL relation files), where CDC resynchronises poorly. Readers
need nothing special either way: a record is its list of chunk references.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

DEFAULT_CDC = {"alg": "fastcdc2020", "lib": "pyfastcdc==0.3.1", "min": 32 * 1024, "avg": 128 * 1024,
               "max": 512 * 1024, "nc": 1}
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
    view = memoryview(buf)
    filled = 0
    readinto = getattr(stream, "readinto", None)
    while filled < len(buf):
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            data = stream.read(len(buf) - filled)
            n = len(data)
            view[filled : filled + n] = data
        if not n:
            break
        filled += n
    return filled


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

    def chunks(self, stream: BinaryIO, chunking: Chunking = Chunking()) -> Iterator[bytes]:
        """Yield the stream's chunks as independent ``bytes`` (pyfastcdc reuses its buffer, so we copy)."""
        if chunking.block_size:
            yield from _fixed_chunks(stream, chunking.block_size)
            return
        for c in self._cdc.cut_stream(stream):
            yield bytes(c.data)
