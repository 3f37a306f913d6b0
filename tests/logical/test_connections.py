"""How many PostgreSQL connections a logical backup opens (each costs both sides ~15 ms of CPU: SCRAM, backend
start-up), counted from the server's own ``log_connections`` lines, so that a regression is caught.

Per dumped database: the fingerprint session that exports the snapshot (the manifest reads its per-database part
there too), the probe that imports it, pg_dump. Per run: the catalog connection (then the manifest's cluster part,
or the fingerprint session of ``postgres`` or of the single database, where the cluster part is then read) and
pg_dumpall for the globals.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import sql

from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.repo import Store
from tests.logical.conftest import src_opts
from tests.pgservers import PgManager, PgServer

DBS = ("conn_a", "conn b", "conn_c", "conn_d")
AUTHORIZED = re.compile(r"connection authorized: user=\S+ database=(.+?)(?: application_name=\S+)?$", re.M)


@pytest.fixture(scope="module")
def logged(pg_manager: PgManager) -> Iterator[PgServer]:
    server = pg_manager.start(15)
    with server.connect() as c:
        c.execute("ALTER SYSTEM SET log_connections = on")
        c.execute("SELECT pg_catalog.pg_reload_conf()")
        for i, db in enumerate(DBS):
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            with server.connect(db) as d:
                d.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, note text DEFAULT 'x')")
                d.execute(f"INSERT INTO t{i} SELECT g, g::text FROM generate_series(1, {100 * (i + 1)}) g")
                d.execute("VACUUM ANALYZE")  # autovacuum has nothing left to do: the manifests compared stay equal
    yield server
    pg_manager.discard(server)


def _backup(server: PgServer, store: Store, **extra: str) -> tuple[Counter[str], Any]:
    before = server.log_path.stat().st_size
    loc, opts = src_opts(server, **extra)
    res = logical_backup(store, parse_source_options(loc, opts))
    text = server.log_path.read_bytes()[before:].decode(errors="replace")
    return Counter(AUTHORIZED.findall(text)), res


def _manifest(store: Store, snapshot_id: str) -> dict[str, Any]:
    rec = next(r for r in store.records(snapshot_id) if r.path == "/manifest.json")
    with store.open_record(rec) as src:
        doc: dict[str, Any] = json.loads(b"".join(src.iter_chunks()))
    return doc


def _details(manifest: dict[str, Any]) -> dict[str, Any]:
    return {d["name"]: {k: d.get(k) for k in ("extensions", "schemas", "relations")}
            for d in manifest["databases"] if d["name"] in DBS}


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_multi_database_backup_opens_three_connections_per_database_and_two_more(
        logged: PgServer, store: Store, jobs: str) -> None:
    seen, res = _backup(logged, store, exclude_databases="postgres,template1", jobs=jobs)
    assert res.databases == sorted(DBS)
    # 3 per database (was 4: the manifest had a connection of its own per database), catalog + pg_dumpall
    assert seen == Counter({**{db: 3 for db in DBS}, "postgres": 2}), seen
    # the manifest read on the fingerprint connections details every database as one of its own connections does
    manifest = _manifest(store, res.snapshot_id)
    assert manifest["errors"] == []
    alone = logical_backup(store, parse_source_options(*src_opts(logged, exclude_databases="postgres,template1")),
                           manifest_only=True)
    assert _details(manifest) == _details(_manifest(store, alone.snapshot_id))
    assert all(d["relations"] for d in _details(manifest).values())


def test_a_single_database_backup_opens_four_connections(logged: PgServer, store: Store) -> None:
    seen, res = _backup(logged, store, database="conn b")
    # catalog (then the fingerprint session, where the whole manifest is read), probe, pg_dump; pg_dumpall (was 5)
    assert seen == Counter({"conn b": 3, "postgres": 1}), seen
    manifest = _manifest(store, res.snapshot_id)
    assert manifest["errors"] == [] and [d["name"] for d in manifest["databases"]] == ["conn b"]
    alone = logical_backup(store, parse_source_options(*src_opts(logged, database="conn b")), manifest_only=True)
    assert _details(manifest) == _details(_manifest(store, alone.snapshot_id))
    assert _details(manifest)["conn b"]["relations"][0]["name"] == "t1"


def test_with_postgres_dumped_the_catalog_connection_is_its_fingerprint_session(
        logged: PgServer, store: Store) -> None:
    seen, res = _backup(logged, store, exclude_databases="template1", jobs="2")
    assert res.databases == sorted([*DBS, "postgres"])
    # postgres: the catalog connection (then its fingerprint session and the manifest's), probe, pg_dump, pg_dumpall
    assert seen == Counter({**{db: 3 for db in DBS}, "postgres": 4}), seen
    manifest = _manifest(store, res.snapshot_id)
    assert manifest["errors"] == [] and manifest["roles"] and manifest["cluster_config"]
    alone = logical_backup(store, parse_source_options(*src_opts(logged, exclude_databases="template1")),
                           manifest_only=True)
    expected = _manifest(store, alone.snapshot_id)
    assert manifest["databases"] == expected["databases"]  # postgres detailed in the cluster part's snapshot
    assert all(d.get("relations") for d in manifest["databases"] if d["name"] in DBS)
