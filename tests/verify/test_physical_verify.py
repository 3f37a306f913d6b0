"""Physical verify with real servers: a postgres+bin snapshot is restored to a private temp dir, started with its
own major on a unix socket, checked with pg_verifybackup (and pg_amcheck) and compared with the manifest captured
at backup time (pg/physical_verify.py)."""

from __future__ import annotations

import pytest

from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.pg.physical import physical_backup
from airflow_provider_pgplakar.pg.verify import verify_snapshot

DATA = [
    "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, CONSTRAINT name_len CHECK (length(name) < 50))",
    "INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 3000) g",
    "CREATE INDEX items_name ON items (name)",
    "CREATE UNLOGGED TABLE cache (k int)",
    "INSERT INTO cache SELECT generate_series(1, 40)",
    "CREATE EXTENSION pg_trgm",
    'CREATE TABLE "Odd Name" ("A col" int)',
]


@pytest.mark.parametrize("version", [15, 18])
def test_physical_verify_passes_and_reports_counts(pg_factory, pg_manager, store, version: int) -> None:
    src = pg_factory(version)
    with src.connect() as c:
        c.execute("CREATE DATABASE shop")
    with src.connect("shop") as c:
        for q in DATA:
            c.execute(q)
    opts = parse_source_options("postgres+bin://", {
        "host": src.host, "port": str(src.port), "username": src.superuser, "password": src.password,
        "pg_bin_dir": str(src.bin_dir), "checkpoint": "fast"})
    sid = physical_backup(store, opts).snapshot_id

    report = verify_snapshot(store, sid, pg_bin_dir=str(pg_manager.bin_dir(version)), amcheck=True)
    assert report.ok, report.text()
    assert report.server.startswith(f"PostgreSQL {version}.")
    shop = next(d for d in report.databases if d.database == "shop")
    found = {f.object: f for f in shop.findings}
    assert (found["public.items"].status, found["public.items"].found) == ("ok", 3000)
    assert (found["public.cache"].status, found["public.cache"].found) == ("unlogged", 0)  # empty after recovery
    assert found['public."Odd Name"'].status == "ok"
    assert found["pg_trgm"].status == "ok"
    assert shop.level == "manifest"


def test_physical_verify_fails_naming_a_relation_missing_after_restore(pg_factory, pg_manager, store,
                                                                       monkeypatch) -> None:
    """Fault injected after the restore: a table dropped from the copy is named as missing."""
    from airflow_provider_pgplakar.pg import physical_verify

    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE DATABASE shop")
    with src.connect("shop") as c:
        for q in DATA[:3]:
            c.execute(q)
    opts = parse_source_options("postgres+bin://", {
        "host": src.host, "port": str(src.port), "username": src.superuser, "password": src.password,
        "pg_bin_dir": str(src.bin_dir), "checkpoint": "fast"})
    sid = physical_backup(store, opts).snapshot_id
    real = physical_verify._expected

    def drop_then_expect(conn, entry):
        if entry["name"] == "shop":
            conn.execute("ROLLBACK")
            conn.execute("DROP TABLE items")
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return real(conn, entry)

    monkeypatch.setattr(physical_verify, "_expected", drop_then_expect)
    report = verify_snapshot(store, sid, pg_bin_dir=str(pg_manager.bin_dir(15)))
    assert not report.ok
    found = {f.object: f for f in next(d for d in report.databases if d.database == "shop").findings}
    assert found["public.items"].status == "missing"
    assert found["public.items_name"].status == "missing"
