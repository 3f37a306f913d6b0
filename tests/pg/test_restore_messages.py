"""A failed restore's one line and likely fix, for the option combinations the real-server test
(tests/logical/test_restore_options.py) does not go through. The texts are pg_restore 15's, as ToolFailed wraps them."""

from __future__ import annotations

from airflow_provider_pgplakar.pg.options import RestoreOptions, parse_restore_options
from airflow_provider_pgplakar.pg.process import ToolFailed
from airflow_provider_pgplakar.pg.restore import RecordResult, RestoreFailed, RestoreSummary, brief_detail, failure_hint

EXISTS_STOPPED = str(ToolFailed("pg_restore", 1, (
    "pg_restore: while PROCESSING TOC:\n"
    "pg_restore: from TOC entry 215; 1259 16390 TABLE items app_owner\n"
    'pg_restore: error: could not execute query: ERROR:  relation "items" already exists\n'
    "Command was: CREATE TABLE public.items (\n    id integer NOT NULL\n);\n")))
NO_DATABASE = str(ToolFailed("pg_restore", 1, (
    'pg_restore: error: connection to server on socket "/tmp/.s.PGSQL.5432" failed: FATAL:  database "shop" '
    "does not exist\n")))


def _opts(**options: str) -> RestoreOptions:
    return parse_restore_options("postgres://", {"host": "localhost", **options})


def test_one_error_has_no_count_and_the_fix_fits_the_options() -> None:
    assert brief_detail(EXISTS_STOPPED) == ('pg_restore failed (exit status 1): could not execute query: ERROR: '
                                            'relation "items" already exists')
    assert "recreate=true" in failure_hint(EXISTS_STOPPED, _opts(exit_on_error="true"), "shop")
    # database= cannot go with recreate (refused by the options): only clean is suggested
    assert failure_hint(EXISTS_STOPPED, _opts(database="shop2", databases="shop"), "shop2") == (
        "database 'shop2' already holds these objects: add clean=true to drop them first")
    # nothing to suggest when the fix is already given
    assert failure_hint(EXISTS_STOPPED, _opts(clean="true"), "shop") == ""
    assert failure_hint(NO_DATABASE, _opts(database="shop2", databases="shop"), "shop2") == (
        "create database 'shop2' on the target first")
    assert "add recreate=true to create it" in failure_hint(NO_DATABASE, _opts(), "shop")


def test_the_exception_is_one_line_naming_every_failed_database() -> None:
    summary = RestoreSummary("0123456789abcdef", [
        RecordResult("/00000-globals.sql", None, "restored"),
        RecordResult("/00001-shop.dump", "shop", "failed", NO_DATABASE, failure_hint(NO_DATABASE, _opts(), "shop")),
        RecordResult("/00002-blog.dump", "blog", "failed", "read of /00002-blog.dump failed:\n  pack 1a2b corrupt"),
    ])
    message = str(RestoreFailed(summary, note="-v shows the tools' full output"))
    assert "\n" not in message
    assert message == (
        "restore of snapshot 01234567: 2 of 3 record(s) failed: database 'shop' (/00001-shop.dump): pg_restore failed "
        '(exit status 1): connection to server on socket "/tmp/.s.PGSQL.5432" failed: FATAL: database "shop" does '
        "not exist; likely fix: database 'shop' is missing on the target: add recreate=true to create it from the "
        "archive, or create it first; database 'blog' (/00002-blog.dump): read of /00002-blog.dump failed: pack 1a2b "
        "corrupt (-v shows the tools' full output)")
    assert NO_DATABASE in summary.text()  # the full text, as logged
