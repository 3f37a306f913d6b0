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


def _open_after(monkeypatch: pytest.MonkeyPatch, event: threading.Event) -> None:
    """``Store.open`` waits (up to ``WAIT``) for ``event``: the store is still opening when the backup fails."""
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:
        event.wait(WAIT)
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Store, "open", classmethod(held))


def test_a_backup_failing_while_the_store_opens_takes_no_lease(pg15: PgServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The source fails (no such database) before the store is open: the writer thread must not go on to take a
    backup lease and sync the index (up to an hour waiting for a prune's lease) only to abort it."""
    from airflow_provider_pgplakar.pg.session import Session
    from airflow_provider_pgplakar.store.writer import SnapshotWriter

    Store.create(str(tmp_path / "store"), "pw").close()
    failed = threading.Event()
    real_connect = Session.connect

    def connect(self: Session, *args: Any, **kwargs: Any) -> Any:
        try:
            return real_connect(self, *args, **kwargs)
        except BaseException:
            failed.set()
            raise

    entered: list[str] = []
    real_enter = SnapshotWriter.__enter__

    def enter(self: SnapshotWriter) -> SnapshotWriter:
        entered.append(threading.current_thread().name)
        return real_enter(self)

    monkeypatch.setattr(Session, "connect", connect)
    monkeypatch.setattr(SnapshotWriter, "__enter__", enter)
    _open_after(monkeypatch, failed)
    loc, raw = src_opts(pg15, database="no_such_db_lease")
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        with pytest.raises(Exception, match="no_such_db_lease"):
            logical_backup(opening, parse_source_options(loc, raw))
        assert failed.is_set()
        assert entered == []  # no lease taken after the backup had already failed
        assert opening.result().snapshot_ids() == []
    assert _pgplakar_threads() == []


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_retry_reuses_the_earlier_snapshot_even_when_the_source_is_down(pg15: PgServer, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The operator's retry used to find an earlier try's snapshot before touching PostgreSQL: a try that failed
    after its commit (reading the stats back, the worker lost) is retried successfully even when the server is
    down by then. Unlocking beside the start-up must keep that: the retry's connection error is not the result."""
    Store.create(str(tmp_path / "store"), "pw").close()
    loc, raw = src_opts(pg15, database="postgres")
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        first = logical_backup(opening, parse_source_options(loc, raw), idempotency_key="dag/t/run/-1",
                               reuse_committed=True)
    down = parse_source_options(loc, {**raw, "host": "127.0.0.1", "port": str(_unused_port())})
    for manifest_only, key in ((False, "dag/t/run/-1"), (True, "dag/t/run/-1/manifest")):
        if manifest_only:
            with Store.opening(str(tmp_path / "store"), "pw") as opening:
                logical_backup(opening, parse_source_options(loc, raw), idempotency_key=key,
                               manifest_only=True, reuse_committed=True)
        with Store.opening(str(tmp_path / "store"), "pw") as opening:
            again = logical_backup(opening, down, idempotency_key=key, manifest_only=manifest_only,
                                   reuse_committed=True)
            assert again.already_existed
            assert again.snapshot_id == opening.result().idempotent_id(key)
            if not manifest_only:
                assert again.snapshot_id == first.snapshot_id and again.databases == ["postgres"]
            assert len(opening.result().snapshot_ids()) == 1 + manifest_only
    assert _pgplakar_threads() == []
    with Store.open(str(tmp_path / "store"), "pw") as st:
        assert list(st.backend.list("locks/")) == [] and len(st.snapshot_ids()) == 2
    with pytest.raises(Exception, match="127.0.0.1"):  # no earlier try: the connection error is the result
        with Store.opening(str(tmp_path / "store"), "pw") as opening:
            logical_backup(opening, down, idempotency_key="dag/t/run/-2", reuse_committed=True)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_reusing_an_earlier_try_logs_no_failure(pg15: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture, jobs: str) -> None:
    """Stopping the dumps because an earlier try's snapshot is reused is not a failure: no error or warning line
    ("failed, stopping the dumps", "another dump of this backup failed") in a task that succeeds."""
    import logging

    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    loc, raw = src_opts(pg15, pg_bin_dir=str(bin_dir), jobs=jobs)
    opts = parse_source_options(loc, raw)
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        first = logical_backup(opening, opts, idempotency_key="dag/t/run/-1", reuse_committed=True)
    for p in (*started.iterdir(), *(started / "globals").iterdir()):
        if p.is_file():
            p.unlink()
    _hold_open(monkeypatch, started)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="airflow_provider_pgplakar"):
        with Store.opening(str(tmp_path / "store"), "pw") as opening:
            again = logical_backup(opening, opts, idempotency_key="dag/t/run/-1", reuse_committed=True)
    assert again.already_existed and again.snapshot_id == first.snapshot_id
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert any("already committed by an earlier try" in r.getMessage() for r in caplog.records)
    assert _pgplakar_threads() == []


@pytest.mark.parametrize("reuse", [False, True])
def test_cancel_while_the_store_opens(pg15: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      reuse: bool) -> None:
    """``on_kill`` while the passphrase is stretched: the started tools are killed, the backup fails as cancelled
    (also on a retry whose earlier try committed: a cancelled task does not succeed), and no lease is taken."""
    from airflow_provider_pgplakar.pg.process import TaskCancelled, cancel, cancellable, reset_cancellation
    from airflow_provider_pgplakar.store.writer import SnapshotWriter

    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    loc, raw = src_opts(pg15, pg_bin_dir=str(bin_dir), jobs="2")
    opts = parse_source_options(loc, raw)
    if reuse:
        with Store.opening(str(tmp_path / "store"), "pw") as opening:
            logical_backup(opening, opts, idempotency_key="dag/t/run/-1", reuse_committed=True)
        for p in (*started.iterdir(), *(started / "globals").iterdir()):
            if p.is_file():
                p.unlink()
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:
        deadline = time.monotonic() + WAIT
        while not _pids(started) and time.monotonic() < deadline:
            time.sleep(0.01)
        cancel()  # the operator's on_kill, from the task runner's signal handler
        return real_open(cls, *args, **kwargs)

    entered: list[str] = []
    real_enter = SnapshotWriter.__enter__

    def enter(self: SnapshotWriter) -> SnapshotWriter:
        entered.append(threading.current_thread().name)
        return real_enter(self)

    monkeypatch.setattr(Store, "open", classmethod(held))
    monkeypatch.setattr(SnapshotWriter, "__enter__", enter)
    try:
        with pytest.raises(TaskCancelled), cancellable():
            with Store.opening(str(tmp_path / "store"), "pw") as opening:
                logical_backup(opening, opts, idempotency_key="dag/t/run/-1", reuse_committed=reuse)
    finally:
        reset_cancellation()
    assert entered == []
    pids = _pids(started) + _pids(started / "globals")
    assert pids and not any(_alive(p) for p in pids)
    assert _pgplakar_threads() == []
    monkeypatch.undo()
    with Store.open(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache2") as st:
        assert len(st.snapshot_ids()) == int(reuse)
        assert list(st.backend.list("locks/")) == []


def test_the_snapshot_starts_when_the_backup_started_not_when_the_store_opened(pg15: PgServer, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``time_start`` is what ``newer_than`` (the snapshot sensor) and retention compare: "started after T" must
    mean its data is from after T. pg_dump now takes its MVCC snapshot before the store is open, so a writer that
    stamped the time it was entered would claim data newer than it holds."""
    from datetime import UTC, datetime

    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]
    seen: dict[str, datetime] = {}

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:
        deadline = time.monotonic() + WAIT
        while not _pids(started) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["dump_running"] = datetime.now(UTC)
        time.sleep(0.2)
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Store, "open", classmethod(held))
    loc, raw = src_opts(pg15, database="postgres", pg_bin_dir=str(bin_dir))
    before = datetime.now(UTC)
    with Store.opening(str(tmp_path / "store"), "pw") as opening:
        res = logical_backup(opening, parse_source_options(loc, raw))
        header = opening.result().load_snapshot(res.snapshot_id).header
    after = datetime.now(UTC)
    start, end = datetime.fromisoformat(header["time_start"]), datetime.fromisoformat(header["time_end"])
    assert before <= start < seen["dump_running"] < end <= after
    assert header["duration_s"] >= 0.2


def test_a_wrong_passphrase_is_what_the_log_says_stopped_the_dumps(pg15: PgServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """No dump failed: the log must not say "another dump of this backup failed" when the store did not open."""
    import logging

    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)
    _hold_open(monkeypatch, started)
    loc, raw = src_opts(pg15, pg_bin_dir=str(bin_dir), jobs="2")
    with caplog.at_level(logging.INFO, logger="airflow_provider_pgplakar"):
        with pytest.raises(WrongPassphrase):
            with Store.opening(str(tmp_path / "store"), "not pw") as opening:
                logical_backup(opening, parse_source_options(loc, raw))
    stops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping pg_dump")]
    # (a dump that got the error itself untracks its tool before anything is stopped: there may be no such line)
    assert all("wrong passphrase" in m and "another dump" not in m for m in stops), stops
    assert "not pw" not in caplog.text
    assert _pgplakar_threads() == []


def test_an_opening_store_keeps_no_passphrase_once_open(tmp_path: Path) -> None:
    """The helper's open call closes over the passphrase: it is dropped once the store is open, not kept for the
    whole backup in an object a debugger or a crash reporter dumps."""
    secret = "a distinctive passphrase"
    Store.create(str(tmp_path / "store"), secret).close()
    with Store.opening(str(tmp_path / "store"), secret) as opening:
        opening.result()
        reachable = []
        for value in vars(opening).values():
            reachable.append(value)
            reachable.extend(cell.cell_contents for cell in getattr(value, "__closure__", None) or ())
        assert not any(x == secret for x in reachable)


# How long each tool ran (``meta.seconds``) and what a backup failing during the unlock leaves in the store

DELAY = 2.0  # how much longer than needed the held open keeps the store closed


def _open_once(monkeypatch: pytest.MonkeyPatch, ready: Callable[[], bool]) -> dict[str, Any]:
    """``Store.open`` waits (up to ``WAIT``) until ``ready()``, then ``DELAY`` s more; ``seen["ready"]`` says
    whether it came."""
    seen: dict[str, Any] = {}
    real_open: Callable[..., Store] = Store.open.__func__  # type: ignore[attr-defined]

    def held(cls: type[Store], *args: Any, **kwargs: Any) -> Store:
        deadline = time.monotonic() + WAIT
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["ready"] = ready()
        time.sleep(DELAY)
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Store, "open", classmethod(held))
    return seen


def _blocked_writing(pid: int) -> bool:
    """The process sleeps in the kernel writing to a pipe (its pipe is full: it waits for its reader)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_write" in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("output", ["fits", "fills"])
def test_a_tool_is_not_timed_for_the_unlock_it_waited_for(pg15: PgServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    """``meta.seconds`` is how long each tool ran. The store opens ``DELAY`` s after the first pg_dump exited (its
    output fits its pipe: "fits") or after it blocked on its full pipe ("fills"): that wait is not its run time."""
    from tests.helpers import need

    db = "postgres"
    if output == "fills":
        need(Path("/proc/self/wchan").exists(), "/proc/PID/wchan (to see pg_dump blocked on its pipe)")
        db = "opening_fills"
        with pg15.connect() as c:
            c.execute(f"DROP DATABASE IF EXISTS {db}")
            c.execute(f"CREATE DATABASE {db}")
        with pg15.connect(db) as c:  # ~4 MB of custom-format dump: far more than a pipe holds
            c.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 100000) g")
    Store.create(str(tmp_path / "store"), "pw").close()
    bin_dir, started = _wrapped_bin(tmp_path, pg15.bin_dir)

    def held_up() -> bool:  # every pg_dump started is blocked on its pipe ("fills") or has exited ("fits")
        pids = _pids(started)
        return bool(pids) and all(_blocked_writing(p) if output == "fills" else not _alive(p) for p in pids)

    seen = _open_once(monkeypatch, held_up)
    loc, raw = src_opts(pg15, database=db, pg_bin_dir=str(bin_dir), compress="false")
    try:
        with Store.opening(str(tmp_path / "store"), "pw") as opening:
            res = logical_backup(opening, parse_source_options(loc, raw))
            header = opening.result().load_snapshot(res.snapshot_id).header
            with opening.result().open_record(opening.result().find_record(res.snapshot_id,
                                                                            f"/00001-{db}.dump")) as f:
                dump = f.read()
    finally:
        if output == "fills":
            with pg15.connect() as c:
                c.execute(f"DROP DATABASE IF EXISTS {db}")
    assert seen["ready"]
    assert dump.startswith(b"PGDMP") and (output == "fits" or len(dump) > 1 << 20)
    seconds, duration = header["meta"]["seconds"], header["duration_s"]
    assert set(seconds) == {"/00000-globals.sql", f"/00001-{db}.dump"}
    assert duration >= DELAY
    # the tool waited at least DELAY of the backup's duration for the store: its own run is shorter than the rest
    took = seconds[f"/00001-{db}.dump"]
    assert 0 < took < duration - DELAY / 2, (took, duration)
    if output == "fits":
        assert 0 < seconds["/00000-globals.sql"] < duration - DELAY / 2, (seconds, duration)


def _tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path below ``root``: is it a directory, its size and its mtime (a directory's changes when an entry is
    created or removed in it)."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def test_a_tool_failing_while_the_store_opens_writes_nothing_to_it(pg15: PgServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A single database: pg_dump fails (a real error: no table matches its ``--table`` with ``--strict-names``)
    while the store is still opening. The backup fails with that error then, not once the store is open: nothing is
    written to the store, not even a lease taken and given back."""
    from airflow_provider_pgplakar.pg.jobs import Stopper
    from airflow_provider_pgplakar.pg.process import ToolFailed
    from airflow_provider_pgplakar.store.localfs import LocalBackend

    store = tmp_path / "store"
    Store.create(str(store), "pw").close()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pg_dumpall").symlink_to(pg15.bin_dir / "pg_dumpall")
    script = bin_dir / "pg_dump"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec "{pg15.bin_dir}/pg_dump" --version; fi\n'
                      f'exec "{pg15.bin_dir}/pg_dump" "$@" --strict-names --table=no_such_table_opening\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    failed = threading.Event()  # the backup stopped its other tools: it has failed
    real_stop = Stopper.stop

    def stop(self: Stopper, why: BaseException | None = None) -> None:
        real_stop(self, why)
        failed.set()

    writes: list[tuple[str, str]] = []
    real_put, real_delete = LocalBackend.put, LocalBackend.delete

    def put(self: LocalBackend, key: str, data: Any, **kwargs: Any) -> None:
        writes.append(("put", key))
        real_put(self, key, data, **kwargs)

    def delete(self: LocalBackend, key: str) -> None:
        writes.append(("delete", key))
        real_delete(self, key)

    monkeypatch.setattr(Stopper, "stop", stop)
    monkeypatch.setattr(LocalBackend, "put", put)
    monkeypatch.setattr(LocalBackend, "delete", delete)
    _open_after(monkeypatch, failed)
    before = _tree(store)
    loc, raw = src_opts(pg15, database="postgres", pg_bin_dir=str(bin_dir))
    with pytest.raises(ToolFailed, match="no matching tables were found") as err:
        with Store.opening(str(store), "pw") as opening:
            logical_backup(opening, parse_source_options(loc, raw))
    assert err.value.tool == "pg_dump"
    assert writes == []  # no lease written (and removed again), nothing at all
    assert _tree(store) == before
    assert _pgplakar_threads() == []
