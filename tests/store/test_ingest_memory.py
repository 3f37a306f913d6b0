"""An ingest's batch buffers are bounded by its design, not by thread timing (store/writer.py ``_cdc_refs``): a
content-defined record holds at most one 4 MiB batch per encode worker in the pool, ``CDC_QUEUED`` more waiting
there and ``2 × DEPTH + 2`` in the read-ahead. Counting buffers is exact where peak RSS is not: glibc keeps tens
of MiB of freed memory in its arenas, a different amount every run, so an RSS bound tight enough to notice 20 MiB
would be flaky. The code this bound fixed took 11-12 buffers (48 MiB) here on 2 cores: the first two batches
pinned for the whole record, stale loop variables in every thread, a deeper read-ahead and the sink's
``2 × workers + 2`` slots."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import blake3
import pytest

from airflow_provider_pgplakar.store.chunker import CDC_BATCH
from airflow_provider_pgplakar.store.readahead import DEPTH
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.writer import CDC_QUEUED
from tests.store.conftest import PASSPHRASE
from tests.store.gen_stream import dump_text

MiB = 1 << 20


def test_a_content_defined_record_holds_at_most_workers_plus_five_batch_buffers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    taken: list[bytearray] = []
    take = st.chunker._take

    def counting_take(size: int) -> bytearray:  # the real method: only counts the buffers a record allocates
        buf = take(size)
        taken.append(buf)
        return buf

    monkeypatch.setattr(st.chunker, "_take", counting_take)
    # COPY-like text (compresses ~5:3): the encode pool, not the read, is the slow stage, so every queue fills
    data = dump_text(41, 64 * MiB)
    with st.writer(source={"kind": "files", "origin": "buffers"}) as w:
        w.add_stream("/big", io.BytesIO(data))
        sink: Any = w._sink
        workers = sink.workers
    bound = workers + CDC_QUEUED + 2 * DEPTH + 2
    n = len({id(b) for b in taken})
    assert n == len(taken)
    assert len(data) // CDC_BATCH >= 2 * bound  # long enough to fill the pipeline (12 buffers before the fix)
    assert n <= bound, f"{n} batch buffers for one record, the design allows {bound}"
    assert n <= 9, f"{n} batch buffers ({n * CDC_BATCH // MiB} MiB) for one record"

    rec = st.find_record(st.snapshot_ids()[0], "/big")
    assert rec.size == len(data) and rec.blake3 == blake3.blake3(data).digest()
    reader = Store.open(str(tmp_path / "store"), PASSPHRASE, cache_dir=tmp_path / "reader-cache")
    try:
        with reader.open_record(reader.find_record(reader.snapshot_ids()[0], "/big")) as r:
            assert r.read() == data
    finally:
        reader.close()
        st.close()
