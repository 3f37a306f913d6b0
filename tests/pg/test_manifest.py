"""``/manifest.json`` and the connection helpers, against real PostgreSQL 15, 17 and 18 servers.

One module-scoped build per server: a database holding every object kind the manifest describes, a locked
database, a few roles, and the manifests collected from it (superuser and non-superuser, single and full mode).
The tests then assert exact values, including each reference quirk we must not copy (behaviour spec §8.2).
Everything created has a unique name and is dropped at the end: the servers are shared with other tests.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from airflow_provider_pgplakar.pg.connect import (
    PgConnectError,
    can_read_pg_authid,
    connect,
    list_databases,
    server_version_num,
)
from airflow_provider_pgplakar.pg.manifest import MINUS_INFINITY, ManifestError, collect_manifest
from airflow_provider_pgplakar.pg.options import ConnOptions
from airflow_provider_pgplakar.pg.secrets import SslFiles
from tests.pgservers import PG_VERSIONS, SUPERUSER, PgServer

TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
TOOLS = {"pg_restore": "pg_restore (PostgreSQL) 18.1", "pg_dump": "pg_dump (PostgreSQL) 18.1"}
OPTIONS = {"schema_only": False, "data_only": False, "compress": False}
NOW_SQL = """SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""

SCHEMA_SQL = """
CREATE SCHEMA app;
CREATE TABLE app.customers (
    id integer PRIMARY KEY,
    email text NOT NULL,
    region text,
    CONSTRAINT customers_region_email_key UNIQUE (region, email),
    CONSTRAINT customers_id_check CHECK (id > 0)
) WITH (fillfactor = 70, autovacuum_enabled = false);
CREATE INDEX customers_region_idx ON app.customers (region) WHERE region IS NOT NULL;
CREATE TABLE app.orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id integer NOT NULL,
    total numeric(10,2) DEFAULT 0,
    -- sorts before customers_pkey: a contype-blind "ORDER BY conname LIMIT 1" would name the pkey index after it
    CONSTRAINT customer_ref_fk FOREIGN KEY (customer_id) REFERENCES app.customers (id)
) WITH (autovacuum_enabled = false);
CREATE TABLE app.events (id integer NOT NULL, at date NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE app.events_2024 PARTITION OF app.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE app.base_log (msg text);
CREATE TABLE app.audit_log (actor text) INHERITS (app.base_log);
CREATE VIEW app.customer_emails AS SELECT id, email FROM app.customers;
CREATE SEQUENCE app.invoice_seq;
CREATE UNLOGGED TABLE app.cache (k text PRIMARY KEY, v text);
INSERT INTO app.customers VALUES (1, 'a@x', 'eu'), (2, 'b@x', 'us'), (3, 'c@x', NULL);
INSERT INTO app.orders (customer_id, total) VALUES (1, 10), (1, 5), (2, 7);
CREATE MATERIALIZED VIEW app.order_totals AS
    SELECT customer_id, sum(total) AS total FROM app.orders GROUP BY customer_id;
-- Best-effort proof for a non-superuser: these catalogs become unreadable in this database only.
REVOKE SELECT ON pg_catalog.pg_extension FROM PUBLIC;
REVOKE SELECT ON pg_catalog.pg_settings FROM PUBLIC;
"""


@dataclass
class Built:
    server: PgServer
    db: str
    locked: str
    roles: dict[str, str]  # short name -> role name
    reader_password: str
    trgm_version: str | None  # pg_trgm's version when this server build ships it
    vacuum_window: tuple[str, str, str]  # before VACUUM, between VACUUM and ANALYZE, after ANALYZE
    su: dict[str, Any]  # superuser, single-database mode
    reader: dict[str, Any]  # non-superuser, single-database mode
    su_full: dict[str, Any]  # superuser, full mode, locked database excluded
    reader_full: dict[str, Any]  # non-superuser, full mode

    def factory(self, user: str | None = None, password: str | None = None) -> Callable[[str], psycopg.Connection]:
        opts = self.options(user, password)
        return lambda dbname: connect(opts, SslFiles(), dbname)

    def options(self, user: str | None = None, password: str | None = None) -> ConnOptions:
        user = user or self.server.superuser
        password = password or (self.server.password if user == self.server.superuser else self.reader_password)
        return ConnOptions(host=self.server.host, port=self.server.port, username=user, password=password)


def _collect(built: Built, factory: Callable[[str], psycopg.Connection], **kw: Any) -> dict[str, Any]:
    kw.setdefault("database", built.db)
    return collect_manifest(
        factory,
        connector="postgresql",
        host=built.server.host,
        port=built.server.port,
        dump_format="custom",
        options=OPTIONS,
        tool_versions=TOOLS,
        extra={"run_id": "r1", "dag": {"id": "d"}},
        **kw,
    )


def _create_roles(admin: psycopg.Connection, roles: dict[str, str], reader_password: str) -> None:
    r = roles
    admin.execute(f"CREATE ROLE {r['expired']} LOGIN VALID UNTIL '-infinity'")
    admin.execute(f"CREATE ROLE {r['dated']} VALID UNTIL '2030-01-02 03:04:05+00' CONNECTION LIMIT 3")
    admin.execute(f"CREATE ROLE {r['group']} NOLOGIN")
    admin.execute(f"CREATE ROLE {r['admin']} NOLOGIN")
    admin.execute(f"CREATE ROLE {r['reader']} LOGIN PASSWORD '{reader_password}'")
    admin.execute(f"GRANT {r['group']} TO {r['admin']} WITH ADMIN OPTION")
    admin.execute(f"GRANT {r['group']} TO {r['reader']}")
    # PG16+ keeps a second pg_auth_members row for another grantor; older versions just note the duplicate.
    admin.execute(f"GRANT {r['group']} TO {r['reader']} GRANTED BY {r['admin']}")


def _populate(server: PgServer, db: str) -> tuple[str | None, tuple[str, str, str]]:
    with server.connect(db) as conn:
        conn.execute(SCHEMA_SQL)
        row = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'pg_trgm'").fetchone()
        trgm = None
        if row is not None:
            conn.execute("CREATE EXTENSION pg_trgm SCHEMA public")
            trgm = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()[0]
        # Flush this backend's insert counts now, so a later flush cannot add them on top of VACUUM's count.
        conn.execute("SELECT pg_stat_force_next_flush()")
        before = conn.execute(NOW_SQL).fetchone()[0]
        conn.execute("VACUUM app.customers")
        middle = conn.execute(NOW_SQL).fetchone()[0]
        conn.execute("ANALYZE app.customers")
        after = conn.execute(NOW_SQL).fetchone()[0]
    return trgm, (before, middle, after)


@pytest.fixture(scope="module", params=PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    server: PgServer = request.getfixturevalue(f"pg{request.param}")
    tag = uuid.uuid4().hex[:10]
    db, locked = f"pgplakar_mf_{tag}", f"pgplakar_mf_{tag}_locked"
    roles = {short: f"mf_{tag}_{short}" for short in ("expired", "dated", "group", "admin", "reader")}
    reader_password = uuid.uuid4().hex
    try:
        with server.connect() as admin:
            admin.execute(f"CREATE DATABASE {db}")
            admin.execute(f"CREATE DATABASE {locked}")
            admin.execute(f"REVOKE CONNECT ON DATABASE {locked} FROM PUBLIC")
            _create_roles(admin, roles, reader_password)
        trgm, window = _populate(server, db)
        built = Built(server, db, locked, roles, reader_password, trgm, window, {}, {}, {}, {})
        reader = built.factory(roles["reader"])
        built.su = _collect(built, built.factory())
        built.reader = _collect(built, reader)
        built.su_full = _collect(built, built.factory(), database=None, exclude_databases={locked})
        built.reader_full = _collect(built, reader, database=None)
        yield built
    finally:
        with server.connect() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            admin.execute(f"DROP DATABASE IF EXISTS {locked} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {', '.join(roles.values())}")


def _db_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [d for d in manifest["databases"] if d["name"] == name]
    return entry


def _relations(manifest: dict[str, Any], db: str) -> dict[str, dict[str, Any]]:
    return {f"{r['schema']}.{r['name']}": r for r in _db_entry(manifest, db)["relations"]}


def _ours(errors: list[dict[str, Any]], built: Built) -> list[dict[str, Any]]:
    """Errors about our databases or the cluster (other tests' databases on the shared server are not ours)."""
    return [e for e in errors if e["database"] in (None, built.db, built.locked, "postgres")]


# --------------------------------------------------------------------------------------------------------------------
# Top level


def test_top_level_fields_and_order(built: Built) -> None:
    """The reference's field names, types (port is a string) and order, then our additions at the end."""
    m = built.su
    assert list(m) == [
        "version", "created_at", "connector", "host", "port", "server_version", "server_version_num",
        "pg_dump_version", "cluster_system_identifier", "in_recovery", "database", "dump_format", "options",
        "cluster_config", "roles", "tablespaces", "databases", "tool_versions", "errors", "pgplakar",
    ]  # fmt: skip
    assert m["version"] == 2
    assert TS_RE.fullmatch(m["created_at"])
    assert m["connector"] == "postgresql"
    assert (m["host"], m["port"]) == (built.server.host, str(built.server.port))
    assert m["server_version_num"] // 10000 == built.server.version
    assert m["server_version"].startswith(f"{built.server.version}.")
    assert m["pg_dump_version"] == "pg_dump (PostgreSQL) 18.1"
    assert m["tool_versions"] == TOOLS and list(m["tool_versions"]) == ["pg_dump", "pg_restore"]
    assert m["in_recovery"] is False
    assert (m["database"], m["dump_format"]) == (built.db, "custom")
    assert m["options"] == OPTIONS and list(m["options"]) == ["compress", "data_only", "schema_only"]
    assert m["errors"] == []
    assert m["pgplakar"] == {"run_id": "r1", "dag": {"id": "d"}}
    with built.server.connect() as conn:
        sysid = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
    assert m["cluster_system_identifier"] == sysid
    assert json.loads(json.dumps(m, allow_nan=False)) == m  # JSON-ready as it is


def test_cluster_config(built: Built) -> None:
    config = built.su["cluster_config"]
    with built.server.connect() as conn:
        datadir, timezone, checksums = conn.execute(
            "SELECT current_setting('data_directory'), current_setting('TimeZone'), "
            "current_setting('data_checksums') = 'on'"
        ).fetchone()
    expected = {
        "data_directory": datadir,
        "timezone": timezone,  # the reference never collected it (pg_settings spells it TimeZone)
        "max_connections": 50,
        "wal_level": "replica",
        "server_encoding": "UTF8",
        "data_checksums": checksums,
        "block_size": 8192,
        "wal_block_size": 8192,
        "archive_mode": "off",
        "archive_command_set": False,
    }
    if built.server.version < 16:  # lc_collate/lc_ctype left pg_settings in 16
        expected = {**expected, "lc_collate": "C", "lc_ctype": "C"}
        order = [*list(expected)[:-4], "lc_collate", "lc_ctype", "archive_mode", "archive_command_set"]
        expected = {key: expected[key] for key in order}
    assert config == expected
    assert list(config) == list(expected)


def test_roles(built: Built) -> None:
    """-infinity keeps the role (as an RFC 3339 'always expired'), and member_of has no per-grantor duplicates."""
    roles = built.su["roles"]
    names = [r["name"] for r in roles]
    assert names == sorted(names, key=lambda n: n.encode())
    by_name = {r["name"]: r for r in roles}
    r = built.roles
    base = {
        "superuser": False, "replication": False, "can_login": False, "create_db": False, "create_role": False,
        "inherit": True, "bypass_rls": False, "connection_limit": -1, "valid_until": None,
    }  # fmt: skip
    assert by_name[r["expired"]] == {"name": r["expired"], **base, "can_login": True, "valid_until": MINUS_INFINITY}
    assert MINUS_INFINITY == "0001-01-01T00:00:00.000000Z"
    assert by_name[r["dated"]] == {
        "name": r["dated"],
        **base,
        "connection_limit": 3,
        "valid_until": "2030-01-02T03:04:05.000000Z",
    }
    assert by_name[r["group"]] == {"name": r["group"], **base}
    assert by_name[r["admin"]] == {"name": r["admin"], **base, "member_of": [r["group"]]}
    assert by_name[r["reader"]] == {"name": r["reader"], **base, "can_login": True, "member_of": [r["group"]]}
    assert list(by_name[r["reader"]]) == ["name", *base, "member_of"]
    with built.server.connect() as conn:
        grants = conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE member = %s::regrole", (r["reader"],)
        ).fetchone()[0]
    assert grants == (2 if built.server.version >= 16 else 1)  # the duplicate source really exists on 16+


def test_tablespaces(built: Built) -> None:
    assert built.su["tablespaces"] == [
        {"name": "pg_default", "owner": built.server.superuser, "location": ""},
        {"name": "pg_global", "owner": built.server.superuser, "location": ""},
    ]


# --------------------------------------------------------------------------------------------------------------------
# Databases


def test_single_database_mode_details_only_that_database(built: Built) -> None:
    (entry,) = built.su["databases"]
    assert {k: v for k, v in entry.items() if k not in ("extensions", "schemas", "relations")} == {
        "name": built.db,
        "owner": built.server.superuser,
        "encoding": "UTF8",
        "collate": "C",
        "ctype": "C",
        "allow_conn": True,
        "is_template": False,
        "default_tablespace": "pg_default",
        "connection_limit": -1,
        "locale_provider": "libc",
    }
    extensions = [{"name": "plpgsql", "version": "1.0", "schema": "pg_catalog"}]
    if built.trgm_version is not None:  # contrib is in some server builds only
        extensions.insert(0, {"name": "pg_trgm", "version": built.trgm_version, "schema": "public"})
    assert entry["extensions"] == extensions
    assert entry["schemas"] == [
        {"name": "app", "owner": built.server.superuser},
        {"name": "public", "owner": "pg_database_owner"},
    ]


def _rel(name: str, kind: str = "r", **fields: Any) -> dict[str, Any]:
    """A relation entry with the defaults of an empty, never-vacuumed, permanent table."""
    out: dict[str, Any] = {
        "schema": "app", "name": name, "owner": SUPERUSER, "persistence": "p", "kind": kind, "row_estimate": 0,
        "live_row_estimate": 0, "column_count": 0, "has_primary_key": False, "has_triggers": False,
        "rls_enabled": False, "rls_forced": False, "is_partition": False, "last_vacuum": None, "last_analyze": None,
        "last_autovacuum": None, "last_autoanalyze": None,
    }  # fmt: skip
    out.update(fields)
    if "columns" in fields:
        out["column_count"] = len(fields["columns"])
    return out


def _col(position: int, name: str, type_: str, nullable: bool = True, **extra: str) -> dict[str, Any]:
    return {"position": position, "name": name, "type": type_, "nullable": nullable, **extra}


def _idx(table: str, name: str, cols: str, *, unique: bool = False, primary: bool = False, **extra: Any) -> dict:
    where = f" WHERE {extra.pop('where')}" if "where" in extra else ""
    kind = "UNIQUE INDEX" if unique else "INDEX"
    return {
        "name": name,
        "method": "btree",
        "definition": f"CREATE {kind} {name} ON app.{table} USING btree ({cols}){where}",
        "is_unique": unique,
        "is_primary": primary,
        "is_valid": True,
        "is_partial": bool(where),
        **extra,
    }


def _expected_relations(built: Built) -> list[dict[str, Any]]:
    seq_cols = [_col(1, "last_value", "bigint", False), _col(2, "log_cnt", "bigint", False)]
    seq_cols.append(_col(3, "is_called", "boolean", False))
    event_cols = [_col(1, "id", "integer", False), _col(2, "at", "date", False)]
    actual = _relations(built.su, built.db)["app.customers"]
    return [
        _rel("audit_log", columns=[_col(1, "msg", "text"), _col(2, "actor", "text")], inherits=["app.base_log"]),
        _rel("base_log", columns=[_col(1, "msg", "text")]),
        _rel(
            "cache",
            persistence="u",
            has_primary_key=True,
            columns=[_col(1, "k", "text", False), _col(2, "v", "text")],
            constraints=[{"name": "cache_pkey", "type": "p", "columns": ["k"], "definition": "PRIMARY KEY (k)"}],
            indexes=[_idx("cache", "cache_pkey", "k", unique=True, primary=True, constraint_name="cache_pkey")],
        ),
        _rel("customer_emails", "v", columns=[_col(1, "id", "integer"), _col(2, "email", "text")]),
        _rel(
            "customers",
            row_estimate=3,
            live_row_estimate=3,
            has_primary_key=True,
            has_triggers=True,  # the FK's triggers on the referenced side
            storage_options=["fillfactor=70", "autovacuum_enabled=false"],
            last_vacuum=actual["last_vacuum"],  # checked against the clock in test_vacuum_and_analyze_times
            last_analyze=actual["last_analyze"],
            columns=[_col(1, "id", "integer", False), _col(2, "email", "text", False), _col(3, "region", "text")],
            constraints=[
                {"name": "customers_id_check", "type": "c", "columns": ["id"], "definition": "CHECK ((id > 0))"},
                {"name": "customers_pkey", "type": "p", "columns": ["id"], "definition": "PRIMARY KEY (id)"},
                # key order (region, email), not attnum order (email=2, region=3)
                {
                    "name": "customers_region_email_key",
                    "type": "u",
                    "columns": ["region", "email"],
                    "definition": "UNIQUE (region, email)",
                },
            ],
            indexes=[
                _idx("customers", "customers_pkey", "id", unique=True, primary=True, constraint_name="customers_pkey"),
                _idx(
                    "customers",
                    "customers_region_email_key",
                    "region, email",
                    unique=True,
                    constraint_name="customers_region_email_key",
                ),
                _idx("customers", "customers_region_idx", "region", where="(region IS NOT NULL)"),
            ],
        ),
        _rel("events", "p", columns=event_cols, partition_strategy="range", partition_key="RANGE (at)"),
        _rel(
            "events_2024",
            columns=event_cols,
            is_partition=True,
            partition_parent="app.events",
            partition_bound="FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
        ),
        _rel(
            "events_2025",
            columns=event_cols,
            is_partition=True,
            partition_parent="app.events",
            partition_bound="FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        ),
        _rel("invoice_seq", "S", row_estimate=1, columns=seq_cols),
        _rel(
            "order_totals",
            "m",
            live_row_estimate=2,
            columns=[_col(1, "customer_id", "integer"), _col(2, "total", "numeric")],
        ),
        _rel(
            "orders",
            live_row_estimate=3,
            has_primary_key=True,
            has_triggers=True,
            storage_options=["autovacuum_enabled=false"],
            columns=[
                _col(1, "id", "bigint", False, identity="always"),
                _col(2, "customer_id", "integer", False),
                _col(3, "total", "numeric(10,2)", default="0"),
            ],
            constraints=[
                {
                    "name": "customer_ref_fk",
                    "type": "f",
                    "columns": ["customer_id"],
                    "definition": "FOREIGN KEY (customer_id) REFERENCES app.customers(id)",
                },
                {"name": "orders_pkey", "type": "p", "columns": ["id"], "definition": "PRIMARY KEY (id)"},
            ],
            indexes=[_idx("orders", "orders_pkey", "id", unique=True, primary=True, constraint_name="orders_pkey")],
        ),
        _rel("orders_id_seq", "S", row_estimate=1, columns=seq_cols),
    ]


def test_relations_exact(built: Built) -> None:
    """Every relation kind, in name order, with columns, key-ordered constraints and owner-correct indexes."""
    relations = _db_entry(built.su, built.db)["relations"]
    expected = _expected_relations(built)
    assert [r["name"] for r in relations] == [r["name"] for r in expected]
    for got, want in zip(relations, expected, strict=True):
        assert got == want, want["name"]
    customers = relations[4]
    assert list(customers) == [
        "schema", "name", "owner", "persistence", "kind", "row_estimate", "live_row_estimate", "column_count",
        "has_primary_key", "has_triggers", "rls_enabled", "rls_forced", "is_partition", "storage_options",
        "last_vacuum", "last_analyze", "last_autovacuum", "last_autoanalyze", "columns", "constraints", "indexes",
    ]  # fmt: skip


def test_pkey_index_names_its_own_constraint_not_the_fk(built: Built) -> None:
    """The FK's conindid also points at customers_pkey, and its name sorts first: only contype tells them apart."""
    with built.server.connect(built.db) as conn:
        sharing = conn.execute(
            "SELECT conname, contype FROM pg_constraint WHERE conindid = 'app.customers_pkey'::regclass "
            "ORDER BY conname"
        ).fetchall()
    assert sharing == [("customer_ref_fk", "f"), ("customers_pkey", "p")]
    customers = _relations(built.su, built.db)["app.customers"]
    assert customers["indexes"][0]["constraint_name"] == "customers_pkey"


def test_vacuum_and_analyze_times(built: Built) -> None:
    """Manual runs are reported (auto ones too, as the latest of both), as fixed-width UTC RFC 3339."""
    before, middle, after = built.vacuum_window
    customers = _relations(built.su, built.db)["app.customers"]
    assert TS_RE.fullmatch(customers["last_vacuum"]) and TS_RE.fullmatch(customers["last_analyze"])
    assert before <= customers["last_vacuum"] <= middle <= customers["last_analyze"] <= after
    assert customers["last_autovacuum"] is None and customers["last_autoanalyze"] is None


# --------------------------------------------------------------------------------------------------------------------
# Modes and privileges


def test_full_mode(built: Built) -> None:
    """All databases listed in name order; connectable non-templates detailed, except the excluded one."""
    m = built.su_full
    assert "database" not in m
    names = [d["name"] for d in m["databases"]]
    assert names == sorted(names, key=lambda n: n.encode())
    assert {built.db, built.locked, "postgres", "template0", "template1"} <= set(names)
    detailed = {d["name"] for d in m["databases"] if "schemas" in d}
    assert {built.db, "postgres"} <= detailed
    assert not {built.locked, "template0", "template1"} & detailed
    assert _relations(m, built.db) == _relations(built.su, built.db)
    assert _ours(m["errors"], built) == []


def test_non_superuser_collects_with_recorded_gaps(built: Built) -> None:
    """Refused sections are dropped and recorded one by one; the rest of the detail still comes through."""
    m = built.reader
    assert m["errors"] == [
        {"database": None, "section": "cluster_config", "sqlstate": "42501",
         "message": "permission denied for view pg_settings"},
        {"database": built.db, "section": "extensions", "sqlstate": "42501",
         "message": "permission denied for table pg_extension"},
    ]  # fmt: skip
    assert "cluster_config" not in m
    (entry,) = m["databases"]
    assert "extensions" not in entry
    assert entry["schemas"] == _db_entry(built.su, built.db)["schemas"]
    assert entry["relations"] == _db_entry(built.su, built.db)["relations"]
    assert [r["name"] for r in m["roles"]] == [r["name"] for r in built.su["roles"]]
    assert m["cluster_system_identifier"] == built.su["cluster_system_identifier"]


def test_non_superuser_full_mode_records_refused_database(built: Built) -> None:
    m = built.reader_full
    locked = [e for e in m["errors"] if e["database"] == built.locked]
    assert len(locked) == 1 and locked[0]["section"] == "connect"
    assert "permission denied for database" in locked[0]["message"]
    assert built.reader_password not in json.dumps(m)
    assert "schemas" not in _db_entry(m, built.locked)
    assert _db_entry(m, "postgres")["schemas"] == [{"name": "public", "owner": "pg_database_owner"}]
    assert _relations(m, built.db) == _relations(built.su, built.db)


def test_fatal_when_manifest_connection_is_unusable(built: Built) -> None:
    def closed(dbname: str) -> psycopg.Connection:
        conn = built.factory()(dbname)
        conn.close()
        return conn

    with pytest.raises(ManifestError, match=built.db):
        _collect(built, closed)
    with pytest.raises(PgConnectError):
        _collect(built, built.factory(), database=f"{built.db}_missing")


def test_extra_must_be_json(built: Built) -> None:
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
        collect_manifest(
            built.factory(),
            database=built.db,
            connector="postgresql",
            host="h",
            port=1,
            dump_format="custom",
            options=None,
            tool_versions={},
            extra={"bad": object()},
        )


# --------------------------------------------------------------------------------------------------------------------
# Connection helpers


def test_connection_helpers(built: Built) -> None:
    with connect(built.options(), SslFiles(), built.db) as conn:
        assert server_version_num(conn) == built.su["server_version_num"]
        names = list_databases(conn)
        assert can_read_pg_authid(conn) is True
    assert {built.db, built.locked, "postgres", "template1"} <= set(names) and "template0" not in names
    assert names == sorted(names, key=lambda n: n.encode())
    with connect(built.options(built.roles["reader"]), SslFiles(), built.db) as conn:
        assert can_read_pg_authid(conn) is False
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == ("pgplakar",)


def test_worker_pg_environment_does_not_steer_our_connections(built: Built, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path) -> None:
    """The tools get an environment without the worker's PG* variables; in-process connections must behave the
    same: each of these would otherwise redirect, refuse or alter our catalog connections."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:wrong-password\n")
    passfile.chmod(0o600)
    for name, value in {
        "PGOPTIONS": "-c statement_timeout=1 -c search_path=nowhere",
        "PGAPPNAME": "hijacked",
        "PGTARGETSESSIONATTRS": "read-only",  # a primary would be refused
        "PGHOSTADDR": "192.0.2.1",  # TEST-NET-1: unroutable
        "PGCLIENTENCODING": "LATIN1",
        "PGPASSFILE": str(passfile),
        "PGSSLMODE": "require",  # the test servers have no SSL
        "PGCONNECT_TIMEOUT": "1",
    }.items():
        monkeypatch.setenv(name, value)
    with connect(built.options(), SslFiles(), built.db) as conn:
        row = conn.execute("SELECT current_setting('application_name'), current_setting('statement_timeout'), "
                           "current_setting('search_path'), current_setting('client_encoding'), "
                           "pg_sleep(0.01)::text").fetchone()
    assert row[:4] == ("pgplakar", "0", '"$user", public', "UTF8")


def test_connect_error_names_target_but_never_the_password(built: Built) -> None:
    secret = built.db  # a password equal to the database name must not leak through the name either
    opts = built.options(built.roles["reader"], secret)
    with pytest.raises(PgConnectError) as info:
        connect(opts, SslFiles(), built.db)
    message = str(info.value)
    assert secret not in message and info.value.__cause__ is None and info.value.__suppress_context__
    assert f"cannot connect to {built.server.host}:{built.server.port}/*** as {built.roles['reader']}:" in message
    assert "password authentication failed" in message
    with pytest.raises(PgConnectError, match=r"^cannot connect to 127\.0\.0\.1:1/postgres as x: "):
        connect(ConnOptions(host="127.0.0.1", port=1, username="x", password="pw-secret"), SslFiles(), "postgres")
    iam = ConnOptions(host="h", username="u", iam=True, region="us-east-1", ssl_mode="require")
    with pytest.raises(ValueError, match="IAM token"):
        connect(iam, SslFiles(), "postgres")
