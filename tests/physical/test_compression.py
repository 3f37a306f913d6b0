"""Server-side compression of the base-backup stream (``server_compression``) changes nothing in the snapshot.

PostgreSQL 17 here (celerp's build has lz4 and zstd): backups of the same quiescent cluster taken uncompressed,
with lz4 and with zstd store the very same blobs for every file that did not change between them, and a zstd
backup restores to a directory pg_verifybackup accepts. The embedded PostgreSQL 18 build has neither: ``auto``
falls back to an uncompressed stream (tests/physical/test_live_roundtrip.py), an explicit method is refused
naming the option, and nothing is committed.
"""

from __future__ import annotations

import pytest

from airflow_provider_pgplakar.pg.datadir import physical_restore
from airflow_provider_pgplakar.pg.options import OptionError
from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.store.reader import chunk_refs
from tests.physical.conftest import phys_opts, scratch_dir

# files that legitimately differ between two base backups of an idle cluster
_VOLATILE = ("/data/backup_label", "/data/backup_manifest", "/data/global/pg_control", "/data/pg_wal/",
             "/data/pg_xact/", "/data/pg_stat", "/data/pg_logical/", "/data/pg_multixact/", "/manifest.json")


def _contents(store, snapshot_id: str) -> dict[str, list]:
    return {r.path: list(chunk_refs(store, r)) for r in store.records(snapshot_id)
            if r.kind == "f" and not r.path.startswith(_VOLATILE)}


def test_compressed_streams_store_the_same_blobs(pg_factory, pg_manager, store) -> None:
    src = pg_factory(17)
    with src.connect() as c:
        c.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS h, repeat('x', g % 300) AS pad "
                  "FROM generate_series(1, 60000) g")
        c.execute("VACUUM ANALYZE t")
        c.execute("CHECKPOINT")
        t_file = c.execute("SELECT pg_relation_filepath('t')").fetchone()[0]
    results = {how: physical_backup(store, phys_opts(src, server_compression=how))
               for how in ("none", "lz4", "zstd:3", "auto")}
    used = {how: store.load_snapshot(r.snapshot_id).header["meta"]["server_compression"]
            for how, r in results.items()}
    assert used == {"none": "none", "lz4": "lz4", "zstd:3": "zstd", "auto": "lz4"}

    baseline = _contents(store, results["none"].snapshot_id)
    assert f"/data/{t_file}" in baseline and len(baseline[f"/data/{t_file}"]) > 4
    for how in ("lz4", "zstd:3", "auto"):
        assert _contents(store, results[how].snapshot_id) == baseline, how

    root = scratch_dir(pg_manager, "restored-zstd")
    restored = physical_restore(store, results["zstd:3"].snapshot_id, root / "data", pg_bin_dir=str(src.bin_dir))
    assert restored.verified is True, restored.verify_note


def test_a_method_the_server_lacks_is_refused_naming_the_option(pg_factory, store) -> None:
    src = pg_factory(18)
    for how in ("lz4", "zstd"):
        with pytest.raises(OptionError) as err:
            physical_backup(store, phys_opts(src, server_compression=how))
        assert err.value.option == "server_compression" and "does not support" in str(err.value)
    assert store.snapshot_ids() == []
    with src.connect() as c:  # the failed attempts left no slot behind
        assert c.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
