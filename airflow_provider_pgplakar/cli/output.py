"""Human tables by default, JSON for scripts; progress as a redrawn line on a terminal or JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ..store.progress import ProgressEvent
from ..store.sizes import human_bytes

__all__ = ["emit_json", "human_bytes", "progress_bar", "progress_json", "snapshot_rows", "table"]


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=_default)
    sys.stdout.write("\n")


def _default(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    return str(o)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    print(line(headers))
    for r in cells:
        print(line(r))


def progress_bar(event: ProgressEvent) -> None:
    """One line on stderr, redrawn in place; the final report of an operation ends it."""
    text = event.text()
    width = 20
    if event.total and not event.waiting:
        filled = min(width, int(width * event.done / event.total))
        text = f"[{'#' * filled}{'.' * (width - filled)}] {text}"
    sys.stderr.write(f"\r\x1b[K{text}" + ("\n" if event.final else ""))
    sys.stderr.flush()


def progress_json(event: ProgressEvent) -> None:
    """One JSON object per line on stderr (stdout keeps the command's own JSON result)."""
    sys.stderr.write(json.dumps({"progress": event.as_dict()}, sort_keys=True) + "\n")
    sys.stderr.flush()


def snapshot_rows(header: dict[str, Any]) -> list[tuple[str, str]]:
    """A snapshot header as (label, sentence) rows for people: sizes in units, lists joined, no Python reprs.
    Fields this view does not know (a newer writer's) still show, in compact JSON (``--json`` has everything)."""
    h = dict(header)
    rows: list[tuple[str, str]] = [("id", str(h.pop("id", "")))]
    start, end, took = h.pop("time_start", ""), h.pop("time_end", ""), h.pop("duration_s", None)
    rows.append(("time", f"{_when(start)} to {_when(end)}" + (f" ({took} s)" if took is not None else "")))
    source = dict(h.pop("source", None) or {})
    kind, origin = source.pop("kind", "?"), source.pop("origin", "")
    rows.append(("source", " ".join(filter(None, [str(kind), str(origin), _pairs(source)]))))
    host, user, pid = h.pop("host", "?"), h.pop("user", "?"), h.pop("pid", "?")
    rows.append(("made by", f"{h.pop('tool', '?')} on {host} (user {user}, pid {pid}, Python {h.pop('python', '?')}, "
                            f"{h.pop('platform', '?')})"))
    rows.append(("tags", ", ".join(map(str, h.pop("tags", None) or [])) or "-"))
    rows.append(("labels", _pairs(h.pop("labels", None) or {}) or "-"))
    stats = dict(h.pop("stats", None) or {})
    if stats:
        errors = stats.pop("errors", 0)
        rows.append(("contents", f"{stats.pop('records', 0)} records, {human_bytes(stats.pop('bytes', 0))} in "
                                 f"{stats.pop('chunks', 0)} chunks, {errors} record error(s)"))
        new_raw = human_bytes(stats.pop("new_raw_bytes", 0))
        rows.append(("new data", f"{stats.pop('new_chunks', 0)} new chunks, {new_raw} before compression, "
                                 f"{human_bytes(stats.pop('new_stored_bytes', 0))} stored in "
                                 f"{stats.pop('packs', 0)} pack(s)"))
        if stats:
            rows.append(("stats", _compact(stats)))
    for key, value in sorted((h.pop("meta", None) or {}).items()):
        rows.append((f"meta {key}", _compact(value)))
    segments = h.pop("index_segments", None) or []
    rows.append(("index", f"{len(segments)} segment(s)"))
    rows.append(("idempotent", "yes (made with an idempotency key)" if h.pop("idempotency", False) else "no"))
    rows.append(("digest", str(h.pop("digest", ""))))
    h.pop("repo", None)
    h.pop("v", None)
    rows.extend((key, _compact(value)) for key, value in sorted(h.items()))
    return rows


def _when(iso: str) -> str:
    return iso[:19].replace("T", " ") + (" UTC" if iso.endswith("+00:00") else "") if iso else "?"


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_compact(v)}" for k, v in sorted(d.items()))


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(map(str, value)) or "-"
    return json.dumps(value, sort_keys=True, default=_default, separators=(", ", ": "))
