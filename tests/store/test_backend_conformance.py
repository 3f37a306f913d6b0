"""One conformance suite for every backend: each MUST of ``store/backend.py`` is checked on local disk and on S3.

S3 runs against moto's standalone server over real HTTP (``tests/s3_server.py``), with a store prefix so that
key-relative listing is exercised too. Tests that only make sense on one backend are at the bottom.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgplakar.store.backend import Backend, ObjInfo
from airflow_provider_pgplakar.store.errors import AlreadyExists, ObjectNotFound, StoreError, StoreNotFound
from airflow_provider_pgplakar.store.localfs import LocalBackend
from airflow_provider_pgplakar.store.s3 import S3AccessError, S3Backend
from tests.s3_server import s3_client, s3_location, start_moto_server, stop_moto_server

PREFIX = "stores/conformance"


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Backend(bucket, PREFIX, endpoint_url=endpoint)


def _keys(backend: Backend, prefix: str) -> list[str]:
    return sorted(o.key for o in backend.list(prefix))


# -- put -------------------------------------------------------------------------------------------------------------


def test_create_only_put_refuses_existing_and_keeps_original(backend: Backend) -> None:
    """A second create-only put must fail and must not touch the first object (packs/snapshots are immutable)."""
    backend.put("snapshots/a", b"first")
    with pytest.raises(AlreadyExists, match="snapshots/a"):
        backend.put("snapshots/a", b"second, longer body")
    assert backend.get("snapshots/a") == b"first"


def test_overwrite_replaces_object(backend: Backend) -> None:
    """create_only=False replaces atomically (a writer refreshing its own lease)."""
    backend.put("locks/w1", b"old lease body")
    backend.put("locks/w1", b"new", create_only=False)
    assert backend.get("locks/w1") == b"new"
    backend.put("locks/fresh", b"x", create_only=False)  # also creates
    assert backend.get("locks/fresh") == b"x"


def test_concurrent_create_only_exactly_one_wins(backend: Backend) -> None:
    """Two writers racing for one name: exactly one put succeeds and its bytes are what is stored."""
    n = 8
    barrier = threading.Barrier(n)

    def attempt(i: int) -> int | None:
        barrier.wait()
        try:
            backend.put("snapshots/race", f"writer {i}".encode())
        except AlreadyExists:
            return None
        return i

    with ThreadPoolExecutor(n) as pool:
        winners = [i for i in pool.map(attempt, range(n)) if i is not None]
    assert len(winners) == 1, winners
    assert backend.get("snapshots/race") == f"writer {winners[0]}".encode()


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.get("empty", 0, 0) == b""
    info = backend.stat("empty")
    assert info is not None and info.size == 0
    assert [(o.key, o.size) for o in backend.list("")] == [("empty", 0)]


def test_large_object_round_trip(backend: Backend) -> None:
    """A pack-sized object (20 MiB) survives byte-exact, whole and ranged across its end."""
    data = os.urandom(20 * 1024 * 1024)
    backend.put("packs/ab/big", data)
    assert backend.get("packs/ab/big") == data
    assert backend.get("packs/ab/big", len(data) - 4096, 4096) == data[-4096:]


# -- get -------------------------------------------------------------------------------------------------------------


def test_get_whole_ranged_and_end_boundary(backend: Backend) -> None:
    data = bytes(range(256)) * 4
    backend.put("packs/p", data)
    assert backend.get("packs/p") == data
    assert backend.get("packs/p", 10, 20) == data[10:30]
    assert backend.get("packs/p", 100) == data[100:]  # "the rest"
    assert backend.get("packs/p", len(data) - 7, 7) == data[-7:]  # exactly up to the end
    assert backend.get("packs/p", len(data) - 1, 1) == data[-1:]
    assert backend.get("packs/p", 0, len(data)) == data
    assert backend.get("packs/p", len(data)) == b""  # the rest, from exactly the end


def test_get_missing_key_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound, match="packs/nope") as exc:
        backend.get("packs/nope")
    assert backend.location in str(exc.value)
    with pytest.raises(ObjectNotFound):
        backend.get("packs/nope", 5, 10)


@pytest.mark.parametrize(("offset", "length"), [(90, 20), (99, 2), (100, 1), (500, 10)])
def test_ranged_get_past_end_is_an_error(backend: Backend, offset: int, length: int) -> None:
    """A short read must never be returned as if it were the blob (truncated pack = error, not garbage)."""
    backend.put("packs/short", b"x" * 100)
    with pytest.raises(StoreError, match="packs/short"):
        backend.get("packs/short", offset, length)


# -- list / stat / delete -------------------------------------------------------------------------------------------


def test_list_by_prefix_with_sizes_and_storage_mtimes(backend: Backend) -> None:
    objects = {"index/1": b"a", "index/2": b"bb", "indexed": b"ccc", "snapshots/s1": b"dddd", "packs/00/p": b"e" * 5}
    for key, body in objects.items():
        backend.put(key, body)
    now = backend.now()
    everything = {o.key: o for o in backend.list("")}
    assert set(everything) == set(objects)
    for key, info in everything.items():
        assert isinstance(info, ObjInfo)
        assert info.size == len(objects[key])
        assert abs(info.mtime - now) < 60, (key, info.mtime, now)
    assert _keys(backend, "index/") == ["index/1", "index/2"]
    assert _keys(backend, "packs/") == ["packs/00/p"]
    assert _keys(backend, "nothing/") == []


def test_list_sees_object_right_after_put(backend: Backend) -> None:
    """Read-after-write and list consistency: prune and writers rely on it."""
    for i in range(5):
        backend.put(f"index/seg{i}", b"s")
        assert f"index/seg{i}" in _keys(backend, "index/")


def test_list_more_than_1000_keys_then_delete_them(backend: Backend) -> None:
    """S3 pages at 1000 keys: a listing that stopped there would make prune delete live data."""
    keys = [f"packs/{i % 16:02x}/{i:05d}" for i in range(1010)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: backend.put(k, b"."), keys))
    assert _keys(backend, "packs/") == sorted(keys)
    backend.delete_many(keys + ["packs/never-existed"])  # S3: 2 batches; a missing key is no failure
    assert _keys(backend, "packs/") == []


def test_stat(backend: Backend) -> None:
    assert backend.stat("snapshots/none") is None
    backend.put("snapshots/s", b"12345")
    info = backend.stat("snapshots/s")
    assert info is not None
    assert (info.key, info.size) == ("snapshots/s", 5)
    assert abs(info.mtime - backend.now()) < 60


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("locks/x", b"1")
    backend.delete("locks/x")
    backend.delete("locks/x")
    backend.delete("locks/never")
    assert backend.stat("locks/x") is None
    with pytest.raises(ObjectNotFound):
        backend.get("locks/x")
    backend.put("locks/x", b"2")  # the name is free again for a create-only put
    assert backend.get("locks/x") == b"2"


# -- local only ------------------------------------------------------------------------------------------------------


def test_local_list_never_shows_temp_files(tmp_path: Path) -> None:
    """Leftovers of interrupted writes are not objects: listing them would make a torn pack look real."""
    backend = LocalBackend(tmp_path)
    backend.put("packs/aa/real", b"ok")
    (tmp_path / "packs" / "aa" / ".tmp.x").write_bytes(b"torn")
    assert _keys(backend, "packs/") == ["packs/aa/real"]
    assert _keys(backend, "") == ["packs/aa/real"]


# -- S3 only ---------------------------------------------------------------------------------------------------------


def test_s3_location_and_prefix_isolation(s3_bucket: tuple[str, str]) -> None:
    """Keys are relative to the store prefix; objects beside the store never leak into its listings."""
    endpoint, bucket = s3_bucket
    outer = S3Backend(bucket, "", endpoint_url=endpoint)
    inner = S3Backend(bucket, "/stores/one/", endpoint_url=endpoint)
    assert inner.location == f"s3://{bucket}/stores/one"
    assert outer.location == f"s3://{bucket}"
    outer.put("stores/one-other/x", b"1")
    outer.put("stores/other/x", b"1")
    inner.put("config", b"c")
    assert _keys(inner, "") == ["config"]
    assert _keys(outer, "stores/") == ["stores/one-other/x", "stores/one/config", "stores/other/x"]


def test_s3_location_helper_opens_the_same_store(s3_bucket: tuple[str, str]) -> None:
    from airflow_provider_pgplakar.store.location import open_backend

    endpoint, bucket = s3_bucket
    S3Backend(bucket, "p/q", endpoint_url=endpoint).put("config", b"hello")
    opened = open_backend(s3_location(endpoint, bucket, "p/q"))
    assert isinstance(opened, S3Backend)
    assert opened.get("config") == b"hello"


def test_s3_without_conditional_writes_still_refuses_existing(s3_bucket: tuple[str, str]) -> None:
    """The HEAD-first emulation for servers ignoring If-None-Match (racy, but right when sequential)."""
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint, conditional_writes=False)
    backend.put("snapshots/a", b"first")
    with pytest.raises(AlreadyExists, match="snapshots/a"):
        backend.put("snapshots/a", b"second")
    assert backend.get("snapshots/a") == b"first"
    backend.put("snapshots/a", b"third", create_only=False)
    assert backend.get("snapshots/a") == b"third"


class _Body:
    """Raw body for a fake ``AWSResponse`` injected from a ``before-send`` hook."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


def _error_response(request: Any, status: int, code: str) -> Any:
    from botocore.awsrequest import AWSResponse

    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    return AWSResponse(request.url, status, {"content-type": "application/xml"}, _Body(body.encode()))


def test_s3_conflict_409_is_retried(s3_bucket: tuple[str, str]) -> None:
    """AWS answers concurrent conditional PUTs with 409 ConditionalRequestConflict: that is retried, not fatal."""
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    conflicts = [2]
    seen_checksums: list[str] = []

    def inject(request: Any, **_: Any) -> Any:
        seen_checksums.append(request.headers.get("x-amz-checksum-sha256", b"").decode())
        if conflicts[0] > 0:
            conflicts[0] -= 1
            return _error_response(request, 409, "ConditionalRequestConflict")
        return None

    backend._client.meta.events.register("before-send.s3.PutObject", inject)
    backend.put("snapshots/c", b"body")
    assert conflicts[0] == 0
    assert backend.get("snapshots/c") == b"body"
    # Every attempt carried the body's SHA-256 so that S3 can refuse a corrupted upload.
    assert seen_checksums == [base64.b64encode(hashlib.sha256(b"body").digest()).decode()] * 3


def test_s3_lost_reply_then_412_on_retry_is_success(s3_bucket: tuple[str, str]) -> None:
    """The first PUT lands but its reply is lost (500); botocore's retry then sees 412 on our own object.

    That must count as success (same checksum), while a retry that finds someone else's object still fails.
    """
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    admin = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    landed: list[str] = []

    def land_then_fail(request: Any, **_: Any) -> Any:
        if landed:
            return None
        key = request.url.split(f"/{PREFIX}/", 1)[1]
        landed.append(key)
        admin.put(key, other if key.endswith("theirs") else b"my bytes")
        return _error_response(request, 500, "InternalError")

    other = b"someone else's bytes"
    backend._client.meta.events.register("before-send.s3.PutObject", land_then_fail)
    backend.put("snapshots/mine", b"my bytes")
    assert backend.get("snapshots/mine") == b"my bytes"

    landed.clear()
    with pytest.raises(AlreadyExists, match="snapshots/theirs"):
        backend.put("snapshots/theirs", b"my bytes")
    assert backend.get("snapshots/theirs") == other


def test_s3_delete_many_reports_partial_failures(s3_bucket: tuple[str, str]) -> None:
    """DeleteObjects answers 200 even when some keys failed (Object Lock, permissions): prune must hear about it."""
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    from botocore.awsrequest import AWSResponse

    def partial(request: Any, **_: Any) -> Any:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><DeleteResult>'
            f"<Error><Key>{PREFIX}/packs/locked</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            f"<Error><Key>{PREFIX}/packs/gone</Key><Code>NoSuchKey</Code><Message>gone</Message></Error>"
            "</DeleteResult>"
        )
        return AWSResponse(request.url, 200, {"content-type": "application/xml"}, _Body(body.encode()))

    backend._client.meta.events.register("before-send.s3.DeleteObjects", partial)
    with pytest.raises(StoreError, match=r"could not delete 1 object\(s\) from s3://.*packs/locked \(AccessDenied\)"):
        backend.delete_many(["packs/locked", "packs/gone", "packs/fine"])


def test_s3_now_follows_server_clock(s3_bucket: tuple[str, str]) -> None:
    import time

    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    assert abs(backend.now() - time.time()) < 5  # moto runs on this host: same clock
    backend.put("x", b"1")
    assert backend._clock_offset is not None


def test_s3_missing_bucket_is_a_clear_error(s3_server: str) -> None:
    bucket = f"pgplakar-missing-{uuid.uuid4().hex[:12]}"
    backend = S3Backend(bucket, "p", endpoint_url=s3_server)
    for op in (lambda: backend.get("config"), lambda: backend.put("config", b"x"), lambda: list(backend.list(""))):
        with pytest.raises(StoreNotFound, match=f"bucket '{bucket}' does not exist.*create the store"):
            op()
    backend.ensure_bucket()
    backend.ensure_bucket()  # idempotent
    backend.put("config", b"x")
    assert backend.get("config") == b"x"


def test_s3_ensure_bucket_outside_us_east_1(s3_server: str) -> None:
    """Outside us-east-1 CreateBucket needs a LocationConstraint, inside it must have none."""
    bucket = f"pgplakar-eu-{uuid.uuid4().hex[:12]}"
    backend = S3Backend(bucket, region="eu-west-3", endpoint_url=s3_server)
    backend.ensure_bucket()
    assert s3_client(s3_server).get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-3"
    backend.put("config", b"x")
    assert backend.get("config") == b"x"


def test_s3_no_credentials_is_a_clear_error(
    s3_bucket: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    backend = S3Backend(bucket, PREFIX, endpoint_url=endpoint)
    with pytest.raises(S3AccessError, match=r"no usable AWS credentials found for s3://.*AWS_ACCESS_KEY_ID"):
        backend.get("config")
    with pytest.raises(S3AccessError, match="profile 'nope' not found"):
        S3Backend(bucket, PREFIX, endpoint_url=endpoint, profile="nope")


@pytest.fixture(scope="module")
def moto_with_auth(s3_server: str) -> Iterator[str]:
    """A second moto server that really checks credentials (the shared one accepts anything)."""
    proc, url = start_moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    stop_moto_server(proc)


def test_s3_bad_credentials_are_a_clear_error_without_the_secret(moto_with_auth: str) -> None:
    secret = "sUpErSeCrEt/value+0123456789abcdefghijkl"
    backend = S3Backend(
        "some-bucket", "p", endpoint_url=moto_with_auth, access_key_id="AKIAWRONGWRONGWRONG0", secret_access_key=secret
    )
    errors: list[StoreError] = []
    ops: list[Callable[[], object]] = [
        lambda: backend.get("config"),
        lambda: backend.put("config", b"x"),
        lambda: list(backend.list("")),
        lambda: backend.stat("config"),
        lambda: backend.ensure_bucket(),
    ]
    for op in ops:
        with pytest.raises(S3AccessError) as exc:
            op()
        errors.append(exc.value)
    for err in errors:
        text = str(err)
        assert "s3://some-bucket/p" in text, text
        assert "credentials" in text or "access key" in text, text
        assert secret not in text and "\n" not in text
        assert err.__cause__ is None and err.__suppress_context__
