"""Fixtures for physical backup tests: a fresh store per test, option builders, and restored throwaway servers.

Restored data directories live below the session's server root (``pg_manager.base``) so that the unprivileged
server user can reach them when the tests run as root; they are chowned to that user before starting.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from airflow_provider_pgplakar.pg.options import PhysicalSourceOptions, parse_source_options
from tests.pgservers import PgManager, PgServer
from tests.store_fixtures import _fast_kdf_private_cache, store  # noqa: F401 (fixtures)


def phys_location(server: PgServer, **extra: str) -> tuple[str, dict[str, str]]:
    """A postgres+bin:// location and options for ``server`` (as the CLI would get them)."""
    opts = {"host": server.host, "port": str(server.port), "username": server.superuser,
            "password": server.password, "pg_bin_dir": str(server.bin_dir), "checkpoint": "fast", **extra}
    return "postgres+bin://", opts


def phys_opts(server: PgServer, **extra: str) -> PhysicalSourceOptions:
    opts = parse_source_options(*phys_location(server, **extra))
    assert isinstance(opts, PhysicalSourceOptions)
    return opts


def scratch_dir(manager: PgManager, name: str) -> Path:
    """A fresh path (not created) below the server root, reachable by the server's OS user."""
    return manager.base / f"{name}-{secrets.token_hex(4)}"


def make_tablespace_dir(manager: PgManager, name: str) -> Path:
    path = scratch_dir(manager, name)
    path.mkdir(mode=0o700)
    if manager.run_as:
        manager.run_as.chown(path)
    return path


def give_to_server_user(manager: PgManager, *paths: Path) -> None:
    if manager.run_as is None:
        return
    for path in paths:
        subprocess.run(["chown", "-R", f"{manager.run_as.uid}:{manager.run_as.gid}", str(path)], check=True,
                       timeout=60)


@contextmanager
def restored_server(manager: PgManager, source: PgServer, root: Path, *extra: Path) -> Iterator[PgServer]:
    """Start the data directory ``root/data`` (restored from ``source``) with ``pg_ctl`` of ``source``'s major, as
    the unprivileged server user when we are root; stop it and remove ``root`` and ``extra`` afterwards.

    ``root/sock`` holds the socket; port and socket directory are given on pg_ctl's command line (they override
    the restored postgresql.conf, which still names the source's). The superuser password is the source's
    (pg_authid is in the backup).
    """
    (root / "sock").mkdir(mode=0o700, exist_ok=True)
    give_to_server_user(manager, root, *extra)
    server = PgServer(version=source.version, bin_dir=source.bin_dir, host="127.0.0.1", port=_free_port(),
                      superuser=source.superuser, password=source.password, datadir=root / "data",
                      run_as=manager.run_as)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", HOME=str(root))
    kwargs = manager.run_as.popen_kwargs() if manager.run_as else {}

    def pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(source.bin("pg_ctl")), "-D", str(server.datadir), *args], env=env, cwd=root,
                              capture_output=True, text=True, timeout=120, check=False, **kwargs)

    started = pg_ctl("-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                     f"-p {server.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root / 'sock'}",
                     "start")
    try:
        assert started.returncode == 0, f"pg_ctl start failed: {started.stderr}\n{server.log_tail()}"
        yield server
    finally:
        pg_ctl("-m", "fast", "-w", "stop")
        for path in (root, *extra):
            shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scalar(server: PgServer, query: str, dbname: str = "postgres", params: tuple = ()) -> object:
    with server.connect(dbname) as c:
        row = c.execute(query, params or None).fetchone()
    return None if row is None else row[0]


def run_ok(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, **kw)
    name = os.path.basename(argv[0])
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


