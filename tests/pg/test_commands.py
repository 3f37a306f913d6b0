"""argv builders (exact argv per option) and the libpq environment that carries every secret instead of argv."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from airflow_provider_pgplakar.pg import OptionError, commands
from airflow_provider_pgplakar.pg.options import ConnOptions, parse_restore_options, parse_source_options
from airflow_provider_pgplakar.pg.secrets import base_tool_env, libpq_env, ssl_files

# Variables libpq (and so every client tool) reads; none may be inherited (pg/secrets.py's TOOL_ENV_ALLOWED): only
# what the options say reaches the tool.
LIBPQ_ENV_VARS = frozenset(
    {
        "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSERVICE",
        "PGSERVICEFILE", "PGOPTIONS", "PGAPPNAME", "PGCHANNELBINDING", "PGREQUIREAUTH", "PGSSLMODE", "PGREQUIRESSL",
        "PGSSLNEGOTIATION", "PGSSLCOMPRESSION", "PGSSLCERT", "PGSSLKEY", "PGSSLCERTMODE", "PGSSLROOTCERT",
        "PGSSLCRL", "PGSSLCRLDIR", "PGSSLSNI", "PGREQUIREPEER", "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
        "PGMINPROTOCOLVERSION", "PGMAXPROTOCOLVERSION", "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB",
        "PGGSSDELEGATION", "PGCONNECT_TIMEOUT", "PGCLIENTENCODING", "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS",
        "PGDATESTYLE", "PGTZ", "PGGEQO",
    }
)  # fmt: skip


@contextmanager
def tool_environment(
    conn: ConnOptions,
    *,
    password: str | None = None,
    database: str | None = None,
    base_env: Mapping[str, str] | None = None,
    tmp_root: str | None = None,
) -> Iterator[dict[str, str]]:
    """:func:`ssl_files` and :func:`libpq_env` in one block: the env is valid until the block exits."""
    with ssl_files(conn, tmp_root=tmp_root) as files:
        yield libpq_env(conn, files, password=password, database=database, base_env=base_env)


PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBclientcert\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEsupersecretkey\n-----END PRIVATE KEY-----\n"
PEM_CA = "-----BEGIN CERTIFICATE-----\nMIIBrootca\n-----END CERTIFICATE-----\n"

# Names that break naive argv or conninfo handling: spaces, quotes, '=', backslashes, a leading '-', upper case,
# non-ASCII, and something libpq would expand as a URI if it were passed as a bare --dbname value.
AWKWARD_NAMES = [
    "plain",
    "with space",
    "it's",
    'dq"uote',
    "a=b",
    "back\\slash",
    "trailing\\",
    "-leading-dash",
    "--help",
    "MixedCase",
    "ñandú_数据",
    "postgresql://evil/other",
    "host=evil dbname=x",
    " padded ",
]


def dbname_of(argv: list[str]) -> str:
    """Parse the ``--dbname=`` conninfo back with libpq; it must name a database and nothing else."""
    (value,) = [a.removeprefix("--dbname=") for a in argv if a.startswith("--dbname=")]
    parsed = conninfo_to_dict(value)
    assert set(parsed) == {"dbname"}, parsed
    return parsed["dbname"]


# --------------------------------------------------------------------------------------------------------------------
# dbname conninfo


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_dbname_conninfo_round_trips(name: str) -> None:
    assert conninfo_to_dict(commands.dbname_conninfo(name)) == {"dbname": name}


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_every_builder_passes_names_safely(name: str) -> None:
    for argv in (
        commands.pg_dump("pg_dump", name),
        commands.pg_restore("pg_restore", name),
        commands.psql_script("psql", name, exit_on_error=True),
    ):
        assert dbname_of(argv) == name
        # The name never appears as its own argv element, where a leading '-' would make it an option.
        assert name not in argv


@pytest.mark.parametrize("bad", ["", "nul\0byte"])
def test_dbname_conninfo_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        commands.dbname_conninfo(bad)


# --------------------------------------------------------------------------------------------------------------------
# pg_dumpall


def test_pg_dumpall_globals() -> None:
    assert commands.pg_dumpall_globals("/pg/bin/pg_dumpall") == [
        "/pg/bin/pg_dumpall",
        "--globals-only",
        "--no-password",
    ]


def test_pg_dumpall_globals_no_role_passwords() -> None:
    assert commands.pg_dumpall_globals("pg_dumpall", no_role_passwords=True) == [
        "pg_dumpall",
        "--globals-only",
        "--no-password",
        "--no-role-passwords",
    ]


# --------------------------------------------------------------------------------------------------------------------
# pg_dump


def test_pg_dump_default_is_uncompressed_custom_format() -> None:
    assert commands.pg_dump("/pg/bin/pg_dump", "sales") == [
        "/pg/bin/pg_dump",
        "-Fc",
        "--no-password",
        "-Z0",
        "--dbname=dbname=sales",
    ]


def test_pg_dump_in_an_exported_snapshot() -> None:
    assert commands.pg_dump("pg_dump", "sales", snapshot="00000003-0000001B-1") == [
        "pg_dump",
        "-Fc",
        "--no-password",
        "-Z0",
        "--snapshot=00000003-0000001B-1",
        "--dbname=dbname=sales",
    ]


@pytest.mark.parametrize("bad", ["", "-x", "1-2; rm", "--jobs=2", "abc"])
def test_pg_dump_refuses_a_snapshot_that_is_not_an_id(bad: str) -> None:
    with pytest.raises(ValueError, match="exported snapshot ID"):
        commands.pg_dump("pg_dump", "sales", snapshot=bad)


def test_pg_dump_compress() -> None:
    assert commands.pg_dump("pg_dump", "sales", compress=True) == [
        "pg_dump",
        "-Fc",
        "--no-password",
        "--dbname=dbname=sales",
    ]


def test_pg_dump_schema_only() -> None:
    assert commands.pg_dump("pg_dump", "s", schema_only=True) == [
        "pg_dump",
        "-Fc",
        "--no-password",
        "-Z0",
        "--schema-only",
        "--dbname=dbname=s",
    ]


def test_pg_dump_data_only_quoted_name() -> None:
    assert commands.pg_dump("pg_dump", "my db", data_only=True, compress=True) == [
        "pg_dump",
        "-Fc",
        "--no-password",
        "--data-only",
        "--dbname=dbname='my db'",
    ]


def test_pg_dump_schema_and_data_only_conflict() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        commands.pg_dump("pg_dump", "s", schema_only=True, data_only=True)


# --------------------------------------------------------------------------------------------------------------------
# pg_restore


def test_pg_restore_minimal_from_stdin() -> None:
    assert commands.pg_restore("pg_restore", "app") == ["pg_restore", "--no-password", "--dbname=dbname=app"]


def test_pg_restore_clean() -> None:
    assert commands.pg_restore("pg_restore", "app", clean=True) == [
        "pg_restore",
        "--no-password",
        "--dbname=dbname=app",
        "--clean",
        "--if-exists",
    ]


def test_pg_restore_recreate_shape() -> None:
    # recreate = connect to a maintenance database, then DROP/CREATE the archive's database.
    assert commands.pg_restore("pg_restore", "postgres", clean=True, create=True) == [
        "pg_restore",
        "--no-password",
        "--dbname=dbname=postgres",
        "--clean",
        "--if-exists",
        "--create",
    ]


@pytest.mark.parametrize(
    ("kwargs", "extra"),
    [
        ({"create": True}, ["--create"]),
        ({"no_owner": True}, ["--no-owner"]),
        ({"exit_on_error": True}, ["--exit-on-error"]),
        ({"schema_only": True}, ["--schema-only"]),
        ({"data_only": True}, ["--data-only"]),
        ({"tables": ["users", "-odd", "Ünï"]}, ["--table=users", "--table=-odd", "--table=Ünï"]),
        ({"schemas": ["public", "Billing"]}, ["--schema=public", "--schema=Billing"]),
        ({"archive": "/tmp/x.dump"}, ["/tmp/x.dump"]),
        ({"archive": "-weird.dump"}, ["./-weird.dump"]),
        ({"archive": "/tmp/x.dump", "jobs": 4}, ["--jobs=4", "/tmp/x.dump"]),
        ({"archive": "/tmp/x.dump", "jobs": 1}, ["/tmp/x.dump"]),
    ],
)
def test_pg_restore_each_option(kwargs: dict, extra: list[str]) -> None:
    assert (
        commands.pg_restore("pg_restore", "app", **kwargs)
        == ["pg_restore", "--no-password", "--dbname=dbname=app"] + extra
    )


def test_pg_restore_everything_in_order() -> None:
    argv = commands.pg_restore(
        "/usr/lib/postgresql/18/bin/pg_restore",
        "app",
        archive="/tmp/00001-app.dump",
        clean=True,
        no_owner=True,
        exit_on_error=True,
        schema_only=True,
        jobs=2,
        tables=["t1"],
        schemas=["s1"],
    )
    assert argv == [
        "/usr/lib/postgresql/18/bin/pg_restore",
        "--no-password",
        "--dbname=dbname=app",
        "--clean",
        "--if-exists",
        "--no-owner",
        "--exit-on-error",
        "--schema-only",
        "--jobs=2",
        "--table=t1",
        "--schema=s1",
        "/tmp/00001-app.dump",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schema_only": True, "data_only": True}, "mutually exclusive"),
        ({"data_only": True, "clean": True}, "data_only cannot"),
        ({"data_only": True, "create": True}, "data_only cannot"),
        ({"jobs": 0}, "jobs must be"),
        ({"jobs": True}, "jobs must be"),
        ({"jobs": 2}, "seekable"),
        ({"tables": [""]}, "table name"),
        ({"schemas": ["a\0b"]}, "schema name"),
        ({"archive": ""}, "file path"),
    ],
)
def test_pg_restore_refuses(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        commands.pg_restore("pg_restore", "app", **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# psql


def test_psql_script_from_stdin() -> None:
    assert commands.psql_script("psql", "postgres", exit_on_error=False) == [
        "psql",
        "-X",
        "--no-password",
        "--echo-errors",
        "-v",
        "ON_ERROR_STOP=0",
        "--dbname=dbname=postgres",
    ]


def test_psql_script_file_and_stop_on_error() -> None:
    assert commands.psql_script("psql", "postgres", exit_on_error=True, script="/tmp/00000-globals.sql") == [
        "psql",
        "-X",
        "--no-password",
        "--echo-errors",
        "-v",
        "ON_ERROR_STOP=1",
        "--dbname=dbname=postgres",
        "--file=/tmp/00000-globals.sql",
    ]


# --------------------------------------------------------------------------------------------------------------------
# Secrets never in argv: they all travel in the environment


def all_argvs_for(location: str, options: dict[str, str]) -> list[list[str]]:
    """Every argv the layer can build for parsed options (the way the orchestrator will call the builders)."""
    src = parse_source_options(location, options)
    dst = parse_restore_options(location.replace("/srcdb", "/dstdb"), {})
    return [
        commands.pg_dumpall_globals("pg_dumpall", no_role_passwords=True),
        commands.pg_dump("pg_dump", src.database, compress=src.compress),
        commands.pg_restore("pg_restore", dst.database, clean=True, no_owner=True),
        commands.psql_script("psql", "postgres", exit_on_error=True),
    ]


def test_no_secret_or_connection_setting_in_any_argv() -> None:
    password = "Pa55-w0rd!with spaces"
    options = {"password": password, "ssl_cert_data": PEM_CERT, "ssl_key_data": PEM_KEY, "ssl_root_cert_data": PEM_CA}
    location = "postgres://backupuser@db.internal.example:6543/srcdb"
    for argv in all_argvs_for(location, options):
        joined = "\0".join(argv)
        for secret in (password, "supersecretkey", "clientcert", "rootca", "BEGIN"):
            assert secret not in joined, argv
        for setting in ("backupuser", "db.internal.example", "6543", "sslmode", "sslkey", "user=", "host="):
            assert setting not in joined, argv
        flags = {a.split("=", 1)[0] for a in argv}
        assert not flags & {"-h", "--host", "-p", "--port", "-U", "--username", "-W", "--password"}, argv


# --------------------------------------------------------------------------------------------------------------------
# libpq environment


def conn(**kwargs) -> ConnOptions:
    return ConnOptions(host="db.example.com", port=6543, username="bob", password="s3cret", **kwargs)


def test_env_carries_connection_and_drops_inherited_libpq_vars() -> None:
    base = {"PATH": "/bin", "HOME": "/h", "PGPASSWORD": "stale", "PGSERVICE": "prod", "PGOPTIONS": "-c x=y"}
    base |= {"PGSYSCONFDIR": "/etc/pg", "PGTARGETSESSIONATTRS": "read-write"}
    with ssl_files(conn()) as files:
        env = libpq_env(conn(), files, base_env=base)
    assert env == {
        "PATH": "/bin",
        "HOME": "/h",
        "PGHOST": "db.example.com",
        "PGPORT": "6543",
        "PGUSER": "bob",
        "PGPASSWORD": "s3cret",
        "PGSSLMODE": "prefer",
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": "pgplakar",
    }


def test_env_minimal_options_and_database() -> None:
    with ssl_files(ConnOptions()) as files:
        env = libpq_env(ConnOptions(ssl_mode="require"), files, database="my db", base_env={})
    assert env == {
        "PGHOST": "localhost",
        "PGPORT": "5432",
        "PGSSLMODE": "require",
        "PGCONNECT_TIMEOUT": "10",
        "PGAPPNAME": "pgplakar",
        "PGDATABASE": "my db",
    }


def test_env_is_an_allowlist_of_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "inherited")
    kept = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "LC_MESSAGES": "C", "TZ": "UTC",
            "HOME": "/home/x", "TMPDIR": "/tmp/x"}
    secrets = {"AIRFLOW_CONN_PG": "postgres://u:pw@h/db", "AIRFLOW_VAR_X": "v", "PGPLAKAR_PASSPHRASE": "pp",
               "PGPLAKAR_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
               "AWS_CONTAINER_AUTHORIZATION_TOKEN": "ecs-token", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/irsa",
               "SECRET_X": "random", "SOME_TEST_MARKER": "dropped", "PGSYSCONFDIR": "/etc/pg", "PGSERVICE": "prod"}
    for k, v in {**kept, **secrets}.items():
        monkeypatch.setenv(k, v)
    with tool_environment(ConnOptions()) as env:
        assert "PGPASSWORD" not in env
        assert {k: env[k] for k in kept} == kept
        assert not set(env) & set(secrets), "only allowlisted variables of the calling process reach tools"
        assert not set(env) & (LIBPQ_ENV_VARS - {"PGHOST", "PGPORT", "PGSSLMODE", "PGCONNECT_TIMEOUT", "PGAPPNAME"})
    assert base_tool_env({"PATH": "/bin", "LC_CTYPE": "C", "LCX": "no", "XPATH": "no"}) == {"PATH": "/bin",
                                                                                             "LC_CTYPE": "C"}


def test_env_iam_token_is_the_password() -> None:
    iam = ConnOptions(host="rds", username="iam", iam=True, region="us-east-1", ssl_mode="require")
    with tool_environment(iam, password="token-abc", base_env={}) as env:
        assert env["PGPASSWORD"] == "token-abc" and env["PGUSER"] == "iam"
    with pytest.raises(ValueError, match="IAM token"):
        with tool_environment(iam, base_env={}):
            pass


def test_env_password_override() -> None:
    with tool_environment(conn(), password="other", base_env={}) as env:
        assert env["PGPASSWORD"] == "other"


def test_inline_pem_is_private_and_removed(tmp_path: Path) -> None:
    opts = conn(ssl_mode="verify-full", ssl_cert_data=PEM_CERT, ssl_key_data=PEM_KEY, ssl_root_cert_data=PEM_CA)
    with tool_environment(opts, base_env={}, tmp_root=str(tmp_path)) as env:
        paths = [env["PGSSLCERT"], env["PGSSLKEY"], env["PGSSLROOTCERT"]]
        (tmpdir,) = {os.path.dirname(p) for p in paths}
        assert os.path.dirname(tmpdir) == str(tmp_path)
        assert stat.S_IMODE(os.stat(tmpdir).st_mode) == 0o700
        for path, content in zip(paths, (PEM_CERT, PEM_KEY, PEM_CA), strict=True):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert Path(path).read_text() == content
        assert env["PGSSLMODE"] == "verify-full"
    assert not os.path.exists(tmpdir)
    assert list(tmp_path.iterdir()) == []


def test_inline_pem_removed_on_exception(tmp_path: Path) -> None:
    opts = conn(ssl_cert_data=PEM_CERT, ssl_key_data=PEM_KEY)
    with pytest.raises(RuntimeError, match="tool failed"):
        with tool_environment(opts, base_env={}, tmp_root=str(tmp_path)) as env:
            assert os.path.isfile(env["PGSSLKEY"])
            raise RuntimeError("tool failed")
    assert list(tmp_path.iterdir()) == []


def test_inline_pem_removed_when_materialising_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_pgplakar.pg import secrets

    real_write = secrets._write_private

    def fail_on_key(path: str, data: str) -> None:
        if path.endswith("key.pem"):
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(secrets, "_write_private", fail_on_key)
    with pytest.raises(OSError, match="No space"):
        with ssl_files(conn(ssl_cert_data=PEM_CERT, ssl_key_data=PEM_KEY), tmp_root=str(tmp_path)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_no_temp_dir_without_inline_data(tmp_path: Path) -> None:
    with ssl_files(conn(), tmp_root=str(tmp_path)) as files:
        assert (files.cert, files.key, files.root_cert) == (None, None, None)
        assert list(tmp_path.iterdir()) == []


def test_path_form_files_are_checked_and_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.pem").write_text(PEM_CERT)
    (tmp_path / "k.pem").write_text(PEM_KEY)
    (tmp_path / "k.pem").chmod(0o600)
    monkeypatch.chdir(tmp_path)
    with tool_environment(conn(ssl_cert="c.pem", ssl_key="k.pem", ssl_root_cert_data=PEM_CA), base_env={}) as env:
        assert env["PGSSLCERT"] == str(tmp_path / "c.pem")
        assert env["PGSSLKEY"] == str(tmp_path / "k.pem")
        assert Path(env["PGSSLROOTCERT"]).read_text() == PEM_CA


def test_missing_path_form_file_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="^ssl_root_cert: cannot read"):
        with ssl_files(conn(ssl_root_cert=str(tmp_path / "nope.pem"))):
            pass


def test_directory_as_ssl_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="^ssl_root_cert: .* is not a regular file"):
        with ssl_files(conn(ssl_root_cert=str(tmp_path))):
            pass


def test_group_readable_key_is_refused_before_libpq_sees_it(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text(PEM_CERT)
    key = tmp_path / "k.pem"
    key.write_text(PEM_KEY)
    key.chmod(0o644)
    if os.stat(key).st_uid == 0:
        key.chmod(0o604)  # root may keep 0640; world-readable is refused for everyone
    with pytest.raises(OptionError, match="^ssl_key: .* has permissions 06"):
        with ssl_files(conn(ssl_cert=str(tmp_path / "c.pem"), ssl_key=str(key))):
            pass


def test_env_never_contains_pem_data_only_paths(tmp_path: Path) -> None:
    opts = conn(ssl_cert_data=PEM_CERT, ssl_key_data=PEM_KEY)
    with tool_environment(opts, base_env={}, tmp_root=str(tmp_path)) as env:
        assert not any("supersecretkey" in v for v in env.values())
