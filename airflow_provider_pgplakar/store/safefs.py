"""Restore writes confined to one directory: a snapshot record can never make a restore touch anything outside it.

Records come from a snapshot, which may have been made from a hostile server, a tampered plaintext store or a
directory that changed while it was read. So (issue 9):

- :class:`RecordPlan` validates the whole record list *before* anything is written: every path is split into
  components (no ``..``, ``.``, empty component, NUL or relative path), no record may sit below a symlink record
  or a file record, no path may be recorded twice with different kinds, a hard link must point at an earlier file
  record of the same restore. A violation is :class:`UnsafeRecord`, naming the record.
- :class:`SafeTree` writes below a root directory fd: every component is opened with ``O_DIRECTORY|O_NOFOLLOW``
  relative to its parent's fd (``openat``), so a symlink — planted in the target or created by an earlier record —
  is never followed; files are written to random temporary names created ``O_EXCL|O_NOFOLLOW`` and renamed (or
  created ``O_EXCL`` in place); owner, mode and mtime are set on fds or with ``follow_symlinks=False``.
- Durability: with ``sync`` every written file is fsynced (16 threads, overlapping the writes) and every touched
  directory afterwards, before :meth:`SafeTree.close` returns, as ``pg_basebackup`` does by default. Setting the
  files' owner, mode and mtime on those threads too (not on the thread that creates the files) was tried and
  dropped: the fsync threads then waited for the GIL 80 % of their time instead of 57 %, and restores with fsync
  took 0.18 CPU s more in two alternating A/Bs (README "Restore CPU"), with no wall-time gain. A large file's
  writeback is started while it is still being written (:func:`start_writeback` every 8 MiB, from
  :mod:`.batchrestore`; PostgreSQL's ``pg_flush_data`` does the same before its fsyncs), so the disk works while the
  restore still decodes: without it, restores of the benchmark data directory took 0.12-0.32 s longer (0.64-0.81 s
  with it, three idle rounds). ``syncfs(2)`` (one call for the whole filesystem) was not used: it covers every
  process's dirty data on that filesystem, not exactly our files, so a restore would wait for, and could report the
  write errors of, other writers.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import stat
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import StoreError

__all__ = ["Owner", "RecordPlan", "SafeTree", "UnsafeRecord", "split_path", "start_writeback"]

Parts = tuple[str, ...]
KIND_NAMES = {"d": "directory", "f": "file", "l": "symlink", "h": "hard link", "e": "error"}
TMP_PREFIX = ".pgplakar-tmp-"
SYNC_THREADS = 16
SYNC_IN_FLIGHT = 64  # open fds waiting for their fsync
DIR_FD_CACHE = 128
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeRecord(StoreError):
    """A snapshot record that would write outside its target (or through a symlink); nothing was written."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"refusing snapshot record {path!r}: {why} (nothing was restored; the snapshot may come "
                         "from a hostile source or a directory that changed during its backup)")
        self.path = path


def split_path(path: str, record: str | None = None) -> Parts:
    """``/a/b`` -> ``("a", "b")``; ``/`` -> ``()``. Refuses relative paths, ``.``, ``..``, empty parts and NUL."""
    name = record if record is not None else path
    if not isinstance(path, str) or not path.startswith("/"):
        raise UnsafeRecord(str(name), "its path is not absolute within the snapshot")
    if "\0" in path:
        raise UnsafeRecord(name, "its path contains a NUL byte")
    if path == "/":
        return ()
    parts = tuple(path[1:].split("/"))
    for p in parts:
        if p == "":
            raise UnsafeRecord(name, "its path has an empty component")
        if p in (".", ".."):
            raise UnsafeRecord(name, f"its path has a {p!r} component")
    return parts


class RecordPlan:
    """Kinds by path below one root, validated record by record (call :meth:`add` for all before writing)."""

    def __init__(self) -> None:
        self.kinds: dict[Parts, str] = {(): "d"}

    def add(self, parts: Parts, kind: str, record: str, *, link_to: Parts | None = None) -> None:
        if kind not in ("d", "f", "l", "h"):
            raise UnsafeRecord(record, f"unknown record kind {kind!r}")
        if not parts and kind != "d":
            raise UnsafeRecord(record, f"a {KIND_NAMES[kind]} record cannot replace the target directory itself")
        for i in range(1, len(parts)):
            parent = parts[:i]
            k = self.kinds.get(parent)
            if k is None:
                self.kinds[parent] = "d"  # created implicitly; a later record of another kind collides with it
            elif k == "l":
                raise UnsafeRecord(record, f"its parent /{'/'.join(parent)} is a symlink record (restores never "
                                           "write through symlinks)")
            elif k != "d":
                raise UnsafeRecord(record, f"its parent /{'/'.join(parent)} is a {KIND_NAMES[k]} record")
        prev = self.kinds.get(parts)
        if prev is not None and not (prev == kind == "d"):
            if prev == kind:
                raise UnsafeRecord(record, "the path appears twice")
            raise UnsafeRecord(record, f"it is a {KIND_NAMES[kind]} but an earlier record made it a "
                                       f"{KIND_NAMES[prev]}")
        if kind == "h":
            if link_to is None or self.kinds.get(link_to) not in ("f", "h"):
                where = "/" + "/".join(link_to) if link_to is not None else "?"
                raise UnsafeRecord(record, f"its hard link target {where} is not an earlier file record of this "
                                           "restore (hard links may only point inside the target)")
        self.kinds[parts] = kind


@dataclass(frozen=True)
class Owner:
    """Numeric owner to give restored entries (only applied as root)."""

    uid: int
    gid: int


class _Syncer:
    """fsync + close file descriptors on a thread pool, a bounded number in flight."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="pgplakar-fsync")
        self.slots = threading.BoundedSemaphore(SYNC_IN_FLIGHT)
        self.futures: list[Future[None]] = []

    def _run(self, fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            self.slots.release()

    def submit(self, fd: int) -> None:
        self.slots.acquire()
        self.futures.append(self.pool.submit(self._run, fd))
        if len(self.futures) > 4 * SYNC_IN_FLIGHT:
            self._collect(done_only=True)

    def _collect(self, done_only: bool = False) -> None:
        keep = []
        for f in self.futures:
            if done_only and not f.done():
                keep.append(f)
            else:
                f.result()
        self.futures = keep

    def finish(self) -> None:
        try:
            self._collect()
        finally:
            self.pool.shutdown(wait=True)


class SafeTree:
    """Writes below ``root`` (created if missing, mode ``root_mode``) without following any symlink below it.

    The root path itself is the caller's choice and resolved normally; everything below is opened relative to
    directory fds with ``O_NOFOLLOW``. Use as a context manager; :meth:`close` syncs (unless ``sync=False``).
    """

    def __init__(self, root: str | os.PathLike[str], *, root_mode: int = 0o755, sync: bool = True,
                 owner: Owner | None = None) -> None:
        self.root = os.path.abspath(root)
        self.sync = sync
        self.as_root = os.geteuid() == 0
        self.owner = owner
        self._sync_dirs: set[Parts] = set()
        self._created_root = self._make_root(root_mode)
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: dict[Parts, int] = {(): self.root_fd}
        self._syncer = _Syncer() if sync else None
        self._closed = False

    def _make_root(self, mode: int) -> list[str]:
        """mkdir -p the root; returns the directories created (their parents are synced)."""
        created: list[str] = []
        path = self.root
        missing = []
        while not os.path.lexists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for p in reversed(missing):
            try:
                os.mkdir(p, mode if p == self.root else 0o777)  # parents: as mkdir -p (umask applies)
                created.append(p)
            except FileExistsError:
                pass
        return created

    @property
    def created(self) -> tuple[str, ...]:
        """The directories this tree made for its root (``mkdir -p``), outermost first: the root itself last if it
        did not exist before."""
        return tuple(self._created_root)

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self) -> SafeTree:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(success=exc_type is None)

    def close(self, success: bool = True) -> None:
        """Finish pending fsyncs (files, then every touched directory) and close all descriptors."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._syncer is not None:
                try:
                    self._syncer.finish()
                except OSError:
                    if success:
                        raise  # after a failure, the first error is the one to report
                if success:
                    for parts in sorted(self._sync_dirs, key=len, reverse=True):
                        os.fsync(self._dir(parts, create=False))
                    os.fsync(self.root_fd)
                    for p in self._created_root:
                        _fsync_path(os.path.dirname(p))
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    # -- directories -----------------------------------------------------------------------------------------
    def _trim(self) -> None:
        if len(self._fds) > DIR_FD_CACHE:
            for parts, fd in list(self._fds.items()):
                if parts:
                    os.close(fd)
                    del self._fds[parts]

    def _dir(self, parts: Parts, *, create: bool = True, mode: int = 0o700) -> int:
        """The fd of directory ``parts`` below the root; missing ones are created when ``create``."""
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        parent = self._dir(parts[:-1], create=create, mode=mode)
        name = parts[-1]
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, mode, dir_fd=parent)
                self._sync_dirs.add(parts[:-1])
            except FileExistsError:
                pass
            fd = self._open_dir(parent, name, parts)
        except (NotADirectoryError, OSError) as exc:
            raise _blocked(parts, exc) from None
        self._fds[parts] = fd
        return fd

    def _open_dir(self, parent: int, name: str, parts: Parts) -> int:
        try:
            return os.open(name, _O_DIR, dir_fd=parent)
        except OSError as exc:
            raise _blocked(parts, exc) from None

    def mkdir(self, parts: Parts, mode: int = 0o700) -> None:
        self._trim()
        self._dir(parts, mode=mode)

    def probe(self, parts: Parts) -> str | None:
        """What is at ``parts`` now, without following symlinks: a kind letter, or None when absent.

        A parent that exists but is not a directory (a symlink planted in the target, a file) raises
        :class:`TargetBlocked`."""
        if not parts:
            return "d"
        self._trim()
        try:
            parent = self._dir(parts[:-1], create=False)
        except FileNotFoundError:
            return None
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return "d"
        if stat.S_ISLNK(st.st_mode):
            return "l"
        return "f"

    def set_attrs(self, parts: Parts, *, mode: int | None = None, mtime_ns: int | None = None,
                  uid: int | None = None, gid: int | None = None) -> None:
        """Owner (as root), mode and mtime of an existing directory or file, through an ``O_NOFOLLOW`` fd."""
        self._trim()
        if parts:
            parent = self._dir(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
            except OSError as exc:
                raise _blocked(parts, exc) from None
        else:
            fd = os.dup(self.root_fd)
        try:
            self._fd_attrs(fd, mode, mtime_ns, uid, gid)
        finally:
            os.close(fd)

    def _fd_attrs(self, fd: int, mode: int | None, mtime_ns: int | None, uid: int | None, gid: int | None) -> None:
        owner = self._owner(uid, gid)
        if owner is not None:
            os.fchown(fd, *owner)  # before chmod: chown clears set-id bits
        if mode is not None:
            os.fchmod(fd, mode & 0o7777)
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _owner(self, uid: int | None, gid: int | None) -> tuple[int, int] | None:
        if not self.as_root:
            return None
        if self.owner is not None:
            return self.owner.uid, self.owner.gid
        if uid is None and gid is None:
            return None
        return (-1 if uid is None else uid), (-1 if gid is None else gid)

    # -- entries ---------------------------------------------------------------------------------------------
    def write_file(self, parts: Parts, chunks: Iterable[Any], *, replace: bool = False, mode: int | None = None,
                   mtime_ns: int | None = None, uid: int | None = None, gid: int | None = None) -> int:
        """Write ``chunks`` to ``parts``; returns the byte count.

        ``replace``: write a random temporary name (``O_EXCL|O_NOFOLLOW``) and rename it over whatever file or
        symlink is there (the symlink itself is replaced, never followed). Else create the final name ``O_EXCL``.
        """
        self._trim()
        parent = self._dir(parts[:-1])
        name = parts[-1]
        tmp = _tmp_name() if replace else name
        fd = os.open(tmp, _O_NEW_FILE, 0o600, dir_fd=parent)
        size = 0
        try:
            for piece in chunks:
                view = memoryview(piece)
                size += len(view)
                while view:
                    view = view[os.write(fd, view):]
            self._fd_attrs(fd, mode, mtime_ns, uid, gid)
            if replace:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            os.close(fd)
            if replace:
                _unlink_quietly(parent, tmp)
            raise
        self._sync_dirs.add(parts[:-1])
        if self._syncer is not None:
            self._syncer.submit(fd)
        else:
            os.close(fd)
        return size

    def create_file(self, parts: Parts) -> int:
        """Create ``parts`` (``O_EXCL|O_NOFOLLOW``, mode 0600, below no-follow directory fds) and return its fd for
        the caller to fill (with ``pwrite``, :mod:`.batchrestore`); hand it back with :meth:`file_done`."""
        self._trim()
        parent = self._dir(parts[:-1])
        fd = os.open(parts[-1], _O_NEW_FILE, 0o600, dir_fd=parent)
        self._sync_dirs.add(parts[:-1])
        return fd

    def file_done(self, fd: int, *, mode: int | None = None, mtime_ns: int | None = None, uid: int | None = None,
                  gid: int | None = None) -> None:
        """Set the attributes of a file made by :meth:`create_file` and queue its fsync (or close it)."""
        try:
            self._fd_attrs(fd, mode, mtime_ns, uid, gid)
        except BaseException:
            os.close(fd)
            raise
        if self._syncer is not None:
            self._syncer.submit(fd)
        else:
            os.close(fd)

    def symlink(self, parts: Parts, target: str, *, replace: bool = False, mtime_ns: int | None = None,
                uid: int | None = None, gid: int | None = None) -> None:
        """Create the symlink itself (its target is never opened); ``replace`` renames it over an existing entry."""
        self._trim()
        parent = self._dir(parts[:-1])
        name = parts[-1]
        tmp = _tmp_name() if replace else name
        os.symlink(target, tmp, dir_fd=parent)
        try:
            owner = self._owner(uid, gid)
            if owner is not None:
                os.chown(tmp, *owner, dir_fd=parent, follow_symlinks=False)
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
            if replace:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            if replace:
                _unlink_quietly(parent, tmp)
            raise
        self._sync_dirs.add(parts[:-1])

    def hardlink(self, parts: Parts, existing: Parts, *, replace: bool = False) -> None:
        """Hard-link ``parts`` to ``existing`` (a file below the same root, reached without following links)."""
        self._trim()
        src_parent = self._dir(existing[:-1], create=False)
        parent = self._dir(parts[:-1])
        name = parts[-1]
        tmp = _tmp_name() if replace else name
        os.link(existing[-1], tmp, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
        if replace:
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                _unlink_quietly(parent, tmp)
                raise
        self._sync_dirs.add(parts[:-1])


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting (Linux ``sync_file_range``
    with ``SYNC_FILE_RANGE_WRITE``, as PostgreSQL's ``pg_flush_data``): the disk works while the restore still
    decodes, and the fsync that follows finds little left to do. Only a hint: durability is the fsync's."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


class TargetBlocked(StoreError):
    """A path below the target cannot be reached without following a symlink (or crosses a file)."""


def _blocked(parts: Parts, exc: OSError) -> OSError | StoreError:
    import errno

    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return TargetBlocked(f"/{'/'.join(parts)} in the target is a symlink or not a directory: restores never "
                             "write through symlinks (remove it, or restore into an empty directory)")
    return exc


def _tmp_name() -> str:
    return TMP_PREFIX + secrets.token_hex(12)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ += ["TargetBlocked"]
