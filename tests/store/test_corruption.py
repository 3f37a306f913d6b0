"""Damage to every kind of stored object is detected, named, and never turned into wrong bytes.

Each scenario builds two snapshots with unrelated content (A and B: disjoint packs, one index segment each), damages
one object that only A depends on, and then shows on both backends that

- ``check`` (with ``read_data`` where the damage is only visible by reading data) reports a problem whose
  ``object`` is the damaged object's key and, where records become unreadable, whose ``affects`` names A's records;
- reading an affected record raises :class:`IntegrityError` (never returns wrong bytes);
- every record of B (and A's records that do not depend on the damage) still reads back byte-exact.

Damage to index segments and snapshot files is read through a fresh cache directory, because the store's own cache
may already hold the good copy (which is correct, but would hide the damage).
"""

from __future__ import annotations

import random
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store import errors
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.index import read_segment
from airflow_provider_pgplakar.store.keyfiles import load_checked
from airflow_provider_pgplakar.store.pack import DATA, PREFIX_LEN, TRAILER_LEN, pack_object_name
from airflow_provider_pgplakar.store.prune import repair_index
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE

BIG = 300_000  # five fixed 64 KiB chunks (content-defined boundaries depend on the store's random key)
SMALL = 1_000


@dataclass
class Side:
    """One snapshot and the objects only it uses."""

    id: str
    files: dict[str, bytes]
    segment: str
    data_pack: str
    tree_pack: str

    @property
    def short(self) -> str:
        return self.id[:8]


@dataclass
class TwoSnapshots:
    store: Store
    location: str
    a: Side
    b: Side


def _payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def two(store: Store, location: str) -> TwoSnapshots:
    sides = []
    for seed, name in ((1, "a"), (2, "b")):
        files = {"/x": _payload(seed, BIG), "/y": _payload(seed + 100, SMALL)}
        with store.writer(source={"kind": "test", "origin": name}) as w:
            for path, data in files.items():
                w.add_bytes(path, data, chunking=Chunking.fixed(65536))
        header = store.load_snapshot(w.snapshot_id).header
        (segment,) = header["index_segments"]
        packs = read_segment(store.backend, store.keys, segment)["packs"]
        (data_pack,) = [p["id"] for p in packs if p["kind"] == "data"]
        (tree_pack,) = [p["id"] for p in packs if p["kind"] == "tree"]
        sides.append(Side(w.snapshot_id, files, segment, data_pack, tree_pack))
    return TwoSnapshots(store, location, *sides)


# -- helpers -----------------------------------------------------------------------------------------------------------
def flip(store: Store, key: str, offset: int) -> None:
    """Flip one bit of one byte of a stored object in place (bit rot)."""
    data = bytearray(store.backend.get(key))
    data[offset] ^= 0x01
    store.backend.put(key, bytes(data), create_only=False)


def reopen(location: str, tmp_path: Path, **kwargs: object) -> Store:
    """The store through an empty cache directory, so that nothing damaged can be served from a good local copy."""
    kwargs.setdefault("passphrase", PASSPHRASE)
    return Store.open(location, cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:8]}", **kwargs)  # type: ignore[arg-type]


def read(store: Store, snap_id: str, path: str) -> bytes:
    with store.open_record(store.find_record(snap_id, path)) as f:
        return f.read()


def assert_reads_exact(store: Store, side: Side) -> None:
    for path, data in side.files.items():
        assert read(store, side.id, path) == data, f"{side.short}:{path} did not read back byte-exact"


def assert_unreadable(store: Store, snap_id: str, path: str, names: str) -> None:
    with pytest.raises(errors.IntegrityError) as ei:
        read(store, snap_id, path)
    assert names in str(ei.value)


def problems_for(rep: check_mod.CheckReport, obj: str) -> list[check_mod.Problem]:
    return [p for p in rep.problems if p.object == obj]


def all_affects(rep: check_mod.CheckReport) -> list[str]:
    return [a for p in rep.problems for a in p.affects]


def data_blob_of(store: Store, snap_id: str, path: str) -> tuple[str, int, int]:
    """(pack key, offset, length) of the first content chunk of a record."""
    rec = store.find_record(snap_id, path)
    blob_id = next(chunk_refs(store, rec))[0]
    loc = store.cache.lookup(blob_id)
    assert loc is not None and loc.blob_type == DATA
    return pack_object_name(loc.pack_id), loc.offset, loc.length


# -- pack data ---------------------------------------------------------------------------------------------------------
def test_flipped_data_blob(two: TwoSnapshots) -> None:
    st, a, b = two.store, two.a, two.b
    pack, off, length = data_blob_of(st, a.id, "/x")
    assert pack == pack_object_name(a.data_pack)
    flip(st, pack, off + length // 2)

    # metadata alone cannot see damaged content: only reading it can
    assert check_mod.check(st).ok
    rep = check_mod.check(st, read_data=True)
    assert not rep.ok
    named = problems_for(rep, pack)
    assert named, rep.problems
    assert any("SHA-256" in p.message for p in named)  # the pack no longer matches its content-addressed name
    assert any("corrupt" in p.message for p in named)
    assert f"snapshot {a.short} record '/x'" in all_affects(rep)
    assert all(b.short not in x and "'/y'" not in x for x in all_affects(rep)), rep.problems

    assert_unreadable(st, a.id, "/x", pack)
    assert read(st, a.id, "/y") == a.files["/y"]  # same pack, other blob: intact and still authenticated
    assert_reads_exact(st, b)


def test_flipped_data_blob_never_yields_wrong_bytes_in_a_stream(two: TwoSnapshots) -> None:
    """Reading chunk by chunk: whatever came out before the error is a correct prefix; the bad chunk never comes."""
    st, a = two.store, two.a
    rec = st.find_record(a.id, "/x")
    refs = list(chunk_refs(st, rec))
    assert len(refs) == 5
    last_blob = refs[-1][0]
    loc = st.cache.lookup(last_blob)
    assert loc is not None
    flip(st, pack_object_name(loc.pack_id), loc.offset + loc.length - 1)  # inside the last chunk's tag
    got = bytearray()
    with pytest.raises(errors.IntegrityError), st.open_record(rec) as f:
        for piece in f.iter_chunks():
            got += piece
    assert a.files["/x"].startswith(bytes(got)) and len(got) < len(a.files["/x"])


# -- pack header -------------------------------------------------------------------------------------------------------
def test_flipped_pack_header(two: TwoSnapshots, tmp_path: Path) -> None:
    """Decision: a damaged pack header does not make data unreadable.

    Reads locate blobs through the index (segments), and every blob is sealed on its own with its ID in the AAD, so
    reads still return exactly the right bytes. The header is only the redundancy that ``repair index`` rebuilds the
    index from; ``check --read-data`` reports it so the pack can be replaced, and repairing the index keeps the
    pack's entries from the readable segment instead of dropping the only map to intact data.
    """
    st, a, b = two.store, two.a, two.b
    pack = pack_object_name(a.data_pack)
    raw = st.backend.get(pack)
    (hlen,) = struct.unpack("<I", raw[-TRAILER_LEN:-4])
    flip(st, pack, len(raw) - TRAILER_LEN - hlen // 2)

    assert check_mod.check(st).ok  # sizes and index agree: only reading shows it
    rep = check_mod.check(st, read_data=True)
    named = problems_for(rep, pack)
    assert any("header" in p.message for p in named), rep.problems
    assert not all_affects(rep), "no record is unreadable, so none should be reported as affected"
    assert {p.object for p in rep.problems} == {pack}

    fresh = reopen(two.location, tmp_path)
    assert_reads_exact(fresh, a)
    assert_reads_exact(fresh, b)

    st.leases.release_read()  # the first reader is done (repair index, like prune, waits for readers)
    repair_index(fresh)
    again = reopen(two.location, tmp_path)
    assert_reads_exact(again, a)
    assert_reads_exact(again, b)


# -- index segment -----------------------------------------------------------------------------------------------------
def test_flipped_index_segment_then_repair(two: TwoSnapshots, tmp_path: Path) -> None:
    st, a, b = two.store, two.a, two.b
    seg_key = f"index/{a.segment}"
    flip(st, seg_key, len(st.backend.get(seg_key)) // 2)

    rep = check_mod.check(st)  # metadata check already sees it
    assert problems_for(rep, seg_key), rep.problems
    affected = all_affects(rep)
    assert any(f"snapshot {a.short}" in x for x in affected), rep.problems
    assert not any(b.short in x for x in affected), rep.problems

    fresh = reopen(two.location, tmp_path)
    with pytest.raises(errors.IntegrityError) as ei:
        read(fresh, a.id, "/x")
    assert "repair index" in str(ei.value)
    assert_reads_exact(fresh, b)

    st.leases.release_read()  # the first reader is done (repair index, like prune, waits for readers)
    assert repair_index(fresh) == 4  # 2 data + 2 tree packs, from their headers
    assert_reads_exact(fresh, a)
    assert_reads_exact(reopen(two.location, tmp_path), a)
    assert check_mod.check(fresh, read_data=True).ok


# -- snapshot file -----------------------------------------------------------------------------------------------------
def test_flipped_snapshot_file(two: TwoSnapshots, tmp_path: Path) -> None:
    st, a, b = two.store, two.a, two.b
    key = f"snapshots/{a.id}"
    flip(st, key, len(st.backend.get(key)) // 2)

    rep = check_mod.check(st)
    assert [p.object for p in rep.problems] == [key], rep.problems
    assert rep.snapshots == 1

    fresh = reopen(two.location, tmp_path)
    with pytest.raises(errors.IntegrityError, match=key):
        fresh.load_snapshot(a.id)
    with pytest.raises(errors.IntegrityError, match=key):
        read(fresh, a.id, "/y")
    errs: list[str] = []
    assert [s.id for s in fresh.snapshots(errors=errs)] == [b.id]
    assert len(errs) == 1 and key in errs[0]
    assert_reads_exact(fresh, b)


def test_swapped_snapshot_names(two: TwoSnapshots, tmp_path: Path) -> None:
    """A snapshot file copied under another snapshot's name fails: the AAD binds the snapshot ID."""
    st, a, b = two.store, two.a, two.b
    st.backend.put(f"snapshots/{b.id}", st.backend.get(f"snapshots/{a.id}"), create_only=False)

    rep = check_mod.check(st)
    assert [p.object for p in rep.problems] == [f"snapshots/{b.id}"], rep.problems

    fresh = reopen(two.location, tmp_path)
    with pytest.raises(errors.IntegrityError, match=f"snapshots/{b.id}"):
        fresh.load_snapshot(b.id)
    assert_reads_exact(fresh, a)


# -- manifest (tree pack) ----------------------------------------------------------------------------------------------
def test_flipped_manifest_leaf(two: TwoSnapshots, tmp_path: Path) -> None:
    st, a, b = two.store, two.a, two.b
    pack = pack_object_name(a.tree_pack)
    flip(st, pack, PREFIX_LEN + 20)  # inside the first (only) manifest leaf

    rep = check_mod.check(st)  # the metadata check reads manifests, so it sees this without read_data
    assert any(pack in p.message and f"snapshot {a.short} (all records)" in p.affects for p in rep.problems), \
        rep.problems
    assert not any(b.short in x for x in all_affects(rep))
    assert problems_for(check_mod.check(st, read_data=True), pack)

    fresh = reopen(two.location, tmp_path)
    with pytest.raises(errors.IntegrityError, match=pack):
        list(fresh.records(a.id))
    assert_reads_exact(fresh, b)


# -- truncated pack ----------------------------------------------------------------------------------------------------
def test_truncated_pack(two: TwoSnapshots) -> None:
    st, a, b = two.store, two.a, two.b
    pack = pack_object_name(a.data_pack)
    full = st.backend.get(pack)
    st.backend.put(pack, full[: PREFIX_LEN + 10], create_only=False)  # every blob is cut

    rep = check_mod.check(st)  # metadata only: the listed size differs from the indexed one
    named = problems_for(rep, pack)
    assert any(f"size {PREFIX_LEN + 10} differs from indexed {len(full)}" in p.message for p in named), rep.problems
    affected = all_affects(rep)
    assert f"snapshot {a.short} record '/x'" in affected and f"snapshot {a.short} record '/y'" in affected
    assert not any(b.short in x for x in affected)

    assert_unreadable(st, a.id, "/x", pack)
    assert_unreadable(st, a.id, "/y", pack)
    assert_reads_exact(st, b)


# -- config and key files ----------------------------------------------------------------------------------------------
def test_flipped_config(two: TwoSnapshots, tmp_path: Path) -> None:
    st = two.store
    good = st.backend.get("config")
    for offset in sorted({*range(0, len(good), max(1, len(good) // 6)), len(good) - 2}):
        flip(st, "config", offset)
        with pytest.raises(errors.IntegrityError) as ei:
            reopen(two.location, tmp_path)
        msg = str(ei.value)
        assert "config" in msg and "corrupt" in msg and "\n" not in msg, (offset, msg)
        st.backend.put("config", good, create_only=False)
    assert_reads_exact(reopen(two.location, tmp_path), two.a)


def test_flipped_key_file(two: TwoSnapshots, tmp_path: Path) -> None:
    st, a = two.store, two.a
    raw_key = st.export_key()
    (key_name,) = [o.key for o in st.backend.list("keys/")]
    flip(st, key_name, len(st.backend.get(key_name)) // 2)

    # the only key file is damaged: that is not a wrong passphrase, and the error says which file
    with pytest.raises(errors.IntegrityError) as ei:
        reopen(two.location, tmp_path)
    msg = str(ei.value)
    assert key_name in msg and "corrupt" in msg and "\n" not in msg and PASSPHRASE not in msg

    # the raw key needs no key file: the data is intact, and check names the damaged key file
    by_key = reopen(two.location, tmp_path, passphrase=None, key=raw_key)
    assert_reads_exact(by_key, a)
    rep = check_mod.check(by_key)
    assert [p.object for p in rep.problems] == [key_name], rep.problems


def test_flipped_one_of_two_key_files(two: TwoSnapshots, tmp_path: Path) -> None:
    st, a = two.store, two.a
    (first,) = [o.key for o in st.backend.list("keys/")]
    second = f"keys/{st.add_key('another passphrase')}"
    flip(st, first, len(st.backend.get(first)) // 2)

    assert_reads_exact(reopen(two.location, tmp_path, passphrase="another passphrase"), a)
    with pytest.raises(errors.WrongPassphrase) as ei:  # its own key file is the damaged one
        reopen(two.location, tmp_path)
    msg = str(ei.value)
    assert first in msg and "corrupt" in msg and second not in msg.split("also", 1)[-1]
    assert load_checked(st.backend.get(second), second)
