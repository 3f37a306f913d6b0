"""A base backup of a live cluster (pgbench writing, an extra tablespace) restores to a startable, consistent copy.

The invariant: every transaction committed before the backup started is in the restored cluster, the restored
cluster starts with the same major version, finishes recovery on its own (backup_label + the WAL inside the
snapshot), passes pg_verifybackup before its first start and pg_amcheck after it, and its tablespace lives where
tablespace_mapping put it. Without the temporary slot the WAL could be recycled mid-backup; without the server's
final results a truncated stream could be committed. PostgreSQL 15 (Debian's build, with lz4) streams lz4-compressed
by default; the embedded 18 build has no lz4, so the default falls back to an uncompressed stream with a new slot.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time

import pytest

from airflow_provider_pgplakar.pg.datadir import physical_restore
from airflow_provider_pgplakar.pg.physical import RELATION_BLOCK_SIZE, physical_backup
from airflow_provider_pgplakar.store.reader import chunk_refs
from tests.helpers import need
from tests.physical.conftest import (
    make_tablespace_dir,
    phys_opts,
    restored_server,
    run_ok,
    scalar,
    scratch_dir,
    wait_until,
)


class SlotWatcher(threading.Thread):
    """Records the temporary physical slots (with reserved WAL) seen while the backup runs."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server, self.seen, self.stop = server, set(), threading.Event()

    def run(self) -> None:
        with self.server.connect() as c:
            while not self.stop.is_set():
                for (name,) in c.execute("SELECT slot_name FROM pg_replication_slots WHERE temporary AND "
                                         "slot_type = 'physical' AND restart_lsn IS NOT NULL").fetchall():
                    self.seen.add(name)
                time.sleep(0.01)


@pytest.mark.parametrize("version", [15, 18])
def test_live_cluster_with_tablespace_roundtrip(pg_factory, pg_manager, store, version: int) -> None:
    src = pg_factory(version)
    need((src.bin_dir / "pgbench").is_file(), f"pgbench in {src.bin_dir}")
    ts_dir = make_tablespace_dir(pg_manager, "ts")
    src.run("pgbench", "-i", "-s", "2", "-q")
    with src.connect() as c:
        c.execute(f"CREATE TABLESPACE extra LOCATION '{ts_dir}'")
        c.execute("CREATE TABLE in_ts TABLESPACE extra AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g")
        c.execute("CREATE INDEX in_ts_h ON in_ts (h) TABLESPACE extra")
        c.execute("CREATE TABLE marker (note text)")
        ts_oid = c.execute("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'").fetchone()[0]
        accounts_file = c.execute("SELECT pg_relation_filepath('pgbench_accounts')").fetchone()[0]

    bench = subprocess.Popen([str(src.bin("pgbench")), "-n", "-c", "2", "-j", "1", "-T", "120"], env=src.env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    watcher = SlotWatcher(src)
    try:
        wait_until(lambda: scalar(src, "SELECT count(*) FROM pgbench_history") >= 200, what="pgbench progress")
        with src.connect() as c:
            c.execute("INSERT INTO marker VALUES ('committed before the backup')")
            committed = c.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
        watcher.start()
        result = physical_backup(store, phys_opts(src))
        during = scalar(src, "SELECT count(*) FROM pgbench_history")
        assert bench.poll() is None, "pgbench must still be writing when the backup ends"
    finally:
        watcher.stop.set()
        bench.terminate()
        bench.wait(timeout=30)
    watcher.join(timeout=10)
    assert during > committed, "pgbench committed nothing while the backup ran"
    assert watcher.seen, "no temporary physical slot held WAL during the backup"
    wait_until(lambda: scalar(src, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgplakar%'") == 0,
               what="the temporary slot to vanish")

    # --- the snapshot: layout, metadata, chunking
    assert result.major == version and result.tablespaces[0]["oid"] == ts_oid
    header = store.load_snapshot(result.snapshot_id).header
    assert header["source"]["kind"] == "postgres+bin" and header["meta"]["end_lsn"] == result.end_lsn
    assert header["meta"]["server_compression"] == ("lz4" if version == 15 else "none")
    recs = {r.path: r for r in store.records(result.snapshot_id)}
    paths = list(recs)
    assert paths[0] == "/manifest.json"
    manifest = json.loads(store.open_record(recs["/manifest.json"]).read())
    assert manifest["connector"] == "postgresql+bin" and manifest["dump_format"] == "basebackup"
    assert manifest["server_version_num"] // 10000 == version
    for path in ("/data", "/data/PG_VERSION", "/data/backup_label", "/data/global/pg_control", "/data/backup_manifest",
                 f"/tablespaces/{ts_oid}"):
        assert path in recs, path
    link = recs[f"/data/pg_tblspc/{ts_oid}"]
    assert link.kind == "l" and link.link_target == str(ts_dir)
    assert any(p.startswith(f"/tablespaces/{ts_oid}/PG_{version}_") and recs[p].kind == "f" for p in paths)
    assert any(p.startswith("/data/pg_wal/") and recs[p].kind == "f" for p in paths)
    accounts = recs[f"/data/{accounts_file}"]
    assert accounts.mode == 0o600 and accounts.size > 4 * RELATION_BLOCK_SIZE
    sizes = [n for _, n in chunk_refs(store, accounts)]
    assert all(n == RELATION_BLOCK_SIZE for n in sizes[:-1]) and sum(sizes) == accounts.size

    # --- restore, verify, start, check
    root = scratch_dir(pg_manager, "restored")
    new_ts = scratch_dir(pg_manager, "ts-restored")
    restored = physical_restore(store, result.snapshot_id, root / "data", tablespace_mapping=[f"{ts_dir}={new_ts}"],
                                pg_bin_dir=str(src.bin_dir))
    assert restored.verified is True and "passed" in restored.verify_note, restored.verify_note
    assert restored.major == version and restored.tablespaces[0]["restored_to"] == str(new_ts)
    assert stat.S_IMODE((root / "data").stat().st_mode) == 0o700
    assert os.readlink(root / "data" / "pg_tblspc" / str(ts_oid)) == str(new_ts)
    assert (root / "data" / "backup_manifest").is_file()
    if os.geteuid() == 0:  # as root: the snapshot's owner names (PostgreSQL's archives say "postgres")
        import pwd

        owner = pwd.getpwnam(accounts.uname)
        assert ((root / "data" / accounts_file).stat().st_uid, (root / "data").stat().st_uid) == (owner.pw_uid,) * 2
    with restored_server(pg_manager, src, root, new_ts) as dst:
        with dst.connect() as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
            assert c.execute("SELECT note FROM marker").fetchall() == [("committed before the backup",)]
            assert c.execute("SELECT count(*) FROM pgbench_history").fetchone()[0] >= committed
            assert c.execute("SELECT count(*), count(DISTINCT h) FROM in_ts").fetchone() == (20000, 20000)
            assert c.execute("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'"
                             ).fetchone()[0] == str(new_ts)
            assert c.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()[0] == \
                c.execute("SELECT sum(delta) FROM pgbench_history").fetchone()[0]
        assert "consistent recovery state reached" in dst.log_path.read_text()
        amcheck = dst.bin_dir / "pg_amcheck"
        if amcheck.is_file():
            run_ok([str(amcheck), "--install-missing", "--heapallindexed", "--all"], env=dst.env())
        else:  # no amcheck in this installation: at least read every row of every table
            read_every_table(dst)


def read_every_table(server) -> None:
    with server.connect(autocommit=False) as c:
        tables = c.execute("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables").fetchall()
        for (table,) in tables:
            with c.cursor(name="scan") as cur:
                cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - names from the catalog, quoted by format()
                while cur.fetchmany(10000):
                    pass
