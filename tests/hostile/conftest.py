"""Hostile snapshots: a store per test, and a sandbox whose every entry outside the restore target is compared
before and after each restore."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hostile.trees import tree
from tests.store_fixtures import _fast_kdf_private_cache, store  # noqa: F401 (fixtures)


@dataclass
class Sandbox:
    """``root/outside`` holds a victim file, a victim directory and a secret; ``root/into/target`` is restored into."""

    root: Path
    outside: Path
    target: Path

    def before(self) -> dict:
        return tree(self.root, skip=(self.target.parent,))

    def assert_outside_unchanged(self, before: dict) -> None:
        after = tree(self.root, skip=(self.target.parent,))
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"the restore changed things outside its target: {changed}"


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "sandbox"
    outside = root / "outside"
    (outside / "victim_dir").mkdir(parents=True, mode=0o755)
    (outside / "victim_dir").chmod(0o755)
    (outside / "victim.txt").write_text("do not touch")
    (outside / "secret").write_text("s3cret")
    (outside / "secret").chmod(0o600)
    (root / "into").mkdir()  # the target's parent changes when the target is created: not compared
    return Sandbox(root, outside, root / "into" / "target")
