"""Reading a tool's stdout pipe in large pieces: fewer system calls, wake-ups and GIL hand-offs per byte.

pg_dump writes its archive 4 KiB at a time (stdio's buffer size for a pipe), and a reader faster than it (ours,
most of the time) woke up once per write: ~38,000 ``read`` calls and ~20,000 context switches of our process for
257 MiB of dumps (``bench/logical_bench.py --case multi``), each a thread wake-up, a GIL release and re-acquisition,
and a wake-up sent by pg_dump. Here the pipe is enlarged (``F_SETPIPE_SZ``, best effort, to ``PIPE_SIZE``) and
:meth:`PipeReader.readinto` naps while less than a good share of the request is queued (``FIONREAD``), so pg_dump
writes into a pipe nobody waits on and each read takes ~100 KiB or more: ~2,000 reads and ~3,000 context switches
for the same dumps. Never a busy loop: after ``NAPS`` naps it reads what is queued, or blocks in ``poll`` until the
first byte when nothing is; the writer's end closing (``POLLHUP``: EOF, a killed tool) ends every wait at once.
"""

from __future__ import annotations

import fcntl
import io
import select
import struct
import termios
import time

F_SETPIPE_SZ = 1031  # Linux fcntl commands
F_GETPIPE_SZ = 1032
# 1 MiB, the most an unprivileged process may ask for (fs.pipe-max-size). A read naps ~1 ms at a time (``NAP``),
# and pg_dump fills 256 KiB in less than that (~300 MB/s): with a 256 KiB pipe it blocked in every nap, and its
# backend with it. On a quiet 2-core machine (2026-12-03 21:08, bench/logical_bench.py --scale 30 --repeat 3, same
# window, only this constant changed) our first backup took 1.51x raw pg_dump with 256 KiB and 1.10x with 1 MiB,
# the second 1.32x and 1.12x. The price: pipes are kernel memory counted per OS user, and past
# fs.pipe-user-pages-soft (64 MiB by default, i.e. ~60 dumps of one user running at once) the kernel refuses to
# enlarge a pipe (this reader then keeps the default 64 KiB and still coalesces) and gives that user's new pipes a
# page or two each, also other processes' (README, "Many databases").
PIPE_SIZE = 1 << 20
WANT = 256 << 10  # a read waits for this much, the whole request, or half the pipe, whichever is least
NAP = 0.001  # seconds
NAPS = 4  # naps per read at most (a slow stream is then read as it comes)
# A writer blocks once every page of the pipe is taken: at the byte capacity with pg_dump's 4 KiB writes (measured),
# a little short of it when some writes left a page part-filled. A tool this close to it counts as held.
FULL_SLACK = 16 << 10


class PipeReader(io.RawIOBase):
    """Reads the pipe behind ``source`` (a tool's buffered stdout, which stays the caller's to close) in large
    pieces; see the module docstring. Without ``F_GETPIPE_SZ`` (not Linux, not a pipe) it reads as ``source``."""

    def __init__(self, source: io.BufferedReader) -> None:
        super().__init__()
        self._src = source
        self._fd = source.fileno()
        try:
            fcntl.fcntl(self._fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe quota (fs.pipe-user-pages-soft): smaller reads, still coalesced
        try:
            size = fcntl.fcntl(self._fd, F_GETPIPE_SZ)
        except OSError:
            size = 0
        self._size = size
        self._want = min(WANT, size // 2)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._n = bytearray(4)

    def readable(self) -> bool:
        return True

    def _queued(self) -> int:
        fcntl.ioctl(self._fd, termios.FIONREAD, self._n)
        queued: int = struct.unpack("i", self._n)[0]
        return queued

    def _closed_by_writer(self) -> bool:
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in self._poll.poll(0))

    def held(self) -> bool:
        """The tool cannot write more until we read (its pipe is full, within ``FULL_SLACK``) or it closed its end
        (it exited). Never true without ``F_GETPIPE_SZ`` unless the end is closed."""
        return self._closed_by_writer() or (self._size > 0 and self._queued() >= self._size - FULL_SLACK)

    def _wait(self, n: int) -> None:
        target = min(n, self._want)
        for _ in range(NAPS):
            if self._queued() >= target or self._closed_by_writer():
                return
            time.sleep(NAP)
        if not self._queued():
            self._poll.poll()  # nothing at all: block until the first byte or EOF, as a plain read would

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._want:
            self._wait(len(b))
        return self._src.readinto1(b)
