"""The physical backup's reader thread against a real server (``pg/basebackup.py``: it receives and decompresses
the BASE_BACKUP stream while the main thread parses tar members and feeds the store).

- a failure inside the thread (here a decompression step that fails) fails the backup with the same message as
  before the thread existed, commits nothing, and leaves no thread and no WAL sender behind;
- a failure of the consumer (the store refusing a file mid-archive) stops the thread, which was blocked on its full
  queue, and closes the replication connection;
- a cancel (``on_kill``, SIGTERM) mid-stream stops the backup and the thread, and commits nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from airflow_provider_pgplakar.pg import decompress
from airflow_provider_pgplakar.pg.basebackup import BaseBackupError
from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.pg.process import TaskCancelled, cancel, cancellable
from airflow_provider_pgplakar.store.writer import SnapshotWriter
from tests.physical.conftest import phys_opts, scalar, wait_until

WALSENDERS = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pgplakar-basebackup" and t.is_alive()]


def assert_nothing_left(src: Any, store: Any) -> None:
    assert store.snapshot_ids() == []
    assert reader_threads() == [], "the reader thread outlived the backup"
    wait_until(lambda: scalar(src, WALSENDERS) == 0, timeout=10, what="the WAL sender to go")


def filled_server(pg_factory: Any) -> Any:
    src = pg_factory(15)
    with src.connect() as c:  # ~60 MiB of tables: more than the thread's queue and the store's window
        c.execute("CREATE TABLE filler AS SELECT g, md5(g::text) AS t FROM generate_series(1, 600000) g")
        c.execute("CHECKPOINT")
    return src


def test_a_failure_in_the_reader_thread_fails_the_backup_with_its_message(pg_factory, store, monkeypatch) -> None:
    src = filled_server(pg_factory)
    real_step = decompress.Lz4Steps.step
    steps = {"n": 0}

    def failing_step(self: Any) -> bytes | None:
        steps["n"] += 1
        if steps["n"] == 20:
            assert threading.current_thread().name == "pgplakar-basebackup"
            raise decompress.DecompressError("block checksum mismatch (injected)")
        return real_step(self)

    monkeypatch.setattr(decompress.Lz4Steps, "step", failing_step)
    with pytest.raises(BaseBackupError, match=r"^decompressing the lz4 base backup stream failed: block checksum "
                                              r"mismatch \(injected\)$"):
        physical_backup(store, phys_opts(src, server_compression="lz4"))
    assert steps["n"] == 20
    assert_nothing_left(src, store)


@pytest.mark.parametrize("compression", ["lz4", "none"])
def test_a_failing_consumer_stops_the_reader_thread(compression: str, pg_factory, store, monkeypatch) -> None:
    src = filled_server(pg_factory)
    real_add = SnapshotWriter.add_stream
    calls = {"n": 0, "ahead": 0}

    def add_stream(self: SnapshotWriter, path: str, stream: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if path.startswith("/data/base/") and stream._left > 8 << 20:  # in the middle of the big table
            time.sleep(0.5)  # the reader runs ahead meanwhile, until its queue is full
            calls["ahead"] = sum(t.is_alive() for t in reader_threads())
            raise RuntimeError("the store refused this file (injected)")
        return real_add(self, path, stream, **kw)

    monkeypatch.setattr(SnapshotWriter, "add_stream", add_stream)
    with pytest.raises(RuntimeError, match=r"the store refused this file \(injected\)"):
        physical_backup(store, phys_opts(src, server_compression=compression))
    assert calls["ahead"] == 1, "the reader thread should have been running (blocked on its queue) at the failure"
    assert_nothing_left(src, store)


def test_cancel_mid_stream_stops_the_reader_thread(pg_factory, store) -> None:
    src = filled_server(pg_factory)

    def cancel_when_streaming() -> None:
        wait_until(lambda: scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' "
                                       "AND query LIKE 'BASE_BACKUP%'") == 1, what="BASE_BACKUP")
        time.sleep(0.5)
        cancel()

    killer = threading.Thread(target=cancel_when_streaming, daemon=True)
    killer.start()
    with pytest.raises(TaskCancelled), cancellable():
        physical_backup(store, phys_opts(src, max_rate="32"))  # 32 kB/s: still streaming when cancelled
    killer.join(timeout=30)
    assert_nothing_left(src, store)


def test_a_backup_manifest_over_the_bound_fails_the_backup_and_commits_nothing(pg_factory, store,
                                                                               monkeypatch) -> None:
    """The server's backup_manifest is collected in memory up to MANIFEST_MAX (1 GiB): past it, the backup fails with
    one line and commits nothing. Here the bound is 4 KiB, less than any real server's manifest."""
    from airflow_provider_pgplakar.pg import basebackup

    src = pg_factory(15)
    monkeypatch.setattr(basebackup, "MANIFEST_MAX", 4096)
    with pytest.raises(BaseBackupError, match=r"^the server's backup_manifest is over 4096 bytes \(PostgreSQL writes "
                                              r"~200 per file\): .*retry the backup$"):
        physical_backup(store, phys_opts(src))
    assert_nothing_left(src, store)
