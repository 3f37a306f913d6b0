"""Human-readable sizes for logs and summaries (``0.0 MiB`` says nothing about a 40 KiB dump)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``512 B``, ``40.0 KiB``, ``1.5 GiB``: the largest unit that keeps the number at or above 1."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
