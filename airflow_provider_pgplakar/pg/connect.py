"""In-process psycopg connections for the small catalog queries (manifest, database list, pg_authid probe).

Parameters go to ``psycopg.connect`` as keywords, never as a DSN string we format ourselves, so nothing we log or
raise ever holds a conninfo with the password. libpq errors name host and port but not the password; we still
redact it from every message we raise, since a password can legitimately equal a user or database name.

Settings mirror :func:`.secrets.libpq_env` (the tools' environment): same timeout, application name, SSL files,
and the IAM token passed as ``password`` for ``postgres+aws``. The tools get an environment without the worker's
``PG*`` variables; in-process connections cannot (libpq reads ``os.environ`` itself, and changing it in a threaded
worker is unsafe), so :func:`connect_params` passes libpq's compiled default for every keyword whose variable is
set and that we do not set ourselves: a worker's ``PGOPTIONS``, ``PGTARGETSESSIONATTRS`` or ``PGHOSTADDR`` cannot
change where or how we connect. ``PGSERVICE`` cannot be neutralised that way (an empty service name is an error
in libpq); explicit keywords still win over a service file's.
"""

from __future__ import annotations

import os
import re
from functools import cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from airflow_provider_pgplakar.pg import REDACTED, PgError
from airflow_provider_pgplakar.pg.options import ConnOptions
from airflow_provider_pgplakar.pg.process import cancelled, check_cancelled, track_connection
from airflow_provider_pgplakar.pg.secrets import APPLICATION_NAME, CONNECT_TIMEOUT_S, SslFiles

__all__ = ["PgConnectError", "can_read_pg_authid", "connect", "connect_params", "list_databases", "server_version_num"]

# libpq prefixes each attempt (one per address, and a non-SSL retry under sslmode=prefer/allow) with where it went:
# 'connection to server at "h" (addr), port 5432 failed: '. Our message already says where, so only the reasons
# are kept, each once.
_ATTEMPT_RE = re.compile(r"connection to server (?:at|on) [^\n]*?failed:")


class PgConnectError(PgError):
    """A connection could not be opened; the message names ``host:port/db`` and the user, never the password."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# Keywords without a compiled default whose empty value libpq reads as "not set" (checked in libpq's sources).
_EMPTY_IS_UNSET = frozenset({"hostaddr", "passfile", "client_encoding", "sslcrl", "sslcrldir", "requirepeer",
                             "options"})
_NOT_NEUTRALISED = frozenset({"service"})


@cache
def _env_defaults() -> tuple[tuple[str, str, str], ...]:
    """(keyword, environment variable, value that undoes it) for the libpq keywords we can pin."""
    out = []
    for opt in psycopg.pq.Conninfo.get_defaults():
        keyword = opt.keyword.decode()
        if opt.envvar is None or keyword in _NOT_NEUTRALISED:
            continue
        if opt.compiled is not None:
            out.append((keyword, opt.envvar.decode(), opt.compiled.decode()))
        elif keyword in _EMPTY_IS_UNSET:
            out.append((keyword, opt.envvar.decode(), ""))
    return tuple(out)


def connect_params(
    conn: ConnOptions, ssl: SslFiles, dbname: str, *, password: str | None = None
) -> dict[str, str | int]:
    """The libpq keywords for ``dbname``; ``password`` overrides ``conn.password`` (the IAM token for aws)."""
    if password is None:
        if conn.iam:
            raise ValueError("postgres+aws connections need the IAM token: pass password=<token>")
        password = conn.password
    params: dict[str, str | int | None] = {
        "host": conn.host,
        "port": conn.port,
        "dbname": dbname,
        "user": conn.username,
        "password": password,
        "sslmode": conn.ssl_mode,
        "sslcert": ssl.cert,
        "sslkey": ssl.key,
        "sslrootcert": ssl.root_cert,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": APPLICATION_NAME,
    }
    ours = {k: v for k, v in params.items() if v is not None}
    for keyword, envvar, neutral in _env_defaults():
        if keyword not in ours and os.environ.get(envvar):
            ours[keyword] = neutral
    return ours


def _reason(exc: BaseException) -> str:
    """Every attempt's reason (server message with DETAIL/HINT) on one line, without libpq's location prefixes."""
    reasons: list[str] = []
    for part in _ATTEMPT_RE.split(str(exc)):
        text = re.sub(r"\s+", " ", part).strip().removeprefix("connection failed:").strip()
        if text and text not in reasons:
            reasons.append(text)
    return "; ".join(reasons) or type(exc).__name__


def connect(
    conn: ConnOptions, ssl: SslFiles, dbname: str, *, password: str | None = None, **kw: Any
) -> psycopg.Connection:
    """Open a psycopg connection to ``dbname``; ``kw`` (e.g. ``autocommit=True``) go to ``psycopg.connect`` and win.

    Any psycopg failure (network, auth, a bad keyword) becomes :class:`PgConnectError` with the original exception
    suppressed, because a chained traceback is printed by Airflow and could carry details we did not vet.
    """
    check_cancelled()  # a cancelled task opens no connection (and so runs no catalog query)
    params: dict[str, Any] = {**connect_params(conn, ssl, dbname, password=password), **kw}
    secret = params.get("password")
    try:
        c = psycopg.connect(**params)
    except psycopg.Error as exc:
        host = f"[{conn.host}]" if ":" in conn.host else conn.host
        user = conn.username or "<default user>"
        message = f"cannot connect to {host}:{conn.port}/{dbname} as {user}: {_reason(exc)}"
        if isinstance(secret, str) and secret:
            message = message.replace(secret, REDACTED)  # also where it equals the user or database name
        raise PgConnectError(message, sqlstate=getattr(exc, "sqlstate", None)) from None
    track_connection(c)  # cancel() cancels its running query
    if cancelled():
        c.close()
        check_cancelled()
    return c


def server_version_num(conn: psycopg.Connection) -> int:
    """``server_version_num`` as the server reports it (e.g. 170002); raises on failure."""
    row = conn.execute("SELECT pg_catalog.current_setting('server_version_num')::int").fetchone()
    if row is None:  # cannot happen for a SELECT without FROM; keeps the return type honest
        raise PgError("server_version_num: the server returned no row")
    return int(row[0])


def list_databases(conn: psycopg.Connection) -> list[str]:
    """Connectable databases in bytewise name order (``template0`` has ``datallowconn = false``)."""
    rows = conn.execute(
        'SELECT datname::text FROM pg_catalog.pg_database WHERE datallowconn ORDER BY datname COLLATE "C"'
    ).fetchall()
    return [row[0] for row in rows]


def can_read_pg_authid(conn: psycopg.Connection) -> bool:
    """False only when reading ``pg_authid`` is refused (restricted superusers such as RDS).

    Then ``pg_dumpall`` needs ``--no-role-passwords``. Any other failure returns True so ``pg_dumpall`` reports the
    real problem itself (the reference does the same). The check uses SQLSTATE 42501 rather than the English
    message text, which ``lc_messages`` may translate. The probe runs in its own (sub)transaction so a refusal
    leaves the caller's transaction usable.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT 1 FROM pg_catalog.pg_authid LIMIT 1")
    except pg_errors.InsufficientPrivilege:
        return False
    except psycopg.Error:
        return True
    return True
