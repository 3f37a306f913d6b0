"""Fingerprints of a database, taken in the very MVCC snapshot its dump reads, so a verify can prove a restore.

At backup time :func:`dump_snapshot` opens a ``REPEATABLE READ READ ONLY`` transaction, exports its snapshot for
``pg_dump --snapshot`` and fingerprints the database on the same connection: concurrent writes can never make the
fingerprints and the dump disagree. A verify (:mod:`.verify`) computes the same fingerprints on the restored copy
with :func:`collect` and compares them with :func:`compare`.

Levels (the ``fingerprint`` source option):

- ``catalog`` (default): schemas, relations with kind, persistence, columns and the planner's row estimate,
  indexes, table constraints, extensions. No table is scanned.
- ``counts``: plus an exact ``count(*)`` per table (ordinary tables, partitions, populated materialized views).
- ``full``: plus an order-independent digest of every row's text (``sum(hashtextextended(row::text, 0))``: a sum,
  not an xor, so duplicate rows do not cancel), the sequences' last values, and large objects' count and digest.

Row text is made independent of the session and of the server version by fixing the settings that change output
functions (``SESSION_SETTINGS``: DateStyle, IntervalStyle, TimeZone, extra_float_digits, bytea_output,
lc_monetary). Objects that belong to an extension are left out (``CREATE
EXTENSION`` makes them, in the target's extension version); foreign tables are listed but never scanned (their rows
live elsewhere and are not in a dump).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from . import PgError
from .jobs import Stopped
from .options import FINGERPRINT_LEVELS
from .process import check_cancelled

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store

log = logging.getLogger(__name__)

FINGERPRINTS_PATH = "/fingerprints.json"
FORMAT = 1
MAX_FINGERPRINTS_BYTES = 256 * 2**20  # read back from a store: bounded
SESSION_SETTINGS = (
    ("DateStyle", "ISO, MDY"), ("IntervalStyle", "postgres"), ("TimeZone", "UTC"), ("extra_float_digits", "3"),
    ("bytea_output", "hex"), ("lc_monetary", "C"),
)
# pg_class.relkind -> the kind named in a fingerprint (also read by physical_verify.py)
RELATION_KINDS = {"r": "table", "p": "partitioned table", "m": "materialized view", "f": "foreign table", "v": "view",
          "S": "sequence"}
_SYSTEM = ("n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' "
           "AND n.nspname NOT LIKE 'pg\\_temp\\_%'")
_NOT_EXTENSION_MEMBER = ("NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = "
                         "'pg_catalog.pg_class'::regclass AND d.objid = {oid} AND d.deptype = 'e')")
_ROW = "pgplakar row"  # the alias of the whole-row reference; a column of this exact name would shadow it


class FingerprintError(PgError):
    """Fingerprints could not be taken or read back (the message names the database or the record)."""


def level_rank(level: str) -> int:
    return FINGERPRINT_LEVELS.index(level)


def apply_settings(conn: Any) -> None:
    """The settings that make row text identical on every server version (in the current transaction)."""
    for name, value in SESSION_SETTINGS:
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, value))


# -- collection ------------------------------------------------------------------------------------------------------

def collect(conn: Any, level: str, *, members: bool = False) -> dict[str, Any]:
    """Fingerprint the connected database at ``level`` (run inside the transaction whose snapshot it describes).

    ``members`` keeps objects that belong to extensions (a physical copy has them exactly as the source had)."""
    if level not in FINGERPRINT_LEVELS:
        raise ValueError(f"fingerprint level must be one of {', '.join(FINGERPRINT_LEVELS)}, got {level!r}")
    apply_settings(conn)
    out: dict[str, Any] = {"level": level}
    def not_member(oid: str, catalog: str = "pg_class") -> str:
        return "true" if members else _NOT_EXTENSION_MEMBER.replace("pg_class", catalog).format(oid=oid)

    out["schemas"] = [r[0] for r in conn.execute(
        f"SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_namespace n WHERE {_SYSTEM} AND "
        + not_member("n.oid", "pg_namespace") + " ORDER BY 1")]
    out["extensions"] = dict(conn.execute(
        "SELECT extname, extversion FROM pg_catalog.pg_extension WHERE extname <> 'plpgsql' ORDER BY 1").fetchall())
    out["relations"] = _relations(conn, not_member("c.oid"))
    out["indexes"] = [r[0] for r in conn.execute(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE {_SYSTEM} AND " + not_member("i.indrelid") + " ORDER BY 1")]
    out["constraints"] = [r[0] for r in conn.execute(
        "SELECT pg_catalog.format('%I.%I %s %s', n.nspname, c.relname, k.contype, k.conname) "
        "FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_class c ON c.oid = k.conrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE k.contype <> 'n' AND {_SYSTEM} AND " + not_member("c.oid") + " ORDER BY 1")]
    if level_rank(level) >= level_rank("counts"):
        for rel in out["relations"].values():
            check_cancelled()  # a count or digest scan per relation can take long
            if _scanned(rel):
                rows, digest = _scan(conn, rel, full=level == "full")
                rel["rows"] = rows
                if digest is not None:
                    rel["digest"] = digest
    if level == "full":
        out["sequences"] = _sequences(conn, out["relations"])
        out["large_objects"] = _large_objects(conn)
    return out


def _relations(conn: Any, not_member: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), n.nspname, c.relname, c.relkind, "
        "c.relpersistence, c.reltuples::bigint, c.relispopulated, c.relispartition "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind IN ('r', 'p', 'm', 'f', 'v', 'S') AND {_SYSTEM} AND {not_member} ORDER BY 2").fetchall()
    cols: dict[int, list[str]] = {}
    for oid, text in conn.execute(
            "SELECT a.attrelid, pg_catalog.format('%I %s', a.attname, pg_catalog.format_type(a.atttypid, "
            "a.atttypmod)) FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE a.attnum > 0 AND NOT a.attisdropped "
            f"AND c.relkind IN ('r', 'p', 'm', 'f', 'v') AND {_SYSTEM} ORDER BY a.attrelid, a.attnum"):
        cols.setdefault(oid, []).append(text)
    out: dict[str, dict[str, Any]] = {}
    for oid, name, schema, rel, kind, persistence, estimate, populated, partition in rows:
        entry: dict[str, Any] = {"kind": RELATION_KINDS[kind], "schema": schema, "name": rel}
        if persistence == "u":
            entry["unlogged"] = True
        if kind == "m" and not populated:
            entry["unpopulated"] = True
        if partition:
            entry["partition"] = True
        if kind != "S":
            entry["columns"] = cols.get(oid, [])
        if kind in ("r", "m") and estimate >= 0:
            entry["estimate"] = int(estimate)
        out[name] = entry
    return out


def _scanned(rel: dict[str, Any]) -> bool:
    return rel["kind"] in ("table", "materialized view") and not rel.get("unpopulated")


def _scan(conn: Any, rel: dict[str, Any], *, full: bool) -> tuple[int, str | None]:
    only = sql.SQL("ONLY ") if rel["kind"] == "table" else sql.SQL("")
    target = sql.SQL("{}{}.{} AS {}").format(only, sql.Identifier(rel["schema"]), sql.Identifier(rel["name"]),
                                             sql.Identifier(_ROW))
    if full:
        query = sql.SQL("SELECT count(*), coalesce(sum(pg_catalog.hashtextextended({}::text, 0)::numeric), 0)::text "
                        "FROM {}").format(sql.Identifier(_ROW), target)
    else:
        query = sql.SQL("SELECT count(*), NULL FROM {}").format(target)
    rows, digest = conn.execute(query).fetchone()
    return int(rows), digest


def _sequences(conn: Any, relations: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, rel in relations.items():
        if rel["kind"] == "sequence":
            query = sql.SQL("SELECT last_value, is_called FROM {}.{}").format(sql.Identifier(rel["schema"]),
                                                                              sql.Identifier(rel["name"]))
            last, called = conn.execute(query).fetchone()
            out[name] = [int(last), bool(called)]
    return out


def _large_objects(conn: Any) -> dict[str, Any]:
    count, digest = conn.execute(
        "SELECT count(*), coalesce(sum(pg_catalog.hashtextextended(oid::text || ':' || "
        "pg_catalog.md5(pg_catalog.lo_get(oid)), 0)::numeric), 0)::text FROM pg_catalog.pg_largeobject_metadata"
    ).fetchone()
    return {"count": int(count), "digest": digest}


# -- backup side -----------------------------------------------------------------------------------------------------

@dataclass
class DumpSnapshot:
    """What :func:`dump_snapshot` gives the backup: the snapshot ID for pg_dump (None after a fallback) and the
    fingerprints (filled when the block ends)."""

    database: str
    level: str
    snapshot: str | None = None
    fingerprints: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None
    also: Any = None  # what ``dump_snapshot(also=...)`` returned


def effective_level(level: str, *, schema_only: bool, data_only: bool) -> str:
    """A dump without data (or without schema) can only be compared on its catalog."""
    return "catalog" if schema_only or data_only else level


@contextmanager
def dump_snapshot(connect: Callable[[str], Any], database: str, level: str,
                  also: Callable[[Any], Any] | None = None) -> Iterator[DumpSnapshot]:
    """Export a snapshot of ``database`` and fingerprint it while the caller dumps it; keep the transaction open
    until both are done.

    A second connection imports the snapshot first: behind a transaction-mode pooler it lands on another backend
    and is refused, and then (as on any refusal) the dump runs without ``--snapshot`` and only the catalog is
    fingerprinted, with a warning that says so.

    The fingerprint queries run on a helper thread in the exporting transaction, i.e. in the very snapshot pg_dump
    imports whenever they run, so they overlap pg_dump's start-up and dump instead of delaying its start (at
    ``counts``/``full`` they scan every table: as long as a dump). ``fingerprints`` is filled when the block ends;
    a failure to fingerprint then fails the block. When the block itself fails, the running query is cancelled.

    ``also(conn)`` runs first on that thread, in the same transaction (the backup's manifest reads its per-database
    part there instead of on a connection of its own); what it returns is ``also`` when the block ends. It must
    leave the transaction's settings as it found them (a rolled-back savepoint).
    """
    out = DumpSnapshot(database, level)
    with connect(database) as conn:
        conn.autocommit = True  # our own BEGIN: psycopg's implicit one would ignore the isolation level
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snap = conn.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()[0]
            _probe_import(connect, database, snap)
            out.snapshot = snap
        except Stopped:  # the backup is ending (another dump failed, or an earlier try's snapshot is reused)
            raise  # not the server's refusal: no fallback, no warning
        except Exception as e:  # noqa: BLE001 - any refusal means: no shared snapshot
            conn.execute("ROLLBACK")
            out.level = "catalog"
            out.warning = (f"database {database!r}: the server refused an exported snapshot ({_one_line(e)}); "
                           "dumped without --snapshot, fingerprint=catalog only")
            log.warning("%s", out.warning)
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        log.info("%s: fingerprint=%s%s", database, out.level, f" in snapshot {out.snapshot}" if out.snapshot else "")
        collector = _Collector(conn, out.level, name=f"pgplakar-fingerprint-{database}"[:60], also=also)
        try:
            yield out
        except BaseException:
            collector.cancel()
            raise
        out.fingerprints = collector.result()
        out.also = collector.also
        out.fingerprints["snapshot"] = out.snapshot
        try:
            conn.execute("ROLLBACK")
        except psycopg.OperationalError as e:  # the dump imported the snapshot long ago; a lost session is moot
            log.info("%s: ending the exported snapshot's transaction: %s", database, _one_line(e))


class _Collector:
    """:func:`collect` on ``conn`` on its own thread (the connection is not touched by anyone else meanwhile)."""

    def __init__(self, conn: Any, level: str, name: str, also: Callable[[Any], Any] | None = None) -> None:
        self._conn = conn
        self._level = level
        self._also = also
        self.also: Any = None
        self._found: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._also is not None:
                self.also = self._also(self._conn)
            self._found = collect(self._conn, self._level)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e

    def result(self) -> dict[str, Any]:
        """The fingerprints, once collected; the collection's error if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        return self._found

    def cancel(self) -> None:
        """The caller failed: cancel the running query (again, for each next one, until the thread ends) and wait;
        the outcome no longer matters."""
        while self._thread.is_alive():
            try:
                self._conn.cancel_safe(timeout=5)
            except Exception as e:  # noqa: BLE001 - best effort: the connection is closed next anyway
                log.info("cancelling the fingerprint query: %s", _one_line(e))
                self._thread.join()
            self._thread.join(0.1)


def _probe_import(connect: Callable[[str], Any], database: str, snap: str) -> None:
    with connect(database) as probe:
        probe.autocommit = True
        probe.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        probe.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snap)))
        probe.execute("ROLLBACK")


def _one_line(e: BaseException) -> str:
    return " ".join((str(e) or type(e).__name__).split())


def encode(databases: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"format": FORMAT, "databases": databases}, indent=1, sort_keys=True).encode()


def read(store: Store, snap: Snapshot | str) -> dict[str, dict[str, Any]] | None:
    """The fingerprints recorded in a snapshot (``None`` for snapshots made before fingerprints existed)."""
    rec = next((r for r in store.records(snap) if r.path == FINGERPRINTS_PATH), None)
    if rec is None:
        return None
    size = rec.size
    if size is None or not 0 <= size <= MAX_FINGERPRINTS_BYTES:
        raise FingerprintError(f"{FINGERPRINTS_PATH}: size {size!r} is not plausible (limit "
                               f"{MAX_FINGERPRINTS_BYTES} bytes)")
    with store.open_record(rec) as src:
        data = b"".join(src.iter_chunks())
    try:
        doc = json.loads(data)
        dbs = doc["databases"]
        if doc.get("format") != FORMAT or not isinstance(dbs, dict):
            raise ValueError(f"format {doc.get('format')!r}")
        for name, db in dbs.items():
            _check_shape(name, db)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FingerprintError(f"{FINGERPRINTS_PATH}: not a fingerprint record this version reads ({e})") from None
    return dbs


def _check_shape(name: str, db: Any) -> None:
    """What the comparison relies on, checked once (a record read from a store is input like any other)."""
    if not isinstance(db, dict) or db.get("level") not in FINGERPRINT_LEVELS:
        raise ValueError(f"database {name!r}: no valid level")
    for key, kind in (("schemas", list), ("indexes", list), ("constraints", list), ("extensions", dict),
                      ("relations", dict), ("sequences", dict), ("large_objects", dict)):
        if not isinstance(db.get(key, kind()), kind):
            raise ValueError(f"database {name!r}: {key} is not a {kind.__name__}")
    for rel_name, rel in db.get("relations", {}).items():
        if not isinstance(rel, dict) or not isinstance(rel.get("kind"), str) or not isinstance(
                rel.get("columns", []), list):
            raise ValueError(f"database {name!r}: relation {rel_name!r} is malformed")
