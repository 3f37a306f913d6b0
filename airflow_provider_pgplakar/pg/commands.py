"""Pure argv builders, one per client tool: they return ``list[str]`` for ``subprocess`` (never a shell string).

Two rules hold for every builder:

- argv carries no host, port, user, password or SSL setting: those reach the tool through the environment built by
  :mod:`.secrets`, because argv is visible to every local user and lands in logs.
- A database name is passed only as ``--dbname=<conninfo>`` built by ``psycopg.conninfo.make_conninfo``. A bare
  positional name starting with ``-`` would be parsed as an option, and one containing ``=`` or a ``postgresql://``
  prefix would be expanded by libpq as a connection string (both happen in the reference).

Value-taking options use the ``--option=value`` form so that a value starting with ``-`` cannot be taken for a flag.
Every tool gets ``--no-password``: a missing password must fail the task, not hang it on a prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psycopg.conninfo import make_conninfo

__all__ = [
    "dbname_conninfo",
    "pg_dump",
    "pg_dumpall_globals",
    "pg_restore",
    "pg_restore_list",
    "psql_script",
]


def dbname_conninfo(database: str) -> str:
    """A conninfo string that selects exactly ``database`` (quoted as libpq requires) and nothing else."""
    _check_name("database", database)
    return make_conninfo("", dbname=database)


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{what} must be a non-empty string without NUL, got {value!r}")


def _dbname(database: str) -> str:
    return f"--dbname={dbname_conninfo(database)}"


def _file_arg(path: str) -> str:
    # A positional path starting with "-" would be read as an option.
    _check_name("file path", path)
    return f"./{path}" if path.startswith("-") else path


def _exclusive(schema_only: bool, data_only: bool) -> None:
    if schema_only and data_only:
        raise ValueError("schema_only and data_only are mutually exclusive")


def pg_dumpall_globals(tool: str, *, no_role_passwords: bool = False) -> list[str]:
    """``pg_dumpall --globals-only`` (roles, tablespaces) to stdout.

    ``no_role_passwords`` is for restricted superusers (RDS) that cannot read ``pg_authid``; roles then restore
    without passwords. pg_dumpall picks its own maintenance database (``postgres``, then ``template1``).
    """
    argv = [tool, "--globals-only", "--no-password"]
    if no_role_passwords:
        argv.append("--no-role-passwords")
    return argv


def pg_dump(
    tool: str, database: str, *, compress: bool = False, schema_only: bool = False, data_only: bool = False,
    snapshot: str | None = None,
) -> list[str]:
    """``pg_dump -Fc`` of one database to stdout.

    ``-Z0`` unless ``compress``: the store compresses and deduplicates, and pre-compressed dumps defeat both
    (measured: a 1% change re-stores ~82% of a gzip'd dump). ``snapshot`` is an exported snapshot ID
    (``pg_export_snapshot()``) the dump reads in, so fingerprints taken in that snapshot describe the dump exactly.
    """
    _exclusive(schema_only, data_only)
    argv = [tool, "-Fc", "--no-password"]
    if not compress:
        argv.append("-Z0")
    if snapshot is not None:
        if not re.fullmatch(r"[0-9A-Fa-f]+-[0-9A-Fa-f]+(?:-[0-9]+)?", snapshot):
            raise ValueError(f"snapshot must be an exported snapshot ID such as 00000003-0000001B-1, got {snapshot!r}")
        argv.append(f"--snapshot={snapshot}")
    if schema_only:
        argv.append("--schema-only")
    elif data_only:
        argv.append("--data-only")
    argv.append(_dbname(database))
    return argv


def pg_restore(
    tool: str,
    database: str,
    *,
    archive: str | None = None,
    clean: bool = False,
    create: bool = False,
    no_owner: bool = False,
    exit_on_error: bool = False,
    schema_only: bool = False,
    data_only: bool = False,
    jobs: int = 1,
    tables: Sequence[str] = (),
    schemas: Sequence[str] = (),
) -> list[str]:
    """``pg_restore`` of a custom-format archive from ``archive`` (a file) or stdin (None).

    ``database`` is where pg_restore connects: the target database, or with ``create`` the maintenance database
    from which ``CREATE DATABASE`` (named in the archive) is issued. Which database that is, and the "never drop
    ``postgres``" rule, are the caller's policy. ``clean`` adds ``--if-exists`` so a first restore does not fail
    on objects that are not there yet.
    """
    _exclusive(schema_only, data_only)
    if data_only and (clean or create):
        raise ValueError("data_only cannot be combined with clean or create (pg_restore refuses -a with -c)")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and archive is None:
        raise ValueError("pg_restore --jobs needs a seekable archive file, not stdin")
    argv = [tool, "--no-password", _dbname(database)]
    if clean:
        argv += ["--clean", "--if-exists"]
    if create:
        argv.append("--create")
    if no_owner:
        argv.append("--no-owner")
    if exit_on_error:
        argv.append("--exit-on-error")
    if schema_only:
        argv.append("--schema-only")
    elif data_only:
        argv.append("--data-only")
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    for table in tables:
        _check_name("table name", table)
        argv.append(f"--table={table}")
    for schema in schemas:
        _check_name("schema name", schema)
        argv.append(f"--schema={schema}")
    if archive is not None:
        argv.append(_file_arg(archive))
    return argv


def pg_restore_list(tool: str) -> list[str]:
    """``pg_restore --list`` of a custom-format archive on stdin: its table of contents, no server involved."""
    return [tool, "--list"]


def psql_script(tool: str, database: str, *, exit_on_error: bool, script: str | None = None) -> list[str]:
    """``psql`` running a SQL script (the globals) from ``script`` or stdin (None).

    ``-X`` ignores the invoking user's ``~/.psqlrc``, which could change behaviour (the reference honoured it).
    ``ON_ERROR_STOP`` is always explicit: without it psql exits 0 even when statements fail, so ``--echo-errors``
    puts each failed statement on stderr after its error, for the caller to count and name.
    """
    argv = [tool, "-X", "--no-password", "--echo-errors", "-v", f"ON_ERROR_STOP={1 if exit_on_error else 0}",
            _dbname(database)]
    if script is not None:
        _check_name("script path", script)
        argv.append(f"--file={script}")
    return argv
