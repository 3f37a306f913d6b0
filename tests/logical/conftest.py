"""Fixtures for logical backup tests: a fresh store per test and option builders for a test server."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.repo import Store
from tests.pgservers import PgServer


@pytest.fixture(autouse=True)
def _fast_kdf_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def store(tmp_path: Path):
    st = Store.create(str(tmp_path / "store"), "pw")
    yield st
    st.close()


def src_opts(server: PgServer, **extra: str) -> tuple[str, dict[str, str]]:
    """A postgres:// location and options for ``server`` (as the CLI would get them)."""
    opts = {"host": server.host, "port": str(server.port), "username": server.superuser,
            "password": server.password, "pg_bin_dir": str(server.bin_dir), **extra}
    return "postgres://", opts
