"""``check`` with ``read_data_subset`` (restic's ``n/m``, ``x%``, and ``/m`` = today's slice) on real stores.

The m slices of ``n/m`` partition the packs (every pack read exactly once over the m runs), ``/m`` picks the slice
of the day so m consecutive daily runs read every pack, and damage in a pack is found by the run that reads it,
naming the pack and the snapshot records it affects.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.pack import pack_object_name
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE

KiB = 1024
DAY = 86400


@pytest.fixture
def local(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def make_store(location: str) -> Store:
    """A store whose data lies in ~20 small packs (pack target 64 KiB), in two snapshots."""
    st = Store.create(location, PASSPHRASE, pack_target=64 * KiB)
    for seed in (1, 2):
        with st.writer(source={"kind": "test", "origin": f"src{seed}"}) as w:
            w.add_bytes("/data", random.Random(seed).randbytes(640 * KiB), chunking=Chunking.fixed(16 * KiB))
    return st


@pytest.fixture
def many_packs(local: str) -> Store:
    st = make_store(local)
    yield st
    st.close()


def pack_ids(st: Store) -> list[str]:
    return sorted(o.key.rsplit("/", 1)[-1] for o in st.backend.list("packs/"))


def test_slices_partition_the_packs(many_packs: Store) -> None:
    ids = pack_ids(many_packs)
    assert len(ids) >= 12
    m = 4
    total = 0
    for n in range(1, m + 1):
        rep = check_mod.check(many_packs, read_data_subset=f"{n}/{m}")
        assert rep.ok and rep.subset == f"{n}/{m}" and rep.read_data
        expected = [p for p in ids if int(p[:2], 16) % m == n - 1]
        assert rep.packs_read == len(expected)
        total += rep.packs_read
    assert total == len(ids)  # each pack read by exactly one slice
    whole = check_mod.check(many_packs, read_data=True)
    assert whole.packs_read == len(ids) and whole.subset is None
    metadata_only = check_mod.check(many_packs)
    assert metadata_only.packs_read == 0 and metadata_only.bytes_read == 0 and not metadata_only.read_data


def test_daily_slice_reads_every_pack_within_m_days(many_packs: Store) -> None:
    ids = pack_ids(many_packs)
    m = 3
    start = 20_000 * DAY + 3600  # any day
    seen = []
    for day in range(m):
        subset = check_mod.parse_subset(f"/{m}", now=start + day * DAY)
        assert subset.text == f"{(20_000 + day) % m + 1}/{m}"
        assert check_mod.check(many_packs, read_data_subset=subset).ok
        seen += subset.select(ids)
    assert sorted(seen) == ids  # m consecutive days: every pack exactly once
    # the same day always gives the same slice, whatever the hour
    assert check_mod.parse_subset("/3", now=start).text == check_mod.parse_subset("/3", now=start + 80000).text


def test_percentage_reads_that_share_at_random(many_packs: Store) -> None:
    n = len(pack_ids(many_packs))
    assert check_mod.check(many_packs, read_data_subset="10%").packs_read == -(-n // 10)
    assert check_mod.check(many_packs, read_data_subset="100%").packs_read == n
    assert check_mod.check(many_packs, read_data_subset="0.5%").packs_read == 1  # at least one


def test_damage_found_by_the_slice_that_reads_it(location: str, tmp_path: Path) -> None:
    """On both backends (a directory and S3)."""
    st = make_store(location)
    ids = pack_ids(st)
    data_packs = [p for p in ids if st.backend.stat(pack_object_name(p)).size > 32 * KiB]
    victim = data_packs[0]
    name = pack_object_name(victim)
    data = bytearray(st.backend.get(name))
    data[len(data) // 2] ^= 1
    st.backend.put(name, bytes(data), create_only=False)
    m = 4
    hit = int(victim[:2], 16) % m + 1
    st.close()
    fresh = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "cache2")
    for n in range(1, m + 1):
        rep = check_mod.check(fresh, read_data_subset=f"{n}/{m}")
        if n != hit:
            assert rep.ok, rep.problems
            continue
        assert not rep.ok
        assert name in {p.object for p in rep.problems}
        affected = rep.affected_snapshots()
        assert affected and all(len(a) == 8 for a in affected)
        text = rep.failure_text()
        assert name in text and "Affected snapshots: " in text and affected[0] in text
        assert rep.as_dict()["subset"] == f"{n}/{m}"
    fresh.close()


@pytest.mark.parametrize("bad", ["", "0/4", "5/4", "1/0", "1/257", "0%", "101%", "abc", "1/2/3", "-1/2", "50"])
def test_bad_subsets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="read_data_subset"):
        check_mod.parse_subset(bad)


def test_read_data_and_subset_contradict(many_packs: Store) -> None:
    with pytest.raises(ValueError, match="not both"):
        check_mod.check(many_packs, read_data=True, read_data_subset="1/2")
