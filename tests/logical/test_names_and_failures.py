"""Awkward database names, a role that cannot read pg_authid, and failing pg_dump runs (nothing committed)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from airflow_provider_pgplakar.pg import PgError
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.process import ToolFailed
from airflow_provider_pgplakar.pg.restore import logical_restore
from airflow_provider_pgplakar.pg.session import dump_path
from airflow_provider_pgplakar.store.check import check
from airflow_provider_pgplakar.store.errors import StoreError
from tests.logical.conftest import module_server, src_opts
from tests.pgservers import PgServer

NAMES = [
    "with space",
    "it's",
    'say "hi"',
    "dbname=postgres",
    "-leading",
    "UPPER",
    "ünïcødé 名前",
    "100%",
    "a/b",
    "a%2Fb",
    "postgresql://x",
]


src = module_server()


dst = module_server()


def _create_db(server: PgServer, name: str, owner: str | None = None) -> None:
    q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if owner:
        q += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    with server.connect() as c:
        c.execute(q)


def _drop_db(server: PgServer, name: str) -> None:
    with server.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _counts(server: PgServer, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        with server.connect(name) as c:
            out[name] = c.execute("SELECT count(*), max(label) FROM t").fetchone()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# database names


def test_awkward_database_names_round_trip(store, src, dst) -> None:
    for i, name in enumerate(NAMES):
        _create_db(src, name)
        with src.connect(name) as c:
            c.execute("CREATE TABLE t (id int, label text)")
            c.execute("INSERT INTO t SELECT g, %s FROM generate_series(1, %s) g", (name, 7 * (i + 1)))
    try:
        before = _counts(src, NAMES)
        assert [before[n][0] for n in NAMES] == [7 * (i + 1) for i in range(len(NAMES))]
        location, opts = src_opts(src)
        res = logical_backup(store, parse_source_options(location, opts))
        assert set(NAMES) <= set(res.databases)
        recs = [r for r in store.records(res.snapshot_id) if r.meta.get("type") == "dump"]
        by_db = {r.meta["database"]: r.path for r in recs}
        assert set(NAMES) <= set(by_db)
        assert len(set(by_db.values())) == len(by_db)  # no two names collapse onto one path
        for name in NAMES:
            assert by_db[name].count("/") == 1, by_db[name]  # a '/' in a name is not a directory
            assert by_db[name] == dump_path(res.databases.index(name) + 1, name)
        assert by_db["a/b"].endswith("-a%2Fb.dump") and by_db["a%2Fb"].endswith("-a%252Fb.dump")

        location, opts = src_opts(dst, recreate="true")
        summary = logical_restore(store, res.snapshot_id, parse_restore_options(location, opts))
        assert summary.ok, summary.text()
        assert _counts(dst, NAMES) == before
    finally:
        for name in NAMES:
            _drop_db(src, name)


# ---------------------------------------------------------------------------------------------------------------------
# a role that cannot read pg_authid (RDS's master user: CREATEDB, CREATEROLE, no superuser)


def test_backup_without_pg_authid_access(store, src, dst) -> None:
    with src.connect() as c:
        c.execute("CREATE ROLE rdsmaster LOGIN CREATEDB CREATEROLE PASSWORD 'master-pw'")
        c.execute("CREATE ROLE app_user LOGIN PASSWORD 'app-pw'")
    _create_db(src, "rdsdb", owner="rdsmaster")
    try:
        with src.connect("rdsdb", user="rdsmaster", password="master-pw") as c:
            c.execute("CREATE TABLE orders (id int PRIMARY KEY, amount numeric)")
            c.execute("INSERT INTO orders SELECT g, g * 2.5 FROM generate_series(1, 777) g")
            c.execute("GRANT SELECT ON orders TO app_user")
            expected = c.execute("SELECT count(*), sum(amount) FROM orders").fetchone()
        location, opts = src_opts(src, database="rdsdb")
        opts["username"], opts["password"] = "rdsmaster", "master-pw"
        res = logical_backup(store, parse_source_options(location, opts))

        assert len(res.warnings) == 1 and "pg_authid" in res.warnings[0]
        assert "--no-role-passwords" in res.warnings[0]
        header = store.load_snapshot(res.snapshot_id).header
        assert header["meta"]["warnings"] == res.warnings
        globals_rec = store.find_record(res.snapshot_id, "/00000-globals.sql")
        with store.open_record(globals_rec) as f:
            script = f.read().decode()
        assert "CREATE ROLE app_user;" in script and "CREATE ROLE rdsmaster;" in script
        assert "PASSWORD" not in script and "SCRAM-SHA-256" not in script

        location, opts = src_opts(dst, recreate="true")
        summary = logical_restore(store, res.snapshot_id, parse_restore_options(location, opts))
        assert summary.ok, summary.text()
        with dst.connect("rdsdb") as c:
            assert c.execute("SELECT count(*), sum(amount) FROM orders").fetchone() == expected
            assert c.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'").fetchone()[0] == "rdsmaster"
            assert c.execute("SELECT has_table_privilege('app_user', 'orders', 'SELECT')").fetchone()[0]
            # roles came back without passwords, attributes kept
            rows = c.execute("SELECT rolname, rolcreatedb, rolcreaterole, rolsuper, rolpassword IS NULL "
                             "FROM pg_authid WHERE rolname IN ('rdsmaster', 'app_user') ORDER BY 1").fetchall()
        assert rows == [("app_user", False, False, False, True), ("rdsmaster", True, True, False, True)]
    finally:
        _drop_db(src, "rdsdb")
        with src.connect() as c:
            c.execute("DROP ROLE IF EXISTS app_user")
            c.execute("DROP ROLE IF EXISTS rdsmaster")


# ---------------------------------------------------------------------------------------------------------------------
# pg_dump failures: nothing is committed, the store stays consistent


def _proc_children(name: bytes) -> list[int]:
    """PIDs of this process's children whose argv[0] ends in ``/name``."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0", 1)[0]
        except (OSError, ValueError, IndexError):
            continue
        if os.path.basename(argv0) == name:
            found.append(int(entry))
    return found


def _written(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class _Killer(threading.Thread):
    """Kills the pg_dump child (its whole process group) once it has written ``after`` bytes to its stdout."""

    def __init__(self, after: int) -> None:
        super().__init__(daemon=True)
        self.after, self.stop = after, threading.Event()
        self.killed: int | None = None
        self.written: int | None = None
        self.seen_at: float | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _proc_children(b"pg_dump"):
                written = _written(pid)
                self.seen_at = self.seen_at or time.monotonic()
                # without /proc/PID/io (hardened kernels) fall back to time: pg_dump streams within a second
                if (written is not None and written >= self.after) or (
                        written is None and time.monotonic() - self.seen_at > 1.0):
                    self.written = written
                    os.killpg(pid, signal.SIGKILL)  # pg_dump runs in its own session: pid == pgid
                    self.killed = pid
                    return
            time.sleep(0.005)


def _no_partial_snapshot(store, ids_before: list[str]) -> None:
    assert store.snapshot_ids() == ids_before
    report = check(store)
    assert report.ok, [str(p) for p in report.problems]


def test_pg_dump_killed_mid_stream_commits_nothing(store, src) -> None:
    _create_db(src, "big")
    try:
        with src.connect("big") as c:
            # ~100 MiB of dump output; TOAST compresses the values, so the table itself stays small and fast to make
            c.execute("CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 80) AS pad "
                      "FROM generate_series(1, 40000) g")
            dump_size = c.execute("SELECT sum(octet_length(pad))::bigint FROM big").fetchone()[0]
        assert dump_size > 100 * 10**6
        location, opts = src_opts(src, database="big")
        first = logical_backup(store, parse_source_options(location, dict(opts, database="postgres")))
        ids_before = store.snapshot_ids()
        assert ids_before == [first.snapshot_id]

        killer = _Killer(after=4 * 2**20)
        killer.start()
        try:
            with pytest.raises((ToolFailed, StoreError)) as err:
                logical_backup(store, parse_source_options(location, opts))
        finally:
            killer.stop.set()
            killer.join(10)
        assert killer.killed is not None, "pg_dump was never seen streaming"
        assert killer.written is None or killer.written < dump_size  # it really was mid-stream
        assert isinstance(err.value, ToolFailed) and err.value.tool == "pg_dump"
        assert "killed by signal 9" in str(err.value)
        assert not os.path.exists(f"/proc/{killer.killed}")  # reaped, nothing left running
        _no_partial_snapshot(store, ids_before)
        # the store is still usable: the earlier snapshot restores its records
        assert [r.path for r in store.records(first.snapshot_id) if r.path.endswith(".dump")][-1].endswith(
            "-postgres.dump")
    finally:
        _drop_db(src, "big")


def _failing_bin_dir(tmp_path: Path, real: Path, message: str) -> Path:
    """A pg_bin_dir whose pg_dump reports its real version but fails every dump with ``message`` on stderr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dumpall", "pg_restore", "psql"):
        (bin_dir / tool).symlink_to(real / tool)
    script = bin_dir / "pg_dump"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then exec "{real}/pg_dump" --version; fi\n'
        f"echo '{message}' >&2\n"
        "exit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def test_pg_dump_failing_immediately_commits_nothing(store, src, tmp_path) -> None:
    location, opts = src_opts(src, database="postgres")
    first = logical_backup(store, parse_source_options(location, opts))
    ids_before = store.snapshot_ids()
    assert ids_before == [first.snapshot_id]

    message = 'pg_dump: error: connection to server failed: FATAL:  database "vanished" does not exist'
    bogus = _failing_bin_dir(tmp_path, src.bin_dir, message)
    with pytest.raises(PgError) as err:
        logical_backup(store, parse_source_options(location, dict(opts, pg_bin_dir=str(bogus))))
    assert isinstance(err.value, ToolFailed)
    assert "exit status 1" in str(err.value)
    assert 'database "vanished" does not exist' in str(err.value)
    _no_partial_snapshot(store, ids_before)


# ---------------------------------------------------------------------------------------------------------------------
# a database dropped between listing and dumping; exclude_databases naming nothing


def _table(server: PgServer, db: str, rows: int) -> None:
    with server.connect(db) as c:
        c.execute("CREATE TABLE t (id int, label text)")
        c.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))


@pytest.mark.parametrize("jobs", ["1", "3"])
@pytest.mark.parametrize("when", ["before_pg_dump", "before_fingerprint"])
def test_database_dropped_before_its_dump_is_skipped_and_recorded(store, src, dst, monkeypatch, when, jobs) -> None:
    """Dropped (WITH FORCE) while its exported snapshot is open, or before the fingerprint connection is made; also
    while other databases are dumped at the same time (``jobs``)."""
    from airflow_provider_pgplakar.pg import logical as logical_mod

    names = ["vk_alpha", "vk_scratch", "vk_zulu"]
    for i, name in enumerate(names):
        _create_db(src, name)
        _table(src, name, 10 * (i + 1))
    dropped: list[str] = []

    def dropping_first(real: Any) -> Any:
        def call(first: Any, database: str, *args: Any, **kw: Any) -> Any:
            if database == "vk_scratch":  # listed, its manifest taken; now a tenant job drops it
                _drop_db(src, database)
                dropped.append(database)
            return real(first, database, *args, **kw)
        return call

    if when == "before_pg_dump":
        monkeypatch.setattr(logical_mod.commands, "pg_dump", dropping_first(logical_mod.commands.pg_dump))
    else:
        monkeypatch.setattr(logical_mod.fingerprint, "dump_snapshot",
                            dropping_first(logical_mod.fingerprint.dump_snapshot))
    try:
        location, opts = src_opts(src, jobs=jobs)
        res = logical_backup(store, parse_source_options(location, opts))
        assert dropped == ["vk_scratch"]
        assert "vk_scratch" not in res.databases and {"vk_alpha", "vk_zulu"} <= set(res.databases)
        assert res.warnings == ["database 'vk_scratch' was dropped after it was listed: skipped"]
        header = store.load_snapshot(res.snapshot_id).header
        assert header["meta"]["skipped_databases"] == ["vk_scratch"]
        assert header["meta"]["warnings"] == res.warnings
        assert header["meta"]["databases"] == res.databases
        dumps = {r.meta["database"] for r in store.records(res.snapshot_id) if r.path.endswith(".dump")}
        assert dumps == set(res.databases)  # no empty record stands in for the skipped database
        # the others are complete: restore them and count
        location, ropts = src_opts(dst, recreate="true", databases="vk_alpha,vk_zulu", no_globals="true")
        summary = logical_restore(store, res.snapshot_id, parse_restore_options(location, ropts))
        assert summary.ok, summary.text()
        assert _counts(dst, ["vk_alpha", "vk_zulu"]) == {"vk_alpha": (10, "row 9"), "vk_zulu": (30, "row 9")}
    finally:
        for name in names:
            _drop_db(src, name)
            _drop_db(dst, name)


def _lying_bin_dir(tmp_path: Path, real: Path) -> Path:
    """A pg_bin_dir whose pg_dump claims that the database it is given does not exist (it does)."""
    bin_dir = _failing_bin_dir(tmp_path, real, "unused")
    (bin_dir / "pg_dump").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then exec "{real}/pg_dump" --version; fi\n'
        'for a; do last=$a; done\n'
        'echo "pg_dump: error: connection to server failed: FATAL:  database \\"${last#--dbname=dbname=}\\" '
        'does not exist" >&2\n'
        "exit 1\n"
    )
    return bin_dir


def test_pg_dump_saying_does_not_exist_of_a_present_database_fails(store, src, tmp_path) -> None:
    _create_db(src, "vk_present")
    try:
        location, opts = src_opts(src)
        bogus = _lying_bin_dir(tmp_path, src.bin_dir)
        with pytest.raises(ToolFailed, match="does not exist"):
            logical_backup(store, parse_source_options(location, dict(opts, pg_bin_dir=str(bogus))))
        _no_partial_snapshot(store, [])  # the re-check found the database: not skipped, nothing committed
    finally:
        _drop_db(src, "vk_present")


def test_exclude_databases_naming_no_database_is_a_warning(store, src) -> None:
    for name in ("vk_one", "vk_two"):
        _create_db(src, name)
    try:
        location, opts = src_opts(src, exclude_databases="vk_two,vk_nosuch")
        res = logical_backup(store, parse_source_options(location, opts))
        assert "vk_one" in res.databases and "vk_two" not in res.databases
        assert res.warnings == ["exclude_databases: 'vk_nosuch' not on the server (nothing excluded for it: "
                                "check the spelling)"]
        assert store.load_snapshot(res.snapshot_id).header["meta"]["warnings"] == res.warnings
    finally:
        for name in ("vk_one", "vk_two"):
            _drop_db(src, name)


def test_exclude_databases_takes_shell_patterns(store, src) -> None:
    """``*_restore_check`` keeps the example DAGs' scratch databases out of a full backup (and out of the
    manifest's details); the selected database matching a pattern is refused as contradictory."""
    import json

    from airflow_provider_pgplakar.pg import OptionError
    from airflow_provider_pgplakar.pg.logical import excluded
    from airflow_provider_pgplakar.pg.session import MANIFEST_PATH

    names = ("xp_keep", "xp_a_restore_check", "xp_b_restore_check")
    for name in names:
        _create_db(src, name)
    try:
        location, opts = src_opts(src, exclude_databases="*_restore_check,xp_nomatch_*")
        res = logical_backup(store, parse_source_options(location, opts))
        assert "xp_keep" in res.databases
        assert not [d for d in res.databases if d.endswith("_restore_check")]
        assert res.warnings == ["exclude_databases: 'xp_nomatch_*' not on the server (nothing excluded for it: "
                                "check the spelling)"]
        with store.open_record(store.find_record(res.snapshot_id, MANIFEST_PATH)) as src_file:
            manifest = json.loads(src_file.read())
        detailed = [d["name"] for d in manifest["databases"] if "relations" in d or "schemas" in d]
        assert "xp_keep" in detailed and "xp_a_restore_check" not in detailed
        assert excluded("a_restore_check", ["*_restore_check"]) and not excluded("A_RESTORE_CHECK", ["*_check"])
        with pytest.raises(OptionError, match="excludes the selected database"):
            parse_source_options(*src_opts(src, database="xp_a_restore_check", exclude_databases="*_check"))
    finally:
        for name in names:
            _drop_db(src, name)


# ---------------------------------------------------------------------------------------------------------------------
# the manifest and globals beside the dumps: a failure on either side stops the other and is the error raised


def _bin_dir_failing(tmp_path: Path, real: Path, tool: str, message: str) -> Path:
    """A pg_bin_dir whose ``tool`` reports its real version but fails every run with ``message`` on stderr."""
    bin_dir = tmp_path / f"bin-{tool}"
    bin_dir.mkdir()
    for other in ("pg_dump", "pg_dumpall", "pg_restore", "psql"):
        if other != tool:
            (bin_dir / other).symlink_to(real / other)
    script = bin_dir / tool
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then exec "{real}/{tool}" --version; fi\n'
                      f"echo '{message}' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def test_globals_failing_beside_a_waiting_dump_kills_it_and_commits_nothing(store, src, tmp_path) -> None:
    """pg_dumpall fails while pg_dump waits on a lock: the backup fails at once with pg_dumpall's error (not a
    "stopped" of the dump it ended), the dump is killed, nothing is committed."""
    from tests.helpers import lock_probe_database

    db = lock_probe_database(src, "beside", notes=10)
    bogus = _bin_dir_failing(tmp_path, src.bin_dir, "pg_dumpall", "pg_dumpall: error: globals refused")
    try:
        with src.connect(db, autocommit=False) as locker:
            locker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")  # only pg_dump locks it: it waits
            location, opts = src_opts(src, database=db, pg_bin_dir=str(bogus))
            started = time.monotonic()
            with pytest.raises(ToolFailed) as err:
                logical_backup(store, parse_source_options(location, opts))
            assert time.monotonic() - started < 30  # not ended by the lock: the lock is still held
        assert err.value.tool == "pg_dumpall" and "globals refused" in str(err.value)
        assert _proc_children(b"pg_dump") == []
        _no_partial_snapshot(store, [])
    finally:
        _drop_db(src, db)


def test_a_dump_failing_stops_the_manifest_waiting_beside_it(store, src, tmp_path) -> None:
    """pg_dump fails while the manifest's catalog query waits on a lock: the query is cancelled, the backup fails
    with pg_dump's error and commits nothing, and pg_dumpall (after the manifest) never runs."""
    from tests.helpers import lock_probe_database

    db = lock_probe_database(src, "beside", notes=10)
    bogus = _bin_dir_failing(tmp_path, src.bin_dir, "pg_dump", "pg_dump: error: dump refused")
    try:
        with src.connect(db, autocommit=False) as locker, src.connect() as watcher:
            locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # the manifest's per-relation queries wait
            location, opts = src_opts(src, database=db, pg_bin_dir=str(bogus))
            started = time.monotonic()
            with pytest.raises(ToolFailed) as err:
                logical_backup(store, parse_source_options(location, opts))
            assert time.monotonic() - started < 30
            waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                      "application_name = 'pgplakar'", (db,)).fetchone()[0]
            assert waiting == 0  # the manifest's query was cancelled and its connection closed
        assert err.value.tool == "pg_dump" and "dump refused" in str(err.value)
        assert _proc_children(b"pg_dumpall") == []
        _no_partial_snapshot(store, [])
    finally:
        _drop_db(src, db)
