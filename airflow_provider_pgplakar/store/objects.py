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
from .errors import IntegrityError
from .pack import decompress

MAGIC = b"PGPO"
OBJECT_RAW_MAX = 64 * 1024 * 1024  # decompressed payload: a 100 000-entry index segment is ~6 MB
KINDS = (b"INDX", b"SNAP", b"LEAS", b"INTN")
_HDR = len(MAGIC) + 4 + SALT_LEN


def seal_object(keys: Keys, kind: bytes, payload: Any, context: bytes = b"") -> bytes:
    assert kind in KINDS
    salt = secrets.token_bytes(SALT_LEN)
    body = zstandard.ZstdCompressor(level=3).compress(msgpack.packb(payload, use_bin_type=True))
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
        return msgpack.unpackb(decompress(body, OBJECT_RAW_MAX), raw=False)
    except Exception as e:  # authenticated but undecodable: a bug or a format change, still an integrity failure
        raise IntegrityError(f"{name}: undecodable payload ({e})") from None
