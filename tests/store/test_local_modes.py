"""Local stores: every object is 0600 and every directory the store makes is 0700, whatever the umask.

``config`` and ``keys/*`` are what an offline passphrase guess needs; a world-readable store under a permissive
umask (0000 in some containers) would hand them to every local user.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_local_store_files_0600_dirs_0700_under_umask_0(tmp_path: Path, permissive_umask: None) -> None:
    root = tmp_path / "nested" / "store"
    st = Store.create(str(root), PASSPHRASE, cache_dir=tmp_path / "cache")
    st.add_key("second passphrase", comment="second")
    with st.writer(source={"kind": "test", "origin": "modes"}) as w:
        w.add_bytes("/f", os.urandom(300_000))
    st.close()
    modes = _modes(root)
    assert {"config", "keys", "packs", "index", "snapshots"} <= set(modes)
    assert len([k for k in modes if k.startswith("keys/")]) == 2
    assert any(k.startswith("packs/") and k.count("/") == 2 for k in modes)
    wrong = {k: oct(m) for k, m in modes.items()
             if m != (0o700 if (root / k).is_dir() else 0o600)}
    assert not wrong, f"modes other than 0600 (files) / 0700 (directories): {wrong}"
    assert stat.S_IMODE((tmp_path / "nested").stat().st_mode) == 0o700  # parents the store made, too
    # still readable after all that
    st = Store.open(str(root), PASSPHRASE, cache_dir=tmp_path / "cache2")
    assert len(st.snapshot_ids()) == 1
    st.close()
