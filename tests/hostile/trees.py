"""Full snapshots of a directory tree (paths, types, modes, owners, link counts, contents, link targets), to prove
that a restore changed nothing outside its target."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any


def entry(path: Path) -> tuple[Any, ...]:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        content: Any = os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        content = path.read_bytes()
    else:
        content = None
    nlink = st.st_nlink if stat.S_ISREG(st.st_mode) else None
    return kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, nlink, st.st_mtime_ns, content


def tree(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` (and ``root`` itself) without following symlinks, except ``skip`` subtrees."""
    out = {".": entry(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = here / name
            if p in skip:
                continue
            out[p.relative_to(root).as_posix()] = entry(p)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
    return out


def listing(root: Path) -> list[str]:
    """Relative paths below ``root`` (empty when it does not exist)."""
    if not os.path.lexists(root):
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
