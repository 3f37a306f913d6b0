"""Logical restore: a snapshot's globals through ``psql -X`` and its dumps through ``pg_restore``, streamed from the
store to the tools' stdin (staged to a private temp file only for ``jobs > 1``, which needs a seekable archive).

Policy beyond the reference:

- ``postgres`` and ``template1`` are never dropped: with ``recreate`` they are restored in place with
  ``--clean --if-exists`` (the reference failed on template1). Other databases are dropped and created from the
  archive (``--create``), which works on a fresh server.
- Globals: ``CREATE ROLE`` of a role that already exists on the target (the bootstrap superuser always does) is
  skipped, and the ``ALTER ROLE`` that follows applies its attributes, so ``exit_on_error`` is usable on a
  non-empty server (it practically always failed in the reference). The password of the role the restore logs in
  as is kept: replaying the source's password hash would lock the restore (and its operator) out mid-way.
- Contradictions are refused before anything runs (see :class:`RestoreOptions`), and so is pouring every dump of a
  multi-database snapshot into one ``database`` without a ``databases`` filter.
- Every record gets a result; the summary lists what was restored and what failed, and any failure raises
  :class:`RestoreFailed` after the rest was attempted (or at once with ``exit_on_error``). Its message is one line:
  per failed record the database, the tool's first error, how many more, and the likely fix (``recreate=true`` or
  ``clean=true`` for objects that already exist, creating a database missing on the target); the tool's full
  output is in the record's ``detail`` and in the summary logged at INFO. A globals script with
  failing statements is a failed record (psql itself exits 0): its statements are counted over psql's whole stderr
  and the first few are named, unless ``ignore_globals_errors`` accepts them (they are still named).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from ..store.progress import Progress
from ..store.record import Record, RecordKind
from . import PgError, commands
from .fingerprint import FINGERPRINTS_PATH
from .iam import password_source
from .options import RestoreOptions
from .process import ToolFailed, check_cancelled, run_tool
from .secrets import ssl_files
from .session import GLOBALS_PATH, LOGICAL_KIND, MANIFEST_PATH, PasswordSource, Session, database_from_path

if TYPE_CHECKING:
    from ..store.repo import Store

log = logging.getLogger(__name__)

NEVER_DROPPED = ("postgres", "template1")
_IDENT = r'("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_CREATE_ROLE = re.compile(rf"^CREATE ROLE {_IDENT};\s*$")
_ALTER_ROLE = re.compile(rf"^ALTER ROLE {_IDENT} WITH ")
_PASSWORD = re.compile(r" PASSWORD '(?:[^']|'')*'")
_VERSION = re.compile(r"\)\s+(\d+)")
# psql's messages with --echo-errors: "ERROR:  ..." then "STATEMENT:  ..." (prefixed psql:FILE:LINE: with --file)
_PSQL_ERROR = re.compile(r"^(?:psql:.*?:\d+: )?(?:ERROR|FATAL):\s+(.*)")
_PSQL_STATEMENT = re.compile(r"^(?:psql:.*?:\d+: )?STATEMENT:\s+(.*)")
GLOBALS_ERRORS_NAMED = 10  # failed statements named in the summary; all are counted
_PASSWORD_ECHOED = re.compile(r" PASSWORD '(?:[^']|'')*(?:'|$)")  # also when the echoed line was cut
# pg_restore --list entries: "ID; TABLEOID OID DESC SCHEMA NAME OWNER" (DESC may be several words)
_TOC_ENTRY = re.compile(r"^\d+; \d+ \d+ (.+)$")
# what pg_restore --table selects ("table" includes views, materialized views, sequences and foreign tables)
_TABLE_DESCS = ("TABLE", "VIEW", "MATERIALIZED VIEW", "SEQUENCE", "FOREIGN TABLE")
_NOT_RELATIONS = ("TABLE DATA ", "TABLE ATTACH ", "SEQUENCE SET ", "SEQUENCE OWNED BY ")  # about a relation
_SCHEMA_MEMBER_DESCS = _TABLE_DESCS + ("TABLE DATA", "FUNCTION", "PROCEDURE", "AGGREGATE", "TYPE", "DOMAIN",
                                       "INDEX", "CONSTRAINT", "SEQUENCE SET", "COLLATION", "OPERATOR")
# pg_restore's stderr: "pg_restore: error: ..." per failure, a final count when it went on past errors
_TOOL_ERROR = re.compile(r"(?:^|: )pg_restore: error: (.*)")
_ERRORS_IGNORED = re.compile(r"errors ignored on restore: (\d+)")
_NO_DATABASE = re.compile(r'database "(?:[^"]|"")*" does not exist')


@dataclass
class RecordResult:
    path: str
    database: str | None
    status: str  # restored | skipped | failed
    detail: str = ""  # a failure's full text (a tool's stderr included)
    hint: str = ""  # the likely fix of a failure, when one is known

    def brief(self) -> str:
        """The failure in one line: the database, the tool's first error and how many more, the likely fix."""
        what = f"database {self.database!r} ({self.path})" if self.database else self.path
        return f"{what}: {brief_detail(self.detail)}" + (f"; likely fix: {self.hint}" if self.hint else "")


@dataclass
class RestoreSummary:
    snapshot_id: str
    results: list[RecordResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def text(self) -> str:
        lines = [f"restore of snapshot {self.snapshot_id[:8]}:"]
        for r in self.results:
            what = r.path + (f" → {r.database}" if r.database else "")
            lines.append(f"  {r.status:8} {what}" + (f": {r.detail}" if r.detail else ""))
            if r.hint:
                lines.append(f"  likely fix: {r.hint}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot_id, "ok": self.ok,
                "records": [r.__dict__ for r in self.results]}


class RestoreFailed(PgError):
    """One line (see the module docstring); ``summary`` holds every record's result and full text. ``note`` is added
    at the end (the CLI says there where the full text is)."""

    def __init__(self, summary: RestoreSummary, note: str = "") -> None:
        self.summary = summary
        failed = [r for r in summary.results if r.status == "failed"]
        super().__init__(f"restore of snapshot {summary.snapshot_id[:8]}: {len(failed)} of {len(summary.results)} "
                         "record(s) failed: " + "; ".join(r.brief() for r in failed) + (f" ({note})" if note else ""))


def brief_detail(detail: str) -> str:
    """A tool's multi-line failure as one line: ``pg_restore failed (exit status 1): <first error> (and N more
    error(s))``; any other text with its whitespace collapsed."""
    lines = detail.splitlines()
    errors = [m.group(1) for line in lines if (m := _TOOL_ERROR.search(line))]
    if not errors:
        return " ".join(detail.split())
    ignored = _ERRORS_IGNORED.search(detail)
    more = max(len(errors), int(ignored.group(1)) if ignored else 0) - 1
    head = lines[0].split(": ", 1)[0]  # "pg_restore failed (exit status 1)" (see process.ToolFailed)
    return f"{head}: {' '.join(errors[0].split())}" + (f" (and {more} more error(s))" if more > 0 else "")


def failure_hint(detail: str, opts: RestoreOptions, target: str) -> str:
    """The likely fix of a failed dump restore, from pg_restore's text and the options that were given."""
    if _NO_DATABASE.search(detail) and not opts.recreate:
        if opts.database is not None:
            return f"create database {target!r} on the target first"
        return (f"database {target!r} is missing on the target: add recreate=true to create it from the archive, "
                "or create it first")
    if "already exists" in detail and not (opts.recreate or opts.clean or opts.data_only):
        if opts.database is not None:  # recreate takes the name from the archive: refused with database=
            return f"database {target!r} already holds these objects: add clean=true to drop them first"
        return (f"database {target!r} already holds these objects: add recreate=true to drop and recreate it, or "
                "clean=true to drop its objects first")
    return ""


@dataclass
class ScriptErrors:
    """Failed statements of a psql script: all counted, the first ``GLOBALS_ERRORS_NAMED`` named."""

    count: int = 0
    named: list[str] = field(default_factory=list)

    def text(self) -> str:
        more = self.count - len(self.named)
        return (f"{self.count} statement(s) failed: " + "; ".join(self.named)
                + (f"; and {more} more" if more > 0 else ""))


def script_errors(lines: Iterable[str], keep: int = GLOBALS_ERRORS_NAMED) -> ScriptErrors:
    """Count psql's ``ERROR:`` lines and name the first ``keep`` as ``statement (error)``; passwords redacted."""
    out = ScriptErrors()
    pending: str | None = None  # the last kept error, waiting for its STATEMENT line
    for line in lines:
        if m := _PSQL_ERROR.match(line):
            out.count += 1
            pending = None
            if len(out.named) < keep:
                pending = m.group(1).strip()
                out.named.append(f"({pending})")
        elif pending is not None and (m := _PSQL_STATEMENT.match(line)):
            statement = _PASSWORD_ECHOED.sub(" PASSWORD '…'", m.group(1).strip())
            out.named[-1] = f"{statement[:200]} ({pending})"
            pending = None
    return out


def _unquote_ident(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _filtered_globals(chunks: Iterator[bytes], existing_roles: set[str], login_role: str) -> Iterator[bytes]:
    """Line-filter the globals script (see the module docstring): skip ``CREATE ROLE`` of existing roles and keep
    the login role's password."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        yield b"".join(_filter_line(line, existing_roles, login_role) + b"\n" for line in lines)
    if rest:
        yield _filter_line(rest, existing_roles, login_role)


def _filter_line(line: bytes, existing: set[str], login_role: str) -> bytes:
    text = line.decode("utf-8", "replace")
    m = _CREATE_ROLE.match(text)
    if m and _unquote_ident(m.group(1)) in existing:
        return b"-- pgplakar: role exists on the target: " + line
    m = _ALTER_ROLE.match(text)
    if m and _unquote_ident(m.group(1)) == login_role and _PASSWORD.search(text):
        log.warning("keeping the password of %s, the role this restore logs in as", login_role)
        return _PASSWORD.sub("", text).encode()
    return line


def counted(chunks: Iterator[bytes], progress: Progress) -> Iterator[bytes]:
    """``chunks`` unchanged, their bytes counted into ``progress`` (closing line once they are all read)."""
    for piece in chunks:
        progress.add(len(piece))
        yield piece
    progress.finish()


def _feed(src: Iterator[bytes], dst: IO[bytes], errors: list[BaseException]) -> None:
    try:
        for piece in src:
            dst.write(piece)
    except BrokenPipeError:
        pass  # the tool exited early (exit_on_error); its status says why
    except BaseException as e:  # an integrity error: the tool must not see a complete-looking archive
        errors.append(e)
    finally:
        try:
            dst.close()
        except BrokenPipeError:
            pass


def _run_with_input(argv: list[str], env: dict[str, str], chunks: Iterator[bytes],
                    on_stderr: Callable[[Iterator[str]], Any] | None = None) -> str:
    """Run a tool feeding ``chunks`` to its stdin from a thread; raise on a failed tool or a failed read.
    ``on_stderr`` gets every stderr line (bounded per line) once the tool has exited, before it is closed."""
    import subprocess

    errors: list[BaseException] = []
    with run_tool(argv, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as tool:
        feeder = threading.Thread(target=_feed, args=(chunks, tool.stdin, errors), daemon=True)
        feeder.start()
        feeder.join()
        if errors:
            tool.kill()
            raise errors[0]
        try:
            return tool.finish()
        finally:
            if on_stderr is not None:
                on_stderr(tool.stderr_lines())


def _archive_major(meta: Mapping[str, Any]) -> int:
    m = _VERSION.search(meta.get("tool") or "")
    return int(m.group(1)) if m else 0


def _plan(records: list[Record], opts: RestoreOptions) -> tuple[Record | None, list[tuple[Record, str]]]:
    globals_rec = None
    dumps: list[tuple[Record, str]] = []
    for rec in records:
        path = rec.path
        if rec.kind != RecordKind.FILE or path in (MANIFEST_PATH, FINGERPRINTS_PATH):
            continue
        if path.endswith(GLOBALS_PATH):  # also below a directory
            globals_rec = rec
        elif path.endswith(".dump"):
            dumps.append((rec, rec.meta.get("database") or database_from_path(path)))
        else:
            raise PgError(f"snapshot holds {path!r}, which is not part of a logical PostgreSQL backup")
    names = [db for _, db in dumps]
    missing = [d for d in opts.databases if d not in names]
    if missing:
        raise PgError(f"databases: {', '.join(map(repr, missing))} not in the snapshot (it has: "
                      f"{', '.join(map(repr, names)) or 'no dumps'})")
    if opts.databases:
        dumps = [(r, db) for r, db in dumps if db in opts.databases]
    if opts.database is not None and len(dumps) > 1:
        raise PgError(f"database: the snapshot has {len(dumps)} dumps; restoring them all into {opts.database!r} "
                      "would mix databases — add databases=<one of them>")
    return globals_rec, dumps


def logical_restore(store: Store, snapshot_id: str, opts: RestoreOptions, *, password: PasswordSource | None = None,
                    extra_dirs: tuple[str, ...] = ()) -> RestoreSummary:
    from .connect import server_version_num

    snap = store.load_snapshot(snapshot_id)
    kind = (snap.header.get("source") or {}).get("kind")
    if kind not in (LOGICAL_KIND, None):
        raise PgError(f"snapshot {snapshot_id[:8]} is a {kind!r} snapshot, not a logical PostgreSQL backup")
    records = list(store.records(snap))
    globals_rec, dumps = _plan(records, opts)
    summary = RestoreSummary(snapshot_id)
    pw = password_source(opts.conn, password)  # postgres+aws: a fresh IAM token per connection and tool run
    with ssl_files(opts.conn) as ssl:
        s = Session(opts.conn, ssl, pw, opts.pg_bin_dir, extra_dirs)
        with s.connect("postgres") as c:
            major = server_version_num(c) // 10000
            existing_roles = {r[0] for r in c.execute("SELECT rolname FROM pg_roles")}
            login_role = c.execute("SELECT current_user").fetchone()[0]
        archive_major = max([_archive_major(r.meta) for r, _ in dumps] + [0])
        _check_selectors(store, s, dumps, opts, max(major, archive_major))  # before any globals, DROP or restore
        if globals_rec is not None and not opts.no_globals and not opts.data_only:
            _restore_globals(store, s, globals_rec, opts, max(major, archive_major), existing_roles, login_role,
                             summary)
        elif globals_rec is not None:
            summary.results.append(RecordResult(globals_rec.path, None, "skipped",
                                                "no_globals" if opts.no_globals else "data_only"))
        for rec, db in dumps:
            check_cancelled()  # a failure recorded for a cancelled database ends the restore here
            _restore_dump(store, s, rec, db, opts, max(major, archive_major), summary)
        check_cancelled()
    log.info("%s", summary.text())
    if not summary.ok:
        raise RestoreFailed(summary)
    return summary


def _stopped(summary: RestoreSummary) -> RestoreFailed:
    """``exit_on_error`` ends the restore at a failure: the full text goes to the log first, as at the end."""
    log.info("%s", summary.text())
    return RestoreFailed(summary)


def _restore_globals(store: Store, s: Session, rec: Record, opts: RestoreOptions, min_major: int,
                     existing_roles: set[str], login_role: str, summary: RestoreSummary) -> None:
    psql = str(s.tool("psql", min_major).path)
    stop = opts.exit_on_error and not opts.ignore_globals_errors
    argv = commands.psql_script(psql, "postgres", exit_on_error=stop)
    found: list[ScriptErrors] = []
    try:
        with store.open_record(rec) as src:
            _run_with_input(argv, s.env(), _filtered_globals(src.iter_chunks(), existing_roles, login_role),
                            on_stderr=lambda lines: found.append(script_errors(lines)))
    except (ToolFailed, PgError) as e:
        # psql echoes failed statements (--echo-errors): name them redacted, never its raw stderr (password hashes)
        named = found[0] if found and found[0].count else None
        detail = (f"psql stopped (exit_on_error): {named.text()}" if named
                  else _PASSWORD_ECHOED.sub(" PASSWORD '…'", str(e)))
        summary.results.append(RecordResult(rec.path, None, "failed", detail))
        if opts.exit_on_error:
            raise _stopped(summary) from None
        return
    errors = found[0] if found else ScriptErrors()
    if not errors.count:
        summary.results.append(RecordResult(rec.path, None, "restored"))
    elif opts.ignore_globals_errors:
        detail = f"{errors.text()} (ignored: ignore_globals_errors=true)"
        log.warning("%s: %s", rec.path, detail)
        summary.results.append(RecordResult(rec.path, None, "restored", detail))
    else:
        detail = f"{errors.text()} (set ignore_globals_errors=true to accept them)"
        summary.results.append(RecordResult(rec.path, None, "failed", detail))
        if opts.exit_on_error:
            raise _stopped(summary)


def _restore_dump(store: Store, s: Session, rec: Record, db: str, opts: RestoreOptions, min_major: int,
                  summary: RestoreSummary) -> None:
    tool = str(s.tool("pg_restore", min_major).path)
    target = opts.database or db
    create = opts.recreate and target not in NEVER_DROPPED
    # recreate: --clean with --create drops the database first (a plain --create fails if it exists); postgres and
    # template1 get --clean only (their objects are dropped and restored in place)
    clean = opts.clean or opts.recreate
    kwargs: dict[str, Any] = dict(clean=clean, create=create, no_owner=opts.no_owner, exit_on_error=opts.exit_on_error,
                  schema_only=opts.schema_only, data_only=opts.data_only, tables=opts.tables, schemas=opts.schemas)
    connect_db = "postgres" if create else target
    log.info("restoring %s into %s", rec.path, target)
    try:
        if opts.schemas and not create and not opts.data_only:
            _create_schemas(s, target, opts.schemas)
        if opts.jobs > 1:
            _restore_staged(store, s, rec, tool, connect_db, opts.jobs, kwargs)
        else:
            with store.open_record(rec) as src:
                _run_with_input(commands.pg_restore(tool, connect_db, **kwargs), s.env(),
                                counted(src.iter_chunks(), Progress(f"restore of {rec.path}", rec.size)))
    except Exception as e:
        summary.results.append(RecordResult(rec.path, target, "failed", str(e), failure_hint(str(e), opts, target)))
        if opts.exit_on_error:
            raise _stopped(summary) from e
        return
    summary.results.append(RecordResult(rec.path, target, "restored"))


def _check_selectors(store: Store, s: Session, dumps: list[tuple[Record, str]], opts: RestoreOptions,
                     min_major: int) -> None:
    """Refuse ``tables``/``schemas`` names that a dump to restore does not contain: pg_restore would select nothing,
    and with ``recreate`` or ``clean`` the database would be emptied with nothing put back. Decided from each dump's
    table of contents (``pg_restore --list`` of the stored dump, streamed: it stops reading after the TOC)."""
    if not (opts.tables or opts.schemas):
        return
    tool = str(s.tool("pg_restore", min_major).path)
    for rec, db in dumps:
        tables, schemas, sample = _toc_matches(store, s, rec, tool, opts.tables, opts.schemas)
        missing = [f"tables: {t!r}" for t in opts.tables if t not in tables]
        missing += [f"schemas: {n!r}" for n in opts.schemas if n not in schemas]
        if missing:
            has = f"its tables include {', '.join(sample)}" if sample else "it has no tables"
            within = f" within schemas {', '.join(opts.schemas)}" if opts.tables and opts.schemas else ""
            raise PgError(f"{'; '.join(missing)} not in the dump of database {db!r}{within} ({has}; pick the "
                          "database with databases=): nothing was dropped or restored")


def _toc_matches(store: Store, s: Session, rec: Record, tool: str, tables: tuple[str, ...],
                 schemas: tuple[str, ...], sample_size: int = 8) -> tuple[set[str], set[str], list[str]]:
    """Which of ``tables`` (within ``schemas`` when given, as pg_restore combines them) and ``schemas`` the dump's
    TOC holds, and a few table names for the error. Names are matched against the TOC line's text, so memory
    stays bounded whatever the size of the TOC."""
    import subprocess

    found_tables: set[str] = set()
    found_schemas: set[str] = set()
    sample: list[str] = []
    errors: list[BaseException] = []
    with store.open_record(rec) as src, run_tool(commands.pg_restore_list(tool), s.env(), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE) as proc:
        feeder = threading.Thread(target=_feed, args=(src.iter_chunks(), proc.stdin, errors), daemon=True)
        feeder.start()
        while line := proc.stdout.readline(4096):
            relation = toc_match(line.decode("utf-8", "replace").rstrip("\n"), tables, schemas, found_tables,
                                 found_schemas)
            if relation and len(sample) < sample_size:
                sample.append(relation)
        feeder.join()
        if errors:
            proc.kill()
            raise errors[0]
        proc.finish()
    return found_tables, found_schemas, sample


def toc_match(line: str, tables: tuple[str, ...], schemas: tuple[str, ...], found_tables: set[str],
              found_schemas: set[str]) -> str | None:
    """Add the ``tables``/``schemas`` that one ``pg_restore --list`` line selects to the found sets; return the
    line's relation as ``schema.name`` when it is one (for the error's examples; names are printed raw, so one
    with spaces is shown as ``schema name``)."""
    m = _TOC_ENTRY.match(line)
    if not m:
        return None
    entry = m.group(1)
    for n in schemas:
        if entry.startswith(f"SCHEMA - {n} ") or any(entry.startswith(f"{d} {n} ") for d in _SCHEMA_MEMBER_DESCS):
            found_schemas.add(n)
    desc = next((d for d in _TABLE_DESCS if entry.startswith(d + " ")), None)
    if desc is None or entry.startswith(_NOT_RELATIONS):
        return None
    rest = entry[len(desc) + 1:]  # "SCHEMA NAME OWNER"
    for t in tables:
        if any(rest.startswith(f"{n} {t} ") for n in schemas) if schemas else f" {t} " in rest:
            found_tables.add(t)
    parts = rest.split(" ")
    return f"{parts[0]}.{parts[1]}" if len(parts) == 3 else " ".join(parts[:-1])  # spaces make it ambiguous


def _create_schemas(s: Session, database: str, schemas: tuple[str, ...]) -> None:
    """``pg_restore --schema`` restores a schema's objects but not the schema: create missing ones first."""
    from psycopg import sql

    with s.connect(database) as c:
        for name in schemas:
            c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name)))
        c.commit()


def _restore_staged(store: Store, s: Session, rec: Record, tool: str, connect_db: str, jobs: int,
                    kwargs: dict[str, Any]) -> None:
    """``jobs > 1``: pg_restore needs a seekable file, so the dump is staged in a private temp dir (removed)."""
    tmp = tempfile.mkdtemp(prefix="pgplakar-restore-")
    try:
        os.chmod(tmp, 0o700)
        path = os.path.join(tmp, "archive.dump")
        with store.open_record(rec) as src, open(path, "wb") as out:
            for piece in src.iter_chunks():
                out.write(piece)
        with run_tool(commands.pg_restore(tool, connect_db, archive=path, jobs=jobs, **kwargs), s.env(),
                      stdout=None) as t:
            t.finish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
