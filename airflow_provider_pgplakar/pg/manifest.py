"""Build ``/manifest.json``: a JSON description of the cluster and of each backed-up database.

The shape is the reference's ``version: 2`` manifest: same field names, same JSON types
(``port`` is a string), and fields the reference marks ``omitempty`` are left out when empty, so readers of
Plakar manifests can read ours. We fix the reference's quirks and add fields; nothing is renamed.

Fixes, each visible in the output:

- ``constraint_name`` of an index is the constraint that *owns* it (``contype`` p/u/x). Foreign keys also point
  ``conindid`` at the unique index they reference, so the reference could report an FK's name for a pkey.
- Constraint ``columns`` are in key order (``conkey`` position): ``UNIQUE (b, a)`` gives ``["b", "a"]``.
- ``last_vacuum``/``last_analyze`` are the latest of the manual and the automatic run; ``last_autovacuum`` and
  ``last_autoanalyze`` give the automatic ones alone. A table only autovacuum touches is not "never vacuumed".
- A role with ``VALID UNTIL '-infinity'`` is kept. Its ``valid_until`` is ``0001-01-01T00:00:00.000000Z``: still
  RFC 3339 and still "expired", where null would mean "never expires" (``infinity`` and no limit are null).
- ``member_of`` holds each role once (PG16+ keeps one ``pg_auth_members`` row per grantor).
- ``partition_parent`` is set only for real partitions; legacy ``INHERITS`` parents are listed in ``inherits``.
- ``cluster_config.timezone`` is really collected (``pg_settings`` spells it ``TimeZone``; the reference's
  lower-case filter never matched).
- Every section is best-effort on its own: a failed query drops only its field and appends an entry to the
  top-level ``errors`` list (``database``, ``section``, ``sqlstate``, ``message``) instead of silently ending the
  database's detail. Only the server-version query is fatal, as in the reference.

Additions: ``tool_versions``, ``errors``, ``pgplakar`` (the caller's ``extra``); per database ``locale_provider``
and ``locale``; per relation ``partition_key``, ``partition_bound``, ``inherits``, ``last_autovacuum``,
``last_autoanalyze``; per column ``identity`` and ``generated``; per constraint ``definition``; in
``cluster_config`` ``archive_library``.

Consistency and determinism: each database is read in one ``REPEATABLE READ READ ONLY`` transaction (sections run
in savepoints so a failure keeps the snapshot usable) with an empty ``search_path``, so expressions and defaults are
schema-qualified the same way whatever the role's settings (as pg_dump does). Every list is ordered by name
(bytewise) or position. Timestamps are UTC RFC 3339 with microseconds, fixed width, or null.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import IsolationLevel, pq
from psycopg.rows import dict_row

from airflow_provider_pgplakar.pg import PgError
from airflow_provider_pgplakar.pg.process import check_cancelled
from airflow_provider_pgplakar.store.progress import Ticker

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_VERSION", "ConnFactory", "DatabaseDetail", "ManifestError", "add_details", "collect_manifest",
           "database_detail"]

MANIFEST_VERSION = 2
ConnFactory = Callable[[str], psycopg.Connection]
# A database's extensions, schemas and relations, and the errors of their sections (:func:`database_detail`).
DatabaseDetail = tuple[dict[str, Any], list[dict[str, Any]]]
T = TypeVar("T")

# PostgreSQL timestamps are infinite or beyond year 9999 at times, which Python's datetime cannot load; formatting
# in SQL always works. to_char() of +/-infinity is NULL.
_TS_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
MINUS_INFINITY = "0001-01-01T00:00:00.000000Z"

# System and temporary schemas: pg_catalog, information_schema, pg_toast, pg_temp_N, pg_toast_temp_N.
_USER_SCHEMA = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'"
_REL_KINDS = "('r', 'p', 'f', 'v', 'm', 'S')"


def _ts(expr: LiteralString) -> LiteralString:
    return f"pg_catalog.to_char(({expr}) AT TIME ZONE 'UTC', '{_TS_FORMAT}')"


class ManifestError(PgError):
    """The manifest cannot be built at all: the server-version query or the manifest transaction failed."""


# --------------------------------------------------------------------------------------------------------------------
# Plumbing: errors, sections, connections


class _Errors:
    """Failures of best-effort sections, in collection order (which is deterministic)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, database: str | None, section: str, exc: BaseException) -> None:
        sqlstate = getattr(exc, "sqlstate", None)
        diag = getattr(exc, "diag", None)
        message = (getattr(diag, "message_primary", None) or str(exc)).strip().splitlines()
        text = message[0] if message else type(exc).__name__
        self.items.append({"database": database, "section": section, "sqlstate": sqlstate, "message": text})


def _rows(conn: psycopg.Connection, query: LiteralString) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query)
        return cur.fetchall()


def _section(
    conn: psycopg.Connection, errors: _Errors, database: str | None, section: str, fn: Callable[[], T]
) -> T | None:
    """Run ``fn`` in a savepoint; on a database error record it and return None, leaving the snapshot usable.
    A cancelled task (:func:`.process.cancel`) stops here: its query was cancelled, the next one does not run."""
    check_cancelled()
    try:
        with conn.transaction():
            return fn()
    except psycopg.Error as exc:
        errors.add(database, section, exc)
        return None


@contextmanager
def _snapshot(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One read-only REPEATABLE READ transaction on ``conn`` (which we own and close); never commits anything."""
    try:
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.rollback()
        conn.autocommit = False
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        # Local to the transaction, set before any savepoint so a rolled-back section cannot undo it.
        conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")
        yield conn
    finally:
        try:
            conn.rollback()
        except psycopg.Error:
            pass
        conn.close()


@contextmanager
def _borrowed(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """The caller's open transaction on ``conn`` (e.g. a dump's exported snapshot), in a savepoint rolled back at the
    end: our ``search_path`` stays ours and the caller's settings come back; ``conn`` stays open."""
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")
        yield conn


def _omit_empty(item: dict[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """Drop ``keys`` whose value is None, "", 0 or empty (the reference's Go ``omitempty``)."""
    for key in keys:
        if key in item and not item[key]:
            del item[key]
    return item


def _json_copy(name: str, value: Any) -> Any:
    """A deep copy that is guaranteed JSON-serialisable, so a bad ``extra`` fails before any query runs."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------------------------------
# Cluster-level sections (on the manifest connection)


def _server_version(conn: psycopg.Connection) -> dict[str, Any]:
    try:
        with conn.transaction():
            row = _rows(
                conn,
                "SELECT pg_catalog.current_setting('server_version') AS server_version, "
                "pg_catalog.current_setting('server_version_num')::int AS server_version_num",
            )[0]
    except psycopg.Error as exc:
        raise ManifestError(f"querying server version: {exc}") from exc
    return row


def _system_identifier(conn: psycopg.Connection) -> str:
    sysid: str = _rows(conn, "SELECT system_identifier::text AS id FROM pg_catalog.pg_control_system()")[0]["id"]
    return sysid


def _in_recovery(conn: psycopg.Connection) -> bool:
    return bool(_rows(conn, "SELECT pg_catalog.pg_is_in_recovery() AS r")[0]["r"])


_SETTINGS: LiteralString = (
    "'archive_command', 'archive_library', 'archive_mode', 'block_size', 'data_checksums', 'data_directory', "
    "'lc_collate', 'lc_ctype', 'max_connections', 'server_encoding', 'shared_preload_libraries', 'timezone', "
    "'wal_block_size', 'wal_level'"
)
_INT_SETTINGS = ("max_connections", "block_size", "wal_block_size")
# (key, omitempty) in the reference's output order; archive_library is ours.
_CONFIG_KEYS = (
    ("data_directory", True),
    ("timezone", True),
    ("max_connections", True),
    ("wal_level", True),
    ("server_encoding", True),
    ("data_checksums", False),
    ("block_size", True),
    ("wal_block_size", True),
    ("shared_preload_libraries", True),
    ("lc_collate", True),
    ("lc_ctype", True),
    ("archive_mode", True),
    ("archive_command_set", False),
    ("archive_library", True),
)


def _cluster_config(conn: psycopg.Connection) -> dict[str, Any]:
    """Selected settings. Settings hidden from this role (data_directory) or gone in this version are omitted.

    The archive command itself is never stored, only whether one is set: it may embed credentials.
    """
    rows = _rows(
        conn,
        f"SELECT pg_catalog.lower(name) AS name, setting FROM pg_catalog.pg_settings "
        f"WHERE pg_catalog.lower(name) IN ({_SETTINGS}) ORDER BY 1",
    )
    raw: dict[str, str] = {row["name"]: row["setting"] or "" for row in rows}
    values: dict[str, Any] = dict(raw)
    for key in _INT_SETTINGS:
        if key in raw:
            values[key] = int(raw[key]) if raw[key].lstrip("-").isdigit() else 0
    values["data_checksums"] = raw.get("data_checksums") == "on"
    command = raw.get("archive_command", "")
    values["archive_command_set"] = bool(command) and command != "(disabled)"
    config = {key: values.get(key) for key, _ in _CONFIG_KEYS}
    return _omit_empty(config, [key for key, omit in _CONFIG_KEYS if omit])


def _roles(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(
        conn,
        "SELECT r.rolname::text AS name, r.rolsuper AS superuser, r.rolreplication AS replication, "
        "r.rolcanlogin AS can_login, r.rolcreatedb AS create_db, r.rolcreaterole AS create_role, "
        "r.rolinherit AS inherit, r.rolbypassrls AS bypass_rls, r.rolconnlimit AS connection_limit, "
        f"CASE WHEN r.rolvaliduntil = '-infinity' THEN '{MINUS_INFINITY}' "
        f"ELSE {_ts('r.rolvaliduntil')} END AS valid_until "
        "FROM pg_catalog.pg_roles r ORDER BY r.rolname",
    )


def _memberships(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Role name -> the roles it is a member of, each once (GROUP BY: PG16+ has one row per grantor)."""
    rows = _rows(
        conn,
        "SELECT m.rolname::text AS member, g.rolname::text AS role FROM pg_catalog.pg_auth_members am "
        "JOIN pg_catalog.pg_roles g ON g.oid = am.roleid JOIN pg_catalog.pg_roles m ON m.oid = am.member "
        "GROUP BY m.rolname, g.rolname ORDER BY m.rolname, g.rolname",
    )
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["member"], []).append(row["role"])
    return out


def _tablespaces(conn: psycopg.Connection) -> list[dict[str, Any]]:
    rows = _rows(
        conn,
        "SELECT spcname::text AS name, pg_catalog.pg_get_userbyid(spcowner)::text AS owner, "
        "pg_catalog.pg_tablespace_location(oid) AS location, COALESCE(spcoptions, '{}')::text[] AS options "
        "FROM pg_catalog.pg_tablespace ORDER BY spcname",
    )
    return [_omit_empty(row, ["options"]) for row in rows]


def _databases(conn: psycopg.Connection) -> list[dict[str, Any]]:
    # datlocprovider appeared in 15 and daticulocale (15-16) became datlocale in 17: reading them through
    # to_jsonb() keeps one query for every version (absent keys are NULL).
    rows = _rows(
        conn,
        "SELECT d.datname::text AS name, pg_catalog.pg_get_userbyid(d.datdba)::text AS owner, "
        "pg_catalog.pg_encoding_to_char(d.encoding)::text AS encoding, d.datcollate::text AS collate, "
        "d.datctype::text AS ctype, d.datallowconn AS allow_conn, d.datistemplate AS is_template, "
        "COALESCE(ts.spcname::text, 'pg_default') AS default_tablespace, d.datconnlimit AS connection_limit, "
        "CASE pg_catalog.to_jsonb(d) ->> 'datlocprovider' WHEN 'c' THEN 'libc' WHEN 'i' THEN 'icu' "
        "WHEN 'b' THEN 'builtin' ELSE '' END AS locale_provider, "
        "COALESCE(pg_catalog.to_jsonb(d) ->> 'datlocale', pg_catalog.to_jsonb(d) ->> 'daticulocale', '') AS locale "
        "FROM pg_catalog.pg_database d LEFT JOIN pg_catalog.pg_tablespace ts ON ts.oid = d.dattablespace "
        "ORDER BY d.datname",
    )
    return [_omit_empty(row, ["default_tablespace", "locale_provider", "locale"]) for row in rows]


def _collect_identity(conn: psycopg.Connection, manifest: dict[str, Any], errors: _Errors) -> None:
    """``cluster_system_identifier`` (omitted on failure) and ``in_recovery`` (false on failure), in place."""
    sysid = _section(conn, errors, None, "cluster_system_identifier", lambda: _system_identifier(conn))
    if sysid:
        manifest["cluster_system_identifier"] = sysid
    manifest["in_recovery"] = bool(_section(conn, errors, None, "in_recovery", lambda: _in_recovery(conn)))


def _collect_inventory(conn: psycopg.Connection, manifest: dict[str, Any], errors: _Errors) -> None:
    """Settings, roles, tablespaces and databases, in place; each is best-effort on its own."""
    config = _section(conn, errors, None, "cluster_config", lambda: _cluster_config(conn))
    if config:
        manifest["cluster_config"] = config
    roles = _section(conn, errors, None, "roles", lambda: _roles(conn))
    if roles:
        members = _section(conn, errors, None, "member_of", lambda: _memberships(conn)) or {}
        for role in roles:
            if members.get(role["name"]):
                role["member_of"] = members[role["name"]]
        manifest["roles"] = roles
    tablespaces = _section(conn, errors, None, "tablespaces", lambda: _tablespaces(conn))
    if tablespaces:
        manifest["tablespaces"] = tablespaces
    databases = _section(conn, errors, None, "databases", lambda: _databases(conn))
    if databases:
        manifest["databases"] = databases


# --------------------------------------------------------------------------------------------------------------------
# Per-database sections (one snapshot per database)


def _extensions(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(
        conn,
        "SELECT e.extname::text AS name, e.extversion AS version, n.nspname::text AS schema "
        "FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
        "ORDER BY e.extname",
    )


def _schemas(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return _rows(
        conn,
        "SELECT n.nspname::text AS name, pg_catalog.pg_get_userbyid(n.nspowner)::text AS owner "
        f"FROM pg_catalog.pg_namespace n WHERE {_USER_SCHEMA} ORDER BY n.nspname",
    )


_PARENT: LiteralString = (
    "SELECT pn.nspname || '.' || p.relname FROM pg_catalog.pg_inherits i "
    "JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace "
    "WHERE i.inhrelid = c.oid ORDER BY i.inhseqno"
)
_RELATION_OPTIONAL = (
    "tablespace",
    "partition_parent",
    "partition_strategy",
    "partition_key",
    "partition_bound",
    "inherits",
    "storage_options",
)


def _relations(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Tables, views, sequences... with the row carrying its oid (popped later) to attach columns etc."""
    return _rows(
        conn,
        "SELECT c.oid, n.nspname::text AS schema, c.relname::text AS name, "
        "pg_catalog.pg_get_userbyid(c.relowner)::text AS owner, "
        "c.relpersistence::text AS persistence, c.relkind::text AS kind, COALESCE(ts.spcname::text, '') AS tablespace, "
        # reltuples is -1 until the first VACUUM/ANALYZE (PG14+): the reference reports 0.
        "GREATEST(c.reltuples::bigint, 0) AS row_estimate, COALESCE(s.n_live_tup, 0) AS live_row_estimate, "
        "(SELECT count(*) FROM pg_catalog.pg_attribute a "
        " WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::int AS column_count, "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p') "
        "AS has_primary_key, "
        "c.relhastriggers AS has_triggers, c.relrowsecurity AS rls_enabled, c.relforcerowsecurity AS rls_forced, "
        "c.relispartition AS is_partition, "
        f"CASE WHEN c.relispartition THEN ({_PARENT} LIMIT 1) END AS partition_parent, "
        "CASE pt.partstrat WHEN 'r' THEN 'range' WHEN 'l' THEN 'list' WHEN 'h' THEN 'hash' END "
        "AS partition_strategy, "
        "CASE WHEN c.relkind = 'p' THEN pg_catalog.pg_get_partkeydef(c.oid) END AS partition_key, "
        "CASE WHEN c.relispartition THEN pg_catalog.pg_get_expr(c.relpartbound, c.oid) END AS partition_bound, "
        f"CASE WHEN NOT c.relispartition THEN ARRAY({_PARENT}) END AS inherits, "
        "COALESCE(c.reloptions, '{}')::text[] AS storage_options, "
        f"{_ts('GREATEST(s.last_vacuum, s.last_autovacuum)')} AS last_vacuum, "
        f"{_ts('GREATEST(s.last_analyze, s.last_autoanalyze)')} AS last_analyze, "
        f"{_ts('s.last_autovacuum')} AS last_autovacuum, {_ts('s.last_autoanalyze')} AS last_autoanalyze "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.oid "
        "LEFT JOIN pg_catalog.pg_tablespace ts ON ts.oid = c.reltablespace "
        "LEFT JOIN pg_catalog.pg_partitioned_table pt ON pt.partrelid = c.oid "
        f"WHERE c.relkind IN {_REL_KINDS} AND {_USER_SCHEMA} ORDER BY n.nspname, c.relname",
    )


def _columns(conn: psycopg.Connection) -> list[dict[str, Any]]:
    rows = _rows(
        conn,
        "SELECT a.attrelid AS oid, a.attnum::int AS position, a.attname::text AS name, "
        "pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable, "
        "COALESCE(pg_catalog.pg_get_expr(d.adbin, d.adrelid), '') AS default, "
        "CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' ELSE '' END AS identity, "
        "CASE a.attgenerated WHEN 's' THEN 'stored' WHEN 'v' THEN 'virtual' ELSE '' END AS generated "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        f"WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN {_REL_KINDS} AND {_USER_SCHEMA} "
        "ORDER BY a.attrelid, a.attnum",
    )
    return [_omit_empty(row, ["default", "identity", "generated"]) for row in rows]


def _constraints(conn: psycopg.Connection) -> list[dict[str, Any]]:
    # Not-null (n, PG18+) and constraint triggers (t) are left out as in the reference.
    rows = _rows(
        conn,
        "SELECT k.conrelid AS oid, k.conname::text AS name, k.contype::text AS type, "
        "ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord) "
        "      JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum "
        "      ORDER BY u.ord) AS columns, "
        "pg_catalog.pg_get_constraintdef(k.oid) AS definition "
        "FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_class c ON c.oid = k.conrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE k.contype IN ('p', 'u', 'f', 'c', 'x') AND {_USER_SCHEMA} ORDER BY k.conrelid, k.conname",
    )
    return [_omit_empty(row, ["columns"]) for row in rows]


def _indexes(conn: psycopg.Connection) -> list[dict[str, Any]]:
    # The owning constraint is the one of type p/u/x whose conindid is this index: a foreign key's conindid names
    # the referenced index too, which is how the reference could label a pkey with an FK's name.
    rows = _rows(
        conn,
        "SELECT x.indrelid AS oid, i.relname::text AS name, am.amname::text AS method, "
        "pg_catalog.replace(pg_catalog.pg_get_indexdef(i.oid), E'\\n', ' ') AS definition, "
        "x.indisunique AS is_unique, x.indisprimary AS is_primary, x.indisvalid AS is_valid, "
        "x.indpred IS NOT NULL AS is_partial, "
        "COALESCE((SELECT k.conname::text FROM pg_catalog.pg_constraint k WHERE k.conindid = i.oid "
        "          AND k.conrelid = x.indrelid AND k.contype IN ('p', 'u', 'x') ORDER BY k.conname LIMIT 1), '') "
        "AS constraint_name "
        "FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_catalog.pg_class c ON c.oid = x.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_am am ON am.oid = i.relam "
        f"WHERE {_USER_SCHEMA} ORDER BY x.indrelid, i.relname",
    )
    return [_omit_empty(row, ["constraint_name"]) for row in rows]


_CHILD_SECTIONS: tuple[tuple[str, Callable[[psycopg.Connection], list[dict[str, Any]]]], ...] = (
    ("columns", _columns),
    ("constraints", _constraints),
    ("indexes", _indexes),
)


def _collect_relations(conn: psycopg.Connection, errors: _Errors, database: str) -> list[dict[str, Any]] | None:
    relations = _section(conn, errors, database, "relations", lambda: _relations(conn))
    if relations is None:
        return None  # columns, constraints and indexes would have nothing to attach to
    by_oid = {rel.pop("oid"): _omit_empty(rel, _RELATION_OPTIONAL) for rel in relations}
    for key, collect in _CHILD_SECTIONS:
        rows = _section(conn, errors, database, key, functools.partial(collect, conn)) or []
        for row in rows:
            rel = by_oid.get(row.pop("oid"))
            if rel is not None:
                rel.setdefault(key, []).append(row)
    return relations


def _collect_database(conn: psycopg.Connection, entry: dict[str, Any], errors: _Errors) -> None:
    """Add extensions, schemas and relations to ``entry`` in place, each best-effort on its own."""
    name = entry["name"]
    for key, collect in (("extensions", _extensions), ("schemas", _schemas)):
        value = _section(conn, errors, name, key, functools.partial(collect, conn))
        if value:
            entry[key] = value
    relations = _collect_relations(conn, errors, name)
    if relations:
        entry["relations"] = relations


def _detail_targets(
    manifest: dict[str, Any], database: str | None, exclude: Collection[str], errors: _Errors
) -> list[dict[str, Any]]:
    """The database entries to detail; in single-database mode ``databases`` is reduced to that entry."""
    entries: list[dict[str, Any]] = manifest.get("databases", [])
    if database is None:
        return [d for d in entries if d["allow_conn"] and not d["is_template"]
                and not any(fnmatchcase(d["name"], p) for p in exclude)]
    selected = [d for d in entries if d["name"] == database]
    if selected:
        manifest["databases"] = selected
    elif entries:
        errors.add(None, "databases", LookupError(f"database {database!r} is not in pg_database"))
    return selected


def database_detail(conn: psycopg.Connection, name: str) -> DatabaseDetail:
    """The per-database part of the manifest for the connected database ``name``, read in the caller's open
    transaction (a logical backup reads it in the snapshot its pg_dump imports, on the fingerprint connection: one
    connection per database less); :func:`add_details` puts it into the manifest."""
    errors = _Errors()
    entry: dict[str, Any] = {"name": name}
    with _borrowed(conn):
        _collect_database(conn, entry, errors)
    del entry["name"]
    return entry, errors.items


def add_details(manifest: dict[str, Any], details: Mapping[str, DatabaseDetail | None],
                conn_factory: ConnFactory, exclude_databases: Collection[str] = ()) -> None:
    """Put the ``details`` of databases left out by ``collect_manifest(defer=...)`` into ``manifest`` (in place,
    their errors appended to ``errors``); a database without one (its dump was skipped) is read through
    ``conn_factory`` as :func:`collect_manifest` would have. Only databases :func:`collect_manifest` details are
    (templates are not, even when dumped)."""
    errors = _Errors()
    errors.items = manifest["errors"]
    entries = {d["name"]: d for d in _detail_targets(manifest, None, exclude_databases, errors)}
    for name, detail in details.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if detail is None:
            _collect_other(conn_factory, entry, errors)
        else:
            entry.update(detail[0])
            errors.items.extend(detail[1])


def _collect_other(conn_factory: ConnFactory, entry: dict[str, Any], errors: _Errors) -> None:
    name = entry["name"]
    check_cancelled()
    try:
        conn = conn_factory(name)
    except Exception as exc:  # noqa: BLE001 - any factory failure (auth, network, IAM token) loses only this detail
        errors.add(name, "connect", exc)
        return
    try:
        with _snapshot(conn):
            _collect_database(conn, entry, errors)
    except psycopg.Error as exc:  # the snapshot itself could not start (e.g. the connection dropped)
        errors.add(name, "transaction", exc)


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def collect_manifest(
    conn_factory: ConnFactory,
    *,
    database: str | None,
    connector: str,
    host: str,
    port: int,
    dump_format: str,
    options: Mapping[str, Any] | None,
    tool_versions: Mapping[str, str],
    extra: Mapping[str, Any] | None = None,
    exclude_databases: Collection[str] = (),
    defer: Collection[str] = (),
    conn: psycopg.Connection | None = None,
) -> dict[str, Any]:
    """Collect the manifest as a JSON-ready dict (serialise with ``json.dumps(m, indent=2)``).

    ``conn_factory(dbname)`` opens a connection we then own and close. The manifest connection goes to
    ``database`` (single-database mode) or ``postgres``; its failure, or the server-version query's, raises.
    Everything else is best-effort and recorded in ``errors``. Databases named in ``exclude_databases`` stay in
    the cluster's ``databases`` list but are not detailed (``rdsadmin`` cannot be connected to at all).
    ``tool_versions`` maps a tool name to its ``--version`` line; ``pg_dump``/``pg_basebackup`` also fill the
    reference's ``pg_dump_version``/``pg_basebackup_version``. ``extra`` goes under the top-level ``pgplakar`` key.
    Databases in ``defer`` are not detailed here (the caller reads them with :func:`database_detail` and adds them
    with :func:`add_details`). ``conn`` (to ``database`` or ``postgres``, in an open transaction of the caller's) is
    read instead of a connection of our own, and left open.
    """
    versions = {k: tool_versions[k] for k in sorted(tool_versions)}
    header: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "created_at": _now_rfc3339(),
        "connector": connector,
        "host": host,
        "port": str(port),
    }
    backup_fields: dict[str, Any] = {
        "database": database,
        "dump_format": dump_format,
        "options": _json_copy("options", dict(sorted(options.items()))) if options else None,
    }
    extra_copy = _json_copy("extra", dict(extra)) if extra else None
    errors = _Errors()
    main_db = database if database is not None else "postgres"
    t0 = time.monotonic()
    log.info("manifest: reading the cluster inventory from %s", main_db)
    if conn is None:
        conn = conn_factory(main_db)
        reading = _snapshot(conn)
    else:
        reading = _borrowed(conn)
    try:
        with reading:
            manifest = {**header, **_server_version(conn)}
            manifest["pg_dump_version"] = versions.get("pg_dump")
            manifest["pg_basebackup_version"] = versions.get("pg_basebackup")
            _collect_identity(conn, manifest, errors)
            manifest.update(backup_fields)
            _collect_inventory(conn, manifest, errors)
            targets = _detail_targets(manifest, database, exclude_databases, errors)
            for entry in targets:
                if entry["name"] == main_db:
                    _collect_database(conn, entry, errors)  # same snapshot as the cluster-level fields
    except psycopg.Error as exc:  # only the snapshot setup gets here: every section records its own errors
        raise ManifestError(f"starting the manifest transaction on {main_db}: {exc}") from exc
    # After the manifest connection is closed: one connection at a time, no long-held snapshot.
    log.info("manifest: detailing %d database(s) (schemas, relations, extensions)", len(targets))
    ticker = Ticker("manifest")  # a line per interval: a cluster may hold thousands of databases
    for n, entry in enumerate(targets, 1):
        if entry["name"] != main_db and entry["name"] not in defer:
            _collect_other(conn_factory, entry, errors)
        ticker.tick(f"{n} of {len(targets)} database(s) detailed ({entry['name']})")
    log.info("manifest: done in %.1fs (%d database(s) detailed, %d error(s))", time.monotonic() - t0, len(targets),
             len(errors.items))
    _omit_empty(manifest, ["pg_dump_version", "pg_basebackup_version", "database", "options"])
    manifest["tool_versions"] = versions
    manifest["errors"] = errors.items
    if extra_copy is not None:
        manifest["pgplakar"] = extra_copy
    return manifest
