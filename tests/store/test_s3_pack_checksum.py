"""A pack's S3 PUT carries the pack's name as its SHA-256 checksum instead of hashing the pack a second time
(store/blobsink.py passes it to ``S3Backend.put``): the name already is the SHA-256 of the bytes, and hashing them
again cost 0.7 CPU-s per GiB of dump-like data. S3 still refuses a body that does not match."""

from __future__ import annotations

import base64
import hashlib
import random
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_pgplakar.store import s3
from airflow_provider_pgplakar.store.repo import Store
from tests.s3_server import s3_location
from tests.store.conftest import PASSPHRASE


def test_pack_puts_reuse_the_pack_name_as_checksum(s3_bucket: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, bucket = s3_bucket
    st = Store.create(s3_location(endpoint, bucket, "store"), PASSPHRASE)
    sent: dict[str, str] = {}

    def capture(request: Any, **_: Any) -> None:
        key = request.url.split("?")[0].rsplit("/", 1)[-1]
        sent[key] = request.headers.get("x-amz-checksum-sha256", b"").decode()

    st.backend._client.meta.events.register("before-send.s3.PutObject", capture)  # type: ignore[attr-defined]
    hashed: list[int] = []
    real = hashlib.sha256

    def counting(data: Any = b"") -> Any:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(s3, "hashlib", SimpleNamespace(sha256=counting))  # s3.py's own hashing only
    data = random.Random(3).randbytes(3 << 20)
    with st.writer(source={"kind": "files", "origin": "s3"}) as w:
        w.add_bytes("/f", data)
    packs = [o.key.rsplit("/", 1)[-1] for o in st.backend.list("packs/")]
    assert len(packs) >= 2  # a data pack and a tree pack
    for name in packs:
        assert sent[name] == base64.b64encode(bytes.fromhex(name)).decode()
    assert not any(n >= 1 << 20 for n in hashed), "a pack was hashed again for its upload"
    with st.open_record(st.find_record(st.snapshot_ids()[0], "/f")) as r:
        assert b"".join(r.iter_chunks()) == data
    st.close()
