"""``jobs=N`` logical backups: several databases dumped at once into one snapshot, identical to ``jobs=1``.

Real servers: a cluster of awkwardly named databases of different sizes (several tables each) is backed up with
``jobs=1`` and ``jobs=4``; both snapshots have the same records in the same order and restore to the same rows.
Killing one of the parallel dumps fails the backup, stops the other dumps and commits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg import logical as logical_mod
from airflow_provider_pgplakar.pg.jobs import Stopper, run_ordered
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.process import ToolFailed
from airflow_provider_pgplakar.pg.restore import logical_restore
from airflow_provider_pgplakar.store.check import check
from airflow_provider_pgplakar.store.errors import StoreError
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import module_server, src_opts
from tests.logical.test_names_and_failures import _Killer, _proc_children
from tests.pgservers import PgServer

# quotes, '=', spaces, a leading '-', '%' and '/' (percent-encoded in record paths); sizes differ so that the
# largest-first schedule is visible: rows per table
AWKWARD = {
    "it's \"quoted\"": 30000,
    "dbname=postgres user=x": 3000,
    "-leading dash": 60000,
    "with space/and 100%": 12000,
    "plain_small": 500,
}
EXCLUDE = "postgres,template1"  # leftovers of other tests' servers and the fixed databases stay out of the way


src = module_server()


dst = module_server()


def _exec(server: PgServer, db: str, query: Any, params: Any = None) -> None:
    with server.connect(db) as c:
        c.execute(query, params)


def _create(server: PgServer, name: str) -> None:
    _exec(server, "postgres", sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _drop(server: PgServer, name: str) -> None:
    _exec(server, "postgres", sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _fill(server: PgServer, name: str, rows: int) -> None:
    """Three tables (one with a sequence, one with wide rows, one in its own schema) of sizes set by ``rows``."""
    with server.connect(name) as c:
        c.execute("CREATE TABLE orders (id serial PRIMARY KEY, amount numeric, note text)")
        c.execute("INSERT INTO orders (amount, note) SELECT g * 1.5, md5(g::text) FROM generate_series(1, %s) g",
                  (rows,))
        c.execute("CREATE TABLE blobs AS SELECT g AS id, repeat(md5(g::text), 20) AS pad "
                  "FROM generate_series(1, %s) g", (rows // 3,))
        c.execute('CREATE SCHEMA "odd schema"')
        c.execute('CREATE TABLE "odd schema"."Events" (at timestamptz, what text)')
        c.execute('INSERT INTO "odd schema"."Events" SELECT now() - g * interval \'1 s\', %s '
                  "FROM generate_series(1, %s) g", (name, rows // 7 + 1))


def _counts(server: PgServer, names: list[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in names:
        with server.connect(name) as c:
            out[name] = tuple(c.execute(q).fetchone()[0] for q in (
                "SELECT count(*) FROM orders", "SELECT count(*) FROM blobs",
                'SELECT count(*) FROM "odd schema"."Events"', "SELECT sum(amount) FROM orders",
                "SELECT last_value FROM orders_id_seq"))
    return out


@pytest.fixture(scope="module")
def cluster(src: PgServer) -> Iterator[list[str]]:
    for name, rows in AWKWARD.items():
        _create(src, name)
        _fill(src, name, rows)
    yield list(AWKWARD)
    for name in AWKWARD:
        _drop(src, name)


def _records(store: Any, snap: str) -> list[tuple[Any, ...]]:
    """What a restore reads: path, kind, mode and metadata of every record, in manifest order (dump contents
    differ in pg_dump's timestamp only, so they are compared by restoring)."""
    return [(r.path, r.kind, r.mode, r.meta) for r in store.records(snap)]


def _restore_counts(store: Any, snap: str, dst: PgServer, names: list[str]) -> dict[str, tuple[int, ...]]:
    location, opts = src_opts(dst, recreate="true", databases=",".join(names), no_globals="true")
    summary = logical_restore(store, snap, parse_restore_options(location, opts))
    assert summary.ok, summary.text()
    try:
        return _counts(dst, names)
    finally:
        for name in names:
            _drop(dst, name)


def test_jobs4_backup_restores_identically_to_jobs1(store, src, dst, cluster, monkeypatch) -> None:
    source_counts = _counts(src, cluster)
    started: list[str] = []
    real_pg_dump = logical_mod.commands.pg_dump

    def recording(tool: str, database: str, *args: Any, **kw: Any) -> list[str]:
        started.append(database)
        return real_pg_dump(tool, database, *args, **kw)

    monkeypatch.setattr(logical_mod.commands, "pg_dump", recording)
    location, opts = src_opts(src, exclude_databases=EXCLUDE, fingerprint="counts")
    seq = logical_backup(store, parse_source_options(location, dict(opts, jobs="1")))
    assert started == sorted(cluster, key=lambda n: n.encode())  # jobs=1: listing order
    started.clear()
    # a fresh password per connection and per tool process, asked for on the dump threads (as IAM tokens are)
    asked: list[str] = []
    tools: list[tuple[str, str]] = []
    real_run_tool = logical_mod.run_tool

    def password() -> str:
        asked.append(threading.current_thread().name)
        return src.password

    def spy_run_tool(argv: list[str], env: dict[str, str], *a: Any, **kw: Any) -> Any:
        tools.append((os.path.basename(argv[0]), threading.current_thread().name))
        return real_run_tool(argv, env, *a, **kw)

    monkeypatch.setattr(logical_mod, "run_tool", spy_run_tool)
    t0 = time.monotonic()
    par = logical_backup(store, parse_source_options(location, dict(opts, jobs="4")), password=password)
    elapsed = time.monotonic() - t0
    dump_threads = [t for name, t in tools if name == "pg_dump"]
    assert len(dump_threads) == len(cluster) and all(t.startswith("pgplakar-dump") for t in dump_threads)
    assert len(set(dump_threads)) > 1  # really in parallel
    # per database: the fingerprint connection, the snapshot-import probe and pg_dump, each with its own password
    assert sum(t.startswith("pgplakar-dump") for t in asked) == 3 * len(cluster)

    by_size = sorted(cluster, key=lambda n: -AWKWARD[n])
    assert set(started[:4]) == set(by_size[:4]) and started[4] == by_size[4], started  # largest first
    assert par.databases == seq.databases == sorted(cluster, key=lambda n: n.encode())
    assert par.warnings == seq.warnings == []
    assert _records(store, par.snapshot_id) == _records(store, seq.snapshot_id)
    paths = [r[0] for r in _records(store, par.snapshot_id)]
    assert paths[0] == "/manifest.json" and paths[1] == "/00000-globals.sql" and paths[-1] == "/fingerprints.json"
    assert len(paths) == len(cluster) + 3
    head_seq = store.load_snapshot(seq.snapshot_id).header
    head_par = store.load_snapshot(par.snapshot_id).header
    assert head_par["meta"]["options"]["jobs"] == 4 and head_seq["meta"]["options"]["jobs"] == 1
    assert head_par["stats"]["records"] == head_seq["stats"]["records"] == len(paths)
    # the fingerprints were taken per database in each dump's own snapshot: the same rows either way
    prints = {}
    for snap in (seq.snapshot_id, par.snapshot_id):
        with store.open_record(store.find_record(snap, "/fingerprints.json")) as f:
            doc = json.loads(f.read())["databases"]
        prints[snap] = {db: {rel: v.get("rows") for rel, v in fp["relations"].items()} for db, fp in doc.items()}
    assert prints[seq.snapshot_id] == prints[par.snapshot_id]
    assert prints[par.snapshot_id]["-leading dash"]['"odd schema"."Events"'] == AWKWARD["-leading dash"] // 7 + 1

    assert _restore_counts(store, seq.snapshot_id, dst, cluster) == source_counts
    assert _restore_counts(store, par.snapshot_id, dst, cluster) == source_counts
    assert check(store).ok
    logging.getLogger(__name__).info("jobs=4 backup of %d databases: %.1fs", len(cluster), elapsed)


def test_killing_one_parallel_dump_stops_the_others_and_commits_nothing(store, src, cluster, caplog) -> None:
    big = ["vj big one", "vj-big two"]
    for name in big:
        _create(src, name)
        # ~60 MiB each, stored uncompressed so that pg_database_size schedules these two first
        _exec(src, name, "CREATE TABLE big (id int, pad text)")
        _exec(src, name, "ALTER TABLE big ALTER pad SET STORAGE EXTERNAL")
        _exec(src, name, "INSERT INTO big SELECT g, repeat(md5(g::text), 80) FROM generate_series(1, 24000) g")
    try:
        location, opts = src_opts(src, exclude_databases=EXCLUDE, jobs="4")
        first = logical_backup(store, parse_source_options(location, dict(opts, database="plain_small")))
        ids_before = store.snapshot_ids()
        assert ids_before == [first.snapshot_id]

        killer = _Killer(after=4 * 2**20)
        killer.start()
        caplog.set_level(logging.WARNING, logger="airflow_provider_pgplakar.pg.jobs")
        try:
            with pytest.raises((ToolFailed, StoreError)) as err:
                logical_backup(store, parse_source_options(location, opts))
        finally:
            killer.stop.set()
            killer.join(10)
        assert killer.killed is not None, "no pg_dump was seen streaming"
        assert isinstance(err.value, ToolFailed) and "killed by signal 9" in str(err.value)  # the first failure
        stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping pg_dump")]
        assert stopped, "the other dumps were not stopped"
        assert f"(pid {killer.killed})" not in " ".join(stopped)  # the killed one is not 'stopped' again
        assert _proc_children(b"pg_dump") == []  # every dump reaped, nothing left running
        assert store.snapshot_ids() == ids_before  # nothing committed
        report = check(store)
        assert report.ok, [str(p) for p in report.problems]
    finally:
        for name in big:
            _drop(src, name)


def test_cli_backup_with_jobs(src, cluster, tmp_path, monkeypatch, capsys) -> None:
    from airflow_provider_pgplakar.cli.main import main as cli_main

    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", "cli jobs passphrase")
    monkeypatch.setenv("PGPASSWORD", src.password)
    at = ["at", str(tmp_path / "cli-store")]
    assert cli_main([*at, "create"]) == 0
    capsys.readouterr()
    location = f"postgres://{src.superuser}@{src.host}:{src.port}/"
    assert cli_main([*at, "backup", "--json", location, f"pg_bin_dir={src.bin_dir}", "jobs=3",
                     f"exclude_databases={EXCLUDE}"]) == 0
    out = json.loads(capsys.readouterr().out)
    snap = out["snapshot"]
    with Store.open(str(tmp_path / "cli-store"), "cli jobs passphrase") as st:
        header = st.load_snapshot(snap).header
        dumps = [r.meta["database"] for r in st.records(snap) if r.path.endswith(".dump")]
    assert header["meta"]["options"]["jobs"] == 3 and dumps == sorted(cluster, key=lambda n: n.encode())
    # the summary: per database its size and what it added to the store (the first snapshot: nearly all of it)
    assert [r["database"] for r in out["per_database"]] == dumps
    assert (out["new_bytes"], out["new_stored_bytes"]) == (header["stats"]["new_raw_bytes"],
                                                          header["stats"]["new_stored_bytes"])
    assert sum(r["new_bytes"] for r in out["per_database"]) <= out["new_bytes"]
    # a dump none of whose chunks another stream claimed first adds all its bytes plus its chunk list (tens of bytes
    # per chunk): new bytes may exceed the dump's size by that list, never by more
    assert all(0 < r["new_bytes"] <= r["bytes"] + 4096 and r["new_stored_bytes"] > 0 for r in out["per_database"]), out
    assert cli_main([*at, "backup", location, f"pg_bin_dir={src.bin_dir}", "jobs=3",
                     f"exclude_databases={EXCLUDE}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("snapshot ") and " new (" in lines[0], lines
    assert [line.split(":")[0].strip() for line in lines[1:]] == dumps
    assert all(" new (" in line and " stored) in " in line for line in lines[1:]), lines
    assert cli_main([*at, "backup", location, f"pg_bin_dir={src.bin_dir}", "jobs=0"]) == 1
    assert "jobs: 0 is out of range (must be between 1 and 32)" in capsys.readouterr().err


def test_jobs_option_bounds() -> None:
    for value, match in (("0", "out of range"), ("33", "out of range"), ("two", "invalid integer")):
        with pytest.raises(OptionError, match=f"jobs.*{match}"):
            parse_source_options("postgres://h", {"jobs": value})
    assert parse_source_options("postgres://h", {"jobs": "32"}).jobs == 32
    assert parse_source_options("postgres://h").jobs == 1


# -- the scheduler on its own --------------------------------------------------------------------------------------


def test_run_ordered_delivers_in_listing_order_largest_first() -> None:
    items = ["a", "bbbb", "cc", "ddd", "e"]
    started: list[str] = []
    delivered: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(item: str) -> str:
        with lock:
            started.append(item)
        time.sleep(0.01 * (6 - len(item)))  # the small ones end first
        return item.upper()

    run_ordered(items, work, lambda i, r: delivered.append((i, r)), jobs=2, size=len, stopper=Stopper())
    assert delivered == [(i, x.upper()) for i, x in enumerate(items)]
    assert set(started[:2]) == {"bbbb", "ddd"} and started[2] == "cc"


def test_run_ordered_first_failure_stops_the_rest() -> None:
    stopper = Stopper()
    release = threading.Event()
    outcome: dict[str, str] = {}

    def work(item: str) -> str:
        if item == "boom":
            raise ValueError("the first failure")
        release.wait(5)  # a long dump: ended by the stop below
        try:
            stopper.check()
        except Exception:
            outcome[item] = "stopped"
            raise
        outcome[item] = "finished"
        return item

    real_stop = stopper.stop

    def stop(why: BaseException | None = None) -> None:
        real_stop(why)
        release.set()

    stopper.stop = stop  # type: ignore[method-assign]
    delivered: list[int] = []
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="the first failure"):
        run_ordered(["long", "boom", "never", "never2"], work, lambda i, r: delivered.append(i), jobs=2,
                    size=lambda x: {"long": 3, "boom": 2}.get(x, 1), stopper=stopper)
    assert time.monotonic() - t0 < 4  # the long one was stopped, not waited for
    assert delivered == [] and stopper.stopped
    assert outcome["long"] == "stopped" and "finished" not in outcome.values()


def test_stopper_kills_a_tool_started_after_the_stop() -> None:
    from airflow_provider_pgplakar.pg.process import run_tool

    stopper = Stopper()
    stopper.stop()
    with pytest.raises(Exception, match="stopped"):
        with run_tool(["sleep", "30"], dict(os.environ)) as tool, stopper.tool(tool):
            pass
    assert tool.proc.returncode == -9


def test_a_dump_stopped_while_its_snapshot_is_probed_is_not_reported_as_refused(src, caplog) -> None:
    """The backup is ending (another dump failed, or an earlier try's snapshot is reused) while a dump's exported
    snapshot is probed: the dump stops; it does not fall back to a dump without --snapshot with a warning that
    the server refused the snapshot (seen in CI with jobs=2 and a reused snapshot)."""
    from airflow_provider_pgplakar.pg.fingerprint import dump_snapshot
    from airflow_provider_pgplakar.pg.jobs import Stopped

    stopper = Stopper()
    calls: list[str] = []

    def connect(db: str) -> Any:
        calls.append(db)
        if len(calls) > 1:  # the probe: the stop came in between, as Session.connect reports it
            stopper.stop()
            stopper.check()
        return src.connect(db)

    with caplog.at_level(logging.WARNING, logger="airflow_provider_pgplakar"):
        with pytest.raises(Stopped):
            with dump_snapshot(connect, "postgres", "catalog"):
                pytest.fail("the block must not run once the backup is stopped")
    assert calls == ["postgres", "postgres"]
    assert "refused" not in caplog.text
