"""Readers hold a shared ``read`` lease: prune neither deletes nor repacks packs while a restore, ``cat`` or
``check`` reads them. The big case runs a real ``pgplakar restore`` of ~1 GiB while a prune that repacks is started.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store import locks
from airflow_provider_pgplakar.store import prune as prune_mod
from airflow_provider_pgplakar.store.errors import StoreLocked
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.writer_proc import assert_restores, cli, rand

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _kinds(st: Store) -> list[str]:
    return sorted(le.kind for le in locks.list_leases(st.backend, st.keys))


def _capture(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # handed to the test thread, which asserts on it
        return e


def _partly_dead_pack(st: Store) -> tuple[str, bytes]:
    """Snapshot 1 = /dead + /late in one pack (forgotten), snapshot 2 = /late: the pack is left 60 % dead."""
    late = rand(4 * MiB, 2)
    with st.writer() as w:
        w.add_bytes("/dead", rand(6 * MiB, 1))
        w.add_bytes("/late", late)
    first = w.snapshot_id
    return first, late


def test_prune_waits_for_readers(location: str, tmp_path: Path) -> None:
    st = Store.create(location, PASSPHRASE)
    first, late = _partly_dead_pack(st)
    with st.writer() as w:
        w.add_bytes("/late", late)
    keep = w.snapshot_id
    st.forget([first])

    reader = Store.open(location, PASSPHRASE)
    stream = reader.open_record(reader.find_record(keep, "/late"))
    assert stream.read(1000) == late[:1000]
    assert _kinds(st) == ["read"]
    packs = {o.key for o in st.backend.list("packs/")}
    with pytest.raises(StoreLocked, match="read lease"):
        prune_mod.prune(st)
    assert {o.key for o in st.backend.list("packs/")} == packs

    outcome: list[object] = []
    waiter = threading.Thread(target=lambda: outcome.append(_capture(prune_mod.prune, st, lock_wait=60)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not outcome, outcome
    assert stream.read() == late[1000:]
    stream.close()
    reader.close()  # releases the read lease
    waiter.join(timeout=60)
    rep = outcome[0]
    # >= 1: the metadata pack is repacked too when /late got a chunk list (random data decides)
    assert isinstance(rep, prune_mod.PruneReport) and rep.packs_repacked >= 1, rep
    assert_restores(st, keep, {"/late": late}, tmp_path / "restore")
    assert _kinds(st) == ["read"]  # the restore above; released on close
    st.close()
    assert not any(True for _ in st.backend.list("locks/"))


def test_a_reader_waits_for_a_running_prune(tmp_path: Path) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    with st.writer() as w:
        w.add_bytes("/a", b"abc" * 1000)
    held = locks.acquire(st.backend, st.keys, "prune")
    reader = Store.open(st.location, PASSPHRASE)
    reader.leases.wait = 0.5
    with pytest.raises(StoreLocked, match="prune lease"):
        list(reader.records(w.snapshot_id))
    held.release()
    assert [r.path for r in reader.records(w.snapshot_id)] == ["/a"]
    reader.close()
    st.close()


def test_cli_commands_release_their_read_lease(tmp_path: Path) -> None:
    location = str(tmp_path / "store")
    st = Store.create(location, PASSPHRASE)
    with st.writer() as w:
        w.add_bytes("/a", b"abc" * 1000)
    for args in (["check", "--read-data"], ["restore", w.snapshot_id, "-to", str(tmp_path / "out")],
                 ["ls", w.snapshot_id], ["cat", f"{w.snapshot_id}:/a"]):
        p = cli("at", location, *args)
        assert p.finish() == 0, p.text("stderr")
        assert not any(True for _ in st.backend.list("locks/")), f"{args[0]} left its lease behind"
        if args[0] == "cat":
            assert p.text("stdout") == "abc" * 1000
    assert (tmp_path / "out" / "a").read_bytes() == b"abc" * 1000
    rep = check_mod.check(st)
    assert rep.ok and _kinds(st) == ["read"]
    prune_mod.prune(st)  # this store's own read lease does not block its prune
    st.close()


def _written(root: Path) -> int:
    """Bytes in files below ``root`` so far (the restore writes to a random temporary name first)."""
    total = 0
    for p in root.rglob("*") if root.exists() else ():
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            continue  # renamed meanwhile
    return total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
def test_big_restore_survives_prune_with_repack(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ~1 GiB restore in a real ``pgplakar`` process; a prune that repacks the pack the restore reads last is
    started while it runs: the prune waits for the reader's lease and the restore completes byte-exact."""
    location = str(tmp_path / "store")
    st = Store.create(location, PASSPHRASE)
    first, late = _partly_dead_pack(st)
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for i in range(GiB // (64 * MiB)):
            f.write(rand(64 * MiB, 100 + i))
    with st.writer() as w, open(src, "rb") as fh:
        w.add_stream("/big", fh)  # read first by the restore ...
        w.add_bytes("/late", late)  # ... and this last, from the pack the prune repacks
    keep = w.snapshot_id
    st.forget([first])
    want = _sha256(src)
    src.unlink()

    out = tmp_path / "out"
    restore = cli("at", location, "restore", keep, "-to", str(out))
    deadline = time.monotonic() + 120
    while "read" not in _kinds(st) or _written(out) < 64 * MiB:
        assert restore.proc.poll() is None, restore.text("stderr")
        assert time.monotonic() < deadline, "the restore never started reading"
        time.sleep(0.05)
    caplog.set_level(logging.INFO, logger="airflow_provider_pgplakar.store.locks")
    outcome: list[object] = []
    pruner = threading.Thread(target=lambda: outcome.append(_capture(prune_mod.prune, st, lock_wait=600)))
    pruner.start()
    deadline = time.monotonic() + 30
    while "store busy (read lease" not in caplog.text:
        assert pruner.is_alive(), f"the prune did not wait for the restore: {outcome}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert restore.proc.poll() is None, "the restore ended before the prune started: the test proves nothing"
    assert restore.finish(timeout=600) == 0, restore.text("stderr")
    pruner.join(timeout=600)
    rep = outcome[0]
    # >= 1: the metadata pack is repacked too when /late got a chunk list (random data decides)
    assert isinstance(rep, prune_mod.PruneReport) and rep.packs_repacked >= 1, rep
    assert _sha256(out / "big") == want
    assert (out / "late").read_bytes() == late
    # and after the repack the snapshot still restores
    stream = st.open_record(st.find_record(keep, "/late"))
    assert stream.read() == late
    stream.close()
    st.close()


def test_read_only_access_reads_without_a_lease(location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A restore host with read-only credentials (or a read-only mount) still restores, with a warning."""
    st = Store.create(location, PASSPHRASE)
    with st.writer() as w:
        w.add_bytes("/a", b"abc" * 1000)
    reader = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "reader-cache")
    refused: BaseException
    if location.startswith("s3://"):
        import botocore.exceptions

        from airflow_provider_pgplakar.store.s3 import S3AccessError

        err = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")
        refused = S3AccessError(str(err))
    else:
        refused = PermissionError(13, "Permission denied")
    real_put = type(reader.backend).put

    def put(self, key, data, *, create_only=True):  # noqa: ANN001, ANN202 - the backend's signature
        if key.startswith("locks/"):
            raise refused
        return real_put(self, key, data, create_only=create_only)

    monkeypatch.setattr(reader.backend, "put", put.__get__(reader.backend))
    caplog.set_level(logging.WARNING)
    assert_restores(reader, w.snapshot_id, {"/a": b"abc" * 1000}, tmp_path / "restore")
    assert "reading without one" in caplog.text
    assert _kinds(st) == []
    reader.close()
    st.close()
