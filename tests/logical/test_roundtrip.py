"""Full-cluster logical backup and recreate restore into an empty server, same and newer major versions."""

from __future__ import annotations

import pytest

from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.restore import logical_restore
from tests.logical.conftest import src_opts

SETUP = [
    "CREATE ROLE app_owner LOGIN PASSWORD 'app-secret'",
    "CREATE ROLE reader NOLOGIN",
    "CREATE DATABASE shop OWNER app_owner",
]
SHOP = [
    "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2))",
    "INSERT INTO items (name, price) SELECT 'item ' || g, g * 1.5 FROM generate_series(1, 5000) g",
    "CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY, body text)",
    "INSERT INTO notes (body) SELECT repeat('x', g % 100) FROM generate_series(1, 300) g",
    "SELECT lo_from_bytea(424242, 'large object payload'::bytea)",
    "GRANT SELECT ON items TO reader",
    "ALTER TABLE items OWNER TO app_owner",
    "CREATE EXTENSION pg_trgm",
    "CREATE INDEX items_name_trgm ON items USING gin (name gin_trgm_ops)",
    "SELECT setval('items_id_seq', 7777)",
]


def _snapshot(server, db: str) -> dict:
    with server.connect(db) as c:
        return {
            "items": c.execute("SELECT count(*), sum(price) FROM items").fetchone(),
            "notes": c.execute("SELECT count(*), sum(length(body)) FROM notes").fetchone(),
            "seq": c.execute("SELECT last_value FROM items_id_seq").fetchone()[0],
            "lo": c.execute("SELECT lo_get(424242)").fetchone()[0],
            "owner": c.execute("SELECT tableowner FROM pg_tables WHERE tablename='items'").fetchone()[0],
            "grant": c.execute("SELECT has_table_privilege('reader', 'items', 'SELECT')").fetchone()[0],
            "ext": c.execute("SELECT extversion IS NOT NULL FROM pg_extension WHERE extname='pg_trgm'").fetchone(),
            "trgm": c.execute("SELECT count(*) FROM items WHERE name % 'item 42'").fetchone()[0],
        }


@pytest.mark.parametrize("target_version", [15, 17, 18])
def test_full_cluster_recreate_into_empty_server(pg_factory, store, target_version: int) -> None:
    src = pg_factory(15)
    with src.connect() as c:
        for q in SETUP:
            c.execute(q)
    with src.connect("shop") as c:
        for q in SHOP:
            c.execute(q)
    before = _snapshot(src, "shop")
    location, opts = src_opts(src)
    res = logical_backup(store, parse_source_options(location, opts))
    assert "shop" in res.databases and "postgres" in res.databases and "template1" in res.databases
    paths = [r.path for r in store.records(res.snapshot_id)]
    assert paths[0] == "/manifest.json" and paths[1] == "/00000-globals.sql"
    assert paths[2:-1] == [f"/{i:05d}-{db}.dump" for i, db in enumerate(res.databases, 1)]
    assert paths[-1] == "/fingerprints.json"

    dst = pg_factory(target_version)
    location, opts = src_opts(dst, recreate="true")
    summary = logical_restore(store, res.snapshot_id, parse_restore_options(location, opts))
    assert summary.ok, summary.text()
    assert _snapshot(dst, "shop") == before
    with dst.connect() as c:
        # role restored with its password (superuser backup): log in as it
        assert c.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname='app_owner'").fetchone()[0]
    with dst.connect("shop", user="app_owner", password="app-secret") as c:
        assert c.execute("SELECT count(*) FROM items").fetchone()[0] == 5000
