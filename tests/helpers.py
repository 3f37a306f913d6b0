"""Shared test helpers.

``need`` is the single gate for optional prerequisites: locally a missing tool skips the test,
but in CI (or with ``PGPLAKAR_REQUIRE_ALL=1``) it fails, so a broken CI image cannot turn the
suite green by silently skipping everything.
"""

from __future__ import annotations

import os
from pathlib import Path

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
