"""A record's chunks lie adjacent in its packs, so a restore reads them in few coalesced ranged reads
(store/blobsink.py ``_place``: one encode task's blobs are sealed into the pack together). Before, the encode
threads' blobs interleaved in the open pack and a restore of a dump-like stream needed one ranged read per ~2.7
chunks (2,519 reads for 1 GiB): ten times the GETs on S3, and the CPU of each."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from airflow_provider_pgplakar.store import reader
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE

MiB = 1 << 20


def test_a_record_restores_in_few_coalesced_reads(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(24 * MiB)  # ~190 chunks, 6 encode tasks of 4 MiB, incompressible
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    with st.writer(source={"kind": "files", "origin": "layout"}) as w:
        w.add_bytes("/big", data)
    rec = st.find_record(st.snapshot_ids()[0], "/big")
    chunks = len(list(reader.chunk_refs(st, rec)))
    groups = list(reader._groups(st, rec))
    assert chunks > 120
    # 24 MiB in reads of at most 8 MiB (3), split further only at a pack boundary (16 MiB packs) and where a task's
    # blobs were placed before the previous task's (at most 5 of 6): 4 measured, 13-19 with interleaved blobs
    assert len(groups) <= 9, f"{len(groups)} ranged reads for {chunks} chunks"
    with st.open_record(rec) as r:
        assert hashlib.sha256(b"".join(r.iter_chunks())).digest() == hashlib.sha256(data).digest()
