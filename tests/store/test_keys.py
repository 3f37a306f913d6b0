"""Keys and encryption modes: passphrases, key files, raw keys, plaintext stores, and refusals — on both backends."""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store import check as check_mod
from airflow_provider_pgplakar.store import errors
from airflow_provider_pgplakar.store.keyfiles import dump_checked, load_checked
from airflow_provider_pgplakar.store.pack import pack_object_name
from airflow_provider_pgplakar.store.reader import chunk_refs
from airflow_provider_pgplakar.store.repo import Store
from tests.helpers import need
from tests.store.conftest import PASSPHRASE

WRONG = "wrong-horse-7f3a"
SECOND = "second passphrase 19c2"
DATA = random.Random(7).randbytes(200_000)  # incompressible: stored as is in a plaintext store


def _cache(tmp_path: Path) -> Path:
    return tmp_path / f"cache-{uuid.uuid4().hex[:8]}"


def _open(location: str, tmp_path: Path, passphrase: str | None = PASSPHRASE, **kw: object) -> Store:
    return Store.open(location, passphrase, cache_dir=_cache(tmp_path), **kw)  # type: ignore[arg-type]


def _backup(store: Store, data: bytes = DATA) -> str:
    with store.writer(source={"kind": "test", "origin": "keys"}) as w:
        w.add_bytes("/f", data)
    return w.snapshot_id


def _read(store: Store, snap_id: str, path: str = "/f") -> bytes:
    with store.open_record(store.find_record(snap_id, path)) as f:
        return f.read()


def _one_line(e: BaseException, *secrets_: str) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    for s in secrets_:
        assert s not in msg, "an error message must never contain a passphrase or key"
    return msg


def _key_ids(store: Store) -> dict[str, str]:
    """comment -> key ID"""
    return {k["comment"]: k["id"] for k in store.list_keys()}


# -- passphrase --------------------------------------------------------------------------------------------------------
def test_wrong_passphrase(store: Store, location: str, tmp_path: Path) -> None:
    with pytest.raises(errors.WrongPassphrase) as ei:
        _open(location, tmp_path, WRONG)
    msg = _one_line(ei.value, WRONG, PASSPHRASE)
    assert msg.startswith("wrong passphrase for ") and store.location in msg
    with pytest.raises(errors.WrongPassphrase, match="is encrypted: give a passphrase"):
        _open(location, tmp_path, None)


def test_wrong_passphrase_cli(tmp_path: Path) -> None:
    """The CLI's side of it (local only: tests/test_cli.py covers the CLI, this pins the message)."""
    exe = Path(sys.executable).with_name("pgplakar")
    need(exe.exists(), f"the pgplakar console script next to {sys.executable} (pip install -e .)")
    location = str(tmp_path / "store")
    Store.create(location, PASSPHRASE, cache_dir=_cache(tmp_path)).close()
    env = {**os.environ, "PGPLAKAR_PASSPHRASE": WRONG, "PGPLAKAR_CACHE_DIR": str(_cache(tmp_path))}
    r = subprocess.run([str(exe), "at", location, "ls"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pgplakar: error: wrong passphrase for ")
    assert WRONG not in r.stderr and "Traceback" not in r.stderr


# -- encryption mode mismatches ----------------------------------------------------------------------------------------
def test_plaintext_store_refuses_passphrase_and_key(location: str, tmp_path: Path) -> None:
    Store.create(location, plaintext=True, cache_dir=_cache(tmp_path)).close()
    with pytest.raises(errors.EncryptionMismatch) as ei:
        _open(location, tmp_path, PASSPHRASE)
    assert "plaintext store" in _one_line(ei.value, PASSPHRASE)
    with pytest.raises(errors.EncryptionMismatch):
        _open(location, tmp_path, None, key=base64.b64encode(secrets.token_bytes(64)).decode())
    with pytest.raises(errors.EncryptionMismatch):
        Store.create(str(tmp_path / "other"), PASSPHRASE, plaintext=True)
    with pytest.raises(errors.EncryptionMismatch):
        _open(location, tmp_path, None).add_key(SECOND)


def test_encrypted_store_refuses_plaintext(store: Store, location: str, tmp_path: Path) -> None:
    with pytest.raises(errors.EncryptionMismatch) as ei:
        _open(location, tmp_path, None, plaintext=True)
    assert "encrypted" in _one_line(ei.value)
    with pytest.raises(errors.EncryptionMismatch):
        _open(location, tmp_path, PASSPHRASE, plaintext=True)


def test_tampered_config_claiming_plaintext_is_refused(store: Store, location: str, tmp_path: Path) -> None:
    snap = _backup(store)
    good = store.backend.get("config")
    body = load_checked(good, "config")
    assert body["encryption"] == "aes256gcm"
    forged = dump_checked({**body, "encryption": "none"})  # a valid checksum: only the keys can tell

    # a naive edit breaks the checksum
    store.backend.put("config", good.replace(b'"aes256gcm"', b'"none"'), create_only=False)
    with pytest.raises(errors.IntegrityError, match=r"config of .* is corrupt"):
        _open(location, tmp_path)

    # a consistent forgery is refused while key files exist, whatever the caller passes
    store.backend.put("config", forged, create_only=False)
    for kwargs in ({"passphrase": PASSPHRASE}, {"passphrase": None}, {"passphrase": None, "plaintext": True}):
        with pytest.raises(errors.IntegrityError, match="says plaintext but key files exist"):
            _open(location, tmp_path, **kwargs)  # type: ignore[arg-type]

    # with the key files deleted too, a client that holds a passphrase still refuses (it never writes plaintext),
    # and opening without one reads nothing: every object was sealed with the real key
    saved = {o.key: store.backend.get(o.key) for o in store.backend.list("keys/")}
    for k in saved:
        store.backend.delete(k)
    with pytest.raises(errors.EncryptionMismatch):
        _open(location, tmp_path, PASSPHRASE)
    downgraded = _open(location, tmp_path, None)
    with pytest.raises(errors.IntegrityError):
        downgraded.load_snapshot(snap)

    # restored, the store opens and reads as before
    store.backend.put("config", good, create_only=False)
    for k, v in saved.items():
        store.backend.put(k, v)
    assert _read(_open(location, tmp_path), snap) == DATA


# -- key files ---------------------------------------------------------------------------------------------------------
def test_add_second_passphrase_then_remove_first(store: Store, location: str, tmp_path: Path) -> None:
    snap = _backup(store)
    first = _key_ids(store)["initial"]
    second = store.add_key(SECOND, comment="second")
    assert _key_ids(store) == {"initial": first, "second": second}

    assert _read(_open(location, tmp_path, SECOND), snap) == DATA
    assert _read(_open(location, tmp_path, PASSPHRASE), snap) == DATA

    by_second = _open(location, tmp_path, SECOND)
    by_second.remove_key(first)
    assert list(_key_ids(by_second).values()) == [second]
    with pytest.raises(errors.WrongPassphrase) as ei:
        _open(location, tmp_path, PASSPHRASE)
    _one_line(ei.value, PASSPHRASE, SECOND)
    assert _read(_open(location, tmp_path, SECOND), snap) == DATA

    with pytest.raises(errors.StoreError, match="last key"):
        by_second.remove_key(second)
    with pytest.raises(errors.StoreError, match="no key file"):
        by_second.remove_key("0123456789abcdef")
    assert _read(_open(location, tmp_path, SECOND), snap) == DATA


def test_raw_key(store: Store, location: str, tmp_path: Path) -> None:
    snap = _backup(store)
    raw = store.export_key()
    assert len(base64.b64decode(raw)) == 64

    by_key = _open(location, tmp_path, None, key=raw)
    assert _read(by_key, snap) == DATA
    assert _read(_open(location, tmp_path, None, key=raw.encode() + b"\n"), snap) == DATA  # as read from a file
    # the raw key is the master secret: whoever kept only it can set a new passphrase (disaster recovery)
    new_id = by_key.add_key(SECOND)
    assert _read(_open(location, tmp_path, SECOND), snap) == DATA
    by_key.remove_key(new_id)

    other = base64.b64encode(secrets.token_bytes(64)).decode()
    bad_inputs = {other: "does not belong", "not base64!!": "not valid base64",
                  base64.b64encode(b"short").decode(): "must decode to 64 bytes"}
    for bad, why in bad_inputs.items():
        with pytest.raises(errors.WrongPassphrase, match=why) as ei:
            _open(location, tmp_path, None, key=bad)
        _one_line(ei.value, bad, raw)


# -- plaintext stores --------------------------------------------------------------------------------------------------
def test_encrypted_blobs_are_not_stored_in_clear(store: Store) -> None:
    snap = _backup(store)
    loc = store.cache.lookup(next(chunk_refs(store, store.find_record(snap, "/f")))[0])
    assert loc is not None
    pack = store.backend.get(pack_object_name(loc.pack_id))
    assert DATA[:64] not in pack and DATA[-64:] not in pack


def test_plaintext_round_trip(location: str, tmp_path: Path) -> None:
    st = Store.create(location, plaintext=True, cache_dir=_cache(tmp_path))
    assert not st.config.encrypted
    assert list(st.backend.list("keys/")) == []
    assert json.loads(st.backend.get("config"))["encryption"] == "none"
    snap = _backup(st)
    st.close()

    reopened = _open(location, tmp_path, None)
    assert _read(reopened, snap) == DATA
    assert check_mod.check(reopened, read_data=True).ok

    # not encrypted: the content sits in the pack as is ...
    rec = reopened.find_record(snap, "/f")
    first_blob, first_len = next(chunk_refs(reopened, rec))
    loc = reopened.cache.lookup(first_blob)
    assert loc is not None
    pack_key = pack_object_name(loc.pack_id)
    sealed = reopened.backend.get(pack_key, loc.offset, loc.length)
    assert DATA[:first_len] in sealed

    # ... but still verified: a flipped byte is an IntegrityError, never wrong bytes
    data = bytearray(reopened.backend.get(pack_key))
    data[loc.offset + loc.length // 2] ^= 0x01
    reopened.backend.put(pack_key, bytes(data), create_only=False)
    with pytest.raises(errors.IntegrityError, match=pack_key):
        _read(reopened, snap)
    rep = check_mod.check(reopened, read_data=True)
    assert any(p.object == pack_key and f"snapshot {snap[:8]} record '/f'" in p.affects for p in rep.problems)
