"""CPU seconds of a benchmark's PostgreSQL server (postmaster, its reaped and live backends), from ``/proc``.

A step's server CPU shares the machine's cores with ours and the client tools', so the benchmarks add it to print
each target's CPU floor: no schedule finishes a step sooner than all its CPU seconds divided by the cores."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children of each of its threads, recursively)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces


def server_cpu(datadir: Path) -> float:
    """CPU seconds of the server of ``datadir`` so far: the postmaster with the backends it reaped (cutime,
    cstime), plus its live backends."""
    tick = os.sysconf("SC_CLK_TCK")
    postmaster = int((datadir / "postmaster.pid").read_text().split()[0])
    total = sum(int(x) for x in _stat(postmaster)[11:15])  # utime stime cutime cstime: fields 14-17
    for pid in descendants(postmaster):
        try:
            total += sum(int(x) for x in _stat(pid)[11:13])
        except OSError:
            pass  # exited between the listing and the read: its time is in the postmaster's cutime now
    return total / tick
