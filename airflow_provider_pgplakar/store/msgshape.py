"""Bounded msgpack decoding of what is read from storage (docs/format.md §5.2, §6.1, §6.2).

msgpack makes one Python object of each encoded one: ``[[], [], ...]`` costs ~64 bytes of objects per byte, so a
key holder's 16 MiB leaf or 64 MiB snapshot file would become gigabytes of objects. The objects that legitimately
grow large grow only in arrays of fixed-shape elements: a snapshot's leaf list, a huge file's ``cl`` IDs, the blob
entries of a pack header or an index segment. Those arrays are matched here against one regular expression of
their element's exact encoding (in C, without making an object); everything else in an object is held to a byte
budget from what writers make. Both checks run on the encoded bytes, before anything is unpacked. An object no
bigger than its budget is not walked at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgpack

# encodings msgpack-python gives the values our writers put in these arrays (non-negative ints, bytes, str)
_UINT = rb"(?:[\x00-\x7f]|\xcc.|\xcd.{2}|\xce.{4}|\xcf.{8})"
BIN32 = rb"\xc4\x20.{32}"
HEX64 = rb"\xd9\x40[0-9a-f]{64}"
_ARRAY = rb"(?:[\x90-\x9f]|\xdc.{2}|\xdd.{4})"
BLOB_ENTRY = rb"\x95[\x00-\x02]" + BIN32 + _UINT * 3  # [type, blob_id, offset, stored_len, raw_len]
LEAF_REF = rb"\x92" + BIN32 + _UINT  # [leaf_id, record count]
PACK_ENTRY = (rb"\x85\xa2id" + HEX64 + rb"\xa4size" + _UINT + rb"\xa4kind\xa4(?:data|tree)\xa4salt" + BIN32
              + rb"\xa5blobs" + _ARRAY + rb"(?:" + BLOB_ENTRY + rb")*")  # an index segment's pack, as writers order it


def _elements(elem: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"(?:" + elem + rb")*", re.S)


PACK_HEADER = re.compile(_ARRAY + rb"(?:" + BLOB_ENTRY + rb")*", re.S)

Path = tuple[bytes, ...]  # packed map keys from the object's root; ANY stands for every element of an array
ANY = b"*"


def key(name: str) -> bytes:
    return msgpack.packb(name)  # type: ignore[no-any-return]


class Shape:
    """Where an object may be big: ``bulk`` maps paths to the arrays whose elements must all match an element
    pattern; everything else (keys and headers included) adds up to at most ``budget`` bytes."""

    def __init__(self, budget: int, bulk: Mapping[tuple[str, ...], bytes] | None = None) -> None:
        self.budget = budget
        self.bulk = {tuple(ANY if k == "*" else key(k) for k in path): _elements(elem)
                     for path, elem in (bulk or {}).items()}
        self.prefixes = {p[:i] for p in self.bulk for i in range(len(p))}


def _container(b: int) -> str:
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        return "map"
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        return "array"
    return ""


_HEADER_LEN = {0xDC: 3, 0xDD: 5, 0xDE: 3, 0xDF: 5}


class _Over(Exception):
    pass


class _Walk:
    def __init__(self, data: bytes, shape: Shape) -> None:
        self.data, self.shape = data, shape
        self.up = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
        self.up.feed(data)
        self.other = 0

    def _add(self, n: int) -> None:
        self.other += n
        if self.other > self.shape.budget:
            raise _Over

    def value(self, path: Path) -> None:
        up, data = self.up, self.data
        start = up.tell()
        pattern = self.shape.bulk.get(path)
        if pattern is not None:
            up.skip()
            end = up.tell()
            if _container(data[start]) == "array":
                body = start + _HEADER_LEN.get(data[start], 1)
                if pattern.fullmatch(data, body, end):
                    self._add(body - start)
                    return
            self._add(end - start)  # not of the expected shape: judged by its size only
            return
        kind = _container(data[start]) if path in self.shape.prefixes else ""
        if kind == "map":
            n = up.read_map_header()
            self._add(up.tell() - start)
            for _ in range(n):
                k = up.tell()
                up.skip()
                self._add(up.tell() - k)
                self.value((*path, data[k : up.tell()]))
        elif kind == "array":
            n = up.read_array_header()
            self._add(up.tell() - start)
            for _ in range(n):
                self.value((*path, ANY))
        else:
            up.skip()
            self._add(up.tell() - start)


def outside_bytes(data: bytes, shape: Shape, *, sequence: bool = False) -> int | None:
    """Bytes of ``data`` (one msgpack object, or with ``sequence`` a concatenation of them, each of ``shape``) that
    lie outside its well-formed bulk arrays; None when they exceed the shape's budget. Decodes nothing, so it is
    safe on hostile input; malformed msgpack raises ``ValueError`` (msgpack's exceptions derive from it)."""
    if len(data) <= shape.budget:
        return len(data)
    walk = _Walk(data, shape)
    try:
        walk.value(())
        while sequence and walk.up.tell() < len(data):
            walk.value(())
    except _Over:
        return None
    except msgpack.OutOfData:
        raise ValueError("truncated msgpack data") from None
    return walk.other
