"""Decompressing a server-compressed base-backup archive in capped steps: at most about 1 MiB of output per call.

A compressed archive comes from the server; a hostile or broken one can send a few bytes that expand to gigabytes
(zstd's RLE blocks expand 32768-fold). One-shot ``decompress(piece)`` calls would materialise all of it at once.

- lz4: ``LZ4FrameDecompressor.decompress(data, max_length)`` caps each step itself.
- zstd: python-zstandard's ``decompressobj`` has no output cap, so the compressed input is walked block by block
  (frame header, 3-byte block headers, checksum: RFC 8878 §3.1.1) and fed at most ``BLOCKS_PER_STEP`` whole blocks
  at a time; a block never decompresses to more than 128 KiB. The walk also says when the frame really ended, which
  a truncated stream must not pass for.
"""

from __future__ import annotations

from typing import Any

STEP_MAX = 1 << 20  # output bytes per step (lz4) / 8 blocks of at most 128 KiB (zstd)
BLOCKS_PER_STEP = 8
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class DecompressError(ValueError):
    """The compressed stream is damaged, truncated, or followed by extra data."""


class Lz4Steps:
    """lz4 frames through python-lz4's low-level ``decompress_chunk`` on a view of the fed piece: its
    ``LZ4FrameDecompressor`` copies the input of every call (``memoryview(data).tobytes()``, and the unread rest
    again), which the reader thread does not need to pay for."""

    def __init__(self) -> None:
        import lz4.frame

        self._decompress: Any = lz4.frame.decompress_chunk
        self._ctx = lz4.frame.create_decompression_context()
        self._pending = memoryview(b"")
        self._full = False  # the last step filled STEP_MAX: lz4 may hold more output without new input
        self.done = False

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        if self.done:
            raise DecompressError("data after the end of the compressed archive")
        piece = memoryview(piece).cast("B")
        # lz4 takes what it can of each input (headers go to its own buffer), so nothing should be left over
        self._pending = memoryview(self._pending.tobytes() + piece.tobytes()) if self._pending else piece

    def step(self) -> bytes | None:
        """Up to STEP_MAX bytes of output; None when more input is needed (or the frame ended)."""
        while not self.done and (self._pending or self._full):
            try:
                out: bytes
                out, used, eof = self._decompress(self._ctx, self._pending, max_length=STEP_MAX)
            except RuntimeError as e:
                raise DecompressError(str(e)) from None
            self._pending = self._pending[used:]
            self._full = len(out) >= STEP_MAX
            if eof:
                self.done = True
                if self._pending:
                    raise DecompressError("data after the end of the compressed archive")
            if out:
                return out
            if not used:
                break
        return None


class ZstdSteps:
    def __init__(self) -> None:
        import zstandard

        self._zerr = zstandard.ZstdError
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._in = bytearray()
        self._state = "frame"  # next unit at the start of _in: frame header, block, checksum; or done
        self._checksum = False
        self.done = False

    def feed(self, piece: bytes | memoryview) -> None:
        if self.done:
            raise DecompressError("data after the end of the compressed archive")
        self._in += piece

    def _unit(self, at: int) -> int:
        """Length of the next whole unit at ``_in[at:]`` (0 when it is incomplete); advances the walk state."""
        data, have = self._in, len(self._in) - at
        if self._state == "frame":
            if have < 5:
                return 0
            if data[at : at + 4] != _ZSTD_MAGIC:
                raise DecompressError("not a zstd frame")
            fhd = data[at + 4]
            single = fhd & 0x20
            size = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + (1 if single else 0, 2, 4, 8)[fhd >> 6]
            if have < size:
                return 0
            self._checksum = bool(fhd & 0x04)
            self._state = "block"
            return size
        if self._state == "block":
            if have < 3:
                return 0
            header = int.from_bytes(data[at : at + 3], "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == 3:
                raise DecompressError("reserved zstd block type")
            length = 3 + (1 if kind == 1 else size)
            if have < length:
                return 0
            if header & 1:
                self._state = "checksum" if self._checksum else "done"
            return length
        if self._state == "checksum":
            if have < 4:
                return 0
            self._state = "done"
            return 4
        return 0

    def step(self) -> bytes | None:
        """The output of up to BLOCKS_PER_STEP whole blocks (possibly empty); None when more input is needed."""
        n = blocks = 0
        while blocks < BLOCKS_PER_STEP and self._state != "done":
            unit = self._unit(n)
            if not unit:
                break
            n += unit
            blocks += 1
        if self._state == "done" and len(self._in) > n:
            raise DecompressError("data after the end of the compressed archive")
        if not n:
            return None
        view = memoryview(self._in)
        part = view[:n]
        try:
            out = self._dec.decompress(part)
        except self._zerr as e:
            raise DecompressError(str(e)) from None
        finally:
            part.release()
            view.release()
        del self._in[:n]
        if self._state == "done":
            if not self._dec.eof:
                raise DecompressError("the zstd frame did not end where its last block said")
            self.done = True
        return out


def steps(method: str) -> Lz4Steps | ZstdSteps:
    return Lz4Steps() if method == "lz4" else ZstdSteps()
