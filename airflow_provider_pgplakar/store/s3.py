"""S3 backend (boto3/botocore): create-only writes are ``PutObject`` with ``If-None-Match: *``.

AWS S3 (and moto) enforce ``If-None-Match`` on PUT, which gives the same create-only guarantee as ``os.link`` on a
local disk. Some S3-compatible servers ignore it (s3rver 3.7.1 accepts a second conditional PUT); for those
``conditional_writes=False`` checks with a HEAD first, which is racy, but correctness never depends on it because
every object name the store writes is unique (content addressed or random); it is defence in depth only. Such a
server is detected rather than trusted: :meth:`S3Backend.check_conditional_writes` (run at ``create``, when a
writer first opens the store, and before prune) writes a probe object twice and refuses the store unless the
fallback was chosen explicitly.

Assumption: strong read-after-write and list-after-write consistency (AWS S3 since December 2020). Other
S3-compatible stores must offer the same for the store's invariants to hold.

All object puts are single-part (packs are at most a few tens of MiB), so no multipart upload is ever left behind.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions as bexc
import botocore.loaders
import botocore.session
from botocore.config import Config

from .backend import ObjInfo
from .errors import AlreadyExists, ObjectNotFound, StoreError, StoreNotFound
from .failpoints import failpoint

log = logging.getLogger(__name__)

__all__ = ["S3Backend", "S3AccessError", "S3ConnectionError", "ConditionalWritesIgnored"]

# Codes meaning "the credentials are missing, wrong or not allowed" (remedy: fix credentials or the IAM policy).
_AUTH_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "403",
}
_BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable"}
_CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict: another conditional PUT on the key is in flight
_READ_RETRIES = 2  # re-GETs after a body download broke mid-stream
_DELETE_BATCH = 1000  # DeleteObjects limit


@functools.cache
def _shared_loader() -> botocore.loaders.Loader:
    """One model loader for every backend: parsing the S3 service model anew costs ~0.2 s per client."""
    return botocore.session.get_session().get_component("data_loader")


class S3AccessError(StoreError):
    """Missing, wrong or insufficient S3 credentials."""


class S3ConnectionError(StoreError):
    """The S3 endpoint could not be reached."""


class ConditionalWritesIgnored(StoreError):
    """The server accepted a second ``If-None-Match: *`` PUT: create-only writes are not enforced there."""


PROBE_PREFIX = "probes/"  # conditional-write probes: written, rewritten and deleted by check_conditional_writes

def _without_userinfo(url: str | None) -> str | None:
    """An endpoint URL fit for error messages: drop any ``user:password@``."""
    if not url:
        return url
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _status(err: bexc.ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(err: bexc.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code") or _status(err))


class S3Backend:
    """Objects are S3 keys below ``prefix`` in ``bucket``; one thread-safe S3 client serves all threads."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        conditional_writes: bool = True,
        max_pool_connections: int = 16,
    ) -> None:
        if not bucket:
            raise StoreError("S3 location has no bucket name: use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._kp = f"{self.prefix}/" if self.prefix else ""  # prepended to every key
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.conditional_writes = conditional_writes
        self._conditional_writes_checked = False
        self.endpoint_url = _without_userinfo(endpoint_url)  # replaced by the resolved one once the client exists
        self._clock_offset: float | None = None  # server Date minus local time, from the latest response
        # Explicit credentials win; otherwise botocore's standard chain (env, shared files, AWS_PROFILE, web
        # identity, container/instance metadata). AWS_ENDPOINT_URL(_S3) is honoured by botocore itself.
        session = botocore.session.Session(profile=profile)
        session.register_component("data_loader", _shared_loader())
        if bool(access_key_id) != bool(secret_access_key):
            raise S3AccessError(f"S3 credentials for {self.location} need both an access key id and a secret key")
        if access_key_id:
            session.set_credentials(access_key_id, secret_access_key, session_token)
        cfg = Config(retries={"mode": "adaptive", "max_attempts": 10}, max_pool_connections=max_pool_connections)
        try:
            self._client: Any = session.create_client("s3", region_name=region, endpoint_url=endpoint_url, config=cfg)
        except bexc.ProfileNotFound:
            raise S3AccessError(
                f"AWS profile {profile!r} not found for {self.location}: define it in ~/.aws/config or drop it"
            ) from None
        except bexc.BotoCoreError as e:
            raise self._translate(e, None) from None
        self.endpoint_url = _without_userinfo(self._client.meta.endpoint_url)  # only ever shown in messages
        self._client.meta.events.register("after-call.s3", self._note_server_date)

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint={self.endpoint_url!r})"

    # -- helpers -------------------------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self._kp + key

    def _note_server_date(self, http_response: Any = None, **_: Any) -> None:
        """Keep the offset between the server's ``Date`` header and our clock, so ``now()`` costs no request."""
        date = getattr(http_response, "headers", {}).get("date") if http_response is not None else None
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # Date has one-second resolution and is truncated: add half a second to centre the estimate.
        self._clock_offset = server + 0.5 - time.time()

    def _translate(self, err: Exception, key: str | None) -> StoreError:
        """One-line StoreError naming the object and the remedy; never includes credentials."""
        where = f"{key} in {self.location}" if key else self.location
        if isinstance(err, bexc.ClientError):
            code, status = _code(err), _status(err)
            if code in ("NoSuchKey", "404", "NotFound") and key:
                return ObjectNotFound(f"{key} is missing from {self.location}")
            if code in ("NoSuchBucket", "404", "NotFound"):
                return StoreNotFound(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url} ({where}): "
                    "create the store first or fix the bucket name / endpoint / region"
                )
            if code in _AUTH_CODES or status == 403:
                return S3AccessError(
                    f"S3 refused access to {where} ({code}): check the access key, secret, session token "
                    "and the bucket policy / IAM permissions"
                )
            if code in ("PermanentRedirect", "301", "IllegalLocationConstraintException"):
                return StoreError(f"bucket {self.bucket!r} is in another region ({code}): set the region for {where}")
            if status >= 500 or code in _BUSY_CODES:
                return StoreError(f"S3 is unavailable or throttling ({code}, HTTP {status}) on {where}: retry later")
            msg = str(err.response.get("Error", {}).get("Message") or "").splitlines()
            detail = f": {msg[0][:200]}" if msg else ""
            return StoreError(f"S3 error {code} (HTTP {status}) on {where}{detail}")
        if isinstance(err, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return S3AccessError(
                f"no usable AWS credentials found for {self.location}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile (AWS_PROFILE), or run where an instance/container role is available"
            )
        if isinstance(err, bexc.CredentialRetrievalError | bexc.TokenRetrievalError):
            return S3AccessError(
                f"could not load AWS credentials for {self.location} ({type(err).__name__}): "
                "check the profile, SSO login or role configuration"
            )
        if isinstance(err, bexc.EndpointConnectionError | bexc.ConnectTimeoutError | bexc.ConnectionClosedError):
            return S3ConnectionError(
                f"cannot reach S3 endpoint {self.endpoint_url} for {where}: check endpoint_url / AWS_ENDPOINT_URL "
                "and the network"
            )
        if isinstance(err, bexc.ReadTimeoutError):
            return S3ConnectionError(f"S3 endpoint {self.endpoint_url} timed out on {where}: retry later")
        return StoreError(f"S3 failure on {where}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    # -- Backend protocol ----------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray, *, create_only: bool = True,
            sha256: bytes | None = None) -> None:
        """One PUT carrying a SHA-256 that S3 verifies (moto does not); create-only via ``If-None-Match: *``.
        ``sha256`` is the caller's digest of ``data`` (a pack's name): S3 rejects the PUT if it is wrong."""
        full = self._full(key)
        checksum = base64.b64encode(sha256 or hashlib.sha256(data).digest()).decode("ascii")
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            "ChecksumAlgorithm": "SHA256",  # stored with the object, so a lost-reply retry can recognise it
            "ChecksumSHA256": checksum,
        }
        if create_only and self.conditional_writes:
            kwargs["IfNoneMatch"] = "*"
        elif create_only and self.stat(key) is not None:
            # Racy (check-then-act) emulation for servers without conditional PUT; names are unique anyway.
            raise AlreadyExists(f"{key} already exists in {self.location}")
        failpoint("mid-upload", key)
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                self._client.put_object(**kwargs)
                return
            except bexc.ClientError as e:
                code, status = _code(e), _status(e)
                if status == 412 or code == "PreconditionFailed":
                    # botocore retried (5xx / timeout) and the retry hit the object: if it carries our checksum,
                    # the first attempt landed and only its reply was lost, so this write succeeded.
                    if e.response.get("ResponseMetadata", {}).get("RetryAttempts") and self._checksum(key) == checksum:
                        return
                    raise AlreadyExists(f"{key} already exists in {self.location}") from None
                if (status == 409 or code == "ConditionalRequestConflict") and attempt < _CONFLICT_RETRIES:
                    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
                    continue
                raise self._translate(e, key) from None
            except bexc.BotoCoreError as e:
                raise self._translate(e, key) from None

    def _checksum(self, key: str) -> str | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED")
        except (bexc.ClientError, bexc.BotoCoreError):
            return None
        checksum: str | None = resp.get("ChecksumSHA256")
        return checksum

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Whole object, or a ranged GET whose returned length is checked (a short read is an error)."""
        full = self._full(key)
        if offset < 0 or (length is not None and length < 0):
            raise StoreError(f"invalid range offset={offset} length={length} for {key} in {self.location}")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if length == 0:
            # An empty range cannot be expressed in a Range header; just check the object exists and is long enough.
            info = self.stat(key)
            if info is None:
                raise ObjectNotFound(f"{key} is missing from {self.location}")
            if offset > info.size:
                raise self._short(key, offset, length, 0)
            return b""
        if length is not None:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            kwargs["Range"] = f"bytes={offset}-"
        for attempt in range(_READ_RETRIES + 1):
            try:
                resp = self._client.get_object(**kwargs)
                data: bytes = resp["Body"].read()
                break
            except bexc.ClientError as e:
                if _code(e) == "InvalidRange" or _status(e) == 416:
                    if length is None:
                        info = self.stat(key)
                        if info is not None and offset == info.size:
                            return b""  # reading "the rest" from exactly the end, like a file read at EOF
                    raise self._short(key, offset, length, 0) from None
                raise self._translate(e, key) from None
            except (bexc.ResponseStreamingError, bexc.IncompleteReadError, bexc.ReadTimeoutError) as e:
                # botocore retries the request but not the body download; a dropped stream is worth a new GET.
                if attempt == _READ_RETRIES:
                    raise self._translate(e, key) from None
                time.sleep(0.2 * 2**attempt)
            except bexc.BotoCoreError as e:
                raise self._translate(e, key) from None
        if length is not None and len(data) != length:
            raise self._short(key, offset, length, len(data))
        return data

    def _short(self, key: str, offset: int, length: int | None, got: int) -> ObjectNotFound:
        want = "the rest" if length is None else f"{length} bytes"
        return ObjectNotFound(f"{key} in {self.location} is truncated: wanted {want} at {offset}, got {got}")

    def list(self, prefix: str) -> Iterator[ObjInfo]:
        """Every object under ``prefix`` (keys relative to the store prefix), paginated past 1000 keys."""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._kp + prefix)
        cut = len(self._kp)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjInfo(obj["Key"][cut:], int(obj["Size"]), obj["LastModified"].timestamp())
        except (bexc.ClientError, bexc.BotoCoreError) as e:
            raise self._translate(e, prefix or None) from None

    def stat(self, key: str) -> ObjInfo | None:
        """HEAD the object; None when missing (a HEAD 404 cannot tell a missing bucket from a missing key)."""
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except bexc.ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._translate(e, key) from None
        except bexc.BotoCoreError as e:
            raise self._translate(e, key) from None
        return ObjInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        """Idempotent: S3 DeleteObject succeeds on a missing key."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except bexc.ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return
            raise self._translate(e, key) from None
        except bexc.BotoCoreError as e:
            raise self._translate(e, key) from None

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete in batches of 1000 (one request each); raise one StoreError listing every key that failed."""
        failures: list[str] = []
        batch: list[str] = []

        def flush() -> None:
            try:
                resp = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._full(k)} for k in batch], "Quiet": True},
                )
            except (bexc.ClientError, bexc.BotoCoreError) as e:
                raise self._translate(e, None) from None
            cut = len(self._kp)
            for err in resp.get("Errors", ()):
                if err.get("Code") == "NoSuchKey":
                    continue
                failures.append(f"{err.get('Key', '?')[cut:]} ({err.get('Code', '?')})")
            batch.clear()

        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                flush()
        if batch:
            flush()
        if failures:
            shown = ", ".join(failures[:10]) + (f" and {len(failures) - 10} more" if len(failures) > 10 else "")
            raise StoreError(
                f"could not delete {len(failures)} object(s) from {self.location}: {shown}; "
                "check delete permissions, Object Lock / legal holds, then rerun"
            )

    def now(self) -> float:
        """The storage clock, from the ``Date`` header of recent responses (one HEAD bucket if none yet)."""
        if self._clock_offset is None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except (bexc.ClientError, bexc.BotoCoreError):
                pass  # the after-call hook still records Date from error replies; else fall back to local time
        offset = self._clock_offset
        return time.time() + (offset or 0.0)

    # -- setup ---------------------------------------------------------------------------------------------------

    def check_conditional_writes(self) -> None:
        """Refuse a server that ignores ``If-None-Match`` (once per backend object): PUT a probe create-only twice;
        the second must fail. Skipped when ``conditional_writes=false`` was chosen (the HEAD-first fallback)."""
        if not self.conditional_writes or self._conditional_writes_checked:
            return
        key = f"{PROBE_PREFIX}{secrets.token_hex(16)}"
        try:
            self.put(key, b"probe 1")
            try:
                self.put(key, b"probe 2")
            except AlreadyExists:
                self._conditional_writes_checked = True
                return
        finally:
            try:
                self.delete(key)
            except StoreError as e:  # a role without delete permission can still back up; the probe is inert
                log.warning("could not delete the conditional-write probe %s (%s); it is harmless", key, e)
        raise ConditionalWritesIgnored(
            f"the S3 server at {self.endpoint_url} ignores If-None-Match (create-only writes) for {self.location}: "
            "use a server that honours it, or accept the racy HEAD-first fallback with conditional_writes=false "
            f"({self.location}?conditional_writes=false, or the connection extra)"
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (for ``create`` of a new store); us-east-1 takes no LocationConstraint."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except bexc.ClientError as e:
            if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(e, None) from None
        except bexc.BotoCoreError as e:
            raise self._translate(e, None) from None
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1" and region != "aws-global":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except bexc.ClientError as e:
            code = _code(e)
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                raise StoreError(
                    f"bucket name {self.bucket!r} is taken by another account: choose another bucket for the store"
                ) from None
            raise self._translate(e, None) from None
        except bexc.BotoCoreError as e:
            raise self._translate(e, None) from None
