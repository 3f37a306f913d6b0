"""The physical restore's batched write path (store/batchrestore.py): chunks of many records located, read and
written together, completed window by window. Small windows and tiny packs force every edge a real data directory
only hits at scale: a record split across windows and packs, empty files, a hard link to a file still being written,
a chunk shared by files or repeated in one, a record with a whole-content digest spanning windows, and corruption
found mid-restore. No server is needed: snapshots are built with the physical layout through the store API."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.pg.datadir import physical_restore
from airflow_provider_pgplakar.store import batchrestore
from airflow_provider_pgplakar.store.chunker import Chunking
from airflow_provider_pgplakar.store.errors import IntegrityError
from airflow_provider_pgplakar.store.repo import Store
from tests.store_fixtures import _fast_kdf_private_cache  # noqa: F401 (fixtures)

BLOCK = 8192
PASS = "pw"


def _blocks(seed: int, n: int) -> bytes:
    """``n`` distinct, incompressible 8 KiB blocks (the same seed gives the same blocks: dedup)."""
    return random.Random(seed).randbytes(n * BLOCK)


CONTENT = {
    "/data/PG_VERSION": b"15\n",
    "/data/backup_label": b"START WAL LOCATION: 0/2000028\n",
    "/data/global/empty": b"",
    "/data/base/1/big": _blocks(1, 96),  # 768 KiB: spans several windows and packs
    "/data/base/1/shared_a": _blocks(2, 3),
    "/data/base/1/shared_b": _blocks(2, 3),  # the same chunks as shared_a
    "/data/base/1/repeated": _blocks(3, 1) * 5,  # one chunk five times in one file
    "/data/base/1/empty2": b"",
    "/data/pg_wal/000000010000000000000001": _blocks(4, 40),  # with a digest, across windows
}
NO_DIGEST = {"/data/base/1/big", "/data/base/1/shared_a", "/data/base/1/shared_b", "/data/base/1/repeated"}
SMALL = {f"/data/base/5/{n}": _blocks(100 + n, 1)[: 100 + n] for n in range(40)}  # many tiny files, one pack


def _snapshot(st: Store) -> str:
    meta = {"server_version_num": 150004, "server_major": 15, "tablespaces": []}
    with st.writer(source={"kind": "postgres+bin", "origin": "postgres+bin://test"}, meta=meta) as w:
        w.add_entry("/data", "d", mode=0o700)
        for d in ("/data/global", "/data/base", "/data/base/1", "/data/base/5", "/data/pg_wal"):
            w.add_entry(d, "d", mode=0o700)
        for path, data in CONTENT.items():
            w.add_stream(path, io.BytesIO(data), chunking=Chunking.fixed(BLOCK), digest=path not in NO_DIGEST,
                         mode=0o600, mtime_ns=1_700_000_000_000_000_000)
            if path == "/data/base/1/big":  # a hard link to a file whose content may still be in flight
                w.add_entry("/data/base/1/big_link", "h", link_target=path)
        for path, data in SMALL.items():
            w.add_stream(path, io.BytesIO(data), chunking=Chunking.fixed(BLOCK), mode=0o640)
    return w.snapshot_id


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batchrestore, "WINDOW_RAW", 5 * BLOCK)
    monkeypatch.setattr(batchrestore, "WINDOW_REFS", 7)
    monkeypatch.setattr(batchrestore, "WINDOW_FILES", 4)
    monkeypatch.setattr(batchrestore, "IN_FLIGHT", 3)
    monkeypatch.setattr(batchrestore, "IN_FLIGHT_FILES", 6)
    monkeypatch.setattr(batchrestore, "IN_FLIGHT_DIGEST_RAW", 6 * BLOCK)


@pytest.fixture
def st(tmp_path: Path):
    store = Store.create(str(tmp_path / "store"), PASS, pack_target=64 * 1024)  # ~8 blocks per pack
    yield store
    store.close()


@pytest.fixture
def s3_st(s3_bucket: tuple[str, str]):
    from tests.s3_server import s3_location

    store = Store.create(s3_location(*s3_bucket, "store"), PASS, pack_target=64 * 1024)
    yield store
    store.close()


def _restored(target: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(target):
        for name in files:
            p = Path(dirpath) / name
            out["/data/" + str(p.relative_to(target))] = p.read_bytes()
    return out


def _serve_instead(monkeypatch: pytest.MonkeyPatch, path: str, swap: Any) -> None:
    """Make ``Store.records`` yield ``swap(record)`` for the record at ``path``: a tampered record, as a hostile
    store would hand it to the restore."""
    real = Store.records

    def records(self, snap, prefix=None):
        for r in real(self, snap, prefix):
            yield swap(r) if r.path == path else r

    monkeypatch.setattr(Store, "records", records)


@pytest.mark.parametrize("sync", [True, False])
def test_batched_restore_edges(st: Store, tmp_path: Path, small_windows: None, sync: bool) -> None:
    sid = _snapshot(st)
    packs = {o.key for o in st.backend.list("packs/")}
    assert len(packs) >= 10, "the big file must span packs"
    target = tmp_path / "restored"
    owner = str(os.geteuid()) if os.geteuid() == 0 else None
    res = physical_restore(st, sid, target, verify=False, sync=sync, owner=owner)
    got = _restored(target)
    want = {**CONTENT, **SMALL, "/data/base/1/big_link": CONTENT["/data/base/1/big"]}
    assert got.keys() == want.keys()
    for path, data in want.items():
        assert got[path] == data, path
    assert res.files == len(CONTENT) + len(SMALL)
    assert res.bytes == sum(len(v) for v in (*CONTENT.values(), *SMALL.values()))
    big, link = target / "base/1/big", target / "base/1/big_link"
    assert os.stat(big).st_ino == os.stat(link).st_ino
    assert os.stat(big).st_mtime_ns == 1_700_000_000_000_000_000  # set after the last write landed
    assert os.stat(target / "base/5/3").st_mode & 0o777 == 0o640


def test_batched_restore_from_s3(s3_st: Store, tmp_path: Path, small_windows: None) -> None:
    """Ranged GETs coalesced across records, on the remote backend's pool (4 workers)."""
    sid = _snapshot(s3_st)
    target = tmp_path / "restored"
    physical_restore(s3_st, sid, target, verify=False, sync=True)
    got = _restored(target)
    for path, data in {**CONTENT, **SMALL}.items():
        assert got[path] == data, path


def test_shared_chunk_is_decoded_once_per_window(st: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sid = _snapshot(st)
    import airflow_provider_pgplakar.store.batchrestore as mod

    calls: list[bytes] = []
    real = mod.decode_blob_into

    def counting(okey, blob_type, blob_id, *rest):
        calls.append(blob_id)
        return real(okey, blob_type, blob_id, *rest)

    monkeypatch.setattr(mod, "decode_blob_into", counting)
    physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)
    assert len(calls) == len(set(calls)), "with one window, every distinct chunk is decoded once"
    assert _restored(tmp_path / "restored")["/data/base/1/repeated"] == CONTENT["/data/base/1/repeated"]


def _corrupt_blob_of(st: Store, sid: str, path: str, index: int) -> None:
    from airflow_provider_pgplakar.store.reader import chunk_refs

    rec = st.find_record(sid, path)
    blob_id = list(chunk_refs(st, rec))[index][0]
    loc = st.cache.lookup(blob_id)
    assert loc is not None
    pack = Path(st.backend.root) / f"packs/{loc.pack_id[:2]}/{loc.pack_id}"
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    pack.chmod(0o600)
    pack.write_bytes(bytes(data))


def test_corrupt_chunk_is_never_written(st: Store, tmp_path: Path, small_windows: None) -> None:
    sid = _snapshot(st)
    _corrupt_blob_of(st, sid, "/data/base/1/big", 40)
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match="authentication failed"):
        physical_restore(st, sid, target, verify=False, sync=False, clean=False)
    big = (target / "base/1/big").read_bytes()
    bad = slice(40 * BLOCK, 41 * BLOCK)
    assert big[bad] in (b"", bytes(BLOCK)) or len(big) <= bad.start, "the corrupt chunk's bytes reached the file"
    want = CONTENT["/data/base/1/big"]
    assert big[:BLOCK] == want[:BLOCK], "windows before the corrupt one complete (the test would prove nothing)"
    for i in range(len(big) // BLOCK):  # every block that was written is the verified content (or a hole)
        piece = big[i * BLOCK : (i + 1) * BLOCK]
        assert piece in (want[i * BLOCK : (i + 1) * BLOCK], bytes(BLOCK)), i


@pytest.mark.parametrize("field,name", [("blake3", "BLAKE3"), ("sha256", "SHA-256")])
def test_digest_mismatch_across_windows_fails(st: Store, tmp_path: Path, small_windows: None,
                                              monkeypatch: pytest.MonkeyPatch, field: str, name: str) -> None:
    """A record's BLAKE3, or the SHA-256 of records written before it, is checked over chunks from many windows."""
    sid = _snapshot(st)
    rec = st.find_record(sid, "/data/pg_wal/000000010000000000000001")
    assert rec.blake3 is not None
    wrong = rec.replace(**{field: bytes(32)})
    _serve_instead(monkeypatch, rec.path, lambda _r: wrong)
    with pytest.raises(IntegrityError, match=f"000000010000000000000001.*the {name} does not match"):
        physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)


def test_chunk_length_disagreeing_with_the_index_is_refused_before_writing_it(
        st: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sid = _snapshot(st)
    rec = st.find_record(sid, "/data/base/1/shared_a")
    from airflow_provider_pgplakar.store.reader import chunk_refs

    refs = [[b, n] for b, n in chunk_refs(st, rec)]
    refs[1][1] += 1  # the manifest claims one byte more for the second chunk
    wrong = rec.replace(size=rec.size + 1)
    wrong = type(wrong)({**wrong._raw, "c": refs})
    _serve_instead(monkeypatch, rec.path, lambda _r: wrong)
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match="shared_a.*bytes in the manifest but the index has"):
        physical_restore(st, sid, target, verify=False, sync=False, clean=False)
    assert (target / "base/1/shared_a").read_bytes() == b"", "nothing of a window with a bad reference is written"


def test_a_lost_read_lease_stops_the_restore(st: Store, tmp_path: Path, small_windows: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch re-checks the read lease before each window (the streaming reader did per file): a prune that
    took over may have repacked what is still to be read."""
    from airflow_provider_pgplakar.pg import datadir
    from airflow_provider_pgplakar.store.locks import LeaseExpired

    sid = _snapshot(st)
    windows = 0
    real = batchrestore.BatchRestore._submit

    def submit(self):
        nonlocal windows
        windows += 1
        if windows == 3:
            assert st.leases.read is not None
            monkeypatch.setattr(st.leases.read, "lost", "was removed by a prune")
        return real(self)

    monkeypatch.setattr(batchrestore.BatchRestore, "_submit", submit)
    with pytest.raises(LeaseExpired, match="was removed by a prune"):
        datadir.physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)
    assert windows == 3


def test_in_flight_bounds_hold(st: Store, tmp_path: Path, small_windows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting windows, open files and kept digest content stay within their bounds (the memory bound)."""
    sid = _snapshot(st)
    seen = {"windows": 0, "files": 0, "kept": 0}
    real = batchrestore.BatchRestore._complete

    def complete(self, w):
        jobs = {id(j): j for x in [w, *self.inflight] for j in x.jobs}
        seen["windows"] = max(seen["windows"], len(self.inflight) + 1)
        seen["files"] = max(seen["files"], len(self.open))
        seen["kept"] = max(seen["kept"], sum(len(p) for j in jobs.values() for p in list(j.pieces.values())))
        return real(self, w)

    monkeypatch.setattr(batchrestore.BatchRestore, "_complete", complete)
    physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)
    assert seen["windows"] <= batchrestore.IN_FLIGHT + 1
    assert 0 < seen["files"] <= batchrestore.IN_FLIGHT_FILES + batchrestore.WINDOW_FILES + 1
    assert 0 < seen["kept"] <= batchrestore.IN_FLIGHT_DIGEST_RAW + batchrestore.WINDOW_RAW + BLOCK
    assert _restored(tmp_path / "restored")["/data/pg_wal/000000010000000000000001"] == CONTENT[
        "/data/pg_wal/000000010000000000000001"]


def test_open_files_stay_within_the_fd_limit(st: Store, tmp_path: Path) -> None:
    """Many small files under a low soft ``RLIMIT_NOFILE`` (systemd's default is 1024, and a task process holds
    sockets, logs and connections besides): the batch keeps at most a share of what is left open, not 768 fds."""
    import resource

    many = {f"/data/base/7/{n}": f"file {n}\n".encode() for n in range(700)}
    meta = {"server_version_num": 150004, "server_major": 15, "tablespaces": []}
    with st.writer(source={"kind": "postgres+bin", "origin": "postgres+bin://test"}, meta=meta) as w:
        for d in ("/data", "/data/base", "/data/base/7"):
            w.add_entry(d, "d", mode=0o700)
        for path, data in {"/data/PG_VERSION": b"15\n", "/data/backup_label": b"x\n", **many}.items():
            w.add_stream(path, io.BytesIO(data), chunking=Chunking.fixed(BLOCK), mode=0o600)
    sid = w.snapshot_id
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 300, hard))
    try:
        physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = _restored(tmp_path / "restored")
    assert {p: got[p] for p in many} == many


def test_a_read_lease_lost_while_the_last_windows_drain_is_named(st: Store, tmp_path: Path, small_windows: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No window is submitted after the last one, so no lease check runs while the in-flight windows drain: a prune
    that took over meanwhile and removed a pack must be reported as the lost lease (retry), not as a corrupt store."""
    import threading

    from airflow_provider_pgplakar.store.locks import LeaseExpired
    from airflow_provider_pgplakar.store.reader import chunk_refs

    sid = _snapshot(st)
    last = "/data/base/5/39"
    loc = st.cache.lookup(next(chunk_refs(st, st.find_record(sid, last)))[0])
    assert loc is not None
    pack = Path(st.backend.root) / f"packs/{loc.pack_id[:2]}/{loc.pack_id}"
    pruned = threading.Event()
    real_fetch, real_complete = batchrestore.BatchRestore._fetch, batchrestore.BatchRestore._complete

    def fetch(self, group):
        if any(job.record.path == last for _b, _l, dests in group for job, _o, _i in dests):
            assert pruned.wait(30)
        return real_fetch(self, group)

    def complete(self, w):
        if any(job.record.path == last for job in w.jobs) and not pruned.is_set():
            assert st.leases.read is not None
            monkeypatch.setattr(st.leases.read, "lost", "was removed by a prune")
            pack.unlink()
            pruned.set()
        return real_complete(self, w)

    monkeypatch.setattr(batchrestore.BatchRestore, "_fetch", fetch)
    monkeypatch.setattr(batchrestore.BatchRestore, "_complete", complete)
    with pytest.raises(LeaseExpired, match="was removed by a prune"):
        physical_restore(st, sid, tmp_path / "restored", verify=False, sync=False)


def test_a_chunk_missing_from_the_index_names_its_record(st: Store, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One index query serves a whole window of records: the error names the record that references the unknown
    blob, not the window's first record."""
    from airflow_provider_pgplakar.store.reader import chunk_refs

    sid = _snapshot(st)
    rec = st.find_record(sid, "/data/base/1/shared_b")
    refs = [[b, n] for b, n in chunk_refs(st, rec)]
    refs[1][0] = bytes(range(32))  # a blob no pack holds
    wrong = type(rec)({**rec._raw, "c": refs})
    _serve_instead(monkeypatch, rec.path, lambda _r: wrong)
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match=r"blob 0001020304050607 \(record '/data/base/1/shared_b'\) is not in the"):
        physical_restore(st, sid, target, verify=False, sync=False, clean=False)
    assert (target / "base/1/shared_b").read_bytes() == b"", "nothing of a window with an unknown chunk is written"


@pytest.mark.parametrize("size,error", [(0, "hold more than the 0 bytes"), (BLOCK + 1, "hold more than the 8193"),
                                        (3 * BLOCK + 1, "24576 bytes read, the manifest says 24577"),
                                        (10**18, "24576 bytes read, the manifest says 1000000000000000000")])
def test_a_size_disagreeing_with_the_chunks_fails_naming_the_record(st: Store, tmp_path: Path, small_windows: None,
                                                                    monkeypatch: pytest.MonkeyPatch, size: int,
                                                                    error: str) -> None:
    """More chunk bytes than the size: refused before the surplus is written; fewer (or a huge claimed size: nothing
    is allocated from it): refused when the record's last window completes. Every fd is closed either way."""
    sid = _snapshot(st)
    path = "/data/base/1/shared_a"  # 3 chunks of 8 KiB
    rec = st.find_record(sid, path)
    _serve_instead(monkeypatch, path, lambda r: r.replace(size=size))
    fds = len(os.listdir("/proc/self/fd"))
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match=f"record '{path}': .*{error}"):
        physical_restore(st, sid, target, verify=False, sync=True, clean=False)
    assert len(os.listdir("/proc/self/fd")) == fds
    written = (target / "base/1/shared_a").read_bytes()
    assert len(written) <= min(size, rec.size or 0)
    assert written == CONTENT[path][: len(written)]
    assert os.stat(target / "base/1/shared_a").st_mtime_ns != rec.mtime_ns, "a file never reported done got its mtime"


@pytest.mark.parametrize("fault", ["enospc", "missing_pack"])
def test_a_failing_worker_stops_the_pool_and_closes_every_fd(st: Store, tmp_path: Path, small_windows: None,
                                                            monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """A worker's failure mid-window (the disk full on a pwrite, a pack gone) fails the restore with it; no worker
    or fsync thread outlives the restore and no fd of a file, finished or not, is left open."""
    import errno
    import threading

    from airflow_provider_pgplakar.store.reader import chunk_refs

    sid = _snapshot(st)
    if fault == "enospc":
        writes = 0
        real = batchrestore._pwritev_all

        def pwritev(fd: int, bufs: list[bytes], offset: int) -> None:
            nonlocal writes
            writes += 1
            if writes == 12:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, bufs, offset)

        monkeypatch.setattr(batchrestore, "_pwritev_all", pwritev)
        expected: type[Exception] = OSError
        match = "No space left"
    else:
        loc = st.cache.lookup(list(chunk_refs(st, st.find_record(sid, "/data/base/1/big")))[50][0])
        assert loc is not None
        (Path(st.backend.root) / f"packs/{loc.pack_id[:2]}/{loc.pack_id}").unlink()
        expected, match = IntegrityError, "is missing from .* \\(needed by record '/data/base/1/big'\\)"
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(expected, match=match):
        physical_restore(st, sid, tmp_path / "restored", verify=False, sync=True)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("pgplakar-restore", "pgplakar-fsync"))]
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_a_cancel_while_windows_are_in_flight_stops_them(st: Store, tmp_path: Path, small_windows: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """on_kill (cancel() from another thread) while workers decode: the restore raises TaskCancelled after at most
    the window being completed; the queued reads are dropped, the pool stops and no fd is left open."""
    import threading

    from airflow_provider_pgplakar.pg.process import TaskCancelled, cancel

    sid = _snapshot(st)
    fetches = 0
    real = batchrestore.BatchRestore._fetch

    def fetch(self, group):
        nonlocal fetches
        fetches += 1
        if fetches == 4:
            cancel()  # from a worker thread, as a signal handler or on_kill's thread would
        return real(self, group)

    monkeypatch.setattr(batchrestore.BatchRestore, "_fetch", fetch)
    fds = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(TaskCancelled):
        physical_restore(st, sid, tmp_path / "restored", verify=False, sync=True)
    assert fetches <= 4 + (batchrestore.IN_FLIGHT + 1) * batchrestore.WINDOW_REFS < 59, "reads went on (59 in all)"
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("pgplakar-restore", "pgplakar-fsync"))]
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_a_chunk_naming_a_manifest_blob_is_refused_before_writing(st: Store, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk reference to a manifest leaf (type confusion, with the right length) is refused by its type, naming
    the record, before anything of its window is read."""
    sid = _snapshot(st)
    leaf = st.load_snapshot(sid).header["manifest"]["leaves"][0][0]
    loc = st.cache.lookup(leaf)
    assert loc is not None
    rec = st.find_record(sid, "/data/base/1/shared_b")
    wrong = type(rec)({**{k: v for k, v in rec._raw.items() if k not in ("b", "d")}, "c": [[leaf, loc.raw_len]],
                       "s": loc.raw_len})
    _serve_instead(monkeypatch, rec.path, lambda _r: wrong)
    target = tmp_path / "restored"
    with pytest.raises(IntegrityError, match=r"'/data/base/1/shared_b': chunk [0-9a-f]{16} is not file content"):
        physical_restore(st, sid, target, verify=False, sync=False, clean=False)
    assert (target / "base/1/shared_b").read_bytes() == b""


@pytest.mark.parametrize("run_bytes", [1, 3 * BLOCK + 1])
def test_runs_of_verified_chunks_are_written_whole(st: Store, tmp_path: Path, small_windows: None,
                                                   monkeypatch: pytest.MonkeyPatch, run_bytes: int) -> None:
    """A worker collects verified chunks in its buffer and writes each file's consecutive ones with one pwritev:
    runs cut after every chunk (the buffer grown per chunk) or every few, and a kernel that writes less than asked
    (a short pwritev, finished with pwrite), still give every file exactly its content."""
    sid = _snapshot(st)
    monkeypatch.setattr(batchrestore, "RUN_BYTES", run_bytes)
    calls: list[int] = []
    real = os.pwritev

    def short_pwritev(fd: int, bufs: list[Any], offset: int) -> int:
        calls.append(len(bufs))
        total = sum(len(b) for b in bufs)
        if total > 1 and len(calls) % 2:  # every other call writes only part of its first buffer
            return os.pwrite(fd, bytes(memoryview(bufs[0])[: max(1, len(bufs[0]) // 2)]), offset)
        return real(fd, bufs, offset)

    monkeypatch.setattr(batchrestore.os, "pwritev", short_pwritev)
    target = tmp_path / "restored"
    physical_restore(st, sid, target, verify=False, sync=False)
    got = _restored(target)
    for path, data in {**CONTENT, **SMALL}.items():
        assert got[path] == data, path
    assert calls, "the restore wrote nothing through pwritev"
    if run_bytes > BLOCK:
        assert max(calls) >= 3, "consecutive chunks of a file were not written with one call"
