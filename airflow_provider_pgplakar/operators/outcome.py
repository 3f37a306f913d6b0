"""What a backup task leaves behind besides its snapshot ID: the ``stats`` XCom and Asset events.

The return value stays the snapshot ID (``.output`` chaining is unchanged); a one-screen summary goes to the task log
and, as a dict, to the second XCom ``stats``. Each backed-up source is an Airflow Asset, emitted through the alias
:data:`BACKUPS_ALIAS` (the operators declare the alias as an outlet at parse time; the concrete sources are known
only when the task runs):

- logical: ``pgplakar://HOST:PORT/DATABASE``, one per database in the snapshot;
- physical: ``pgplakar+bin://HOST:PORT/``, one per cluster.

Host and database are percent-encoded (a unix-socket directory becomes ``%2Fvar%2Frun%2Fpostgresql``). The event's
``extra`` holds the snapshot ID, the store location, bytes, new bytes stored and the duration; nothing secret.
Stats are read back from the committed snapshot header, so a retry that reuses an earlier try's snapshot reports
the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..pg.session import database_from_path
from ..store.sizes import human_bytes

if TYPE_CHECKING:
    from ..store.repo import Store

BACKUPS_ALIAS = "pgplakar-backups"
LOGICAL_SCHEME = "pgplakar"
PHYSICAL_SCHEME = "pgplakar+bin"


def source_uri(scheme: str, host: str, port: int, database: str | None = None) -> str:
    """The Asset URI of a backed-up source (see the module docstring)."""
    netloc = f"[{host}]" if ":" in host else quote(host, safe="")
    return f"{scheme}://{netloc}:{port}/{quote(database, safe='') if database else ''}"


def backup_stats(store: Store, snapshot_id: str) -> dict[str, Any]:
    """The ``stats`` XCom of a backup: totals from the snapshot header, one row per dump record."""
    snap = store.load_snapshot(snapshot_id)
    header = snap.header
    totals = header.get("stats") or {}
    meta = header.get("meta") or {}
    seconds = meta.get("seconds") or {}
    databases = [
        {"database": rec.meta.get("database") or database_from_path(rec.path), "bytes": rec.size or 0,
         "seconds": seconds.get(rec.path)}
        for rec in store.records(snap) if rec.meta.get("type") == "dump"
    ]
    return {
        "snapshot_id": snapshot_id, "store": store.location, "kind": (header.get("source") or {}).get("kind"),
        "bytes": totals.get("bytes", 0), "new_bytes": totals.get("new_raw_bytes", 0),
        "new_stored_bytes": totals.get("new_stored_bytes", 0), "records": totals.get("records", 0),
        "duration_s": header.get("duration_s"), "databases": databases,
        "skipped_databases": list(meta.get("skipped_databases") or []),
    }


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """A one-screen summary of :func:`backup_stats` for the task log."""
    lines = [f"snapshot {stats['snapshot_id']} ({stats['kind']}) in {stats['store']}: "
             f"{human_bytes(stats['bytes'])}, {human_bytes(stats['new_bytes'])} new "
             f"({human_bytes(stats['new_stored_bytes'])} stored) in {stats['duration_s']:.1f} s"]
    for row in stats["databases"]:
        took = f" in {row['seconds']:.1f} s" if row.get("seconds") is not None else ""
        lines.append(f"  {row['database']}: {human_bytes(row['bytes'])}{took}")
    for name in stats["skipped_databases"]:
        lines.append(f"  {name}: skipped (dropped during the backup)")
    return lines


def report(context: Any, task_log: Any, stats: dict[str, Any], uris: list[str]) -> None:
    """Log the summary, push it as the ``stats`` XCom and emit one Asset event per source URI."""
    for line in summary_lines(stats):
        task_log.info("%s", line)
    ti = context.get("ti")
    if ti is not None and hasattr(ti, "xcom_push"):
        ti.xcom_push(key="stats", value=stats)
    events = context.get("outlet_events")
    if events is None or not uris:
        return
    from airflow.sdk import Asset, AssetAlias

    by_db = {row["database"]: row["bytes"] for row in stats["databases"]}
    for uri in uris:
        extra = {"snapshot_id": stats["snapshot_id"], "store": stats["store"], "kind": stats["kind"],
                 "bytes": stats["bytes"], "new_bytes": stats["new_bytes"], "duration_s": stats["duration_s"]}
        database = uri.rsplit("/", 1)[-1]
        if database:
            from urllib.parse import unquote

            extra["database"] = unquote(database)
            extra["database_bytes"] = by_db.get(unquote(database), 0)
        events[AssetAlias(BACKUPS_ALIAS)].add(Asset(uri), extra=extra)
