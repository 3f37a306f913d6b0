"""``kill -9`` of a real ``pgplakar backup`` process at every failpoint, on both backends.

After each kill: no half snapshot is visible, ``check`` is clean, the dead writer's lease does not block prune (same
host, process gone), the next backup succeeds (and dedups against whatever the dead writer had indexed), and prune
brings ``packs/`` down to exactly what the surviving snapshots reference, verified by reading every pack header,
``check --read-data`` and byte-exact restores.

``mid-upload`` fires in the backend's ``put`` for every object, and the first put of a backup is its lease: the
``mid-upload`` case therefore arms it for ``packs/`` keys only (see ``writer_proc.py``), and ``mid-upload-lease``
keeps the unfiltered behaviour (the writer dies writing its lease).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store import prune as prune_mod
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.writer_proc import (
    assert_restores,
    cli,
    lease_count,
    make_tree,
    pack_census,
    rand,
)

MiB = 1 << 20
PACK_TARGET = MiB // 2
RANDOM_BYTES = 4 * 650_000


def _source(root: Path) -> dict[str, bytes]:
    """~2.8 MiB, mostly incompressible: several 512 KiB packs flush while the backup is still reading."""
    files = {f"/f{i}.bin": rand(RANDOM_BYTES // 4, i) for i in range(4)}
    files["/sub/text.txt"] = b"the quick brown fox jumps over the lazy dog\n" * 5_000
    files["/sub/deeper/small"] = b"x"
    files["/empty"] = b""
    return make_tree(root, files)


# (failpoint, only fire for keys under this prefix, what the dead writer leaves behind)
POINTS = {
    "before-first-pack": ("before-first-pack", None),
    "mid-upload": ("mid-upload", "packs/"),  # mid-way through the upload of a pack
    "mid-upload-lease": ("mid-upload", None),  # the very first put of a backup: its lease
    "after-packs": ("after-packs", None),
    "after-index": ("after-index", None),
    "after-commit": ("after-commit", None),
}


@pytest.mark.parametrize("case", list(POINTS))
def test_kill_9_writer_at_failpoint(location: str, tmp_path: Path, case: str) -> None:
    point, key_prefix = POINTS[case]
    st = Store.create(location, PASSPHRASE, pack_target=PACK_TARGET)
    try:
        _run(st, location, tmp_path, case, point, key_prefix)
    finally:
        st.close()


def _run(st: Store, location: str, tmp_path: Path, case: str, point: str, key_prefix: str | None) -> None:
    src = tmp_path / "src"
    expected = _source(src)
    env = {"PGPLAKAR_FAILPOINT": point}
    if key_prefix:
        env["PGPLAKAR_FAILPOINT_KEYS"] = key_prefix
    victim = cli("--json", "at", location, "backup", str(src), **env)
    line = victim.wait_for(f"FAILPOINT {point}")
    if key_prefix:
        assert f" {key_prefix}" in line, line
    victim.kill()
    assert victim.proc.returncode == -9

    # -- what the dead writer left ---------------------------------------------------------------------------------
    ids = st.snapshot_ids()
    if point == "after-commit":
        assert len(ids) == 1, "the committed snapshot must be visible, exactly once"
        snap = st.load_snapshot(ids[0])
        assert snap.header["stats"]["bytes"] == sum(len(v) for v in expected.values())
        assert_restores(st, ids[0], expected, tmp_path / "restore-killed")
    else:
        assert ids == [], f"a half snapshot is visible after kill -9 at {case}"
        assert list(st.snapshots()) == []
    before = pack_census(st)
    if point in ("before-first-pack", "mid-upload"):
        assert before.packs == 0, f"no pack can be complete when killed at {case}"
    else:
        assert before.packs >= 3, "the data should span several packs"
    temp_lister = getattr(st.backend, "list_temp_files", None)
    if case == "mid-upload" and temp_lister:  # local: the half-written pack sits under a temp name, never listed
        assert any(t.key.startswith("packs/") for t in temp_lister())
    if point == "after-packs":
        assert before.indexed == 0 and before.unindexed == before.packs
    if point in ("after-index", "after-commit"):
        assert before.unindexed == 0 and before.indexed == before.packs
    assert before.missing == 0 and before.live_missing == 0
    # the lease of the dead writer stays behind (unless it died writing it)
    assert lease_count(st) == (0 if case == "mid-upload-lease" else 1)

    rep = check_mod.check(st)
    assert rep.ok, [str(p) for p in rep.problems]

    # prune right after the kill is not blocked by the dead writer's lease (same host, pid gone)
    dry = prune_mod.prune(st, dry_run=True)
    garbage = before.packs if point in ("after-packs", "after-index") else 0
    assert dry.packs_deleted == garbage
    assert dry.bytes_freed == (before.bytes if garbage else 0)

    # -- the next backup -------------------------------------------------------------------------------------------
    retry = cli("--json", "at", location, "backup", str(src))
    assert retry.finish() == 0, retry.text("stderr")
    summary = retry.json_result()
    new_id, stats = summary["id"], summary["stats"]
    assert stats["bytes"] == sum(len(v) for v in expected.values())
    if point in ("after-index", "after-commit"):
        # everything the dead writer indexed is reused: nothing (or next to nothing) is stored again
        assert stats["new_stored_bytes"] < 64 * 1024, stats
    else:
        # unindexed packs cannot be deduplicated against: the data is stored again
        assert stats["new_stored_bytes"] > RANDOM_BYTES, stats
    assert_restores(st, new_id, expected, tmp_path / "restore-retry")
    survivors = st.snapshot_ids()
    assert new_id in survivors and len(survivors) == (2 if point == "after-commit" else 1)

    # -- prune: orphans go, exactly what the snapshots need stays ---------------------------------------------------
    mid = pack_census(st)
    rep_prune = prune_mod.prune(st)
    after = pack_census(st)
    assert lease_count(st) == 0, "prune removes the dead writer's stale lease (and its own)"
    assert after.unindexed == 0 and after.missing == 0 and after.live_missing == 0
    assert after.dead_bytes == 0, after
    if point == "after-packs":
        assert rep_prune.packs_deleted == before.packs
        assert after.packs == mid.packs - before.packs and after.bytes == mid.bytes - before.bytes
    else:
        assert rep_prune.packs_deleted == 0 and after.packs == mid.packs and after.bytes == mid.bytes
    full = check_mod.check(st, read_data=True)
    assert full.ok, [str(p) for p in full.problems]
    assert not full.notes, full.notes  # no orphan note any more
    assert st.snapshot_ids() == survivors
    for i, sid in enumerate(survivors):
        assert_restores(st, sid, expected, tmp_path / f"restore-after-prune-{i}")
