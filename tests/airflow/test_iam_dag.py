"""IAM (``postgres+aws``) in Airflow: a standard postgres connection with ``"iam": true``, the hook's handling of
``region_name``/``aws_conn_id``/password, and a DAG run with ``dag.test()`` whose token never shows in the task log,
rendered fields or XCom.

As in ``tests/logical/test_iam.py``, the IAM user's password on the test server is the token boto3 makes for fixed
credentials at a frozen clock, so the run succeeds only if the hook's token source reaches every tool.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import secrets
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import botocore.auth
import pytest
from psycopg import sql

from airflow_provider_pgplakar.hooks.postgres import PgPlakarPostgresHook, password_source
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.iam import IamAuthError, IamTokenSource
from airflow_provider_pgplakar.store.repo import Store
from tests.conftest import REPO_ROOT
from tests.helpers import isolate_aws_env
from tests.pgservers import PgServer

PASSPHRASE = "iam dag store passphrase"
REGION = "eu-west-3"
AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
T0 = dt.datetime(2026, 7, 1, 12, 0, 0)
RDS_HOST = "mydb.cluster-abc123.ap-northeast-1.rds.amazonaws.com"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("PGPLAKAR_KDF", "1,8192,1")
    monkeypatch.setenv("PGPLAKAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda remove_tzinfo=True: T0)


def set_conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "postgres", **fields}))


def fake_amazon_provider(monkeypatch: pytest.MonkeyPatch, *, region: str | None, key: str) -> list[str]:
    """A stand-in for ``airflow.providers.amazon``'s AwsBaseHook (the provider is optional and not installed)."""
    calls: list[str] = []

    class AwsBaseHook:
        def __init__(self, aws_conn_id: str, client_type: str | None = None) -> None:
            calls.append(aws_conn_id)
            self.region_name = region

        def get_session(self, region_name: str | None = None) -> Any:
            return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key="s", region_name=region_name)

    names = ["airflow.providers.amazon", "airflow.providers.amazon.aws", "airflow.providers.amazon.aws.hooks",
             "airflow.providers.amazon.aws.hooks.base_aws"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    sys.modules[names[-1]].AwsBaseHook = AwsBaseHook  # type: ignore[attr-defined]
    return calls


# --------------------------------------------------------------------------------------------------------------------
# The hook


def test_iam_extra_makes_a_postgres_aws_source(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(monkeypatch, "rds", host=RDS_HOST, login="backup_iam", schema="app",
             extra={"iam": True, "region_name": "eu-central-1", "sslmode": "require", "pg_bin_dir": "/opt/pg/bin"})
    source = PgPlakarPostgresHook("rds").source_options()
    opts = source.options
    assert opts.scheme == "postgres+aws" and opts.conn.iam and opts.conn.password is None
    assert (opts.conn.host, opts.conn.port, opts.conn.username) == (RDS_HOST, 5432, "backup_iam")
    assert opts.conn.region == "eu-central-1" and opts.conn.ssl_mode == "require"
    assert opts.database == "app" and opts.exclude_databases == ("rdsadmin",) and opts.pg_bin_dir == "/opt/pg/bin"
    assert source.aws_conn_id is None
    assert isinstance(password_source(opts, source.aws_conn_id), IamTokenSource)
    # operator options override; without region_name the region comes from the host name
    set_conn(monkeypatch, "rds", host=RDS_HOST, login="backup_iam", extra={"iam": "true"})
    assert PgPlakarPostgresHook("rds").source_options().options.conn.ssl_mode == "require"  # the default for IAM
    ropts = PgPlakarPostgresHook("rds").restore_options({"database": "scratch", "region": "us-west-1"}).options
    assert ropts.conn.region == "us-west-1" and ropts.database == "scratch" and ropts.scheme == "postgres+aws"
    hostonly = PgPlakarPostgresHook("rds").source_options()
    assert hostonly.options.conn.region is None  # resolved where tokens are made, not while parsing
    assert password_source(hostonly.options, hostonly.aws_conn_id).region == "ap-northeast-1"  # type: ignore[union-attr]


def test_without_iam_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(monkeypatch, "plain", host="db", login="u", password="pw",
             extra={"iam": False, "region_name": "eu-west-1", "aws_conn_id": "aws_x"})
    source = PgPlakarPostgresHook("plain").source_options()
    opts = source.options
    assert opts.scheme == "postgres" and opts.conn.password == "pw" and opts.conn.region is None
    assert source.aws_conn_id is None  # aws_conn_id of a connection without "iam" is ignored
    assert password_source(opts, source.aws_conn_id) is None


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"host": RDS_HOST, "login": "u", "password": "static", "extra": {"iam": True}}, OptionError,
         "password: connection 'bad' has \"iam\": true, so it authenticates with an IAM token; remove its password"),
        ({"host": "db.example.com", "extra": {"iam": True, "region_name": REGION}}, OptionError,
         "username: postgres\\+aws needs the IAM-enabled database user"),
        ({"host": "db.example.com", "login": "u", "extra": {"iam": True}}, OptionError,
         "region: postgres\\+aws needs the AWS region"),
        ({"host": RDS_HOST, "login": "u", "extra": {"iam": True, "redshift": True}}, OptionError,
         "iam: Redshift IAM credentials are not supported"),
        ({"host": RDS_HOST, "login": "u", "extra": {"iam": True, "aws_conn_id": "aws_backup"}}, IamAuthError,
         "aws_conn_id 'aws_backup' needs the Amazon provider: pip install apache-airflow-providers-amazon"),
    ],
)
def test_iam_connection_errors(monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], error: type,
                               match: str) -> None:
    monkeypatch.setitem(sys.modules, "airflow.providers.amazon", None)  # not installed (import raises)
    set_conn(monkeypatch, "bad", **fields)
    with pytest.raises(error, match=match) as info:
        source = PgPlakarPostgresHook("bad").source_options()
        password_source(source.options, source.aws_conn_id)  # resolves the region (its error is raised here)
    assert "\n" not in str(info.value) and "static" not in str(info.value)


def test_aws_conn_id_uses_the_aws_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.log import redact

    calls = fake_amazon_provider(monkeypatch, region="ap-south-1", key="AKIAFROMAWSCONN0000")
    set_conn(monkeypatch, "rds", host="10.0.0.5", port=5433, login="backup_iam",
             extra={"iam": True, "aws_conn_id": "aws_backup"})
    source = PgPlakarPostgresHook("rds").source_options()
    opts = source.options
    assert opts.conn.region == "ap-south-1" and source.aws_conn_id == "aws_backup"  # the AWS connection's region
    token = password_source(opts, source.aws_conn_id)()
    assert token.startswith("10.0.0.5:5433/?Action=connect&DBUser=backup_iam&")
    assert "X-Amz-Credential=AKIAFROMAWSCONN0000%2F20260701%2Fap-south-1%2Frds-db%2F" in token
    assert set(calls) == {"aws_backup"}
    assert redact(token) != token  # registered with mask_secret
    # region_name on the postgres connection wins over the AWS connection's
    set_conn(monkeypatch, "rds", host="10.0.0.5", login="backup_iam",
             extra={"iam": True, "aws_conn_id": "aws_backup", "region_name": "us-east-2"})
    assert PgPlakarPostgresHook("rds").source_options().options.conn.region == "us-east-2"


def test_successive_calls_never_share_an_aws_conn_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """One hook, two calls while the connection changes: each result keeps its own aws_conn_id, so the first
    options' tokens are still signed with the first AWS connection (the hook used to keep the last one)."""
    calls = fake_amazon_provider(monkeypatch, region="ap-south-1", key="AKIAFROMAWSCONN0000")
    set_conn(monkeypatch, "rds", host="10.0.0.5", login="backup_iam", extra={"iam": True, "aws_conn_id": "aws_a"})
    hook = PgPlakarPostgresHook("rds")
    first = hook.source_options()
    set_conn(monkeypatch, "rds", host="10.0.0.5", login="backup_iam", extra={"iam": True, "region_name": REGION})
    second = hook.restore_options()
    assert (first.aws_conn_id, second.aws_conn_id) == ("aws_a", None)
    calls.clear()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADEFAULTCHAIN0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    second_token = password_source(second.options, second.aws_conn_id)()
    assert calls == [] and "X-Amz-Credential=AKIADEFAULTCHAIN0000%2F" in second_token  # boto3's chain
    first_token = password_source(first.options, first.aws_conn_id)()
    assert calls == ["aws_a"] and "X-Amz-Credential=AKIAFROMAWSCONN0000%2F" in first_token
    assert not hasattr(hook, "aws_conn_id")


# --------------------------------------------------------------------------------------------------------------------
# A DAG run


def load_dag() -> Any:
    name = "pgplakar_test_dag_iam_backup"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "example_dags" / "pgplakar_iam_backup.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].dag


def _rendered_and_xcom(dag_id: str, run_id: str) -> list[str]:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rendered = session.scalars(select(RenderedTaskInstanceFields).where(
            RenderedTaskInstanceFields.dag_id == dag_id, RenderedTaskInstanceFields.run_id == run_id)).all()
        xcoms = session.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run_id)).all()
        assert rendered and xcoms
        return [json.dumps(r.rendered_fields, default=str) for r in rendered] + \
               [json.dumps(x.value, default=str) for x in xcoms]


def test_iam_dag_runs_and_never_shows_the_token(pg15: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                                airflow_db: None) -> None:
    from airflow.sdk.log import redact

    user, db = f"iam_{secrets.token_hex(3)}", f"iamdag_{secrets.token_hex(3)}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AKID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    token = boto3.client("rds", region_name=REGION, aws_access_key_id=AKID, aws_secret_access_key=SECRET) \
        .generate_db_auth_token(DBHostname=pg15.host, Port=pg15.port, DBUsername=user)
    with pg15.connect() as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(sql.Identifier(user),
                                                                              sql.Literal(token)))
        for name in (db, f"{db}_scratch"):
            c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(user)))
    with pg15.connect(db) as c:
        c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(user)))
        c.execute("CREATE TABLE t AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 1500) g")

    set_conn(monkeypatch, "postgres_rds_iam", host=pg15.host, port=pg15.port, login=user,
             extra={"iam": True, "region_name": REGION, "pg_bin_dir": str(pg15.bin_dir),
                    "sslmode": "prefer"})  # the test server has no TLS (IAM defaults to require)
    store_dir = tmp_path / "store"
    Store.create(str(store_dir), PASSPHRASE).close()
    monkeypatch.setenv("AIRFLOW_CONN_PGPLAKAR_STORE_DEFAULT", json.dumps(
        {"conn_type": "pgplakar_store", "password": PASSPHRASE, "extra": {"location": str(store_dir)}}))

    caplog.set_level("DEBUG")
    dag = load_dag()
    dr = dag.test(run_conf={"database": db, "scratch_database": f"{db}_scratch"})
    assert dr.state == "success", [(ti.task_id, ti.state) for ti in dr.get_task_instances()]
    summary = dr.get_task_instance("restore").xcom_pull(task_ids="restore")
    assert summary["ok"] and [(r["database"], r["status"]) for r in summary["records"] if r["database"]] == \
        [(f"{db}_scratch", "restored")]
    with pg15.connect(f"{db}_scratch") as c:
        assert c.execute("SELECT count(*), md5(string_agg(h, '' ORDER BY n)) FROM t").fetchone() == \
            pg15.connect(db).execute("SELECT count(*), md5(string_agg(h, '' ORDER BY n)) FROM t").fetchone()
    with Store.open(str(store_dir), PASSPHRASE) as store:
        (sid,) = store.snapshot_ids()
        header = store.load_snapshot(sid).header
    assert header["source"]["origin"].startswith(f"postgres+aws://{user}@")
    assert any("--no-role-passwords" in w for w in header["meta"]["warnings"])

    out, err = capfd.readouterr()
    texts = [out, err, caplog.text, json.dumps(header, default=str), *_rendered_and_xcom(dag.dag_id, dr.run_id)]
    for text in texts:
        assert token not in text and SECRET not in text
        assert "X-Amz-Signature" not in text
    assert redact(token) != token  # every token was registered with mask_secret
