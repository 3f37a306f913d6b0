"""Golden chunk boundaries: a chunker upgrade that moves cut points must fail here, not silently kill dedup.

The lists below were computed once with pyfastcdc 0.3.1 (compiled extension) and the store's default parameters
(FastCDC 2020, min/avg/max 32/128/512 KiB, normalized chunking 1) and pasted as literals. If one of them changes,
every existing store stops deduplicating against new backups: do not "update the golden values" without a store
format migration plan.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import itertools
import re
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.chunker import DEFAULT_CDC, Chunker, Chunking
from airflow_provider_pgplakar.store.crypto import Keys
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE
from tests.store.streams import Trickle

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = 4 * 1024 * 1024
FIXED_MASTER = bytes(range(64))
FIXED_SEED = 2741125869470058161  # Keys.from_master(FIXED_MASTER).cdc_seed: pins the seed derivation too

GOLDEN = {
    ("random", 0): [
        187777, 200797, 72216, 150630, 113066, 177707, 135656, 46434, 121752, 68249, 178200, 134237, 156095, 77939,
        57948, 73604, 255737, 150411, 173733, 200747, 60140, 288094, 198201, 130450, 170999, 263446, 100269, 187404,
        62366,
    ],
    ("random", FIXED_SEED): [
        144488, 41802, 100456, 148377, 80653, 167171, 116752, 58686, 411727, 223665, 168844, 184008, 220693, 164421,
        118388, 55657, 38001, 281780, 82042, 103191, 181542, 194594, 253521, 109509, 96364, 35914, 134419, 46924,
        149361, 81354,
    ],
    ("text", 0): [
        151835, 191285, 148068, 132141, 151577, 175876, 178844, 111325, 161114, 150647, 120091, 220215, 158303, 84199,
        234919, 141005, 105693, 239703, 57428, 154308, 266664, 107753, 115852, 176556, 66845, 147130, 181235, 63693,
    ],
    ("text", FIXED_SEED): [
        161968, 165334, 173878, 151549, 342366, 94759, 47720, 238258, 122235, 234937, 166972, 84441, 198039, 139564,
        172706, 346100, 184575, 175479, 203421, 196076, 215281, 142501, 236145,
    ],
}


def _random_input() -> bytes:
    return hashlib.shake_256(b"pgplakar chunker golden v1").digest(SIZE)


def _text_input() -> bytes:
    """Line-structured, compressible, deterministic (no dependency on any other test helper)."""
    out = bytearray()
    i = 0
    while len(out) < SIZE:
        tail = hashlib.sha256(b"%d" % i).hexdigest()[: (i * 7) % 41].encode()
        out += b"%08d\t%010d\trow-%02d\t%s\n" % (i, (i * 2654435761) % 2**32, i % 97, tail)
        i += 1
    return bytes(out[:SIZE])


INPUTS = {"random": _random_input, "text": _text_input}
INPUT_SHA256 = {
    "random": "96c421231ee3368e9613651087ea3c805e4211a851f1ad4ccb3ec52246ce7870",
    "text": "87071aaed701806a6bbc605e579a800e3056c4733f6dfcb09152f00b8518c634",
}


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    data = {name: make() for name, make in INPUTS.items()}
    # The inputs are pinned too: a changed input generator must not pass for a changed chunker (or hide one).
    assert {name: hashlib.sha256(d).hexdigest() for name, d in data.items()} == INPUT_SHA256
    return data


class _ReadOnly:
    """Only ``read``: the chunker must fall back to it."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 10_000) if n > 0 else n)


def _lengths(chunks) -> list[int]:
    return [len(c) for c in chunks]


# -- the library and its pin ------------------------------------------------------------------------------------


def test_pyfastcdc_is_the_pinned_compiled_build() -> None:
    import pyfastcdc
    import pyfastcdc.cy
    import pyfastcdc.cy.fastcdc as cy_fastcdc

    assert importlib.metadata.version("pyfastcdc") == "0.3.1"
    assert pyfastcdc.__version__ == "0.3.1"
    # compiled, not the pure-Python fallback (300x slower, and a different code path for cut points)
    assert Path(cy_fastcdc.__file__).suffix in (".so", ".pyd"), cy_fastcdc.__file__
    assert pyfastcdc.cy.FastCDC is cy_fastcdc.FastCDC
    assert type(Chunker(DEFAULT_CDC, 0)._cdc) is cy_fastcdc.FastCDC
    assert DEFAULT_CDC == {"alg": "fastcdc2020", "lib": "pyfastcdc==0.3.1", "min": 32 * 1024, "avg": 128 * 1024,
                           "max": 512 * 1024, "nc": 1}
    pins = re.findall(r'"pyfastcdc([^"]*)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pins == ["==0.3.1"], f"pyfastcdc must stay pinned exactly in pyproject.toml, found {pins}"


def test_fixed_seed_derivation_is_stable() -> None:
    assert Keys.from_master(FIXED_MASTER).cdc_seed == FIXED_SEED
    assert Keys.public("00" * 16).cdc_seed == 0  # plaintext stores chunk with seed 0


# -- golden boundaries ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, FIXED_SEED], ids=["seed0", "fixed-seed"])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_golden_chunk_lengths(inputs: dict[str, bytes], kind: str, seed: int) -> None:
    data = inputs[kind]
    golden = GOLDEN[(kind, seed)]
    assert sum(golden) == SIZE
    chunker = Chunker(DEFAULT_CDC, seed)
    got = _lengths(chunker.chunks(io.BytesIO(data)))
    assert got == golden, "pyfastcdc cut points moved: existing stores would stop deduplicating"
    # the chunks are the input, in order, as independent copies
    assert b"".join(chunker.chunks(io.BytesIO(data))) == data
    # short reads (pipes) and read()-only streams cut identically
    assert _lengths(chunker.chunks(Trickle(data, 4099))) == golden
    assert _lengths(chunker.chunks(io.BufferedReader(Trickle(data, 65536)))) == golden
    assert _lengths(chunker.chunks(_ReadOnly(data))) == golden


@pytest.mark.parametrize("batch", [1 << 20, 3 * (1 << 20) + 4321, SIZE, SIZE + 1, 2 * SIZE])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_batches_cut_as_the_stream_chunker(inputs: dict[str, bytes], kind: str, batch: int) -> None:
    """The writer's zero-copy path (``Chunker.batches``: fixed buffers, the tail carried over) cuts exactly the
    golden points for any buffer size and read pattern, and its views stay valid and read-only after the fact."""
    data = inputs[kind]
    golden = GOLDEN[(kind, FIXED_SEED)]
    chunker = Chunker(DEFAULT_CDC, FIXED_SEED)
    for stream in (io.BytesIO(data), Trickle(data, 4099), _ReadOnly(data)):
        batches = list(chunker.batches(stream, batch))
        views = [v for b in batches for v in b]
        assert _lengths(views) == golden
        assert b"".join(views) == data  # every earlier buffer still intact after the whole stream was read
        assert all(v.readonly for v in views)
        assert all(sum(map(len, b)) <= max(batch, 2 * DEFAULT_CDC["max"]) for b in batches)
    assert list(chunker.batches(io.BytesIO(b""), batch)) == []


def test_golden_lists_are_plausible() -> None:
    """Sanity of the pasted literals: distinct per seed and input, and within the chunker's bounds."""
    for a, b in itertools.combinations(GOLDEN.values(), 2):
        assert a != b
    for lengths in GOLDEN.values():
        assert all(DEFAULT_CDC["min"] <= n <= DEFAULT_CDC["max"] for n in lengths[:-1])
        assert 0 < lengths[-1] <= DEFAULT_CDC["max"]


def test_fixed_chunking_lengths(inputs: dict[str, bytes]) -> None:
    chunker = Chunker(DEFAULT_CDC, 0)
    data = inputs["random"][: SIZE - 12345]
    for block in (4096, 128 * 1024, 1024 * 1024 - 1):
        want = [block] * (len(data) // block) + ([len(data) % block] if len(data) % block else [])
        assert _lengths(chunker.chunks(io.BytesIO(data), Chunking.fixed(block))) == want
        assert _lengths(chunker.chunks(Trickle(data, 1000), Chunking.fixed(block))) == want
        assert _lengths(chunker.chunks(_ReadOnly(data), Chunking.fixed(block))) == want


# -- through a store, on both backends ------------------------------------------------------------------------


def _record_lengths(st: Store, path: str) -> list[int]:
    snap = st.resolve("latest")
    return [n for _id, n in chunk_refs(st, st.find_record(snap, path))]


def test_plaintext_store_uses_golden_seed0_boundaries(location: str, inputs: dict[str, bytes], tmp_path: Path) -> None:
    st = Store.create(location, plaintext=True)
    try:
        assert st.keys.cdc_seed == 0
        assert {k: st.config.chunker[k] for k in ("alg", "min", "avg", "max", "nc")} == {
            k: DEFAULT_CDC[k] for k in ("alg", "min", "avg", "max", "nc")
        }
        with st.writer() as w:
            for kind, data in inputs.items():
                w.add_bytes(f"/{kind}", data)
    finally:
        st.close()
    st = Store.open(location, plaintext=True, cache_dir=tmp_path / "reader-cache")
    try:
        for kind, data in inputs.items():
            assert _record_lengths(st, f"/{kind}") == GOLDEN[(kind, 0)]
            with st.open_record(st.find_record(st.resolve("latest"), f"/{kind}")) as r:
                assert r.read() == data
    finally:
        st.close()


def test_encrypted_store_chunks_with_its_own_seed(
    store: Store, location: str, inputs: dict[str, bytes], tmp_path: Path
) -> None:
    """An encrypted store cuts with its secret seed (cut points must not leak content): not the seed-0 points."""
    assert store.keys.cdc_seed != 0
    with store.writer() as w:
        for kind, data in inputs.items():
            w.add_bytes(f"/{kind}", data)
    expected = Chunker(DEFAULT_CDC, store.keys.cdc_seed)
    for kind, data in inputs.items():
        got = _record_lengths(store, f"/{kind}")
        assert got == _lengths(expected.chunks(io.BytesIO(data)))
        assert got != GOLDEN[(kind, 0)]
    # the same secret, unlocked again from the passphrase, keeps the same cut points (so dedup continues)
    st2 = Store.open(location, PASSPHRASE, cache_dir=tmp_path / "second-cache")
    try:
        assert st2.keys.cdc_seed == store.keys.cdc_seed
        assert _record_lengths(st2, "/text") == _lengths(expected.chunks(io.BytesIO(inputs["text"])))
    finally:
        st2.close()


def test_batch_buffers_are_reused_across_records_but_never_while_viewed() -> None:
    """A finished record's batch buffers serve the next records (no fresh 4 MiB allocation each), but a buffer is
    never written again while any view of it is alive, whichever record it came from; at most SPARE_BUFFERS are
    kept."""
    from airflow_provider_pgplakar.store.chunker import SPARE_BUFFERS

    chunker = Chunker(DEFAULT_CDC, FIXED_SEED)
    a, b, c = (hashlib.shake_256(seed).digest(3 * SIZE) for seed in (b"a", b"b", b"c"))
    views_a = [v for batch in chunker.batches(io.BytesIO(a)) for v in batch]
    bufs_a = {id(v.obj) for v in views_a}
    views_b = [v for batch in chunker.batches(io.BytesIO(b)) for v in batch]  # a's views are alive: fresh buffers
    assert not bufs_a & {id(v.obj) for v in views_b}
    assert b"".join(views_a) == a
    del views_b
    views_c = [v for batch in chunker.batches(io.BytesIO(c)) for v in batch]
    assert b"".join(views_a) == a and b"".join(views_c) == c
    assert not bufs_a & {id(v.obj) for v in views_c}  # still viewed: never taken
    del views_a, views_c
    spare_ids = {id(s) for s in chunker._spare}
    assert len(spare_ids) == SPARE_BUFFERS
    views_d = [v for batch in chunker.batches(io.BytesIO(a)) for v in batch]
    assert {id(v.obj) for v in views_d} <= spare_ids  # every buffer of the new record is a spare
    assert b"".join(views_d) == a
