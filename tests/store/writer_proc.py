"""Crash/concurrency harness: a child-process entry point, plus the test-side helpers both test files share.

As a script (``python writer_proc.py MODE ...``):

``cli ARGS...``
    Run the real ``pgplakar`` CLI in this process. With ``PGPLAKAR_FAILPOINT_KEYS=<prefix>`` the ``mid-upload``
    failpoint fires only for object keys under that prefix: the backends hit ``mid-upload`` on *every* put, and
    the first put of a backup is its lease, so without the filter ``mid-upload`` could never stop a pack upload.

``write LOCATION SRC [--sleep S] [--barrier DIR --parties N] [--hold-after N --release FILE] [--lock-wait S]
[--idempotency-key K] [--tag T]``
    Back up the regular files of SRC (sorted, one record per file, path ``/<relative path>``) with
    ``store.writer``. Prints ``LEASED`` on stdout once the writer holds its lease, optionally waits until N
    parties did the same (files in DIR), sleeps S seconds after each record (a slow producer), after the N-th
    record prints ``HOLDING`` and waits until FILE exists (a producer stalled mid-backup), and finally prints one
    JSON line ``{"id": ..., "already_existed": ...}``. Passphrase from ``PGPLAKAR_PASSPHRASE``; INFO logging
    on stderr (e.g. ``store busy ...; waiting`` while it waits for a lease).

``nswrite PID ARGS...``
    Run as pid 1 of a new pid namespace (``unshare --pid --fork``): burn pids until the next one is PID, then run
    ``write ARGS...`` as that pid (so the test can pick a pid that does not exist in its own namespace), and exit
    with its status.

Imported (``tests.store.writer_proc``): :class:`Child` (a subprocess whose output lines can be awaited),
data/restore helpers, and :func:`pack_census` (what ``packs/`` holds versus what the snapshots reference).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _filter_mid_upload(prefix: str) -> None:
    from airflow_provider_pgplakar.store import failpoints, s3

    real = failpoints.failpoint

    def failpoint(name: str, detail: str = "") -> None:
        if name == "mid-upload" and not detail.startswith(prefix):
            return
        real(name, detail)

    failpoints.failpoint = failpoint  # localfs imports it at call time
    s3.failpoint = failpoint  # type: ignore[attr-defined]  # s3 bound it at import


def _cli(argv: list[str]) -> int:
    prefix = os.environ.get("PGPLAKAR_FAILPOINT_KEYS")
    if prefix:
        _filter_mid_upload(prefix)
    from airflow_provider_pgplakar.cli import main

    return main(argv)


def _write(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="writer_proc.py write")
    p.add_argument("location")
    p.add_argument("src")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--barrier")
    p.add_argument("--parties", type=int, default=1)
    p.add_argument("--lock-wait", type=float, default=3600.0)
    p.add_argument("--idempotency-key")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--hold-after", type=int, help="after this many records print HOLDING and wait for --release")
    p.add_argument("--release", help="file whose appearance ends the hold")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="writer_proc: %(message)s", stream=sys.stderr)

    from airflow_provider_pgplakar.store.repo import Store

    src = Path(args.src)
    files = sorted(f for f in src.rglob("*") if f.is_file())
    st = Store.open(args.location, os.environ["PGPLAKAR_PASSPHRASE"])
    try:
        with st.writer(source={"kind": "test", "origin": str(src)}, tags=args.tag, lock_wait=args.lock_wait,
                       idempotency_key=args.idempotency_key) as w:
            print(f"LEASED pid {os.getpid()}", flush=True)
            if args.barrier:
                Path(args.barrier, str(os.getpid())).touch()
                deadline = time.monotonic() + 60
                while len(os.listdir(args.barrier)) < args.parties:
                    if time.monotonic() > deadline:
                        raise SystemExit("barrier: the other writers never arrived")
                    time.sleep(0.02)
            for n, f in enumerate(files, 1):
                with open(f, "rb") as fh:
                    w.add_stream("/" + f.relative_to(src).as_posix(), fh)
                print(f"ADDED {f.name}", flush=True)
                if args.sleep:
                    time.sleep(args.sleep)
                if n == args.hold_after:
                    print("HOLDING", flush=True)
                    deadline = time.monotonic() + 120
                    while not os.path.exists(args.release):
                        if time.monotonic() > deadline:
                            raise SystemExit("hold: never released")
                        time.sleep(0.02)
        print(json.dumps({"id": w.snapshot_id, "already_existed": w.already_existed}), flush=True)
    finally:
        st.close()
    return 0


# -- test side ---------------------------------------------------------------------------------------------------


_children: list[Child] = []


def kill_leftovers() -> None:
    """SIGKILL every child still running (a failed test must not leave a writer sleeping at a failpoint)."""
    while _children:
        child = _children.pop()
        if child.proc.poll() is None:
            child.kill()


class Child:
    """A subprocess whose stdout/stderr lines are collected by threads, so a test can await one without blocking."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        _children.append(self)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.eof = {name: False for name in self.lines}
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for t in self._readers:
            t.start()

    def _read(self, name: str) -> None:
        pipe = getattr(self.proc, name)
        for line in pipe:
            with self._cond:
                self.lines[name].append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.eof[name] = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self, name: str) -> str:
        with self._cond:
            return "\n".join(self.lines[name])

    def wait_for(self, needle: str, stream: str = "stderr", timeout: float = 60.0) -> str:
        """The first line of ``stream`` containing ``needle``; fails (after killing the child) on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[stream]:
                    if needle in line:
                        return line
                eof = self.eof[stream]
                left = deadline - time.monotonic()
                if eof or left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        self.kill()
        raise AssertionError(
            f"{needle!r} never appeared on {stream} of {self.argv[-3:]} (rc={self.proc.returncode}):\n"
            f"stdout: {self.text('stdout')[-2000:]}\nstderr: {self.text('stderr')[-2000:]}"
        )

    def kill(self) -> None:
        """SIGKILL and reap: a zombie would still answer ``kill(pid, 0)`` and keep its lease looking alive."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for t in self._readers:
            t.join(timeout=5)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            tail = self.text("stderr")[-2000:]
            raise AssertionError(f"{self.argv[-3:]} did not finish in {timeout}s:\n{tail}") from None
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def json_result(self) -> dict[str, Any]:
        """The JSON document on stdout (``pgplakar --json`` output), or else its last JSON line (``write`` mode)."""
        try:
            return json.loads(self.text("stdout"))
        except ValueError:
            pass
        for line in reversed(self.lines["stdout"]):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no JSON on stdout:\n{self.text('stdout')}\nstderr: {self.text('stderr')[-2000:]}")


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment (fast KDF, private cache dir, fake AWS credentials) plus the store passphrase."""
    from tests.store.conftest import PASSPHRASE

    env = {k: v for k, v in os.environ.items() if k not in ("PGPLAKAR_FAILPOINT", "PGPLAKAR_FAILPOINT_KEYS")}
    env["PGPLAKAR_PASSPHRASE"] = PASSPHRASE
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> Child:
    """``pgplakar ARGS`` in a child process (through this script, see ``cli`` mode)."""
    return Child([sys.executable, str(HERE), "cli", *args], child_env(**env))


def writer(location: str, src: Path, *args: str, **env: str) -> Child:
    return Child([sys.executable, str(HERE), "write", location, str(src), *args], child_env(**env))


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write ``{"/rel/path": bytes}`` below ``root``; returns the mapping (the expected restore)."""
    for rel, data in files.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return dict(files)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {"/" + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def restore_tree(store: Any, snap_id: str, dest: Path) -> dict[str, bytes]:
    """Restore a whole snapshot with the real restore path and return the files written, by snapshot path."""
    from airflow_provider_pgplakar.store import files

    files.restore_records(store, store.records(snap_id), dest)
    return tree_bytes(dest)


def assert_restores(store: Any, snap_id: str, expected: dict[str, bytes], dest: Path) -> None:
    got = restore_tree(store, snap_id, dest)
    assert sorted(got) == sorted(expected), f"snapshot {snap_id[:8]}: restored paths differ"
    for path, data in expected.items():
        assert got[path] == data, f"snapshot {snap_id[:8]}: {path} restored with different bytes"


def live_blobs(store: Any) -> set[bytes]:
    """Every blob ID any committed snapshot references (manifest leaves, chunk lists, data chunks)."""
    from airflow_provider_pgplakar.store.reader import chunk_refs

    live: set[bytes] = set()
    for sid in store.snapshot_ids():
        snap = store.load_snapshot(sid)
        live.update(leaf for leaf, _n in snap.header["manifest"]["leaves"])
        for rec in store.records(snap):
            live.update(rec.chunk_list_ids())
            if rec.kind == "f":
                live.update(b for b, _raw in chunk_refs(store, rec))
    return live


@dataclass
class Census:
    packs: int  # listed under packs/
    bytes: int  # their total size
    indexed: int  # packs index/ lists
    unindexed: int  # listed but not indexed (orphans)
    missing: int  # indexed but not listed
    live_missing: int  # referenced blobs found in no pack header
    dead_bytes: int  # stored blob bytes no snapshot references (and duplicate copies of referenced ones)
    worst_dead_fraction: float


def pack_census(store: Any) -> Census:
    """Read every pack header and account each stored blob as live (the indexed copy of a referenced blob) or dead."""
    from airflow_provider_pgplakar.store.pack import parse_pack

    listed = {o.key.rsplit("/", 1)[-1]: (o.key, o.size) for o in store.backend.list("packs/")}
    store.sync_index()
    indexed = {row[0] for row in store.cache.packs()}
    live = live_blobs(store)
    seen: set[bytes] = set()
    dead = 0
    worst = 0.0
    for pid, (key, size) in sorted(listed.items()):
        _salt, entries = parse_pack(store.keys, store.backend.get(key), key)
        pack_dead = 0
        for e in entries:
            # a live blob stored twice (concurrent writers) is live only where the index points (the copy the
            # store reads and prune keeps); any other copy, or an unindexed one, is dead
            loc = store.cache.lookup(e.blob_id) if e.blob_id in live else None
            if loc is not None and loc.pack_id == pid and e.blob_id not in seen:
                seen.add(e.blob_id)
            else:
                pack_dead += e.length
        dead += pack_dead
        worst = max(worst, pack_dead / size)
    return Census(
        packs=len(listed), bytes=sum(s for _k, s in listed.values()), indexed=len(indexed),
        unindexed=len(set(listed) - indexed), missing=len(indexed - set(listed)), live_missing=len(live - seen),
        dead_bytes=dead, worst_dead_fraction=worst,
    )


def lease_count(store: Any) -> int:
    """Leases in the store, not counting the read lease ``store`` itself holds (taken by its first read)."""
    own = store.leases.read.key if store.leases.read is not None else None
    return sum(1 for o in store.backend.list("locks/") if o.key != own)


def _nswrite(argv: list[str]) -> int:
    target = int(argv[0])
    while True:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        if pid >= target - 1:
            break
    child = os.fork()
    if child == 0:
        os.execv(sys.executable, [sys.executable, str(HERE), "write", *argv[1:]])
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def unshare_argv() -> list[str]:
    """A new pid (and user) namespace whose processes die with it; same host name, network and file system."""
    import shutil

    tool = shutil.which("unshare")
    assert tool, "unshare (util-linux) is needed for the pid-namespace tests"
    return [tool, "--pid", "--fork", "--kill-child", "--user", "--map-root-user"]


def free_pid() -> int:
    """A pid (below 1000) that no process of this pid namespace has: a writer with that pid in another namespace
    looks dead to a host + pid check."""
    for pid in range(300, 1000):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid below 1000")


def ns_writer(location: str, src: Path, *args: str, **env: str) -> tuple[Child, int]:
    """``write`` as pid ``free_pid()`` of a new pid namespace; returns the child and that pid."""
    pid = free_pid()
    argv = [*unshare_argv(), sys.executable, str(HERE), "nswrite", str(pid), location, str(src), *args]
    return Child(argv, child_env(**env)), pid


def main() -> int:
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "nswrite":
        return _nswrite(rest)
    if mode == "cli":
        return _cli(rest)
    if mode == "write":
        return _write(rest)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
