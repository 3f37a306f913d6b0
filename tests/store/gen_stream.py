"""Deterministic test data, and the two child processes of the multi-GiB streaming round trip.

Data: a stream of 1 MiB blocks, each a run of dump-like SQL text lines (a fixed template whose value columns come
from a BLAKE3 XOF, so every line is unique but zstd still shrinks it to a fraction) followed by a short run of
raw XOF bytes (incompressible). Block ``i`` depends only on ``(seed, i)``: the whole stream is reproducible,
generated at several hundred MB/s, partly compressible and essentially free of repeats (so dedup does not hide
work), and no block is ever held twice in memory.

Importable (``from tests.store.gen_stream import make_bytes``) and runnable as a script::

    python tests/store/gen_stream.py produce SIZE [--seed S] [--report FILE]   # stream to stdout, digests to FILE
    python tests/store/gen_stream.py write LOCATION [--path P] [--report FILE]  # stdin -> one record -> read back

``write`` runs in its own process so that its peak RSS (``VmHWM``, read by itself) measures the store's pipeline
and nothing else. The passphrase comes from ``PGPLAKAR_PASSPHRASE`` (unset: a plaintext store).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import blake3

BLOCK = 1 << 20
RANDOM_TAIL = 64 * 1024  # per block: 1/16 incompressible
_SEEK_STRIDE = 1 << 24  # XOF address space per block (text material, then the random tail at +2**23)

# Line templates: ``#`` becomes a digit and ``@`` a letter, drawn from the XOF; everything else is fixed.
LEAN = (  # few variable bytes per line: compresses ~8x (the multi-GiB stream, so stores stay small)
    b"INSERT INTO public.events (id, account, kind, amount, active, note) "
    b"VALUES (1######, 'acct-@@@@', 'click', 42.00, true, 'payload');\n"
)
COPY = (  # a pg_dump COPY data line: most bytes vary, so content-defined cut points are plentiful
    b"#######\t@@@@@@@@\t@@@@@@ @@@@@@@@\t####.##\t2024-0#-1# ##:##:##+00\t@@@@@@@@@@@@ @@@@@@@@\tt\n"
)
_DIGITS = bytes(48 + i % 10 for i in range(256))
_LETTERS = bytes(97 + i % 26 for i in range(256))


@functools.lru_cache(maxsize=8)
def _layout(template: bytes) -> tuple[bytes, tuple[tuple[int, bytes], ...]]:
    """(fixed line with placeholders filled, ((offset, translation table), ...) of the variable bytes)."""
    cols = tuple((i, _DIGITS if c == ord("#") else _LETTERS) for i, c in enumerate(template) if c in b"#@")
    return template.replace(b"#", b"0").replace(b"@", b"a"), cols


@functools.lru_cache(maxsize=8)
def _lines(template: bytes, nlines: int) -> bytes:
    return _layout(template)[0] * nlines


def _xof(seed: int) -> blake3.blake3:
    return blake3.blake3(b"pgplakar gen_stream v1:" + str(seed).encode())


def _text(xof: blake3.blake3, seek: int, size: int, template: bytes = LEAN) -> bytes:
    line = len(template)
    cols = _layout(template)[1]
    nlines = size // line + 1
    buf = bytearray(_lines(template, nlines))
    material = xof.digest(nlines * len(cols), seek=seek)
    for j, (col, table) in enumerate(cols):
        buf[col::line] = material[j * nlines : (j + 1) * nlines].translate(table)
    return bytes(buf[:size])


def block(seed: int, i: int, *, random_tail: int = RANDOM_TAIL, template: bytes = LEAN) -> bytes:
    """Block ``i`` (exactly ``BLOCK`` bytes) of stream ``seed``."""
    xof = _xof(seed)
    base = i * _SEEK_STRIDE
    text = _text(xof, base, BLOCK - random_tail, template)
    return text + xof.digest(random_tail, seek=base + _SEEK_STRIDE // 2) if random_tail else text


def iter_stream(seed: int, size: int, *, random_tail: int = RANDOM_TAIL, template: bytes = LEAN) -> Iterator[bytes]:
    """The first ``size`` bytes of stream ``seed``, one block at a time."""
    i = 0
    while size > 0:
        b = block(seed, i, random_tail=random_tail, template=template)
        yield b[:size] if size < BLOCK else b
        size -= BLOCK
        i += 1


def make_bytes(seed: int, size: int, *, random_tail: int = RANDOM_TAIL, template: bytes = LEAN) -> bytes:
    return b"".join(iter_stream(seed, size, random_tail=random_tail, template=template))


def dump_text(seed: int, size: int) -> bytes:
    """Pure dump-like text (pg_dump COPY rows, no random runs), with realistic per-row variety."""
    return make_bytes(seed, size, random_tail=0, template=COPY)


def random_bytes(seed: int, size: int) -> bytes:
    return _xof(seed).digest(size, seek=1 << 62)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def vm_hwm_kib() -> int:
    """Peak resident set size of this process so far (``VmHWM``), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- child processes -------------------------------------------------------------------------------------------


def _produce(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    sha = hashlib.sha256()
    b3 = blake3.blake3()
    total = 0
    t0 = time.perf_counter()
    for piece in iter_stream(args.seed, parse_size(args.size)):
        sha.update(piece)
        b3.update(piece)
        out.write(piece)
        total += len(piece)
    out.flush()
    report = {"sha256": sha.hexdigest(), "blake3": b3.hexdigest(), "bytes": total,
              "seconds": round(time.perf_counter() - t0, 3)}
    _report(args.report, report)
    return 0


def _write(args: argparse.Namespace) -> int:
    from airflow_provider_pgplakar.store.repo import Store

    passphrase = os.environ.get("PGPLAKAR_PASSPHRASE") or None
    plaintext = passphrase is None
    st = Store.open(args.location, passphrase, plaintext=plaintext)
    t0 = time.perf_counter()
    with st.writer(source={"kind": "stream", "origin": "gen_stream"}, tags=["big"]) as w:
        info = w.add_stream(args.path, sys.stdin.buffer)
    write_s = time.perf_counter() - t0
    hwm_write = vm_hwm_kib()
    header = st.load_snapshot(w.snapshot_id).header
    st.close()

    # Read back through a fresh instance with an empty cache: everything comes from the backend.
    with tempfile.TemporaryDirectory(prefix="pgplakar-readback-") as cache:
        st2 = Store.open(args.location, passphrase, plaintext=plaintext, cache_dir=cache)
        rec = st2.find_record(w.snapshot_id, args.path)
        sha = hashlib.sha256()
        total = 0
        t1 = time.perf_counter()
        with st2.open_record(rec) as reader:
            for piece in reader.iter_chunks():
                sha.update(piece)
                total += len(piece)
        read_s = time.perf_counter() - t1
        st2.close()
    report = {
        "snapshot": w.snapshot_id, "record_size": info.size, "record_blake3": info.digest,
        "manifest_size": rec.size, "manifest_blake3": rec.blake3.hex(), "chunk_lists": len(list(rec.chunk_list_ids())),
        "restored_bytes": total, "restored_sha256": sha.hexdigest(), "stats": header["stats"],
        "write_seconds": round(write_s, 3), "read_seconds": round(read_s, 3),
        "vm_hwm_kib_after_write": hwm_write, "vm_hwm_kib": vm_hwm_kib(),
    }
    _report(args.report, report)
    return 0


def _report(path: str | None, report: dict) -> None:
    text = json.dumps(report)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("produce")
    pp.add_argument("size")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--report")
    pw = sub.add_parser("write")
    pw.add_argument("location")
    pw.add_argument("--path", default="/stream")
    pw.add_argument("--report")
    args = p.parse_args(argv)
    return _produce(args) if args.cmd == "produce" else _write(args)


if __name__ == "__main__":
    sys.exit(main())
