"""A cancelled physical restore (``on_kill``, SIGTERM) stops writing files and does not start pg_verifybackup."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_pgplakar.pg import datadir
from airflow_provider_pgplakar.pg import process as process_mod
from airflow_provider_pgplakar.pg.datadir import physical_restore
from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.pg.process import TaskCancelled, cancel
from airflow_provider_pgplakar.store.record import Record
from tests.physical.conftest import phys_opts, scratch_dir


@pytest.mark.parametrize("when", ["files", "before_verify"])
def test_cancel_stops_a_physical_restore(when: str, pg_factory, pg_manager, store, monkeypatch) -> None:
    src = pg_factory(15)
    sid = physical_backup(store, phys_opts(src, checkpoint="fast")).snapshot_id
    total = sum(1 for _ in store.records(sid))
    spawned: list[str] = []
    real_spawn = process_mod.spawn
    monkeypatch.setattr(datadir, "spawn", lambda argv, **kw: spawned.append(argv[0]) or real_spawn(argv, **kw))
    added: list[str] = []
    real_add, real_finish = datadir._Writer.add, datadir._Writer.finish

    def add(self: Any, rec: Record) -> None:
        added.append(rec.path)
        real_add(self, rec)
        if when == "files" and len(added) == 20:
            cancel()  # as on_kill does, from the signal handler or another thread

    def finish(self: Any) -> None:
        real_finish(self)
        if when == "before_verify":
            cancel()

    monkeypatch.setattr(datadir._Writer, "add", add)
    monkeypatch.setattr(datadir._Writer, "finish", finish)
    root = scratch_dir(pg_manager, f"cancelled-{when}")
    with pytest.raises(TaskCancelled, match="the task was cancelled"):
        physical_restore(store, sid, root / "data", pg_bin_dir=str(src.bin_dir))
    assert spawned == [], "pg_verifybackup ran after the cancel"
    if when == "files":
        assert len(added) == 20 < total  # nothing written after the cancel
    else:
        assert len(added) == total
