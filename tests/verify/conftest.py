"""Fixtures for verified-restore tests: the logical tests' store and option builders."""

from tests.logical.conftest import _fast_kdf_private_cache, src_opts, store  # noqa: F401
