"""Stream shapes a record source can have: pipe-like short reads, and read()-only objects."""

from __future__ import annotations

import io


class Trickle(io.RawIOBase):
    """A raw stream that returns at most ``step`` bytes per call, like a slow pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = memoryview(data), 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n
