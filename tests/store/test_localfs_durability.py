"""The directory backend makes new directories durable: a put that creates ``packs/xx/`` fsyncs ``packs/`` (and
the store root when ``packs/`` itself is new), not only ``packs/xx/``."""

from __future__ import annotations

import os
from pathlib import Path

from airflow_provider_pgplakar.store.localfs import LocalBackend


def test_put_fsyncs_the_parents_of_new_directories(tmp_path: Path, monkeypatch) -> None:
    backend = LocalBackend(tmp_path / "store")
    (tmp_path / "store").mkdir()
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    backend.put("packs/ab/abcdef", b"x")
    root = str(tmp_path / "store")
    assert {root, f"{root}/packs", f"{root}/packs/ab"} <= set(synced)
    synced.clear()
    backend.put("packs/ab/abcd00", b"y")  # existing directory: only its own entry
    assert f"{root}/packs" not in synced and f"{root}/packs/ab" in synced
