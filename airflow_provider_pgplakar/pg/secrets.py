"""Hand connection settings and secrets to client tools through the environment, never argv.

argv is world-readable (``ps``, ``/proc/<pid>/cmdline``) and ends up in task logs; the environment of a child is
readable only by its owner. Inline PEM data (``ssl_*_data``) is written to 0600 files inside a private 0700 temp
dir that is removed on every exit path, because libpq only takes certificates and keys as file paths.

Typical use::

    with ssl_files(opts.conn) as files:
        env = libpq_env(opts.conn, files, password=token, database="sales")
        ...  # run the tool with env (pg/process.py run_tool)
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.options import ConnOptions

__all__ = [
    "CONNECT_TIMEOUT_S", "TOOL_ENV_ALLOWED", "SslFiles", "base_tool_env", "libpq_env", "ssl_files",
]  # fmt: skip

# A firewalled host would otherwise hang a task until Airflow's own timeout; the reference uses 10 s too.
CONNECT_TIMEOUT_S = 10
APPLICATION_NAME = "pgplakar"

# (path option, inline-data option, temp file name)
_SSL_FILES = (
    ("ssl_cert", "ssl_cert_data", "cert.pem"),
    ("ssl_key", "ssl_key_data", "key.pem"),
    ("ssl_root_cert", "ssl_root_cert_data", "root.crt"),
)


@dataclass(frozen=True)
class SslFiles:
    """Absolute paths libpq should use (user-given files, or private temp copies of inline PEM data)."""

    cert: str | None = None
    key: str | None = None
    root_cert: str | None = None


def _check_user_file(option: str, path: str) -> str:
    """Fail now, naming the option, rather than with libpq's error at connect time; return an absolute path."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise OptionError(option, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(option, f"{path} is not a regular file")
    if option == "ssl_key":
        # libpq refuses keys readable by others: 0600, or 0640 when owned by root.
        mode = stat.S_IMODE(st.st_mode)
        root_ok = st.st_uid == 0 and not mode & 0o037
        if mode & 0o077 and not root_ok:
            raise OptionError(option, f"{path} has permissions {mode:04o}; libpq needs 0600 (or 0640 owned by root)")
    return os.path.abspath(path)


def _write_private(path: str, data: str) -> None:
    # O_EXCL + O_NOFOLLOW: the directory is ours and fresh, so anything already there is an attack, not a file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact anyway
        os.write(fd, data.encode("utf-8"))
    finally:
        os.close(fd)


@contextmanager
def ssl_files(conn: ConnOptions, *, tmp_root: str | None = None) -> Iterator[SslFiles]:
    """Yield the SSL file paths for ``conn``, writing inline PEM data to private temp files for the duration.

    The temp dir (0700) and its files (0600) are removed when the block exits, also on exceptions, so a private key
    never outlives the tool run. Path-form options are checked to exist (and, for the key, to be private) up front.
    """
    paths: dict[str, str | None] = {}
    tmpdir: str | None = None
    try:
        for path_key, data_key, filename in _SSL_FILES:
            path, data = getattr(conn, path_key), getattr(conn, data_key)
            if path is not None:
                paths[path_key] = _check_user_file(path_key, path)
            elif data is not None:
                if tmpdir is None:
                    tmpdir = tempfile.mkdtemp(prefix="pgplakar-ssl-", dir=tmp_root)
                    os.chmod(tmpdir, 0o700)
                target = os.path.join(tmpdir, filename)
                _write_private(target, data)
                paths[path_key] = target
        yield SslFiles(paths.get("ssl_cert"), paths.get("ssl_key"), paths.get("ssl_root_cert"))
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


# What a client tool inherits from the calling process: only what it needs to run. PATH (helpers such as
# pg_restore's child processes), the locale and TZ (messages, timestamps), HOME (libpq's ~/.pgpass and
# ~/.postgresql/ defaults) and TMPDIR. Everything else stays out: Airflow's connections and config, cloud
# credentials (AWS_CONTAINER_AUTHORIZATION_TOKEN, AWS_WEB_IDENTITY_TOKEN_FILE, ...), our passphrases and keys, and a
# worker's stray PG* variables (PGPASSWORD, PGSERVICE, PGOPTIONS, ...), which could redirect or alter a backup. An
# allowlist, because a denylist misses the next credential variable some platform invents. The libpq variables a
# tool sees are only the ones :func:`libpq_env` sets from the options.
TOOL_ENV_ALLOWED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "TMPDIR"})
TOOL_ENV_ALLOWED_PREFIXES = ("LC_",)


def base_tool_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of ``environ`` (default ``os.environ``): the environment every child process starts from
    (dump and restore tools, ``--version`` probes, pg_verifybackup, the scratch verify server)."""
    src = os.environ if environ is None else environ
    return {k: v for k, v in src.items() if k in TOOL_ENV_ALLOWED or k.startswith(TOOL_ENV_ALLOWED_PREFIXES)}


def libpq_env(
    conn: ConnOptions,
    files: SslFiles,
    *,
    password: str | None = None,
    database: str | None = None,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The full environment for a client tool: :func:`base_tool_env` of ``base_env`` (default ``os.environ``), plus
    the libpq variables of ``conn``.

    ``password`` overrides ``conn.password``; for ``postgres+aws`` it is the IAM token and is required. ``database``
    sets ``PGDATABASE`` (tools given ``--dbname`` ignore it).
    """
    if password is None:
        if conn.iam:
            raise ValueError("postgres+aws connections need the IAM token: pass password=<token>")
        password = conn.password
    env = base_tool_env(base_env)
    assert conn.ssl_mode is not None  # ConnOptions.__post_init__ resolves the default
    env.update(
        PGHOST=conn.host,
        PGPORT=str(conn.port),
        PGSSLMODE=conn.ssl_mode,
        PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S),
        PGAPPNAME=APPLICATION_NAME,
    )
    optional = {
        "PGUSER": conn.username,
        "PGPASSWORD": password,
        "PGDATABASE": database,
        "PGSSLCERT": files.cert,
        "PGSSLKEY": files.key,
        "PGSSLROOTCERT": files.root_cert,
    }
    env.update({k: v for k, v in optional.items() if v is not None})
    return env
