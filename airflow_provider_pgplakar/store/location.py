"""Turn a store location (path, ``file://`` URL or ``s3://bucket/prefix``) into a backend."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .backend import Backend
from .errors import StoreError

S3_QUERY_OPTIONS = ("endpoint_url", "region", "profile", "conditional_writes")


def open_backend(location: str, s3_options: dict[str, Any] | None = None) -> Backend:
    """``s3_options`` (endpoint_url, region, credentials, ...) override query parameters of an s3:// URL.

    Secrets are never accepted in the URL itself: a location is logged and shown in snapshot listings.
    """
    if not location:
        raise StoreError("no store location given: pass a directory path, file:// URL or s3://bucket/prefix")
    parts = urlsplit(location)
    if parts.scheme == "s3":
        from .s3 import S3Backend

        if not parts.netloc:
            raise StoreError(f"store location {location!r} has no bucket: use s3://bucket/prefix")
        if parts.username or parts.password:
            raise StoreError("credentials in an s3:// location are refused: use the AWS credential chain or options")
        opts: dict[str, Any] = {}
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if k not in S3_QUERY_OPTIONS:
                raise StoreError(f"unknown s3 location option {k!r} (known: {', '.join(S3_QUERY_OPTIONS)})")
            opts[k] = v
        opts.update({k: v for k, v in (s3_options or {}).items() if v not in (None, "")})
        if isinstance(opts.get("conditional_writes"), str):  # from the URL, or a connection extra given as text
            opts["conditional_writes"] = opts["conditional_writes"].strip().lower() not in ("0", "false", "no", "off")
        return S3Backend(parts.netloc, unquote(parts.path).strip("/"), **opts)
    if parts.scheme == "file":
        from .localfs import LocalBackend

        return LocalBackend(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise StoreError(f"unsupported store location scheme {parts.scheme!r} in {location!r}: use a path or s3://")
    from .localfs import LocalBackend

    return LocalBackend(location)
