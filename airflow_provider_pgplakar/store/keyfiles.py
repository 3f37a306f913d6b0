"""Config and key files: the two plaintext JSON objects a store starts from.

- ``config`` is written once at creation and never rewritten. It carries a BLAKE3 checksum of its own body so a
  flipped byte is reported as "config is corrupt" rather than as a confusing downstream failure.
- Format 2 (encrypted stores): a ``tag`` keyed with a key derived from the master secret authenticates every
  field, so a raw-key open verifies the config as a passphrase open does, and an edited config is reported as
  such rather than as a wrong passphrase. Format-1 stores still open: their key files bind SHA-256(config) in the
  AAD, which only a passphrase open checks. Plaintext stores have no secret, so nothing can authenticate them.
- Whatever the format, every parameter is bounded before use (``config_problem``): a config from storage is input.
- ``keys/<id>`` wraps the master secret under an Argon2id key-encryption key. A checksum over its fields tells a
  damaged key file ("keys/ab12 is corrupt") apart from a wrong passphrase.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .chunker import CDC_BOUNDS
from .crypto import MASTER_LEN, KdfParams, Keys, config_tag_key, derive_kek, key_check_v2
from .errors import IntegrityError, StoreError
from .pack import PACK_TARGET_RANGE

FORMAT = 2
READ_FORMATS = (1, 2)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_AAD_V2 = b"pgplakar-key-v2"


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


def _canon(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def params_problem(chunker: Any, compression: Any, pack_target: Any) -> str | None:
    """Why these chunker / compression / pack parameters are out of bounds (None when they are fine)."""
    if not isinstance(chunker, dict) or chunker.get("alg") != "fastcdc2020":
        return "chunker must be fastcdc2020"
    for k, (lo, hi) in CDC_BOUNDS.items():
        if not _int_in(chunker.get(k), lo, hi):
            return f"chunker {k}={chunker.get(k)!r} must be {lo}..{hi}"
    if not chunker["min"] <= chunker["avg"] <= chunker["max"]:
        return "chunker sizes must be ordered min <= avg <= max"
    if not _int_in(chunker.get("nc"), 0, 3):
        return f"chunker nc={chunker.get('nc')!r} must be 0..3"
    if not isinstance(compression, dict) or compression.get("alg") != "zstd":
        return "compression must be zstd"
    if not _int_in(compression.get("level"), 0, 19):
        return f"compression level {compression.get('level')!r} must be 0..19"
    if not _int_in(pack_target, *PACK_TARGET_RANGE):
        return f"pack_target={pack_target!r} must be {PACK_TARGET_RANGE[0]}..{PACK_TARGET_RANGE[1]} bytes"
    return None


def config_problem(body: dict[str, Any]) -> str | None:
    """Why a config body is unusable (None when every field is present and within bounds)."""
    fmt = body.get("format")
    if type(fmt) is not int or fmt not in READ_FORMATS:
        return None  # reported separately: an unknown format is not damage
    repo_id, encryption, key_check = body.get("repo_id"), body.get("encryption"), body.get("key_check", "")
    if not isinstance(repo_id, str) or not _HEX32.fullmatch(repo_id):
        return f"repo_id {str(repo_id)[:40]!r} is not 32 hex digits"
    if encryption not in ("aes256gcm", "none"):
        return f"encryption {str(encryption)[:40]!r} is neither aes256gcm nor none"
    encrypted = encryption != "none"
    if not isinstance(key_check, str) or (encrypted and _HEX32.fullmatch(key_check) is None):
        return "key_check is malformed"  # a plaintext store ignores it (and its tag): nothing could verify them
    if fmt >= 2 and encrypted and not (isinstance(body.get("tag"), str) and _HEX64.fullmatch(body["tag"])):
        return "the authentication tag is missing or malformed"
    if not isinstance(body.get("created"), str):
        return "created is missing"
    return params_problem(body.get("chunker"), body.get("compression"), body.get("pack_target"))


@dataclass(frozen=True)
class StoreConfig:
    repo_id: str
    encryption: str  # "aes256gcm" | "none"
    chunker: dict[str, Any]
    compression: dict[str, Any]
    pack_target: int
    key_check: str
    created: str
    raw: bytes  # the exact stored bytes (bound into format-1 key-file AAD)
    format: int = FORMAT
    tag: str = ""  # format 2, encrypted stores: BLAKE3-keyed(config_tag_key(master), canon(body without tag))
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    @classmethod
    def parse(cls, raw: bytes, name: str = "config") -> StoreConfig:
        body = load_checked(raw, name)
        if type(body.get("format")) is not int or body["format"] not in READ_FORMATS:
            raise StoreError(
                f"{name}: unsupported store format {body.get('format')!r} (this version reads "
                f"{', '.join(map(str, READ_FORMATS))}): use a newer pgplakar"
            )
        why = config_problem(body)
        if why:
            raise IntegrityError(f"{name}: {why}: the config was damaged or tampered with; restore it from a copy")
        return cls(
            body["repo_id"], body["encryption"], body["chunker"], body["compression"], body["pack_target"],
            body.get("key_check", ""), body["created"], raw, body["format"], body.get("tag", ""), body,
        )

    def expected_key_check(self, master: bytes) -> str:
        """The ``key_check`` a config of this format has when ``master`` is the store's key."""
        return key_check_v2(master) if self.format >= 2 else Keys.from_master(master).key_check

    def tag_matches(self, master: bytes) -> bool:
        """True when the config is authenticated by ``master`` (format-1 configs carry no tag: always True)."""
        if self.format < 2 or not self.encrypted:
            return True
        return secrets.compare_digest(self.tag, config_tag(master, self.body))


def config_tag(master: bytes, body: dict[str, Any]) -> str:
    return blake3.blake3(_canon({k: v for k, v in body.items() if k != "tag"}), key=config_tag_key(master)).hexdigest()


def new_config_bytes(
    repo_id: str, master: bytes | None, chunker: dict[str, Any], compression: dict[str, Any], pack_target: int
) -> bytes:
    """A format-2 config; ``master`` None makes a plaintext store's (no key check, no tag)."""
    body: dict[str, Any] = {
        "format": FORMAT,
        "repo_id": repo_id,
        "created": datetime.now(UTC).isoformat(),
        "encryption": "aes256gcm" if master is not None else "none",
        "chunker": chunker,
        "compression": compression,
        "pack_target": pack_target,
        "key_check": key_check_v2(master) if master is not None else "",
        "hash": "blake3-keyed",
    }
    if master is not None:
        body["tag"] = config_tag(master, body)
    return dump_checked(body)


def _aad(config: StoreConfig, fmt: int | None = None) -> bytes:
    """Format 1 binds the key file to SHA-256(config) (its only config authentication); format 2 authenticates the
    config with its tag instead, so an edited config unwraps and is then reported as edited, not as a wrong
    passphrase."""
    if (fmt or config.format) >= 2:
        return _KEY_AAD_V2
    return b"pgplakar-key-v1" + bytes.fromhex(config.repo_id) + hashlib.sha256(config.raw).digest()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def make_key_file(config: StoreConfig, master: bytes, passphrase: bytes, params: KdfParams, comment: str = "") -> bytes:
    why = params.problem()
    if why:
        raise StoreError(f"key derivation cost refused: {why}")
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    wrapped = AESGCM(derive_kek(passphrase, salt, params)).encrypt(nonce, master, _aad(config))
    return dump_checked(
        {
            "kdf": "argon2id",
            "t": params.t,
            "m_kib": params.m_kib,
            "p": params.p,
            "salt": _b64(salt),
            "nonce": _b64(nonce),
            "wrapped": _b64(wrapped),
            "created": datetime.now(UTC).isoformat(),
            "host": socket.gethostname(),
            "comment": comment,
        }
    )


def unwrap_key_file(config: StoreConfig, data: bytes, name: str, passphrase: bytes) -> bytes | None:
    """Return the master secret, or None when the passphrase does not open this key file."""
    body = load_checked(data, name)
    # as stored: problem() just below refuses a missing or non-integer value before the KDF runs
    params = KdfParams(cast(int, body.get("t")), cast(int, body.get("m_kib")), cast(int, body.get("p")))
    why = params.problem() or (None if body.get("kdf") == "argon2id" else f"unknown kdf {body.get('kdf')!r}")
    if why:
        raise IntegrityError(f"{name}: {why}: the key file was damaged or tampered with")
    try:
        salt, nonce, wrapped = (base64.b64decode(body[k], validate=True) for k in ("salt", "nonce", "wrapped"))
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{name}: salt, nonce or wrapped key is missing or not base64") from None
    if len(salt) != 16 or len(nonce) != 12 or len(wrapped) != MASTER_LEN + 16:
        raise IntegrityError(f"{name}: salt, nonce or wrapped key has the wrong length")
    kek = derive_kek(passphrase, salt, params)
    try:
        master = AESGCM(kek).decrypt(nonce, wrapped, _aad(config))
    except InvalidTag:
        if config.format < 2:
            try:  # a format-2 store whose config was rewritten as format 1 (which has no tag) to escape the check
                AESGCM(kek).decrypt(nonce, wrapped, _aad(config, 2))
            except InvalidTag:
                return None
            raise IntegrityError(
                f"config does not match its authentication tag: it claims format 1 but {name} belongs to a "
                "format-2 config (the config was tampered with); restore it from a copy"
            ) from None
        return None
    if len(master) != MASTER_LEN:
        raise IntegrityError(f"{name}: wrapped key has the wrong length")
    return master


def key_file_info(data: bytes, name: str) -> dict[str, Any]:
    body = load_checked(data, name)
    return {"id": name.rsplit("/", 1)[-1], **{k: body[k] for k in ("created", "host", "comment", "t", "m_kib", "p")}}
