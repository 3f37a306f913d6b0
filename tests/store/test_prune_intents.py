"""Prune beside backups (store/intents.py), on both backends, with two store handles (two caches) in one process so
that each step lands exactly where the protocol is delicate:

- a backup that deduplicated a chunk a prune is repacking commits during the prune: it re-points to the repacked
  copy and restores byte-exact; the prune deletes the old pack;
- a backup that deduplicated a chunk whose only copy a prune is deleting fails its commit, leaving no snapshot; its
  retry stores the chunk again;
- a backup that commits after the prune's mark but before its intent is seen when the prune re-lists: the pack it
  needs is spared and stays indexed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store import prune as prune_mod
from airflow_provider_pgplakar.store.errors import DependencyMissing
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.writer_proc import rand

KiB = 1 << 10


def _handle(location: str, tmp_path: Path, name: str) -> Store:
    return Store.open(location, PASSPHRASE, cache_dir=tmp_path / f"cache-{name}")


def _snapshot(st: Store, files: dict[str, bytes]) -> str:
    with st.writer(source={"kind": "files", "origin": "test"}) as w:
        for path, data in files.items():
            w.add_bytes(path, data)
    return w.snapshot_id


def _content(st: Store, sid: str) -> dict[str, bytes]:
    out = {}
    for rec in st.records(sid):
        if rec.kind == "f":
            with st.open_record(rec) as f:
                out[rec.path] = f.read()
    return out


def _pack_ids(st: Store) -> set[str]:
    return {o.key.rsplit("/", 1)[-1] for o in st.backend.list("packs/")}


def _start_prune(st: Store, outcome: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            outcome.append(prune_mod.prune(st))
        except Exception as e:  # handed to the test thread
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not list(st.backend.list("intents/")):
        assert time.monotonic() < deadline and t.is_alive(), f"the prune wrote no intent: {outcome}"
        time.sleep(0.02)
    return t


def _check_clean(st: Store) -> None:
    rep = check_mod.check(st, read_data=True)
    assert rep.ok, [str(p) for p in rep.problems]


def test_backup_repoints_to_the_repacked_copy_and_restores(location: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPLAKAR_PRUNE_SETTLE", "3")
    pruner = Store.create(location, PASSPHRASE, cache_dir=tmp_path / "cache-pruner")
    keep, drop = rand(60 * KiB, 1), rand(300 * KiB, 2)
    old = _snapshot(pruner, {"/keep": keep, "/drop": drop})  # one pack: keep + drop
    _snapshot(pruner, {"/keep": keep})
    pruner.forget([old])  # drop is dead now: its pack is mostly dead and gets repacked
    packs_before = _pack_ids(pruner)

    backup = _handle(location, tmp_path, "backup")
    w = backup.writer(source={"kind": "files", "origin": "during"})
    w.__enter__()
    w.add_bytes("/keep-again", keep)  # deduplicated against the pack the prune is about to repack
    outcome: list[Any] = []
    thread = _start_prune(pruner, outcome)
    w.__exit__(None, None, None)  # commits while the prune waits after its intent
    assert thread.is_alive(), "the commit waited for the prune"
    thread.join(60)
    rep = outcome[0]
    assert isinstance(rep, prune_mod.PruneReport) and rep.packs_repacked >= 1, rep
    assert not (packs_before & _pack_ids(pruner)) or rep.packs_deleted, "nothing was deleted"
    fresh = _handle(location, tmp_path, "reader")
    assert _content(fresh, w.snapshot_id) == {"/keep-again": keep}
    _check_clean(fresh)


def test_backup_depending_on_a_deleted_only_copy_commits_nothing_and_its_retry_works(
        location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPLAKAR_PRUNE_SETTLE", "3")
    pruner = Store.create(location, PASSPHRASE, cache_dir=tmp_path / "cache-pruner")
    gone = rand(200 * KiB, 3)
    old = _snapshot(pruner, {"/gone": gone})
    pruner.forget([old])  # its pack holds nothing live

    backup = _handle(location, tmp_path, "backup")
    w = backup.writer(source={"kind": "files", "origin": "during"})
    w.__enter__()
    w.add_bytes("/gone-again", gone)  # deduplicated against the dead pack
    outcome: list[Any] = []
    thread = _start_prune(pruner, outcome)
    with pytest.raises(DependencyMissing, match="retry the backup"):
        w.__exit__(None, None, None)
    thread.join(60)
    assert isinstance(outcome[0], prune_mod.PruneReport), outcome
    assert pruner.snapshot_ids() == [], "a snapshot depending on a deleted pack was committed"
    retry = _handle(location, tmp_path, "retry")
    sid = _snapshot(retry, {"/gone-again": gone})  # the prune is over: the chunk is stored anew
    assert _content(_handle(location, tmp_path, "reader"), sid) == {"/gone-again": gone}
    _check_clean(retry)


def test_snapshot_committed_between_mark_and_intent_is_spared(location: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pruner = Store.create(location, PASSPHRASE, cache_dir=tmp_path / "cache-pruner")
    data = rand(200 * KiB, 4)
    old = _snapshot(pruner, {"/data": data})
    pruner.forget([old])
    backup = _handle(location, tmp_path, "backup")
    w = backup.writer(source={"kind": "files", "origin": "late"})
    w.__enter__()
    w.add_bytes("/data", data)  # deduplicated against the pack the prune marks dead

    real_write_intent = prune_mod.write_intent

    def commit_first(*args: Any, **kwargs: Any) -> Any:  # the backup commits after the mark, before the intent
        w.__exit__(None, None, None)
        return real_write_intent(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "write_intent", commit_first)
    rep = prune_mod.prune(pruner)
    assert rep.packs_deleted == 0, rep  # the pack was spared for the late snapshot
    reader = _handle(location, tmp_path, "reader")
    assert _content(reader, w.snapshot_id) == {"/data": data}
    _check_clean(reader)
    reader.close()  # its read lease would keep the next prune out
    monkeypatch.setattr(prune_mod, "write_intent", real_write_intent)
    again = _handle(location, tmp_path, "again")
    prune_mod.prune(again)  # a later prune keeps it (it is live now)
    again.close()
    assert _content(_handle(location, tmp_path, "reader2"), w.snapshot_id) == {"/data": data}
