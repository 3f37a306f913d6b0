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
    TREE,
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


# -- msgpack decoded only within what writers make (store/msgshape.py): pack headers, sealed objects, leaves -------

@pytest.fixture
def local_store(tmp_path):  # type: ignore[no-untyped-def]
    from tests.store.conftest import PASSPHRASE

    st = Store.create(str(tmp_path / "store"), PASSPHRASE, cache_dir=tmp_path / "c")
    yield st
    st.close()


def _pack_with_header(store: Store, plain_header: bytes) -> tuple[str, bytes]:
    import struct

    from airflow_provider_pgplakar.store.pack import END

    pb = PackBuilder(store.keys, "data")
    blob_id, data = _blob(b"some blob content" * 100, store)
    pb.add(DATA, blob_id, CODEC_RAW, data, len(data))
    header = pb.okey.seal(plain_header, b"PGPH" + pb.salt)
    packed = bytes(pb.buf) + header + struct.pack("<I", len(header)) + END
    return hashlib.sha256(packed).hexdigest(), packed


def test_a_pack_header_of_empty_lists_is_refused_before_it_is_unpacked(local_store: Store) -> None:
    """A key holder's pack header of 4 MiB of ``[[], [], ...]`` (a pack may be 32 MiB) is refused by its shape, not
    unpacked into 270 MB of list objects (check --read-data, repair index and prune's repack parse headers)."""
    n = 4 * MiB
    pack_id, packed = _pack_with_header(local_store, b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n)
    failed: list[str] = []

    def parse() -> None:
        with pytest.raises(errors.IntegrityError) as ei:
            parse_pack(local_store.keys, packed, pack_object_name(pack_id))
        failed.append(str(ei.value))

    assert traced_peak(parse) < 48 * MiB
    assert "\n" not in failed[0] and failed[0].startswith(f"{pack_object_name(pack_id)}: the pack header is not")
    assert "check --read-data" in failed[0]


def test_pack_headers_with_every_integer_width_parse(local_store: Store) -> None:
    """The header check accepts every encoding msgpack gives the writer's integers (fixint, uint8 .. uint32)."""
    pb = PackBuilder(local_store.keys, "tree")
    sizes = [1, 200, 70_000, 300_000]
    for i, size in enumerate(sizes):
        blob_id, data = _blob(os.urandom(size), local_store)
        pb.add(TREE if i % 2 else CHUNKLIST, blob_id, CODEC_RAW, data, size)
    pack_id, packed = pb.finish()
    _salt, entries = parse_pack(local_store.keys, bytes(packed), pack_object_name(pack_id))
    assert [e.raw_len for e in entries] == sizes and entries[0].offset == 44


def _raw_object(store: Store, kind: bytes, raw: bytes, context: bytes = b"") -> bytes:
    """A validly sealed object of ``kind`` whose payload is ``raw`` (what only a key holder can make)."""
    salt = secrets.token_bytes(32)
    head = MAGIC + kind + salt
    return head + store.keys.object_key(salt, kind).seal(zstandard.ZstdCompressor(level=1).compress(raw),
                                                         head + context)


def _empty_lists_under(key: str, n: int) -> bytes:
    return b"\x81" + msgpack.packb(key) + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


@pytest.mark.parametrize(("kind", "budget", "fix"), [
    (b"SNAP", 8 * MiB, "restore another snapshot, or forget this one"),
    (b"INDX", MiB, "repair index"),
    (b"LEAS", 64 * 1024, "ignored"),
    (b"INTN", 64 * 1024, "delete it and run `pgplakar check`"),
])
def test_sealed_objects_beyond_what_writers_make_are_refused_before_they_are_unpacked(
        local_store: Store, kind: bytes, budget: int, fix: str) -> None:
    """Outside their entry lists, a snapshot file holds at most 8 MiB, a segment 1 MiB, a lease or an intent 64 KiB:
    one byte more of ``[[], ...]`` is refused unread (the snapshot's 8 MiB used to become 600 MB of objects, and
    OBJECT_RAW_MAX's 64 MiB 4.6 GB)."""
    data = _raw_object(local_store, kind, _empty_lists_under("meta", budget + 1))
    failed: list[str] = []

    def read() -> None:
        with pytest.raises(errors.IntegrityError) as ei:
            open_object(local_store.keys, kind, data, "x/name")
        failed.append(str(ei.value))

    assert traced_peak(read) < 48 * MiB
    assert "\n" not in failed[0] and failed[0].startswith(f"x/name: more than {budget} bytes outside its entry lists")
    assert failed[0].rstrip("`").endswith(fix.rstrip("`"))


def test_a_snapshot_with_many_leaves_and_a_large_meta_opens(local_store: Store) -> None:
    """The leaf list is bounded by OBJECT_RAW_MAX only (300 000 leaves: ~7 million records), meta by 8 MiB."""
    leaves = [[os.urandom(32), i % 9000] for i in range(300_000)]
    meta = {"new_raw_bytes": {f"/db{i}.dump": i for i in range(100_000)}}
    header = {"v": 1, "manifest": {"leaves": leaves}, "meta": meta, "index_segments": ["ab" * 32] * 20}
    from airflow_provider_pgplakar.store.objects import seal_object

    data = seal_object(local_store.keys, b"SNAP", header, b"ctx")
    assert len(msgpack.packb(header)) > 10 * MiB
    assert open_object(local_store.keys, b"SNAP", data, "s", b"ctx") == header
    with pytest.raises(errors.StoreError, match="SNAP object too big: more than 8388608 bytes outside"):
        seal_object(local_store.keys, b"SNAP", {**header, "meta": {"x": "y" * (8 * MiB)}}, b"ctx")


def test_a_segment_with_a_pack_of_many_blobs_is_read(local_store: Store) -> None:
    """A pack of the smallest blobs can have ~400 000 entries, and a segment never splits a pack."""
    blobs = [[0, os.urandom(32), 44 + 80 * i, 80, 50 + i % 300] for i in range(200_000)]
    pack = {"id": "ab" * 32, "size": 44 + 80 * 200_000 + 8, "kind": "data", "salt": os.urandom(32), "blobs": blobs}
    seg = write_segment(local_store.backend, local_store.keys, [pack], ["cd" * 32] * 3)
    assert read_segment(local_store.backend, local_store.keys, seg)["packs"][0]["blobs"] == blobs


def _plant_leaf(w, leaf: bytes, count: int) -> bytes:  # type: ignore[no-untyped-def]
    leaf_id = w._sink.add(TREE, leaf)
    w._manifest.leaves.append([leaf_id, count])
    w._manifest.total += count
    return leaf_id  # type: ignore[no-any-return]


def test_an_oversized_manifest_leaf_is_refused_before_it_is_unpacked(local_store: Store) -> None:
    """A leaf holds at most 2 MiB outside its records' chunk-list IDs: a key holder's record whose meta is 3 MiB of
    empty lists is refused unread (200 MB of objects before; a 16 MiB leaf made 1.2 GB), naming the snapshot."""
    n = 3 * MiB
    evil = b"\x84\xa1p\xa5/evil\xa1k\xa1d\xa1x" + _empty_lists_under("junk", n)
    with local_store.writer() as w:
        w.add_entry("/ok", "d")
        leaf_id = _plant_leaf(w, evil, 1)
    failed: list[str] = []

    def read() -> None:
        with pytest.raises(errors.IntegrityError) as ei:
            list(local_store.records(w.snapshot_id))
        failed.append(str(ei.value))

    assert traced_peak(read) < 48 * MiB
    assert "\n" not in failed[0] and failed[0].startswith(
        f"snapshot {w.snapshot_id[:8]}: manifest leaf {leaf_id.hex()[:16]} holds more than 2097152 bytes")


def test_a_big_truncated_leaf_is_an_integrity_error(local_store: Store) -> None:
    ids = msgpack.packb({"p": "/huge", "k": "f", "s": 0, "cl": [os.urandom(32) for _ in range(100_000)]})
    with local_store.writer() as w:
        leaf_id = _plant_leaf(w, ids[:-10], 1)
    with pytest.raises(errors.IntegrityError, match=f"manifest leaf {leaf_id.hex()[:16]} is undecodable"):
        list(local_store.records(w.snapshot_id))


def test_a_record_of_a_huge_file_with_many_chunk_lists_is_read_and_big_meta_is_refused(local_store: Store) -> None:
    """A 3 TiB file's record has ~300 000 chunk-list IDs (10 MiB): its leaf is over 2 MiB but nearly all of it is
    IDs, which readers accept; a record with more than 1 MiB of anything else is refused by the writer."""
    from airflow_provider_pgplakar.store.writer import RECORD_OTHER_MAX

    ids = [os.urandom(32) for _ in range(300_000)]
    with local_store.writer() as w:
        assert w._manifest is not None
        w._manifest.add({"p": "/huge", "k": "f", "s": 0, "cl": ids, "x": {"note": "n" * (RECORD_OTHER_MAX // 2)}})
    (rec,) = local_store.records(w.snapshot_id)
    assert list(rec.chunk_list_ids()) == ids
    with pytest.raises(errors.StoreError, match="record '/f': more than 1048576 bytes of path, attributes and meta"), \
            local_store.writer() as w2:
        w2.add_bytes("/f", b"x", meta={"note": "n" * RECORD_OTHER_MAX})
    assert [s.id for s in local_store.snapshots()] == [w.snapshot_id]


# -- zero-length chunk references -------------------------------------------------------------------------------

@pytest.mark.parametrize("as_list", [False, True])
def test_zero_length_chunk_references_are_refused(local_store: Store, as_list: bool) -> None:
    """A record may point any number of times at one chunk list; refs of 0 bytes (which no writer makes) would let
    a restore spin through them writing nothing. Both restore paths take refs from reader.chunk_refs."""
    from airflow_provider_pgplakar.store.reader import chunk_refs

    with local_store.writer() as w:
        assert w._sink is not None and w._manifest is not None
        empty = w._sink.add(DATA, b"")
        refs = [[empty, 0]] * 100
        if as_list:
            cl = w._sink.add(CHUNKLIST, msgpack.packb(refs, use_bin_type=True))
            w._manifest.add({"p": "/zero", "k": "f", "s": 0, "cl": [cl] * 1000})
        else:
            w._manifest.add({"p": "/zero", "k": "f", "s": 0, "c": refs})
    record = local_store.find_record(w.snapshot_id, "/zero")
    with pytest.raises(errors.IntegrityError) as ei:
        next(chunk_refs(local_store, record))
    assert str(ei.value).startswith("record '/zero': a chunk reference of 0 bytes, which no writer makes")
    with pytest.raises(errors.IntegrityError, match="a chunk reference of 0 bytes"), \
            local_store.open_record(record) as f:
        f.read()


def test_what_writers_make_matches_the_shapes_readers_check(local_store: Store, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Snapshot files, segments (a backup's, prune's, repair index's) and intents as the writers make them: with the
    budgets cut to a few hundred bytes, every entry list must have the exact encoding the readers match, or this
    fails (at the budgets in use, a writer's object is rarely big enough to be walked at all)."""
    from airflow_provider_pgplakar.store import intents, prune
    from airflow_provider_pgplakar.store.check import check
    from airflow_provider_pgplakar.store.objects import SHAPES

    monkeypatch.setenv("PGPLAKAR_PRUNE_SETTLE", "0")
    monkeypatch.setenv("PGPLAKAR_PRUNE_GRACE", "0")
    for kind, budget in ((b"SNAP", 2048), (b"INDX", 64), (b"INTN", 64)):
        monkeypatch.setattr(SHAPES[kind], "budget", budget)
    sids = []
    for run in range(2):
        with local_store.writer(meta={"run": run}) as w:
            for i in range(300):
                w.add_bytes(f"/f{i}", os.urandom(100 + i) if run or i % 2 else b"same %d" % i)
        sids.append(w.snapshot_id)
    assert len(local_store.load_snapshot(sids[1]).header["manifest"]["leaves"]) > 3
    local_store.forget([sids[0]])
    report = prune.prune(local_store)
    assert report.packs_deleted + report.packs_repacked > 0
    assert prune.repair_index(local_store) > 0
    intent = intents.write_intent(local_store, {"ab" * 32, "cd" * 32}, {"ef" * 32})
    assert [i.packs for i in intents.list_intents(local_store)] == [intent.packs]
    intents.delete_intent(local_store, intent)
    assert not check(local_store, read_data=True).problems
    rec = local_store.find_record(sids[1], "/f299")
    with local_store.open_record(rec) as f:
        assert len(f.read()) == 399


def test_a_stream_stops_once_its_chunks_exceed_the_records_size(local_store: Store) -> None:
    """Refs of 1 byte, many times over, under a record of 10 bytes: the stream (logical restores, ``cat``) fails
    after the 10th byte instead of returning every referenced byte before its end-of-record check."""
    with local_store.writer() as w:
        assert w._sink is not None and w._manifest is not None
        one = w._sink.add(DATA, b"a")
        w._manifest.add({"p": "/ten", "k": "f", "s": 10, "c": [[one, 1]] * 200})
    got = 0
    with pytest.raises(errors.IntegrityError, match="chunks hold more than the 10 bytes the manifest says"), \
            local_store.open_record(local_store.find_record(w.snapshot_id, "/ten")) as f:
        for piece in f.iter_chunks():
            got += len(piece)
    assert got == 10
