"""Fixtures shared by the test packages that back up into a throwaway store (imported by their conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.repo import Store


@pytest.fixture(autouse=True)
def _fast_kdf_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cheap Argon2 parameters (stored per key file, so this only speeds tests) and a per-test cache."""
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PGPLAKAR_PASSPHRASE", raising=False)
    monkeypatch.delenv("PGPLAKAR_KEY", raising=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh local store (passphrase ``pw``) in the test's temp directory."""
    st = Store.create(str(tmp_path / "store"), "pw")
    yield st
    st.close()
