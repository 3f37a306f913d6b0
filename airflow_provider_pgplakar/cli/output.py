"""Human tables by default, JSON for scripts; progress as a redrawn line on a terminal or JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ..store.progress import ProgressEvent
from ..store.sizes import human_bytes

__all__ = ["emit_json", "human_bytes", "progress_bar", "progress_json", "table"]


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
