"""Connection forms declared to Airflow (``conn-fields`` / ``ui-field-behaviour``), import-free.

Provider discovery calls ``get_provider_info()`` in every ``airflow`` command, so this module imports nothing.
"""

from __future__ import annotations

from typing import Any

# Airflow warns on every URI of a connection type with "_" (RFC 3986 schemes), so the type is "pgplakar"; the
# first name stays registered so existing "pgplakar_store" connections keep working.
STORE_CONN_TYPE = "pgplakar"
LEGACY_STORE_CONN_TYPE = "pgplakar_store"

# Connection extras understood by the hook (also the UI form, see get_provider_info()).
STORE_CONN_FIELDS: dict[str, dict[str, Any]] = {
    "location": {
        "label": "Store location",
        "description": "Directory path, file:// URL or s3://bucket/prefix",
        "schema": {"type": ["string", "null"]},
    },
    # Named so that Airflow's secret masker hides it (UI, REST API, rendered templates); the hook still reads "key".
    "secret_key": {
        "label": "Raw store key",
        "description": "Base64 master key from `pgplakar key export`; skips the passphrase KDF (optional)",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "plaintext": {
        "label": "Plaintext store",
        "description": "The store is not encrypted (no passphrase)",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
    "endpoint_url": {
        "label": "S3 endpoint URL",
        "description": "For S3-compatible servers (empty for AWS)",
        "schema": {"type": ["string", "null"]},
    },
    "region_name": {"label": "S3 region", "schema": {"type": ["string", "null"]}},
    "aws_access_key_id": {"label": "AWS access key ID", "schema": {"type": ["string", "null"]}},
    "aws_secret_access_key": {
        "label": "AWS secret access key",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "aws_session_token": {"label": "AWS session token", "schema": {"type": ["string", "null"], "format": "password"}},
    "aws_profile": {"label": "AWS profile", "schema": {"type": ["string", "null"]}},
    "conditional_writes": {
        "label": "S3 conditional writes",
        "description": "Use If-None-Match on PUT (turn off for servers that do not support it)",
        "schema": {"type": ["boolean", "null"], "default": True},
    },
    "cache_dir": {
        "label": "Index cache directory",
        "description": "Persistent local cache (default ~/.cache/pgplakar); a mounted volume speeds up dedup",
        "schema": {"type": ["string", "null"]},
    },
}

STORE_UI_FIELD_BEHAVIOUR = {
    "hidden-fields": ["host", "port", "login", "schema"],
    "relabeling": {"password": "Passphrase"},
    "placeholders": {"location": "s3://my-bucket/pg-backups"},
}

