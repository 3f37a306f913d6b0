"""Option parsing (pg/options.py): names, defaults and precedence; every invalid value refused up front."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.location import parse_location
from airflow_provider_pgplakar.pg.options import (
    ConnOptions,
    LogicalSourceOptions,
    PhysicalSourceOptions,
    RestoreOptions,
    parse_restore_options,
    parse_server_compression,
    parse_source_options,
)

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEsecretkeymaterial\n-----END PRIVATE KEY-----\n"
AWS = "postgres+aws://iamuser@db.abc.us-east-1.rds.amazonaws.com/app"


@contextmanager
def raises_option(option: str, match: str | None = None) -> Iterator[pytest.ExceptionInfo[OptionError]]:
    """Expect an OptionError about ``option``: on the attribute and as the message prefix."""
    with pytest.raises(OptionError, match=match) as info:
        yield info
    assert info.value.option == option, str(info.value)
    assert str(info.value).startswith(f"{option}: ")


# --------------------------------------------------------------------------------------------------------------------
# postgres:// source


def test_logical_defaults() -> None:
    opts = parse_source_options("postgres://h")
    assert isinstance(opts, LogicalSourceOptions)
    assert opts.scheme == "postgres"
    assert opts.conn == ConnOptions(host="h")
    assert opts.conn.port == 5432 and opts.conn.ssl_mode == "prefer"
    assert opts.conn.username is None and opts.conn.password is None
    assert (opts.database, opts.exclude_databases) == (None, ())
    assert (opts.compress, opts.schema_only, opts.data_only, opts.pg_bin_dir) == (False, False, False, None)


def test_logical_defaults_without_host_is_localhost() -> None:
    opts = parse_source_options("postgres://", {})
    assert (opts.conn.host, opts.conn.port) == ("localhost", 5432)


def test_logical_explicit_options_override_uri() -> None:
    opts = parse_source_options(
        "postgres://uriuser:uripw@urihost:1111/uridb",
        {"host": "opthost", "port": "2222", "username": "optuser", "password": "optpw", "database": "optdb"},
    )
    assert (opts.conn.host, opts.conn.port, opts.conn.username, opts.conn.password, opts.database) == (
        "opthost",
        2222,
        "optuser",
        "optpw",
        "optdb",
    )


def test_logical_empty_option_values_mean_unset() -> None:
    opts = parse_source_options(
        "postgres://u:pw@urihost:1111/uridb", {"host": "", "port": "", "username": "", "password": "", "database": ""}
    )
    assert (opts.conn.host, opts.conn.port, opts.conn.username, opts.conn.password, opts.database) == (
        "urihost",
        1111,
        "u",
        "pw",
        "uridb",
    )


def test_logical_all_options() -> None:
    opts = parse_source_options(
        "postgres://h",
        {
            "exclude_databases": " a, b ,,a",
            "compress": "TRUE",
            "schema_only": "yes",
            "pg_bin_dir": "/opt/pg/18/bin",
            "ssl_mode": "verify-full",
            "ssl_cert": "/c.pem",
            "ssl_key": "/k.pem",
            "ssl_root_cert_data": PEM_CERT,
        },
    )
    assert opts.exclude_databases == ("a", "b")
    assert opts.compress and opts.schema_only and not opts.data_only
    assert opts.pg_bin_dir == "/opt/pg/18/bin"
    assert (opts.conn.ssl_mode, opts.conn.ssl_cert, opts.conn.ssl_key) == ("verify-full", "/c.pem", "/k.pem")
    assert opts.conn.ssl_root_cert_data == PEM_CERT


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("1", True), ("YES", True), (" yes ", True)]
    + [("false", False), ("FALSE", False), ("0", False), ("No", False)],
)
def test_booleans(text: str, value: bool) -> None:
    assert parse_source_options("postgres://h", {"compress": text}).compress is value


@pytest.mark.parametrize(("text", "level"), [(None, "catalog"), ("counts", "counts"), (" FULL ", "full")])
def test_fingerprint_levels(text: str | None, level: str) -> None:
    options = {} if text is None else {"fingerprint": text}
    assert parse_source_options("postgres://h", options).fingerprint == level


def test_bad_fingerprint_level() -> None:
    with raises_option("fingerprint", "accepted: catalog, counts, full"):
        parse_source_options("postgres://h", {"fingerprint": "digest"})


@pytest.mark.parametrize("text", ["t", "f", "on", "off", "2", "truthy", "y"])
def test_bad_booleans(text: str) -> None:
    with raises_option("compress", "invalid boolean"):
        parse_source_options("postgres://h", {"compress": text})


@pytest.mark.parametrize(
    ("options", "option", "match"),
    [
        ({"schema_only": "true", "data_only": "true"}, "schema_only", "mutually exclusive"),
        ({"port": "abc"}, "port", "invalid integer"),
        ({"port": "-1"}, "port", "invalid integer"),
        ({"port": "0"}, "port", "out of range"),
        ({"port": "65536"}, "port", "out of range"),
        ({"ssl_mode": "required"}, "ssl_mode", "accepted: disable, allow"),
        ({"ssl_mode": "REQUIRE"}, "ssl_mode", "invalid value"),
        ({"ssl_cert": "/c.pem"}, "ssl_key", "needs its private key"),
        ({"ssl_cert_data": PEM_CERT}, "ssl_key", "needs its private key"),
        ({"ssl_key": "/k.pem"}, "ssl_cert", "needs its client certificate"),
        ({"ssl_cert": "/c", "ssl_cert_data": PEM_CERT, "ssl_key": "/k"}, "ssl_cert", "mutually exclusive"),
        ({"ssl_cert": "/c", "ssl_key": "/k", "ssl_key_data": PEM_KEY}, "ssl_key", "mutually exclusive"),
        ({"ssl_root_cert": "/r", "ssl_root_cert_data": PEM_CERT}, "ssl_root_cert", "mutually exclusive"),
        ({"ssl_root_cert_data": "/etc/ssl/ca.pem"}, "ssl_root_cert_data", "does not look like PEM"),
        ({"ssl_mode": "disable", "ssl_root_cert": "/r"}, "ssl_mode", "contradicts"),
        ({"host": "a,b"}, "host", "multiple hosts"),
        ({"database": "a\0b"}, "database", "NUL"),
        ({"exclude_databases": "app", "database": "app"}, "exclude_databases", "excludes the selected database"),
        ({"bogus": "1"}, "bogus", "unknown option"),
        ({"region": "us-east-1"}, "region", "not accepted by a postgres:// source"),
        ({"checkpoint": "fast"}, "checkpoint", "valid for: postgres\\+bin:// source"),
        ({"clean": "true"}, "clean", "valid for: postgres:// restore"),
        ({"location": "postgres://x"}, "location", "own argument"),
        ({"compress": True}, "compress", "must be a string"),
    ],
)
def test_logical_errors(options: dict, option: str, match: str) -> None:
    with raises_option(option, match):
        parse_source_options("postgres://h", options)


def test_uri_database_in_excludes_is_contradictory() -> None:
    with raises_option("exclude_databases"):
        parse_source_options("postgres://h/app", {"exclude_databases": "x,app"})


def test_other_excludes_with_single_database_are_allowed() -> None:
    # The seed: exclusions have no effect when a single database is selected.
    opts = parse_source_options("postgres://h/app", {"exclude_databases": "other"})
    assert opts.database == "app" and opts.exclude_databases == ("other",)


def test_options_must_be_a_mapping() -> None:
    with raises_option("options"):
        parse_source_options("postgres://h", [("compress", "true")])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# postgres+aws:// source


def test_aws_defaults() -> None:
    opts = parse_source_options(AWS, {"region": "us-east-1", "ssl_mode": "require"})
    assert isinstance(opts, LogicalSourceOptions)
    assert opts.scheme == "postgres+aws"
    assert opts.conn.iam and opts.conn.region == "us-east-1"
    assert opts.conn.username == "iamuser" and opts.conn.password is None
    assert opts.database == "app"
    assert opts.exclude_databases == ("rdsadmin",)


def test_aws_username_from_options() -> None:
    opts = parse_source_options("postgres+aws://h", {"region": "eu-west-3", "username": "bob"})
    assert opts.conn.username == "bob"


def test_aws_explicit_empty_exclude_disables_default() -> None:
    opts = parse_source_options(AWS, {"region": "us-east-1", "exclude_databases": ""})
    assert opts.exclude_databases == ()


def test_aws_explicit_exclude_replaces_default() -> None:
    opts = parse_source_options(AWS, {"region": "us-east-1", "exclude_databases": "a,b"})
    assert opts.exclude_databases == ("a", "b")


@pytest.mark.parametrize(
    ("location", "options", "option", "match"),
    [
        (AWS, {"region": "Virginia"}, "region", "not an AWS region"),
        ("postgres+aws://h/app", {"region": "us-east-1"}, "username", "IAM-enabled"),
        ("postgres+aws://u:pw@h/app", {"region": "us-east-1"}, "location", "IAM token; remove the password"),
        ("postgres+aws://u:@h/app", {"region": "us-east-1"}, "location", "remove the password"),
        (AWS, {"region": "us-east-1", "password": "pw"}, "password", "IAM token"),
        (AWS, {"region": "us-east-1", "password": ""}, "password", "IAM token"),
        (AWS, {"region": "us-east-1", "ssl_mode": "disable"}, "ssl_mode", "requires SSL"),
        ("postgres+aws://u@h/rdsadmin", {"region": "us-east-1"}, "exclude_databases", "rdsadmin"),
    ],
)
def test_aws_errors(location: str, options: dict, option: str, match: str) -> None:
    with raises_option(option, match):
        parse_source_options(location, options)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-3", "us-gov-west-1", "cn-north-1", "ap-southeast-4"])
def test_aws_regions(region: str) -> None:
    assert parse_source_options(AWS, {"region": region}).conn.region == region


# --------------------------------------------------------------------------------------------------------------------
# postgres+bin:// source


def test_bin_defaults() -> None:
    opts = parse_source_options("postgres+bin://replicator:pw@h")
    assert isinstance(opts, PhysicalSourceOptions)
    assert opts.scheme == "postgres+bin"
    assert (opts.conn.username, opts.conn.password, opts.checkpoint, opts.max_rate) == (
        "replicator",
        "pw",
        "spread",
        None,
    )


@pytest.mark.parametrize(("text", "kb"), [("32", 32), ("100k", 100), ("100M", 102400), ("1024M", 1048576)])
def test_bin_max_rate(text: str, kb: int) -> None:
    assert parse_source_options("postgres+bin://h", {"max_rate": text}).max_rate == kb


def test_bin_checkpoint_fast() -> None:
    assert parse_source_options("postgres+bin://h/", {"checkpoint": "fast"}).checkpoint == "fast"


@pytest.mark.parametrize(
    ("text", "stored", "wanted"),
    [(None, "auto", ("lz4", None, True)), ("auto", "auto", ("lz4", None, True)), ("none", "none", (None, None, False)),
     ("lz4", "lz4", ("lz4", None, False)), ("ZSTD", "zstd", ("zstd", None, False)),
     ("zstd:19", "zstd:19", ("zstd", 19, False)), (" lz4:1 ", "lz4:1", ("lz4", 1, False))],
)
def test_bin_server_compression(text: str | None, stored: str, wanted: tuple) -> None:
    opts = parse_source_options("postgres+bin://h", {} if text is None else {"server_compression": text})
    assert opts.server_compression == stored
    assert opts.compression_request() == wanted
    if wanted[0] is not None and stored != "auto":
        assert parse_server_compression(stored) == wanted[:2]


@pytest.mark.parametrize(
    ("location", "options", "option", "match"),
    [
        ("postgres+bin://h/mydb", {}, "location", "whole cluster; remove the database path /mydb"),
        ("postgres+bin://h", {"database": "x"}, "database", "not accepted by a postgres\\+bin:// source"),
        ("postgres+bin://h", {"compress": "true"}, "compress", "not accepted"),
        ("postgres+bin://h", {"region": "us-east-1"}, "region", "not accepted"),
        ("postgres+bin://h", {"checkpoint": "immediate"}, "checkpoint", "accepted: fast, spread"),
        ("postgres+bin://h", {"max_rate": "10"}, "max_rate", "out of range"),
        ("postgres+bin://h", {"max_rate": "2048M"}, "max_rate", "out of range"),
        ("postgres+bin://h", {"max_rate": "10G"}, "max_rate", "invalid rate"),
        ("postgres+bin://h", {"max_rate": "1.5M"}, "max_rate", "invalid rate"),
        ("postgres+bin://h", {"server_compression": "gzip"}, "server_compression", "invalid method 'gzip'"),
        ("postgres+bin://h", {"server_compression": "zstd:0"}, "server_compression", "out of range \\(1..22\\)"),
        ("postgres+bin://h", {"server_compression": "lz4:13"}, "server_compression", "out of range \\(1..12\\)"),
        ("postgres+bin://h", {"server_compression": "lz4:x"}, "server_compression", "invalid level 'x'"),
    ],
)
def test_bin_errors(location: str, options: dict, option: str, match: str) -> None:
    with raises_option(option, match):
        parse_source_options(location, options)


# --------------------------------------------------------------------------------------------------------------------
# Restore destination


def test_restore_defaults() -> None:
    opts = parse_restore_options("postgres://postgres:secret@db.example.com/myapp")
    assert isinstance(opts, RestoreOptions)
    assert opts.database == "myapp"
    assert opts.databases == opts.tables == opts.schemas == ()
    assert not any((opts.clean, opts.recreate, opts.no_globals, opts.no_owner, opts.exit_on_error))
    assert not (opts.schema_only or opts.data_only)
    assert opts.jobs == 1 and opts.pg_bin_dir is None


def test_restore_all_options() -> None:
    opts = parse_restore_options(
        "postgres://h/",
        {
            "databases": "app",
            "recreate": "true",
            "no_globals": "1",
            "no_owner": "yes",
            "schema_only": "true",
            "exit_on_error": "true",
            "tables": "users, orders",
            "schemas": "public,Billing",
            "jobs": "4",
            "pg_bin_dir": "/opt/pg/bin",
        },
    )
    assert opts.databases == ("app",)
    assert opts.recreate and opts.no_globals and opts.no_owner and opts.schema_only and opts.exit_on_error
    assert opts.tables == ("users", "orders") and opts.schemas == ("public", "Billing")
    assert opts.jobs == 4 and opts.pg_bin_dir == "/opt/pg/bin"


def test_restore_database_with_single_filter_is_fine() -> None:
    opts = parse_restore_options("postgres://h/target", {"databases": "source", "clean": "true"})
    assert (opts.database, opts.databases, opts.clean) == ("target", ("source",), True)


def test_restore_aws() -> None:
    opts = parse_restore_options("postgres+aws://u@h/app", {"region": "us-east-1", "no_owner": "true"})
    assert opts.scheme == "postgres+aws" and opts.conn.iam and opts.no_owner


@pytest.mark.parametrize(
    ("location", "options", "option", "match"),
    [
        ("postgres://h", {"clean": "true", "recreate": "true"}, "clean", "mutually exclusive"),
        ("postgres://h", {"schema_only": "1", "data_only": "1"}, "schema_only", "mutually exclusive"),
        ("postgres://h/db", {"data_only": "1", "clean": "1"}, "data_only", "clean"),
        ("postgres://h", {"data_only": "1", "recreate": "1"}, "data_only", "recreate"),
        ("postgres://h/db", {"recreate": "true"}, "location", "remove the database path /db"),
        ("postgres://h", {"database": "db", "recreate": "true"}, "database", "not used with recreate"),
        ("postgres://h/db", {"databases": "a,b"}, "databases", "2 databases would all be restored into 'db'"),
        ("postgres://h", {"jobs": "0"}, "jobs", "out of range"),
        ("postgres://h", {"jobs": "two"}, "jobs", "invalid integer"),
        ("postgres://h", {"jobs": "-2"}, "jobs", "invalid integer"),
        ("postgres://h", {"no_owner": "maybe"}, "no_owner", "invalid boolean"),
        ("postgres://h", {"compress": "true"}, "compress", "valid for: postgres:// source"),
        ("postgres://h", {"exclude_databases": "x"}, "exclude_databases", "not accepted by a postgres:// restore"),
        ("postgres://h", {"checkpoint": "fast"}, "checkpoint", "not accepted"),
        ("postgres://h", {"create_db": "true"}, "create_db", "unknown option"),
        ("postgres+aws://u@h", {"region": "us-east-1", "password": "x"}, "password", "IAM token"),
        ("postgres+aws://h", {"region": "us-east-1"}, "username", "IAM-enabled"),
        ("postgres+bin://h", {}, "location", "file destination"),
    ],
)
def test_restore_errors(location: str, options: dict, option: str, match: str) -> None:
    with raises_option(option, match):
        parse_restore_options(location, options)


# --------------------------------------------------------------------------------------------------------------------
# Direct construction gets the same checks


@pytest.mark.parametrize(
    ("factory", "option"),
    [
        (lambda: ConnOptions(port=70000), "port"),
        (lambda: ConnOptions(port="5432"), "port"),
        (lambda: ConnOptions(port=True), "port"),
        (lambda: ConnOptions(host=""), "host"),
        (lambda: ConnOptions(ssl_mode="on"), "ssl_mode"),
        (lambda: ConnOptions(iam=True, region="us-east-1"), "username"),
        (lambda: ConnOptions(region="us-east-1", username="u"), "region"),
        (lambda: ConnOptions(iam=True, region="us-east-1", username="u", password="p"), "password"),
        (lambda: LogicalSourceOptions(conn=ConnOptions(), compress="yes"), "compress"),
        (lambda: LogicalSourceOptions(conn=ConnOptions(), exclude_databases="a,b"), "exclude_databases"),
        (lambda: LogicalSourceOptions(conn="postgres://h"), "conn"),
        (lambda: LogicalSourceOptions(conn=ConnOptions(), database=""), "database"),
        (lambda: PhysicalSourceOptions(conn=ConnOptions(), max_rate=1), "max_rate"),
        (lambda: PhysicalSourceOptions(conn=ConnOptions(), server_compression="brotli"), "server_compression"),
        (lambda: PhysicalSourceOptions(conn=ConnOptions(iam=True, username="u")), "location"),
        (lambda: RestoreOptions(conn=ConnOptions(), jobs=0), "jobs"),
        (lambda: RestoreOptions(conn=ConnOptions(), tables=("",)), "tables"),
        (lambda: RestoreOptions(conn=ConnOptions(), clean=True, recreate=True), "clean"),
    ],
)
def test_direct_construction_is_validated(factory, option: str) -> None:
    with raises_option(option):
        factory()


def test_direct_construction_normalises_sequences_to_tuples() -> None:
    opts = RestoreOptions(conn=ConnOptions(), databases=["a", "b"], tables=["t"])
    assert opts.databases == ("a", "b") and opts.tables == ("t",)
    assert LogicalSourceOptions(conn=ConnOptions(), exclude_databases=["x"]).exclude_databases == ("x",)
    assert LogicalSourceOptions(conn=ConnOptions(iam=True, username="u")).exclude_databases == ("rdsadmin",)


def test_options_are_frozen() -> None:
    opts = parse_source_options("postgres://h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.database = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------------------
# Redaction


def test_repr_and_redacted_never_show_secrets() -> None:
    opts = parse_source_options(
        "postgres://alice:hunter2-%40pw@h/db",
        {"ssl_cert_data": PEM_CERT, "ssl_key_data": PEM_KEY, "ssl_root_cert_data": PEM_CERT},
    )
    texts = [repr(opts), str(opts), repr(opts.conn), str(opts.redacted()), opts.conn.redacted_uri("postgres", "db")]
    for text in texts:
        assert "hunter2" not in text
        assert "secretkeymaterial" not in text and "MIIBcert" not in text
    assert opts.redacted()["conn"]["password"] == "***"
    assert opts.conn.redacted()["ssl_key_data"] == "<inline PEM>"
    assert "alice" in repr(opts)  # the user name is not secret and helps debugging


def test_restore_and_physical_repr_are_redacted() -> None:
    restore = parse_restore_options("postgres://u:topsecret@h/db")
    physical = parse_source_options("postgres+bin://u:topsecret@h")
    assert "topsecret" not in repr(restore) and "topsecret" not in repr(physical)
    assert "topsecret" not in repr(parse_location("postgres://u:topsecret@h"))


def test_redacted_uri() -> None:
    conn = ConnOptions(host="db.example.com", port=6543, username="u@x", password="pw")
    assert conn.redacted_uri("postgres", "my db") == "postgres://u%40x@db.example.com:6543/my%20db"
    assert ConnOptions(host="::1").redacted_uri() == "postgres://[::1]:5432"


def test_option_error_is_a_value_error_naming_the_option() -> None:
    err = OptionError("port", "bad")
    assert isinstance(err, ValueError)
    assert (err.option, err.message, str(err)) == ("port", "bad", "port: bad")


def test_pg_layer_imports_neither_airflow_nor_the_store() -> None:
    # The CLI and tests rely on pg/ being importable without Airflow (slow to import) or the store.
    code = (
        "import sys\n"
        "import airflow_provider_pgplakar.pg.commands, airflow_provider_pgplakar.pg.options\n"
        "import airflow_provider_pgplakar.pg.secrets, airflow_provider_pgplakar.pg.tools\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'airflow'\n"
        "       or m.startswith('airflow_provider_pgplakar.store')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # noqa: S603 - fixed argv, no shell
