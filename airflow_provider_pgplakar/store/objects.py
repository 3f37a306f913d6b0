"""Small sealed objects (index segments, snapshot files, leases): magic, kind, salt, then sealed zstd(msgpack).

The AAD is magic + kind + salt + a caller context (e.g. the snapshot ID), so an object renamed or swapped for
another of a different identity fails to open.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgpack
import zstandard

from .crypto import SALT_LEN, AuthError, Keys
from .errors import IntegrityError, StoreError
from .msgshape import HEX64, LEAF_REF, PACK_ENTRY, Shape, outside_bytes
from .pack import decompress

MAGIC = b"PGPO"
OBJECT_RAW_MAX = 64 * 1024 * 1024  # decompressed payload: a 100 000-entry index segment is ~6 MB
KINDS = (b"INDX", b"SNAP", b"LEAS", b"INTN")
_HDR = len(MAGIC) + 4 + SALT_LEN
# What a payload may hold outside its lists of fixed-shape entries (store/msgshape.py), checked before it is
# unpacked: a snapshot's meta (a logical backup's is ~300 bytes per database), a segment's version and foreign-order
# pack entries, a lease's or an intent's few fields. The lists themselves (leaves, packs and their blob entries,
# segment and pack IDs) are bounded by OBJECT_RAW_MAX only, as they cost a few times their bytes.
SHAPES = {
    b"SNAP": Shape(8 << 20, {("manifest", "leaves"): LEAF_REF, ("index_segments",): HEX64}),
    b"INDX": Shape(1 << 20, {("packs",): PACK_ENTRY, ("supersedes",): HEX64}),
    b"LEAS": Shape(64 << 10),
    b"INTN": Shape(64 << 10, {("packs",): HEX64, ("segments",): HEX64}),
}
_FIX = {b"SNAP": "restore another snapshot, or forget this one", b"INDX": "run `pgplakar repair index`",
        b"LEAS": "a lease that cannot be read is ignored",
        b"INTN": "if no prune is running, delete it and run `pgplakar check`"}


def seal_object(keys: Keys, kind: bytes, payload: Any, context: bytes = b"") -> bytes:
    assert kind in KINDS
    salt = secrets.token_bytes(SALT_LEN)
    packed = msgpack.packb(payload, use_bin_type=True)
    shape = SHAPES[kind]
    if outside_bytes(packed, shape) is None:  # readers would refuse it
        what = " (its meta, tags and labels)" if kind == b"SNAP" else ""
        raise StoreError(f"{kind.decode()} object too big: more than {shape.budget} bytes outside its entry "
                         f"lists{what}")
    body = zstandard.ZstdCompressor(level=3).compress(packed)
    head = MAGIC + kind + salt
    return head + keys.object_key(salt, kind).seal(body, head + context)


def open_object(keys: Keys, kind: bytes, data: bytes, name: str, context: bytes = b"") -> Any:
    """Decode an object or raise IntegrityError naming ``name`` (its key in the store)."""
    if len(data) < _HDR or data[:4] != MAGIC or data[4:8] != kind:
        raise IntegrityError(f"{name}: not a {kind.decode().lower()} object (bad header)")
    salt = data[8:_HDR]
    try:
        body = keys.object_key(salt, kind).open(memoryview(data)[_HDR:], data[:_HDR] + context)
    except AuthError:
        raise IntegrityError(f"{name}: authentication failed (corrupt, or written for another store/key)") from None
    try:
        raw = decompress(body, OBJECT_RAW_MAX)
        shape = SHAPES[kind]
        if outside_bytes(raw, shape) is None:
            raise IntegrityError(
                f"{name}: more than {shape.budget} bytes outside its entry lists, more than a writer makes (the store "
                f"is corrupt or tampered with): {_FIX[kind]}")
        return msgpack.unpackb(raw, raw=False)
    except IntegrityError:
        raise
    except Exception as e:  # authenticated but undecodable: a bug or a format change, still an integrity failure
        raise IntegrityError(f"{name}: undecodable payload ({e})") from None
