"""Where a running backup waits (not a test): sample its threads' states from outside, with the server's walsender.

    .venv/bin/python bench/thread_states.py PID [--interval 0.003]

PID: the process running a physical backup (e.g. ``bench/physical_bench.py``, or ``pgplakar backup``). Sampling
starts once a ``walsender`` process appears and stops when it or PID exits. Each sample reads
``/proc/PID/task/*/stat`` (state ``R`` = running or waiting for a CPU) and, for a thread that sleeps, its kernel
``wchan`` (``futex_wait*``: a lock, the GIL, a semaphore or a queue; ``poll``/``select``: the socket), and the same
for the walsender (``do_epoll_wait``: it waits for us to read the socket). Nothing runs inside the backup, so the
figures are not bent by instrumentation; the cost is this process's own CPU.

Prints the share of samples by number of runnable threads (ours + walsender; fewer than 2 runnable on 2 cores is
a core left idle on a quiet machine), the most common combinations, and a 0.2 s timeline of the main thread's and
the other threads' runnable shares. docs/benchmarks.md cites a run (issue 13 §3).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time


def _state(path: str) -> str:
    with open(f"{path}/stat") as f:
        stat = f.read()
    state = stat[stat.rindex(")") + 2]
    if state == "R":
        return "R"
    try:
        with open(f"{path}/wchan") as f:
            return (f.read() or "?")[:24]
    except OSError:
        return "?"


def _walsender() -> str | None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"walsender" in f.read():
                        return pid
            except OSError:
                continue
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pid")
    ap.add_argument("--interval", type=float, default=0.003)
    args = ap.parse_args(argv)
    pid = args.pid
    wal = None
    while wal is None and os.path.exists(f"/proc/{pid}"):
        wal = _walsender()
        time.sleep(0.005)
    runnable: collections.Counter[int] = collections.Counter()
    combos: collections.Counter[tuple[str, str, str]] = collections.Counter()
    timeline: dict[int, list[tuple[bool, int]]] = collections.defaultdict(list)
    t0 = time.perf_counter()
    while wal is not None and os.path.exists(f"/proc/{pid}") and os.path.exists(f"/proc/{wal}"):
        try:
            states = {t: _state(f"/proc/{pid}/task/{t}") for t in os.listdir(f"/proc/{pid}/task")}
            ws = _state(f"/proc/{wal}")
        except OSError:
            continue  # a thread ended between the listing and the read
        main_state = states.pop(pid, "?")
        others = sum(v == "R" for v in states.values())
        runnable[others + (main_state == "R") + (ws == "R")] += 1
        combos[(f"main={main_state}", f"others_runnable={others}", f"walsender={ws}")] += 1
        timeline[int((time.perf_counter() - t0) * 5)].append((main_state == "R", others))
        time.sleep(args.interval)
    n = sum(runnable.values())
    if not n:
        print("no samples (no walsender seen while PID ran)", file=sys.stderr)
        return 1
    print(f"{n} samples; runnable threads (ours + walsender): "
          + ", ".join(f"{k}: {v / n:.0%}" for k, v in sorted(runnable.items())))
    for combo, count in combos.most_common(12):
        print(f"  {count / n:6.1%}  {' '.join(combo)}")
    for bucket in sorted(timeline):
        xs = timeline[bucket]
        print(f"  t={bucket / 5:5.1f} s  main runnable {sum(m for m, _ in xs) / len(xs):4.0%}  "
              f"other threads runnable {sum(o for _, o in xs) / len(xs):4.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
