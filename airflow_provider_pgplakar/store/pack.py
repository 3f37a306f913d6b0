"""Pack files: many sealed blobs, then a sealed header listing them, then a fixed trailer.

Layout (v1)::

    "PGPPACK1" (8) | salt (32) | flags u32 LE (4)              44-byte plaintext prefix
    blob 0 | blob 1 | ...                                     each: seal(codec byte + payload, aad=BLOB_AAD)
    header = seal(msgpack([[type, blob_id, offset, stored_len, raw_len], ...]), aad="PGPH" + salt)
    header_len u32 LE | "PGPE"

The pack's name is the SHA-256 of its bytes, so a pack can be verified without the key; the per-blob header makes
the index rebuildable from packs alone. Blob AAD = "PGPB" + type + blob_id, so a blob moved or relabelled fails.

Size bounds (docs/format.md §5): a pack never exceeds PACK_HARD_MAX (the builder refuses, the sink starts a new
pack first), a blob's plaintext never exceeds BLOB_RAW_MAX, and every size read from storage (pack sizes, header
and index entries) is checked against them before it decides an allocation or a read.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import threading
from dataclasses import dataclass

import msgpack
import zstandard

from .crypto import SALT_LEN, AuthError, Keys, ObjectKey
from .errors import IntegrityError
from .msgshape import PACK_HEADER

MAGIC = b"PGPPACK1"
END = b"PGPE"
PREFIX_LEN = len(MAGIC) + SALT_LEN + 4
TRAILER_LEN = 8

PACK_HARD_MAX = 32 * 1024 * 1024
PACK_TARGET_RANGE = (64 * 1024, 16 * 1024 * 1024)  # config.pack_target; a pack ends at the target plus one blob
BLOB_RAW_MAX = 16 * 1024 * 1024  # data chunks are at most 8 MiB; manifest leaves are cut after ~1 MiB
_ENTRY_RESERVE = 64  # header bytes one entry may take (msgpack of [type, 32-byte id, 3 ints] is at most 52)

DATA, TREE, CHUNKLIST = 0, 1, 2  # blob types: file content, manifest leaves, chunk-list blobs
CODEC_RAW, CODEC_ZSTD = 0, 1


def blob_aad(blob_type: int, blob_id: bytes) -> bytes:
    return b"PGPB" + bytes([blob_type]) + blob_id


def pack_key(keys: Keys, salt: bytes) -> ObjectKey:
    return keys.object_key(salt, b"PACK")


def pack_object_name(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


@dataclass(frozen=True)
class Entry:
    blob_type: int
    blob_id: bytes
    offset: int
    length: int
    raw_len: int


class PackBuilder:
    """Accumulates sealed blobs for one pack. Not thread-safe: the caller serialises ``add``."""

    def __init__(self, keys: Keys, kind: str) -> None:
        self.kind = kind
        self.salt = secrets.token_bytes(SALT_LEN)
        self.okey = pack_key(keys, self.salt)
        self.buf = bytearray(MAGIC + self.salt + struct.pack("<I", 0))
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.buf)

    def fits(self, payload_len: int) -> bool:
        """Whether a blob with this payload still fits under PACK_HARD_MAX, header and trailer included."""
        sealed = 1 + payload_len + self.okey.overhead
        header = _ENTRY_RESERVE * (len(self.entries) + 1) + 16 + self.okey.overhead
        return len(self.buf) + sealed + header + TRAILER_LEN <= PACK_HARD_MAX

    def add(self, blob_type: int, blob_id: bytes, codec: int, payload: bytes | bytearray | memoryview, raw_len: int, *,
            verify: bool = False) -> None:
        if raw_len > BLOB_RAW_MAX or not self.fits(len(payload)):
            raise IntegrityError(
                f"blob {blob_id.hex()[:16]} ({raw_len} bytes) does not fit in a pack of at most {PACK_HARD_MAX} bytes"
            )
        aad = blob_aad(blob_type, blob_id)
        plain = bytes([codec]) + payload
        sealed = self.okey.seal(plain, aad)
        if verify and self.okey.open(sealed, aad) != plain:  # catches a faulty cipher or RAM before it is stored
            raise IntegrityError(f"blob {blob_id.hex()[:16]} did not survive sealing: refusing to store it")
        self.entries.append(Entry(blob_type, blob_id, len(self.buf), len(sealed), raw_len))
        self.buf += sealed

    def finish(self) -> tuple[str, bytearray]:
        """Return (pack_id, pack bytes). The builder must not be used afterwards (the buffer is handed over)."""
        table = [[e.blob_type, e.blob_id, e.offset, e.length, e.raw_len] for e in self.entries]
        header = self.okey.seal(msgpack.packb(table, use_bin_type=True), b"PGPH" + self.salt)
        self.buf += header
        self.buf += struct.pack("<I", len(header)) + END
        data, self.buf = self.buf, bytearray()
        return hashlib.sha256(data).hexdigest(), data


_local = threading.local()


def decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def decompress(payload: bytes | bytearray | memoryview, max_output_size: int = 0) -> bytes:
    """One zstd frame, decompressed in one call into a buffer of the frame's declared size (our frames always
    declare it: docs/format.md §5.1). The streaming ``decompressobj`` used before decoded into 128 KiB pieces that
    were then joined, one extra copy of every byte: 8 % more CPU per call in an A/B on 32-400 KiB chunks, and the
    restore path and the per-blob verification of the ingest both run this for every blob.
    ``max_output_size`` (0 = no limit) is checked against the declared size before any work; zstd fails a frame
    whose content does not match its declaration, or that is truncated; bytes after the frame are ignored (blobs are
    authenticated and their content checked against their ID, objects are authenticated)."""
    declared = zstandard.frame_content_size(payload)
    if declared < 0 or (max_output_size and declared > max_output_size):
        raise zstandard.ZstdError(f"frame declares {declared} bytes, expected at most {max_output_size or 'a size'}")
    return decompressor().decompress(payload)


def _check_declared(payload: memoryview, raw_len: int) -> None:
    declared = zstandard.frame_content_size(payload)
    if declared != raw_len:
        raise zstandard.ZstdError(f"frame declares {declared} bytes, the index {raw_len}")


def _open_blob(okey: ObjectKey, blob_type: int, blob_id: bytes, sealed: bytes | memoryview,
               where: str) -> tuple[int, memoryview]:
    """Authenticate one sealed blob; its codec (raw or zstd, anything else refused) and payload."""
    try:
        plain = okey.open(sealed, blob_aad(blob_type, blob_id))
    except AuthError:
        raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: authentication failed") from None
    codec = plain[0]
    if codec not in (CODEC_ZSTD, CODEC_RAW):
        raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: unknown codec {codec}")
    return codec, memoryview(plain)[1:]


def decode_blob(
    okey: ObjectKey, blob_type: int, blob_id: bytes, sealed: bytes | memoryview, raw_len: int, keys: Keys, where: str
) -> bytes:
    """Open, decompress and verify one blob; any mismatch raises IntegrityError naming ``where``.

    The zstd frame must declare exactly ``raw_len`` bytes before it is decompressed (``decompress``'s cap alone
    read an index's ``raw_len`` 0 as "no limit": a few KiB of frame expanded to gigabytes)."""
    codec, payload = _open_blob(okey, blob_type, blob_id, sealed, where)
    if codec == CODEC_ZSTD:
        try:
            _check_declared(payload, raw_len)
            raw = decompress(payload, raw_len)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: bad compressed data ({e})") from None
    else:
        raw = bytes(payload)
    if len(raw) != raw_len or keys.blob_id(raw) != blob_id:
        raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: content does not match its ID")
    return raw


def decode_blob_into(
    okey: ObjectKey, blob_type: int, blob_id: bytes, sealed: bytes | memoryview, raw_len: int, keys: Keys, where: str,
    out: memoryview,
) -> memoryview:
    """:func:`decode_blob` into ``out[:raw_len]`` (a buffer the caller reuses), returned once verified.

    For the batched restore (:mod:`.batchrestore`): a fresh ``bytes`` per chunk cost page faults and allocator work
    on every one of a data directory's chunks. The zstd frame must declare exactly ``raw_len`` bytes; it is decoded
    in one pass straight into ``out`` (the whole frame is handed to zstd at once, so it takes its single-pass path,
    no internal window copy); the content is then checked against the blob's keyed BLAKE3 ID like
    :func:`decode_blob`'s. Until this returns, ``out`` holds unverified bytes: the caller writes nothing from it
    before."""
    codec, payload = _open_blob(okey, blob_type, blob_id, sealed, where)
    dest = out[:raw_len]
    if len(dest) != raw_len:
        raise ValueError(f"output buffer of {len(out)} bytes for a {raw_len}-byte blob")
    if codec == CODEC_ZSTD:
        try:
            _check_declared(payload, raw_len)
            reader = decompressor().stream_reader(payload, read_size=max(1, len(payload)))
            got = 0
            while got < raw_len:
                n = reader.readinto(dest[got:])
                if not n:
                    raise zstandard.ZstdError(f"frame ended after {got} of {raw_len} bytes")
                got += n
        except zstandard.ZstdError as e:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: bad compressed data ({e})") from None
    else:
        if len(payload) != raw_len:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: content does not match its ID")
        dest[:] = payload
    if keys.blob_id(dest) != blob_id:
        raise IntegrityError(f"blob {blob_id.hex()[:16]} in {where}: content does not match its ID")
    return dest


def entry_problem(row: object, data_end: int) -> str | None:
    """Why an index or pack-header entry ``[type, blob_id, offset, stored_len, raw_len]`` is unusable when blobs
    must end by ``data_end`` (the header's start, or the pack size less the trailer; None when it is fine)."""
    if not isinstance(row, list | tuple) or len(row) != 5:
        return "malformed blob entry"
    blob_type, blob_id, offset, length, raw_len = row
    if blob_type not in (DATA, TREE, CHUNKLIST) or not isinstance(blob_id, bytes) or len(blob_id) != 32:
        return "blob entry with a bad type or ID"
    if not all(type(v) is int for v in (offset, length, raw_len)):
        return f"blob {blob_id.hex()[:16]}: non-integer offset or length"
    if not (PREFIX_LEN <= offset and 0 < length and offset + length <= data_end
            and 0 <= raw_len <= BLOB_RAW_MAX):
        return f"blob {blob_id.hex()[:16]}: offset {offset}, length {length} or size {raw_len} out of bounds"
    return None


def pack_size_ok(size: object) -> bool:
    return type(size) is int and PREFIX_LEN + TRAILER_LEN <= size <= PACK_HARD_MAX


def parse_pack(keys: Keys, data: bytes, name: str) -> tuple[bytes, list[Entry]]:
    """Return (salt, entries) from a whole pack's bytes; raises IntegrityError naming the pack."""
    if len(data) > PACK_HARD_MAX:
        raise IntegrityError(f"{name}: {len(data)} bytes, more than a pack may hold ({PACK_HARD_MAX})")
    if len(data) < PREFIX_LEN + TRAILER_LEN or data[: len(MAGIC)] != MAGIC or data[-4:] != END:
        raise IntegrityError(f"{name}: bad pack prefix or trailer")
    salt = data[len(MAGIC) : len(MAGIC) + SALT_LEN]
    (hlen,) = struct.unpack("<I", data[-8:-4])
    start = len(data) - TRAILER_LEN - hlen
    if start < PREFIX_LEN:
        raise IntegrityError(f"{name}: header length out of range")
    try:
        plain = pack_key(keys, salt).open(data[start:-TRAILER_LEN], b"PGPH" + salt)
    except AuthError:
        raise IntegrityError(f"{name}: pack header authentication failed") from None
    if not PACK_HEADER.fullmatch(plain):  # before msgpack makes ~64 bytes of objects of each byte of [[], [], ...]
        raise IntegrityError(f"{name}: the pack header is not a list of blob entries as writers encode them (the "
                             "store is corrupt or tampered with): run `pgplakar check --read-data`")
    try:
        table = msgpack.unpackb(plain)
    except (ValueError, msgpack.UnpackException) as e:
        raise IntegrityError(f"{name}: undecodable pack header ({e})") from None
    if not isinstance(table, list):
        raise IntegrityError(f"{name}: malformed pack header")
    for row in table:
        why = entry_problem(row, start)
        if why:
            raise IntegrityError(f"{name}: {why}")
    return salt, [Entry(*row) for row in table]
