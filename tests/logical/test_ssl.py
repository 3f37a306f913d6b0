"""Logical backup and restore over SSL against a server with a CA made in the test.

One SSL server per module (PostgreSQL 17): ``server.crt``/``server.key`` for CN/SAN ``localhost`` + IP 127.0.0.1,
``ssl_ca_file`` for client certificates, and ``pg_hba`` rules that only allow the two test roles over SSL:

- ``ssl_admin`` (superuser) with SCRAM over ``hostssl``,
- ``cert_user`` (owner of the ``shop`` database, not a superuser) with ``cert`` auth (clientcert=verify-full).

Since neither role has a non-SSL rule, every successful run below proves the tools and the in-process catalog
connections really used SSL. Every test also checks that inline PEM only ever exists as 0600 files in a 0700
``pgplakar-ssl-*`` dir that is gone afterwards (``tempfile.tempdir`` is private per test), and that no argv of any
child process (nor its ``/proc/<pid>/cmdline``) carries a password, PEM text or a temp key path.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_provider_pgplakar.pg import PgError, commands
from airflow_provider_pgplakar.pg.connect import PgConnectError
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.process import ToolFailed
from airflow_provider_pgplakar.pg.restore import logical_restore
from tests.certs import Issued, TestCA
from tests.pgservers import PgManager, PgServer

VERSION = 17
SCRAM_ROLE = "ssl_admin"
CERT_ROLE = "cert_user"
ROWS = 300
SSL_PREFIX = "pgplakar-ssl-"
SSL_ENV_VARS = ("PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT")


@dataclass
class SslSetup:
    server: PgServer
    ca: TestCA
    client: Issued  # CN=cert_user, signed by ca
    foreign_ca: TestCA  # trusted by nobody
    foreign_client: Issued  # CN=cert_user, signed by foreign_ca
    password: str = field(repr=False)  # ssl_admin's
    files: Path = field(default_factory=Path)  # client-side copies: ca.crt, client.crt, client.key (0600)
    expected: list[tuple[Any, ...]] = field(default_factory=list)  # the rows of shop.items
    _counter: int = 0

    def new_db(self, owner: str = SCRAM_ROLE) -> str:
        """A fresh empty database to restore into (restores target the same server under another name)."""
        self._counter += 1
        name = f"restored_{self._counter}"
        with self.server.connect() as c:
            c.execute(f"CREATE DATABASE {name} OWNER {owner}")
        return name

    def rows(self, db: str) -> list[tuple[Any, ...]]:
        with self.server.connect(db) as c:
            return c.execute("SELECT id, name, price FROM items ORDER BY id").fetchall()

    def secrets(self) -> list[str]:
        """Strings that must never appear in argv: the password and every private key / certificate body."""
        pems = [self.client.key_pem, self.foreign_client.key_pem, self.client.cert_pem, self.ca.cert_pem]
        return [self.password, "-----BEGIN", *(_pem_body(p) for p in pems)]


def _pem_body(pem: str) -> str:
    """A distinctive slice of the base64 body of a PEM (in case someone strips the armour lines)."""
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    return body[10:60]


def _write(path: Path, text: str, mode: int, owner: Any = None) -> None:
    path.write_text(text)
    path.chmod(mode)
    if owner is not None:
        owner.chown(path)


def _wait_for_setting(server: PgServer, name: str, value: str) -> None:
    """After pg_reload_conf(): new backends see the reloaded config (and SSL context) once the postmaster did it."""
    deadline = time.monotonic() + 15
    while True:
        with server.connect() as c:
            current = c.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]
        if current == value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is still {current!r} after reload; server log:\n{server.log_tail()}")
        time.sleep(0.05)


def _alter_system(server: PgServer, settings: dict[str, str]) -> None:
    with server.connect() as c:
        for name, value in settings.items():
            c.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        c.execute("SELECT pg_reload_conf()")
    for name, value in settings.items():
        _wait_for_setting(server, name, value)


@pytest.fixture(scope="module")
def ssl_setup(pg_manager: PgManager, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SslSetup]:
    server = pg_manager.start(VERSION)
    try:
        ca, foreign_ca = TestCA("pgplakar test CA"), TestCA("someone else's CA")
        server_cert = ca.server_cert("localhost", dns=("localhost",), ips=("127.0.0.1",))
        other_name = ca.server_cert("db.example.invalid", dns=("db.example.invalid",), ips=())
        owner = server.run_as
        data = server.datadir
        _write(data / "server.crt", server_cert.cert_pem, 0o644, owner)
        _write(data / "server.key", server_cert.key_pem, 0o600, owner)
        _write(data / "other.crt", other_name.cert_pem, 0o644, owner)
        _write(data / "other.key", other_name.key_pem, 0o600, owner)
        _write(data / "client_ca.crt", ca.cert_pem, 0o644, owner)
        _write(
            data / "pg_hba.conf",
            "# pgplakar SSL tests: the test roles over SSL only; the fixture superuser as before\n"
            "local    all  all                       scram-sha-256\n"
            f"hostssl  all  {CERT_ROLE}  127.0.0.1/32  cert clientcert=verify-full\n"
            f"hostssl  all  {SCRAM_ROLE}  127.0.0.1/32  scram-sha-256\n"
            f"host     all  {server.superuser}  127.0.0.1/32  scram-sha-256\n",
            0o600,
            owner,
        )
        _alter_system(
            server,
            {"ssl_cert_file": "server.crt", "ssl_key_file": "server.key", "ssl_ca_file": "client_ca.crt", "ssl": "on"},
        )

        password = "scram-" + secrets.token_hex(12)
        with server.connect() as c:
            c.execute(f"CREATE ROLE {SCRAM_ROLE} LOGIN SUPERUSER PASSWORD '{password}'")
            c.execute(f"CREATE ROLE {CERT_ROLE} LOGIN")  # no password at all: only the certificate logs it in
            c.execute(f"CREATE DATABASE shop OWNER {CERT_ROLE}")
        with server.connect("shop") as c:
            c.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2))")
            c.execute(f"INSERT INTO items SELECT g, 'item ' || g, g * 1.25 FROM generate_series(1, {ROWS}) g")
            c.execute(f"ALTER TABLE items OWNER TO {CERT_ROLE}")
            expected = c.execute("SELECT id, name, price FROM items ORDER BY id").fetchall()

        client = ca.client_cert(CERT_ROLE)
        foreign_client = foreign_ca.client_cert(CERT_ROLE)
        files = tmp_path_factory.mktemp("ssl-client")
        _write(files / "ca.crt", ca.cert_pem, 0o644)
        _write(files / "client.crt", client.cert_pem, 0o644)
        _write(files / "client.key", client.key_pem, 0o600)
        setup = SslSetup(server, ca, client, foreign_ca, foreign_client, password, files, expected)

        # Sanity: the server really serves our certificate and enforces SSL for the test roles.
        with psycopg.connect(
            host=server.host,
            port=server.port,
            dbname="postgres",
            user=SCRAM_ROLE,
            password=password,
            sslmode="verify-full",
            sslrootcert=str(files / "ca.crt"),
        ) as c:
            assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(
                host=server.host,
                port=server.port,
                dbname="postgres",
                user=SCRAM_ROLE,
                password=password,
                sslmode="disable",
            ).close()
        yield setup
    finally:
        pg_manager.discard(server)


# --------------------------------------------------------------------------------------------------------------------
# Spies: argv/env of every child, and every temp dir made


@dataclass
class Spawn:
    argv: list[str]
    env: dict[str, str]
    cmdline: bytes | None  # /proc/<pid>/cmdline right after exec (None when already gone)
    ssl_files: dict[str, tuple[int, int, str]]  # env var -> (file mode, parent dir mode, content) at spawn time


@dataclass
class Spy:
    tmp: Path
    spawns: list[Spawn] = field(default_factory=list)
    mkdtemps: list[str] = field(default_factory=list)

    def tool_runs(self) -> list[Spawn]:
        """Real tool runs (not the ``--version`` probes of tool discovery)."""
        return [s for s in self.spawns if "--version" not in s.argv]

    def tools(self) -> list[str]:
        return [os.path.basename(s.argv[0]) for s in self.tool_runs()]

    def ssl_dirs_left(self) -> list[str]:
        return sorted(p for p in os.listdir(self.tmp) if p.startswith(SSL_PREFIX))


def _read_cmdline(proc: Any) -> bytes | None:
    """The child's ``/proc/<pid>/cmdline``. With vfork, Popen can return before the kernel has set up the new
    image's arguments (the file reads empty for a moment), and the setpriv wrapper execs the tool a moment later,
    so retry briefly while the child is alive."""
    for _ in range(500):
        try:
            data = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            return None
        wrapper = data.split(b"\0", 1)[0].endswith(b"setpriv")  # not yet exec'd the tool (pg/process.py)
        if (data and not wrapper) or proc.poll() is not None:
            return data or None
        time.sleep(0.001)
    return None


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Spy]:
    """Private ``tempfile.tempdir`` plus wrappers around ``subprocess.Popen`` and ``tempfile.mkdtemp``."""
    private = tmp_path / "tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    result = Spy(private)
    assert result.ssl_dirs_left() == []

    real_popen = subprocess.Popen
    real_mkdtemp = tempfile.mkdtemp

    def popen(args: Any, *a: Any, **kw: Any) -> Any:
        proc = real_popen(args, *a, **kw)
        cmdline = _read_cmdline(proc)
        env = dict(kw.get("env") or {})
        files = {}
        for var in SSL_ENV_VARS:
            if var in env:
                path = Path(env[var])
                files[var] = (
                    stat.S_IMODE(path.stat().st_mode),
                    stat.S_IMODE(path.parent.stat().st_mode),
                    path.read_text(),
                )
        argv = [args] if isinstance(args, str | bytes) else [str(x) for x in args]
        if "--pdeathsig" in argv[:2]:  # the tool as started through setpriv (pg/process.py)
            argv = argv[argv.index("--") + 1:]
        result.spawns.append(Spawn(argv, env, cmdline, files))
        return proc

    def mkdtemp(*a: Any, **kw: Any) -> str:
        path = real_mkdtemp(*a, **kw)
        result.mkdtemps.append(path)
        return path

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    yield result


def _check_clean(setup: SslSetup, spy: Spy, *, inline: bool) -> None:
    """No secret in any argv or cmdline; inline PEM lived only in private temp files that are gone now."""
    assert spy.ssl_dirs_left() == [], "pgplakar-ssl-* temp dir left behind"
    ssl_dirs = [d for d in spy.mkdtemps if os.path.basename(d).startswith(SSL_PREFIX)]
    assert bool(ssl_dirs) == inline
    for d in ssl_dirs:
        assert Path(d).parent == spy.tmp and not os.path.exists(d)
    needles = setup.secrets() + ssl_dirs + [str(setup.files / "client.key")]
    for s in spy.spawns:
        text = "\0".join(s.argv)
        cmdline = (s.cmdline or b"").decode(errors="replace")
        for needle in needles:
            assert needle not in text, f"secret in argv of {s.argv[0]}"
            assert needle not in cmdline, f"secret in /proc cmdline of {s.argv[0]}"
        for var, (mode, dir_mode, content) in s.ssl_files.items():
            path = s.env[var]
            if any(path.startswith(d + os.sep) for d in ssl_dirs):
                assert (mode, dir_mode) == (0o600, 0o700), f"{var} {oct(mode)} in dir {oct(dir_mode)}"
            if var == "PGSSLKEY":
                assert mode == 0o600
                assert content == setup.client.key_pem or content == setup.foreign_client.key_pem


def _opts(setup: SslSetup, role: str, **extra: str) -> dict[str, str]:
    s = setup.server
    opts = {
        "host": s.host,
        "port": str(s.port),
        "username": role,
        "pg_bin_dir": str(s.bin_dir),
        "ssl_mode": "verify-full",
        **extra,
    }
    if role == SCRAM_ROLE and "password" not in opts:
        opts["password"] = setup.password
    return opts


def _root(setup: SslSetup, form: str) -> dict[str, str]:
    if form == "path":
        return {"ssl_root_cert": str(setup.files / "ca.crt")}
    return {"ssl_root_cert_data": setup.ca.cert_pem}


def _client(setup: SslSetup, form: str) -> dict[str, str]:
    if form == "path":
        return {"ssl_cert": str(setup.files / "client.crt"), "ssl_key": str(setup.files / "client.key")}
    if form == "inline_alias":  # the name Airflow's masker hides
        return {"ssl_cert_data": setup.client.cert_pem, "ssl_private_key_data": setup.client.key_pem}
    return {"ssl_cert_data": setup.client.cert_pem, "ssl_key_data": setup.client.key_pem}


def _backup(store: Any, opts: dict[str, str]) -> Any:
    return logical_backup(store, parse_source_options("postgres://", opts))


# --------------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("form", ["path", "inline"])
def test_verify_full_scram_backup_and_restore(ssl_setup: SslSetup, store: Any, spy: Spy, form: str) -> None:
    """1 + 2: verify-full against our CA (file path or inline PEM), SCRAM over SSL; backup, then restore."""
    opts = _opts(ssl_setup, SCRAM_ROLE, database="shop", **_root(ssl_setup, form))
    res = _backup(store, opts)
    assert res.databases == ["shop"]
    assert store.snapshot_ids() == [res.snapshot_id]
    paths = [r.path for r in store.records(res.snapshot_id)]
    assert paths == ["/manifest.json", "/00000-globals.sql", "/00001-shop.dump", "/fingerprints.json"]

    target = ssl_setup.new_db()
    ropts = _opts(ssl_setup, SCRAM_ROLE, database=target, **_root(ssl_setup, form))
    summary = logical_restore(store, res.snapshot_id, parse_restore_options("postgres://", ropts))
    assert summary.ok, summary.text()
    assert [r.status for r in summary.results] == ["restored", "restored"]
    assert ssl_setup.rows(target) == ssl_setup.expected

    tools = spy.tools()
    assert {"pg_dumpall", "pg_dump", "psql", "pg_restore"} <= set(tools)
    for s in spy.tool_runs():
        if os.path.basename(s.argv[0]) in ("pg_dumpall", "pg_dump", "psql", "pg_restore"):
            # the secret goes by environment (readable only by its owner), the CA by path
            assert s.env["PGPASSWORD"] == ssl_setup.password
            assert s.env["PGSSLMODE"] == "verify-full"
            assert s.ssl_files["PGSSLROOTCERT"][2] == ssl_setup.ca.cert_pem
    # the /proc check is not vacuous: pg_restore waits on stdin, so its cmdline was read while it ran
    restore_run = next(s for s in spy.tool_runs() if os.path.basename(s.argv[0]) == "pg_restore")
    assert restore_run.cmdline == "\0".join(restore_run.argv).encode() + b"\0"
    _check_clean(ssl_setup, spy, inline=form == "inline")


@pytest.fixture
def serving_other_name(ssl_setup: SslSetup) -> Iterator[None]:
    """The server presents a certificate (from the trusted CA) valid only for db.example.invalid."""
    _alter_system(ssl_setup.server, {"ssl_cert_file": "other.crt", "ssl_key_file": "other.key"})
    try:
        yield
    finally:
        _alter_system(ssl_setup.server, {"ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})


@pytest.mark.parametrize("form", ["path", "inline"])
def test_verify_full_wrong_host_name_fails(
    ssl_setup: SslSetup, serving_other_name: None, store: Any, spy: Spy, form: str
) -> None:
    """3: host=127.0.0.1 but the (validly signed) server certificate names another host only."""
    with pytest.raises(PgConnectError) as info:
        _backup(store, _opts(ssl_setup, SCRAM_ROLE, database="shop", **_root(ssl_setup, form)))
    message = str(info.value)
    assert f"cannot connect to 127.0.0.1:{ssl_setup.server.port}/shop as {SCRAM_ROLE}" in message
    assert "db.example.invalid" in message and "does not match host name" in message, message
    assert ssl_setup.password not in message
    assert store.snapshot_ids() == []
    assert spy.tools() == []  # refused before any tool ran
    _check_clean(ssl_setup, spy, inline=form == "inline")


def test_verify_full_wrong_root_cert_fails(ssl_setup: SslSetup, store: Any, spy: Spy) -> None:
    """3: a root certificate that did not sign the server's: certificate verification fails, nothing committed."""
    opts = _opts(ssl_setup, SCRAM_ROLE, database="shop", ssl_root_cert_data=ssl_setup.foreign_ca.cert_pem)
    with pytest.raises(PgConnectError, match="certificate verify failed") as info:
        _backup(store, opts)
    assert ssl_setup.password not in str(info.value) and "-----BEGIN" not in str(info.value)
    assert store.snapshot_ids() == []
    _check_clean(ssl_setup, spy, inline=True)


@pytest.mark.parametrize("form", ["path", "inline", "inline_alias"])
def test_client_certificate_login(ssl_setup: SslSetup, store: Any, spy: Spy, form: str) -> None:
    """4: ``cert`` auth without any password: backup as cert_user, then restore (also by certificate)."""
    opts = _opts(ssl_setup, CERT_ROLE, database="shop", **_root(ssl_setup, form), **_client(ssl_setup, form))
    assert "password" not in opts
    res = _backup(store, opts)
    assert res.databases == ["shop"]
    # not a superuser: pg_authid is unreadable, so roles are dumped without passwords (a warning says so)
    assert any("pg_authid" in w for w in res.warnings)
    dumps = [r for r in store.records(res.snapshot_id) if r.path.endswith(".dump")]
    assert [r.path for r in dumps] == ["/00001-shop.dump"]

    target = ssl_setup.new_db(owner=CERT_ROLE)
    ropts = _opts(
        ssl_setup, CERT_ROLE, database=target, no_globals="true", **_root(ssl_setup, form), **_client(ssl_setup, form)
    )
    summary = logical_restore(store, res.snapshot_id, parse_restore_options("postgres://", ropts))
    assert summary.ok, summary.text()
    assert ssl_setup.rows(target) == ssl_setup.expected

    tools = spy.tools()
    assert {"pg_dumpall", "pg_dump", "pg_restore"} <= set(tools)
    for s in spy.tool_runs():
        if os.path.basename(s.argv[0]) in ("pg_dumpall", "pg_dump", "pg_restore"):
            assert "PGPASSWORD" not in s.env
            assert s.ssl_files["PGSSLCERT"][2] == ssl_setup.client.cert_pem
            assert s.ssl_files["PGSSLKEY"][2] == ssl_setup.client.key_pem
    _check_clean(ssl_setup, spy, inline=form != "path")


def _fail_wrong_password(setup: SslSetup, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _backup(store, _opts(setup, SCRAM_ROLE, password="wrong-" + setup.password, **_root(setup, "inline")))


def _fail_foreign_client_cert(setup: SslSetup, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _backup(
        store,
        _opts(
            setup,
            CERT_ROLE,
            **_root(setup, "inline"),
            ssl_cert_data=setup.foreign_client.cert_pem,
            ssl_key_data=setup.foreign_client.key_pem,
        ),
    )


def _fail_tool_mid_backup(setup: SslSetup, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_dump fails after the globals were streamed, i.e. with the temp key in use by running tools."""
    real = commands.pg_dump
    monkeypatch.setattr(commands, "pg_dump", lambda *a, **kw: real(*a, **kw) + ["--no-such-option"])
    _backup(store, _opts(setup, CERT_ROLE, **_root(setup, "inline"), **_client(setup, "inline")))


@pytest.mark.parametrize(
    ("scenario", "error", "match"),
    [
        (_fail_wrong_password, PgConnectError, "as ssl_admin: .*password authentication failed"),
        (_fail_foreign_client_cert, PgConnectError, "as cert_user: SSL error: tlsv1 alert unknown ca"),
        (_fail_tool_mid_backup, ToolFailed, "pg_dump failed"),
    ],
    ids=["wrong-password", "foreign-client-cert", "tool-fails"],
)
def test_failed_backup_leaves_no_temp_files(
    ssl_setup: SslSetup,
    store: Any,
    spy: Spy,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Any,
    error: type[PgError],
    match: str,
) -> None:
    """5: inline PEM temp dirs are removed on failure too, and a failed backup commits nothing."""
    with pytest.raises(error, match=match) as info:
        scenario(ssl_setup, store, monkeypatch)
    for needle in ssl_setup.secrets():
        assert needle not in str(info.value)
    assert store.snapshot_ids() == []
    if scenario is _fail_tool_mid_backup:
        # the tools did run with the inline key as a private temp file
        assert any("PGSSLKEY" in s.ssl_files for s in spy.spawns)
    _check_clean(ssl_setup, spy, inline=True)
