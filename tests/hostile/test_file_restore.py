"""Hostile snapshots restored with ``restore -to DIR`` (store/files.py): one test per attack of issue 9 §1.

Each snapshot is written record by record through the store API (as a hostile server, a tampered plaintext store
or a directory changing under a backup could make it). Each test compares the whole sandbox outside the target
before and after, and checks that a refused restore wrote nothing at all (every refusal comes first).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.files import RestoreIncomplete, restore_records
from airflow_provider_pgplakar.store.record import Record
from airflow_provider_pgplakar.store.safefs import UnsafeRecord
from tests.hostile.trees import listing


def snapshot(store, build) -> str:
    with store.writer(source={"kind": "files", "origin": "/hostile"}) as w:
        w.add_entry("/", "d", mode=0o755)
        w.add_bytes("/innocent.txt", b"first record, written before the hostile ones by the old code", mode=0o644)
        build(w)
    return w.snapshot_id


def refused(store, sandbox, sid, match, **kw) -> None:
    before = sandbox.before()
    with pytest.raises(UnsafeRecord, match=match):
        restore_records(store, lambda: store.records(sid), sandbox.target, **kw)
    sandbox.assert_outside_unchanged(before)
    assert listing(sandbox.target) == [], "a refused restore must write nothing"


def test_symlink_then_child_record(store, sandbox) -> None:
    def build(w):
        w.add_entry("/evil", "l", link_target=str(sandbox.outside))
        w.add_bytes("/evil/pwned", b"owned", mode=0o4755)

    refused(store, sandbox, snapshot(store, build), "'/evil/pwned'.*parent /evil is a symlink record")


def test_directory_record_chmod_through_symlink(store, sandbox) -> None:
    def build(w):
        w.add_entry("/evil", "l", link_target=str(sandbox.outside / "victim_dir"))
        w.add_entry("/evil", "d", mode=0o777)

    refused(store, sandbox, snapshot(store, build), "'/evil'.*a directory but an earlier record made it a symlink")


def test_dotdot(store, sandbox) -> None:
    def build(w):
        w.add_bytes("/a/../../outside/victim.txt", b"overwritten", mode=0o644)

    refused(store, sandbox, snapshot(store, build), "'..' component")


def test_absolute_hardlink_target_and_relative_path(store, sandbox) -> None:
    def build(w):
        w.add_entry("/leak", "h", link_target=str(sandbox.outside / "secret"))

    refused(store, sandbox, snapshot(store, build), "hard link target .* is not an earlier file record")

    def build_relative(w):
        w.add_bytes("outside/victim.txt", b"overwritten")

    refused(store, sandbox, snapshot(store, build_relative), "not absolute")


def test_nul_byte(store, sandbox) -> None:
    def build(w):
        w.add_bytes("/a\0b", b"x")

    refused(store, sandbox, snapshot(store, build), "NUL")


def test_kind_collision(store, sandbox) -> None:
    def build(w):
        w.add_bytes("/x", b"a file first")
        w.add_entry("/x", "d", mode=0o777)
        w.add_bytes("/x/y", b"then a directory")

    refused(store, sandbox, snapshot(store, build), "'/x'.*directory but an earlier record made it a file")


def test_hardlink_through_symlink_outside(store, sandbox) -> None:
    def build(w):
        w.add_entry("/evil", "l", link_target=str(sandbox.outside))
        w.add_entry("/leak", "h", link_target="/evil/secret")
        w.add_bytes("/leak", b"overwritten through the link", mode=0o666)

    refused(store, sandbox, snapshot(store, build), "hard link target /evil/secret is not an earlier file",
            overwrite=True)


def test_planted_temp_name_symlink(store, sandbox) -> None:
    sid = snapshot(store, lambda w: w.add_bytes("/x", b"restored content", mode=0o644))
    sandbox.target.mkdir()
    (sandbox.target / ".x.pgplakar-tmp").symlink_to(sandbox.outside / "victim.txt")  # the old fixed temp name
    (sandbox.target / "x").write_text("old")
    before = sandbox.before()
    restore_records(store, lambda: store.records(sid), sandbox.target, overwrite=True)
    sandbox.assert_outside_unchanged(before)
    assert (sandbox.target / "x").read_bytes() == b"restored content"
    assert (sandbox.target / "innocent.txt").is_file()


def test_symlink_planted_in_the_target_is_not_written_through(store, sandbox) -> None:
    sid = snapshot(store, lambda w: (w.add_entry("/sub", "d", mode=0o777),
                                     w.add_bytes("/sub/victim.txt", b"overwritten", mode=0o666)))
    sandbox.target.mkdir()
    (sandbox.target / "sub").symlink_to(sandbox.outside)
    before = sandbox.before()
    with pytest.raises(Exception, match="target/sub exists and is not a directory"):
        restore_records(store, lambda: store.records(sid), sandbox.target, overwrite=True)
    sandbox.assert_outside_unchanged(before)
    assert listing(sandbox.target) == ["sub"]


def test_links_are_recreated_not_followed(store, sandbox) -> None:
    """A legitimate symlink to the outside is restored as a link; nothing is written through it."""
    def build(w):
        w.add_entry("/link", "l", link_target=str(sandbox.outside / "victim.txt"))
        w.add_bytes("/file", b"data", mode=0o640)
        w.add_entry("/hard", "h", link_target="/file")

    sid = snapshot(store, build)
    before = sandbox.before()
    assert restore_records(store, lambda: store.records(sid), sandbox.target) == 2
    sandbox.assert_outside_unchanged(before)
    assert os.readlink(sandbox.target / "link") == str(sandbox.outside / "victim.txt")
    assert (sandbox.target / "hard").read_bytes() == b"data"
    assert os.stat(sandbox.target / "hard").st_ino == os.stat(sandbox.target / "file").st_ino
    assert (sandbox.target / "file").stat().st_mode & 0o777 == 0o640


def test_skipped_records_fail_the_restore_naming_them(store, sandbox) -> None:
    def build(w):
        w.add_error("/unreadable.db", "unreadable: Permission denied")
        w.add_bytes("/after.txt", b"still restored")

    sid = snapshot(store, build)
    with pytest.raises(RestoreIncomplete, match=r"2 file\(s\) restored .* 1 record\(s\) were skipped: "
                                                r"/unreadable.db \(not backed up: unreadable: Permission denied\)"):
        restore_records(store, lambda: store.records(sid), sandbox.target)
    assert (sandbox.target / "after.txt").read_bytes() == b"still restored"


def test_unknown_kind_is_skipped_and_reported(store, sandbox, monkeypatch) -> None:
    sid = snapshot(store, lambda w: w.add_bytes("/x", b"x"))
    recs = list(store.records(sid)) + [Record.of("/future", "z")]
    with pytest.raises(RestoreIncomplete, match=r"/future \(unknown record kind 'z'\)"):
        restore_records(store, recs, sandbox.target)
    assert (sandbox.target / "x").read_bytes() == b"x"


def test_no_sync_still_restores(store, sandbox) -> None:
    sid = snapshot(store, lambda w: w.add_bytes("/x", b"x" * 100_000))
    restore_records(store, lambda: store.records(sid), sandbox.target, sync=False)
    assert (sandbox.target / "x").read_bytes() == b"x" * 100_000


def test_cli_exit_status_names_skipped_records(store, sandbox, tmp_path: Path) -> None:
    import subprocess
    import sys

    sid = snapshot(store, lambda w: w.add_error("/gone", "unreadable: Input/output error"))
    env = {**os.environ, "PGPLAKAR_PASSPHRASE": "pw"}
    r = subprocess.run([sys.executable, "-m", "airflow_provider_pgplakar.cli.main", "at", str(tmp_path / "store"),
                        "restore", "-to", str(sandbox.target), sid], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1
    assert "restore incomplete" in r.stderr and "/gone (not backed up: unreadable: Input/output error)" in r.stderr


@pytest.mark.parametrize("field", ["blake3", "sha256"])
def test_tampered_record_digest_fails_and_leaves_no_file(store, sandbox, field: str) -> None:
    """A record whose whole-content digest does not match its chunks (BLAKE3 now, or the SHA-256 of a snapshot
    written before 2026-12-03): the restore fails naming the record, and no file is left under its name (nor a
    temporary one): bytes that do not match the manifest are never presented as the file."""
    import hashlib

    from airflow_provider_pgplakar.store.errors import IntegrityError

    data = os.urandom(300_000)
    sid = snapshot(store, lambda w: w.add_bytes("/victim.bin", data, mode=0o644))
    recs = list(store.records(sid))
    victim = next(r for r in recs if r.path == "/victim.bin")
    if field == "sha256":  # what an older writer stored: SHA-256 only
        victim = victim.replace(blake3=None, sha256=hashlib.sha256(data).digest())
        with store.open_record(victim) as r:
            assert r.read() == data  # the untampered legacy digest verifies
    good = getattr(victim, field)
    bad = victim.replace(**{field: bytes([good[0] ^ 1]) + good[1:]})
    recs = [bad if r.path == "/victim.bin" else r for r in recs]
    before = sandbox.before()
    name = "BLAKE3" if field == "blake3" else "SHA-256"
    with pytest.raises(IntegrityError, match=f"record '/victim.bin': the {name} does not match the manifest"):
        restore_records(store, recs, sandbox.target)
    sandbox.assert_outside_unchanged(before)
    assert not [p for p in listing(sandbox.target) if "victim" in str(p)], listing(sandbox.target)
