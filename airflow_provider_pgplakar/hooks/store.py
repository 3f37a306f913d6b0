"""Airflow hook for the snapshot store: a ``pgplakar`` connection (or one of the legacy type ``pgplakar_store``) →
an opened :class:`Store`.

The connection form is declared in ``get_provider_info()`` (``conn-fields`` / ``ui-field-behaviour``), which is
what the Airflow 3 UI reads; the passphrase lives in the connection's password field so Airflow stores it
encrypted and masks it. Secrets are also masked with the secret masker as soon as they are read.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseHook

from ..conn_forms import LEGACY_STORE_CONN_TYPE, STORE_CONN_TYPE
from ..store.opening import OpeningStore
from ..store.repo import Store

log = logging.getLogger(__name__)

_S3_MAP = {
    "endpoint_url": "endpoint_url",
    "region_name": "region",
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
    "aws_profile": "profile",
    "conditional_writes": "conditional_writes",
}


def _extra(conn: Any) -> dict[str, Any]:
    extra = conn.extra_dejson or {}
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if value in (None, ""):
            continue
        for conn_type in (STORE_CONN_TYPE, LEGACY_STORE_CONN_TYPE):  # forms may store fields prefixed
            key = key.removeprefix(f"extra__{conn_type}__")
        out[key] = value
    return out


class PgPlakarStoreHook(BaseHook):
    """Opens the snapshot store named by an Airflow connection."""

    conn_name_attr = "store_conn_id"
    default_conn_name = "pgplakar_store_default"
    conn_type = STORE_CONN_TYPE
    hook_name = "PgPlakar snapshot store"

    def __init__(self, store_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store_conn_id = store_conn_id

    def store_settings(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`Store.open` (secrets masked in logs from here on)."""
        from airflow.sdk.log import mask_secret

        conn = self.get_connection(self.store_conn_id)
        extra = _extra(conn)
        location = extra.get("location") or conn.host
        if not location:
            raise ValueError(f"connection {self.store_conn_id!r}: set the 'location' extra (path or s3://bucket/p)")
        key = extra.get("secret_key")
        old_key = extra.get("key")  # the older name, still read: Airflow shows it in clear
        for secret in (conn.password, key, old_key, extra.get("aws_secret_access_key"), extra.get("aws_session_token")):
            if secret:
                mask_secret(secret)
        if old_key is not None:
            if key is not None and key != old_key:
                raise ValueError(f"connection {self.store_conn_id!r}: the extras secret_key and key differ; keep "
                                 "secret_key only")
            log.warning("connection %r: Airflow shows the extra 'key' in clear (UI, REST API); rename it "
                        "'secret_key', which it masks", self.store_conn_id)
        s3 = {dst: extra[src] for src, dst in _S3_MAP.items() if src in extra}
        return {
            "location": location,
            "passphrase": conn.password or None,
            "key": key if key is not None else old_key,
            "plaintext": _bool(extra.get("plaintext", False)),
            "s3_options": s3 or None,
            "cache_dir": extra.get("cache_dir"),
        }

    def get_store(self) -> Store:
        s = self.store_settings()
        loc = s.pop("location")
        return Store.open(loc, s.pop("passphrase"), **s)

    def opening(self) -> OpeningStore:
        """:meth:`get_store` on a helper thread (store/opening.py): a backup connects to its source and starts its
        tools while the passphrase is stretched. The connection is read here; close the result (``with``)."""
        s = self.store_settings()
        loc = s.pop("location")
        return Store.opening(loc, s.pop("passphrase"), **s)

    def test_connection(self) -> tuple[bool, str]:
        try:
            with self.get_store() as st:
                return True, f"store {st.config.repo_id} at {st.location}: {len(st.snapshot_ids())} snapshot(s)"
        except Exception as e:
            return False, str(e)


class PgPlakarLegacyStoreHook(PgPlakarStoreHook):
    """The same hook for connections of the first type name, ``pgplakar_store`` (Airflow warns on "_" in a type)."""

    conn_type = LEGACY_STORE_CONN_TYPE
    hook_name = "PgPlakar snapshot store (legacy type pgplakar_store)"


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "on")
