"""Progress of long work in the log: a base backup's bytes against the server's estimate, the wait for a spread
checkpoint, and a logical restore's bytes against the record size; the CLI's ``--json`` progress lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.store import progress
from airflow_provider_pgplakar.store.repo import Store
from tests.physical.conftest import phys_opts

PROGRESS_LOGGER = "airflow_provider_pgplakar.progress"


def test_physical_backup_logs_progress_against_the_server_estimate_and_the_checkpoint_wait(
        pg_factory, store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 200000) g")
    progress.set_sink(None)  # to the log
    monkeypatch.setattr(progress, "EVERY_S", 0.001)  # every file is a progress line
    caplog.set_level(logging.INFO)
    result = physical_backup(store, phys_opts(src, checkpoint="spread"))

    lines = [r.getMessage() for r in caplog.records]
    assert any("waiting for the server's checkpoint (checkpoint=spread" in m and "checkpoint=fast starts at once"
               in m for m in lines)
    ticks = [m for m in lines if m.startswith("base backup: ") and " of ~" in m]
    assert ticks and all("/s" in m for m in ticks), lines
    assert any(" ETA " in m for m in ticks)
    (final,) = [m for m in ticks if "done in" in m]
    archived = sum(r.size or 0 for r in store.records(result.snapshot_id)
                   if r.kind == "f" and r.path.startswith(("/data/", "/tablespaces/")))
    done_mib = float(final.removeprefix("base backup: ").split(" MiB", 1)[0])
    assert abs(done_mib - archived / 2**20) < 0.01 * archived / 2**20, (final, archived)


def test_cli_json_progress_lines_on_stderr(pg_factory, tmp_path: Path) -> None:
    src = pg_factory(15)
    pgplakar = Path(sys.executable).with_name("pgplakar")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGPLAKAR_"))}
    env.update(PGPLAKAR_PASSPHRASE="pw", PGPLAKAR_KDF="1,8192,1", PGPLAKAR_CACHE_DIR=str(tmp_path / "cache"),
               PGPASSWORD=src.password, PGPLAKAR_PROGRESS_EVERY="0.1")
    store = tmp_path / "store"
    run = lambda *a: subprocess.run([str(pgplakar), "at", str(store), *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert run("create").returncode == 0
    with src.connect() as c:  # enough data that the backup outlasts a few 0.1 s intervals
        c.execute("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 600000) g")
    proc = run("--json", "backup", f"postgres+bin://{src.superuser}@{src.host}:{src.port}", "checkpoint=fast",
               f"pg_bin_dir={src.bin_dir}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshot"]  # stdout stays the one JSON result
    events = [json.loads(line)["progress"] for line in proc.stderr.splitlines()]
    assert events and {"what", "done", "total", "rate", "eta_s", "final"} <= set(events[0])
    assert events[-1]["final"] and events[-1]["what"] == "base backup" and events[-1]["total"] > 0
    assert src.password not in proc.stderr
