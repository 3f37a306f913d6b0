"""``postgres+aws://``: RDS/Aurora IAM authentication, end to end against a real PostgreSQL 15.

The server stands in for RDS: the IAM user's password is set to the token boto3 makes for fixed test credentials
at a frozen clock (``botocore.auth.get_current_datetime``), so a backup or restore succeeds only if that token
reaches every connection (database list, pg_authid probe, manifest) and every tool (pg_dumpall, pg_dump, psql,
pg_restore). With the clock ticking one second per token and the server's password switched to each token as it
is made, success proves that every connection and every tool process got a token made just for it.

Credentials come from the environment, a profile in a shared credentials file, and web identity against moto's
STS on loopback. The IAM user is like RDS's master user: no superuser, CREATEDB/CREATEROLE, member of
``rds_superuser``, so it cannot read pg_authid and globals are dumped with ``--no-role-passwords``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import psycopg
import pytest
from psycopg import sql

from airflow_provider_pgplakar.cli.main import main as cli_main
from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg import logical as logical_mod
from airflow_provider_pgplakar.pg import restore as restore_mod
from airflow_provider_pgplakar.pg.connect import PgConnectError
from airflow_provider_pgplakar.pg.iam import (
    IamAuthError,
    IamTokenSource,
    password_source,
    region_from_host,
    resolve_region,
)
from airflow_provider_pgplakar.pg.logical import logical_backup
from airflow_provider_pgplakar.pg.options import ConnOptions, parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.restore import logical_restore
from airflow_provider_pgplakar.store.repo import Store
from tests.helpers import isolate_aws_env
from tests.pgservers import PgManager, PgServer

IAM_USER = "iam_backup"
REGION = "eu-west-3"
RDS_HOST = "mydb.cluster-abc123xyz.eu-west-3.rds.amazonaws.com"
# AWS's documentation example key pair, and a session token long enough to push the token past 1 KB.
AKID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr" + "".join(f"{i:03d}Zx9+/" for i in range(120))
T0 = dt.datetime(2026, 7, 1, 12, 0, 0)

APP = [
    "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)",
    "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 3000) g",
    "CREATE TABLE notes (body text)",
    "INSERT INTO notes SELECT repeat('n', g % 40) FROM generate_series(1, 250) g",
]
STATE = "SELECT (SELECT count(*) FROM items), (SELECT md5(string_agg(name, ',' ORDER BY id)) FROM items), " \
        "(SELECT count(*) FROM notes)"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


class Clock:
    """Stands in for ``botocore.auth.get_current_datetime``: ``now``, then advanced by ``step`` on every call."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now
        self.step = dt.timedelta(0)

    def __call__(self, remove_tzinfo: bool = True) -> dt.datetime:
        t, self.now = self.now, self.now + self.step
        return t if remove_tzinfo else t.replace(tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS setting from the developer's machine or CI leaks in; no instance metadata lookups."""
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.delenv("PGPASSWORD", raising=False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(T0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", c)
    return c


def env_credentials(monkeypatch: pytest.MonkeyPatch, *, session_token: bool = True) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AKID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    if session_token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)


def boto3_token(server: PgServer, user: str = IAM_USER, region: str = REGION) -> str:
    """What boto3 itself makes for the fixed credentials at the (frozen) clock: the password RDS would accept."""
    client = boto3.client("rds", region_name=region, aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                          aws_session_token=SESSION_TOKEN)
    return client.generate_db_auth_token(DBHostname=server.host, Port=server.port, DBUsername=user)


def set_password(server: PgServer, token: str, user: str = IAM_USER) -> None:
    with server.connect() as c:
        c.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user), sql.Literal(token)))


def create_db(server: PgServer, name: str, owner: str = IAM_USER) -> None:
    with server.connect() as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(sql.Identifier(name),
                                                                                   sql.Identifier(owner)))


def state(server: PgServer, db: str) -> tuple[Any, ...]:
    with server.connect(db) as c:
        return c.execute(STATE).fetchone()


def aws_location(server: PgServer, database: str = "") -> str:
    return f"postgres+aws://{IAM_USER}@{server.host}:{server.port}/{database}"


def aws_opts(server: PgServer, **extra: str) -> dict[str, str]:
    # The test server has no TLS: the weaker mode is set explicitly (postgres+aws defaults to require, and warns).
    return {"region": REGION, "pg_bin_dir": str(server.bin_dir), "ssl_mode": "prefer", **extra}


def plain_opts(server: PgServer, **extra: str) -> dict[str, str]:
    return {"host": server.host, "port": str(server.port), "username": server.superuser,
            "password": server.password, "pg_bin_dir": str(server.bin_dir), **extra}


def read(store: Store, rec: dict[str, Any]) -> bytes:
    with store.open_record(rec) as src:
        return b"".join(src.iter_chunks())


def store_text(store: Store) -> str:
    """Every snapshot header and every record's metadata, as one string to search for secrets."""
    parts = []
    for sid in store.snapshot_ids():
        parts.append(json.dumps(store.load_snapshot(sid).header, default=str))
        parts += [json.dumps(r, default=str) for r in store.records(sid)]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def rds(pg_manager: PgManager) -> Any:
    """A private PostgreSQL 15 shaped like RDS: an ``rdsadmin`` database and an IAM user that is no superuser."""
    server = pg_manager.start(15)
    with server.connect() as c:
        c.execute("CREATE ROLE rds_superuser NOLOGIN CREATEDB CREATEROLE")
        c.execute("CREATE ROLE rds_iam NOLOGIN")
        c.execute(f"CREATE ROLE {IAM_USER} LOGIN CREATEDB CREATEROLE IN ROLE rds_superuser, rds_iam")
        c.execute("CREATE ROLE app_reader LOGIN PASSWORD 'reader-secret-pw'")
        c.execute(f"CREATE DATABASE app OWNER {IAM_USER}")
        c.execute("CREATE DATABASE rdsadmin")
    with server.connect("app") as c:
        c.execute(f"SET ROLE {IAM_USER}")
        for q in APP:
            c.execute(q)
    yield server
    pg_manager.discard(server)


# --------------------------------------------------------------------------------------------------------------------
# Region precedence and option errors (no server)


def test_region_from_rds_host_names() -> None:
    assert region_from_host(RDS_HOST) == "eu-west-3"
    assert region_from_host("db.abc.us-gov-west-1.rds.amazonaws.com.") == "us-gov-west-1"
    assert region_from_host("proxy.proxy-xyz.ap-southeast-4.rds.amazonaws.com") == "ap-southeast-4"
    assert region_from_host("db.abc.rds.cn-north-1.amazonaws.com.cn") == "cn-north-1"
    assert region_from_host("DB.ABC.US-EAST-1.RDS.AMAZONAWS.COM") == "us-east-1"
    for host in ("db.example.com", "127.0.0.1", "eu-west-3.rds.amazonaws.com", "x.eu-west-3.rds.amazonaws.com.evil.io"):
        assert region_from_host(host) is None, host


def token_region(conn: ConnOptions) -> str:
    """The region the tokens of ``conn`` are signed for (resolved when the token source is made)."""
    return IamTokenSource(conn).region


def test_region_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rds_loc = f"postgres+aws://u@{RDS_HOST}/app"
    # 4. the RDS host name, when nothing else says
    assert token_region(parse_source_options(rds_loc).conn) == "eu-west-3"
    # 3. the profile's region beats the host name
    config = tmp_path / "config"
    config.write_text("[default]\nregion = us-west-2\n[profile other]\nregion = ca-central-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert token_region(parse_source_options(rds_loc).conn) == "us-west-2"
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert token_region(parse_source_options(rds_loc).conn) == "ca-central-1"
    # 2. AWS_DEFAULT_REGION beats the profile, AWS_REGION beats both
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert token_region(parse_source_options(rds_loc).conn) == "sa-east-1"
    monkeypatch.setenv("AWS_REGION", "me-south-1")
    assert token_region(parse_restore_options(rds_loc).conn) == "me-south-1"
    # 1. the option beats everything; an empty option means unset
    assert token_region(parse_source_options(rds_loc, {"region": "us-east-1"}).conn) == "us-east-1"
    assert token_region(parse_source_options(rds_loc, {"region": ""}).conn) == "me-south-1"
    assert resolve_region("af-south-1", "db.example.com") == "af-south-1"


def test_parsing_never_reads_the_aws_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken AWS configuration (an unknown profile) fails the token source, never the parsing of options."""
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    monkeypatch.setenv("AWS_REGION", "Not A Region")
    opts = parse_source_options(f"postgres+aws://u@{RDS_HOST}/app")
    assert opts.conn.iam and opts.conn.region is None and opts.conn.ssl_mode == "require"
    assert parse_restore_options("postgres+aws://u@db.example.com/app").conn.region is None
    with pytest.raises(OptionError, match="region: 'Not A Region' from AWS_REGION is not an AWS region"):
        IamTokenSource(opts.conn)


def test_region_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OptionError) as info:
        password_source(parse_source_options("postgres+aws://u@db.example.com/app").conn)
    msg = str(info.value)
    assert info.value.option == "region" and "\n" not in msg
    assert "region=" in msg and "AWS_REGION" in msg and "db.example.com" in msg
    with pytest.raises(OptionError, match="region: 'Virginia' is not an AWS region"):
        parse_source_options(f"postgres+aws://u@{RDS_HOST}/app", {"region": "Virginia"})  # an option: at parsing
    monkeypatch.setenv("AWS_DEFAULT_REGION", "EU_WEST_3")
    with pytest.raises(OptionError, match="region: 'EU_WEST_3' from AWS_DEFAULT_REGION is not an AWS region"):
        IamTokenSource(parse_source_options(f"postgres+aws://u@{RDS_HOST}/app").conn)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    with pytest.raises(IamAuthError, match="nosuchprofile.*fix AWS_PROFILE"):
        IamTokenSource(parse_source_options("postgres+aws://u@db.example.com/app").conn)


@pytest.mark.parametrize(
    ("parse", "location", "options", "option", "fix"),
    [
        (parse_source_options, "postgres+aws://db.example.com/app", {}, "username", "username"),
        (parse_restore_options, "postgres+aws://db.example.com/app", {"region": REGION}, "username", "username"),
        (parse_source_options, "postgres+aws://u:pw@db.example.com/app", {}, "location", "remove the password"),
        (parse_source_options, f"postgres+aws://u@{RDS_HOST}/app", {"password": "pw"}, "password",
         "remove the password"),
        (parse_restore_options, f"postgres+aws://u@{RDS_HOST}/app", {"password": "pw"}, "password",
         "remove the password"),
        (parse_source_options, f"postgres+aws://u@{RDS_HOST}/app", {"ssl_mode": "disable"}, "ssl_mode",
         "ssl_mode=require"),
    ],
)
def test_option_errors_name_the_fix(parse: Any, location: str, options: dict[str, str], option: str,
                                    fix: str) -> None:
    with pytest.raises(OptionError) as info:
        parse(location, options)
    assert info.value.option == option and fix in str(info.value) and "\n" not in str(info.value)
    assert "pw@" not in str(info.value)


def test_ssl_mode_defaults_to_require_for_iam_only() -> None:
    """An active attacker on ``prefer`` can downgrade the connection and read the IAM token: require by default."""
    assert parse_source_options(f"postgres+aws://u@{RDS_HOST}/app").conn.ssl_mode == "require"
    assert parse_restore_options(f"postgres+aws://u@{RDS_HOST}/app").conn.ssl_mode == "require"
    assert ConnOptions(username="u", iam=True).ssl_mode == "require"
    assert parse_source_options(f"postgres+aws://u@{RDS_HOST}/app", {"ssl_mode": "prefer"}).conn.ssl_mode == "prefer"
    assert parse_source_options("postgres://u@db/app").conn.ssl_mode == "prefer"
    assert ConnOptions().ssl_mode == "prefer"


def test_every_ssl_option_is_accepted(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    opts = parse_source_options(f"postgres+aws://u@{RDS_HOST}/app", {
        "ssl_mode": "verify-full", "ssl_root_cert_data": pem, "ssl_cert_data": pem,
        "ssl_key_data": pem.replace("CERTIFICATE", "PRIVATE KEY")})
    assert opts.conn.ssl_mode == "verify-full" and opts.conn.ssl_root_cert_data == pem
    opts = parse_restore_options(f"postgres+aws://u@{RDS_HOST}/app", {
        "ssl_mode": "verify-ca", "ssl_root_cert": "/etc/rds/global-bundle.pem"})
    assert opts.conn.ssl_root_cert == "/etc/rds/global-bundle.pem" and opts.conn.iam


def test_exclude_databases_default_and_explicit_empty() -> None:
    loc = f"postgres+aws://u@{RDS_HOST}/"
    assert parse_source_options(loc).exclude_databases == ("rdsadmin",)
    assert parse_source_options(loc, {"exclude_databases": ""}).exclude_databases == ()
    assert parse_source_options(loc, {"exclude_databases": "x"}).exclude_databases == ("x",)


# --------------------------------------------------------------------------------------------------------------------
# Tokens and credential sources (no server)


def _conn(host: str = "127.0.0.1", port: int = 5432, ssl_mode: str = "require") -> ConnOptions:
    return ConnOptions(host=host, port=port, username=IAM_USER, iam=True, region=REGION, ssl_mode=ssl_mode)


def test_token_is_deterministic_for_a_frozen_clock(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    env_credentials(monkeypatch)
    seen: list[str] = []
    source = IamTokenSource(_conn(RDS_HOST), on_token=seen.append)
    first, second = source(), source()
    assert first == second and seen == [first, second] and source.count == 2
    assert first.startswith(f"{RDS_HOST}:5432/?Action=connect&DBUser={IAM_USER}&X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert f"X-Amz-Credential={AKID}%2F20260701%2F{REGION}%2Frds-db%2Faws4_request" in first
    assert "X-Amz-Date=20260701T120000Z" in first and "X-Amz-Expires=900" in first
    assert "X-Amz-Security-Token=" in first and len(first) > 1024
    client = boto3.client("rds", region_name=REGION, aws_access_key_id=AKID, aws_secret_access_key=SECRET,
                          aws_session_token=SESSION_TOKEN)
    assert first == client.generate_db_auth_token(DBHostname=RDS_HOST, Port=5432, DBUsername=IAM_USER)
    clock.now = T0 + dt.timedelta(seconds=1)
    third = source()
    assert third != first and "X-Amz-Date=20260701T120001Z" in third
    assert repr(source).count("X-Amz") == 0


def test_credentials_from_a_profile_in_a_shared_credentials_file(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, clock: Clock) -> None:
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIADEFAULTPROFILE0\naws_secret_access_key = d\n"
                     "[backup]\naws_access_key_id = AKIABACKUPPROFILE00\naws_secret_access_key = b\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    assert "Credential=AKIADEFAULTPROFILE0%2F" in IamTokenSource(_conn())()
    monkeypatch.setenv("AWS_PROFILE", "backup")
    token = IamTokenSource(_conn())()
    assert "Credential=AKIABACKUPPROFILE00%2F20260701%2Feu-west-3%2F" in token
    assert "Security-Token" not in token


def test_credentials_from_web_identity_via_sts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               s3_server: str) -> None:
    """IRSA/EKS style: a web identity token file and a role; STS (moto, on loopback) returns temporary keys."""
    token_file = tmp_path / "web-identity-token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YmFja3VwIn0.c2ln")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/pgplakar-backup")
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "pgplakar-test")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3_server)
    source = IamTokenSource(_conn())
    token = source()
    assert "X-Amz-Credential=ASIA" in token and "X-Amz-Security-Token=" in token  # STS temporary credentials
    assert "X-Amz-Credential=ASIA" in source() and source.count == 2  # the client and its STS credentials reused
    monkeypatch.setenv("AWS_ROLE_ARN", "not-an-arn")
    with pytest.raises(IamAuthError) as info:
        IamTokenSource(_conn())()
    assert "\n" not in str(info.value) and str(info.value).startswith("postgres+aws: cannot make the RDS IAM token")


def test_no_credentials_anywhere_is_one_clear_line(store: Store) -> None:
    with pytest.raises(IamAuthError) as info:
        IamTokenSource(_conn())()
    msg = str(info.value)
    assert msg.startswith("postgres+aws: no AWS credentials found") and "\n" not in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg and "aws_conn_id" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # through a backup: fails at the first connection, nothing committed
    opts = parse_source_options(f"postgres+aws://{IAM_USER}@127.0.0.1:1/app", {"region": REGION})
    with pytest.raises(IamAuthError, match="no AWS credentials found"):
        logical_backup(store, opts)
    assert store.snapshot_ids() == []


def test_password_source_and_ssl_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    plain = ConnOptions(host="h", username="u", password="pw")
    assert password_source(plain)() == "pw"
    explicit = lambda: "given"  # noqa: E731
    assert password_source(_conn(), explicit) is explicit
    caplog.set_level(logging.WARNING)
    assert isinstance(password_source(_conn(ssl_mode="require")), IamTokenSource)
    assert "weaker than require" not in caplog.text
    for mode in ("prefer", "allow"):
        IamTokenSource(_conn(ssl_mode=mode))
        assert f"ssl_mode={mode} is weaker than require" in caplog.text
    with pytest.raises(ValueError, match="postgres\\+aws"):
        IamTokenSource(plain)


# --------------------------------------------------------------------------------------------------------------------
# End to end against PostgreSQL


def test_backup_and_restore_use_the_token_boto3_makes(rds: PgServer, store: Store, clock: Clock,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    env_credentials(monkeypatch)
    token = boto3_token(rds)
    assert len(token) > 1024  # PostgreSQL (SCRAM) takes a password this long
    set_password(rds, token)
    caplog.set_level(logging.INFO)

    res = logical_backup(store, parse_source_options(aws_location(rds, "app"), aws_opts(rds)))
    assert res.databases == ["app"]
    assert any("--no-role-passwords" in w for w in res.warnings)  # RDS-like user: pg_authid is unreadable
    assert "ssl_mode=prefer is weaker than require" in caplog.text
    records = {r.path: r for r in store.records(res.snapshot_id)}
    assert set(records) == {"/manifest.json", "/00000-globals.sql", "/00001-app.dump", "/fingerprints.json"}
    globals_sql = read(store, records["/00000-globals.sql"]).decode()
    assert "CREATE ROLE app_reader;" in globals_sql and f"CREATE ROLE {IAM_USER};" in globals_sql
    assert "PASSWORD" not in globals_sql and "SCRAM-SHA-256" not in globals_sql
    manifest = json.loads(read(store, records["/manifest.json"]))
    assert manifest["pgplakar"]["scheme"] == "postgres+aws" and manifest["pgplakar"]["role_passwords"] is False
    assert not [e for e in manifest["errors"] if e["section"] in ("connect", "transaction")]
    header = store.load_snapshot(res.snapshot_id).header
    assert header["source"]["origin"] == f"postgres+aws://{IAM_USER}@{rds.host}:{rds.port}/app"

    # restore with IAM: psql (globals) and pg_restore both authenticate with the token. As on RDS, the master user
    # is no superuser: ALTER ROLE ... [NO]SUPERUSER of the globals fails, which the restore accepts only when told
    create_db(rds, "app_iam_copy")
    summary = logical_restore(store, res.snapshot_id, parse_restore_options(
        aws_location(rds), aws_opts(rds, database="app_iam_copy", ignore_globals_errors="true")))
    assert [(r.path, r.status) for r in summary.results] == [("/00000-globals.sql", "restored"),
                                                             ("/00001-app.dump", "restored")]
    assert "must be superuser" in summary.results[0].detail
    assert summary.results[0].detail.endswith("(ignored: ignore_globals_errors=true)")
    assert state(rds, "app_iam_copy") == state(rds, "app")

    # the IAM snapshot restores with plain postgres://, and a plain snapshot restores with IAM
    create_db(rds, "app_plain_copy", owner=rds.superuser)
    logical_restore(store, res.snapshot_id, parse_restore_options("postgres://", plain_opts(
        rds, database="app_plain_copy", no_globals="true")))
    assert state(rds, "app_plain_copy") == state(rds, "app")
    plain = logical_backup(store, parse_source_options("postgres://", plain_opts(rds, database="app")))
    create_db(rds, "app_from_plain")
    logical_restore(store, plain.snapshot_id, parse_restore_options(
        aws_location(rds, "app_from_plain"), aws_opts(rds, no_globals="true")))
    assert state(rds, "app_from_plain") == state(rds, "app")

    assert token not in caplog.text and token not in store_text(store)
    assert SECRET not in caplog.text and SESSION_TOKEN not in store_text(store)


def test_a_fresh_token_for_every_connection_and_every_tool(rds: PgServer, store: Store, clock: Clock,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Clock +1 s per token, and the server accepts only the newest token: every consumer must get its own.

    The manifest and globals are read beside the dumps, so two consumers may make tokens at the same time; the
    ``login`` lock, held from a token's making until its consumer has logged in (a connection is open, a tool has
    written its first byte or ended), lets the server see one login at a time, each with the newest token."""
    env_credentials(monkeypatch, session_token=False)
    clock.step = dt.timedelta(seconds=1)
    made: list[str] = []
    used: list[tuple[str, str]] = []  # (consumer, password it was given)
    login = threading.Lock()

    def rotate(token: str) -> None:
        login.acquire()  # released by the consumer's spy below
        made.append(token)
        set_password(rds, token)

    real_connect, real_backup_tool, real_restore_tool = psycopg.connect, logical_mod.run_tool, restore_mod.run_tool

    def spy_connect(*args: Any, **kw: Any) -> Any:
        if kw.get("user") != IAM_USER:
            return real_connect(*args, **kw)
        used.append((f"connect {kw['dbname']}", kw["password"]))
        try:
            return real_connect(*args, **kw)
        finally:
            login.release()

    def spy_tool(real: Any) -> Any:
        @contextmanager
        def run(argv: list[str], env: dict[str, str], *a: Any, **kw: Any) -> Any:
            used.append((Path(argv[0]).name, env["PGPASSWORD"]))
            assert not any(t in " ".join(argv) for t in made)  # never in argv
            held = True
            try:
                with real(argv, env, *a, **kw) as tool:
                    if tool.proc.stdout is not None:
                        tool.stdout.peek(1)  # its first byte (or EOF): logged in; the byte stays for the reader
                        held = False
                        login.release()
                    yield tool
            finally:
                if held:
                    login.release()
        return run

    monkeypatch.setattr(psycopg, "connect", spy_connect)
    monkeypatch.setattr(logical_mod, "run_tool", spy_tool(real_backup_tool))
    monkeypatch.setattr(restore_mod, "run_tool", spy_tool(real_restore_tool))

    # full cluster, default exclusions: rdsadmin is skipped
    opts = parse_source_options(aws_location(rds), aws_opts(rds, ssl_mode="prefer"))
    res = logical_backup(store, opts, password=IamTokenSource(opts.conn, on_token=rotate))
    assert "rdsadmin" not in res.databases and {"app", "postgres", "template1"} <= set(res.databases)
    assert not any("rdsadmin" in r.path for r in store.records(res.snapshot_id))
    consumers = [c for c, _ in used]
    assert consumers.count("pg_dumpall") == 1 and consumers.count("pg_dump") == len(res.databases)
    # per dumped database the fingerprint session that exports the snapshot (where the manifest is read) and the
    # probe that imports it; the first, the database list and pg_authid probe, is then database postgres's session
    snapshots = [f"connect {d}" for d in res.databases for _ in range(2)]
    connects = [c for c in consumers if c.startswith("connect ")]
    assert connects[0] == "connect postgres"
    assert sorted(connects) == sorted(snapshots)
    manifest = json.loads(read(store, next(r for r in store.records(res.snapshot_id) if r.path == "/manifest.json")))
    assert [e for e in manifest["errors"] if e["section"] == "connect"] == []
    assert [p for _, p in used] == made and len(set(made)) == len(made)  # one new token per consumer, in order

    made.clear()
    used.clear()
    create_db(rds, "app_rotated")
    ropts = parse_restore_options(aws_location(rds), aws_opts(rds, databases="app", database="app_rotated",
                                                               ignore_globals_errors="true"))  # not a superuser
    summary = logical_restore(store, res.snapshot_id, ropts, password=IamTokenSource(ropts.conn, on_token=rotate))
    assert summary.ok and state(rds, "app_rotated") == state(rds, "app")
    assert [c for c, _ in used] == ["connect postgres", "psql", "pg_restore"]
    assert [p for _, p in used] == made and len(set(made)) == 3


def test_a_stale_token_fails_clearly(rds: PgServer, store: Store, clock: Clock,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env_credentials(monkeypatch)
    stale = boto3_token(rds)
    set_password(rds, stale)
    clock.now = T0 + dt.timedelta(minutes=20)  # a later run: its tokens differ from the one the server knows
    with pytest.raises(PgConnectError) as info:
        logical_backup(store, parse_source_options(aws_location(rds, "app"), aws_opts(rds)))
    msg = str(info.value)
    assert f'password authentication failed for user "{IAM_USER}"' in msg and "\n" not in msg
    assert "X-Amz" not in msg and stale not in msg
    assert store.snapshot_ids() == []


def test_explicit_empty_exclude_databases_keeps_rdsadmin(rds: PgServer, store: Store, clock: Clock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env_credentials(monkeypatch)
    set_password(rds, boto3_token(rds))
    res = logical_backup(store, parse_source_options(aws_location(rds), aws_opts(rds, exclude_databases="")))
    assert "rdsadmin" in res.databases
    assert any(r.path.endswith("-rdsadmin.dump") for r in store.records(res.snapshot_id))


def test_cli_backup_and_restore(rds: PgServer, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    env_credentials(monkeypatch)
    token = boto3_token(rds)
    set_password(rds, token)
    monkeypatch.setenv("PGPLAKAR_PASSPHRASE", "cli iam passphrase")
    monkeypatch.setenv("PGPASSWORD", "ignored-for-postgres+aws")  # postgres:// would take it; IAM must not
    at = ["at", str(tmp_path / "cli-store")]
    assert cli_main([*at, "create"]) == 0
    capsys.readouterr()
    assert cli_main([*at, "backup", "--json", aws_location(rds, "app"), f"region={REGION}",
                     f"pg_bin_dir={rds.bin_dir}", "ssl_mode=prefer"]) == 0
    out, err = capsys.readouterr()
    snap = json.loads(out)["snapshot"]
    assert "pgplakar: warning: cannot read pg_authid" in err and "--no-role-passwords" in err
    assert "ssl_mode=prefer is weaker than require" in caplog.text  # logged (stderr outside pytest)
    create_db(rds, "app_cli")
    monkeypatch.setenv("AWS_REGION", REGION)  # the region from the SDK configuration this time
    # the default ssl_mode of postgres+aws is require: refused by this server without TLS
    assert cli_main([*at, "restore", "-to", aws_location(rds, "app_cli"), f"pg_bin_dir={rds.bin_dir}",
                     "no_globals=true", snap[:8]]) == 1
    assert "server does not support SSL, but SSL was required" in capsys.readouterr().err
    assert cli_main([*at, "restore", "-to", aws_location(rds, "app_cli"), f"pg_bin_dir={rds.bin_dir}",
                     "no_globals=true", "ssl_mode=prefer", snap[:8]]) == 0
    out2, err2 = capsys.readouterr()
    assert state(rds, "app_cli") == state(rds, "app")
    assert cli_main([*at, "backup", aws_location(rds, "app"), f"region={REGION}", "password=x"]) == 1
    out3, err3 = capsys.readouterr()
    assert "pgplakar: error: password: postgres+aws authenticates with an IAM token; remove the password" in err3
    for text in (out, err, out2, err2, out3, err3, caplog.text):
        assert token not in text and SECRET not in text
