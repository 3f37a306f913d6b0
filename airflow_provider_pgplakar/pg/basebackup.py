"""``BASE_BACKUP`` over the replication protocol, spoken directly through psycopg's libpq layer (PostgreSQL 15+).

Why not the ``pg_basebackup`` binary: with tar to stdout it writes one tablespace only ("can only write single
tablespace to stdout") and named pipes cannot stand in for its output files (it refuses a non-empty target
directory). The protocol gives every archive as a stream, so nothing is staged on disk (docs/architecture.md,
"(c) Physical backup", follows a backup through it).

One replication connection does everything, in this order:

1. ``CREATE_REPLICATION_SLOT <name> TEMPORARY PHYSICAL RESERVE_WAL``: the slot pins WAL from now until the
   connection closes, so the segments the backup needs cannot be recycled while it runs (the slot vanishes with
   the connection, also when we crash);
2. ``BASE_BACKUP (... WAL true ...)``: start LSN, the tablespace list, then one COPY OUT carrying every archive
   (``<oid>.tar`` per user tablespace, then ``base.tar`` with the WAL needed for consistency under ``pg_wal/``),
   then the server's ``backup_manifest``; then the end LSN and a command-complete. The backup succeeded only when
   that last result arrived: :meth:`BaseBackupStream.finish` checks it.
   With ``COMPRESSION 'lz4'`` (or ``'zstd'``) each archive arrives as one compressed frame named ``*.tar.lz4``
   (``*.tar.zst``) and :class:`Decompressing` turns it back into tar bytes; the manifest stays uncompressed.

Every wait is on the socket with ``select`` (libpq's non-blocking calls), never inside a blocking libpq call: the
compiled psycopg calls libpq with the GIL held, which would freeze the store's upload threads for the whole of a
spread checkpoint. TCP keepalives are on so a vanished server fails the backup instead of hanging it.

Two threads share the stream (issue 13): a reader thread (:class:`_Receiver`) owns the connection from the start of
the COPY to its end: it waits on the socket, takes the CopyData messages, decompresses (capped steps, see
``pg/decompress.py``; compressed messages are joined to ~256 KiB first so that each step gives its full ~1 MiB) and
hands the tar bytes over in batches of ~1 MiB through a queue of :data:`QUEUE_ITEMS` (at most ~6 MiB ahead of the
consumer). The caller's thread parses tar members and feeds the store, taking relation blocks as views of those
buffers (:meth:`_Pieces.readview`, no copy). Measured on pgbench scale 50 before the split: the one thread doing
both was on CPU 85 % of the backup, a third of it in lz4 and copies, while the store's two encode workers were busy
37 %; after it, main 0.50 and reader 0.53 CPU s where the one thread spent 1.02 (README, "Reader thread"), and the
encode pool is the critical path. Any failure of the reader thread is raised unchanged in the caller (same
exception, same message); a caller that fails or is cancelled stops the thread (:meth:`BaseBackupStream.close`, also
run by :meth:`ReplicationConnection.close`): it wakes from its socket wait through a pipe and from its full queue,
and is joined before the connection closes.

CopyData framing on PostgreSQL 15+: each message starts with a type byte: ``n`` new archive (NUL-terminated name and
tablespace location), ``d`` archive or manifest bytes, ``p`` progress (int64 bytes so far), ``m`` the manifest
follows. Older servers frame the stream differently (one COPY OUT per tablespace, no type bytes); they are refused
with a clear message rather than supported by untested code.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import queue
import re
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from . import PgError
from .connect import PgConnectError, connect
from .decompress import DecompressError
from .decompress import steps as decompress_steps
from .options import ConnOptions
from .process import check_cancelled, track_connection
from .secrets import SslFiles

log = logging.getLogger(__name__)

__all__ = [
    "MIN_SERVER_VERSION",
    "Archive",
    "BaseBackupError",
    "BaseBackupStream",
    "CompressionUnsupported",
    "ReplicationConnection",
    "ReplicationRefused",
    "Tablespace",
]

MIN_SERVER_VERSION = 150000
# BASE_BACKUP's COMPRESSION methods we can read, and the suffix the server gives the archive names.
COMPRESSION_SUFFIX = {"lz4": ".lz4", "zstd": ".zst"}
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 6}
_LSN_RE = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")


class BaseBackupError(PgError):
    """The replication connection, the slot or ``BASE_BACKUP`` failed; nothing may be committed."""


class CompressionUnsupported(BaseBackupError):
    """The server refused the COMPRESSION asked for (a build without that method); no backup was started."""


class ReplicationRefused(BaseBackupError):
    """The server refused the replication connection; the message says what to change on the server."""


_PG_HBA_HINT = (
    "the server's pg_hba.conf needs a replication line for this user and client address, e.g. "
    "'host replication {user} <client-address>/32 scram-sha-256' (the keyword 'replication' is required: "
    "'all' does not match replication connections), then SELECT pg_reload_conf()"
)
_ROLE_HINT = "the user needs the REPLICATION privilege: ALTER ROLE {user} REPLICATION (or use a superuser)"
# (regex over the server's reason, hint). English messages; the SQLSTATE check below covers translated ones.
_REFUSALS = (
    (re.compile(r"no pg_hba\.conf entry for replication connection", re.I), _PG_HBA_HINT),
    (re.compile(r"must be superuser or replication role|permission denied to start WAL sender|"
                r"REPLICATION attribute", re.I), _ROLE_HINT),
    (re.compile(r"exceeds max_wal_senders|max_wal_senders", re.I),
     "the server has no free WAL sender: raise max_wal_senders (needs a restart) or wait for other replication "
     "clients to finish"),
)


@dataclass(frozen=True)
class Tablespace:
    """One row of BASE_BACKUP's tablespace list; the main data directory has ``oid`` None."""

    oid: int | None
    location: str | None
    size_kb: int | None


def _refusal(exc: PgConnectError, user: str) -> BaseBackupError:
    text = str(exc)
    for pattern, hint in _REFUSALS:
        if pattern.search(text):
            return ReplicationRefused(f"replication connection refused: {text}; {hint.format(user=user)}")
    if exc.sqlstate == "42501":
        return ReplicationRefused(f"replication connection refused: {text}; {_ROLE_HINT.format(user=user)}")
    if exc.sqlstate == "28000" and "replication" in text.lower():
        return ReplicationRefused(f"replication connection refused: {text}; {_PG_HBA_HINT.format(user=user)}")
    return BaseBackupError(f"replication connection failed: {text}")


def _server_error(what: str, message: str) -> BaseBackupError:
    text = " ".join(message.split()) or "no error message"
    if "all replication slots are in use" in text:
        text += " (raise max_replication_slots on the server: the backup holds one temporary slot while it runs)"
    elif "WAL level not sufficient" in text or "wal_level" in text:
        text += " (set wal_level = replica or logical on the server and restart it)"
    return BaseBackupError(f"{what}: {text}")


def _quote(value: str) -> str:
    """A single-quoted replication-command literal (the replication grammar takes no bind parameters)."""
    if "\0" in value:
        raise ValueError("NUL in a replication command literal")
    return "'" + value.replace("'", "''") + "'"


class ReplicationConnection:
    """A physical replication connection (``replication=true``) used with libpq's simple query protocol only.

    The extended protocol, which psycopg's ``execute`` uses, is refused by a walsender, so commands go through
    ``pgconn`` directly. Close it (or use it as a context manager) to drop the temporary slot.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.slot: str | None = None
        self._stream: BaseBackupStream | None = None

    @classmethod
    def open(cls, opts: ConnOptions, ssl: SslFiles, *, password: str | None = None) -> ReplicationConnection:
        user = opts.username or "<user>"
        try:
            # dbname is ignored by a physical walsender; pg_hba matches the 'replication' keyword instead.
            conn = connect(opts, ssl, "replication", password=password, replication="true", autocommit=True,
                           **KEEPALIVES)
        except PgConnectError as exc:
            raise _refusal(exc, user) from None
        track_connection(conn)  # on_kill cancels a running BASE_BACKUP
        return cls(conn)

    @property
    def server_version(self) -> int:
        return int(self.pgconn.server_version)

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop a running base backup's reader thread, then close the connection (dropping the slot)."""
        if self._stream is not None:
            self._stream.close()
        if not self.conn.closed:
            self.conn.close()

    # -- simple commands -----------------------------------------------------------------------------------------
    def _command(self, sql: str, what: str) -> list[list[str | None]]:
        self.pgconn.send_query(sql.encode())
        rows: list[list[str | None]] = []
        error: str | None = None
        while (res := _next_result(self.pgconn)) is not None:
            if res.status == pq.ExecStatus.TUPLES_OK:
                rows += [[_text(res.get_value(r, c)) for c in range(res.nfields)] for r in range(res.ntuples)]
            elif res.status != pq.ExecStatus.COMMAND_OK:
                error = error or (res.error_message or b"").decode(errors="replace")
        if error is not None:
            raise _server_error(what, error)
        return rows

    def identify_system(self) -> dict[str, Any]:
        """``IDENTIFY_SYSTEM``: system identifier, timeline and current WAL position."""
        (row,) = self._command("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM failed")
        return {"system_identifier": row[0], "timeline": int(row[1] or 0), "xlogpos": row[2]}

    def show(self, setting: str) -> str | None:
        """``SHOW setting`` (walsenders accept it); None when the server refuses."""
        if not re.fullmatch(r"[a-z_]+", setting):
            raise ValueError(f"not a setting name: {setting!r}")
        try:
            rows = self._command(f"SHOW {setting}", f"SHOW {setting}")
        except BaseBackupError:
            return None
        return rows[0][0] if rows else None

    def create_temporary_slot(self, prefix: str = "pgplakar") -> str:
        """A temporary physical slot reserving WAL from now on, for the life of this connection."""
        name = f"{prefix}_{secrets.token_hex(8)}"
        self._command(f"CREATE_REPLICATION_SLOT {name} TEMPORARY PHYSICAL RESERVE_WAL",
                      "creating the temporary replication slot failed")
        self.slot = name
        log.info("temporary replication slot %s holds WAL for the backup", name)
        return name

    def check_supported(self) -> None:
        """Refuse servers older than 15 (their BASE_BACKUP framing is not implemented)."""
        if self.server_version < MIN_SERVER_VERSION:
            raise BaseBackupError(
                f"postgres+bin needs PostgreSQL 15 or later (the server is {_version_text(self.server_version)}): "
                "older servers use the pre-15 BASE_BACKUP framing, which this tool does not speak; use a logical "
                "backup (postgres://) or pg_basebackup for them"
            )

    def base_backup(self, *, label: str, checkpoint: str = "spread", max_rate: int | None = None,
                    compression: str | None = None, level: int | None = None,
                    fallback: bool = False) -> BaseBackupStream:
        """Start ``BASE_BACKUP`` and read up to the first archive; see :class:`BaseBackupStream`.

        ``compression`` (``lz4`` or ``zstd``, optional ``level``) has the server compress the archives. With
        ``fallback`` a server built without that method is asked again without compression: its refusal comes
        before any checkpoint, but the error also drops our temporary slot, so the slot is created anew first.
        """
        self.check_supported()
        if checkpoint not in ("fast", "spread"):
            raise ValueError(f"checkpoint must be fast or spread, got {checkpoint!r}")
        if compression is not None and compression not in COMPRESSION_SUFFIX:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSION_SUFFIX)}, got {compression!r}")
        options = [f"LABEL {_quote(label)}", "WAL true", "WAIT false", f"CHECKPOINT {_quote(checkpoint)}",
                   "MANIFEST 'yes'", "MANIFEST_CHECKSUMS 'CRC32C'", "PROGRESS true"]
        # TABLESPACE_MAP is left off: pg_tblspc/<oid> then travels as real symlinks, which restore re-points.
        if max_rate is not None:
            options.append(f"MAX_RATE {int(max_rate)}")
        compressed = list(options)
        if compression is not None:
            compressed.append(f"COMPRESSION {_quote(compression)}")
            if level is not None:
                compressed.append(f"COMPRESSION_DETAIL {_quote(f'level={int(level)}')}")
        stream = BaseBackupStream(self.pgconn, compression)
        try:
            stream.start(f"BASE_BACKUP ({', '.join(compressed)})")
        except BaseBackupError as exc:
            if compression is None or "compression" not in str(exc):
                raise
            if not fallback:
                raise CompressionUnsupported(str(exc)) from None
            log.info("the server cannot compress with %s (%s): streaming uncompressed", compression, exc)
            if self.slot is not None:
                self.create_temporary_slot()
            stream = BaseBackupStream(self.pgconn, None)
            stream.start(f"BASE_BACKUP ({', '.join(options)})")
        self._stream = stream
        return stream


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _version_text(num: int) -> str:
    return f"{num // 10000}.{num % 10000}" if num >= 100000 else f"{num // 10000}.{num // 100 % 100}"


def _wait_readable(pgconn: pq.abc.PGconn) -> None:
    select.select([pgconn.socket], [], [])


def _next_result(pgconn: pq.abc.PGconn,
                 wait: Callable[[pq.abc.PGconn], None] = _wait_readable) -> pq.abc.PGresult | None:
    """``PQgetResult`` without blocking in libpq: wait on the socket until the result is complete."""
    pgconn.flush()
    while pgconn.is_busy():
        wait(pgconn)
        pgconn.consume_input()
    return pgconn.get_result()


# ----------------------------------------------------------------------------------------------------------------
# The COPY OUT stream


@dataclass
class _Message:
    kind: bytes
    data: memoryview


class _CopyReader:
    """CopyData messages with one message of push-back (an archive reader stops *at* the next header).

    ``wait`` blocks until the socket is readable (the reader thread's also wakes up when asked to stop)."""

    def __init__(self, pgconn: pq.abc.PGconn, wait: Callable[[pq.abc.PGconn], None] = _wait_readable) -> None:
        self.pgconn = pgconn
        self.wait = wait
        self._pushed: _Message | None = None
        self.done = False
        self.results: list[pq.abc.PGresult] = []  # read right after the COPY ended, for finish()

    def next(self) -> _Message | None:
        if self._pushed is not None:
            msg, self._pushed = self._pushed, None
            return msg
        if self.done:
            return None
        while True:
            n, data = self.pgconn.get_copy_data(1)
            if n > 0:
                view = memoryview(data)
                return _Message(bytes(view[:1]), view[1:])
            if n == 0:
                self.wait(self.pgconn)
                self.pgconn.consume_input()
                continue
            if n == -1:  # COPY finished: the next result says whether the server ended it or failed
                self.done = True
                res = _next_result(self.pgconn, self.wait)
                if res is not None and res.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
                    raise _server_error("the server failed the base backup",
                                        (res.error_message or b"").decode(errors="replace"))
                if res is not None:
                    self.results.append(res)
                return None
            raise _server_error("base backup stream failed", self.pgconn.get_error_message())

    def push_back(self, msg: _Message) -> None:
        assert self._pushed is None
        self._pushed = msg


Buffer = bytes | bytearray | memoryview


class _Pieces(io.RawIOBase):
    """A readable stream over a sequence of buffers: ``_fill`` makes ``_buf`` non-empty or says the stream ended.

    ``readinto`` fills the caller's whole buffer in one call (one copy per byte, few Python calls per MiB);
    ``readview`` hands out a slice of the current buffer without copying when it holds enough."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = memoryview(b"")
        self.size = 0  # bytes delivered by _fill so far

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        raise NotImplementedError

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        got = 0
        while got < len(view) and self._fill():
            n = min(len(view) - got, len(self._buf))
            view[got : got + n] = self._buf[:n]
            self._buf = self._buf[n:]
            got += n
        return got

    def readview(self, n: int) -> Buffer:
        """The next ``n`` bytes (fewer only at the end): a view of the current buffer when it holds them all,
        else copied into a new ``bytearray``. The buffers are never reused, so a view stays valid."""
        if not self._fill():
            return b""
        if len(self._buf) >= n:
            view, self._buf = self._buf[:n], self._buf[n:]
            return view
        out = bytearray(n)
        got = self.readinto(out)
        if got < n:
            del out[got:]
        return out

    def next_piece(self) -> memoryview | None:
        """The rest of the current buffer, without copying (None at the end)."""
        if not self._fill():
            return None
        piece, self._buf = self._buf, memoryview(b"")
        return piece

    def drain(self) -> int:
        """Skip whatever the consumer left unread (a consumer that failed, or zero blocks after a tar's end)."""
        skipped = 0
        while (piece := self.next_piece()) is not None:
            skipped += len(piece)
        return skipped


class ArchiveStream(_Pieces):
    """The bytes of one archive as the server sent them (its ``d`` messages; compressed when asked for).

    With ``join`` each :meth:`next_piece` joins consecutive messages (~30 KiB each) into one buffer of at least
    that many bytes (fewer at the archive's end): fewer, bigger steps for the decompressor and the reader thread.

    Server-side tar archives end without the two zero blocks of a tar terminator (pg_basebackup adds them itself):
    :class:`.tarstream.TarReader` takes a clean end at a header boundary as the end of the archive."""

    def __init__(self, reader: _CopyReader, join: int = 0) -> None:
        super().__init__()
        self._reader = reader
        self._ended = False
        self.join = join

    def _fill(self) -> bool:
        while not self._buf:
            if self._ended:
                return False
            msg = self._reader.next()
            if msg is not None and msg.kind == b"d":
                self._buf = msg.data
                self.size += len(msg.data)
                continue
            if msg is not None and msg.kind == b"p":  # progress, only sent with PROGRESS true
                continue
            if msg is not None:
                self._reader.push_back(msg)
            self._ended = True
            return False
        return True

    def next_piece(self) -> memoryview | None:
        piece = super().next_piece()
        if piece is None or len(piece) >= self.join:
            return piece
        parts, size = [piece], len(piece)
        while size < self.join and self._fill():
            parts.append(self._buf)
            size += len(self._buf)
            self._buf = memoryview(b"")
        return memoryview(b"".join(parts)) if len(parts) > 1 else piece


class Decompressing(_Pieces):
    """The tar bytes of a compressed archive, decompressed as the caller reads, at most ~1 MiB per step whatever the
    compression ratio (``pg/decompress.py``; lz4's own file object read the stream 8 KiB at a time through three
    layers of buffering, which doubled this thread's CPU)."""

    def __init__(self, raw: ArchiveStream, method: str) -> None:
        super().__init__()
        self.raw = raw
        self.method = method
        self._done = False
        self._dec = decompress_steps(method)

    def _fill(self) -> bool:
        while not self._buf:
            try:
                out = self._dec.step()
                if out is None:
                    if self._done:
                        return False
                    piece = self.raw.next_piece()
                    if piece is None:
                        if not self._dec.done:
                            raise BaseBackupError(f"the {self.method}-compressed base backup stream ended mid-frame")
                        self._done = True
                        return False
                    self._dec.feed(piece)
                    continue
            except DecompressError as exc:
                if str(exc).startswith("data after the end"):
                    raise BaseBackupError(f"data after the end of the {self.method}-compressed archive") from None
                raise BaseBackupError(f"decompressing the {self.method} base backup stream failed: {exc}") from None
            self._buf = memoryview(out)
            self.size += len(out)
        return True


# The reader thread hands archive bytes over in batches of at least PIECE_BYTES (the last of an archive may be
# shorter); at most QUEUE_ITEMS batches wait for the consumer. A batch is under PIECE_BYTES plus one piece (a
# decompression step of at most ~1 MiB, or the joined raw messages), so at most ~2 MiB each, ~6 MiB queued.
PIECE_BYTES = 1 << 20
QUEUE_ITEMS = 3
# Compressed messages (~30 KiB; lz4 expands pgbench data ~9x) are joined up to this many bytes before a
# decompression step, so steps give their whole ~1 MiB instead of ~270 KiB each.
JOIN_COMPRESSED = 256 << 10
STOP_TIMEOUT = 30.0  # seconds close() waits for the reader thread
# The backup_manifest is collected in memory (it is stored as one record); PostgreSQL writes ~150-250 bytes per file,
# so 1 GiB is over 4 million files. A server sending more is broken or hostile: the backup fails (nothing committed).
MANIFEST_MAX = 1 << 30


class _Stopped(Exception):
    """The consumer asked the reader thread to stop."""


class _Receiver:
    """The reader thread of one ``BASE_BACKUP``: it alone uses the connection from the start of the COPY until the
    event ``("end",)``, receiving, decompressing and batching; the consumer takes its events from a bounded queue.

    Events: ``("archive", name, location)``, ``("data", [buffers], nbytes)`` (the current archive's tar bytes),
    ``("manifest", bytes)``, ``("end",)`` (the COPY ended; :attr:`results` holds the result read after it), or
    ``("error", exception)``: any failure of the thread, raised again, unchanged, in the consumer, by
    :meth:`next_event` (and by every later call). :meth:`close` stops the thread and waits for it."""

    def __init__(self, pgconn: pq.abc.PGconn, compression: str | None) -> None:
        self.pgconn, self.compression = pgconn, compression
        self.results: list[pq.abc.PGresult] = []
        self.ended = False
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(QUEUE_ITEMS)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._pushed: tuple[Any, ...] | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pgplakar-basebackup", daemon=True)
        self.thread.start()

    # -- reader thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._pump()
        except _Stopped:
            pass
        except BaseException as exc:
            with contextlib.suppress(_Stopped):
                self._post(("error", exc))

    def _post(self, event: tuple[Any, ...]) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._queue.put(event, timeout=0.5)
                return
            except queue.Full:
                continue

    def _wait(self, pgconn: pq.abc.PGconn) -> None:
        readable, _, _ = select.select([pgconn.socket, self._wake_r], [], [])
        if self._wake_r in readable:
            raise _Stopped

    def _pump(self) -> None:
        reader = _CopyReader(self.pgconn, self._wait)
        while (msg := reader.next()) is not None:
            if msg.kind == b"n":
                self._post(("archive", *_archive_header(msg.data)))
                if self.compression:
                    stream: _Pieces = Decompressing(ArchiveStream(reader, JOIN_COMPRESSED), self.compression)
                else:
                    stream = ArchiveStream(reader, PIECE_BYTES)
                batch: list[Buffer] = []
                size = 0
                while (piece := stream.next_piece()) is not None:
                    batch.append(piece)
                    size += len(piece)
                    if size >= PIECE_BYTES:
                        self._post(("data", batch, size))
                        batch, size = [], 0
                if batch:
                    self._post(("data", batch, size))
            elif msg.kind == b"m":
                parts: list[bytes] = []
                size = 0
                while (part := reader.next()) is not None:
                    if part.kind != b"d":
                        reader.push_back(part)
                        break
                    size += len(part.data)
                    if size > MANIFEST_MAX:
                        raise BaseBackupError(
                            f"the server's backup_manifest is over {MANIFEST_MAX} bytes (PostgreSQL writes ~200 per "
                            "file): the server or the connection is broken or hostile; check it and retry the backup")
                    parts.append(bytes(part.data))
                self._post(("manifest", b"".join(parts)))
            elif msg.kind != b"p":
                raise BaseBackupError(f"unexpected CopyData message type {msg.kind!r} in the base backup stream")
        self.results = reader.results
        self._post(("end",))

    # -- consumer ------------------------------------------------------------------------------------------------
    def next_event(self) -> tuple[Any, ...]:
        if self._pushed is not None:
            event, self._pushed = self._pushed, None
            return event
        if self._error is not None:
            raise self._error
        while True:
            try:
                event = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                check_cancelled()
                if not self.thread.is_alive():
                    try:
                        event = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        raise BaseBackupError("the base backup reader thread ended unexpectedly") from None
        if event[0] == "error":
            self._error = event[1]
            self.thread.join()
            raise event[1]
        if event[0] == "end":
            self.ended = True
            self.thread.join()
        return event

    def push_back(self, event: tuple[Any, ...]) -> None:
        assert self._pushed is None
        self._pushed = event

    def close(self) -> None:
        """Stop the thread (it wakes from its socket wait or its full queue) and wait for it to end."""
        if not self._stop.is_set():
            self._stop.set()
            os.write(self._wake_w, b"x")
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a put, and drop the buffers
                    self._queue.get_nowait()
            self.thread.join(0.05)
        if self.thread.is_alive():
            log.warning("the base backup reader thread did not stop within %.0f s", STOP_TIMEOUT)
            return
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


class ReceivedArchive(_Pieces):
    """The tar bytes of one archive as the reader thread delivers them (already decompressed)."""

    def __init__(self, receiver: _Receiver) -> None:
        super().__init__()
        self._receiver = receiver
        self._pieces: collections.deque[Buffer] = collections.deque()
        self._ended = False

    def _fill(self) -> bool:
        while not self._buf:
            if self._pieces:
                piece = self._pieces.popleft()
                self._buf = piece if isinstance(piece, memoryview) else memoryview(piece)
                self.size += len(self._buf)
                continue
            if self._ended:
                return False
            event = self._receiver.next_event()
            if event[0] == "data":
                self._pieces.extend(event[1])
                continue
            self._receiver.push_back(event)
            self._ended = True
            return False
        return True


@dataclass
class Archive:
    """One archive of the backup: ``base.tar`` (``tablespace`` None) or ``<oid>.tar`` of a user tablespace.

    ``name`` is without the compression suffix; ``stream`` gives the tar bytes, decompressed when the server
    compressed them (``compression``)."""

    name: str
    tablespace: Tablespace | None
    stream: _Pieces
    compression: str | None = None


class BaseBackupStream:
    """A running ``BASE_BACKUP``: :meth:`archives` yields each archive as a stream, :meth:`finish` ends it.

    A reader thread (:class:`_Receiver`, started by :meth:`archives`) receives and decompresses ahead of the
    caller, at most a few MiB. Consume each archive before asking for the next one; whatever is left unread is
    skipped. The backup manifest is collected into :attr:`manifest` on the way. Only :meth:`finish` says whether
    the server completed the backup; :meth:`close` (also by :meth:`ReplicationConnection.close`) stops the thread.
    """

    def __init__(self, pgconn: pq.abc.PGconn, compression: str | None = None) -> None:
        self.pgconn = pgconn
        self.compression = compression
        self.start_lsn: str | None = None
        self.end_lsn: str | None = None
        self.timeline: int | None = None
        self.tablespaces: list[Tablespace] = []
        self.manifest: bytes | None = None
        self.archive_names: list[str] = []
        self._receiver: _Receiver | None = None
        self._error: str | None = None

    def start(self, command: str) -> None:
        self.pgconn.send_query(command.encode())
        results = 0
        while True:
            res = _next_result(self.pgconn)
            if res is None:
                raise BaseBackupError("BASE_BACKUP ended before sending any data")
            if res.status == pq.ExecStatus.COPY_OUT:
                break
            if res.status != pq.ExecStatus.TUPLES_OK:
                self._drain_results()
                raise _server_error("BASE_BACKUP failed", (res.error_message or b"").decode(errors="replace"))
            if results == 0:
                self.start_lsn, self.timeline = _lsn(res), int(_text(res.get_value(0, 1)) or 0)
            else:
                self.tablespaces = [_tablespace(res, r) for r in range(res.ntuples)]
            results += 1
        log.info("base backup started at %s (timeline %s), %d tablespace(s) besides the data directory",
                 self.start_lsn, self.timeline, sum(t.oid is not None for t in self.tablespaces))

    def archives(self) -> Iterator[Archive]:
        if self._receiver is None:
            self._receiver = _Receiver(self.pgconn, self.compression)
        receiver = self._receiver
        by_oid = {t.oid: t for t in self.tablespaces if t.oid is not None}
        while (event := receiver.next_event())[0] != "end":
            if event[0] == "archive":
                sent, location = event[1], event[2]
                suffix = COMPRESSION_SUFFIX[self.compression] if self.compression else ""
                if not sent.endswith(suffix):
                    raise BaseBackupError(f"unexpected archive {sent!r} in the base backup stream (asked for "
                                          f"{self.compression} compression)")
                name = sent.removesuffix(suffix) if suffix else sent
                tablespace = None
                if name != "base.tar":
                    match = re.fullmatch(r"([0-9]+)\.tar", name)
                    if match is None or int(match.group(1)) not in by_oid:
                        raise BaseBackupError(f"unexpected archive {name!r} in the base backup stream")
                    tablespace = by_oid[int(match.group(1))]
                if name in self.archive_names:
                    raise BaseBackupError(f"archive {name!r} sent twice")
                self.archive_names.append(name)
                log.info("archive %s%s", sent, f" ({location})" if location else "")
                yield Archive(name, tablespace, ReceivedArchive(receiver), self.compression)
            elif event[0] == "manifest":
                self.manifest = event[1]
            # "data": what the caller left unread of the archive before, skipped

    def close(self) -> None:
        """Stop the reader thread (a consumer that failed or gave up); idempotent."""
        if self._receiver is not None:
            self._receiver.close()

    def finish(self) -> None:
        """Read the server's final results; raise unless the backup completed with every archive and a manifest."""
        if self._receiver is None or not self._receiver.ended:
            raise BaseBackupError("finish() called before the base backup stream was fully read")
        end_seen = ok_seen = False
        for res in self._results():
            if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1 and res.nfields >= 2:
                self.end_lsn = _lsn(res)
                end_seen = True
            elif res.status == pq.ExecStatus.COMMAND_OK:
                ok_seen = True
            elif res.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.BAD_RESPONSE):
                self._error = self._error or (res.error_message or b"").decode(errors="replace")
        if self._error:
            raise _server_error("the server failed the base backup", self._error)
        if not (end_seen and ok_seen):
            raise BaseBackupError("the base backup ended without its end position and completion message")
        expected = {"base.tar"} | {f"{t.oid}.tar" for t in self.tablespaces if t.oid is not None}
        if set(self.archive_names) != expected:
            raise BaseBackupError(f"the server sent archives {sorted(self.archive_names)}, expected "
                                  f"{sorted(expected)}")
        if not self.manifest:
            raise BaseBackupError("the server sent no backup manifest")
        log.info("base backup ended at %s", self.end_lsn)

    def _results(self) -> Iterator[pq.abc.PGresult]:
        assert self._receiver is not None
        yield from self._receiver.results
        while (res := _next_result(self.pgconn)) is not None:
            yield res

    def _drain_results(self) -> None:
        while _next_result(self.pgconn) is not None:
            pass


def _lsn(res: pq.abc.PGresult) -> str:
    value = _text(res.get_value(0, 0)) or ""
    if not _LSN_RE.fullmatch(value):
        raise BaseBackupError(f"the server sent an invalid WAL position {value[:40]!r}")
    return value


def _tablespace(res: pq.abc.PGresult, row: int) -> Tablespace:
    oid, location, size = (_text(res.get_value(row, c)) for c in range(3))
    return Tablespace(int(oid) if oid else None, location or None, int(size) if size else None)


def _archive_header(data: memoryview) -> tuple[str, str]:
    parts = bytes(data).split(b"\0")
    if len(parts) < 3:
        raise BaseBackupError("malformed new-archive message in the base backup stream")
    return parts[0].decode(), parts[1].decode()
