"""Fixtures for logical backup tests: a fresh store per test and option builders for a test server."""

from __future__ import annotations

from tests.pgservers import PgServer
from tests.store_fixtures import _fast_kdf_private_cache, store  # noqa: F401 (fixtures)


def src_opts(server: PgServer, **extra: str) -> tuple[str, dict[str, str]]:
    """A postgres:// location and options for ``server`` (as the CLI would get them)."""
    opts = {"host": server.host, "port": str(server.port), "username": server.superuser,
            "password": server.password, "pg_bin_dir": str(server.bin_dir), **extra}
    return "postgres://", opts
