"""pack.decode_blob_into, the batched restore's decoder: content lands in the caller's buffer only as the blob's
verified bytes; a frame that declares another size, ends early or decodes to other bytes is an IntegrityError."""

from __future__ import annotations

import os

import pytest
import zstandard

from airflow_provider_pgplakar.store.crypto import Keys
from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.pack import (
    CODEC_RAW,
    CODEC_ZSTD,
    DATA,
    blob_aad,
    decode_blob,
    decode_blob_into,
    pack_key,
)

KEYS = Keys.from_master(bytes(range(64)))
OKEY = pack_key(KEYS, bytes(32))
CONTENT = os.urandom(3000) * 100  # compressible, 300 000 bytes
BLOB_ID = KEYS.blob_id(CONTENT)


def _sealed(codec: int, payload: bytes, blob_id: bytes = BLOB_ID) -> bytes:
    return OKEY.seal(bytes([codec]) + payload, blob_aad(DATA, blob_id))


def _decode(sealed: bytes, raw_len: int = len(CONTENT), blob_id: bytes = BLOB_ID) -> memoryview:
    out = memoryview(bytearray(len(CONTENT) + 100))
    return decode_blob_into(OKEY, DATA, blob_id, sealed, raw_len, KEYS, "pack p", out)


@pytest.mark.parametrize("codec", [CODEC_ZSTD, CODEC_RAW])
def test_decodes_as_decode_blob_does(codec: int) -> None:
    payload = zstandard.ZstdCompressor(level=3).compress(CONTENT) if codec == CODEC_ZSTD else CONTENT
    sealed = _sealed(codec, payload)
    got = _decode(sealed)
    assert bytes(got) == CONTENT == decode_blob(OKEY, DATA, BLOB_ID, sealed, len(CONTENT), KEYS, "pack p")


@pytest.mark.parametrize("case,match", [
    ("declared_other_size", "bad compressed data"),
    ("truncated", "bad compressed data"),
    ("no_content_size", "bad compressed data"),
    ("other_content", "content does not match its ID"),
    ("raw_wrong_length", "content does not match its ID"),
    ("tampered", "authentication failed"),
])
def test_bad_blobs_are_refused(case: str, match: str) -> None:
    frame = zstandard.ZstdCompressor(level=3).compress(CONTENT)
    raw_len, codec = len(CONTENT), CODEC_ZSTD
    if case == "declared_other_size":
        frame = zstandard.ZstdCompressor(level=3).compress(CONTENT + b"x")
    elif case == "truncated":
        frame = frame[: len(frame) // 2]
    elif case == "no_content_size":
        frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(CONTENT)
    elif case == "other_content":
        frame = zstandard.ZstdCompressor(level=3).compress(CONTENT[:-1] + b"!")
    elif case == "raw_wrong_length":
        codec, frame = CODEC_RAW, CONTENT[:-1]
    sealed = bytearray(_sealed(codec, frame))
    if case == "tampered":
        sealed[40] ^= 1
    with pytest.raises(IntegrityError, match=f"blob {BLOB_ID.hex()[:16]} in pack p: {match}"):
        _decode(bytes(sealed), raw_len)


def test_a_buffer_too_small_is_a_caller_bug() -> None:
    sealed = _sealed(CODEC_RAW, CONTENT)
    with pytest.raises(ValueError, match="output buffer"):
        decode_blob_into(OKEY, DATA, BLOB_ID, sealed, len(CONTENT), KEYS, "pack p", memoryview(bytearray(10)))
