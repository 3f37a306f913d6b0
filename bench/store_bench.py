"""Store throughput benchmark (not a test): ingest, identical re-ingest, restore, stored bytes, peak RSS.

    .venv/bin/python bench/store_bench.py [--size-mib 1024] [--location DIR|s3://...] [--level 3]

The source is a deterministic dump-like stream (70 % slices of COPY-style text, 30 % random, in 64 KiB segments)
written once to a file; ``cat FILE > /dev/null`` of it is the baseline. Each operation runs in a fresh child
process so peak RSS is that operation's own. Prints a Markdown table (pasted into the README).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PASS = "bench-passphrase"


def make_data(path: Path, size: int, seed: int = 1234) -> None:
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rnd.choices(letters, k=rnd.randint(3, 10))) for _ in range(5000)]
    parts = []
    for i, w in enumerate(rnd.choices(vocab, k=1_400_000)):
        parts.append(w)
        parts.append(f"\t{rnd.randint(0, 10**9)}\t2024-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}\n"
                     if i % 11 == 0 else " ")
    corpus = "".join(parts).encode()
    seg = 64 * 1024
    written = 0
    with open(path, "wb") as f:
        while written < size:
            if rnd.random() < 0.7:
                off = rnd.randrange(0, len(corpus) - seg)
                block = corpus[off : off + seg]
            else:
                block = rnd.randbytes(seg)
            f.write(block)
            written += len(block)


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). ``ru_maxrss`` is not used: Linux carries the parent's peak across
    fork+exec, so a child of a big parent would report the parent's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(op: str, location: str, src: str) -> None:
    from airflow_provider_pgplakar.store.repo import Store

    st = Store.open(location, PASS)
    t0 = time.perf_counter()
    out: dict = {}
    if op == "ingest":
        with st.writer(source={"kind": "bench", "origin": src}) as w, open(src, "rb") as f:
            w.add_stream("/data", f)
        out["stats"] = st.load_snapshot(w.snapshot_id).header["stats"]
    elif op == "restore":
        rec = next(r for r in st.records(st.resolve("latest")) if r.path == "/data")
        with st.open_record(rec) as r:
            n = sum(len(piece) for piece in r.iter_chunks())
        out["bytes"] = n
    out["seconds"] = time.perf_counter() - t0
    out["cpu_s"] = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    out["rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def run_child(op: str, location: str, src: str, env: dict[str, str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", op, "--location", location, "--src", src],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"{op} failed: {res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def stored_bytes(location: str) -> int:
    if location.startswith("s3://"):
        return -1
    return sum(f.stat().st_size for f in Path(location, "packs").rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--location")
    ap.add_argument("--level", type=int, default=1, help="zstd level of the store (default: the store default, 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per operation; the fastest is reported")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pgplakar-bench"))
    ap.add_argument("--child")
    ap.add_argument("--src")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.location, a.src)
        return
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"dump-{a.size_mib}.bin"
    if not src.exists() or src.stat().st_size < a.size_mib << 20:
        print(f"generating {a.size_mib} MiB source in {src} ...", file=sys.stderr)
        make_data(src, a.size_mib << 20)
    size = src.stat().st_size
    location = a.location or str(work / "store")
    if not location.startswith("s3://"):
        shutil.rmtree(location, ignore_errors=True)
    env = {**os.environ, "PGPLAKAR_CACHE_DIR": str(work / "cache")}
    shutil.rmtree(work / "cache", ignore_errors=True)
    from airflow_provider_pgplakar.store.repo import Store

    Store.create(location, PASS, compression_level=a.level, cache_dir=work / "cache").close()
    t0 = time.perf_counter()
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - t0
    firsts, seconds, restores = [], [], []
    for i in range(a.repeat):  # each repeat starts from a fresh store; the best run is reported
        if i:
            shutil.rmtree(location, ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            Store.create(location, PASS, compression_level=a.level, cache_dir=work / "cache").close()
        firsts.append(run_child("ingest", location, str(src), env))
        stored1 = stored_bytes(location)
        seconds.append(run_child("ingest", location, str(src), env))
        stored2 = stored_bytes(location)
        restores.append(run_child("restore", location, str(src), env))
    best = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731
    first, second, restore = best(firsts), best(seconds), best(restores)
    assert restore["bytes"] == size, "restore returned a different size"
    mb = size / 1e6
    rows = [
        ("cat source > /dev/null", cat_s, "", ""),
        ("first snapshot (ingest)", first["seconds"], f"{stored1 / 2**20:.0f} MiB stored", first["rss_mib"]),
        ("second, identical snapshot", second["seconds"], f"+{(stored2 - stored1) / 2**20:.2f} MiB stored",
         second["rss_mib"]),
        ("restore (verified) to /dev/null", restore["seconds"], "", restore["rss_mib"]),
    ]
    print(f"\nsource: {size / 2**20:.0f} MiB dump-like stream; zstd level {a.level}; store {location}; "
          f"{os.cpu_count()} cores; best of {a.repeat} runs\n")
    print("| operation | seconds | MB/s | target | stored | peak RSS (MiB) | CPU s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for (name, secs, stored, rss), target, res in zip(rows, ("", "≥ 150", "≥ 400", "≥ 300"),
                                                       ({}, first, second, restore), strict=True):
        rss_s = f"{rss:.0f}" if rss != "" else ""
        cpu = f"{res['cpu_s']:.1f}" if res else ""
        print(f"| {name} | {secs:.2f} | {mb / secs:.0f} | {target} | {stored} | {rss_s} | {cpu} |")


if __name__ == "__main__":
    main()
