"""Local-directory backend: create-only writes are temp file + fsync + ``link`` + fsync(dir).

``os.link`` fails when the target exists, which gives create-only semantics without a lock; the fsyncs make a
renamed-but-empty file after a power loss impossible (Kloset's fs backend skips them; we do not).

Objects are created 0600 and directories 0700 whatever the process umask (``config`` and ``keys/*`` hold what an
offline passphrase guess needs); a new directory's parent is fsynced so the directory survives a power loss.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .backend import ObjInfo
from .errors import AlreadyExists, ObjectNotFound, StoreError

TMP_PREFIX = ".tmp."
FILE_MODE = 0o600
DIR_MODE = 0o700


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0700 (chmod after mkdir: the umask may have removed bits or left others), fsyncing the
    parent of every missing directory, so a new ``packs/xx/`` (and the object just linked into it) survives a power
    loss, not only the object's own directory entry."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
            os.chmod(d, DIR_MODE)
        except FileExistsError:
            pass  # a concurrent writer made it: sync its entry anyway, that writer may not have yet
        _fsync_dir(d.parent)


class LocalBackend:
    """Objects are files below ``root``; keys use ``/`` separators."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes | bytearray, *, create_only: bool = True) -> None:
        final = self._path(key)
        _make_dirs(final.parent)
        tmp = final.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        from .failpoints import failpoint

        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # the umask only removes bits; make it exactly 0600 either way
        with open(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            failpoint("mid-upload", key)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        try:
            if create_only:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise AlreadyExists(f"{key} already exists in {self.location}") from None
            else:
                os.replace(tmp, final)
                tmp = None  # type: ignore[assignment]
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                data = f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} is missing from {self.location}") from None
        if length is not None and len(data) != length:
            raise ObjectNotFound(
                f"{key} in {self.location} is truncated: wanted {length} bytes at {offset}, got {len(data)}"
            )
        return data

    def list(self, prefix: str) -> Iterator[ObjInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                yield ObjInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def list_temp_files(self) -> Iterator[ObjInfo]:
        """Leftovers of interrupted writes (prune removes those older than a day)."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    p = Path(dirpath) / name
                    st = p.stat()
                    yield ObjInfo(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)

    def stat(self, key: str) -> ObjInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    def now(self) -> float:
        return time.time()
