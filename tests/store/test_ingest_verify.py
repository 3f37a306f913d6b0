"""The ingest's per-blob verification: a compressor that writes wrong bytes is caught before anything is stored.

Every path is covered: a record of several 4 MiB batches (chunks are zero-copy views, hashed, claimed and
compressed a batch per pool task, each batch in one ``multi_compress_to_buffer`` call and checked in one
``multi_decompress_to_buffer`` call), the same with fixed-size blocks (relation files of a physical backup), a
compressor without the batch calls (one call per blob), and a one-batch record (chunks claimed on the caller's
thread).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import blake3
import pytest
import zstandard

from airflow_provider_pgplakar.store import errors
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
    """A valid zstd frame of the right size whose content differs from the input in one byte (per-blob calls only,
    like python-zstandard's CFFI backend)."""

    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def compress(self, data) -> bytes:
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0x01
        return self._z.compress(bad)


class _WrongBatchCompressor(_WrongCompressor):
    """The batch call too; one blob of each batch comes out wrong (``mode`` "byte": a valid frame of other bytes;
    "frame": a frame that does not decode at all)."""

    def __init__(self, level: int, mode: str) -> None:
        super().__init__(level)
        self.mode = mode

    def multi_compress_to_buffer(self, data, threads: int = 0):
        frames = [bytes(f) for f in self._z.multi_compress_to_buffer(data, threads=threads)]
        victim = len(frames) // 2
        frames[victim] = self.compress(data[victim]) if self.mode == "byte" else frames[victim][:-7] + bytes(7)
        return frames


FAULTS = {
    "per-blob": lambda level: _WrongCompressor(level),
    "batch-wrong-bytes": lambda level: _WrongBatchCompressor(level, "byte"),
    "batch-bad-frame": lambda level: _WrongBatchCompressor(level, "frame"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize(("size", "block"), [(200_000, 0), (11 * 1024 * 1024 + 17, 0), (9 * 1024 * 1024 + 3, 262144)],
                         ids=["one-batch", "several-batches", "fixed-blocks"])
def test_compressor_fault_is_refused_and_nothing_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          size: int, block: int, fault: str) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    try:
        monkeypatch.setattr(BlobSink, "_compressor", lambda self, level: FAULTS[fault](level))
        chunking = Chunking.fixed(block) if block else Chunking()
        with pytest.raises(errors.StoreError, match="did not survive compression"):
            with st.writer() as w:
                w.add_stream("/data", io.BytesIO(_data(size)), chunking=chunking)
        assert st.snapshot_ids() == []
    finally:
        st.close()


def test_fixed_blocks_round_trip_through_batch_calls(tmp_path: Path) -> None:
    """Fixed-size blocks (compressible, incompressible and repeated ones in one batch) stored through the batch
    calls: restored byte-exact, each distinct block stored once, the incompressible ones raw."""
    block = 64 * 1024
    rnd = random.Random(5)
    noise = rnd.randbytes(block)
    text = [_data(block, seed=i) for i in range(100)]  # more than one 4 MiB batch (FIXED_BATCH)
    data = b"".join([*text, noise, bytes(block), bytes(block), noise, *text[:3], b"tail"])
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    try:
        with st.writer() as w:
            info = w.add_stream("/rel", io.BytesIO(data), chunking=Chunking.fixed(block), digest=False)
        stats = st.load_snapshot(w.snapshot_id).header["stats"]
        assert info.size == len(data)
        assert stats["chunks"] - stats["new_chunks"] == 5  # repeats stored once: a zero block, noise, 3 text blocks
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
