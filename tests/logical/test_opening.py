"""A backup starts before its store is unlocked (store/opening.py, pg/logical.py ``_LazyWriter``).

The store's open is made to wait until the backup's ``pg_dump`` has started (a wrapper in ``pg_bin_dir`` records
its pid, then execs the real tool), so each test sees the overlap deterministically: on code that unlocks first the
open waits in vain and the test fails. Run through the real CLI entry point (in-process, so ``Store.open`` can be
held) and through ``logical_backup`` as the Airflow operator calls it.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.cli.main import main as cli_main
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.errors import WrongPassphrase
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import src_opts
from tests.pgservers import PgServer

WAIT = 30.0  # how long the held open waits for pg_dump to start (only reached on code that unlocks first)


def _wrapped_bin(tmp_path: Path, real_bin: Path) -> tuple[Path, Path]:
    """A ``pg_bin_dir`` whose pg_dump records its pid in ``started`` and pg_dumpall in ``started/globals`` (one file
    per run, not for ``--version``), then execs the real tool."""
    bin_dir, started = tmp_path / "bin", tmp_path / "started"
    bin_dir.mkdir()
    started.mkdir()
    (started / "globals").mkdir()
    for name in ("pg_dump", "pg_dumpall"):
        where = started if name == "pg_dump" else started / "globals"
        tmp, done = f"{where}/$$.tmp", f"{where}/$$"
        record = f'if [ "$1" != "--version" ]; then echo $$ > "{tmp}" && mv "{tmp}" "{done}"; fi\n'
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\n{record}exec "{real_bin / name}" "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir, started


def _hold_open(monkeypatch: pytest.MonkeyPatch, started: Path) -> dict[str, Any]:
    """``Store.open`` waits (up to ``WAIT``) until a pg_dump has started; what it saw goes into the dict."""
    seen: dict[str, Any] = {}
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:
        deadline = time.monotonic() + WAIT
        while not _pids(started) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["dump_started_first"] = bool(_pids(started))
        seen["thread"] = threading.current_thread().name
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Store, "open", classmethod(held))
    return seen


def _pids(where: Path) -> list[int]:
    return [int(p.name) for p in where.iterdir() if p.name.isdigit()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pgplakar_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pgplakar-")]


def _cli_backup(store: Path, server: PgServer, bin_dir: Path, passphrase: str,
                monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", passphrase)
    monkeypatch.setenv("PGPASSWORD", server.password)
    location = f"postgres://{server.superuser}@{server.host}:{server.port}/postgres"
    return cli_main(["at", str(store), "backup", location, f"pg_bin_dir={bin_dir}"])


def test_cli_backup_starts_pg_dump_while_the_store_unlocks(pg15: PgServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    seen = _hold_open(monkeypatch, started)
    assert _cli_backup(tmp_path / "store", pg15, bin_dir, "pw", monkeypatch) == 0, capsys.readouterr().err
    assert seen == {"dump_started_first": True, "thread": "pgplakar-unlock"}
    assert _pgplakar_threads() == []
    monkeypatch.undo()
    with Store.open(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache2") as st:
        (sid,) = st.snapshot_ids()
        paths = [r.path for r in st.records(sid)]
        assert paths[:3] == ["/manifest.json", "/00000-globals.sql", "/00001-postgres.dump"]
        dump = st.find_record(sid, "/00001-postgres.dump")
        with st.open_record(dump) as f:
            assert f.read(5) == b"PGDMP"  # a complete custom-format dump, stored after the unlock


def test_wrong_passphrase_kills_the_started_dump_and_commits_nothing(pg15: PgServer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    seen = _hold_open(monkeypatch, started)
    code = _cli_backup(tmp_path / "store", pg15, bin_dir, "not the passphrase", monkeypatch)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("pgplakar: error: wrong passphrase for ") and err.count("\n") == 1, err
    assert seen["dump_started_first"]
    pids = _pids(started) + _pids(started / "globals")
    assert pids and not any(_alive(p) for p in pids)  # every started tool's process group was killed
    assert _pgplakar_threads() == []  # unlock, writer, manifest, chunker threads all ended
    monkeypatch.undo()
    with Store.open(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache2") as st:
        assert st.snapshot_ids() == []
        assert list(st.backend.list("locks/")) == [] and list(st.backend.list("packs/")) == []


def test_operator_path_reuses_an_earlier_try_once_unlocked(pg15: PgServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``reuse_committed`` (the backup operator's retry): the dump started while the store opened is stopped and
    the earlier try's snapshot is returned; nothing new is committed."""
    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    loc, raw = src_opts(pg15, database="postgres", pg_bin_dir=str(bin_dir))
    opts = parse_source_options(loc, raw)
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        first = logical_backup(opening, opts, idempotency_key="dag/task/run/-1", reuse_committed=True)
    assert not first.already_existed and first.databases == ["postgres"]
    for p in (*started.iterdir(), *(started / "globals").iterdir()):
        if p.is_file():
            p.unlink()
    seen = _hold_open(monkeypatch, started)
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        again = logical_backup(opening, opts, idempotency_key="dag/task/run/-1", reuse_committed=True)
        assert seen["dump_started_first"]
        assert again.already_existed and again.snapshot_id == first.snapshot_id
        assert again.databases == ["postgres"] and again.bytes == first.bytes
        assert opening.result().snapshot_ids() == [first.snapshot_id]
    pids = _pids(started) + _pids(started / "globals")
    assert pids and not any(_alive(p) for p in pids)
    assert _pgplakar_threads() == []


def test_failing_source_waits_for_the_unlock_and_leaves_no_thread(pg15: PgServer, tmp_path: Path) -> None:
    """A backup failing before the store is open (no such database) reports its own error, and the unlock
    thread is joined and its store closed (the ``with`` block), taking no lease."""
    Store.create(str(tmp_path / "store"), "pw").close()
    loc, raw = src_opts(pg15, database="no_such_db_opening")
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        with pytest.raises(Exception, match="no_such_db_opening"):
            logical_backup(opening, parse_source_options(loc, raw))
        st = opening.result()
        assert list(st.backend.list("locks/")) == [] and st.snapshot_ids() == []
    assert _pgplakar_threads() == []


def test_opening_store_raises_the_same_error_to_every_caller(tmp_path: Path) -> None:
    Store.create(str(tmp_path / "store"), "pw").close()
    opening = Store.opening(str(tmp_path / "store"), "wrong")
    errors = []
    for _ in range(2):
        with pytest.raises(WrongPassphrase) as e:
            opening.result()
        errors.append(e.value)
    assert errors[0] is errors[1]
    opening.close()
    assert _pgplakar_threads() == []
    with Store.opening(str(tmp_path / "store"), "pw") as ok:
        assert ok.result().config.encrypted
    with pytest.raises(RuntimeError, match="closed"):
        ok.result()
