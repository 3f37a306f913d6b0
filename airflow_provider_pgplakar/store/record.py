"""The typed view of a snapshot record: what readers outside ``store/`` see of a manifest entry.

On storage a record is a msgpack map with short keys (docs/format.md §6.3); those keys are an encoding detail of the
store, read only in this module. :func:`decode_record` checks each field's type once, because the manifest is input
too: a record with a wrong-typed field (a tampered or corrupt store) raises :class:`~.errors.IntegrityError`
naming the record, instead of a ``TypeError`` later in a restore.

A :class:`Record` holds the checked map itself (one slot, no copy) and exposes it through typed read-only
properties: a frozen dataclass with one attribute per field cost ~10x more to build (its ``__init__`` sets each
field through ``object.__setattr__``), which a physical restore or an ``ls`` of tens of thousands of records pays
once per record.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from .errors import IntegrityError

__all__ = ["Record", "RecordKind", "decode_record"]


class RecordKind(StrEnum):
    """The kinds of record a writer makes (their values are the stored codes)."""

    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    HARDLINK = "h"
    ERROR = "e"  # a path the backup could not read (see :attr:`Record.error`)


_KINDS: dict[str, RecordKind] = {k.value: k for k in RecordKind}
_EMPTY: Mapping[str, Any] = MappingProxyType({})

# stored key -> (attribute name, type); ``p`` and ``k`` are checked apart. ``c`` and ``cl`` are store-internal (where
# the content is: inline chunk refs, or chunk-list blob IDs); their elements are checked where they are read.
_FIELDS: dict[str, tuple[str, type]] = {
    "s": ("size", int), "m": ("mode", int), "t": ("mtime_ns", int), "u": ("uid", int), "g": ("gid", int),
    "un": ("uname", str), "gn": ("gname", str), "lt": ("link_target", str), "e": ("error", str),
    "d": ("sha256", bytes), "b": ("blake3", bytes), "x": ("meta", dict), "c": ("chunks", list),
    "cl": ("chunk lists", list),
}
_KEYS = {name: key for key, (name, _type) in _FIELDS.items()}


@dataclass(frozen=True, slots=True, repr=False)
class Record:
    """One record of a snapshot, as :meth:`~.repo.Store.records` yields it; build one with :meth:`of`.

    ``kind`` is a :class:`RecordKind`, or the stored code as a plain string for a kind this version does not know
    (a newer writer's): restores skip and report those. Absent attributes are ``None`` (``meta``: empty).
    A file record's whole-content digest is ``blake3`` (BLAKE3, what ``b3sum`` prints); records written before
    2026-12-03 carry ``sha256`` instead; both are absent for records stored without one (``add_stream(digest=False)``).
    """

    _raw: dict[str, Any]  # the stored map, checked by decode_record; never mutated

    @classmethod
    def of(cls, path: str, kind: RecordKind | str, **attrs: Any) -> Record:
        """A record from attributes (``size=``, ``mode=``, ``meta=``, ...), checked like a stored one."""
        return _with({"p": path, "k": str(kind)}, attrs)

    def replace(self, **attrs: Any) -> Record:
        """A copy with some attributes changed (``None`` removes one); the content stays the same."""
        return _with(dict(self._raw), attrs)

    @property
    def path(self) -> str:
        p: str = self._raw["p"]
        return p

    @property
    def kind(self) -> RecordKind | str:
        code: str = self._raw["k"]
        return _KINDS.get(code, code)

    @property
    def is_file(self) -> bool:
        return self.kind is RecordKind.FILE

    @property
    def size(self) -> int | None:
        value: int | None = self._raw.get("s")
        return value

    @property
    def mode(self) -> int | None:
        value: int | None = self._raw.get("m")
        return value

    @property
    def mtime_ns(self) -> int | None:
        value: int | None = self._raw.get("t")
        return value

    @property
    def uid(self) -> int | None:
        value: int | None = self._raw.get("u")
        return value

    @property
    def gid(self) -> int | None:
        value: int | None = self._raw.get("g")
        return value

    @property
    def uname(self) -> str | None:
        value: str | None = self._raw.get("un")
        return value

    @property
    def gname(self) -> str | None:
        value: str | None = self._raw.get("gn")
        return value

    @property
    def link_target(self) -> str | None:
        value: str | None = self._raw.get("lt")
        return value

    @property
    def meta(self) -> Mapping[str, Any]:
        meta = self._raw.get("x")
        return MappingProxyType(meta) if meta else _EMPTY

    @property
    def error(self) -> str | None:
        value: str | None = self._raw.get("e")
        return value

    @property
    def sha256(self) -> bytes | None:
        value: bytes | None = self._raw.get("d")
        return value

    @property
    def blake3(self) -> bytes | None:
        value: bytes | None = self._raw.get("b")
        return value

    @property
    def _chunks(self) -> list[Any] | None:
        """Inline chunk refs (``[blob ID, length]``...), or None: read by store/reader.py only."""
        value: list[Any] | None = self._raw.get("c")
        return value

    def chunk_list_ids(self) -> Iterator[bytes]:
        """IDs of the chunk-list blobs (store-internal: the reader and prune use them)."""
        for cl_id in self._raw.get("cl") or ():
            if type(cl_id) is not bytes:
                raise IntegrityError(f"record {self.path!r}: a chunk list ID is not a blob ID")
            yield cl_id

    def __repr__(self) -> str:
        attrs = "".join(f", {_FIELDS[k][0]}={v!r}" for k, v in self._raw.items() if k in _FIELDS and k not in
                        ("c", "cl"))
        return f"Record(path={self.path!r}, kind={str(self.kind)!r}{attrs})"


def _with(raw: dict[str, Any], attrs: dict[str, Any]) -> Record:
    for name, value in attrs.items():
        if name not in _KEYS:
            raise TypeError(f"unknown record attribute {name!r}")
        if value is None:
            raw.pop(_KEYS[name], None)
        else:
            raw[_KEYS[name]] = dict(value) if name == "meta" else value
    return decode_record(raw, "a record built in memory")


def decode_record(raw: object, where: str) -> Record:
    """The :class:`Record` of one stored manifest entry; ``where`` names its manifest in errors ("snapshot 1a2b3c4d").

    Unknown keys are ignored (a newer writer may add some); a known key with a value of the wrong type is refused.
    """
    if type(raw) is not dict:
        raise IntegrityError(f"a record of {where} is not a map: the manifest is corrupt or was tampered with")
    # a snapshot's records come in a few shapes (keys and value types): each shape is checked once
    shape = (tuple(raw), tuple(map(type, raw.values())))
    if shape not in _CHECKED_SHAPES:
        _check(raw, where)
        if len(_CHECKED_SHAPES) < MAX_CHECKED_SHAPES:
            _CHECKED_SHAPES.add(shape)
    return Record(raw)


def _check(raw: dict[str, Any], where: str) -> None:
    path = raw.get("p")
    if type(path) is not str:
        raise IntegrityError(f"a record of {where} has no path (found {type(path).__name__}): the manifest is "
                             "corrupt or was tampered with")
    code = raw.get("k")
    if type(code) is not str:
        raise IntegrityError(f"record {path!r} of {where} has no kind (found {type(code).__name__}): the manifest "
                             "is corrupt or was tampered with")
    for key, value in raw.items():
        spec = _FIELDS.get(key)
        if spec is not None and type(value) is not spec[1]:
            raise IntegrityError(f"record {path!r} of {where}: its {spec[0]} is a {type(value).__name__}, not "
                                 f"a {spec[1].__name__} (the manifest is corrupt or was tampered with)")


MAX_CHECKED_SHAPES = 4096
_CHECKED_SHAPES: set[tuple[tuple[str, ...], tuple[type, ...]]] = set()
