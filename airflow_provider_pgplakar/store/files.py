"""Back up a local directory or file into a snapshot, and restore records to a directory.

Restores never leave a half-written file visible: content goes to a temp name beside the target and is renamed
into place only after the record verified at EOF.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from .writer import SnapshotWriter

log = logging.getLogger(__name__)


def _attrs(st: os.stat_result) -> dict[str, Any]:
    return {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns, "uid": st.st_uid, "gid": st.st_gid}


def backup_path(w: SnapshotWriter, source: str | os.PathLike[str]) -> int:
    """Add ``source`` (a directory, walked in sorted order, or one file). Returns the number of records."""
    root = Path(source)
    if not root.exists() and not root.is_symlink():
        raise StoreError(f"{root} does not exist")
    if not root.is_dir():
        st = root.lstat()
        with open(root, "rb") as f:
            w.add_stream("/" + root.name, f, **_attrs(st))
        return 1
    count = 0
    seen_inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        w.add_entry(_snap_path(rel_dir), "d", **_attrs(os.lstat(dirpath)))
        count += 1
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            full = os.path.join(dirpath, name)
            spath = _snap_path(rel_dir / name)
            st = os.lstat(full)
            count += 1
            if stat.S_ISLNK(st.st_mode):
                w.add_entry(spath, "l", link_target=os.readlink(full), **_attrs(st))
            elif stat.S_ISREG(st.st_mode):
                ino = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and ino in seen_inodes:
                    w.add_entry(spath, "h", link_target=seen_inodes[ino], **_attrs(st))
                    continue
                seen_inodes[ino] = spath
                try:
                    with open(full, "rb") as f:
                        w.add_stream(spath, f, **_attrs(st))
                except OSError as e:
                    w.add_error(spath, f"unreadable: {e.strerror}")
                    log.warning("%s: %s (recorded as an error entry)", full, e)
            else:
                count -= 1
                log.info("skipping special file %s", full)
    return count


def _snap_path(rel: Path) -> str:
    s = rel.as_posix()
    return "/" if s == "." else "/" + s


def _target(dest: Path, snap_path: str) -> Path:
    rel = PurePosixPath(snap_path.lstrip("/"))
    if any(part == ".." for part in rel.parts):
        raise StoreError(f"refusing to restore {snap_path!r}: path escapes the target directory")
    return dest.joinpath(*rel.parts)


def restore_records(store: Any, records: Iterable[dict[str, Any]], dest: str | os.PathLike[str], *,
                    overwrite: bool = False, strip: str = "") -> int:
    """Write records below ``dest``; ``strip`` removes a leading snapshot path prefix. Returns files written."""
    dest_root = Path(dest)
    dest_root.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[Path, dict[str, Any]]] = []
    written = 0
    for rec in records:
        p = rec["p"]
        if strip and strip != "/":
            p = p[len(strip.rstrip("/")) :] or "/"
        target = _target(dest_root, p)
        kind = rec.get("k")
        if kind == "d":
            target.mkdir(parents=True, exist_ok=True)
            dirs.append((target, rec))
            continue
        if kind == "e":
            log.warning("%s was not backed up: %s", rec["p"], rec.get("e"))
            continue
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise StoreError(f"{target} already exists (pass --overwrite to replace it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "l":
            if target.is_symlink() or target.exists():
                target.unlink()
            os.symlink(rec["lt"], target)
            _apply_attrs(target, rec, link=True)
        elif kind == "h":
            linked = _target(dest_root, rec["lt"][len(strip.rstrip("/")) :] if strip and strip != "/" else rec["lt"])
            if target.exists():
                target.unlink()
            os.link(linked, target)
        elif kind == "f":
            tmp = target.with_name(f".{target.name}.pgplakar-tmp")
            try:
                with store.open_record(rec) as src, open(tmp, "wb") as out:
                    for piece in src.iter_chunks():
                        out.write(piece)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            _apply_attrs(target, rec)
            written += 1
    for d, rec in reversed(dirs):
        _apply_attrs(d, rec)
    return written


def _apply_attrs(path: Path, rec: dict[str, Any], *, link: bool = False) -> None:
    """Owner (as root), mode and mtime; for a symlink the link itself (Linux has no symlink modes)."""
    if os.geteuid() == 0 and "u" in rec:
        try:
            os.chown(path, rec["u"], rec.get("g", -1), follow_symlinks=False)
        except OSError as e:
            log.warning("cannot chown %s: %s", path, e)
    if "m" in rec and not link:
        os.chmod(path, rec["m"])
    if "t" in rec:
        os.utime(path, ns=(rec["t"], rec["t"]), follow_symlinks=False)
