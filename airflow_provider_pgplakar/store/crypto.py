"""Keys and sealing: one random master secret, purpose-bound subkeys, AES-256-GCM with per-object keys.

- The 64-byte master secret is random and wrapped by Argon2id-derived keys (``keys/<id>``), so passphrases can be
  added, changed or removed without rewriting data (restic/borg style; Kloset derives its master from the
  passphrase and cannot).
- Subkeys are derived with BLAKE3's KDF mode, one context per purpose (blob IDs, data, chunker seed, snapshot IDs).
- Every object (pack, index segment, snapshot file, lease) has a random 32-byte salt; its key is
  HKDF-SHA256(enc_key, salt, kind). Nonces are random per message; a key encrypts at most a few thousand messages.
- The AAD binds each ciphertext to what it claims to be (blob ID, snapshot ID, pack salt), so swapping or renaming
  objects is detected.
- Plaintext stores use the same formats with a keyed BLAKE3 tag (key derived from the public repo ID) in place of
  the AEAD: accidental corruption is still caught, confidentiality is not claimed.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import StoreError

MASTER_LEN = 64
NONCE_LEN = 12
TAG_LEN = 16
SALT_LEN = 32


class AuthError(Exception):
    """A ciphertext or tag failed authentication (callers turn it into IntegrityError with the object's name)."""


# Argon2id cost bounds, for PGPLAKAR_KDF and for every key file read: the floor keeps a guess from being cheap, the
# ceiling keeps a tampered key file from making an unlock allocate gigabytes or run for minutes.
KDF_T_RANGE = (1, 16)
KDF_M_KIB_RANGE = (8 * 1024, 1024 * 1024)  # 8 MiB .. 1 GiB
KDF_P_RANGE = (1, 16)


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost: t passes over m_kib KiB with p lanes (p changes the output, so it is stored per key file).

    Default: RFC 9106's second recommended profile (t=3, 64 MiB, p=4), 0.13–0.23 s here. The design note's
    256 MiB profile (0.85 s) would make every Airflow task's unlock alone exceed the store's 256 MiB RSS budget;
    tasks that unlock often should use the raw-key mode, which skips the KDF entirely.
    """

    t: int = 3
    m_kib: int = 64 * 1024
    p: int = 4

    def problem(self) -> str | None:
        """Why these values are out of bounds (None when they are fine)."""
        for name, value, (lo, hi) in (("t", self.t, KDF_T_RANGE), ("m_kib", self.m_kib, KDF_M_KIB_RANGE),
                                      ("p", self.p, KDF_P_RANGE)):
            if type(value) is not int or not lo <= value <= hi:
                return f"Argon2id {name}={value!r} is outside {lo}..{hi}"
        return None

    @classmethod
    def from_env(cls) -> KdfParams:
        """``PGPLAKAR_KDF=t,m_kib,p`` lowers the cost for tests; the floor keeps production stores sane."""
        raw = os.environ.get("PGPLAKAR_KDF")
        if not raw:
            return cls()
        try:
            t, m, p = (int(x) for x in raw.split(","))
        except ValueError:
            raise StoreError(f"PGPLAKAR_KDF={raw!r} is not t,m_kib,p (three integers)") from None
        params = cls(t, m, p)
        why = params.problem()
        if why:
            raise StoreError(f"PGPLAKAR_KDF={raw!r}: {why} (unset it for the default cost)")
        return params


def derive_kek(passphrase: bytes, salt: bytes, params: KdfParams) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(passphrase, salt, params.t, params.m_kib, params.p, 32, Type.ID)


def _sub(master: bytes, context: str, length: int = 32) -> bytes:
    return blake3.blake3(master, derive_key_context=context).digest(length)


def config_tag_key(master: bytes) -> bytes:
    """Key of the tag that authenticates a format-2 ``config`` (docs/format.md §3.1)."""
    return _sub(master, "pgplakar v2 config-tag")


def key_check_v2(master: bytes) -> str:
    """``key_check`` of format-2 configs: another context than v1's, so a format-2 config rewritten as format 1
    (which has no tag) cannot carry a key check that the master matches."""
    return _sub(master, "pgplakar v2 key-check", 16).hex()


@dataclass(frozen=True)
class Keys:
    """The subkeys of a store. ``encrypted`` is False for plaintext stores (public keys from the repo ID)."""

    encrypted: bool
    id_key: bytes
    enc_key: bytes
    mac_key: bytes
    snap_key: bytes
    cdc_seed: int
    key_check: str

    @classmethod
    def from_master(cls, master: bytes) -> Keys:
        if len(master) != MASTER_LEN:
            raise ValueError(f"a raw store key is {MASTER_LEN} bytes, got {len(master)}")
        return cls(
            encrypted=True,
            id_key=_sub(master, "pgplakar v1 blob-id"),
            enc_key=_sub(master, "pgplakar v1 data"),
            mac_key=_sub(master, "pgplakar v1 mac"),
            snap_key=_sub(master, "pgplakar v1 snapshot-id"),
            cdc_seed=int.from_bytes(_sub(master, "pgplakar v1 cdc-seed", 8), "little") >> 1,  # pyfastcdc takes < 2**63
            key_check=_sub(master, "pgplakar v1 key-check", 16).hex(),
        )

    @classmethod
    def public(cls, repo_id: str) -> Keys:
        base = bytes.fromhex(repo_id)
        return cls(
            encrypted=False,
            id_key=_sub(base, "pgplakar v1 public blob-id"),
            enc_key=b"",
            mac_key=_sub(base, "pgplakar v1 public mac"),
            snap_key=_sub(base, "pgplakar v1 public snapshot-id"),
            cdc_seed=0,
            key_check="",
        )

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.id_key).digest()

    def object_key(self, salt: bytes, kind: bytes) -> ObjectKey:
        if not self.encrypted:
            return ObjectKey(None, self.mac_key)
        hk = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"pgplakar v1 " + kind)
        return ObjectKey(AESGCM(hk.derive(self.enc_key)), b"")


class ObjectKey:
    """Seals messages of one object: AES-GCM with random nonces, or a keyed tag in plaintext stores."""

    __slots__ = ("_aead", "_mac_key")

    def __init__(self, aead: AESGCM | None, mac_key: bytes) -> None:
        self._aead = aead
        self._mac_key = mac_key

    @property
    def overhead(self) -> int:
        return NONCE_LEN + TAG_LEN if self._aead else TAG_LEN

    def seal(self, data: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            return data + blake3.blake3(aad + data, key=self._mac_key).digest(TAG_LEN)
        nonce = secrets.token_bytes(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, sealed: bytes | memoryview, aad: bytes) -> bytes:
        if self._aead is None:
            if len(sealed) < TAG_LEN:
                raise AuthError("message too short")
            data = bytes(sealed[:-TAG_LEN])
            if blake3.blake3(aad + data, key=self._mac_key).digest(TAG_LEN) != bytes(sealed[-TAG_LEN:]):
                raise AuthError("tag mismatch")
            return data
        if len(sealed) < NONCE_LEN + TAG_LEN:
            raise AuthError("message too short")
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(view[:NONCE_LEN], view[NONCE_LEN:], aad)
        except InvalidTag:
            raise AuthError("authentication failed") from None
