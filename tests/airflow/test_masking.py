"""Secrets in connection extras and operator ``options`` carry names Airflow's own secret masker hides.

Airflow masks a value by its *name* (``DEFAULT_SENSITIVE_FIELDS``: ``secret``, ``private_key``, ``password``, ...)
in the UI, the REST API (``ConnectionResponse``) and rendered template fields (``_serialize_rendered_fields``); the
store's raw key (``secret_key``) and an inline client key (``ssl_private_key_data``) use such names. The old names
(``key``, ``ssl_key_data``) are still read; the operators rename ``ssl_key_data`` so it is masked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_provider_pgplakar.conn_forms import STORE_CONN_FIELDS
from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook
from airflow_provider_pgplakar.hooks.store import PgPlakarStoreHook
from airflow_provider_pgplakar.operators.logical import PgPlakarBackupOperator, PgPlakarRestoreOperator
from airflow_provider_pgplakar.operators.physical import PgPlakarBaseBackupOperator
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.options import parse_source_options
from airflow_provider_pgplakar.store.repo import Store
from tests.task_context import FakeTI, context

RAW_KEY = "c2VjcmV0LXN0b3JlLWtleS1iYXNlNjQtZm9yLXRlc3RzLW9ubHk="
PEM_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCmaskedkey\n"
           "-----END PRIVATE KEY-----\n")
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIUpubliccert\n-----END CERTIFICATE-----\n"


def _api_extra(conn_type: str, extra: dict[str, object]) -> dict[str, object]:
    """The connection's extra as ``GET /api/v2/connections/{id}`` returns it."""
    from airflow.api_fastapi.core_api.datamodels.connections import ConnectionResponse
    from airflow.models.connection import Connection

    conn = Connection(conn_id="c", conn_type=conn_type, extra=json.dumps(extra))
    return json.loads(ConnectionResponse.model_validate(conn).extra or "{}")


def test_connection_extras_are_masked_by_the_rest_api() -> None:
    store = _api_extra("pgplakar_store", {"location": "/backups", "secret_key": RAW_KEY})
    assert store == {"location": "/backups", "secret_key": "***"}
    pg = _api_extra("postgres", {"ssl_cert_data": PEM_CERT, "ssl_private_key_data": PEM_KEY})
    assert pg == {"ssl_cert_data": PEM_CERT, "ssl_private_key_data": "***"}
    # why the names changed: Airflow shows the old ones in clear
    assert _api_extra("pgplakar_store", {"key": RAW_KEY}) == {"key": RAW_KEY}
    assert _api_extra("postgres", {"ssl_key_data": PEM_KEY}) == {"ssl_key_data": PEM_KEY}


def test_store_form_declares_the_key_under_a_masked_name() -> None:
    from airflow.sdk._shared.secrets_masker import should_hide_value_for_key

    assert "key" not in STORE_CONN_FIELDS and STORE_CONN_FIELDS["secret_key"]["schema"]["format"] == "password"
    assert should_hide_value_for_key("extra__pgplakar_store__secret_key")
    for name, spec in STORE_CONN_FIELDS.items():  # every password-format field is also hidden by name
        if spec["schema"].get("format") == "password":
            assert should_hide_value_for_key(name), name


def test_store_hook_reads_secret_key_and_the_old_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    loc = str(tmp_path / "store")
    st = Store.create(loc, "s3cret")
    with st.writer() as w:
        w.add_bytes("/x", b"payload")
    raw = st.export_key()
    st.close()
    for conn_id, extra in (("new", {"secret_key": raw}), ("old", {"key": raw}),
                           ("both", {"secret_key": raw, "key": raw})):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}",
                           json.dumps({"conn_type": "pgplakar_store", "extra": {"location": loc, **extra}}))
        with PgPlakarStoreHook(conn_id).get_store() as opened:
            assert opened.snapshot_ids() == [w.snapshot_id]
    monkeypatch.setenv("AIRFLOW_CONN_CLASH", json.dumps(
        {"conn_type": "pgplakar_store", "extra": {"location": loc, "secret_key": raw, "key": "other"}}))
    with pytest.raises(ValueError, match="secret_key and key differ"):
        PgPlakarStoreHook("clash").store_settings()


@pytest.mark.parametrize("name", ["ssl_key_data", "ssl_private_key_data"])
def test_rendered_template_fields_mask_an_inline_key(name: str) -> None:
    from airflow.sdk.execution_time.task_runner import _serialize_rendered_fields

    options = {"ssl_cert_data": PEM_CERT, name: "{{ params.key }}", "ssl_mode": "verify-full"}
    ops = [PgPlakarBackupOperator(task_id="b", options=options),
           PgPlakarRestoreOperator(task_id="r", snapshot_id="latest", options=options),
           PgPlakarBaseBackupOperator(task_id="p", options=options)]
    for op in ops:
        op.render_template_fields(context(FakeTI(task_id=op.task_id), key=PEM_KEY))
        assert op.options["ssl_private_key_data"].strip() == PEM_KEY.strip()  # rendered, under the masked name
        rendered = _serialize_rendered_fields(op)
        assert rendered["options"]["ssl_private_key_data"] == "***", rendered
        assert rendered["options"]["ssl_cert_data"].strip() == PEM_CERT.strip()  # a certificate is public
        assert "MIIEvQ" not in json.dumps(rendered)


def test_both_names_are_one_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OptionError, match="same option"):
        parse_source_options("postgres://", {"ssl_cert_data": PEM_CERT, "ssl_key_data": PEM_KEY,
                                             "ssl_private_key_data": PEM_KEY})
    conn = parse_source_options("postgres://", {"ssl_cert_data": PEM_CERT, "ssl_private_key_data": PEM_KEY}).conn
    assert conn.ssl_key_data == PEM_KEY and "MIIEvQ" not in repr(conn)
    # an operator option under either name replaces the connection's inline key under the other
    extra = {"ssl_cert_data": PEM_CERT, "ssl_key_data": PEM_KEY.replace("masked", "oldkey")}
    monkeypatch.setenv("AIRFLOW_CONN_PG_TLS", json.dumps({"conn_type": "postgres", "host": "db", "login": "u",
                                                          "extra": extra}))
    opts = PgPlakarPostgresHook("pg_tls").source_options({"ssl_private_key_data": PEM_KEY}).options
    assert opts.conn.ssl_key_data == PEM_KEY
