"""Location URIs (pg/location.py): schemes, percent-decoding, host/port/database, and errors that never echo a
password."""

from __future__ import annotations

import pytest

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.location import parse_location
from tests.pg.test_options import raises_option


def test_location_full_uri_with_percent_decoding() -> None:
    loc = parse_location("postgres://u%40x:p%2Fw%3A%25@db.example.com:6543/sal%20es")
    assert (loc.scheme, loc.host, loc.port, loc.username, loc.password, loc.database) == (
        "postgres",
        "db.example.com",
        6543,
        "u@x",
        "p/w:%",
        "sal es",
    )


@pytest.mark.parametrize(
    ("location", "scheme"),
    [
        ("postgres://h", "postgres"),
        ("postgresql://h", "postgres"),
        ("POSTGRES://h", "postgres"),
        ("postgres+aws://u@h", "postgres+aws"),
        ("postgresql+aws://u@h", "postgres+aws"),
        ("postgres+bin://h", "postgres+bin"),
        ("postgresql+bin://h", "postgres+bin"),
    ],
)
def test_location_schemes(location: str, scheme: str) -> None:
    assert parse_location(location).scheme == scheme


@pytest.mark.parametrize(
    ("location", "host", "port", "database"),
    [
        ("postgres://", None, None, None),
        ("postgres:///", None, None, None),
        ("postgres://h/", "h", None, None),
        ("postgres://h:5433", "h", 5433, None),
        ("postgres://[::1]:5433/db", "::1", 5433, "db"),
        ("postgres://[fe80::1]/db", "fe80::1", None, "db"),
        ("postgres://%2Fvar%2Frun%2FPostgreSQL/db", "/var/run/PostgreSQL", None, "db"),
        ("postgres://h/My%2FDb", "h", None, "My/Db"),
        ("postgres://h/%C3%B1am%C3%A9", "h", None, "ñamé"),
        ("postgres://h/-dash", "h", None, "-dash"),
    ],
)
def test_location_host_port_database(location: str, host: str | None, port: int | None, database: str | None) -> None:
    loc = parse_location(location)
    assert (loc.host, loc.port, loc.database) == (host, port, database)


def test_location_empty_password_is_present_but_unset() -> None:
    loc = parse_location("postgres://u:@h")
    assert loc.username == "u" and loc.password is None and loc.has_password


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("", "required"),
        ("db.example.com", "expected postgres://"),
        ("mysql://h/db", "unsupported scheme 'mysql'"),
        ("postgres://h/db?sslmode=require", "query strings"),
        ("postgres://h/db#frag", "query strings"),
        ("postgres://h:99999/db", "port must be"),
        ("postgres://h:0/db", "port must be"),
        ("postgres://h:abc/db", "port must be"),
        ("postgres://::1/db", "IPv6 hosts must be written in brackets"),
        ("postgres://[::1/db", "unterminated"),
        ("postgres://[::1]x/db", "unexpected text"),
        ("postgres://h/a/b", "single database name"),
        ("postgres://h/%FF", "percent-encoding"),
    ],
)
def test_location_errors(location: str, match: str) -> None:
    with raises_option("location", match):
        parse_location(location)


def test_location_errors_never_echo_the_password() -> None:
    # An unencoded "/" in the password cuts the authority short, so part of it lands where the port goes.
    with pytest.raises(OptionError) as info:
        parse_location("postgres://user:s3cr/et@h/db")
    assert "s3cr" not in str(info.value)
    assert "percent-encode" in str(info.value)
