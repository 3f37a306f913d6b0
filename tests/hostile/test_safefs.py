"""store/safefs.py directly: what is synced (issue 9 §3), and symlinks swapped in *between* validation and writing
(a race the record plan cannot see) still stop the write instead of being followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.safefs import RecordPlan, SafeTree, TargetBlocked, UnsafeRecord, split_path


@pytest.fixture
def fsyncs(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


def test_sync_covers_every_file_and_touched_directory(tmp_path: Path, fsyncs: list[str]) -> None:
    root = tmp_path / "new" / "root"
    with SafeTree(root) as tree:
        for i in range(200):  # more than the fds allowed in flight
            tree.write_file(("d", f"f{i}"), [b"x" * 10])
        tree.write_file(("top",), [b"y"], replace=True)
        tree.symlink(("d", "e", "link"), "/anywhere")
    files = {str(root / "d" / f"f{i}") for i in range(200)} | {str(root / "top")}
    assert files <= set(fsyncs)
    assert {str(root), str(root / "d"), str(root / "d" / "e"), str(tmp_path / "new"), str(tmp_path)} <= set(fsyncs)
    # directories after the files they hold
    assert fsyncs.index(str(root / "d")) > max(fsyncs.index(f) for f in files)


def test_no_sync_syncs_nothing(tmp_path: Path, fsyncs: list[str]) -> None:
    with SafeTree(tmp_path / "root", sync=False) as tree:
        tree.write_file(("a", "b"), [b"x"])
    assert fsyncs == [] and (tmp_path / "root" / "a" / "b").read_bytes() == b"x"


def test_a_symlink_swapped_in_after_validation_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    with SafeTree(root, sync=False) as tree:
        tree.mkdir(("sub",))
        tree._fds.pop(("sub",))  # noqa: SLF001 - as if the cache had been trimmed
        (root / "sub").rmdir()
        (root / "sub").symlink_to(outside)
        with pytest.raises(TargetBlocked, match="/sub in the target is a symlink"):
            tree.write_file(("sub", "x"), [b"x"])
        with pytest.raises(TargetBlocked):
            tree.set_attrs(("sub",), mode=0o777)
        (root / "f").symlink_to(outside / "victim")
        with pytest.raises(FileExistsError):
            tree.write_file(("f",), [b"x"])  # O_EXCL|O_NOFOLLOW: never through the link
        tree.write_file(("f",), [b"x"], replace=True)  # replaces the link itself
    assert list(outside.iterdir()) == [] and (root / "f").read_bytes() == b"x"
    assert os.stat(outside).st_mode & 0o777 != 0o777


def test_record_plan_rules() -> None:
    plan = RecordPlan()
    plan.add(split_path("/a"), "d", "/a")
    plan.add(split_path("/a/f"), "f", "/a/f")
    plan.add(split_path("/a/h"), "h", "/a/h", link_to=("a", "f"))
    plan.add(split_path("/a"), "d", "/a")  # a directory may be recorded again
    for path, kind, match in [("/a/f", "f", "appears twice"), ("/a/f/x", "f", "parent /a/f is a file"),
                              ("/a", "l", "earlier record made it a directory"), ("/", "f", "target directory"),
                              ("/a/z", "x", "unknown record kind")]:
        with pytest.raises(UnsafeRecord, match=match):
            plan.add(split_path(path), kind, path)
    with pytest.raises(UnsafeRecord, match="not an earlier file record"):
        plan.add(("b",), "h", "/b", link_to=("a",))
    for bad in ("a/b", "/a//b", "/a/./b", "/a/../b", "/a\0", ""):
        with pytest.raises(UnsafeRecord):
            split_path(bad)
