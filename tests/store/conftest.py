"""Fixtures for store tests: every scenario runs on both backends (a temp directory and S3 over HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.s3_server import s3_location

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_kdf_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Cheap Argon2 parameters (stored per key file, so this only speeds tests) and a per-test cache."""
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PGPLAKAR_PASSPHRASE", raising=False)
    monkeypatch.delenv("PGPLAKAR_KEY", raising=False)


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, not yet created store location on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return s3_location(endpoint, bucket, "store")


@pytest.fixture
def store(location: str):
    from airflow_provider_pgplakar.store.repo import Store

    st = Store.create(location, PASSPHRASE)
    yield st
    st.close()
