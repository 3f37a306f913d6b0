"""Running client tools: argv lists only, own process group, bounded stderr, success judged after exit; and the
process-wide cancellation of a task.

Each tool runs in a new session (``start_new_session``) so that killing a task kills pg_dump *and* anything it
spawned. Stderr goes to an unlinked temp file, not a pipe, so a chatty tool can never block on a full stderr pipe
and memory stays bounded; only its tail is kept for the error message.

Cancellation: :func:`cancel` (an operator's ``on_kill``, the CLI's SIGTERM handler) sets a process-wide flag, kills
every tool's process group and cancels running queries. Every phase calls :func:`check_cancelled` before it starts
a query, a tool, the next database or a commit, so a cancelled task stops instead of going on with the next
database, and a cancelled backup never commits; the error says the task was cancelled (:class:`TaskCancelled`),
not "killed by signal 9". Airflow's task runner calls ``on_kill`` from its SIGTERM handler and then *returns* to
the running code, so the flag, not an exception, is what stops it.

Tools also die when the task process dies, even by SIGKILL (the supervisor's escalation, the OOM killer): each is
started through ``setpriv --pdeathsig KILL`` (util-linux) or, without it, a tiny Python exec wrapper calling
``prctl(PR_SET_PDEATHSIG)``. The kernel sends that signal when the *thread* that forked the tool exits, so a tool
must be waited for by the thread that started it (what :func:`run_tool`'s block does).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from . import PgError

log = logging.getLogger(__name__)

STDERR_TAIL = 4000
CANCELLED = "the task was cancelled (Airflow on_kill or SIGTERM): its running tools and queries were stopped"
_running: set[subprocess.Popen[Any]] = set()
_connections: weakref.WeakSet[Any] = weakref.WeakSet()
# Re-entrant: cancel() runs in a signal handler, possibly while the same (main) thread holds the lock.
_lock = threading.RLock()
_cancelled = threading.Event()


class TaskCancelled(PgError):
    """The task was cancelled (:func:`cancel`): nothing further runs, and a backup commits nothing."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(CANCELLED + (f" ({detail})" if detail else ""))


def cancel() -> None:
    """Cancel this process's task: set the flag every phase checks, kill every tool, cancel running queries.
    Safe from a signal handler and from another thread; idempotent."""
    _cancelled.set()
    kill_all()


def cancelled() -> bool:
    return _cancelled.is_set()


def check_cancelled() -> None:
    """Raise :class:`TaskCancelled` if :func:`cancel` was called: call before each query, tool, database, commit.
    Also runs this thread's :func:`also_checking` check (a backup's ``Stopper``: another part of it failed)."""
    if _cancelled.is_set():
        raise TaskCancelled()
    check = getattr(_thread_checks, "check", None)
    if check is not None:
        check()


_thread_checks = threading.local()


@contextmanager
def also_checking(check: Callable[[], None]) -> Iterator[None]:
    """While the block runs on this thread, :func:`check_cancelled` also calls ``check``, which raises to stop the
    work (e.g. the manifest beside a backup's dumps, whose sections go on after a cancelled query otherwise)."""
    previous = getattr(_thread_checks, "check", None)
    _thread_checks.check = check
    try:
        yield
    finally:
        _thread_checks.check = previous


def reset_cancellation() -> None:
    """Clear the flag (a new task in this process; tests)."""
    _cancelled.clear()


@contextmanager
def cancellable() -> Iterator[None]:
    """The body of one task (an operator's ``execute``, a CLI command): starts uncancelled, and any failure after a
    :func:`cancel` (a killed tool, a cancelled query, a closed pipe) is reported as :class:`TaskCancelled`."""
    reset_cancellation()
    try:
        yield
    except TaskCancelled:
        raise
    except Exception as e:
        if _cancelled.is_set():
            raise TaskCancelled() from e
        raise


# Sets the parent-death signal, checks that the parent did not die before that, then execs the tool. argv[1] is
# the pid of the parent process; argv[2:] the tool's argv. PR_SET_PDEATHSIG is 1.
_PDEATHSIG_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "if ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL,0,0,0)!=0:sys.exit('prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid()!=int(sys.argv[1]):os._exit(137)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


@functools.cache
def _setpriv() -> str | None:
    """``setpriv`` if it exists and knows ``--pdeathsig`` (util-linux 2.33+), else None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        ok = subprocess.run([path, "--pdeathsig", "KILL", "--", "true"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=10, check=False, env={"PATH": os.defpath}).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return path if ok else None


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that the tool gets SIGKILL when the thread that starts it dies (see the module doc)."""
    setpriv = _setpriv()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _PDEATHSIG_WRAPPER, str(os.getpid()), *argv]


def _tool_name(args: Any) -> str:
    """The tool's name in the argv of a :func:`spawn`, not the wrapper's."""
    argv = [str(a) for a in args]
    start = argv.index(str(os.getpid())) + 1 if _PDEATHSIG_WRAPPER in argv else (
        argv.index("--") + 1 if "--pdeathsig" in argv[:2] else 0)
    return os.path.basename(argv[start]) if start < len(argv) else os.path.basename(argv[0])


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` (never a shell) in its own session with the parent-death signal, registered for
    :func:`kill_all`; refused once the task is cancelled. Untrack it with :func:`untrack_process` when done."""
    with _lock:  # cancel() from another thread either sees the process in _running or we see its flag
        check_cancelled()
        proc = subprocess.Popen(with_parent_death_signal(argv), start_new_session=True, **popen_kwargs)
        _running.add(proc)
    if _cancelled.is_set():  # cancelled by a signal handler of this very thread while it was starting
        _killpg(proc)
        proc.wait()
        untrack_process(proc)
        raise TaskCancelled()
    return proc


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
        try:
            self.proc = spawn(
                argv, env=dict(env), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=self._err,
            )
        except BaseException:
            self._err.close()
            raise

    @property
    def stdout(self) -> io.BufferedReader:
        assert isinstance(self.proc.stdout, io.BufferedReader)  # piped with Popen's default buffering
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
            if _cancelled.is_set():
                raise TaskCancelled(f"{self.name} stopped") from ToolFailed(self.name, rc, text)
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


def _killpg(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    """Cancel our running queries and kill every tool started by this process (their whole process groups); see
    :func:`cancel`, which also stops what would start next."""
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
        log.warning("killing %s (pid %d) and its process group", _tool_name(p.args), p.pid)
        _killpg(p)


def untrack_process(proc: subprocess.Popen[Any]) -> None:
    with _lock:
        _running.discard(proc)
