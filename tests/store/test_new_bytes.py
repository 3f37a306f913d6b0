"""New bytes per record (store/writer.py docstring): what each record added to the store, charged once to the first
record that stored it, and adding up (with the manifest's leaves) to the snapshot header's totals. The figures are
checked against the bytes the backend actually holds under ``packs/``."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.store.chunker import DEFAULT_CDC, Chunking
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.writer import RecordInfo, SnapshotWriter
from tests.store.conftest import PASSPHRASE
from tests.store.gen_stream import dump_text, random_bytes

KiB, MiB = 1 << 10, 1 << 20
CDC_MAX = DEFAULT_CDC["max"]


@pytest.fixture
def st(tmp_path: Path):
    store = Store.create(str(tmp_path / "store"), PASSPHRASE)
    yield store
    store.close()


def _pack_bytes(st: Store) -> int:
    return sum(o.size for o in st.backend.list("packs/"))


def _assert_adds_up(st: Store, w: SnapshotWriter, infos: list[RecordInfo]) -> dict[str, Any]:
    totals = st.load_snapshot(w.snapshot_id).header["stats"]
    assert sum(i.new_raw_bytes for i in infos) + w.manifest_new.raw == totals["new_raw_bytes"]
    assert sum(i.new_stored_bytes for i in infos) + w.manifest_new.stored == totals["new_stored_bytes"]
    return dict(totals)


def test_shared_data_is_charged_to_the_first_record_only(st: Store) -> None:
    shared = random_bytes(7, 3 * MiB)
    text = dump_text(8, 2 * MiB)
    packs0 = _pack_bytes(st)
    with st.writer() as w:
        infos = [
            w.add_bytes("/a", shared),
            w.add_bytes("/b", shared + b"tail"),  # the same chunks but the last: nearly nothing new
            w.add_stream("/c", io.BytesIO(shared), chunking=Chunking.fixed(64 * KiB)),  # fixed blocks: other chunks
            w.add_stream("/d", io.BytesIO(shared), chunking=Chunking.fixed(64 * KiB)),  # ... all stored by /c
            w.add_bytes("/text", text),  # compressible: stored well below its size
            w.add_bytes("/small", b"x" * 100),  # one chunk, handed over one at a time (BlobSink.add)
            w.add_bytes("/small-again", b"x" * 100),
        ]
        w.add_entry("/dir", "d")
    totals = _assert_adds_up(st, w, infos)
    a, b, c, d, txt, small, small2 = infos
    assert len(shared) <= a.new_raw_bytes <= len(shared) + 4 * KiB  # + its chunk list
    assert len(shared) <= a.new_stored_bytes <= len(shared) + 16 * KiB  # random data: sealed, not compressed
    assert b.new_raw_bytes < 2 * MiB and b.new_stored_bytes < 2 * MiB  # at most its last chunk and a chunk list
    assert b.new_raw_bytes < a.new_raw_bytes / 2
    assert len(shared) <= c.new_raw_bytes and d.new_raw_bytes == d.new_stored_bytes == 0
    assert txt.new_raw_bytes >= len(text) and 0 < txt.new_stored_bytes < 0.8 * len(text)
    assert small.new_raw_bytes == 100 and small.new_stored_bytes > 0
    assert small2.new_raw_bytes == small2.new_stored_bytes == 0
    assert w.manifest_new.stored > 0
    # what the packs hold: the sealed blobs plus per-pack headers and trailers
    grown = _pack_bytes(st) - packs0
    assert totals["new_stored_bytes"] <= grown <= totals["new_stored_bytes"] + 64 * KiB

    with st.writer() as w2:  # the same data again: nothing new, anywhere
        again = [w2.add_bytes("/a", shared), w2.add_bytes("/b", shared + b"tail"),
                 w2.add_stream("/c", io.BytesIO(shared), chunking=Chunking.fixed(64 * KiB)),
                 w2.add_bytes("/text", text), w2.add_bytes("/small", b"x" * 100)]
    _assert_adds_up(st, w2, again)
    assert [(i.new_raw_bytes, i.new_stored_bytes) for i in again] == [(0, 0)] * len(again)


class _Slow(io.RawIOBase):
    """``data`` in small reads with a pause now and then, so that concurrent streams interleave."""

    def __init__(self, data: bytes, start: threading.Barrier) -> None:
        self.data, self.pos, self.start, self.reads = memoryview(data), 0, start, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.pos == 0:
            self.start.wait()
        n = min(len(b), 256 * KiB, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        self.reads += 1
        if self.reads % 4 == 0:
            threading.Event().wait(0.001)
        return n


def test_concurrent_streams_of_the_same_data_charge_each_chunk_once(st: Store) -> None:
    """Several streams store the same data at once (as pg/jobs.py runs dumps): each chunk is charged to exactly one
    of them, whichever claimed it first, and the records still add up to the header."""
    shared = random_bytes(11, 6 * MiB)
    own = [random_bytes(20 + i, 1 * MiB) for i in range(3)]
    start = threading.Barrier(3)
    with st.writer() as w:
        stored: list[Any] = [None] * 3

        def run(i: int) -> None:
            stored[i] = w.store_stream(f"/s{i}", io.BufferedReader(_Slow(shared + own[i], start), 1 << 20))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        infos = [w.add_stored(s) for s in stored]
    _assert_adds_up(st, w, infos)
    raw = [i.new_raw_bytes for i in infos]
    # each record brought its own 1 MiB, and the shared 6 MiB were charged once (not three times): only the chunk
    # that straddles the end of the shared part differs from stream to stream
    unique = len(shared) + sum(map(len, own))
    assert unique - CDC_MAX <= sum(raw) <= unique + 3 * CDC_MAX, raw
    assert all(r >= 1 * MiB - CDC_MAX for r in raw), raw
