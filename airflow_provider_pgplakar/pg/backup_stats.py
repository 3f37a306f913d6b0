"""What a logical backup's snapshot says per database: size, new bytes stored, time; for the Airflow task's summary
and ``stats`` XCom (operators/outcome.py) and the CLI's backup summary (cli/commands.py).

Read back from the committed snapshot (records and the header's ``meta``: docs/format.md §6.4), so a retry that
reuses an earlier try's snapshot reports that snapshot's numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store.sizes import human_bytes
from .session import database_from_path

if TYPE_CHECKING:
    from ..store.repo import Snapshot, Store


def database_stats(store: Store, snap: Snapshot | str) -> list[dict[str, Any]]:
    """One row per dump record of a logical snapshot (``snap``: a Snapshot or an ID): ``database``,
    ``bytes`` (the dump's size), ``new_bytes`` and ``new_stored_bytes`` (what the dump added to the store, plaintext
    and packed; docs/format.md §6.4) and ``seconds`` (how long pg_dump ran); None where an older snapshot has no
    figure."""
    snap = store.load_snapshot(snap) if isinstance(snap, str) else snap
    meta = snap.header.get("meta") or {}
    seconds, raw, stored = (meta.get(k) or {} for k in ("seconds", "new_raw_bytes", "new_stored_bytes"))
    return [
        {"database": rec.meta.get("database") or database_from_path(rec.path), "bytes": rec.size or 0,
         "new_bytes": raw.get(rec.path), "new_stored_bytes": stored.get(rec.path), "seconds": seconds.get(rec.path)}
        for rec in store.records(snap) if rec.meta.get("type") == "dump"
    ]


def database_line(row: dict[str, Any]) -> str:
    """``3.0 GiB, 40.0 KiB new (12.0 KiB stored) in 12.3 s`` for a row of :func:`database_stats`
    (what an older snapshot lacks is left out)."""
    text = human_bytes(row["bytes"])
    if row.get("new_bytes") is not None:
        text += f", {human_bytes(row['new_bytes'])} new"
        if row.get("new_stored_bytes") is not None:
            text += f" ({human_bytes(row['new_stored_bytes'])} stored)"
    if row.get("seconds") is not None:
        text += f" in {row['seconds']:.1f} s"
    return text
