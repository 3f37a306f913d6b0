"""A physical restore that fails or is cancelled while writing removes what it wrote (pg/datadir.py), as
``pg_basebackup`` does: a partial data directory someone might start with ``pg_ctl`` is never left behind unless
``clean=False`` (``--no-clean``) asks for it. A target the restore created goes entirely (with the parents it made); a
target that existed empty (or emptied by ``overwrite``) is empty again; nothing outside the targets changes and no
symlink is followed. No server is needed: the snapshots are built through the store API (test_batched_restore.py)."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.cli.main import main
from airflow_provider_pgplakar.pg import datadir
from airflow_provider_pgplakar.pg.datadir import PhysicalRestoreError, physical_restore
from airflow_provider_pgplakar.pg.process import TaskCancelled, cancel
from airflow_provider_pgplakar.store import batchrestore
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.repo import Store
from tests.hostile.trees import listing, tree
from tests.physical.test_batched_restore import BLOCK, PASS, _blocks

TS_OID = 16400
TS_FILE = f"/tablespaces/{TS_OID}/PG_15_202209061/5/16385"


def _snapshot(st: Store, ts_location: Path) -> str:
    """A data directory and one tablespace; the tablespace's last file comes last, so a pack of it missing fails
    the restore after files of both roots were written."""
    meta = {"server_version_num": 150004, "server_major": 15,
            "tablespaces": [{"oid": TS_OID, "location": str(ts_location)}]}
    with st.writer(source={"kind": "postgres+bin", "origin": "postgres+bin://test"}, meta=meta) as w:
        for d in ("/data", "/data/base", "/data/base/1", "/data/pg_tblspc"):
            w.add_entry(d, "d", mode=0o700)
        w.add_bytes("/data/PG_VERSION", b"15\n", mode=0o600)
        w.add_bytes("/data/backup_label", b"START WAL LOCATION: 0/2000028\n", mode=0o600)
        for n in range(6):
            w.add_stream(f"/data/base/1/{n}", io.BytesIO(_blocks(n, 4)), chunking=Chunking.fixed(BLOCK), mode=0o600)
        w.add_entry(f"/data/pg_tblspc/{TS_OID}", "l", link_target=str(ts_location))
        for d in (f"/tablespaces/{TS_OID}", f"/tablespaces/{TS_OID}/PG_15_202209061",
                  f"/tablespaces/{TS_OID}/PG_15_202209061/5"):
            w.add_entry(d, "d", mode=0o700)
        w.add_stream(TS_FILE + "_a", io.BytesIO(_blocks(50, 4)), chunking=Chunking.fixed(BLOCK), mode=0o600)
        w.add_stream(TS_FILE, io.BytesIO(_blocks(60, 24)), chunking=Chunking.fixed(BLOCK), mode=0o600)
    return w.snapshot_id


@pytest.fixture
def st(tmp_path: Path) -> Any:
    store = Store.create(str(tmp_path / "store"), PASS, pack_target=64 * 1024)  # ~8 blocks per pack
    yield store
    store.close()


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of a few chunks and files (test_batched_restore.py): many complete before the failing one."""
    for name, value in (("WINDOW_RAW", 5 * BLOCK), ("WINDOW_REFS", 7), ("WINDOW_FILES", 4), ("IN_FLIGHT", 3),
                        ("IN_FLIGHT_FILES", 6), ("IN_FLIGHT_DIGEST_RAW", 6 * BLOCK)):
        monkeypatch.setattr(batchrestore, name, value)


def _lose_last_pack(st: Store, sid: str) -> None:
    """Remove the pack holding the last chunk of the tablespace's last file (the store lost it)."""
    blob = list(chunk_refs(st, st.find_record(sid, TS_FILE)))[-1][0]
    loc = st.cache.lookup(blob)
    assert loc is not None
    (Path(st.backend.root) / f"packs/{loc.pack_id[:2]}/{loc.pack_id}").unlink()


def _shape(t: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """A tree without directory mtimes (creating and removing a target touches its parent's)."""
    return {k: v[:5] + (None if v[0] == stat.S_IFDIR else v[5],) + v[6:] for k, v in t.items()}


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    root = tmp_path / "sandbox"
    (root / "outside" / "victim_dir").mkdir(parents=True)
    (root / "outside" / "victim_dir" / "keep").write_text("do not touch")
    (root / "outside" / "victim.txt").write_text("do not touch")
    (root / "into").mkdir()
    return root


class _Log:
    """The records of pg/datadir.py's logger, however Airflow configured logging (caplog misses them once it has)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def datadir_log() -> Any:
    log = _Log()
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: log.lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(datadir.__name__)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield log
    logger.removeHandler(handler)
    logger.setLevel(level)


def _files_written(datadir_log: Any) -> int:
    m = re.search(r"failed after (\d+) files", datadir_log.text)
    assert m, datadir_log.text
    return int(m.group(1))


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_restore_removes_what_it_wrote(st: Store, sandbox: Path, small_windows: None,
                                                datadir_log: Any, existing: bool) -> None:
    """New targets (below parents the restore made) go entirely; existing empty targets are empty again."""
    data, ts = sandbox / "into" / "new" / "data", sandbox / "into" / "new-ts" / "ts"
    if existing:
        for d in (data, ts):
            d.mkdir(parents=True, mode=0o700)
            d.chmod(0o700)
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    before = _shape(tree(sandbox))
    with pytest.raises(IntegrityError, match="is missing from"):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, verify=False,
                         sync=True)
    assert _files_written(datadir_log) >= 8, "the test must fail after files of both roots were written"
    assert _shape(tree(sandbox)) == before, "the sandbox is as it was: only what the restore wrote is gone"
    if existing:
        assert listing(data) == [] and listing(ts) == [] and data.is_dir() and ts.is_dir()
        assert f"removed what it wrote: the contents of {ts}, the contents of {data}" in datadir_log.text
    else:
        assert not (sandbox / "into" / "new").exists() and not (sandbox / "into" / "new-ts").exists()
        assert f"removed what it wrote: {ts}, {data}" in datadir_log.text


def test_overwrite_then_failure_leaves_the_target_empty(st: Store, sandbox: Path, small_windows: None,
                                                        datadir_log: Any) -> None:
    """``overwrite`` emptied the old cluster; the failed restore removes its own files too: no mixture is left."""
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    data.mkdir(mode=0o700)
    (data / "PG_VERSION").write_text("14\n")
    (data / "old-link").symlink_to(sandbox / "outside")
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    outside = tree(sandbox / "outside")
    with pytest.raises(IntegrityError, match="is missing from"):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, overwrite=True,
                         verify=False, sync=False)
    assert listing(data) == [] and not ts.exists()
    assert tree(sandbox / "outside") == outside


def test_cleanup_never_follows_a_symlink(st: Store, sandbox: Path, small_windows: None,
                                         monkeypatch: pytest.MonkeyPatch, datadir_log: Any) -> None:
    """A symlink inside the target (``pg_tblspc/<oid>`` the restore made, or one planted there meanwhile) is
    unlinked; what it points at (the tablespace, a directory outside) is never recursed into."""
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    real_add = datadir._Writer.add

    def add(self: Any, rec: Any) -> None:
        real_add(self, rec)
        if rec.path == "/data/base/1/5":  # planted beside the restore's own files, into a directory it made
            (data / "base" / "1" / "planted").symlink_to(sandbox / "outside")

    monkeypatch.setattr(datadir._Writer, "add", add)
    before = _shape(tree(sandbox))
    with pytest.raises(IntegrityError, match="is missing from"):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, verify=False,
                         sync=False)
    assert _shape(tree(sandbox)) == before
    assert (sandbox / "outside" / "victim_dir" / "keep").read_text() == "do not touch"


def test_no_clean_keeps_the_partial_directory_and_says_so(st: Store, sandbox: Path, small_windows: None,
                                                          datadir_log: Any) -> None:
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    with pytest.raises(IntegrityError, match="is missing from"):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, verify=False,
                         sync=False, clean=False)
    assert (data / "PG_VERSION").read_bytes() == b"15\n"
    assert os.readlink(data / "pg_tblspc" / str(TS_OID)) == str(ts)
    assert (ts / "PG_15_202209061" / "5" / "16385_a").read_bytes() == _blocks(50, 4)
    assert f"kept as asked (clean=False, --no-clean): {data}, {ts} are incomplete and must not be started" in \
        datadir_log.text


def test_a_cancelled_restore_removes_what_it_wrote(st: Store, sandbox: Path, small_windows: None,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   datadir_log: Any) -> None:
    """on_kill / SIGTERM (cancel() from another thread) while workers read: TaskCancelled, and the target is gone."""
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    sid = _snapshot(st, sandbox / "old-ts")
    fetches = 0
    real = batchrestore.BatchRestore._fetch

    def fetch(self: Any, group: Any) -> Any:
        nonlocal fetches
        fetches += 1
        if fetches == 4:
            cancel()
        return real(self, group)

    monkeypatch.setattr(batchrestore.BatchRestore, "_fetch", fetch)
    before = _shape(tree(sandbox))
    with pytest.raises(TaskCancelled):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, verify=False,
                         sync=True)
    assert _files_written(datadir_log) > 0
    assert _shape(tree(sandbox)) == before and not data.exists() and not ts.exists()


def test_a_refusal_removes_nothing(st: Store, sandbox: Path) -> None:
    """Refused before writing (a non-empty data directory without overwrite, a non-empty unmapped tablespace):
    nothing is deleted, whatever ``clean`` says."""
    data = sandbox / "into" / "data"
    data.mkdir()
    (data / "PG_VERSION").write_text("14\n")
    sid = _snapshot(st, sandbox / "outside")
    before = tree(sandbox)
    with pytest.raises(PhysicalRestoreError, match="is not empty: restore into an empty directory"):
        physical_restore(st, sid, data, verify=False,
                         tablespace_mapping={str(sandbox / "outside"): str(sandbox / "into" / "ts")})
    with pytest.raises(PhysicalRestoreError, match="its original location, not mapped\\) is not empty"):
        physical_restore(st, sid, sandbox / "into" / "fresh", verify=False)
    assert tree(sandbox) == before


def test_cli_removes_by_default_and_keeps_with_no_clean(st: Store, sandbox: Path, small_windows: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        datadir_log: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", PASS)
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    args = ["at", str(st.backend.root), "restore", "-to", str(data), "-T", f"{sandbox / 'old-ts'}={ts}", "--no-verify",
            sid[:10]]
    assert main(args) == 1
    assert "is missing from" in capsys.readouterr().err
    assert not data.exists() and not ts.exists() and "removed what it wrote" in datadir_log.text
    assert main([*args, "--no-clean"]) == 1
    assert (data / "PG_VERSION").read_bytes() == b"15\n" and "must not be started" in datadir_log.text
    files = ["at", str(st.backend.root), "restore", "-to", str(sandbox / "files"), "--no-clean", f"{sid[:10]}:/data"]
    assert main(files) == 2
    assert "--no-clean apply to a whole physical (postgres+bin) snapshot only" in capsys.readouterr().err


@pytest.mark.parametrize("clean", [True, False])
def test_operator_clean_parameter(st: Store, sandbox: Path, small_windows: None, monkeypatch: pytest.MonkeyPatch,
                                  datadir_log: Any, clean: bool) -> None:
    import json

    from airflow_provider_pgplakar.operators.physical import PgPlakarPhysicalRestoreOperator
    from tests.task_context import FakeTI, context

    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASS, "extra": {"location": str(st.backend.root)}}))
    data, ts = sandbox / "into" / "data", sandbox / "into" / "ts"
    op = PgPlakarPhysicalRestoreOperator(task_id="restore", snapshot_id=sid, target_dir=str(data), verify=False,
                                         tablespace_mapping={str(sandbox / "old-ts"): str(ts)}, clean=clean)
    with pytest.raises(IntegrityError, match="is missing from"):
        op.execute(context(FakeTI(dag_id="d", task_id="restore", run_id="manual__1")))
    if clean:
        assert not data.exists() and not ts.exists() and "removed what it wrote" in datadir_log.text
    else:
        assert (data / "PG_VERSION").read_bytes() == b"15\n" and "must not be started" in datadir_log.text


def test_what_appeared_before_the_first_write_is_left(st: Store, sandbox: Path, small_windows: None,
                                                      monkeypatch: pytest.MonkeyPatch, datadir_log: Any) -> None:
    """An entry that appeared in an empty target between the plan and the first write is not the restore's: the
    cleanup leaves it (and so the directory) and says so."""
    data = sandbox / "into" / "data"
    data.mkdir()
    sid = _snapshot(st, sandbox / "old-ts")
    _lose_last_pack(st, sid)
    real_open = datadir._Writer.open

    def open_(self: Any) -> None:
        (data / "theirs").write_text("someone else's")
        real_open(self)

    monkeypatch.setattr(datadir._Writer, "open", open_)
    with pytest.raises(IntegrityError, match="is missing from"):
        physical_restore(st, sid, data, tablespace_mapping={str(sandbox / "old-ts"): str(sandbox / "into" / "ts")},
                         verify=False, sync=False)
    assert listing(data) == ["theirs"] and (data / "theirs").read_text() == "someone else's"
    assert f"left theirs in {data}: it was there before this restore wrote anything" in datadir_log.text
