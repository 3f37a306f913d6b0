"""The ingest's per-blob verification: a compressor that writes wrong bytes is caught before anything is stored.

Every path is covered: a record of several 4 MiB batches (chunks are zero-copy views, hashed, claimed and
compressed a batch per pool task), the same with fixed-size blocks (relation files of a physical backup: each block
its own buffer), and a one-batch record (chunks claimed on the caller's thread).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import blake3
import pytest
import zstandard

from airflow_provider_pgplakar.store import blobsink, errors
from airflow_provider_pgplakar.store.blobsink import BlobSink
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE


def _data(size: int, seed: int = 7) -> bytes:
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(3, 9)).hex().encode() for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rnd.choices(words, k=200)) + b"\n"
    return bytes(out[:size])


class _WrongCompressor:
    """A valid zstd frame of the right size whose content differs from the input in one byte."""

    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, data) -> bytes:
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x01
        return self._z.compress(bad)


@pytest.mark.parametrize(("size", "block"), [(200_000, 0), (11 * 1024 * 1024 + 17, 0), (9 * 1024 * 1024 + 3, 262144)],
                         ids=["one-batch", "several-batches", "fixed-blocks"])
def test_compressor_fault_is_refused_and_nothing_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          size: int, block: int) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    try:
        monkeypatch.setattr(BlobSink, "_compressor", lambda self, level: _WrongCompressor(level))
        chunking = Chunking.fixed(block) if block else Chunking()
        with pytest.raises(errors.StoreError, match="did not survive compression"):
            with st.writer() as w:
                w.add_stream("/data", io.BytesIO(_data(size)), chunking=chunking, digest=not block)
        assert st.snapshot_ids() == []
    finally:
        st.close()


def test_fixed_blocks_zero_and_incompressible_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relation-file blocks (issue 13 §3): an all-zero block and a repeated incompressible one are stored once
    (deduplicated by ID within the batch, with no special case), the incompressible one raw and without the
    decompression check (there is nothing to decompress), and the record restores byte-exact."""
    block = 64 * 1024
    noise = random.Random(5).randbytes(block)
    text = [_data(block, seed=i) for i in range(100)]  # more than one 4 MiB batch (writer.FIXED_BATCH)
    data = b"".join([*text, noise, bytes(block), bytes(block), noise, bytes(block), *text[:3], b"tail"])
    checked: list[int] = []
    real = blobsink.decompress
    monkeypatch.setattr(blobsink, "decompress", lambda z, *a: checked.append(len(out := real(z, *a))) or out)
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    try:
        with st.writer() as w:
            info = w.add_stream("/rel", io.BytesIO(data), chunking=Chunking.fixed(block), digest=False)
        stats = st.load_snapshot(w.snapshot_id).header["stats"]
        assert info.size == len(data) and info.digest is None
        assert stats["chunks"] - stats["new_chunks"] == 6  # 2 zero blocks, the noise and 3 text blocks repeated
        raw_stored = [b for b in st.cache.db.execute("SELECT len FROM blobs WHERE type = 0 AND len > ?", (block,))]
        assert len(raw_stored) == 1  # only the noise block is stored raw (sealed: a little longer than the block)
        assert checked.count(block) == 100 + 1  # every compressed block checked (text, zeros), the raw noise not
        with st.open_record(st.find_record(w.snapshot_id, "/rel")) as r:
            assert b"".join(r.iter_chunks()) == data
    finally:
        st.close()


def test_multi_batch_record_round_trips_and_dedups(tmp_path: Path) -> None:
    """Chunks handed on as views into shared 4 MiB buffers: restored byte-exact, SHA-256 as written, and an
    identical second ingest stores nothing new."""
    data = _data(9 * 1024 * 1024 + 5) + random.Random(3).randbytes(2 * 1024 * 1024)
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    try:
        ids = []
        for _ in range(2):
            with st.writer() as w:
                info = w.add_stream("/data", io.BytesIO(data))
            ids.append(w.snapshot_id)
            assert info.size == len(data) and info.digest == blake3.blake3(data).hexdigest()
        stats = [st.load_snapshot(i).header["stats"] for i in ids]
        assert stats[0]["new_chunks"] == stats[0]["chunks"] > 40
        assert stats[1]["new_chunks"] == 0 and stats[1]["chunks"] == stats[0]["chunks"]
        with st.open_record(st.find_record(ids[1], "/data")) as r:
            assert b"".join(r.iter_chunks()) == data
    finally:
        st.close()
