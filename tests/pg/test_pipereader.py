"""pg/pipereader.py: a tool's stdout pipe read in large pieces, without losing a byte, hanging past EOF or spinning.

Real pipes (``os.pipe``) and a writer thread writing 4 KiB at a time, as pg_dump does.
"""

from __future__ import annotations

import fcntl
import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from airflow_provider_pgplakar.pg import pipereader
from airflow_provider_pgplakar.pg.pipereader import F_GETPIPE_SZ, PipeReader
from airflow_provider_pgplakar.store.chunker import read_full


@contextmanager
def pipe() -> Iterator[tuple[io.BufferedReader, int]]:
    r, w = os.pipe()
    src = os.fdopen(r, "rb")  # buffered, like Popen's stdout
    try:
        yield src, w
    finally:
        src.close()
        try:
            os.close(w)
        except OSError:
            pass


def _write(w: int, data: bytes, piece: int = 4096, pause: float = 0.0, close: bool = True) -> None:
    for i in range(0, len(data), piece):
        os.write(w, data[i : i + piece])
        if pause:
            time.sleep(pause)
    if close:
        os.close(w)


def test_pipe_is_enlarged() -> None:
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    with pipe() as (src, _w):
        PipeReader(src)
        assert fcntl.fcntl(src.fileno(), F_GETPIPE_SZ) >= min(pipereader.PIPE_SIZE, limit)


def test_a_pipe_the_kernel_will_not_enlarge_is_still_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the OS user's pipe quota (fs.pipe-user-pages-soft, e.g. many dumps of one user at once) F_SETPIPE_SZ
    fails with EPERM: the reader keeps the kernel's pipe, coalesces within it, and loses nothing."""
    import errno
    import types

    def refusing(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == pipereader.F_SETPIPE_SZ:
            raise OSError(errno.EPERM, "Operation not permitted")
        return fcntl.fcntl(fd, cmd, arg)

    monkeypatch.setattr(pipereader, "fcntl", types.SimpleNamespace(fcntl=refusing, ioctl=fcntl.ioctl))
    data = os.urandom(3 << 20)
    with pipe() as (src, w):
        default = fcntl.fcntl(src.fileno(), F_GETPIPE_SZ)
        reader = PipeReader(src)
        assert fcntl.fcntl(src.fileno(), F_GETPIPE_SZ) == default < pipereader.PIPE_SIZE
        writer = threading.Thread(target=_write, args=(w, data))
        writer.start()
        buf = bytearray(len(data) + 1)
        n = read_full(reader, buf)
        writer.join()
    assert n == len(data) and buf[:n] == data


def test_a_trickle_of_small_writes_is_read_in_large_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 writes of 4 KiB, a little apart: one read takes them all (a plain read returns each write alone)."""
    monkeypatch.setattr(pipereader, "NAPS", 2000)  # up to 2 s: the writer's pace cannot make the test flaky
    data = os.urandom(min(pipereader.WANT, pipereader.PIPE_SIZE // 2))
    with pipe() as (src, w):
        reader = PipeReader(src)
        writer = threading.Thread(target=_write, args=(w, data), kwargs={"pause": 0.0002, "close": False})
        writer.start()
        buf = bytearray(4 << 20)
        n = reader.readinto(buf)
        writer.join()
        assert n == len(data) and buf[:n] == data
        os.close(w)
        assert reader.readinto(buf) == 0


def test_everything_arrives_in_order_and_eof_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of odd-sized writes with a short one at the end: every byte, in order, and the reads after the
    writer closed its end return at once (no naps at EOF)."""
    data = os.urandom(3 * (1 << 20) + 12345)
    with pipe() as (src, w):
        reader = PipeReader(src)
        writer = threading.Thread(target=_write, args=(w, data), kwargs={"piece": 4093})
        writer.start()
        out = bytearray()
        buf = bytearray(1 << 20)
        while n := read_full(reader, buf):
            out += buf[:n]
        writer.join()
        assert out == data
        monkeypatch.setattr(pipereader, "NAP", 5.0)  # a nap now would take seconds
        t0 = time.monotonic()
        assert reader.readinto(buf) == 0
        assert time.monotonic() - t0 < 1.0


def test_a_short_tail_before_eof_is_returned_without_napping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipereader, "NAP", 5.0)
    with pipe() as (src, w):
        reader = PipeReader(src)
        _write(w, b"tail" * 10)
        t0 = time.monotonic()
        buf = bytearray(1 << 20)
        assert reader.readinto(buf) == 40 and buf[:40] == b"tail" * 10
        assert reader.readinto(buf) == 0
        assert time.monotonic() - t0 < 1.0


def test_an_idle_writer_is_waited_for_without_spinning() -> None:
    """Nothing to read for a while (pg_dump waiting on a lock): the reader blocks in poll, burning no CPU."""
    with pipe() as (src, w):
        reader = PipeReader(src)
        timer = threading.Timer(0.5, _write, args=(w, b"late data"))
        timer.start()
        cpu0, t0 = time.thread_time(), time.monotonic()
        buf = bytearray(1 << 20)
        n = reader.readinto(buf)
        cpu, wall = time.thread_time() - cpu0, time.monotonic() - t0
        timer.join()
        assert buf[:n] == b"late data"
        assert wall >= 0.4
        assert cpu < 0.1


def test_bytes_buffered_by_a_peek_come_first() -> None:
    """The dump path peeks one byte before reading (to tell "failed before any output" apart)."""
    with pipe() as (src, w):
        _write(w, b"abcdef")
        assert src.peek(1)[:1] == b"a"
        reader = PipeReader(src)
        buf = bytearray(100)
        assert read_full(reader, buf) == 6 and buf[:6] == b"abcdef"
