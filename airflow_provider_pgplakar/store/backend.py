"""The backend contract: a flat key/value object store with create-only writes.

Invariants every backend MUST keep (tested by ``tests/store/test_backend_conformance.py`` on each backend):

- ``put(key, data, create_only=True)`` is atomic: a reader sees either nothing or all of ``data``. If the key exists,
  it raises :class:`AlreadyExists` and leaves the existing object untouched.
- ``put(key, data, create_only=False)`` atomically replaces the object (used only for a writer's own lease).
- ``get(key, offset, length)`` returns exactly ``length`` bytes (or the rest of the object when ``length`` is None)
  or raises; a missing key raises :class:`ObjectNotFound`.
- ``list(prefix)`` yields every complete object under ``prefix`` (never temp files), with the size and the
  modification time as the *storage* clock saw it, so age decisions do not depend on the client clock.
- ``delete(key)`` is idempotent.
- A ``list`` that starts after a ``put`` returned sees that object (read-after-write and list consistency).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ObjInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, storage clock


class Backend(Protocol):
    location: str

    def put(self, key: str, data: bytes | bytearray, *, create_only: bool = True) -> None: ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def list(self, prefix: str) -> Iterator[ObjInfo]: ...

    def stat(self, key: str) -> ObjInfo | None: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key (a missing one is no failure); S3 sends 1000 per request. Raises one StoreError naming
        every key that could not be deleted, after trying them all."""
        ...

    def now(self) -> float:
        """The storage clock now (used to judge lease age against ``ObjInfo.mtime``)."""
        ...
