"""``make demo``: the store end to end through the ``pgplakar`` CLI, on embedded defaults (no set-up needed).

Creates an encrypted store in ``.demo/store``, backs up a generated sample directory twice (the second time after
a small change, to show dedup), lists, checks every byte, restores into ``.demo/restored`` and compares the trees.
The PostgreSQL demo replaces this once logical backups land.
"""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
CLI = [sys.executable, "-m", "airflow_provider_pgplakar.cli.main"]


def pgplakar(*args: str) -> str:
    cmd = [*CLI, "at", str(DEMO / "store"), *args]
    print("$ pgplakar at .demo/store " + " ".join(args), flush=True)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    sys.stdout.write(res.stdout)
    if res.returncode:
        sys.exit(f"demo failed: {res.stderr.strip()}")
    return res.stdout


def make_sample(root: Path) -> None:
    rnd = random.Random(42)
    words = [f"word{i}" for i in range(2000)]
    for d in range(3):
        sub = root / f"dir{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(20):
            (sub / f"file{i}.txt").write_text(" ".join(rnd.choices(words, k=rnd.randint(10, 20000))))
    (root / "table.copy").write_text("".join(f"{i}\t{rnd.random()}\t2026-11-{1 + i % 28:02d}\n"
                                             for i in range(200_000)))
    (root / "link").unlink(missing_ok=True)
    os.symlink("table.copy", root / "link")


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


if __name__ == "__main__":
    shutil.rmtree(DEMO, ignore_errors=True)
    sample = DEMO / "sample"
    make_sample(sample)
    ENV = {**os.environ, "PGPLAKAR_PASSPHRASE": "demo passphrase", "PGPLAKAR_CACHE_DIR": str(DEMO / "cache")}
    pgplakar("create")
    pgplakar("backup", str(sample), "--tag", "demo")
    with open(sample / "table.copy", "a") as f:
        f.write("200000\t0.5\t2026-11-24\n")
    pgplakar("backup", str(sample), "--tag", "demo")
    pgplakar("ls")
    pgplakar("check", "--read-data")
    pgplakar("restore", "-to", str(DEMO / "restored"), "latest")
    restored = DEMO / "restored"
    ok = same_tree(sample, restored)
    print(f"restored tree {'matches' if ok else 'DIFFERS FROM'} the source")
    sys.exit(0 if ok else 1)
