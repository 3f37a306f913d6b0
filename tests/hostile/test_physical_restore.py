"""Hostile physical (``postgres+bin``) snapshots restored as a data directory (pg/datadir.py): issue 9 §1 and §2.

Snapshots are written through the store API with the physical layout (``/data/...``, ``/tablespaces/<oid>/...``),
as a hostile server's archive or a tampered store would hold them. Each test compares the sandbox outside the
target before and after, and a refused restore must not have created the target at all.
"""

from __future__ import annotations

import os

import pytest

from airflow_provider_pgplakar.pg.datadir import PhysicalRestoreError, physical_restore
from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.safefs import UnsafeRecord
from tests.helpers import need
from tests.hostile.trees import listing

TS_OID = 16384


def phys_snapshot(store, build=lambda w: None, tablespaces=()) -> str:
    meta = {"server_version_num": 150004, "server_major": 15,
            "tablespaces": [{"oid": oid, "location": str(loc)} for oid, loc in tablespaces]}
    with store.writer(source={"kind": "postgres+bin", "origin": "postgres+bin://hostile"}, meta=meta) as w:
        w.add_entry("/data", "d", mode=0o700)
        w.add_bytes("/data/PG_VERSION", b"15\n", mode=0o600)
        w.add_bytes("/data/backup_label", b"START WAL LOCATION: 0/2000028\n", mode=0o600)
        for oid, _ in tablespaces:
            w.add_entry(f"/tablespaces/{oid}", "d", mode=0o700)
            w.add_entry(f"/data/pg_tblspc/{oid}", "l", link_target="/wherever/it/was")
        build(w)
    return w.snapshot_id


def refused(store, sandbox, sid, exc, match, **kw) -> None:
    before = sandbox.before()
    with pytest.raises(exc, match=match):
        physical_restore(store, sid, sandbox.target, verify=False, **kw)
    sandbox.assert_outside_unchanged(before)
    assert listing(sandbox.target) == [], "a refused restore must write nothing"


def test_symlink_then_child_record(store, sandbox) -> None:
    def build(w):
        w.add_entry("/data/pg_wal", "l", link_target=str(sandbox.outside))
        w.add_bytes("/data/pg_wal/000000010000000000000002", b"owned", mode=0o666)

    refused(store, sandbox, phys_snapshot(store, build), UnsafeRecord,
            "'/data/pg_wal'.*symlinks only at pg_tblspc/<oid>")


def test_child_of_a_tablespace_link(store, sandbox) -> None:
    ts = sandbox.root / "ts-new"
    def build(w):
        w.add_bytes(f"/data/pg_tblspc/{TS_OID}/PG_15/evil", b"through the link")

    sid = phys_snapshot(store, build, tablespaces=[(TS_OID, sandbox.outside / "old-ts")])
    refused(store, sandbox, sid, UnsafeRecord, f"parent /pg_tblspc/{TS_OID} is a symlink record",
            tablespace_mapping={str(sandbox.outside / "old-ts"): str(ts)})
    assert not ts.exists()


def test_directory_record_chmod_through_symlink(store, sandbox) -> None:
    def build(w):
        w.add_entry(f"/data/pg_tblspc/{TS_OID}", "d", mode=0o777)

    sid = phys_snapshot(store, build, tablespaces=[(TS_OID, sandbox.outside / "victim_dir")])
    refused(store, sandbox, sid, UnsafeRecord, "a directory but an earlier record made it a symlink",
            tablespace_mapping={str(sandbox.outside / "victim_dir"): str(sandbox.root / "ts-new")})


def test_tablespace_link_of_an_unknown_tablespace(store, sandbox) -> None:
    def build(w):
        w.add_entry("/data/pg_tblspc/99999", "l", link_target=str(sandbox.outside))

    refused(store, sandbox, phys_snapshot(store, build), UnsafeRecord, "pg_tblspc/99999.*symlinks only at")


def test_dotdot_and_nul(store, sandbox) -> None:
    sid = phys_snapshot(store, lambda w: w.add_bytes("/data/../outside/victim.txt", b"overwritten"))
    refused(store, sandbox, sid, UnsafeRecord, "'..' component")
    sid = phys_snapshot(store, lambda w: w.add_bytes("/data/base/1\0x", b"x"))
    refused(store, sandbox, sid, UnsafeRecord, "NUL")


def test_absolute_record_outside_the_layout(store, sandbox) -> None:
    sid = phys_snapshot(store, lambda w: w.add_bytes(str(sandbox.outside / "victim.txt"), b"overwritten"))
    refused(store, sandbox, sid, UnsafeRecord, "does not belong to the physical snapshot layout")


def test_kind_collision(store, sandbox) -> None:
    def build(w):
        w.add_bytes("/data/base", b"a file")
        w.add_entry("/data/base", "d", mode=0o777)

    refused(store, sandbox, phys_snapshot(store, build), UnsafeRecord, "earlier record made it a file")


def test_hardlink_outside(store, sandbox) -> None:
    def build(w):
        w.add_entry("/data/leak", "h", link_target=str(sandbox.outside / "secret"))

    refused(store, sandbox, phys_snapshot(store, build), UnsafeRecord, "does not belong to the physical snapshot")

    def build_via_link(w):
        w.add_entry("/data/leak", "h", link_target=f"/data/pg_tblspc/{TS_OID}/secret")

    sid = phys_snapshot(store, build_via_link, tablespaces=[(TS_OID, sandbox.outside)])
    refused(store, sandbox, sid, UnsafeRecord, "hard link target .* is not an earlier file",
            tablespace_mapping={str(sandbox.outside): str(sandbox.root / "ts-new")})


def test_error_record_is_refused_before_writing(store, sandbox) -> None:
    sid = phys_snapshot(store, lambda w: w.add_error("/data/base/1/1259", "unreadable"))
    refused(store, sandbox, sid, PhysicalRestoreError, "was not backed up")


@pytest.mark.parametrize("tampered", [{"p": "/data/global", "k": "d", "u": "0"},
                                      {"p": "/data/pg_hba.conf", "k": "f", "s": 1, "m": "0777"},
                                      {"p": "/data/base", "k": "l", "lt": 7}])
def test_wrong_typed_record_is_refused_before_writing(store, sandbox, tampered) -> None:
    """A manifest entry with a wrong-typed field (a tampered store) fails decoding with the record named, before
    anything is written, in place of a TypeError midway through the restore."""
    sid = phys_snapshot(store, lambda w: w._manifest.add(tampered))
    refused(store, sandbox, sid, IntegrityError, f"record '{tampered['p']}' of snapshot .*: its ")


def test_tablespace_is_never_wiped_without_explicit_mapping(store, sandbox) -> None:
    live = sandbox.outside / "live-ts"
    (live / "PG_15_202209061" / "5").mkdir(parents=True)
    (live / "PG_15_202209061" / "5" / "16385").write_bytes(b"live relation data")
    sid = phys_snapshot(store, lambda w: w.add_bytes(f"/tablespaces/{TS_OID}/PG_15_202209061/5/16385", b"old"),
                        tablespaces=[(TS_OID, live)])
    msg = (f"tablespace {TS_OID} directory {live} \\(its original location, not mapped\\) is not empty: map the "
           f"tablespace to an empty directory \\(tablespace_mapping / -T {live}=NEW\\), or.*-T {live}={live}\\) and "
           "pass overwrite")
    refused(store, sandbox, sid, PhysicalRestoreError, msg, overwrite=True)
    refused(store, sandbox, sid, PhysicalRestoreError, "mapped directory first",
            tablespace_mapping={str(live): str(live)})

    # both ways out work
    new = sandbox.root / "ts-new"
    physical_restore(store, sid, sandbox.target, verify=False, tablespace_mapping={str(live): str(new)})
    assert (new / "PG_15_202209061" / "5" / "16385").read_bytes() == b"old"
    assert (live / "PG_15_202209061" / "5" / "16385").read_bytes() == b"live relation data"
    assert os.readlink(sandbox.target / "pg_tblspc" / str(TS_OID)) == str(new)
    res = physical_restore(store, sid, sandbox.target, verify=False, overwrite=True,
                           tablespace_mapping={str(live): str(live)})
    assert (live / "PG_15_202209061" / "5" / "16385").read_bytes() == b"old"
    assert res.verified is False and res.warnings == []  # verify=False: not verified, as asked


def test_overwrite_empties_only_the_data_directory(store, sandbox) -> None:
    sandbox.target.mkdir(parents=True)
    (sandbox.target / "old").write_text("old")
    (sandbox.target / "link-out").symlink_to(sandbox.outside)
    before = sandbox.before()
    physical_restore(store, phys_snapshot(store), sandbox.target, verify=False, overwrite=True, sync=False)
    sandbox.assert_outside_unchanged(before)
    assert listing(sandbox.target) == ["PG_VERSION", "backup_label"]


def test_require_verify(store, sandbox, monkeypatch) -> None:
    sid = phys_snapshot(store)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PhysicalRestoreError, match="contradict"):
        physical_restore(store, sid, sandbox.target, verify=False, require_verify=True)
    fake = sandbox.root / "bin"  # a PostgreSQL 15 installation without pg_verifybackup
    fake.mkdir()
    (fake / "postgres").write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 15.4'\n")
    (fake / "postgres").chmod(0o755)
    with pytest.raises(PhysicalRestoreError, match="require_verify: skipped: no pg_verifybackup of PostgreSQL 15"):
        physical_restore(store, sid, sandbox.target, require_verify=True, pg_bin_dir=str(fake))
    assert not sandbox.target.exists()

    # a pg_verifybackup that answers --version but then cannot be executed
    tool = fake / "pg_verifybackup"
    tool.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_verifybackup (PostgreSQL) 15.4'; "
                    "/bin/chmod a-x \"$0\"; exit 0; fi\nexit 0\n")
    tool.chmod(0o755)
    res = physical_restore(store, sid, sandbox.target, pg_bin_dir=str(fake))
    assert res.verified is False and "could not run" in res.verify_note and "not verified" in res.warnings[0]
    with pytest.raises(PhysicalRestoreError, match="require_verify: the restored directory was not verified: "
                                                   "pg_verifybackup could not run"):  # (its version is cached)
        physical_restore(store, sid, sandbox.root / "second", pg_bin_dir=str(fake), require_verify=True)


def test_owner_names_and_explicit_owner(store, sandbox) -> None:
    need(os.geteuid() == 0, "root (restoring file owners needs it)")  # CI runs as root: fails there, never skips
    import pwd

    def build(w):
        w.add_bytes("/data/base/1/1259", b"rel", mode=0o600, uid=4242, gid=4242, uname="nobody", gname="nogroup")

    sid = phys_snapshot(store, build)
    physical_restore(store, sid, sandbox.target, verify=False)
    nobody = pwd.getpwnam("nobody")
    assert os.stat(sandbox.target / "base" / "1" / "1259").st_uid == nobody.pw_uid
    root_uid = os.stat(sandbox.target).st_uid
    assert root_uid == nobody.pw_uid

    other = sandbox.root / "other"
    physical_restore(store, sid, other, verify=False, owner="daemon")
    assert os.stat(other / "base" / "1" / "1259").st_uid == pwd.getpwnam("daemon").pw_uid
    assert os.stat(other / "PG_VERSION").st_uid == pwd.getpwnam("daemon").pw_uid

    def unknown(w):
        w.add_bytes("/data/x", b"x", uname="no-such-user-here", gname="nogroup")

    with pytest.raises(PhysicalRestoreError, match="user 'no-such-user-here', which does not exist on this host"):
        physical_restore(store, phys_snapshot(store, unknown), sandbox.root / "third", verify=False)
    assert not (sandbox.root / "third").exists()


def test_postmaster_pid_is_always_refused(store, sandbox) -> None:
    sid = phys_snapshot(store)
    sandbox.target.mkdir(parents=True)
    (sandbox.target / "postmaster.pid").write_text(f"{os.getpid()}\n/some/dir\n")
    before = sandbox.before()
    with pytest.raises(PhysicalRestoreError, match=f"postmaster.pid: a server may be running on it \\(pid "
                                                   f"{os.getpid()} is running\\)"):
        physical_restore(store, sid, sandbox.target, verify=False, overwrite=True)
    sandbox.assert_outside_unchanged(before)
    assert listing(sandbox.target) == ["postmaster.pid"]


@pytest.mark.parametrize("digest", [True, False])
def test_a_compression_bomb_is_never_expanded(store, sandbox, digest) -> None:
    """A key holder's blob whose zstd frame expands to 256 MiB, indexed (and referenced) as 100 bytes: refused
    before it is decompressed, on both of the batched restore's decoders (records with a digest decode each chunk
    into its own bytes, the others into the worker's run buffer); the restore fails and removes what it made.
    (Indexed and referenced as 0 bytes, the reference itself is refused first: tests/store/test_bounds.py.)"""
    import blake3

    from tests.store.test_bounds import MiB, plant_bomb, traced_peak

    bomb = plant_bomb(store, 100)
    record = {"p": "/data/base/1/2", "k": "f", "s": 100, "m": 0o600, "c": [[bomb, 100]]}
    if digest:
        record["b"] = blake3.blake3(bytes(100)).digest()
    sid = phys_snapshot(store, lambda w: w._manifest.add(record))
    before = sandbox.before()

    failed: list[str] = []

    def restore() -> None:
        with pytest.raises(IntegrityError) as ei:
            physical_restore(store, sid, sandbox.target, verify=False)
        failed.append(str(ei.value))

    assert traced_peak(restore) < 32 * MiB
    assert f"blob {bomb.hex()[:16]} in packs/" in failed[0] and "bad compressed data" in failed[0]
    sandbox.assert_outside_unchanged(before)
    assert not sandbox.target.exists()
