"""Per-step CPU of the store's ingest (not a test): each step alone, on one thread, per GiB of a given file.

    .venv/bin/python bench/ingest_steps.py FILE [--mib 512] [--levels 1,-1,-3,2,3] [--fixed 262144]

FILE: any stream to profile, e.g. the store benchmark's dump-like source (bench/store_bench.py writes it to
``$TMPDIR/pgplakar-bench/dump-1024.bin``) or a real ``pg_dump -Fc -Z0`` file. The first ``--mib`` MiB are read into
memory and cut with the store's default FastCDC parameters (``--fixed N``: N-byte blocks, as a physical backup
cuts relation files, which also go without a record digest); every step then runs alone over those chunks and
prints its thread CPU seconds per GiB of input, as the pipeline (store/blobsink.py, store/writer.py) does it:
cutting, chunk IDs (keyed BLAKE3), the record digest (BLAKE3 now; SHA-256 before 2026-12-03), zstd at each level
(with the share of the input it stores, codec RAW when it saves less than 3 %), the write check (decompress and
compare), AES-GCM sealing into a pack buffer and the pack's SHA-256 name. The sum is what one core spends; the
pipeline spreads it over threads and adds hand-offs, SQLite look-ups and file I/O (bench/store_bench.py measures
the whole). Prints a Markdown table (pasted into docs/format.md §5.1).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import blake3
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from airflow_provider_pgplakar.store.chunker import DEFAULT_CDC

PACK_TARGET = 16 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--levels", default="1,-1,-3,2,3")
    ap.add_argument("--repeat", type=int, default=2, help="runs per step; the lowest CPU time is reported")
    ap.add_argument("--fixed", type=int, default=0, help="cut fixed blocks of this size instead of FastCDC")
    a = ap.parse_args()
    with open(a.file, "rb") as f:
        data = f.read(a.mib << 20)
    gib = len(data) / 2**30
    rows: list[tuple[str, float, str]] = []

    def step(name: str, fn: Callable[[], Any], note: str = "") -> Any:
        best, out = float("inf"), None
        for _ in range(a.repeat):
            t0 = time.thread_time()
            out = fn()
            best = min(best, time.thread_time() - t0)
        rows.append((name, best / gib, note))
        return out

    from pyfastcdc.cy import FastCDC

    p = DEFAULT_CDC
    cdc = FastCDC(p["avg"], min_size=p["min"], max_size=p["max"], normalized_chunking=p["nc"], seed=12345)
    view = memoryview(data)
    if a.fixed:
        chunks = step(f"fixed {a.fixed}-byte blocks", lambda: [view[i : i + a.fixed]
                                                            for i in range(0, len(view), a.fixed)])
    else:
        chunks = step("FastCDC cut (cut_buf)", lambda: [c.data for c in cdc.cut_buf(view)])
    key = os.urandom(32)
    step("chunk IDs: keyed BLAKE3 per chunk", lambda: [blake3.blake3(c, key=key).digest() for c in chunks],
         f"{len(chunks)} chunks, {len(data) // len(chunks) // 1024} KiB average")

    def digest(h: Any) -> bytes:
        for c in chunks:
            h.update(c)
        return h.digest()

    step("record digest: BLAKE3 (now)", lambda: digest(blake3.blake3()))
    step("record digest: SHA-256 (before)", lambda: digest(hashlib.sha256()))
    frames: list[bytes] = []
    for level in [int(x) for x in a.levels.split(",")]:
        zc = zstandard.ZstdCompressor(level=level, write_content_size=True)
        z = step(f"zstd level {level}", lambda zc=zc: [zc.compress(c) for c in chunks])
        stored = sum(len(f) if len(f) < 0.97 * len(c) else len(c) for f, c in zip(z, chunks, strict=True))
        rows[-1] = (*rows[-1][:2], f"stores {stored / len(data):.3f} of the input")
        if level == 1:
            frames = z
    dz = zstandard.ZstdDecompressor()
    kept = [(f, c) for f, c in zip(frames, chunks, strict=True) if len(f) < 0.97 * len(c)]
    outs = step("write check: decompress (level 1 frames)", lambda: [dz.decompress(f) for f, _c in kept])
    step("write check: compare", lambda: [o.startswith(c) for o, (_f, c) in zip(outs, kept, strict=True)])
    aead = AESGCM(os.urandom(32))

    def seal() -> list[bytearray]:
        packs, buf = [], bytearray()
        for f, c in zip(frames, chunks, strict=True):
            plain = b"\x01" + f if len(f) < 0.97 * len(c) else b"\x00" + c
            nonce = os.urandom(12)
            buf += nonce + aead.encrypt(nonce, plain, b"PGPB" + bytes(33))
            if len(buf) >= PACK_TARGET:
                packs.append(buf)
                buf = bytearray()
        return [*packs, buf]

    packs = step("AES-GCM seal into packs (as pack.py)", seal)
    step("pack name: SHA-256 of each pack", lambda: [hashlib.sha256(b).digest() for b in packs],
         "S3 reuses it as the upload checksum")
    step("pack name if it were BLAKE3 (not done)", lambda: [blake3.blake3(b).digest() for b in packs])
    print(f"\n{os.path.basename(a.file)}: {len(data) / 2**20:.0f} MiB, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, lowest of {a.repeat} runs per step\n")
    print("| step | CPU s per GiB | note |")
    print("|---|---:|---|")
    for name, per_gib, note in rows:
        print(f"| {name} | {per_gib:.2f} | {note} |")


if __name__ == "__main__":
    main()
