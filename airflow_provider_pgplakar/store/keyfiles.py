"""Config and key files: the two plaintext JSON objects a store starts from.

- ``config`` is written once at creation and never rewritten. It carries a BLAKE3 checksum of its own body so a
  flipped byte is reported as "config is corrupt" rather than as a confusing downstream failure; in encrypted
  stores each key file's AAD also binds SHA-256(config), so editing it (e.g. to ``encryption: none``) fails unlock.
- ``keys/<id>`` wraps the master secret under an Argon2id key-encryption key. A checksum over its fields tells a
  damaged key file ("keys/ab12 is corrupt") apart from a wrong passphrase.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import blake3
import pendulum
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import MASTER_LEN, KdfParams, derive_kek
from .errors import IntegrityError, StoreError

FORMAT = 1


def _checksum(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(canon).hexdigest()[:32]


def dump_checked(body: dict[str, Any]) -> bytes:
    return json.dumps({**body, "checksum": _checksum(body)}, indent=1, sort_keys=True).encode() + b"\n"


def load_checked(data: bytes, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
        body = {k: v for k, v in doc.items() if k != "checksum"}
        ok = doc.get("checksum") == _checksum(body)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise IntegrityError(f"{name} is corrupt (checksum mismatch); restore it from a copy of the store")
    return body


@dataclass(frozen=True)
class StoreConfig:
    repo_id: str
    encryption: str  # "aes256gcm" | "none"
    chunker: dict[str, Any]
    compression: dict[str, Any]
    pack_target: int
    key_check: str
    created: str
    raw: bytes  # the exact stored bytes (bound into key-file AAD)

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    @classmethod
    def parse(cls, raw: bytes) -> StoreConfig:
        body = load_checked(raw, "config")
        if body.get("format") != FORMAT:
            raise StoreError(f"config: unsupported store format {body.get('format')!r} (this version reads {FORMAT})")
        return cls(
            body["repo_id"],
            body["encryption"],
            body["chunker"],
            body["compression"],
            body["pack_target"],
            body.get("key_check", ""),
            body["created"],
            raw,
        )


def new_config_bytes(
    repo_id: str, encrypted: bool, chunker: dict, compression: dict, pack_target: int, key_check: str
) -> bytes:
    return dump_checked(
        {
            "format": FORMAT,
            "repo_id": repo_id,
            "created": pendulum.now("UTC").isoformat(),
            "encryption": "aes256gcm" if encrypted else "none",
            "chunker": chunker,
            "compression": compression,
            "pack_target": pack_target,
            "key_check": key_check,
            "hash": "blake3-keyed",
        }
    )


def _aad(config: StoreConfig) -> bytes:
    return b"pgplakar-key-v1" + bytes.fromhex(config.repo_id) + hashlib.sha256(config.raw).digest()


def make_key_file(config: StoreConfig, master: bytes, passphrase: bytes, params: KdfParams, comment: str = "") -> bytes:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    wrapped = AESGCM(derive_kek(passphrase, salt, params)).encrypt(nonce, master, _aad(config))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return dump_checked(
        {
            "kdf": "argon2id",
            "t": params.t,
            "m_kib": params.m_kib,
            "p": params.p,
            "salt": b64(salt),
            "nonce": b64(nonce),
            "wrapped": b64(wrapped),
            "created": pendulum.now("UTC").isoformat(),
            "host": socket.gethostname(),
            "comment": comment,
        }
    )


def unwrap_key_file(config: StoreConfig, data: bytes, name: str, passphrase: bytes) -> bytes | None:
    """Return the master secret, or None when the passphrase does not open this key file."""
    body = load_checked(data, name)
    params = KdfParams(body["t"], body["m_kib"], body["p"])
    kek = derive_kek(passphrase, base64.b64decode(body["salt"]), params)
    try:
        master = AESGCM(kek).decrypt(base64.b64decode(body["nonce"]), base64.b64decode(body["wrapped"]), _aad(config))
    except InvalidTag:
        return None
    if len(master) != MASTER_LEN:
        raise IntegrityError(f"{name}: wrapped key has the wrong length")
    return master


def key_file_info(data: bytes, name: str) -> dict[str, Any]:
    body = load_checked(data, name)
    return {"id": name.rsplit("/", 1)[-1], **{k: body[k] for k in ("created", "host", "comment", "t", "m_kib", "p")}}
