"""The streaming tar reader of physical backups agrees with :mod:`tarfile` on every member it accepts.

Archives are written by :mod:`tarfile` in the three formats (ustar as PostgreSQL writes it, GNU long names, pax
headers), with and without the end-of-archive blocks (PostgreSQL's server omits them), and read back through
streams that return short reads, as the base-backup stream does at message boundaries.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from airflow_provider_pgplakar.pg.tarstream import TarFormatError, TarReader


class ShortReads(io.RawIOBase):
    """At most ``step`` bytes per ``readinto``."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def _archive(fmt: int, long: bool) -> tuple[bytes, dict[str, bytes]]:
    files = {
        "empty": b"",
        "one": b"x",
        "block-1": b"a" * 511,
        "block": b"b" * 512,
        "block+1": b"c" * 513,
        "base/1/16384": bytes(range(256)) * 1000,
    }
    if long:
        files["deep/" + "d" * 120 + "/relation"] = b"long name"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in ("base", "base/1"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, 1_700_000_000
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o600, 1_700_000_123, 999, 995
            info.uname, info.gname = "postgres", "postgres"
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pg_tblspc/16400")
        link.type, link.linkname = tarfile.SYMTYPE, "/srv/ts/" + ("t" * 110 if long else "a")
        tf.addfile(link)
        hard = tarfile.TarInfo("hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "one"
        tf.addfile(hard)
    return buf.getvalue(), files


@pytest.mark.parametrize("step", [1 << 20, 7, 512, 32768])
@pytest.mark.parametrize(("fmt", "long"), [(tarfile.USTAR_FORMAT, False), (tarfile.GNU_FORMAT, True),
                                           (tarfile.PAX_FORMAT, True)], ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("terminated", [True, False], ids=["terminated", "server-style"])
def test_members_and_data_match_tarfile(fmt: int, long: bool, step: int, terminated: bool) -> None:
    data, files = _archive(fmt, long)
    if not terminated:
        data = data.rstrip(b"\0")
        data += bytes(-len(data) % 512)  # keep the last member's padding, drop the terminator
    expected = list(tarfile.open(fileobj=io.BytesIO(data), mode="r|"))
    reader = TarReader(ShortReads(data, step))
    got = []
    for i, member in enumerate(reader):
        content = b""
        if member.isreg() and i % 3:  # leave every third file unread: the reader must skip it
            buf = bytearray(100_000)
            while n := reader.readinto(buf):
                content += bytes(buf[:n])
            assert content == files[member.name]
        got.append(member)
    assert [(m.name, m.size, m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname, m.linkname) for m in got] == [
        (t.name, t.size, t.mode, int(t.mtime), t.uid, t.gid, t.uname, t.gname, t.linkname) for t in expected
    ]
    kinds = [(m.isreg(), m.isdir(), m.issym(), m.islnk()) for m in got]
    assert kinds == [(t.isreg(), t.isdir(), t.issym(), t.islnk()) for t in expected]


def test_truncated_member_data_is_an_error() -> None:
    data, _files = _archive(tarfile.USTAR_FORMAT, False)
    cut = data.index(bytes(range(256)) * 2) + 1000  # inside base/1/16384's data
    reader = TarReader(ShortReads(data[:cut], 4096))
    with pytest.raises(TarFormatError, match="unexpected end of archive in base/1/16384"):
        for member in reader:
            if member.isreg():
                while reader.readinto(bytearray(65536)):
                    pass


def test_truncated_header_and_bad_checksum_are_errors() -> None:
    data, _files = _archive(tarfile.USTAR_FORMAT, False)
    with pytest.raises(TarFormatError, match="a member header"):
        list(TarReader(ShortReads(data[:700], 4096)))  # second header cut short
    bad = bytearray(data)
    bad[600] ^= 0xFF  # second header's name field: its checksum no longer matches
    with pytest.raises(TarFormatError, match="bad tar header after base"):
        list(TarReader(ShortReads(bytes(bad), 4096)))


class Pieces:
    """Stands in for the server's message stream: ``next_piece`` as ArchiveStream has it."""

    def __init__(self, data: bytes, step: int) -> None:
        self.pieces = [memoryview(data[i : i + step]) for i in range(0, len(data), step)]

    def next_piece(self) -> memoryview | None:
        return self.pieces.pop(0) if self.pieces else None


def _compress(method: str, data: bytes) -> bytes:
    if method == "lz4":
        import lz4.frame

        return lz4.frame.compress(data)
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


@pytest.mark.parametrize("method", ["lz4", "zstd"])
def test_compressed_archives_read_back_and_damage_is_an_error(method: str) -> None:
    from airflow_provider_pgplakar.pg.basebackup import BaseBackupError, Decompressing

    data, files = _archive(tarfile.USTAR_FORMAT, False)
    packed = _compress(method, data)
    stream = Decompressing(Pieces(packed, 1000), method)  # type: ignore[arg-type]
    reader = TarReader(stream)
    names = []
    for member in reader:
        names.append(member.name)
        if member.isreg():
            buf = bytearray(member.size)
            assert reader.readinto(buf) == member.size and bytes(buf) == files[member.name]
    assert "base/1/16384" in names and stream.size == len(data)

    with pytest.raises(BaseBackupError, match="ended mid-frame"):
        Decompressing(Pieces(packed[:-20], 1000), method).read()  # type: ignore[arg-type]
    with pytest.raises(BaseBackupError, match="data after the end"):
        Decompressing(Pieces(packed + packed, len(packed)), method).read()  # type: ignore[arg-type]
    with pytest.raises(BaseBackupError, match="decompressing the"):
        Decompressing(Pieces(b"\x00" * 64 + packed, 1000), method).read()  # type: ignore[arg-type]
