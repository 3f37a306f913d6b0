"""An S3-compatible server that ignores ``If-None-Match`` is detected, not trusted: ``create``, the first writer and
prune probe it and refuse with one line naming ``conditional_writes=false``, unless that fallback was chosen.

The server is the session's moto server behind ``tests/s3_proxy.py``, which drops the header (as s3rver 3.7.1
ignores it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_pgplakar.store.errors import AlreadyExists, StoreError
from airflow_provider_pgplakar.store.prune import prune
from airflow_provider_pgplakar.store.repo import Store
from airflow_provider_pgplakar.store.s3 import ConditionalWritesIgnored, S3Backend
from tests.s3_proxy import proxy_dropping_if_none_match
from tests.s3_server import s3_location
from tests.store.conftest import PASSPHRASE

DATA = b"conditional writes " * 10000


@pytest.fixture
def ignoring(s3_server: str) -> Iterator[str]:
    with proxy_dropping_if_none_match(s3_server) as url:
        yield url


def _keys(endpoint: str, bucket: str) -> list[str]:
    return sorted(o.key for o in S3Backend(bucket, "", endpoint_url=endpoint).list(""))


def _one_line_naming_the_fix(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "If-None-Match" in msg and "conditional_writes=false" in msg
    return msg


def test_the_proxy_really_ignores_if_none_match(s3_bucket: tuple[str, str], ignoring: str) -> None:
    _endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, "p", endpoint_url=ignoring)
    backend.put("snapshots/a", b"first")
    backend.put("snapshots/a", b"second")  # accepted: the server never saw the condition
    assert backend.get("snapshots/a") == b"second"


def test_create_is_refused_and_writes_nothing(
    s3_bucket: tuple[str, str], ignoring: str, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    with pytest.raises(ConditionalWritesIgnored) as ei:
        Store.create(s3_location(ignoring, bucket, "store"), PASSPHRASE,
                     cache_dir=tmp_path / "c")
    _one_line_naming_the_fix(ei.value)
    assert _keys(endpoint, bucket) == []  # no config, no key file, no probe left behind


def test_explicit_fallback_creates_writes_and_reads(
    s3_bucket: tuple[str, str], ignoring: str, tmp_path: Path
) -> None:
    _endpoint, bucket = s3_bucket
    location = s3_location(ignoring, bucket, "store") + "&conditional_writes=false"
    st = Store.create(location, PASSPHRASE, cache_dir=tmp_path / "c")
    with st.writer() as w:
        w.add_bytes("/f", DATA)
    with st.open_record(st.find_record(w.snapshot_id, "/f")) as f:
        assert f.read() == DATA
    with pytest.raises(AlreadyExists):  # the HEAD-first emulation still refuses a sequential overwrite
        st.backend.put("config", b"{}")
    prune(st)
    st.close()


def test_writer_and_prune_refuse_before_writing_anything(
    s3_bucket: tuple[str, str], ignoring: str, tmp_path: Path
) -> None:
    """A store made on a conforming endpoint, later reached through one that ignores the header (a proxy, a
    migrated bucket): reads work, writers and prune refuse before their first object."""
    endpoint, bucket = s3_bucket
    good = Store.create(s3_location(endpoint, bucket, "store"), PASSPHRASE, cache_dir=tmp_path / "c1")
    with good.writer() as w:
        w.add_bytes("/f", DATA)
    good.close()
    before = _keys(endpoint, bucket)
    assert not [k for k in before if k.startswith("store/probes/")]

    st = Store.open(s3_location(ignoring, bucket, "store"), PASSPHRASE,
                    cache_dir=tmp_path / f"c-{uuid.uuid4().hex[:6]}")
    with st.open_record(st.find_record(w.snapshot_id, "/f")) as f:
        assert f.read() == DATA
    with pytest.raises(ConditionalWritesIgnored) as ei:
        with st.writer() as w2:
            w2.add_bytes("/g", DATA)
    _one_line_naming_the_fix(ei.value)
    with pytest.raises(StoreError, match="conditional_writes=false"):
        prune(st)
    st.close()  # releases the read lease its restore took (leases are overwritten, never create-only)
    assert _keys(endpoint, bucket) == before


def test_conforming_server_passes_the_probe_once(s3_bucket: tuple[str, str]) -> None:
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, "p", endpoint_url=endpoint)
    calls = []
    real_put = backend.put
    backend.put = lambda *a, **k: calls.append(a[0]) or real_put(*a, **k)  # type: ignore[method-assign]
    backend.check_conditional_writes()
    backend.check_conditional_writes()
    assert len(calls) == 2 and calls[0].startswith("probes/")
    assert _keys(endpoint, bucket) == []


@pytest.mark.parametrize("value", ["false", "False", "0", "no", False])
def test_the_fallback_is_recognised_as_text_or_bool(s3_bucket: tuple[str, str], ignoring: str, value: object,
                                                    tmp_path: Path) -> None:
    """The connection extra may arrive as text ("false" from an env-var connection): it must not read as true."""
    _endpoint, bucket = s3_bucket
    from airflow_provider_pgplakar.store.location import open_backend

    backend = open_backend(s3_location(ignoring, bucket, "s"), {"conditional_writes": value})
    assert isinstance(backend, S3Backend) and backend.conditional_writes is False
    backend.check_conditional_writes()  # the explicit fallback: no probe, no refusal
    assert open_backend(s3_location(ignoring, bucket, "s") + f"&conditional_writes={value}").conditional_writes is False


def test_a_probe_that_cannot_be_deleted_does_not_fail_the_backup(
    s3_bucket: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A backup-only role without s3:DeleteObject still backs up: the leftover probe is inert."""
    endpoint, bucket = s3_bucket
    backend = S3Backend(bucket, "p", endpoint_url=endpoint)

    def denied(key: str) -> None:
        raise StoreError(f"S3 refused access to {key} (AccessDenied)")

    backend.delete = denied  # type: ignore[method-assign]
    backend.check_conditional_writes()
    assert "could not delete the conditional-write probe" in caplog.text
    assert [k for k in _keys(endpoint, bucket) if k.startswith("p/probes/")]
