"""The store connection type: the UI form Airflow 3 renders, and the hook that opens a store from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook
from airflow_provider_pgplakar.store.errors import WrongPassphrase
from airflow_provider_pgplakar.store.repo import Store


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))


def _conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, password: str | None, conn_type: str = "pgplakar",
          **extra: object) -> None:
    body = {"conn_type": conn_type, "extra": extra}
    if password is not None:
        body["password"] = password
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))


@pytest.mark.parametrize("conn_type", ["pgplakar", "pgplakar_store"])
def test_ui_form_comes_from_provider_metadata(conn_type: str) -> None:
    """The form under the new type name and under the legacy one; the postgres provider's form is there too (a
    dependency: our DAGs use standard ``postgres`` connections)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    meta = {m.connection_type: m for m in HookMetaService.hook_meta_data()}
    form = meta[conn_type]
    assert form.hook_name.startswith("PgPlakar snapshot store")
    postgres = meta["postgres"]
    assert postgres.standard_fields is not None and postgres.standard_fields.url_schema.title == "Database"
    fields = form.extra_fields or {}
    names = {k.rsplit("__", 1)[-1] for k in fields}
    assert {"location", "secret_key", "endpoint_url", "aws_secret_access_key"} <= names
    secret = next(v for k, v in fields.items() if k.endswith("aws_secret_access_key"))
    assert secret["schema"]["format"] == "password"
    assert form.standard_fields is not None
    assert form.standard_fields.password.title == "Passphrase"
    assert form.standard_fields.host.hidden


def test_hook_opens_store_with_passphrase_and_raw_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loc = str(tmp_path / "store")
    st = Store.create(loc, "s3cret")
    with st.writer(labels={"dag_id": "d"}) as w:
        w.add_bytes("/x", b"payload")
    raw = st.export_key()

    _conn(monkeypatch, "by_pass", "s3cret", location=loc)
    with PgPlakarStoreHook("by_pass").get_store() as opened:
        rec = opened.find_record(w.snapshot_id, "/x")
        assert opened.open_record(rec).read() == b"payload"
    ok, msg = PgPlakarStoreHook("by_pass").test_connection()
    assert ok and "1 snapshot" in msg

    _conn(monkeypatch, "by_key", None, location=loc, key=raw)
    with PgPlakarStoreHook("by_key").get_store() as opened:
        assert opened.snapshot_ids() == [w.snapshot_id]

    _conn(monkeypatch, "wrong", "nope", location=loc)
    with pytest.raises(WrongPassphrase):
        PgPlakarStoreHook("wrong").get_store()
    ok, msg = PgPlakarStoreHook("wrong").test_connection()
    assert not ok and "wrong passphrase" in msg and "nope" not in msg


def test_new_type_has_no_uri_warning_and_legacy_type_still_opens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Airflow logs "shall not contain '_'" for every URI of a ``pgplakar_store`` connection (dozens of times in the
    API server's log); ``pgplakar`` has none. Legacy connections, prefixed form fields included, still work."""
    from airflow.models.connection import Connection
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    from airflow_provider_pgplakar.hooks.store import PgPlakarLegacyStoreHook

    caplog.set_level("WARNING")
    Connection(conn_id="c", conn_type="pgplakar", password="pw", extra=json.dumps({"location": "/x"})).get_uri()
    assert "shall not contain" not in caplog.text
    hooks = ProvidersManagerTaskRuntime().hooks
    assert hooks["pgplakar"].hook_class_name.endswith(".PgPlakarStoreHook")
    assert hooks["pgplakar_store"].hook_class_name.endswith(".PgPlakarLegacyStoreHook")
    assert PgPlakarLegacyStoreHook.conn_type == "pgplakar_store"

    loc = str(tmp_path / "store")
    Store.create(loc, "pw").close()
    _conn(monkeypatch, "legacy", "pw", conn_type="pgplakar_store", extra__pgplakar_store__location=loc)
    with PgPlakarStoreHook("legacy").get_store() as opened:
        assert opened.snapshot_ids() == []
    _conn(monkeypatch, "prefixed", "pw", extra__pgplakar__location=loc)
    assert PgPlakarStoreHook("prefixed").store_settings()["location"] == loc


def test_hook_requires_location(monkeypatch: pytest.MonkeyPatch) -> None:
    _conn(monkeypatch, "noloc", "x")
    with pytest.raises(ValueError, match="location"):
        PgPlakarStoreHook("noloc").get_store()


def test_hook_s3_settings_reach_the_backend(monkeypatch: pytest.MonkeyPatch, s3_bucket: tuple[str, str]) -> None:
    endpoint, bucket = s3_bucket
    _conn(monkeypatch, "s3", "pw", location=f"s3://{bucket}/backups", endpoint_url=endpoint, region_name="us-east-1")
    settings = PgPlakarStoreHook("s3").store_settings()
    assert settings["s3_options"] == {"endpoint_url": endpoint, "region": "us-east-1"}
    Store.create(settings["location"], "pw", s3_options=settings["s3_options"]).close()
    with PgPlakarStoreHook("s3").get_store() as st:
        assert st.location == f"s3://{bucket}/backups"
        with st.writer() as w:
            w.add_bytes("/y", b"over s3")
        assert st.open_record(st.find_record(w.snapshot_id, "/y")).read() == b"over s3"
