"""Fixtures for logical backup tests: a fresh store per test and option builders for a test server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.pgservers import PgManager, PgServer
from tests.store_fixtures import _fast_kdf_private_cache, store  # noqa: F401 (fixtures)


def src_opts(server: PgServer, **extra: str) -> tuple[str, dict[str, str]]:
    """A postgres:// location and options for ``server`` (as the CLI would get them)."""
    opts = {"host": server.host, "port": str(server.port), "username": server.superuser,
            "password": server.password, "pg_bin_dir": str(server.bin_dir), **extra}
    return "postgres://", opts


def module_server(major: int = 15) -> Callable[[PgManager], Iterator[PgServer]]:
    """A module-scoped fixture: a PostgreSQL ``major`` server of the module's own, discarded after its tests
    (``src = module_server()`` in a test module)."""

    @pytest.fixture(scope="module")
    def server(pg_manager: PgManager) -> Iterator[PgServer]:
        started = pg_manager.start(major)
        yield started
        pg_manager.discard(started)

    return server
