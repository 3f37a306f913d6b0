"""Running client tools: argv lists only, own process group, bounded stderr, success judged after exit.

Each tool runs in a new session (``start_new_session``) so that killing a task kills pg_dump *and* anything it
spawned; :func:`kill_all` is what an operator's ``on_kill`` calls. Stderr goes to an unlinked temp file, not a
pipe, so a chatty tool can never block on a full stderr pipe and memory stays bounded; only its tail is kept for
the error message.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from . import PgError

log = logging.getLogger(__name__)

STDERR_TAIL = 4000
_running: set[subprocess.Popen[bytes]] = set()
_connections: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def track_connection(conn: Any) -> Any:
    """Remember a psycopg connection so :func:`kill_all` can cancel its running query (e.g. a manifest query
    waiting on a lock); returns ``conn``."""
    with _lock:
        _connections.add(conn)
    return conn


class ToolFailed(PgError):
    """A client tool exited non-zero (or was killed); the message carries the tail of its stderr."""

    def __init__(self, tool: str, returncode: int, stderr: str) -> None:
        self.tool, self.returncode, self.stderr = tool, returncode, stderr
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{tool} failed ({how}){detail}")


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - STDERR_TAIL))
    text = f.read().decode("utf-8", "replace")
    return ("…" + text) if size > STDERR_TAIL else text


class Tool:
    """A started tool. Use :func:`run_tool`; read ``stdout`` (when piped), then the context exit checks status."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], stdin: int | IO[bytes] | None,
                 stdout: int | IO[bytes] | None) -> None:
        self.name = os.path.basename(argv[0])
        self._err = tempfile.TemporaryFile(prefix="pgplakar-stderr-")
        self.proc = subprocess.Popen(  # argv list, never a shell
            list(argv), env=dict(env), stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=self._err, start_new_session=True,
        )
        with _lock:
            _running.add(self.proc)

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def stderr_text(self) -> str:
        return _tail(self._err)

    def stderr_lines(self, max_len: int = 1000) -> Iterator[str]:
        """Every line the tool wrote to stderr, from the first (not only the tail), each cut to ``max_len`` bytes so
        memory stays bounded however much it wrote; valid until the ``run_tool`` block ends."""
        self._err.seek(0)
        while line := self._err.readline(max_len):
            if not line.endswith(b"\n"):  # cut: skip the rest of this line
                while (more := self._err.readline(65536)) and not more.endswith(b"\n"):
                    pass
            yield line.rstrip(b"\r\n").decode("utf-8", "replace")

    def finish(self) -> str:
        """Wait for exit; raise :class:`ToolFailed` unless it exited 0. Returns the stderr tail (warnings)."""
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        rc = self.proc.wait()
        text = self.stderr_text()
        if rc != 0:
            raise ToolFailed(self.name, rc, text)
        return text

    def kill(self) -> None:
        _killpg(self.proc)
        self.proc.wait()

    def close(self) -> None:
        with _lock:
            _running.discard(self.proc)
        self._err.close()


@contextmanager
def run_tool(argv: Sequence[str], env: Mapping[str, str], *, stdin: int | IO[bytes] | None = None,
             stdout: int | IO[bytes] | None = subprocess.PIPE) -> Iterator[Tool]:
    """Start ``argv``; on an exception inside the block the process group is killed (nothing left running)."""
    tool = Tool(argv, env, stdin, stdout)
    try:
        yield tool
    except BaseException:
        tool.kill()
        raise
    finally:
        tool.close()


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    """Cancel our running queries and kill every tool started by this process (their whole process groups): for
    ``on_kill`` and signals."""
    with _lock:
        procs = list(_running)
        conns = list(_connections)
    for c in conns:
        if not c.closed:
            try:
                c.cancel_safe(timeout=5)
            except Exception as e:  # best effort: the process group kill below still happens
                log.warning("could not cancel a running query: %s", e)
    for p in procs:
        log.warning("killing %s (pid %d) and its process group", os.path.basename(str(p.args[0])), p.pid)
        _killpg(p)


def track_process(proc: subprocess.Popen[bytes]) -> None:
    """Have :func:`kill_all` kill ``proc``'s process group too (a server started in its own session, e.g. the
    throwaway verify server of :mod:`.scratch`)."""
    with _lock:
        _running.add(proc)


def untrack_process(proc: subprocess.Popen[bytes]) -> None:
    with _lock:
        _running.discard(proc)
