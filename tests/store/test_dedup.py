"""Deduplication, on both backends: what a second snapshot adds is measured in the snapshot header *and* in the
bytes actually listed under ``packs/`` in the backend before and after.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store.chunker import DEFAULT_CDC
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.gen_stream import dump_text, make_bytes, random_bytes

KiB, MiB = 1 << 10, 1 << 20
CDC_MAX = DEFAULT_CDC["max"]


def _pack_bytes(st: Store) -> int:
    return sum(o.size for o in st.backend.list("packs/"))


def _write(st: Store, files: dict[str, bytes], **kwargs: Any) -> dict[str, Any]:
    with st.writer(**kwargs) as w:
        for path, data in files.items():
            w.add_bytes(path, data)
    return st.load_snapshot(w.snapshot_id).header | {"id": w.snapshot_id}


def _assert_restores(st: Store, snap_id: str, files: dict[str, bytes]) -> None:
    recs = {r.path: r for r in st.records(snap_id)}
    assert sorted(recs) == sorted(files)
    for path, data in files.items():
        with st.open_record(recs[path]) as r:
            assert r.read() == data, f"{snap_id[:8]}:{path} did not read back byte-exact"


def _dataset() -> dict[str, bytes]:
    rng = random.Random(99)
    files = {
        "/db/dump.sql": dump_text(41, 12 * MiB),
        "/db/mixed.bin": make_bytes(42, 9 * MiB + 12345),
        "/db/random.bin": random_bytes(43, 3 * MiB),
        "/db/empty": b"",
    }
    for i in range(200):
        files[f"/small/{i:03d}"] = rng.randbytes(rng.randint(0, 4000))
    return files


def test_identical_second_snapshot_adds_under_one_percent(store: Store, location: str, tmp_path: Path) -> None:
    files = _dataset()
    total = sum(map(len, files.values()))
    packs0 = _pack_bytes(store)
    first = _write(store, files)["stats"]
    packs1 = _pack_bytes(store)
    assert first["bytes"] == total
    assert first["new_stored_bytes"] > 0.1 * total  # sanity: the first snapshot did store the data
    assert packs1 - packs0 >= first["new_stored_bytes"]

    second_header = _write(store, files)
    second = second_header["stats"]
    packs2 = _pack_bytes(store)
    assert second["bytes"] == total and second["chunks"] == first["chunks"]
    assert second["new_stored_bytes"] < 0.01 * first["new_stored_bytes"], second
    assert second["new_raw_bytes"] < 0.01 * total, second
    assert packs2 - packs1 < 0.01 * (packs1 - packs0), (packs0, packs1, packs2)

    # a third, from another instance with an empty cache (what the next scheduled run sees): same result
    other = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "fresh-cache")
    try:
        third_header = _write(other, files)
        third = third_header["stats"]
        assert third["new_stored_bytes"] < 0.01 * first["new_stored_bytes"], third
        assert _pack_bytes(other) - packs2 < 0.01 * (packs1 - packs0)
        _assert_restores(other, second_header["id"], files)
        _assert_restores(other, third_header["id"], files)
    finally:
        other.close()


def _insert_snippets(data: bytes, count: int, seed: int) -> tuple[bytes, list[int]]:
    rng = random.Random(seed)
    offsets = sorted(rng.randrange(len(data)) for _ in range(count))
    out = bytearray(data)
    for off in reversed(offsets):  # from the end, so earlier offsets stay valid
        snippet = b"-- hotfix %d\nINSERT INTO public.events VALUES (%d, 'inserted');\n" % (off, rng.randrange(10**9))
        out[off:off] = snippet * rng.randint(1, 3)
    return bytes(out), offsets


def test_copy_with_insertions_adds_only_the_changed_chunks(store: Store, location: str, tmp_path: Path) -> None:
    insertions = 5
    original = dump_text(51, 20 * MiB)
    modified, offsets = _insert_snippets(original, insertions, seed=52)
    assert len(modified) - len(original) < 1000 and len(set(offsets)) == insertions

    first = _write(store, {"/pg/dump.sql": original})
    packs1 = _pack_bytes(store)
    second_header = _write(store, {"/pg/dump.sql": modified})
    second = second_header["stats"]
    packs2 = _pack_bytes(store)

    bound = insertions * 2 * CDC_MAX  # each insertion rewrites at most the chunk it hits and its neighbour
    assert second["new_raw_bytes"] <= bound, second
    assert second["new_raw_bytes"] < len(modified) / 8, second  # far below the total
    # chunk count: at most two data chunks per insertion, plus the manifest leaf
    assert second["new_chunks"] <= 2 * insertions + 1, second
    assert second["chunks"] - second["new_chunks"] >= first["stats"]["chunks"] - 2 * insertions
    assert packs2 - packs1 <= second["new_stored_bytes"] + 64 * KiB  # what was uploaded is what the header says
    assert packs2 - packs1 < bound

    st = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "reader-cache")
    try:
        _assert_restores(st, first["id"], {"/pg/dump.sql": original})
        _assert_restores(st, second_header["id"], {"/pg/dump.sql": modified})
    finally:
        st.close()


def test_dedup_across_two_store_instances_on_one_location(store: Store, location: str, tmp_path: Path) -> None:
    """Two writers, each its own ``Store.open`` and its own (initially empty) cache: each dedups the other's data."""
    b = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "cache-b")  # opened before A writes anything
    try:
        shared = {"/app/dump.sql": dump_text(61, 8 * MiB), "/app/blob.bin": make_bytes(62, 8 * MiB)}
        only_b = {"/app/extra.bin": random_bytes(63, 3 * MiB + 7)}
        shared_bytes = sum(map(len, shared.values()))

        a1 = _write(store, shared, source={"kind": "files", "origin": "host-a"})
        packs_a1 = _pack_bytes(store)
        assert a1["stats"]["new_raw_bytes"] >= shared_bytes

        # B learns A's blobs from index/ when its writer starts: only its own extra file is new
        b1 = _write(b, shared | only_b, source={"kind": "files", "origin": "host-b"})
        extra = len(only_b["/app/extra.bin"])
        assert extra <= b1["stats"]["new_raw_bytes"] <= extra + 64 * KiB, b1["stats"]
        assert _pack_bytes(b) - packs_a1 < extra + 256 * KiB

        # ... and A dedups what B added, although A's cache has never seen B's segment
        packs_b1 = _pack_bytes(store)
        a2 = _write(store, only_b | shared)
        assert a2["stats"]["new_raw_bytes"] < 64 * KiB, a2["stats"]
        assert _pack_bytes(store) - packs_b1 < 64 * KiB

        # every snapshot reads back byte-exact through either instance
        for st in (store, b):
            _assert_restores(st, a1["id"], shared)
            _assert_restores(st, b1["id"], shared | only_b)
            _assert_restores(st, a2["id"], only_b | shared)
        assert check_mod.check(b).ok

        # a third writer in another process (the CLI, its own cache dir) dedups against both
        src = tmp_path / "src"
        src.mkdir()
        for path, data in (shared | only_b).items():
            (src / Path(path).name).write_bytes(data)
        env = {**os.environ, "PGPLAKAR_PASSPHRASE": PASSPHRASE, "PGPLAKAR_CACHE_DIR": str(tmp_path / "cache-cli")}
        code = "import sys; from airflow_provider_pgplakar.cli import main; sys.exit(main())"
        proc = subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-c", code, "--json", "at", location, "backup", str(src)],
            env=env, capture_output=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        cli = json.loads(proc.stdout)
        assert cli["stats"]["bytes"] == shared_bytes + extra
        assert cli["stats"]["new_raw_bytes"] < 64 * KiB, cli["stats"]
        recs = {r.path: r for r in b.records(cli["id"])}
        for path, data in (shared | only_b).items():
            rec = recs["/" + Path(path).name]
            assert rec.blake3 == blake3.blake3(data).digest()
            with b.open_record(rec) as r:
                assert r.read() == data
    finally:
        b.close()


def test_new_chunks_amid_deduplicated_input_are_compressed_harder(store: Store) -> None:
    """Adaptive effort: a first snapshot stores at the store's level (1); a later one that mostly deduplicates
    stores its few new chunks at level + 5 — checked on the stored length of each blob."""
    import zstandard

    from airflow_provider_pgplakar.store.blobsink import QUIET_EXTRA
    from airflow_provider_pgplakar.store.chunker import Chunking
    from airflow_provider_pgplakar.store.reader import chunk_refs

    block = 16 * KiB
    base = dump_text(51, 400 * block)  # 400 blocks that the second snapshot finds again
    change = dump_text(52, 4 * block)
    overhead = 1 + 12 + 16  # codec byte, AES-GCM nonce and tag

    def stored(snap: str, path: str) -> list[int]:
        rec = store.find_record(snap, path)
        return [store.cache.lookup(blob_id).length for blob_id, _n in chunk_refs(store, rec)]

    def zlen(data: bytes, level: int) -> int:
        return len(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)) + overhead

    with store.writer() as w:
        w.add_bytes("/base", base, chunking=Chunking.fixed(block))
    first = w.snapshot_id
    assert stored(first, "/base")[-4:] == [zlen(base[i : i + block], 1) for i in range(396 * block, 400 * block,
                                                                                     block)]
    with store.writer() as w:
        w.add_bytes("/base", base, chunking=Chunking.fixed(block))
        w.add_bytes("/change", change, chunking=Chunking.fixed(block))
    quiet = 1 + QUIET_EXTRA
    want = [zlen(change[i : i + block], quiet) for i in range(0, len(change), block)]
    assert stored(w.snapshot_id, "/change") == want
    assert want != [zlen(change[i : i + block], 1) for i in range(0, len(change), block)]  # the levels differ here
