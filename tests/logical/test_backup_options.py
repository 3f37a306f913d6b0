"""Backup options of ``logical_backup`` (database, exclude_databases, schema_only, data_only, compress), judged by the
snapshot's records and by the data a restore puts on a server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from airflow_provider_pgplakar.pg.logical import BackupResult, logical_backup
from airflow_provider_pgplakar.pg.options import parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.restore import logical_restore
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import src_opts
from tests.pgservers import PgManager, PgServer

ALPHA = [
    "CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL)",
    # compressible: long runs of the same text
    "INSERT INTO items SELECT g, repeat('alpha ' || (g % 10), 40) FROM generate_series(1, 20000) g",
    "CREATE TABLE tags (id int, tag text)",
    "INSERT INTO tags SELECT g, 'tag' || g FROM generate_series(1, 37) g",
]
BETA = ["CREATE TABLE b (id int)", "INSERT INTO b SELECT generate_series(1, 10)"]
STATE = "SELECT (SELECT count(*) FROM items), (SELECT md5(string_agg(body, '' ORDER BY id)) FROM items), " \
        "(SELECT count(*) FROM tags)"


@pytest.fixture(scope="module")
def src(pg_manager: PgManager) -> Iterator[PgServer]:
    server = pg_manager.start(15)
    with server.connect() as c:
        c.execute("CREATE ROLE alpha_owner LOGIN PASSWORD 'alpha-pw'")
        c.execute("CREATE DATABASE alpha OWNER alpha_owner")
        c.execute("CREATE DATABASE beta")
    for db, statements in (("alpha", ALPHA), ("beta", BETA)):
        with server.connect(db) as c:
            for q in statements:
                c.execute(q)
    yield server
    pg_manager.discard(server)


@pytest.fixture(scope="module")
def alpha_state(src: PgServer) -> tuple[Any, ...]:
    with src.connect("alpha") as c:
        return c.execute(STATE).fetchone()


@pytest.fixture
def target_db(src: PgServer) -> Iterator[str]:
    """An empty database (from template0) on the source server to restore into; dropped afterwards."""
    name = "restored_alpha"
    with src.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    yield name
    with src.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _backup(store: Store, server: PgServer, **options: str) -> BackupResult:
    location, opts = src_opts(server, **options)
    return logical_backup(store, parse_source_options(location, opts))


def _restore_into(store: Store, snap: str, server: PgServer, database: str, **options: str) -> None:
    location, opts = src_opts(server, database=database, no_globals="true", **options)
    summary = logical_restore(store, snap, parse_restore_options(location, opts))
    assert summary.ok, summary.text()


def _records(store: Store, snap: str) -> list[dict[str, Any]]:
    return list(store.records(snap))


def _dumps(store: Store, snap: str) -> dict[str, dict[str, Any]]:
    return {r.meta["database"]: r for r in _records(store, snap) if r.meta.get("type") == "dump"}


def _read(store: Store, rec: dict[str, Any]) -> bytes:
    with store.open_record(rec) as f:
        return f.read()


def test_single_database(store, src) -> None:
    res = _backup(store, src, database="alpha")
    assert res.databases == ["alpha"]
    recs = _records(store, res.snapshot_id)
    assert [r.path for r in recs] == ["/manifest.json", "/00000-globals.sql", "/00001-alpha.dump", "/fingerprints.json"]
    assert [r.meta.get("type") for r in recs] == ["manifest", "globals", "dump", "fingerprints"]
    assert recs[2].meta["database"] == "alpha"
    manifest = json.loads(_read(store, recs[0]))
    assert manifest["pgplakar"]["databases_dumped"] == ["alpha"]
    assert b"CREATE ROLE alpha_owner" in _read(store, recs[1])
    assert _read(store, recs[2]).startswith(b"PGDMP")
    assert store.load_snapshot(res.snapshot_id).header["meta"]["databases"] == ["alpha"]


def test_exclude_databases(store, src) -> None:
    res = _backup(store, src, exclude_databases="beta, template1")
    assert "beta" not in res.databases and "template1" not in res.databases
    assert {"alpha", "postgres"} <= set(res.databases)
    dumps = _dumps(store, res.snapshot_id)
    assert set(dumps) == set(res.databases)
    assert not any("beta" in r.path for r in _records(store, res.snapshot_id))


def test_schema_only_restores_empty_tables(store, src, target_db) -> None:
    res = _backup(store, src, database="alpha", schema_only="true")
    _restore_into(store, res.snapshot_id, src, target_db)
    with src.connect(target_db) as c:
        assert c.execute("SELECT to_regclass('items') IS NOT NULL AND to_regclass('tags') IS NOT NULL").fetchone()[0]
        assert c.execute("SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM tags)").fetchone() == (0, 0)
        # the schema is complete: the primary key came along
        assert c.execute("SELECT count(*) FROM pg_constraint WHERE conname = 'items_pkey'").fetchone()[0] == 1


def test_data_only_has_no_globals_and_fills_existing_schema(store, src, target_db, alpha_state) -> None:
    res = _backup(store, src, database="alpha", data_only="true")
    paths = [r.path for r in _records(store, res.snapshot_id)]
    assert paths == ["/manifest.json", "/00001-alpha.dump", "/fingerprints.json"]
    assert "pg_dumpall" not in store.load_snapshot(res.snapshot_id).header["meta"]["tool_versions"]
    with src.connect(target_db) as c:
        c.execute("CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL)")
        c.execute("CREATE TABLE tags (id int, tag text)")
    _restore_into(store, res.snapshot_id, src, target_db, data_only="true")
    with src.connect(target_db) as c:
        assert c.execute(STATE).fetchone() == alpha_state


def _compression_line(server: PgServer, data: bytes, tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    out = server.run("pg_restore", "--list", str(path)).stdout
    assert "TABLE DATA public items" in out
    match = re.search(r"^;\s+Compression:\s*(.+)$", out, re.MULTILINE)
    assert match, out[:500]
    return match.group(1).strip()


def test_compress(store, src, target_db, alpha_state, tmp_path) -> None:
    plain = _backup(store, src, database="alpha", compress="false")
    packed = _backup(store, src, database="alpha", compress="true")
    plain_rec, packed_rec = _dumps(store, plain.snapshot_id)["alpha"], _dumps(store, packed.snapshot_id)["alpha"]
    plain_data, packed_data = _read(store, plain_rec), _read(store, packed_rec)
    assert plain_rec.size == len(plain_data) and packed_rec.size == len(packed_data)
    assert plain_rec.blake3 != packed_rec.blake3
    assert len(packed_data) * 4 < len(plain_data), (len(packed_data), len(plain_data))
    # both are valid custom-format archives; pg_restore sees the compression difference
    assert _compression_line(src, plain_data, tmp_path, "plain.dump") in ("0", "none")
    assert _compression_line(src, packed_data, tmp_path, "packed.dump") not in ("0", "none")
    assert store.load_snapshot(packed.snapshot_id).header["meta"]["options"]["compress"] is True
    _restore_into(store, packed.snapshot_id, src, target_db)
    with src.connect(target_db) as c:
        assert c.execute(STATE).fetchone() == alpha_state


def test_a_cli_backup_imports_only_what_it_uses(src, alpha_state, target_db, tmp_path) -> None:
    """Start-up is part of every run's fixed cost: a CLI backup with a raw key loads neither pendulum nor the
    maintenance commands' modules, nor the KDF, nor Airflow or boto3 (tests/test_cli_structure.py for other
    commands). The snapshot it makes restores."""
    import os

    from tests.test_cli_structure import MAINTENANCE, NEVER, _imported, _run_counting_imports

    with Store.create(str(tmp_path / "store"), "pw", cache_dir=tmp_path / "cache") as st:
        key = st.export_key()
    env = {**os.environ, "PGPLAKAR_KEY": key, "PGPLAKAR_CACHE_DIR": str(tmp_path / "cache"), "PGPASSWORD": src.password}
    env.pop("PGPLAKAR_PASSPHRASE", None)
    location = f"postgres://{src.superuser}@{src.host}:{src.port}/alpha"
    code, modules = _run_counting_imports(["at", str(tmp_path / "store"), "backup", location,
                                           f"pg_bin_dir={src.bin_dir}"], env)
    assert code == 0
    assert "psycopg" in modules and _imported(modules, NEVER + MAINTENANCE) == []
    with Store.open(str(tmp_path / "store"), key=key, cache_dir=tmp_path / "cache") as st:
        (snap,) = st.snapshot_ids()
        _restore_into(st, snap, src, target_db)
    with src.connect(target_db) as c:
        assert c.execute(STATE).fetchone() == alpha_state
