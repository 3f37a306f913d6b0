"""Config format 2: a tag keyed from the master authenticates ``config`` on every open (raw key included), every
parameter read from it is bounded, and format-1 stores (tests/store/data/legacy-v1, written by the format-1 code)
still open and read.

A config is edited here the way an attacker with write access to the store would: fields changed and the unkeyed
checksum recomputed, so only the tag (or a bound) can tell.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.store import errors
from airflow_provider_pgplakar.store.crypto import KdfParams
from airflow_provider_pgplakar.store.keyfiles import dump_checked, load_checked
from airflow_provider_pgplakar.store.repo import Store
from tests.store.conftest import PASSPHRASE

LEGACY = Path(__file__).parent / "data" / "legacy-v1"
# Written by the format-1 code (main at fd44146) with tests/store/data/legacy-v1/README.md's recipe.
LEGACY_PASSPHRASE = "legacy passphrase"
LEGACY_RAW_KEY = "SdDEOPs2g3znzYhyVNGf4fKFLY9ZwW0rA/6YzJRo+k6lbTf8feQtBs0A9TqLFRHfWoq36NV8e40h5uXFcf68vQ=="
LEGACY_SNAPSHOTS = {"encrypted": "429103e66d427f0600c3d3ab9fc9a7d1", "plaintext": "675da27f879fbce08b40cc17e30c21c8"}
LEGACY_FILES = {
    "/hello.txt": "9d91ce380ae7686843eb329ea0e498be1e9e01ed6cd1d34db739217c18b4c060",
    "/lines.txt": "3e7685dcdbe36910406f5a4750a3fdaf9668aa92d0ba0113406cc434a81f3721",
}
DATA = b"authenticated config " * 5000


def _cache(tmp_path: Path) -> Path:
    return tmp_path / f"cache-{uuid.uuid4().hex[:8]}"


def _open(location: str, tmp_path: Path, passphrase: str | None = PASSPHRASE, **kw: Any) -> Store:
    return Store.open(location, passphrase, cache_dir=_cache(tmp_path), **kw)


def _backup(store: Store) -> str:
    with store.writer(source={"kind": "test", "origin": "config-auth"}) as w:
        w.add_bytes("/f", DATA)
    return w.snapshot_id


def _read(store: Store, snap_id: str, path: str = "/f") -> bytes:
    with store.open_record(store.find_record(snap_id, path)) as f:
        return f.read()


def _edit_config(store: Store, **changes: Any) -> None:
    body = load_checked(store.backend.get("config"), "config")
    body.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del body[k]
    store.backend.put("config", dump_checked(body), create_only=False)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


def test_new_config_is_format_2_with_a_tag(store: Store) -> None:
    body = json.loads(store.backend.get("config"))
    assert body["format"] == 2 and len(body["tag"]) == 64 and len(body["key_check"]) == 32


@pytest.mark.parametrize("change", [
    {"pack_target": 8 * 1024 * 1024},  # within bounds: only the tag can tell
    {"chunker": {"alg": "fastcdc2020", "lib": "pyfastcdc==0.3.1", "min": 8192, "avg": 16384, "max": 65536, "nc": 2}},
    {"compression": {"alg": "zstd", "level": 19}},
    {"repo_id": "0123456789abcdef0123456789abcdef"},
    {"created": "2001-01-01T00:00:00+00:00"},
    {"key_check": "00" * 16},
], ids=["pack_target", "chunker", "compression", "repo_id", "created", "key_check"])
def test_edited_config_is_refused_with_raw_key_and_passphrase(
    store: Store, location: str, tmp_path: Path, change: dict[str, Any]
) -> None:
    snap = _backup(store)
    raw = store.export_key()
    good = store.backend.get("config")
    _edit_config(store, **change)
    with pytest.raises(errors.IntegrityError) as ei:
        _open(location, tmp_path, PASSPHRASE)
    msg = _one_line(ei.value)
    if "key_check" not in change:
        assert "config of" in msg and "does not match its authentication tag" in msg
    assert "wrong passphrase" not in msg
    with pytest.raises((errors.IntegrityError, errors.WrongPassphrase)) as ei:
        _open(location, tmp_path, None, key=raw)
    if "key_check" not in change:
        assert "does not match its authentication tag" in _one_line(ei.value)
    store.backend.put("config", good, create_only=False)
    assert _read(_open(location, tmp_path, None, key=raw), snap) == DATA


def test_tag_removed_or_config_downgraded_to_format_1_is_refused(store: Store, location: str, tmp_path: Path) -> None:
    """Format 1 has no tag: rewriting a format-2 config as format 1 must not switch the check off."""
    raw = store.export_key()
    _edit_config(store, tag=None)
    with pytest.raises(errors.IntegrityError, match="authentication tag is missing"):
        _open(location, tmp_path, None, key=raw)
    _edit_config(store, format=1, pack_target=8 * 1024 * 1024)
    with pytest.raises(errors.IntegrityError) as ei:
        _open(location, tmp_path, PASSPHRASE)
    assert "does not match its authentication tag" in _one_line(ei.value)
    with pytest.raises(errors.WrongPassphrase, match="does not belong"):  # the v1 key check is another derivation
        _open(location, tmp_path, None, key=raw)


@pytest.mark.parametrize(("change", "why"), [
    ({"pack_target": 1 << 40}, "pack_target="),
    ({"pack_target": 1024}, "pack_target="),
    ({"pack_target": "16777216"}, "pack_target="),
    ({"chunker": {"alg": "fastcdc2020", "min": 64, "avg": 256, "max": 1024, "nc": 1}}, "chunker min="),
    ({"chunker": {"alg": "fastcdc2020", "min": 65536, "avg": 32768, "max": 1 << 20, "nc": 1}}, "ordered"),
    ({"chunker": {"alg": "fastcdc2020", "min": 32768, "avg": 131072, "max": 1 << 30, "nc": 1}}, "chunker max="),
    ({"chunker": {"alg": "other"}}, "fastcdc2020"),
    ({"compression": {"alg": "zstd", "level": 99}}, "compression level"),
    ({"compression": {"alg": "lz4", "level": 1}}, "zstd"),
    ({"repo_id": "../../x"}, "repo_id"),
    ({"repo_id": "0123456789ABCDEF0123456789ABCDEF"}, "repo_id"),
    ({"encryption": "rot13"}, "encryption"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_out_of_bounds_config_is_refused_before_use(
    store: Store, location: str, tmp_path: Path, change: dict[str, Any], why: str
) -> None:
    raw = store.export_key()
    _edit_config(store, **change)
    cache = tmp_path / "deep" / "a" / "cache"
    for kwargs in ({"key": raw}, {"passphrase": PASSPHRASE}):
        passphrase = kwargs.pop("passphrase", None)
        with pytest.raises(errors.IntegrityError) as ei:
            Store.open(location, passphrase, cache_dir=cache, **kwargs)
        msg = _one_line(ei.value)
        assert msg.startswith("config of ") and why in msg, msg
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()  # no index cache anywhere


def test_key_file_kdf_cost_is_bounded(store: Store, location: str, tmp_path: Path) -> None:
    """A key file asking for 2 TiB of Argon2 memory is damage, not a reason to allocate it."""
    (name,) = [o.key for o in store.backend.list("keys/")]
    body = load_checked(store.backend.get(name), name)
    store.backend.put(name, dump_checked({**body, "m_kib": 1 << 31}), create_only=False)
    with pytest.raises(errors.IntegrityError, match=rf"{name}: Argon2id m_kib=2147483648 is outside"):
        _open(location, tmp_path)
    store.backend.put(name, dump_checked({**body, "t": 0}), create_only=False)
    with pytest.raises(errors.IntegrityError, match="Argon2id t=0"):
        _open(location, tmp_path)


def test_kdf_env_floor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for bad in ("1,8,1", "1,8192,0", "100,8192,1", "nonsense"):
        monkeypatch.setenv("PGPLAKAR_KDF", bad)
        with pytest.raises(errors.StoreError, match="PGPLAKAR_KDF="):
            Store.create(str(tmp_path / f"s{uuid.uuid4().hex[:6]}"), PASSPHRASE, cache_dir=_cache(tmp_path))
    with pytest.raises(errors.StoreError, match="key derivation cost refused"):
        Store.create(str(tmp_path / "explicit"), PASSPHRASE, kdf=KdfParams(1, 1024, 1), cache_dir=_cache(tmp_path))


def test_create_refuses_out_of_bounds_parameters(tmp_path: Path) -> None:
    with pytest.raises(errors.StoreError, match="pack_target="):
        Store.create(str(tmp_path / "a"), PASSPHRASE, pack_target=1 << 30, cache_dir=_cache(tmp_path))
    assert not (tmp_path / "a" / "config").exists()


def test_plaintext_store_has_no_tag_but_bounds(location: str, tmp_path: Path) -> None:
    """No secret, no authentication (docs/format.md §3.1): the bounds are all a plaintext store gets."""
    st = Store.create(location, plaintext=True, cache_dir=_cache(tmp_path))
    body = json.loads(st.backend.get("config"))
    assert body["format"] == 2 and "tag" not in body and body["key_check"] == ""
    _edit_config(st, repo_id="../../x")
    with pytest.raises(errors.IntegrityError, match="repo_id"):
        _open(location, tmp_path, None)


# -- format 1 ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the committed format-1 stores."""
    dest = tmp_path / "legacy"
    shutil.copytree(LEGACY, dest)
    return dest


def _check_legacy_files(st: Store, snap: str) -> None:
    for path, digest in LEGACY_FILES.items():
        assert hashlib.sha256(_read(st, snap, path)).hexdigest() == digest
        # records of writers before BLAKE3 record digests carry SHA-256, which the read verified; a wrong one fails
        rec = st.find_record(snap, path)
        assert rec.sha256 is not None and rec.sha256.hex() == digest and rec.blake3 is None
        with pytest.raises(errors.IntegrityError, match="the SHA-256 does not match the manifest"), \
                st.open_record(rec.replace(sha256=bytes(32))) as r:
            r.read()


@pytest.mark.parametrize("how", ["passphrase", "raw-key"])
def test_format_1_encrypted_store_opens_reads_and_takes_new_snapshots(legacy: Path, tmp_path: Path, how: str) -> None:
    loc = str(legacy / "encrypted")
    kw: dict[str, Any] = {"passphrase": LEGACY_PASSPHRASE} if how == "passphrase" else {"key": LEGACY_RAW_KEY}
    st = Store.open(loc, kw.pop("passphrase", None), cache_dir=_cache(tmp_path), **kw)
    assert st.config.format == 1
    _check_legacy_files(st, LEGACY_SNAPSHOTS["encrypted"])
    snap = _backup(st)
    key_id = st.add_key("another passphrase", comment="added by format 2 code")
    st.close()
    again = _open(loc, tmp_path, "another passphrase")
    assert _read(again, snap) == DATA
    _check_legacy_files(again, LEGACY_SNAPSHOTS["encrypted"])
    again.remove_key(key_id)
    assert base64.b64decode(again.export_key()) == base64.b64decode(LEGACY_RAW_KEY)


def test_format_1_plaintext_store_opens_and_reads(legacy: Path, tmp_path: Path) -> None:
    st = _open(str(legacy / "plaintext"), tmp_path, None)
    assert st.config.format == 1 and not st.config.encrypted
    _check_legacy_files(st, LEGACY_SNAPSHOTS["plaintext"])


def test_format_1_config_edit_still_fails_passphrase_unlock(legacy: Path, tmp_path: Path) -> None:
    """Format 1's only authentication, SHA-256(config) in the key files' AAD, still holds."""
    loc = str(legacy / "encrypted")
    cfg = legacy / "encrypted" / "config"
    body = load_checked(cfg.read_bytes(), "config")
    cfg.write_bytes(dump_checked({**body, "pack_target": 8 * 1024 * 1024}))
    with pytest.raises(errors.WrongPassphrase):
        _open(loc, tmp_path, LEGACY_PASSPHRASE)


def test_stray_key_file_of_another_master_does_not_block_unlock(store: Store, location: str, tmp_path: Path) -> None:
    """A key file left by a lost create race (another master, same passphrase) opens but is skipped: the master
    that authenticates the config wins."""
    import secrets

    from airflow_provider_pgplakar.store.keyfiles import make_key_file

    snap = _backup(store)
    stray = make_key_file(store.config, secrets.token_bytes(64), PASSPHRASE.encode(), KdfParams.from_env(), "stray")
    store.backend.put("keys/0000000000000000", stray)
    assert _read(_open(location, tmp_path), snap) == DATA
    for o in store.backend.list("keys/"):
        if o.key != "keys/0000000000000000":
            store.backend.delete(o.key)
    with pytest.raises(errors.IntegrityError, match="does not match its authentication tag"):
        _open(location, tmp_path)
