"""The maintenance verbs of the real ``pgplakar`` console script: ``check --read-data-subset``, ``forget``'s default
grouping, ``stats`` and ``freshness`` (see tests/test_cli.py for the harness)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import Cli, backup, cli, created, flip_middle_of_largest_pack, src  # noqa: F401


def test_check_read_data_subset(created: Cli, src: Path) -> None:  # noqa: F811
    c = created
    backup(c, src)
    packs = c.json("check")["packs"]
    total = 0
    for n in (1, 2):
        rep = c.json("check", "--read-data-subset", f"{n}/2")
        assert rep["ok"] and rep["subset"] == f"{n}/2"
        total += rep["packs_read"]
    assert total == packs  # the two halves read every pack once
    today = c.json("check", "--read-data-subset", "/2")
    assert today["subset"] in ("1/2", "2/2")
    assert c.json("check", "--read-data-subset", "100%")["packs_read"] == packs
    out = c.ok("check", "--read-data-subset", "1/1").splitlines()[-1]
    assert out.startswith("ok: ") and f"({packs} packs of subset 1/1)" in out

    pack = flip_middle_of_largest_pack(c.location)
    r = c.run("check", "--read-data-subset", "1/1")
    assert r.returncode == 3 and f"ERROR {pack}: " in r.stdout.decode()

    for bad in ("0/2", "3/2", "1/300", "150%", "half"):
        line = c.fails(2, "check", "--read-data-subset", bad)
        assert line.startswith("pgplakar: usage: --read-data-subset: ") and "n/m" in line, line
    assert "not both" in c.fails(2, "check", "--read-data", "--read-data-subset", "1/2")


def _put(location: str, tmp_path: Path, hours_ago: float, origin: str, **labels: str) -> str:
    import pendulum

    from airflow_provider_pgplakar.store.repo import Store
    from tests.test_cli import PASSPHRASE

    with Store.open(location, PASSPHRASE, cache_dir=tmp_path / "inproc-cache") as st:
        with st.writer(source={"kind": "postgres", "origin": origin}, labels=labels) as w:
            w._start = pendulum.now("UTC").subtract(seconds=int(hours_ago * 3600))
            w.add_bytes("/dump", origin.encode() * 1000)
    return w.snapshot_id


def test_forget_default_grouping_ignores_map_index(created: Cli, tmp_path: Path) -> None:  # noqa: F811
    """Issue 11 §7: fan-out snapshots of one database (map_index 0, then 2) used to be two groups that never expire."""
    old = _put(created.location, tmp_path, 48, "postgres://u@db1:5432/sales", map_index="0", task_id="backup")
    new = _put(created.location, tmp_path, 24, "postgres://u@db1:5432/sales", map_index="2", task_id="backup")
    res = created.json("forget", "--keep-last", "1")
    assert res["removed"] == [old] and res["kept"] == [new]
    assert [g["group"] for g in res["groups"]] == ["source=postgres:db1:5432/sales"]
    assert "--group-by" in created.fails(2, "forget", "--keep-last", "1", "--group-by", "label:run_id")


def test_stats_and_freshness(created: Cli, tmp_path: Path) -> None:  # noqa: F811
    c = created
    line = c.fails(3, "freshness", "--max-age", "26h")
    assert "no backups in the store" in line
    sales = _put(c.location, tmp_path, 2, "postgres://u@db1:5432/sales")
    crm = _put(c.location, tmp_path, 30, "postgres://u@db1:5432/crm")
    hr = _put(c.location, tmp_path, 40, "postgres://u@db2:5432/hr")

    stats = c.json("stats")
    by = {s["source"]: s for s in stats["sources"]}
    assert {k: v["newest"] for k, v in by.items()} == {"source=postgres:db1:5432/sales": sales,
                                                       "source=postgres:db1:5432/crm": crm,
                                                       "source=postgres:db2:5432/hr": hr}
    assert by["source=postgres:db1:5432/crm"]["age"].startswith("30h") and stats["snapshots"] == 3
    assert stats["stored_bytes"] > 0 and stats["dedup_ratio"] > 0 and stats["logical_bytes"] == sum(
        s["bytes"] for s in stats["sources"])
    table = c.ok("stats").splitlines()
    assert table[0].split()[:3] == ["source", "snapshots", "newest"]
    assert table[-1].startswith("store: 3 snapshots, ") and "dedup ratio" in table[-1]

    r = c.run("freshness", "--max-age", "26h")
    assert r.returncode == 3
    out, err = r.stdout.decode(), r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pgplakar: 2 of 3 source(s) have no snapshot newer than 26h: ")
    assert "source=postgres:db1:5432/crm" in err and "source=postgres:db2:5432/hr" in err and "sales" not in err
    assert "STALE source=postgres:db1:5432/crm" in out and "ok    source=postgres:db1:5432/sales" in out
    rep = json.loads(c.run("--json", "freshness", "--max-age", "26h").stdout)
    assert rep["ok"] is False and rep["stale"] == ["source=postgres:db1:5432/crm", "source=postgres:db2:5432/hr"]
    assert c.ok("freshness", "--max-age", "2d").count("ok    ") == 3  # exit 0
    assert c.json("freshness", "--max-age", "26h", "--group-by", "")["ok"] is True  # one group: the newest is fresh

    assert c.fails(2, "freshness", "--max-age", "26 hours").startswith("pgplakar: usage: --max-age: ")
    assert "required" in c.fails(2, "freshness")
