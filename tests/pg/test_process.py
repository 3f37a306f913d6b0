"""pg/process.py: the process-wide cancellation, and tools that die with the task process even on SIGKILL.

The SIGKILL cases run a real parent process (a small Python program) that starts a tool the way the backup code
does (:func:`run_tool` from a worker thread, or from the main thread), then kill that parent with SIGKILL and check
that the tool is gone: with ``setpriv --pdeathsig`` and with the Python ``prctl`` wrapper used without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_pgplakar.pg import PgError
from airflow_provider_pgplakar.pg import process as process_mod
from airflow_provider_pgplakar.pg.process import (
    TaskCancelled,
    ToolFailed,
    cancel,
    cancellable,
    check_cancelled,
    reset_cancellation,
    run_tool,
    with_parent_death_signal,
)

REPO = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent("""
    import sys, threading, time
    from airflow_provider_pgplakar.pg import process
    if sys.argv[1] == "python-wrapper":
        process._setpriv = lambda: None  # as on a host without util-linux's setpriv
    def start():
        with process.run_tool(["sleep", "300"], {"PATH": "/usr/bin:/bin"}) as tool:
            print(tool.proc.pid, flush=True)
            tool.finish()
    if sys.argv[2] == "thread":
        t = threading.Thread(target=start)
        t.start()
        t.join()
    else:
        start()
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmd(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0]


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("wrapper", ["setpriv", "python-wrapper"])
@pytest.mark.parametrize("where", ["thread", "main"])
def test_tool_dies_when_its_parent_is_killed(wrapper: str, where: str) -> None:
    if wrapper == "setpriv" and process_mod._setpriv() is None:
        pytest.fail("util-linux setpriv with --pdeathsig is expected on the test host")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, wrapper, where], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), line
        tool = int(line)
        deadline = time.monotonic() + 10
        while _cmd(tool) != b"sleep" and time.monotonic() < deadline:  # the wrapper execs the tool: same pid
            time.sleep(0.02)
        assert _cmd(tool) == b"sleep" and _alive(tool)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(tool), "the tool outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_python_wrapper_refuses_to_run_after_its_parent_died(tmp_path: Path) -> None:
    """The race the wrapper closes: the parent died before prctl took effect (the tool is then not started)."""
    argv = [sys.executable, "-I", "-S", "-c", process_mod._PDEATHSIG_WRAPPER, "1", "/bin/sh", "-c",
            f"touch {tmp_path}/ran"]
    assert subprocess.run(argv, check=False).returncode == 137  # its parent is not pid 1
    assert not (tmp_path / "ran").exists()
    argv[5] = str(os.getpid())
    assert subprocess.run(argv, check=False).returncode == 0 and (tmp_path / "ran").exists()


def test_wrapped_argv() -> None:
    argv = with_parent_death_signal(["/usr/bin/pg_dump", "--dbname=x"])
    assert argv[-2:] == ["/usr/bin/pg_dump", "--dbname=x"]
    assert argv[:3] == [process_mod._setpriv(), "--pdeathsig", "KILL"]
    assert process_mod._tool_name(argv) == "pg_dump" == process_mod._tool_name(["/usr/bin/pg_dump"])
    python = [sys.executable, "-I", "-S", "-c", process_mod._PDEATHSIG_WRAPPER, str(os.getpid()), "/bin/psql"]
    assert process_mod._tool_name(python) == "psql"


def test_cancel_stops_tools_and_refuses_new_ones() -> None:
    with pytest.raises(TaskCancelled, match="the task was cancelled"):
        with cancellable():
            with run_tool(["sleep", "300"], {"PATH": "/usr/bin:/bin"}) as tool:
                threading.Timer(0.2, cancel).start()
                tool.finish()  # killed by cancel(): reported as cancelled, not "killed by signal 9"
    assert _wait_gone(tool.proc.pid)
    with pytest.raises(TaskCancelled):  # nothing starts any more
        with run_tool(["true"], {"PATH": "/usr/bin:/bin"}):
            pass
    with pytest.raises(TaskCancelled):
        check_cancelled()
    assert isinstance(TaskCancelled(), PgError)
    reset_cancellation()
    check_cancelled()
    with run_tool(["true"], {"PATH": "/usr/bin:/bin"}) as tool:
        assert tool.finish() == ""


def test_cancellable_reports_any_failure_after_cancel_as_cancelled() -> None:
    with pytest.raises(TaskCancelled) as info:
        with cancellable():
            cancel()
            raise OSError("broken pipe from a killed tool")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ToolFailed):  # without a cancel, failures are what they are
        with cancellable():
            with run_tool(["false"], {"PATH": "/usr/bin:/bin"}) as tool:
                tool.finish()


def test_cancel_from_a_signal_handler_while_starting_a_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    """cancel() runs in the main thread's signal handler, possibly while that thread is inside spawn()."""
    real_popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        cancel()  # as if SIGTERM arrived right after fork/exec, before the process was registered
        return proc

    monkeypatch.setattr(process_mod.subprocess, "Popen", popen_then_signal)
    with pytest.raises(TaskCancelled):
        with run_tool(["sleep", "300"], {"PATH": "/usr/bin:/bin"}):
            pytest.fail("the tool block must not run")
    assert not process_mod._running
