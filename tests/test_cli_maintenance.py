"""The maintenance verbs of the real ``pgplakar`` console script: ``check --read-data-subset``, ``forget``'s default
grouping, ``stats`` and ``freshness`` (see tests/test_cli.py for the harness)."""

from __future__ import annotations

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
