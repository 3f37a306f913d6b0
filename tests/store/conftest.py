"""Fixtures for store tests: every scenario runs on both backends (a temp directory and S3 over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import s3_location
from tests.store.writer_proc import kill_leftovers
from tests.store_fixtures import _fast_kdf_private_cache  # noqa: F401 (fixtures)

PASSPHRASE = "correct horse battery staple"


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


@pytest.fixture(autouse=True)
def _no_stray_children() -> Iterator[None]:
    """SIGKILL writer processes a test left running (a failed test must not leave one sleeping at a failpoint)."""
    yield
    kill_leftovers()
