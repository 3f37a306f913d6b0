"""Sizes read from storage are bounded before they decide an allocation or a read: pack sizes (PACK_HARD_MAX),
pack-header and index entries, and the decompressed size of sealed objects. Each violation is one IntegrityError
line naming the object. (Config and key-file bounds: tests/store/test_config_auth.py.)"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tracemalloc

import msgpack
import pytest
import zstandard

from airflow_provider_pgplakar.store import errors
from airflow_provider_pgplakar.store.index import read_segment, write_segment
from airflow_provider_pgplakar.store.objects import MAGIC, OBJECT_RAW_MAX, open_object
from airflow_provider_pgplakar.store.pack import (
    CHUNKLIST,
    CODEC_RAW,
    CODEC_ZSTD,
    DATA,
    PACK_HARD_MAX,
    Entry,
    PackBuilder,
    blob_aad,
    pack_object_name,
    parse_pack,
)
from airflow_provider_pgplakar.store.reader import CHUNKLIST_RAW_MAX, read_blob
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.writer import CHUNKLIST_REFS

MiB = 1024 * 1024


def _blob(data: bytes, store: Store) -> tuple[bytes, bytes]:
    return store.keys.blob_id(data), data


def test_pack_builder_never_exceeds_the_hard_max(store: Store) -> None:
    pb = PackBuilder(store.keys, "data")
    added = 0
    for _ in range(5):
        blob_id, data = _blob(os.urandom(9 * MiB), store)
        if not pb.fits(len(data)):
            with pytest.raises(errors.IntegrityError, match="does not fit in a pack"):
                pb.add(DATA, blob_id, CODEC_RAW, data, len(data))
            break
        pb.add(DATA, blob_id, CODEC_RAW, data, len(data))
        added += 1
    assert added == 3
    _pack_id, packed = pb.finish()
    assert len(packed) <= PACK_HARD_MAX


def test_big_fixed_blocks_at_the_largest_pack_target_stay_under_the_hard_max(location: str, tmp_path) -> None:
    """pack_target 16 MiB and 8 MiB incompressible blocks: every stored pack is at most PACK_HARD_MAX."""
    from airflow_provider_pgplakar.store.chunker import Chunking
    from tests.store.conftest import PASSPHRASE

    st = Store.create(location, PASSPHRASE, pack_target=16 * MiB, cache_dir=tmp_path / "c")
    data = os.urandom(60 * MiB)
    with st.writer() as w:
        w.add_bytes("/big", data, chunking=Chunking.fixed(8 * MiB))
    sizes = [o.size for o in st.backend.list("packs/")]
    assert sizes and max(sizes) <= PACK_HARD_MAX
    with st.open_record(st.find_record(w.snapshot_id, "/big")) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    st.close()


def _crafted_pack(store: Store, mutate) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    pb = PackBuilder(store.keys, "data")
    blob_id, data = _blob(b"some blob content" * 100, store)
    pb.add(DATA, blob_id, CODEC_RAW, data, len(data))
    pb.entries[0] = mutate(pb.entries[0])
    return pb.finish()


@pytest.mark.parametrize(("field", "value", "why"), [
    ("offset", 10 * MiB, "out of bounds"),
    ("length", 1 << 40, "out of bounds"),
    ("raw_len", 1 << 40, "out of bounds"),
    ("offset", 0, "out of bounds"),
])
def test_pack_header_entries_out_of_bounds_are_refused(store: Store, field: str, value: int, why: str) -> None:
    from dataclasses import replace

    pack_id, packed = _crafted_pack(store, lambda e: replace(e, **{field: value}))
    with pytest.raises(errors.IntegrityError) as ei:
        parse_pack(store.keys, bytes(packed), pack_object_name(pack_id))
    msg = str(ei.value)
    assert "\n" not in msg and pack_object_name(pack_id) in msg and why in msg


@pytest.mark.parametrize(("change", "why"), [
    ({"size": 1 << 40}, "size 1099511627776 out of bounds"),
    ({"id": "../../../x" + "0" * 54}, "malformed pack entry"),
    ({"blobs": [[0, b"\x01" * 32, 44, 1 << 33, 10]]}, "out of bounds"),
    ({"blobs": [[7, b"\x01" * 32, 44, 10, 10]]}, "bad type"),
])
def test_index_segment_out_of_bounds_is_a_bad_segment(store: Store, change: dict, why: str) -> None:
    pack = {"id": "ab" * 32, "size": 4096, "kind": "data", "salt": secrets.token_bytes(32),
            "blobs": [[0, b"\x01" * 32, 44, 100, 100]]}
    good = write_segment(store.backend, store.keys, [pack])
    assert read_segment(store.backend, store.keys, good)["packs"][0]["id"] == "ab" * 32
    bad = write_segment(store.backend, store.keys, [{**pack, **change}])
    with pytest.raises(errors.IntegrityError) as ei:
        read_segment(store.backend, store.keys, bad)
    assert f"index/{bad}" in str(ei.value) and why in str(ei.value)
    store.sync_index()
    assert bad in store.cache.bad_segments and good not in store.cache.bad_segments


def test_sealed_object_decompressing_beyond_the_cap_is_refused(store: Store) -> None:
    """A (validly sealed) snapshot or segment whose zstd frame declares more than OBJECT_RAW_MAX is not expanded."""
    salt = secrets.token_bytes(32)
    body = zstandard.ZstdCompressor(level=1).compress(msgpack.packb(bytes(OBJECT_RAW_MAX + MiB), use_bin_type=True))
    head = MAGIC + b"LEAS" + salt
    data = head + store.keys.object_key(salt, b"LEAS").seal(body, head)
    with pytest.raises(errors.IntegrityError, match="locks/x: undecodable payload"):
        open_object(store.keys, b"LEAS", data, "locks/x")


def test_a_planted_snapshot_name_is_reported_not_a_crash(store: Store) -> None:
    with store.writer() as w:
        w.add_bytes("/f", b"x")
    store.backend.put("snapshots/evil", b"junk")
    errs: list[str] = []
    assert [s.id for s in store.snapshots(errors=errs)] == [w.snapshot_id]
    assert len(errs) == 1 and "snapshots/evil" in errs[0] and "not a snapshot name" in errs[0]


BOMB_RAW = 256 * MiB


def zstd_bomb(size: int = BOMB_RAW) -> bytes:
    """A valid zstd frame that declares and decodes to ``size`` zero bytes in a few KiB (RLE blocks of 128 KiB)."""
    block = 128 * 1024
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xC0, (27 - 10) << 3]) + size.to_bytes(8, "little")  # 8-byte size
    count = size // block
    for i in range(count):
        frame += (int(i == count - 1) | 1 << 1 | block << 3).to_bytes(3, "little") + b"\0"
    return frame


def plant_bomb(store: Store, raw_len: int = 0) -> bytes:
    """As a key holder would (a compromised server that wrote the backups): a pack holding one validly sealed blob
    whose zstd frame expands to BOMB_RAW bytes, indexed with ``raw_len``. Returns the blob's ID."""
    blob_id = hashlib.sha256(b"bomb").digest()
    pb = PackBuilder(store.keys, "data")
    frame = zstd_bomb()
    pb.entries.append(Entry(DATA, blob_id, len(pb.buf), 0, raw_len))  # what add() would do, without its bounds
    sealed = pb.okey.seal(bytes([CODEC_ZSTD]) + frame, blob_aad(DATA, blob_id))
    pb.entries[-1] = Entry(DATA, blob_id, len(pb.buf), len(sealed), raw_len)
    pb.buf += sealed
    pack_id, data = pb.finish()
    store.backend.put(pack_object_name(pack_id), bytes(data))
    write_segment(store.backend, store.keys, [{"id": pack_id, "size": len(data), "kind": "data", "salt": pb.salt,
                                               "blobs": [[DATA, blob_id, e.offset, e.length, e.raw_len]
                                                         for e in pb.entries]}])
    store.sync_index()
    return blob_id


def traced_peak(fn) -> int:  # type: ignore[no-untyped-def]
    """Peak bytes Python allocated (on any thread) while ``fn`` ran: zstd's output buffers are counted too."""
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("raw_len", [0, 100])
def test_a_blob_is_never_expanded_beyond_its_indexed_size(store: Store, raw_len: int) -> None:
    """A zstd frame declaring more than the index's raw_len is refused before it is decompressed: ``raw_len`` 0
    used to mean "no limit" (pack.decompress), so a 16 KiB frame made a reader allocate and fill 256 MiB."""
    blob_id = plant_bomb(store, raw_len)
    failed: list[str] = []

    def read() -> None:
        with pytest.raises(errors.IntegrityError) as ei:
            read_blob(store, blob_id, DATA)
        failed.append(str(ei.value))

    assert traced_peak(read) < 32 * MiB
    assert re.fullmatch(f"blob {blob_id.hex()[:16]} in packs/[0-9a-f/]+: bad compressed data (.*)", failed[0])


def test_the_biggest_chunk_list_a_writer_makes_is_within_the_readers_bound() -> None:
    refs = [[b"\xff" * 32, 8 * MiB] for _ in range(CHUNKLIST_REFS)]
    assert len(msgpack.packb(refs, use_bin_type=True)) <= CHUNKLIST_RAW_MAX


def test_an_oversized_chunk_list_is_refused_before_it_is_unpacked(store: Store) -> None:
    """A key holder's chunk list of 4 MiB of empty lists (``[[], [], ...]``, 64 bytes of Python objects per byte)
    is refused by its size, not unpacked into 300 MiB of objects; the record is named."""
    n = 4 * MiB
    blob = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    with store.writer() as w:
        assert w._sink is not None and w._manifest is not None
        cl_id = w._sink.add(CHUNKLIST, blob)
        w._manifest.add({"p": "/evil", "k": "f", "s": 0, "cl": [cl_id]})
    record = store.find_record(w.snapshot_id, "/evil")
    failed: list[str] = []

    def read() -> None:
        with pytest.raises(errors.IntegrityError) as ei, store.open_record(record) as f:
            f.read()
        failed.append(str(ei.value))

    assert traced_peak(read) < 64 * MiB
    assert failed[0].startswith(f"record '/evil': chunk list {cl_id.hex()[:16]} is {len(blob)} bytes")
