"""The base backup's reader thread (``pg/basebackup.py``, ``_Receiver``) on a scripted connection: it stops when the
consumer gives up, whether it is blocked on its full queue or waiting on the socket; its read-ahead is bounded; a
failure inside it (a damaged stream, an unexpected message, a truncated or over-long compressed archive) is raised
in the consumer with the message the old single-threaded reader gave, again on every later call; and no thread is
left running. The same paths against a real server: ``tests/physical/test_reader_thread.py``.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import lz4.frame
import pytest

from airflow_provider_pgplakar.pg.basebackup import PIECE_BYTES, QUEUE_ITEMS, BaseBackupError, _Receiver
from airflow_provider_pgplakar.pg.tarstream import TarReader


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgplakar-basebackup" and t.is_alive()]


class ScriptedConn:
    """The few libpq calls the reader thread makes, over a list of CopyData messages. After the last one the COPY
    either ends (``then="end"``) or the server goes quiet (``"wait"``: the socket never becomes readable)."""

    def __init__(self, messages: Iterable[bytes], then: str = "end") -> None:
        self._messages: Iterator[bytes] = iter(messages)
        self.then = then
        self.sent = 0  # bytes handed to the reader
        self._sock, self._peer = socket.socketpair()
        self.socket = self._sock.fileno()

    def get_copy_data(self, async_: int) -> tuple[int, bytes]:
        msg = next(self._messages, None)
        if msg is None:
            return (0, b"") if self.then == "wait" else (-1, b"")
        self.sent += len(msg)
        return len(msg), msg

    def consume_input(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def is_busy(self) -> bool:
        return False

    def get_result(self) -> None:
        return None

    def close(self) -> None:
        self._sock.close()
        self._peer.close()


def archive_header(name: str) -> bytes:
    return b"n" + name.encode() + b"\0\0"


def data_messages(data: bytes, size: int = 30_000) -> list[bytes]:
    return [b"d" + data[i : i + size] for i in range(0, len(data), size)]


def tar_member(name: str, content: bytes) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()[: 512 + len(content) + (-len(content) % 512)]  # no terminator, as the server sends it


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while reader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader_threads() == [], "a reader thread outlived its test"


def test_consumer_giving_up_stops_a_reader_blocked_on_its_full_queue() -> None:
    """An endless archive: the reader fills its queue, then waits; close() ends it, and it read ahead only a few MiB."""
    conn = ScriptedConn(itertools.chain([archive_header("base.tar")], itertools.repeat(b"d" + bytes(65536))))
    rx = _Receiver(conn, None)  # type: ignore[arg-type]
    try:
        assert rx.next_event()[:2] == ("archive", "base.tar")
        assert rx.next_event()[0] == "data"
        deadline = time.monotonic() + 10
        while conn.sent < (QUEUE_ITEMS + 1) * PIECE_BYTES and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # it would go on reading here if the queue were not bounded
        assert (QUEUE_ITEMS + 1) * PIECE_BYTES <= conn.sent <= (2 * QUEUE_ITEMS + 4) * PIECE_BYTES
        started = time.monotonic()
        rx.close()
        assert time.monotonic() - started < 2 and not rx.thread.is_alive()
    finally:
        rx.close()
        conn.close()


def test_consumer_giving_up_stops_a_reader_waiting_on_the_socket() -> None:
    conn = ScriptedConn([archive_header("base.tar"), b"d" + tar_member("PG_VERSION", b"15\n")], then="wait")
    rx = _Receiver(conn, None)  # type: ignore[arg-type]
    try:
        assert rx.next_event()[:2] == ("archive", "base.tar")
        time.sleep(0.2)  # the reader now sits in select() on a socket that stays quiet, its batch not yet full
        assert rx.thread.is_alive()
        started = time.monotonic()
        rx.close()
        assert time.monotonic() - started < 2 and not rx.thread.is_alive()
    finally:
        conn.close()


def test_a_failure_in_the_reader_is_raised_in_the_consumer_every_time() -> None:
    conn = ScriptedConn([archive_header("base.tar"), b"d" + tar_member("PG_VERSION", b"15\n"), b"x-what"])
    rx = _Receiver(conn, None)  # type: ignore[arg-type]
    try:
        assert rx.next_event()[0] == "archive"
        assert rx.next_event()[0] == "data"
        for _ in range(2):
            with pytest.raises(BaseBackupError, match=r"unexpected CopyData message type b'x' in the base backup "
                                                      r"stream"):
                rx.next_event()
        assert not rx.thread.is_alive()
    finally:
        rx.close()
        conn.close()


def _read_archive(messages: list[bytes], method: str | None) -> bytes:
    conn = ScriptedConn(messages)
    rx = _Receiver(conn, method)  # type: ignore[arg-type]
    from airflow_provider_pgplakar.pg.basebackup import ReceivedArchive

    try:
        assert rx.next_event()[0] == "archive"
        stream = ReceivedArchive(rx)
        out = bytearray()
        while piece := stream.readview(100_000):
            out += piece
        assert rx.next_event() == ("end",)
        return bytes(out)
    finally:
        rx.close()
        conn.close()


@pytest.mark.parametrize("method", [None, "lz4"])
def test_archive_bytes_arrive_whole_through_the_thread(method: str | None) -> None:
    tar = tar_member("base/1/1259", bytes(range(256)) * 40_000) + tar_member("PG_VERSION", b"15\n")
    wire = lz4.frame.compress(tar) if method else tar
    assert _read_archive([archive_header("base.tar" + (".lz4" if method else "")), *data_messages(wire)],
                         method) == tar


def test_truncated_and_overlong_compressed_archives_fail_with_the_same_messages() -> None:
    tar = tar_member("base/1/1259", bytes(range(256)) * 40_000)
    wire = lz4.frame.compress(tar)
    with pytest.raises(BaseBackupError, match="the lz4-compressed base backup stream ended mid-frame"):
        _read_archive([archive_header("base.tar.lz4"), *data_messages(wire[:-5])], "lz4")
    with pytest.raises(BaseBackupError, match="data after the end of the lz4-compressed archive"):
        _read_archive([archive_header("base.tar.lz4"), *data_messages(wire + b"more")], "lz4")
    with pytest.raises(BaseBackupError, match="decompressing the lz4 base backup stream failed"):
        _read_archive([archive_header("base.tar.lz4"), b"d" + b"not an lz4 frame" * 100], "lz4")


def test_tar_blocks_are_views_of_the_received_buffers() -> None:
    """read_block hands the store views of the thread's ~1 MiB buffers (no copy) unless a block straddles two."""
    content = bytes(range(256)) * 16_384  # 4 MiB
    tar = tar_member("base/1/16384", content)
    conn = ScriptedConn([archive_header("base.tar"), *data_messages(tar)])
    rx = _Receiver(conn, None)  # type: ignore[arg-type]
    from airflow_provider_pgplakar.pg.basebackup import ReceivedArchive

    try:
        rx.next_event()
        reader = TarReader(ReceivedArchive(rx))
        (member,) = list(itertools.islice(iter(reader), 1))
        assert member.size == len(content)
        blocks = []
        while block := reader.read_block(256 << 10):
            blocks.append(block)
        assert b"".join(bytes(b) for b in blocks) == content
        views = sum(isinstance(b, memoryview) for b in blocks)
        assert views >= len(blocks) // 2, f"only {views} of {len(blocks)} blocks were views"
    finally:
        rx.close()
        conn.close()


def test_a_backup_manifest_over_the_bound_fails_the_backup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest is collected in memory: a (broken or hostile) server sending more than MANIFEST_MAX (1 GiB; here
    1 MiB) fails the backup with one line, and the reader stops reading there instead of growing without end."""
    from airflow_provider_pgplakar.pg import basebackup

    monkeypatch.setattr(basebackup, "MANIFEST_MAX", 1 << 20)
    manifest = [b"d" + bytes(65536)] * 100  # 6.4 MiB
    conn = ScriptedConn([archive_header("base.tar"), b"d" + tar_member("PG_VERSION", b"15\n"), b"m", *manifest])
    rx = _Receiver(conn, None)  # type: ignore[arg-type]
    try:
        assert rx.next_event()[:2] == ("archive", "base.tar")
        assert rx.next_event()[0] == "data"
        with pytest.raises(BaseBackupError) as ei:
            rx.next_event()
        assert str(ei.value).startswith("the server's backup_manifest is over 1048576 bytes") and "\n" not in str(
            ei.value)
        assert conn.sent < (1 << 20) + 2 * 65537 + 1024
        assert not rx.thread.is_alive()
    finally:
        rx.close()
        conn.close()
