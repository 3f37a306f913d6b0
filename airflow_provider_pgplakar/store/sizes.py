"""Byte counts for people: ``human_bytes(1536) == "1.5 KiB"`` (a small dump never prints as ``0.0 MiB``)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (whole bytes below 1 KiB)."""
    size = float(n)
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
