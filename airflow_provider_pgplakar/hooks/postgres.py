"""Airflow hook: the PostgreSQL side of a backup or restore, from a standard ``postgres`` connection or a URI.

A standard Airflow ``postgres`` connection is read as: host, port, login, password, schema (= database), and the
extras ``sslmode``, ``sslcert``, ``sslkey``, ``sslrootcert`` that the Airflow postgres provider uses, plus any of
our option names (``exclude_databases``, ``compress``, ``pg_bin_dir``, …). Alternatively a seed-style
``location`` URI. Operator ``options`` override both. Parsing is the :mod:`..pg.options` code the CLI uses, so
every invalid value fails before anything runs, naming the option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseHook

from ..pg.options import LogicalSourceOptions, RestoreOptions, parse_restore_options, parse_source_options

_SSL_EXTRAS = {"sslmode": "ssl_mode", "sslcert": "ssl_cert", "sslkey": "ssl_key", "sslrootcert": "ssl_root_cert"}
# Extras of the Airflow postgres provider that mean nothing for dump tools (not errors).
_IGNORED_EXTRAS = {"cursor", "iam", "aws_conn_id", "redshift", "connect_timeout", "options", "client_encoding",
                   "sslcrl", "keepalives", "keepalives_idle", "application_name", "region_name",
                   "enable_log_db_messages", "sqlalchemy_scheme", "sqlalchemy_options"}


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


class PgPlakarPostgresHook(BaseHook):
    """Builds validated source/destination options for our PostgreSQL tools."""

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "PostgreSQL (pgplakar)"

    def __init__(self, postgres_conn_id: str | None = default_conn_name, *, location: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.location = location

    def _location_and_options(self, overrides: Mapping[str, Any] | None, *, restore: bool) -> tuple[str, dict]:
        from airflow.sdk.log import mask_secret

        opts: dict[str, str] = {}
        scheme = "postgres"
        if self.location:
            location = self.location
        else:
            if not self.postgres_conn_id:
                raise ValueError("give postgres_conn_id or location")
            conn = self.get_connection(self.postgres_conn_id)
            extra = dict(conn.extra_dejson or {})
            if conn.host:
                opts["host"] = conn.host
            if conn.port:
                opts["port"] = str(conn.port)
            if conn.login:
                opts["username"] = conn.login
            if conn.password:
                mask_secret(conn.password)
                opts["password"] = conn.password
            if conn.schema:
                opts["database"] = conn.schema
            for src, dst in _SSL_EXTRAS.items():
                if extra.get(src) not in (None, ""):
                    opts[dst] = _text(extra.pop(src))
            for key, value in extra.items():
                if key not in _IGNORED_EXTRAS and value not in (None, ""):
                    opts[key] = _text(value)
            location = f"{scheme}://"
        for key, value in (overrides or {}).items():
            if value is not None:
                opts[key] = _text(value)
        if opts.get("password"):
            mask_secret(opts["password"])
        if restore and "database" in opts and opts.get("recreate") in ("true", "1", "yes"):
            opts.pop("database")  # a connection's default database is no restore target with recreate
        return location, opts

    def source_options(self, overrides: Mapping[str, Any] | None = None) -> LogicalSourceOptions:
        location, opts = self._location_and_options(overrides, restore=False)
        parsed = parse_source_options(location, opts)
        if not isinstance(parsed, LogicalSourceOptions):
            raise ValueError("this operator takes a logical source (postgres://), not postgres+bin://")
        return parsed

    def restore_options(self, overrides: Mapping[str, Any] | None = None) -> RestoreOptions:
        location, opts = self._location_and_options(overrides, restore=True)
        return parse_restore_options(location, opts)
