"""Reading snapshots: manifest leaves → records → verified content streams.

Every chunk is authenticated (AEAD with its ID in the AAD), decompressed and re-hashed against its ID before a
byte of it is returned; at EOF the record's size and SHA-256 are compared too. Wrong bytes are never returned:
:class:`IntegrityError` is raised instead. Reads of adjacent chunks in one pack are coalesced into one ranged GET
and fetched ahead by a small thread pool, so restore throughput is not bound by request latency.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import blake3
import msgpack

from .crypto import ObjectKey
from .errors import IntegrityError, ObjectNotFound, StoreError
from .index import Location
from .msgshape import BIN32, Shape, outside_bytes
from .pack import CHUNKLIST, DATA, TREE, decode_blob, pack_key, pack_object_name
from .record import Record, RecordKind, decode_record

if TYPE_CHECKING:
    from .repo import Snapshot, Store

MAX_GROUP_BYTES = 8 * 1024 * 1024
# decoded bytes per group: a dump that compresses 80:1 put 640 MiB of decoded chunks in one 8 MiB ranged read, and
# PREFETCH groups of those made a restore's memory grow with the dump's size
MAX_GROUP_RAW = 8 * 1024 * 1024
MAX_GAP = 64 * 1024
PREFETCH = 6
LOOKUP_BATCH = 256  # chunk IDs per index query
OKEY_CACHE = 64  # pack keys kept per open record
# A chunk-list blob holds at most writer.CHUNKLIST_REFS (4096) refs of at most 41 bytes each (~164 KiB). Anything
# bigger is refused before it is unpacked: msgpack turns each byte of ``[[], [], ...]`` into a 64-byte list object,
# so a 16 MiB blob (BLOB_RAW_MAX) would have become 1.2 GiB of Python objects.
CHUNKLIST_RAW_MAX = 256 * 1024
# A manifest leaf is cut once it holds 1 MiB (writer.LEAF_MAX_BYTES), and a writer refuses a record of more than
# 1 MiB outside its ``cl`` list (writer.RECORD_OTHER_MAX); so a leaf holds at most 2 MiB outside its records' ``cl``
# lists, and those are lists of 32-byte IDs (a 1 TiB file's is ~3.5 MB). A leaf beyond that is refused before it is
# unpacked (a key holder's 16 MiB of ``[[], [], ...]`` in a record's meta would have become 1.2 GiB of objects).
LEAF_SHAPE = Shape(2 << 20, {("cl",): BIN32})


def read_blob(store: Store, blob_id: bytes, blob_type: int, where: str = "") -> bytes:
    store.ensure_read_lease()
    loc = locate(store, blob_id, where)
    if loc.blob_type != blob_type:
        raise IntegrityError(f"blob {blob_id.hex()[:16]}{where}: indexed as type {loc.blob_type}, expected {blob_type}")
    name = pack_object_name(loc.pack_id)
    try:
        sealed = store.backend.get(name, loc.offset, loc.length)
    except ObjectNotFound as e:
        raise IntegrityError(f"{e}{where}") from None
    return decode_blob(pack_key(store.keys, loc.salt), blob_type, blob_id, sealed, loc.raw_len, store.keys, name)


def locate(store: Store, blob_id: bytes, where: str = "") -> Location:
    loc = store.cache.lookup(blob_id)
    if loc is None:
        bad = store.cache.bad_segments
        hint = f" (index segment(s) {', '.join(s[:16] for s in bad)} are corrupt: run `repair index`)" if bad else ""
        raise IntegrityError(f"blob {blob_id.hex()[:16]}{where} is not in the index{hint}")
    return loc


def iter_records(store: Store, snap: Snapshot, prefix: str | None = None) -> Iterator[Record]:
    """Records in insertion order; ``prefix`` keeps a path and everything below it."""
    store.ensure_read_lease()
    store.sync_index()
    where = f"snapshot {snap.short_id}"
    for leaf_id, _count in snap.header["manifest"]["leaves"]:
        leaf = read_blob(store, leaf_id, TREE, f" (manifest of {where})")
        try:
            fits = outside_bytes(leaf, LEAF_SHAPE, sequence=True) is not None
        except ValueError as e:
            raise IntegrityError(f"{where}: manifest leaf {leaf_id.hex()[:16]} is undecodable ({e})") from None
        if not fits:
            raise IntegrityError(f"{where}: manifest leaf {leaf_id.hex()[:16]} holds more than {LEAF_SHAPE.budget} "
                                 "bytes outside its chunk-list IDs, more than a writer makes (the store is corrupt or "
                                 "tampered with): restore another snapshot, or forget this one")
        for raw in msgpack.Unpacker(io.BytesIO(leaf), raw=False):
            rec = decode_record(raw, where)
            if prefix is None or _under(rec.path, prefix):
                yield rec


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def chunk_refs(store: Store, record: Record) -> Iterator[tuple[bytes, int]]:
    """(blob ID, length) of each chunk of a file record, from its inline refs or its chunk-list blobs."""
    inline = record._chunks
    if inline is not None:
        for ref in inline:
            yield _ref(ref, record)
        return
    for cl_id in record.chunk_list_ids():
        data = read_blob(store, cl_id, CHUNKLIST, f" (chunk list of {record.path!r})")
        if len(data) > CHUNKLIST_RAW_MAX:
            raise IntegrityError(f"record {record.path!r}: chunk list {cl_id.hex()[:16]} is {len(data)} bytes, more "
                                 f"than a writer makes ({CHUNKLIST_RAW_MAX}): the store is corrupt or tampered with")
        refs = msgpack.unpackb(data, raw=False)
        if type(refs) is not list:
            raise IntegrityError(f"record {record.path!r}: a chunk list is not a list")
        for ref in refs:
            yield _ref(ref, record)


def _ref(ref: object, record: Record) -> tuple[bytes, int]:
    if type(ref) is list and len(ref) == 2 and type(ref[0]) is bytes and type(ref[1]) is int:
        if ref[1] < 1:  # writers never make an empty chunk; refs to one would let a restore spin writing nothing
            raise IntegrityError(f"record {record.path!r}: a chunk reference of {ref[1]} bytes, which no writer makes "
                                 "(the manifest is corrupt or was tampered with): restore another snapshot")
        return ref[0], ref[1]
    raise IntegrityError(f"record {record.path!r}: a chunk reference is not [blob ID, length] (the manifest is "
                         "corrupt or was tampered with)")


def _located(store: Store, record: Record, where: str) -> Iterator[tuple[bytes, Location]]:
    """The record's chunks with their locations, looked up in batches (one index query per ~256 chunks)."""
    refs = chunk_refs(store, record)
    while True:
        batch = [blob_id for blob_id, _raw in itertools.islice(refs, LOOKUP_BATCH)]
        if not batch:
            return
        found = store.cache.lookup_many(batch)
        for blob_id in batch:
            loc = found.get(blob_id)
            yield blob_id, (loc if loc is not None else locate(store, blob_id, where))


def _groups(store: Store, record: Record) -> Iterator[tuple[Location, list[tuple[bytes, Location]]]]:
    """Coalesce consecutive chunks that sit close together in one pack into one ranged read."""
    cur: list[tuple[bytes, Location]] = []
    raw = 0
    where = f" (record {record.path!r})"
    for blob_id, loc in _located(store, record, where):
        if cur:
            first, last = cur[0][1], cur[-1][1]
            end = last.offset + last.length
            if (
                loc.pack_id == first.pack_id and end <= loc.offset <= end + MAX_GAP
                and loc.offset + loc.length - first.offset <= MAX_GROUP_BYTES
                and raw + loc.raw_len <= MAX_GROUP_RAW
            ):
                cur.append((blob_id, loc))
                raw += loc.raw_len
                continue
            yield cur[0][1], cur
        cur = [(blob_id, loc)]
        raw = loc.raw_len
    if cur:
        yield cur[0][1], cur


def record_digests(record: Record) -> list[tuple[Any, bytes, str]]:
    """(hasher, expected digest, name) for each whole-content digest the record carries: BLAKE3 (``b``), or the
    SHA-256 (``d``) of records written before it replaced SHA-256 (docs/format.md §6.3); a record with both gets
    both checked. Both restore paths check these: :class:`RecordReader` and :mod:`.batchrestore`."""
    out: list[tuple[Any, bytes, str]] = []
    if record.blake3 is not None:
        out.append((blake3.blake3(), record.blake3, "BLAKE3"))
    if record.sha256 is not None:
        out.append((hashlib.sha256(), record.sha256, "SHA-256"))
    return out


class RecordReader(io.RawIOBase):
    """A readable binary stream of one file record, verified chunk by chunk and as a whole at EOF."""

    def __init__(self, store: Store, record: Record, prefetch: int = PREFETCH) -> None:
        super().__init__()
        if record.kind != RecordKind.FILE:
            raise StoreError(f"{record.path!r} is not a file record (kind {str(record.kind)!r})")
        self.store, self.record = store, record
        store.ensure_read_lease()
        # LIST index/ only when the local index lacks a blob of this record (records come from iter_records, which
        # has just synced): one LIST per opened file made restores of many small files from S3 list-bound.
        inline = record._chunks
        if inline is None or not all(store.cache.has_blob(_ref(ref, record)[0]) for ref in inline):
            store.sync_index()
        self._groups = _groups(store, record)
        self._pool = ThreadPoolExecutor(min(prefetch, 4), thread_name_prefix="pgplakar-read")
        self._pending: deque[Future[list[bytes]]] = deque()
        self._prefetch = prefetch
        self._okeys: dict[bytes, ObjectKey] = {}  # pack salt -> key; a benign race between fetch threads
        self._buf = memoryview(b"")
        self._chunks: deque[bytes] = deque()
        self._digests = record_digests(record)  # records may go without (see add_stream)
        self._size = 0
        self._eof = False
        self._fill()

    def readable(self) -> bool:
        return True

    def _fetch(self, first: Location, members: list[tuple[bytes, Location]]) -> list[bytes]:
        last = members[-1][1]
        name = pack_object_name(first.pack_id)
        try:
            data = memoryview(self.store.backend.get(name, first.offset, last.offset + last.length - first.offset))
        except ObjectNotFound as e:
            raise IntegrityError(f"{e} (needed by record {self.record.path!r})") from None
        okey = self._okeys.get(first.salt)
        if okey is None:  # one HKDF per pack, not per ranged read (a restore reads each pack in many groups)
            okey = pack_key(self.store.keys, first.salt)
            if len(self._okeys) >= OKEY_CACHE:
                self._okeys.clear()
            self._okeys[first.salt] = okey
        out = []
        for blob_id, loc in members:
            rel = loc.offset - first.offset
            out.append(decode_blob(okey, DATA, blob_id, data[rel : rel + loc.length], loc.raw_len, self.store.keys,
                                   f"{name} (record {self.record.path!r})"))
        return out

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            group = next(self._groups, None)
            if group is None:
                break
            self._pending.append(self._pool.submit(self._fetch, *group))

    def _next_chunk(self) -> bytes | None:
        if not self._chunks:
            if not self._pending:
                return None
            fut = self._pending.popleft()
            self._chunks.extend(fut.result())
            self._fill()
        return self._chunks.popleft()

    def readinto(self, b: Any) -> int:
        if self._eof:
            return 0
        while not self._buf:
            chunk = self._next_chunk()
            if chunk is None:
                self._finish()
                return 0
            self._count(chunk)
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _count(self, chunk: bytes) -> None:
        """Hash a verified chunk and count it; more bytes than the record's size stop the read at once (a key
        holder's record may point many times at one chunk list: at its end would be after all of them)."""
        for h, _want, _name in self._digests:
            h.update(chunk)
        self._size += len(chunk)
        if self._size > (self.record.size or 0):
            raise IntegrityError(f"record {self.record.path!r}: its chunks hold more than the {self.record.size} "
                                 "bytes the manifest says (the manifest is corrupt or was tampered with)")

    def _finish(self) -> None:
        self._eof = True
        rec = self.record
        if self._size != rec.size:
            raise IntegrityError(f"record {rec.path!r}: {self._size} bytes read, the manifest says {rec.size}")
        for h, want, name in self._digests:
            if h.digest() != want:
                raise IntegrityError(f"record {rec.path!r}: the {name} does not match the manifest")

    def iter_chunks(self) -> Iterator[bytes]:
        """Chunk-sized pieces without an extra copy (fast path for restore to a file or pipe)."""
        while True:
            if self._buf:
                piece, self._buf = bytes(self._buf), memoryview(b"")
                yield piece
                continue
            chunk = self._next_chunk()
            if chunk is None:
                self._finish()
                return
            self._count(chunk)
            yield chunk

    def close(self) -> None:
        if not self.closed:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
        super().close()
