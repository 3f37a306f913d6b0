"""A second base backup after a small change stores little: relation files are cut into fixed page-aligned blocks,
so only the blocks the change touched (plus WAL, control files and metadata) are new. With content-defined
chunking over one tar stream, a 1 % change re-stored 11-87 % of a full copy in our measurements (peers.md §4.4).
"""

from __future__ import annotations

from airflow_provider_pgplakar.pg.physical import physical_backup
from tests.helpers import need
from tests.physical.conftest import phys_opts


def test_second_backup_after_a_small_change_stores_little(pg_factory, store) -> None:
    src = pg_factory(15)
    need((src.bin_dir / "pgbench").is_file(), f"pgbench in {src.bin_dir}")
    src.run("pgbench", "-i", "-s", "4", "-q")
    with src.connect() as c:
        c.execute("VACUUM ANALYZE")
        c.execute("CHECKPOINT")
    first = physical_backup(store, phys_opts(src))
    with src.connect() as c:  # 1 % of the accounts, clustered
        c.execute("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 4000")
        c.execute("CHECKPOINT")
    second = physical_backup(store, phys_opts(src))

    assert second.bytes > 60 * 2**20
    assert second.new_stored_bytes < 0.01 * second.bytes, (second.new_stored_bytes, second.bytes)
    assert second.new_stored_bytes < 0.15 * first.new_stored_bytes, (second.new_stored_bytes,
                                                                      first.new_stored_bytes)
    header = store.load_snapshot(second.snapshot_id).header
    assert header["stats"]["new_raw_bytes"] < 0.05 * second.bytes
