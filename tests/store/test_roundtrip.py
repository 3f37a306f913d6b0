"""Byte-exact round trips through the store, on both backends (temp directory and S3 over HTTP on loopback).

Every test writes through one ``Store`` instance and reads back through a second one opened with an empty cache
dir, so what is read comes from the backend, not from anything the writer kept. Assertions are on restored bytes
(and SHA-256 of them), never on exit codes alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from airflow_provider_pgplakar.store.chunker import DEFAULT_CDC, Chunking
from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.writer import FIXED_BATCH
from tests.store.conftest import PASSPHRASE
from tests.store.gen_stream import dump_text, make_bytes, random_bytes
from tests.store.streams import Trickle

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CDC_MIN, CDC_AVG, CDC_MAX = DEFAULT_CDC["min"], DEFAULT_CDC["avg"], DEFAULT_CDC["max"]
EDGE_SIZES = sorted({0, 1} | {s + d for s in (CDC_MIN, CDC_AVG, CDC_MAX) for d in (-1, 0, 1)})
GEN_STREAM = Path(__file__).with_name("gen_stream.py")
REPO_ROOT = Path(__file__).resolve().parents[2]

BIG_STREAM = 2 * GiB
RSS_LIMIT = 300 * MiB


def _reopen(location: str, tmp_path: Path, name: str = "reader-cache", *, plaintext: bool = False) -> Store:
    """A second, independent instance with an empty cache: reads must come from the backend."""
    if plaintext:
        return Store.open(location, plaintext=True, cache_dir=tmp_path / name)
    return Store.open(location, PASSPHRASE, cache_dir=tmp_path / name)


def _read_all(st: Store, rec: dict[str, Any]) -> bytes:
    with st.open_record(rec) as r:
        return r.read()


def _read_in_pieces(st: Store, rec: dict[str, Any], step: int) -> bytes:
    out = bytearray()
    with st.open_record(rec) as r:
        while piece := r.read(step):
            out += piece
    return bytes(out)


def _chunk_lengths(st: Store, rec: dict[str, Any]) -> list[int]:
    return [n for _id, n in chunk_refs(st, rec)]


class _ReadOnly:
    """A stream with ``read`` only (no ``readinto``), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 3000) if n > 0 else n)


# -- record sizes around the chunker's bounds ------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plaintext"])
def test_edge_sizes_round_trip_byte_exact(location: str, tmp_path: Path, encrypted: bool) -> None:
    st = Store.create(location, PASSPHRASE) if encrypted else Store.create(location, plaintext=True)
    want: dict[str, bytes] = {}
    for size in EDGE_SIZES:
        want[f"/random/{size:07d}"] = random_bytes(size, size)
        want[f"/text/{size:07d}"] = make_bytes(size, size)  # compressible + random tail
    want["/multi/3max+1"] = random_bytes(7, 3 * CDC_MAX + 1)
    try:
        with st.writer(source={"kind": "test", "origin": "edges"}) as w:
            for path, data in want.items():
                info = w.add_bytes(path, data, mode=0o640, mtime_ns=1_700_000_000_123_456_789)
                assert (info.size, info.digest) == (len(data), blake3.blake3(data).hexdigest())
        assert w.snapshot_id in st.snapshot_ids()
    finally:
        st.close()

    st = _reopen(location, tmp_path, plaintext=not encrypted)
    try:
        snap = st.load_snapshot(st.resolve("latest"))
        assert snap.header["stats"]["records"] == len(want)
        assert snap.header["stats"]["bytes"] == sum(map(len, want.values()))
        recs = {r.path: r for r in st.records(snap)}
        assert sorted(recs) == sorted(want)
        for path, data in want.items():
            rec = recs[path]
            assert rec.kind == "f" and rec.size == len(data) and rec.blake3 == blake3.blake3(data).digest()
            assert (rec.mode, rec.mtime_ns) == (0o640, 1_700_000_000_123_456_789)
            lengths = _chunk_lengths(st, rec)
            assert sum(lengths) == len(data)
            if not data:
                assert lengths == []
            elif len(data) <= CDC_MIN:
                assert lengths == [len(data)]
            else:
                assert all(CDC_MIN <= n <= CDC_MAX for n in lengths[:-1]), lengths
                assert 0 < lengths[-1] <= CDC_MAX
            if len(data) > CDC_MAX:
                assert len(lengths) >= 2
            assert _read_all(st, rec) == data, path
            assert _read_in_pieces(st, rec, 7777) == data, path
            with st.open_record(rec) as r:
                assert b"".join(r.iter_chunks()) == data
    finally:
        st.close()


def test_multi_chunk_list_records_round_trip(store: Store, location: str, tmp_path: Path) -> None:
    """Records with more refs than fit inline (chunk-list blobs, several of them), CDC and fixed, byte-exact."""
    text = dump_text(31, 20 * MiB)
    mixed = make_bytes(32, 48 * MiB)
    with store.writer() as w:
        w.add_bytes("/fixed-4k", text, chunking=Chunking.fixed(4096))  # 5120 refs: many content-cut chunk lists
        w.add_bytes("/cdc", mixed)
        w.add_stream("/cdc-trickle", Trickle(mixed, 10_000))  # a pipe-like stream: identical chunks
    st = _reopen(location, tmp_path)
    try:
        snap = st.resolve("latest")
        fixed = st.find_record(snap, "/fixed-4k")
        # lists are cut where a blob ID's last byte is divisible by 64, with at least 16 and at most 4096 refs each
        assert 5120 // 4096 + 1 <= len(list(fixed.chunk_list_ids())) <= 5120 // 16
        assert _chunk_lengths(st, fixed) == [4096] * (len(text) // 4096)
        assert _read_all(st, fixed) == text
        cdc, trickle = st.find_record(snap, "/cdc"), st.find_record(snap, "/cdc-trickle")
        assert _chunk_lengths(st, cdc) == _chunk_lengths(st, trickle)
        assert list(chunk_refs(st, cdc)) == list(chunk_refs(st, trickle))
        assert _read_all(st, cdc) == mixed
        assert _read_in_pieces(st, trickle, 1 << 16) == mixed
    finally:
        st.close()


# -- fixed-size chunking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [4096, 128 * KiB, 1 * MiB + 3])
def test_fixed_size_chunking_round_trip(store: Store, location: str, tmp_path: Path, block: int) -> None:
    """Fixed blocks go to the pool a batch at a time (FIXED_BATCH): sizes around blocks and batches, with and
    without the record digest, from streams that return short reads or have no ``readinto``."""
    batch = max(1, FIXED_BATCH // block) * block
    sizes = sorted({0, 1, block - 1, block, block + 1, 5 * block + 7, batch - 1, batch, batch + 1,
                    2 * batch + block, 2 * batch + block + 1})
    want: dict[str, tuple[bytes, Any]] = {}
    for size in sizes:
        data = make_bytes(size + block, size)
        want[f"/bytesio/{size}"] = (data, io.BytesIO(data))
        want[f"/trickle/{size}"] = (data, Trickle(data, 1000))
        want[f"/readonly/{size}"] = (data, _ReadOnly(data))
        want[f"/no-digest/{size}"] = (data, io.BytesIO(data))
    with store.writer() as w:
        for path, (data, stream) in want.items():
            with_digest = not path.startswith("/no-digest/")
            info = w.add_stream(path, stream, chunking=Chunking.fixed(block), digest=with_digest)
            assert (info.size, info.digest) == (len(data), blake3.blake3(data).hexdigest() if with_digest else None)
    st = _reopen(location, tmp_path)
    try:
        recs = {r.path: r for r in st.records(st.resolve("latest"))}
        for path, (data, _stream) in want.items():
            lengths = _chunk_lengths(st, recs[path])
            full, rest = divmod(len(data), block)
            assert lengths == [block] * full + ([rest] if rest else []), path
            assert (recs[path].blake3 is not None) is (not path.startswith("/no-digest/")), path
            assert recs[path].sha256 is None, path
            assert _read_all(st, recs[path]) == data, path
        # the same content with and without a digest is the same blobs
        for size in sizes:
            assert list(chunk_refs(st, recs[f"/no-digest/{size}"])) == list(chunk_refs(st, recs[f"/bytesio/{size}"]))
    finally:
        st.close()


def test_record_without_digest_still_checks_its_size(store: Store) -> None:
    """A record written with ``digest=False`` whose chunk list and size disagree (an assembly bug) fails to read."""
    data = make_bytes(77, 3 * 4096 + 5)
    with store.writer() as w:
        w.add_bytes("/a", data, chunking=Chunking.fixed(4096), digest=False)
    rec = store.find_record(store.resolve("latest"), "/a")
    assert rec.sha256 is None and rec.blake3 is None
    bad = rec.replace(size=rec.size + 1)
    with pytest.raises(IntegrityError, match="bytes read, the manifest says"), store.open_record(bad) as r:
        r.read()


# -- many tiny files -------------------------------------------------------------------------------------------


def test_many_tiny_files_in_one_snapshot(store: Store, location: str, tmp_path: Path) -> None:
    rng = random.Random(3000)
    files = []
    for i in range(3000):
        data = rng.randbytes(rng.randint(0, 200)) if i % 10 else b"duplicate content %d" % (i % 3)
        files.append((f"/tiny/d{i % 37:02d}/f{i:04d}", data, 0o600 | (i % 8) << 3, 1_600_000_000_000_000_000 + i))
    with store.writer(tags=["tiny"]) as w:
        w.add_entry("/tiny", "d", mode=0o755)
        for path, data, mode, mtime in files:
            w.add_bytes(path, data, mode=mode, mtime_ns=mtime)
    st = _reopen(location, tmp_path)
    try:
        snap = st.load_snapshot(st.resolve("latest"))
        assert snap.header["stats"]["records"] == 3001
        assert snap.header["stats"]["bytes"] == sum(len(d) for _, d, _, _ in files)
        assert len(snap.header["manifest"]["leaves"]) > 1  # the manifest is split into several leaves
        recs = list(st.records(snap))
        assert [r.path for r in recs] == ["/tiny"] + [p for p, _, _, _ in files]
        lists: list[str] = []
        real_list = st.backend.list
        st.backend.list = lambda prefix: (lists.append(prefix), real_list(prefix))[1]  # type: ignore[method-assign]
        for rec, (path, data, mode, mtime) in zip(recs[1:], files, strict=True):
            assert (rec.size, rec.mode, rec.mtime_ns) == (len(data), mode, mtime), path
            assert _read_all(st, rec) == data, path
        # opening a record whose blobs the local index already has costs no LIST of index/ (restore of many
        # small files from S3 must not be one LIST per file)
        assert lists == [], f"{len(lists)} LIST calls while reading {len(files)} records"
        assert len(list(st.records(snap, "/tiny/d05"))) == len([f for f in files if f[0].startswith("/tiny/d05/")])
    finally:
        st.close()
    # a record handed to an instance whose cache has never seen the store: it syncs and reads
    fresh = _reopen(location, tmp_path, "never-synced-cache")
    try:
        assert _read_all(fresh, recs[-1]) == files[-1][1]
        assert _read_all(fresh, recs[10]) == files[9][1]
    finally:
        fresh.close()


# -- the CLI: backup a tree, restore it, compare everything ---------------------------------------------------


def _cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    code = "import sys; from airflow_provider_pgplakar.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, timeout=300)  # noqa: S603
    if check:
        assert proc.returncode == 0, f"pgplakar {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}"
    return proc


def _build_tree(root: Path) -> None:
    rng = random.Random(77)
    root.mkdir()
    for i in range(1000):  # tiny files, 0-200 B, in nested directories
        d = root / "tiny" / f"d{i % 23:02d}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"f{i:04d}.dat"
        f.write_bytes(rng.randbytes(rng.randint(0, 200)))
        os.chmod(f, (0o600, 0o644, 0o640, 0o755, 0o400)[i % 5])
        os.utime(f, ns=(1_500_000_000_000_000_000 + i * 1_000_003, 1_600_000_000_000_000_007 + i * 999_983))
    (root / "big").mkdir()
    (root / "big" / "dump.sql").write_bytes(dump_text(5, 3 * MiB + 17))
    (root / "big" / "random.bin").write_bytes(random_bytes(6, 700 * KiB))
    (root / "big" / "empty").write_bytes(b"")
    (root / "names").mkdir()
    (root / "names" / "with space.txt").write_bytes(b"space\n")
    (root / "names" / "na\u00efve-\u65e5\u672c.txt").write_bytes("unicode \u2603\n".encode())
    (root / "names" / ".hidden").write_bytes(b"hidden\n")
    # modes incl. setuid/setgid/sticky, and ownership (restored only when running as root)
    (root / "modes").mkdir()
    for mode in (0o4755, 0o2750, 0o1777, 0o000, 0o777):
        p = root / "modes" / f"m{mode:04o}"
        p.write_bytes(b"mode %o\n" % mode)
        os.chmod(p, mode)
    if os.geteuid() == 0:
        os.chown(root / "modes" / "m0777", 1234, 5678)
    # hard links: three names for one inode across directories, and a pair in one directory
    (root / "links").mkdir()
    (root / "links" / "hl-a").write_bytes(b"hard linked content\n" * 100)
    os.link(root / "links" / "hl-a", root / "links" / "hl-b")
    os.link(root / "links" / "hl-a", root / "tiny" / "hl-c")
    (root / "links" / "pair-1").write_bytes(random_bytes(8, 40 * KiB))
    os.link(root / "links" / "pair-1", root / "links" / "pair-2")
    # symlinks: relative, absolute, dangling, to a directory, to a symlink
    os.symlink("hl-a", root / "links" / "sym-rel")
    os.symlink("../big/dump.sql", root / "links" / "sym-up")
    os.symlink("/nonexistent/absolute/target", root / "links" / "sym-abs-dangling")
    os.symlink("../tiny/d01", root / "links" / "sym-dir")
    os.symlink("sym-rel", root / "links" / "sym-chain")
    # directories: empty, restrictive modes, explicit mtimes (set last, after their content exists)
    (root / "empty-dir").mkdir()
    (root / "private").mkdir()
    (root / "private" / "secret").write_bytes(b"s3cret\n")
    os.mkfifo(root / "links" / "fifo")  # special files are skipped by backup
    os.chmod(root / "private", 0o700)
    os.chmod(root / "empty-dir", 0o555)
    for k, d in enumerate(sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True)):
        os.utime(d, ns=(1_400_000_000_000_000_000 + k, 1_450_000_000_000_000_000 + k * 7))
    os.utime(root, ns=(1_400_000_000_000_000_000, 1_444_444_444_444_444_444))


def _snapshot_tree(root: Path) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    """relpath -> (kind, mode, mtime_ns, uid/gid, content sha or link target); plus hard-link groups."""
    entries: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if Path(dirpath) == root else [*dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else root
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("l", os.readlink(p), st.st_mtime_ns, owner)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns, owner)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                entries[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, owner, st.st_size, digest)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
            else:
                entries[rel] = ("special", stat.S_IFMT(st.st_mode))
    return entries, {frozenset(g) for g in inodes.values()}


def test_cli_backup_and_restore_tree(location: str, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "restored"
    _build_tree(src)
    before, links_before = _snapshot_tree(src)
    env = {**os.environ, "PGPLAKAR_PASSPHRASE": PASSPHRASE}
    _cli("at", location, "create", env=env)
    backup = json.loads(_cli("--json", "at", location, "backup", str(src), env=env).stdout)
    assert backup["stats"]["errors"] == 0
    # the tree's own state must not have been changed by reading it
    assert _snapshot_tree(src) == (before, links_before)
    _cli("at", location, "restore", "-to", str(out), "latest", env={**env, "PGPLAKAR_CACHE_DIR": str(tmp_path / "c2")})
    after, links_after = _snapshot_tree(out)

    expected = {k: v for k, v in before.items() if v[0] != "special"}  # the fifo is skipped, nothing else
    assert set(before) - set(expected) == {"links/fifo"}
    assert sorted(after) == sorted(expected)
    mismatched = {k: (expected[k], after[k]) for k in expected if expected[k] != after[k]}
    assert not mismatched, f"{len(mismatched)} entries differ, e.g. {list(mismatched.items())[:5]}"
    assert links_after == links_before
    assert {"links/hl-a", "links/hl-b", "tiny/hl-c"} in links_after

    # cat of one record: the bytes on stdout are the file's bytes
    snap_id = backup["id"]
    cat = _cli("at", location, "cat", f"{snap_id[:8]}:/big/dump.sql", env=env)
    assert cat.stdout == (src / "big" / "dump.sql").read_bytes()


# -- a multi-GiB stream through a pipe into a separate writer process ------------------------------------------


@pytest.mark.slow
def test_big_stream_piped_into_separate_writer_process(location: str, tmp_path: Path) -> None:
    """2 GiB from a producer process, piped into a writer process; bounded RSS; restored SHA-256 matches."""
    Store.create(location, PASSPHRASE).close()
    env = {**os.environ, "PGPLAKAR_PASSPHRASE": PASSPHRASE, "PYTHONPATH": str(REPO_ROOT)}
    prod_report, write_report = tmp_path / "producer.json", tmp_path / "writer.json"
    t0 = time.monotonic()
    with open(tmp_path / "producer.err", "wb") as prod_err, open(tmp_path / "writer.err", "wb") as write_err:
        producer = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, str(GEN_STREAM), "produce", str(BIG_STREAM), "--seed", "20",
             "--report", str(prod_report)],
            stdout=subprocess.PIPE, stderr=prod_err, env=env,
        )
        try:
            writer = subprocess.Popen(  # noqa: S603 - fixed argv
                [sys.executable, str(GEN_STREAM), "write", location, "--path", "/big.stream",
                 "--report", str(write_report)],
                stdin=producer.stdout, stdout=subprocess.DEVNULL, stderr=write_err, env=env,
            )
        finally:
            assert producer.stdout is not None
            producer.stdout.close()  # the writer holds the only read end now
        try:
            writer.wait(timeout=600)
        finally:
            if writer.returncode is None:
                writer.kill()
                writer.wait()
            try:
                producer.wait(timeout=120)
            except subprocess.TimeoutExpired:
                producer.kill()
                producer.wait()
    elapsed = time.monotonic() - t0
    errors = (tmp_path / "writer.err").read_text(errors="replace")[-3000:]
    assert writer.returncode == 0, f"writer failed: {errors}"
    assert producer.returncode == 0, (tmp_path / "producer.err").read_text(errors="replace")[-3000:]

    produced = json.loads(prod_report.read_text())
    result = json.loads(write_report.read_text())
    assert produced["bytes"] == BIG_STREAM
    assert result["restored_bytes"] == BIG_STREAM
    assert result["restored_sha256"] == produced["sha256"]
    assert result["record_blake3"] == result["manifest_blake3"] == produced["blake3"]
    assert result["record_size"] == result["manifest_size"] == BIG_STREAM
    assert result["chunk_lists"] >= 2  # > 4096 chunk refs: several chunk-list blobs
    stats = result["stats"]
    assert stats["bytes"] == BIG_STREAM
    assert stats["new_stored_bytes"] < 0.4 * BIG_STREAM  # mostly compressible: compression did happen

    # VmHWM as the writer read it itself, at its end. Not getrusage/wait4's ru_maxrss: Linux carries the maximum
    # across execve, and with vfork that is the *pytest* process's peak, not the writer's.
    peak = result["vm_hwm_kib"] * KiB
    assert peak < RSS_LIMIT, f"writer peak RSS {peak / MiB:.0f} MiB >= {RSS_LIMIT / MiB:.0f} MiB"

    # The same record, read back in this process by yet another instance: byte count and digest again.
    st = _reopen(location, tmp_path, "verify-cache")
    try:
        rec = st.find_record(result["snapshot"], "/big.stream")
        assert rec.size == BIG_STREAM and rec.blake3.hex() == produced["blake3"]
    finally:
        st.close()
    print(
        f"\n[{'s3' if location.startswith('s3://') else 'local'}] 2 GiB: write {result['write_seconds']:.1f}s "
        f"({BIG_STREAM / MiB / result['write_seconds']:.0f} MiB/s), read {result['read_seconds']:.1f}s "
        f"({BIG_STREAM / MiB / result['read_seconds']:.0f} MiB/s), writer peak RSS {peak / MiB:.0f} MiB "
        f"(after write {result['vm_hwm_kib_after_write'] / KiB:.0f} MiB), stored {stats['new_stored_bytes'] / MiB:.0f}"
        f" MiB in {stats['packs']} packs, total {elapsed:.1f}s"
    )


def test_record_digest_is_verified_blake3_and_legacy_sha256(store: Store) -> None:
    """A record's whole-content digest is BLAKE3 (``b``) now; records of older writers carry SHA-256 (``d``) and
    still read verified. A wrong digest of either kind (a tampered manifest, or a reader that reassembled the chunks
    wrongly) fails the read; the right one reads the bytes back."""
    data = make_bytes(91, 600 * KiB)
    with store.writer() as w:
        info = w.add_bytes("/a", data)
    rec = store.find_record(store.resolve("latest"), "/a")
    assert rec.blake3 == blake3.blake3(data).digest() and info.digest == rec.blake3.hex() and rec.sha256 is None
    legacy = rec.replace(blake3=None, sha256=hashlib.sha256(data).digest())  # what a writer before 2026-12-03 stored
    both = rec.replace(sha256=hashlib.sha256(data).digest())
    for good in (rec, legacy, both):
        with store.open_record(good) as r:
            assert r.read() == data
        with store.open_record(good) as r:
            assert b"".join(r.iter_chunks()) == data
    flipped = bytes([rec.blake3[0] ^ 1]) + rec.blake3[1:]
    for bad, name in ((rec.replace(blake3=flipped), "BLAKE3"), (legacy.replace(sha256=bytes(32)), "SHA-256"),
                      (both.replace(sha256=bytes(32)), "SHA-256"), (both.replace(blake3=flipped), "BLAKE3")):
        with pytest.raises(IntegrityError, match=f"the {name} does not match the manifest"), \
                store.open_record(bad) as r:
            r.read()
        with pytest.raises(IntegrityError, match=f"the {name} does not match"), store.open_record(bad) as r:
            for _ in r.iter_chunks():
                pass
