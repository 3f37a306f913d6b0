"""Restore options of ``logical_restore``, each judged by the data on the target server.

One source cluster is backed up once (module fixtures); restores go into fresh databases on the source server
itself (its roles exist, like a restore onto a live server), into a private target server, or into a throwaway
server where a pristine cluster matters (no_globals, databases=).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from airflow_provider_pgplakar.pg import OptionError, PgError
from airflow_provider_pgplakar.pg import restore as restore_mod
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import RestoreOptions, parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.restore import RestoreFailed, logical_restore
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import module_server, src_opts
from tests.pgservers import PgManager, PgServer

CLUSTER = [
    "CREATE ROLE app_owner LOGIN PASSWORD 'app-secret'",
    "CREATE ROLE reader NOLOGIN",
    "CREATE ROLE ghost NOLOGIN",  # in the globals only: owns nothing, is granted nothing
    "CREATE DATABASE shop OWNER app_owner",
    "CREATE DATABASE blog",
    "CREATE TABLE pg_marker (v text)",  # in postgres
    "INSERT INTO pg_marker VALUES ('from-source')",
]
SHOP = [
    "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2))",
    "INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 5000) g",
    "ALTER TABLE items OWNER TO app_owner",
    "GRANT SELECT ON items TO reader",
    "CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY, body text)",
    "INSERT INTO notes (body) SELECT repeat('n', g % 50) FROM generate_series(1, 300) g",
    "CREATE SCHEMA extra",
    "CREATE TABLE extra.audit (id int, what text)",
    "INSERT INTO extra.audit SELECT g, 'audit ' || g FROM generate_series(1, 50) g",
]
BLOG = [
    "CREATE TABLE posts (id int PRIMARY KEY, title text)",
    "INSERT INTO posts SELECT g, 'post ' || g FROM generate_series(1, 120) g",
]
TEMPLATE1 = [
    "CREATE TABLE tpl_marker (v text)",
    "INSERT INTO tpl_marker VALUES ('from-source'), ('second')",
]


def _exec(server: PgServer, db: str, statements: list[str]) -> None:
    with server.connect(db) as c:
        for q in statements:
            c.execute(q)


def _one(server: PgServer, db: str, query: str, *args: Any) -> Any:
    with server.connect(db) as c:
        row = c.execute(query, args or None).fetchone()
        return row[0] if row is not None and len(row) == 1 else row


def _create_db(server: PgServer, name: str, owner: str | None = None) -> None:
    with server.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        # template0: the source's template1 holds objects of its own (tpl_marker)
        q = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        if owner:
            q += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        c.execute(q)


def _drop_db(server: PgServer, name: str) -> None:
    with server.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _databases(server: PgServer) -> set[str]:
    with server.connect() as c:
        return {r[0] for r in c.execute("SELECT datname FROM pg_database")}


def _roles(server: PgServer) -> set[str]:
    with server.connect() as c:
        return {r[0] for r in c.execute("SELECT rolname FROM pg_roles")}


def _exists(server: PgServer, db: str, relation: str) -> bool:
    return _one(server, db, "SELECT to_regclass(%s) IS NOT NULL", relation)


def shop_state(server: PgServer, db: str) -> dict[str, Any]:
    with server.connect(db) as c:
        return {
            "items": c.execute("SELECT count(*), sum(price), md5(string_agg(name, ',' ORDER BY id)) "
                               "FROM items").fetchone(),
            "notes": c.execute("SELECT count(*), sum(length(body)) FROM notes").fetchone(),
            "audit": c.execute("SELECT count(*), md5(string_agg(what, ',' ORDER BY id)) FROM extra.audit").fetchone(),
        }


def _restore(store: Store, snap: str, server: PgServer, *, user: str | None = None, password: str | None = None,
             **options: str) -> restore_mod.RestoreSummary:
    location, opts = src_opts(server, **options)
    if user is not None:
        opts["username"], opts["password"] = user, password or ""
    return logical_restore(store, snap, parse_restore_options(location, opts))


# ---------------------------------------------------------------------------------------------------------------------
# Module fixtures: one source cluster, one backup, one private target


@pytest.fixture(scope="module")
def src(pg_manager: PgManager) -> Iterator[PgServer]:
    server = pg_manager.start(15)
    _exec(server, "postgres", CLUSTER)
    _exec(server, "shop", SHOP)
    _exec(server, "blog", BLOG)
    _exec(server, "template1", TEMPLATE1)
    yield server
    pg_manager.discard(server)


@pytest.fixture(scope="module")
def mstore(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("restore-options")
        mp.setenv("PGPLAKAR_KDF", "1,8192,1")
        mp.setenv("PGPLAKAR_CACHE_DIR", str(root / "cache"))
        st = Store.create(str(root / "store"), "pw")
        yield st
        st.close()


@pytest.fixture(scope="module")
def snap(src: PgServer, mstore: Store) -> str:
    location, opts = src_opts(src)
    res = logical_backup(mstore, parse_source_options(location, opts))
    assert {"shop", "blog", "postgres", "template1"} <= set(res.databases)
    return res.snapshot_id


@pytest.fixture(scope="module")
def source_shop(src: PgServer, snap: str) -> dict[str, Any]:
    return shop_state(src, "shop")


dst = module_server()


@pytest.fixture
def scratch(src: PgServer) -> Iterator[list[str]]:
    """Names of databases a test creates on the source server; dropped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        _drop_db(src, name)


# ---------------------------------------------------------------------------------------------------------------------
# recreate


def test_recreate_replaces_existing_databases_and_keeps_maintenance_dbs(mstore, snap, src, dst, source_shop) -> None:
    # The target already has a shop with other data (and another shape), and its own template1/postgres objects.
    _exec(dst, "postgres", ["CREATE ROLE app_owner LOGIN PASSWORD 'target-secret'", "CREATE DATABASE shop",
                            "CREATE TABLE keepme (v text)", "INSERT INTO keepme VALUES ('target only')",
                            "CREATE TABLE pg_marker (v text)", "INSERT INTO pg_marker VALUES ('from-target')"])
    _exec(dst, "shop", ["CREATE TABLE items (id int, name text, price numeric(10,2))",
                        "INSERT INTO items VALUES (1, 'stale', 99)", "CREATE TABLE stale_only (x int)"])
    _exec(dst, "template1", ["CREATE TABLE tpl_marker (v text)", "INSERT INTO tpl_marker VALUES ('from-target')"])
    oids = "SELECT datname, oid FROM pg_database WHERE datname IN ('postgres', 'template1') ORDER BY 1"
    with dst.connect() as c:
        maintenance_before = c.execute(oids).fetchall()

    summary = _restore(mstore, snap, dst, recreate="true")
    assert summary.ok, summary.text()

    # shop was dropped and created from the archive: source data, nothing of the old one left
    assert shop_state(dst, "shop") == source_shop
    assert not _exists(dst, "shop", "stale_only")
    assert _one(dst, "shop", "SELECT tableowner FROM pg_tables WHERE tablename = 'items'") == "app_owner"
    assert _one(dst, "blog", "SELECT count(*) FROM posts") == 120
    # postgres and template1 were restored in place, never dropped
    with dst.connect() as c:
        assert c.execute(oids).fetchall() == maintenance_before
    with dst.connect("template1") as c:
        assert [r[0] for r in c.execute("SELECT v FROM tpl_marker ORDER BY v")] == ["from-source", "second"]
    with dst.connect("postgres") as c:
        assert [r[0] for r in c.execute("SELECT v FROM pg_marker")] == ["from-source"]
        assert [r[0] for r in c.execute("SELECT v FROM keepme")] == ["target only"]  # not in the archive: kept
    # roles from the globals; an existing role gets the source's attributes and password
    assert {"app_owner", "reader", "ghost"} <= _roles(dst)
    assert _one(dst, "shop", "SELECT has_table_privilege('reader', 'items', 'SELECT')") is True
    with dst.connect("shop", user="app_owner", password="app-secret") as c:
        assert c.execute("SELECT count(*) FROM items").fetchone()[0] == 5000


# ---------------------------------------------------------------------------------------------------------------------
# clean


def test_clean_restores_source_state_over_modified_rows(mstore, snap, src, source_shop, scratch) -> None:
    scratch.append("shop_clean")
    _create_db(src, "shop_clean", owner="app_owner")
    summary = _restore(mstore, snap, src, database="shop_clean", databases="shop", no_globals="true")
    assert summary.ok, summary.text()
    assert shop_state(src, "shop_clean") == source_shop
    _exec(src, "shop_clean", ["UPDATE items SET price = 0, name = 'changed' WHERE id <= 100",
                              "INSERT INTO items VALUES (999999, 'extra row', 1)", "DELETE FROM notes WHERE id < 50",
                              "DELETE FROM extra.audit", "CREATE TABLE items_extra (x int)"])
    assert shop_state(src, "shop_clean") != source_shop

    summary = _restore(mstore, snap, src, database="shop_clean", databases="shop", no_globals="true", clean="true")
    assert summary.ok, summary.text()
    assert shop_state(src, "shop_clean") == source_shop
    assert _one(src, "shop_clean", "SELECT count(*) FROM items WHERE id = 999999") == 0


# ---------------------------------------------------------------------------------------------------------------------
# databases= and no_globals (a pristine server: no role of the source exists there)


def test_databases_filter_and_no_globals(pg_factory, mstore, snap) -> None:
    target = pg_factory(15)
    dbs_before, roles_before = _databases(target), _roles(target)
    summary = _restore(mstore, snap, target, recreate="true", databases="blog", no_globals="true")
    assert summary.ok, summary.text()
    assert [r.status for r in summary.results if r.path == "/00000-globals.sql"] == ["skipped"]
    assert [r.database for r in summary.results if r.status == "restored"] == ["blog"]
    # only the listed database was restored
    assert _databases(target) == dbs_before | {"blog"}
    assert _one(target, "blog", "SELECT count(*), sum(id) FROM posts") == (120, sum(range(1, 121)))
    with target.connect("template1") as c:
        assert c.execute("SELECT to_regclass('tpl_marker')").fetchone()[0] is None
    with target.connect() as c:
        assert c.execute("SELECT to_regclass('pg_marker')").fetchone()[0] is None
    # no_globals: none of the source's roles was created
    assert _roles(target) == roles_before
    assert not {"app_owner", "reader", "ghost"} & _roles(target)


def test_databases_not_in_snapshot_is_refused(mstore, snap, src) -> None:
    with pytest.raises(PgError, match=r"databases: 'nope' not in the snapshot"):
        _restore(mstore, snap, src, databases="nope")


# ---------------------------------------------------------------------------------------------------------------------
# no_owner


def test_no_owner_objects_owned_by_restoring_user(mstore, snap, src, source_shop, scratch) -> None:
    with src.connect() as c:
        c.execute("DROP ROLE IF EXISTS restorer")
        c.execute("CREATE ROLE restorer LOGIN CREATEDB PASSWORD 'restorer-pw'")
    scratch.append("shop_noowner")
    _create_db(src, "shop_noowner", owner="restorer")
    try:
        summary = _restore(mstore, snap, src, user="restorer", password="restorer-pw", database="shop_noowner",
                           databases="shop", no_globals="true", no_owner="true")
        assert summary.ok, summary.text()
        assert shop_state(src, "shop_noowner") == source_shop
        with src.connect("shop_noowner") as c:
            owners = dict(c.execute("SELECT tablename, tableowner FROM pg_tables "
                                    "WHERE schemaname IN ('public', 'extra')").fetchall())
            assert owners == {"items": "restorer", "notes": "restorer", "audit": "restorer"}
            assert c.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'extra'"
                             ).fetchone()[0] == "restorer"
        # in the source, items belongs to app_owner: without no_owner it would keep that owner
        assert _one(src, "shop", "SELECT tableowner FROM pg_tables WHERE tablename = 'items'") == "app_owner"
    finally:
        _drop_db(src, "shop_noowner")
        with src.connect() as c:
            c.execute("DROP ROLE IF EXISTS restorer")


# ---------------------------------------------------------------------------------------------------------------------
# exit_on_error


CONFLICT = ["CREATE TABLE items (unrelated int)", "INSERT INTO items VALUES (42)"]


def test_exit_on_error_surfaces_pg_restore_error(mstore, snap, src, scratch) -> None:
    scratch.append("shop_conflict")
    _create_db(src, "shop_conflict", owner="app_owner")
    _exec(src, "shop_conflict", CONFLICT)
    with pytest.raises(RestoreFailed) as err:
        # globals included: existing roles are skipped, so exit_on_error works on a non-empty server
        _restore(mstore, snap, src, database="shop_conflict", databases="shop", exit_on_error="true")
    results = {r.path: r for r in err.value.summary.results}
    assert results["/00000-globals.sql"].status == "restored", err.value.summary.text()
    failed = [r for r in err.value.summary.results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].database == "shop_conflict"
    assert "pg_restore" in str(err.value) and 'relation "items" already exists' in str(err.value)
    # the conflicting object is untouched
    assert _one(src, "shop_conflict", "SELECT unrelated FROM items") == 42


def test_without_exit_on_error_failure_is_reported_after_the_rest(mstore, snap, src, scratch) -> None:
    scratch.append("shop_conflict2")
    _create_db(src, "shop_conflict2", owner="app_owner")
    _exec(src, "shop_conflict2", CONFLICT)
    with pytest.raises(RestoreFailed) as err:
        _restore(mstore, snap, src, database="shop_conflict2", databases="shop", no_globals="true")
    summary = err.value.summary
    failed = [r for r in summary.results if r.status == "failed"]
    assert len(failed) == 1, summary.text()
    assert 'relation "items" already exists' in failed[0].detail
    assert "failed" in summary.text() and not summary.ok
    # pg_restore went on: everything else was restored
    assert _one(src, "shop_conflict2", "SELECT count(*) FROM notes") == 300
    assert _one(src, "shop_conflict2", "SELECT count(*) FROM extra.audit") == 50
    assert _one(src, "shop_conflict2", "SELECT unrelated FROM items") == 42


# ---------------------------------------------------------------------------------------------------------------------
# tables= / schemas=


def test_tables_selective_restore(mstore, snap, src, source_shop, scratch) -> None:
    scratch.append("shop_tables")
    _create_db(src, "shop_tables", owner="app_owner")
    summary = _restore(mstore, snap, src, database="shop_tables", databases="shop", no_globals="true",
                       tables="items")
    assert summary.ok, summary.text()
    assert _exists(src, "shop_tables", "public.items")
    assert not _exists(src, "shop_tables", "public.notes")
    assert _one(src, "shop_tables", "SELECT to_regnamespace('extra') IS NULL")
    with src.connect("shop_tables") as c:
        got = c.execute("SELECT count(*), sum(price), md5(string_agg(name, ',' ORDER BY id)) FROM items").fetchone()
    assert got == source_shop["items"]


def test_schemas_selective_restore(mstore, snap, src, source_shop, scratch) -> None:
    scratch.append("shop_schemas")
    _create_db(src, "shop_schemas", owner="app_owner")
    # pg_restore --schema restores the objects in the schema, not the schema itself: the restore creates it
    summary = _restore(mstore, snap, src, database="shop_schemas", databases="shop", no_globals="true",
                       schemas="extra")
    assert summary.ok, summary.text()
    assert _exists(src, "shop_schemas", "extra.audit")
    assert not _exists(src, "shop_schemas", "public.items")
    assert not _exists(src, "shop_schemas", "public.notes")
    with src.connect("shop_schemas") as c:
        got = c.execute("SELECT count(*), md5(string_agg(what, ',' ORDER BY id)) FROM extra.audit").fetchone()
    assert got == source_shop["audit"]


# ---------------------------------------------------------------------------------------------------------------------
# jobs=2


def test_parallel_restore_stages_and_removes_temp_dir(mstore, snap, src, source_shop, scratch, monkeypatch) -> None:
    staged: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*args: Any, **kwargs: Any) -> str:
        path = real_mkdtemp(*args, **kwargs)
        staged.append(path)
        return path

    monkeypatch.setattr(restore_mod.tempfile, "mkdtemp", spy)
    argvs: list[list[str]] = []
    real_run_tool = restore_mod.run_tool

    def run_spy(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        argvs.append(list(argv))
        return real_run_tool(argv, *args, **kwargs)

    monkeypatch.setattr(restore_mod, "run_tool", run_spy)
    tmp = Path(tempfile.gettempdir())
    scratch.append("shop_par")
    _create_db(src, "shop_par", owner="app_owner")
    summary = _restore(mstore, snap, src, database="shop_par", databases="shop", no_globals="true", jobs="2")
    assert summary.ok, summary.text()
    assert shop_state(src, "shop_par") == source_shop
    assert len(staged) == 1 and os.path.basename(staged[0]).startswith("pgplakar-restore-")
    assert Path(staged[0]).parent == tmp
    # pg_restore ran in parallel from the staged file, not from stdin
    assert len(argvs) == 1 and "--jobs=2" in argvs[0] and argvs[0][-1].startswith(staged[0] + os.sep)
    assert not os.path.exists(staged[0])
    # (other test processes may stage their own pgplakar-restore-* dirs meanwhile: only ours is checked)
    assert staged[0] not in {str(p) for p in tmp.glob("pgplakar-restore-*")}


def test_parallel_restore_failure_also_removes_temp_dir(mstore, snap, src, scratch, monkeypatch) -> None:
    staged: list[str] = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(restore_mod.tempfile, "mkdtemp",
                        lambda *a, **k: staged.append(real_mkdtemp(*a, **k)) or staged[-1])
    scratch.append("shop_par_conflict")
    _create_db(src, "shop_par_conflict", owner="app_owner")
    _exec(src, "shop_par_conflict", CONFLICT)
    with pytest.raises(RestoreFailed, match='relation "items" already exists'):
        _restore(mstore, snap, src, database="shop_par_conflict", databases="shop", no_globals="true", jobs="2",
                 exit_on_error="true")
    assert len(staged) == 1 and not os.path.exists(staged[0])


# ---------------------------------------------------------------------------------------------------------------------
# refusals before anything runs


@pytest.mark.parametrize(
    ("options", "option", "fragment"),
    [
        ({"clean": "true", "recreate": "true"}, "clean", "mutually exclusive"),
        ({"data_only": "true", "clean": "true"}, "data_only", "clean"),
        ({"data_only": "true", "recreate": "true"}, "data_only", "recreate"),
        ({"schema_only": "true", "data_only": "true"}, "schema_only", "mutually exclusive"),
        ({"database": "x", "databases": "shop,blog"}, "databases", "would all be restored into 'x'"),
        ({"database": "x", "recreate": "true"}, "database", "recreate"),
        ({"jobs": "0"}, "jobs", "out of range"),
        ({"jobs": "two"}, "jobs", "invalid integer"),
        ({"compress": "true"}, "compress", "valid for"),
    ],
)
def test_contradictory_options_refused_up_front(options: dict[str, str], option: str, fragment: str) -> None:
    with pytest.raises(OptionError) as err:
        # no server is needed: the refusal comes from parsing alone
        parse_restore_options("postgres://u:p@127.0.0.1:1/", options)
    assert err.value.option == option
    assert fragment in str(err.value)


def test_contradiction_refused_for_options_built_in_python() -> None:
    conn = parse_restore_options("postgres://u:p@127.0.0.1:1/").conn
    with pytest.raises(OptionError) as err:
        RestoreOptions(conn=conn, clean=True, recreate=True)
    assert err.value.option == "clean"


def test_all_dumps_into_one_database_refused(mstore, snap, src) -> None:
    dbs_before = _databases(src)
    with pytest.raises(PgError, match=r"database: the snapshot has \d+ dumps; restoring them all into 'target'"):
        _restore(mstore, snap, src, database="target")
    # refused while planning, before connecting: an unreachable server gives the same refusal
    location, opts = src_opts(src, database="target")
    opts["port"] = "1"
    with pytest.raises(PgError, match="would mix databases"):
        logical_restore(mstore, snap, parse_restore_options(location, opts))
    assert _databases(src) == dbs_before


# ---------------------------------------------------------------------------------------------------------------------
# globals with failing statements: a failed record, every statement counted, the first named


GE_ROLES = 300
GE_SECRET = "c2VjcmV0LXNhbHQ"


def _globals_snapshot(store: Store, script: str) -> str:
    """A logical snapshot holding only a globals script (as a hostile or broken source could produce)."""
    with store.writer(source={"kind": "postgres", "origin": "test"}) as w:
        w.add_bytes("/00000-globals.sql", script.encode(), meta={"type": "globals"})
    return w.snapshot_id


def _cli_restore(store: Store, server: PgServer, snap: str, *options: str, flags: tuple[str, ...] = (),
                 snapshot_first: bool = False) -> subprocess.CompletedProcess:
    pgplakar = Path(sys.executable).with_name("pgplakar")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGPLAKAR_"))}
    env.update(PGPLAKAR_PASSPHRASE="pw", PGPLAKAR_KDF="1,8192,1", PGPASSWORD=server.password,
               PGPLAKAR_CACHE_DIR=str(Path(tempfile.gettempdir()) / f"pgplakar-test-cache-{os.getpid()}"))
    to = f"postgres://{server.superuser}@{server.host}:{server.port}/"
    items = [snap, f"pg_bin_dir={server.bin_dir}", *options] if snapshot_first else \
        [f"pg_bin_dir={server.bin_dir}", *options, snap]
    return subprocess.run([str(pgplakar), "at", store.location, "restore", *flags, "-to", to, *items], env=env,
                          capture_output=True, timeout=120)


def test_globals_with_failing_statements_fail_the_restore(mstore, dst) -> None:
    script = [f"ALTER ROLE ge_missing_pw WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:{GE_SECRET}$x:y';"]
    for i in range(GE_ROLES):  # every GRANT fails: ~30 KB of psql errors, far beyond a 4,000-byte tail
        script += [f"CREATE ROLE ge_ok_{i};", f"GRANT ge_missing_{i} TO ge_ok_{i};"]
    snap = _globals_snapshot(mstore, "\n".join(script) + "\n")
    try:
        with pytest.raises(RestoreFailed) as err:
            _restore(mstore, snap, dst)
        [result] = err.value.summary.results
        assert result.status == "failed" and not err.value.summary.ok
        assert result.detail.startswith(f"{GE_ROLES + 1} statement(s) failed: ALTER ROLE ge_missing_pw WITH LOGIN "
                                        "PASSWORD '…'; (role \"ge_missing_pw\" does not exist); GRANT ge_missing_0 TO "
                                        "ge_ok_0; (role \"ge_missing_0\" does not exist); ")
        assert f"; and {GE_ROLES + 1 - 10} more (set ignore_globals_errors=true to accept them)" in result.detail
        assert GE_SECRET not in str(err.value) and GE_SECRET not in err.value.summary.text()
        ok_roles = {r for r in _roles(dst) if r.startswith("ge_ok_")}
        assert len(ok_roles) == GE_ROLES  # psql went on: the statements that could run, ran

        # the CLI fails too, naming the statements on stderr
        r = _cli_restore(mstore, dst, snap)
        assert r.returncode == 1, r.stderr.decode()
        assert f"{GE_ROLES + 1} statement(s) failed" in r.stderr.decode()
        assert GE_SECRET.encode() not in r.stderr + r.stdout

        # opted in: restored, the failures still named
        summary = _restore(mstore, snap, dst, ignore_globals_errors="true")
        [result] = summary.results
        assert summary.ok and result.status == "restored"
        assert result.detail.startswith(f"{GE_ROLES + 1} statement(s) failed: ALTER ROLE ge_missing_pw")
        assert result.detail.endswith("(ignored: ignore_globals_errors=true)")
        assert _cli_restore(mstore, dst, snap, "ignore_globals_errors=true").returncode == 0
        # exit_on_error stops at the first failing statement, unless globals errors are accepted
        with pytest.raises(RestoreFailed) as err:
            _restore(mstore, snap, dst, exit_on_error="true")
        assert "psql stopped (exit_on_error): 1 statement(s) failed: ALTER ROLE ge_missing_pw" in str(err.value)
        assert GE_SECRET not in str(err.value) and err.value.__cause__ is None
        assert _restore(mstore, snap, dst, exit_on_error="true", ignore_globals_errors="true").ok
    finally:
        with dst.connect() as c:
            for i in range(GE_ROLES):
                c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(f"ge_ok_{i}")))


# ---------------------------------------------------------------------------------------------------------------------
# selectors matching nothing: refused before anything is dropped (or any globals run)


def test_selectors_matching_nothing_are_refused_before_anything_is_dropped(pg_factory, mstore, snap,
                                                                           source_shop) -> None:
    target = pg_factory(15)
    pristine = (_roles(target), _databases(target))
    with pytest.raises(PgError, match="tables: 'nosuchtable' not in the dump of database 'blog'"):
        _restore(mstore, snap, target, recreate="true", tables="nosuchtable")
    assert (_roles(target), _databases(target)) == pristine  # not even the globals ran
    summary = _restore(mstore, snap, target, recreate="true", databases="shop,blog")
    assert summary.ok, summary.text()
    assert shop_state(target, "shop") == source_shop
    roles_before, dbs_before = _roles(target), _databases(target)
    oid = "SELECT oid FROM pg_database WHERE datname = 'shop'"
    shop_oid = _one(target, "postgres", oid)

    refusals = [
        ({"tables": "nosuchtable", "recreate": "true", "databases": "shop"}, "tables: 'nosuchtable' not in the dump "
         "of database 'shop' (its tables include "),
        ({"schemas": "nosuchschema", "recreate": "true", "databases": "shop"}, "schemas: 'nosuchschema' not in"),
        ({"tables": "items,nosuchtable", "recreate": "true", "databases": "shop"}, "tables: 'nosuchtable' not in"),
        ({"tables": "items", "schemas": "extra", "recreate": "true", "databases": "shop"},
         "tables: 'items' not in the dump of database 'shop' within schemas extra"),
        ({"tables": "items", "recreate": "true", "databases": "shop,blog"}, "tables: 'items' not in the dump of "
         "database 'blog'"),
        ({"tables": "nosuchtable", "clean": "true", "database": "shop", "databases": "shop"}, "'nosuchtable'"),
    ]
    for options, message in refusals:
        with pytest.raises(PgError) as err:
            _restore(mstore, snap, target, **options)  # globals included: they must not run either
        assert message in str(err.value), (options, str(err.value))
        assert "nothing was dropped or restored" in str(err.value)
        # the data is still there, in the same database; nothing else changed
        assert shop_state(target, "shop") == source_shop, options
        assert _one(target, "blog", "SELECT count(*) FROM posts") == 120
        assert _one(target, "postgres", oid) == shop_oid
        assert _roles(target) == roles_before and _databases(target) == dbs_before
    # names that match are still restored selectively
    summary = _restore(mstore, snap, target, clean="true", database="shop", databases="shop", no_globals="true",
                       tables="audit", schemas="extra")
    assert summary.ok, summary.text()
    assert shop_state(target, "shop") == source_shop


# ---------------------------------------------------------------------------------------------------------------------
# a failed dump: one line naming the database, pg_restore's first error and the likely fix; the full text in the log


def test_a_failed_restore_is_one_line_with_the_likely_fix(mstore, snap, dst, caplog) -> None:
    _drop_db(dst, "blog")
    try:
        # a database missing on the target, without recreate
        r = _cli_restore(mstore, dst, snap, "databases=blog", "no_globals=true")
        err = r.stderr.decode()
        assert r.returncode == 1 and len(err.splitlines()) == 1, err
        assert err.startswith(f"pgplakar: error: restore of snapshot {snap[:8]}: 1 of 2 record(s) failed: "
                              "database 'blog' (/")
        assert 'FATAL: database "blog" does not exist' in err
        assert err.rstrip("\n").endswith("likely fix: database 'blog' is missing on the target: add recreate=true "
                                          "to create it from the archive, or create it first (-v shows the tools' "
                                          "full output)")
        assert "blog" not in _databases(dst)

        # restored once; the same restore again, without recreate: pg_restore fails on every existing object
        assert _cli_restore(mstore, dst, snap, "databases=blog", "no_globals=true", "recreate=true").returncode == 0
        r = _cli_restore(mstore, dst, snap, "databases=blog", "no_globals=true")
        err = r.stderr.decode()
        assert r.returncode == 1 and len(err.splitlines()) == 1, err
        line = err.rstrip("\n")
        assert line.startswith(f"pgplakar: error: restore of snapshot {snap[:8]}: 1 of 2 record(s) failed: "
                               "database 'blog' (/")
        assert ': pg_restore failed (exit status 1): could not execute query: ERROR: relation "posts" already ' \
               "exists (and " in line
        assert line.endswith("more error(s)); likely fix: database 'blog' already holds these objects: add "
                             "recreate=true to drop and recreate it, or clean=true to drop its objects first "
                             "(-v shows the tools' full output)")
        assert "Command was" not in line
        # -v: the same line last, after every record's result with pg_restore's whole text
        r = _cli_restore(mstore, dst, snap, "databases=blog", "no_globals=true", flags=("-v",))
        verbose = r.stderr.decode()
        assert r.returncode == 1 and verbose.splitlines()[-1] == line.removesuffix(
            " (-v shows the tools' full output)"), verbose
        assert "Command was: CREATE TABLE public.posts" in verbose
        assert "pg_restore: warning: errors ignored on restore: " in verbose
        assert "likely fix: database 'blog' already holds these objects" in verbose

        # in Python (the operators): the same one-line message, the full text in the log and the result
        with caplog.at_level("INFO", logger="airflow_provider_pgplakar.pg.restore"), \
                pytest.raises(RestoreFailed) as exc:
            _restore(mstore, snap, dst, databases="blog", no_globals="true")
        message = str(exc.value)
        assert "\n" not in message and "database 'blog'" in message and "recreate=true" in message
        [failed] = [x for x in exc.value.summary.results if x.status == "failed"]
        assert "Command was: CREATE TABLE public.posts" in failed.detail
        assert "Command was: CREATE TABLE public.posts" in caplog.text
        # the data is the first restore's
        assert _one(dst, "blog", "SELECT count(*) FROM posts") == 120
        # with the fix, the same restore succeeds (the snapshot before the options is understood too)
        _exec(dst, "blog", ["INSERT INTO posts VALUES (-1, 'target only')"])
        r = _cli_restore(mstore, dst, snap, "databases=blog", "no_globals=true", "recreate=true", snapshot_first=True)
        assert r.returncode == 0, r.stderr.decode()
        assert _one(dst, "blog", "SELECT count(*), min(id) FROM posts") == (120, 1)
    finally:
        _drop_db(dst, "blog")
