"""No rollback through replayed index segments, on both backends: an index segment saved before a prune and
re-uploaded after it is ignored (``supersedes``, cumulative over prunes), and a commit that would dedup against a
missing pack fails instead of committing a snapshot that cannot be restored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import prune as prune_mod
from airflow_provider_pgplakar.store.errors import DependencyMissing
from airflow_provider_pgplakar.store.index import IndexCache, read_segment
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.writer_proc import assert_restores, rand

KiB = 1 << 10
X = rand(700 * KiB, 1)


def _segments(st: Store) -> dict[str, bytes]:
    return {o.key: st.backend.get(o.key) for o in st.backend.list("index/")}


def _fresh(location: str, tmp_path: Path, name: str) -> Store:
    """The store through an empty cache (another host, or a lost cache): it knows only what index/ says."""
    return Store.open(location, PASSPHRASE, cache_dir=tmp_path / name)


def _restores_x(location: str, tmp_path: Path, sid: str) -> None:
    """Restore through another fresh cache (closed after: it holds a read lease meanwhile)."""
    reader = _fresh(location, tmp_path, f"check-{sid}")
    try:
        assert_restores(reader, sid, {"/x": X}, tmp_path / f"restore-{sid}")
    finally:
        reader.close()


def _backup_x(st: Store) -> str:
    with st.writer() as w:
        w.add_bytes("/x", X)
    return w.snapshot_id


def _replay(st: Store, saved: dict[str, bytes]) -> None:
    for key, data in saved.items():
        if st.backend.stat(key) is None:
            st.backend.put(key, data)


def test_replayed_segment_is_superseded(location: str, tmp_path: Path) -> None:
    st = Store.create(location, PASSPHRASE, pack_target=256 * KiB)
    s1 = _backup_x(st)
    saved = _segments(st)  # what an attacker (or a restored bucket backup) keeps
    st.forget([s1])
    prune_mod.prune(st)
    assert not any(True for _ in st.backend.list("packs/")), "X's packs are gone"
    # a second prune cycle: the segment that superseded the saved one is itself replaced
    with st.writer() as w:
        w.add_bytes("/other", rand(300 * KiB, 2))
    st.forget([w.snapshot_id])
    prune_mod.prune(st)
    (current,) = [o.key.rsplit("/", 1)[-1] for o in st.backend.list("index/")]
    assert {k.rsplit("/", 1)[-1] for k in saved} <= set(read_segment(st.backend, st.keys, current)["supersedes"])

    # through a fresh cache (it learns what is superseded from index/ alone), then through the pruning process's
    # own cache after one more prune removed that backup again
    fresh = _fresh(location, tmp_path, "fresh")
    for name, store in (("fresh cache", fresh), ("same cache", st)):
        _replay(st, saved)
        with store.writer() as w:
            w.add_bytes("/x", X)
        stats = store.load_snapshot(w.snapshot_id).header["stats"]
        assert stats["new_raw_bytes"] >= len(X), f"{name}: X was deduplicated against deleted packs"
        _restores_x(location, tmp_path, w.snapshot_id)
        if store is fresh:
            fresh.forget([w.snapshot_id])
            fresh.close()
            prune_mod.prune(st)
    # the next prune deletes the replayed segment
    prune_mod.prune(st)
    assert not set(saved) & {o.key for o in st.backend.list("index/")}
    st.close()


def test_commit_refuses_to_depend_on_a_missing_pack(location: str, tmp_path: Path) -> None:
    st = Store.create(location, PASSPHRASE, pack_target=256 * KiB)
    s1 = _backup_x(st)
    saved = _segments(st)
    st.forget([s1])
    prune_mod.prune(st)
    # the attacker also removes the segment that superseded the saved one: index/ holds only the replayed segment
    for o in list(st.backend.list("index/")):
        st.backend.delete(o.key)
    _replay(st, saved)

    fresh = _fresh(location, tmp_path, "fresh")
    with pytest.raises(DependencyMissing, match=r"not committing snapshot .*packs/.*repair index"), fresh.writer() as w:
        w.add_bytes("/x", X)
    assert fresh.snapshot_ids() == [], "a snapshot that cannot be restored was committed"

    # the way out the error names: repair the index from the packs that exist, then back up again
    prune_mod.repair_index(fresh)
    sid = _backup_x(fresh)
    assert fresh.load_snapshot(sid).header["stats"]["new_raw_bytes"] >= len(X)
    _restores_x(location, tmp_path, sid)
    fresh.close()
    st.close()


def test_old_cache_schema_is_rebuilt(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "c" / "index.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO meta VALUES ('repo_id', 'r'), ('schema', '1')")
    db.commit()
    db.close()
    cache = IndexCache(path, "r")
    assert cache.superseded() == set()
    assert dict(cache.db.execute("SELECT k, v FROM meta").fetchall())["schema"] == "2"
    cache.close()
