"""The typed record view (store/record.py): every kind decodes to its attributes, and a manifest entry with a
wrong-typed field (a tampered or corrupt store) is refused with an error naming the record, never a ``TypeError``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.files import RestoreIncomplete, restore_records
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.record import Record, RecordKind, decode_record
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.writer import SnapshotWriter
from tests.store.conftest import PASSPHRASE

MTIME = 1_700_000_000_123_456_789


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Store]:
    st = Store.create(str(tmp_path / "store"), PASSPHRASE)
    yield st
    st.close()


def _tampered(store: Store, *raw: Any) -> str:
    """A snapshot whose manifest holds ``raw`` entries as given (as a tampered store would), after one good file."""
    with store.writer() as w:
        w.add_bytes("/good", b"good")
        for entry in raw:
            _add_raw(w, entry)
    return w.snapshot_id


def _add_raw(w: SnapshotWriter, entry: Any) -> None:
    assert w._manifest is not None
    w._manifest.add(entry)


def test_every_kind_decodes(local: Store) -> None:
    data = b"content " * 1000
    with local.writer() as w:
        w.add_entry("/d", "d", mode=0o750, mtime_ns=MTIME, uid=26, gid=27, uname="postgres", gname="pgroup")
        w.add_bytes("/d/f", data, mode=0o640, mtime_ns=MTIME, uid=26, gid=27, meta={"type": "dump", "database": "a"})
        w.add_bytes("/d/nosha", b"x", digest=False)
        w.add_entry("/d/l", "l", link_target="../elsewhere", mode=0o777)
        w.add_entry("/d/h", "h", link_target="/d/f", mode=0o640)
        w.add_error("/d/bad", "unreadable: Permission denied")
        _add_raw(w, {"p": "/d/future", "k": "z", "newfield": [1, 2]})  # a newer writer's kind and key
    recs = {r.path: r for r in local.records(w.snapshot_id)}
    assert list(recs) == ["/d", "/d/f", "/d/nosha", "/d/l", "/d/h", "/d/bad", "/d/future"]
    assert all(type(r) is Record for r in recs.values())

    d = recs["/d"]
    assert (d.kind, d.mode, d.mtime_ns, d.uid, d.gid, d.uname, d.gname) == (
        RecordKind.DIR, 0o750, MTIME, 26, 27, "postgres", "pgroup")
    assert (d.size, d.sha256, d.link_target, d.error, dict(d.meta)) == (None, None, None, None, {})

    f = recs["/d/f"]
    assert f.kind is RecordKind.FILE and f.is_file and f.kind == "f"
    assert (f.size, f.blake3, f.sha256, f.mode, f.mtime_ns) == (len(data), blake3.blake3(data).digest(), None, 0o640,
                                                                MTIME)
    assert dict(f.meta) == {"type": "dump", "database": "a"} and f.uname is None
    with local.open_record(f) as src:
        assert b"".join(src.iter_chunks()) == data
    assert sum(n for _b, n in chunk_refs(local, f)) == len(data)

    assert (recs["/d/nosha"].size, recs["/d/nosha"].sha256, recs["/d/nosha"].blake3) == (1, None, None)
    assert (recs["/d/l"].kind, recs["/d/l"].link_target, recs["/d/l"].mode) == (RecordKind.SYMLINK, "../elsewhere",
                                                                                0o777)
    assert (recs["/d/h"].kind, recs["/d/h"].link_target) == (RecordKind.HARDLINK, "/d/f")
    assert (recs["/d/bad"].kind, recs["/d/bad"].error) == (RecordKind.ERROR, "unreadable: Permission denied")
    future = recs["/d/future"]
    assert future.kind == "z" and not isinstance(future.kind, RecordKind) and not future.is_file

    assert local.find_record(w.snapshot_id, "/d/f") == f
    assert [r.path for r in local.records(w.snapshot_id, "/d/l")] == ["/d/l"]


def test_record_is_immutable_and_slotted() -> None:
    rec = Record.of("/a", RecordKind.FILE, size=1, meta={"type": "dump"})
    with pytest.raises((AttributeError, TypeError)):  # TypeError from a frozen slots dataclass on Python 3.11
        rec.size = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec._raw = {}  # type: ignore[misc]
    assert not hasattr(rec, "__dict__")
    with pytest.raises(TypeError):
        rec.meta["x"] = 1  # type: ignore[index]
    assert rec.meta == {"type": "dump"}
    bigger = rec.replace(size=2, meta=None)
    assert (bigger.size, dict(bigger.meta), rec.size) == (2, {}, 1)
    with pytest.raises(IntegrityError, match="its size is a str"):
        rec.replace(size="2")
    with pytest.raises(TypeError, match="unknown record attribute 'owner'"):
        Record.of("/a", "f", owner="me")
    assert repr(rec) == "Record(path='/a', kind='f', size=1, meta={'type': 'dump'})"


@pytest.mark.parametrize(("entry", "message"), [
    ({"p": "/evil", "k": "f", "s": "12"}, r"record '/evil' of snapshot \w{8}: its size is a str, not a int"),
    ({"p": "/evil", "k": "f", "s": 1, "m": 1.5}, r"record '/evil' .*its mode is a float, not a int"),
    ({"p": "/evil", "k": "d", "m": True}, r"record '/evil' .*its mode is a bool"),
    ({"p": "/evil", "k": "f", "t": "yesterday"}, r"record '/evil' .*its mtime_ns is a str"),
    ({"p": "/evil", "k": "d", "u": "0"}, r"record '/evil' .*its uid is a str"),
    ({"p": "/evil", "k": "d", "g": None}, r"record '/evil' .*its gid is a NoneType"),
    ({"p": "/evil", "k": "d", "un": 0}, r"record '/evil' .*its uname is a int, not a str"),
    ({"p": "/evil", "k": "d", "gn": b"root"}, r"record '/evil' .*its gname is a bytes"),
    ({"p": "/evil", "k": "l", "lt": ["/etc"]}, r"record '/evil' .*its link_target is a list"),
    ({"p": "/evil", "k": "e", "e": 1}, r"record '/evil' .*its error is a int"),
    ({"p": "/evil", "k": "f", "s": 0, "d": "ab"}, r"record '/evil' .*its sha256 is a str, not a bytes"),
    ({"p": "/evil", "k": "f", "s": 0, "c": {}}, r"record '/evil' .*its chunks is a dict"),
    ({"p": "/evil", "k": "f", "s": 0, "cl": b"x"}, r"record '/evil' .*its chunk lists is a bytes"),
    ({"p": "/evil", "k": "f", "s": 0, "x": ["meta"]}, r"record '/evil' .*its meta is a list, not a dict"),
    ({"p": "/evil", "k": 3}, r"record '/evil' of snapshot \w{8} has no kind \(found int\)"),
    ({"p": "/evil"}, r"record '/evil' of snapshot \w{8} has no kind \(found NoneType\)"),
    ({"p": b"/evil", "k": "f"}, r"a record of snapshot \w{8} has no path \(found bytes\)"),
    ({"k": "f"}, r"a record of snapshot \w{8} has no path"),
    (["/evil", "f"], r"a record of snapshot \w{8} is not a map"),
])
def test_wrong_typed_field_is_refused_naming_the_record(local: Store, tmp_path: Path, entry: Any,
                                                        message: str) -> None:
    sid = _tampered(local, entry)
    with pytest.raises(IntegrityError, match=message):
        list(local.records(sid))
    with pytest.raises(IntegrityError, match=message):
        local.find_record(sid, "/nothing")
    # a restore refuses before it writes anything, even the good record before the bad one
    target = tmp_path / "target"
    with pytest.raises(IntegrityError, match=message):
        restore_records(local, lambda: local.records(sid), target)
    assert not target.exists()


@pytest.mark.parametrize(("chunks", "field"), [
    ([[b"\x00" * 32, "4"]], "c"), ([["ab", 4]], "c"), ([[b"\x00" * 32]], "c"), ([7], "c"), (["not an id"], "cl"),
])
def test_wrong_typed_chunk_reference_is_refused_naming_the_record(local: Store, chunks: list[Any],
                                                                  field: str) -> None:
    sid = _tampered(local, {"p": "/evil", "k": "f", "s": 4, field: chunks})
    rec = local.find_record(sid, "/evil")
    with pytest.raises(IntegrityError, match=r"record '/evil': a chunk (reference is not \[blob ID, length\]|list ID "
                                             r"is not a blob ID)"):
        with local.open_record(rec) as src:
            src.read()


def test_unknown_kind_is_kept_and_skipped_by_a_restore(local: Store, tmp_path: Path) -> None:
    sid = _tampered(local, {"p": "/future", "k": "z"})
    with pytest.raises(RestoreIncomplete, match=r"/future \(unknown record kind 'z'\)"):
        restore_records(local, lambda: local.records(sid), tmp_path / "target")
    assert (tmp_path / "target" / "good").read_bytes() == b"good"


def test_decode_keeps_the_stored_map() -> None:
    raw = {"p": "/a", "k": "f", "s": 3, "m": 0o600, "t": MTIME, "u": 1, "g": 2, "un": "u", "gn": "g", "d": b"\x01",
           "x": {"type": "dump"}, "c": [[b"\x02" * 32, 3]]}
    rec = decode_record(raw, "snapshot 12345678")
    assert (rec.path, rec.kind, rec.size, rec.mode, rec.mtime_ns, rec.uid, rec.gid, rec.uname, rec.gname, rec.sha256,
            rec.meta) == ("/a", RecordKind.FILE, 3, 0o600, MTIME, 1, 2, "u", "g", b"\x01", {"type": "dump"})
    assert rec == Record.of("/a", "f", size=3, mode=0o600, mtime_ns=MTIME, uid=1, gid=2, uname="u", gname="g",
                            sha256=b"\x01", meta={"type": "dump"}, chunks=[[b"\x02" * 32, 3]])
    assert rec._raw is raw  # no copy: decoding stays cheap for restores of tens of thousands of records
