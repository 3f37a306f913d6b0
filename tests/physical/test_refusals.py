"""Refusals and failures: each one happens before anything is written (restore) or commits nothing (backup).

Restore refusals are checked on one backup: a non-empty target, the wrong major version in pg_bin_dir, an unknown
tablespace_mapping entry, an unmapped tablespace whose original directory a running server uses, a running
server's data directory, a stale postmaster.pid, and a snapshot that is not a physical backup. Backup refusals: a
database path in the URI, a user without REPLICATION, a missing pg_hba replication line, and a server killing the
WAL sender mid-stream.
"""

from __future__ import annotations

import threading
import time

import pytest

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.basebackup import BaseBackupError, ReplicationRefused
from airflow_provider_pgplakar.pg.datadir import PhysicalRestoreError, parse_tablespace_mapping, physical_restore
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.store.files import backup_path
from tests.pgservers import locate_bin_dir
from tests.physical.conftest import make_tablespace_dir, phys_opts, scratch_dir, wait_until


def tree(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


def test_database_path_in_the_uri_is_refused() -> None:
    with pytest.raises(OptionError, match="whole cluster; remove the database path /sales"):
        parse_source_options("postgres+bin://backup@db.example.com:5432/sales")
    with pytest.raises(OptionError, match="not accepted by a postgres\\+bin:// source"):
        parse_source_options("postgres+bin://db.example.com", {"database": "sales"})


def test_tablespace_mapping_parsing() -> None:
    assert parse_tablespace_mapping(["/a/b/=/c", "/x\\=y=/z\\=w"]) == {"/a/b": "/c", "/x=y": "/z=w"}
    assert parse_tablespace_mapping({"/a": "/b/./c"}) == {"/a": "/b/c"}
    for bad in (["/a"], ["a=/b"], ["/a=b"], ["/a=/b=/c"]):
        with pytest.raises(PhysicalRestoreError):
            parse_tablespace_mapping(bad)


def test_restore_refusals_write_nothing(pg_factory, pg_manager, store, tmp_path) -> None:
    src = pg_factory(15)
    ts_dir = make_tablespace_dir(pg_manager, "ts")
    with src.connect() as c:
        c.execute(f"CREATE TABLESPACE extra LOCATION '{ts_dir}'")
        c.execute("CREATE TABLE t TABLESPACE extra AS SELECT generate_series(1, 100) g")
    sid = physical_backup(store, phys_opts(src)).snapshot_id
    new_ts = str(scratch_dir(pg_manager, "ts-new"))

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    with pytest.raises(PhysicalRestoreError, match="is not empty: restore into an empty directory, or pass overwrite"):
        physical_restore(store, sid, busy, tablespace_mapping={str(ts_dir): new_ts})
    assert tree(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "precious"

    target = tmp_path / "never"
    fake = tmp_path / "fake-bin"  # a stand-in installation of another major, whatever is installed here
    fake.mkdir()
    (fake / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 16.4'\n")
    (fake / "postgres").chmod(0o755)
    others = [(v, str(locate_bin_dir(v))) for v in (18, 17) if locate_bin_dir(v) is not None]
    for major, bin_dir in [(16, str(fake)), *others]:
        with pytest.raises(PhysicalRestoreError, match=f"holds PostgreSQL {major}, but this backup was made "
                                                       "by PostgreSQL 15 and only PostgreSQL 15 can start it"):
            physical_restore(store, sid, target, tablespace_mapping={str(ts_dir): new_ts}, pg_bin_dir=bin_dir)
    with pytest.raises(PhysicalRestoreError, match="is not a tablespace location of this backup"):
        physical_restore(store, sid, target, tablespace_mapping={"/nowhere": new_ts})
    with pytest.raises(PhysicalRestoreError, match="tablespace .* directory .* overlaps .* of a running PostgreSQL"):
        physical_restore(store, sid, target)  # unmapped: the live server's tablespace directory
    with pytest.raises(PhysicalRestoreError, match="overlap"):
        physical_restore(store, sid, target, tablespace_mapping={str(ts_dir): str(target / "ts")})
    assert not target.exists()

    with store.writer(source={"kind": "files", "origin": str(busy)}) as w:
        backup_path(w, busy)
    with pytest.raises(PhysicalRestoreError, match="not a physical \\(postgres\\+bin\\) backup"):
        physical_restore(store, w.snapshot_id, target)
    assert not target.exists()

    # overwrite empties the target first (and still refuses a directory a server runs on)
    restored = physical_restore(store, sid, busy, tablespace_mapping={str(ts_dir): new_ts}, overwrite=True,
                                pg_bin_dir=str(src.bin_dir))
    assert restored.verified and not (busy / "keep.txt").exists() and (busy / "PG_VERSION").is_file()
    with pytest.raises(PhysicalRestoreError, match="the data directory of a running PostgreSQL server"):
        physical_restore(store, sid, src.datadir, overwrite=True, tablespace_mapping={str(ts_dir): new_ts})
    stale = tmp_path / "stale"  # a postmaster.pid without a server (or of a server in another pid namespace)
    stale.mkdir()
    (stale / "postmaster.pid").write_text("999999\n")
    with pytest.raises(PhysicalRestoreError, match="postmaster.pid: a server may be running on it \\(pid 999999 is "
                                                   "not running on this host: stale, or a server in another"):
        physical_restore(store, sid, stale, overwrite=True, tablespace_mapping={str(ts_dir): new_ts})
    assert tree(stale) == ["postmaster.pid"]


def test_backup_refusals_commit_nothing(pg_factory, store) -> None:
    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE ROLE plain LOGIN PASSWORD 'plain-pw'")
        c.execute("CREATE ROLE repl LOGIN REPLICATION PASSWORD 'repl-pw'")
    with pytest.raises(ReplicationRefused) as err:
        physical_backup(store, phys_opts(src, username="plain", password="plain-pw"))
    assert "REPLICATION privilege: ALTER ROLE plain REPLICATION" in str(err.value)
    assert "plain-pw" not in str(err.value)

    # a replication user works even where pg_hba refuses it a normal connection (the manifest falls back)
    hba = src.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text("host replication all 127.0.0.1/32 scram-sha-256\nhost all postgres 127.0.0.1/32 scram-sha-256\n")
    with src.connect() as c:
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
    result = physical_backup(store, phys_opts(src, username="repl", password="repl-pw"))
    assert result.warnings and "reduced to the replication connection's facts" in result.warnings[0]

    hba.write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    with src.connect() as c:
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
    with pytest.raises(ReplicationRefused, match="pg_hba.conf needs a replication line for this user"):
        physical_backup(store, phys_opts(src))
    hba.write_text(original)
    with src.connect() as c:
        c.execute("SELECT pg_reload_conf()")
    assert store.snapshot_ids() == [result.snapshot_id]


def test_wal_sender_killed_mid_stream_commits_nothing(pg_factory, store) -> None:
    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE TABLE filler AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    killed = threading.Event()

    def kill_walsender() -> None:
        with src.connect() as c:
            wait_until(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' "
                                         "AND query LIKE 'BASE_BACKUP%'").fetchone()[0] > 0, what="BASE_BACKUP")
            time.sleep(0.5)
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'walsender'")
            killed.set()

    killer = threading.Thread(target=kill_walsender, daemon=True)
    killer.start()
    with pytest.raises(BaseBackupError):
        physical_backup(store, phys_opts(src, max_rate="32"))  # 32 kB/s: still streaming when killed
    killer.join(timeout=30)
    assert killed.is_set()
    assert store.snapshot_ids() == []
