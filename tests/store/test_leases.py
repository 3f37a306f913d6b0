"""Lease identity and freshness on real processes: a live backup in another pid namespace with the same host name
is never judged dead (``unshare --pid``), a dead one in ours is, a reused pid is told apart by its start time, and
a holder whose lease is stale on the storage clock neither commits nor deletes.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import locks
from airflow_provider_pgplakar.store import prune as prune_mod
from airflow_provider_pgplakar.store.objects import seal_object
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.writer_proc import (
    assert_restores,
    make_tree,
    ns_writer,
    pack_census,
    rand,
    writer,
)

KiB, MiB = 1 << 10, 1 << 20


def _wait_packs(st: Store) -> set[str]:
    deadline = time.monotonic() + 60
    while not any(True for _ in st.backend.list("packs/")):
        assert time.monotonic() < deadline, "the stalled writer uploaded no pack"
        time.sleep(0.05)
    return {o.key for o in st.backend.list("packs/")}


def test_live_lease_in_other_pid_namespace_keeps_its_packs_from_prune(location: str, tmp_path: Path) -> None:
    st = Store.create(location, PASSPHRASE, pack_target=256 * KiB)
    expected = make_tree(tmp_path / "src", {f"/f{i}.bin": rand(300 * KiB, i) for i in range(6)})
    release = tmp_path / "release"
    stalled, pid = ns_writer(location, tmp_path / "src", "--hold-after", "3", "--release", str(release))
    line = stalled.wait_for("LEASED", stream="stdout")
    assert line == f"LEASED pid {pid}", line
    stalled.wait_for("HOLDING", stream="stdout")
    uploaded = _wait_packs(st)
    (lease,) = locks.list_leases(st.backend, st.keys)
    # the situation of two containers sharing a host name: same host, same boot, a pid that is free here
    assert (lease.host, lease.pid, lease.boot) == (socket.gethostname(), pid, locks.own_identity().boot)
    assert lease.pidns != locks.own_identity().pidns
    assert not os.path.exists(f"/proc/{pid}"), "the writer's pid must not exist in this namespace"
    assert not locks.is_stale(lease, st.backend.now())

    rep = prune_mod.prune(st)  # runs beside the backup (store/intents.py) but must not take its packs
    assert rep.packs_deleted == 0, rep
    assert uploaded <= {o.key for o in st.backend.list("packs/")}, "prune deleted a live writer's packs"
    assert [le.id for le in locks.list_leases(st.backend, st.keys)] == [lease.id]

    release.touch()
    assert stalled.finish() == 0, stalled.text("stderr")
    sid = stalled.json_result()["id"]
    rep = prune_mod.prune(st)
    assert rep.packs_deleted == 0, rep
    c = pack_census(st)
    assert c.missing == 0 and c.live_missing == 0 and c.unindexed == 0, c
    assert_restores(st, sid, expected, tmp_path / "restore")
    st.close()


def test_killed_writer_in_other_pid_namespace_is_judged_by_age(tmp_path: Path) -> None:
    """Its pid cannot be checked from here: the lease stays live until STALE_AFTER, even after a kill -9."""
    location = str(tmp_path / "store")
    st = Store.create(location, PASSPHRASE, pack_target=64 * KiB)  # a pack is uploaded before the hold
    make_tree(tmp_path / "src", {"/a": rand(300 * KiB, 1), "/b": rand(100 * KiB, 2)})
    victim, _pid = ns_writer(location, tmp_path / "src", "--hold-after", "1", "--release", str(tmp_path / "never"))
    victim.wait_for("HOLDING", stream="stdout")
    orphans = _wait_packs(st)
    victim.kill()
    (lease,) = locks.list_leases(st.backend, st.keys)
    assert not locks.is_stale(lease, st.backend.now())
    assert prune_mod.prune(st).packs_deleted == 0  # its uploads may still be committed: kept
    assert orphans <= {o.key for o in st.backend.list("packs/")}
    # once old enough on the storage clock, it is stale like any other
    assert locks.is_stale(lease, lease.mtime + locks.STALE_AFTER + 1)
    st.close()


def test_killed_writer_in_this_namespace_is_dead_at_once(tmp_path: Path) -> None:
    location = str(tmp_path / "store")
    st = Store.create(location, PASSPHRASE, pack_target=256 * KiB)
    make_tree(tmp_path / "src", {f"/f{i}.bin": rand(300 * KiB, i) for i in range(3)})
    victim = writer(location, tmp_path / "src", "--hold-after", "2", "--release", str(tmp_path / "never"))
    victim.wait_for("HOLDING", stream="stdout")
    orphans = _wait_packs(st)
    victim.kill()
    (lease,) = locks.list_leases(st.backend, st.keys)
    assert lease.v == 2 and lease.pid == victim.pid and lease.pstart is not None
    assert locks.is_stale(lease, st.backend.now())
    rep = prune_mod.prune(st)
    assert rep.packs_deleted == len(orphans)
    assert not any(True for _ in st.backend.list("locks/"))
    st.close()


def _plant(st: Store, body: dict) -> str:
    lease_id = secrets.token_hex(16)
    st.backend.put(f"locks/{lease_id}", seal_object(st.keys, b"LEAS", body), create_only=False)
    return lease_id


def test_pid_reuse_and_version_1_leases(tmp_path: Path) -> None:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    me = locks.own_identity()
    assert me.pstart is not None and me.boot and me.pidns
    base = {"v": 2, "kind": "backup", "host": me.host, "boot": me.boot, "pidns": me.pidns, "start": time.time()}
    alive = _plant(st, {**base, "pid": me.pid, "pstart": me.pstart})
    reused = _plant(st, {**base, "pid": me.pid, "pstart": me.pstart + 1})  # same pid, another process
    other_boot = _plant(st, {**base, "boot": "0" * 36, "pid": 999_999, "pstart": 1})
    v1_dead = _plant(st, {"kind": "backup", "host": me.host, "pid": 999_999, "start": time.time()})
    now = st.backend.now()
    stale = {le.id: locks.is_stale(le, now) for le in locks.list_leases(st.backend, st.keys)}
    assert stale == {alive: False, reused: True, other_boot: False, v1_dead: False}
    st.close()


def _skew(monkeypatch: pytest.MonkeyPatch, st: Store, seconds: float) -> None:
    """The storage clock runs ``seconds`` ahead of what this process saw: what a suspended VM (whose monotonic
    clock stopped) finds on resume."""
    real = type(st.backend).now
    monkeypatch.setattr(st.backend, "now", lambda: real(st.backend) + seconds)


def test_writer_does_not_commit_with_a_lease_stale_on_the_storage_clock(
        location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_pgplakar.store.errors import LeaseExpired

    st = Store.create(location, PASSPHRASE)
    with pytest.raises(LeaseExpired, match="old on the storage clock"), st.writer() as w:
        w.add_bytes("/a", rand(200 * KiB, 1))
        _skew(monkeypatch, st, locks.ABORT_AFTER + 60)  # the monotonic clock saw no time pass
    assert st.snapshot_ids() == []
    assert not any(True for _ in st.backend.list("locks/"))
    monkeypatch.undo()
    with st.writer() as w:  # a fresh lease commits
        w.add_bytes("/a", rand(200 * KiB, 1))
    assert st.snapshot_ids() == [w.snapshot_id]
    st.close()


def test_a_lease_removed_or_stale_at_refresh_is_lost_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_pgplakar.store.errors import LeaseExpired

    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    lease = locks.acquire(st.backend, st.keys, "backup")
    _skew(monkeypatch, st, locks.ABORT_AFTER + 60)
    lease.refresh()  # does not rewrite a lease a prune may already have judged stale
    monkeypatch.undo()
    assert lease.lost
    with pytest.raises(LeaseExpired):
        lease.check_fresh()
    lease.release()
    other = locks.acquire(st.backend, st.keys, "backup")
    st.backend.delete(other.key)  # what a prune does to a lease it judged stale
    other.refresh()
    assert st.backend.stat(other.key) is None, "a removed lease was resurrected"
    with pytest.raises(LeaseExpired, match="removed"):
        other.check_fresh()
    st.close()


def test_prune_rechecks_its_lease_before_deleting(
        location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_pgplakar.store.errors import LeaseExpired

    st = Store.create(location, PASSPHRASE, pack_target=256 * KiB)
    with st.writer() as w:
        w.add_bytes("/gone", rand(600 * KiB, 1))
    with st.writer() as w:
        w.add_bytes("/kept", rand(300 * KiB, 2))
    kept = w.snapshot_id
    st.forget([s for s in st.snapshot_ids() if s != kept])
    packs = {o.key for o in st.backend.list("packs/")}
    segments = {o.key for o in st.backend.list("index/")}
    real_write = prune_mod.write_segments

    def write_then_suspend(*args, **kwargs):  # the VM sleeps between writing the new index and deleting
        out = real_write(*args, **kwargs)
        _skew(monkeypatch, st, locks.ABORT_AFTER + 60)
        return out

    monkeypatch.setattr(prune_mod, "write_segments", write_then_suspend)
    with pytest.raises(LeaseExpired, match="not deleting superseded index segments"):
        prune_mod.prune(st)
    monkeypatch.undo()
    assert packs <= {o.key for o in st.backend.list("packs/")}, "a prune with a stale lease deleted packs"
    assert segments <= {o.key for o in st.backend.list("index/")}
    assert not any(True for _ in st.backend.list("locks/"))
    rep = prune_mod.prune(st)
    assert rep.packs_deleted > 0
    assert_restores(st, kept, {"/kept": rand(300 * KiB, 2)}, tmp_path / "restore")
    st.close()
