"""Failed statements of a psql script are counted over the tool's whole stderr, with bounded memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from airflow_provider_pgplakar.pg import OptionError
from airflow_provider_pgplakar.pg.options import parse_restore_options
from airflow_provider_pgplakar.pg.process import STDERR_TAIL, run_tool
from airflow_provider_pgplakar.pg.restore import GLOBALS_ERRORS_NAMED, script_errors, toc_match


def test_all_errors_counted_beyond_the_tail_and_first_named() -> None:
    # a real process writing far more than the tail kept for messages
    code = ("import sys\nfor i in range(2000):\n"
            "    sys.stderr.write(f'ERROR:  role \"r{i}\" does not exist\\nSTATEMENT:  GRANT r{i} TO app;\\n"
            "NOTICE:  something\\n')")
    with run_tool([sys.executable, "-c", code], {}, stdout=subprocess.DEVNULL) as tool:
        tool.finish()
        assert len(tool.stderr_text()) <= STDERR_TAIL + 1
        found = script_errors(tool.stderr_lines())
    assert found.count == 2000
    assert len(found.named) == GLOBALS_ERRORS_NAMED
    assert found.named[0] == 'GRANT r0 TO app; (role "r0" does not exist)'
    assert found.text().endswith(f"; and {2000 - GLOBALS_ERRORS_NAMED} more")


def test_stderr_lines_are_bounded_per_line() -> None:
    code = "import sys; sys.stderr.write('x' * 3_000_000 + '\\nERROR:  short\\n' + 'y' * 10)"
    with run_tool([sys.executable, "-c", code], {}, stdout=subprocess.DEVNULL) as tool:
        tool.finish()
        lines = list(tool.stderr_lines(max_len=100))
    assert [len(x) for x in lines] == [100, 13, 10]
    assert lines[1] == "ERROR:  short"


def test_password_in_a_failed_statement_is_redacted_and_file_prefix_understood() -> None:
    found = script_errors([
        "psql:/tmp/g.sql:3: ERROR:  role \"x\" does not exist",
        "psql:/tmp/g.sql:3: STATEMENT:  ALTER ROLE x WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:s3cr3t';",
        "ERROR:  permission denied to create role",  # no STATEMENT line follows
    ])
    assert found.count == 2
    assert found.named == ["ALTER ROLE x WITH LOGIN PASSWORD '…'; (role \"x\" does not exist)",
                           "(permission denied to create role)"]


def test_ignore_globals_errors_option() -> None:
    assert parse_restore_options("postgres://u:p@h/", {"ignore_globals_errors": "true"}).ignore_globals_errors
    assert not parse_restore_options("postgres://u:p@h/").ignore_globals_errors
    with pytest.raises(OptionError) as err:
        parse_restore_options("postgres://u:p@h/", {"ignore_globals_errors": "maybe"})
    assert err.value.option == "ignore_globals_errors"


# pg_restore --list lines as PostgreSQL 15 prints them (names with spaces are printed raw)
TOC = [
    ";     dbname: t1",
    "6; 2615 16390 SCHEMA - my schema postgres",
    "216; 1259 16391 TABLE my schema a table postgres",
    "215; 1259 16387 TABLE public items postgres",
    "217; 1259 16394 VIEW public v postgres",
    "218; 1259 16395 SEQUENCE public items_id_seq postgres",
    "219; 0 0 SEQUENCE OWNED BY public items_id_seq postgres",
    "3349; 0 16391 TABLE DATA my schema a table postgres",
    "3350; 0 16396 TABLE DATA public orphan postgres",  # data only: not a relation pg_restore --table selects
]


@pytest.mark.parametrize(
    ("tables", "schemas", "want_tables", "want_schemas"),
    [
        (("items", "v", "items_id_seq", "a table"), (), {"items", "v", "items_id_seq", "a table"}, set()),
        (("nosuch", "orphan", "public", "postgres"), (), set(), set()),
        (("items", "a table"), ("my schema",), {"a table"}, {"my schema"}),  # pg_restore: -t within -n
        ((), ("public", "my schema", "nosuch"), set(), {"public", "my schema"}),
    ],
)
def test_toc_match(tables: tuple[str, ...], schemas: tuple[str, ...], want_tables: set[str],
                   want_schemas: set[str]) -> None:
    found_tables: set[str] = set()
    found_schemas: set[str] = set()
    relations = [toc_match(line, tables, schemas, found_tables, found_schemas) for line in TOC]
    assert (found_tables, found_schemas) == (want_tables, want_schemas)
    assert [r for r in relations if r] == ["my schema a table", "public.items", "public.v", "public.items_id_seq"]
