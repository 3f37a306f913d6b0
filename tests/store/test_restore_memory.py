"""A restore's memory does not grow with the data, however well it compresses: the reader's coalesced ranged reads
are bounded in decoded bytes, not only in stored bytes (store/reader.py ``MAX_GROUP_RAW``). Before that bound, a
pgbench dump compressing 80:1 put hundreds of MiB of decoded chunks in one prefetched read (a scale-50 restore
peaked at 548 MiB)."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_pgplakar.store import reader
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE

MiB = 1 << 20


class _Compressible:
    """Distinct 64 KiB blocks (a counter, then zeros): compresses well over 100:1 and never dedups."""

    def __init__(self, size: int) -> None:
        self.left, self.n = size, 0

    def read(self, k: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        k = min(self.left, k if k > 0 else MiB)
        out = bytearray()
        while len(out) < k:
            out += self.n.to_bytes(8, "big") * 16 + bytes(64 * 1024 - 128)
            self.n += 1
        self.left -= k
        return bytes(out[:k])


def test_coalesced_reads_of_highly_compressible_data_are_bounded_in_decoded_bytes(tmp_path: Path) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    with st.writer(source={"kind": "files", "origin": "compressible"}) as w:
        w.add_stream("/big", _Compressible(128 * MiB))
    assert sum(o.size for o in st.backend.list("packs/")) < 2 * MiB  # the data compresses as a pgbench dump does
    rec = st.find_record(st.snapshot_ids()[0], "/big")
    groups = list(reader._groups(st, rec))
    decoded = [sum(loc.raw_len for _, loc in chunks) for _, chunks in groups]
    assert max(decoded) <= 8 * MiB, f"a read decodes {max(decoded) / MiB:.0f} MiB at once"
    assert sum(decoded) == 128 * MiB
    with st.open_record(rec) as src:
        assert sum(len(p) for p in src.iter_chunks()) == 128 * MiB
    st.close()
