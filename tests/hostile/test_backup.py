"""Backups never make a snapshot a restore would have to write through a symlink for (issue 9 §1):

- a base-backup tar (the tar path of a physical backup, pg/physical.py) with a member below a symlink member, or a
  hard link into one, is refused and nothing is committed;
- a files backup whose entry is swapped for a symlink after it was listed records an error, and never reads
  through the link (store/files.py).
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from airflow_provider_pgplakar.pg.basebackup import Archive
from airflow_provider_pgplakar.pg.physical import PhysicalBackupError, _copy_archive
from airflow_provider_pgplakar.store import files
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.progress import Progress


class _Stream(io.BytesIO):
    @property
    def size(self) -> int:
        return len(self.getvalue())


def tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            if kind == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, extra
                tar.addfile(info)
            elif kind == "h":
                info.type, info.linkname = tarfile.LNKTYPE, extra
                tar.addfile(info)
            else:
                info.size = len(extra)
                tar.addfile(info, io.BytesIO(extra))
    return buf.getvalue()


def back_up_tar(store, members) -> str:
    archive = Archive("base.tar", None, _Stream(tar_bytes(members)))
    with store.writer(source={"kind": "postgres+bin", "origin": "test"}) as w:
        _copy_archive(w, archive, "/data", lambda name: Chunking(), Progress("base backup"))
    return w.snapshot_id


def test_tar_member_below_a_symlink_member_is_refused(store, sandbox) -> None:
    with pytest.raises(PhysicalBackupError, match="member 'pg_wal/evil', which lies at or below the symlink member "
                                                  "'pg_wal'"):
        back_up_tar(store, [("PG_VERSION", "f", b"15\n"), ("pg_wal", "l", str(sandbox.outside)),
                            ("pg_wal/evil", "f", b"x")])
    with pytest.raises(PhysicalBackupError, match="hard link 'leak' points at 'ts/secret', which lies at or below"):
        back_up_tar(store, [("ts", "l", str(sandbox.outside)), ("leak", "h", "ts/secret")])
    with pytest.raises(PhysicalBackupError, match="at or below the symlink member 'x'"):
        back_up_tar(store, [("x", "l", "/etc"), ("x", "d", None)])
    assert store.snapshot_ids() == []


def test_tar_with_tablespace_links_is_accepted(store) -> None:
    sid = back_up_tar(store, [("PG_VERSION", "f", b"15\n"), ("pg_tblspc", "d", None),
                              ("pg_tblspc/16384", "l", "/srv/ts"), ("global", "d", None),
                              ("global/pg_control", "f", b"c" * 8192), ("global/same", "h", "global/pg_control")])
    kinds = {r.path: r.kind for r in store.records(sid)}
    assert kinds["/data/pg_tblspc/16384"] == "l" and kinds["/data/global/same"] == "h"


def test_files_backup_does_not_follow_an_entry_swapped_for_a_symlink(store, sandbox, tmp_path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain")
    (src / "victim").write_text("will be swapped")
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_text("inner")

    def swap(name) -> None:
        path = src / name
        if path.is_dir() and not path.is_symlink():
            (path / "inner").unlink()
            path.rmdir()
        else:
            path.unlink()
        path.symlink_to(sandbox.outside / ("secret" if name == "victim" else ""))

    swapped: set[str] = set()

    def swap_after(real):  # the listing sees a plain entry, then it becomes a symlink
        def hook(path, *args, **kw):
            st = real(path, *args, **kw)
            name = os.path.basename(os.fspath(path))
            if name in ("victim", "dir") and name not in swapped:
                swapped.add(name)
                swap(name)
            return st
        return hook

    monkeypatch.setattr(files.os, "stat", swap_after(os.stat))
    monkeypatch.setattr(files.os, "lstat", swap_after(os.lstat))  # what the old code listed with
    with store.writer(source={"kind": "files", "origin": str(src)}) as w:
        files.backup_path(w, src)
    monkeypatch.undo()
    recs = {r.path: r for r in store.records(w.snapshot_id)}
    assert recs["/victim"].kind == "e" and "replaced by a symlink" in recs["/victim"].error
    assert recs["/dir"].kind == "e" and "/dir/inner" not in recs
    for rec in recs.values():
        if rec.kind == "f":
            with store.open_record(rec) as r:
                assert b"s3cret" not in r.read()
