"""Sizes read from a base-backup stream are bounded: tar extended headers and member sizes (``pg/tarstream.py``),
and the output of each decompression step of a server-compressed archive (``pg/decompress.py``).

The archives are crafted here the way a hostile or broken server could send them; each must fail with one
``TarFormatError`` / ``BaseBackupError`` line naming the member, or decompress without ever holding more than
about 1 MiB of output at once.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from airflow_provider_pgplakar.pg.basebackup import BaseBackupError, Decompressing
from airflow_provider_pgplakar.pg.decompress import BLOCKS_PER_STEP, STEP_MAX
from airflow_provider_pgplakar.pg.tarstream import EXTENDED_MAX, TarFormatError, TarReader

CAP = max(STEP_MAX, BLOCKS_PER_STEP * 128 * 1024)


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o600, 1_700_000_000
    return info.tobuf(tarfile.USTAR_FORMAT)


def _pax(**fields: str) -> bytes:
    body = b""
    for key, value in fields.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return _header("././@PaxHeader", tarfile.XHDTYPE, len(body)) + body + bytes(-len(body) % 512)


def _members(data: bytes) -> list[str]:
    return [m.name for m in TarReader(io.BytesIO(data))]


def test_a_sane_pax_archive_still_reads() -> None:
    data = _pax(path="base/1/" + "r" * 200, mtime="1700000000.5") + _header("x", tarfile.REGTYPE, 3) + b"abc" + \
        bytes(509)
    assert _members(data) == ["base/1/" + "r" * 200]


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_huge_extended_header_is_refused_before_it_is_read(kind: bytes) -> None:
    data = _header("base/1/evil", kind, 1 << 32)  # 4 GiB of "header", never sent
    with pytest.raises(TarFormatError) as ei:
        _members(data)
    msg = str(ei.value)
    assert "\n" not in msg and "declares 4294967296 bytes" in msg and str(EXTENDED_MAX) in msg


@pytest.mark.parametrize(("fields", "why"), [
    ({"size": str(1 << 50)}, "declares"),
    ({"size": "-5"}, "declares"),
    ({"mtime": "yesterday"}, "not a number"),
    ({"uid": "root"}, "not a number"),
])
def test_bad_pax_numbers_are_refused_naming_the_member(fields: dict[str, str], why: str) -> None:
    data = _pax(path="base/1/16384", **fields) + _header("base/1/16384", tarfile.REGTYPE, 0)
    with pytest.raises(TarFormatError) as ei:
        _members(data)
    assert "base/1/16384" in str(ei.value) and why in str(ei.value)


def test_truncated_pax_record_is_refused() -> None:
    body = b"99 path=short\n"
    data = _header("././@PaxHeader", tarfile.XHDTYPE, len(body)) + body + bytes(-len(body) % 512)
    with pytest.raises(TarFormatError, match="bad pax header"):
        _members(data + _header("f", tarfile.REGTYPE, 0))


class Pieces:
    def __init__(self, data: bytes, step: int) -> None:
        self.pieces = [memoryview(data[i : i + step]) for i in range(0, len(data), step)]

    def next_piece(self) -> memoryview | None:
        return self.pieces.pop(0) if self.pieces else None


def _compress(method: str, data: bytes) -> bytes:
    if method == "lz4":
        import lz4.frame

        return lz4.frame.compress(data)
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


@pytest.mark.parametrize("method", ["lz4", "zstd"])
def test_decompression_runs_in_capped_steps(method: str) -> None:
    """256 MiB of zeros arrive in one message (a few KiB compressed): no step may produce more than ~1 MiB."""
    size = 256 << 20
    packed = _compress(method, bytes(size))
    assert len(packed) < 2 << 20
    stream = Decompressing(Pieces(packed, len(packed)), method)  # type: ignore[arg-type]
    total = biggest = 0
    while (piece := stream.next_piece()) is not None:
        assert not any(piece[:: 4096])
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == size == stream.size
    assert biggest <= CAP, f"one step produced {biggest} bytes"


@pytest.mark.parametrize("method", ["lz4", "zstd"])
@pytest.mark.parametrize("step", [1, 3, 4096])
def test_capped_steps_survive_any_message_split(method: str, step: int) -> None:
    data = b"".join(b"row %08d of a relation file\n" % i for i in range(3000)) + bytes(1 << 20)
    packed = _compress(method, data)
    packed_pieces = Pieces(packed, step)
    assert Decompressing(packed_pieces, method).read() == data  # type: ignore[arg-type]
    with pytest.raises(BaseBackupError, match="ended mid-frame"):
        Decompressing(Pieces(packed[:-1], step), method).read()  # type: ignore[arg-type]
