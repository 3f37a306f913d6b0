"""Shared test helpers.

``need`` is the single gate for optional prerequisites: locally a missing tool skips the test,
but in CI (or with ``PGPLAKAR_REQUIRE_ALL=1``) it fails, so a broken CI image cannot turn the
suite green by silently skipping everything.
"""

from __future__ import annotations

import os

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
