"""Back up a local directory or file into a snapshot, and restore records to a directory.

Backups walk directories through fds and open every file ``O_NOFOLLOW`` (attributes from ``fstat`` of what was
opened), so an entry swapped for a symlink during the walk is recorded as an error, never followed.

Restores go through :mod:`.safefs`: the whole record list is validated before anything is written (a record below
a symlink record, ``..``, a kind collision... is refused, naming it), nothing below the target is reached through a
symlink, content goes to a random temporary name and is renamed into place only after the record verified at EOF,
and everything written is fsynced before success is reported (``sync=False`` skips that). Records that cannot be
restored (error records, unknown kinds) are skipped and then reported by :class:`RestoreIncomplete`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StoreError
from .record import Record, RecordKind
from .safefs import RecordPlan, SafeTree, TargetBlocked, UnsafeRecord, split_path

if TYPE_CHECKING:
    from .repo import Store
    from .writer import SnapshotWriter

log = logging.getLogger(__name__)

__all__ = ["RestoreIncomplete", "backup_path", "restore_records"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SKIPPED_SHOWN = 10


class RestoreIncomplete(StoreError):
    """The restore wrote everything it could but skipped records (error records, unknown kinds)."""

    def __init__(self, written: int, dest: str, skipped: list[str]) -> None:
        shown = "; ".join(skipped[:SKIPPED_SHOWN]) + (f"; and {len(skipped) - SKIPPED_SHOWN} more"
                                                      if len(skipped) > SKIPPED_SHOWN else "")
        super().__init__(f"restore incomplete: {written} file(s) restored to {dest}, but {len(skipped)} record(s) "
                         f"were skipped: {shown}")
        self.written = written
        self.skipped = skipped


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
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root as the caller named it
    try:
        return _backup_dir(w, fd, "/", os.fstat(fd), str(root), {})
    finally:
        os.close(fd)


def _child(spath: str, name: str) -> str:
    return f"{spath.rstrip('/')}/{name}"


def _backup_dir(w: SnapshotWriter, fd: int, spath: str, st: os.stat_result, shown: str,
                seen: dict[tuple[int, int], str]) -> int:
    """One directory (already open as ``fd``): its record, its files and links, then its subdirectories."""
    w.add_entry(spath, RecordKind.DIR, **_attrs(st))
    count = 1
    subdirs = []
    for name in sorted(os.listdir(fd)):
        child, full = _child(spath, name), os.path.join(shown, name)
        try:
            lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed since the listing
        if stat.S_ISDIR(lst.st_mode):
            subdirs.append((name, child, full))
        elif stat.S_ISLNK(lst.st_mode):
            try:
                w.add_entry(child, RecordKind.SYMLINK, link_target=os.readlink(name, dir_fd=fd), **_attrs(lst))
            except OSError as e:
                w.add_error(child, f"unreadable symlink: {e.strerror}")
            count += 1
        elif stat.S_ISREG(lst.st_mode):
            count += _backup_file(w, fd, name, child, full, lst, seen)
        else:
            log.info("skipping special file %s", full)
    for name, child, full in subdirs:
        try:
            sub = os.open(name, _O_DIR, dir_fd=fd)
        except OSError as e:
            w.add_error(child, _changed(e, "directory"))
            log.warning("%s: %s (recorded as an error entry)", full, e)
            count += 1
            continue
        try:
            count += _backup_dir(w, sub, child, os.fstat(sub), full, seen)
        finally:
            os.close(sub)
    return count


def _backup_file(w: SnapshotWriter, dir_fd: int, name: str, spath: str, full: str, lst: os.stat_result,
                 seen: dict[tuple[int, int], str]) -> int:
    try:
        fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    except OSError as e:
        w.add_error(spath, _changed(e, "file"))
        log.warning("%s: %s (recorded as an error entry)", full, e)
        return 1
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            w.add_error(spath, "changed during the backup: no longer a regular file")
            return 1
        ino = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and ino in seen:
            w.add_entry(spath, RecordKind.HARDLINK, link_target=seen[ino], **_attrs(st))
            return 1
        seen[ino] = spath
        try:
            w.add_stream(spath, f, **_attrs(st))
        except OSError as e:
            w.add_error(spath, f"unreadable: {e.strerror}")
            log.warning("%s: %s (recorded as an error entry)", full, e)
    return 1


def _changed(e: OSError, what: str) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return f"changed during the backup: the {what} was replaced by a symlink or another type (not followed)"
    return f"unreadable: {e.strerror}"


# ----------------------------------------------------------------------------------------------------------------
# Restore

Records = Iterable[Record] | Callable[[], Iterable[Record]]
_RESTORED = (RecordKind.DIR, RecordKind.FILE, RecordKind.SYMLINK, RecordKind.HARDLINK)


def _strip(path: str, strip: str) -> str:
    if strip and strip != "/":
        prefix = strip.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix):] or "/"
    return path


def restore_records(store: Store, records: Records, dest: str | os.PathLike[str], *, overwrite: bool = False,
                    strip: str = "", sync: bool = True) -> int:
    """Write records below ``dest``; ``strip`` removes a leading snapshot path prefix. Returns files written.

    ``records`` is read twice (validation, then writing): pass a callable returning a fresh iterator to stream a
    big snapshot's manifest twice instead of holding it in memory. Raises :class:`~.safefs.UnsafeRecord` before
    writing anything for a hostile record, and :class:`RestoreIncomplete` after writing when records were skipped.
    """
    if callable(records):
        again: Callable[[], Iterable[Record]] = records
    else:
        held = list(records)
        again = lambda: held  # noqa: E731
    dest_path = os.path.abspath(dest)
    existing = os.path.isdir(dest_path)
    if os.path.lexists(dest_path) and not existing:
        raise StoreError(f"{dest_path} exists and is not a directory")
    tree = SafeTree(dest_path, sync=sync) if existing else None
    try:
        plan, skipped = _plan(again(), strip, tree, overwrite)
        if tree is None:
            tree = SafeTree(dest_path, sync=sync)
        written = _write(store, again(), strip, tree, plan, overwrite)
    except BaseException:
        if tree is not None:
            tree.close(success=False)
        raise
    tree.close()
    if skipped:
        raise RestoreIncomplete(written, dest_path, skipped)
    return written


def _link_parts(rec: Record, strip: str) -> tuple[str, ...]:
    lt = rec.link_target
    if lt is None:
        raise UnsafeRecord(rec.path, "it has no link target")
    return split_path(_strip(lt, strip), rec.path)


def _plan(records: Iterable[Record], strip: str, tree: SafeTree | None,
          overwrite: bool) -> tuple[RecordPlan, list[str]]:
    """Every refusal, before the first byte is written: hostile records, and what is in the way in the target."""
    plan = RecordPlan()
    skipped: list[str] = []
    for rec in records:
        p = rec.path
        kind = rec.kind
        parts = split_path(_strip(p, strip), p)
        if kind == RecordKind.ERROR:
            skipped.append(f"{p} (not backed up: {rec.error})")
            continue
        if kind not in _RESTORED:
            skipped.append(f"{p} (unknown record kind {str(kind)!r})")
            continue
        if kind == RecordKind.SYMLINK and (rec.link_target is None or "\0" in rec.link_target):
            raise UnsafeRecord(p, "its symlink target is missing or contains a NUL byte")
        plan.add(parts, kind, p, link_to=_link_parts(rec, strip) if kind == RecordKind.HARDLINK else None)
        if tree is not None:
            _check_existing(tree, parts, kind, p, overwrite)
    return plan, skipped


def _check_existing(tree: SafeTree, parts: tuple[str, ...], kind: str, p: str, overwrite: bool) -> None:
    where = os.path.join(tree.root, *parts)
    try:
        there = tree.probe(parts)
    except TargetBlocked as exc:
        raise TargetBlocked(f"cannot restore {p}: {exc}") from None
    if there is None:
        return
    if kind == "d":
        if there != "d":
            raise StoreError(f"{where} exists and is not a directory (the snapshot has a directory {p}): remove it "
                             "or restore into an empty directory")
        return
    if there == "d":
        raise StoreError(f"{where} is a directory but the snapshot has a file or link {p}: remove it or restore "
                         "into an empty directory")
    if not overwrite:
        raise StoreError(f"{where} already exists (pass --overwrite to replace it)")


def _write(store: Store, records: Iterable[Record], strip: str, tree: SafeTree, plan: RecordPlan,
           overwrite: bool) -> int:
    dirs: list[tuple[tuple[str, ...], Record]] = []
    written = 0
    for rec in records:
        kind = rec.kind
        if kind not in _RESTORED:
            continue
        parts = split_path(_strip(rec.path, strip), rec.path)
        if plan.kinds.get(parts) != kind:
            raise UnsafeRecord(rec.path, "the snapshot's records changed between validation and restore")
        attrs = {"mtime_ns": rec.mtime_ns, "uid": rec.uid, "gid": rec.gid}
        if kind == RecordKind.DIR:
            tree.mkdir(parts)
            dirs.append((parts, rec))
        elif kind == RecordKind.SYMLINK:
            if rec.link_target is None:
                raise UnsafeRecord(rec.path, "the snapshot's records changed between validation and restore")
            tree.symlink(parts, rec.link_target, replace=overwrite, **attrs)
        elif kind == RecordKind.HARDLINK:
            tree.hardlink(parts, _link_parts(rec, strip), replace=overwrite)
        else:
            with store.open_record(rec) as src:
                tree.write_file(parts, src.iter_chunks(), replace=True, mode=rec.mode, **attrs)
            written += 1
    for parts, rec in reversed(dirs):
        tree.set_attrs(parts, mode=rec.mode, mtime_ns=rec.mtime_ns, uid=rec.uid, gid=rec.gid)
    return written
