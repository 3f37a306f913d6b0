"""The PostgreSQL test servers are real and of the advertised major: later pg tests rely on both."""

from __future__ import annotations

import pytest

from tests.pgservers import PG_VERSIONS, PgFactory, PgServer, binary_major


@pytest.mark.parametrize("version", PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def test_server_reports_its_major(version: int, request: pytest.FixtureRequest) -> None:
    server: PgServer = request.getfixturevalue(f"pg{version}")
    with server.connect() as conn:
        num = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        auth = conn.execute("SELECT current_setting('password_encryption')").fetchone()
        wal = conn.execute("SELECT current_setting('wal_level')").fetchone()
    assert num is not None and num[0] // 10000 == version
    assert auth == ("scram-sha-256",)
    assert wal == ("replica",)
    assert server.host == "127.0.0.1" and server.port > 0


@pytest.mark.parametrize("version", PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def test_pg_dump_matches_major(version: int, request: pytest.FixtureRequest) -> None:
    server: PgServer = request.getfixturevalue(f"pg{version}")
    out = server.run("pg_dump", "--version").stdout
    assert f"(PostgreSQL) {version}." in out
    assert binary_major(server.bin("pg_dump")) == version


def test_tools_connect_with_password_from_env(pg17: PgServer) -> None:
    """Client tools authenticate via PGPASSWORD (never argv) and the server demands a password."""
    assert pg17.run("psql", "-XAtc", "SELECT current_user").stdout.strip() == "postgres"
    env = pg17.env()
    del env["PGPASSWORD"]
    env["PGPASSFILE"] = "/nonexistent"
    denied = pg17.run("psql", "-XAtw", "-c", "SELECT 1", env=env, check=False)
    assert denied.returncode != 0
    assert "password" in denied.stderr


def test_factory_gives_private_servers(pg_factory: PgFactory, pg18: PgServer) -> None:
    extra = pg_factory(18, conf={"max_wal_senders": "3"})
    assert extra.port != pg18.port and extra.datadir != pg18.datadir
    with extra.connect() as conn:
        assert conn.execute("SHOW max_wal_senders").fetchone() == ("3",)
    extra.restart()
    with extra.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    extra.stop()
    assert not extra.running
