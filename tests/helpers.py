"""Shared test helpers.

``need`` is the single gate for optional prerequisites: locally a missing tool skips the test,
but in CI (or with ``PGPLAKAR_REQUIRE_ALL=1``) it fails, so a broken CI image cannot turn the
suite green by silently skipping everything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

_TRUTHY = {"1", "true", "yes", "on"}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


def require_all() -> bool:
    """True when missing prerequisites must fail instead of skip (CI or ``PGPLAKAR_REQUIRE_ALL``)."""
    return _truthy("PGPLAKAR_REQUIRE_ALL") or _truthy("CI")


def need(condition: bool, what: str) -> None:
    """Skip the current test (or fail it in CI) unless ``condition`` holds; ``what`` names the missing thing."""
    if condition:
        return
    if require_all():
        pytest.fail(f"required prerequisite missing (PGPLAKAR_REQUIRE_ALL/CI set): {what}", pytrace=False)
    pytest.skip(f"missing prerequisite: {what}")


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS setting from the developer's machine or CI leaks in; no instance metadata lookups."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def lock_probe_database(server: Any, prefix: str, notes: int = 0) -> str:
    """A fresh database whose ``items`` table (indexed: the manifest locks it) and ``notes`` table (no index: only
    pg_dump locks it) let cancellation tests hold a backup in a chosen phase."""
    import secrets

    name = f"{prefix}_{secrets.token_hex(4)}"
    with server.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    with server.connect(name) as c:
        c.execute("CREATE TABLE items (id serial PRIMARY KEY, name text)")
        c.execute("INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 500) g")
        c.execute("CREATE TABLE notes (body text)")
        if notes:
            c.execute("INSERT INTO notes SELECT 'n' FROM generate_series(1, %s)", (notes,))
    return name
