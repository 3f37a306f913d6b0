"""Restore many file records into open file descriptors at once: chunk reads batched across records.

:class:`~.reader.RecordReader` streams one record; a physical restore is ~1,000 records, most of them a few pages,
and one 700 MiB relation file. Reading them one by one cost a thread pool per file, an index query per record and
a ranged read per chunk, and every byte crossed the caller's thread. Here (issue 13 §3):

- the records' chunk references are cut into *windows* (at most ``WINDOW_RAW`` decoded bytes, ``WINDOW_REFS``
  references and ``WINDOW_FILES`` files); one index query locates a window's chunks, and its distinct blobs, sorted
  by pack and offset, are coalesced into ranged reads (as the reader does: ``MAX_GAP``, ``MAX_GROUP_BYTES``,
  ``MAX_GROUP_RAW``) — small files that sit together in a pack are read in one request;
- one long-lived pool reads each range, opens (AEAD), decompresses and re-hashes every blob against its keyed
  BLAKE3 ID (:func:`~.pack.decode_blob_into`, into the worker's reused ``RUN_BYTES`` buffer: no allocation per
  chunk; the GIL is released in zstd, BLAKE3 and the ranged read) and only then writes it at its offset in every
  file that uses it (a blob shared by files, or repeated in one, is decoded once per window). Verified chunks are
  collected up to ``RUN_BYTES`` (1 MiB, still in the core's cache) and each file's consecutive ones go out in one
  ``pwritev``: the scale-50 data directory took 1,602 write calls instead of 3,846, and the scheduler's share of
  the restore's CPU fell from 1.7 % to 0.3 % (perf). Chunks larger than a run, and chunks of records with a
  whole-content digest (kept until hashed), are decoded into their own bytes as before;
- windows complete in order on the caller's thread: the whole-record check (size; the record's BLAKE3, or the
  SHA-256 of records written before BLAKE3 replaced it, over the chunks in order, kept until their window completes)
  runs there, then ``done`` hands the fd back (the caller sets attributes and syncs or closes it). A record that
  fails a check raises :class:`~.errors.IntegrityError` and nothing later is reported done, as with the streaming
  reader, which also writes a record's verified chunks before its end-of-record check.

The caller opens every fd (through :class:`~.safefs.SafeTree`'s no-follow walk); this module only writes
(``pwritev``) to them and never closes one it was given unless :meth:`BatchRestore.close` aborts.

Memory is bounded whatever the snapshot. Windows waiting for a worker hold only their chunk lists (≤ ``IN_FLIGHT``
windows of ≤ ``WINDOW_REFS`` references: a few MiB), so the caller runs ahead creating files while a large one is
decoded; each worker holds one ranged read (≤ ``MAX_GROUP_BYTES``, 8 MiB), its run buffer (``RUN_BYTES``) and
one blob being decoded (≤ 16 MiB plaintext and content); content is kept only for records with a whole-content
digest, until their window completes (≤ ``IN_FLIGHT_DIGEST_RAW`` + one window, 96 MiB); at most
``IN_FLIGHT_FILES`` + ``WINDOW_FILES`` fds are open (fewer when the soft ``RLIMIT_NOFILE`` is low: half of what it
leaves free).
Worst case ≈ 4 × 25 + 96 ≈ 200 MiB; the scale-50 benchmark's restore peaked at ~60 MiB RSS (the streaming
reader's: 112 MiB).

Where a restore's CPU goes (perf, the scale-50 data directory, 1.6 CPU s without fsync, README "Restore CPU"):
the two workers ~60 % (zstd 0.37 s, the kernel's page-cache copy 0.23 s, BLAKE3 0.19 s, AES-GCM 0.03 s, Python
~0.08 s); the caller's thread ~40 % (file creation in the kernel 0.30 s, Python 0.21 s: records, planning, index
queries). The workers run on both cores and wait for the GIL ~15 % of their time (py-spy); what is left is native
work a faster interpreter path cannot remove.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .crypto import ObjectKey
from .errors import IntegrityError, ObjectNotFound
from .index import Location
from .localfs import LocalBackend
from .pack import DATA, decode_blob, decode_blob_into, pack_key, pack_object_name
from .reader import MAX_GAP, MAX_GROUP_BYTES, MAX_GROUP_RAW, OKEY_CACHE, chunk_refs, locate, record_digests
from .record import Record

__all__ = ["BatchRestore", "FileJob"]

WORKERS = 4  # remote stores: a ranged GET mostly waits; a local store's reads are CPU work (one per core, 2..4)
WINDOW_RAW = 32 * 1024 * 1024
WINDOW_REFS = 4096
WINDOW_FILES = 256
# windows read at once: a window waiting for a worker holds only its chunk list, so many may wait (the caller runs
# ahead, creating the next files while a large one is decoded); what they hold is bounded apart:
IN_FLIGHT = 16  # windows
IN_FLIGHT_FILES = 512  # open fds of records not reported done
IN_FLIGHT_DIGEST_RAW = 64 * 1024 * 1024  # content of records with a digest, kept until hashed in order
WRITEBACK_BYTES = 8 * 1024 * 1024  # a large file's pages are handed to the disk every this many bytes written
IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)
RUN_BYTES = 1024 * 1024  # verified chunks a worker collects (while they are in its cache) before writing them


def _fd_budget() -> int:
    """Half the fds the soft ``RLIMIT_NOFILE`` leaves free: the other half is for the trees' directory fds and
    fsyncs, the store and the task's sockets (systemd's default soft limit is 1024; 768 open files hit it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return IN_FLIGHT_FILES + WINDOW_FILES
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    return max(6, min(IN_FLIGHT_FILES + WINDOW_FILES, (soft - used) // 2))


@dataclass(eq=False)
class FileJob:
    """One record being written to ``fd``; ``context`` is the caller's (handed back through ``done``)."""

    record: Record
    fd: int
    context: Any
    refs: Iterator[tuple[bytes, int]]
    planned: int = 0  # bytes of content placed in windows so far (the next chunk's file offset)
    chunks: int = 0  # chunks placed so far (the next chunk's index)
    digests: list[tuple[Any, bytes, str]] = field(default_factory=list)  # whole-content digests to check
    pieces: dict[int, bytes] = field(default_factory=dict)  # chunk index -> content, until hashed (digests only)
    hashed: int = 0  # chunks hashed so far
    unflushed: int = 0  # bytes written since the last writeback hint (approximate: workers race on it)


Dest = tuple[FileJob, int, int]  # (job, file offset, chunk index)


@dataclass(eq=False)
class _Window:
    refs: list[tuple[bytes, int, FileJob, int, int]] = field(default_factory=list)
    raw: int = 0
    digest_raw: int = 0  # content of this window's chunks of records with a whole-content digest
    jobs: list[FileJob] = field(default_factory=list)  # every job with a chunk here or ending here, in order
    ending: list[FileJob] = field(default_factory=list)  # jobs whose last chunk (or no chunk) is in this window
    futures: list[Future[None]] = field(default_factory=list)


class BatchRestore:
    """Write file records' verified content into fds the caller opened; see the module docstring.

    ``add(record, fd, context)`` queues one record; ``done(context, record, fd)`` is called on the caller's thread
    once the record is complete and checked (in ``add`` or ``finish``); ``tick`` (if given) runs between windows
    (a cancellation check). Use as a context manager or call :meth:`finish` then :meth:`close`.
    """

    def __init__(self, store: Any, done: Callable[[Any, Record, int], None], *,
                 tick: Callable[[], None] | None = None, writeback: Callable[[int], None] | None = None,
                 workers: int | None = None) -> None:
        self.store = store
        self.done = done
        self.tick = tick
        self.writeback = writeback
        store.ensure_read_lease()
        if workers is None:
            workers = max(2, min(WORKERS, os.cpu_count() or 2)) if isinstance(store.backend, LocalBackend) else WORKERS
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="pgplakar-restore")
        self.inflight: deque[_Window] = deque()
        self.cur = _Window()
        fds = _fd_budget()  # open fds of records not reported done: one third in the window being planned
        self.window_files = max(2, min(WINDOW_FILES, fds // 3))
        self.inflight_files = max(2, min(IN_FLIGHT_FILES, fds - self.window_files))
        self.open: dict[int, FileJob] = {}  # id(job) -> job: fds still ours to close on abort
        self._okeys: dict[bytes, ObjectKey] = {}  # pack salt -> key (a benign race between workers)
        self._local = threading.local()  # each worker's decode buffer
        self._closed = False
        self._synced = False
        self.bytes = 0

    def __enter__(self) -> BatchRestore:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(success=exc_type is None)

    # -- planning (caller's thread) -----------------------------------------------------------------------------
    def add(self, record: Record, fd: int, context: Any = None) -> None:
        """Queue ``record`` to be written to ``fd``; the fd is ours from here (even when this raises) until
        ``done`` hands it back."""
        job = FileJob(record, fd, context, chunk_refs(self.store, record), digests=record_digests(record))
        self.open[id(job)] = job
        if len(self.cur.jobs) >= self.window_files:
            self._submit()
        self.cur.jobs.append(job)
        size = record.size or 0
        while True:
            ref = next(job.refs, None)
            if ref is None:
                self.cur.ending.append(job)
                return
            blob_id, n = ref
            if job.planned + n > size:
                raise IntegrityError(f"record {record.path!r}: its chunks hold more than the {size} bytes the "
                                     "manifest says (the manifest is corrupt or was tampered with)")
            w = self.cur
            w.refs.append((blob_id, n, job, job.planned, job.chunks))
            w.raw += n
            if job.digests:
                w.digest_raw += n
            job.planned += n
            job.chunks += 1
            if w.raw >= WINDOW_RAW or len(w.refs) >= WINDOW_REFS:
                self._submit()
                self.cur.jobs.append(job)

    def _locate(self, ids: list[bytes], members: dict[bytes, list[Dest]]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = self.store.cache.lookup_many(ids)
        if len(found) < len(ids) and not self._synced:  # a backup that finished after our listing: list once more
            self._synced = True
            self.store.sync_index()
            found = self.store.cache.lookup_many(ids)
        for blob_id in ids:
            if blob_id not in found:
                where = f" (record {members[blob_id][0][0].record.path!r})"  # the record using it, not the first
                found[blob_id] = locate(self.store, blob_id, where)  # raises, naming the index problem
        return found

    def _submit(self) -> None:
        """Locate the current window's chunks, start its ranged reads, open a new window."""
        self.store.ensure_read_lease()  # raises LeaseExpired when a prune may have changed the packs meanwhile
        w, self.cur = self.cur, _Window()
        members: dict[bytes, list[Dest]] = {}
        for blob_id, _n, job, offset, index in w.refs:
            members.setdefault(blob_id, []).append((job, offset, index))
        ids = list(members)
        locs = self._locate(ids, members)
        for blob_id, n, job, _offset, _index in w.refs:
            loc = locs[blob_id]
            if loc.blob_type != DATA:
                raise IntegrityError(f"record {job.record.path!r}: chunk {blob_id.hex()[:16]} is not file content "
                                     f"(a blob of type {loc.blob_type}: the manifest is corrupt or was tampered with)")
            if loc.raw_len != n:
                raise IntegrityError(f"record {job.record.path!r}: chunk {blob_id.hex()[:16]} is {n} bytes in the "
                                     f"manifest but the index has {loc.raw_len} (type {loc.blob_type})")
        order = sorted(ids, key=lambda b: (locs[b].pack_id, locs[b].offset))
        group: list[tuple[bytes, Location, list[Dest]]] = []
        raw = 0
        for blob_id in order:
            loc = locs[blob_id]
            if group:
                first, last = group[0][1], group[-1][1]
                end = last.offset + last.length
                if (loc.pack_id == first.pack_id and end <= loc.offset <= end + MAX_GAP
                        and loc.offset + loc.length - first.offset <= MAX_GROUP_BYTES
                        and raw + loc.raw_len <= MAX_GROUP_RAW):
                    group.append((blob_id, loc, members[blob_id]))
                    raw += loc.raw_len
                    continue
                w.futures.append(self.pool.submit(self._fetch, group))
            group = [(blob_id, loc, members[blob_id])]
            raw = loc.raw_len
        if group:
            w.futures.append(self.pool.submit(self._fetch, group))
        w.refs = []  # the destinations live on in the tasks; free the list
        self.inflight.append(w)
        while self.inflight and (len(self.inflight) > IN_FLIGHT
                                 or sum(len(x.jobs) for x in self.inflight) > self.inflight_files
                                 or sum(x.digest_raw for x in self.inflight) > IN_FLIGHT_DIGEST_RAW):
            self._complete(self.inflight.popleft())

    # -- reading (workers) --------------------------------------------------------------------------------------
    def _fetch(self, group: list[tuple[bytes, Location, list[Dest]]]) -> None:
        """Read one coalesced range; decode and verify its blobs into this worker's buffer, a run of ``RUN_BYTES``
        at a time, and write each run: a file's pieces that follow one another go out in one ``pwritev`` (a
        relation file in 256 KiB chunks: one call per 1 MiB instead of four). Nothing is written from a run before
        every blob in it matched its ID."""
        first, last = group[0][1], group[-1][1]
        name = pack_object_name(first.pack_id)
        try:
            data = memoryview(self.store.backend.get(name, first.offset, last.offset + last.length - first.offset))
        except ObjectNotFound as e:
            raise IntegrityError(f"{e} (needed by record {group[0][2][0][0].record.path!r})") from None
        okey = self._okeys.get(first.salt)
        if okey is None:  # one HKDF per pack, not per ranged read
            if len(self._okeys) >= OKEY_CACHE:
                self._okeys.clear()
            okey = self._okeys[first.salt] = pack_key(self.store.keys, first.salt)
        keys = self.store.keys
        pos = 0
        writes: dict[int, tuple[FileJob, list[tuple[int, memoryview]]]] = {}  # id(job) -> (job, [(offset, view)])
        for blob_id, loc, dests in group:
            if pos + loc.raw_len > RUN_BYTES and writes:  # write what is verified while it is still in the cache
                for job, pieces in writes.values():
                    self._write(job, pieces)
                writes.clear()
                pos = 0
            rel = loc.offset - first.offset
            sealed, where = data[rel : rel + loc.length], f"{name} (record {dests[0][0].record.path!r})"
            raw: memoryview
            own: bytes | None = None
            if loc.raw_len > RUN_BYTES or any(d[0].digests for d in dests):
                # a large chunk, or one kept for a whole-record digest (WAL, small files): its own bytes
                own = decode_blob(okey, DATA, blob_id, sealed, loc.raw_len, keys, where)
                raw = memoryview(own)
                pos = RUN_BYTES  # written before the next chunk is decoded
            else:
                raw = decode_blob_into(okey, DATA, blob_id, sealed, loc.raw_len, keys, where, self._buffer()[pos:])
                pos += loc.raw_len
            for job, offset, index in dests:
                w = writes.get(id(job))
                if w is None:
                    w = writes[id(job)] = (job, [])
                w[1].append((offset, raw))
                if job.digests:  # kept until hashed in order (decoded into its own bytes, above)
                    job.pieces[index] = own if own is not None else bytes(raw)
        del data
        for job, pieces in writes.values():  # written only now: every blob of the range matched its ID
            self._write(job, pieces)

    def _buffer(self) -> memoryview:
        """This worker's decode buffer (``RUN_BYTES``), reused for every run of chunks it writes."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(RUN_BYTES)
        return memoryview(buf)

    def _write(self, job: FileJob, pieces: list[tuple[int, memoryview]]) -> None:
        pieces.sort(key=_offset)
        i, n = 0, len(pieces)
        while i < n:
            start, buf = pieces[i]
            bufs = [buf]
            end = start + len(buf)
            i += 1
            while i < n and pieces[i][0] == end and len(bufs) < IOV_MAX:
                buf = pieces[i][1]
                bufs.append(buf)
                end += len(buf)
                i += 1
            _pwritev_all(job.fd, bufs, start)
            if self.writeback is not None:
                job.unflushed += end - start
                if job.unflushed >= WRITEBACK_BYTES:
                    job.unflushed = 0
                    self.writeback(job.fd)

    # -- completion (caller's thread) -----------------------------------------------------------------------------
    def _complete(self, w: _Window) -> None:
        for f in w.futures:
            try:
                f.result()  # the first failure raises; close() cancels the rest
            except IntegrityError:  # a pack gone: a prune that took over a lost lease says so (retry), not "corrupt"
                self.store.ensure_read_lease()  # (the last windows drain with no _submit, so no check ran since)
                raise
        for job in w.jobs:
            if job.digests:
                while job.hashed in job.pieces:
                    piece = job.pieces.pop(job.hashed)
                    for h, _want, _name in job.digests:
                        h.update(piece)
                    job.hashed += 1
        for job in w.ending:
            rec = job.record
            if job.planned != (rec.size or 0):
                raise IntegrityError(f"record {rec.path!r}: {job.planned} bytes read, the manifest says {rec.size}")
            for h, want, name in job.digests:
                if job.hashed != job.chunks or h.digest() != want:
                    raise IntegrityError(f"record {rec.path!r}: the {name} does not match the manifest")
            del self.open[id(job)]
            self.bytes += job.planned
            self.done(job.context, rec, job.fd)
        if self.tick is not None:
            self.tick()

    def finish(self) -> None:
        """Write everything queued; raise the first failure."""
        if self.cur.jobs:
            self._submit()
        while self.inflight:
            self._complete(self.inflight.popleft())

    def close(self, success: bool = True) -> None:
        """Stop the workers; after a failure, close the fds of records not reported done (files stay partial)."""
        if self._closed:
            return
        self._closed = True
        for w in self.inflight:
            for f in w.futures:
                f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)  # no worker writes to an fd after this
        for job in self.open.values():
            os.close(job.fd)
        self.open = {}
        self.inflight.clear()


def _offset(piece: tuple[int, memoryview]) -> int:
    return piece[0]


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write ``bufs`` one after another at ``offset``; a short write (rare: a signal, a full disk) is finished
    with plain ``pwrite`` calls."""
    done = os.pwritev(fd, bufs, offset)
    for buf in bufs:
        if done >= len(buf):
            done -= len(buf)
            offset += len(buf)
            continue
        view = buf[done:]
        offset += done
        done = 0
        while view:
            k = os.pwrite(fd, view, offset)
            view = view[k:]
            offset += k
