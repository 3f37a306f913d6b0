"""Verified restores with real servers: fingerprints taken in the dump's snapshot, restore into a throwaway server,
compare (pg/fingerprint.py, pg/scratch.py, pg/verify.py), through the Python API and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from airflow_provider_pgplakar.cli.main import main
from airflow_provider_pgplakar.pg import restore as restore_mod
from airflow_provider_pgplakar.pg.fingerprint import FINGERPRINTS_PATH
from airflow_provider_pgplakar.pg.fingerprint import read as read_fingerprints
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.pg.verify import store_report, verifications, verify_snapshot
from tests.logical.conftest import src_opts

SHOP = [
    "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2), seen timestamptz, "
    "f float8, tags text[])",
    "INSERT INTO items (name, price, seen, f, tags) SELECT 'item ' || g, g * 1.5, '2026-01-01'::timestamptz "
    "+ g * interval '1 hour', g / 7.0, ARRAY['a', g::text] FROM generate_series(1, 2000) g",
    "CREATE TABLE events (id int, at date NOT NULL, body jsonb) PARTITION BY RANGE (at)",
    "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
    "INSERT INTO events SELECT g, '2025-01-01'::date + g % 300, jsonb_build_object('k', g) "
    "FROM generate_series(1, 400) g",
    "CREATE UNLOGGED TABLE scratchpad (k int)",
    "INSERT INTO scratchpad SELECT generate_series(1, 50)",
    "CREATE MATERIALIZED VIEW item_stats AS SELECT count(*) AS n, sum(price) AS total FROM items",
    "CREATE EXTENSION file_fdw",
    "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw",
    "CREATE FOREIGN TABLE outside (line text) SERVER files OPTIONS (filename '/nonexistent/pgplakar-verify')",
    "SELECT setval('items_id_seq', 7777)",
    "SELECT lo_from_bytea(424242, 'large object payload'::bytea)",
]


def _make_db(server, name: str, statements: list[str]) -> None:
    with server.connect() as c:
        c.execute(f"CREATE DATABASE {name}")
    with server.connect(name) as c:
        for q in statements:
            c.execute(q)


def _backup(store, server, **extra: str):
    location, opts = src_opts(server, **extra)
    return logical_backup(store, parse_source_options(location, opts))


def _by_object(report, database: str) -> dict[str, object]:
    db = next(d for d in report.databases if d.database == database)
    return {f.object: f for f in db.findings}


@pytest.mark.parametrize("target", [15, 18])
def test_full_fingerprints_verify_15_to_15_and_18(pg_factory, pg_manager, store, target: int) -> None:
    src = pg_factory(15)
    _make_db(src, "shop", SHOP)
    res = _backup(store, src, database="shop", fingerprint="full")
    prints = read_fingerprints(store, res.snapshot_id)
    shop = prints["shop"]
    assert shop["level"] == "full" and shop["snapshot"]  # taken in an exported snapshot shared with pg_dump
    assert shop["relations"]["public.items"]["rows"] == 2000 and shop["relations"]["public.items"]["digest"]
    assert shop["relations"]["public.events_2025"]["rows"] == 400
    assert "rows" not in shop["relations"]["public.outside"]  # a foreign table is never scanned
    assert shop["sequences"]["public.items_id_seq"] == [7777, True]
    assert shop["large_objects"]["count"] == 1
    assert shop["extensions"] == {"file_fdw": "1.0"}

    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(target)), amcheck=True)
    assert report.ok, report.text()
    assert report.server.startswith(f"PostgreSQL {target}.")
    found = _by_object(report, "shop")
    assert (found["public.items"].status, found["public.items"].found) == ("ok", 2000)
    assert (found["public.events_2026"].status, found["public.events"].status) == ("ok", "ok")
    assert found["public.scratchpad"].status == "unlogged" and found["public.scratchpad"].found == 50
    assert found["public.outside"].status == "foreign"
    assert found["public.item_stats"].status == "ok"
    assert found["large objects"].status == "ok"


def test_verify_passes_for_a_backup_taken_while_pgbench_writes(pg_factory, pg_manager, store) -> None:
    src = pg_factory(15)
    with src.connect() as c:
        c.execute("CREATE DATABASE bench")
    src.run("pgbench", "--initialize", "--scale=1", "--quiet", "bench")
    env = src.env("bench")
    bench = subprocess.Popen([str(src.bin("pgbench")), "--client=2", "--time=120", "--no-vacuum", "bench"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with src.connect("bench") as c:
            deadline = time.monotonic() + 30
            while c.execute("SELECT count(*) FROM pgbench_history").fetchone()[0] < 200:
                assert time.monotonic() < deadline and bench.poll() is None, "pgbench is not writing"
                time.sleep(0.1)
        res = _backup(store, src, database="bench", fingerprint="full")
        time.sleep(0.5)  # pgbench keeps writing after the snapshot
        with src.connect("bench") as c:
            after = c.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
    finally:
        # SIGTERM, not SIGINT: pgbench takes SIGINT as "cancel the running query" and may go on for its --time
        os.killpg(bench.pid, signal.SIGTERM)
        bench.wait(timeout=60)
    recorded = read_fingerprints(store, res.snapshot_id)["bench"]["relations"]["public.pgbench_history"]["rows"]
    assert 200 <= recorded < after  # the source moved on: a live comparison would fail, the fingerprints do not

    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(15)))
    assert report.ok, report.text()
    found = _by_object(report, "bench")
    assert found["public.pgbench_history"].found == recorded
    assert found["public.pgbench_accounts"].found == 100000 and found["public.pgbench_accounts"].status == "ok"


def test_verify_fails_naming_the_table_whose_rows_a_restore_lost(pg_factory, pg_manager, store, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    src = pg_factory(15)
    _make_db(src, "shop", SHOP[:2] + ["CREATE TABLE notes (body text)", "INSERT INTO notes VALUES ('a'), ('b')"])
    res = _backup(store, src, database="shop", fingerprint="counts")
    real = restore_mod.logical_restore

    def lossy_restore(store, snapshot_id, opts, **kw):  # the injected fault: a restore that loses a table's rows
        summary = real(store, snapshot_id, opts, **kw)
        import psycopg

        with psycopg.connect(host=opts.conn.host, port=opts.conn.port, user=opts.conn.username, dbname="shop",
                             autocommit=True) as c:
            c.execute("DELETE FROM items WHERE id > 1500")
        return summary

    monkeypatch.setattr(restore_mod, "logical_restore", lossy_restore)
    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", "pw")
    at = ["at", str(tmp_path / "store")]
    capsys.readouterr()
    rc = main([*at, "verify", res.snapshot_id[:8], f"pg_bin_dir={pg_manager.bin_dir(15)}"])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "FAILED" in out
    line = next(ln for ln in out.splitlines() if "public.items" in ln)
    assert "differs" in line and "expected=2000" in line and "found=1500" in line and "row count" in line
    assert "ok        table public.notes" in out

    assert main([*at, "--json", "ls", "--verified"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["status"], r["level"]) for r in rows] == [(res.snapshot_id, "failed", "counts")]
    proofs = verifications(store)
    stored = store.find_record(proofs[res.snapshot_id][-1].id, "/verify.json")
    with store.open_record(stored) as src_rec:
        doc = json.loads(b"".join(src_rec.iter_chunks()))
    assert doc["status"] == "failed" and doc["snapshot_id"] == res.snapshot_id

    assert main([*at, "cat", f"{res.snapshot_id[:8]}:{FINGERPRINTS_PATH}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["databases"]["shop"]["relations"]["public.items"]["rows"] == 2000


def test_verify_fails_naming_an_extension_the_verify_server_lacks(pg_factory, pg_manager, store) -> None:
    debian = set(os.listdir("/usr/share/postgresql/15/extension"))
    wheel18 = set(os.listdir(pg_manager.bin_dir(18).parent / "share" / "extension"))
    assert "uuid-ossp.control" in debian - wheel18  # the premise: the 18 wheel has no uuid-ossp
    src = pg_factory(15)
    _make_db(src, "ids", ['CREATE EXTENSION "uuid-ossp"',
                          "CREATE TABLE ids (id uuid PRIMARY KEY DEFAULT uuid_generate_v4(), n int)",
                          "INSERT INTO ids (n) SELECT generate_series(1, 10)"])
    res = _backup(store, src, database="ids")  # default fingerprint=catalog still lists the extensions
    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(18)))
    assert not report.ok
    assert any("extension uuid-ossp is not available on the verify server" in e for e in report.errors), report.text()
    assert "uuid-ossp" in report.text() and "FAILED" in report.text()
    sid = store_report(store, report)
    assert store.load_snapshot(sid).header["labels"]["verifies"] == res.snapshot_id


def test_catalog_fingerprints_verify_and_report_counts(pg_factory, pg_manager, store) -> None:
    src = pg_factory(15)
    _make_db(src, "shop", SHOP[:2])
    with src.connect("shop") as c:
        c.execute("ANALYZE items")
    res = _backup(store, src, database="shop")
    shop = read_fingerprints(store, res.snapshot_id)["shop"]
    assert shop["level"] == "catalog" and "rows" not in shop["relations"]["public.items"]
    assert shop["relations"]["public.items"]["estimate"] == 2000
    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(15)))
    assert report.ok, report.text()
    items = _by_object(report, "shop")["public.items"]
    assert (items.status, items.expected, items.found) == ("ok", 2000, 2000)
    assert "row count reported" in items.detail


def test_refused_exported_snapshot_falls_back_to_a_plain_dump_with_catalog(pg_factory, pg_manager, store,
                                                                           monkeypatch, caplog) -> None:
    """Behind a transaction-mode pooler the snapshot cannot be imported on another connection (simulated here:
    the import probe raises what such a pooler yields); the backup warns and records the catalog only."""
    import psycopg

    from airflow_provider_pgplakar.pg import fingerprint as fp_mod

    def refused(connect, database, snap):
        raise psycopg.errors.InvalidParameterValue(f'invalid snapshot identifier: "{snap}"')

    monkeypatch.setattr(fp_mod, "_probe_import", refused)
    src = pg_factory(15)
    _make_db(src, "shop", SHOP[:2])
    caplog.set_level("WARNING")
    res = _backup(store, src, database="shop", fingerprint="full")
    assert any("refused an exported snapshot" in w and "fingerprint=catalog" in w for w in res.warnings)
    assert "refused an exported snapshot" in caplog.text
    shop = read_fingerprints(store, res.snapshot_id)["shop"]
    assert shop["level"] == "catalog" and shop["snapshot"] is None and "rows" not in shop["relations"]["public.items"]
    assert store.load_snapshot(res.snapshot_id).header["meta"]["warnings"] == res.warnings
    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(15)))
    assert report.ok, report.text()


@pytest.mark.parametrize(("payload", "match"), [
    (b"not json", "not a fingerprint record"),
    (b'{"format": 2, "databases": {}}', "format 2"),
    (b'{"format": 1, "databases": {"x": {"level": "full", "relations": []}}}', "relations is not a dict"),
    (b'{"format": 1, "databases": {"x": {"level": "full", "relations": {"t": 5}}}}', "relation 't' is malformed"),
    (b'{"format": 1, "databases": {"x": {"level": "everything"}}}', "no valid level"),
])
def test_a_malformed_fingerprint_record_is_refused_in_one_line(store, payload: bytes, match: str) -> None:
    from airflow_provider_pgplakar.pg.fingerprint import FingerprintError

    with store.writer(source={"kind": "postgres", "origin": "postgres://h:5432"},
                      meta={"server_version_num": 150000}) as w:
        w.add_bytes(FINGERPRINTS_PATH, payload, mode=0o444)
    with pytest.raises(FingerprintError, match=match) as exc:
        verify_snapshot(store, w.snapshot_id)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("/fingerprints.json: ")


def test_verify_into_a_user_scratch_server_creates_and_drops_only_its_own_databases(
        pg_factory, store, tmp_path: Path, monkeypatch, capsys) -> None:
    src = pg_factory(15)
    _make_db(src, "shop", SHOP[:2])
    res = _backup(store, src, database="shop", fingerprint="full")
    scratch = pg_factory(18)
    with scratch.connect() as c:
        c.execute("CREATE DATABASE keep_me")
        before = sorted(r[0] for r in c.execute("SELECT datname FROM pg_database"))
    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", "pw")
    monkeypatch.setenv("PGPASSWORD", scratch.password)
    at = ["at", str(tmp_path / "store")]
    target = f"target=postgres://{scratch.superuser}@{scratch.host}:{scratch.port}"
    capsys.readouterr()
    rc = main([*at, "--json", "verify", res.snapshot_id, target, f"pg_bin_dir={scratch.bin_dir}", "--no-store"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["ok"] and doc["server"].startswith("PostgreSQL 18.")
    items = next(f for f in doc["databases"][0]["findings"] if f["object"] == "public.items")
    assert (items["status"], items["found"]) == ("ok", 2000)
    with scratch.connect() as c:
        assert sorted(r[0] for r in c.execute("SELECT datname FROM pg_database")) == before
    assert verifications(store) == {}  # --no-store

    # a database with the name verify would create is never taken over nor dropped
    taken = f"pgplakar_verify_{res.snapshot_id[:8]}_1"
    with scratch.connect() as c:
        c.execute(f"CREATE DATABASE {taken}")
    rc = main([*at, "verify", res.snapshot_id, target, f"pg_bin_dir={scratch.bin_dir}"])
    assert rc == 1 and f"database {taken} exists already" in capsys.readouterr().err
    with scratch.connect() as c:
        assert sorted(r[0] for r in c.execute("SELECT datname FROM pg_database")) == sorted(before + [taken])


def test_full_fingerprints_catch_a_changed_value_with_the_same_row_count(pg_factory, pg_manager, store,
                                                                         monkeypatch) -> None:
    src = pg_factory(15)
    _make_db(src, "shop", SHOP[:2])
    res = _backup(store, src, database="shop", fingerprint="full")
    real = restore_mod.logical_restore

    def altering_restore(store, snapshot_id, opts, **kw):  # injected fault: one value differs after the restore
        summary = real(store, snapshot_id, opts, **kw)
        import psycopg

        with psycopg.connect(host=opts.conn.host, port=opts.conn.port, user=opts.conn.username, dbname="shop",
                             autocommit=True) as c:
            c.execute("UPDATE items SET price = price + 0.01 WHERE id = 1234")
            c.execute("SELECT setval('items_id_seq', 1)")
        return summary

    monkeypatch.setattr(restore_mod, "logical_restore", altering_restore)
    report = verify_snapshot(store, res.snapshot_id, pg_bin_dir=str(pg_manager.bin_dir(15)))
    assert not report.ok
    found = _by_object(report, "shop")
    assert (found["public.items"].status, found["public.items"].detail) == ("differs", "content digest")
    assert (found["public.items"].expected, found["public.items"].found) == (2000, 2000)
    assert found["public.items_id_seq"].status == "differs"
